//! Byte-identical responses, direct vs through the proxy, for every endpoint of both
//! simulators: streaming and not, load/unload, and the providers' own errors.
//!
//! Each request is sent once to warm the simulator's state (a model loaded, a JIT load done),
//! then once direct and once through the proxy; status, headers (less `date`) and body must
//! match exactly. The simulators run on a frozen manual clock with no delays, so two identical
//! requests produce identical bytes.

use crate::support::*;
use bytes::Bytes;
use http::Method;

struct Case {
    method: Method,
    path: &'static str,
    body: &'static str,
}

const fn case(method: Method, path: &'static str, body: &'static str) -> Case {
    Case { method, path, body }
}

async fn assert_identical(c: &TestClient, direct: &str, proxied: &str, cases: &[Case]) {
    for case in cases {
        let run = |base: &str| {
            let url = format!("{base}{}", case.path);
            let method = case.method.clone();
            let body = Bytes::from_static(case.body.as_bytes());
            async move {
                send(
                    c,
                    method,
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
        let what = format!("{} {} {}", case.method, case.path, case.body);
        assert_eq!(a.status, b.status, "status of {what}");
        assert_eq!(
            a.comparable_headers(),
            b.comparable_headers(),
            "headers of {what}"
        );
        assert_eq!(a.text(), b.text(), "body of {what}");
        assert!(
            !a.body.is_empty() || a.status == 200 || a.status == 403 || case.method == Method::HEAD,
            "{what}: an error with an empty body proves nothing"
        );
    }
}

#[tokio::test]
async fn ollama_responses_are_byte_identical_through_the_proxy() {
    let sim = start_ollama(llm_warden_sim::ollama::OllamaConfig {
        clock: Clock::fixed(),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let chat = r#"{"model":"llama3.2","messages":[{"role":"system","content":"be brief <&>"},{"role":"user","content":"why is the sky blue?"}]}"#;
    use Method as M;
    let cases = [
        case(M::GET, "/", ""),
        case(M::HEAD, "/", ""),
        case(M::GET, "/api/version", ""),
        case(M::GET, "/api/tags", ""),
        case(M::HEAD, "/api/tags", ""),
        case(M::POST, "/api/show", r#"{"model":"llama3.2"}"#),
        case(
            M::POST,
            "/api/show",
            r#"{"model":"qwen2.5:7b","verbose":false}"#,
        ),
        case(M::POST, "/api/chat", chat),
        case(
            M::POST,
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
        ),
        case(
            M::POST,
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"count"}],"options":{"num_predict":3}}"#,
        ),
        case(
            M::POST,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"hello"}"#,
        ),
        case(
            M::POST,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"hello","stream":false}"#,
        ),
        case(M::POST, "/api/generate", r#"{"model":"qwen2.5:7b"}"#),
        case(
            M::POST,
            "/api/chat",
            r#"{"model":"qwen2.5:7b","messages":[],"keep_alive":0}"#,
        ),
        case(
            M::POST,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":["a","b"]}"#,
        ),
        case(
            M::POST,
            "/api/embeddings",
            r#"{"model":"nomic-embed-text","prompt":"a"}"#,
        ),
        case(M::GET, "/api/ps", ""),
        case(M::POST, "/api/pull", r#"{"model":"llama3.2"}"#),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        case(
            M::POST,
            "/v1/completions",
            r#"{"model":"llama3.2","prompt":"once upon","stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        case(
            M::POST,
            "/v1/completions",
            r#"{"model":"llama3.2","prompt":"once upon"}"#,
        ),
        case(
            M::POST,
            "/v1/embeddings",
            r#"{"model":"nomic-embed-text","input":"hello"}"#,
        ),
        case(M::GET, "/v1/models", ""),
        case(M::GET, "/v1/models/llama3.2", ""),
        // The provider's own errors pass through untouched.
        case(M::POST, "/api/chat", r#"{"model":"llama9","messages":[]}"#),
        case(M::POST, "/api/chat", r#"{"model":"llama3.2","messages":[}"#),
        case(
            M::POST,
            "/api/chat",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        case(M::POST, "/api/generate", ""),
        case(
            M::POST,
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"x","keep_alive":"300"}"#,
        ),
        case(
            M::POST,
            "/api/chat",
            r#"{"model":"nomic-embed-text","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"llama9","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"llama3.2","messages":[]}"#,
        ),
        case(M::GET, "/v1/models/llama9", ""),
        case(M::GET, "/api/nothing-here", ""),
        case(M::GET, "/api/chat", ""),
    ];
    let c = client();
    assert_identical(
        &c,
        &sim.url(),
        &format!("http://{}", proxy.proxy_addr(0)),
        &cases,
    )
    .await;

    // Every inspected request was counted, and nothing is left in flight.
    let s = status(&c, &proxy).await;
    let llama = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(llama["active_requests"], 0);
    // 12 requests name llama3.2; the one with broken JSON names no model and is not counted.
    assert_eq!(llama["total_requests"], 12, "{llama}");
    assert_eq!(
        llama["errors"], 2,
        "the 400s for keep_alive \"300\" and messages:[]: {llama}"
    );
    assert!(llama["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(llama["completion_tokens"].as_u64().unwrap() > 0);
    // A model the provider does not have: counted under `_unlisted`, no row of its own.
    assert_eq!(model_entry(&s, "ollama0", "_unlisted")["errors"], 2);
    assert!(!s.to_string().contains("llama9"), "{s}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn lmstudio_responses_are_byte_identical_through_the_proxy() {
    let sim = start_lmstudio(llm_warden_sim::lmstudio::LmStudioConfig {
        clock: Clock::fixed(),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    let chat = r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"why is the sky blue?"}]}"#;
    use Method as M;
    let cases = [
        case(M::GET, "/lmstudio-greeting", ""),
        case(M::GET, "/v1/models", ""),
        case(M::POST, "/v1/chat/completions", chat),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        case(
            M::POST,
            "/v1/completions",
            r#"{"model":"qwen2.5-7b-instruct","prompt":"once upon"}"#,
        ),
        case(
            M::POST,
            "/v1/embeddings",
            r#"{"model":"text-embedding-nomic-embed-text-v1.5","input":["a","b"]}"#,
        ),
        case(M::GET, "/api/v0/models", ""),
        case(M::GET, "/api/v0/models/qwen2.5-7b-instruct", ""),
        case(M::POST, "/api/v0/chat/completions", chat),
        case(
            M::POST,
            "/api/v0/chat/completions",
            r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        case(
            M::POST,
            "/api/v0/completions",
            r#"{"model":"qwen2.5-7b-instruct","prompt":"once upon"}"#,
        ),
        case(
            M::POST,
            "/api/v0/embeddings",
            r#"{"model":"text-embedding-nomic-embed-text-v1.5","input":"a"}"#,
        ),
        case(M::GET, "/api/v1/models", ""),
        case(
            M::POST,
            "/api/v1/chat",
            r#"{"model":"qwen2.5-7b-instruct","input":"hello"}"#,
        ),
        case(
            M::POST,
            "/api/v1/chat",
            r#"{"model":"qwen2.5-7b-instruct","input":"hello","stream":true}"#,
        ),
        // Errors.
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"model":"qwen2.5-7b-instruct","messages":[}"#,
        ),
        case(
            M::POST,
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        case(
            M::POST,
            "/api/v1/models/unload",
            r#"{"instance_id":"nope"}"#,
        ),
        case(M::GET, "/api/v2/nothing", ""),
    ];
    let c = client();
    assert_identical(
        &c,
        &sim.url(),
        &format!("http://{}", proxy.proxy_addr(0)),
        &cases,
    )
    .await;
    let s = status(&c, &proxy).await;
    let qwen = model_entry(&s, "lmstudio0", "qwen2.5-7b-instruct");
    assert_eq!(qwen["active_requests"], 0);
    assert_eq!(qwen["total_requests"], 9, "{qwen}");
    assert_eq!(qwen["errors"], 0, "{qwen}");
    assert_eq!(model_entry(&s, "lmstudio0", "_unlisted")["errors"], 1);
    assert!(!s.to_string().contains("\"nope\""), "{s}");
    assert!(qwen["prompt_tokens"].as_u64().unwrap() > 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn requests_reach_the_provider_unchanged_but_for_hop_by_hop_headers_host_and_keep_alive() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    for path in ["/api/chat", "/api/show"] {
        let r = send(
            &c,
            Method::POST,
            &format!("http://{}{path}?x=1", proxy.proxy_addr(0)),
            &[
                ("authorization", "Bearer sk-test"),
                ("user-agent", "ollama-python/0.6.3"),
                ("x-custom", "kept"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "dropped"),
                ("host", "gpu-box.local:11435"),
            ],
            Bytes::from_static(body.as_bytes()),
        )
        .await;
        assert_eq!(r.status, 200, "{path}");
        // The proxy's own calls (a load, polls) go to other paths or carry no query.
        let call = sim
            .state
            .log
            .calls()
            .into_iter()
            .rfind(|c| c.path == path && c.query.is_some())
            .unwrap();
        assert_eq!(call.query.as_deref(), Some("x=1"));
        // On Ollama's native model endpoints the proxy owns unloading: `keep_alive` is set
        // to -1 (added first when absent); every other byte is the client's.
        let sent = if path == "/api/chat" {
            format!("{{\"keep_alive\":-1,{}", &body[1..])
        } else {
            body.to_string()
        };
        assert_eq!(
            String::from_utf8_lossy(&call.body),
            sent,
            "{path}: body as sent"
        );
        let h = &call.headers;
        assert_eq!(
            h["content-length"],
            sent.len().to_string().as_str(),
            "{path}"
        );
        assert_eq!(h["authorization"], "Bearer sk-test");
        assert_eq!(h["user-agent"], "ollama-python/0.6.3");
        assert_eq!(h["x-custom"], "kept");
        assert!(
            h.get("x-hop").is_none(),
            "{path}: a header named by Connection is hop-by-hop"
        );
        assert_eq!(
            h["host"],
            sim.addr.to_string().as_str(),
            "{path}: Host is the upstream's"
        );
    }
    proxy.shutdown().await;
}
