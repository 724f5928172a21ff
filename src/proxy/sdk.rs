//! The LM Studio SDK's WebSockets (`ws://host/<namespace>`) when the provider has `api_keys`.
//!
//! The SDK sends no `Authorization` header: it probes `GET /lmstudio-greeting`, opens the
//! socket, and authenticates in its first text frame,
//! `{"authVersion":1,"clientIdentifier":"<id>","clientPasskey":"<passkey>"}`, the two halves
//! of an API token `sk-lm-<id>:<passkey>` (lmstudio-python `json_api.py`
//! `_LMS_API_TOKEN_REGEX`, `_ws_impl.py` `_authenticate`; see the simulator's
//! `sim/src/lmstudio/websocket.rs`). So on an `lmstudio` provider with `api_keys` those two
//! requests pass the header check, and the key is checked in that frame instead:
//!
//! 1. the proxy answers the client's upgrade itself (`101`, no extension, so every frame it
//!    reads is plain);
//! 2. it reads the first frame (bounded in size and time): a text frame whose identifier and
//!    passkey, joined as `sk-lm-<id>:<passkey>`, equal one of `api_keys` (each compared in
//!    constant time, as the header check does) lets the connection through;
//! 3. only then does it open the upstream socket, send the frame (unchanged, or carrying the
//!    identifier and passkey of `upstream_api_key` when the provider has one) and splice the
//!    two connections. Anything else is answered `{"success":false,"error":"…"}` and a close
//!    frame, as LM Studio refuses a client, and the upstream is never opened.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{forward, DataPlane, ProxyBody, ProxyError};
use crate::config::Secret;
use crate::transport::server::{ClientUpgrade, RequestBody};
use crate::transport::websocket::{self, Head};

/// The SDK's probe before it opens a socket; it carries no key.
pub(super) const GREETING: &str = "/lmstudio-greeting";

/// The most the first frame may be: an auth packet is about 120 bytes.
const MAX_AUTH_FRAME: u64 = 16 * 1024;

/// How long the client has to send its auth packet after the `101`.
const AUTH_WITHIN: Duration = Duration::from_secs(10);

/// Whether `req` is one of the two requests that carry no key on an SDK connection: the
/// greeting probe, or a WebSocket upgrade (its key comes in its first frame).
pub(super) fn keyless_sdk_request(req: &Request<RequestBody>, path: &str) -> bool {
    (req.method() == Method::GET && path == GREETING) || is_websocket_upgrade(req)
}

fn is_websocket_upgrade(req: &Request<RequestBody>) -> bool {
    req.method() == Method::GET
        && req.extensions().get::<ClientUpgrade>().is_some()
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// The auth packet's fields (the rest of the packet is kept as the client wrote it).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthPacket<'a> {
    #[serde(borrow)]
    client_identifier: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    client_passkey: std::borrow::Cow<'a, str>,
}

/// Checks the first frame's payload (unmasked): `Ok(None)` to send it on unchanged,
/// `Ok(Some(payload))` to send this one instead (`upstream` key's identifier and passkey), or
/// the error the client is told.
pub(super) fn check_auth_packet(
    keys: &[Secret],
    upstream: Option<&Secret>,
    head: &Head,
    payload: &[u8],
) -> Result<Option<Vec<u8>>, &'static str> {
    if head.opcode != websocket::TEXT || !head.fin || head.rsv != 0 {
        return Err("Invalid authentication packet");
    }
    let Ok(mut packet) =
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
    else {
        return Err("Invalid authentication packet");
    };
    let Ok(fields) = serde_json::from_slice::<AuthPacket<'_>>(payload) else {
        return Err("Invalid authentication packet");
    };
    let presented = format!(
        "sk-lm-{}:{}",
        fields.client_identifier, fields.client_passkey
    );
    let found = keys
        .iter()
        .fold(false, |found, k| k.matches(presented.as_bytes()) | found);
    if !found {
        return Err("Invalid client identifier or passkey (this proxy's api_keys)");
    }
    let Some(up) = upstream else {
        return Ok(None);
    };
    // LM Studio's token form splits in two; any other key is a passkey (as the SDK, which
    // only accepts the token form, never sends; kept for servers that check the passkey).
    let key = up.expose();
    let (id, pass) = key
        .strip_prefix("sk-lm-")
        .and_then(|rest| rest.split_once(':'))
        .unwrap_or((fields.client_identifier.as_ref(), key));
    let (id, pass) = (id.to_string(), pass.to_string());
    drop(fields);
    packet.insert("clientIdentifier".into(), id.into());
    packet.insert("clientPasskey".into(), pass.into());
    serde_json::to_vec(&packet)
        .map(Some)
        .map_err(|_| "Invalid authentication packet")
}

/// Answers the upgrade itself and, once the first frame holds a key, splices the client to a
/// new upstream socket (see the module's doc).
pub(super) fn accept(
    state: Arc<DataPlane>,
    provider: usize,
    mut req: Request<RequestBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(client) = req.extensions_mut().remove::<ClientUpgrade>() else {
        return Err(ProxyError::InvalidTarget("not a WebSocket upgrade".into()));
    };
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return Err(ProxyError::InvalidTarget(
            "a WebSocket upgrade without `Sec-WebSocket-Key`".into(),
        ));
    };
    let accept = websocket::accept_key(key.as_bytes());
    let watch =
        super::sdk_watch::Watch::for_path(&state, provider, &super::routed_path(req.uri().path()));
    let (mut parts, _) = req.into_parts();
    // The client's offers are the proxy's to answer, and it answered none: the upstream
    // must not agree to an extension the client will not use.
    parts.headers.remove("sec-websocket-extensions");
    parts.headers.remove(header::AUTHORIZATION);
    tokio::spawn(async move {
        let Some(client) = client.take() else {
            return;
        };
        let Ok(client) = client.await else {
            tracing::debug!("upgrade failed: the client connection ended first");
            return;
        };
        let mut io = client.io;
        let mut buf = client.read.to_vec();
        let first = tokio::time::timeout(AUTH_WITHIN, read_frame(&mut io, &mut buf)).await;
        let p = &state.providers[provider];
        let outcome = match first {
            Ok(Some(head)) => {
                let end = head.frame_len() as usize;
                let mut payload = buf[head.head_len..end].to_vec();
                if let Some(k) = head.mask {
                    websocket::apply_mask(&mut payload, k, 0);
                }
                let checked = check_auth_packet(
                    &p.config.api_keys,
                    p.config.upstream_api_key.as_ref(),
                    &head,
                    &payload,
                );
                checked.map(|replaced| match replaced {
                    None => buf,
                    Some(new) => {
                        let mask = head.mask.unwrap_or([0x5a, 0x3c, 0x96, 0xe1]);
                        let mut out = websocket::encode(websocket::TEXT, &new, Some(mask));
                        out.extend_from_slice(&buf[end..]);
                        out
                    }
                })
            }
            Ok(None) => Err("Invalid authentication packet"),
            Err(_) => Err("Authentication timed out"),
        };
        let pending = match outcome {
            Ok(pending) => pending,
            Err(error) => {
                p.metrics.error("invalid_api_key");
                tracing::debug!(error, "SDK socket refused");
                let body = serde_json::json!({"success": false, "error": error}).to_string();
                let mut out = websocket::encode(websocket::TEXT, body.as_bytes(), None);
                // 1008: policy violation.
                out.extend(websocket::encode(
                    websocket::CLOSE,
                    &1008u16.to_be_bytes(),
                    None,
                ));
                let _ = io.write_all(&out).await;
                let _ = io.shutdown().await;
                return;
            }
        };
        let up = forward::upstream_request(
            &p.config.upstream,
            p.pool.host_header(),
            parts,
            crate::transport::UpstreamBody::Right(Full::new(Bytes::new())),
            true,
        );
        let mut up = match up {
            Ok(up) => up,
            Err(e) => return refuse_upstream(&mut io, &e.to_string()).await,
        };
        p.config.upstream.authorize(up.headers_mut());
        let sent = super::send(&state, p, up, false).await;
        let mut resp = match sent {
            Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => resp,
            Ok(resp) => {
                let status = resp.status();
                return refuse_upstream(&mut io, &format!("the provider answered {status}")).await;
            }
            Err(e) => return refuse_upstream(&mut io, &e.to_string()).await,
        };
        p.mark_reachable();
        let upstream = match hyper::upgrade::on(&mut resp).await {
            Ok(u) => u,
            Err(e) => return refuse_upstream(&mut io, &e.to_string()).await,
        };
        let mut upstream = TokioIo::new(upstream);
        if let Some(watch) = watch {
            return super::sdk_watch::splice(io, pending, upstream, watch).await;
        }
        if upstream.write_all(&pending).await.is_err() {
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
            tracing::debug!(error = %e, "SDK socket ended with an error");
        }
    });
    let mut r = Response::new(ProxyBody::Local(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    Ok(r)
}

/// Tells an authenticated client the provider could not be reached, as LM Studio refuses one.
async fn refuse_upstream(io: &mut tokio::net::TcpStream, error: &str) {
    tracing::debug!(error, "SDK socket: the upstream socket did not open");
    let body = serde_json::json!({"success": false, "error": error}).to_string();
    let mut out = websocket::encode(websocket::TEXT, body.as_bytes(), None);
    // 1011: internal error.
    out.extend(websocket::encode(
        websocket::CLOSE,
        &1011u16.to_be_bytes(),
        None,
    ));
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
}

/// Reads until `buf` starts with one whole frame of at most [`MAX_AUTH_FRAME`] bytes: its
/// head, or `None` if the connection ends first or the frame is larger.
async fn read_frame(io: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    loop {
        if let Some(head) = Head::parse(buf) {
            if head.frame_len() > MAX_AUTH_FRAME {
                return None;
            }
            if buf.len() as u64 >= head.frame_len() {
                return Some(head);
            }
        } else if buf.len() > 14 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<Secret> {
        vec![
            Secret::new("sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST".into(), false),
            Secret::new("sk-lm-second00:SECONDSECONDSECOND00".into(), false),
        ]
    }

    fn text() -> Head {
        Head::parse(&websocket::encode(websocket::TEXT, b"", None)).expect("a head")
    }

    fn packet(id: &str, pass: &str) -> Vec<u8> {
        serde_json::json!({"authVersion": 1, "clientIdentifier": id, "clientPasskey": pass})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_packet_with_one_of_the_keys_passes_unchanged() {
        for (id, pass) in [
            ("abcdefgh", "ABCDEFGHIJKLMNOPQRST"),
            ("second00", "SECONDSECONDSECOND00"),
        ] {
            assert_eq!(
                check_auth_packet(&keys(), None, &text(), &packet(id, pass)),
                Ok(None)
            );
        }
    }

    #[test]
    fn a_guest_a_wrong_key_or_a_malformed_packet_is_refused() {
        let k = keys();
        let refused = |payload: &[u8]| check_auth_packet(&k, None, &text(), payload).is_err();
        assert!(refused(&packet("guest:1234", "5678")));
        assert!(refused(&packet("abcdefgh", "ABCDEFGHIJKLMNOPQRSx")));
        assert!(refused(&packet("abcdefg", "hABCDEFGHIJKLMNOPQRST")));
        assert!(refused(&packet("abcdefgh:ABCDEFGHIJ", "KLMNOPQRST")));
        assert!(refused(b"{\"authVersion\":1}"));
        assert!(refused(b"not json"));
        assert!(refused(b""));
        // Not a text frame, or a fragment of one.
        let bin = Head::parse(&websocket::encode(0x2, b"", None)).expect("head");
        let good = packet("abcdefgh", "ABCDEFGHIJKLMNOPQRST");
        assert!(check_auth_packet(&k, None, &bin, &good).is_err());
        let mut part = text();
        part.fin = false;
        assert!(check_auth_packet(&k, None, &part, &good).is_err());
        let mut deflated = text();
        deflated.rsv = 4;
        assert!(check_auth_packet(&k, None, &deflated, &good).is_err());
    }

    #[test]
    fn with_an_upstream_key_the_packet_carries_its_halves_and_the_rest_is_kept() {
        let up = Secret::new("sk-lm-upstream:UPSTREAMUPSTREAMUPST".into(), false);
        let mut payload = packet("abcdefgh", "ABCDEFGHIJKLMNOPQRST");
        payload.pop();
        payload.extend_from_slice(b",\"extra\":[1]}");
        let new = check_auth_packet(&keys(), Some(&up), &text(), &payload)
            .expect("passes")
            .expect("replaced");
        let v: serde_json::Value = serde_json::from_slice(&new).expect("json");
        assert_eq!(v["clientIdentifier"], "upstream");
        assert_eq!(v["clientPasskey"], "UPSTREAMUPSTREAMUPST");
        assert_eq!(v["authVersion"], 1);
        assert_eq!(v["extra"], serde_json::json!([1]));
        // A wrong key is refused before the upstream key is used.
        assert!(check_auth_packet(&keys(), Some(&up), &text(), &packet("x", "y")).is_err());
    }
}
