//! The lifecycle end to end, over real sockets: the proxy loads models lazily through each
//! simulator's own API, shares one load among concurrent requests, keeps Ollama from
//! unloading on its own, unloads idle models itself (never one in flight), follows models
//! loaded behind its back, answers a full or slow queue with 503 + Retry-After in the
//! client's format, and takes load/unload orders on the admin API.
//!
//! Exact timer boundaries are tested on paused time in `src/lifecycle/tests.rs`; here the
//! waits are for conditions, with generous limits.

use std::time::Duration;

use crate::support::*;
use llm_warden_sim::lmstudio::LmStudioConfig;
use llm_warden_sim::ollama::OllamaConfig;

const CHAT: &str =
    r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
const LIMIT: Duration = Duration::from_secs(10);

fn chat_for(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":false}}"#)
}

async fn admin_post(c: &TestClient, proxy: &llm_warden::app::Running, path: &str) -> Reply {
    send(
        c,
        http::Method::POST,
        &format!("http://{}{path}", proxy.admin_addr),
        &[],
        bytes::Bytes::new(),
    )
    .await
}

#[tokio::test]
async fn the_first_request_loads_the_model_through_the_providers_api() {
    let sim = start_ollama(OllamaConfig {
        load_latency: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let r = post_json(&c, &format!("{base}/api/chat"), CHAT).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The load came first, as Ollama's load-only request with keep_alive -1.
    let calls = sim.state.log.calls();
    let load = calls
        .iter()
        .find(|c| c.path == "/api/generate")
        .expect("a load request");
    assert_eq!(
        load.json(),
        serde_json::json!({"model":"llama3.2:latest","keep_alive":-1,"stream":false})
    );
    let load_ns = r.json()["load_duration"].as_u64().unwrap();
    assert!(
        load_ns < 200_000_000,
        "the model was loaded before the chat reached Ollama: {load_ns} ns"
    );
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(m["status"], "ready", "{m}");
    assert_eq!(m["loaded_by"], "proxy");
    assert_eq!(m["loads"], 1);
    assert!(m["load_time_ms"].as_u64().unwrap() >= 200, "{m}");
    assert_eq!(m["queue_depth"], 0);
    assert_eq!(m["inactivity_timeout_s"], 600.0);
    assert_eq!(m["pinned"], false);
    assert_eq!(m["platform"], "ollama");
    // Before the load, the size on disk from /api/tags (1926 MB); once loaded, what
    // /api/ps reports (weights plus KV cache).
    assert_eq!(m["memory_estimate_mb"], m["memory_usage_mb"], "{m}");
    assert!(m["memory_estimate_mb"].as_u64().unwrap() > 1926, "{m}");
    // docs/design.md: MemoryAllocation: /api/ps size split into weights (/api/tags) and the KV cache
    // estimated from /api/show (28 layers × 4096 × 8 KV heads × 128 × 2 (K, V) × 2 B).
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    let mem = &model_entry(&s, "ollama0", "llama3.2:latest")["memory"];
    assert_eq!(mem["allocated_mb"], 2374, "{mem}");
    assert_eq!(
        mem["buffers"],
        serde_json::json!({"model_mb": 1926, "context_mb": 448, "working_mb": 0})
    );
    assert!(
        mem["used_mb"].as_u64().unwrap() < 2374,
        "a few tokens fill little of the cache"
    );
    proxy.shutdown().await;
}

/// Issue 19: Ollama allocates `num_ctx × OLLAMA_NUM_PARALLEL` of KV cache in the type
/// `OLLAMA_KV_CACHE_TYPE` sets, and reports neither. With the provider's `num_parallel` and
/// `kv_cache_type` set as the server runs, the split is exact; left at Ollama's defaults
/// (1, f16), the cache the settings leave out shows as working memory.
#[tokio::test]
async fn the_memory_split_counts_parallel_slots_and_the_kv_cache_type() {
    let sim = start_ollama(OllamaConfig {
        num_parallel: 4,
        kv_cache_type: "q8_0".to_string(),
        ..Default::default()
    })
    .await;
    let c = client();
    // 4 slots × 448 MB of f16 for 4096 tokens, at q8_0's byte an element: 896 MB.
    for (settings, buffers) in [
        (
            "num_parallel = 4\nkv_cache_type = \"q8_0\"\n",
            serde_json::json!({"model_mb": 1926, "context_mb": 896, "working_mb": 0}),
        ),
        (
            "",
            serde_json::json!({"model_mb": 1926, "context_mb": 448, "working_mb": 448}),
        ),
    ] {
        let proxy = start_proxy(&[("ollama", sim.url())], settings).await;
        let r = post_json(
            &c,
            &format!("http://{}/api/chat", proxy.proxy_addr(0)),
            CHAT,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        proxy.refresh(0).await;
        let s = status(&c, &proxy).await;
        let mem = &model_entry(&s, "ollama0", "llama3.2:latest")["memory"];
        assert_eq!(mem["allocated_mb"], 1926 + 896, "{mem}");
        assert_eq!(mem["buffers"], buffers, "{settings:?}");
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn fifty_concurrent_first_requests_share_one_load_on_both_providers() {
    let ollama = start_ollama(OllamaConfig {
        load_latency: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let lmstudio = start_lmstudio(LmStudioConfig {
        load_latency: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        "",
    )
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let c = c.clone();
        let (url, body) = if i % 2 == 0 {
            (
                format!("http://{}/v1/chat/completions", proxy.proxy_addr(0)),
                chat_for("qwen2.5:7b"),
            )
        } else {
            (
                format!("http://{}/v1/chat/completions", proxy.proxy_addr(1)),
                chat_for("qwen2.5-7b-instruct"),
            )
        };
        tasks.push(tokio::spawn(async move {
            post_json(&c, &url, &body).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(ollama.state.load_count("qwen2.5:7b"), 1);
    assert_eq!(lmstudio.state.load_count("qwen2.5-7b-instruct"), 1);
    assert_eq!(
        ollama.state.log.count("/api/generate"),
        1,
        "one load request"
    );
    assert_eq!(lmstudio.state.log.count("/api/v1/models/load"), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn ollama_never_unloads_a_model_the_proxy_manages() {
    // Ollama's own idle timer is one second here, on a clock the test moves.
    let clock = Clock::fixed();
    let sim = start_ollama(OllamaConfig {
        keep_alive: Duration::from_secs(1),
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    for (path, body) in [
        ("/api/chat", CHAT.to_string()),
        // A client's own short keep_alive is a hint to the proxy, not to Ollama.
        (
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"hi","stream":false,"keep_alive":"2s"}"#.into(),
        ),
        ("/v1/chat/completions", chat_for("qwen2.5:7b")),
        (
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"hi"}"#.into(),
        ),
    ] {
        let r = post_json(&c, &format!("{base}{path}"), &body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    // An explicit `null` is the server default too: replaced, not duplicated.
    let r = post_json(
        &c,
        &format!("{base}/api/chat"),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"keep_alive":null,"stream":false}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let sent = sim
        .state
        .log
        .calls()
        .into_iter()
        .rfind(|c| c.path == "/api/chat")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sent.body),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"keep_alive":-1,"stream":false}"#
    );
    clock.advance(Duration::from_secs(24 * 3600));
    let mut loaded = sim.state.loaded();
    loaded.sort();
    assert_eq!(
        loaded,
        ["llama3.2:latest", "nomic-embed-text:latest", "qwen2.5:7b"],
        "a day later on Ollama's clock"
    );
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "llama3.2:latest")["inactivity_timeout_s"],
        2.0,
        "the client's keep_alive became the proxy's idle timeout"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_models_unload_after_the_timeout_but_never_while_streaming() {
    let sim = start_ollama(OllamaConfig {
        // A reply streams for ~800 ms, four times the idle timeout.
        token_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("ollama", sim.url())],
        "[limits]\ninactivity_timeout = \"200ms\"\n",
    )
    .await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    // Three streams, each started while the one before it streams: the model always has a
    // request in flight (by order, not by timing) and must never be unloaded in between.
    let url = format!("{base}/api/chat");
    let first = spawn_chat(&c, url.clone());
    wait_for("the first stream", LIMIT, || async {
        sim.state.active_requests() == 1
    })
    .await;
    let second = spawn_chat(&c, url.clone());
    wait_for("two streams", LIMIT, || async {
        sim.state.active_requests() == 2
    })
    .await;
    let first = first.await.unwrap();
    // The second started after the first and streams as long: it is still streaming.
    let third = spawn_chat(&c, url);
    for r in [first, second.await.unwrap(), third.await.unwrap()] {
        assert_eq!(r.status, 200);
        assert!(r.text().contains("\"done\":true"), "a whole stream");
    }
    assert!(
        eventually(LIMIT, || async { sim.state.loaded().is_empty() }).await,
        "unloaded once idle"
    );
    assert_eq!(sim.state.unloads_while_busy(), 0);
    assert_eq!(
        sim.state.load_count("llama3.2:latest"),
        1,
        "never unloaded between overlapping streams"
    );
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (m["status"].as_str(), m["unloads"].as_u64()),
        (Some("unloaded"), Some(1)),
        "{m}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn one_slot_three_models_heavy_traffic_never_unloads_a_busy_model() {
    let ollama = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(2),
        load_latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let lmstudio = start_lmstudio(LmStudioConfig {
        token_delay: Duration::from_millis(2),
        load_latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        "[limits]\nmax_models_loaded = 1\ninactivity_timeout = \"50ms\"\n[queue]\naging = \"100ms\"\n",
    )
    .await;
    let c = client();
    let cases = [
        (
            0,
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            0,
            "/v1/chat/completions",
            r#"{"model":"qwen2.5:7b","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        (
            0,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"hi"}"#,
        ),
        (
            1,
            "/v1/chat/completions",
            r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        (
            1,
            "/v1/chat/completions",
            r#"{"model":"llama-3.2-3b-instruct","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            1,
            "/v1/embeddings",
            r#"{"model":"text-embedding-nomic-embed-text-v1.5","input":"hi"}"#,
        ),
    ];
    let mut tasks = Vec::new();
    for i in 0..120usize {
        let (p, path, body) = cases[(i * 7 + i / 5) % cases.len()];
        let url = format!("http://{}{path}", proxy.proxy_addr(p));
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis((i as u64 % 40) * 5)).await;
            let r = post_json(&c, &url, body).await;
            (r.status, r.text())
        }));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(ollama.state.unloads_while_busy(), 0);
    assert_eq!(lmstudio.state.unloads_while_busy(), 0);
    assert!(ollama.state.loaded().len() <= 1 && lmstudio.state.loaded().len() <= 1);
    let s = status(&c, &proxy).await;
    for m in s["models"].as_array().unwrap() {
        assert_eq!(m["active_requests"], 0, "{m}");
        assert_eq!(m["leases"], 0, "{m}");
        assert_eq!(m["queue_depth"], 0, "{m}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_model_loaded_behind_the_proxys_back_appears_and_is_managed() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    // Another client loads a model directly.
    let r = post_json(
        &c,
        &format!("{}/api/generate", sim.url()),
        r#"{"model":"qwen2.5:7b"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "qwen2.5:7b");
    assert_eq!(
        (m["status"].as_str(), m["loaded_by"].as_str()),
        (Some("ready"), Some("provider")),
        "{m}"
    );
    assert_eq!(m["loaded"], true);
    // It is unloaded behind the proxy's back too (Ollama's own timer): the next poll says so.
    let r = post_json(
        &c,
        &format!("{}/api/generate", sim.url()),
        r#"{"model":"qwen2.5:7b","keep_alive":0}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(eventually(LIMIT, || async { sim.state.loaded().is_empty() }).await);
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "qwen2.5:7b")["status"],
        "unloaded"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_clients_unload_request_unloads_gracefully_through_the_proxy() {
    let sim = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    // A stream is answering when `ollama stop` arrives: it finishes first.
    let streaming = spawn_chat(&c, format!("{base}/api/chat"));
    assert!(eventually(LIMIT, || async { sim.state.active_requests() == 1 }).await);
    let r = post_json(
        &c,
        &format!("{base}/api/generate"),
        r#"{"model":"llama3.2","prompt":"","keep_alive":"0s"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["done_reason"], "unload", "Ollama's own reply");
    let stream = streaming.await.unwrap();
    assert!(
        stream.text().contains("\"done\":true"),
        "the stream was not cut"
    );
    assert!(sim.state.loaded().is_empty());
    assert_eq!(sim.state.unloads_while_busy(), 0);
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "llama3.2:latest")["status"],
        "unloaded"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn embed_keep_alive_zero_is_an_idle_hint_not_an_unload() {
    let sim = start_ollama(Default::default()).await;
    let c = client();
    // The simulator follows Ollama's EmbedHandler: no unload form; an empty input with
    // keep_alive 0 loads the model, answers empty embeddings, and the runner then expires.
    let r = post_json(
        &c,
        &format!("{}/api/embed", sim.url()),
        r#"{"model":"nomic-embed-text","keep_alive":0}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["embeddings"], serde_json::json!([]));
    assert_eq!(sim.state.load_count("nomic-embed-text:latest"), 1);
    assert!(eventually(LIMIT, || async { sim.state.loaded().is_empty() }).await);

    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let base = format!("http://{}", proxy.proxy_addr(0));
    for (path, body) in [
        (
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"hi","keep_alive":0}"#,
        ),
        (
            "/api/embeddings",
            r#"{"model":"nomic-embed-text","prompt":"hi","keep_alive":0}"#,
        ),
    ] {
        let r = post_json(&c, &format!("{base}{path}"), body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        // Embedded, counted, and sent with the proxy's keep_alive: the request ran under a
        // lease rather than being taken for an unload.
        let sent = sim
            .state
            .log
            .calls()
            .into_iter()
            .rfind(|c| c.path == path)
            .unwrap();
        assert_eq!(sent.json()["keep_alive"], -1, "{path}");
        let v = r.json();
        let vector = v
            .get("embeddings")
            .and_then(|e| e[0].as_array())
            .or(v["embedding"].as_array());
        assert!(vector.is_some_and(|e| !e.is_empty()), "{path}: {v}");
    }
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "nomic-embed-text:latest")["total_requests"].as_u64(),
        Some(2),
        "{s}"
    );
    // The hint: an idle timeout of zero, so the proxy unloads it once idle, never under a request.
    assert!(eventually(LIMIT, || async { sim.state.loaded().is_empty() }).await);
    assert_eq!(sim.state.unloads_while_busy(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn admin_api_loads_and_unloads_models() {
    let ollama = start_ollama(Default::default()).await;
    let mut cfg = LmStudioConfig::default();
    cfg.models.push(llm_warden_sim::SimModel::chat(
        "lmstudio-community/gemma-3-1b",
        800_000_000,
        32_768,
    ));
    let lmstudio = start_lmstudio(cfg).await;
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        "",
    )
    .await;
    let c = client();
    let r = admin_post(&c, &proxy, "/models/ollama0/qwen2.5:7b/load").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"]["status"], "ready");
    assert_eq!(ollama.state.loaded(), ["qwen2.5:7b"]);
    // Model keys with a slash (LM Studio's publisher/model) and percent-encoding.
    let r = admin_post(
        &c,
        &proxy,
        "/models/lmstudio1/lmstudio-community%2Fgemma-3-1b/load",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"]["model"], "lmstudio-community/gemma-3-1b");
    let r = admin_post(&c, &proxy, "/models/ollama0/qwen2.5:7b/unload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"]["status"], "unloaded");
    assert!(ollama.state.loaded().is_empty());
    // Unloading what is not loaded is not an error.
    let r = admin_post(&c, &proxy, "/models/ollama0/llama3.2/unload").await;
    assert_eq!(
        (r.status.as_u16(), r.json()["model"]["status"].as_str()),
        (200, Some("unloaded"))
    );
    let r = admin_post(&c, &proxy, "/models/nope/llama3.2/load").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("ollama0, lmstudio1"));
    let r = admin_post(&c, &proxy, "/models/ollama0/no-such-model/load").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = get(
        &c,
        &format!("http://{}/models/ollama0/llama3.2/load", proxy.admin_addr),
    )
    .await;
    assert_eq!(r.status, 405);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_and_a_slow_load_get_503_with_retry_after_in_the_clients_format() {
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
        let (c, url) = (c.clone(), format!("{base}/api/chat"));
        async move { post_json(&c, &url, CHAT).await }
    });
    assert!(eventually(LIMIT, || async { sim.state.loading().len() == 1 }).await);
    // The queue holds one: the next is refused at once, in the OpenAI shape on /v1.
    let r = post_json(
        &c,
        &format!("{base}/v1/chat/completions"),
        &chat_for("llama3.2"),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue.max_waiting"));
    // The first waits 300 ms for a 3 s load: 503, Ollama's shape.
    let r = first.await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.headers.contains_key("retry-after"));
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(msg.contains("queue.timeout"), "{msg}");
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (
            m["errors"].as_u64(),
            m["queue_depth"].as_u64(),
            m["active_requests"].as_u64()
        ),
        (Some(2), Some(0), Some(0)),
        "{m}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_load_is_a_clear_error_in_the_clients_format() {
    let sim = start_lmstudio(Default::default()).await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    let c = client();
    sim.state
        .fail_next_load("not enough memory to load the model");
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(0)),
        &chat_for("qwen2.5-7b-instruct"),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "load_failed");
    assert!(
        e["message"].as_str().unwrap().contains("not enough memory"),
        "{e}"
    );
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "lmstudio0", "qwen2.5-7b-instruct");
    assert_eq!(m["status"], "error");
    // The next request loads again.
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(0)),
        &chat_for("qwen2.5-7b-instruct"),
    )
    .await;
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn models_stay_loaded_on_shutdown_unless_unload_on_shutdown_is_set() {
    for (unload, expected) in [(false, vec!["llama3.2:latest"]), (true, vec![])] {
        let sim = start_ollama(Default::default()).await;
        let extra = format!(
            "[limits]\nunload_on_shutdown = {unload}\n[models.\"qwen2.5:7b\"]\npinned = true\n"
        );
        let proxy = start_proxy(&[("ollama", sim.url())], &extra).await;
        let c = client();
        let r = post_json(
            &c,
            &format!("http://{}/api/chat", proxy.proxy_addr(0)),
            CHAT,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            admin_post(&c, &proxy, "/models/ollama0/qwen2.5:7b/load")
                .await
                .status,
            200
        );
        assert_eq!(sim.state.loaded(), ["llama3.2:latest", "qwen2.5:7b"]);
        proxy.shutdown().await;
        // The pinned model stays either way.
        let mut expected: Vec<&str> = expected.clone();
        expected.push("qwen2.5:7b");
        expected.sort();
        assert_eq!(
            sim.state.loaded(),
            expected,
            "unload_on_shutdown = {unload}"
        );
    }
}
