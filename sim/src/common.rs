//! Pieces every simulator shares: the clock, the call log, the deterministic tokenizer,
//! Go-style JSON encoding, timestamp formats, streaming bodies and the accept loop.
//!
//! Nothing here knows about a particular provider; `ollama.rs` and `lmstudio.rs` build on it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Response body of every simulator route: a full body or a channel the handler streams into.
pub type SimBody = BoxBody<Bytes, Infallible>;

// === impl Clock ===

/// Wall clock the simulators read for timestamps, keep-alive and TTL expiry.
///
/// `Clock::manual` is frozen until a test calls `advance`, so two identical requests produce
/// identical bytes and expiry can be stepped exactly. Sleeps (load latency, token delay) do
/// not use this clock: they use `tokio::time`, which tests pause separately.
#[derive(Clone, Debug)]
pub struct Clock(Arc<ClockInner>);

#[derive(Debug)]
enum ClockInner {
    System,
    Manual(Mutex<SystemTime>),
}

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(ClockInner::System))
    }

    pub fn manual(start: SystemTime) -> Self {
        Clock(Arc::new(ClockInner::Manual(Mutex::new(start))))
    }

    /// The tests' clock: manual, at [`Clock::fixed_start`] (2026-11-26T10:00:00Z), so that
    /// timestamps in answers are the same on every run.
    pub fn fixed() -> Self {
        Clock::manual(Clock::fixed_start())
    }

    /// Where [`Clock::fixed`] starts.
    pub fn fixed_start() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_687_200)
    }

    pub fn now(&self) -> SystemTime {
        match &*self.0 {
            ClockInner::System => SystemTime::now(),
            ClockInner::Manual(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Moves a manual clock forward; a system clock ignores it.
    pub fn advance(&self, by: Duration) {
        if let ClockInner::Manual(t) = &*self.0 {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            *t += by;
        }
    }

    pub fn unix_secs(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

// === impl CallLog ===

/// One request as the simulator received it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    /// The body parsed as JSON, or `Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// The most recent requests a simulator received, in arrival order; tests assert on it.
///
/// Bounded: a long benchmark against `llm-warden simulate` must not grow without limit, so
/// only the last [`CallLog::CAPACITY`] calls are kept (`total` still counts every one).
#[derive(Clone, Debug, Default)]
pub struct CallLog(Arc<Mutex<LogInner>>);

#[derive(Debug, Default)]
struct LogInner {
    calls: std::collections::VecDeque<Call>,
    total: u64,
}

impl CallLog {
    pub const CAPACITY: usize = 10_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, call: Call) {
        let mut log = self.lock();
        if log.calls.len() == Self::CAPACITY {
            log.calls.pop_front();
        }
        log.calls.push_back(call);
        log.total += 1;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.iter().cloned().collect()
    }

    /// Number of retained calls to `path` (any method).
    pub fn count(&self, path: &str) -> usize {
        self.lock().calls.iter().filter(|c| c.path == path).count()
    }

    /// Every call ever received, retained or not.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn clear(&self) {
        self.lock().calls.clear();
    }
}

// === tokenizer ===

/// The simulators' tokenizer: one token per started 4 bytes of text, the usual rule of thumb
/// for English BPE vocabularies. Generation, usage counts and truncation all use it, so
/// they agree with each other.
pub fn count_tokens(text: &str) -> u32 {
    text.len().div_ceil(4) as u32
}

/// Token ids for `text`, consistent with [`count_tokens`]: each 4-byte piece hashed into a
/// 32k vocabulary.
pub fn tokenize(text: &str) -> Vec<u32> {
    text.as_bytes()
        .chunks(4)
        .map(|piece| {
            let mut h: u32 = 2166136261;
            for b in piece {
                h = (h ^ u32::from(*b)).wrapping_mul(16777619);
            }
            h % 32000
        })
        .collect()
}

/// A small fixed vocabulary the simulators "generate" from. Every word is 4 bytes with its
/// leading space or less, so each is exactly one token under [`count_tokens`].
const WORDS: [&str; 16] = [
    " the", " sky", " is", " sun", " and", " sea", " red", " cat", " dog", " ran", " far", " up",
    " on", " it", " we", " go",
];

/// The `n` pieces of a deterministic reply, seeded by `seed` (e.g. a hash of the prompt).
pub fn reply_pieces(seed: u64, n: usize) -> Vec<&'static str> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = WORDS[(x % WORDS.len() as u64) as usize];
            if i == 0 {
                w.trim_start()
            } else {
                w
            }
        })
        .collect()
}

/// FNV-1a of some bytes; the seed for deterministic replies, ids and embeddings.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
    }
    h
}

/// A deterministic unit-ish embedding of `dims` floats for `text`.
pub fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut x = hash_bytes(text.as_bytes()) | 1;
    (0..dims)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Two decimals keep the JSON short and stable across float formatting.
            ((x % 2001) as f32 - 1000.0) / 1000.0
        })
        .collect()
}

/// Lowercase alphanumeric id of `len` characters, deterministic in `seed`.
pub fn alnum_id(seed: u64, len: usize) -> String {
    id_from(b"abcdefghijklmnopqrstuvwxyz0123456789", seed, len)
}

/// An id of `len` characters drawn from `alphabet` by a xorshift seeded with `seed`.
pub fn id_from(alphabet: &[u8], seed: u64, len: usize) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            alphabet[(x % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

// === shared wire shapes ===

/// The OpenAI `usage` object (`/v1/*` of both providers): key order as they send it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt: u32, completion: u32) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

// === encoding ===

/// JSON as Go's `encoding/json` writes it: no whitespace, struct field order, and `<`, `>`,
/// `&`, U+2028, U+2029 escaped. Serialize structs (not maps) to keep the key order.
pub fn go_json<T: Serialize>(value: &T) -> Vec<u8> {
    let raw = serde_json::to_vec(value).unwrap_or_default();
    go_escape(raw)
}

/// Applies Go's HTML-safe escaping to serialized JSON. The escaped characters can only occur
/// inside strings, so a byte-level replace is exact.
pub fn go_escape(raw: Vec<u8>) -> Vec<u8> {
    if !raw.iter().any(|b| matches!(b, b'<' | b'>' | b'&' | 0xE2)) {
        return raw;
    }
    let mut out = Vec::with_capacity(raw.len() + 16);
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'<' => out.extend_from_slice(b"\\u003c"),
            b'>' => out.extend_from_slice(b"\\u003e"),
            b'&' => out.extend_from_slice(b"\\u0026"),
            0xE2 if raw.get(i + 1) == Some(&0x80)
                && matches!(raw.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                out.extend_from_slice(if raw[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// RFC 3339 in UTC with nanoseconds and trailing zeros trimmed, as Go's `time.RFC3339Nano`:
/// `2026-11-26T15:04:05.1234567Z`.
pub fn rfc3339_nano(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_nanos(t).to_string();
    // s = "2026-11-26T15:04:05.123456700Z"
    match s.find('.') {
        Some(dot) => {
            let frac = s[dot + 1..s.len() - 1].trim_end_matches('0');
            if frac.is_empty() {
                format!("{}Z", &s[..dot])
            } else {
                format!("{}.{}Z", &s[..dot], frac)
            }
        }
        None => s,
    }
}

// === bodies and responses ===

/// A response body fed from a channel: each `send` becomes one frame, flushed at once.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A streaming body and the sender that feeds it. Dropping the sender ends the body; a
/// failed `send` means the client went away.
pub fn channel_body() -> (mpsc::Sender<Bytes>, SimBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChannelBody(rx).boxed())
}

pub fn full(bytes: impl Into<Bytes>) -> SimBody {
    Full::new(bytes.into()).boxed()
}

/// A complete response with a content type.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<SimBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    if !content_type.is_empty() {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
    }
    resp
}

/// Reads a whole request body (simulators are not size-limited).
pub async fn read_body(body: Incoming) -> Bytes {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

/// Splits a request into its call-log record (body read whole) and the request parts.
pub async fn record(req: Request<Incoming>, log: &CallLog) -> (Call, hyper::upgrade::OnUpgrade) {
    let (mut parts, body) = req.into_parts();
    let on_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .unwrap_or_else(|| hyper::upgrade::on(Request::new(())));
    let body = read_body(body).await;
    let call = Call {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    };
    log.push(call.clone());
    (call, on_upgrade)
}

// === server ===

/// A running simulator. Dropping it stops the accept loop (open connections finish).
pub struct SimServer<S> {
    pub addr: SocketAddr,
    pub state: Arc<S>,
    _stop: watch::Sender<()>,
}

impl<S> SimServer<S> {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves `handler` on `listener` until the returned server is dropped.
pub fn serve<S, H, F>(listener: TcpListener, state: Arc<S>, handler: H) -> SimServer<S>
where
    S: Send + Sync + 'static,
    H: Fn(Arc<S>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<SimBody>> + Send + 'static,
{
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let (stop_tx, mut stop_rx) = watch::channel(());
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(_) => continue,
                },
                _ = stop_rx.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            let st = st.clone();
            let handler = handler.clone();
            let mut stopped = stop_rx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(st.clone(), req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                // Dropping the server closes its connections too, as a process that exits
                // would (a client's pooled connection must not outlive the "process").
                tokio::select! {
                    _ = builder.serve_connection_with_upgrades(
                        hyper_util::rt::TokioIo::new(stream),
                        svc,
                    ) => {}
                    _ = stopped.changed() => {}
                }
            });
        }
    });
    SimServer {
        addr,
        state,
        _stop: stop_tx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_escape_matches_go_encoding() {
        let v = serde_json::json!({"a": "<b>&\u{2028}é"});
        assert_eq!(
            String::from_utf8(go_json(&v)).unwrap(),
            r#"{"a":"\u003cb\u003e\u0026\u2028é"}"#
        );
    }

    #[test]
    fn rfc3339_trims_trailing_zeros() {
        let t = UNIX_EPOCH + Duration::new(1_764_151_200, 120_000_000);
        assert_eq!(rfc3339_nano(t), "2025-11-26T10:00:00.12Z");
        let t = UNIX_EPOCH + Duration::new(1_764_151_200, 0);
        assert_eq!(rfc3339_nano(t), "2025-11-26T10:00:00Z");
    }

    #[test]
    fn tokenizer_counts_four_bytes_per_token() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
        assert_eq!(tokenize("abcde").len(), 2);
        for w in WORDS {
            assert_eq!(count_tokens(w), 1);
        }
    }
}
