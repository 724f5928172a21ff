//! Simulated llama.cpp `llama-server` (`docs/providers.md` §3, checklist docs/providers.md §5.3), in single-model
//! or router mode: the public handle (`LlamaCppSim`, `spawn`, `bind`) and the dispatch of
//! requests to their routes. `state` owns the model table, loads, evictions and slots;
//! `generate` the completion routes (OpenAI and native), their streams and embeddings; `native`
//! the other per-model routes (props, slots, metrics, tokenizer); `models` the model
//! lists and the router's load/unload; `wire` the ordered JSON and the error shape.
//!
//! Shapes follow `docs/providers.md` §3 where a live build (router mode, checked against the
//! simulator) agreed, and the live build where it did not: `/props` and `/slots` fields, `meta`
//! with `n_ctx` and `ftype`, `prompt_tokens_details`, timings on the usage chunk, the 404 page.
//!
//! Not simulated: sleep on idle, `/models/sse`, API keys, `/infill`, `/rerank`, `/v1/messages`,
//! `/v1/responses`, SSE comment pings, and the moment between an unload request and the
//! child's exit (a real router still reports `loaded` until then; here the unload is at once).

mod config;
mod generate;
mod models;
mod native;
mod state;
mod wire;

#[cfg(test)]
mod tests;

pub use config::{LlamaCppConfig, UsagePlacement};
pub use generate::{chat_prompt_tokens, GENERATION_PROMPT, MESSAGE_OVERHEAD};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value};
use tokio::net::TcpListener;

use super::common::{record, serve, Call, CallLog, Clock, SimBody, SimServer};
use state::{Entry, Phase, State};
use wire::{json, obj, Fail};

/// `build_info` and `system_fingerprint` of the simulated build.
pub const BUILD_INFO: &str = "b7200-5f1ec8a";

/// The simulator's shared state: call log, clock, model table and counters.
pub struct LlamaCppSim {
    pub log: CallLog,
    pub clock: Clock,
    cfg: LlamaCppConfig,
    state: Mutex<State>,
    /// Requests holding a slot, all models.
    active: AtomicUsize,
    unloads_while_busy: AtomicUsize,
}

impl LlamaCppSim {
    fn new(cfg: LlamaCppConfig) -> Self {
        let models: Vec<_> = if cfg.router {
            cfg.models.clone()
        } else {
            cfg.models.iter().take(1).cloned().collect()
        };
        let state = State {
            entries: models
                .into_iter()
                .map(|m| {
                    let entry = Entry {
                        model: m.clone(),
                        instance: None,
                        exit_code: 0,
                        last_used: 0,
                        port: 0,
                        load_count: 0,
                        unload_count: 0,
                    };
                    (m.name, entry)
                })
                .collect(),
            fail_next_load: cfg.fail_load.clone(),
            ..State::default()
        };
        LlamaCppSim {
            log: CallLog::default(),
            clock: cfg.clock.clone(),
            cfg,
            state: Mutex::new(state),
            active: AtomicUsize::new(0),
            unloads_while_busy: AtomicUsize::new(0),
        }
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &LlamaCppConfig {
        &self.cfg
    }

    /// Ids of the models whose status is `loaded`, sorted.
    pub fn loaded(&self) -> Vec<String> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| e.status() == "loaded")
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `unloaded`, `loading` or `loaded`; `None` for a model the server does not have.
    pub fn status_of(&self, model: &str) -> Option<String> {
        self.lock()
            .entries
            .get(model)
            .map(|e| e.status().to_string())
    }

    /// Loads of `model` that completed (failed loads are not counted).
    pub fn load_count(&self, model: &str) -> usize {
        self.lock().entries.get(model).map_or(0, |e| e.load_count)
    }

    /// Unloads of `model`: `/models/unload` and `--models-max` evictions.
    pub fn unload_count(&self, model: &str) -> usize {
        self.lock().entries.get(model).map_or(0, |e| e.unload_count)
    }

    /// Requests holding a slot (generating), all models.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Unloads and evictions that hit a model with a request in flight (waiting for a slot or
    /// generating); each such request failed. A proxy that owns unloading should never cause one.
    pub fn unloads_while_busy(&self) -> usize {
        self.unloads_while_busy.load(Ordering::SeqCst)
    }

    /// Filenames saved with `/slots/{id}?action=save`, sorted.
    pub fn saved_slots(&self) -> Vec<String> {
        self.lock().saved.keys().cloned().collect()
    }

    /// Successful `/slots/{id}?action=restore` calls.
    pub fn restores(&self) -> usize {
        self.lock().restores
    }

    /// The next load (router mode) fails; `message` is what the child would have logged.
    pub fn fail_next_load(&self, message: &str) {
        self.lock().fail_next_load = Some(message.to_string());
    }
}

// === server ===

/// Starts the simulator on `listener` (call inside a tokio runtime). In single mode the
/// model starts loading at once (`/health` answers 503 for `load_latency`).
pub fn spawn(cfg: LlamaCppConfig, listener: TcpListener) -> SimServer<LlamaCppSim> {
    let sim = Arc::new(LlamaCppSim::new(cfg));
    if !sim.cfg.router {
        let mut st = sim.lock();
        if let Some(name) = st.entries.keys().next().cloned() {
            // The process itself is the model: no startup failure is simulated.
            let failure = st.fail_next_load.take();
            sim.start_load(&mut st, &name);
            st.fail_next_load = failure;
        }
    }
    serve(listener, sim, handle)
}

/// Binds `addr` (e.g. `127.0.0.1:8080`, or port 0) and starts the simulator.
pub async fn bind(cfg: LlamaCppConfig, addr: &str) -> std::io::Result<SimServer<LlamaCppSim>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(spawn(cfg, listener))
}

type Handled = Result<Response<SimBody>, Fail>;

/// A request's body parsed as a JSON object (POST routes), and its query parameters.
pub(super) struct Req {
    pub(super) call: Call,
    pub(super) body: Map<String, Value>,
    pub(super) query: Vec<(String, String)>,
}

impl Req {
    pub(super) fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn str(&self, key: &str) -> Option<&str> {
        self.body.get(key).and_then(Value::as_str)
    }
}

async fn handle(sim: Arc<LlamaCppSim>, req: Request<Incoming>) -> Response<SimBody> {
    let (call, _) = record(req, &sim.log).await;
    let query = parse_query(call.query.as_deref().unwrap_or(""));
    let body = if call.method == Method::POST {
        match parse_body(&call) {
            Ok(b) => b,
            Err(f) => return f.response(),
        }
    } else {
        Map::new()
    };
    let req = Req { call, body, query };
    sim.dispatch(&req).await.unwrap_or_else(|f| f.response())
}

impl LlamaCppSim {
    async fn dispatch(self: &Arc<Self>, req: &Req) -> Handled {
        let path = req.call.path.as_str();
        let router = self.cfg.router;
        match (&req.call.method, path) {
            (&Method::GET, "/health" | "/v1/health") => self.health(),
            (&Method::GET, "/models" | "/v1/models") if router => Ok(self.router_models()),
            (&Method::GET, "/models" | "/v1/models") => self.single_models().await,
            (&Method::POST, "/models/load") if router => self.load_model(req),
            (&Method::POST, "/models/unload") if router => self.unload_model(req),
            (&Method::GET, "/props") if router && req.param("model").is_none() => {
                Ok(self.router_props())
            }
            (&Method::GET, "/props" | "/slots" | "/metrics") => {
                let inst = self.target(req).await?;
                match path {
                    "/props" => Ok(self.props(&inst)),
                    "/slots" => self.slots(&inst, req),
                    _ => self.metrics(&inst),
                }
            }
            (&Method::POST, p) if is_model_route(p) => {
                let inst = self.target(req).await?;
                match p {
                    "/v1/chat/completions" | "/chat/completions" => self.chat(req, inst).await,
                    "/v1/completions" => self.oai_completion(req, inst).await,
                    "/v1/messages" => self.messages(req, inst).await,
                    "/v1/responses" => self.responses(req, inst).await,
                    "/completion" | "/completions" => self.native_completion(req, inst).await,
                    "/v1/embeddings" => self.embeddings(req, inst, true).await,
                    "/embedding" | "/embeddings" => self.embeddings(req, inst, false).await,
                    "/tokenize" => self.tokenize(req),
                    "/detokenize" => self.detokenize(req),
                    "/apply-template" => self.apply_template(req),
                    _ => self.slot_action(req, &inst, &p["/slots/".len()..]),
                }
            }
            _ => Err(Fail::not_found("File Not Found")),
        }
    }

    /// The instance a model route goes to: router mode routes POST by the body's `model`
    /// (and marks it used), GET by `?model=`; `?autoload=` overrides the server default.
    async fn target(self: &Arc<Self>, req: &Req) -> Result<Arc<state::Instance>, Fail> {
        let post = req.call.method == Method::POST;
        let name = if post {
            req.str("model")
        } else {
            req.param("model")
        };
        let autoload = match req.param("autoload") {
            Some(v) => v == "true" || v == "1",
            None => self.cfg.autoload,
        };
        self.route(name, autoload, post).await
    }

    fn health(&self) -> Handled {
        if !self.cfg.router {
            let loading = self
                .lock()
                .entries
                .values()
                .any(|e| e.instance.as_ref().map(|i| i.phase()) == Some(Phase::Loading));
            if loading {
                return Err(Fail::unavailable("Loading model"));
            }
        }
        Ok(json(StatusCode::OK, &obj! {"status" => "ok"}))
    }
}

fn is_model_route(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions"
            | "/chat/completions"
            | "/v1/completions"
            | "/v1/messages"
            | "/v1/responses"
            | "/completion"
            | "/completions"
            | "/v1/embeddings"
            | "/embedding"
            | "/embeddings"
            | "/tokenize"
            | "/detokenize"
            | "/apply-template"
    ) || path
        .strip_prefix("/slots/")
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(v as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A POST body as a JSON object. A body that is not JSON (an empty one included) fails as
/// nlohmann's parser does in the real server: 400 with the parser's message.
fn parse_body(call: &Call) -> Result<Map<String, Value>, Fail> {
    match serde_json::from_slice::<Value>(&call.body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Fail::invalid("request body must be a JSON object")),
        Err(e) => Err(Fail::invalid(format!(
            "[json.exception.parse_error.101] parse error at line {}, column {}: syntax error \
             while parsing value - invalid literal",
            e.line(),
            e.column()
        ))),
    }
}
