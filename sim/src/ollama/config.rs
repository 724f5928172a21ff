//! The simulator's knobs (`OllamaConfig`) and the catalogue facts it derives from a model:
//! full names, digests, file times, `owned_by`, geometry, KV cache size and the Modelfile
//! text `/api/show` prints.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{self, Clock};
use crate::SimModel;

/// Base mtime of the catalogue's model files.
const MODIFIED_UNIX: u64 = 1_764_000_000;

/// Knobs of the simulated server; `Default` mirrors a stock `ollama serve` with three models.
#[derive(Clone, Debug)]
pub struct OllamaConfig {
    /// The catalogue (`/api/tags`); bare names mean `:latest`.
    pub models: Vec<SimModel>,
    /// Cold-load delay (`tokio::time::sleep`).
    pub load_latency: Duration,
    /// Delay before each streamed token chunk.
    pub token_delay: Duration,
    /// Tokens generated per reply, capped by `options.num_predict` / `max_tokens`.
    pub reply_tokens: usize,
    /// Every reply says exactly this (one token per word, capped by `num_predict`) instead
    /// of seeded words: a deterministic summarizer for the compaction tests.
    pub fixed_reply: Option<String>,
    /// Answer llm-warden's summarization requests (recognized by the opening of its
    /// summarizer instructions) with an extractive summary of the transcript, within
    /// `num_predict` tokens as the prompt tokenizer counts them (4 bytes each): a
    /// deterministic stand-in for a model, not what Ollama does (see [`crate::extractive`]).
    /// Other requests are answered as usual.
    pub extractive_summarizer: bool,
    /// `OLLAMA_MAX_LOADED_MODELS`.
    pub max_loaded_models: usize,
    /// `OLLAMA_KEEP_ALIVE`; `Duration::MAX` means forever.
    pub keep_alive: Duration,
    /// `OLLAMA_CONTEXT_LENGTH`.
    pub default_num_ctx: u32,
    /// `OLLAMA_MAX_QUEUE`: requests waiting for a model beyond this get 503.
    pub max_queue: usize,
    /// `OLLAMA_NUM_PARALLEL`: generations one model runs at once; more wait their turn
    /// (Ollama's default is 1). 0 = unlimited, the simulator's default, so that tests of
    /// the proxy are not paced by it.
    pub num_parallel: usize,
    /// `OLLAMA_KV_CACHE_TYPE` (`f16`, `q8_0`, `q4_0`; anything else is f16): with
    /// `num_parallel`, what the KV cache in `/api/ps` `size` takes.
    pub kv_cache_type: String,
    /// Length of the simulated embeddings.
    pub embedding_dims: usize,
    /// `/api/version`.
    pub version: String,
    pub clock: Clock,
    /// The server's local UTC offset in seconds, used by `expires_at` and `modified_at`
    /// (0 prints `Z`). Default `-08:00`, so clients must parse offsets.
    pub utc_offset_secs: i32,
    /// `OLLAMA_ORIGINS`: extra allowed CORS origins (`*` wildcards allowed, e.g. `https://*.example.com`).
    pub origins: Vec<String>,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        let llama = SimModel::chat("llama3.2:latest", 2_019_393_189, 131_072);
        let mut qwen = SimModel::chat("qwen2.5:7b", 4_683_087_332, 32_768);
        qwen.arch = "qwen2".to_string();
        qwen.parameter_size = "7.6B".to_string();
        qwen.default_num_ctx = Some(8192);
        let embed = SimModel::embedding("nomic-embed-text:latest", 274_302_450, 2048);
        OllamaConfig {
            models: vec![llama, qwen, embed],
            load_latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            reply_tokens: 8,
            fixed_reply: None,
            extractive_summarizer: false,
            max_loaded_models: 3,
            keep_alive: Duration::from_secs(300),
            default_num_ctx: 4096,
            max_queue: 512,
            num_parallel: 0,
            kv_cache_type: "f16".to_string(),
            embedding_dims: 8,
            version: "0.13.0".to_string(),
            clock: Clock::system(),
            utc_offset_secs: -8 * 3600,
            origins: Vec::new(),
        }
    }
}

// --- catalogue facts ---

/// `name` → `name:latest` unless the last path segment carries a tag.
pub(super) fn full_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// A stable 64-hex-digit digest for a model.
pub(super) fn digest(name: &str) -> String {
    (0..4u8)
        .map(|i| {
            let mut seed = name.as_bytes().to_vec();
            seed.push(i);
            format!("{:016x}", common::hash_bytes(&seed))
        })
        .collect()
}

pub(super) fn modified_at(name: &str) -> SystemTime {
    let h = common::hash_bytes(name.as_bytes());
    UNIX_EPOCH
        + Duration::new(
            MODIFIED_UNIX - h % (30 * 86_400),
            (h % 1_000_000_000) as u32,
        )
}

/// `owned_by` of `/v1/models`: the namespace, `library` for official models.
pub(super) fn owner(name: &str) -> String {
    let mut parts: Vec<&str> = name.split('/').collect();
    parts.pop();
    parts.pop().unwrap_or("library").to_string()
}

/// The transformer shape `/api/show` reports and the KV cache size follows.
pub(super) struct Geometry {
    pub(super) blocks: u32,
    pub(super) heads: u32,
    pub(super) kv_heads: u32,
    pub(super) embd: u32,
}

pub(super) fn geometry(m: &SimModel) -> Geometry {
    if m.embedding || m.arch.contains("bert") {
        Geometry {
            blocks: 12,
            heads: 12,
            kv_heads: 12,
            embd: 768,
        }
    } else if m.size_bytes < 3_000_000_000 {
        Geometry {
            blocks: 28,
            heads: 24,
            kv_heads: 8,
            embd: 3072,
        }
    } else {
        Geometry {
            blocks: 28,
            heads: 28,
            kv_heads: 4,
            embd: 3584,
        }
    }
}

/// K and V for every layer at `num_ctx` per slot. Ollama starts its runner with `-c num_ctx
/// × OLLAMA_NUM_PARALLEL -np OLLAMA_NUM_PARALLEL --cache-type-k/-v OLLAMA_KV_CACHE_TYPE`
/// (`llm/llama_server.go`), while `/api/ps` `context_length` stays the per-slot `num_ctx`;
/// element sizes as Ollama's own estimate counts them (f16 2, q8_0 1, q4_0 ½ bytes).
pub(super) fn kv_cache_bytes(m: &SimModel, num_ctx: u32, cfg: &OllamaConfig) -> u64 {
    let g = geometry(m);
    let head_dim = u64::from(g.embd / g.heads.max(1));
    let slots = cfg.num_parallel.max(1) as u64;
    let f16 =
        2 * u64::from(g.blocks) * u64::from(num_ctx) * slots * u64::from(g.kv_heads) * head_dim * 2;
    match cfg.kv_cache_type.as_str() {
        "q8_0" => f16 / 2,
        "q4_0" => f16 / 4,
        _ => f16,
    }
}

pub(super) fn parameter_count(size: &str) -> u64 {
    let (num, mult) = match size.chars().last() {
        Some('B') => (&size[..size.len() - 1], 1e9),
        Some('M') => (&size[..size.len() - 1], 1e6),
        _ => (size, 1.0),
    };
    (num.parse::<f64>().unwrap_or(0.0) * mult) as u64
}

pub(super) fn capabilities(m: &SimModel) -> Vec<&'static str> {
    if m.embedding {
        vec!["embedding"]
    } else {
        vec!["completion", "tools"]
    }
}

/// The Modelfile `PARAMETER` block of `/api/show`.
pub(super) fn parameters_text(m: &SimModel) -> String {
    let mut lines = Vec::new();
    if let Some(n) = m.default_num_ctx {
        lines.push(format!("{:<30} {n}", "num_ctx"));
    }
    if !m.embedding {
        let stop = if m.arch == "qwen2" {
            "<|im_end|>"
        } else {
            "<|eot_id|>"
        };
        lines.push(format!("{:<30} \"{stop}\"", "stop"));
    }
    lines.join("\n")
}

/// RFC 3339 with nanoseconds in the server's local offset (Go prints `Z` for UTC).
pub(super) fn local_rfc3339(t: SystemTime, offset: i32) -> String {
    if offset == 0 {
        return common::rfc3339_nano(t);
    }
    let shift = Duration::from_secs(u64::from(offset.unsigned_abs()));
    let shifted = if offset > 0 {
        t + shift
    } else {
        t.checked_sub(shift).unwrap_or(UNIX_EPOCH)
    };
    let s = common::rfc3339_nano(shifted);
    let a = offset.unsigned_abs();
    format!(
        "{}{}{:02}:{:02}",
        s.trim_end_matches('Z'),
        if offset < 0 { '-' } else { '+' },
        a / 3600,
        (a % 3600) / 60
    )
}
