//! The actor: one task per provider that owns the model table and the wait queue, and makes
//! every load and unload decision. See the module doc of `lifecycle` for events and invariants.
//!
//! After each event the actor runs [`Actor::schedule`]: mark the models that must drain for a
//! request that has waited too long, grant leases to waiting requests whose model is ready,
//! then plan loads for the oldest waiting models (evicting idle ones per `policy`). Slow work
//! (loads, unloads) runs in spawned tasks that report back as events; the loop never awaits I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::policy::{self, Plan, RefuseReason, Residency, Resident};
use super::{
    Backend, Event, IdleHint, Lease, LifecycleError, MemoryProbe, ModelStatus, ModelView, Settings,
};
use crate::config::QueuePolicy;
use crate::providers::ops::{Loaded, OpError};
use crate::providers::LoadedModel;

const MIB: u64 = 1 << 20;
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
    /// Leases out. Only `ready` models hand them out; `unloading` begins only at zero.
    active: u32,
    /// Waiters in the queue for this model (kept equal to a count over the queue).
    queued: u32,
    /// Sequence number of the last grant or release: smaller = less recently used.
    last_used: u64,
    /// When the last lease dropped (or the model became ready with none): the idle clock.
    idle_since: Option<Instant>,
    /// A client's `keep_alive`; replaces the configured idle timeout until the model unloads.
    hint: Option<IdleHint>,
    load_time: Option<Duration>,
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
    /// An admin asked to unload it: no new leases, unload once the last one drops.
    unload_waiters: Vec<oneshot::Sender<Result<ModelView, LifecycleError>>>,
    unload_requested: bool,
    /// A request for another model waited past `queue.aging`, and this model is in its
    /// way: no new leases, so it drains and can be swapped out. Recomputed by `schedule`.
    draining: bool,
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
    models: HashMap<Arc<str>, Model>,
    /// Arrival order; every waiter has the same timeout, so the front expires first.
    queue: VecDeque<Waiter>,
    /// Size on disk of each model the provider has, bytes.
    catalog: HashMap<String, u64>,
    seq: u64,
    /// When the actor started: the `changed_at` of a model that never changed.
    epoch: Instant,
    /// Bytes recent unloads freed, and when (see [`FREED_GRACE`]).
    freed: VecDeque<(Instant, u64)>,
}

impl Actor {
    pub(super) fn new(
        settings: Settings,
        backend: Arc<dyn Backend>,
        memory: Arc<dyn MemoryProbe>,
        poll_now: Arc<Notify>,
        tx: mpsc::UnboundedSender<Event>,
        rx: mpsc::UnboundedReceiver<Event>,
    ) -> Self {
        Actor {
            settings,
            backend,
            memory,
            poll_now,
            tx,
            rx,
            models: HashMap::new(),
            queue: VecDeque::new(),
            catalog: HashMap::new(),
            seq: 0,
            epoch: Instant::now(),
            freed: Default::default(),
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
                reply,
            } => {
                let name = self.entry(&model);
                if self.grantable_now(&name) {
                    self.grant(&name, reply, hint);
                } else {
                    self.enqueue(id, name, Reply::Request { reply, hint });
                }
            }
            Event::AdminLoad { id, model, reply } => {
                let name = self.entry(&model);
                if self.models[&name].status == ModelStatus::Ready {
                    let _ = reply.send(Ok(self.view(&self.models[&name])));
                } else {
                    self.enqueue(id, name, Reply::Admin(reply));
                }
            }
            Event::AdminUnload { model, reply } => self.admin_unload(&model, reply),
            Event::Abandon { id } => {
                if let Some(pos) = self.queue.iter().position(|w| w.id == id) {
                    if let Some(w) = self.queue.remove(pos) {
                        self.dequeued(&w.model);
                    }
                    self.schedule();
                }
            }
            Event::Release { model } => self.release(&model),
            Event::LoadDone { model, result } => self.load_done(&model, result),
            Event::UnloadDone { model, result } => self.unload_done(&model, result),
            Event::Report { loaded, polled_at } => self.apply_report(loaded, polled_at),
            Event::Catalog { sizes } => {
                self.catalog = sizes.into_iter().collect();
            }
            Event::Snapshot { reply } => {
                let mut views: Vec<ModelView> =
                    self.models.values().map(|m| self.view(m)).collect();
                views.sort_by(|a, b| a.model.cmp(&b.model));
                let _ = reply.send(views);
            }
        }
    }

    /// The table entry for `model`, created `unloaded` on first mention.
    fn entry(&mut self, model: &str) -> Arc<str> {
        if let Some((k, _)) = self.models.get_key_value(model) {
            return k.clone();
        }
        let name: Arc<str> = model.into();
        self.models.insert(
            name.clone(),
            Model {
                name: name.clone(),
                status: ModelStatus::Unloaded,
                active: 0,
                queued: 0,
                last_used: 0,
                idle_since: None,
                hint: None,
                load_time: None,
                loads: 0,
                unloads: 0,
                instance_id: None,
                reported: None,
                changed_at: self.epoch,
                loaded_by_proxy: false,
                last_error: None,
                unload_waiters: Vec::new(),
                unload_requested: false,
                draining: false,
            },
        );
        name
    }

    fn model(&mut self, name: &str) -> Option<&mut Model> {
        self.models.get_mut(name)
    }

    /// Whether a new request for `name` may have a lease right away (the hot path).
    fn grantable_now(&self, name: &str) -> bool {
        let m = &self.models[name];
        m.status == ModelStatus::Ready
            && !m.draining
            && !m.unload_requested
            && (self.settings.queue.policy == QueuePolicy::Grouped || self.queue.is_empty())
    }

    fn grant(
        &mut self,
        name: &Arc<str>,
        reply: oneshot::Sender<Result<Lease, LifecycleError>>,
        hint: Option<IdleHint>,
    ) {
        self.seq += 1;
        let seq = self.seq;
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        m.active += 1;
        m.idle_since = None;
        m.last_used = seq;
        if hint.is_some() {
            m.hint = hint;
        }
        let lease = Lease {
            tx: self.tx.clone(),
            model: m.name.clone(),
        };
        // A caller that left drops the reply, and with it the lease: that releases it.
        let _ = reply.send(Ok(lease));
    }

    fn enqueue(&mut self, id: u64, name: Arc<str>, reply: Reply) {
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
            return;
        }
        if let Some(m) = self.model(&name) {
            m.queued += 1;
        }
        self.queue.push_back(Waiter {
            id,
            model: name,
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

    fn release(&mut self, name: &str) {
        self.seq += 1;
        let seq = self.seq;
        let Some(m) = self.model(name) else {
            return;
        };
        m.active = m.active.saturating_sub(1);
        m.last_used = seq;
        if m.active == 0 {
            m.idle_since = Some(Instant::now());
        }
        let needs_work = m.active == 0 && (m.unload_requested || m.draining);
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
            let view = self.unknown_view(model);
            let _ = reply.send(Ok(view));
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

    fn load_done(&mut self, name: &str, result: Result<Loaded, OpError>) {
        let now = Instant::now();
        let provider = self.settings.provider.clone();
        let Some(m) = self.model(name) else {
            return;
        };
        match result {
            Ok(loaded) => {
                m.status = ModelStatus::Ready;
                m.changed_at = now;
                m.load_time = Some(loaded.elapsed);
                m.loads += 1;
                m.instance_id = Some(loaded.instance_id);
                m.loaded_by_proxy = true;
                m.last_error = None;
                if m.active == 0 {
                    m.idle_since = Some(now);
                }
                tracing::info!(
                    provider = %provider,
                    model = %name,
                    load_ms = loaded.elapsed.as_millis() as u64,
                    jit = loaded.jit,
                    "model loaded"
                );
                self.poll_now.notify_one();
            }
            Err(e) => {
                m.status = ModelStatus::Error;
                m.changed_at = now;
                m.last_error = Some(e.to_string());
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
                tracing::info!(provider = %provider, model = %name, "model unloaded");
                Ok(())
            }
            Err(e) => {
                // Not known to be loaded any more; the next poll says what is.
                m.status = ModelStatus::Error;
                m.last_error = Some(e.to_string());
                tracing::warn!(provider = %provider, model = %name, error = %e, "model unload failed");
                Err(LifecycleError::UnloadFailed {
                    provider,
                    model: name.to_string(),
                    source: e,
                })
            }
        };
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
    fn apply_report(&mut self, loaded: Vec<LoadedModel>, polled_at: Instant) {
        let now = Instant::now();
        let provider = self.settings.provider.clone();
        for lm in &loaded {
            let name = self.entry(&lm.model);
            self.seq += 1;
            let seq = self.seq;
            let Some(m) = self.model(&name) else {
                continue;
            };
            m.reported = Some(lm.clone());
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
            if m.status == ModelStatus::Ready && m.active == 0 && !m.unload_requested {
                m.status = ModelStatus::Unloaded;
                m.changed_at = now;
                m.idle_since = None;
                m.instance_id = None;
                m.hint = None;
                tracing::info!(provider = %provider, model = %m.name, "model no longer loaded on the provider");
            }
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
        }
        self.schedule();
    }

    // === scheduling ===

    /// Brings the table in line with the queue: drains, grants, loads, evictions, unloads.
    fn schedule(&mut self) {
        let now = Instant::now();
        while self
            .freed
            .front()
            .is_some_and(|(at, _)| *at + FREED_GRACE <= now)
        {
            self.freed.pop_front();
        }
        self.mark_draining(now);
        self.grant_waiting();
        self.start_loads();
        // Unloads that are due: asked by an admin, or idle past the timeout.
        let mut due = Vec::new();
        for m in self.models.values() {
            if m.status != ModelStatus::Ready || m.active > 0 {
                continue;
            }
            let idle_due = m.queued == 0
                && m.idle_since
                    .is_some_and(|since| self.idle_timeout(m).is_some_and(|t| since + t <= now));
            if m.unload_requested || idle_due {
                due.push(m.name.clone());
            }
        }
        for name in due {
            self.start_unload(&name, "idle");
        }
    }

    /// The oldest waiter whose model cannot serve it, if it has waited past `queue.aging`
    /// (at once under FIFO): the ready models a load for it would evict, were they idle,
    /// stop taking leases so that they drain.
    fn mark_draining(&mut self, now: Instant) {
        for m in self.models.values_mut() {
            m.draining = false;
        }
        let aging = match self.settings.queue.policy {
            QueuePolicy::Fifo => Duration::ZERO,
            QueuePolicy::Grouped => self.settings.queue.aging,
        };
        let blocked = |w: &Waiter| {
            let m = &self.models[&w.model];
            m.status != ModelStatus::Ready || m.unload_requested
        };
        let Some(at) = self.queue.iter().position(blocked) else {
            return;
        };
        let head = &self.queue[at];
        // Models with requests queued ahead of the head serve those first (in arrival
        // order); draining them would strand those requests.
        let ahead: Vec<&Arc<str>> = self.queue.iter().take(at).map(|w| &w.model).collect();
        if head.enqueued + aging > now {
            return;
        }
        let target = head.model.clone();
        if !matches!(
            self.models[&target].status,
            ModelStatus::Unloaded | ModelStatus::Error
        ) {
            return;
        }
        // The models in its way, busy or not: busy ones must not take new leases (or they
        // never drain), idle ones must not take any before the eviction that follows.
        if let Decision::Evict(victims) = self.plan(&target, true) {
            let victims: Vec<Arc<str>> = victims
                .into_iter()
                .filter(|v| !ahead.contains(&v))
                .collect();
            for v in victims {
                if let Some(m) = self.model(&v) {
                    m.draining = true;
                }
            }
        }
    }

    /// Grants a lease to every waiter whose model is ready (and not draining); under FIFO,
    /// only up to the first waiter that cannot be served.
    fn grant_waiting(&mut self) {
        let fifo = self.settings.queue.policy == QueuePolicy::Fifo;
        let mut i = 0;
        while i < self.queue.len() {
            let m = &self.models[&self.queue[i].model];
            let ready = m.status == ModelStatus::Ready && !m.draining && !m.unload_requested;
            if !ready {
                if fifo {
                    return;
                }
                i += 1;
                continue;
            }
            let Some(w) = self.queue.remove(i) else {
                return;
            };
            self.dequeued(&w.model);
            match w.reply {
                Reply::Request { reply, hint } => self.grant(&w.model, reply, hint),
                Reply::Admin(reply) => {
                    let _ = reply.send(Ok(self.view(&self.models[&w.model])));
                }
            }
        }
    }

    /// Plans loads for the waiting models, oldest waiter first; stops at the first that
    /// must wait, so younger requests do not take the room an older one needs.
    fn start_loads(&mut self) {
        let mut seen: Vec<Arc<str>> = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let name = self.queue[i].model.clone();
            i += 1;
            if seen.contains(&name) {
                continue;
            }
            seen.push(name.clone());
            if !matches!(
                self.models[&name].status,
                ModelStatus::Unloaded | ModelStatus::Error
            ) {
                continue;
            }
            match self.plan(&name, false) {
                Decision::Load => self.start_load(&name),
                Decision::Evict(victims) => {
                    for v in victims {
                        self.start_unload(&v, "to make room");
                    }
                    return;
                }
                Decision::Wait => return,
                Decision::Refuse(reason) => {
                    let err = self.refusal(&name, reason);
                    self.fail_waiters_of(&name, &err);
                    // The queue changed under the index: start over (bounded: each pass
                    // removes this model's waiters).
                    i = 0;
                    seen.clear();
                }
            }
        }
    }

    /// The policy's plan for loading `target` now. `assume_idle` treats busy ready models
    /// as idle: which models are in the way, for draining.
    fn plan(&self, target: &str, assume_idle: bool) -> Decision {
        let residents: Vec<Resident> = self
            .models
            .values()
            .filter_map(|m| {
                let residency = match m.status {
                    ModelStatus::Loading => Residency::Loading,
                    ModelStatus::Ready => Residency::Ready,
                    ModelStatus::Unloading => Residency::Unloading,
                    ModelStatus::Unloaded | ModelStatus::Error => return None,
                };
                Some(Resident {
                    name: &m.name,
                    residency,
                    active: if assume_idle { 0 } else { m.active },
                    pinned: self.pinned(&m.name),
                    last_used: m.last_used,
                    size_bytes: self.size_of(m),
                })
            })
            .collect();
        let reading = self.memory.read();
        let limits = policy::Limits {
            max_models_loaded: self.settings.max_models_loaded,
            memory_budget: reading
                .map(|r| (r.total as f64 * self.settings.memory_threshold) as u64),
            available: reading.map(|r| {
                let now = Instant::now();
                let recent: u64 = self
                    .freed
                    .iter()
                    .filter(|(at, _)| *at + FREED_GRACE > now)
                    .map(|(_, b)| b)
                    .sum();
                (r.available + recent).min(r.total)
            }),
        };
        let size = self.models.get(target).and_then(|m| self.size_of(m));
        match policy::plan_load(size, &residents, limits) {
            Plan::Load => Decision::Load,
            Plan::Wait => Decision::Wait,
            Plan::Refuse(r) => Decision::Refuse(r),
            Plan::Evict(v) => Decision::Evict(
                v.into_iter()
                    .filter_map(|n| self.models.get_key_value(n).map(|(k, _)| k.clone()))
                    .collect(),
            ),
        }
    }

    fn start_load(&mut self, name: &Arc<str>) {
        let Some(m) = self.model(name) else {
            return;
        };
        m.status = ModelStatus::Loading;
        m.changed_at = Instant::now();
        m.last_error = None;
        tracing::info!(provider = %self.settings.provider, model = %name, "loading model");
        let op = self.backend.load(name);
        let tx = self.tx.clone();
        let model = name.clone();
        tokio::spawn(async move {
            let result = op.await;
            let _ = tx.send(Event::LoadDone { model, result });
        });
    }

    fn start_unload(&mut self, name: &Arc<str>, why: &str) {
        let Some(m) = self.model(name) else {
            return;
        };
        if m.status != ModelStatus::Ready || m.active > 0 {
            return;
        }
        m.status = ModelStatus::Unloading;
        m.changed_at = Instant::now();
        m.draining = false;
        let id = m.instance_id.clone().unwrap_or_else(|| m.name.to_string());
        let why = if m.unload_requested { "asked" } else { why };
        tracing::info!(provider = %self.settings.provider, model = %name, reason = why, "unloading model");
        let op = self.backend.unload(&id);
        let tx = self.tx.clone();
        let model = name.clone();
        tokio::spawn(async move {
            let result = op.await;
            let _ = tx.send(Event::UnloadDone { model, result });
        });
    }

    fn fail_waiters_of(&mut self, name: &str, err: &LifecycleError) {
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for w in self.queue.drain(..) {
            if &*w.model == name {
                fail(w.reply, err.clone());
            } else {
                kept.push_back(w);
            }
        }
        self.queue = kept;
        if let Some(m) = self.model(name) {
            m.queued = 0;
        }
    }

    /// Drops a model the provider does not have, so unknown names do not pile up.
    fn forget_if_idle(&mut self, name: &str) {
        if self
            .models
            .get(name)
            .is_some_and(|m| m.active == 0 && m.queued == 0 && m.unload_waiters.is_empty())
        {
            self.models.remove(name);
        }
    }

    // === facts ===

    fn pinned(&self, name: &str) -> bool {
        self.settings.models.get(name).is_some_and(|o| o.pinned)
    }

    /// The idle timeout that applies to `m` now; `None` = never unloads when idle.
    fn idle_timeout(&self, m: &Model) -> Option<Duration> {
        if self.pinned(&m.name) {
            return None;
        }
        match m.hint {
            Some(IdleHint::Never) => None,
            Some(IdleHint::After(d)) => Some(d),
            None => Some(
                self.settings
                    .models
                    .get(&*m.name)
                    .and_then(|o| o.inactivity_timeout)
                    .unwrap_or(self.settings.inactivity_timeout),
            ),
        }
    }

    fn idle_timeout_of(&self, name: &str) -> Option<Duration> {
        self.models.get(name).and_then(|m| self.idle_timeout(m))
    }

    /// Bytes the model takes loaded: the config's `memory`, else what the provider reports
    /// for it loaded, else its size on disk.
    fn size_of(&self, m: &Model) -> Option<u64> {
        self.settings
            .models
            .get(&*m.name)
            .and_then(|o| o.memory)
            .or_else(|| m.reported.as_ref().and_then(|r| r.size_bytes))
            .or_else(|| self.catalog.get(&*m.name).copied())
    }

    /// What to suggest in `Retry-After`: about one load of the model, at least a second.
    fn retry_after(&self, name: &str) -> Duration {
        let load = self
            .models
            .get(name)
            .and_then(|m| m.load_time)
            .unwrap_or(Duration::ZERO);
        Duration::from_secs(load.as_secs_f64().ceil().clamp(1.0, 60.0) as u64)
    }

    fn refusal(&self, name: &str, reason: RefuseReason) -> LifecycleError {
        match reason {
            RefuseReason::TooLarge { size_bytes, budget } => LifecycleError::TooLarge {
                provider: self.settings.provider.clone(),
                model: name.to_string(),
                size_mb: size_bytes.div_ceil(MIB),
                budget_mb: budget / MIB,
            },
            // Validation keeps max_models_loaded >= 1; answer sensibly anyway.
            RefuseReason::NoSlots => LifecycleError::TooLarge {
                provider: self.settings.provider.clone(),
                model: name.to_string(),
                size_mb: 0,
                budget_mb: 0,
            },
        }
    }

    /// The next moment the timer has work: a queue timeout, an idle deadline, or the head of
    /// the queue reaching its aging bound.
    fn next_wake(&self) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut earlier = |t: Instant| {
            if wake.map_or(true, |w| t < w) {
                wake = Some(t);
            }
        };
        if let Some(front) = self.queue.front() {
            earlier(front.enqueued + self.settings.queue.timeout);
            if self.settings.queue.policy == QueuePolicy::Grouped {
                let head = self
                    .queue
                    .iter()
                    .find(|w| self.models[&w.model].status != ModelStatus::Ready);
                if let Some(h) = head {
                    let at = h.enqueued + self.settings.queue.aging;
                    if at > Instant::now() {
                        earlier(at);
                    }
                }
            }
        }
        for m in self.models.values() {
            if m.status == ModelStatus::Ready && m.active == 0 {
                if let (Some(since), Some(t)) = (m.idle_since, self.idle_timeout(m)) {
                    earlier(since + t);
                }
            }
        }
        wake
    }

    fn view(&self, m: &Model) -> ModelView {
        let now = Instant::now();
        let timeout = self.idle_timeout(m);
        let unloads_in = match (m.status, m.active, m.idle_since, timeout) {
            (ModelStatus::Ready, 0, Some(since), Some(t)) => {
                Some((since + t).saturating_duration_since(now).as_secs_f64())
            }
            _ => None,
        };
        ModelView {
            model: m.name.to_string(),
            status: m.status,
            platform: self.settings.kind.as_str(),
            leases: m.active,
            queue_depth: m.queued,
            load_time_ms: m.load_time.map(|d| d.as_millis() as u64),
            loads: m.loads,
            unloads: m.unloads,
            memory_estimate_mb: self.size_of(m).map(|b| b.div_ceil(MIB)),
            inactivity_timeout_s: timeout.map(|t| t.as_secs_f64()),
            pinned: self.pinned(&m.name),
            unloads_in_s: unloads_in,
            loaded_by: match m.status {
                ModelStatus::Ready | ModelStatus::Unloading => Some(if m.loaded_by_proxy {
                    "proxy"
                } else {
                    "provider"
                }),
                _ => None,
            },
            last_error: m.last_error.clone(),
        }
    }

    /// The view of a model the actor has never heard of.
    fn unknown_view(&self, model: &str) -> ModelView {
        ModelView {
            model: model.to_string(),
            status: ModelStatus::Unloaded,
            platform: self.settings.kind.as_str(),
            leases: 0,
            queue_depth: 0,
            load_time_ms: None,
            loads: 0,
            unloads: 0,
            memory_estimate_mb: self.catalog.get(model).map(|b| b.div_ceil(MIB)),
            inactivity_timeout_s: None,
            pinned: self.pinned(model),
            unloads_in_s: None,
            loaded_by: None,
            last_error: None,
        }
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
