//! The response side of an inspected request: bytes pass through untouched while a scanner
//! picks the provider's token counts out of them, and the [`InFlight`] guard rides along until
//! the body ends or is dropped (client gone).
//!
//! The scanner never parses JSON. It looks for the usage keys with `memchr::memmem` and reads
//! the number after them. Inside a JSON string every `"` is escaped, so a raw `"eval_count"`
//! can only be a key. The last value seen wins, which makes re-seeing a key harmless; that is
//! how keys split across two frames are handled: the tail of the previous frame is searched
//! again together with the head of the next.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

use crate::providers::UsageKeys;
use crate::stats::InFlight;

/// Bytes of the previous frame kept to catch a key and its number split across frames.
const TAIL: usize = 64;

struct Patterns {
    prompt: Finder<'static>,
    completion: Finder<'static>,
}

static OLLAMA: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    prompt: Finder::new(b"\"prompt_eval_count\""),
    completion: Finder::new(b"\"eval_count\""),
});
static OPENAI: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    prompt: Finder::new(b"\"prompt_tokens\""),
    completion: Finder::new(b"\"completion_tokens\""),
});
static LLAMACPP_NATIVE: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    prompt: Finder::new(b"\"tokens_evaluated\""),
    completion: Finder::new(b"\"tokens_predicted\""),
});
/// llama-server's `timings`, on the last chunk of every build: prompt = `prompt_n` (newly
/// evaluated) + `cache_n` (reused), reply = `predicted_n`.
static TIMINGS: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
    [
        Finder::new(b"\"prompt_n\""),
        Finder::new(b"\"cache_n\""),
        Finder::new(b"\"predicted_n\""),
    ]
});
/// The Responses and Messages APIs: Anthropic's `message_start` carries `input_tokens` (Ollama
/// writes an estimate there when it has no count yet) and `message_delta` the final
/// `input_tokens` / `output_tokens`: the last seen wins. `"output_tokens_details"` is
/// another key (the closing quote is part of the pattern).
static INPUT_OUTPUT: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    prompt: Finder::new(b"\"input_tokens\""),
    completion: Finder::new(b"\"output_tokens\""),
});
/// Anthropic's prompt-cache counts, which its `input_tokens` leaves out.
static CACHE_INPUT: LazyLock<[Finder<'static>; 2]> = LazyLock::new(|| {
    [
        Finder::new(b"\"cache_read_input_tokens\""),
        Finder::new(b"\"cache_creation_input_tokens\""),
    ]
});
static LMSTUDIO_V1: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    prompt: Finder::new(b"\"input_tokens\""),
    completion: Finder::new(b"\"total_output_tokens\""),
});
/// An error inside a 200 stream, always at the start of a line (a JSON string cannot hold a
/// raw newline, and an error object elsewhere, e.g. in tool-call arguments, is not one):
/// Ollama's `{"error":"..."}` NDJSON line, an OpenAI `data: {"error":{...}}` event, LM
/// Studio's `event: error`. The first line of a body is checked separately.
const ERROR_STARTS: [&[u8]; 3] = [b"{\"error\"", b"data: {\"error\"", b"event: error"];
/// The longest of [`ERROR_STARTS`]: how much of the body's start is kept to check them.
const START: usize = 14;

/// Whether a line after the first in `buf` starts as an error does: one pass for the
/// newlines, instead of one search per form.
fn has_error_line(buf: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', buf).any(|nl| {
        let line = &buf[nl + 1..];
        ERROR_STARTS.iter().any(|m| line.starts_with(m))
    })
}

/// Reads token counts and in-stream errors out of a response as it passes.
#[derive(Debug)]
pub struct UsageScanner {
    keys: UsageKeys,
    tail: [u8; TAIL],
    tail_len: usize,
    /// The body's first bytes (up to [`START`]), kept until an error marker could fit: a
    /// first frame may end inside one (found by `fuzz/`, `stream_observer`).
    start: [u8; START],
    start_len: usize,
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    /// llama-server `timings`: `prompt_n`, `cache_n`, `predicted_n`.
    timings: [Option<u64>; 3],
    /// Anthropic: `cache_read_input_tokens`, `cache_creation_input_tokens`.
    cached: [Option<u64>; 2],
    pub error: bool,
}

impl UsageScanner {
    pub fn new(keys: UsageKeys) -> Self {
        UsageScanner {
            keys,
            tail: [0; TAIL],
            tail_len: 0,
            start: [0; START],
            start_len: 0,
            prompt: None,
            completion: None,
            timings: [None; 3],
            cached: [None; 2],
            error: false,
        }
    }

    fn patterns(&self) -> &'static Patterns {
        match self.keys {
            UsageKeys::OllamaNative => &OLLAMA,
            UsageKeys::OpenAi | UsageKeys::LlamaCpp => &OPENAI,
            UsageKeys::LmStudioV1 => &LMSTUDIO_V1,
            UsageKeys::LlamaCppNative => &LLAMACPP_NATIVE,
            UsageKeys::Responses | UsageKeys::Anthropic => &INPUT_OUTPUT,
            // Never scanned (`feed` and `finish` return first).
            UsageKeys::None => &OPENAI,
        }
    }

    /// Feeds one frame of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        // An answer without usage, and whose errors come with their status (a transcription:
        // its text may hold anything, an error's look included).
        if self.keys == UsageKeys::None {
            return;
        }
        if self.start_len < START && !chunk.is_empty() {
            // The body's first line has no newline before it.
            let n = (START - self.start_len).min(chunk.len());
            self.start[self.start_len..self.start_len + n].copy_from_slice(&chunk[..n]);
            self.start_len += n;
            let start = &self.start[..self.start_len];
            if ERROR_STARTS.iter().any(|m| start.starts_with(m)) {
                self.error = true;
            }
        }
        if self.tail_len > 0 {
            // The seam: end of the previous frame + start of this one.
            let mut seam = [0u8; 2 * TAIL];
            let head = chunk.len().min(TAIL);
            seam[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            seam[self.tail_len..self.tail_len + head].copy_from_slice(&chunk[..head]);
            let seam_len = self.tail_len + head;
            // A number running to the end of the seam may go on in the next frame: the
            // seam is never the end of the body.
            self.scan(&seam[..seam_len], false);
        }
        self.scan(chunk, false);
        self.keep_tail(chunk);
    }

    /// Prompt and reply tokens: the usage keys, else llama-server's `timings`.
    pub fn usage(&self) -> (Option<u64>, Option<u64>) {
        let [prompt_n, cache_n, predicted_n] = self.timings;
        let timed_prompt = prompt_n.map(|p| p + cache_n.unwrap_or(0));
        let prompt = match self.cached {
            [None, None] => self.prompt,
            [read, created] => {
                Some(self.prompt.unwrap_or(0) + read.unwrap_or(0) + created.unwrap_or(0))
            }
        };
        (prompt.or(timed_prompt), self.completion.or(predicted_n))
    }

    /// The body ended: a number at the very end is complete now.
    pub fn finish(&mut self) {
        if self.keys == UsageKeys::None {
            return;
        }
        // Only a number that runs to the very end is new to this scan: every other match in
        // the tail (a suffix of what was fed) was seen, with the same outcome, when it was fed.
        if self.tail_len > 0 && self.tail[self.tail_len - 1].is_ascii_digit() {
            let tail = self.tail;
            self.scan(&tail[..self.tail_len], true);
        }
    }

    fn keep_tail(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL {
            self.tail.copy_from_slice(&chunk[chunk.len() - TAIL..]);
            self.tail_len = TAIL;
        } else {
            let keep = (TAIL - chunk.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + chunk.len()].copy_from_slice(chunk);
            self.tail_len = keep + chunk.len();
        }
    }

    fn scan(&mut self, buf: &[u8], at_end: bool) {
        let p = self.patterns();
        if let Some(v) = last_number(&p.prompt, buf, at_end) {
            self.prompt = Some(v);
        }
        if let Some(v) = last_number(&p.completion, buf, at_end) {
            self.completion = Some(v);
        }
        if matches!(self.keys, UsageKeys::LlamaCpp | UsageKeys::LlamaCppNative) {
            for (slot, key) in self.timings.iter_mut().zip(TIMINGS.iter()) {
                if let Some(v) = last_number(key, buf, at_end) {
                    *slot = Some(v);
                }
            }
        }
        if self.keys == UsageKeys::Anthropic {
            for (slot, key) in self.cached.iter_mut().zip(CACHE_INPUT.iter()) {
                if let Some(v) = last_number(key, buf, at_end) {
                    *slot = Some(v);
                }
            }
        }
        if !self.error && has_error_line(buf) {
            self.error = true;
        }
    }
}

/// The number after the last complete `"key": <digits>` in `buf`, key to last digit shorter
/// than [`TAIL`]. A number that runs to the end of `buf` counts only when `at_end` (it may
/// go on in the next frame).
fn last_number(key: &Finder<'_>, buf: &[u8], at_end: bool) -> Option<u64> {
    let mut found = None;
    // Overlapping matches too: `find_iter` resumes after a match, and in `"k"k":1` the second
    // key starts at the first one's closing quote (found by `fuzz/`, `stream_observer`: a
    // frame boundary inside the first made the second count).
    let mut from = 0;
    while let Some(at) = key.find(&buf[from..]) {
        let start = from + at;
        from = start + 1;
        let mut i = start + key.needle().len();
        while i < buf.len() && buf[i] == b' ' {
            i += 1;
        }
        if i >= buf.len() || buf[i] != b':' {
            continue;
        }
        i += 1;
        while i < buf.len() && buf[i] == b' ' {
            i += 1;
        }
        let digits_start = i;
        let mut v: u64 = 0;
        while i < buf.len() && buf[i].is_ascii_digit() {
            v = v
                .saturating_mul(10)
                .saturating_add(u64::from(buf[i] - b'0'));
            i += 1;
        }
        if i == digits_start || (i == buf.len() && !at_end) {
            continue;
        }
        // Only a key and number shorter than the seam are seen whatever the framing: a longer
        // one (padding, or a number of 40-odd digits) is not usage (found by `fuzz/`,
        // `stream_observer`: it counted when it came in one frame, not when split).
        if i - start >= TAIL {
            continue;
        }
        found = Some(v);
    }
    found
}

// === impl ObservedBody ===

/// A response body that holds the request's [`InFlight`] guard and reads usage as it passes.
pub struct ObservedBody<B> {
    inner: B,
    scanner: UsageScanner,
    guard: Option<InFlight>,
}

impl<B> ObservedBody<B> {
    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn new(inner: B, keys: UsageKeys, guard: InFlight) -> Self {
        ObservedBody {
            inner,
            scanner: UsageScanner::new(keys),
            guard: Some(guard),
        }
    }

    fn settle(&mut self, ok: bool) {
        if let Some(mut g) = self.guard.take() {
            self.scanner.finish();
            let (prompt, completion) = self.scanner.usage();
            g.set_usage(prompt, completion);
            if !ok {
                g.fail_upstream("stream_aborted");
            } else if self.scanner.error {
                g.fail_upstream("stream_error");
            } else {
                g.complete();
            }
        }
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. Keep whatever usage was seen.
        if let Some(mut g) = self.guard.take() {
            let (prompt, completion) = self.scanner.usage();
            g.set_usage(prompt, completion);
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(g) = this.guard.as_mut() {
                        g.first_chunk();
                    }
                    this.scanner.feed(data);
                }
                if this.inner.is_end_stream() {
                    this.settle(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.settle(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.settle(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_is_found_wherever_it_starts_in_a_buffer() {
        // The same as searching for each form with a newline before it.
        let forms: [&[u8]; 3] = [b"\n{\"error\"", b"\ndata: {\"error\"", b"\nevent: error"];
        let body = b"{\"a\":1}\n{\"error\":\"x\"}\ndata: {\"error\":{}}\nevent: error\n{\"b\":\"\\n{\\\"error\\\"\"}\nevent: err";
        for start in 0..body.len() {
            for end in start..=body.len() {
                let buf = &body[start..end];
                let searched = forms.iter().any(|f| buf.windows(f.len()).any(|w| w == *f));
                assert_eq!(
                    has_error_line(buf),
                    searched,
                    "{:?}",
                    String::from_utf8_lossy(buf)
                );
            }
        }
    }

    fn scan_in_pieces(keys: UsageKeys, body: &[u8], piece: usize) -> UsageScanner {
        let mut s = UsageScanner::new(keys);
        for c in body.chunks(piece) {
            s.feed(c);
        }
        s.finish();
        s
    }

    #[test]
    fn reads_ollama_final_chunk_however_it_is_split() {
        let body = br#"{"model":"m","created_at":"x","message":{"role":"assistant","content":"Hi"},"done":false}
{"model":"m","created_at":"x","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":402112000,"load_duration":9875000,"prompt_eval_count":26,"prompt_eval_duration":51000000,"eval_count":1234,"eval_duration":30000000}
"#;
        for piece in 1..body.len() {
            let s = scan_in_pieces(UsageKeys::OllamaNative, body, piece);
            assert_eq!(
                (s.prompt, s.completion, s.error),
                (Some(26), Some(1234), false),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn escaped_keys_inside_content_are_not_usage() {
        let body = br#"{"message":{"content":"say \"eval_count\":99"},"done":false}"#;
        let s = scan_in_pieces(UsageKeys::OllamaNative, body, 7);
        assert_eq!(s.completion, None);
    }

    #[test]
    fn last_openai_usage_wins_and_spaces_are_allowed() {
        let body = b"data: {\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0}}\n\ndata: {\"usage\": {\"prompt_tokens\": 24, \"completion_tokens\": 3}}\n\ndata: [DONE]\n\n";
        for piece in 1..body.len() {
            let s = scan_in_pieces(UsageKeys::OpenAi, body, piece);
            assert_eq!(
                (s.prompt, s.completion),
                (Some(24), Some(3)),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn llamacpp_usage_else_timings() {
        // Current builds without include_usage: timings on the finish chunk only.
        let finish = b"data: {\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],\"object\":\"chat.completion.chunk\",\"timings\":{\"cache_n\":3,\"prompt_n\":21,\"prompt_ms\":40.1,\"prompt_per_token_ms\":1.67,\"predicted_n\":2,\"predicted_ms\":30.2}}\n\ndata: [DONE]\n\n";
        for piece in [1, 5, 17, 1000] {
            let mut s = scan_in_pieces(UsageKeys::LlamaCpp, finish, piece);
            s.finish();
            assert_eq!(s.usage(), (Some(24), Some(2)), "piece {piece}");
        }
        // With a usage chunk, usage wins (prompt_tokens counts the cached tokens too).
        let with_usage = b"data: {\"timings\":{\"cache_n\":0,\"prompt_n\":20,\"predicted_n\":2}}\n\ndata: {\"choices\":[],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":24,\"total_tokens\":26}}\n\n";
        let s = scan_in_pieces(UsageKeys::LlamaCpp, with_usage, 9);
        assert_eq!(s.usage(), (Some(24), Some(2)));
        // Native /completion: tokens_evaluated / tokens_predicted.
        let native = b"data: {\"content\":\"\",\"stop\":true,\"tokens_predicted\":7,\"tokens_evaluated\":30,\"timings\":{\"prompt_n\":30,\"predicted_n\":7}}\n\n";
        let s = scan_in_pieces(UsageKeys::LlamaCppNative, native, 11);
        assert_eq!(s.usage(), (Some(30), Some(7)));
        // Other kinds ignore timings.
        let s = scan_in_pieces(UsageKeys::OpenAi, finish, 1000);
        assert_eq!(s.usage(), (None, None));
    }

    /// The Anthropic Messages API as Ollama writes it (`anthropic.StreamConverter.Process`:
    /// `message_start` with the prompt count or an estimate, `message_delta` with both final
    /// counts) and as Anthropic does (`message_delta` with `output_tokens` only).
    #[test]
    fn messages_usage_from_message_start_and_message_delta() {
        let ollama = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"usage\":{\"input_tokens\":9,\"output_tokens\":0}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \\\"output_tokens\\\":99\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":12,\"output_tokens\":5}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for piece in 1..ollama.len() {
            let s = scan_in_pieces(UsageKeys::Anthropic, ollama, piece);
            assert_eq!(
                (s.usage(), s.error),
                ((Some(12), Some(5)), false),
                "piece {piece}"
            );
        }
        let anthropic = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n";
        let s = scan_in_pieces(UsageKeys::Anthropic, anthropic, 7);
        assert_eq!(s.usage(), (Some(25), Some(15)));
        // Not streamed: one `usage`.
        let whole = br#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"output_tokens":5}}"#;
        let s = scan_in_pieces(UsageKeys::Anthropic, whole, 3);
        assert_eq!(s.usage(), (Some(12), Some(5)));
        // An error event inside the stream.
        let failed = b"event: message_start\ndata: {}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}\n\n";
        assert!(scan_in_pieces(UsageKeys::Anthropic, failed, 5).error);
        // llama-server (its output, b-series with `/v1/messages`): streamed, the prompt's
        // cached part is `cache_read_input_tokens`, left out of `input_tokens`; the
        // `message_delta` has `output_tokens` only.
        let llama = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"chatcmpl-Lm2\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"m.gguf\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"cache_read_input_tokens\":19,\"input_tokens\":1,\"output_tokens\":0}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"I\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":8}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for piece in 1..llama.len() {
            let s = scan_in_pieces(UsageKeys::Anthropic, llama, piece);
            assert_eq!(s.usage(), (Some(20), Some(8)), "piece {piece}");
        }
        let whole = br#"{"id":"chatcmpl-Jw1","type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"model":"m.gguf","stop_reason":"max_tokens","stop_sequence":null,"usage":{"cache_read_input_tokens":0,"input_tokens":20,"output_tokens":8}}"#;
        let s = scan_in_pieces(UsageKeys::Anthropic, whole, 4);
        assert_eq!(s.usage(), (Some(20), Some(8)));
        // The Responses API counts the cached part inside `input_tokens`: not added twice.
        let resp = br#"{"usage":{"input_tokens":20,"output_tokens":4,"total_tokens":24,"input_tokens_details":{"cached_tokens":19}}}"#;
        let s = scan_in_pieces(UsageKeys::Responses, resp, 4);
        assert_eq!(s.usage(), (Some(20), Some(4)));
    }

    /// The Responses API as Ollama writes it (`openai.ResponsesStreamConverter`: `usage` null
    /// until `response.completed`, with `input_tokens_details` / `output_tokens_details`).
    #[test]
    fn responses_usage_from_response_completed() {
        let stream = b"event: response.created\ndata: {\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"usage\":null},\"sequence_number\":0,\"type\":\"response.created\"}\n\nevent: response.output_text.delta\ndata: {\"content_index\":0,\"delta\":\"Hi\",\"item_id\":\"msg_1\",\"logprobs\":[],\"output_index\":0,\"sequence_number\":4,\"type\":\"response.output_text.delta\"}\n\nevent: response.completed\ndata: {\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":31,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":7,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":38}},\"sequence_number\":9,\"type\":\"response.completed\"}\n\n";
        for piece in 1..stream.len() {
            let s = scan_in_pieces(UsageKeys::Responses, stream, piece);
            assert_eq!(
                (s.usage(), s.error),
                ((Some(31), Some(7)), false),
                "piece {piece}"
            );
        }
        let whole = br#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":31,"output_tokens":7,"total_tokens":38,"input_tokens_details":{"cached_tokens":0},"output_tokens_details":{"reasoning_tokens":0}}}"#;
        let s = scan_in_pieces(UsageKeys::Responses, whole, 5);
        assert_eq!(s.usage(), (Some(31), Some(7)));
    }

    #[test]
    fn number_at_the_very_end_counts_after_finish() {
        let s = scan_in_pieces(UsageKeys::LmStudioV1, b"{\"input_tokens\":42", 5);
        assert_eq!(s.prompt, Some(42));
    }

    #[test]
    fn error_line_inside_a_stream_is_seen() {
        let body = b"{\"model\":\"m\",\"done\":false}\n{\"error\":\"runner crashed\"}\n";
        for piece in 1..body.len() {
            assert!(
                scan_in_pieces(UsageKeys::OllamaNative, body, piece).error,
                "piece {piece}"
            );
        }
        let body = b"event: message.delta\ndata: {}\n\nevent: error\ndata: {}\n\n";
        assert!(scan_in_pieces(UsageKeys::LmStudioV1, body, 4).error);
        let body = b"data: {\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"x\"}}\n\n";
        assert!(scan_in_pieces(UsageKeys::OpenAi, body, 5).error);
        assert!(scan_in_pieces(UsageKeys::OllamaNative, b"{\"error\":\"boom\"}", 100).error);
    }

    #[test]
    fn an_error_key_that_is_not_a_line_is_not_an_error() {
        // Ollama tool-call arguments are a JSON object; a tool may well take an `error` field.
        let body = br#"{"model":"m","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"report","arguments":{"error":"disk full"}}}]},"done":false}
{"model":"m","done":true,"prompt_eval_count":3,"eval_count":4}
"#;
        for piece in 1..body.len() {
            let s = scan_in_pieces(UsageKeys::OllamaNative, body, piece);
            assert!(!s.error, "piece {piece}");
            assert_eq!((s.prompt, s.completion), (Some(3), Some(4)));
        }
    }

    /// An answer without usage (a transcription): nothing is read from it, and a text that
    /// looks like usage or an error is the transcription's, not a count or a failure.
    #[test]
    fn an_answer_without_usage_is_not_scanned() {
        for piece in [1, 5, 1000] {
            let body = b"{\"error\": no, \"prompt_tokens\": 7,\n{\"error\":\"said aloud\"}\n\"completion_tokens\": 9";
            let s = scan_in_pieces(UsageKeys::None, body, piece);
            assert_eq!(s.usage(), (None, None), "{piece}");
            assert!(!s.error, "{piece}");
        }
    }
}
