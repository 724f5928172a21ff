//! The data plane's upstream connections: one small pool of keep-alive HTTP/1.1 connections
//! per provider and lane (`super::lanes`), of two kinds. A request whose body the proxy
//! holds (every model request, a bodiless `GET`, a small pass-through body) goes over the
//! proxy's own exchange ([`client`](super::client): the client connection's task reads the provider's socket
//! itself); a streamed upload or a protocol upgrade over hyper's client connection API.
//!
//! Why not `hyper_util`'s pooled client, which the control plane (polls, loads) still uses:
//! profiled with callgrind on the release build (`GET /api/version` through the proxy, one
//! client), that client was about a quarter of the proxy's instructions per request. It
//! hashes its pool key with SipHash three times a request, boxes and moves large futures
//! (15 `memcpy` calls a request), and runs a checkout state machine with a waiter list and
//! an executor hop, for generality (any host, HTTP/2, retries) a proxy with one fixed
//! upstream per listener does not need. Here a request pops the most recently returned
//! connection from a `Vec` under a mutex held for a few instructions, and the response body
//! puts it back when it ends.
//!
//! Rules:
//! - a connection goes back only after its response body ended (so the next request never
//!   waits behind the rest of an old one); a body dropped early closes it, as nginx does;
//! - an idle connection found closed (for [`client`](super::client): the reactor saw the provider's FIN), or
//!   idle longer than [`IDLE_TIMEOUT`], is dropped at checkout; at most [`IDLE_MAX`] are kept per lane (the rest close when returned);
//! - a request that a reused connection could not send (closed by the provider meanwhile)
//!   is sent again on another connection: hyper hands back a request it did not write, so
//!   a streamed body is never half-sent twice;
//! - a request that was written on a reused connection which the provider then closed (or
//!   reset) before answering a byte is sent once more, on a new connection, when its body is
//!   all in hand (every model request: the proxy has read it; a bodiless `GET`). This is
//!   the keep-alive close race, and with llama-server it is not rare: it closes the
//!   connection right after every streamed answer, without `Connection: close`, so the next
//!   request can take the connection before the close arrives (CI met it). Decided: repeat
//!   it even for a `POST`, unlike Go's client (idempotent methods only), because the
//!   provider sent nothing back, so it either never read the request or died with it (then
//!   the new connection fails and the client gets the 502), and for these APIs a repeated
//!   generation costs compute, not state. A streamed pass-through body (an `/api/create`
//!   upload) is never repeated: it fails as 502;
//! - a `101 Switching Protocols` answer keeps its connection (it becomes the tunnel);
//! - HTTP/1.1 only, as every provider speaks; the proxy sets `Host` itself.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::client::{self as h1, H1Body};
use super::codec::H1Error;
use super::UpstreamBody;

/// An idle connection older than this is closed instead of reused (the same as the pooled
/// client of the control plane).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per provider and lane: enough for hundreds of concurrent clients;
/// after a burst of thousands of streams the rest close instead of holding descriptors.
pub const IDLE_MAX: usize = 512;

/// Why a request could not be sent or answered.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made: the provider is down, or the address is wrong.
    Connect(String),
    /// The connection failed while sending or before the response head came.
    Send(hyper::Error),
    /// The same, on a connection of [`client`](super::client).
    Exchange(H1Error),
}

/// Idle connections of one kind, per lane (`super::lanes`): a connection's task (or, for
/// [`client`](super::client), its socket's registration) belongs to the lane that opened it, so a request takes
/// one from its own lane's list and stays on its thread. Any other thread uses the first
/// list.
struct IdleLists<C> {
    lanes: Box<[IdleList<C>]>,
}

/// One lane's idle connections, each with the time it was returned.
type IdleList<C> = Mutex<Vec<(C, Instant)>>;

impl<C> IdleLists<C> {
    fn new(lanes: usize) -> Self {
        IdleLists {
            lanes: (0..lanes.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn here(&self) -> &IdleList<C> {
        &self.lanes[super::lanes::current() % self.lanes.len()]
    }

    /// The most recently returned connection of this lane that is not older than
    /// [`IDLE_TIMEOUT`] and passes `usable`; the others found on the way are dropped.
    fn take(&self, usable: impl Fn(&C) -> bool) -> Option<C> {
        let mut idle = self.here().lock().ok()?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && usable(&conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for later, unless this lane holds [`IDLE_MAX`] already (it closes).
    fn put(&self, conn: C) {
        if let Ok(mut idle) = self.here().lock() {
            if idle.len() < IDLE_MAX {
                idle.push((conn, Instant::now()));
            }
        }
    }

    fn count(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.lock().map_or(0, |v| v.len()))
            .sum()
    }
}

/// One provider's upstream connections.
pub struct Pool {
    host: String,
    port: u16,
    /// The address, when the host is an IP literal (no lookup per connect).
    addr: Option<SocketAddr>,
    /// `Host` of every request sent upstream.
    host_header: HeaderValue,
    connect_timeout: Duration,
    /// Idle hyper client connections (streamed uploads, upgrades).
    idle: IdleLists<SendRequest<UpstreamBody>>,
    /// Idle connections of [`client`](super::client) (requests with their body in hand).
    idle_h1: IdleLists<h1::Conn>,
}

impl Pool {
    /// A pool for the provider at `authority` (`host:port`), with idle lists for `lanes`
    /// lanes.
    pub fn new(
        authority: &http::uri::Authority,
        connect_timeout: Duration,
        lanes: usize,
    ) -> Arc<Self> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(80);
        let addr = host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, port));
        Arc::new(Pool {
            host,
            port,
            addr,
            host_header: HeaderValue::from_str(authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            connect_timeout,
            idle: IdleLists::new(lanes),
            idle_h1: IdleLists::new(lanes),
        })
    }

    /// The `Host` header requests to this upstream carry.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Connections idle in the pool now.
    pub fn idle_count(&self) -> usize {
        self.idle.count() + self.idle_h1.count()
    }

    /// Sends `req` on an idle connection, or a new one, and answers the response head; the
    /// body returns the connection to the pool when it ends. A request with its body in
    /// hand goes through [`client`](super::client); a streamed upload or an upgrade through hyper's client
    /// connection.
    ///
    /// With `raw_ok`, an answer whose head has nothing hop-by-hop keeps its header lines as
    /// they came ([`super::codec::RawHeaders`]), for an HTTP/1 client.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
        raw_ok: bool,
    ) -> Result<Response<PooledBody>, PoolError> {
        match h1::Encoded::of(req) {
            Ok(mut encoded) => {
                encoded.raw_ok = raw_ok;
                self.send_h1(&encoded).await
            }
            // Boxed: hyper's handshake makes this future kilobytes, and it is the rare path
            // (streamed uploads, upgrades); the common one stays small.
            Err(req) => Box::pin(self.send_hyper(req)).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        req: &h1::Encoded,
    ) -> Result<Response<PooledBody>, PoolError> {
        // After a request was written on a reused connection that the provider then closed
        // unanswered, it goes out once more, on a new connection.
        let mut replayed = false;
        loop {
            let idle = if replayed {
                None
            } else {
                self.idle_h1.take(h1::Conn::looks_alive)
            };
            let (mut conn, reused) = match idle {
                Some(conn) => (conn, true),
                None => (h1::Conn::new(self.dial().await?), false),
            };
            let exchanged = conn.exchange(req).await;
            match exchanged {
                Ok((parts, framing, keep_alive)) => {
                    let body = H1Body::new(conn, framing, keep_alive, self.clone());
                    return Ok(Response::from_parts(parts, PooledBody::H1(body)));
                }
                Err(e) if reused && e.unanswered() => {
                    tracing::debug!(
                        error = %e,
                        "a reused upstream connection closed without answering; sending again on a new one"
                    );
                    replayed = true;
                }
                Err(e) => return Err(PoolError::Exchange(e)),
            }
        }
    }

    /// Takes back a connection of [`client`](super::client) whose answer was read to the end.
    pub(super) fn put_h1(&self, conn: h1::Conn) {
        self.idle_h1.put(conn);
    }

    async fn send_hyper(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        // After a request was written on a reused connection that the provider then closed
        // unanswered, the copy goes out once more, on a new connection.
        let mut replayed = false;
        loop {
            let idle = if replayed {
                None
            } else {
                self.idle.take(|tx| !tx.is_closed())
            };
            let (mut tx, reused) = match idle {
                Some(tx) => (tx, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = tx.ready().await {
                if reused {
                    continue;
                }
                return Err(PoolError::Send(e));
            }
            let copy = if reused { replica(&req) } else { None };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let back = (resp.status() != StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (tx, self.clone()));
                    return Ok(resp.map(|body| PooledBody::Hyper(HyperBody { body, back })));
                }
                Err(mut e) => match (e.take_message(), copy) {
                    // Not written: the connection was closed under it. Another one.
                    (Some(unsent), _) if reused => req = unsent,
                    (None, Some(copy)) if closed_unanswered(e.error()) => {
                        tracing::debug!(
                            error = %e.error(),
                            "a reused upstream connection closed without answering; sending again on a new one"
                        );
                        req = copy;
                        replayed = true;
                    }
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    fn put(&self, tx: SendRequest<UpstreamBody>) {
        if !tx.is_closed() {
            self.idle.put(tx);
        }
    }

    async fn connect(&self) -> Result<SendRequest<UpstreamBody>, PoolError> {
        let stream = self.dial().await?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Send)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// A new TCP connection to the provider (no delay on small writes).
    async fn dial(&self) -> Result<TcpStream, PoolError> {
        let connect = async {
            match self.addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect((self.host.as_str(), self.port)).await,
            }
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(PoolError::Connect(format!(
                    "tcp connect error: {e} ({}:{})",
                    self.host, self.port
                )))
            }
            Err(_) => {
                return Err(PoolError::Connect(format!(
                    "tcp connect to {}:{} timed out after {:?}",
                    self.host, self.port, self.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// A copy of `req` to send again, when its body is all in hand (a buffered body, or none).
/// A streamed body is not copied: once written, it is gone.
fn replica(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    let body = match req.body() {
        Either::Right(full) => full.clone(),
        Either::Left(body) if body.is_end_stream() => Full::new(Bytes::new()),
        Either::Left(body) if body.in_hand().is_some() => {
            Full::new(body.in_hand().cloned().unwrap_or_default())
        }
        Either::Left(_) => return None,
    };
    let mut copy = Request::new(Either::Right(body));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether a request failed because the connection closed (or was reset) before any answer
/// came: what a provider that drops a keep-alive connection looks like from this side. It
/// is a race no client can avoid, only recover from: llama-server (cpp-httplib) closes the
/// connection right after each streamed answer without saying `Connection: close`, and Node
/// servers (LM Studio) close connections idle for 5 s; a request written just before the
/// close arrives meets a closed socket.
fn closed_unanswered(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}

/// A response body from the pool: the provider's bytes as they come; at its end, the
/// connection goes back to the pool.
pub enum PooledBody {
    /// From hyper's client connection.
    Hyper(HyperBody),
    /// Read from the socket by whoever polls it ([`client`](super::client)).
    H1(H1Body),
}

/// Errors of a body: hyper's or [`client`](super::client)'s.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl PooledBody {
    /// The answer's header lines as the provider wrote them, when they were kept raw.
    pub fn raw_headers(&self) -> Option<&super::codec::RawHeaders> {
        match self {
            PooledBody::H1(b) => b.raw_headers(),
            PooledBody::Hyper(_) => None,
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            PooledBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            PooledBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PooledBody::Hyper(b) => b.is_end_stream(),
            PooledBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PooledBody::Hyper(b) => b.size_hint(),
            PooledBody::H1(b) => b.size_hint(),
        }
    }
}

/// A body from hyper's client connection.
pub struct HyperBody {
    body: Incoming,
    back: Option<(SendRequest<UpstreamBody>, Arc<Pool>)>,
}

impl HyperBody {
    fn give_back(&mut self) {
        if let Some((tx, pool)) = self.back.take() {
            pool.put(tx);
        }
    }
}

impl Body for HyperBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.give_back(),
            Some(Ok(_)) if this.body.is_end_stream() => this.give_back(),
            Some(Ok(_)) => {}
            // A broken body: the connection is not reused.
            Some(Err(_)) => this.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for HyperBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on a free port that runs `per_conn` on each connection it accepts, and
    /// counts them.
    async fn serve_each<F, Fut>(per_conn: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(per_conn(s));
            }
        });
        (addr, accepted)
    }

    /// An HTTP/1.1 server answering `ok` with keep-alive headers. With `close`, it closes
    /// each connection after its first answer, as a provider restarting or timing out idle
    /// connections would: the pooled connection is dead when the next request takes it.
    async fn server(close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        serve_each(move |mut s| async move {
            while read_request(&mut s).await.is_some() {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                if close {
                    return;
                }
            }
        })
        .await
    }

    /// Reads one request (head, then a `Content-Length` body) off `s`; `None` at EOF.
    async fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let head_end = loop {
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while got.len() < head_end + len {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        Some(got[head_end..head_end + len].to_vec())
    }

    /// A server like llama-server after a streamed answer: each connection answers its first
    /// request (echoing the body), keeps the connection open with no `Connection: close`,
    /// then reads the next request and closes without a byte of answer. `reset` closes it
    /// with a TCP reset instead of a FIN.
    async fn closes_after_one(reset: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        serve_each(move |mut s| async move {
            let Some(body) = read_request(&mut s).await else {
                return;
            };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&body).await.unwrap();
            if read_request(&mut s).await.is_some() && reset {
                s.set_zero_linger().unwrap();
            }
        })
        .await
    }

    async fn post(pool: &Arc<Pool>, body: &'static str) -> Result<Bytes, PoolError> {
        let req = Request::post("/api/chat")
            .header(http::header::HOST, pool.host_header().clone())
            .body(Either::Right(Full::new(Bytes::from_static(
                body.as_bytes(),
            ))))
            .unwrap();
        let resp = pool.send(req, false).await?;
        Ok(resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn get(pool: &Arc<Pool>) -> Result<Bytes, PoolError> {
        let req = Request::get("/api/version")
            .header(http::header::HOST, pool.host_header().clone())
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        let resp = pool.send(req, false).await?;
        Ok(resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn an_ended_body_returns_its_connection_and_the_next_request_reuses_it() {
        let (addr, accepted) = server(false).await;
        let up = crate::config::parse_upstream(&format!("http://{addr}")).unwrap();
        let pool = Pool::new(&up.authority, Duration::from_secs(5), 1);
        for _ in 0..3 {
            assert_eq!(get(&pool).await.unwrap(), "ok");
            assert_eq!(
                pool.idle_count(),
                1,
                "the ended body gave its connection back"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_provider_closed_is_replaced() {
        let (addr, accepted) = server(true).await;
        let up = crate::config::parse_upstream(&format!("http://{addr}")).unwrap();
        let pool = Pool::new(&up.authority, Duration::from_secs(5), 1);
        // Each connection is closed after its answer: the next request goes out on a new
        // one, whether the pool sees the close at checkout or hyper hands the unsent request
        // back. The client never sees the dead connection.
        for n in 1..=3 {
            assert_eq!(get(&pool).await.unwrap(), "ok");
            assert_eq!(accepted.load(Ordering::SeqCst), n);
        }
    }

    #[tokio::test]
    async fn a_provider_that_is_down_is_a_connect_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let up = crate::config::parse_upstream(&format!("http://{addr}")).unwrap();
        let pool = Pool::new(&up.authority, Duration::from_secs(5), 1);
        assert!(matches!(get(&pool).await, Err(PoolError::Connect(_))));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_request_written_on_a_connection_closed_unanswered_goes_again_on_a_new_one() {
        for reset in [false, true] {
            let (addr, accepted) = closes_after_one(reset).await;
            let up = crate::config::parse_upstream(&format!("http://{addr}")).unwrap();
            let pool = Pool::new(&up.authority, Duration::from_secs(5), 1);
            for (n, body) in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]
                .iter()
                .enumerate()
            {
                // The first request opens a connection; each later one is written on the
                // pooled one, which the server closes (reset: {reset}) unanswered, and goes
                // again, whole, on a new one.
                let got = post(&pool, body).await.unwrap();
                assert_eq!(got, body.as_bytes(), "reset: {reset}");
                assert_eq!(accepted.load(Ordering::SeqCst), n + 1, "reset: {reset}");
            }
        }
    }

    #[tokio::test]
    async fn a_new_connection_closed_unanswered_is_an_error_and_not_repeated() {
        // Reads the request, then closes without a byte of answer.
        let (addr, accepted) = serve_each(|mut s| async move {
            read_request(&mut s).await;
        })
        .await;
        let up = crate::config::parse_upstream(&format!("http://{addr}")).unwrap();
        let pool = Pool::new(&up.authority, Duration::from_secs(5), 1);
        match post(&pool, "{}").await {
            Err(PoolError::Exchange(e)) => {
                assert!(e.unanswered(), "{e}");
                assert_eq!(e.to_string(), "connection closed before message completed");
            }
            other => panic!("expected a send error, got {:?}", other.map(|_| ())),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 0);
    }
}
