//! The admin listener: `GET /status` (providers and per-model counters as JSON) and
//! `GET /healthz`. Read-only reports; it decides nothing.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use crate::app::AppState;
use crate::stats::ModelSnapshot;

#[derive(Serialize)]
struct ProviderStatus<'a> {
    name: &'a str,
    kind: &'static str,
    listen: String,
    upstream: String,
    reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

#[derive(Serialize)]
struct Status<'a> {
    providers: Vec<ProviderStatus<'a>>,
    models: Vec<ModelSnapshot>,
}

pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/status") => json(StatusCode::OK, &status(&state)),
        (&Method::GET | &Method::HEAD, "/healthz") => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        (_, "/status" | "/healthz") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": format!("method {} is not allowed here", req.method())}),
        ),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no admin endpoint at {path}; try /status or /healthz")}),
        ),
    }
}

fn status(state: &AppState) -> Status<'_> {
    Status {
        providers: state
            .providers
            .iter()
            .map(|p| ProviderStatus {
                name: &p.config.name,
                kind: p.config.kind.as_str(),
                listen: p.listen.to_string(),
                upstream: p.config.upstream.to_string(),
                reachable: p.reachable(),
                last_error: p.last_error(),
            })
            .collect(),
        models: state.stats.snapshot(),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
