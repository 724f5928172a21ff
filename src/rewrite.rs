//! Byte-preserving edits of a JSON request body: set one top-level field and leave every
//! other byte as the client wrote it (key order, spacing, escapes, number formats).
//!
//! Re-serializing a parsed body would reorder keys and reformat numbers; providers would not
//! care, but a proxy that promises to change only what it must should not. The body is
//! parsed once with borrowed `RawValue`s, which know where each value sits in the bytes.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::Deserializer as _;
use serde_json::value::RawValue;

/// Why a body could not be edited.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("the request body is not a JSON object: {0}")]
    NotAnObject(String),
}

/// The top-level entries of a JSON object, in order, as `(key, byte range of the raw value)`.
fn top_level(body: &[u8]) -> Result<Vec<(String, std::ops::Range<usize>)>, RewriteError> {
    struct Entries<'a>(&'a [u8]);
    impl<'de> Visitor<'de> for Entries<'de> {
        type Value = Vec<(String, std::ops::Range<usize>)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let base = self.0.as_ptr() as usize;
            let mut out = Vec::new();
            while let Some((k, v)) =
                map.next_entry::<std::borrow::Cow<'de, str>, &'de RawValue>()?
            {
                // The raw value borrows from the body: its address gives its place.
                let start = v.get().as_ptr() as usize - base;
                out.push((k.into_owned(), start..start + v.get().len()));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let entries = de
        .deserialize_map(Entries(body))
        .map_err(|e| RewriteError::NotAnObject(e.to_string()))?;
    de.end()
        .map_err(|e| RewriteError::NotAnObject(e.to_string()))?;
    Ok(entries)
}

/// Sets top-level `key` of the object in `body` to `raw` (already valid JSON), keeping every
/// other byte. Returns the new body and the raw value the key had (the last one, if the
/// client repeated it; Go's decoder, like serde's, takes the last). A missing key is added
/// first in the object.
pub fn set_top_level(
    body: &[u8],
    key: &str,
    raw: &str,
) -> Result<(Vec<u8>, Option<String>), RewriteError> {
    let entries = top_level(body)?;
    let at = entries
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, range)| range.clone());
    let old = at
        .as_ref()
        .map(|r| String::from_utf8_lossy(&body[r.clone()]).into_owned());
    Ok((set_at(body, key, raw, at)?, old))
}

/// [`set_top_level`] for a caller whose own parse of `body` (a valid JSON object) already
/// found where `key`'s value is (`at`, a byte range of `body`) or that it is absent: no
/// second parse. A missing key is added first in the object.
pub fn set_at(
    body: &[u8],
    key: &str,
    raw: &str,
    at: Option<std::ops::Range<usize>>,
) -> Result<Vec<u8>, RewriteError> {
    let edit = Splice {
        key,
        at,
        raw: raw.as_bytes(),
    };
    splice(body, &[edit])
}

/// The JSON object `object` (raw; `None`: an empty one) with each `(key, n)` of `set` set to
/// the number `n`, every other byte kept: a request's small `options` object, edited before
/// it goes into the body's one [`splice`].
pub fn with_numbers(object: Option<&str>, set: &[(&str, u64)]) -> Result<Vec<u8>, RewriteError> {
    let mut out = object.unwrap_or("{}").as_bytes().to_vec();
    for (key, n) in set {
        out = set_top_level(&out, key, &n.to_string())?.0;
    }
    Ok(out)
}

/// One edit of a top-level field, for [`splice`]: `key` set to `raw` (valid JSON), at `at`
/// (where the caller's parse found its value) or, when absent, added.
#[derive(Clone, Debug)]
pub struct Splice<'a> {
    pub key: &'a str,
    pub at: Option<std::ops::Range<usize>>,
    pub raw: &'a [u8],
}

/// Applies every edit in `edits` to `body` (a JSON object the caller parsed, which found the
/// ranges) in one pass and one allocation of the exact length, keeping every other byte.
/// Absent keys are added first in the object, in the order given. Ranges must not overlap.
/// Allocates nothing but the output (an edit list is a handful of entries: on the request
/// path, small vectors and their frees cost more than the copy).
pub fn splice(body: &[u8], edits: &[Splice<'_>]) -> Result<Vec<u8>, RewriteError> {
    let open = body
        .iter()
        .position(|b| *b == b'{')
        .ok_or_else(|| RewriteError::NotAnObject("no opening brace".into()))?;
    let empty = body[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    let mut len = body.len();
    let mut added = 0usize;
    for (i, e) in edits.iter().enumerate() {
        match &e.at {
            Some(r) => {
                if !(r.start > open && r.start < r.end && r.end <= body.len()) {
                    return Err(RewriteError::NotAnObject(
                        "an edit outside the object".into(),
                    ));
                }
                let overlaps = edits[..i]
                    .iter()
                    .filter_map(|o| o.at.as_ref())
                    .any(|o| o.start < r.end && r.start < o.end);
                if overlaps {
                    return Err(RewriteError::NotAnObject("overlapping edits".into()));
                }
                len = len - r.len() + e.raw.len();
            }
            None => {
                added += 1;
                len += quoted_len(e.key) + 1 + e.raw.len() + 1;
            }
        }
    }
    if empty && added > 0 {
        len -= 1;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&body[..=open]);
    let mut written = 0;
    for e in edits.iter().filter(|e| e.at.is_none()) {
        push_quoted(&mut out, e.key);
        out.push(b':');
        out.extend_from_slice(e.raw);
        written += 1;
        if !(empty && written == added) {
            out.push(b',');
        }
    }
    // The replaced values in the order they sit in the body.
    let mut at = open + 1;
    let mut after: Option<usize> = None;
    loop {
        let next = edits
            .iter()
            .filter_map(|e| e.at.as_ref().map(|r| (r, e.raw)))
            .filter(|(r, _)| after.is_none_or(|s| r.start > s))
            .min_by_key(|(r, _)| r.start);
        let Some((r, raw)) = next else {
            break;
        };
        out.extend_from_slice(&body[at..r.start]);
        out.extend_from_slice(raw);
        at = r.end;
        after = Some(r.start);
    }
    out.extend_from_slice(&body[at..]);
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// The proxy's keys are plain ASCII, quoted as they are; serde quotes any other.
fn plain(key: &str) -> bool {
    key.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

fn quoted_len(key: &str) -> usize {
    if plain(key) {
        key.len() + 2
    } else {
        serde_json::to_string(key).map_or(2, |q| q.len())
    }
}

fn push_quoted(out: &mut Vec<u8>, key: &str) {
    if plain(key) {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(serde_json::to_string(key).unwrap_or_default().as_bytes());
    }
}

/// Where `value` (borrowed from a parse of `body`) sits in `body`.
pub fn span_in(body: &[u8], value: &serde_json::value::RawValue) -> std::ops::Range<usize> {
    let start = (value.get().as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    start..start + value.get().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_applies_every_edit_in_one_pass() {
        let body = br#"{ "model":"m","keep_alive":"5m", "messages":[1,2,3],"stream":true }"#;
        let at = |needle: &str| {
            let s = std::str::from_utf8(body).unwrap();
            let i = s.find(needle).unwrap();
            i..i + needle.len()
        };
        let out = splice(
            body,
            &[
                Splice {
                    key: "messages",
                    at: Some(at("[1,2,3]")),
                    raw: b"[3]",
                },
                Splice {
                    key: "keep_alive",
                    at: Some(at("\"5m\"")),
                    raw: b"-1",
                },
                Splice {
                    key: "options",
                    at: None,
                    raw: br#"{"num_ctx":512}"#,
                },
            ],
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"options":{"num_ctx":512}, "model":"m","keep_alive":-1, "messages":[3],"stream":true }"#
        );
        // Into an empty object, two added keys: no trailing comma.
        let out = splice(
            b" {} ",
            &[
                Splice {
                    key: "a",
                    at: None,
                    raw: b"1",
                },
                Splice {
                    key: "b",
                    at: None,
                    raw: b"2",
                },
            ],
        )
        .unwrap();
        assert_eq!(out, br#" {"a":1,"b":2} "#);
        // The same as one set_at at a time.
        let one = set_at(body, "keep_alive", "-1", Some(at("\"5m\""))).unwrap();
        let spliced = splice(
            body,
            &[Splice {
                key: "keep_alive",
                at: Some(at("\"5m\"")),
                raw: b"-1",
            }],
        )
        .unwrap();
        assert_eq!(one, spliced);
        assert!(splice(b"[1]", &[]).is_err());
    }

    fn set(body: &str, key: &str, raw: &str) -> (String, Option<String>) {
        let (b, old) = set_top_level(body.as_bytes(), key, raw).unwrap();
        let s = String::from_utf8(b).unwrap();
        // Whatever the input looked like, the output is valid JSON with the key set.
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v[key],
            serde_json::from_str::<serde_json::Value>(raw).unwrap(),
            "{s}"
        );
        (s, old)
    }

    #[test]
    fn replaces_a_present_value_and_keeps_every_other_byte() {
        let table = [
            (
                r#"{"model":"m","keep_alive":"5m","stream":false}"#,
                r#"{"model":"m","keep_alive":-1,"stream":false}"#,
                Some(r#""5m""#),
            ),
            (
                r#"{ "model" : "m" , "keep_alive" : 300 }"#,
                r#"{ "model" : "m" , "keep_alive" : -1 }"#,
                Some("300"),
            ),
            (
                r#"{"keep_alive":null}"#,
                r#"{"keep_alive":-1}"#,
                Some("null"),
            ),
            // Nested keys of the same name are not top-level.
            (
                r#"{"options":{"keep_alive":1},"keep_alive":0}"#,
                r#"{"options":{"keep_alive":1},"keep_alive":-1}"#,
                Some("0"),
            ),
            // A repeated key: the last one is the one a decoder uses.
            (
                r#"{"keep_alive":1,"keep_alive":2}"#,
                r#"{"keep_alive":1,"keep_alive":-1}"#,
                Some("2"),
            ),
        ];
        for (body, want, old) in table {
            let (got, was) = set(body, "keep_alive", "-1");
            assert_eq!(got, want);
            assert_eq!(was.as_deref(), old);
        }
    }

    #[test]
    fn adds_a_missing_key_first() {
        let table = [
            (r#"{"model":"m"}"#, r#"{"keep_alive":-1,"model":"m"}"#),
            ("{}", r#"{"keep_alive":-1}"#),
            (
                "  {\n  \"model\": \"é\\u00e9<>\"\n}\n",
                "  {\"keep_alive\":-1,\n  \"model\": \"é\\u00e9<>\"\n}\n",
            ),
        ];
        for (body, want) in table {
            let (got, was) = set(body, "keep_alive", "-1");
            assert_eq!(got, want);
            assert_eq!(was, None);
        }
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        for body in ["", "[]", "\"x\"", "{\"a\":1", "{\"a\":1} trailing", "nul"] {
            assert!(
                set_top_level(body.as_bytes(), "k", "1").is_err(),
                "{body:?}"
            );
        }
    }

    #[test]
    fn large_values_elsewhere_are_untouched() {
        let history: String = (0..2000)
            .map(|i| format!("{{\"role\":\"user\",\"content\":\"turn {i}\"}},"))
            .collect();
        let body = format!(
            "{{\"model\":\"m\",\"messages\":[{}],\"stream\":true}}",
            history.trim_end_matches(',')
        );
        let (got, _) = set(&body, "keep_alive", "\"10m\"");
        assert_eq!(got.len(), body.len() + "\"keep_alive\":\"10m\",".len());
        assert!(got.ends_with(&body[1..]));
    }
}

#[cfg(test)]
mod set_at_tests {
    use super::*;

    #[test]
    fn set_at_with_a_known_span_equals_set_top_level() {
        #[derive(serde::Deserialize)]
        struct Probe<'a> {
            #[serde(borrow, default)]
            keep_alive: Option<&'a RawValue>,
        }
        for body in [
            r#"{"model":"m","keep_alive":"5m","stream":false}"#,
            r#"{ "keep_alive" : 300 , "model":"m"}"#,
            r#"{"model":"m","prompt":"a \"keep_alive\": 1"}"#,
            r#"{"model":"m"}"#,
            "{\n  \"model\": \"m\"\n}",
        ] {
            let probe: Probe = serde_json::from_str(body).unwrap();
            let at = probe.keep_alive.map(|r| span_in(body.as_bytes(), r));
            let fast = set_at(body.as_bytes(), "keep_alive", "-1", at).unwrap();
            let (slow, _) = set_top_level(body.as_bytes(), "keep_alive", "-1").unwrap();
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                String::from_utf8(slow).unwrap(),
                "{body}"
            );
        }
        assert_eq!(set_at(b"{ }", "k", "1", None).unwrap(), br#"{"k":1 }"#);
    }

    #[test]
    fn set_at_allocates_exactly_and_escapes_keys_that_need_it() {
        // Capacity equal to length: `Bytes::from` then takes the vector over as it is.
        let body = br#"{"model":"m","keep_alive":"5m","stream":false}"#;
        for at in [None, Some(26..30)] {
            let out = set_at(body, "keep_alive", "-1", at.clone()).unwrap();
            assert_eq!(out.len(), out.capacity(), "{at:?}");
        }
        let out = set_at(br#"{"a":1}"#, "keep_alive", "-1", None).unwrap();
        assert_eq!(out, br#"{"keep_alive":-1,"a":1}"#);
        assert_eq!(out.len(), out.capacity());
        // A key that is not plain goes through serde's escaping.
        let out = set_at(b"{}", "a\"b\\c d", "1", None).unwrap();
        assert_eq!(out, br#"{"a\"b\\c d":1}"#);
        assert_eq!(out.len(), out.capacity());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["a\"b\\c d"], 1);
    }
}
