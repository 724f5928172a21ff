//! What the actor does to the outside world, behind traits so tests use fakes: load and unload
//! through the provider ([`Backend`]), and read the machine's memory ([`MemoryProbe`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

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
///
/// llama-server with `slot_save` (its `--slot-save-path` set): before a model is unloaded
/// its slot 0 KV cache is saved to `llm-warden-<model>.bin`, and after it is loaded again it
/// is restored from there, so the prompt it was working on comes back without being
/// evaluated again (TDR-007's "cache" stage: offload to disk, come back cheaply). Both are
/// best effort: a failure is logged and the load or unload goes on.
pub struct OpsBackend {
    client: UpstreamClient,
    upstream: Upstream,
    kind: ProviderKind,
    slot_save: bool,
    /// Models whose slot was saved at their last unload.
    saved: Arc<Mutex<HashSet<String>>>,
}

impl OpsBackend {
    pub fn new(
        client: UpstreamClient,
        upstream: Upstream,
        kind: ProviderKind,
        slot_save: bool,
    ) -> Self {
        OpsBackend {
            client,
            upstream,
            kind,
            slot_save: slot_save && kind == ProviderKind::LlamaCpp,
            saved: Default::default(),
        }
    }
}

/// The file a model's slot is saved to (under the server's `--slot-save-path`): the model
/// name with anything but letters, digits, `-`, `_`, `.` made `_`.
pub fn slot_file(model: &str) -> String {
    let safe: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("llm-warden-{safe}.bin")
}

impl Backend for OpsBackend {
    fn load(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<Loaded, OpError>> {
        let (client, upstream, kind, model) = (
            self.client.clone(),
            self.upstream.clone(),
            self.kind,
            model.to_string(),
        );
        let restore = self.slot_save
            && self
                .saved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&model);
        Box::pin(async move {
            let opts = LoadOptions {
                context_length: shape.num_ctx,
                num_batch: shape.num_batch,
                ..LoadOptions::default()
            };
            let loaded = ops::load(&client, &upstream, kind, &model, &opts).await?;
            if restore {
                let file = slot_file(&model);
                match ops::llamacpp_slot(&client, &upstream, Some(&model), 0, "restore", &file)
                    .await
                {
                    Ok(v) => tracing::info!(
                        model = %model,
                        tokens = v.get("n_restored").and_then(serde_json::Value::as_u64),
                        "KV cache restored"
                    ),
                    Err(e) => tracing::warn!(model = %model, error = %e, "KV cache restore failed"),
                }
            }
            Ok(loaded)
        })
    }

    fn unload(&self, instance_id: &str) -> BoxFuture<'static, Result<(), OpError>> {
        let (client, upstream, kind, id) = (
            self.client.clone(),
            self.upstream.clone(),
            self.kind,
            instance_id.to_string(),
        );
        let save = self.slot_save.then(|| self.saved.clone());
        Box::pin(async move {
            if let Some(saved) = save {
                let file = slot_file(&id);
                match ops::llamacpp_slot(&client, &upstream, Some(&id), 0, "save", &file).await {
                    Ok(v) => {
                        tracing::info!(
                            model = %id,
                            tokens = v.get("n_saved").and_then(serde_json::Value::as_u64),
                            file = %file,
                            "KV cache saved before unloading"
                        );
                        saved
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id.clone());
                    }
                    Err(e) => tracing::warn!(model = %id, error = %e, "KV cache save failed"),
                }
            }
            ops::unload(&client, &upstream, kind, &id).await
        })
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
