//! The `GET /metrics` page (Prometheus text format 0.0.4, encoded by `prometheus-client`):
//! what the recorders of `crate::metrics` counted, and what the proxy's state already knows
//! (per-model counters, the lifecycle's table, the memory table, the monitor's snapshot),
//! read at scrape time.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::lifecycle::{ModelStatus, ModelView};
use crate::metrics::*;
use crate::state::AppState;
use crate::stats::ModelSnapshot;

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
    /// The fronts' nodes: `(pool, node, up, routed by reason, retries, in flight)`.
    nodes: Vec<NodeRow>,
}

#[derive(Debug)]
struct NodeRow {
    pool: String,
    node: String,
    up: bool,
    routed: Vec<(&'static str, u64)>,
    retries: u64,
    in_flight: u64,
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
    let nodes = state
        .pools
        .iter()
        .flat_map(|pool| {
            pool.nodes.iter().map(|n| NodeRow {
                pool: pool.config.name.clone(),
                node: n.config.name.clone(),
                up: n.up(),
                routed: n.routed_counts().collect(),
                retries: n.retries.load(Relaxed),
                in_flight: n.in_flight.load(Relaxed),
            })
        })
        .collect();
    Scrape {
        nodes,
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
    into.prunes += from.prunes;
    into.pruned_tokens += from.pruned_tokens;
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
        // --- pools (fronts) ---
        if !self.nodes.is_empty() {
            Self::family(
                e,
                "llm_warden_pool_node_up",
                "Whether a pool's node is in rotation (1: its view answered) or not (0).",
                Gauge,
                |m| {
                    for n in &self.nodes {
                        gauge(m, &[("pool", &n.pool), ("node", &n.node)], u64::from(n.up))?;
                    }
                    Ok(())
                },
            )?;
            Self::family(
                e,
                "llm_warden_pool_routed",
                "Requests a front sent to a node, by why the picker chose it.",
                Counter,
                |m| {
                    for n in &self.nodes {
                        for (reason, v) in &n.routed {
                            let labels = [
                                ("pool", n.pool.as_str()),
                                ("node", &n.node),
                                ("reason", reason),
                            ];
                            counter(m, &labels, *v)?;
                        }
                    }
                    Ok(())
                },
            )?;
            Self::family(
                e,
                "llm_warden_pool_retries",
                "Requests a node refused (503/429) or could not take, then tried on the next node.",
                Counter,
                |m| {
                    for n in &self.nodes {
                        counter(m, &[("pool", &n.pool), ("node", &n.node)], n.retries)?;
                    }
                    Ok(())
                },
            )?;
            Self::family(
                e,
                "llm_warden_pool_in_flight",
                "Answers a front is relaying from a node now.",
                Gauge,
                |m| {
                    for n in &self.nodes {
                        gauge(m, &[("pool", &n.pool), ("node", &n.node)], n.in_flight)?;
                    }
                    Ok(())
                },
            )?;
        }
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
        self.per_model(
            e,
            "llm_warden_compaction_prunes",
            "Of those compactions, requests the prune step shortened (repeated content and answered images out of the older turns).",
            Counter,
            |r| Some(r.counters.prunes),
        )?;
        self.per_model(
            e,
            "llm_warden_compaction_pruned_tokens",
            "Prompt tokens the prune step removed (estimated; part of the tokens saved).",
            Counter,
            |r| Some(r.counters.pruned_tokens),
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
