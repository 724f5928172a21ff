//! The bytes of a generation in each wire flavour: native chat and generate (NDJSON, or one
//! JSON object) and the OpenAI chat and completions shapes (SSE ending in `[DONE]`, or one
//! JSON body): the chunk per token, the lines after the last token, the whole body.

use std::time::SystemTime;

use bytes::Bytes;

use super::config::local_rfc3339;
use super::generation::Gen;
use super::wire::{
    json_line, line, sse, ChatResponse, ErrorBody, GenerateResponse, OaiChatChunk,
    OaiChatCompletion, OaiChoice, OaiChunkChoice, OaiCompletion, OaiCompletionChunk, OaiDelta,
    OaiErrorBody, OaiTextChoice, OutMessage, Usage,
};
use super::{compat, OllamaSim, JSON, OAI_JSON, STREAM_FAILURE};
use crate::common;

/// The wire format a generation is written in.
pub(super) enum Flavor {
    Chat,
    Generate,
    OaiChat {
        id: String,
        created: u64,
        include_usage: bool,
    },
    OaiCompletion {
        id: String,
        created: u64,
        include_usage: bool,
    },
    /// `/v1/messages` (compat.rs); `estimate`: `message_start`'s `input_tokens`.
    Messages {
        id: String,
        estimate: u32,
    },
    /// `/v1/responses` (compat.rs).
    Responses {
        id: String,
        item: String,
        created: u64,
        instructions: Option<String>,
    },
}

impl Flavor {
    /// Whether it streams as SSE (every `/v1` layer does).
    pub(super) fn is_openai(&self) -> bool {
        !matches!(self, Flavor::Chat | Flavor::Generate)
    }

    fn is_compat(&self) -> bool {
        matches!(self, Flavor::Messages { .. } | Flavor::Responses { .. })
    }
}

/// One `chat.completion.chunk` event.
fn oai_chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<OaiChunkChoice<'_>>,
    usage: Option<Usage>,
) -> Bytes {
    sse(common::go_json(&OaiChatChunk {
        id,
        object: "chat.completion.chunk",
        created,
        model,
        system_fingerprint: "fp_ollama",
        choices,
        usage,
    }))
}

/// One streamed `text_completion` event.
fn oai_completion_chunk(
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<OaiTextChoice<'_>>,
    usage: Option<Usage>,
) -> Bytes {
    sse(common::go_json(&OaiCompletionChunk {
        id,
        object: "text_completion",
        created,
        choices,
        model,
        system_fingerprint: "fp_ollama",
        usage,
    }))
}

impl OllamaSim {
    /// `created_at` of a native body: now, in UTC.
    pub(super) fn created_at(&self) -> String {
        common::rfc3339_nano(self.clock.now())
    }

    /// A time in the server's local offset (`expires_at`, `modified_at`).
    pub(super) fn local_time(&self, t: SystemTime) -> String {
        local_rfc3339(t, self.cfg.utc_offset_secs)
    }

    /// The line a stream ends with when the runner fails mid-generation.
    pub(super) fn stream_error(&self, flavor: &Flavor) -> Bytes {
        if flavor.is_compat() {
            compat::stream_error(flavor, STREAM_FAILURE)
        } else if flavor.is_openai() {
            sse(common::go_json(&OaiErrorBody::new(
                STREAM_FAILURE,
                "api_error",
            )))
        } else {
            line(common::go_json(&ErrorBody {
                error: STREAM_FAILURE,
            }))
        }
    }

    /// The streamed chunk for token `i`.
    pub(super) fn chunk(&self, gen: &Gen, flavor: &Flavor, i: usize, piece: &str) -> Bytes {
        let model = gen.label.as_str();
        match flavor {
            Flavor::Messages { .. } | Flavor::Responses { .. } => {
                compat::chunk(flavor, model, i, piece)
            }
            Flavor::Chat => line(common::go_json(&ChatResponse::new(
                model,
                self.created_at(),
                piece,
                None,
                None,
            ))),
            Flavor::Generate => line(common::go_json(&GenerateResponse::new(
                model,
                self.created_at(),
                piece,
                None,
                None,
                None,
            ))),
            Flavor::OaiChat { id, created, .. } => oai_chat_chunk(
                id,
                *created,
                model,
                vec![OaiChunkChoice {
                    index: 0,
                    delta: OaiDelta {
                        role: (i == 0).then_some("assistant"),
                        content: Some(piece),
                    },
                    finish_reason: None,
                }],
                None,
            ),
            Flavor::OaiCompletion {
                id,
                created,
                include_usage,
            } => oai_completion_chunk(
                id,
                *created,
                model,
                vec![OaiTextChoice {
                    text: piece,
                    index: 0,
                    finish_reason: None,
                }],
                include_usage.then(|| Usage::new(0, 0)),
            ),
        }
    }

    /// The streamed lines after the last token.
    pub(super) fn finals(&self, gen: &Gen, flavor: &Flavor) -> Vec<Bytes> {
        let model = gen.label.as_str();
        let m = self.metrics(gen);
        let usage = || Usage::new(m.prompt_eval_count, m.eval_count);
        match flavor {
            Flavor::Messages { .. } | Flavor::Responses { .. } => {
                compat::finals(flavor, gen, m.prompt_eval_count, m.eval_count)
            }
            Flavor::Chat => vec![line(common::go_json(&ChatResponse::new(
                model,
                self.created_at(),
                "",
                Some(gen.done_reason),
                Some(m),
            )))],
            Flavor::Generate => vec![line(common::go_json(&GenerateResponse::new(
                model,
                self.created_at(),
                "",
                Some(gen.done_reason),
                self.context(gen),
                Some(m),
            )))],
            Flavor::OaiChat {
                id,
                created,
                include_usage,
            } => {
                let chunk = |choices, usage| oai_chat_chunk(id, *created, model, choices, usage);
                let mut out = vec![chunk(
                    vec![OaiChunkChoice {
                        index: 0,
                        delta: OaiDelta {
                            role: None,
                            content: None,
                        },
                        finish_reason: Some(gen.done_reason),
                    }],
                    None,
                )];
                if *include_usage {
                    out.push(chunk(Vec::new(), Some(usage())));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
            Flavor::OaiCompletion {
                id,
                created,
                include_usage,
            } => {
                let chunk =
                    |choices, usage| oai_completion_chunk(id, *created, model, choices, usage);
                let mut out = vec![chunk(
                    vec![OaiTextChoice {
                        text: "",
                        index: 0,
                        finish_reason: Some(gen.done_reason),
                    }],
                    include_usage.then(|| Usage::new(0, 0)),
                )];
                if *include_usage {
                    out.push(chunk(Vec::new(), Some(usage())));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
        }
    }

    /// The non-streaming body.
    pub(super) fn whole(&self, gen: &Gen, flavor: &Flavor) -> (&'static str, Vec<u8>) {
        let model = gen.label.as_str();
        let text = gen.text();
        let m = self.metrics(gen);
        match flavor {
            Flavor::Messages { .. } | Flavor::Responses { .. } => (
                OAI_JSON,
                compat::whole(flavor, gen, m.prompt_eval_count, m.eval_count),
            ),
            Flavor::Chat => (
                JSON,
                common::go_json(&ChatResponse::new(
                    model,
                    self.created_at(),
                    &text,
                    Some(gen.done_reason),
                    Some(m),
                )),
            ),
            Flavor::Generate => (
                JSON,
                common::go_json(&GenerateResponse::new(
                    model,
                    self.created_at(),
                    &text,
                    Some(gen.done_reason),
                    self.context(gen),
                    Some(m),
                )),
            ),
            Flavor::OaiChat { id, created, .. } => (
                OAI_JSON,
                json_line(&OaiChatCompletion {
                    id,
                    object: "chat.completion",
                    created: *created,
                    model,
                    system_fingerprint: "fp_ollama",
                    choices: vec![OaiChoice {
                        index: 0,
                        message: OutMessage {
                            role: "assistant",
                            content: &text,
                        },
                        finish_reason: Some(gen.done_reason),
                    }],
                    usage: Usage::new(m.prompt_eval_count, m.eval_count),
                }),
            ),
            Flavor::OaiCompletion { id, created, .. } => (
                OAI_JSON,
                json_line(&OaiCompletion {
                    id,
                    object: "text_completion",
                    created: *created,
                    model,
                    system_fingerprint: "fp_ollama",
                    choices: vec![OaiTextChoice {
                        text: &text,
                        index: 0,
                        finish_reason: Some(gen.done_reason),
                    }],
                    usage: Usage::new(m.prompt_eval_count, m.eval_count),
                }),
            ),
        }
    }

    /// `context` of `/api/generate`: the prompt's tokens then the reply's.
    fn context(&self, gen: &Gen) -> Option<Vec<u32>> {
        let prompt = gen.context_prompt.as_ref()?;
        let mut ctx = common::tokenize(prompt);
        ctx.extend(common::tokenize(&gen.text()));
        Some(ctx).filter(|c| !c.is_empty())
    }
}
