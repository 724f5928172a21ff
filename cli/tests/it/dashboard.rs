//! The dashboard in a real browser: headless Chromium, driven over the DevTools protocol
//! (one WebSocket to `--remote-debugging-port`, a flat session on one page). The page must
//! show a model the admin API loads, and its Unload button must unload it; the test checks
//! that through `/status` and the simulator, and saves a screenshot to `target/dashboard.png`.
//!
//! Uses Chromium at `$LLM_WARDEN_CHROMIUM`, else `/usr/bin/chromium`, installing Debian's
//! package with `.ci/chromium-env.sh` when it is missing (needs root or sudo; the test fails
//! and says so if that does not work).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use llm_warden_sim::ollama::OllamaConfig;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Long enough for a cold browser start on a busy CI machine; a passing run takes ~2 s.
const DEADLINE: Duration = Duration::from_secs(30);
const ROW: &str = r#"#models tr[data-model="ollama0/llama3.2:latest"]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_loaded_model_and_its_unload_button_unloads_it() {
    let sim = start_ollama(OllamaConfig {
        load_latency: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let admin = format!("http://{}", proxy.admin_addr);

    // The page itself: one self-contained document, never cached.
    let page = get(&c, &format!("{admin}/")).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["cache-control"], "no-store");
    let html = page.text();
    for external in ["https://", "<link", "src=\"http", "url(http", "@import"] {
        assert!(
            !html.contains(external),
            "the page must not load `{external}`"
        );
    }
    assert_eq!(get(&c, &format!("{admin}/dashboard")).await.body, page.body);

    let mut browser = Browser::launch().await;
    let mut tab = browser.open(&format!("{admin}/")).await;
    tab.wait_for("the empty table", "!!document.getElementById('no-models')")
        .await;

    // A model loaded through the admin API, and a request to it, appear on the next poll.
    let r = post_json(&c, &format!("{admin}/models/ollama0/llama3.2/load"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    tab.wait_for(
        "the model's row, ready, with its request",
        &format!(
            "(() => {{ const r = document.querySelector('{ROW}');
                 return !!r && r.dataset.status === 'ready'
                   && r.querySelector('td[data-field=requests]').textContent === '1'; }})()"
        ),
    )
    .await;
    tab.wait_for(
        "the load in the events",
        "[...document.querySelectorAll('#events li[data-kind=lifecycle]')]
           .some(li => li.textContent.includes('llama3.2:latest loaded'))",
    )
    .await;

    // A real click (mouse pressed and released over the button), as a person would.
    let button = format!(r#"{ROW} button[data-action="unload"]"#);
    tab.wait_for(
        "an enabled Unload button",
        &format!("document.querySelector('{button}').disabled === false"),
    )
    .await;
    tab.click(&button).await;
    tab.wait_for(
        "the outcome of the unload",
        "document.getElementById('outcome').dataset.state === 'ok'",
    )
    .await;
    let outcome = tab
        .eval("document.getElementById('outcome').textContent")
        .await;
    assert!(
        outcome.as_str().is_some_and(|s| s.contains("now unloaded")),
        "{outcome}"
    );
    tab.wait_for(
        "the row shown unloaded, with its unload event",
        &format!(
            "document.querySelector('{ROW}').dataset.status === 'unloaded'
               && [...document.querySelectorAll('#events li[data-kind=lifecycle]')]
                    .some(li => li.textContent.includes('llama3.2:latest unloaded (asked'))"
        ),
    )
    .await;

    // The proxy and the provider agree.
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (m["status"].as_str(), m["unloads"].as_u64()),
        (Some("unloaded"), Some(1)),
        "{m}"
    );
    let events: Vec<(&str, &str)> = s["lifecycle_events"]
        .as_array()
        .expect("lifecycle_events")
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(events, [("load", "asked"), ("unload", "asked")]);
    assert!(
        sim.state.loaded().is_empty(),
        "the simulator still has {:?}",
        sim.state.loaded()
    );

    let errors = tab.errors();
    assert!(errors.is_empty(), "the page threw: {errors:?}");
    let png = tab.screenshot().await;
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("dashboard.png");
    std::fs::write(&target, png).expect("write the screenshot");
    eprintln!("screenshot: {}", target.display());
    let tab: TabId = tab.into();
    browser.close(tab).await;
    proxy.shutdown().await;
}

// === the browser ===

/// A headless Chromium with a fresh profile; killed (and its profile removed) on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    cdp: Cdp,
}

/// Debian's Chromium, installed by `.ci/chromium-env.sh` if it is missing (as the Python
/// clients and llama-server are for their tests).
fn install_chromium() -> PathBuf {
    let default = PathBuf::from("/usr/bin/chromium");
    if default.exists() {
        return default;
    }
    let script = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(".ci/chromium-env.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl Browser {
    async fn launch() -> Browser {
        let exe = match std::env::var_os("LLM_WARDEN_CHROMIUM") {
            Some(p) => PathBuf::from(p),
            None => tokio::task::spawn_blocking(install_chromium)
                .await
                .expect("the installer did not panic"),
        };
        assert!(
            exe.exists(),
            "Chromium not found at {} (set LLM_WARDEN_CHROMIUM, or `apt-get install -y chromium`)",
            exe.display()
        );
        let profile = std::env::temp_dir().join(format!(
            "llm-warden-dashboard-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&profile).expect("create the profile directory");
        let log = std::fs::File::create(profile.join("chromium.log")).expect("create the log");
        let child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--window-size=1280,900",
                // Port 0: Chromium picks one and writes it to DevToolsActivePort.
                "--remote-debugging-port=0",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", exe.display()));
        let mut browser = Browser {
            child,
            profile,
            cdp: Cdp::placeholder(),
        };
        let url = browser.devtools_url().await;
        browser.cdp = Cdp::connect(&url).await;
        browser
    }

    /// `ws://127.0.0.1:{port}{path}` from the profile's DevToolsActivePort (port, then path).
    async fn devtools_url(&mut self) -> String {
        let file = self.profile.join("DevToolsActivePort");
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return format!("ws://127.0.0.1:{port}{path}");
                }
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!(
                    "Chromium exited ({exit}) before it listened:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "Chromium wrote no DevToolsActivePort in {DEADLINE:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default()
    }

    /// A new page at `url`, attached in flat mode: its commands carry a `sessionId`.
    async fn open(&mut self, url: &str) -> Tab<'_> {
        let target = self
            .cdp
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let mut tab = Tab {
            cdp: &mut self.cdp,
            session,
            target_id,
        };
        tab.call("Runtime.enable", json!({})).await;
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        tab.call("Page.navigate", json!({ "url": url })).await;
        tab
    }

    async fn close(mut self, tab: TabId) {
        let _ = self
            .cdp
            .call(None, "Target.closeTarget", json!({ "targetId": tab.0 }))
            .await;
        let _ = self.cdp.send(None, "Browser.close", json!({})).await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One page of the browser.
struct Tab<'a> {
    cdp: &'a mut Cdp,
    session: String,
    target_id: String,
}

/// What `Browser::close` needs of a tab once the borrow ends.
struct TabId(String);

impl From<Tab<'_>> for TabId {
    fn from(t: Tab<'_>) -> Self {
        TabId(t.target_id)
    }
}

impl Tab<'_> {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.cdp.call(Some(&self.session), method, params).await
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("`{expression}` threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `predicate` (a JavaScript expression) until it is true, or fails after
    /// [`DEADLINE`] naming `what` and showing the page's text.
    async fn wait_for(&mut self, what: &str, predicate: &str) {
        let start = Instant::now();
        loop {
            // Before the page has loaded, the expression may throw: not yet.
            let r = self
                .call(
                    "Runtime.evaluate",
                    json!({ "expression": predicate, "returnByValue": true }),
                )
                .await;
            if r["result"]["value"] == true {
                return;
            }
            if start.elapsed() > DEADLINE {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "no {what} within {DEADLINE:?}; the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Scrolls `selector` into view and clicks its middle with the mouse.
    async fn click(&mut self, selector: &str) {
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector('{selector}');
                   e.scrollIntoView({{block: 'center'}});
                   const r = e.getBoundingClientRect();
                   return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (at[0].as_f64().expect("x"), at[1].as_f64().expect("y"));
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    async fn screenshot(&mut self) -> Vec<u8> {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        base64_decode(r["data"].as_str().expect("screenshot data"))
    }

    /// Uncaught exceptions the page reported (`Runtime.exceptionThrown`).
    fn errors(&self) -> Vec<Value> {
        self.cdp
            .events
            .iter()
            .filter(|e| e["method"] == "Runtime.exceptionThrown")
            .filter(|e| e["sessionId"] == self.session.as_str())
            .map(|e| e["params"]["exceptionDetails"].clone())
            .collect()
    }
}

// === the protocol ===

/// A DevTools protocol connection: numbered commands, answers matched by id, events kept.
struct Cdp {
    ws: Option<WebSocketStream<TcpStream>>,
    next_id: u64,
    events: Vec<Value>,
}

impl Cdp {
    fn placeholder() -> Cdp {
        Cdp {
            ws: None,
            next_id: 1,
            events: Vec::new(),
        }
    }

    async fn connect(url: &str) -> Cdp {
        let host = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("a ws:// URL");
        let tcp = TcpStream::connect(host)
            .await
            .unwrap_or_else(|e| panic!("connect to DevTools at {url}: {e}"));
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .unwrap_or_else(|e| panic!("DevTools handshake at {url}: {e}"));
        Cdp {
            ws: Some(ws),
            next_id: 1,
            events: Vec::new(),
        }
    }

    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let ws = self.ws.as_mut().expect("connected");
        ws.send(Message::Text(msg.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        id
    }

    /// Sends a command and waits for its answer (events that arrive meanwhile are kept).
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.send(session, method, params).await;
        let ws = self.ws.as_mut().expect("connected");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => panic!("no answer to {method} within {DEADLINE:?}"),
                Ok(None) => panic!("DevTools closed the connection during {method}"),
                Ok(Some(Err(e))) => panic!("DevTools connection, during {method}: {e}"),
                Ok(Some(Ok(msg))) => msg,
            };
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// Standard base64 (the screenshot), padding optional.
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c:?}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, d) in chunk.iter().enumerate() {
            n |= u32::from(*d) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}
