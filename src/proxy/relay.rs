//! A relayed answer for a front (the `fleet` module): a node's bytes as they come, holding
//! whatever the front keeps for the answer's lifetime (its in-flight count), and, when the
//! node's stream breaks after it began, one last frame in the client's stream format saying
//! so, then a clean end, instead of a cut connection.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::providers::ErrorStyle;
use crate::transport::pool::{BoxError, PooledBody};

/// See the module doc.
pub struct RelayBody {
    inner: PooledBody,
    /// Sent in place of a mid-stream error (then the body ends); `None`: the error passes
    /// (the connection is cut, as for a body that is not a stream of events).
    error_frame: Option<Bytes>,
    /// Dropped with the body.
    _hold: Box<dyn Send + Sync>,
    ended: bool,
}

impl RelayBody {
    /// `headers`: the answer's (its `Content-Type` says whether it is a stream of lines or
    /// events); `what`: the message of the error frame.
    pub fn new(
        inner: PooledBody,
        headers: &HeaderMap,
        style: ErrorStyle,
        what: String,
        hold: Box<dyn Send + Sync>,
    ) -> Self {
        RelayBody {
            inner,
            error_frame: stream_error_frame(headers, style, &what),
            _hold: hold,
            ended: false,
        }
    }
}

impl crate::transport::server::WireHead for RelayBody {
    fn raw_headers(&self) -> Option<&crate::transport::codec::RawHeaders> {
        self.inner.raw_headers()
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => match this.error_frame.take() {
                Some(frame) => {
                    tracing::warn!(error = %e, "a node's stream broke: the client is told in its format");
                    this.ended = true;
                    Poll::Ready(Some(Ok(Frame::data(frame))))
                }
                None => Poll::Ready(Some(Err(e))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.error_frame.is_some() {
            // A frame may be added: no exact length.
            let mut h = SizeHint::new();
            h.set_lower(self.inner.size_hint().lower());
            return h;
        }
        self.inner.size_hint()
    }
}

/// The last frame of a broken stream, as the client's format writes an error: an NDJSON
/// line (`{"error":"..."}`, as Ollama writes one mid-stream), or an SSE event (Anthropic's
/// `event: error`; OpenAI's and llama-server's `data: {"error":{...}}`). `None` for any
/// other body: a JSON document cannot take a line more.
pub fn stream_error_frame(headers: &HeaderMap, style: ErrorStyle, what: &str) -> Option<Bytes> {
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // A body with a declared length cannot grow.
    if headers.contains_key(http::header::CONTENT_LENGTH) {
        return None;
    }
    if ct.starts_with("application/x-ndjson") {
        let line = serde_json::json!({ "error": what }).to_string();
        return Some(Bytes::from(format!("{line}\n")));
    }
    if !ct.starts_with("text/event-stream") {
        return None;
    }
    let event = match style {
        ErrorStyle::Anthropic => {
            let data = serde_json::json!({"type": "error",
                "error": {"type": "api_error", "message": what}});
            format!("event: error\ndata: {data}\n\n")
        }
        ErrorStyle::Ollama | ErrorStyle::OpenAi | ErrorStyle::LlamaCpp => {
            let data = serde_json::json!({"error": {"message": what,
                "type": "server_error", "param": null, "code": "node_failed"}});
            format!("data: {data}\n\n")
        }
    };
    Some(Bytes::from(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str, length: bool) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        if length {
            h.insert(http::header::CONTENT_LENGTH, "10".parse().unwrap());
        }
        h
    }

    #[test]
    fn a_broken_stream_ends_with_an_error_in_its_own_format() {
        let nd = stream_error_frame(
            &headers("application/x-ndjson", false),
            ErrorStyle::Ollama,
            "gone",
        );
        assert_eq!(nd.as_deref(), Some(&b"{\"error\":\"gone\"}\n"[..]));
        let sse = stream_error_frame(
            &headers("text/event-stream; charset=utf-8", false),
            ErrorStyle::Anthropic,
            "gone",
        )
        .unwrap();
        let text = std::str::from_utf8(&sse).unwrap();
        assert!(
            text.starts_with("event: error\ndata: {") && text.ends_with("\n\n"),
            "{text}"
        );
        let v: serde_json::Value =
            serde_json::from_str(text.trim_start_matches("event: error\ndata: ").trim()).unwrap();
        assert_eq!(v["error"]["message"], "gone");
        let oai = stream_error_frame(
            &headers("text/event-stream", false),
            ErrorStyle::OpenAi,
            "gone",
        )
        .unwrap();
        assert!(oai.starts_with(b"data: {\"error\":{"));
        // A JSON document, or any body with a declared length, takes no frame.
        assert_eq!(
            stream_error_frame(&headers("application/json", false), ErrorStyle::OpenAi, "x"),
            None
        );
        assert_eq!(
            stream_error_frame(
                &headers("application/x-ndjson", true),
                ErrorStyle::Ollama,
                "x"
            ),
            None
        );
    }
}
