//! Ollama: native `/api/*` plus the OpenAI-compatible `/v1/*` layer (docs/providers.md §1).

use serde_json::Value;

use super::{Endpoint, ErrorStyle, LoadedModel, Operation, ProviderFacts, UsageKeys};

pub(super) static FACTS: ProviderFacts = ProviderFacts {
    default_listen: "127.0.0.1:11435",
    default_upstream: "http://127.0.0.1:11434",
    loaded_paths: &["/api/ps"],
    catalog_path: Some("/api/tags"),
};

const fn native(operation: Operation, label: &'static str) -> Option<Endpoint> {
    Some(Endpoint {
        operation,
        usage: UsageKeys::OllamaNative,
        errors: ErrorStyle::Ollama,
        label,
    })
}

const fn openai(operation: Operation, label: &'static str) -> Option<Endpoint> {
    Some(Endpoint {
        operation,
        usage: UsageKeys::OpenAi,
        errors: ErrorStyle::OpenAi,
        label,
    })
}

pub(super) fn classify(path: &str) -> Option<Endpoint> {
    match path {
        "/api/chat" => native(Operation::Chat, "api_chat"),
        "/api/generate" => native(Operation::Completion, "api_generate"),
        "/api/embed" => native(Operation::Embedding, "api_embed"),
        "/api/embeddings" => native(Operation::Embedding, "api_embeddings"),
        "/v1/chat/completions" => openai(Operation::Chat, "v1_chat_completions"),
        "/v1/completions" => openai(Operation::Completion, "v1_completions"),
        "/v1/embeddings" => openai(Operation::Embedding, "v1_embeddings"),
        // `TranscriptionMiddleware` → `ChatHandler` (server/routes.go): a chat under the
        // hood, answered as `{"text":"..."}` without usage (proxy/multipart.rs).
        "/v1/audio/transcriptions" => Some(Endpoint {
            operation: Operation::Transcription,
            usage: UsageKeys::None,
            errors: ErrorStyle::OpenAi,
            label: "v1_audio_transcriptions",
        }),
        _ => super::responses_or_messages(path, ErrorStyle::OpenAi),
    }
}

pub(super) fn error_style(path: &str) -> ErrorStyle {
    if path == super::MESSAGES_PATH {
        ErrorStyle::Anthropic
    } else if path.starts_with("/v1/") {
        ErrorStyle::OpenAi
    } else {
        ErrorStyle::Ollama
    }
}

/// `[host/][namespace/]model[:tag]`; the tag defaults to `latest`. A `:` before the last `/`
/// is a registry port, not a tag.
///
/// Lower case: Ollama finds a model by a case-insensitive match of each part
/// (`getExistingName`, `strings.EqualFold`), so `Llama3.2` and `llama3.2` are one model to
/// it, and must be one to the proxy's counts and leases (issue 18).
pub(super) fn canonical_model(model: &str) -> std::borrow::Cow<'_, str> {
    if model.chars().any(char::is_uppercase) {
        let lower = model.to_lowercase();
        return std::borrow::Cow::Owned(canonical_model(&lower).into_owned());
    }
    let last = model.rsplit('/').next().unwrap_or(model);
    if last.contains(':') {
        std::borrow::Cow::Borrowed(model)
    } else {
        // Not `format!`: this runs on every request, and the formatting machinery costs
        // several times the copy.
        let mut tagged = String::with_capacity(model.len() + 7);
        tagged.push_str(model);
        tagged.push_str(":latest");
        std::borrow::Cow::Owned(tagged)
    }
}

/// Whether an `/api/ps` `expires_at` (RFC 3339) is a real deadline. A negative `keep_alive`
/// is `math.MaxInt64` (api/types.go, `Duration.UnmarshalJSON`), and an idle runner's
/// `expiresAt` is `time.Now().Add(sessionDuration)` (server/sched.go), so "forever" is about
/// 292 years out: only the year is read. `None` for a time that cannot be read, or Go's zero
/// time (`Scheduler.loadedModels` replaces it with now + the session duration; older
/// versions may not). The value is set when the runner goes idle, so while a request holds
/// it the list may still show the deadline of before.
fn expires(at: &str) -> Option<bool> {
    let year: u64 = at.get(..4)?.parse().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let this_year = 1970 + now / 31_556_952;
    (year >= 1970).then_some(year < this_year + 100)
}

/// `GET /api/ps` → `{"models":[{"name","size","size_vram","context_length",...}]}`.
pub(super) fn parse_loaded(v: &Value) -> Option<Vec<LoadedModel>> {
    v.get("models")?
        .as_array()?
        .iter()
        .map(|m| {
            let name = m.get("name").or_else(|| m.get("model"))?.as_str()?;
            Some(LoadedModel {
                model: canonical_model(name).into_owned(),
                size_bytes: m.get("size").and_then(Value::as_u64),
                vram_bytes: m.get("size_vram").and_then(Value::as_u64),
                context_length: m.get("context_length").and_then(Value::as_u64),
                parallel: None,
                expires: m
                    .get("expires_at")
                    .and_then(Value::as_str)
                    .and_then(expires),
            })
        })
        .collect()
}
