//! The control plane: which models are loaded, and when (TDR-007 Model Lifecycle Management).
//!
//! So far this holds the pure part, [`policy`]: given the models a provider holds and the
//! limits, what must be unloaded before a model can be loaded. The actor that owns the model
//! table, hands out leases and runs loads and unloads through `providers::ops` comes with the
//! lifecycle issue; it will call `plan_load` speculatively and log only what it commits.

pub mod policy;
