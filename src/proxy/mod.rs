//! The data plane: one handler for every request on a provider's listener.
//!
//! ```text
//!  request ──► classify ──┬─ inspected (POST to a model endpoint, per providers/*)
//!                         │    read body once (size limit) → model → chats: fit the window
//!                         │    (count, compact, Ollama num_ctx) → (Ollama native:
//!                         │    keep_alive → -1, the client's value kept as a hint)
//!                         │    → InFlight guard → lease from the lifecycle (load / queue)
//!                         │    → forward → ObservedBody (usage, guard + lease) ──► client
//!                         └─ everything else: forward as a stream, unparsed; upgrades spliced
//!                            (LM Studio SDK sockets: the key checked in the first frame with
//!                            api_keys, sdk.rs; /llm predictions counted and leased, sdk_watch.rs)
//! ```
//! No stage reaches back: the body is read at most once, parsed at most once, and the response
//! is never buffered. Errors the proxy writes itself take the client's shape (`error.rs`).
//!
//! On the request path an awaited call's result is bound with `let` before it is matched
//! (`let sent = send(..).await; match sent {..}`), never `match send(..).await {..}`. The
//! temporaries of a `match` (or `if let`) scrutinee live until the end of the whole `match`,
//! so the callee's future kept its own slot in the caller's state beside the slot it is
//! polled in: every level of `inspected → continue_with → forward → send` doubled the one
//! below, and the inspected future was 18,968 bytes, copied into its box on every model
//! request. Bound first, it is 4,656 (measured with `size_of_val`, release build).

mod error;
mod forward;
#[cfg(test)]
mod fuzz_regressions;
mod inbound;
mod model;
mod multipart;
mod observe;
mod relay;
mod sdk;
mod sdk_watch;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};

use crate::config::Config;
use crate::context::{self, Compactor};
use crate::lifecycle::{LoadAsk, Shape};
use crate::monitor::MonitorHandle;
use crate::providers::{error_chain, ErrorStyle, ProviderKind, UpstreamClient};
use crate::stats::StatsTable;
use crate::transport::codec::RawHeaders;
use crate::transport::pool::{self, PoolError, PooledBody};
use crate::transport::server::{self, RequestBody};
use crate::upstream::ProviderState;
pub use error::{Fault, ProxyError};
pub use forward::{downstream_headers, upstream_request};
pub use inbound::read_body;
pub use inbound::{Dialect, ModelRequest, Unreadable};
pub use model::{dialect, COMPACTED_HEADER, NUM_BATCH_HEADER, NUM_CTX_HEADER, PRUNED_HEADER};
pub use observe::UsageScanner;
pub use relay::RelayBody;

/// What the data plane reads: every provider listener shares one, built by `app` from the
/// proxy's state (`AppState::data_plane`), holding the same components, not copies.
pub struct DataPlane {
    /// The config in force (a reload replaces it; read once per request where needed).
    pub config: Arc<arc_swap::ArcSwap<Config>>,
    /// Indexed like `config.providers`.
    pub providers: Arc<[ProviderState]>,
    pub stats: StatsTable,
    pub compactor: Arc<Compactor>,
    /// The control plane's client, for summaries.
    pub client: UpstreamClient,
    /// The pressure level.
    pub monitor: MonitorHandle,
}

// === impl ProxyBody ===

/// What the proxy sends back: the upstream's stream (observed or not) or its own bytes.
// The observed variant is boxed: unboxed (scanner state and the in-flight guard, 576 bytes)
// it made every response 688 bytes, moved half a dozen times on its way to the client
// (callgrind: about 670 instructions of memcpy a request, pass-through ones included), for
// one allocation per model request.
pub enum ProxyBody {
    Upstream(PooledBody),
    Observed(Box<observe::ObservedBody<PooledBody>>),
    Local(Full<Bytes>),
    /// A node's answer relayed by a front (the `fleet` module).
    Relayed(Box<RelayBody>),
}

impl server::WireHead for ProxyBody {
    fn raw_headers(&self) -> Option<&RawHeaders> {
        match self {
            ProxyBody::Upstream(b) => b.raw_headers(),
            ProxyBody::Observed(b) => b.inner().raw_headers(),
            ProxyBody::Local(_) => None,
            ProxyBody::Relayed(b) => server::WireHead::raw_headers(&**b),
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Local(Full::new(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = pool::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, pool::BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Observed(b) => Pin::new(&mut **b).poll_frame(cx),
            ProxyBody::Local(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
            ProxyBody::Relayed(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Observed(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
            ProxyBody::Relayed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Observed(b) => b.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
            ProxyBody::Relayed(b) => b.size_hint(),
        }
    }
}

// === request handling ===

/// Handles one request on provider `provider`'s listener.
pub async fn handle(
    state: Arc<DataPlane>,
    provider: usize,
    mut req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    let kind = p.config.kind;
    // Ollama refuses foreign `Host` names on a loopback bind (DNS rebinding); the proxy
    // rewrites `Host` to the upstream's address, so it applies Ollama's rule itself, with
    // Ollama's bare 403 (`crate::hosts`).
    if kind == ProviderKind::Ollama
        && p.listen.ip().is_loopback()
        && !crate::hosts::ollama_host_allowed(
            crate::hosts::request_host(&req),
            &p.config.allowed_hosts,
        )
    {
        p.metrics.error("host_not_allowed");
        tracing::debug!(host = ?req.headers().get(http::header::HOST), "Host refused (DNS rebinding defence)");
        let mut r = Response::new(ProxyBody::Local(Full::new(Bytes::new())));
        *r.status_mut() = http::StatusCode::FORBIDDEN;
        return r;
    }
    // Off by default (one length check); when on, the key stops here: it is the proxy's,
    // not the provider's. The provider gets its own credential instead, if it has one
    // (`upstream_api_key`). Without `api_keys` the client's `Authorization` is the client's
    // business and passes unchanged: the proxy adds none, so it never lends its credential
    // to a client the provider would refuse.
    if !p.config.api_keys.is_empty() {
        if let Err(e) = check_api_key(&p.config.api_keys, req.headers()) {
            // The LM Studio SDK sends no header: its greeting passes, and its socket's key is
            // in the socket's first frame (`sdk`). An upgrade with a valid header passes on
            // it, as any request.
            let path = routed_path(req.uri().path());
            let keyless = kind == ProviderKind::LmStudio && sdk::keyless_sdk_request(&req, &path);
            let (greeting, style) = (path == sdk::GREETING, kind.error_style(&path));
            if !keyless {
                return local_error(p, &e, kind.error_style(req.uri().path()));
            }
            if !greeting {
                return match sdk::accept(state.clone(), provider, req) {
                    Ok(r) => r,
                    Err(e) => local_error(p, &e, style),
                };
            }
        }
        req.headers_mut().remove(http::header::AUTHORIZATION);
        p.config.upstream.authorize(req.headers_mut());
    }
    if req.method() == Method::POST {
        if let Some(endpoint) = kind.classify(&routed_path(req.uri().path())) {
            // Boxed: the inspected path's future (compaction, loading) is kilobytes, and the
            // connection's task is as large as its largest state, idle or streaming.
            return Box::pin(model::inspected(&state, provider, endpoint, req)).await;
        }
    }
    let style = kind.error_style(&routed_path(req.uri().path()));
    let watch = watched_sdk_socket(&state, provider, &mut req);
    passthrough(&state, p, style, req, watch).await
}

/// An LM Studio SDK socket on `/llm` or `/embedding` is watched as it is spliced
/// (`sdk_watch`): its upgrade
/// offers upstream no extension, so the frames stay readable (the client is answered with
/// the provider's `101`, which then names none).
fn watched_sdk_socket(
    state: &Arc<DataPlane>,
    provider: usize,
    req: &mut Request<RequestBody>,
) -> Option<sdk_watch::Watch> {
    let p = &state.providers[provider];
    if p.config.kind != ProviderKind::LmStudio
        || req.extensions().get::<server::ClientUpgrade>().is_none()
    {
        return None;
    }
    let watch = sdk_watch::Watch::for_path(state, provider, &routed_path(req.uri().path()))?;
    req.headers_mut().remove("sec-websocket-extensions");
    Some(watch)
}

/// The path as the provider routes it: percent-escapes decoded, as Go's `URL.Path` (gin
/// routes on it) and cpp-httplib's `decode_url` do, so `/api/%63hat` and `/api%2Fchat` are
/// `/api/chat` and inspected like it (issue 18). A path without `%` is taken as it is.
pub(crate) fn routed_path(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.contains('%') {
        return std::borrow::Cow::Borrowed(raw);
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push(((hex(h).unwrap_or(0) << 4) | hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_or(std::borrow::Cow::Borrowed(raw), std::borrow::Cow::Owned)
}

/// Whether the request presents one of `keys` as `Authorization: Bearer <key>`. Every key
/// is compared (in constant time), whichever matches.
fn check_api_key(
    keys: &[crate::config::Secret],
    headers: &http::HeaderMap,
) -> Result<(), ProxyError> {
    let Some(presented) = crate::config::bearer(headers) else {
        return Err(ProxyError::Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`",
        ));
    };
    let found = keys
        .iter()
        .fold(false, |found, k| k.matches(presented) | found);
    if found {
        Ok(())
    } else {
        Err(ProxyError::Unauthorized("invalid API key"))
    }
}

/// A pass-through body of at most this many bytes, with a declared length, is read whole
/// before it goes upstream; a longer or chunked one streams through.
const SMALL_BODY: u64 = 64 * 1024;

/// Forwards a request the proxy does not inspect. A small body with a declared length
/// (`/tokenize`, `/api/show`, `/models/load`) is read first, as nginx reads every body
/// (`proxy_request_buffering on`): then the pool can send it again when a reused keep-alive
/// connection turns out closed (see `pool`). A larger or chunked body (an `/api/blobs`
/// upload) streams through unread.
async fn passthrough(
    state: &DataPlane,
    p: &ProviderState,
    style: ErrorStyle,
    mut req: Request<RequestBody>,
    watch: Option<sdk_watch::Watch>,
) -> Response<ProxyBody> {
    // Only this proxy's own HTTP/1 server hands over upgraded connections (HTTP/2 has no
    // `Upgrade`).
    let client_upgrade = req.extensions_mut().remove::<server::ClientUpgrade>();
    let upgrade = client_upgrade.is_some();
    let (parts, body) = req.into_parts();
    // Nothing here reads the answer's headers: for an HTTP/1 client they may stay as the
    // provider wrote them (`h1::RawHeaders`).
    let raw_ok = parts.version < http::Version::HTTP_2;
    if let Some(e) = body.failed() {
        // It stalled before the handler ran: nothing goes upstream.
        return local_error(p, &client_body_error(e), style);
    }
    let body = match body.size_hint().exact() {
        Some(n) if n > 0 && n <= SMALL_BODY && body.in_hand().is_none() => {
            let read = inbound::read_body(&parts.headers, body, SMALL_BODY).await;
            match read {
                Ok(bytes) => Either::Right(Full::new(bytes)),
                Err(e) => return local_error(p, &e, style),
            }
        }
        _ => Either::Left(body),
    };
    let up = match forward::upstream_request(
        &p.config.upstream,
        p.pool.host_header(),
        parts,
        body,
        upgrade,
    ) {
        Ok(r) => r,
        Err(e) => return local_error(p, &ProxyError::InvalidTarget(e.to_string()), style),
    };
    let sent = send(state, p, up, raw_ok).await;
    match sent {
        Ok(mut resp) => {
            p.mark_reachable();
            if let Some(client_upgrade) = client_upgrade {
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    let upstream_upgrade = hyper::upgrade::on(&mut resp);
                    forward::splice_upgrade(client_upgrade, upstream_upgrade, watch);
                }
            }
            forward::downstream_headers(&mut resp);
            resp.map(ProxyBody::Upstream)
        }
        Err(e) => local_error(p, &e, style),
    }
}

/// Splices an upgraded client connection (a WebSocket) to an upgraded upstream one, unread
/// (a front relaying to a node, which reads it itself).
pub fn splice_upgrade(client: server::ClientUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    forward::splice_upgrade(client, upstream, None);
}

/// Sends `up`, within `proxy.response_timeout` for the response to begin.
pub(super) async fn send(
    state: &DataPlane,
    p: &ProviderState,
    up: Request<crate::transport::UpstreamBody>,
    raw_ok: bool,
) -> Result<Response<PooledBody>, ProxyError> {
    let limit = state.config.load().proxy.response_timeout;
    // On a lane, without a tokio timer per request (`lanes::deadline`).
    let sent = std::pin::pin!(p.pool.send(up, raw_ok));
    let answered = crate::transport::lanes::deadline::within(limit, sent).await;
    match answered {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(pool_error(p, &e)),
        Err(_) => Err(ProxyError::UpstreamTimeout {
            provider: p.config.name.clone(),
            after: limit,
        }),
    }
}

/// An error the proxy answers itself: counted by kind, logged, written in `style`.
pub(super) fn local_error(
    p: &ProviderState,
    e: &ProxyError,
    style: ErrorStyle,
) -> Response<ProxyBody> {
    p.metrics.error(e.kind());
    match e.fault() {
        Fault::Client => tracing::debug!(kind = e.kind(), error = %e, "client error"),
        Fault::Upstream => tracing::warn!(kind = e.kind(), error = %e, "upstream error"),
    }
    e.into_response(style)
}

/// A failed exchange of the data plane, as the client will read it; no connection marks
/// the provider unreachable.
fn pool_error(p: &ProviderState, e: &PoolError) -> ProxyError {
    // The client's body failed while it streamed upstream (bad chunk, stall, the client
    // left): the client's fault, never the provider's (issue 18).
    let source: Option<&(dyn std::error::Error + 'static)> = match e {
        PoolError::Connect(_) => None,
        PoolError::Send(e) => Some(e),
        PoolError::Exchange(e) => Some(e),
    };
    if let Some(body) = std::iter::successors(source, |e| e.source())
        .find_map(|e| e.downcast_ref::<server::ClientBodyError>())
    {
        return client_body_error(body);
    }
    match e {
        PoolError::Connect(reason) => {
            p.mark_unreachable(reason.clone());
            ProxyError::UpstreamUnreachable {
                provider: p.config.name.clone(),
                upstream: p.config.upstream.to_string(),
                reason: reason.clone(),
            }
        }
        PoolError::Send(e) => upstream_failed(p, error_chain(e)),
        PoolError::Exchange(e) => upstream_failed(p, error_chain(e)),
    }
}

/// A request body the client failed to send, as the client reads it: 408 for a stall, 400
/// otherwise.
pub fn client_body_error(e: &server::ClientBodyError) -> ProxyError {
    match e {
        server::ClientBodyError::TimedOut(after) => ProxyError::BodyTimeout { after: *after },
        e => ProxyError::BodyRead(e.to_string()),
    }
}

fn upstream_failed(p: &ProviderState, reason: String) -> ProxyError {
    ProxyError::UpstreamFailed {
        provider: p.config.name.clone(),
        reason,
    }
}

/// The providers as the compaction stage sees them.
impl context::Providers for DataPlane {
    fn name(&self, provider: usize) -> &str {
        &self.providers[provider].config.name
    }

    fn kind(&self, provider: usize) -> crate::providers::ProviderKind {
        self.providers[provider].config.kind
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.config.name == name)
    }

    fn window(&self, provider: usize, model: &str) -> Option<u64> {
        self.providers[provider].lifecycle.window(model)
    }

    fn compacted(&self, provider: usize, model: &str, saved: u64) {
        self.stats.model(provider, model).record_compaction(saved);
    }

    fn pruned(&self, provider: usize, model: &str, tokens: u64) {
        self.stats.model(provider, model).record_prune(tokens);
    }

    fn post<'a>(
        &'a self,
        provider: usize,
        model: &'a str,
        path: &'static str,
        body: &'a (dyn Fn(Shape) -> Bytes + Sync),
        limit: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<(http::StatusCode, Bytes), String>> {
        Box::pin(async move {
            let p = &self.providers[provider];
            // A llama-server with one model: always loaded, nothing to acquire.
            let _lease = if p.managed() {
                let lease = p.lifecycle.acquire(model, None, LoadAsk::default()).await;
                Some(lease.map_err(|e| format!("summarizer model: {e}"))?)
            } else {
                None
            };
            let runner = p.lifecycle.runner(model).unwrap_or_default();
            let mut req = Request::post(format!("{}{path}", p.config.upstream))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body(runner)))
                .map_err(|e| e.to_string())?;
            p.config.upstream.authorize(req.headers_mut());
            let sent = self.client.request(req).await;
            let resp =
                sent.map_err(|e| format!("summarizer `{}` unreachable: {e}", p.config.name))?;
            let status = resp.status();
            let collected = http_body_util::Limited::new(resp.into_body(), limit)
                .collect()
                .await;
            let bytes = collected
                .map_err(|e| format!("reading the summary: {e}"))?
                .to_bytes();
            Ok((status, bytes))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::routed_path;

    #[test]
    fn a_percent_escaped_path_is_routed_as_the_provider_routes_it() {
        for (raw, routed) in [
            ("/api/chat", "/api/chat"),
            ("/api/%63hat", "/api/chat"),
            ("/api%2Fchat", "/api/chat"),
            ("/v1/chat%2fcompletions", "/v1/chat/completions"),
            ("/api/%zzchat", "/api/%zzchat"),
            ("/api/chat%", "/api/chat%"),
            ("/api/%ff", "/api/%ff"),
        ] {
            assert_eq!(routed_path(raw), routed, "{raw}");
        }
        assert!(matches!(
            routed_path("/api/chat"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
