//! The OpenAI-compatible generation routes, `/v1/*`, and their `/api/v0/*` twins that add
//! `stats`, `model_info` and `runtime`: chat completions, text completions and embeddings,
//! answered whole or as a `data:` chunk stream that ends in `data: [DONE]`.

/// `/v1/responses` and `/v1/messages`.
mod compat;

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value};

use super::generate::SIMULATED_FAILURE;
use super::request::{
    include_usage, is_stream, max_tokens, message_tokens, parse_body, required_model, ttl_of, Api,
    Fail, OaiError, OaiErrorBody,
};
use super::state::Resolved;
use super::wire::{
    json, secs, sse_data, sse_response, ChatChoice, ChatMessage, Chunk, Completion, Delta,
    DeltaChoice, EmbeddingItem, EmbeddingList, EmbeddingUsage, Empty, ModelInfo, RuntimeInfo,
    StatsField, TextChoice, Usage, V0Stats, RUNTIME,
};
use super::{Handled, LmStudioSim};
use crate::common::{
    alnum_id, channel_body, count_tokens, embedding, hash_bytes, reply_pieces, Call, SimBody,
};

/// A parsed `/v1` or `/api/v0` request: its error shape, body, serving model and reply seed.
struct OaiRequest {
    api: Api,
    body: Map<String, Value>,
    model: String,
    seed: u64,
}

/// A chat or text completion whose model is loaded: what it generates, and the fields every
/// body and chunk of it repeats.
struct OaiGen {
    req: OaiRequest,
    r: Resolved,
    id: String,
    created: u64,
    prompt: u32,
    n: usize,
    capped: bool,
    pieces: Vec<&'static str>,
}

impl OaiGen {
    fn finish_reason(&self) -> &'static str {
        if self.capped {
            "length"
        } else {
            "stop"
        }
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt, self.n as u32)
    }

    /// One `data:` chunk of the stream.
    fn chunk<C: Serialize>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<Usage>,
    ) -> Bytes {
        sse_data(&Chunk {
            id: &self.id,
            object,
            created: self.created,
            model: &self.r.instance,
            system_fingerprint: &self.r.instance,
            choices,
            usage,
        })
    }
}

impl LmStudioSim {
    fn model_info<'a>(&'a self, instance: &str, ctx: u32) -> Option<ModelInfo<'a>> {
        self.model_of(instance).map(|m| ModelInfo {
            arch: &m.arch,
            quant: &m.quantization,
            format: "gguf",
            context_length: ctx,
        })
    }

    fn v0_extras<'a>(
        &'a self,
        api: Api,
        instance: &str,
        ctx: u32,
        n: usize,
        capped: bool,
    ) -> (StatsField, Option<ModelInfo<'a>>, Option<RuntimeInfo>) {
        if api != Api::V0 {
            return (StatsField::Empty(Empty {}), None, None);
        }
        let delay = self.cfg.token_delay;
        let stats = V0Stats {
            tokens_per_second: self.tokens_per_second(),
            time_to_first_token: secs(delay),
            generation_time: secs(delay.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))),
            stop_reason: if capped {
                "maxPredictedTokensReached"
            } else {
                "eosFound"
            },
        };
        (
            StatsField::V0(stats),
            self.model_info(instance, ctx),
            Some(RUNTIME),
        )
    }

    /// The model a `/v1` or `/api/v0` request is served by: the requested one, or the only
    /// loaded instance under `single_loaded_model_quirk`.
    fn openai_model(&self, requested: String) -> String {
        if !self.cfg.single_loaded_model_quirk || self.model_of(&requested).is_some() {
            return requested;
        }
        let st = self.lock();
        match st.instances.as_slice() {
            [only] => only.id.clone(),
            _ => requested,
        }
    }

    /// Parses the body and picks the model that serves it.
    fn openai_request(&self, call: &Call, api: Api) -> Result<OaiRequest, Fail> {
        let body = parse_body(call)?;
        let model = required_model(&body)?;
        Ok(OaiRequest {
            api,
            model: self.openai_model(model),
            body,
            seed: hash_bytes(&call.body),
        })
    }

    /// Checks the model's kind, admits the prompt and waits for the load: the instance, and
    /// the prompt token count to report.
    async fn load_for(
        self: &Arc<Self>,
        req: &OaiRequest,
        want_embedding: bool,
        prompt_tokens: u32,
    ) -> Result<(Resolved, u32), Fail> {
        self.check_kind(&req.model, want_embedding)?;
        let (plan, prompt) = self.admit(&req.model, ttl_of(&req.body), None, prompt_tokens)?;
        let r = self.resolve(&req.model, plan).await?;
        Ok((r, prompt))
    }

    /// Loads the model of a chat or text completion and draws its reply, at most as many
    /// tokens as the first of `max_keys` in the body allows.
    async fn prepare(
        self: &Arc<Self>,
        req: OaiRequest,
        prompt_tokens: u32,
        id_prefix: &str,
        max_keys: &[&str],
    ) -> Result<OaiGen, Response<SimBody>> {
        let (r, prompt) = self
            .load_for(&req, false, prompt_tokens)
            .await
            .map_err(|f| f.response(req.api))?;
        let id = format!("{id_prefix}-{}", alnum_id(req.seed, 21));
        let created = self.clock.unix_secs();
        let (n, capped) = self.reply_len(max_tokens(&req.body, max_keys));
        Ok(OaiGen {
            pieces: reply_pieces(req.seed, n),
            req,
            r,
            id,
            created,
            prompt,
            n,
            capped,
        })
    }

    /// Sleeps through a non-streamed generation and answers with the one `choice`.
    async fn complete<C: Serialize>(
        self: &Arc<Self>,
        g: &OaiGen,
        object: &'static str,
        choice: C,
    ) -> Response<SimBody> {
        self.generate(&g.r.instance, g.n).await;
        self.touch(&g.r.instance);
        let model_id = g.r.instance.as_str();
        let (stats, model_info, runtime) =
            self.v0_extras(g.req.api, model_id, g.r.ctx, g.n, g.capped);
        json(
            StatusCode::OK,
            &Completion {
                id: &g.id,
                object,
                created: g.created,
                model: model_id,
                choices: [choice],
                usage: g.usage(),
                stats,
                model_info,
                runtime,
                system_fingerprint: model_id,
            },
        )
    }

    /// Spawns a streamed generation: the token chunks, then `finish`, the usage chunk when
    /// the body asks for it, and `[DONE]`. Returns the response.
    fn stream(
        self: &Arc<Self>,
        g: OaiGen,
        object: &'static str,
        tokens: Vec<Bytes>,
        finish: Bytes,
    ) -> Response<SimBody> {
        let mut tail = vec![finish];
        if include_usage(&g.req.body) {
            tail.push(g.chunk(object, Vec::<()>::new(), Some(g.usage())));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        self.spawn_stream(g, tokens, tail, stream_error(SIMULATED_FAILURE))
    }

    /// Spawns a streamed generation of any of the OpenAI-compatible APIs: `tokens`, then
    /// `tail`, or `error` where a simulated failure cuts the stream. Returns the response.
    fn spawn_stream(
        self: &Arc<Self>,
        g: OaiGen,
        tokens: Vec<Bytes>,
        tail: Vec<Bytes>,
        error: Bytes,
    ) -> Response<SimBody> {
        let instance = g.r.instance;
        let (tx, body) = channel_body();
        let fail_after = self.take_stream_failure();
        let sim = self.clone();
        tokio::spawn(async move {
            sim.pump(&instance, &tx, tokens, tail, error, fail_after)
                .await;
            sim.touch(&instance);
        });
        sse_response(body)
    }

    pub(super) async fn chat(self: &Arc<Self>, call: &Call, api: Api) -> Handled {
        const OBJECT: &str = "chat.completion.chunk";
        let req = self
            .openai_request(call, api)
            .map_err(|f| f.response(api))?;
        let prompt_tokens = match req.body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => message_tokens(m),
            Some(Value::Array(_)) => {
                return Err(Fail::BadRequest(
                    "'messages' must contain at least one message.".to_string(),
                    Some("messages"),
                )
                .response(api))
            }
            _ => {
                return Err(Fail::BadRequest(
                    "'messages' is required and must be an array.".to_string(),
                    Some("messages"),
                )
                .response(api))
            }
        };
        let max_keys = ["max_tokens", "max_completion_tokens"];
        let g = self
            .prepare(req, prompt_tokens, "chatcmpl", &max_keys)
            .await?;

        if !is_stream(&g.req.body) {
            let content = g.pieces.concat();
            let choice = ChatChoice {
                index: 0,
                logprobs: (),
                finish_reason: g.finish_reason(),
                message: ChatMessage {
                    role: "assistant",
                    content: &content,
                },
            };
            return Ok(self.complete(&g, "chat.completion", choice).await);
        }

        let delta = |role: Option<&'static str>, content: &str, finish: Option<&str>| {
            let choice = DeltaChoice {
                index: 0,
                delta: Delta {
                    role,
                    content: if finish.is_some() {
                        None
                    } else {
                        Some(content)
                    },
                },
                logprobs: (),
                finish_reason: finish,
            };
            g.chunk(OBJECT, vec![choice], None)
        };
        let mut tokens: Vec<Bytes> = g
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| delta((i == 0).then_some("assistant"), p, None))
            .collect();
        if tokens.is_empty() {
            tokens.push(delta(Some("assistant"), "", None));
        }
        let finish = delta(None, "", Some(g.finish_reason()));
        Ok(self.stream(g, OBJECT, tokens, finish))
    }

    pub(super) async fn completions(self: &Arc<Self>, call: &Call, api: Api) -> Handled {
        const OBJECT: &str = "text_completion";
        let req = self
            .openai_request(call, api)
            .map_err(|f| f.response(api))?;
        let prompt_text: String = match req.body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
            _ => {
                return Err(Fail::BadRequest(
                    "'prompt' is required and must be a string.".to_string(),
                    Some("prompt"),
                )
                .response(api))
            }
        };
        let g = self
            .prepare(req, count_tokens(&prompt_text), "cmpl", &["max_tokens"])
            .await?;
        if !is_stream(&g.req.body) {
            let text = g.pieces.concat();
            let whole = text_choice(&text, Some(g.finish_reason()));
            return Ok(self.complete(&g, OBJECT, whole).await);
        }

        let tokens: Vec<Bytes> = g
            .pieces
            .iter()
            .map(|p| g.chunk(OBJECT, vec![text_choice(p, None)], None))
            .collect();
        let finish = g.chunk(OBJECT, vec![text_choice("", Some(g.finish_reason()))], None);
        Ok(self.stream(g, OBJECT, tokens, finish))
    }

    pub(super) async fn embeddings(self: &Arc<Self>, call: &Call, api: Api) -> Handled {
        let req = self
            .openai_request(call, api)
            .map_err(|f| f.response(api))?;
        let inputs: Vec<String> = match req.body.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Fail::BadRequest(
                        "'input' must be a string or an array of strings.".to_string(),
                        Some("input"),
                    )
                    .response(api)
                })?,
            _ => {
                return Err(Fail::BadRequest(
                    "'input' is required and must be a string or a non-empty array of strings."
                        .to_string(),
                    Some("input"),
                )
                .response(api))
            }
        };
        let (r, _) = self
            .load_for(&req, true, 0)
            .await
            .map_err(|f| f.response(api))?;
        self.touch(&r.instance);
        let tokens: u32 = inputs.iter().map(|s| count_tokens(s)).sum();
        let data = inputs
            .iter()
            .enumerate()
            .map(|(index, s)| EmbeddingItem {
                object: "embedding",
                embedding: embedding(s, self.cfg.embedding_dims),
                index,
            })
            .collect();
        Ok(json(
            StatusCode::OK,
            &EmbeddingList {
                object: "list",
                data,
                model: &r.instance,
                usage: EmbeddingUsage {
                    prompt_tokens: tokens,
                    total_tokens: tokens,
                },
            },
        ))
    }
}

fn text_choice<'a>(text: &'a str, finish_reason: Option<&'a str>) -> TextChoice<'a> {
    TextChoice {
        index: 0,
        text,
        logprobs: (),
        finish_reason,
    }
}

fn stream_error(message: &str) -> Bytes {
    sse_data(&OaiError {
        error: OaiErrorBody {
            message,
            kind: "server_error",
            param: None,
            code: None,
        },
    })
}
