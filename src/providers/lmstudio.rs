//! LM Studio: OpenAI-compatible `/v1/*`, native REST `/api/v0/*` and `/api/v1/*`, and the SDK's
//! WebSockets, which pass through untouched (docs/providers.md §2).

use serde_json::Value;

use super::{Endpoint, ErrorStyle, LoadedModel, Operation, ProviderFacts, UsageKeys};

pub(super) static FACTS: ProviderFacts = ProviderFacts {
    default_listen: "127.0.0.1:1235",
    default_upstream: "http://127.0.0.1:1234",
    loaded_paths: &["/api/v1/models", "/api/v0/models"],
    catalog_path: None,
};

const fn endpoint(operation: Operation, usage: UsageKeys, label: &'static str) -> Option<Endpoint> {
    Some(Endpoint {
        operation,
        usage,
        errors: ErrorStyle::OpenAi,
        label,
    })
}

pub(super) fn classify(path: &str) -> Option<Endpoint> {
    use Operation::*;
    use UsageKeys::*;
    match path {
        "/v1/chat/completions" => endpoint(Chat, OpenAi, "v1_chat_completions"),
        "/v1/completions" => endpoint(Completion, OpenAi, "v1_completions"),
        "/v1/embeddings" => endpoint(Embedding, OpenAi, "v1_embeddings"),
        "/api/v0/chat/completions" => endpoint(Chat, OpenAi, "v0_chat_completions"),
        "/api/v0/completions" => endpoint(Completion, OpenAi, "v0_completions"),
        "/api/v0/embeddings" => endpoint(Embedding, OpenAi, "v0_embeddings"),
        "/api/v1/chat" => endpoint(Chat, LmStudioV1, "v1_chat"),
        _ => super::responses_or_messages(path, ErrorStyle::OpenAi),
    }
}

/// `/api/v1/models` (0.4+): one entry per `loaded_instances[]`, named by instance id.
/// `/api/v0/models` (0.3.6+): entries with `state: "loaded"`.
pub(super) fn parse_loaded(path: &str, v: &Value) -> Option<Vec<LoadedModel>> {
    if path.starts_with("/api/v1/") {
        let mut out = Vec::new();
        for m in v.get("models")?.as_array()? {
            let size = m.get("size_bytes").and_then(Value::as_u64);
            for inst in m.get("loaded_instances")?.as_array()? {
                out.push(LoadedModel {
                    model: inst.get("id")?.as_str()?.to_string(),
                    size_bytes: size,
                    vram_bytes: None,
                    context_length: inst
                        .pointer("/config/context_length")
                        .and_then(Value::as_u64),
                    parallel: inst.pointer("/config/parallel").and_then(Value::as_u64),
                    expires: None,
                });
            }
        }
        Some(out)
    } else {
        v.get("data")?
            .as_array()?
            .iter()
            .filter(|m| m.get("state").and_then(Value::as_str) == Some("loaded"))
            .map(|m| {
                Some(LoadedModel {
                    model: m.get("id")?.as_str()?.to_string(),
                    size_bytes: None,
                    vram_bytes: None,
                    context_length: m.get("loaded_context_length").and_then(Value::as_u64),
                    parallel: None,
                    expires: None,
                })
            })
            .collect()
    }
}
