//! JSON as llama-server writes it: nlohmann `ordered_json`, keys in insertion order and no
//! whitespace. `J` is that ordered tree (built with `obj!`), `Fail` the one error shape
//! `{"error":{"code","message","type"}}` with HTTP status = `code`, plus response helpers.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::common::{respond, SimBody};

/// Content type of every JSON answer.
pub(super) const JSON: &str = "application/json; charset=utf-8";
/// Content type of every stream.
pub(super) const SSE: &str = "text/event-stream";

/// An ordered JSON value: objects keep the order their keys were pushed in.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum J {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

/// `obj!{"a" => 1, "b" => "x"}`: an ordered object.
macro_rules! obj {
    ($($k:expr => $v:expr),* $(,)?) => {
        $crate::llamacpp::wire::J::Obj(vec![
            $(($k.to_string(), $crate::llamacpp::wire::J::from($v))),*
        ])
    };
}
pub(super) use obj;

impl J {
    /// Appends `key` to an object (nlohmann `j[key] = v` on a new key); no-op on non-objects.
    pub(super) fn push(&mut self, key: &str, value: impl Into<J>) {
        if let J::Obj(fields) = self {
            fields.push((key.to_string(), value.into()));
        }
    }

    pub(super) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Serialize for J {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::Null => s.serialize_unit(),
            J::Bool(b) => s.serialize_bool(*b),
            J::Int(i) => s.serialize_i64(*i),
            // Like nlohmann, a non-finite float is written as null.
            J::Float(f) if !f.is_finite() => s.serialize_unit(),
            J::Float(f) => s.serialize_f64(*f),
            J::Str(v) => s.serialize_str(v),
            J::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            J::Obj(fields) => {
                let mut map = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl From<&str> for J {
    fn from(v: &str) -> Self {
        J::Str(v.to_string())
    }
}
impl From<&String> for J {
    fn from(v: &String) -> Self {
        J::Str(v.clone())
    }
}
impl From<String> for J {
    fn from(v: String) -> Self {
        J::Str(v)
    }
}
impl From<bool> for J {
    fn from(v: bool) -> Self {
        J::Bool(v)
    }
}
impl From<u32> for J {
    fn from(v: u32) -> Self {
        J::Int(i64::from(v))
    }
}
impl From<i32> for J {
    fn from(v: i32) -> Self {
        J::Int(i64::from(v))
    }
}
impl From<i64> for J {
    fn from(v: i64) -> Self {
        J::Int(v)
    }
}
impl From<u64> for J {
    fn from(v: u64) -> Self {
        J::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<usize> for J {
    fn from(v: usize) -> Self {
        J::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for J {
    fn from(v: f64) -> Self {
        J::Float(v)
    }
}
impl From<f32> for J {
    fn from(v: f32) -> Self {
        J::Float(f64::from(v))
    }
}
impl<T: Into<J>> From<Vec<T>> for J {
    fn from(v: Vec<T>) -> Self {
        J::Arr(v.into_iter().map(Into::into).collect())
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(v: Option<T>) -> Self {
        v.map_or(J::Null, Into::into)
    }
}

// === errors ===

/// An error answer. `format_error_response` in the real server: the HTTP status is `code`,
/// and the type names the class (`docs/providers.md` §3.4).
#[derive(Clone, Debug)]
pub(super) struct Fail {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) kind: &'static str,
    /// `exceed_context_size_error` only: `(n_prompt_tokens, n_ctx)`.
    pub(super) context: Option<(u32, u32)>,
}

impl Fail {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Fail {
            status,
            message: message.into(),
            kind,
            context: None,
        }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Fail::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Fail::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub(super) fn server(message: impl Into<String>) -> Self {
        Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub(super) fn not_supported(message: impl Into<String>) -> Self {
        Fail::new(StatusCode::NOT_IMPLEMENTED, "not_supported_error", message)
    }

    pub(super) fn unavailable(message: impl Into<String>) -> Self {
        Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            message,
        )
    }

    /// The prompt does not fit the slot: no silent truncation in llama-server.
    pub(super) fn exceeds_context(n_prompt_tokens: u32, n_ctx: u32) -> Self {
        Fail {
            context: Some((n_prompt_tokens, n_ctx)),
            ..Fail::new(
                StatusCode::BAD_REQUEST,
                "exceed_context_size_error",
                format!(
                    "request ({n_prompt_tokens} tokens) exceeds the available context size \
                     ({n_ctx} tokens), try increasing it"
                ),
            )
        }
    }

    /// The `{"code","message","type"[,..]}` object.
    pub(super) fn body(&self) -> J {
        // The HTTP layer's 404 page (it also replaces a handler's own 404 body) puts the keys
        // in another order.
        if self.status == StatusCode::NOT_FOUND {
            return obj! {
                "message" => "File Not Found",
                "type" => self.kind,
                "code" => 404u32,
            };
        }
        let mut e = obj! {
            "code" => u32::from(self.status.as_u16()),
            "message" => self.message.as_str(),
            "type" => self.kind,
        };
        if let Some((n_prompt, n_ctx)) = self.context {
            e.push("n_prompt_tokens", n_prompt);
            e.push("n_ctx", n_ctx);
        }
        e
    }

    pub(super) fn response(&self) -> Response<SimBody> {
        json(self.status, &obj! {"error" => self.body()})
    }
}

// === responses ===

pub(super) fn json(status: StatusCode, body: &J) -> Response<SimBody> {
    respond(status, JSON, body.to_bytes())
}

pub(super) fn ok(body: &J) -> Response<SimBody> {
    json(StatusCode::OK, body)
}

/// One SSE event: `data: <json>\n\n`.
pub(super) fn sse_data(body: &J) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&body.to_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub(super) fn sse_response(body: SimBody) -> Response<SimBody> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SSE));
    resp
}
