//! Simulated LM Studio server (`provider-apis.md` §2, checklist §5.2): `/lmstudio-greeting`, the
//! OpenAI-compatible `/v1/*` API, the native REST APIs `/api/v0/*` and `/api/v1/*` (model lists,
//! load/unload, `/api/v1/chat` with named SSE events), JIT loading with TTL and auto-evict,
//! optional bearer auth and a configurable over-long-prompt policy. The SDK WebSocket namespaces
//! (`/llm`, `/system`, ...) are accepted and echo every message back: only the transport is
//! simulated, not the SDK's RPC/channel protocol.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::common::{
    alnum_id, channel_body, count_tokens, embedding, full, hash_bytes, record, reply_pieces,
    respond, serve, Call, CallLog, Clock, SimBody, SimServer,
};
use super::SimModel;

/// Content type of every JSON answer (Express `res.json`).
const JSON: &str = "application/json; charset=utf-8";
/// Content type of every stream.
const SSE: &str = "text/event-stream";
/// The SDK's WebSocket namespaces; a WebSocket upgrade on one of them is accepted.
pub const WS_NAMESPACES: [&str; 7] = [
    "/llm",
    "/embedding",
    "/system",
    "/files",
    "/repository",
    "/diagnostics",
    "/plugins",
];

// === config ===

/// What an over-long prompt does. LM Studio's overflow policy is an app setting that is not
/// visible on the wire, so the simulator offers the two observable outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// 400 with an OpenAI-style error (`code:"context_length_exceeded"`).
    #[default]
    Error,
    /// Answer anyway, with the prompt token count capped at the loaded context length.
    Silent,
}

/// Knobs of the simulated LM Studio server.
#[derive(Clone, Debug)]
pub struct LmStudioConfig {
    /// Downloaded models; `SimModel.name` is the model key.
    pub models: Vec<SimModel>,
    /// How long a load takes (JIT or `/api/v1/models/load`), slept with `tokio::time`.
    pub load_latency: Duration,
    /// Delay before each generated token (streamed or not).
    pub token_delay: Duration,
    /// Tokens per reply, capped by `max_tokens` / `max_output_tokens` (finish reason `length`).
    pub reply_tokens: usize,
    /// Just-in-time loading of a requested model that is not loaded.
    pub jit: bool,
    /// Keep at most one JIT-loaded model (manual loads are never evicted).
    pub auto_evict: bool,
    /// Idle TTL of a JIT-loaded model when the loading request gives no `ttl`.
    pub default_ttl: Duration,
    /// Context a model is loaded with unless the load asks otherwise (capped at the trained max).
    pub default_context_length: u32,
    /// `Some` => every request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub overflow: Overflow,
    /// Length of the simulated embedding vectors.
    pub embedding_dims: usize,
    /// Reproduce the quirk observed in 0.3.14: when exactly one model instance is loaded, an
    /// unknown `model` on `/v1/*` and `/api/v0/*` is ignored and the loaded model answers.
    /// Default off.
    pub single_loaded_model_quirk: bool,
    pub clock: Clock,
}

impl Default for LmStudioConfig {
    fn default() -> Self {
        let mut qwen = SimModel::chat("qwen2.5-7b-instruct", 4_683_073_184, 32768);
        qwen.arch = "qwen2".to_string();
        qwen.parameter_size = "7B".to_string();
        let mut llama = SimModel::chat("llama-3.2-3b-instruct", 2_019_377_696, 131072);
        llama.parameter_size = "3B".to_string();
        let embed = SimModel::embedding("text-embedding-nomic-embed-text-v1.5", 84_106_624, 2048);
        LmStudioConfig {
            models: vec![qwen, llama, embed],
            load_latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            reply_tokens: 8,
            jit: true,
            auto_evict: true,
            default_ttl: Duration::from_secs(60 * 60),
            default_context_length: 4096,
            api_key: None,
            overflow: Overflow::Error,
            embedding_dims: 8,
            single_loaded_model_quirk: false,
            clock: Clock::system(),
        }
    }
}

// === state ===

/// One loaded model instance.
#[derive(Clone, Debug)]
struct Instance {
    /// `key`, or `key:2`, `key:3`... for further instances of the same model.
    id: String,
    key: String,
    context_length: u32,
    /// Loaded just in time (subject to TTL and auto-evict).
    jit: bool,
    /// Idle TTL; `None` for manual loads.
    ttl: Option<Duration>,
    last_used: SystemTime,
    opts: LoadOpts,
}

/// Load options of `/api/v1/models/load` that are echoed back in the instance config.
#[derive(Clone, Copy, Debug)]
struct LoadOpts {
    eval_batch_size: u32,
    flash_attention: bool,
    offload_kv_cache_to_gpu: bool,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts {
            eval_batch_size: 512,
            flash_attention: true,
            offload_kv_cache_to_gpu: true,
        }
    }
}

/// Outcome of a load: the instance id, or the failure message. `None` while loading.
type LoadResult = Option<Result<String, String>>;

/// A JIT load in progress; later requests for the same model wait on it.
struct PendingLoad {
    context_length: u32,
    rx: watch::Receiver<LoadResult>,
}

#[derive(Default)]
struct State {
    /// Loaded instances in load order.
    instances: Vec<Instance>,
    load_counts: HashMap<String, usize>,
    pending: HashMap<String, PendingLoad>,
    fail_next_load: Option<String>,
    fail_stream_after: Option<usize>,
}

/// The simulator's shared state: call log, clock, loaded models and counters.
pub struct LmStudioSim {
    pub log: CallLog,
    pub clock: Clock,
    cfg: LmStudioConfig,
    state: Mutex<State>,
    active: AtomicUsize,
    cancelled: AtomicUsize,
}

impl LmStudioSim {
    fn new(cfg: LmStudioConfig) -> Self {
        LmStudioSim {
            log: CallLog::default(),
            clock: cfg.clock.clone(),
            cfg,
            state: Mutex::new(State::default()),
            active: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
        }
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &LmStudioConfig {
        &self.cfg
    }

    /// Instance ids currently loaded (load order), after TTL expiry at `clock.now()`.
    pub fn loaded(&self) -> Vec<String> {
        self.lock().instances.iter().map(|i| i.id.clone()).collect()
    }

    /// Context length of a loaded instance.
    pub fn loaded_context_length(&self, instance_id: &str) -> Option<u32> {
        self.lock()
            .instances
            .iter()
            .find(|i| i.id == instance_id)
            .map(|i| i.context_length)
    }

    /// Model keys with a JIT load in progress.
    pub fn loading(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock().pending.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// How many loads of `model` (a key) completed, JIT and manual.
    pub fn load_count(&self, model: &str) -> usize {
        self.lock().load_counts.get(model).copied().unwrap_or(0)
    }

    /// Generations in progress; drops when the client disconnects.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Generations stopped because the client went away.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The next load (JIT or manual) fails with `message`.
    pub fn fail_next_load(&self, message: &str) {
        self.lock().fail_next_load = Some(message.to_string());
    }

    /// The next streamed generation sends `chunks` token chunks, then an error event, and ends
    /// (no `[DONE]`, no `chat.end`).
    pub fn fail_next_stream_after(&self, chunks: usize) {
        self.lock().fail_stream_after = Some(chunks);
    }

    /// Locks the state and drops JIT instances whose idle TTL ran out at `clock.now()`.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now();
        st.instances.retain(|i| match i.ttl {
            Some(ttl) => now
                .duration_since(i.last_used)
                .map_or(true, |idle| idle < ttl),
            None => true,
        });
        st
    }

    /// The catalogue entry for a model key or an instance id (`key:2`).
    fn model_of(&self, name: &str) -> Option<&SimModel> {
        let by_key = |k: &str| self.cfg.models.iter().find(|m| m.name == k);
        by_key(name).or_else(|| {
            let (key, n) = name.rsplit_once(':')?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            by_key(key)
        })
    }

    fn context_for(&self, model: &SimModel, requested: Option<u32>) -> u32 {
        requested
            .unwrap_or(self.cfg.default_context_length)
            .min(model.context_length)
            .max(1)
    }

    /// Marks an instance as used now (resets its idle timer).
    fn touch(&self, instance_id: &str) {
        let now = self.clock.now();
        if let Some(i) = self
            .lock()
            .instances
            .iter_mut()
            .find(|i| i.id == instance_id)
        {
            i.last_used = now;
        }
    }

    /// Ends a load: registers the instance (evicting the previous JIT model when this is a JIT
    /// load with auto-evict) or reports the failure, in one critical section with the removal
    /// of the pending entry so no request sees the model neither loading nor loaded.
    fn finish_load(
        &self,
        key: &str,
        context_length: u32,
        jit_ttl: Option<Duration>,
        opts: LoadOpts,
        failure: Option<String>,
    ) -> Result<String, String> {
        let now = self.clock.now();
        let mut st = self.lock();
        if jit_ttl.is_some() {
            st.pending.remove(key);
        }
        if let Some(msg) = failure {
            return Err(msg);
        }
        if jit_ttl.is_some() && self.cfg.auto_evict {
            st.instances.retain(|i| !i.jit);
        }
        let id = next_instance_id(&st.instances, key);
        st.instances.push(Instance {
            id: id.clone(),
            key: key.to_string(),
            context_length,
            jit: jit_ttl.is_some(),
            ttl: jit_ttl,
            last_used: now,
            opts,
        });
        *st.load_counts.entry(key.to_string()).or_default() += 1;
        Ok(id)
    }

    /// Finds the instance for `model`, or the load to wait for (starting a JIT load when none
    /// is under way). Never waits itself.
    fn plan(
        self: &Arc<Self>,
        model: &str,
        ttl: Option<Duration>,
        ctx_req: Option<u32>,
    ) -> Result<Plan, Fail> {
        let now = self.clock.now();
        let mut st = self.lock();
        let found = st
            .instances
            .iter_mut()
            .find(|i| i.id == model)
            .map(|i| (i.id.clone(), i.context_length, &mut i.last_used));
        if let Some((instance, ctx, last_used)) = found {
            *last_used = now;
            return Ok(Plan::Ready { instance, ctx });
        }
        let Some(m) = self.cfg.models.iter().find(|m| m.name == model) else {
            return Err(Fail::ModelNotFound(model.to_string()));
        };
        if let Some(i) = st.instances.iter_mut().find(|i| i.key == model) {
            i.last_used = now;
            return Ok(Plan::Ready {
                instance: i.id.clone(),
                ctx: i.context_length,
            });
        }
        if let Some(p) = st.pending.get(model) {
            return Ok(Plan::Wait {
                instance: model.to_string(),
                ctx: p.context_length,
                rx: p.rx.clone(),
            });
        }
        if !self.cfg.jit {
            return Err(Fail::NotLoaded(model.to_string()));
        }
        let ctx = self.context_for(m, ctx_req);
        let (tx, rx) = watch::channel(None);
        st.pending.insert(
            model.to_string(),
            PendingLoad {
                context_length: ctx,
                rx: rx.clone(),
            },
        );
        let failure = st.fail_next_load.take();
        drop(st);
        // The load runs on its own task so that it completes even if the request that started
        // it goes away; every request for the model waits on the same result.
        let sim = self.clone();
        let key = model.to_string();
        let ttl = ttl.unwrap_or(self.cfg.default_ttl);
        tokio::spawn(async move {
            if !sim.cfg.load_latency.is_zero() {
                tokio::time::sleep(sim.cfg.load_latency).await;
            }
            let r = sim.finish_load(&key, ctx, Some(ttl), LoadOpts::default(), failure);
            let _ = tx.send(Some(r));
        });
        Ok(Plan::Wait {
            instance: model.to_string(),
            ctx,
            rx,
        })
    }

    /// `plan` plus the context check: the plan and the prompt token count to report.
    fn admit(
        self: &Arc<Self>,
        model: &str,
        ttl: Option<Duration>,
        ctx_req: Option<u32>,
        prompt_tokens: u32,
    ) -> Result<(Plan, u32), Fail> {
        let plan = self.plan(model, ttl, ctx_req)?;
        let ctx = plan.ctx();
        if prompt_tokens > ctx {
            return match self.cfg.overflow {
                Overflow::Error => Err(Fail::Overflow {
                    prompt: prompt_tokens,
                    ctx,
                }),
                Overflow::Silent => Ok((plan, ctx)),
            };
        }
        Ok((plan, prompt_tokens))
    }

    /// Waits for the plan's load, if any.
    async fn resolve(&self, model: &str, plan: Plan) -> Result<Resolved, Fail> {
        match plan {
            Plan::Ready { instance, ctx } => Ok(Resolved {
                instance,
                ctx,
                load_time: None,
            }),
            Plan::Wait { ctx, mut rx, .. } => {
                let outcome = rx.wait_for(|r| r.is_some()).await.map(|r| r.clone());
                match outcome {
                    Ok(Some(Ok(instance))) => Ok(Resolved {
                        instance,
                        ctx,
                        load_time: Some(self.cfg.load_latency),
                    }),
                    Ok(Some(Err(msg))) => Err(Fail::LoadFailed(model.to_string(), msg)),
                    _ => Err(Fail::LoadFailed(
                        model.to_string(),
                        "the load was aborted".to_string(),
                    )),
                }
            }
        }
    }

    /// Reply length and finish reason for a `max_tokens`-style limit (`-1` = unlimited).
    fn reply_len(&self, max: Option<i64>) -> (usize, bool) {
        match max {
            Some(m) if m >= 0 && (m as u64) < self.cfg.reply_tokens as u64 => (m as usize, true),
            _ => (self.cfg.reply_tokens, false),
        }
    }

    fn tokens_per_second(&self) -> f64 {
        if self.cfg.token_delay.is_zero() {
            1000.0
        } else {
            round3(1.0 / self.cfg.token_delay.as_secs_f64())
        }
    }

    fn take_stream_failure(&self) -> Option<usize> {
        self.lock().fail_stream_after.take()
    }

    /// Sleeps through a non-streamed generation of `n` tokens, counted as active.
    async fn generate(self: &Arc<Self>, n: usize) {
        let mut guard = GenGuard::start(self.clone());
        if !self.cfg.token_delay.is_zero() {
            for _ in 0..n {
                tokio::time::sleep(self.cfg.token_delay).await;
            }
        }
        guard.done = true;
    }

    /// Streams `tokens` (one `token_delay` before each), then `tail`; stops when the client
    /// goes away, or sends `error` after `fail_after` tokens and ends.
    async fn pump(
        self: &Arc<Self>,
        tx: &mpsc::Sender<Bytes>,
        tokens: Vec<Bytes>,
        tail: Vec<Bytes>,
        error: Bytes,
        fail_after: Option<usize>,
    ) {
        let mut guard = GenGuard::start(self.clone());
        for (i, token) in tokens.into_iter().enumerate() {
            if fail_after == Some(i) {
                guard.done = true;
                let _ = tx.send(error).await;
                return;
            }
            if !self.cfg.token_delay.is_zero() {
                tokio::time::sleep(self.cfg.token_delay).await;
            }
            if tx.send(token).await.is_err() {
                return;
            }
        }
        guard.done = true;
        if fail_after.is_some() {
            let _ = tx.send(error).await;
            return;
        }
        for b in tail {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    }
}

/// Counts a generation as active; on drop before `done`, counts it as cancelled.
struct GenGuard {
    sim: Arc<LmStudioSim>,
    done: bool,
}

impl GenGuard {
    fn start(sim: Arc<LmStudioSim>) -> Self {
        sim.active.fetch_add(1, Ordering::SeqCst);
        GenGuard { sim, done: false }
    }
}

impl Drop for GenGuard {
    fn drop(&mut self) {
        self.sim.active.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.sim.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn next_instance_id(instances: &[Instance], key: &str) -> String {
    let taken = |id: &str| instances.iter().any(|i| i.id == id);
    if !taken(key) {
        return key.to_string();
    }
    (2..)
        .map(|n| format!("{key}:{n}"))
        .find(|id| !taken(id))
        .unwrap_or_else(|| key.to_string())
}

enum Plan {
    Ready {
        instance: String,
        ctx: u32,
    },
    Wait {
        /// The id the instance will get (the key: a JIT load only happens when none is loaded).
        instance: String,
        ctx: u32,
        rx: watch::Receiver<LoadResult>,
    },
}

impl Plan {
    fn ctx(&self) -> u32 {
        match self {
            Plan::Ready { ctx, .. } | Plan::Wait { ctx, .. } => *ctx,
        }
    }

    fn instance(&self) -> &str {
        match self {
            Plan::Ready { instance, .. } | Plan::Wait { instance, .. } => instance,
        }
    }
}

struct Resolved {
    instance: String,
    ctx: u32,
    /// `Some` when the request had to wait for a load.
    load_time: Option<Duration>,
}

// === errors ===

/// Which error body shape a route uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// `/v1/*`: OpenAI shape.
    OpenAi,
    /// `/api/v0/*`: OpenAI shape, richer bodies.
    V0,
    /// `/api/v1/*`: `{"error":{"type","message"}}`.
    Native,
}

enum Fail {
    BadRequest(String, Option<&'static str>),
    ModelNotFound(String),
    NotLoaded(String),
    WrongType(String),
    Overflow { prompt: u32, ctx: u32 },
    LoadFailed(String, String),
}

#[derive(Serialize)]
struct OaiError<'a> {
    error: OaiErrorBody<'a>,
}

#[derive(Serialize)]
struct OaiErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct NativeError<'a> {
    error: NativeErrorBody<'a>,
}

#[derive(Serialize)]
struct NativeErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

impl Fail {
    /// Status, message, OpenAI `type`, `param`, `code`, and the native `type`.
    fn parts(
        &self,
    ) -> (
        StatusCode,
        String,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
    ) {
        match self {
            Fail::BadRequest(msg, param) => (
                StatusCode::BAD_REQUEST,
                msg.clone(),
                "invalid_request_error",
                *param,
                None,
                "invalid_request",
            ),
            Fail::ModelNotFound(m) => (
                StatusCode::NOT_FOUND,
                format!("Model \"{m}\" not found. Please specify a valid model."),
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
                "model_not_found",
            ),
            Fail::NotLoaded(m) => (
                StatusCode::NOT_FOUND,
                format!(
                    "Model \"{m}\" is not loaded and JIT model loading is disabled. \
                     Load the model first."
                ),
                "invalid_request_error",
                Some("model"),
                Some("model_not_loaded"),
                "model_not_found",
            ),
            Fail::WrongType(msg) => (
                StatusCode::BAD_REQUEST,
                msg.clone(),
                "invalid_request_error",
                Some("model"),
                None,
                "invalid_request",
            ),
            Fail::Overflow { prompt, ctx } => (
                StatusCode::BAD_REQUEST,
                format!(
                    "Trying to keep the first {prompt} tokens when context the overflows. \
                     However, the model is loaded with context length of only {ctx} tokens, \
                     which is not enough. Try to load the model with a larger context length, \
                     or provide a shorter input"
                ),
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
                "invalid_request",
            ),
            Fail::LoadFailed(m, msg) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Failed to load model \"{m}\". Error: {msg}"),
                "server_error",
                Some("model"),
                Some("model_load_failed"),
                "internal_error",
            ),
        }
    }

    fn response(&self, api: Api) -> Response<SimBody> {
        let (status, message, kind, param, code, native) = self.parts();
        match api {
            Api::OpenAi | Api::V0 => json(
                status,
                &OaiError {
                    error: OaiErrorBody {
                        message: &message,
                        kind,
                        param,
                        code,
                    },
                },
            ),
            Api::Native => json(
                status,
                &NativeError {
                    error: NativeErrorBody {
                        kind: native,
                        message: &message,
                    },
                },
            ),
        }
    }
}

// === wire shapes (field order is key order) ===

#[derive(Serialize)]
struct Greeting {
    lmstudio: bool,
}

#[derive(Serialize)]
struct UnknownEndpoint {
    error: String,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl Usage {
    fn new(prompt: u32, completion: u32) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    logprobs: (),
    finish_reason: &'a str,
    message: ChatMessage<'a>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: (),
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct V0Stats {
    tokens_per_second: f64,
    time_to_first_token: f64,
    generation_time: f64,
    stop_reason: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum StatsField {
    Empty(Empty),
    V0(V0Stats),
}

#[derive(Serialize)]
struct ModelInfo<'a> {
    arch: &'a str,
    quant: &'a str,
    format: &'static str,
    context_length: u32,
}

#[derive(Serialize)]
struct RuntimeInfo {
    name: &'static str,
    version: &'static str,
    supported_formats: [&'static str; 1],
}

const RUNTIME: RuntimeInfo = RuntimeInfo {
    name: "llama.cpp-linux-x86_64-avx2",
    version: "1.3.0",
    supported_formats: ["gguf"],
};

/// A non-streamed `/v1` or `/api/v0` chat or text completion.
#[derive(Serialize)]
struct Completion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    usage: Usage,
    stats: StatsField,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_info: Option<ModelInfo<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<RuntimeInfo>,
    system_fingerprint: &'a str,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct DeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: (),
    finish_reason: Option<&'a str>,
}

/// One streamed chunk.
#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    embedding: Vec<f32>,
    index: usize,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

#[derive(Serialize)]
struct OaiModelList<'a> {
    data: Vec<OaiModel<'a>>,
    object: &'static str,
}

#[derive(Serialize)]
struct OaiModel<'a> {
    id: &'a str,
    object: &'static str,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct V0ModelList<'a> {
    object: &'static str,
    data: Vec<V0Model<'a>>,
}

#[derive(Serialize)]
struct V0Model<'a> {
    id: &'a str,
    object: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    publisher: &'a str,
    arch: &'a str,
    compatibility_type: &'static str,
    quantization: &'a str,
    state: &'static str,
    max_context_length: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded_context_length: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    capabilities: Vec<&'static str>,
}

#[derive(Serialize)]
struct V1ModelList<'a> {
    models: Vec<V1Model<'a>>,
}

#[derive(Serialize)]
struct V1Model<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    publisher: &'a str,
    key: &'a str,
    display_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    architecture: Option<&'a str>,
    quantization: Quantization<'a>,
    size_bytes: u64,
    params_string: &'a str,
    loaded_instances: Vec<LoadedInstance>,
    max_context_length: u32,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    capabilities: Option<Capabilities>,
    description: Option<&'a str>,
}

#[derive(Serialize)]
struct Quantization<'a> {
    name: &'a str,
    bits_per_weight: u32,
}

#[derive(Serialize)]
struct Capabilities {
    vision: bool,
    trained_for_tool_use: bool,
}

#[derive(Serialize)]
struct LoadedInstance {
    id: String,
    config: InstanceConfig,
}

#[derive(Serialize)]
struct InstanceConfig {
    context_length: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_batch_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flash_attention: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offload_kv_cache_to_gpu: Option<bool>,
}

impl InstanceConfig {
    fn of(model: &SimModel, context_length: u32, opts: LoadOpts) -> Self {
        if model.embedding {
            InstanceConfig {
                context_length,
                eval_batch_size: None,
                parallel: None,
                flash_attention: None,
                offload_kv_cache_to_gpu: None,
            }
        } else {
            InstanceConfig {
                context_length,
                eval_batch_size: Some(opts.eval_batch_size),
                parallel: Some(4),
                flash_attention: Some(opts.flash_attention),
                offload_kv_cache_to_gpu: Some(opts.offload_kv_cache_to_gpu),
            }
        }
    }
}

#[derive(Serialize)]
struct LoadResponse<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    instance_id: &'a str,
    load_time_seconds: f64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_config: Option<InstanceConfig>,
}

#[derive(Serialize)]
struct UnloadResponse<'a> {
    instance_id: &'a str,
}

/// The `/api/v1/chat` result (non-stream body and `chat.end.result`).
#[derive(Serialize)]
struct V1ChatResult<'a> {
    model_instance_id: &'a str,
    output: [OutputItem<'a>; 1],
    stats: V1ChatStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_id: Option<String>,
}

#[derive(Serialize)]
struct OutputItem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct V1ChatStats {
    input_tokens: u32,
    total_output_tokens: u32,
    reasoning_output_tokens: u32,
    tokens_per_second: f64,
    time_to_first_token_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_load_time_seconds: Option<f64>,
}

/// The `data` of one `/api/v1/chat` stream event.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_instance_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_time_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a V1ChatResult<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<NativeErrorBody<'a>>,
}

impl<'a> Event<'a> {
    fn new(kind: &'static str) -> Self {
        Event {
            kind,
            model_instance_id: None,
            progress: None,
            load_time_seconds: None,
            content: None,
            result: None,
            error: None,
        }
    }

    /// `event: <type>\ndata: <json>\n\n`.
    fn sse(&self) -> Bytes {
        let mut out = format!("event: {}\ndata: ", self.kind).into_bytes();
        out.extend_from_slice(&to_json(self));
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

// === encoding helpers ===

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<SimBody> {
    respond(status, JSON, to_json(v))
}

/// `data: <json>\n\n`.
fn sse_data<T: Serialize>(v: &T) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&to_json(v));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn sse_response(body: SimBody) -> Response<SimBody> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SSE));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Seconds rounded to milliseconds, as LM Studio reports timings.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn secs(d: Duration) -> f64 {
    round3(d.as_secs_f64())
}

/// The publisher part of a `publisher/name` key.
fn publisher(key: &str) -> &str {
    key.split_once('/').map_or("lmstudio-community", |(p, _)| p)
}

/// `qwen2.5-7b-instruct` → `Qwen2.5 7B Instruct`.
fn display_name(key: &str) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.split(['-', '_'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let size = w.len() > 1
                && w.ends_with(['b', 'm'])
                && w[..w.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.');
            if size {
                return w.to_ascii_uppercase();
            }
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bits per weight of a quantization name: `Q4_K_M` → 4, `F16` → 16.
fn bits_per_weight(quant: &str) -> u32 {
    let digits: String = quant
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(16)
}

/// Text of a message `content`: a string, or the `text` of content parts.
fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| {
                p.get("text")
                    .or_else(|| p.get("content"))
                    .and_then(Value::as_str)
            })
            .collect(),
        _ => String::new(),
    }
}

/// Prompt tokens of a message list: each message's content plus 4 tokens of template.
fn message_tokens(messages: &[Value]) -> u32 {
    messages
        .iter()
        .map(|m| count_tokens(&content_text(m.get("content"))) + 4)
        .sum()
}

fn parse_body(call: &Call) -> Result<serde_json::Map<String, Value>, Fail> {
    if call.body.is_empty() {
        return Err(Fail::BadRequest(
            "Request body is empty; expected a JSON object.".to_string(),
            None,
        ));
    }
    match serde_json::from_slice::<Value>(&call.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Fail::BadRequest(
            "Request body must be a JSON object.".to_string(),
            None,
        )),
        Err(e) => Err(Fail::BadRequest(
            format!("Invalid JSON in request body: {e}"),
            None,
        )),
    }
}

fn required_model(body: &serde_json::Map<String, Value>) -> Result<String, Fail> {
    match body.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => Ok(m.to_string()),
        _ => Err(Fail::BadRequest(
            "'model' is required and must be a string.".to_string(),
            Some("model"),
        )),
    }
}

/// `ttl` in seconds (positive), as a duration.
fn ttl_of(body: &serde_json::Map<String, Value>) -> Option<Duration> {
    body.get("ttl")
        .and_then(Value::as_f64)
        .filter(|t| *t > 0.0 && t.is_finite())
        .map(Duration::from_secs_f64)
}

fn u32_of(body: &serde_json::Map<String, Value>, key: &str) -> Option<u32> {
    body.get(key)
        .and_then(Value::as_u64)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

fn is_stream(body: &serde_json::Map<String, Value>) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

fn include_usage(body: &serde_json::Map<String, Value>) -> bool {
    body.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn max_tokens(body: &serde_json::Map<String, Value>, keys: &[&str]) -> Option<i64> {
    keys.iter()
        .find_map(|k| body.get(*k).and_then(Value::as_i64))
}

fn stream_error(message: &str) -> Bytes {
    sse_data(&OaiError {
        error: OaiErrorBody {
            message,
            kind: "server_error",
            param: None,
            code: None,
        },
    })
}

const SIMULATED_FAILURE: &str = "The model crashed during generation (simulated failure).";

// === server ===

/// Starts the simulator on `listener` (call inside a tokio runtime).
pub fn spawn(cfg: LmStudioConfig, listener: TcpListener) -> SimServer<LmStudioSim> {
    serve(listener, Arc::new(LmStudioSim::new(cfg)), handle)
}

/// Binds `addr` (e.g. `127.0.0.1:1234`, or port 0) and starts the simulator.
pub async fn bind(cfg: LmStudioConfig, addr: &str) -> std::io::Result<SimServer<LmStudioSim>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(spawn(cfg, listener))
}

async fn handle(sim: Arc<LmStudioSim>, req: Request<Incoming>) -> Response<SimBody> {
    let (call, on_upgrade) = record(req, &sim.log).await;
    if let Some(key) = &sim.cfg.api_key {
        let expected = format!("Bearer {key}");
        let ok = call
            .headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !ok {
            let body = OaiError {
                error: OaiErrorBody {
                    message: "Invalid or missing API token. Provide a valid token in the \
                              Authorization header as 'Bearer <token>'.",
                    kind: "invalid_request_error",
                    param: None,
                    code: Some("invalid_api_key"),
                },
            };
            return json(StatusCode::UNAUTHORIZED, &body);
        }
    }
    if call.method == Method::GET
        && WS_NAMESPACES.contains(&call.path.as_str())
        && is_websocket_upgrade(&call)
    {
        return websocket(&call, on_upgrade);
    }
    let result = match (&call.method, call.path.as_str()) {
        (&Method::GET, "/lmstudio-greeting") => {
            Ok(json(StatusCode::OK, &Greeting { lmstudio: true }))
        }
        (&Method::GET, "/v1/models") => Ok(sim.openai_models()),
        (&Method::POST, "/v1/chat/completions") => sim.chat(&call, Api::OpenAi).await,
        (&Method::POST, "/api/v0/chat/completions") => sim.chat(&call, Api::V0).await,
        (&Method::POST, "/v1/completions") => sim.completions(&call, Api::OpenAi).await,
        (&Method::POST, "/api/v0/completions") => sim.completions(&call, Api::V0).await,
        (&Method::POST, "/v1/embeddings") => sim.embeddings(&call, Api::OpenAi).await,
        (&Method::POST, "/api/v0/embeddings") => sim.embeddings(&call, Api::V0).await,
        (&Method::GET, "/api/v0/models") => Ok(sim.v0_models()),
        (&Method::GET, p) if p.starts_with("/api/v0/models/") => {
            Ok(sim.v0_model(&p["/api/v0/models/".len()..]))
        }
        (&Method::GET, "/api/v1/models") => Ok(sim.v1_models()),
        (&Method::POST, "/api/v1/models/load") => sim.v1_load(&call).await,
        (&Method::POST, "/api/v1/models/unload") => Ok(sim.v1_unload(&call)),
        (&Method::POST, "/api/v1/chat") => sim.v1_chat(&call).await,
        _ => Ok(json(
            StatusCode::NOT_FOUND,
            &UnknownEndpoint {
                error: format!(
                    "Unexpected endpoint or method. ({} {})",
                    call.method, call.path
                ),
            },
        )),
    };
    result.unwrap_or_else(|r| r)
}

type Handled = Result<Response<SimBody>, Response<SimBody>>;

fn is_websocket_upgrade(call: &Call) -> bool {
    call.headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Accepts a WebSocket upgrade and echoes every message on the upgraded connection.
fn websocket(call: &Call, on_upgrade: hyper::upgrade::OnUpgrade) -> Response<SimBody> {
    let Some(key) = call.headers.get(header::SEC_WEBSOCKET_KEY) else {
        return json(
            StatusCode::BAD_REQUEST,
            &UnknownEndpoint {
                error: "Missing Sec-WebSocket-Key header".to_string(),
            },
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, "", Bytes::new());
    };
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let sent = match msg {
                Message::Text(_) | Message::Binary(_) => ws.send(msg).await,
                // Pongs to pings and the close reply are queued by tungstenite; flush them.
                Message::Ping(_) | Message::Close(_) => ws.flush().await,
                Message::Pong(_) | Message::Frame(_) => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

impl LmStudioSim {
    // --- model lists ---

    fn openai_models(&self) -> Response<SimBody> {
        let st = self.lock();
        let mut data = Vec::new();
        for m in &self.cfg.models {
            let instances = st.instances.iter().filter(|i| i.key == m.name);
            if self.cfg.jit {
                data.push(OaiModel {
                    id: &m.name,
                    object: "model",
                    owned_by: "organization_owner",
                });
                data.extend(instances.filter(|i| i.id != m.name).map(|i| OaiModel {
                    id: &i.id,
                    object: "model",
                    owned_by: "organization_owner",
                }));
            } else {
                data.extend(instances.map(|i| OaiModel {
                    id: &i.id,
                    object: "model",
                    owned_by: "organization_owner",
                }));
            }
        }
        let body = to_json(&OaiModelList {
            data,
            object: "list",
        });
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    fn v0_entry<'a>(&self, st: &State, m: &'a SimModel) -> V0Model<'a> {
        let loaded = st.instances.iter().find(|i| i.key == m.name);
        V0Model {
            id: &m.name,
            object: "model",
            kind: if m.embedding { "embeddings" } else { "llm" },
            publisher: publisher(&m.name),
            arch: &m.arch,
            compatibility_type: "gguf",
            quantization: &m.quantization,
            state: if loaded.is_some() {
                "loaded"
            } else {
                "not-loaded"
            },
            max_context_length: m.context_length,
            loaded_context_length: loaded.map(|i| i.context_length),
            capabilities: if m.embedding {
                Vec::new()
            } else {
                vec!["tool_use"]
            },
        }
    }

    fn v0_models(&self) -> Response<SimBody> {
        let st = self.lock();
        let data = self
            .cfg
            .models
            .iter()
            .map(|m| self.v0_entry(&st, m))
            .collect();
        let body = to_json(&V0ModelList {
            object: "list",
            data,
        });
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    fn v0_model(&self, name: &str) -> Response<SimBody> {
        let Some(m) = self.cfg.models.iter().find(|m| m.name == name) else {
            return Fail::ModelNotFound(name.to_string()).response(Api::V0);
        };
        let st = self.lock();
        let body = to_json(&self.v0_entry(&st, m));
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    fn v1_models(&self) -> Response<SimBody> {
        let st = self.lock();
        let models = self
            .cfg
            .models
            .iter()
            .map(|m| V1Model {
                kind: if m.embedding { "embedding" } else { "llm" },
                publisher: publisher(&m.name),
                key: &m.name,
                display_name: display_name(&m.name),
                architecture: (!m.embedding).then_some(m.arch.as_str()),
                quantization: Quantization {
                    name: &m.quantization,
                    bits_per_weight: bits_per_weight(&m.quantization),
                },
                size_bytes: m.size_bytes,
                params_string: &m.parameter_size,
                loaded_instances: st
                    .instances
                    .iter()
                    .filter(|i| i.key == m.name)
                    .map(|i| LoadedInstance {
                        id: i.id.clone(),
                        config: InstanceConfig::of(m, i.context_length, i.opts),
                    })
                    .collect(),
                max_context_length: m.context_length,
                format: "gguf",
                capabilities: (!m.embedding).then_some(Capabilities {
                    vision: false,
                    trained_for_tool_use: true,
                }),
                description: None,
            })
            .collect();
        let body = to_json(&V1ModelList { models });
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    // --- load / unload ---

    async fn v1_load(self: &Arc<Self>, call: &Call) -> Handled {
        let api = Api::Native;
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let key = required_model(&body).map_err(|f| f.response(api))?;
        let Some(m) = self.cfg.models.iter().find(|m| m.name == key) else {
            return Err(Fail::ModelNotFound(key).response(api));
        };
        let ctx = self.context_for(m, u32_of(&body, "context_length"));
        let defaults = LoadOpts::default();
        let opts = LoadOpts {
            eval_batch_size: u32_of(&body, "eval_batch_size").unwrap_or(defaults.eval_batch_size),
            flash_attention: body
                .get("flash_attention")
                .and_then(Value::as_bool)
                .unwrap_or(defaults.flash_attention),
            offload_kv_cache_to_gpu: body
                .get("offload_kv_cache_to_gpu")
                .and_then(Value::as_bool)
                .unwrap_or(defaults.offload_kv_cache_to_gpu),
        };
        let echo = body
            .get("echo_load_config")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let failure = self.lock().fail_next_load.take();
        if !self.cfg.load_latency.is_zero() {
            tokio::time::sleep(self.cfg.load_latency).await;
        }
        let id = self
            .finish_load(&key, ctx, None, opts, failure)
            .map_err(|msg| Fail::LoadFailed(key.clone(), msg).response(api))?;
        Ok(json(
            StatusCode::OK,
            &LoadResponse {
                kind: if m.embedding { "embedding" } else { "llm" },
                instance_id: &id,
                load_time_seconds: secs(self.cfg.load_latency),
                status: "loaded",
                load_config: echo.then(|| InstanceConfig::of(m, ctx, opts)),
            },
        ))
    }

    fn v1_unload(&self, call: &Call) -> Response<SimBody> {
        let api = Api::Native;
        let body = match parse_body(call) {
            Ok(b) => b,
            Err(f) => return f.response(api),
        };
        let Some(id) = body
            .get("instance_id")
            .or_else(|| body.get("model_instance_id"))
            .and_then(Value::as_str)
        else {
            return Fail::BadRequest(
                "'instance_id' is required and must be a string.".to_string(),
                Some("instance_id"),
            )
            .response(api);
        };
        let removed = {
            let mut st = self.lock();
            let before = st.instances.len();
            st.instances.retain(|i| i.id != id);
            st.instances.len() != before
        };
        if !removed {
            let message = format!("No loaded model instance with id \"{id}\".");
            return json(
                StatusCode::NOT_FOUND,
                &NativeError {
                    error: NativeErrorBody {
                        kind: "model_not_found",
                        message: &message,
                    },
                },
            );
        }
        json(StatusCode::OK, &UnloadResponse { instance_id: id })
    }

    // --- generation routes ---

    /// Rejects an embedding model on a generation route and vice versa.
    fn check_kind(&self, model: &str, want_embedding: bool) -> Result<(), Fail> {
        match self.model_of(model) {
            Some(m) if m.embedding && !want_embedding => Err(Fail::WrongType(format!(
                "Model \"{model}\" is an embedding model and cannot be used for text generation."
            ))),
            Some(m) if !m.embedding && want_embedding => Err(Fail::WrongType(format!(
                "Model \"{model}\" is not an embedding model."
            ))),
            _ => Ok(()),
        }
    }

    fn model_info<'a>(&'a self, instance: &str, ctx: u32) -> Option<ModelInfo<'a>> {
        self.model_of(instance).map(|m| ModelInfo {
            arch: &m.arch,
            quant: &m.quantization,
            format: "gguf",
            context_length: ctx,
        })
    }

    fn v0_extras<'a>(
        &'a self,
        api: Api,
        instance: &str,
        ctx: u32,
        n: usize,
        capped: bool,
    ) -> (StatsField, Option<ModelInfo<'a>>, Option<RuntimeInfo>) {
        if api != Api::V0 {
            return (StatsField::Empty(Empty {}), None, None);
        }
        let delay = self.cfg.token_delay;
        let stats = V0Stats {
            tokens_per_second: self.tokens_per_second(),
            time_to_first_token: secs(delay),
            generation_time: secs(delay.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))),
            stop_reason: if capped {
                "maxPredictedTokensReached"
            } else {
                "eosFound"
            },
        };
        (
            StatsField::V0(stats),
            self.model_info(instance, ctx),
            Some(RUNTIME),
        )
    }

    /// The model a `/v1` or `/api/v0` request is served by: the requested one, or the only
    /// loaded instance under `single_loaded_model_quirk`.
    fn openai_model(&self, requested: String) -> String {
        if !self.cfg.single_loaded_model_quirk || self.model_of(&requested).is_some() {
            return requested;
        }
        let st = self.lock();
        match st.instances.as_slice() {
            [only] => only.id.clone(),
            _ => requested,
        }
    }

    async fn chat(self: &Arc<Self>, call: &Call, api: Api) -> Handled {
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let model = required_model(&body).map_err(|f| f.response(api))?;
        let model = self.openai_model(model);
        let messages = match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => m,
            Some(Value::Array(_)) => {
                return Err(Fail::BadRequest(
                    "'messages' must contain at least one message.".to_string(),
                    Some("messages"),
                )
                .response(api))
            }
            _ => {
                return Err(Fail::BadRequest(
                    "'messages' is required and must be an array.".to_string(),
                    Some("messages"),
                )
                .response(api))
            }
        };
        self.check_kind(&model, false)
            .map_err(|f| f.response(api))?;
        let (plan, prompt) = self
            .admit(&model, ttl_of(&body), None, message_tokens(messages))
            .map_err(|f| f.response(api))?;
        let r = self
            .resolve(&model, plan)
            .await
            .map_err(|f| f.response(api))?;
        let seed = hash_bytes(&call.body);
        let id = format!("chatcmpl-{}", alnum_id(seed, 21));
        let created = self.clock.unix_secs();
        let (n, capped) =
            self.reply_len(max_tokens(&body, &["max_tokens", "max_completion_tokens"]));
        let pieces = reply_pieces(seed, n);
        let finish = if capped { "length" } else { "stop" };
        let usage = Usage::new(prompt, n as u32);
        let model_id = r.instance.as_str();

        if !is_stream(&body) {
            self.generate(n).await;
            self.touch(&r.instance);
            let content = pieces.concat();
            let (stats, model_info, runtime) = self.v0_extras(api, model_id, r.ctx, n, capped);
            return Ok(json(
                StatusCode::OK,
                &Completion {
                    id: &id,
                    object: "chat.completion",
                    created,
                    model: model_id,
                    choices: [ChatChoice {
                        index: 0,
                        logprobs: (),
                        finish_reason: finish,
                        message: ChatMessage {
                            role: "assistant",
                            content: &content,
                        },
                    }],
                    usage,
                    stats,
                    model_info,
                    runtime,
                    system_fingerprint: model_id,
                },
            ));
        }

        let chunk = |choices: Vec<DeltaChoice<'_>>, usage: Option<Usage>| {
            sse_data(&Chunk {
                id: &id,
                object: "chat.completion.chunk",
                created,
                model: model_id,
                system_fingerprint: model_id,
                choices,
                usage,
            })
        };
        let delta = |role: Option<&'static str>, content: &str, finish: Option<&str>| {
            chunk(
                vec![DeltaChoice {
                    index: 0,
                    delta: Delta {
                        role,
                        content: if finish.is_some() {
                            None
                        } else {
                            Some(content)
                        },
                    },
                    logprobs: (),
                    finish_reason: finish,
                }],
                None,
            )
        };
        let mut tokens: Vec<Bytes> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| delta((i == 0).then_some("assistant"), p, None))
            .collect();
        if tokens.is_empty() {
            tokens.push(delta(Some("assistant"), "", None));
        }
        let mut tail = vec![delta(None, "", Some(finish))];
        if include_usage(&body) {
            tail.push(chunk(Vec::new(), Some(usage)));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Ok(self.stream(tokens, tail, stream_error(SIMULATED_FAILURE), r.instance))
    }

    /// Spawns the generation of a prepared `/v1`-style stream and returns its response.
    fn stream(
        self: &Arc<Self>,
        tokens: Vec<Bytes>,
        tail: Vec<Bytes>,
        error: Bytes,
        instance: String,
    ) -> Response<SimBody> {
        let (tx, body) = channel_body();
        let fail_after = self.take_stream_failure();
        let sim = self.clone();
        tokio::spawn(async move {
            sim.pump(&tx, tokens, tail, error, fail_after).await;
            sim.touch(&instance);
        });
        sse_response(body)
    }

    async fn completions(self: &Arc<Self>, call: &Call, api: Api) -> Handled {
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let model = required_model(&body).map_err(|f| f.response(api))?;
        let model = self.openai_model(model);
        let prompt_text = match body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
            _ => {
                return Err(Fail::BadRequest(
                    "'prompt' is required and must be a string.".to_string(),
                    Some("prompt"),
                )
                .response(api))
            }
        };
        self.check_kind(&model, false)
            .map_err(|f| f.response(api))?;
        let (plan, prompt) = self
            .admit(&model, ttl_of(&body), None, count_tokens(&prompt_text))
            .map_err(|f| f.response(api))?;
        let r = self
            .resolve(&model, plan)
            .await
            .map_err(|f| f.response(api))?;
        let seed = hash_bytes(&call.body);
        let id = format!("cmpl-{}", alnum_id(seed, 21));
        let created = self.clock.unix_secs();
        let (n, capped) = self.reply_len(max_tokens(&body, &["max_tokens"]));
        let pieces = reply_pieces(seed, n);
        let finish = if capped { "length" } else { "stop" };
        let usage = Usage::new(prompt, n as u32);
        let model_id = r.instance.as_str();

        if !is_stream(&body) {
            self.generate(n).await;
            self.touch(&r.instance);
            let text = pieces.concat();
            let (stats, model_info, runtime) = self.v0_extras(api, model_id, r.ctx, n, capped);
            return Ok(json(
                StatusCode::OK,
                &Completion {
                    id: &id,
                    object: "text_completion",
                    created,
                    model: model_id,
                    choices: [TextChoice {
                        index: 0,
                        text: &text,
                        logprobs: (),
                        finish_reason: Some(finish),
                    }],
                    usage,
                    stats,
                    model_info,
                    runtime,
                    system_fingerprint: model_id,
                },
            ));
        }

        let chunk = |text: &str, finish: Option<&str>, usage: Option<Usage>| {
            let choices = if usage.is_some() {
                Vec::new()
            } else {
                vec![TextChoice {
                    index: 0,
                    text,
                    logprobs: (),
                    finish_reason: finish,
                }]
            };
            sse_data(&Chunk {
                id: &id,
                object: "text_completion",
                created,
                model: model_id,
                system_fingerprint: model_id,
                choices,
                usage,
            })
        };
        let tokens: Vec<Bytes> = pieces.iter().map(|p| chunk(p, None, None)).collect();
        let mut tail = vec![chunk("", Some(finish), None)];
        if include_usage(&body) {
            tail.push(chunk("", None, Some(usage)));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Ok(self.stream(tokens, tail, stream_error(SIMULATED_FAILURE), r.instance))
    }

    async fn embeddings(self: &Arc<Self>, call: &Call, api: Api) -> Handled {
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let model = required_model(&body).map_err(|f| f.response(api))?;
        let model = self.openai_model(model);
        let inputs: Vec<String> = match body.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Fail::BadRequest(
                        "'input' must be a string or an array of strings.".to_string(),
                        Some("input"),
                    )
                    .response(api)
                })?,
            _ => {
                return Err(Fail::BadRequest(
                    "'input' is required and must be a string or a non-empty array of strings."
                        .to_string(),
                    Some("input"),
                )
                .response(api))
            }
        };
        self.check_kind(&model, true).map_err(|f| f.response(api))?;
        let (plan, _) = self
            .admit(&model, ttl_of(&body), None, 0)
            .map_err(|f| f.response(api))?;
        let r = self
            .resolve(&model, plan)
            .await
            .map_err(|f| f.response(api))?;
        self.touch(&r.instance);
        let tokens: u32 = inputs.iter().map(|s| count_tokens(s)).sum();
        let data = inputs
            .iter()
            .enumerate()
            .map(|(index, s)| EmbeddingItem {
                object: "embedding",
                embedding: embedding(s, self.cfg.embedding_dims),
                index,
            })
            .collect();
        Ok(json(
            StatusCode::OK,
            &EmbeddingList {
                object: "list",
                data,
                model: &r.instance,
                usage: EmbeddingUsage {
                    prompt_tokens: tokens,
                    total_tokens: tokens,
                },
            },
        ))
    }

    // --- /api/v1/chat ---

    async fn v1_chat(self: &Arc<Self>, call: &Call) -> Handled {
        let api = Api::Native;
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let model = required_model(&body).map_err(|f| f.response(api))?;
        let input = match body.get("input") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .filter(|i| i.get("type").and_then(Value::as_str) != Some("image"))
                .map(|i| content_text(i.get("content")))
                .collect(),
            _ => {
                return Err(Fail::BadRequest(
                    "'input' is required and must be a string or an array.".to_string(),
                    Some("input"),
                )
                .response(api))
            }
        };
        let system = body.get("system_prompt").and_then(Value::as_str);
        let prompt_tokens = count_tokens(&input) + 4 + system.map_or(0, |s| count_tokens(s) + 4);
        self.check_kind(&model, false)
            .map_err(|f| f.response(api))?;
        let (plan, prompt) = self
            .admit(
                &model,
                ttl_of(&body),
                u32_of(&body, "context_length"),
                prompt_tokens,
            )
            .map_err(|f| f.response(api))?;
        let seed = hash_bytes(&call.body);
        let (n, _) = self.reply_len(max_tokens(&body, &["max_output_tokens"]));
        let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
        let gen = V1Gen {
            prompt,
            pieces: reply_pieces(seed, n),
            response_id: store.then(|| format!("resp_{}", alnum_id(seed.rotate_left(29), 21))),
        };

        if !is_stream(&body) {
            let r = self
                .resolve(&model, plan)
                .await
                .map_err(|f| f.response(api))?;
            self.generate(n).await;
            self.touch(&r.instance);
            let content = gen.pieces.concat();
            return Ok(json(StatusCode::OK, &self.v1_result(&gen, &r, &content)));
        }

        let (tx, resp_body) = channel_body();
        let fail_after = self.take_stream_failure();
        let sim = self.clone();
        tokio::spawn(async move {
            sim.v1_chat_stream(tx, model, plan, gen, fail_after).await;
        });
        Ok(sse_response(resp_body))
    }

    fn v1_result<'a>(&self, gen: &V1Gen, r: &'a Resolved, content: &'a str) -> V1ChatResult<'a> {
        V1ChatResult {
            model_instance_id: &r.instance,
            output: [OutputItem {
                kind: "message",
                content,
            }],
            stats: V1ChatStats {
                input_tokens: gen.prompt,
                total_output_tokens: gen.pieces.len() as u32,
                reasoning_output_tokens: 0,
                tokens_per_second: self.tokens_per_second(),
                time_to_first_token_seconds: secs(self.cfg.token_delay),
                model_load_time_seconds: r.load_time.map(secs),
            },
            response_id: gen.response_id.clone(),
        }
    }

    async fn v1_chat_stream(
        self: Arc<Self>,
        tx: mpsc::Sender<Bytes>,
        model: String,
        plan: Plan,
        gen: V1Gen,
        fail_after: Option<usize>,
    ) {
        let cold = matches!(plan, Plan::Wait { .. });
        let planned = plan.instance().to_string();
        let mut start = Event::new("chat.start");
        start.model_instance_id = Some(&planned);
        if tx.send(start.sse()).await.is_err() {
            return;
        }
        if cold {
            let mut ev = Event::new("model_load.start");
            ev.model_instance_id = Some(&planned);
            if tx.send(ev.sse()).await.is_err() {
                return;
            }
        }
        let r = match self.resolve(&model, plan).await {
            Ok(r) => r,
            Err(f) => {
                let (_, message, _, _, _, kind) = f.parts();
                let mut ev = Event::new("error");
                ev.error = Some(NativeErrorBody {
                    kind,
                    message: &message,
                });
                let _ = tx.send(ev.sse()).await;
                return;
            }
        };
        if cold {
            let mut ev = Event::new("model_load.progress");
            ev.model_instance_id = Some(&r.instance);
            ev.progress = Some(1.0);
            let mut end = Event::new("model_load.end");
            end.model_instance_id = Some(&r.instance);
            end.load_time_seconds = r.load_time.map(secs);
            for b in [ev.sse(), end.sse()] {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
        let mut progress = Event::new("prompt_processing.progress");
        progress.progress = Some(1.0);
        let head = [
            Event::new("prompt_processing.start").sse(),
            progress.sse(),
            Event::new("prompt_processing.end").sse(),
            Event::new("message.start").sse(),
        ];
        for b in head {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let tokens = gen
            .pieces
            .iter()
            .map(|p| {
                let mut ev = Event::new("message.delta");
                ev.content = Some(p);
                ev.sse()
            })
            .collect();
        let content = gen.pieces.concat();
        let result = self.v1_result(&gen, &r, &content);
        let mut end = Event::new("chat.end");
        end.result = Some(&result);
        let tail = vec![Event::new("message.end").sse(), end.sse()];
        let mut error = Event::new("error");
        error.error = Some(NativeErrorBody {
            kind: "unknown",
            message: SIMULATED_FAILURE,
        });
        self.pump(&tx, tokens, tail, error.sse(), fail_after).await;
        self.touch(&r.instance);
    }
}

/// What a `/api/v1/chat` request generates.
struct V1Gen {
    prompt: u32,
    pieces: Vec<&'static str>,
    response_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::time::UNIX_EPOCH;

    type TestClient = Client<HttpConnector, Full<Bytes>>;

    const QWEN: &str = "qwen2.5-7b-instruct";
    const LLAMA: &str = "llama-3.2-3b-instruct";
    const EMBED: &str = "text-embedding-nomic-embed-text-v1.5";

    fn manual_clock() -> Clock {
        Clock::manual(UNIX_EPOCH + Duration::from_secs(1_764_151_200))
    }

    fn cfg() -> LmStudioConfig {
        LmStudioConfig {
            clock: manual_clock(),
            ..LmStudioConfig::default()
        }
    }

    async fn start(cfg: LmStudioConfig) -> (SimServer<LmStudioSim>, TestClient) {
        let server = bind(cfg, "127.0.0.1:0").await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        (server, client)
    }

    struct Reply {
        status: StatusCode,
        headers: http::HeaderMap,
        text: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).unwrap()
        }
    }

    async fn send(
        c: &TestClient,
        s: &SimServer<LmStudioSim>,
        method: Method,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", s.url(), path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = c
            .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn get(c: &TestClient, s: &SimServer<LmStudioSim>, path: &str) -> Reply {
        send(c, s, Method::GET, path, "", &[]).await
    }

    async fn post(c: &TestClient, s: &SimServer<LmStudioSim>, path: &str, body: &str) -> Reply {
        send(c, s, Method::POST, path, body, &[]).await
    }

    fn chat_body(model: &str, extra: &str) -> String {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"Why is the sky blue?"}}]{extra}}}"#
        )
    }

    fn ids(v: &Value, list: &str, field: &str) -> Vec<String> {
        v[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[field].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn greeting_and_unknown_endpoint() {
        let (s, c) = start(cfg()).await;
        let r = get(&c, &s, "/lmstudio-greeting").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text, r#"{"lmstudio":true}"#);
        assert_eq!(r.headers[header::CONTENT_TYPE], JSON);
        let r = get(&c, &s, "/x").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.text,
            r#"{"error":"Unexpected endpoint or method. (GET /x)"}"#
        );
        let r = get(&c, &s, "/v1/chat/completions").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(s.state.log.count("/lmstudio-greeting"), 1);
        assert_eq!(s.state.log.calls().len(), 3);
    }

    #[tokio::test]
    async fn v1_models_lists_all_with_jit_and_only_loaded_without() {
        let (s, c) = start(cfg()).await;
        let r = get(&c, &s, "/v1/models").await;
        assert!(r.text.starts_with(r#"{"data":[{"id":"qwen2.5-7b-instruct","object":"model","owned_by":"organization_owner"}"#));
        assert!(r.text.ends_with(r#"],"object":"list"}"#));
        assert_eq!(ids(&r.json(), "data", "id"), vec![QWEN, LLAMA, EMBED]);

        let (s, c) = start(LmStudioConfig {
            jit: false,
            ..cfg()
        })
        .await;
        let r = get(&c, &s, "/v1/models").await;
        assert_eq!(r.text, r#"{"data":[],"object":"list"}"#);
        // Not loaded and JIT off: an error, and nothing gets loaded.
        let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error"]["code"], "model_not_loaded");
        assert!(s.state.loaded().is_empty());
        let r = post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{LLAMA}"}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let r = get(&c, &s, "/v1/models").await;
        assert_eq!(ids(&r.json(), "data", "id"), vec![LLAMA]);
        let r = post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn jit_loads_on_first_chat_only() {
        let (s, c) = start(cfg()).await;
        assert_eq!(s.state.load_count(QWEN), 0);
        let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers[header::CONTENT_TYPE], JSON);
        assert_eq!(s.state.loaded(), vec![QWEN]);
        let r2 = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(r.text, r2.text, "identical requests give identical bytes");
        assert_eq!(s.state.load_count(QWEN), 1);

        let v = r.json();
        let id = v["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 21);
        assert!(id[9..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        let content = reply_pieces(hash_bytes(chat_body(QWEN, "").as_bytes()), 8).concat();
        let expected = format!(
            r#"{{"id":"{id}","object":"chat.completion","created":1764151200,"model":"{QWEN}","choices":[{{"index":0,"logprobs":null,"finish_reason":"stop","message":{{"role":"assistant","content":"{content}"}}}}],"usage":{{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}},"stats":{{}},"system_fingerprint":"{QWEN}"}}"#
        );
        assert_eq!(r.text, expected);
    }

    #[tokio::test]
    async fn max_tokens_caps_the_reply() {
        let (s, c) = start(cfg()).await;
        let r = post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(QWEN, r#","max_tokens":3"#),
        )
        .await;
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 3);
        let r = post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(QWEN, r#","max_tokens":-1"#),
        )
        .await;
        assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
        assert_eq!(r.json()["usage"]["completion_tokens"], 8);
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_load() {
        // Over sockets in real time: the second request is sent while the first one's 400 ms
        // load runs. There is one load whatever the timing; `concurrent_plans_wait_on_the_same_load`
        // checks the sharing itself deterministically.
        let (s, c) = start(LmStudioConfig {
            load_latency: Duration::from_millis(400),
            ..cfg()
        })
        .await;
        let first = {
            let c = c.clone();
            let url = format!("{}/v1/chat/completions", s.url());
            tokio::spawn(async move {
                let req = Request::post(url)
                    .body(Full::new(Bytes::from(chat_body(QWEN, ""))))
                    .unwrap();
                c.request(req).await.unwrap().status()
            })
        };
        while s.state.loading().is_empty() && s.state.load_count(QWEN) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let second = post(&c, &s, "/api/v0/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(second.status, StatusCode::OK);
        assert_eq!(first.await.unwrap(), StatusCode::OK);
        assert_eq!(s.state.load_count(QWEN), 1);
        assert_eq!(s.state.loaded(), vec![QWEN]);
        assert!(s.state.loading().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_plans_wait_on_the_same_load() {
        let sim = Arc::new(LmStudioSim::new(LmStudioConfig {
            load_latency: Duration::from_secs(5),
            ..cfg()
        }));
        let a = sim
            .plan(QWEN, Some(Duration::from_secs(10)), None)
            .ok()
            .unwrap();
        let b = sim.plan(QWEN, None, Some(99)).ok().unwrap();
        assert!(matches!(a, Plan::Wait { .. }) && matches!(b, Plan::Wait { .. }));
        assert_eq!(b.ctx(), 4096, "the joiner gets the running load's context");
        assert_eq!(sim.loading(), vec![QWEN]);
        let t0 = tokio::time::Instant::now();
        let (ra, rb) = tokio::join!(sim.resolve(QWEN, a), sim.resolve(QWEN, b));
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        let (ra, rb) = (ra.ok().unwrap(), rb.ok().unwrap());
        assert_eq!((ra.instance.as_str(), rb.instance.as_str()), (QWEN, QWEN));
        assert_eq!(ra.load_time, Some(Duration::from_secs(5)));
        assert_eq!(sim.load_count(QWEN), 1);
        assert!(sim.loading().is_empty());
        assert!(matches!(sim.plan(QWEN, None, None), Ok(Plan::Ready { .. })));
        // The first request's ttl applies.
        sim.clock.advance(Duration::from_secs(11));
        assert!(sim.loaded().is_empty());
    }

    #[tokio::test]
    async fn single_loaded_model_quirk() {
        let (s, c) = start(LmStudioConfig {
            single_loaded_model_quirk: true,
            ..cfg()
        })
        .await;
        let r = post(&c, &s, "/v1/chat/completions", &chat_body("gpt-4o", "")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "nothing loaded: no quirk");
        post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
        let r = post(&c, &s, "/v1/chat/completions", &chat_body("gpt-4o", "")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["model"], LLAMA);
    }

    #[tokio::test]
    async fn jit_ttl_expires_on_the_clock_and_resets_on_use() {
        let (s, c) = start(cfg()).await;
        let clock = s.state.clock.clone();
        post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(QWEN, r#","ttl":300"#),
        )
        .await;
        clock.advance(Duration::from_secs(299));
        assert_eq!(s.state.loaded(), vec![QWEN]);
        // A request resets the idle timer; its own ttl is ignored (it does not load).
        post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(QWEN, r#","ttl":5"#),
        )
        .await;
        clock.advance(Duration::from_secs(299));
        assert_eq!(s.state.loaded(), vec![QWEN]);
        clock.advance(Duration::from_secs(2));
        assert!(s.state.loaded().is_empty());
        let r = get(&c, &s, "/api/v0/models").await;
        assert_eq!(r.json()["data"][0]["state"], "not-loaded");
        assert!(r.json()["data"][0].get("loaded_context_length").is_none());

        // Default TTL: 60 minutes.
        post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(s.state.load_count(QWEN), 2);
        clock.advance(Duration::from_secs(3599));
        assert_eq!(s.state.loaded(), vec![QWEN]);
        clock.advance(Duration::from_secs(2));
        assert!(s.state.loaded().is_empty());
    }

    #[tokio::test]
    async fn manual_loads_have_no_ttl() {
        let (s, c) = start(cfg()).await;
        post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{QWEN}"}}"#),
        )
        .await;
        s.state.clock.advance(Duration::from_secs(365 * 24 * 3600));
        assert_eq!(s.state.loaded(), vec![QWEN]);
    }

    #[tokio::test]
    async fn auto_evict_replaces_the_jit_model_but_not_manual_ones() {
        let (s, c) = start(cfg()).await;
        post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        let r = post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{EMBED}"}}"#),
        )
        .await;
        assert_eq!(r.json()["type"], "embedding");
        assert_eq!(s.state.loaded(), vec![QWEN, EMBED]);
        post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
        assert_eq!(s.state.loaded(), vec![EMBED, LLAMA]);
        post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(s.state.loaded(), vec![EMBED, QWEN]);
        assert_eq!(s.state.load_count(QWEN), 2);

        let (s, c) = start(LmStudioConfig {
            auto_evict: false,
            ..cfg()
        })
        .await;
        post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
        assert_eq!(s.state.loaded(), vec![QWEN, LLAMA]);
    }

    #[tokio::test(start_paused = true)]
    async fn v1_load_and_unload() {
        let (s, c) = start(LmStudioConfig {
            load_latency: Duration::from_secs(2),
            ..cfg()
        })
        .await;
        let t0 = tokio::time::Instant::now();
        let r = post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{QWEN}","context_length":8192,"echo_load_config":true}}"#),
        )
        .await;
        assert!(t0.elapsed() >= Duration::from_secs(2), "load blocks");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.text,
            format!(
                r#"{{"type":"llm","instance_id":"{QWEN}","load_time_seconds":2.0,"status":"loaded","load_config":{{"context_length":8192,"eval_batch_size":512,"parallel":4,"flash_attention":true,"offload_kv_cache_to_gpu":true}}}}"#
            )
        );
        // A repeat load makes a second instance; the context is capped at the trained max.
        let r = post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{QWEN}","context_length":1000000}}"#),
        )
        .await;
        assert_eq!(r.json()["instance_id"], format!("{QWEN}:2"));
        assert!(r.json().get("load_config").is_none());
        assert_eq!(
            s.state.loaded_context_length(&format!("{QWEN}:2")),
            Some(32768)
        );
        assert_eq!(s.state.load_count(QWEN), 2);

        let r = get(&c, &s, "/api/v1/models").await;
        let v = r.json();
        let qwen = &v["models"][0];
        assert_eq!(qwen["key"], QWEN);
        assert_eq!(qwen["display_name"], "Qwen2.5 7B Instruct");
        assert_eq!(
            qwen["loaded_instances"][0]["config"]["context_length"],
            8192
        );
        assert_eq!(qwen["loaded_instances"][1]["id"], format!("{QWEN}:2"));
        assert_eq!(qwen["max_context_length"], 32768);
        assert_eq!(v["models"][2]["type"], "embedding");
        assert!(v["models"][2].get("architecture").is_none());
        let r = get(&c, &s, "/v1/models").await;
        assert_eq!(
            ids(&r.json(), "data", "id"),
            vec![
                QWEN.to_string(),
                format!("{QWEN}:2"),
                LLAMA.into(),
                EMBED.into()
            ]
        );
        let r = get(&c, &s, &format!("/api/v0/models/{QWEN}")).await;
        assert_eq!(
            r.text,
            format!(
                r#"{{"id":"{QWEN}","object":"model","type":"llm","publisher":"lmstudio-community","arch":"qwen2","compatibility_type":"gguf","quantization":"Q4_K_M","state":"loaded","max_context_length":32768,"loaded_context_length":8192,"capabilities":["tool_use"]}}"#
            )
        );
        // The second instance can be addressed by its id.
        let r = post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(&format!("{QWEN}:2"), ""),
        )
        .await;
        assert_eq!(r.json()["model"], format!("{QWEN}:2"));

        let r = post(
            &c,
            &s,
            "/api/v1/models/unload",
            &format!(r#"{{"instance_id":"{QWEN}"}}"#),
        )
        .await;
        assert_eq!(r.text, format!(r#"{{"instance_id":"{QWEN}"}}"#));
        assert_eq!(s.state.loaded(), vec![format!("{QWEN}:2")]);
        let r = post(
            &c,
            &s,
            "/api/v1/models/unload",
            &format!(r#"{{"instance_id":"{QWEN}"}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.json()["error"].is_object());
        let r = post(&c, &s, "/api/v1/models/load", r#"{"model":"nope"}"#).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error"]["type"], "model_not_found");
        let r = get(&c, &s, "/api/v0/models/nope").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn failed_loads() {
        let (s, c) = start(cfg()).await;
        s.state.fail_next_load("out of memory");
        let r = post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{QWEN}"}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("out of memory"));
        s.state.fail_next_load("out of memory");
        let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.json()["error"]["code"], "model_load_failed");
        assert!(s.state.loaded().is_empty());
        let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(s.state.load_count(QWEN), 1);
    }

    fn expected_chat_stream(body: &str, model: &str, usage: Option<(u32, u32)>) -> String {
        let seed = hash_bytes(body.as_bytes());
        let id = format!("chatcmpl-{}", alnum_id(seed, 21));
        let head = format!(
            r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":1764151200,"model":"{model}","system_fingerprint":"{model}","choices":"#
        );
        let mut out = String::new();
        for (i, p) in reply_pieces(seed, 8).iter().enumerate() {
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            out += &format!(
                r#"{head}[{{"index":0,"delta":{{{role}"content":"{p}"}},"logprobs":null,"finish_reason":null}}]}}"#
            );
            out += "\n\n";
        }
        out += &format!(
            r#"{head}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#
        );
        out += "\n\n";
        if let Some((p, n)) = usage {
            let t = p + n;
            out += &format!(
                r#"{head}[],"usage":{{"prompt_tokens":{p},"completion_tokens":{n},"total_tokens":{t}}}}}"#
            );
            out += "\n\n";
        }
        out + "data: [DONE]\n\n"
    }

    #[tokio::test]
    async fn openai_stream_without_and_with_usage() {
        let (s, c) = start(cfg()).await;
        let body = chat_body(QWEN, r#","stream":true"#);
        let r = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers[header::CONTENT_TYPE], SSE);
        assert_eq!(r.headers[header::TRANSFER_ENCODING], "chunked");
        assert_eq!(r.text, expected_chat_stream(&body, QWEN, None));

        let body = chat_body(
            QWEN,
            r#","stream":true,"stream_options":{"include_usage":true}"#,
        );
        let r = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(r.text, expected_chat_stream(&body, QWEN, Some((9, 8))));
        let again = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(r.text, again.text);
        assert_eq!(s.state.active_requests(), 0);
        assert_eq!(s.state.cancelled(), 0);
    }

    #[tokio::test]
    async fn completions_stream_and_non_stream() {
        let (s, c) = start(cfg()).await;
        let body = format!(r#"{{"model":"{QWEN}","prompt":"Once upon a time","stream":true}}"#);
        let r = post(&c, &s, "/v1/completions", &body).await;
        let events: Vec<&str> = r.text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 8 + 2);
        assert!(events[0].contains(r#""object":"text_completion""#));
        assert!(events[8].contains(r#""text":"","logprobs":null,"finish_reason":"stop""#));
        assert_eq!(events[9], "data: [DONE]");
        let body = format!(r#"{{"model":"{QWEN}","prompt":"Once upon a time"}}"#);
        let v = post(&c, &s, "/api/v0/completions", &body).await.json();
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["stats"]["stop_reason"], "eosFound");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    }

    #[tokio::test]
    async fn v0_chat_adds_stats_model_info_runtime() {
        let (s, c) = start(LmStudioConfig {
            token_delay: Duration::from_millis(1),
            ..cfg()
        })
        .await;
        let r = post(
            &c,
            &s,
            "/api/v0/chat/completions",
            &chat_body(QWEN, r#","max_tokens":2"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let t = &r.text;
        let tail = format!(
            r#""usage":{{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}},"stats":{{"tokens_per_second":1000.0,"time_to_first_token":0.001,"generation_time":0.002,"stop_reason":"maxPredictedTokensReached"}},"model_info":{{"arch":"qwen2","quant":"Q4_K_M","format":"gguf","context_length":4096}},"runtime":{{"name":"llama.cpp-linux-x86_64-avx2","version":"1.3.0","supported_formats":["gguf"]}},"system_fingerprint":"{QWEN}"}}"#
        );
        assert!(t.ends_with(&tail), "{t}");
        let r = get(&c, &s, "/api/v0/models").await;
        let v = r.json();
        assert!(r.text.starts_with(r#"{"object":"list","data":["#));
        assert_eq!(v["data"][0]["state"], "loaded");
        assert_eq!(v["data"][0]["loaded_context_length"], 4096);
        assert_eq!(v["data"][1]["state"], "not-loaded");
        assert_eq!(v["data"][2]["type"], "embeddings");
    }

    fn event_names(text: &str) -> Vec<String> {
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name);
                name.to_string()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn api_v1_chat_stream_events() {
        let (s, c) = start(LmStudioConfig {
            load_latency: Duration::from_millis(1500),
            reply_tokens: 3,
            ..cfg()
        })
        .await;
        let body = format!(
            r#"{{"model":"{QWEN}","input":"Hello there","system_prompt":"Be brief.","stream":true}}"#
        );
        let r = post(&c, &s, "/api/v1/chat", &body).await;
        assert_eq!(r.headers[header::CONTENT_TYPE], SSE);
        assert!(!r.text.contains("[DONE]"));
        let mut expected = vec![
            "chat.start",
            "model_load.start",
            "model_load.progress",
            "model_load.end",
        ];
        let warm = [
            "prompt_processing.start",
            "prompt_processing.progress",
            "prompt_processing.end",
            "message.start",
            "message.delta",
            "message.delta",
            "message.delta",
            "message.end",
            "chat.end",
        ];
        expected.extend(warm);
        assert_eq!(event_names(&r.text), expected);
        assert!(r.text.contains(r#""type":"model_load.end","model_instance_id":"qwen2.5-7b-instruct","load_time_seconds":1.5}"#));
        let last = r.text.trim_end().rsplit("\n\n").next().unwrap();
        let end: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
        let stats = &end["result"]["stats"];
        assert_eq!(stats["input_tokens"], 3 + 4 + 3 + 4);
        assert_eq!(stats["total_output_tokens"], 3);
        assert_eq!(stats["model_load_time_seconds"], 1.5);

        // Warm: no model_load.*, no model_load_time_seconds.
        let r = post(&c, &s, "/api/v1/chat", &body).await;
        let mut expected = vec!["chat.start"];
        expected.extend(warm);
        assert_eq!(event_names(&r.text), expected);
        assert!(!r.text.contains("model_load_time_seconds"));

        let body = format!(
            r#"{{"model":"{QWEN}","input":[{{"type":"message","content":"Hello there"}}]}}"#
        );
        let r = post(&c, &s, "/api/v1/chat", &body).await;
        let seed = hash_bytes(body.as_bytes());
        let content = reply_pieces(seed, 3).concat();
        let resp = alnum_id(seed.rotate_left(29), 21);
        assert_eq!(
            r.text,
            format!(
                r#"{{"model_instance_id":"{QWEN}","output":[{{"type":"message","content":"{content}"}}],"stats":{{"input_tokens":7,"total_output_tokens":3,"reasoning_output_tokens":0,"tokens_per_second":1000.0,"time_to_first_token_seconds":0.0}},"response_id":"resp_{resp}"}}"#
            )
        );
    }

    #[tokio::test]
    async fn api_v1_chat_cold_non_stream_reports_load_time() {
        let (s, c) = start(cfg()).await;
        let body =
            format!(r#"{{"model":"{LLAMA}","input":"Hi","context_length":16384,"store":false}}"#);
        let v = post(&c, &s, "/api/v1/chat", &body).await.json();
        assert_eq!(v["stats"]["model_load_time_seconds"], 0.0);
        assert!(v.get("response_id").is_none());
        assert_eq!(s.state.loaded_context_length(LLAMA), Some(16384));
    }

    #[tokio::test]
    async fn unknown_model_and_bad_requests() {
        let (s, c) = start(cfg()).await;
        let r = post(&c, &s, "/v1/chat/completions", &chat_body("x", "")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.text,
            r#"{"error":{"message":"Model \"x\" not found. Please specify a valid model.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
        );
        let r = post(&c, &s, "/v1/chat/completions", "{not json").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        let r = post(&c, &s, "/v1/chat/completions", r#"{"messages":[]}"#).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["param"], "model");
        let r = post(
            &c,
            &s,
            "/v1/chat/completions",
            &format!(r#"{{"model":"{QWEN}"}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["param"], "messages");
        let r = post(&c, &s, "/v1/chat/completions", &chat_body(EMBED, "")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = post(&c, &s, "/api/v1/chat", r#"{"model":"x","input":"hi"}"#).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error"]["type"], "model_not_found");
        assert!(s.state.loaded().is_empty());
    }

    #[tokio::test]
    async fn embeddings() {
        let (s, c) = start(cfg()).await;
        let body = format!(r#"{{"model":"{EMBED}","input":["hello","world!"]}}"#);
        let r = post(&c, &s, "/v1/embeddings", &body).await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(v["usage"]["prompt_tokens"], 2 + 2);
        assert_eq!(s.state.loaded(), vec![EMBED]);
        let r = post(
            &c,
            &s,
            "/api/v0/embeddings",
            &format!(r#"{{"model":"{QWEN}","input":"x"}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn auth_mode_requires_the_bearer_token() {
        let (s, c) = start(LmStudioConfig {
            api_key: Some("sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST".into()),
            ..cfg()
        })
        .await;
        let r = get(&c, &s, "/v1/models").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        let r = send(
            &c,
            &s,
            Method::GET,
            "/v1/models",
            "",
            &[("authorization", "Bearer lm-studio")],
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let auth = [(
            "authorization",
            "Bearer sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST",
        )];
        let r = send(&c, &s, Method::GET, "/v1/models", "", &auth).await;
        assert_eq!(r.status, StatusCode::OK);
        // Without auth mode any Authorization header is ignored.
        let (s, c) = start(cfg()).await;
        let r = send(
            &c,
            &s,
            Method::GET,
            "/v1/models",
            "",
            &[("authorization", "Bearer lm-studio")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn over_long_prompt_errors_or_is_silent() {
        let long = "x".repeat(4 * 5000);
        let body =
            format!(r#"{{"model":"{QWEN}","messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let (s, c) = start(cfg()).await;
        let r = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let v = r.json();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert!(v["error"]["message"].as_str().unwrap().contains("5004"));
        assert!(v["error"]["message"].as_str().unwrap().contains("4096"));

        let (s, c) = start(LmStudioConfig {
            overflow: Overflow::Silent,
            ..cfg()
        })
        .await;
        let r = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["usage"]["prompt_tokens"], 4096);
        // A larger loaded context admits it.
        let (s, c) = start(cfg()).await;
        post(
            &c,
            &s,
            "/api/v1/models/load",
            &format!(r#"{{"model":"{QWEN}","context_length":8192}}"#),
        )
        .await;
        let r = post(&c, &s, "/v1/chat/completions", &body).await;
        assert_eq!(r.json()["usage"]["prompt_tokens"], 5004);
    }

    #[tokio::test]
    async fn websocket_namespaces_echo() {
        let (s, _) = start(cfg()).await;
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/llm", s.addr), tcp)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::Text(r#"{"authVersion":1}"#.into()))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text(r#"{"authVersion":1}"#.into())
        );
        ws.send(Message::Binary(vec![0, 1, 2])).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(vec![0, 1, 2])
        );
        ws.send(Message::Ping(vec![7])).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong(vec![7]));
        ws.close(None).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            assert!(m.is_close());
        }
        assert_eq!(s.state.log.count("/llm"), 1);

        // A non-namespace path is not upgraded.
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let err = tokio_tungstenite::client_async(format!("ws://{}/nope", s.addr), tcp).await;
        assert!(err.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn client_disconnect_cancels_the_generation() {
        let (s, c) = start(LmStudioConfig {
            token_delay: Duration::from_secs(1),
            reply_tokens: 100_000,
            ..cfg()
        })
        .await;
        let req = Request::post(format!("{}/v1/chat/completions", s.url()))
            .body(Full::new(Bytes::from(chat_body(QWEN, r#","stream":true"#))))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(first.starts_with(b"data: {"));
        assert_eq!(s.state.active_requests(), 1);
        drop(body);
        drop(c);
        for _ in 0..10_000 {
            if s.state.cancelled() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(s.state.cancelled(), 1);
        assert_eq!(s.state.active_requests(), 0);
    }

    #[tokio::test]
    async fn failing_streams_end_with_an_error_event() {
        let (s, c) = start(cfg()).await;
        s.state.fail_next_stream_after(2);
        let r = post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(QWEN, r#","stream":true"#),
        )
        .await;
        let events: Vec<&str> = r.text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3);
        assert!(events[2].starts_with(r#"data: {"error":{"message":"#));
        assert!(!r.text.contains("[DONE]"));
        // Only the next stream fails.
        let r = post(
            &c,
            &s,
            "/v1/chat/completions",
            &chat_body(QWEN, r#","stream":true"#),
        )
        .await;
        assert!(r.text.ends_with("data: [DONE]\n\n"));

        s.state.fail_next_stream_after(1);
        let body = format!(r#"{{"model":"{QWEN}","input":"hi","stream":true}}"#);
        let r = post(&c, &s, "/api/v1/chat", &body).await;
        let names = event_names(&r.text);
        assert_eq!(names.last().unwrap(), "error");
        assert_eq!(names.iter().filter(|n| *n == "message.delta").count(), 1);
        assert!(!names.contains(&"chat.end".to_string()));
        assert_eq!(s.state.cancelled(), 0);
    }
}
