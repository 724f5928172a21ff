//! Config reload on a running proxy: new limits, timeouts and per-model settings apply at
//! once without dropping a connection; a bad config is refused and the old one stays; keys
//! that need a restart are reported and kept. (The binary's SIGHUP and file watching are in
//! `tests/config.rs`.)

use std::time::Duration;

use crate::support::*;
use llm_warden_sim::ollama::OllamaConfig;

const LIMIT: Duration = Duration::from_secs(10);

fn config(sim: &str, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nname = \"ollama0\"\nkind = \"ollama\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{sim}\"\n{extra}"
    )
}

#[tokio::test]
async fn a_reload_applies_limits_timeouts_and_model_settings_without_dropping_a_stream() {
    let sim = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(30),
        ..Default::default()
    })
    .await;
    let first = config(&sim.url(), "[limits]\nmax_models_loaded = 3\n");
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&first).unwrap())
        .await
        .unwrap();
    let c = client();
    let admin = format!("http://{}", proxy.admin_addr);
    for m in ["qwen2.5:7b", "nomic-embed-text", "llama3.2"] {
        let r = post_json(&c, &format!("{admin}/models/ollama0/{m}/load"), "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // A stream in flight on llama3.2 (the most recently used) while the config changes.
    let streaming = spawn_chat(&c, format!("http://{}/api/chat", proxy.proxy_addr(0)));
    assert!(eventually(LIMIT, || async { sim.state.active_requests() == 1 }).await);

    let second = config(
        &sim.url(),
        "[limits]\nmax_models_loaded = 2\ninactivity_timeout = \"5m\"\n\
         [models.\"llama3.2\"]\ninactivity_timeout = \"90s\"\n",
    );
    let kept = llm_warden::app::reload::apply(
        &proxy.state,
        llm_warden::config::load_str(&second).unwrap(),
    );
    assert!(kept.is_empty(), "{kept:?}");

    // The lowered limit: the least recently used idle model goes; the busy one streams on.
    assert!(
        eventually(LIMIT, || async { sim.state.loaded().len() == 2 }).await,
        "{:?}",
        sim.state.loaded()
    );
    assert_eq!(
        sim.state.loaded(),
        ["llama3.2:latest", "nomic-embed-text:latest"]
    );
    let stream = streaming.await.unwrap();
    assert_eq!(stream.status, 200);
    assert!(
        stream.text().contains("\"done\":true"),
        "the stream finished whole"
    );
    assert_eq!(sim.state.unloads_while_busy(), 0);
    // The new timeouts, and the per-model one.
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "nomic-embed-text:latest")["inactivity_timeout_s"],
        300.0
    );
    assert_eq!(
        model_entry(&s, "ollama0", "llama3.2:latest")["inactivity_timeout_s"],
        90.0
    );
    assert_eq!(proxy.state.config.load().limits.max_models_loaded, 2);

    // Keys that need a restart are reported and keep their running values.
    let third = format!(
        "[admin]\nlisten = \"127.0.0.1:1\"\n[[providers]]\nname = \"ollama0\"\nkind = \"ollama\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{}\"\npoll_interval = \"9s\"\n[limits]\nmax_models_loaded = 2\n",
        sim.url()
    );
    let kept =
        llm_warden::app::reload::apply(&proxy.state, llm_warden::config::load_str(&third).unwrap());
    assert_eq!(kept, ["admin.listen", "providers[0].poll_interval"]);
    let now = proxy.state.config.load();
    assert_eq!(now.admin.listen.to_string(), "127.0.0.1:0");
    assert_eq!(now.providers[0].poll_interval, Duration::from_secs(5));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_bad_config_is_refused_and_the_running_one_stays() {
    let sim = start_ollama(Default::default()).await;
    let dir = std::env::temp_dir().join(format!("llm-warden-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        config(&sim.url(), "[limits]\ninactivity_timeout = \"7m\"\n"),
    )
    .unwrap();
    let (cfg, _) = llm_warden::config::load(Some(&path)).unwrap();
    let proxy = llm_warden::app::start(cfg).await.unwrap();
    std::fs::write(
        &path,
        config(
            &sim.url(),
            "[limits]\ninactivity_timeout = \"soon\"\nmax_models_loaded = 0\n",
        ),
    )
    .unwrap();
    assert!(!llm_warden::app::reload::reload_from(
        &proxy.state,
        &path,
        "test"
    ));
    let now = proxy.state.config.load();
    assert_eq!(now.limits.inactivity_timeout, Duration::from_secs(420));
    assert_eq!(now.limits.max_models_loaded, 3);
    // A good one then applies.
    std::fs::write(
        &path,
        config(&sim.url(), "[limits]\ninactivity_timeout = \"8m\"\n"),
    )
    .unwrap();
    assert!(llm_warden::app::reload::reload_from(
        &proxy.state,
        &path,
        "test"
    ));
    assert_eq!(
        proxy.state.config.load().limits.inactivity_timeout,
        Duration::from_secs(480)
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn connection_settings_and_secrets_need_a_restart_and_the_grace_period_does_not() {
    let sim = start_ollama(Default::default()).await;
    let proxy =
        llm_warden::app::start(llm_warden::config::load_str(&config(&sim.url(), "")).unwrap())
            .await
            .unwrap();
    let new = config(
        &sim.url(),
        "api_keys = [\"k\"]\nupstream_api_key = \"u\"\n[proxy]\nmax_connections = 5\nheader_read_timeout = \"5s\"\nshutdown_grace = \"2s\"\n[limits]\nunload_on_shutdown = true\n",
    )
    .replace("[admin]\n", "[admin]\ntoken = \"t\"\n");
    let kept =
        llm_warden::app::reload::apply(&proxy.state, llm_warden::config::load_str(&new).unwrap());
    assert_eq!(
        kept,
        [
            "admin.token",
            "proxy.max_connections",
            "proxy.header_read_timeout",
            "providers[0].api_keys",
            "providers[0].upstream_api_key"
        ]
    );
    let now = proxy.state.config.load();
    assert_eq!(now.proxy.shutdown_grace, Duration::from_secs(2));
    assert!(now.limits.unload_on_shutdown && now.admin.token.is_none());
    assert!(now.providers[0].api_keys.is_empty());
    assert!(now.providers[0].upstream_api_key.is_none());
    assert!(!now.providers[0].upstream.has_api_key());
    proxy.shutdown().await;
}
