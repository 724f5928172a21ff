//! WebSocket upgrades (the `lmstudio` SDK's transport) pass through the proxy both ways, and
//! HTTP/2 clients are served like HTTP/1.1 ones.

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_upgrade_passes_through_both_ways() {
    let sim = start_lmstudio(Default::default()).await;
    let proxy = start_proxy(&[("lmstudio", sim.url())], "").await;
    let addr = proxy.proxy_addr(0);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/llm"), stream)
        .await
        .expect("the upgrade is accepted through the proxy");
    assert_eq!(resp.status(), 101);

    ws.send(Message::text(
        r#"{"authVersion":1,"clientIdentifier":"guest:x","clientPasskey":"y"}"#,
    ))
    .await
    .unwrap();
    // The simulator answers the SDK's auth packet (the proxy has no `api_keys`, so it passes).
    let answer = ws.next().await.unwrap().unwrap();
    assert_eq!(answer, Message::text(r#"{"success":true}"#));
    // Binary and a larger frame, in both directions.
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();
    // The server's close frame comes back through the proxy too.
    let mut closed = false;
    while let Some(m) = ws.next().await {
        if matches!(m, Ok(Message::Close(_))) {
            closed = true;
        }
    }
    assert!(closed, "close handshake completed through the proxy");
    let seen = sim.state.log.calls();
    assert!(seen
        .iter()
        .any(|c| c.path == "/llm" && c.headers.contains_key("sec-websocket-key")));
    proxy.shutdown().await;
}

#[tokio::test]
async fn http2_clients_are_served_too() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let base = format!("http://{}", proxy.proxy_addr(0));
    let r = send(
        &h2,
        http::Method::GET,
        &format!("{base}/api/version"),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "0.13.0");
    let r = send(
        &h2,
        http::Method::POST,
        &format!("{base}/api/chat"),
        &[],
        bytes::Bytes::from_static(
            br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().lines().last().unwrap().contains("\"done\":true"));
    let s = status(&client(), &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "llama3.2:latest")["completion_tokens"],
        8
    );
    proxy.shutdown().await;
}

/// Opens `ws://addr/llm` and sends the SDK's auth packet; returns the socket and the answer.
async fn sdk_auth(
    addr: std::net::SocketAddr,
    id: &str,
    pass: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    serde_json::Value,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/llm"), stream)
        .await
        .expect("the upgrade is accepted");
    assert_eq!(resp.status(), 101);
    let packet =
        serde_json::json!({"authVersion": 1, "clientIdentifier": id, "clientPasskey": pass});
    ws.send(Message::text(packet.to_string())).await.unwrap();
    let answer = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
        other => panic!("no auth answer: {other:?}"),
    };
    (ws, answer)
}

/// With `api_keys`, the key of an SDK socket is read from its first frame: a client without
/// one is refused by the proxy itself, the upstream socket never opened; one with a key gets
/// through, its packet carrying `upstream_api_key`'s halves, and frames of any size pass.
#[tokio::test]
async fn sdk_sockets_are_authenticated_in_band_with_api_keys() {
    let upstream_key = "sk-lm-upstream:UPSTREAMUPSTREAMUPST";
    let sim = start_lmstudio(llm_warden_sim::lmstudio::LmStudioConfig {
        api_key: Some(upstream_key.to_string()),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("lmstudio", sim.url())],
        &format!(
            "api_keys = [\"sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST\"]\nupstream_api_key = \"{upstream_key}\"\n"
        ),
    )
    .await;
    let addr = proxy.proxy_addr(0);
    // The greeting probe carries no key and passes.
    let c = client();
    let get = |path: &str| {
        let url = format!("http://{addr}{path}");
        let c = &c;
        async move { send(c, http::Method::GET, &url, &[], bytes::Bytes::new()).await }
    };
    assert_eq!(get("/lmstudio-greeting").await.status, 200);
    // Any other request still needs the header.
    assert_eq!(get("/api/v0/models").await.status, 401);

    for (id, pass) in [("guest:1234", "5678"), ("abcdefgh", "wrong")] {
        let (mut ws, answer) = sdk_auth(addr, id, pass).await;
        assert_eq!(answer["success"], false, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("api_keys"));
        // Then the proxy closes the socket.
        let mut closed = false;
        while let Some(m) = ws.next().await {
            closed |= matches!(m, Ok(Message::Close(_)));
        }
        assert!(closed);
    }
    assert!(
        !sim.state.log.calls().iter().any(|c| c.path == "/llm"),
        "a refused socket never reaches the provider"
    );

    let (mut ws, answer) = sdk_auth(addr, "abcdefgh", "ABCDEFGHIJKLMNOPQRST").await;
    // The simulator accepted the upstream key the proxy put in the packet.
    assert_eq!(answer, serde_json::json!({"success": true}));
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let calls = sim.state.log.calls();
    let llm = calls
        .iter()
        .find(|c| c.path == "/llm")
        .expect("upstream socket");
    assert!(
        !llm.headers.contains_key("sec-websocket-extensions"),
        "the proxy answered no extension, so it offers none upstream"
    );
    proxy.shutdown().await;
}

/// With `api_keys`, an upgrade that carries a valid `Authorization` header passes on it, as
/// any request does: spliced, the header replaced by `upstream_api_key`'s, the frames the
/// client's own business.
#[tokio::test]
async fn with_api_keys_an_upgrade_with_a_valid_header_passes_on_it() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sim = start_lmstudio(Default::default()).await;
    let proxy = start_proxy(
        &[("lmstudio", sim.url())],
        "api_keys = [\"header-key\"]\nupstream_api_key = \"upstream-key\"\n",
    )
    .await;
    let addr = proxy.proxy_addr(0);
    let mut req = format!("ws://{addr}/llm").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer header-key".parse().unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("the upgrade is accepted");
    let guest = r#"{"authVersion":1,"clientIdentifier":"guest:x","clientPasskey":"y"}"#;
    ws.send(Message::text(guest)).await.unwrap();
    // Not checked by the proxy: the simulator (no key of its own) accepts the guest.
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text(r#"{"success":true}"#)
    );
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let calls = sim.state.log.calls();
    let llm = calls.iter().find(|c| c.path == "/llm").expect("spliced");
    assert_eq!(
        llm.headers
            .get("authorization")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer upstream-key")
    );
    proxy.shutdown().await;
}

/// A prediction the lifecycle refuses (the queue is full) is never sent upstream: the proxy
/// answers the SDK's `channelCreate` itself with a `channelError` in the SDK's error shape,
/// counts it failed, and withholds the client's later messages on that channel; the socket
/// goes on serving other messages.
#[tokio::test]
async fn an_sdk_prediction_refused_a_lease_is_answered_by_the_proxy_not_forwarded() {
    let sim = start_lmstudio(llm_warden_sim::lmstudio::LmStudioConfig {
        load_latency: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(
        &[("lmstudio", sim.url())],
        "[queue]\nmax_waiting = 1\ntimeout = \"10s\"\n",
    )
    .await;
    let addr = proxy.proxy_addr(0);
    // A REST request waits for its model's load: the queue is full.
    let c = client();
    let first = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://{addr}/v1/chat/completions"));
        async move {
            post_json(
                &c,
                &url,
                &serde_json::json!({"model": "qwen2.5-7b-instruct",
            "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .await
        }
    });
    wait_for("the load in progress", Duration::from_secs(10), || async {
        sim.state
            .log
            .calls()
            .iter()
            .any(|c| c.path.ends_with("/models/load"))
    })
    .await;

    let (mut ws, answer) = sdk_auth(addr, "guest:x", "y").await;
    assert_eq!(answer["success"], true, "{answer}");
    let predict = serde_json::json!({"type": "channelCreate", "endpoint": "predict", "channelId": 7,
        "creationParameter": {"modelSpecifier": {"type": "query",
            "query": {"identifier": "qwen2.5-7b-instruct"}},
            "history": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            "predictionConfigStack": {"layers": []}}});
    ws.send(Message::text(predict.to_string())).await.unwrap();
    let reply: serde_json::Value = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
        other => panic!("no answer: {other:?}"),
    };
    assert_eq!(reply["type"], "channelError", "{reply}");
    assert_eq!(reply["channelId"], 7, "{reply}");
    let title = reply["error"]["title"].as_str().unwrap_or_default();
    assert!(title.contains("queue.max_waiting"), "{reply}");
    // Messages on the refused channel stay here; others pass.
    let cancel = r#"{"type":"channelSend","channelId":7,"message":{"type":"cancel"}}"#;
    ws.send(Message::text(cancel)).await.unwrap();
    ws.send(Message::text(r#"{"type":"keepAlive"}"#))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), r#"{"type":"keepAliveAck"}"#),
        other => panic!("no keepAliveAck: {other:?}"),
    }
    assert_eq!(
        sim.state.sdk_messages(),
        ["llm keepAlive "],
        "the refused channel's messages never reached the provider"
    );
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "lmstudio0", "qwen2.5-7b-instruct");
    // The REST request still waits; the refused prediction is counted and over.
    assert_eq!(
        (&m["active_requests"], &m["total_requests"], &m["errors"]),
        (&1.into(), &2.into(), &1.into()),
        "{m}"
    );
    drop(ws);
    assert_eq!(first.await.unwrap().status, 200);
    proxy.shutdown().await;
}
