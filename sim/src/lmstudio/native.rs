//! LM Studio's native REST API v1 (`/api/v1/*`) beyond the model list: manual load and
//! unload of instances, and `/api/v1/chat`, answered whole or as named SSE events
//! (`chat.start`, `model_load.*`, `prompt_processing.*`, `message.*`, `chat.end`, `error`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use super::generate::{send_all, SIMULATED_FAILURE};
use super::request::{
    content_text, is_stream, max_tokens, parse_body, required_model, ttl_of, u32_of, Api, Fail,
    NativeError, NativeErrorBody,
};
use super::state::{LoadOpts, Plan, Resolved};
use super::wire::{
    json, secs, sse_response, Event, InstanceConfig, LoadResponse, OutputItem, UnloadResponse,
    V1ChatResult, V1ChatStats,
};
use super::{Handled, LmStudioSim};
use crate::common::{
    alnum_id, channel_body, count_tokens, hash_bytes, reply_pieces, Call, SimBody,
};

impl LmStudioSim {
    pub(super) async fn v1_load(self: &Arc<Self>, call: &Call) -> Handled {
        let api = Api::Native;
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let key = required_model(&body).map_err(|f| f.response(api))?;
        let Some(m) = self.cfg.models.iter().find(|m| m.name == key) else {
            return Err(Fail::ModelNotFound(key).response(api));
        };
        let ctx = self.context_for(m, u32_of(&body, "context_length"));
        let defaults = LoadOpts::default();
        let opts = LoadOpts {
            eval_batch_size: u32_of(&body, "eval_batch_size").unwrap_or(defaults.eval_batch_size),
            flash_attention: body
                .get("flash_attention")
                .and_then(Value::as_bool)
                .unwrap_or(defaults.flash_attention),
            offload_kv_cache_to_gpu: body
                .get("offload_kv_cache_to_gpu")
                .and_then(Value::as_bool)
                .unwrap_or(defaults.offload_kv_cache_to_gpu),
        };
        let echo = body
            .get("echo_load_config")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let failure = self.lock().fail_next_load.take();
        if !self.cfg.load_latency.is_zero() {
            tokio::time::sleep(self.cfg.load_latency).await;
        }
        let id = self
            .finish_load(&key, ctx, None, opts, failure)
            .map_err(|msg| Fail::LoadFailed(key.clone(), msg).response(api))?;
        Ok(json(
            StatusCode::OK,
            &LoadResponse {
                kind: if m.embedding { "embedding" } else { "llm" },
                instance_id: &id,
                load_time_seconds: secs(self.cfg.load_latency),
                status: "loaded",
                load_config: echo.then(|| InstanceConfig::of(m, ctx, opts)),
            },
        ))
    }

    pub(super) fn v1_unload(&self, call: &Call) -> Response<SimBody> {
        let api = Api::Native;
        let body = match parse_body(call) {
            Ok(b) => b,
            Err(f) => return f.response(api),
        };
        let Some(id) = body
            .get("instance_id")
            .or_else(|| body.get("model_instance_id"))
            .and_then(Value::as_str)
        else {
            return Fail::BadRequest(
                "'instance_id' is required and must be a string.".to_string(),
                Some("instance_id"),
            )
            .response(api);
        };
        let removed = {
            let mut st = self.lock();
            let before = st.instances.len();
            st.instances.retain(|i| i.id != id);
            let removed = st.instances.len() != before;
            if removed && st.busy.get(id).is_some_and(|n| *n > 0) {
                self.unloads_while_busy.fetch_add(1, Ordering::SeqCst);
            }
            removed
        };
        if !removed {
            let message = format!("No loaded model instance with id \"{id}\".");
            return json(
                StatusCode::NOT_FOUND,
                &NativeError {
                    error: NativeErrorBody {
                        kind: "model_not_found",
                        message: &message,
                    },
                },
            );
        }
        json(StatusCode::OK, &UnloadResponse { instance_id: id })
    }

    pub(super) async fn v1_chat(self: &Arc<Self>, call: &Call) -> Handled {
        let api = Api::Native;
        let body = parse_body(call).map_err(|f| f.response(api))?;
        let model = required_model(&body).map_err(|f| f.response(api))?;
        let input = match body.get("input") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .filter(|i| i.get("type").and_then(Value::as_str) != Some("image"))
                .map(|i| content_text(i.get("content")))
                .collect(),
            _ => {
                return Err(Fail::BadRequest(
                    "'input' is required and must be a string or an array.".to_string(),
                    Some("input"),
                )
                .response(api))
            }
        };
        let system = body.get("system_prompt").and_then(Value::as_str);
        let prompt_tokens = count_tokens(&input) + 4 + system.map_or(0, |s| count_tokens(s) + 4);
        self.check_kind(&model, false)
            .map_err(|f| f.response(api))?;
        let (plan, prompt) = self
            .admit(
                &model,
                ttl_of(&body),
                u32_of(&body, "context_length"),
                prompt_tokens,
            )
            .map_err(|f| f.response(api))?;
        let seed = hash_bytes(&call.body);
        let (n, _) = self.reply_len(max_tokens(&body, &["max_output_tokens"]));
        let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
        let gen = V1Gen {
            prompt,
            pieces: reply_pieces(seed, n),
            response_id: store.then(|| format!("resp_{}", alnum_id(seed.rotate_left(29), 21))),
        };

        if !is_stream(&body) {
            let r = self
                .resolve(&model, plan)
                .await
                .map_err(|f| f.response(api))?;
            self.generate(&r.instance, n).await;
            self.touch(&r.instance);
            let content = gen.pieces.concat();
            return Ok(json(StatusCode::OK, &self.v1_result(&gen, &r, &content)));
        }

        let (tx, resp_body) = channel_body();
        let fail_after = self.take_stream_failure();
        let sim = self.clone();
        tokio::spawn(async move {
            sim.v1_chat_stream(tx, model, plan, gen, fail_after).await;
        });
        Ok(sse_response(resp_body))
    }

    fn v1_result<'a>(&self, gen: &V1Gen, r: &'a Resolved, content: &'a str) -> V1ChatResult<'a> {
        V1ChatResult {
            model_instance_id: &r.instance,
            output: [OutputItem {
                kind: "message",
                content,
            }],
            stats: V1ChatStats {
                input_tokens: gen.prompt,
                total_output_tokens: gen.pieces.len() as u32,
                reasoning_output_tokens: 0,
                tokens_per_second: self.tokens_per_second(),
                time_to_first_token_seconds: secs(self.cfg.token_delay),
                model_load_time_seconds: r.load_time.map(secs),
            },
            response_id: gen.response_id.clone(),
        }
    }

    async fn v1_chat_stream(
        self: Arc<Self>,
        tx: mpsc::Sender<Bytes>,
        model: String,
        plan: Plan,
        gen: V1Gen,
        fail_after: Option<usize>,
    ) {
        let cold = matches!(plan, Plan::Wait { .. });
        let planned = plan.instance().to_string();
        let mut start = Event::new("chat.start");
        start.model_instance_id = Some(&planned);
        let mut head = vec![start.sse()];
        if cold {
            let mut ev = Event::new("model_load.start");
            ev.model_instance_id = Some(&planned);
            head.push(ev.sse());
        }
        if !send_all(&tx, head).await {
            return;
        }
        let r = match self.resolve(&model, plan).await {
            Ok(r) => r,
            Err(f) => {
                let (_, message, _, _, _, kind) = f.parts();
                let mut ev = Event::new("error");
                ev.error = Some(NativeErrorBody {
                    kind,
                    message: &message,
                });
                let _ = tx.send(ev.sse()).await;
                return;
            }
        };
        if cold {
            let mut ev = Event::new("model_load.progress");
            ev.model_instance_id = Some(&r.instance);
            ev.progress = Some(1.0);
            let mut end = Event::new("model_load.end");
            end.model_instance_id = Some(&r.instance);
            end.load_time_seconds = r.load_time.map(secs);
            if !send_all(&tx, [ev.sse(), end.sse()]).await {
                return;
            }
        }
        let mut progress = Event::new("prompt_processing.progress");
        progress.progress = Some(1.0);
        let head = [
            Event::new("prompt_processing.start").sse(),
            progress.sse(),
            Event::new("prompt_processing.end").sse(),
            Event::new("message.start").sse(),
        ];
        if !send_all(&tx, head).await {
            return;
        }
        let tokens = gen
            .pieces
            .iter()
            .map(|p| {
                let mut ev = Event::new("message.delta");
                ev.content = Some(p);
                ev.sse()
            })
            .collect();
        let content = gen.pieces.concat();
        let result = self.v1_result(&gen, &r, &content);
        let mut end = Event::new("chat.end");
        end.result = Some(&result);
        let tail = vec![Event::new("message.end").sse(), end.sse()];
        let mut error = Event::new("error");
        error.error = Some(NativeErrorBody {
            kind: "unknown",
            message: SIMULATED_FAILURE,
        });
        self.pump(&r.instance, &tx, tokens, tail, error.sse(), fail_after)
            .await;
        self.touch(&r.instance);
    }
}

/// What a `/api/v1/chat` request generates.
struct V1Gen {
    prompt: u32,
    pieces: Vec<&'static str>,
    response_id: Option<String>,
}
