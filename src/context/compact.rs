//! Fitting a conversation (chat `messages`, Messages `messages`, Responses `input`: see
//! [`super::apis`]) into its model's window, before it is forwarded.
//!
//! ```text
//!  window (request num_ctx → loaded context → config → load and ask) ─┐
//!  bytes of `messages` ≤ budget? ── yes ──► unchanged (no counting: small requests pay nothing)
//!        │ no
//!  count each message (tiktoken, calibrated per model) ≤ budget? ── yes ──► unchanged
//!        │ no: on_overflow
//!        ├─ passthrough ─► unchanged      ├─ reject ─► 400 (tokens and window)
//!        │  truncate_oldest, summarize:
//!        ├─ prune (`compaction.prune`): earlier copies of large content and answered
//!        │  images out of the older turns; count again ≤ budget? ── yes ──► `pruned`
//!        │  no: go on with the pruned messages
//!        ├─ truncate_oldest ─► plan, drop the older turns
//!        └─ summarize ─► plan; summary of the older turns: cache (exact, then the longest
//!                        cached prefix + the newer turns) or the summarizer; on failure,
//!                        truncate_oldest; rewrite `messages` (kept messages byte for byte)
//! ```
//! The budget is `compression_threshold × window − room for the reply`. Kept messages are
//! copied as raw bytes, so system messages and recent turns reach the provider unchanged
//! (pruned messages as [`super::prune`] rewrites them: the same bytes on every turn).

use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use serde_json::Value;

use super::apis::Api;
use super::cache::{Summary, SummaryCache, SummaryKey};
use super::events::{CompactionEvent, EventLog, PruneCounts};
use super::plan::{self, Budget, Plan, Role};
use super::prune;
use super::summarize;
use crate::config::{CompactionConfig, Config, ModelOverrides, OverflowPolicy};
use crate::lifecycle::Shape;
use crate::providers::ProviderKind;
use crate::tokens::{self, Encoding, TokenCounter};

/// Tag of the summarizer prompt in cache keys: a new prompt must not reuse old summaries.
const PROMPT_TAG: &str = summarize::PROMPT_VERSION;
/// How many shorter prefixes of the evicted messages are looked up for a previous summary.
const PREFIX_LOOKUPS: usize = 64;
/// Message counts remembered (about 50 bytes each); the table starts over when full.
const COUNT_CACHE_ENTRIES: usize = 200_000;
/// The learned token ratios, in the summary cache's directory.
pub const CALIBRATION_FILE: &str = "calibration.json";
/// Under memory pressure (warning and above), conversations are compacted at this share of
/// the usual `compression_threshold`.
pub const PRESSURE_FACTOR: f64 = 0.75;
/// Tokens the summarizer's request takes besides its instructions and the messages: the chat
/// template and the transcript's labels, about.
const SUMMARIZER_LABELS: u64 = 32;
/// The least reply a summarizer call asks for, however small its window.
const MIN_SUMMARIZER_REPLY: u64 = 16;

/// What the compaction stage works with: the compactor, and the providers as compaction
/// sees them (nothing else of the proxy's state).
#[derive(Clone, Copy)]
pub struct Stage<'a> {
    pub compactor: &'a Compactor,
    pub providers: &'a dyn Providers,
}

/// The providers, as compaction needs them: names, kinds and windows, where to count the
/// tokens it saved, and a way to ask a model for a summary. The data plane implements it.
pub trait Providers: Send + Sync {
    fn name(&self, provider: usize) -> &str;
    fn kind(&self, provider: usize) -> ProviderKind;
    /// The index of the provider named `name`.
    fn find(&self, name: &str) -> Option<usize>;
    /// The window `model` runs (or last ran) with, as its lifecycle publishes it.
    fn window(&self, provider: usize, model: &str) -> Option<u64>;
    /// Counts `saved` tokens of compaction for `model`.
    fn compacted(&self, provider: usize, model: &str, saved: u64);
    /// Counts a forwarded request that pruning shortened by `tokens` (before any summary).
    fn pruned(&self, provider: usize, model: &str, tokens: u64);
    /// POSTs a JSON body to `path` on `provider` while holding a lease on `model` (which
    /// loads it, or waits, as a request would); the body is made under the lease from the
    /// runner options the model runs with (Ollama reloads a runner whose options differ
    /// from a request's). The answer's status and body, at most `limit` bytes.
    fn post<'a>(
        &'a self,
        provider: usize,
        model: &'a str,
        path: &'static str,
        body: &'a (dyn Fn(Shape) -> Bytes + Sync),
        limit: usize,
    ) -> BoxFuture<'a, Result<(http::StatusCode, Bytes), String>>;
}

/// Shared compaction state: the counter, the summary cache, recent events.
pub struct Compactor {
    pub counter: TokenCounter,
    /// Opened on first use (a proxy that never compacts touches no disk).
    cache: tokio::sync::OnceCell<SummaryCache>,
    cache_path: std::path::PathBuf,
    pub events: EventLog,
    /// The settings that a config reload may change; read lock-free on each request.
    live: ArcSwap<Live>,
    /// Token counts of messages seen, by a hash of (encoding, raw message); see `count_messages`.
    counts: DashMap<u64, u64>,
    /// Memory pressure says compact earlier (stage 1, set by the pressure response).
    compact_earlier: std::sync::atomic::AtomicBool,
    /// Where the learned token ratios are saved (next to the summaries).
    calibration_path: std::path::PathBuf,
}

/// The compaction settings in force (replaced whole on a config reload).
pub struct Live {
    pub settings: CompactionConfig,
    threshold: f64,
    models: BTreeMap<String, ModelOverrides>,
    /// `buffers.context.initial` and `.max`: the most context a request may ask of Ollama
    /// (under memory pressure, and otherwise).
    context_initial: u64,
    context_max: u64,
}

impl Live {
    fn of(config: &Config) -> Self {
        Live {
            settings: config.compaction.clone(),
            threshold: config.buffers.compression_threshold,
            models: config.models.clone(),
            context_initial: u64::from(config.buffers.context_initial),
            context_max: u64::from(config.buffers.context_max),
        }
    }

    fn overrides(&self, model: &str) -> Option<&ModelOverrides> {
        self.models.get(model).or_else(|| {
            // Config keys may be written without Ollama's `:latest`.
            model
                .strip_suffix(":latest")
                .and_then(|m| self.models.get(m))
        })
    }
}

/// What the proxy should do with the request.
#[derive(Debug)]
pub enum Fit {
    /// Forward as it is. `estimate`: the prompt's tokens, when they were counted.
    Unchanged { estimate: Option<u64> },
    /// Forward with `messages` replaced by this array (raw JSON; the kept messages byte
    /// for byte); the header says `before->after`, and what pruning took out.
    Rewritten {
        messages: String,
        before: u64,
        after: u64,
        pruned: Option<PruneCounts>,
    },
    /// Answer 400: the prompt needs `tokens` (with the reply's room), the window has `window`.
    Reject {
        tokens: u64,
        window: u64,
        why: String,
    },
}

/// The fields of the request the compactor reads (borrowed from the body).
pub struct ChatRequest<'a> {
    pub provider: usize,
    pub model: &'a str,
    /// `messages` (chat, Messages) or `input` (Responses).
    pub messages: Option<&'a RawValue>,
    /// Which API's conversation it is ([`super::apis`]).
    pub api: Api<'a>,
    /// `options.num_predict` / `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    pub max_reply: Option<u64>,
    /// Memory pressure chose the window (smaller than the request's or the model's own):
    /// a request that cannot fit it even compacted is fitted into the least window that
    /// holds it instead, at most this many tokens (`buffers.context.max`), at the usual
    /// threshold. Shrinking may cost quality, never availability (issue 19).
    pub raise_to: Option<u64>,
}

/// Raised windows are rounded up to this many tokens, so that requests of about the same
/// size ask for the same runner (a runner of another size is a reload).
pub const RAISE_STEP: u64 = 256;

impl Compactor {
    pub fn new(config: &Config) -> Self {
        let c = &config.compaction;
        let cache_path = c
            .cache_dir
            .as_ref()
            .map(|d| d.join(super::cache::FILE_NAME))
            .unwrap_or_else(SummaryCache::default_path);
        let calibration_path = cache_path.with_file_name(CALIBRATION_FILE);
        let counter = TokenCounter::new();
        if let Ok(text) = std::fs::read_to_string(&calibration_path) {
            match serde_json::from_str::<Vec<crate::tokens::Calibration>>(&text) {
                Ok(rows) => counter.restore(&rows),
                Err(e) => {
                    tracing::warn!(path = %calibration_path.display(), error = %e, "saved token ratios are unreadable; starting over")
                }
            }
        }
        Compactor {
            live: ArcSwap::from_pointee(Live::of(config)),
            calibration_path,
            counter,
            cache: tokio::sync::OnceCell::new(),
            cache_path,
            events: EventLog::new(super::events::KEPT),
            counts: DashMap::new(),
            compact_earlier: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The summary cache, opened (off the I/O threads) on first use; memory only if the
    /// file cannot be opened (logged).
    pub async fn cache(&self) -> &SummaryCache {
        self.cache
            .get_or_init(|| async {
                let path = self.cache_path.clone();
                let entries = self.live.load().settings.cache_entries as usize;
                let opened = tokio::task::spawn_blocking(move || {
                    SummaryCache::open_or_memory(&path, entries)
                })
                .await;
                opened.unwrap_or_else(|_| SummaryCache::in_memory(entries))
            })
            .await
    }

    /// Saves the learned token ratios next to the summaries (memory pressure stage 3, and
    /// shutdown), so that a restart or a reload does not start learning over. Blocking: a
    /// small file, written whole to a temporary name and renamed.
    pub fn save_calibration(&self) {
        let rows = self.counter.calibrations();
        if rows.is_empty() {
            return;
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.calibration_path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.calibration_path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&rows).unwrap_or_default())?;
            std::fs::rename(&tmp, &self.calibration_path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %self.calibration_path.display(), error = %e, "cannot save the token ratios");
        }
    }

    /// The cache's counters; the default (nothing yet) before first use.
    pub fn cache_stats(&self) -> super::cache::CacheStats {
        self.cache.get().map(|c| c.stats()).unwrap_or_default()
    }

    /// Uncalibrated tokens of each message. A conversation is resent whole on every turn,
    /// so counts are remembered per message (by a hash of its bytes): only new messages are
    /// tokenized, off the I/O threads when large.
    async fn count_messages(&self, enc: Encoding, raws: &[&RawValue]) -> Vec<u64> {
        let keys: Vec<u64> = raws
            .iter()
            .map(|r| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(&(enc.as_str(), r.get()), &mut h);
                std::hash::Hasher::finish(&h)
            })
            .collect();
        let mut counts: Vec<Option<u64>> = keys
            .iter()
            .map(|k| self.counts.get(k).map(|c| *c))
            .collect();
        let missing: Vec<usize> = (0..raws.len()).filter(|&i| counts[i].is_none()).collect();
        if !missing.is_empty() {
            let values: Vec<Value> = missing
                .iter()
                .map(|&i| serde_json::from_str(raws[i].get()).unwrap_or(Value::Null))
                .collect();
            let fresh = self.counter.count_each_async(enc, Arc::new(values)).await;
            if self.counts.len() + fresh.len() > COUNT_CACHE_ENTRIES {
                self.counts.clear();
            }
            for (&i, n) in missing.iter().zip(fresh) {
                self.counts.insert(keys[i], n);
                counts[i] = Some(n);
            }
        }
        counts.into_iter().map(|c| c.unwrap_or(0)).collect()
    }

    /// The settings in force now.
    pub fn live(&self) -> arc_swap::Guard<std::sync::Arc<Live>> {
        self.live.load()
    }

    /// A config reload: thresholds, policies, per-model settings and buffer sizes from now on
    /// (the cache's place and size stay until a restart).
    pub fn reconfigure(&self, config: &Config) {
        self.live.store(std::sync::Arc::new(Live::of(config)));
    }

    /// Whether the prune step runs for `model` (`compaction.prune`, per model too).
    pub fn prune(&self, model: &str) -> bool {
        let live = self.live.load();
        live.overrides(model)
            .and_then(|o| o.prune)
            .unwrap_or(live.settings.prune)
    }

    pub fn policy(&self, model: &str) -> OverflowPolicy {
        let live = self.live.load();
        live.overrides(model)
            .and_then(|o| o.on_overflow)
            .unwrap_or(live.settings.on_overflow)
    }

    pub fn encoding(&self, model: &str) -> Encoding {
        let live = self.live.load();
        live.overrides(model)
            .and_then(|o| o.tokenizer.as_deref())
            .or(live.settings.tokenizer.as_deref())
            .and_then(Encoding::parse)
            .unwrap_or_else(|| Encoding::for_model(model))
    }

    /// The share of the window the prompt may take; less under memory pressure, unless the
    /// window was `raised` to fit the request.
    fn threshold(&self, model: &str, raised: bool) -> f64 {
        let live = self.live.load();
        let t = live
            .overrides(model)
            .and_then(|o| o.compression_threshold)
            .unwrap_or(live.threshold);
        if self.pressed() && !raised {
            t * PRESSURE_FACTOR
        } else {
            t
        }
    }

    /// The most context (`num_ctx`) a request may ask for: `buffers.context.max`, or
    /// `buffers.context.initial` while memory pressure says compact earlier.
    pub fn context_cap(&self) -> u64 {
        let live = self.live.load();
        if self.pressed() {
            live.context_initial
        } else {
            live.context_max
        }
    }

    /// `buffers.context.max`: the most context the proxy lets a request have.
    pub fn context_max(&self) -> u64 {
        self.live.load().context_max
    }

    /// Whether memory pressure says compact earlier.
    pub fn pressed(&self) -> bool {
        self.compact_earlier
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Memory pressure stage 1: compact at [`PRESSURE_FACTOR`] × the usual threshold (a
    /// smaller context is a smaller KV cache on the next load), or stop doing so.
    pub fn set_compact_earlier(&self, on: bool) {
        self.compact_earlier
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn configured_window(&self, model: &str) -> Option<u64> {
        self.live
            .load()
            .overrides(model)
            .and_then(|o| o.context_window)
            .map(u64::from)
    }

    pub fn normalize_num_ctx(&self) -> bool {
        self.live.load().settings.normalize_num_ctx
    }

    /// Room for the reply: the request's own limit, else `reply_reserve`, at most a quarter
    /// of the window.
    fn reserve(&self, req: &ChatRequest, window: u64) -> u64 {
        req.max_reply
            .unwrap_or_else(|| u64::from(self.live.load().settings.reply_reserve).min(window / 4))
    }

    /// The budget for the prompt of `req` in a window of `window` tokens.
    pub fn prompt_budget(&self, req: &ChatRequest, window: u64) -> u64 {
        self.budget(req, window, false)
    }

    fn budget(&self, req: &ChatRequest, window: u64, raised: bool) -> u64 {
        let t = (self.threshold(req.model, raised) * window as f64) as u64;
        t.saturating_sub(self.reserve(req, window))
    }

    /// The least window, a multiple of [`RAISE_STEP`], whose budget at the usual threshold
    /// holds `needed` prompt tokens of `req`; `None` past `bound` (or if none does).
    pub fn least_window(&self, req: &ChatRequest, needed: u64, bound: u64) -> Option<u64> {
        let holds = |w: u64| self.budget(req, w, true) >= needed;
        if !holds(bound) {
            return None;
        }
        // Halving [lo, hi] in steps; `hi` always holds, so the answer does, and it is the
        // least when the budget grows with the window (for thresholds above a quarter: the
        // reply's default share is at most a quarter of the window).
        let (mut lo, mut hi) = (0u64, bound.div_ceil(RAISE_STEP));
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if holds(mid * RAISE_STEP) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some((hi * RAISE_STEP).min(bound))
    }
}

/// Fits `req` into `window` tokens (see the module doc); a request that cannot fit a window
/// that memory pressure chose is fitted into the least window that holds it
/// ([`ChatRequest::raise_to`]). Returns the fit and the window it is for.
pub async fn fit(state: Stage<'_>, req: &ChatRequest<'_>, window: u64) -> (Fit, u64) {
    let refused = match fit_into(state, req, window, false).await {
        Ok(fit) => return (fit, window),
        Err(refused) => refused,
    };
    let raised = req.raise_to.and_then(|bound| {
        state
            .compactor
            .least_window(req, refused.needed, bound)
            // The same window, at the usual threshold, may be enough.
            .map(|w| w.max(window))
    });
    let (refused, window) = match raised {
        Some(w) => match fit_into(state, req, w, true).await {
            Ok(fit) => return (fit, w),
            Err(refused) => (refused, w),
        },
        None => (refused, window),
    };
    let report = Report {
        state,
        req,
        window,
        before: refused.before,
        pruned: None,
    };
    (report.rejected(refused), window)
}

/// Why a request cannot fit a window: the tokens it needs at the least (without the reply's
/// room), and the prompt's as sent.
struct Refused {
    needed: u64,
    before: u64,
    why: String,
    failure: Option<String>,
}

/// Fits `req` into `window` tokens at the usual threshold if `raised`, else at the one memory
/// pressure sets.
async fn fit_into(
    state: Stage<'_>,
    req: &ChatRequest<'_>,
    window: u64,
    raised: bool,
) -> Result<Fit, Refused> {
    let cx = &state.compactor;
    let policy = cx.policy(req.model);
    let Some(messages_raw) = req.messages else {
        return Ok(Fit::Unchanged { estimate: None });
    };
    if policy == OverflowPolicy::Passthrough {
        return Ok(Fit::Unchanged { estimate: None });
    }
    let budget = cx.budget(req, window, raised);
    let fixed_len = req.api.fixed().map_or(0, |f| f.get().len());
    if tokens::upper_bound(messages_raw.get().len() + fixed_len) <= budget {
        return Ok(Fit::Unchanged { estimate: None });
    }
    let Ok(mut raws) = serde_json::from_str::<Vec<&RawValue>>(messages_raw.get()) else {
        // Not an array of messages: the provider answers its own error.
        return Ok(Fit::Unchanged { estimate: None });
    };
    // An entry that is not a message object (`null`, a number, a string): the provider
    // refuses the body (Go cannot decode a number into `api.Message`; a `null` entry is an
    // empty message). Compacting would drop that entry and turn the provider's "no" into a
    // "yes" (issue 18): the body goes on unchanged, for the provider's own answer.
    if raws.iter().any(|r| !r.get().trim_start().starts_with('{')) {
        return Ok(Fit::Unchanged { estimate: None });
    }
    // Messages' `system`, Responses' `instructions`: counted as a first system message that
    // the planner keeps, and left out of the rewrite (`lead`).
    let fixed = req.api.fixed_message();
    let lead = usize::from(fixed.is_some());
    if let Some(f) = fixed.as_deref() {
        raws.insert(0, f);
    }
    let provider_name = state.providers.name(req.provider);
    let enc = cx.encoding(req.model);
    let ratio = cx.counter.ratio(provider_name, req.model);
    // Each message's tokens, calibrated to the provider's count.
    let calibrated = |raw: Vec<u64>| -> Vec<u64> {
        raw.iter()
            .map(|&n| (n as f64 * ratio).ceil() as u64)
            .collect()
    };
    let counts = calibrated(cx.count_messages(enc, &raws).await);
    let before: u64 = counts.iter().sum();
    if before <= budget {
        return Ok(Fit::Unchanged {
            estimate: Some(before),
        });
    }
    if let Api::Responses {
        previous_response_id: true,
        ..
    } = req.api
    {
        // The conversation lives on the provider: the proxy sees only the new items.
        let report = Report {
            state,
            req,
            window,
            before,
            pruned: None,
        };
        let why = "previous_response_id: the earlier turns are stored by the provider, \
                   the proxy cannot compact them";
        report.record(
            "not_compacted",
            before,
            0,
            None,
            Some(why.to_string()),
            None,
        );
        return Ok(Fit::Unchanged {
            estimate: Some(before),
        });
    }
    // Over the budget: the messages themselves are needed now (roles, the transcript).
    let values: Vec<Value> = raws
        .iter()
        .map(|r| serde_json::from_str(r.get()).unwrap_or(Value::Null))
        .collect();
    // The same for a message the provider cannot read: a role that is not a string, or
    // content that is neither text nor a list of parts.
    let readable = |v: &Value| {
        v.get("role").is_none_or(Value::is_string)
            && v.get("content")
                .is_none_or(|c| c.is_string() || c.is_array() || c.is_null())
    };
    if !values.iter().all(readable) {
        return Ok(Fit::Unchanged {
            estimate: Some(before),
        });
    }
    let mut roles: Vec<Role> = Vec::with_capacity(values.len());
    roles.extend(std::iter::repeat_n(Role::System, lead));
    roles.extend(req.api.roles(&values[lead..]));
    // Prune first, for the policies that rewrite (it loses less than either): what is left
    // is counted again, and if it fits nothing more is done (no summarizer call).
    let pruning = matches!(
        policy,
        OverflowPolicy::Summarize | OverflowPolicy::TruncateOldest
    ) && cx.prune(req.model);
    let pruned = if pruning {
        prune::prune(&raws, &values, &roles)
    } else {
        prune::Pruned::default()
    };
    let (duplicates, images) = (pruned.duplicates, pruned.images);
    let owned: Vec<Option<Box<RawValue>>> = pruned
        .messages
        .into_iter()
        .map(|m| m.and_then(|s| RawValue::from_string(s).ok()))
        .collect();
    let changed = owned.iter().any(Option::is_some);
    let raws: Vec<&RawValue> = raws
        .iter()
        .enumerate()
        .map(|(i, r)| owned.get(i).and_then(Option::as_deref).unwrap_or(*r))
        .collect();
    let (values, counts) = if changed {
        let values: Vec<Value> = values
            .into_iter()
            .enumerate()
            .map(|(i, v)| match owned.get(i).and_then(Option::as_deref) {
                Some(o) => serde_json::from_str(o.get()).unwrap_or(Value::Null),
                None => v,
            })
            .collect();
        (values, calibrated(cx.count_messages(enc, &raws).await))
    } else {
        (values, counts)
    };
    let after_pruning: u64 = counts.iter().sum();
    let report = Report {
        state,
        req,
        window,
        before,
        pruned: changed.then_some(PruneCounts {
            duplicates,
            images,
            tokens: before.saturating_sub(after_pruning),
        }),
    };
    if changed && after_pruning <= budget {
        return Ok(report.rewritten("pruned", join(&raws[lead..]), after_pruning, 0, None, None));
    }
    match policy {
        OverflowPolicy::Passthrough => Ok(Fit::Unchanged {
            estimate: Some(before),
        }),
        OverflowPolicy::Reject => Err(Refused {
            needed: before,
            before,
            why: "on_overflow = reject".to_string(),
            failure: None,
        }),
        OverflowPolicy::TruncateOldest => {
            truncate(&report, &raws, lead, &roles, &counts, budget, None)
        }
        OverflowPolicy::Summarize => {
            let tail = (cx.live().settings.keep_recent_share * window as f64) as u64;
            let b = Budget {
                prompt: budget,
                tail,
                summary: u64::from(cx.live().settings.summary_max_tokens),
            };
            let (evict, summary_max) = match plan::plan(&roles, &counts, b) {
                Plan::Fits => {
                    return Ok(Fit::Unchanged {
                        estimate: Some(before),
                    })
                }
                Plan::TooLong {
                    needed,
                    system,
                    last_turn,
                } => {
                    return Err(Refused {
                        needed,
                        before,
                        why: too_long(needed, system, last_turn),
                        failure: None,
                    })
                }
                Plan::Compact { evict, summary, .. } => (evict, summary),
            };
            let input = Evicted {
                lead,
                raws: &raws,
                values: &values,
                roles: &roles,
                counts: &counts,
                evict: &evict,
            };
            match summarized(state, req, input, budget, window, summary_max, enc).await {
                Ok((body, after, calls, source)) => {
                    Ok(report.rewritten("summarized", body, after, calls, Some(source), None))
                }
                Err(why) => {
                    tracing::warn!(model = req.model, error = %why, "summarizer failed; dropping the oldest turns instead");
                    truncate(&report, &raws, lead, &roles, &counts, budget, Some(why))
                }
            }
        }
    }
}

/// Why a conversation cannot be made to fit at all, naming the parts of the `needed` tokens
/// that take the room: the system messages, the last turn, and the rest the least summary
/// (none when truncating).
fn too_long(needed: u64, system: u64, last_turn: u64) -> String {
    let least = match needed.saturating_sub(system + last_turn) {
        0 => String::new(),
        n => format!(" and a summary of at least {n} tokens"),
    };
    format!(
        "the system messages ({system} tokens) and the last turn ({last_turn} tokens){least} \
         leave no room in the window with the reply's share"
    )
}

/// The end of one request's fitting: logged, counted and listed once, whatever it was.
struct Report<'a> {
    state: Stage<'a>,
    req: &'a ChatRequest<'a>,
    window: u64,
    /// The prompt's estimated tokens as the client sent it.
    before: u64,
    /// What pruning took out (`None`: nothing), before a summary or truncation if any.
    pruned: Option<PruneCounts>,
}

impl Report<'_> {
    /// 400: even the tokens it needs (plus the reply's room) do not fit.
    fn rejected(&self, refused: Refused) -> Fit {
        // Nothing is forwarded: what pruning would have taken out is not said.
        self.record("rejected", refused.needed, 0, None, refused.failure, None);
        Fit::Reject {
            tokens: refused.needed + self.state.compactor.reserve(self.req, self.window),
            window: self.window,
            why: refused.why,
        }
    }

    /// Forward `body`, estimated at `after` tokens.
    fn rewritten(
        &self,
        action: &'static str,
        messages: String,
        after: u64,
        summarizer_calls: u32,
        source: Option<&'static str>,
        failure: Option<String>,
    ) -> Fit {
        self.record(
            action,
            after,
            summarizer_calls,
            source,
            failure,
            self.pruned,
        );
        let (providers, req) = (self.state.providers, self.req);
        providers.compacted(req.provider, req.model, self.before.saturating_sub(after));
        if let Some(p) = self.pruned {
            providers.pruned(req.provider, req.model, p.tokens);
        }
        Fit::Rewritten {
            messages,
            before: self.before,
            after,
            pruned: self.pruned,
        }
    }

    fn record(
        &self,
        action: &'static str,
        after: u64,
        summarizer_calls: u32,
        source: Option<&'static str>,
        failure: Option<String>,
        pruned: Option<PruneCounts>,
    ) {
        let (state, req) = (self.state, self.req);
        let provider = state.providers.name(req.provider).to_string();
        tracing::info!(
            provider = %provider,
            model = req.model,
            action,
            tokens_before = self.before,
            tokens_after = after,
            window = self.window,
            summarizer_calls,
            source,
            failure = failure.as_deref(),
            pruned_duplicates = pruned.map(|p| p.duplicates),
            pruned_images = pruned.map(|p| p.images),
            pruned_tokens = pruned.map(|p| p.tokens),
            "context compaction"
        );
        state.compactor.events.push(CompactionEvent {
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            provider,
            model: req.model.to_string(),
            action,
            tokens_before: self.before,
            tokens_after: after,
            window: self.window,
            summarizer_calls,
            source,
            failure,
            pruned,
        });
    }
}

/// A conversation and the messages a plan evicts from it.
#[derive(Clone, Copy)]
struct Evicted<'a> {
    /// Leading entries that are counted but not in the array (the fixed system prompt).
    lead: usize,
    raws: &'a [&'a RawValue],
    values: &'a [Value],
    roles: &'a [Role],
    counts: &'a [u64],
    evict: &'a [usize],
}

/// Summarizes `evict` (a fresh plan's older turns) and rewrites the body. Summaries are
/// reused: the longest prefix of `evict` with a cached summary is taken as it is when the
/// rest still fits (no summarizer call: the next turns of a conversation), else extended
/// (the summarizer gets that summary plus the turns after it: recursive summaries). Returns
/// the body, its estimated tokens, the summarizer calls made and where the summary came from.
#[allow(clippy::too_many_arguments)]
async fn summarized(
    state: Stage<'_>,
    req: &ChatRequest<'_>,
    input: Evicted<'_>,
    budget: u64,
    window: u64,
    // The summary's room as planned: `summary_max_tokens`, or less on a small window.
    summary_max: u64,
    enc: Encoding,
) -> Result<(String, u64, u32, &'static str), String> {
    let Evicted {
        lead,
        raws,
        values,
        roles,
        counts,
        evict,
    } = input;
    let cx = &state.compactor;
    let (sp, sm) = summarizer_of(state, req);
    let scope = format!("{}/{}", state.providers.name(sp), sm);
    let bytes: Vec<&[u8]> = evict.iter().map(|&i| raws[i].get().as_bytes()).collect();
    let total: u64 = counts.iter().sum();
    let evicted_tokens = |n: usize| evict[..n].iter().map(|&i| counts[i]).sum::<u64>();
    let finish = |text: &str, n: usize| -> Result<(String, u64), String> {
        let next = (evict[0]..raws.len())
            .find(|i| !evict[..n].contains(i))
            .map(|i| &values[i]);
        let message = req.api.summary(text, n, next);
        let after = total - evicted_tokens(n) + cx.counter.count_text(enc, &message) + 4;
        let messages = rewrite(raws, lead, &evict[..n], Some(&message))
            .ok_or_else(|| "nothing to summarize".to_string())?;
        Ok((messages, after))
    };
    let mut previous: Option<(Summary, usize)> = None;
    for j in (1..=bytes.len()).rev().take(PREFIX_LOOKUPS) {
        let k = SummaryKey::new(&scope, PROMPT_TAG, &bytes[..j]);
        if let Some(s) = cx.cache().await.get(&k).await {
            previous = Some((s, j));
            break;
        }
    }
    if let Some((s, j)) = &previous {
        let (body, after) = finish(&s.text, *j)?;
        if after <= budget || *j == bytes.len() {
            return Ok((body, after, 0, "cache"));
        }
    }
    // The summarizer has a window too, and each call must fit it whole: its instructions,
    // the summary so far, a piece of the messages and the reply's room. What it must read
    // goes in pieces, each piece's summary carried into the next (and cached: a later turn
    // may stop there). On a small window the reply asked for is smaller than the plan's
    // room (at most a third of what the instructions leave), so that a piece still fits:
    // a provider would otherwise cut the transcript (Ollama drops the prompt's start).
    let window_s = state.providers.window(sp, &sm).unwrap_or(window);
    let usable = ((window_s as f64 * 0.9) as u64)
        .saturating_sub(cx.counter.count_text(enc, summarize::PROMPT) + SUMMARIZER_LABELS);
    let summary_max = summary_max.min(usable / 3).max(MIN_SUMMARIZER_REPLY);
    let from_cache = previous.is_some();
    let (mut prior, mut k) = match previous {
        Some((s, j)) => (Some(s.text), j),
        None => (None, 0),
    };
    let mut calls = 0u32;
    while k < evict.len() {
        // What the instructions, the summary so far and the reply leave for messages.
        let carried = prior
            .as_deref()
            .map_or(0, |p| cx.counter.count_text(enc, p));
        let piece_budget = usable.saturating_sub(summary_max + carried).max(1);
        let mut end = k;
        let mut taken = 0u64;
        while end < evict.len() {
            let c = counts[evict[end]];
            // A piece ends only before a new turn (never between a call and its results).
            if end > k && taken + c > piece_budget && roles[evict[end]] != Role::Tool {
                break;
            }
            taken += c;
            end += 1;
        }
        let rest: Vec<&Value> = evict[k..end].iter().map(|&i| &values[i]).collect();
        let transcript = summarize::transcript(prior.as_deref(), &rest);
        let text = summarize::call(
            state.providers,
            sp,
            &sm,
            &transcript,
            u32::try_from(summary_max).unwrap_or(u32::MAX),
            cx.live().settings.summarizer_timeout,
        )
        .await?;
        calls += 1;
        let summary = Summary {
            tokens_after: cx.counter.count_text(enc, &text),
            text,
            messages: end as u32,
            tokens_before: evicted_tokens(end),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        cx.cache()
            .await
            .put(
                SummaryKey::new(&scope, PROMPT_TAG, &bytes[..end]),
                summary.clone(),
            )
            .await;
        prior = Some(summary.text);
        k = end;
    }
    let text = prior.ok_or_else(|| "nothing to summarize".to_string())?;
    let (body, after) = finish(&text, evict.len())?;
    let source = if from_cache {
        "summarizer, from a cached summary"
    } else {
        "summarizer"
    };
    Ok((body, after, calls, source))
}

/// `truncate_oldest`, and the fallback when the summarizer fails.
fn truncate(
    report: &Report<'_>,
    raws: &[&RawValue],
    lead: usize,
    roles: &[Role],
    counts: &[u64],
    budget: u64,
    failure: Option<String>,
) -> Result<Fit, Refused> {
    // Messages: room for a user message saying what was dropped, needed when the kept
    // messages would start with the assistant's (the first message is a user's).
    let marker_room = match report.req.api {
        Api::Messages { .. } => plan::MIN_SUMMARY,
        _ => 0,
    };
    let b = Budget {
        prompt: budget,
        tail: budget,
        summary: marker_room,
    };
    match plan::plan(roles, counts, b) {
        Plan::Fits => Ok(Fit::Unchanged {
            estimate: Some(report.before),
        }),
        Plan::TooLong {
            needed,
            system,
            last_turn,
        } => Err(Refused {
            needed,
            before: report.before,
            why: too_long(needed, system, last_turn),
            failure,
        }),
        Plan::Compact {
            evict, kept_tokens, ..
        } => {
            let first_kept = evict
                .first()
                .and_then(|&e| (e..raws.len()).find(|i| evict.binary_search(i).is_err()));
            let marker = first_kept
                .filter(|&i| marker_room > 0 && matches!(roles[i], Role::Assistant { .. }))
                .map(|_| super::apis::dropped_marker(evict.len()));
            let after = kept_tokens + marker.as_ref().map_or(0, |_| marker_room);
            Ok(match rewrite(raws, lead, &evict, marker.as_deref()) {
                Some(messages) => report.rewritten("truncated", messages, after, 0, None, failure),
                None => Fit::Unchanged {
                    estimate: Some(report.before),
                },
            })
        }
    }
}

/// The summarizer's provider index and model: configured, else the request's own.
fn summarizer_of(state: Stage<'_>, req: &ChatRequest<'_>) -> (usize, String) {
    let live = state.compactor.live();
    let c = &live.settings;
    let sp = c
        .summarizer_provider
        .as_ref()
        .and_then(|name| state.providers.find(name))
        .unwrap_or(req.provider);
    let kind = state.providers.kind(sp);
    let sm = c
        .summarizer_model
        .as_deref()
        .map(|m| kind.canonical_model(m).into_owned())
        .unwrap_or_else(|| req.model.to_string());
    (sp, sm)
}

/// The `messages` array of `raws`, as they are (after pruning).
fn join(raws: &[&RawValue]) -> String {
    let len: usize = raws.iter().map(|r| r.get().len() + 1).sum();
    let mut out = String::with_capacity(len + 1);
    out.push('[');
    for (i, r) in raws.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r.get());
    }
    out.push(']');
    out
}

/// The `messages` array with `evict` removed and `summary` (raw JSON) in their place; the
/// kept messages byte for byte; the first `lead` entries (the fixed system prompt, counted
/// only) are left out. The data plane puts it in the body, in its one rewrite.
fn rewrite(
    raws: &[&RawValue],
    lead: usize,
    evict: &[usize],
    summary: Option<&str>,
) -> Option<String> {
    let first = *evict.first()?;
    let len: usize = raws.iter().map(|r| r.get().len() + 1).sum();
    let mut out = String::with_capacity(len + summary.map_or(0, str::len) + 2);
    out.push('[');
    let mut n = 0;
    for (i, r) in raws.iter().enumerate().skip(lead) {
        if i == first {
            if let Some(s) = summary {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(s);
                n += 1;
            }
        }
        if evict.binary_search(&i).is_ok() {
            continue;
        }
        if n > 0 {
            out.push(',');
        }
        out.push_str(r.get());
        n += 1;
    }
    out.push(']');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn too_long_names_the_parts_that_take_the_room() {
        assert_eq!(
            too_long(65, 24, 9),
            "the system messages (24 tokens) and the last turn (9 tokens) and a summary of \
             at least 32 tokens leave no room in the window with the reply's share"
        );
        // Truncating, or a single turn: no summary in the count.
        assert_eq!(
            too_long(60, 30, 30),
            "the system messages (30 tokens) and the last turn (30 tokens) leave no room in \
             the window with the reply's share"
        );
    }

    /// Providers as the compaction stage sees them, without a network: one Ollama whose
    /// summarizer answers a fixed short summary.
    struct OneOllama;

    impl Providers for OneOllama {
        fn name(&self, _: usize) -> &str {
            "ollama"
        }
        fn kind(&self, _: usize) -> ProviderKind {
            ProviderKind::Ollama
        }
        fn find(&self, _: &str) -> Option<usize> {
            Some(0)
        }
        fn window(&self, _: usize, _: &str) -> Option<u64> {
            None
        }
        fn compacted(&self, _: usize, _: &str, _: u64) {}
        fn pruned(&self, _: usize, _: &str, _: u64) {}
        fn post<'a>(
            &'a self,
            _: usize,
            _: &'a str,
            _: &'static str,
            _: &'a (dyn Fn(Shape) -> Bytes + Sync),
            _: usize,
        ) -> BoxFuture<'a, Result<(http::StatusCode, Bytes), String>> {
            Box::pin(async {
                let answer = r#"{"message":{"role":"assistant","content":"They talked."}}"#;
                Ok((http::StatusCode::OK, Bytes::from_static(answer.as_bytes())))
            })
        }
    }

    fn words(n: usize, seed: usize) -> String {
        (0..n)
            .map(|i| ["river", "stone", "amber", "quiet", "delta", "north"][(i + seed) % 6])
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Issue 19: shrinking the context under memory pressure may cost quality, never
    /// availability. Property over request sizes (history, last turn, reply limit), overflow
    /// policies, normal windows and pressure levels: whatever the unpressured proxy serves is
    /// served under pressure, in a window no larger than `buffers.context.max`, and what is
    /// forwarded fits the window it is forwarded for.
    #[tokio::test]
    async fn no_request_the_unpressured_proxy_serves_is_refused_under_pressure() {
        use crate::lifecycle::runner;
        use crate::monitor::Level;
        let dir = std::env::temp_dir().join(format!("llm-warden-raise-{}", std::process::id()));
        let mut config = Config::default();
        config.buffers.context_initial = 1024;
        config.buffers.context_max = 8192;
        config.compaction.cache_dir = Some(dir.clone());
        let (mut served, mut raised, mut refused_both) = (0, 0, 0);
        for policy in [
            OverflowPolicy::Summarize,
            OverflowPolicy::TruncateOldest,
            OverflowPolicy::Reject,
        ] {
            config.compaction.on_overflow = policy;
            let cx = Compactor::new(&config);
            let stage = Stage {
                compactor: &cx,
                providers: &OneOllama,
            };
            for turns in [0usize, 2, 8] {
                for turn_words in [40usize, 400] {
                    for last in [9usize, 150, 600, 2500, 7000] {
                        let mut messages = vec![json!({"role": "system", "content": words(24, 0)})];
                        for t in 0..turns {
                            let role = if t % 2 == 0 { "user" } else { "assistant" };
                            messages.push(json!({"role": role, "content": words(turn_words, t)}));
                        }
                        messages.push(json!({"role": "user", "content": words(last, 7)}));
                        let raw = serde_json::to_string(&messages).expect("json");
                        let raw = RawValue::from_string(raw).expect("raw");
                        for max_reply in [None, Some(150u64), Some(1500)] {
                            for normal in [2048u64, 4096] {
                                let req = |raise_to| ChatRequest {
                                    provider: 0,
                                    model: "m",
                                    messages: Some(&raw),
                                    api: Api::Chat,
                                    max_reply,
                                    raise_to,
                                };
                                cx.set_compact_earlier(false);
                                let (unpressured, _) = fit(stage, &req(None), normal).await;
                                for level in [Level::Normal, Level::Warning, Level::Critical] {
                                    let cap = runner::cap(ProviderKind::Ollama, level, 1024, 256);
                                    cx.set_compact_earlier(level != Level::Normal);
                                    let window = cap.num_ctx.unwrap_or(normal);
                                    let raise_to = cap.num_ctx.map(|_| cx.context_max());
                                    let (pressured, used) =
                                        fit(stage, &req(raise_to), window).await;
                                    let case = format!(
                                        "{policy:?} turns={turns}x{turn_words} last={last} \
                                         reply={max_reply:?} normal={normal} {level:?}: \
                                         {unpressured:?} / {pressured:?}"
                                    );
                                    assert!(used <= 8192, "{case}");
                                    let reserve = cx.reserve(&req(None), used);
                                    match &pressured {
                                        Fit::Reject { .. } => {
                                            assert!(
                                                matches!(unpressured, Fit::Reject { .. }),
                                                "refused under pressure only: {case}"
                                            );
                                            refused_both += 1;
                                        }
                                        Fit::Rewritten { after, .. } => {
                                            assert!(after + reserve <= used, "{case}");
                                            served += 1;
                                        }
                                        Fit::Unchanged { estimate } => {
                                            if let Some(e) = estimate {
                                                assert!(e + reserve <= used, "{case}");
                                            }
                                            served += 1;
                                        }
                                    }
                                    if used != window {
                                        assert!(used > window, "{case}");
                                        raised += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        // Not vacuous: each outcome happens.
        assert!(
            served > 100 && raised > 20 && refused_both > 10,
            "{served} {raised} {refused_both}"
        );
    }

    /// Fits `raw` (a conversation array) of `api` into `window` with the fixed summarizer.
    async fn fit_api(api: Api<'_>, raw: &str, window: u64, prune: bool) -> Fit {
        fit_api_with(api, raw, window, prune, OverflowPolicy::Summarize).await
    }

    async fn fit_api_with(
        api: Api<'_>,
        raw: &str,
        window: u64,
        prune: bool,
        policy: OverflowPolicy,
    ) -> Fit {
        let dir =
            std::env::temp_dir().join(format!("llm-warden-apis-{}-{}", std::process::id(), window));
        let mut config = Config::default();
        config.compaction.cache_dir = Some(dir.clone());
        config.compaction.prune = prune;
        config.compaction.on_overflow = policy;
        let cx = Compactor::new(&config);
        let stage = Stage {
            compactor: &cx,
            providers: &OneOllama,
        };
        let raw = RawValue::from_string(raw.to_string()).expect("raw");
        let req = ChatRequest {
            provider: 0,
            model: "m",
            messages: Some(&raw),
            api,
            max_reply: Some(64),
            raise_to: None,
        };
        let (fit, _) = fit(stage, &req, window).await;
        let _ = std::fs::remove_dir_all(&dir);
        fit
    }

    /// The array's entries as raw text, in order.
    fn entries(array: &str) -> Vec<String> {
        serde_json::from_str::<Vec<&RawValue>>(array)
            .expect("array")
            .iter()
            .map(|r| r.get().to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_messages_conversation_is_summarized_as_a_user_turn_kept_bytes_unchanged() {
        let system = RawValue::from_string(format!(r#""The system prompt. {}""#, words(30, 1)))
            .expect("raw");
        // Odd spacing: kept messages must come back byte for byte.
        let mut msgs = Vec::new();
        for t in 0..6 {
            msgs.push(format!(
                r#"{{"role":"user", "content":"{}"}}"#,
                words(150, t)
            ));
            msgs.push(format!(
                r#"{{"role":"assistant","content":[{{"type":"text","text":"{}"}},{{"type":"tool_use","id":"t{t}","name":"read","input":{{"path":"a"}}}}]}}"#,
                words(20, t)
            ));
            msgs.push(format!(
                r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t{t}","content":"{}"}}]}}"#,
                words(150, t + 2)
            ));
            msgs.push(format!(
                r#"{{"role":"assistant",  "content":"{}"}}"#,
                words(30, t)
            ));
        }
        msgs.push(r#"{"role":"user","content":"and now?"}"#.to_string());
        let raw = format!("[{}]", msgs.join(","));
        let api = Api::Messages {
            system: Some(&system),
        };
        let Fit::Rewritten { messages, .. } = fit_api(api, &raw, 2048, false).await else {
            panic!("not rewritten");
        };
        let out = entries(&messages);
        assert!(
            !messages.contains("The system prompt."),
            "the system stays outside"
        );
        // [summary (user), ack (assistant) if the next is user, kept...]
        let summary: Value = serde_json::from_str(&out[0]).expect("json");
        assert_eq!(summary["role"], "user");
        let ack_raw = json!({"role": "assistant", "content": super::super::apis::ACK}).to_string();
        let ack = out[1] == ack_raw;
        let kept = &out[1 + usize::from(ack)..];
        let evicted = msgs.len() - kept.len();
        assert!(evicted > 0 && kept.len() > 1, "{evicted}");
        assert_eq!(kept, &msgs[evicted..], "kept byte for byte");
        let want = Api::Messages { system: None }.summary(
            "They talked.",
            evicted,
            serde_json::from_str::<Value>(&msgs[evicted]).ok().as_ref(),
        );
        assert_eq!(messages, format!("[{want},{}]", msgs[evicted..].join(",")));
        // Roles alternate, and the first kept message is no orphan tool_result.
        let roles: Vec<String> = out
            .iter()
            .map(|m| serde_json::from_str::<Value>(m).expect("json")["role"].to_string())
            .collect();
        assert!(roles.windows(2).all(|w| w[0] != w[1]), "{roles:?}");
        assert!(!msgs[evicted].contains("tool_result"));
    }

    #[tokio::test]
    async fn repeated_messages_and_responses_content_is_pruned_the_rest_kept_bytes() {
        let big = words(400, 3);
        let msgs = [
            r#"{"role":"user","content":"look at this"}"#.to_string(),
            format!(r#"{{"role":"assistant","content":[{{"type":"text","text":"{big}"}}]}}"#),
            r#"{"role":"user","content":"again please"}"#.to_string(),
            format!(r#"{{"role":"assistant","content":[{{"type":"text","text":"{big}"}}]}}"#),
            r#"{"role":"user","content":"thanks"}"#.to_string(),
        ];
        let raw = format!("[{}]", msgs.join(","));
        let system = RawValue::from_string(r#""be brief""#.to_string()).expect("raw");
        let api = Api::Messages {
            system: Some(&system),
        };
        let Fit::Rewritten {
            messages, pruned, ..
        } = fit_api(api, &raw, 768, true).await
        else {
            panic!("not rewritten");
        };
        assert_eq!(pruned.map(|p| p.duplicates), Some(1));
        let marked = msgs[1].replace(&big, &prune::duplicate_marker(big.len()));
        let want = [&msgs[0], &marked, &msgs[2], &msgs[3], &msgs[4]];
        assert_eq!(
            messages,
            format!("[{}]", want.map(String::as_str).join(","))
        );
        // A tool_result's text, and in Responses a function_call_output's output.
        let results = [
            r#"{"role":"user","content":"read it"}"#.to_string(),
            r#"{"role":"assistant","content":[{"type":"tool_use","id":"a","name":"read","input":{}}]}"#.to_string(),
            format!(r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"a","content":"{big}"}}]}}"#),
            r#"{"role":"assistant","content":[{"type":"tool_use","id":"b","name":"read","input":{}}]}"#.to_string(),
            format!(r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"b","content":"{big}"}}]}}"#),
            r#"{"role":"assistant","content":"same"}"#.to_string(),
            r#"{"role":"user","content":"thanks"}"#.to_string(),
        ];
        let api = Api::Messages { system: None };
        let raw = format!("[{}]", results.join(","));
        let Fit::Rewritten { messages, .. } = fit_api(api, &raw, 768, true).await else {
            panic!("not rewritten");
        };
        let mut want = results.clone();
        want[2] = results[2].replace(&big, &prune::duplicate_marker(big.len()));
        assert_eq!(messages, format!("[{}]", want.join(",")));
        let items = [
            r#"{"role":"user","content":"read it"}"#.to_string(),
            r#"{"type":"function_call","call_id":"a","name":"read","arguments":"{}"}"#.to_string(),
            format!(r#"{{"type":"function_call_output","call_id":"a","output":"{big}"}}"#),
            r#"{"type":"function_call","call_id":"b","name":"read","arguments":"{}"}"#.to_string(),
            format!(r#"{{"type":"function_call_output","call_id":"b","output":"{big}"}}"#),
            r#"{"role":"user","content":"thanks"}"#.to_string(),
        ];
        let api = Api::Responses {
            instructions: None,
            previous_response_id: false,
        };
        let raw = format!("[{}]", items.join(","));
        let Fit::Rewritten { messages, .. } = fit_api(api, &raw, 768, true).await else {
            panic!("not rewritten");
        };
        let mut want = items.clone();
        want[2] = items[2].replace(&big, &prune::duplicate_marker(big.len()));
        assert_eq!(messages, format!("[{}]", want.join(",")));
    }

    #[tokio::test]
    async fn truncated_messages_start_with_a_user_message() {
        let mut msgs = Vec::new();
        for t in 0..6 {
            msgs.push(format!(
                r#"{{"role":"user","content":"{}"}}"#,
                words(150, t)
            ));
            msgs.push(format!(
                r#"{{"role":"assistant","content":"{}"}}"#,
                words(150, t + 1)
            ));
        }
        msgs.push(r#"{"role":"user","content":"and now?"}"#.to_string());
        let raw = format!("[{}]", msgs.join(","));
        let mut markers = 0;
        for window in [1024, 1280, 1536, 1792, 2048] {
            let api = Api::Messages { system: None };
            let policy = OverflowPolicy::TruncateOldest;
            let Fit::Rewritten { messages, .. } =
                fit_api_with(api, &raw, window, false, policy).await
            else {
                panic!("not rewritten");
            };
            let out = entries(&messages);
            let first: Value = serde_json::from_str(&out[0]).expect("json");
            assert_eq!(first["role"], "user", "{window}");
            let marked = out[0].contains("were dropped");
            let kept = &out[usize::from(marked)..];
            let dropped = msgs.len() - kept.len();
            assert_eq!(kept, &msgs[dropped..], "{window}: byte for byte");
            if marked {
                assert_eq!(out[0], super::super::apis::dropped_marker(dropped));
                markers += 1;
            } else {
                assert_eq!(msgs[dropped], out[0]);
            }
        }
        assert!(
            markers > 0,
            "a kept tail that starts with the assistant's happens"
        );
    }

    #[tokio::test]
    async fn a_responses_input_is_summarized_as_a_system_item_calls_kept_with_outputs() {
        let instructions = RawValue::from_string(format!(r#""{}""#, words(30, 1))).expect("raw");
        let mut items = Vec::new();
        for t in 0..6 {
            items.push(format!(
                r#"{{"role":"user", "content":"{}"}}"#,
                words(150, t)
            ));
            items.push(format!(
                r#"{{"type":"function_call","call_id":"c{t}","name":"read","arguments":"{{}}"}}"#
            ));
            items.push(format!(
                r#"{{"type":"function_call_output","call_id":"c{t}","output":"{}"}}"#,
                words(150, t + 2)
            ));
            items.push(format!(
                r#"{{"type":"message","role":"assistant","content":[{{"type":"output_text","text":"{}"}}]}}"#,
                words(30, t)
            ));
        }
        items.push(r#"{"role":"user","content":"and now?"}"#.to_string());
        let raw = format!("[{}]", items.join(","));
        let api = Api::Responses {
            instructions: Some(&instructions),
            previous_response_id: false,
        };
        let Fit::Rewritten { messages, .. } = fit_api(api, &raw, 2048, false).await else {
            panic!("not rewritten");
        };
        let out = entries(&messages);
        let kept = &out[1..];
        let evicted = items.len() - kept.len();
        assert!(evicted > 0 && kept.len() > 1, "{evicted}");
        let want = json!({"role":"system","content":super::super::apis::summary_text("They talked.", evicted)});
        assert_eq!(messages, format!("[{want},{}]", items[evicted..].join(",")));
        assert!(!items[evicted].contains("function_call_output"));
        // With previous_response_id: unchanged, and said.
        let api = Api::Responses {
            instructions: Some(&instructions),
            previous_response_id: true,
        };
        assert!(matches!(
            fit_api(api, &raw, 2048, false).await,
            Fit::Unchanged { estimate: Some(_) }
        ));
    }

    #[test]
    fn memory_pressure_compacts_earlier_and_caps_the_context() {
        let cx = Compactor::new(&Config::default());
        assert_eq!(cx.context_cap(), 32768, "buffers.context.max");
        assert!((cx.threshold("m", false) - 0.9).abs() < 1e-9);
        cx.set_compact_earlier(true);
        assert_eq!(cx.context_cap(), 4096, "buffers.context.initial");
        assert!((cx.threshold("m", false) - 0.9 * PRESSURE_FACTOR).abs() < 1e-9);
        assert!(
            (cx.threshold("m", true) - 0.9).abs() < 1e-9,
            "a window raised to fit the request: the usual threshold"
        );
        cx.set_compact_earlier(false);
        assert_eq!(cx.context_cap(), 32768);
    }
}
