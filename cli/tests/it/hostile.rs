//! Issue 18, from outside: the `llm-warden` binary as a separate process (`serve`), over real
//! sockets, in front of the simulators, fed what an attacker or a careless client sends. Each
//! case is a row of the README's "Security" and "Bad input" tables. (`scripts/attack.py`
//! runs the same kind of cases against the release binary.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use http::Method;
use llm_warden_sim::ollama::OllamaConfig;
use serde_json::Value;

/// The binary under attack: the one `cargo test` built, or another named by
/// `LLM_WARDEN_BIN`: `cargo build --release && LLM_WARDEN_BIN=$PWD/target/release/llm-warden
/// cargo test -p llm-warden-cli --test it hostile` runs these cases against the release build.
fn bin() -> std::path::PathBuf {
    std::env::var_os("LLM_WARDEN_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_llm-warden").into())
}
const CHAT: &str =
    r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;

/// A port nobody listens on now (bound, then released for the proxy to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `llm-warden serve` as its own process: an Ollama and an LM Studio listener and the
/// admin listener, on loopback; killed on drop.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    ollama: SocketAddr,
    lmstudio: SocketAddr,
    dir: std::path::PathBuf,
}

impl Proxy {
    async fn start(ollama_url: &str, lmstudio_url: &str) -> Proxy {
        let [admin, ollama, lmstudio] =
            [0; 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let dir = std::env::temp_dir().join(format!("llm-warden-hostile-{}", admin.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[admin]\nlisten = \"{admin}\"\n\
                 [proxy]\nbody_read_timeout = \"1s\"\nheader_read_timeout = \"5s\"\n\
                 [[providers]]\nname = \"ollama\"\nkind = \"ollama\"\nlisten = \"{ollama}\"\nupstream = \"{ollama_url}\"\n\
                 [[providers]]\nname = \"lmstudio\"\nkind = \"lmstudio\"\nlisten = \"{lmstudio}\"\nupstream = \"{lmstudio_url}\"\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env_remove("LLM_WARDEN_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let p = Proxy {
            child,
            admin,
            ollama,
            lmstudio,
            dir,
        };
        // Every listener accepts once the proxy has started (the ports were free).
        wait_for("the proxy to listen", Duration::from_secs(30), || async {
            [admin, ollama, lmstudio]
                .iter()
                .all(|a| TcpStream::connect(a).is_ok())
        })
        .await;
        p
    }

    async fn status(&self) -> Value {
        let c = client();
        let url = format!("http://{}/status", self.admin);
        send(&c, Method::GET, &url, &[], "").await.json()
    }

    /// The proxy's counters for `model` of the Ollama provider (`None`: no entry).
    async fn ollama_model(&self, model: &str) -> Option<Value> {
        let s = self.status().await;
        s["models"]
            .as_array()?
            .iter()
            .find(|m| m["provider"] == "ollama" && m["model"] == model)
            .cloned()
    }

    async fn total(&self, model: &str) -> u64 {
        self.ollama_model(model)
            .await
            .and_then(|m| m["total_requests"].as_u64())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `raw` on a new connection and reads until the server closes it (at most 15 s).
async fn exchange(addr: SocketAddr, raw: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(&raw);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}

/// A request with a body and `Connection: close`; `headers` end each line with CRLF.
fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn status_of(reply: &str) -> u16 {
    reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The JSON after the head (the proxy's own answers have a length, not chunks).
fn json_body(reply: &str) -> Value {
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {reply}"))
}

async fn sims() -> (
    llm_warden_sim::SimServer<llm_warden_sim::ollama::OllamaSim>,
    llm_warden_sim::SimServer<llm_warden_sim::lmstudio::LmStudioSim>,
) {
    let ollama = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(20),
        reply_tokens: 30,
        ..Default::default()
    })
    .await;
    let lmstudio = start_lmstudio(Default::default()).await;
    (ollama, lmstudio)
}

/// Issue 18 §2: a body the provider reads differently from a strict JSON parser. Before,
/// each of these reached Ollama uncounted and outside a lease.
#[tokio::test]
async fn bodies_are_read_as_the_provider_reads_them_so_nothing_escapes_the_lease() {
    let (ollama, lmstudio) = sims().await;
    let proxy = Proxy::start(&ollama.url(), &lmstudio.url()).await;
    let model = "llama3.2:latest";
    let mut counted = 0;
    for body in [
        // A repeated key: the last value wins (Go, JavaScript, nlohmann alike).
        r#"{"model":"nope","model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
        // Go matches keys case-insensitively, even through U+017F and U+212A.
        r#"{"Model":"llama3.2","messages":[{"role":"user","content":"hi"}],"ſtream":false}"#,
        r#"{"MODEL":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream":false}"#,
        // Ollama finds a model by a case-insensitive name: one model, one count.
        r#"{"model":"LLAMA3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
        // gin's decoder reads the first value and ignores the rest.
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false} trailing"#,
    ] {
        let r = exchange(proxy.ollama, post("/api/chat", "", body.as_bytes())).await;
        assert_eq!(status_of(&r), 200, "{body} -> {r}");
        counted += 1;
        assert_eq!(proxy.total(model).await, counted, "{body}");
    }
    assert!(proxy.ollama_model("nope:latest").await.is_none());
    // A percent-escaped path is the path Ollama routes (gin decodes it).
    let r = exchange(proxy.ollama, post("/api/%63hat", "", CHAT.as_bytes())).await;
    assert_eq!(status_of(&r), 200, "{r}");
    counted += 1;
    assert_eq!(proxy.total(model).await, counted);

    // keep_alive given twice: the proxy's rewrite lands on the value Ollama reads.
    let body = r#"{"model":"llama3.2","keep_alive":"1h","messages":[{"role":"user","content":"hi"}],"Keep_Alive":"5m","stream":false}"#;
    let r = exchange(proxy.ollama, post("/api/chat", "", body.as_bytes())).await;
    assert_eq!(status_of(&r), 200, "{r}");
    counted += 1;
    let sent = ollama.state.log.calls().last().unwrap().body.clone();
    let sent = String::from_utf8_lossy(&sent).into_owned();
    assert!(
        sent.contains(r#""keep_alive":"1h""#) && sent.contains(r#""Keep_Alive":-1"#),
        "{sent}"
    );

    // A stream whose `stream` is given twice is leased: in flight while it streams, and an
    // unload asked meanwhile waits for it (the stream ends whole).
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"a long one"}],"stream":false,"stream":true}"#;
    let c = client();
    let url = format!("http://{}/api/chat", proxy.ollama);
    let stream = {
        let c = c.clone();
        tokio::spawn(async move { post_json(&c, &url, body).await })
    };
    wait_for(
        "the stream to be in flight",
        Duration::from_secs(10),
        || async {
            proxy
                .ollama_model(model)
                .await
                .is_some_and(|m| m["active_requests"] == 1)
        },
    )
    .await;
    let unload = send(
        &c,
        Method::POST,
        &format!("http://{}/models/ollama/llama3.2/unload", proxy.admin),
        &[],
        "",
    )
    .await;
    let streamed = stream.await.unwrap();
    assert_eq!(streamed.status, 200);
    let last = streamed.text().lines().last().unwrap_or("").to_string();
    assert!(
        last.contains(r#""done":true"#),
        "the stream ended whole: {last}"
    );
    assert_eq!(unload.status, 200, "{}", unload.text());
    counted += 1;
    assert_eq!(proxy.total(model).await, counted);

    // What the provider might read and the proxy cannot is refused in the client's format,
    // never forwarded uncounted.
    let before = ollama.state.log.count("/api/chat");
    for (body, headers, status, what) in [
        (&br#"{"model":5}"#[..], "", 400, "`model` must be a string"),
        (
            b"{\"model\":\"llama3.2\",\"x\":\"\xff\"}",
            "",
            400,
            "not valid UTF-8",
        ),
        (
            br#"{"model":"llama3.2\ud800","messages":[{"role":"user","content":"hi"}]}"#,
            "",
            400,
            "escape",
        ),
        (
            CHAT.as_bytes(),
            "Content-Encoding: gzip\r\n",
            415,
            "Content-Encoding: gzip",
        ),
    ] {
        let r = exchange(proxy.ollama, post("/api/chat", headers, body)).await;
        assert_eq!(status_of(&r), status, "{r}");
        let e = json_body(&r)["error"].as_str().unwrap_or("").to_string();
        assert!(e.contains(what), "{r}");
        let r = exchange(proxy.ollama, post("/v1/chat/completions", headers, body)).await;
        assert_eq!(status_of(&r), status, "{r}");
        let e = json_body(&r)["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(e.contains(what), "{r}");
    }
    assert_eq!(ollama.state.log.count("/api/chat"), before);
    assert_eq!(ollama.state.log.count("/v1/chat/completions"), 0);
    // What every Ollama refuses too (broken syntax, an array, nothing) goes on for
    // Ollama's own answer, byte for byte, and is not counted.
    for body in [&br#"{"model":"llama3.2","#[..], br#"["llama3.2"]"#, b""] {
        let r = exchange(proxy.ollama, post("/api/chat", "", body)).await;
        assert_eq!(status_of(&r), 400, "{r}");
    }
    assert_eq!(ollama.state.log.count("/api/chat"), before + 3);
    assert_eq!(proxy.total(model).await, counted);

    // LM Studio reads JSON as JavaScript does: the last key wins, case matters.
    let body = r#"{"model":"nope","model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}]}"#;
    let r = exchange(
        proxy.lmstudio,
        post("/v1/chat/completions", "", body.as_bytes()),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
    let s = proxy.status().await;
    let lm: Vec<&str> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["provider"] == "lmstudio")
        .filter_map(|m| m["model"].as_str())
        .collect();
    assert_eq!(lm, ["qwen2.5-7b-instruct"], "{s}");
    for m in s["models"].as_array().unwrap() {
        assert_eq!(m["active_requests"], 0, "nothing left in flight: {m}");
    }
}

/// Issue 18 §1: web pages and DNS rebinding.
#[tokio::test]
async fn web_pages_cannot_drive_the_admin_api_or_reach_ollama_through_a_rebound_name() {
    let (ollama, lmstudio) = sims().await;
    let proxy = Proxy::start(&ollama.url(), &lmstudio.url()).await;
    let c = client();
    let admin = proxy.admin;
    let load = format!("http://{admin}/models/ollama/llama3.2/load");
    assert_eq!(send(&c, Method::POST, &load, &[], "").await.status, 200);
    assert_eq!(ollama.state.loaded().len(), 1);

    // A rebinding name on the admin listener: refused, reads too.
    for (method, path) in [
        ("GET", "/status"),
        ("POST", "/models/ollama/llama3.2/unload"),
    ] {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: rebind.evil.example:{}\r\nConnection: close\r\n\r\n",
            admin.port()
        );
        let r = exchange(admin, raw.into_bytes()).await;
        assert_eq!(status_of(&r), 403, "{r}");
        let e = json_body(&r)["error"].as_str().unwrap_or("").to_string();
        assert!(e.contains("DNS rebinding"), "{r}");
    }
    // A cross-site form post, a no-cors fetch, a same-site page on another port: refused.
    let unload = "/models/ollama/llama3.2/unload";
    for headers in [
        "Origin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\n",
        "Origin: http://evil.example\r\n",
        "Sec-Fetch-Site: cross-site\r\n",
        "Origin: http://127.0.0.1:3000\r\nSec-Fetch-Site: same-site\r\n",
        "Content-Type: text/plain\r\n",
    ] {
        let raw = format!(
            "POST {unload} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n",
            admin.port()
        );
        let r = exchange(admin, raw.into_bytes()).await;
        assert_eq!(status_of(&r), 403, "{headers:?}: {r}");
    }
    assert_eq!(ollama.state.loaded().len(), 1, "nothing was unloaded");
    // The dashboard's own request (same origin) and the CLI's work.
    let raw = format!(
        "POST {unload} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nOrigin: http://127.0.0.1:{p}\r\nSec-Fetch-Site: same-origin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        p = admin.port()
    );
    assert_eq!(status_of(&exchange(admin, raw.into_bytes()).await), 200);
    let admin_url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["load", "--admin", &admin_url, "ollama", "llama3.2"])
            .env_remove("LLM_WARDEN_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The Ollama listener applies Ollama's own Host rule (the proxy rewrites Host, which
    // would switch Ollama's off): a bare 403, and Ollama never asked.
    let before = ollama.state.log.total();
    let get = |host: &str| {
        format!("GET /api/tags HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let r = exchange(proxy.ollama, get("rebind.evil.example:11434")).await;
    assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\n"), "no body, as Ollama: {r}");
    let r = exchange(proxy.ollama, post("/api/chat", "", CHAT.as_bytes())).await;
    assert_eq!(status_of(&r), 200, "{r}");
    let rebound = String::from_utf8(post("/api/chat", "", CHAT.as_bytes()))
        .unwrap()
        .replace("Host: localhost", "Host: rebind.evil.example");
    assert_eq!(
        status_of(&exchange(proxy.ollama, rebound.into_bytes()).await),
        403
    );
    assert_eq!(
        ollama.state.log.total(),
        before + 1,
        "only the chat with a local Host went upstream"
    );
    for host in ["localhost:11434", "127.0.0.1", "box.local", "[::1]:11434"] {
        assert_eq!(
            status_of(&exchange(proxy.ollama, get(host)).await),
            200,
            "{host}"
        );
    }
    // `Origin` still goes upstream, so OLLAMA_ORIGINS applies: Ollama's own refusal.
    let r = exchange(
        proxy.ollama,
        b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(status_of(&r), 403, "{r}");
    // LM Studio has no Host check of its own, and the proxy adds none.
    let r = exchange(
        proxy.lmstudio,
        b"GET /v1/models HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
}

/// Issue 18 §5–7: framing and timing mistakes are the client's, in its format.
#[tokio::test]
async fn stalled_and_malformed_bodies_are_the_clients_fault_in_the_clients_format() {
    let (ollama, lmstudio) = sims().await;
    let proxy = Proxy::start(&ollama.url(), &lmstudio.url()).await;

    // An unimplemented transfer coding before `chunked`: 501, nothing forwarded.
    let r = exchange(
        proxy.ollama,
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(status_of(&r), 501, "{r}");

    // A malformed chunk on a pass-through path: 400 in Ollama's shape, counted as the
    // client's error (was 502 "upstream failed").
    let r = exchange(
        proxy.ollama,
        b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"mod\r\nzz\r\n".to_vec(),
    )
    .await;
    assert_eq!(status_of(&r), 400, "{r}");
    let e = json_body(&r)["error"].as_str().unwrap_or("").to_string();
    assert!(e.contains("not framed correctly"), "{r}");

    // A body trickled after complete headers: 408 after body_read_timeout (1 s here), in
    // each client's format, on inspected and pass-through paths alike.
    for (path, shape) in [
        ("/api/chat", "ollama"),
        ("/v1/chat/completions", "openai"),
        ("/api/show", "ollama"),
    ] {
        let began = Instant::now();
        let addr = proxy.ollama;
        let r = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            write!(
                s,
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{{\"model\""
            )
            .unwrap();
            let mut w = s.try_clone().unwrap();
            // A byte every 300 ms: never idle long, never done.
            std::thread::spawn(move || {
                for _ in 0..60 {
                    std::thread::sleep(Duration::from_millis(300));
                    if w.write_all(b" ").is_err() {
                        return;
                    }
                }
            });
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap();
        let took = began.elapsed();
        assert_eq!(status_of(&r), 408, "{path}: {r}");
        assert!(took < Duration::from_secs(10), "{path}: {took:?}");
        let v = json_body(&r);
        let message = match shape {
            "ollama" => v["error"].as_str(),
            _ => v["error"]["message"].as_str(),
        };
        assert!(
            message.unwrap_or("").contains("proxy.body_read_timeout"),
            "{r}"
        );
    }
    let c = client();
    let url = format!("http://{}/metrics", proxy.admin);
    let metrics = send(&c, Method::GET, &url, &[], "").await.text();
    assert!(!metrics.contains("upstream_failed"), "{metrics}");
    assert!(
        metrics.contains("kind=\"body_timeout\"") && metrics.contains("kind=\"body_read\""),
        "{metrics}"
    );
}
