//! What of a chat message reaches the prompt, as pieces of text and fixed estimates; both the
//! Ollama shape (`content` string, `images`, `tool_calls[].function.arguments` as an object)
//! and the OpenAI one (`content` string or parts, `tool_calls[].function.arguments` as a JSON
//! string, `tool_call_id`). The constants are the fixed costs the counter adds.

use std::borrow::Cow;

use serde_json::Value;

/// Tokens a chat template adds around each message besides its role: OpenAI's cookbook counts
/// 3–4 (`<|start|>{role}<|message|>…<|end|>`); ChatML (Qwen) and Llama 3 use 4
/// (`<|im_start|>`, `\n`, `<|im_end|>`, `\n`; `<|start_header_id|>`, `<|end_header_id|>`,
/// `\n\n`, `<|eot_id|>`).
pub const MESSAGE_OVERHEAD: u64 = 4;

/// Tokens that prime the reply after the last message (`<|im_start|>assistant\n`, OpenAI's
/// `<|start|>assistant<|message|>`), added once by [`count_messages`](super::TokenCounter::count_messages).
pub const REPLY_PRIMING: u64 = 3;

/// Extra token for a message's `name` field (OpenAI's cookbook counts 1).
pub const NAME_OVERHEAD: u64 = 1;

/// Tokens around each tool call's name and arguments: Hermes-style templates (Qwen 2.5/3)
/// render `<tool_call>\n{"name": "…", "arguments": …}\n</tool_call>`, about 10 in cl100k.
pub const TOOL_CALL_OVERHEAD: u64 = 10;

/// Fixed estimate for one image (an Ollama `images` entry or an `image_url` / `input_image`
/// part): OpenAI's 1024×1024 high-detail cost (85 + 4 × 170 = 765). Local vision models take
/// from 256 (Gemma 3) through 576 (LLaVA) to a few thousand (Qwen 2.5-VL on large images);
/// this errs high for the common ones, and calibration corrects the rest on average.
pub const IMAGE_TOKENS: u64 = 765;

/// One thing a message contributes to the prompt.
pub(super) enum Piece<'a> {
    /// Text to tokenize.
    Text(Cow<'a, str>),
    /// A fixed number of tokens.
    Fixed(u64),
}

/// Calls `f` with every piece of `message` that reaches the prompt (not the per-message
/// overhead). Unknown fields and shapes contribute nothing.
pub(super) fn visit<'a>(message: &'a Value, f: &mut impl FnMut(Piece<'a>)) {
    let Value::Object(fields) = message else {
        if let Value::String(text) = message {
            f(Piece::Text(Cow::Borrowed(text)));
        }
        return;
    };
    for key in ["role", "tool_call_id", "tool_name"] {
        if let Some(Value::String(text)) = fields.get(key) {
            f(Piece::Text(Cow::Borrowed(text)));
        }
    }
    if let Some(Value::String(name)) = fields.get("name") {
        f(Piece::Fixed(NAME_OVERHEAD));
        f(Piece::Text(Cow::Borrowed(name)));
    }
    match fields.get("content") {
        Some(Value::String(text)) => f(Piece::Text(Cow::Borrowed(text))),
        Some(Value::Array(parts)) => {
            for part in parts {
                visit_part(part, f);
            }
        }
        Some(part @ Value::Object(_)) => visit_part(part, f),
        _ => {}
    }
    if let Some(Value::Array(images)) = fields.get("images") {
        for _ in images {
            f(Piece::Fixed(IMAGE_TOKENS));
        }
    }
    if let Some(Value::Array(calls)) = fields.get("tool_calls") {
        for call in calls {
            visit_call(call, f);
        }
    }
    // The pre-`tools` OpenAI shape: one `{name, arguments}` object.
    if let Some(call @ Value::Object(_)) = fields.get("function_call") {
        visit_call(call, f);
    }
    // Responses API items: a `function_call` (`name` counted above, `arguments` here) and a
    // `function_call_output` (`output`, a string or parts).
    if let Some(Value::String(args)) = fields.get("arguments") {
        f(Piece::Fixed(TOOL_CALL_OVERHEAD));
        f(Piece::Text(Cow::Borrowed(args)));
    }
    match fields.get("output") {
        Some(Value::String(text)) => f(Piece::Text(Cow::Borrowed(text))),
        Some(Value::Array(parts)) => {
            for part in parts {
                visit_part(part, f);
            }
        }
        _ => {}
    }
}

/// One OpenAI content part: text counted, images a fixed estimate, anything else (audio,
/// files) counted only by a `text` field if it has one.
fn visit_part<'a>(part: &'a Value, f: &mut impl FnMut(Piece<'a>)) {
    let text_field = |key| match part.get(key) {
        Some(Value::String(text)) => Some(Piece::Text(Cow::Borrowed(text.as_str()))),
        _ => None,
    };
    let piece = match part {
        Value::String(text) => Some(Piece::Text(Cow::Borrowed(text.as_str()))),
        Value::Object(_) => match part.get("type").and_then(Value::as_str) {
            Some("image_url" | "input_image" | "image") => Some(Piece::Fixed(IMAGE_TOKENS)),
            Some("refusal") => text_field("refusal"),
            // Anthropic Messages: a `tool_use` block is a call (`name`, `input`); a
            // `tool_result` block's `content` is a string or blocks.
            Some("tool_use") => {
                f(Piece::Fixed(TOOL_CALL_OVERHEAD));
                if let Some(Value::String(name)) = part.get("name") {
                    f(Piece::Text(Cow::Borrowed(name)));
                }
                if let Some(input) = part.get("input") {
                    f(Piece::Text(Cow::Owned(input.to_string())));
                }
                None
            }
            Some("tool_result") => {
                match part.get("content") {
                    Some(Value::String(text)) => f(Piece::Text(Cow::Borrowed(text))),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            visit_part(p, f);
                        }
                    }
                    _ => {}
                }
                None
            }
            _ => text_field("text"),
        },
        _ => None,
    };
    if let Some(piece) = piece {
        f(piece);
    }
}

/// One tool call: `{"function": {"name", "arguments"}}` (both shapes) or a bare
/// `{"name", "arguments"}`. Arguments given as JSON values (Ollama) count as their compact
/// JSON text; given as a string (OpenAI), as that string.
fn visit_call<'a>(call: &'a Value, f: &mut impl FnMut(Piece<'a>)) {
    let function = call.get("function").unwrap_or(call);
    f(Piece::Fixed(TOOL_CALL_OVERHEAD));
    if let Some(Value::String(name)) = function.get("name") {
        f(Piece::Text(Cow::Borrowed(name)));
    }
    match function.get("arguments") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => f(Piece::Text(Cow::Borrowed(text))),
        Some(args) => f(Piece::Text(Cow::Owned(args.to_string()))),
    }
}

/// Bytes of text (not fixed estimates) in `messages`: what decides inline vs blocking pool.
pub(super) fn text_bytes(messages: &[Value]) -> usize {
    let mut bytes = 0usize;
    for message in messages {
        visit(message, &mut |piece| {
            if let Piece::Text(text) = piece {
                bytes = bytes.saturating_add(text.len());
            }
        });
    }
    bytes
}

/// An upper bound on [`count_message`](super::TokenCounter::count_message) without
/// tokenizing: text bytes (at least one byte a token) plus the fixed costs.
pub(super) fn byte_bound(message: &Value) -> u64 {
    let mut tokens = MESSAGE_OVERHEAD;
    visit(message, &mut |piece| {
        tokens = tokens.saturating_add(match piece {
            Piece::Text(text) => super::upper_bound(text.len()),
            Piece::Fixed(n) => n,
        });
    });
    tokens
}
