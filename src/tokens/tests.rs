use std::sync::Arc;

use serde_json::{json, Value};

use super::*;

/// English prose, code, JSON and a little German and Japanese, with ordinary spacing.
fn transcript(min_bytes: usize) -> String {
    const PARTS: [&str; 5] = [
        "The proxy keeps one lease per request and releases it when the stream ends. ",
        "fn main() {\n    let total: u64 = counts.iter().sum();\n    println!(\"{total}\");\n}\n",
        "{\"model\": \"qwen3:8b\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        "Grüße aus Köln, wo es heute regnet. ",
        "こんにちは、世界。今日はいい天気ですね。 ",
    ];
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < min_bytes {
        text.push_str(PARTS[i % PARTS.len()]);
        text.push_str(&format!("Turn {i}: ok. "));
        i += 1;
    }
    text
}

#[test]
fn counts_known_strings() {
    let c = TokenCounter::new();
    // (text, cl100k, o200k), from tiktoken; "tiktoken is great!" is OpenAI's cookbook example.
    let cases: [(&str, u64, u64); 10] = [
        ("", 0, 0),
        ("hello world", 2, 2),
        ("tiktoken is great!", 6, 6),
        ("antidisestablishmentarianism", 6, 6),
        // Ordinary text: the special token's spelling is just characters.
        ("<|endoftext|>", 7, 7),
        ("こんにちは世界", 4, 2),
        ("Grüße aus Köln", 6, 5),
        ("😀👍🏽", 8, 4),
        ("12345678", 3, 3),
        ("fn main() {\n    println!(\"hi\");\n}\n", 10, 10),
    ];
    for (text, cl, o2) in cases {
        assert_eq!(c.count_text(Encoding::Cl100k, text), cl, "cl100k {text:?}");
        assert_eq!(c.count_text(Encoding::O200k, text), o2, "o200k {text:?}");
    }
}

#[test]
fn upper_bound_covers_the_count() {
    let c = TokenCounter::new();
    let long = transcript(20_000);
    let texts = [
        "",
        "a",
        "hello world",
        "é",
        "こんにちは世界",
        "😀👍🏽🇩🇪",
        "\u{0}\u{7f}\u{80}\u{10ffff}",
        "   \t\n\r\n  ",
        long.as_str(),
    ];
    for text in texts {
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            let n = c.count_text(enc, text);
            assert!(n <= upper_bound(text.len()), "{enc} {text:?}: {n}");
        }
    }
}

#[test]
fn chunked_count_is_exact_at_space_boundaries() {
    let text = transcript(40_000);
    for enc in [Encoding::Cl100k, Encoding::O200k] {
        let whole = enc.bpe().encode_ordinary(&text).len() as u64;
        for max in [64, 300, CHUNK_BYTES] {
            assert_eq!(
                count_chunked(enc.bpe(), &text, max),
                whole,
                "{enc} max {max}"
            );
        }
    }
}

#[test]
fn split_point_cuts_on_char_boundaries_within_the_limit() {
    // (text, max, expected cut)
    let cases: [(&str, usize, usize); 7] = [
        ("hello world again", 12, 11), // before " again"
        ("hello world again", 8, 5),   // before " world"
        ("a  b", 3, 1),                // never inside a whitespace run
        ("aaaaaaaa", 5, 5),            // no space: blind cut
        ("ééééé", 5, 4),               // blind cut backs off to a char boundary
        ("  x y", 2, 2),               // a leading space is no boundary
        ("éa", 1, 2),                  // the limit is inside the first char
    ];
    for (text, max, cut) in cases {
        assert!(text.len() > max, "{text:?}");
        let got = split_point(text, max);
        assert_eq!(got, cut, "{text:?} max {max}");
        assert!(text.is_char_boundary(got));
    }
}

#[test]
fn pathological_texts_count_without_panicking() {
    // Unsplit, a megabyte of spaces then a letter panics inside tiktoken-rs (fancy-regex gives
    // up and the error is unwrapped); see CHUNK_BYTES. The other runs are only cut blind.
    let c = TokenCounter::new();
    let kb = 1 << 10;
    let texts = [
        format!("{}x", " ".repeat(1024 * kb)),
        "A".repeat(64 * kb),
        "\u{3000}".repeat(64 * kb / 3),
        "^".repeat(64 * kb),
        "\n \t".repeat(16 * kb),
    ];
    for text in &texts {
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            let n = c.count_text(enc, text);
            assert!(n > 0 && n <= upper_bound(text.len()), "{enc}: {n}");
        }
    }
}

#[test]
fn encodings_parse_and_print() {
    let cases = [
        ("cl100k", Some(Encoding::Cl100k)),
        ("cl100k_base", Some(Encoding::Cl100k)),
        (" CL100K_BASE ", Some(Encoding::Cl100k)),
        ("o200k", Some(Encoding::O200k)),
        ("o200k_base", Some(Encoding::O200k)),
        ("p50k_base", None),
        ("_base", None),
        ("", None),
    ];
    for (s, want) in cases {
        assert_eq!(Encoding::parse(s), want, "{s:?}");
    }
    for enc in [Encoding::Cl100k, Encoding::O200k] {
        assert_eq!(Encoding::parse(enc.as_str()), Some(enc));
        assert_eq!(enc.to_string(), enc.as_str());
    }
}

#[test]
fn encoding_for_model_follows_the_family() {
    use Encoding::{Cl100k, O200k};
    let cases = [
        ("gpt-4o", O200k),
        ("gpt-4o-mini-2024-07-18", O200k),
        ("chatgpt-4o-latest", O200k),
        ("gpt-4.1-nano", O200k),
        ("gpt-5", O200k),
        ("GPT-5.1-codex", O200k),
        ("o1", O200k),
        ("o3-mini", O200k),
        ("o4-mini:latest", O200k),
        ("gpt-oss:20b", O200k),
        ("openai/gpt-oss-120b", O200k),
        ("gemma3:12b", O200k),
        ("google/gemma-3-27b", O200k),
        ("gpt-4", Cl100k),
        ("gpt-3.5-turbo", Cl100k),
        ("llama3.1:8b", Cl100k),
        ("meta-llama-3.1-8b-instruct", Cl100k),
        ("qwen2.5-coder:7b", Cl100k),
        ("qwen/qwen3-8b", Cl100k),
        ("mistral-nemo", Cl100k),
        ("gemma2:9b", Cl100k),
        ("o3de", Cl100k),
        ("olmo2", Cl100k),
        ("", Cl100k),
    ];
    for (model, want) in cases {
        assert_eq!(Encoding::for_model(model), want, "{model}");
    }
}

#[test]
fn messages_count_text_fixed_costs_and_overhead() {
    let c = TokenCounter::new();
    let enc = Encoding::Cl100k;
    let t = |s: &str| c.count_text(enc, s);
    let cases: Vec<(&str, Value, u64)> = vec![
        (
            "plain",
            json!({"role": "user", "content": "hello world"}),
            MESSAGE_OVERHEAD + 1 + 2,
        ),
        (
            "ollama images",
            json!({"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo=", "R0lGOD=="]}),
            MESSAGE_OVERHEAD + t("user") + t("what is this?") + 2 * IMAGE_TOKENS,
        ),
        (
            "openai content parts",
            json!({"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "with this"},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            ]}),
            MESSAGE_OVERHEAD + t("user") + t("compare") + IMAGE_TOKENS + t("with this"),
        ),
        (
            "ollama tool call, arguments as an object",
            json!({"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            ]}),
            MESSAGE_OVERHEAD
                + t("assistant")
                + TOOL_CALL_OVERHEAD
                + t("get_weather")
                + t(r#"{"city":"Paris"}"#),
        ),
        (
            "openai tool call, arguments as a string",
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_time", "arguments": "{}"}},
            ]}),
            MESSAGE_OVERHEAD
                + t("assistant")
                + 2 * TOOL_CALL_OVERHEAD
                + t("get_weather")
                + t(r#"{"city": "Paris"}"#)
                + t("get_time")
                + t("{}"),
        ),
        (
            "openai tool result",
            json!({"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"}),
            MESSAGE_OVERHEAD + t("tool") + t("call_1") + t("18°C, cloudy"),
        ),
        (
            "ollama tool result",
            json!({"role": "tool", "tool_name": "get_weather", "content": "18°C"}),
            MESSAGE_OVERHEAD + t("tool") + t("get_weather") + t("18°C"),
        ),
        (
            "name",
            json!({"role": "user", "name": "alice", "content": "hi"}),
            MESSAGE_OVERHEAD + t("user") + NAME_OVERHEAD + t("alice") + t("hi"),
        ),
        (
            "legacy function_call",
            json!({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
            MESSAGE_OVERHEAD + t("assistant") + TOOL_CALL_OVERHEAD + t("f") + t("{}"),
        ),
        (
            "thinking is not counted",
            json!({"role": "assistant", "content": "4", "thinking": "2 + 2 is 4"}),
            MESSAGE_OVERHEAD + t("assistant") + t("4"),
        ),
        ("empty object", json!({}), MESSAGE_OVERHEAD),
        ("not an object", json!(42), MESSAGE_OVERHEAD),
        ("bare string", json!("hello world"), MESSAGE_OVERHEAD + 2),
        (
            "odd field types are skipped",
            json!({"role": 1, "content": 2, "images": "x", "tool_calls": {"a": 1}}),
            MESSAGE_OVERHEAD,
        ),
    ];
    for (name, message, want) in &cases {
        assert_eq!(c.count_message(enc, message), *want, "{name}");
        assert!(message::byte_bound(message) >= *want, "{name}");
    }
    let messages: Vec<Value> = cases.into_iter().map(|(_, m, _)| m).collect();
    let sum: u64 = messages.iter().map(|m| c.count_message(enc, m)).sum();
    assert_eq!(c.count_messages(enc, &messages), sum + REPLY_PRIMING);
    assert_eq!(c.count_messages(enc, &[]), REPLY_PRIMING);
}

#[test]
fn ollama_and_openai_tool_calls_count_alike() {
    let c = TokenCounter::new();
    let ollama = json!({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
    ]});
    let openai = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_9", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"days\":3}"}},
    ]});
    for enc in [Encoding::Cl100k, Encoding::O200k] {
        assert_eq!(c.count_message(enc, &ollama), c.count_message(enc, &openai));
    }
}

#[tokio::test]
async fn count_each_async_matches_the_sync_counts() {
    let c = TokenCounter::new();
    let big = transcript(3 * LARGE_BYTES);
    let large = vec![
        json!({"role": "system", "content": "You are terse."}),
        json!({"role": "user", "content": big}),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{\"q\":\"x\"}"}},
        ]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": transcript(LARGE_BYTES)}),
        json!({"role": "user", "content": [{"type": "text", "text": "and?"}, {"type": "image_url", "image_url": {"url": "u"}}]}),
    ];
    let small = vec![json!({"role": "user", "content": "hello world"})];
    assert!(message::text_bytes(&large) > LARGE_BYTES);
    assert!(message::text_bytes(&small) <= LARGE_BYTES);
    for messages in [large, small] {
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            let want: Vec<u64> = messages.iter().map(|m| c.count_message(enc, m)).collect();
            let got = c.count_each_async(enc, Arc::new(messages.clone())).await;
            assert_eq!(got, want, "{enc}");
        }
    }
}

#[test]
fn calibration_converges_to_the_reported_ratio() {
    let c = TokenCounter::new();
    assert_eq!(c.ratio("ollama", "qwen3:8b"), 1.0);
    assert_eq!(c.calibrated("ollama", "qwen3:8b", 100), 100);
    // Reported = 1.3 x estimated, with +-5% noise.
    for i in 0..60u64 {
        let estimated = 500 + 37 * i;
        let noise = if i % 2 == 0 { 1.05 } else { 0.95 };
        let reported = (estimated as f64 * 1.3 * noise).round() as u64;
        c.calibrate("ollama", "qwen3:8b", estimated, reported);
    }
    let ratio = c.ratio("ollama", "qwen3:8b");
    assert!((ratio - 1.3).abs() < 0.02, "{ratio}");
    assert_eq!(c.samples("ollama", "qwen3:8b"), 60);
    // Other keys are untouched.
    assert_eq!(c.ratio("lmstudio", "qwen3:8b"), 1.0);
    assert_eq!(c.ratio("ollama", "llama3.1:8b"), 1.0);
    assert_eq!(c.samples("ollama", "llama3.1:8b"), 0);
    // Clones share the table.
    assert_eq!(c.clone().samples("ollama", "qwen3:8b"), 60);
}

#[test]
fn calibration_ignores_tiny_prompts_and_outliers() {
    // (estimated, reported, accepted)
    let warm: Vec<(u64, u64)> = (0..10).map(|_| (1000, 1300)).collect();
    let cases: [(&str, u64, u64, bool); 8] = [
        ("tiny prompt", 20, 26, false),
        (
            "below the minimum",
            CALIBRATION_MIN_ESTIMATE - 1,
            100,
            false,
        ),
        ("nothing reported", 1000, 0, false),
        ("absurdly low", 1000, 200, false),
        ("absurdly high", 1000, 4100, false),
        ("more than 2x below the learned ratio", 1000, 600, false),
        ("more than 2x above the learned ratio", 1000, 2700, false),
        ("within the gate", 1000, 1400, true),
    ];
    for (name, estimated, reported, accepted) in cases {
        let c = TokenCounter::new();
        for &(e, r) in &warm {
            c.calibrate("p", "m", e, r);
        }
        let before = c.ratio("p", "m");
        c.calibrate("p", "m", estimated, reported);
        let want_samples = warm.len() as u64 + u64::from(accepted);
        assert_eq!(c.samples("p", "m"), want_samples, "{name}");
        assert_eq!(c.ratio("p", "m") != before, accepted, "{name}");
    }
    // Before warm-up the gate is off, but the absolute range holds.
    let c = TokenCounter::new();
    c.calibrate("p", "m", 1000, 3900);
    c.calibrate("p", "m", 1000, 5000);
    assert_eq!(c.samples("p", "m"), 1);
    assert!((c.ratio("p", "m") - 3.9).abs() < 1e-9);
}

#[test]
fn calibration_starts_over_after_a_run_of_gated_samples() {
    let c = TokenCounter::new();
    for _ in 0..20 {
        c.calibrate("p", "m", 1000, 1000);
    }
    // Seven far-off samples are ignored; the eighth in a row restarts learning from itself.
    for _ in 0..7 {
        c.calibrate("p", "m", 1000, 3000);
    }
    assert_eq!((c.ratio("p", "m"), c.samples("p", "m")), (1.0, 20));
    c.calibrate("p", "m", 1000, 3000);
    assert_eq!(c.samples("p", "m"), 1);
    assert!((c.ratio("p", "m") - 3.0).abs() < 1e-9);
    // An accepted sample in between resets the run.
    let c = TokenCounter::new();
    for _ in 0..20 {
        c.calibrate("p", "m", 1000, 1000);
    }
    for i in 0..20 {
        let reported = if i % 5 == 4 { 1000 } else { 3000 };
        c.calibrate("p", "m", 1000, reported);
    }
    assert_eq!(c.samples("p", "m"), 24);
}

#[test]
fn calibrated_rounds_up_without_float_noise() {
    // (ratio samples as (estimated, reported), estimate, expected)
    let cases: [((u64, u64), u64, u64); 5] = [
        ((1000, 1300), 100, 130),
        ((1000, 1300), 101, 132), // 131.3 rounds up
        ((1000, 1300), 0, 0),
        ((1000, 1000), 12345, 12345),
        ((1000, 1300), u64::MAX, u64::MAX), // saturates
    ];
    for ((estimated, reported), estimate, want) in cases {
        let c = TokenCounter::new();
        c.calibrate("p", "m", estimated, reported);
        assert_eq!(c.calibrated("p", "m", estimate), want, "{estimate}");
    }
}

#[test]
fn learned_ratios_survive_an_export_and_restore() {
    let a = TokenCounter::new();
    for _ in 0..10 {
        a.calibrate("p", "m", 1000, 1300);
    }
    let rows = a.calibrations();
    assert_eq!(rows.len(), 1);
    let b = TokenCounter::new();
    b.restore(&rows);
    assert_eq!(b.ratio("p", "m"), a.ratio("p", "m"));
    assert_eq!(b.samples("p", "m"), 10);
    // Absurd saved values are not taken back.
    let c = TokenCounter::new();
    c.restore(&[crate::tokens::Calibration {
        provider: "p".into(),
        model: "m".into(),
        ratio: 40.0,
        samples: 3,
    }]);
    assert_eq!(c.samples("p", "m"), 0);
}

#[test]
fn calibration_learns_a_bounded_number_of_models() {
    let c = TokenCounter::new();
    for i in 0..CALIBRATION_MODELS_MAX + 50 {
        c.calibrate("llama", &format!("invented-{i}"), 1000, 1200);
    }
    assert_eq!(c.calibrations().len(), CALIBRATION_MODELS_MAX);
    assert_eq!(
        c.samples("llama", "invented-0"),
        1,
        "the first ones are learned"
    );
    assert_eq!(
        c.samples("llama", &format!("invented-{}", CALIBRATION_MODELS_MAX)),
        0
    );
    c.calibrate("llama", "invented-0", 1000, 1200);
    assert_eq!(
        c.samples("llama", "invented-0"),
        2,
        "known ones go on learning"
    );
    c.calibrate("other", "m", 1000, 1200);
    assert_eq!(c.samples("other", "m"), 1, "the bound is per provider");
}
