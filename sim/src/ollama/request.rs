//! Request decoding in Ollama's manner: bodies read like Go's `json.Decoder` into a struct,
//! typed fields with Go's unmarshal error texts, `options`, chat messages, the checks made
//! before scheduling, and `ApiError`, which renders natively or in the OpenAI shape.

use http::{Response, StatusCode};
use serde_json::{Map, Number, Value};

use super::scheduler::SchedError;
use super::wire::{json_line, ErrorBody, OaiErrorBody};
use super::{OllamaSim, IMAGE_TOKENS, JSON, MESSAGE_OVERHEAD_TOKENS, OAI_JSON, QUEUE_FULL};
use crate::common::{self, SimBody};
use crate::SimModel;

/// What a handler returns; `routes` renders the error in the route's shape.
pub(super) type Handled = Result<Response<SimBody>, ApiError>;

/// An error response: native `{"error":...}` or the OpenAI shape, by route.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(super) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn not_found(model: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("model '{model}' not found"))
    }

    /// `"label" does not support what` (chat, generate, thinking).
    pub(super) fn unsupported(label: &str, what: &str) -> Self {
        Self::bad(format!("{} does not support {what}", go_quote(label)))
    }

    pub(super) fn native(&self) -> Response<SimBody> {
        error_response(self.status, &self.message)
    }

    pub(super) fn openai(&self) -> Response<SimBody> {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            _ => "api_error",
        };
        let body = json_line(&OaiErrorBody::new(&self.message, kind));
        common::respond(self.status, OAI_JSON, body)
    }
}

impl From<SchedError> for ApiError {
    fn from(e: SchedError) -> Self {
        match e {
            SchedError::QueueFull => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, QUEUE_FULL),
            SchedError::Load(msg) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg),
        }
    }
}

pub(super) fn error_response(status: StatusCode, message: &str) -> Response<SimBody> {
    common::respond(status, JSON, common::go_json(&ErrorBody { error: message }))
}

/// Decodes a request body the way Go's `json.Decoder` into a struct would: empty → missing
/// body, first JSON value only, non-objects rejected.
/// The seed of a reply: the request without `keep_alive`, which changes how long the model
/// stays loaded, not what it says (a proxy that rewrites `keep_alive` gets the same words).
pub(super) fn reply_seed(map: &Map<String, Value>) -> u64 {
    let mut m = map.clone();
    m.remove("keep_alive");
    crate::common::hash_bytes(&serde_json::to_vec(&m).unwrap_or_default())
}

pub(super) fn parse_object(body: &[u8], go_type: &str) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("missing request body"));
    }
    // Go's `encoding/json` into a struct (decode.go `object`): the first value only; a key
    // names the field whose tag it equals, else the one it equals under Unicode case folding
    // (`bytes.EqualFold`: "Model", "MODEL", "ſtream" with U+017F); every occurrence is
    // decoded in order, so the last value wins, except that `null` leaves a string field
    // as it was and a repeated `options` decodes into the map the first one made (merged).
    // Ollama's tags are all lower case, so a key is read as its fold.
    let mut de = serde_json::Deserializer::from_slice(body);
    let first = match serde::Deserializer::deserialize_any(&mut de, GoObject) {
        Ok(Some(map)) => Some(Ok(Value::Object(map))),
        Ok(None) => serde_json::Deserializer::from_slice(body)
            .into_iter::<Value>()
            .next(),
        Err(e) => Some(Err(e)),
    };
    match first {
        Some(Ok(Value::Object(map))) => Ok(map),
        Some(Ok(Value::Null)) | None => Ok(Map::new()),
        Some(Ok(other)) => Err(ApiError::bad(format!(
            "json: cannot unmarshal {} into Go value of type {go_type}",
            go_kind(&other)
        ))),
        Some(Err(e)) => Err(ApiError::bad(decoder_message(body, &e))),
    }
}

/// Ollama's request fields of type `string`, where Go's `null` changes nothing.
const GO_STRING_FIELDS: [&str; 6] = ["model", "name", "prompt", "suffix", "system", "template"];

/// A key as Go matches it to one of Ollama's lower-case tags: its simple case fold (ASCII
/// letters, U+017F `ſ` to `s`, U+212A Kelvin sign to `k`); a key with any other non-ASCII
/// letter matches no tag and stays as it is.
fn go_fold(key: &str) -> String {
    let folded: Option<String> = key
        .chars()
        .map(|c| match c {
            '\u{017F}' => Some('s'),
            '\u{212A}' => Some('k'),
            c if c.is_ascii() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    folded.unwrap_or_else(|| key.to_string())
}

/// Reads a top-level object with Go's struct semantics (see `parse_object`); `None` for
/// any other value (left to the plain reading for its error text).
struct GoObject;

impl<'de> serde::de::Visitor<'de> for GoObject {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = a.next_key::<String>()? {
            let key = go_fold(&key);
            let value: Value = a.next_value()?;
            match (map.get_mut(&key), value) {
                (Some(_), Value::Null) if GO_STRING_FIELDS.contains(&key.as_str()) => {}
                // `options` is a `map[string]any`; other objects (`format`, a
                // `json.RawMessage`) are replaced.
                (Some(Value::Object(old)), Value::Object(new)) if key == "options" => {
                    old.extend(new)
                }
                (_, value) => {
                    map.insert(key, value);
                }
            }
        }
        Ok(Some(map))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
        while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// A message in the style of Go's JSON decoder for a syntax error.
fn decoder_message(body: &[u8], e: &serde_json::Error) -> String {
    if e.is_eof() {
        return "unexpected EOF".to_string();
    }
    // serde_json reports 1-based line and column of the offending byte.
    let mut line = 1;
    let mut offset = 0;
    for (i, b) in body.iter().enumerate() {
        if line == e.line() {
            offset = i;
            break;
        }
        if *b == b'\n' {
            line += 1;
        }
    }
    let pos = (offset + e.column())
        .saturating_sub(1)
        .min(body.len().saturating_sub(1));
    let c = String::from_utf8_lossy(&body[pos..=pos]).into_owned();
    format!("invalid character '{c}' looking for beginning of value")
}

pub(super) fn go_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A JSON number as Go decodes it into an `int`: fractions truncated.
fn go_int(n: &Number) -> Option<i64> {
    n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))
}

/// Typed field access with Go's unmarshal error texts.
pub(super) struct Fields<'a> {
    map: &'a Map<String, Value>,
    ty: &'static str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(map: &'a Map<String, Value>, ty: &'static str) -> Self {
        Fields { map, ty }
    }

    fn mismatch(&self, key: &str, v: &Value, want: &str) -> ApiError {
        ApiError::bad(format!(
            "json: cannot unmarshal {} into Go struct field {}.{key} of type {want}",
            go_kind(v),
            self.ty
        ))
    }

    pub(super) fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.mismatch(key, v, "string")),
        }
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.mismatch(key, v, "bool")),
        }
    }

    pub(super) fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(go_int(n)),
            Some(v) => Err(self.mismatch(key, v, "int")),
        }
    }

    /// `model`, or the older `name`.
    pub(super) fn model(&self) -> Result<&'a str, ApiError> {
        match self.str("model")? {
            Some(m) if !m.is_empty() => Ok(m),
            _ => Ok(self.str("name")?.unwrap_or("")),
        }
    }
}

/// The `options` the simulator honours.
#[derive(Default)]
pub(super) struct Opts {
    pub(super) num_ctx: Option<u32>,
    /// A runner option like `num_ctx`: a different value reloads the model.
    pub(super) num_batch: Option<u32>,
    pub(super) num_predict: Option<i64>,
    pub(super) num_keep: Option<u32>,
}

pub(super) fn parse_options(v: Option<&Value>) -> Result<Opts, ApiError> {
    let Some(Value::Object(map)) = v else {
        return match v {
            None | Some(Value::Null) => Ok(Opts::default()),
            Some(other) => Err(ApiError::bad(format!(
                "json: cannot unmarshal {} into Go struct field .options of type map[string]interface {{}}",
                go_kind(other)
            ))),
        };
    };
    let int = |key: &str| -> Result<Option<i64>, ApiError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(go_int(n)),
            Some(other) => Err(ApiError::bad(format!(
                "option \"{key}\" must be of type integer, not {}",
                go_kind(other)
            ))),
        }
    };
    let to_u32 = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
    Ok(Opts {
        num_ctx: int("num_ctx")?.map(to_u32),
        num_batch: int("num_batch")?.map(to_u32),
        num_predict: int("num_predict")?,
        num_keep: int("num_keep")?.map(to_u32),
    })
}

/// Go's `strconv.Quote` for the strings we meet (Rust's debug quoting agrees on ASCII).
pub(super) fn go_quote(s: &str) -> String {
    format!("{s:?}")
}

/// The rejections Ollama makes before scheduling: `think` on a model without thinking and
/// `top_logprobs` out of range.
pub(super) fn check_think_and_logprobs(f: &Fields<'_>, label: &str) -> Result<(), ApiError> {
    if let Some(n) = f.int("top_logprobs")? {
        if !(0..=20).contains(&n) {
            return Err(ApiError::bad("top_logprobs must be between 0 and 20"));
        }
    }
    let thinks = match f.map.get("think") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        _ => false,
    };
    if thinks {
        return Err(ApiError::unsupported(label, "thinking"));
    }
    Ok(())
}

/// One chat message, as far as token counting is concerned.
pub(super) struct ChatMsg {
    pub(super) role: String,
    content: String,
    images: usize,
}

impl ChatMsg {
    /// A text message (the Anthropic and Responses layers' `system` / `instructions`).
    pub(super) fn text(role: &str, content: String) -> Self {
        ChatMsg {
            role: role.to_string(),
            content,
            images: 0,
        }
    }

    pub(super) fn content(&self) -> &str {
        &self.content
    }

    pub(super) fn tokens(&self) -> u32 {
        common::count_tokens(&self.content)
            + MESSAGE_OVERHEAD_TOKENS
            + IMAGE_TOKENS * self.images as u32
    }
}

pub(super) fn parse_messages(v: Option<&Value>, ty: &str) -> Result<Vec<ChatMsg>, ApiError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::bad(format!(
            "json: cannot unmarshal {} into Go struct field {ty}.messages of type []api.Message",
            go_kind(other)
        )))
        }
    };
    items
        .iter()
        .map(|m| {
            let Value::Object(map) = m else {
                return Err(ApiError::bad(format!(
                    "json: cannot unmarshal {} into Go struct field {ty}.messages of type api.Message",
                    go_kind(m)
                )));
            };
            let f = Fields::new(map, "Message");
            let content = match map.get("content") {
                // The OpenAI layer accepts content parts; the text parts count.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                _ => f.str("content")?.unwrap_or("").to_string(),
            };
            Ok(ChatMsg {
                role: f.str("role")?.unwrap_or("").to_string(),
                content,
                images: map
                    .get("images")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len),
            })
        })
        .collect()
}

/// The catalogue entry `label` names: 400 when empty, 404 when unknown.
pub(super) fn require_model(sim: &OllamaSim, label: &str) -> Result<SimModel, ApiError> {
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    sim.lookup(label).ok_or_else(|| ApiError::not_found(label))
}
