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
//! - [`nodes`]: a pool's nodes as a front knows them (their latest views, in rotation or
//!   not, what it sent them), polled from their admin APIs;
//! - [`front`]: the pool listener's handler (`[[pools]]`): picks, forwards, retries, merges
//!   model lists.
//!
//! Layering: `fleet` reads `proxy`, `transport`, `lifecycle`, `monitor`, `config`; `state`
//! holds the pools, `admin` builds this node's view (`admin/node.rs`) and shows the pools,
//! `app` wires the listeners.

pub mod epp;
pub mod front;
pub mod nodes;
pub mod picker;
pub mod scan;
pub mod view;
