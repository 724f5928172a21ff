//! The native `/api/*` handlers other than embeddings: chat and generate (with their
//! load-only and unload forms), the catalogue and runner listings (`tags`, `ps`, `show`) and
//! model management (`copy`, `delete`, `pull`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::Value;

use super::config::{
    capabilities, digest, full_name, geometry, kv_cache_bytes, modified_at, parameter_count,
    parameters_text,
};
use super::generation::{GenRequest, Prompt};
use super::keep_alive::{parse_keep_alive, KeepAlive};
use super::render::Flavor;
use super::request::{
    check_think_and_logprobs, parse_messages, parse_object, parse_options, require_model, ApiError,
    Fields, Handled, Opts,
};
use super::wire::{
    line, ok_json, ChatResponse, Details, ErrorBody, GenerateResponse, PsModel, PsResponse,
    ShowResponse, StatusLine, TagModel, TagsResponse,
};
use super::{OllamaSim, NDJSON, TEMPLATE_OVERHEAD_TOKENS};
use crate::common::{self, Call, SimBody};
use crate::SimModel;

/// The single-object reply of a load or unload request.
fn lifecycle_reply(sim: &OllamaSim, label: &str, chat: bool, reason: &str) -> Response<SimBody> {
    let created_at = sim.created_at();
    if chat {
        ok_json(&ChatResponse::new(
            label,
            created_at,
            "",
            Some(reason),
            None,
        ))
    } else {
        ok_json(&GenerateResponse::new(
            label,
            created_at,
            "",
            Some(reason),
            None,
            None,
        ))
    }
}

/// Load-only and unload requests (docs/providers.md §1.8): a single object whatever `stream` says.
async fn load_or_unload(
    sim: &Arc<OllamaSim>,
    model: &SimModel,
    label: &str,
    keep_alive: Option<KeepAlive>,
    opts: &Opts,
    chat: bool,
) -> Handled {
    if keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        sim.expire_runner(&model.name);
        return Ok(lifecycle_reply(sim, label, chat, "unload"));
    }
    let num_ctx = sim.effective_num_ctx(model, opts.num_ctx);
    let num_batch = sim.effective_num_batch(opts.num_batch);
    let acquired = sim.acquire(model, num_ctx, num_batch, keep_alive).await?;
    drop(acquired.lease);
    Ok(lifecycle_reply(sim, label, chat, "load"))
}

pub(super) async fn chat(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.ChatRequest")?;
    let f = Fields::new(&map, "ChatRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let stream = f.bool("stream")?.unwrap_or(true);
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let messages = parse_messages(map.get("messages"), "ChatRequest")?;
    let opts = parse_options(map.get("options"))?;
    let model = require_model(sim, &label)?;
    if messages.is_empty() && keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        return load_or_unload(sim, &model, &label, keep_alive, &opts, true).await;
    }
    if model.embedding {
        return Err(ApiError::unsupported(&label, "chat"));
    }
    check_think_and_logprobs(&f, &label)?;
    if messages.is_empty() {
        return load_or_unload(sim, &model, &label, keep_alive, &opts, true).await;
    }
    let req = GenRequest {
        label,
        model,
        opts,
        keep_alive,
        prompt: Prompt::Chat(messages),
        truncate,
        seed: super::request::reply_seed(&map),
        context_prompt: None,
    };
    sim.generate(req, Flavor::Chat, stream).await
}

pub(super) async fn generate(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.GenerateRequest")?;
    let f = Fields::new(&map, "GenerateRequest");
    let label = f.str("model")?.unwrap_or("").to_string();
    let prompt = f.str("prompt")?.unwrap_or("").to_string();
    let system = f.str("system")?.unwrap_or("");
    let template = f.str("template")?.unwrap_or("");
    let raw = f.bool("raw")?.unwrap_or(false);
    let stream = f.bool("stream")?.unwrap_or(true);
    let truncate = f.bool("truncate")?.unwrap_or(true);
    let keep_alive = parse_keep_alive(map.get("keep_alive"))?;
    let opts = parse_options(map.get("options"))?;
    let has_context = map
        .get("context")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    // Ollama's GenerateHandler answers an empty model as an unknown one (its
    // `parseAndValidateModelRef` fails → 404 `model '' not found`, server/routes.go), unlike
    // chat's 400 `model is required`; its own test asserts it (server/routes_generate_test.go,
    // TestGenerate "missing model").
    if label.is_empty() {
        return Err(ApiError::not_found(""));
    }
    if raw && (!template.is_empty() || !system.is_empty() || has_context) {
        return Err(ApiError::bad(
            "raw mode does not support template, system, or context",
        ));
    }
    let model = sim
        .lookup(&label)
        .ok_or_else(|| ApiError::not_found(&label))?;
    if prompt.is_empty() && keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        return load_or_unload(sim, &model, &label, keep_alive, &opts, false).await;
    }
    if model.embedding {
        return Err(ApiError::unsupported(&label, "generate"));
    }
    check_think_and_logprobs(&f, &label)?;
    if prompt.is_empty() {
        return load_or_unload(sim, &model, &label, keep_alive, &opts, false).await;
    }
    let overhead = if raw { 0 } else { TEMPLATE_OVERHEAD_TOKENS };
    let tokens = common::count_tokens(system) + common::count_tokens(&prompt) + overhead;
    let req = GenRequest {
        label,
        model,
        opts,
        keep_alive,
        prompt: Prompt::Text(tokens),
        truncate,
        seed: super::request::reply_seed(&map),
        context_prompt: (!raw).then_some(prompt),
    };
    sim.generate(req, Flavor::Generate, stream).await
}

pub(super) fn ps(sim: &OllamaSim) -> Response<SimBody> {
    let now = sim.clock.now();
    let st = sim.fresh();
    let mut rows: Vec<(SystemTime, PsModel)> = st
        .runners
        .iter()
        .map(|(name, r)| {
            let expires = r.expires_at(now);
            let size = r.model.size_bytes + kv_cache_bytes(&r.model, r.num_ctx, &sim.cfg);
            (
                expires,
                PsModel {
                    name: name.clone(),
                    model: name.clone(),
                    size,
                    digest: digest(name),
                    details: Details::of(&r.model),
                    expires_at: sim.local_time(expires),
                    size_vram: size,
                    context_length: r.num_ctx,
                },
            )
        })
        .collect();
    drop(st);
    rows.sort_by_key(|row| std::cmp::Reverse(row.0));
    ok_json(&PsResponse {
        models: rows.into_iter().map(|(_, m)| m).collect(),
    })
}

pub(super) fn tags(sim: &OllamaSim) -> Response<SimBody> {
    let catalogue = sim.lock().catalogue.clone();
    ok_json(&TagsResponse {
        models: catalogue
            .iter()
            .map(|m| TagModel {
                name: m.name.clone(),
                model: m.name.clone(),
                modified_at: sim.local_time(modified_at(&m.name)),
                size: m.size_bytes,
                digest: digest(&m.name),
                details: Details::of(m),
            })
            .collect(),
    })
}

pub(super) fn show(sim: &OllamaSim, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.ShowRequest")?;
    let label = Fields::new(&map, "ShowRequest").model()?;
    let m = require_model(sim, label)?;
    let g = geometry(&m);
    let arch = m.arch.as_str();
    let mut info: BTreeMap<String, Value> = BTreeMap::new();
    info.insert("general.architecture".into(), Value::from(arch));
    info.insert(
        "general.parameter_count".into(),
        Value::from(parameter_count(&m.parameter_size)),
    );
    info.insert(
        format!("{arch}.context_length"),
        Value::from(m.context_length),
    );
    info.insert(format!("{arch}.block_count"), Value::from(g.blocks));
    info.insert(format!("{arch}.attention.head_count"), Value::from(g.heads));
    info.insert(
        format!("{arch}.attention.head_count_kv"),
        Value::from(g.kv_heads),
    );
    info.insert(format!("{arch}.embedding_length"), Value::from(g.embd));
    // Llama 3's GGUF files carry their vocabulary size; Qwen 2.5's (as Ollama shows them) do
    // not, so the proxy's estimate meets both.
    if arch == "llama" {
        info.insert(format!("{arch}.vocab_size"), Value::from(128_256));
    }
    Ok(ok_json(&ShowResponse {
        parameters: parameters_text(&m),
        details: Details::of(&m),
        model_info: info,
        capabilities: capabilities(&m),
        modified_at: sim.local_time(modified_at(&m.name)),
    }))
}

pub(super) fn copy(sim: &OllamaSim, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.CopyRequest")?;
    let f = Fields::new(&map, "CopyRequest");
    let source = f.str("source")?.unwrap_or("");
    let destination = f.str("destination")?.unwrap_or("");
    if source.is_empty() || destination.is_empty() {
        return Err(ApiError::bad("source and destination are required"));
    }
    let mut st = sim.lock();
    let mut m = st
        .lookup(source)
        .ok_or_else(|| ApiError::not_found(source))?;
    m.name = full_name(destination);
    st.catalogue.retain(|c| c.name != m.name);
    st.catalogue.push(m);
    Ok(common::respond(StatusCode::OK, "", Bytes::new()))
}

pub(super) fn delete(sim: &OllamaSim, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.DeleteRequest")?;
    let label = Fields::new(&map, "DeleteRequest").model()?;
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let full = full_name(label);
    {
        let mut st = sim.lock();
        if st.lookup(label).is_none() {
            return Err(ApiError::not_found(label));
        }
        st.catalogue.retain(|m| m.name != full);
        st.runners.remove(&full);
    }
    sim.changed.notify_waiters();
    Ok(common::respond(StatusCode::OK, "", Bytes::new()))
}

pub(super) fn pull(sim: &OllamaSim, call: &Call) -> Handled {
    let map = parse_object(&call.body, "api.PullRequest")?;
    let f = Fields::new(&map, "PullRequest");
    let label = f.model()?;
    let stream = f.bool("stream")?.unwrap_or(true);
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let status = |status: &'static str| StatusLine {
        status,
        digest: "",
        total: 0,
        completed: 0,
    };
    let Some(m) = sim.lookup(label) else {
        const MISSING: &str = "pull model manifest: file does not exist";
        if !stream {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, MISSING));
        }
        let mut body = line(common::go_json(&status("pulling manifest"))).to_vec();
        body.extend_from_slice(&line(common::go_json(&ErrorBody { error: MISSING })));
        return Ok(common::respond(StatusCode::OK, NDJSON, body));
    };
    if !stream {
        return Ok(ok_json(&status("success")));
    }
    let d = digest(&m.name);
    let layer = format!("pulling {}", &d[..12]);
    let layer_digest = format!("sha256:{d}");
    let mut body = Vec::new();
    for l in [
        status("pulling manifest"),
        StatusLine {
            status: &layer,
            digest: &layer_digest,
            total: m.size_bytes,
            completed: m.size_bytes,
        },
        status("verifying sha256 digest"),
        status("writing manifest"),
        status("success"),
    ] {
        body.extend_from_slice(&line(common::go_json(&l)));
    }
    Ok(common::respond(StatusCode::OK, NDJSON, body))
}
