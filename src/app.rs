//! Wiring: builds [`AppState`] from a [`Config`], binds every listener, runs the accept loops
//! and the provider health probes, and shuts all of it down on request.
//!
//! `start` binds before it returns, so a caller (a test on port 0, the binary) knows the real
//! addresses; `serve` takes the shutdown signal as a future.
//!
//! Each listener serves at most `proxy.max_connections` connections at once (more wait in
//! the OS backlog), cuts clients that do not send their headers within
//! `proxy.header_read_timeout`, and on shutdown gives open requests `proxy.shutdown_grace`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::config::{Config, ProviderConfig};
use crate::lifecycle::{LifecycleHandle, MemoryProbe, OpsBackend, Settings};
use crate::providers::ProviderKind;
use crate::proxy::{self, ProxyError, UpstreamClient};
use crate::stats::StatsTable;

/// Everything a request handler needs. Shared as `Arc<AppState>`; cloning the `Arc` is the
/// only per-connection cost.
pub struct AppState {
    /// The config in force: replaced whole by a reload (read lock-free; see [`reload`]).
    pub config: arc_swap::ArcSwap<Config>,
    /// Indexed like `config.providers`.
    pub providers: Vec<ProviderState>,
    pub stats: StatsTable,
    pub client: UpstreamClient,
    /// Token counting, the summary cache and recent compactions.
    pub compactor: crate::context::Compactor,
    /// What each loaded model's memory is made of (from the polls).
    pub memory: crate::memory::MemoryTable,
    /// The latest RAM / GPU sample and pressure level.
    pub monitor: crate::monitor::MonitorHandle,
    /// What the pressure response did recently.
    pub pressure_events: crate::monitor::respond::PressureLog,
    /// How often it acted, by action (`/metrics`).
    pub pressure_counters: crate::metrics::PressureCounters,
}

/// One provider at run time: its config, the address it is served on, and its health.
pub struct ProviderState {
    pub config: ProviderConfig,
    /// The address actually bound (differs from `config.listen` for port 0).
    pub listen: SocketAddr,
    reachable: AtomicBool,
    /// Why the last contact failed; cleared on success. Short critical sections only.
    last_error: Mutex<Option<String>>,
    /// Which of `facts().loaded_paths` answered last; the poller starts there.
    loaded_path: AtomicUsize,
    /// Polls made, to re-read the model catalogue every [`CATALOG_EVERY`] polls.
    polls: AtomicUsize,
    /// The owner of this provider's models: every load, unload and lease goes through it.
    pub lifecycle: LifecycleHandle,
    /// Its histograms and error counters (the same as `stats.provider(i)`).
    pub metrics: Arc<crate::metrics::ProviderMetrics>,
    /// Wakes the poller now (the lifecycle does after each load and unload).
    poll_now: Arc<Notify>,
    /// llama-server only: [`LLAMA_UNKNOWN`], [`LLAMA_ROUTER`] or [`LLAMA_SINGLE`], as its
    /// `/models` last said.
    llama_mode: AtomicU8,
    /// llama-server models whose window (`/props`) and token ratio (`/tokenize`) were read
    /// since they were loaded.
    probed: dashmap::DashSet<String>,
    /// The data plane's connections to the provider (`proxy::pool`).
    pub pool: Arc<crate::proxy::Pool>,
}

/// llama-server's mode is not known yet (no `/models` read).
pub const LLAMA_UNKNOWN: u8 = 0;
/// llama-server in router mode: models are loaded and unloaded through its API.
pub const LLAMA_ROUTER: u8 = 1;
/// llama-server with one model (`-m`): always loaded, no lifecycle.
pub const LLAMA_SINGLE: u8 = 2;

impl ProviderState {
    /// Whether the lifecycle manages this provider's models: always, but for a llama-server
    /// that is not (known to be) a router, whose one model is always loaded.
    pub fn managed(&self) -> bool {
        self.config.kind != ProviderKind::LlamaCpp || self.llama_mode.load(Relaxed) == LLAMA_ROUTER
    }

    /// llama-server's mode ([`LLAMA_UNKNOWN`], [`LLAMA_ROUTER`], [`LLAMA_SINGLE`]).
    pub fn llama_mode(&self) -> u8 {
        self.llama_mode.load(Relaxed)
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a successful exchange. Cheap when nothing changes (the hot path).
    pub fn mark_reachable(&self) {
        // A load first: the flag's cache line stays shared across cores on every request.
        if !self.reachable.load(Relaxed) && !self.reachable.swap(true, Relaxed) {
            tracing::info!(provider = %self.config.name, upstream = %self.config.upstream, "provider is reachable");
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn mark_unreachable(&self, why: String) {
        if self.reachable.swap(false, Relaxed) || self.last_error().is_none() {
            tracing::warn!(provider = %self.config.name, upstream = %self.config.upstream, error = %why, "provider is unreachable");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Classifies a failed upstream exchange, and records it when it says the provider is down.
    /// A failed exchange of the data plane, as the client will read it.
    pub fn pool_error(&self, e: &crate::proxy::PoolError) -> ProxyError {
        match e {
            crate::proxy::PoolError::Connect(reason) => self.upstream_fault(true, reason.clone()),
            crate::proxy::PoolError::Send(e) => self.upstream_fault(false, error_chain(e)),
            crate::proxy::PoolError::Exchange(e) => self.upstream_fault(false, error_chain(e)),
        }
    }

    /// The same for the control plane's pooled client (polls, loads).
    pub fn upstream_error(&self, e: &hyper_util::client::legacy::Error) -> ProxyError {
        self.upstream_fault(e.is_connect(), error_chain(e))
    }

    /// No connection (`connect`: the provider is marked unreachable), or a failed exchange.
    fn upstream_fault(&self, connect: bool, reason: String) -> ProxyError {
        if connect {
            self.mark_unreachable(reason.clone());
            ProxyError::UpstreamUnreachable {
                provider: self.config.name.clone(),
                upstream: self.config.upstream.to_string(),
                reason,
            }
        } else {
            ProxyError::UpstreamFailed {
                provider: self.config.name.clone(),
                reason,
            }
        }
    }
}

/// An error and its causes on one line ("client error (Connect): tcp connect error: ...").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Startup failures (a listener that cannot be bound). Separate from per-request errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: String,
        source: std::io::Error,
    },
    #[error("cannot start the data-plane threads: {0}")]
    Lanes(std::io::Error),
}

/// A started llm-warden: addresses are bound and requests are being served.
pub struct Running {
    pub state: Arc<AppState>,
    pub admin_addr: SocketAddr,
    /// Stops the listeners (which then drain) and the background loops.
    stop: watch::Sender<bool>,
    /// Stops the lifecycle actors and the monitor: only after the listeners drained (and the
    /// unloads on shutdown, if any, are done), since those go through the actors.
    stop_actors: watch::Sender<bool>,
    tasks: JoinSet<()>,
    actors: Vec<tokio::task::JoinHandle<()>>,
    /// The data plane's threads (`crate::lanes`); they stop when this and the accept
    /// loops' clones are dropped.
    _lanes: crate::lanes::Lanes,
}

impl Running {
    /// Reloads the config from `path` on SIGHUP and whenever the file changes
    /// ([`crate::reload`]).
    /// `loaded` is the file's content the running config came from (`None`: read it now).
    pub fn watch_config(&mut self, path: std::path::PathBuf, loaded: Option<Vec<u8>>) {
        let seen = loaded.or_else(|| std::fs::read(&path).ok());
        self.tasks.spawn(crate::reload::watch(
            self.state.clone(),
            path,
            seen,
            self.stop.subscribe(),
        ));
    }

    /// The bound address of provider `i`'s proxy listener.
    pub fn proxy_addr(&self, i: usize) -> SocketAddr {
        self.state.providers[i].listen
    }

    /// Stops accepting, lets open connections finish (up to `proxy.shutdown_grace`, then
    /// closes them), unloads the managed models if `limits.unload_on_shutdown` (within what
    /// is left of the grace period), and returns.
    pub async fn shutdown(mut self) {
        let config = self.state.config.load_full();
        let deadline = tokio::time::Instant::now() + config.proxy.shutdown_grace;
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        if config.limits.unload_on_shutdown
            && tokio::time::timeout_at(deadline, unload_all(&self.state))
                .await
                .is_err()
        {
            tracing::warn!("models still loaded when the shutdown grace period ended");
        }
        let _ = self.stop_actors.send(true);
        for a in self.actors {
            let _ = a.await;
        }
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.compactor.save_calibration()).await;
    }
}

/// `limits.unload_on_shutdown`: every model a lifecycle manages that is loaded (or loading)
/// and not pinned is unloaded through its actor, gracefully (requests still in flight
/// finish first), all providers at once.
async fn unload_all(state: &AppState) {
    use crate::lifecycle::ModelStatus;
    let mut unloads = Vec::new();
    for p in state.providers.iter().filter(|p| p.managed()) {
        for v in p.lifecycle.snapshot().await {
            if v.pinned || !matches!(v.status, ModelStatus::Ready | ModelStatus::Loading) {
                continue;
            }
            unloads.push(async move {
                match p.lifecycle.unload(&v.model).await {
                    Ok(_) => {
                        tracing::info!(provider = %p.config.name, model = %v.model, "unloaded on shutdown")
                    }
                    Err(e) => {
                        tracing::warn!(provider = %p.config.name, model = %v.model, error = %e, "cannot unload on shutdown")
                    }
                }
            });
        }
    }
    futures_util::future::join_all(unloads).await;
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr,
            what: what.to_string(),
            source,
        })
}

/// Binds every listener, checks every provider once, and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let resources = Box::new(crate::monitor::SystemProbe::new(config.memory_pressure.gpu));
    let probes = Probes {
        memory: None,
        resources,
    };
    start_with(config, probes).await
}

/// Where the proxy reads the machine's state; tests inject numbers.
pub struct Probes {
    /// Memory before each load (admission); `None` = the monitor's latest sample (RAM, and
    /// GPU memory where there are GPUs).
    pub memory: Option<Arc<dyn MemoryProbe>>,
    /// RAM, CPU and GPU memory, sampled every `memory_pressure.sample_interval`.
    pub resources: Box<dyn crate::monitor::ResourceProbe>,
}

/// [`start`] with other probes.
pub async fn start_with(config: Config, probes: Probes) -> Result<Running, StartError> {
    let Probes { memory, resources } = probes;
    let config = Arc::new(config);
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let (stop, stop_rx) = watch::channel(false);
    let (stop_actors, actors_rx) = watch::channel(false);
    let lanes =
        crate::lanes::Lanes::start(crate::lanes::default_count()).map_err(StartError::Lanes)?;
    let client = proxy::build_client(&config.proxy);
    let mut listeners = Vec::new();
    let mut providers = Vec::new();
    let mut actors = Vec::new();
    let (monitor, monitor_task) = crate::monitor::spawn(
        resources,
        config.memory_pressure.sample_interval,
        crate::monitor::Thresholds::from(&config.memory_pressure),
        actors_rx.clone(),
    );
    actors.push(monitor_task);
    let memory: Arc<dyn MemoryProbe> = match memory {
        Some(m) => m,
        None => Arc::new(monitor.clone()),
    };
    let stats = StatsTable::new(config.providers.iter().map(|p| p.name.clone()));
    for (i, p) in config.providers.iter().enumerate() {
        let l = bind(p.listen, &format!("provider `{}`", p.name)).await?;
        let poll_now = Arc::new(Notify::new());
        let backend = Arc::new(OpsBackend::new(
            client.clone(),
            p.upstream.clone(),
            p.kind,
            p.slot_save,
        ));
        let settings = Settings {
            pressure: Some(monitor.subscribe()),
            metrics: Some(stats.provider(i).clone()),
            ..Settings::from_config(&config, i)
        };
        let (lifecycle, actor) = LifecycleHandle::spawn(
            settings,
            backend,
            memory.clone(),
            poll_now.clone(),
            actors_rx.clone(),
        );
        actors.push(actor);
        providers.push(ProviderState {
            config: p.clone(),
            listen: l.local_addr().unwrap_or(p.listen),
            reachable: AtomicBool::new(false),
            last_error: Mutex::new(None),
            loaded_path: AtomicUsize::new(0),
            polls: AtomicUsize::new(0),
            lifecycle,
            metrics: stats.provider(i).clone(),
            poll_now,
            llama_mode: AtomicU8::new(LLAMA_UNKNOWN),
            probed: Default::default(),
            pool: crate::proxy::Pool::new(&p.upstream, config.proxy.connect_timeout, lanes.len()),
        });
        listeners.push(l);
    }
    let state = Arc::new(AppState {
        stats,
        client,
        providers,
        compactor: crate::context::Compactor::new(&config),
        memory: crate::memory::MemoryTable::new(config.providers.len()),
        pressure_events: crate::monitor::respond::PressureLog::new(crate::monitor::respond::KEPT),
        pressure_counters: Default::default(),
        monitor,
        config: arc_swap::ArcSwap::new(config.clone()),
    });

    // One poll of every provider before serving, so /status is right from the first call
    // and an unreachable provider is reported at once (not fatal).
    let checks = (0..state.providers.len()).map(|i| probe(state.clone(), i));
    futures_util::future::join_all(checks).await;

    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.listen);
    let limits = ConnLimits::from(&config.proxy);
    let mut tasks = JoinSet::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let st = state.clone();
        tracing::info!(
            provider = %state.providers[i].config.name,
            listen = %state.providers[i].listen,
            upstream = %state.providers[i].config.upstream,
            "proxy listening"
        );
        let timeout = limits.header_read_timeout;
        tasks.spawn(accept_loop(
            listener,
            Some(lanes.clone()),
            limits,
            state.clone(),
            stop_rx.clone(),
            move |stream, h2, stop| {
                let st = st.clone();
                // Not boxed: `handle` boxes the inspected path's future (kilobytes) itself, and
                // the pass-through one (about 2.9 KB) runs inside the connection's task.
                // Boxing it too cost an allocation and a 5 KB copy a request (callgrind:
                // about 700 instructions); not boxing it costs 1.2 KB of RSS per open
                // connection (`loadgen --hold 2000`: 43.1 -> 45.5 MB).
                let handler = move |req| proxy::handle(st.clone(), i, req);
                serve_data_plane(stream, h2, stop, timeout, handler)
            },
        ));
        tasks.spawn(health_loop(state.clone(), i, stop_rx.clone()));
    }
    tasks.spawn(crate::monitor::respond::run(
        state.clone(),
        state.monitor.subscribe(),
        stop_rx.clone(),
    ));
    let st = state.clone();
    tracing::info!(listen = %admin_addr, "admin listening");
    let timeout = limits.header_read_timeout;
    tasks.spawn(accept_loop(
        admin_listener,
        None,
        limits,
        state.clone(),
        stop_rx,
        move |stream, h2, stop| {
            let st = st.clone();
            serve_hyper(stream, h2, stop, timeout, move |req| {
                crate::admin::handle(st.clone(), req)
            })
        },
    ));
    Ok(Running {
        state,
        admin_addr,
        stop,
        stop_actors,
        tasks,
        actors,
        _lanes: lanes,
    })
}

/// Runs until `shutdown` completes, then drains open requests; if `force` completes first
/// during the drain (a second Ctrl-C), stops at once.
/// With `config_path`, the config is reloaded from it on SIGHUP and when it changes.
pub async fn serve(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> Result<(), StartError> {
    // The file as it is now, before anyone can see the proxy up: a change from here on is a
    // change to reload.
    let loaded = config_path.as_ref().and_then(|p| std::fs::read(p).ok());
    let mut running = start(config).await?;
    if let Some(path) = config_path {
        running.watch_config(path, loaded);
    }
    shutdown.await;
    let grace = running.state.config.load().proxy.shutdown_grace;
    tracing::info!(
        "shutting down: waiting up to {grace:?} for open requests (interrupt again to stop now)"
    );
    tokio::select! {
        _ = running.shutdown() => {}
        _ = force => tracing::warn!("stopping without waiting for open requests"),
    }
    Ok(())
}

/// How long one poll of a provider may take, answer and body together.
const POLL_TIMEOUT: Duration = Duration::from_secs(3);
/// Re-read the model catalogue (sizes) every this many polls (a minute at the default 5 s).
const CATALOG_EVERY: usize = 12;
/// The most of a loaded-models list the poller reads.
const POLL_BODY_LIMIT: usize = 4 << 20;

/// Asks the provider once which models it has loaded: records whether it answered at all
/// (health) and what it listed (`StatsTable::apply_report`).
async fn probe(state: Arc<AppState>, i: usize) {
    let p = &state.providers[i];
    let polled_at = tokio::time::Instant::now();
    let n = p.polls.fetch_add(1, Relaxed);
    if n.is_multiple_of(CATALOG_EVERY) {
        if let Some(path) = p.config.kind.facts().catalog_path {
            if let Ok(Ok((status, body))) =
                tokio::time::timeout(POLL_TIMEOUT, fetch(&state.client, p, path)).await
            {
                if status.is_success() {
                    if let Ok(sizes) = p.config.kind.parse_catalog(path, &body) {
                        state.memory.set_weights(i, &sizes);
                        p.lifecycle.catalog(sizes);
                    }
                }
            }
        }
    }
    let paths = p.config.kind.facts().loaded_paths;
    // Start from the path that answered last time (older LM Studio builds lack /api/v1).
    let first = p.loaded_path.load(Relaxed).min(paths.len() - 1);
    for (at, path) in paths.iter().enumerate().skip(first) {
        match tokio::time::timeout(POLL_TIMEOUT, fetch(&state.client, p, path)).await {
            Err(_) => {
                return p.mark_unreachable(format!("no answer from {path} within {POLL_TIMEOUT:?}"))
            }
            Ok(Err(FetchError::Connect(e))) => {
                let _ = p.upstream_error(&e);
                return;
            }
            Ok(Err(FetchError::Other(why))) => {
                // Something answered: the provider is up, its list is not readable.
                p.mark_reachable();
                tracing::debug!(provider = %p.config.name, %why, "cannot read loaded models");
                return;
            }
            Ok(Ok((status, body))) => {
                p.mark_reachable();
                if status == http::StatusCode::NOT_FOUND && at + 1 < paths.len() {
                    continue;
                }
                p.loaded_path.store(at, Relaxed);
                if !status.is_success() {
                    tracing::debug!(provider = %p.config.name, %path, %status, "loaded-models list refused");
                    return;
                }
                if n.is_multiple_of(CATALOG_EVERY) && p.config.kind.facts().catalog_path.is_none() {
                    // LM Studio's /api/v1 list carries every model's size with its state.
                    if let Ok(sizes) = p.config.kind.parse_catalog(path, &body) {
                        state.memory.set_weights(i, &sizes);
                        p.lifecycle.catalog(sizes);
                    }
                }
                match p.config.kind.parse_loaded(path, &body) {
                    Ok(loaded) => {
                        if p.config.kind == ProviderKind::LlamaCpp {
                            probe_llamacpp(&state, i, &body, &loaded).await;
                        }
                        state.stats.apply_report(i, &loaded);
                        update_memory(&state, i, &loaded).await;
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
    }
}

/// llama-server: its mode (router or single) from `/models`, and for each model newly
/// loaded its window (`/props` `n_ctx`) and the tokenizer's ratio to the estimator
/// (`/tokenize` of a fixed sample: exact counts, so compaction fits prompts to the token).
async fn probe_llamacpp(
    state: &AppState,
    i: usize,
    body: &[u8],
    loaded: &[crate::providers::LoadedModel],
) {
    let p = &state.providers[i];
    let router = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| crate::providers::llamacpp::is_router(&v));
    if let Some(router) = router {
        let mode = if router { LLAMA_ROUTER } else { LLAMA_SINGLE };
        if p.llama_mode.swap(mode, Relaxed) != mode {
            tracing::info!(
                provider = %p.config.name,
                mode = if router { "router" } else { "single model" },
                "llama-server mode"
            );
        }
    }
    p.probed.retain(|m| loaded.iter().any(|l| l.model == *m));
    let routed = p.llama_mode() == LLAMA_ROUTER;
    for m in loaded {
        if p.probed.contains(&m.model) {
            continue;
        }
        let model = routed.then_some(m.model.as_str());
        let up = &p.config.upstream;
        if let Some(n_ctx) = crate::providers::ops::llamacpp_n_ctx(&state.client, up, model).await {
            p.lifecycle.observe_window(&m.model, n_ctx);
        }
        let sample = crate::providers::llamacpp::CALIBRATION_SAMPLE;
        match crate::providers::ops::llamacpp_tokenize(&state.client, up, model, sample).await {
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
        p.probed.insert(m.model.clone());
    }
}

/// Per-model memory buffers for `/status`: each loaded model's reported size split into
/// weights, KV cache and working buffers. An Ollama model's geometry is asked once
/// (`/api/show`).
async fn update_memory(state: &AppState, i: usize, loaded: &[crate::providers::LoadedModel]) {
    let p = &state.providers[i];
    for m in loaded {
        if p.config.kind == crate::providers::ProviderKind::Ollama
            && !state.memory.knows_geometry(i, &m.model)
        {
            let show =
                crate::providers::ops::show(&state.client, &p.config.upstream, &m.model).await;
            let g = show
                .ok()
                .and_then(|v| crate::memory::Geometry::from_show(&v));
            state.memory.set_geometry(i, &m.model, g);
        }
        if let Some(size) = m.size_bytes {
            let tokens = state.stats.model(i, &m.model).context_tokens();
            state
                .memory
                .update(i, &m.model, size, m.context_length, tokens);
        }
    }
    let names: Vec<&str> = loaded.iter().map(|m| m.model.as_str()).collect();
    state.memory.forget(i, &names);
}

enum FetchError {
    Connect(hyper_util::client::legacy::Error),
    Other(String),
}

/// `GET upstream + path`, body read up to [`POLL_BODY_LIMIT`].
async fn fetch(
    client: &proxy::UpstreamClient,
    p: &ProviderState,
    path: &str,
) -> Result<(http::StatusCode, bytes::Bytes), FetchError> {
    let req = Request::get(format!("{}{path}", p.config.upstream))
        .body(http_body_util::Either::Right(http_body_util::Full::new(
            bytes::Bytes::new(),
        )))
        .map_err(|e| FetchError::Other(e.to_string()))?;
    let resp = client.request(req).await.map_err(FetchError::Connect)?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), POLL_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| FetchError::Other(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

impl Running {
    /// Polls provider `i` now (as the background loop does every `poll_interval`).
    pub async fn refresh(&self, i: usize) {
        probe(self.state.clone(), i).await;
    }
}

/// Polls a provider every `poll_interval` so `/status` follows it coming and going, and
/// follows models loaded and unloaded behind the proxy's back.
async fn health_loop(state: Arc<AppState>, i: usize, mut stop: watch::Receiver<bool>) {
    let every = state.providers[i].config.poll_interval;
    let poll_now = state.providers[i].poll_now.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => probe(state.clone(), i).await,
            _ = poll_now.notified() => probe(state.clone(), i).await,
            _ = stop.changed() => return,
        }
    }
}

/// What every listener enforces on its connections (`[proxy]`; fixed at start).
#[derive(Clone, Copy)]
struct ConnLimits {
    max_connections: usize,
    header_read_timeout: Duration,
}

impl From<&crate::config::ProxyConfig> for ConnLimits {
    fn from(p: &crate::config::ProxyConfig) -> Self {
        ConnLimits {
            max_connections: usize::try_from(p.max_connections).unwrap_or(usize::MAX),
            header_read_timeout: p.header_read_timeout,
        }
    }
}

/// Accepts connections and serves each with `serve` (given the socket, whether it opened
/// with HTTP/2's preface, and the stop signal), each connection on the next of `lanes`
/// (`crate::lanes`; `None`: on this runtime), until `stop`; then waits for open connections
/// up to `proxy.shutdown_grace` (read when the stop comes, so a reload applies) and closes
/// those still open.
///
/// At most `max_connections` are open at once: the next one is accepted only when one ends,
/// so clients over the limit wait in the OS backlog instead of being refused by the proxy
/// (a burst is served late rather than failed). A client gets `header_read_timeout` to send
/// its first byte (the servers' own timers start once the protocol is known, so they would
/// not cover a client that sends nothing) and then its headers; the same timeout applies
/// between requests on a keep-alive connection.
async fn accept_loop<S, Fut>(
    listener: TcpListener,
    lanes: Option<crate::lanes::Lanes>,
    limits: ConnLimits,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
    serve: S,
) where
    S: Fn(tokio::net::TcpStream, bool, watch::Receiver<bool>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let mut conns = JoinSet::new();
    loop {
        let (slot, stream) = tokio::select! {
            r = accept_slot(&listener, &slots) => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connections so the set holds only open ones.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let serve = serve.clone();
        let first_byte = limits.header_read_timeout;
        let mut conn_stop = stop.clone();
        // To a lane: the socket leaves this runtime's reactor, to join the lane's.
        let (stream, lane) = match &lanes {
            Some(lanes) => match stream.into_std() {
                Ok(s) => (Socket::Moving(s), Some(lanes.next().clone())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand a connection to a lane");
                    continue;
                }
            },
            None => (Socket::Here(stream), None),
        };
        let task = async move {
            let _slot = slot;
            let stream = match stream {
                Socket::Here(s) => s,
                Socket::Moving(s) => match tokio::net::TcpStream::from_std(s) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "a lane cannot take a connection");
                        return;
                    }
                },
            };
            // Nothing sent yet: nothing in flight either, so a stop ends this wait at once.
            let mut probe = [0u8; 4];
            let n = tokio::select! {
                r = tokio::time::timeout(first_byte, stream.peek(&mut probe)) => match r {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => return,
                },
                _ = conn_stop.wait_for(|s| *s) => return,
            };
            // HTTP/2's preface (or too little of it yet to tell).
            let h2 = probe[..n] == b"PRI "[..n];
            serve(stream, h2, conn_stop).await;
        };
        match &lane {
            Some(lane) => conns.spawn_on(task, lane),
            None => conns.spawn(task),
        };
    }
    drop(listener);
    let grace = state.config.load().proxy.shutdown_grace;
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!("open connections did not finish within {grace:?}; closing them");
    }
    conns.shutdown().await;
}

/// Serves one connection with hyper (HTTP/1.1 with upgrades, or HTTP/2 when `h2`): the
/// admin listener's connections, and HTTP/2 clients of a provider listener. A stop lets
/// the request in flight finish, then closes the connection.
async fn serve_hyper<H, F, B>(
    stream: tokio::net::TcpStream,
    h2: bool,
    mut stop: watch::Receiver<bool>,
    header_read_timeout: Duration,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = hyper::service::service_fn(move |req| {
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    macro_rules! serve_until_stop {
        ($conn:expr) => {{
            let mut conn = std::pin::pin!($conn);
            let ended = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            };
            let ended = match ended {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        }};
    }
    if h2 {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        serve_until_stop!(builder.serve_connection_with_upgrades(TokioIo::new(stream), svc));
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        serve_until_stop!(builder
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades());
    }
}

/// Serves one connection of a provider listener: HTTP/1.x with the data plane's own server
/// (`proxy::server`), HTTP/2 with hyper.
async fn serve_data_plane<H, F>(
    stream: tokio::net::TcpStream,
    h2: bool,
    stop: watch::Receiver<bool>,
    header_read_timeout: Duration,
    handler: H,
) where
    H: Fn(Request<proxy::RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<proxy::ProxyBody>> + Send + 'static,
{
    if h2 {
        let handler = move |req: Request<Incoming>| handler(req.map(proxy::RequestBody::Hyper));
        serve_hyper(stream, true, stop, header_read_timeout, handler).await;
    } else {
        let settings = proxy::server::Settings {
            header_read_timeout,
        };
        proxy::server::serve(stream, settings, stop, handler).await;
    }
}

/// An accepted connection: registered with this runtime's reactor, or on its way to a
/// lane's (registered there by the task that serves it).
enum Socket {
    Here(tokio::net::TcpStream),
    Moving(std::net::TcpStream),
}

/// Waits for a free connection slot, then for a connection.
async fn accept_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(OwnedSemaphorePermit, tokio::net::TcpStream)> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("connection slots closed"))?;
    let (stream, _) = listener.accept().await?;
    Ok((slot, stream))
}
