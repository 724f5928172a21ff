//! Pure: what a [`Sample`] means. [`pressure_of`] turns a sample into one number (0..1),
//! and [`classify`] turns that number into a [`Level`] with hysteresis (docs/design.md:
//! MemoryPressureConfig: `warning` 0.7, `critical` 0.9). No I/O and no logging here: the
//! monitor loop keeps the current level between samples and logs when it changes.

use std::fmt;

use serde::Serialize;

use super::probe::Sample;
use crate::config::MemoryPressureConfig;

/// How hard memory is pressed, from the worse of RAM and every GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Normal,
    Warning,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }

    /// The level one step down (`Normal` stays).
    fn below(self) -> Level {
        match self {
            Level::Critical => Level::Warning,
            Level::Warning | Level::Normal => Level::Normal,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the levels start, as fractions of memory in use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub warning: f64,
    pub critical: f64,
    /// a level is left only when pressure falls this far below its threshold
    pub hysteresis: f64,
}

impl Thresholds {
    /// The band used when the config gives none: wide enough that a model loading or a
    /// page cache filling does not flip the level back and forth on every sample, narrow
    /// enough that a level is left once memory really is freed.
    pub const DEFAULT_HYSTERESIS: f64 = 0.05;

    /// The pressure at or above which `level` is entered (0 for `Normal`).
    fn enter(self, level: Level) -> f64 {
        match level {
            Level::Normal => 0.0,
            Level::Warning => self.warning,
            Level::Critical => self.critical,
        }
    }
}

/// docs/design.md: defaults: warning at 0.7, critical at 0.9.
impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            warning: 0.7,
            critical: 0.9,
            hysteresis: Self::DEFAULT_HYSTERESIS,
        }
    }
}

/// The configured thresholds with [`Thresholds::DEFAULT_HYSTERESIS`], narrowed to half the
/// warning threshold so that `normal` can always be reached again (a band reaching down to
/// 0 would hold `warning` forever).
impl From<&MemoryPressureConfig> for Thresholds {
    fn from(c: &MemoryPressureConfig) -> Self {
        Thresholds {
            warning: c.warning,
            critical: c.critical,
            // Never a band that reaches 0: `normal` must stay reachable.
            hysteresis: c.hysteresis.min(c.warning / 2.0),
        }
    }
}

/// 0..1: the worse of RAM use ((total-available)/total) and each GPU's used/total.
///
/// A GPU's "used" here is `total − free`: NVML's own `used_mb` leaves out what the driver
/// reserves, which is no more available to a model than allocated memory. A reading with
/// a total of 0 (nothing read) counts as no pressure.
pub fn pressure_of(sample: &Sample) -> f64 {
    let ram = fraction_used(sample.total_memory, sample.available_memory);
    sample
        .gpus
        .iter()
        .map(|g| fraction_used(g.total_mb, g.free_mb))
        .fold(ram, f64::max)
}

/// `(total − free) / total` in 0..1; 0 when `total` is 0.
fn fraction_used(total: u64, free: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    total.saturating_sub(free) as f64 / total as f64
}

/// The next level given the current one and the pressure (enter at the threshold, leave below threshold − hysteresis).
///
/// Rising takes effect at once, skipping levels if need be (0.5 → 0.95 goes straight to
/// `critical`). Falling goes down one level at a time while the pressure is below the
/// level's threshold minus the band: from `critical` at 0.8 (thresholds 0.7/0.9, band
/// 0.05) the result is `warning`, at 0.6 `normal`. A pressure that is not a number keeps
/// the current level.
pub fn classify(current: Level, pressure: f64, t: Thresholds) -> Level {
    let reached = if pressure >= t.critical {
        Level::Critical
    } else if pressure >= t.warning {
        Level::Warning
    } else {
        Level::Normal
    };
    if reached >= current {
        return reached;
    }
    let mut level = current;
    while level != Level::Normal && pressure < t.enter(level) - t.hysteresis {
        level = level.below();
    }
    level
}

#[cfg(test)]
mod tests {
    use super::super::probe::GpuMemory;
    use super::*;
    use Level::{Critical, Normal, Warning};

    const T: Thresholds = Thresholds {
        warning: 0.7,
        critical: 0.9,
        hysteresis: 0.05,
    };

    #[test]
    fn classify_table() {
        // (from, pressure, expected)
        let cases = [
            // rising through both thresholds, entering exactly at each
            (Normal, 0.0, Normal),
            (Normal, 0.699, Normal),
            (Normal, 0.7, Warning),
            (Warning, 0.899, Warning),
            (Warning, 0.9, Critical),
            (Critical, 1.0, Critical),
            // rising past both at once
            (Normal, 0.95, Critical),
            // falling inside the band: the level holds
            (Critical, 0.86, Critical),
            (Critical, 0.85, Critical),
            (Warning, 0.66, Warning),
            (Warning, 0.65, Warning),
            // falling out of the band
            (Critical, 0.849, Warning),
            (Warning, 0.649, Normal),
            // falling out of critical into warning's band stays warning, past both is normal
            (Critical, 0.66, Warning),
            (Critical, 0.6, Normal),
            (Critical, 0.0, Normal),
            // not a number: no change
            (Warning, f64::NAN, Warning),
            (Normal, f64::NAN, Normal),
        ];
        for (from, p, want) in cases {
            assert_eq!(classify(from, p, T), want, "{from} at {p}");
        }
    }

    #[test]
    fn pressure_oscillating_around_a_threshold_does_not_flap() {
        // (pressures in order, the level after each)
        let cases: [(&[f64], &[Level]); 3] = [
            // around warning: entered once, held through the wobble
            (
                &[0.69, 0.71, 0.69, 0.71, 0.68, 0.66, 0.64],
                &[Normal, Warning, Warning, Warning, Warning, Warning, Normal],
            ),
            // around critical
            (
                &[0.89, 0.91, 0.89, 0.88, 0.91, 0.86, 0.84],
                &[
                    Warning, Critical, Critical, Critical, Critical, Critical, Warning,
                ],
            ),
            // a drop out of the band and a rise back re-enter the level
            (
                &[0.72, 0.6, 0.72, 0.69],
                &[Warning, Normal, Warning, Warning],
            ),
        ];
        for (pressures, want) in cases {
            let mut level = Normal;
            let got: Vec<Level> = pressures
                .iter()
                .map(|&p| {
                    level = classify(level, p, T);
                    level
                })
                .collect();
            assert_eq!(got, want, "{pressures:?}");
        }
    }

    fn sample(total: u64, available: u64, gpus: &[(u64, u64)]) -> Sample {
        Sample {
            total_memory: total,
            available_memory: available,
            cpu_usage: 0.0,
            cores: 4,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, &(total_mb, free_mb))| GpuMemory {
                    index: i as u32,
                    name: format!("GPU {i}"),
                    total_mb,
                    used_mb: total_mb - free_mb,
                    free_mb,
                })
                .collect(),
        }
    }

    #[test]
    fn pressure_of_takes_the_worse_of_ram_and_gpus() {
        /// GPUs as (total MiB, free MiB).
        type Gpus = &'static [(u64, u64)];
        // (total RAM, available RAM, GPUs, pressure)
        let cases: [(u64, u64, Gpus, f64); 8] = [
            (1000, 1000, &[], 0.0),
            (1000, 250, &[], 0.75),
            (1000, 0, &[], 1.0),
            // nothing read: no pressure
            (0, 0, &[], 0.0),
            // available above total (a racy read) does not go negative
            (1000, 1200, &[], 0.0),
            // a fuller GPU wins over RAM
            (1000, 500, &[(8000, 1000)], 0.875),
            // RAM wins over an emptier GPU; the fullest of several GPUs counts
            (1000, 100, &[(8000, 4000), (8000, 2000)], 0.9),
            (1000, 900, &[(8000, 4000), (24000, 2400), (0, 0)], 0.9),
        ];
        for (total, available, gpus, want) in cases {
            let got = pressure_of(&sample(total, available, gpus));
            assert!(
                (got - want).abs() < 1e-9,
                "{total}/{available} {gpus:?}: {got}"
            );
        }
    }

    #[test]
    fn reserved_gpu_memory_counts_as_used() {
        // NVML: used + free < total by what the driver reserves.
        let mut s = sample(1000, 1000, &[(1000, 200)]);
        s.gpus[0].used_mb = 700;
        assert!((pressure_of(&s) - 0.8).abs() < 1e-9);
    }

    #[test]
    fn thresholds_from_config_keep_normal_reachable() {
        use crate::config::PressureAction;
        // (warning, critical, hysteresis)
        let cases = [(0.7, 0.9, 0.05), (0.06, 0.5, 0.03), (0.0, 0.5, 0.0)];
        for (warning, critical, want) in cases {
            let t = Thresholds::from(&MemoryPressureConfig {
                warning,
                critical,
                action: PressureAction::Cache,
                hysteresis: 0.05,
                sample_interval: std::time::Duration::from_secs(2),
                gpu: false,
            });
            assert_eq!(
                (t.warning, t.critical, t.hysteresis),
                (warning, critical, want)
            );
        }
    }
}
