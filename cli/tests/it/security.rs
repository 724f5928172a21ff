//! Who may do what: the admin API's token, the provider listeners' optional API keys, and
//! the upstream fixed by config whatever the client sends.

use std::io::{Read, Write};
use std::time::Duration;

use crate::support::*;
use http::Method;

/// Sends `raw` on a fresh connection and reads until the server closes it.
fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn admin_state_changes_need_the_token_and_reads_do_not() {
    let sim = start_ollama(Default::default()).await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret-token\"\n\
         [[providers]]\nname = \"ollama0\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        sim.url()
    );
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&toml).unwrap())
        .await
        .unwrap();
    let c = client();
    let admin = format!("http://{}", proxy.admin_addr);
    let load = format!("{admin}/models/ollama0/llama3.2/load");

    for headers in [
        vec![],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "Basic czNjcmV0LXRva2Vu")],
    ] {
        let r = send(&c, Method::POST, &load, &headers, "").await;
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        assert!(
            r.json()["error"].as_str().unwrap().contains("admin.token"),
            "{}",
            r.text()
        );
    }
    assert!(sim.state.loaded().is_empty(), "nothing was loaded");

    let ok = [("authorization", "Bearer s3cret-token")];
    let r = send(&c, Method::POST, &load, &ok, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.state.loaded(), ["llama3.2:latest"]);

    // Reads stay open; the right token is accepted there too, a wrong one is not.
    for path in ["/status", "/metrics", "/healthz", "/"] {
        assert_eq!(
            get(&c, &format!("{admin}{path}")).await.status,
            200,
            "{path}"
        );
        let r = send(&c, Method::GET, &format!("{admin}{path}"), &ok, "").await;
        assert_eq!(r.status, 200, "{path}");
        let r = send(
            &c,
            Method::GET,
            &format!("{admin}{path}"),
            &[("authorization", "Bearer x")],
            "",
        )
        .await;
        assert_eq!(r.status, 401, "{path}");
    }

    // The CLI sends the token from --token or the environment.
    let bin = env!("CARGO_BIN_EXE_llm-warden");
    let admin_url = admin.clone();
    let (without, with_flag, with_env) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str], env: Option<&str>| {
            let mut cmd = std::process::Command::new(bin);
            cmd.args(["unload", "--admin", &admin_url])
                .args(args)
                .args(["ollama0", "llama3.2"]);
            cmd.env_remove("LLM_WARDEN_ADMIN_TOKEN");
            if let Some(t) = env {
                cmd.env("LLM_WARDEN_ADMIN_TOKEN", t);
            }
            cmd.output().unwrap()
        };
        (
            run(&[], None),
            run(&["--token", "s3cret-token"], None),
            run(&[], Some("s3cret-token")),
        )
    })
    .await
    .unwrap();
    assert!(!without.status.success());
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("401") && err.contains("--token"), "{err}");
    assert!(
        with_flag.status.success(),
        "{}",
        String::from_utf8_lossy(&with_flag.stderr)
    );
    assert!(
        with_env.status.success(),
        "{}",
        String::from_utf8_lossy(&with_env.stderr)
    );
    assert!(sim.state.loaded().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn provider_api_keys_are_checked_in_each_clients_format_and_not_forwarded() {
    let ollama = start_ollama(Default::default()).await;
    let lmstudio = start_lmstudio(Default::default()).await;
    let llama = llm_warden_sim::llamacpp::spawn(Default::default(), listener().await);
    let keys = "api_keys = [\"key-one\", \"key-two\"]\n";
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[providers]]\nname = \"o\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n{keys}\
         [[providers]]\nname = \"l\"\nkind = \"lmstudio\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n{keys}\
         [[providers]]\nname = \"c\"\nkind = \"llamacpp\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n{keys}",
        ollama.url(),
        lmstudio.url(),
        llama.url()
    );
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&toml).unwrap())
        .await
        .unwrap();
    let c = client();
    let o = format!("http://{}", proxy.proxy_addr(0));
    let l = format!("http://{}", proxy.proxy_addr(1));
    let cpp = format!("http://{}", proxy.proxy_addr(2));
    let chat = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let json = ("content-type", "application/json");

    for bad in [None, Some("Bearer wrong"), Some("key-one")] {
        let mut h = vec![json];
        if let Some(b) = bad {
            h.push(("authorization", b));
        }
        // Ollama native: {"error": "..."}.
        let r = send(&c, Method::POST, &format!("{o}/api/chat"), &h, chat).await;
        assert_eq!(r.status, 401, "{bad:?}");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        assert!(
            r.json()["error"].as_str().unwrap().contains("API key"),
            "{}",
            r.text()
        );
        let r = send(&c, Method::GET, &format!("{o}/api/tags"), &h, "").await;
        assert_eq!(r.status, 401);
        // OpenAI style on /v1 (Ollama's and LM Studio's).
        for url in [
            format!("{o}/v1/chat/completions"),
            format!("{l}/v1/chat/completions"),
        ] {
            let r = send(&c, Method::POST, &url, &h, chat).await;
            assert_eq!(r.status, 401, "{url}");
            let e = &r.json()["error"];
            assert_eq!(
                (e["type"].as_str(), e["code"].as_str()),
                (Some("invalid_request_error"), Some("invalid_api_key")),
                "{url}"
            );
        }
        // llama-server's shape.
        let r = send(
            &c,
            Method::POST,
            &format!("{cpp}/v1/chat/completions"),
            &h,
            chat,
        )
        .await;
        assert_eq!(r.status, 401);
        let e = &r.json()["error"];
        assert_eq!(
            (e["code"].as_u64(), e["type"].as_str()),
            (Some(401), Some("authentication_error")),
            "{}",
            r.text()
        );
    }
    // Nothing reached a provider, nothing was counted.
    assert_eq!(
        ollama.state.log.count("/api/chat") + ollama.state.log.count("/v1/chat/completions"),
        0
    );
    assert_eq!(lmstudio.state.log.count("/v1/chat/completions"), 0);
    assert_eq!(llama.state.log.count("/v1/chat/completions"), 0);
    assert!(status(&c, &proxy).await["models"]
        .as_array()
        .unwrap()
        .is_empty());

    // Either key works, and the key is not forwarded.
    for key in ["Bearer key-one", "bearer key-two"] {
        let r = send(
            &c,
            Method::POST,
            &format!("{o}/api/chat"),
            &[json, ("authorization", key)],
            chat,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = send(
            &c,
            Method::POST,
            &format!("{l}/v1/chat/completions"),
            &[json, ("authorization", key)],
            chat.replace("llama3.2", "qwen2.5-7b-instruct"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let calls = ollama.state.log.calls();
    let chats: Vec<_> = calls.iter().filter(|c| c.path == "/api/chat").collect();
    assert_eq!(chats.len(), 2);
    assert!(chats
        .iter()
        .all(|c| !c.headers.contains_key("authorization")));
    assert!(lmstudio
        .state
        .log
        .calls()
        .iter()
        .all(|c| !c.headers.contains_key("authorization")));
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_api_keys_the_authorization_header_goes_upstream_unchanged() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let r = send(
        &c,
        Method::GET,
        &format!("http://{}/api/tags", proxy.proxy_addr(0)),
        &[("authorization", "Bearer the-providers-own")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let calls = sim.state.log.calls();
    let tags = calls
        .iter()
        .find(|c| c.path == "/api/tags" && c.headers.contains_key("authorization"))
        .expect("the request reached the provider");
    assert_eq!(tags.headers["authorization"], "Bearer the-providers-own");
    proxy.shutdown().await;
}

#[tokio::test]
async fn nothing_a_client_sends_changes_the_upstream() {
    let sim = start_ollama(Default::default()).await;
    // A second server that must never be reached: what a client would like to redirect to.
    let decoy = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let addr = proxy.proxy_addr(0);
    let evil = decoy.addr.to_string();
    let requests = [
        // Absolute-form target naming another server.
        format!("GET http://{evil}/api/version HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"),
        // A Host and forwarding headers naming it.
        format!("GET /api/version HTTP/1.1\r\nHost: {evil}\r\nX-Forwarded-Host: {evil}\r\nForwarded: host={evil}\r\nConnection: close\r\n\r\n"),
        // The same on an inspected endpoint.
        {
            let body = r#"{"model":"llama3.2","prompt":"hi","stream":false}"#;
            format!("POST http://{evil}/api/generate HTTP/1.1\r\nHost: {evil}\r\nX-Forwarded-Host: {evil}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        },
    ];
    for raw in &requests {
        let reply = tokio::task::spawn_blocking({
            let raw = raw.clone();
            move || exchange(addr, raw.as_bytes())
        })
        .await
        .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{raw}\n{reply}");
    }
    assert_eq!(decoy.state.log.total(), 0, "the decoy was never contacted");
    let calls = sim.state.log.calls();
    let version: Vec<_> = calls.iter().filter(|c| c.path == "/api/version").collect();
    assert_eq!(version.len(), 2);
    // The upstream sees its own address as Host.
    for c in version {
        assert_eq!(c.headers["host"], sim.addr.to_string());
    }
    // The request (and the load the proxy made for it) went to the configured upstream.
    assert!(sim.state.log.count("/api/generate") >= 1);
    proxy.shutdown().await;
}

const LMS_TOKEN: &str = "sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST";

fn lmstudio_requiring(token: &str) -> llm_warden_sim::lmstudio::LmStudioConfig {
    llm_warden_sim::lmstudio::LmStudioConfig {
        api_key: Some(token.into()),
        ..Default::default()
    }
}

/// Issue 20: LM Studio 0.4 with "Require Authentication" refuses every call without its
/// token. With `upstream_api_key` the proxy's own calls (polls, load, unload) carry it, and
/// so do forwarded requests whose client key the proxy consumed (`api_keys`): the client's
/// key never reaches the provider.
#[tokio::test]
async fn a_provider_requiring_a_token_gets_the_upstream_api_key_on_every_call() {
    let sim = start_lmstudio(lmstudio_requiring(LMS_TOKEN)).await;
    let proxy = start_proxy(
        &[("lmstudio", sim.url())],
        &format!("api_keys = [\"client-key\"]\nupstream_api_key = \"{LMS_TOKEN}\"\n"),
    )
    .await;
    let c = client();
    proxy.refresh(0).await;
    let s = status(&c, &proxy).await;
    assert_eq!(s["providers"][0]["reachable"], true, "{s}");
    assert!(s["providers"][0].get("last_error").is_none(), "{s}");
    let admin = |path: &str| format!("http://{}{path}", proxy.admin_addr);
    let r = send(
        &c,
        Method::POST,
        &admin("/models/lmstudio0/qwen2.5-7b-instruct/load"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.state.loaded(), ["qwen2.5-7b-instruct"]);
    let chat = r#"{"model":"qwen2.5-7b-instruct","messages":[{"role":"user","content":"hi"}]}"#;
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr(0));
    let r = send(
        &c,
        Method::POST,
        &url,
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer client-key"),
        ],
        chat,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A lazy load on the request path too.
    let chat2 = chat.replace("qwen2.5-7b-instruct", "llama-3.2-3b-instruct");
    let r = send(
        &c,
        Method::POST,
        &url,
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer client-key"),
        ],
        chat2,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        &c,
        Method::POST,
        &admin("/models/lmstudio0/qwen2.5-7b-instruct/unload"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.state.loaded(), ["llama-3.2-3b-instruct"]);
    let calls = sim.state.log.calls();
    for path in [
        "/api/v1/models",
        "/api/v1/models/load",
        "/api/v1/models/unload",
        "/v1/chat/completions",
    ] {
        assert!(calls.iter().any(|c| c.path == path), "{path} was called");
    }
    for call in &calls {
        assert_eq!(
            call.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap()),
            Some(format!("Bearer {LMS_TOKEN}").as_str()),
            "{} {}",
            call.method,
            call.path
        );
    }
    proxy.shutdown().await;
}

/// Without `api_keys` the client's own `Authorization` is its business: it passes unchanged,
/// and the proxy's key is never put on a client's request (a client the provider refuses
/// stays refused).
#[tokio::test]
async fn without_api_keys_the_upstream_api_key_is_not_lent_to_clients() {
    let sim = start_lmstudio(lmstudio_requiring(LMS_TOKEN)).await;
    let proxy = start_proxy(
        &[("lmstudio", sim.url())],
        &format!("upstream_api_key = \"{LMS_TOKEN}\"\n"),
    )
    .await;
    let c = client();
    let url = format!("http://{}/v1/models", proxy.proxy_addr(0));
    let r = send(
        &c,
        Method::GET,
        &url,
        &[("authorization", "Bearer mine")],
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = send(&c, Method::GET, &url, &[], "").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let auth = format!("Bearer {LMS_TOKEN}");
    let r = send(
        &c,
        Method::GET,
        &url,
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen: Vec<Option<String>> = sim
        .state
        .log
        .calls()
        .into_iter()
        .filter(|c| c.path == "/v1/models")
        .map(|c| {
            c.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        seen,
        [Some("Bearer mine".to_string()), None, Some(auth.clone())]
    );
    proxy.shutdown().await;
}

/// Without the key (or with a wrong one) the provider's 401 shows in `/status` as the
/// provider's last error, naming the setting (never the key); the provider stays
/// reachable, polls go on at their interval, and a load answers the provider's refusal.
#[tokio::test]
async fn a_provider_refusing_the_proxys_calls_says_so_in_status() {
    for extra in [
        "",
        "upstream_api_key = \"sk-lm-wrongwro:ABCDEFGHIJKLMNOPQRST\"\n",
    ] {
        let sim = start_lmstudio(lmstudio_requiring(LMS_TOKEN)).await;
        let proxy = start_proxy(&[("lmstudio", sim.url())], extra).await;
        let c = client();
        proxy.refresh(0).await;
        let s = status(&c, &proxy).await;
        let p = &s["providers"][0];
        assert_eq!(p["reachable"], true, "{s}");
        let e = p["last_error"].as_str().unwrap_or_default();
        assert!(
            e.contains("401") && e.contains("upstream_api_key") && !e.contains("sk-lm"),
            "{s}"
        );
        // A load fails with the provider's refusal, in the admin API's answer.
        let r = send(
            &c,
            Method::POST,
            &format!(
                "http://{}/models/lmstudio0/qwen2.5-7b-instruct/load",
                proxy.admin_addr
            ),
            &[],
            "",
        )
        .await;
        assert!(
            r.status.is_client_error() || r.status.is_server_error(),
            "{}",
            r.text()
        );
        assert!(
            r.text().contains("401") || r.text().contains("API token"),
            "{}",
            r.text()
        );
        proxy.shutdown().await;
    }
}
