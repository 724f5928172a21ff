//! A model request, in one forward pass. Its state is one [`Call`], carried through the
//! phases in order; none reaches back:
//!
//! ```text
//!  read the body once (size limit; a coded body: 415) → parse it once, as the provider
//!         reads JSON (ModelRequest: borrowed spans; a body the provider might read and the
//!         proxy cannot: 400; one every provider refuses: forwarded for its own error)
//!  → resolve: the model (canonical name), Ollama's keep_alive (the unload form of generate and chat ends here)
//!  → fit: the window (published by the lifecycle actor, or predicted from its rule),
//!         num_ctx normalization or cap, compaction (before the lease: a slow summary must
//!         not pin the target)
//!  → acquire: the in-flight guard, a lease from the lifecycle (load / queue); the runner's
//!         options, fixed while the lease is out, join the edits
//!  → apply the edits (keep_alive, options.num_ctx / num_batch, messages / input) in one rewrite
//!  → forward → ObservedBody (usage, guard + lease: finish once) → notes as headers
//! ```
//!
//! The body is read once, parsed once and copied at most once (the rewrite, when there is
//! an edit); the response is never buffered.

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use serde_json::value::RawValue;

use super::{inbound, local_error, observe, send, DataPlane, ModelRequest, ProxyBody, ProxyError};
use crate::context;
use crate::lifecycle::{
    self, runner, IdleHint, LifecycleError, LoadAsk, ModelFacts, ModelStatus, Shape,
};
use crate::providers::ops::OpError;
use crate::providers::{Endpoint, Operation, ProviderKind, UsageKeys};
use crate::rewrite::{self, Splice};
use crate::stats::InFlight;
use crate::transport::server::RequestBody;
use crate::upstream::ProviderState;

/// Set on a response whose request was compacted: `<tokens before>-><tokens after>`.
pub const COMPACTED_HEADER: &str = "x-llm-warden-compacted";
/// Set on a response whose request was pruned (with the compacted header):
/// `duplicates=<n>, images=<n>`.
pub const PRUNED_HEADER: &str = "x-llm-warden-pruned";
/// Set when Ollama's `num_ctx` was rewritten (to the loaded model's, to a cap, or to the
/// smaller context of a load under memory pressure): `<sent or "default">-><used>`.
pub const NUM_CTX_HEADER: &str = "x-llm-warden-num-ctx";
/// Set when the context memory pressure allows could not hold the request, even compacted,
/// and a larger one was chosen for it: `<the pressure's window>-><chosen>` (a runner loaded
/// smaller is reloaded at the chosen size).
pub const CONTEXT_HEADER: &str = "x-llm-warden-context";
/// Set when Ollama's `num_batch` was rewritten (memory pressure): `<sent or "default">-><used>`.
pub const NUM_BATCH_HEADER: &str = "x-llm-warden-num-batch";

/// Below this many bytes of messages a prompt fits any window: no window is looked up.
const SMALL_PROMPT: usize = 1024;

/// One model request between the phases: what was read, what was decided, what to edit.
struct Call<'a> {
    state: &'a DataPlane,
    provider: usize,
    p: &'a ProviderState,
    endpoint: Endpoint,
    arrived: Instant,
    /// The body as read; edited once, at the end.
    bytes: &'a Bytes,
    /// Its one parse.
    parsed: &'a ModelRequest<'a>,
    /// What it asks of the context, from `options` and the reply limits (parsed once).
    limits: inbound::Limits,
    /// The canonical model name.
    model: String,
    keep_alive: KeepAlivePlan,
    /// Ollama's native API: the request carries runner options.
    native: bool,
    edits: Edits,
    /// Prompt tokens, when counted (to calibrate against the provider's count).
    estimate: Option<u64>,
    /// The window memory pressure chose and the larger one the request needs
    /// ([`CONTEXT_HEADER`]): its load (or reload) gets at least that.
    raised: Option<(u64, u64)>,
}

/// What the proxy changes in the body, applied in one rewrite just before forwarding.
#[derive(Debug, Default)]
struct Edits {
    /// `keep_alive` to `-1` (Ollama native: the proxy owns unloading).
    keep_alive: bool,
    /// `options.num_ctx` / `options.num_batch` as forwarded, when they differ from what was
    /// sent (the notes keep what was sent).
    num_ctx: Option<u64>,
    num_batch: Option<u64>,
    /// `messages` after compaction (raw JSON), with the prompt tokens before and after.
    messages: Option<(String, u64, u64)>,
    /// Duplicates and images pruned from `messages`, when any.
    pruned: Option<(u32, u32)>,
}

/// Forwards a model request (see the module doc).
pub(super) async fn inspected(
    state: &DataPlane,
    provider: usize,
    endpoint: Endpoint,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let arrived = Instant::now();
    let p = &state.providers[provider];
    let kind = p.config.kind;
    let (mut parts, body) = req.into_parts();
    // A coded body (gzip, ...) is decoded by some providers (LM Studio's body parser,
    // llama-server built with zlib) and would be read by none of the proxy's rules.
    if let Some(coding) = content_coding(&parts.headers) {
        let e = ProxyError::UnsupportedEncoding(coding);
        return local_error(p, &e, endpoint.errors);
    }
    let max_body = state.config.load().proxy.max_request_body;
    let read = inbound::read_body(&parts.headers, body, max_body).await;
    let bytes = match read {
        Ok(b) => b,
        Err(e) => return local_error(p, &e, endpoint.errors),
    };
    // The body goes upstream whole: the client sets its length from the bytes, so an edit
    // can never leave a stale Content-Length behind.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    if endpoint.operation == Operation::Transcription {
        return transcription(state, provider, endpoint, parts, bytes, arrived).await;
    }
    // Read as the provider reads it; what it cannot read that way is refused here, so no
    // model request reaches the provider outside a lease (inbound.rs).
    let parsed = match ModelRequest::parse(&bytes, dialect(kind)) {
        Ok(p) => p,
        // Every such provider refuses it too: its own error, byte for byte, uncounted.
        Err(e) if e.provider_refuses() => {
            return forward(state, p, endpoint, parts, bytes, None).await
        }
        Err(e) => return local_error(p, &ProxyError::from(e), endpoint.errors),
    };
    // A readable object without a model: the provider answers with its own error, unchanged
    // (Ollama: 400 "model is required" on chat, 404 "model '' not found" on generate and
    // embed, server/routes.go), and nothing is counted.
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
    let mut call = Call {
        state,
        provider,
        p,
        endpoint,
        arrived,
        bytes: &bytes,
        parsed: &parsed,
        limits: parsed.limits(),
        native: endpoint.usage == UsageKeys::OllamaNative,
        edits: Edits {
            keep_alive: keep_alive.rewrite,
            ..Edits::default()
        },
        keep_alive,
        model,
        estimate: None,
        raised: None,
    };
    if let Err(e) = call.fit().await {
        let mut g = state
            .stats
            .begin(provider, &call.model, endpoint.label, arrived);
        g.fail(e.status());
        return local_error(p, &e, endpoint.errors);
    }
    let guard = match call.acquire().await {
        Ok(g) => g,
        Err(resp) => return resp,
    };
    let body = call.apply_edits();
    let notes = call.notes();
    drop(call);
    drop(parsed);
    let mut resp = forward(state, p, endpoint, parts, body, Some(guard)).await;
    notes.write(&mut resp);
    resp
}

/// An audio transcription: a `multipart/form-data` body, not JSON. Its model is read as the
/// provider reads the form (multipart.rs); a form that names none, or that the provider
/// refuses before it loads anything, is answered here (400, Ollama's words, nothing counted
/// or leased). Otherwise counted and leased as any model request, and forwarded byte for
/// byte: there is nothing to fit or edit.
async fn transcription(
    state: &DataPlane,
    provider: usize,
    endpoint: Endpoint,
    parts: http::request::Parts,
    bytes: Bytes,
    arrived: Instant,
) -> Response<ProxyBody> {
    let p = &state.providers[provider];
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(http::HeaderValue::as_bytes);
    let read = super::multipart::transcription_model(content_type, parts.uri.query(), &bytes);
    let model = match read {
        Ok(m) => p.config.kind.canonical_model(&m).into_owned(),
        Err(e) => return local_error(p, &ProxyError::from(e), endpoint.errors),
    };
    let parsed = ModelRequest::default();
    let mut call = Call {
        state,
        provider,
        p,
        endpoint,
        arrived,
        bytes: &bytes,
        parsed: &parsed,
        limits: inbound::Limits::default(),
        model,
        keep_alive: KeepAlivePlan::default(),
        native: false,
        edits: Edits::default(),
        estimate: None,
        raised: None,
    };
    let guard = match call.acquire().await {
        Ok(g) => g,
        Err(resp) => return resp,
    };
    drop(call);
    forward(state, p, endpoint, parts, bytes, Some(guard)).await
}

/// Whose JSON reading a provider's bodies get (inbound.rs).
pub fn dialect(kind: ProviderKind) -> inbound::Dialect {
    match kind {
        ProviderKind::Ollama => inbound::Dialect::Go,
        ProviderKind::LmStudio => inbound::Dialect::JavaScript,
        ProviderKind::LlamaCpp => inbound::Dialect::Nlohmann,
    }
}

/// The request's `Content-Encoding`, unless absent or `identity` (as written, for the error).
fn content_coding(headers: &http::HeaderMap) -> Option<String> {
    let mut codings = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    codings
        .next()
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

impl Call<'_> {
    fn kind(&self) -> ProviderKind {
        self.p.config.kind
    }

    /// What a load started for this request should get: its own runner options, capped
    /// under memory pressure by the actor; the provider's defaults when the request cannot
    /// carry runner options (Ollama's `/v1`).
    fn load_ask(&self) -> LoadAsk {
        if self.kind() == ProviderKind::Ollama && !self.native {
            return LoadAsk::Defaults;
        }
        let shape = Shape {
            num_ctx: self.edits.num_ctx.or(self.limits.num_ctx),
            num_batch: self.limits.num_batch,
        };
        match self.raised {
            Some((_, floor)) => LoadAsk::AtLeast(shape, floor),
            None => LoadAsk::Options(shape),
        }
    }

    /// The runner options a native Ollama request will carry, as far as can be known before
    /// the lease: those of the runner the proxy loaded (or is loading) smaller, or, with the
    /// model not loaded and memory under pressure, what the actor's rule will give its load.
    /// Default: as sent. `facts`: what the lifecycle published of the model.
    fn expected_runner(&self, facts: Option<ModelFacts>) -> Shape {
        if !self.native {
            return Shape::default();
        }
        if let Some(f) = facts {
            if matches!(
                f.status,
                ModelStatus::Ready | ModelStatus::Loading | ModelStatus::Unloading
            ) {
                return f.runner;
            }
        }
        let live = self.state.config.load();
        let cap = runner::cap(
            self.kind(),
            self.state.monitor.level(),
            u64::from(live.buffers.context_initial),
            u64::from(live.buffers.working_initial),
        );
        Shape {
            num_ctx: cap
                .num_ctx
                .and(runner::capped(cap.num_ctx, self.limits.num_ctx)),
            num_batch: None,
        }
    }

    /// The fit phase: the model's window, `num_ctx` normalization and cap (Ollama), and the
    /// compactor; conversations only: chat and Messages `messages`, Responses `input`. An
    /// error: the conversation cannot fit (400).
    async fn fit(&mut self) -> Result<(), ProxyError> {
        let parsed = self.parsed;
        let (messages, api) = match self.endpoint.operation {
            Operation::Chat => (parsed.messages, context::Api::Chat),
            Operation::Messages => (
                parsed.messages,
                context::Api::Messages {
                    system: parsed.system,
                },
            ),
            Operation::Responses => (
                parsed.input,
                context::Api::Responses {
                    instructions: parsed.instructions,
                    previous_response_id: parsed.previous_response_id.is_some(),
                },
            ),
            Operation::Completion | Operation::Embedding | Operation::Transcription => {
                return Ok(())
            }
        };
        let Some(messages) = messages else {
            return Ok(());
        };
        let cx = &*self.state.compactor;
        let messages_len = messages.get().len() + api.fixed().map_or(0, |f| f.get().len());
        let sent_ctx = self.limits.num_ctx;
        // What the lifecycle published of the model, read once: the window it runs with
        // (the actor publishes it from its own loads at once, and from the provider's list
        // for loads made by others) and its runner options.
        let mut facts = self.p.lifecycle.facts(&self.model);
        let expected = self.expected_runner(facts);
        let shaped = !expected.is_default();
        let loaded_window = facts.and_then(|f| f.window);
        let mut known = loaded_window;
        if known.is_none() && sent_ctx.is_none() && messages_len > SMALL_PROMPT {
            known = cx.configured_window(&self.model);
            if known.is_none() && self.p.managed() {
                // Not seen loaded yet: load it now (as the request would) to learn its window.
                let loaded = self.p.lifecycle.load(&self.model, self.load_ask()).await;
                if let Ok(view) = loaded {
                    known = view.context_length;
                    facts = self.p.lifecycle.facts(&self.model);
                }
            }
        }
        let mut req = context::ChatRequest {
            provider: self.provider,
            model: &self.model,
            messages: Some(messages),
            api,
            max_reply: self.limits.max_reply,
            raise_to: None,
        };
        let mut window = if shaped {
            expected.num_ctx.or(sent_ctx).or(known)
        } else {
            sent_ctx.or(known)
        };
        if self.native && !shaped {
            if let Some(sent) = sent_ctx {
                // Ollama reloads a model whose loaded num_ctx differs from the request's:
                // keep the loaded one when the prompt fits it for sure.
                let normalize = loaded_window.filter(|&loaded| {
                    cx.normalize_num_ctx()
                        && sent != loaded
                        && crate::tokens::upper_bound(messages_len)
                            <= cx.prompt_budget(&req, loaded)
                });
                // A client asking for more context than `buffers.context.max` (`initial`
                // under memory pressure) gets that much: the KV cache Ollama would allocate
                // is bounded. The conversation is then fitted into the capped window.
                let cap = cx.context_cap();
                let set = normalize.or((sent > cap).then_some(cap));
                if let Some(n) = set {
                    self.edits.num_ctx = Some(n);
                    window = Some(n);
                }
            }
        }
        let Some(window) = window else {
            return Ok(());
        };
        // Memory pressure chose this window (a runner loaded or about to load smaller, or a
        // client's num_ctx capped at `initial`): a request it cannot hold gets a larger one,
        // up to `buffers.context.max` (and the client's own num_ctx).
        let imposed = facts.and_then(|f| f.runner.num_ctx) == Some(window);
        let capped = cx.pressed() && self.edits.num_ctx == Some(window) && sent_ctx > Some(window);
        if (shaped && expected.num_ctx == Some(window)) || imposed || capped {
            let max = cx.context_max();
            req.raise_to = Some(sent_ctx.map_or(max, |s| s.min(max)));
        }
        let stage = context::Stage {
            compactor: cx,
            providers: self.state,
        };
        let (fit, used) = context::fit(stage, &req, window).await;
        if used != window {
            self.raised = Some((window, used));
            if self.native {
                self.edits.num_ctx = (Some(used) != sent_ctx).then_some(used);
            }
        }
        match fit {
            context::Fit::Unchanged { estimate } => self.estimate = estimate,
            context::Fit::Rewritten {
                messages,
                before,
                after,
                pruned,
            } => {
                self.estimate = Some(after);
                self.edits.messages = Some((messages, before, after));
                self.edits.pruned = pruned.map(|p| (p.duplicates, p.images));
            }
            context::Fit::Reject {
                tokens,
                window,
                why,
            } => {
                return Err(ProxyError::ContextOverflow {
                    model: self.model.clone(),
                    tokens,
                    window,
                    why,
                })
            }
        }
        Ok(())
    }

    /// The acquire phase: counted in flight from here, with a lease on the model (the actor
    /// loads it or queues the request as needed). Under the lease the runner's options are
    /// fixed, and a native Ollama request is given them.
    async fn acquire(&mut self) -> Result<InFlight, Response<ProxyBody>> {
        let (state, p, endpoint) = (self.state, self.p, self.endpoint);
        let mut guard = state
            .stats
            .begin(self.provider, &self.model, endpoint.label, self.arrived);
        if let Some((_, before, after)) = self.edits.messages {
            guard.compacted(before, after);
        }
        match self.estimate {
            Some(e) => {
                let counter = state.compactor.counter.clone();
                let (pname, mname) = (p.config.name.clone(), self.model.clone());
                guard.estimated(
                    e,
                    Box::new(move |reported| {
                        // The ratio is learned on uncalibrated estimates.
                        let ratio = counter.ratio(&pname, &mname);
                        let uncalibrated = (e as f64 / ratio).round() as u64;
                        counter.calibrate(&pname, &mname, uncalibrated, reported);
                    }),
                );
            }
            None => guard.not_estimated(),
        }
        // A llama-server with one model: always loaded, nothing to acquire.
        if !p.managed() {
            return Ok(guard);
        }
        let asked = Instant::now();
        let acquired = p
            .lifecycle
            .acquire(&self.model, self.keep_alive.hint, self.load_ask())
            .await;
        match acquired {
            Ok(lease) => guard.attach(lease, asked.elapsed()),
            // The provider does not know the model: let it say so itself, in its own words.
            Err(LifecycleError::NotFound { .. }) => return Ok(guard),
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
                return Err(local_error(p, &e, endpoint.errors));
            }
            Err(e) => {
                let e = ProxyError::Lifecycle(e);
                guard.fail(e.status());
                return Err(local_error(p, &e, endpoint.errors));
            }
        }
        if self.native {
            if let Some(runner) = p.lifecycle.runner(&self.model) {
                // Ollama reloads a runner whose options differ from a request's.
                // The runner's value wins over any normalization; none is needed where the
                // request sent it already.
                if let Some(n) = runner.num_ctx {
                    // Never less than the request was fitted to (the actor reloads a runner
                    // smaller than that before granting the lease).
                    let n = self.raised.map_or(n, |(_, floor)| n.max(floor));
                    self.edits.num_ctx = (Some(n) != self.limits.num_ctx).then_some(n);
                }
                if let Some(n) = runner.num_batch {
                    self.edits.num_batch = (Some(n) != self.limits.num_batch).then_some(n);
                }
            }
        }
        Ok(guard)
    }

    /// The body to forward: the edits applied in one rewrite, or the bytes as read.
    fn apply_edits(&self) -> Bytes {
        let e = &self.edits;
        if !e.keep_alive && e.num_ctx.is_none() && e.num_batch.is_none() && e.messages.is_none() {
            return self.bytes.clone();
        }
        let span = |v: Option<&RawValue>| v.map(|r| rewrite::span_in(self.bytes, r));
        let options = self.options_edit();
        // At most three edits: kept on the stack.
        let none = || Splice {
            key: "",
            at: None,
            raw: b"",
        };
        let mut splices: [Splice<'_>; 3] = [none(), none(), none()];
        let mut n = 0;
        if e.keep_alive {
            splices[n] = Splice {
                key: "keep_alive",
                at: self.keep_alive.at.clone(),
                raw: b"-1",
            };
            n += 1;
        }
        if let Some(o) = &options {
            splices[n] = Splice {
                key: "options",
                at: span(self.parsed.options),
                raw: o,
            };
            n += 1;
        }
        // The compacted array: `input` in the Responses API, `messages` elsewhere.
        let (key, array) = match self.endpoint.operation {
            Operation::Responses => ("input", self.parsed.input),
            _ => ("messages", self.parsed.messages),
        };
        if let (Some((m, _, _)), Some(at)) = (&e.messages, span(array)) {
            splices[n] = Splice {
                key,
                at: Some(at),
                raw: m.as_bytes(),
            };
            n += 1;
        }
        match rewrite::splice(self.bytes, &splices[..n]) {
            Ok(b) => Bytes::from(b),
            Err(err) => {
                // The parse accepted it as an object: not expected; forward it as sent.
                tracing::warn!(error = %err, "request body could not be edited");
                self.bytes.clone()
            }
        }
    }

    /// `options` with `num_ctx` / `num_batch` set as edited (the object is small: parsed
    /// here, not the body).
    fn options_edit(&self) -> Option<Vec<u8>> {
        let e = &self.edits;
        let set: Vec<(&str, u64)> = [("num_ctx", e.num_ctx), ("num_batch", e.num_batch)]
            .into_iter()
            .filter_map(|(k, n)| Some((k, n?)))
            .collect();
        if set.is_empty() {
            return None;
        }
        rewrite::with_numbers(self.parsed.options_object(), &set).ok()
    }

    /// What the response says the proxy changed.
    fn notes(&self) -> Notes {
        let e = &self.edits;
        Notes {
            compacted: e.messages.as_ref().map(|(_, b, a)| (*b, *a)),
            pruned: e.pruned,
            num_ctx: e.num_ctx.map(|n| (self.limits.num_ctx, n)),
            num_batch: e.num_batch.map(|n| (self.limits.num_batch, n)),
            context: self.raised,
        }
    }
}

/// What Ollama's `keep_alive` asks, and what the proxy does with it.
#[derive(Clone, Debug, Default)]
struct KeepAlivePlan {
    /// The client's value, as a hint to the lifecycle.
    hint: Option<IdleHint>,
    /// Set `keep_alive` to -1 upstream.
    rewrite: bool,
    /// A load-only `/api/generate` or `/api/chat` with `keep_alive: 0`: an unload.
    unload: bool,
    /// Where the client's `keep_alive` value sits in the body as read (`None`: absent).
    at: Option<Range<usize>>,
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
        // Only generate and chat have an unload form: Ollama's `GenerateHandler` (`req.Prompt
        // == "" && req.KeepAlive.Duration == 0` → `s.sched.expireRunner`) and `ChatHandler`
        // (`len(req.Messages) == 0`, the same), server/routes.go. Its `EmbedHandler` and
        // `EmbeddingsHandler` have none: they schedule the runner with the request's
        // keep_alive (`scheduleRunner`), answer (an empty input: empty embeddings, the model
        // loaded), and the runner then expires after keep_alive. So on embed `0` stays what
        // any other value is: an idle hint (the proxy may unload the model once this request
        // is done, never under it).
        let unload_form = matches!(endpoint.operation, Operation::Chat | Operation::Completion);
        KeepAlivePlan {
            hint,
            rewrite,
            unload: unload_form
                && hint == Some(IdleHint::After(Duration::ZERO))
                && parsed.is_load_only(),
            at: parsed.keep_alive.map(|r| rewrite::span_in(body, r)),
        }
    }
}

/// What the proxy changed in a request, for the response headers.
#[derive(Debug, Default)]
struct Notes {
    /// Prompt tokens before and after compaction.
    compacted: Option<(u64, u64)>,
    /// Duplicates and images pruned.
    pruned: Option<(u32, u32)>,
    /// Ollama `num_ctx` as sent (`None`: absent) and as forwarded.
    num_ctx: Option<(Option<u64>, u64)>,
    /// Ollama `num_batch` as sent and as forwarded.
    num_batch: Option<(Option<u64>, u64)>,
    /// The window memory pressure allowed and the one chosen for the request.
    context: Option<(u64, u64)>,
}

impl Notes {
    fn write(&self, resp: &mut Response<ProxyBody>) {
        for (name, note) in [
            (COMPACTED_HEADER, self.compacted),
            (CONTEXT_HEADER, self.context),
        ] {
            if let Some((before, after)) = note {
                if let Ok(v) = http::HeaderValue::from_str(&format!("{before}->{after}")) {
                    resp.headers_mut().insert(name, v);
                }
            }
        }
        if let Some((duplicates, images)) = self.pruned {
            let v = format!("duplicates={duplicates}, images={images}");
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                resp.headers_mut().insert(PRUNED_HEADER, v);
            }
        }
        for (name, note) in [
            (NUM_CTX_HEADER, self.num_ctx),
            (NUM_BATCH_HEADER, self.num_batch),
        ] {
            if let Some((sent, used)) = note {
                let sent = sent.map_or_else(|| "default".to_string(), |n| n.to_string());
                if let Ok(v) = http::HeaderValue::from_str(&format!("{sent}->{used}")) {
                    resp.headers_mut().insert(name, v);
                }
            }
        }
    }
}

/// Sends an inspected request upstream and observes its response (when it is counted).
async fn forward(
    state: &DataPlane,
    p: &ProviderState,
    endpoint: Endpoint,
    parts: http::request::Parts,
    bytes: Bytes,
    mut guard: Option<InFlight>,
) -> Response<ProxyBody> {
    // The answer's headers are only added to here (the notes), never read: for an HTTP/1
    // client they may stay as the provider wrote them (`codec::RawHeaders`).
    let raw_ok = parts.version < http::Version::HTTP_2;
    let up = match super::forward::upstream_request(
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
            super::forward::downstream_headers(&mut resp);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderKind;

    fn plan(path: &str, body: &str) -> KeepAlivePlan {
        let endpoint = ProviderKind::Ollama
            .classify(path)
            .expect("an inspected endpoint");
        let parsed = ModelRequest::parse(body.as_bytes(), inbound::Dialect::Go).expect("readable");
        KeepAlivePlan::of(endpoint, body.as_bytes(), &parsed)
    }

    #[test]
    fn keep_alive_zero_unloads_only_on_generate_and_chat() {
        let zero = Some(IdleHint::After(Duration::ZERO));
        for (path, body) in [
            ("/api/generate", r#"{"model":"m","keep_alive":0}"#),
            (
                "/api/generate",
                r#"{"model":"m","prompt":"","keep_alive":"0s"}"#,
            ),
            ("/api/chat", r#"{"model":"m","messages":[],"keep_alive":0}"#),
        ] {
            let p = plan(path, body);
            assert!(p.unload, "{path} {body}");
            assert_eq!(p.hint, zero);
        }
        for (path, body) in [
            ("/api/embed", r#"{"model":"m","keep_alive":0}"#),
            ("/api/embed", r#"{"model":"m","input":"hi","keep_alive":0}"#),
            (
                "/api/embed",
                r#"{"model":"m","input":[],"keep_alive":"0s"}"#,
            ),
            ("/api/embeddings", r#"{"model":"m","keep_alive":0}"#),
            (
                "/api/embeddings",
                r#"{"model":"m","prompt":"hi","keep_alive":0}"#,
            ),
            // A prompt: a request that runs, not an unload.
            (
                "/api/generate",
                r#"{"model":"m","prompt":"hi","keep_alive":0}"#,
            ),
        ] {
            let p = plan(path, body);
            assert!(!p.unload, "{path} {body}");
            assert_eq!(p.hint, zero, "0 stays an idle hint: {path} {body}");
            assert!(p.rewrite, "the provider is told -1: {path} {body}");
        }
    }
}
