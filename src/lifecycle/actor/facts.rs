//! What the actor derives from its table and settings: timeouts, sizes, retry hints,
//! wake-ups, and the views `/status` shows.

use std::time::Duration;

use tokio::time::Instant;

use super::{Actor, Model, MIB};
use crate::config::QueuePolicy;
use crate::lifecycle::policy::RefuseReason;
use crate::lifecycle::{IdleHint, LifecycleError, ModelStatus, ModelView};

impl Actor {
    pub(super) fn pinned(&self, name: &str) -> bool {
        self.settings.models.get(name).is_some_and(|o| o.pinned)
    }

    /// The idle timeout that applies to `m` now; `None` = never unloads when idle.
    pub(super) fn idle_timeout(&self, m: &Model) -> Option<Duration> {
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

    pub(super) fn idle_timeout_of(&self, name: &str) -> Option<Duration> {
        self.models.get(name).and_then(|m| self.idle_timeout(m))
    }

    /// Bytes the model takes loaded: the config's `memory`, else what the provider reports
    /// for it loaded, else its size on disk.
    pub(super) fn size_of(&self, m: &Model) -> Option<u64> {
        self.settings
            .models
            .get(&*m.name)
            .and_then(|o| o.memory)
            .or_else(|| m.reported.as_ref().and_then(|r| r.size_bytes))
            .or_else(|| self.catalog.get(&*m.name).copied())
    }

    /// What to suggest in `Retry-After`: about one load of the model, at least a second.
    pub(super) fn retry_after(&self, name: &str) -> Duration {
        let load = self
            .models
            .get(name)
            .and_then(|m| m.load_time)
            .unwrap_or(Duration::ZERO);
        Duration::from_secs(load.as_secs_f64().ceil().clamp(1.0, 60.0) as u64)
    }

    pub(super) fn refusal(&self, name: &str, reason: RefuseReason) -> LifecycleError {
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
    pub(super) fn next_wake(&self) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut earlier = |t: Instant| {
            if wake.is_none_or(|w| t < w) {
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
            if m.status != ModelStatus::Ready || m.active > 0 {
                continue;
            }
            let Some(t) = self.idle_timeout(m) else {
                continue;
            };
            match m.idle_from() {
                Some(since) => earlier(since + t),
                // Busy through the gate, which tells nobody when it drains: look again one
                // timeout from now (the deadline then counts from the last release).
                None => earlier(Instant::now() + t),
            }
        }
        wake
    }

    pub(super) fn view(&self, m: &Model) -> ModelView {
        let now = Instant::now();
        let timeout = self.idle_timeout(m);
        let unloads_in = match (m.status, m.leases(), m.idle_from(), timeout) {
            (ModelStatus::Ready, 0, Some(since), Some(t)) => {
                Some((since + t).saturating_duration_since(now).as_secs_f64())
            }
            _ => None,
        };
        ModelView {
            model: m.name.to_string(),
            status: m.status,
            platform: self.settings.kind.as_str(),
            leases: m.leases(),
            queue_depth: m.queued,
            load_time_ms: m.load_time.map(|d| d.as_millis() as u64),
            context_length: m.context_length,
            loads: m.loads,
            unloads: m.unloads,
            memory_estimate_mb: self.size_of(m).map(|b| b.div_ceil(MIB)),
            inactivity_timeout_s: timeout.map(|t| t.as_secs_f64()),
            pinned: self.pinned(&m.name),
            last_used: m.used(),
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
    pub(super) fn unknown_view(&self, model: &str) -> ModelView {
        ModelView {
            model: model.to_string(),
            status: ModelStatus::Unloaded,
            platform: self.settings.kind.as_str(),
            leases: 0,
            queue_depth: 0,
            load_time_ms: None,
            context_length: None,
            loads: 0,
            unloads: 0,
            memory_estimate_mb: self.catalog.get(model).map(|b| b.div_ceil(MIB)),
            inactivity_timeout_s: None,
            pinned: self.pinned(model),
            last_used: 0,
            unloads_in_s: None,
            loaded_by: None,
            last_error: None,
        }
    }
}
