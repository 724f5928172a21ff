//! `/v1/messages` (Anthropic Messages API) and `/v1/responses` (OpenAI Responses API) through
//! the proxy (issue 20 §1): counted with the provider's own tokens, leased while they stream
//! (an admin unload waits), errors the proxy writes in each API's shape.

use std::time::Duration;

use crate::support::*;
use llm_warden_sim::llamacpp::LlamaCppConfig;
use llm_warden_sim::lmstudio::LmStudioConfig;
use llm_warden_sim::ollama::OllamaConfig;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(10);

fn messages_body(model: &str, stream: bool) -> String {
    json!({
        "model": model,
        "max_tokens": 64,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello to the proxy, please."}]}],
        "stream": stream,
    })
    .to_string()
}

fn responses_body(model: &str, stream: bool) -> String {
    json!({
        "model": model,
        "instructions": "You are terse.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello to the proxy, please."}]}],
        "stream": stream,
    })
    .to_string()
}

/// The `input_tokens` / `output_tokens` / `cache_read_input_tokens` the provider reported:
/// the body's `usage`, or the last ones of the stream's events (`message_start`,
/// `message_delta`, `response.completed`).
fn raw_usage(r: &Reply) -> (u64, u64, u64) {
    let text = r.text();
    let mut usage = None;
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        usage = Some(v["usage"].clone());
    } else {
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let v: Value = serde_json::from_str(data).unwrap();
            for u in [&v["usage"], &v["response"]["usage"], &v["message"]["usage"]] {
                if u["output_tokens"].is_u64() {
                    let mut merged = usage.take().unwrap_or(json!({}));
                    for k in ["input_tokens", "output_tokens", "cache_read_input_tokens"] {
                        if u[k].is_u64() {
                            merged[k] = u[k].clone();
                        }
                    }
                    usage = Some(merged);
                }
            }
        }
    }
    let u = usage.unwrap_or_else(|| panic!("no usage in {text}"));
    (
        u["input_tokens"].as_u64().unwrap(),
        u["output_tokens"].as_u64().unwrap(),
        u["cache_read_input_tokens"].as_u64().unwrap_or(0),
    )
}

/// A simulator behind the proxy, as these tests see it.
struct Target {
    kind: &'static str,
    url: String,
    provider: &'static str,
    /// The model as requested, and as `/status` names it.
    model: &'static str,
    status_model: &'static str,
    active: Box<dyn Fn() -> usize + Send + Sync>,
    unloads_while_busy: Box<dyn Fn() -> usize + Send + Sync>,
    loaded: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

async fn ollama(token_delay: Duration) -> Target {
    let sim = start_ollama(OllamaConfig {
        token_delay,
        // A stream long enough to be looked at while it answers.
        reply_tokens: 24,
        ..Default::default()
    })
    .await;
    let state = sim.state.clone();
    let (a, b, c) = (state.clone(), state.clone(), state);
    Target {
        kind: "ollama",
        url: sim.url(),
        provider: "ollama0",
        model: "llama3.2",
        status_model: "llama3.2:latest",
        active: Box::new(move || a.active_requests()),
        unloads_while_busy: Box::new(move || b.unloads_while_busy()),
        loaded: Box::new(move || c.loaded()),
        _keep: Box::new(sim),
    }
}

async fn llamacpp(token_delay: Duration) -> Target {
    let sim = llm_warden_sim::llamacpp::spawn(
        LlamaCppConfig {
            token_delay,
            ..Default::default()
        },
        listener().await,
    );
    let state = sim.state.clone();
    let (a, b, c) = (state.clone(), state.clone(), state);
    Target {
        kind: "llamacpp",
        url: sim.url(),
        provider: "llamacpp0",
        model: QWEN,
        status_model: QWEN,
        active: Box::new(move || a.active_requests()),
        unloads_while_busy: Box::new(move || b.unloads_while_busy()),
        loaded: Box::new(move || c.loaded()),
        _keep: Box::new(sim),
    }
}

const QWEN: &str = "qwen2.5-7b-instruct-q4_k_m";

async fn lmstudio(token_delay: Duration) -> Target {
    let sim = start_lmstudio(LmStudioConfig {
        token_delay,
        ..Default::default()
    })
    .await;
    let state = sim.state.clone();
    let (a, b, c) = (state.clone(), state.clone(), state);
    Target {
        kind: "lmstudio",
        url: sim.url(),
        provider: "lmstudio0",
        model: "qwen2.5-7b-instruct",
        status_model: "qwen2.5-7b-instruct",
        active: Box::new(move || a.active_requests()),
        unloads_while_busy: Box::new(move || b.unloads_while_busy()),
        loaded: Box::new(move || c.loaded()),
        _keep: Box::new(sim),
    }
}

async fn counted_with_the_providers_tokens(t: Target) {
    let proxy = start_proxy(&[(t.kind, t.url.clone())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let mut want = (0, 0);
    let cases = [
        ("/v1/messages", messages_body(t.model, false)),
        ("/v1/messages", messages_body(t.model, true)),
        ("/v1/responses", responses_body(t.model, false)),
        ("/v1/responses", responses_body(t.model, true)),
    ];
    for (n, (path, body)) in cases.iter().enumerate() {
        let r = post_json(&c, &format!("{base}{path}"), body).await;
        assert_eq!(r.status, 200, "{} {path}: {}", t.kind, r.text());
        let (input, output) = provider_usage(&r);
        assert!(input > 0 && output > 0, "{path}: {}", r.text());
        want = (want.0 + input, want.1 + output);
        let s = status(&c, &proxy).await;
        let m = model_entry(&s, t.provider, t.status_model);
        assert_eq!(
            (
                m["total_requests"].as_u64(),
                m["prompt_tokens"].as_u64(),
                m["completion_tokens"].as_u64(),
                m["errors"].as_u64(),
            ),
            (Some(n as u64 + 1), Some(want.0), Some(want.1), Some(0)),
            "{} {path} #{n}: {m}\n{}",
            t.kind,
            r.text()
        );
    }
    // The stream's events as the provider names them, relayed untouched.
    let r = post_json(&c, &format!("{base}/v1/messages"), &cases[1].1).await;
    let text = r.text();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{events:?}");
    assert_eq!(
        &events[events.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    // The metrics label the endpoints.
    let m = get(&c, &format!("http://{}/metrics", proxy.admin_addr)).await;
    for label in ["endpoint=\"v1_messages\"", "endpoint=\"v1_responses\""] {
        assert!(m.text().contains(label), "{label}");
    }
    proxy.shutdown().await;
}

/// The prompt tokens of a `/v1/messages` stream: `input_tokens` plus the cached part
/// (`cache_read_input_tokens`), as the proxy counts them.
fn provider_usage(r: &Reply) -> (u64, u64) {
    let (input, output, cached) = raw_usage(r);
    (input + cached, output)
}

#[tokio::test]
async fn ollama_messages_and_responses_are_counted_with_the_providers_tokens() {
    counted_with_the_providers_tokens(ollama(Duration::ZERO).await).await;
}

#[tokio::test]
async fn llamacpp_messages_and_responses_are_counted_with_the_providers_tokens() {
    counted_with_the_providers_tokens(llamacpp(Duration::ZERO).await).await;
}

#[tokio::test]
async fn lmstudio_messages_and_responses_are_counted_with_the_providers_tokens() {
    counted_with_the_providers_tokens(lmstudio(Duration::ZERO).await).await;
}

async fn lease_holds_against_an_admin_unload(
    make: fn(Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = Target>>>,
) {
    for (path, end) in [
        ("/v1/messages", "event: message_stop"),
        ("/v1/responses", "event: response.completed"),
    ] {
        let t = make(Duration::from_millis(60)).await;
        let body = if path == "/v1/messages" {
            messages_body(t.model, true)
        } else {
            responses_body(t.model, true)
        };
        let proxy = start_proxy(&[(t.kind, t.url.clone())], "").await;
        let c = client();
        let url = format!("http://{}{path}", proxy.proxy_addr(0));
        let streaming = {
            let c = c.clone();
            tokio::spawn(async move { post_json(&c, &url, &body).await })
        };
        assert!(eventually(LIMIT, || async { (t.active)() == 1 }).await);
        let s = status(&c, &proxy).await;
        assert_eq!(
            model_entry(&s, t.provider, t.status_model)["active_requests"],
            1,
            "{path}: {s}"
        );
        let unload = {
            let c = c.clone();
            let url = format!(
                "http://{}/models/{}/{}/unload",
                proxy.admin_addr, t.provider, t.status_model
            );
            tokio::spawn(async move { post_json(&c, &url, "").await })
        };
        let r = streaming.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.text().contains(end), "{path}: the stream was not cut");
        let u = unload.await.unwrap();
        assert_eq!(u.status, 200, "{}", u.text());
        assert!((t.loaded)().is_empty());
        assert_eq!((t.unloads_while_busy)(), 0, "{path}");
        let s = status(&c, &proxy).await;
        let m = model_entry(&s, t.provider, t.status_model);
        assert_eq!(
            (m["total_requests"].as_u64(), m["active_requests"].as_u64()),
            (Some(1), Some(0)),
            "{path}: {m}"
        );
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn a_streaming_message_or_response_holds_its_lease_against_an_admin_unload() {
    lease_holds_against_an_admin_unload(|d| Box::pin(ollama(d))).await;
}

#[tokio::test]
async fn on_lmstudio_a_streaming_message_or_response_holds_its_lease_against_an_admin_unload() {
    lease_holds_against_an_admin_unload(|d| Box::pin(lmstudio(d))).await;
}

#[tokio::test]
async fn on_llamacpp_a_streaming_message_or_response_holds_its_lease_against_an_admin_unload() {
    lease_holds_against_an_admin_unload(|d| Box::pin(llamacpp(d))).await;
}

#[tokio::test]
async fn errors_the_proxy_writes_take_each_apis_shape() {
    let sim = start_ollama(OllamaConfig::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    // A body the proxy cannot read (a model that is not a string): 400 from the proxy.
    let bad = r#"{"model":["llama3.2"],"max_tokens":5,"messages":[]}"#;
    let r = post_json(&c, &format!("{base}/v1/messages"), bad).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    let r = post_json(&c, &format!("{base}/v1/responses"), bad).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    // Ollama's own errors on these paths are its middleware's (Anthropic's shape too).
    let r = post_json(
        &c,
        &format!("{base}/v1/messages"),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "max_tokens is required and must be positive"
    );
    proxy.shutdown().await;
}

/// Sends `body` to `path` directly and through the proxy; the answers must be the same bytes
/// (status, headers but `date`, body), streamed or not. A warm-up request first, so the
/// provider's state (a loaded model, a cached prefix) is the same for both.
async fn identical(c: &TestClient, direct: &str, proxied: &str, path: &str, body: &str) {
    let run = |base: &str| {
        let url = format!("{base}{path}");
        let body = bytes::Bytes::from(body.to_string());
        async move {
            send(
                c,
                http::Method::POST,
                &url,
                &[("content-type", "application/json")],
                body,
            )
            .await
        }
    };
    let _warm = run(direct).await;
    let a = run(direct).await;
    let b = run(proxied).await;
    assert_eq!(a.status, b.status, "status of {path} {body}");
    assert_eq!(
        a.comparable_headers(),
        b.comparable_headers(),
        "headers of {path} {body}"
    );
    assert_eq!(a.text(), b.text(), "body of {path} {body}");
    assert!(!a.body.is_empty(), "{path} {body}");
}

/// Byte for byte through the proxy, on every simulator: both APIs, streamed and not, and the
/// provider's own errors (which the proxy forwards, never rewrites).
#[tokio::test]
async fn messages_and_responses_are_byte_identical_through_the_proxy() {
    let ollama = start_ollama(OllamaConfig {
        clock: Clock::fixed(),
        ..Default::default()
    })
    .await;
    let llamacpp = llm_warden_sim::llamacpp::spawn(
        LlamaCppConfig {
            clock: Clock::fixed(),
            ..Default::default()
        },
        listener().await,
    );
    let lmstudio = start_lmstudio(LmStudioConfig {
        clock: Clock::fixed(),
        ..Default::default()
    })
    .await;
    let c = client();
    for (kind, url, model) in [
        ("ollama", ollama.url(), "llama3.2"),
        ("llamacpp", llamacpp.url(), QWEN),
        ("lmstudio", lmstudio.url(), "qwen2.5-7b-instruct"),
    ] {
        let proxy = start_proxy(&[(kind, url.clone())], "").await;
        let proxied = format!("http://{}", proxy.proxy_addr(0));
        for stream in [false, true] {
            identical(
                &c,
                &url,
                &proxied,
                "/v1/messages",
                &messages_body(model, stream),
            )
            .await;
            identical(
                &c,
                &url,
                &proxied,
                "/v1/responses",
                &responses_body(model, stream),
            )
            .await;
        }
        // The provider's own refusals pass through as they are.
        let no_messages = json!({"model": model, "max_tokens": 5}).to_string();
        identical(&c, &url, &proxied, "/v1/messages", &no_messages).await;
        let bad_input = json!({"model": model, "input": 5}).to_string();
        identical(&c, &url, &proxied, "/v1/responses", &bad_input).await;
        proxy.shutdown().await;
    }
}

/// The lazy load and the queue apply: a request waits for its model's load; with the queue
/// full the next is refused at once, with 503 and `retry-after`, in its API's shape; the
/// waiting one gets its queue timeout in Anthropic's shape.
#[tokio::test]
async fn a_full_queue_answers_each_api_in_its_shape() {
    let sim = start_ollama(OllamaConfig {
        load_latency: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("ollama", sim.url())],
        "[queue]\nmax_waiting = 1\ntimeout = \"300ms\"\n",
    )
    .await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let first = tokio::spawn({
        let (c, url) = (c.clone(), format!("{base}/v1/messages"));
        async move { post_json(&c, &url, &messages_body("llama3.2", true)).await }
    });
    assert!(eventually(LIMIT, || async { sim.state.loading().len() == 1 }).await);
    let r = post_json(
        &c,
        &format!("{base}/v1/messages"),
        &messages_body("llama3.2", false),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    let v = r.json();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("overloaded_error")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue.max_waiting"),
        "{v}"
    );
    let r = post_json(
        &c,
        &format!("{base}/v1/responses"),
        &responses_body("llama3.2", false),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "queue_full", "{}", r.text());
    let r = first.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue.timeout"),
        "{v}"
    );
    proxy.shutdown().await;
}
