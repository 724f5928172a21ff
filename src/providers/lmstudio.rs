//! LM Studio: OpenAI-compatible `/v1/*`, native REST `/api/v0/*` and `/api/v1/*`, and the SDK's
//! WebSockets, which pass through untouched (provider-apis.md §2).

use super::{Endpoint, ErrorStyle, Operation, ProviderFacts, UsageKeys};

pub(super) static FACTS: ProviderFacts = ProviderFacts {
    default_listen: "127.0.0.1:1235",
    default_upstream: "http://127.0.0.1:1234",
    health_path: "/v1/models",
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
        _ => None,
    }
}
