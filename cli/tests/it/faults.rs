//! Fault injection: a provider that is down at start and comes up, one restarted with other
//! models loaded, one killed mid-stream, slow to answer, answering garbage or closing early,
//! and a load that fails. Each gives the client a clear error in its own format, correct
//! counts, and no stuck model state.
//!
//! The misbehaving upstreams are scripted raw-TCP servers posing as a single-model
//! llama-server (its lifecycle is off, so each request goes straight to the fault).

use std::time::Duration;

use crate::support::*;
use llm_warden_sim::ollama::OllamaConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

/// How the fake upstream answers a chat.
#[derive(Clone, Copy)]
enum Fault {
    /// Two SSE events, then the connection closes without the end of the stream.
    DiesMidStream,
    /// Bytes that are not HTTP.
    Garbage,
    /// `Content-Length: 100`, then 8 bytes and a close.
    ClosesEarly,
    /// Never answers.
    Silent,
    /// Answers, but closes the connection after a streamed answer, as llama-server does,
    /// without `Connection: close`: it reads the next request on it, then closes unanswered
    /// (the close arriving just after the proxy wrote the request, deterministically).
    ClosesAfterStream,
}

/// Reads one request (head and body by Content-Length); its path.
async fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    head.split_whitespace().nth(1).map(str::to_string)
}

fn json_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A fake single-model llama-server whose chats fail as `fault`.
async fn fake_llama(fault: Fault) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut streamed = false;
                while let Some(path) = read_request(&mut s).await {
                    if streamed {
                        return;
                    }
                    let reply = match path.as_str() {
                        "/models" | "/v1/models" => json_response(
                            r#"{"object":"list","data":[{"id":"m","object":"model","owned_by":"llamacpp"}]}"#,
                        ),
                        "/v1/chat/completions" => match fault {
                            Fault::DiesMidStream => {
                                let mut out = String::from("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
                                for piece in ["a", "b"] {
                                    let event = format!("data: {{\"choices\":[\"{piece}\"]}}\n\n");
                                    out.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
                                }
                                let _ = s.write_all(out.as_bytes()).await;
                                return;
                            }
                            Fault::Garbage => {
                                let _ = s.write_all(b"this is not HTTP at all\r\n\r\n").await;
                                return;
                            }
                            Fault::ClosesEarly => {
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":1,")
                                    .await;
                                return;
                            }
                            Fault::Silent => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Fault::ClosesAfterStream => {
                                // Every chat is answered as a stream here; its usage is in
                                // the last event.
                                streamed = true;
                                let mut out = String::from("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
                                for event in [
                                    r#"data: {"choices":[{"delta":{"content":"ok"}}]}"#,
                                    r#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
                                    "data: [DONE]",
                                ] {
                                    let event = format!("{event}\n\n");
                                    out.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
                                }
                                out.push_str("0\r\n\r\n");
                                out
                            }
                        },
                        "/tokenize" => json_response(r#"{"tokens":[1,2]}"#),
                        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                    };
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

fn chat(stream: bool) -> String {
    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#)
}

/// The proxy in front of a fake; waits until it has read the fake's model list.
async fn proxy_for(url: String, extra: &str) -> llm_warden::app::Running {
    let proxy = start_proxy(&[("llamacpp", url)], extra).await;
    let c = client();
    assert!(
        eventually(LIMIT, || async {
            status(&c, &proxy).await["providers"][0]["mode"] == "single"
        })
        .await
    );
    proxy
}

/// The model's request and error counts, once nothing is in flight, are `total` and `errors`.
async fn assert_counts(c: &TestClient, proxy: &llm_warden::app::Running, total: u64, errors: u64) {
    let m = settled(c, proxy).await;
    assert_eq!(
        (m["total_requests"].as_u64(), m["errors"].as_u64()),
        (Some(total), Some(errors)),
        "{m}"
    );
}

/// The model's counters once nothing is in flight.
async fn settled(c: &TestClient, proxy: &llm_warden::app::Running) -> Value {
    assert!(
        eventually(LIMIT, || async {
            let s = status(c, proxy).await;
            s["models"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["active_requests"] == 0)
        })
        .await
    );
    let s = status(c, proxy).await;
    model_entry(&s, "llamacpp0", "m").clone()
}

#[tokio::test]
async fn killed_mid_stream_the_client_sees_the_stream_cut_and_it_counts_as_an_error() {
    let proxy = proxy_for(fake_llama(Fault::DiesMidStream).await, "").await;
    let c = client();
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let req = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(true))))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut cut = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(
        cut,
        "the client learns the stream was cut, not that it ended"
    );
    assert!(
        String::from_utf8_lossy(&got).contains("\"b\""),
        "what arrived was relayed"
    );
    assert_counts(&c, &proxy, 1, 1).await;
    // The proxy is fine: the next request is answered.
    let r = get(&c, &format!("http://{}/v1/models", proxy.proxy_addr(0))).await;
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn garbage_or_an_early_close_is_a_502_in_the_clients_format() {
    for fault in [Fault::Garbage, Fault::ClosesEarly] {
        let proxy = proxy_for(fake_llama(fault).await, "").await;
        let c = client();
        let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
        match fault {
            Fault::Garbage => {
                let r = post_json(&c, &url, &chat(false)).await;
                assert_eq!(r.status, 502, "{}", r.text());
                let e = r.json();
                assert_eq!(e["error"]["code"], 502, "llama-server's shape: {e}");
                assert!(
                    e["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("failed before answering"),
                    "{e}"
                );
            }
            _ => {
                // The head came, then the body was cut short: the client sees the head and
                // then an error reading the body, never a short body taken for whole.
                use http_body_util::BodyExt;
                let req = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(chat(false))))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                assert!(resp.into_body().collect().await.is_err(), "the cut is seen");
            }
        }
        assert_counts(&c, &proxy, 1, 1).await;
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn a_provider_slow_to_answer_gets_a_504_in_the_clients_format() {
    let proxy = proxy_for(
        fake_llama(Fault::Silent).await,
        "[proxy]\nresponse_timeout = \"300ms\"\n",
    )
    .await;
    let c = client();
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(0)),
        &chat(true),
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("proxy.response_timeout"),
        "{e}"
    );
    assert_counts(&c, &proxy, 1, 1).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn down_at_start_then_up_and_restarted_with_other_models_resyncs_within_two_polls() {
    // A port with nothing on it yet.
    let spot = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = spot.local_addr().unwrap();
    drop(spot);
    let poll = Duration::from_millis(200);
    let proxy = start_proxy(&[("ollama", format!("http://{addr}"))], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let r = post_json(
        &c,
        &format!("{base}/api/chat"),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.json()["error"].as_str().unwrap().contains("unreachable"),
        "Ollama's shape: {}",
        r.text()
    );
    let r = post_json(
        &c,
        &format!("{base}/v1/chat/completions"),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(
        r.json()["error"]["message"].is_string(),
        "OpenAI's shape: {}",
        r.text()
    );
    let s = status(&c, &proxy).await;
    assert_eq!(s["providers"][0]["reachable"], false);
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(m["status"], "error", "{m}");
    assert_eq!(m["active_requests"], 0);
    proxy.shutdown().await;

    // Within two polls (5 s each by default): the provider comes up with a model loaded behind the proxy's
    // back; then it restarts with another one.
    let proxy = start_proxy(&[("ollama", format!("http://{addr}"))], "").await;
    let cfg_poll = proxy.state.providers[0].config.poll_interval;
    let base = format!("http://{}", proxy.proxy_addr(0));
    let first = llm_warden_sim::ollama::bind(OllamaConfig::default(), &addr.to_string())
        .await
        .unwrap();
    let direct = format!("http://{addr}");
    post_json(
        &c,
        &format!("{direct}/api/generate"),
        r#"{"model":"qwen2.5:7b","keep_alive":-1}"#,
    )
    .await;
    assert!(
        eventually(2 * cfg_poll + poll, || async {
            let s = status(&c, &proxy).await;
            s["providers"][0]["reachable"] == true
                && s["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["model"] == "qwen2.5:7b" && m["status"] == "ready")
        })
        .await,
        "up and in sync within two polls"
    );
    drop(first);
    // Restarted on the same port with another model loaded.
    let second = loop {
        match llm_warden_sim::ollama::bind(OllamaConfig::default(), &addr.to_string()).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    post_json(
        &c,
        &format!("{direct}/api/generate"),
        r#"{"model":"llama3.2","keep_alive":-1}"#,
    )
    .await;
    assert!(
        eventually(2 * cfg_poll + poll, || async {
            let s = status(&c, &proxy).await;
            let by = |name: &str| {
                s["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["model"] == name)
                    .map(|m| m["status"].clone())
            };
            by("llama3.2:latest") == Some("ready".into())
                && by("qwen2.5:7b") == Some("unloaded".into())
        })
        .await,
        "the restarted provider's state within two polls"
    );
    // A request works, and nothing is stuck.
    let r = post_json(
        &c,
        &format!("{base}/api/chat"),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(second.state.unloads_while_busy(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_load_is_a_clear_error_and_the_model_is_not_stuck() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    sim.state.fail_next_load("out of memory");
    let c = client();
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let r = post_json(&c, &url, body).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("out of memory"),
        "{}",
        r.text()
    );
    let r = post_json(&c, &url, body).await;
    assert_eq!(r.status, 200, "the next request loads it: {}", r.text());
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (
            m["status"].as_str(),
            m["errors"].as_u64(),
            m["active_requests"].as_u64()
        ),
        (Some("ready"), Some(1), Some(0)),
        "{m}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_closed_after_a_stream_does_not_fail_the_next_request() {
    let proxy = proxy_for(fake_llama(Fault::ClosesAfterStream).await, "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    for round in 0..4 {
        let r = post_json(&c, &format!("{base}/v1/chat/completions"), &chat(true)).await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
        // Written on the connection the stream came on, which the provider then closes
        // unanswered: a pass-through request (its small body read first) and, the next
        // round, an inspected one each go again on a new connection.
        let r = if round % 2 == 0 {
            post_json(&c, &format!("{base}/tokenize"), r#"{"content":"hi"}"#).await
        } else {
            post_json(&c, &format!("{base}/v1/chat/completions"), &chat(false)).await
        };
        assert_eq!(r.status, 200, "round {round}, after a stream: {}", r.text());
    }
    assert_counts(&c, &proxy, 6, 0).await;
    proxy.shutdown().await;
}
