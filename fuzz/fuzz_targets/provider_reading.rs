//! `ModelRequest::parse` against a reference reading of each provider's JSON semantics.
//!
//! The reference is written the slow, obvious way and shares no code with the proxy's
//! reader: the whole object is read into a list of (key, value) entries with duplicates kept
//! (`serde_json::Value`s), then each provider's rule is applied to the list:
//! - JavaScript (LM Studio) and nlohmann (llama-server): keys match exactly, the last entry of
//!   a key wins, nothing may follow the object;
//! - Go (Ollama): a key matches a field when both fold to the same string under Unicode
//!   simple case folding (computed here with `char::to_uppercase` then `to_lowercase`, one
//!   char at a time, not with the proxy's table of two special runes); the last entry wins;
//!   `null` leaves the string fields `model` and `prompt` as they were; repeated `options`
//!   objects merge (`null` clears; another value is refused and changes nothing); bytes
//!   after the first value are ignored.
//!
//! Properties: where the reference reads the body, the proxy reads the same model, stream,
//! keep_alive (raw text), load-only flag and options limits; where the proxy names a
//! model, the reference names the same one (so nothing is served that the proxy did not
//! count); no panic.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use llm_warden::proxy::{Dialect, ModelRequest};
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::Value;

type Entries = Vec<(String, Value)>;

/// Every top-level entry in order, duplicates kept; `None` if the text is not an object.
/// `strict`: nothing but whitespace may follow it.
fn entries(text: &str, strict: bool) -> Option<Entries> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Entries;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let e = de.deserialize_map(V).ok()?;
    if strict {
        de.end().ok()?;
    }
    Some(e)
}

/// Go's `EqualFold` against an ASCII field name, one rune at a time: two runes are equal
/// when some chain of simple case mappings joins them.
fn go_folds_to(key: &str, name: &str) -> bool {
    let fold = |c: char| -> Option<char> {
        // Dotless i upper-cases to `I`, but CaseFolding.txt folds it only in the Turkic
        // (`T`) table, which Go does not use.
        if c == '\u{0131}' {
            return Some(c);
        }
        let mut up = c.to_uppercase();
        let u = up.next()?;
        if up.next().is_some() {
            return None;
        }
        let mut low = u.to_lowercase();
        let l = low.next()?;
        if low.next().is_some() {
            return None;
        }
        Some(l)
    };
    let k: Vec<Option<char>> = key.chars().map(fold).collect();
    k.len() == name.chars().count() && k.iter().zip(name.chars()).all(|(a, b)| *a == Some(b))
}

#[derive(Debug, Default, PartialEq)]
struct Reading {
    model: Option<String>,
    stream: Option<bool>,
    keep_alive: Option<Value>,
    load_only: bool,
    num_ctx: Option<u64>,
}

fn reference(text: &str, d: Dialect) -> Option<Reading> {
    let go = d == Dialect::Go;
    let list = entries(text, !go)?;
    let matches = |k: &str, name: &str| if go { go_folds_to(k, name) } else { k == name };
    let mut model: Option<Value> = None;
    let mut prompt: Option<Value> = None;
    let mut messages: Option<Value> = None;
    let mut r = Reading::default();
    let mut options: serde_json::Map<String, Value> = serde_json::Map::new();
    for (k, v) in &list {
        if matches(k, "model") {
            if !(go && v.is_null()) {
                model = Some(v.clone());
            }
        } else if matches(k, "stream") {
            r.stream = v.as_bool();
        } else if matches(k, "keep_alive") {
            r.keep_alive = Some(v.clone());
        } else if matches(k, "prompt") {
            if !(go && v.is_null()) {
                prompt = Some(v.clone());
            }
        } else if matches(k, "messages") {
            messages = Some(v.clone());
        } else if matches(k, "options") {
            match v {
                Value::Null => options.clear(),
                Value::Object(o) => {
                    if !go {
                        options.clear();
                    }
                    for (ok, ov) in o {
                        options.insert(ok.clone(), ov.clone());
                    }
                }
                // Go refuses the value and keeps the map as it was (the request fails);
                // elsewhere the last value is the options, and it is not an object.
                _ if go => {}
                _ => options.clear(),
            }
        }
    }
    r.model = match model {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s).filter(|s| !s.is_empty()),
        // A model that is not a string: the proxy refuses the body; so does the reference.
        Some(_) => return None,
    };
    let empty = |v: &Option<Value>, e: Value| v.as_ref().is_none_or(|v| v.is_null() || *v == e);
    r.load_only =
        empty(&prompt, Value::String(String::new())) && empty(&messages, Value::Array(vec![]));
    r.num_ctx = options
        .get("num_ctx")
        .and_then(Value::as_f64)
        .filter(|n| n.is_finite() && *n >= 1.0 && *n < u64::MAX as f64)
        .map(|n| n as u64);
    Some(r)
}

fn proxy(body: &[u8], d: Dialect) -> Option<Reading> {
    let p = ModelRequest::parse(body, d).ok()?;
    Some(Reading {
        model: p.model().map(str::to_owned),
        stream: p.stream,
        keep_alive: p
            .keep_alive
            .map(|k| serde_json::from_str(k.get()).expect("raw JSON")),
        load_only: p.is_load_only(),
        num_ctx: p.limits().num_ctx,
    })
}

/// Text the reference's own reader (serde_json into `Value`) refuses where the providers
/// read on: an unpaired surrogate escape (Go and JavaScript read it) or a number beyond
/// `f64` in a value nobody converts. No verdict for these.
fn beyond_the_reference(text: &str) -> bool {
    let mut de = serde_json::Deserializer::from_str(text);
    match <Value as serde::Deserialize>::deserialize(&mut de) {
        Ok(_) => false,
        Err(e) => {
            let e = e.to_string();
            e.contains("surrogate") || e.contains("out of range") || e.contains("escape")
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The reference reads text; a body the proxy takes must be UTF-8 (a BOM is read past).
    let text = std::str::from_utf8(data).ok();
    if text.is_some_and(beyond_the_reference) {
        return;
    }
    for d in [Dialect::Go, Dialect::JavaScript, Dialect::Nlohmann] {
        let ours = proxy(data, d);
        let theirs = text.and_then(|t| reference(t.strip_prefix('\u{feff}').unwrap_or(t), d));
        match (&ours, &theirs) {
            (Some(a), Some(b)) => {
                assert_eq!(a, b, "{d:?}: the proxy and the provider read differently")
            }
            // The provider reads a model the proxy does not see: a request outside the lease.
            (None, Some(b)) => assert!(
                b.model.is_none(),
                "{d:?}: refused, but the provider reads {b:?}"
            ),
            (Some(a), None) => assert!(
                a.model.is_none(),
                "{d:?}: the proxy reads a model the provider cannot: {a:?}"
            ),
            (None, None) => {}
        }
    }
});
