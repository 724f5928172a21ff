//! llm-warden: a drop-in reverse proxy for local LLM providers.
#![forbid(unsafe_code)]

pub mod sim;
