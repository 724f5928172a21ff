//! The provider poller: every `poll_interval` (and at once when the lifecycle actor asks,
//! after each of its loads and unloads) it asks a provider which models it has loaded. That
//! tells the proxy whether the provider is up (health), and what others did behind its back:
//! the lifecycle actor reconciles its table with the list (`LifecycleHandle::report`), the
//! per-model counters take the provider's sizes (`StatsTable::apply_report`), the memory
//! table splits each model's memory (asking `/api/show` once per model). The proxy's own
//! loads and unloads do not wait for a poll: the actor publishes them as they happen.
//!
//! For llama-server it also learns the mode (router or single model) and, once per loaded
//! model, its window (`/props`) and its tokenizer's ratio to the estimator (`/tokenize`).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::{watch, Notify};

use crate::providers::{error_chain, LoadedModel, ProviderKind};
use crate::state::AppState;
use crate::upstream::{LlamaMode, ProviderState};

/// How long one poll of a provider may take, answer and body together.
const POLL_TIMEOUT: Duration = Duration::from_secs(3);
/// Re-read the model catalogue (sizes) every this many polls (a minute at the default 5 s).
const CATALOG_EVERY: usize = 12;
/// The most of a loaded-models list the poller reads.
const POLL_BODY_LIMIT: usize = 4 << 20;

/// The poller of one provider, and what only it keeps.
pub struct Poller {
    state: Arc<AppState>,
    i: usize,
    /// Which of `facts().loaded_paths` answered last; a poll starts there.
    loaded_path: AtomicUsize,
    /// Polls made, to re-read the model catalogue every [`CATALOG_EVERY`] polls.
    polls: AtomicUsize,
    /// llama-server models whose window (`/props`) and token ratio (`/tokenize`) were read
    /// since they were loaded.
    probed: Mutex<Vec<String>>,
    /// Wakes the poll loop now (the lifecycle actor does after each load and unload).
    poll_now: Arc<Notify>,
}

impl Poller {
    pub fn new(state: Arc<AppState>, i: usize, poll_now: Arc<Notify>) -> Arc<Poller> {
        Arc::new(Poller {
            state,
            i,
            loaded_path: AtomicUsize::new(0),
            polls: AtomicUsize::new(0),
            probed: Mutex::new(Vec::new()),
            poll_now,
        })
    }

    fn provider(&self) -> &ProviderState {
        &self.state.providers[self.i]
    }

    /// Polls every `poll_interval`, and when woken, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = self.provider().config.poll_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.poll().await,
                _ = self.poll_now.notified() => self.poll().await,
                _ = stop.changed() => return,
            }
        }
    }

    /// Asks the provider once which models it has loaded: records whether it answered at
    /// all (health) and what it listed.
    pub async fn poll(&self) {
        let (state, i, p) = (&*self.state, self.i, self.provider());
        let polled_at = tokio::time::Instant::now();
        let n = self.polls.fetch_add(1, Relaxed);
        if n.is_multiple_of(CATALOG_EVERY) {
            if let Some(path) = p.config.kind.facts().catalog_path {
                if let Ok(Ok((status, body))) =
                    tokio::time::timeout(POLL_TIMEOUT, self.fetch(path)).await
                {
                    if status.is_success() {
                        if let Ok(sizes) = p.config.kind.parse_catalog(path, &body) {
                            state.memory.set_weights(i, &sizes);
                            state
                                .stats
                                .set_catalog(i, sizes.iter().map(|(m, _)| m.as_str()));
                            p.lifecycle.catalog(sizes);
                        }
                    }
                }
            }
        }
        let paths = p.config.kind.facts().loaded_paths;
        // Start from the path that answered last time (older LM Studio builds lack /api/v1).
        let first = self.loaded_path.load(Relaxed).min(paths.len() - 1);
        for (at, path) in paths.iter().enumerate().skip(first) {
            let fetched = tokio::time::timeout(POLL_TIMEOUT, self.fetch(path)).await;
            let (status, body) = match fetched {
                Err(_) => {
                    return p
                        .mark_unreachable(format!("no answer from {path} within {POLL_TIMEOUT:?}"))
                }
                Ok(Err(FetchError::Connect(e))) => {
                    if e.is_connect() {
                        p.mark_unreachable(error_chain(&e));
                    }
                    return;
                }
                Ok(Err(FetchError::Other(why))) => {
                    // Something answered: the provider is up, its list is not readable.
                    p.mark_reachable();
                    tracing::debug!(provider = %p.config.name, %why, "cannot read loaded models");
                    return;
                }
                Ok(Ok(answer)) => answer,
            };
            p.mark_reachable();
            if status == http::StatusCode::NOT_FOUND && at + 1 < paths.len() {
                continue;
            }
            self.loaded_path.store(at, Relaxed);
            if matches!(
                status,
                http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN
            ) {
                // LM Studio with "Require Authentication" on, and no or a wrong
                // `upstream_api_key`: said in /status, tried again at the next poll.
                let hint = if p.config.upstream.has_api_key() {
                    "the provider refuses providers[].upstream_api_key"
                } else {
                    "the provider asks a key: set providers[].upstream_api_key"
                };
                let message = crate::providers::ops::error_message(status, &body);
                return p.mark_refused(format!("GET {path}: {status}: {message} ({hint})"));
            }
            if !status.is_success() {
                tracing::debug!(provider = %p.config.name, %path, %status, "loaded-models list refused");
                return;
            }
            p.mark_accepted();
            if n.is_multiple_of(CATALOG_EVERY) && p.config.kind.facts().catalog_path.is_none() {
                // LM Studio's /api/v1 list carries every model's size with its state.
                if let Ok(sizes) = p.config.kind.parse_catalog(path, &body) {
                    state.memory.set_weights(i, &sizes);
                    state
                        .stats
                        .set_catalog(i, sizes.iter().map(|(m, _)| m.as_str()));
                    p.lifecycle.catalog(sizes);
                }
            }
            match p.config.kind.parse_loaded(path, &body) {
                Ok(loaded) => {
                    if p.config.kind == ProviderKind::LlamaCpp {
                        self.probe_llamacpp(&body, &loaded).await;
                    }
                    state.stats.apply_report(i, &loaded);
                    self.update_memory(&loaded).await;
                    if p.managed() {
                        p.lifecycle.report(loaded, polled_at);
                    }
                }
                Err(why) => {
                    tracing::debug!(provider = %p.config.name, %why, "cannot read loaded models")
                }
            }
            return;
        }
    }

    /// llama-server: its mode (router or single) from `/models`, and for each model newly
    /// loaded its window (`/props` `n_ctx`, to the lifecycle actor, which publishes it) and
    /// the tokenizer's ratio to the estimator (`/tokenize` of a fixed sample: exact counts,
    /// so compaction fits prompts to the token).
    async fn probe_llamacpp(&self, body: &[u8], loaded: &[LoadedModel]) {
        let (state, p) = (&*self.state, self.provider());
        let router = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| crate::providers::llamacpp::is_router(&v));
        if let Some(router) = router {
            let mode = if router {
                LlamaMode::Router
            } else {
                LlamaMode::Single
            };
            if p.set_llama_mode(mode) {
                tracing::info!(provider = %p.config.name, mode = mode.as_str(), "llama-server mode");
            }
        }
        let fresh: Vec<&LoadedModel> = {
            let mut probed = self.probed.lock().unwrap_or_else(|e| e.into_inner());
            probed.retain(|m| loaded.iter().any(|l| l.model == *m));
            loaded
                .iter()
                .filter(|m| !probed.contains(&m.model))
                .collect()
        };
        let routed = p.llama_mode() == LlamaMode::Router;
        for m in fresh {
            let model = routed.then_some(m.model.as_str());
            let up = &p.config.upstream;
            let n_ctx = crate::providers::ops::llamacpp_n_ctx(&state.client, up, model).await;
            if let Some(n_ctx) = n_ctx {
                p.lifecycle.observe_window(&m.model, n_ctx);
            }
            let sample = crate::providers::llamacpp::CALIBRATION_SAMPLE;
            let exact =
                crate::providers::ops::llamacpp_tokenize(&state.client, up, model, sample).await;
            match exact {
                Ok(exact) => {
                    let cx = &state.compactor;
                    let estimated = cx.counter.count_text(cx.encoding(&m.model), sample);
                    cx.counter
                        .calibrate(&p.config.name, &m.model, estimated, exact);
                    tracing::debug!(provider = %p.config.name, model = %m.model, estimated, exact, "token ratio from /tokenize");
                }
                Err(e) => {
                    tracing::debug!(provider = %p.config.name, model = %m.model, error = %e, "cannot tokenize")
                }
            }
            self.probed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m.model.clone());
        }
    }

    /// Per-model memory buffers for `/status`: each loaded model's reported size split into
    /// weights, KV cache and working buffers. An Ollama model's geometry is asked once
    /// (`/api/show`).
    async fn update_memory(&self, loaded: &[LoadedModel]) {
        let (state, i, p) = (&*self.state, self.i, self.provider());
        for m in loaded {
            if p.config.kind == ProviderKind::Ollama {
                let (client, up) = (&state.client, &p.config.upstream);
                state
                    .memory
                    .geometry_or_fetch(i, client, up, &m.model)
                    .await;
            }
            if let Some(size) = m.size_bytes {
                let tokens = state.stats.model(i, &m.model).context_tokens();
                // The provider's settings as they are now (Ollama reports neither); a
                // reported `parallel` wins.
                let live = state.config.load();
                let settings = live.providers.get(i).unwrap_or(&p.config);
                let kv = crate::memory::KvLayout {
                    slots: m.parallel.unwrap_or(u64::from(settings.num_parallel)),
                    bytes_per_element: crate::memory::kv_bytes_per_element(&settings.kv_cache_type),
                };
                state
                    .memory
                    .update(i, &m.model, size, m.context_length, kv, tokens);
            }
        }
        let names: Vec<&str> = loaded.iter().map(|m| m.model.as_str()).collect();
        state.memory.forget(i, &names);
    }

    /// `GET upstream + path`, body read up to [`POLL_BODY_LIMIT`].
    async fn fetch(&self, path: &str) -> Result<(http::StatusCode, bytes::Bytes), FetchError> {
        let p = self.provider();
        let mut req = Request::get(format!("{}{path}", p.config.upstream))
            .body(Full::new(bytes::Bytes::new()))
            .map_err(|e| FetchError::Other(e.to_string()))?;
        p.config.upstream.authorize(req.headers_mut());
        let resp = self
            .state
            .client
            .request(req)
            .await
            .map_err(FetchError::Connect)?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), POLL_BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| FetchError::Other(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}

enum FetchError {
    Connect(hyper_util::client::legacy::Error),
    Other(String),
}
