//! The SDK's WebSocket namespaces (`/llm`, `/system`, ...): the upgrade handshake, then an
//! echo of every message. Only the transport is simulated, not the SDK's RPC protocol.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::wire::{json, UnknownEndpoint};
use crate::common::{full, respond, Call, SimBody};

pub(super) fn is_websocket_upgrade(call: &Call) -> bool {
    call.headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Accepts a WebSocket upgrade and echoes every message on the upgraded connection.
pub(super) fn websocket(call: &Call, on_upgrade: hyper::upgrade::OnUpgrade) -> Response<SimBody> {
    let Some(key) = call.headers.get(header::SEC_WEBSOCKET_KEY) else {
        return json(
            StatusCode::BAD_REQUEST,
            &UnknownEndpoint {
                error: "Missing Sec-WebSocket-Key header".to_string(),
            },
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, "", Bytes::new());
    };
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let sent = match msg {
                Message::Text(_) | Message::Binary(_) => ws.send(msg).await,
                // Pongs to pings and the close reply are queued by tungstenite; flush them.
                Message::Ping(_) | Message::Close(_) => ws.flush().await,
                Message::Pong(_) | Message::Frame(_) => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}
