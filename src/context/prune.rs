//! Pruning: a cheap, deterministic step before a conversation is summarized or truncated.
//! Agent clients (coding agents, tool loops) resend the same large content again and again: a
//! file read five times, a test run repeated, a screenshot already answered. Pruning drops
//! the earlier copies of large content, and images already answered, from the older turns,
//! without a model call; what is left is counted again, and only if it still does not fit
//! is it summarized (or truncated), so the summarizer reads less and is called less.
//!
//! Pure: no I/O, no token counting. For each message, either "unchanged" (the caller keeps
//! its raw bytes) or its replacement (raw JSON).
//!
//! Rules, and why:
//! - **Only older messages change.** System and developer messages, the last user message
//!   and the last turn as the planner counts turns (a call with its results, or one
//!   message) are never modified: they are what the model must answer now. In an agent's
//!   tool loop the earlier calls' results are older turns (the model has acted on them), so
//!   a file read three times in one loop keeps only its last read whole, as a summary
//!   would evict those steps too. A copy in a protected message still counts as a *later
//!   copy* of an older one.
//! - **Duplicates.** A message's `content` string, or a text part (`{"type":"text","text":…}`,
//!   the Responses API's `input_text` / `output_text`) of a content array, the `content` of
//!   an Anthropic `tool_result` block (a string, or a text block of its array), or a
//!   Responses `function_call_output`'s `output` (a string, or an `input_text` part of its
//!   array), of at least [`MIN_BYTES`] bytes whose text appears again in a later message
//!   (in any of those places, any role) is replaced by a marker (see
//!   [`duplicate_marker`]): the latest copy stays whole. "Appears again" is near-exact:
//!   compared after [`normalized`] (CRLF as LF, trailing spaces of each line and blank lines
//!   at either end dropped), so a tool that prints the same file with other line endings
//!   still matches.
//! - **Answered images.** The images of a message before the last user message, when an
//!   assistant message follows it (within the current tool loop the task's images stay):
//!   Ollama's `images: [base64…]` key is dropped and a marker appended to its `content`;
//!   an image part becomes a text part of the same API holding the marker: OpenAI's
//!   `{"type":"image_url",…}` and Anthropic's `{"type":"image",…}` (also in a `tool_result`
//!   block's array) a `text` part, the Responses API's `input_image` (also in a
//!   `function_call_output`'s `output` array) an `input_text` part.
//! - **Byte-stable from turn to turn.** A marker depends only on the content it stands for
//!   (its size in bytes, its number of images), never on where the later copy is; and a
//!   conversation only grows, so once a message has a later copy it keeps one. The same old
//!   message prunes to the same bytes on every later turn: the provider's prefix cache keeps
//!   hitting, and the summary cache (keyed by the evicted messages' bytes) too. The one
//!   change is the turn where a later copy first appears.
//! - **Nothing else changes.** Only the content string, the one text part (or
//!   `tool_result` content, or `output`), or the images are replaced; every other key
//!   (`role`, `tool_calls` and their arguments, `tool_call_id`, `name`, …), its value and
//!   the order of keys stay byte for byte: the new values are spliced into the message's
//!   own bytes.
//! - **Not touched:** content below [`MIN_BYTES`] (short repeated phrases carry the
//!   conversation's meaning and save little), `tool_calls` arguments (an edit's own text is
//!   the record of what was changed), and a message the splice cannot read (left as it is).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use super::plan::Role;

/// The least content (bytes of text) pruned as a duplicate. A marker takes about 100 bytes:
/// below 512 it saves little, and short texts repeated ("run the tests again", "done") are
/// part of what the conversation says, not resent payload.
pub const MIN_BYTES: usize = 512;

/// What pruning did to a conversation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// For each message: `None` = unchanged, else its replacement (raw JSON).
    pub messages: Vec<Option<String>>,
    /// Contents and text parts replaced by a marker.
    pub duplicates: u32,
    /// Images removed.
    pub images: u32,
    /// Bytes the replaced messages lost.
    pub bytes: u64,
}

impl Pruned {
    /// Whether any message changed.
    pub fn changed(&self) -> bool {
        self.messages.iter().any(Option::is_some)
    }
}

/// The marker that stands for `bytes` bytes of content repeated later.
pub fn duplicate_marker(bytes: usize) -> String {
    format!(
        "[llm-warden: {} bytes pruned here; the same content appears again later in this conversation]",
        thousands(bytes as u64)
    )
}

/// The marker for `n` images removed from a message already answered.
pub fn image_marker(n: usize) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("[llm-warden: {n} image{s} removed; already answered]")
}

/// `4213` → `4,213`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The text two copies are compared by: CRLF as LF, trailing whitespace of each line and
/// blank lines at either end dropped.
pub fn normalized(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').map(str::trim_end).collect();
    let start = lines
        .iter()
        .position(|l| !l.is_empty())
        .unwrap_or(lines.len());
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(start, |e| e + 1);
    lines[start..end].join("\n")
}

/// Where a text sits in a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// The `content` string.
    Content,
    /// The part at this index of the `content` array: a text part (`text`, and the
    /// Responses API's `input_text` / `output_text`) or an Anthropic `tool_result` block
    /// whose `content` is a string.
    Part(usize),
    /// The text block at index `.1` of the `content` array of the Anthropic `tool_result`
    /// block at index `.0`.
    Nested(usize, usize),
    /// A Responses `function_call_output`'s `output` string.
    Output,
    /// The `input_text` part at this index of a `function_call_output`'s `output` array.
    OutputPart(usize),
}

/// The part types that hold their text in `text`.
fn is_text(kind: &str) -> bool {
    matches!(kind, "text" | "input_text" | "output_text")
}

fn kind(part: &Value) -> &str {
    part.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// The text parts of a parts array, placed by `place`.
fn part_texts(parts: &[Value], place: impl Fn(usize) -> Place) -> Vec<(Place, &str)> {
    parts
        .iter()
        .enumerate()
        .filter(|(_, p)| is_text(kind(p)))
        .filter_map(|(k, p)| Some((place(k), p.get("text")?.as_str()?)))
        .collect()
}

/// The large texts of a message, with their places.
fn texts(v: &Value) -> Vec<(Place, &str)> {
    let mut found = Vec::new();
    match v.get("content") {
        Some(Value::String(s)) => found.push((Place::Content, s.as_str())),
        Some(Value::Array(parts)) => {
            for (k, p) in parts.iter().enumerate() {
                match (kind(p), p.get("content")) {
                    ("tool_result", Some(Value::String(s))) => found.push((Place::Part(k), s)),
                    ("tool_result", Some(Value::Array(inner))) => {
                        found.extend(part_texts(inner, |m| Place::Nested(k, m)));
                    }
                    (t, _) if is_text(t) => {
                        if let Some(text) = p.get("text").and_then(Value::as_str) {
                            found.push((Place::Part(k), text));
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    match v.get("output") {
        Some(Value::String(o)) => found.push((Place::Output, o.as_str())),
        Some(Value::Array(parts)) => found.extend(part_texts(parts, Place::OutputPart)),
        _ => {}
    }
    found
        .into_iter()
        .filter(|(_, t)| t.len() >= MIN_BYTES)
        .collect()
}

/// The text part that stands for an image part of type `kind` in the same array (`None`:
/// not an image): OpenAI chat's `image_url` and Anthropic's `image` become a `text` part,
/// the Responses API's `input_image` an `input_text` part.
fn stand_in(kind: &str) -> Option<&'static str> {
    match kind {
        "image_url" | "image" => Some("text"),
        "input_image" => Some("input_text"),
        _ => None,
    }
}

/// Whether a parts array holds an image part, also inside a `tool_result` block.
fn has_image_part(parts: Option<&Value>) -> bool {
    parts.and_then(Value::as_array).is_some_and(|parts| {
        parts.iter().any(|p| {
            stand_in(kind(p)).is_some()
                || (kind(p) == "tool_result" && has_image_part(p.get("content")))
        })
    })
}

/// Prunes the older messages of a conversation (see the module doc). `values` and `roles`
/// are those of `raws`, in order.
pub fn prune(raws: &[&RawValue], values: &[Value], roles: &[Role]) -> Pruned {
    let mut out = Pruned {
        messages: vec![None; raws.len()],
        ..Pruned::default()
    };
    // No user message: nothing is older than the turn being answered.
    let Some(last_user) = roles.iter().rposition(|r| *r == Role::User) else {
        return out;
    };
    // The last turn as the planner counts it: from there on nothing changes.
    let last_turn = super::plan::turns(roles)
        .last()
        .and_then(|t| t.first().copied())
        .unwrap_or(last_user);
    let last_assistant = roles
        .iter()
        .rposition(|r| matches!(r, Role::Assistant { .. }));
    // The last message each large text appears in.
    let mut last_seen: HashMap<String, usize> = HashMap::new();
    for (i, v) in values.iter().enumerate() {
        for (_, t) in texts(v) {
            last_seen.insert(normalized(t), i);
        }
    }
    for i in 0..last_turn {
        if roles[i] == Role::System || i == last_user {
            continue;
        }
        let v = &values[i];
        let repeated: Vec<(Place, usize)> = texts(v)
            .into_iter()
            .filter(|(_, t)| last_seen.get(&normalized(t)).is_some_and(|&j| j > i))
            .map(|(p, t)| (p, t.len()))
            .collect();
        let answered = i < last_user && last_assistant.is_some_and(|a| a > i);
        if let Some((raw, dups, images)) = rewrite(raws[i].get(), v, &repeated, answered) {
            out.bytes += raws[i].get().len().saturating_sub(raw.len()) as u64;
            out.duplicates += dups;
            out.images += images;
            out.messages[i] = Some(raw);
        }
    }
    out
}

/// The keys of a JSON object and their raw values, in the order they are written.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Entries<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    fn find(&self, key: &str) -> Option<(usize, &'a RawValue)> {
        // The last of duplicate keys is the one a reader keeps.
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, (k, _))| k == key)
            .map(|(i, (_, v))| (i, *v))
    }
}

/// Where `inner` (a slice of `outer`) sits in `outer`.
fn span(outer: &str, inner: &str) -> Range<usize> {
    let start = (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize);
    start..start + inner.len()
}

fn quoted(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The edits to one message: byte ranges of its raw text and what replaces them.
struct Edits<'m> {
    msg: &'m str,
    list: Vec<(Range<usize>, String)>,
    repeated: &'m [(Place, usize)],
    answered: bool,
    dups: u32,
    images: u32,
}

impl<'m> Edits<'m> {
    /// Replaces `inner` (a slice of the message) by `text`.
    fn replace(&mut self, inner: &str, text: String) {
        self.list.push((span(self.msg, inner), text));
    }

    /// The size of the repeated text at `place`, if it is one.
    fn dup_of(&self, place: Place) -> Option<usize> {
        self.repeated
            .iter()
            .find(|(p, _)| *p == place)
            .map(|(_, n)| *n)
    }

    /// Edits a parts array (`raw`, a slice of the message, and its value): an image part,
    /// if answered, becomes a text part holding the marker; a repeated text (a text part's
    /// `text`, a `tool_result` block's string `content`) becomes the duplicate marker; a
    /// `tool_result` block's own parts array (`nested`: not inside one already) is edited
    /// the same way. `None`: the array cannot be read for a splice.
    fn parts(
        &mut self,
        raw: &'m RawValue,
        parts: &[Value],
        place: &dyn Fn(usize) -> Place,
        nested: bool,
    ) -> Option<()> {
        let raw_parts: Vec<&'m RawValue> = serde_json::from_str(raw.get()).ok()?;
        if raw_parts.len() != parts.len() {
            return None;
        }
        for (k, (rp, p)) in raw_parts.into_iter().zip(parts).enumerate() {
            let kind = kind(p);
            if let Some(text_kind) = stand_in(kind).filter(|_| self.answered) {
                self.images += 1;
                let part = serde_json::json!({"type": text_kind, "text": image_marker(1)});
                self.replace(rp.get(), part.to_string());
            } else if let Some(n) = self.dup_of(place(k)) {
                let key = if kind == "tool_result" {
                    "content"
                } else {
                    "text"
                };
                let (_, text) = Entries::parse(rp.get())?.find(key)?;
                self.dups += 1;
                self.replace(text.get(), quoted(&duplicate_marker(n)));
            } else if let (false, "tool_result", Some(Value::Array(inner))) =
                (nested, kind, p.get("content"))
            {
                let (_, inner_raw) = Entries::parse(rp.get())?.find("content")?;
                self.parts(inner_raw, inner, &|m| Place::Nested(k, m), true)?;
            }
        }
        Some(())
    }
}

/// Message `msg` (raw) with the texts at `repeated` replaced by markers and, if `answered`,
/// its images removed: the new raw message, the duplicates and images it lost; `None` when
/// nothing changes (or the message cannot be read for a splice).
fn rewrite(
    msg: &str,
    v: &Value,
    repeated: &[(Place, usize)],
    answered: bool,
) -> Option<(String, u32, u32)> {
    let ollama_images = v
        .get("images")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let image_parts = has_image_part(v.get("content")) || has_image_part(v.get("output"));
    let strip = answered && ollama_images > 0;
    if repeated.is_empty() && !(answered && (ollama_images > 0 || image_parts)) {
        return None;
    }
    let entries = Entries::parse(msg)?;
    let content = entries.find("content");
    let mut e = Edits {
        msg,
        list: Vec::new(),
        repeated,
        answered,
        dups: 0,
        images: 0,
    };
    match (content, v.get("content")) {
        (Some((_, raw)), Some(Value::String(text))) => {
            let mut new = match e.dup_of(Place::Content) {
                Some(n) => {
                    e.dups += 1;
                    duplicate_marker(n)
                }
                None => text.clone(),
            };
            if strip {
                if !new.is_empty() {
                    new.push('\n');
                }
                new.push_str(&image_marker(ollama_images));
            }
            if new != *text {
                e.replace(raw.get(), quoted(&new));
            }
        }
        (Some((_, raw)), Some(Value::Array(parts))) => {
            e.parts(raw, parts, &Place::Part, false)?;
        }
        (Some((_, raw)), _) if strip => {
            // `"content": null` with images: the marker is the content.
            e.replace(raw.get(), quoted(&image_marker(ollama_images)));
        }
        _ => {}
    }
    match (e.dup_of(Place::Output), v.get("output")) {
        (Some(n), _) => {
            let (_, raw) = entries.find("output")?;
            e.dups += 1;
            e.replace(raw.get(), quoted(&duplicate_marker(n)));
        }
        (None, Some(Value::Array(parts))) => {
            let (_, raw) = entries.find("output")?;
            e.parts(raw, parts, &Place::OutputPart, true)?;
        }
        _ => {}
    }
    let Edits {
        mut list,
        dups,
        mut images,
        ..
    } = e;
    if strip {
        let (e, _) = entries.find("images")?;
        let value = |i: usize| span(msg, entries.0[i].1.get());
        let has_content = content.is_some();
        let added = |lead: &str, tail: &str| {
            if has_content {
                String::new()
            } else {
                format!(
                    "{lead}\"content\":{}{tail}",
                    quoted(&image_marker(ollama_images))
                )
            }
        };
        let range = if e > 0 {
            // From the end of the entry before: `,"images":[…]` goes.
            (value(e - 1).end..value(e).end, added(",", ""))
        } else {
            // From its key (the whitespace before it stays).
            let open = msg.find('{')? + 1;
            let open = open + msg[open..].find('"')?;
            let end = value(0).end;
            if entries.0.len() > 1 {
                // The first entry, and the comma after it.
                let comma = end + msg[end..].find(',')? + 1;
                (open..comma, added("", ","))
            } else {
                (open..end, added("", ""))
            }
        };
        list.push(range);
        images += ollama_images as u32;
    }
    if list.is_empty() {
        return None;
    }
    list.sort_by_key(|(r, _)| r.start);
    let mut new = String::with_capacity(msg.len());
    let mut at = 0;
    for (r, text) in &list {
        if r.start < at {
            return None;
        }
        new.push_str(&msg[at..r.start]);
        new.push_str(text);
        at = r.end;
    }
    new.push_str(&msg[at..]);
    Some((new, dups, images))
}

#[cfg(test)]
#[path = "prune_tests.rs"]
mod tests;
