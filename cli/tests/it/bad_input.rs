//! Bad input, one case per row of the README's table: what is sent (over raw TCP where the
//! bytes matter), what comes back, in the format the client expects, and that the proxy
//! stays healthy afterwards (a normal request works, nothing left in flight, nothing counted
//! for requests that never reached a provider).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::*;

const CHAT: &str =
    r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;

/// Sends `raw` on a new connection and reads until the server closes it (at most 10 s).
fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it read everything (431): keep what it said.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A request with a body, closing the connection after the answer.
fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn status_line(reply: &str) -> &str {
    reply.lines().next().unwrap_or("")
}

/// The body of a raw reply (after the blank line), de-chunked if need be.
fn body(reply: &str) -> String {
    let (head, rest) = reply.split_once("\r\n\r\n").unwrap_or((reply, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return rest.to_string();
    }
    let mut out = String::new();
    let mut rest = rest;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

struct Rig {
    sim: llm_warden_sim::SimServer<llm_warden_sim::ollama::OllamaSim>,
    proxy: llm_warden::app::Running,
    c: TestClient,
}

impl Rig {
    async fn start() -> Rig {
        let sim = start_ollama(Default::default()).await;
        let proxy = start_proxy(
            &[("ollama", sim.url())],
            "[proxy]\nmax_request_body = \"4KiB\"\nheader_read_timeout = \"500ms\"\n",
        )
        .await;
        Rig {
            sim,
            proxy,
            c: client(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.proxy_addr(0)
    }

    async fn raw(&self, raw: Vec<u8>) -> String {
        let addr = self.addr();
        blocking(move || exchange(addr, &raw)).await
    }

    /// A normal request still works, nothing is in flight, and `llama3.2` was asked
    /// `requests` times in all.
    async fn healthy(&self, requests: u64) {
        let r = post_json(&self.c, &format!("http://{}/api/chat", self.addr()), CHAT).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let s = status(&self.c, &self.proxy).await;
        for m in s["models"].as_array().unwrap() {
            assert_eq!(m["active_requests"], 0, "{m}");
        }
        let m = model_entry(&s, "ollama0", "llama3.2:latest");
        assert_eq!(m["total_requests"].as_u64(), Some(requests + 1), "{m}");
        assert_eq!(self.sim.state.active_requests(), 0);
    }
}

fn json_of(reply: &str) -> serde_json::Value {
    serde_json::from_str(&body(reply)).unwrap_or_else(|e| panic!("not JSON ({e}): {reply}"))
}

/// The Ollama error shape: `{"error": "<text containing what>"}`.
fn ollama_error(reply: &str, status: &str, what: &str) {
    assert!(
        status_line(reply).starts_with(&format!("HTTP/1.1 {status}")),
        "{reply}"
    );
    let e = json_of(reply)["error"].as_str().map(str::to_owned);
    assert!(e.as_deref().is_some_and(|e| e.contains(what)), "{reply}");
}

/// The OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`.
fn openai_error(reply: &str, status: &str, what: &str) {
    assert!(
        status_line(reply).starts_with(&format!("HTTP/1.1 {status}")),
        "{reply}"
    );
    let v = json_of(reply);
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(what)),
        "{reply}"
    );
    assert!(
        e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
        "{reply}"
    );
}

#[tokio::test]
async fn each_bad_input_gets_the_answer_its_client_expects_and_the_proxy_stays_healthy() {
    let rig = Rig::start().await;
    rig.healthy(0).await;
    // Chats for llama3.2 that reached the provider (each `healthy` adds one).
    let mut counted = 1;
    let no_model = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let unknown = br#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#;

    // Malformed JSON that every Ollama refuses too: forwarded unchanged, the provider's own
    // 400, not counted.
    ollama_error(
        &rig.raw(post("/api/chat", "", b"{\"model\":")).await,
        "400",
        "unexpected EOF",
    );
    openai_error(
        &rig.raw(post("/v1/chat/completions", "", b"{\"model\":"))
            .await,
        "400",
        "unexpected EOF",
    );
    rig.healthy(counted).await;
    counted += 1;

    // Over the limit: 413 from the proxy, before the provider sees a byte.
    let big = format!(r#"{{"model":"llama3.2","prompt":"{}"}}"#, "x".repeat(5000));
    ollama_error(
        &rig.raw(post("/api/generate", "", big.as_bytes())).await,
        "413",
        "proxy.max_request_body",
    );
    let r = rig
        .raw(post("/v1/chat/completions", "", big.as_bytes()))
        .await;
    openai_error(&r, "413", "proxy.max_request_body");
    assert_eq!(json_of(&r)["error"]["code"], "body_too_large");
    rig.healthy(counted).await;
    counted += 1;

    // Wrong content type: the body is JSON all the same, as Ollama reads it: served.
    let r = rig
        .raw(post(
            "/api/chat",
            "Content-Type: text/plain\r\n",
            CHAT.as_bytes(),
        ))
        .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(json_of(&r)["done"], true);
    counted += 1;
    rig.healthy(counted).await;
    counted += 1;

    // Missing model: the provider's own 400, not counted.
    ollama_error(
        &rig.raw(post("/api/chat", "", no_model)).await,
        "400",
        "model is required",
    );
    openai_error(
        &rig.raw(post("/v1/chat/completions", "", no_model)).await,
        "400",
        "model is required",
    );
    // Generate's is Ollama's 404 `model '' not found` (server/routes.go GenerateHandler).
    ollama_error(
        &rig.raw(post("/api/generate", "", no_model)).await,
        "404",
        "model '' not found",
    );
    rig.healthy(counted).await;
    counted += 1;

    // Unknown model: the provider's own 404, word for word.
    ollama_error(
        &rig.raw(post("/api/chat", "", unknown)).await,
        "404",
        "model 'nope' not found",
    );
    openai_error(
        &rig.raw(post("/v1/chat/completions", "", unknown)).await,
        "404",
        "model 'nope' not found",
    );
    rig.healthy(counted).await;
    counted += 1;

    // Invalid UTF-8: Go would read it (U+FFFD for the bad bytes) and serve it; the proxy
    // cannot read it the same way, so it refuses it rather than forward it uncounted.
    let bad_utf8 =
        b"{\"model\":\"llama3.2\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}";
    ollama_error(
        &rig.raw(post("/api/chat", "", bad_utf8)).await,
        "400",
        "not valid UTF-8",
    );
    rig.healthy(counted).await;
    counted += 1;

    // Headers over hyper's limit (~400 KB): 431, the provider never asked.
    let before = rig.sim.state.log.count("/api/version");
    let mut huge = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 500 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let r = rig.raw(huge).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r}");
    assert_eq!(rig.sim.state.log.count("/api/version"), before);
    rig.healthy(counted).await;
    counted += 1;

    // HTTP/1.0 (no Host, no keep-alive): answered in HTTP/1.0 with a length, then closed.
    let mut r10 = format!(
        "POST /api/chat HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
        CHAT.len()
    )
    .into_bytes();
    r10.extend_from_slice(CHAT.as_bytes());
    let r = rig.raw(r10).await;
    assert!(status_line(&r).starts_with("HTTP/1.0 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("content-length:"), "{r}");
    assert_eq!(json_of(&r)["done"], true);
    counted += 1;
    rig.healthy(counted).await;
    counted += 1;

    // Two pipelined requests on one connection: both answered, in order.
    let mut two = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
    two.extend(post("/api/chat", "", CHAT.as_bytes()));
    let r = rig.raw(two).await;
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 2, "{r}");
    let (first, second) = (
        r.find("\"version\"").unwrap(),
        r.find("\"done\":true").unwrap(),
    );
    assert!(first < second, "{r}");
    counted += 1;
    rig.healthy(counted).await;
    counted += 1;

    // Expect: 100-continue: 100 first, the body after it, then the answer.
    let addr = rig.addr();
    let r = blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n", CHAT.len()).unwrap();
        let mut interim = [0u8; 25];
        s.read_exact(&mut interim).unwrap();
        s.write_all(CHAT.as_bytes()).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (String::from_utf8_lossy(&interim).into_owned(), String::from_utf8_lossy(&rest).into_owned())
    })
    .await;
    assert_eq!(r.0, "HTTP/1.1 100 Continue\r\n\r\n");
    assert!(status_line(&r.1).starts_with("HTTP/1.1 200"), "{}", r.1);
    assert_eq!(json_of(&r.1)["done"], true);
    counted += 1;
    rig.healthy(counted).await;

    // Only models that reached a provider were counted: the unknown one (the provider
    // answered its 404), nothing for the bodies without a model, too large or unreadable.
    let s = status(&rig.c, &rig.proxy).await;
    let names: Vec<_> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap().to_string())
        .collect();
    // The provider does not have `nope`: its requests are folded into `_unlisted`.
    assert_eq!(names, ["_unlisted", "llama3.2:latest"], "{s}");
    let nope = model_entry(&s, "ollama0", "_unlisted");
    assert_eq!(
        (nope["total_requests"].as_u64(), nope["errors"].as_u64()),
        (Some(2), Some(2)),
        "{nope}"
    );
    rig.proxy.shutdown().await;
}

/// Reads until the server closes the connection; returns what it sent and when it closed.
fn until_closed(mut s: TcpStream, started: Instant) -> (String, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_at_the_header_read_timeout() {
    let rig = Rig::start().await;
    let addr = rig.addr();
    let (reply, took) = blocking(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n")
            .unwrap();
        let mut w = s.try_clone().unwrap();
        // One header line every 100 ms, for up to 10 s: never a complete request.
        std::thread::spawn(move || {
            for i in 0..100 {
                std::thread::sleep(Duration::from_millis(100));
                if write!(w, "X-{i}: y\r\n").is_err() {
                    return;
                }
            }
        });
        until_closed(s, started)
    })
    .await;
    // Closed by the server after the 500 ms timeout, long before the client would finish.
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // hyper closes without an answer (no 408): the client is not worth one.
    assert_eq!(reply, "");
    assert_eq!(rig.sim.state.log.count("/api/version"), 0);

    // A client that connects and sends nothing, and an idle keep-alive connection, too.
    let (reply, took) = blocking(move || {
        let started = Instant::now();
        until_closed(TcpStream::connect(addr).unwrap(), started)
    })
    .await;
    assert!(
        reply.is_empty() && took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{reply:?} {took:?}"
    );
    let (reply, took) = blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let started = Instant::now();
        until_closed(s, started)
    })
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    rig.healthy(0).await;
    rig.proxy.shutdown().await;
}

#[tokio::test]
async fn connections_over_max_connections_wait_until_one_closes() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "[proxy]\nmax_connections = 1\n").await;
    let addr = proxy.proxy_addr(0);
    let (first, second) = blocking(move || {
        let ask = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let mut a = TcpStream::connect(addr).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        a.write_all(ask).unwrap();
        let mut buf = [0u8; 1024];
        let n = a.read(&mut buf).unwrap();
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        // The second connection is made (the OS backlog takes it) but not served while the
        // first stays open.
        let mut b = TcpStream::connect(addr).unwrap();
        b.write_all(ask).unwrap();
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(b.read(&mut buf).is_err(), "served over the limit");
        drop(a);
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = b.read(&mut buf).unwrap();
        (first, String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    proxy.shutdown().await;
}
