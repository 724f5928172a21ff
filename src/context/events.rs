//! Recent compaction events, for `/status` (and the dashboard later): a bounded ring.

use serde::Serialize;

/// How many events are kept.
pub const KEPT: usize = 100;

/// One compaction (or refusal) of one request.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompactionEvent {
    /// RFC 3339.
    pub at: String,
    pub provider: String,
    pub model: String,
    /// `pruned`, `summarized`, `truncated` or `rejected`; `not_compacted` for a Responses
    /// request over the budget with `previous_response_id` (forwarded as sent; `failure`
    /// says why).
    pub action: &'static str,
    pub tokens_before: u64,
    pub tokens_after: u64,
    pub window: u64,
    pub summarizer_calls: u32,
    /// Where the summary came from: `cache`, `summarizer`, `summarizer, from a cached prefix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
    /// Why the summarizer was not used (it failed), when truncation stood in; why a request
    /// was `not_compacted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// What pruning took out first (`pruned`, and `summarized` / `truncated` after it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned: Option<PruneCounts>,
}

/// What the prune step took out of one request.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct PruneCounts {
    /// Earlier copies of large content replaced by a marker.
    pub duplicates: u32,
    /// Images removed from messages already answered.
    pub images: u32,
    /// Prompt tokens that saved (estimated).
    pub tokens: u64,
}

/// Recent compactions, oldest first.
pub type EventLog = crate::recent::Recent<CompactionEvent>;
