//! Simulated LM Studio server (to be written).
