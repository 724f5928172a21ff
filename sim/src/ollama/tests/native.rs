//! The native chat and generate routes end to end: exact bytes, NDJSON framing, final
//! metrics, load-only and unload requests, mid-stream failure and the native error bodies.

use super::*;

#[tokio::test]
async fn chat_non_stream_exact_bytes() {
    let srv = start(manual()).await;
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}],"stream":false}"#;
    let r = post(&srv, "/api/chat", body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/json; charset=utf-8");
    // 5 content tokens + 4 per message; 8 reply tokens at the nominal 12.5 ms.
    let expected = format!(
        concat!(
            r#"{{"model":"llama3.2","created_at":"2026-11-26T10:00:00Z","message":{{"role":"assistant","content":"{}"}},"#,
            r#""done":true,"done_reason":"stop","total_duration":107100000,"load_duration":2500000,"#,
            r#""prompt_eval_count":9,"prompt_eval_duration":3600000,"eval_count":8,"eval_duration":100000000}}"#
        ),
        reply_text(body, 8)
    );
    assert_eq!(r.text(), expected);
    // Warm and identical: byte-identical.
    let again = post(&srv, "/api/chat", body).await;
    assert_eq!(again.body, r.body);
    assert_eq!(srv.state.load_count("llama3.2"), 1);
    assert_eq!(srv.state.log.count("/api/chat"), 2);
}

#[tokio::test]
async fn chat_stream_is_ndjson_with_final_metrics() {
    let srv = start(manual()).await;
    let body =
        r#"{"model":"llama3.2:latest","messages":[{"role":"user","content":"hi <b> & you"}]}"#;
    let r = post(&srv, "/api/chat", body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/x-ndjson");
    assert_eq!(r.headers.get("transfer-encoding").unwrap(), "chunked");
    let lines = r.lines();
    assert_eq!(lines.len(), 9);
    let mut text = String::new();
    for l in &lines[..8] {
        assert_eq!(l["done"], false);
        assert_eq!(l["model"], "llama3.2:latest");
        assert_eq!(l["created_at"], "2026-11-26T10:00:00Z");
        assert!(l.get("done_reason").is_none());
        text.push_str(l["message"]["content"].as_str().unwrap());
    }
    assert_eq!(text, reply_text(body, 8));
    let last = &lines[8];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["message"]["content"], "");
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[k].as_u64().unwrap() > 0, "{k}");
    }
    assert_eq!(last["eval_count"], 8);
    let first_line = r.text().lines().next().unwrap().to_string();
    assert!(first_line.starts_with(r#"{"model":"llama3.2:latest","created_at":"#));
    assert!(first_line.ends_with(r#""},"done":false}"#), "{first_line}");
}

#[tokio::test]
async fn generate_stream_and_num_predict() {
    let srv = start(manual()).await;
    let body = r#"{"model":"llama3.2","prompt":"Why?","options":{"num_predict":3}}"#;
    let r = post(&srv, "/api/generate", body).await;
    let lines = r.lines();
    assert_eq!(lines.len(), 4);
    let last = &lines[3];
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 3);
    // 1 token + the template overhead.
    assert_eq!(last["prompt_eval_count"], 1 + TEMPLATE_OVERHEAD_TOKENS);
    let mut ctx = common::tokenize("Why?");
    ctx.extend(common::tokenize(&reply_text(body, 3)));
    assert_eq!(last["context"], serde_json::json!(ctx));
    let keys: Vec<&str> = last
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(keys.contains(&"context"));
    // Non-stream: one object, no newline, raw mode omits context.
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"x","raw":true,"stream":false}"#,
    )
    .await;
    assert!(!r.text().ends_with('\n'));
    assert!(r.json().get("context").is_none());
    assert_eq!(r.json()["done"], true);
}

#[tokio::test]
async fn load_only_and_unload() {
    let srv = start(manual()).await;
    let r = post(&srv, "/api/generate", r#"{"model":"llama3.2"}"#).await;
    assert_eq!(r.content_type(), "application/json; charset=utf-8");
    assert_eq!(
        r.text(),
        r#"{"model":"llama3.2","created_at":"2026-11-26T10:00:00Z","response":"","done":true,"done_reason":"load"}"#
    );
    assert_eq!(srv.state.loaded(), vec!["llama3.2:latest"]);
    let r = post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","prompt":"","keep_alive":"0s"}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "unload");
    assert!(srv.state.loaded().is_empty());

    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"qwen2.5:7b","messages":[],"stream":true}"#,
    )
    .await;
    assert_eq!(
        r.text(),
        r#"{"model":"qwen2.5:7b","created_at":"2026-11-26T10:00:00Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"load"}"#
    );
    assert_eq!(srv.state.loaded_num_ctx("qwen2.5:7b"), Some(8192));
    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"qwen2.5:7b","messages":[],"keep_alive":0}"#,
    )
    .await;
    assert_eq!(r.json()["done_reason"], "unload");
    assert!(srv.state.loaded().is_empty());
    assert_eq!(srv.state.load_count("qwen2.5:7b"), 1);
}

#[tokio::test]
async fn mid_stream_error_line() {
    let srv = start(manual()).await;
    srv.state.fail_next_stream_after(2);
    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let lines = r.lines();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["done"], false);
    assert_eq!(lines[2], serde_json::json!({"error": STREAM_FAILURE}));
    assert_eq!(srv.state.cancelled(), 0);
    assert_eq!(srv.state.active_requests(), 0);
    // Only once.
    let r = post(
        &srv,
        "/api/chat",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.lines().len(), 9);
}

#[tokio::test]
async fn native_error_bodies() {
    let srv = start(manual()).await;
    let cases = [
        (
            "/api/chat",
            r#"{"model":"llama9","messages":[]}"#,
            StatusCode::NOT_FOUND,
            r#"{"error":"model 'llama9' not found"}"#,
        ),
        (
            "/api/chat",
            "",
            StatusCode::BAD_REQUEST,
            r#"{"error":"missing request body"}"#,
        ),
        (
            "/api/chat",
            r#"{"messages":[]}"#,
            StatusCode::BAD_REQUEST,
            r#"{"error":"model is required"}"#,
        ),
        // Ollama's own test: server/routes_generate_test.go, TestGenerate "missing model".
        (
            "/api/generate",
            r#"{}"#,
            StatusCode::NOT_FOUND,
            r#"{"error":"model '' not found"}"#,
        ),
        (
            "/api/generate",
            r#"{"prompt":"hi"}"#,
            StatusCode::NOT_FOUND,
            r#"{"error":"model '' not found"}"#,
        ),
        (
            "/api/embed",
            r#"{"input":"hi"}"#,
            StatusCode::NOT_FOUND,
            r#"{"error":"model '' not found"}"#,
        ),
        (
            "/api/embeddings",
            r#"{"prompt":"hi"}"#,
            StatusCode::BAD_REQUEST,
            r#"{"error":"model is required"}"#,
        ),
        (
            "/api/chat",
            r#"{"model":"nomic-embed-text","messages":[{"role":"user","content":"x"}]}"#,
            StatusCode::BAD_REQUEST,
            r#"{"error":"\"nomic-embed-text\" does not support chat"}"#,
        ),
        (
            "/api/chat",
            "{\"model\":",
            StatusCode::BAD_REQUEST,
            r#"{"error":"unexpected EOF"}"#,
        ),
        (
            "/api/generate",
            "hello",
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid character 'h' looking for beginning of value"}"#,
        ),
        (
            "/api/chat",
            r#"{"model":5}"#,
            StatusCode::BAD_REQUEST,
            r#"{"error":"json: cannot unmarshal number into Go struct field ChatRequest.model of type string"}"#,
        ),
        (
            "/api/show",
            r#"{"model":"nope:1b"}"#,
            StatusCode::NOT_FOUND,
            r#"{"error":"model 'nope:1b' not found"}"#,
        ),
    ];
    for (path, body, status, expected) in cases {
        let r = post(&srv, path, body).await;
        assert_eq!(r.status, status, "{path} {body}");
        assert_eq!(r.content_type(), "application/json; charset=utf-8");
        assert_eq!(r.text(), expected, "{path} {body}");
    }
    let r = get(&srv, "/api/chat").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.text(), "405 method not allowed");
    let r = get(&srv, "/api/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.text(), "404 page not found");
    assert_eq!(r.content_type(), "text/plain");
    let r = get(&srv, "/").await;
    assert_eq!(r.text(), "Ollama is running");
    assert_eq!(r.content_type(), "text/plain; charset=utf-8");
    assert_eq!(
        get(&srv, "/api/version").await.text(),
        r#"{"version":"0.13.0"}"#
    );
    assert!(srv.state.log.calls().len() >= 12);
}

#[tokio::test]
async fn extractive_summarizer_answers_the_proxys_summary_requests() {
    let srv = start(OllamaConfig {
        extractive_summarizer: true,
        ..manual()
    })
    .await;
    let transcript =
        "user: Hello there, how is it going? The deploy key for staging is K7-4419.\\n\
                      assistant: Noted, I will keep that in mind for later.\\n";
    let body = format!(
        r#"{{"model":"llama3.2","stream":false,"options":{{"num_predict":10}},"messages":[
            {{"role":"system","content":"You condense conversations. Summarize the conversation below."}},
            {{"role":"user","content":"{transcript}"}}]}}"#
    );
    let v = post(&srv, "/api/chat", &body).await.json();
    assert_eq!(
        v["message"]["content"],
        "The deploy key for staging is K7-4419."
    );
    // 10 tokens of 4 bytes; 7 words generated.
    assert_eq!(v["eval_count"], 7);
    assert_eq!(v["done_reason"], "stop");
    // Any other chat gets the usual seeded words.
    let other = r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"The deploy key for staging is K7-4419."}]}"#;
    let v = post(&srv, "/api/chat", other).await.json();
    assert!(!v["message"]["content"]
        .as_str()
        .unwrap()
        .contains("K7-4419"));
}
