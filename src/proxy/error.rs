//! Errors the proxy itself answers with, and their bodies in the shape the client expects:
//! Ollama's `{"error":"..."}` on `/api/*`, the OpenAI error object on `/v1/*` and LM Studio.
//! Converting an error to a response has no side effects; logging happens at the call site.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::lifecycle::LifecycleError;
use crate::providers::ops::OpError;
use crate::providers::ErrorStyle;

/// Whose fault a failure was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0} (providers[].api_keys)")]
    Unauthorized(&'static str),
    #[error("request body is larger than the {limit}-byte limit (proxy.max_request_body)")]
    BodyTooLarge { limit: u64 },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// A model request's body the proxy cannot read as the provider would (inbound.rs).
    #[error("{0}")]
    BodyUnreadable(#[from] super::inbound::Unreadable),
    /// An audio transcription's form that names no model the provider would read
    /// (multipart.rs); Ollama's own words where it refuses the form too.
    #[error("{0}")]
    Form(#[from] super::multipart::FormError),
    #[error("the request body is sent with `Content-Encoding: {0}`, which the proxy does not decode; send it unencoded")]
    UnsupportedEncoding(String),
    #[error("the request body did not arrive within {after:?} (proxy.body_read_timeout, plus one second per MiB received)")]
    BodyTimeout { after: std::time::Duration },
    #[error("the request target cannot be forwarded: {0}")]
    InvalidTarget(String),
    #[error("upstream `{provider}` ({upstream}) is unreachable: {reason}")]
    UpstreamUnreachable {
        provider: String,
        upstream: String,
        reason: String,
    },
    #[error("upstream `{provider}` failed before answering: {reason}")]
    UpstreamFailed { provider: String, reason: String },
    #[error(
        "upstream `{provider}` did not begin to answer within {after:?} (proxy.response_timeout)"
    )]
    UpstreamTimeout {
        provider: String,
        after: std::time::Duration,
    },
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// A front (the `fleet` module) has no node that can take the request.
    #[error("no node of pool `{pool}` can take the request: {reason}")]
    NoNode { pool: String, reason: String },
    #[error("this model's maximum context length is {window} tokens, but the request needs {tokens} tokens (prompt and room for the reply) and cannot be compacted: {why} (model `{model}`)")]
    ContextOverflow {
        model: String,
        tokens: u64,
        window: u64,
        why: String,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyRead(_)
            | ProxyError::BodyUnreadable(_)
            | ProxyError::Form(_)
            | ProxyError::InvalidTarget(_)
            | ProxyError::ContextOverflow { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoNode { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Lifecycle(e) => match e {
                LifecycleError::NotFound { .. } => StatusCode::NOT_FOUND,
                LifecycleError::Unmanaged { .. } => StatusCode::CONFLICT,
                LifecycleError::LoadFailed { source, .. }
                | LifecycleError::UnloadFailed { source, .. } => match source {
                    OpError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                    OpError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
                    _ => StatusCode::BAD_GATEWAY,
                },
                LifecycleError::QueueFull { .. }
                | LifecycleError::QueueTimeout { .. }
                | LifecycleError::TooLarge { .. }
                | LifecycleError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::Unauthorized(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BodyRead(_)
            | ProxyError::BodyUnreadable(_)
            | ProxyError::Form(_)
            | ProxyError::UnsupportedEncoding(_)
            | ProxyError::BodyTimeout { .. }
            | ProxyError::InvalidTarget(_)
            | ProxyError::ContextOverflow { .. }
            | ProxyError::Lifecycle(LifecycleError::NotFound { .. }) => Fault::Client,
            _ => Fault::Upstream,
        }
    }

    /// Short fixed label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            // OpenAI's own code for a missing or wrong key.
            ProxyError::Unauthorized(_) => "invalid_api_key",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BodyRead(_) => "body_read",
            ProxyError::BodyUnreadable(_) | ProxyError::Form(_) => "invalid_body",
            ProxyError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            ProxyError::BodyTimeout { .. } => "body_timeout",
            ProxyError::InvalidTarget(_) => "invalid_target",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamFailed { .. } => "upstream_failed",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::NoNode { .. } => "no_node",
            ProxyError::Lifecycle(e) => e.kind(),
            ProxyError::ContextOverflow { .. } => "context_length_exceeded",
        }
    }

    /// The OpenAI `type` for this error.
    fn openai_type(&self) -> &'static str {
        match self.fault() {
            Fault::Client => "invalid_request_error",
            Fault::Upstream => "api_error",
        }
    }

    /// llama-server's `type` for this error (its `format_error_response` names).
    fn llamacpp_type(&self) -> &'static str {
        if matches!(self, ProxyError::ContextOverflow { .. }) {
            return "exceed_context_size_error";
        }
        match self.status().as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            503 => "unavailable_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The Anthropic error `type` for this error's status (Ollama's `anthropic.NewError`,
    /// after Anthropic's documented list: 529 and 503 are `overloaded_error`).
    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            // 400, 408, 415 and other refusals of the request as sent.
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// Status plus a JSON body in `style`. Body and headers are all the caller needs.
    pub fn to_parts(&self, style: ErrorStyle) -> (StatusCode, &'static str, Bytes) {
        let message = self.to_string();
        match style {
            ErrorStyle::Ollama => (
                self.status(),
                "application/json; charset=utf-8",
                Bytes::from(serde_json::json!({ "error": message }).to_string()),
            ),
            ErrorStyle::LlamaCpp => {
                let status = self.status();
                let mut error = serde_json::json!({
                    "code": status.as_u16(),
                    "message": message,
                    "type": self.llamacpp_type(),
                });
                if let ProxyError::ContextOverflow { tokens, window, .. } = self {
                    error["n_prompt_tokens"] = (*tokens).into();
                    error["n_ctx"] = (*window).into();
                }
                (
                    status,
                    "application/json; charset=utf-8",
                    Bytes::from(serde_json::json!({ "error": error }).to_string()),
                )
            }
            ErrorStyle::Anthropic => {
                let body = serde_json::json!({
                    "type": "error",
                    "error": { "type": self.anthropic_type(), "message": message },
                });
                (
                    self.status(),
                    "application/json",
                    Bytes::from(body.to_string()),
                )
            }
            ErrorStyle::OpenAi => {
                let mut body = serde_json::json!({
                    "error": {
                        "message": message,
                        "type": self.openai_type(),
                        "param": null,
                        "code": self.kind(),
                    }
                })
                .to_string();
                body.push('\n');
                (self.status(), "application/json", Bytes::from(body))
            }
        }
    }

    pub fn into_response<B: From<Bytes>>(&self, style: ErrorStyle) -> Response<B> {
        let (status, content_type, body) = self.to_parts(style);
        let mut resp = Response::new(B::from(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        if let ProxyError::Unauthorized(_) = self {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        if let ProxyError::NoNode { .. } = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ProxyError::Lifecycle(e) = self {
            if let Some(after) = e.retry_after() {
                resp.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(after.as_secs().max(1)),
                );
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_the_clients_style() {
        let e = ProxyError::BodyTooLarge { limit: 10 };
        let (status, ct, body) = e.to_parts(ErrorStyle::Ollama);
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ct, "application/json; charset=utf-8");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("10-byte limit"));

        let e = ProxyError::UpstreamUnreachable {
            provider: "ollama".into(),
            upstream: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        let (status, _, body) = e.to_parts(ErrorStyle::LlamaCpp);
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], 502);
        assert_eq!(v["error"]["type"], "server_error");
        let overflow = ProxyError::ContextOverflow {
            model: "m".into(),
            tokens: 5000,
            window: 4096,
            why: "too long".into(),
        };
        let (status, _, body) = overflow.to_parts(ErrorStyle::LlamaCpp);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "exceed_context_size_error");
        assert_eq!(
            (
                v["error"]["n_prompt_tokens"].as_u64(),
                v["error"]["n_ctx"].as_u64()
            ),
            (Some(5000), Some(4096))
        );
        let (status, _, body) = e.to_parts(ErrorStyle::OpenAi);
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["code"], "upstream_unreachable");
        assert!(v["error"]["param"].is_null());
    }

    /// `/v1/messages` clients (the `anthropic` SDK) read `{"type":"error","error":{"type",
    /// "message"}}`: an unknown model, a full queue, a bad body.
    #[test]
    fn anthropic_clients_get_anthropics_error_shape() {
        let cases = [
            (
                ProxyError::Lifecycle(LifecycleError::NotFound {
                    provider: "p".into(),
                    model: "nope".into(),
                }),
                404,
                "not_found_error",
            ),
            (
                ProxyError::Lifecycle(LifecycleError::QueueFull {
                    provider: "p".into(),
                    max_waiting: 1,
                    retry_after: std::time::Duration::from_secs(1),
                }),
                503,
                "overloaded_error",
            ),
            (
                ProxyError::BodyRead("eof".into()),
                400,
                "invalid_request_error",
            ),
            (
                ProxyError::BodyTooLarge { limit: 10 },
                413,
                "request_too_large",
            ),
            (
                ProxyError::UpstreamUnreachable {
                    provider: "p".into(),
                    upstream: "u".into(),
                    reason: "r".into(),
                },
                502,
                "api_error",
            ),
        ];
        for (e, status, ty) in cases {
            let (got, ct, body) = e.to_parts(ErrorStyle::Anthropic);
            assert_eq!(got.as_u16(), status, "{e}");
            assert_eq!(ct, "application/json");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], ty, "{v}");
            assert_eq!(v["error"]["message"], e.to_string());
            assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
        }
    }
}
