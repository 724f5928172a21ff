//! Finding a request's `model` in the first bytes of its JSON body, as they arrive: the
//! endpoint picker (`fleet::epp`) holds a body only as long as it takes to find it.
//!
//! The scan walks the top-level object's members and stops at the first `"model"` whose value
//! is a string. It resumes where the last whole member ended, so a body that arrives in many
//! chunks is read once. Decision: the first `model` key decides the route, even where the
//! provider's own parser would take the last of duplicate keys (Go's `encoding/json`): the
//! node still reads the body itself, so a duplicate-key body costs at most a pick on the
//! wrong node, never a wrong answer, and waiting for the end of every body to rule out a
//! later duplicate would hold large bodies whole.

/// What the bytes so far say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// The model (unescaped).
    Found(String),
    /// Not yet: the scan resumes at this offset when more bytes come.
    More(usize),
    /// The body is not an object with a string `model` (it has none, or it is not JSON).
    None,
}

/// Scans `buf` (the whole body so far) from `from` (a previous [`Scan::More`]'s offset, or 0).
pub fn scan(buf: &[u8], from: usize) -> Scan {
    let mut i = from;
    if i == 0 {
        i = skip_ws(buf, 0);
        match buf.get(i) {
            None => return Scan::More(0),
            Some(b'{') => i += 1,
            Some(_) => return Scan::None,
        }
    }
    loop {
        // `i` is at the start of a member, or of `}`, or of the `,` before one.
        let member = i;
        i = skip_ws(buf, i);
        match buf.get(i) {
            None => return Scan::More(member),
            Some(b',') => {
                i = skip_ws(buf, i + 1);
            }
            Some(b'}') => return Scan::None,
            Some(_) => {}
        }
        let key_start = i;
        let key_end = match string_end(buf, i) {
            Step::Done(e) => e,
            Step::More => return Scan::More(member),
            Step::Bad => return Scan::None,
        };
        i = skip_ws(buf, key_end);
        match buf.get(i) {
            None => return Scan::More(member),
            Some(b':') => i = skip_ws(buf, i + 1),
            Some(_) => return Scan::None,
        }
        if buf.get(i).is_none() {
            return Scan::More(member);
        }
        let is_model = &buf[key_start..key_end] == b"\"model\""
            || serde_json::from_slice::<String>(&buf[key_start..key_end])
                .is_ok_and(|k| k == "model");
        if is_model && buf.get(i) == Some(&b'"') {
            return match string_end(buf, i) {
                Step::Done(e) => {
                    serde_json::from_slice::<String>(&buf[i..e]).map_or(Scan::None, Scan::Found)
                }
                Step::More => Scan::More(member),
                Step::Bad => Scan::None,
            };
        }
        match value_end(buf, i) {
            Step::Done(e) => i = e,
            Step::More => return Scan::More(member),
            Step::Bad => return Scan::None,
        }
    }
}

enum Step {
    Done(usize),
    More,
    Bad,
}

fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while matches!(buf.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The end (one past the closing quote) of the string starting at `i`.
fn string_end(buf: &[u8], i: usize) -> Step {
    match buf.get(i) {
        None => return Step::More,
        Some(b'"') => {}
        Some(_) => return Step::Bad,
    }
    let mut j = i + 1;
    while let Some(&b) = buf.get(j) {
        match b {
            b'\\' => j += 2,
            b'"' => return Step::Done(j + 1),
            _ => j += 1,
        }
    }
    Step::More
}

/// The end of the JSON value starting at `i` (nesting counted, strings skipped).
fn value_end(buf: &[u8], i: usize) -> Step {
    match buf.get(i) {
        None => Step::More,
        Some(b'"') => string_end(buf, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&b) = buf.get(j) {
                match b {
                    b'"' => match string_end(buf, j) {
                        Step::Done(e) => {
                            j = e;
                            continue;
                        }
                        other => return other,
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Step::Done(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Step::More
        }
        Some(_) => {
            // A number or a literal: up to the next delimiter.
            let mut j = i;
            while let Some(&b) = buf.get(j) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    return Step::Done(j);
                }
                j += 1;
            }
            Step::More
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in chunks of `size`, resuming as the picker does.
    fn fed(body: &[u8], size: usize) -> Scan {
        let mut at = 0;
        let mut resume = 0;
        loop {
            at = (at + size).min(body.len());
            match scan(&body[..at], resume) {
                Scan::More(r) if at < body.len() => resume = r,
                other => return other,
            }
        }
    }

    #[test]
    fn the_model_is_found_wherever_the_chunks_cut() {
        let cases: [(&[u8], Scan); 9] = [
            (br#"{"model":"llama3.2","messages":[]}"#, Scan::Found("llama3.2".into())),
            (
                br#" { "messages" : [{"role":"user","content":"a \"model\": \"x\" {[" }], "stream": true , "model" : "q\u0077en" }"#,
                Scan::Found("qwen".into()),
            ),
            (br#"{"options":{"model":"inner"},"model":"outer"}"#, Scan::Found("outer".into())),
            (br#"{"model":"first","model":"second"}"#, Scan::Found("first".into())),
            (br#"{"mod\u0065l":"escaped-key"}"#, Scan::Found("escaped-key".into())),
            (br#"{"messages":[]}"#, Scan::None),
            (br#"{"model":5}"#, Scan::None),
            (br#"[{"model":"x"}]"#, Scan::None),
            (br#"{"n":-1.5e3,"ok":true,"z":null,"model":"m"}"#, Scan::Found("m".into())),
        ];
        for (body, want) in cases {
            for size in [1, 2, 3, 7, 64, body.len()] {
                assert_eq!(
                    fed(body, size),
                    want,
                    "{} in chunks of {size}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn an_unfinished_body_asks_for_more_and_resumes_at_a_whole_member() {
        let body = br#"{"messages":[{"content":"long"}],"model":"m"}"#;
        let cut = body.iter().position(|&b| b == b'm').unwrap() + 3;
        let Scan::More(resume) = scan(&body[..cut], 0) else {
            panic!("more wanted");
        };
        assert!(resume > 0 && resume <= cut);
        assert_eq!(scan(body, resume), Scan::Found("m".into()));
        assert_eq!(scan(b"", 0), Scan::More(0));
        assert_eq!(scan(b"  ", 0), Scan::More(0));
    }
}
