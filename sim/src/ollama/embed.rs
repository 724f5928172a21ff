//! Embeddings: `/api/embed` and the legacy `/api/embeddings`, and the core that
//! `/v1/embeddings` shares (schedule the model, count and cap tokens, embed each input).

use std::sync::Arc;

use serde_json::Value;

use super::keep_alive::{parse_keep_alive, KeepAlive};
use super::request::{
    go_kind, parse_object, parse_options, require_model, ApiError, Fields, Handled, Opts,
};
use super::wire::{go_floats, ok_json, EmbedResponse, GoFloat, LegacyEmbedding};
use super::{OllamaSim, OVERHEAD_NS, PROMPT_NS_PER_TOKEN};
use crate::common::{self, Call};
use crate::SimModel;

/// `input` of the embed routes: a string or an array of strings.
pub(super) fn embed_inputs(v: Option<&Value>, ty: &str) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::bad(format!(
                    "invalid input type: {}",
                    go_kind(other)
                ))),
            })
            .collect(),
        Some(other) => Err(ApiError::bad(format!(
            "json: cannot unmarshal {} into Go struct field {ty}.input of type string",
            go_kind(other)
        ))),
    }
}

/// What the embedding core produced.
pub(super) struct Embedded {
    pub(super) vectors: Vec<Vec<GoFloat>>,
    pub(super) tokens: u32,
    load_ns: u64,
}

/// Shared embedding core: schedules the model and embeds every input.
pub(super) async fn embed_core(
    sim: &Arc<OllamaSim>,
    model: &SimModel,
    inputs: &[String],
    keep_alive: Option<KeepAlive>,
    opts: &Opts,
    truncate: bool,
    dimensions: Option<i64>,
) -> Result<Embedded, ApiError> {
    let num_ctx = sim.effective_num_ctx(model, opts.num_ctx);
    let num_batch = sim.effective_num_batch(opts.num_batch);
    let acquired = sim.acquire(model, num_ctx, num_batch, keep_alive).await?;
    let mut tokens = 0;
    let mut vectors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let n = common::count_tokens(input);
        if n > num_ctx && !truncate {
            return Err(ApiError::bad("the input length exceeds the context length"));
        }
        tokens += n.min(num_ctx);
        let mut v = common::embedding(input, sim.cfg.embedding_dims);
        if let Some(d) = dimensions.filter(|d| *d > 0) {
            v.truncate(d as usize);
        }
        vectors.push(go_floats(v));
    }
    drop(acquired.lease);
    Ok(Embedded {
        vectors,
        tokens,
        load_ns: acquired.load_ns,
    })
}

pub(super) async fn embed(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.EmbedRequest")?;
    let f = Fields::new(&map, "EmbedRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let dimensions = f.int("dimensions")?;
    let opts = parse_options(map.get("options"))?;
    // Ollama's EmbedHandler checks the model before the input, and an empty one is 404
    // `model '' not found` (server/routes.go), like generate's; embeddings' is 400.
    if label.is_empty() {
        return Err(ApiError::not_found(""));
    }
    let inputs = embed_inputs(map.get("input"), "EmbedRequest")?;
    let model = require_model(sim, &label)?;
    let e = embed_core(
        sim, &model, &inputs, keep_alive, &opts, truncate, dimensions,
    )
    .await?;
    let prompt_ns = u64::from(e.tokens) * PROMPT_NS_PER_TOKEN;
    let body = if inputs.is_empty() {
        EmbedResponse {
            model: &label,
            embeddings: Vec::new(),
            total_duration: 0,
            load_duration: 0,
            prompt_eval_count: 0,
        }
    } else {
        EmbedResponse {
            model: &label,
            embeddings: e.vectors,
            total_duration: e.load_ns + prompt_ns + OVERHEAD_NS,
            load_duration: e.load_ns,
            prompt_eval_count: e.tokens,
        }
    };
    Ok(ok_json(&body))
}

pub(super) async fn embeddings_legacy(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.EmbeddingRequest")?;
    let f = Fields::new(&map, "EmbeddingRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let prompt = f.str("prompt")?.unwrap_or("").to_string();
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let opts = parse_options(map.get("options"))?;
    let model = require_model(sim, &label)?;
    let inputs: Vec<String> = if prompt.is_empty() {
        Vec::new()
    } else {
        vec![prompt]
    };
    let e = embed_core(sim, &model, &inputs, keep_alive, &opts, true, None).await?;
    Ok(ok_json(&LegacyEmbedding {
        embedding: e.vectors.into_iter().next().unwrap_or_default(),
    }))
}
