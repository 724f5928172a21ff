//! Fitting conversations into a model's context window (docs/design.md: context window compression,
//! `BufferConfig.context.compressionThreshold`, disk caching for inactive parts).
//!
//! - [`plan`]: pure: which messages stay verbatim, which become the summary;
//! - [`compact`]: the stage the proxy runs on chat requests: count, plan, summarize, rewrite;
//! - [`apis`]: what differs for the Anthropic Messages and OpenAI Responses conversations;
//! - [`summarize`]: the summarizer call through a provider;
//! - [`cache`]: summaries of evicted messages, keyed by (model, summarizer prompt, the exact
//!   messages), in memory and in an embedded on-disk store, so the next turn of the same
//!   conversation (also after a restart) reuses its summary instead of calling the summarizer;
//! - [`events`]: recent compactions for `/status`.

pub mod apis;
pub mod cache;
pub mod compact;
pub mod events;
pub mod plan;
pub mod prune;
pub mod summarize;
#[cfg(test)]
mod tests;

pub use apis::Api;
pub use compact::{fit, ChatRequest, Compactor, Fit, Providers, Stage};
