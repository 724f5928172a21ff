//! In-flight accounting under load: 1,000 mixed requests against both simulators, a quarter
//! of the clients hanging up mid-stream. Every count must return to 0 and every total must
//! be exact; the simulators must see the abandoned generations cancelled.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full};
use llm_warden_sim::lmstudio::LmStudioConfig;
use llm_warden_sim::ollama::OllamaConfig;

#[derive(Clone, Copy, Debug)]
struct Kind {
    provider: usize,
    path: &'static str,
    body: &'static str,
    model: &'static str,
    streams: bool,
}

const KINDS: [Kind; 8] = [
    Kind {
        provider: 0,
        path: "/api/chat",
        body: r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        model: "llama3.2:latest",
        streams: true,
    },
    Kind {
        provider: 0,
        path: "/api/generate",
        body: r#"{"model":"llama3.2","prompt":"hi","stream":false}"#,
        model: "llama3.2:latest",
        streams: false,
    },
    Kind {
        provider: 0,
        path: "/api/embed",
        body: r#"{"model":"nomic-embed-text","input":"hi"}"#,
        model: "nomic-embed-text:latest",
        streams: false,
    },
    Kind {
        provider: 0,
        path: "/v1/chat/completions",
        body: r#"{"model":"qwen2.5:7b","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        model: "qwen2.5:7b",
        streams: true,
    },
    Kind {
        provider: 1,
        path: "/v1/chat/completions",
        body: r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        model: "qwen2.5-7b-instruct",
        streams: true,
    },
    Kind {
        provider: 1,
        path: "/api/v0/chat/completions",
        body: r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}]}"#,
        model: "qwen2.5-7b-instruct",
        streams: false,
    },
    Kind {
        provider: 1,
        path: "/api/v1/chat",
        body: r#"{"model":"qwen2.5-7b-instruct","input":"hi","stream":true}"#,
        model: "qwen2.5-7b-instruct",
        streams: true,
    },
    Kind {
        provider: 1,
        path: "/v1/embeddings",
        body: r#"{"model":"text-embedding-nomic-embed-text-v1.5","input":"hi"}"#,
        model: "text-embedding-nomic-embed-text-v1.5",
        streams: false,
    },
];

const REQUESTS: usize = 1000;
const CONCURRENCY: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_return_to_zero_and_totals_are_exact_under_mixed_load() {
    // Streams take ~16 x 2 ms, long enough for a hang-up to land mid-stream.
    let ollama = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(2),
        reply_tokens: 16,
        ..Default::default()
    })
    .await;
    let lmstudio = start_lmstudio(LmStudioConfig {
        token_delay: Duration::from_millis(2),
        reply_tokens: 16,
        auto_evict: false,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        "",
    )
    .await;
    let urls = [
        format!("http://{}", proxy.proxy_addr(0)),
        format!("http://{}", proxy.proxy_addr(1)),
    ];

    // Request i is of kind i % 8; every 4th request (kinds 0 and 4, both streams) hangs up
    // after its first frame.
    let plan: Vec<(Kind, bool)> = (0..REQUESTS)
        .map(|i| (KINDS[i % KINDS.len()], i % 4 == 0))
        .collect();
    assert!(plan.iter().all(|(k, h)| k.streams || !h));
    let hangups = plan.iter().filter(|(_, h)| *h).count();
    assert_eq!(hangups, REQUESTS / 4, "a quarter of the clients hang up");

    let c = client();
    let results: Vec<Result<(), String>> = futures_util::stream::iter(plan.iter().copied())
        .map(|(k, hang_up)| {
            let c = c.clone();
            let url = format!("{}{}", urls[k.provider], k.path);
            async move {
                let req = Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(k.body.as_bytes())))
                    .map_err(|e| e.to_string())?;
                let resp = c.request(req).await.map_err(|e| format!("{url}: {e}"))?;
                if resp.status() != 200 {
                    return Err(format!("{url}: status {}", resp.status()));
                }
                let mut body = resp.into_body();
                if hang_up {
                    // One frame, then the client goes away (the connection is closed).
                    body.frame()
                        .await
                        .ok_or("no first frame")?
                        .map_err(|e| e.to_string())?;
                    return Ok(());
                }
                body.collect().await.map_err(|e| format!("{url}: {e}"))?;
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );

    // A hang-up reaches the proxy when it next writes to the closed connection, shortly
    // after the client dropped it.
    let settled = eventually(Duration::from_secs(10), || async {
        status(&c, &proxy).await["models"]
            .as_array()
            .is_some_and(|ms| ms.iter().all(|m| m["active_requests"] == 0))
    })
    .await;
    let s = status(&c, &proxy).await;
    assert!(settled, "requests still in flight: {s}");

    let mut expected: std::collections::BTreeMap<(usize, &str), (u64, u64)> = Default::default();
    for (k, hang_up) in &plan {
        let e = expected.entry((k.provider, k.model)).or_default();
        e.0 += 1;
        e.1 += u64::from(*hang_up);
    }
    let mut cancelled_total = 0;
    for ((provider, model), (total, hangups)) in &expected {
        let m = model_entry(&s, ["ollama0", "lmstudio1"][*provider], model);
        assert_eq!(m["total_requests"], *total, "{m}");
        assert_eq!(m["errors"], 0, "{m}");
        assert_eq!(m["active_requests"], 0, "{m}");
        let cancelled = m["cancelled"].as_u64().unwrap();
        // A client may hang up after the proxy wrote the last frame: then the request was
        // complete, and counts as such. It can never be more than the hang-ups.
        assert!(cancelled <= *hangups, "{m}");
        cancelled_total += cancelled;
        assert!(m["prompt_tokens"].as_u64().unwrap() > 0, "{m}");
    }
    assert!(
        cancelled_total * 10 >= hangups as u64 * 9,
        "most hang-ups land mid-stream: {cancelled_total} of {hangups}"
    );
    // The simulators saw their generations abandoned, and nothing is left running there.
    assert!(
        eventually(Duration::from_secs(10), || async {
            ollama.state.active_requests() == 0 && lmstudio.state.active_requests() == 0
        })
        .await
    );
    // The simulators notice a closed connection at their next write: wait for that too.
    assert!(
        eventually(Duration::from_secs(10), || async {
            ollama.state.cancelled() + lmstudio.state.cancelled() >= cancelled_total as usize
        })
        .await,
        "every request the proxy saw cancelled was dropped upstream: {} + {} < {cancelled_total}",
        ollama.state.cancelled(),
        lmstudio.state.cancelled()
    );
    proxy.shutdown().await;
}
