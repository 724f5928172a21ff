//! Provider operations: load and unload a model through the provider's own API (Ollama:
//! `/api/generate` without a prompt, docs/providers.md §1.8; LM Studio: `/api/v1/models/load|unload`, docs/providers.md §2.4,
//! falling back to JIT loading where `/api/v1` is absent, docs/providers.md §2.5), and read a model's
//! details (Ollama `/api/show`, docs/providers.md §1.5), over the shared client.
//! Each call is bounded by a timeout and reads at most [`RESPONSE_LIMIT`] bytes back
//! ([`SHOW_LIMIT`] for `/api/show`).
//! Deciding *when* to load or unload is not done here; that belongs to the lifecycle owner.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};

use super::ProviderKind;
use super::{Upstream, UpstreamClient};

/// Ollama gives up on a stalled load after 5 minutes (`OLLAMA_LOAD_TIMEOUT`); so do we.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Unloads answer at once (Ollama unloads asynchronously, docs/providers.md §1.8).
pub const UNLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read back from a load or unload (they are a few hundred bytes).
pub const RESPONSE_LIMIT: usize = 64 * 1024;
/// `/api/show` reads the model's metadata and answers at once.
pub const SHOW_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest `/api/show` answer read back (non-verbose: license, Modelfile, template and
/// `model_info`, tens of KB; the verbose token lists are not asked for).
pub const SHOW_LIMIT: usize = 1 << 20;

const OLLAMA_GENERATE: &str = "/api/generate";
const OLLAMA_EMBED: &str = "/api/embed";
const OLLAMA_SHOW: &str = "/api/show";
const LMSTUDIO_LOAD: &str = "/api/v1/models/load";
const LMSTUDIO_MODELS: &str = "/api/v1/models";
/// Largest model list read back (a few hundred bytes per model).
const LIST_LIMIT: usize = 4 << 20;
const LMSTUDIO_UNLOAD: &str = "/api/v1/models/unload";

/// How to load a model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// Ollama only: how long Ollama keeps the model once idle. `None` sends `-1` (never
    /// unload), leaving unloading to the proxy.
    pub keep_alive: Option<Duration>,
    /// Context to load with (Ollama `options.num_ctx`, LM Studio `context_length`).
    pub context_length: Option<u64>,
    /// Ollama only: `options.num_batch` (tokens per batch; smaller = smaller compute buffers).
    pub num_batch: Option<u64>,
    /// Give up after this long ([`OpError::Timeout`]).
    pub timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            keep_alive: None,
            context_length: None,
            num_batch: None,
            timeout: LOAD_TIMEOUT,
        }
    }
}

/// A model the provider has loaded (or will load on first use, when `jit`).
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    /// What [`unload`] takes: Ollama the model name with its tag, LM Studio the instance id
    /// (`key`, then `key:2`... for further instances).
    pub instance_id: String,
    /// Time from sending the load to its answer.
    pub elapsed: Duration,
    /// The context loaded, as LM Studio echoes it; else the one asked for.
    pub context_length: Option<u64>,
    /// LM Studio without `/api/v1` (before 0.4): nothing was loaded, the first request for
    /// the model loads it just in time (and an unknown model only shows up then).
    pub jit: bool,
}

/// Why a load or unload failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OpError {
    #[error("model `{model}` not found")]
    ModelNotFound { model: String },
    #[error("provider unreachable: {0}")]
    Unreachable(String),
    #[error("provider answered {status}: {message}")]
    Provider { status: u16, message: String },
    #[error("provider did not answer in time")]
    Timeout,
    #[error("unexpected answer from provider: {0}")]
    BadResponse(String),
}

impl OpError {
    /// Short fixed label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            OpError::ModelNotFound { .. } => "model_not_found",
            OpError::Unreachable(_) => "unreachable",
            OpError::Provider { .. } => "provider_error",
            OpError::Timeout => "timeout",
            OpError::BadResponse(_) => "bad_response",
        }
    }
}

/// Loads `model` and waits until the provider has it in memory, within `opts.timeout`.
pub async fn load(
    client: &UpstreamClient,
    upstream: &Upstream,
    kind: ProviderKind,
    model: &str,
    opts: &LoadOptions,
) -> Result<Loaded, OpError> {
    let start = tokio::time::Instant::now();
    let op = async {
        match kind {
            ProviderKind::Ollama => ollama_load(client, upstream, model, opts).await,
            ProviderKind::LmStudio => lmstudio_load(client, upstream, model, opts).await,
            ProviderKind::LlamaCpp => llamacpp_load(client, upstream, model).await,
        }
    };
    let (instance_id, context_length, jit) = tokio::time::timeout(opts.timeout, op)
        .await
        .map_err(|_| OpError::Timeout)??;
    Ok(Loaded {
        instance_id,
        elapsed: start.elapsed(),
        context_length,
        jit,
    })
}

/// Unloads what [`load`] returned as `instance_id`, within [`UNLOAD_TIMEOUT`].
pub async fn unload(
    client: &UpstreamClient,
    upstream: &Upstream,
    kind: ProviderKind,
    instance_id: &str,
) -> Result<(), OpError> {
    unload_within(client, upstream, kind, instance_id, UNLOAD_TIMEOUT).await
}

/// [`unload`] with its own timeout.
pub async fn unload_within(
    client: &UpstreamClient,
    upstream: &Upstream,
    kind: ProviderKind,
    instance_id: &str,
    timeout: Duration,
) -> Result<(), OpError> {
    let op = async {
        let (path, body) = match kind {
            ProviderKind::Ollama => (
                OLLAMA_GENERATE,
                json!({"model": instance_id, "keep_alive": 0, "stream": false}),
            ),
            ProviderKind::LmStudio => (LMSTUDIO_UNLOAD, json!({"instance_id": instance_id})),
            ProviderKind::LlamaCpp => return llamacpp_unload(client, upstream, instance_id).await,
        };
        let (status, body) = post_json(client, upstream, path, &body).await?;
        if status.is_success() {
            return Ok(());
        }
        Err(failure(kind, status, &body, instance_id))
    };
    tokio::time::timeout(timeout, op)
        .await
        .map_err(|_| OpError::Timeout)?
}

/// Ollama's model details (`POST /api/show`, docs/providers.md §1.5): `model_info` (the GGUF metadata the
/// KV cache estimate reads, through `memory::Geometry::from_show`), `details`,
/// `parameters`, `capabilities`. Ollama only; an unknown model is
/// [`OpError::ModelNotFound`]. Bounded by [`SHOW_TIMEOUT`] and [`SHOW_LIMIT`].
pub async fn show(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
) -> Result<Value, OpError> {
    let op = async {
        // Not `post_json`: the answer carries the license and Modelfile texts, which can pass
        // its 64 KiB limit (a long license is printed twice, in `license` and `modelfile`).
        let body = json!({ "model": model });
        let (status, bytes) = call(client, upstream, Some(&body), OLLAMA_SHOW, SHOW_LIMIT).await?;
        if !status.is_success() {
            return Err(failure(ProviderKind::Ollama, status, &bytes, model));
        }
        let v = parse_json(&bytes)?;
        if !v.is_object() {
            return Err(OpError::BadResponse(
                "show answer is not a JSON object".into(),
            ));
        }
        Ok(v)
    };
    tokio::time::timeout(SHOW_TIMEOUT, op)
        .await
        .map_err(|_| OpError::Timeout)?
}

// === per provider ===

/// `POST /api/generate` without a prompt: one object with `done_reason:"load"` (docs/providers.md §1.8).
async fn ollama_load(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
    opts: &LoadOptions,
) -> Result<(String, Option<u64>, bool), OpError> {
    let mut body = json!({
        "model": model,
        "keep_alive": ollama_keep_alive(opts.keep_alive),
        "stream": false,
    });
    let mut options = serde_json::Map::new();
    if let Some(n) = opts.context_length {
        options.insert("num_ctx".into(), n.into());
    }
    if let Some(n) = opts.num_batch {
        options.insert("num_batch".into(), n.into());
    }
    if !options.is_empty() {
        body["options"] = Value::Object(options);
    }
    let (status, bytes) = post_json(client, upstream, OLLAMA_GENERATE, &body).await?;
    if status == StatusCode::BAD_REQUEST
        && error_message(status, &bytes).contains("does not support generate")
    {
        // An embedding model: `/api/embed` with no input schedules the runner (with the
        // given keep_alive and options) and answers an empty list.
        body["input"] = json!([]);
        if let Some(o) = body.as_object_mut() {
            o.remove("stream");
        }
        let (status, bytes) = post_json(client, upstream, OLLAMA_EMBED, &body).await?;
        if !status.is_success() {
            return Err(failure(ProviderKind::Ollama, status, &bytes, model));
        }
        let name = ProviderKind::Ollama.canonical_model(model).into_owned();
        let ctx = match opts.context_length {
            Some(n) => Some(n),
            None => ollama_loaded_context(client, upstream, &name).await,
        };
        return Ok((name, ctx, false));
    }
    if !status.is_success() {
        return Err(failure(ProviderKind::Ollama, status, &bytes, model));
    }
    let v = parse_json(&bytes)?;
    match v.get("done_reason").and_then(Value::as_str) {
        Some("load") => {
            let name = ProviderKind::Ollama.canonical_model(model).into_owned();
            let ctx = match opts.context_length {
                Some(n) => Some(n),
                None => ollama_loaded_context(client, upstream, &name).await,
            };
            Ok((name, ctx, false))
        }
        other => Err(OpError::BadResponse(format!(
            "expected done_reason \"load\", got {other:?}"
        ))),
    }
}

/// `POST /api/v1/models/load` → `instance_id`; a 404 that is not about the model means an
/// LM Studio older than 0.4, which loads on first use instead (docs/providers.md §2.5).
async fn lmstudio_load(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
    opts: &LoadOptions,
) -> Result<(String, Option<u64>, bool), OpError> {
    // Each load makes a new instance (`key:2`...): use the one already loaded, if any
    // (loaded by another client or by a JIT request since the last poll).
    if let Some(existing) = lmstudio_loaded_instance(client, upstream, model).await {
        return Ok(existing);
    }
    let mut body = json!({ "model": model, "echo_load_config": true });
    if let Some(n) = opts.context_length {
        body["context_length"] = json!(n);
    }
    let (status, bytes) = post_json(client, upstream, LMSTUDIO_LOAD, &body).await?;
    if status == StatusCode::NOT_FOUND && !is_model_not_found(&bytes) {
        return Ok((model.to_string(), opts.context_length, true));
    }
    if !status.is_success() {
        return Err(failure(ProviderKind::LmStudio, status, &bytes, model));
    }
    let v = parse_json(&bytes)?;
    // Earlier beta docs call it `model_instance_id` (docs/providers.md §2.4).
    let id = v
        .get("instance_id")
        .or_else(|| v.get("model_instance_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| OpError::BadResponse("load answer without instance_id".into()))?;
    let context_length = v
        .pointer("/load_config/context_length")
        .and_then(Value::as_u64)
        .or(opts.context_length);
    Ok((id.to_string(), context_length, false))
}

/// How often a llama-server router's `/models` is read while a load or unload settles (both
/// answer at once and finish in the background, docs/providers.md §3.6).
pub const LLAMACPP_SETTLE_POLL: Duration = Duration::from_millis(50);
const LLAMACPP_MODELS: &str = "/models";

/// Router mode: `POST /models/load`, then `/models` until the model is `loaded` (or its load
/// failed: `unloaded` with `failed: true`). "Already running" is a load someone else started:
/// wait for it the same way. The context is the child's `/props` `n_ctx`.
async fn llamacpp_load(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
) -> Result<(String, Option<u64>, bool), OpError> {
    let (status, bytes) =
        post_json(client, upstream, "/models/load", &json!({ "model": model })).await?;
    if status == StatusCode::NOT_FOUND {
        // The router answers an unknown model with its plain 404 ("File Not Found").
        return Err(OpError::ModelNotFound {
            model: model.to_string(),
        });
    }
    let already = status == StatusCode::BAD_REQUEST
        && error_message(status, &bytes).contains("already running");
    if !status.is_success() && !already {
        return Err(failure(ProviderKind::LlamaCpp, status, &bytes, model));
    }
    loop {
        let entry = llamacpp_entry(client, upstream, model)
            .await?
            .ok_or_else(|| OpError::ModelNotFound {
                model: model.to_string(),
            })?;
        match entry.pointer("/status/value").and_then(Value::as_str) {
            Some("loaded" | "sleeping") | None => break,
            Some("unloaded") if entry.pointer("/status/failed") == Some(&Value::Bool(true)) => {
                let code = entry
                    .pointer("/status/exit_code")
                    .and_then(Value::as_i64)
                    .unwrap_or(-1);
                return Err(OpError::Provider {
                    status: 500,
                    message: format!("llama-server could not load `{model}` (exit code {code})"),
                });
            }
            _ => tokio::time::sleep(LLAMACPP_SETTLE_POLL).await,
        }
    }
    let ctx = llamacpp_n_ctx(client, upstream, Some(model)).await;
    Ok((model.to_string(), ctx, false))
}

/// Router mode: `POST /models/unload`, then `/models` until the model is `unloaded` ("not
/// running" means it is already).
async fn llamacpp_unload(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
) -> Result<(), OpError> {
    let (status, bytes) = post_json(
        client,
        upstream,
        "/models/unload",
        &json!({ "model": model }),
    )
    .await?;
    if !status.is_success() {
        if status == StatusCode::BAD_REQUEST
            && error_message(status, &bytes).contains("not running")
        {
            return Ok(());
        }
        return Err(failure(ProviderKind::LlamaCpp, status, &bytes, model));
    }
    loop {
        let gone = llamacpp_entry(client, upstream, model)
            .await?
            .is_none_or(|e| e.pointer("/status/value").and_then(Value::as_str) == Some("unloaded"));
        if gone {
            return Ok(());
        }
        tokio::time::sleep(LLAMACPP_SETTLE_POLL).await;
    }
}

/// The router's `/models` entry for `model` (`None`: it lists no such model).
async fn llamacpp_entry(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
) -> Result<Option<Value>, OpError> {
    let (status, bytes) = get(client, upstream, LLAMACPP_MODELS, LIST_LIMIT).await?;
    if !status.is_success() {
        return Err(failure(ProviderKind::LlamaCpp, status, &bytes, model));
    }
    let mut v = parse_json(&bytes)?;
    Ok(v.get_mut("data")
        .and_then(Value::as_array_mut)
        .and_then(|data| {
            let at = data
                .iter()
                .position(|m| m.get("id").and_then(Value::as_str) == Some(model))?;
            Some(data.swap_remove(at))
        }))
}

/// llama-server's per-slot context: `/props` (`?model=` in router mode) `n_ctx`.
pub async fn llamacpp_n_ctx(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: Option<&str>,
) -> Option<u64> {
    let path = match model {
        Some(m) => format!("/props?model={}", encode_query(m)),
        None => "/props".to_string(),
    };
    let (status, bytes) = get(client, upstream, &path, LIST_LIMIT).await.ok()?;
    if !status.is_success() {
        return None;
    }
    crate::providers::llamacpp::props_n_ctx(&parse_json(&bytes).ok()?)
}

/// llama-server's exact token count of `text` (`POST /tokenize`, routed by `model` in router
/// mode), without special tokens.
pub async fn llamacpp_tokenize(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: Option<&str>,
    text: &str,
) -> Result<u64, OpError> {
    let mut body = json!({ "content": text, "add_special": false });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let (status, bytes) = post_json(client, upstream, "/tokenize", &body).await?;
    if !status.is_success() {
        return Err(failure(
            ProviderKind::LlamaCpp,
            status,
            &bytes,
            model.unwrap_or(""),
        ));
    }
    parse_json(&bytes)?
        .get("tokens")
        .and_then(Value::as_array)
        .map(|t| t.len() as u64)
        .ok_or_else(|| OpError::BadResponse("tokenize answer without tokens".into()))
}

/// Saves (`save`) or restores (`restore`) slot `slot`'s KV cache to or from `filename` under
/// the server's `--slot-save-path` (`POST /slots/N?action=...`, routed by `model`).
pub async fn llamacpp_slot(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: Option<&str>,
    slot: u64,
    action: &str,
    filename: &str,
) -> Result<Value, OpError> {
    let mut body = json!({ "filename": filename });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let path = format!("/slots/{slot}?action={action}");
    let (status, bytes) = post_json(client, upstream, &path, &body).await?;
    if !status.is_success() {
        return Err(failure(
            ProviderKind::LlamaCpp,
            status,
            &bytes,
            model.unwrap_or(""),
        ));
    }
    parse_json(&bytes)
}

/// The slots that hold a prompt (`GET /slots`, `?model=` in router mode: entries with
/// `n_prompt_tokens` > 0).
pub async fn llamacpp_used_slots(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: Option<&str>,
) -> Result<Vec<u64>, OpError> {
    let path = match model {
        Some(m) => format!("/slots?model={}", encode_query(m)),
        None => "/slots".to_string(),
    };
    let (status, bytes) = get(client, upstream, &path, LIST_LIMIT).await?;
    if !status.is_success() {
        return Err(failure(
            ProviderKind::LlamaCpp,
            status,
            &bytes,
            model.unwrap_or(""),
        ));
    }
    let v = parse_json(&bytes)?;
    let slots = v
        .as_array()
        .ok_or_else(|| OpError::BadResponse("slots answer is not a list".into()))?;
    Ok(slots
        .iter()
        .filter(|s| {
            s.get("n_prompt_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                > 0
        })
        .filter_map(|s| s.get("id").and_then(Value::as_u64))
        .collect())
}

/// A query-string value, percent-encoded (unreserved characters kept).
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The context Ollama loaded `model` with (`/api/ps` `context_length`), if it says.
async fn ollama_loaded_context(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
) -> Option<u64> {
    let (status, bytes) = get(client, upstream, "/api/ps", LIST_LIMIT).await.ok()?;
    if !status.is_success() {
        return None;
    }
    ProviderKind::Ollama
        .parse_loaded("/api/ps", &bytes)
        .ok()?
        .into_iter()
        .find(|m| m.model == model)
        .and_then(|m| m.context_length)
}

/// The first loaded instance of `model` per `GET /api/v1/models`, if that answers and lists one.
async fn lmstudio_loaded_instance(
    client: &UpstreamClient,
    upstream: &Upstream,
    model: &str,
) -> Option<(String, Option<u64>, bool)> {
    let (status, bytes) = get(client, upstream, LMSTUDIO_MODELS, LIST_LIMIT)
        .await
        .ok()?;
    if !status.is_success() {
        return None;
    }
    let loaded = ProviderKind::LmStudio
        .parse_loaded(LMSTUDIO_MODELS, &bytes)
        .ok()?;
    // Instances are `key`, `key:2`, ...: the model's own or a numbered one.
    loaded
        .into_iter()
        .find(|m| {
            m.model == model
                || m.model
                    .strip_prefix(model)
                    .and_then(|r| r.strip_prefix(':'))
                    .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|m| (m.model, m.context_length, false))
}

/// `-1` (never), whole seconds as a number, else a Go duration in nanoseconds (docs/providers.md §1.8).
fn ollama_keep_alive(keep_alive: Option<Duration>) -> Value {
    match keep_alive {
        None => json!(-1),
        Some(d) if d.subsec_nanos() == 0 => json!(d.as_secs()),
        Some(d) => json!(format!("{}ns", d.as_nanos())),
    }
}

// === HTTP ===

/// POSTs `body` as JSON to `path` on `upstream`; the status and at most
/// [`RESPONSE_LIMIT`] bytes of the answer.
async fn post_json(
    client: &UpstreamClient,
    upstream: &Upstream,
    path: &str,
    body: &Value,
) -> Result<(StatusCode, Bytes), OpError> {
    call(client, upstream, Some(body), path, RESPONSE_LIMIT).await
}

/// GETs `path` on `upstream`; the status and at most `limit` bytes of the answer.
async fn get(
    client: &UpstreamClient,
    upstream: &Upstream,
    path: &str,
    limit: usize,
) -> Result<(StatusCode, Bytes), OpError> {
    call(client, upstream, None, path, limit).await
}

/// One exchange: POST with a JSON body, or GET without one.
async fn call(
    client: &UpstreamClient,
    upstream: &Upstream,
    body: Option<&Value>,
    path: &str,
    limit: usize,
) -> Result<(StatusCode, Bytes), OpError> {
    let uri = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(format!("{}{path}", upstream.path_prefix))
        .build()
        .map_err(|e| OpError::Unreachable(format!("bad upstream address {upstream}: {e}")))?;
    let req = match body {
        Some(body) => {
            let bytes = serde_json::to_vec(body)
                .map_err(|e| OpError::BadResponse(format!("request not encodable: {e}")))?;
            Request::post(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(bytes)))
        }
        None => Request::get(uri).body(Full::new(Bytes::new())),
    }
    .map_err(|e| OpError::BadResponse(format!("request not buildable: {e}")))?;
    let mut req = req;
    upstream.authorize(req.headers_mut());
    let resp = client.request(req).await.map_err(|e| {
        let chain = error_chain(&e);
        if e.is_connect() {
            OpError::Unreachable(format!("{upstream}: {chain}"))
        } else {
            OpError::BadResponse(format!("request failed: {chain}"))
        }
    })?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| OpError::BadResponse(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok((status, body))
}

/// An error and its sources on one line, `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

fn parse_json(bytes: &[u8]) -> Result<Value, OpError> {
    serde_json::from_slice(bytes).map_err(|e| OpError::BadResponse(format!("not JSON: {e}")))
}

/// A non-success answer: 404 about the model → `ModelNotFound`, anything else → `Provider`.
fn failure(kind: ProviderKind, status: StatusCode, body: &[u8], model: &str) -> OpError {
    // Ollama's generate answers 404 only for an unknown model (docs/providers.md §1.6); LM Studio also answers
    // 404 for endpoints it does not have, so its body decides.
    let about_model = match kind {
        ProviderKind::Ollama => true,
        ProviderKind::LmStudio | ProviderKind::LlamaCpp => is_model_not_found(body),
    };
    if status == StatusCode::NOT_FOUND && about_model {
        return OpError::ModelNotFound {
            model: model.to_string(),
        };
    }
    OpError::Provider {
        status: status.as_u16(),
        message: error_message(status, body),
    }
}

/// Whether a 404 body says the model (or instance) is unknown, rather than the endpoint:
/// LM Studio's `error.type` / `error.code` `model_not_found`, or a message naming a model
/// that is not found (third-party reports: `{"error":"Model 'x' not found"}`).
fn is_model_not_found(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let code = |k: &str| v.pointer(&format!("/error/{k}")).and_then(Value::as_str);
    if code("type") == Some("model_not_found") || code("code") == Some("model_not_found") {
        return true;
    }
    let message = error_text(&v).unwrap_or_default().to_ascii_lowercase();
    (message.contains("model") || message.contains("instance")) && message.contains("not found")
}

/// The provider's own error text: `{"error":"..."}` or `{"error":{"message":"..."}}`.
fn error_text(v: &Value) -> Option<&str> {
    let e = v.get("error")?;
    e.as_str()
        .or_else(|| e.get("message").and_then(Value::as_str))
}

/// The provider's error text, else the start of the body, else the status's reason.
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(text) = error_text(&v) {
            return text.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("no message")
            .to_string();
    }
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{parse_upstream, Config};
    use llm_warden_sim::lmstudio::{self, LmStudioConfig, LmStudioSim};
    use llm_warden_sim::ollama::{self, OllamaConfig, OllamaSim};
    use llm_warden_sim::{Clock, SimServer};

    const LLAMA: &str = "llama3.2";
    const QWEN: &str = "qwen2.5-7b-instruct";

    fn client() -> UpstreamClient {
        crate::providers::build_client(Config::default().proxy.connect_timeout)
    }

    fn upstream(url: &str) -> Upstream {
        parse_upstream(url).expect("a valid test URL")
    }

    fn clock() -> Clock {
        Clock::fixed()
    }

    async fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.expect("bind")
    }

    async fn start_ollama(load_latency: Duration) -> (SimServer<OllamaSim>, Upstream) {
        let cfg = OllamaConfig {
            load_latency,
            clock: clock(),
            ..OllamaConfig::default()
        };
        let sim = ollama::spawn(cfg, listener().await);
        let up = upstream(&sim.url());
        (sim, up)
    }

    async fn start_lmstudio(load_latency: Duration) -> (SimServer<LmStudioSim>, Upstream) {
        let cfg = LmStudioConfig {
            load_latency,
            clock: clock(),
            ..LmStudioConfig::default()
        };
        let sim = lmstudio::spawn(cfg, listener().await);
        let up = upstream(&sim.url());
        (sim, up)
    }

    /// An LM Studio before 0.4: every `/api/v1/*` path is an unknown endpoint.
    async fn v0_only_front() -> Upstream {
        let l = listener().await;
        let url = format!("http://{}", l.local_addr().expect("bound"));
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                        let (status, body) = if req.uri().path().starts_with("/api/v1/") {
                            (404, r#"{"error":"Unexpected endpoint or method."}"#)
                        } else {
                            (200, r#"{"lmstudio":true}"#)
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = StatusCode::from_u16(status).expect("valid");
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        upstream(&url)
    }

    #[tokio::test(start_paused = true)]
    async fn ollama_load_pins_the_model_until_unloaded() {
        let (sim, up) = start_ollama(Duration::from_secs(2)).await;
        let c = client();
        let opts = LoadOptions::default();
        let loaded = load(&c, &up, ProviderKind::Ollama, LLAMA, &opts)
            .await
            .unwrap();
        assert_eq!(loaded.instance_id, "llama3.2:latest");
        assert!(!loaded.jit);
        assert_eq!(
            loaded.context_length,
            Some(4096),
            "what /api/ps says it loaded with"
        );
        assert!(loaded.elapsed >= Duration::from_secs(2), "{loaded:?}");
        assert_eq!(sim.state.loaded(), ["llama3.2:latest"]);
        assert_eq!(sim.state.load_count(LLAMA), 1);
        let calls = sim.state.log.calls();
        assert_eq!(calls.last().unwrap().path, "/api/ps");
        let sent = calls[calls.len() - 2].json();
        assert_eq!(
            sent,
            json!({"model": LLAMA, "keep_alive": -1, "stream": false}),
            "no prompt, never unload"
        );

        // keep_alive -1: Ollama never unloads it on its own.
        sim.state.clock.advance(Duration::from_secs(72 * 3600));
        assert_eq!(sim.state.loaded(), ["llama3.2:latest"]);

        unload(&c, &up, ProviderKind::Ollama, &loaded.instance_id)
            .await
            .unwrap();
        assert!(sim.state.loaded().is_empty());
        let sent = sim.state.log.calls().pop().unwrap().json();
        assert_eq!(sent["keep_alive"], 0);
        assert_eq!(sim.state.unloads_while_busy(), 0);
    }

    #[tokio::test]
    async fn ollama_load_sets_context_and_keep_alive() {
        let (sim, up) = start_ollama(Duration::ZERO).await;
        let opts = LoadOptions {
            keep_alive: Some(Duration::from_secs(600)),
            context_length: Some(8192),
            ..LoadOptions::default()
        };
        let loaded = load(&client(), &up, ProviderKind::Ollama, LLAMA, &opts)
            .await
            .unwrap();
        assert_eq!(loaded.context_length, Some(8192));
        assert_eq!(sim.state.loaded_num_ctx(LLAMA), Some(8192));
        let sent = sim.state.log.calls().pop().unwrap().json();
        assert_eq!(sent["keep_alive"], 600);
        assert_eq!(sent["options"], json!({"num_ctx": 8192}));
        sim.state.clock.advance(Duration::from_secs(601));
        assert!(sim.state.loaded().is_empty(), "a finite keep_alive expires");
    }

    #[tokio::test]
    async fn ollama_show_returns_model_info_and_404_is_model_not_found() {
        let (sim, up) = start_ollama(Duration::ZERO).await;
        let c = client();
        let v = show(&c, &up, LLAMA).await.unwrap();
        let sent = sim.state.log.calls().pop().unwrap();
        assert_eq!(sent.path, "/api/show");
        assert_eq!(sent.json(), json!({"model": LLAMA}));
        let info = &v["model_info"];
        assert_eq!(info["general.architecture"], "llama");
        assert_eq!(info["llama.context_length"], 131_072);
        assert_eq!(info["llama.block_count"], 28);
        assert!(v["capabilities"].is_array(), "{v}");
        assert!(sim.state.loaded().is_empty(), "show loads nothing");

        let e = show(&c, &up, "nope").await.unwrap_err();
        assert!(
            matches!(&e, OpError::ModelNotFound { model } if model == "nope"),
            "{e:?}"
        );
        let e = show(&c, &upstream("http://127.0.0.1:1"), LLAMA)
            .await
            .unwrap_err();
        assert!(matches!(e, OpError::Unreachable(_)), "{e:?}");
    }

    #[test]
    fn keep_alive_is_written_as_ollama_reads_it() {
        assert_eq!(ollama_keep_alive(None), json!(-1));
        assert_eq!(ollama_keep_alive(Some(Duration::ZERO)), json!(0));
        assert_eq!(
            ollama_keep_alive(Some(Duration::from_secs(300))),
            json!(300)
        );
        assert_eq!(
            ollama_keep_alive(Some(Duration::from_millis(1500))),
            json!("1500000000ns")
        );
    }

    #[tokio::test]
    async fn unknown_model_is_model_not_found_on_both() {
        let c = client();
        let (_o, oup) = start_ollama(Duration::ZERO).await;
        let (_l, lup) = start_lmstudio(Duration::ZERO).await;
        for (kind, up) in [(ProviderKind::Ollama, &oup), (ProviderKind::LmStudio, &lup)] {
            let e = load(&c, up, kind, "nope", &LoadOptions::default())
                .await
                .unwrap_err();
            assert!(
                matches!(&e, OpError::ModelNotFound { model } if model == "nope"),
                "{kind:?}: {e:?}"
            );
            assert_eq!(e.kind(), "model_not_found");
        }
        // LM Studio: unloading an instance that is not loaded.
        let e = unload(&c, &lup, ProviderKind::LmStudio, QWEN)
            .await
            .unwrap_err();
        assert!(matches!(e, OpError::ModelNotFound { .. }), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn lmstudio_load_returns_instances_and_unload_removes_them() {
        let (sim, up) = start_lmstudio(Duration::from_secs(3)).await;
        let c = client();
        let opts = LoadOptions {
            context_length: Some(8192),
            ..LoadOptions::default()
        };
        let first = load(&c, &up, ProviderKind::LmStudio, QWEN, &opts)
            .await
            .unwrap();
        assert_eq!(first.instance_id, QWEN);
        assert!(!first.jit);
        assert_eq!(first.context_length, Some(8192), "echoed by LM Studio");
        assert!(first.elapsed >= Duration::from_secs(3), "{first:?}");
        assert_eq!(sim.state.loaded(), [QWEN]);
        assert_eq!(sim.state.load_count(QWEN), 1);
        assert_eq!(sim.state.loaded_context_length(QWEN), Some(8192));

        // Loaded already (by anyone): that instance is used, not a second one made.
        let second = load(
            &c,
            &up,
            ProviderKind::LmStudio,
            QWEN,
            &LoadOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(second.instance_id, QWEN);
        assert_eq!(second.context_length, Some(8192), "the loaded instance's");
        assert_eq!(sim.state.load_count(QWEN), 1, "no second load");

        unload(&c, &up, ProviderKind::LmStudio, &first.instance_id)
            .await
            .unwrap();
        assert!(sim.state.loaded().is_empty());
        let sent = sim.state.log.calls().pop().unwrap().json();
        assert_eq!(sent, json!({"instance_id": QWEN}));
        assert_eq!(sim.state.unloads_while_busy(), 0);
    }

    #[tokio::test]
    async fn lmstudio_without_v1_loads_just_in_time() {
        let up = v0_only_front().await;
        let opts = LoadOptions {
            context_length: Some(2048),
            ..LoadOptions::default()
        };
        let loaded = load(&client(), &up, ProviderKind::LmStudio, QWEN, &opts)
            .await
            .unwrap();
        assert!(loaded.jit, "{loaded:?}");
        assert_eq!(loaded.instance_id, QWEN);
        assert_eq!(loaded.context_length, Some(2048));
        // Unloading needs /api/v1 too: the 404 is the provider's, not the model's.
        let e = unload(&client(), &up, ProviderKind::LmStudio, QWEN)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, OpError::Provider { status: 404, message } if message.starts_with("Unexpected endpoint")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_upstream_is_unreachable() {
        let up = upstream("http://127.0.0.1:1");
        for kind in [ProviderKind::Ollama, ProviderKind::LmStudio] {
            let e = load(&client(), &up, kind, LLAMA, &LoadOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(e, OpError::Unreachable(_)), "{kind:?}: {e:?}");
            assert_eq!(e.kind(), "unreachable");
            let e = unload(&client(), &up, kind, LLAMA).await.unwrap_err();
            assert!(matches!(e, OpError::Unreachable(_)), "{kind:?}: {e:?}");
        }
    }

    #[tokio::test]
    async fn failed_load_carries_the_providers_message() {
        let c = client();
        let (o, oup) = start_ollama(Duration::ZERO).await;
        let (l, lup) = start_lmstudio(Duration::ZERO).await;
        o.state.fail_next_load("boom");
        l.state.fail_next_load("boom");
        for (kind, up) in [(ProviderKind::Ollama, &oup), (ProviderKind::LmStudio, &lup)] {
            let e = load(&c, up, kind, known_model(kind), &LoadOptions::default())
                .await
                .unwrap_err();
            assert!(
                matches!(&e, OpError::Provider { status: 500, message } if message.contains("boom")),
                "{kind:?}: {e:?}"
            );
            assert_eq!(e.kind(), "provider_error");
        }
        assert!(o.state.loaded().is_empty() && l.state.loaded().is_empty());
    }

    /// A model each simulator's catalogue has.
    fn known_model(kind: ProviderKind) -> &'static str {
        match kind {
            ProviderKind::Ollama => LLAMA,
            ProviderKind::LmStudio | ProviderKind::LlamaCpp => QWEN,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_load_times_out() {
        let (sim, up) = start_ollama(Duration::from_secs(600)).await;
        let opts = LoadOptions {
            timeout: Duration::from_secs(1),
            ..LoadOptions::default()
        };
        let t0 = tokio::time::Instant::now();
        let e = load(&client(), &up, ProviderKind::Ollama, LLAMA, &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, OpError::Timeout), "{e:?}");
        assert_eq!(e.kind(), "timeout");
        assert!(t0.elapsed() < Duration::from_secs(600));
        assert!(sim.state.loaded().is_empty());
    }

    #[test]
    fn error_bodies_are_read_in_both_shapes() {
        let s = StatusCode::INTERNAL_SERVER_ERROR;
        assert_eq!(error_message(s, br#"{"error":"boom"}"#), "boom");
        assert_eq!(
            error_message(s, br#"{"error":{"type":"x","message":"boom"}}"#),
            "boom"
        );
        assert_eq!(error_message(s, b"  plain text\n"), "plain text");
        assert_eq!(error_message(s, b""), "Internal Server Error");
        assert!(is_model_not_found(
            br#"{"error":{"type":"model_not_found","message":"No loaded model instance with id \"x\"."}}"#
        ));
        assert!(is_model_not_found(br#"{"error":"Model 'x' not found"}"#));
        assert!(!is_model_not_found(
            br#"{"error":"Unexpected endpoint or method. (POST /api/v1/models/load)"}"#
        ));
        assert!(!is_model_not_found(b"<html>404</html>"));
    }

    #[test]
    fn error_kinds_are_fixed_labels() {
        let all = [
            OpError::ModelNotFound { model: "m".into() },
            OpError::Unreachable("x".into()),
            OpError::Provider {
                status: 500,
                message: "x".into(),
            },
            OpError::Timeout,
            OpError::BadResponse("x".into()),
        ];
        let kinds: Vec<_> = all.iter().map(OpError::kind).collect();
        assert_eq!(
            kinds,
            [
                "model_not_found",
                "unreachable",
                "provider_error",
                "timeout",
                "bad_response"
            ]
        );
    }
}
