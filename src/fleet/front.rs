//! The front: a pool listener that speaks exactly like a provider listener of its `kind`
//! and sends each request to one of the pool's nodes (llm-warden instances, each in front of
//! its own provider).
//!
//! ```text
//!  request ──► classify (kind) ──┬─ model request: read body (size limit) → model, affinity
//!                                │   → picker over the nodes' views (+ Pending) → send to the
//!                                │   first node; 503/429 or unreachable before any answer
//!                                │   byte → the next node ──► relay (x-llm-warden-node)
//!                                ├─ model lists (/api/tags, /api/ps, /v1/models, ...): every
//!                                │   node up asked at once, the lists merged
//!                                └─ anything else: the least busy node up (upgrades spliced)
//! ```
//!
//! Decisions, and why:
//! - **The node decides.** The front keeps no model state: it reads each node's view
//!   (`nodes`), ranks with the pure [`super::picker::pick`], and the node's own lifecycle
//!   still admits, queues or refuses. A stale view costs a retry at most.
//! - **Retries only before the answer began**: a node that answers 503 or 429 (its queue is
//!   full, it is shutting down) or that cannot be reached is skipped for the next ranked
//!   node; the body is in hand, so it is sent again as it came. Once a node's answer is
//!   relayed nothing is retried (a generation is not idempotent). A `response_timeout`
//!   is not retried either: the node may still be generating.
//! - **A node that breaks mid-stream**: the client gets one last frame in its stream's
//!   format (an NDJSON `{"error"}` line, an SSE error event) and a clean end
//!   (`proxy::RelayBody`); a JSON document is cut, as the node's own provider would cut it.
//! - **Single-flight across the fleet**: the picker's [`Pending`] (one per pool, behind a
//!   mutex held for the pick only) sends a burst for an unloaded model to one node.
//! - **Lists are unions**: `/api/tags` and the like answer what any node can serve, by the
//!   entry's name, the first node's entry winning; other top-level fields are the first
//!   answer's.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};

use super::nodes::NodeState;
use super::picker::{self, BodyShape, Node, Pending, Pick, Reason};
use crate::config::{Config, PoolConfig};
use crate::providers::{ErrorStyle, ProviderKind};
use crate::proxy::{self, ProxyBody, ProxyError, RelayBody};
use crate::transport::pool::PoolError;
use crate::transport::server::{self, RequestBody};

/// The header that names the node an answer came from.
pub const NODE_HEADER: &str = "x-llm-warden-node";

/// How long a pick to load a model holds before the front picks again (`Pending`'s
/// expiry), in poll intervals: the view shows the load within one or two.
const PENDING_POLLS: u32 = 5;

/// The largest answer of a node to a list request that is merged.
const MAX_LIST: usize = 16 << 20;

/// One pool at run time.
pub struct PoolState {
    pub config: PoolConfig,
    /// The address actually bound.
    pub listen: std::net::SocketAddr,
    /// Indexed like `config.nodes`.
    pub nodes: Vec<Arc<NodeState>>,
    pending: Mutex<Pending>,
    /// Requests no node could take (answered by the front).
    pub refused: std::sync::atomic::AtomicU64,
}

impl PoolState {
    pub fn new(
        config: PoolConfig,
        listen: std::net::SocketAddr,
        nodes: Vec<Arc<NodeState>>,
    ) -> Self {
        let ttl = config.poll_interval * PENDING_POLLS;
        PoolState {
            config,
            listen,
            nodes,
            pending: Mutex::new(Pending::new(ttl)),
            refused: Default::default(),
        }
    }

    /// Loads the front chose that no view shows yet (the fleet single-flight's entries).
    pub fn pending_loads(&self) -> usize {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.prune(Instant::now());
        pending.len()
    }

    /// Nodes in rotation.
    pub fn nodes_up(&self) -> usize {
        self.nodes.iter().filter(|n| n.up()).count()
    }

    /// Ranks the nodes for `model` (and records a load it chooses, for single-flight).
    pub(crate) fn rank(&self, model: &str, affinity: Option<u64>) -> Vec<Pick> {
        let views: Vec<_> = self
            .nodes
            .iter()
            .map(|n| (n.view(), n.provider()))
            .collect();
        let nodes: Vec<Node<'_>> = self
            .nodes
            .iter()
            .zip(&views)
            .map(|(n, (view, provider))| Node {
                name: &n.config.name,
                up: n.up(),
                view: view.as_deref(),
                provider: provider.as_deref().unwrap_or(""),
            })
            .collect();
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.prune(now);
        let picks = picker::pick(model, affinity, &nodes, &pending, now);
        pending.record(model, &picks, &nodes, now);
        picks
    }

    /// The node chose not to load `model` after all (it refused): pick again next time.
    pub(crate) fn forget_pending(&self, model: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(model);
    }

    /// The nodes up, least busy first (for requests that name no model).
    pub(crate) fn least_busy(&self) -> Vec<usize> {
        let mut up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up())
            .collect();
        up.sort_by_key(|&i| {
            (
                self.nodes[i]
                    .in_flight
                    .load(std::sync::atomic::Ordering::Relaxed),
                i,
            )
        });
        up
    }
}

/// What the pool listeners read.
pub struct FrontPlane {
    pub config: Arc<arc_swap::ArcSwap<Config>>,
    /// Indexed like `config.pools`.
    pub pools: Arc<[PoolState]>,
}

/// Handles one request on pool `pool`'s listener.
pub async fn handle(
    plane: Arc<FrontPlane>,
    pool: usize,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let p = &plane.pools[pool];
    let kind = p.config.kind;
    // The nodes see the front's `Host`, so an Ollama front on a loopback address applies
    // Ollama's DNS rebinding rule itself, with Ollama's bare 403 (`crate::hosts`).
    if kind == ProviderKind::Ollama
        && p.listen.ip().is_loopback()
        && !crate::hosts::ollama_host_allowed(crate::hosts::request_host(&req), &[])
    {
        p.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = Response::new(ProxyBody::Local(Full::new(Bytes::new())));
        *r.status_mut() = StatusCode::FORBIDDEN;
        return r;
    }
    let path = proxy::routed_path(req.uri().path()).into_owned();
    let style = kind.error_style(&path);
    if req.method() == Method::POST && kind.classify(&path).is_some() {
        return Box::pin(model_request(&plane, p, &path, style, req)).await;
    }
    if req.method() == Method::GET && is_list(kind, &path) {
        return list(&plane, p, style, req).await;
    }
    let order = p.least_busy();
    passthrough(&plane, p, style, req, &order).await
}

/// A model request: ranked by the picker, sent to the first node that takes it.
async fn model_request(
    plane: &FrontPlane,
    p: &PoolState,
    path: &str,
    style: ErrorStyle,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let limit = plane.config.load().proxy.max_request_body;
    let (parts, body) = req.into_parts();
    if let Some(e) = body.failed() {
        return refuse(p, &proxy::client_body_error(e), style);
    }
    let read = proxy::read_body(&parts.headers, body, limit).await;
    let body = match read {
        Ok(b) => b,
        Err(e) => return refuse(p, &e, style),
    };
    let kind = p.config.kind;
    let model = model_of(kind, &body);
    let Some(model) = model else {
        // The node answers a body without a model in its provider's words.
        let order = p.least_busy();
        return send_in_order(plane, p, style, &parts, body, &order, None).await;
    };
    let affinity = BodyShape::of_path(path).and_then(|s| picker::affinity_key(s, &body));
    let picks = p.rank(&model, affinity);
    if picks.is_empty() {
        let reason = if p.nodes_up() == 0 {
            "no node is up (see the front's /status)".to_string()
        } else {
            format!(
                "no node up serves `{model}` through its `{}` listener",
                kind.as_str()
            )
        };
        return refuse(
            p,
            &ProxyError::NoNode {
                pool: p.config.name.clone(),
                reason,
            },
            style,
        );
    }
    let order: Vec<usize> = picks.iter().map(|k| k.node).collect();
    send_in_order(
        plane,
        p,
        style,
        &parts,
        body,
        &order,
        Some((&model, &picks)),
    )
    .await
}

/// Sends the request to the nodes in `order` until one takes it (see the module doc).
/// `picked`: the model and the picks `order` came from (their labels count the routing).
async fn send_in_order(
    plane: &FrontPlane,
    p: &PoolState,
    style: ErrorStyle,
    parts: &http::request::Parts,
    body: Bytes,
    order: &[usize],
    picked: Option<(&str, &[Pick])>,
) -> Response<ProxyBody> {
    let response_timeout = plane.config.load().proxy.response_timeout;
    let raw_ok = parts.version < http::Version::HTTP_2;
    let mut last_error: Option<ProxyError> = None;
    for (at, &i) in order.iter().enumerate() {
        let node = &p.nodes[i];
        let more = at + 1 < order.len();
        let up = match node_request(node, parts, Either::Right(Full::new(body.clone())), false) {
            Ok(r) => r,
            Err(e) => return refuse(p, &e, style),
        };
        let sent = std::pin::pin!(node.pool.send(up, raw_ok));
        let answered = crate::transport::lanes::deadline::within(response_timeout, sent).await;
        let label = picked
            .and_then(|(_, picks)| picks.get(at))
            .map_or("other", Pick::label);
        match answered {
            Ok(Ok(resp)) => {
                let status = resp.status();
                let busy = status == StatusCode::SERVICE_UNAVAILABLE
                    || status == StatusCode::TOO_MANY_REQUESTS;
                if busy && more {
                    node.retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some((model, picks)) = picked {
                        if matches!(
                            picks.get(at).map(|k| k.reason),
                            Some(Reason::Load | Reason::Pending)
                        ) {
                            p.forget_pending(model);
                        }
                    }
                    tracing::debug!(node = %node.config.name, %status, "node refused; trying the next");
                    // Read to the end so the connection goes back to the pool.
                    let _ = http_body_util::Limited::new(resp.into_body(), 64 << 10)
                        .collect()
                        .await;
                    continue;
                }
                if !status.is_success() {
                    // The node did not take the load it was picked for (an unknown model,
                    // a refusal): the next request picks again.
                    if let Some((model, picks)) = picked {
                        if matches!(
                            picks.get(at).map(|k| k.reason),
                            Some(Reason::Load | Reason::Pending)
                        ) {
                            p.forget_pending(model);
                        }
                    }
                }
                node.routed(label);
                return relay(node, style, resp);
            }
            Ok(Err(e)) => {
                let why = pool_error_text(&e);
                if let PoolError::Connect(_) = e {
                    node.mark_down(why.clone());
                }
                node.retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(node = %node.config.name, error = %why, "node failed before answering");
                last_error = Some(ProxyError::UpstreamFailed {
                    provider: node.config.name.clone(),
                    reason: why,
                });
            }
            Err(_) => {
                // Not retried: the node may be generating still.
                node.routed(label);
                return refuse(
                    p,
                    &ProxyError::UpstreamTimeout {
                        provider: node.config.name.clone(),
                        after: response_timeout,
                    },
                    style,
                );
            }
        }
    }
    let reason = match last_error {
        Some(e) => format!("every node failed; the last: {e}"),
        None if order.is_empty() => "no node is up (see the front's /status)".to_string(),
        None => "every node refused".to_string(),
    };
    refuse(
        p,
        &ProxyError::NoNode {
            pool: p.config.name.clone(),
            reason,
        },
        style,
    )
}

/// The request to send `node`: the client's, less hop-by-hop headers, `Host` the node's.
fn node_request(
    node: &NodeState,
    parts: &http::request::Parts,
    body: crate::transport::UpstreamBody,
    upgrade: bool,
) -> Result<Request<crate::transport::UpstreamBody>, ProxyError> {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        h.clone_from(&parts.headers);
    }
    let (head, ()) = b
        .body(())
        .map_err(|e| ProxyError::InvalidTarget(e.to_string()))?
        .into_parts();
    proxy::upstream_request(
        &node.config.url,
        node.pool.host_header(),
        head,
        body,
        upgrade,
    )
    .map_err(|e| ProxyError::InvalidTarget(e.to_string()))
}

/// A node's answer, relayed: its node named, its in-flight count held until the body ends.
fn relay(
    node: &Arc<NodeState>,
    style: ErrorStyle,
    mut resp: Response<crate::transport::pool::PooledBody>,
) -> Response<ProxyBody> {
    proxy::downstream_headers(&mut resp);
    if let Ok(v) = HeaderValue::from_str(&node.config.name) {
        resp.headers_mut().insert(NODE_HEADER, v);
    }
    let (head, body) = resp.into_parts();
    let hold = InFlight::new(node.clone());
    let what = format!("node `{}` failed while answering", node.config.name);
    let body = RelayBody::new(body, &head.headers, style, what, Box::new(hold));
    Response::from_parts(head, ProxyBody::Relayed(Box::new(body)))
}

/// A node's in-flight count, held by a relayed answer.
pub(crate) struct InFlight(Arc<NodeState>);

impl InFlight {
    pub(crate) fn new(node: Arc<NodeState>) -> Self {
        node.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(node)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Anything else: to the first node in `order` that can be reached (a small body is read
/// first so it can go again; a larger or streamed one, or an upgrade, goes once).
async fn passthrough(
    plane: &FrontPlane,
    p: &PoolState,
    style: ErrorStyle,
    mut req: Request<RequestBody>,
    order: &[usize],
) -> Response<ProxyBody> {
    let client_upgrade = req.extensions_mut().remove::<server::ClientUpgrade>();
    let upgrade = client_upgrade.is_some();
    let (parts, body) = req.into_parts();
    if let Some(e) = body.failed() {
        return refuse(p, &proxy::client_body_error(e), style);
    }
    let small = http_body::Body::size_hint(&body)
        .exact()
        .is_some_and(|n| n <= 64 * 1024);
    // A body the server already read with the head is in memory whatever its size: no limit.
    let in_hand = body.in_hand().is_some();
    if !upgrade && (small || in_hand) {
        let limit = if in_hand { u64::MAX } else { 64 * 1024 };
        let read = proxy::read_body(&parts.headers, body, limit).await;
        return match read {
            Ok(bytes) => send_in_order(plane, p, style, &parts, bytes, order, None).await,
            Err(e) => refuse(p, &e, style),
        };
    }
    let Some(&first) = order.first() else {
        return refuse(
            p,
            &ProxyError::NoNode {
                pool: p.config.name.clone(),
                reason: "no node is up (see the front's /status)".to_string(),
            },
            style,
        );
    };
    let node = &p.nodes[first];
    let raw_ok = parts.version < http::Version::HTTP_2;
    let up = match node_request(node, &parts, Either::Left(body), upgrade) {
        Ok(r) => r,
        Err(e) => return refuse(p, &e, style),
    };
    let sent = node.pool.send(up, raw_ok).await;
    match sent {
        Ok(mut resp) => {
            node.routed("other");
            if let Some(client_upgrade) = client_upgrade {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let upstream = hyper::upgrade::on(&mut resp);
                    proxy::splice_upgrade(client_upgrade, upstream);
                    proxy::downstream_headers(&mut resp);
                    if let Ok(v) = HeaderValue::from_str(&node.config.name) {
                        resp.headers_mut().insert(NODE_HEADER, v);
                    }
                    return resp.map(ProxyBody::Upstream);
                }
            }
            relay(node, style, resp)
        }
        Err(e) => {
            let why = pool_error_text(&e);
            if let PoolError::Connect(_) = e {
                node.mark_down(why.clone());
            }
            refuse(
                p,
                &ProxyError::UpstreamFailed {
                    provider: node.config.name.clone(),
                    reason: why,
                },
                style,
            )
        }
    }
}

/// Whether `path` lists models, answered by the front as the union of its nodes' lists.
fn is_list(kind: ProviderKind, path: &str) -> bool {
    match kind {
        ProviderKind::Ollama => matches!(path, "/api/tags" | "/api/ps" | "/v1/models"),
        ProviderKind::LmStudio => {
            matches!(path, "/v1/models" | "/api/v0/models" | "/api/v1/models")
        }
        ProviderKind::LlamaCpp => matches!(path, "/v1/models" | "/models"),
    }
}

/// The union of the lists of every node up (see the module doc).
async fn list(
    plane: &FrontPlane,
    p: &PoolState,
    style: ErrorStyle,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let response_timeout = plane.config.load().proxy.response_timeout;
    let (parts, _) = req.into_parts();
    let order = p.least_busy();
    let asks = order.iter().map(|&i| {
        let node = &p.nodes[i];
        let parts = &parts;
        async move {
            let up =
                node_request(node, parts, Either::Right(Full::new(Bytes::new())), false).ok()?;
            let sent = std::pin::pin!(node.pool.send(up, false));
            let answered = crate::transport::lanes::deadline::within(response_timeout, sent).await;
            let resp = match answered {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    if let PoolError::Connect(_) = e {
                        node.mark_down(pool_error_text(&e));
                    }
                    return None;
                }
                Err(_) => return None,
            };
            if !resp.status().is_success() {
                return None;
            }
            let ct = resp.headers().get(http::header::CONTENT_TYPE).cloned();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_LIST)
                .collect()
                .await
                .ok()?
                .to_bytes();
            Some((ct, body))
        }
    });
    let answers: Vec<_> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let Some(merged) = merge_lists(answers.iter().map(|(_, b)| b.as_ref())) else {
        return refuse(
            p,
            &ProxyError::NoNode {
                pool: p.config.name.clone(),
                reason: "no node answered the list".to_string(),
            },
            style,
        );
    };
    let mut resp = Response::new(ProxyBody::Local(Full::new(Bytes::from(merged))));
    let ct = answers
        .first()
        .and_then(|(ct, _)| ct.clone())
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    resp
}

/// Merges JSON lists: the first document, its list (`models` or `data`) extended with the
/// entries of the others' that it lacks (by `id`, `name`, `model` or `key`). Of two entries
/// for one model, one that shows it loaded wins (LM Studio's `state: "loaded"` and
/// `loaded_instances`, llama-server's `status.value`), else the first node's. `None` when no
/// document parses.
pub(crate) fn merge_lists<'a>(docs: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut merged: Option<serde_json::Value> = None;
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for doc in docs {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(doc) else {
            continue;
        };
        let Some(key) = ["models", "data"]
            .into_iter()
            .find(|k| v.get(*k).is_some_and(|l| l.is_array()))
        else {
            continue;
        };
        let entries = v
            .get(key)
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default();
        let target = merged.get_or_insert_with(|| {
            let mut first = v.clone();
            first[key] = serde_json::Value::Array(Vec::new());
            first
        });
        let Some(list) = target.get_mut(key).and_then(|l| l.as_array_mut()) else {
            continue;
        };
        for e in entries {
            let id = ["id", "name", "model", "key"]
                .into_iter()
                .find_map(|k| e.get(k).and_then(|x| x.as_str()).map(str::to_string));
            let known = id.as_ref().and_then(|id| at.get(id).copied());
            match (known, id) {
                (Some(i), _) => {
                    if loaded(&e) && !list.get(i).is_some_and(loaded) {
                        list[i] = e;
                    }
                }
                (None, Some(id)) => {
                    at.insert(id, list.len());
                    list.push(e);
                }
                (None, None) => list.push(e),
            }
        }
    }
    merged.map(|m| m.to_string().into_bytes())
}

/// Whether a list entry shows its model loaded (LM Studio v0 and v1, llama-server router).
fn loaded(e: &serde_json::Value) -> bool {
    e.get("state").and_then(|s| s.as_str()) == Some("loaded")
        || e.get("loaded_instances")
            .and_then(|l| l.as_array())
            .is_some_and(|l| !l.is_empty())
        || e.pointer("/status/value").and_then(|s| s.as_str()) == Some("loaded")
}

/// The model a request's body names, as the nodes' views name it.
fn model_of(kind: ProviderKind, body: &[u8]) -> Option<String> {
    let parsed = proxy::ModelRequest::parse(body, proxy::dialect(kind)).ok()?;
    let model = parsed.model()?;
    (!model.is_empty()).then(|| kind.canonical_model(model).into_owned())
}

/// An answer the front writes itself, counted.
fn refuse(p: &PoolState, e: &ProxyError, style: ErrorStyle) -> Response<ProxyBody> {
    p.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match e.fault() {
        proxy::Fault::Client => tracing::debug!(pool = %p.config.name, error = %e, "client error"),
        proxy::Fault::Upstream => {
            tracing::warn!(pool = %p.config.name, error = %e, "no node took the request")
        }
    }
    e.into_response(style)
}

fn pool_error_text(e: &PoolError) -> String {
    match e {
        PoolError::Connect(reason) => format!("unreachable: {reason}"),
        PoolError::Send(e) => crate::providers::error_chain(e),
        PoolError::Exchange(e) => crate::providers::error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_merged_by_name_the_first_entry_winning() {
        let a = br#"{"models":[{"name":"a:latest","size":1},{"name":"b:latest"}]}"#;
        let b = br#"{"models":[{"name":"b:latest","size":9},{"name":"c:latest"}]}"#;
        let m: serde_json::Value =
            serde_json::from_slice(&merge_lists([&a[..], &b[..]].into_iter()).unwrap()).unwrap();
        let names: Vec<_> = m["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a:latest", "b:latest", "c:latest"]);
        assert_eq!(
            m["models"][1].get("size"),
            None,
            "the first node's entry wins"
        );
        let oa = br#"{"object":"list","data":[{"id":"x","object":"model"}]}"#;
        let ob = br#"{"object":"list","data":[{"id":"y","object":"model"},{"id":"x"}]}"#;
        let m: serde_json::Value = serde_json::from_slice(
            &merge_lists([&b"not json"[..], &oa[..], &ob[..]].into_iter()).unwrap(),
        )
        .unwrap();
        assert_eq!(m["object"], "list");
        assert_eq!(m["data"].as_array().unwrap().len(), 2);
        assert_eq!(merge_lists([&b"{}"[..]].into_iter()), None);
        // An entry that shows the model loaded wins over the first node's.
        let a = br#"{"data":[{"id":"q","state":"not-loaded"}]}"#;
        let b = br#"{"data":[{"id":"q","state":"loaded"}]}"#;
        let m: serde_json::Value =
            serde_json::from_slice(&merge_lists([&a[..], &b[..]].into_iter()).unwrap()).unwrap();
        assert_eq!(m["data"][0]["state"], "loaded");
        let a = br#"{"models":[{"key":"q","loaded_instances":[]}]}"#;
        let b = br#"{"models":[{"key":"q","loaded_instances":[{"id":"q"}]}]}"#;
        let m: serde_json::Value =
            serde_json::from_slice(&merge_lists([&a[..], &b[..]].into_iter()).unwrap()).unwrap();
        assert_eq!(m["models"][0]["loaded_instances"][0]["id"], "q");
    }
}
