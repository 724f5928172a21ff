//! Simulated Ollama server (API of 0.13, `provider-apis.md` §1 and §5.1): the native `/api/*`
//! routes and the OpenAI `/v1/*` layer, byte-faithful framing, load latency, shared loads,
//! keep-alive expiry on a steppable clock, LRU eviction, reloads on `num_ctx` changes and truncation.
//! Not simulated: real inference, tool calls, thinking, images (only counted), the machine-hostname Host rule,
//! `/api/push|create|blobs`, `/v1/responses|messages`, memory-based scheduling and per-model
//! parallelism limits (a loaded model serves any number of requests at once).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};

use super::common::{self, Call, CallLog, Clock, SimBody, SimServer};
use super::SimModel;

const JSON: &str = "application/json; charset=utf-8";
const OAI_JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const SSE: &str = "text/event-stream";
const TEXT: &str = "text/plain; charset=utf-8";
const PLAIN: &str = "text/plain";

/// `load_duration` of a request that found its model warm.
const WARM_LOAD_NS: u64 = 2_500_000;
/// Nominal prompt processing speed (2,500 tokens/s).
const PROMPT_NS_PER_TOKEN: u64 = 400_000;
/// Nominal time per generated token when `token_delay` is zero.
const DEFAULT_EVAL_NS: u64 = 12_500_000;
/// Fixed request overhead added to `total_duration`.
const OVERHEAD_NS: u64 = 1_000_000;
/// Tokens the chat template adds per message.
const MESSAGE_OVERHEAD_TOKENS: u32 = 4;
/// Tokens the generate template adds around `system` + `prompt` (not in raw mode).
const TEMPLATE_OVERHEAD_TOKENS: u32 = 6;
/// Each image counts this many tokens (§1.9).
const IMAGE_TOKENS: u32 = 768;
/// Ollama's default `num_keep`.
const DEFAULT_NUM_KEEP: u32 = 4;
/// Base mtime of the catalogue's model files.
const MODIFIED_UNIX: u64 = 1_764_000_000;

const QUEUE_FULL: &str = "server busy, please try again.  maximum pending requests exceeded";
const PROMPT_TOO_LONG: &str = "the prompt is longer than the context length currently available to the model; shorten the prompt, adjust the context length in settings, or use a model with a longer context length";
const STREAM_FAILURE: &str = "llama runner process has terminated: exit status 2";

// === config ===

/// Knobs of the simulated server; `Default` mirrors a stock `ollama serve` with three models.
#[derive(Clone, Debug)]
pub struct OllamaConfig {
    /// The catalogue (`/api/tags`); bare names mean `:latest`.
    pub models: Vec<SimModel>,
    /// Cold-load delay (`tokio::time::sleep`).
    pub load_latency: Duration,
    /// Delay before each streamed token chunk.
    pub token_delay: Duration,
    /// Tokens generated per reply, capped by `options.num_predict` / `max_tokens`.
    pub reply_tokens: usize,
    /// `OLLAMA_MAX_LOADED_MODELS`.
    pub max_loaded_models: usize,
    /// `OLLAMA_KEEP_ALIVE`; `Duration::MAX` means forever.
    pub keep_alive: Duration,
    /// `OLLAMA_CONTEXT_LENGTH`.
    pub default_num_ctx: u32,
    /// `OLLAMA_MAX_QUEUE`: requests waiting for a model beyond this get 503.
    pub max_queue: usize,
    /// Length of the simulated embeddings.
    pub embedding_dims: usize,
    /// `/api/version`.
    pub version: String,
    pub clock: Clock,
    /// The server's local UTC offset in seconds, used by `expires_at` and `modified_at`
    /// (0 prints `Z`). Default `-08:00`, so clients must parse offsets.
    pub utc_offset_secs: i32,
    /// `OLLAMA_ORIGINS`: extra allowed CORS origins (`*` wildcards allowed, e.g. `https://*.example.com`).
    pub origins: Vec<String>,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        let llama = SimModel::chat("llama3.2:latest", 2_019_393_189, 131_072);
        let mut qwen = SimModel::chat("qwen2.5:7b", 4_683_087_332, 32_768);
        qwen.arch = "qwen2".to_string();
        qwen.parameter_size = "7.6B".to_string();
        qwen.default_num_ctx = Some(8192);
        let embed = SimModel::embedding("nomic-embed-text:latest", 274_302_450, 2048);
        OllamaConfig {
            models: vec![llama, qwen, embed],
            load_latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            reply_tokens: 8,
            max_loaded_models: 3,
            keep_alive: Duration::from_secs(300),
            default_num_ctx: 4096,
            max_queue: 512,
            embedding_dims: 8,
            version: "0.13.0".to_string(),
            clock: Clock::system(),
            utc_offset_secs: -8 * 3600,
            origins: Vec::new(),
        }
    }
}

// === model state ===

/// How long an idle runner stays loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    fn from_config(d: Duration) -> Self {
        if d.as_nanos() >= i64::MAX as u128 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(d)
        }
    }

    /// When the idle timer started at `from` fires (Go: `now + MaxInt64` for forever).
    fn until(self, from: SystemTime) -> SystemTime {
        match self {
            KeepAlive::For(d) => from + d,
            KeepAlive::Forever => from + Duration::from_nanos(i64::MAX as u64),
        }
    }
}

/// A loaded (or loading) model.
struct Runner {
    /// Unique per load, so a stale lease never touches a later load of the same model.
    id: u64,
    model: SimModel,
    num_ctx: u32,
    ready: bool,
    load_rx: watch::Receiver<Option<Result<(), String>>>,
    /// Requests holding the runner (waiting for its load or generating).
    refs: usize,
    keep_alive: KeepAlive,
    /// Set when `refs` drops to 0: the keep-alive timer's start.
    idle_since: Option<SystemTime>,
    /// LRU stamp.
    last_used: u64,
}

impl Runner {
    fn expired(&self, now: SystemTime) -> bool {
        self.ready
            && self.refs == 0
            && match (self.keep_alive, self.idle_since) {
                (KeepAlive::For(d), Some(t)) => t + d <= now,
                _ => false,
            }
    }

    fn expires_at(&self, now: SystemTime) -> SystemTime {
        self.keep_alive.until(self.idle_since.unwrap_or(now))
    }
}

#[derive(Default)]
struct State {
    catalogue: Vec<SimModel>,
    runners: BTreeMap<String, Runner>,
    load_counts: HashMap<String, usize>,
    seq: u64,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Applies keep-alive expiry at `now` (evaluated lazily on every read).
    fn expire(&mut self, now: SystemTime) {
        self.runners.retain(|_, r| !r.expired(now));
    }

    fn lookup(&self, name: &str) -> Option<SimModel> {
        let full = full_name(name);
        self.catalogue.iter().find(|m| m.name == full).cloned()
    }
}

/// What one scheduling attempt decided.
enum Step {
    Ready(Lease),
    Loading(Lease, watch::Receiver<Option<Result<(), String>>>),
    Wait,
}

enum SchedError {
    QueueFull,
    Load(String),
}

/// A reference on a runner; dropping it starts the keep-alive timer when it was the last.
struct Lease {
    sim: Arc<OllamaSim>,
    name: String,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.sim.release(&self.name, self.id);
    }
}

struct Acquired {
    lease: Lease,
    load_ns: u64,
}

/// Counts a request as generating; dropped unfinished, it counts a cancellation.
struct Generating {
    sim: Arc<OllamaSim>,
    finished: bool,
}

impl Generating {
    fn start(sim: &Arc<OllamaSim>) -> Self {
        sim.active.fetch_add(1, Ordering::SeqCst);
        Generating {
            sim: sim.clone(),
            finished: false,
        }
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.sim.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Generating {
    fn drop(&mut self) {
        if !self.finished {
            self.sim.active.fetch_sub(1, Ordering::SeqCst);
            self.sim.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// === the simulator ===

/// The simulated server's state; tests reach it through `SimServer::state`.
pub struct OllamaSim {
    pub log: CallLog,
    pub clock: Clock,
    cfg: OllamaConfig,
    state: Mutex<State>,
    /// Woken whenever a runner is released, loaded or removed.
    changed: Notify,
    active: AtomicUsize,
    cancelled: AtomicUsize,
    queued: AtomicUsize,
    fail_load: Mutex<Option<String>>,
    fail_stream: Mutex<Option<usize>>,
    /// Ollama checks `Host` only when bound to a loopback address.
    host_check: bool,
}

impl OllamaSim {
    fn new(cfg: OllamaConfig, host_check: bool) -> Self {
        let catalogue = cfg
            .models
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.name = full_name(&m.name);
                m
            })
            .collect();
        OllamaSim {
            log: CallLog::default(),
            clock: cfg.clock.clone(),
            state: Mutex::new(State {
                catalogue,
                ..State::default()
            }),
            cfg,
            changed: Notify::new(),
            active: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            fail_load: Mutex::new(None),
            fail_stream: Mutex::new(None),
            host_check,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state with keep-alive expiry applied at `clock.now()`.
    fn fresh(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        st.expire(self.clock.now());
        st
    }

    /// The configuration the simulator runs with.
    pub fn config(&self) -> &OllamaConfig {
        &self.cfg
    }

    /// Full names (`name:tag`) of the models loaded now, sorted; loading ones excluded.
    pub fn loaded(&self) -> Vec<String> {
        let st = self.fresh();
        st.runners
            .iter()
            .filter(|(_, r)| r.ready)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Full names of the models whose load is in progress.
    pub fn loading(&self) -> Vec<String> {
        let st = self.fresh();
        st.runners
            .iter()
            .filter(|(_, r)| !r.ready)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The context a loaded model runs with.
    pub fn loaded_num_ctx(&self, model: &str) -> Option<u32> {
        let st = self.fresh();
        st.runners.get(&full_name(model)).map(|r| r.num_ctx)
    }

    /// How many loads were started for `model` (bare names mean `:latest`).
    pub fn load_count(&self, model: &str) -> usize {
        let st = self.lock();
        st.load_counts.get(&full_name(model)).copied().unwrap_or(0)
    }

    /// Requests generating now (streams in progress included).
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Generations stopped because the client went away.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The next load fails after the load latency: 500 `{"error":message}`.
    pub fn fail_next_load(&self, message: &str) {
        *self.fail_load.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.to_string());
    }

    /// The next streamed generation writes `chunks` token chunks, then an error line and no
    /// done line.
    pub fn fail_next_stream_after(&self, chunks: usize) {
        *self.fail_stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(chunks);
    }

    /// Adds a model to the catalogue (as if pulled).
    pub fn add_model(&self, mut model: SimModel) {
        model.name = full_name(&model.name);
        let mut st = self.lock();
        st.catalogue.retain(|m| m.name != model.name);
        st.catalogue.push(model);
    }

    fn default_keep_alive(&self) -> KeepAlive {
        KeepAlive::from_config(self.cfg.keep_alive)
    }

    /// Effective `num_ctx`: request option > model parameter > server default, capped at the
    /// trained length.
    fn effective_num_ctx(&self, model: &SimModel, requested: Option<u32>) -> u32 {
        let n = requested
            .filter(|n| *n > 0)
            .or(model.default_num_ctx)
            .unwrap_or(self.cfg.default_num_ctx);
        n.min(model.context_length).max(1)
    }

    // --- scheduling ---

    /// Gets a reference on a runner for `model` at `num_ctx`, loading (and evicting) as needed.
    async fn acquire(
        self: &Arc<Self>,
        model: &SimModel,
        num_ctx: u32,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Acquired, SchedError> {
        let start = tokio::time::Instant::now();
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SchedError::QueueFull);
        }
        let _slot = QueueSlot(&self.queued);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = self.try_take(model, num_ctx, keep_alive);
            match step {
                Step::Ready(lease) => {
                    return Ok(Acquired {
                        lease,
                        load_ns: WARM_LOAD_NS,
                    })
                }
                Step::Loading(lease, mut rx) => {
                    let outcome = rx
                        .wait_for(|s| s.is_some())
                        .await
                        .ok()
                        .and_then(|s| s.clone());
                    match outcome {
                        Some(Ok(())) => {
                            let load_ns = if self.cfg.load_latency.is_zero() {
                                WARM_LOAD_NS
                            } else {
                                start.elapsed().as_nanos() as u64
                            };
                            return Ok(Acquired { lease, load_ns });
                        }
                        Some(Err(msg)) => return Err(SchedError::Load(msg)),
                        None => return Err(SchedError::Load("model load was interrupted".into())),
                    }
                }
                Step::Wait => notified.await,
            }
        }
    }

    /// One scheduling attempt under the lock.
    fn try_take(
        self: &Arc<Self>,
        model: &SimModel,
        num_ctx: u32,
        keep_alive: Option<KeepAlive>,
    ) -> Step {
        let now = self.clock.now();
        let mut st = self.lock();
        st.expire(now);
        let seq = st.next_seq();
        let name = model.name.clone();
        if let Some(r) = st.runners.get_mut(&name) {
            if r.num_ctx == num_ctx {
                r.refs += 1;
                r.idle_since = None;
                r.last_used = seq;
                if let Some(k) = keep_alive {
                    r.keep_alive = k;
                }
                let lease = self.lease(&name, r.id);
                return if r.ready {
                    Step::Ready(lease)
                } else {
                    Step::Loading(lease, r.load_rx.clone())
                };
            }
            // Different runner settings: reload once the runner is idle.
            if r.refs > 0 || !r.ready {
                return Step::Wait;
            }
            st.runners.remove(&name);
        }
        let max = self.cfg.max_loaded_models.max(1);
        while st.runners.len() >= max {
            let victim = st
                .runners
                .iter()
                .filter(|(_, r)| r.ready && r.refs == 0)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(v) => {
                    st.runners.remove(&v);
                }
                None => return Step::Wait,
            }
        }
        let (tx, rx) = watch::channel(None);
        st.runners.insert(
            name.clone(),
            Runner {
                id: seq,
                model: model.clone(),
                num_ctx,
                ready: false,
                load_rx: rx.clone(),
                refs: 1,
                keep_alive: keep_alive.unwrap_or_else(|| self.default_keep_alive()),
                idle_since: None,
                last_used: seq,
            },
        );
        *st.load_counts.entry(name.clone()).or_default() += 1;
        let failure = self
            .fail_load
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let sim = self.clone();
        let lease = self.lease(&name, seq);
        tokio::spawn(async move { sim.run_load(name, seq, failure, tx).await });
        Step::Loading(lease, rx)
    }

    fn lease(self: &Arc<Self>, name: &str, id: u64) -> Lease {
        Lease {
            sim: self.clone(),
            name: name.to_string(),
            id,
        }
    }

    /// The load itself: runs on its own task, so a client leaving does not stop it.
    async fn run_load(
        self: Arc<Self>,
        name: String,
        id: u64,
        failure: Option<String>,
        tx: watch::Sender<Option<Result<(), String>>>,
    ) {
        if !self.cfg.load_latency.is_zero() {
            tokio::time::sleep(self.cfg.load_latency).await;
        }
        {
            let now = self.clock.now();
            let mut st = self.lock();
            let same = st.runners.get(&name).is_some_and(|r| r.id == id);
            if same {
                if failure.is_some() {
                    st.runners.remove(&name);
                } else if let Some(r) = st.runners.get_mut(&name) {
                    r.ready = true;
                    if r.refs == 0 {
                        r.idle_since = Some(now);
                    }
                }
            }
        }
        tx.send_replace(Some(match failure {
            Some(msg) => Err(msg),
            None => Ok(()),
        }));
        self.changed.notify_waiters();
    }

    fn release(&self, name: &str, id: u64) {
        let now = self.clock.now();
        {
            let mut st = self.lock();
            let seq = st.next_seq();
            if let Some(r) = st.runners.get_mut(name) {
                if r.id == id {
                    r.refs = r.refs.saturating_sub(1);
                    r.last_used = seq;
                    if r.refs == 0 {
                        r.idle_since = Some(now);
                    }
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// `keep_alive:0` without a prompt: the runner goes as soon as it is idle.
    fn expire_runner(&self, name: &str) {
        let now = self.clock.now();
        {
            let mut st = self.lock();
            if let Some(r) = st.runners.get_mut(name) {
                r.keep_alive = KeepAlive::For(Duration::ZERO);
                if r.refs == 0 {
                    r.idle_since = Some(now);
                }
            }
            st.expire(now);
        }
        self.changed.notify_waiters();
    }

    fn lookup(&self, name: &str) -> Option<SimModel> {
        self.lock().lookup(name)
    }

    // --- rendering helpers ---

    fn created_at(&self) -> String {
        common::rfc3339_nano(self.clock.now())
    }

    fn local_time(&self, t: SystemTime) -> String {
        local_rfc3339(t, self.cfg.utc_offset_secs)
    }

    fn metrics(&self, gen: &Gen) -> Metrics {
        let per_token = if self.cfg.token_delay.is_zero() {
            DEFAULT_EVAL_NS
        } else {
            self.cfg.token_delay.as_nanos() as u64
        };
        let prompt_eval_duration = u64::from(gen.prompt_tokens) * PROMPT_NS_PER_TOKEN;
        let eval_duration = gen.pieces.len() as u64 * per_token;
        Metrics {
            total_duration: gen.load_ns + prompt_eval_duration + eval_duration + OVERHEAD_NS,
            load_duration: gen.load_ns,
            prompt_eval_count: gen.prompt_tokens,
            prompt_eval_duration,
            eval_count: gen.pieces.len() as u32,
            eval_duration,
        }
    }
}

// === request parsing ===

/// An error response: native `{"error":...}` or the OpenAI shape, by route.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(model: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("model '{model}' not found"))
    }

    fn native(&self) -> Response<SimBody> {
        error_response(self.status, &self.message)
    }

    fn openai(&self) -> Response<SimBody> {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            _ => "api_error",
        };
        let mut body = common::go_json(&OaiErrorBody {
            error: OaiError {
                message: &self.message,
                kind,
                param: None,
                code: None,
            },
        });
        body.push(b'\n');
        common::respond(self.status, OAI_JSON, body)
    }
}

impl From<SchedError> for ApiError {
    fn from(e: SchedError) -> Self {
        match e {
            SchedError::QueueFull => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, QUEUE_FULL),
            SchedError::Load(msg) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg),
        }
    }
}

fn error_response(status: StatusCode, message: &str) -> Response<SimBody> {
    common::respond(status, JSON, common::go_json(&ErrorBody { error: message }))
}

/// Decodes a request body the way Go's `json.Decoder` into a struct would: empty → missing
/// body, first JSON value only, non-objects rejected.
fn parse_object(body: &[u8], go_type: &str) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("missing request body"));
    }
    let first = serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next();
    match first {
        Some(Ok(Value::Object(map))) => Ok(map),
        Some(Ok(Value::Null)) | None => Ok(Map::new()),
        Some(Ok(other)) => Err(ApiError::bad(format!(
            "json: cannot unmarshal {} into Go value of type {go_type}",
            go_kind(&other)
        ))),
        Some(Err(e)) => Err(ApiError::bad(decoder_message(body, &e))),
    }
}

/// A message in the style of Go's JSON decoder for a syntax error.
fn decoder_message(body: &[u8], e: &serde_json::Error) -> String {
    if e.is_eof() {
        return "unexpected EOF".to_string();
    }
    // serde_json reports 1-based line and column of the offending byte.
    let mut line = 1;
    let mut offset = 0;
    for (i, b) in body.iter().enumerate() {
        if line == e.line() {
            offset = i;
            break;
        }
        if *b == b'\n' {
            line += 1;
        }
    }
    let pos = (offset + e.column())
        .saturating_sub(1)
        .min(body.len().saturating_sub(1));
    let c = String::from_utf8_lossy(&body[pos..=pos]).into_owned();
    format!("invalid character '{c}' looking for beginning of value")
}

fn go_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Typed field access with Go's unmarshal error texts.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    ty: &'static str,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>, ty: &'static str) -> Self {
        Fields { map, ty }
    }

    fn mismatch(&self, key: &str, v: &Value, want: &str) -> ApiError {
        ApiError::bad(format!(
            "json: cannot unmarshal {} into Go struct field {}.{key} of type {want}",
            go_kind(v),
            self.ty
        ))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.mismatch(key, v, "string")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.mismatch(key, v, "bool")),
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))),
            Some(v) => Err(self.mismatch(key, v, "int")),
        }
    }

    /// `model`, or the older `name`.
    fn model(&self) -> Result<&'a str, ApiError> {
        match self.str("model")? {
            Some(m) if !m.is_empty() => Ok(m),
            _ => Ok(self.str("name")?.unwrap_or("")),
        }
    }
}

/// The `options` the simulator honours.
#[derive(Default)]
struct Opts {
    num_ctx: Option<u32>,
    num_predict: Option<i64>,
    num_keep: Option<u32>,
}

fn parse_options(v: Option<&Value>) -> Result<Opts, ApiError> {
    let Some(Value::Object(map)) = v else {
        return match v {
            None | Some(Value::Null) => Ok(Opts::default()),
            Some(other) => Err(ApiError::bad(format!(
                "json: cannot unmarshal {} into Go struct field .options of type map[string]interface {{}}",
                go_kind(other)
            ))),
        };
    };
    let int = |key: &str| -> Result<Option<i64>, ApiError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))),
            Some(other) => Err(ApiError::bad(format!(
                "option \"{key}\" must be of type integer, not {}",
                go_kind(other)
            ))),
        }
    };
    let to_u32 = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
    Ok(Opts {
        num_ctx: int("num_ctx")?.map(to_u32),
        num_predict: int("num_predict")?,
        num_keep: int("num_keep")?.map(to_u32),
    })
}

/// `keep_alive` as `api.Duration` decodes it (§1.8); `None` = absent (server default).
fn parse_keep_alive(v: Option<&Value>) -> Result<Option<KeepAlive>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let secs = n.as_f64().unwrap_or(0.0);
            if secs < 0.0 {
                Ok(Some(KeepAlive::Forever))
            } else {
                // Go: time.Duration(int(t) * int(time.Second)).
                Ok(Some(KeepAlive::For(Duration::from_secs(
                    secs.trunc() as u64
                ))))
            }
        }
        Some(Value::String(s)) => match parse_go_duration(s) {
            Ok(ns) if ns < 0 => Ok(Some(KeepAlive::Forever)),
            Ok(ns) => Ok(Some(KeepAlive::For(Duration::from_nanos(ns as u64)))),
            Err(msg) => Err(ApiError::bad(msg)),
        },
        Some(Value::Bool(_)) => Err(ApiError::bad("Unsupported type: 'bool'")),
        Some(Value::Array(_)) => Err(ApiError::bad("Unsupported type: '[]interface {}'")),
        Some(Value::Object(_)) => Err(ApiError::bad("Unsupported type: 'map[string]interface {}'")),
    }
}

/// Go's `time.ParseDuration`, with its error texts; nanoseconds.
fn parse_go_duration(orig: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {}", go_quote(orig));
    let mut s = orig;
    let mut neg = false;
    if let Some(c) = s.chars().next() {
        if c == '-' || c == '+' {
            neg = c == '-';
            s = &s[1..];
        }
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let b = s.as_bytes();
        if !(b[0] == b'.' || b[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if s.starts_with('.') {
            s = &s[1..];
            let frac_len = s.bytes().take_while(|c| c.is_ascii_digit()).count();
            frac_part = &s[..frac_len];
            s = &s[frac_len..];
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid());
            }
        } else if int_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .bytes()
            .take_while(|c| !(*c == b'.' || c.is_ascii_digit()))
            .count();
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration {}", go_quote(orig)));
        }
        let unit_str = &s[..unit_len];
        s = &s[unit_len..];
        let unit: u128 = match unit_str {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    go_quote(unit_str),
                    go_quote(orig)
                ))
            }
        };
        let int_val: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = int_val.checked_mul(unit).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            let digits = &frac_part[..frac_part.len().min(30)];
            let f: u128 = digits.parse().map_err(|_| invalid())?;
            let scale = 10u128.pow(digits.len() as u32);
            value += f.saturating_mul(unit) / scale;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i64::MAX as u128 {
            return Err(invalid());
        }
    }
    let total = total as i64;
    Ok(if neg { -total } else { total })
}

/// Go's `strconv.Quote` for the strings we meet (Rust's debug quoting agrees on ASCII).
fn go_quote(s: &str) -> String {
    format!("{s:?}")
}

/// The rejections Ollama makes before scheduling: `think` on a model without thinking and
/// `top_logprobs` out of range.
fn check_think_and_logprobs(f: &Fields<'_>, label: &str) -> Result<(), ApiError> {
    if let Some(n) = f.int("top_logprobs")? {
        if !(0..=20).contains(&n) {
            return Err(ApiError::bad("top_logprobs must be between 0 and 20"));
        }
    }
    let thinks = match f.map.get("think") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        _ => false,
    };
    if thinks {
        return Err(ApiError::bad(format!(
            "{} does not support thinking",
            go_quote(label)
        )));
    }
    Ok(())
}

/// One chat message, as far as token counting is concerned.
struct ChatMsg {
    role: String,
    content: String,
    images: usize,
}

impl ChatMsg {
    fn tokens(&self) -> u32 {
        common::count_tokens(&self.content)
            + MESSAGE_OVERHEAD_TOKENS
            + IMAGE_TOKENS * self.images as u32
    }
}

fn parse_messages(v: Option<&Value>, ty: &str) -> Result<Vec<ChatMsg>, ApiError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::bad(format!(
            "json: cannot unmarshal {} into Go struct field {ty}.messages of type []api.Message",
            go_kind(other)
        )))
        }
    };
    items
        .iter()
        .map(|m| {
            let Value::Object(map) = m else {
                return Err(ApiError::bad(format!(
                    "json: cannot unmarshal {} into Go struct field {ty}.messages of type api.Message",
                    go_kind(m)
                )));
            };
            let f = Fields::new(map, "Message");
            let content = match map.get("content") {
                // The OpenAI layer accepts content parts; the text parts count.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                _ => f.str("content")?.unwrap_or("").to_string(),
            };
            Ok(ChatMsg {
                role: f.str("role")?.unwrap_or("").to_string(),
                content,
                images: map
                    .get("images")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len),
            })
        })
        .collect()
}

/// Prompt tokens after Ollama's truncation (§1.9); `Err` when too long and not truncating.
fn fit_chat(
    msgs: &[ChatMsg],
    num_ctx: u32,
    num_keep: u32,
    truncate: bool,
) -> Result<u32, ApiError> {
    let tokens: Vec<u32> = msgs.iter().map(ChatMsg::tokens).collect();
    let total: u32 = tokens.iter().sum();
    if total <= num_ctx {
        return Ok(total);
    }
    if !truncate {
        return Err(ApiError::bad(PROMPT_TOO_LONG));
    }
    let last = msgs.len().saturating_sub(1);
    // Keep messages i.. plus every system message before i; the first i that fits wins.
    let mut fitted = tokens.get(last).copied().unwrap_or(0);
    for i in 0..=last {
        let kept_systems: u32 = msgs[..i]
            .iter()
            .zip(&tokens)
            .filter(|(m, _)| m.role == "system")
            .map(|(_, t)| *t)
            .sum();
        let candidate = kept_systems + tokens[i..].iter().sum::<u32>();
        fitted = candidate;
        if candidate <= num_ctx {
            return Ok(candidate);
        }
    }
    Ok(cut_middle(fitted, num_ctx, num_keep))
}

/// The runner's middle cut for a prompt still over `num_ctx`.
fn cut_middle(tokens: u32, num_ctx: u32, num_keep: u32) -> u32 {
    if tokens <= num_ctx {
        return tokens;
    }
    let discard = (num_ctx.saturating_sub(num_keep) / 2).max(1);
    num_ctx.saturating_sub(discard)
}

// === response bodies (fields in Go's declaration order) ===

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

#[derive(Serialize)]
struct OaiErrorBody<'a> {
    error: OaiError<'a>,
}

#[derive(Serialize)]
struct OaiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize, Clone, Copy, Default)]
struct Metrics {
    #[serde(skip_serializing_if = "is_zero_u64")]
    total_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    load_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    prompt_eval_count: u32,
    #[serde(skip_serializing_if = "is_zero_u64")]
    prompt_eval_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    eval_count: u32,
    #[serde(skip_serializing_if = "is_zero_u64")]
    eval_duration: u64,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatResponse<'a> {
    model: &'a str,
    created_at: String,
    message: OutMessage<'a>,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'a str>,
    #[serde(flatten)]
    metrics: Option<Metrics>,
}

#[derive(Serialize)]
struct GenerateResponse<'a> {
    model: &'a str,
    created_at: String,
    response: &'a str,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Vec<u32>>,
    #[serde(flatten)]
    metrics: Option<Metrics>,
}

#[derive(Serialize)]
struct Details {
    parent_model: &'static str,
    format: &'static str,
    family: String,
    families: Vec<String>,
    parameter_size: String,
    quantization_level: String,
}

impl Details {
    fn of(m: &SimModel) -> Self {
        Details {
            parent_model: "",
            format: "gguf",
            family: m.arch.clone(),
            families: vec![m.arch.clone()],
            parameter_size: m.parameter_size.clone(),
            quantization_level: m.quantization.clone(),
        }
    }
}

#[derive(Serialize)]
struct PsResponse {
    models: Vec<PsModel>,
}

#[derive(Serialize)]
struct PsModel {
    name: String,
    model: String,
    size: u64,
    digest: String,
    details: Details,
    expires_at: String,
    size_vram: u64,
    context_length: u32,
}

#[derive(Serialize)]
struct TagsResponse {
    models: Vec<TagModel>,
}

#[derive(Serialize)]
struct TagModel {
    name: String,
    model: String,
    modified_at: String,
    size: u64,
    digest: String,
    details: Details,
}

#[derive(Serialize)]
struct ShowResponse {
    #[serde(skip_serializing_if = "String::is_empty")]
    parameters: String,
    details: Details,
    model_info: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    capabilities: Vec<&'static str>,
    modified_at: String,
}

#[derive(Serialize)]
struct VersionResponse<'a> {
    version: &'a str,
}

#[derive(Serialize)]
struct StatusLine<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    digest: &'a str,
    #[serde(skip_serializing_if = "is_zero_u64")]
    total: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    completed: u64,
}

/// A float as Go's encoder writes it: integral values without `.0`.
#[derive(Clone, Copy)]
struct GoFloat(f32);

impl Serialize for GoFloat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f32(self.0)
        }
    }
}

fn go_floats(v: Vec<f32>) -> Vec<GoFloat> {
    v.into_iter().map(GoFloat).collect()
}

#[derive(Serialize)]
struct EmbedResponse<'a> {
    model: &'a str,
    embeddings: Vec<Vec<GoFloat>>,
    #[serde(skip_serializing_if = "is_zero_u64")]
    total_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    load_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    prompt_eval_count: u32,
}

#[derive(Serialize)]
struct LegacyEmbedding {
    embedding: Vec<GoFloat>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl Usage {
    fn of(prompt: u32, completion: u32) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

#[derive(Serialize)]
struct OaiChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<OaiChoice<'a>>,
    usage: Usage,
}

#[derive(Serialize)]
struct OaiChoice<'a> {
    index: u32,
    message: OutMessage<'a>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct OaiChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<OaiChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct OaiChunkChoice<'a> {
    index: u32,
    delta: OaiDelta<'a>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct OaiDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct OaiCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<OaiTextChoice<'a>>,
    usage: Usage,
}

#[derive(Serialize)]
struct OaiCompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    choices: Vec<OaiTextChoice<'a>>,
    model: &'a str,
    system_fingerprint: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct OaiTextChoice<'a> {
    text: &'a str,
    index: u32,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct OaiModelList {
    object: &'static str,
    data: Option<Vec<OaiModel>>,
}

#[derive(Serialize)]
struct OaiModel {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
}

#[derive(Serialize)]
struct OaiEmbeddingList<'a> {
    object: &'static str,
    data: Vec<OaiEmbedding>,
    model: &'a str,
    usage: OaiEmbedUsage,
}

#[derive(Serialize)]
struct OaiEmbedding {
    object: &'static str,
    embedding: Vec<GoFloat>,
    index: usize,
}

#[derive(Serialize)]
struct OaiEmbedUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

// === catalogue facts ===

/// `name` → `name:latest` unless the last path segment carries a tag.
fn full_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// A stable 64-hex-digit digest for a model.
fn digest(name: &str) -> String {
    (0..4u8)
        .map(|i| {
            let mut seed = name.as_bytes().to_vec();
            seed.push(i);
            format!("{:016x}", common::hash_bytes(&seed))
        })
        .collect()
}

fn modified_at(name: &str) -> SystemTime {
    let h = common::hash_bytes(name.as_bytes());
    UNIX_EPOCH
        + Duration::new(
            MODIFIED_UNIX - h % (30 * 86_400),
            (h % 1_000_000_000) as u32,
        )
}

/// `owned_by` of `/v1/models`: the namespace, `library` for official models.
fn owner(name: &str) -> String {
    let mut parts: Vec<&str> = name.split('/').collect();
    parts.pop();
    parts.pop().unwrap_or("library").to_string()
}

struct Geometry {
    blocks: u32,
    heads: u32,
    kv_heads: u32,
    embd: u32,
}

fn geometry(m: &SimModel) -> Geometry {
    if m.embedding || m.arch.contains("bert") {
        Geometry {
            blocks: 12,
            heads: 12,
            kv_heads: 12,
            embd: 768,
        }
    } else if m.size_bytes < 3_000_000_000 {
        Geometry {
            blocks: 28,
            heads: 24,
            kv_heads: 8,
            embd: 3072,
        }
    } else {
        Geometry {
            blocks: 28,
            heads: 28,
            kv_heads: 4,
            embd: 3584,
        }
    }
}

/// f16 K and V for every layer at `num_ctx`.
fn kv_cache_bytes(m: &SimModel, num_ctx: u32) -> u64 {
    let g = geometry(m);
    let head_dim = u64::from(g.embd / g.heads.max(1));
    2 * u64::from(g.blocks) * u64::from(num_ctx) * u64::from(g.kv_heads) * head_dim * 2
}

fn parameter_count(size: &str) -> u64 {
    let (num, mult) = match size.chars().last() {
        Some('B') => (&size[..size.len() - 1], 1e9),
        Some('M') => (&size[..size.len() - 1], 1e6),
        _ => (size, 1.0),
    };
    (num.parse::<f64>().unwrap_or(0.0) * mult) as u64
}

fn capabilities(m: &SimModel) -> Vec<&'static str> {
    if m.embedding {
        vec!["embedding"]
    } else {
        vec!["completion", "tools"]
    }
}

/// The Modelfile `PARAMETER` block of `/api/show`.
fn parameters_text(m: &SimModel) -> String {
    let mut lines = Vec::new();
    if let Some(n) = m.default_num_ctx {
        lines.push(format!("{:<30} {n}", "num_ctx"));
    }
    if !m.embedding {
        let stop = if m.arch == "qwen2" {
            "<|im_end|>"
        } else {
            "<|eot_id|>"
        };
        lines.push(format!("{:<30} \"{stop}\"", "stop"));
    }
    lines.join("\n")
}

/// RFC 3339 with nanoseconds in the server's local offset (Go prints `Z` for UTC).
fn local_rfc3339(t: SystemTime, offset: i32) -> String {
    if offset == 0 {
        return common::rfc3339_nano(t);
    }
    let shift = Duration::from_secs(u64::from(offset.unsigned_abs()));
    let shifted = if offset > 0 {
        t + shift
    } else {
        t.checked_sub(shift).unwrap_or(UNIX_EPOCH)
    };
    let s = common::rfc3339_nano(shifted);
    let a = offset.unsigned_abs();
    format!(
        "{}{}{:02}:{:02}",
        s.trim_end_matches('Z'),
        if offset < 0 { '-' } else { '+' },
        a / 3600,
        (a % 3600) / 60
    )
}

// === generation ===

/// A generation that has its runner and knows what it will say.
struct Gen {
    lease: Option<Lease>,
    /// The model name as the client sent it.
    label: String,
    prompt_tokens: u32,
    pieces: Vec<&'static str>,
    done_reason: &'static str,
    load_ns: u64,
    /// `/api/generate`: the prompt whose tokens lead `context`; `None` elsewhere or in raw mode.
    context_prompt: Option<String>,
}

impl Gen {
    fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// What the prompt is made of.
enum Prompt {
    Chat(Vec<ChatMsg>),
    /// Token count of the rendered text prompt.
    Text(u32),
}

/// Everything a generation needs, whichever route it came from.
struct GenRequest {
    label: String,
    model: SimModel,
    opts: Opts,
    keep_alive: Option<KeepAlive>,
    prompt: Prompt,
    truncate: bool,
    seed: u64,
    context_prompt: Option<String>,
}

/// The wire format a generation is written in.
enum Flavor {
    Chat,
    Generate,
    OaiChat {
        id: String,
        created: u64,
        include_usage: bool,
    },
    OaiCompletion {
        id: String,
        created: u64,
        include_usage: bool,
    },
}

impl Flavor {
    fn is_openai(&self) -> bool {
        matches!(self, Flavor::OaiChat { .. } | Flavor::OaiCompletion { .. })
    }
}

fn sse(json: Vec<u8>) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn line(mut json: Vec<u8>) -> Bytes {
    json.push(b'\n');
    Bytes::from(json)
}

impl OllamaSim {
    /// Schedules the runner and plans the reply; errors come before any byte is written.
    async fn prepare(self: &Arc<Self>, req: GenRequest) -> Result<Gen, ApiError> {
        let num_ctx = self.effective_num_ctx(&req.model, req.opts.num_ctx);
        let acquired = self.acquire(&req.model, num_ctx, req.keep_alive).await?;
        let num_keep = req.opts.num_keep.unwrap_or(DEFAULT_NUM_KEEP);
        let prompt_tokens = match &req.prompt {
            Prompt::Chat(msgs) => fit_chat(msgs, num_ctx, num_keep, req.truncate)?,
            Prompt::Text(tokens) => {
                if *tokens > num_ctx && !req.truncate {
                    return Err(ApiError::bad(PROMPT_TOO_LONG));
                }
                cut_middle(*tokens, num_ctx, num_keep)
            }
        };
        let mut n = self.cfg.reply_tokens;
        let mut done_reason = "stop";
        if let Some(limit) = req.opts.num_predict.filter(|l| *l >= 0) {
            if (limit as u64) < n as u64 {
                n = limit as usize;
                done_reason = "length";
            }
        }
        Ok(Gen {
            lease: Some(acquired.lease),
            label: req.label,
            prompt_tokens,
            pieces: common::reply_pieces(req.seed, n),
            done_reason,
            load_ns: acquired.load_ns,
            context_prompt: req.context_prompt,
        })
    }

    /// Writes a planned generation as a stream or as one body.
    fn deliver(self: &Arc<Self>, gen: Gen, flavor: Flavor, stream: bool) -> Response<SimBody> {
        if stream {
            let fail_after = self
                .fail_stream
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let (tx, body) = common::channel_body();
            let content_type = if flavor.is_openai() { SSE } else { NDJSON };
            let guard = Generating::start(self);
            let sim = self.clone();
            tokio::spawn(async move { sim.stream(gen, flavor, tx, fail_after, guard).await });
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            resp
        } else {
            let (content_type, body) = self.whole(&gen, &flavor);
            common::respond(StatusCode::OK, content_type, body)
        }
    }

    async fn stream(
        self: Arc<Self>,
        mut gen: Gen,
        flavor: Flavor,
        tx: mpsc::Sender<Bytes>,
        fail_after: Option<usize>,
        mut guard: Generating,
    ) {
        let pieces = gen.pieces.clone();
        for (i, piece) in pieces.iter().enumerate() {
            if fail_after == Some(i) {
                break;
            }
            if !self.cfg.token_delay.is_zero() {
                tokio::time::sleep(self.cfg.token_delay).await;
            }
            let chunk = self.chunk(&gen, &flavor, i, piece);
            if tx.send(chunk).await.is_err() {
                return; // the guard counts the cancellation
            }
        }
        // The generation is over: release the runner before the last line so a client that
        // has read it sees the model idle.
        guard.finish();
        gen.lease.take();
        let lines = match fail_after {
            Some(_) => vec![self.stream_error(&flavor)],
            None => self.finals(&gen, &flavor),
        };
        for l in lines {
            if tx.send(l).await.is_err() {
                return;
            }
        }
    }

    fn stream_error(&self, flavor: &Flavor) -> Bytes {
        if flavor.is_openai() {
            sse(common::go_json(&OaiErrorBody {
                error: OaiError {
                    message: STREAM_FAILURE,
                    kind: "api_error",
                    param: None,
                    code: None,
                },
            }))
        } else {
            line(common::go_json(&ErrorBody {
                error: STREAM_FAILURE,
            }))
        }
    }

    /// The streamed chunk for token `i`.
    fn chunk(&self, gen: &Gen, flavor: &Flavor, i: usize, piece: &str) -> Bytes {
        let model = gen.label.as_str();
        match flavor {
            Flavor::Chat => line(common::go_json(&ChatResponse {
                model,
                created_at: self.created_at(),
                message: OutMessage {
                    role: "assistant",
                    content: piece,
                },
                done: false,
                done_reason: None,
                metrics: None,
            })),
            Flavor::Generate => line(common::go_json(&GenerateResponse {
                model,
                created_at: self.created_at(),
                response: piece,
                done: false,
                done_reason: None,
                context: None,
                metrics: None,
            })),
            Flavor::OaiChat { id, created, .. } => sse(common::go_json(&OaiChatChunk {
                id,
                object: "chat.completion.chunk",
                created: *created,
                model,
                system_fingerprint: "fp_ollama",
                choices: vec![OaiChunkChoice {
                    index: 0,
                    delta: OaiDelta {
                        role: (i == 0).then_some("assistant"),
                        content: Some(piece),
                    },
                    finish_reason: None,
                }],
                usage: None,
            })),
            Flavor::OaiCompletion {
                id,
                created,
                include_usage,
            } => sse(common::go_json(&OaiCompletionChunk {
                id,
                object: "text_completion",
                created: *created,
                choices: vec![OaiTextChoice {
                    text: piece,
                    index: 0,
                    finish_reason: None,
                }],
                model,
                system_fingerprint: "fp_ollama",
                usage: include_usage.then(|| Usage::of(0, 0)),
            })),
        }
    }

    /// The streamed lines after the last token.
    fn finals(&self, gen: &Gen, flavor: &Flavor) -> Vec<Bytes> {
        let model = gen.label.as_str();
        let m = self.metrics(gen);
        let usage = || Usage::of(m.prompt_eval_count, m.eval_count);
        match flavor {
            Flavor::Chat => vec![line(common::go_json(&ChatResponse {
                model,
                created_at: self.created_at(),
                message: OutMessage {
                    role: "assistant",
                    content: "",
                },
                done: true,
                done_reason: Some(gen.done_reason),
                metrics: Some(m),
            }))],
            Flavor::Generate => vec![line(common::go_json(&GenerateResponse {
                model,
                created_at: self.created_at(),
                response: "",
                done: true,
                done_reason: Some(gen.done_reason),
                context: self.context(gen),
                metrics: Some(m),
            }))],
            Flavor::OaiChat {
                id,
                created,
                include_usage,
            } => {
                let chunk = |choices, usage| {
                    sse(common::go_json(&OaiChatChunk {
                        id,
                        object: "chat.completion.chunk",
                        created: *created,
                        model,
                        system_fingerprint: "fp_ollama",
                        choices,
                        usage,
                    }))
                };
                let mut out = vec![chunk(
                    vec![OaiChunkChoice {
                        index: 0,
                        delta: OaiDelta {
                            role: None,
                            content: None,
                        },
                        finish_reason: Some(gen.done_reason),
                    }],
                    None,
                )];
                if *include_usage {
                    out.push(chunk(Vec::new(), Some(usage())));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
            Flavor::OaiCompletion {
                id,
                created,
                include_usage,
            } => {
                let chunk = |choices, usage| {
                    sse(common::go_json(&OaiCompletionChunk {
                        id,
                        object: "text_completion",
                        created: *created,
                        choices,
                        model,
                        system_fingerprint: "fp_ollama",
                        usage,
                    }))
                };
                let mut out = vec![chunk(
                    vec![OaiTextChoice {
                        text: "",
                        index: 0,
                        finish_reason: Some(gen.done_reason),
                    }],
                    include_usage.then(|| Usage::of(0, 0)),
                )];
                if *include_usage {
                    out.push(chunk(Vec::new(), Some(usage())));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
        }
    }

    /// The non-streaming body.
    fn whole(&self, gen: &Gen, flavor: &Flavor) -> (&'static str, Vec<u8>) {
        let model = gen.label.as_str();
        let text = gen.text();
        let m = self.metrics(gen);
        match flavor {
            Flavor::Chat => (
                JSON,
                common::go_json(&ChatResponse {
                    model,
                    created_at: self.created_at(),
                    message: OutMessage {
                        role: "assistant",
                        content: &text,
                    },
                    done: true,
                    done_reason: Some(gen.done_reason),
                    metrics: Some(m),
                }),
            ),
            Flavor::Generate => (
                JSON,
                common::go_json(&GenerateResponse {
                    model,
                    created_at: self.created_at(),
                    response: &text,
                    done: true,
                    done_reason: Some(gen.done_reason),
                    context: self.context(gen),
                    metrics: Some(m),
                }),
            ),
            Flavor::OaiChat { id, created, .. } => {
                let mut body = common::go_json(&OaiChatCompletion {
                    id,
                    object: "chat.completion",
                    created: *created,
                    model,
                    system_fingerprint: "fp_ollama",
                    choices: vec![OaiChoice {
                        index: 0,
                        message: OutMessage {
                            role: "assistant",
                            content: &text,
                        },
                        finish_reason: Some(gen.done_reason),
                    }],
                    usage: Usage::of(m.prompt_eval_count, m.eval_count),
                });
                body.push(b'\n');
                (OAI_JSON, body)
            }
            Flavor::OaiCompletion { id, created, .. } => {
                let mut body = common::go_json(&OaiCompletion {
                    id,
                    object: "text_completion",
                    created: *created,
                    model,
                    system_fingerprint: "fp_ollama",
                    choices: vec![OaiTextChoice {
                        text: &text,
                        index: 0,
                        finish_reason: Some(gen.done_reason),
                    }],
                    usage: Usage::of(m.prompt_eval_count, m.eval_count),
                });
                body.push(b'\n');
                (OAI_JSON, body)
            }
        }
    }

    fn context(&self, gen: &Gen) -> Option<Vec<u32>> {
        let prompt = gen.context_prompt.as_ref()?;
        let mut ctx = common::tokenize(prompt);
        ctx.extend(common::tokenize(&gen.text()));
        Some(ctx).filter(|c| !c.is_empty())
    }

    /// Non-streaming generation: waits out the token delays, counting as active meanwhile.
    async fn deliver_whole(self: &Arc<Self>, mut gen: Gen, flavor: Flavor) -> Response<SimBody> {
        let mut guard = Generating::start(self);
        if !self.cfg.token_delay.is_zero() && !gen.pieces.is_empty() {
            tokio::time::sleep(self.cfg.token_delay * gen.pieces.len() as u32).await;
        }
        guard.finish();
        gen.lease.take();
        self.deliver(gen, flavor, false)
    }
}

// === handlers ===

/// The single-object reply of a load or unload request.
fn lifecycle_reply(sim: &OllamaSim, label: &str, chat: bool, reason: &str) -> Response<SimBody> {
    let body = if chat {
        common::go_json(&ChatResponse {
            model: label,
            created_at: sim.created_at(),
            message: OutMessage {
                role: "assistant",
                content: "",
            },
            done: true,
            done_reason: Some(reason),
            metrics: None,
        })
    } else {
        common::go_json(&GenerateResponse {
            model: label,
            created_at: sim.created_at(),
            response: "",
            done: true,
            done_reason: Some(reason),
            context: None,
            metrics: None,
        })
    };
    common::respond(StatusCode::OK, JSON, body)
}

/// Load-only and unload requests (§1.8): a single object whatever `stream` says.
async fn load_or_unload(
    sim: &Arc<OllamaSim>,
    model: &SimModel,
    label: &str,
    keep_alive: Option<KeepAlive>,
    num_ctx: Option<u32>,
    chat: bool,
) -> Result<Response<SimBody>, ApiError> {
    if keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        sim.expire_runner(&model.name);
        return Ok(lifecycle_reply(sim, label, chat, "unload"));
    }
    let num_ctx = sim.effective_num_ctx(model, num_ctx);
    let acquired = sim.acquire(model, num_ctx, keep_alive).await?;
    drop(acquired.lease);
    Ok(lifecycle_reply(sim, label, chat, "load"))
}

async fn chat(sim: &Arc<OllamaSim>, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.ChatRequest")?;
    let f = Fields::new(&map, "ChatRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let stream = f.bool("stream")?.unwrap_or(true);
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let messages = parse_messages(map.get("messages"), "ChatRequest")?;
    let opts = parse_options(map.get("options"))?;
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let model = sim
        .lookup(&label)
        .ok_or_else(|| ApiError::not_found(&label))?;
    if messages.is_empty() && keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        return load_or_unload(sim, &model, &label, keep_alive, opts.num_ctx, true).await;
    }
    if model.embedding {
        return Err(ApiError::bad(format!(
            "{} does not support chat",
            go_quote(&label)
        )));
    }
    check_think_and_logprobs(&f, &label)?;
    if messages.is_empty() {
        return load_or_unload(sim, &model, &label, keep_alive, opts.num_ctx, true).await;
    }
    let gen = sim
        .prepare(GenRequest {
            label,
            model,
            opts,
            keep_alive,
            prompt: Prompt::Chat(messages),
            truncate,
            seed: common::hash_bytes(&call.body),
            context_prompt: None,
        })
        .await?;
    Ok(if stream {
        sim.deliver(gen, Flavor::Chat, true)
    } else {
        sim.deliver_whole(gen, Flavor::Chat).await
    })
}

async fn generate(sim: &Arc<OllamaSim>, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.GenerateRequest")?;
    let f = Fields::new(&map, "GenerateRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let prompt = f.str("prompt")?.unwrap_or("").to_string();
    let system = f.str("system")?.unwrap_or("");
    let template = f.str("template")?.unwrap_or("");
    let raw = f.bool("raw")?.unwrap_or(false);
    let stream = f.bool("stream")?.unwrap_or(true);
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let opts = parse_options(map.get("options"))?;
    let has_context = map
        .get("context")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    if raw && (!template.is_empty() || !system.is_empty() || has_context) {
        return Err(ApiError::bad(
            "raw mode does not support template, system, or context",
        ));
    }
    let model = sim
        .lookup(&label)
        .ok_or_else(|| ApiError::not_found(&label))?;
    if prompt.is_empty() && keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        return load_or_unload(sim, &model, &label, keep_alive, opts.num_ctx, false).await;
    }
    if model.embedding {
        return Err(ApiError::bad(format!(
            "{} does not support generate",
            go_quote(&label)
        )));
    }
    check_think_and_logprobs(&f, &label)?;
    if prompt.is_empty() {
        return load_or_unload(sim, &model, &label, keep_alive, opts.num_ctx, false).await;
    }
    let overhead = if raw { 0 } else { TEMPLATE_OVERHEAD_TOKENS };
    let tokens = common::count_tokens(system) + common::count_tokens(&prompt) + overhead;
    let gen = sim
        .prepare(GenRequest {
            label,
            model,
            opts,
            keep_alive,
            prompt: Prompt::Text(tokens),
            truncate,
            seed: common::hash_bytes(&call.body),
            context_prompt: (!raw).then_some(prompt),
        })
        .await?;
    Ok(if stream {
        sim.deliver(gen, Flavor::Generate, true)
    } else {
        sim.deliver_whole(gen, Flavor::Generate).await
    })
}

fn ps(sim: &OllamaSim) -> Response<SimBody> {
    let now = sim.clock.now();
    let st = sim.fresh();
    let mut rows: Vec<(SystemTime, PsModel)> = st
        .runners
        .iter()
        .map(|(name, r)| {
            let expires = r.expires_at(now);
            let size = r.model.size_bytes + kv_cache_bytes(&r.model, r.num_ctx);
            (
                expires,
                PsModel {
                    name: name.clone(),
                    model: name.clone(),
                    size,
                    digest: digest(name),
                    details: Details::of(&r.model),
                    expires_at: sim.local_time(expires),
                    size_vram: size,
                    context_length: r.num_ctx,
                },
            )
        })
        .collect();
    drop(st);
    rows.sort_by_key(|row| std::cmp::Reverse(row.0));
    let body = PsResponse {
        models: rows.into_iter().map(|(_, m)| m).collect(),
    };
    common::respond(StatusCode::OK, JSON, common::go_json(&body))
}

fn tags(sim: &OllamaSim) -> Response<SimBody> {
    let catalogue = sim.lock().catalogue.clone();
    let body = TagsResponse {
        models: catalogue
            .iter()
            .map(|m| TagModel {
                name: m.name.clone(),
                model: m.name.clone(),
                modified_at: sim.local_time(modified_at(&m.name)),
                size: m.size_bytes,
                digest: digest(&m.name),
                details: Details::of(m),
            })
            .collect(),
    };
    common::respond(StatusCode::OK, JSON, common::go_json(&body))
}

fn show(sim: &OllamaSim, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.ShowRequest")?;
    let label = Fields::new(&map, "ShowRequest").model()?;
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let m = sim
        .lookup(label)
        .ok_or_else(|| ApiError::not_found(label))?;
    let g = geometry(&m);
    let arch = m.arch.as_str();
    let mut info: BTreeMap<String, Value> = BTreeMap::new();
    info.insert("general.architecture".into(), Value::from(arch));
    info.insert(
        "general.parameter_count".into(),
        Value::from(parameter_count(&m.parameter_size)),
    );
    info.insert(
        format!("{arch}.context_length"),
        Value::from(m.context_length),
    );
    info.insert(format!("{arch}.block_count"), Value::from(g.blocks));
    info.insert(format!("{arch}.attention.head_count"), Value::from(g.heads));
    info.insert(
        format!("{arch}.attention.head_count_kv"),
        Value::from(g.kv_heads),
    );
    info.insert(format!("{arch}.embedding_length"), Value::from(g.embd));
    let body = ShowResponse {
        parameters: parameters_text(&m),
        details: Details::of(&m),
        model_info: info,
        capabilities: capabilities(&m),
        modified_at: sim.local_time(modified_at(&m.name)),
    };
    Ok(common::respond(
        StatusCode::OK,
        JSON,
        common::go_json(&body),
    ))
}

/// `input` of the embed routes: a string or an array of strings.
fn embed_inputs(v: Option<&Value>, ty: &str) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::bad(format!(
                    "invalid input type: {}",
                    go_kind(other)
                ))),
            })
            .collect(),
        Some(other) => Err(ApiError::bad(format!(
            "json: cannot unmarshal {} into Go struct field {ty}.input of type string",
            go_kind(other)
        ))),
    }
}

/// Shared embedding core: schedules the model and embeds every input.
struct Embedded {
    vectors: Vec<Vec<GoFloat>>,
    tokens: u32,
    load_ns: u64,
}

async fn embed_core(
    sim: &Arc<OllamaSim>,
    model: &SimModel,
    inputs: &[String],
    keep_alive: Option<KeepAlive>,
    opts: &Opts,
    truncate: bool,
    dimensions: Option<i64>,
) -> Result<Embedded, ApiError> {
    let num_ctx = sim.effective_num_ctx(model, opts.num_ctx);
    let acquired = sim.acquire(model, num_ctx, keep_alive).await?;
    let mut tokens = 0;
    let mut vectors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let n = common::count_tokens(input);
        if n > num_ctx && !truncate {
            return Err(ApiError::bad("the input length exceeds the context length"));
        }
        tokens += n.min(num_ctx);
        let mut v = common::embedding(input, sim.cfg.embedding_dims);
        if let Some(d) = dimensions.filter(|d| *d > 0) {
            v.truncate(d as usize);
        }
        vectors.push(go_floats(v));
    }
    drop(acquired.lease);
    Ok(Embedded {
        vectors,
        tokens,
        load_ns: acquired.load_ns,
    })
}

async fn embed(sim: &Arc<OllamaSim>, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.EmbedRequest")?;
    let f = Fields::new(&map, "EmbedRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let dimensions = f.int("dimensions")?;
    let opts = parse_options(map.get("options"))?;
    let inputs = embed_inputs(map.get("input"), "EmbedRequest")?;
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let model = sim
        .lookup(&label)
        .ok_or_else(|| ApiError::not_found(&label))?;
    let e = embed_core(
        sim, &model, &inputs, keep_alive, &opts, truncate, dimensions,
    )
    .await?;
    let prompt_ns = u64::from(e.tokens) * PROMPT_NS_PER_TOKEN;
    let body = if inputs.is_empty() {
        EmbedResponse {
            model: &label,
            embeddings: Vec::new(),
            total_duration: 0,
            load_duration: 0,
            prompt_eval_count: 0,
        }
    } else {
        EmbedResponse {
            model: &label,
            embeddings: e.vectors,
            total_duration: e.load_ns + prompt_ns + OVERHEAD_NS,
            load_duration: e.load_ns,
            prompt_eval_count: e.tokens,
        }
    };
    Ok(common::respond(
        StatusCode::OK,
        JSON,
        common::go_json(&body),
    ))
}

async fn embeddings_legacy(
    sim: &Arc<OllamaSim>,
    call: &Call,
) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.EmbeddingRequest")?;
    let f = Fields::new(&map, "EmbeddingRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let prompt = f.str("prompt")?.unwrap_or("").to_string();
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let opts = parse_options(map.get("options"))?;
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let model = sim
        .lookup(&label)
        .ok_or_else(|| ApiError::not_found(&label))?;
    let inputs: Vec<String> = if prompt.is_empty() {
        Vec::new()
    } else {
        vec![prompt]
    };
    let e = embed_core(sim, &model, &inputs, keep_alive, &opts, true, None).await?;
    let body = LegacyEmbedding {
        embedding: e.vectors.into_iter().next().unwrap_or_default(),
    };
    Ok(common::respond(
        StatusCode::OK,
        JSON,
        common::go_json(&body),
    ))
}

fn copy(sim: &OllamaSim, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.CopyRequest")?;
    let f = Fields::new(&map, "CopyRequest");
    let source = f.str("source")?.unwrap_or("");
    let destination = f.str("destination")?.unwrap_or("");
    if source.is_empty() || destination.is_empty() {
        return Err(ApiError::bad("source and destination are required"));
    }
    let mut st = sim.lock();
    let mut m = st
        .lookup(source)
        .ok_or_else(|| ApiError::not_found(source))?;
    m.name = full_name(destination);
    st.catalogue.retain(|c| c.name != m.name);
    st.catalogue.push(m);
    Ok(common::respond(StatusCode::OK, "", Bytes::new()))
}

fn delete(sim: &OllamaSim, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.DeleteRequest")?;
    let label = Fields::new(&map, "DeleteRequest").model()?;
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let full = full_name(label);
    {
        let mut st = sim.lock();
        if st.lookup(label).is_none() {
            return Err(ApiError::not_found(label));
        }
        st.catalogue.retain(|m| m.name != full);
        st.runners.remove(&full);
    }
    sim.changed.notify_waiters();
    Ok(common::respond(StatusCode::OK, "", Bytes::new()))
}

fn pull(sim: &OllamaSim, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = parse_object(&call.body, "api.PullRequest")?;
    let f = Fields::new(&map, "PullRequest");
    let label = f.model()?;
    let stream = f.bool("stream")?.unwrap_or(true);
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let status = |status: &'static str| StatusLine {
        status,
        digest: "",
        total: 0,
        completed: 0,
    };
    let Some(m) = sim.lookup(label) else {
        const MISSING: &str = "pull model manifest: file does not exist";
        if !stream {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, MISSING));
        }
        let mut body = line(common::go_json(&status("pulling manifest"))).to_vec();
        body.extend_from_slice(&line(common::go_json(&ErrorBody { error: MISSING })));
        return Ok(common::respond(StatusCode::OK, NDJSON, body));
    };
    if !stream {
        return Ok(common::respond(
            StatusCode::OK,
            JSON,
            common::go_json(&status("success")),
        ));
    }
    let d = digest(&m.name);
    let layer = format!("pulling {}", &d[..12]);
    let layer_digest = format!("sha256:{d}");
    let mut body = Vec::new();
    for l in [
        status("pulling manifest"),
        StatusLine {
            status: &layer,
            digest: &layer_digest,
            total: m.size_bytes,
            completed: m.size_bytes,
        },
        status("verifying sha256 digest"),
        status("writing manifest"),
        status("success"),
    ] {
        body.extend_from_slice(&line(common::go_json(&l)));
    }
    Ok(common::respond(StatusCode::OK, NDJSON, body))
}

// --- the OpenAI layer ---

/// `stream_options.include_usage`.
fn include_usage(map: &Map<String, Value>) -> bool {
    map.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn oai_opts(f: &Fields<'_>) -> Result<Opts, ApiError> {
    Ok(Opts {
        num_predict: f.int("max_tokens")?,
        ..Opts::default()
    })
}

fn oai_model(sim: &OllamaSim, label: &str) -> Result<SimModel, ApiError> {
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    sim.lookup(label).ok_or_else(|| ApiError::not_found(label))
}

/// `/v1` decode errors: the middleware reports the raw decoder text (`EOF` for no body).
fn oai_parse(body: &[u8], ty: &str) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("EOF"));
    }
    parse_object(body, ty)
}

async fn oai_chat(sim: &Arc<OllamaSim>, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = oai_parse(&call.body, "openai.ChatCompletionRequest")?;
    let f = Fields::new(&map, "ChatCompletionRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let stream = f.bool("stream")?.unwrap_or(false);
    let messages = parse_messages(map.get("messages"), "ChatCompletionRequest")?;
    if messages.is_empty() {
        return Err(ApiError::bad("[] is too short - 'messages'"));
    }
    let opts = oai_opts(&f)?;
    let model = oai_model(sim, &label)?;
    if model.embedding {
        return Err(ApiError::bad(format!(
            "{} does not support chat",
            go_quote(&label)
        )));
    }
    let seed = common::hash_bytes(&call.body);
    let flavor = Flavor::OaiChat {
        id: format!("chatcmpl-{}", seed % 999),
        created: sim.clock.unix_secs(),
        include_usage: include_usage(&map),
    };
    let gen = sim
        .prepare(GenRequest {
            label,
            model,
            opts,
            keep_alive: None,
            prompt: Prompt::Chat(messages),
            truncate: true,
            seed,
            context_prompt: None,
        })
        .await?;
    Ok(if stream {
        sim.deliver(gen, flavor, true)
    } else {
        sim.deliver_whole(gen, flavor).await
    })
}

async fn oai_completions(sim: &Arc<OllamaSim>, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = oai_parse(&call.body, "openai.CompletionRequest")?;
    let f = Fields::new(&map, "CompletionRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let stream = f.bool("stream")?.unwrap_or(false);
    let prompt = match map.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "invalid type for 'prompt' field: {}",
                go_kind(other)
            )))
        }
    };
    let opts = oai_opts(&f)?;
    let model = oai_model(sim, &label)?;
    if model.embedding {
        return Err(ApiError::bad(format!(
            "{} does not support generate",
            go_quote(&label)
        )));
    }
    let seed = common::hash_bytes(&call.body);
    let flavor = Flavor::OaiCompletion {
        id: format!("cmpl-{}", seed % 999),
        created: sim.clock.unix_secs(),
        include_usage: include_usage(&map),
    };
    let tokens = common::count_tokens(&prompt) + TEMPLATE_OVERHEAD_TOKENS;
    let gen = sim
        .prepare(GenRequest {
            label,
            model,
            opts,
            keep_alive: None,
            prompt: Prompt::Text(tokens),
            truncate: true,
            seed,
            context_prompt: None,
        })
        .await?;
    Ok(if stream {
        sim.deliver(gen, flavor, true)
    } else {
        sim.deliver_whole(gen, flavor).await
    })
}

async fn oai_embeddings(sim: &Arc<OllamaSim>, call: &Call) -> Result<Response<SimBody>, ApiError> {
    let map = oai_parse(&call.body, "openai.EmbedRequest")?;
    let f = Fields::new(&map, "EmbedRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let dimensions = f.int("dimensions")?;
    let inputs = embed_inputs(map.get("input"), "EmbedRequest")?;
    if inputs.is_empty() {
        return Err(ApiError::bad("invalid input"));
    }
    let model = oai_model(sim, &label)?;
    let e = embed_core(
        sim,
        &model,
        &inputs,
        None,
        &Opts::default(),
        true,
        dimensions,
    )
    .await?;
    let mut body = common::go_json(&OaiEmbeddingList {
        object: "list",
        data: e
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| OaiEmbedding {
                object: "embedding",
                embedding,
                index,
            })
            .collect(),
        model: &label,
        usage: OaiEmbedUsage {
            prompt_tokens: e.tokens,
            total_tokens: e.tokens,
        },
    });
    body.push(b'\n');
    Ok(common::respond(StatusCode::OK, OAI_JSON, body))
}

fn oai_model_entry(m: &SimModel, id: &str) -> OaiModel {
    OaiModel {
        id: id.to_string(),
        object: "model",
        created: modified_at(&m.name)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        owned_by: owner(&m.name),
    }
}

fn oai_json(value: &impl Serialize) -> Response<SimBody> {
    let mut body = common::go_json(value);
    body.push(b'\n');
    common::respond(StatusCode::OK, OAI_JSON, body)
}

fn oai_models(sim: &OllamaSim) -> Response<SimBody> {
    let catalogue = sim.lock().catalogue.clone();
    let data: Vec<OaiModel> = catalogue
        .iter()
        .map(|m| oai_model_entry(m, &m.name))
        .collect();
    oai_json(&OaiModelList {
        object: "list",
        data: (!data.is_empty()).then_some(data),
    })
}

fn oai_retrieve(sim: &OllamaSim, id: &str) -> Result<Response<SimBody>, ApiError> {
    let m = sim.lookup(id).ok_or_else(|| ApiError::not_found(id))?;
    Ok(oai_json(&oai_model_entry(&m, id)))
}

// --- routing ---

/// `allowedHostsMiddleware`: loopback/private/unspecified IPs, `localhost` and local TLDs.
fn host_allowed(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or("")
    } else {
        host.as_str()
    };
    if bare.is_empty() || bare == "localhost" {
        return true;
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
            }
        };
    }
    [".localhost", ".local", ".internal"]
        .iter()
        .any(|tld| bare.ends_with(tld))
}

fn not_found_path() -> Response<SimBody> {
    common::respond(StatusCode::NOT_FOUND, PLAIN, "404 page not found")
}

fn method_not_allowed() -> Response<SimBody> {
    common::respond(
        StatusCode::METHOD_NOT_ALLOWED,
        PLAIN,
        "405 method not allowed",
    )
}

/// The routes and the methods each accepts.
fn allowed_methods(path: &str) -> Option<&'static [Method]> {
    const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    const DELETE: &[Method] = &[Method::DELETE];
    Some(match path {
        "/" | "/api/version" | "/api/tags" => GET_HEAD,
        "/api/ps" | "/v1/models" => GET,
        "/api/generate"
        | "/api/chat"
        | "/api/show"
        | "/api/embed"
        | "/api/embeddings"
        | "/api/copy"
        | "/api/pull"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings" => POST,
        "/api/delete" => DELETE,
        p if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => GET,
        _ => return None,
    })
}

async fn handle(sim: Arc<OllamaSim>, req: Request<Incoming>) -> Response<SimBody> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let (call, _upgrade) = common::record(req, &sim.log).await;
    let origin = call
        .headers
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    if let Some(origin) = &origin {
        if !origin_allowed(origin, &sim.cfg.origins) {
            return common::respond(StatusCode::FORBIDDEN, "", Bytes::new());
        }
        if call.method == Method::OPTIONS {
            let mut resp = common::respond(StatusCode::NO_CONTENT, "", Bytes::new());
            cors_headers(&mut resp, origin, true);
            return resp;
        }
    }
    if sim.host_check && !host_allowed(&host) {
        return common::respond(StatusCode::FORBIDDEN, "", Bytes::new());
    }
    let mut resp = route(&sim, &call).await;
    if let Some(origin) = &origin {
        cors_headers(&mut resp, origin, false);
    }
    resp
}

/// The CORS headers gin-contrib/cors writes for an allowed origin.
fn cors_headers(resp: &mut Response<SimBody>, origin: &str, preflight: bool) {
    let h = resp.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(origin) {
        h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(http::header::VARY, http::HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_METHODS,
            http::HeaderValue::from_static("GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
        );
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_HEADERS,
            http::HeaderValue::from_static(CORS_ALLOW_HEADERS),
        );
        h.insert(
            http::header::ACCESS_CONTROL_MAX_AGE,
            http::HeaderValue::from_static("43200"),
        );
    }
}

const CORS_ALLOW_HEADERS: &str = "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,OpenAI-Beta,x-stainless-arch,x-stainless-async,x-stainless-custom-poll-interval,x-stainless-helper-method,x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-poll-helper,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout";

/// Ollama's default allowed origins plus `OLLAMA_ORIGINS` (§1.1).
fn origin_allowed(origin: &str, extra: &[String]) -> bool {
    let local = ["localhost", "127.0.0.1", "0.0.0.0"].iter().any(|host| {
        ["http://", "https://"].iter().any(|scheme| {
            origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix(host))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        })
    });
    local
        || [
            "app://",
            "file://",
            "tauri://",
            "vscode-webview://",
            "vscode-file://",
        ]
        .iter()
        .any(|p| origin.starts_with(p))
        || extra.iter().any(|pattern| wildcard_match(pattern, origin))
}

/// `*` matches any run of characters (gin-contrib/cors allows one wildcard per origin).
fn wildcard_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.len() >= head.len() + tail.len() && text.starts_with(head) && text.ends_with(tail)
        }
    }
}

async fn route(sim: &Arc<OllamaSim>, call: &Call) -> Response<SimBody> {
    let Some(methods) = allowed_methods(&call.path) else {
        return not_found_path();
    };
    if !methods.contains(&call.method) {
        return method_not_allowed();
    }
    let native = |r: Result<Response<SimBody>, ApiError>| r.unwrap_or_else(|e| e.native());
    let openai = |r: Result<Response<SimBody>, ApiError>| r.unwrap_or_else(|e| e.openai());
    match call.path.as_str() {
        "/" => common::respond(StatusCode::OK, TEXT, "Ollama is running"),
        "/api/version" => common::respond(
            StatusCode::OK,
            JSON,
            common::go_json(&VersionResponse {
                version: &sim.cfg.version,
            }),
        ),
        "/api/tags" => tags(sim),
        "/api/ps" => ps(sim),
        "/api/generate" => native(generate(sim, call).await),
        "/api/chat" => native(chat(sim, call).await),
        "/api/show" => native(show(sim, call)),
        "/api/embed" => native(embed(sim, call).await),
        "/api/embeddings" => native(embeddings_legacy(sim, call).await),
        "/api/copy" => native(copy(sim, call)),
        "/api/delete" => native(delete(sim, call)),
        "/api/pull" => native(pull(sim, call)),
        "/v1/chat/completions" => openai(oai_chat(sim, call).await),
        "/v1/completions" => openai(oai_completions(sim, call).await),
        "/v1/embeddings" => openai(oai_embeddings(sim, call).await),
        "/v1/models" => oai_models(sim),
        p => match p.strip_prefix("/v1/models/") {
            Some(id) => openai(oai_retrieve(sim, id)),
            None => not_found_path(),
        },
    }
}

/// Serves a simulated Ollama on `listener`; call inside a tokio runtime.
pub fn spawn(cfg: OllamaConfig, listener: TcpListener) -> SimServer<OllamaSim> {
    let host_check = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(true);
    let sim = Arc::new(OllamaSim::new(cfg, host_check));
    common::serve(listener, sim, handle)
}

/// Binds `addr` (e.g. `127.0.0.1:0`) and serves a simulated Ollama on it.
pub async fn bind(cfg: OllamaConfig, addr: &str) -> std::io::Result<SimServer<OllamaSim>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(spawn(cfg, listener))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// 2026-11-26T10:00:00Z.
    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_687_200)
    }

    fn manual() -> OllamaConfig {
        OllamaConfig {
            clock: Clock::manual(t0()),
            ..OllamaConfig::default()
        }
    }

    async fn start(cfg: OllamaConfig) -> SimServer<OllamaSim> {
        bind(cfg, "127.0.0.1:0").await.expect("bind")
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Reply {
        fn text(&self) -> String {
            String::from_utf8(self.body.to_vec()).unwrap()
        }
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }
        fn content_type(&self) -> &str {
            self.headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap())
                .unwrap_or("")
        }
        /// NDJSON lines, each checked to end in `\n`.
        fn lines(&self) -> Vec<Value> {
            let text = self.text();
            assert!(text.ends_with('\n'), "{text}");
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
        /// SSE `data:` payloads, each event checked to be `data: ...\n\n`.
        fn events(&self) -> Vec<String> {
            let text = self.text();
            assert!(text.ends_with("\n\n"), "{text}");
            text.split_terminator("\n\n")
                .map(|e| e.strip_prefix("data: ").expect("data: prefix").to_string())
                .collect()
        }
    }

    async fn send(srv: &SimServer<OllamaSim>, method: Method, path: &str, body: &str) -> Reply {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", srv.url(), path))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn post(srv: &SimServer<OllamaSim>, path: &str, body: &str) -> Reply {
        send(srv, Method::POST, path, body).await
    }

    async fn get(srv: &SimServer<OllamaSim>, path: &str) -> Reply {
        send(srv, Method::GET, path, "").await
    }

    /// A raw HTTP/1.1 exchange, for framing and Host checks.
    async fn raw(srv: &SimServer<OllamaSim>, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn reply_text(body: &str, n: usize) -> String {
        common::reply_pieces(common::hash_bytes(body.as_bytes()), n).concat()
    }

    #[tokio::test]
    async fn chat_non_stream_exact_bytes() {
        let srv = start(manual()).await;
        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}],"stream":false}"#;
        let r = post(&srv, "/api/chat", body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.content_type(), "application/json; charset=utf-8");
        // 5 content tokens + 4 per message; 8 reply tokens at the nominal 12.5 ms.
        let expected = format!(
            concat!(
                r#"{{"model":"llama3.2","created_at":"2026-11-26T10:00:00Z","message":{{"role":"assistant","content":"{}"}},"#,
                r#""done":true,"done_reason":"stop","total_duration":107100000,"load_duration":2500000,"#,
                r#""prompt_eval_count":9,"prompt_eval_duration":3600000,"eval_count":8,"eval_duration":100000000}}"#
            ),
            reply_text(body, 8)
        );
        assert_eq!(r.text(), expected);
        // Warm and identical: byte-identical.
        let again = post(&srv, "/api/chat", body).await;
        assert_eq!(again.body, r.body);
        assert_eq!(srv.state.load_count("llama3.2"), 1);
        assert_eq!(srv.state.log.count("/api/chat"), 2);
    }

    #[tokio::test]
    async fn chat_stream_is_ndjson_with_final_metrics() {
        let srv = start(manual()).await;
        let body =
            r#"{"model":"llama3.2:latest","messages":[{"role":"user","content":"hi <b> & you"}]}"#;
        let r = post(&srv, "/api/chat", body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.content_type(), "application/x-ndjson");
        assert_eq!(r.headers.get("transfer-encoding").unwrap(), "chunked");
        let lines = r.lines();
        assert_eq!(lines.len(), 9);
        let mut text = String::new();
        for l in &lines[..8] {
            assert_eq!(l["done"], false);
            assert_eq!(l["model"], "llama3.2:latest");
            assert_eq!(l["created_at"], "2026-11-26T10:00:00Z");
            assert!(l.get("done_reason").is_none());
            text.push_str(l["message"]["content"].as_str().unwrap());
        }
        assert_eq!(text, reply_text(body, 8));
        let last = &lines[8];
        assert_eq!(last["done"], true);
        assert_eq!(last["done_reason"], "stop");
        assert_eq!(last["message"]["content"], "");
        for k in [
            "total_duration",
            "load_duration",
            "prompt_eval_count",
            "prompt_eval_duration",
            "eval_count",
            "eval_duration",
        ] {
            assert!(last[k].as_u64().unwrap() > 0, "{k}");
        }
        assert_eq!(last["eval_count"], 8);
        let first_line = r.text().lines().next().unwrap().to_string();
        assert!(first_line.starts_with(r#"{"model":"llama3.2:latest","created_at":"#));
        assert!(first_line.ends_with(r#""},"done":false}"#), "{first_line}");
    }

    #[tokio::test]
    async fn generate_stream_and_num_predict() {
        let srv = start(manual()).await;
        let body = r#"{"model":"llama3.2","prompt":"Why?","options":{"num_predict":3}}"#;
        let r = post(&srv, "/api/generate", body).await;
        let lines = r.lines();
        assert_eq!(lines.len(), 4);
        let last = &lines[3];
        assert_eq!(last["done_reason"], "length");
        assert_eq!(last["eval_count"], 3);
        // 1 token + the template overhead.
        assert_eq!(last["prompt_eval_count"], 1 + TEMPLATE_OVERHEAD_TOKENS);
        let mut ctx = common::tokenize("Why?");
        ctx.extend(common::tokenize(&reply_text(body, 3)));
        assert_eq!(last["context"], serde_json::json!(ctx));
        let keys: Vec<&str> = last
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(keys.contains(&"context"));
        // Non-stream: one object, no newline, raw mode omits context.
        let r = post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"x","raw":true,"stream":false}"#,
        )
        .await;
        assert!(!r.text().ends_with('\n'));
        assert!(r.json().get("context").is_none());
        assert_eq!(r.json()["done"], true);
    }

    #[tokio::test]
    async fn load_only_and_unload() {
        let srv = start(manual()).await;
        let r = post(&srv, "/api/generate", r#"{"model":"llama3.2"}"#).await;
        assert_eq!(r.content_type(), "application/json; charset=utf-8");
        assert_eq!(
            r.text(),
            r#"{"model":"llama3.2","created_at":"2026-11-26T10:00:00Z","response":"","done":true,"done_reason":"load"}"#
        );
        assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
        let r = post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"","keep_alive":"0s"}"#,
        )
        .await;
        assert_eq!(r.json()["done_reason"], "unload");
        assert!(srv.state.loaded().is_empty());

        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"qwen2.5:7b","messages":[],"stream":true}"#,
        )
        .await;
        assert_eq!(
            r.text(),
            r#"{"model":"qwen2.5:7b","created_at":"2026-11-26T10:00:00Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"load"}"#
        );
        assert_eq!(srv.state.loaded_num_ctx("qwen2.5:7b"), Some(8192));
        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"qwen2.5:7b","messages":[],"keep_alive":0}"#,
        )
        .await;
        assert_eq!(r.json()["done_reason"], "unload");
        assert!(srv.state.loaded().is_empty());
        assert_eq!(srv.state.load_count("qwen2.5:7b"), 1);
    }

    #[test]
    fn keep_alive_formats() {
        use serde_json::json;
        let ka = |v: Value| parse_keep_alive(Some(&v));
        let secs = |s| Ok(Some(KeepAlive::For(Duration::from_secs(s))));
        assert_eq!(ka(json!(300)).map_err(|e| e.message), secs(300));
        assert_eq!(ka(json!(1.9)).map_err(|e| e.message), secs(1));
        assert_eq!(ka(json!(0)).map_err(|e| e.message), secs(0));
        assert_eq!(
            ka(json!(-1)).map_err(|e| e.message),
            Ok(Some(KeepAlive::Forever))
        );
        assert_eq!(
            ka(json!(-0.5)).map_err(|e| e.message),
            Ok(Some(KeepAlive::Forever))
        );
        assert_eq!(ka(json!("5m")).map_err(|e| e.message), secs(300));
        assert_eq!(ka(json!("1h30m")).map_err(|e| e.message), secs(5400));
        assert_eq!(ka(json!("24h")).map_err(|e| e.message), secs(86400));
        assert_eq!(
            ka(json!("300ms")).map_err(|e| e.message),
            Ok(Some(KeepAlive::For(Duration::from_millis(300))))
        );
        assert_eq!(
            ka(json!("1.5s")).map_err(|e| e.message),
            Ok(Some(KeepAlive::For(Duration::from_millis(1500))))
        );
        assert_eq!(ka(json!("0")).map_err(|e| e.message), secs(0));
        assert_eq!(ka(json!("0s")).map_err(|e| e.message), secs(0));
        assert_eq!(
            ka(json!("-1m")).map_err(|e| e.message),
            Ok(Some(KeepAlive::Forever))
        );
        assert_eq!(ka(json!(null)).map_err(|e| e.message), Ok(None));
        assert_eq!(
            ka(json!("300")).unwrap_err().message,
            r#"time: missing unit in duration "300""#
        );
        assert_eq!(
            ka(json!("5x")).unwrap_err().message,
            r#"time: unknown unit "x" in duration "5x""#
        );
        assert_eq!(
            ka(json!("")).unwrap_err().message,
            r#"time: invalid duration """#
        );
        assert_eq!(
            ka(json!("m")).unwrap_err().message,
            r#"time: invalid duration "m""#
        );
        assert_eq!(
            ka(json!(true)).unwrap_err().message,
            "Unsupported type: 'bool'"
        );
        assert_eq!(
            ka(json!([1])).unwrap_err().message,
            "Unsupported type: '[]interface {}'"
        );
    }

    #[tokio::test]
    async fn keep_alive_errors_over_http() {
        let srv = start(manual()).await;
        let r = post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"hi","keep_alive":"300"}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.text(),
            r#"{"error":"time: missing unit in duration \"300\""}"#
        );
        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"llama3.2","messages":[],"keep_alive":{}}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.text(),
            r#"{"error":"Unsupported type: 'map[string]interface {}'"}"#
        );
        assert!(srv.state.loaded().is_empty());
    }

    #[tokio::test]
    async fn keep_alive_expiry_follows_the_clock() {
        let srv = start(manual()).await;
        let clock = srv.state.clock.clone();
        let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":false,"keep_alive":"10m"}"#;
        assert_eq!(post(&srv, "/api/chat", chat).await.status, StatusCode::OK);
        let ps = get(&srv, "/api/ps").await.json();
        // Idle timer started at the end of the request; local offset -08:00.
        assert_eq!(ps["models"][0]["expires_at"], "2026-11-26T02:10:00-08:00");
        clock.advance(Duration::from_secs(599));
        assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
        clock.advance(Duration::from_secs(1));
        assert!(srv.state.loaded().is_empty());
        assert_eq!(get(&srv, "/api/ps").await.text(), r#"{"models":[]}"#);

        // Default keep-alive (5m), then a later request's duration replaces it.
        post(&srv, "/api/generate", r#"{"model":"llama3.2"}"#).await;
        clock.advance(Duration::from_secs(299));
        post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","keep_alive":-1}"#,
        )
        .await;
        clock.advance(Duration::from_secs(10 * 365 * 86400));
        assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
        let ps = get(&srv, "/api/ps").await.json();
        assert!(ps["models"][0]["expires_at"]
            .as_str()
            .unwrap()
            .starts_with("23"));

        // keep_alive 0 with a prompt: generates, then unloads when done.
        let r = post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"hi","keep_alive":0,"stream":false}"#,
        )
        .await;
        assert_eq!(r.json()["done_reason"], "stop");
        assert!(srv.state.loaded().is_empty());
        assert_eq!(srv.state.load_count("llama3.2:latest"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_share_one_load() {
        let cfg = OllamaConfig {
            load_latency: Duration::from_secs(10),
            ..manual()
        };
        let srv = Arc::new(start(cfg).await);
        let body = r#"{"model":"llama3.2","prompt":"a","stream":false}"#;
        let s1 = srv.clone();
        let a = tokio::spawn(async move { post(&s1, "/api/generate", body).await });
        for _ in 0..10_000 {
            if !srv.state.loading().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        assert_eq!(srv.state.loading(), vec!["llama3.2:latest"]);
        let ps = get(&srv, "/api/ps").await.json();
        assert_eq!(ps["models"].as_array().unwrap().len(), 1);
        let s2 = srv.clone();
        let b = tokio::spawn(async move { post(&s2, "/api/generate", body).await });
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert_eq!(srv.state.load_count("llama3.2"), 1);
        let load_a = a.json()["load_duration"].as_u64().unwrap();
        let load_b = b.json()["load_duration"].as_u64().unwrap();
        assert!(load_a >= 10_000_000_000, "{load_a}");
        assert!(load_b > WARM_LOAD_NS && load_b <= load_a, "{load_b}");
        // Warm now.
        let c = post(&srv, "/api/generate", body).await;
        assert_eq!(c.json()["load_duration"], WARM_LOAD_NS);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_full_and_failed_load() {
        let cfg = OllamaConfig {
            load_latency: Duration::from_secs(5),
            max_queue: 1,
            ..manual()
        };
        let srv = Arc::new(start(cfg).await);
        let s1 = srv.clone();
        let a = tokio::spawn(
            async move { post(&s1, "/api/generate", r#"{"model":"llama3.2"}"#).await },
        );
        for _ in 0..10_000 {
            if !srv.state.loading().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let r = post(&srv, "/api/generate", r#"{"model":"qwen2.5:7b"}"#).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.text(),
            r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#
        );
        assert_eq!(a.await.unwrap().json()["done_reason"], "load");

        srv.state
            .fail_next_load("llama runner process has terminated: error loading model");
        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"qwen2.5:7b","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            r.text(),
            r#"{"error":"llama runner process has terminated: error loading model"}"#
        );
        assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
    }

    #[tokio::test]
    async fn lru_eviction_at_max_loaded_models() {
        let cfg = OllamaConfig {
            models: vec![
                SimModel::chat("a", 1_000_000_000, 8192),
                SimModel::chat("b", 1_000_000_000, 8192),
                SimModel::chat("c:7b", 1_000_000_000, 8192),
            ],
            max_loaded_models: 2,
            ..manual()
        };
        let srv = start(cfg).await;
        for m in ["a", "b", "a", "c:7b"] {
            let r = post(&srv, "/api/generate", &format!(r#"{{"model":"{m}"}}"#)).await;
            assert_eq!(r.status, StatusCode::OK);
        }
        assert_eq!(srv.state.loaded(), vec!["a:latest", "c:7b"]);
        post(
            &srv,
            "/api/generate",
            r#"{"model":"b","prompt":"x","stream":false}"#,
        )
        .await;
        assert_eq!(srv.state.loaded(), vec!["b:latest", "c:7b"]);
        assert_eq!(srv.state.load_count("a"), 1);
        assert_eq!(srv.state.load_count("b:latest"), 2);
    }

    #[tokio::test]
    async fn truncation_drops_oldest_messages_and_num_ctx_reloads() {
        let cfg = OllamaConfig {
            default_num_ctx: 64,
            ..manual()
        };
        let srv = start(cfg).await;
        let sys = "s".repeat(20); // 5 + 4
        let old = "o".repeat(200); // 50 + 4
        let mid = "m".repeat(40); // 10 + 4
        let last = "l".repeat(40); // 10 + 4
        let body = |truncate: &str, last: &str| {
            format!(
                r#"{{"model":"llama3.2","stream":false{truncate},"messages":[{{"role":"system","content":"{sys}"}},{{"role":"user","content":"{old}"}},{{"role":"assistant","content":"{mid}"}},{{"role":"user","content":"{last}"}}]}}"#
            )
        };
        let r = post(&srv, "/api/chat", &body("", &last)).await;
        // 91 tokens > 64: the old user message goes, the system message stays.
        assert_eq!(r.json()["prompt_eval_count"], 9 + 14 + 14);
        let r = post(&srv, "/api/chat", &body(r#","truncate":false"#, &last)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.text(), format!(r#"{{"error":"{PROMPT_TOO_LONG}"}}"#));
        // A huge last message is cut in the middle: 64 - (64 - 4) / 2.
        let r = post(&srv, "/api/chat", &body("", &"x".repeat(4000))).await;
        assert_eq!(r.json()["prompt_eval_count"], 34);
        assert_eq!(srv.state.loaded_num_ctx("llama3.2"), Some(64));

        // A different num_ctx reloads; /api/ps shows the context in use.
        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"llama3.2","stream":false,"options":{"num_ctx":200000},"messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(srv.state.load_count("llama3.2"), 2);
        let ps = get(&srv, "/api/ps").await.json();
        let m = &ps["models"][0];
        assert_eq!(m["context_length"], 131072); // capped at the trained length
        assert_eq!(m["size"], m["size_vram"]);
        assert!(m["size"].as_u64().unwrap() > 2_019_393_189);
    }

    #[tokio::test]
    async fn openai_chat_stream_framing() {
        let srv = start(manual()).await;
        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2}"#;
        let r = post(&srv, "/v1/chat/completions", body).await;
        assert_eq!(r.content_type(), "text/event-stream");
        let ev = r.events();
        let id = format!("chatcmpl-{}", common::hash_bytes(body.as_bytes()) % 999);
        let pieces = common::reply_pieces(common::hash_bytes(body.as_bytes()), 2);
        let head = format!(
            r#"{{"id":"{id}","object":"chat.completion.chunk","created":1795687200,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":"#
        );
        assert_eq!(ev.len(), 4);
        assert_eq!(
            ev[0],
            format!(
                r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":"{}"}},"finish_reason":null}}]}}"#,
                pieces[0]
            )
        );
        assert_eq!(
            ev[1],
            format!(
                r#"{head}[{{"index":0,"delta":{{"content":"{}"}},"finish_reason":null}}]}}"#,
                pieces[1]
            )
        );
        assert_eq!(
            ev[2],
            format!(r#"{head}[{{"index":0,"delta":{{}},"finish_reason":"length"}}]}}"#)
        );
        assert_eq!(ev[3], "[DONE]");

        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;
        let ev = post(&srv, "/v1/chat/completions", body).await.events();
        assert_eq!(ev.len(), 8 + 3);
        assert!(ev[8].contains(r#""finish_reason":"stop""#));
        let usage: Value = serde_json::from_str(&ev[9]).unwrap();
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(
            usage["usage"],
            serde_json::json!({"prompt_tokens":5,"completion_tokens":8,"total_tokens":13})
        );
        assert_eq!(ev[10], "[DONE]");
    }

    #[tokio::test]
    async fn openai_non_stream_completions_and_errors() {
        let srv = start(manual()).await;
        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
        let r = post(&srv, "/v1/chat/completions", body).await;
        assert_eq!(r.content_type(), "application/json");
        let id = common::hash_bytes(body.as_bytes()) % 999;
        assert_eq!(
            r.text(),
            format!(
                r#"{{"id":"chatcmpl-{id}","object":"chat.completion","created":1795687200,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":5,"completion_tokens":8,"total_tokens":13}}}}"#,
                reply_text(body, 8)
            ) + "\n"
        );

        let r = post(
            &srv,
            "/v1/chat/completions",
            r#"{"model":"llama3.2","messages":[]}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.text(),
            "{\"error\":{\"message\":\"[] is too short - 'messages'\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}\n"
        );
        let r = post(
            &srv,
            "/v1/chat/completions",
            r#"{"model":"llama9","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.text(),
            "{\"error\":{\"message\":\"model 'llama9' not found\",\"type\":\"not_found_error\",\"param\":null,\"code\":null}}\n"
        );

        // /v1/completions streaming with include_usage: zero usage on every chunk.
        let body = r#"{"model":"llama3.2","prompt":"hi","stream":true,"max_tokens":2,"stream_options":{"include_usage":true}}"#;
        let ev = post(&srv, "/v1/completions", body).await.events();
        assert_eq!(ev.len(), 2 + 1 + 1 + 1);
        for e in &ev[..3] {
            let v: Value = serde_json::from_str(e).unwrap();
            assert_eq!(v["object"], "text_completion");
            assert_eq!(
                v["usage"],
                serde_json::json!({"prompt_tokens":0,"completion_tokens":0,"total_tokens":0})
            );
        }
        assert!(ev[0].starts_with(r#"{"id":"cmpl-"#));
        assert!(ev[2].contains(r#""choices":[{"text":"","index":0,"finish_reason":"length"}],"model":"llama3.2","system_fingerprint":"fp_ollama","usage""#));
        let last: Value = serde_json::from_str(&ev[3]).unwrap();
        assert_eq!(last["usage"]["completion_tokens"], 2);
        assert_eq!(last["usage"]["prompt_tokens"], 1 + TEMPLATE_OVERHEAD_TOKENS);
        assert_eq!(ev[4], "[DONE]");

        let r = post(
            &srv,
            "/v1/completions",
            r#"{"model":"llama3.2","prompt":"hi"}"#,
        )
        .await;
        assert!(r.text().ends_with("}\n"));
        assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn native_error_bodies() {
        let srv = start(manual()).await;
        let cases = [
            (
                "/api/chat",
                r#"{"model":"llama9","messages":[]}"#,
                StatusCode::NOT_FOUND,
                r#"{"error":"model 'llama9' not found"}"#,
            ),
            (
                "/api/chat",
                "",
                StatusCode::BAD_REQUEST,
                r#"{"error":"missing request body"}"#,
            ),
            (
                "/api/chat",
                r#"{"messages":[]}"#,
                StatusCode::BAD_REQUEST,
                r#"{"error":"model is required"}"#,
            ),
            (
                "/api/chat",
                r#"{"model":"nomic-embed-text","messages":[{"role":"user","content":"x"}]}"#,
                StatusCode::BAD_REQUEST,
                r#"{"error":"\"nomic-embed-text\" does not support chat"}"#,
            ),
            (
                "/api/chat",
                "{\"model\":",
                StatusCode::BAD_REQUEST,
                r#"{"error":"unexpected EOF"}"#,
            ),
            (
                "/api/generate",
                "hello",
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid character 'h' looking for beginning of value"}"#,
            ),
            (
                "/api/chat",
                r#"{"model":5}"#,
                StatusCode::BAD_REQUEST,
                r#"{"error":"json: cannot unmarshal number into Go struct field ChatRequest.model of type string"}"#,
            ),
            (
                "/api/show",
                r#"{"model":"nope:1b"}"#,
                StatusCode::NOT_FOUND,
                r#"{"error":"model 'nope:1b' not found"}"#,
            ),
        ];
        for (path, body, status, expected) in cases {
            let r = post(&srv, path, body).await;
            assert_eq!(r.status, status, "{path} {body}");
            assert_eq!(r.content_type(), "application/json; charset=utf-8");
            assert_eq!(r.text(), expected, "{path} {body}");
        }
        let r = get(&srv, "/api/chat").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.text(), "405 method not allowed");
        let r = get(&srv, "/api/nope").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.text(), "404 page not found");
        assert_eq!(r.content_type(), "text/plain");
        let r = get(&srv, "/").await;
        assert_eq!(r.text(), "Ollama is running");
        assert_eq!(r.content_type(), "text/plain; charset=utf-8");
        assert_eq!(
            get(&srv, "/api/version").await.text(),
            r#"{"version":"0.13.0"}"#
        );
        assert!(srv.state.log.calls().len() >= 12);
    }

    #[tokio::test]
    async fn host_header_check() {
        let srv = start(manual()).await;
        let ask =
            |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let resp = raw(&srv, &ask("evil.example.com")).await;
        assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
        assert!(resp.ends_with("\r\n\r\n"), "bare 403 has no body: {resp}");
        assert!(!resp.to_ascii_lowercase().contains("content-type"));
        for ok in [
            "localhost:11434",
            "127.0.0.1:11434",
            "192.168.1.5",
            "0.0.0.0:1",
            "[::1]:11434",
            "box.local",
            "x.internal:80",
            "app.localhost",
        ] {
            let resp = raw(&srv, &ask(ok)).await;
            assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}: {resp}");
            assert!(resp.ends_with("Ollama is running"), "{ok}");
        }
        assert!(!host_allowed("8.8.8.8"));
        assert!(!host_allowed("example.com:11434"));
    }

    #[tokio::test(start_paused = true)]
    async fn disconnect_mid_stream_cancels() {
        let cfg = OllamaConfig {
            token_delay: Duration::from_millis(50),
            reply_tokens: 1000,
            ..manual()
        };
        let srv = start(cfg).await;
        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"go"}]}"#;
        let req = format!(
            "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(r#""done":false}"#) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(srv.state.active_requests(), 1);
        drop(s);
        for _ in 0..1000 {
            if srv.state.cancelled() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(srv.state.cancelled(), 1);
        assert_eq!(srv.state.active_requests(), 0);
        // The runner was released: its idle timer runs.
        let ps = get(&srv, "/api/ps").await.json();
        assert_eq!(ps["models"][0]["expires_at"], "2026-11-26T02:05:00-08:00");
    }

    #[tokio::test]
    async fn mid_stream_error_line() {
        let srv = start(manual()).await;
        srv.state.fail_next_stream_after(2);
        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let lines = r.lines();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["done"], false);
        assert_eq!(lines[2], serde_json::json!({"error": STREAM_FAILURE}));
        assert_eq!(srv.state.cancelled(), 0);
        assert_eq!(srv.state.active_requests(), 0);
        // Only once.
        let r = post(
            &srv,
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
        assert_eq!(r.lines().len(), 9);
    }

    #[tokio::test]
    async fn catalogue_routes() {
        let srv = start(manual()).await;
        let tags = get(&srv, "/api/tags").await;
        assert_eq!(tags.content_type(), "application/json; charset=utf-8");
        let t = tags.json();
        assert_eq!(t["models"].as_array().unwrap().len(), 3);
        let first = tags.text();
        assert!(first.starts_with(
            r#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","modified_at":"#
        ));
        assert!(first.contains(r#""details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"3.2B","quantization_level":"Q4_K_M"}"#));
        assert_eq!(t["models"][0]["digest"].as_str().unwrap().len(), 64);

        let show = post(&srv, "/api/show", r#"{"name":"qwen2.5:7b"}"#)
            .await
            .json();
        assert_eq!(show["model_info"]["general.architecture"], "qwen2");
        assert_eq!(show["model_info"]["qwen2.context_length"], 32768);
        assert!(show["model_info"]["qwen2.attention.head_count_kv"].is_u64());
        let params = show["parameters"].as_str().unwrap();
        assert!(
            params.starts_with("num_ctx                        8192\n"),
            "{params}"
        );
        assert_eq!(
            show["capabilities"],
            serde_json::json!(["completion", "tools"])
        );
        let show = post(&srv, "/api/show", r#"{"model":"llama3.2"}"#).await;
        assert!(show
            .text()
            .contains(r#""parameters":"stop                           \"\u003c|eot_id|\u003e\"""#));

        let models = get(&srv, "/v1/models").await;
        assert!(models.text().ends_with("\n"));
        let v = models.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "llama3.2:latest");
        assert_eq!(v["data"][0]["owned_by"], "library");
        let one = get(&srv, "/v1/models/qwen2.5:7b").await.json();
        assert_eq!(one["id"], "qwen2.5:7b");
        assert_eq!(
            get(&srv, "/v1/models/nope").await.status,
            StatusCode::NOT_FOUND
        );

        // copy, delete, pull
        let r = post(
            &srv,
            "/api/copy",
            r#"{"source":"llama3.2","destination":"mine"}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.is_empty());
        let r = send(&srv, Method::DELETE, "/api/delete", r#"{"model":"mine"}"#).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = send(&srv, Method::DELETE, "/api/delete", r#"{"model":"mine"}"#).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = post(&srv, "/api/pull", r#"{"model":"llama3.2"}"#).await;
        assert_eq!(r.content_type(), "application/x-ndjson");
        let lines = r.lines();
        assert_eq!(
            lines.last().unwrap(),
            &serde_json::json!({"status":"success"})
        );
        let r = post(&srv, "/api/pull", r#"{"model":"llama3.2","stream":false}"#).await;
        assert_eq!(r.text(), r#"{"status":"success"}"#);

        // ps lists latest expiry first.
        post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","keep_alive":"1m"}"#,
        )
        .await;
        post(
            &srv,
            "/api/generate",
            r#"{"model":"qwen2.5:7b","keep_alive":"1h"}"#,
        )
        .await;
        let ps = get(&srv, "/api/ps").await.json();
        assert_eq!(ps["models"][0]["name"], "qwen2.5:7b");
        assert_eq!(ps["models"][0]["context_length"], 8192);
        assert_eq!(ps["models"][1]["name"], "llama3.2:latest");
        assert_eq!(ps["models"][1]["context_length"], 4096);
    }

    #[tokio::test]
    async fn embeddings_routes() {
        let srv = start(manual()).await;
        let r = post(
            &srv,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":["hello","world!"]}"#,
        )
        .await;
        let v = r.json();
        assert_eq!(v["model"], "nomic-embed-text");
        assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
        assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 8);
        assert_eq!(v["prompt_eval_count"], 2 + 2);
        assert!(r
            .text()
            .starts_with(r#"{"model":"nomic-embed-text","embeddings":[["#));
        let expected: Vec<f64> = common::embedding("hello", 8)
            .into_iter()
            .map(f64::from)
            .collect();
        let got: Vec<f64> = v["embeddings"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (a, b) in expected.iter().zip(&got) {
            assert!((a - b).abs() < 1e-6);
        }
        let r = post(
            &srv,
            "/api/embeddings",
            r#"{"model":"nomic-embed-text","prompt":"hello"}"#,
        )
        .await;
        assert_eq!(r.json()["embedding"], v["embeddings"][0]);
        let r = post(
            &srv,
            "/v1/embeddings",
            r#"{"model":"nomic-embed-text","input":"hello"}"#,
        )
        .await;
        let o = r.json();
        assert_eq!(o["object"], "list");
        assert_eq!(o["data"][0]["object"], "embedding");
        assert_eq!(o["data"][0]["embedding"], v["embeddings"][0]);
        assert_eq!(
            o["usage"],
            serde_json::json!({"prompt_tokens":2,"total_tokens":2})
        );
        assert!(r.text().ends_with("}\n"));
        let r = post(
            &srv,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"x","keep_alive":"0s","truncate":false}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(srv.state.loaded().is_empty());
        assert_eq!(
            GoFloat(1.0)
                .serialize(serde_json::value::Serializer)
                .unwrap(),
            1
        );
        assert_eq!(
            String::from_utf8(common::go_json(&GoFloat(-1.0))).unwrap(),
            "-1"
        );
    }

    #[tokio::test]
    async fn cors_head_and_load_options() {
        let srv = start(manual()).await;
        let pre = raw(
            &srv,
            "OPTIONS /api/chat HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
        )
        .await
        .to_ascii_lowercase();
        assert!(pre.starts_with("http/1.1 204 no content\r\n"), "{pre}");
        assert!(pre.contains("access-control-allow-origin: http://localhost:3000\r\n"));
        assert!(pre.contains("access-control-allow-headers: authorization,content-type"));
        let bad = raw(
            &srv,
            "GET / HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(bad.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{bad}");
        let ok = raw(
            &srv,
            "GET /api/version HTTP/1.1\r\nHost: localhost\r\nOrigin: vscode-webview://abc\r\nConnection: close\r\n\r\n",
        )
        .await
        .to_ascii_lowercase();
        assert!(
            ok.contains("access-control-allow-origin: vscode-webview://abc\r\n"),
            "{ok}"
        );
        assert!(wildcard_match(
            "https://*.example.com",
            "https://a.example.com"
        ));
        assert!(!origin_allowed("http://localhost.evil.com", &[]));

        let head = raw(
            &srv,
            "HEAD /api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

        // A load request's num_ctx is the context the runner gets.
        let r = post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","options":{"num_ctx":16384}}"#,
        )
        .await;
        assert_eq!(r.json()["done_reason"], "load");
        assert_eq!(srv.state.loaded_num_ctx("llama3.2"), Some(16384));
        // Without options the effective default (4096) differs: a reload.
        post(
            &srv,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"x","stream":false}"#,
        )
        .await;
        assert_eq!(srv.state.loaded_num_ctx("llama3.2"), Some(4096));
        assert_eq!(srv.state.load_count("llama3.2"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn full_server_waits_for_an_idle_model() {
        let cfg = OllamaConfig {
            load_latency: Duration::from_secs(1),
            token_delay: Duration::from_secs(1),
            reply_tokens: 3,
            max_loaded_models: 1,
            ..manual()
        };
        let srv = Arc::new(start(cfg).await);
        let s1 = srv.clone();
        let a = tokio::spawn(async move {
            post(
                &s1,
                "/api/generate",
                r#"{"model":"llama3.2","prompt":"a","stream":false}"#,
            )
            .await
        });
        for _ in 0..100_000 {
            if srv.state.active_requests() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(srv.state.active_requests(), 1);
        let s2 = srv.clone();
        let b = tokio::spawn(async move {
            post(
                &s2,
                "/api/generate",
                r#"{"model":"qwen2.5:7b","prompt":"b","stream":false}"#,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // llama3.2 is busy for 3 s more: nothing to evict yet.
        assert_eq!(srv.state.load_count("qwen2.5:7b"), 0);
        assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert_eq!(a.json()["done_reason"], "stop");
        assert_eq!(b.json()["done_reason"], "stop");
        assert!(b.json()["load_duration"].as_u64().unwrap() > 3_000_000_000);
        assert_eq!(srv.state.loaded(), vec!["qwen2.5:7b"]);
        assert_eq!(srv.state.load_count("qwen2.5:7b"), 1);
    }

    #[test]
    fn go_durations_and_names() {
        assert_eq!(parse_go_duration("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse_go_duration("-1.5h"), Ok(-5_400_000_000_000));
        assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
        assert_eq!(parse_go_duration("1µs"), Ok(1_000));
        assert!(parse_go_duration("1.s").is_ok());
        assert!(parse_go_duration(".s").is_err());
        assert!(parse_go_duration("9999999999h").is_err());
        assert_eq!(full_name("llama3.2"), "llama3.2:latest");
        assert_eq!(full_name("hf.co/x/y:Q4"), "hf.co/x/y:Q4");
        assert_eq!(full_name("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(owner("hf.co/bartowski/m:Q4"), "bartowski");
        assert_eq!(owner("llama3.2"), "library");
        assert_eq!(local_rfc3339(t0(), 0), "2026-11-26T10:00:00Z");
        assert_eq!(
            local_rfc3339(t0(), 5 * 3600 + 1800),
            "2026-11-26T15:30:00+05:30"
        );
    }
}
