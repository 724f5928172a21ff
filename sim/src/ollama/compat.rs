//! The Anthropic Messages API (`/v1/messages`) and the OpenAI Responses API (`/v1/responses`),
//! as Ollama serves them: its `middleware` package translates each to a chat request for
//! `ChatHandler` and the chat answer back (`middleware/anthropic.go`
//! `AnthropicMessagesMiddleware`, `AnthropicWriter`; `middleware/openai.go`
//! `ResponsesMiddleware`, `ResponsesWriter`; the shapes in `anthropic/anthropic.go` and
//! `openai/responses.go`). Both stream as SSE with `event:` lines.
//!
//! Usage as Ollama writes it: Messages `usage.input_tokens` / `output_tokens` from the chat's
//! `prompt_eval_count` / `eval_count`; streamed, `message_start` carries the prompt count of the
//! first chunk or, as that has none, `EstimateInputTokens`, and `message_delta` the final
//! counts (`StreamConverter.Process`). Responses: `usage` in the body, and streamed only in
//! `response.completed` (`ResponsesStreamConverter.processCompletion`; `response.created`
//! has `usage: null`).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{json, Map, Value};

use super::generation::{Gen, GenRequest, Prompt};
use super::render::Flavor;
use super::request::{
    parse_messages, parse_object, require_model, ApiError, ChatMsg, Handled, Opts,
};
use super::{OllamaSim, OAI_JSON};
use crate::common::{self, Call, SimBody};

/// Anthropic's error body, typed by status (`anthropic.NewError`).
pub(super) fn anthropic_error(e: &ApiError) -> Response<SimBody> {
    let ty = match e.status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({
        "type": "error",
        "error": {"type": ty, "message": e.message},
        "request_id": format!("req_{:024x}", common::hash_bytes(e.message.as_bytes()) as u128),
    });
    // `json.NewEncoder(...).Encode`: a trailing newline.
    let mut bytes = common::go_json(&body);
    bytes.push(b'\n');
    common::respond(e.status, OAI_JSON, bytes)
}

/// Text of a `system` / `instructions` / `content` value: a string, or the `text` of its
/// blocks.
fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// `AnthropicMessagesMiddleware`: model, positive `max_tokens` and `messages` required (400s
/// in Anthropic's shape), `system` first, then `ChatHandler`.
pub(super) async fn messages(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = parse_object(&call.body, "anthropic.MessagesRequest")?;
    let label = map.get("model").and_then(Value::as_str).unwrap_or("");
    if label.is_empty() {
        return Err(ApiError::bad("model is required"));
    }
    let max_tokens = map.get("max_tokens").and_then(Value::as_i64).unwrap_or(0);
    if max_tokens <= 0 {
        return Err(ApiError::bad("max_tokens is required and must be positive"));
    }
    let mut msgs = parse_messages(map.get("messages"), "MessagesRequest")?;
    if msgs.is_empty() {
        return Err(ApiError::bad("messages is required"));
    }
    let system = text_of(map.get("system"));
    if !system.is_empty() {
        msgs.insert(0, ChatMsg::text("system", system));
    }
    let stream = map.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // `EstimateInputTokens`: what `message_start` says before the runner has counted.
    let estimate = msgs.iter().map(ChatMsg::tokens).sum::<u32>();
    let seed = super::request::reply_seed(&map);
    let flavor = Flavor::Messages {
        id: format!("msg_{:024x}", seed as u128),
        estimate,
    };
    run(sim, &map, label, msgs, Some(max_tokens), flavor, stream).await
}

/// `ResponsesMiddleware`: `instructions` as the system message, `input` a string (one user
/// message) or items (`role` + `content` of `input_text` parts), `max_output_tokens` as
/// `num_predict`.
pub(super) async fn responses(sim: &Arc<OllamaSim>, call: &Call) -> Handled {
    let map = parse_object(&call.body, "openai.ResponsesRequest")?;
    let label = map
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut msgs = match map.get("input") {
        Some(Value::String(s)) => vec![ChatMsg::text("user", s.clone())],
        other => parse_messages(other, "ResponsesRequest")?,
    };
    let instructions = text_of(map.get("instructions"));
    if !instructions.is_empty() {
        msgs.insert(0, ChatMsg::text("system", instructions));
    }
    let stream = map.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max = map.get("max_output_tokens").and_then(Value::as_i64);
    let seed = super::request::reply_seed(&map);
    let flavor = Flavor::Responses {
        id: format!("resp_{:06}", seed % 1_000_000),
        item: format!("msg_{:06}", seed % 999_983),
        created: sim.clock.unix_secs(),
        instructions: map
            .get("instructions")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    run(sim, &map, &label, msgs, max, flavor, stream).await
}

async fn run(
    sim: &Arc<OllamaSim>,
    map: &Map<String, Value>,
    label: &str,
    msgs: Vec<ChatMsg>,
    max: Option<i64>,
    flavor: Flavor,
    stream: bool,
) -> Handled {
    let model = require_model(sim, label)?;
    if model.embedding {
        return Err(ApiError::unsupported(label, "chat"));
    }
    let req = GenRequest {
        label: label.to_string(),
        model,
        opts: Opts {
            num_predict: max,
            ..Opts::default()
        },
        keep_alive: None,
        prompt: Prompt::Chat(msgs),
        truncate: true,
        seed: super::request::reply_seed(map),
        context_prompt: None,
    };
    sim.generate(req, flavor, stream).await
}

/// One SSE event with its `event:` line (`writeEvent`).
fn event(name: &str, data: &Value) -> Bytes {
    let mut out = format!("event: {name}\ndata: ").into_bytes();
    out.extend_from_slice(&common::go_json(data));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// `mapStopReason`.
fn stop_reason(done_reason: &str) -> &'static str {
    match done_reason {
        "stop" => "end_turn",
        "length" => "max_tokens",
        "" => "",
        _ => "stop_sequence",
    }
}

fn response_object(
    flavor: &Flavor,
    model: &str,
    status: &str,
    output: Value,
    usage: Value,
) -> Value {
    let Flavor::Responses {
        id,
        created,
        instructions,
        ..
    } = flavor
    else {
        return Value::Null;
    };
    json!({
        "id": id, "object": "response", "created_at": created,
        "completed_at": if status == "completed" { json!(created) } else { Value::Null },
        "status": status, "incomplete_details": null, "model": model,
        "previous_response_id": null, "instructions": instructions, "output": output,
        "error": null, "tools": [], "tool_choice": "auto", "truncation": "disabled",
        "parallel_tool_calls": true, "text": {"format": {"type": "text"}}, "top_p": 1.0,
        "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
        "temperature": 1.0, "reasoning": null, "usage": usage, "max_output_tokens": null,
        "max_tool_calls": null, "store": false, "background": false,
        "service_tier": "default", "metadata": {}, "safety_identifier": null,
        "prompt_cache_key": null,
    })
}

fn message_item(item: &str, status: &str, text: &str) -> Value {
    json!({
        "id": item, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

fn responses_usage(prompt: u32, reply: u32) -> Value {
    json!({
        "input_tokens": prompt, "output_tokens": reply, "total_tokens": prompt + reply,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    })
}

/// The events for token `i` (the first brings the opening events).
pub(super) fn chunk(flavor: &Flavor, model: &str, i: usize, piece: &str) -> Bytes {
    let mut out = Vec::new();
    match flavor {
        Flavor::Messages { id, estimate } => {
            if i == 0 {
                out.extend_from_slice(&event("message_start", &json!({
                    "type": "message_start",
                    "message": {"id": id, "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": estimate, "output_tokens": 0}},
                })));
                out.extend_from_slice(&event(
                    "content_block_start",
                    &json!({
                        "type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    }),
                ));
            }
            out.extend_from_slice(&event(
                "content_block_delta",
                &json!({
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                }),
            ));
        }
        Flavor::Responses { item, .. } => {
            // Sequence numbers: created 0, in_progress 1, item added 2, part added 3, then
            // one per delta.
            if i == 0 {
                let resp = response_object(flavor, model, "in_progress", json!([]), Value::Null);
                out.extend_from_slice(&event(
                    "response.created",
                    &json!({
                        "type": "response.created", "sequence_number": 0, "response": resp,
                    }),
                ));
                out.extend_from_slice(&event(
                    "response.in_progress",
                    &json!({
                        "type": "response.in_progress", "sequence_number": 1, "response": resp,
                    }),
                ));
                out.extend_from_slice(&event(
                    "response.output_item.added",
                    &json!({
                        "type": "response.output_item.added", "sequence_number": 2,
                        "output_index": 0,
                        "item": {"id": item, "type": "message", "status": "in_progress",
                            "role": "assistant", "content": []},
                    }),
                ));
                out.extend_from_slice(&event("response.content_part.added", &json!({
                    "type": "response.content_part.added", "sequence_number": 3,
                    "item_id": item, "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                })));
            }
            out.extend_from_slice(&event(
                "response.output_text.delta",
                &json!({
                    "type": "response.output_text.delta", "sequence_number": 4 + i,
                    "item_id": item, "output_index": 0, "content_index": 0, "delta": piece,
                    "logprobs": [],
                }),
            ));
        }
        _ => {}
    }
    Bytes::from(out)
}

/// The events after the last token, with the runner's counts.
pub(super) fn finals(flavor: &Flavor, gen: &Gen, prompt: u32, reply: u32) -> Vec<Bytes> {
    let model = gen.label.as_str();
    let text = gen.text();
    match flavor {
        Flavor::Messages { .. } => vec![
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            event(
                "message_delta",
                &json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason(gen.done_reason), "stop_sequence": null},
                    "usage": {"input_tokens": prompt, "output_tokens": reply},
                }),
            ),
            event("message_stop", &json!({"type": "message_stop"})),
        ],
        Flavor::Responses { item, .. } => {
            let seq = 4 + reply as usize;
            let done = message_item(item, "completed", &text);
            vec![
                event(
                    "response.output_text.done",
                    &json!({
                        "type": "response.output_text.done", "sequence_number": seq,
                        "item_id": item, "output_index": 0, "content_index": 0, "text": text,
                        "logprobs": [],
                    }),
                ),
                event(
                    "response.content_part.done",
                    &json!({
                        "type": "response.content_part.done", "sequence_number": seq + 1,
                        "item_id": item, "output_index": 0, "content_index": 0,
                        "part": done["content"][0],
                    }),
                ),
                event(
                    "response.output_item.done",
                    &json!({
                        "type": "response.output_item.done", "sequence_number": seq + 2,
                        "output_index": 0, "item": done,
                    }),
                ),
                event(
                    "response.completed",
                    &json!({
                        "type": "response.completed", "sequence_number": seq + 3,
                        "response": response_object(flavor, model, "completed", json!([done]),
                            responses_usage(prompt, reply)),
                    }),
                ),
            ]
        }
        _ => Vec::new(),
    }
}

/// The non-streamed body (`ToMessagesResponse`, `ToResponse`).
pub(super) fn whole(flavor: &Flavor, gen: &Gen, prompt: u32, reply: u32) -> Vec<u8> {
    let model = gen.label.as_str();
    let text = gen.text();
    let body = match flavor {
        Flavor::Messages { id, .. } => json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason(gen.done_reason), "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": reply},
        }),
        Flavor::Responses { item, .. } => response_object(
            flavor,
            model,
            "completed",
            json!([message_item(item, "completed", &text)]),
            responses_usage(prompt, reply),
        ),
        _ => Value::Null,
    };
    let mut out = common::go_json(&body);
    out.push(b'\n');
    out
}

/// The event a stream ends with when the runner fails (`writeError` mid-stream: Anthropic's
/// `error` event; the Responses writer's `error` event).
pub(super) fn stream_error(flavor: &Flavor, message: &str) -> Bytes {
    match flavor {
        Flavor::Messages { .. } => event(
            "error",
            &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
        ),
        _ => event(
            "error",
            &json!({"type": "error", "code": null, "message": message, "param": null, "sequence_number": 0}),
        ),
    }
}
