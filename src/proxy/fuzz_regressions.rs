//! Inputs the fuzz targets in `fuzz/` found, replayed as unit tests (each names its target
//! and what was wrong). See `fuzz/README.md`.

use super::inbound::{Dialect, ModelRequest};
use super::observe::UsageScanner;
use crate::providers::UsageKeys;
use crate::rewrite;

/// Seen while writing `fuzz/`'s `request_body` property (a body that names a model is an
/// object): a JSON array named a model (serde reads a struct from a sequence), so the proxy
/// counted and loaded `m` for a body it then could not rewrite. Since issue 18 such a body is
/// unreadable (a 400), never a model request.
#[test]
fn an_array_body_names_no_model() {
    for body in [&br#"["m"]"#[..], br#" ["llama3.2", true, 0]"#] {
        assert!(ModelRequest::parse(body, Dialect::Go).is_err(), "{body:?}");
        assert!(rewrite::set_top_level(body, "keep_alive", "-1").is_err());
    }
}

/// `fuzz/`, `request_body` (artifact crash-3bd08ddc…, minimized by hand): invalid UTF-8 in
/// a value serde skips. The body parsed, so `set_at` edited it, while `set_top_level`
/// (compaction, runner options) refused it. Since issue 18 such a body is unreadable (a 400):
/// Go would read it, with U+FFFD for the bad byte, so forwarding it unread would escape.
#[test]
fn a_body_with_invalid_utf8_names_no_model() {
    let body = b"{\"model\":\"m\",\"mod(l\":\"all-min\xe9lm\",\"input\":[],\"options\":{\"num_batch\":512}}";
    assert!(rewrite::set_top_level(body, "keep_alive", "-1").is_err());
    assert!(ModelRequest::parse(body, Dialect::Go).is_err());
    // The valid-UTF-8 version of the same body is a model request, and both rewriters agree.
    let valid =
        "{\"model\":\"m\",\"mod(l\":\"all-minélm\",\"input\":[],\"options\":{\"num_batch\":512}}";
    let parsed = ModelRequest::parse(valid.as_bytes(), Dialect::Go).expect("readable");
    assert_eq!(parsed.model(), Some("m"));
    let at = parsed
        .keep_alive
        .map(|r| rewrite::span_in(valid.as_bytes(), r));
    let fast = rewrite::set_at(valid.as_bytes(), "keep_alive", "-1", at).expect("an object");
    let (slow, _) =
        rewrite::set_top_level(valid.as_bytes(), "keep_alive", "-1").expect("an object");
    assert_eq!(fast, slow);
}

/// `fuzz/`, `stream_observer` (artifact crash-aca8b964…): an error body whose first frame
/// ends inside the `{"error"` marker was not seen as an error.
#[test]
fn an_error_body_split_inside_its_marker_is_still_an_error() {
    let body = br#"{"error":"model not found"}"#;
    for keys in [
        UsageKeys::OllamaNative,
        UsageKeys::OpenAi,
        UsageKeys::LmStudioV1,
    ] {
        for split in 0..body.len() {
            let mut s = UsageScanner::new(keys);
            s.feed(&body[..split]);
            s.feed(&body[split..]);
            s.finish();
            assert!(s.error, "{keys:?}, split at {split}");
        }
        let mut s = UsageScanner::new(keys);
        for b in body.chunks(1) {
            s.feed(b);
        }
        assert!(s.error, "{keys:?}, byte by byte");
    }
    for body in [
        &b"data: {\"error\":{\"message\":\"x\"}}\n\n"[..],
        b"event: error\ndata: {}\n\n",
    ] {
        let mut s = UsageScanner::new(UsageKeys::OpenAi);
        for b in body.chunks(3) {
            s.feed(b);
        }
        assert!(s.error, "{body:?}");
    }
}

/// `fuzz/`, `stream_observer` (artifact crash-3644b084…): a key and its number longer than
/// the 64 bytes kept between frames (here a 46-digit count) were read when the body came in
/// one frame and missed when it came byte by byte, so the usage depended on the framing.
#[test]
fn a_usage_number_longer_than_the_seam_is_ignored_however_it_is_framed() {
    let body = b"data: {\"content\":\"\",\"stop\":true,\"tokens_predicted\":9999999999999999999999999999999999999999999997,\"tokens_evaluated\":30,\"timings\":{\"prompt_n\":30,\"predicted_n\":7}}\n\n";
    let spaced =
        b"{\"done\":true,\"eval_count\"                                                    : 12}\n";
    for (keys, body, want) in [
        (UsageKeys::LlamaCppNative, &body[..], (Some(30), Some(7))),
        (UsageKeys::OllamaNative, &spaced[..], (None, None)),
    ] {
        for piece in [1, 2, 7, 64, body.len()] {
            let mut s = UsageScanner::new(keys);
            for c in body.chunks(piece) {
                s.feed(c);
            }
            s.finish();
            assert_eq!(s.usage(), want, "{keys:?}, piece {piece}");
        }
    }
}

/// `fuzz/`, `stream_observer` (artifact crash-72e68e3d…, minimized by hand): a key that
/// starts at the previous match's closing quote (`"input_tokens"input_tokens":42`) was
/// skipped by a non-overlapping search in one frame, but read when a frame boundary fell
/// inside the first match.
#[test]
fn an_overlapping_usage_key_is_read_however_it_is_framed() {
    let body = br#"{"stats":{"input_tokens"input_tokens":42,"total_output_tokens":7}}"#;
    for piece in 1..=body.len() {
        let mut s = UsageScanner::new(UsageKeys::LmStudioV1);
        for c in body.chunks(piece) {
            s.feed(c);
        }
        s.finish();
        assert_eq!(s.usage(), (Some(42), Some(7)), "piece {piece}");
    }
}

/// `fuzz/`, `request_body` (artifact crash-3fa7967d…, issue 18): `"options": null` was read as
/// no options, so the runner-options edit added a second `options` key in front of the
/// `null`, and the provider, reading the last one, got no options at all. The `null` is now
/// where the edit goes.
#[test]
fn a_null_options_is_replaced_not_shadowed() {
    let body = br#"{"model":"m","options":null,"prompt":"hi"}"#;
    for d in [Dialect::Go, Dialect::JavaScript, Dialect::Nlohmann] {
        let parsed = ModelRequest::parse(body, d).expect("readable");
        assert_eq!(parsed.options_object(), None);
        let opts = rewrite::with_numbers(parsed.options_object(), &[("num_ctx", 2048)]).unwrap();
        let edit = rewrite::Splice {
            key: "options",
            at: parsed.options.map(|o| rewrite::span_in(body, o)),
            raw: &opts,
        };
        let out = rewrite::splice(body, &[edit]).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","options":{"num_ctx":2048},"prompt":"hi"}"#,
            "{d:?}"
        );
    }
}
