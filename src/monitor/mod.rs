//! System resources: RAM, CPU and GPU memory, sampled in the background, and the memory
//! pressure level they add up to (docs/design.md: SystemResources, MemoryPressureConfig).
//!
//! One task ([`spawn`]) owns a [`ResourceProbe`] and samples it at once, then every
//! interval. Each sample becomes a [`Snapshot`] published on a `watch` channel; readers hold
//! a [`MonitorHandle`] and see only the latest one (a slow reader skips samples, it never
//! queues them). The monitor does not act on pressure: it reports it, and whoever decides
//! (the lifecycle actor, `/status`) reads the level.
//!
//! ```text
//!   spawn ─► loop ──tick (at once, then every interval)──► spawn_blocking(probe.sample())
//!             ▲                                                    │ Sample
//!             │   level, peak                                      ▼
//!             └──────────── pressure_of + classify(level so far) ──► Snapshot
//!                                                                    │ watch::Sender
//!                             MonitorHandle::latest / subscribe ◄────┘
//! ```
//!
//! Invariants:
//! - **only the loop writes** the level and the peak, so hysteresis needs no lock: the level
//!   a sample is classified against is the one the previous sample left;
//! - **the probe never runs on an I/O thread**: NVML calls reach the driver and may stall,
//!   so the boxed probe moves into `spawn_blocking` for each sample and back out after;
//! - **a level change is logged once**, when the loop commits it (info for `normal` and
//!   `warning`, warn for `critical`); [`classify`] itself is pure.

pub mod pressure;
pub mod probe;
mod probe_memory;
pub mod respond;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

pub use pressure::{classify, pressure_of, Level, Thresholds};
pub use probe::{GpuMemory, ResourceProbe, Sample, SystemProbe};
pub use probe_memory::{MemoryProbe, MemoryReading, SystemMemory};

const MIB: u64 = 1 << 20;

/// The shortest interval [`spawn`] uses. `tokio::time::interval` panics on zero, and
/// sysinfo's CPU usage needs about 200 ms between reads to mean anything.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// What `/status` shows under `system`: one sample, with the pressure level it led to.
///
/// Until the first sample lands (one probe call after [`spawn`]), a handle reads
/// `Snapshot::default()`: zeros, `normal`, and an empty `sampled_at`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Installed RAM (MiB).
    pub total_memory_mb: u64,
    /// What loaded models hold (MiB), as the lifecycle knows it. The monitor cannot see
    /// this and sets 0; whoever shows the snapshot fills it in.
    pub allocated_memory_mb: u64,
    /// RAM in use (MiB): total − available, page cache not counted.
    pub used_memory_mb: u64,
    /// The highest `used_memory_mb` seen since the monitor started.
    pub peak_memory_mb: u64,
    /// Logical CPUs.
    pub available_cores: usize,
    /// Percent of all cores busy since the previous sample (0..100, one decimal).
    #[serde(serialize_with = "one_decimal")]
    pub cpu_usage: f32,
    /// One entry per GPU; absent from JSON on a machine without NVML.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpu_memory: Vec<GpuMemory>,
    /// 0..1, the worse of RAM and every GPU ([`pressure_of`]), rounded to 3 decimals.
    pub memory_pressure: f64,
    /// The level after hysteresis ([`classify`]), from the unrounded pressure.
    pub pressure_level: Level,
    /// When the sample was taken (RFC 3339, UTC, milliseconds).
    pub sampled_at: String,
}

/// Handle: cheap to clone; `latest()` returns the current snapshot; `subscribe()` a `watch::Receiver<Snapshot>`.
///
/// A clone is one `Arc` increment (it is a `watch::Receiver`). Handles outlive the loop:
/// after it stops, `latest()` keeps returning the last snapshot, and receivers'
/// `changed()` returns an error, which is how a subscriber learns the monitor is gone.
#[derive(Clone, Debug)]
pub struct MonitorHandle {
    rx: watch::Receiver<Snapshot>,
    /// The thresholds the next sample is classified with (a config reload changes them).
    thresholds: std::sync::Arc<watch::Sender<Thresholds>>,
}

impl MonitorHandle {
    /// The most recent snapshot (a clone; the channel's read lock is held only for it).
    pub fn latest(&self) -> Snapshot {
        self.rx.borrow().clone()
    }

    /// Classifies samples with `t` from the next one on (a config reload).
    pub fn set_thresholds(&self, t: Thresholds) {
        self.thresholds.send_replace(t);
    }

    /// The latest pressure level (no clone of the snapshot).
    pub fn level(&self) -> Level {
        self.rx.borrow().pressure_level
    }

    /// A receiver whose `changed()` wakes on the next sample after this call (the current
    /// snapshot counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        let mut rx = self.rx.clone();
        rx.borrow_and_update();
        rx
    }
}

/// Spawns the sampling loop: samples at once, then every `interval` until `stop` turns true.
/// Hysteresis is applied across samples; the level changes are logged once each (info for
/// normal/warning, warn for critical).
///
/// Dropping `stop`'s sender stops the loop too. `interval` is raised to [`MIN_INTERVAL`].
/// A sample that takes longer than `interval` delays the next tick instead of bunching
/// ticks up. If the probe panics, the loop logs it and ends, and handles keep the last
/// snapshot (its `sampled_at` shows how old it is). Must be called inside a Tokio runtime.
pub fn spawn(
    probe: Box<dyn ResourceProbe>,
    interval: Duration,
    thresholds: Thresholds,
    stop: watch::Receiver<bool>,
) -> (MonitorHandle, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Snapshot::default());
    let (thresholds_tx, thresholds_rx) = watch::channel(thresholds);
    let task = tokio::spawn(run(
        probe,
        interval.max(MIN_INTERVAL),
        Tracker::new(thresholds),
        thresholds_rx,
        stop,
        tx,
    ));
    (
        MonitorHandle {
            rx,
            thresholds: std::sync::Arc::new(thresholds_tx),
        },
        task,
    )
}

/// The loop: a tick or `stop`, then a sample or `stop`, then publish.
async fn run(
    mut probe: Box<dyn ResourceProbe>,
    interval: Duration,
    mut tracker: Tracker,
    thresholds: watch::Receiver<Thresholds>,
    mut stop: watch::Receiver<bool>,
    tx: watch::Sender<Snapshot>,
) {
    // The first tick of `interval` fires at once: that is the sample at start.
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = ticks.tick() => {}
        }
        let sampling = tokio::task::spawn_blocking(move || {
            let sample = probe.sample();
            (probe, sample)
        });
        // `stop` is watched during the sample too, so a driver call that hangs cannot hold
        // up shutdown; the blocking thread then finishes on its own.
        let sample = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            done = sampling => match done {
                Ok((back, sample)) => {
                    probe = back;
                    sample
                }
                Err(e) => {
                    tracing::error!(error = %e, "resource probe failed; memory monitoring stops");
                    break;
                }
            },
        };
        let from = tracker.level;
        tracker.thresholds = *thresholds.borrow();
        let snapshot = tracker.observe(&sample, SystemTime::now());
        log_level_change(from, &snapshot);
        tx.send_replace(snapshot);
    }
}

/// What the loop carries from one sample to the next.
struct Tracker {
    thresholds: Thresholds,
    /// The level the last sample left; the next one is classified against it.
    level: Level,
    peak_mb: u64,
}

impl Tracker {
    fn new(thresholds: Thresholds) -> Self {
        Tracker {
            thresholds,
            level: Level::Normal,
            peak_mb: 0,
        }
    }

    /// Turns a sample into a snapshot, moving the level and the peak on.
    fn observe(&mut self, s: &Sample, at: SystemTime) -> Snapshot {
        let pressure = pressure_of(s);
        self.level = classify(self.level, pressure, self.thresholds);
        let used_mb = s.total_memory.saturating_sub(s.available_memory) / MIB;
        self.peak_mb = self.peak_mb.max(used_mb);
        Snapshot {
            total_memory_mb: s.total_memory / MIB,
            allocated_memory_mb: 0,
            used_memory_mb: used_mb,
            peak_memory_mb: self.peak_mb,
            available_cores: s.cores,
            cpu_usage: (s.cpu_usage * 10.0).round() / 10.0,
            gpu_memory: s.gpus.clone(),
            memory_pressure: (pressure * 1000.0).round() / 1000.0,
            pressure_level: self.level,
            sampled_at: humantime::format_rfc3339_millis(at).to_string(),
        }
    }
}

/// Writes an `f32` as the `f64` nearest its one-decimal value: `12.3f32` widened as is
/// would read `12.300000190734863` wherever the snapshot passes through
/// `serde_json::Value` (which keeps every number as `f64`).
fn one_decimal<S: serde::Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((f64::from(*x) * 10.0).round() / 10.0)
}

fn log_level_change(from: Level, now: &Snapshot) {
    let to = now.pressure_level;
    if to == from {
        return;
    }
    let (pressure, used_mb, total_mb) =
        (now.memory_pressure, now.used_memory_mb, now.total_memory_mb);
    if to == Level::Critical {
        tracing::warn!(%from, %to, pressure, used_mb, total_mb, "memory pressure level changed");
    } else {
        tracing::info!(%from, %to, pressure, used_mb, total_mb, "memory pressure level changed");
    }
}

// === admission reads the monitor ===

/// The lifecycle's memory admission reads the monitor's latest sample: RAM, plus GPU memory
/// where NVML sees GPUs (Ollama spreads a model over VRAM and RAM, so both count). `None`
/// until the first sample.
impl MemoryProbe for MonitorHandle {
    fn read(&self) -> Option<MemoryReading> {
        let s = self.latest();
        if s.total_memory_mb == 0 {
            return None;
        }
        const MIB: u64 = 1 << 20;
        let gpu_total: u64 = s.gpu_memory.iter().map(|g| g.total_mb).sum();
        let gpu_free: u64 = s.gpu_memory.iter().map(|g| g.free_mb).sum();
        Some(MemoryReading {
            total: (s.total_memory_mb + gpu_total) * MIB,
            available: (s.total_memory_mb.saturating_sub(s.used_memory_mb) + gpu_free) * MIB,
        })
    }
}
