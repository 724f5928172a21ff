//! Runner options under memory pressure: TDR-007's BufferConfig applied to what the proxy
//! loads on Ollama (`options.num_ctx`, `options.num_batch`).
//!
//! # The rule
//!
//! | level    | a new load gets                                                     |
//! |----------|---------------------------------------------------------------------|
//! | normal   | the provider's defaults (nothing sent)                              |
//! | warning  | `num_ctx` = `buffers.context.initial`                               |
//! | critical | `num_ctx` = half of that (at least 512), and `num_batch` from       |
//! |          | `buffers.working.initial` (below)                                   |
//!
//! A request's own smaller value is kept ("capped at", never raised). LM Studio gets the same
//! contexts through its load API (the lifecycle actor picks them: requests there cannot
//! change a loaded model's context, and have no `num_batch`).
//!
//! # Why requests are rewritten too
//!
//! Ollama compares each request's runner options (`num_ctx`, `num_batch`, ...: the model's
//! defaults plus the request's `options`) with the loaded runner's, and reloads the model when
//! they differ (`server/sched.go`, `needsReload`). A model the proxy loaded with a smaller
//! `num_ctx` would be reloaded at the default by the next ordinary request, undoing the saving
//! and costing a load. So while such a runner is loaded, every native request for it
//! (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`) is given the same
//! `options.num_ctx` / `num_batch` (added when absent, replaced when different), the
//! conversation is fitted into that window by the compaction stage, and the response says so
//! in `x-llm-warden-num-ctx` / `x-llm-warden-num-batch` (`<sent or "default">-><forwarded>`).
//! Models loaded with the defaults (at normal pressure, or by someone else) are left alone.
//!
//! Not covered: Ollama's OpenAI-compatible `/v1/*` cannot carry `num_ctx` or `num_batch`, so a
//! `/v1` request for a model loaded smaller makes Ollama reload it at its defaults (the poll then
//! sees the new context and the proxy stops rewriting). Loads started by `/v1` requests are
//! therefore made with the defaults.
//!
//! # `num_batch` from a memory budget
//!
//! `buffers.working` is memory (MB); `num_batch` is tokens. The compute buffers llama.cpp
//! allocates grow with the batch. Ollama's own estimate (`fs/ggml/ggml.go`, `GraphSize`, for
//! a fully offloaded llama-style model) is 4 bytes × batch × the larger of
//! `1 + 4·embedding + context·(1 + heads)` (attention scores) and `embedding + vocabulary`
//! (the output logits). So `num_batch` = the largest power of two whose buffers fit
//! `buffers.working.initial`, between 32 and Ollama's default 512 (at 512 or more nothing is
//! sent). The geometry comes from `/api/show` (asked once per model); `<arch>.vocab_size`
//! when present, else 128 Ki entries (the size of Llama 3's; Qwen's 152k is close). Without
//! a geometry `num_batch` is left to the provider. Llama 3.2 3B at 2048 tokens: 4 × (3072 +
//! 128256) = 513 KiB a token, so 256 MB gives `num_batch` 256 (half the default's buffers).

use bytes::Bytes;
use serde_json::value::RawValue;

use super::inbound::ModelRequest;
use super::DataPlane;
use crate::lifecycle::{ModelStatus, Shape};
use crate::memory::{Geometry, MIB};
use crate::monitor::Level;
use crate::providers::ProviderKind;
use crate::rewrite;

/// Ollama's default `num_batch`.
pub const DEFAULT_BATCH: u64 = 512;
/// The smallest `num_batch` the proxy asks for.
pub const MIN_BATCH: u64 = 32;
/// The smallest `num_ctx` the proxy asks for at critical.
pub const MIN_CONTEXT: u64 = 512;
/// Vocabulary assumed when `/api/show` does not give one.
pub const ASSUMED_VOCAB: u64 = 128 * 1024;

/// What a load of `model` on Ollama provider `provider` gets now, the pressure being `level`.
pub async fn for_load(state: &DataPlane, provider: usize, model: &str, level: Level) -> Shape {
    let p = &state.providers[provider];
    if p.config.kind != ProviderKind::Ollama {
        return Shape::default();
    }
    let initial = u64::from(state.config.load().buffers.context_initial);
    match level {
        Level::Normal => Shape::default(),
        Level::Warning => Shape {
            num_ctx: Some(initial),
            num_batch: None,
        },
        Level::Critical => {
            let num_ctx = (initial / 2).max(MIN_CONTEXT);
            let geometry = geometry(state, provider, model).await;
            let budget = u64::from(state.config.load().buffers.working_initial) * MIB;
            Shape {
                num_ctx: Some(num_ctx),
                num_batch: geometry.and_then(|g| batch_for(&g, num_ctx, budget)),
            }
        }
    }
}

/// The model's geometry, asking `/api/show` the first time.
async fn geometry(state: &DataPlane, provider: usize, model: &str) -> Option<Geometry> {
    if let Some(known) = state.memory.geometry(provider, model) {
        return known;
    }
    let p = &state.providers[provider];
    let show = crate::providers::ops::show(&state.client, &p.config.upstream, model).await;
    let g = show.ok().and_then(|v| Geometry::from_show(&v));
    state.memory.set_geometry(provider, model, g.clone());
    g
}

/// Bytes of compute buffer per token of batch (Ollama's `GraphSize`, see the module doc).
pub fn batch_bytes_per_token(g: &Geometry, context: u64) -> u64 {
    let attention = 1 + 4 * g.embedding_length + context * (1 + g.head_count);
    let output = g.embedding_length + g.vocab_size.unwrap_or(ASSUMED_VOCAB);
    4 * attention.max(output)
}

/// The `num_batch` whose compute buffers fit `budget` bytes; `None` when the default does.
pub fn batch_for(g: &Geometry, context: u64, budget: u64) -> Option<u64> {
    let per_token = batch_bytes_per_token(g, context).max(1);
    let fits = budget / per_token;
    if fits >= DEFAULT_BATCH {
        return None;
    }
    // The largest power of two not above `fits`, within [MIN_BATCH, DEFAULT_BATCH).
    let pow2 = if fits == 0 {
        0
    } else {
        1u64 << (63 - fits.leading_zeros())
    };
    Some(pow2.max(MIN_BATCH))
}

/// The runner options a native Ollama request for `model` must carry, and those it was sent
/// with: the options of the runner the proxy loaded smaller, or, under pressure and with the
/// model not loaded, those its load will get (each the smaller of the cap and the request's
/// own). `None`: forward as sent.
pub(super) async fn for_request(
    state: &DataPlane,
    provider: usize,
    model: &str,
    parsed: &ModelRequest<'_>,
) -> Option<(Shape, Shape)> {
    let p = &state.providers[provider];
    let sent = || {
        let l = parsed.limits();
        Shape {
            num_ctx: l.num_ctx,
            num_batch: l.num_batch,
        }
    };
    if let Some(runner) = p.lifecycle.runner(model) {
        return Some((runner, sent()));
    }
    if state.monitor.level() == Level::Normal || p.config.kind != ProviderKind::Ollama {
        return None;
    }
    // Loaded already with the defaults (at normal pressure, or by someone else): leave it;
    // reloading it smaller would cost a load now.
    let loaded = p.lifecycle.snapshot().await.into_iter().any(|v| {
        v.model == model && matches!(v.status, ModelStatus::Ready | ModelStatus::Unloading)
    });
    if loaded {
        return None;
    }
    let sent = sent();
    let shape = for_load_capped(state, provider, model, sent).await;
    (!shape.is_default()).then_some((shape, sent))
}

/// What a load gets now (see [`for_load`]), each option the smaller of the cap and `asked`'s.
pub async fn for_load_capped(
    state: &DataPlane,
    provider: usize,
    model: &str,
    asked: Shape,
) -> Shape {
    let level = state.monitor.level();
    if level == Level::Normal {
        return Shape::default();
    }
    let cap = for_load(state, provider, model, level).await;
    let min = |cap: Option<u64>, asked: Option<u64>| cap.map(|c| asked.map_or(c, |a| a.min(c)));
    Shape {
        num_ctx: min(cap.num_ctx, asked.num_ctx),
        num_batch: min(cap.num_batch, asked.num_batch),
    }
}

/// `body` with `options.num_ctx` / `options.num_batch` set as in `shape` (each only where
/// `shape` has one and the request differs), every other byte kept; `None` when nothing
/// changes or the body cannot be rewritten.
pub fn apply(body: &[u8], options: Option<&RawValue>, sent: Shape, shape: Shape) -> Option<Bytes> {
    let mut opts: Vec<u8> = options.map_or(b"{}".to_vec(), |o| o.get().as_bytes().to_vec());
    let mut changed = false;
    for (key, want, had) in [
        ("num_ctx", shape.num_ctx, sent.num_ctx),
        ("num_batch", shape.num_batch, sent.num_batch),
    ] {
        if let Some(n) = want.filter(|n| Some(*n) != had) {
            opts = rewrite::set_top_level(&opts, key, &n.to_string()).ok()?.0;
            changed = true;
        }
    }
    if !changed {
        return None;
    }
    let opts = String::from_utf8(opts).ok()?;
    let (b, _) = rewrite::set_top_level(body, "options", &opts).ok()?;
    Some(Bytes::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama32_3b() -> Geometry {
        Geometry {
            arch: "llama".into(),
            block_count: 28,
            head_count: 24,
            head_count_kv: 8,
            embedding_length: 3072,
            key_length: Some(128),
            value_length: Some(128),
            context_length: Some(131_072),
            vocab_size: Some(128_256),
        }
    }

    fn qwen25_7b() -> Geometry {
        Geometry {
            arch: "qwen2".into(),
            block_count: 28,
            head_count: 28,
            head_count_kv: 4,
            embedding_length: 3584,
            key_length: None,
            value_length: None,
            context_length: Some(32_768),
            vocab_size: None,
        }
    }

    #[test]
    fn bytes_per_batch_token_by_hand() {
        // Llama 3.2 3B: the logits dominate at 2048: 4 × (3072 + 128256) = 525,312.
        assert_eq!(batch_bytes_per_token(&llama32_3b(), 2048), 525_312);
        // At 32k the attention scores do: 4 × (1 + 4·3072 + 32768·25) = 3,325,956.
        assert_eq!(batch_bytes_per_token(&llama32_3b(), 32_768), 3_325_956);
        // Qwen 2.5 7B without vocab_size: 4 × (3584 + 131072) = 538,624.
        assert_eq!(batch_bytes_per_token(&qwen25_7b(), 2048), 538_624);
    }

    #[test]
    fn batch_is_a_power_of_two_that_fits() {
        let g = llama32_3b();
        // 256 MiB / 525,312 B = 511 tokens -> 256.
        assert_eq!(batch_for(&g, 2048, 256 * MIB), Some(256));
        // 512 MiB fits 1022: the default 512 does, nothing is sent.
        assert_eq!(batch_for(&g, 2048, 512 * MIB), None);
        // 64 MiB fits 127 -> 64; 1 MiB fits 1 -> the floor 32.
        assert_eq!(batch_for(&g, 2048, 64 * MIB), Some(64));
        assert_eq!(batch_for(&g, 2048, MIB), Some(MIN_BATCH));
        assert_eq!(batch_for(&g, 2048, 0), Some(MIN_BATCH));
    }

    #[test]
    fn apply_adds_options_keeping_every_other_byte() {
        let body = br#"{"model":"m", "messages":[]}"#;
        let shape = Shape {
            num_ctx: Some(2048),
            num_batch: Some(256),
        };
        let out = apply(body, None, Shape::default(), shape).expect("rewritten");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["options"]["num_ctx"], 2048);
        assert_eq!(v["options"]["num_batch"], 256);
        assert_eq!(v["model"], "m");
        assert!(std::str::from_utf8(&out)
            .expect("utf8")
            .contains(r#""messages":[]"#));
    }

    #[test]
    fn apply_replaces_only_what_differs() {
        let body = br#"{"model":"m","options":{"temperature":0.5,"num_ctx":8192,"num_batch":256}}"#;
        let parsed: serde_json::Value = serde_json::from_slice(body).expect("json");
        let raw = serde_json::value::to_raw_value(&parsed["options"]).expect("raw");
        let sent = Shape {
            num_ctx: Some(8192),
            num_batch: Some(256),
        };
        let shape = Shape {
            num_ctx: Some(4096),
            num_batch: Some(256),
        };
        let out = apply(body, Some(&raw), sent, shape).expect("rewritten");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["options"]["num_ctx"], 4096);
        assert_eq!(v["options"]["num_batch"], 256);
        assert_eq!(v["options"]["temperature"], 0.5);
        // Nothing to change: None.
        assert!(apply(body, Some(&raw), sent, sent).is_none());
    }
}
