//! Run with: `cargo run --release --example prunebench` (flags after `--`, e.g. `-- --window 8192`).
//!
//! What the prune stage saves on coding-agent conversations. A deterministic generator writes
//! sessions the shape of a coding agent's: a system prompt with tool descriptions, user tasks,
//! assistant `tool_calls` (`read_file`, `edit_file`, `run_tests`, `grep`) and their results:
//! source files of 2–8 KB read again and again (a read after an edit sees the edited file, a
//! read without one the same bytes), test output that differs from run to run in its timing
//! line (so it is *not* a duplicate), grep output repeated, and in a UI session screenshots
//! (base64, Ollama `images`) attached to the tasks.
//!
//! Each session is replayed as its client sends it: a request after every user message and
//! every tool result, the whole conversation so far each time, through llm-warden (in this
//! process) to a simulated Ollama whose window is `--window` tokens; once with
//! `compaction.prune = true` and once with `false`, each with a fresh summary cache. For each
//! session it prints the last request's tokens (as the client sent it, after pruning, after
//! the whole compaction), the summarizer calls of the whole replay with pruning and without,
//! and how much of the previous request's `messages` each forwarded request kept as a byte
//! prefix (what a provider's prompt cache can reuse).

use std::fmt::Write as _;

use bytes::Bytes;
use clap::Parser;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use llm_warden::context::summarize::PROMPT;
use llm_warden_sim::ollama::{self, OllamaConfig};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[path = "common/mod.rs"]
mod common;
use common::Rng;

#[derive(Parser, Debug)]
#[command(about = "tokens and summarizer calls the prune stage saves on agent conversations")]
struct Args {
    /// The model's window (the simulator's `num_ctx`), in tokens.
    #[arg(long, default_value_t = 8192)]
    window: u32,
}

use common::HttpClient;

fn main() {
    common::main_with("prunebench", run(Args::parse()));
}

// === the corpus ===

const IDENTS: &[&str] = &[
    "config", "request", "window", "tokens", "budget", "reader", "parser", "state", "cache",
    "entry", "model", "provider", "lease", "summary", "offset", "buffer", "limit", "event",
];
const CALLS: &[&str] = &[
    "parse", "load", "count", "insert", "remove", "resolve", "validate", "render", "flush",
    "acquire", "release", "estimate", "split", "merge",
];

/// One line of plausible source code.
fn code_line(rng: &mut Rng) -> String {
    let (a, b, c) = (rng.pick(IDENTS), rng.pick(IDENTS), rng.pick(CALLS));
    match rng.below(6) {
        0 => format!("    let {a}_{b} = {c}(&{a}, {})?;", rng.below(4096)),
        1 => format!("    if {a}.{b}.is_empty() {{ return Err(Error::{c}); }}"),
        2 => format!("    // {c} the {a} before the {b} is read again"),
        3 => format!("    self.{a}.{c}({b}.clone());"),
        4 => format!("fn {c}_{a}({b}: &{}) -> Result<(), Error> {{", cap(a)),
        _ => "    }".to_string(),
    }
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// A source file of about `bytes` bytes.
fn source(rng: &mut Rng, path: &str, bytes: usize) -> Vec<String> {
    let mut lines = vec![format!("// {path}"), "use crate::prelude::*;".into()];
    let mut n = lines.iter().map(|l| l.len() + 1).sum::<usize>();
    while n < bytes {
        let l = code_line(rng);
        n += l.len() + 1;
        lines.push(l);
    }
    lines
}

/// A base64 screenshot of about `bytes` bytes.
fn screenshot(rng: &mut Rng, bytes: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::from("iVBORw0KGgoAAAANSUhEUgAA");
    while s.len() < bytes {
        s.push(B64[rng.below(64)] as char);
    }
    s
}

const SYSTEM: &str =
    "You are a coding agent working in the user's repository. Use the tools to read \
files, edit them, search the code and run the tests; read a file again before you edit it if it \
may have changed. Tools:\n- read_file(path): the file's text.\n- edit_file(path, old, new): \
replaces one occurrence of `old` by `new`.\n- grep(pattern): matching lines with their file and \
line number.\n- run_tests(filter?): the test runner's output.\nAnswer the user briefly once the \
task is done, naming the files you changed and why. Never invent file contents: read them. Keep \
edits minimal and in the style of the surrounding code. When tests fail, read the failure \
before changing code, and run the tests again after each change.";

/// A session's plan: its files (path, size in bytes), its tasks, screenshots per task.
struct Shape {
    name: &'static str,
    seed: u64,
    files: &'static [(&'static str, usize)],
    tasks: usize,
    steps: (usize, usize),
    screenshots: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "bugfix",
        seed: 1,
        files: &[
            ("src/parser.rs", 7000),
            ("src/lexer.rs", 4000),
            ("tests/parse.rs", 3000),
        ],
        tasks: 3,
        steps: (5, 8),
        screenshots: false,
    },
    Shape {
        name: "refactor",
        seed: 2,
        files: &[
            ("src/config.rs", 8000),
            ("src/main.rs", 3000),
            ("src/cli.rs", 5000),
            ("src/validate.rs", 6000),
        ],
        tasks: 4,
        steps: (6, 9),
        screenshots: false,
    },
    Shape {
        name: "ui",
        seed: 3,
        files: &[
            ("web/dashboard.tsx", 6000),
            ("web/styles.css", 3000),
            ("web/api.ts", 2000),
        ],
        tasks: 4,
        steps: (4, 7),
        screenshots: true,
    },
    Shape {
        name: "flaky-test",
        seed: 4,
        files: &[("src/worker.rs", 5000), ("tests/worker.rs", 4000)],
        tasks: 3,
        steps: (6, 9),
        screenshots: false,
    },
    Shape {
        name: "long-session",
        seed: 5,
        files: &[
            ("src/proxy.rs", 8000),
            ("src/stats.rs", 6000),
            ("src/context.rs", 7000),
            ("src/tokens.rs", 4000),
            ("docs/design.md", 5000),
        ],
        tasks: 6,
        steps: (5, 9),
        screenshots: false,
    },
];

/// A session: its messages, and after which ones the client sends a request.
struct Session {
    messages: Vec<Value>,
    /// Indices (exclusive ends) of the requests.
    requests: Vec<usize>,
}

fn session(shape: &Shape) -> Session {
    let mut rng = Rng(shape.seed);
    let mut files: Vec<(&str, Vec<String>)> = shape
        .files
        .iter()
        .map(|&(p, n)| (p, source(&mut rng, p, n)))
        .collect();
    let tests: Vec<String> = (0..40)
        .map(|i| format!("{}::{}_{}", rng.pick(IDENTS), rng.pick(CALLS), i))
        .collect();
    let mut failing: Vec<usize> = vec![3, 11];
    let mut m = vec![json!({"role": "system", "content": SYSTEM})];
    let mut requests = Vec::new();
    let mut recent: Vec<usize> = Vec::new();
    for t in 0..shape.tasks {
        let mut task = json!({"role": "user", "content": format!(
            "Task {}: {} the {} handling in {} so that the {} {} is {} before the {} is read.",
            t + 1, rng.pick(CALLS), rng.pick(IDENTS), files[rng.below(files.len())].0,
            rng.pick(IDENTS), rng.pick(IDENTS), rng.pick(&["checked", "counted", "cached"]),
            rng.pick(IDENTS))});
        if shape.screenshots {
            let n = 1 + usize::from(t == 2);
            task["content"] = json!(format!(
                "{} Here is what the page looks like now.",
                task["content"].as_str().unwrap_or("")
            ));
            task["images"] = json!((0..n)
                .map(|_| screenshot(&mut rng, 60_000))
                .collect::<Vec<_>>());
        }
        m.push(task);
        requests.push(m.len());
        if !failing.contains(&3) {
            failing.push(3 + t);
        }
        let steps = shape.steps.0 + rng.below(shape.steps.1 - shape.steps.0 + 1);
        for s in 0..steps {
            // Agents re-read what they read lately; they test after edits.
            let roll = rng.below(10);
            let (name, args, result) = if roll < 5 {
                let f = if !recent.is_empty() && rng.below(3) > 0 {
                    recent[rng.below(recent.len())]
                } else {
                    rng.below(files.len())
                };
                recent.push(f);
                if recent.len() > 3 {
                    recent.remove(0);
                }
                let (path, lines) = &files[f];
                ("read_file", json!({"path": path}), lines.join("\n") + "\n")
            } else if roll < 7 {
                let f = recent.last().copied().unwrap_or(0);
                let (path, lines) = &mut files[f];
                let at = 2 + rng.below(lines.len() - 2);
                let old = lines[at].clone();
                lines[at] = code_line(&mut rng);
                (
                    "edit_file",
                    json!({"path": path, "old": old, "new": lines[at]}),
                    format!("Edited {path}: 1 replacement."),
                )
            } else if roll < 9 {
                if s > 2 && !failing.is_empty() {
                    failing.remove(0);
                }
                let mut out = format!("running {} tests\n", tests.len());
                for (i, name) in tests.iter().enumerate() {
                    let ok = if failing.contains(&i) { "FAILED" } else { "ok" };
                    let _ = writeln!(out, "test {name} ... {ok}");
                }
                for &i in &failing {
                    let _ = write!(out, "\n---- {} stdout ----\nthread '{}' panicked at src/{}.rs:{}:9:\nassertion `left == right` failed\n  left: {}\n right: {}\n", tests[i], tests[i], rng.pick(IDENTS), 10 + i * 7, i, i + 1);
                }
                let _ = write!(
                    out,
                    "\ntest result: {}. {} passed; {} failed; 0 ignored; finished in {}.{:02}s\n",
                    if failing.is_empty() { "ok" } else { "FAILED" },
                    tests.len() - failing.len(),
                    failing.len(),
                    rng.below(3),
                    rng.below(100)
                );
                ("run_tests", json!({}), out)
            } else if shape.screenshots {
                // A browser tool: the page as the agent sees it now.
                m.push(json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "screenshot", "arguments": {"url": "http://localhost:5173/"}}}]}));
                m.push(json!({"role": "tool", "tool_name": "screenshot", "content": "The page at http://localhost:5173/ (1280×800).", "images": [screenshot(&mut rng, 60_000)]}));
                requests.push(m.len());
                continue;
            } else {
                // The same searches come back with the same lines.
                let pat = ["unwrap()", "TODO", "fn parse"][rng.below(3)];
                let mut out = String::new();
                for (path, lines) in &files {
                    for (n, l) in lines.iter().enumerate() {
                        if l.contains(pat) || (pat == "unwrap()" && l.contains("?;")) {
                            let _ = writeln!(out, "{path}:{}: {}", n + 1, l.trim());
                        }
                    }
                }
                ("grep", json!({"pattern": pat}), out)
            };
            m.push(json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": args}}]}));
            m.push(json!({"role": "tool", "tool_name": name, "content": result}));
            requests.push(m.len());
        }
        m.push(json!({"role": "assistant", "content": format!(
            "Done with task {}: the {} is now {} before the {} is {}. I changed the files I read \
             above and ran the tests; {} still fail{}.",
            t + 1, rng.pick(IDENTS), rng.pick(&["checked", "counted"]), rng.pick(IDENTS),
            rng.pick(CALLS), failing.len(), if failing.len() == 1 { "s" } else { "" })}));
    }
    Session {
        messages: m,
        requests,
    }
}

// === the replay ===

/// What one replay of a session measured.
#[derive(Default)]
struct Replay {
    requests: usize,
    compacted: usize,
    /// Requests whose pruning alone made them fit (no summary, no truncation).
    pruned_only: usize,
    summarizer_calls: usize,
    /// The last request: tokens as sent, after pruning, after compaction.
    last: (u64, u64, u64),
    /// Over the requests after the first: the share of the previous forwarded `messages`
    /// bytes that the next one starts with, on average.
    prefix_kept: f64,
}

async fn post(client: &HttpClient, url: &str, body: String) -> Result<http::HeaderMap, String> {
    let req = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !parts.status.is_success() {
        return Err(format!(
            "{url}: {} {}",
            parts.status,
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(parts.headers)
}

fn messages_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .map(|v| v["messages"].to_string())
        .unwrap_or_default()
}

async fn replay(args: &Args, s: &Session, name: &str, prune: bool) -> Result<Replay, String> {
    let sim = ollama::spawn(
        OllamaConfig {
            default_num_ctx: args.window,
            reply_tokens: 1,
            fixed_reply: Some("SUMMARY: the agent read and edited files and ran the tests.".into()),
            ..Default::default()
        },
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?,
    );
    let cache =
        std::env::temp_dir().join(format!("prunebench-{}-{name}-{prune}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nname = \"ollama\"\nkind = \"ollama\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n[compaction]\ncache_dir = \"{}\"\nprune = {prune}\n",
        sim.url(),
        cache.display()
    );
    let (proxy, client) = common::start_proxy(&toml).await?;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let mut r = Replay::default();
    let mut last_headers = http::HeaderMap::new();
    for &end in &s.requests {
        let body = json!({"model": "llama3.2", "messages": &s.messages[..end], "stream": false});
        let h = post(&client, &url, body.to_string()).await?;
        r.requests += 1;
        r.compacted += usize::from(h.contains_key("x-llm-warden-compacted"));
        last_headers = h;
    }
    // The forwarded conversations, in order, and the summarizer's calls.
    let mut forwarded = Vec::new();
    for c in sim.state.log.calls() {
        if c.path != "/api/chat" {
            continue;
        }
        if String::from_utf8_lossy(&c.body).contains(PROMPT) {
            r.summarizer_calls += 1;
        } else {
            forwarded.push(messages_of(&c.body));
        }
    }
    let kept: Vec<f64> = forwarded
        .windows(2)
        .map(|w| {
            let common = w[0]
                .bytes()
                .zip(w[1].bytes())
                .take_while(|(a, b)| a == b)
                .count();
            common as f64 / w[0].len().max(1) as f64
        })
        .collect();
    r.prefix_kept = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
    // The last request, from its header and its event.
    let status: Value = {
        let req = Request::get(format!("http://{}/status", proxy.admin_addr))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body.to_bytes()).map_err(|e| e.to_string())?
    };
    let events = status["compaction"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for e in &events {
        r.pruned_only += usize::from(e["action"] == "pruned");
    }
    if let Some(e) = events
        .last()
        .filter(|_| last_headers.contains_key("x-llm-warden-compacted"))
    {
        let before = e["tokens_before"].as_u64().unwrap_or(0);
        let pruned = e["pruned"]["tokens"].as_u64().unwrap_or(0);
        r.last = (
            before,
            before.saturating_sub(pruned),
            e["tokens_after"].as_u64().unwrap_or(0),
        );
    }
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
    Ok(r)
}

async fn run(args: Args) -> Result<(), String> {
    println!(
        "prunebench: {} agent sessions, replayed request by request through llm-warden to a simulated Ollama (window {} tokens)\n",
        SHAPES.len(),
        args.window
    );
    println!(
        "{:<13} {:>5} {:>6} | {:>8} {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>9} | {:>8} {:>8}",
        "session",
        "msgs",
        "reqs",
        "last:in",
        "pruned",
        "sent",
        "sent-np",
        "pr.only",
        "summ+pr",
        "summ-nopr",
        "prefix+p",
        "prefix-np"
    );
    let mut total = [0u64; 8];
    for shape in SHAPES {
        let s = session(shape);
        let on = replay(&args, &s, shape.name, true).await?;
        let off = replay(&args, &s, shape.name, false).await?;
        println!(
            "{:<13} {:>5} {:>6} | {:>8} {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>9} | {:>7.0}% {:>7.0}%",
            shape.name,
            s.messages.len(),
            on.requests,
            on.last.0,
            on.last.1,
            on.last.2,
            off.last.2,
            on.pruned_only,
            on.summarizer_calls,
            off.summarizer_calls,
            on.prefix_kept * 100.0,
            off.prefix_kept * 100.0
        );
        for (t, v) in total.iter_mut().zip([
            on.requests as u64,
            on.last.0,
            on.last.1,
            on.last.2,
            off.last.2,
            on.pruned_only as u64,
            on.summarizer_calls as u64,
            off.summarizer_calls as u64,
        ]) {
            *t += v;
        }
        if on.compacted != off.compacted {
            println!(
                "  (compacted requests: {} with pruning, {} without)",
                on.compacted, off.compacted
            );
        }
    }
    println!(
        "{:<13} {:>5} {:>6} | {:>8} {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>9} |",
        "total", "", total[0], total[1], total[2], total[3], total[4], total[5], total[6], total[7]
    );
    println!(
        "\nlast:in = the last request's prompt tokens as the client sent it; pruned = after \
         pruning; sent = after the whole compaction (prune, then summary), sent-np = the same \
         without pruning; pr.only = requests that pruning alone made fit; summ+pr / summ-nopr = \
         summarizer calls over the whole replay with and without pruning; prefix = the average \
         share of the previous request's messages (bytes) the next one starts with."
    );
    Ok(())
}
