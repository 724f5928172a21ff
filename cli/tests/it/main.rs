//! The integration tests: one binary (one link of the crate instead of one per file), each
//! file a module, the shared helpers in `support`. Everything runs over real sockets on
//! 127.0.0.1: the proxy in-process (`app::start`) or as the release binary, in front of the
//! simulators (`llm-warden-sim`) and, in `llamacpp_real` and `python_clients`, real programs.
//! What each module covers: docs/testing.md.

mod support;

mod audio;
mod bad_input;
mod cli;
mod compaction;
mod compat_apis;
mod config;
mod dashboard;
mod deploy;
mod epp;
mod errors;
mod faults;
mod fleet;
mod hostile;
mod inflight;
mod lifecycle;
mod llamacpp;
mod llamacpp_real;
mod metrics;
mod node;
mod pressure;
mod protocols;
mod python_clients;
mod reload;
mod security;
mod soak;
mod status;
mod streaming;
mod transparency;
