//! Watching an LM Studio SDK socket on `/llm` or `/embedding` as it is spliced: predictions
//! and embeddings are counted and leased, loads and unloads reach the lifecycle.
//!
//! Each direction is cut into frames ([`FrameReader`]). A frame the watcher cannot read
//! (binary, a fragment, compressed, larger than [`MAX_FRAME`]) passes unchanged as its bytes
//! come. A readable text frame is held until whole, read as the SDK's JSON message, then
//! passes unchanged, or (client frames only) is withheld when the proxy refuses it.
//!
//! - client `channelCreate{endpoint:"predict", channelId, creationParameter:{modelSpecifier}}`
//!   on `/llm`, and `rpcCall{endpoint:"embedString", callId, parameter:{modelSpecifier}}` on
//!   `/embedding`: the model is resolved (the query's `identifier`, or an
//!   `instanceReference` learned from the server's instance infos on this socket), counted in
//!   flight (`stats::InFlight`, endpoint `sdk_predict` / `sdk_embed`) and leased from the
//!   lifecycle *before any byte of the frame goes upstream*, so a queued or loading model
//!   holds the request as it holds a REST one. The guard (and its lease) is the channel's
//!   until the server's `channelClose` (completed, the tokens of the `success` message's
//!   `stats`), `channelError` (failed) or the end of the socket (cancelled: the guard's drop
//!   keeps the lease [`crate::stats::CANCEL_GRACE`] more); a call's until its `rpcResult` or
//!   `rpcError`.
//! - A lease the lifecycle refuses ends the request at the proxy, as for REST (nothing is
//!   forwarded outside a lease): the frame is withheld and the client gets the proxy's
//!   `channelError` / `rpcError` in the SDK's error shape (`SerializedLMSExtendedError`:
//!   `title`, `rootTitle`, `cause`, `suggestion`; lmstudio-python `json_api.py`
//!   `LMStudioServerError`). It is put into the server's stream only between two of its
//!   frames and outside a fragmented message ([`FrameReader::at_boundary`]). The client's
//!   later messages on a refused channel are withheld too.
//! - `loadModel` / `getOrLoad` channels that succeed and `unloadModel` RPCs that return
//!   changed the provider behind the lifecycle's back: [`crate::lifecycle::LifecycleHandle::changed_outside`]
//!   has the provider polled now, and the poll's report reconciles the table, as for any
//!   load made elsewhere.
//!
//! While a lease is awaited, the socket's later client frames wait behind it (the frames of
//! one socket stay in order); the wait is bounded by `queue.timeout`, as a REST request's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::DataPlane;
use super::ProxyError;
use crate::lifecycle::{LifecycleError, LoadAsk};
use crate::providers::ops::OpError;
use crate::stats::InFlight;
use crate::transport::websocket::{self, Head};

/// The largest text frame the watcher reads; larger ones pass unread.
pub(super) const MAX_FRAME: u64 = 1024 * 1024;

/// What passes one direction of the splice, in order: bytes the watcher does not read (an
/// unreadable frame's, as they come), or a whole readable text frame.
pub(super) enum Piece {
    Pass(Vec<u8>),
    Text { raw: Vec<u8>, payload: Vec<u8> },
}

/// Cuts one direction's chunks into [`Piece`]s: a readable text frame is held until it is
/// whole (so it can be withheld), anything else passes as it comes.
#[derive(Default)]
pub(super) struct FrameReader {
    /// The start of a frame not yet whole (at most a head, or a readable frame).
    pending: Vec<u8>,
    /// Bytes of an unreadable frame still to pass unread.
    skip: u64,
    /// Inside a fragmented message (a data frame without FIN seen, its last one not yet).
    in_message: bool,
}

impl FrameReader {
    /// Reads `chunk`; what may pass goes to `out`.
    pub(super) fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<Piece>) {
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
            out.push(Piece::Pass(chunk[..n].to_vec()));
            self.skip -= n as u64;
            chunk = &chunk[n..];
            if self.skip > 0 {
                return;
            }
        }
        self.pending.extend_from_slice(chunk);
        // Frames are taken from `at` on; what they used goes in one move at the end.
        let mut at = 0;
        while let Some(head) = Head::parse(&self.pending[at..]) {
            let have = (self.pending.len() - at) as u64;
            if head.opcode & 0x8 == 0 {
                // A data frame; control frames may come between a message's fragments.
                self.in_message = !head.fin;
            }
            let readable = head.opcode == websocket::TEXT
                && head.fin
                && head.rsv == 0
                && head.payload_len <= MAX_FRAME;
            if !readable {
                let take = have.min(head.frame_len());
                let end = at + take as usize;
                out.push(Piece::Pass(self.pending[at..end].to_vec()));
                at = end;
                if take < head.frame_len() {
                    self.skip = head.frame_len() - take;
                    break;
                }
                continue;
            }
            if have < head.frame_len() {
                break;
            }
            let end = at + head.frame_len() as usize;
            let raw = self.pending[at..end].to_vec();
            let mut payload = raw[head.head_len..].to_vec();
            if let Some(k) = head.mask {
                websocket::apply_mask(&mut payload, k, 0);
            }
            out.push(Piece::Text { raw, payload });
            at = end;
        }
        self.pending.drain(..at);
    }

    /// Whether a whole frame of this direction's sender may be put in now: nothing passed is
    /// a frame's part, and no fragmented message is open.
    pub(super) fn at_boundary(&self) -> bool {
        self.skip == 0 && !self.in_message
    }
}

/// What one socket's channels and calls hold.
enum Channel {
    Predict(InFlight),
    Load,
}

#[derive(Default)]
struct Channels {
    /// `instanceReference` → the instance's identifier, as the server's infos said.
    refs: HashMap<String, String>,
    /// By `channelId`.
    open: HashMap<u64, Channel>,
    /// `embedString` calls in flight, by `callId`.
    embeds: HashMap<u64, InFlight>,
    /// `callId`s of `unloadModel` calls.
    unloads: Vec<u64>,
    /// Channels and calls the proxy refused (never sent upstream): the client's later
    /// messages on them are not sent either.
    refused_channels: HashSet<u64>,
}

/// The SDK namespace a socket speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Namespace {
    Llm,
    Embedding,
}

/// What becomes of a client's message.
pub(super) enum Verdict {
    /// It goes upstream.
    Forward,
    /// It is withheld; this whole frame goes to the client instead (the proxy's answer, in
    /// the SDK's own error message for the channel or call).
    Answer(Vec<u8>),
    /// It is withheld and needs no answer (a message on a refused channel).
    Drop,
}

/// One watched socket. Dropping it ends what its channels still hold (cancelled).
pub(super) struct Watch {
    state: Arc<DataPlane>,
    provider: usize,
    namespace: Namespace,
    channels: Mutex<Channels>,
}

impl Watch {
    /// A watch for an SDK socket on `path`, if it is a namespace whose messages use models
    /// (`/llm`, `/embedding`); other namespaces (`/system`, `/diagnostics`, ...) are spliced
    /// unread.
    pub(super) fn for_path(state: &Arc<DataPlane>, provider: usize, path: &str) -> Option<Self> {
        let namespace = match path {
            "/llm" => Namespace::Llm,
            "/embedding" => Namespace::Embedding,
            _ => return None,
        };
        Some(Watch {
            state: state.clone(),
            provider,
            namespace,
            channels: Mutex::new(Channels::default()),
        })
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A message from the client, whole, before any of its bytes go upstream.
    async fn client_message(&self, payload: &[u8]) -> Verdict {
        let Ok(msg) = serde_json::from_slice::<Value>(payload) else {
            return Verdict::Forward;
        };
        let field = |k: &str| msg.get(k).and_then(Value::as_str);
        let num = |k: &str| msg.get(k).and_then(Value::as_u64);
        match (field("type"), field("endpoint"), self.namespace) {
            (Some("channelCreate"), Some("predict"), Namespace::Llm) => {
                let Some(id) = num("channelId") else {
                    return Verdict::Forward;
                };
                let spec = msg.pointer("/creationParameter/modelSpecifier");
                let Some(model) = spec.and_then(|s| self.model_of(s)) else {
                    tracing::debug!("SDK predict without a model this proxy can name: not counted");
                    return Verdict::Forward;
                };
                match self.begin(&model, "sdk_predict").await {
                    Ok(guard) => {
                        self.channels().open.insert(id, Channel::Predict(guard));
                        Verdict::Forward
                    }
                    Err(error) => {
                        self.channels().refused_channels.insert(id);
                        answer(json!({"type": "channelError", "channelId": id, "error": error}))
                    }
                }
            }
            (Some("rpcCall"), Some("embedString"), Namespace::Embedding) => {
                let Some(id) = num("callId") else {
                    return Verdict::Forward;
                };
                let spec = msg.pointer("/parameter/modelSpecifier");
                let Some(model) = spec.and_then(|s| self.model_of(s)) else {
                    tracing::debug!(
                        "SDK embedding without a model this proxy can name: not counted"
                    );
                    return Verdict::Forward;
                };
                match self.begin(&model, "sdk_embed").await {
                    Ok(guard) => {
                        self.channels().embeds.insert(id, guard);
                        Verdict::Forward
                    }
                    Err(error) => answer(json!({"type": "rpcError", "callId": id, "error": error})),
                }
            }
            (Some("channelCreate"), Some("loadModel" | "getOrLoad"), _) => {
                if let Some(id) = num("channelId") {
                    self.channels().open.insert(id, Channel::Load);
                }
                Verdict::Forward
            }
            (Some("rpcCall"), Some("unloadModel"), _) => {
                if let Some(id) = num("callId") {
                    self.channels().unloads.push(id);
                }
                Verdict::Forward
            }
            (Some("channelSend" | "channelClose"), _, _) => {
                let refused = num("channelId").is_some_and(|id| {
                    let mut ch = self.channels();
                    // The client's own close ends what the proxy keeps of a refused channel.
                    if field("type") == Some("channelClose") {
                        ch.refused_channels.remove(&id)
                    } else {
                        ch.refused_channels.contains(&id)
                    }
                });
                if refused {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            }
            _ => Verdict::Forward,
        }
    }

    /// The model a `modelSpecifier` names: the query's identifier, or the instance a
    /// reference stands for.
    fn model_of(&self, spec: &Value) -> Option<String> {
        if let Some(s) = spec.as_str() {
            return Some(s.to_string());
        }
        let name = match spec.get("type").and_then(Value::as_str) {
            Some("instanceReference") => {
                let r = spec.get("instanceReference")?.as_str()?;
                self.channels().refs.get(r).cloned()?
            }
            _ => spec
                .pointer("/query/identifier")
                .or_else(|| spec.get("identifier"))?
                .as_str()?
                .to_string(),
        };
        let kind = self.state.providers[self.provider].config.kind;
        Some(kind.canonical_model(&name).into_owned())
    }

    /// Counts a request on `model` in flight as `endpoint` and takes its lease (loading or
    /// queueing as a REST request would). A lease the lifecycle refuses is the request's
    /// end: `Err` holds the SDK error (`SerializedLMSExtendedError`) for the client, and the
    /// request never goes upstream, as a refused REST request does not.
    async fn begin(&self, model: &str, endpoint: &'static str) -> Result<InFlight, Value> {
        let p = &self.state.providers[self.provider];
        let mut guard = self
            .state
            .stats
            .begin(self.provider, model, endpoint, Instant::now());
        guard.not_estimated();
        if !p.managed() {
            return Ok(guard);
        }
        let asked = Instant::now();
        let acquired = p.lifecycle.acquire(model, None, LoadAsk::Defaults).await;
        let e = match acquired {
            Ok(lease) => {
                guard.attach(lease, asked.elapsed());
                return Ok(guard);
            }
            // The provider answers for a model it does not have, in its own words.
            Err(LifecycleError::NotFound { .. }) => return Ok(guard),
            Err(LifecycleError::LoadFailed {
                source: OpError::Unreachable(reason),
                ..
            }) => {
                p.mark_unreachable(reason.clone());
                ProxyError::UpstreamUnreachable {
                    provider: p.config.name.clone(),
                    upstream: p.config.upstream.to_string(),
                    reason,
                }
            }
            Err(e) => ProxyError::Lifecycle(e),
        };
        tracing::warn!(model, error = %e, "SDK {endpoint}: refused, not sent upstream");
        p.metrics.error(e.kind());
        guard.fail(e.status());
        let title = e.to_string();
        Err(json!({
            "title": title,
            "rootTitle": title,
            "cause": "llm-warden (the proxy in front of LM Studio) refused the request",
            "suggestion": "Retry later, or see the proxy's /status",
        }))
    }

    /// A message from the server.
    fn server_message(&self, payload: &[u8]) {
        let Ok(msg) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let mut ch = self.channels();
        learn_refs(&msg, &mut ch.refs, 0);
        let id = |k: &str| msg.get(k).and_then(Value::as_u64);
        let mut changed = false;
        match msg.get("type").and_then(Value::as_str) {
            Some("channelSend") => {
                let Some(id) = id("channelId") else { return };
                let inner = msg.get("message");
                let t = inner.and_then(|m| m.get("type")).and_then(Value::as_str);
                match (ch.open.get_mut(&id), t) {
                    (Some(Channel::Predict(g)), Some("fragment")) => g.first_chunk(),
                    (Some(Channel::Predict(g)), Some("success")) => {
                        let stats = inner.and_then(|m| m.get("stats"));
                        let n = |k: &str| stats.and_then(|s| s.get(k)).and_then(Value::as_u64);
                        g.set_usage(n("promptTokensCount"), n("predictedTokensCount"));
                    }
                    (Some(Channel::Load), Some("success" | "loadSuccess")) => changed = true,
                    _ => {}
                }
            }
            Some("channelClose") => {
                if let Some(Channel::Predict(mut g)) =
                    id("channelId").and_then(|i| ch.open.remove(&i))
                {
                    g.set_status(http::StatusCode::OK);
                    g.complete();
                }
            }
            Some("channelError") => {
                if let Some(Channel::Predict(mut g)) =
                    id("channelId").and_then(|i| ch.open.remove(&i))
                {
                    g.fail_upstream("upstream_status");
                }
            }
            Some(t @ ("rpcResult" | "rpcError")) => {
                let Some(call) = id("callId") else { return };
                if let Some(mut g) = ch.embeds.remove(&call) {
                    if t == "rpcResult" {
                        g.first_chunk();
                        g.set_status(http::StatusCode::OK);
                        g.complete();
                    } else {
                        g.fail_upstream("upstream_status");
                    }
                } else if let Some(at) = ch.unloads.iter().position(|c| *c == call) {
                    ch.unloads.swap_remove(at);
                    changed = t == "rpcResult";
                }
            }
            _ => {}
        }
        drop(ch);
        if changed {
            self.state.providers[self.provider]
                .lifecycle
                .changed_outside();
        }
    }
}

/// A server text frame (unmasked) carrying `msg`.
fn answer(msg: Value) -> Verdict {
    Verdict::Answer(websocket::encode(
        websocket::TEXT,
        msg.to_string().as_bytes(),
        None,
    ))
}

/// Notes every `{instanceReference, identifier}` pair in `v` (instance infos: `loadModel`'s
/// `success`, `getOrLoad`'s, `listLoaded`'s and `getModelInfo`'s results).
fn learn_refs(v: &Value, refs: &mut HashMap<String, String>, depth: usize) {
    if depth > 8 {
        return;
    }
    match v {
        Value::Object(o) => {
            if let (Some(Value::String(r)), Some(Value::String(id))) =
                (o.get("instanceReference"), o.get("identifier"))
            {
                refs.insert(r.clone(), id.clone());
            }
            for x in o.values() {
                learn_refs(x, refs, depth + 1);
            }
        }
        Value::Array(a) => {
            for x in a {
                learn_refs(x, refs, depth + 1);
            }
        }
        _ => {}
    }
}

/// Adds `bytes` to what is to be written: taken as it is when nothing is waiting (the usual
/// case, one piece per read), so a chunk is not copied twice.
fn append(out: &mut Vec<u8>, bytes: Vec<u8>) {
    if out.is_empty() {
        *out = bytes;
    } else {
        out.extend_from_slice(&bytes);
    }
}

/// The client's side of a splice: its chunks cut into pieces, read, and sent on.
#[derive(Default)]
struct Sending {
    pieces: Vec<Piece>,
    out: Vec<u8>,
}

impl Sending {
    /// Sends on what of `chunk` may go upstream; `false` once upstream is gone.
    async fn pass<U: AsyncWrite + Unpin>(
        &mut self,
        reader: &mut FrameReader,
        chunk: &[u8],
        upstream: &mut U,
        watch: &Watch,
        answers: &tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    ) -> bool {
        reader.feed(chunk, &mut self.pieces);
        let out = &mut self.out;
        for piece in self.pieces.drain(..) {
            match piece {
                Piece::Pass(bytes) => append(out, bytes),
                Piece::Text { raw, payload } => {
                    // What came before goes first: a lease may take a while.
                    if !out.is_empty() && upstream.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                    match watch.client_message(&payload).await {
                        Verdict::Forward => append(out, raw),
                        Verdict::Answer(frame) => {
                            let _ = answers.send(frame);
                        }
                        Verdict::Drop => {}
                    }
                }
            }
        }
        let sent = out.is_empty() || upstream.write_all(out).await.is_ok();
        out.clear();
        sent
    }
}

/// Splices `client` and `upstream` until both directions end, with `watch` reading both;
/// `first` (what the client sent before the splice) goes upstream first.
///
/// A client's readable text frame goes upstream only once the watcher has read it whole (a
/// prediction's lease is taken first); one the watcher withholds may be answered by a frame
/// of the proxy's own, put into the server's stream between two of its frames (never inside
/// a frame or a fragmented message).
pub(super) async fn splice<C, U>(client: C, first: Vec<u8>, upstream: U, watch: Watch)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let watch = &watch;
    let up = async move {
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut sending = Sending::default();
        let mut ok = sending
            .pass(&mut reader, &first, &mut uw, watch, &answers)
            .await;
        while ok {
            ok = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    sending
                        .pass(&mut reader, &buf[..n], &mut uw, watch, &answers)
                        .await
                }
            };
        }
        let _ = uw.shutdown().await;
    };
    let down = async move {
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut pieces = Vec::new();
        let mut out = Vec::new();
        loop {
            tokio::select! {
                biased;
                Some(frame) = answered.recv(), if reader.at_boundary() => {
                    if cw.write_all(&frame).await.is_err() {
                        break;
                    }
                }
                read = ur.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    reader.feed(&buf[..n], &mut pieces);
                    for piece in pieces.drain(..) {
                        match piece {
                            Piece::Pass(bytes) => append(&mut out, bytes),
                            Piece::Text { raw, payload } => {
                                watch.server_message(&payload);
                                append(&mut out, raw);
                            }
                        }
                    }
                    if !out.is_empty() && cw.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                }
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in chunks of `size`: the bytes of all pieces, in order, and the
    /// payloads of the readable ones.
    fn cut(wire: &[u8], size: usize) -> (Vec<u8>, Vec<Vec<u8>>, FrameReader) {
        let mut r = FrameReader::default();
        let mut pieces = Vec::new();
        for chunk in wire.chunks(size) {
            r.feed(chunk, &mut pieces);
        }
        let (mut bytes, mut texts) = (Vec::new(), Vec::new());
        for p in pieces {
            match p {
                Piece::Pass(b) => bytes.extend(b),
                Piece::Text { raw, payload } => {
                    bytes.extend(raw);
                    texts.push(payload);
                }
            }
        }
        (bytes, texts, r)
    }

    #[test]
    fn frames_are_read_across_chunks_and_unreadable_ones_pass_unread() {
        let mut wire = Vec::new();
        wire.extend(websocket::encode(
            websocket::TEXT,
            b"{\"a\":1}",
            Some([9, 8, 7, 6]),
        ));
        wire.extend(websocket::encode(0x2, &[0u8; 300], Some([1, 1, 1, 1])));
        wire.extend(websocket::encode(
            websocket::TEXT,
            &vec![b' '; MAX_FRAME as usize + 1],
            None,
        ));
        wire.extend(websocket::encode(websocket::TEXT, b"second", None));
        for size in [1, 3, 7, 100, 70_000, wire.len()] {
            let (bytes, texts, r) = cut(&wire, size);
            assert_eq!(
                bytes, wire,
                "every byte passes, in order (chunks of {size})"
            );
            assert_eq!(
                texts,
                vec![b"{\"a\":1}".to_vec(), b"second".to_vec()],
                "chunks of {size}"
            );
            assert!(r.pending.is_empty() && r.skip == 0 && r.at_boundary());
        }
    }

    #[test]
    fn a_readable_frame_is_held_until_whole_and_nothing_goes_in_a_fragmented_message() {
        let whole = websocket::encode(websocket::TEXT, b"{\"type\":\"x\"}", None);
        let (bytes, texts, r) = cut(&whole[..whole.len() - 1], whole.len());
        assert!(bytes.is_empty() && texts.is_empty(), "held, not passed");
        assert!(r.at_boundary(), "an answer may go before a held frame");

        // A text message in two fragments with a ping between them: nothing may be put
        // in until its last fragment passed.
        let mut first = websocket::encode(websocket::TEXT, b"part one", None);
        first[0] &= 0x7f; // no FIN
        let ping = websocket::encode(0x9, b"", None);
        let last = websocket::encode(0x0, b" and two", None);
        let mut r = FrameReader::default();
        let mut pieces = Vec::new();
        r.feed(&first, &mut pieces);
        assert!(!r.at_boundary());
        r.feed(&ping, &mut pieces);
        assert!(!r.at_boundary(), "a control frame does not end the message");
        r.feed(&last[..3], &mut pieces);
        assert!(!r.at_boundary());
        r.feed(&last[3..], &mut pieces);
        assert!(r.at_boundary());
        assert!(
            pieces.iter().all(|p| matches!(p, Piece::Pass(_))),
            "fragments pass unread"
        );
    }

    #[test]
    fn instance_references_are_learned_from_infos_anywhere() {
        let mut refs = HashMap::new();
        let v = serde_json::json!({"type":"rpcResult","result":[
            {"identifier":"a","instanceReference":"r1"},
            {"info":{"identifier":"b","instanceReference":"r2"}}]});
        learn_refs(&v, &mut refs, 0);
        assert_eq!(refs.get("r1").map(String::as_str), Some("a"));
        assert_eq!(refs.get("r2").map(String::as_str), Some("b"));
    }
}
