//! Reading an inspected request: the body once, under the size limit, and the few fields the
//! proxy needs from it, **as the provider reads them**. The rest of the JSON is skipped by
//! serde, never copied.
//!
//! The fields the proxy acts on (model, stream, keep_alive, options, messages, ...) must be
//! the ones the provider acts on, or a request could be served outside the accounting and
//! its lease (issue 18: `{"model":"a","model":"b"}`, `"Model"`, `"stream"` twice were
//! served by Ollama while the proxy saw no model). So each provider's JSON reading is
//! followed ([`Dialect`], sources in docs/providers.md §1.1, §2.1 and §3.1):
//! - every provider takes the **last** value of a repeated key (Go's `encoding/json`,
//!   JavaScript's `JSON.parse`, nlohmann's `operator[]` in llama-server);
//! - Go matches a key to a field **case-insensitively** (Unicode simple folding: `"Model"`,
//!   `"MODEL"`, even `"ſtream"` with U+017F and `"\u212Aeep_alive"` with the Kelvin sign);
//!   `null` into a plain string field (`model`, `prompt`) changes nothing; a repeated
//!   `options` object is **merged** into the map the first one made; and gin's decoder reads
//!   the first JSON value and ignores what follows it;
//! - JavaScript and nlohmann are exact and strict (bytes after the object are an error).
//!
//! A body the proxy cannot read is [`Unreadable`], and then one question decides: would
//! every provider of that dialect refuse it too ([`Unreadable::provider_refuses`])? Then it
//! goes on unchanged, uncounted, for the provider's own error byte for byte (an empty body,
//! broken JSON syntax, an array): the provider does no model work for it. Otherwise the
//! provider might read a model the proxy cannot, so the client gets a 400 in its format and
//! nothing is forwarded: invalid UTF-8 and lone surrogate escapes (Go reads them as U+FFFD),
//! a `model` that is not a string (llama-server's `json_value` reads it as "" and, with one
//! model, serves the request). A readable object without a model also goes on, for the
//! provider's own answer (Ollama: 400 "model is required" on chat, 404 "model '' not found"
//! on generate and embed).

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ProxyError;

/// Whose JSON semantics a body is read with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Ollama: Go's `encoding/json` behind gin's `ShouldBindJSON` (a `json.Decoder`).
    Go,
    /// LM Studio: JavaScript's `JSON.parse`.
    JavaScript,
    /// llama-server: nlohmann::json's `json::parse`.
    Nlohmann,
}

/// Why a body cannot be read the provider's way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("the request body is empty; send a JSON object")]
    Empty,
    #[error("the request body is not valid UTF-8")]
    NotUtf8,
    #[error("the request body is not a JSON object: {0}")]
    NotAnObject(String),
    /// A JSON syntax error where a provider may read past what serde refuses (a `\uD800`
    /// escape without its pair: Go and JavaScript read it).
    #[error("the request body has an escape that is not a Unicode character: {0}")]
    BadEscape(String),
    #[error("`model` must be a string")]
    ModelNotAString,
}

impl Unreadable {
    /// Whether every provider of the dialect refuses such a body as well, doing no model
    /// work: then it may go on unchanged for the provider's own answer (see the module doc).
    pub fn provider_refuses(&self) -> bool {
        matches!(self, Unreadable::Empty | Unreadable::NotAnObject(_))
    }
}

/// A syntax error, unless the text holds a surrogate escape (`\uD800`–`\uDFFF`), which
/// serde refuses unpaired and Go and JavaScript read.
fn syntax_error(text: &str, e: &serde_json::Error) -> Unreadable {
    let surrogate = text.as_bytes().windows(4).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && w[2].eq_ignore_ascii_case(&b'd')
            && matches!(w[3].to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f')
    });
    if surrogate {
        Unreadable::BadEscape(e.to_string())
    } else {
        Unreadable::NotAnObject(e.to_string())
    }
}

/// The fields of a model request the proxy reads. Everything else stays in the raw bytes.
#[derive(Debug, Default)]
pub struct ModelRequest<'a> {
    /// Borrowed from the body unless it has escapes.
    pub model: Option<Cow<'a, str>>,
    pub stream: Option<bool>,
    /// Ollama's `keep_alive`, as written (`null` included, so its place in the body is known).
    pub keep_alive: Option<&'a RawValue>,
    /// Ollama generate's `prompt` and chat's `messages`, unparsed: only whether they are
    /// empty matters (a load or unload request, docs/providers.md §1.8).
    pub prompt: Option<&'a RawValue>,
    pub messages: Option<&'a RawValue>,
    /// Ollama `options` (for `num_ctx`, `num_predict`), unparsed: the one the provider reads
    /// last, where an edit goes (`null` included; [`Self::options_object`] without it).
    pub options: Option<&'a RawValue>,
    /// Go only: earlier `options` objects of the same body, which Go merges under the last
    /// one (empty unless the key repeats; no allocation then).
    options_before: Vec<&'a RawValue>,
    /// OpenAI reply limits, unparsed (a wrong type is the provider's to refuse).
    pub max_tokens: Option<&'a RawValue>,
    pub max_completion_tokens: Option<&'a RawValue>,
    /// The Responses API's reply limit.
    pub max_output_tokens: Option<&'a RawValue>,
    /// The Anthropic Messages API's top-level `system` (a string or text blocks): counted
    /// against the window when `messages` are compacted, never changed.
    pub system: Option<&'a RawValue>,
    /// The Responses API's `input` (a string or an array of items) and `instructions`
    /// (counted, never changed), and whether `previous_response_id` is set (then the
    /// conversation lives on the provider and is not compacted).
    pub input: Option<&'a RawValue>,
    pub instructions: Option<&'a RawValue>,
    pub previous_response_id: Option<&'a RawValue>,
}

/// What a request asks of the context: `num_ctx` (Ollama) and the most tokens of reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub num_ctx: Option<u64>,
    pub num_batch: Option<u64>,
    pub max_reply: Option<u64>,
}

/// The top-level fields the proxy reads, by the names the providers give them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Model,
    Stream,
    KeepAlive,
    Prompt,
    Messages,
    Options,
    MaxTokens,
    MaxCompletionTokens,
    System,
    Input,
    Instructions,
    PreviousResponseId,
    MaxOutputTokens,
}

const FIELDS: [(&str, Field); 13] = [
    ("model", Field::Model),
    ("stream", Field::Stream),
    ("keep_alive", Field::KeepAlive),
    ("prompt", Field::Prompt),
    ("messages", Field::Messages),
    ("options", Field::Options),
    ("max_tokens", Field::MaxTokens),
    ("max_completion_tokens", Field::MaxCompletionTokens),
    ("system", Field::System),
    ("input", Field::Input),
    ("instructions", Field::Instructions),
    ("previous_response_id", Field::PreviousResponseId),
    ("max_output_tokens", Field::MaxOutputTokens),
];

impl Dialect {
    /// The field a key names, as this provider matches keys to fields.
    fn field(self, key: &str) -> Option<Field> {
        if let Some((_, f)) = FIELDS.iter().find(|(name, _)| *name == key) {
            return Some(*f);
        }
        match self {
            Dialect::Go => FIELDS
                .iter()
                .find(|(name, _)| go_fold_eq(key, name))
                .map(|(_, f)| *f),
            Dialect::JavaScript | Dialect::Nlohmann => None,
        }
    }
}

/// Whether Go's `encoding/json` matches `key` to a field named `name` (ASCII, lower case):
/// `bytes.EqualFold`, Unicode simple case folding. The only non-ASCII runes that fold to an
/// ASCII letter are U+017F (ſ, to `s`) and U+212A (Kelvin sign, to `k`).
pub fn go_fold_eq(key: &str, name: &str) -> bool {
    let mut want = name.bytes();
    for c in key.chars() {
        let folded = match c {
            '\u{017F}' => b's',
            '\u{212A}' => b'k',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return false,
        };
        if want.next() != Some(folded) {
            return false;
        }
    }
    want.next().is_none()
}

/// A key, borrowed from the body unless it has escapes (serde borrows a `Cow<str>` only when
/// it is not wrapped).
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

/// Reads the top level of an object: the last value of each field the proxy reads.
struct TopLevel {
    dialect: Dialect,
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = Result<ModelRequest<'de>, Unreadable>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let go = self.dialect == Dialect::Go;
        let mut r = ModelRequest::default();
        let mut model_raw: Option<&'de RawValue> = None;
        while let Some(Borrowed(key)) = map.next_key::<Borrowed<'de>>()? {
            let Some(field) = self.dialect.field(&key) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let v: &'de RawValue = map.next_value()?;
            let null = v.get() == "null";
            match field {
                // Go: `null` into a string leaves it as it was.
                Field::Model if !(go && null) => model_raw = Some(v),
                Field::Model => {}
                Field::Stream => r.stream = serde_json::from_str(v.get()).ok(),
                Field::KeepAlive => r.keep_alive = Some(v),
                Field::Prompt if go && null => {}
                Field::Prompt => r.prompt = (!null).then_some(v),
                Field::Messages => r.messages = (!null).then_some(v),
                Field::Options => {
                    if null {
                        // A nil map: what came before is gone. The `null` is kept, so an
                        // edit replaces it rather than adding a key the provider reads
                        // before it (found by `fuzz/`'s `request_body`).
                        r.options_before.clear();
                        r.options = Some(v);
                    } else {
                        if go {
                            if let Some(earlier) = r.options.take() {
                                r.options_before.push(earlier);
                            }
                        }
                        r.options = Some(v);
                    }
                }
                Field::MaxTokens => r.max_tokens = (!null).then_some(v),
                Field::MaxCompletionTokens => r.max_completion_tokens = (!null).then_some(v),
                Field::System => r.system = (!null).then_some(v),
                Field::Input => r.input = (!null).then_some(v),
                Field::Instructions => r.instructions = (!null).then_some(v),
                Field::PreviousResponseId => r.previous_response_id = (!null).then_some(v),
                Field::MaxOutputTokens => r.max_output_tokens = (!null).then_some(v),
            }
        }
        if let Some(raw) = model_raw {
            if raw.get() != "null" {
                match serde_json::from_str::<Borrowed<'de>>(raw.get()) {
                    Ok(Borrowed(m)) => r.model = Some(m),
                    // A string serde cannot decode: a lone surrogate escape (Go reads it
                    // as U+FFFD).
                    Err(e) if raw.get().starts_with('"') => {
                        return Ok(Err(Unreadable::BadEscape(e.to_string())))
                    }
                    Err(_) => return Ok(Err(Unreadable::ModelNotAString)),
                }
            }
        }
        Ok(Ok(r))
    }
}

/// The Ollama options the proxy reads, merged over every `options` object in order (last
/// value of a key wins; keys are map keys, matched exactly).
#[derive(Default)]
struct OptionValues<'a> {
    num_ctx: Option<&'a RawValue>,
    num_batch: Option<&'a RawValue>,
    num_predict: Option<&'a RawValue>,
}

struct OptionsVisitor<'s, 'a>(&'s mut OptionValues<'a>);

impl<'de> Visitor<'de> for OptionsVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Borrowed(key)) = map.next_key::<Borrowed<'de>>()? {
            let slot = match &*key {
                "num_ctx" => &mut self.0.num_ctx,
                "num_batch" => &mut self.0.num_batch,
                "num_predict" => &mut self.0.num_predict,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(())
    }
}

impl<'a> ModelRequest<'a> {
    /// Reads `body` as `dialect`'s provider does (see the module doc). `Ok` with no model: a
    /// readable object that names none, which the provider answers itself.
    pub fn parse(body: &'a [u8], dialect: Dialect) -> Result<Self, Unreadable> {
        // A UTF-8 byte order mark: nlohmann skips it, Go refuses it; read past it (the worst
        // is a request counted that the provider then refuses).
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        let text = std::str::from_utf8(body).map_err(|_| Unreadable::NotUtf8)?;
        let start = text.trim_start_matches([' ', '\t', '\n', '\r']);
        match start.as_bytes().first() {
            None => return Err(Unreadable::Empty),
            Some(b'{') => {}
            // serde would read a struct from an array (`["llama3.2"]` named a model; seen
            // while writing `fuzz/`'s `request_body`).
            Some(_) => return Err(Unreadable::NotAnObject("it does not start with `{`".into())),
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let read = de
            .deserialize_map(TopLevel { dialect })
            .map_err(|e| syntax_error(text, &e))?;
        // gin's decoder stops after the first value; the others read the whole text.
        if dialect != Dialect::Go {
            de.end().map_err(|e| syntax_error(text, &e))?;
        }
        read
    }

    /// The last `options`, unless `null`: the object an edit of the runner options starts
    /// from.
    pub fn options_object(&self) -> Option<&'a str> {
        self.options.map(RawValue::get).filter(|o| *o != "null")
    }

    /// No prompt and no messages: Ollama's load-only (or, with `keep_alive: 0`, unload) form.
    pub fn is_load_only(&self) -> bool {
        let empty = |v: Option<&RawValue>, e: &str| {
            v.is_none_or(|r| r.get().chars().filter(|c| !c.is_whitespace()).eq(e.chars()))
        };
        empty(self.prompt, "\"\"") && empty(self.messages, "[]")
    }

    /// `options.num_ctx`, `options.num_batch` and the reply limit (`options.num_predict`,
    /// `max_completion_tokens`, `max_tokens`, the Responses API's `max_output_tokens`), each
    /// when a positive number (Ollama's options are a `map[string]any`: a number with a
    /// fraction is truncated to an integer, as its `Options.FromMap` does); `options` is
    /// read once.
    pub fn limits(&self) -> Limits {
        let mut o = OptionValues::default();
        for raw in self.options_before.iter().chain(self.options.as_ref()) {
            if raw.get() == "null" {
                continue;
            }
            let mut de = serde_json::Deserializer::from_str(raw.get());
            // Not an object: Ollama refuses the request; nothing to read here.
            let _ = de.deserialize_map(OptionsVisitor(&mut o));
        }
        let positive = |r: Option<&RawValue>| {
            let n: f64 = serde_json::from_str(r?.get()).ok()?;
            (n.is_finite() && n >= 1.0 && n < u64::MAX as f64).then_some(n as u64)
        };
        let n = |r: Option<&RawValue>| r.and_then(|r| r.get().trim().parse::<u64>().ok());
        Limits {
            num_ctx: positive(o.num_ctx),
            num_batch: positive(o.num_batch),
            max_reply: positive(o.num_predict)
                .or_else(|| n(self.max_completion_tokens))
                .or_else(|| n(self.max_tokens))
                .or_else(|| n(self.max_output_tokens)),
        }
    }

    /// The model name, if present and non-empty.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref().filter(|m| !m.is_empty())
    }
}

/// Reads the whole body, refusing more than `limit` bytes (checked against `Content-Length`
/// first, so an honest oversized upload is refused before it is read).
pub async fn read_body(
    headers: &HeaderMap,
    body: super::RequestBody,
    limit: u64,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    // Read by the server before the handler ran: nothing to wait for.
    if let super::RequestBody::Full(b) = body {
        let b = b.unwrap_or_default();
        if b.len() as u64 > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        return Ok(b);
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) => Err(
            match e.downcast_ref::<crate::transport::server::ClientBodyError>() {
                Some(e) => super::client_body_error(e),
                None => ProxyError::BodyRead(e.to_string()),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Dialect; 3] = [Dialect::Go, Dialect::JavaScript, Dialect::Nlohmann];

    fn read(body: &[u8], d: Dialect) -> ModelRequest<'_> {
        ModelRequest::parse(body, d).expect("readable")
    }

    #[test]
    fn reads_model_and_stream_and_skips_the_rest() {
        for d in ALL {
            let r = read(
                br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
                d,
            );
            assert_eq!(r.model(), Some("llama3.2"));
            assert!(
                matches!(r.model, Some(Cow::Borrowed(_))),
                "no copy of a plain name"
            );
            assert_eq!(r.stream, Some(false));
            assert_eq!(read(br#"{"model":"a\"b"}"#, d).model(), Some("a\"b"));
            assert_eq!(read(br#"{"model":"\u006c\u006c"}"#, d).model(), Some("ll"));
            let r = read(br#"{"model":null,"stream":true}"#, d);
            assert_eq!((r.model(), r.stream), (None, Some(true)));
            let r = read(br#"{"stream":true}"#, d);
            assert_eq!((r.model(), r.stream), (None, Some(true)));
        }
    }

    /// Issue 18: the provider's reading, not serde's (which refused duplicates and so saw
    /// no model at all).
    #[test]
    fn the_last_value_of_a_repeated_key_wins_for_every_provider() {
        for d in ALL {
            let r = read(
                br#"{"model":"a","stream":false,"model":"b","stream":true,"keep_alive":"1h","keep_alive":"5m"}"#,
                d,
            );
            assert_eq!(r.model(), Some("b"), "{d:?}");
            assert_eq!(r.stream, Some(true), "{d:?}");
            assert_eq!(r.keep_alive.map(RawValue::get), Some(r#""5m""#), "{d:?}");
            let r = read(
                br#"{"model":"a","messages":[],"messages":[{"role":"user"}]}"#,
                d,
            );
            assert!(!r.is_load_only(), "{d:?}: the last messages are not empty");
        }
    }

    #[test]
    fn go_matches_keys_case_insensitively_and_javascript_and_nlohmann_do_not() {
        for (body, model) in [
            (r#"{"Model":"a"}"#, "a"),
            (r#"{"MODEL":"a"}"#, "a"),
            (r#"{"model":"a","mOdEl":"b"}"#, "b"),
            (r#"{"Model":"a","model":"b"}"#, "b"),
            // \u escapes in a key are decoded before matching.
            (r#"{"\u004dodel":"c"}"#, "c"),
        ] {
            assert_eq!(
                read(body.as_bytes(), Dialect::Go).model(),
                Some(model),
                "{body}"
            );
        }
        let r = read(
            r#"{"model":"a","ſtream":true,"\u212Aeep_alive":0}"#.as_bytes(),
            Dialect::Go,
        );
        assert_eq!(r.stream, Some(true), "U+017F folds to s");
        assert_eq!(
            r.keep_alive.map(RawValue::get),
            Some("0"),
            "U+212A folds to k"
        );
        for d in [Dialect::JavaScript, Dialect::Nlohmann] {
            let r = read(br#"{"Model":"a","model":"b","STREAM":true}"#, d);
            assert_eq!((r.model(), r.stream), (Some("b"), None), "{d:?}");
        }
        assert!(go_fold_eq("KEEP_ALIVE", "keep_alive"));
        assert!(!go_fold_eq("keep_alivee", "keep_alive"));
        assert!(!go_fold_eq("keep_aliv", "keep_alive"));
        assert!(!go_fold_eq("modél", "model"));
    }

    #[test]
    fn go_ignores_null_for_a_string_field_and_merges_repeated_options() {
        let r = read(
            br#"{"model":"a","model":null,"prompt":"hi","prompt":null}"#,
            Dialect::Go,
        );
        assert_eq!(r.model(), Some("a"));
        assert!(!r.is_load_only());
        for d in [Dialect::JavaScript, Dialect::Nlohmann] {
            assert_eq!(
                read(br#"{"model":"a","model":null}"#, d).model(),
                None,
                "{d:?}"
            );
        }
        let body = br#"{"model":"m","options":{"num_ctx":8192,"num_predict":5},"options":{"num_ctx":4096.9}}"#;
        let go = read(body, Dialect::Go).limits();
        assert_eq!(
            (go.num_ctx, go.max_reply),
            (Some(4096), Some(5)),
            "merged, last value per key, truncated like FromMap"
        );
        let r = read(body, Dialect::Go);
        assert_eq!(
            r.options.map(RawValue::get),
            Some(r#"{"num_ctx":4096.9}"#),
            "edits go to the last"
        );
        let js = read(body, Dialect::JavaScript).limits();
        assert_eq!((js.num_ctx, js.max_reply), (Some(4096), None));
        let reset = read(
            br#"{"model":"m","options":{"num_ctx":8192},"options":null}"#,
            Dialect::Go,
        );
        assert_eq!(reset.limits(), Limits::default());
        let dup = read(
            br#"{"model":"m","options":{"num_ctx":1,"num_ctx":2048}}"#,
            Dialect::Go,
        );
        assert_eq!(dup.limits().num_ctx, Some(2048));
    }

    #[test]
    fn go_reads_the_first_value_and_ignores_what_follows_it() {
        let body = br#"{"model":"a","messages":[]} {"model":"b"} garbage"#;
        assert_eq!(read(body, Dialect::Go).model(), Some("a"));
        for d in [Dialect::JavaScript, Dialect::Nlohmann] {
            assert!(
                matches!(
                    ModelRequest::parse(body, d),
                    Err(Unreadable::NotAnObject(_))
                ),
                "{d:?}"
            );
        }
    }

    #[test]
    fn messages_and_responses_fields_are_read_as_spans() {
        for d in ALL {
            let body = br#"{"model":"m","system":[{"type":"text","text":"s"}],"messages":[],"instructions":"i","input":[{"role":"user","content":"hi"}],"previous_response_id":"resp_1","max_output_tokens":77}"#;
            let r = read(body, d);
            assert_eq!(
                r.system.map(RawValue::get),
                Some(r#"[{"type":"text","text":"s"}]"#)
            );
            assert_eq!(r.instructions.map(RawValue::get), Some(r#""i""#));
            assert_eq!(
                r.input.map(RawValue::get),
                Some(r#"[{"role":"user","content":"hi"}]"#)
            );
            assert!(r.previous_response_id.is_some());
            assert_eq!(r.limits().max_reply, Some(77));
            let r = read(br#"{"model":"m","previous_response_id":null}"#, d);
            assert!(r.previous_response_id.is_none(), "null: none");
        }
    }

    #[test]
    fn load_only_requests_are_recognised() {
        for (body, load_only) in [
            (r#"{"model":"m"}"#, true),
            (r#"{"model":"m","prompt":""}"#, true),
            (r#"{"model":"m","messages":[ ]}"#, true),
            (r#"{"model":"m","prompt":null,"keep_alive":0}"#, true),
            (r#"{"model":"m","prompt":"hi"}"#, false),
            (
                r#"{"model":"m","messages":[{"role":"user","content":""}]}"#,
                false,
            ),
        ] {
            assert_eq!(
                read(body.as_bytes(), Dialect::Go).is_load_only(),
                load_only,
                "{body}"
            );
        }
        let r = read(br#"{"model":"m","keep_alive":"5m"}"#, Dialect::Go);
        assert_eq!(r.keep_alive.map(|k| k.get()), Some(r#""5m""#));
        let r = read(br#"{"model":"m","keep_alive":null}"#, Dialect::Go);
        assert_eq!(r.keep_alive.map(|k| k.get()), Some("null"));
        assert!(read(br#"{"model":"m"}"#, Dialect::Go).keep_alive.is_none());
    }

    #[test]
    fn a_body_that_cannot_be_read_the_providers_way_is_unreadable() {
        for d in ALL {
            for (body, want) in [
                (&b""[..], Unreadable::Empty),
                (b"  \n", Unreadable::Empty),
                (b"{\"model\":\"m\xff\"}", Unreadable::NotUtf8),
                (b"{\"x\":\"\xc3\"}", Unreadable::NotUtf8),
                (b"{\"model\":5}", Unreadable::ModelNotAString),
                (b"{\"model\":[\"m\"]}", Unreadable::ModelNotAString),
            ] {
                assert_eq!(
                    ModelRequest::parse(body, d).err(),
                    Some(want),
                    "{d:?} {body:?}"
                );
            }
            for body in [
                &b"not json"[..],
                b"[1,2]",
                b"[\"m\"]",
                b"\"m\"",
                b"{\"model\":\"m\"",
                b"{\"model\":\"m\",}",
            ] {
                assert!(
                    matches!(
                        ModelRequest::parse(body, d),
                        Err(Unreadable::NotAnObject(_))
                    ),
                    "{d:?} {body:?}"
                );
            }
            // Readable objects that name no model: the provider's own answer.
            for body in [&b"{\"model\":\"\"}"[..], b"{}", b"{\"model\":null}"] {
                assert_eq!(read(body, d).model(), None, "{d:?}");
            }
            // A lone surrogate: Go reads U+FFFD, serde cannot; refused, never forwarded.
            let e = ModelRequest::parse(b"{\"model\":\"\\uD800\"}", d).unwrap_err();
            assert!(
                matches!(e, Unreadable::BadEscape(_)) && !e.provider_refuses(),
                "{e:?}"
            );
            for body in [&b""[..], b"[\"m\"]", b"{\"model\":"] {
                let e = ModelRequest::parse(body, d).unwrap_err();
                assert!(
                    e.provider_refuses(),
                    "{d:?} {body:?}: the provider's own error"
                );
            }
            for body in [&b"{\"model\":5}"[..], b"{\"model\":\"\xff\"}"] {
                let e = ModelRequest::parse(body, d).unwrap_err();
                assert!(
                    !e.provider_refuses(),
                    "{d:?} {body:?}: refused by the proxy"
                );
            }
            // A byte order mark is read past.
            assert_eq!(read(b"\xEF\xBB\xBF{\"model\":\"m\"}", d).model(), Some("m"));
        }
        // Deeper than serde's recursion limit in a skipped value: still read (skipping is
        // not recursive), as Go (limit 10,000) reads it.
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(read(deep.as_bytes(), Dialect::Go).model(), Some("m"));
    }
}
