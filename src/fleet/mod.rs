//! Many hosts: what a front needs to route model requests among llm-warden nodes (issue 21).
//!
//! Each host runs llm-warden next to its provider and stays the only authority over it (its
//! lifecycle actor, memory monitor, queue). A front routes requests among those nodes. There
//! is no cluster state to keep consistent: the front reads each node's [`view`] (`GET /node`
//! on the admin listener, polled, or streamed with `?watch=1`), ranks the nodes with the
//! pure [`picker`], and forwards; the node still makes its own admission decision, so a
//! stale view costs at most a retry on the next node.
//!
//! - [`view`]: the node view's types (serde both ways, so the front parses what the node
//!   writes) and how a node builds it from its owners' published snapshots;
//! - [`picker`]: the ranking, the conversation affinity key, and the fleet single-flight
//!   ([`picker::Pending`], state the front owns and passes in).
//!
//! Layering: `fleet` reads `lifecycle`, `monitor`, `state`; nothing below reads `fleet`
//! (the admin API above serves the view).

pub mod picker;
pub mod view;
