//! Unit tests over real HTTP against `bind(.., "127.0.0.1:0")`: exact bytes of bodies and
//! streams on every API, JIT/TTL/auto-evict on a manual clock, load and unload, auth, the
//! overflow policy, the SDK's WebSocket protocol, cancellation and simulated stream failures.

use super::state::Plan;
use super::*;
use crate::common::{alnum_id, hash_bytes, reply_pieces};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type TestClient = Client<HttpConnector, Full<Bytes>>;

const QWEN: &str = "qwen2.5-7b-instruct";
const LLAMA: &str = "llama-3.2-3b-instruct";
const EMBED: &str = "text-embedding-nomic-embed-text-v1.5";

fn cfg() -> LmStudioConfig {
    LmStudioConfig {
        clock: Clock::fixed(),
        ..LmStudioConfig::default()
    }
}

async fn start(cfg: LmStudioConfig) -> (SimServer<LmStudioSim>, TestClient) {
    let server = bind(cfg, "127.0.0.1:0").await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    (server, client)
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap()
    }
}

async fn send(
    c: &TestClient,
    s: &SimServer<LmStudioSim>,
    method: Method,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{}", s.url(), path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn get(c: &TestClient, s: &SimServer<LmStudioSim>, path: &str) -> Reply {
    send(c, s, Method::GET, path, "", &[]).await
}

async fn post(c: &TestClient, s: &SimServer<LmStudioSim>, path: &str, body: &str) -> Reply {
    send(c, s, Method::POST, path, body, &[]).await
}

fn chat_body(model: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Why is the sky blue?"}}]{extra}}}"#
    )
}

fn ids(v: &Value, list: &str, field: &str) -> Vec<String> {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[field].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn greeting_and_unknown_endpoint() {
    let (s, c) = start(cfg()).await;
    let r = get(&c, &s, "/lmstudio-greeting").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text, r#"{"lmstudio":true}"#);
    assert_eq!(r.headers[header::CONTENT_TYPE], JSON);
    let r = get(&c, &s, "/x").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text,
        r#"{"error":"Unexpected endpoint or method. (GET /x)"}"#
    );
    let r = get(&c, &s, "/v1/chat/completions").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(s.state.log.count("/lmstudio-greeting"), 1);
    assert_eq!(s.state.log.calls().len(), 3);
}

#[tokio::test]
async fn v1_models_lists_all_with_jit_and_only_loaded_without() {
    let (s, c) = start(cfg()).await;
    let r = get(&c, &s, "/v1/models").await;
    assert!(r.text.starts_with(
        r#"{"data":[{"id":"qwen2.5-7b-instruct","object":"model","owned_by":"organization_owner"}"#
    ));
    assert!(r.text.ends_with(r#"],"object":"list"}"#));
    assert_eq!(ids(&r.json(), "data", "id"), vec![QWEN, LLAMA, EMBED]);

    let (s, c) = start(LmStudioConfig {
        jit: false,
        ..cfg()
    })
    .await;
    let r = get(&c, &s, "/v1/models").await;
    assert_eq!(r.text, r#"{"data":[],"object":"list"}"#);
    // Not loaded and JIT off: an error, and nothing gets loaded.
    let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "model_not_loaded");
    assert!(s.state.loaded().is_empty());
    let r = post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{LLAMA}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&c, &s, "/v1/models").await;
    assert_eq!(ids(&r.json(), "data", "id"), vec![LLAMA]);
    let r = post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn jit_loads_on_first_chat_only() {
    let (s, c) = start(cfg()).await;
    assert_eq!(s.state.load_count(QWEN), 0);
    let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], JSON);
    assert_eq!(s.state.loaded(), vec![QWEN]);
    let r2 = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(r.text, r2.text, "identical requests give identical bytes");
    assert_eq!(s.state.load_count(QWEN), 1);

    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 21);
    assert!(id[9..]
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    let content = reply_pieces(hash_bytes(chat_body(QWEN, "").as_bytes()), 8).concat();
    let expected = format!(
        r#"{{"id":"{id}","object":"chat.completion","created":1795687200,"model":"{QWEN}","choices":[{{"index":0,"logprobs":null,"finish_reason":"stop","message":{{"role":"assistant","content":"{content}"}}}}],"usage":{{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}},"stats":{{}},"system_fingerprint":"{QWEN}"}}"#
    );
    assert_eq!(r.text, expected);
}

#[tokio::test]
async fn max_tokens_caps_the_reply() {
    let (s, c) = start(cfg()).await;
    let r = post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(QWEN, r#","max_tokens":3"#),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let r = post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(QWEN, r#","max_tokens":-1"#),
    )
    .await;
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    assert_eq!(r.json()["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_load() {
    // Over sockets in real time: the second request is sent while the first one's 400 ms
    // load runs. There is one load whatever the timing; `concurrent_plans_wait_on_the_same_load`
    // checks the sharing itself deterministically.
    let (s, c) = start(LmStudioConfig {
        load_latency: Duration::from_millis(400),
        ..cfg()
    })
    .await;
    let first = {
        let c = c.clone();
        let url = format!("{}/v1/chat/completions", s.url());
        tokio::spawn(async move {
            let req = Request::post(url)
                .body(Full::new(Bytes::from(chat_body(QWEN, ""))))
                .unwrap();
            c.request(req).await.unwrap().status()
        })
    };
    while s.state.loading().is_empty() && s.state.load_count(QWEN) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = post(&c, &s, "/api/v0/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(s.state.load_count(QWEN), 1);
    assert_eq!(s.state.loaded(), vec![QWEN]);
    assert!(s.state.loading().is_empty());
}

#[tokio::test(start_paused = true)]
async fn concurrent_plans_wait_on_the_same_load() {
    let sim = Arc::new(LmStudioSim::new(LmStudioConfig {
        load_latency: Duration::from_secs(5),
        ..cfg()
    }));
    let a = sim
        .plan(QWEN, Some(Duration::from_secs(10)), None)
        .ok()
        .unwrap();
    let b = sim.plan(QWEN, None, Some(99)).ok().unwrap();
    assert!(matches!(a, Plan::Wait { .. }) && matches!(b, Plan::Wait { .. }));
    assert_eq!(b.ctx(), 4096, "the joiner gets the running load's context");
    assert_eq!(sim.loading(), vec![QWEN]);
    let t0 = tokio::time::Instant::now();
    let (ra, rb) = tokio::join!(sim.resolve(QWEN, a), sim.resolve(QWEN, b));
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    let (ra, rb) = (ra.ok().unwrap(), rb.ok().unwrap());
    assert_eq!((ra.instance.as_str(), rb.instance.as_str()), (QWEN, QWEN));
    assert_eq!(ra.load_time, Some(Duration::from_secs(5)));
    assert_eq!(sim.load_count(QWEN), 1);
    assert!(sim.loading().is_empty());
    assert!(matches!(sim.plan(QWEN, None, None), Ok(Plan::Ready { .. })));
    // The first request's ttl applies.
    sim.clock.advance(Duration::from_secs(11));
    assert!(sim.loaded().is_empty());
}

#[tokio::test]
async fn single_loaded_model_quirk() {
    let (s, c) = start(LmStudioConfig {
        single_loaded_model_quirk: true,
        ..cfg()
    })
    .await;
    let r = post(&c, &s, "/v1/chat/completions", &chat_body("gpt-4o", "")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "nothing loaded: no quirk");
    post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
    let r = post(&c, &s, "/v1/chat/completions", &chat_body("gpt-4o", "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["model"], LLAMA);
}

#[tokio::test]
async fn jit_ttl_expires_on_the_clock_and_resets_on_use() {
    let (s, c) = start(cfg()).await;
    let clock = s.state.clock.clone();
    post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(QWEN, r#","ttl":300"#),
    )
    .await;
    clock.advance(Duration::from_secs(299));
    assert_eq!(s.state.loaded(), vec![QWEN]);
    // A request resets the idle timer; its own ttl is ignored (it does not load).
    post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(QWEN, r#","ttl":5"#),
    )
    .await;
    clock.advance(Duration::from_secs(299));
    assert_eq!(s.state.loaded(), vec![QWEN]);
    clock.advance(Duration::from_secs(2));
    assert!(s.state.loaded().is_empty());
    let r = get(&c, &s, "/api/v0/models").await;
    assert_eq!(r.json()["data"][0]["state"], "not-loaded");
    assert!(r.json()["data"][0].get("loaded_context_length").is_none());

    // Default TTL: 60 minutes.
    post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(s.state.load_count(QWEN), 2);
    clock.advance(Duration::from_secs(3599));
    assert_eq!(s.state.loaded(), vec![QWEN]);
    clock.advance(Duration::from_secs(2));
    assert!(s.state.loaded().is_empty());
}

#[tokio::test]
async fn manual_loads_have_no_ttl() {
    let (s, c) = start(cfg()).await;
    post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{QWEN}"}}"#),
    )
    .await;
    s.state.clock.advance(Duration::from_secs(365 * 24 * 3600));
    assert_eq!(s.state.loaded(), vec![QWEN]);
}

#[tokio::test]
async fn auto_evict_replaces_the_jit_model_but_not_manual_ones() {
    let (s, c) = start(cfg()).await;
    post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    let r = post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{EMBED}"}}"#),
    )
    .await;
    assert_eq!(r.json()["type"], "embedding");
    assert_eq!(s.state.loaded(), vec![QWEN, EMBED]);
    post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
    assert_eq!(s.state.loaded(), vec![EMBED, LLAMA]);
    post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(s.state.loaded(), vec![EMBED, QWEN]);
    assert_eq!(s.state.load_count(QWEN), 2);

    let (s, c) = start(LmStudioConfig {
        auto_evict: false,
        ..cfg()
    })
    .await;
    post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    post(&c, &s, "/v1/chat/completions", &chat_body(LLAMA, "")).await;
    assert_eq!(s.state.loaded(), vec![QWEN, LLAMA]);
}

#[tokio::test(start_paused = true)]
async fn v1_load_and_unload() {
    let (s, c) = start(LmStudioConfig {
        load_latency: Duration::from_secs(2),
        ..cfg()
    })
    .await;
    let t0 = tokio::time::Instant::now();
    let r = post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{QWEN}","context_length":8192,"echo_load_config":true}}"#),
    )
    .await;
    assert!(t0.elapsed() >= Duration::from_secs(2), "load blocks");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.text,
        format!(
            r#"{{"type":"llm","instance_id":"{QWEN}","load_time_seconds":2.0,"status":"loaded","load_config":{{"context_length":8192,"eval_batch_size":512,"parallel":4,"flash_attention":true,"offload_kv_cache_to_gpu":true}}}}"#
        )
    );
    // A repeat load makes a second instance; the context is capped at the trained max.
    let r = post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{QWEN}","context_length":1000000}}"#),
    )
    .await;
    assert_eq!(r.json()["instance_id"], format!("{QWEN}:2"));
    assert!(r.json().get("load_config").is_none());
    assert_eq!(
        s.state.loaded_context_length(&format!("{QWEN}:2")),
        Some(32768)
    );
    assert_eq!(s.state.load_count(QWEN), 2);

    let r = get(&c, &s, "/api/v1/models").await;
    let v = r.json();
    let qwen = &v["models"][0];
    assert_eq!(qwen["key"], QWEN);
    assert_eq!(qwen["display_name"], "Qwen2.5 7B Instruct");
    assert_eq!(
        qwen["loaded_instances"][0]["config"]["context_length"],
        8192
    );
    assert_eq!(qwen["loaded_instances"][1]["id"], format!("{QWEN}:2"));
    assert_eq!(qwen["max_context_length"], 32768);
    assert_eq!(v["models"][2]["type"], "embedding");
    assert!(v["models"][2].get("architecture").is_none());
    let r = get(&c, &s, "/v1/models").await;
    assert_eq!(
        ids(&r.json(), "data", "id"),
        vec![
            QWEN.to_string(),
            format!("{QWEN}:2"),
            LLAMA.into(),
            EMBED.into()
        ]
    );
    let r = get(&c, &s, &format!("/api/v0/models/{QWEN}")).await;
    assert_eq!(
        r.text,
        format!(
            r#"{{"id":"{QWEN}","object":"model","type":"llm","publisher":"lmstudio-community","arch":"qwen2","compatibility_type":"gguf","quantization":"Q4_K_M","state":"loaded","max_context_length":32768,"loaded_context_length":8192,"capabilities":["tool_use"]}}"#
        )
    );
    // The second instance can be addressed by its id.
    let r = post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(&format!("{QWEN}:2"), ""),
    )
    .await;
    assert_eq!(r.json()["model"], format!("{QWEN}:2"));

    let r = post(
        &c,
        &s,
        "/api/v1/models/unload",
        &format!(r#"{{"instance_id":"{QWEN}"}}"#),
    )
    .await;
    assert_eq!(r.text, format!(r#"{{"instance_id":"{QWEN}"}}"#));
    assert_eq!(s.state.loaded(), vec![format!("{QWEN}:2")]);
    let r = post(
        &c,
        &s,
        "/api/v1/models/unload",
        &format!(r#"{{"instance_id":"{QWEN}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.json()["error"].is_object());
    let r = post(&c, &s, "/api/v1/models/load", r#"{"model":"nope"}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["type"], "model_not_found");
    let r = get(&c, &s, "/api/v0/models/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn failed_loads() {
    let (s, c) = start(cfg()).await;
    s.state.fail_next_load("out of memory");
    let r = post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{QWEN}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("out of memory"));
    s.state.fail_next_load("out of memory");
    let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.json()["error"]["code"], "model_load_failed");
    assert!(s.state.loaded().is_empty());
    let r = post(&c, &s, "/v1/chat/completions", &chat_body(QWEN, "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.state.load_count(QWEN), 1);
}

fn expected_chat_stream(body: &str, model: &str, usage: Option<(u32, u32)>) -> String {
    let seed = hash_bytes(body.as_bytes());
    let id = format!("chatcmpl-{}", alnum_id(seed, 21));
    let head = format!(
        r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":1795687200,"model":"{model}","system_fingerprint":"{model}","choices":"#
    );
    let mut out = String::new();
    for (i, p) in reply_pieces(seed, 8).iter().enumerate() {
        let role = if i == 0 { r#""role":"assistant","# } else { "" };
        out += &format!(
            r#"{head}[{{"index":0,"delta":{{{role}"content":"{p}"}},"logprobs":null,"finish_reason":null}}]}}"#
        );
        out += "\n\n";
    }
    out +=
        &format!(r#"{head}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#);
    out += "\n\n";
    if let Some((p, n)) = usage {
        let t = p + n;
        out += &format!(
            r#"{head}[],"usage":{{"prompt_tokens":{p},"completion_tokens":{n},"total_tokens":{t}}}}}"#
        );
        out += "\n\n";
    }
    out + "data: [DONE]\n\n"
}

#[tokio::test]
async fn openai_stream_without_and_with_usage() {
    let (s, c) = start(cfg()).await;
    let body = chat_body(QWEN, r#","stream":true"#);
    let r = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], SSE);
    assert_eq!(r.headers[header::TRANSFER_ENCODING], "chunked");
    assert_eq!(r.text, expected_chat_stream(&body, QWEN, None));

    let body = chat_body(
        QWEN,
        r#","stream":true,"stream_options":{"include_usage":true}"#,
    );
    let r = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.text, expected_chat_stream(&body, QWEN, Some((9, 8))));
    let again = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.text, again.text);
    assert_eq!(s.state.active_requests(), 0);
    assert_eq!(s.state.cancelled(), 0);
}

#[tokio::test]
async fn completions_stream_and_non_stream() {
    let (s, c) = start(cfg()).await;
    let body = format!(r#"{{"model":"{QWEN}","prompt":"Once upon a time","stream":true}}"#);
    let r = post(&c, &s, "/v1/completions", &body).await;
    let events: Vec<&str> = r.text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 8 + 2);
    assert!(events[0].contains(r#""object":"text_completion""#));
    assert!(events[8].contains(r#""text":"","logprobs":null,"finish_reason":"stop""#));
    assert_eq!(events[9], "data: [DONE]");
    let body = format!(r#"{{"model":"{QWEN}","prompt":"Once upon a time"}}"#);
    let v = post(&c, &s, "/api/v0/completions", &body).await.json();
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["stats"]["stop_reason"], "eosFound");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
}

#[tokio::test]
async fn v0_chat_adds_stats_model_info_runtime() {
    let (s, c) = start(LmStudioConfig {
        token_delay: Duration::from_millis(1),
        ..cfg()
    })
    .await;
    let r = post(
        &c,
        &s,
        "/api/v0/chat/completions",
        &chat_body(QWEN, r#","max_tokens":2"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let t = &r.text;
    let tail = format!(
        r#""usage":{{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}},"stats":{{"tokens_per_second":1000.0,"time_to_first_token":0.001,"generation_time":0.002,"stop_reason":"maxPredictedTokensReached"}},"model_info":{{"arch":"qwen2","quant":"Q4_K_M","format":"gguf","context_length":4096}},"runtime":{{"name":"llama.cpp-linux-x86_64-avx2","version":"1.3.0","supported_formats":["gguf"]}},"system_fingerprint":"{QWEN}"}}"#
    );
    assert!(t.ends_with(&tail), "{t}");
    let r = get(&c, &s, "/api/v0/models").await;
    let v = r.json();
    assert!(r.text.starts_with(r#"{"object":"list","data":["#));
    assert_eq!(v["data"][0]["state"], "loaded");
    assert_eq!(v["data"][0]["loaded_context_length"], 4096);
    assert_eq!(v["data"][1]["state"], "not-loaded");
    assert_eq!(v["data"][2]["type"], "embeddings");
}

fn event_names(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name);
            name.to_string()
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn api_v1_chat_stream_events() {
    let (s, c) = start(LmStudioConfig {
        load_latency: Duration::from_millis(1500),
        reply_tokens: 3,
        ..cfg()
    })
    .await;
    let body = format!(
        r#"{{"model":"{QWEN}","input":"Hello there","system_prompt":"Be brief.","stream":true}}"#
    );
    let r = post(&c, &s, "/api/v1/chat", &body).await;
    assert_eq!(r.headers[header::CONTENT_TYPE], SSE);
    assert!(!r.text.contains("[DONE]"));
    let mut expected = vec![
        "chat.start",
        "model_load.start",
        "model_load.progress",
        "model_load.end",
    ];
    let warm = [
        "prompt_processing.start",
        "prompt_processing.progress",
        "prompt_processing.end",
        "message.start",
        "message.delta",
        "message.delta",
        "message.delta",
        "message.end",
        "chat.end",
    ];
    expected.extend(warm);
    assert_eq!(event_names(&r.text), expected);
    assert!(r.text.contains(r#""type":"model_load.end","model_instance_id":"qwen2.5-7b-instruct","load_time_seconds":1.5}"#));
    let last = r.text.trim_end().rsplit("\n\n").next().unwrap();
    let end: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    let stats = &end["result"]["stats"];
    assert_eq!(stats["input_tokens"], 3 + 4 + 3 + 4);
    assert_eq!(stats["total_output_tokens"], 3);
    assert_eq!(stats["model_load_time_seconds"], 1.5);

    // Warm: no model_load.*, no model_load_time_seconds.
    let r = post(&c, &s, "/api/v1/chat", &body).await;
    let mut expected = vec!["chat.start"];
    expected.extend(warm);
    assert_eq!(event_names(&r.text), expected);
    assert!(!r.text.contains("model_load_time_seconds"));

    let body =
        format!(r#"{{"model":"{QWEN}","input":[{{"type":"message","content":"Hello there"}}]}}"#);
    let r = post(&c, &s, "/api/v1/chat", &body).await;
    let seed = hash_bytes(body.as_bytes());
    let content = reply_pieces(seed, 3).concat();
    let resp = alnum_id(seed.rotate_left(29), 21);
    assert_eq!(
        r.text,
        format!(
            r#"{{"model_instance_id":"{QWEN}","output":[{{"type":"message","content":"{content}"}}],"stats":{{"input_tokens":7,"total_output_tokens":3,"reasoning_output_tokens":0,"tokens_per_second":1000.0,"time_to_first_token_seconds":0.0}},"response_id":"resp_{resp}"}}"#
        )
    );
}

#[tokio::test]
async fn api_v1_chat_cold_non_stream_reports_load_time() {
    let (s, c) = start(cfg()).await;
    let body =
        format!(r#"{{"model":"{LLAMA}","input":"Hi","context_length":16384,"store":false}}"#);
    let v = post(&c, &s, "/api/v1/chat", &body).await.json();
    assert_eq!(v["stats"]["model_load_time_seconds"], 0.0);
    assert!(v.get("response_id").is_none());
    assert_eq!(s.state.loaded_context_length(LLAMA), Some(16384));
}

#[tokio::test]
async fn unknown_model_and_bad_requests() {
    let (s, c) = start(cfg()).await;
    let r = post(&c, &s, "/v1/chat/completions", &chat_body("x", "")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text,
        r#"{"error":{"message":"Model \"x\" not found. Please specify a valid model.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
    );
    let r = post(&c, &s, "/v1/chat/completions", "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = post(&c, &s, "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = post(
        &c,
        &s,
        "/v1/chat/completions",
        &format!(r#"{{"model":"{QWEN}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "messages");
    let r = post(&c, &s, "/v1/chat/completions", &chat_body(EMBED, "")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(&c, &s, "/api/v1/chat", r#"{"model":"x","input":"hi"}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["type"], "model_not_found");
    assert!(s.state.loaded().is_empty());
}

#[tokio::test]
async fn embeddings() {
    let (s, c) = start(cfg()).await;
    let body = format!(r#"{{"model":"{EMBED}","input":["hello","world!"]}}"#);
    let r = post(&c, &s, "/v1/embeddings", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(v["usage"]["prompt_tokens"], 2 + 2);
    assert_eq!(s.state.loaded(), vec![EMBED]);
    let r = post(
        &c,
        &s,
        "/api/v0/embeddings",
        &format!(r#"{{"model":"{QWEN}","input":"x"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn auth_mode_requires_the_bearer_token() {
    let (s, c) = start(LmStudioConfig {
        api_key: Some("sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST".into()),
        ..cfg()
    })
    .await;
    let r = get(&c, &s, "/v1/models").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let e = &r.json()["error"];
    assert_eq!(
        (&e["type"], &e["code"]),
        (&"invalid_request".into(), &"invalid_api_key".into())
    );
    assert!(
        e["message"].as_str().unwrap().contains("none was provided"),
        "{e}"
    );
    assert!(e.get("param").is_none(), "{e}");
    let r = send(
        &c,
        &s,
        Method::GET,
        "/v1/models",
        "",
        &[("authorization", "Bearer lm-studio")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let auth = [(
        "authorization",
        "Bearer sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST",
    )];
    let r = send(&c, &s, Method::GET, "/v1/models", "", &auth).await;
    assert_eq!(r.status, StatusCode::OK);
    // Without auth mode any Authorization header is ignored.
    let (s, c) = start(cfg()).await;
    let r = send(
        &c,
        &s,
        Method::GET,
        "/v1/models",
        "",
        &[("authorization", "Bearer lm-studio")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn over_long_prompt_errors_or_is_silent() {
    let long = "x".repeat(4 * 5000);
    let body = format!(r#"{{"model":"{QWEN}","messages":[{{"role":"user","content":"{long}"}}]}}"#);
    let (s, c) = start(cfg()).await;
    let r = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("5004"));
    assert!(v["error"]["message"].as_str().unwrap().contains("4096"));

    let (s, c) = start(LmStudioConfig {
        overflow: Overflow::Silent,
        ..cfg()
    })
    .await;
    let r = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 4096);
    // A larger loaded context admits it.
    let (s, c) = start(cfg()).await;
    post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{QWEN}","context_length":8192}}"#),
    )
    .await;
    let r = post(&c, &s, "/v1/chat/completions", &body).await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], 5004);
}

/// Opens `ws://addr/<ns>` and sends the SDK's auth packet; returns the socket and the answer.
async fn ws_auth(
    addr: std::net::SocketAddr,
    ns: &str,
    packet: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    serde_json::Value,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/{ns}"), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::Text(packet.into())).await.unwrap();
    let answer = ws.next().await.unwrap().unwrap();
    let answer = serde_json::from_str(answer.to_text().unwrap()).unwrap();
    (ws, answer)
}

async fn ws_call(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    msg: serde_json::Value,
) -> serde_json::Value {
    ws.send(Message::Text(msg.to_string())).await.unwrap();
    let answer = ws.next().await.unwrap().unwrap();
    serde_json::from_str(answer.to_text().unwrap()).unwrap()
}

const GUEST: &str = r#"{"authVersion":1,"clientIdentifier":"guest:x","clientPasskey":"y"}"#;

#[tokio::test]
async fn websocket_namespaces_speak_the_sdk_protocol() {
    let (s, _) = start(cfg()).await;
    // A first frame that is not an auth packet is refused, and the socket closed.
    let (mut ws, answer) = ws_auth(s.addr, "llm", r#"{"authVersion":1}"#).await;
    assert_eq!(answer["success"], false);
    assert!(answer["error"].is_string());
    while let Some(Ok(m)) = ws.next().await {
        assert!(m.is_close());
    }

    let (mut ws, answer) = ws_auth(s.addr, "llm", GUEST).await;
    assert_eq!(answer, serde_json::json!({"success": true}));
    let list = serde_json::json!({"type": "rpcCall", "endpoint": "listLoaded", "callId": 1});
    assert_eq!(
        ws_call(&mut ws, list.clone()).await,
        serde_json::json!({"type": "rpcResult", "callId": 1, "result": []})
    );
    // A manual load through the channel shows in the REST state.
    let load = serde_json::json!({"type": "channelCreate", "endpoint": "loadModel", "channelId": 1,
        "creationParameter": {"modelKey": QWEN, "loadConfigStack": {"layers": []}}});
    let mut seen = vec![ws_call(&mut ws, load).await];
    while seen.last().unwrap()["type"] != "channelClose" {
        let m = ws.next().await.unwrap().unwrap();
        seen.push(serde_json::from_str(m.to_text().unwrap()).unwrap());
    }
    let kinds: Vec<&str> = seen
        .iter()
        .map(|m| {
            m.pointer("/message/type")
                .or(m.get("type"))
                .and_then(|v| v.as_str())
                .unwrap()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "resolved",
            "progress",
            "progress",
            "success",
            "channelClose"
        ]
    );
    assert_eq!(seen[3]["message"]["info"]["identifier"], QWEN);
    assert_eq!(s.state.loaded(), [QWEN]);
    let unload = serde_json::json!({"type": "rpcCall", "endpoint": "unloadModel", "callId": 2,
        "parameter": {"identifier": QWEN}});
    assert_eq!(
        ws_call(&mut ws, unload.clone()).await,
        serde_json::json!({"type": "rpcResult", "callId": 2})
    );
    assert!(s.state.loaded().is_empty());
    assert_eq!(ws_call(&mut ws, unload).await["type"], "rpcError");
    // Binary frames are echoed (a transport check; the SDK sends none); pings answered.
    ws.send(Message::Binary(vec![0, 1, 2])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![0, 1, 2])
    );
    ws.send(Message::Ping(vec![7])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong(vec![7]));
    ws.close(None).await.unwrap();
    while let Some(Ok(m)) = ws.next().await {
        assert!(m.is_close());
    }
    assert_eq!(s.state.log.count("/llm"), 2);

    // Other namespaces authenticate and answer calls with an error.
    let (mut ws, answer) = ws_auth(s.addr, "system", GUEST).await;
    assert_eq!(answer["success"], true);
    assert_eq!(ws_call(&mut ws, list).await["type"], "rpcError");

    // A non-namespace path is not upgraded.
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let err = tokio_tungstenite::client_async(format!("ws://{}/nope", s.addr), tcp).await;
    assert!(err.is_err());
}

#[tokio::test(start_paused = true)]
async fn websocket_predict_streams_stops_on_cancel_and_counts_a_disconnect() {
    let (s, c) = start(LmStudioConfig {
        token_delay: Duration::from_secs(1),
        reply_tokens: 100_000,
        ..cfg()
    })
    .await;
    let r = post(
        &c,
        &s,
        "/api/v1/models/load",
        &format!(r#"{{"model":"{QWEN}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let predict = |id: u64| {
        serde_json::json!({"type": "channelCreate", "endpoint": "predict", "channelId": id,
            "creationParameter": {
                "modelSpecifier": {"type": "query", "query": {"identifier": QWEN}},
                "history": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
                "predictionConfigStack": {"layers": []}}})
    };
    let (mut ws, _) = ws_auth(s.addr, "llm", GUEST).await;
    let first = ws_call(&mut ws, predict(1)).await;
    assert_eq!(first["message"]["type"], "fragment");
    assert_eq!(first["message"]["fragment"]["tokensCount"], 1);
    assert_eq!(s.state.active_requests(), 1);
    let cancel =
        serde_json::json!({"type": "channelSend", "channelId": 1, "message": {"type": "cancel"}});
    ws.send(Message::Text(cancel.to_string())).await.unwrap();
    let success = loop {
        let m = ws.next().await.unwrap().unwrap();
        let m: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if m["message"]["type"] == "success" {
            break m;
        }
        assert_eq!(m["message"]["type"], "fragment");
    };
    let stats = &success["message"]["stats"];
    assert_eq!(stats["stopReason"], "userStopped");
    assert_eq!(stats["promptTokensCount"], 5);
    let predicted = stats["predictedTokensCount"].as_u64().unwrap();
    assert!(predicted >= 1);
    assert_eq!(stats["totalTokensCount"].as_u64(), Some(5 + predicted));
    assert_eq!(success["message"]["modelInfo"]["identifier"], QWEN);
    let close = ws.next().await.unwrap().unwrap();
    assert_eq!(
        close.to_text().unwrap(),
        r#"{"channelId":1,"type":"channelClose"}"#
    );
    assert_eq!(s.state.active_requests(), 0);
    assert_eq!(s.state.cancelled(), 1);

    // A client that goes away mid-prediction stops it too.
    assert_eq!(
        ws_call(&mut ws, predict(2)).await["message"]["type"],
        "fragment"
    );
    drop(ws);
    for _ in 0..10_000 {
        if s.state.cancelled() == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(s.state.cancelled(), 2);
    assert_eq!(s.state.active_requests(), 0);
}

#[tokio::test]
async fn websocket_auth_with_an_api_key() {
    let (s, c) = start(LmStudioConfig {
        api_key: Some("sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST".into()),
        ..cfg()
    })
    .await;
    // The SDK probes the greeting without a token.
    assert_eq!(
        get(&c, &s, "/lmstudio-greeting").await.status,
        StatusCode::OK
    );
    let (_, answer) = ws_auth(s.addr, "llm", GUEST).await;
    assert_eq!(answer["success"], false);
    let wrong =
        r#"{"authVersion":1,"clientIdentifier":"abcdefgh","clientPasskey":"ABCDEFGHIJKLMNOPQRSx"}"#;
    assert_eq!(ws_auth(s.addr, "llm", wrong).await.1["success"], false);
    let right =
        r#"{"authVersion":1,"clientIdentifier":"abcdefgh","clientPasskey":"ABCDEFGHIJKLMNOPQRST"}"#;
    assert_eq!(ws_auth(s.addr, "llm", right).await.1["success"], true);
}

#[tokio::test(start_paused = true)]
async fn client_disconnect_cancels_the_generation() {
    let (s, c) = start(LmStudioConfig {
        token_delay: Duration::from_secs(1),
        reply_tokens: 100_000,
        ..cfg()
    })
    .await;
    let req = Request::post(format!("{}/v1/chat/completions", s.url()))
        .body(Full::new(Bytes::from(chat_body(QWEN, r#","stream":true"#))))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"));
    assert_eq!(s.state.active_requests(), 1);
    drop(body);
    drop(c);
    for _ in 0..10_000 {
        if s.state.cancelled() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.state.cancelled(), 1);
    assert_eq!(s.state.active_requests(), 0);
}

#[tokio::test]
async fn failing_streams_end_with_an_error_event() {
    let (s, c) = start(cfg()).await;
    s.state.fail_next_stream_after(2);
    let r = post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(QWEN, r#","stream":true"#),
    )
    .await;
    let events: Vec<&str> = r.text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3);
    assert!(events[2].starts_with(r#"data: {"error":{"message":"#));
    assert!(!r.text.contains("[DONE]"));
    // Only the next stream fails.
    let r = post(
        &c,
        &s,
        "/v1/chat/completions",
        &chat_body(QWEN, r#","stream":true"#),
    )
    .await;
    assert!(r.text.ends_with("data: [DONE]\n\n"));

    s.state.fail_next_stream_after(1);
    let body = format!(r#"{{"model":"{QWEN}","input":"hi","stream":true}}"#);
    let r = post(&c, &s, "/api/v1/chat", &body).await;
    let names = event_names(&r.text);
    assert_eq!(names.last().unwrap(), "error");
    assert_eq!(names.iter().filter(|n| *n == "message.delta").count(), 1);
    assert!(!names.contains(&"chat.end".to_string()));
    assert_eq!(s.state.cancelled(), 0);
}

#[tokio::test(start_paused = true)]
async fn unloads_while_an_instance_is_generating_are_counted() {
    let (s, c) = start(LmStudioConfig {
        token_delay: Duration::from_secs(1),
        ..cfg()
    })
    .await;
    let load = format!(r#"{{"model":"{QWEN}"}}"#);
    let unload = format!(r#"{{"instance_id":"{QWEN}"}}"#);
    // Idle: a load, then an unload, counts nothing.
    post(&c, &s, "/api/v1/models/load", &load).await;
    let r = post(&c, &s, "/api/v1/models/unload", &unload).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.state.unloads_while_busy(), 0);

    // A slow stream on the instance is generating when the unload arrives.
    post(&c, &s, "/api/v1/models/load", &load).await;
    let req = Request::post(format!("{}/v1/chat/completions", s.url()))
        .body(Full::new(Bytes::from(chat_body(QWEN, r#","stream":true"#))))
        .unwrap();
    let mut body = c.request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"));
    // Another instance of the same model is not busy.
    let second = post(&c, &s, "/api/v1/models/load", &load).await.json();
    let second = second["instance_id"].as_str().unwrap().to_string();
    let r = post(
        &c,
        &s,
        "/api/v1/models/unload",
        &format!(r#"{{"instance_id":"{second}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.state.unloads_while_busy(), 0);

    let r = post(&c, &s, "/api/v1/models/unload", &unload).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.state.unloads_while_busy(), 1);
    // The stream still finishes.
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    assert_eq!(s.state.active_requests(), 0);
    assert_eq!(s.state.unloads_while_busy(), 1);
}
