//! The TOML document as written: every key optional, unknown keys refused. Only
//! `validate` in the parent module reads these types.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) admin: RawAdmin,
    pub(super) proxy: RawProxy,
    pub(super) providers: Option<Vec<RawProvider>>,
    pub(super) limits: RawLimits,
    pub(super) queue: RawQueue,
    pub(super) buffers: RawBuffers,
    pub(super) memory_pressure: RawPressure,
    pub(super) compaction: RawCompaction,
    pub(super) models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
    pub(super) allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProxy {
    pub(super) max_request_body: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) max_connections: Option<u32>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) name: Option<String>,
    pub(super) kind: String,
    pub(super) listen: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) poll_interval: Option<String>,
    pub(super) max_models_loaded: Option<u32>,
    pub(super) memory_threshold: Option<f64>,
    pub(super) slot_save: Option<bool>,
    pub(super) api_keys: Option<Vec<String>>,
    pub(super) allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) max_models_loaded: Option<u32>,
    pub(super) memory_threshold: Option<f64>,
    pub(super) inactivity_timeout: Option<String>,
    pub(super) unload_on_shutdown: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQueue {
    pub(super) max_waiting: Option<u32>,
    pub(super) timeout: Option<String>,
    pub(super) policy: Option<String>,
    pub(super) aging: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBuffers {
    pub(super) context: RawContextBuffer,
    pub(super) working: RawWorkingBuffer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawContextBuffer {
    pub(super) initial: Option<u32>,
    pub(super) max: Option<u32>,
    pub(super) compression_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWorkingBuffer {
    pub(super) initial: Option<u32>,
    pub(super) max: Option<u32>,
    pub(super) optimization_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPressure {
    pub(super) warning: Option<f64>,
    pub(super) critical: Option<f64>,
    pub(super) action: Option<String>,
    pub(super) hysteresis: Option<f64>,
    pub(super) sample_interval: Option<String>,
    pub(super) gpu: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCompaction {
    pub(super) on_overflow: Option<String>,
    pub(super) summarizer_provider: Option<String>,
    pub(super) summarizer_model: Option<String>,
    pub(super) summarizer_timeout: Option<String>,
    pub(super) summary_max_tokens: Option<u32>,
    pub(super) keep_recent_share: Option<f64>,
    pub(super) reply_reserve: Option<u32>,
    pub(super) cache_dir: Option<String>,
    pub(super) cache_entries: Option<u32>,
    pub(super) normalize_num_ctx: Option<bool>,
    pub(super) tokenizer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawModel {
    pub(super) inactivity_timeout: Option<String>,
    pub(super) pinned: Option<bool>,
    pub(super) memory: Option<String>,
    pub(super) tokenizer: Option<String>,
    pub(super) context_window: Option<u32>,
    pub(super) compression_threshold: Option<f64>,
    pub(super) on_overflow: Option<String>,
}
