//! The sampling loop against scripted probes, on paused time.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use tokio::time::Instant;

use super::probe::ScriptedProbe;
use super::*;

const INTERVAL: Duration = Duration::from_secs(5);
const TOTAL_MB: u64 = 10_000;

/// GPUs as (total MiB, free MiB).
type Gpus = &'static [(u64, u64)];

/// A machine with 10 000 MiB of RAM, `used_mb` of it in use, and the given GPUs as
/// (total MiB, free MiB).
fn sample(used_mb: u64, gpus: &[(u64, u64)]) -> Sample {
    Sample {
        total_memory: TOTAL_MB * MIB,
        available_memory: (TOTAL_MB - used_mb) * MIB,
        cpu_usage: 12.34,
        cores: 8,
        gpus: gpus
            .iter()
            .enumerate()
            .map(|(i, &(total_mb, free_mb))| GpuMemory {
                index: i as u32,
                name: "NVIDIA Test".into(),
                total_mb,
                used_mb: total_mb - free_mb,
                free_mb,
            })
            .collect(),
    }
}

/// Starts the monitor on `probe` with docs/design.md: thresholds (0.7 / 0.9, band 0.05).
fn start(probe: ScriptedProbe) -> (MonitorHandle, JoinHandle<()>, watch::Sender<bool>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, task) = spawn(Box::new(probe), INTERVAL, Thresholds::default(), stop_rx);
    (handle, task, stop_tx)
}

#[tokio::test(start_paused = true)]
async fn publishes_at_once_then_every_interval_with_hysteresis_and_peak() {
    // (RAM used MiB, GPUs, level, pressure, peak MiB): one row per sample, in order
    let script: [(u64, Gpus, Level, f64, u64); 9] = [
        (5000, &[], Level::Normal, 0.5, 5000),
        (7000, &[], Level::Warning, 0.7, 7000),
        // inside warning's band (0.65..0.7): held
        (6600, &[], Level::Warning, 0.66, 7000),
        (9200, &[], Level::Critical, 0.92, 9200),
        // inside critical's band (0.85..0.9): held
        (8600, &[], Level::Critical, 0.86, 9200),
        // out of critical's band, not of warning's
        (6800, &[], Level::Warning, 0.68, 9200),
        (6400, &[], Level::Normal, 0.64, 9200),
        // a full GPU wins over half-used RAM
        (5000, &[(8000, 600)], Level::Critical, 0.925, 9200),
        (5000, &[(8000, 4000)], Level::Normal, 0.5, 9200),
    ];
    let probe = ScriptedProbe::new(script.iter().map(|r| sample(r.0, r.1)).collect());
    let calls = Arc::clone(&probe.calls);
    let start_at = Instant::now();
    let (handle, task, stop) = start(probe);
    // Nothing sampled until the task runs.
    assert_eq!(handle.latest(), Snapshot::default());
    let mut rx = handle.subscribe();

    for (i, (used_mb, gpus, level, pressure, peak_mb)) in script.into_iter().enumerate() {
        rx.changed().await.expect("monitor running");
        assert_eq!(
            start_at.elapsed(),
            INTERVAL * i as u32,
            "sample {i} on time"
        );
        assert_eq!(calls.load(SeqCst), i + 1);
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap, handle.latest());
        let got = (
            snap.used_memory_mb,
            snap.pressure_level,
            snap.memory_pressure,
            snap.peak_memory_mb,
            snap.gpu_memory.len(),
        );
        assert_eq!(
            got,
            (used_mb, level, pressure, peak_mb, gpus.len()),
            "sample {i}"
        );
        assert_eq!(
            (
                snap.total_memory_mb,
                snap.allocated_memory_mb,
                snap.available_cores
            ),
            (TOTAL_MB, 0, 8)
        );
        assert_eq!(snap.cpu_usage, 12.3);
        assert!(
            humantime::parse_rfc3339(&snap.sampled_at).is_ok(),
            "{}",
            snap.sampled_at
        );
    }

    // Just before the next tick nothing new; at it, the next sample.
    tokio::time::sleep(INTERVAL - Duration::from_millis(1)).await;
    assert!(!rx.has_changed().expect("monitor running"));
    rx.changed().await.expect("monitor running");
    assert_eq!(start_at.elapsed(), INTERVAL * 9);

    stop.send_replace(true);
    task.await.expect("loop ends cleanly");
}

#[tokio::test(start_paused = true)]
async fn stops_on_signal_or_dropped_sender_and_keeps_the_last_snapshot() {
    // (how to stop, whether the stop sender is dropped)
    for drop_sender in [false, true] {
        let probe = ScriptedProbe::new(vec![sample(7500, &[])]);
        let calls = Arc::clone(&probe.calls);
        let (handle, task, stop) = start(probe);
        let mut rx = handle.subscribe();
        rx.changed().await.expect("first sample");
        if drop_sender {
            drop(stop);
        } else {
            stop.send_replace(true);
        }
        task.await.expect("loop ends cleanly");
        assert!(rx.changed().await.is_err(), "subscribers learn it stopped");
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(calls.load(SeqCst), 1, "no sample after stop");
        let last = handle.latest();
        assert_eq!(
            (last.used_memory_mb, last.pressure_level),
            (7500, Level::Warning)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_already_set_means_no_sample() {
    let probe = ScriptedProbe::new(vec![sample(5000, &[])]);
    let calls = Arc::clone(&probe.calls);
    let (_stop_tx, stop_rx) = watch::channel(true);
    let (handle, task) = spawn(Box::new(probe), INTERVAL, Thresholds::default(), stop_rx);
    task.await.expect("loop ends cleanly");
    assert_eq!(calls.load(SeqCst), 0);
    assert_eq!(handle.latest(), Snapshot::default());
}

/// A probe that panics on its second call.
struct PanicsOnSecond(usize);

impl ResourceProbe for PanicsOnSecond {
    fn sample(&mut self) -> Sample {
        self.0 += 1;
        assert!(self.0 < 2, "probe broke (expected by the test)");
        sample(9500, &[])
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_probe_ends_the_loop_and_leaves_the_last_snapshot() {
    let (_stop_tx, stop_rx) = watch::channel(false);
    let (handle, task) = spawn(
        Box::new(PanicsOnSecond(0)),
        INTERVAL,
        Thresholds::default(),
        stop_rx,
    );
    let mut rx = handle.subscribe();
    rx.changed().await.expect("first sample");
    task.await.expect("the loop itself does not panic");
    let last = handle.latest();
    assert_eq!(
        (last.used_memory_mb, last.pressure_level),
        (9500, Level::Critical)
    );
}

#[tokio::test(start_paused = true)]
async fn a_zero_interval_is_raised_to_the_minimum() {
    let probe = ScriptedProbe::new(vec![sample(1000, &[])]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, task) = spawn(
        Box::new(probe),
        Duration::ZERO,
        Thresholds::default(),
        stop_rx,
    );
    let mut rx = handle.subscribe();
    let start_at = Instant::now();
    rx.changed().await.expect("first sample");
    rx.changed().await.expect("second sample");
    assert_eq!(start_at.elapsed(), MIN_INTERVAL);
    stop_tx.send_replace(true);
    task.await.expect("loop ends cleanly");
}

#[test]
fn snapshot_json_has_the_status_field_names() {
    // (GPUs, JSON)
    let cases: [(Gpus, serde_json::Value); 2] = [
        (
            &[],
            serde_json::json!({
                "total_memory_mb": 10000, "allocated_memory_mb": 0, "used_memory_mb": 7200,
                "peak_memory_mb": 7200, "available_cores": 8, "cpu_usage": 12.3,
                "memory_pressure": 0.72, "pressure_level": "warning",
                "sampled_at": "2026-01-02T03:04:05.678Z",
            }),
        ),
        (
            &[(24000, 2000)],
            serde_json::json!({
                "total_memory_mb": 10000, "allocated_memory_mb": 0, "used_memory_mb": 7200,
                "peak_memory_mb": 7200, "available_cores": 8, "cpu_usage": 12.3,
                "gpu_memory": [{"index": 0, "name": "NVIDIA Test", "total_mb": 24000,
                                "used_mb": 22000, "free_mb": 2000}],
                "memory_pressure": 0.917, "pressure_level": "critical",
                "sampled_at": "2026-01-02T03:04:05.678Z",
            }),
        ),
    ];
    let at = humantime::parse_rfc3339("2026-01-02T03:04:05.678Z").expect("valid time");
    for (gpus, want) in cases {
        let snap = Tracker::new(Thresholds::default()).observe(&sample(7200, gpus), at);
        assert_eq!(serde_json::to_value(&snap).expect("serializes"), want);
    }
}

#[tokio::test(start_paused = true)]
async fn admission_reads_ram_and_gpu_memory_from_the_latest_sample() {
    use crate::monitor::{MemoryProbe, MemoryReading};
    let probe = ScriptedProbe::new(vec![sample(4000, &[(8000, 3000), (8000, 8000)])]);
    let (handle, _task, _stop) = start(probe);
    assert_eq!(handle.read(), None, "nothing sampled yet");
    let mut rx = handle.subscribe();
    rx.changed().await.expect("a first sample");
    assert_eq!(
        handle.read(),
        Some(MemoryReading {
            total: (TOTAL_MB + 16_000) * MIB,
            available: (TOTAL_MB - 4000 + 3000 + 8000) * MIB,
        })
    );
}
