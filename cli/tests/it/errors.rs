//! Errors the proxy writes itself: in the shape each path's clients expect, and never at the
//! cost of a leaked in-flight count.

use crate::support::*;

#[tokio::test]
async fn oversized_bodies_get_413_in_the_clients_shape() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(
        &[("ollama", sim.url())],
        "[proxy]\nmax_request_body = \"1KiB\"\n",
    )
    .await;
    let c = client();
    let big = format!(r#"{{"model":"llama3.2","prompt":"{}"}}"#, "x".repeat(2000));
    let base = format!("http://{}", proxy.proxy_addr(0));

    let r = post_json(&c, &format!("{base}/api/generate"), &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("1024-byte limit") && msg.contains("proxy.max_request_body"),
        "{msg}"
    );

    let r = post_json(&c, &format!("{base}/v1/completions"), &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.json()["error"]["code"], "body_too_large");

    // A body without a Content-Length (chunked) is cut off at the limit too.
    let chunked = http_body_util::StreamBody::new(futures_util::stream::iter((0..20).map(|_| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b' ';
            100
        ])))
    })));
    let raw = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = raw
        .request(
            http::Request::post(format!("{base}/api/chat"))
                .body(chunked)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // The simulator never saw them, and nothing was counted as in flight.
    assert_eq!(
        sim.state.log.count("/api/generate") + sim.state.log.count("/v1/completions"),
        0
    );
    let s = status(&c, &proxy).await;
    assert!(s["models"].as_array().unwrap().is_empty(), "{s}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_gets_502_in_the_clients_shape() {
    // Port 1: nothing listens there.
    let dead = "http://127.0.0.1:1".to_string();
    let proxy = start_proxy(&[("ollama", dead.clone()), ("lmstudio", dead)], "").await;
    let c = client();
    let ollama = format!("http://{}", proxy.proxy_addr(0));
    let lmstudio = format!("http://{}", proxy.proxy_addr(1));

    let r = post_json(
        &c,
        &format!("{ollama}/api/chat"),
        r#"{"model":"llama3.2","messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, 502);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("upstream `ollama0`") && msg.contains("unreachable"),
        "{msg}"
    );

    let r = get(&c, &format!("{ollama}/api/tags")).await;
    assert_eq!(r.status, 502);
    assert!(r.json()["error"].is_string());

    for url in [
        format!("{ollama}/v1/models"),
        format!("{lmstudio}/api/v0/models"),
    ] {
        let r = get(&c, &url).await;
        assert_eq!(r.status, 502, "{url}");
        let e = &r.json()["error"];
        assert_eq!(e["type"], "api_error", "{url}");
        assert_eq!(e["code"], "upstream_unreachable", "{url}");
        assert!(e["message"].as_str().unwrap().contains("unreachable"));
    }

    let s = status(&c, &proxy).await;
    assert_eq!(s["providers"][0]["reachable"], false);
    assert!(
        s["providers"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("onnect"),
        "{s}"
    );
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (m["active_requests"].as_u64(), m["errors"].as_u64()),
        (Some(0), Some(1))
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_provider_that_comes_up_later_is_reported_reachable() {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    drop(l);
    let proxy = start_proxy(&[("ollama", format!("http://{addr}"))], "").await;
    let c = client();
    assert_eq!(status(&c, &proxy).await["providers"][0]["reachable"], false);
    // The provider starts on the address the proxy was told about.
    let _sim = llm_warden_sim::ollama::bind(Default::default(), &addr.to_string())
        .await
        .unwrap();
    let r = get(&c, &format!("http://{}/api/version", proxy.proxy_addr(0))).await;
    assert_eq!(r.status, 200);
    let s = status(&c, &proxy).await;
    assert_eq!(s["providers"][0]["reachable"], true, "{s}");
    assert!(s["providers"][0].get("last_error").is_none(), "{s}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_error_inside_a_200_stream_counts_as_an_error() {
    let ollama = start_ollama(Default::default()).await;
    let lmstudio = start_lmstudio(Default::default()).await;
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        "",
    )
    .await;
    let c = client();

    ollama.state.fail_next_stream_after(2);
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let last = r.text().lines().last().unwrap().to_string();
    assert!(last.starts_with("{\"error\""), "{last}");

    lmstudio.state.fail_next_stream_after(1);
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(1)),
        r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("data: {\"error\"") && !r.text().contains("[DONE]"),
        "{}",
        r.text()
    );

    // A normal stream afterwards is not an error.
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert!(r.text().lines().last().unwrap().contains("\"done\":true"));

    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (m["total_requests"].as_u64(), m["errors"].as_u64()),
        (Some(2), Some(1)),
        "{m}"
    );
    let m = model_entry(&s, "lmstudio1", "qwen2.5-7b-instruct");
    assert_eq!(
        (m["total_requests"].as_u64(), m["errors"].as_u64()),
        (Some(1), Some(1)),
        "{m}"
    );
    assert_eq!(m["active_requests"], 0);
    proxy.shutdown().await;
}
