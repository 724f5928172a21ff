//! A pool's nodes as the front knows them: each node's latest view (read from its admin API
//! every `poll_interval`), whether it is in rotation, and what the front sent it.
//!
//! **In rotation** (`up`): a node is up once a poll answered with a view; it is out after two
//! polls in a row failed (two intervals: a node restarting or a slow answer is not dropped
//! at the first miss), or at once when the front cannot connect to it to forward a request
//! (a dead node costs one failed connect, not two intervals of retries). It comes back by
//! itself at the next poll that answers.
//!
//! **One owner per fact**: each node's view is its own node's (`fleet::view`, built there
//! from that node's owners); the front keeps the latest copy it read, replaced whole, and
//! nothing else. Its own counters (routed, retries) are the front's facts.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use super::view::{NodeView, FORMAT};
use crate::config::NodeConfig;
use crate::providers::UpstreamClient;
use crate::transport::pool::Pool;

/// The largest view the front reads (a node with thousands of models stays well under it).
const MAX_VIEW: usize = 4 << 20;

/// Polls in a row that failed before a node is out of rotation.
const MISSES_OUT: u32 = 2;

/// The labels of the routed counters: `picker::Reason`'s, in its order, `affinity` (the hash
/// chose among equals) and `other` (a request that names no model: lists aside, pass-through
/// requests and sockets, which go to the least busy node).
pub const REASONS: [&str; 8] = [
    "ready", "loading", "pending", "load", "queued", "unfit", "affinity", "other",
];

/// One node of a pool.
pub struct NodeState {
    pub config: NodeConfig,
    /// Connections to the node's provider listener (`config.url`).
    pub pool: Arc<Pool>,
    up: AtomicBool,
    misses: AtomicU32,
    /// The latest view it answered, replaced whole.
    view: Mutex<Option<Arc<NodeView>>>,
    /// Why it is out (or the latest poll failed); `None` once a poll answers.
    last_error: Mutex<Option<String>>,
    /// Which provider of the node its `url` is (from the view: the one listening on the
    /// url's port, or the only one).
    provider: Mutex<Option<String>>,
    /// Requests the front sent it, by [`REASONS`] label.
    routed: [AtomicU64; REASONS.len()],
    /// Requests sent to it that it refused (503/429) or that failed to reach it, each
    /// then tried on the next node.
    pub retries: AtomicU64,
    /// Requests sent to it whose answer has not ended yet.
    pub in_flight: AtomicU64,
}

impl NodeState {
    pub fn new(config: NodeConfig, pool: Arc<Pool>) -> Self {
        NodeState {
            config,
            pool,
            up: AtomicBool::new(false),
            misses: AtomicU32::new(0),
            view: Mutex::new(None),
            last_error: Mutex::new(Some("not polled yet".to_string())),
            provider: Mutex::new(None),
            routed: Default::default(),
            retries: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    pub fn up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn view(&self) -> Option<Arc<NodeView>> {
        lock(&self.view).clone()
    }

    pub fn provider(&self) -> Option<String> {
        lock(&self.provider).clone()
    }

    /// The models its latest view shows ready on its provider.
    pub fn ready_models(&self) -> Vec<String> {
        let (Some(view), Some(provider)) = (self.view(), self.provider()) else {
            return Vec::new();
        };
        view.provider(&provider)
            .map(|p| {
                p.models
                    .iter()
                    .filter(|m| m.state == crate::lifecycle::ModelStatus::Ready)
                    .map(|m| m.model.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Counts a request sent to it as `label` (one of [`REASONS`]).
    pub fn routed(&self, label: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == label) {
            self.routed[i].fetch_add(1, Relaxed);
        }
    }

    /// The routed counters, by [`REASONS`] label.
    pub fn routed_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REASONS
            .iter()
            .zip(&self.routed)
            .map(|(l, n)| (*l, n.load(Relaxed)))
    }

    /// All requests routed to it.
    pub fn routed_total(&self) -> u64 {
        self.routed.iter().map(|n| n.load(Relaxed)).sum()
    }

    /// The front could not connect to it: out of rotation now.
    pub fn mark_down(&self, why: String) {
        self.misses.store(MISSES_OUT, Relaxed);
        if self.up.swap(false, Relaxed) {
            tracing::warn!(node = %self.config.name, error = %why, "node out of rotation");
        }
        *lock(&self.last_error) = Some(why);
    }

    /// A poll answered with `view`.
    fn answered(&self, view: NodeView) {
        let provider = provider_for(&view, &self.config.url.authority);
        *lock(&self.provider) = provider;
        *lock(&self.view) = Some(Arc::new(view));
        *lock(&self.last_error) = None;
        self.misses.store(0, Relaxed);
        if !self.up.swap(true, Relaxed) {
            tracing::info!(node = %self.config.name, "node in rotation");
        }
    }

    /// A poll failed.
    fn missed(&self, why: String) {
        let misses = self.misses.fetch_add(1, Relaxed).saturating_add(1);
        if misses >= MISSES_OUT && self.up.swap(false, Relaxed) {
            tracing::warn!(node = %self.config.name, error = %why, "node out of rotation: its polls fail");
        }
        *lock(&self.last_error) = Some(why);
    }

    /// Reads the node's view once.
    pub async fn poll(&self, client: &UpstreamClient, timeout: Duration) {
        let read = tokio::time::timeout(timeout, read_view(client, &self.config)).await;
        match read {
            Ok(Ok(view)) => self.answered(view),
            Ok(Err(e)) => self.missed(e),
            Err(_) => self.missed(format!("its view did not come within {timeout:?}")),
        }
    }

    /// Polls every `interval` until `stop`.
    pub async fn run(
        self: Arc<Self>,
        client: UpstreamClient,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.poll(&client, interval).await;
        }
    }
}

/// `GET <admin>/node`, with the node's admin token when it has one.
async fn read_view(client: &UpstreamClient, node: &NodeConfig) -> Result<NodeView, String> {
    let mut req = http::Request::get(format!("{}/node", node.admin))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    if let Some(t) = &node.token {
        let mut v = http::HeaderValue::try_from(format!("Bearer {}", t.expose()))
            .map_err(|e| e.to_string())?;
        v.set_sensitive(true);
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    let sent = client.request(req).await;
    let resp = sent.map_err(|e| format!("its admin API ({}) is unreachable: {e}", node.admin))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_VIEW)
        .collect()
        .await
        .map_err(|e| format!("reading its view: {e}"))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!("its admin API answered {status}: {text}"));
    }
    let view: NodeView =
        serde_json::from_slice(&body).map_err(|e| format!("its view does not parse: {e}"))?;
    if view.format > FORMAT {
        return Err(format!(
            "its view has format {}, newer than this front reads ({FORMAT}): upgrade the front",
            view.format
        ));
    }
    Ok(view)
}

/// The provider of `view` that `url` reaches: the only one, or the one listening on the
/// url's port.
fn provider_for(view: &NodeView, url: &http::uri::Authority) -> Option<String> {
    if let [only] = view.providers.as_slice() {
        return Some(only.name.clone());
    }
    let port = url.port_u16()?;
    view.providers
        .iter()
        .find(|p| {
            p.listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.port() == port)
        })
        .map(|p| p.name.clone())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
