//! One provider at run time: its config, the address it is served on, its health, and the
//! handles of what serves it (the lifecycle actor, the data plane's connections, its
//! metrics). Shared as a slice by the data plane, the poller and the admin API; each field
//! has one writer (the health: whoever last talked to the provider; the llama-server mode:
//! the poller) and is read without a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::config::ProviderConfig;
use crate::lifecycle::LifecycleHandle;
use crate::metrics::ProviderMetrics;
use crate::providers::ProviderKind;
use crate::transport::pool::Pool;

/// What a llama-server's `/models` last said it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LlamaMode {
    /// Not known yet (no `/models` read).
    Unknown = 0,
    /// Router mode: models are loaded and unloaded through its API.
    Router = 1,
    /// One model (`-m`): always loaded, no lifecycle.
    Single = 2,
}

impl LlamaMode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => LlamaMode::Router,
            2 => LlamaMode::Single,
            _ => LlamaMode::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LlamaMode::Unknown => "unknown",
            LlamaMode::Router => "router",
            LlamaMode::Single => "single",
        }
    }
}

/// One provider at run time.
pub struct ProviderState {
    pub config: ProviderConfig,
    /// The address actually bound (differs from `config.listen` for port 0).
    pub listen: SocketAddr,
    reachable: AtomicBool,
    /// Why the last contact failed; cleared on success. Short critical sections only.
    last_error: Mutex<Option<String>>,
    /// The owner of this provider's models: every load, unload and lease goes through it,
    /// and it publishes each model's facts (state, window, runner options).
    pub lifecycle: LifecycleHandle,
    /// Its histograms and error counters (the same as `stats.provider(i)`).
    pub metrics: Arc<ProviderMetrics>,
    /// llama-server only: a [`LlamaMode`], written by the poller.
    llama_mode: AtomicU8,
    /// The data plane's connections to the provider (`transport::pool`).
    pub pool: Arc<Pool>,
}

impl ProviderState {
    pub fn new(
        config: ProviderConfig,
        listen: SocketAddr,
        lifecycle: LifecycleHandle,
        metrics: Arc<ProviderMetrics>,
        pool: Arc<Pool>,
    ) -> Self {
        ProviderState {
            config,
            listen,
            reachable: AtomicBool::new(false),
            last_error: Mutex::new(None),
            lifecycle,
            metrics,
            llama_mode: AtomicU8::new(LlamaMode::Unknown as u8),
            pool,
        }
    }

    /// Whether the lifecycle manages this provider's models: always, but for a llama-server
    /// that is not (known to be) a router, whose one model is always loaded.
    pub fn managed(&self) -> bool {
        self.config.kind != ProviderKind::LlamaCpp || self.llama_mode() == LlamaMode::Router
    }

    /// llama-server's mode, as its `/models` last said.
    pub fn llama_mode(&self) -> LlamaMode {
        LlamaMode::from_u8(self.llama_mode.load(Relaxed))
    }

    /// Records llama-server's mode; true when it changed.
    pub fn set_llama_mode(&self, mode: LlamaMode) -> bool {
        self.llama_mode.swap(mode as u8, Relaxed) != mode as u8
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a successful exchange. Cheap when nothing changes (the hot path).
    pub fn mark_reachable(&self) {
        // A load first: the flag's cache line stays shared across cores on every request.
        if !self.reachable.load(Relaxed) && !self.reachable.swap(true, Relaxed) {
            tracing::info!(provider = %self.config.name, upstream = %self.config.upstream, "provider is reachable");
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// The provider answered but refused the proxy's own call (401 or 403: it asks a
    /// credential the proxy lacks, or has wrong: `upstream_api_key`): reachable, with the
    /// refusal as its last error, logged when it starts or changes (not at every poll).
    pub fn mark_refused(&self, why: String) {
        self.mark_reachable();
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(why.as_str()) {
            tracing::warn!(provider = %self.config.name, upstream = %self.config.upstream, error = %why, "provider refuses the proxy's calls");
            *last = Some(why);
        }
    }

    /// The provider answered the proxy's own call: a refusal recorded before is over.
    pub fn mark_accepted(&self) {
        if self.reachable() {
            let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            if last.take().is_some() {
                tracing::info!(provider = %self.config.name, "provider accepts the proxy's calls");
            }
        }
    }

    pub fn mark_unreachable(&self, why: String) {
        if self.reachable.swap(false, Relaxed) || self.last_error().is_none() {
            tracing::warn!(provider = %self.config.name, upstream = %self.config.upstream, error = %why, "provider is unreachable");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}
