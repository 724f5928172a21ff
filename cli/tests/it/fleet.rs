//! Many hosts (issue 21): three nodes on loopback, each an Ollama simulator with an
//! llm-warden in front of it, and a front (`[[pools]]`) routing among them, all over real
//! sockets.

use std::time::Duration;

use crate::support::*;
use llm_warden_sim::ollama::OllamaConfig;

const LIMIT: Duration = Duration::from_secs(20);

/// One host: a simulator and the node in front of it.
pub(crate) struct Host {
    pub(crate) sim: llm_warden_sim::SimServer<llm_warden_sim::ollama::OllamaSim>,
    pub(crate) node: Option<llm_warden::app::Running>,
}

impl Host {
    pub(crate) async fn start(cfg: OllamaConfig) -> Host {
        let sim = start_ollama(cfg).await;
        let node = start_proxy(&[("ollama", sim.url())], "").await;
        Host {
            sim,
            node: Some(node),
        }
    }

    pub(crate) fn node(&self) -> &llm_warden::app::Running {
        self.node.as_ref().expect("the node runs")
    }

    /// `url` and `admin` for the front's config.
    pub(crate) fn entry(&self, name: &str) -> String {
        let n = self.node();
        format!(
            "{{ name = \"{name}\", url = \"http://{}\", admin = \"http://{}\" }}",
            n.proxy_addr(0),
            n.admin_addr
        )
    }

    /// Loads `model` on this host through its node's admin API.
    pub(crate) async fn load(&self, model: &str) {
        let url = format!(
            "http://{}/models/ollama0/{model}/load",
            self.node().admin_addr
        );
        let r = send(
            &client(),
            http::Method::POST,
            &url,
            &[],
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Requests the node counted for `model`.
    async fn total(&self, model: &str) -> u64 {
        let s = status(&client(), self.node()).await;
        s["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["model"] == model)
            .map(|m| m["total_requests"].as_u64().unwrap_or(0))
            .sum()
    }
}

/// Three hosts (`a`, `b`, `c`), each keeping at most `slots` models, and a front over them.
async fn fleet(cfg: OllamaConfig) -> (Vec<Host>, llm_warden::app::Running) {
    let mut hosts = Vec::new();
    for _ in 0..3 {
        hosts.push(Host::start(cfg.clone()).await);
    }
    let nodes: Vec<String> = ["a", "b", "c"]
        .iter()
        .zip(&hosts)
        .map(|(n, h)| h.entry(n))
        .collect();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\n\
         poll_interval = \"100ms\"\nnodes = [{}]\n",
        nodes.join(", ")
    );
    let front = start_config(&toml).await;
    (hosts, front)
}

/// A process started from `toml` (a front, a node or an EPP).
pub(crate) async fn start_config(toml: &str) -> llm_warden::app::Running {
    llm_warden::app::start(llm_warden::config::load_str(toml).expect("config"))
        .await
        .expect("it starts")
}

fn front_url(front: &llm_warden::app::Running, path: &str) -> String {
    format!("http://{}{path}", front.pool_addr(0))
}

pub(crate) fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}]})
    .to_string()
}

/// Waits until the front sees `model` ready on the node named `node`.
pub(crate) async fn seen_ready(front: &llm_warden::app::Running, node: &str) {
    wait_for("the front sees the load", LIMIT, || async {
        let s = status(&client(), front).await;
        s["pools"][0]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == node && n["up"] == true && n["view_seq"].as_u64().is_some())
    })
    .await;
}

#[tokio::test]
async fn a_request_goes_to_the_node_that_has_its_model() {
    let (hosts, front) = fleet(OllamaConfig::default()).await;
    let c = client();
    // Load llama3.2 on b only, through b's own admin API.
    hosts[1].load("llama3.2:latest").await;
    wait_for("the front sees llama3.2 ready on b", LIMIT, || async {
        let s = status(&c, &front).await;
        s["pools"][0]["nodes"][1]["ready"]
            .as_array()
            .is_some_and(|r| r.iter().any(|m| m == "llama3.2:latest"))
    })
    .await;
    for _ in 0..5 {
        let r = post_json(
            &c,
            &front_url(&front, "/api/chat"),
            &chat("llama3.2", false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["x-llm-warden-node"], "b");
        assert!(r.text().contains("\"done\":true"));
    }
    assert_eq!(hosts[0].sim.state.load_count("llama3.2:latest"), 0);
    assert_eq!(hosts[2].sim.state.load_count("llama3.2:latest"), 0);
    assert_eq!(hosts[1].sim.state.load_count("llama3.2:latest"), 1);
    // Lists are the union of the nodes'.
    let tags = get(&c, &front_url(&front, "/api/tags")).await;
    assert_eq!(tags.status, 200);
    let names: Vec<String> = tags.json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique, "each model once");
    assert!(names.iter().any(|n| n == "llama3.2:latest"), "{names:?}");
    front.shutdown().await;
}

#[tokio::test]
async fn a_burst_for_an_unloaded_model_loads_it_on_exactly_one_node() {
    let (hosts, front) = fleet(OllamaConfig {
        load_latency: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    for name in ["a", "b", "c"] {
        seen_ready(&front, name).await;
    }
    let c = client();
    let burst = (0..20).map(|_| {
        let (c, url) = (c.clone(), front_url(&front, "/api/chat"));
        async move { post_json(&c, &url, &chat("qwen2.5:7b", false)).await }
    });
    let replies = futures_util::future::join_all(burst).await;
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let loads: Vec<usize> = hosts
        .iter()
        .map(|h| h.sim.state.load_count("qwen2.5:7b"))
        .collect();
    assert_eq!(
        loads.iter().sum::<usize>(),
        1,
        "one load in the fleet: {loads:?}"
    );
    let node = replies[0].headers["x-llm-warden-node"].clone();
    assert!(
        replies
            .iter()
            .all(|r| r.headers["x-llm-warden-node"] == node),
        "all on the loading node"
    );
    // The front's totals are the nodes' totals.
    let s = status(&c, &front).await;
    let routed: u64 = s["pools"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["routed"].as_u64().unwrap())
        .sum();
    let mut counted = 0;
    for h in &hosts {
        counted += h.total("qwen2.5:7b").await;
    }
    assert_eq!(routed, 20);
    assert_eq!(counted, 20);
    front.shutdown().await;
}

#[tokio::test]
async fn streams_pass_through_the_front_chunk_by_chunk() {
    let (hosts, front) = fleet(OllamaConfig {
        token_delay: Duration::from_millis(40),
        reply_tokens: 6,
        ..Default::default()
    })
    .await;
    seen_ready(&front, "a").await;
    let c = client();
    let r = post_json(&c, &front_url(&front, "/api/chat"), &chat("llama3.2", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = r.text().lines().count();
    assert!(lines >= 7, "{}", r.text());
    assert!(
        r.frames.len() >= 6,
        "{} frames for {lines} lines: relayed as they came",
        r.frames.len()
    );
    let spread = r.frames.last().unwrap().0 - r.frames.first().unwrap().0;
    assert!(
        spread >= Duration::from_millis(150),
        "frames spread over {spread:?}"
    );
    drop(hosts);
    front.shutdown().await;
}

#[tokio::test]
async fn a_killed_node_is_routed_around_and_comes_back() {
    let (mut hosts, front) = fleet(OllamaConfig::default()).await;
    for name in ["a", "b", "c"] {
        seen_ready(&front, name).await;
    }
    let c = client();
    // llama3.2 lands on one node; kill that node.
    let r = post_json(
        &c,
        &front_url(&front, "/api/chat"),
        &chat("llama3.2", false),
    )
    .await;
    assert_eq!(r.status, 200);
    let first = r.headers["x-llm-warden-node"].to_str().unwrap().to_string();
    let k = ["a", "b", "c"].iter().position(|n| *n == first).unwrap();
    let killed = hosts[k].node.take().expect("running");
    let (listen, admin) = (killed.proxy_addr(0), killed.admin_addr);
    drop(killed);
    // Every request still succeeds, on the other nodes.
    for _ in 0..10 {
        let r = post_json(
            &c,
            &front_url(&front, "/api/chat"),
            &chat("llama3.2", false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(r.headers["x-llm-warden-node"], first.as_str());
    }
    wait_for("the killed node out of rotation", LIMIT, || async {
        let s = status(&c, &front).await;
        s["pools"][0]["nodes"][k]["up"] == false && s["pools"][0]["nodes_up"] == 2
    })
    .await;
    // Started again on the same addresses, it is back in rotation by itself.
    let toml = format!(
        "[admin]\nlisten = \"{admin}\"\n[[providers]]\nname = \"ollama0\"\nkind = \"ollama\"\n\
         listen = \"{listen}\"\nupstream = \"{}\"\n",
        hosts[k].sim.url()
    );
    let again = start_config(&toml).await;
    wait_for("the node back in rotation", LIMIT, || async {
        status(&c, &front).await["pools"][0]["nodes_up"] == 3
    })
    .await;
    again.shutdown().await;
    front.shutdown().await;
}

/// A stand-in node: its view says `llama3.2:latest` is ready, and its provider listener
/// answers every model request with Ollama's 503 for a full queue. Returns its address
/// (the view and the requests on one listener).
async fn refusing_node() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let view = serde_json::json!({"format": 1, "seq": 1, "started_at": "2026-12-06T00:00:00Z",
        "version": "test", "memory": {"total_mb": 65536, "available_mb": 60000,
            "ram_total_mb": 65536, "ram_available_mb": 60000, "pressure_level": "normal",
            "sampled_at": ""},
        "providers": [{"name": "ollama0", "kind": "ollama", "listen": addr.to_string(),
            "reachable": true, "managed": true, "max_models_loaded": 2,
            "memory_budget_mb": 50000, "queued": 0,
            "models": [{"model": "llama3.2:latest", "state": "ready", "in_flight": 0,
                "queued": 0, "memory_mb": 2000, "pinned": false, "last_used": 1}]}]})
    .to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let view = view.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request per connection: its head, then its declared body.
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap_or(0));
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let (status, body) = if head.starts_with("get /node") {
                        ("200 OK", view.clone())
                    } else {
                        (
                            "503 Service Unavailable",
                            r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#
                                .to_string(),
                        )
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    return;
                }
            });
        }
    });
    addr
}

/// A node that answers 503 (its queue is full) is skipped for the next ranked node before
/// any byte reaches the client; the retry is counted.
#[tokio::test]
async fn a_node_that_refuses_is_skipped_for_the_next() {
    let fake = refusing_node().await;
    let real = Host::start(OllamaConfig::default()).await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n\
         nodes = [{{ name = \"busy\", url = \"http://{fake}\", admin = \"http://{fake}\" }}, {}]\n",
        real.entry("real")
    );
    let front = start_config(&toml).await;
    seen_ready(&front, "busy").await;
    seen_ready(&front, "real").await;
    let c = client();
    let r = post_json(
        &c,
        &front_url(&front, "/api/chat"),
        &chat("llama3.2", false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-llm-warden-node"], "real");
    let s = status(&c, &front).await;
    let nodes = &s["pools"][0]["nodes"];
    assert_eq!(nodes[0]["retries"], 1, "{nodes}");
    assert_eq!(nodes[0]["routed"], 0, "{nodes}");
    assert_eq!(nodes[1]["routed"], 1, "{nodes}");
    front.shutdown().await;
}

/// With no node up, the front answers 503 itself, with `retry-after`, in each API's shape.
#[tokio::test]
async fn with_every_node_down_the_front_answers_in_the_clients_format() {
    let dead = listener().await.local_addr().unwrap();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\n\
         nodes = [{{ url = \"http://{dead}\", admin = \"http://{dead}\" }}]\n"
    );
    let front = start_config(&toml).await;
    let c = client();
    let r = post_json(
        &c,
        &front_url(&front, "/api/chat"),
        &chat("llama3.2", false),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.json()["error"].as_str().unwrap().contains("no node"),
        "{}",
        r.text()
    );
    let openai = serde_json::json!({"model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let r = post_json(&c, &front_url(&front, "/v1/chat/completions"), &openai).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_node", "{}", r.text());
    let messages = serde_json::json!({"model": "llama3.2", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let r = post_json(&c, &front_url(&front, "/v1/messages"), &messages).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(
        r.json()["error"]["type"],
        "overloaded_error",
        "{}",
        r.text()
    );
    // Bad input is the front's to refuse, in the same shapes.
    let r = post_json(&c, &front_url(&front, "/api/chat"), "{\"model\":").await;
    assert_eq!(
        r.status, 503,
        "a body without a model goes to a node: none is up"
    );
    let s = status(&c, &front).await;
    assert_eq!(s["pools"][0]["nodes_up"], 0);
    assert_eq!(s["pools"][0]["refused"], 4);
    front.shutdown().await;
}

/// A node killed while it streams: the client's NDJSON stream ends with an `{"error"}`
/// line naming the node (as Ollama ends a stream that failed), not a cut connection.
#[tokio::test]
async fn a_node_killed_mid_stream_ends_the_stream_with_an_error_line() {
    let mut host = Host::start(OllamaConfig {
        token_delay: Duration::from_millis(100),
        reply_tokens: 50,
        ..Default::default()
    })
    .await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n\
         nodes = [{}]\n",
        host.entry("a")
    );
    let front = start_config(&toml).await;
    seen_ready(&front, "a").await;
    let c = client();
    let url = front_url(&front, "/api/chat");
    let streaming = tokio::spawn(async move { post_json(&c, &url, &chat("llama3.2", true)).await });
    wait_for("the stream under way", LIMIT, || async {
        host.sim.state.active_requests() == 1
    })
    .await;
    drop(host.node.take());
    let r = streaming.await.unwrap();
    assert_eq!(r.status, 200);
    let text = r.text();
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect(last);
    assert!(
        v["error"].as_str().unwrap_or_default().contains("node `a`"),
        "{text}"
    );
    assert!(
        !text.contains("\"done\":true"),
        "cut before its end: {text}"
    );
    front.shutdown().await;
}

/// Processes killed when the test ends, however it ends.
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The release or debug binary's process, its output to a file in `dir`.
fn spawn(dir: &std::path::Path, name: &str, args: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    std::process::Command::new(env!("CARGO_BIN_EXE_llm-warden"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("the binary starts")
}

/// The issue's setup as users run it: three hosts, each `llm-warden simulate` and
/// `llm-warden serve` as processes, and a front (`llm-warden serve` with `[[pools]]`). A
/// burst for an unloaded model loads it once; a host's node killed mid-run (SIGKILL) is
/// routed around with every request answered; the front's routed total equals the nodes'
/// counts; streams arrive in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_hosts_and_a_front() {
    let dir = std::env::temp_dir().join(format!("llm-warden-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut procs = Procs(Vec::new());
    let mut admins = Vec::new();
    let mut entries = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let (sim, node, admin) = (free_port(), free_port(), free_port());
        procs.0.push(spawn(
            &dir,
            &format!("sim-{name}"),
            &[
                "simulate",
                "ollama",
                "--listen",
                &format!("127.0.0.1:{sim}"),
                "--load-latency",
                "300ms",
                "--token-delay",
                "30ms",
            ],
        ));
        let cfg = dir.join(format!("node-{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[providers]]\nname = \"ollama\"\n\
                 kind = \"ollama\"\nlisten = \"127.0.0.1:{node}\"\nupstream = \"http://127.0.0.1:{sim}\"\n\
                 max_models_loaded = 2\npoll_interval = \"200ms\"\n"
            ),
        )
        .unwrap();
        procs.0.push(spawn(
            &dir,
            &format!("node-{name}"),
            &["serve", "--config", cfg.to_str().unwrap()],
        ));
        admins.push(format!("http://127.0.0.1:{admin}"));
        entries.push(format!(
            "{{ name = \"{name}\", url = \"http://127.0.0.1:{node}\", admin = \"http://127.0.0.1:{admin}\" }}"
        ));
        let _ = i;
    }
    let (front_port, front_admin) = (free_port(), free_port());
    let cfg = dir.join("front.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{front_admin}\"\n[[pools]]\nname = \"gpus\"\n\
             kind = \"ollama\"\nlisten = \"127.0.0.1:{front_port}\"\npoll_interval = \"200ms\"\n\
             nodes = [{}]\n",
            entries.join(", ")
        ),
    )
    .unwrap();
    procs.0.push(spawn(
        &dir,
        "front",
        &["serve", "--config", cfg.to_str().unwrap()],
    ));
    let c = client();
    let front_status = format!("http://127.0.0.1:{front_admin}/status");
    wait_for(
        "the front sees three nodes up",
        Duration::from_secs(60),
        || async {
            // Not listening yet: `send` would panic.
            if tokio::net::TcpStream::connect(("127.0.0.1", front_admin))
                .await
                .is_err()
            {
                return false;
            }
            let r = send(
                &c,
                http::Method::GET,
                &front_status,
                &[],
                bytes::Bytes::new(),
            )
            .await;
            r.status == 200 && r.json()["pools"][0]["nodes_up"] == 3
        },
    )
    .await;
    let url = format!("http://127.0.0.1:{front_port}/api/chat");

    // A burst for a model no node has: one load in the fleet.
    let burst = (0..20).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move { post_json(&c, &url, &chat("qwen2.5:7b", false)).await }
    });
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let loads = |admin: String| {
        let c = c.clone();
        async move {
            let r = send(
                &c,
                http::Method::GET,
                &format!("{admin}/status"),
                &[],
                bytes::Bytes::new(),
            )
            .await;
            r.json()["models"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["model"] == "qwen2.5:7b")
                .map(|m| m["loads"].as_u64().unwrap_or(0))
                .sum::<u64>()
        }
    };
    let mut total_loads = 0;
    for a in &admins {
        total_loads += loads(a.clone()).await;
    }
    assert_eq!(total_loads, 1, "one load of qwen2.5:7b in the fleet");

    // A stream through the front, in pieces.
    let r = post_json(&c, &url, &chat("qwen2.5:7b", true)).await;
    assert_eq!(r.status, 200);
    assert!(r.frames.len() >= 4, "{} frames", r.frames.len());

    // Kill the node serving qwen (its process, SIGKILL) mid-run: every request is answered.
    let serving = r.headers["x-llm-warden-node"].to_str().unwrap().to_string();
    let k = ["a", "b", "c"].iter().position(|n| *n == serving).unwrap();
    let mut answered = 0;
    for i in 0..30 {
        if i == 10 {
            // Procs: sim, node per host; the node of host k is at 2k + 1.
            procs.0[2 * k + 1].kill().expect("kill");
        }
        let r = post_json(&c, &url, &chat("qwen2.5:7b", false)).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        answered += 1;
    }
    assert_eq!(answered, 30);
    // The front's routed total is what the live nodes counted, plus what the killed one
    // had counted before it died (read from the front's own routed counter for it).
    let s = send(
        &c,
        http::Method::GET,
        &front_status,
        &[],
        bytes::Bytes::new(),
    )
    .await
    .json();
    let nodes = s["pools"][0]["nodes"].as_array().unwrap();
    let routed: u64 = nodes.iter().map(|n| n["routed"].as_u64().unwrap()).sum();
    assert_eq!(routed, 20 + 1 + 30);
    let mut counted = nodes[k]["routed"].as_u64().unwrap();
    for (i, a) in admins.iter().enumerate().filter(|(i, _)| *i != k) {
        let r = send(
            &c,
            http::Method::GET,
            &format!("{a}/status"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
        let n: u64 = r.json()["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["total_requests"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(n, nodes[i]["routed"].as_u64().unwrap(), "node {i}");
        counted += n;
    }
    assert_eq!(counted, routed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a careless or hostile client sends a front: a foreign `Host` (DNS rebinding), a body
/// over the limit, and a flood of invented model names. Each gets the answer a provider
/// listener gives; invented names load nothing and leave no choice behind.
#[tokio::test]
async fn the_front_refuses_what_a_provider_listener_refuses() {
    let hosts = vec![
        Host::start(OllamaConfig::default()).await,
        Host::start(OllamaConfig::default()).await,
    ];
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[proxy]\nmax_request_body = \"4KiB\"\n\
         [[pools]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n\
         nodes = [{}, {}]\n",
        hosts[0].entry("a"),
        hosts[1].entry("b")
    );
    let front = start_config(&toml).await;
    seen_ready(&front, "a").await;
    seen_ready(&front, "b").await;
    let c = client();
    let url = front_url(&front, "/api/chat");
    let r = send(
        &c,
        http::Method::POST,
        &url,
        &[("host", "evil.example:11434")],
        chat("llama3.2", false),
    )
    .await;
    assert_eq!(r.status, 403);
    let big = serde_json::json!({"model": "llama3.2",
        "messages": [{"role": "user", "content": "x".repeat(10_000)}]})
    .to_string();
    let r = post_json(&c, &url, &big).await;
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("max_request_body"));
    for i in 0..50 {
        let r = post_json(&c, &url, &chat(&format!("invented-{i}"), false)).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(r.json()["error"], format!("model 'invented-{i}' not found"));
    }
    let s = status(&c, &front).await;
    assert_eq!(s["pools"][0]["pending_loads"], 0, "{}", s["pools"]);
    for h in &hosts {
        assert!(h.sim.state.loaded().is_empty(), "nothing loaded");
    }
    front.shutdown().await;
}

/// A pass-through request with a large body reaches a node as it would the node itself,
/// whether the front's server read the body with the head or streams it.
#[tokio::test]
async fn a_large_pass_through_body_is_forwarded_not_refused() {
    let host = Host::start(OllamaConfig::default()).await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n\
         nodes = [{}]\n",
        host.entry("a")
    );
    let front = start_config(&toml).await;
    seen_ready(&front, "a").await;
    let c = client();
    for size in [10_000, 200_000, 2_000_000] {
        let body =
            serde_json::json!({"model": "llama3.2", "padding": "x".repeat(size)}).to_string();
        let direct = post_json(
            &c,
            &format!("http://{}/api/show", host.node().proxy_addr(0)),
            &body,
        )
        .await;
        let through = post_json(&c, &front_url(&front, "/api/show"), &body).await;
        assert_ne!(through.status, 413, "{size}: {}", through.text());
        assert_eq!(through.status, direct.status, "{size}: {}", through.text());
        assert_eq!(through.body, direct.body, "{size}");
    }
    front.shutdown().await;
}
