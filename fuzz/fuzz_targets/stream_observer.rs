//! `UsageScanner` over a response body cut into frames at arbitrary points.
//!
//! Input: the first byte says how many split sizes follow (0–15), each one byte; the rest is
//! the body. Property, for every `UsageKeys`: the usage read (prompt, completion) and the
//! in-stream error flag are the same however the body is framed: whole, as the sizes say
//! (empty frames included), and one byte at a time. Nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_warden::providers::UsageKeys;
use llm_warden::proxy::UsageScanner;

type Seen = ((Option<u64>, Option<u64>), bool);

fn scan<'a>(keys: UsageKeys, frames: impl IntoIterator<Item = &'a [u8]>) -> Seen {
    let mut s = UsageScanner::new(keys);
    for f in frames {
        s.feed(f);
    }
    s.finish();
    (s.usage(), s.error)
}

/// `body` cut at the given sizes (cycled; a size of 0 is an empty frame).
fn framed<'a>(body: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |s| usize::from(*s));
        let n = n.min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
        i += 1;
        if i > 4 * body.len() + 16 {
            // Only zeros: the rest in one frame.
            out.push(rest);
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, body) = rest.split_at(n);
    for keys in [
        UsageKeys::OllamaNative,
        UsageKeys::OpenAi,
        UsageKeys::LmStudioV1,
        UsageKeys::LlamaCpp,
        UsageKeys::LlamaCppNative,
        UsageKeys::Responses,
        UsageKeys::Anthropic,
    ] {
        let whole = scan(keys, [body]);
        assert_eq!(
            scan(keys, framed(body, sizes)),
            whole,
            "{keys:?}, sizes {sizes:?}"
        );
        assert_eq!(scan(keys, body.chunks(1)), whole, "{keys:?}, byte by byte");
    }
});
