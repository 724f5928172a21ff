//! The client commands of the binary against a running proxy (`status`, `load`, `unload`),
//! and `demo` end to end.

use std::process::Command;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_llm-warden");

/// Runs the binary off the async runtime; its stdout, or a panic with stderr.
async fn run(args: Vec<String>, ok: bool) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("LLM_WARDEN_CONFIG")
            .env_remove("LLM_WARDEN_ADMIN")
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("runner");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert_eq!(
        out.status.success(),
        ok,
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    if ok {
        stdout
    } else {
        stderr
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_load_and_unload_against_a_running_proxy() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let admin = format!("http://{}", proxy.admin_addr);

    let out = run(
        args(&["load", "--admin", &admin, "ollama0", "llama3.2"]),
        true,
    )
    .await;
    assert!(out.contains("ollama0/llama3.2:latest: ready"), "{out}");
    assert_eq!(sim.state.loaded(), ["llama3.2:latest"]);

    let c = client();
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let table = run(args(&["status", "--admin", &admin]), true).await;
    let row = table
        .lines()
        .find(|l| l.contains("llama3.2:latest"))
        .unwrap_or_else(|| panic!("a row for the model:\n{table}"));
    assert!(row.starts_with("ollama0") && row.contains("ready"), "{row}");
    assert!(
        table.contains("PROVIDER") && table.contains("provider ollama0 (ollama)"),
        "{table}"
    );

    let json = run(args(&["status", "--admin", &admin, "--json"]), true).await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(
        model_entry(&v, "ollama0", "llama3.2:latest")["total_requests"],
        1
    );

    let out = run(
        args(&["unload", "--admin", &admin, "ollama0", "llama3.2"]),
        true,
    )
    .await;
    assert!(out.contains("unloaded"), "{out}");
    assert!(sim.state.loaded().is_empty());
    // A model the provider does not have: 404, as Ollama answers its own unload of it.
    let err = run(
        args(&["unload", "--admin", &admin, "ollama0", "never-loaded:1b"]),
        false,
    )
    .await;
    assert!(
        err.contains("404") && err.contains("`never-loaded:1b` not found"),
        "{err}"
    );

    // Errors: an unknown provider, a proxy that is not there.
    let err = run(
        args(&["load", "--admin", &admin, "nope", "llama3.2"]),
        false,
    )
    .await;
    assert!(
        err.contains("404") && err.contains("no provider named `nope`"),
        "{err}"
    );
    let err = run(args(&["status", "--admin", "127.0.0.1:1"]), false).await;
    assert!(err.contains("is llm-warden running?"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_config_file_is_said_once() {
    for cmd in ["check-config", "serve"] {
        let mut a = args(&[cmd]);
        if cmd == "serve" {
            a.push("--config".into());
        }
        a.push("/nonexistent/llm-warden.toml".into());
        let err = run(a, false).await;
        assert!(
            err.contains("cannot read config file /nonexistent/llm-warden.toml"),
            "{cmd}: {err}"
        );
        let os = "No such file or directory";
        assert_eq!(
            err.matches(os).count(),
            1,
            "{cmd}: the OS error once: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_comes_from_the_config_when_not_given() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let dir = std::env::temp_dir().join(format!("llm-warden-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!("[admin]\nlisten = \"{}\"\n", proxy.admin_addr),
    )
    .unwrap();
    let out = run(
        vec![
            "status".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
        true,
    )
    .await;
    assert!(out.contains("provider ollama0"), "{out}");
    proxy.shutdown().await;
}

/// The port of the `http://127.0.0.1:PORT` that follows `label` on a line of `out`.
fn printed_port(out: &str, label: &str) -> u16 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("a `{label}` line in:\n{out}"));
    let at = line.find("http://127.0.0.1:").expect("an address") + "http://127.0.0.1:".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a port in {line:?}"))
}

/// Issue 18: the demo tells its story on stdout with no log lines around it (the proxy's log
/// goes to the file it names), and every listener is on a free port: the printed addresses
/// are never the defaults (the demo used to take 127.0.0.1:11400 whenever it was free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_its_workload_and_reports_it() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(BIN)
            .args(["demo", "--no-wait"])
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("runner");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for expected in [
        "loaded on first use",
        "6/6 OK",
        "unloaded the least recently used idle model [\"llama3.2:latest\"]",
        "compacted ",
        "nomic-embed-text is unloaded after 3s",
        "Dashboard:  http://127.0.0.1:",
    ] {
        assert!(stdout.contains(expected), "`{expected}` in:\n{stdout}");
    }
    assert!(!stdout.contains("not compacted"), "{stdout}");
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !text.contains(" INFO ") && !text.contains("llm_warden::") && !text.contains('\x1b'),
            "no log lines on the demo's {name}:\n{text}"
        );
    }

    let admin = printed_port(&stdout, "admin");
    assert_eq!(printed_port(&stdout, "Dashboard:"), admin);
    assert_ne!(admin, 11400, "the admin listener is on a free port");
    // `  Ollama    http://127.0.0.1:SIM -> proxy http://127.0.0.1:PROXY`, and LM Studio's.
    let sims = [
        printed_port(&stdout, "Ollama"),
        printed_port(&stdout, "LM Studio"),
    ];
    let proxies: Vec<u16> = stdout
        .lines()
        .filter_map(|l| l.split_once("-> proxy "))
        .map(|(_, url)| printed_port(url, "http"))
        .collect();
    assert_eq!(proxies.len(), 2, "{stdout}");
    for (port, default) in sims.iter().chain(&proxies).zip([11434, 1234, 11435, 1235]) {
        assert_ne!(*port, default, "free ports, not the defaults:\n{stdout}");
    }

    // The log is in the file the demo named, in the temporary directory.
    let line = stdout
        .lines()
        .find(|l| l.contains("the proxy's log: "))
        .unwrap_or_else(|| panic!("the log file is named:\n{stdout}"));
    let path = line
        .split("the proxy's log: ")
        .nth(1)
        .and_then(|rest| rest.split(" (").next())
        .unwrap()
        .to_string();
    assert!(
        std::path::Path::new(&path).starts_with(std::env::temp_dir()),
        "{path}"
    );
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let _ = std::fs::remove_file(&path);
    assert!(
        log.contains(" INFO ")
            && log.contains(&format!("admin listening listen=127.0.0.1:{admin}")),
        "{path}:\n{log}"
    );
}

#[test]
fn every_command_explains_itself() {
    for cmd in [
        "serve",
        "status",
        "check-config",
        "load",
        "unload",
        "simulate",
        "demo",
    ] {
        let out = Command::new(BIN).args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines().next().is_some_and(|l| l.len() > 10),
            "{cmd}: {text}"
        );
    }
    let out = Command::new(BIN)
        .args(["status", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:11400"));
}
