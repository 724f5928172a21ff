//! The control plane: which models are loaded, and when (TDR-007 Model Lifecycle Management).
//!
//! What is here so far is the pure part, [`policy`]: given the models a provider holds and
//! the limits, what must be unloaded before one more model can be loaded. Provider operations
//! (load and unload through each provider's own API) are in `providers::ops`; the poller in
//! `app.rs` already reads each provider's loaded-model list every `poll_interval`.
//!
//! The actor that owns the model table, hands out leases and commits the policy's plans comes
//! with the lifecycle issue. Notes for it, from building the foundation:
//! - the request path has one place to acquire a lease: `proxy::inspected`, after the body
//!   is parsed and before `client.request`; the lease can ride in `ObservedBody` next to the
//!   `InFlight` guard, which already drops exactly once (end, error, or client gone);
//! - Ollama's own idle timer: `proxy::rewrite::set_top_level(body, "keep_alive", "-1")` on
//!   `/api/chat|generate|embed` keeps every other byte of the client's body; `/v1/*` carries
//!   no keep-alive, so a runner loaded by the proxy with `keep_alive: -1` keeps it;
//! - the simulators keep a manual clock for provider-side expiry and count unloads that
//!   arrive while a model is answering (`unloads_while_busy`), for the "never unload in
//!   flight" tests; actor tests belong on paused tokio time against a fake provider.

pub mod policy;
