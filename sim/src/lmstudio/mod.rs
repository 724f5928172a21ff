//! Simulated LM Studio server (`docs/providers.md` §2, checklist docs/providers.md §5.2): the public handle
//! (`LmStudioSim`, `spawn`, `bind`), bearer auth and the router. Routes live in `openai`
//! (`/v1/*`, `/api/v0/*`), `native` (`/api/v1/*`), `config` (knobs, model lists) and
//! `websocket` (the SDK's WebSocket protocol); `state` owns loaded models, JIT and TTL,
//! `generate` token pacing and streams, `request` body parsing and errors, `wire` the JSON.

mod config;
mod generate;
mod native;
mod openai;
mod request;
mod state;
mod websocket;
mod wire;

#[cfg(test)]
mod tests;

pub use config::{LmStudioConfig, Overflow};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::common::{record, serve, CallLog, Clock, SimBody, SimServer};
use request::Api;
use state::State;
use websocket::{is_websocket_upgrade, websocket};
use wire::{json, Greeting, UnknownEndpoint};

/// Content type of every JSON answer (Express `res.json`).
const JSON: &str = "application/json; charset=utf-8";
/// Content type of every stream.
const SSE: &str = "text/event-stream";
/// The SDK's WebSocket namespaces; a WebSocket upgrade on one of them is accepted (`/llm`
/// and `/embedding` answer the SDK's calls, the others authenticate only).
pub const WS_NAMESPACES: [&str; 7] = [
    "/llm",
    "/embedding",
    "/system",
    "/files",
    "/repository",
    "/diagnostics",
    "/plugins",
];

/// The simulator's shared state: call log, clock, loaded models and counters.
pub struct LmStudioSim {
    pub log: CallLog,
    pub clock: Clock,
    cfg: LmStudioConfig,
    state: Mutex<State>,
    active: AtomicUsize,
    cancelled: AtomicUsize,
    /// Unload requests that found the instance generating (see `unloads_while_busy`).
    unloads_while_busy: AtomicUsize,
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
            unloads_while_busy: AtomicUsize::new(0),
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

    /// `/api/v1/models/unload` requests that removed an instance while it had generations in
    /// progress (they finish as before). TTL expiry is not an unload request and never counts;
    /// a proxy that owns unloading should never cause one.
    pub fn unloads_while_busy(&self) -> usize {
        self.unloads_while_busy.load(Ordering::SeqCst)
    }

    /// Every SDK message clients sent over WebSocket, as `<namespace> <type> <endpoint>`
    /// (`llm channelCreate predict`, `embedding rpcCall embedString`), in order.
    pub fn sdk_messages(&self) -> Vec<String> {
        self.lock().sdk_messages.clone()
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
}

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
    let sdk_upgrade = call.method == Method::GET
        && WS_NAMESPACES.contains(&call.path.as_str())
        && is_websocket_upgrade(&call);
    // The SDK probes the greeting and opens its WebSocket without an `Authorization` header
    // and authenticates in-band (see `websocket`), so neither needs the bearer token.
    let open = sdk_upgrade || (call.method == Method::GET && call.path == "/lmstudio-greeting");
    if let (Some(key), false) = (&sim.cfg.api_key, open) {
        let expected = format!("Bearer {key}");
        let ok = call
            .headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !ok {
            // LM Studio 0.4.18's answer to a request without a token, as its server log
            // shows it (reported in github.com/agustif/opencode-lmstudio issue 41): an
            // `error` object with `type`, `code` and `message`, no `param`. The message for
            // a wrong token is not on record; the simulator says so in the same shape.
            let message = if call.headers.contains_key(header::AUTHORIZATION) {
                "The LM Studio API token provided using the Authorization header is not \
                 valid. Learn more at: https://lmstudio.ai/docs/developer/core/authentication."
            } else {
                "An LM Studio API token is required to make requests to this server, but \
                 none was provided using the Authorization header using the 'Bearer' scheme \
                 (i.e., 'Authorization: Bearer $LM_API_TOKEN'). Learn more at: \
                 https://lmstudio.ai/docs/developer/core/authentication."
            };
            let body = serde_json::json!({"error": {
                "type": "invalid_request",
                "code": "invalid_api_key",
                "message": message,
            }});
            return json(StatusCode::UNAUTHORIZED, &body);
        }
    }
    if sdk_upgrade {
        return websocket(sim.clone(), &call, on_upgrade);
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
        (&Method::POST, "/v1/responses") => sim.responses(&call).await,
        (&Method::POST, "/v1/messages") => sim.messages(&call).await,
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
