//! The official Python clients (`ollama`, `openai`) against both simulators, through the
//! proxy: `cli/tests/python/clients.py` does the talking and asserts what the clients see; this
//! test checks that the proxy counted exactly what the script sent. The official `lmstudio` SDK
//! (`cli/tests/python/lmstudio_sdk.py`) runs against the LM Studio simulator's WebSocket
//! protocol: directly, with an API token, and through a proxy without and with `api_keys`. The
//! `anthropic` client also reads a reply whose over-window request the proxy compacted
//! (`cli/tests/python/compacted_messages.py`).
//!
//! The interpreter is `$LLM_WARDEN_PYTHON` when set, else `<repo>/.venv/bin/python`, which this
//! test creates from `cli/tests/python/requirements.txt` when it is missing or stale (needs
//! `python3` and PyPI). `.ci/python-env.sh` makes the same venv ahead of time.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::support::*;
use llm_warden_sim::lmstudio::LmStudioConfig;
use llm_warden_sim::ollama::OllamaConfig;

/// Environment variables that would send the clients' requests somewhere else.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "OLLAMA_HOST",
    "OPENAI_BASE_URL",
];

/// Requests the script sends, per (provider, model as `/status` names it, the names the
/// requests used). Ollama names are shown with their tag (`:latest` when none is given), so
/// `nomic-embed-text` and `nomic-embed-text:latest` are one model.
const EXPECTED_REQUESTS: &[(&str, &str, u64, &[&str])] = &[
    // ollama client: chat, chat streamed, generate.
    ("ollama0", "llama3.2:latest", 3, &["llama3.2"]),
    // openai client on Ollama's /v1: chat, streamed with and without usage.
    ("ollama0", "qwen2.5:7b", 3, &["qwen2.5:7b"]),
    // embed from the ollama client and embeddings from the openai client.
    (
        "ollama0",
        "nomic-embed-text:latest",
        2,
        &["nomic-embed-text", "nomic-embed-text:latest"],
    ),
    // openai client on LM Studio's /v1: the same.
    (
        "lmstudio1",
        "qwen2.5-7b-instruct",
        3,
        &["qwen2.5-7b-instruct"],
    ),
    (
        "lmstudio1",
        "text-embedding-nomic-embed-text-v1.5",
        1,
        &["text-embedding-nomic-embed-text-v1.5"],
    ),
];

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(45);

#[tokio::test]
async fn official_python_clients_through_the_proxy() {
    let python = tokio::task::spawn_blocking(python)
        .await
        .expect("venv setup did not panic");

    let token_delay = Duration::from_millis(1);
    let ollama = start_ollama(OllamaConfig {
        token_delay,
        ..Default::default()
    })
    .await;
    let lmstudio = start_lmstudio(LmStudioConfig {
        token_delay,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        "",
    )
    .await;
    let ollama_url = format!("http://{}", proxy.proxy_addr(0));
    let lmstudio_url = format!("http://{}", proxy.proxy_addr(1));

    let report_path = std::env::temp_dir().join(format!(
        "llm-warden-python-clients-{}-{}.json",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let mut cmd = Command::new(&python);
    cmd.arg(repo().join("cli/tests/python/clients.py"))
        .env("WARDEN_OLLAMA_URL", &ollama_url)
        .env("WARDEN_LMSTUDIO_URL", &lmstudio_url)
        .env("WARDEN_PY_REPORT", &report_path)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    let started = Instant::now();
    // The proxy and the simulators run on this runtime; the script waits on another thread.
    let out = tokio::task::spawn_blocking(move || output_within(cmd, SCRIPT_TIMEOUT))
        .await
        .expect("the script runner did not panic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("clients.py ({:.1?}):\n{stdout}{stderr}", started.elapsed());
    assert!(
        out.status.success(),
        "clients.py failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("checks passed"),
        "no summary line from clients.py:\n{stdout}"
    );

    let report: serde_json::Value = serde_json::from_slice(
        &fs::read(&report_path).unwrap_or_else(|e| panic!("{}: {e}", report_path.display())),
    )
    .expect("the report is JSON");
    let _ = fs::remove_file(&report_path);

    let c = client();
    // Guards drop when a response body ends; give the last one a moment.
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(&c, &proxy).await["models"]
                .as_array()
                .is_some_and(|ms| ms.iter().all(|m| m["active_requests"] == 0))
        })
        .await,
        "requests still in flight after the script exited: {}",
        status(&c, &proxy).await
    );

    let s = status(&c, &proxy).await;
    for &(provider, model, requests, sent_as) in EXPECTED_REQUESTS {
        let m = model_entry(&s, provider, model);
        let listener = provider.trim_end_matches(char::is_numeric);
        let sum = |key: &str| -> u64 {
            sent_as
                .iter()
                .map(|n| report[listener][*n][key].as_u64().unwrap_or(0))
                .sum()
        };
        let seen = serde_json::json!({
            "requests": sum("requests"),
            "prompt_tokens": sum("prompt_tokens"),
            "completion_tokens": sum("completion_tokens"),
        });
        let what = format!("{provider}/{model}: {m}");
        assert_eq!(m["total_requests"], requests, "{what}");
        assert_eq!(seen["requests"], requests, "script report for {what}");
        assert_eq!(m["active_requests"], 0, "{what}");
        assert_eq!(m["errors"], 0, "{what}");
        assert_eq!(m["cancelled"], 0, "{what}");
        // Every reply the clients got carried usage (but the stream without include_usage),
        // so the proxy's counts must be exactly the sums the script saw.
        assert!(m["prompt_tokens"].as_u64() > Some(0), "{what}");
        assert_eq!(m["prompt_tokens"], seen["prompt_tokens"], "{what}");
        assert_eq!(m["completion_tokens"], seen["completion_tokens"], "{what}");
        if !model.contains("embed") {
            assert!(m["completion_tokens"].as_u64() > Some(0), "{what}");
        }
    }
    // Nothing else was sent through the proxy.
    for m in s["models"].as_array().expect("models is a list") {
        let used = m["total_requests"].as_u64().unwrap_or(0) > 0;
        let expected = EXPECTED_REQUESTS
            .iter()
            .any(|&(p, n, _, _)| m["provider"] == p && m["model"] == n);
        assert!(!used || expected, "unexpected model in /status: {m}");
    }

    proxy.shutdown().await;
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The interpreter to run `clients.py` with; creates or updates `<repo>/.venv` when needed.
pub(crate) fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LLM_WARDEN_PYTHON") {
        return p.into();
    }
    let venv = repo().join(".venv");
    let python = venv.join("bin/python");
    let requirements = repo().join("cli/tests/python/requirements.txt");
    let wanted = fs::read_to_string(&requirements)
        .unwrap_or_else(|e| panic!("{}: {e}", requirements.display()));
    // A copy of the requirements the venv was built from, written last: a venv without it (or
    // with an older one) is unfinished or stale.
    let stamp = venv.join(".llm-warden-requirements.txt");
    let ready = || python.exists() && fs::read_to_string(&stamp).ok().as_ref() == Some(&wanted);
    if ready() {
        return python;
    }
    fs::create_dir_all(&venv).unwrap_or_else(|e| panic!("{}: {e}", venv.display()));
    let _lock = DirLock::acquire(venv.join(".lock"));
    if ready() {
        return python; // another test process made it while we waited
    }
    eprintln!(
        "creating {} from {} (set LLM_WARDEN_PYTHON to use another interpreter)",
        venv.display(),
        requirements.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
        ])
        .arg(&requirements));
    fs::write(&stamp, &wanted).unwrap_or_else(|e| panic!("{}: {e}", stamp.display()));
    python
}

/// Runs `cmd` to completion like `Command::output`, but kills it after `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let dir = std::env::temp_dir();
    // One pair of files per script run: several tests of this process may run scripts at once.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tag = format!("llm-warden-python-{}-{run}", std::process::id());
    let (out_path, err_path) = (
        dir.join(format!("{tag}.stdout")),
        dir.join(format!("{tag}.stderr")),
    );
    let file = |p: &Path| fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let so = fs::read_to_string(&out_path).unwrap_or_default();
            let se = fs::read_to_string(&err_path).unwrap_or_default();
            panic!("{cmd:?} did not finish within {limit:?}:\n{so}{se}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    };
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    out
}

fn run(cmd: &mut Command) {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// A lock between test processes: a directory only one of them can create. A lock whose
/// holder has died (its pid is gone) or that is older than [`DirLock::STALE`] is taken over.
struct DirLock(PathBuf);

impl DirLock {
    const STALE: Duration = Duration::from_secs(600);

    fn acquire(path: PathBuf) -> DirLock {
        let give_up = Instant::now() + Self::STALE + Duration::from_secs(60);
        loop {
            match fs::create_dir(&path) {
                Ok(()) => {
                    let _ = fs::write(path.join("pid"), std::process::id().to_string());
                    return DirLock(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if Self::is_stale(&path) {
                        let _ = fs::remove_dir_all(&path);
                        continue;
                    }
                    assert!(
                        Instant::now() < give_up,
                        "{} is still held; remove it if no test is running",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
    }

    fn is_stale(path: &Path) -> bool {
        let old = fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Self::STALE);
        let dead = fs::read_to_string(path.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| {
                Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
            });
        old || dead
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `cli/tests/python/lmstudio_sdk.py` (the official `lmstudio` SDK) against `host`
/// (`host:port`) and checks its summary line.
async fn run_lmstudio_sdk(host: String, token: Option<&str>) {
    run_lmstudio_sdk_mode(host, token, "full").await;
}

/// As [`run_lmstudio_sdk`], in one of the script's modes (`WARDEN_LMS_MODE`).
async fn run_lmstudio_sdk_mode(host: String, token: Option<&str>, mode: &str) {
    let python = tokio::task::spawn_blocking(python)
        .await
        .expect("venv setup did not panic");
    let mut cmd = Command::new(&python);
    cmd.arg(repo().join("cli/tests/python/lmstudio_sdk.py"))
        .env("WARDEN_LMS_HOST", &host)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("WARDEN_LMS_MODE", mode)
        .env_remove("LMSTUDIO_API_TOKEN");
    if let Some(t) = token {
        cmd.env("WARDEN_LMS_TOKEN", t);
    }
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || output_within(cmd, SCRIPT_TIMEOUT))
        .await
        .expect("the script runner did not panic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "lmstudio_sdk.py ({:.1?}):\n{stdout}{stderr}",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "lmstudio_sdk.py failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("checks passed"),
        "no summary line from lmstudio_sdk.py:\n{stdout}"
    );
}

/// The `lmstudio` SDK speaks its WebSocket protocol to the simulator directly: greeting,
/// in-band auth, list, load, streamed predict with stats, unload, all on the REST API's state.
#[tokio::test]
async fn lmstudio_sdk_against_the_simulator() {
    let sim = start_lmstudio(LmStudioConfig::default()).await;
    run_lmstudio_sdk(sim.addr.to_string(), None).await;
    assert!(
        sim.state.loaded().is_empty(),
        "the script unloaded its model"
    );
    // load_new_instance, then llm.model's just-in-time load.
    assert_eq!(sim.state.load_count("qwen2.5-7b-instruct"), 2);
    assert_eq!(sim.state.active_requests(), 0);
    assert_eq!(sim.state.cancelled(), 0);
}

/// With an API key the simulator wants the token's identifier and passkey in the SDK's auth
/// packet: the SDK connects with `api_token` and a client without one is refused.
#[tokio::test]
async fn lmstudio_sdk_with_api_token_against_the_simulator() {
    let token = "sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST";
    let sim = start_lmstudio(LmStudioConfig {
        api_key: Some(token.to_string()),
        ..Default::default()
    })
    .await;
    run_lmstudio_sdk(sim.addr.to_string(), Some(token)).await;
    assert!(
        sim.state.loaded().is_empty(),
        "the script unloaded its model"
    );
}

/// Through the proxy (no `api_keys`): the SDK's greeting and WebSocket pass through unchanged,
/// and the model it loads is the simulator's.
#[tokio::test]
async fn lmstudio_sdk_through_the_proxy() {
    let sim = start_lmstudio(LmStudioConfig::default()).await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    run_lmstudio_sdk(proxy.proxy_addr(0).to_string(), None).await;
    assert!(
        sim.state.loaded().is_empty(),
        "the script unloaded its model"
    );
    assert_eq!(sim.state.load_count("qwen2.5-7b-instruct"), 2);
    assert!(
        sim.state.log.count("/llm") >= 1,
        "the SDK's socket reached the simulator"
    );
    // The proxy read the socket: both predictions (respond_stream with 5 tokens, respond)
    // are counted with the tokens of their `success.stats`, and nothing is left in flight.
    let s = status(&client(), &proxy).await;
    let m = model_entry(&s, "lmstudio0", "qwen2.5-7b-instruct");
    assert_eq!(m["total_requests"], 2, "{m}");
    assert_eq!(m["active_requests"], 0, "{m}");
    assert_eq!(m["errors"], 0, "{m}");
    assert_eq!(m["cancelled"], 0, "{m}");
    assert!(m["prompt_tokens"].as_u64().unwrap() > 0, "{m}");
    assert!(m["completion_tokens"].as_u64().unwrap() >= 5, "{m}");
    proxy.shutdown().await;
}

/// Through a proxy with `api_keys` and an `upstream_api_key`: the SDK connects with one of the
/// proxy's keys (checked in its socket's first frame, then replaced by the upstream key the
/// simulator requires), and a client without a key is refused (the script checks both).
#[tokio::test]
async fn lmstudio_sdk_through_the_proxy_with_api_keys() {
    let client_key = "sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST";
    let upstream_key = "sk-lm-upstream:UPSTREAMUPSTREAMUPST";
    let sim = start_lmstudio(LmStudioConfig {
        api_key: Some(upstream_key.to_string()),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("lmstudio", sim.url())],
        &format!("api_keys = [\"{client_key}\"]\nupstream_api_key = \"{upstream_key}\"\n"),
    )
    .await;
    run_lmstudio_sdk(proxy.proxy_addr(0).to_string(), Some(client_key)).await;
    assert!(
        sim.state.loaded().is_empty(),
        "the script unloaded its model"
    );
    assert_eq!(sim.state.load_count("qwen2.5-7b-instruct"), 2);
    // The socket the proxy authenticated is watched too: both predictions counted.
    let m = sdk_model_entry(&proxy).await.expect("the model's entry");
    assert_eq!(m["total_requests"], 2, "{m}");
    assert_eq!(m["active_requests"], 0, "{m}");
    assert!(m["completion_tokens"].as_u64().unwrap() >= 5, "{m}");
    proxy.shutdown().await;
}

const SDK_MODEL: &str = "qwen2.5-7b-instruct";

/// The proxy's `/status` entry of the SDK's model on `lmstudio0`, if it has one.
async fn sdk_model_entry(proxy: &llm_warden::app::Running) -> Option<serde_json::Value> {
    let s = status(&client(), proxy).await;
    s["models"]
        .as_array()?
        .iter()
        .find(|m| m["provider"] == "lmstudio0" && m["model"] == SDK_MODEL)
        .cloned()
}

/// Asks the admin API to unload the SDK's model (answers once it is unloaded).
async fn unload_sdk_model(proxy: &llm_warden::app::Running) -> Reply {
    send(
        &client(),
        http::Method::POST,
        &format!(
            "http://{}/models/lmstudio0/{SDK_MODEL}/unload",
            proxy.admin_addr
        ),
        &[],
        bytes::Bytes::new(),
    )
    .await
}

/// An SDK prediction holds a lease on its model: an admin unload issued while it streams
/// (seen in `/status` as in flight) waits for it, so the prediction ends normally, counted
/// with its tokens, before the model goes.
#[tokio::test]
async fn lmstudio_sdk_prediction_through_the_proxy_holds_its_model() {
    let sim = start_lmstudio(LmStudioConfig {
        token_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    let host = proxy.proxy_addr(0).to_string();
    let script = tokio::spawn(async move { run_lmstudio_sdk_mode(host, None, "stream").await });
    wait_for(
        "the SDK prediction in flight",
        Duration::from_secs(30),
        || async {
            sdk_model_entry(&proxy)
                .await
                .is_some_and(|m| m["active_requests"] == 1)
        },
    )
    .await;
    let unload = unload_sdk_model(&proxy).await;
    assert_eq!(unload.status, 200, "{}", unload.text());
    // By the time the unload answered, the prediction had ended and been counted.
    let m = sdk_model_entry(&proxy).await.expect("the model's entry");
    assert_eq!(m["total_requests"], 1, "{m}");
    assert_eq!(m["active_requests"], 0, "{m}");
    assert!(m["completion_tokens"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["cancelled"], 0, "{m}");
    assert!(m["prompt_tokens"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(
        sim.state.cancelled(),
        0,
        "the simulator finished the prediction"
    );
    assert!(sim.state.loaded().is_empty(), "then the model was unloaded");
    script.await.expect("the script passed");
    proxy.shutdown().await;
}

/// A client that drops its socket mid-prediction leaves nothing behind: the prediction is
/// counted cancelled, nothing stays in flight, and the lease is released (an unload goes
/// through).
#[tokio::test]
async fn lmstudio_sdk_socket_dropped_mid_prediction_leaves_no_lease() {
    let sim = start_lmstudio(LmStudioConfig {
        token_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    run_lmstudio_sdk_mode(proxy.proxy_addr(0).to_string(), None, "drop").await;
    wait_for(
        "the dropped prediction counted, nothing in flight",
        Duration::from_secs(10),
        || async {
            sdk_model_entry(&proxy)
                .await
                .is_some_and(|m| m["active_requests"] == 0 && m["cancelled"] == 1)
        },
    )
    .await;
    let unload = unload_sdk_model(&proxy).await;
    assert_eq!(unload.status, 200, "{}", unload.text());
    assert!(
        sim.state.loaded().is_empty(),
        "the lease was released: the model unloaded"
    );
    wait_for(
        "the simulator saw the client go",
        Duration::from_secs(10),
        || async { sim.state.active_requests() == 0 },
    )
    .await;
    proxy.shutdown().await;
}

/// The SDK's loads and unloads reach the lifecycle at once (the provider is polled right
/// after the socket shows one), not at the next `poll_interval` (an hour here).
#[tokio::test]
async fn lmstudio_sdk_loads_and_unloads_reach_the_lifecycle_at_once() {
    let sim = start_lmstudio(LmStudioConfig::default()).await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "poll_interval = \"1h\"\n").await;
    let host = proxy.proxy_addr(0).to_string();
    // The proxy polled once at start (`app::start`), before the SDK loaded anything.
    assert!(sdk_model_entry(&proxy)
        .await
        .is_none_or(|m| m["loaded"] != true));
    run_lmstudio_sdk_mode(host.clone(), None, "load").await;
    wait_for(
        "the SDK's load in /status",
        Duration::from_secs(10),
        || async {
            sdk_model_entry(&proxy)
                .await
                .is_some_and(|m| m["loaded"] == true)
        },
    )
    .await;
    assert_eq!(sim.state.load_count(SDK_MODEL), 1);
    run_lmstudio_sdk_mode(host, None, "unload").await;
    wait_for(
        "the SDK's unload in /status",
        Duration::from_secs(10),
        || async {
            sdk_model_entry(&proxy)
                .await
                .is_some_and(|m| m["loaded"] == false)
        },
    )
    .await;
    proxy.shutdown().await;
}

/// The `openai` client's Responses API (`responses.create`, streamed and not) and the
/// `anthropic` client's Messages API (`messages.create`, `messages.stream`) through the proxy,
/// against the Ollama, llama.cpp and LM Studio simulators (`cli/tests/python/compat_clients.py`): each
/// request counted with the provider's tokens, `active_requests` 1 while `messages.stream`
/// answers, and an admin unload issued then waits for the stream (issue 20 §1). On Ollama,
/// the `openai` client's `audio.transcriptions.create` (JSON and text) too, counted.
#[tokio::test]
async fn responses_and_messages_clients_through_the_proxy() {
    let python = tokio::task::spawn_blocking(python)
        .await
        .expect("venv setup did not panic");
    // Slow enough that the stream is still answering when the script looks at /status.
    let token_delay = Duration::from_millis(60);
    let ollama = start_ollama(OllamaConfig {
        token_delay,
        // A stream long enough to be looked at while it answers.
        reply_tokens: 24,
        ..Default::default()
    })
    .await;
    let llamacpp = llm_warden_sim::llamacpp::spawn(
        llm_warden_sim::llamacpp::LlamaCppConfig {
            token_delay,
            ..Default::default()
        },
        listener().await,
    );
    let lmstudio = start_lmstudio(LmStudioConfig {
        token_delay,
        ..Default::default()
    })
    .await;
    const QWEN: &str = "qwen2.5-7b-instruct-q4_k_m";
    const LMS: &str = "qwen2.5-7b-instruct";
    let targets = [
        (
            "ollama",
            ollama.url(),
            "ollama0",
            "llama3.2",
            "llama3.2:latest",
        ),
        ("llamacpp", llamacpp.url(), "llamacpp0", QWEN, QWEN),
        ("lmstudio", lmstudio.url(), "lmstudio0", LMS, LMS),
    ];
    for (kind, url, provider, model, status_model) in targets {
        let proxy = start_proxy(&[(kind, url)], "").await;
        let admin = format!("http://{}", proxy.admin_addr);
        let report = run_compat_script(
            &python,
            &[
                &format!("http://{}", proxy.proxy_addr(0)),
                model,
                &admin,
                provider,
                status_model,
            ],
            // Ollama serves audio transcriptions: two more requests, without tokens.
            if kind == "ollama" {
                &[("WARDEN_TRANSCRIBE", "1")]
            } else {
                &[]
            },
            SCRIPT_TIMEOUT,
        )
        .await;
        let c = client();
        let s = status(&c, &proxy).await;
        let m = model_entry(&s, provider, status_model);
        let what = format!("{kind}: {m}\nscript: {report}");
        let requests = if kind == "ollama" { 6 } else { 4 };
        assert_eq!(m["total_requests"], requests, "{what}");
        assert_eq!(report["requests"], requests, "{what}");
        assert_eq!(m["active_requests"], 0, "{what}");
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
        proxy.shutdown().await;
    }
    assert_eq!(ollama.state.unloads_while_busy(), 0);
    assert_eq!(llamacpp.state.unloads_while_busy(), 0);
    assert_eq!(lmstudio.state.unloads_while_busy(), 0);
}

/// Runs `compat_clients.py` with `args`; returns its report.
pub(crate) async fn run_compat_script(
    python: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    limit: Duration,
) -> serde_json::Value {
    let report_path = std::env::temp_dir().join(format!(
        "llm-warden-compat-clients-{}-{}.json",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("cli/tests/python/compat_clients.py"))
        .args(args)
        .env("WARDEN_PY_REPORT", &report_path)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .envs(envs.iter().copied());
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    let out = tokio::task::spawn_blocking(move || output_within(cmd, limit))
        .await
        .expect("the script runner did not panic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("compat_clients.py {args:?}:\n{stdout}{stderr}");
    assert!(
        out.status.success() && stdout.contains("checks passed"),
        "compat_clients.py failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    let report = serde_json::from_slice(
        &fs::read(&report_path).unwrap_or_else(|e| panic!("{}: {e}", report_path.display())),
    )
    .expect("the report is JSON");
    let _ = fs::remove_file(&report_path);
    report
}

/// The official `anthropic` client sends an over-window Messages conversation with tool_use /
/// tool_result pairs through the proxy (Ollama simulator, window 4096): the proxy compacts it
/// and the client reads the reply (`cli/tests/python/compacted_messages.py`).
#[tokio::test]
async fn the_anthropic_client_reads_a_compacted_reply() {
    let python = tokio::task::spawn_blocking(python)
        .await
        .expect("venv setup did not panic");
    let ollama = start_ollama(OllamaConfig {
        fixed_reply: Some("SUMMARY: they read files.".to_string()),
        ..Default::default()
    })
    .await;
    let cache =
        std::env::temp_dir().join(format!("llm-warden-py-compacted-{}", std::process::id()));
    let config = format!(
        "[compaction]\ncache_dir = \"{}\"\nreply_reserve = 256\n",
        cache.display()
    );
    let proxy = start_proxy(&[("ollama", ollama.url())], &config).await;
    let mut cmd = Command::new(&python);
    cmd.arg(repo().join("cli/tests/python/compacted_messages.py"))
        .arg(format!("http://{}", proxy.proxy_addr(0)))
        .arg("llama3.2")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    let out = tokio::task::spawn_blocking(move || output_within(cmd, SCRIPT_TIMEOUT))
        .await
        .expect("the script runner did not panic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("compacted messages: ok"),
        "{}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    let s = status(&client(), &proxy).await;
    assert_eq!(s["compaction"]["events"][0]["action"], "summarized", "{s}");
    proxy.shutdown().await;
    let _ = fs::remove_dir_all(&cache);
}

/// The SDK's embeddings (`embedString` calls on `/embedding`) are counted and leased like
/// REST embeddings: two calls through the proxy, each in `/status` and `/metrics` (endpoint
/// `sdk_embed`), the frames reaching the simulator as they were sent.
#[tokio::test]
async fn lmstudio_sdk_embeddings_through_the_proxy_are_counted() {
    const EMBED: &str = "text-embedding-nomic-embed-text-v1.5";
    let sim = start_lmstudio(LmStudioConfig::default()).await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    run_lmstudio_sdk_mode(proxy.proxy_addr(0).to_string(), None, "embed").await;
    let s = status(&client(), &proxy).await;
    let m = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["provider"] == "lmstudio0" && m["model"] == EMBED)
        .cloned()
        .unwrap_or_else(|| panic!("no entry for {EMBED}: {s}"));
    assert_eq!(m["total_requests"], 2, "{m}");
    assert_eq!(m["active_requests"], 0, "{m}");
    let metrics = get(&client(), &format!("http://{}/metrics", proxy.admin_addr))
        .await
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("llm_warden_requests_total{")
                && l.contains("endpoint=\"sdk_embed\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );
    let seen = sim.state.sdk_messages();
    assert_eq!(
        seen.iter()
            .filter(|m| *m == "embedding rpcCall embedString")
            .count(),
        2,
        "{seen:?}"
    );
    proxy.shutdown().await;
}
