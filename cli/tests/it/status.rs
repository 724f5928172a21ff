//! `/status` shows models the provider reports loaded, including ones loaded or unloaded
//! behind the proxy's back, with the memory and context the provider reports.

use crate::support::*;

#[tokio::test]
async fn ollama_models_loaded_behind_the_proxys_back_appear_in_status() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    assert!(status(&c, &proxy).await["models"]
        .as_array()
        .unwrap()
        .is_empty());

    // Another client loads a model directly on the provider.
    let r = post_json(
        &c,
        &format!("{}/api/generate", sim.url()),
        r#"{"model":"qwen2.5:7b"}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "load");
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "qwen2.5:7b");
    assert_eq!(m["loaded"], true, "{m}");
    assert_eq!(
        m["total_requests"], 0,
        "reported, never requested through the proxy: {m}"
    );
    assert_eq!(m["context_length"], 8192, "the model's own num_ctx: {m}");
    let ps = get(&c, &format!("{}/api/ps", sim.url())).await.json();
    let size = ps["models"][0]["size"].as_u64().unwrap();
    assert_eq!(
        m["memory_usage_mb"].as_u64().unwrap(),
        size.div_ceil(1 << 20),
        "{m}"
    );
    assert!(m["vram_usage_mb"].as_u64().unwrap() > 0);

    // ...and unloads it again.
    post_json(
        &c,
        &format!("{}/api/generate", sim.url()),
        r#"{"model":"qwen2.5:7b","keep_alive":0}"#,
    )
    .await;
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "qwen2.5:7b");
    assert_eq!(m["loaded"], false, "{m}");
    assert!(m["memory_usage_mb"].is_null(), "{m}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn lmstudio_loaded_instances_appear_in_status() {
    let sim = start_lmstudio(Default::default()).await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    let c = client();
    let r = post_json(
        &c,
        &format!("{}/api/v1/models/load", sim.url()),
        r#"{"model":"llama-3.2-3b-instruct","context_length":16384}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "lmstudio0", "llama-3.2-3b-instruct");
    assert_eq!(
        (m["loaded"].as_bool(), m["context_length"].as_u64()),
        (Some(true), Some(16384)),
        "{m}"
    );
    assert!(m["memory_usage_mb"].as_u64().unwrap() > 0);

    // A chat through the proxy is counted on the same entry.
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(0)),
        r#"{"model":"llama-3.2-3b-instruct","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "lmstudio0", "llama-3.2-3b-instruct");
    assert_eq!(
        (m["total_requests"].as_u64(), m["loaded"].as_bool()),
        (Some(1), Some(true)),
        "{m}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn older_lmstudio_without_the_v1_api_is_read_through_v0() {
    // A provider that only has /api/v0 (LM Studio 0.3.x): the v1 list is a 404.
    let sim = start_lmstudio(Default::default()).await;
    let c = client();
    // JIT-load a model through a chat, directly.
    post_json(
        &c,
        &format!("{}/v1/chat/completions", sim.url()),
        r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    let v0_only = v0_only_front(sim.url()).await;
    let proxy = start_proxy(&[("lmstudio", v0_only)], "").await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "lmstudio0", "qwen2.5-7b-instruct");
    assert_eq!(
        (m["loaded"].as_bool(), m["context_length"].as_u64()),
        (Some(true), Some(4096)),
        "{m}"
    );
    assert_eq!(s["providers"][0]["reachable"], true);
    proxy.shutdown().await;
}

/// A front for `upstream` that answers 404 on `/api/v1/*` and forwards the rest.
async fn v0_only_front(upstream: String) -> String {
    use http_body_util::BodyExt;
    let l = listener().await;
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let upstream = upstream.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let (status, body) = if path.starts_with("/api/v1/") {
                                (
                                    404,
                                    bytes::Bytes::from_static(
                                        b"{\"error\":\"Unexpected endpoint or method.\"}",
                                    ),
                                )
                            } else {
                                let r = get(&client(), &format!("{upstream}{path}")).await;
                                (r.status.as_u16(), r.body)
                            };
                            let mut resp =
                                http::Response::new(http_body_util::Full::new(body).boxed());
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    url
}

/// Invented model names (8 KB each, over real sockets) leave no entry of their own: `/status`
/// shows one `_unlisted` row for all of them, the lifecycle table and its log keep none of
/// them, and the page stays small. A model the provider has keeps its own row.
#[tokio::test]
async fn invented_model_names_fold_into_one_unlisted_row() {
    const NAMES: usize = 600;
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let r = post_json(&c, &format!("{base}/api/chat"), chat).await;
    assert_eq!(r.status, 200);
    let filler = "x".repeat(8 << 10);
    // 50 at a time: more would find the queue full (503), which folds the same way.
    for batch in 0..NAMES / 50 {
        let sent: Vec<_> = (batch * 50..(batch + 1) * 50)
            .map(|i| {
                let (c, url) = (c.clone(), format!("{base}/api/chat"));
                let body = format!(
                    r#"{{"model":"invented-{i}-{filler}","messages":[{{"role":"user","content":"hi"}}]}}"#
                );
                tokio::spawn(async move { post_json(&c, &url, &body).await.status })
            })
            .collect();
        for s in sent {
            assert_eq!(s.await.unwrap(), 404);
        }
    }
    let page = get(&c, &format!("http://{}/status", proxy.admin_addr)).await;
    assert!(
        page.body.len() < 16 << 10,
        "/status is {} bytes after {NAMES} invented names",
        page.body.len()
    );
    let s = page.json();
    let names: Vec<&str> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["_unlisted", "llama3.2:latest"], "{s}");
    let u = model_entry(&s, "ollama0", "_unlisted");
    assert_eq!(
        (u["total_requests"].as_u64(), u["errors"].as_u64()),
        (Some(NAMES as u64), Some(NAMES as u64)),
        "{u}"
    );
    assert_eq!(
        model_entry(&s, "ollama0", "llama3.2:latest")["total_requests"],
        1
    );
    let events = s["lifecycle_events"].as_array().unwrap();
    assert!(
        events.iter().all(|e| e["model"] == "llama3.2:latest"),
        "{events:?}"
    );
    let metrics = get(&c, &format!("http://{}/metrics", proxy.admin_addr)).await;
    assert!(metrics.body.len() < 64 << 10, "{}", metrics.body.len());
    proxy.shutdown().await;
}
