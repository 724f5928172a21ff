//! Provider adapters: what differs between upstreams, kept as data. Each kind has a table of
//! facts (default ports, health path) and a classifier that says which paths carry a model
//! in their body, how their clients expect errors, and where the usage counts are.
//!
//! The proxy consults these tables; it never matches on provider paths itself.

pub mod client;
pub mod llamacpp;
mod lmstudio;
mod ollama;
pub mod ops;
mod upstream;

pub use client::{build_client, UpstreamClient};
pub use ops::error_chain;
pub use upstream::{parse_upstream, Upstream};

/// The kinds of upstream llm-warden understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    Ollama,
    LmStudio,
    /// llama.cpp's `llama-server`, single-model or router mode.
    LlamaCpp,
}

/// Fixed facts about a provider kind.
#[derive(Debug)]
pub struct ProviderFacts {
    pub default_listen: &'static str,
    pub default_upstream: &'static str,
    /// GETs that list the loaded models, tried in order (a 404 moves to the next: older
    /// LM Studio builds lack `/api/v1`). They double as the health check: any HTTP answer
    /// means the provider is up, and none of them loads a model.
    pub loaded_paths: &'static [&'static str],
    /// A GET listing every model the provider has, with its size (Ollama `/api/tags`);
    /// `None` when the loaded-models list carries the sizes (LM Studio `/api/v1/models`).
    pub catalog_path: Option<&'static str>,
}

/// A model the provider says is loaded, as its own list reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoadedModel {
    /// The model's name as clients use it (Ollama: `name:tag`; LM Studio: the model key).
    pub model: String,
    /// Memory the loaded model takes, bytes (Ollama `size`; LM Studio `size_bytes`, the
    /// weights on disk, as LM Studio reports nothing better).
    pub size_bytes: Option<u64>,
    /// Of that, on the GPU (Ollama `size_vram`).
    pub vram_bytes: Option<u64>,
    /// The context the model was loaded with (per parallel slot).
    pub context_length: Option<u64>,
    /// Parallel slots, where the provider says (LM Studio's `config.parallel`).
    pub parallel: Option<u64>,
    /// Whether the provider will unload the model on its own timer: Ollama's `expires_at`
    /// within a century (`Some(true)`) or Go's "forever", `now + MaxInt64` ns, three
    /// centuries out (`Some(false)`); `None` where the provider does not say.
    #[serde(skip)]
    pub expires: Option<bool>,
}

impl ProviderKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ollama" => Some(ProviderKind::Ollama),
            "lmstudio" => Some(ProviderKind::LmStudio),
            "llamacpp" => Some(ProviderKind::LlamaCpp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Ollama => "ollama",
            ProviderKind::LmStudio => "lmstudio",
            ProviderKind::LlamaCpp => "llamacpp",
        }
    }

    pub fn facts(self) -> &'static ProviderFacts {
        match self {
            ProviderKind::Ollama => &ollama::FACTS,
            ProviderKind::LmStudio => &lmstudio::FACTS,
            ProviderKind::LlamaCpp => &llamacpp::FACTS,
        }
    }

    /// The model endpoint a POST to `path` is, if the proxy inspects it.
    pub fn classify(self, path: &str) -> Option<Endpoint> {
        match self {
            ProviderKind::Ollama => ollama::classify(path),
            ProviderKind::LmStudio => lmstudio::classify(path),
            ProviderKind::LlamaCpp => llamacpp::classify(path),
        }
    }

    /// The name under which a model is counted: Ollama names get their tag (`llama3.2` and
    /// `llama3.2:latest` are one model, as `/api/ps` lists it); others are kept as sent.
    pub fn canonical_model(self, model: &str) -> std::borrow::Cow<'_, str> {
        match self {
            ProviderKind::Ollama => ollama::canonical_model(model),
            ProviderKind::LmStudio | ProviderKind::LlamaCpp => std::borrow::Cow::Borrowed(model),
        }
    }

    /// Parses the answer of one of `facts().loaded_paths` into the loaded models.
    pub fn parse_loaded(self, path: &str, body: &[u8]) -> Result<Vec<LoadedModel>, String> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("{path}: not JSON ({e})"))?;
        match self {
            ProviderKind::Ollama => ollama::parse_loaded(&v),
            ProviderKind::LmStudio => lmstudio::parse_loaded(path, &v),
            ProviderKind::LlamaCpp => llamacpp::parse_loaded(&v),
        }
        .ok_or_else(|| format!("{path}: unexpected shape"))
    }

    /// Parses a model catalogue (`catalog_path`, or LM Studio's `/api/v1/models`) into
    /// `(model, size on disk in bytes)`. Lists without sizes give an empty list.
    pub fn parse_catalog(self, path: &str, body: &[u8]) -> Result<Vec<(String, u64)>, String> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("{path}: not JSON ({e})"))?;
        let (name_keys, size_key): (&[&str], &str) = match (self, path) {
            (ProviderKind::Ollama, "/api/tags") => (&["name", "model"], "size"),
            (ProviderKind::LmStudio, "/api/v1/models") => (&["key"], "size_bytes"),
            _ => return Ok(Vec::new()),
        };
        let models = v
            .get("models")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| format!("{path}: unexpected shape"))?;
        Ok(models
            .iter()
            .filter_map(|m| {
                let name = name_keys.iter().find_map(|k| m.get(*k)?.as_str())?;
                let size = m.get(size_key)?.as_u64()?;
                Some((self.canonical_model(name).into_owned(), size))
            })
            .collect())
    }

    /// How clients of `path` expect an error body written by the proxy itself.
    pub fn error_style(self, path: &str) -> ErrorStyle {
        match self {
            ProviderKind::Ollama => ollama::error_style(path),
            _ if path == MESSAGES_PATH => ErrorStyle::Anthropic,
            ProviderKind::LmStudio => ErrorStyle::OpenAi,
            ProviderKind::LlamaCpp => ErrorStyle::LlamaCpp,
        }
    }
}

/// The Anthropic Messages API's path, served by all three kinds: its clients read errors in
/// Anthropic's shape whoever serves it.
pub(crate) const MESSAGES_PATH: &str = "/v1/messages";

/// The two endpoints every kind serves alike (Ollama's `middleware` package, LM Studio
/// 0.3.29+/0.4, llama-server's `/v1/responses` and `/v1/messages` handlers): the OpenAI
/// Responses API and the Anthropic Messages API, both counting `input_tokens` /
/// `output_tokens` (see [`UsageKeys`]). Responses errors take the kind's OpenAI-compatible
/// shape.
pub(crate) fn responses_or_messages(path: &str, openai_errors: ErrorStyle) -> Option<Endpoint> {
    match path {
        "/v1/responses" => Some(Endpoint {
            operation: Operation::Responses,
            usage: UsageKeys::Responses,
            errors: openai_errors,
            label: "v1_responses",
        }),
        MESSAGES_PATH => Some(Endpoint {
            operation: Operation::Messages,
            usage: UsageKeys::Anthropic,
            errors: ErrorStyle::Anthropic,
            label: "v1_messages",
        }),
        _ => None,
    }
}

/// The shape of an error body a client understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `{"error":"message"}` (Ollama native API).
    Ollama,
    /// `{"error":{"message","type","param","code"}}` (OpenAI and LM Studio).
    OpenAi,
    /// `{"error":{"code":<status>,"message","type"}}` (llama-server, every endpoint; the
    /// OpenAI SDK reads it too).
    LlamaCpp,
    /// `{"type":"error","error":{"type","message"}}` (the Anthropic Messages API,
    /// `/v1/messages`, on every kind; Ollama's `anthropic.NewError` names the types).
    Anthropic,
}

/// Which JSON keys carry the token counts in a response of this endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageKeys {
    /// `prompt_eval_count` / `eval_count` (Ollama native).
    OllamaNative,
    /// `usage.prompt_tokens` / `usage.completion_tokens` (OpenAI, LM Studio v0).
    OpenAi,
    /// `stats.input_tokens` / `stats.total_output_tokens` (LM Studio `/api/v1/chat`).
    LmStudioV1,
    /// llama-server's OpenAI endpoints: `usage`, else `timings` (`prompt_n` + `cache_n`,
    /// `predicted_n`), which every build puts on the last chunk while `usage` depends on the
    /// build and on `stream_options.include_usage`.
    LlamaCpp,
    /// llama-server's native `/completion`: `tokens_evaluated` / `tokens_predicted`, else
    /// `timings`.
    LlamaCppNative,
    /// `usage.input_tokens` / `output_tokens` of the OpenAI Responses API (in the
    /// `response.completed` event when streamed); `input_tokens` includes the cached ones
    /// (`input_tokens_details.cached_tokens` is a part of it).
    Responses,
    /// The Anthropic Messages API: `usage` (streamed: `message_start`, then `message_delta`,
    /// whose counts are the final ones). Its `input_tokens` leaves out the tokens read from
    /// or written to the prompt cache, so the prompt is `input_tokens` +
    /// `cache_read_input_tokens` + `cache_creation_input_tokens` (llama-server streams
    /// `input_tokens: 1, cache_read_input_tokens: 19` for a 20-token prompt).
    Anthropic,
    /// No token counts: an answer without usage (Ollama's audio transcription,
    /// `{"text":"..."}` or the bare text); nothing is scanned.
    None,
}

/// What kind of work an inspected endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Chat,
    Completion,
    Embedding,
    /// The OpenAI Responses API (`instructions` + `input` items): `input` compacted
    /// (`context::apis`).
    Responses,
    /// The Anthropic Messages API (top-level `system` + `messages` of content blocks):
    /// `messages` compacted (`context::apis`).
    Messages,
    /// An OpenAI audio transcription (`/v1/audio/transcriptions`): a `multipart/form-data`
    /// body whose `model` field is read by `proxy::multipart`; forwarded unchanged.
    Transcription,
}

/// An inspected model endpoint: its body names a model, its response carries usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub operation: Operation,
    pub usage: UsageKeys,
    pub errors: ErrorStyle,
    /// Short stable label for logs and metrics.
    pub label: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspected_endpoints_per_kind() {
        let table = [
            (
                ProviderKind::Ollama,
                "/api/chat",
                Some(UsageKeys::OllamaNative),
            ),
            (
                ProviderKind::Ollama,
                "/api/generate",
                Some(UsageKeys::OllamaNative),
            ),
            (
                ProviderKind::Ollama,
                "/api/embed",
                Some(UsageKeys::OllamaNative),
            ),
            (
                ProviderKind::Ollama,
                "/api/embeddings",
                Some(UsageKeys::OllamaNative),
            ),
            (
                ProviderKind::Ollama,
                "/v1/chat/completions",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::Ollama,
                "/v1/completions",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::Ollama,
                "/v1/embeddings",
                Some(UsageKeys::OpenAi),
            ),
            (ProviderKind::Ollama, "/api/show", None),
            (ProviderKind::Ollama, "/api/v0/chat/completions", None),
            (
                ProviderKind::LmStudio,
                "/v1/chat/completions",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::LmStudio,
                "/v1/completions",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::LmStudio,
                "/v1/embeddings",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::LmStudio,
                "/api/v0/chat/completions",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::LmStudio,
                "/api/v0/completions",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::LmStudio,
                "/api/v0/embeddings",
                Some(UsageKeys::OpenAi),
            ),
            (
                ProviderKind::LmStudio,
                "/api/v1/chat",
                Some(UsageKeys::LmStudioV1),
            ),
            (ProviderKind::LmStudio, "/api/v1/models/load", None),
            (ProviderKind::LmStudio, "/api/chat", None),
        ];
        for (kind, path, usage) in table {
            assert_eq!(
                kind.classify(path).map(|e| e.usage),
                usage,
                "{kind:?} {path}"
            );
        }
    }

    /// `/v1/responses` and `/v1/messages` on every kind: counted by `input_tokens` /
    /// `output_tokens`, errors in the OpenAI-compatible shape of the kind (Responses) or
    /// Anthropic's (Messages), their own operations (compacted by `context::apis`).
    #[test]
    fn responses_and_messages_on_every_kind() {
        for (kind, responses_errors) in [
            (ProviderKind::Ollama, ErrorStyle::OpenAi),
            (ProviderKind::LmStudio, ErrorStyle::OpenAi),
            (ProviderKind::LlamaCpp, ErrorStyle::LlamaCpp),
        ] {
            let r = kind.classify("/v1/responses").expect("responses");
            assert_eq!(
                (r.operation, r.usage, r.errors, r.label),
                (
                    Operation::Responses,
                    UsageKeys::Responses,
                    responses_errors,
                    "v1_responses"
                ),
                "{kind:?}"
            );
            assert_eq!(kind.error_style("/v1/responses"), responses_errors);
            let m = kind.classify("/v1/messages").expect("messages");
            assert_eq!(
                (m.operation, m.usage, m.errors, m.label),
                (
                    Operation::Messages,
                    UsageKeys::Anthropic,
                    ErrorStyle::Anthropic,
                    "v1_messages"
                ),
                "{kind:?}"
            );
            assert_eq!(kind.error_style("/v1/messages"), ErrorStyle::Anthropic);
            // Not model work: token counting, retrieving a stored response.
            assert_eq!(kind.classify("/v1/messages/count_tokens"), None);
            assert_eq!(kind.classify("/v1/responses/resp_1"), None);
        }
    }

    /// Ollama's OpenAI transcription endpoint: its own operation (a multipart body), no usage
    /// in the answer, OpenAI errors. LM Studio does not serve it; llama-server's is not read
    /// yet: both pass it through.
    #[test]
    fn audio_transcriptions_are_inspected_on_ollama_only() {
        let t = ProviderKind::Ollama
            .classify("/v1/audio/transcriptions")
            .expect("inspected");
        assert_eq!(
            (t.operation, t.usage, t.errors, t.label),
            (
                Operation::Transcription,
                UsageKeys::None,
                ErrorStyle::OpenAi,
                "v1_audio_transcriptions"
            )
        );
        assert_eq!(
            ProviderKind::Ollama.classify("/v1/audio/translations"),
            None
        );
        assert_eq!(
            ProviderKind::LmStudio.classify("/v1/audio/transcriptions"),
            None
        );
        assert_eq!(
            ProviderKind::LlamaCpp.classify("/v1/audio/transcriptions"),
            None
        );
        assert_eq!(
            ProviderKind::LlamaCpp.classify("/audio/transcriptions"),
            None
        );
    }

    #[test]
    fn ollama_names_get_their_default_tag() {
        let k = ProviderKind::Ollama;
        assert_eq!(k.canonical_model("llama3.2"), "llama3.2:latest");
        assert_eq!(k.canonical_model("llama3.2:3b"), "llama3.2:3b");
        // Ollama matches names case-insensitively: one model, one count, one lease.
        assert_eq!(k.canonical_model("Llama3.2"), "llama3.2:latest");
        assert_eq!(k.canonical_model("LLAMA3.2:3B"), "llama3.2:3b");
        assert_eq!(
            k.canonical_model("hf.co/org/model"),
            "hf.co/org/model:latest"
        );
        assert_eq!(
            k.canonical_model("localhost:5000/ns/m"),
            "localhost:5000/ns/m:latest"
        );
        assert_eq!(
            k.canonical_model("localhost:5000/ns/m:q4"),
            "localhost:5000/ns/m:q4"
        );
        assert_eq!(ProviderKind::LmStudio.canonical_model("qwen"), "qwen");
    }

    #[test]
    fn loaded_models_are_read_from_each_providers_list() {
        let ps = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":3556000000,"digest":"a8","details":{"family":"llama"},"expires_at":"2026-11-26T10:05:01.55-08:00","size_vram":3000000000,"context_length":4096},{"name":"old:1b","size":10},{"name":"kept:1b","expires_at":"2318-03-15T02:37:52.4-07:00"},{"name":"loading:1b","expires_at":"0001-01-01T00:00:00Z"}]}"#;
        let got = ProviderKind::Ollama.parse_loaded("/api/ps", ps).unwrap();
        assert_eq!(
            got,
            [
                LoadedModel {
                    model: "llama3.2:latest".into(),
                    size_bytes: Some(3_556_000_000),
                    vram_bytes: Some(3_000_000_000),
                    context_length: Some(4096),
                    parallel: None,
                    expires: Some(true),
                },
                LoadedModel {
                    model: "old:1b".into(),
                    size_bytes: Some(10),
                    vram_bytes: None,
                    context_length: None,
                    parallel: None,
                    expires: None,
                },
                // Kept "forever" (keep_alive -1): Go's now + MaxInt64.
                LoadedModel {
                    model: "kept:1b".into(),
                    size_bytes: None,
                    vram_bytes: None,
                    context_length: None,
                    parallel: None,
                    expires: Some(false),
                },
                LoadedModel {
                    model: "loading:1b".into(),
                    size_bytes: None,
                    vram_bytes: None,
                    context_length: None,
                    parallel: None,
                    expires: None,
                },
            ]
        );
        assert_eq!(
            ProviderKind::Ollama
                .parse_loaded("/api/ps", br#"{"models":[]}"#)
                .unwrap(),
            []
        );
        assert!(ProviderKind::Ollama.parse_loaded("/api/ps", b"[]").is_err());

        let v1 = br#"{"models":[{"type":"llm","key":"qwen/qwen3-8b","size_bytes":5027783488,"loaded_instances":[{"id":"qwen/qwen3-8b","config":{"context_length":8192,"parallel":4}},{"id":"qwen/qwen3-8b:2","config":{"context_length":4096}}],"max_context_length":40960},{"type":"llm","key":"idle","size_bytes":1,"loaded_instances":[]}]}"#;
        let got = ProviderKind::LmStudio
            .parse_loaded("/api/v1/models", v1)
            .unwrap();
        assert_eq!(got.len(), 2, "one entry per loaded instance: {got:?}");
        assert_eq!(got[0].model, "qwen/qwen3-8b");
        assert_eq!(got[0].context_length, Some(8192));
        assert_eq!(got[0].parallel, Some(4), "its slots, for the memory split");
        assert_eq!(got[1].parallel, None);
        assert_eq!(got[1].model, "qwen/qwen3-8b:2");
        assert_eq!(got[1].size_bytes, Some(5_027_783_488));

        let v0 = br#"{"object":"list","data":[{"id":"qwen2.5-7b-instruct","object":"model","type":"llm","state":"loaded","max_context_length":32768,"loaded_context_length":8192},{"id":"x","state":"not-loaded","max_context_length":4096}]}"#;
        let got = ProviderKind::LmStudio
            .parse_loaded("/api/v0/models", v0)
            .unwrap();
        assert_eq!(
            got,
            [LoadedModel {
                model: "qwen2.5-7b-instruct".into(),
                size_bytes: None,
                vram_bytes: None,
                context_length: Some(8192),
                parallel: None,
                expires: None,
            }]
        );
    }

    #[test]
    fn error_style_follows_the_path() {
        assert_eq!(
            ProviderKind::Ollama.error_style("/api/chat"),
            ErrorStyle::Ollama
        );
        assert_eq!(ProviderKind::Ollama.error_style("/"), ErrorStyle::Ollama);
        assert_eq!(
            ProviderKind::Ollama.error_style("/v1/models"),
            ErrorStyle::OpenAi
        );
        assert_eq!(
            ProviderKind::LmStudio.error_style("/api/v0/models"),
            ErrorStyle::OpenAi
        );
    }
}
