//! The node view (`GET /node`, `GET /node?watch=1`): what a front routing among nodes reads.
//! It must show a load and a request in flight, its `seq` must rise on a change, and the
//! stream must deliver an event after one, with the owners' change signal (no polling).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use llm_warden::fleet::view::{NodeView, FORMAT};
use llm_warden::lifecycle::ModelStatus;
use llm_warden_sim::ollama::OllamaConfig;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(10);
const MODEL: &str = "llama3.2:latest";

async fn node(c: &TestClient, proxy: &llm_warden::app::Running) -> NodeView {
    let r = get(c, &format!("http://{}/node", proxy.admin_addr)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// The model's (state, in flight) on the only provider, if the view lists it.
fn model(v: &NodeView) -> Option<(ModelStatus, u32)> {
    v.providers[0].model(MODEL).map(|m| (m.state, m.in_flight))
}

/// An open `/node?watch=1` stream: events are read one at a time, each within a limit.
struct Events {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Events {
    async fn open(c: &TestClient, proxy: &llm_warden::app::Running) -> Events {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("http://{}/node?watch=1", proxy.admin_addr))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = c.request(req).await.expect("the stream opens");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Events {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next `data:` event's view (comments are skipped); fails after `LIMIT`.
    async fn next(&mut self) -> NodeView {
        tokio::time::timeout(LIMIT, async {
            loop {
                if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = self.buf.drain(..end + 2).collect();
                    let text = String::from_utf8(event).expect("utf-8");
                    if let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                        return serde_json::from_str(data).expect("an event is a view");
                    }
                    continue;
                }
                let frame = self
                    .body
                    .frame()
                    .await
                    .expect("the stream stays open")
                    .expect("no body error");
                if let Ok(data) = frame.into_data() {
                    self.buf.extend_from_slice(&data);
                }
            }
        })
        .await
        .expect("an event within the limit")
    }

    /// Reads events until one satisfies `cond`.
    async fn until(&mut self, what: &str, cond: impl Fn(&NodeView) -> bool) -> NodeView {
        tokio::time::timeout(LIMIT, async {
            loop {
                let v = self.next().await;
                if cond(&v) {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no event with {what} within {LIMIT:?}"))
    }
}

#[tokio::test]
async fn the_node_view_shows_loads_and_requests_and_streams_each_change() {
    let sim = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(20),
        reply_tokens: 50,
        ..Default::default()
    })
    .await;
    // No memory sample and no periodic poll during the test: every change must come from
    // its owner's signal (a sample, or the actor hearing a poll, would ring too and mask a
    // missing one).
    let proxy = start_proxy(
        &[("ollama", sim.url())],
        "poll_interval = \"1h\"\n[memory_pressure]\nsample_interval = \"1h\"\n",
    )
    .await;
    let c = client();

    let first = node(&c, &proxy).await;
    assert_eq!(first.format, FORMAT);
    assert_eq!(first.providers.len(), 1);
    let p = &first.providers[0];
    assert_eq!(
        (p.name.as_str(), p.kind.as_str(), p.reachable, p.managed),
        ("ollama0", "ollama", true, true)
    );
    assert_eq!(p.listen, proxy.proxy_addr(0).to_string());
    assert_eq!(model(&first), None, "nothing loaded or asked yet");

    let mut events = Events::open(&c, &proxy).await;
    let at_connect = events.next().await;
    assert!(at_connect.seq >= first.seq);
    assert_eq!(model(&at_connect), None);

    // A streamed chat: the model loads, then the request is in flight.
    let chat = spawn_chat(&c, format!("http://{}/api/chat", proxy.proxy_addr(0)));
    wait_for("the simulator streams", LIMIT, || async {
        sim.state.active_requests() == 1
    })
    .await;
    let busy = node(&c, &proxy).await;
    assert_eq!(model(&busy), Some((ModelStatus::Ready, 1)), "{busy:?}");
    assert!(
        busy.seq > first.seq,
        "seq rose: {} -> {}",
        first.seq,
        busy.seq
    );
    let m = busy.providers[0].model(MODEL).expect("listed");
    assert!(m.memory_mb.is_some_and(|mb| mb > 0), "{m:?}");
    assert!(m.context_length.is_some(), "{m:?}");
    // The stream tells, without the test asking the node.
    let streamed = events
        .until("the request in flight", |v| {
            model(v) == Some((ModelStatus::Ready, 1))
        })
        .await;
    assert!(streamed.seq > at_connect.seq);

    // The request ends: in flight back to 0, on the stream and in a new GET.
    let reply = chat.await.expect("the chat task");
    assert_eq!(reply.status, 200);
    let done = events
        .until("no request in flight", |v| {
            model(v) == Some((ModelStatus::Ready, 0))
        })
        .await;
    assert!(done.seq > streamed.seq);
    let after = node(&c, &proxy).await;
    assert_eq!(model(&after), Some((ModelStatus::Ready, 0)));
    assert!(after.seq >= done.seq);

    // A second chat takes its lease on the fast path (the model is ready), which the actor
    // does not hear of: the lease gate's own signal must reach the stream.
    let second = spawn_chat(&c, format!("http://{}/api/chat", proxy.proxy_addr(0)));
    let fast = events
        .until("the second request in flight", |v| {
            model(v) == Some((ModelStatus::Ready, 1))
        })
        .await;
    assert!(fast.seq > after.seq);
    assert_eq!(second.await.expect("the chat task").status, 200);
    events
        .until("the second request done", |v| {
            model(v) == Some((ModelStatus::Ready, 0))
        })
        .await;

    // An unload, asked through the admin API, is streamed too.
    let r = send(
        &c,
        Method::POST,
        &format!("http://{}/models/ollama0/{MODEL}/unload", proxy.admin_addr),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    events
        .until("the model unloaded", |v| {
            model(v).is_some_and(|(s, _)| s == ModelStatus::Unloaded)
        })
        .await;
    drop(events);
    proxy.shutdown().await;
}

/// `/node` follows `/status`'s rules: open without a token, refused with a wrong one.
#[tokio::test]
async fn the_node_view_takes_the_admin_token_as_status_does() {
    let sim = start_ollama(Default::default()).await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret-token\"\n\
         [[providers]]\nname = \"o\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        sim.url()
    );
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&toml).expect("config"))
        .await
        .expect("starts");
    let c = client();
    let url = format!("http://{}/node", proxy.admin_addr);
    assert_eq!(get(&c, &url).await.status, 200);
    let right = send(
        &c,
        Method::GET,
        &url,
        &[("authorization", "Bearer s3cret-token")],
        Bytes::new(),
    )
    .await;
    assert_eq!(right.status, 200);
    for u in [url.clone(), format!("{url}?watch=1")] {
        let wrong = send(
            &c,
            Method::GET,
            &u,
            &[("authorization", "Bearer nope")],
            Bytes::new(),
        )
        .await;
        assert_eq!(wrong.status, 401, "{u}");
    }
    let post = send(&c, Method::POST, &url, &[], Bytes::new()).await;
    assert_eq!(post.status, 405);
    // An open stream does not hold up the shutdown: it ends when the node stops.
    let mut events = Events::open(&c, &proxy).await;
    events.next().await;
    tokio::time::timeout(LIMIT, proxy.shutdown())
        .await
        .expect("the shutdown is not held up by the stream");
    let end = tokio::time::timeout(LIMIT, events.body.frame()).await;
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the stream ended"
    );
}
