//! The scheduler: one runner per loaded model, shared loads, LRU eviction at
//! `max_loaded_models`, reloads when `num_ctx` changes, the wait queue (`max_queue`) and
//! keep-alive expiry, evaluated lazily against the clock. Leases and the `Generating` guard
//! release what a request holds when it is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::config::full_name;
use super::keep_alive::KeepAlive;
use super::{relock, OllamaSim, WARM_LOAD_NS};

/// Ollama's default `num_batch`.
const DEFAULT_NUM_BATCH: u32 = 512;
use crate::SimModel;

/// A loaded (or loading) model.
pub(super) struct Runner {
    /// Unique per load, so a stale lease never touches a later load of the same model.
    id: u64,
    pub(super) model: SimModel,
    pub(super) num_ctx: u32,
    pub(super) num_batch: u32,
    pub(super) ready: bool,
    load_rx: watch::Receiver<Option<Result<(), String>>>,
    /// Requests holding the runner (waiting for its load or generating).
    refs: usize,
    keep_alive: KeepAlive,
    /// Set when `refs` drops to 0: the keep-alive timer's start.
    idle_since: Option<SystemTime>,
    /// LRU stamp.
    last_used: u64,
}

impl Runner {
    fn expired(&self, now: SystemTime) -> bool {
        self.ready
            && self.refs == 0
            && match (self.keep_alive, self.idle_since) {
                (KeepAlive::For(d), Some(t)) => t + d <= now,
                _ => false,
            }
    }

    pub(super) fn expires_at(&self, now: SystemTime) -> SystemTime {
        self.keep_alive.until(self.idle_since.unwrap_or(now))
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) catalogue: Vec<SimModel>,
    pub(super) runners: BTreeMap<String, Runner>,
    pub(super) load_counts: HashMap<String, usize>,
    seq: u64,
}

impl State {
    pub(super) fn new(catalogue: Vec<SimModel>) -> Self {
        State {
            catalogue,
            ..State::default()
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Applies keep-alive expiry at `now` (evaluated lazily on every read).
    pub(super) fn expire(&mut self, now: SystemTime) {
        self.runners.retain(|_, r| !r.expired(now));
    }

    /// Case-insensitive, as Ollama's `getExistingName` (server/routes.go: `strings.EqualFold`
    /// on each part of the name), answering with the catalogue's own spelling.
    pub(super) fn lookup(&self, name: &str) -> Option<SimModel> {
        let full = full_name(name);
        self.catalogue
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(&full))
            .cloned()
    }
}

/// What one scheduling attempt decided.
enum Step {
    Ready(Lease),
    Loading(Lease, watch::Receiver<Option<Result<(), String>>>),
    Wait,
}

pub(super) enum SchedError {
    QueueFull,
    Load(String),
}

/// A reference on a runner; dropping it starts the keep-alive timer when it was the last.
pub(super) struct Lease {
    sim: Arc<OllamaSim>,
    name: String,
    id: u64,
    /// Taken by a request with `keep_alive:0`: its end asks for an unload.
    unload: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.sim.release(&self.name, self.id, self.unload);
    }
}

pub(super) struct Acquired {
    pub(super) lease: Lease,
    pub(super) load_ns: u64,
}

/// Counts a request as generating; dropped unfinished, it counts a cancellation.
pub(super) struct Generating {
    sim: Arc<OllamaSim>,
    finished: bool,
}

impl Generating {
    pub(super) fn start(sim: &Arc<OllamaSim>) -> Self {
        sim.active.fetch_add(1, Ordering::SeqCst);
        Generating {
            sim: sim.clone(),
            finished: false,
        }
    }

    pub(super) fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.sim.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Generating {
    fn drop(&mut self) {
        if !self.finished {
            self.sim.active.fetch_sub(1, Ordering::SeqCst);
            self.sim.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl OllamaSim {
    fn default_keep_alive(&self) -> KeepAlive {
        KeepAlive::from_config(self.cfg.keep_alive)
    }

    /// Effective `num_ctx`: request option > model parameter > server default, capped at the
    /// trained length.
    pub(super) fn effective_num_ctx(&self, model: &SimModel, requested: Option<u32>) -> u32 {
        let n = requested
            .filter(|n| *n > 0)
            .or(model.default_num_ctx)
            .unwrap_or(self.cfg.default_num_ctx);
        n.min(model.context_length).max(1)
    }

    /// Effective `num_batch`: the request's, else Ollama's default 512.
    pub(super) fn effective_num_batch(&self, requested: Option<u32>) -> u32 {
        requested.filter(|n| *n > 0).unwrap_or(DEFAULT_NUM_BATCH)
    }

    /// Gets a reference on a runner for `model` at `num_ctx` and `num_batch`, loading (and
    /// evicting) as needed.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        model: &SimModel,
        num_ctx: u32,
        num_batch: u32,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Acquired, SchedError> {
        let start = tokio::time::Instant::now();
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SchedError::QueueFull);
        }
        let _slot = QueueSlot(&self.queued);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = self.try_take(model, num_ctx, num_batch, keep_alive);
            match step {
                Step::Ready(lease) => {
                    return Ok(Acquired {
                        lease,
                        load_ns: WARM_LOAD_NS,
                    })
                }
                Step::Loading(lease, mut rx) => {
                    let outcome = rx
                        .wait_for(|s| s.is_some())
                        .await
                        .ok()
                        .and_then(|s| s.clone());
                    match outcome {
                        Some(Ok(())) => {
                            let load_ns = if self.cfg.load_latency.is_zero() {
                                WARM_LOAD_NS
                            } else {
                                start.elapsed().as_nanos() as u64
                            };
                            return Ok(Acquired { lease, load_ns });
                        }
                        Some(Err(msg)) => return Err(SchedError::Load(msg)),
                        None => return Err(SchedError::Load("model load was interrupted".into())),
                    }
                }
                Step::Wait => notified.await,
            }
        }
    }

    /// One scheduling attempt under the lock.
    fn try_take(
        self: &Arc<Self>,
        model: &SimModel,
        num_ctx: u32,
        num_batch: u32,
        keep_alive: Option<KeepAlive>,
    ) -> Step {
        let now = self.clock.now();
        let mut st = self.lock();
        st.expire(now);
        let seq = st.next_seq();
        let name = model.name.clone();
        let unload = keep_alive == Some(KeepAlive::For(Duration::ZERO));
        if let Some(r) = st.runners.get_mut(&name) {
            if r.num_ctx == num_ctx && r.num_batch == num_batch {
                r.refs += 1;
                r.idle_since = None;
                r.last_used = seq;
                if let Some(k) = keep_alive {
                    r.keep_alive = k;
                }
                let lease = self.lease(&name, r.id, unload);
                return if r.ready {
                    Step::Ready(lease)
                } else {
                    Step::Loading(lease, r.load_rx.clone())
                };
            }
            // Different runner settings: reload once the runner is idle.
            if r.refs > 0 || !r.ready {
                return Step::Wait;
            }
            st.runners.remove(&name);
        }
        let max = self.cfg.max_loaded_models.max(1);
        while st.runners.len() >= max {
            let victim = st
                .runners
                .iter()
                .filter(|(_, r)| r.ready && r.refs == 0)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(v) => {
                    st.runners.remove(&v);
                }
                None => return Step::Wait,
            }
        }
        let (tx, rx) = watch::channel(None);
        st.runners.insert(
            name.clone(),
            Runner {
                id: seq,
                model: model.clone(),
                num_ctx,
                num_batch,
                ready: false,
                load_rx: rx.clone(),
                refs: 1,
                keep_alive: keep_alive.unwrap_or_else(|| self.default_keep_alive()),
                idle_since: None,
                last_used: seq,
            },
        );
        *st.load_counts.entry(name.clone()).or_default() += 1;
        let failure = relock(&self.fail_load).take();
        let sim = self.clone();
        let lease = self.lease(&name, seq, unload);
        tokio::spawn(async move { sim.run_load(name, seq, failure, tx).await });
        Step::Loading(lease, rx)
    }

    fn lease(self: &Arc<Self>, name: &str, id: u64, unload: bool) -> Lease {
        Lease {
            sim: self.clone(),
            name: name.to_string(),
            id,
            unload,
        }
    }

    /// The load itself: runs on its own task, so a client leaving does not stop it.
    async fn run_load(
        self: Arc<Self>,
        name: String,
        id: u64,
        failure: Option<String>,
        tx: watch::Sender<Option<Result<(), String>>>,
    ) {
        if !self.cfg.load_latency.is_zero() {
            tokio::time::sleep(self.cfg.load_latency).await;
        }
        {
            let now = self.clock.now();
            let mut st = self.lock();
            let same = st.runners.get(&name).is_some_and(|r| r.id == id);
            if same {
                if failure.is_some() {
                    st.runners.remove(&name);
                } else if let Some(r) = st.runners.get_mut(&name) {
                    r.ready = true;
                    if r.refs == 0 {
                        r.idle_since = Some(now);
                    }
                }
            }
        }
        tx.send_replace(Some(match failure {
            Some(msg) => Err(msg),
            None => Ok(()),
        }));
        self.changed.notify_waiters();
    }

    /// Drops one reference; `unload` when the request asked for `keep_alive:0`, which counts
    /// as an unload while busy if other requests still hold the runner.
    fn release(&self, name: &str, id: u64, unload: bool) {
        let now = self.clock.now();
        {
            let mut st = self.lock();
            let seq = st.next_seq();
            if let Some(r) = st.runners.get_mut(name) {
                if r.id == id {
                    r.refs = r.refs.saturating_sub(1);
                    r.last_used = seq;
                    if r.refs == 0 {
                        r.idle_since = Some(now);
                    } else if unload {
                        self.unloads_while_busy.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// `keep_alive:0` without a prompt: the runner goes as soon as it is idle.
    pub(super) fn expire_runner(&self, name: &str) {
        let now = self.clock.now();
        {
            let mut st = self.lock();
            if let Some(r) = st.runners.get_mut(name) {
                r.keep_alive = KeepAlive::For(Duration::ZERO);
                if r.refs == 0 {
                    r.idle_since = Some(now);
                } else {
                    self.unloads_while_busy.fetch_add(1, Ordering::SeqCst);
                }
            }
            st.expire(now);
        }
        self.changed.notify_waiters();
    }

    pub(super) fn lookup(&self, name: &str) -> Option<SimModel> {
        self.lock().lookup(name)
    }
}
