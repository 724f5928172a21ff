//! The config file and the binary: the documented example parses to the defaults, bad config
//! exits non-zero naming the key, and `serve` runs and stops cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_llm-warden");

fn repo_file(p: &str) -> String {
    format!("{}/../{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn documented_config_parses_to_the_builtin_defaults() {
    let text = std::fs::read_to_string(repo_file("config/llm-warden.toml")).unwrap();
    let documented = llm_warden::config::load_str(&text).expect("config/llm-warden.toml is valid");
    let builtin = llm_warden::config::Config::default();
    // Same values, key for key (Debug covers every field).
    assert_eq!(format!("{documented:?}"), format!("{builtin:?}"));
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llm-warden-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_config_exits_nonzero_naming_every_key() {
    let p = temp_file(
        "bad.toml",
        "[proxy]\nmax_request_body = \"lots\"\n[[providers]]\nkind = \"ollama\"\nlisten = \"localhost\"\n[limits]\nmemory_threshold = 2.0\n",
    );
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "proxy.max_request_body",
        "providers[0].listen",
        "limits.memory_threshold",
    ] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    assert!(
        err.contains(&p.display().to_string()),
        "the file is named: {err}"
    );

    let p = temp_file("typo.toml", "[limits]\nmax_model_loaded = 2\n");
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_model_loaded"));

    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/x.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml"));
}

/// Issue 18: `check-config` lists every problem in one run, unknown keys and wrong types
/// included, and a refused upstream does not hide a duplicate name.
#[test]
fn check_config_reports_every_problem_at_once() {
    let p = temp_file(
        "many.toml",
        "verbose = true\n[proxy]\nmax_conections = 100\n[[providers]]\nname = \"local\"\nkind = \"ollama\"\nupstream = \"https://127.0.0.1:11434\"\n[[providers]]\nname = \"local\"\nkind = \"lmstudio\"\napi_key = [\"x\"]\n[limits]\nmax_models_loaded = \"two\"\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&p)
        .env_remove("LLM_WARDEN_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no config is printed");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("  - ")).collect();
    for (line, expected) in lines.iter().zip([
        "  - verbose: unknown field `verbose`",
        "  - proxy.max_conections: unknown field `max_conections` (did you mean `max_connections`?)",
        "  - providers[1].api_key: unknown field `api_key` (did you mean `api_keys`?)",
        "  - limits.max_models_loaded: invalid type: string \"two\", expected u32 (line 13)",
        "  - providers[0].upstream: `https://127.0.0.1:11434`: only http:// upstreams",
        "  - providers[1].name: duplicate provider name `local`",
    ]) {
        assert!(line.starts_with(expected), "{expected:?} in:\n{err}");
    }
    assert_eq!(lines.len(), 6, "six problems, one line each:\n{err}");
    assert!(err.contains(&p.display().to_string()), "{err}");
}

#[test]
fn config_path_comes_from_the_environment_when_not_given() {
    let p = temp_file("env.toml", "[admin]\nlisten = \"127.0.0.1:19999\"\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .env("LLM_WARDEN_CONFIG", &p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:19999\""), "{text}");
    assert!(text.contains(&p.display().to_string()), "{text}");
    // The path as an argument, and the output is itself a valid config.
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    let again = temp_file("again.toml", &shown);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&again)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .collect::<Vec<_>>(),
        shown.lines().skip(1).collect::<Vec<_>>()
    );
    // Without either, the built-in defaults.
    let out = Command::new(BIN)
        .arg("check-config")
        .env_remove("LLM_WARDEN_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("built-in defaults")
            && text.contains("listen = \"127.0.0.1:11435\"")
            && text.contains("upstream = \"http://127.0.0.1:11434\""),
        "{text}"
    );
}

/// The address in a start-up log line's `listen=` field (listeners are bound on port 0, so
/// the log is where the real port is).
fn listen_addr(line: &str) -> std::net::SocketAddr {
    let at = line.find("listen=").expect("a listen= field") + "listen=".len();
    line[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `llm-warden serve` on a config, with its log read line by line.
struct Served {
    child: std::process::Child,
    log: std::io::Lines<BufReader<std::process::ChildStderr>>,
}

impl Served {
    fn start(name: &str, config: &str) -> Served {
        Served::start_at(&temp_file(name, config))
    }

    fn start_at(p: &std::path::Path) -> Served {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(p)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = BufReader::new(child.stderr.take().unwrap()).lines();
        Served { child, log }
    }

    /// The next log line that contains `what` (earlier lines are skipped); panics if the
    /// process ends first.
    fn wait_for(&mut self, what: &str) -> String {
        for line in self.log.by_ref() {
            let line = line.unwrap();
            if line.contains(what) {
                return line;
            }
        }
        panic!("the proxy never logged {what:?}");
    }

    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failed test must not leave the proxy running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_starts_with_providers_down_and_stops_on_sigterm() {
    // Port 1: nothing listens there, so the provider is down.
    let mut served = Served::start(
        "serve.toml",
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n",
    );
    // Start-up logs the unreachable provider, then the listeners.
    served.wait_for("provider is unreachable");
    let admin = listen_addr(&served.wait_for("admin listening"));

    let mut s = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"reachable\":false"), "{resp}");

    // SIGTERM: a clean, prompt exit.
    served.sigterm();
    let status = served.child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn shutdown_drains_open_streams_and_a_second_signal_stops_at_once() {
    use std::io::{Read, Write};
    // A simulated Ollama in this process, slow enough that a stream stays open.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(async {
        llm_warden_sim::ollama::bind(
            llm_warden_sim::ollama::OllamaConfig {
                token_delay: Duration::from_millis(100),
                reply_tokens: 1000,
                ..Default::default()
            },
            "127.0.0.1:0",
        )
        .await
        .unwrap()
    });
    let mut served = Served::start(
        "drain.toml",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n", sim.url()),
    );
    let proxy = listen_addr(&served.wait_for("proxy listening"));
    served.wait_for("admin listening");

    let mut stream = std::net::TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = r#"{"model":"llama3.2","prompt":"hi"}"#;
    write!(
        stream,
        "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut read_some = |s: &mut std::net::TcpStream| -> usize { s.read(&mut buf).unwrap_or(0) };
    assert!(read_some(&mut stream) > 0, "the stream started");

    served.sigterm();
    served.wait_for("shutting down");
    // Draining: the open stream is still being served.
    assert!(
        read_some(&mut stream) > 0,
        "the open stream goes on after the first signal"
    );
    assert!(
        read_some(&mut stream) > 0,
        "the open stream goes on after the first signal"
    );
    // A second signal stops it now.
    served.sigterm();
    let status = served.child.wait().unwrap();
    assert!(status.success(), "{status}");
    // The stream ends, cut short (well before its 1,000 tokens).
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("\"done\":true"));
    drop(sim);
}

#[test]
fn the_config_reloads_when_the_file_changes_and_on_sighup_and_a_bad_one_is_refused() {
    let base = "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n";
    let p = temp_file("reload.toml", base);
    let mut served = Served::start_at(&p);
    served.wait_for("watching the config");
    std::fs::write(&p, format!("{base}[limits]\ninactivity_timeout = \"3m\"\n")).unwrap();
    let line = served.wait_for("config reloaded");
    assert!(line.contains("file changed"), "{line}");
    std::fs::write(
        &p,
        format!("{base}[limits]\ninactivity_timeout = \"whenever\"\n"),
    )
    .unwrap();
    let line = served.wait_for("config reload refused");
    assert!(
        line.contains("limits.inactivity_timeout"),
        "the key path: {line}"
    );
    let pid = served.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let line = served.wait_for("config reload refused");
    assert!(line.contains("SIGHUP"), "{line}");
    // Still serving, and still the last good config.
    served.sigterm();
    assert!(served.child.wait().unwrap().success());
}

#[test]
fn after_shutdown_grace_open_streams_are_cut_and_the_proxy_exits_on_its_own() {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(async {
        llm_warden_sim::ollama::bind(
            llm_warden_sim::ollama::OllamaConfig {
                token_delay: Duration::from_millis(100),
                reply_tokens: 1000,
                ..Default::default()
            },
            "127.0.0.1:0",
        )
        .await
        .unwrap()
    });
    let mut served = Served::start(
        "grace.toml",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n[proxy]\nshutdown_grace = \"1s\"\n[[providers]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n", sim.url()),
    );
    let proxy = listen_addr(&served.wait_for("proxy listening"));
    served.wait_for("admin listening");
    let mut stream = std::net::TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = r#"{"model":"llama3.2","prompt":"hi"}"#;
    write!(
        stream,
        "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    assert!(stream.read(&mut buf).unwrap_or(0) > 0, "the stream started");

    let signalled = std::time::Instant::now();
    served.sigterm();
    let line = served.wait_for("shutting down");
    assert!(
        line.contains("1s"),
        "the grace period is the configured one: {line}"
    );
    // One signal only: the stream goes on for the grace period, then is cut, and the
    // process exits by itself.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let cut = signalled.elapsed();
    let status = served.child.wait().unwrap();
    let exited = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        cut >= Duration::from_millis(900) && exited < Duration::from_secs(5),
        "cut after {cut:?}, exited after {exited:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("\"done\":true"));
    drop(sim);
}
