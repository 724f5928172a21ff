//! Where the monitor's numbers come from: the [`ResourceProbe`] trait, and [`SystemProbe`],
//! which reads RAM and CPU with `sysinfo` and GPU memory with NVML (`nvml-wrapper`).
//! A probe only measures; it does not decide what the numbers mean ([`super::pressure`]
//! does) nor when to measure (the loop in [`super`] does). Tests swap in scripted probes,
//! as Ollama's scheduler swaps its GPU and system-info lookups (`server/sched.go`).

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use serde::Serialize;
use sysinfo::{MemoryRefreshKind, System};

const MIB: u64 = 1 << 20;

/// One GPU's memory, as NVML reports it (MiB).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuMemory {
    /// NVML's device index (0-based, the order `nvidia-smi` lists).
    pub index: u32,
    pub name: String,
    pub total_mb: u64,
    /// Memory allocated by processes. NVML leaves out what the driver reserves for itself,
    /// so `used_mb + free_mb` can fall short of `total_mb` by a few hundred MiB.
    pub used_mb: u64,
    pub free_mb: u64,
}

/// One reading of the machine.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Installed RAM (bytes).
    pub total_memory: u64,
    /// RAM that can be had without swapping (bytes; Linux `MemAvailable`), which counts
    /// reclaimable page cache as available: the right base for pressure, where "free" would
    /// read near zero on any machine that has been up a while.
    pub available_memory: u64,
    /// Percent of all cores busy (0..100) since the previous sample; 0 on the first.
    pub cpu_usage: f32,
    /// Logical CPUs.
    pub cores: usize,
    /// One entry per GPU; empty without NVML (no driver, no NVIDIA GPU, or GPUs turned off).
    pub gpus: Vec<GpuMemory>,
}

/// Something that can read the machine. `sample` may block for a while (NVML calls talk to
/// the driver), so the monitor calls it on a blocking thread; hence `Send + 'static`, and
/// `&mut self` lets a probe keep state between calls (sysinfo needs the previous CPU
/// counters to compute usage).
pub trait ResourceProbe: Send + 'static {
    fn sample(&mut self) -> Sample;
}

/// sysinfo for RAM/CPU, NVML (when it initialises) for GPUs; NVML failure is logged once.
///
/// NVML is tried once, in [`SystemProbe::new`]: on a machine without the NVIDIA driver the
/// library (`libnvidia-ml.so.1`, loaded at run time) is missing, `Nvml::init` returns an
/// error, and the probe reports RAM only from then on. It does not retry: a driver that
/// appears later needs a restart to be seen.
pub struct SystemProbe {
    sys: System,
    /// `None` when GPUs are off or NVML did not initialise.
    nvml: Option<Nvml>,
    /// A failed GPU read is logged once (at warn), not once per sample; reset by a good read
    /// so a GPU that comes back and fails again is reported again.
    gpu_error_logged: bool,
}

impl SystemProbe {
    /// A probe for this machine; `use_gpu: false` never touches NVML. Blocks for a few
    /// milliseconds (NVML loads its library and symbols), so build it at startup.
    pub fn new(use_gpu: bool) -> Self {
        Self::with_nvml(use_gpu, Nvml::init)
    }

    /// [`SystemProbe::new`] with the NVML initialiser given, so tests can make it fail the
    /// same way on every machine.
    fn with_nvml(use_gpu: bool, init: impl FnOnce() -> Result<Nvml, NvmlError>) -> Self {
        let nvml = if use_gpu {
            match init() {
                Ok(nvml) => Some(nvml),
                Err(e) => {
                    log_nvml_unavailable(&e);
                    None
                }
            }
        } else {
            None
        };
        let mut sys = System::new();
        // The first CPU refresh only records counters; doing it here makes the first sample's
        // `cpu_usage` cover the time since the probe was built instead of reading 0.
        sys.refresh_cpu_usage();
        SystemProbe {
            sys,
            nvml,
            gpu_error_logged: false,
        }
    }

    /// Whether NVML initialised (GPU memory is read on each sample).
    pub fn has_nvml(&self) -> bool {
        self.nvml.is_some()
    }

    /// Every GPU NVML can read. A GPU whose read fails is left out of this sample (the
    /// others still count); the first failure is logged.
    fn gpus(&mut self) -> Vec<GpuMemory> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let (gpus, error) = read_gpus(nvml);
        match error {
            Some(e) if !self.gpu_error_logged => {
                tracing::warn!(error = %e, "reading GPU memory failed; such GPUs are left out until they read again");
                self.gpu_error_logged = true;
            }
            Some(e) => tracing::debug!(error = %e, "reading GPU memory failed"),
            None => self.gpu_error_logged = false,
        }
        gpus
    }
}

impl ResourceProbe for SystemProbe {
    fn sample(&mut self) -> Sample {
        // RAM alone reads /proc/meminfo; swap is not part of pressure.
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.sys.refresh_cpu_usage();
        let cpu_usage = self.sys.global_cpu_usage();
        let cores = match self.sys.cpus().len() {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Sample {
            total_memory: self.sys.total_memory(),
            available_memory: self.sys.available_memory(),
            cpu_usage: if cpu_usage.is_finite() {
                cpu_usage
            } else {
                0.0
            },
            cores,
            gpus: self.gpus(),
        }
    }
}

/// Reads every device; returns what could be read and the last error, if any.
fn read_gpus(nvml: &Nvml) -> (Vec<GpuMemory>, Option<NvmlError>) {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut gpus = Vec::with_capacity(count as usize);
    let mut error = None;
    for index in 0..count {
        let read = nvml.device_by_index(index).and_then(|d| {
            let mem = d.memory_info()?;
            // A name is nice to have; a GPU that only fails on it still counts.
            let name = d.name().unwrap_or_else(|_| format!("GPU {index}"));
            Ok(GpuMemory {
                index,
                name,
                total_mb: mem.total / MIB,
                used_mb: mem.used / MIB,
                free_mb: mem.free / MIB,
            })
        });
        match read {
            Ok(g) => gpus.push(g),
            Err(e) => error = Some(e),
        }
    }
    (gpus, error)
}

/// Logs, once per probe, why GPU memory will not be monitored. No library or no driver is
/// the ordinary state of a machine without an NVIDIA GPU (info); anything else means a
/// driver is there but NVML would not start (warn).
fn log_nvml_unavailable(e: &NvmlError) {
    match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound | NvmlError::DriverNotLoaded => {
            tracing::info!(reason = %e, "no NVIDIA driver found; monitoring system RAM only")
        }
        _ => tracing::warn!(error = %e, "NVML did not initialise; monitoring system RAM only"),
    }
}

/// A probe that replays chosen samples, for tests of the monitor and of its consumers.
#[cfg(test)]
pub(crate) struct ScriptedProbe {
    script: std::collections::VecDeque<Sample>,
    last: Sample,
    /// How many times `sample` was called (shared, so a test can read it after the probe
    /// moved into the monitor).
    pub(crate) calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(test)]
impl ScriptedProbe {
    /// Returns `script` in order, then repeats its last sample.
    pub(crate) fn new(script: Vec<Sample>) -> Self {
        let last = script.last().cloned().unwrap_or(Sample {
            total_memory: 0,
            available_memory: 0,
            cpu_usage: 0.0,
            cores: 1,
            gpus: Vec::new(),
        });
        ScriptedProbe {
            script: script.into(),
            last,
            calls: Default::default(),
        }
    }
}

#[cfg(test)]
impl ResourceProbe for ScriptedProbe {
    fn sample(&mut self) -> Sample {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.script.pop_front().unwrap_or_else(|| self.last.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks what must hold for any machine: RAM read, CPUs counted, usage a percentage.
    fn assert_sane_ram(s: &Sample) {
        assert!(s.total_memory > 64 * MIB, "total {}", s.total_memory);
        assert!(s.available_memory > 0, "available {}", s.available_memory);
        assert!(s.available_memory <= s.total_memory);
        assert!(s.cores >= 1);
        assert!((0.0..=100.0).contains(&s.cpu_usage), "cpu {}", s.cpu_usage);
    }

    #[test]
    fn failed_nvml_init_leaves_a_ram_only_probe() {
        // The same errors `Nvml::init` gives without a driver, on every machine.
        for err in [
            NvmlError::LibraryNotFound,
            NvmlError::DriverNotLoaded,
            NvmlError::NoPermission,
        ] {
            let mut probe = SystemProbe::with_nvml(true, move || Err(err));
            assert!(!probe.has_nvml());
            for _ in 0..2 {
                let s = probe.sample();
                assert_sane_ram(&s);
                assert!(s.gpus.is_empty());
            }
        }
    }

    #[test]
    fn gpus_off_never_initialises_nvml() {
        let probe = SystemProbe::with_nvml(false, || panic!("NVML must not be touched"));
        assert!(!probe.has_nvml());
    }

    #[test]
    fn system_probe_reads_this_machine() {
        // On a machine without the NVIDIA driver (CI, laptops) this runs the real failing
        // `Nvml::init`; with one it reads real GPUs.
        let mut probe = SystemProbe::new(true);
        let s = probe.sample();
        assert_sane_ram(&s);
        if probe.has_nvml() {
            for g in &s.gpus {
                assert!(
                    g.total_mb > 0 && g.used_mb + g.free_mb <= g.total_mb,
                    "{g:?}"
                );
            }
        } else {
            assert!(s.gpus.is_empty());
        }
    }
}
