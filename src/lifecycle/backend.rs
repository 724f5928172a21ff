//! What the actor does to the outside world, behind traits so tests use fakes: load and unload
//! through the provider ([`Backend`]), and read the machine's memory ([`MemoryProbe`]).

use std::sync::Mutex;

use futures_util::future::BoxFuture;

use super::Shape;
use crate::config::Upstream;
use crate::providers::ops::{self, LoadOptions, Loaded, OpError};
use crate::providers::ProviderKind;
use crate::proxy::UpstreamClient;

/// Loads and unloads models on one provider.
pub trait Backend: Send + Sync + 'static {
    /// Loads `model` with the runner options in `shape` (the provider's defaults where
    /// `None`) and answers once the provider has it (or failed).
    fn load(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<Loaded, OpError>>;
    /// Unloads what `load` returned as `instance_id`.
    fn unload(&self, instance_id: &str) -> BoxFuture<'static, Result<(), OpError>>;
}

/// The real backend: `providers::ops` over the shared upstream client. Loads ask the provider
/// to keep the model until told otherwise (Ollama `keep_alive: -1`).
pub struct OpsBackend {
    pub client: UpstreamClient,
    pub upstream: Upstream,
    pub kind: ProviderKind,
}

impl Backend for OpsBackend {
    fn load(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<Loaded, OpError>> {
        let (client, upstream, kind, model) = (
            self.client.clone(),
            self.upstream.clone(),
            self.kind,
            model.to_string(),
        );
        Box::pin(async move {
            let opts = LoadOptions {
                context_length: shape.num_ctx,
                num_batch: shape.num_batch,
                ..LoadOptions::default()
            };
            ops::load(&client, &upstream, kind, &model, &opts).await
        })
    }

    fn unload(&self, instance_id: &str) -> BoxFuture<'static, Result<(), OpError>> {
        let (client, upstream, kind, id) = (
            self.client.clone(),
            self.upstream.clone(),
            self.kind,
            instance_id.to_string(),
        );
        Box::pin(async move { ops::unload(&client, &upstream, kind, &id).await })
    }
}

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
