//! Wiring: builds [`AppState`] from a [`Config`], binds every listener, starts the lifecycle
//! actors, the monitor, the pollers and the pressure response, runs the accept loops, and
//! shuts all of it down on request. Config reloads: [`reload`].
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
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::lifecycle::{LifecycleHandle, MemoryProbe, OpsBackend, Settings};
use crate::poller::Poller;
use crate::proxy;
use crate::state::AppState;
use crate::stats::StatsTable;
use crate::transport::lanes::{self, Lanes};
use crate::transport::server::{self, RequestBody};
use crate::upstream::ProviderState;

pub mod reload;

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
    /// The endpoint picker's bound address (`[epp]`), if it runs.
    pub epp_addr: Option<SocketAddr>,
    /// Stops the listeners (which then drain) and the background loops.
    stop: watch::Sender<bool>,
    /// Stops the lifecycle actors and the monitor: only after the listeners drained (and the
    /// unloads on shutdown, if any, are done), since those go through the actors.
    stop_actors: watch::Sender<bool>,
    tasks: JoinSet<()>,
    actors: Vec<tokio::task::JoinHandle<()>>,
    /// One poller per provider (`crate::poller`), for [`Running::refresh`].
    pollers: Vec<Arc<Poller>>,
    /// The data plane's threads (`transport::lanes`); they stop when this and the accept
    /// loops' clones are dropped.
    _lanes: Lanes,
}

impl Running {
    /// Reloads the config from `path` on SIGHUP and whenever the file changes
    /// ([`reload`]).
    /// `loaded` is the file's content the running config came from (`None`: read it now).
    pub fn watch_config(&mut self, path: std::path::PathBuf, loaded: Option<Vec<u8>>) {
        let seen = loaded.or_else(|| std::fs::read(&path).ok());
        self.tasks.spawn(reload::watch(
            self.state.clone(),
            path,
            seen,
            self.stop.subscribe(),
        ));
    }

    /// Polls provider `i` now (as its poller does every `poll_interval`).
    pub async fn refresh(&self, i: usize) {
        self.pollers[i].poll().await;
    }

    /// The bound address of pool `i`'s listener (`[[pools]]`).
    pub fn pool_addr(&self, i: usize) -> SocketAddr {
        self.state.pools[i].listen
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
    let lanes = Lanes::start(lanes::default_count()).map_err(StartError::Lanes)?;
    let client = crate::providers::build_client(config.proxy.connect_timeout);
    let mut listeners = Vec::new();
    let mut providers = Vec::new();
    let mut wakes = Vec::new();
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
    let changes = Arc::new(crate::changes::Changes::new());
    let memory_table = Arc::new(crate::memory::MemoryTable::new(config.providers.len()));
    for (i, p) in config.providers.iter().enumerate() {
        let l = bind(p.listen, &format!("provider `{}`", p.name)).await?;
        // The actor wakes the poller after each of its loads and unloads.
        let poll_now = Arc::new(Notify::new());
        let backend = Arc::new(OpsBackend::new(
            client.clone(),
            p.upstream.clone(),
            p.kind,
            p.slot_save,
            memory_table.clone(),
            i,
        ));
        let settings = Settings {
            pressure: Some(monitor.subscribe()),
            metrics: Some(stats.provider(i).clone()),
            changes: Some(changes.clone()),
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
        let pool = crate::transport::pool::Pool::new(
            &p.upstream.authority,
            config.proxy.connect_timeout,
            lanes.len(),
        );
        providers.push(ProviderState::new(
            p.clone(),
            l.local_addr().unwrap_or(p.listen),
            lifecycle,
            stats.provider(i).clone(),
            pool,
        ));
        wakes.push(poll_now);
        listeners.push(l);
    }
    // The fronts: each pool's listener and nodes (`crate::fleet`).
    let mut pool_listeners = Vec::new();
    let mut pools = Vec::new();
    for pool in &config.pools {
        let l = bind(pool.listen, &format!("pool `{}`", pool.name)).await?;
        let nodes = pool
            .nodes
            .iter()
            .map(|n| {
                let conns = crate::transport::pool::Pool::new(
                    &n.url.authority,
                    config.proxy.connect_timeout,
                    lanes.len(),
                );
                Arc::new(crate::fleet::nodes::NodeState::new(n.clone(), conns))
            })
            .collect();
        pools.push(crate::fleet::front::PoolState::new(
            pool.clone(),
            l.local_addr().unwrap_or(pool.listen),
            nodes,
        ));
        pool_listeners.push(l);
    }
    let epp_listener = match &config.epp {
        Some(e) => Some(bind(e.listen, "epp").await?),
        None => None,
    };
    let epp_addr = epp_listener.as_ref().and_then(|l| l.local_addr().ok());
    let state = Arc::new(AppState {
        pools: pools.into(),
        stats,
        client,
        providers: providers.into(),
        compactor: Arc::new(crate::context::Compactor::new(&config)),
        memory: memory_table,
        pressure_events: crate::monitor::respond::PressureLog::new(crate::monitor::respond::KEPT),
        pressure_counters: Default::default(),
        monitor,
        config: Arc::new(arc_swap::ArcSwap::new(config.clone())),
        changes,
        started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        stop: stop_rx.clone(),
    });
    let pollers: Vec<Arc<Poller>> = wakes
        .into_iter()
        .enumerate()
        .map(|(i, wake)| Poller::new(state.clone(), i, wake))
        .collect();

    // One poll of every provider before serving, so /status is right from the first call
    // and an unreachable provider is reported at once (not fatal); the same for the pools'
    // nodes, so a front routes from its first request.
    let node_client = crate::providers::build_client(config.proxy.connect_timeout);
    let node_polls = state.pools.iter().flat_map(|pool| {
        let interval = pool.config.poll_interval;
        let client = &node_client;
        pool.nodes.iter().map(move |n| n.poll(client, interval))
    });
    futures_util::future::join(
        futures_util::future::join_all(pollers.iter().map(|p| p.poll())),
        futures_util::future::join_all(node_polls),
    )
    .await;

    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.listen);
    let limits = ConnLimits::from(&config.proxy);
    let mut tasks = JoinSet::new();
    let plane = Arc::new(state.data_plane());
    // What every data-plane connection (providers' and pools' listeners) enforces.
    let settings = server::Settings {
        header_read_timeout: limits.header_read_timeout,
        body_read_timeout: limits.body_read_timeout,
    };
    for (i, listener) in listeners.into_iter().enumerate() {
        let plane = plane.clone();
        tracing::info!(
            provider = %state.providers[i].config.name,
            listen = %state.providers[i].listen,
            upstream = %state.providers[i].config.upstream,
            "proxy listening"
        );
        tasks.spawn(accept_loop(
            listener,
            Some(lanes.clone()),
            limits,
            state.config.clone(),
            stop_rx.clone(),
            move |stream, h2, stop| {
                let plane = plane.clone();
                // Not boxed: `handle` boxes the inspected path's future (kilobytes) itself, and
                // the pass-through one (about 2.9 KB) runs inside the connection's task.
                // Boxing it too cost an allocation and a 5 KB copy a request (callgrind:
                // about 700 instructions); not boxing it costs 1.2 KB of RSS per open
                // connection (`loadgen --hold 2000`: 43.1 -> 45.5 MB).
                let handler = move |req| proxy::handle(plane.clone(), i, req);
                serve_data_plane(stream, h2, stop, settings, handler)
            },
        ));
    }
    for poller in &pollers {
        tasks.spawn(poller.clone().run(stop_rx.clone()));
    }
    if let (Some(listener), Some(e)) = (epp_listener, &config.epp) {
        let index = state
            .pools
            .iter()
            .position(|p| p.config.name == e.pool)
            .unwrap_or(0);
        let epp = Arc::new(crate::fleet::epp::Epp {
            pools: state.pools.clone(),
            index,
            max_body: usize::try_from(config.proxy.max_request_body).unwrap_or(usize::MAX),
        });
        tracing::info!(listen = %e.listen, pool = %e.pool, "endpoint picker listening");
        tasks.spawn(crate::fleet::epp::serve(epp, listener, stop_rx.clone()));
    }
    let front = Arc::new(crate::fleet::front::FrontPlane {
        config: state.config.clone(),
        pools: state.pools.clone(),
    });
    for (i, listener) in pool_listeners.into_iter().enumerate() {
        let pool = &state.pools[i];
        tracing::info!(
            pool = %pool.config.name,
            listen = %pool.listen,
            nodes = pool.nodes.len(),
            "front listening"
        );
        for node in &pool.nodes {
            tasks.spawn(node.clone().run(
                node_client.clone(),
                pool.config.poll_interval,
                stop_rx.clone(),
            ));
        }
        let front = front.clone();
        tasks.spawn(accept_loop(
            listener,
            Some(lanes.clone()),
            limits,
            state.config.clone(),
            stop_rx.clone(),
            move |stream, h2, stop| {
                let front = front.clone();
                let handler = move |req| crate::fleet::front::handle(front.clone(), i, req);
                serve_data_plane(stream, h2, stop, settings, handler)
            },
        ));
    }
    tasks.spawn(crate::monitor::respond::run(
        state.clone(),
        config.memory_pressure.action,
        state.monitor.subscribe(),
        stop_rx.clone(),
    ));
    tasks.spawn(crate::fleet::view::ring_on_samples(
        state.monitor.clone(),
        state.changes.clone(),
        stop_rx.clone(),
    ));
    let st = state.clone();
    tracing::info!(listen = %admin_addr, "admin listening");
    let timeout = limits.header_read_timeout;
    tasks.spawn(accept_loop(
        admin_listener,
        None,
        limits,
        state.config.clone(),
        stop_rx,
        move |stream, h2, stop| {
            let st = st.clone();
            serve_hyper(stream, h2, stop, timeout, move |req| {
                crate::admin::handle(st.clone(), req)
            })
        },
    ));
    Ok(Running {
        epp_addr,
        state,
        admin_addr,
        stop,
        stop_actors,
        tasks,
        actors,
        pollers,
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

/// What every listener enforces on its connections (`[proxy]`; fixed at start).
#[derive(Clone, Copy)]
struct ConnLimits {
    max_connections: usize,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
}

impl From<&crate::config::ProxyConfig> for ConnLimits {
    fn from(p: &crate::config::ProxyConfig) -> Self {
        ConnLimits {
            max_connections: usize::try_from(p.max_connections).unwrap_or(usize::MAX),
            header_read_timeout: p.header_read_timeout,
            body_read_timeout: p.body_read_timeout,
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
    lanes: Option<Lanes>,
    limits: ConnLimits,
    config: Arc<arc_swap::ArcSwap<Config>>,
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
    let grace = config.load().proxy.shutdown_grace;
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
/// (`transport::server`), HTTP/2 with hyper.
async fn serve_data_plane<H, F>(
    stream: tokio::net::TcpStream,
    h2: bool,
    stop: watch::Receiver<bool>,
    settings: server::Settings,
    handler: H,
) where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<proxy::ProxyBody>> + Send + 'static,
{
    if h2 {
        let handler = move |req: Request<Incoming>| handler(req.map(RequestBody::Hyper));
        serve_hyper(stream, true, stop, settings.header_read_timeout, handler).await;
    } else {
        server::serve(stream, settings, stop, handler).await;
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
