//! Many hosts (issue 21): three nodes on loopback, each an Ollama simulator with an
//! llm-warden in front of it, and a front (`[[pools]]`) routing among them, all over real
//! sockets.

use std::time::Duration;

use crate::support::*;
use llm_warden_sim::ollama::OllamaConfig;

const LIMIT: Duration = Duration::from_secs(20);

/// One host: a simulator and the node in front of it.
struct Host {
    sim: llm_warden_sim::SimServer<llm_warden_sim::ollama::OllamaSim>,
    node: Option<llm_warden::app::Running>,
}

impl Host {
    async fn start(cfg: OllamaConfig) -> Host {
        let sim = start_ollama(cfg).await;
        let node = start_proxy(&[("ollama", sim.url())], "").await;
        Host {
            sim,
            node: Some(node),
        }
    }

    fn node(&self) -> &llm_warden::app::Running {
        self.node.as_ref().expect("the node runs")
    }

    /// `url` and `admin` for the front's config.
    fn entry(&self, name: &str) -> String {
        let n = self.node();
        format!(
            "{{ name = \"{name}\", url = \"http://{}\", admin = \"http://{}\" }}",
            n.proxy_addr(0),
            n.admin_addr
        )
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
    let front = llm_warden::app::start(llm_warden::config::load_str(&toml).expect("config"))
        .await
        .expect("the front starts");
    (hosts, front)
}

fn front_url(front: &llm_warden::app::Running, path: &str) -> String {
    format!("http://{}{path}", front.pool_addr(0))
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}]})
    .to_string()
}

/// Waits until the front sees `model` ready on the node named `node`.
async fn seen_ready(front: &llm_warden::app::Running, node: &str) {
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
    let r = send(
        &c,
        http::Method::POST,
        &format!(
            "http://{}/models/ollama0/llama3.2:latest/load",
            hosts[1].node().admin_addr
        ),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
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
    front.shutdown().await;
}
