//! Scheduling: after every event, bring the table in line with the queue (drain, grant,
//! load, evict, unload). Decisions only; the I/O runs in spawned tasks that report back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{fail, Actor, Decision, Model, Reply, Waiter, FREED_GRACE, UNLISTED_ERRORS_KEPT};
use crate::config::QueuePolicy;
use crate::lifecycle::policy::{self, Plan, Residency, Resident};
use crate::lifecycle::{runner, Event, LifecycleError, LoadAsk, ModelStatus, Shape};
use crate::monitor::Level;

impl Actor {
    /// Brings the table in line with the queue: drains, grants, loads, evictions, unloads.
    pub(super) fn schedule(&mut self) {
        // Before any grant: a request reads its model's runner options once it holds its
        // lease, and they must be the ones of the load this step may have just finished.
        self.publish_facts();
        let now = Instant::now();
        while self
            .freed
            .front()
            .is_some_and(|(at, _)| *at + FREED_GRACE <= now)
        {
            self.freed.pop_front();
        }
        self.mark_draining(now);
        self.mark_reshape();
        self.grant_waiting();
        self.start_loads();
        // Unloads that are due: asked by an admin, or idle past the timeout.
        let mut due = Vec::new();
        for m in self.models.values() {
            if m.status != ModelStatus::Ready || m.leases() > 0 {
                continue;
            }
            let idle_due = m.queued == 0
                && m.idle_from()
                    .is_some_and(|since| self.idle_timeout(m).is_some_and(|t| since + t <= now));
            if m.unload_requested || idle_due || m.reshape {
                due.push((m.name.clone(), m.reshape));
            }
        }
        for (name, reshape) in due {
            let why = if reshape {
                "reshape: a request needs a larger context"
            } else {
                "idle"
            };
            self.start_unload(&name, why);
        }
    }

    /// The oldest waiter whose model cannot serve it, if it has waited past `queue.aging`
    /// (at once under FIFO): the ready models a load for it would evict, were they idle,
    /// stop taking leases so that they drain.
    pub(super) fn mark_draining(&mut self, now: Instant) {
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
    pub(super) fn grant_waiting(&mut self) {
        let fifo = self.settings.queue.policy == QueuePolicy::Fifo;
        let mut i = 0;
        while i < self.queue.len() {
            let m = &self.models[&self.queue[i].model];
            let ready =
                m.status == ModelStatus::Ready && !m.draining && !m.reshape && !m.unload_requested;
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
    pub(super) fn start_loads(&mut self) {
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
    pub(super) fn plan(&self, target: &str, assume_idle: bool) -> Decision {
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
                    active: if assume_idle { 0 } else { m.leases() },
                    pinned: self.pinned(&m.name),
                    last_used: m.used(),
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

    pub(super) fn start_load(&mut self, name: &Arc<str>) {
        let Some(m) = self.model(name) else {
            return;
        };
        m.status = ModelStatus::Loading;
        m.changed_at = Instant::now();
        m.op_started = m.changed_at;
        m.last_error = None;
        tracing::info!(provider = %self.settings.provider, model = %name, "loading model");
        // What the oldest waiter asks, capped under memory pressure (`runner`): the actor
        // decides; requests then carry the runner's options (Ollama reloads a runner whose
        // options differ from a request's).
        let ask = self
            .queue
            .iter()
            .find(|w| w.model == *name)
            .map(|w| w.ask)
            .unwrap_or_default();
        // The least context its waiters need: every one of them is served by this load.
        let floor = self
            .queue
            .iter()
            .filter(|w| w.model == *name)
            .filter_map(|w| w.ask.floor())
            .max();
        let (mut shape, batch_budget, imposed) = self.load_shape(ask, floor);
        // Asked through the admin API, or needed by a request (the oldest waiter started it).
        let reason = match self
            .queue
            .iter()
            .find(|w| w.model == *name)
            .map(|w| &w.reply)
        {
            Some(Reply::Admin(_)) => "asked",
            _ => "request",
        };
        if let Some(m) = self.models.get_mut(name) {
            m.shape = if imposed { shape } else { Shape::default() };
            m.op_reason = reason;
        }
        // Published after this event (`publish_facts`); `num_batch`, when it comes from the
        // model's geometry, with the load's end. Requests wait for the load, then carry both.
        let backend = self.backend.clone();
        let tx = self.tx.clone();
        let model = name.clone();
        tokio::spawn(async move {
            if let (Some(budget), Some(num_ctx)) = (batch_budget, shape.num_ctx) {
                if let Some(g) = backend.geometry(&model).await {
                    let fits = crate::memory::batch::batch_for(&g, num_ctx, budget);
                    shape.num_batch = runner::capped(fits, shape.num_batch);
                }
            }
            let result = backend.load(&model, shape).await;
            let _ = tx.send(Event::LoadDone {
                model,
                shape,
                result,
            });
        });
    }

    pub(super) fn start_unload(&mut self, name: &Arc<str>, why: &'static str) {
        let Some(m) = self.model(name) else {
            return;
        };
        // The gate closes here or the unload does not start: a lease taken through it
        // keeps the model (see `lifecycle::gate`).
        if m.status != ModelStatus::Ready || m.active > 0 || !m.gate.close_if_idle() {
            return;
        }
        m.status = ModelStatus::Unloading;
        m.changed_at = Instant::now();
        m.op_started = m.changed_at;
        m.draining = false;
        let id = m.instance_id.clone().unwrap_or_else(|| m.name.to_string());
        let why = if m.unload_requested { "asked" } else { why };
        m.op_reason = why;
        tracing::info!(provider = %self.settings.provider, model = %name, reason = why, "unloading model");
        let op = self.backend.unload(&id);
        let tx = self.tx.clone();
        let model = name.clone();
        tokio::spawn(async move {
            let result = op.await;
            let _ = tx.send(Event::UnloadDone { model, result });
        });
    }

    pub(super) fn fail_waiters_of(&mut self, name: &str, err: &LifecycleError) {
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

    /// Bounds the entries of models nothing ties to the provider: never loaded by the proxy,
    /// not listed as loaded, not in the catalogue, not configured, and idle. Called where a
    /// request for a name can end without a load (a full queue, a queue timeout, a client
    /// that left, a failed load), so names clients invent leave no lasting entry (the table,
    /// its facts, its gates). One whose load failed stays, to show its error (the provider
    /// down at start: the model is `error`, not stuck), but only the latest
    /// [`UNLISTED_ERRORS_KEPT`] of them; any other goes at once.
    pub(super) fn forget_if_unlisted(&mut self, name: &str) {
        let Some(m) = self.models.get(name) else {
            return;
        };
        if !self.unlisted(m) {
            return;
        }
        if m.status != ModelStatus::Error {
            self.forget_if_idle(name);
            return;
        }
        let mut failed: Vec<(Instant, Arc<str>)> = self
            .models
            .values()
            .filter(|m| m.status == ModelStatus::Error && self.unlisted(m))
            .map(|m| (m.changed_at, m.name.clone()))
            .collect();
        if failed.len() > UNLISTED_ERRORS_KEPT {
            failed.sort();
            let excess = failed.len() - UNLISTED_ERRORS_KEPT;
            for (_, name) in failed.into_iter().take(excess) {
                self.forget_if_idle(&name);
            }
        }
    }

    /// See [`Actor::forget_if_unlisted`].
    fn unlisted(&self, m: &Model) -> bool {
        matches!(m.status, ModelStatus::Unloaded | ModelStatus::Error)
            && m.loads == 0
            && m.reported.is_none()
            && m.context_length.is_none()
            && m.leases() == 0
            && m.queued == 0
            && m.unload_waiters.is_empty()
            && !self.catalog.contains_key(&*m.name)
            && !self.settings.models.contains_key(&*m.name)
    }

    /// Drops a model the provider does not have, so unknown names do not pile up.
    pub(super) fn forget_if_idle(&mut self, name: &str) {
        if self
            .models
            .get(name)
            .is_some_and(|m| m.leases() == 0 && m.queued == 0 && m.unload_waiters.is_empty())
        {
            self.models.remove(name);
            self.publish_gates(|gates| {
                gates.remove(name);
            });
        }
    }

    /// Loaded models nobody uses or waits for, unpinned, least recently used first: the ones
    /// that may be unloaded to free memory or a place.
    fn idle_lru(&self) -> Vec<Arc<str>> {
        let mut idle: Vec<(u64, Arc<str>)> = self
            .models
            .values()
            .filter(|m| {
                m.status == ModelStatus::Ready
                    && m.leases() == 0
                    && m.queued == 0
                    && !self.pinned(&m.name)
            })
            .map(|m| (m.used(), m.name.clone()))
            .collect();
        idle.sort();
        idle.into_iter().map(|(_, name)| name).collect()
    }

    /// Unloads idle models for memory pressure, least recently used first: one, or `all`.
    pub(super) fn shed(&mut self, all: bool) -> Vec<String> {
        let idle = self.idle_lru();
        let take = if all { idle.len() } else { idle.len().min(1) };
        let mut shed = Vec::new();
        for name in idle.into_iter().take(take) {
            self.start_unload(&name, "memory pressure");
            shed.push(name.to_string());
        }
        shed
    }

    /// New settings from a config reload (the pressure feed and the metrics stay). Then the limit is
    /// enforced on idle models, least recently used first, and the queue is looked at again.
    pub(super) fn reconfigure(&mut self, mut settings: crate::lifecycle::Settings) {
        settings.pressure = self.settings.pressure.take();
        settings.metrics = self.settings.metrics.take();
        settings.changes = self.settings.changes.take();
        self.settings = settings;
        let max = self.settings.max_models_loaded as usize;
        let resident = self
            .models
            .values()
            .filter(|m| matches!(m.status, ModelStatus::Ready | ModelStatus::Loading))
            .count();
        if resident > max {
            for name in self.idle_lru().into_iter().take(resident - max) {
                self.start_unload(&name, "limit lowered by a config reload");
            }
        }
        tracing::info!(provider = %self.settings.provider, "lifecycle settings reloaded");
        self.schedule();
    }

    /// The runner options a load asked as `ask` gets now (its context at least `floor`), the
    /// compute-buffer budget its `num_batch` must fit (see `runner`), and whether memory
    /// pressure imposed them (then requests must carry them; a load at the request's own
    /// options is the provider's business, as if the request had started it).
    pub(super) fn load_shape(
        &self,
        ask: LoadAsk,
        floor: Option<u64>,
    ) -> (Shape, Option<u64>, bool) {
        let asked = match ask {
            LoadAsk::Options(asked) | LoadAsk::AtLeast(asked, _) => asked,
            LoadAsk::Defaults => return (Shape::default(), None, false),
        };
        let level = self
            .settings
            .pressure
            .as_ref()
            .map_or(Level::Normal, |p| p.borrow().pressure_level);
        let cap = runner::cap(
            self.settings.kind,
            level,
            self.settings.context_initial,
            self.settings.working_initial_mb,
        );
        let shape = Shape {
            num_ctx: runner::context(cap.num_ctx, asked.num_ctx, floor),
            num_batch: asked.num_batch,
        };
        let imposed = cap.num_ctx.is_some() || cap.batch_budget.is_some();
        (shape, cap.batch_budget, imposed)
    }

    /// Ready models whose runner is too small for a waiter ([`LoadAsk::AtLeast`]): they take
    /// no new leases and, once their last one is back, are reloaded at the larger size.
    pub(super) fn mark_reshape(&mut self) {
        for m in self.models.values_mut() {
            m.reshape = false;
        }
        for w in &self.queue {
            let Some(m) = self.models.get_mut(&w.model) else {
                continue;
            };
            if m.status == ModelStatus::Ready && !w.ask.served_by(m.shape) {
                m.reshape = true;
            }
        }
    }
}
