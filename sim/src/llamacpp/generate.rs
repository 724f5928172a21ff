//! The completion routes: OpenAI chat and text completions (`/v1/chat/completions`,
//! `/v1/completions`) and the native `/completion`, answered whole or streamed, and the
//! embeddings routes. Every one holds a slot for its whole run, and fails if its instance
//! is unloaded or evicted meanwhile.
//!
//! Prompt tokens (the simulated tokenizer, `common::tokenize`, no BOS is added):
//! - chat: each message is its content's tokens plus 4 template tokens (`<|im_start|>`, role,
//!   newline, `<|im_end|>`), and the generation prompt adds 3 more (`<|im_start|>assistant\n`);
//! - text prompts (`/completion`, `/v1/completions`): the text's tokens, or the ids given.
//!
//! A prompt of `n_ctx` tokens or more is refused (`exceed_context_size_error`); a reply that
//! would overflow the slot stops at the context's end (`length`, native `truncated:true`).

/// `/v1/messages` and `/v1/responses`.
mod compat;

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::config::UsagePlacement;
use super::state::{killed, Instance, Lease};
use super::wire::{obj, ok, sse_data, sse_response, Fail, J};
use super::{Handled, LlamaCppSim, Req, BUILD_INFO};
use crate::common::{channel_body, embedding, hash_bytes, reply_pieces, tokenize};
use crate::extractive;

/// Template token ids (outside the 32k vocabulary of `common::tokenize`).
const IM_START: u32 = 32001;
const IM_END: u32 = 32002;
const NEWLINE: u32 = 198;
/// Tokens of template around each chat message.
pub const MESSAGE_OVERHEAD: u32 = 4;
/// Tokens of the generation prompt that ends every chat prompt.
pub const GENERATION_PROMPT: u32 = 3;

/// Prompt tokens of a chat request's `messages`, as the simulator counts them:
/// `Σ (count_tokens(content) + MESSAGE_OVERHEAD) + GENERATION_PROMPT`.
pub fn chat_prompt_tokens(messages: &[Value]) -> u32 {
    chat_prompt(messages).len() as u32
}

/// A generation whose slot is held: the prompt, the reply, and the ids every chunk repeats.
struct Gen {
    lease: Lease,
    prompt: Vec<u32>,
    pieces: Vec<String>,
    reply_ids: Vec<u32>,
    /// Stopped by the token limit or the context's end (`length`), not by the model (`stop`).
    capped: bool,
    /// Stopped because the context was full.
    truncated: bool,
    model: String,
    id: String,
    created: u64,
}

impl Gen {
    fn finish_reason(&self) -> &'static str {
        if self.capped {
            "length"
        } else {
            "stop"
        }
    }

    fn n_prompt(&self) -> u32 {
        self.prompt.len() as u32
    }

    fn n_reply(&self) -> u32 {
        self.pieces.len() as u32
    }

    fn usage(&self) -> J {
        obj! {
            "completion_tokens" => self.n_reply(),
            "prompt_tokens" => self.n_prompt(),
            "total_tokens" => self.n_prompt() + self.n_reply(),
            "prompt_tokens_details" => obj! {"cached_tokens" => self.lease.cached},
        }
    }

    fn content(&self) -> String {
        self.pieces.concat()
    }
}

impl LlamaCppSim {
    fn timings(&self, g: &Gen) -> J {
        let cache_n = g.lease.cached;
        let prompt_n = g.n_prompt() - cache_n;
        let predicted_n = g.n_reply();
        // Prompt processing at 2000 tokens/s; generation at the token delay (1 ms if none).
        let prompt_per_token_ms = 0.5;
        let predicted_per_token_ms = if self.cfg.token_delay.is_zero() {
            1.0
        } else {
            self.cfg.token_delay.as_secs_f64() * 1000.0
        };
        obj! {
            "cache_n" => cache_n,
            "prompt_n" => prompt_n,
            "prompt_ms" => f64::from(prompt_n) * prompt_per_token_ms,
            "prompt_per_token_ms" => prompt_per_token_ms,
            "prompt_per_second" => 1000.0 / prompt_per_token_ms,
            "predicted_n" => predicted_n,
            "predicted_ms" => f64::from(predicted_n) * predicted_per_token_ms,
            "predicted_per_token_ms" => predicted_per_token_ms,
            "predicted_per_second" => 1000.0 / predicted_per_token_ms,
        }
    }

    /// The reply's pieces: the fixed reply or generated words, cut by `limit` (`-1` or none:
    /// no limit) and by the room left in the context.
    /// `summary`: the extractive stand-in's answer, in place of either.
    fn reply(
        &self,
        seed: u64,
        limit: Option<i64>,
        room: u32,
        summary: Option<String>,
    ) -> (Vec<String>, bool, bool) {
        let mut pieces: Vec<String> = match summary.as_ref().or(self.cfg.fixed_reply.as_ref()) {
            Some(text) => split_pieces(text),
            None => reply_pieces(seed, self.cfg.max_tokens_default as usize)
                .into_iter()
                .map(str::to_string)
                .collect(),
        };
        let mut capped = false;
        if let Some(m) = limit.filter(|m| *m >= 0) {
            if (m as u64) < pieces.len() as u64 {
                pieces.truncate(m as usize);
                capped = true;
            }
        }
        let mut truncated = false;
        if pieces.len() > room as usize {
            pieces.truncate(room as usize);
            capped = true;
            truncated = true;
        }
        (pieces, capped, truncated)
    }

    /// With the extractive stand-in on, a summarization request's summary within `limit`.
    fn summary(&self, req: &Req, limit: Option<i64>) -> Option<String> {
        if !self.cfg.extractive_summarizer {
            return None;
        }
        let messages = req.body.get("messages")?.as_array()?;
        let transcript = extractive::summary_request(messages.iter().map(|m| {
            (
                m.get("role").and_then(Value::as_str).unwrap_or(""),
                m.get("content").and_then(Value::as_str).unwrap_or(""),
            )
        }))?;
        let budget = limit
            .filter(|m| *m >= 0)
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        Some(extractive::summarize(&transcript, budget, |s| {
            split_pieces(s).len()
        }))
    }

    /// Checks the prompt against the slot, waits for a slot and draws the reply.
    async fn prepare(
        self: &Arc<Self>,
        req: &Req,
        inst: Arc<Instance>,
        prompt: Vec<u32>,
        limit_keys: &[&str],
    ) -> Result<Gen, Fail> {
        let n_prompt = prompt.len() as u32;
        if n_prompt >= inst.n_ctx {
            return Err(Fail::exceeds_context(n_prompt, inst.n_ctx));
        }
        let lease = self.admit(inst, &prompt).await?;
        let limit = limit_keys
            .iter()
            .find_map(|k| req.body.get(*k).and_then(Value::as_i64));
        // The reply and its id follow from the request's bytes alone: the same request gets
        // the same bytes (on a manual clock), so pass-through can be compared byte for byte.
        let seed = hash_bytes(&req.call.body);
        let summary = self.summary(req, limit);
        let (pieces, capped, truncated) =
            self.reply(seed, limit, lease.inst.n_ctx - n_prompt, summary);
        let reply_ids = pieces.iter().flat_map(|p| tokenize(p)).collect();
        {
            let mut st = self.lock();
            for p in &pieces {
                if let Some(id) = tokenize(p).first() {
                    st.vocab.entry(*id).or_insert_with(|| p.clone());
                }
            }
        }
        let model = req
            .str("model")
            .map_or_else(|| lease.inst.model.name.clone(), str::to_string);
        Ok(Gen {
            id: format!("chatcmpl-{}", mixed_id(seed, 32)),
            created: self.clock.unix_secs(),
            lease,
            prompt,
            pieces,
            reply_ids,
            capped,
            truncated,
            model,
        })
    }

    /// Sleeps through a whole generation; fails if the instance goes away meanwhile.
    async fn run(&self, g: &Gen) -> Result<(), Fail> {
        for _ in 0..g.pieces.len().max(1) {
            if !g.lease.sleep(self.cfg.token_delay).await {
                return Err(killed());
            }
        }
        g.lease.finish(&g.prompt, &g.reply_ids);
        Ok(())
    }

    /// Streams `prelude` at once, then one token frame per `token_delay`, then `tail`.
    /// If the instance goes away the stream just ends (no error event, no `[DONE]`): the
    /// child's connection is gone.
    fn stream(
        self: &Arc<Self>,
        g: Gen,
        prelude: Vec<Bytes>,
        tokens: Vec<Bytes>,
        tail: Vec<Bytes>,
    ) -> Handled {
        let (tx, body) = channel_body();
        let delay = self.cfg.token_delay;
        tokio::spawn(async move {
            if !send_all(&tx, prelude).await {
                return;
            }
            for t in tokens {
                if !g.lease.sleep(delay).await || tx.send(t).await.is_err() {
                    return;
                }
            }
            g.lease.finish(&g.prompt, &g.reply_ids);
            send_all(&tx, tail).await;
        });
        Ok(sse_response(body))
    }

    /// The final chunks of a chat stream: `finish`, usage as `UsagePlacement` says, `[DONE]`.
    /// `timings` go on the usage chunk when there is one, else on the finish chunk.
    fn chat_tail(&self, g: &Gen, req: &Req, mut finish: J, base: impl Fn(J) -> J) -> Vec<Bytes> {
        let include_usage = req
            .body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let separate = match self.cfg.usage {
            UsagePlacement::FinishChunk => {
                finish.push("usage", g.usage());
                false
            }
            UsagePlacement::SeparateChunkAlways => true,
            UsagePlacement::SeparateChunkIfAsked => include_usage,
        };
        let mut tail = Vec::new();
        if separate {
            let mut usage = base(J::Arr(Vec::new()));
            usage.push("usage", g.usage());
            usage.push("timings", self.timings(g));
            tail.extend([sse_data(&finish), sse_data(&usage)]);
        } else {
            finish.push("timings", self.timings(g));
            tail.push(sse_data(&finish));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        tail
    }

    pub(super) async fn chat(self: &Arc<Self>, req: &Req, inst: Arc<Instance>) -> Handled {
        let messages = match req.body.get("messages") {
            Some(Value::Array(m)) => m,
            Some(_) => return Err(Fail::invalid("Expected 'messages' to be an array")),
            None => return Err(Fail::invalid("'messages' is required")),
        };
        let prompt = chat_prompt(messages);
        let keys = ["max_completion_tokens", "max_tokens", "n_predict"];
        let g = self.prepare(req, inst, prompt, &keys).await?;
        let base = |choices: J| {
            obj! {
                "choices" => choices,
                "created" => g.created,
                "id" => g.id.as_str(),
                "model" => g.model.as_str(),
                "system_fingerprint" => BUILD_INFO,
                "object" => "chat.completion.chunk",
            }
        };
        if !is_stream(req) {
            self.run(&g).await?;
            let mut body = obj! {
                "choices" => vec![obj! {
                    "finish_reason" => g.finish_reason(),
                    "index" => 0u32,
                    "message" => obj! {"role" => "assistant", "content" => g.content()},
                }],
                "created" => g.created,
                "model" => g.model.as_str(),
                "system_fingerprint" => BUILD_INFO,
                "object" => "chat.completion",
                "usage" => g.usage(),
                "id" => g.id.as_str(),
            };
            body.push("timings", self.timings(&g));
            return Ok(ok(&body));
        }
        let delta = |delta: J, finish: Option<&str>| {
            base(J::Arr(vec![obj! {
                "finish_reason" => finish,
                "index" => 0u32,
                "delta" => delta,
            }]))
        };
        let role = delta(obj! {"role" => "assistant", "content" => J::Null}, None);
        let tokens = g
            .pieces
            .iter()
            .map(|p| sse_data(&delta(obj! {"content" => p.as_str()}, None)))
            .collect();
        let finish = delta(obj! {}, Some(g.finish_reason()));
        let tail = self.chat_tail(&g, req, finish, base);
        self.stream(g, vec![sse_data(&role)], tokens, tail)
    }

    pub(super) async fn oai_completion(
        self: &Arc<Self>,
        req: &Req,
        inst: Arc<Instance>,
    ) -> Handled {
        let prompt = text_prompt(req.body.get("prompt"))?;
        let g = self
            .prepare(req, inst, prompt, &["max_tokens", "n_predict"])
            .await?;
        let choice = |text: &str, finish: Option<&str>| {
            obj! {"text" => text, "index" => 0u32, "logprobs" => J::Null, "finish_reason" => finish}
        };
        // Text completion chunks put the id last, and the final one carries usage and timings
        // whatever the request asked (observed on a current build).
        let base = |choices: J| {
            obj! {
                "choices" => choices,
                "created" => g.created,
                "model" => g.model.as_str(),
                "system_fingerprint" => BUILD_INFO,
                "object" => "text_completion",
            }
        };
        if !is_stream(req) {
            self.run(&g).await?;
            let mut body = obj! {
                "choices" => vec![choice(&g.content(), Some(g.finish_reason()))],
                "created" => g.created,
                "model" => g.model.as_str(),
                "system_fingerprint" => BUILD_INFO,
                "object" => "text_completion",
                "usage" => g.usage(),
                "id" => g.id.as_str(),
            };
            body.push("timings", self.timings(&g));
            return Ok(ok(&body));
        }
        let tokens = g
            .pieces
            .iter()
            .map(|p| {
                let mut chunk = base(J::Arr(vec![choice(p, None)]));
                chunk.push("id", g.id.as_str());
                sse_data(&chunk)
            })
            .collect();
        let mut finish = base(J::Arr(vec![choice("", Some(g.finish_reason()))]));
        finish.push("usage", g.usage());
        finish.push("id", g.id.as_str());
        finish.push("timings", self.timings(&g));
        let tail = vec![sse_data(&finish), Bytes::from_static(b"data: [DONE]\n\n")];
        self.stream(g, Vec::new(), tokens, tail)
    }

    /// The native `/completion`: `n_predict` limits the reply; the stream is `data:` events
    /// with no `[DONE]`, the last one `"stop":true` with the timings.
    pub(super) async fn native_completion(
        self: &Arc<Self>,
        req: &Req,
        inst: Arc<Instance>,
    ) -> Handled {
        let prompt_text = match req.body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let prompt = text_prompt(req.body.get("prompt"))?;
        let g = self
            .prepare(req, inst, prompt, &["n_predict", "max_tokens"])
            .await?;
        let stream = is_stream(req);
        let last = |content: String| {
            let mut o = obj! {
                "index" => 0u32,
                "content" => content,
                "tokens" => J::Arr(Vec::new()),
                "id_slot" => g.lease.slot,
                "stop" => true,
                "model" => g.model.as_str(),
                "tokens_predicted" => g.n_reply(),
                "tokens_evaluated" => g.n_prompt(),
                "generation_settings" => generation_params(stream),
                "prompt" => prompt_text.as_str(),
                "has_new_line" => g.content().contains('\n'),
                "truncated" => g.truncated,
                "stop_type" => if g.capped { "limit" } else { "eos" },
                "stopping_word" => "",
                // The last sampled token is not in the cache yet.
                "tokens_cached" => (g.n_prompt() + g.n_reply()).saturating_sub(1),
            };
            o.push("timings", self.timings(&g));
            o
        };
        if !stream {
            self.run(&g).await?;
            return Ok(ok(&last(g.content())));
        }
        let tokens = g
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                sse_data(&obj! {
                    "index" => 0u32,
                    "content" => p.as_str(),
                    "tokens" => vec![g.reply_ids.get(i).copied().unwrap_or(0)],
                    "stop" => false,
                    "id_slot" => -1i32,
                    "tokens_predicted" => i + 1,
                    "tokens_evaluated" => g.n_prompt(),
                })
            })
            .collect();
        let tail = vec![sse_data(&last(String::new()))];
        self.stream(g, Vec::new(), tokens, tail)
    }

    /// `/v1/embeddings` (`oai`) and the native `/embedding`. A model that is not an embedding
    /// model answers as a server started without `--embeddings`.
    pub(super) async fn embeddings(
        self: &Arc<Self>,
        req: &Req,
        inst: Arc<Instance>,
        oai: bool,
    ) -> Handled {
        if !inst.model.embedding {
            return Err(Fail::not_supported(
                "This server does not support embeddings. Start it with `--embeddings`",
            ));
        }
        let input = if oai {
            req.body.get("input")
        } else {
            req.body.get("content").or_else(|| req.body.get("input"))
        };
        let inputs: Vec<String> = match input {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Fail::invalid("\"input\" must be a string or an array of strings")
                })?,
            _ => {
                let key = if oai { "input" } else { "content" };
                return Err(Fail::invalid(format!("\"{key}\" must be provided")));
            }
        };
        let mut total = 0u32;
        for text in &inputs {
            let n = tokenize(text).len() as u32;
            if n >= inst.n_ctx {
                return Err(Fail::exceeds_context(n, inst.n_ctx));
            }
            total += n;
        }
        let lease = self.admit(inst, &[]).await?;
        if !lease.sleep(std::time::Duration::ZERO).await {
            return Err(killed());
        }
        let dims = self.cfg.embedding_dims;
        if oai {
            let model = req
                .str("model")
                .map_or_else(|| lease.inst.model.name.clone(), str::to_string);
            let data: Vec<J> = inputs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    obj! {"embedding" => embedding(s, dims), "index" => i, "object" => "embedding"}
                })
                .collect();
            return Ok(ok(&obj! {
                "model" => model,
                "object" => "list",
                "usage" => obj! {"prompt_tokens" => total, "total_tokens" => total},
                "data" => data,
            }));
        }
        let items: Vec<J> = inputs
            .iter()
            .enumerate()
            .map(|(i, s)| obj! {"index" => i, "embedding" => vec![J::from(embedding(s, dims))]})
            .collect();
        Ok(ok(&J::Arr(items)))
    }
}

async fn send_all(tx: &mpsc::Sender<Bytes>, items: Vec<Bytes>) -> bool {
    for b in items {
        if tx.send(b).await.is_err() {
            return false;
        }
    }
    true
}

fn is_stream(req: &Req) -> bool {
    req.body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The sampling parameters echoed in `generation_settings` and `/props`.
pub(super) fn generation_params(stream: bool) -> J {
    obj! {
        "seed" => 4_294_967_295u32,
        "temperature" => 0.8,
        "top_k" => 40u32,
        "top_p" => 0.95,
        "min_p" => 0.05,
        "max_tokens" => -1i32,
        "n_predict" => -1i32,
        "n_keep" => 0u32,
        "stream" => stream,
    }
}

/// Text of a message `content`: a string, or the `text` of its parts.
pub(super) fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Token ids of a chat prompt (see the module doc for the template tokens).
pub(super) fn chat_prompt(messages: &[Value]) -> Vec<u32> {
    let mut ids = Vec::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        ids.extend([
            IM_START,
            tokenize(role).first().copied().unwrap_or(0),
            NEWLINE,
        ]);
        ids.extend(tokenize(&content_text(m.get("content"))));
        ids.push(IM_END);
    }
    ids.extend([
        IM_START,
        tokenize("assistant").first().copied().unwrap_or(0),
        NEWLINE,
    ]);
    ids
}

/// Token ids of a text prompt: a string, or a list of token ids.
fn text_prompt(v: Option<&Value>) -> Result<Vec<u32>, Fail> {
    match v {
        Some(Value::String(s)) => Ok(tokenize(s)),
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => Ok(items
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect()),
        Some(Value::Array(items)) if items.len() == 1 => text_prompt(items.first()),
        None => Err(Fail::invalid(
            "[json.exception.out_of_range.403] key 'prompt' not found",
        )),
        _ => Err(Fail::invalid(
            "\"prompt\" must be a string or a list of tokens",
        )),
    }
}

/// Splits a fixed reply into pieces of at most 4 bytes (one token each), on char boundaries.
fn split_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if !cur.is_empty() && cur.len() + c.len_utf8() > 4 {
            pieces.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        pieces.push(cur);
    }
    pieces
}

/// A mixed-case alphanumeric id of `len` characters, deterministic in `seed` (the real
/// server draws 32 random ones for `chatcmpl-`).
fn mixed_id(seed: u64, len: usize) -> String {
    crate::common::id_from(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        seed,
        len,
    )
}
