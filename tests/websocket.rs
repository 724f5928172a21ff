//! WebSocket upgrades (the `lmstudio` SDK's transport) pass through the proxy both ways.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::*;
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
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(
        echoed,
        Message::text(r#"{"authVersion":1,"clientIdentifier":"guest:x","clientPasskey":"y"}"#)
    );
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
