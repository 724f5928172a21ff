//! Raw HTTP behaviour: the Host check, CORS (preflight, refusal, allowed origins), HEAD, and
//! a load request's `num_ctx`.

use super::*;

#[tokio::test]
async fn host_header_check() {
    let srv = start(manual()).await;
    let ask = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let resp = raw(&srv, &ask("evil.example.com")).await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n"), "bare 403 has no body: {resp}");
    assert!(!resp.to_ascii_lowercase().contains("content-type"));
    for ok in [
        "localhost:11434",
        "127.0.0.1:11434",
        "192.168.1.5",
        "0.0.0.0:1",
        "[::1]:11434",
        "box.local",
        "x.internal:80",
        "app.localhost",
    ] {
        let resp = raw(&srv, &ask(ok)).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}: {resp}");
        assert!(resp.ends_with("Ollama is running"), "{ok}");
    }
    assert!(!host_allowed("8.8.8.8"));
    assert!(!host_allowed("example.com:11434"));
}

#[tokio::test]
async fn cors_head_and_load_options() {
    let srv = start(manual()).await;
    let pre = raw(
        &srv,
        "OPTIONS /api/chat HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(pre.starts_with("http/1.1 204 no content\r\n"), "{pre}");
    assert!(pre.contains("access-control-allow-origin: http://localhost:3000\r\n"));
    assert!(pre.contains("access-control-allow-headers: authorization,content-type"));
    let bad = raw(
        &srv,
        "GET / HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{bad}");
    let ok = raw(
        &srv,
        "GET /api/version HTTP/1.1\r\nHost: localhost\r\nOrigin: vscode-webview://abc\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(
        ok.contains("access-control-allow-origin: vscode-webview://abc\r\n"),
        "{ok}"
    );
    assert!(wildcard_match(
        "https://*.example.com",
        "https://a.example.com"
    ));
    assert!(!origin_allowed("http://localhost.evil.com", &[]));

    let head = raw(
        &srv,
        "HEAD /api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

    // A load request's num_ctx is the context the runner gets.
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","options":{"num_ctx":16384}}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "load");
    assert_eq!(srv.state.loaded_num_ctx("llama3.2"), Some(16384));
    // Without options the effective default (4096) differs: a reload.
    post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"x","stream":false}"#,
    )
    .await;
    assert_eq!(srv.state.loaded_num_ctx("llama3.2"), Some(4096));
    assert_eq!(srv.state.load_count("llama3.2"), 2);
}
