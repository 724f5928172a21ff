//! Token estimates for chat requests, and their per-model calibration against what providers
//! report. Owns the BPE tables (loaded lazily, once per [`Encoding`], shared by every clone of
//! [`TokenCounter`]) and the table of learned ratios; it does not read provider responses (the
//! caller passes `prompt_eval_count` / `usage.prompt_tokens`) nor decide what to do with a count.
//!
//! Cost model: callers first compare [`upper_bound`] of the text's bytes with their limit, so
//! small requests pay nothing. Counting runs `tiktoken-rs`' ordinary-text path (special-token
//! strings such as `<|endoftext|>` count as plain text) at about 15 MB/s (cl100k) and 25 MB/s
//! (o200k) on one core for chat text in release builds (`benches/tokens.rs`; 4–10 MB/s on long
//! runs of one character class); [`TokenCounter::count_each_async`] moves bodies over
//! [`LARGE_BYTES`], and any first use of an encoding, to the blocking pool. Loading cl100k
//! costs about 24 MiB of RSS and 55–75 ms, o200k about 45 MiB and 130 ms
//! (`examples/tokens_rss.rs`), so neither loads before its first use.
//!
//! Which encoding ([`Encoding::for_model`]): OpenAI's own families use o200k (gpt-4o, gpt-4.1,
//! gpt-5, o1/o3/o4, gpt-oss, whose harmony encoding is o200k plus special tokens). Llama 3.x and
//! Qwen 2.5/3 stay on cl100k: their vocabularies were built by extending cl100k (Llama 3:
//! cl100k's 100k tokens plus 28k non-English ones; Qwen: cl100k plus Chinese, digits split
//! one by one), with cl100k's pre-tokenizer, so on English and code they count almost exactly
//! like it. Gemma 3 (a 262k-entry multilingual SentencePiece vocabulary) uses o200k, the closer
//! of the two on non-English text. Mistral stays on cl100k: its older models use a 32k
//! SentencePiece vocabulary and the newer ones Tekken (131k), and nothing suggests o200k is
//! closer for either on the English and code that dominate local use. Everything else gets
//! cl100k. These are
//! judgements from published vocabularies, not measurements against each model's tokenizer;
//! the learned ratio ([`TokenCounter::calibrate`]) absorbs what remains.

mod calibration;
mod message;
#[cfg(test)]
mod tests;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use calibration::CalibrationTable;
pub use calibration::{
    CALIBRATION_ALPHA, CALIBRATION_MIN_ESTIMATE, CALIBRATION_MODELS_MAX, CALIBRATION_RATIO_RANGE,
};

/// One learned ratio, as saved across restarts.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    pub provider: String,
    pub model: String,
    pub ratio: f64,
    pub samples: u64,
}
pub use message::{
    IMAGE_TOKENS, MESSAGE_OVERHEAD, NAME_OVERHEAD, REPLY_PRIMING, TOOL_CALL_OVERHEAD,
};

/// Messages with more text than this (in bytes) are counted on the blocking pool by
/// [`TokenCounter::count_each_async`]: at 15 MB/s (cl100k), 16 KiB is about 1 ms of CPU, the
/// most we let one request hold an I/O thread.
pub const LARGE_BYTES: usize = 16 * 1024;

/// Texts are encoded in pieces of at most this many bytes. tiktoken-rs' pre-tokenizer regex
/// (fancy-regex) returns an error on very long runs of one character class (a megabyte of
/// spaces), and tiktoken-rs unwraps it, so a whole-text call could panic; it also slows down
/// superlinearly on such runs. Pieces end before a space that follows a non-space, where no
/// cl100k or o200k pre-token can straddle, so the count is exact; only a run of more than
/// 8 KiB with no such place is cut blind, which can change its count by a token or two.
const CHUNK_BYTES: usize = 8 * 1024;

/// Which BPE a model's tokenizer is closest to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `cl100k_base` (GPT-4, GPT-3.5; the base of Llama 3's and Qwen's vocabularies).
    Cl100k,
    /// `o200k_base` (GPT-4o and later, gpt-oss).
    O200k,
}

impl Encoding {
    /// `"cl100k"`, `"cl100k_base"`, `"o200k"` or `"o200k_base"` (ASCII case ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.strip_suffix("_base").unwrap_or(&lower) {
            "cl100k" => Some(Self::Cl100k),
            "o200k" => Some(Self::O200k),
            _ => None,
        }
    }

    /// The tiktoken name: `"cl100k_base"` or `"o200k_base"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cl100k => "cl100k_base",
            Self::O200k => "o200k_base",
        }
    }

    /// The default for a model name, by family (the rule and its reasons are in the module
    /// doc). Looks at the last `/`-separated segment, so `openai/gpt-oss-20b` (LM Studio) and
    /// `gpt-oss:20b` (Ollama) both match, ignoring ASCII case.
    pub fn for_model(model: &str) -> Self {
        let name = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        let starts = |prefix: &str| name.starts_with(prefix);
        // `o1`, `o3-mini`, `o4-mini:latest`, but not `o3de` or `olmo`.
        let o_series = ["o1", "o3", "o4"].iter().any(|p| {
            name.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', ':', '.']))
        });
        let o200k = o_series
            || [
                "gpt-4o",
                "chatgpt-4o",
                "gpt-4.1",
                "gpt-5",
                "gpt-oss",
                "gemma3",
                "gemma-3",
            ]
            .iter()
            .any(|p| starts(p));
        if o200k {
            Self::O200k
        } else {
            Self::Cl100k
        }
    }

    /// The shared BPE, built on first use (55–75 ms for cl100k, about 130 ms for o200k).
    fn bpe(self) -> &'static CoreBPE {
        let bpe = match self {
            Self::Cl100k => tiktoken_rs::cl100k_base_singleton(),
            Self::O200k => tiktoken_rs::o200k_base_singleton(),
        };
        self.loaded_flag().store(true, Relaxed);
        bpe
    }

    /// Whether [`bpe`](Self::bpe) has returned once, so a count no longer risks the load.
    fn is_loaded(self) -> bool {
        self.loaded_flag().load(Relaxed)
    }

    fn loaded_flag(self) -> &'static AtomicBool {
        static CL100K: AtomicBool = AtomicBool::new(false);
        static O200K: AtomicBool = AtomicBool::new(false);
        match self {
            Self::Cl100k => &CL100K,
            Self::O200k => &O200K,
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cheap bound: a BPE token is at least one byte, so a text of `bytes` bytes has at most
/// `bytes` tokens. Used to skip counting when even the bound fits. It bounds
/// [`TokenCounter::count_text`]; a message's fixed costs ([`MESSAGE_OVERHEAD`], the role, the
/// reply priming) are covered by the JSON punctuation around its text in a request body, but
/// images referenced by URL ([`IMAGE_TOKENS`] each) are not.
pub fn upper_bound(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Shared token counter. Cheap to clone (one `Arc`). The BPE tables are process-wide
/// singletons that load lazily, once per encoding, on first use; the calibration table is
/// per counter (and shared by its clones).
#[derive(Clone, Default)]
pub struct TokenCounter {
    calibration: Arc<CalibrationTable>,
}

impl TokenCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens of `text` in `enc` (ordinary text, special tokens not recognised). Never panics:
    /// long texts are encoded in pieces of at most 8 KiB, cut where no pre-token straddles, so
    /// the count is exact except on a run of more than 8 KiB without a space after a non-space
    /// (a token or two per cut there).
    pub fn count_text(&self, enc: Encoding, text: &str) -> u64 {
        count_chunked(enc.bpe(), text, CHUNK_BYTES)
    }

    /// Tokens one chat message takes in the prompt, Ollama or OpenAI shape: text content (a
    /// string or an array of content parts), role, name / tool_name / tool_call_id, tool calls
    /// (name + arguments as JSON text, plus [`TOOL_CALL_OVERHEAD`]), images ([`IMAGE_TOKENS`]
    /// each), plus [`MESSAGE_OVERHEAD`] for the chat template. Reasoning fields (`thinking`,
    /// `reasoning_content`) are not counted: chat templates drop them from earlier turns.
    pub fn count_message(&self, enc: Encoding, message: &Value) -> u64 {
        let mut tokens = MESSAGE_OVERHEAD;
        message::visit(message, &mut |piece| {
            tokens = tokens.saturating_add(match piece {
                message::Piece::Text(text) => self.count_text(enc, &text),
                message::Piece::Fixed(n) => n,
            });
        });
        tokens
    }

    /// Sum of [`count_message`](Self::count_message) over `messages`, plus [`REPLY_PRIMING`].
    pub fn count_messages(&self, enc: Encoding, messages: &[Value]) -> u64 {
        messages
            .iter()
            .map(|m| self.count_message(enc, m))
            .fold(REPLY_PRIMING, u64::saturating_add)
    }

    /// Per-message counts, in order ([`count_message`](Self::count_message) each; the reply
    /// priming is not included). Counted on the blocking pool when the messages hold more than
    /// [`LARGE_BYTES`] of text or `enc` has not loaded yet (the first count builds its table:
    /// 55–75 ms for cl100k, about 130 ms for o200k), inline otherwise (and inline outside a
    /// Tokio runtime).
    pub async fn count_each_async(&self, enc: Encoding, messages: Arc<Vec<Value>>) -> Vec<u64> {
        if enc.is_loaded() && message::text_bytes(&messages) <= LARGE_BYTES {
            return self.count_each(enc, &messages);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.count_each(enc, &messages);
        };
        let this = self.clone();
        let shared = Arc::clone(&messages);
        match runtime
            .spawn_blocking(move || this.count_each(enc, &shared))
            .await
        {
            Ok(counts) => counts,
            // The pool is shutting down or the task panicked (counting itself does not):
            // fall back to the byte bound rather than guess lower.
            Err(err) => {
                tracing::warn!(error = %err, "token counting task failed; using the byte bound");
                messages.iter().map(message::byte_bound).collect()
            }
        }
    }

    fn count_each(&self, enc: Encoding, messages: &[Value]) -> Vec<u64> {
        messages
            .iter()
            .map(|m| self.count_message(enc, m))
            .collect()
    }

    /// Records that for (provider, model) the provider reported `reported` prompt tokens for a
    /// prompt we estimated at `estimated` (before calibration), and updates the smoothed ratio.
    ///
    /// Rule: samples with `estimated` under [`CALIBRATION_MIN_ESTIMATE`] (64) or a ratio outside
    /// [`CALIBRATION_RATIO_RANGE`] (0.25..=4) are ignored. The first 8 accepted samples are
    /// averaged; after that each moves the ratio by [`CALIBRATION_ALPHA`] (0.1) of the
    /// difference, and a sample more than 2x away from the learned ratio either way is ignored,
    /// unless 8 such come in a row: then the model changed under its name and learning starts
    /// over from the last one.
    ///
    /// `reported` must be the whole prompt: add cached tokens where the provider reports them
    /// apart, and skip prompts it truncated to its context (both make `reported` too low; some
    /// Ollama versions leave cached tokens out of `prompt_eval_count`).
    pub fn calibrate(&self, provider: &str, model: &str, estimated: u64, reported: u64) {
        self.calibration
            .observe(provider, model, estimated, reported);
    }

    /// The learned ratio reported/estimated (1.0 until something was learned).
    pub fn ratio(&self, provider: &str, model: &str) -> f64 {
        self.calibration.ratio(provider, model)
    }

    /// `estimate` scaled by the ratio, rounded up (saturating at `u64::MAX`).
    pub fn calibrated(&self, provider: &str, model: &str, estimate: u64) -> u64 {
        scale_up(estimate, self.ratio(provider, model))
    }

    /// Every learned ratio (for saving across restarts).
    pub fn calibrations(&self) -> Vec<Calibration> {
        self.calibration.export()
    }

    /// Takes saved ratios back.
    pub fn restore(&self, rows: &[Calibration]) {
        self.calibration.import(rows);
    }

    /// Number of calibration samples accepted for (provider, model) since it was first seen
    /// or last re-learned; ignored samples do not count.
    pub fn samples(&self, provider: &str, model: &str) -> u64 {
        self.calibration.samples(provider, model)
    }
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter")
            .field("calibrated_models", &self.calibration.len())
            .finish()
    }
}

/// `estimate * ratio`, rounded up. The product is nudged down by one part in 10^12 first so
/// that float noise (100 * 1.3 = 130.00000000000003) does not round an exact result up.
fn scale_up(estimate: u64, ratio: f64) -> u64 {
    if estimate == 0 {
        return 0;
    }
    let scaled = (estimate as f64 * ratio * (1.0 - 1e-12)).ceil();
    // `as` saturates: NaN gives 0, too large gives u64::MAX.
    scaled as u64
}

/// Counts `text` in pieces of at most `max` bytes (see [`CHUNK_BYTES`]).
fn count_chunked(bpe: &CoreBPE, text: &str, max: usize) -> u64 {
    let mut rest = text;
    let mut tokens = 0u64;
    while !rest.is_empty() {
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            split_point(rest, max)
        };
        let (piece, tail) = rest.split_at(cut);
        tokens = tokens.saturating_add(count_piece(bpe, piece));
        rest = tail;
    }
    tokens
}

/// Where to cut `text` (longer than `max`): before the last space within `max` bytes whose
/// previous character is not whitespace (an exact pre-token boundary for cl100k and o200k,
/// whose pre-tokens contain a space only first or among other whitespace), else at the last
/// character boundary within `max` bytes (after the first character if even that is longer).
/// Always a character boundary greater than 0.
fn split_point(text: &str, max: usize) -> usize {
    let mut limit = max.min(text.len());
    while limit > 0 && !text.is_char_boundary(limit) {
        limit -= 1;
    }
    if limit == 0 {
        return text.char_indices().nth(1).map_or(text.len(), |(i, _)| i);
    }
    let exact = memchr::memrchr_iter(b' ', &text.as_bytes()[..limit])
        .take_while(|&i| i > 0)
        .find(|&i| {
            text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
        });
    exact.unwrap_or(limit)
}

/// Tokens of one piece. The catch is a last resort for the upstream `unwrap` described at
/// [`CHUNK_BYTES`], which pieces that short never reach in our tests; if it fires, the piece
/// counts as a quarter of its bytes.
fn count_piece(bpe: &CoreBPE, piece: &str) -> u64 {
    match catch_unwind(AssertUnwindSafe(|| bpe.encode_ordinary(piece).len())) {
        Ok(n) => u64::try_from(n).unwrap_or(u64::MAX),
        Err(_) => {
            tracing::warn!(
                bytes = piece.len(),
                "tokenizer panicked; estimating from bytes"
            );
            upper_bound(piece.len().div_ceil(4))
        }
    }
}
