//! Raw TOML -> trusted [`Config`]: defaults filled, durations, sizes and addresses parsed,
//! ranges checked. Every problem is collected with its key path; nothing stops at the first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::raw::{RawConfig, RawPool, RawProvider};
use super::*;
use crate::providers::ProviderKind;

struct Checker {
    problems: Vec<Problem>,
    /// Paths already reported while reading (an unknown key, a wrong type): what was there
    /// was left out, so a rule on it (`kind` is missing) would only repeat the problem.
    read_problems: Vec<String>,
}

impl Checker {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let repeats = self.read_problems.iter().any(|p| {
            path.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        });
        if !repeats {
            self.problems.push(Problem {
                path,
                message: message.into(),
            });
        }
    }

    fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.bad(path, e);
                    default
                }
            },
        }
    }

    fn fraction(&mut self, path: &str, value: Option<f64>, default: f64) -> f64 {
        let v = value.unwrap_or(default);
        if !(v > 0.0 && v <= 1.0) {
            self.bad(path, format!("must be a fraction in (0, 1], got {v}"));
            return default;
        }
        v
    }

    /// A token or key as a [`Secret`]: it travels in an HTTP header, so printable ASCII
    /// without spaces only.
    fn secret(&mut self, path: &str, value: String, from_env: bool) -> Option<Secret> {
        if value.bytes().all(|b| b.is_ascii_graphic()) {
            Some(Secret::new(value, from_env))
        } else {
            self.bad(
                path,
                "must be printable ASCII without spaces (it is sent in an HTTP header)",
            );
            None
        }
    }

    fn addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.bad(
                    path,
                    format!("`{value}` is not a socket address like `127.0.0.1:11435`"),
                );
                None
            }
        }
    }
}

/// Checks `raw` and fills in the defaults. `read_problems`: what reading the document found
/// (reported first, with the rules' problems after them).
pub(super) fn validate(
    raw: RawConfig,
    read_problems: Vec<Problem>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut c = Checker {
        problems: Vec::new(),
        read_problems: read_problems.iter().map(|p| p.path.clone()).collect(),
    };

    let admin_listen = c
        .addr(
            "admin.listen",
            raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 11400)));
    let admin_allowed_hosts = host_list(
        &mut c,
        "admin.allowed_hosts",
        raw.admin.allowed_hosts.clone(),
    );
    let admin_token = match env(ADMIN_TOKEN_ENV) {
        Some(t) => c.secret(ADMIN_TOKEN_ENV, t, true),
        None => raw
            .admin
            .token
            .filter(|t| !t.is_empty())
            .and_then(|t| c.secret("admin.token", t, false)),
    };
    if admin_token.is_none() && !admin_listen.ip().is_loopback() {
        c.bad(
            "admin.token",
            format!(
                "admin.listen ({admin_listen}) is not a loopback address, so the admin API needs a token: set admin.token or ${ADMIN_TOKEN_ENV}"
            ),
        );
    }

    let max_request_body = match raw.proxy.max_request_body.as_deref() {
        None => 64 << 20,
        Some(s) => match parse_bytes(s) {
            Ok(0) => {
                c.bad("proxy.max_request_body", "must be greater than zero");
                64 << 20
            }
            Ok(n) => n,
            Err(e) => {
                c.bad("proxy.max_request_body", e);
                64 << 20
            }
        },
    };
    let connect_timeout = c.duration(
        "proxy.connect_timeout",
        raw.proxy.connect_timeout.as_deref(),
        Duration::from_secs(5),
    );
    let response_timeout = c.duration(
        "proxy.response_timeout",
        raw.proxy.response_timeout.as_deref(),
        Duration::from_secs(600),
    );
    if response_timeout.is_zero() {
        c.bad("proxy.response_timeout", "must be greater than zero");
    }
    let max_connections = raw.proxy.max_connections.unwrap_or(10_000);
    if max_connections == 0 {
        c.bad("proxy.max_connections", "must be at least 1");
    }
    let header_read_timeout = c.duration(
        "proxy.header_read_timeout",
        raw.proxy.header_read_timeout.as_deref(),
        Duration::from_secs(30),
    );
    if header_read_timeout.is_zero() {
        c.bad("proxy.header_read_timeout", "must be greater than zero");
    }
    let body_read_timeout = c.duration(
        "proxy.body_read_timeout",
        raw.proxy.body_read_timeout.as_deref(),
        Duration::from_secs(30),
    );
    if body_read_timeout.is_zero() {
        c.bad("proxy.body_read_timeout", "must be greater than zero");
    }
    let shutdown_grace = c.duration(
        "proxy.shutdown_grace",
        raw.proxy.shutdown_grace.as_deref(),
        Duration::from_secs(30),
    );

    let limits = Limits {
        max_models_loaded: raw.limits.max_models_loaded.unwrap_or(3),
        memory_threshold: c.fraction("limits.memory_threshold", raw.limits.memory_threshold, 0.85),
        inactivity_timeout: c.duration(
            "limits.inactivity_timeout",
            raw.limits.inactivity_timeout.as_deref(),
            Duration::from_secs(600),
        ),
        unload_on_shutdown: raw.limits.unload_on_shutdown.unwrap_or(false),
    };
    if limits.max_models_loaded == 0 {
        c.bad("limits.max_models_loaded", "must be at least 1");
    }

    // A config with pools and no `[[providers]]` is a front only: no default providers.
    let front_only = raw.providers.as_ref().is_none_or(Vec::is_empty)
        && raw.pools.as_ref().is_some_and(|p| !p.is_empty());
    let raw_providers = raw.providers.unwrap_or_else(|| {
        if front_only {
            return Vec::new();
        }
        [ProviderKind::Ollama, ProviderKind::LmStudio]
            .into_iter()
            .map(|k| RawProvider {
                kind: Some(k.as_str().to_string()),
                ..RawProvider::default()
            })
            .collect()
    });
    if raw_providers.is_empty() && !front_only {
        c.bad(
            "providers",
            "at least one provider (or, for a front, one of `[[pools]]`) is needed",
        );
    }
    let mut providers = Vec::new();
    // Each entry's index, name and listener, whatever else is wrong with it: a refused
    // upstream must not hide a duplicate name.
    let mut seen: Vec<(usize, Option<String>, Option<SocketAddr>)> = Vec::new();
    for (i, p) in raw_providers.into_iter().enumerate() {
        let at = |k: &str| format!("providers[{i}].{k}");
        let allowed_hosts = host_list(&mut c, &at("allowed_hosts"), p.allowed_hosts.clone());
        let kind = match p.kind.as_deref() {
            None => {
                c.bad(
                    at("kind"),
                    "missing: every provider needs a kind (ollama, lmstudio or llamacpp)",
                );
                None
            }
            Some(k) => ProviderKind::parse(k).or_else(|| {
                c.bad(
                    at("kind"),
                    format!("unknown provider kind `{k}` (expected ollama, lmstudio or llamacpp)"),
                );
                None
            }),
        };
        // Without a kind there are no defaults: only what the entry says is checked.
        let facts = kind.map(|k| k.facts());
        let name = p
            .name
            .clone()
            .or_else(|| kind.map(|k| k.as_str().to_string()));
        if let Some(name) = name.as_deref().filter(|name| {
            name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        }) {
            c.bad(
                at("name"),
                format!("`{name}` must be non-empty and use only letters, digits, `-`, `_`, `.`"),
            );
        }
        let listen = p
            .listen
            .as_deref()
            .or(facts.map(|f| f.default_listen))
            .and_then(|l| c.addr(&at("listen"), l));
        let upstream = p
            .upstream
            .as_deref()
            .or(facts.map(|f| f.default_upstream))
            .and_then(|u| parse_upstream(u).map_err(|e| c.bad(at("upstream"), e)).ok());
        let poll_interval = c.duration(
            &at("poll_interval"),
            p.poll_interval.as_deref(),
            Duration::from_secs(5),
        );
        if poll_interval.is_zero() {
            c.bad(at("poll_interval"), "must be greater than zero");
        }
        let max_models_loaded = p.max_models_loaded.unwrap_or(limits.max_models_loaded);
        if max_models_loaded == 0 {
            c.bad(at("max_models_loaded"), "must be at least 1");
        }
        let memory_threshold = c.fraction(
            &at("memory_threshold"),
            p.memory_threshold,
            limits.memory_threshold,
        );
        let slot_save = p.slot_save.unwrap_or(false);
        if slot_save && kind.is_some_and(|k| k != ProviderKind::LlamaCpp) {
            c.bad(
                at("slot_save"),
                "only a llamacpp provider has slots to save",
            );
        }
        let num_parallel = p.num_parallel.unwrap_or(1);
        if !(1..=512).contains(&num_parallel) {
            c.bad(
                at("num_parallel"),
                "must be from 1 to 512 (OLLAMA_NUM_PARALLEL)",
            );
        }
        let kv_cache_type = p.kv_cache_type.clone().unwrap_or_else(|| "f16".to_string());
        if !crate::memory::KV_CACHE_TYPES.contains(&kv_cache_type.as_str()) {
            c.bad(
                at("kv_cache_type"),
                format!(
                    "unknown KV cache type `{kv_cache_type}` (expected {})",
                    crate::memory::KV_CACHE_TYPES.join(", ")
                ),
            );
        }
        let env_var = name.as_deref().map(api_keys_env);
        let api_keys: Vec<Secret> = match env_var.as_deref().and_then(env) {
            Some(v) => {
                let env_var = env_var.clone().unwrap_or_default();
                v.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .filter_map(|k| c.secret(&env_var, k.to_string(), true))
                    .collect()
            }
            None => p
                .api_keys
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .filter_map(|(j, k)| {
                    let path = format!("providers[{i}].api_keys[{j}]");
                    if k.is_empty() {
                        c.bad(path, "an API key must not be empty");
                        return None;
                    }
                    c.secret(&path, k, false)
                })
                .collect(),
        };
        let key_var = name.as_deref().map(upstream_api_key_env);
        let upstream_api_key = match key_var.as_deref().and_then(env) {
            Some(v) => {
                let key_var = key_var.clone().unwrap_or_default();
                c.secret(&key_var, v.trim().to_string(), true)
            }
            None => match p.upstream_api_key {
                Some(k) if k.is_empty() => {
                    c.bad(at("upstream_api_key"), "must not be empty (leave it out)");
                    None
                }
                Some(k) => c.secret(&at("upstream_api_key"), k, false),
                None => None,
            },
        };
        let upstream = match (upstream, &upstream_api_key) {
            (Some(u), Some(k)) => u.with_api_key(k.expose()).ok(),
            (u, _) => u,
        };
        seen.push((i, name.clone(), listen));
        if let (Some(kind), Some(name), Some(listen), Some(upstream)) =
            (kind, name, listen, upstream)
        {
            providers.push(ProviderConfig {
                name,
                kind,
                listen,
                upstream,
                poll_interval,
                max_models_loaded,
                memory_threshold,
                slot_save,
                api_keys,
                upstream_api_key,
                allowed_hosts,
                num_parallel,
                kv_cache_type,
            });
        }
    }
    for (n, (i, name, listen)) in seen.iter().enumerate() {
        let earlier = &seen[..n];
        if let Some(name) = name {
            if earlier.iter().any(|(_, q, _)| q.as_ref() == Some(name)) {
                c.bad(
                    format!("providers[{i}].name"),
                    format!("duplicate provider name `{name}`"),
                );
            }
        }
        if let Some(listen) = listen.filter(|l| l.port() != 0) {
            if listen == admin_listen || earlier.iter().any(|(_, _, q)| *q == Some(listen)) {
                c.bad(
                    format!("providers[{i}].listen"),
                    format!("address {listen} is already used by another listener"),
                );
            }
        }
    }

    // Every listener of this process: the admin's, the providers', the pools'.
    let mut bound: Vec<SocketAddr> = vec![admin_listen];
    bound.extend(seen.iter().filter_map(|(_, _, l)| *l));
    let pools = pools(&mut c, raw.pools.unwrap_or_default(), bound.clone());
    let epp = raw.epp.and_then(|e| {
        let listen = match e.listen.as_deref() {
            Some(l) => c.addr("epp.listen", l),
            None => {
                c.bad(
                    "epp.listen",
                    "missing: the gRPC address Envoy's ext_proc filter calls, e.g. `0.0.0.0:9002`",
                );
                None
            }
        };
        if let Some(l) = listen.filter(|l| l.port() != 0) {
            if bound.contains(&l) || pools.iter().any(|p| p.listen == l) {
                c.bad(
                    "epp.listen",
                    format!("address {l} is already used by another listener"),
                );
            }
        }
        let pool = match e.pool {
            Some(p) if pools.iter().any(|q| q.name == p) => Some(p),
            Some(p) => {
                c.bad("epp.pool", format!("no `[[pools]]` entry is named `{p}`"));
                None
            }
            None => {
                c.bad(
                    "epp.pool",
                    "missing: the name of the `[[pools]]` entry whose nodes it picks from",
                );
                None
            }
        };
        Some(EppConfig {
            listen: listen?,
            pool: pool?,
        })
    });

    let queue = QueueConfig {
        max_waiting: raw.queue.max_waiting.unwrap_or(256),
        timeout: c.duration(
            "queue.timeout",
            raw.queue.timeout.as_deref(),
            Duration::from_secs(120),
        ),
        policy: match raw.queue.policy.as_deref().unwrap_or("grouped") {
            "grouped" => QueuePolicy::Grouped,
            "fifo" => QueuePolicy::Fifo,
            other => {
                c.bad(
                    "queue.policy",
                    format!("unknown policy `{other}` (expected grouped or fifo)"),
                );
                QueuePolicy::Grouped
            }
        },
        aging: c.duration(
            "queue.aging",
            raw.queue.aging.as_deref(),
            Duration::from_secs(30),
        ),
    };
    if queue.timeout.is_zero() {
        c.bad("queue.timeout", "must be greater than zero");
    }

    let b = &raw.buffers;
    let buffers = BufferConfig {
        context_initial: b.context.initial.unwrap_or(4096),
        context_max: b.context.max.unwrap_or(32768),
        compression_threshold: c.fraction(
            "buffers.context.compression_threshold",
            b.context.compression_threshold,
            0.9,
        ),
        working_initial: b.working.initial.unwrap_or(256),
        working_max: b.working.max.unwrap_or(2048),
        optimization_threshold: c.fraction(
            "buffers.working.optimization_threshold",
            b.working.optimization_threshold,
            0.8,
        ),
    };
    if buffers.context_initial > buffers.context_max {
        c.bad(
            "buffers.context.initial",
            "must not exceed buffers.context.max",
        );
    }
    if buffers.working_initial > buffers.working_max {
        c.bad(
            "buffers.working.initial",
            "must not exceed buffers.working.max",
        );
    }

    let memory_pressure = MemoryPressureConfig {
        warning: c.fraction("memory_pressure.warning", raw.memory_pressure.warning, 0.7),
        critical: c.fraction(
            "memory_pressure.critical",
            raw.memory_pressure.critical,
            0.9,
        ),
        action: match raw.memory_pressure.action.as_deref().unwrap_or("cache") {
            "compress" => PressureAction::Compress,
            "unload" => PressureAction::Unload,
            "cache" => PressureAction::Cache,
            other => {
                c.bad(
                    "memory_pressure.action",
                    format!("unknown action `{other}` (expected compress, unload or cache)"),
                );
                PressureAction::Cache
            }
        },
        hysteresis: raw.memory_pressure.hysteresis.unwrap_or(0.05),
        sample_interval: c.duration(
            "memory_pressure.sample_interval",
            raw.memory_pressure.sample_interval.as_deref(),
            Duration::from_secs(2),
        ),
        gpu: raw.memory_pressure.gpu.unwrap_or(true),
    };
    if !(0.0..0.5).contains(&memory_pressure.hysteresis) {
        c.bad(
            "memory_pressure.hysteresis",
            "must be at least 0 and below 0.5",
        );
    }
    if memory_pressure.sample_interval.is_zero() {
        c.bad(
            "memory_pressure.sample_interval",
            "must be greater than zero",
        );
    }
    if memory_pressure.warning >= memory_pressure.critical {
        c.bad(
            "memory_pressure.warning",
            "must be below memory_pressure.critical",
        );
    }

    let rc = &raw.compaction;
    let tokenizer_ok = |t: &str| matches!(t, "cl100k" | "cl100k_base" | "o200k" | "o200k_base");
    let compaction = CompactionConfig {
        on_overflow: overflow_policy(
            &mut c,
            "compaction.on_overflow",
            rc.on_overflow.as_deref().unwrap_or("summarize"),
        )
        .unwrap_or(OverflowPolicy::Summarize),
        prune: rc.prune.unwrap_or(true),
        summarizer_provider: rc.summarizer_provider.clone().filter(|s| !s.is_empty()),
        summarizer_model: rc.summarizer_model.clone().filter(|s| !s.is_empty()),
        summarizer_timeout: c.duration(
            "compaction.summarizer_timeout",
            rc.summarizer_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        summary_max_tokens: rc.summary_max_tokens.unwrap_or(512),
        keep_recent_share: c.fraction("compaction.keep_recent_share", rc.keep_recent_share, 0.5),
        reply_reserve: rc.reply_reserve.unwrap_or(1024),
        cache_dir: rc
            .cache_dir
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(std::path::PathBuf::from),
        cache_entries: rc.cache_entries.unwrap_or(1000),
        normalize_num_ctx: rc.normalize_num_ctx.unwrap_or(true),
        tokenizer: rc.tokenizer.clone().filter(|s| !s.is_empty()),
    };
    if let Some(p) = &compaction.summarizer_provider {
        if !providers.iter().any(|q| &q.name == p) {
            c.bad(
                "compaction.summarizer_provider",
                format!("no provider is named `{p}`"),
            );
        }
    }
    if compaction.summary_max_tokens == 0 {
        c.bad("compaction.summary_max_tokens", "must be greater than zero");
    }
    if let Some(t) = compaction.tokenizer.as_deref().filter(|t| !tokenizer_ok(t)) {
        c.bad(
            "compaction.tokenizer",
            format!("unknown tokenizer `{t}` (expected cl100k or o200k)"),
        );
    }

    let mut models = BTreeMap::new();
    for (name, m) in raw.models {
        let at = |k: &str| format!("models.\"{name}\".{k}");
        let o = ModelOverrides {
            inactivity_timeout: m
                .inactivity_timeout
                .as_deref()
                .map(|s| c.duration(&at("inactivity_timeout"), Some(s), Duration::ZERO)),
            pinned: m.pinned.unwrap_or(false),
            tokenizer: m.tokenizer.clone(),
            memory: m.memory.as_deref().and_then(|s| match parse_bytes(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    c.bad(at("memory"), e);
                    None
                }
            }),
            context_window: m.context_window,
            compression_threshold: m
                .compression_threshold
                .map(|v| c.fraction(&at("compression_threshold"), Some(v), 0.9)),
            on_overflow: m
                .on_overflow
                .as_deref()
                .and_then(|s| overflow_policy(&mut c, &at("on_overflow"), s)),
            prune: m.prune,
        };
        if let Some(t) = o.tokenizer.as_deref().filter(|t| !tokenizer_ok(t)) {
            c.bad(
                at("tokenizer"),
                format!("unknown tokenizer `{t}` (expected cl100k or o200k)"),
            );
        }
        if o.context_window == Some(0) {
            c.bad(at("context_window"), "must be greater than zero");
        }
        models.insert(name, o);
    }

    if !read_problems.is_empty() || !c.problems.is_empty() {
        let mut problems = read_problems;
        problems.append(&mut c.problems);
        return Err(ConfigError::Invalid {
            origin: None,
            problems,
        });
    }
    Ok(Config {
        admin: AdminConfig {
            listen: admin_listen,
            token: admin_token,
            allowed_hosts: admin_allowed_hosts,
        },
        proxy: ProxyConfig {
            max_request_body,
            connect_timeout,
            response_timeout,
            max_connections,
            header_read_timeout,
            body_read_timeout,
            shutdown_grace,
        },
        providers,
        pools,
        epp,
        limits,
        queue,
        buffers,
        memory_pressure,
        compaction,
        models,
    })
}

fn overflow_policy(c: &mut Checker, path: &str, s: &str) -> Option<OverflowPolicy> {
    match s {
        "summarize" => Some(OverflowPolicy::Summarize),
        "truncate_oldest" => Some(OverflowPolicy::TruncateOldest),
        "reject" => Some(OverflowPolicy::Reject),
        "passthrough" => Some(OverflowPolicy::Passthrough),
        other => {
            c.bad(
                path,
                format!(
                    "unknown policy `{other}` (expected summarize, truncate_oldest, reject or passthrough)"
                ),
            );
            None
        }
    }
}

/// `allowed_hosts`: host names (`*.suffix`, or `*` alone), without ports or schemes.
/// The `[[pools]]` entries (the `fleet` module): each needs a kind, a listen address and at
/// least one node with `url` and `admin`.
/// `bound`: the other listeners' addresses.
fn pools(c: &mut Checker, raw: Vec<RawPool>, mut bound: Vec<SocketAddr>) -> Vec<PoolConfig> {
    let mut out: Vec<PoolConfig> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        let at = |k: &str| format!("pools[{i}].{k}");
        let name = p.name.unwrap_or_else(|| format!("pool{i}"));
        if names.contains(&name) {
            c.bad(at("name"), format!("duplicate pool name `{name}`"));
        }
        names.push(name.clone());
        if !valid_name(&name) {
            c.bad(
                at("name"),
                format!("`{name}` must be non-empty and use only letters, digits, `-`, `_`, `.`"),
            );
        }
        let kind = match p.kind.as_deref() {
            None => {
                c.bad(
                    at("kind"),
                    "missing: the API the pool's clients speak (ollama, lmstudio or llamacpp)",
                );
                None
            }
            Some(k) => ProviderKind::parse(k).or_else(|| {
                c.bad(
                    at("kind"),
                    format!("unknown kind `{k}` (expected ollama, lmstudio or llamacpp)"),
                );
                None
            }),
        };
        let listen = match p.listen.as_deref() {
            Some(l) => c.addr(&at("listen"), l),
            None => {
                c.bad(
                    at("listen"),
                    "missing: the address the pool's clients connect to",
                );
                None
            }
        };
        if let Some(l) = listen.filter(|l| l.port() != 0) {
            if bound.contains(&l) {
                c.bad(
                    at("listen"),
                    format!("address {l} is already used by another listener"),
                );
            }
            bound.push(l);
        }
        let poll_interval = c.duration(
            &at("poll_interval"),
            p.poll_interval.as_deref(),
            Duration::from_secs(1),
        );
        if poll_interval.is_zero() {
            c.bad(at("poll_interval"), "must be greater than zero");
        }
        let raw_nodes = p.nodes.unwrap_or_default();
        if raw_nodes.is_empty() {
            c.bad(at("nodes"), "a pool needs at least one node");
        }
        let mut nodes: Vec<NodeConfig> = Vec::new();
        for (j, n) in raw_nodes.into_iter().enumerate() {
            let at = |k: &str| format!("pools[{i}].nodes[{j}].{k}");
            let mut url_of = |key: &str, v: Option<String>| match v {
                None => {
                    c.bad(
                        at(key),
                        if key == "url" {
                            "missing: the node's provider listener, e.g. `http://gpu1:11435`"
                        } else {
                            "missing: the node's admin API, e.g. `http://gpu1:11400`"
                        },
                    );
                    None
                }
                Some(u) => parse_upstream(&u).map_err(|e| c.bad(at(key), e)).ok(),
            };
            let url = url_of("url", n.url);
            let admin = url_of("admin", n.admin);
            let token = n
                .token
                .filter(|t| !t.is_empty())
                .and_then(|t| c.secret(&at("token"), t, false));
            let Some(url) = url else { continue };
            let name = n.name.unwrap_or_else(|| url.authority.to_string());
            if nodes.iter().any(|m| m.name == name) {
                c.bad(at("name"), format!("duplicate node `{name}` in this pool"));
            }
            if let Some(admin) = admin {
                nodes.push(NodeConfig {
                    name,
                    url,
                    admin,
                    token,
                });
            }
        }
        if let (Some(kind), Some(listen)) = (kind, listen) {
            out.push(PoolConfig {
                name,
                kind,
                listen,
                poll_interval,
                nodes,
            });
        }
    }
    out
}

/// A name the proxy puts in headers, metrics and URLs.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
}

fn host_list(c: &mut Checker, key: &str, list: Option<Vec<String>>) -> Vec<String> {
    let list = list.unwrap_or_default();
    for (j, h) in list.iter().enumerate() {
        // A name alone: what `hosts::host_name` reads back unchanged (no port, no scheme).
        let name = h.strip_prefix("*.").unwrap_or(h);
        let valid = h == "*"
            || crate::hosts::host_name(name)
                .is_some_and(|n| n == name.trim_end_matches('.').to_ascii_lowercase());
        if !valid {
            c.bad(
                format!("{key}[{j}]"),
                format!("`{h}` is not a host name (write `gpu.example.com`, `*.example.com` or `*`, without a scheme or port)"),
            );
        }
    }
    list
}
