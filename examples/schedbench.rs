//! Run with: `cargo run --release --example schedbench` (flags after `--`, e.g. `-- --seed 7`).
//!
//! Scheduling benchmark for the lifecycle queue: how many model loads the proxy makes, and
//! what that costs the clients, when several models compete for one slot. It compares
//! `[queue] policy = "fifo"` (strict arrival order: a request for another model holds up
//! every later one and swaps the model) with `policy = "grouped"` (waiting requests of the
//! loaded model are served before it is swapped out, within the `aging` bound).
//!
//! Everything runs in this process, on one tokio runtime. For each policy it starts a fresh
//! simulated Ollama (three chat models, `--load-ms` cold-load latency, `--token-ms` per token,
//! 8 tokens a reply, `--parallel` generations at once per model as Ollama's
//! `OLLAMA_NUM_PARALLEL`, default 1; the simulator itself may hold all three models, so only
//! the proxy decides unloads) and a fresh proxy in front of it with `[limits] max_models_loaded = 1`.
//! `--clients` tasks then share `--requests` non-streaming `POST /api/chat` requests; the
//! model of each request is drawn beforehand with a seeded PRNG (`--seed`), so both policies
//! see the same sequence of models.
//!
//! Reading the result, per policy:
//! - `loads`: cold loads the simulator saw (all three models; the first load counts), with
//!   the proxy's own count in parentheses when it differs;
//! - `busy-unl`: unloads that reached the simulator while the model was still answering or
//!   loading (must be 0: the proxy never unloads a model with a request in flight);
//! - `err`: requests that did not get a 200 (or timed out after 10 minutes);
//! - `p50 p90 p99 max`: time from sending a request to the end of its response, queueing and
//!   loading included;
//! - `wall`, `req/s`: the time for all requests, and requests per second over it.
//!
//! The last lines give FIFO loads / grouped loads and grouped p99 / FIFO p99, and check the
//! target of the issue: at least 2x fewer loads than FIFO with a p99 no worse than FIFO's.
//! The exit code is 1 when the target is missed, or when any run had errors or unloads
//! while busy, so the benchmark can serve as a check.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use llm_warden_sim::ollama::{self, OllamaConfig};
use llm_warden_sim::SimModel;
use tokio::net::TcpListener;

#[path = "common/mod.rs"]
mod common;
use common::Rng;

/// The models the clients ask for, as the simulator names them.
const MODELS: [&str; 3] = ["llama3.2:latest", "qwen2.5:7b", "mistral:7b"];
/// One request may take this long before it counts as an error (a hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Parser, Debug)]
#[command(about = "Lifecycle scheduling benchmark: grouped queue vs FIFO, one model slot")]
struct Args {
    /// Requests per run, shared by all clients.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Concurrent clients (each sends one request at a time).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Cold-load latency of the simulated Ollama, ms.
    #[arg(long, default_value_t = 500)]
    load_ms: u64,
    /// Delay before each of the 8 reply tokens, ms.
    #[arg(long, default_value_t = 20)]
    token_ms: u64,
    /// Generations one model runs at once in the simulator (`OLLAMA_NUM_PARALLEL`; Ollama's
    /// default is 1); 0 = unlimited.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Seed of the model choices (the same sequence for both policies).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which policies to run.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    policy: Which,
    /// `[queue] aging` for the grouped policy (default: the proxy's own default).
    #[arg(long)]
    aging: Option<String>,
    /// Print the slowest requests of each run.
    #[arg(long, default_value_t = 0)]
    show_slowest: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Fifo,
    Grouped,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Fifo,
    Grouped,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Grouped => "grouped",
        }
    }
}

fn main() {
    if !common::main_with("schedbench", run(Args::parse())) {
        std::process::exit(1);
    }
}

/// One request as a client saw it.
#[derive(Clone, Debug)]
struct Sample {
    index: usize,
    model: &'static str,
    /// When it was sent, from the start of the run.
    sent: Duration,
    latency: Duration,
    /// `None` for a 200, else what went wrong.
    error: Option<String>,
}

/// What one policy's run measured.
struct RunResult {
    policy: Policy,
    loads: usize,
    loads_per_model: Vec<usize>,
    proxy_loads: Option<u64>,
    busy_unloads: usize,
    errors: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    wall: Duration,
    samples: Vec<Sample>,
}

impl RunResult {
    fn rps(&self) -> f64 {
        (self.samples.len() - self.errors) as f64 / self.wall.as_secs_f64()
    }
}

async fn run(args: Args) -> Result<bool, String> {
    if args.requests == 0 || args.clients == 0 {
        return Err("--requests and --clients must be at least 1".into());
    }
    let mut rng = Rng(args.seed);
    let plan: Arc<Vec<&'static str>> = Arc::new(
        (0..args.requests)
            .map(|_| MODELS[(rng.next() % MODELS.len() as u64) as usize])
            .collect(),
    );
    let per_model: Vec<usize> = MODELS
        .iter()
        .map(|m| plan.iter().filter(|p| *p == m).count())
        .collect();
    println!(
        "schedbench: {} requests, {} clients, 3 models ({}), max_models_loaded = 1, load {} ms, \
         reply 8 x {} ms, {} parallel per model, seed {}",
        args.requests,
        args.clients,
        MODELS
            .iter()
            .zip(&per_model)
            .map(|(m, n)| format!("{m} x{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        args.load_ms,
        args.token_ms,
        if args.parallel == 0 {
            "unlimited".to_string()
        } else {
            args.parallel.to_string()
        },
        args.seed,
    );
    let policies: &[Policy] = match args.policy {
        Which::Fifo => &[Policy::Fifo],
        Which::Grouped => &[Policy::Grouped],
        Which::Both => &[Policy::Fifo, Policy::Grouped],
    };
    let mut results = Vec::new();
    for &p in policies {
        let r = run_policy(&args, p, plan.clone()).await?;
        eprintln!(
            "  {:<7} done: {} loads, p99 {}, {:.1}s",
            p.name(),
            r.loads,
            ms(r.p99),
            r.wall.as_secs_f64()
        );
        results.push(r);
    }

    println!();
    println!(
        "{:<8} {:>6} {:>9} {:>8} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "policy",
        "loads",
        "per-model",
        "busy-unl",
        "err",
        "p50",
        "p90",
        "p99",
        "max",
        "wall",
        "req/s"
    );
    for r in &results {
        let loads = match r.proxy_loads {
            Some(p) if p as usize != r.loads => format!("{} ({p})", r.loads),
            _ => r.loads.to_string(),
        };
        println!(
            "{:<8} {:>6} {:>9} {:>8} {:>4} {:>8} {:>8} {:>8} {:>8} {:>7.1}s {:>7.2}",
            r.policy.name(),
            loads,
            r.loads_per_model
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            r.busy_unloads,
            r.errors,
            ms(r.p50),
            ms(r.p90),
            ms(r.p99),
            ms(r.max),
            r.wall.as_secs_f64(),
            r.rps(),
        );
    }

    for r in &results {
        if args.show_slowest > 0 {
            let mut s = r.samples.clone();
            s.sort_by_key(|x| std::cmp::Reverse(x.latency));
            println!();
            println!(
                "{} slowest requests ({}):",
                args.show_slowest,
                r.policy.name()
            );
            for x in s.iter().take(args.show_slowest) {
                println!(
                    "  #{:<4} {:<16} sent at {:>8}  took {:>8}",
                    x.index,
                    x.model,
                    ms(x.sent),
                    ms(x.latency)
                );
            }
        }
        let errs: Vec<&Sample> = r.samples.iter().filter(|s| s.error.is_some()).collect();
        if !errs.is_empty() {
            println!();
            println!("{} errors ({}), first ones:", errs.len(), r.policy.name());
            for x in errs.iter().take(5) {
                println!(
                    "  #{:<4} {:<16} sent at {:>8}  after {:>8}: {}",
                    x.index,
                    x.model,
                    ms(x.sent),
                    ms(x.latency),
                    x.error.as_deref().unwrap_or("")
                );
            }
        }
    }

    let mut ok = results.iter().all(|r| r.errors == 0 && r.busy_unloads == 0);
    if !ok {
        println!();
        println!("FAIL: a run had errors or unloads while busy");
    }
    let fifo = results.iter().find(|r| r.policy == Policy::Fifo);
    let grouped = results.iter().find(|r| r.policy == Policy::Grouped);
    if let (Some(f), Some(g)) = (fifo, grouped) {
        let load_ratio = f.loads as f64 / g.loads.max(1) as f64;
        let p99_ratio = g.p99.as_secs_f64() / f.p99.as_secs_f64();
        let met = load_ratio >= 2.0 && g.p99 <= f.p99;
        println!();
        println!(
            "fifo/grouped loads {load_ratio:.2}x (target >= 2), grouped/fifo p99 {p99_ratio:.2} \
             (target <= 1), grouped/fifo req/s {:.2}",
            g.rps() / f.rps()
        );
        println!("target {}", if met { "met" } else { "NOT met" });
        ok &= met;
    }
    Ok(ok)
}

fn ms(d: Duration) -> String {
    format!("{:.0}ms", d.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One fresh simulator and proxy, the whole plan through them, then both stopped.
async fn run_policy(
    args: &Args,
    policy: Policy,
    plan: Arc<Vec<&'static str>>,
) -> Result<RunResult, String> {
    let mut models = OllamaConfig::default().models;
    models.retain(|m| !m.embedding);
    models.push(SimModel::chat("mistral:7b", 4_100_000_000, 32_768));
    let sim_cfg = OllamaConfig {
        models,
        load_latency: Duration::from_millis(args.load_ms),
        token_delay: Duration::from_millis(args.token_ms),
        reply_tokens: 8,
        max_loaded_models: 3,
        keep_alive: Duration::MAX,
        num_parallel: args.parallel,
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let sim = ollama::spawn(sim_cfg, listener);

    let aging = match (policy, &args.aging) {
        (Policy::Grouped, Some(a)) => format!("aging = \"{a}\"\n"),
        _ => String::new(),
    };
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[providers]]\nname = \"ollama\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{}\"\n\n\
         [limits]\nmax_models_loaded = 1\ninactivity_timeout = \"1h\"\n\n\
         [queue]\nmax_waiting = 1024\ntimeout = \"600s\"\npolicy = \"{}\"\n{aging}",
        sim.url(),
        policy.name()
    );
    let cfg = llm_warden::config::load_str(&toml).map_err(|e| format!("config: {e}"))?;
    let proxy = llm_warden::app::start(cfg)
        .await
        .map_err(|e| format!("proxy: {e}"))?;
    let url: Arc<str> = format!("http://{}/api/chat", proxy.proxy_addr(0)).into();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(plan.len())));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (next, samples, plan, url, client) = (
            next.clone(),
            samples.clone(),
            plan.clone(),
            url.clone(),
            client.clone(),
        );
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(&model) = plan.get(index) else {
                    break;
                };
                let sent = start.elapsed();
                let t0 = Instant::now();
                let error =
                    match tokio::time::timeout(REQUEST_TIMEOUT, chat(&client, &url, model)).await {
                        Ok(r) => r.err(),
                        Err(_) => Some(format!("no reply within {REQUEST_TIMEOUT:?}")),
                    };
                let latency = t0.elapsed();
                samples.lock().unwrap().push(Sample {
                    index,
                    model,
                    sent,
                    latency,
                    error,
                });
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| format!("client task: {e}"))?;
    }
    let wall = start.elapsed();

    let proxy_loads = proxy_loads(&client, &proxy).await;
    let loads_per_model: Vec<usize> = MODELS.iter().map(|m| sim.state.load_count(m)).collect();
    let busy_unloads = sim.state.unloads_while_busy();
    drop(client);
    proxy.shutdown().await;
    drop(sim);

    let mut samples = std::mem::take(&mut *samples.lock().unwrap());
    samples.sort_by_key(|s| s.index);
    let mut lat: Vec<Duration> = samples
        .iter()
        .filter(|s| s.error.is_none())
        .map(|s| s.latency)
        .collect();
    lat.sort();
    Ok(RunResult {
        policy,
        loads: loads_per_model.iter().sum(),
        loads_per_model,
        proxy_loads,
        busy_unloads,
        errors: samples.iter().filter(|s| s.error.is_some()).count(),
        p50: percentile(&lat, 0.50),
        p90: percentile(&lat, 0.90),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        wall,
        samples,
    })
}

/// One non-streaming chat through the proxy; `Err` describes anything but a 200.
async fn chat(client: &HttpClient, url: &str, model: &str) -> Result<(), String> {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":false}}"#
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{status}, body error: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(())
}

/// The loads the proxy counts itself (`/status`), to cross-check the simulator's count.
async fn proxy_loads(client: &HttpClient, proxy: &llm_warden::app::Running) -> Option<u64> {
    let req = Request::get(format!("http://{}/status", proxy.admin_addr))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = client.request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(
        v["models"]
            .as_array()?
            .iter()
            .filter_map(|m| m["loads"].as_u64())
            .sum(),
    )
}
