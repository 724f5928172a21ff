//! The data plane: one handler for every request on a provider's listener.
//!
//! ```text
//!  request ──► classify ──┬─ inspected (POST to a model endpoint, per providers/*)
//!                         │    read body once (size limit) → model → InFlight guard
//!                         │    → forward unchanged → ObservedBody (usage, guard) ──► client
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

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::app::{AppState, ProviderState};
use crate::providers::{Endpoint, ErrorStyle};
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

/// Forwards a model request: reads the body once, takes the model, tracks it in flight, and
/// reads the usage out of the response as it streams back.
async fn inspected(
    state: &AppState,
    provider: usize,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    let (mut parts, body) = req.into_parts();
    let bytes =
        match inbound::read_body(&parts.headers, body, state.config.proxy.max_request_body).await {
            Ok(b) => b,
            Err(e) => return local_error(&e, endpoint.errors),
        };
    // The body goes upstream whole: the client sets its length from the bytes, so a stage
    // that rewrites them can never leave a stale Content-Length behind.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let parsed = ModelRequest::parse(&bytes);
    let up = match forward::upstream_request(
        &p.config.upstream,
        parts,
        Either::Right(Full::new(bytes.clone())),
        false,
    ) {
        Ok(r) => r,
        Err(e) => return local_error(&ProxyError::InvalidTarget(e.to_string()), endpoint.errors),
    };
    // In flight from here. No model (bad JSON, missing field): the upstream answers with its
    // own error, unchanged, and nothing is counted.
    let kind = p.config.kind;
    let mut guard = parsed
        .model()
        .map(|m| state.stats.begin(provider, &kind.canonical_model(m)));
    drop(parsed);
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
