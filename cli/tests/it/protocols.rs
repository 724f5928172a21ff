//! WebSocket upgrades (the `lmstudio` SDK's transport) pass through the proxy both ways, and
//! HTTP/2 clients are served like HTTP/1.1 ones.

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
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
