//! Which model instances are loaded: the state behind the mutex, TTL expiry on every lock,
//! JIT loads that concurrent requests share, auto-evict, and the plan/admit/resolve steps
//! that every generation route goes through before it generates.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::config::Overflow;
use super::request::Fail;
use super::LmStudioSim;

/// One loaded model instance.
#[derive(Clone, Debug)]
pub(super) struct Instance {
    /// `key`, or `key:2`, `key:3`... for further instances of the same model.
    pub(super) id: String,
    pub(super) key: String,
    pub(super) context_length: u32,
    /// Loaded just in time (subject to TTL and auto-evict).
    pub(super) jit: bool,
    /// Idle TTL; `None` for manual loads.
    pub(super) ttl: Option<Duration>,
    pub(super) last_used: SystemTime,
    pub(super) opts: LoadOpts,
}

/// Load options of `/api/v1/models/load` that are echoed back in the instance config.
#[derive(Clone, Copy, Debug)]
pub(super) struct LoadOpts {
    pub(super) eval_batch_size: u32,
    pub(super) flash_attention: bool,
    pub(super) offload_kv_cache_to_gpu: bool,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts {
            eval_batch_size: 512,
            flash_attention: true,
            offload_kv_cache_to_gpu: true,
        }
    }
}

/// Outcome of a load: the instance id, or the failure message. `None` while loading.
pub(super) type LoadResult = Option<Result<String, String>>;

/// A JIT load in progress; later requests for the same model wait on it.
pub(super) struct PendingLoad {
    pub(super) context_length: u32,
    pub(super) rx: watch::Receiver<LoadResult>,
}

#[derive(Default)]
pub(super) struct State {
    /// Loaded instances in load order.
    pub(super) instances: Vec<Instance>,
    pub(super) load_counts: HashMap<String, usize>,
    pub(super) pending: HashMap<String, PendingLoad>,
    /// Generations in progress per instance id (entries at zero are removed).
    pub(super) busy: HashMap<String, usize>,
    pub(super) fail_next_load: Option<String>,
    pub(super) fail_stream_after: Option<usize>,
    /// Every SDK message a client sent, as `<namespace> <type> <endpoint>`, in order.
    pub(super) sdk_messages: Vec<String>,
}

impl LmStudioSim {
    /// Locks the state and drops JIT instances whose idle TTL ran out at `clock.now()`.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now();
        st.instances.retain(|i| match i.ttl {
            Some(ttl) => now
                .duration_since(i.last_used)
                .map_or(true, |idle| idle < ttl),
            None => true,
        });
        st
    }

    /// Marks an instance as used now (resets its idle timer).
    pub(super) fn touch(&self, instance_id: &str) {
        let now = self.clock.now();
        if let Some(i) = self
            .lock()
            .instances
            .iter_mut()
            .find(|i| i.id == instance_id)
        {
            i.last_used = now;
        }
    }

    /// Ends a load: registers the instance (evicting the previous JIT model when this is a JIT
    /// load with auto-evict) or reports the failure, in one critical section with the removal
    /// of the pending entry so no request sees the model neither loading nor loaded.
    pub(super) fn finish_load(
        &self,
        key: &str,
        context_length: u32,
        jit_ttl: Option<Duration>,
        opts: LoadOpts,
        failure: Option<String>,
    ) -> Result<String, String> {
        let now = self.clock.now();
        let mut st = self.lock();
        if jit_ttl.is_some() {
            st.pending.remove(key);
        }
        if let Some(msg) = failure {
            return Err(msg);
        }
        if jit_ttl.is_some() && self.cfg.auto_evict {
            st.instances.retain(|i| !i.jit);
        }
        let id = next_instance_id(&st.instances, key);
        st.instances.push(Instance {
            id: id.clone(),
            key: key.to_string(),
            context_length,
            jit: jit_ttl.is_some(),
            ttl: jit_ttl,
            last_used: now,
            opts,
        });
        *st.load_counts.entry(key.to_string()).or_default() += 1;
        Ok(id)
    }

    /// Finds the instance for `model`, or the load to wait for (starting a JIT load when none
    /// is under way). Never waits itself.
    pub(super) fn plan(
        self: &Arc<Self>,
        model: &str,
        ttl: Option<Duration>,
        ctx_req: Option<u32>,
    ) -> Result<Plan, Fail> {
        let now = self.clock.now();
        let mut st = self.lock();
        let found = st
            .instances
            .iter_mut()
            .find(|i| i.id == model)
            .map(|i| (i.id.clone(), i.context_length, &mut i.last_used));
        if let Some((instance, ctx, last_used)) = found {
            *last_used = now;
            return Ok(Plan::Ready { instance, ctx });
        }
        let Some(m) = self.cfg.models.iter().find(|m| m.name == model) else {
            return Err(Fail::ModelNotFound(model.to_string()));
        };
        if let Some(i) = st.instances.iter_mut().find(|i| i.key == model) {
            i.last_used = now;
            return Ok(Plan::Ready {
                instance: i.id.clone(),
                ctx: i.context_length,
            });
        }
        if let Some(p) = st.pending.get(model) {
            return Ok(Plan::Wait {
                instance: model.to_string(),
                ctx: p.context_length,
                rx: p.rx.clone(),
            });
        }
        if !self.cfg.jit {
            return Err(Fail::NotLoaded(model.to_string()));
        }
        let ctx = self.context_for(m, ctx_req);
        let (tx, rx) = watch::channel(None);
        st.pending.insert(
            model.to_string(),
            PendingLoad {
                context_length: ctx,
                rx: rx.clone(),
            },
        );
        let failure = st.fail_next_load.take();
        drop(st);
        // The load runs on its own task so that it completes even if the request that started
        // it goes away; every request for the model waits on the same result.
        let sim = self.clone();
        let key = model.to_string();
        let ttl = ttl.unwrap_or(self.cfg.default_ttl);
        tokio::spawn(async move {
            if !sim.cfg.load_latency.is_zero() {
                tokio::time::sleep(sim.cfg.load_latency).await;
            }
            let r = sim.finish_load(&key, ctx, Some(ttl), LoadOpts::default(), failure);
            let _ = tx.send(Some(r));
        });
        Ok(Plan::Wait {
            instance: model.to_string(),
            ctx,
            rx,
        })
    }

    /// `plan` plus the context check: the plan and the prompt token count to report.
    pub(super) fn admit(
        self: &Arc<Self>,
        model: &str,
        ttl: Option<Duration>,
        ctx_req: Option<u32>,
        prompt_tokens: u32,
    ) -> Result<(Plan, u32), Fail> {
        let plan = self.plan(model, ttl, ctx_req)?;
        let ctx = plan.ctx();
        if prompt_tokens > ctx {
            return match self.cfg.overflow {
                Overflow::Error => Err(Fail::Overflow {
                    prompt: prompt_tokens,
                    ctx,
                }),
                Overflow::Silent => Ok((plan, ctx)),
            };
        }
        Ok((plan, prompt_tokens))
    }

    /// Waits for the plan's load, if any.
    pub(super) async fn resolve(&self, model: &str, plan: Plan) -> Result<Resolved, Fail> {
        match plan {
            Plan::Ready { instance, ctx } => Ok(Resolved {
                instance,
                ctx,
                load_time: None,
            }),
            Plan::Wait { ctx, mut rx, .. } => {
                let outcome = rx.wait_for(|r| r.is_some()).await.map(|r| r.clone());
                match outcome {
                    Ok(Some(Ok(instance))) => Ok(Resolved {
                        instance,
                        ctx,
                        load_time: Some(self.cfg.load_latency),
                    }),
                    Ok(Some(Err(msg))) => Err(Fail::LoadFailed(model.to_string(), msg)),
                    _ => Err(Fail::LoadFailed(
                        model.to_string(),
                        "the load was aborted".to_string(),
                    )),
                }
            }
        }
    }
}

pub(super) fn next_instance_id(instances: &[Instance], key: &str) -> String {
    let taken = |id: &str| instances.iter().any(|i| i.id == id);
    if !taken(key) {
        return key.to_string();
    }
    (2..)
        .map(|n| format!("{key}:{n}"))
        .find(|id| !taken(id))
        .unwrap_or_else(|| key.to_string())
}

pub(super) enum Plan {
    Ready {
        instance: String,
        ctx: u32,
    },
    Wait {
        /// The id the instance will get (the key: a JIT load only happens when none is loaded).
        instance: String,
        ctx: u32,
        rx: watch::Receiver<LoadResult>,
    },
}

impl Plan {
    pub(super) fn ctx(&self) -> u32 {
        match self {
            Plan::Ready { ctx, .. } | Plan::Wait { ctx, .. } => *ctx,
        }
    }

    pub(super) fn instance(&self) -> &str {
        match self {
            Plan::Ready { instance, .. } | Plan::Wait { instance, .. } => instance,
        }
    }
}

pub(super) struct Resolved {
    pub(super) instance: String,
    pub(super) ctx: u32,
    /// `Some` when the request had to wait for a load.
    pub(super) load_time: Option<Duration>,
}
