//! JSON wire shapes of every success body and stream event (field order is key order, so
//! these structs fix the bytes), and the helpers that encode them as JSON responses and SSE
//! `data:` / `event:` frames.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::request::NativeErrorBody;
use super::state::LoadOpts;
use super::{JSON, SSE};
use crate::common::{respond, SimBody};
use crate::SimModel;

#[derive(Serialize)]
pub(super) struct Greeting {
    pub(super) lmstudio: bool,
}

#[derive(Serialize)]
pub(super) struct UnknownEndpoint {
    pub(super) error: String,
}

/// The OpenAI `usage` object, the same in both providers.
pub(super) use crate::common::Usage;

#[derive(Serialize)]
pub(super) struct ChatMessage<'a> {
    pub(super) role: &'a str,
    pub(super) content: &'a str,
}

#[derive(Serialize)]
pub(super) struct ChatChoice<'a> {
    pub(super) index: u32,
    pub(super) logprobs: (),
    pub(super) finish_reason: &'a str,
    pub(super) message: ChatMessage<'a>,
}

#[derive(Serialize)]
pub(super) struct TextChoice<'a> {
    pub(super) index: u32,
    pub(super) text: &'a str,
    pub(super) logprobs: (),
    pub(super) finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct Empty {}

#[derive(Serialize)]
pub(super) struct V0Stats {
    pub(super) tokens_per_second: f64,
    pub(super) time_to_first_token: f64,
    pub(super) generation_time: f64,
    pub(super) stop_reason: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum StatsField {
    Empty(Empty),
    V0(V0Stats),
}

#[derive(Serialize)]
pub(super) struct ModelInfo<'a> {
    pub(super) arch: &'a str,
    pub(super) quant: &'a str,
    pub(super) format: &'static str,
    pub(super) context_length: u32,
}

#[derive(Serialize)]
pub(super) struct RuntimeInfo {
    pub(super) name: &'static str,
    pub(super) version: &'static str,
    pub(super) supported_formats: [&'static str; 1],
}

pub(super) const RUNTIME: RuntimeInfo = RuntimeInfo {
    name: "llama.cpp-linux-x86_64-avx2",
    version: "1.3.0",
    supported_formats: ["gguf"],
};

/// A non-streamed `/v1` or `/api/v0` chat or text completion.
#[derive(Serialize)]
pub(super) struct Completion<'a, C> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) choices: [C; 1],
    pub(super) usage: Usage,
    pub(super) stats: StatsField,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) model_info: Option<ModelInfo<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) runtime: Option<RuntimeInfo>,
    pub(super) system_fingerprint: &'a str,
}

#[derive(Serialize)]
pub(super) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) content: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct DeltaChoice<'a> {
    pub(super) index: u32,
    pub(super) delta: Delta<'a>,
    pub(super) logprobs: (),
    pub(super) finish_reason: Option<&'a str>,
}

/// One streamed chunk.
#[derive(Serialize)]
pub(super) struct Chunk<'a, C> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) system_fingerprint: &'a str,
    pub(super) choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(super) struct EmbeddingList<'a> {
    pub(super) object: &'static str,
    pub(super) data: Vec<EmbeddingItem>,
    pub(super) model: &'a str,
    pub(super) usage: EmbeddingUsage,
}

#[derive(Serialize)]
pub(super) struct EmbeddingItem {
    pub(super) object: &'static str,
    pub(super) embedding: Vec<f32>,
    pub(super) index: usize,
}

#[derive(Serialize)]
pub(super) struct EmbeddingUsage {
    pub(super) prompt_tokens: u32,
    pub(super) total_tokens: u32,
}

#[derive(Serialize)]
pub(super) struct OaiModelList<'a> {
    pub(super) data: Vec<OaiModel<'a>>,
    pub(super) object: &'static str,
}

#[derive(Serialize)]
pub(super) struct OaiModel<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) owned_by: &'static str,
}

impl<'a> OaiModel<'a> {
    pub(super) fn new(id: &'a str) -> Self {
        OaiModel {
            id,
            object: "model",
            owned_by: "organization_owner",
        }
    }
}

#[derive(Serialize)]
pub(super) struct V0ModelList<'a> {
    pub(super) object: &'static str,
    pub(super) data: Vec<V0Model<'a>>,
}

#[derive(Serialize)]
pub(super) struct V0Model<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) publisher: &'a str,
    pub(super) arch: &'a str,
    pub(super) compatibility_type: &'static str,
    pub(super) quantization: &'a str,
    pub(super) state: &'static str,
    pub(super) max_context_length: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) loaded_context_length: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) capabilities: Vec<&'static str>,
}

#[derive(Serialize)]
pub(super) struct V1ModelList<'a> {
    pub(super) models: Vec<V1Model<'a>>,
}

#[derive(Serialize)]
pub(super) struct V1Model<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) publisher: &'a str,
    pub(super) key: &'a str,
    pub(super) display_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) architecture: Option<&'a str>,
    pub(super) quantization: Quantization<'a>,
    pub(super) size_bytes: u64,
    pub(super) params_string: &'a str,
    pub(super) loaded_instances: Vec<LoadedInstance>,
    pub(super) max_context_length: u32,
    pub(super) format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) capabilities: Option<Capabilities>,
    pub(super) description: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct Quantization<'a> {
    pub(super) name: &'a str,
    pub(super) bits_per_weight: u32,
}

#[derive(Serialize)]
pub(super) struct Capabilities {
    pub(super) vision: bool,
    pub(super) trained_for_tool_use: bool,
}

#[derive(Serialize)]
pub(super) struct LoadedInstance {
    pub(super) id: String,
    pub(super) config: InstanceConfig,
}

#[derive(Serialize)]
pub(super) struct InstanceConfig {
    pub(super) context_length: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) eval_batch_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) parallel: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) flash_attention: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) offload_kv_cache_to_gpu: Option<bool>,
}

impl InstanceConfig {
    pub(super) fn of(model: &SimModel, context_length: u32, opts: LoadOpts) -> Self {
        if model.embedding {
            InstanceConfig {
                context_length,
                eval_batch_size: None,
                parallel: None,
                flash_attention: None,
                offload_kv_cache_to_gpu: None,
            }
        } else {
            InstanceConfig {
                context_length,
                eval_batch_size: Some(opts.eval_batch_size),
                parallel: Some(4),
                flash_attention: Some(opts.flash_attention),
                offload_kv_cache_to_gpu: Some(opts.offload_kv_cache_to_gpu),
            }
        }
    }
}

#[derive(Serialize)]
pub(super) struct LoadResponse<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) instance_id: &'a str,
    pub(super) load_time_seconds: f64,
    pub(super) status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) load_config: Option<InstanceConfig>,
}

#[derive(Serialize)]
pub(super) struct UnloadResponse<'a> {
    pub(super) instance_id: &'a str,
}

/// The `/api/v1/chat` result (non-stream body and `chat.end.result`).
#[derive(Serialize)]
pub(super) struct V1ChatResult<'a> {
    pub(super) model_instance_id: &'a str,
    pub(super) output: [OutputItem<'a>; 1],
    pub(super) stats: V1ChatStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) response_id: Option<String>,
}

#[derive(Serialize)]
pub(super) struct OutputItem<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) content: &'a str,
}

#[derive(Serialize)]
pub(super) struct V1ChatStats {
    pub(super) input_tokens: u32,
    pub(super) total_output_tokens: u32,
    pub(super) reasoning_output_tokens: u32,
    pub(super) tokens_per_second: f64,
    pub(super) time_to_first_token_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) model_load_time_seconds: Option<f64>,
}

/// The `data` of one `/api/v1/chat` stream event.
#[derive(Serialize)]
pub(super) struct Event<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) model_instance_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) load_time_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) result: Option<&'a V1ChatResult<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<NativeErrorBody<'a>>,
}

impl<'a> Event<'a> {
    pub(super) fn new(kind: &'static str) -> Self {
        Event {
            kind,
            model_instance_id: None,
            progress: None,
            load_time_seconds: None,
            content: None,
            result: None,
            error: None,
        }
    }

    /// `event: <type>\ndata: <json>\n\n`.
    pub(super) fn sse(&self) -> Bytes {
        let mut out = format!("event: {}\ndata: ", self.kind).into_bytes();
        out.extend_from_slice(&to_json(self));
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

// === encoding helpers ===

pub(super) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub(super) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<SimBody> {
    respond(status, JSON, to_json(v))
}

/// `data: <json>\n\n`.
pub(super) fn sse_data<T: Serialize>(v: &T) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&to_json(v));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub(super) fn sse_response(body: SimBody) -> Response<SimBody> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SSE));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Seconds rounded to milliseconds, as LM Studio reports timings.
pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(super) fn secs(d: Duration) -> f64 {
    round3(d.as_secs_f64())
}
