//! The control plane: which models are loaded, and when (docs/design.md: Model Lifecycle Management,
//! ResourceLimits, allocateMemory/freeMemory, graceful cleanup).
//!
//! One actor task per provider owns that provider's model table and the queue of requests
//! waiting for a model. Everything else talks to it through a [`LifecycleHandle`]:
//!
//! ```text
//!  proxy handler ──acquire(model)──►┐                 ┌──► providers::ops::load / unload
//!  admin API ─────load / unload────►│  actor (table,  │      (spawned; report back as events)
//!  poller ────────report(loaded)───►│   queue, timer) ├──► poll_now (re-read the provider)
//!  Lease::drop ───release──────────►┘                 └──► replies on oneshots: Lease | error
//! ```
//!
//! Besides replies, the actor writes what it did to three things shared with the handle, read
//! without a round trip: [`Facts`] (each model's state, window and runner options), [`LifecycleLog`] (the
//! last loads and unloads, for `/status` and the dashboard), and each model's gate: a request
//! for a ready model takes its lease there with one atomic operation and the actor hears
//! nothing of it (the fast path; `gate.rs` says how the invariants below survive it).
//!
//! Events: `Acquire`, `AdminLoad`, `AdminUnload`, `Abandon` (a waiting client left),
//! `Release` (a lease dropped), `Drained` (the last lease through a closed gate dropped),
//! `LoadDone`, `UnloadDone`, `Report` (what the provider lists as loaded), `Catalog` (model
//! sizes), `Snapshot`; and the actor's own timer (idle deadlines, queue timeouts, aging).
//!
//! Invariants:
//! - **only the actor mutates the table**; handlers never decide from a read of it;
//! - **a lease means in flight**: the actor counts a lease before it sends it, and the lease
//!   sends `Release` when dropped, however the request ends (a lease in a reply nobody
//!   received is dropped with the channel, which releases it);
//! - **no unload while a lease is out**: a model is unloaded only from `ready` with no
//!   leases, and takes no new leases from then on (requests arriving meanwhile wait, and
//!   load it again once the unload is done);
//! - **one load per model at a time** (single flight): concurrent requests wait for it;
//! - the idle timer starts when the last lease drops, and any new lease cancels it;
//! - the eviction choice is [`policy::plan_load`], pure; the actor logs when it commits.
//!
//! Who unloads: the proxy. Ollama would unload a model on its own after its `keep_alive`
//! (default 5 minutes), so every load the proxy makes asks for `keep_alive: -1`, and the
//! proxy rewrites `keep_alive` to `-1` on Ollama's native endpoints (`/v1/*` carries none, and
//! Ollama keeps the runner's duration when a request gives none). A client's own `keep_alive`
//! becomes a hint ([`IdleHint`]) that replaces the model's idle timeout until another request
//! gives one or the model unloads; `pinned` models ignore hints and never unload.

mod actor;
mod backend;
mod gate;
pub mod policy;
pub mod runner;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::{Config, ModelOverrides, QueueConfig};
use crate::providers::ops::{Loaded, OpError};
use crate::providers::{LoadedModel, ProviderKind};

pub use crate::monitor::{MemoryProbe, MemoryReading, SystemMemory};
pub use backend::{slot_file, Backend, OpsBackend};
pub use runner::LoadAsk;

/// The runner options a load asks for (Ollama `options.num_ctx` / `num_batch`, LM Studio
/// `context_length`); `None` leaves the provider's default. Loads under memory pressure get
/// smaller ones (see [`runner`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Shape {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_ctx: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_batch: Option<u64>,
}

impl Shape {
    /// Nothing asked: the provider's defaults.
    pub fn is_default(&self) -> bool {
        self.num_ctx.is_none() && self.num_batch.is_none()
    }
}

/// What the actor knows of one model that others act on: its state, the window it runs
/// (or last ran) with, and the runner options the proxy loaded it with. The actor is the
/// one owner; it publishes a new map whenever one of these changes (its own loads and
/// unloads at once, the provider's polls when they say something new), and request
/// handlers, the compactor, the admin API and the metrics read it without a round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFacts {
    pub status: ModelStatus,
    /// The context the model runs with (or last ran with: a reload likely gets the same),
    /// in tokens: the load's answer, else the provider's list, else llama-server's `/props`.
    pub window: Option<u64>,
    /// The runner options of the load in progress or of the loaded model, when the proxy
    /// loaded it with other than the provider's defaults (Ollama reloads a runner whose
    /// options differ from a request's, so requests are given the same).
    pub runner: Shape,
}

/// A map by model name, as the maps read on every request are kept: foldhash, seeded per
/// process (names come from clients; SipHash was a third of each lookup's cost).
pub type ByModel<V> = std::collections::HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// The published [`ModelFacts`] of one provider's models, by name: replaced whole by the
/// actor, read lock-free.
#[derive(Clone, Default)]
pub struct Facts(Arc<arc_swap::ArcSwap<ByModel<ModelFacts>>>);

impl Facts {
    /// What is known of `model`, if anything.
    pub fn get(&self, model: &str) -> Option<ModelFacts> {
        self.0.load().get(model).copied()
    }

    /// Every model's facts, for views that list them.
    pub fn all(&self) -> Arc<ByModel<ModelFacts>> {
        self.0.load_full()
    }

    fn store(&self, map: ByModel<ModelFacts>) {
        self.0.store(Arc::new(map));
    }
}

/// How many lifecycle events each provider keeps.
pub const EVENTS_KEPT: usize = 100;

/// One finished (or failed) load or unload, as the actor saw it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LifecycleEvent {
    /// When it finished, RFC 3339 (UTC, milliseconds).
    pub at: String,
    pub provider: String,
    pub model: String,
    /// `load`, `load_failed`, `unload` or `unload_failed`.
    pub event: &'static str,
    /// Loads: `request` (a request needed it) or `asked` (the admin API). Unloads: `idle`,
    /// `to make room`, `memory pressure` or `asked`.
    pub reason: &'static str,
    /// From the start of the load or unload to its end, as the proxy measured it.
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The recent lifecycle events of one provider, oldest first: written by its actor, read by
/// `/status` (a short lock, never held across an await).
pub type LifecycleLog = crate::recent::Recent<LifecycleEvent>;

/// What the actor publishes for readers that must not wait on it; the handle holds the same.
#[derive(Clone)]
struct Published {
    facts: Facts,
    events: Arc<LifecycleLog>,
    gates: Gates,
    /// The use sequence, the clock's epoch, the channel (see `gate`).
    shared: Arc<gate::Shared>,
}

/// How long a model may stay idle, as a client asked (Ollama `keep_alive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleHint {
    /// Unload this long after the last request ends (`0`: right after it).
    After(Duration),
    /// Keep it loaded (negative `keep_alive`); it may still be evicted to make room.
    Never,
}

/// Where a model stands (docs/design.md: `ModelResourceMetrics.status`, plus `unloaded`).
/// Parsed back by a front reading a node's view (`fleet::view`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Unloaded,
    Loading,
    Ready,
    Unloading,
    Error,
}

/// What the lifecycle knows of one model, for `/status` and the admin API.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelView {
    /// Not serialized: `/status` puts these fields next to the model's counters (which name
    /// it), and the admin answer names it itself.
    #[serde(skip)]
    pub model: String,
    pub status: ModelStatus,
    /// Provider kind (docs/design.md: `platform`).
    pub platform: &'static str,
    /// Leases out: requests the provider is answering for this model.
    pub leases: u32,
    /// Requests waiting for this model (to load, or for room).
    pub queue_depth: u32,
    /// How long the last load took, measured by the proxy.
    pub load_time_ms: Option<u64>,
    /// The context window the model runs (or last ran) with, in tokens.
    #[serde(skip_serializing)]
    pub context_length: Option<u64>,
    /// Loads and unloads the proxy made of this model.
    pub loads: u64,
    pub unloads: u64,
    /// What admission counts for this model (config `memory`, else the provider's size).
    pub memory_estimate_mb: Option<u64>,
    /// Idle time before the proxy unloads it; null = never (pinned, or a client's
    /// `keep_alive` < 0).
    pub inactivity_timeout_s: Option<f64>,
    pub pinned: bool,
    /// The use stamp of the last lease taken or given back: smaller = less recently used.
    /// Comparable only among one provider's models (the eviction order); not in `/status`.
    #[serde(skip)]
    pub last_used: u64,
    /// Seconds until the idle unload, when the model is idle and will be unloaded.
    pub unloads_in_s: Option<f64>,
    /// `proxy` when the proxy loaded it, `provider` when it was found loaded.
    pub loaded_by: Option<&'static str>,
    pub last_error: Option<String>,
}

/// Why a model could not be had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("too many requests are waiting for models on `{provider}` ({max_waiting}, queue.max_waiting); retry later")]
    QueueFull {
        provider: String,
        max_waiting: u32,
        retry_after: Duration,
    },
    #[error("model `{model}` was not ready within {waited:?} (queue.timeout); retry later")]
    QueueTimeout {
        model: String,
        waited: Duration,
        retry_after: Duration,
    },
    #[error("model `{model}` not found on `{provider}`")]
    NotFound { provider: String, model: String },
    #[error("loading model `{model}` on `{provider}` failed: {source}")]
    LoadFailed {
        provider: String,
        model: String,
        source: OpError,
    },
    #[error("unloading model `{model}` on `{provider}` failed: {source}")]
    UnloadFailed {
        provider: String,
        model: String,
        source: OpError,
    },
    #[error("model `{model}` needs {size_mb} MB, more than the {budget_mb} MB that loaded models may take on `{provider}` (limits.memory_threshold)")]
    TooLarge {
        provider: String,
        model: String,
        size_mb: u64,
        budget_mb: u64,
    },
    #[error("llm-warden is shutting down")]
    Stopped,
    /// A llama-server with one model (`-m`): it is always loaded; nothing to load or unload.
    #[error("`{provider}` serves a single model that is always loaded (llama-server without router mode); it cannot be loaded or unloaded")]
    Unmanaged { provider: String },
}

impl LifecycleError {
    /// Short fixed label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            LifecycleError::QueueFull { .. } => "queue_full",
            LifecycleError::QueueTimeout { .. } => "queue_timeout",
            LifecycleError::NotFound { .. } => "model_not_found",
            LifecycleError::LoadFailed { .. } => "load_failed",
            LifecycleError::UnloadFailed { .. } => "unload_failed",
            LifecycleError::TooLarge { .. } => "model_too_large",
            LifecycleError::Stopped => "shutting_down",
            LifecycleError::Unmanaged { .. } => "lifecycle_off",
        }
    }

    /// When a retry may succeed, the delay to suggest (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LifecycleError::QueueFull { retry_after, .. }
            | LifecycleError::QueueTimeout { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// What one provider's actor needs to know, resolved from the config once.
#[derive(Clone, Debug)]
pub struct Settings {
    pub provider: String,
    pub kind: ProviderKind,
    pub max_models_loaded: u32,
    pub memory_threshold: f64,
    pub inactivity_timeout: Duration,
    pub queue: QueueConfig,
    /// Per-model overrides, keyed by the canonical model name (Ollama: with its tag).
    pub models: BTreeMap<String, ModelOverrides>,
    /// `buffers.context.initial` (tokens) and `buffers.working.initial` (MB): what loads
    /// under memory pressure get ([`runner`]).
    pub context_initial: u64,
    pub working_initial_mb: u64,
    /// The monitor's latest sample, when there is a monitor: loads under pressure get
    /// smaller runner options ([`runner`]).
    pub pressure: Option<watch::Receiver<crate::monitor::Snapshot>>,
    /// Where load durations are recorded for `/metrics`, when anyone reads them.
    pub metrics: Option<Arc<crate::metrics::ProviderMetrics>>,
    /// Rung when what the node view shows of this provider changes (a model's state,
    /// leases, queue, options, size; see `fleet::view`): by the actor after an event that
    /// changed one, and by the lease fast path on each take and give-back.
    pub changes: Option<Arc<crate::changes::Changes>>,
}

impl Settings {
    /// The settings of provider `i` of `config`.
    pub fn from_config(config: &Config, i: usize) -> Self {
        let p = &config.providers[i];
        Settings {
            provider: p.name.clone(),
            kind: p.kind,
            max_models_loaded: p.max_models_loaded,
            memory_threshold: p.memory_threshold,
            inactivity_timeout: config.limits.inactivity_timeout,
            queue: config.queue.clone(),
            models: config
                .models
                .iter()
                .map(|(k, v)| (p.kind.canonical_model(k).into_owned(), v.clone()))
                .collect(),
            context_initial: u64::from(config.buffers.context_initial),
            working_initial_mb: u64::from(config.buffers.working_initial),
            pressure: None,
            metrics: None,
            changes: None,
        }
    }
}

/// Messages to the actor. Replies go back on the oneshots.
enum Event {
    Acquire {
        id: u64,
        model: Box<str>,
        hint: Option<IdleHint>,
        ask: LoadAsk,
        reply: oneshot::Sender<Result<Lease, LifecycleError>>,
    },
    AdminLoad {
        id: u64,
        model: Box<str>,
        ask: LoadAsk,
        reply: oneshot::Sender<Result<ModelView, LifecycleError>>,
    },
    AdminUnload {
        model: Box<str>,
        reply: oneshot::Sender<Result<ModelView, LifecycleError>>,
    },
    Abandon {
        id: u64,
    },
    Release {
        model: Arc<str>,
        /// The use stamp, taken when the lease dropped (the actor may hear of it after a
        /// later use through a gate).
        seq: u64,
    },
    /// The last lease taken through a closed [`gate::Gate`] was given back.
    Drained {
        model: Arc<str>,
    },
    LoadDone {
        model: Arc<str>,
        /// The runner options the load was made with (`num_batch` is chosen by the load's
        /// task, from the model's geometry).
        shape: Shape,
        result: Result<Loaded, OpError>,
    },
    UnloadDone {
        model: Arc<str>,
        result: Result<(), OpError>,
    },
    /// The provider was told again to keep the model (`Backend::keep`).
    Kept {
        model: Arc<str>,
        result: Result<(), OpError>,
    },
    Report {
        loaded: Vec<LoadedModel>,
        polled_at: tokio::time::Instant,
    },
    Catalog {
        sizes: Vec<(String, u64)>,
    },
    /// Someone else loaded or unloaded a model on the provider (an SDK socket): re-read it.
    ChangedOutside,
    /// The window a model runs with, learned outside a load or a list (llama-server's
    /// `/props`), for a model the actor may not manage.
    Window {
        model: Box<str>,
        tokens: u64,
    },
    Snapshot {
        reply: oneshot::Sender<Vec<ModelView>>,
    },
    Shed {
        all: bool,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// A config reload: new limits, timeouts, queue and per-model settings.
    Reconfigure {
        settings: Box<Settings>,
    },
}

/// The gates of one provider's models, by name: replaced whole by the actor when it learns
/// a model, read lock-free by every request.
type Gates = Arc<arc_swap::ArcSwap<ByModel<Arc<gate::Gate>>>>;

/// The front of one provider's actor. Cloning is six `Arc` bumps.
#[derive(Clone)]
pub struct LifecycleHandle {
    tx: mpsc::UnboundedSender<Event>,
    /// What the gates share with the actor: read for [`LifecycleHandle::uses`].
    shared: Arc<gate::Shared>,
    gates: Gates,
    next_id: Arc<AtomicU64>,
    facts: Facts,
    /// Shared with the actor, which alone writes it.
    events: Arc<LifecycleLog>,
}

/// A model request in flight: while it lives the model stays loaded. Dropping it (the response
/// ended, failed, or the client left) tells the actor, or its model's gate.
#[derive(Debug)]
pub struct Lease(LeaseFrom);

#[derive(Debug)]
enum LeaseFrom {
    /// Granted by the actor, which counts it.
    Actor {
        shared: Arc<gate::Shared>,
        model: Arc<str>,
    },
    /// Taken through the model's open gate (see `gate`).
    Gate(Arc<gate::Gate>),
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The actor is gone only at shutdown, when nothing needs to know.
        match &self.0 {
            LeaseFrom::Actor { shared, model } => {
                let _ = shared.tx.send(Event::Release {
                    model: model.clone(),
                    seq: shared.next_seq(),
                });
            }
            LeaseFrom::Gate(g) => {
                if g.give_back() {
                    let _ = g.shared.tx.send(Event::Drained {
                        model: g.model.clone(),
                    });
                }
            }
        }
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Event::Acquire { .. } => "Acquire",
            Event::AdminLoad { .. } => "AdminLoad",
            Event::Reconfigure { .. } => "Reconfigure",
            Event::AdminUnload { .. } => "AdminUnload",
            Event::Abandon { .. } => "Abandon",
            Event::Release { .. } => "Release",
            Event::Drained { .. } => "Drained",
            Event::LoadDone { .. } => "LoadDone",
            Event::UnloadDone { .. } => "UnloadDone",
            Event::Kept { .. } => "Kept",
            Event::Report { .. } => "Report",
            Event::Catalog { .. } => "Catalog",
            Event::ChangedOutside => "ChangedOutside",
            Event::Window { .. } => "Window",
            Event::Snapshot { .. } => "Snapshot",
            Event::Shed { .. } => "Shed",
        })
    }
}

/// Sends `Abandon` if a waiting caller goes away before its answer came.
struct AbandonOnDrop<'a> {
    tx: &'a mpsc::UnboundedSender<Event>,
    id: u64,
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Event::Abandon { id: self.id });
        }
    }
}

impl LifecycleHandle {
    /// Starts the actor of one provider. It runs until `stop` turns true; `poll_now` is
    /// notified after each load and unload so the poller re-reads the provider.
    pub fn spawn(
        settings: Settings,
        backend: Arc<dyn Backend>,
        memory: Arc<dyn MemoryProbe>,
        poll_now: Arc<Notify>,
        stop: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let facts = Facts::default();
        let events = Arc::new(LifecycleLog::new(EVENTS_KEPT));
        let gates = Gates::default();
        let shared = Arc::new(gate::Shared {
            seq: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            tx: tx.clone(),
            changes: settings.changes.clone(),
        });
        let actor = actor::Actor::new(
            settings,
            backend,
            memory,
            poll_now,
            tx.clone(),
            rx,
            Published {
                facts: facts.clone(),
                events: events.clone(),
                gates: gates.clone(),
                shared: shared.clone(),
            },
        );
        let task = tokio::spawn(actor.run(stop));
        (
            LifecycleHandle {
                tx,
                shared,
                gates,
                next_id: Arc::new(AtomicU64::new(1)),
                facts,
                events,
            },
            task,
        )
    }

    async fn ask<T>(
        &self,
        id: Option<u64>,
        make: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Result<T, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| LifecycleError::Stopped)?;
        let mut guard = id.map(|id| AbandonOnDrop {
            tx: &self.tx,
            id,
            armed: true,
        });
        let answer = rx.await.map_err(|_| LifecycleError::Stopped);
        if let Some(g) = guard.as_mut() {
            g.armed = false;
        }
        answer
    }

    /// Waits until `model` is ready (loading it, making room, or queueing as needed) and
    /// returns a lease on it. Dropping the future while it waits leaves nothing behind.
    pub async fn acquire(
        &self,
        model: &str,
        hint: Option<IdleHint>,
        ask: LoadAsk,
    ) -> Result<Lease, LifecycleError> {
        // The fast path (see `gate`): a ready model whose gate is open. A client's idle
        // hint is the actor's to record, so such requests ask it.
        // A request that needs more context than the runner has goes to the actor too
        // (it reloads the model larger: `runner`).
        let fits = || {
            ask.floor().is_none()
                || self
                    .facts
                    .get(model)
                    .is_none_or(|f| ask.served_by(f.runner))
        };
        if hint.is_none() && fits() {
            if let Some(g) = self.gates.load().get(model) {
                if g.try_take() {
                    return Ok(Lease(LeaseFrom::Gate(g.clone())));
                }
            }
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        self.ask(Some(id), |reply| Event::Acquire {
            id,
            model: model.into(),
            hint,
            ask,
            reply,
        })
        .await?
    }

    /// Loads `model` (as a request would, through the queue; the actor picks the runner
    /// options from `ask` and the memory pressure) and answers once it is ready.
    pub async fn load(&self, model: &str, ask: LoadAsk) -> Result<ModelView, LifecycleError> {
        let id = self.next_id.fetch_add(1, Relaxed);
        self.ask(Some(id), |reply| Event::AdminLoad {
            id,
            model: model.into(),
            ask,
            reply,
        })
        .await?
    }

    /// Unloads `model` gracefully: new requests wait, those in flight finish, then the
    /// provider is told. Answers once it is unloaded (at once if it was not loaded).
    pub async fn unload(&self, model: &str) -> Result<ModelView, LifecycleError> {
        self.ask(None, |reply| Event::AdminUnload {
            model: model.into(),
            reply,
        })
        .await?
    }

    /// Applies reloaded settings (limits, idle timeouts, queue, per-model settings) from now
    /// on. Models over a lowered `max_models_loaded` are unloaded if idle, least recently
    /// used first; busy ones go when their requests end and the limit is next checked.
    pub fn reconfigure(&self, settings: Settings) {
        let _ = self.tx.send(Event::Reconfigure {
            settings: Box::new(settings),
        });
    }

    /// The runner options the proxy loaded (or is loading) `model` with, when not the
    /// provider's defaults (no round trip to the actor).
    pub fn runner(&self, model: &str) -> Option<Shape> {
        self.facts
            .get(model)
            .map(|f| f.runner)
            .filter(|s| !s.is_default())
    }

    /// The context window `model` runs (or last ran) with, as far as the actor knows.
    pub fn window(&self, model: &str) -> Option<u64> {
        self.facts.get(model).and_then(|f| f.window)
    }

    /// What the actor last published about `model` (no round trip).
    pub fn facts(&self, model: &str) -> Option<ModelFacts> {
        self.facts.get(model)
    }

    /// How many leases were taken and given back (and other uses stamped) so far: rises
    /// with every change of a model's leases, the fast path's included, which the actor
    /// never hears of. The node view adds it to its `seq` (`fleet::view`).
    pub fn uses(&self) -> u64 {
        self.shared.uses()
    }

    /// The last [`EVENTS_KEPT`] loads and unloads, oldest first (no round trip to the actor).
    pub fn events(&self) -> Vec<LifecycleEvent> {
        self.events.list()
    }

    /// Every model the actor knows, sorted by name.
    pub async fn snapshot(&self) -> Vec<ModelView> {
        self.ask(None, |reply| Event::Snapshot { reply })
            .await
            .unwrap_or_default()
    }

    /// Memory pressure: unloads the least recently used idle model (`all`: every idle one),
    /// never a pinned one or one with requests in flight or waiting. Answers the models
    /// whose unload started.
    pub async fn shed(&self, all: bool) -> Vec<String> {
        self.ask(None, |reply| Event::Shed { all, reply })
            .await
            .unwrap_or_default()
    }

    /// What the provider listed as loaded, in a poll that started at `polled_at`.
    pub fn report(&self, loaded: Vec<LoadedModel>, polled_at: tokio::time::Instant) {
        let _ = self.tx.send(Event::Report { loaded, polled_at });
    }

    /// The window `model` runs with, learned from the provider outside a load or a list
    /// (llama-server's `/props`); published with the model's facts.
    pub fn observe_window(&self, model: &str, tokens: u64) {
        if tokens > 0 {
            let _ = self.tx.send(Event::Window {
                model: model.into(),
                tokens,
            });
        }
    }

    /// A client loaded or unloaded a model through a channel the proxy only watches (the
    /// LM Studio SDK's socket): the actor has the provider polled now, and the poll's report
    /// reconciles it, as it does every change made behind the proxy's back. (A report is the
    /// provider's whole list; the watcher knows one model, so it asks for the list.)
    pub fn changed_outside(&self) {
        let _ = self.tx.send(Event::ChangedOutside);
    }

    /// Sizes of the provider's models on disk (`/api/tags`, LM Studio's model list), bytes.
    pub fn catalog(&self, sizes: Vec<(String, u64)>) {
        let _ = self.tx.send(Event::Catalog { sizes });
    }
}

/// Parses an Ollama `keep_alive` value (raw JSON) the way Ollama does (docs/providers.md §1.8): a number of
/// seconds, or a Go duration string; negative means never. `None` for `null` (the server
/// default: no hint) and for anything Ollama would refuse with 400.
pub fn parse_keep_alive(raw: &str) -> Option<IdleHint> {
    let raw = raw.trim();
    if let Ok(n) = raw.parse::<f64>() {
        return Some(if n < 0.0 {
            IdleHint::Never
        } else {
            IdleHint::After(Duration::from_secs_f64(n.min(1e12)))
        });
    }
    let s: String = serde_json::from_str(raw).ok()?;
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(&s)),
    };
    let d = parse_go_duration(body)?;
    Some(if negative && !d.is_zero() {
        IdleHint::Never
    } else {
        IdleHint::After(d)
    })
}

/// Go's `time.ParseDuration` without the sign: `"0"`, or number+unit pairs such as `"1h30m"`,
/// `"1.5s"`, `"300ms"` (units ns, us, µs, ms, s, m, h).
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * scale;
    }
    Some(Duration::from_secs_f64(total.min(1e12)))
}
