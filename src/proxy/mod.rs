//! The data plane: one handler for every request on a provider's listener.
//!
//! ```text
//!  request ──► classify ──┬─ inspected (POST to a model endpoint, per providers/*)
//!                         │    read body once (size limit) → model → (Ollama native:
//!                         │    keep_alive → -1, the client's value kept as a hint)
//!                         │    → InFlight guard → lease from the lifecycle (load / queue)
//!                         │    → forward → ObservedBody (usage, guard + lease) ──► client
//!                         └─ everything else: forward as a stream, unparsed; upgrades spliced
//! ```
//! No stage reaches back: the body is read at most once, parsed at most once, and the response
//! is never buffered. Errors the proxy writes itself take the client's shape (`error.rs`).

mod error;
mod forward;
mod inbound;
mod observe;
pub mod rewrite;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::app::{AppState, ProviderState};
use crate::lifecycle::{self, IdleHint, LifecycleError};
use crate::providers::ops::OpError;
use crate::providers::{Endpoint, ErrorStyle, UsageKeys};
use crate::stats::InFlight;
pub use error::{Fault, ProxyError};
pub use forward::{build_client, UpstreamClient};
pub use inbound::ModelRequest;
pub use observe::UsageScanner;

// === impl ProxyBody ===

/// What the proxy sends back: the upstream's stream (observed or not) or its own bytes.
pub enum ProxyBody {
    Upstream(Incoming),
    Observed(observe::ObservedBody<Incoming>),
    Local(Full<Bytes>),
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Local(Full::new(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Observed(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Local(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Observed(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Observed(b) => b.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
        }
    }
}

// === request handling ===

/// Handles one request on provider `provider`'s listener.
pub async fn handle(
    state: Arc<AppState>,
    provider: usize,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    let kind = p.config.kind;
    if req.method() == Method::POST {
        if let Some(endpoint) = kind.classify(req.uri().path()) {
            return inspected(&state, provider, endpoint, req).await;
        }
    }
    let style = kind.error_style(req.uri().path());
    passthrough(&state, p, style, req).await
}

/// Forwards a request the proxy does not inspect: the body streams through unread.
async fn passthrough(
    state: &AppState,
    p: &ProviderState,
    style: ErrorStyle,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let upgrade = forward::wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let up = match forward::upstream_request(&p.config.upstream, parts, Either::Left(body), upgrade)
    {
        Ok(r) => r,
        Err(e) => return local_error(&ProxyError::InvalidTarget(e.to_string()), style),
    };
    match state.client.request(up).await {
        Ok(mut resp) => {
            p.mark_reachable();
            if let Some(client_upgrade) = client_upgrade {
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    let upstream_upgrade = hyper::upgrade::on(&mut resp);
                    forward::splice_upgrade(client_upgrade, upstream_upgrade);
                }
            }
            forward::downstream_headers(&mut resp);
            resp.map(ProxyBody::Upstream)
        }
        Err(e) => local_error(&p.upstream_error(&e), style),
    }
}

/// Forwards a model request: reads the body once, takes the model, gets a lease on it from
/// the lifecycle (which loads it, or queues the request, as needed), tracks it in flight, and
/// reads the usage out of the response as it streams back.
async fn inspected(
    state: &AppState,
    provider: usize,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    let kind = p.config.kind;
    let (mut parts, body) = req.into_parts();
    let mut bytes =
        match inbound::read_body(&parts.headers, body, state.config.proxy.max_request_body).await {
            Ok(b) => b,
            Err(e) => return local_error(&e, endpoint.errors),
        };
    // The body goes upstream whole: the client sets its length from the bytes, so a stage
    // that rewrites them can never leave a stale Content-Length behind.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let parsed = ModelRequest::parse(&bytes);
    // No model (bad JSON, missing field): the upstream answers with its own error,
    // unchanged, and nothing is counted.
    let Some(model) = parsed.model().map(|m| kind.canonical_model(m).into_owned()) else {
        drop(parsed);
        return forward(state, p, endpoint, parts, bytes, None).await;
    };
    let mut hint = None;
    let mut rewrite = false;
    if endpoint.usage == UsageKeys::OllamaNative {
        // Ollama would unload on its own after the request's keep_alive: the proxy owns
        // unloading, so the provider is told "never" and the client's value becomes a hint.
        // A value Ollama would refuse is left alone, so the client gets Ollama's own 400.
        match parsed.keep_alive {
            None => rewrite = true,
            Some(raw) => {
                hint = lifecycle::parse_keep_alive(raw.get());
                rewrite = hint.is_some();
            }
        }
        if hint == Some(IdleHint::After(Duration::ZERO)) && parsed.is_load_only() {
            // `keep_alive: 0` without a prompt: unload. Done gracefully through the
            // lifecycle (in-flight requests finish first); the provider then answers its
            // own reply for a model that is not loaded.
            drop(parsed);
            if let Err(e) = p.lifecycle.unload(&model).await {
                tracing::debug!(model = %model, error = %e, "unload asked by a client failed");
            }
            return forward(state, p, endpoint, parts, bytes, None).await;
        }
    }
    drop(parsed);
    if rewrite {
        if let Ok((edited, _)) = rewrite::set_top_level(&bytes, "keep_alive", "-1") {
            bytes = Bytes::from(edited);
        }
    }
    let mut guard = state.stats.begin(provider, &model);
    match p.lifecycle.acquire(&model, hint).await {
        Ok(lease) => guard.attach(lease),
        // The provider does not know the model: let it say so itself, in its own words.
        Err(LifecycleError::NotFound { .. }) => {}
        Err(LifecycleError::LoadFailed {
            source: OpError::Unreachable(reason),
            ..
        }) => {
            guard.fail();
            p.mark_unreachable(reason.clone());
            let e = ProxyError::UpstreamUnreachable {
                provider: p.config.name.clone(),
                upstream: p.config.upstream.to_string(),
                reason,
            };
            return local_error(&e, endpoint.errors);
        }
        Err(e) => {
            guard.fail();
            return local_error(&ProxyError::Lifecycle(e), endpoint.errors);
        }
    }
    forward(state, p, endpoint, parts, bytes, Some(guard)).await
}

/// Sends an inspected request upstream and observes its response (when it is counted).
async fn forward(
    state: &AppState,
    p: &ProviderState,
    endpoint: Endpoint,
    parts: http::request::Parts,
    bytes: Bytes,
    mut guard: Option<InFlight>,
) -> Response<ProxyBody> {
    let up = match forward::upstream_request(
        &p.config.upstream,
        parts,
        Either::Right(Full::new(bytes)),
        false,
    ) {
        Ok(r) => r,
        Err(e) => {
            if let Some(g) = guard.as_mut() {
                g.fail();
            }
            return local_error(&ProxyError::InvalidTarget(e.to_string()), endpoint.errors);
        }
    };
    match state.client.request(up).await {
        Ok(mut resp) => {
            p.mark_reachable();
            forward::downstream_headers(&mut resp);
            match guard.take() {
                Some(mut g) => {
                    if resp.status().is_client_error() || resp.status().is_server_error() {
                        g.fail();
                    }
                    resp.map(|b| {
                        ProxyBody::Observed(observe::ObservedBody::new(b, endpoint.usage, g))
                    })
                }
                None => resp.map(ProxyBody::Upstream),
            }
        }
        Err(e) => {
            if let Some(g) = guard.as_mut() {
                g.fail();
            }
            local_error(&p.upstream_error(&e), endpoint.errors)
        }
    }
}

fn local_error(e: &ProxyError, style: ErrorStyle) -> Response<ProxyBody> {
    match e.fault() {
        Fault::Client => tracing::debug!(kind = e.kind(), error = %e, "client error"),
        Fault::Upstream => tracing::warn!(kind = e.kind(), error = %e, "upstream error"),
    }
    e.into_response(style)
}
