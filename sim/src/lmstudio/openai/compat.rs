//! `/v1/responses` (OpenAI Responses API, LM Studio 0.3.29+) and `/v1/messages` (Anthropic
//! Messages API, LM Studio 0.4), over the same generation as chat completions.
//!
//! LM Studio documents both endpoints (lmstudio.ai/docs/developer/openai-compat,
//! /docs/developer/anthropic-compat; the feature table of /docs/api/rest-api) but not their
//! exact bytes, and its server is closed source: the bodies and events follow the two APIs'
//! own references (OpenAI: `response.created` ... `response.output_text.delta` ...
//! `response.completed` with `usage.input_tokens` / `output_tokens`; Anthropic:
//! `message_start` (`usage.input_tokens`), `content_block_*`, `message_delta`
//! (`usage.output_tokens`), `message_stop`). Errors: the OpenAI shape on `/v1/responses`,
//! LM Studio's native `{"error":{"type","message"}}` on `/v1/messages`.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use super::super::request::{content_text, is_stream, message_tokens, Api, Fail};
use super::super::wire::json as json_response;
use super::super::{Handled, LmStudioSim};
use crate::common::{alnum_id, Call};

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The conversation with `system_key`'s text first, as chat messages.
fn conversation(system: Option<&Value>, items: Vec<Value>) -> Vec<Value> {
    let mut msgs = Vec::with_capacity(items.len() + 1);
    let system = content_text(system);
    if !system.is_empty() {
        msgs.push(json!({"role": "system", "content": system}));
    }
    msgs.extend(items);
    msgs
}

impl LmStudioSim {
    pub(in crate::lmstudio) async fn messages(self: &Arc<Self>, call: &Call) -> Handled {
        let api = Api::Native;
        let req = self
            .openai_request(call, api)
            .map_err(|f| f.response(api))?;
        let items = match req.body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => m.clone(),
            _ => {
                return Err(Fail::BadRequest(
                    "'messages' is required and must be a non-empty array.".to_string(),
                    Some("messages"),
                )
                .response(api))
            }
        };
        let prompt = message_tokens(&conversation(req.body.get("system"), items));
        let g = self.prepare(req, prompt, "msg", &["max_tokens"]).await?;
        let stop = if g.capped { "max_tokens" } else { "end_turn" };
        let (input, output) = (g.prompt, g.n);
        if !is_stream(&g.req.body) {
            self.generate(&g.r.instance, g.n).await;
            self.touch(&g.r.instance);
            let body = json!({
                "id": g.id, "type": "message", "role": "assistant", "model": g.r.instance,
                "content": [{"type": "text", "text": g.pieces.concat()}],
                "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": output},
            });
            return Ok(json_response(http::StatusCode::OK, &body));
        }
        let mut tokens: Vec<Bytes> = g
            .pieces
            .iter()
            .map(|p| {
                event(
                    "content_block_delta",
                    &json!({
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": p},
                    }),
                )
            })
            .collect();
        let head = [
            event(
                "message_start",
                &json!({
                    "type": "message_start",
                    "message": {"id": g.id, "type": "message", "role": "assistant",
                        "model": g.r.instance, "content": [], "stop_reason": null,
                        "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 0}},
                }),
            ),
            event(
                "content_block_start",
                &json!({
                    "type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }),
            ),
        ];
        // The opening events go with the first token (the pump paces tokens only).
        let first = tokens.first().cloned().unwrap_or_default();
        let opened: Vec<u8> = head
            .iter()
            .flat_map(|b| b.to_vec())
            .chain(first.to_vec())
            .collect();
        if tokens.is_empty() {
            tokens.push(Bytes::from(opened));
        } else {
            tokens[0] = Bytes::from(opened);
        }
        let tail = vec![
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            event(
                "message_delta",
                &json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": null},
                    "usage": {"output_tokens": output},
                }),
            ),
            event("message_stop", &json!({"type": "message_stop"})),
        ];
        let error = event(
            "error",
            &json!({
                "type": "error",
                "error": {"type": "api_error", "message": super::super::generate::SIMULATED_FAILURE},
            }),
        );
        Ok(self.spawn_stream(g, tokens, tail, error))
    }

    pub(in crate::lmstudio) async fn responses(self: &Arc<Self>, call: &Call) -> Handled {
        let api = Api::OpenAi;
        let req = self
            .openai_request(call, api)
            .map_err(|f| f.response(api))?;
        let items = match req.body.get("input") {
            Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
            Some(Value::Array(items)) if !items.is_empty() => items.clone(),
            _ => {
                return Err(
                    Fail::BadRequest("'input' is required.".to_string(), Some("input"))
                        .response(api),
                )
            }
        };
        let prompt = message_tokens(&conversation(req.body.get("instructions"), items));
        let g = self
            .prepare(req, prompt, "resp", &["max_output_tokens"])
            .await?;
        let item = format!("msg_{}", alnum_id(g.req.seed ^ 7, 21));
        let (input, output) = (g.prompt, g.n as u32);
        let usage = json!({
            "input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input + output,
        });
        let text = g.pieces.concat();
        let message = |status: &str, text: Option<&str>| {
            json!({
                "id": item, "type": "message", "status": status, "role": "assistant",
                "content": text.map_or(json!([]), |t| json!([{"type": "output_text", "text": t, "annotations": []}])),
            })
        };
        let response = |status: &str, output: Value, usage: Value| {
            json!({
                "id": g.id, "object": "response", "created_at": g.created, "status": status,
                "model": g.r.instance, "output": output, "previous_response_id": null,
                "usage": usage,
            })
        };
        if !is_stream(&g.req.body) {
            self.generate(&g.r.instance, g.n).await;
            self.touch(&g.r.instance);
            let body = response(
                "completed",
                json!([message("completed", Some(&text))]),
                usage,
            );
            return Ok(json_response(http::StatusCode::OK, &body));
        }
        let mut seq = 0u32;
        let mut next = || {
            seq += 1;
            seq - 1
        };
        let mut head = Vec::new();
        for (name, mut data) in [
            (
                "response.created",
                json!({"response": response("in_progress", json!([]), Value::Null)}),
            ),
            (
                "response.in_progress",
                json!({"response": response("in_progress", json!([]), Value::Null)}),
            ),
            (
                "response.output_item.added",
                json!({"output_index": 0, "item": message("in_progress", None)}),
            ),
            (
                "response.content_part.added",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
            ),
        ] {
            data["type"] = json!(name);
            data["sequence_number"] = json!(next());
            head.extend_from_slice(&event(name, &data));
        }
        let mut tokens: Vec<Bytes> = g
            .pieces
            .iter()
            .map(|p| {
                event(
                    "response.output_text.delta",
                    &json!({
                        "type": "response.output_text.delta", "sequence_number": next(),
                        "item_id": item, "output_index": 0, "content_index": 0, "delta": p,
                    }),
                )
            })
            .collect();
        let first = tokens.first().cloned().unwrap_or_default();
        head.extend_from_slice(&first);
        if tokens.is_empty() {
            tokens.push(Bytes::from(head));
        } else {
            tokens[0] = Bytes::from(head);
        }
        let done = message("completed", Some(&text));
        let tail = vec![
            event(
                "response.output_text.done",
                &json!({"type": "response.output_text.done", "sequence_number": next(), "item_id": item, "output_index": 0, "content_index": 0, "text": text}),
            ),
            event(
                "response.output_item.done",
                &json!({"type": "response.output_item.done", "sequence_number": next(), "output_index": 0, "item": done}),
            ),
            event(
                "response.completed",
                &json!({"type": "response.completed", "sequence_number": next(), "response": response("completed", json!([done]), usage)}),
            ),
        ];
        let error = event(
            "error",
            &json!({"type": "error", "code": null, "message": super::super::generate::SIMULATED_FAILURE, "param": null, "sequence_number": 0}),
        );
        Ok(self.spawn_stream(g, tokens, tail, error))
    }
}
