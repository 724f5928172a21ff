//! The OpenAI-compatible `/v1` layer: chat completions, completions, embeddings and the
//! model list, over the same scheduler and generation as the native routes. Decode errors
//! are the middleware's raw texts; error bodies take the OpenAI shape (see `routes`).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http::Response;
use serde_json::{Map, Value};

use super::config::{modified_at, owner};
use super::embed::{embed_core, embed_inputs};
use super::generation::{GenRequest, Prompt};
use super::render::Flavor;
use super::request::{
    go_kind, parse_messages, parse_object, require_model, ApiError, Fields, Handled, Opts,
};
use super::wire::{
    oai_json, OaiEmbedUsage, OaiEmbedding, OaiEmbeddingList, OaiModel, OaiModelList,
};
use super::{OllamaSim, TEMPLATE_OVERHEAD_TOKENS};
use crate::common::{self, Call, SimBody};
use crate::SimModel;

/// `stream_options.include_usage`.
fn include_usage(map: &Map<String, Value>) -> bool {
    map.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn oai_opts(f: &Fields<'_>) -> Result<Opts, ApiError> {
    Ok(Opts {
        num_predict: f.int("max_tokens")?,
        ..Opts::default()
    })
}

/// `/v1` decode errors: the middleware reports the raw decoder text (`EOF` for no body).
fn oai_parse(body: &[u8], ty: &str) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("EOF"));
    }
    parse_object(body, ty)
}

pub(super) async fn chat(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = oai_parse(&call.body, "openai.ChatCompletionRequest")?;
    let f = Fields::new(&map, "ChatCompletionRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let stream = f.bool("stream")?.unwrap_or(false);
    let messages = parse_messages(map.get("messages"), "ChatCompletionRequest")?;
    if messages.is_empty() {
        return Err(ApiError::bad("[] is too short - 'messages'"));
    }
    let opts = oai_opts(&f)?;
    let model = require_model(sim, &label)?;
    if model.embedding {
        return Err(ApiError::unsupported(&label, "chat"));
    }
    let seed = super::request::reply_seed(&map);
    let flavor = Flavor::OaiChat {
        id: format!("chatcmpl-{}", seed % 999),
        created: sim.clock.unix_secs(),
        include_usage: include_usage(&map),
    };
    let req = GenRequest {
        label,
        model,
        opts,
        keep_alive: None,
        prompt: Prompt::Chat(messages),
        truncate: true,
        seed,
        context_prompt: None,
    };
    sim.generate(req, flavor, stream).await
}

pub(super) async fn completions(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = oai_parse(&call.body, "openai.CompletionRequest")?;
    let f = Fields::new(&map, "CompletionRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let stream = f.bool("stream")?.unwrap_or(false);
    let prompt = match map.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "invalid type for 'prompt' field: {}",
                go_kind(other)
            )))
        }
    };
    let opts = oai_opts(&f)?;
    let model = require_model(sim, &label)?;
    if model.embedding {
        return Err(ApiError::unsupported(&label, "generate"));
    }
    let seed = super::request::reply_seed(&map);
    let flavor = Flavor::OaiCompletion {
        id: format!("cmpl-{}", seed % 999),
        created: sim.clock.unix_secs(),
        include_usage: include_usage(&map),
    };
    let tokens = common::count_tokens(&prompt) + TEMPLATE_OVERHEAD_TOKENS;
    let req = GenRequest {
        label,
        model,
        opts,
        keep_alive: None,
        prompt: Prompt::Text(tokens),
        truncate: true,
        seed,
        context_prompt: None,
    };
    sim.generate(req, flavor, stream).await
}

pub(super) async fn embeddings(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = oai_parse(&call.body, "openai.EmbedRequest")?;
    let f = Fields::new(&map, "EmbedRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let dimensions = f.int("dimensions")?;
    let inputs = embed_inputs(map.get("input"), "EmbedRequest")?;
    if inputs.is_empty() {
        return Err(ApiError::bad("invalid input"));
    }
    let model = require_model(sim, &label)?;
    let e = embed_core(
        sim,
        &model,
        &inputs,
        None,
        &Opts::default(),
        true,
        dimensions,
    )
    .await?;
    Ok(oai_json(&OaiEmbeddingList {
        object: "list",
        data: e
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| OaiEmbedding {
                object: "embedding",
                embedding,
                index,
            })
            .collect(),
        model: &label,
        usage: OaiEmbedUsage {
            prompt_tokens: e.tokens,
            total_tokens: e.tokens,
        },
    }))
}

fn oai_model_entry(m: &SimModel, id: &str) -> OaiModel {
    OaiModel {
        id: id.to_string(),
        object: "model",
        created: modified_at(&m.name)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        owned_by: owner(&m.name),
    }
}

pub(super) fn models(sim: &OllamaSim) -> Response<SimBody> {
    let catalogue = sim.lock().catalogue.clone();
    let data: Vec<OaiModel> = catalogue
        .iter()
        .map(|m| oai_model_entry(m, &m.name))
        .collect();
    oai_json(&OaiModelList {
        object: "list",
        data: (!data.is_empty()).then_some(data),
    })
}

pub(super) fn retrieve(sim: &OllamaSim, id: &str) -> Handled {
    let m = sim.lookup(id).ok_or_else(|| ApiError::not_found(id))?;
    Ok(oai_json(&oai_model_entry(&m, id)))
}
