//! Which `Host` names and which origins a listener serves: the defence against DNS
//! rebinding and cross-site requests from a web page (issue 18).
//!
//! A page on `http://evil.example` can make the browser send requests to `127.0.0.1`: either
//! cross-origin "simple" requests (a form post, a `no-cors` fetch: the browser sends them
//! without asking, only the answer is hidden from the page), or, after DNS rebinding
//! (`rebind.evil.example` resolving to 127.0.0.1), same-origin requests whose `Host` is the
//! attacker's name. Three rules stop them:
//! - **Host**: a name must be one the listener is known by. An IP literal can never be a
//!   rebinding (the attacker's name is what rebinds), nor can `localhost` and `*.localhost`
//!   (browsers resolve them to loopback themselves); other names must be allowed by
//!   configuration (`allowed_hosts`; `"*"` allows any).
//! - **Ollama's own rule** for an `ollama` listener on a loopback address, because the proxy
//!   rewrites `Host` to the upstream's address and so would switch Ollama's check off:
//!   its `allowedHostsMiddleware` (server/routes.go) serves, on a loopback bind, no `Host`,
//!   `localhost`, the machine's host name, loopback, private and unspecified IPs, and names
//!   under `.localhost`, `.local` and `.internal`; anything else is a bare `403`. Off
//!   loopback Ollama checks nothing, and neither does the proxy. (Ollama also serves the
//!   addresses of the machine's other interfaces; the proxy does not list interfaces: add
//!   such an address to `allowed_hosts`.)
//! - **Origin** (the admin API's state-changing requests): a request a browser sends from
//!   another origin carries `Origin` (and `Sec-Fetch-Site`), which must name this listener;
//!   and a body type that an HTML form can send (`application/x-www-form-urlencoded`,
//!   `multipart/form-data`, `text/plain`) is refused outright, since a form post is exactly
//!   the cross-site request a page can make without asking. The CLI and `curl -X POST` send
//!   neither header and no body, and the dashboard's own requests are same-origin.

use std::net::IpAddr;

use http::HeaderMap;

/// The host part of a `Host` header value (`name:port`, `[v6]:port`, a bare name or
/// address), lower-cased; `None` when it is not one.
pub fn host_name(authority: &str) -> Option<String> {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inside
    } else {
        match a.rsplit_once(':') {
            // One colon: a port follows. More: an IPv6 address without brackets.
            Some((h, port)) if !h.contains(':') => {
                if !is_port(port) {
                    return None;
                }
                h
            }
            _ => a,
        }
    };
    // A trailing dot names the same host (`localhost.`).
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'%'));
    ok.then(|| host.to_ascii_lowercase())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

fn ip(host: &str) -> Option<IpAddr> {
    // A zone (`fe80::1%eth0`) does not change what the address is.
    host.split('%').next()?.parse().ok()
}

/// `localhost` or a name under `.localhost` (RFC 6761: always loopback).
fn localhost(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// Whether `allowed` (configured names; `*` any, `*.example.com` any name under it) allows
/// `host` (already lower-cased).
fn listed(allowed: &[String], host: &str) -> bool {
    allowed.iter().any(|a| {
        let a = a.trim().trim_end_matches('.').to_ascii_lowercase();
        match a.strip_prefix("*.") {
            _ if a == "*" => true,
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => a == host,
        }
    })
}

/// This machine's host name, lower-cased (read once).
fn machine_name() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| sysinfo::System::host_name().map(|n| n.to_ascii_lowercase()))
        .as_deref()
}

/// The host a request names: the request target's authority when it has one (absolute
/// form, and HTTP/2's `:authority`, which win over `Host`: RFC 9112 §3.2.2), else `Host`.
pub fn request_host<B>(req: &http::Request<B>) -> Option<&[u8]> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(http::header::HOST).map(|v| v.as_bytes()),
    }
}

/// The admin listener's rule: no host named (HTTP/1.0), an IP literal, `localhost` and
/// `*.localhost`, or a name in `allowed`.
pub fn admin_host_allowed(named: Option<&[u8]>, allowed: &[String]) -> Result<(), String> {
    let Some(value) = named else {
        return Ok(());
    };
    let Some(host) = std::str::from_utf8(value).ok().and_then(host_name) else {
        return Err("the Host header is not a host name".into());
    };
    if ip(&host).is_some() || localhost(&host) || listed(allowed, &host) {
        return Ok(());
    }
    Err(format!(
        "the Host `{host}` is not a name of this listener (DNS rebinding defence); add it to admin.allowed_hosts to serve it"
    ))
}

/// Ollama's `allowedHostsMiddleware` rule for a loopback bind (see the module doc), plus
/// the names in `allowed`.
pub fn ollama_host_allowed(named: Option<&[u8]>, allowed: &[String]) -> bool {
    let Some(value) = named else {
        return true;
    };
    let Some(host) = std::str::from_utf8(value).ok().and_then(host_name) else {
        return false;
    };
    if localhost(&host)
        || host.ends_with(".local")
        || host.ends_with(".internal")
        || machine_name().is_some_and(|m| m == host)
    {
        return true;
    }
    if let Some(ip) = ip(&host) {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
            }
        };
    }
    listed(allowed, &host)
}

/// The admin API's rule for a request that changes state (see the module doc): `Ok`, or why
/// it is refused.
pub fn same_origin_write(named: Option<&[u8]>, headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if !(site.eq_ignore_ascii_case(b"same-origin") || site.eq_ignore_ascii_case(b"none")) {
            return Err(format!(
                "a request from another site (Sec-Fetch-Site: {}) may not change state",
                String::from_utf8_lossy(site)
            ));
        }
    }
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        let host = named
            .and_then(|h| std::str::from_utf8(h).ok())
            .map(|h| h.trim().to_ascii_lowercase());
        let from =
            origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .map(|(scheme, authority)| {
                    (scheme.to_ascii_lowercase(), authority.to_ascii_lowercase())
                });
        let same = match (&from, &host) {
            (Some((scheme, authority)), Some(host)) => {
                let default = if scheme == "https" { ":443" } else { ":80" };
                let strip = |a: &str| a.strip_suffix(default).unwrap_or(a).to_string();
                strip(authority) == strip(host)
            }
            _ => false,
        };
        if !same {
            return Err(format!(
                "a request from another origin ({}) may not change state",
                String::from_utf8_lossy(origin.as_bytes())
            ));
        }
    }
    if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if matches!(
            essence.as_str(),
            "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
        ) {
            return Err(format!(
                "a state change may not come as `{essence}`, the body an HTML form sends; send no body, or `application/json`"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn host_names_are_read_from_every_authority_form() {
        for (a, want) in [
            ("localhost:11400", Some("localhost")),
            ("LOCALHOST", Some("localhost")),
            ("[::1]:80", Some("::1")),
            ("::1", Some("::1")),
            ("127.0.0.1", Some("127.0.0.1")),
            ("box.local.:8080", Some("box.local")),
            ("evil.example:", None),
            ("evil.example:99999999", None),
            ("a b", None),
            ("", None),
            ("[::1", None),
            ("x/y", None),
        ] {
            assert_eq!(host_name(a).as_deref(), want, "{a:?}");
        }
    }

    #[test]
    fn the_admin_listener_serves_its_addresses_and_loopback_names_only() {
        for host in [
            "127.0.0.1:11400",
            "localhost:11400",
            "[::1]:11400",
            "10.0.0.7",
            "app.localhost",
        ] {
            assert!(
                admin_host_allowed(Some(host.as_bytes()), &[]).is_ok(),
                "{host}"
            );
        }
        assert!(admin_host_allowed(None, &[]).is_ok(), "HTTP/1.0: no Host");
        for host in [
            "rebind.evil.example",
            "localhost.evil.example:11400",
            "box.local",
            "a b",
        ] {
            assert!(
                admin_host_allowed(Some(host.as_bytes()), &[]).is_err(),
                "{host}"
            );
        }
        let allowed = vec![
            "warden.example.com".to_string(),
            "*.lab.example".to_string(),
        ];
        for host in [
            "warden.example.com:443",
            "WARDEN.example.com",
            "gpu1.lab.example",
        ] {
            assert!(
                admin_host_allowed(Some(host.as_bytes()), &allowed).is_ok(),
                "{host}"
            );
        }
        assert!(admin_host_allowed(Some(b"lab.example"), &allowed).is_err());
        assert!(admin_host_allowed(Some(b"anything"), &["*".into()]).is_ok());
    }

    #[test]
    fn the_target_authority_wins_over_host_and_bytes_that_are_not_a_name_are_refused() {
        let req = http::Request::get("http://rebind.evil.example/api/tags")
            .header("host", "localhost")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some(&b"rebind.evil.example"[..]));
        assert!(!ollama_host_allowed(request_host(&req), &[]));
        let req = http::Request::get("/")
            .header("host", "localhost")
            .body(())
            .unwrap();
        assert!(ollama_host_allowed(request_host(&req), &[]));
        assert!(!ollama_host_allowed(Some(b"local\xffhost"), &[]));
        assert!(admin_host_allowed(Some(b"127.0.0.1\xff"), &[]).is_err());
    }

    #[test]
    fn ollamas_rule_allows_local_names_and_private_addresses() {
        for host in [
            "localhost:11434",
            "127.0.0.1:11434",
            "192.168.1.5",
            "0.0.0.0:1",
            "[::1]:11434",
            "box.local",
            "x.internal:80",
            "app.localhost",
        ] {
            assert!(ollama_host_allowed(Some(host.as_bytes()), &[]), "{host}");
        }
        for host in ["8.8.8.8", "example.com:11434", "rebind.evil.example"] {
            assert!(!ollama_host_allowed(Some(host.as_bytes()), &[]), "{host}");
        }
        assert!(ollama_host_allowed(
            Some(b"gpu.example.com"),
            &["gpu.example.com".into()]
        ));
        if let Some(me) = machine_name() {
            assert!(ollama_host_allowed(Some(me.as_bytes()), &[]), "{me}");
        }
    }

    #[test]
    fn a_state_change_must_come_from_this_origin_and_not_as_a_form() {
        let ok = [
            with(&[("host", "127.0.0.1:11400")]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("origin", "http://127.0.0.1:11400"),
            ]),
            with(&[("host", "localhost"), ("origin", "http://localhost:80")]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("sec-fetch-site", "same-origin"),
            ]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("content-type", "application/json"),
            ]),
        ];
        for h in ok {
            assert!(
                same_origin_write(h.get("host").map(|v| v.as_bytes()), &h).is_ok(),
                "{h:?}"
            );
        }
        let refused = [
            with(&[
                ("host", "127.0.0.1:11400"),
                ("origin", "http://evil.example"),
            ]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("origin", "http://127.0.0.1:3000"),
            ]),
            with(&[("host", "127.0.0.1:11400"), ("origin", "null")]),
            with(&[("origin", "http://127.0.0.1:11400")]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("sec-fetch-site", "cross-site"),
            ]),
            with(&[("host", "127.0.0.1:11400"), ("sec-fetch-site", "same-site")]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("content-type", "application/x-www-form-urlencoded"),
            ]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("content-type", "text/plain;charset=UTF-8"),
            ]),
            with(&[
                ("host", "127.0.0.1:11400"),
                ("content-type", "Multipart/Form-Data; boundary=x"),
            ]),
        ];
        for h in refused {
            assert!(
                same_origin_write(h.get("host").map(|v| v.as_bytes()), &h).is_err(),
                "{h:?}"
            );
        }
    }
}
