//! llm-warden: a drop-in reverse proxy for local LLM providers (Ollama, LM Studio) that
//! counts, per model, what is in flight and what it cost, decides which models are loaded
//! (lazy loads, idle unloads, limits, a queue), rewrites conversations that would overflow
//! the model's window (summaries of the older turns), and (in a later stage) reacts to memory
//! pressure.
//!
//! Layout:
//! - data plane: [`proxy`] (HTTP in, HTTP out; streams relayed frame by frame);
//! - adapters: [`providers`] (what differs between upstreams, as data; load/unload operations);
//! - control plane: [`lifecycle`] (one actor per provider owns its models and wait queue;
//!   requests hold leases);
//! - accounting: [`stats`] (per-model in-flight guard and counters), [`tokens`] (token
//!   estimates for chat requests, calibrated per model against what providers report),
//!   [`memory`] (a loaded model's memory split into weights, KV cache and working buffers),
//!   [`metrics`] (Prometheus names, latency histograms, the `/metrics` page);
//! - context: [`context`] (fitting a conversation into the model's window: plan, summarize,
//!   cache, rewrite);
//! - resources: [`monitor`] (RAM, CPU and GPU memory sampled in the background; pressure levels);
//! - support: [`config`], [`app`] (wiring, listeners, shutdown), [`admin`] (`/status`,
//!   `/metrics`);
//!
//! The simulators are the `llm-warden-sim` crate (`sim/`), the binary is `cli/`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod context;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod poller;
pub mod providers;
pub mod proxy;
pub mod recent;
pub mod rewrite;
pub mod state;
pub mod stats;
pub mod tokens;
pub mod transport;
pub mod upstream;
