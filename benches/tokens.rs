//! Run with: `cargo bench --bench tokens` (quicker: `-- --warm-up-time 1 --measurement-time 3`).
//!
//! Token counting throughput, in bytes of text per second (criterion prints MiB/s):
//! - `count_text/{cl100k,o200k}`: one ~128 KiB chat transcript (prose, Markdown, code, JSON
//!   tool output, logs, a little German, French and Japanese) counted as one text;
//! - `count_messages/{cl100k,o200k}`: the same text as a 40-message conversation (system
//!   prompt, user and assistant turns, tool calls and their results, one image).
//!
//! The BPE tables load before the clock starts; their cost is in `examples/tokens_rss.rs`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llm_warden::tokens::{Encoding, TokenCounter};
use serde_json::{json, Value};

/// Turns of a coding-assistant chat, cycled (with the turn number) to the wanted size.
const TURNS: [&str; 8] = [
    "I'm moving our proxy from a thread per connection to tokio. Requests are small, but \
     responses stream for up to a minute, and we keep a counter of requests in flight per \
     model. What is the cleanest way to make sure the counter goes down when a client \
     disconnects halfway through a stream?\n",
    "Tie the counter to a value that lives exactly as long as the response body: an RAII \
     guard. Increment in its constructor, decrement in `Drop`, and move it into the body \
     stream. When hyper drops the body (the stream ended, failed, or the client went away), \
     the guard drops with it:\n\n```rust\npub struct InFlight(Arc<AtomicU64>);\n\nimpl \
     InFlight {\n    pub fn new(counter: Arc<AtomicU64>) -> Self {\n        \
     counter.fetch_add(1, Ordering::Relaxed);\n        Self(counter)\n    }\n}\n\nimpl Drop for \
     InFlight {\n    fn drop(&mut self) {\n        self.0.fetch_sub(1, Ordering::Relaxed);\n    \
     }\n}\n```\n\nAvoid decrementing in an end-of-stream callback: it never runs when the \
     client leaves early.\n",
    "Here is what the upstream returned for the failing request:\n\n```json\n{\"error\": \
     {\"message\": \"model 'qwen3:30b' not found, try pulling it first\", \"type\": \
     \"not_found\", \"status\": 404}, \"request_id\": \"req_7f3a9c2e\", \"took_ms\": 12, \
     \"models\": [{\"name\": \"llama3.1:8b\", \"size\": 4920753328, \"digest\": \
     \"46e0c10c039e\"}, {\"name\": \"qwen2.5-coder:7b\", \"size\": 4683087332}]}\n```\n",
    "The log around it:\n\n```\n2025-03-14T09:26:53.589Z INFO  llm_warden::proxy: request \
     model=qwen3:30b provider=ollama path=/api/chat\n2025-03-14T09:26:53.601Z WARN  \
     llm_warden::proxy: upstream answered 404 after 12ms\n2025-03-14T09:26:53.601Z INFO  \
     llm_warden::stats: finished status=404 prompt_tokens=- completion_tokens=-\n```\n",
    "| Setting | Default | Meaning |\n|---|---|---|\n| `idle_timeout` | 5m | unload a model \
     nobody used for this long |\n| `max_models_loaded` | 2 | models resident at once |\n| \
     `queue_timeout` | 30s | how long a request waits for a slot |\n\nThe first one matters \
     most on laptops, where two 8B models already fill the GPU.\n",
    "Kannst du die Antwort bitte noch einmal kurz auf Deutsch zusammenfassen? Unser Team \
     liest die Dokumentation lieber auf Deutsch. Et si possible, ajoute une phrase en \
     français pour nos collègues de Lyon.\n",
    "Kurz gesagt: Der Zähler gehört in ein Objekt, das genau so lange lebt wie die Antwort. \
     En résumé : le compteur vit dans un objet dont la durée de vie est celle de la réponse. \
     要するに、カウンタはレスポンスと同じ寿命のオブジェクトに持たせます。\n",
    "Thanks, that works. One more thing: the test that checks the counter after a client \
     disconnect is flaky on CI. It sleeps 50 ms and then asserts the counter is zero. \
     Should I poll instead, or is there a way to wait for the drop deterministically?\n",
];

fn transcript(min_bytes: usize) -> String {
    let mut text = String::with_capacity(min_bytes + 2048);
    let mut turn = 0;
    while text.len() < min_bytes {
        text.push_str(&format!("\n### Turn {turn}\n\n"));
        text.push_str(TURNS[turn % TURNS.len()]);
        turn += 1;
    }
    text
}

/// A 40-message conversation over the same turns: a system prompt, then user / assistant
/// pairs, every tenth assistant turn a tool call followed by its result, one image.
fn conversation(min_bytes: usize) -> Vec<Value> {
    let mut messages = vec![json!({
        "role": "system",
        "content": "You are a senior Rust engineer. Answer briefly, with code where it helps.",
    })];
    let per_message = min_bytes / 39;
    let text = transcript(min_bytes + per_message);
    let mut rest = text.as_str();
    for i in 1..40 {
        let mut cut = per_message.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (content, tail) = rest.split_at(cut);
        rest = tail;
        let message = match i % 10 {
            5 => json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": format!("call_{i}"), "type": "function",
                "function": {"name": "read_file", "arguments": json!({"path": "src/stats.rs", "lines": [1, 80]}).to_string()},
            }]}),
            6 => {
                json!({"role": "tool", "tool_call_id": format!("call_{}", i - 1), "content": content})
            }
            7 => json!({"role": "user", "content": [
                {"type": "text", "text": content},
                {"type": "image_url", "image_url": {"url": "https://example.com/screenshot.png"}},
            ]}),
            _ if i % 2 == 1 => json!({"role": "user", "content": content}),
            _ => json!({"role": "assistant", "content": content}),
        };
        messages.push(message);
    }
    messages
}

fn count_text(c: &mut Criterion) {
    let counter = TokenCounter::new();
    let text = transcript(128 * 1024);
    let mut group = c.benchmark_group("count_text");
    group.throughput(Throughput::Bytes(text.len() as u64));
    for enc in [Encoding::Cl100k, Encoding::O200k] {
        let tokens = counter.count_text(enc, &text); // loads the tables
        eprintln!("count_text/{enc}: {} bytes, {tokens} tokens", text.len());
        group.bench_function(short(enc), |b| {
            b.iter(|| counter.count_text(enc, black_box(&text)))
        });
    }
    group.finish();
}

fn count_messages(c: &mut Criterion) {
    let counter = TokenCounter::new();
    let messages = conversation(128 * 1024);
    let bytes: usize = messages.iter().map(|m| m.to_string().len()).sum();
    let mut group = c.benchmark_group("count_messages");
    // Bytes of the messages as JSON: what a request body would carry.
    group.throughput(Throughput::Bytes(bytes as u64));
    for enc in [Encoding::Cl100k, Encoding::O200k] {
        let tokens = counter.count_messages(enc, &messages);
        eprintln!(
            "count_messages/{enc}: {} messages, {bytes} bytes of JSON, {tokens} tokens",
            messages.len()
        );
        group.bench_function(short(enc), |b| {
            b.iter(|| counter.count_messages(enc, black_box(&messages)))
        });
    }
    group.finish();
}

fn short(enc: Encoding) -> &'static str {
    match enc {
        Encoding::Cl100k => "cl100k",
        Encoding::O200k => "o200k",
    }
}

criterion_group!(benches, count_text, count_messages);
criterion_main!(benches);
