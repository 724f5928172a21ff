//! Tests of the simulated Ollama, grouped by concern; this file holds the shared helpers:
//! a server on a manual clock, HTTP and raw-socket requests, and reply decoding.

mod catalogue;
mod host_cors;
mod native;
mod openai;
mod scheduling;
mod units;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config::{full_name, local_rfc3339, owner};
use super::keep_alive::{parse_go_duration, parse_keep_alive, KeepAlive};
use super::routes::{host_allowed, origin_allowed, wildcard_match};
use super::wire::GoFloat;
use super::*;
use crate::common::{self, Clock, SimServer};
use crate::SimModel;

/// 2026-11-26T10:00:00Z.
fn t0() -> SystemTime {
    Clock::fixed_start()
}

fn manual() -> OllamaConfig {
    OllamaConfig {
        clock: Clock::manual(t0()),
        ..OllamaConfig::default()
    }
}

async fn start(cfg: OllamaConfig) -> SimServer<OllamaSim> {
    bind(cfg, "127.0.0.1:0").await.expect("bind")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    /// NDJSON lines, each checked to end in `\n`.
    fn lines(&self) -> Vec<Value> {
        let text = self.text();
        assert!(text.ends_with('\n'), "{text}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    /// SSE `data:` payloads, each event checked to be `data: ...\n\n`.
    fn events(&self) -> Vec<String> {
        let text = self.text();
        assert!(text.ends_with("\n\n"), "{text}");
        text.split_terminator("\n\n")
            .map(|e| e.strip_prefix("data: ").expect("data: prefix").to_string())
            .collect()
    }
}

async fn send(srv: &SimServer<OllamaSim>, method: Method, path: &str, body: &str) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{}", srv.url(), path))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(srv: &SimServer<OllamaSim>, path: &str, body: &str) -> Reply {
    send(srv, Method::POST, path, body).await
}

async fn get(srv: &SimServer<OllamaSim>, path: &str) -> Reply {
    send(srv, Method::GET, path, "").await
}

/// A raw HTTP/1.1 exchange, for framing and Host checks.
async fn raw(srv: &SimServer<OllamaSim>, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

/// The reply the simulator writes for a native request `body` (seeded by the body less
/// `keep_alive`).
fn reply_text(body: &str, n: usize) -> String {
    let map = super::request::parse_object(body.as_bytes(), "test").expect("a JSON object");
    common::reply_pieces(super::request::reply_seed(&map), n).concat()
}
