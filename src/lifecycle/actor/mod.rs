//! The actor: one task per provider that owns the model table and the wait queue, and makes
//! every load and unload decision. See the module doc of `lifecycle` for events and invariants.
//!
//! After each event the actor runs [`Actor::schedule`]: mark the models that must drain for a
//! request that has waited too long, grant leases to waiting requests whose model is ready,
//! then plan loads for the oldest waiting models (evicting idle ones per `policy`). Slow work
//! (loads, unloads) runs in spawned tasks that report back as events; the loop never awaits I/O.

mod facts;
mod schedule;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::gate::{Gate, Shared};
use super::policy::RefuseReason;
use super::{
    Backend, ByModel, Event, Facts, Gates, IdleHint, Lease, LeaseFrom, LifecycleError,
    LifecycleEvent, LifecycleLog, LoadAsk, MemoryProbe, ModelFacts, ModelStatus, ModelView,
    Published, Settings, Shape,
};
use crate::config::QueuePolicy;
use crate::providers::ops::{Loaded, OpError};
use crate::providers::LoadedModel;

const MIB: u64 = 1 << 20;
/// Windows of unmanaged models kept at most (they come from the provider's own list).
const OBSERVED_MAX: usize = 1024;
/// Failed models the provider does not list that keep their entry (and error) at most; see
/// `Actor::forget_if_unlisted`.
const UNLISTED_ERRORS_KEPT: usize = 16;
/// How long memory an unload freed counts as available before the machine's reading shows
/// it: Ollama unloads asynchronously after answering, and the kernel takes a moment to
/// reclaim. Without this, the reading right after an unload would look short and make the
/// actor evict a second model for nothing.
const FREED_GRACE: Duration = Duration::from_secs(10);

/// One model of the provider.
#[derive(Debug)]
struct Model {
    name: Arc<str>,
    status: ModelStatus,
    /// Leases the actor granted and that are still out. With the gate's, the model's
    /// leases ([`Model::leases`]): only `ready` models hand them out; `unloading` begins
    /// only at zero.
    active: u32,
    /// The fast path's side of this model (see `lifecycle::gate`).
    gate: Arc<Gate>,
    /// Waiters in the queue for this model (kept equal to a count over the queue).
    queued: u32,
    /// Sequence number of the last grant or release by the actor: smaller = less recently
    /// used ([`Model::used`] counts the gate's too).
    last_used: u64,
    /// When the last lease the actor granted dropped (or the model became ready with none):
    /// the idle clock ([`Model::idle_from`] counts the gate's releases too).
    idle_since: Option<Instant>,
    /// A client's `keep_alive`; replaces the configured idle timeout until the model unloads.
    hint: Option<IdleHint>,
    load_time: Option<Duration>,
    /// The context the model runs with: the load's answer, else the provider's list. Kept
    /// after an unload: a reload is likely to get the same.
    context_length: Option<u64>,
    /// The runner options of the load in progress or of the loaded model, when memory
    /// pressure made the proxy load it with them (default: the provider's own, or the
    /// request's that started the load): requests must then carry the same. Set when the
    /// load starts (its `num_batch` when it ends).
    shape: Shape,
    loads: u64,
    unloads: u64,
    /// What `Backend::unload` takes (LM Studio: the instance id).
    instance_id: Option<String>,
    /// The provider's list at the last poll, if it listed this model.
    reported: Option<LoadedModel>,
    /// Last status change; a poll that started before it says nothing about this model.
    changed_at: Instant,
    loaded_by_proxy: bool,
    last_error: Option<String>,
    /// When the load or unload under way started, and why (for its [`LifecycleEvent`]).
    op_started: Instant,
    op_reason: &'static str,
    /// An admin asked to unload it: no new leases, unload once the last one drops.
    unload_waiters: Vec<oneshot::Sender<Result<ModelView, LifecycleError>>>,
    unload_requested: bool,
    /// A request for another model waited past `queue.aging`, and this model is in its
    /// way: no new leases, so it drains and can be swapped out. Recomputed by `schedule`.
    draining: bool,
    /// `Backend::keep` is under way (one at a time per model).
    keeping: bool,
    /// A waiter needs a larger context than this model's runner has: no new leases, and
    /// once the last one is back it is unloaded and loaded at the larger size. Recomputed
    /// by `schedule`.
    reshape: bool,
}

/// [`Plan`] with owned names, so it outlives the borrow of the table.
enum Decision {
    Load,
    Evict(Vec<Arc<str>>),
    Wait,
    Refuse(RefuseReason),
}

/// What a waiting caller gets once its model is ready.
enum Reply {
    Request {
        reply: oneshot::Sender<Result<Lease, LifecycleError>>,
        hint: Option<IdleHint>,
    },
    Admin(oneshot::Sender<Result<ModelView, LifecycleError>>),
}

struct Waiter {
    id: u64,
    model: Arc<str>,
    /// What this waiter asks of the load, should it start one.
    ask: LoadAsk,
    enqueued: Instant,
    reply: Reply,
}

pub(super) struct Actor {
    settings: Settings,
    backend: Arc<dyn Backend>,
    memory: Arc<dyn MemoryProbe>,
    poll_now: Arc<Notify>,
    /// For leases and for the spawned operations to report back; the actor holds one, so
    /// the channel never closes on its own: the actor stops on `stop`.
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Shared with the handle: each model's state, window and runner options, republished
    /// after every event that changed one of them ([`Actor::publish_facts`]).
    facts: Facts,
    /// Windows the provider reported for models this actor does not manage (a llama-server
    /// with one model), published with the table's facts.
    observed: HashMap<Arc<str>, u64>,
    /// Shared with the handle: what loads and unloads finished or failed, for `/status`.
    events: Arc<LifecycleLog>,
    /// Shared with the handle: each model's gate, for the lease fast path.
    gates: Gates,
    /// Shared with the gates: the use sequence, the clock's epoch, the channel.
    shared: Arc<Shared>,
    models: HashMap<Arc<str>, Model>,
    /// Arrival order; every waiter has the same timeout, so the front expires first.
    queue: VecDeque<Waiter>,
    /// Size on disk of each model the provider has, bytes.
    catalog: HashMap<String, u64>,
    /// When the actor started: the `changed_at` of a model that never changed.
    epoch: Instant,
    /// Bytes recent unloads freed, and when (see [`FREED_GRACE`]).
    freed: VecDeque<(Instant, u64)>,
    /// [`Actor::routing_digest`] when `settings.changes` was last rung.
    digest: u64,
}

impl Actor {
    pub(super) fn new(
        settings: Settings,
        backend: Arc<dyn Backend>,
        memory: Arc<dyn MemoryProbe>,
        poll_now: Arc<Notify>,
        tx: mpsc::UnboundedSender<Event>,
        rx: mpsc::UnboundedReceiver<Event>,
        Published {
            facts,
            events,
            gates,
            shared,
        }: Published,
    ) -> Self {
        let epoch = shared.epoch;
        Actor {
            facts,
            observed: HashMap::new(),
            events,
            gates,
            shared,
            settings,
            backend,
            memory,
            poll_now,
            tx,
            rx,
            models: HashMap::new(),
            queue: VecDeque::new(),
            catalog: HashMap::new(),
            epoch,
            freed: Default::default(),
            digest: 0,
        }
    }

    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            let wake = self.next_wake();
            if wake != armed {
                if let Some(at) = wake {
                    sleep.as_mut().reset(at);
                }
                armed = wake;
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.on_timer();
                }
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
            }
            self.sync_gates();
            self.publish_facts();
            self.ring_if_changed();
        }
        for m in self.models.values() {
            m.gate.close();
        }
        for w in self.queue.drain(..) {
            fail(w.reply, LifecycleError::Stopped);
        }
    }

    // === events ===

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Acquire {
                id,
                model,
                hint,
                ask,
                reply,
            } => {
                let name = self.entry(&model);
                if self.grantable_now(&name) && ask.served_by(self.models[&name].shape) {
                    self.grant(&name, reply, hint);
                } else {
                    self.enqueue(id, name, ask, Reply::Request { reply, hint });
                }
            }
            Event::AdminLoad {
                id,
                model,
                ask,
                reply,
            } => {
                let name = self.entry(&model);
                if self.models[&name].status == ModelStatus::Ready {
                    let _ = reply.send(Ok(self.view(&self.models[&name])));
                } else {
                    self.enqueue(id, name, ask, Reply::Admin(reply));
                }
            }
            Event::AdminUnload { model, reply } => self.admin_unload(&model, reply),
            Event::Abandon { id } => {
                if let Some(pos) = self.queue.iter().position(|w| w.id == id) {
                    if let Some(w) = self.queue.remove(pos) {
                        self.dequeued(&w.model);
                        self.forget_if_unlisted(&w.model);
                    }
                    self.schedule();
                }
            }
            Event::Release { model, seq } => self.release(&model, seq),
            Event::Drained { model } => {
                tracing::trace!(model = %model, "last lease through a closed gate returned");
                self.schedule();
            }
            Event::LoadDone {
                model,
                shape,
                result,
            } => self.load_done(&model, shape, result),
            Event::UnloadDone { model, result } => self.unload_done(&model, result),
            Event::Kept { model, result } => {
                if let Some(m) = self.models.get_mut(&*model) {
                    m.keeping = false;
                }
                match result {
                    Ok(()) => {
                        tracing::info!(provider = %self.settings.provider, model = %model, "provider told again to keep the model loaded");
                    }
                    // The next poll that still sees a deadline tries again.
                    Err(e) => {
                        tracing::warn!(provider = %self.settings.provider, model = %model, error = %e, "cannot tell the provider to keep the model loaded");
                    }
                }
            }
            Event::Report { loaded, polled_at } => self.apply_report(loaded, polled_at),
            Event::Window { model, tokens } => match self.models.get_mut(&*model) {
                Some(m) => m.context_length = Some(tokens),
                None => {
                    if self.observed.len() >= OBSERVED_MAX {
                        self.observed.clear();
                    }
                    self.observed.insert(model.into(), tokens);
                }
            },
            Event::Catalog { sizes } => {
                self.catalog = sizes.into_iter().collect();
            }
            Event::ChangedOutside => self.poll_now.notify_one(),
            Event::Shed { all, reply } => {
                let _ = reply.send(self.shed(all));
            }
            Event::Reconfigure { settings } => self.reconfigure(*settings),
            Event::Snapshot { reply } => {
                let mut views: Vec<ModelView> =
                    self.models.values().map(|m| self.view(m)).collect();
                views.sort_by(|a, b| a.model.cmp(&b.model));
                let _ = reply.send(views);
            }
        }
    }

    /// Publishes the table's [`ModelFacts`] when any differs from what was published last
    /// (after every event, and in `schedule` before any lease is granted; a compare of a few
    /// entries when nothing changed).
    pub(super) fn publish_facts(&self) {
        let current = self.facts.all();
        let fact = |m: &Model| ModelFacts {
            status: m.status,
            window: m.context_length,
            runner: m.shape,
        };
        let extra = self
            .observed
            .keys()
            .filter(|k| !self.models.contains_key(*k))
            .count();
        let same = current.len() == self.models.len() + extra
            && self
                .models
                .values()
                .all(|m| current.get(&m.name) == Some(&fact(m)))
            && self.observed.iter().all(|(k, w)| {
                self.models.contains_key(k) || current.get(k).is_some_and(|f| f.window == Some(*w))
            });
        if same {
            return;
        }
        let mut map: ByModel<ModelFacts> = self
            .models
            .values()
            .map(|m| (m.name.clone(), fact(m)))
            .collect();
        for (k, w) in &self.observed {
            map.entry(k.clone()).or_insert(ModelFacts {
                status: ModelStatus::Unloaded,
                window: Some(*w),
                runner: Shape::default(),
            });
        }
        self.facts.store(map);
    }

    /// A hash of what the node view shows of this provider (`fleet::view`): each model's
    /// state, leases, queue, window, runner options, size and pin, and the limits. Summed
    /// per model, so the table's order does not matter.
    fn routing_digest(&self) -> u64 {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::with_seed(21);
        let models = self.models.values().fold(0u64, |acc, m| {
            acc.wrapping_add(h.hash_one((
                &*m.name,
                m.status as u8,
                m.leases(),
                m.queued,
                m.context_length,
                (m.shape.num_ctx, m.shape.num_batch),
                self.size_of(m),
                self.pinned(&m.name),
            )))
        });
        models.wrapping_add(h.hash_one((
            self.settings.max_models_loaded,
            self.settings.memory_threshold.to_bits(),
            self.models.len(),
        )))
    }

    /// Rings `settings.changes` when [`Actor::routing_digest`] moved (after every event).
    fn ring_if_changed(&mut self) {
        let Some(changes) = &self.settings.changes else {
            return;
        };
        let digest = self.routing_digest();
        if digest != self.digest {
            self.digest = digest;
            changes.ring();
        }
    }

    /// The table entry for `model`, created `unloaded` on first mention.
    fn entry(&mut self, model: &str) -> Arc<str> {
        if let Some((k, _)) = self.models.get_key_value(model) {
            return k.clone();
        }
        let name: Arc<str> = model.into();
        let gate = Arc::new(Gate::new(name.clone(), self.shared.clone()));
        self.publish_gates(|gates| {
            gates.insert(name.clone(), gate.clone());
        });
        self.models.insert(
            name.clone(),
            Model {
                name: name.clone(),
                status: ModelStatus::Unloaded,
                active: 0,
                gate,
                queued: 0,
                last_used: 0,
                idle_since: None,
                hint: None,
                load_time: None,
                context_length: self.observed.remove(&name),
                shape: Shape::default(),
                loads: 0,
                unloads: 0,
                instance_id: None,
                reported: None,
                changed_at: self.epoch,
                loaded_by_proxy: false,
                last_error: None,
                op_started: self.epoch,
                op_reason: "",
                unload_waiters: Vec::new(),
                unload_requested: false,
                draining: false,
                keeping: false,
                reshape: false,
            },
        );
        name
    }

    /// Replaces the gate map the handle reads with an edited copy (only when a model is
    /// first mentioned or forgotten: never per request).
    pub(super) fn publish_gates(&self, edit: impl FnOnce(&mut ByModel<Arc<Gate>>)) {
        let mut gates = HashMap::clone(&self.gates.load());
        edit(&mut gates);
        self.gates.store(Arc::new(gates));
    }

    fn model(&mut self, name: &str) -> Option<&mut Model> {
        self.models.get_mut(name)
    }

    /// Whether a new request for `name` may have a lease right away.
    fn grantable_now(&self, name: &str) -> bool {
        let m = &self.models[name];
        m.status == ModelStatus::Ready
            && !m.draining
            && !m.reshape
            && !m.unload_requested
            && (self.settings.queue.policy == QueuePolicy::Grouped || self.queue.is_empty())
    }

    /// Opens the gate of every model a new request could have at once, and closes the
    /// others (after every event). A model whose idle timeout is zero keeps its gate closed:
    /// the actor must hear of each release to unload it right after.
    /// While a request waits for a model it cannot have yet, every gate is watched: the
    /// last release of any model tells the actor, which then evicts or loads in that step.
    fn sync_gates(&self) {
        let watch = self.queue.iter().any(|w| {
            let m = &self.models[&w.model];
            m.status != ModelStatus::Ready || m.draining || m.reshape || m.unload_requested
        });
        for m in self.models.values() {
            let open = self.grantable_now(&m.name) && self.idle_timeout(m) != Some(Duration::ZERO);
            if open != m.gate.is_open() {
                if open {
                    m.gate.open();
                } else {
                    m.gate.close();
                }
            }
            if watch != m.gate.is_watched() {
                m.gate.set_watched(watch);
                // A release between this event's schedule and the flag went unheard: look
                // again (a spare look when the model was idle all along).
                if watch && m.gate.leases() == 0 && m.status == ModelStatus::Ready {
                    let _ = self.tx.send(Event::Drained {
                        model: m.name.clone(),
                    });
                }
            }
        }
    }

    fn grant(
        &mut self,
        name: &Arc<str>,
        reply: oneshot::Sender<Result<Lease, LifecycleError>>,
        hint: Option<IdleHint>,
    ) {
        let seq = self.shared.next_seq();
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        m.active += 1;
        m.idle_since = None;
        m.last_used = seq;
        if hint.is_some() {
            m.hint = hint;
        }
        let lease = Lease(LeaseFrom::Actor {
            shared: self.shared.clone(),
            model: m.name.clone(),
        });
        // The holder reads the model's runner options and window at once: what it reads must
        // be what the table says (the tests check it on every grant).
        debug_assert_eq!(
            self.facts.get(name).map(|f| (f.status, f.runner, f.window)),
            Some((m.status, m.shape, m.context_length)),
            "a lease granted before its model's facts were published"
        );
        // A caller that left drops the reply, and with it the lease: that releases it.
        let _ = reply.send(Ok(lease));
    }

    fn enqueue(&mut self, id: u64, name: Arc<str>, ask: LoadAsk, reply: Reply) {
        if self.queue.len() >= self.settings.queue.max_waiting as usize {
            let retry_after = self.retry_after(&name);
            fail(
                reply,
                LifecycleError::QueueFull {
                    provider: self.settings.provider.clone(),
                    max_waiting: self.settings.queue.max_waiting,
                    retry_after,
                },
            );
            self.forget_if_unlisted(&name);
            return;
        }
        if let Some(m) = self.model(&name) {
            m.queued += 1;
        }
        self.queue.push_back(Waiter {
            id,
            model: name,
            ask,
            enqueued: Instant::now(),
            reply,
        });
        self.schedule();
    }

    fn dequeued(&mut self, name: &str) {
        if let Some(m) = self.model(name) {
            m.queued = m.queued.saturating_sub(1);
        }
    }

    fn release(&mut self, name: &str, seq: u64) {
        let Some(m) = self.model(name) else {
            return;
        };
        m.active = m.active.saturating_sub(1);
        m.last_used = m.last_used.max(seq);
        if m.active == 0 {
            m.idle_since = Some(Instant::now());
        }
        let needs_work = m.leases() == 0 && (m.unload_requested || m.draining || m.reshape);
        if needs_work
            || !self.queue.is_empty()
            || self.idle_timeout_of(name) == Some(Duration::ZERO)
        {
            self.schedule();
        }
    }

    fn admin_unload(
        &mut self,
        model: &str,
        reply: oneshot::Sender<Result<ModelView, LifecycleError>>,
    ) {
        let Some(m) = self.model(model) else {
            // Not in the table: not loaded. A model the provider's catalogue lacks is a 404,
            // as Ollama answers `keep_alive: 0` for it; one it has is simply not loaded. (No
            // catalogue read yet: nothing to tell them apart, so not loaded.)
            let answer = if !self.catalog.is_empty() && !self.catalog.contains_key(model) {
                Err(LifecycleError::NotFound {
                    provider: self.settings.provider.clone(),
                    model: model.to_string(),
                })
            } else {
                Ok(self.unknown_view(model))
            };
            let _ = reply.send(answer);
            return;
        };
        match m.status {
            ModelStatus::Unloaded | ModelStatus::Error => {
                let view = self.view(&self.models[model]);
                let _ = reply.send(Ok(view));
            }
            _ => {
                m.unload_requested = true;
                m.unload_waiters.push(reply);
                self.schedule();
            }
        }
    }

    fn load_done(&mut self, name: &str, shape: Shape, result: Result<Loaded, OpError>) {
        let now = Instant::now();
        if let (Ok(loaded), Some(metrics)) = (&result, &self.settings.metrics) {
            metrics.observe_load(name, loaded.elapsed);
        }
        let provider = self.settings.provider.clone();
        // A load counts as a use: a model just loaded (by an admin too) is not the least
        // recently used one.
        let seq = self.shared.next_seq();
        let Some(m) = self.model(name) else {
            return;
        };
        match result {
            Ok(loaded) => {
                let event = m.event("load", loaded.elapsed, None);
                m.status = ModelStatus::Ready;
                // Imposed options (a non-default shape) are completed by the load's own.
                if !m.shape.is_default() {
                    m.shape = shape;
                }
                m.last_used = m.last_used.max(seq);
                m.changed_at = now;
                m.load_time = Some(loaded.elapsed);
                if loaded.context_length.is_some() {
                    m.context_length = loaded.context_length;
                }

                m.loads += 1;
                m.instance_id = Some(loaded.instance_id);
                m.loaded_by_proxy = true;
                m.last_error = None;
                if m.active == 0 {
                    m.idle_since = Some(now);
                }
                let shape = m.shape;
                self.record(event);
                tracing::info!(
                    provider = %provider,
                    model = %name,
                    load_ms = loaded.elapsed.as_millis() as u64,
                    jit = loaded.jit,
                    num_ctx = shape.num_ctx,
                    num_batch = shape.num_batch,
                    "model loaded"
                );
                self.poll_now.notify_one();
            }
            Err(e) => {
                let event = m.event("load_failed", now - m.op_started, Some(e.to_string()));
                m.status = ModelStatus::Error;
                m.changed_at = now;
                m.last_error = Some(e.to_string());
                m.shape = Shape::default();
                // A model the provider does not have was not a load: the request's own 404
                // says so, and a flood of invented names must not push the real loads and
                // unloads out of the log.
                if !matches!(e, OpError::ModelNotFound { .. }) {
                    self.record(event);
                }
                tracing::warn!(provider = %provider, model = %name, error = %e, "model load failed");
                let err = match e {
                    OpError::ModelNotFound { .. } => LifecycleError::NotFound {
                        provider,
                        model: name.to_string(),
                    },
                    source => LifecycleError::LoadFailed {
                        provider,
                        model: name.to_string(),
                        source,
                    },
                };
                self.fail_waiters_of(name, &err);
                if matches!(err, LifecycleError::NotFound { .. }) {
                    self.forget_if_idle(name);
                } else {
                    self.forget_if_unlisted(name);
                }
            }
        }
        self.schedule();
    }

    fn unload_done(&mut self, name: &str, result: Result<(), OpError>) {
        let now = Instant::now();
        let provider = self.settings.provider.clone();
        if result.is_ok() {
            if let Some(bytes) = self.models.get(name).and_then(|m| self.size_of(m)) {
                self.freed.push_back((now, bytes));
            }
        }
        let Some(m) = self.model(name) else {
            return;
        };
        let waiters = std::mem::take(&mut m.unload_waiters);
        let event = match &result {
            Ok(()) => m.event("unload", now - m.op_started, None),
            Err(e) => m.event("unload_failed", now - m.op_started, Some(e.to_string())),
        };
        m.unload_requested = false;
        m.changed_at = now;
        m.idle_since = None;
        m.hint = None;
        let outcome = match result {
            Ok(()) => {
                m.status = ModelStatus::Unloaded;
                m.unloads += 1;
                m.instance_id = None;
                m.reported = None;
                m.last_error = None;
                m.shape = Shape::default();
                tracing::info!(provider = %provider, model = %name, "model unloaded");
                Ok(())
            }
            Err(e) => {
                // Not known to be loaded any more; the next poll says what is.
                m.status = ModelStatus::Error;
                m.last_error = Some(e.to_string());
                m.shape = Shape::default();
                tracing::warn!(provider = %provider, model = %name, error = %e, "model unload failed");
                Err(LifecycleError::UnloadFailed {
                    provider,
                    model: name.to_string(),
                    source: e,
                })
            }
        };
        self.record(event);
        let view = self.view(&self.models[name]);
        for w in waiters {
            let _ = w.send(outcome.clone().map(|()| view.clone()));
        }
        self.poll_now.notify_one();
        self.schedule();
    }

    /// Follows the provider's list: models loaded behind the proxy's back become `ready`
    /// (and are managed from then on: idle timeout, limits); models it no longer lists, that
    /// nobody is using, become `unloaded` (its own timer, a restart, another client).
    ///
    /// # Keeping a reloaded runner (Ollama)
    ///
    /// The proxy loads with `keep_alive: -1` and rewrites every native request's, so a runner
    /// it loaded never expires on Ollama's own timer, except after a reload it did not ask
    /// for: a `/v1` request whose options differ from the runner's (it cannot carry
    /// `num_ctx`, `runner.rs`) makes Ollama load a new runner with `OLLAMA_KEEP_ALIVE`
    /// (5 minutes by default; `server/sched.go`: a new runner takes the request's
    /// `sessionDuration`, nil on `/v1`, else the default). The reload is seen here, and only
    /// here, for every way it can happen: `/api/ps` gives the runner an `expires_at` with a
    /// real deadline ([`LoadedModel::expires`]) where "forever" is three centuries out. So a
    /// ready model the proxy loaded that the list shows expiring gets the load-only request
    /// again (`Backend::keep`: `{"model", "keep_alive": -1}` with the runner's options, so
    /// it is not reloaded for them), once at a time; a failure is tried again at the next
    /// poll (Ollama sets `expiresAt` only when the runner goes idle, so one kept while busy
    /// may be told again at a poll or two; each is a load-only request, no model work).
    /// Skipped when the options the proxy holds for the runner disagree with the
    /// list's context (sending them would reload it), and for models loaded behind the
    /// proxy's back (their own keep-alive is left to whoever loaded them).
    fn apply_report(&mut self, loaded: Vec<LoadedModel>, polled_at: Instant) {
        let now = Instant::now();
        let provider = self.settings.provider.clone();
        let mut keep: Vec<(Arc<str>, Shape)> = Vec::new();
        for lm in &loaded {
            let name = self.entry(&lm.model);
            let seq = self.shared.next_seq();
            let Some(m) = self.models.get_mut(&name) else {
                continue;
            };
            if lm.context_length.is_some() {
                m.context_length = lm.context_length;
            }
            // Loaded with other options than the proxy's (a client reloaded it): the
            // provider's list is the truth from now on.
            if m.status == ModelStatus::Ready
                && m.changed_at <= polled_at
                && m.shape.num_ctx.is_some()
                && lm.context_length.is_some()
                && lm.context_length != m.shape.num_ctx
            {
                m.shape = Shape::default();
            }
            m.reported = Some(lm.clone());
            if m.status == ModelStatus::Ready
                && m.loaded_by_proxy
                && lm.expires == Some(true)
                && !m.keeping
                && !m.unload_requested
                && m.changed_at <= polled_at
                && (m.shape.num_ctx.is_none() || m.shape.num_ctx == lm.context_length)
            {
                m.keeping = true;
                keep.push((name.clone(), m.shape));
            }
            if matches!(m.status, ModelStatus::Unloaded | ModelStatus::Error)
                && m.changed_at <= polled_at
            {
                m.status = ModelStatus::Ready;
                m.changed_at = now;
                m.loaded_by_proxy = false;
                m.instance_id = Some(lm.model.clone());
                m.last_used = seq;
                m.last_error = None;
                if m.active == 0 {
                    m.idle_since = Some(now);
                }
                tracing::info!(provider = %provider, model = %name, "model found loaded on the provider");
            }
        }
        for m in self.models.values_mut() {
            let listed = loaded.iter().any(|lm| *lm.model == *m.name);
            if listed || m.changed_at > polled_at {
                continue;
            }
            m.reported = None;
            // Closing the gate first: a lease taken through it keeps the model.
            if m.status == ModelStatus::Ready
                && m.active == 0
                && !m.unload_requested
                && m.gate.close_if_idle()
            {
                m.status = ModelStatus::Unloaded;
                m.changed_at = now;
                m.idle_since = None;
                m.instance_id = None;
                m.hint = None;
                m.shape = Shape::default();
                tracing::info!(provider = %provider, model = %m.name, "model no longer loaded on the provider");
            }
        }
        for (model, shape) in keep {
            tracing::info!(provider = %provider, model = %model, "the provider would unload the model on its own timer (a reload): keeping it");
            let op = self.backend.keep(&model, shape);
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let result = op.await;
                let _ = tx.send(Event::Kept { model, result });
            });
        }
        self.schedule();
    }

    /// Idle deadlines and queue timeouts that have come.
    fn on_timer(&mut self) {
        let now = Instant::now();
        let timeout = self.settings.queue.timeout;
        while let Some(w) = self.queue.front() {
            if w.enqueued + timeout > now {
                break;
            }
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            self.dequeued(&w.model);
            let err = LifecycleError::QueueTimeout {
                model: w.model.to_string(),
                waited: now - w.enqueued,
                retry_after: self.retry_after(&w.model),
            };
            tracing::debug!(provider = %self.settings.provider, model = %w.model, "request timed out in the queue");
            fail(w.reply, err);
            self.forget_if_unlisted(&w.model);
        }
        self.schedule();
    }
}

impl Model {
    /// Leases out: the actor's and the gate's.
    fn leases(&self) -> u32 {
        self.active.saturating_add(self.gate.leases())
    }

    /// The last use, by the actor's grants and releases or through the gate.
    fn used(&self) -> u64 {
        self.last_used.max(self.gate.last_used())
    }

    /// Since when the model has been idle, if it is: the later of the actor's idle clock
    /// and the last release through the gate.
    fn idle_from(&self) -> Option<Instant> {
        if self.leases() > 0 {
            return None;
        }
        let since = self.idle_since?;
        Some(self.gate.released_at().map_or(since, |r| r.max(since)))
    }

    /// The event that ends this model's load or unload; `provider` and `at` are the
    /// actor's to fill in ([`Actor::record`]).
    fn event(&self, event: &'static str, took: Duration, error: Option<String>) -> LifecycleEvent {
        LifecycleEvent {
            at: String::new(),
            provider: String::new(),
            model: self.name.to_string(),
            event,
            reason: self.op_reason,
            duration_ms: took.as_millis() as u64,
            error,
        }
    }
}

impl Actor {
    fn record(&self, mut event: LifecycleEvent) {
        event.at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        event.provider = self.settings.provider.clone();
        self.events.push(event);
    }
}

fn fail(reply: Reply, err: LifecycleError) {
    match reply {
        Reply::Request { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Reply::Admin(reply) => {
            let _ = reply.send(Err(err));
        }
    }
}
