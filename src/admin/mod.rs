//! The admin listener: `GET /` (the dashboard, one embedded page that polls `/status`),
//! `GET /status` (providers, and per model its counters and lifecycle state, as JSON),
//! `GET /node` (the node view a front routes by: `fleet::view`; `GET /node?watch=1` streams it
//! as server-sent events, one per change),
//! `GET /metrics` (Prometheus), `GET /healthz`, and `POST /models/{provider}/{model}/load|unload`,
//! which ask the provider's lifecycle actor (it decides; this module only reports and asks).
//!
//! With `[admin] token` set (required off loopback), the state-changing endpoints (`POST
//! /models/...`) need `Authorization: Bearer <token>`; the read-only ones (`/`, `/status`,
//! `/node`, `/metrics`, `/healthz`) stay open, so a dashboard or Prometheus needs no secret, but a
//! wrong token is refused there too. A refusal is 401 with `WWW-Authenticate: Bearer`.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;

use crate::lifecycle::{LifecycleError, ModelView};
use crate::state::AppState;
use crate::stats::ModelSnapshot;

mod metrics_page;
mod node;

#[derive(Serialize)]
struct ProviderStatus<'a> {
    name: &'a str,
    kind: &'static str,
    listen: String,
    upstream: String,
    reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    /// llama-server only: `router`, `single` or `unknown` (not read yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
}

/// One model: the proxy's counters, and what the lifecycle knows of it.
#[derive(Serialize)]
struct ModelStatus {
    #[serde(flatten)]
    counters: ModelSnapshot,
    #[serde(flatten)]
    lifecycle: Option<ModelView>,
    /// Provider-reported / estimated prompt tokens, as learned (null until learned).
    token_ratio: Option<f64>,
    /// docs/design.md: MemoryAllocation, while the model is loaded.
    memory: Option<crate::memory::Allocation>,
}

#[derive(Serialize)]
struct Status<'a> {
    /// docs/design.md: SystemResources, with `allocated_memory_mb` = what loaded models hold.
    system: crate::monitor::Snapshot,
    providers: Vec<ProviderStatus<'a>>,
    models: Vec<ModelStatus>,
    compaction: Compaction,
    /// What the memory-pressure response did recently (oldest first).
    pressure_events: Vec<crate::monitor::respond::PressureEvent>,
    /// Recent loads and unloads of every provider, oldest first.
    lifecycle_events: Vec<crate::lifecycle::LifecycleEvent>,
    /// The fronts (`[[pools]]`) and their nodes; absent without pools.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pools: Vec<PoolStatus<'a>>,
}

#[derive(Serialize)]
struct PoolStatus<'a> {
    name: &'a str,
    kind: &'static str,
    listen: String,
    nodes_up: usize,
    /// Requests no node took, answered by the front itself.
    refused: u64,
    /// Loads the front chose that no node's view shows yet.
    pending_loads: usize,
    nodes: Vec<NodeStatus<'a>>,
}

#[derive(Serialize)]
struct NodeStatus<'a> {
    name: &'a str,
    url: String,
    admin: String,
    up: bool,
    last_error: Option<String>,
    /// The node's provider its `url` reaches (from its view).
    provider: Option<String>,
    /// The latest view's `seq` (null before one came).
    view_seq: Option<u64>,
    /// The models its view shows ready on that provider.
    ready: Vec<String>,
    routed: u64,
    routed_by_reason: std::collections::BTreeMap<&'static str, u64>,
    retries: u64,
    in_flight: u64,
}

/// Recent compactions (oldest first) and the summary cache's counters.
#[derive(Serialize)]
struct Compaction {
    events: Vec<crate::context::events::CompactionEvent>,
    summary_cache: crate::context::cache::CacheStats,
}

/// What the admin listener answers with: a whole body, or a stream (`/node?watch=1`).
pub type AdminBody = UnsyncBoxBody<Bytes, std::convert::Infallible>;

pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<AdminBody> {
    if req.uri().path() == "/node"
        && matches!(*req.method(), Method::GET)
        && watching(req.uri().query())
    {
        if let Some(refused) = refused(&state, &req) {
            return refused.map(BodyExt::boxed_unsync);
        }
        return node_events(state);
    }
    respond(state, req).await.map(BodyExt::boxed_unsync)
}

/// Whether the query asks for the stream: `watch=1` (or `watch=true`, or a bare `watch`).
fn watching(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch" | "watch=1" | "watch=true"))
    })
}

/// `GET /node?watch=1`: the node view as server-sent events (`node::stream`).
fn node_events(state: Arc<AppState>) -> Response<AdminBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stop = state.stop.clone();
    tokio::spawn(node::stream(state, tx, stop));
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk)),
            rx,
        ))
    });
    let mut r = Response::new(http_body_util::StreamBody::new(frames).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The host and token checks every admin request passes: `Some(answer)` when refused.
fn refused(state: &AppState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let path = req.uri().path();
    let changes_state = path.starts_with("/models/");
    // DNS rebinding and cross-site requests from web pages (`crate::hosts`), before the
    // token: a browser may hold no token, but the page must not ride on a loopback default.
    let named = crate::hosts::request_host(req);
    let allowed = crate::hosts::admin_host_allowed(named, &state.config.load().admin.allowed_hosts)
        .and_then(|()| match changes_state {
            true => crate::hosts::same_origin_write(named, req.headers()),
            false => Ok(()),
        });
    if let Err(why) = allowed {
        tracing::debug!(path = %path, why = %why, "admin request refused");
        return Some(json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({ "error": why }),
        ));
    }
    authorize(state, req.headers(), changes_state)
}

async fn respond(state: Arc<AppState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(refused) = refused(&state, &req) {
        return refused;
    }
    if let Some(rest) = path.strip_prefix("/models/") {
        return model_action(&state, req.method(), rest).await;
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/status") => json(StatusCode::OK, &status(&state).await),
        (&Method::GET | &Method::HEAD, "/node") => json(StatusCode::OK, &node::build(&state).await),
        (&Method::GET | &Method::HEAD, "/" | "/dashboard") => dashboard(),
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(&state).await,
        (&Method::GET | &Method::HEAD, "/healthz") => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        (_, "/status" | "/node" | "/healthz" | "/metrics" | "/" | "/dashboard") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": format!("method {} is not allowed here", req.method())}),
        ),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no admin endpoint at {path}; try / (the dashboard), /status, /node, /metrics, /healthz or POST /models/{{provider}}/{{model}}/load|unload")}),
        ),
    }
}

/// `None` if the request may go on, else the 401 to answer: with a token configured, a
/// request that changes state must present it, and any request that presents a credential
/// must present the right one.
fn authorize(
    state: &AppState,
    headers: &http::HeaderMap,
    changes_state: bool,
) -> Option<Response<Full<Bytes>>> {
    let config = state.config.load();
    let token = config.admin.token.as_ref()?;
    let why = match (headers.get(header::AUTHORIZATION), crate::config::bearer(headers)) {
        (None, _) if !changes_state => return None,
        (None, _) => "this admin endpoint changes state and needs `Authorization: Bearer <token>` (admin.token)",
        (Some(_), Some(t)) if token.matches(t) => return None,
        (Some(_), _) => "the admin token is wrong (admin.token)",
    };
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({ "error": why }),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// `GET /metrics`: Prometheus text format (see `crate::metrics`).
async fn metrics(state: &AppState) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(metrics_page::render(state).await)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r
}

/// `POST /models/{provider}/{model}/load|unload`. The model may contain `/` (LM Studio keys
/// such as `qwen/qwen3-8b`) and may be percent-encoded.
async fn model_action(state: &AppState, method: &Method, rest: &str) -> Response<Full<Bytes>> {
    let error = |status: StatusCode, message: String| {
        json(status, &serde_json::json!({ "error": message }))
    };
    let (target, action) = match rest.rsplit_once('/') {
        Some((t, a @ ("load" | "unload"))) => (t, a),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no admin endpoint at /models/{rest}; use POST /models/{{provider}}/{{model}}/load or /unload"),
            )
        }
    };
    if method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed here; use POST"),
        );
    }
    let Some((provider, model)) = target.split_once('/') else {
        return error(
            StatusCode::NOT_FOUND,
            format!("`{target}` names no model; use /models/{{provider}}/{{model}}/{action}"),
        );
    };
    let model = percent_decode(model);
    let Some((_, p)) = state
        .providers
        .iter()
        .enumerate()
        .find(|(_, p)| p.config.name == provider)
    else {
        let names: Vec<&str> = state
            .providers
            .iter()
            .map(|p| p.config.name.as_str())
            .collect();
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no provider named `{provider}` (providers: {})",
                names.join(", ")
            ),
        );
    };
    if model.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the model name is empty".into());
    }
    let model = p.config.kind.canonical_model(&model).into_owned();
    let result = if !p.managed() {
        Err(LifecycleError::Unmanaged {
            provider: p.config.name.clone(),
        })
    } else if action == "load" {
        // As a request without options would: the actor picks the runner options.
        let ask = crate::lifecycle::LoadAsk::default();
        p.lifecycle.load(&model, ask).await
    } else {
        p.lifecycle.unload(&model).await
    };
    match result {
        Ok(view) => {
            #[derive(Serialize)]
            struct Named<'a> {
                model: &'a str,
                #[serde(flatten)]
                view: &'a ModelView,
            }
            #[derive(Serialize)]
            struct Answer<'a> {
                provider: &'a str,
                model: Named<'a>,
            }
            let model = Named {
                model: &view.model,
                view: &view,
            };
            json(StatusCode::OK, &Answer { provider, model })
        }
        Err(e) => {
            let status = crate::proxy::ProxyError::Lifecycle(e.clone()).status();
            let mut r = json(
                status,
                &serde_json::json!({ "error": e.to_string(), "kind": e.kind() }),
            );
            if let Some(after) = e.retry_after() {
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(after.as_secs().max(1)),
                );
            }
            if matches!(e, LifecycleError::Stopped) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
    }
}

/// `%XX` escapes decoded (model names are UTF-8); anything malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The learned token ratio of a model, once there is one.
fn ratio(state: &AppState, provider: &str, model: &str) -> Option<f64> {
    let c = &state.compactor.counter;
    (c.samples(provider, model) > 0).then(|| (c.ratio(provider, model) * 1000.0).round() / 1000.0)
}

async fn status(state: &AppState) -> Status<'_> {
    let mut lifecycle: Vec<Vec<ModelView>> = Vec::with_capacity(state.providers.len());
    for p in state.providers.iter() {
        lifecycle.push(p.lifecycle.snapshot().await);
    }
    let mut models = Vec::new();
    for counters in state.stats.snapshot() {
        let i = state
            .providers
            .iter()
            .position(|p| p.config.name == counters.provider)
            .unwrap_or(0);
        let view = lifecycle.get_mut(i).and_then(|views| {
            let at = views.iter().position(|v| v.model == counters.model)?;
            Some(views.swap_remove(at))
        });
        let token_ratio = ratio(state, &counters.provider, &counters.model);
        let memory = state.memory.allocation(i, &counters.model);
        models.push(ModelStatus {
            counters,
            lifecycle: view,
            token_ratio,
            memory,
        });
    }
    // Models the lifecycle knows that no request named and no poll listed (an admin load
    // under way, a failed one).
    for (i, views) in lifecycle.into_iter().enumerate() {
        for v in views {
            let name = &state.providers[i].config.name;
            models.push(ModelStatus {
                token_ratio: ratio(state, name, &v.model),
                memory: state.memory.allocation(i, &v.model),
                counters: ModelSnapshot::empty(name, &v.model),
                lifecycle: Some(v),
            });
        }
    }
    let order = |name: &str| state.providers.iter().position(|p| p.config.name == name);
    models.sort_by(|a, b| {
        (order(&a.counters.provider), &a.counters.model)
            .cmp(&(order(&b.counters.provider), &b.counters.model))
    });
    let mut lifecycle_events: Vec<_> = state
        .providers
        .iter()
        .flat_map(|p| p.lifecycle.events())
        .collect();
    // Same format, UTC, so the text sorts by time; stable, so each provider keeps its order.
    lifecycle_events.sort_by(|a, b| a.at.cmp(&b.at));
    let mut system = state.monitor.latest();
    system.allocated_memory_mb = state.memory.allocated_mb();
    Status {
        system,
        pressure_events: state.pressure_events.list(),
        lifecycle_events,
        providers: state
            .providers
            .iter()
            .map(|p| ProviderStatus {
                name: &p.config.name,
                kind: p.config.kind.as_str(),
                listen: p.listen.to_string(),
                upstream: p.config.upstream.to_string(),
                reachable: p.reachable(),
                last_error: p.last_error(),
                mode: (p.config.kind == crate::providers::ProviderKind::LlamaCpp)
                    .then(|| p.llama_mode().as_str()),
            })
            .collect(),
        models,
        pools: state
            .pools
            .iter()
            .map(|pool| PoolStatus {
                name: &pool.config.name,
                kind: pool.config.kind.as_str(),
                listen: pool.listen.to_string(),
                nodes_up: pool.nodes_up(),
                refused: pool.refused.load(std::sync::atomic::Ordering::Relaxed),
                pending_loads: pool.pending_loads(),
                nodes: pool
                    .nodes
                    .iter()
                    .map(|n| NodeStatus {
                        name: &n.config.name,
                        url: n.config.url.to_string(),
                        admin: n.config.admin.to_string(),
                        up: n.up(),
                        last_error: n.last_error(),
                        provider: n.provider(),
                        view_seq: n.view().map(|v| v.seq),
                        ready: n.ready_models(),
                        routed: n.routed_total(),
                        routed_by_reason: n.routed_counts().filter(|(_, v)| *v > 0).collect(),
                        retries: n.retries.load(std::sync::atomic::Ordering::Relaxed),
                        in_flight: n.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    })
                    .collect(),
            })
            .collect(),
        compaction: Compaction {
            events: state.compactor.events.list(),
            summary_cache: state.compactor.cache_stats(),
        },
    }
}

/// The dashboard: one self-contained page (no network but this listener), built into the binary.
fn dashboard() -> Response<Full<Bytes>> {
    static PAGE: &str = include_str!("../../assets/dashboard.html");
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
