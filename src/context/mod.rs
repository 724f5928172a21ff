//! Fitting conversations into a model's window; this module has the summary cache so far.
//!
//! - [`cache`]: summaries of evicted messages, keyed by (model, summarizer prompt, the exact
//!   messages), in memory and in an embedded on-disk store, so the next turn of the same
//!   conversation (also after a restart) reuses its summary instead of calling the summarizer.

pub mod cache;

#[cfg(test)]
mod tests;
