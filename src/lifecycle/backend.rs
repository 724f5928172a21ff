//! What the actor does to the outside world, behind traits so tests use fakes: load and unload
//! through the provider ([`Backend`]); the machine's memory is read through
//! `crate::monitor::MemoryProbe`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::Shape;
use crate::memory::{Geometry, MemoryTable};
use crate::providers::ops::{self, LoadOptions, Loaded, OpError};
use crate::providers::{ProviderKind, Upstream, UpstreamClient};

/// Loads and unloads models on one provider.
pub trait Backend: Send + Sync + 'static {
    /// Loads `model` with the runner options in `shape` (the provider's defaults where
    /// `None`) and answers once the provider has it (or failed).
    fn load(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<Loaded, OpError>>;
    /// `model`'s geometry (Ollama `/api/show`), for the `num_batch` of a load under memory
    /// pressure; `None` when the provider does not say (then `num_batch` is left alone).
    fn geometry(&self, _model: &str) -> BoxFuture<'static, Option<Geometry>> {
        Box::pin(async { None })
    }
    /// Unloads what `load` returned as `instance_id`.
    fn unload(&self, instance_id: &str) -> BoxFuture<'static, Result<(), OpError>>;
    /// Tells the provider again to keep a loaded `model` until told otherwise, with the
    /// runner options in `shape` (so it is not reloaded for them): Ollama's load-only
    /// request with `keep_alive: -1`, the same as a load. Nothing elsewhere: no other
    /// provider unloads on a timer of its own that a request can reset.
    fn keep(&self, _model: &str, _shape: Shape) -> BoxFuture<'static, Result<(), OpError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The real backend: `providers::ops` over the shared upstream client. Loads ask the provider
/// to keep the model until told otherwise (Ollama `keep_alive: -1`).
///
/// llama-server with `slot_save` (its `--slot-save-path` set): before a model is unloaded
/// the KV cache of each slot that holds a prompt (`/slots`: `n_prompt_tokens` > 0; recent
/// builds run 4 slots by default) is saved to `llm-warden-<model>-slot<N>.bin`, and after the
/// model is loaded again each is restored into its slot, so the conversations it was serving
/// come back without their prompts being evaluated again (the design record's "cache" stage (docs/design.md): offload to
/// disk, come back cheaply). Best effort: a failure is logged and the load or unload goes on.
pub struct OpsBackend {
    client: UpstreamClient,
    upstream: Upstream,
    kind: ProviderKind,
    slot_save: bool,
    /// The slots saved at each model's last unload.
    saved: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    /// Where model geometries are kept (`/api/show` is asked once per model), and this
    /// provider's index there.
    geometries: Arc<MemoryTable>,
    provider: usize,
}

impl OpsBackend {
    pub fn new(
        client: UpstreamClient,
        upstream: Upstream,
        kind: ProviderKind,
        slot_save: bool,
        geometries: Arc<MemoryTable>,
        provider: usize,
    ) -> Self {
        OpsBackend {
            client,
            upstream,
            kind,
            slot_save: slot_save && kind == ProviderKind::LlamaCpp,
            saved: Default::default(),
            geometries,
            provider,
        }
    }
}

/// The file slot `slot` of `model` is saved to (under the server's `--slot-save-path`): the
/// model name with anything but letters, digits, `-`, `_`, `.` made `_`.
pub fn slot_file(model: &str, slot: u64) -> String {
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
    format!("llm-warden-{safe}-slot{slot}.bin")
}

/// Saves every slot of `model` that holds a prompt; the slots saved.
async fn save_slots(client: &UpstreamClient, upstream: &Upstream, model: &str) -> Vec<u64> {
    let slots = match ops::llamacpp_used_slots(client, upstream, Some(model)).await {
        Ok(slots) => slots,
        Err(e) => {
            tracing::warn!(model = %model, error = %e, "cannot list slots to save");
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for slot in slots {
        let file = slot_file(model, slot);
        match ops::llamacpp_slot(client, upstream, Some(model), slot, "save", &file).await {
            Ok(v) => {
                let tokens = v.get("n_saved").and_then(serde_json::Value::as_u64);
                tracing::info!(model = %model, slot, tokens, file = %file, "KV cache saved before unloading");
                done.push(slot);
            }
            Err(e) => tracing::warn!(model = %model, slot, error = %e, "KV cache save failed"),
        }
    }
    done
}

/// Restores the slots [`save_slots`] saved.
async fn restore_slots(client: &UpstreamClient, upstream: &Upstream, model: &str, slots: &[u64]) {
    for &slot in slots {
        let file = slot_file(model, slot);
        match ops::llamacpp_slot(client, upstream, Some(model), slot, "restore", &file).await {
            Ok(v) => {
                let tokens = v.get("n_restored").and_then(serde_json::Value::as_u64);
                tracing::info!(model = %model, slot, tokens, "KV cache restored");
            }
            Err(e) => tracing::warn!(model = %model, slot, error = %e, "KV cache restore failed"),
        }
    }
}

impl Backend for OpsBackend {
    fn load(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<Loaded, OpError>> {
        let (client, upstream, kind, model) = (
            self.client.clone(),
            self.upstream.clone(),
            self.kind,
            model.to_string(),
        );
        let restore = if self.slot_save {
            self.saved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&model)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Box::pin(async move {
            let opts = LoadOptions {
                context_length: shape.num_ctx,
                num_batch: shape.num_batch,
                ..LoadOptions::default()
            };
            let loaded = ops::load(&client, &upstream, kind, &model, &opts).await?;
            restore_slots(&client, &upstream, &model, &restore).await;
            Ok(loaded)
        })
    }

    fn geometry(&self, model: &str) -> BoxFuture<'static, Option<Geometry>> {
        if self.kind != ProviderKind::Ollama {
            return Box::pin(async { None });
        }
        let (client, upstream, table, provider, model) = (
            self.client.clone(),
            self.upstream.clone(),
            self.geometries.clone(),
            self.provider,
            model.to_string(),
        );
        Box::pin(async move {
            table
                .geometry_or_fetch(provider, &client, &upstream, &model)
                .await
        })
    }

    fn keep(&self, model: &str, shape: Shape) -> BoxFuture<'static, Result<(), OpError>> {
        if self.kind != ProviderKind::Ollama {
            return Box::pin(async { Ok(()) });
        }
        let (client, upstream, model) = (
            self.client.clone(),
            self.upstream.clone(),
            model.to_string(),
        );
        Box::pin(async move {
            let opts = LoadOptions {
                context_length: shape.num_ctx,
                num_batch: shape.num_batch,
                ..LoadOptions::default()
            };
            ops::load(&client, &upstream, ProviderKind::Ollama, &model, &opts)
                .await
                .map(drop)
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
                let slots = save_slots(&client, &upstream, &id).await;
                if !slots.is_empty() {
                    saved
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone(), slots);
                }
            }
            ops::unload(&client, &upstream, kind, &id).await
        })
    }
}
