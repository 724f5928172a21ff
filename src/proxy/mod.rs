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
mod observe;
pub mod shape;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};

use crate::config::Config;
use crate::context::{self, Compactor};
use crate::lifecycle::{self, IdleHint, LifecycleError, Shape};
use crate::memory::MemoryTable;
use crate::monitor::MonitorHandle;
use crate::providers::ops::OpError;
use crate::providers::{error_chain, Endpoint, ErrorStyle, Operation, UpstreamClient, UsageKeys};
use crate::rewrite;
use crate::stats::{InFlight, StatsTable};
use crate::transport::codec::RawHeaders;
use crate::transport::pool::{self, PoolError, PooledBody};
use crate::transport::server::{self, RequestBody};
use crate::upstream::ProviderState;
pub use error::{Fault, ProxyError};
pub use inbound::ModelRequest;
pub use observe::UsageScanner;

/// What the data plane reads: every provider listener shares one, built by `app` from the
/// proxy's state (`AppState::data_plane`), holding the same components, not copies.
pub struct DataPlane {
    /// The config in force (a reload replaces it; read once per request where needed).
    pub config: Arc<arc_swap::ArcSwap<Config>>,
    /// Indexed like `config.providers`.
    pub providers: Arc<[ProviderState]>,
    pub stats: StatsTable,
    pub compactor: Arc<Compactor>,
    /// The control plane's client: `/api/show` for runner options, summaries.
    pub client: UpstreamClient,
    /// Model geometries (`/api/show`), for `num_batch` under memory pressure.
    pub memory: Arc<MemoryTable>,
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
}

impl server::WireHead for ProxyBody {
    fn raw_headers(&self) -> Option<&RawHeaders> {
        match self {
            ProxyBody::Upstream(b) => b.raw_headers(),
            ProxyBody::Observed(b) => b.inner().raw_headers(),
            ProxyBody::Local(_) => None,
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
    state: Arc<DataPlane>,
    provider: usize,
    mut req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    let kind = p.config.kind;
    // Off by default (one length check); when on, the key stops here: it is the proxy's,
    // not the provider's.
    if !p.config.api_keys.is_empty() {
        if let Err(e) = check_api_key(&p.config.api_keys, req.headers()) {
            return local_error(p, &e, kind.error_style(req.uri().path()));
        }
        req.headers_mut().remove(http::header::AUTHORIZATION);
    }
    if req.method() == Method::POST {
        if let Some(endpoint) = kind.classify(req.uri().path()) {
            // Boxed: the inspected path's future (compaction, loading) is kilobytes, and the
            // connection's task is as large as its largest state, idle or streaming.
            return Box::pin(inspected(&state, provider, endpoint, req)).await;
        }
    }
    let style = kind.error_style(req.uri().path());
    passthrough(&state, p, style, req).await
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
) -> Response<ProxyBody> {
    // Only this proxy's own HTTP/1 server hands over upgraded connections (HTTP/2 has no
    // `Upgrade`).
    let client_upgrade = req.extensions_mut().remove::<server::ClientUpgrade>();
    let upgrade = client_upgrade.is_some();
    let (parts, body) = req.into_parts();
    // Nothing here reads the answer's headers: for an HTTP/1 client they may stay as the
    // provider wrote them (`h1::RawHeaders`).
    let raw_ok = parts.version < http::Version::HTTP_2;
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
                    forward::splice_upgrade(client_upgrade, upstream_upgrade);
                }
            }
            forward::downstream_headers(&mut resp);
            resp.map(ProxyBody::Upstream)
        }
        Err(e) => local_error(p, &e, style),
    }
}

/// Sends `up`, within `proxy.response_timeout` for the response to begin.
async fn send(
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

/// Forwards a model request: reads the body once, takes the model, fits a chat into the
/// model's window (`context`), gets a lease on the model from the lifecycle (which loads it,
/// or queues the request, as needed), tracks it in flight, and reads the usage out of the
/// response as it streams back.
async fn inspected(
    state: &DataPlane,
    provider: usize,
    endpoint: Endpoint,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let arrived = Instant::now();
    let p = &state.providers[provider];
    let kind = p.config.kind;
    let (mut parts, body) = req.into_parts();
    let max_body = state.config.load().proxy.max_request_body;
    let read = inbound::read_body(&parts.headers, body, max_body).await;
    let mut bytes = match read {
        Ok(b) => b,
        Err(e) => return local_error(p, &e, endpoint.errors),
    };
    // The body goes upstream whole: the client sets its length from the bytes, so a stage
    // that rewrites them can never leave a stale Content-Length behind.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let mut parsed = ModelRequest::parse(&bytes);
    // No model (bad JSON, missing field): the upstream answers with its own error,
    // unchanged, and nothing is counted.
    let Some(model) = parsed.model().map(|m| kind.canonical_model(m).into_owned()) else {
        drop(parsed);
        return forward(state, p, endpoint, parts, bytes, None).await;
    };
    let keep_alive = KeepAlivePlan::of(endpoint, &bytes, &parsed);
    if keep_alive.unload {
        // `keep_alive: 0` without a prompt: unload. Done gracefully through the lifecycle
        // (in-flight requests finish first); the provider then answers its own reply for a
        // model that is not loaded.
        drop(parsed);
        let unloaded = p.lifecycle.unload(&model).await;
        if let Err(e) = unloaded {
            tracing::debug!(model = %model, error = %e, "unload asked by a client failed");
        }
        return forward(state, p, endpoint, parts, bytes, None).await;
    }
    let mut notes = Notes::default();
    // Ollama's runner options under memory pressure (see `shape`).
    if endpoint.usage == UsageKeys::OllamaNative {
        let shaped = shape::for_request(state, provider, &model, &parsed).await;
        if let Some((target, sent)) = shaped {
            notes.shape = target;
            if let Some(b) = shape::apply(&bytes, parsed.options, sent, target) {
                notes.num_ctx = target
                    .num_ctx
                    .filter(|n| Some(*n) != sent.num_ctx)
                    .map(|n| (sent.num_ctx, n));
                notes.num_batch = target
                    .num_batch
                    .filter(|n| Some(*n) != sent.num_batch)
                    .map(|n| (sent.num_batch, n));
                drop(parsed);
                bytes = b;
                parsed = ModelRequest::parse(&bytes);
            }
        }
    }
    // Fit the conversation into the model's window (before the lease: a slow summary must
    // not pin the target), and keep Ollama's num_ctx stable.
    let mut estimate = None;
    if endpoint.operation == Operation::Chat && parsed.messages.is_some() {
        let shaped = !notes.shape.is_default();
        let fitted = fit_context(state, provider, endpoint, &model, &bytes, &parsed, shaped).await;
        match fitted {
            Fitted::Unchanged { estimate: e } => estimate = e,
            Fitted::Rewritten {
                body,
                compacted,
                num_ctx,
            } => {
                notes.compacted = compacted;
                notes.num_ctx = num_ctx.or(notes.num_ctx);
                estimate = compacted.map(|(_, after)| after);
                drop(parsed);
                bytes = body;
            }
            Fitted::Reject(e) => {
                let mut g = state.stats.begin(provider, &model, endpoint.label, arrived);
                g.fail(e.status());
                return local_error(p, &e, endpoint.errors);
            }
        }
    }
    continue_with(
        state, provider, endpoint, parts, bytes, model, keep_alive, notes, estimate, arrived,
    )
    .await
}

/// What Ollama's `keep_alive` asks, and what the proxy does with it.
#[derive(Clone, Debug, Default)]
struct KeepAlivePlan {
    /// The client's value, as a hint to the lifecycle.
    hint: Option<IdleHint>,
    /// Set `keep_alive` to -1 upstream.
    rewrite: bool,
    /// A load-only request with `keep_alive: 0`: an unload.
    unload: bool,
    /// Where the client's `keep_alive` value sits in the body as read (`None`: absent), so
    /// the rewrite need not parse the body again.
    at: Option<std::ops::Range<usize>>,
}

impl KeepAlivePlan {
    fn of(endpoint: Endpoint, body: &[u8], parsed: &ModelRequest<'_>) -> Self {
        if endpoint.usage != UsageKeys::OllamaNative {
            return KeepAlivePlan::default();
        }
        // Ollama would unload on its own after the request's keep_alive: the proxy owns
        // unloading, so the provider is told "never" and the client's value becomes a hint.
        // A value Ollama would refuse is left alone, so the client gets Ollama's own 400.
        let (hint, rewrite) = match parsed.keep_alive {
            // Absent or null: the server default, which the proxy replaces.
            None => (None, true),
            Some(raw) if raw.get() == "null" => (None, true),
            Some(raw) => {
                let hint = lifecycle::parse_keep_alive(raw.get());
                (hint, hint.is_some())
            }
        };
        KeepAlivePlan {
            hint,
            rewrite,
            unload: hint == Some(IdleHint::After(Duration::ZERO)) && parsed.is_load_only(),
            at: parsed.keep_alive.map(|r| rewrite::span_in(body, r)),
        }
    }
}

/// What the proxy changed in a request, for the response headers.
#[derive(Debug, Default)]
struct Notes {
    /// Prompt tokens before and after compaction.
    compacted: Option<(u64, u64)>,
    /// Ollama `num_ctx` as sent (`None`: absent) and as forwarded.
    num_ctx: Option<(Option<u64>, u64)>,
    /// Ollama `num_batch` as sent and as forwarded.
    num_batch: Option<(Option<u64>, u64)>,
    /// The runner options a load started by this request gets (Ollama under pressure).
    shape: Shape,
}

enum Fitted {
    Unchanged {
        estimate: Option<u64>,
    },
    Rewritten {
        body: Bytes,
        compacted: Option<(u64, u64)>,
        num_ctx: Option<(Option<u64>, u64)>,
    },
    Reject(ProxyError),
}

/// The compaction stage: the model's window, `num_ctx` normalization, and the compactor.
async fn fit_context(
    state: &DataPlane,
    provider: usize,
    endpoint: Endpoint,
    model: &str,
    bytes: &Bytes,
    parsed: &ModelRequest<'_>,
    shaped: bool,
) -> Fitted {
    let cx = &state.compactor;
    let p = &state.providers[provider];
    let messages_len = parsed.messages.map_or(0, |m| m.get().len());
    let limits = parsed.limits();
    let sent_ctx = limits.num_ctx;
    // The window the model runs with: the lifecycle actor publishes it from its own loads
    // at once, and from the provider's list for loads made by others.
    let loaded_window = p.lifecycle.window(model);
    let mut known = loaded_window;
    if known.is_none() && sent_ctx.is_none() && messages_len > SMALL_PROMPT {
        known = cx.configured_window(model);
        if known.is_none() && p.managed() {
            // Not seen loaded yet: load it now (as the request would) to learn its window.
            let shape = lifecycle::Shape {
                num_ctx: sent_ctx,
                ..Default::default()
            };
            let shape = shape::for_load_capped(state, provider, model, shape).await;
            let loaded = p.lifecycle.load(model, shape).await;
            if let Ok(view) = loaded {
                known = view.context_length;
            }
        }
    }
    let req = context::ChatRequest {
        provider,
        model,
        body: bytes,
        messages: parsed.messages,
        max_reply: limits.max_reply,
    };
    // Ollama reloads a model whose loaded num_ctx differs from the request's: keep the
    // loaded one when the prompt fits it for sure (a request given a runner's options under
    // memory pressure has them already).
    let mut body = bytes.clone();
    let mut num_ctx_note = None;
    let mut window = sent_ctx.or(known);
    if let (Some(sent), Some(loaded), true) = (
        sent_ctx,
        loaded_window,
        endpoint.usage == UsageKeys::OllamaNative && cx.normalize_num_ctx() && !shaped,
    ) {
        if sent != loaded
            && crate::tokens::upper_bound(messages_len) <= cx.prompt_budget(&req, loaded)
        {
            if let Some(b) = set_num_ctx(bytes, parsed.options, loaded) {
                body = b;
                num_ctx_note = Some((Some(sent), loaded));
                window = Some(loaded);
            }
        }
    }
    // A client asking for more context than `buffers.context.max` (`initial` under memory
    // pressure) gets that much: the KV cache Ollama would allocate is bounded. The
    // conversation is then fitted into the capped window.
    if let (Some(sent), None, true) = (
        sent_ctx,
        num_ctx_note,
        endpoint.usage == UsageKeys::OllamaNative,
    ) {
        let cap = cx.context_cap();
        if sent > cap {
            if let Some(b) = set_num_ctx(bytes, parsed.options, cap) {
                body = b;
                num_ctx_note = Some((Some(sent), cap));
                window = Some(cap);
            }
        }
    }
    let Some(window) = window else {
        return Fitted::Unchanged { estimate: None };
    };
    let req = context::ChatRequest { body: &body, ..req };
    let stage = context::Stage {
        compactor: &state.compactor,
        providers: state,
    };
    let fit = context::fit(stage, &req, window).await;
    match fit {
        context::Fit::Unchanged { estimate } => match num_ctx_note {
            Some(n) => Fitted::Rewritten {
                body,
                compacted: None,
                num_ctx: Some(n),
            },
            None => Fitted::Unchanged { estimate },
        },
        context::Fit::Rewritten {
            body,
            before,
            after,
        } => Fitted::Rewritten {
            body,
            compacted: Some((before, after)),
            num_ctx: num_ctx_note,
        },
        context::Fit::Reject {
            tokens,
            window,
            why,
        } => Fitted::Reject(ProxyError::ContextOverflow {
            model: model.to_string(),
            tokens,
            window,
            why,
        }),
    }
}

/// Below this many bytes of messages a prompt fits any window: no window is looked up.
const SMALL_PROMPT: usize = 1024;

/// `options.num_ctx` set to `n`, every other byte kept.
fn set_num_ctx(
    body: &[u8],
    options: Option<&serde_json::value::RawValue>,
    n: u64,
) -> Option<Bytes> {
    let options = options?;
    let (new_options, _) =
        rewrite::set_top_level(options.get().as_bytes(), "num_ctx", &n.to_string()).ok()?;
    let new_options = String::from_utf8(new_options).ok()?;
    let (b, _) = rewrite::set_top_level(body, "options", &new_options).ok()?;
    Some(Bytes::from(b))
}

/// The rest of an inspected request once its body is final: Ollama's keep_alive, the lease,
/// forwarding.
#[allow(clippy::too_many_arguments)]
async fn continue_with(
    state: &DataPlane,
    provider: usize,
    endpoint: Endpoint,
    parts: http::request::Parts,
    mut bytes: Bytes,
    model: String,
    keep_alive: KeepAlivePlan,
    notes: Notes,
    estimate: Option<u64>,
    arrived: Instant,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    if keep_alive.rewrite {
        // The body as read: its parse said where keep_alive is. Rewritten by the context
        // stage: parse it again.
        let edited =
            if notes.compacted.is_none() && notes.num_ctx.is_none() && notes.num_batch.is_none() {
                rewrite::set_at(&bytes, "keep_alive", "-1", keep_alive.at.clone())
            } else {
                rewrite::set_top_level(&bytes, "keep_alive", "-1").map(|(b, _)| b)
            };
        if let Ok(edited) = edited {
            bytes = Bytes::from(edited);
        }
    }
    let hint = keep_alive.hint;
    let mut guard = state.stats.begin(provider, &model, endpoint.label, arrived);
    if let Some((before, after)) = notes.compacted {
        guard.compacted(before, after);
    }
    match estimate {
        Some(e) => {
            let counter = state.compactor.counter.clone();
            let (pname, mname) = (p.config.name.clone(), model.clone());
            let raw = e;
            guard.estimated(
                e,
                Box::new(move |reported| {
                    // The ratio is learned on uncalibrated estimates.
                    let ratio = counter.ratio(&pname, &mname);
                    let uncalibrated = (raw as f64 / ratio).round() as u64;
                    counter.calibrate(&pname, &mname, uncalibrated, reported);
                }),
            );
        }
        None => guard.not_estimated(),
    }
    // A llama-server with one model: always loaded, nothing to acquire.
    if p.managed() {
        let asked = Instant::now();
        let acquired = p.lifecycle.acquire(&model, hint, notes.shape).await;
        match acquired {
            Ok(lease) => guard.attach(lease, asked.elapsed()),
            // The provider does not know the model: let it say so itself, in its own words.
            Err(LifecycleError::NotFound { .. }) => {}
            Err(LifecycleError::LoadFailed {
                source: OpError::Unreachable(reason),
                ..
            }) => {
                p.mark_unreachable(reason.clone());
                let e = ProxyError::UpstreamUnreachable {
                    provider: p.config.name.clone(),
                    upstream: p.config.upstream.to_string(),
                    reason,
                };
                guard.fail(e.status());
                return local_error(p, &e, endpoint.errors);
            }
            Err(e) => {
                let e = ProxyError::Lifecycle(e);
                guard.fail(e.status());
                return local_error(p, &e, endpoint.errors);
            }
        }
    }
    let mut resp = forward(state, p, endpoint, parts, bytes, Some(guard)).await;
    if let Some((before, after)) = notes.compacted {
        if let Ok(v) = http::HeaderValue::from_str(&format!("{before}->{after}")) {
            resp.headers_mut().insert(COMPACTED_HEADER, v);
        }
    }
    for (name, note) in [
        (NUM_CTX_HEADER, notes.num_ctx),
        (NUM_BATCH_HEADER, notes.num_batch),
    ] {
        if let Some((sent, used)) = note {
            let sent = sent.map_or_else(|| "default".to_string(), |n| n.to_string());
            if let Ok(v) = http::HeaderValue::from_str(&format!("{sent}->{used}")) {
                resp.headers_mut().insert(name, v);
            }
        }
    }
    resp
}

/// Set on a response whose request was compacted: `<tokens before>-><tokens after>`.
pub const COMPACTED_HEADER: &str = "x-llm-warden-compacted";
/// Set when Ollama's `num_ctx` was rewritten (to the loaded model's, to a cap, or to the
/// smaller context of a load under memory pressure): `<sent or "default">-><used>`.
pub const NUM_CTX_HEADER: &str = "x-llm-warden-num-ctx";
/// Set when Ollama's `num_batch` was rewritten (memory pressure): `<sent or "default">-><used>`.
pub const NUM_BATCH_HEADER: &str = "x-llm-warden-num-batch";

/// Sends an inspected request upstream and observes its response (when it is counted).
async fn forward(
    state: &DataPlane,
    p: &ProviderState,
    endpoint: Endpoint,
    parts: http::request::Parts,
    bytes: Bytes,
    mut guard: Option<InFlight>,
) -> Response<ProxyBody> {
    // The answer's headers are only added to here (`continue_with`'s notes), never read:
    // for an HTTP/1 client they may stay as the provider wrote them (`h1::RawHeaders`).
    let raw_ok = parts.version < http::Version::HTTP_2;
    let up = match forward::upstream_request(
        &p.config.upstream,
        p.pool.host_header(),
        parts,
        Either::Right(Full::new(bytes)),
        false,
    ) {
        Ok(r) => r,
        Err(e) => {
            let e = ProxyError::InvalidTarget(e.to_string());
            if let Some(g) = guard.as_mut() {
                g.fail(e.status());
            }
            return local_error(p, &e, endpoint.errors);
        }
    };
    let sent = send(state, p, up, raw_ok).await;
    match sent {
        Ok(mut resp) => {
            p.mark_reachable();
            forward::downstream_headers(&mut resp);
            match guard.take() {
                Some(mut g) => {
                    g.set_status(resp.status());
                    if resp.status().is_client_error() || resp.status().is_server_error() {
                        g.fail_upstream("upstream_status");
                    }
                    resp.map(|b| {
                        ProxyBody::Observed(Box::new(observe::ObservedBody::new(
                            b,
                            endpoint.usage,
                            g,
                        )))
                    })
                }
                None => resp.map(ProxyBody::Upstream),
            }
        }
        Err(e) => {
            if let Some(g) = guard.as_mut() {
                g.fail(e.status());
            }
            local_error(p, &e, endpoint.errors)
        }
    }
}

/// An error the proxy answers itself: counted by kind, logged, written in `style`.
fn local_error(p: &ProviderState, e: &ProxyError, style: ErrorStyle) -> Response<ProxyBody> {
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

    fn runner(&self, provider: usize, model: &str) -> Shape {
        self.providers[provider]
            .lifecycle
            .runner(model)
            .unwrap_or_default()
    }

    fn compacted(&self, provider: usize, model: &str, saved: u64) {
        self.stats.model(provider, model).record_compaction(saved);
    }

    fn post(
        &self,
        provider: usize,
        model: &str,
        path: &'static str,
        body: Bytes,
        limit: usize,
    ) -> futures_util::future::BoxFuture<'_, Result<(http::StatusCode, Bytes), String>> {
        let model = model.to_string();
        Box::pin(async move {
            let p = &self.providers[provider];
            let shape = p.lifecycle.runner(&model).unwrap_or_default();
            // A llama-server with one model: always loaded, nothing to acquire.
            let _lease = if p.managed() {
                let lease = p.lifecycle.acquire(&model, None, shape).await;
                Some(lease.map_err(|e| format!("summarizer model: {e}"))?)
            } else {
                None
            };
            let req = Request::post(format!("{}{path}", p.config.upstream))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| e.to_string())?;
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
