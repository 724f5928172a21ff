//! Streams pass through frame by frame, in both directions, and a client that leaves drops
//! the upstream request.
//!
//! The upstream here is a gate the test holds: it writes the next frame only when the test
//! says so. A chunk that reaches the client while the upstream has not yet produced the next
//! one cannot have been buffered, so no clock is involved.

use std::convert::Infallible;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

/// What the gated upstream hands the test for each request it receives.
struct Upstream {
    path: String,
    /// Frames written to the response; dropping it ends the response.
    tx: mpsc::Sender<Bytes>,
    /// The request body as it arrives, frame by frame.
    body: Incoming,
}

/// A server whose responses the test writes by hand, one frame at a time.
async fn gated_upstream(content_type: &'static str) -> (String, mpsc::Receiver<Upstream>) {
    let listener = listener().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (reqs_tx, reqs_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let reqs_tx = reqs_tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let reqs_tx = reqs_tx.clone();
                    async move {
                        let (tx, rx) = mpsc::channel::<Bytes>(1);
                        let path = req.uri().path().to_string();
                        if is_poll(&path) {
                            // The proxy's provider poll: model `m:1` is loaded, so the
                            // proxy forwards requests for it without loading it first.
                            let _ = tx.send(Bytes::from_static(loaded_list(&path))).await;
                        } else {
                            let _ = reqs_tx
                                .send(Upstream {
                                    path,
                                    tx,
                                    body: req.into_body(),
                                })
                                .await;
                        }
                        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                            rx.recv()
                                .await
                                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                        });
                        let mut resp = Response::new(StreamBody::new(frames));
                        resp.headers_mut()
                            .insert("content-type", content_type.parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, reqs_rx)
}

const LIMIT: Duration = Duration::from_secs(5);

/// Whether the proxy polls `path` for loaded models (or the catalogue); the gated upstream answers those itself.
fn is_poll(path: &str) -> bool {
    use llm_warden::providers::ProviderKind;
    [ProviderKind::Ollama, ProviderKind::LmStudio]
        .iter()
        .any(|k| k.facts().loaded_paths.contains(&path) || k.facts().catalog_path == Some(path))
        // The memory table asks each loaded Ollama model's geometry once.
        || path == "/api/show"
}

/// The poll answer listing `m:1` as loaded, in the shape of the provider polled.
fn loaded_list(path: &str) -> &'static [u8] {
    if path == "/api/ps" {
        br#"{"models":[{"name":"m:1","model":"m:1","size":1000,"size_vram":0,"context_length":4096}]}"#
    } else if path == "/api/v1/models" {
        br#"{"models":[{"key":"m:1","size_bytes":1000,"loaded_instances":[{"id":"m:1","config":{"context_length":4096}}]}]}"#
    } else if path == "/api/show" {
        br#"{"model_info":{}}"#
    } else {
        br#"{"data":[]}"#
    }
}

/// The next request that reaches the test.
async fn next_request(upstream: &mut mpsc::Receiver<Upstream>) -> Upstream {
    tokio::time::timeout(LIMIT, upstream.recv())
        .await
        .expect("a request reaches the upstream")
        .expect("upstream is running")
}

async fn next_frame(body: &mut Incoming) -> Bytes {
    let frame = tokio::time::timeout(LIMIT, body.frame())
        .await
        .expect("the frame reached the client before the upstream wrote the next one")
        .expect("body has a frame")
        .expect("frame is ok");
    frame.into_data().expect("a data frame")
}

async fn relays_each_frame_before_the_next_exists(
    kind: &str,
    path: &str,
    frames: &[&'static str],
    usage: (u64, u64),
) {
    let (url, mut upstream) = gated_upstream(if kind == "ollama" {
        "application/x-ndjson"
    } else {
        "text/event-stream"
    })
    .await;
    let proxy = start_proxy(&[(kind, url)], "").await;
    let c = client();
    let req = Request::post(format!("http://{}{path}", proxy.proxy_addr(0)))
        .body(http_body_util::Full::new(Bytes::from_static(
            br#"{"model":"m:1","stream":true}"#,
        )))
        .unwrap();
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.request(req).await.unwrap() }
    });
    let up = next_request(&mut upstream).await;
    assert_eq!(up.path, path);
    up.tx.send(Bytes::from(frames[0])).await.unwrap();
    let resp = pending.await.unwrap();
    let mut body = resp.into_body();
    assert_eq!(next_frame(&mut body).await, frames[0]);
    // While the stream is open the request is in flight.
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, &format!("{kind}0"), "m:1")["active_requests"],
        1
    );
    for f in &frames[1..] {
        up.tx.send(Bytes::from(*f)).await.unwrap();
        assert_eq!(next_frame(&mut body).await, *f);
    }
    drop(up.tx);
    assert!(
        body.frame().await.is_none(),
        "the stream ends when the upstream's does"
    );
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, &format!("{kind}0"), "m:1");
    assert_eq!(m["active_requests"], 0);
    assert_eq!(
        (m["prompt_tokens"].as_u64(), m["completion_tokens"].as_u64()),
        (Some(usage.0), Some(usage.1))
    );
    assert_eq!(m["errors"], 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn ndjson_chunks_are_relayed_as_they_are_written() {
    relays_each_frame_before_the_next_exists(
        "ollama",
        "/api/chat",
        &[
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n",
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\" there\"},\"done\":false}\n",
            // The final line split mid-number: the usage must still be read whole.
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"prompt_eval_count\":2",
            "6,\"eval_count\":2}\n",
        ],
        (26, 2),
    )
    .await;
}

#[tokio::test]
async fn sse_events_are_relayed_as_they_are_written() {
    relays_each_frame_before_the_next_exists(
        "lmstudio",
        "/v1/chat/completions",
        &[
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":24,\"completion_tokens\":3,\"total_tokens\":27}}\n\n",
            "data: [DONE]\n\n",
        ],
        (24, 3),
    )
    .await;
}

#[tokio::test]
async fn pass_through_request_bodies_stream_to_the_upstream() {
    let (url, mut upstream) = gated_upstream("application/x-ndjson").await;
    let proxy = start_proxy(&[("ollama", url)], "").await;
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(1);
    let frames = Box::pin(futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::post(format!("http://{}/api/create", proxy.proxy_addr(0)))
        .body(StreamBody::new(frames))
        .unwrap();
    let pending = tokio::spawn(async move { c.request(req).await });
    body_tx
        .send(Bytes::from_static(b"{\"model\":\"big\","))
        .await
        .unwrap();
    let mut up = next_request(&mut upstream).await;
    // The upstream sees the first part while the client has not written the rest.
    assert_eq!(next_frame(&mut up.body).await, &b"{\"model\":\"big\","[..]);
    body_tx
        .send(Bytes::from_static(b"\"from\":\"x\"}"))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut up.body).await, &b"\"from\":\"x\"}"[..]);
    drop(body_tx);
    up.tx
        .send(Bytes::from_static(b"{\"status\":\"success\"}\n"))
        .await
        .unwrap();
    drop(up.tx);
    let resp = pending.await.unwrap().unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, &b"{\"status\":\"success\"}\n"[..]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_drops_the_upstream_request() {
    let (url, mut upstream) = gated_upstream("application/x-ndjson").await;
    let proxy = start_proxy(&[("ollama", url)], "").await;
    let c = client();
    let req = Request::post(format!("http://{}/api/generate", proxy.proxy_addr(0)))
        .body(http_body_util::Full::new(Bytes::from_static(
            br#"{"model":"m:1","prompt":"hi"}"#,
        )))
        .unwrap();
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.request(req).await.unwrap() }
    });
    let up = next_request(&mut upstream).await;
    up.tx
        .send(Bytes::from_static(b"{\"response\":\"a\",\"done\":false}\n"))
        .await
        .unwrap();
    let mut body = pending.await.unwrap().into_body();
    next_frame(&mut body).await;
    drop(body);
    drop(c);
    // The proxy drops its upstream request: the upstream's response channel closes.
    tokio::time::timeout(LIMIT, up.tx.closed())
        .await
        .expect("upstream request is dropped after the client leaves");
    let c = client();
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "m:1");
    assert_eq!(
        (m["active_requests"].as_u64(), m["cancelled"].as_u64()),
        (Some(0), Some(1)),
        "{m}"
    );
    proxy.shutdown().await;
}
