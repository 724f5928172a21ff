//! Configuration: the raw TOML shape (`Raw*`, serde, `deny_unknown_fields`) and the validated
//! [`Config`] the rest of the program trusts. One direction only: `load_str` → `Config`.
//!
//! Every problem is reported at once, each with its key path (`providers[1].listen`): unknown
//! keys and values of the wrong type at every level (`raw::read`), then the rules on what
//! did parse (`validate`). Only a TOML syntax error stops at one. Defaults
//! are filled here, so later code never asks "if unset". Keys for later features (limits,
//! queue, buffers, memory pressure, compaction, per-model overrides) are parsed and checked
//! now so that a config written today keeps working.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::providers::ProviderKind;
pub use crate::providers::{parse_upstream, Upstream};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "LLM_WARDEN_CONFIG";
/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:11400";
/// Environment variable holding the admin token; wins over `[admin] token`.
pub const ADMIN_TOKEN_ENV: &str = "LLM_WARDEN_ADMIN_TOKEN";
/// Prefix of the environment variable holding a provider's API keys (comma-separated):
/// `LLM_WARDEN_API_KEYS_` + the provider's name in upper case, `-` and `.` as `_`.
pub const API_KEYS_ENV_PREFIX: &str = "LLM_WARDEN_API_KEYS_";

/// Prefix of the environment variable holding the key a provider asks of the proxy
/// (`upstream_api_key`): `LLM_WARDEN_UPSTREAM_API_KEY_` + the name, as [`api_keys_env`].
pub const UPSTREAM_API_KEY_ENV_PREFIX: &str = "LLM_WARDEN_UPSTREAM_API_KEY_";

/// The environment variable that holds provider `name`'s API keys.
pub fn api_keys_env(name: &str) -> String {
    env_for(API_KEYS_ENV_PREFIX, name)
}

/// The environment variable that holds the key provider `name` asks of the proxy.
pub fn upstream_api_key_env(name: &str) -> String {
    env_for(UPSTREAM_API_KEY_ENV_PREFIX, name)
}

/// `prefix` + `name` in upper case, anything but letters and digits as `_`.
fn env_for(prefix: &str, name: &str) -> String {
    let mut v = String::from(prefix);
    v.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    v
}

// === impl Secret ===

/// A token or API key: never shown by `Debug`, compared in constant time (through SHA-256
/// digests, so neither the content nor the length leaks through timing).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    digest: [u8; 32],
    /// Read from the environment: `check-config` does not print it.
    pub from_env: bool,
}

impl Secret {
    pub fn new(value: String, from_env: bool) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(value.as_bytes()).into();
        Secret {
            value,
            digest,
            from_env,
        }
    }

    /// The secret itself (to send it, or to write it back where it came from).
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether `presented` is this secret, in time independent of both.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::Digest;
        let d: [u8; 32] = sha2::Sha256::digest(presented).into();
        ct_eq(&d, &self.digest)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Constant-time equality of two digests: every byte is looked at, whatever differs.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header, if that is what it holds.
pub fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let v = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

// === validated config ===

#[derive(Clone, Debug)]
pub struct Config {
    pub admin: AdminConfig,
    pub proxy: ProxyConfig,
    pub providers: Vec<ProviderConfig>,
    /// Fronts over llm-warden nodes (`[[pools]]`, the `fleet` module); fixed at start.
    pub pools: Vec<PoolConfig>,
    /// The endpoint picker Envoy asks (`[epp]`), over one of `pools`; fixed at start.
    pub epp: Option<EppConfig>,
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
    /// Bearer token required by the admin API's state-changing endpoints (`POST
    /// /models/...`); `$LLM_WARDEN_ADMIN_TOKEN` wins over the file. Required when `listen`
    /// is not a loopback address.
    pub token: Option<Secret>,
    /// Host names the admin listener serves besides IP literals, `localhost` and
    /// `*.localhost` (`*.example.com` for any name under it; `*` for any): the DNS
    /// rebinding defence (`crate::hosts`).
    pub allowed_hosts: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Largest request body the proxy reads on an inspected endpoint (bytes); more → 413.
    pub max_request_body: u64,
    /// Give up connecting to an upstream after this long (→ 502).
    pub connect_timeout: Duration,
    /// Give up on an upstream whose response (its status and headers) has not begun after
    /// this long (→ 504 in the client's format). A non-streamed generation answers only when
    /// it is done, so this bounds whole non-streamed requests too.
    pub response_timeout: Duration,
    /// Open connections per listener; over it, new connections wait in the OS backlog.
    pub max_connections: u32,
    /// A client must send a request's headers (and, between requests on a keep-alive
    /// connection, the next one's) within this long, else the connection is closed.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this long of its headers, plus one second per MiB
    /// received (a large upload on a slow link goes on; one byte every few seconds does not):
    /// else 408 in the client's format (HTTP/1 clients).
    pub body_read_timeout: Duration,
    /// On shutdown, how long open requests (streams) may finish before they are cut.
    pub shutdown_grace: Duration,
}

/// A front over llm-warden nodes: clients speak `kind`'s API to `listen`, and each model
/// request goes to the node the picker ranks first (the `fleet` module).
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub name: String,
    /// The API its clients speak (and its nodes' provider listeners serve).
    pub kind: ProviderKind,
    pub listen: SocketAddr,
    /// How often each node's view is read (`GET <admin>/node`); a node that has not
    /// answered for two intervals is out of rotation.
    pub poll_interval: Duration,
    pub nodes: Vec<NodeConfig>,
}

/// The endpoint picker: a gRPC `ext_proc` server on `listen` picking among the nodes of the
/// pool named `pool` (the `fleet` module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EppConfig {
    pub listen: SocketAddr,
    pub pool: String,
}

/// One node of a pool.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The front's name for it (`x-llm-warden-node`, metrics): `name`, else the host and
    /// port of `url`.
    pub name: String,
    /// The node's provider listener, where requests go.
    pub url: Upstream,
    /// The node's admin API, where its view is read.
    pub admin: Upstream,
    /// The node's admin token, if its admin API asks one.
    pub token: Option<Secret>,
}

#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub poll_interval: Duration,
    /// `[limits] max_models_loaded`, unless this provider overrides it.
    pub max_models_loaded: u32,
    /// `[limits] memory_threshold`, unless this provider overrides it.
    pub memory_threshold: f64,
    /// llamacpp only: the server runs with `--slot-save-path`, so the proxy saves a model's
    /// KV cache (slot 0) before unloading it and restores it after loading it again.
    pub slot_save: bool,
    /// Keys a client must present (`Authorization: Bearer <key>`); empty = no check, and the
    /// client's `Authorization` goes upstream unchanged. When checked, it is not forwarded.
    pub api_keys: Vec<Secret>,
    /// The key the provider asks of its callers (LM Studio's "Require Authentication"):
    /// sent as `Authorization: Bearer <key>` on the proxy's own calls and, when `api_keys`
    /// consumed the client's, on forwarded requests. Also in `upstream` (which sends it);
    /// kept here for `check-config` and reload. `$LLM_WARDEN_UPSTREAM_API_KEY_<NAME>` wins.
    pub upstream_api_key: Option<Secret>,
    /// `ollama` on a loopback listener: host names served besides Ollama's own (local names
    /// and private addresses; `crate::hosts`).
    pub allowed_hosts: Vec<String>,
    /// Parallel slots each loaded model runs with (Ollama's `OLLAMA_NUM_PARALLEL`, which the
    /// proxy cannot read): the KV cache is this many times the loaded context.
    pub num_parallel: u32,
    /// The KV cache's element type (Ollama's `OLLAMA_KV_CACHE_TYPE`): one of
    /// [`crate::memory::KV_CACHE_TYPES`].
    pub kv_cache_type: String,
}

/// docs/design.md: ResourceLimits. The first two apply to each provider on its own (a provider entry
/// may override them: see [`ProviderConfig`]).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_models_loaded: u32,
    pub memory_threshold: f64,
    pub inactivity_timeout: Duration,
    /// On shutdown, unload the models the proxy manages (idle ones, within
    /// `proxy.shutdown_grace`); by default they stay loaded.
    pub unload_on_shutdown: bool,
}

/// Requests waiting for a model, per provider.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub max_waiting: u32,
    pub timeout: Duration,
    pub policy: QueuePolicy,
    /// How long a waiting request may be overtaken (grouped policy) before the models in its
    /// way stop taking new requests and are swapped out.
    pub aging: Duration,
}

/// In which order waiting requests are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Requests for a loaded model go first, so a model is swapped out only when its queue is
    /// empty or a request for another model has waited `aging`.
    Grouped,
    /// Strict arrival order: a request for an unloaded model holds up every later one.
    Fifo,
}

/// docs/design.md: BufferConfig (sizes in tokens for `context`, MB for `working`).
#[derive(Clone, Debug)]
pub struct BufferConfig {
    pub context_initial: u32,
    pub context_max: u32,
    pub compression_threshold: f64,
    pub working_initial: u32,
    pub working_max: u32,
    pub optimization_threshold: f64,
}

/// docs/design.md: MemoryPressureConfig.
#[derive(Clone, Debug)]
pub struct MemoryPressureConfig {
    pub warning: f64,
    pub critical: f64,
    pub action: PressureAction,
    /// A level is left only when pressure falls this far below its threshold.
    pub hysteresis: f64,
    /// How often memory (RAM, GPU) is sampled.
    pub sample_interval: Duration,
    /// Read GPU memory through NVML (when a driver is present).
    pub gpu: bool,
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
    /// Before summarizing or truncating, drop earlier copies of large repeated content and
    /// images already answered from the older turns (`context::prune`).
    pub prune: bool,
    /// Which provider summarizes; `None` = the request's own.
    pub summarizer_provider: Option<String>,
    /// Which model summarizes; `None` = the request's own.
    pub summarizer_model: Option<String>,
    /// Give up on a summary after this long (then truncate the oldest turns instead).
    pub summarizer_timeout: Duration,
    /// Length budget of a summary, in tokens (`num_predict` / `max_tokens` of the call).
    pub summary_max_tokens: u32,
    /// Share of the window the verbatim recent turns may take.
    pub keep_recent_share: f64,
    /// Tokens kept free for the reply when the request sets no limit of its own.
    pub reply_reserve: u32,
    /// Where summaries persist; `None` = the user's data directory.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Summaries kept in memory.
    pub cache_entries: u32,
    /// Ollama: rewrite a request's `num_ctx` to the loaded model's when the prompt fits it,
    /// so clients that send varying `num_ctx` do not force a reload.
    pub normalize_num_ctx: bool,
    /// Default tokenizer for estimates: `None` = chosen by model family.
    pub tokenizer: Option<String>,
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
    /// What the model takes when loaded (bytes), instead of what the provider reports.
    pub memory: Option<u64>,
    /// Tokenizer for estimates (`cl100k` | `o200k`), instead of the family default.
    pub tokenizer: Option<String>,
    pub context_window: Option<u32>,
    pub compression_threshold: Option<f64>,
    pub on_overflow: Option<OverflowPolicy>,
    pub prune: Option<bool>,
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
    /// Says the OS error itself, and is not its `source`: the error chain (`{:#}`) would
    /// print it twice.
    #[error("cannot read config file {path}: {error}")]
    Read { path: String, error: std::io::Error },
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

mod raw;
mod show;
mod validate;

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
            let text = std::fs::read_to_string(&p).map_err(|error| ConfigError::Read {
                path: shown.clone(),
                error,
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

/// Parses and validates a TOML document (secrets in the environment apply: see
/// [`ADMIN_TOKEN_ENV`], [`api_keys_env`], [`upstream_api_key_env`]).
pub fn load_str(text: &str) -> Result<Config, ConfigError> {
    load_str_with_env(text, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// [`load_str`] with the environment given as a lookup (tests).
pub fn load_str_with_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let (raw, structural) = raw::read(text).map_err(|problems| ConfigError::Invalid {
        origin: None,
        problems,
    })?;
    validate::validate(raw, structural, env)
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

#[cfg(test)]
mod tests;
