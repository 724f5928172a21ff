//! The scheduler seen through HTTP: keep-alive and its expiry, shared loads, the queue
//! limit, failed loads, LRU eviction, `num_ctx` reloads, truncation and cancellation.

use super::*;

#[tokio::test]
async fn keep_alive_errors_over_http() {
    let srv = start(manual()).await;
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"hi","keep_alive":"300"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text(),
        r#"{"error":"time: missing unit in duration \"300\""}"#
    );
    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"llama3.2","messages":[],"keep_alive":{}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text(),
        r#"{"error":"Unsupported type: 'map[string]interface {}'"}"#
    );
    assert!(srv.state.loaded().is_empty());
}

#[tokio::test]
async fn keep_alive_expiry_follows_the_clock() {
    let srv = start(manual()).await;
    let clock = srv.state.clock.clone();
    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":false,"keep_alive":"10m"}"#;
    assert_eq!(post(&srv, "/api/chat", chat).await.status, StatusCode::OK);
    let ps = get(&srv, "/api/ps").await.json();
    // Idle timer started at the end of the request; local offset -08:00.
    assert_eq!(ps["models"][0]["expires_at"], "2026-11-26T02:10:00-08:00");
    clock.advance(Duration::from_secs(599));
    assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
    clock.advance(Duration::from_secs(1));
    assert!(srv.state.loaded().is_empty());
    assert_eq!(get(&srv, "/api/ps").await.text(), r#"{"models":[]}"#);

    // Default keep-alive (5m), then a later request's duration replaces it.
    post(&srv, "/api/generate", r#"{"model":"llama3.2"}"#).await;
    clock.advance(Duration::from_secs(299));
    post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","keep_alive":-1}"#,
    )
    .await;
    clock.advance(Duration::from_secs(10 * 365 * 86400));
    assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
    let ps = get(&srv, "/api/ps").await.json();
    assert!(ps["models"][0]["expires_at"]
        .as_str()
        .unwrap()
        .starts_with("23"));

    // keep_alive 0 with a prompt: generates, then unloads when done.
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"hi","keep_alive":0,"stream":false}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "stop");
    assert!(srv.state.loaded().is_empty());
    assert_eq!(srv.state.load_count("llama3.2:latest"), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_share_one_load() {
    let cfg = OllamaConfig {
        load_latency: Duration::from_secs(10),
        ..manual()
    };
    let srv = Arc::new(start(cfg).await);
    let body = r#"{"model":"llama3.2","prompt":"a","stream":false}"#;
    let s1 = srv.clone();
    let a = tokio::spawn(async move { post(&s1, "/api/generate", body).await });
    for _ in 0..10_000 {
        if !srv.state.loading().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    assert_eq!(srv.state.loading(), vec!["llama3.2:latest"]);
    let ps = get(&srv, "/api/ps").await.json();
    assert_eq!(ps["models"].as_array().unwrap().len(), 1);
    let s2 = srv.clone();
    let b = tokio::spawn(async move { post(&s2, "/api/generate", body).await });
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(srv.state.load_count("llama3.2"), 1);
    let load_a = a.json()["load_duration"].as_u64().unwrap();
    let load_b = b.json()["load_duration"].as_u64().unwrap();
    assert!(load_a >= 10_000_000_000, "{load_a}");
    assert!(load_b > WARM_LOAD_NS && load_b <= load_a, "{load_b}");
    // Warm now.
    let c = post(&srv, "/api/generate", body).await;
    assert_eq!(c.json()["load_duration"], WARM_LOAD_NS);
}

#[tokio::test(start_paused = true)]
async fn queue_full_and_failed_load() {
    let cfg = OllamaConfig {
        load_latency: Duration::from_secs(5),
        max_queue: 1,
        ..manual()
    };
    let srv = Arc::new(start(cfg).await);
    let s1 = srv.clone();
    let a =
        tokio::spawn(async move { post(&s1, "/api/generate", r#"{"model":"llama3.2"}"#).await });
    for _ in 0..10_000 {
        if !srv.state.loading().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let r = post(&srv, "/api/generate", r#"{"model":"qwen2.5:7b"}"#).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.text(),
        r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#
    );
    assert_eq!(a.await.unwrap().json()["done_reason"], "load");

    srv.state
        .fail_next_load("llama runner process has terminated: error loading model");
    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"qwen2.5:7b","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        r.text(),
        r#"{"error":"llama runner process has terminated: error loading model"}"#
    );
    assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
}

#[tokio::test]
async fn lru_eviction_at_max_loaded_models() {
    let cfg = OllamaConfig {
        models: vec![
            SimModel::chat("a", 1_000_000_000, 8192),
            SimModel::chat("b", 1_000_000_000, 8192),
            SimModel::chat("c:7b", 1_000_000_000, 8192),
        ],
        max_loaded_models: 2,
        ..manual()
    };
    let srv = start(cfg).await;
    for m in ["a", "b", "a", "c:7b"] {
        let r = post(&srv, "/api/generate", &format!(r#"{{"model":"{m}"}}"#)).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(srv.state.loaded(), vec!["a:latest", "c:7b"]);
    post(
        &srv,
        "/api/generate",
        r#"{"model":"b","prompt":"x","stream":false}"#,
    )
    .await;
    assert_eq!(srv.state.loaded(), vec!["b:latest", "c:7b"]);
    assert_eq!(srv.state.load_count("a"), 1);
    assert_eq!(srv.state.load_count("b:latest"), 2);
}

#[tokio::test]
async fn truncation_drops_oldest_messages_and_num_ctx_reloads() {
    let cfg = OllamaConfig {
        default_num_ctx: 64,
        ..manual()
    };
    let srv = start(cfg).await;
    let sys = "s".repeat(20); // 5 + 4
    let old = "o".repeat(200); // 50 + 4
    let mid = "m".repeat(40); // 10 + 4
    let last = "l".repeat(40); // 10 + 4
    let body = |truncate: &str, last: &str| {
        format!(
            r#"{{"model":"llama3.2","stream":false{truncate},"messages":[{{"role":"system","content":"{sys}"}},{{"role":"user","content":"{old}"}},{{"role":"assistant","content":"{mid}"}},{{"role":"user","content":"{last}"}}]}}"#
        )
    };
    let r = post(&srv, "/api/chat", &body("", &last)).await;
    // 91 tokens > 64: the old user message goes, the system message stays.
    assert_eq!(r.json()["prompt_eval_count"], 9 + 14 + 14);
    let r = post(&srv, "/api/chat", &body(r#","truncate":false"#, &last)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.text(), format!(r#"{{"error":"{PROMPT_TOO_LONG}"}}"#));
    // A huge last message is cut in the middle: 64 - (64 - 4) / 2.
    let r = post(&srv, "/api/chat", &body("", &"x".repeat(4000))).await;
    assert_eq!(r.json()["prompt_eval_count"], 34);
    assert_eq!(srv.state.loaded_num_ctx("llama3.2"), Some(64));

    // A different num_ctx reloads; /api/ps shows the context in use.
    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"llama3.2","stream":false,"options":{"num_ctx":200000},"messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(srv.state.load_count("llama3.2"), 2);
    let ps = get(&srv, "/api/ps").await.json();
    let m = &ps["models"][0];
    assert_eq!(m["context_length"], 131072); // capped at the trained length
    assert_eq!(m["size"], m["size_vram"]);
    assert!(m["size"].as_u64().unwrap() > 2_019_393_189);
}

#[tokio::test(start_paused = true)]
async fn disconnect_mid_stream_cancels() {
    let cfg = OllamaConfig {
        token_delay: Duration::from_millis(50),
        reply_tokens: 1000,
        ..manual()
    };
    let srv = start(cfg).await;
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"go"}]}"#;
    let req = format!(
        "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(r#""done":false}"#) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(srv.state.active_requests(), 1);
    drop(s);
    for _ in 0..1000 {
        if srv.state.cancelled() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.state.cancelled(), 1);
    assert_eq!(srv.state.active_requests(), 0);
    // The runner was released: its idle timer runs.
    let ps = get(&srv, "/api/ps").await.json();
    assert_eq!(ps["models"][0]["expires_at"], "2026-11-26T02:05:00-08:00");
}

#[tokio::test(start_paused = true)]
async fn full_server_waits_for_an_idle_model() {
    let cfg = OllamaConfig {
        load_latency: Duration::from_secs(1),
        token_delay: Duration::from_secs(1),
        reply_tokens: 3,
        max_loaded_models: 1,
        ..manual()
    };
    let srv = Arc::new(start(cfg).await);
    let s1 = srv.clone();
    let a = tokio::spawn(async move {
        post(
            &s1,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"a","stream":false}"#,
        )
        .await
    });
    for _ in 0..100_000 {
        if srv.state.active_requests() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(srv.state.active_requests(), 1);
    let s2 = srv.clone();
    let b = tokio::spawn(async move {
        post(
            &s2,
            "/api/generate",
            r#"{"model":"qwen2.5:7b","prompt":"b","stream":false}"#,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // llama3.2 is busy for 3 s more: nothing to evict yet.
    assert_eq!(srv.state.load_count("qwen2.5:7b"), 0);
    assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.json()["done_reason"], "stop");
    assert_eq!(b.json()["done_reason"], "stop");
    assert!(b.json()["load_duration"].as_u64().unwrap() > 3_000_000_000);
    assert_eq!(srv.state.loaded(), vec!["qwen2.5:7b"]);
    assert_eq!(srv.state.load_count("qwen2.5:7b"), 1);
}

#[tokio::test(start_paused = true)]
async fn unloads_while_a_request_is_generating_are_counted() {
    let cfg = OllamaConfig {
        token_delay: Duration::from_secs(1),
        ..manual()
    };
    let srv = start(cfg).await;
    // Idle: a load, then an unload, counts nothing.
    post(&srv, "/api/generate", r#"{"model":"llama3.2"}"#).await;
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","keep_alive":0}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "unload");
    assert!(srv.state.loaded().is_empty());
    assert_eq!(srv.state.unloads_while_busy(), 0);

    // A slow stream is generating when the unload arrives.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("{}/api/generate", srv.url()))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"llama3.2","prompt":"hi"}"#,
        )))
        .unwrap();
    let mut body = client.request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(br#"{"model":"llama3.2""#));
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","keep_alive":0}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "unload");
    assert_eq!(srv.state.unloads_while_busy(), 1);
    assert_eq!(
        srv.state.loaded(),
        ["llama3.2:latest"],
        "deferred until idle"
    );

    // A keep_alive:0 request ending while the stream still runs asks for an unload too.
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"x","keep_alive":0,"stream":false,"options":{"num_predict":1}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(srv.state.unloads_while_busy(), 2);

    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains(r#""done":true"#));
    assert!(srv.state.loaded().is_empty(), "unloaded once idle");
    assert_eq!(srv.state.unloads_while_busy(), 2);
}

#[tokio::test]
async fn num_parallel_makes_generations_of_one_model_take_turns() {
    let cfg = OllamaConfig {
        num_parallel: 1,
        token_delay: Duration::from_millis(40),
        reply_tokens: 2,
        ..manual()
    };
    let srv = start(cfg).await;
    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":false}"#;
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(post(&srv, "/api/chat", chat), post(&srv, "/api/chat", chat));
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    // Two 80 ms generations, one after the other.
    assert!(
        started.elapsed() >= Duration::from_millis(160),
        "{:?}",
        started.elapsed()
    );
}
