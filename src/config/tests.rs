//! Config loading and validation: defaults, key paths in errors, value parsing.

use super::*;

#[test]
fn empty_document_gives_the_documented_defaults() {
    let c = load_str("").unwrap();
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:11400");
    assert_eq!(c.providers.len(), 2);
    assert_eq!(c.providers[0].name, "ollama");
    assert_eq!(c.providers[0].listen.to_string(), "127.0.0.1:11435");
    assert_eq!(
        c.providers[0].upstream.to_string(),
        "http://127.0.0.1:11434"
    );
    assert_eq!(c.providers[1].name, "lmstudio");
    assert_eq!(c.providers[1].listen.to_string(), "127.0.0.1:1235");
    assert_eq!(c.providers[1].upstream.to_string(), "http://127.0.0.1:1234");
    assert_eq!(c.proxy.max_request_body, 64 << 20);
    assert_eq!(c.limits.inactivity_timeout, Duration::from_secs(600));
    assert_eq!(c.memory_pressure.action, PressureAction::Cache);
    assert_eq!(c.compaction.on_overflow, OverflowPolicy::Summarize);
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let err = load_str(
        r#"
        [admin]
        listen = "nope"
        [[providers]]
        kind = "ollama"
        upstream = "ftp://x"
        poll_interval = "soon"
        [[providers]]
        kind = "vllm"
        [memory_pressure]
        warning = 0.95
        "#,
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "admin.listen",
            "providers[0].upstream",
            "providers[0].poll_interval",
            "providers[1].kind",
            "memory_pressure.warning"
        ]
    );
}

#[test]
fn unknown_keys_name_their_path() {
    let err = load_str("[limits]\nmax_model_loaded = 2\n").unwrap_err();
    let p = &err.problems()[0];
    assert_eq!(p.path, "limits.max_model_loaded");
    assert!(
        p.message.contains("unknown field `max_model_loaded`"),
        "{}",
        p.message
    );
    let err = load_str("[[providers]]\nkind = \"ollama\"\nlisten = 5\n").unwrap_err();
    assert_eq!(err.problems()[0].path, "providers[0].listen");
}

#[test]
fn sizes_and_durations_parse() {
    for (s, n) in [
        ("64MiB", 64 << 20),
        ("512KB", 512_000),
        ("1GiB", 1 << 30),
        ("100", 100),
    ] {
        assert_eq!(parse_bytes(s).unwrap(), n, "{s}");
    }
    assert!(parse_bytes("12 parsecs").is_err());
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert!(parse_duration("300").is_err());
}

#[test]
fn duplicate_names_and_listeners_are_refused() {
    let err = load_str(
        "[[providers]]\nkind=\"ollama\"\n[[providers]]\nkind=\"ollama\"\nlisten=\"127.0.0.1:11435\"\n",
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["providers[1].name", "providers[1].listen"]);
}

#[test]
fn per_model_overrides_parse() {
    let c = load_str(
        "[models.\"llama3.2:3b\"]\ninactivity_timeout = \"30m\"\npinned = true\ncontext_window = 8192\ncompression_threshold = 0.8\non_overflow = \"reject\"\n",
    )
    .unwrap();
    let m = &c.models["llama3.2:3b"];
    assert_eq!(m.inactivity_timeout, Some(Duration::from_secs(1800)));
    assert!(m.pinned);
    assert_eq!(m.context_window, Some(8192));
    assert_eq!(m.compression_threshold, Some(0.8));
    assert_eq!(m.on_overflow, Some(OverflowPolicy::Reject));
    let err = load_str("[models.\"m\"]\non_overflow = \"drop\"\ncontext_window = 0\n").unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["models.\"m\".on_overflow", "models.\"m\".context_window"]
    );
}

#[test]
fn upstream_keeps_a_path_prefix() {
    let u = parse_upstream("http://gpu-box:11434/ollama/").unwrap();
    assert_eq!(u.authority.as_str(), "gpu-box:11434");
    assert_eq!(u.path_prefix, "/ollama");
}

#[test]
fn lifecycle_keys_parse_and_providers_may_override_limits() {
    let c = load_str(
        r#"
        [limits]
        max_models_loaded = 2
        memory_threshold = 0.6
        [queue]
        policy = "fifo"
        aging = "5s"
        [[providers]]
        kind = "ollama"
        [[providers]]
        kind = "lmstudio"
        max_models_loaded = 1
        memory_threshold = 0.4
        [models."big"]
        memory = "6GiB"
        "#,
    )
    .unwrap();
    assert_eq!(
        (
            c.providers[0].max_models_loaded,
            c.providers[0].memory_threshold
        ),
        (2, 0.6),
        "the [limits] values"
    );
    assert_eq!(
        (
            c.providers[1].max_models_loaded,
            c.providers[1].memory_threshold
        ),
        (1, 0.4)
    );
    assert_eq!(c.queue.policy, QueuePolicy::Fifo);
    assert_eq!(c.queue.aging, Duration::from_secs(5));
    assert_eq!(c.models["big"].memory, Some(6 << 30));
    let d = load_str("").unwrap();
    assert_eq!(d.queue.policy, QueuePolicy::Grouped);
    assert_eq!(d.queue.aging, Duration::from_secs(30));

    let err = load_str(
        "[queue]\npolicy = \"lifo\"\ntimeout = \"0s\"\n[[providers]]\nkind = \"ollama\"\nmax_models_loaded = 0\n[models.\"m\"]\nmemory = \"lots\"\n",
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "providers[0].max_models_loaded",
            "queue.policy",
            "queue.timeout",
            "models.\"m\".memory"
        ]
    );
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token() {
    let none = |_: &str| None;
    let err = load_str_with_env("[admin]\nlisten = \"0.0.0.0:11400\"\n", &none).unwrap_err();
    assert!(
        err.problems().iter().any(|p| p.path == "admin.token"),
        "{err}"
    );
    let c = load_str_with_env(
        "[admin]\nlisten = \"0.0.0.0:11400\"\ntoken = \"from-file\"\n",
        &none,
    )
    .unwrap();
    assert!(c.admin.token.as_ref().unwrap().matches(b"from-file"));
    // The environment wins, and is never written back or shown.
    let env = |k: &str| (k == ADMIN_TOKEN_ENV).then(|| "from-env".to_string());
    let c = load_str_with_env(
        "[admin]\nlisten = \"0.0.0.0:11400\"\ntoken = \"from-file\"\n",
        &env,
    )
    .unwrap();
    let t = c.admin.token.as_ref().unwrap();
    assert!(t.matches(b"from-env") && !t.matches(b"from-file"));
    assert!(!c.to_toml().contains("from-env"));
    assert!(!format!("{c:?}").contains("from-env"));
    // Loopback needs none; an empty token is none.
    assert!(load_str_with_env("[admin]\ntoken = \"\"\n", &none)
        .unwrap()
        .admin
        .token
        .is_none());
}

#[test]
fn upstream_api_key_comes_from_the_file_or_the_environment_and_is_never_shown() {
    let text = "[[providers]]\nname = \"lm.studio\"\nkind = \"lmstudio\"\nupstream_api_key = \"sk-lm-file:KEY\"\n";
    let none = |_: &str| None;
    let c = load_str_with_env(text, &none).unwrap();
    let p = &c.providers[0];
    assert!(p
        .upstream_api_key
        .as_ref()
        .unwrap()
        .matches(b"sk-lm-file:KEY"));
    assert!(p.upstream.has_api_key());
    // The file's is written back (the output stands for the file), never in Debug.
    assert!(c
        .to_toml()
        .contains("upstream_api_key = \"sk-lm-file:KEY\""));
    assert!(!format!("{c:?}").contains("sk-lm-file"), "{c:?}");
    assert!(!p.upstream.to_string().contains("sk-lm"));
    assert_eq!(
        upstream_api_key_env("lm.studio"),
        "LLM_WARDEN_UPSTREAM_API_KEY_LM_STUDIO"
    );
    // The environment wins, and is neither written out nor shown.
    let env =
        |k: &str| (k == "LLM_WARDEN_UPSTREAM_API_KEY_LM_STUDIO").then(|| "sk-lm-env:KEY".into());
    let c = load_str_with_env(text, &env).unwrap();
    let p = &c.providers[0];
    assert!(p
        .upstream_api_key
        .as_ref()
        .unwrap()
        .matches(b"sk-lm-env:KEY"));
    let mut h = http::HeaderMap::new();
    p.upstream.authorize(&mut h);
    assert_eq!(h[http::header::AUTHORIZATION], "Bearer sk-lm-env:KEY");
    assert!(!c.to_toml().contains("sk-lm"), "{}", c.to_toml());
    assert!(!format!("{c:?}").contains("sk-lm"));
    // None: nothing sent.
    let c = load_str_with_env("[[providers]]\nkind = \"lmstudio\"\n", &none).unwrap();
    assert!(c.providers[0].upstream_api_key.is_none());
    let mut h = http::HeaderMap::new();
    c.providers[0].upstream.authorize(&mut h);
    assert!(h.is_empty());
    // Empty, or not sendable in a header: refused with the key's path.
    for bad in ["\"\"", "\"has space\""] {
        let err = load_str_with_env(
            &format!("[[providers]]\nkind = \"lmstudio\"\nupstream_api_key = {bad}\n"),
            &none,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["providers[0].upstream_api_key"], "{bad}");
    }
}

#[test]
fn api_keys_come_from_the_file_or_the_providers_environment_variable() {
    let text =
        "[[providers]]\nname = \"my-ollama\"\nkind = \"ollama\"\napi_keys = [\"a\", \"b\"]\n";
    let none = |_: &str| None;
    let c = load_str_with_env(text, &none).unwrap();
    assert_eq!(c.providers[0].api_keys.len(), 2);
    assert!(c.to_toml().contains("api_keys = [\"a\", \"b\"]"));
    assert_eq!(api_keys_env("my-ollama"), "LLM_WARDEN_API_KEYS_MY_OLLAMA");
    let env = |k: &str| (k == "LLM_WARDEN_API_KEYS_MY_OLLAMA").then(|| "x, y ,z".to_string());
    let c = load_str_with_env(text, &env).unwrap();
    let keys = &c.providers[0].api_keys;
    assert_eq!(keys.len(), 3);
    assert!(keys[1].matches(b"y") && !keys.iter().any(|k| k.matches(b"a")));
    let err = load_str_with_env(
        "[[providers]]\nkind = \"ollama\"\napi_keys = [\"\", \"has space\"]\n",
        &none,
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["providers[0].api_keys[0]", "providers[0].api_keys[1]"]
    );
}

#[test]
fn connection_settings_have_generous_defaults_and_are_checked() {
    let c = load_str("").unwrap();
    assert_eq!(c.proxy.max_connections, 10_000);
    assert_eq!(c.proxy.header_read_timeout, Duration::from_secs(30));
    assert_eq!(c.proxy.shutdown_grace, Duration::from_secs(30));
    assert!(!c.limits.unload_on_shutdown);
    let err = load_str("[proxy]\nmax_connections = 0\nheader_read_timeout = \"0s\"\n").unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["proxy.max_connections", "proxy.header_read_timeout"]
    );
}

/// Issue 18: unknown keys and wrong types at every level, a refused upstream and a duplicate
/// name, all in one report (reading problems in file order, then the rules').
#[test]
fn every_kind_of_problem_is_reported_in_one_pass() {
    let text = r#"verbose = true
[proxy]
max_conections = 100
connect_timeout = 5
[[providers]]
name = "local"
kind = "ollama"
upstream = "https://127.0.0.1:11434"
[[providers]]
name = "local"
kind = "lmstudio"
api_key = ["x"]
[[providers]]
kind = "llamacpp"
listen = 8081
[limits]
max_models_loaded = "two"
[models."llama3.2:3b"]
pinnned = true
"#;
    let err = load_str_with_env(text, &|_| None).unwrap_err();
    let got: Vec<(&str, &str)> = err
        .problems()
        .iter()
        .map(|p| (p.path.as_str(), p.message.as_str()))
        .collect();
    let paths: Vec<&str> = got.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        paths,
        [
            "verbose",
            "proxy.max_conections",
            "proxy.connect_timeout",
            "providers[1].api_key",
            "providers[2].listen",
            "limits.max_models_loaded",
            "models.\"llama3.2:3b\".pinnned",
            "providers[0].upstream",
            "providers[1].name",
        ],
        "{err}"
    );
    let message = |path: &str| got.iter().find(|(p, _)| *p == path).unwrap().1;
    assert!(
        message("verbose").starts_with("unknown field `verbose`, expected one of `admin`")
            && message("verbose").ends_with("(line 1)"),
        "{}",
        message("verbose")
    );
    assert!(
        message("proxy.max_conections")
            .starts_with("unknown field `max_conections` (did you mean `max_connections`?)")
            && message("proxy.max_conections").ends_with("(line 3)"),
        "{}",
        message("proxy.max_conections")
    );
    assert!(
        message("proxy.connect_timeout").contains("invalid type: integer `5`, expected a string")
            && message("proxy.connect_timeout").ends_with("(line 4)"),
        "{}",
        message("proxy.connect_timeout")
    );
    assert!(
        message("providers[1].api_key").contains("did you mean `api_keys`?")
            && message("providers[1].api_key").ends_with("(line 12)"),
        "{}",
        message("providers[1].api_key")
    );
    assert!(
        message("models.\"llama3.2:3b\".pinnned").contains("did you mean `pinned`?"),
        "{err}"
    );
    assert!(message("providers[0].upstream").contains("only http://"));
    assert_eq!(
        message("providers[1].name"),
        "duplicate provider name `local`"
    );
}

#[test]
fn a_problem_while_reading_is_not_repeated_by_the_rules() {
    // `kind` of the wrong type is left out, so the rules would find it missing: said once.
    // A `[[providers]]` entry that is not a table keeps the indices of the others.
    let err = load_str_with_env(
        "providers = [{ kind = 5 }, 7, { kind = \"ollama\", listen = \"x\" }]\n",
        &|_| None,
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["providers[0].kind", "providers[1]", "providers[2].listen"],
        "{err}"
    );
    assert!(
        err.problems()[1].message.contains("expected a table"),
        "{err}"
    );
    // Without a kind, the rest of the entry is still checked.
    let err = load_str_with_env(
        "[[providers]]\nname = \"a b\"\nupstream = \"https://x\"\n",
        &|_| None,
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "providers[0].kind",
            "providers[0].name",
            "providers[0].upstream"
        ],
        "{err}"
    );
    // A syntax error is one problem, with its line.
    let err = load_str("[proxy]\nmax_connections = = 3\n").unwrap_err();
    assert_eq!(err.problems().len(), 1, "{err}");
    assert!(err.problems()[0].message.contains("line 2"), "{err}");
}

#[test]
fn the_kv_cache_layout_is_ollamas_defaults_unless_set_and_checked() {
    let c = load_str("[[providers]]\nkind = \"ollama\"\n").unwrap();
    assert_eq!(
        (
            c.providers[0].num_parallel,
            c.providers[0].kv_cache_type.as_str()
        ),
        (1, "f16")
    );
    let c =
        load_str("[[providers]]\nkind = \"ollama\"\nnum_parallel = 4\nkv_cache_type = \"q4_0\"\n")
            .unwrap();
    assert_eq!(
        (
            c.providers[0].num_parallel,
            c.providers[0].kv_cache_type.as_str()
        ),
        (4, "q4_0")
    );
    let err =
        load_str("[[providers]]\nkind = \"ollama\"\nnum_parallel = 0\nkv_cache_type = \"q5_1\"\n")
            .unwrap_err();
    let problems: Vec<_> = err
        .problems()
        .iter()
        .map(|p| (p.path.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        problems,
        [
            (
                "providers[0].num_parallel",
                "must be from 1 to 512 (OLLAMA_NUM_PARALLEL)"
            ),
            (
                "providers[0].kv_cache_type",
                "unknown KV cache type `q5_1` (expected f16, q8_0, q4_0, f32)"
            )
        ]
    );
}

#[test]
fn a_pool_alone_is_a_front_without_default_providers() {
    let c = load_str(
        r#"
        [[pools]]
        name = "gpus"
        kind = "ollama"
        listen = "127.0.0.1:11434"
        nodes = [
          { url = "http://gpu1:11435", admin = "http://gpu1:11400", token = "t1" },
          { name = "b", url = "http://gpu2:11435", admin = "http://gpu2:11400" },
        ]
        "#,
    )
    .unwrap();
    assert!(c.providers.is_empty(), "a front only: no default providers");
    let p = &c.pools[0];
    assert_eq!((p.name.as_str(), p.kind), ("gpus", ProviderKind::Ollama));
    assert_eq!(p.poll_interval, Duration::from_secs(1));
    let names: Vec<_> = p.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["gpu1:11435", "b"]);
    assert_eq!(p.nodes[0].admin.to_string(), "http://gpu1:11400");
    assert!(p.nodes[0].token.as_ref().is_some_and(|t| t.matches(b"t1")));
    assert!(p.nodes[1].token.is_none());
    // Written back, it loads to the same pools.
    let again = load_str(&c.to_toml()).unwrap();
    assert_eq!(again.pools[0].nodes.len(), 2);
    assert_eq!(again.pools[0].nodes[0].name, "gpu1:11435");
}

#[test]
fn pool_problems_name_their_key_paths() {
    let err = load_str(
        r#"
        [[pools]]
        kind = "vllm"
        listen = "127.0.0.1:11400"
        nodes = [{ url = "http://a:1" }, { admin = "http://b:2" }]
        [[pools]]
        kind = "ollama"
        listen = "127.0.0.1:9000"
        [[pools]]
        name = "pool1"
        kind = "ollama"
        listen = "127.0.0.1:9000"
        nodes = [{ url = "http://a:1", admin = "http://a:2" }, { url = "http://a:1", admin = "http://a:3" }]
        "#,
    )
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "pools[0].kind",
            "pools[0].listen",
            "pools[0].nodes[0].admin",
            "pools[0].nodes[1].url",
            "pools[1].nodes",
            "pools[2].name",
            "pools[2].listen",
            "pools[2].nodes[1].name",
        ]
    );
}

#[test]
fn the_endpoint_picker_names_a_pool() {
    let pool = "[[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:9100\"\n\
                nodes = [{ url = \"http://10.0.0.1:11435\", admin = \"http://10.0.0.1:11400\" }]\n";
    let c = load_str(&format!(
        "{pool}[epp]\nlisten = \"0.0.0.0:9002\"\npool = \"gpus\"\n"
    ))
    .unwrap();
    let e = c.epp.as_ref().unwrap();
    assert_eq!(
        (e.listen.to_string().as_str(), e.pool.as_str()),
        ("0.0.0.0:9002", "gpus")
    );
    assert_eq!(
        load_str(&c.to_toml()).unwrap().epp,
        c.epp,
        "written back the same"
    );
    let err = load_str(&format!(
        "{pool}[epp]\nlisten = \"127.0.0.1:9100\"\npool = \"gpu\"\n"
    ))
    .unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["epp.listen", "epp.pool"]);
    let err = load_str("[epp]\nlisten = \"127.0.0.1:9002\"\n").unwrap_err();
    let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"epp.pool"), "{paths:?}");
}
