//! Compaction of the two other conversation shapes: the Anthropic Messages API
//! (`/v1/messages`) and the OpenAI Responses API (`/v1/responses`). The stage
//! ([`super::compact`]) is the chat one; what differs is read here: the roles the planner
//! sees, what takes room without being compactable, and the summary's own message(s).
//!
//! **Messages** (top-level `system` + `messages` of `user`/`assistant` content blocks):
//! - the top-level `system` (a string or text blocks) is counted in the budget (as a
//!   system message the planner keeps) and never changed: the rewrite touches `messages` only;
//! - an `assistant` message with `tool_use` blocks owns the next `user` message(s) holding
//!   `tool_result` blocks ([`Role::Tool`]: any `tool_result` block makes it one, since every
//!   such block must follow its `tool_use`), so the planner's turns never part a call from
//!   its result and the first kept message is never an orphan `tool_result`; a
//!   `tool_result` further on than that (matched by `tool_use_id`) joins every message from
//!   its call's turn to it into one turn (`join_pairs`);
//! - the summary cannot be a `system` message: it is the first message, role `user`,
//!   marked as the proxy's summary of earlier turns. Kept messages stay byte for byte, so
//!   nothing is merged: when the first kept message is `user` too, a one-line `assistant`
//!   acknowledgement follows the summary, keeping Anthropic's alternation (user first,
//!   then alternating); when it is `assistant`, the summary alone does. Truncation
//!   (`truncate_oldest`, or a failed summarizer) keeps this too: when the kept messages
//!   would start with the assistant's, a `user` message saying how many were dropped goes
//!   first ([`dropped_marker`]; room for it is kept in the plan).
//!
//! **Responses** (`instructions` + `input`):
//! - `instructions` is counted and never changed; `input` as a string is one turn (nothing
//!   to compact); as an array of items it is compacted: `system`/`developer` messages are
//!   kept like chat's system messages; a run of output items (assistant messages,
//!   `reasoning`, `function_call`s) and the `function_call_output`s after it form one turn
//!   (outputs pair with the calls of the run before them, as clients send them), so a call
//!   never loses its output; an output sent further on (matched by `call_id`) joins every
//!   item from its call's turn to it into one turn, so the two are kept or summarized
//!   together however far apart they are; `*_call_output` items of other tools pair the
//!   same way; the summary is a `system` message item in the first evicted item's place
//!   (the Responses API accepts `system` and `developer` input messages);
//! - with `previous_response_id` the conversation lives on the provider: the proxy sees
//!   only the new items and cannot compact it. Such a request is forwarded unchanged, and
//!   when its input alone is over the budget the `/status` event says `not_compacted` with
//!   the reason (whatever `on_overflow` says: the provider's own window error applies).
//!
//! Pruning ([`super::prune`]) runs on both, with the same rules: duplicates are looked for
//! in `content` strings, `text` blocks and the `content` of `tool_result` blocks, a string
//! or the text blocks of an array (Messages), `input_text` / `output_text` parts and
//! `function_call_output` `output`s, a string or the `input_text` parts of an array
//! (Responses). Answered images become a part of the same array holding the marker:
//! Anthropic `image` blocks (also inside a `tool_result`) a `text` block, Responses
//! `input_image` parts (also in a `function_call_output`'s array) an `input_text` part.

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::Value;

use super::plan::Role;

/// Which API the conversation is in, with what it takes room for besides the compactable
/// array.
#[derive(Clone, Copy, Debug, Default)]
pub enum Api<'a> {
    /// OpenAI chat completions and Ollama chat: `messages`.
    #[default]
    Chat,
    /// Anthropic Messages: `messages`, with the top-level `system`.
    Messages { system: Option<&'a RawValue> },
    /// OpenAI Responses: `input` items, with `instructions`; `previous_response_id` set:
    /// not compactable.
    Responses {
        instructions: Option<&'a RawValue>,
        previous_response_id: bool,
    },
}

impl<'a> Api<'a> {
    /// What takes room but is not in the array (the system prompt), raw.
    pub fn fixed(&self) -> Option<&'a RawValue> {
        match *self {
            Api::Chat => None,
            Api::Messages { system } => system,
            Api::Responses { instructions, .. } => instructions,
        }
    }

    /// The fixed system prompt as a message the counter reads (a string or text blocks as
    /// its `content`).
    pub fn fixed_message(&self) -> Option<Box<RawValue>> {
        let raw = self.fixed()?;
        RawValue::from_string(format!(r#"{{"role":"system","content":{}}}"#, raw.get())).ok()
    }

    /// The planner's role of each entry of the array.
    pub fn roles(&self, values: &[Value]) -> Vec<Role> {
        match self {
            Api::Chat => values.iter().map(role_of).collect(),
            Api::Messages { .. } => messages_roles(values),
            Api::Responses { .. } => responses_roles(values),
        }
    }

    /// The raw entries standing for a summary of `n` earlier messages, placed before
    /// `next` (the first kept entry, if any).
    pub fn summary(&self, text: &str, n: usize, next: Option<&Value>) -> String {
        let content = summary_text(text, n);
        match self {
            Api::Chat | Api::Responses { .. } => {
                serde_json::json!({"role": "system", "content": content}).to_string()
            }
            Api::Messages { .. } => {
                let user = serde_json::json!({"role": "user", "content": content}).to_string();
                let next_is_user = next
                    .and_then(|v| v.get("role"))
                    .and_then(Value::as_str)
                    .is_none_or(|r| r != "assistant");
                if next_is_user {
                    let ack = serde_json::json!({"role": "assistant", "content": ACK});
                    format!("{user},{ack}")
                } else {
                    user
                }
            }
        }
    }
}

/// The assistant's side of the summary, in the Messages API, when the kept messages start
/// with a user message (roles must alternate; the kept ones are not merged).
pub const ACK: &str = "Understood: that is the summary of our earlier conversation.";

/// Messages, when truncating leaves the assistant's message first: the `user` message put
/// before it (the first message is a user's), saying what was dropped.
pub fn dropped_marker(n: usize) -> String {
    let content = format!(
        "[llm-warden: the {n} earlier messages of this conversation were dropped to fit the model's context window]"
    );
    serde_json::json!({"role": "user", "content": content}).to_string()
}

/// The summary's text, marked as the proxy's.
pub fn summary_text(text: &str, n: usize) -> String {
    format!(
        "Summary of the {n} earlier messages of this conversation (condensed by llm-warden to fit the model's context window):\n{}",
        text.trim()
    )
}

fn blocks(v: &Value) -> &[Value] {
    v.get("content")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn has_block(v: &Value, kind: &str) -> bool {
    blocks(v)
        .iter()
        .any(|b| b.get("type").and_then(Value::as_str) == Some(kind))
}

/// Messages API roles: `assistant` (a caller when it has `tool_use` blocks), `user` holding
/// `tool_result` blocks as a tool result, any other `user`; a `tool_result` that is not in
/// the messages right after its `tool_use` joins them into one turn (`join_pairs`).
pub fn messages_roles(values: &[Value]) -> Vec<Role> {
    let mut roles: Vec<Role> = values
        .iter()
        .map(|v| match v.get("role").and_then(Value::as_str) {
            Some("assistant") => Role::Assistant {
                tool_calls: has_block(v, "tool_use"),
            },
            _ if has_block(v, "tool_result") => Role::Tool,
            _ => Role::User,
        })
        .collect();
    let mut calls: HashMap<&str, usize> = HashMap::new();
    let mut links = Vec::new();
    for (i, v) in values.iter().enumerate() {
        for b in blocks(v) {
            let id = |key| b.get(key).and_then(Value::as_str);
            match b.get("type").and_then(Value::as_str) {
                Some("tool_use") => {
                    if let Some(id) = id("id") {
                        calls.insert(id, i);
                    }
                }
                Some("tool_result") => {
                    if let Some(&c) = id("tool_use_id").and_then(|id| calls.get(id)) {
                        links.push((c, i));
                    }
                }
                _ => {}
            }
        }
    }
    join_pairs(&mut roles, &links);
    roles
}

/// Makes each call and its result (`links`: the call's index, the result's) one turn of the
/// planner, however far apart they are: every entry from the start of the call's turn to
/// the result (system ones aside, which no turn holds) becomes part of it, the start a
/// caller owning the rest. So a plan keeps or evicts a call and its result together, and
/// pruning's protected last turn holds both. A user message between them is then part of
/// the call's turn (for pruning too: not "the last user message"). A result before its
/// call is left alone.
fn join_pairs(roles: &mut [Role], links: &[(usize, usize)]) {
    for &(call, result) in links {
        if call >= result || result >= roles.len() {
            continue;
        }
        // The turn's start: a call is an assistant message, or an output item after one in
        // its run (`Tool` here), or inside a turn already joined (whose start is a caller).
        let Some(start) = roles[..=call]
            .iter()
            .rposition(|r| matches!(r, Role::Assistant { .. } | Role::User))
        else {
            continue;
        };
        roles[start] = Role::Assistant { tool_calls: true };
        for r in &mut roles[start + 1..=result] {
            if *r != Role::System {
                *r = Role::Tool;
            }
        }
    }
}

/// Chat roles: `system` and `developer` messages are system, `tool` a tool result, an
/// assistant with `tool_calls` a caller.
pub fn role_of(v: &Value) -> Role {
    match v.get("role").and_then(Value::as_str) {
        Some("system") | Some("developer") => Role::System,
        Some("assistant") => Role::Assistant {
            tool_calls: v
                .get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty()),
        },
        Some("tool") => Role::Tool,
        _ => Role::User,
    }
}

/// What a Responses input item is to the planner.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Item {
    System,
    User,
    /// Model output: an assistant message, `reasoning`, a `function_call`, anything else.
    Output,
    CallOutput,
}

fn item(v: &Value) -> Item {
    match v.get("type").and_then(Value::as_str) {
        // `function_call_output`, and the other tools' (`custom_tool_call_output`, …).
        Some(t) if t.ends_with("_call_output") => Item::CallOutput,
        None | Some("message") => match v.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Item::System,
            Some("assistant") => Item::Output,
            _ => Item::User,
        },
        _ => Item::Output,
    }
}

/// Responses API roles: a run of output items and the call outputs after it is one turn
/// (its first item a caller owning the rest), system and developer messages are system; an
/// output sent further on than that run joins everything from its call's turn to it into
/// one turn (matched by `call_id`, `join_pairs`).
pub fn responses_roles(values: &[Value]) -> Vec<Role> {
    let mut roles = responses_runs(values);
    let mut calls: HashMap<&str, usize> = HashMap::new();
    let mut links = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match (item(v), v.get("call_id").and_then(Value::as_str)) {
            (Item::Output, Some(id)) => {
                calls.insert(id, i);
            }
            (Item::CallOutput, Some(id)) => {
                if let Some(&c) = calls.get(id) {
                    links.push((c, i));
                }
            }
            _ => {}
        }
    }
    join_pairs(&mut roles, &links);
    roles
}

/// The roles by position alone: each run of output items with the call outputs after it.
fn responses_runs(values: &[Value]) -> Vec<Role> {
    let kinds: Vec<Item> = values.iter().map(item).collect();
    let mut roles = Vec::with_capacity(values.len());
    let mut i = 0;
    while i < kinds.len() {
        match kinds[i] {
            Item::System => {
                roles.push(Role::System);
                i += 1;
            }
            Item::User => {
                roles.push(Role::User);
                i += 1;
            }
            // An output without its call before it: a turn of its own.
            Item::CallOutput => {
                roles.push(Role::Tool);
                i += 1;
            }
            Item::Output => {
                let start = i;
                while i < kinds.len() && kinds[i] == Item::Output {
                    i += 1;
                }
                while i < kinds.len() && kinds[i] == Item::CallOutput {
                    i += 1;
                }
                roles.push(Role::Assistant {
                    tool_calls: i - start > 1,
                });
                roles.extend(std::iter::repeat_n(Role::Tool, i - start - 1));
            }
        }
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::plan::{self, Budget, Plan};
    use serde_json::json;

    const CALL: Role = Role::Assistant { tool_calls: true };
    const SAY: Role = Role::Assistant { tool_calls: false };

    #[test]
    fn messages_roles_keep_tool_use_with_its_result() {
        let msgs = vec![
            json!({"role":"user","content":"read it"}),
            json!({"role":"assistant","content":[{"type":"text","text":"ok"},{"type":"tool_use","id":"t1","name":"read","input":{}}]}),
            json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"data"}]}),
            json!({"role":"assistant","content":"done"}),
            json!({"role":"user","content":[{"type":"text","text":"next"}]}),
        ];
        assert_eq!(
            messages_roles(&msgs),
            vec![Role::User, CALL, Role::Tool, SAY, Role::User]
        );
        // The call and its result move together: the first kept message is never a
        // tool_result whose tool_use was evicted.
        let roles = messages_roles(&msgs);
        let b = Budget {
            prompt: 35,
            tail: 25,
            summary: 5,
        };
        match plan::plan(&roles, &[10, 10, 30, 10, 10], b) {
            Plan::Compact { evict, .. } => assert_eq!(evict, vec![0, 1, 2]),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn responses_roles_pair_calls_and_outputs() {
        let items = vec![
            json!({"role":"developer","content":"be brief"}),
            json!({"role":"user","content":"weather?"}),
            json!({"type":"reasoning","id":"r1","summary":[]}),
            json!({"type":"function_call","call_id":"c1","name":"w","arguments":"{}"}),
            json!({"type":"function_call","call_id":"c2","name":"w","arguments":"{}"}),
            json!({"type":"function_call_output","call_id":"c1","output":"sun"}),
            json!({"type":"function_call_output","call_id":"c2","output":"rain"}),
            json!({"type":"message","role":"assistant","content":[{"type":"output_text","text":"mixed"}]}),
            json!({"role":"user","content":"thanks"}),
            json!({"type":"function_call_output","call_id":"zz","output":"stray"}),
        ];
        assert_eq!(
            responses_roles(&items),
            vec![
                Role::System,
                Role::User,
                CALL,
                Role::Tool,
                Role::Tool,
                Role::Tool,
                Role::Tool,
                SAY,
                Role::User,
                Role::Tool
            ]
        );
    }

    /// Every plan over `roles` with these `tokens`, as the budget's prompt and tail shrink.
    fn plans(roles: &[Role], tokens: &[u64]) -> Vec<Vec<usize>> {
        let total: u64 = tokens.iter().sum();
        (1..total)
            .flat_map(|prompt| {
                (1..=prompt).step_by(3).filter_map(move |tail| {
                    let b = Budget {
                        prompt,
                        tail,
                        summary: 2,
                    };
                    match plan::plan(roles, tokens, b) {
                        Plan::Compact { evict, .. } => Some(evict),
                        _ => None,
                    }
                })
            })
            .collect()
    }

    #[test]
    fn a_responses_output_far_from_its_call_is_planned_with_it() {
        let items = vec![
            json!({"role":"user","content":"read both files"}),
            json!({"type":"function_call","call_id":"c1","name":"read","arguments":"{}"}),
            json!({"type":"message","role":"assistant","content":[{"type":"output_text","text":"reading"}]}),
            json!({"role":"developer","content":"tools may be slow"}),
            json!({"role":"user","content":"hurry"}),
            json!({"type":"function_call_output","call_id":"c1","output":"file one"}),
            json!({"type":"message","role":"assistant","content":[{"type":"output_text","text":"done"}]}),
            json!({"role":"user","content":"thanks"}),
        ];
        // Before: 1 and 5 were separate turns (the output a stray one); now one turn.
        assert_eq!(
            responses_roles(&items),
            vec![
                Role::User,
                CALL,
                Role::Tool,
                Role::System,
                Role::Tool,
                Role::Tool,
                SAY,
                Role::User
            ]
        );
        let roles = responses_roles(&items);
        let tokens = [10, 10, 10, 5, 10, 30, 10, 10];
        let all = plans(&roles, &tokens);
        assert!(
            all.iter().any(|e| e.contains(&1)),
            "some plan evicts the call"
        );
        for evict in all {
            assert_eq!(evict.contains(&1), evict.contains(&5), "{evict:?}");
            assert!(!evict.contains(&3), "the developer message stays");
        }
    }

    #[test]
    fn a_tool_result_far_from_its_tool_use_is_planned_with_it() {
        let msgs = vec![
            json!({"role":"user","content":"read it"}),
            json!({"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"read","input":{}}]}),
            json!({"role":"user","content":"still there?"}),
            json!({"role":"assistant","content":"waiting for the tool"}),
            json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"data"}]}),
            json!({"role":"assistant","content":"done"}),
            json!({"role":"user","content":"next"}),
        ];
        assert_eq!(
            messages_roles(&msgs),
            vec![
                Role::User,
                CALL,
                Role::Tool,
                Role::Tool,
                Role::Tool,
                SAY,
                Role::User
            ]
        );
        let roles = messages_roles(&msgs);
        let all = plans(&roles, &[10, 10, 10, 10, 30, 10, 10]);
        assert!(all.iter().any(|e| e.contains(&1)));
        for evict in all {
            assert_eq!(evict.contains(&1), evict.contains(&4), "{evict:?}");
        }
    }

    #[test]
    fn the_messages_summary_keeps_roles_alternating() {
        let api = Api::Messages { system: None };
        let user = json!({"role":"user","content":"q"});
        let assistant = json!({"role":"assistant","content":"a"});
        let s = api.summary("They talked.", 3, Some(&user));
        let parsed: Vec<Value> = serde_json::from_str(&format!("[{s}]")).expect("json");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0]["role"], "user");
        assert_eq!(parsed[1], json!({"role":"assistant","content":ACK}));
        assert!(parsed[0]["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("Summary of the 3 earlier messages")
                && c.ends_with("They talked.")));
        let s = api.summary("They talked.", 3, Some(&assistant));
        let parsed: Vec<Value> = serde_json::from_str(&format!("[{s}]")).expect("json");
        assert_eq!(parsed.len(), 1);
        let r = Api::Responses {
            instructions: None,
            previous_response_id: false,
        };
        let parsed: Value = serde_json::from_str(&r.summary("x", 2, None)).expect("json");
        assert_eq!(parsed["role"], "system");
    }
}
