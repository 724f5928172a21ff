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

/// `Content-Type` of `/metrics`.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `model` label of requests for models the provider does not list (see the module doc).
pub const UNLISTED_MODEL: &str = "_unlisted";

/// Every inspected endpoint's label (`providers::Endpoint::label`), and `other` for one added
/// later and not listed here yet.
pub const ENDPOINTS: [&str; 20] = [
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
    "v1_responses",
    "v1_messages",
    // Ollama's OpenAI audio transcription (`proxy::multipart`).
    "v1_audio_transcriptions",
    // The LM Studio SDK's `predict` channel and `embedString` call on its WebSocket
    // (`proxy::sdk_watch`).
    "sdk_predict",
    "sdk_embed",
    "other",
];

/// Status classes of the answer the client got; `none` when it left before one was sent.
pub const STATUS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Error kinds: `ProxyError::kind()` (errors the proxy wrote) and three for failures the
/// provider reported (an error status, an error inside a 200 stream, a stream cut off).
pub const ERROR_KINDS: [&str; 25] = [
    "invalid_api_key",
    "host_not_allowed",
    "body_too_large",
    "body_read",
    "body_timeout",
    "invalid_body",
    "unsupported_content_encoding",
    "invalid_target",
    "upstream_unreachable",
    "upstream_failed",
    "upstream_timeout",
    "no_node",
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
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Load buckets (seconds): from a warm page cache to a large model off a slow disk.
pub(crate) const LOAD_BUCKETS: &[f64] = &[
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
    pub(crate) fn read(&self) -> HistogramValue {
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
pub(crate) struct HistogramValue {
    pub(crate) sum: f64,
    pub(crate) count: u64,
    pub(crate) buckets: Vec<(f64, u64)>,
}

// === impl ProviderMetrics ===

/// What one provider records as events happen. Shared by its models' counters (an `Arc`
/// taken once per model, not per request), its listener and its lifecycle actor.
#[derive(Debug)]
pub struct ProviderMetrics {
    pub name: Box<str>,
    /// Time to the first body chunk from the provider, and to the end, per endpoint.
    pub(crate) first_chunk: [Histogram; ENDPOINTS.len()],
    pub(crate) duration: [Histogram; ENDPOINTS.len()],
    pub(crate) errors: [AtomicU64; ERROR_KINDS.len()],
    /// Load durations per model: written once per load (rare), so a plain mutex.
    pub(crate) loads: Mutex<BTreeMap<Box<str>, Histogram>>,
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
pub struct PressureCounters(pub(crate) [AtomicU64; PRESSURE_ACTIONS.len()]);

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
            "/v1/responses",
            "/v1/messages",
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
