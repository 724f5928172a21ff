//! Watching an LM Studio SDK socket on `/llm` as it is spliced: predictions are counted and
//! leased, loads and unloads reach the lifecycle.
//!
//! The bytes pass through unchanged, chunk by chunk; a copy of each text frame (whole, not
//! compressed, at most [`MAX_FRAME`] bytes) is read as the SDK's JSON message. A frame the
//! watcher cannot read (binary, fragmented, larger, not JSON) passes untouched and unread.
//!
//! - client `channelCreate{endpoint:"predict", channelId, creationParameter:{modelSpecifier}}`:
//!   the model is resolved (the query's `identifier`, or an `instanceReference` learned from
//!   the server's instance infos), counted in flight (`stats::InFlight`, endpoint
//!   `sdk_predict`) and leased from the lifecycle *before* the frame's last byte goes
//!   upstream, so a queued or loading model holds the request as it holds a REST one. The
//!   guard (and its lease) is the channel's until the server's `channelClose` (completed, the
//!   tokens of the `success` message's `stats`), `channelError` (failed) or the end of the
//!   socket (cancelled: the guard's drop keeps the lease [`crate::stats::CANCEL_GRACE`] more).
//! - `loadModel` / `getOrLoad` channels that succeed and `unloadModel` RPCs that return
//!   changed the provider behind the lifecycle's back: [`crate::lifecycle::LifecycleHandle::changed_outside`]
//!   has the provider polled now, and the poll's report reconciles the table, as for any
//!   load made elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::DataPlane;
use crate::lifecycle::{LifecycleError, LoadAsk};
use crate::stats::InFlight;
use crate::transport::websocket::{self, Head};

/// The largest text frame the watcher reads; larger ones pass unread.
pub(super) const MAX_FRAME: u64 = 1024 * 1024;

/// The socket path whose channels are watched (the SDK's LLM namespace).
pub(super) const LLM_PATH: &str = "/llm";

/// Reassembles whole frames of one direction from the chunks that pass.
#[derive(Default)]
pub(super) struct FrameReader {
    pending: Vec<u8>,
    /// Bytes of an unreadable frame still to pass unread.
    skip: u64,
}

impl FrameReader {
    /// Reads `chunk`; the payloads (unmasked) of the readable text frames it completes go to
    /// `out`.
    pub(super) fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<Vec<u8>>) {
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
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
            let readable = head.opcode == websocket::TEXT
                && head.fin
                && head.rsv == 0
                && head.payload_len <= MAX_FRAME;
            if !readable {
                if have >= head.frame_len() {
                    at += head.frame_len() as usize;
                    continue;
                }
                self.skip = head.frame_len() - have;
                at = self.pending.len();
                break;
            }
            if have < head.frame_len() {
                break;
            }
            let end = at + head.frame_len() as usize;
            let mut payload = self.pending[at + head.head_len..end].to_vec();
            if let Some(k) = head.mask {
                websocket::apply_mask(&mut payload, k, 0);
            }
            out.push(payload);
            at = end;
        }
        self.pending.drain(..at);
    }
}

/// What one socket's channels hold.
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
    /// `callId`s of `unloadModel` calls.
    unloads: Vec<u64>,
}

/// One watched socket. Dropping it ends what its channels still hold (cancelled).
pub(super) struct Watch {
    state: Arc<DataPlane>,
    provider: usize,
    channels: Mutex<Channels>,
}

impl Watch {
    pub(super) fn new(state: Arc<DataPlane>, provider: usize) -> Self {
        Watch {
            state,
            provider,
            channels: Mutex::new(Channels::default()),
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A message from the client, before its last byte goes upstream.
    async fn client_message(&self, payload: &[u8]) {
        let Ok(msg) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let field = |k: &str| msg.get(k).and_then(Value::as_str);
        match (field("type"), field("endpoint")) {
            (Some("channelCreate"), Some("predict")) => {
                let Some(id) = msg.get("channelId").and_then(Value::as_u64) else {
                    return;
                };
                let spec = msg.pointer("/creationParameter/modelSpecifier");
                let Some(model) = spec.and_then(|s| self.model_of(s)) else {
                    tracing::debug!("SDK predict without a model this proxy can name: not counted");
                    return;
                };
                let guard = self.begin(&model).await;
                self.channels().open.insert(id, Channel::Predict(guard));
            }
            (Some("channelCreate"), Some("loadModel" | "getOrLoad")) => {
                if let Some(id) = msg.get("channelId").and_then(Value::as_u64) {
                    self.channels().open.insert(id, Channel::Load);
                }
            }
            (Some("rpcCall"), Some("unloadModel")) => {
                if let Some(id) = msg.get("callId").and_then(Value::as_u64) {
                    self.channels().unloads.push(id);
                }
            }
            _ => {}
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

    /// Counts a prediction on `model` in flight and takes its lease (loading or queueing as
    /// a REST request would).
    async fn begin(&self, model: &str) -> InFlight {
        let p = &self.state.providers[self.provider];
        let mut guard = self
            .state
            .stats
            .begin(self.provider, model, "sdk_predict", Instant::now());
        guard.not_estimated();
        if !p.managed() {
            return guard;
        }
        let asked = Instant::now();
        let acquired = p.lifecycle.acquire(model, None, LoadAsk::Defaults).await;
        match acquired {
            Ok(lease) => guard.attach(lease, asked.elapsed()),
            // The provider answers for a model it does not have.
            Err(LifecycleError::NotFound { .. }) => {}
            Err(e) => {
                // The channel goes on for the provider's own answer; the request counts as
                // failed by the proxy's lifecycle.
                tracing::warn!(model, error = %e, "SDK predict: no lease");
                p.metrics.error(super::ProxyError::Lifecycle(e).kind());
                guard.fail(http::StatusCode::SERVICE_UNAVAILABLE);
            }
        }
        guard
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
                if let Some(call) = id("callId") {
                    if let Some(at) = ch.unloads.iter().position(|c| *c == call) {
                        ch.unloads.swap_remove(at);
                        changed = t == "rpcResult";
                    }
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

/// Splices `client` and `upstream` until both directions end, with `watch` reading both;
/// `first` (what the client sent before the splice) goes upstream first.
pub(super) async fn splice<C, U>(client: C, first: Vec<u8>, upstream: U, watch: Watch)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let watch = &watch;
    let up = async move {
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut msgs = Vec::new();
        reader.feed(&first, &mut msgs);
        for m in msgs.drain(..) {
            watch.client_message(&m).await;
        }
        if uw.write_all(&first).await.is_err() {
            let _ = uw.shutdown().await;
            return;
        }
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reader.feed(&buf[..n], &mut msgs);
            for m in msgs.drain(..) {
                watch.client_message(&m).await;
            }
            if uw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = uw.shutdown().await;
    };
    let down = async move {
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut msgs = Vec::new();
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reader.feed(&buf[..n], &mut msgs);
            for m in msgs.drain(..) {
                watch.server_message(&m);
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let mut r = FrameReader::default();
            let mut out = Vec::new();
            for chunk in wire.chunks(size) {
                r.feed(chunk, &mut out);
            }
            assert_eq!(
                out,
                vec![b"{\"a\":1}".to_vec(), b"second".to_vec()],
                "chunks of {size}"
            );
            assert!(r.pending.is_empty() && r.skip == 0);
        }
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
