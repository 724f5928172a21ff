//! Tests over real HTTP against `bind(.., "127.0.0.1:0")`: router status transitions, load,
//! unload, autoload and `--models-max` eviction on paused time; exact bytes of errors, chunks
//! and lists; the three usage placements; native `/completion`; tokenizer; slots; single mode.

use super::*;
use crate::common::count_tokens;
use crate::SimModel;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

type TestClient = Client<HttpConnector, Full<Bytes>>;

const A: &str = "alpha-q4";
const B: &str = "beta-q4";
const C: &str = "gamma-q4";
const E: &str = "embed-f16";

fn cfg() -> LlamaCppConfig {
    LlamaCppConfig {
        models: vec![
            SimModel::chat(A, 1_000_000, 8192),
            SimModel::chat(B, 2_000_000, 8192),
            SimModel::chat(C, 3_000_000, 8192),
            SimModel::embedding(E, 500_000, 2048),
        ],
        clock: Clock::fixed(),
        max_tokens_default: 4,
        ..LlamaCppConfig::default()
    }
}

fn single() -> LlamaCppConfig {
    LlamaCppConfig {
        router: false,
        ..cfg()
    }
}

async fn start(cfg: LlamaCppConfig) -> (SimServer<LlamaCppSim>, TestClient) {
    let server = bind(cfg, "127.0.0.1:0").await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    (server, client)
}

struct Reply {
    status: StatusCode,
    content_type: String,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap()
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<&str> {
        self.text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect()
    }
}

async fn send(
    c: &TestClient,
    s: &SimServer<LlamaCppSim>,
    m: Method,
    path: &str,
    body: &str,
) -> Reply {
    let req = Request::builder()
        .method(m)
        .uri(format!("{}{}", s.url(), path))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        content_type,
        text: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn get(c: &TestClient, s: &SimServer<LlamaCppSim>, path: &str) -> Reply {
    send(c, s, Method::GET, path, "").await
}

async fn post(c: &TestClient, s: &SimServer<LlamaCppSim>, path: &str, body: &str) -> Reply {
    send(c, s, Method::POST, path, body).await
}

fn chat(model: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Why is the sky blue?"}}]{extra}}}"#
    )
}

fn model_body(model: &str) -> String {
    format!(r#"{{"model":"{model}"}}"#)
}

fn err(code: u16, message: &str, kind: &str) -> String {
    format!(r#"{{"error":{{"code":{code},"message":"{message}","type":"{kind}"}}}}"#)
}

/// The HTTP layer's 404 body (its own key order).
const NOT_FOUND: &str =
    r#"{"error":{"message":"File Not Found","type":"not_found_error","code":404}}"#;

fn statuses(v: &Value) -> Vec<(String, String)> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["status"]["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn router_load_is_asynchronous_and_status_moves_through_loading() {
    let (s, c) = start(LlamaCppConfig {
        load_latency: Duration::from_secs(10),
        ..cfg()
    })
    .await;
    let r = get(&c, &s, "/models").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type, "application/json; charset=utf-8");
    let first = r.json()["data"][0].to_string();
    assert_eq!(r.json()["object"], "list");
    assert!(r.text.starts_with(r#"{"data":[{"id":"alpha-q4","aliases":[],"tags":[],"object":"model","owned_by":"llamacpp","created":1795687200,"status":{"value":"unloaded","args":["#));
    assert!(r.text.contains(r#"\n\n"},"architecture":{"input_modalities":["text"],"output_modalities":["text"]},"source":"models_dir","can_remove":false},"#));
    assert!(!first.contains("meta"));
    assert_eq!(get(&c, &s, "/v1/models").await.text, r.text);

    let t0 = tokio::time::Instant::now();
    let r = post(&c, &s, "/models/load", &model_body(A)).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::OK, r#"{"success":true}"#)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "load answers at once"
    );
    assert_eq!(s.state.status_of(A).as_deref(), Some("loading"));
    let v = get(&c, &s, "/models").await.json();
    assert_eq!(statuses(&v)[0], (A.to_string(), "loading".to_string()));
    assert!(v["data"][0].get("meta").is_none());

    let r = post(&c, &s, "/models/load", &model_body(A)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text,
        err(400, "model is already running", "invalid_request_error")
    );
    let r = post(&c, &s, "/models/load", &model_body("nope")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text, NOT_FOUND,
        "the HTTP layer's 404 page replaces the handler's body"
    );

    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(s.state.status_of(A).as_deref(), Some("loading"));
    tokio::time::sleep(Duration::from_millis(1001)).await;
    assert_eq!(s.state.status_of(A).as_deref(), Some("loaded"));
    assert_eq!(s.state.loaded(), vec![A]);
    assert_eq!(s.state.load_count(A), 1);
    let r = get(&c, &s, "/models").await;
    let entry = r.json()["data"][0].clone();
    assert_eq!(entry["status"]["value"], "loaded");
    assert!(r.text.contains(r#""source":"models_dir","can_remove":false,"meta":{"vocab_type":2,"n_vocab":32000,"n_ctx":4096,"n_ctx_train":8192,"n_embd":4096,"n_params":3200000000,"size":1000000,"ftype":"Q4_K_M"}}"#));
}

#[tokio::test]
async fn router_unload_and_its_errors() {
    let (s, c) = start(cfg()).await;
    let r = post(&c, &s, "/models/unload", &model_body("nope")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text,
        err(400, "model is not found", "invalid_request_error")
    );
    let r = post(&c, &s, "/models/unload", &model_body(A)).await;
    assert_eq!(
        r.text,
        err(400, "model is not running", "invalid_request_error")
    );
    post(&c, &s, "/models/load", &model_body(A)).await;
    let r = post(&c, &s, "/models/unload", &model_body(A)).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::OK, r#"{"success":true}"#)
    );
    assert_eq!(s.state.status_of(A).as_deref(), Some("unloaded"));
    assert_eq!(s.state.unload_count(A), 1);
    assert_eq!(s.state.unloads_while_busy(), 0);
    assert_eq!(s.state.status_of("nope"), None);
}

#[tokio::test(start_paused = true)]
async fn autoload_blocks_a_post_until_the_model_is_loaded() {
    let (s, c) = start(LlamaCppConfig {
        load_latency: Duration::from_secs(5),
        ..cfg()
    })
    .await;
    let t0 = tokio::time::Instant::now();
    let r = post(&c, &s, "/v1/chat/completions", &chat(A, "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(s.state.loaded(), vec![A]);
    assert_eq!(s.state.load_count(A), 1);

    let r = post(&c, &s, "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text,
        err(
            400,
            "model name is missing from the request",
            "invalid_request_error"
        )
    );
    let r = post(&c, &s, "/v1/chat/completions", &chat("gpt-4o", "")).await;
    assert_eq!(
        r.text,
        err(400, "model 'gpt-4o' not found", "invalid_request_error")
    );
    // ?autoload=false turns it off for one request.
    let r = post(&c, &s, "/v1/chat/completions?autoload=false", &chat(B, "")).await;
    assert_eq!(
        r.text,
        err(400, "model is not loaded", "invalid_request_error")
    );
    assert_eq!(s.state.status_of(B).as_deref(), Some("unloaded"));
    let r = post(&c, &s, "/v1/chat/completions", "not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.starts_with(r#"{"error":{"code":400,"message":"[json.exception.parse_error.101] parse error at line 1, column 2: "#));
}

#[tokio::test(start_paused = true)]
async fn without_autoload_requests_need_a_loaded_model() {
    let (s, c) = start(LlamaCppConfig {
        autoload: false,
        ..cfg()
    })
    .await;
    let r = post(&c, &s, "/v1/chat/completions", &chat(A, "")).await;
    assert_eq!(
        r.text,
        err(400, "model is not loaded", "invalid_request_error")
    );
    let r = post(&c, &s, "/v1/chat/completions?autoload=1", &chat(A, "")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&c, &s, "/props").await;
    assert_eq!(
        r.text,
        format!(
            r#"{{"role":"router","max_instances":4,"models_autoload":false,"model_alias":"llama-server","model_path":"none","default_generation_settings":{{"params":null,"n_ctx":0}},"ui_settings":{{}},"build_info":"{BUILD_INFO}","cors_proxy_enabled":false}}"#
        )
    );
    let r = get(&c, &s, &format!("/props?model={A}")).await;
    assert_eq!(r.json()["default_generation_settings"]["n_ctx"], 4096);
    assert_eq!(r.json()["model_path"], format!("/models/{A}.gguf"));
    let r = get(&c, &s, &format!("/props?model={B}")).await;
    assert_eq!(
        r.text,
        err(400, "model is not loaded", "invalid_request_error")
    );
}

#[tokio::test]
async fn a_failed_load_shows_in_models_and_fails_autoload() {
    let (s, c) = start(LlamaCppConfig {
        fail_load: Some("out of memory".to_string()),
        ..cfg()
    })
    .await;
    let r = post(&c, &s, "/models/load", &model_body(A)).await;
    assert_eq!(r.text, r#"{"success":true}"#);
    tokio::task::yield_now().await;
    for _ in 0..100 {
        if s.state.status_of(A).as_deref() == Some("unloaded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let r = get(&c, &s, "/models").await;
    let status = r.json()["data"][0]["status"].clone();
    assert_eq!(status["value"], "unloaded");
    assert_eq!(status["failed"], true);
    assert_eq!(status["exit_code"], 1);
    assert!(r
        .text
        .contains(r#"\n\n","exit_code":1,"failed":true},"architecture""#));
    assert_eq!(s.state.load_count(A), 0);

    s.state.fail_next_load("bad gguf");
    let r = post(&c, &s, "/v1/chat/completions", &chat(B, "")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        r.text,
        err(500, "model name=beta-q4 failed to load", "server_error")
    );
    // The next try loads; the failure is gone from the list.
    let r = post(&c, &s, "/v1/chat/completions", &chat(B, "")).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = get(&c, &s, "/models").await.json();
    assert!(v["data"][1]["status"].get("failed").is_none());
}

#[tokio::test]
async fn models_max_evicts_the_least_recently_used_model() {
    let (s, c) = start(LlamaCppConfig {
        models_max: 2,
        ..cfg()
    })
    .await;
    post(&c, &s, "/v1/chat/completions", &chat(A, "")).await;
    post(&c, &s, "/v1/chat/completions", &chat(B, "")).await;
    // A GET does not count as use; a POST does.
    get(&c, &s, &format!("/props?model={B}")).await;
    post(&c, &s, "/v1/chat/completions", &chat(A, "")).await;
    assert_eq!(s.state.loaded(), vec![A, B]);
    post(&c, &s, "/models/load", &model_body(C)).await;
    for _ in 0..100 {
        if s.state.status_of(C).as_deref() == Some("loaded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(s.state.loaded(), vec![A, C]);
    assert_eq!(s.state.unload_count(B), 1);
    assert_eq!(s.state.unloads_while_busy(), 0);
}

#[tokio::test(start_paused = true)]
async fn evicting_a_busy_model_fails_its_request_issue_21678() {
    let (s, c) = start(LlamaCppConfig {
        models_max: 1,
        token_delay: Duration::from_secs(1),
        ..cfg()
    })
    .await;
    let req = Request::post(format!("{}/v1/chat/completions", s.url()))
        .body(Full::new(Bytes::from(chat(A, r#","stream":true"#))))
        .unwrap();
    let mut body = c.request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(br#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]"#));
    assert_eq!(s.state.active_requests(), 1);

    // Loading B evicts A although A is generating.
    let r = post(&c, &s, "/models/load", &model_body(B)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.state.unloads_while_busy(), 1);
    assert_eq!(s.state.status_of(A).as_deref(), Some("unloaded"));
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(
        !String::from_utf8_lossy(&rest).contains("[DONE]"),
        "the stream just ends"
    );
    assert_eq!(s.state.active_requests(), 0);

    // A non-streamed request in flight gets a 500 when its model is unloaded.
    let (c2, url) = (c.clone(), s.url());
    let pending = tokio::spawn(async move {
        let req = Request::post(format!("{url}/v1/chat/completions"))
            .body(Full::new(Bytes::from(chat(B, ""))))
            .unwrap();
        let resp = c2.request(req).await.unwrap();
        let status = resp.status();
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(text.to_vec()).unwrap())
    });
    while s.state.active_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    post(&c, &s, "/models/unload", &model_body(B)).await;
    let (status, text) = pending.await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(text.starts_with(r#"{"error":{"code":500,"message":""#));
    assert_eq!(s.state.unloads_while_busy(), 2);
    assert_eq!(s.state.unload_count(A) + s.state.unload_count(B), 2);
}

#[tokio::test]
async fn a_prompt_over_the_slot_context_is_refused() {
    let (s, c) = start(LlamaCppConfig { n_ctx: 64, ..cfg() }).await;
    let long = "x".repeat(4 * 100);
    let body = format!(
        r#"{{"model":"{A}","messages":[{{"role":"user","content":"{long}"}}],"stream":true}}"#
    );
    let r = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.content_type, "application/json; charset=utf-8",
        "first error is not streamed"
    );
    assert_eq!(
        r.text,
        r#"{"error":{"code":400,"message":"request (107 tokens) exceeds the available context size (64 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":107,"n_ctx":64}}"#
    );
    let messages: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        chat_prompt_tokens(messages["messages"].as_array().unwrap()),
        107
    );
    assert_eq!(
        107,
        count_tokens(&long) + MESSAGE_OVERHEAD + GENERATION_PROMPT
    );
    let r = post(
        &c,
        &s,
        "/completion",
        &format!(r#"{{"model":"{A}","prompt":"{long}"}}"#),
    )
    .await;
    assert_eq!(r.json()["error"]["n_prompt_tokens"], 100);
    // A reply that would overflow stops at the context's end.
    let prompt = "y".repeat(4 * 60);
    let r = post(
        &c,
        &s,
        "/completion",
        &format!(r#"{{"model":"{A}","prompt":"{prompt}","n_predict":10}}"#),
    )
    .await;
    let v = r.json();
    assert_eq!(
        (v["tokens_predicted"].as_u64(), v["truncated"].as_bool()),
        (Some(4), Some(false))
    );
    let r = post(
        &c,
        &s,
        "/completion",
        &format!(r#"{{"model":"{A}","prompt":"{}"}}"#, "y".repeat(4 * 62)),
    )
    .await;
    let v = r.json();
    assert_eq!(v["tokens_predicted"], 2);
    assert_eq!(v["truncated"], true);
    assert_eq!(v["stop_type"], "limit");
}

#[tokio::test]
async fn chat_stream_framing_for_each_usage_placement() {
    for (placement, asked, expect_chunk, on_finish) in [
        (UsagePlacement::FinishChunk, true, false, true),
        (UsagePlacement::SeparateChunkAlways, false, true, false),
        (UsagePlacement::SeparateChunkIfAsked, false, false, false),
        (UsagePlacement::SeparateChunkIfAsked, true, true, false),
    ] {
        let (s, c) = start(LlamaCppConfig {
            usage: placement,
            fixed_reply: Some("Hi there".to_string()),
            ..cfg()
        })
        .await;
        let extra = if asked {
            r#","stream":true,"stream_options":{"include_usage":true}"#
        } else {
            r#","stream":true"#
        };
        let r = post(&c, &s, "/v1/chat/completions", &chat(A, extra)).await;
        assert_eq!(r.content_type, "text/event-stream");
        assert!(r.text.ends_with("data: [DONE]\n\n"));
        let events = r.events();
        let id = serde_json::from_str::<Value>(events[0]).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(id.len(), "chatcmpl-".len() + 32);
        let tail = format!(
            r#""created":1795687200,"id":"{id}","model":"{A}","system_fingerprint":"{BUILD_INFO}","object":"chat.completion.chunk""#
        );
        assert_eq!(
            events[0],
            format!(
                r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"role":"assistant","content":null}}}}],{tail}}}"#
            )
        );
        assert_eq!(
            events[1],
            format!(
                r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"Hi t"}}}}],{tail}}}"#
            )
        );
        assert_eq!(
            events[2],
            format!(
                r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"here"}}}}],{tail}}}"#
            )
        );
        let finish =
            format!(r#"{{"choices":[{{"finish_reason":"stop","index":0,"delta":{{}}}}],{tail}"#);
        assert!(events[3].starts_with(&finish), "{placement:?}");
        let usage = r#""usage":{"completion_tokens":2,"prompt_tokens":12,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":0}}"#;
        assert_eq!(events[3].contains(usage), on_finish, "{placement:?}");
        // Timings go on the usage chunk when there is one (observed), else on the finish chunk.
        let timings = r#","timings":{"cache_n":0,"prompt_n":12,"#;
        assert_eq!(events[3].contains(timings), !expect_chunk, "{placement:?}");
        let n = events.len();
        assert_eq!(events[n - 1], "[DONE]");
        if expect_chunk {
            assert_eq!(n, 6, "{placement:?}");
            assert!(
                events[4].starts_with(&format!(r#"{{"choices":[],{tail},{usage},"timings":{{"#))
            );
        } else {
            assert_eq!(n, 5, "{placement:?}");
        }
    }
}

#[tokio::test]
async fn non_streamed_chat_and_text_completions() {
    let (s, c) = start(LlamaCppConfig {
        fixed_reply: Some("Hello".to_string()),
        ..cfg()
    })
    .await;
    let r = post(&c, &s, "/v1/chat/completions", &chat(A, "")).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.text,
        format!(
            r#"{{"choices":[{{"finish_reason":"stop","index":0,"message":{{"role":"assistant","content":"Hello"}}}}],"created":1795687200,"model":"{A}","system_fingerprint":"{BUILD_INFO}","object":"chat.completion","usage":{{"completion_tokens":2,"prompt_tokens":12,"total_tokens":14,"prompt_tokens_details":{{"cached_tokens":0}}}},"id":"{id}","timings":{{"cache_n":0,"prompt_n":12,"prompt_ms":6.0,"prompt_per_token_ms":0.5,"prompt_per_second":2000.0,"predicted_n":2,"predicted_ms":2.0,"predicted_per_token_ms":1.0,"predicted_per_second":1000.0}}}}"#
        )
    );
    // max_tokens caps the reply (finish reason `length`).
    let r = post(
        &c,
        &s,
        "/v1/completions",
        &format!(r#"{{"model":"{A}","prompt":"Once","max_tokens":1}}"#),
    )
    .await;
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Hell");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 1);
    let r = post(
        &c,
        &s,
        "/v1/completions",
        &format!(r#"{{"model":"{A}","prompt":"Once","stream":true}}"#),
    )
    .await;
    let events = r.events();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let first = r#"{"choices":[{"text":"Hell","index":0,"logprobs":null,"finish_reason":null}],"created":1795687200,"model":"alpha-q4","system_fingerprint":"#;
    assert!(events[0].starts_with(first));
    assert!(events[0].contains(r#""object":"text_completion","id":"chatcmpl-"#));
    // The final chunk carries usage whatever the request asked; no separate usage chunk.
    assert_eq!(events.len(), 4);
    assert!(events[2].contains(r#""finish_reason":"stop"}],"#));
    assert!(events[2].contains(r#","usage":{"completion_tokens":2,"#));
}

#[tokio::test]
async fn native_completion_streams_without_done() {
    let (s, c) = start(cfg()).await;
    let body = format!(r#"{{"model":"{A}","prompt":"Hello there","n_predict":3,"stream":true}}"#);
    let r = post(&c, &s, "/completion", &body).await;
    assert_eq!(r.content_type, "text/event-stream");
    assert!(!r.text.contains("[DONE]"));
    let events = r.events();
    assert_eq!(events.len(), 4);
    let partial: Value = serde_json::from_str(events[0]).unwrap();
    assert!(events[0].starts_with(r#"{"index":0,"content":""#));
    assert!(events[0].contains(r#"","tokens":["#));
    assert!(events[0]
        .ends_with(r#"],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":3}"#));
    assert!(partial["content"].as_str().is_some());
    let last: Value = serde_json::from_str(events[3]).unwrap();
    assert_eq!(last["stop"], true);
    assert_eq!(last["content"], "");
    assert_eq!(last["tokens_predicted"], 3);
    assert_eq!(last["tokens_evaluated"], 3);
    assert_eq!(last["truncated"], false);
    assert_eq!(last["stop_type"], "limit");
    assert_eq!(
        last["tokens_cached"], 5,
        "the last sampled token is not cached yet"
    );
    assert_eq!(last["timings"]["predicted_n"], 3);
    assert!(events[3].starts_with(r#"{"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"alpha-q4","tokens_predicted":3,"tokens_evaluated":3,"generation_settings":{"#));
    // The alias and the non-streamed form.
    let r = post(
        &c,
        &s,
        "/completions",
        &format!(r#"{{"model":"{A}","prompt":"Hello there"}}"#),
    )
    .await;
    let v = r.json();
    assert_eq!(v["stop"], true);
    assert_eq!(v["tokens_predicted"], 4);
    assert_eq!(v["stop_type"], "eos");
    assert_eq!(
        v["timings"]["cache_n"], 2,
        "the slot kept the earlier prompt"
    );
}

#[tokio::test]
async fn tokenize_counts_match_the_simulator_tokenizer() {
    let (s, c) = start(cfg()).await;
    for text in ["", "Hello", "Hello, world! How are you?", "héllo wörld"] {
        let body = serde_json::json!({"model": A, "content": text}).to_string();
        let v = post(&c, &s, "/tokenize", &body).await.json();
        assert_eq!(
            v["tokens"].as_array().unwrap().len() as u32,
            count_tokens(text)
        );
        let body =
            serde_json::json!({"model": A, "content": text, "add_special": true}).to_string();
        let v = post(&c, &s, "/tokenize", &body).await.json();
        assert_eq!(
            v["tokens"].as_array().unwrap().len() as u32,
            count_tokens(text) + 1
        );
        assert_eq!(v["tokens"][0], 1);
    }
    let body =
        serde_json::json!({"model": A, "content": "Hello world", "with_pieces": true}).to_string();
    let r = post(&c, &s, "/tokenize", &body).await;
    let v = r.json();
    assert_eq!(v["tokens"][0]["piece"], "Hell");
    assert_eq!(v["tokens"][2]["piece"], "rld");
    let ids: Vec<Value> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    let body = serde_json::json!({"model": A, "tokens": ids}).to_string();
    let r = post(&c, &s, "/detokenize", &body).await;
    assert_eq!(r.text, r#"{"content":"Hello world"}"#);
    let body = format!(r#"{{"model":"{A}","messages":[{{"role":"user","content":"Hi"}}]}}"#);
    let r = post(&c, &s, "/apply-template", &body).await;
    assert_eq!(
        r.text,
        r#"{"prompt":"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"}"#
    );
}

#[tokio::test]
async fn slots_save_and_restore_need_a_save_path() {
    let (s, c) = start(cfg()).await;
    let body = format!(r#"{{"model":"{A}","filename":"a.bin"}}"#);
    let r = post(&c, &s, "/slots/0?action=save", &body).await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(
        r.text,
        err(
            501,
            "This server does not support slots action. Start it with `--slot-save-path`",
            "not_supported_error"
        )
    );

    let (s, c) = start(LlamaCppConfig {
        slot_save: true,
        parallel: 2,
        ..cfg()
    })
    .await;
    post(
        &c,
        &s,
        "/completion",
        &format!(r#"{{"model":"{A}","prompt":"Hello there","n_predict":2}}"#),
    )
    .await;
    let r = post(&c, &s, "/slots/0?action=save", &body).await;
    assert_eq!(
        r.text,
        r#"{"id_slot":0,"filename":"a.bin","n_saved":5,"n_written":40996,"timings":{"save_ms":0.05}}"#
    );
    assert_eq!(s.state.saved_slots(), vec!["a.bin"]);
    let r = post(&c, &s, "/slots/0?action=erase", &model_body(A)).await;
    assert_eq!(r.text, r#"{"id_slot":0,"n_erased":5}"#);
    let r = post(&c, &s, "/slots/1?action=restore", &body).await;
    assert_eq!(
        r.text,
        r#"{"id_slot":1,"filename":"a.bin","n_restored":5,"n_read":40996,"timings":{"restore_ms":0.05}}"#
    );
    assert_eq!(s.state.restores(), 1);
    let r = post(
        &c,
        &s,
        "/slots/1?action=restore",
        &format!(r#"{{"model":"{A}","filename":"none.bin"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(&c, &s, "/slots/x?action=save", &body).await;
    assert_eq!(r.text, err(400, "Invalid slot ID", "invalid_request_error"));
    let r = post(&c, &s, "/slots/0?action=nap", &body).await;
    assert_eq!(r.text, err(400, "Invalid action", "invalid_request_error"));
    // The restored slot serves the prompt from its cache.
    let r = post(
        &c,
        &s,
        "/completion",
        &format!(r#"{{"model":"{A}","prompt":"Hello there"}}"#),
    )
    .await;
    assert_eq!(r.json()["timings"]["cache_n"], 2);
    assert_eq!(r.json()["id_slot"], 1);
    let v = get(&c, &s, &format!("/slots?model={A}")).await.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["n_ctx"], 4096);
    assert_eq!(v[0]["is_processing"], false);
}

#[tokio::test]
async fn metrics_need_the_flag_and_a_model_in_router_mode() {
    let (s, c) = start(cfg()).await;
    let r = get(&c, &s, "/metrics").await;
    assert_eq!(
        r.text,
        err(
            400,
            "model name is missing from the request",
            "invalid_request_error"
        )
    );
    post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat(A, r#","max_tokens":3"#),
    )
    .await;
    let r = get(&c, &s, &format!("/metrics?model={A}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/plain"));
    assert!(r.text.contains(
        "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 12\n"
    ));
    assert!(r.text.contains("\nllamacpp:tokens_predicted_total 3\n"));
    assert!(r.text.contains("\nllamacpp:requests_processing 0\n"));

    let (s, c) = start(LlamaCppConfig {
        metrics: false,
        ..single()
    })
    .await;
    let r = get(&c, &s, "/metrics").await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(
        r.text,
        err(
            501,
            "This server does not support metrics endpoint. Start it with `--metrics`",
            "not_supported_error"
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_for_a_free_slot() {
    let (s, c) = start(LlamaCppConfig {
        token_delay: Duration::from_secs(1),
        ..cfg()
    })
    .await;
    post(&c, &s, "/models/load", &model_body(A)).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let t0 = tokio::time::Instant::now();
    let body = chat(A, r#","max_tokens":2"#);
    let (r1, r2) = tokio::join!(
        post(&c, &s, "/v1/chat/completions", &body),
        post(&c, &s, "/v1/chat/completions", &body)
    );
    assert_eq!((r1.status, r2.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(4),
        "one slot: one after the other"
    );
    assert_eq!(s.state.active_requests(), 0);
}

#[tokio::test(start_paused = true)]
async fn single_mode_serves_one_model_after_startup() {
    let (s, c) = start(LlamaCppConfig {
        load_latency: Duration::from_secs(3),
        n_ctx: 100_000,
        parallel: 2,
        ..single()
    })
    .await;
    let r = get(&c, &s, "/health").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.text, err(503, "Loading model", "unavailable_error"));
    let r = post(&c, &s, "/v1/chat/completions", &chat("anything", "")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = get(&c, &s, "/health").await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
    assert_eq!(s.state.loaded(), vec![A]);

    let v = get(&c, &s, "/props").await.json();
    assert_eq!(
        v["default_generation_settings"]["n_ctx"], 8192,
        "capped at the trained context"
    );
    assert_eq!(v["total_slots"], 2);
    assert_eq!(v["is_sleeping"], false);
    assert_eq!(v["build_info"], BUILD_INFO);
    let r = get(&c, &s, "/v1/models").await;
    assert_eq!(
        r.text,
        format!(
            r#"{{"object":"list","data":[{{"id":"{A}","object":"model","created":1795687200,"owned_by":"llamacpp","meta":{{"vocab_type":2,"n_vocab":32000,"n_ctx":8192,"n_ctx_train":8192,"n_embd":4096,"n_params":3200000000,"size":1000000,"ftype":"Q4_K_M"}}}}]}}"#
        )
    );
    assert_eq!(get(&c, &s, "/models").await.text, r.text);
    // Any model name is served by the one model; there is no router API.
    let r = post(&c, &s, "/v1/chat/completions", &chat("whatever", "")).await;
    assert_eq!(r.json()["model"], "whatever");
    let r = post(&c, &s, "/models/load", &model_body(A)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = post(&c, &s, "/v1/embeddings", r#"{"input":"hi"}"#).await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test]
async fn embeddings_on_an_embedding_model() {
    let (s, c) = start(cfg()).await;
    let r = post(
        &c,
        &s,
        "/v1/embeddings",
        &format!(r#"{{"model":"{E}","input":["Hello","Hi"]}}"#),
    )
    .await;
    let v = r.json();
    assert!(r.text.starts_with(&format!(r#"{{"model":"{E}","object":"list","usage":{{"prompt_tokens":3,"total_tokens":3}},"data":[{{"embedding":["#)));
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    let r = post(
        &c,
        &s,
        "/embedding",
        &format!(r#"{{"model":"{E}","content":"Hello"}}"#),
    )
    .await;
    assert!(r.text.starts_with(r#"[{"index":0,"embedding":[["#));
    let r = post(
        &c,
        &s,
        "/v1/embeddings",
        &format!(r#"{{"model":"{A}","input":"Hello"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    let r = get(&c, &s, "/nope").await;
    assert_eq!(r.text, NOT_FOUND);
}

#[tokio::test]
async fn extractive_summarizer_answers_the_proxys_summary_requests() {
    let (s, c) = start(LlamaCppConfig {
        extractive_summarizer: true,
        ..cfg()
    })
    .await;
    let body = serde_json::json!({
        "model": A,
        "max_tokens": 9,
        "messages": [
            {"role": "system", "content": "You condense conversations. Summarize it."},
            {"role": "user", "content": "user: Nice weather today. Ticket OPS-2291 is open.\nassistant: Sure thing.\n"},
        ],
    });
    let v = post(&c, &s, "/v1/chat/completions", &body.to_string())
        .await
        .json();
    // 4-byte pieces: " Ticket OPS-2291 is open." is 7 of them.
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Ticket OPS-2291 is open."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}
