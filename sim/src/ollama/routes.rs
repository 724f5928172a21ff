//! HTTP in: the Host check Ollama makes on loopback binds, CORS for allowed origins
//! (preflights answered here), the route and method table (404 and 405 as plain text), and
//! dispatch to the native or `/v1` handlers, whose errors take that layer's shape.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::request::Handled;
use super::wire::{ok_json, VersionResponse};
use super::{audio, compat, embed, native, openai, OllamaSim, PLAIN, TEXT};
use crate::common::{self, Call, SimBody};

/// `allowedHostsMiddleware`: loopback/private/unspecified IPs, `localhost` and local TLDs.
pub(super) fn host_allowed(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or("")
    } else {
        host.as_str()
    };
    if bare.is_empty() || bare == "localhost" {
        return true;
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
            }
        };
    }
    [".localhost", ".local", ".internal"]
        .iter()
        .any(|tld| bare.ends_with(tld))
}

fn not_found_path() -> Response<SimBody> {
    common::respond(StatusCode::NOT_FOUND, PLAIN, "404 page not found")
}

fn method_not_allowed() -> Response<SimBody> {
    common::respond(
        StatusCode::METHOD_NOT_ALLOWED,
        PLAIN,
        "405 method not allowed",
    )
}

/// The routes and the methods each accepts.
fn allowed_methods(path: &str) -> Option<&'static [Method]> {
    const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    const DELETE: &[Method] = &[Method::DELETE];
    Some(match path {
        "/" | "/api/version" | "/api/tags" => GET_HEAD,
        "/api/ps" | "/v1/models" => GET,
        "/api/generate"
        | "/api/chat"
        | "/api/show"
        | "/api/embed"
        | "/api/embeddings"
        | "/api/copy"
        | "/api/pull"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings"
        | "/v1/messages"
        | "/v1/responses"
        | "/v1/audio/transcriptions" => POST,
        "/api/delete" => DELETE,
        p if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => GET,
        _ => return None,
    })
}

pub(super) async fn handle(sim: Arc<OllamaSim>, req: Request<Incoming>) -> Response<SimBody> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let (call, _upgrade) = common::record(req, &sim.log).await;
    let origin = call
        .headers
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    if let Some(origin) = &origin {
        if !origin_allowed(origin, &sim.cfg.origins) {
            return common::respond(StatusCode::FORBIDDEN, "", Bytes::new());
        }
        if call.method == Method::OPTIONS {
            let mut resp = common::respond(StatusCode::NO_CONTENT, "", Bytes::new());
            cors_headers(&mut resp, origin, true);
            return resp;
        }
    }
    if sim.host_check && !host_allowed(&host) {
        return common::respond(StatusCode::FORBIDDEN, "", Bytes::new());
    }
    let mut resp = route(&sim, &call).await;
    if let Some(origin) = &origin {
        cors_headers(&mut resp, origin, false);
    }
    resp
}

/// The CORS headers gin-contrib/cors writes for an allowed origin.
fn cors_headers(resp: &mut Response<SimBody>, origin: &str, preflight: bool) {
    let h = resp.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(origin) {
        h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(http::header::VARY, http::HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_METHODS,
            http::HeaderValue::from_static("GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
        );
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_HEADERS,
            http::HeaderValue::from_static(CORS_ALLOW_HEADERS),
        );
        h.insert(
            http::header::ACCESS_CONTROL_MAX_AGE,
            http::HeaderValue::from_static("43200"),
        );
    }
}

const CORS_ALLOW_HEADERS: &str = "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,OpenAI-Beta,x-stainless-arch,x-stainless-async,x-stainless-custom-poll-interval,x-stainless-helper-method,x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-poll-helper,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout";

/// Ollama's default allowed origins plus `OLLAMA_ORIGINS` (docs/providers.md §1.1).
pub(super) fn origin_allowed(origin: &str, extra: &[String]) -> bool {
    let local = ["localhost", "127.0.0.1", "0.0.0.0"].iter().any(|host| {
        ["http://", "https://"].iter().any(|scheme| {
            origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix(host))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        })
    });
    local
        || [
            "app://",
            "file://",
            "tauri://",
            "vscode-webview://",
            "vscode-file://",
        ]
        .iter()
        .any(|p| origin.starts_with(p))
        || extra.iter().any(|pattern| wildcard_match(pattern, origin))
}

/// `*` matches any run of characters (gin-contrib/cors allows one wildcard per origin).
pub(super) fn wildcard_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.len() >= head.len() + tail.len() && text.starts_with(head) && text.ends_with(tail)
        }
    }
}

/// The path gin routes on: Go's `URL.Path`, the request target with its percent-escapes
/// decoded (`/api/%63hat` is `/api/chat`; gin's `UseRawPath` is off by default).
fn go_url_path(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| raw.to_string())
}

async fn route(sim: &Arc<OllamaSim>, call: &Call) -> Response<SimBody> {
    let path = go_url_path(&call.path);
    let Some(methods) = allowed_methods(&path) else {
        return not_found_path();
    };
    if !methods.contains(&call.method) {
        return method_not_allowed();
    }
    let native = |r: Handled| r.unwrap_or_else(|e| e.native());
    let openai = |r: Handled| r.unwrap_or_else(|e| e.openai());
    match path.as_str() {
        "/" => common::respond(StatusCode::OK, TEXT, "Ollama is running"),
        "/api/version" => ok_json(&VersionResponse {
            version: &sim.cfg.version,
        }),
        "/api/tags" => native::tags(sim),
        "/api/ps" => native::ps(sim),
        "/api/generate" => native(native::generate(sim, call).await),
        "/api/chat" => native(native::chat(sim, call).await),
        "/api/show" => native(native::show(sim, call)),
        "/api/embed" => native(embed::embed(sim, call).await),
        "/api/embeddings" => native(embed::embeddings_legacy(sim, call).await),
        "/api/copy" => native(native::copy(sim, call)),
        "/api/delete" => native(native::delete(sim, call)),
        "/api/pull" => native(native::pull(sim, call)),
        "/v1/chat/completions" => openai(openai::chat(sim, call).await),
        "/v1/completions" => openai(openai::completions(sim, call).await),
        "/v1/embeddings" => openai(openai::embeddings(sim, call).await),
        "/v1/models" => openai::models(sim),
        "/v1/messages" => compat::messages(sim, call)
            .await
            .unwrap_or_else(|e| compat::anthropic_error(&e)),
        "/v1/responses" => openai(compat::responses(sim, call).await),
        "/v1/audio/transcriptions" => openai(audio::transcriptions(sim, call).await),
        p => match p.strip_prefix("/v1/models/") {
            Some(id) => openai(openai::retrieve(sim, id)),
            None => not_found_path(),
        },
    }
}
