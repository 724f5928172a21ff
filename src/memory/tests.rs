//! KV estimates for real architectures (hand-computed), `allocation` edge cases, and the
//! split of the Ollama simulator's `/api/ps` `size` checked end to end.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::*;
use crate::config::{parse_upstream, Config};
use crate::providers::ops::{self, LoadOptions};
use crate::providers::ProviderKind;
use llm_warden_sim::ollama::{self, OllamaConfig};
use llm_warden_sim::{Clock, SimModel};

/// `/api/show` of Llama 3.2 3B (`llama3.2:latest`), the keys that matter plus some that
/// do not (non-verbose answers null the token lists).
pub(crate) fn llama32_3b_show() -> Value {
    json!({"model_info": {
        "general.architecture": "llama",
        "general.parameter_count": 3_212_749_888u64,
        "llama.attention.head_count": 24,
        "llama.attention.head_count_kv": 8,
        "llama.attention.layer_norm_rms_epsilon": 0.00001,
        "llama.block_count": 28,
        "llama.context_length": 131_072,
        "llama.embedding_length": 3072,
        "llama.feed_forward_length": 8192,
        "llama.rope.dimension_count": 128,
        "llama.vocab_size": 128_256,
        "tokenizer.ggml.tokens": null
    }})
}

/// `/api/show` of Qwen 2.5 7B (`qwen2.5:7b`).
pub(crate) fn qwen25_7b_show() -> Value {
    json!({"model_info": {
        "general.architecture": "qwen2",
        "general.parameter_count": 7_615_616_512u64,
        "qwen2.attention.head_count": 28,
        "qwen2.attention.head_count_kv": 4,
        "qwen2.block_count": 28,
        "qwen2.context_length": 32_768,
        "qwen2.embedding_length": 3584,
        "qwen2.feed_forward_length": 18_944
    }})
}

/// Gemma 2 9B: head size 256 given by key/value_length (embedding / heads would say 224).
fn gemma2_9b_show() -> Value {
    json!({"model_info": {
        "general.architecture": "gemma2",
        "gemma2.attention.head_count": 16,
        "gemma2.attention.head_count_kv": 8,
        "gemma2.attention.key_length": 256,
        "gemma2.attention.value_length": 256,
        "gemma2.attention.sliding_window": 4096,
        "gemma2.block_count": 42,
        "gemma2.context_length": 8192,
        "gemma2.embedding_length": 3584
    }})
}

fn geometry(show: Value) -> Geometry {
    Geometry::from_show(&show).expect("a complete model_info")
}

fn llama() -> Geometry {
    geometry(llama32_3b_show())
}

fn qwen() -> Geometry {
    geometry(qwen25_7b_show())
}

/// The simulator's embedding model: nomic-bert, 12 layers of 12 heads, embedding 768.
fn nomic_bert() -> Geometry {
    Geometry {
        arch: "nomic-bert".into(),
        block_count: 12,
        head_count: 12,
        head_count_kv: 12,
        embedding_length: 768,
        key_length: None,
        value_length: None,
        context_length: Some(2048),
        vocab_size: None,
    }
}

#[test]
fn geometry_is_read_from_model_info() {
    let cases = [
        (
            llama32_3b_show(),
            Geometry {
                arch: "llama".into(),
                block_count: 28,
                head_count: 24,
                head_count_kv: 8,
                embedding_length: 3072,
                key_length: None,
                value_length: None,
                context_length: Some(131_072),
                vocab_size: Some(128_256),
            },
            (128, 128),
        ),
        (
            qwen25_7b_show(),
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
            },
            (128, 128),
        ),
        (
            gemma2_9b_show(),
            Geometry {
                arch: "gemma2".into(),
                block_count: 42,
                head_count: 16,
                head_count_kv: 8,
                embedding_length: 3584,
                key_length: Some(256),
                value_length: Some(256),
                context_length: Some(8192),
                vocab_size: None,
            },
            (256, 256),
        ),
        // Per-layer head counts: the fewest query heads, the most K/V heads (as Ollama),
        // skipping a layer without attention (0).
        (
            json!({"model_info": {
                "general.architecture": "openelm",
                "openelm.block_count": 4,
                "openelm.attention.head_count": [12, 0, 16, 20],
                "openelm.attention.head_count_kv": [3, 0, 4, 5],
                "openelm.embedding_length": 1280
            }}),
            Geometry {
                arch: "openelm".into(),
                block_count: 4,
                head_count: 12,
                head_count_kv: 5,
                embedding_length: 1280,
                key_length: None,
                value_length: None,
                context_length: None,
                vocab_size: None,
            },
            (106, 106),
        ),
    ];
    for (show, want, (k, v)) in cases {
        let got = Geometry::from_show(&show).expect("parses");
        assert_eq!(got, want);
        assert_eq!((got.key_dim(), got.value_dim()), (k, v), "{}", want.arch);
    }
}

#[test]
fn geometry_without_its_keys_is_none() {
    let mut no_kv_heads = llama32_3b_show();
    no_kv_heads["model_info"]
        .as_object_mut()
        .expect("an object")
        .remove("llama.attention.head_count_kv");
    let mha = Geometry::from_show(&no_kv_heads).expect("head_count_kv is optional");
    assert_eq!(mha.head_count_kv, 24, "one K/V head per query head");

    let without = |key: &str| {
        let mut show = llama32_3b_show();
        show["model_info"]
            .as_object_mut()
            .expect("an object")
            .remove(key);
        show
    };
    let cases = [
        ("no model_info", json!({"details": {}})),
        ("not an object", json!("llama")),
        ("no architecture", without("general.architecture")),
        ("no block_count", without("llama.block_count")),
        ("no head_count", without("llama.attention.head_count")),
        ("no embedding_length", without("llama.embedding_length")),
        (
            "keys of another architecture",
            json!({"model_info": {"general.architecture": "qwen2", "llama.block_count": 28}}),
        ),
        (
            "zero heads and no head sizes",
            json!({"model_info": {
                "general.architecture": "x", "x.block_count": 2,
                "x.attention.head_count": 0, "x.embedding_length": 64
            }}),
        ),
        (
            "a string where a number belongs",
            json!({"model_info": {
                "general.architecture": "x", "x.block_count": "28",
                "x.attention.head_count": 8, "x.embedding_length": 64
            }}),
        ),
    ];
    for (what, show) in cases {
        assert_eq!(Geometry::from_show(&show), None, "{what}");
    }
}

#[test]
fn kv_bytes_match_hand_computed_values() {
    let mla = Geometry {
        arch: "deepseek2".into(),
        block_count: 2,
        head_count: 16,
        head_count_kv: 16,
        embedding_length: 2048,
        key_length: Some(192),
        value_length: Some(128),
        context_length: None,
        vocab_size: None,
    };
    // (what, geometry, context per slot, slots, bytes per element, bytes)
    let cases = [
        // Llama 3.2 3B: 2 (K, V) × 28 layers × 8 KV heads × 128 (3072 / 24) × 2 B (f16)
        // = 114,688 B a token.
        // × 4096 = 469,762,048 B = 448 MiB.
        ("llama 4096 f16", llama(), 4096, 1, 2.0, 469_762_048),
        // × 131,072 (its trained context) = 15,032,385,536 B = 14 GiB.
        ("llama 131072 f16", llama(), 131_072, 1, 2.0, 15_032_385_536),
        // × 4096 × 4 slots = 1,879,048,192 B = 1792 MiB.
        ("llama 4096 x4 f16", llama(), 4096, 4, 2.0, 1_879_048_192),
        // q8_0 as Ollama counts it (1 B): half of f16 = 234,881,024 B = 224 MiB.
        ("llama 4096 q8_0", llama(), 4096, 1, 1.0, 234_881_024),
        // q4_0 with its block scales (18 B per 32): 234,881,024 × 0.5625 = 132,120,576 B.
        ("llama 4096 q4_0", llama(), 4096, 1, 0.5625, 132_120_576),
        // Qwen 2.5 7B: 2 × 28 layers × 4 KV heads × 128 (3584 / 28) × 2 B = 57,344 B a token.
        // × 8192 (its Modelfile num_ctx) = 469,762,048 B = 448 MiB.
        ("qwen 8192 f16", qwen(), 8192, 1, 2.0, 469_762_048),
        // × 32,768 (trained) = 1,879,048,192 B = 1792 MiB.
        ("qwen 32768 f16", qwen(), 32_768, 1, 2.0, 1_879_048_192),
        // 2 slots of 4096 hold as much as one of 8192.
        ("qwen 4096 x2 f16", qwen(), 4096, 2, 2.0, 469_762_048),
        // Gemma 2 9B: 42 layers × 8 KV heads × (256 + 256) × 2 B = 344,064 B a token;
        // × 8192 = 2,818,572,288 B = 2688 MiB (sliding-window layers would hold less).
        (
            "gemma2 8192 f16",
            geometry(gemma2_9b_show()),
            8192,
            1,
            2.0,
            2_818_572_288,
        ),
        // K and V of different sizes: 2 layers × 16 heads × (192 + 128) × 2 B = 20,480 B
        // a token; × 1000 = 20,480,000 B.
        ("k != v", mla, 1000, 1, 2.0, 20_480_000),
        // The simulator's nomic-bert: 2 × 12 × 12 × 64 (768 / 12) × 2 B = 36,864 B a token;
        // × 2048 = 75,497,472 B = 72 MiB.
        (
            "nomic-bert 2048 f16",
            nomic_bert(),
            2048,
            1,
            2.0,
            75_497_472,
        ),
        ("no context", llama(), 0, 1, 2.0, 0),
        ("no slots", llama(), 4096, 0, 2.0, 0),
    ];
    for (what, g, context, slots, bpe, want) in cases {
        assert_eq!(g.kv_bytes(context, slots, bpe), want, "{what}");
    }
    // One token of Llama 3.2 3B = 112 KiB; a fractional byte is rounded up.
    assert_eq!(llama().kv_bytes_for_tokens(1, 2.0), 114_688);
    assert_eq!(llama().kv_bytes_for_tokens(1024, 2.0), 117_440_512);
    let tiny = Geometry {
        block_count: 1,
        head_count_kv: 1,
        key_length: Some(1),
        value_length: Some(0),
        ..llama()
    };
    assert_eq!(tiny.kv_bytes_for_tokens(1, 0.5625), 1);
    let huge = Geometry {
        block_count: u64::MAX,
        ..llama()
    };
    assert_eq!(
        huge.kv_bytes(u64::MAX, u64::MAX, 2.0),
        u64::MAX,
        "saturates"
    );
}

#[test]
fn cache_types_have_ollamas_sizes() {
    let cases = [
        ("f16", 2.0),
        ("q8_0", 1.0),
        ("q4_0", 0.5),
        ("f32", 4.0),
        ("", 2.0),
        ("bf16", 2.0),
    ];
    for (name, want) in cases {
        assert_eq!(kv_bytes_per_element(name), want, "{name}");
    }
}

/// `llama3.2:latest` on disk (`/api/tags` `size`, also the simulator's).
const LLAMA_WEIGHTS: u64 = 2_019_393_189;
/// Its f16 KV cache at 4096 tokens, one slot (448 MiB).
const LLAMA_KV_4096: u64 = 469_762_048;
/// `qwen2.5:7b` on disk.
const QWEN_WEIGHTS: u64 = 4_683_087_332;

struct Case {
    what: &'static str,
    reported: u64,
    weights: Option<u64>,
    context: Option<u64>,
    slots: u64,
    tokens: u64,
    geometry: Option<Geometry>,
    previous_peak: u64,
    /// (allocated, used, peak, model, context, working), MB.
    want: (u64, u64, u64, u64, u64, u64),
}

#[test]
fn allocation_splits_the_report_into_buffers() {
    // MiB rounded up: weights 2,019,393,189 B = 1925.84 → 1926; weights + KV 448 MiB
    // = 2373.84 → 2374.
    let sim_llama = LLAMA_WEIGHTS + LLAMA_KV_4096;
    // The docs' /api/ps example row for llama3.2 at 4096: 3,556,000,000 B = 3391.3 → 3392.
    let doc_llama = 3_556_000_000;
    let qwen_x4 = QWEN_WEIGHTS + 4 * LLAMA_KV_4096 + 300 * MIB;
    let cases = [
        Case {
            what: "simulator: weights + KV, nothing else",
            reported: sim_llama,
            weights: Some(LLAMA_WEIGHTS),
            context: Some(4096),
            slots: 1,
            tokens: 0,
            geometry: Some(llama()),
            previous_peak: 0,
            // used = weights only: 1926; context = 2374 − 1926.
            want: (2374, 1926, 1926, 1926, 448, 0),
        },
        Case {
            what: "1024 tokens in context",
            tokens: 1024,
            previous_peak: 3000,
            // used = 2,019,393,189 + 1024 × 114,688 = 2,136,833,701 B = 2037.84 → 2038;
            // the peak carried over is higher.
            want: (2374, 2038, 3000, 1926, 448, 0),
            ..Case::base(sim_llama)
        },
        Case {
            what: "more tokens than the cache holds",
            tokens: 1_000_000,
            want: (2374, 2374, 2374, 1926, 448, 0),
            ..Case::base(sim_llama)
        },
        Case {
            what: "a real-sized report: the rest is working",
            reported: doc_llama,
            // used = 3,556,000,000 − 448 MiB = 3,086,237,952 B = 2943.2 → 2944;
            // working = 3392 − 2374.
            want: (3392, 2944, 2944, 1926, 448, 1018),
            ..Case::base(doc_llama)
        },
        Case {
            what: "unknown geometry: no context buffer, all of it used",
            geometry: None,
            want: (3392, 3392, 3392, 1926, 0, 1466),
            ..Case::base(doc_llama)
        },
        Case {
            what: "unknown loaded context: likewise",
            context: None,
            want: (3392, 3392, 3392, 1926, 0, 1466),
            ..Case::base(doc_llama)
        },
        Case {
            what: "unknown weights: model = the rest after the KV estimate",
            weights: None,
            want: (3392, 2944, 2944, 2944, 448, 0),
            ..Case::base(doc_llama)
        },
        Case {
            what: "unknown weights and geometry: all of it is model",
            weights: None,
            geometry: None,
            want: (3392, 3392, 3392, 3392, 0, 0),
            ..Case::base(doc_llama)
        },
        Case {
            what: "reported smaller than the weights: all of it is model",
            reported: 1_000_000_000,
            // 953.67 → 954.
            want: (954, 954, 954, 954, 0, 0),
            ..Case::base(1_000_000_000)
        },
        Case {
            what: "room for part of the KV estimate: context capped",
            reported: 2_200_000_000,
            // 2098.14 → 2099; the 180,606,811 B left after the weights are context.
            want: (2099, 1926, 1926, 1926, 173, 0),
            ..Case::base(2_200_000_000)
        },
        Case {
            what: "unknown weights and a report smaller than the KV estimate",
            reported: 100 * MIB,
            weights: None,
            want: (100, 0, 0, 0, 100, 0),
            ..Case::base(100 * MIB)
        },
        Case {
            what: "qwen, 4 slots of 8192 and 300 MiB of working buffers",
            reported: qwen_x4,
            weights: Some(QWEN_WEIGHTS),
            context: Some(8192),
            slots: 4,
            geometry: Some(qwen()),
            // weights 4466.14 → 4467; + 4 × 448 = 6258.14 → 6259; + 300 = 6558.14 → 6559.
            want: (6559, 4767, 4767, 4467, 1792, 300),
            ..Case::base(qwen_x4)
        },
        Case {
            what: "0 slots count as 1",
            slots: 0,
            want: (2374, 1926, 1926, 1926, 448, 0),
            ..Case::base(sim_llama)
        },
        Case {
            what: "nothing reported",
            reported: 0,
            want: (0, 0, 0, 0, 0, 0),
            ..Case::base(0)
        },
        Case {
            what: "one byte is one MB",
            reported: 1,
            weights: Some(1),
            want: (1, 1, 1, 1, 0, 0),
            ..Case::base(1)
        },
    ];
    for c in cases {
        let got = allocation(
            c.reported,
            c.weights,
            c.context,
            KvLayout {
                slots: c.slots,
                bytes_per_element: F16_BYTES_PER_ELEMENT,
            },
            c.tokens,
            c.geometry.as_ref(),
            c.previous_peak,
        );
        let (allocated, used, peak, model, context, working) = c.want;
        let want = Allocation {
            allocated_mb: allocated,
            used_mb: used,
            peak_mb: peak,
            buffers: Buffers {
                model_mb: model,
                context_mb: context,
                working_mb: working,
            },
        };
        assert_eq!(got, want, "{}", c.what);
        let b = &got.buffers;
        assert_eq!(
            b.model_mb + b.context_mb + b.working_mb,
            got.allocated_mb,
            "{}: buffers sum to allocated",
            c.what
        );
        assert!(got.used_mb <= got.allocated_mb, "{}", c.what);
    }
}

impl Case {
    /// Llama 3.2 3B, weights known, 4096 tokens, one slot, empty context.
    fn base(reported: u64) -> Self {
        Case {
            what: "",
            reported,
            weights: Some(LLAMA_WEIGHTS),
            context: Some(4096),
            slots: 1,
            tokens: 0,
            geometry: Some(llama()),
            previous_peak: 0,
            want: (0, 0, 0, 0, 0, 0),
        }
    }
}

#[test]
fn allocation_serializes_as_status_shows_it() {
    let a = allocation(
        LLAMA_WEIGHTS + LLAMA_KV_4096,
        Some(LLAMA_WEIGHTS),
        Some(4096),
        KvLayout::default(),
        0,
        Some(&llama()),
        0,
    );
    assert_eq!(
        serde_json::to_value(&a).expect("serializes"),
        json!({"allocated_mb": 2374, "used_mb": 1926, "peak_mb": 1926,
               "buffers": {"model_mb": 1926, "context_mb": 448, "working_mb": 0}})
    );
}

// === against the simulator ===

async fn get_json(url: &str) -> Value {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let resp = client.request(req).await.expect("the simulator answers");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let body = resp.into_body().collect().await.expect("a body").to_bytes();
    serde_json::from_slice(&body).expect("JSON")
}

/// Loads each simulator model, reads `/api/ps`, `/api/tags` and `/api/show` as the proxy
/// would, and checks that the split gives model = the tags size, context = the KV estimate
/// and working = 0 (the simulator's `size` is exactly weights + f16 KV, one slot).
#[tokio::test]
async fn simulator_size_is_weights_plus_the_kv_estimate() {
    let mut cfg = OllamaConfig {
        clock: Clock::fixed(),
        max_loaded_models: 4,
        ..OllamaConfig::default()
    };
    // A second llama-shaped model loaded at a larger context.
    cfg.models
        .push(SimModel::chat("llama3.2:16k", LLAMA_WEIGHTS, 131_072));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim = ollama::spawn(cfg, listener);
    let up = parse_upstream(&sim.url()).expect("the simulator's URL");
    let client = crate::providers::build_client(Config::default().proxy.connect_timeout);

    // (model, num_ctx asked for, loaded context, geometry, allocated, model, context MB)
    let cases = [
        ("llama3.2", None, 4096, llama(), 2374, 1926, 448),
        // Its Modelfile says num_ctx 8192: 448 MiB again (57,344 B a token).
        ("qwen2.5:7b", None, 8192, qwen(), 4915, 4467, 448),
        // Capped at its trained 2048: 72 MiB.
        ("nomic-embed-text", None, 2048, nomic_bert(), 334, 262, 72),
        // 16,384 × 114,688 B = 1792 MiB; weights + KV = 3717.84 → 3718.
        (
            "llama3.2:16k",
            Some(16_384),
            16_384,
            llama(),
            3718,
            1926,
            1792,
        ),
    ];
    for (model, num_ctx, ..) in &cases {
        let opts = LoadOptions {
            context_length: *num_ctx,
            ..LoadOptions::default()
        };
        ops::load(&client, &up, ProviderKind::Ollama, model, &opts)
            .await
            .expect("loads");
    }
    let ps = get_json(&format!("{}/api/ps", sim.url())).await;
    let ps = ProviderKind::Ollama
        .parse_loaded("/api/ps", ps.to_string().as_bytes())
        .expect("an /api/ps list");
    let tags = get_json(&format!("{}/api/tags", sim.url())).await;
    let tags = ProviderKind::Ollama
        .parse_catalog("/api/tags", tags.to_string().as_bytes())
        .expect("an /api/tags list");
    for (model, _, ctx, want_geometry, allocated, model_mb, context_mb) in cases {
        let name = ProviderKind::Ollama.canonical_model(model).into_owned();
        let row = ps
            .iter()
            .find(|m| m.model == name)
            .unwrap_or_else(|| panic!("{name} in /api/ps: {ps:?}"));
        let size = row.size_bytes.expect("a size");
        assert_eq!(row.vram_bytes, Some(size), "all on the GPU");
        assert_eq!(row.context_length, Some(ctx), "{name}");
        let weights = tags
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .expect("in /api/tags");
        let show = ops::show(&client, &up, model).await.expect("shows");
        let g = Geometry::from_show(&show).expect("a geometry");
        assert_eq!(g, want_geometry, "{name}");

        let kv = g.kv_bytes(ctx, 1, F16_BYTES_PER_ELEMENT);
        assert_eq!(size, weights + kv, "{name}: size = weights + KV, in bytes");
        let a = allocation(
            size,
            Some(weights),
            Some(ctx),
            KvLayout::default(),
            0,
            Some(&g),
            0,
        );
        eprintln!(
            "{name}: size {size} B = weights {weights} + KV {kv} (ctx {ctx}) → {}",
            serde_json::to_string(&a).expect("serializes")
        );
        assert_eq!(a.allocated_mb, allocated, "{name}");
        assert_eq!(a.buffers.model_mb, mb(weights), "{name}");
        assert_eq!(a.buffers.model_mb, model_mb, "{name}");
        assert_eq!(a.buffers.context_mb, context_mb, "{name}");
        assert_eq!(a.buffers.working_mb, 0, "{name}");
        assert_eq!(a.used_mb, model_mb, "{name}: nothing in context yet");
    }
}

/// A name the provider does not have leaves no geometry behind (clients invent names); a
/// model it lists is remembered, even when it has no geometry to give.
#[tokio::test]
async fn geometry_of_a_name_the_provider_lacks_is_not_kept() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim = ollama::spawn(OllamaConfig::default(), listener);
    let up = parse_upstream(&sim.url()).expect("the simulator's URL");
    let client = crate::providers::build_client(Config::default().proxy.connect_timeout);
    let table = MemoryTable::new(1);
    for i in 0..100 {
        let name = format!("invented-{i}:latest");
        assert_eq!(table.geometry_or_fetch(0, &client, &up, &name).await, None);
        assert_eq!(table.geometry(0, &name), None, "not remembered");
    }
    table.set_weights(0, &[("gone:latest".to_string(), 1)]);
    assert_eq!(
        table
            .geometry_or_fetch(0, &client, &up, "gone:latest")
            .await,
        None
    );
    assert_eq!(
        table.geometry(0, "gone:latest"),
        Some(None),
        "listed: asked once"
    );
    let g = table
        .geometry_or_fetch(0, &client, &up, "llama3.2:latest")
        .await;
    assert!(g.is_some() && table.geometry(0, "llama3.2:latest").is_some());
}
