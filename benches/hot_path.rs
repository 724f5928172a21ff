//! Run with: `cargo bench --bench hot_path` (quicker: `-- --warm-up-time 1 --measurement-time 3`).
//!
//! The pure parts of the request path, per operation:
//! - `parse/{small,180KiB}`: `ModelRequest::parse` + `limits()` of a one-message chat and of a
//!   301-message conversation (~180 KiB, some 40k tokens): what every inspected request pays
//!   to find its model;
//! - `keep_alive_rewrite/{small,180KiB}`: Ollama's `keep_alive` set to -1 (one copy of the
//!   body; the span unknown, so the body's top level is scanned for it);
//! - `scanner/{ndjson,sse}_per_chunk`: the usage scanner fed one typical stream frame (Ollama
//!   NDJSON, OpenAI SSE), and the final frame that carries the usage;
//! - `upper_bound`: the byte bound that lets small prompts skip token counting;
//! - `plan/{40,400}_messages`: the compaction planner over a long conversation.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llm_warden::context::plan::{plan, Budget, Role};
use llm_warden::providers::UsageKeys;
use llm_warden::proxy::{Dialect, ModelRequest, UsageScanner};
use llm_warden::rewrite;
use serde_json::json;

fn conversation(turns: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    for i in 0..turns {
        messages.push(json!({"role": "user", "content": format!("Question {i}: {}", "why does the build fail with a borrow error on line twelve of main.rs? ".repeat(8))}));
        messages.push(json!({"role": "assistant", "content": format!("Answer {i}: {}", "the value was moved into the closure; clone it or borrow it instead. ".repeat(8))}));
    }
    serde_json::to_vec(&json!({"model": "llama3.2", "messages": messages, "stream": true, "options": {"num_ctx": 32768}})).unwrap_or_default()
}

fn bodies() -> [(&'static str, Vec<u8>); 2] {
    [
        (
            "small",
            br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}"#
                .to_vec(),
        ),
        ("180KiB", conversation(150)),
    ]
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    for (name, body) in bodies() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = ModelRequest::parse(black_box(&body), Dialect::Go).unwrap_or_default();
                black_box((r.model().map(str::len), r.limits().num_ctx))
            })
        });
    }
    g.finish();
}

fn keep_alive_rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("keep_alive_rewrite");
    for (name, body) in bodies() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| black_box(rewrite::set_at(black_box(&body), "keep_alive", "-1", None)))
        });
    }
    g.finish();
}

fn scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("scanner");
    let ndjson = br#"{"model":"llama3.2","created_at":"2026-11-26T10:00:00.123456Z","message":{"role":"assistant","content":" the"},"done":false}
"#;
    let ndjson_end = br#"{"model":"llama3.2","created_at":"2026-11-26T10:00:01Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":123456789,"load_duration":1234,"prompt_eval_count":26,"prompt_eval_duration":1234,"eval_count":290,"eval_duration":1234}
"#;
    let sse = b"data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1764151201,\"model\":\"llama3.2\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"},\"finish_reason\":null}]}\n\n";
    for (name, keys, chunk, end) in [
        (
            "ndjson",
            UsageKeys::OllamaNative,
            &ndjson[..],
            &ndjson_end[..],
        ),
        ("sse", UsageKeys::OpenAi, &sse[..], &sse[..]),
    ] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{name}_per_chunk"), |b| {
            let mut s = UsageScanner::new(keys);
            s.feed(chunk);
            b.iter(|| s.feed(black_box(chunk)))
        });
        g.bench_function(format!("{name}_stream_of_100"), |b| {
            b.iter(|| {
                let mut s = UsageScanner::new(keys);
                for _ in 0..99 {
                    s.feed(black_box(chunk));
                }
                s.feed(black_box(end));
                s.finish();
                black_box(s.usage())
            })
        });
    }
    g.finish();
}

fn upper_bound(c: &mut Criterion) {
    c.bench_function("upper_bound", |b| {
        b.iter(|| black_box(llm_warden::tokens::upper_bound(black_box(131_072))))
    });
}

fn planner(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    for n in [40usize, 400] {
        let mut roles = vec![Role::System];
        let mut tokens = vec![50u64];
        for i in 0..n {
            roles.push(if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant { tool_calls: false }
            });
            tokens.push(100 + (i as u64 * 37) % 400);
        }
        let budget = Budget {
            prompt: 4000,
            tail: 2000,
            summary: 512,
        };
        g.bench_function(format!("{n}_messages"), |b| {
            b.iter(|| black_box(plan(black_box(&roles), black_box(&tokens), budget)))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    parse,
    keep_alive_rewrite,
    scanner,
    upper_bound,
    planner
);
criterion_main!(benches);
