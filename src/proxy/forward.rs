//! Sending a request upstream and shaping what comes back: the upstream URI, hop-by-hop
//! header removal (RFC 9110 §7.6.1), and connection upgrades (WebSocket) spliced both ways.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use crate::providers::Upstream;
use crate::transport::server::ClientUpgrade;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers every message loses (RFC 9110 §7.6.1), besides `Connection` and
/// the headers it names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare by tag, so this is a handful of integer compares for the
    // common case of a message that has none of them.
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers, including those the `Connection` header names. With
/// `upgrade`, `Upgrade` survives and `Connection: upgrade` is set, so the upgrade reaches
/// the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names instead of nine hash lookups.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = headers.remove(header::CONNECTION) {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Turns a client request into the upstream request: same method, path, query, headers
/// (less hop-by-hop), in origin form (`/path?query`, behind the upstream's path prefix) with
/// `Host` set to `host` (the upstream's authority: Ollama answers 403 to a foreign one).
pub fn upstream_request<B>(
    upstream: &Upstream,
    host: &HeaderValue,
    mut parts: http::request::Parts,
    body: B,
    upgrade: bool,
) -> Result<Request<B>, http::Error> {
    let pq = parts.uri.path_and_query().cloned();
    let uri = match pq {
        Some(pq) if upstream.path_prefix.is_empty() => Uri::from(pq),
        None if upstream.path_prefix.is_empty() => Uri::from_static("/"),
        pq => {
            let pq = pq.as_ref().map(|p| p.as_str()).unwrap_or("/");
            Uri::builder()
                .path_and_query(format!("{}{}", upstream.path_prefix, pq))
                .build()?
        }
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.insert(header::HOST, host.clone());
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// Splices an upgraded client connection to the upgraded upstream connection until either
/// side closes.
/// With `watch`, an LM Studio SDK socket's messages are read on the way (`sdk_watch`).
pub(super) fn splice_upgrade(
    client: ClientUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    watch: Option<super::sdk_watch::Watch>,
) {
    tokio::spawn(async move {
        let Some(client) = client.take() else {
            return;
        };
        let (client, upstream) = match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(_), _) => {
                tracing::debug!("upgrade failed: the client connection ended first");
                return;
            }
            (_, Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut upstream = TokioIo::new(upstream);
        if let Some(watch) = watch {
            super::sdk_watch::splice(client.io, client.read.to_vec(), upstream, watch).await;
            return;
        }
        // What the client sent after its request, before the switch, goes first.
        if !client.read.is_empty() {
            if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut upstream, &client.read).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
                return;
            }
        }
        let mut client = client.io;
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

/// Prepares an upstream response for the client: hop-by-hop headers go, except on a 101
/// where `Upgrade`/`Connection` must reach the client.
pub fn downstream_headers<B>(resp: &mut Response<B>) {
    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrade);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::codec::wants_upgrade;

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["authorization", "content-type"]);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-request-id", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        let mut h = HeaderMap::new();
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn uri_keeps_path_query_and_prefix() {
        let up = crate::config::parse_upstream("http://127.0.0.1:9/pre").unwrap();
        let (parts, ()) = Request::get("http://proxy:1/api/tags?x=1")
            .header(header::HOST, "proxy:1")
            .body(())
            .unwrap()
            .into_parts();
        let host = HeaderValue::from_static("127.0.0.1:9");
        let r = upstream_request(&up, &host, parts, (), false).unwrap();
        assert_eq!(r.uri().to_string(), "/pre/api/tags?x=1");
        assert_eq!(r.headers()[header::HOST], "127.0.0.1:9");
        let (parts, ()) = Request::get("/api/version").body(()).unwrap().into_parts();
        let up = crate::config::parse_upstream("http://127.0.0.1:9").unwrap();
        let r = upstream_request(&up, &host, parts, (), false).unwrap();
        assert_eq!(r.uri().to_string(), "/api/version");
    }
}
