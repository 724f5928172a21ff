//! The JSON bodies the simulator writes, with fields in Go's declaration order so the bytes
//! match Ollama's, and the framing helpers: one NDJSON line, one SSE event, a whole JSON
//! response (native or `/v1`).

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

use super::{JSON, OAI_JSON};
use crate::common::{self, SimBody};
use crate::SimModel;

/// A value as one line: Go's `json.Encoder` output (used for NDJSON and `/v1` bodies).
pub(super) fn json_line(value: &impl Serialize) -> Vec<u8> {
    let mut body = common::go_json(value);
    body.push(b'\n');
    body
}

/// One NDJSON line.
pub(super) fn line(mut json: Vec<u8>) -> Bytes {
    json.push(b'\n');
    Bytes::from(json)
}

/// One SSE `data:` event.
pub(super) fn sse(json: Vec<u8>) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// A 200 native JSON body (no trailing newline).
pub(super) fn ok_json(value: &impl Serialize) -> Response<SimBody> {
    common::respond(StatusCode::OK, JSON, common::go_json(value))
}

/// A 200 `/v1` JSON body (ends in a newline).
pub(super) fn oai_json(value: &impl Serialize) -> Response<SimBody> {
    common::respond(StatusCode::OK, OAI_JSON, json_line(value))
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[derive(Serialize)]
pub(super) struct ErrorBody<'a> {
    pub(super) error: &'a str,
}

#[derive(Serialize)]
pub(super) struct OaiErrorBody<'a> {
    error: OaiError<'a>,
}

#[derive(Serialize)]
pub(super) struct OaiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl<'a> OaiErrorBody<'a> {
    pub(super) fn new(message: &'a str, kind: &'static str) -> Self {
        OaiErrorBody {
            error: OaiError {
                message,
                kind,
                param: None,
                code: None,
            },
        }
    }
}

#[derive(Serialize, Clone, Copy, Default)]
pub(super) struct Metrics {
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) total_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) load_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub(super) prompt_eval_count: u32,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) prompt_eval_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub(super) eval_count: u32,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) eval_duration: u64,
}

#[derive(Serialize)]
pub(super) struct OutMessage<'a> {
    pub(super) role: &'static str,
    pub(super) content: &'a str,
}

#[derive(Serialize)]
pub(super) struct ChatResponse<'a> {
    model: &'a str,
    created_at: String,
    message: OutMessage<'a>,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'a str>,
    #[serde(flatten)]
    metrics: Option<Metrics>,
}

impl<'a> ChatResponse<'a> {
    /// An assistant message; `done` once there is a `done_reason`.
    pub(super) fn new(
        model: &'a str,
        created_at: String,
        content: &'a str,
        done_reason: Option<&'a str>,
        metrics: Option<Metrics>,
    ) -> Self {
        ChatResponse {
            model,
            created_at,
            message: OutMessage {
                role: "assistant",
                content,
            },
            done: done_reason.is_some(),
            done_reason,
            metrics,
        }
    }
}

#[derive(Serialize)]
pub(super) struct GenerateResponse<'a> {
    model: &'a str,
    created_at: String,
    response: &'a str,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Vec<u32>>,
    #[serde(flatten)]
    metrics: Option<Metrics>,
}

impl<'a> GenerateResponse<'a> {
    /// A piece of the response; `done` once there is a `done_reason`.
    pub(super) fn new(
        model: &'a str,
        created_at: String,
        response: &'a str,
        done_reason: Option<&'a str>,
        context: Option<Vec<u32>>,
        metrics: Option<Metrics>,
    ) -> Self {
        GenerateResponse {
            model,
            created_at,
            response,
            done: done_reason.is_some(),
            done_reason,
            context,
            metrics,
        }
    }
}

#[derive(Serialize)]
pub(super) struct Details {
    pub(super) parent_model: &'static str,
    pub(super) format: &'static str,
    pub(super) family: String,
    pub(super) families: Vec<String>,
    pub(super) parameter_size: String,
    pub(super) quantization_level: String,
}

impl Details {
    pub(super) fn of(m: &SimModel) -> Self {
        Details {
            parent_model: "",
            format: "gguf",
            family: m.arch.clone(),
            families: vec![m.arch.clone()],
            parameter_size: m.parameter_size.clone(),
            quantization_level: m.quantization.clone(),
        }
    }
}

#[derive(Serialize)]
pub(super) struct PsResponse {
    pub(super) models: Vec<PsModel>,
}

#[derive(Serialize)]
pub(super) struct PsModel {
    pub(super) name: String,
    pub(super) model: String,
    pub(super) size: u64,
    pub(super) digest: String,
    pub(super) details: Details,
    pub(super) expires_at: String,
    pub(super) size_vram: u64,
    pub(super) context_length: u32,
}

#[derive(Serialize)]
pub(super) struct TagsResponse {
    pub(super) models: Vec<TagModel>,
}

#[derive(Serialize)]
pub(super) struct TagModel {
    pub(super) name: String,
    pub(super) model: String,
    pub(super) modified_at: String,
    pub(super) size: u64,
    pub(super) digest: String,
    pub(super) details: Details,
}

#[derive(Serialize)]
pub(super) struct ShowResponse {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(super) parameters: String,
    pub(super) details: Details,
    pub(super) model_info: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) capabilities: Vec<&'static str>,
    pub(super) modified_at: String,
}

#[derive(Serialize)]
pub(super) struct VersionResponse<'a> {
    pub(super) version: &'a str,
}

#[derive(Serialize)]
pub(super) struct StatusLine<'a> {
    pub(super) status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(super) digest: &'a str,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) total: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) completed: u64,
}

/// A float as Go's encoder writes it: integral values without `.0`.
#[derive(Clone, Copy)]
pub(super) struct GoFloat(pub(super) f32);

impl Serialize for GoFloat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f32(self.0)
        }
    }
}

pub(super) fn go_floats(v: Vec<f32>) -> Vec<GoFloat> {
    v.into_iter().map(GoFloat).collect()
}

#[derive(Serialize)]
pub(super) struct EmbedResponse<'a> {
    pub(super) model: &'a str,
    pub(super) embeddings: Vec<Vec<GoFloat>>,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) total_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(super) load_duration: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub(super) prompt_eval_count: u32,
}

#[derive(Serialize)]
pub(super) struct LegacyEmbedding {
    pub(super) embedding: Vec<GoFloat>,
}

/// The OpenAI `usage` object, the same in both providers.
pub(super) use crate::common::Usage;

#[derive(Serialize)]
pub(super) struct OaiChatCompletion<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) system_fingerprint: &'static str,
    pub(super) choices: Vec<OaiChoice<'a>>,
    pub(super) usage: Usage,
}

#[derive(Serialize)]
pub(super) struct OaiChoice<'a> {
    pub(super) index: u32,
    pub(super) message: OutMessage<'a>,
    pub(super) finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct OaiChatChunk<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) system_fingerprint: &'static str,
    pub(super) choices: Vec<OaiChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(super) struct OaiChunkChoice<'a> {
    pub(super) index: u32,
    pub(super) delta: OaiDelta<'a>,
    pub(super) finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct OaiDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) content: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct OaiCompletion<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) system_fingerprint: &'static str,
    pub(super) choices: Vec<OaiTextChoice<'a>>,
    pub(super) usage: Usage,
}

#[derive(Serialize)]
pub(super) struct OaiCompletionChunk<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) choices: Vec<OaiTextChoice<'a>>,
    pub(super) model: &'a str,
    pub(super) system_fingerprint: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(super) struct OaiTextChoice<'a> {
    pub(super) text: &'a str,
    pub(super) index: u32,
    pub(super) finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct OaiModelList {
    pub(super) object: &'static str,
    pub(super) data: Option<Vec<OaiModel>>,
}

#[derive(Serialize)]
pub(super) struct OaiModel {
    pub(super) id: String,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) owned_by: String,
}

#[derive(Serialize)]
pub(super) struct OaiEmbeddingList<'a> {
    pub(super) object: &'static str,
    pub(super) data: Vec<OaiEmbedding>,
    pub(super) model: &'a str,
    pub(super) usage: OaiEmbedUsage,
}

#[derive(Serialize)]
pub(super) struct OaiEmbedding {
    pub(super) object: &'static str,
    pub(super) embedding: Vec<GoFloat>,
    pub(super) index: usize,
}

#[derive(Serialize)]
pub(super) struct OaiEmbedUsage {
    pub(super) prompt_tokens: u32,
    pub(super) total_tokens: u32,
}
