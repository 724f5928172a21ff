//! The proxy's shared state: one of each component, built by `app` from the config and read
//! by the top layer (the wiring, the poller, the admin API). Lower modules never see it whole:
//! each gets a narrow handle made here ([`AppState::data_plane`] for the provider listeners,
//! the [`respond::Actions`] of the pressure response) or the one component it needs.
//!
//! Who owns what is in ARCHITECTURE.md ("Who owns which fact").

use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;

use crate::config::Config;
use crate::context::Compactor;
use crate::memory::MemoryTable;
use crate::metrics::PressureCounters;
use crate::monitor::respond::{self, PressureEvent, PressureLog};
use crate::monitor::MonitorHandle;
use crate::providers::UpstreamClient;
use crate::proxy::DataPlane;
use crate::stats::StatsTable;
use crate::upstream::ProviderState;

/// Everything the proxy runs on. Shared as `Arc<AppState>`.
pub struct AppState {
    /// The config in force: replaced whole by a reload (read lock-free; see `app::reload`).
    pub config: Arc<ArcSwap<Config>>,
    /// Indexed like `config.providers`.
    pub providers: Arc<[ProviderState]>,
    /// The fronts, indexed like `config.pools` (`crate::fleet`).
    pub pools: Arc<[crate::fleet::front::PoolState]>,
    pub stats: StatsTable,
    /// The control plane's client (polls, loads, `/api/show`, summaries).
    pub client: UpstreamClient,
    /// Token counting, the summary cache and recent compactions.
    pub compactor: Arc<Compactor>,
    /// What each loaded model's memory is made of (from the polls and `/api/show`).
    pub memory: Arc<MemoryTable>,
    /// The latest RAM / GPU sample and pressure level.
    pub monitor: MonitorHandle,
    /// What the pressure response did recently.
    pub pressure_events: PressureLog,
    /// How often it acted, by action (`/metrics`).
    pub pressure_counters: PressureCounters,
    /// Rung by the owners of what the node view shows (the lifecycle actors, the lease fast
    /// path, the monitor's samples): its `seq` and its change stream (`fleet::view`).
    pub changes: Arc<crate::changes::Changes>,
    /// When this process started serving (RFC 3339): the node view's `started_at`.
    pub started_at: String,
    /// Turns true when the proxy stops: long-lived admin streams (`/node?watch=1`) end.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    /// What the provider listeners read: the data plane's narrow view of this state.
    pub fn data_plane(&self) -> DataPlane {
        DataPlane {
            config: self.config.clone(),
            providers: self.providers.clone(),
            stats: self.stats.clone(),
            compactor: self.compactor.clone(),
            client: self.client.clone(),
            monitor: self.monitor.clone(),
        }
    }
}

/// The pressure response acts on the compactor and the lifecycles, and records here.
impl respond::Actions for AppState {
    fn compact_earlier(&self, on: bool) {
        self.compactor.set_compact_earlier(on);
    }

    fn shed(&self, all: bool) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut models = Vec::new();
            for p in self.providers.iter() {
                for m in p.lifecycle.shed(all).await {
                    models.push(format!("{}/{m}", p.config.name));
                }
            }
            models
        })
    }

    fn save_state(&self) {
        self.compactor.save_calibration();
    }

    fn record(&self, event: PressureEvent) {
        self.pressure_counters.record(event.action);
        self.pressure_events.push(event);
    }
}
