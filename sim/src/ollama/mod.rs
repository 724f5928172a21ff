//! Simulated Ollama server (API of 0.13, `docs/providers.md` §1 and §5.1): the native `/api/*`
//! routes and the OpenAI `/v1/*` layer (`/v1/audio/transcriptions` included: audio.rs), byte-faithful framing, load latency, shared loads,
//! keep-alive expiry on a steppable clock, LRU eviction, reloads on `num_ctx` / `num_batch` changes and truncation.
//! Not simulated: real inference, tool calls, thinking, images (only counted), the machine-hostname Host rule,
//! `/api/push|create|blobs`, `/v1/responses|messages`, memory-based scheduling and per-model
//! parallelism limits (a loaded model serves any number of requests at once).

// /v1/audio/transcriptions: a multipart form over a chat.
mod audio;
// OllamaConfig and the catalogue facts derived from a model.
/// `/v1/messages` (Anthropic) and `/v1/responses` (OpenAI Responses).
mod compat;
mod config;
// /api/embed, /api/embeddings and the core /v1/embeddings shares.
mod embed;
// Planning a reply (truncation, num_predict) and driving its delivery.
mod generation;
// KeepAlive and Go's duration syntax.
mod keep_alive;
// The /api/* handlers other than embeddings.
mod native;
// The /v1 layer over the same scheduler and generation.
mod openai;
// The bytes of each chunk, final line and whole body, per wire flavour.
mod render;
// Decoding request bodies with Go's error texts; ApiError.
mod request;
// HTTP in: Host and CORS checks, the method table, dispatch.
mod routes;
// Runners, loads, LRU eviction, keep-alive expiry, leases.
mod scheduler;
// JSON body types (fields in Go's order) and framing helpers.
mod wire;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::common::{self, CallLog, Clock, SimServer};
use super::SimModel;

pub use config::OllamaConfig;

use config::full_name;
use scheduler::State;

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
/// Each image counts this many tokens (docs/providers.md §1.9).
const IMAGE_TOKENS: u32 = 768;
/// Ollama's default `num_keep`.
const DEFAULT_NUM_KEEP: u32 = 4;

const QUEUE_FULL: &str = "server busy, please try again.  maximum pending requests exceeded";
const PROMPT_TOO_LONG: &str = "the prompt is longer than the context length currently available to the model; shorten the prompt, adjust the context length in settings, or use a model with a longer context length";
const STREAM_FAILURE: &str = "llama runner process has terminated: exit status 2";

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
    /// Unload requests that found the model held by other requests (see `unloads_while_busy`).
    unloads_while_busy: AtomicUsize,
    queued: AtomicUsize,
    fail_load: Mutex<Option<String>>,
    fail_stream: Mutex<Option<usize>>,
    /// Ollama checks `Host` only when bound to a loopback address.
    host_check: bool,
    /// Per model, the `num_parallel` generation slots (when limited).
    slots: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// Locks `m`, carrying on with the data if a holder panicked.
fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            state: Mutex::new(State::new(catalogue)),
            cfg,
            changed: Notify::new(),
            active: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            unloads_while_busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            fail_load: Mutex::new(None),
            fail_stream: Mutex::new(None),
            host_check,
            slots: Mutex::new(Default::default()),
        }
    }

    /// Waits for one of `model`'s `num_parallel` generation slots (none when unlimited).
    async fn generation_slot(&self, model: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.cfg.num_parallel == 0 {
            return None;
        }
        let sem = relock(&self.slots)
            .entry(model.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.cfg.num_parallel)))
            .clone();
        sem.acquire_owned().await.ok()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        relock(&self.state)
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
        self.runner_names(true)
    }

    /// Full names of the models whose load is in progress.
    pub fn loading(&self) -> Vec<String> {
        self.runner_names(false)
    }

    /// Sorted full names of the runners that are (or are not yet) ready.
    fn runner_names(&self, ready: bool) -> Vec<String> {
        let st = self.fresh();
        st.runners
            .iter()
            .filter(|(_, r)| r.ready == ready)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The context a loaded model runs with.
    pub fn loaded_num_ctx(&self, model: &str) -> Option<u32> {
        let st = self.fresh();
        st.runners.get(&full_name(model)).map(|r| r.num_ctx)
    }

    /// The batch size a loaded model runs with.
    pub fn loaded_num_batch(&self, model: &str) -> Option<u32> {
        let st = self.fresh();
        st.runners.get(&full_name(model)).map(|r| r.num_batch)
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

    /// Unloads asked for while other requests held the model (waiting for its load or
    /// generating): a load-only `keep_alive:0` request that arrives then, or a request with
    /// `keep_alive:0` that ends then. Ollama defers such an unload until the model is idle,
    /// and so does the simulator; a proxy that owns unloading should never cause one.
    pub fn unloads_while_busy(&self) -> usize {
        self.unloads_while_busy.load(Ordering::SeqCst)
    }

    /// The next load fails after the load latency: 500 `{"error":message}`.
    pub fn fail_next_load(&self, message: &str) {
        *relock(&self.fail_load) = Some(message.to_string());
    }

    /// The next streamed generation writes `chunks` token chunks, then an error line and no
    /// done line.
    pub fn fail_next_stream_after(&self, chunks: usize) {
        *relock(&self.fail_stream) = Some(chunks);
    }

    /// Adds a model to the catalogue (as if pulled).
    pub fn add_model(&self, mut model: SimModel) {
        model.name = full_name(&model.name);
        let mut st = self.lock();
        st.catalogue.retain(|m| m.name != model.name);
        st.catalogue.push(model);
    }
}

/// Serves a simulated Ollama on `listener`; call inside a tokio runtime.
pub fn spawn(cfg: OllamaConfig, listener: TcpListener) -> SimServer<OllamaSim> {
    let host_check = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(true);
    let sim = Arc::new(OllamaSim::new(cfg, host_check));
    common::serve(listener, sim, routes::handle)
}

/// Binds `addr` (e.g. `127.0.0.1:0`) and serves a simulated Ollama on it.
pub async fn bind(cfg: OllamaConfig, addr: &str) -> std::io::Result<SimServer<OllamaSim>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(spawn(cfg, listener))
}
