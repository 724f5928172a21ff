//! The data plane's own HTTP/1.1 exchange, for requests whose body the proxy holds (every
//! model request, every bodiless `GET`, small pass-through bodies): the request goes out in
//! one vectored write, the response head is parsed with `httparse` (hyper's parser), and the
//! response body is read from the provider's socket by whoever polls it: the client
//! connection's own task. Streamed uploads and protocol upgrades keep going through hyper's
//! client connection (`pool`).
//!
//! Why not hyper's client here too: hyper runs each upstream connection as a task of its own
//! and hands every body chunk across a channel to the task that writes it to the client. For
//! a proxy that is two tasks, a channel hop and two wakes per chunk, and about 30 KB of
//! buffers and channel blocks per open stream (heaptrack: read and write buffers on the
//! connection, a 32-slot request channel). Here a chunk is read and handed to the client
//! connection in the same poll, and an open stream holds one socket and one 4 KB buffer,
//! like nginx's `proxy_buffer_size`.
//!
//! What it implements of RFC 9112, for responses: the status line and headers (at most
//! [`MAX_HEADERS`], head at most [`MAX_HEAD`] bytes); `1xx` answers skipped; the body framed
//! by the request method and status (`HEAD`, `204`, `304`: none), `Transfer-Encoding:
//! chunked` (extensions ignored, trailers read and dropped), `Content-Length`, or the close
//! of the connection; keep-alive unless `Connection: close` or HTTP/1.0 without
//! `Connection: keep-alive`. A connection goes back to the pool only when its body was read
//! to the end with nothing after it.
//!
//! The request is written as hyper writes it: `METHOD target HTTP/1.1`, the headers in map
//! order, lowercase; a body gets `content-length` when the headers have none, an empty body
//! none.

use std::future::Future;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::codec::*;
use super::pool::Pool;
use super::UpstreamBody;

/// The most headers a response may have (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// The largest response head.
pub const MAX_HEAD: usize = 64 * 1024;
/// A connection's first read buffer; it grows (to [`MAX_READ`]) while reads fill it.
const FIRST_READ: usize = 4096;
const MAX_READ: usize = 64 * 1024;

/// A request ready to write: its head, and its body (which it owns, so it can be written
/// again).
pub struct Encoded {
    head: Vec<u8>,
    body: Bytes,
    /// A `HEAD` request: its answer has no body, whatever its headers say.
    head_method: bool,
    /// The answer's header lines may stay raw (see [`RawHeaders`]).
    pub raw_ok: bool,
}

impl Encoded {
    /// Encodes `req`, or gives it back when its body is a stream (not in hand) or it asks
    /// for a protocol upgrade.
    #[allow(clippy::result_large_err)]
    pub fn of(req: Request<UpstreamBody>) -> Result<Encoded, Request<UpstreamBody>> {
        let in_hand = match req.body() {
            Either::Right(_) => true,
            Either::Left(body) => body.is_end_stream() || body.in_hand().is_some(),
        };
        if !in_hand || req.headers().contains_key(header::UPGRADE) {
            return Err(req);
        }
        let (parts, body) = req.into_parts();
        let body = match body {
            Either::Right(full) => full_bytes(full),
            Either::Left(body) => body.in_hand().cloned().unwrap_or_default(),
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut size = parts.method.as_str().len() + target.len() + 48;
        let mut has_length = false;
        for (name, value) in &parts.headers {
            size += name.as_str().len() + value.len() + 4;
            has_length |= *name == header::CONTENT_LENGTH;
        }
        let mut head = Vec::with_capacity(size);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() && !has_length {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(body.len().to_string().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Ok(Encoded {
            head,
            body,
            head_method: parts.method == Method::HEAD,
            raw_ok: false,
        })
    }
}

/// The bytes of a `Full` (the proxy's own, never polled before).
fn full_bytes(mut full: http_body_util::Full<Bytes>) -> Bytes {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(&mut full).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// An upstream connection of this module.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    next_read: usize,
    /// The last answer's header lines, when they may stay raw; taken by its body.
    raw: Option<RawHeaders>,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            next_read: FIRST_READ,
            raw: None,
        }
    }

    /// Whether an idle connection can take a request: the provider has not closed it, as
    /// far as the lane's reactor has seen (its readiness says `read closed` once the FIN
    /// is in). No system call: a close the reactor has not seen yet is the race the
    /// replay in `pool` covers.
    pub fn looks_alive(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let ready = std::pin::pin!(self.io.ready(Interest::READABLE));
        match ready.poll(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Ok(r)) => !r.is_read_closed() && !r.is_error(),
            Poll::Ready(Err(_)) => false,
        }
    }

    /// Reads what the socket has (at least one byte, or 0 at EOF).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(self.next_read);
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            let room = self.buf.capacity() - self.buf.len();
            match self.io.try_read_buf(&mut self.buf) {
                Ok(n) => {
                    if n == room && self.next_read < MAX_READ {
                        self.next_read *= 2;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Writes `req` and reads the answer's head.
    pub async fn exchange(
        &mut self,
        req: &Encoded,
    ) -> Result<(http::response::Parts, Framing, bool), H1Error> {
        let unanswered = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted => H1Error::Unanswered(Some(e)),
            _ => H1Error::Io(e),
        };
        if req.body.is_empty() {
            self.io.write_all(&req.head).await.map_err(unanswered)?;
        } else {
            let mut slices = [IoSlice::new(&req.head), IoSlice::new(&req.body)];
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = self.io.write_vectored(rest).await.map_err(unanswered)?;
                if n == 0 {
                    return Err(H1Error::Unanswered(None));
                }
                IoSlice::advance_slices(&mut rest, n);
            }
        }
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some((parts, framing, keep_alive)) =
                    self.parse_head(req.head_method, req.raw_ok)?
                {
                    return Ok((parts, framing, keep_alive));
                }
            }
            match self.fill().await {
                Ok(0) if answered => return Err(H1Error::Incomplete),
                Ok(0) => return Err(H1Error::Unanswered(None)),
                Ok(_) => {}
                Err(e) if !answered => return Err(unanswered(e)),
                Err(e) => return Err(H1Error::Io(e)),
            }
        }
    }

    /// The response head at the front of the buffer, if it is all there (`1xx` heads are
    /// skipped).
    #[allow(clippy::type_complexity)]
    fn parse_head(
        &mut self,
        head_method: bool,
        raw_ok: bool,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, H1Error> {
        loop {
            // Uninitialized: zeroing 100 headers cost more than parsing the few there are.
            let mut headers =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &self.buf,
                &mut headers,
            ) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                    return Err(H1Error::Invalid(format!(
                        "response head larger than {MAX_HEAD} bytes"
                    )))
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(H1Error::Invalid(e.to_string())),
            };
            let code = parsed.code.unwrap_or(0);
            if (100..200).contains(&code) && code != 101 {
                self.buf.advance(len);
                if self.buf.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            let status = StatusCode::from_u16(code)
                .map_err(|_| H1Error::Invalid(format!("status code {code}")))?;
            let version = if parsed.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            let mut hints = Hints::default();
            let spans = Spans::locate(self.buf.as_ptr() as usize, parsed.headers, &mut hints);
            let head = self.buf.split_to(len).freeze();
            // Header lines with nothing hop-by-hop in them can go to an HTTP/1 client as
            // they came: no map built here, none written out again there.
            let raw = raw_ok && !hints.hop_by_hop && !hints.ours;
            let map = if raw {
                HeaderMap::new()
            } else {
                spans.map(&head, 0).map_err(H1Error::Invalid)?
            };
            let framing = if raw {
                let lengths = spans
                    .iter()
                    .filter(|s| head[s[0]..s[1]].eq_ignore_ascii_case(b"content-length"))
                    .map(|s| &head[s[2]..s[3]]);
                framing_of(head_method, status, None, lengths)?
            } else {
                framing(head_method, status, &map, &hints)?
            };
            // After a 101 the connection speaks another protocol (upgrades go through hyper's
            // client, so this is a provider answering one nobody asked for): never reused.
            let keep_alive = (if hints.connection {
                keep_alive(version, &map)
            } else {
                version == Version::HTTP_11
            }) && !matches!(framing, Framing::Close)
                && status != StatusCode::SWITCHING_PROTOCOLS;
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            *resp.version_mut() = version;
            *resp.headers_mut() = map;
            self.raw = raw.then(|| RawHeaders {
                lines: spans.lines(&head),
                date: hints.date,
                length: hints.content_length,
            });
            let (parts, ()) = resp.into_parts();
            return Ok(Some((parts, framing, keep_alive)));
        }
    }
}

/// A response body read from the provider's socket as it is polled; at its end, the
/// connection goes back to the pool (when it may be reused).
pub struct H1Body {
    /// The head's lines, when they may go to the client as they came.
    raw: Option<RawHeaders>,
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// Data went out since the last time this body waited on the socket: the client's
    /// connection may still hold it unwritten.
    unflushed: bool,
    /// An error held back until that data is written (see `poll_frame`).
    failed: Option<H1Error>,
}

impl H1Body {
    pub fn new(mut conn: Conn, framing: Framing, keep_alive: bool, pool: Arc<Pool>) -> H1Body {
        let raw = conn.raw.take();
        let mut body = H1Body {
            raw,
            conn: Some(conn),
            framing,
            keep_alive,
            pool,
            unflushed: false,
            failed: None,
        };
        if framing == Framing::Done {
            body.finish();
        }
        body
    }

    pub fn raw_headers(&self) -> Option<&RawHeaders> {
        self.raw.as_ref()
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.put_h1(conn);
            }
        }
    }

    /// The next frame out of the buffer (`Some(None)`: the end), or `None` when more bytes
    /// must be read first.
    #[allow(clippy::option_option)]
    fn next_frame(&mut self) -> Result<Option<Option<Bytes>>, H1Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Some(None));
        };
        let next = decode(&mut self.framing, &mut conn.buf)?;
        if self.framing == Framing::Done {
            self.finish();
        }
        Ok(next)
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let failed = match this.next_frame() {
                Ok(Some(Some(data))) => {
                    this.unflushed = true;
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Some(None)) => return Poll::Ready(None),
                Ok(None) => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    match conn.poll_fill(cx) {
                        Poll::Pending => {
                            this.unflushed = false;
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(0)) if this.framing == Framing::Close => {
                            this.framing = Framing::Done;
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Poll::Ready(Ok(0)) => H1Error::Incomplete,
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => H1Error::Io(e),
                    }
                }
                Err(e) => e,
            };
            this.conn = None;
            if this.unflushed {
                // hyper's server connection (HTTP/2 clients) writes what it has only when a
                // body waits; an error now would drop the data that came in the same read
                // (a provider that sent its last chunks and died). Wait once, so it goes
                // out first. (The proxy's own HTTP/1 server flushes before it fails anyway;
                // for it the wait costs one poll.)
                this.unflushed = false;
                this.failed = Some(failed);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(Some(Err(failed)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;
    use http_body_util::{BodyExt, Full};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn pool() -> Arc<Pool> {
        let up = crate::config::parse_upstream("http://127.0.0.1:9").unwrap();
        Pool::new(&up.authority, Duration::from_secs(1), 1)
    }

    /// A connection to a peer that says nothing (tests feed its buffer by hand), and the
    /// peer's end.
    async fn quiet_conn() -> (Conn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Conn::new(a.unwrap()), b.unwrap().0)
    }

    /// Parses `head` (fed one byte at a time) and reads its body fed the same way: the
    /// response parts, the body's bytes, and whether the connection went back to the pool.
    async fn feed(head_method: bool, bytes: &[u8]) -> (http::response::Parts, Vec<u8>, bool) {
        let (mut conn, _peer) = quiet_conn().await;
        let mut fed = 0;
        let (parts, framing, keep_alive) = loop {
            conn.buf.extend_from_slice(&bytes[fed..=fed]);
            fed += 1;
            if let Some(head) = conn.parse_head(head_method, false).unwrap() {
                break head;
            }
        };
        let pool = pool();
        let mut body = H1Body::new(conn, framing, keep_alive, pool.clone());
        let mut got = Vec::new();
        loop {
            match body.next_frame().unwrap() {
                Some(Some(data)) => got.extend_from_slice(&data),
                Some(None) => break,
                None => {
                    let conn = body.conn.as_mut().unwrap();
                    conn.buf.extend_from_slice(&bytes[fed..=fed]);
                    fed += 1;
                }
            }
        }
        assert!(body.is_end_stream());
        (parts, got, pool.idle_count() == 1)
    }

    #[tokio::test]
    async fn header_lines_stay_raw_only_when_asked_and_nothing_in_them_must_change() {
        let parse = |head: &'static [u8], raw_ok: bool| async move {
            let (mut conn, _peer) = quiet_conn().await;
            conn.buf.extend_from_slice(head);
            let (parts, framing, _) = conn.parse_head(false, raw_ok).unwrap().unwrap();
            let body = H1Body::new(conn, framing, true, pool());
            (parts, framing, body.raw_headers().cloned())
        };
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: x\r\nContent-Length: 2\r\n\r\nhi";
        // Kept as they came: case, order, line endings; framing still read off them.
        let (parts, framing, raw) = parse(plain, true).await;
        let raw = raw.expect("raw lines");
        assert_eq!(
            &raw.lines[..],
            b"Content-Type: application/json\r\nDate: x\r\nContent-Length: 2\r\n"
        );
        assert!(raw.date && raw.length && parts.headers.is_empty());
        assert_eq!(framing, Framing::Length(2));
        // Not asked (a model request, an HTTP/2 client): the map.
        let (parts, _, raw) = parse(plain, false).await;
        assert!(raw.is_none());
        assert_eq!(parts.headers["content-type"], "application/json");
        // A hop-by-hop header must go, and a header this proxy sets may be set again: the map.
        for head in [
            &b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nX-LLM-Warden-Compacted: 9->3\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (parts, _, raw) = parse(head, true).await;
            assert!(raw.is_none() && !parts.headers.is_empty(), "{head:?}");
        }
    }

    #[tokio::test]
    async fn a_chunked_body_split_anywhere_is_read_whole_and_the_connection_kept() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n\
            4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n";
        let (parts, body, kept) = feed(false, wire).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["content-type"], "application/x-ndjson");
        assert_eq!(parts.headers["transfer-encoding"], "chunked");
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        assert!(kept, "a keep-alive connection read to its end goes back");
    }

    #[tokio::test]
    async fn a_length_body_is_read_to_its_length() {
        let (parts, body, kept) = feed(
            false,
            b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert_eq!(
            (parts.status.as_u16(), &body[..], kept),
            (201, &b"hello"[..], true)
        );
        // Connection: close, or HTTP/1.0 without keep-alive: not reused.
        let (_, body, kept) = feed(
            false,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        assert_eq!((&body[..], kept), (&b"ok"[..], false));
        let (parts, _, kept) = feed(false, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        assert_eq!((parts.version, kept), (Version::HTTP_10, false));
        let (_, _, kept) = feed(
            false,
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        assert!(kept);
    }

    #[tokio::test]
    async fn no_body_after_head_204_304_and_1xx_heads_are_skipped() {
        let (parts, body, kept) =
            feed(true, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n").await;
        assert_eq!((parts.status.as_u16(), body.len(), kept), (200, 0, true));
        for code in ["204 No Content", "304 Not Modified"] {
            let wire = format!("HTTP/1.1 {code}\r\nETag: \"x\"\r\n\r\n");
            let (parts, body, kept) = feed(false, wire.as_bytes()).await;
            assert_eq!((body.len(), kept), (0, true), "{}", parts.status);
        }
        let (parts, body, _) = feed(
            false,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
        assert!(!parts.headers.contains_key("link"));
        let (parts, _, kept) = feed(
            false,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        )
        .await;
        assert_eq!(
            (parts.status.as_u16(), kept),
            (101, false),
            "a 101 is not skipped nor reused"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let ok = StatusCode::OK;
        let f = |pairs: &[(&str, &str)]| framing(false, ok, &h(pairs), &Hints::all());
        assert_eq!(f(&[]).unwrap(), Framing::Close);
        assert_eq!(f(&[("content-length", "0")]).unwrap(), Framing::Done);
        assert_eq!(
            f(&[("content-length", "7, 7")]).unwrap(),
            Framing::Length(7)
        );
        assert!(f(&[("content-length", "7"), ("content-length", "8")]).is_err());
        assert!(f(&[("content-length", "-1")]).is_err());
        // Transfer-Encoding wins over Content-Length; only a final `chunked` is chunked.
        assert_eq!(
            f(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "3")
            ])
            .unwrap(),
            Framing::Chunked(Chunk::Size)
        );
        assert_eq!(
            f(&[("transfer-encoding", "chunked, gzip")]).unwrap(),
            Framing::Close
        );
        assert_eq!(
            framing(
                true,
                ok,
                &h(&[("transfer-encoding", "chunked")]),
                &Hints::all()
            )
            .unwrap(),
            Framing::Done
        );
    }

    #[tokio::test]
    async fn bad_heads_and_chunks_are_errors() {
        let (mut conn, _peer) = quiet_conn().await;
        conn.buf.extend_from_slice(b"this is not HTTP\r\n\r\n");
        assert!(matches!(
            conn.parse_head(false, false),
            Err(H1Error::Invalid(_))
        ));
        let (mut conn, _peer) = quiet_conn().await;
        conn.buf.extend_from_slice(b"HTTP/1.1 200 OK\r\nX: ");
        conn.buf.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        assert!(matches!(
            conn.parse_head(false, false),
            Err(H1Error::Invalid(_))
        ));
        for bad in [&b"zz\r\n"[..], b"\r\n", b"1ffffffffffffffff\r\n"] {
            assert!(chunk_size(&bad[..bad.len() - 2]).is_err(), "{bad:?}");
        }
        let (mut conn, _peer) = quiet_conn().await;
        conn.buf.extend_from_slice(b"2\r\nabc\r\n");
        let mut body = H1Body::new(conn, Framing::Chunked(Chunk::Size), true, pool());
        assert_eq!(
            body.next_frame().unwrap(),
            Some(Some(Bytes::from_static(b"ab")))
        );
        assert!(
            body.next_frame().is_err(),
            "data longer than the chunk's size"
        );
    }

    #[tokio::test]
    async fn a_body_up_to_the_close_ends_clean_and_a_cut_one_is_an_error_after_its_data() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for wire in [
                &b"HTTP/1.1 200 OK\r\n\r\nuntil the close"[..],
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short",
            ] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).await.unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut s, wire)
                    .await
                    .unwrap();
            }
        });
        let req = |_: ()| {
            let r = Request::get("/x")
                .header(header::HOST, "h")
                .body(Either::Right(Full::new(Bytes::new())))
                .unwrap();
            Encoded::of(r).ok().unwrap()
        };
        let p = pool();
        let mut conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let (_, framing, keep_alive) = conn.exchange(&req(())).await.unwrap();
        assert_eq!((framing, keep_alive), (Framing::Close, false));
        let body = H1Body::new(conn, framing, keep_alive, p.clone());
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, "until the close");

        let mut conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let (_, framing, keep_alive) = conn.exchange(&req(())).await.unwrap();
        let mut body = H1Body::new(conn, framing, keep_alive, p.clone());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "cut short");
        let end = body.frame().await.unwrap();
        assert!(matches!(end, Err(H1Error::Incomplete)), "{end:?}");
        assert_eq!(p.idle_count(), 0);
        server.await.unwrap();
    }

    #[test]
    fn a_request_is_written_as_hyper_writes_it() {
        let r = Request::post("/api/chat?x=1")
            .header(header::HOST, "127.0.0.1:11434")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Either::Right(Full::new(Bytes::from_static(b"{}"))))
            .unwrap();
        let e = Encoded::of(r).ok().unwrap();
        assert_eq!(
            String::from_utf8(e.head.clone()).unwrap(),
            "POST /api/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:11434\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(e.body, "{}");
        // No body: no content-length (as hyper); a HEAD's answer has no body.
        let r = Request::head("/")
            .header(header::HOST, "h")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        let e = Encoded::of(r).ok().unwrap();
        assert_eq!(e.head, b"HEAD / HTTP/1.1\r\nhost: h\r\n\r\n");
        assert!(e.head_method);
        // An upgrade is not this module's.
        let r = Request::get("/ws")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        assert!(Encoded::of(r).is_err());
    }

    #[tokio::test]
    async fn an_idle_connection_the_provider_closed_is_not_reused() {
        let (conn, peer) = quiet_conn().await;
        assert!(conn.looks_alive());
        drop(peer);
        conn.io.readable().await.unwrap();
        assert!(!conn.looks_alive(), "closed by the provider");
        // Bytes nobody asked for are not checked for here (that would cost a read a
        // request); the exchange fails on them.
        let (conn, _peer) = quiet_conn().await;
        assert!(conn.looks_alive());
    }
}
