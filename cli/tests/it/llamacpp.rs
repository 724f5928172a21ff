//! The llamacpp provider against the llama-server simulator (router and single mode): every
//! endpoint passes through unchanged, usage is read from `usage` or `timings` whatever the
//! build puts where, the proxy decides loads and evictions through the router's API (never
//! evicting a busy model), and its own errors come in llama-server's shape. The real server
//! and model are in `tests/llamacpp_real.rs`.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use http::Method;
use llm_warden_sim::llamacpp::{chat_prompt_tokens, LlamaCppConfig, UsagePlacement};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(10);
const QWEN: &str = "qwen2.5-7b-instruct-q4_k_m";
const LLAMA: &str = "llama-3.2-3b-instruct-q4_k_m";

async fn start_llamacpp(
    cfg: LlamaCppConfig,
) -> llm_warden_sim::SimServer<llm_warden_sim::llamacpp::LlamaCppSim> {
    llm_warden_sim::llamacpp::spawn(cfg, listener().await)
}

/// Generated ids differ per request (llama-server draws them at random): compared masked.
fn masked(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.find("chatcmpl-") {
        out.push_str(&rest[..at + "chatcmpl-".len()]);
        rest = &rest[at + "chatcmpl-".len()..];
        let n = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        out.push('*');
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

async fn mode_seen(c: &TestClient, proxy: &llm_warden::app::Running, mode: &str) {
    assert!(
        eventually(LIMIT, || async {
            status(c, proxy).await["providers"][0]["mode"] == mode
        })
        .await,
        "mode {mode} seen"
    );
}

#[tokio::test]
async fn every_endpoint_passes_through_unchanged() {
    let sim = start_llamacpp(LlamaCppConfig {
        clock: Clock::fixed(),
        slot_save: true,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("llamacpp", sim.url())], "").await;
    let c = client();
    mode_seen(&c, &proxy, "router").await;
    let direct = sim.url();
    let proxied = format!("http://{}", proxy.proxy_addr(0));
    let chat =
        json!({"model": QWEN, "messages": [{"role":"user","content":"why is the sky blue?"}]});
    let stream =
        json!({"model": QWEN, "messages": [{"role":"user","content":"hi"}], "stream": true});
    let usage = json!({"model": QWEN, "messages": [{"role":"user","content":"hi"}], "stream": true, "stream_options": {"include_usage": true}});
    let cases: Vec<(Method, String, String)> = vec![
        (
            Method::POST,
            "/models/load".into(),
            json!({"model": QWEN}).to_string(),
        ),
        (Method::GET, "/health".into(), String::new()),
        (Method::GET, "/v1/health".into(), String::new()),
        (Method::GET, "/props".into(), String::new()),
        (Method::GET, format!("/props?model={QWEN}"), String::new()),
        (Method::GET, format!("/slots?model={QWEN}"), String::new()),
        (Method::GET, format!("/metrics?model={QWEN}"), String::new()),
        (Method::GET, "/metrics".into(), String::new()),
        (
            Method::POST,
            "/tokenize".into(),
            json!({"model": QWEN, "content": "hello world", "add_special": true}).to_string(),
        ),
        (
            Method::POST,
            "/detokenize".into(),
            json!({"model": QWEN, "tokens": [1, 2, 3]}).to_string(),
        ),
        (
            Method::POST,
            "/v1/chat/completions".into(),
            chat.to_string(),
        ),
        (
            Method::POST,
            "/v1/chat/completions".into(),
            stream.to_string(),
        ),
        (
            Method::POST,
            "/v1/chat/completions".into(),
            usage.to_string(),
        ),
        (
            Method::POST,
            "/v1/completions".into(),
            json!({"model": QWEN, "prompt": "once upon", "stream": true}).to_string(),
        ),
        (
            Method::POST,
            "/completion".into(),
            json!({"model": QWEN, "prompt": "once upon", "n_predict": 4, "stream": true})
                .to_string(),
        ),
        (
            Method::POST,
            "/completion".into(),
            json!({"model": QWEN, "prompt": "once upon", "n_predict": 4}).to_string(),
        ),
        (
            Method::POST,
            "/v1/embeddings".into(),
            json!({"model": "nomic-embed-text-v1.5-f16", "input": "a"}).to_string(),
        ),
        (
            Method::POST,
            "/slots/0?action=save".to_string(),
            json!({"model": QWEN, "filename": "a.bin"}).to_string(),
        ),
        // The server's own errors.
        (
            Method::POST,
            "/v1/chat/completions".into(),
            json!({"model": "nope", "messages": []}).to_string(),
        ),
        (
            Method::POST,
            "/v1/chat/completions".into(),
            json!({"messages": [{"role":"user","content":"hi"}]}).to_string(),
        ),
        (
            Method::POST,
            "/v1/chat/completions".into(),
            "{not json".into(),
        ),
        (
            Method::POST,
            "/models/load".into(),
            json!({"model": "nope"}).to_string(),
        ),
        (Method::GET, "/no/such/path".into(), String::new()),
        (Method::GET, "/models".into(), String::new()),
    ];
    for (method, path, body) in &cases {
        let run = |base: String| {
            let (method, url, body) = (
                method.clone(),
                format!("{base}{path}"),
                Bytes::from(body.clone()),
            );
            let c = c.clone();
            async move {
                send(
                    &c,
                    method,
                    &url,
                    &[("content-type", "application/json")],
                    body,
                )
                .await
            }
        };
        let _warm = run(direct.clone()).await;
        let a = run(direct.clone()).await;
        let b = run(proxied.clone()).await;
        let what = format!("{method} {path} {body}");
        assert_eq!(a.status, b.status, "status of {what}: {}", b.text());
        assert_eq!(
            a.comparable_headers(),
            b.comparable_headers(),
            "headers of {what}"
        );
        assert_eq!(masked(&a.text()), masked(&b.text()), "body of {what}");
    }
}

#[tokio::test]
async fn usage_is_read_wherever_the_build_puts_it() {
    let messages = json!([{"role":"user","content":"count the stars in the sky tonight"}]);
    let prompt = u64::from(chat_prompt_tokens(messages.as_array().unwrap()));
    for placement in [
        UsagePlacement::FinishChunk,
        UsagePlacement::SeparateChunkAlways,
        UsagePlacement::SeparateChunkIfAsked,
    ] {
        let sim = start_llamacpp(LlamaCppConfig {
            usage: placement,
            max_tokens_default: 5,
            ..Default::default()
        })
        .await;
        let proxy = start_proxy(&[("llamacpp", sim.url())], "").await;
        let c = client();
        mode_seen(&c, &proxy, "router").await;
        let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
        // Streamed without include_usage (timings only, on current builds), streamed with it,
        // and not streamed.
        for body in [
            json!({"model": QWEN, "messages": messages, "stream": true}),
            json!({"model": QWEN, "messages": messages, "stream": true, "stream_options": {"include_usage": true}}),
            json!({"model": QWEN, "messages": messages}),
        ] {
            let r = post_json(&c, &url, &body.to_string()).await;
            assert_eq!(r.status, 200, "{placement:?}: {}", r.text());
        }
        // Native /completion: tokens_evaluated / tokens_predicted.
        let r = post_json(
            &c,
            &format!("http://{}/completion", proxy.proxy_addr(0)),
            &json!({"model": LLAMA, "prompt": "one two three", "n_predict": 3, "stream": true})
                .to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            eventually(LIMIT, || async {
                let s = status(&c, &proxy).await;
                s["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|m| m["active_requests"] == 0)
                    && s["models"].as_array().unwrap().len() >= 2
            })
            .await
        );
        let s = status(&c, &proxy).await;
        let q = model_entry(&s, "llamacpp0", QWEN);
        assert_eq!(q["total_requests"], 3, "{placement:?}: {q}");
        assert_eq!(
            q["prompt_tokens"].as_u64(),
            Some(3 * prompt),
            "{placement:?}: {q}"
        );
        assert_eq!(q["completion_tokens"], 15, "{placement:?}: {q}");
        let l = model_entry(&s, "llamacpp0", LLAMA);
        let native_prompt = llm_warden_sim::common::count_tokens("one two three");
        assert_eq!(l["prompt_tokens"], native_prompt, "{placement:?}: {l}");
        assert_eq!(l["completion_tokens"], 3, "{placement:?}: {l}");
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn the_proxy_decides_evictions_and_never_unloads_a_busy_model() {
    // The router alone (models_max 1) would evict a busy model; behind the proxy it is told
    // --models-max 0 and the proxy keeps one model at a time itself.
    let sim = start_llamacpp(LlamaCppConfig {
        models_max: 0,
        load_latency: Duration::from_millis(50),
        token_delay: Duration::from_millis(20),
        max_tokens_default: 30,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("llamacpp", sim.url())],
        "[limits]\nmax_models_loaded = 1\n",
    )
    .await;
    let c = client();
    mode_seen(&c, &proxy, "router").await;
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let chat = |model: &str| {
        json!({"model": model, "messages": [{"role":"user","content":"hi"}], "stream": true})
            .to_string()
    };
    // The first request loads its model lazily, through /models/load.
    assert_eq!(sim.state.status_of(QWEN).as_deref(), Some("unloaded"));
    let busy = {
        let (c, url, body) = (c.clone(), url.clone(), chat(QWEN));
        tokio::spawn(async move { post_json(&c, &url, &body).await })
    };
    assert!(eventually(LIMIT, || async { sim.state.active_requests() == 1 }).await);
    assert_eq!(sim.state.load_count(QWEN), 1);
    assert!(
        eventually(LIMIT, || async {
            let s = status(&c, &proxy).await;
            model_entry(&s, "llamacpp0", QWEN)["context_length"] == 4096
        })
        .await,
        "the window from the load's /props"
    );
    // Another model must wait for the busy one to finish, then takes its place.
    let other = post_json(&c, &url, &chat(LLAMA)).await;
    assert_eq!(other.status, 200, "{}", other.text());
    let first = busy.await.unwrap();
    assert!(
        first.text().ends_with("data: [DONE]\n\n"),
        "the busy stream finished: {}",
        first.text()
    );
    assert!(
        first.frames.last().unwrap().0 <= other.frames.first().unwrap().0,
        "the second model's reply came after the first finished"
    );
    assert_eq!(sim.state.loaded(), [LLAMA]);
    assert_eq!(sim.state.unload_count(QWEN), 1);
    assert_eq!(sim.state.unloads_while_busy(), 0);
    let s = status(&c, &proxy).await;
    let q = model_entry(&s, "llamacpp0", QWEN);
    assert_eq!(
        (q["loads"].as_u64(), q["unloads"].as_u64()),
        (Some(1), Some(1)),
        "{q}"
    );
    // The admin API unloads through /models/unload too.
    let r = post_json(
        &c,
        &format!(
            "http://{}/models/llamacpp0/{LLAMA}/unload",
            proxy.admin_addr
        ),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(sim.state.loaded().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_load_is_a_clear_error_in_llama_servers_shape() {
    let sim = start_llamacpp(Default::default()).await;
    let proxy = start_proxy(&[("llamacpp", sim.url())], "").await;
    let c = client();
    mode_seen(&c, &proxy, "router").await;
    sim.state.fail_next_load("out of memory");
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let r = post_json(
        &c,
        &url,
        &json!({"model": QWEN, "messages": [{"role":"user","content":"hi"}]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let e: Value = r.json();
    assert_eq!(e["error"]["code"], 502, "{e}");
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exit code"),
        "{e}"
    );
    // The next request loads it.
    let r = post_json(
        &c,
        &url,
        &json!({"model": QWEN, "messages": [{"role":"user","content":"hi"}]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_oversized_conversation_is_refused_as_the_server_would_when_told_to_reject() {
    let sim = start_llamacpp(LlamaCppConfig {
        n_ctx: 512,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("llamacpp", sim.url())],
        "[compaction]\non_overflow = \"reject\"\n",
    )
    .await;
    let c = client();
    mode_seen(&c, &proxy, "router").await;
    let long: Vec<Value> = (0..60)
        .map(|i| json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": format!("turn {i}: the quick brown fox jumps over the lazy dog again and again")}))
        .collect();
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let r = post_json(
        &c,
        &url,
        &json!({"model": QWEN, "messages": long}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e: Value = r.json();
    assert_eq!(e["error"]["type"], "exceed_context_size_error", "{e}");
    assert_eq!(e["error"]["n_ctx"], 512, "{e}");
    assert!(e["error"]["n_prompt_tokens"].as_u64().unwrap() > 512, "{e}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn single_mode_has_no_lifecycle() {
    let sim = start_llamacpp(LlamaCppConfig {
        router: false,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("llamacpp", sim.url())], "").await;
    let c = client();
    mode_seen(&c, &proxy, "single").await;
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let r = post_json(
        &c,
        &url,
        &json!({"model": QWEN, "messages": [{"role":"user","content":"hi"}]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        &c,
        &format!("http://{}/models/llamacpp0/{QWEN}/load", proxy.admin_addr),
        "",
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["kind"], "lifecycle_off");
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "llamacpp0", QWEN);
    assert_eq!(m["total_requests"], 1, "{m}");
    assert_eq!(m["context_length"], 4096, "from /props: {m}");
    proxy.shutdown().await;
}
