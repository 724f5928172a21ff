//! `ModelRequest::parse` and the byte-preserving body rewriters on arbitrary bytes.
//!
//! Properties: nothing panics; a JSON object always parses as a rewritable body; after a
//! rewrite the output is valid JSON, the key holds the new value, and every other top-level
//! entry (key and raw value bytes, in order) is exactly what the client sent; `set_at` with
//! the span the parse found gives the same bytes as `set_top_level`; a body that is not an
//! object names no model.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use llm_warden::lifecycle::{parse_keep_alive, Shape};
use llm_warden::proxy::{Dialect, ModelRequest};
use llm_warden::rewrite;
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level entries of an object, in order, duplicates kept: (key, raw value bytes).
fn entries(body: &[u8]) -> Option<Vec<(String, String)>> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                out.push((k, v.get().to_owned()));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let e = de.deserialize_map(Entries).ok()?;
    de.end().ok()?;
    Some(e)
}

/// What `set_top_level(body, key, raw)` must produce, entry by entry.
fn expected(before: &[(String, String)], key: &str, raw: &str) -> Vec<(String, String)> {
    let mut want = before.to_vec();
    match want.iter().rposition(|(k, _)| k == key) {
        Some(i) => want[i].1 = raw.to_owned(),
        None => want.insert(0, (key.to_owned(), raw.to_owned())),
    }
    want
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("a rewritten object is valid JSON")
}

fuzz_target!(|data: &[u8]| {
    // What the proxy does first with any inspected body.
    // Strict (JavaScript's reading): the properties below are about whole-body objects; Go's
    // reading of a first value with bytes after it is `provider_reading`'s.
    let Ok(parsed) = ModelRequest::parse(data, Dialect::JavaScript) else {
        return;
    };
    let _ = parsed.limits();
    let _ = parsed.is_load_only();
    if let Some(k) = parsed.keep_alive {
        let _ = parse_keep_alive(k.get());
    }
    let value: Option<serde_json::Value> = serde_json::from_slice(data).ok();
    let is_object = value.as_ref().is_some_and(|v| v.is_object());
    let before = entries(data);
    if parsed.model().is_some() {
        assert!(
            before.is_some(),
            "a model was read from a body that is not an object"
        );
    }

    // keep_alive → -1, the slow way (its own parse).
    let slow = rewrite::set_top_level(data, "keep_alive", "-1");
    if is_object {
        assert!(slow.is_ok(), "a JSON object was refused: {slow:?}");
    }
    if let (Ok((out, old)), Some(before)) = (&slow, &before) {
        let after = entries(out).expect("the output of a rewrite is an object");
        assert_eq!(after, expected(before, "keep_alive", "-1"));
        let last = before.iter().rev().find(|(k, _)| k == "keep_alive");
        assert_eq!(old.as_deref(), last.map(|(_, v)| v.as_str()));
        if is_object {
            assert_eq!(json(out)["keep_alive"], -1);
        }
    }

    // The fast way, as the proxy takes it: a body that named a model, and the span its
    // parse found.
    if parsed.model().is_some() {
        let at = parsed.keep_alive.map(|r| rewrite::span_in(data, r));
        let fast = rewrite::set_at(data, "keep_alive", "-1", at);
        match (&fast, &slow) {
            (Ok(fast), Ok((slow, _))) => assert_eq!(fast, slow, "set_at and set_top_level differ"),
            _ => panic!("a body that names a model: set_at {fast:?} vs set_top_level {slow:?}"),
        }
    }

    // Runner options under pressure.
    let limits = parsed.limits();
    let sent = Shape {
        num_ctx: limits.num_ctx,
        num_batch: limits.num_batch,
    };
    for want in [
        Shape {
            num_ctx: Some(2048),
            num_batch: Some(256),
        },
        Shape {
            num_ctx: Some(512),
            num_batch: None,
        },
    ] {
        let changes: Vec<(&str, u64)> = [
            ("num_ctx", want.num_ctx, sent.num_ctx),
            ("num_batch", want.num_batch, sent.num_batch),
        ]
        .into_iter()
        .filter_map(|(key, want, had)| want.filter(|n| Some(*n) != had).map(|n| (key, n)))
        .collect();
        let old_opts = match parsed.options_object() {
            None => Some(Vec::new()),
            Some(o) => entries(o.as_bytes()),
        };
        // As the data plane gives a request runner options: the options object edited,
        // then one splice of the body.
        let out = (!changes.is_empty())
            .then(|| rewrite::with_numbers(parsed.options_object(), &changes).ok())
            .flatten()
            .and_then(|opts| {
                let at = parsed.options.map(|o| rewrite::span_in(data, o));
                let edit = rewrite::Splice {
                    key: "options",
                    at,
                    raw: &opts,
                };
                rewrite::splice(data, &[edit]).ok()
            });
        if is_object && old_opts.is_some() && !changes.is_empty() {
            assert!(out.is_some(), "apply refused an object with object options");
        }
        let Some(out) = out else { continue };
        let before = before
            .as_ref()
            .expect("apply rewrote a body that is not an object");
        let after = entries(&out).expect("apply's output is an object");
        let options = after
            .iter()
            .rev()
            .find(|(k, _)| k == "options")
            .map(|(_, v)| v.clone())
            .expect("options present");
        assert_eq!(after, expected(before, "options", &options));
        let mut rebuilt = old_opts.expect("apply rewrote options that are not an object");
        for (key, n) in &changes {
            rebuilt = expected(&rebuilt, key, &n.to_string());
        }
        assert_eq!(entries(options.as_bytes()), Some(rebuilt));
        if is_object {
            let v = json(&out);
            for (key, n) in &changes {
                assert_eq!(v["options"][key], *n);
            }
        }
    }
});
