//! The node view: a compact, machine-readable account of one node for a front that routes
//! among nodes (`GET /node` on the admin listener; `GET /node?watch=1` streams it as SSE).
//!
//! Per provider: its models with state, leases in flight, requests queued, the options
//! they are loaded with, the memory admission counts for them, pinned; the provider's
//! limits (`max_models_loaded`, the memory budget); and the node's memory as the monitor
//! sees it. `format` says which shape this is ([`FORMAT`]; a front refuses a newer major
//! one), `seq` a number that rises whenever the view may have changed.
//!
//! Decisions, and why:
//! - **One owner per fact; no copy.** The view is built on each read from what the owners
//!   publish: the lifecycle actors' tables (`LifecycleHandle::snapshot`, one round trip
//!   per provider, and the published runner options), the monitor's latest sample, the
//!   config in force and the upstream's health. Nothing here stores a model's state.
//! - **The change signal comes from the owners.** [`crate::changes::Changes`] is rung by
//!   each lifecycle actor when what it publishes for the view changed (a hash of its table's
//!   routing facts after every event) and by the monitor's new samples (forwarded from its
//!   `watch` channel: [`ring_on_samples`]); the lease fast path, whose in-flight changes the
//!   actor never hears of, only wakes it, and counts them in the lifecycle's use sequence,
//!   which it bumps anyway (no second shared counter per request). `seq` is the sum
//!   ([`seq`]), read before the view is built, so the view is at least as new as its `seq`.
//!   Free memory changes only when the monitor samples (`memory_pressure.sample_interval`):
//!   that fact is a poller's by nature.
//! - **`seq` may rise without a visible change** (a lease taken and given back between two
//!   reads; a provider poll stamps the models it lists; every memory sample). A poller that sees the same `seq` knows nothing changed; the SSE stream
//!   compares what it built and sends an event only when the view differs.
//! - **The stream coalesces**: after an event it waits [`MIN_EVENT_GAP`] before the next,
//!   so a busy node sends at most ten events a second, each with the latest view; a
//!   comment line every [`KEEP_ALIVE`] keeps proxies and the front's read timeout content.
//! - **Leases, not the proxy's in-flight counter**, are `in_flight`: a lease is a request
//!   the provider is answering; requests waiting for a load or for room are `queued`.
//! - **Memory is what admission reads**: `total_mb` and `available_mb` add RAM and every
//!   GPU as `MemoryProbe for MonitorHandle` does, and `memory_budget_mb` is
//!   `total × memory_threshold`, the budget the actor's eviction policy applies.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::changes::Changes;
use crate::lifecycle::ModelStatus;
use crate::monitor::MonitorHandle;
use crate::state::AppState;

/// The view's format. A front reads views of this format; fields may be added without a
/// new number (readers ignore unknown fields), a change of meaning takes one.
pub const FORMAT: u32 = 1;

/// The least time between two SSE events of `/node?watch=1`.
pub const MIN_EVENT_GAP: Duration = Duration::from_millis(100);
/// How often the SSE stream sends a comment line when nothing changed.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One node, as `GET /node` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// [`FORMAT`].
    pub format: u32,
    /// Rises whenever the view may have changed (never falls while the node runs; a
    /// restarted node starts again low: compare `started_at` too).
    pub seq: u64,
    /// When this node started (RFC 3339): a new value means a new `seq` series.
    pub started_at: String,
    /// llm-warden's version.
    pub version: String,
    pub memory: NodeMemory,
    pub providers: Vec<ProviderView>,
}

/// The node's memory, as the monitor last sampled it (MiB).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeMemory {
    /// RAM and every GPU together: what admission divides by `memory_threshold`.
    pub total_mb: u64,
    /// Free for new allocations: available RAM plus every GPU's free memory.
    pub available_mb: u64,
    pub ram_total_mb: u64,
    pub ram_available_mb: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuView>,
    /// `normal`, `warning` or `critical`.
    pub pressure_level: String,
    /// When the sample was taken (empty before the first one).
    pub sampled_at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    pub index: u32,
    pub total_mb: u64,
    pub free_mb: u64,
}

/// One provider of the node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderView {
    pub name: String,
    /// `ollama`, `lmstudio` or `llamacpp`.
    pub kind: String,
    /// The provider listener's address on the node (a front matches its node `url` to it).
    pub listen: String,
    /// Whether the last poll of the upstream answered.
    pub reachable: bool,
    /// Whether the lifecycle manages its models (false: a llama-server with one model).
    pub managed: bool,
    pub max_models_loaded: u32,
    /// What loaded models may take together (`memory_threshold` × `memory.total_mb`);
    /// null before the first memory sample.
    pub memory_budget_mb: Option<u64>,
    /// Requests waiting for any model of this provider.
    pub queued: u32,
    /// By name.
    pub models: Vec<ModelEntry>,
}

/// One model the provider's lifecycle knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub model: String,
    /// `unloaded`, `loading`, `ready`, `unloading` or `error`.
    pub state: ModelStatus,
    /// Leases out: requests the provider is answering for it.
    pub in_flight: u32,
    /// Requests waiting for it (to load, or for room).
    pub queued: u32,
    /// The context window it runs (or last ran) with, tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// Runner options the proxy loaded it with, when not the provider's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ctx: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_batch: Option<u64>,
    /// What admission counts for it (config `memory`, else the provider's size).
    pub memory_mb: Option<u64>,
    pub pinned: bool,
    /// The node's use stamp: smaller = less recently used, among this provider's models
    /// only (the order the node evicts idle models in).
    pub last_used: u64,
}

impl NodeView {
    /// The provider named `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderView> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The same view with `seq` zeroed: what the stream compares.
    fn content(&self) -> NodeView {
        NodeView {
            seq: 0,
            ..self.clone()
        }
    }
}

impl ProviderView {
    /// The entry of `model`, if the provider's lifecycle knows it.
    pub fn model(&self, model: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.model == model)
    }
}

/// The memory part, from one monitor sample.
pub fn memory_of(s: &crate::monitor::Snapshot) -> NodeMemory {
    let ram_available = s.total_memory_mb.saturating_sub(s.used_memory_mb);
    let gpu_total: u64 = s.gpu_memory.iter().map(|g| g.total_mb).sum();
    let gpu_free: u64 = s.gpu_memory.iter().map(|g| g.free_mb).sum();
    let level = serde_json::to_value(s.pressure_level)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    NodeMemory {
        total_mb: s.total_memory_mb + gpu_total,
        available_mb: ram_available + gpu_free,
        ram_total_mb: s.total_memory_mb,
        ram_available_mb: ram_available,
        gpus: s
            .gpu_memory
            .iter()
            .map(|g| GpuView {
                index: g.index,
                total_mb: g.total_mb,
                free_mb: g.free_mb,
            })
            .collect(),
        pressure_level: level,
        sampled_at: s.sampled_at.clone(),
    }
}

/// One provider's part, from its lifecycle's views (the actor's snapshot) and the runner
/// options it published; `runner` answers those by model name.
pub fn provider_of(
    head: ProviderHead,
    memory_threshold: f64,
    memory: &NodeMemory,
    views: Vec<crate::lifecycle::ModelView>,
    runner: impl Fn(&str) -> Option<crate::lifecycle::Shape>,
) -> ProviderView {
    let mut models: Vec<ModelEntry> = views
        .into_iter()
        .map(|v| {
            let shape = runner(&v.model).unwrap_or_default();
            ModelEntry {
                state: v.status,
                in_flight: v.leases,
                queued: v.queue_depth,
                context_length: v.context_length,
                num_ctx: shape.num_ctx,
                num_batch: shape.num_batch,
                memory_mb: v.memory_estimate_mb,
                pinned: v.pinned,
                last_used: v.last_used,
                model: v.model,
            }
        })
        .collect();
    models.sort_by(|a, b| a.model.cmp(&b.model));
    ProviderView {
        queued: models.iter().map(|m| m.queued).sum(),
        memory_budget_mb: (memory.total_mb > 0)
            .then_some((memory.total_mb as f64 * memory_threshold) as u64),
        name: head.name,
        kind: head.kind,
        listen: head.listen,
        reachable: head.reachable,
        managed: head.managed,
        max_models_loaded: head.max_models_loaded,
        models,
    }
}

/// What a provider's part says that its lifecycle does not.
#[derive(Clone, Debug)]
pub struct ProviderHead {
    pub name: String,
    pub kind: String,
    pub listen: String,
    pub reachable: bool,
    pub managed: bool,
    pub max_models_loaded: u32,
}

/// The view's `seq`: the owners' change counter plus every provider's use sequence (the
/// lease fast path's changes, which it counts there and does not ring).
pub fn seq(state: &AppState) -> u64 {
    state.providers.iter().fold(state.changes.seq(), |n, p| {
        n.wrapping_add(p.lifecycle.uses())
    })
}

/// The node's view now. `seq` is read first, so the view is at least as new as it.
pub async fn build(state: &AppState) -> NodeView {
    let seq = seq(state);
    let memory = memory_of(&state.monitor.latest());
    let mut providers = Vec::with_capacity(state.providers.len());
    for p in state.providers.iter() {
        let views = p.lifecycle.snapshot().await;
        let head = ProviderHead {
            name: p.config.name.clone(),
            kind: p.config.kind.as_str().to_string(),
            listen: p.listen.to_string(),
            reachable: p.reachable(),
            managed: p.managed(),
            max_models_loaded: p.config.max_models_loaded,
        };
        providers.push(provider_of(
            head,
            p.config.memory_threshold,
            &memory,
            views,
            |m| p.lifecycle.runner(m),
        ));
    }
    NodeView {
        format: FORMAT,
        seq,
        started_at: state.started_at.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        memory,
        providers,
    }
}

/// Rings `changes` on each new monitor sample until the monitor or `stop` ends: free
/// memory is in the view, and the monitor publishes it on its own `watch` channel.
pub async fn ring_on_samples(
    monitor: MonitorHandle,
    changes: Arc<Changes>,
    mut stop: watch::Receiver<bool>,
) {
    let mut samples = monitor.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = samples.changed() => match r {
                Ok(()) => changes.ring(),
                Err(_) => break,
            },
        }
    }
}

/// The SSE stream of `/node?watch=1`: one `data:` event with the whole view at once, then
/// one each time it changed (at most one per [`MIN_EVENT_GAP`]), a `: keep-alive` comment
/// every [`KEEP_ALIVE`] without one, until the client leaves or the node stops. Frames go
/// to `out`; the task ends when its receiver is dropped.
pub async fn stream(
    state: Arc<AppState>,
    out: tokio::sync::mpsc::Sender<bytes::Bytes>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sent: Option<NodeView> = None;
    // When the last bytes went out: the keep-alive counts from there, however often the
    // stream wakes without a change to send.
    let mut last_out = tokio::time::Instant::now();
    loop {
        let view = build(&state).await;
        let seen = view.seq;
        let content = view.content();
        if sent.as_ref() != Some(&content) {
            if out.send(sse_event(&view)).await.is_err() {
                return;
            }
            last_out = tokio::time::Instant::now();
            sent = Some(content);
            // Coalesce: whatever changes meanwhile goes in the next event.
            tokio::select! {
                _ = tokio::time::sleep(MIN_EVENT_GAP) => {}
                _ = out.closed() => return,
                _ = stopped(&mut stop) => return,
            }
        }
        tokio::select! {
            _ = state.changes.wait_for(|| (seq(&state) != seen).then_some(())) => {}
            _ = tokio::time::sleep_until(last_out + KEEP_ALIVE) => {
                if out.send(bytes::Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                    return;
                }
                last_out = tokio::time::Instant::now();
            }
            _ = out.closed() => return,
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Until `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// One SSE event carrying `view` as JSON (one line: JSON escapes newlines in strings).
pub fn sse_event(view: &NodeView) -> bytes::Bytes {
    let json = serde_json::to_string(view).unwrap_or_else(|_| "{}".to_string());
    bytes::Bytes::from(format!("id: {}\ndata: {json}\n\n", view.seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{ModelView, Shape};

    fn view(model: &str, status: ModelStatus, leases: u32, queued: u32) -> ModelView {
        ModelView {
            model: model.to_string(),
            status,
            platform: "ollama",
            leases,
            queue_depth: queued,
            load_time_ms: None,
            context_length: Some(8192),
            loads: 1,
            unloads: 0,
            memory_estimate_mb: Some(4096),
            inactivity_timeout_s: Some(300.0),
            pinned: false,
            last_used: 7,
            unloads_in_s: None,
            loaded_by: None,
            last_error: None,
        }
    }

    fn head() -> ProviderHead {
        ProviderHead {
            name: "ollama0".into(),
            kind: "ollama".into(),
            listen: "127.0.0.1:11434".into(),
            reachable: true,
            managed: true,
            max_models_loaded: 2,
        }
    }

    fn sample() -> crate::monitor::Snapshot {
        crate::monitor::Snapshot {
            total_memory_mb: 32_768,
            used_memory_mb: 8_192,
            gpu_memory: vec![crate::monitor::GpuMemory {
                index: 0,
                name: "gpu".into(),
                total_mb: 24_576,
                used_mb: 4_096,
                free_mb: 20_480,
            }],
            sampled_at: "2026-12-06T22:00:00.000Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn memory_adds_ram_and_gpus_as_admission_does() {
        let m = memory_of(&sample());
        assert_eq!(m.total_mb, 32_768 + 24_576);
        assert_eq!(m.available_mb, (32_768 - 8_192) + 20_480);
        assert_eq!((m.ram_total_mb, m.ram_available_mb), (32_768, 24_576));
        assert_eq!(m.gpus[0].free_mb, 20_480);
        assert_eq!(m.pressure_level, "normal");
        // The admission side reads the same numbers (bytes).
        let probe_total = (32_768u64 + 24_576) << 20;
        assert_eq!(m.total_mb << 20, probe_total);
    }

    #[test]
    fn a_provider_part_carries_state_leases_queue_options_and_budget() {
        let memory = memory_of(&sample());
        let p = provider_of(
            head(),
            0.5,
            &memory,
            vec![
                view("zeta", ModelStatus::Loading, 0, 3),
                view("alpha", ModelStatus::Ready, 2, 1),
            ],
            |m| {
                (m == "alpha").then_some(Shape {
                    num_ctx: Some(4096),
                    num_batch: None,
                })
            },
        );
        let names: Vec<&str> = p.models.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"], "sorted by name");
        let a = p.model("alpha").expect("alpha");
        assert_eq!(
            (a.state, a.in_flight, a.queued, a.num_ctx, a.num_batch),
            (ModelStatus::Ready, 2, 1, Some(4096), None)
        );
        assert_eq!(a.memory_mb, Some(4096));
        assert_eq!(p.model("zeta").map(|m| m.state), Some(ModelStatus::Loading));
        assert_eq!(p.queued, 4, "the provider's queue is its models' together");
        assert_eq!(p.memory_budget_mb, Some((32_768 + 24_576) / 2));
        assert_eq!(p.max_models_loaded, 2);
    }

    #[test]
    fn no_budget_before_the_first_sample() {
        let p = provider_of(head(), 0.9, &NodeMemory::default(), vec![], |_| None);
        assert_eq!(p.memory_budget_mb, None);
    }

    #[test]
    fn the_view_round_trips_through_json_and_events_are_one_line() {
        let memory = memory_of(&sample());
        let v = NodeView {
            format: FORMAT,
            seq: 42,
            started_at: "2026-12-06T21:00:00.000Z".into(),
            version: "0.1.0".into(),
            providers: vec![provider_of(
                head(),
                0.8,
                &memory,
                vec![view("alpha", ModelStatus::Ready, 1, 0)],
                |_| None,
            )],
            memory,
        };
        let json = serde_json::to_value(&v).expect("serializes");
        assert_eq!(json["providers"][0]["models"][0]["state"], "ready");
        assert!(
            json["providers"][0]["models"][0].get("num_ctx").is_none(),
            "defaults are left out"
        );
        let back: NodeView = serde_json::from_value(json).expect("parses");
        assert_eq!(back, v);
        let ev = sse_event(&v);
        let text = std::str::from_utf8(&ev).expect("utf-8");
        assert!(
            text.starts_with("id: 42\ndata: {") && text.ends_with("}\n\n"),
            "{text}"
        );
        assert_eq!(
            text.matches('\n').count(),
            3,
            "one id line, one data line, a blank"
        );
        assert_eq!(v.content().seq, 0);
        assert_eq!(v.content().providers, v.providers);
    }

    /// The example in docs/metrics.md is a view this module parses, field for field.
    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("../../docs/metrics.md");
        let start = doc.find("### `GET /node`").expect("the section");
        let block = &doc[start..];
        let json = block
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a json block");
        let v: NodeView = serde_json::from_str(json).expect("the example parses");
        let back = serde_json::to_value(&v).expect("serializes");
        let doc_value: serde_json::Value = serde_json::from_str(json).expect("json");
        assert_eq!(back, doc_value, "no field the types lack or add");
    }
}
