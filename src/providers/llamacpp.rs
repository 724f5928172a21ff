//! llama.cpp's `llama-server` (docs/providers.md §3): OpenAI-compatible `/v1/*`, its native
//! `/completion` (SSE without `[DONE]`), `/embedding`, `/tokenize`, `/props`, `/slots`,
//! `/metrics`, and in router mode (started without `-m`) `/models`, `/models/load` and
//! `/models/unload`. Everything not classified here passes through untouched.
//!
//! Router or single mode is read off `/models`: router entries carry a `status`, the single
//! model's entry (`/models` is then an alias of `/v1/models`) does not.

use serde_json::Value;

use super::{Endpoint, ErrorStyle, LoadedModel, Operation, ProviderFacts, UsageKeys};

pub(super) static FACTS: ProviderFacts = ProviderFacts {
    default_listen: "127.0.0.1:8081",
    default_upstream: "http://127.0.0.1:8080",
    loaded_paths: &["/models"],
    catalog_path: None,
};

const fn endpoint(operation: Operation, usage: UsageKeys, label: &'static str) -> Option<Endpoint> {
    Some(Endpoint {
        operation,
        usage,
        errors: ErrorStyle::LlamaCpp,
        label,
    })
}

pub(super) fn classify(path: &str) -> Option<Endpoint> {
    use Operation::*;
    use UsageKeys::*;
    match path {
        "/v1/chat/completions" | "/chat/completions" => {
            endpoint(Chat, LlamaCpp, "v1_chat_completions")
        }
        "/v1/completions" => endpoint(Completion, LlamaCpp, "v1_completions"),
        "/v1/embeddings" => endpoint(Embedding, LlamaCpp, "v1_embeddings"),
        "/completion" | "/completions" => endpoint(Completion, LlamaCppNative, "completion"),
        "/infill" => endpoint(Completion, LlamaCppNative, "infill"),
        "/embedding" | "/embeddings" => endpoint(Embedding, LlamaCppNative, "embedding"),
        _ => super::responses_or_messages(path, ErrorStyle::LlamaCpp),
    }
}

/// Text tokenized once per loaded model (`/tokenize`) to learn how its tokenizer compares with
/// the proxy's estimator: prose, code and numbers, as conversations mix them.
pub const CALIBRATION_SAMPLE: &str = "The quick brown fox jumps over the lazy dog. \
In 2024, the team shipped version 3.14.2 of the service, cutting p99 latency from 480 ms to 95 ms. \
Please summarize the following conversation, keeping names, numbers and decisions exactly.\n\
```rust\nfn main() {\n    let xs: Vec<u32> = (1..=10).map(|x| x * x).collect();\n    println!(\"{:?}\", xs);\n}\n```\n\
User: Can you explain why the build fails with `error[E0382]: borrow of moved value`?\n\
Assistant: The value was moved into the closure on line 12; clone it first, or borrow it instead.\n\
Les modèles de langage découpent le texte en jetons; 東京は日本の首都です。\n";

/// Whether a `/models` answer comes from a router (its entries have a `status`).
pub fn is_router(v: &Value) -> Option<bool> {
    let data = v.get("data")?.as_array()?;
    Some(match data.first() {
        Some(m) => m.get("status").is_some(),
        // An empty list: only a router lists nothing.
        None => true,
    })
}

/// `/models`: router entries whose `status.value` is `loaded` or `sleeping` (a sleeping
/// child still holds one of `--models-max` places); in single mode the one model.
pub(super) fn parse_loaded(v: &Value) -> Option<Vec<LoadedModel>> {
    let data = v.get("data")?.as_array()?;
    let mut out = Vec::new();
    for m in data {
        let resident = match m.get("status") {
            None => true,
            Some(s) => matches!(
                s.get("value").and_then(Value::as_str),
                Some("loaded" | "sleeping")
            ),
        };
        if resident {
            out.push(LoadedModel {
                model: m.get("id")?.as_str()?.to_string(),
                size_bytes: m.pointer("/meta/size").and_then(Value::as_u64),
                vram_bytes: None,
                // Newer builds put the child's `n_ctx` in `meta`; else `/props` says.
                context_length: m.pointer("/meta/n_ctx").and_then(Value::as_u64),
                parallel: None,
                expires: None,
            });
        }
    }
    Some(out)
}

/// `/props` `default_generation_settings.n_ctx`: the per-slot context (0 in a router's own
/// answer, which is not a window).
pub fn props_n_ctx(v: &Value) -> Option<u64> {
    v.pointer("/default_generation_settings/n_ctx")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn router_and_single_lists() {
        let router = json!({"data":[
            {"id":"a","status":{"value":"loaded","args":[]},"meta":{"size":98000000}},
            {"id":"b","status":{"value":"unloaded","args":[]}},
            {"id":"c","status":{"value":"loading","args":[]}},
            {"id":"d","status":{"value":"sleeping","args":[]}}
        ],"object":"list"});
        assert_eq!(is_router(&router), Some(true));
        let loaded = parse_loaded(&router).unwrap();
        let names: Vec<&str> = loaded.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["a", "d"]);
        assert_eq!(loaded[0].size_bytes, Some(98_000_000));
        let single = json!({"object":"list","data":[{"id":"smollm","object":"model","owned_by":"llamacpp","meta":{"size":5}}]});
        assert_eq!(is_router(&single), Some(false));
        assert_eq!(parse_loaded(&single).unwrap()[0].model, "smollm");
        assert_eq!(
            props_n_ctx(&json!({"default_generation_settings":{"n_ctx":0}})),
            None
        );
        assert_eq!(
            props_n_ctx(&json!({"default_generation_settings":{"n_ctx":4096}})),
            Some(4096)
        );
    }
}
