//! System resources: RAM, CPU and GPU memory, sampled in the background, and the memory
//! pressure level they add up to (TDR-007 SystemResources, MemoryPressureConfig).

pub mod pressure;
pub mod probe;

pub use pressure::{classify, pressure_of, Level, Thresholds};
pub use probe::{GpuMemory, ResourceProbe, Sample, SystemProbe};
