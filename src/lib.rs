//! llm-warden: a drop-in reverse proxy for local LLM providers (Ollama, LM Studio,
//! llama.cpp's llama-server) that counts, per model, what is in flight and what it cost,
//! decides which models are loaded (lazy loads, idle unloads, limits, a queue), rewrites
//! conversations that would overflow the model's window, and responds to memory pressure.
//!
//! Layers, top to bottom (each imports only from below; ARCHITECTURE.md has the table of
//! who owns which fact):
//! - wiring and fronts: [`app`] (listeners, shutdown, config reload), [`state`] (the shared
//!   state and the narrow handles made from it), [`poller`], [`admin`];
//! - [`fleet`] (many hosts: the node view the admin API serves, the picker a front uses);
//! - data plane: [`proxy`] (pass-through, the model-request path);
//! - per provider: [`upstream`] (health, the lifecycle handle, the pool);
//! - [`context`] (fitting conversations), [`stats`] and [`metrics`] (accounting);
//! - control plane: [`lifecycle`] (one actor per provider; leases; the runner-options rule);
//! - resources: [`monitor`], [`memory`];
//! - [`providers`] (what differs between upstreams, as data; operations; the control
//!   plane's client), [`config`];
//! - [`transport`] (the HTTP/1 codec, server, client, pool, lanes);
//! - leaves: [`tokens`], [`rewrite`], [`recent`], [`changes`].
//!
//! The simulators are the `llm-warden-sim` crate (`sim/`), the binary is `cli/`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod changes;
pub mod config;
pub mod context;
pub mod fleet;
pub mod hosts;
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
