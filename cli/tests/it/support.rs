//! Shared test harness: simulated providers and the proxy in-process on `127.0.0.1:0`, and a
//! small HTTP client that records every body frame as it arrives.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llm_warden::app::{self, Running};
use llm_warden::config;
use llm_warden_sim::lmstudio::{self, LmStudioConfig, LmStudioSim};
use llm_warden_sim::ollama::{self, OllamaConfig, OllamaSim};
pub use llm_warden_sim::{Clock, SimServer};
use tokio::net::TcpListener;

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

pub async fn start_ollama(cfg: OllamaConfig) -> SimServer<OllamaSim> {
    ollama::spawn(cfg, listener().await)
}

pub async fn start_lmstudio(cfg: LmStudioConfig) -> SimServer<LmStudioSim> {
    lmstudio::spawn(cfg, listener().await)
}

/// Starts the proxy with one provider per `(kind, upstream URL)`, every listener on port 0.
/// `extra` is appended to the generated TOML (e.g. a `[proxy]` table).
pub async fn start_proxy(providers: &[(&str, String)], extra: &str) -> Running {
    let mut toml = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
    for (i, (kind, url)) in providers.iter().enumerate() {
        toml.push_str(&format!(
            "[[providers]]\nname = \"{kind}{i}\"\nkind = \"{kind}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{url}\"\n"
        ));
    }
    toml.push_str(extra);
    let cfg = config::load_str(&toml).expect("test config is valid");
    app::start(cfg).await.expect("proxy starts")
}

/// A response as the client saw it: every body frame with its arrival time.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub frames: Vec<(Instant, Bytes)>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Headers that must match byte for byte between two replies: everything but `date`
    /// (the clock of whoever wrote it).
    pub fn comparable_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "date")
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole response, frame by frame.
pub async fn send(
    client: &TestClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request builds");
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| panic!("{url}: body error {e}"));
        if let Ok(data) = frame.into_data() {
            all.extend_from_slice(&data);
            frames.push((Instant::now(), data));
        }
    }
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(all),
        frames,
    }
}

pub async fn post_json(client: &TestClient, url: &str, body: &str) -> Reply {
    send(
        client,
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

pub async fn get(client: &TestClient, url: &str) -> Reply {
    send(client, Method::GET, url, &[], Bytes::new()).await
}

/// `/status` of a running proxy.
pub async fn status(client: &TestClient, proxy: &Running) -> serde_json::Value {
    get(client, &format!("http://{}/status", proxy.admin_addr))
        .await
        .json()
}

/// The `/status` entry of one model.
pub fn model_entry<'a>(
    status: &'a serde_json::Value,
    provider: &str,
    model: &str,
) -> &'a serde_json::Value {
    status["models"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["provider"] == provider && m["model"] == model)
        })
        .unwrap_or_else(|| panic!("no model {provider}/{model} in {status}"))
}

/// Polls `probe` every 10 ms until it yields `Some`, or `limit` passes (`None`). For effects
/// that complete asynchronously (a drop guard after a client hangs up, a poll of the
/// provider), never as a stand-in for ordering. The one poll loop of the tests.
pub async fn poll<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `cond` comes to hold within `limit` (see [`poll`]).
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll(limit, || {
        let held = cond();
        async move { held.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Fails the test unless `cond` comes to hold within `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(eventually(limit, cond).await, "{what} within {limit:?}");
}

/// A streamed `llama3.2` chat to `url`, sent in the background (the caller waits for the
/// simulator to see it, then does something while it streams).
pub fn spawn_chat(c: &TestClient, url: String) -> tokio::task::JoinHandle<Reply> {
    let c = c.clone();
    tokio::spawn(async move {
        post_json(
            &c,
            &url,
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await
    })
}
