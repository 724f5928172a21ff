//! The summarizer: a plain chat request to a model through its provider's own API (Ollama
//! `/api/chat`, LM Studio `/v1/chat/completions`), under a lease from that provider's
//! lifecycle, with a timeout and a length budget.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use super::compact::Providers;
use crate::lifecycle::Shape;
use crate::providers::ProviderKind;

/// Changes whenever [`PROMPT`] does, so cached summaries of another prompt are not reused.
pub const PROMPT_VERSION: &str = "v1";

/// What the summarizer is told.
pub const PROMPT: &str = "You condense conversations. Summarize the conversation below so that \
it can replace it: keep every fact, name, number, decision, instruction and open question the \
rest of the conversation may rely on; drop pleasantries and repetition. Write plain prose in \
the conversation's language, in the third person, without a preamble.";

/// The most of a summarizer's answer the proxy reads.
const ANSWER_LIMIT: usize = 4 << 20;

/// The text the summarizer gets: the previous summary (if any) and the messages after it.
pub fn transcript(previous: Option<&str>, messages: &[&Value]) -> String {
    let mut out = String::new();
    if let Some(p) = previous {
        out.push_str("Summary of the conversation so far:\n");
        out.push_str(p.trim());
        out.push_str("\n\nWhat followed:\n");
    }
    for m in messages {
        // Responses API items without a role: calls and their outputs.
        let role = match m.get("type").and_then(Value::as_str) {
            Some("function_call") => "assistant",
            Some("function_call_output") => "tool",
            Some("reasoning") => "assistant (reasoning)",
            _ => m.get("role").and_then(Value::as_str).unwrap_or("user"),
        };
        out.push_str(role);
        out.push_str(": ");
        out.push_str(&content_text(m));
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            for c in calls {
                let f = c.get("function").unwrap_or(c);
                let name = f.get("name").and_then(Value::as_str).unwrap_or("?");
                let args = match f.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                out.push_str(&format!(" [calls tool {name} with {args}]"));
            }
        }
        if m.get("type").and_then(Value::as_str) == Some("function_call") {
            let name = m.get("name").and_then(Value::as_str).unwrap_or("?");
            let args = m.get("arguments").and_then(Value::as_str).unwrap_or("");
            out.push_str(&format!("[calls tool {name} with {args}]"));
        }
        if let Some(Value::String(o)) = m.get("output") {
            out.push_str(o);
        }
        out.push('\n');
    }
    out
}

/// The text of content parts: text (also the Responses API's `input_text` / `output_text`),
/// Anthropic's `tool_use` and `tool_result` blocks; images marked, not described.
fn parts_text(parts: &[Value]) -> String {
    parts
        .iter()
        .map(|p| match p.get("type").and_then(Value::as_str) {
            Some("text" | "input_text" | "output_text") => p
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            Some("tool_use") => format!(
                "[calls tool {} with {}]",
                p.get("name").and_then(Value::as_str).unwrap_or("?"),
                p.get("input").map(Value::to_string).unwrap_or_default()
            ),
            Some("tool_result") => match p.get("content") {
                Some(Value::String(t)) => format!("[tool result: {t}]"),
                Some(Value::Array(inner)) => format!("[tool result: {}]", parts_text(inner)),
                _ => "[tool result]".to_string(),
            },
            _ => "[image]".to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The text of a message's `content`: a string, or the text parts of an array; images are
/// marked, not described.
fn content_text(m: &Value) -> String {
    let mut s = match m.get("content") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(parts)) => parts_text(parts),
        _ => String::new(),
    };
    if let Some(images) = m.get("images").and_then(Value::as_array) {
        for _ in images {
            s.push_str(" [image]");
        }
    }
    s
}

/// Asks model `model` of provider `provider` for a summary of `transcript`, in at most
/// `max_tokens` tokens, within `timeout` (waiting for the model included).
pub async fn call(
    providers: &dyn Providers,
    provider: usize,
    model: &str,
    transcript: &str,
    max_tokens: u32,
    timeout: Duration,
) -> Result<String, String> {
    let asked = tokio::time::timeout(
        timeout,
        call_now(providers, provider, model, transcript, max_tokens),
    )
    .await;
    match asked {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no summary within {timeout:?} (compaction.summarizer_timeout)"
        )),
    }
}

async fn call_now(
    providers: &dyn Providers,
    provider: usize,
    model: &str,
    transcript: &str,
    max_tokens: u32,
) -> Result<String, String> {
    let messages = json!([
        {"role": "system", "content": PROMPT},
        {"role": "user", "content": transcript},
    ]);
    let kind = providers.kind(provider);
    // Made under the lease: a runner the proxy loaded smaller keeps its options.
    let body = |shape: Shape| {
        let body = match kind {
            ProviderKind::Ollama => {
                let mut options = json!({"num_predict": max_tokens});
                if let Some(n) = shape.num_ctx {
                    options["num_ctx"] = n.into();
                }
                if let Some(n) = shape.num_batch {
                    options["num_batch"] = n.into();
                }
                json!({"model": model, "messages": messages, "stream": false, "keep_alive": -1,
                       "options": options})
            }
            ProviderKind::LmStudio | ProviderKind::LlamaCpp => {
                json!({"model": model, "messages": messages, "stream": false, "max_tokens": max_tokens})
            }
        };
        Bytes::from(body.to_string())
    };
    let path = match kind {
        ProviderKind::Ollama => "/api/chat",
        ProviderKind::LmStudio | ProviderKind::LlamaCpp => "/v1/chat/completions",
    };
    let (status, bytes) = providers
        .post(provider, model, path, &body, ANSWER_LIMIT)
        .await?;
    if !status.is_success() {
        return Err(format!(
            "summarizer answered {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("summary is not JSON: {e}"))?;
    let text = v
        .pointer("/message/content")
        .or_else(|| v.pointer("/choices/0/message/content"))
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if text.is_empty() {
        return Err("the summarizer answered no text".into());
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulators_know_a_summarizer_request_by_its_opening() {
        // sim/src/extractive.rs matches the instructions' first words; a new prompt must
        // keep them or change them there too.
        assert!(PROMPT.starts_with(llm_warden_sim::extractive::SUMMARIZER_PROMPT_OPENING));
    }

    #[test]
    fn transcripts_name_roles_tools_and_the_previous_summary() {
        let msgs = [
            json!({"role":"user","content":"what is the weather in Paris?"}),
            json!({"role":"assistant","content":"","tool_calls":[{"function":{"name":"weather","arguments":{"city":"Paris"}}}]}),
            json!({"role":"tool","content":"18C, sunny"}),
            json!({"role":"user","content":[{"type":"text","text":"and this?"},{"type":"image_url","image_url":{"url":"data:"}}]}),
        ];
        let refs: Vec<&Value> = msgs.iter().collect();
        let t = transcript(Some("They greeted."), &refs);
        assert_eq!(
            t,
            "Summary of the conversation so far:\nThey greeted.\n\nWhat followed:\n\
             user: what is the weather in Paris?\n\
             assistant:  [calls tool weather with {\"city\":\"Paris\"}]\n\
             tool: 18C, sunny\n\
             user: and this? [image]\n"
        );
    }
}
