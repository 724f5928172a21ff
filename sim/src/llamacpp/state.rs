//! The model table: one entry per model (router: the models directory; single mode: the one
//! model), each with the running instance if any. An instance is what a child `llama-server`
//! is in router mode: its phase (loading, loaded, gone), its slots and its counters.
//!
//! Loads run on their own task and report through the instance's `phase` watch, so every
//! request for a loading model waits on the same load. Unloads and `--models-max` evictions
//! take effect at once and flip the phase to `Gone`, which fails whatever the instance was
//! doing (llama.cpp issue 21678: the router evicts even a busy child).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::wire::Fail;
use super::LlamaCppSim;
use crate::SimModel;

/// Where an instance is in its life. Only forward moves: `Loading` → `Loaded` → `Gone`, or
/// `Loading` → `Gone`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Loading,
    Loaded,
    /// Unloaded, evicted, or (`failed`) the load failed.
    Gone {
        failed: bool,
    },
}

/// One slot of an instance: what its KV cache holds, for prompt-cache reuse and slot saves.
#[derive(Clone, Debug, Default)]
pub(super) struct Slot {
    pub(super) busy: bool,
    pub(super) id_task: i64,
    /// Token ids in the slot's cache (prompt and reply of its last request).
    pub(super) tokens: Vec<u32>,
    /// Prompt tokens of its last request, and how many of them came from the cache.
    pub(super) n_prompt: u32,
    pub(super) n_cached: u32,
}

/// A running model: a child process in router mode, the server itself in single mode.
pub(super) struct Instance {
    pub(super) model: SimModel,
    /// Per-slot context: `n_ctx` capped at the trained context length.
    pub(super) n_ctx: u32,
    pub(super) phase: watch::Sender<Phase>,
    free_slots: Arc<Semaphore>,
    pub(super) slots: Mutex<Vec<Slot>>,
    /// Requests routed to this instance and not finished (waiting for a slot or generating).
    pub(super) in_flight: AtomicUsize,
    /// Requests holding a slot (`llamacpp:requests_processing`).
    pub(super) processing: AtomicUsize,
    /// Requests waiting for a slot (`llamacpp:requests_deferred`).
    pub(super) deferred: AtomicUsize,
    pub(super) prompt_tokens_total: AtomicU64,
    pub(super) prompt_tokens_cached_total: AtomicU64,
    pub(super) predicted_tokens_total: AtomicU64,
    pub(super) decode_total: AtomicU64,
    pub(super) n_tokens_max: AtomicU64,
}

impl Instance {
    fn new(model: SimModel, n_ctx: u32, parallel: u32) -> Self {
        let parallel = parallel.max(1) as usize;
        Instance {
            n_ctx: n_ctx.min(model.context_length).max(1),
            model,
            phase: watch::channel(Phase::Loading).0,
            free_slots: Arc::new(Semaphore::new(parallel)),
            slots: Mutex::new(vec![
                Slot {
                    id_task: -1,
                    ..Slot::default()
                };
                parallel
            ]),
            in_flight: AtomicUsize::new(0),
            processing: AtomicUsize::new(0),
            deferred: AtomicUsize::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            prompt_tokens_cached_total: AtomicU64::new(0),
            predicted_tokens_total: AtomicU64::new(0),
            decode_total: AtomicU64::new(0),
            n_tokens_max: AtomicU64::new(0),
        }
    }

    pub(super) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(super) fn lock_slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the load is over; the phase it ended in.
    pub(super) async fn loaded(&self) -> Phase {
        let mut rx = self.phase.subscribe();
        let phase = rx
            .wait_for(|p| *p != Phase::Loading)
            .await
            .map(|p| *p)
            .unwrap_or(Phase::Gone { failed: true });
        phase
    }

    /// Completes when the instance is unloaded or evicted.
    pub(super) async fn gone(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| matches!(p, Phase::Gone { .. })).await;
    }
}

/// One model of the catalogue and its running instance.
pub(super) struct Entry {
    pub(super) model: SimModel,
    pub(super) instance: Option<Arc<Instance>>,
    /// Exit code of the last child: 1 after a failed load (`failed:true` in `/models`).
    pub(super) exit_code: i32,
    /// LRU stamp, from `State::tick`; set when a load starts and on every routed POST.
    pub(super) last_used: u64,
    pub(super) port: u16,
    pub(super) load_count: usize,
    pub(super) unload_count: usize,
}

impl Entry {
    pub(super) fn status(&self) -> &'static str {
        match self.instance.as_ref().map(|i| i.phase()) {
            Some(Phase::Loading) => "loading",
            Some(Phase::Loaded) => "loaded",
            _ => "unloaded",
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) entries: BTreeMap<String, Entry>,
    pub(super) tick: u64,
    pub(super) next_port: u16,
    pub(super) next_task: i64,
    pub(super) fail_next_load: Option<String>,
    /// `--slot-save-path` files: filename → the saved slot's tokens.
    pub(super) saved: BTreeMap<String, Vec<u32>>,
    pub(super) restores: usize,
    /// Pieces seen by `/tokenize` and generation, so `/detokenize` can invert ids.
    pub(super) vocab: HashMap<u32, String>,
}

impl State {
    pub(super) fn task_id(&mut self) -> i64 {
        self.next_task += 1;
        self.next_task
    }
}

impl LlamaCppSim {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts loading `name` (an existing entry with no instance): evicts the least recently
    /// used running model first when `--models-max` is reached, busy or not.
    pub(super) fn start_load(self: &Arc<Self>, st: &mut State, name: &str) -> Arc<Instance> {
        if self.cfg.models_max > 0 {
            let running: Vec<(u64, String)> = st
                .entries
                .iter()
                .filter(|(_, e)| e.instance.is_some())
                .map(|(n, e)| (e.last_used, n.clone()))
                .collect();
            if running.len() >= self.cfg.models_max {
                if let Some((_, lru)) = running.into_iter().min() {
                    self.unload_entry(st, &lru);
                }
            }
        }
        st.tick += 1;
        st.next_port = st.next_port.wrapping_add(1);
        let (tick, port) = (st.tick, 39000 + st.next_port % 20000);
        let failure = st.fail_next_load.take();
        let Some(entry) = st.entries.get_mut(name) else {
            // Callers check the name first; an instance nobody can reach is harmless.
            return Arc::new(Instance::new(
                SimModel::chat(name, 0, 1),
                1,
                self.cfg.parallel,
            ));
        };
        let inst = Arc::new(Instance::new(
            entry.model.clone(),
            self.cfg.n_ctx,
            self.cfg.parallel,
        ));
        entry.instance = Some(inst.clone());
        entry.exit_code = 0;
        entry.last_used = tick;
        entry.port = port;
        let sim = self.clone();
        let (key, loading) = (name.to_string(), inst.clone());
        tokio::spawn(async move {
            if !sim.cfg.load_latency.is_zero() {
                tokio::time::sleep(sim.cfg.load_latency).await;
            }
            sim.finish_load(&key, &loading, failure);
        });
        inst
    }

    /// Ends a load, unless the instance was unloaded meanwhile.
    fn finish_load(&self, name: &str, inst: &Arc<Instance>, failure: Option<String>) {
        let mut st = self.lock();
        let Some(entry) = st.entries.get_mut(name) else {
            return;
        };
        let current = entry
            .instance
            .as_ref()
            .is_some_and(|i| Arc::ptr_eq(i, inst));
        if !current || inst.phase() != Phase::Loading {
            return;
        }
        match failure {
            Some(message) => {
                tracing::debug!(model = name, %message, "simulated load failure");
                entry.instance = None;
                entry.exit_code = 1;
                inst.phase.send_replace(Phase::Gone { failed: true });
            }
            None => {
                entry.load_count += 1;
                inst.phase.send_replace(Phase::Loaded);
            }
        }
    }

    /// Stops the running instance of `name` at once (unload or eviction). Whatever it was
    /// doing fails; that is counted in `unloads_while_busy`.
    pub(super) fn unload_entry(&self, st: &mut State, name: &str) {
        let Some(entry) = st.entries.get_mut(name) else {
            return;
        };
        let Some(inst) = entry.instance.take() else {
            return;
        };
        entry.unload_count += 1;
        if inst.in_flight.load(Ordering::SeqCst) > 0 {
            self.unloads_while_busy.fetch_add(1, Ordering::SeqCst);
        }
        inst.phase.send_replace(Phase::Gone { failed: false });
    }

    /// The instance a request goes to. Router: `name` is the body's `model` (POST) or
    /// `?model=` (GET); with `autoload` a model that is not running is loaded and waited for;
    /// `touch` (POST only) marks it used for LRU. Single mode: the one model, once loaded.
    pub(super) async fn route(
        self: &Arc<Self>,
        name: Option<&str>,
        autoload: bool,
        touch: bool,
    ) -> Result<Arc<Instance>, Fail> {
        if !self.cfg.router {
            let inst = self
                .lock()
                .entries
                .values()
                .find_map(|e| e.instance.clone());
            return match inst.map(|i| (i.phase(), i)) {
                Some((Phase::Loaded, i)) => Ok(i),
                Some((Phase::Loading, _)) => Err(Fail::unavailable("Loading model")),
                _ => Err(Fail::server("model is not loaded")),
            };
        }
        let name = match name {
            Some(n) if !n.is_empty() => n,
            _ => return Err(Fail::invalid("model name is missing from the request")),
        };
        let inst = {
            let mut st = self.lock();
            let Some(entry) = st.entries.get(name) else {
                return Err(Fail::invalid(format!("model '{name}' not found")));
            };
            match entry.instance.clone() {
                Some(i) => i,
                None if autoload => self.start_load(&mut st, name),
                None => return Err(Fail::invalid("model is not loaded")),
            }
        };
        match inst.loaded().await {
            Phase::Loaded => {}
            Phase::Gone { failed: true } => {
                return Err(Fail::server(format!("model name={name} failed to load")))
            }
            _ => return Err(Fail::invalid(format!("model name={name} is not running"))),
        }
        if touch {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            if let Some(e) = st.entries.get_mut(name) {
                e.last_used = tick;
            }
        }
        Ok(inst)
    }

    /// Waits for a free slot of `inst` (the one whose cache shares the longest prefix with
    /// `prompt`, as llama-server picks by prompt similarity). Fails if the instance goes away.
    pub(super) async fn admit(
        self: &Arc<Self>,
        inst: Arc<Instance>,
        prompt: &[u32],
    ) -> Result<Lease, Fail> {
        let busy = Busy::new(inst.clone());
        inst.deferred.fetch_add(1, Ordering::SeqCst);
        let sem = inst.free_slots.clone();
        let permit = tokio::select! {
            p = sem.acquire_owned() => p.ok(),
            _ = inst.gone() => None,
        };
        inst.deferred.fetch_sub(1, Ordering::SeqCst);
        let Some(permit) = permit else {
            return Err(killed());
        };
        if inst.phase() != Phase::Loaded {
            return Err(killed());
        }
        let id_task = self.lock().task_id();
        let (slot, cached) = {
            let mut slots = inst.lock_slots();
            let best = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.busy)
                .map(|(i, s)| (common_prefix(&s.tokens, prompt), i))
                .max_by_key(|(n, i)| (*n, std::cmp::Reverse(*i)));
            let (cached, slot) = best.unwrap_or((0, 0));
            if let Some(s) = slots.get_mut(slot) {
                s.busy = true;
                s.id_task = id_task;
            }
            (slot, cached)
        };
        inst.processing.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(Lease {
            sim: self.clone(),
            inst,
            slot,
            // At least one prompt token is always evaluated.
            cached: cached.min(prompt.len().saturating_sub(1)) as u32,
            _permit: permit,
            _busy: busy,
        })
    }
}

/// The error of a request whose instance was unloaded or evicted under it. In the real
/// router the child is gone and the proxied connection fails; the wording is the simulator's.
pub(super) fn killed() -> Fail {
    Fail::server("the model instance was unloaded while processing the request")
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Counts a request as in flight on its instance from routing to the end.
pub(super) struct Busy(Arc<Instance>);

impl Busy {
    fn new(inst: Arc<Instance>) -> Self {
        inst.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(inst)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A slot held by one request; dropping it frees the slot.
pub(super) struct Lease {
    sim: Arc<LlamaCppSim>,
    pub(super) inst: Arc<Instance>,
    pub(super) slot: usize,
    /// Prompt tokens reused from the slot's cache (`timings.cache_n`).
    pub(super) cached: u32,
    _permit: OwnedSemaphorePermit,
    _busy: Busy,
}

impl Lease {
    /// Records what the slot's cache now holds and the instance's counters.
    pub(super) fn finish(&self, prompt: &[u32], reply: &[u32]) {
        let evaluated = prompt.len() as u64 - u64::from(self.cached).min(prompt.len() as u64);
        self.inst
            .prompt_tokens_total
            .fetch_add(evaluated, Ordering::SeqCst);
        self.inst
            .prompt_tokens_cached_total
            .fetch_add(u64::from(self.cached), Ordering::SeqCst);
        self.inst
            .predicted_tokens_total
            .fetch_add(reply.len() as u64, Ordering::SeqCst);
        self.inst
            .decode_total
            .fetch_add(reply.len() as u64 + 1, Ordering::SeqCst);
        let n = (prompt.len() + reply.len()) as u64;
        self.inst.n_tokens_max.fetch_max(n, Ordering::SeqCst);
        if let Some(s) = self.inst.lock_slots().get_mut(self.slot) {
            s.tokens = prompt.iter().chain(reply).copied().collect();
            s.n_prompt = prompt.len() as u32;
            s.n_cached = self.cached;
        }
    }

    /// Sleeps `d`, unless the instance goes away first (then false).
    pub(super) async fn sleep(&self, d: std::time::Duration) -> bool {
        if self.inst.phase() != Phase::Loaded {
            return false;
        }
        if d.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => self.inst.phase() == Phase::Loaded,
            _ = self.inst.gone() => false,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inst.processing.fetch_sub(1, Ordering::SeqCst);
        self.sim.active.fetch_sub(1, Ordering::SeqCst);
        if let Some(s) = self.inst.lock_slots().get_mut(self.slot) {
            s.busy = false;
        }
    }
}
