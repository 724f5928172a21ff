//! Simulated providers: Ollama, LM Studio and llama.cpp `llama-server` servers that speak the
//! real wire formats (`docs/providers.md` §5), for tests, benches, examples and
//! `llm-warden simulate`. They run in-process on any listener, keep a call log, and take
//! typed knobs (load latency, per-token delay, catalogue, limits, clock).
//!
//! Not a provider: nothing here is used by the proxy itself.

pub mod common;
pub mod extractive;
pub mod llamacpp;
pub mod lmstudio;
pub mod ollama;

pub use common::{Call, CallLog, Clock, SimServer};

/// What a simulated model is: the catalogue entry every simulator serves.
#[derive(Clone, Debug)]
pub struct SimModel {
    /// Ollama: `name:tag` (a bare name means `:latest`); LM Studio: the model key; llama.cpp:
    /// the model id (router: the file name in the models directory; single mode: `--alias`).
    pub name: String,
    /// Weights on disk, bytes (`/api/tags` `size`, LM Studio `size_bytes`).
    pub size_bytes: u64,
    /// The trained maximum context (`<arch>.context_length`, `max_context_length`).
    pub context_length: u32,
    /// The model's own default context (Ollama Modelfile `PARAMETER num_ctx`), if any.
    pub default_num_ctx: Option<u32>,
    /// Architecture / family, e.g. `llama`, `qwen2`.
    pub arch: String,
    pub parameter_size: String,
    pub quantization: String,
    /// An embedding model answers embeddings only.
    pub embedding: bool,
}

impl SimModel {
    /// A chat model with a trained context and a size; the other fields get plausible values.
    pub fn chat(name: &str, size_bytes: u64, context_length: u32) -> Self {
        SimModel {
            name: name.to_string(),
            size_bytes,
            context_length,
            default_num_ctx: None,
            arch: "llama".to_string(),
            parameter_size: "3.2B".to_string(),
            quantization: "Q4_K_M".to_string(),
            embedding: false,
        }
    }

    /// An embedding model.
    pub fn embedding(name: &str, size_bytes: u64, context_length: u32) -> Self {
        SimModel {
            name: name.to_string(),
            size_bytes,
            context_length,
            default_num_ctx: None,
            arch: "nomic-bert".to_string(),
            parameter_size: "137M".to_string(),
            quantization: "F16".to_string(),
            embedding: true,
        }
    }
}

/// Parses a `--models` list for `llm-warden simulate`: `name[=context_length][@size_mb]`,
/// comma separated; a name containing `embed` is an embedding model.
pub fn parse_models(spec: &str) -> Result<Vec<SimModel>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let item = item.trim();
            let (rest, size_mb) = match item.split_once('@') {
                Some((r, s)) => (
                    r,
                    s.parse::<u64>()
                        .map_err(|_| format!("bad size in model spec `{item}`"))?,
                ),
                None => (item, 2000),
            };
            let (name, ctx) = match rest.split_once('=') {
                Some((n, c)) => (
                    n,
                    c.parse::<u32>()
                        .map_err(|_| format!("bad context length in model spec `{item}`"))?,
                ),
                None => (rest, 131072),
            };
            if name.is_empty() {
                return Err(format!("empty model name in `{item}`"));
            }
            let size = size_mb * 1_000_000;
            Ok(if name.contains("embed") {
                SimModel::embedding(name, size, ctx)
            } else {
                SimModel::chat(name, size, ctx)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_specs() {
        let m = parse_models("llama3.2:3b=8192@2000, nomic-embed-text").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "llama3.2:3b");
        assert_eq!(m[0].context_length, 8192);
        assert_eq!(m[0].size_bytes, 2_000_000_000);
        assert!(m[1].embedding);
        assert!(parse_models("x=abc").is_err());
    }
}
