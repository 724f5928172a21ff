//! Configuration: the raw TOML shape (`Raw*`, serde, `deny_unknown_fields`) and the validated
//! [`Config`] the rest of the program trusts. One direction only: `load_str` → `Config`.
//!
//! Every problem is reported at once, each with its key path (`providers[1].listen`). Defaults
//! are filled here, so later code never asks "if unset". Keys for later features (limits,
//! queue, buffers, memory pressure, compaction, per-model overrides) are parsed and checked
//! now so that a config written today keeps working.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::providers::ProviderKind;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "LLM_WARDEN_CONFIG";
/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:11400";

// === validated config ===

#[derive(Clone, Debug)]
pub struct Config {
    pub admin: AdminConfig,
    pub proxy: ProxyConfig,
    pub providers: Vec<ProviderConfig>,
    pub limits: Limits,
    pub queue: QueueConfig,
    pub buffers: BufferConfig,
    pub memory_pressure: MemoryPressureConfig,
    pub compaction: CompactionConfig,
    /// Per-model overrides, keyed by the model name as clients send it.
    pub models: BTreeMap<String, ModelOverrides>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Largest request body the proxy reads on an inspected endpoint (bytes); more → 413.
    pub max_request_body: u64,
    /// Give up connecting to an upstream after this long (→ 502).
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub poll_interval: Duration,
}

/// Where a provider lives: scheme and authority, plus an optional path prefix that is put in
/// front of every forwarded path.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Empty, or a prefix starting with `/` and without a trailing `/`.
    pub path_prefix: String,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

/// TDR-007 ResourceLimits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_models_loaded: u32,
    pub memory_threshold: f64,
    pub inactivity_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub max_waiting: u32,
    pub timeout: Duration,
}

/// TDR-007 BufferConfig (sizes in tokens for `context`, MB for `working`).
#[derive(Clone, Debug)]
pub struct BufferConfig {
    pub context_initial: u32,
    pub context_max: u32,
    pub compression_threshold: f64,
    pub working_initial: u32,
    pub working_max: u32,
    pub optimization_threshold: f64,
}

/// TDR-007 MemoryPressureConfig.
#[derive(Clone, Debug)]
pub struct MemoryPressureConfig {
    pub warning: f64,
    pub critical: f64,
    pub action: PressureAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PressureAction {
    Compress,
    Unload,
    Cache,
}

#[derive(Clone, Debug)]
pub struct CompactionConfig {
    pub on_overflow: OverflowPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowPolicy {
    Summarize,
    TruncateOldest,
    Reject,
    Passthrough,
}

/// Per-model settings; `None` means "use the global value".
#[derive(Clone, Debug, Default)]
pub struct ModelOverrides {
    pub inactivity_timeout: Option<Duration>,
    pub pinned: bool,
    pub context_window: Option<u32>,
    pub compression_threshold: Option<f64>,
    pub on_overflow: Option<OverflowPolicy>,
}

// === errors ===

/// One thing wrong with a config, at a key path.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config{}:\n{}", origin_suffix(.origin), render_problems(.problems))]
    Invalid {
        origin: Option<String>,
        problems: Vec<Problem>,
    },
}

fn origin_suffix(origin: &Option<String>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" in {o}"))
        .unwrap_or_default()
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| {
            if p.path.is_empty() {
                format!("  - {}", p.message)
            } else {
                format!("  - {}: {}", p.path, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

// === raw TOML shape ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    admin: RawAdmin,
    proxy: RawProxy,
    providers: Option<Vec<RawProvider>>,
    limits: RawLimits,
    queue: RawQueue,
    buffers: RawBuffers,
    memory_pressure: RawPressure,
    compaction: RawCompaction,
    models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    max_request_body: Option<String>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: Option<String>,
    kind: String,
    listen: Option<String>,
    upstream: Option<String>,
    poll_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_models_loaded: Option<u32>,
    memory_threshold: Option<f64>,
    inactivity_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQueue {
    max_waiting: Option<u32>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBuffers {
    context: RawContextBuffer,
    working: RawWorkingBuffer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawContextBuffer {
    initial: Option<u32>,
    max: Option<u32>,
    compression_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWorkingBuffer {
    initial: Option<u32>,
    max: Option<u32>,
    optimization_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPressure {
    warning: Option<f64>,
    critical: Option<f64>,
    action: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCompaction {
    on_overflow: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawModel {
    inactivity_timeout: Option<String>,
    pinned: Option<bool>,
    context_window: Option<u32>,
    compression_threshold: Option<f64>,
    on_overflow: Option<String>,
}

// === loading ===

impl Default for Config {
    /// The built-in defaults: one Ollama and one LM Studio provider on their usual ports.
    fn default() -> Self {
        match load_str("") {
            Ok(c) => c,
            // The empty document is validated by a unit test; this arm is unreachable.
            Err(e) => panic!("built-in defaults are invalid: {e}"),
        }
    }
}

/// Loads the config named by `--config`, else `$LLM_WARDEN_CONFIG`, else built-in defaults.
pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<String>), ConfigError> {
    let from_env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty());
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| from_env.map(Into::into));
    match path {
        Some(p) => {
            let shown = p.display().to_string();
            let text = std::fs::read_to_string(&p).map_err(|source| ConfigError::Read {
                path: shown.clone(),
                source,
            })?;
            let cfg = load_str(&text).map_err(|e| match e {
                ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                    origin: Some(shown.clone()),
                    problems,
                },
                other => other,
            })?;
            Ok((cfg, Some(shown)))
        }
        None => Ok((Config::default(), None)),
    }
}

/// Parses and validates a TOML document.
pub fn load_str(text: &str) -> Result<Config, ConfigError> {
    let de = toml::Deserializer::new(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().to_string();
        let location = inner
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigError::Invalid {
            origin: None,
            problems: vec![Problem {
                path: if path == "." { String::new() } else { path },
                message: format!("{message}{location}"),
            }],
        }
    })?;
    validate(raw)
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
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

/// Parses `"90s"`, `"10m"`, `"1h30m"`, `"250ms"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like \"90s\" or \"10m\" ({e})"))
}

/// Parses `"64MiB"`, `"512KB"`, `"1GiB"` or a plain number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like \"64MiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "`{s}` has an unknown unit `{other}` (use B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    Ok((num * mult as f64) as u64)
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut c = Checker {
        problems: Vec::new(),
    };

    let admin_listen = c
        .addr(
            "admin.listen",
            raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 11400)));

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

    let raw_providers = raw.providers.unwrap_or_else(|| {
        [ProviderKind::Ollama, ProviderKind::LmStudio]
            .into_iter()
            .map(|k| RawProvider {
                name: None,
                kind: k.as_str().to_string(),
                listen: None,
                upstream: None,
                poll_interval: None,
            })
            .collect()
    });
    if raw_providers.is_empty() {
        c.bad("providers", "at least one provider is needed");
    }
    let mut providers = Vec::new();
    for (i, p) in raw_providers.into_iter().enumerate() {
        let at = |k: &str| format!("providers[{i}].{k}");
        let kind = match ProviderKind::parse(&p.kind) {
            Some(k) => k,
            None => {
                c.bad(
                    at("kind"),
                    format!(
                        "unknown provider kind `{}` (expected ollama or lmstudio)",
                        p.kind
                    ),
                );
                continue;
            }
        };
        let facts = kind.facts();
        let name = p.name.unwrap_or_else(|| kind.as_str().to_string());
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            c.bad(
                at("name"),
                format!("`{name}` must be non-empty and use only letters, digits, `-`, `_`, `.`"),
            );
        }
        let listen = c.addr(
            &at("listen"),
            p.listen.as_deref().unwrap_or(facts.default_listen),
        );
        let upstream = parse_upstream(p.upstream.as_deref().unwrap_or(facts.default_upstream))
            .map_err(|e| c.bad(at("upstream"), e))
            .ok();
        let poll_interval = c.duration(
            &at("poll_interval"),
            p.poll_interval.as_deref(),
            Duration::from_secs(5),
        );
        if poll_interval.is_zero() {
            c.bad(at("poll_interval"), "must be greater than zero");
        }
        if let (Some(listen), Some(upstream)) = (listen, upstream) {
            providers.push(ProviderConfig {
                name,
                kind,
                listen,
                upstream,
                poll_interval,
            });
        }
    }
    for (i, p) in providers.iter().enumerate() {
        if providers[..i].iter().any(|q| q.name == p.name) {
            c.bad(
                format!("providers[{i}].name"),
                format!("duplicate provider name `{}`", p.name),
            );
        }
        let clash = p.listen.port() != 0
            && (p.listen == admin_listen || providers[..i].iter().any(|q| q.listen == p.listen));
        if clash {
            c.bad(
                format!("providers[{i}].listen"),
                format!("address {} is already used by another listener", p.listen),
            );
        }
    }

    let limits = Limits {
        max_models_loaded: raw.limits.max_models_loaded.unwrap_or(3),
        memory_threshold: c.fraction("limits.memory_threshold", raw.limits.memory_threshold, 0.85),
        inactivity_timeout: c.duration(
            "limits.inactivity_timeout",
            raw.limits.inactivity_timeout.as_deref(),
            Duration::from_secs(600),
        ),
    };
    if limits.max_models_loaded == 0 {
        c.bad("limits.max_models_loaded", "must be at least 1");
    }

    let queue = QueueConfig {
        max_waiting: raw.queue.max_waiting.unwrap_or(256),
        timeout: c.duration(
            "queue.timeout",
            raw.queue.timeout.as_deref(),
            Duration::from_secs(120),
        ),
    };

    let b = &raw.buffers;
    let buffers = BufferConfig {
        context_initial: b.context.initial.unwrap_or(4096),
        context_max: b.context.max.unwrap_or(32768),
        compression_threshold: c.fraction(
            "buffers.context.compression_threshold",
            b.context.compression_threshold,
            0.9,
        ),
        working_initial: b.working.initial.unwrap_or(512),
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
    };
    if memory_pressure.warning >= memory_pressure.critical {
        c.bad(
            "memory_pressure.warning",
            "must be below memory_pressure.critical",
        );
    }

    let compaction = CompactionConfig {
        on_overflow: overflow_policy(
            &mut c,
            "compaction.on_overflow",
            raw.compaction.on_overflow.as_deref().unwrap_or("summarize"),
        )
        .unwrap_or(OverflowPolicy::Summarize),
    };

    let mut models = BTreeMap::new();
    for (name, m) in raw.models {
        let at = |k: &str| format!("models.\"{name}\".{k}");
        let o = ModelOverrides {
            inactivity_timeout: m
                .inactivity_timeout
                .as_deref()
                .map(|s| c.duration(&at("inactivity_timeout"), Some(s), Duration::ZERO)),
            pinned: m.pinned.unwrap_or(false),
            context_window: m.context_window,
            compression_threshold: m
                .compression_threshold
                .map(|v| c.fraction(&at("compression_threshold"), Some(v), 0.9)),
            on_overflow: m
                .on_overflow
                .as_deref()
                .and_then(|s| overflow_policy(&mut c, &at("on_overflow"), s)),
        };
        if o.context_window == Some(0) {
            c.bad(at("context_window"), "must be greater than zero");
        }
        models.insert(name, o);
    }

    if !c.problems.is_empty() {
        return Err(ConfigError::Invalid {
            origin: None,
            problems: c.problems,
        });
    }
    Ok(Config {
        admin: AdminConfig {
            listen: admin_listen,
        },
        proxy: ProxyConfig {
            max_request_body,
            connect_timeout,
        },
        providers,
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

/// Parses an upstream base URL: `http://host:port[/prefix]`.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("`{s}` is not a URL like `http://127.0.0.1:11434`"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("`{s}` needs a scheme (`http://`)"))?;
    if scheme != http::uri::Scheme::HTTP {
        return Err(format!(
            "`{s}`: only http:// upstreams are supported (local providers speak plain HTTP)"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{s}` needs a host"))?;
    if uri.query().is_some() {
        return Err(format!("`{s}` must not have a query string"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Upstream {
        scheme,
        authority,
        path_prefix,
    })
}

#[cfg(test)]
mod tests {
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
        let err =
            load_str("[models.\"m\"]\non_overflow = \"drop\"\ncontext_window = 0\n").unwrap_err();
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
}
