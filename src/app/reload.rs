//! Config reload on a running proxy: on SIGHUP and when the config file changes (checked
//! every [`WATCH_EVERY`]), without dropping a connection.
//!
//! What changes live: `[limits]` and each provider's `max_models_loaded` / `memory_threshold`
//! / `num_parallel` / `kv_cache_type` (the memory split, from the next poll),
//! `[queue]`, `[models.*]` (idle timeouts, pinning, sizes, windows, tokenizers, thresholds,
//! overflow policies), `[buffers]`, `[compaction]` (but for its cache's place and size),
//! `[memory_pressure]` thresholds, action and hysteresis, `[proxy] max_request_body` and
//! `shutdown_grace`, and `[limits] unload_on_shutdown` (both read when shutdown begins).
//! Idle models over a lowered `max_models_loaded` are unloaded, least recently used first.
//!
//! What needs a restart (a change is logged and the running value kept): `[admin] listen`
//! and `token`; the providers' names, kinds, listen addresses, upstreams, `poll_interval`,
//! `slot_save`, `api_keys` (or their number) and `upstream_api_key` (file or environment);
//! `[proxy] connect_timeout`, `max_connections` and `header_read_timeout` (the listeners are
//! set up with them once; secrets are fixed at start so a half-applied rotation never
//! refuses a client that presented the key it was given; the upstream key likewise: the
//! poller, the lifecycle's backend and the forwarding path each hold the provider's upstream
//! from start, so a live change would reach some of the proxy's calls and not others, and a
//! provider whose token was rotated is followed by restarting the proxy with the new one,
//! its 401s showing in `/status` until then); `compaction.cache_dir` and
//! `compaction.cache_entries`; `memory_pressure.sample_interval` and `gpu`; `[[pools]]`
//! (their listeners, nodes and pollers are set up once).
//!
//! A new config that does not validate is refused whole: the error, with each problem's key
//! path, is logged, and the running config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::lifecycle::Settings;
use crate::state::AppState;

/// What a reload compares of `[[pools]]` (all of it: a pool is fixed at start).
fn pools_summary(c: &Config) -> Vec<String> {
    c.pools
        .iter()
        .map(|p| {
            let nodes: Vec<String> = p
                .nodes
                .iter()
                .map(|n| {
                    let token = n.token.as_ref().map(|t| t.expose());
                    format!("{} {} {} {token:?}", n.name, n.url, n.admin)
                })
                .collect();
            format!(
                "{} {} {} {:?} {nodes:?}",
                p.name,
                p.kind.as_str(),
                p.listen,
                p.poll_interval
            )
        })
        .collect()
}

/// How often the config file is checked for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Applies `new` to the running proxy (see the module doc); returns the keys whose change
/// needs a restart and was not applied.
pub fn apply(state: &AppState, new: Config) -> Vec<String> {
    let old = state.config.load_full();
    let mut kept = Vec::new();
    let mut effective = new;
    macro_rules! keep {
        ($($field:ident).+, $key:expr) => {
            if effective.$($field).+ != old.$($field).+ {
                kept.push($key.to_string());
                effective.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(admin.listen, "admin.listen");
    keep!(admin.token, "admin.token");
    keep!(proxy.connect_timeout, "proxy.connect_timeout");
    keep!(proxy.max_connections, "proxy.max_connections");
    keep!(proxy.header_read_timeout, "proxy.header_read_timeout");
    keep!(compaction.cache_dir, "compaction.cache_dir");
    keep!(compaction.cache_entries, "compaction.cache_entries");
    keep!(
        memory_pressure.sample_interval,
        "memory_pressure.sample_interval"
    );
    keep!(memory_pressure.gpu, "memory_pressure.gpu");
    // The pools' listeners, nodes and pollers are set up once.
    if pools_summary(&effective) != pools_summary(&old) {
        kept.push("pools".to_string());
        effective.pools = old.pools.clone();
    }
    keep!(epp, "epp");
    let same_providers = effective.providers.len() == old.providers.len()
        && effective
            .providers
            .iter()
            .zip(&old.providers)
            .all(|(n, o)| {
                n.name == o.name
                    && n.kind == o.kind
                    && n.listen == o.listen
                    && n.upstream.to_string() == o.upstream.to_string()
            });
    if !same_providers {
        kept.push("providers".to_string());
        effective.providers = old.providers.clone();
    } else {
        for (i, (n, o)) in effective
            .providers
            .iter_mut()
            .zip(&old.providers)
            .enumerate()
        {
            if n.poll_interval != o.poll_interval {
                kept.push(format!("providers[{i}].poll_interval"));
                n.poll_interval = o.poll_interval;
            }
            if n.slot_save != o.slot_save {
                kept.push(format!("providers[{i}].slot_save"));
                n.slot_save = o.slot_save;
            }
            if n.api_keys != o.api_keys {
                kept.push(format!("providers[{i}].api_keys"));
                n.api_keys = o.api_keys.clone();
            }
            if n.upstream_api_key != o.upstream_api_key {
                kept.push(format!("providers[{i}].upstream_api_key"));
                n.upstream_api_key = o.upstream_api_key.clone();
                n.upstream = o.upstream.clone();
            }
        }
    }
    for (i, p) in state.providers.iter().enumerate() {
        p.lifecycle
            .reconfigure(Settings::from_config(&effective, i));
    }
    state.compactor.reconfigure(&effective);
    state
        .monitor
        .set_thresholds(crate::monitor::Thresholds::from(&effective.memory_pressure));
    state.config.store(Arc::new(effective));
    kept
}

/// Reads `path` and applies it; a config that does not load is logged and refused.
pub fn reload_from(state: &AppState, path: &Path, why: &str) -> bool {
    match crate::config::load(Some(path)) {
        Ok((config, _)) => {
            let kept = apply(state, config);
            if kept.is_empty() {
                tracing::info!(path = %path.display(), trigger = why, "config reloaded");
            } else {
                tracing::warn!(
                    path = %path.display(),
                    trigger = why,
                    needs_restart = %kept.join(", "),
                    "config reloaded; these changes need a restart and were not applied"
                );
            }
            true
        }
        Err(e) => {
            // One line: each problem with its key path.
            let problems = e
                .to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            tracing::error!(
                trigger = why,
                "config reload refused, the running config stays: {problems}"
            );
            false
        }
    }
}

/// Reloads `path` on SIGHUP and whenever its contents differ from `seen` (what the running
/// config was loaded from), until `stop`.
pub async fn watch(
    state: Arc<AppState>,
    path: PathBuf,
    mut seen: Option<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(WATCH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tracing::info!(path = %path.display(), "watching the config for changes (and SIGHUP)");
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = hangup => {
                seen = std::fs::read(&path).ok();
                reload_from(&state, &path, "SIGHUP");
            }
            _ = ticks.tick() => {
                let now = std::fs::read(&path).ok();
                if now.is_some() && now != seen {
                    seen = now;
                    reload_from(&state, &path, "file changed");
                }
            }
        }
    }
}
