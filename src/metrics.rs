//! Prometheus metrics: every name, the few numbers recorded where events happen, and the
//! `GET /metrics` page of the admin listener (Prometheus text format 0.0.4, encoded by
//! `prometheus-client`).
//!
//! Most numbers already exist in the proxy's state (per-model counters in `stats`, the
//! lifecycle's table, the memory table, the monitor's snapshot) and are read at scrape time.
//! Only what no state keeps is recorded on the way: per-request latency histograms and
//! requests by endpoint and status (atomics in fixed arrays indexed by endpoint, no lock and
//! no allocation per request), load durations (a lock per load), errors by kind and pressure
//! actions (atomics).
//!
//! Cardinality: labels are provider (configured), endpoint and status class (fixed lists),
//! kind and action (fixed lists) and model. A model gets its own series once its provider
//! listed it (catalogue, loaded list), the lifecycle knows it, or it answered a request with
//! a 2xx; requests for models the provider does not have are counted under
//! [`UNLISTED_MODEL`], so clients naming arbitrary models cannot grow the page.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::app::AppState;
use crate::lifecycle::{ModelStatus, ModelView};
use crate::stats::ModelSnapshot;

/// `Content-Type` of `/metrics`.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `model` label of requests for models the provider does not list (see the module doc).
pub const UNLISTED_MODEL: &str = "_unlisted";

/// Every inspected endpoint's label (`providers::Endpoint::label`), and `other` for one added
/// later and not listed here yet.
pub const ENDPOINTS: [&str; 15] = [
    "api_chat",
    "api_generate",
    "api_embed",
    "api_embeddings",
    "v1_chat_completions",
    "v1_completions",
    "v1_embeddings",
    "v0_chat_completions",
    "v0_completions",
    "v0_embeddings",
    "v1_chat",
    "completion",
    "infill",
    "embedding",
    "other",
];

/// Status classes of the answer the client got; `none` when it left before one was sent.
pub const STATUS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Error kinds: `ProxyError::kind()` (errors the proxy wrote) and three for failures the
/// provider reported (an error status, an error inside a 200 stream, a stream cut off).
pub const ERROR_KINDS: [&str; 20] = [
    "invalid_api_key",
    "body_too_large",
    "body_read",
    "invalid_target",
    "upstream_unreachable",
    "upstream_failed",
    "upstream_timeout",
    "context_length_exceeded",
    "queue_full",
    "queue_timeout",
    "model_not_found",
    "load_failed",
    "unload_failed",
    "model_too_large",
    "shutting_down",
    "lifecycle_off",
    "upstream_status",
    "stream_error",
    "stream_aborted",
    "other",
];

/// Pressure response actions (`monitor::respond`), as labels.
pub const PRESSURE_ACTIONS: [&str; 4] = ["compress_on", "compress_off", "unload", "cache"];

/// Latency buckets (seconds): a local model answers in milliseconds to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Load buckets (seconds): from a warm page cache to a large model off a slow disk.
const LOAD_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// The index of an endpoint label in [`ENDPOINTS`] (`other` when not listed).
pub fn endpoint_index(label: &str) -> usize {
    ENDPOINTS
        .iter()
        .position(|l| *l == label)
        .unwrap_or(ENDPOINTS.len() - 1)
}

/// The index of an HTTP status in [`STATUS`]; 0 = no status was sent.
pub fn status_index(code: u16) -> usize {
    match code {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

// === impl Histogram ===

/// A fixed-bucket histogram of durations: one atomic add for the bucket, one for the sum.
/// The count is the sum of the buckets (read at scrape).
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds; the last count is the overflow (`+Inf`).
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Sum (seconds), count, and per-bucket (not cumulative) counts with their bounds.
    fn read(&self) -> HistogramValue {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Relaxed)))
            .collect();
        HistogramValue {
            sum: self.sum_ns.load(Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

#[derive(Debug, Clone)]
struct HistogramValue {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

// === impl ProviderMetrics ===

/// What one provider records as events happen. Shared by its models' counters (an `Arc`
/// taken once per model, not per request), its listener and its lifecycle actor.
#[derive(Debug)]
pub struct ProviderMetrics {
    pub name: Box<str>,
    /// Time to the first body chunk from the provider, and to the end, per endpoint.
    first_chunk: [Histogram; ENDPOINTS.len()],
    duration: [Histogram; ENDPOINTS.len()],
    errors: [AtomicU64; ERROR_KINDS.len()],
    /// Load durations per model: written once per load (rare), so a plain mutex.
    loads: Mutex<BTreeMap<Box<str>, Histogram>>,
}

impl Default for ProviderMetrics {
    fn default() -> Self {
        ProviderMetrics::new("")
    }
}

impl ProviderMetrics {
    pub fn new(name: &str) -> Self {
        ProviderMetrics {
            name: name.into(),
            first_chunk: std::array::from_fn(|_| Histogram::new(LATENCY_BUCKETS)),
            duration: std::array::from_fn(|_| Histogram::new(LATENCY_BUCKETS)),
            errors: Default::default(),
            loads: Mutex::new(BTreeMap::new()),
        }
    }

    /// A finished request on endpoint `endpoint` (index in [`ENDPOINTS`]).
    pub fn observe_request(&self, endpoint: usize, first_chunk: Option<Duration>, total: Duration) {
        if let Some(d) = first_chunk {
            self.first_chunk[endpoint].observe(d);
        }
        self.duration[endpoint].observe(total);
    }

    /// An error of kind `kind` (one of [`ERROR_KINDS`]; anything else counts as `other`).
    pub fn error(&self, kind: &str) {
        let i = ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(ERROR_KINDS.len() - 1);
        self.errors[i].fetch_add(1, Relaxed);
    }

    /// A load of `model` that took `took`.
    pub fn observe_load(&self, model: &str, took: Duration) {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = loads.get(model) {
            h.observe(took);
        } else {
            let h = Histogram::new(LOAD_BUCKETS);
            h.observe(took);
            loads.insert(model.into(), h);
        }
    }
}

/// How often the memory-pressure response acted, by action.
#[derive(Debug, Default)]
pub struct PressureCounters([AtomicU64; PRESSURE_ACTIONS.len()]);

impl PressureCounters {
    /// `action` as `monitor::respond` names it (`compress on`, `compress off`, `unload`,
    /// `cache`).
    pub fn record(&self, action: &str) {
        let i = match action {
            "compress on" => 0,
            "compress off" => 1,
            "unload" => 2,
            _ => 3,
        };
        self.0[i].fetch_add(1, Relaxed);
    }
}

// === the scrape ===

/// One model's numbers, from every table that knows it.
#[derive(Debug, Default)]
struct ModelRow {
    counters: ModelSnapshot,
    view: Option<ModelView>,
    memory: Option<crate::memory::Allocation>,
    loads: Option<HistogramValue>,
}

/// Everything one scrape shows, read from the state first (the lifecycle answers
/// asynchronously) and encoded after.
#[derive(Debug)]
struct Scrape {
    /// `(provider, reachable, errors by kind, first-chunk and total histograms by endpoint)`.
    providers: Vec<ProviderRow>,
    /// By `(provider index, model)`.
    models: BTreeMap<(usize, String), ModelRow>,
    system: crate::monitor::Snapshot,
    pressure_actions: [u64; PRESSURE_ACTIONS.len()],
}

#[derive(Debug)]
struct ProviderRow {
    name: String,
    up: bool,
    errors: [u64; ERROR_KINDS.len()],
    first_chunk: Vec<HistogramValue>,
    duration: Vec<HistogramValue>,
}

/// The `/metrics` page.
pub async fn render(state: &AppState) -> String {
    let scrape = gather(state).await;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

async fn gather(state: &AppState) -> Scrape {
    let mut models: BTreeMap<(usize, String), ModelRow> = BTreeMap::new();
    let index = |name: &str| state.providers.iter().position(|p| p.config.name == name);
    for counters in state.stats.snapshot() {
        let Some(i) = index(&counters.provider) else {
            continue;
        };
        let key = (i, counters.model.clone());
        models.entry(key).or_default().counters = counters;
    }
    for (i, p) in state.providers.iter().enumerate() {
        for view in p.lifecycle.snapshot().await {
            let row = models.entry((i, view.model.clone())).or_default();
            if row.counters.model.is_empty() {
                row.counters = ModelSnapshot::empty(&p.config.name, &view.model);
            }
            row.view = Some(view);
        }
        let loads = state.stats.provider(i).loads.lock().map(|l| {
            l.iter()
                .map(|(m, h)| (m.to_string(), h.read()))
                .collect::<Vec<_>>()
        });
        for (m, h) in loads.unwrap_or_default() {
            let row = models.entry((i, m.clone())).or_default();
            if row.counters.model.is_empty() {
                row.counters = ModelSnapshot::empty(&p.config.name, &m);
            }
            row.loads = Some(h);
        }
    }
    for ((i, model), row) in models.iter_mut() {
        row.memory = state.memory.allocation(*i, model);
    }
    // Fold the models nobody listed into one row per provider.
    let mut unlisted: BTreeMap<usize, ModelRow> = BTreeMap::new();
    models.retain(|(i, model), row| {
        let listed = row.view.is_some()
            || row.loads.is_some()
            || row.memory.is_some()
            || row.counters.loaded.is_some_and(|l| l)
            || state.memory.listed(*i, model)
            || row
                .counters
                .requests_by_endpoint
                .iter()
                .any(|(_, s, n)| *s == "2xx" && *n > 0);
        if !listed {
            let into = unlisted.entry(*i).or_default();
            merge_unlisted(&mut into.counters, &row.counters);
        }
        listed
    });
    for (i, mut row) in unlisted {
        row.counters.provider = state.providers[i].config.name.clone();
        row.counters.model = UNLISTED_MODEL.to_string();
        models.insert((i, UNLISTED_MODEL.to_string()), row);
    }
    let providers = state
        .providers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let m = state.stats.provider(i);
            ProviderRow {
                name: p.config.name.clone(),
                up: p.reachable(),
                errors: std::array::from_fn(|k| m.errors[k].load(Relaxed)),
                first_chunk: m.first_chunk.iter().map(Histogram::read).collect(),
                duration: m.duration.iter().map(Histogram::read).collect(),
            }
        })
        .collect();
    Scrape {
        providers,
        models,
        system: state.monitor.latest(),
        pressure_actions: std::array::from_fn(|k| state.pressure_counters.0[k].load(Relaxed)),
    }
}

/// Adds the counters of an unlisted model to the provider's `_unlisted` row.
fn merge_unlisted(into: &mut ModelSnapshot, from: &ModelSnapshot) {
    into.active_requests += from.active_requests;
    into.cancelled += from.cancelled;
    into.prompt_tokens += from.prompt_tokens;
    into.completion_tokens += from.completion_tokens;
    into.compactions += from.compactions;
    into.tokens_saved += from.tokens_saved;
    for (e, s, n) in &from.requests_by_endpoint {
        match into
            .requests_by_endpoint
            .iter_mut()
            .find(|(e2, s2, _)| e2 == e && s2 == s)
        {
            Some(r) => r.2 += n,
            None => into.requests_by_endpoint.push((e, s, *n)),
        }
    }
}

// === impl Collector for Scrape ===

type Result = std::result::Result<(), std::fmt::Error>;

fn counter(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], v: u64) -> Result {
    m.encode_family(&labels)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    m: &mut MetricEncoder<'_>,
    labels: &[(&str, &str)],
    v: V,
) -> Result {
    m.encode_family(&labels)?.encode_gauge(&v)
}

fn histogram(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], h: &HistogramValue) -> Result {
    m.encode_family(&labels)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

const MIB: u64 = 1 << 20;

impl Scrape {
    /// One family: its `# HELP` / `# TYPE` lines, then every sample `each` writes.
    fn family(
        e: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        kind: MetricType,
        each: impl FnOnce(&mut MetricEncoder<'_>) -> Result,
    ) -> Result {
        let mut m = e.encode_descriptor(name, help, None, kind)?;
        each(&mut m)
    }

    fn per_model(
        &self,
        e: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        kind: MetricType,
        value: impl Fn(&ModelRow) -> Option<u64>,
    ) -> Result {
        Self::family(e, name, help, kind, |m| {
            for row in self.models.values() {
                if let Some(v) = value(row) {
                    let labels = [
                        ("provider", row.counters.provider.as_str()),
                        ("model", row.counters.model.as_str()),
                    ];
                    match kind {
                        MetricType::Counter => counter(m, &labels, v)?,
                        _ => gauge(m, &labels, v)?,
                    }
                }
            }
            Ok(())
        })
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result {
        use MetricType::{Counter, Gauge, Histogram as Hist};
        let e = &mut e;
        // --- providers ---
        Self::family(
            e,
            "llm_warden_provider_up",
            "Whether the provider answered its last poll or request (1) or not (0).",
            Gauge,
            |m| {
                for p in &self.providers {
                    gauge(m, &[("provider", &p.name)], u64::from(p.up))?;
                }
                Ok(())
            },
        )?;
        // --- requests ---
        Self::family(
            e,
            "llm_warden_requests",
            "Model requests that ended, by provider, model, endpoint and status class of the answer (none: the client left before one).",
            Counter,
            |m| {
                for row in self.models.values() {
                    let c = &row.counters;
                    for (endpoint, status, n) in &c.requests_by_endpoint {
                        let labels = [
                            ("provider", c.provider.as_str()),
                            ("model", c.model.as_str()),
                            ("endpoint", endpoint),
                            ("status", status),
                        ];
                        counter(m, &labels, *n)?;
                    }
                }
                Ok(())
            },
        )?;
        self.per_model(
            e,
            "llm_warden_requests_in_flight",
            "Model requests being answered now (until the response ends or the client leaves).",
            Gauge,
            |r| Some(r.counters.active_requests),
        )?;
        self.per_model(
            e,
            "llm_warden_requests_cancelled",
            "Model requests whose client went away before the response ended.",
            Counter,
            |r| Some(r.counters.cancelled),
        )?;
        self.per_model(
            e,
            "llm_warden_queue_depth",
            "Requests waiting for the model (to load, or for room).",
            Gauge,
            |r| r.view.as_ref().map(|v| u64::from(v.queue_depth)),
        )?;
        Self::family(
            e,
            "llm_warden_errors",
            "Failed requests by kind: errors the proxy answered itself, and failures the provider reported (upstream_status, stream_error, stream_aborted).",
            Counter,
            |m| {
                for p in &self.providers {
                    for (kind, n) in ERROR_KINDS.iter().zip(p.errors) {
                        if n > 0 {
                            counter(m, &[("provider", &p.name), ("kind", kind)], n)?;
                        }
                    }
                }
                Ok(())
            },
        )?;
        for (name, help, first) in [
            ("llm_warden_time_to_first_chunk_seconds", "From the request's arrival to the first body chunk from the provider (requests the provider answered).", true),
            ("llm_warden_request_duration_seconds", "From the request's arrival to the end of its response (or the client leaving).", false),
        ] {
            Self::family(e, name, help, Hist, |m| {
                for p in &self.providers {
                    let hs = if first { &p.first_chunk } else { &p.duration };
                    for (endpoint, h) in ENDPOINTS.iter().zip(hs) {
                        if h.count > 0 {
                            histogram(m, &[("provider", &p.name), ("endpoint", endpoint)], h)?;
                        }
                    }
                }
                Ok(())
            })?;
        }
        // --- tokens and compaction ---
        self.per_model(
            e,
            "llm_warden_prompt_tokens",
            "Prompt tokens as the provider reported them.",
            Counter,
            |r| Some(r.counters.prompt_tokens),
        )?;
        self.per_model(
            e,
            "llm_warden_completion_tokens",
            "Completion (reply) tokens as the provider reported them.",
            Counter,
            |r| Some(r.counters.completion_tokens),
        )?;
        self.per_model(
            e,
            "llm_warden_compactions",
            "Requests whose conversation the proxy compacted to fit the model's window.",
            Counter,
            |r| Some(r.counters.compactions),
        )?;
        self.per_model(
            e,
            "llm_warden_compaction_tokens_saved",
            "Prompt tokens those compactions removed (estimated).",
            Counter,
            |r| Some(r.counters.tokens_saved),
        )?;
        // --- lifecycle ---
        self.per_model(
            e,
            "llm_warden_model_loads",
            "Loads of the model the proxy made.",
            Counter,
            |r| r.view.as_ref().map(|v| v.loads),
        )?;
        self.per_model(
            e,
            "llm_warden_model_unloads",
            "Unloads of the model the proxy made.",
            Counter,
            |r| r.view.as_ref().map(|v| v.unloads),
        )?;
        Self::family(
            e,
            "llm_warden_model_load_duration_seconds",
            "How long the proxy's successful loads of the model took.",
            Hist,
            |m| {
                for row in self.models.values() {
                    if let Some(h) = &row.loads {
                        let c = &row.counters;
                        histogram(m, &[("provider", &c.provider), ("model", &c.model)], h)?;
                    }
                }
                Ok(())
            },
        )?;
        Self::family(
            e,
            "llm_warden_model_state",
            "The model's lifecycle state: 1 for the current one, 0 for the others.",
            Gauge,
            |m| {
                const STATES: [(ModelStatus, &str); 5] = [
                    (ModelStatus::Unloaded, "unloaded"),
                    (ModelStatus::Loading, "loading"),
                    (ModelStatus::Ready, "ready"),
                    (ModelStatus::Unloading, "unloading"),
                    (ModelStatus::Error, "error"),
                ];
                for row in self.models.values() {
                    let Some(v) = &row.view else { continue };
                    let c = &row.counters;
                    for (s, label) in STATES {
                        let labels = [
                            ("provider", c.provider.as_str()),
                            ("model", c.model.as_str()),
                            ("state", label),
                        ];
                        gauge(m, &labels, u64::from(v.status == s))?;
                    }
                }
                Ok(())
            },
        )?;
        // --- memory ---
        Self::family(
            e,
            "llm_warden_model_memory_bytes",
            "Memory a loaded model holds, by buffer: weights (model), KV cache (context), compute buffers (working); MiB resolution.",
            Gauge,
            |m| {
                for row in self.models.values() {
                    let Some(a) = &row.memory else { continue };
                    let c = &row.counters;
                    for (buffer, mb) in [
                        ("model", a.buffers.model_mb),
                        ("context", a.buffers.context_mb),
                        ("working", a.buffers.working_mb),
                    ] {
                        let labels = [
                            ("provider", c.provider.as_str()),
                            ("model", c.model.as_str()),
                            ("buffer", buffer),
                        ];
                        gauge(m, &labels, mb * MIB)?;
                    }
                }
                Ok(())
            },
        )?;
        let s = &self.system;
        let sampled = !s.sampled_at.is_empty();
        for (name, help, v) in [
            (
                "llm_warden_system_memory_total_bytes",
                "Installed RAM (MiB resolution).",
                s.total_memory_mb,
            ),
            (
                "llm_warden_system_memory_used_bytes",
                "RAM in use: total minus available, page cache not counted (MiB resolution).",
                s.used_memory_mb,
            ),
        ] {
            Self::family(e, name, help, Gauge, |m| {
                if sampled {
                    m.encode_gauge(&(v * MIB))?;
                }
                Ok(())
            })?;
        }
        for (name, help, used) in [
            (
                "llm_warden_gpu_memory_total_bytes",
                "GPU memory per device (NVML index; MiB resolution).",
                false,
            ),
            (
                "llm_warden_gpu_memory_used_bytes",
                "GPU memory allocated by processes per device (MiB resolution).",
                true,
            ),
        ] {
            Self::family(e, name, help, Gauge, |m| {
                for g in &s.gpu_memory {
                    let device = g.index.to_string();
                    let mb = if used { g.used_mb } else { g.total_mb };
                    gauge(m, &[("device", device.as_str())], mb * MIB)?;
                }
                Ok(())
            })?;
        }
        Self::family(
            e,
            "llm_warden_memory_pressure_level",
            "Memory pressure level after hysteresis: 0 normal, 1 warning, 2 critical.",
            Gauge,
            |m| {
                let level = match s.pressure_level {
                    crate::monitor::Level::Normal => 0u64,
                    crate::monitor::Level::Warning => 1,
                    crate::monitor::Level::Critical => 2,
                };
                m.encode_gauge(&level)
            },
        )?;
        Self::family(
            e,
            "llm_warden_memory_pressure_ratio",
            "Memory pressure 0..1, the worse of RAM and every GPU.",
            Gauge,
            |m| m.encode_gauge(&s.memory_pressure),
        )?;
        Self::family(
            e,
            "llm_warden_pressure_actions",
            "What the memory-pressure response did, by action.",
            Counter,
            |m| {
                for (action, n) in PRESSURE_ACTIONS.iter().zip(self.pressure_actions) {
                    counter(m, &[("action", action)], n)?;
                }
                Ok(())
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_label_is_listed() {
        use crate::providers::ProviderKind;
        let paths = [
            "/api/chat",
            "/api/generate",
            "/api/embed",
            "/api/embeddings",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/api/v0/chat/completions",
            "/api/v0/completions",
            "/api/v0/embeddings",
            "/api/v1/chat",
            "/completion",
            "/completions",
            "/infill",
            "/embedding",
            "/embeddings",
        ];
        for kind in [
            ProviderKind::Ollama,
            ProviderKind::LmStudio,
            ProviderKind::LlamaCpp,
        ] {
            for path in paths {
                if let Some(e) = kind.classify(path) {
                    assert_ne!(
                        ENDPOINTS[endpoint_index(e.label)],
                        "other",
                        "{kind:?} {path}: {}",
                        e.label
                    );
                }
            }
        }
    }

    #[test]
    fn histogram_buckets_and_sum() {
        let h = Histogram::new(LATENCY_BUCKETS);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1000));
        let v = h.read();
        assert_eq!(v.count, 3);
        assert_eq!(v.buckets[0], (0.005, 2), "a bound is inclusive (le)");
        assert_eq!(v.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((v.sum - 1000.008).abs() < 1e-9);
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            [200, 204, 404, 502, 0].map(|c| STATUS[status_index(c)]),
            ["2xx", "2xx", "4xx", "5xx", "none"]
        );
    }
}
