//! Per (provider, model) request accounting: requests in flight, totals, errors, tokens as the
//! provider reported them, last use.
//!
//! The in-flight count is an RAII [`InFlight`] guard: it rises when a request is admitted and
//! falls exactly once when the guard drops, whether the response ended, failed, or the client
//! went away (hyper drops the body then; no end-of-stream callback would run). Counters are
//! atomics so the hot path takes no lock after the first request for a model.
//!
//! Where the guard drops, the request ends: that is where its `/metrics` numbers (requests
//! by endpoint and status, latency histograms) and its access log line are written, once.
//!
//! Model names come from clients, so the table must not keep one entry per name a client
//! invents. A model keeps its own entry while it has requests in flight, once any of its
//! requests succeeded (2xx), while the provider lists it as loaded, and while the provider's
//! catalogue lists it ([`StatsTable::set_catalog`]), and (the first [`UNLISTED_KEPT`] of them)
//! while the provider could not say (no request answered 4xx: it was down). Any other
//! model's entry is folded into
//! the provider's `_unlisted` entry ([`UNLISTED_MODEL`], as `/metrics` labels them) when its
//! last request ends: its counters move there, its name goes. `/status` and `/metrics` show
//! that one row for all of them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use crate::metrics::{ProviderMetrics, ENDPOINTS, STATUS, UNLISTED_MODEL};
use crate::providers::LoadedModel;

/// Counters for one model on one provider.
#[derive(Debug, Default)]
pub struct ModelStats {
    /// The provider's histograms and error counters (its name too, for the access log).
    provider: Arc<ProviderMetrics>,
    model: Box<str>,
    active: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    /// Finished requests by endpoint and status class (`metrics::ENDPOINTS`, `STATUS`).
    requests: [[AtomicU64; STATUS.len()]; ENDPOINTS.len()],
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Unix time in milliseconds; 0 = never.
    last_used_ms: AtomicU64,
    /// Requests whose prompt the compactor rewrote, and the tokens that saved.
    compactions: AtomicU64,
    tokens_saved: AtomicU64,
    /// Of those, requests the prune step shortened, and the tokens pruning alone saved.
    prunes: AtomicU64,
    pruned_tokens: AtomicU64,
    /// Tokens in context (docs/design.md: `contextSize`): the latest request's prompt as estimated
    /// when it was forwarded (0 = not counted: it was small), and prompt + reply as the
    /// provider reported them for the latest finished request (0 = none reported).
    context_estimated: AtomicU64,
    context_reported: AtomicU64,
    /// What the provider's own list last said about this model; `None` until it was asked.
    /// Written by the poller every `poll_interval`, read by `/status`: a plain mutex.
    reported: std::sync::Mutex<Option<Reported>>,
    /// The provider's map this entry is in, and what decides whether it stays there (unset
    /// for the `_unlisted` entry itself).
    home: Option<(std::sync::Weak<ModelMap>, Arc<Shared>)>,
    /// Kept although unlisted (see [`UNLISTED_KEPT`]).
    parked: std::sync::atomic::AtomicBool,
}

/// The provider's view of one model at the last poll.
#[derive(Clone, Debug, Default, PartialEq)]
struct Reported {
    loaded: bool,
    size_bytes: Option<u64>,
    vram_bytes: Option<u64>,
    context_length: Option<u64>,
}

/// A copy of one model's counters, for `/status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ModelSnapshot {
    pub provider: String,
    pub model: String,
    pub active_requests: u64,
    pub total_requests: u64,
    pub errors: u64,
    /// Requests whose client went away before the response ended.
    pub cancelled: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// RFC 3339, or null when the model was reported but never used through the proxy.
    pub last_used: Option<String>,
    /// Whether the provider lists the model as loaded; null until the provider was asked.
    pub loaded: Option<bool>,
    /// Memory the loaded model takes, as the provider reports it (MiB).
    pub memory_usage_mb: Option<u64>,
    /// Of that, on the GPU (MiB; Ollama only).
    pub vram_usage_mb: Option<u64>,
    /// The context the model is loaded with, in tokens.
    pub context_length: Option<u64>,
    /// Requests whose prompt was compacted to fit the window, and the tokens that saved.
    pub compactions: u64,
    pub tokens_saved: u64,
    /// Of those, requests the prune step shortened (duplicates and answered images out of
    /// the older turns), and the tokens pruning alone saved.
    pub prunes: u64,
    pub pruned_tokens: u64,
    /// Tokens in context: the latest forwarded prompt as estimated (null when it was too
    /// small to need counting), and the latest finished request's prompt + reply as the
    /// provider reported them.
    pub context_tokens_estimated: Option<u64>,
    pub context_tokens_reported: Option<u64>,
    /// Finished requests by endpoint label and status class, those with any (`/metrics`).
    #[serde(skip)]
    pub requests_by_endpoint: Vec<(&'static str, &'static str, u64)>,
}

impl ModelSnapshot {
    /// A model nothing has been counted for yet.
    pub fn empty(provider: &str, model: &str) -> Self {
        ModelSnapshot {
            provider: provider.to_string(),
            model: model.to_string(),
            ..Default::default()
        }
    }
}

/// The models of one provider, by name.
type ModelMap = DashMap<Box<str>, Arc<ModelStats>>;

/// One provider's models, and what it records for `/metrics` as requests happen.
#[derive(Debug)]
struct ProviderStats {
    name: String,
    models: Arc<ModelMap>,
    metrics: Arc<ProviderMetrics>,
    /// What its model entries reach: the catalogue, and where folded counters go.
    shared: Arc<Shared>,
}

/// What every model entry of one provider reaches: what decides whether it keeps its entry,
/// and where its counters go when it does not (see the module doc).
#[derive(Debug, Default)]
struct Shared {
    /// The models the provider's catalogue lists.
    catalog: arc_swap::ArcSwap<HashSet<Box<str>>>,
    /// The counters of every model folded away.
    unlisted: ModelStats,
    /// Entries kept although unlisted ([`UNLISTED_KEPT`] at most).
    parked: AtomicU64,
}

/// Models per provider that keep their entry although nothing lists them, when no request
/// for them was answered 4xx: the provider could not say whether it has them (down since the
/// proxy started, its catalogue never read), so their errors stay on their own row. Only the
/// first this many; any later one is folded like a name the provider refused.
pub const UNLISTED_KEPT: u64 = 16;

/// All models of all providers. Cloning is an `Arc` bump.
#[derive(Clone, Debug)]
pub struct StatsTable {
    /// Indexed like `Config::providers`.
    providers: Arc<Vec<ProviderStats>>,
}

impl StatsTable {
    pub fn new(provider_names: impl IntoIterator<Item = String>) -> Self {
        StatsTable {
            providers: Arc::new(
                provider_names
                    .into_iter()
                    .map(|name| {
                        let metrics = Arc::new(ProviderMetrics::new(&name));
                        let unlisted = ModelStats {
                            provider: metrics.clone(),
                            model: UNLISTED_MODEL.into(),
                            ..Default::default()
                        };
                        ProviderStats {
                            metrics,
                            name,
                            models: Default::default(),
                            shared: Arc::new(Shared {
                                catalog: Default::default(),
                                unlisted,
                                parked: AtomicU64::new(0),
                            }),
                        }
                    })
                    .collect(),
            ),
        }
    }

    /// What provider `provider` records for `/metrics` (histograms, errors, loads).
    pub fn provider(&self, provider: usize) -> &Arc<ProviderMetrics> {
        &self.providers[provider].metrics
    }

    /// The counters of `model` on provider `provider`, created on first use.
    pub fn model(&self, provider: usize, model: &str) -> Arc<ModelStats> {
        self.with_model(provider, model, |s| s.clone())
    }

    /// Runs `f` on the entry of `model`, created on first use, under its map's lock: an
    /// entry is folded away under the same lock, only with nothing in flight.
    fn with_model<T>(
        &self,
        provider: usize,
        model: &str,
        f: impl FnOnce(&Arc<ModelStats>) -> T,
    ) -> T {
        let p = &self.providers[provider];
        if let Some(s) = p.models.get(model) {
            return f(&s);
        }
        let s = p.models.entry(model.into()).or_insert_with(|| {
            Arc::new(ModelStats {
                provider: p.metrics.clone(),
                model: model.into(),
                home: Some((Arc::downgrade(&p.models), p.shared.clone())),
                ..Default::default()
            })
        });
        f(&s)
    }

    /// Starts a request on `endpoint` (its label) that arrived at `arrived`: counts it in
    /// flight until the guard drops.
    pub fn begin(
        &self,
        provider: usize,
        model: &str,
        endpoint: &str,
        arrived: Instant,
    ) -> InFlight {
        let stats = self.with_model(provider, model, |s| {
            s.active.fetch_add(1, Relaxed);
            s.clone()
        });
        InFlight::new(stats, endpoint, arrived)
    }

    /// The models provider `provider`'s catalogue lists (`/api/tags`, LM Studio's list):
    /// they keep their entries even while every request for them fails.
    pub fn set_catalog<'a>(&self, provider: usize, models: impl IntoIterator<Item = &'a str>) {
        if let Some(p) = self.providers.get(provider) {
            let names = models.into_iter().map(Box::from).collect();
            p.shared.catalog.store(Arc::new(names));
        }
    }

    /// Records what provider `provider` lists as loaded: those models are `loaded` (and appear
    /// even if no request named them), every other known model of that provider is not.
    pub fn apply_report(&self, provider: usize, loaded: &[LoadedModel]) {
        for m in loaded {
            self.model(provider, &m.model).set_reported(Reported {
                loaded: true,
                size_bytes: m.size_bytes,
                vram_bytes: m.vram_bytes,
                context_length: m.context_length,
            });
        }
        for entry in self.providers[provider].models.iter() {
            if !loaded.iter().any(|m| *m.model == **entry.key()) {
                entry.value().set_reported(Reported::default());
            }
        }
    }

    /// Every model, sorted by provider order then name; a provider's `_unlisted` entry
    /// once anything was folded into it.
    pub fn snapshot(&self) -> Vec<ModelSnapshot> {
        let mut out = Vec::new();
        for p in self.providers.iter() {
            let mut models: Vec<ModelSnapshot> = p
                .models
                .iter()
                .map(|e| e.value().snapshot(&p.name, e.key()))
                .collect();
            let unlisted = &p.shared.unlisted;
            if unlisted.total.load(Relaxed) > 0 {
                models.push(unlisted.snapshot(&p.name, UNLISTED_MODEL));
            }
            models.sort_by(|a, b| a.model.cmp(&b.model));
            out.extend(models);
        }
        out
    }

    /// Entries held by provider `provider`, `_unlisted` not counted (tests).
    pub fn len(&self, provider: usize) -> usize {
        self.providers.get(provider).map_or(0, |p| p.models.len())
    }
}

impl ModelStats {
    /// Whether this model keeps its own entry once nothing is in flight (module doc).
    fn keeps_entry(&self, shared: &Shared) -> bool {
        let status_2xx = crate::metrics::status_index(200);
        self.requests
            .iter()
            .any(|e| e[status_2xx].load(Relaxed) > 0)
            || self
                .reported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|r| r.loaded)
            || shared.catalog.load().contains(&*self.model)
            || self.parked.load(Relaxed)
            || self.park(shared)
    }

    /// Keeps this entry although unlisted, if none of its requests was refused 4xx (the
    /// provider's "not found") and fewer than [`UNLISTED_KEPT`] are kept so.
    fn park(&self, shared: &Shared) -> bool {
        let status_4xx = crate::metrics::status_index(404);
        if self
            .requests
            .iter()
            .any(|e| e[status_4xx].load(Relaxed) > 0)
        {
            return false;
        }
        let room = shared
            .parked
            .fetch_update(Relaxed, Relaxed, |n| (n < UNLISTED_KEPT).then_some(n + 1))
            .is_ok();
        if room {
            self.parked.store(true, Relaxed);
        }
        room
    }

    /// After a request of this model ended: folds the entry into `_unlisted` if it keeps
    /// none. Only the last request out removes it from the map, under the map's lock, which
    /// every new request takes to join it ([`StatsTable::begin`]); a guard writes nothing
    /// after giving back its `active`, so what the entry holds then is final.
    fn fold_if_unlisted(self: &Arc<Self>) {
        let Some((map, shared)) = &self.home else {
            return;
        };
        if self.active.load(Relaxed) > 0 || self.keeps_entry(shared) {
            return;
        }
        let Some(map) = map.upgrade() else {
            return;
        };
        let removed = map.remove_if(&*self.model, |_, s| {
            Arc::ptr_eq(s, self) && s.active.load(Relaxed) == 0
        });
        if removed.is_some() {
            self.move_into(&shared.unlisted);
        }
    }

    /// Moves every counter (not `active`, which its guards give back) into `into`.
    fn move_into(&self, into: &ModelStats) {
        let take = |from: &AtomicU64, to: &AtomicU64| {
            let n = from.swap(0, Relaxed);
            if n > 0 {
                to.fetch_add(n, Relaxed);
            }
        };
        take(&self.total, &into.total);
        take(&self.errors, &into.errors);
        take(&self.cancelled, &into.cancelled);
        take(&self.prompt_tokens, &into.prompt_tokens);
        take(&self.completion_tokens, &into.completion_tokens);
        take(&self.compactions, &into.compactions);
        take(&self.tokens_saved, &into.tokens_saved);
        take(&self.prunes, &into.prunes);
        take(&self.pruned_tokens, &into.pruned_tokens);
        for (from, to) in self.requests.iter().zip(&into.requests) {
            for (from, to) in from.iter().zip(to) {
                take(from, to);
            }
        }
        into.last_used_ms
            .fetch_max(self.last_used_ms.load(Relaxed), Relaxed);
    }

    fn set_reported(&self, r: Reported) {
        *self.reported.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    fn snapshot(&self, provider: &str, model: &str) -> ModelSnapshot {
        let ms = self.last_used_ms.load(Relaxed);
        let reported = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mib = |b: Option<u64>| b.map(|b| b.div_ceil(1 << 20));
        ModelSnapshot {
            provider: provider.to_string(),
            model: model.to_string(),
            active_requests: self.active.load(Relaxed),
            total_requests: self.total.load(Relaxed),
            errors: self.errors.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            last_used: (ms > 0).then(|| {
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
            }),
            loaded: reported.as_ref().map(|r| r.loaded),
            memory_usage_mb: mib(reported.as_ref().and_then(|r| r.size_bytes)),
            vram_usage_mb: mib(reported.as_ref().and_then(|r| r.vram_bytes)),
            context_length: reported.as_ref().and_then(|r| r.context_length),
            compactions: self.compactions.load(Relaxed),
            tokens_saved: self.tokens_saved.load(Relaxed),
            prunes: self.prunes.load(Relaxed),
            pruned_tokens: self.pruned_tokens.load(Relaxed),
            context_tokens_estimated: Some(self.context_estimated.load(Relaxed)).filter(|n| *n > 0),
            context_tokens_reported: Some(self.context_reported.load(Relaxed)).filter(|n| *n > 0),
            requests_by_endpoint: self.requests_by_endpoint(),
        }
    }

    fn requests_by_endpoint(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (endpoint, by_status) in ENDPOINTS.iter().zip(&self.requests) {
            for (status, n) in STATUS.iter().zip(by_status) {
                let n = n.load(Relaxed);
                if n > 0 {
                    out.push((*endpoint, *status, n));
                }
            }
        }
        out
    }

    /// Tokens in context now: the latest reported prompt + reply, else the latest estimate.
    pub fn context_tokens(&self) -> u64 {
        match self.context_reported.load(Relaxed) {
            0 => self.context_estimated.load(Relaxed),
            n => n,
        }
    }

    /// A request's prompt was rewritten, saving `saved` tokens.
    pub fn record_compaction(&self, saved: u64) {
        self.compactions.fetch_add(1, Relaxed);
        self.tokens_saved.fetch_add(saved, Relaxed);
    }

    /// A request's prompt was pruned (before any summary), saving `tokens` tokens.
    pub fn record_prune(&self, tokens: u64) {
        self.prunes.fetch_add(1, Relaxed);
        self.pruned_tokens.fetch_add(tokens, Relaxed);
    }

    fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_used_ms.store(now, Relaxed);
    }
}

/// How a request ended, as far as the guard knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Outcome {
    /// Still running, or dropped before the end (client gone).
    #[default]
    Open,
    Completed,
    Failed,
}

/// A request in flight. Drop it exactly once; dropping records the outcome, tokens, latency
/// and status, and writes the request's one access log line (target `llm_warden::access`).
pub struct InFlight {
    stats: Arc<ModelStats>,
    /// When the request arrived at the proxy (before its body was read).
    started: Instant,
    /// Index in `metrics::ENDPOINTS`.
    endpoint: usize,
    /// The status the client got; 0 until one is known.
    status: u16,
    first_chunk: Option<Duration>,
    queue_wait: Option<Duration>,
    /// Prompt tokens before and after compaction.
    compacted: Option<(u64, u64)>,
    outcome: Outcome,
    /// A failure the provider reported (`metrics::ERROR_KINDS`); errors the proxy answered
    /// itself are counted where they are written.
    upstream_error: Option<&'static str>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// The model's lease, when the lifecycle granted one: released with the guard.
    lease: Option<crate::lifecycle::Lease>,
    /// Called once at the end with the prompt tokens the provider reported (calibration).
    on_prompt_tokens: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("provider", &self.stats.provider.name)
            .field("model", &self.stats.model)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl InFlight {
    /// `stats.active` already counts this request (see [`StatsTable::begin`]).
    fn new(stats: Arc<ModelStats>, endpoint: &str, started: Instant) -> Self {
        stats.total.fetch_add(1, Relaxed);
        stats.touch();
        InFlight {
            stats,
            started,
            endpoint: crate::metrics::endpoint_index(endpoint),
            status: 0,
            first_chunk: None,
            queue_wait: None,
            compacted: None,
            outcome: Outcome::Open,
            upstream_error: None,
            prompt_tokens: None,
            completion_tokens: None,
            lease: None,
            on_prompt_tokens: None,
        }
    }

    /// The prompt was not counted (too small to need it).
    pub fn not_estimated(&mut self) {
        if self.stats.context_estimated.load(Relaxed) != 0 {
            self.stats.context_estimated.store(0, Relaxed);
        }
    }

    /// The prompt as forwarded was estimated at `estimate` tokens; `on_reported` gets what
    /// the provider reports for it (to learn the ratio).
    pub fn estimated(&mut self, estimate: u64, on_reported: Box<dyn FnOnce(u64) + Send>) {
        self.stats.context_estimated.store(estimate, Relaxed);
        self.on_prompt_tokens = Some(on_reported);
    }

    /// Holds `lease` until this request ends; getting it took `waited`.
    pub fn attach(&mut self, lease: crate::lifecycle::Lease, waited: Duration) {
        self.lease = Some(lease);
        self.queue_wait = Some(waited);
    }

    /// The conversation was compacted from `before` to `after` prompt tokens.
    pub fn compacted(&mut self, before: u64, after: u64) {
        self.compacted = Some((before, after));
    }

    /// The status sent to the client.
    pub fn set_status(&mut self, status: http::StatusCode) {
        self.status = status.as_u16();
    }

    /// The first body chunk from the provider is passing now.
    pub fn first_chunk(&mut self) {
        if self.first_chunk.is_none() {
            self.first_chunk = Some(self.started.elapsed());
        }
    }

    /// The request failed with an error the proxy answers itself, with `status`.
    pub fn fail(&mut self, status: http::StatusCode) {
        self.outcome = Outcome::Failed;
        self.set_status(status);
    }

    /// The provider failed the request (an error status, an error inside the stream, a
    /// stream cut off): `kind` is its label in `metrics::ERROR_KINDS`. The first kind stays.
    pub fn fail_upstream(&mut self, kind: &'static str) {
        self.outcome = Outcome::Failed;
        self.upstream_error.get_or_insert(kind);
    }

    /// The response ended normally (unless it already failed).
    pub fn complete(&mut self) {
        if self.outcome == Outcome::Open {
            self.outcome = Outcome::Completed;
        }
    }

    /// Usage as the provider reported it; the last report wins.
    pub fn set_usage(&mut self, prompt: Option<u64>, completion: Option<u64>) {
        if prompt.is_some() {
            self.prompt_tokens = prompt;
        }
        if completion.is_some() {
            self.completion_tokens = completion;
        }
    }
}

/// `before->after`, written without an allocation.
struct Arrow(u64, u64);

impl std::fmt::Display for Arrow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{}", self.0, self.1)
    }
}

/// Milliseconds with two decimals.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// How long a request whose client left keeps its model's lease. The provider stops
/// generating only once it notices the closed connection (at its next token, or at its next
/// check while it reads a long prompt); an unload sent before then reaches a model that is
/// still busy. Found by the soak test: with clients leaving mid-stream and models swapping
/// constantly, dozens of unloads a minute hit a simulator still generating for a request the
/// proxy had already released.
pub const CANCEL_GRACE: Duration = Duration::from_secs(1);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.outcome == Outcome::Open {
            if let (Some(lease), Ok(rt)) =
                (self.lease.take(), tokio::runtime::Handle::try_current())
            {
                rt.spawn(async move {
                    tokio::time::sleep(CANCEL_GRACE).await;
                    drop(lease);
                });
            }
        }
        let s = &self.stats;
        match self.outcome {
            Outcome::Failed => {
                s.errors.fetch_add(1, Relaxed);
            }
            Outcome::Open => {
                s.cancelled.fetch_add(1, Relaxed);
            }
            Outcome::Completed => {}
        }
        if let Some(p) = self.prompt_tokens {
            s.prompt_tokens.fetch_add(p, Relaxed);
            if let Some(f) = self.on_prompt_tokens.take() {
                f(p);
            }
        }
        if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
            let held = self.prompt_tokens.unwrap_or(0) + self.completion_tokens.unwrap_or(0);
            s.context_reported.store(held, Relaxed);
        }
        if let Some(c) = self.completion_tokens {
            s.completion_tokens.fetch_add(c, Relaxed);
        }
        s.touch();
        let total = self.started.elapsed();
        let status = crate::metrics::status_index(self.status);
        s.requests[self.endpoint][status].fetch_add(1, Relaxed);
        s.provider
            .observe_request(self.endpoint, self.first_chunk, total);
        if let Some(kind) = self.upstream_error {
            s.provider.error(kind);
        }
        tracing::info!(
            target: "llm_warden::access",
            provider = &*s.provider.name,
            model = &*s.model,
            endpoint = ENDPOINTS[self.endpoint],
            status = (self.status != 0).then_some(self.status),
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            ttfb_ms = self.first_chunk.map(ms),
            total_ms = ms(total),
            compacted = self.compacted.map(|(b, a)| tracing::field::display(Arrow(b, a))),
            queue_ms = self.queue_wait.map(ms),
            cancelled = self.outcome == Outcome::Open,
            error = self.upstream_error,
            "request"
        );
        // The guard's last write: from here the entry may be folded (`fold_if_unlisted`).
        s.active.fetch_sub(1, Relaxed);
        s.fold_if_unlisted();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_in_flight_until_dropped() {
        let t = StatsTable::new(["ollama".to_string()]);
        let a = t.begin(0, "m", "api_chat", Instant::now());
        let mut b = t.begin(0, "m", "api_chat", Instant::now());
        assert_eq!(t.snapshot()[0].active_requests, 2);
        b.set_usage(Some(10), Some(3));
        b.complete();
        drop(b);
        let s = &t.snapshot()[0];
        assert_eq!((s.active_requests, s.total_requests), (1, 2));
        assert_eq!((s.prompt_tokens, s.completion_tokens), (10, 3));
        drop(a);
        let s = &t.snapshot()[0];
        assert_eq!((s.active_requests, s.cancelled, s.errors), (0, 1, 0));
        assert!(s.last_used.is_some());
    }

    #[test]
    fn reports_mark_models_loaded_and_unloaded() {
        let t = StatsTable::new(["p".to_string(), "q".to_string()]);
        request(&t, "used", 200);
        assert_eq!(t.snapshot()[0].loaded, None, "not asked yet");
        let big = LoadedModel {
            model: "big".into(),
            size_bytes: Some(3 << 30),
            vram_bytes: Some(1 << 30),
            context_length: Some(8192),
            parallel: None,
            expires: None,
        };
        t.apply_report(0, std::slice::from_ref(&big));
        let s = t.snapshot();
        assert_eq!(s.len(), 2, "a reported model appears without a request");
        let b = s.iter().find(|m| m.model == "big").unwrap();
        assert_eq!(
            (b.loaded, b.memory_usage_mb, b.vram_usage_mb),
            (Some(true), Some(3072), Some(1024))
        );
        assert_eq!((b.total_requests, b.last_used.as_deref()), (0, None));
        assert_eq!(
            s.iter().find(|m| m.model == "used").unwrap().loaded,
            Some(false)
        );
        t.apply_report(0, &[]);
        let b = t.snapshot().into_iter().find(|m| m.model == "big").unwrap();
        assert_eq!((b.loaded, b.memory_usage_mb), (Some(false), None));
    }

    #[test]
    fn failure_is_counted_once() {
        let t = StatsTable::new(["p".to_string()]);
        let mut g = t.begin(0, "m", "api_chat", Instant::now());
        g.fail(http::StatusCode::BAD_GATEWAY);
        g.complete();
        drop(g);
        let s = &t.snapshot()[0];
        assert_eq!((s.errors, s.cancelled), (1, 0));
    }

    fn request(t: &StatsTable, model: &str, status: u16) {
        let mut g = t.begin(0, model, "api_chat", Instant::now());
        let status = http::StatusCode::from_u16(status).unwrap();
        g.set_status(status);
        if status.is_success() {
            g.complete();
        } else {
            g.fail(status);
        }
    }

    #[test]
    fn invented_names_fold_into_one_unlisted_entry() {
        let t = StatsTable::new(["ollama".to_string()]);
        t.set_catalog(0, ["listed:latest"]);
        request(&t, "served:latest", 200);
        request(&t, "listed:latest", 404);
        for i in 0..10_000 {
            request(&t, &format!("invented-{i}:latest"), 404);
        }
        assert_eq!(
            t.len(0),
            2,
            "only the served and the listed model keep entries"
        );
        let s = t.snapshot();
        let names: Vec<&str> = s.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["_unlisted", "listed:latest", "served:latest"]);
        let u = &s[0];
        assert_eq!(
            (u.total_requests, u.errors, u.active_requests),
            (10_000, 10_000, 0)
        );
        assert_eq!(u.requests_by_endpoint, [("api_chat", "4xx", 10_000)]);
        assert!(u.last_used.is_some());
    }

    #[test]
    fn an_unlisted_model_keeps_its_entry_while_in_flight_or_loaded() {
        let t = StatsTable::new(["ollama".to_string()]);
        let a = t.begin(0, "m", "api_chat", Instant::now());
        request(&t, "m", 404);
        assert_eq!(t.len(0), 1, "another request is still in flight");
        assert_eq!(t.snapshot()[0].active_requests, 1);
        drop(a);
        assert_eq!(t.len(0), 0, "the last one out folds it");
        assert_eq!(t.snapshot()[0].total_requests, 2);
        // Loaded behind the proxy's back: it stays, whatever its requests get.
        t.apply_report(
            0,
            &[LoadedModel {
                model: "behind".into(),
                size_bytes: None,
                vram_bytes: None,
                context_length: None,
                parallel: None,
                expires: None,
            }],
        );
        request(&t, "behind", 500);
        assert_eq!(t.len(0), 1);
        // Once served, always kept.
        request(&t, "good", 200);
        request(&t, "good", 404);
        assert_eq!(t.len(0), 2);
    }

    #[test]
    fn failures_the_provider_could_not_judge_keep_a_bounded_number_of_entries() {
        let t = StatsTable::new(["ollama".to_string()]);
        for i in 0..100 {
            request(&t, &format!("down-{i}"), 502);
        }
        assert_eq!(
            t.len(0),
            UNLISTED_KEPT as usize,
            "the first ones keep their errors"
        );
        assert_eq!(t.snapshot().iter().map(|m| m.errors).sum::<u64>(), 100);
        request(&t, "down-0", 404);
        assert_eq!(t.len(0), UNLISTED_KEPT as usize, "kept once kept");
    }

    #[test]
    fn folding_races_lose_no_count() {
        let t = StatsTable::new(["p".to_string()]);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..2_000 {
                        request(&t, "same", 404);
                    }
                });
            }
        });
        assert_eq!(t.len(0), 0);
        let s = t.snapshot();
        let total: u64 = s.iter().map(|m| m.total_requests).sum();
        let errors: u64 = s.iter().map(|m| m.errors).sum();
        assert_eq!((total, errors), (8_000, 8_000));
        assert!(s.iter().all(|m| m.active_requests == 0));
    }
}
