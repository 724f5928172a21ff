//! `GET /metrics`: real requests through the proxy to the simulators, then the page parsed
//! strictly (every sample under a `# TYPE`, no series twice) and its numbers checked against
//! what was sent and against `/status`. And the access log: one line per model request with
//! its fields, captured in-process.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::support::*;
use http_body_util::BodyExt;
use llm_warden_sim::ollama::OllamaConfig;
use llm_warden_sim::SimModel;
use serde_json::{json, Value};

// === a strict parser of the Prometheus text format ===

/// One sample: its name and labels, sorted.
type Series = (String, Vec<(String, String)>);

#[derive(Debug, Default)]
struct Page {
    /// Family name -> type.
    types: BTreeMap<String, String>,
    samples: BTreeMap<Series, f64>,
}

impl Page {
    /// Parses the page, panicking on anything malformed: a sample before its family's
    /// `# TYPE`, a label without quotes, a value that is not a number, a series twice.
    fn parse(text: &str) -> Page {
        let mut page = Page::default();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                assert!(
                    page.types.insert(name.into(), kind.into()).is_none(),
                    "family {name} declared twice"
                );
                current = Some((name.into(), kind.into()));
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.is_empty() && !line.starts_with('#'), "line {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').expect("}"))),
                None => (series, Vec::new()),
            };
            let (family, kind) = current.as_ref().expect("a sample before any # TYPE");
            let ok = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{family}{s}")),
                _ => name == family,
            };
            assert!(ok, "sample {name} under family {family}");
            assert!(name.starts_with("llm_warden_"), "{name}");
            let key = (name.to_string(), labels);
            assert!(
                page.samples.insert(key.clone(), value).is_none(),
                "duplicate series {key:?}"
            );
        }
        page
    }

    /// The samples of `name` whose labels include every one of `want`.
    fn matching(&self, name: &str, want: &[(&str, &str)]) -> Vec<(&Vec<(String, String)>, f64)> {
        self.samples
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|((_, l), v)| (l, *v))
            .collect()
    }

    /// The sum of the samples of `name` whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).iter().map(|(_, v)| v).sum()
    }

    /// The one sample of `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        *self
            .samples
            .get(&(name.to_string(), l))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"");
        assert!(
            key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "label name {key:?}"
        );
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("escape").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out.sort();
    out
}

async fn scrape(c: &TestClient, proxy: &llm_warden::app::Running) -> Page {
    let r = get(c, &format!("http://{}/metrics", proxy.admin_addr)).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
    Page::parse(&r.text())
}

// === the access log, captured ===

/// Every log line written while the tests in this file run (JSON, one object a line).
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "llm_warden::access=info",
            ))
            .with_writer(move || Capture(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access log lines captured so far for `model`.
fn access_lines(model: &str) -> Vec<Value> {
    let text = String::from_utf8(captured().lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .filter(|v| v["target"] == "llm_warden::access" && v["model"] == model)
        .collect()
}

// === the tests ===

const CHAT: &str = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_ONCE: &str =
    r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
const V1_CHAT: &str = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;

#[tokio::test]
async fn metrics_count_exactly_what_went_through_the_proxy() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    for _ in 0..3 {
        assert_eq!(
            post_json(&c, &format!("{base}/api/chat"), CHAT)
                .await
                .status,
            200
        );
    }
    for _ in 0..2 {
        let r = post_json(&c, &format!("{base}/api/chat"), CHAT_ONCE).await;
        assert_eq!(r.status, 200);
    }
    let r = post_json(&c, &format!("{base}/v1/chat/completions"), V1_CHAT).await;
    assert_eq!(r.status, 200);
    // A model the provider does not have: its own 404, counted under `_unlisted`.
    let r = post_json(
        &c,
        &format!("{base}/api/chat"),
        r#"{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    // A body over the limit: the proxy's own 413, before any model is known.
    let big = format!(
        r#"{{"model":"llama3.2","prompt":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let big_proxy = start_proxy(
        &[("ollama", sim.url())],
        "[proxy]\nmax_request_body = \"64KiB\"\n",
    )
    .await;
    let r = post_json(
        &c,
        &format!("http://{}/api/generate", big_proxy.proxy_addr(0)),
        &big,
    )
    .await;
    assert_eq!(r.status, 413);

    let page = scrape(&c, &proxy).await;
    let m = [("provider", "ollama0"), ("model", "llama3.2:latest")];
    let requests = "llm_warden_requests_total";
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l = m.to_vec();
        l.extend_from_slice(extra);
        l
    };
    assert_eq!(
        page.get(
            requests,
            &with(&[("endpoint", "api_chat"), ("status", "2xx")])
        ),
        5.0
    );
    assert_eq!(
        page.get(
            requests,
            &with(&[("endpoint", "v1_chat_completions"), ("status", "2xx")])
        ),
        1.0
    );
    assert_eq!(page.sum(requests, &m), 6.0, "nothing else for the model");
    assert_eq!(
        page.get(
            requests,
            &[
                ("provider", "ollama0"),
                ("model", "_unlisted"),
                ("endpoint", "api_chat"),
                ("status", "4xx")
            ]
        ),
        1.0,
        "the unknown model is folded, not given its own series"
    );
    assert!(page
        .matching(requests, &[("model", "no-such-model:latest")])
        .is_empty());
    assert_eq!(
        page.get(
            "llm_warden_errors_total",
            &[("provider", "ollama0"), ("kind", "upstream_status")]
        ),
        1.0
    );

    // Tokens are /status's; nothing is in flight.
    let s = status(&c, &proxy).await;
    let entry = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        page.get("llm_warden_prompt_tokens_total", &m),
        entry["prompt_tokens"].as_u64().unwrap() as f64
    );
    assert_eq!(
        page.get("llm_warden_completion_tokens_total", &m),
        entry["completion_tokens"].as_u64().unwrap() as f64
    );
    assert!(page.get("llm_warden_completion_tokens_total", &m) > 0.0);
    assert_eq!(page.sum("llm_warden_requests_in_flight", &[]), 0.0);
    assert_eq!(page.get("llm_warden_queue_depth", &m), 0.0);

    // Histograms count every request: per endpoint, as many as were sent.
    let p = [("provider", "ollama0")];
    for (endpoint, n) in [("api_chat", 6.0), ("v1_chat_completions", 1.0)] {
        let l = [p[0], ("endpoint", endpoint)];
        assert_eq!(
            page.get("llm_warden_request_duration_seconds_count", &l),
            n,
            "{endpoint}"
        );
        assert_eq!(
            page.get("llm_warden_time_to_first_chunk_seconds_count", &l),
            n,
            "every one got a body from the provider: {endpoint}"
        );
        let mut inf = l.to_vec();
        inf.push(("le", "+Inf"));
        assert_eq!(
            page.get("llm_warden_request_duration_seconds_bucket", &inf),
            n
        );
        assert!(page.get("llm_warden_request_duration_seconds_sum", &l) > 0.0);
    }
    let buckets = page.matching(
        "llm_warden_request_duration_seconds_bucket",
        &[p[0], ("endpoint", "api_chat")],
    );
    let mut counts: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(l, v)| {
            let le = &l.iter().find(|(k, _)| k == "le").unwrap().1;
            (le.parse::<f64>().unwrap_or(f64::INFINITY), *v)
        })
        .collect();
    counts.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        counts.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {counts:?}"
    );

    // The lifecycle: one load, timed; ready.
    assert_eq!(page.get("llm_warden_model_loads_total", &m), 1.0);
    assert_eq!(page.get("llm_warden_model_unloads_total", &m), 0.0);
    assert_eq!(
        page.get("llm_warden_model_load_duration_seconds_count", &m),
        1.0
    );
    assert_eq!(
        page.get("llm_warden_model_state", &with(&[("state", "ready")])),
        1.0
    );
    assert_eq!(page.sum("llm_warden_model_state", &m), 1.0, "one state");
    assert_eq!(page.get("llm_warden_provider_up", &p), 1.0);

    // Memory: the buffers of the loaded model add up to what the poll reported.
    proxy.refresh(0).await;
    let page = scrape(&c, &proxy).await;
    let buffers = page.matching("llm_warden_model_memory_bytes", &m);
    assert_eq!(buffers.len(), 3, "{buffers:?}");
    assert!(
        page.get(
            "llm_warden_model_memory_bytes",
            &with(&[("buffer", "model")])
        ) > 0.0
    );
    assert!(page.get("llm_warden_system_memory_total_bytes", &[]) > 0.0);
    assert_eq!(page.get("llm_warden_memory_pressure_level", &[]), 0.0);

    // The other proxy counted its 413 by kind, and no model request.
    let page = scrape(&c, &big_proxy).await;
    assert_eq!(
        page.get(
            "llm_warden_errors_total",
            &[("provider", "ollama0"), ("kind", "body_too_large")]
        ),
        1.0
    );
    assert_eq!(page.sum("llm_warden_requests_total", &[]), 0.0);

    // Every family is declared, those without samples too.
    for family in [
        "llm_warden_requests_total",
        "llm_warden_requests_in_flight",
        "llm_warden_requests_cancelled_total",
        "llm_warden_queue_depth",
        "llm_warden_errors_total",
        "llm_warden_time_to_first_chunk_seconds",
        "llm_warden_request_duration_seconds",
        "llm_warden_prompt_tokens_total",
        "llm_warden_completion_tokens_total",
        "llm_warden_compactions_total",
        "llm_warden_compaction_tokens_saved_total",
        "llm_warden_compaction_prunes_total",
        "llm_warden_compaction_pruned_tokens_total",
        "llm_warden_model_loads_total",
        "llm_warden_model_unloads_total",
        "llm_warden_model_load_duration_seconds",
        "llm_warden_model_state",
        "llm_warden_model_memory_bytes",
        "llm_warden_system_memory_total_bytes",
        "llm_warden_system_memory_used_bytes",
        "llm_warden_gpu_memory_total_bytes",
        "llm_warden_gpu_memory_used_bytes",
        "llm_warden_memory_pressure_level",
        "llm_warden_memory_pressure_ratio",
        "llm_warden_pressure_actions_total",
        "llm_warden_provider_up",
    ] {
        assert!(page.types.contains_key(family), "no # TYPE for {family}");
    }
    big_proxy.shutdown().await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_counted_cancelled_and_logged_once() {
    captured();
    let sim = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(50),
        reply_tokens: 40,
        models: vec![SimModel::chat("cancel-me:latest", 1 << 30, 8192)],
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let body = r#"{"model":"cancel-me","messages":[{"role":"user","content":"hi"}]}"#;
    let req = http::Request::post(&url)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut b = resp.into_body();
    let first = b.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(b);
    let m = [("provider", "ollama0"), ("model", "cancel-me:latest")];
    assert!(
        eventually(Duration::from_secs(5), || async {
            scrape(&c, &proxy)
                .await
                .sum("llm_warden_requests_cancelled_total", &m)
                == 1.0
        })
        .await
    );
    let page = scrape(&c, &proxy).await;
    assert_eq!(
        page.get(
            "llm_warden_requests_total",
            &[m[0], m[1], ("endpoint", "api_chat"), ("status", "2xx")]
        ),
        1.0,
        "the status was sent before the client left"
    );
    assert_eq!(page.sum("llm_warden_requests_in_flight", &m), 0.0);
    // The proxy counts the request before it writes its access line (both when the body is
    // dropped, on the proxy's own thread): wait for the line too.
    assert!(
        eventually(Duration::from_secs(5), || async {
            !access_lines("cancel-me:latest").is_empty()
        })
        .await,
        "no access line"
    );
    let lines = access_lines("cancel-me:latest");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["cancelled"], true, "{}", lines[0]);
    assert_eq!(lines[0]["status"], 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn each_model_request_writes_one_access_line_with_its_fields() {
    captured();
    let sim = start_ollama(OllamaConfig {
        load_latency: Duration::from_millis(30),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let body = r#"{"model":"qwen2.5:7b","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post_json(&c, &url, body).await;
    assert_eq!(r.status, 200);
    let r = post_json(&c, &url, &body.replace("qwen2.5:7b", "absent-model")).await;
    assert_eq!(r.status, 404);
    // Not a model request: no line.
    get(&c, &format!("http://{}/api/tags", proxy.proxy_addr(0))).await;

    let lines = access_lines("qwen2.5:7b");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(
        (
            &l["level"],
            &l["provider"],
            &l["endpoint"],
            &l["status"],
            &l["cancelled"]
        ),
        (
            &json!("INFO"),
            &json!("ollama0"),
            &json!("api_chat"),
            &json!(200),
            &json!(false)
        ),
        "{l}"
    );
    let s = status(&c, &proxy).await;
    let e = model_entry(&s, "ollama0", "qwen2.5:7b");
    assert_eq!(l["prompt_tokens"], e["prompt_tokens"], "{l}");
    assert_eq!(l["completion_tokens"], e["completion_tokens"], "{l}");
    let (ttfb, total, queue) = (
        l["ttfb_ms"].as_f64().unwrap(),
        l["total_ms"].as_f64().unwrap(),
        l["queue_ms"].as_f64().unwrap(),
    );
    assert!(queue >= 30.0, "the load was waited for: {l}");
    assert!(queue <= ttfb && ttfb <= total, "{l}");
    assert!(
        l.get("compacted").is_none() && l.get("error").is_none(),
        "{l}"
    );

    let lines = access_lines("absent-model:latest");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        (&lines[0]["status"], &lines[0]["error"]),
        (&json!(404), &json!("upstream_status"))
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn compactions_and_the_tokens_they_saved_are_counted() {
    captured();
    let sim = start_ollama(OllamaConfig {
        default_num_ctx: 4096,
        fixed_reply: Some("SUMMARY: the user and the assistant talked.".into()),
        models: vec![SimModel::chat("compact-me:latest", 1 << 30, 131_072)],
        ..Default::default()
    })
    .await;
    let cache = std::env::temp_dir().join(format!("llm-warden-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let proxy = start_proxy(
        &[("ollama", sim.url())],
        &format!(
            "[compaction]\ncache_dir = \"{}\"\nreply_reserve = 256\n",
            cache.display()
        ),
    )
    .await;
    let c = client();
    let mut messages = vec![json!({"role": "system", "content": "Be brief."})];
    for i in 0..41 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let filler = "the quick brown fox jumps over the lazy dog while it rains ".repeat(7);
        messages.push(json!({"role": role, "content": format!("turn {i}: {filler}")}));
    }
    let body = json!({"model": "compact-me", "messages": messages, "stream": false}).to_string();
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let header = r.headers["x-llm-warden-compacted"].to_str().unwrap();
    let (before, after) = header.split_once("->").unwrap();
    let saved = before.parse::<f64>().unwrap() - after.parse::<f64>().unwrap();

    let page = scrape(&c, &proxy).await;
    let m = [("provider", "ollama0"), ("model", "compact-me:latest")];
    assert_eq!(page.get("llm_warden_compactions_total", &m), 1.0);
    assert_eq!(
        page.get("llm_warden_compaction_tokens_saved_total", &m),
        saved
    );
    let lines = access_lines("compact-me:latest");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["compacted"], header, "{}", lines[0]);
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}
