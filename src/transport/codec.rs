//! The HTTP/1.1 codec the data plane's server and client share: how a message body is
//! framed (RFC 9112 §6: length, chunked, until close), decoding a body out of a buffer, the
//! header facts noted while a head is parsed, and a head's raw lines kept for the client.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};

/// The longest chunk-size line or trailer line.
const MAX_LINE: usize = 4096;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The connection closed (or was reset) before a byte of the answer: on a reused
    /// connection, the keep-alive race, and the request may go again.
    #[error("connection closed before message completed")]
    Unanswered(#[source] Option<std::io::Error>),
    #[error("connection closed before message completed")]
    Incomplete,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid HTTP response: {0}")]
    Invalid(String),
}

impl H1Error {
    /// Whether the provider sent nothing back: the request can go again, on a new
    /// connection.
    pub fn unanswered(&self) -> bool {
        matches!(self, H1Error::Unanswered(_))
    }
}

/// How a response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body, or the end of one.
    Done,
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the provider closes the connection.
    Close,
}

/// Where a chunked body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

/// Which of the headers that frame a message or steer its connection a head has, noted
/// while its map is built, so that the common head (none but a length) costs no lookups.
#[derive(Default)]
pub(super) struct Hints {
    pub content_length: bool,
    pub transfer_encoding: bool,
    pub connection: bool,
    pub expect: bool,
    pub upgrade: bool,
    pub date: bool,
    /// Any of the hop-by-hop headers (RFC 9110 §7.6.1; `Connection` included).
    pub hop_by_hop: bool,
    /// A header of the kind this proxy sets on answers (`x-llm-warden-*`): one in front of
    /// another set it, and this one may set it again.
    pub ours: bool,
}

impl Hints {
    pub(super) fn note(&mut self, name: &[u8]) {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            14 if is(b"content-length") => self.content_length = true,
            17 if is(b"transfer-encoding") => {
                self.transfer_encoding = true;
                self.hop_by_hop = true;
            }
            10 if is(b"connection") => {
                self.connection = true;
                self.hop_by_hop = true;
            }
            6 if is(b"expect") => self.expect = true,
            7 if is(b"upgrade") => {
                self.upgrade = true;
                self.hop_by_hop = true;
            }
            4 if is(b"date") => self.date = true,
            2 if is(b"te") => self.hop_by_hop = true,
            7 if is(b"trailer") => self.hop_by_hop = true,
            10 if is(b"keep-alive") => self.hop_by_hop = true,
            16 if is(b"proxy-connection") => self.hop_by_hop = true,
            18 if is(b"proxy-authenticate") => self.hop_by_hop = true,
            19 if is(b"proxy-authorization") => self.hop_by_hop = true,
            n if n > 13 && name[..13].eq_ignore_ascii_case(b"x-llm-warden-") => self.ours = true,
            _ => {}
        }
    }

    /// Every kind present, for a map built elsewhere.
    #[cfg(test)]
    pub(super) fn all() -> Hints {
        Hints {
            content_length: true,
            transfer_encoding: true,
            connection: true,
            expect: true,
            upgrade: true,
            date: true,
            hop_by_hop: true,
            ours: true,
        }
    }
}

/// A response's header lines as the provider sent them, carried by the body of a response
/// whose map is then empty: `server` writes them after the map's headers. Only for an
/// HTTP/1 client and a head with nothing hop-by-hop in it.
#[derive(Clone, Debug)]
pub struct RawHeaders {
    /// Each line with its line ending; no final empty line.
    pub lines: Bytes,
    /// A `Date` is among them.
    pub date: bool,
    /// A `Content-Length` is among them.
    pub length: bool,
}

/// Where a head's header lines lie in its bytes, to cut names and values out of it once it
/// is frozen (no copy of a value); up to 24 without an allocation.
pub(super) struct Spans {
    few: [Span; 16],
    many: Vec<Span>,
    count: usize,
}

/// Name start, name end, value start, value end (a head is at most a few hundred KB).
type Span = (u32, u32, u32, u32);

impl Spans {
    /// Locates `headers`, parsed out of a buffer that starts at address `base`, and notes
    /// their names in `hints`.
    pub(super) fn locate(
        base: usize,
        headers: &[httparse::Header<'_>],
        hints: &mut Hints,
    ) -> Spans {
        let count = headers.len();
        let mut spans = Spans {
            few: [(0, 0, 0, 0); 16],
            many: Vec::new(),
            count,
        };
        let slots = if count <= spans.few.len() {
            &mut spans.few[..count]
        } else {
            spans.many.resize(count, (0, 0, 0, 0));
            &mut spans.many[..]
        };
        let at = |p: *const u8| (p as usize - base) as u32;
        for (span, h) in slots.iter_mut().zip(headers) {
            hints.note(h.name.as_bytes());
            let (name, value) = (at(h.name.as_ptr()), at(h.value.as_ptr()));
            *span = (
                name,
                name + h.name.len() as u32,
                value,
                value + h.value.len() as u32,
            );
        }
        spans
    }

    /// (name start, name end, value start, value end) of each header, in order.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = [usize; 4]> + '_ {
        let all = if self.count <= self.few.len() {
            &self.few[..self.count]
        } else {
            &self.many[..]
        };
        all.iter()
            .map(|&(a, b, c, d)| [a as usize, b as usize, c as usize, d as usize])
    }

    /// The headers as a map with room for `extra` more, cut out of `head`.
    pub(super) fn map(&self, head: &Bytes, extra: usize) -> Result<HeaderMap, String> {
        let mut map = HeaderMap::with_capacity(self.count + extra);
        for [n0, n1, v0, v1] in self.iter() {
            let name =
                HeaderName::from_bytes(&head[n0..n1]).map_err(|e| format!("header name: {e}"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
                .map_err(|e| format!("header value: {e}"))?;
            map.append(name, value);
        }
        Ok(map)
    }

    /// The header lines of `head`, each with its line ending, without the final empty line.
    pub(super) fn lines(&self, head: &Bytes) -> Bytes {
        let (Some(first), Some(last)) = (self.iter().next(), self.iter().next_back()) else {
            return Bytes::new();
        };
        // Past the last value (and any whitespace after it) to its line's LF.
        let end = memchr::memchr(b'\n', &head[last[3]..]).map_or(head.len(), |i| last[3] + i + 1);
        head.slice(first[0]..end)
    }
}

pub(super) fn framing(
    head_method: bool,
    status: StatusCode,
    headers: &HeaderMap,
    hints: &Hints,
) -> Result<Framing, H1Error> {
    if !hints.content_length && !hints.transfer_encoding {
        return framing_of(head_method, status, None, std::iter::empty());
    }
    let te = hints
        .transfer_encoding
        .then(|| {
            headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .next_back()
        })
        .flatten();
    let lengths = headers
        .get_all(header::CONTENT_LENGTH)
        .into_iter()
        .map(|v| v.as_bytes());
    framing_of(head_method, status, te, lengths)
}

/// [`framing`] from the last `Transfer-Encoding` value and every `Content-Length` value.
pub(super) fn framing_of<'a>(
    head_method: bool,
    status: StatusCode,
    te: Option<&HeaderValue>,
    lengths: impl Iterator<Item = &'a [u8]>,
) -> Result<Framing, H1Error> {
    if head_method
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Done);
    }
    if let Some(te) = te {
        let last = te
            .to_str()
            .ok()
            .and_then(|s| s.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(l) if l.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for v in lengths {
        for part in std::str::from_utf8(v).unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| H1Error::Invalid("invalid content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Invalid("conflicting content-length".into()));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

pub(super) fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut keep = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("close") {
                return false;
            }
            if token.eq_ignore_ascii_case("keep-alive") {
                keep = true;
            }
        }
    }
    keep
}

/// The next piece of a body framed by `framing` out of `buf`: `Some(Some(data))`,
/// `Some(None)` at its end (`framing` is then `Done`), or `None` when more bytes must be
/// read first. Used for response bodies here and request bodies in `server`.
#[allow(clippy::option_option)]
pub(super) fn decode(
    framing: &mut Framing,
    buf: &mut BytesMut,
) -> Result<Option<Option<Bytes>>, H1Error> {
    loop {
        match *framing {
            Framing::Done => return Ok(Some(None)),
            Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *framing = match *framing {
                    Framing::Length(_) if left == 0 => Framing::Done,
                    Framing::Length(_) => Framing::Length(left),
                    _ if left == 0 => Framing::Chunked(Chunk::DataEnd),
                    _ => Framing::Chunked(Chunk::Data(left)),
                };
                return Ok(Some(Some(data)));
            }
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Some(buf.split().freeze())));
            }
            Framing::Chunked(Chunk::DataEnd) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                if !line.is_empty() {
                    return Err(H1Error::Invalid("chunk data longer than its size".into()));
                }
                *framing = Framing::Chunked(Chunk::Size);
            }
            Framing::Chunked(Chunk::Size) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                let size = chunk_size(&line)?;
                *framing = Framing::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
            }
            Framing::Chunked(Chunk::Trailers) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                if line.is_empty() {
                    *framing = Framing::Done;
                    return Ok(Some(None));
                }
            }
        }
    }
}

/// Takes one line (without its CRLF, or bare LF) off the front of `buf`, if it is all there.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, H1Error> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(H1Error::Invalid("chunk line too long".into())),
        None => Ok(None),
    }
}

/// The size of a chunk-size line (`1a` or `1a;ext=...`).
pub(super) fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(H1Error::Invalid("invalid chunk size line".into()));
    }
    let mut size = 0u64;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(H1Error::Invalid("invalid chunk size line".into())),
        };
        size = size * 16 + u64::from(v);
    }
    Ok(size)
}

/// Whether a request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}
