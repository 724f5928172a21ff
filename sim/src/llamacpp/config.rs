//! The simulator's knobs (`LlamaCppConfig`) and where streamed usage goes (`UsagePlacement`).

use std::time::Duration;

use crate::common::Clock;
use crate::SimModel;

/// Where a streamed OpenAI-compatible answer carries `usage` (`docs/providers.md` §3.3): the
/// placement changed twice across llama-server builds, and a proxy must handle all three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UsagePlacement {
    /// Builds before PR #15444 (Aug 2025): `usage` and `timings` on the finish chunk, no
    /// separate usage chunk.
    FinishChunk,
    /// From #15444 until the fix for #16048 (Sep 2025): a `choices:[]` usage chunk after the
    /// finish chunk, whatever the request asked.
    SeparateChunkAlways,
    /// Current builds: the `choices:[]` usage chunk only with `stream_options.include_usage`.
    #[default]
    SeparateChunkIfAsked,
}

/// Knobs of the simulated `llama-server`.
#[derive(Clone, Debug)]
pub struct LlamaCppConfig {
    /// Router mode (started without `-m`: many models, each in a child) or single-model mode.
    pub router: bool,
    /// Router: the models directory (`SimModel.name` is the id). Single mode: only `models[0]`
    /// is served, under its name (as with `--alias`).
    pub models: Vec<SimModel>,
    /// Router `--models-max`: models resident at once (0 = unlimited). When full, a load
    /// evicts the least recently used model, even one with a request in flight (llama.cpp
    /// issue 21678): that request fails.
    pub models_max: usize,
    /// Router: load a model that a request names and that is not running (`--no-models-autoload`
    /// turns it off; `?autoload=` overrides it per request).
    pub autoload: bool,
    /// Context of each slot (`-c` per slot), capped at the model's trained context length.
    pub n_ctx: u32,
    /// Slots per model (`--parallel`); a request waits for a free slot.
    pub parallel: u32,
    /// From a load's start (startup in single mode, `/models/load` or autoload in router mode)
    /// to status `loaded`; slept with `tokio::time`.
    pub load_latency: Duration,
    /// Delay before each generated token.
    pub token_delay: Duration,
    pub usage: UsagePlacement,
    /// `--slot-save-path` is set: `/slots/{id}?action=save|restore|erase` work (files are kept
    /// in memory). Otherwise those calls answer 501 as the real server does.
    pub slot_save: bool,
    /// `--metrics`: `/metrics` answers; otherwise 501.
    pub metrics: bool,
    /// Router: the next load fails (status `unloaded`, `failed:true`, `exit_code:1`); the
    /// text is what the child would have logged. Single mode ignores it.
    pub fail_load: Option<String>,
    pub clock: Clock,
    /// The reply text of every generation; `None`: deterministic words seeded by the request.
    pub fixed_reply: Option<String>,
    /// Answer llm-warden's summarization requests (recognized by the opening of its
    /// summarizer instructions) with an extractive summary of the transcript, within
    /// `max_tokens` (4-byte pieces, as this simulator counts reply tokens): a deterministic
    /// stand-in for a model, not what llama-server does (see [`crate::extractive`]).
    pub extractive_summarizer: bool,
    /// Tokens generated when the request gives no `max_tokens` / `n_predict` (the model
    /// "stops" there, finish reason `stop`).
    pub max_tokens_default: u32,
    /// Length of embedding vectors (`meta.n_embd` of an embedding model).
    pub embedding_dims: usize,
}

impl Default for LlamaCppConfig {
    fn default() -> Self {
        let mut qwen = SimModel::chat("qwen2.5-7b-instruct-q4_k_m", 4_683_073_184, 32768);
        qwen.arch = "qwen2".to_string();
        qwen.parameter_size = "7.6B".to_string();
        let llama = SimModel::chat("llama-3.2-3b-instruct-q4_k_m", 2_019_377_696, 131072);
        let embed = SimModel::embedding("nomic-embed-text-v1.5-f16", 274_290_560, 2048);
        LlamaCppConfig {
            router: true,
            models: vec![qwen, llama, embed],
            models_max: 4,
            autoload: true,
            n_ctx: 4096,
            parallel: 1,
            load_latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            usage: UsagePlacement::default(),
            slot_save: false,
            metrics: true,
            fail_load: None,
            clock: Clock::system(),
            fixed_reply: None,
            extractive_summarizer: false,
            max_tokens_default: 16,
            embedding_dims: 8,
        }
    }
}
