//! The staged response to memory pressure (docs/design.md: optimizeMemory): follows the monitor's
//! level and acts, within the bound `memory_pressure.action` sets.
//!
//! | stage | when | what |
//! |---|---|---|
//! | 1 compress | warning or worse | conversations are compacted at `PRESSURE_FACTOR` × the usual threshold |
//! | 2 unload | critical | each provider unloads its least recently used idle model, once per sample |
//! | 3 cache | critical at the next sample too | every idle unpinned model is unloaded (summaries and counters stay with the proxy, the summaries on disk) |
//!
//! `action = compress` allows stage 1 only, `unload` stages 1–2, `cache` all three. Pinned
//! models and models with requests in flight or waiting are never unloaded (the lifecycle
//! actor enforces it). The decision is [`plan`], pure; [`run`] carries it out and records
//! each action once.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;

use super::pressure::Level;
use super::Snapshot;
use crate::config::PressureAction;

/// How many pressure events `/status` keeps.
pub const KEPT: usize = 100;

/// One step of the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    CompressOn,
    CompressOff,
    /// Unload the least recently used idle model of each provider.
    UnloadLru,
    /// Unload every idle unpinned model.
    UnloadAllIdle,
}

/// What to do on a new sample at `level`, given the previous level, how many samples in a
/// row were critical before this one, and the configured bound.
pub fn plan(
    previous: Level,
    critical_streak: u32,
    level: Level,
    bound: PressureAction,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let pressed = |l: Level| l >= Level::Warning;
    if pressed(level) && !pressed(previous) {
        steps.push(Step::CompressOn);
    }
    if !pressed(level) && pressed(previous) {
        steps.push(Step::CompressOff);
    }
    if level == Level::Critical {
        match bound {
            PressureAction::Compress => {}
            PressureAction::Unload => steps.push(Step::UnloadLru),
            PressureAction::Cache => steps.push(if critical_streak == 0 {
                Step::UnloadLru
            } else {
                Step::UnloadAllIdle
            }),
        }
    }
    steps
}

/// One thing the response did.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PressureEvent {
    /// RFC 3339.
    pub at: String,
    pub level: Level,
    /// `compress on`, `compress off`, `unload`, `cache`.
    pub action: &'static str,
    /// Models whose unload it started (`provider/model`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    pub memory_pressure: f64,
    pub used_memory_mb: u64,
}

/// Recent pressure events, oldest first.
pub type PressureLog = crate::recent::Recent<PressureEvent>;

/// What the response acts on: the proxy's state, seen only as these actions (`state`
/// implements them).
pub trait Actions: Send + Sync {
    /// Stage 1: compact conversations earlier, or stop doing so.
    fn compact_earlier(&self, on: bool);
    /// Stages 2 and 3: each provider unloads its least recently used idle model (`all`:
    /// every idle unpinned one); the `provider/model` names whose unload started.
    fn shed(&self, all: bool) -> BoxFuture<'_, Vec<String>>;
    /// Stage 3: keep what the proxy learned on disk (the token ratios).
    fn save_state(&self);
    /// Counts and keeps what the response did (`/metrics`, `/status`).
    fn record(&self, event: PressureEvent);
}

/// Follows the monitor until `stop`, acting on each sample within `bound`.
pub async fn run(
    actions: Arc<dyn Actions>,
    bound: PressureAction,
    mut samples: watch::Receiver<Snapshot>,
    mut stop: watch::Receiver<bool>,
) {
    let mut previous = Level::Normal;
    let mut streak = 0u32;
    loop {
        let snap = samples.borrow_and_update().clone();
        let level = snap.pressure_level;
        for step in plan(previous, streak, level, bound) {
            act(&*actions, step, &snap).await;
        }
        streak = if level == Level::Critical {
            streak + 1
        } else {
            0
        };
        previous = level;
        tokio::select! {
            changed = samples.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

async fn act(actions: &dyn Actions, step: Step, snap: &Snapshot) {
    let (action, models) = match step {
        Step::CompressOn => {
            actions.compact_earlier(true);
            ("compress on", Vec::new())
        }
        Step::CompressOff => {
            actions.compact_earlier(false);
            ("compress off", Vec::new())
        }
        Step::UnloadLru | Step::UnloadAllIdle => {
            let all = step == Step::UnloadAllIdle;
            let models = actions.shed(all).await;
            if all {
                // Stage 3 keeps the proxy's own state on disk: summaries already are; the
                // learned token ratios are saved now.
                actions.save_state();
            }
            if models.is_empty() {
                // Nothing idle to unload: nothing to record (it would repeat every sample).
                return;
            }
            (if all { "cache" } else { "unload" }, models)
        }
    };
    tracing::warn!(
        level = %snap.pressure_level,
        action,
        models = %models.join(", "),
        memory_pressure = snap.memory_pressure,
        "memory pressure response"
    );
    actions.record(PressureEvent {
        at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        level: snap.pressure_level,
        action,
        models,
        memory_pressure: snap.memory_pressure,
        used_memory_mb: snap.used_memory_mb,
    });
}

#[cfg(test)]
mod tests {
    use super::Level::*;
    use super::Step::*;
    use super::*;
    use crate::config::PressureAction::{Cache, Compress, Unload};

    /// (what, previous level, critical streak, level, bound, steps)
    type Case = (&'static str, Level, u32, Level, PressureAction, Vec<Step>);

    #[test]
    fn stages_follow_the_level_within_the_bound() {
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("calm stays calm", Normal, 0, Normal, Cache, vec![]),
            ("warning compresses", Normal, 0, Warning, Cache, vec![CompressOn]),
            ("still warning: nothing new", Warning, 0, Warning, Cache, vec![]),
            ("critical at once: compress, then unload one", Normal, 0, Critical, Cache, vec![CompressOn, UnloadLru]),
            ("warning to critical: unload one", Warning, 0, Critical, Cache, vec![UnloadLru]),
            ("still critical: cache (all idle)", Critical, 1, Critical, Cache, vec![UnloadAllIdle]),
            ("bound unload: one more per sample, never all", Critical, 3, Critical, Unload, vec![UnloadLru]),
            ("bound compress: never unload", Normal, 0, Critical, Compress, vec![CompressOn]),
            ("bound compress, still critical", Critical, 5, Critical, Compress, vec![]),
            ("back to warning: keep compressing", Critical, 2, Warning, Cache, vec![]),
            ("back to normal: stop compressing", Warning, 0, Normal, Cache, vec![CompressOff]),
            ("critical to normal", Critical, 1, Normal, Cache, vec![CompressOff]),
        ];
        for (what, prev, streak, level, bound, want) in table {
            assert_eq!(plan(prev, streak, level, bound), want, "{what}");
        }
    }
}
