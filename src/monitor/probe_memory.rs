//! What the lifecycle reads before it plans a load: the machine's memory now. The monitor's
//! handle answers from its latest sample (RAM, and GPU memory where there are GPUs);
//! [`SystemMemory`] reads RAM alone.

use std::sync::Mutex;

/// Memory of the machine, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryReading {
    pub total: u64,
    /// Free for new allocations now (Linux `MemAvailable`).
    pub available: u64,
}

/// Reads the machine's memory when the actor plans a load.
pub trait MemoryProbe: Send + Sync + 'static {
    /// `None` when it cannot be read: admission then checks the model count only.
    fn read(&self) -> Option<MemoryReading>;
}

/// System RAM from `sysinfo` (GPU memory comes with the memory-pressure monitor). Refreshing
/// memory alone reads `/proc/meminfo`: tens of microseconds, once per planned load.
pub struct SystemMemory {
    sys: Mutex<sysinfo::System>,
}

impl SystemMemory {
    pub fn new() -> Self {
        SystemMemory {
            sys: Mutex::new(sysinfo::System::new()),
        }
    }
}

impl Default for SystemMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryProbe for SystemMemory {
    fn read(&self) -> Option<MemoryReading> {
        let mut sys = self.sys.lock().unwrap_or_else(|e| e.into_inner());
        sys.refresh_memory();
        let total = sys.total_memory();
        (total > 0).then(|| MemoryReading {
            total,
            available: sys.available_memory(),
        })
    }
}
