//! Soak: the proxy in front of all three simulators under a random workload for a while, with
//! small limits (models swap all the time), a quarter of the clients leaving mid-stream, idle
//! gaps long enough for idle unloads, and memory pressure injected (normal → warning →
//! critical → normal, over and over). At the end, with everything quiet, the invariants:
//!
//! - every in-flight count is 0, and each model's total equals the requests the clients sent;
//! - no unload reached a simulator while it had a request in flight (each simulator counts);
//! - every request got a success or a well-formed error, none hung (30 s bound), none empty;
//! - the process's memory is stable (RSS at the end vs after warm-up: reported, and bounded).
//!
//! `cargo test --test soak` runs it for 30 s; `LLM_WARDEN_SOAK_SECS=600 cargo test --release
//! --test soak -- --nocapture` for the report. The numbers are printed either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use llm_warden::app::{self, Probes};
use llm_warden::lifecycle::SystemMemory;
use llm_warden::monitor::{ResourceProbe, Sample};
use llm_warden_sim::llamacpp::LlamaCppConfig;
use llm_warden_sim::lmstudio::LmStudioConfig;
use llm_warden_sim::ollama::OllamaConfig;
use serde_json::{json, Value};

const GB: u64 = 1 << 30;
const CLIENTS: usize = 24;
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// A 64 GB machine whose pressure cycles through the levels.
#[derive(Clone)]
struct Cycling(Arc<AtomicU64>);

impl ResourceProbe for Cycling {
    fn sample(&mut self) -> Sample {
        // One step a sample: 10 normal, 5 warning, 5 critical.
        let n = self.0.fetch_add(1, Relaxed) % 20;
        let p = match n {
            0..=9 => 0.3,
            10..=14 => 0.8,
            _ => 0.95,
        };
        Sample {
            total_memory: 64 * GB,
            available_memory: ((1.0 - p) * (64 * GB) as f64) as u64,
            cpu_usage: 5.0,
            cores: 2,
            gpus: Vec::new(),
        }
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A tiny deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one request looked like, for the tallies.
#[derive(Default)]
struct Tally {
    sent: HashMap<(String, String), u64>,
    ok: u64,
    errors: HashMap<u16, u64>,
    left_mid_stream: u64,
    hung: u64,
    empty: u64,
    malformed: Vec<String>,
}

struct Target {
    provider: &'static str,
    index: usize,
    /// (name in the request, name /status uses)
    models: &'static [(&'static str, &'static str)],
}

const TARGETS: [Target; 3] = [
    Target {
        provider: "ollama",
        index: 0,
        models: &[
            ("llama3.2", "llama3.2:latest"),
            ("qwen2.5:7b", "qwen2.5:7b"),
            ("nomic-embed-text", "nomic-embed-text:latest"),
        ],
    },
    Target {
        provider: "lmstudio",
        index: 1,
        models: &[
            ("qwen2.5-7b-instruct", "qwen2.5-7b-instruct"),
            ("llama-3.2-3b-instruct", "llama-3.2-3b-instruct"),
        ],
    },
    Target {
        provider: "llamacpp",
        index: 2,
        models: &[
            ("qwen2.5-7b-instruct-q4_k_m", "qwen2.5-7b-instruct-q4_k_m"),
            (
                "llama-3.2-3b-instruct-q4_k_m",
                "llama-3.2-3b-instruct-q4_k_m",
            ),
        ],
    },
];

/// One request: path, body, streamed, the error style expected.
fn request(rng: &mut Rng, t: &Target, model: &str) -> (String, String, bool) {
    let stream = rng.below(2) == 0;
    let text = format!("question {} about the weather", rng.below(1000));
    let embed = model.contains("embed");
    match t.provider {
        "ollama" if embed => (
            "/api/embed".into(),
            json!({"model": model, "input": [text]}).to_string(),
            false,
        ),
        "ollama" if rng.below(2) == 0 => (
            "/api/chat".into(),
            json!({"model": model, "messages": [{"role": "user", "content": text}], "stream": stream})
                .to_string(),
            stream,
        ),
        _ => (
            "/v1/chat/completions".into(),
            json!({"model": model, "messages": [{"role": "user", "content": text}], "stream": stream, "max_tokens": 8})
                .to_string(),
            stream,
        ),
    }
}

/// Whether `body` is a well-formed error in one of the clients' formats.
fn well_formed_error(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    match &v["error"] {
        Value::String(s) => !s.is_empty(),
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty()),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_invariants_hold_under_a_random_workload() {
    let secs: u64 = std::env::var("LLM_WARDEN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let delay = Duration::from_millis(2);
    let ollama = start_ollama(OllamaConfig {
        token_delay: delay,
        load_latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let lmstudio = start_lmstudio(LmStudioConfig {
        token_delay: delay,
        load_latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let llamacpp = llm_warden_sim::llamacpp::spawn(
        LlamaCppConfig {
            token_delay: delay,
            load_latency: Duration::from_millis(20),
            models_max: 0,
            parallel: 4,
            ..Default::default()
        },
        listener().await,
    );
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[providers]]\nname = \"ollama\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npoll_interval = \"300ms\"\n\
         [[providers]]\nname = \"lmstudio\"\nkind = \"lmstudio\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npoll_interval = \"300ms\"\n\
         [[providers]]\nname = \"llamacpp\"\nkind = \"llamacpp\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npoll_interval = \"300ms\"\n\
         [limits]\nmax_models_loaded = 1\ninactivity_timeout = \"700ms\"\n\
         [queue]\ntimeout = \"20s\"\n\
         [memory_pressure]\nsample_interval = \"250ms\"\n",
        ollama.url(),
        lmstudio.url(),
        llamacpp.url()
    );
    let probes = Probes {
        memory: Some(Arc::new(SystemMemory::new())),
        resources: Box::new(Cycling(Arc::new(AtomicU64::new(0)))),
    };
    let proxy = app::start_with(llm_warden::config::load_str(&toml).unwrap(), probes)
        .await
        .unwrap();
    let bases: Vec<String> = (0..3)
        .map(|i| format!("http://{}", proxy.proxy_addr(i)))
        .collect();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let warm_rss = Arc::new(AtomicU64::new(0));

    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let (bases, tally, warm_rss) = (bases.clone(), tally.clone(), warm_rss.clone());
        let c = client();
        clients.push(tokio::spawn(async move {
            let mut rng =
                Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            while Instant::now() < deadline {
                if id == 0
                    && warm_rss.load(Relaxed) == 0
                    && started.elapsed() > Duration::from_secs(secs / 4)
                {
                    warm_rss.store(rss_kb(), Relaxed);
                }
                let t = &TARGETS[rng.below(3) as usize];
                let (name, counted) = t.models[rng.below(t.models.len() as u64) as usize];
                let (path, body, stream) = request(&mut rng, t, name);
                let leave = stream && rng.below(4) == 0;
                let req = Request::post(format!("{}{path}", bases[t.index]))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                *tally
                    .lock()
                    .unwrap()
                    .sent
                    .entry((t.provider.to_string(), counted.to_string()))
                    .or_default() += 1;
                let outcome = tokio::time::timeout(REQUEST_LIMIT, async {
                    let resp = c.request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    let mut bytes = Vec::new();
                    while let Some(frame) = body.frame().await {
                        let frame = frame.map_err(|e| e.to_string())?;
                        if let Ok(d) = frame.into_data() {
                            bytes.extend_from_slice(&d);
                            if leave && status == 200 {
                                return Ok((status, bytes, true));
                            }
                        }
                    }
                    Ok::<_, String>((status, bytes, false))
                })
                .await;
                {
                    let mut t = tally.lock().unwrap();
                    match outcome {
                        Err(_) => t.hung += 1,
                        Ok(Err(e)) => t.malformed.push(format!("transport: {e}")),
                        Ok(Ok((_, _, true))) => t.left_mid_stream += 1,
                        Ok(Ok((status, bytes, false))) => {
                            if bytes.is_empty() {
                                t.empty += 1;
                            } else if status == 200 {
                                t.ok += 1;
                            } else if well_formed_error(&bytes) {
                                *t.errors.entry(status).or_default() += 1;
                            } else {
                                t.malformed
                                    .push(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
                            }
                        }
                    }
                }
                // Now and then an idle gap long enough for idle unloads.
                let gap = if rng.below(50) == 0 {
                    800
                } else {
                    rng.below(20)
                };
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let end_rss = rss_kb();
    let c = client();
    // Quiet: every guard settles (a client that left is noticed when its connection closes).
    let settled = eventually(Duration::from_secs(20), || async {
        status(&c, &proxy).await["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["active_requests"] == 0 && m["queue_depth"].as_u64().unwrap_or(0) == 0)
    })
    .await;
    let s = status(&c, &proxy).await;
    let t = std::mem::take(&mut *tally.lock().unwrap());
    let sent: u64 = t.sent.values().sum();
    let busy = [
        ollama.state.unloads_while_busy(),
        lmstudio.state.unloads_while_busy(),
        llamacpp.state.unloads_while_busy(),
    ];
    let unloads: u64 = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["unloads"].as_u64().unwrap_or(0))
        .sum();
    let pressure_actions = s["pressure_events"].as_array().map_or(0, Vec::len);
    let warm = warm_rss.load(Relaxed);
    println!(
        "soak {secs}s: {sent} requests ({:.0}/s) from {CLIENTS} clients: {} ok, {} left mid-stream, errors {:?}, \
         {} hung, {} empty, {} malformed; {unloads} unloads, {pressure_actions} pressure events; \
         unloads while busy {busy:?}; RSS {warm} kB after warm-up, {end_rss} kB at the end",
        sent as f64 / secs as f64,
        t.ok,
        t.left_mid_stream,
        t.errors,
        t.hung,
        t.empty,
        t.malformed.len()
    );
    assert!(settled, "in-flight counts did not return to 0: {s}");
    for ((provider, model), n) in &t.sent {
        let m = model_entry(&s, provider, model);
        assert_eq!(
            m["total_requests"].as_u64(),
            Some(*n),
            "{provider}/{model}: {m}"
        );
        assert_eq!(m["active_requests"], 0, "{provider}/{model}: {m}");
    }
    assert_eq!(busy, [0, 0, 0], "unloads reached a busy simulator");
    assert_eq!(t.hung, 0, "requests hung");
    assert_eq!(t.empty, 0, "empty answers");
    assert!(
        t.malformed.is_empty(),
        "{:?}",
        &t.malformed[..t.malformed.len().min(5)]
    );
    assert!(t.ok > sent / 2, "most requests succeed: {} of {sent}", t.ok);
    assert!(unloads > 0, "the workload made the proxy unload models");
    assert!(pressure_actions > 0, "pressure was injected");
    // Memory: bounded growth after warm-up (the test process holds the simulators too).
    assert!(
        end_rss <= warm + warm / 2 + 32 * 1024,
        "RSS grew from {warm} kB to {end_rss} kB"
    );
    proxy.shutdown().await;
}
