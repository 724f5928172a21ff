//! The staged response to memory pressure, end to end: the proxy's resource probe reports
//! numbers the test sets, and the proxy compacts earlier at warning, unloads the least
//! recently used idle model at critical, and every idle unpinned model when it stays
//! critical; pinned and busy models stay; `action` bounds the stages.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use llm_warden::app::{self, Probes, Running};
use llm_warden::lifecycle::SystemMemory;
use llm_warden::monitor::{ResourceProbe, Sample};
use llm_warden_sim::ollama::OllamaConfig;
use serde_json::Value;

const GB: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(10);

/// A machine of 64 GB whose free memory the test sets.
#[derive(Clone)]
struct Machine(Arc<Mutex<f64>>);

impl Machine {
    fn set_pressure(&self, p: f64) {
        *self.0.lock().unwrap() = p;
    }
}

impl ResourceProbe for Machine {
    fn sample(&mut self) -> Sample {
        let p = *self.0.lock().unwrap();
        Sample {
            total_memory: 64 * GB,
            available_memory: ((1.0 - p) * (64 * GB) as f64) as u64,
            cpu_usage: 5.0,
            cores: 2,
            gpus: Vec::new(),
        }
    }
}

async fn start(sim_url: &str, extra: &str) -> (Running, Machine) {
    start_kind("ollama", sim_url, extra).await
}

/// As [`start`], with a provider of `kind` named `<kind>0`.
async fn start_kind(kind: &str, sim_url: &str, extra: &str) -> (Running, Machine) {
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nname = \"{kind}0\"\nkind = \"{kind}\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{sim_url}\"\n\
         [memory_pressure]\nsample_interval = \"50ms\"\n{extra}\n\
         [models.\"qwen2.5:7b\"]\npinned = true\n"
    );
    let machine = Machine(Arc::new(Mutex::new(0.3)));
    let probes = Probes {
        memory: Some(Arc::new(SystemMemory::new())),
        resources: Box::new(machine.clone()),
    };
    let proxy = app::start_with(llm_warden::config::load_str(&toml).unwrap(), probes)
        .await
        .unwrap();
    (proxy, machine)
}

async fn load(c: &TestClient, proxy: &Running, model: &str) {
    let r = send(
        c,
        http::Method::POST,
        &format!("http://{}/models/ollama0/{model}/load", proxy.admin_addr),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

fn actions(s: &Value) -> Vec<String> {
    s["pressure_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

async fn until(c: &TestClient, proxy: &Running, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let f = &f;
    let found = poll(LIMIT, || async move {
        let s = status(c, proxy).await;
        f(&s).then_some(s)
    })
    .await;
    match found {
        Some(s) => s,
        None => panic!(
            "{what}: {}",
            serde_json::to_string_pretty(&status(c, proxy).await).unwrap()
        ),
    }
}

#[tokio::test]
async fn pressure_compresses_then_unloads_lru_then_every_idle_model_but_never_pinned_or_busy() {
    let sim = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let (proxy, machine) = start(&sim.url(), "").await;
    let c = client();
    // Loaded in this order: llama (least recently used), qwen (pinned), nomic.
    for m in ["llama3.2", "qwen2.5:7b", "nomic-embed-text"] {
        load(&c, &proxy, m).await;
    }
    let s = until(&c, &proxy, "a first sample", |s| {
        s["system"]["total_memory_mb"] == 65536
    })
    .await;
    assert_eq!(s["system"]["pressure_level"], "normal");

    machine.set_pressure(0.75);
    until(&c, &proxy, "warning compresses", |s| {
        s["system"]["pressure_level"] == "warning" && actions(s) == ["compress on"]
    })
    .await;

    // A long stream keeps llama busy (and makes it the most recently used).
    let streaming = spawn_chat(&c, format!("http://{}/api/chat", proxy.proxy_addr(0)));
    assert!(eventually(LIMIT, || async { sim.state.active_requests() == 1 }).await);

    machine.set_pressure(0.95);
    let s = until(&c, &proxy, "critical unloads, then caches", |s| {
        let a = actions(s);
        a.len() >= 2 && a[1] == "unload"
    })
    .await;
    let unloaded: Vec<&str> = s["pressure_events"][1]["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(
        unloaded,
        ["ollama0/nomic-embed-text:latest"],
        "the LRU idle one (llama is busy, qwen pinned)"
    );
    let stream = streaming.await.unwrap();
    assert!(
        stream.text().contains("\"done\":true"),
        "the busy model finished its stream"
    );
    // Still critical: llama, idle now, goes too; qwen is pinned.
    until(&c, &proxy, "cache", |s| {
        actions(s).iter().any(|a| a == "cache")
    })
    .await;
    assert!(
        eventually(LIMIT, || async { sim.state.loaded() == ["qwen2.5:7b"] }).await,
        "{:?}",
        sim.state.loaded()
    );
    assert_eq!(sim.state.unloads_while_busy(), 0);

    machine.set_pressure(0.4);
    let s = until(&c, &proxy, "back to normal", |s| {
        s["system"]["pressure_level"] == "normal"
            && actions(s).last().map(String::as_str) == Some("compress off")
    })
    .await;
    assert!(
        s["system"]["peak_memory_mb"].as_u64().unwrap() >= 62259,
        "peak kept: {}",
        s["system"]
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn action_compress_never_unloads() {
    let sim = start_ollama(Default::default()).await;
    let (proxy, machine) = start(&sim.url(), "action = \"compress\"\n").await;
    let c = client();
    load(&c, &proxy, "llama3.2").await;
    machine.set_pressure(0.97);
    until(&c, &proxy, "critical", |s| {
        s["system"]["pressure_level"] == "critical"
    })
    .await;
    // Five more samples at critical: still only the compress step.
    let mut seen = String::new();
    for _ in 0..5 {
        let s = until(&c, &proxy, "a later sample", |s| {
            s["system"]["sampled_at"].as_str() != Some(seen.as_str())
        })
        .await;
        seen = s["system"]["sampled_at"].as_str().unwrap().to_string();
        assert_eq!(actions(&s), ["compress on"]);
    }
    assert_eq!(sim.state.loaded(), ["llama3.2:latest"]);
    proxy.shutdown().await;
}

/// The `x-llm-warden-*` header `name` of a reply, if set.
fn header(r: &Reply, name: &str) -> Option<String> {
    r.headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn loads_under_pressure_get_smaller_runners_that_later_requests_keep() {
    let sim = start_ollama(Default::default()).await;
    let (proxy, machine) = start(&sim.url(), "[buffers.context]\ninitial = 2048\n").await;
    let c = client();
    let chat = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let generate = format!("http://{}/api/generate", proxy.proxy_addr(0));
    let hello = |model: &str| {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":false}}"#
        )
    };

    // Normal: nothing is rewritten; the model loads at Ollama's default.
    let r = post_json(&c, &chat, &hello("llama3.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "x-llm-warden-num-ctx"), None);
    assert_eq!(sim.state.loaded_num_ctx("llama3.2"), Some(4096));
    let r = post_json(
        &c,
        &format!("http://{}/models/ollama0/llama3.2/unload", proxy.admin_addr),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Warning: a new load gets num_ctx = buffers.context.initial, and so does every native
    // request for it after, so Ollama never reloads it.
    machine.set_pressure(0.75);
    until(&c, &proxy, "warning", |s| {
        s["system"]["pressure_level"] == "warning"
    })
    .await;
    let r = post_json(&c, &chat, &hello("llama3.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r, "x-llm-warden-num-ctx").as_deref(),
        Some("default->2048")
    );
    assert_eq!(sim.state.loaded_num_ctx("llama3.2"), Some(2048));
    let loads = sim.state.load_count("llama3.2");
    let r = post_json(
        &c,
        &generate,
        r#"{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_ctx":8192,"temperature":0}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r, "x-llm-warden-num-ctx").as_deref(),
        Some("8192->2048")
    );
    // Back to normal: the runner is still the small one, and requests still keep it.
    machine.set_pressure(0.3);
    until(&c, &proxy, "normal", |s| {
        s["system"]["pressure_level"] == "normal"
    })
    .await;
    let r = post_json(&c, &chat, &hello("llama3.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r, "x-llm-warden-num-ctx").as_deref(),
        Some("default->2048")
    );
    assert_eq!(sim.state.load_count("llama3.2"), loads, "never reloaded");
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(m["context_length"], 2048, "{m}");

    // Critical: half the context, and num_batch from buffers.working.initial (256 MB) and the
    // model's geometry (/api/show: 3584 wide, no vocab_size, so 128 Ki assumed): 4 × (3584 +
    // 131072) B = 526 KiB a token, 498 tokens fit, so 256.
    machine.set_pressure(0.95);
    until(&c, &proxy, "critical", |s| {
        s["system"]["pressure_level"] == "critical"
    })
    .await;
    let r = post_json(&c, &chat, &hello("qwen2.5:7b")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r, "x-llm-warden-num-ctx").as_deref(),
        Some("default->1024")
    );
    assert_eq!(
        header(&r, "x-llm-warden-num-batch").as_deref(),
        Some("default->256")
    );
    assert_eq!(sim.state.loaded_num_ctx("qwen2.5:7b"), Some(1024));
    assert_eq!(sim.state.loaded_num_batch("qwen2.5:7b"), Some(256));
    let loads = sim.state.load_count("qwen2.5:7b");
    let r = post_json(&c, &chat, &hello("qwen2.5:7b")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sim.state.load_count("qwen2.5:7b"),
        loads,
        "kept, not reloaded"
    );
    proxy.shutdown().await;
}

/// Critical pressure without its unloads (`action = "compress"`: the runner caps still apply,
/// by level), so that an idle model stays loaded between a test's requests, and
/// `buffers.context.initial` = 1024 (critical: 512). Appended inside `[memory_pressure]`.
const COMPRESS_ONLY: &str = "action = \"compress\"\n[buffers.context]\ninitial = 1024\n";

/// Issue 19: at critical the runner gets half of `buffers.context.initial` (512 here), which a
/// 150-word chat asking for a 150-token reply does not fit even compacted (nothing older to
/// summarize). It is served, at the least context that holds it, and the answer says which;
/// a runner already loaded at 512 is reloaded at that size once it is idle.
#[tokio::test]
async fn at_critical_a_request_the_small_context_cannot_hold_gets_a_larger_one() {
    let sim = start_ollama(Default::default()).await;
    let (proxy, machine) = start(&sim.url(), COMPRESS_ONLY).await;
    let c = client();
    let chat = format!("http://{}/api/chat", proxy.proxy_addr(0));
    machine.set_pressure(0.95);
    until(&c, &proxy, "critical", |s| {
        s["system"]["pressure_level"] == "critical"
    })
    .await;
    let words: Vec<String> = (0..150).map(|i| format!("lorem{i}ipsum")).collect();
    let big = |model: &str| {
        serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": words.join(" ")}],
            "stream": false,
            "options": {"num_predict": 150},
        })
        .to_string()
    };
    let hello = |model: &str| {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":false}}"#
        )
    };

    // Not loaded: loaded at the request's need, not at 512.
    let r = post_json(&c, &chat, &big("llama3.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let chosen = header(&r, "x-llm-warden-context")
        .unwrap_or_else(|| panic!("the context chosen is named: {:?}", r.headers));
    let (from, to) = chosen.split_once("->").expect("<pressure's>-><chosen>");
    assert_eq!(from, "512");
    let to: u32 = to.parse().expect("a number");
    assert!(
        to > 512 && to <= 32768 && to.is_multiple_of(256),
        "{chosen}"
    );
    assert_eq!(
        header(&r, "x-llm-warden-num-ctx"),
        Some(format!("default->{to}"))
    );
    assert_eq!(sim.state.loaded_num_ctx("llama3.2"), Some(to));
    assert_eq!(header(&r, "x-llm-warden-compacted"), None, "sent whole");
    // A small request then keeps that runner.
    let loads = sim.state.load_count("llama3.2");
    let r = post_json(&c, &chat, &hello("llama3.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r, "x-llm-warden-num-ctx"),
        Some(format!("default->{to}"))
    );
    assert_eq!(sim.state.load_count("llama3.2"), loads, "not reloaded");

    // Loaded at 512 by a small request first: the large one reloads it at its need.
    let r = post_json(&c, &chat, &hello("qwen2.5:7b")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.state.loaded_num_ctx("qwen2.5:7b"), Some(512));
    let r = post_json(&c, &chat, &big("qwen2.5:7b")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        header(&r, "x-llm-warden-context"),
        Some(format!("512->{to}"))
    );
    assert_eq!(sim.state.loaded_num_ctx("qwen2.5:7b"), Some(to));
    assert_eq!(sim.state.load_count("qwen2.5:7b"), 2);
    let s = status(&c, &proxy).await;
    let reshaped = s["lifecycle_events"].as_array().unwrap().iter().any(|e| {
        e["model"] == "qwen2.5:7b" && e["reason"].as_str().unwrap().starts_with("reshape")
    });
    assert!(reshaped, "{}", s["lifecycle_events"]);
    proxy.shutdown().await;
}

/// The same on LM Studio, whose context is set by its load API (requests cannot change it)
/// and whose simulator answers an error when a prompt overflows the loaded context: the load
/// the proxy makes to learn the window gets the pressure's 512, and the request that cannot
/// fit it is served after the runner is reloaded at its need.
#[tokio::test]
async fn at_critical_lm_studio_reloads_a_model_too_small_for_the_request() {
    use llm_warden_sim::lmstudio::LmStudioConfig;
    let sim = start_lmstudio(LmStudioConfig::default()).await;
    let (proxy, machine) = start_kind("lmstudio", &sim.url(), COMPRESS_ONLY).await;
    let c = client();
    machine.set_pressure(0.95);
    until(&c, &proxy, "critical", |s| {
        s["system"]["pressure_level"] == "critical"
    })
    .await;
    let words: Vec<String> = (0..150).map(|i| format!("lorem{i}ipsum")).collect();
    let chat = serde_json::json!({
        "model": "qwen2.5-7b-instruct",
        "messages": [{"role": "user", "content": words.join(" ")}],
        "max_tokens": 150,
    })
    .to_string();
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let r = post_json(&c, &url, &chat).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let chosen = header(&r, "x-llm-warden-context").unwrap_or_else(|| panic!("{:?}", r.headers));
    let to: u32 = chosen
        .strip_prefix("512->")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{chosen}"));
    assert!(to > 512, "{chosen}");
    assert_eq!(
        sim.state.loaded_context_length("qwen2.5-7b-instruct"),
        Some(to)
    );
    assert_eq!(
        sim.state.load_count("qwen2.5-7b-instruct"),
        2,
        "loaded at 512 to learn the window, then at the request's need"
    );
    proxy.shutdown().await;
}

/// Issue 20: a `/v1` request cannot carry `num_ctx`, so for a runner the proxy loaded smaller
/// Ollama reloads it at its defaults and with its own keep-alive (5 minutes). The poll sees
/// the deadline in `/api/ps` and the proxy tells Ollama `keep_alive: -1` again, with the
/// runner's options (no second reload): a day later on Ollama's clock the model is loaded.
#[tokio::test]
async fn a_runner_ollama_reloads_for_a_v1_request_is_told_to_stay_loaded() {
    let clock = Clock::fixed();
    let sim = start_ollama(OllamaConfig {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let (proxy, machine) = start(&sim.url(), "[buffers.context]\ninitial = 2048\n").await;
    let c = client();
    machine.set_pressure(0.75);
    until(&c, &proxy, "warning", |s| {
        s["system"]["pressure_level"] == "warning"
    })
    .await;
    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        chat,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.state.loaded_num_ctx("llama3.2"), Some(2048));
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(0)),
        chat,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.state.loaded_num_ctx("llama3.2"), Some(4096), "reloaded");
    let loads = sim.state.load_count("llama3.2");
    let calls = sim.state.log.calls().len();
    // The poll sees the reload and its deadline; the proxy says -1 at the defaults.
    let kept = poll(LIMIT, || async {
        proxy.refresh(0).await;
        sim.state.log.calls()[calls..]
            .iter()
            .find(|c| c.path == "/api/generate")
            .map(|c| c.json())
    })
    .await;
    assert_eq!(
        kept,
        Some(serde_json::json!({"model":"llama3.2:latest","keep_alive":-1,"stream":false}))
    );
    // Ollama's list now says "forever" (Go's now + MaxInt64, three centuries out).
    let ps = format!("{}/api/ps", sim.url());
    let forever = poll(LIMIT, || async {
        let v = get(&c, &ps).await.json();
        let at = v["models"][0]["expires_at"].as_str()?.to_string();
        (at.get(..4)?.parse::<u32>().ok()? > 2200).then_some(at)
    })
    .await;
    assert!(forever.is_some(), "{}", get(&c, &ps).await.text());
    clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(sim.state.loaded(), ["llama3.2:latest"], "a day later");
    proxy.refresh(0).await;
    let told = sim.state.log.calls()[calls..]
        .iter()
        .filter(|c| c.path == "/api/generate")
        .count();
    assert_eq!(told, 1, "told once");
    assert_eq!(sim.state.load_count("llama3.2"), loads, "no second reload");
    proxy.shutdown().await;
}
