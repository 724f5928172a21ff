//! Reading request bodies (JSON object, `model`, `ttl`, `stream`, token limits, message text)
//! and the `Fail` errors they and the routes raise, with the two error body shapes: OpenAI's
//! for `/v1` and `/api/v0`, LM Studio's native one for `/api/v1`.

use std::time::Duration;

use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::wire::json;
use crate::common::{count_tokens, Call, SimBody};

/// Which error body shape a route uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Api {
    /// `/v1/*`: OpenAI shape.
    OpenAi,
    /// `/api/v0/*`: OpenAI shape, richer bodies.
    V0,
    /// `/api/v1/*`: `{"error":{"type","message"}}`.
    Native,
}

pub(super) enum Fail {
    BadRequest(String, Option<&'static str>),
    ModelNotFound(String),
    NotLoaded(String),
    WrongType(String),
    Overflow { prompt: u32, ctx: u32 },
    LoadFailed(String, String),
}

#[derive(Serialize)]
pub(super) struct OaiError<'a> {
    pub(super) error: OaiErrorBody<'a>,
}

#[derive(Serialize)]
pub(super) struct OaiErrorBody<'a> {
    pub(super) message: &'a str,
    #[serde(rename = "type")]
    pub(super) kind: &'a str,
    pub(super) param: Option<&'a str>,
    pub(super) code: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct NativeError<'a> {
    pub(super) error: NativeErrorBody<'a>,
}

#[derive(Serialize)]
pub(super) struct NativeErrorBody<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'a str,
    pub(super) message: &'a str,
}

impl Fail {
    /// Status, message, OpenAI `type`, `param`, `code`, and the native `type`.
    pub(super) fn parts(
        &self,
    ) -> (
        StatusCode,
        String,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
    ) {
        match self {
            Fail::BadRequest(msg, param) => (
                StatusCode::BAD_REQUEST,
                msg.clone(),
                "invalid_request_error",
                *param,
                None,
                "invalid_request",
            ),
            Fail::ModelNotFound(m) => (
                StatusCode::NOT_FOUND,
                format!("Model \"{m}\" not found. Please specify a valid model."),
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
                "model_not_found",
            ),
            Fail::NotLoaded(m) => (
                StatusCode::NOT_FOUND,
                format!(
                    "Model \"{m}\" is not loaded and JIT model loading is disabled. \
                     Load the model first."
                ),
                "invalid_request_error",
                Some("model"),
                Some("model_not_loaded"),
                "model_not_found",
            ),
            Fail::WrongType(msg) => (
                StatusCode::BAD_REQUEST,
                msg.clone(),
                "invalid_request_error",
                Some("model"),
                None,
                "invalid_request",
            ),
            Fail::Overflow { prompt, ctx } => (
                StatusCode::BAD_REQUEST,
                format!(
                    "Trying to keep the first {prompt} tokens when context the overflows. \
                     However, the model is loaded with context length of only {ctx} tokens, \
                     which is not enough. Try to load the model with a larger context length, \
                     or provide a shorter input"
                ),
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
                "invalid_request",
            ),
            Fail::LoadFailed(m, msg) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Failed to load model \"{m}\". Error: {msg}"),
                "server_error",
                Some("model"),
                Some("model_load_failed"),
                "internal_error",
            ),
        }
    }

    pub(super) fn response(&self, api: Api) -> Response<SimBody> {
        let (status, message, kind, param, code, native) = self.parts();
        match api {
            Api::OpenAi | Api::V0 => json(
                status,
                &OaiError {
                    error: OaiErrorBody {
                        message: &message,
                        kind,
                        param,
                        code,
                    },
                },
            ),
            Api::Native => json(
                status,
                &NativeError {
                    error: NativeErrorBody {
                        kind: native,
                        message: &message,
                    },
                },
            ),
        }
    }
}

// === request bodies ===

/// Text of a message `content`: a string, or the `text` of content parts.
pub(super) fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| {
                p.get("text")
                    .or_else(|| p.get("content"))
                    .and_then(Value::as_str)
            })
            .collect(),
        _ => String::new(),
    }
}

/// Prompt tokens of a message list: each message's content plus 4 tokens of template.
pub(super) fn message_tokens(messages: &[Value]) -> u32 {
    messages
        .iter()
        .map(|m| count_tokens(&content_text(m.get("content"))) + 4)
        .sum()
}

pub(super) fn parse_body(call: &Call) -> Result<serde_json::Map<String, Value>, Fail> {
    if call.body.is_empty() {
        return Err(Fail::BadRequest(
            "Request body is empty; expected a JSON object.".to_string(),
            None,
        ));
    }
    match serde_json::from_slice::<Value>(&call.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Fail::BadRequest(
            "Request body must be a JSON object.".to_string(),
            None,
        )),
        Err(e) => Err(Fail::BadRequest(
            format!("Invalid JSON in request body: {e}"),
            None,
        )),
    }
}

pub(super) fn required_model(body: &serde_json::Map<String, Value>) -> Result<String, Fail> {
    match body.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => Ok(m.to_string()),
        _ => Err(Fail::BadRequest(
            "'model' is required and must be a string.".to_string(),
            Some("model"),
        )),
    }
}

/// `ttl` in seconds (positive), as a duration.
pub(super) fn ttl_of(body: &serde_json::Map<String, Value>) -> Option<Duration> {
    body.get("ttl")
        .and_then(Value::as_f64)
        .filter(|t| *t > 0.0 && t.is_finite())
        .map(Duration::from_secs_f64)
}

pub(super) fn u32_of(body: &serde_json::Map<String, Value>, key: &str) -> Option<u32> {
    body.get(key)
        .and_then(Value::as_u64)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

pub(super) fn is_stream(body: &serde_json::Map<String, Value>) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

pub(super) fn include_usage(body: &serde_json::Map<String, Value>) -> bool {
    body.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub(super) fn max_tokens(body: &serde_json::Map<String, Value>, keys: &[&str]) -> Option<i64> {
    keys.iter()
        .find_map(|k| body.get(*k).and_then(Value::as_i64))
}
