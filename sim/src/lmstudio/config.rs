//! The simulator's knobs (`LmStudioConfig`, `Overflow`) and the model catalogue they define:
//! lookups by key or instance id, display names, and the three routes that list the catalogue
//! (`/v1/models`, `/api/v0/models[/{id}]`, `/api/v1/models`).

use std::time::Duration;

use http::{Response, StatusCode};

use super::request::{Api, Fail};
use super::state::State;
use super::wire::{
    to_json, Capabilities, InstanceConfig, LoadedInstance, OaiModel, OaiModelList, Quantization,
    V0Model, V0ModelList, V1Model, V1ModelList,
};
use super::{LmStudioSim, JSON};
use crate::common::{respond, Clock, SimBody};
use crate::SimModel;

/// What an over-long prompt does. LM Studio's overflow policy is an app setting that is not
/// visible on the wire, so the simulator offers the two observable outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// 400 with an OpenAI-style error (`code:"context_length_exceeded"`).
    #[default]
    Error,
    /// Answer anyway, with the prompt token count capped at the loaded context length.
    Silent,
}

/// Knobs of the simulated LM Studio server.
#[derive(Clone, Debug)]
pub struct LmStudioConfig {
    /// Downloaded models; `SimModel.name` is the model key.
    pub models: Vec<SimModel>,
    /// How long a load takes (JIT or `/api/v1/models/load`), slept with `tokio::time`.
    pub load_latency: Duration,
    /// Delay before each generated token (streamed or not).
    pub token_delay: Duration,
    /// Tokens per reply, capped by `max_tokens` / `max_output_tokens` (finish reason `length`).
    pub reply_tokens: usize,
    /// Just-in-time loading of a requested model that is not loaded.
    pub jit: bool,
    /// Keep at most one JIT-loaded model (manual loads are never evicted).
    pub auto_evict: bool,
    /// Idle TTL of a JIT-loaded model when the loading request gives no `ttl`.
    pub default_ttl: Duration,
    /// Context a model is loaded with unless the load asks otherwise (capped at the trained max).
    pub default_context_length: u32,
    /// `Some` => every request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub overflow: Overflow,
    /// Length of the simulated embedding vectors.
    pub embedding_dims: usize,
    /// Reproduce the quirk observed in 0.3.14: when exactly one model instance is loaded, an
    /// unknown `model` on `/v1/*` and `/api/v0/*` is ignored and the loaded model answers.
    /// Default off.
    pub single_loaded_model_quirk: bool,
    pub clock: Clock,
}

impl Default for LmStudioConfig {
    fn default() -> Self {
        let mut qwen = SimModel::chat("qwen2.5-7b-instruct", 4_683_073_184, 32768);
        qwen.arch = "qwen2".to_string();
        qwen.parameter_size = "7B".to_string();
        let mut llama = SimModel::chat("llama-3.2-3b-instruct", 2_019_377_696, 131072);
        llama.parameter_size = "3B".to_string();
        let embed = SimModel::embedding("text-embedding-nomic-embed-text-v1.5", 84_106_624, 2048);
        LmStudioConfig {
            models: vec![qwen, llama, embed],
            load_latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            reply_tokens: 8,
            jit: true,
            auto_evict: true,
            default_ttl: Duration::from_secs(60 * 60),
            default_context_length: 4096,
            api_key: None,
            overflow: Overflow::Error,
            embedding_dims: 8,
            single_loaded_model_quirk: false,
            clock: Clock::system(),
        }
    }
}

// === catalogue ===

impl LmStudioSim {
    /// The catalogue entry for a model key or an instance id (`key:2`).
    pub(super) fn model_of(&self, name: &str) -> Option<&SimModel> {
        let by_key = |k: &str| self.cfg.models.iter().find(|m| m.name == k);
        by_key(name).or_else(|| {
            let (key, n) = name.rsplit_once(':')?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            by_key(key)
        })
    }

    pub(super) fn context_for(&self, model: &SimModel, requested: Option<u32>) -> u32 {
        requested
            .unwrap_or(self.cfg.default_context_length)
            .min(model.context_length)
            .max(1)
    }

    /// Rejects an embedding model on a generation route and vice versa.
    pub(super) fn check_kind(&self, model: &str, want_embedding: bool) -> Result<(), Fail> {
        match self.model_of(model) {
            Some(m) if m.embedding && !want_embedding => Err(Fail::WrongType(format!(
                "Model \"{model}\" is an embedding model and cannot be used for text generation."
            ))),
            Some(m) if !m.embedding && want_embedding => Err(Fail::WrongType(format!(
                "Model \"{model}\" is not an embedding model."
            ))),
            _ => Ok(()),
        }
    }

    pub(super) fn openai_models(&self) -> Response<SimBody> {
        let st = self.lock();
        let mut data = Vec::new();
        for m in &self.cfg.models {
            let instances = st.instances.iter().filter(|i| i.key == m.name);
            if self.cfg.jit {
                data.push(OaiModel::new(&m.name));
                data.extend(
                    instances
                        .filter(|i| i.id != m.name)
                        .map(|i| OaiModel::new(&i.id)),
                );
            } else {
                data.extend(instances.map(|i| OaiModel::new(&i.id)));
            }
        }
        let body = to_json(&OaiModelList {
            data,
            object: "list",
        });
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    fn v0_entry<'a>(&self, st: &State, m: &'a SimModel) -> V0Model<'a> {
        let loaded = st.instances.iter().find(|i| i.key == m.name);
        V0Model {
            id: &m.name,
            object: "model",
            kind: if m.embedding { "embeddings" } else { "llm" },
            publisher: publisher(&m.name),
            arch: &m.arch,
            compatibility_type: "gguf",
            quantization: &m.quantization,
            state: if loaded.is_some() {
                "loaded"
            } else {
                "not-loaded"
            },
            max_context_length: m.context_length,
            loaded_context_length: loaded.map(|i| i.context_length),
            capabilities: if m.embedding {
                Vec::new()
            } else {
                vec!["tool_use"]
            },
        }
    }

    pub(super) fn v0_models(&self) -> Response<SimBody> {
        let st = self.lock();
        let data = self
            .cfg
            .models
            .iter()
            .map(|m| self.v0_entry(&st, m))
            .collect();
        let body = to_json(&V0ModelList {
            object: "list",
            data,
        });
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    pub(super) fn v0_model(&self, name: &str) -> Response<SimBody> {
        let Some(m) = self.cfg.models.iter().find(|m| m.name == name) else {
            return Fail::ModelNotFound(name.to_string()).response(Api::V0);
        };
        let st = self.lock();
        let body = to_json(&self.v0_entry(&st, m));
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }

    pub(super) fn v1_models(&self) -> Response<SimBody> {
        let st = self.lock();
        let models = self
            .cfg
            .models
            .iter()
            .map(|m| V1Model {
                kind: if m.embedding { "embedding" } else { "llm" },
                publisher: publisher(&m.name),
                key: &m.name,
                display_name: display_name(&m.name),
                architecture: (!m.embedding).then_some(m.arch.as_str()),
                quantization: Quantization {
                    name: &m.quantization,
                    bits_per_weight: bits_per_weight(&m.quantization),
                },
                size_bytes: m.size_bytes,
                params_string: &m.parameter_size,
                loaded_instances: st
                    .instances
                    .iter()
                    .filter(|i| i.key == m.name)
                    .map(|i| LoadedInstance {
                        id: i.id.clone(),
                        config: InstanceConfig::of(m, i.context_length, i.opts),
                    })
                    .collect(),
                max_context_length: m.context_length,
                format: "gguf",
                capabilities: (!m.embedding).then_some(Capabilities {
                    vision: false,
                    trained_for_tool_use: true,
                }),
                description: None,
            })
            .collect();
        let body = to_json(&V1ModelList { models });
        drop(st);
        respond(StatusCode::OK, JSON, body)
    }
}

/// The publisher part of a `publisher/name` key.
pub(super) fn publisher(key: &str) -> &str {
    key.split_once('/').map_or("lmstudio-community", |(p, _)| p)
}

/// `qwen2.5-7b-instruct` → `Qwen2.5 7B Instruct`.
pub(super) fn display_name(key: &str) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.split(['-', '_'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let size = w.len() > 1
                && w.ends_with(['b', 'm'])
                && w[..w.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.');
            if size {
                return w.to_ascii_uppercase();
            }
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bits per weight of a quantization name: `Q4_K_M` → 4, `F16` → 16.
fn bits_per_weight(quant: &str) -> u32 {
    let digits: String = quant
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(16)
}
