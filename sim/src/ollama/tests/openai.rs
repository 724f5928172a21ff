//! The `/v1` layer end to end: SSE framing, `include_usage`, whole bodies and the OpenAI
//! error shape.

use super::*;

#[tokio::test]
async fn openai_chat_stream_framing() {
    let srv = start(manual()).await;
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2}"#;
    let r = post(&srv, "/v1/chat/completions", body).await;
    assert_eq!(r.content_type(), "text/event-stream");
    let ev = r.events();
    let id = format!("chatcmpl-{}", seed_of(body) % 999);
    let pieces = common::reply_pieces(seed_of(body), 2);
    let head = format!(
        r#"{{"id":"{id}","object":"chat.completion.chunk","created":1795687200,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":"#
    );
    assert_eq!(ev.len(), 4);
    assert_eq!(
        ev[0],
        format!(
            r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":"{}"}},"finish_reason":null}}]}}"#,
            pieces[0]
        )
    );
    assert_eq!(
        ev[1],
        format!(
            r#"{head}[{{"index":0,"delta":{{"content":"{}"}},"finish_reason":null}}]}}"#,
            pieces[1]
        )
    );
    assert_eq!(
        ev[2],
        format!(r#"{head}[{{"index":0,"delta":{{}},"finish_reason":"length"}}]}}"#)
    );
    assert_eq!(ev[3], "[DONE]");

    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    let ev = post(&srv, "/v1/chat/completions", body).await.events();
    assert_eq!(ev.len(), 8 + 3);
    assert!(ev[8].contains(r#""finish_reason":"stop""#));
    let usage: Value = serde_json::from_str(&ev[9]).unwrap();
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(
        usage["usage"],
        serde_json::json!({"prompt_tokens":5,"completion_tokens":8,"total_tokens":13})
    );
    assert_eq!(ev[10], "[DONE]");
}

#[tokio::test]
async fn openai_non_stream_completions_and_errors() {
    let srv = start(manual()).await;
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&srv, "/v1/chat/completions", body).await;
    assert_eq!(r.content_type(), "application/json");
    let id = seed_of(body) % 999;
    assert_eq!(
        r.text(),
        format!(
            r#"{{"id":"chatcmpl-{id}","object":"chat.completion","created":1795687200,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":5,"completion_tokens":8,"total_tokens":13}}}}"#,
            reply_text(body, 8)
        ) + "\n"
    );

    let r = post(
        &srv,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text(),
        "{\"error\":{\"message\":\"[] is too short - 'messages'\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}\n"
    );
    let r = post(
        &srv,
        "/v1/chat/completions",
        r#"{"model":"llama9","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text(),
        "{\"error\":{\"message\":\"model 'llama9' not found\",\"type\":\"not_found_error\",\"param\":null,\"code\":null}}\n"
    );

    // /v1/completions streaming with include_usage: zero usage on every chunk.
    let body = r#"{"model":"llama3.2","prompt":"hi","stream":true,"max_tokens":2,"stream_options":{"include_usage":true}}"#;
    let ev = post(&srv, "/v1/completions", body).await.events();
    assert_eq!(ev.len(), 2 + 1 + 1 + 1);
    for e in &ev[..3] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":0,"completion_tokens":0,"total_tokens":0})
        );
    }
    assert!(ev[0].starts_with(r#"{"id":"cmpl-"#));
    assert!(ev[2].contains(r#""choices":[{"text":"","index":0,"finish_reason":"length"}],"model":"llama3.2","system_fingerprint":"fp_ollama","usage""#));
    let last: Value = serde_json::from_str(&ev[3]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 2);
    assert_eq!(last["usage"]["prompt_tokens"], 1 + TEMPLATE_OVERHEAD_TOKENS);
    assert_eq!(ev[4], "[DONE]");

    let r = post(
        &srv,
        "/v1/completions",
        r#"{"model":"llama3.2","prompt":"hi"}"#,
    )
    .await;
    assert!(r.text().ends_with("}\n"));
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
}

/// The simulator's seed for a request body (the body less `keep_alive`).
fn seed_of(body: &str) -> u64 {
    let map = super::super::request::parse_object(body.as_bytes(), "test").expect("a JSON object");
    super::super::request::reply_seed(&map)
}
