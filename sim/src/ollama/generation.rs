//! One generation, whichever route asked for it: schedule the runner, count the prompt after
//! Ollama's truncation (docs/providers.md §1.9), cap the reply at `num_predict`, then deliver it as a stream
//! (token delays, client-gone cancellation, injected mid-stream failure) or as one body.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::sync::mpsc;

use super::keep_alive::KeepAlive;
use super::render::Flavor;
use super::request::{ApiError, ChatMsg, Handled, Opts};
use super::scheduler::{Generating, Lease};
use super::wire::Metrics;
use super::{
    relock, OllamaSim, DEFAULT_EVAL_NS, DEFAULT_NUM_KEEP, NDJSON, OVERHEAD_NS, PROMPT_NS_PER_TOKEN,
    PROMPT_TOO_LONG, SSE,
};
use crate::common::{self, SimBody};
use crate::extractive;
use crate::SimModel;

/// A generation that has its runner and knows what it will say.
pub(super) struct Gen {
    lease: Option<Lease>,
    /// A `num_parallel` slot, held while the reply is written.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The model name as the client sent it.
    pub(super) label: String,
    prompt_tokens: u32,
    pieces: Vec<std::borrow::Cow<'static, str>>,
    pub(super) done_reason: &'static str,
    load_ns: u64,
    /// `/api/generate`: the prompt whose tokens lead `context`; `None` elsewhere or in raw mode.
    pub(super) context_prompt: Option<String>,
}

impl Gen {
    pub(super) fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// What the prompt is made of.
pub(super) enum Prompt {
    Chat(Vec<ChatMsg>),
    /// Token count of the rendered text prompt.
    Text(u32),
}

/// Everything a generation needs, whichever route it came from.
pub(super) struct GenRequest {
    pub(super) label: String,
    pub(super) model: SimModel,
    pub(super) opts: Opts,
    pub(super) keep_alive: Option<KeepAlive>,
    pub(super) prompt: Prompt,
    pub(super) truncate: bool,
    pub(super) seed: u64,
    pub(super) context_prompt: Option<String>,
}

impl OllamaSim {
    /// Plans the generation, then writes it as a stream or as one body.
    pub(super) async fn generate(
        self: &Arc<Self>,
        req: GenRequest,
        flavor: Flavor,
        stream: bool,
    ) -> Handled {
        let gen = self.prepare(req).await?;
        Ok(self.deliver(gen, flavor, stream).await)
    }

    /// Schedules the runner and plans the reply; errors come before any byte is written.
    async fn prepare(self: &Arc<Self>, req: GenRequest) -> Result<Gen, ApiError> {
        let num_ctx = self.effective_num_ctx(&req.model, req.opts.num_ctx);
        let num_batch = self.effective_num_batch(req.opts.num_batch);
        let acquired = self
            .acquire(&req.model, num_ctx, num_batch, req.keep_alive)
            .await?;
        let slot = self.generation_slot(&req.model.name).await;
        let num_keep = req.opts.num_keep.unwrap_or(DEFAULT_NUM_KEEP);
        let prompt_tokens = match &req.prompt {
            Prompt::Chat(msgs) => fit_chat(msgs, num_ctx, num_keep, req.truncate)?,
            Prompt::Text(tokens) => {
                if *tokens > num_ctx && !req.truncate {
                    return Err(ApiError::bad(PROMPT_TOO_LONG));
                }
                cut_middle(*tokens, num_ctx, num_keep)
            }
        };
        let limit = req.opts.num_predict.filter(|l| *l >= 0);
        // A summarization request, with the extractive stand-in on: its summary, within the
        // reply's limit as the prompt tokenizer counts it (4 bytes a token: what the summary
        // will cost in the prompt it goes back into; its words, the reply's tokens, are fewer).
        let summary = match &req.prompt {
            Prompt::Chat(msgs) if self.cfg.extractive_summarizer => {
                extractive::summary_request(msgs.iter().map(|m| (m.role.as_str(), m.content())))
                    .map(|t| {
                        let budget = limit.map_or(usize::MAX, |l| l as usize);
                        extractive::summarize(&t, budget, |s| common::count_tokens(s) as usize)
                    })
            }
            _ => None,
        };
        let fixed = summary.as_ref().or(self.cfg.fixed_reply.as_ref());
        let mut n = match fixed {
            Some(text) => fixed_pieces(text, usize::MAX).len(),
            None => self.cfg.reply_tokens,
        };
        let mut done_reason = "stop";
        if let Some(limit) = limit {
            if (limit as u64) < n as u64 {
                n = limit as usize;
                done_reason = "length";
            }
        }
        Ok(Gen {
            lease: Some(acquired.lease),
            slot,
            label: req.label,
            prompt_tokens,
            pieces: match fixed {
                Some(text) => fixed_pieces(text, n),
                None => common::reply_pieces(req.seed, n)
                    .into_iter()
                    .map(std::borrow::Cow::Borrowed)
                    .collect(),
            },
            done_reason,
            load_ns: acquired.load_ns,
            context_prompt: req.context_prompt,
        })
    }

    /// Writes a planned generation. A stream runs on its own task; a whole body first waits
    /// out the token delays, counting as active meanwhile.
    async fn deliver(
        self: &Arc<Self>,
        mut gen: Gen,
        flavor: Flavor,
        stream: bool,
    ) -> Response<SimBody> {
        if stream {
            let fail_after = relock(&self.fail_stream).take();
            let (tx, body) = common::channel_body();
            let content_type = if flavor.is_openai() { SSE } else { NDJSON };
            let guard = Generating::start(self);
            let sim = self.clone();
            tokio::spawn(async move { sim.stream(gen, flavor, tx, fail_after, guard).await });
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            return resp;
        }
        let mut guard = Generating::start(self);
        if !self.cfg.token_delay.is_zero() && !gen.pieces.is_empty() {
            tokio::time::sleep(self.cfg.token_delay * gen.pieces.len() as u32).await;
        }
        guard.finish();
        gen.lease.take();
        gen.slot.take();
        let (content_type, body) = self.whole(&gen, &flavor);
        common::respond(StatusCode::OK, content_type, body)
    }

    async fn stream(
        self: Arc<Self>,
        mut gen: Gen,
        flavor: Flavor,
        tx: mpsc::Sender<Bytes>,
        fail_after: Option<usize>,
        mut guard: Generating,
    ) {
        let pieces = gen.pieces.clone();
        for (i, piece) in pieces.iter().enumerate() {
            if fail_after == Some(i) {
                break;
            }
            if !self.cfg.token_delay.is_zero() {
                tokio::time::sleep(self.cfg.token_delay).await;
            }
            let chunk = self.chunk(&gen, &flavor, i, piece);
            if tx.send(chunk).await.is_err() {
                return; // the guard counts the cancellation
            }
        }
        // The generation is over: release the runner before the last line so a client that
        // has read it sees the model idle.
        guard.finish();
        gen.lease.take();
        gen.slot.take();
        let lines = match fail_after {
            Some(_) => vec![self.stream_error(&flavor)],
            None => self.finals(&gen, &flavor),
        };
        for l in lines {
            if tx.send(l).await.is_err() {
                return;
            }
        }
    }

    /// The timings and counts of a finished generation.
    pub(super) fn metrics(&self, gen: &Gen) -> Metrics {
        let per_token = if self.cfg.token_delay.is_zero() {
            DEFAULT_EVAL_NS
        } else {
            self.cfg.token_delay.as_nanos() as u64
        };
        let prompt_eval_duration = u64::from(gen.prompt_tokens) * PROMPT_NS_PER_TOKEN;
        let eval_duration = gen.pieces.len() as u64 * per_token;
        Metrics {
            total_duration: gen.load_ns + prompt_eval_duration + eval_duration + OVERHEAD_NS,
            load_duration: gen.load_ns,
            prompt_eval_count: gen.prompt_tokens,
            prompt_eval_duration,
            eval_count: gen.pieces.len() as u32,
            eval_duration,
        }
    }
}

/// Prompt tokens after Ollama's truncation (docs/providers.md §1.9); `Err` when too long and not truncating.
fn fit_chat(
    msgs: &[ChatMsg],
    num_ctx: u32,
    num_keep: u32,
    truncate: bool,
) -> Result<u32, ApiError> {
    let tokens: Vec<u32> = msgs.iter().map(ChatMsg::tokens).collect();
    let total: u32 = tokens.iter().sum();
    if total <= num_ctx {
        return Ok(total);
    }
    if !truncate {
        return Err(ApiError::bad(PROMPT_TOO_LONG));
    }
    let last = msgs.len().saturating_sub(1);
    // Keep messages i.. plus every system message before i; the first i that fits wins.
    let mut fitted = tokens.get(last).copied().unwrap_or(0);
    for i in 0..=last {
        let kept_systems: u32 = msgs[..i]
            .iter()
            .zip(&tokens)
            .filter(|(m, _)| m.role == "system")
            .map(|(_, t)| *t)
            .sum();
        let candidate = kept_systems + tokens[i..].iter().sum::<u32>();
        fitted = candidate;
        if candidate <= num_ctx {
            return Ok(candidate);
        }
    }
    Ok(cut_middle(fitted, num_ctx, num_keep))
}

/// The runner's middle cut for a prompt still over `num_ctx`.
fn cut_middle(tokens: u32, num_ctx: u32, num_keep: u32) -> u32 {
    if tokens <= num_ctx {
        return tokens;
    }
    let discard = (num_ctx.saturating_sub(num_keep) / 2).max(1);
    num_ctx.saturating_sub(discard)
}

/// A fixed reply as token pieces: each word with its leading space; at most `n`.
fn fixed_pieces(text: &str, n: usize) -> Vec<std::borrow::Cow<'static, str>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, ch) in text.char_indices() {
        if ch == ' ' && i > start {
            out.push(std::borrow::Cow::Owned(text[start..i].to_string()));
            start = i;
        }
    }
    if start < text.len() {
        out.push(std::borrow::Cow::Owned(text[start..].to_string()));
    }
    out.truncate(n);
    out
}
