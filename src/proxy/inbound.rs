//! Reading an inspected request: the body once, under the size limit, and the few fields the
//! proxy needs from it. The rest of the JSON is skipped by serde, never copied.

use std::borrow::Cow;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ProxyError;

/// The fields of a model request the proxy reads. Everything else stays in the raw bytes.
#[derive(Debug, Default, Deserialize)]
pub struct ModelRequest<'a> {
    /// Borrowed from the body unless it has escapes.
    #[serde(borrow, default, deserialize_with = "borrowed_str")]
    pub model: Option<Cow<'a, str>>,
    pub stream: Option<bool>,
    /// Ollama's `keep_alive`, as written (`null` included, so its place in the body is known).
    #[serde(borrow, default, deserialize_with = "raw_even_null")]
    pub keep_alive: Option<&'a RawValue>,
    /// Ollama generate's `prompt` and chat's `messages`, unparsed: only whether they are
    /// empty matters (a load or unload request, docs/providers.md §1.8).
    #[serde(borrow)]
    pub prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    pub messages: Option<&'a RawValue>,
    /// Ollama `options` (for `num_ctx`, `num_predict`), unparsed.
    #[serde(borrow)]
    pub options: Option<&'a RawValue>,
    /// OpenAI reply limits, unparsed (a wrong type is the provider's to refuse).
    #[serde(borrow)]
    pub max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    pub max_completion_tokens: Option<&'a RawValue>,
}

/// An optional string, borrowed from the body where it has no escapes. serde borrows a
/// `Cow<str>` field only when it is not wrapped: `Option<Cow<str>>` with `#[serde(borrow)]`
/// always allocated (one `String` per model request, seen in callgrind).
fn borrowed_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Option::<Borrowed<'de>>::deserialize(d).map(|o| o.map(|b| b.0))
}

/// A field's raw value, `null` too (plain `Option<&RawValue>` reads `null` as absent).
fn raw_even_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// What a request asks of the context: `num_ctx` (Ollama) and the most tokens of reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub num_ctx: Option<u64>,
    pub num_batch: Option<u64>,
    pub max_reply: Option<u64>,
}

/// The Ollama options the proxy reads.
#[derive(Debug, Default, Deserialize)]
struct Options {
    num_ctx: Option<serde_json::Value>,
    num_batch: Option<serde_json::Value>,
    num_predict: Option<serde_json::Value>,
}

impl<'a> ModelRequest<'a> {
    /// Parses what it can; a body that is not a JSON object yields no model (the upstream
    /// then answers with its own error, byte for byte).
    ///
    /// Two things serde would let through are refused, so that a body that names a model is
    /// always one the rewriters accept: a JSON array (serde reads a struct from a sequence,
    /// so `["llama3.2"]` named a model; seen while writing `fuzz/`'s `request_body`), and
    /// invalid UTF-8 in a value serde skips (JSON text is UTF-8, RFC 8259 §8.1; found by that
    /// target: `set_at` edited such a body while `set_top_level` refused it).
    pub fn parse(body: &'a [u8]) -> Self {
        let object = body
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .is_some_and(|b| *b == b'{');
        match std::str::from_utf8(body) {
            Ok(text) if object => serde_json::from_str(text).unwrap_or_default(),
            _ => Self::default(),
        }
    }

    /// No prompt and no messages: Ollama's load-only (or, with `keep_alive: 0`, unload) form.
    pub fn is_load_only(&self) -> bool {
        let empty = |v: Option<&RawValue>, e: &str| {
            v.is_none_or(|r| r.get().chars().filter(|c| !c.is_whitespace()).eq(e.chars()))
        };
        empty(self.prompt, "\"\"") && empty(self.messages, "[]")
    }

    /// `options.num_ctx`, `options.num_batch` and the reply limit (`options.num_predict`, `max_completion_tokens`,
    /// `max_tokens`), each when a positive integer; `options` is parsed once.
    pub fn limits(&self) -> Limits {
        let positive = |v: Option<serde_json::Value>| v?.as_u64().filter(|n| *n > 0);
        let options: Options = self
            .options
            .and_then(|o| serde_json::from_str(o.get()).ok())
            .unwrap_or_default();
        let n = |r: Option<&RawValue>| r.and_then(|r| r.get().trim().parse::<u64>().ok());
        Limits {
            num_ctx: positive(options.num_ctx),
            num_batch: positive(options.num_batch),
            max_reply: positive(options.num_predict)
                .or_else(|| n(self.max_completion_tokens))
                .or_else(|| n(self.max_tokens)),
        }
    }

    /// The model name, if present and non-empty.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref().filter(|m| !m.is_empty())
    }
}

/// Reads the whole body, refusing more than `limit` bytes (checked against `Content-Length`
/// first, so an honest oversized upload is refused before it is read).
pub async fn read_body(
    headers: &HeaderMap,
    body: super::RequestBody,
    limit: u64,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    // Read by the server before the handler ran: nothing to wait for.
    if let super::RequestBody::Full(b) = body {
        let b = b.unwrap_or_default();
        if b.len() as u64 > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        return Ok(b);
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) => Err(ProxyError::BodyRead(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream_and_skips_the_rest() {
        let r = ModelRequest::parse(
            br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
        );
        assert_eq!(r.model(), Some("llama3.2"));
        assert!(
            matches!(r.model, Some(Cow::Borrowed(_))),
            "no copy of a plain name"
        );
        assert_eq!(r.stream, Some(false));
        let r = ModelRequest::parse(br#"{"model":"a\"b"}"#);
        assert_eq!(r.model(), Some("a\"b"));
        let r = ModelRequest::parse(br#"{"model":"\u006c\u006c"}"#);
        assert_eq!(r.model(), Some("ll"));
        let r = ModelRequest::parse(br#"{"model":null,"stream":true}"#);
        assert_eq!((r.model(), r.stream), (None, Some(true)));
        let r = ModelRequest::parse(br#"{"stream":true}"#);
        assert_eq!((r.model(), r.stream), (None, Some(true)));
    }

    #[test]
    fn load_only_requests_are_recognised() {
        for (body, load_only) in [
            (r#"{"model":"m"}"#, true),
            (r#"{"model":"m","prompt":""}"#, true),
            (r#"{"model":"m","messages":[ ]}"#, true),
            (r#"{"model":"m","prompt":null,"keep_alive":0}"#, true),
            (r#"{"model":"m","prompt":"hi"}"#, false),
            (
                r#"{"model":"m","messages":[{"role":"user","content":""}]}"#,
                false,
            ),
        ] {
            assert_eq!(
                ModelRequest::parse(body.as_bytes()).is_load_only(),
                load_only,
                "{body}"
            );
        }
        let r = ModelRequest::parse(br#"{"model":"m","keep_alive":"5m"}"#);
        assert_eq!(r.keep_alive.map(|k| k.get()), Some(r#""5m""#));
        let r = ModelRequest::parse(br#"{"model":"m","keep_alive":null}"#);
        assert_eq!(r.keep_alive.map(|k| k.get()), Some("null"));
        assert!(ModelRequest::parse(br#"{"model":"m"}"#)
            .keep_alive
            .is_none());
    }

    #[test]
    fn bad_or_modelless_bodies_yield_no_model() {
        for body in [
            &b"not json"[..],
            b"",
            b"{\"model\":\"\"}",
            b"[1,2]",
            b"{\"model\":5}",
        ] {
            assert_eq!(ModelRequest::parse(body).model(), None);
        }
    }
}
