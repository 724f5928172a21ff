//! Run with: `cargo run --release --bin loadgen -- ...` (after `cargo build --release`).
//!
//! Measures what llm-warden costs on top of a provider: every scenario runs against the
//! provider directly and through the proxy, alternating (direct, proxy, proxy, direct, ...)
//! for `--rounds` rounds, and the median of each number over the rounds is reported together
//! with the proxy/direct ratio.
//!
//! By default it starts its own processes from `target/release/llm-warden` (or `--bin`):
//! two simulated Ollamas (`--token-delay 0ms`, and `--slow-token-delay` for the paced stream
//! variant) and one proxy with a provider in front of each, and kills them at the end. With
//! `--direct URL --proxy URL [--proxy-pid PID] [--direct-pid PID]` it measures processes
//! started elsewhere (a real Ollama, or nginx for comparison, see `benches/compare.sh`).
//!
//! Scenarios:
//! - `version`: `GET /api/version`, a pass-through endpoint, at each `--concurrency`;
//! - `chat`: `POST /api/chat` with `"stream":false`, an inspected endpoint (body read,
//!   model parsed, usage scanned), at each `--concurrency`;
//! - `stream`: streamed `POST /api/chat` (NDJSON), one at a time: time to first body chunk,
//!   the gaps between consecutive body chunks, and total time;
//! - `stream-paced`: the same against a simulator with a per-token delay (own processes only).
//!
//! CPU time comes from `/proc/<pid>/stat` (utime + stime, in clock ticks) read before and
//! after each run, divided by the requests of that run. See `benches/README.md`.
//!
//! More scenarios and modes:
//! - `chat-32k`: non-streaming `POST /api/chat` with a ~32,000-token history and
//!   `options.num_ctx` 40960, c=1: the proxy counts it, finds that it fits and forwards it
//!   unchanged; a response the proxy compacted counts as an error;
//! - `--api openai`: the `version` scenario is `GET /v1/models` and the chats are
//!   `POST /v1/chat/completions` (streams are SSE ending with `data: [DONE]`);
//! - `--prompt-tokens N`: the chats send a conversation of ~N tokens (cl100k) instead of
//!   one short question;
//! - `--hold N`: instead of the scenarios, opens N concurrent streams through the proxy,
//!   each on its own connection, against a slow simulator, and reports the proxy's RSS
//!   before, while all are open, and after;
//! - `--fleet`: instead of the scenarios, the fleet benchmark (issue 21): simulated hosts
//!   behind the picker (a front), round-robin and least-request (`fleet.rs`).
//!
//! A progress bar (stderr, only when it is a terminal; `--no-progress` turns it off) shows
//! each run's scenario, round, target, elapsed time, live req/s and errors.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use llm_warden::proxy::{COMPACTED_HEADER, NUM_CTX_HEADER};
use llm_warden::tokens::{Encoding, TokenCounter};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};

mod fleet;

#[derive(Parser, Debug)]
#[command(about = "Proxy overhead benchmark: direct vs through llm-warden, alternating")]
struct Args {
    /// The llm-warden binary (default: the one beside this binary in the target directory,
    /// else <repo>/target/release/llm-warden).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Measure an already running provider at this URL (needs --proxy).
    #[arg(long, requires = "proxy")]
    direct: Option<String>,
    /// Measure an already running proxy at this URL, in front of --direct (with --hold,
    /// --direct may be left out).
    #[arg(long)]
    proxy: Option<String>,
    /// PID of the external proxy, for its CPU time.
    #[arg(long, requires = "proxy")]
    proxy_pid: Option<u32>,
    /// PID of the external provider, for its CPU time (and its RSS with --hold).
    #[arg(long)]
    direct_pid: Option<u32>,
    /// Rounds per scenario; each round runs direct and proxy once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per run (ignored with --count).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Requests per run instead of a fixed duration.
    #[arg(long)]
    count: Option<u64>,
    /// Warm-up seconds per target before each scenario (not measured).
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Concurrency levels for the non-streaming scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Concurrency levels for the streaming scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    stream_concurrency: Vec<usize>,
    /// Per-token delay of the second simulator for `stream-paced` (ms; 0 disables it).
    #[arg(long, default_value_t = 5)]
    slow_token_delay: u64,
    /// Scenarios to run (version, chat, stream, stream-paced, chat-32k).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "version,chat,stream,stream-paced,chat-32k"
    )]
    scenarios: Vec<String>,
    /// Request shapes: Ollama native (`/api/version`, `/api/chat`, NDJSON streams) or
    /// OpenAI (`/v1/models`, `/v1/chat/completions`, SSE streams). `chat-32k` is always
    /// Ollama native (it sets `options.num_ctx`).
    #[arg(long, value_enum, default_value_t = Api::Ollama)]
    api: Api,
    /// Tokens (cl100k, approximate) of the conversation the chat and stream scenarios send:
    /// alternating user/assistant turns of English-like text; 0 = one short question.
    #[arg(long, default_value_t = 0)]
    prompt_tokens: usize,
    /// Tokens of the `chat-32k` history.
    #[arg(long, default_value_t = 32_000)]
    long_tokens: usize,
    /// `options.num_ctx` of the `chat-32k` requests (the window they must fit without
    /// compaction).
    #[arg(long, default_value_t = 40_960)]
    long_num_ctx: u64,
    /// Requests per `chat-32k` run (unless --count is given): the simulator keeps every
    /// request body (~150 KB each here) in memory.
    #[arg(long, default_value_t = 300)]
    long_count: u64,
    /// No progress bar (it is drawn on stderr only when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Hold mode: open this many concurrent streams through the proxy (each on its own
    /// connection), wait until all have their first chunk, and report the proxy's RSS
    /// before, while they are open, and after. Replaces the scenarios.
    #[arg(long)]
    hold: Option<usize>,
    /// Hold mode, own simulator: delay per streamed token (ms).
    #[arg(long, default_value_t = 500)]
    hold_token_delay: u64,
    /// Hold mode, own simulator: tokens per reply (streams stay open about
    /// tokens × delay).
    #[arg(long, default_value_t = 60)]
    hold_reply_tokens: usize,
    /// Hold mode: streams being opened at once (connect until response headers); bounds
    /// the burst on the proxy's listen backlog.
    #[arg(long, default_value_t = 64)]
    hold_open_parallel: usize,
    /// Hold mode: seconds to wait for every stream's first chunk before sampling anyway.
    #[arg(long, default_value_t = 120.0)]
    hold_timeout: f64,
    /// Hold mode: seconds to wait after the last stream ended before sampling the proxy's
    /// RSS `after` (its upstream pool keeps idle connections for 90 s).
    #[arg(long, default_value_t = 2.0)]
    hold_settle: f64,
    /// Model name sent in chat requests.
    #[arg(long, default_value = "llama3.2")]
    model: String,
    /// Restart the (own) simulator before each scenario; it keeps every request in memory.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    restart_simulator: bool,
    /// Load generator worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Fleet mode (issue 21): simulated hosts, each a simulator and a node, compared under
    /// the picker (a front), round-robin and least-request. Replaces the scenarios; see
    /// `fleet.rs` and the `--fleet-*` flags.
    #[arg(long)]
    fleet: bool,
    #[command(flatten)]
    fleet_args: fleet::FleetArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Api {
    Ollama,
    Openai,
}

fn main() {
    let args = Args::parse();
    if args.proxy.is_some() && args.direct.is_none() && args.hold.is_none() {
        eprintln!("loadgen: --proxy needs --direct (except with --hold)");
        std::process::exit(2);
    }
    // Each open stream holds a descriptor here (hold mode: thousands).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            if let Some(h) = args.hold {
                if n < h as u64 + 64 {
                    eprintln!(
                        "loadgen: warning: open-file limit {n} is below --hold {h}; raise it \
                         (`ulimit -Hn 65536; ulimit -n 65536` as root)"
                    );
                }
            }
        }
        Err(e) => eprintln!("loadgen: cannot raise the open-file limit: {e}"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

// === targets ===

/// One side of a comparison: where to send requests, and whose CPU to read.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    prefix: String,
    /// The process this target is (the proxy, or the provider for direct runs).
    pid: Option<u32>,
}

/// A pair to compare, plus the provider behind the proxy.
struct Pair {
    direct: Target,
    proxy: Target,
}

fn target(url: &str, pid: Option<u32>) -> Res<Target> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs are supported"));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{url}: no host"))?
        .clone();
    let port = auth.port_u16().unwrap_or(80);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(auth.host(), port))
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Target {
        addr,
        host: HeaderValue::from_str(auth.as_str()).map_err(|e| e.to_string())?,
        prefix,
        pid,
    })
}

/// Processes this benchmark started; killed on drop.
struct Procs {
    children: Vec<(&'static str, Child)>,
    /// How each child was started, to restart it.
    cmds: Vec<(PathBuf, Vec<String>)>,
    dir: PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn spawn(procs: &mut Procs, name: &'static str, bin: &Path, args: &[&str]) -> Res<u32> {
    let log = std::fs::File::create(procs.dir.join(format!("{name}.log")))
        .map_err(|e| format!("log file: {e}"))?;
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let pid = child.id();
    procs.children.push((name, child));
    procs
        .cmds
        .push((bin.to_owned(), args.iter().map(|a| a.to_string()).collect()));
    Ok(pid)
}

/// Restarts child `name` with the same command line (same port) and waits until `t` answers;
/// returns the new PID. Used for the simulator, which keeps a record of every request it
/// served and so grows without bound.
async fn restart(procs: &mut Procs, name: &'static str, t: &Target) -> Res<u32> {
    let i = procs
        .children
        .iter()
        .position(|(n, _)| *n == name)
        .ok_or_else(|| format!("no process {name}"))?;
    let (_, mut old) = procs.children.remove(i);
    let (bin, args) = procs.cmds.remove(i);
    let _ = old.kill();
    let _ = old.wait();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pid = spawn(procs, name, &bin, &args)?;
    wait_ready(t, procs).await?;
    Ok(pid)
}

/// Waits until `GET /api/version` on `t` answers 200.
async fn wait_ready(t: &Target, procs: &mut Procs) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for (name, c) in &mut procs.children {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!(
                    "{name} exited ({st}); see {}",
                    procs.dir.join(format!("{name}.log")).display()
                ));
            }
        }
        if let Ok(mut conn) = Conn::open(t.addr).await {
            let spec = ReqSpec::get(t, "/api/version");
            if let Ok(r) = conn.once(&spec, &mut Vec::new(), |_| {}, || {}).await {
                if r.fail.is_none() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not answer within 15s", t.addr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The llm-warden binary, and an empty `Procs` with its temp directory.
fn own_setup(args: &Args) -> Res<(PathBuf, Procs)> {
    // Default: next to this binary (`<target>/release/loadgen` → `<target>/release/
    // llm-warden`, whatever CARGO_TARGET_DIR was), else `<repo>/target/release/llm-warden`.
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("llm-warden")))
        .filter(|b| b.is_file());
    let bin = match (&args.bin, beside) {
        (Some(b), _) => b.clone(),
        (None, Some(b)) => b,
        (None, None) => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/llm-warden")
        }
    };
    if !bin.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first, or pass --bin PATH",
            bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("llm-warden-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let procs = Procs {
        children: Vec::new(),
        cmds: Vec::new(),
        dir,
    };
    Ok((bin, procs))
}

/// The head of the proxy's config: the admin listener, a context cap above `chat-32k`'s
/// `num_ctx` (the default `buffers.context.max`, 32768, would cap its 40960 and compact),
/// and a compaction cache in the temp directory.
fn config_head(args: &Args, procs: &Procs, admin: u16) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[buffers.context]\nmax = {}\n\n\
         [compaction]\ncache_dir = {}\n",
        args.long_num_ctx.max(65_536),
        Value::String(procs.dir.join("cache").to_string_lossy().into_owned())
    )
}

/// Starts two simulators and a proxy in front of both; returns (fast pair, paced pair).
async fn start_own(args: &Args) -> Res<(Procs, Pair, Option<Pair>)> {
    let (bin, mut procs) = own_setup(args)?;
    let paced = args.slow_token_delay > 0;
    let (sim1, prox1, admin) = (free_port()?, free_port()?, free_port()?);
    let sim1_pid = spawn(
        &mut procs,
        "simulator",
        &bin,
        &[
            "simulate",
            "ollama",
            "--listen",
            &format!("127.0.0.1:{sim1}"),
            "--token-delay",
            "0ms",
            "--load-latency",
            "0ms",
        ],
    )?;
    let mut toml = config_head(args, &procs, admin);
    let _ = write!(
        toml,
        "\n[[providers]]\nname = \"fast\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:{prox1}\"\nupstream = \"http://127.0.0.1:{sim1}\"\n"
    );
    let mut slow = None;
    if paced {
        let (sim2, prox2) = (free_port()?, free_port()?);
        let delay = format!("{}ms", args.slow_token_delay);
        let pid = spawn(
            &mut procs,
            "simulator-paced",
            &bin,
            &[
                "simulate",
                "ollama",
                "--listen",
                &format!("127.0.0.1:{sim2}"),
                "--token-delay",
                &delay,
                "--load-latency",
                "0ms",
            ],
        )?;
        let _ = write!(
            toml,
            "\n[[providers]]\nname = \"paced\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:{prox2}\"\nupstream = \"http://127.0.0.1:{sim2}\"\n"
        );
        slow = Some((sim2, prox2, pid));
    }
    let cfg = procs.dir.join("config.toml");
    std::fs::write(&cfg, toml).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let cfg = cfg.to_string_lossy().into_owned();
    let proxy_pid = spawn(&mut procs, "proxy", &bin, &["serve", "--config", &cfg])?;

    let mk = |port: u16, pid: u32| target(&format!("http://127.0.0.1:{port}"), Some(pid));
    let fast = Pair {
        direct: mk(sim1, sim1_pid)?,
        proxy: mk(prox1, proxy_pid)?,
    };
    wait_ready(&fast.direct, &mut procs).await?;
    wait_ready(&fast.proxy, &mut procs).await?;
    let slow = match slow {
        Some((sim2, prox2, pid)) => {
            let p = Pair {
                direct: mk(sim2, pid)?,
                proxy: mk(prox2, proxy_pid)?,
            };
            wait_ready(&p.direct, &mut procs).await?;
            wait_ready(&p.proxy, &mut procs).await?;
            Some(p)
        }
        None => None,
    };
    println!(
        "started {} (simulator pid {sim1_pid}, proxy pid {proxy_pid}{}); logs in {}",
        bin.display(),
        slow.as_ref()
            .and_then(|p| p.direct.pid)
            .map(|p| format!(", paced simulator pid {p}"))
            .unwrap_or_default(),
        procs.dir.display()
    );
    Ok((procs, fast, slow))
}

// === CPU time from /proc ===

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn self_ticks() -> Option<u64> {
    cpu_ticks(std::process::id())
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`), as MB.
fn status_mb(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: f64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Open descriptors of a process (entries of `/proc/<pid>/fd`).
fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

fn rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmRSS")
}

// === HTTP client ===

/// How a successful response body ends (streams only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Any 2xx body.
    Any,
    /// NDJSON whose last line has `"done":true`.
    Ndjson,
    /// SSE whose last event is `data: [DONE]`.
    Sse,
}

/// What one request looks like; cloned cheaply per request (`Bytes`, `Uri` share storage).
struct ReqSpec {
    method: Method,
    uri: Uri,
    host: HeaderValue,
    body: Bytes,
    expect: Expect,
}

impl ReqSpec {
    fn get(t: &Target, path: &str) -> ReqSpec {
        ReqSpec {
            method: Method::GET,
            uri: format!("{}{path}", t.prefix).parse().expect("path"),
            host: t.host.clone(),
            body: Bytes::new(),
            expect: Expect::Any,
        }
    }

    fn post(t: &Target, path: &str, body: Bytes, expect: Expect) -> ReqSpec {
        ReqSpec {
            method: Method::POST,
            body,
            expect,
            ..ReqSpec::get(t, path)
        }
    }

    fn streaming(&self) -> bool {
        self.expect != Expect::Any
    }

    fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(header::HOST, self.host.clone());
        if !self.body.is_empty() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        req
    }
}

/// Whether a stream's last bytes (`prev` + `last` chunk) end it as `expect` says.
fn ends_well(expect: Expect, prev: &[u8], last: &[u8]) -> bool {
    let mut tail = Vec::with_capacity(prev.len().min(256) + last.len().min(256));
    tail.extend_from_slice(&prev[prev.len().saturating_sub(256)..]);
    tail.extend_from_slice(&last[last.len().saturating_sub(256)..]);
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty());
    match (expect, line) {
        (Expect::Any, _) => true,
        (Expect::Ndjson, Some(l)) => l.replace(' ', "").contains("\"done\":true"),
        (Expect::Sse, Some(l)) => l == "data: [DONE]",
        (_, None) => false,
    }
}

/// One keep-alive HTTP/1.1 connection, owned by one worker.
struct Conn {
    tx: SendRequest<Full<Bytes>>,
}

/// What one request took.
struct Outcome {
    /// Why it counts as failed (non-2xx, compacted, a stream that did not end properly).
    fail: Option<String>,
    /// The proxy rewrote `options.num_ctx` (`x-llm-warden-num-ctx`: sent->used).
    num_ctx: Option<String>,
    /// Send → first non-empty body chunk (or end of body).
    first: Duration,
    /// Send → end of body.
    total: Duration,
    bytes: u64,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Res<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { tx })
    }

    /// Sends `spec` and reads the whole response; for streams, the gaps between
    /// consecutive non-empty body chunks are appended to `gaps` (µs). `on_headers` runs when
    /// the response head has arrived (with whether its status is 2xx), `on_first` at the
    /// first body chunk.
    async fn once(
        &mut self,
        spec: &ReqSpec,
        gaps: &mut Vec<u32>,
        on_headers: impl FnOnce(bool),
        on_first: impl FnOnce(),
    ) -> Res<Outcome> {
        let req = spec.build();
        self.tx.ready().await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let resp = self.tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        on_headers(status.is_success());
        let mut fail = (!status.is_success()).then(|| format!("status {status}"));
        if let Some(v) = resp.headers().get(COMPACTED_HEADER) {
            fail = Some(format!(
                "compacted by the proxy ({COMPACTED_HEADER}: {})",
                v.to_str().unwrap_or("?")
            ));
        }
        let num_ctx = resp
            .headers()
            .get(NUM_CTX_HEADER)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        let mut body = resp.into_body();
        let mut first = None;
        let mut on_first = Some(on_first);
        let mut bytes = 0u64;
        let streaming = spec.streaming();
        let (mut prev, mut last) = (Bytes::new(), Bytes::new());
        let mut last_at = t0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(d) = frame.into_data() else { continue };
            if d.is_empty() {
                continue;
            }
            let now = Instant::now();
            if first.is_none() {
                first = Some(now - t0);
                if let Some(f) = on_first.take() {
                    f();
                }
            } else if streaming {
                gaps.push(us(now - last_at));
            }
            last_at = now;
            bytes += d.len() as u64;
            if streaming {
                prev = std::mem::replace(&mut last, d);
            }
        }
        let total = t0.elapsed();
        if fail.is_none() && streaming && !ends_well(spec.expect, &prev, &last) {
            fail = Some(match spec.expect {
                Expect::Sse => "stream did not end with `data: [DONE]`".into(),
                _ => "stream did not end with `\"done\":true`".into(),
            });
        }
        Ok(Outcome {
            fail,
            num_ctx,
            first: first.unwrap_or(total),
            total,
            bytes,
        })
    }
}

// === progress ===

/// Counters the workers bump and the progress ticker reads.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// A progress bar for one run, or a hidden one.
fn bar(enabled: bool, len: u64, template: &str, prefix: String) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len).with_prefix(prefix);
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Refreshes `pb` from `live` a few times a second until aborted.
fn ticker(pb: ProgressBar, live: Arc<Live>, budget: Budget) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let mut iv = tokio::time::interval(Duration::from_millis(200));
        loop {
            iv.tick().await;
            let ok = live.ok.load(Ordering::Relaxed);
            let errors = live.errors.load(Ordering::Relaxed);
            let el = t0.elapsed();
            match budget {
                Budget::Time(_) => pb.set_position(el.as_millis() as u64),
                Budget::Count(_) => pb.set_position(ok + errors),
            }
            pb.set_message(format!(
                "{:.0} req/s, {errors} errors",
                ok as f64 / el.as_secs_f64().max(1e-3)
            ));
        }
    })
}

// === one run ===

/// How long a run lasts.
#[derive(Clone, Copy)]
enum Budget {
    Time(Duration),
    Count(u64),
}

#[derive(Default)]
struct WorkerOut {
    total_us: Vec<u32>,
    first_us: Vec<u32>,
    gaps_us: Vec<u32>,
    ok: u64,
    errors: u64,
    bytes: u64,
    last_error: Option<String>,
    num_ctx: Option<String>,
}

/// Numbers of one run against one target.
#[derive(Clone, Debug, Default)]
struct RunStats {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    ttfb50: f64,
    ttfb99: f64,
    /// Gaps between consecutive body chunks of a stream (µs).
    gap50: f64,
    gap99: f64,
    gap_max: f64,
    ok: u64,
    errors: u64,
    bytes_per_resp: f64,
    /// µs CPU per request of the measured process (proxy, or provider when direct).
    cpu_target: Option<f64>,
    /// µs CPU per request of the provider behind the proxy (proxy runs only).
    cpu_upstream: Option<f64>,
    /// µs CPU per request of this load generator.
    cpu_loadgen: Option<f64>,
    /// Fewest clock ticks any CPU figure of this run rests on (quantization is ±1 tick).
    min_ticks: u64,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

async fn worker(
    addr: SocketAddr,
    spec: Arc<ReqSpec>,
    budget: Budget,
    issued: Arc<AtomicU64>,
    start: Arc<Barrier>,
    live: Arc<Live>,
) -> WorkerOut {
    let mut out = WorkerOut {
        total_us: Vec::with_capacity(8192),
        first_us: Vec::with_capacity(8192),
        ..Default::default()
    };
    let mut conn = Conn::open(addr).await;
    start.wait().await;
    let deadline = match budget {
        Budget::Time(d) => Some(Instant::now() + d),
        Budget::Count(_) => None,
    };
    let fail = |out: &mut WorkerOut, e: String| {
        out.errors += 1;
        out.last_error = Some(e);
        live.errors.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        match budget {
            Budget::Time(_) => {
                if Some(Instant::now()) >= deadline {
                    break;
                }
            }
            Budget::Count(n) => {
                if issued.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
        }
        let c = match &mut conn {
            Ok(c) => c,
            Err(_) => {
                conn = Conn::open(addr).await;
                match &mut conn {
                    Ok(c) => c,
                    Err(e) => {
                        let e = e.clone();
                        fail(&mut out, e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
        };
        match c.once(&spec, &mut out.gaps_us, |_| {}, || {}).await {
            Ok(o) => {
                if o.num_ctx.is_some() {
                    out.num_ctx = o.num_ctx;
                }
                match o.fail {
                    None => {
                        out.ok += 1;
                        live.ok.fetch_add(1, Ordering::Relaxed);
                        out.bytes += o.bytes;
                        out.total_us.push(us(o.total));
                        out.first_us.push(us(o.first));
                    }
                    Some(e) => fail(&mut out, e),
                }
            }
            Err(e) => {
                fail(&mut out, e);
                conn = Err(String::new());
            }
        }
    }
    out
}

/// Runs `conc` workers against `t` and measures; `pb` shows its progress.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    t: &Target,
    upstream_pid: Option<u32>,
    spec: &Arc<ReqSpec>,
    conc: usize,
    budget: Budget,
    tck: f64,
    pb: ProgressBar,
) -> RunStats {
    let start = Arc::new(Barrier::new(conc + 1));
    let issued = Arc::new(AtomicU64::new(0));
    let live = Arc::new(Live::default());
    let handles: Vec<_> = (0..conc)
        .map(|_| {
            tokio::spawn(worker(
                t.addr,
                spec.clone(),
                budget,
                issued.clone(),
                start.clone(),
                live.clone(),
            ))
        })
        .collect();
    // Every worker has connected once the barrier opens; measure from here.
    let read = |pid: Option<u32>| pid.and_then(cpu_ticks);
    let (c0, u0, l0) = (read(t.pid), read(upstream_pid), self_ticks());
    start.wait().await;
    let t0 = Instant::now();
    let tick = (!pb.is_hidden()).then(|| ticker(pb.clone(), live.clone(), budget));
    let mut all = WorkerOut::default();
    for h in handles {
        let w = h.await.expect("worker panicked");
        all.total_us.extend_from_slice(&w.total_us);
        all.first_us.extend_from_slice(&w.first_us);
        all.gaps_us.extend_from_slice(&w.gaps_us);
        all.ok += w.ok;
        all.errors += w.errors;
        all.bytes += w.bytes;
        if w.last_error.is_some() {
            all.last_error = w.last_error;
        }
        if w.num_ctx.is_some() {
            all.num_ctx = w.num_ctx;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (c1, u1, l1) = (read(t.pid), read(upstream_pid), self_ticks());
    if let Some(tick) = tick {
        tick.abort();
    }
    pb.finish_and_clear();
    if let Some(e) = &all.last_error {
        eprintln!(
            "  warning: {} errors against {} (last: {e})",
            all.errors, t.addr
        );
    }
    if let Some(n) = &all.num_ctx {
        eprintln!(
            "  note: {} rewrote options.num_ctx ({NUM_CTX_HEADER}: {n})",
            t.addr
        );
    }
    all.total_us.sort_unstable();
    all.first_us.sort_unstable();
    all.gaps_us.sort_unstable();
    let n = all.ok.max(1) as f64;
    let per_req = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if all.ok > 0 => Some((b - a) as f64 / tck * 1e6 / n),
        _ => None,
    };
    RunStats {
        rps: all.ok as f64 / elapsed,
        p50: pct(&all.total_us, 0.50),
        p90: pct(&all.total_us, 0.90),
        p99: pct(&all.total_us, 0.99),
        ttfb50: pct(&all.first_us, 0.50),
        ttfb99: pct(&all.first_us, 0.99),
        gap50: pct(&all.gaps_us, 0.50),
        gap99: pct(&all.gaps_us, 0.99),
        gap_max: pct(&all.gaps_us, 1.0),
        ok: all.ok,
        errors: all.errors,
        bytes_per_resp: all.bytes as f64 / n,
        cpu_target: per_req(c0, c1),
        cpu_upstream: per_req(u0, u1),
        cpu_loadgen: per_req(l0, l1),
        min_ticks: [(c0, c1), (u0, u1), (l0, l1)]
            .iter()
            .filter_map(|&(a, b)| Some(b? - a?))
            .min()
            .unwrap_or(0),
    }
}

// === scenarios ===

struct Scenario {
    name: String,
    streaming: bool,
    conc: usize,
    direct_spec: Arc<ReqSpec>,
    proxy_spec: Arc<ReqSpec>,
    pair: usize,
    /// Its own budget per run and warm-up (`chat-32k`: a request count).
    budget: Option<(Budget, Budget)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn median_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// Medians over rounds, metric by metric.
fn summarize(runs: &[RunStats]) -> RunStats {
    let m = |f: fn(&RunStats) -> f64| median(runs.iter().map(f).collect());
    RunStats {
        rps: m(|r| r.rps),
        p50: m(|r| r.p50),
        p90: m(|r| r.p90),
        p99: m(|r| r.p99),
        ttfb50: m(|r| r.ttfb50),
        ttfb99: m(|r| r.ttfb99),
        gap50: m(|r| r.gap50),
        gap99: m(|r| r.gap99),
        gap_max: runs
            .iter()
            .map(|r| r.gap_max)
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max),
        ok: runs.iter().map(|r| r.ok).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        bytes_per_resp: m(|r| r.bytes_per_resp),
        cpu_target: median_opt(runs.iter().map(|r| r.cpu_target)),
        cpu_upstream: median_opt(runs.iter().map(|r| r.cpu_upstream)),
        cpu_loadgen: median_opt(runs.iter().map(|r| r.cpu_loadgen)),
        min_ticks: runs.iter().map(|r| r.min_ticks).min().unwrap_or(0),
    }
}

fn fmt_lat(us: f64) -> String {
    if !us.is_finite() {
        "-".into()
    } else if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

fn fmt_delta(us: f64) -> String {
    if us < 0.0 {
        format!("-{}", fmt_lat(-us))
    } else {
        format!("+{}", fmt_lat(us))
    }
}

/// Below this many clock ticks per run a CPU figure is marked `*` (rough).
const FEW_TICKS: u64 = 20;

fn fmt_cpu(v: Option<f64>, ticks: u64) -> String {
    let mark = if ticks < FEW_TICKS { "*" } else { "" };
    v.map(|v| format!("{v:.1}{mark}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(p: f64, d: f64) -> String {
    if p.is_finite() && d.is_finite() && d > 0.0 {
        format!("{:.2}x", p / d)
    } else {
        "-".into()
    }
}

/// Display width of `s` (µ and × count as one column).
fn pad(s: &str, w: usize) -> String {
    let n = s.chars().count();
    format!("{}{s}", " ".repeat(w.saturating_sub(n)))
}

struct Row {
    scenario: String,
    direct: RunStats,
    proxy: RunStats,
    streaming: bool,
}

fn print_table(rows: &[Row]) {
    const W: [usize; 12] = [20, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9, 8];
    let head = [
        "scenario", "target", "req/s", "p50", "p90", "p99", "1st p50", "1st p99", "cpu µs",
        "sim µs", "lg µs", "errors",
    ];
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<w$}", w = W[0]);
            } else {
                s.push_str(&pad(c, W[i]));
            }
            s.push(' ');
        }
        println!("{}", s.trim_end());
    };
    line(&head.map(String::from));
    println!("{}", "-".repeat(W.iter().sum::<usize>() + W.len()));
    for r in rows {
        for (label, s) in [("direct", &r.direct), ("proxy", &r.proxy)] {
            let sim = if label == "direct" {
                s.cpu_target
            } else {
                s.cpu_upstream
            };
            let own = if label == "direct" {
                None
            } else {
                s.cpu_target
            };
            line(&[
                if label == "direct" {
                    r.scenario.clone()
                } else {
                    String::new()
                },
                label.into(),
                format!("{:.0}", s.rps),
                fmt_lat(s.p50),
                fmt_lat(s.p90),
                fmt_lat(s.p99),
                if r.streaming {
                    fmt_lat(s.ttfb50)
                } else {
                    "-".into()
                },
                if r.streaming {
                    fmt_lat(s.ttfb99)
                } else {
                    "-".into()
                },
                fmt_cpu(own, s.min_ticks),
                fmt_cpu(sim, s.min_ticks),
                fmt_cpu(s.cpu_loadgen, s.min_ticks),
                s.errors.to_string(),
            ]);
        }
        let (d, p) = (&r.direct, &r.proxy);
        line(&[
            String::new(),
            "p/d".into(),
            ratio(p.rps, d.rps),
            ratio(p.p50, d.p50),
            ratio(p.p90, d.p90),
            ratio(p.p99, d.p99),
            if r.streaming {
                ratio(p.ttfb50, d.ttfb50)
            } else {
                "-".into()
            },
            if r.streaming {
                ratio(p.ttfb99, d.ttfb99)
            } else {
                "-".into()
            },
            String::new(),
            match (p.cpu_upstream, d.cpu_target) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            },
            match (p.cpu_loadgen, d.cpu_loadgen) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            },
            String::new(),
        ]);
        if d.bytes_per_resp.is_finite()
            && p.bytes_per_resp.is_finite()
            && (d.bytes_per_resp - p.bytes_per_resp).abs() > 0.5
        {
            println!(
                "  note: bytes per response differ: direct {:.0}, proxy {:.0}",
                d.bytes_per_resp, p.bytes_per_resp
            );
        }
    }
}

/// Time to first chunk and chunk gaps of the streaming rows, with the proxy's additions.
fn print_streams(rows: &[Row]) {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.streaming).collect();
    if rows.is_empty() {
        return;
    }
    const W: [usize; 8] = [20, 7, 9, 9, 9, 9, 9, 9];
    let line = |cells: [String; 8]| {
        let mut s = format!("{:<w$} ", cells[0], w = W[0]);
        for (i, c) in cells.iter().enumerate().skip(1) {
            s.push_str(&pad(c, W[i]));
            s.push(' ');
        }
        println!("{}", s.trim_end());
    };
    println!();
    println!("streams (medians over rounds; gap max = the largest of any round):");
    line(
        [
            "scenario", "target", "1st p50", "1st p99", "gap p50", "gap p99", "gap max", "errors",
        ]
        .map(String::from),
    );
    println!("{}", "-".repeat(W.iter().sum::<usize>() + W.len()));
    for r in rows {
        for (label, s) in [("direct", &r.direct), ("proxy", &r.proxy)] {
            line([
                if label == "direct" {
                    r.scenario.clone()
                } else {
                    String::new()
                },
                label.into(),
                fmt_lat(s.ttfb50),
                fmt_lat(s.ttfb99),
                fmt_lat(s.gap50),
                fmt_lat(s.gap99),
                fmt_lat(s.gap_max),
                s.errors.to_string(),
            ]);
        }
        let (d, p) = (&r.direct, &r.proxy);
        let delta = |a: f64, b: f64| {
            if a.is_finite() && b.is_finite() {
                fmt_delta(a - b)
            } else {
                "-".into()
            }
        };
        line([
            String::new(),
            "p-d".into(),
            delta(p.ttfb50, d.ttfb50),
            delta(p.ttfb99, d.ttfb99),
            delta(p.gap50, d.gap50),
            delta(p.gap99, d.gap99),
            delta(p.gap_max, d.gap_max),
            String::new(),
        ]);
    }
}

// === request bodies ===

/// A conversation of about `tokens` tokens (cl100k, counted as the proxy counts messages):
/// a system message, then alternating user/assistant turns of English-like sentences
/// (seeded, so every run sends the same text), ending with a user turn. Returns the messages
/// and their token count.
///
/// The text keeps about 4 bytes per cl100k token (short function words and longer content
/// words, mixed to hold that ratio): the simulators count a prompt as bytes / 4, and the
/// proxy calibrates its estimates to what the provider reports, so with plain prose (~5.5
/// bytes a token) a 32k-token history would look like 44k tokens to it after the first reply.
fn conversation(tokens: usize, seed: u64) -> (Vec<Value>, u64) {
    const SHORT: &str = "the a of to and in is it that for on with as was be by this are \
         from at or an but not have has had they we you our its his her more when can \
         would what so if into than then some them other time only new after also first \
         many most all one two out up do did how who way may day old see now";
    const LONG: &str = "river bridge city market winter harbour engine garden letter \
         station village library council weather mountain journey history question answer \
         problem reason evidence pattern system network request response memory window \
         model token context summary careful quiet ancient modern narrow distant useful \
         strange simple complex early late rapid gentle bright heavy common built carried \
         crossed measured explained followed changed remember consider describe compare \
         improve notice travelled because although however therefore meanwhile perhaps \
         usually between through across during without against beneath";
    let short: Vec<&str> = SHORT.split_ascii_whitespace().collect();
    let long: Vec<&str> = LONG.split_ascii_whitespace().collect();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let counter = TokenCounter::new();
    let enc = Encoding::Cl100k;
    let mut msgs = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    let mut total = counter.count_messages(enc, &msgs);
    let (mut text_bytes, mut text_tokens) = (0u64, 0u64);
    // Share of long words, in 1/1000, steered towards 4 bytes per token.
    let mut long_share = 400u64;
    let mut turn = 0u64;
    while total < tokens as u64 || turn.is_multiple_of(2) {
        let role = if turn.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        // 40–400 words a turn, fewer near the end (about 1.3 tokens a word).
        let left = (tokens as u64).saturating_sub(total) * 3 / 4;
        let words = (40 + next() % 360).min(left.max(8));
        let mut text = String::new();
        let mut in_sentence = 0;
        for _ in 0..words {
            let w = if next() % 1000 < long_share {
                long[(next() % long.len() as u64) as usize]
            } else {
                short[(next() % short.len() as u64) as usize]
            };
            if in_sentence == 0 {
                if !text.is_empty() {
                    text.push(' ');
                }
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    text.extend(f.to_uppercase());
                    text.push_str(c.as_str());
                }
            } else {
                text.push(' ');
                text.push_str(w);
            }
            in_sentence += 1;
            if next().is_multiple_of(40) {
                let _ = write!(text, " {}", next() % 2000);
            }
            if in_sentence >= 6 && next().is_multiple_of(8) {
                text.push(match next() % 6 {
                    0 => '?',
                    1 => ',',
                    _ => '.',
                });
                if !text.ends_with(',') {
                    in_sentence = 0;
                }
            }
        }
        if !text.ends_with(['.', '?']) {
            text.push('.');
        }
        text_bytes += text.len() as u64;
        text_tokens += counter.count_text(enc, &text);
        if text_bytes > 4 * text_tokens {
            long_share = long_share.saturating_sub(50).max(50);
        } else {
            long_share = (long_share + 50).min(950);
        }
        let m = json!({"role": role, "content": text});
        total += counter.count_message(enc, &m);
        msgs.push(m);
        turn += 1;
    }
    (msgs, total)
}

/// The chat body of `api`, with `extra` merged at the top level.
fn chat_body(model: &str, messages: &[Value], stream: bool, extra: Value) -> Bytes {
    let mut v = json!({"model": model, "messages": messages, "stream": stream});
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    Bytes::from(v.to_string())
}

/// Paths and stream framing of an API shape: (pass-through GET, chat POST, stream framing).
fn api_paths(api: Api) -> (&'static str, &'static str, Expect) {
    match api {
        Api::Ollama => ("/api/version", "/api/chat", Expect::Ndjson),
        Api::Openai => ("/v1/models", "/v1/chat/completions", Expect::Sse),
    }
}

// === main flow ===

async fn run(args: Args) -> Res<()> {
    if args.fleet {
        return fleet::run(&args).await;
    }
    if let Some(n) = args.hold {
        return hold(&args, n).await;
    }
    let tck = clk_tck();
    let (mut procs, fast, paced) = match (&args.direct, &args.proxy) {
        (Some(d), Some(p)) => (
            None,
            Pair {
                direct: target(d, args.direct_pid)?,
                proxy: target(p, args.proxy_pid)?,
            },
            None,
        ),
        _ => {
            let (procs, f, s) = start_own(&args).await?;
            (Some(procs), f, s)
        }
    };
    let has_paced = paced.is_some();
    let mut pairs: Vec<Pair> = std::iter::once(fast).chain(paced).collect();
    // The provider behind the proxy: known when we started it, or from --direct-pid.
    let upstream_pid = |pair: &Pair| pair.direct.pid;

    let (get_path, chat_path, framing) = api_paths(args.api);
    let messages = if args.prompt_tokens > 0 {
        let (m, n) = conversation(args.prompt_tokens, 1);
        println!("prompt: {} messages, {n} tokens (cl100k)", m.len());
        m
    } else {
        vec![json!({"role": "user", "content": "Why is the sky blue?"})]
    };
    let wants_long = args.scenarios.iter().any(|s| s == "chat-32k");
    let long_body = if wants_long {
        let (m, n) = conversation(args.long_tokens, 32);
        let body = chat_body(
            &args.model,
            &m,
            false,
            json!({"options": {"num_ctx": args.long_num_ctx}}),
        );
        let text: usize = m
            .iter()
            .filter_map(|m| m["content"].as_str())
            .map(str::len)
            .sum();
        println!(
            "chat-32k: {} messages, {n} tokens (cl100k), {:.2} bytes of text per token, {} KB, \
             options.num_ctx {}",
            m.len(),
            text as f64 / n as f64,
            body.len() / 1024,
            args.long_num_ctx
        );
        body
    } else {
        Bytes::new()
    };
    let mut scenarios = Vec::new();
    for name in &args.scenarios {
        let (streaming, concs, pair_i) = match name.as_str() {
            "version" | "chat" => (false, &args.concurrency, 0),
            "stream" => (true, &args.stream_concurrency, 0),
            "stream-paced" => {
                if !has_paced {
                    continue;
                }
                (true, &args.stream_concurrency, 1)
            }
            "chat-32k" => (false, &vec![1], 0),
            other => return Err(format!("unknown scenario `{other}`")),
        };
        let pair = &pairs[pair_i];
        for &conc in concs {
            let spec = |t: &Target| {
                Arc::new(match name.as_str() {
                    "version" => ReqSpec::get(t, get_path),
                    "chat" => ReqSpec::post(
                        t,
                        chat_path,
                        chat_body(&args.model, &messages, false, json!({})),
                        Expect::Any,
                    ),
                    "chat-32k" => ReqSpec::post(t, "/api/chat", long_body.clone(), Expect::Any),
                    _ => ReqSpec::post(
                        t,
                        chat_path,
                        chat_body(&args.model, &messages, true, json!({})),
                        framing,
                    ),
                })
            };
            let budget = (name == "chat-32k" && args.count.is_none())
                .then_some((Budget::Count(args.long_count), Budget::Count(20)));
            scenarios.push(Scenario {
                name: format!("{name} c={conc}"),
                streaming,
                conc: conc.max(1),
                direct_spec: spec(&pair.direct),
                proxy_spec: spec(&pair.proxy),
                pair: pair_i,
                budget,
            });
        }
    }

    let budget = match args.count {
        Some(n) => Budget::Count(n),
        None => Budget::Time(Duration::from_secs_f64(args.duration)),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "loadgen: {} rounds × {} per run, alternating direct/proxy; {cores} CPU cores shared by \
         load generator, provider and proxy; CLK_TCK {tck}",
        args.rounds,
        match budget {
            Budget::Time(d) => format!("{:.1}s", d.as_secs_f64()),
            Budget::Count(n) => format!("{n} requests"),
        } + &if wants_long && args.count.is_none() {
            format!(" (chat-32k: {} requests)", args.long_count)
        } else {
            String::new()
        },
    );
    if args.api == Api::Openai {
        println!(
            "api: openai (version = GET /v1/models, chats = POST /v1/chat/completions, SSE streams)"
        );
    }
    if cores < 4 {
        println!(
            "note: only {cores} cores: at high concurrency all three processes compete for CPU, \
             so req/s and tail latency include that contention."
        );
    }

    let show = !args.no_progress;
    let progress = |b: Budget, prefix: String| match b {
        Budget::Time(d) => bar(
            show,
            d.as_millis() as u64,
            &format!(
                "{{prefix}} {{elapsed:>3}}/{:.0}s {{msg}} [{{wide_bar}}]",
                d.as_secs_f64()
            ),
            prefix,
        ),
        Budget::Count(n) => bar(show, n, "{prefix} {pos}/{len} {msg} [{wide_bar}]", prefix),
    };
    let mut rows = Vec::new();
    for sc in &scenarios {
        // The simulator keeps every request it served in memory: start each scenario with
        // a fresh one so that its growth does not skew the later scenarios.
        if sc.pair == 0 && args.restart_simulator {
            if let Some(procs) = procs.as_mut() {
                let pid = restart(procs, "simulator", &pairs[0].direct).await?;
                pairs[0].direct.pid = Some(pid);
            }
        }
        let pair = &pairs[sc.pair];
        let up = upstream_pid(pair);
        let (budget, warm) = match sc.budget {
            Some(b) => b,
            None => (budget, Budget::Time(Duration::from_secs_f64(args.warmup))),
        };
        if args.warmup > 0.0 {
            for (t, spec, label) in [
                (&pair.direct, &sc.direct_spec, "direct"),
                (&pair.proxy, &sc.proxy_spec, "proxy"),
            ] {
                let pb = progress(warm, format!("{} warm-up {label}", sc.name));
                run_once(t, None, spec, sc.conc, warm, tck, pb).await;
            }
        }
        let (mut d_runs, mut p_runs) = (Vec::new(), Vec::new());
        let rounds = args.rounds.max(1);
        for round in 0..rounds {
            // ABBA order: even rounds direct first, odd rounds proxy first.
            for proxy_side in [round % 2 == 1, round % 2 == 0] {
                let label = if proxy_side { "proxy" } else { "direct" };
                let pb = progress(
                    budget,
                    format!("{} round {}/{rounds} {label}", sc.name, round + 1),
                );
                let s = if proxy_side {
                    run_once(&pair.proxy, up, &sc.proxy_spec, sc.conc, budget, tck, pb).await
                } else {
                    run_once(
                        &pair.direct,
                        None,
                        &sc.direct_spec,
                        sc.conc,
                        budget,
                        tck,
                        pb,
                    )
                    .await
                };
                eprintln!(
                    "  {:<18} round {} {:<6} {:>8.0} req/s  p50 {:>8}  p99 {:>8}  errors {}",
                    sc.name,
                    round + 1,
                    label,
                    s.rps,
                    fmt_lat(s.p50),
                    fmt_lat(s.p99),
                    s.errors
                );
                if proxy_side {
                    p_runs.push(s);
                } else {
                    d_runs.push(s);
                }
            }
        }
        rows.push(Row {
            scenario: sc.name.clone(),
            direct: summarize(&d_runs),
            proxy: summarize(&p_runs),
            streaming: sc.streaming,
        });
    }

    println!();
    println!("medians over {} rounds:", args.rounds.max(1));
    print_table(&rows);
    print_streams(&rows);
    println!();
    println!(
        "columns: p50/p90/p99 = full response time; 1st = time to first body chunk (streams); \
         gap = time between consecutive body chunks of a stream; cpu µs = proxy CPU per \
         request; sim µs = provider CPU per request; lg µs = load generator CPU per request; \
         p/d = proxy/direct; p-d = proxy minus direct; * = a CPU figure of that run rests on \
         fewer than {FEW_TICKS} clock ticks (rough)."
    );

    // One-line summary.
    let find = |prefix: &str, conc: usize| {
        rows.iter()
            .find(|r| r.scenario == format!("{prefix} c={conc}"))
    };
    let mut parts = Vec::new();
    if let Some(r) = find("version", 1) {
        parts.push(format!(
            "GET c=1 {} p50",
            fmt_delta(r.proxy.p50 - r.direct.p50)
        ));
    }
    if let Some(r) = find("chat", 1) {
        parts.push(format!(
            "chat c=1 {} p50",
            fmt_delta(r.proxy.p50 - r.direct.p50)
        ));
    }
    if let Some(r) = find("chat-32k", 1) {
        parts.push(format!(
            "chat-32k {} p50 ({} errors)",
            fmt_delta(r.proxy.p50 - r.direct.p50),
            r.proxy.errors + r.direct.errors
        ));
    }
    let hi = args.concurrency.iter().copied().max().unwrap_or(1);
    if hi > 1 {
        for name in ["version", "chat"] {
            if let Some(r) = find(name, hi) {
                parts.push(format!(
                    "{name} c={hi} {:.0}% of direct req/s",
                    100.0 * r.proxy.rps / r.direct.rps
                ));
            }
        }
    }
    if let Some(r) = find("stream", 1) {
        parts.push(format!(
            "stream TTFB {} p50, gap {} p50",
            fmt_delta(r.proxy.ttfb50 - r.direct.ttfb50),
            fmt_delta(r.proxy.gap50 - r.direct.gap50)
        ));
    }
    let cpus: Vec<String> = rows
        .iter()
        .filter(|r| r.scenario.starts_with("version") || r.scenario.starts_with("chat"))
        .filter_map(|r| {
            r.proxy
                .cpu_target
                .map(|c| format!("{} {c:.0}", r.scenario.replace(' ', "@")))
        })
        .collect();
    if !cpus.is_empty() {
        parts.push(format!("proxy CPU µs/req: {}", cpus.join(", ")));
    }
    let errors: u64 = rows.iter().map(|r| r.direct.errors + r.proxy.errors).sum();
    parts.push(format!("{errors} errors"));
    println!("summary: {}", parts.join("; "));

    if let Some(procs) = &procs {
        for (name, c) in &procs.children {
            if let Some(mb) = rss_mb(c.id()) {
                println!("rss at end: {name} {mb:.1} MB");
            }
        }
    }
    drop(procs);
    Ok(())
}

// === hold mode: many open streams ===

/// Starts a slow simulator and a proxy in front of it; returns the proxy target and the
/// simulator's PID.
async fn start_hold(args: &Args) -> Res<(Procs, Target, u32)> {
    let (bin, mut procs) = own_setup(args)?;
    let (sim, prox, admin) = (free_port()?, free_port()?, free_port()?);
    let sim_pid = spawn(
        &mut procs,
        "simulator",
        &bin,
        &[
            "simulate",
            "ollama",
            "--listen",
            &format!("127.0.0.1:{sim}"),
            "--token-delay",
            &format!("{}ms", args.hold_token_delay),
            "--reply-tokens",
            &args.hold_reply_tokens.to_string(),
            "--load-latency",
            "0ms",
        ],
    )?;
    let mut toml = config_head(args, &procs, admin);
    let _ = write!(
        toml,
        "\n[[providers]]\nname = \"held\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:{prox}\"\nupstream = \"http://127.0.0.1:{sim}\"\n"
    );
    let cfg = procs.dir.join("config.toml");
    std::fs::write(&cfg, toml).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let cfg = cfg.to_string_lossy().into_owned();
    let proxy_pid = spawn(&mut procs, "proxy", &bin, &["serve", "--config", &cfg])?;
    let direct = target(&format!("http://127.0.0.1:{sim}"), Some(sim_pid))?;
    let proxy = target(&format!("http://127.0.0.1:{prox}"), Some(proxy_pid))?;
    wait_ready(&direct, &mut procs).await?;
    wait_ready(&proxy, &mut procs).await?;
    println!(
        "started {} (simulator pid {sim_pid}: {} ms × {} tokens per reply; proxy pid \
         {proxy_pid}); logs in {}",
        bin.display(),
        args.hold_token_delay,
        args.hold_reply_tokens,
        procs.dir.display()
    );
    Ok((procs, proxy, sim_pid))
}

/// Counters of the held streams.
#[derive(Default)]
struct HoldState {
    connected: AtomicU64,
    /// Streams that got their first chunk.
    first: AtomicU64,
    /// Streams that failed before their first chunk.
    failed_early: AtomicU64,
    /// Streams that ended (well or not) after their first chunk.
    ended: AtomicU64,
    errors: AtomicU64,
}

#[derive(Default)]
struct HoldOut {
    first_us: Option<u32>,
    gaps_us: Vec<u32>,
    error: Option<String>,
}

/// One held stream: connect (retrying), send, read to the end. The `open` permit is held
/// from connect to the response head, which bounds the connections the proxy has not
/// accepted and answered yet.
async fn hold_stream(
    addr: SocketAddr,
    spec: Arc<ReqSpec>,
    st: Arc<HoldState>,
    open: Arc<Semaphore>,
) -> HoldOut {
    let mut out = HoldOut::default();
    let permit = open.acquire_owned().await.ok();
    let mut conn = Err(String::new());
    for attempt in 0..6u32 {
        conn = Conn::open(addr).await;
        if conn.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
    let mut c = match conn {
        Ok(c) => c,
        Err(e) => {
            st.errors.fetch_add(1, Ordering::Relaxed);
            st.failed_early.fetch_add(1, Ordering::Relaxed);
            out.error = Some(e);
            return out;
        }
    };
    st.connected.fetch_add(1, Ordering::Relaxed);
    // A stream counts as open at its first body chunk after a 2xx head (an error
    // response's body is not a stream).
    let ok_head = std::sync::atomic::AtomicBool::new(false);
    let got_first = std::sync::atomic::AtomicBool::new(false);
    let r = c
        .once(
            &spec,
            &mut out.gaps_us,
            |ok| {
                ok_head.store(ok, Ordering::Relaxed);
                drop(permit);
            },
            || {
                if ok_head.load(Ordering::Relaxed) {
                    got_first.store(true, Ordering::Relaxed);
                    st.first.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .await;
    let (err, first) = match r {
        Ok(o) => {
            out.first_us = got_first.load(Ordering::Relaxed).then(|| us(o.first));
            (o.fail, got_first.load(Ordering::Relaxed))
        }
        Err(e) => (Some(e), got_first.load(Ordering::Relaxed)),
    };
    if err.is_some() {
        st.errors.fetch_add(1, Ordering::Relaxed);
    }
    if first {
        st.ended.fetch_add(1, Ordering::Relaxed);
    } else {
        st.failed_early.fetch_add(1, Ordering::Relaxed);
    }
    out.error = err;
    out
}

/// `s` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn omax(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn fmt_mb(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} MB"))
}

/// Opens `n` concurrent streams through the proxy and reports its memory (see the module doc).
async fn hold(args: &Args, n: usize) -> Res<()> {
    let (procs, proxy, sim_pid) = match &args.proxy {
        Some(p) => (None, target(p, args.proxy_pid)?, args.direct_pid),
        None => {
            let (procs, t, pid) = start_hold(args).await?;
            (Some(procs), t, Some(pid))
        }
    };
    let ppid = proxy.pid;
    let rss = |pid: Option<u32>| pid.and_then(rss_mb);
    let hwm = |pid: Option<u32>| pid.and_then(|p| status_mb(p, "VmHWM"));
    if procs.is_some() {
        // Let the freshly started proxy settle (its first poll of the provider).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let idle_before = (rss(ppid), hwm(ppid));
    let fds_before = ppid.and_then(fd_count);

    let (_, chat_path, framing) = api_paths(args.api);
    let messages = if args.prompt_tokens > 0 {
        conversation(args.prompt_tokens, 1).0
    } else {
        vec![json!({"role": "user", "content": "Tell me a long story."})]
    };
    // Warm-up: one stream of one token loads the model.
    let one = match args.api {
        Api::Ollama => json!({"options": {"num_predict": 1}}),
        Api::Openai => json!({"max_tokens": 1}),
    };
    let warm = ReqSpec::post(
        &proxy,
        chat_path,
        chat_body(&args.model, &messages, true, one),
        framing,
    );
    let o = Conn::open(proxy.addr)
        .await?
        .once(&warm, &mut Vec::new(), |_| {}, || {})
        .await?;
    if let Some(e) = o.fail {
        return Err(format!("warm-up stream through the proxy failed: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_warm = rss(ppid);

    let spec = Arc::new(ReqSpec::post(
        &proxy,
        chat_path,
        chat_body(&args.model, &messages, true, json!({})),
        framing,
    ));
    let st = Arc::new(HoldState::default());
    let open = Arc::new(Semaphore::new(args.hold_open_parallel.max(1)));
    println!(
        "hold: opening {n} streams through {} ({} at a time), each on its own connection",
        proxy.addr,
        args.hold_open_parallel.max(1)
    );
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(hold_stream(
                proxy.addr,
                spec.clone(),
                st.clone(),
                open.clone(),
            ))
        })
        .collect();
    let pb = bar(
        !args.no_progress,
        n as u64,
        "{prefix}: {pos}/{len} first chunks, {elapsed}, {msg} [{wide_bar}]",
        format!("hold {n}"),
    );
    let load = |o: &AtomicU64| o.load(Ordering::Relaxed);
    let msg = |st: &HoldState| {
        format!(
            "connected {}, ended {}, errors {}",
            load(&st.connected),
            load(&st.ended),
            load(&st.errors)
        )
    };
    let timeout = Duration::from_secs_f64(args.hold_timeout);
    let mut peak_rss_opening = None::<f64>;
    let mut iv = tokio::time::interval(Duration::from_millis(200));
    let mut last_log = Instant::now();
    loop {
        iv.tick().await;
        peak_rss_opening = omax(peak_rss_opening, rss(ppid));
        let settled = load(&st.first) + load(&st.failed_early);
        pb.set_position(load(&st.first));
        pb.set_message(msg(&st));
        if pb.is_hidden() && last_log.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {:>5.1}s: {} first chunks, {}",
                t0.elapsed().as_secs_f64(),
                load(&st.first),
                msg(&st)
            );
            last_log = Instant::now();
        }
        if settled >= n as u64 || t0.elapsed() > timeout {
            break;
        }
    }
    let open_time = t0.elapsed();
    let first_n = load(&st.first);
    // All streams that will be open are open: sample for a second.
    let open_at_sample = first_n - load(&st.ended);
    let mut peak_open = rss(ppid);
    let mut sim_open = rss(sim_pid);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak_open = omax(peak_open, rss(ppid));
        sim_open = omax(sim_open, rss(sim_pid));
    }
    let hwm_open = hwm(ppid);
    let fds_open = ppid.and_then(fd_count);
    let lg_open = rss_mb(std::process::id());
    let open_at_end = load(&st.first) - load(&st.ended);
    pb.finish_and_clear();
    eprintln!(
        "  all {first_n} streams have their first chunk after {:.1}s; sampled the proxy's RSS \
         while {open_at_sample}..{open_at_end} were open; waiting for the streams to end",
        open_time.as_secs_f64()
    );

    let pb = bar(
        !args.no_progress,
        n as u64,
        "{prefix}: {pos}/{len} ended, {elapsed}, {msg} [{wide_bar}]",
        format!("hold {n}"),
    );
    let (mut first_us, mut gaps_us, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut done = 0usize;
    for h in handles {
        let o = h.await.map_err(|e| format!("stream task: {e}"))?;
        done += 1;
        if done.is_multiple_of(256) {
            pb.set_position(load(&st.ended) + load(&st.failed_early));
            pb.set_message(msg(&st));
        }
        first_us.extend(o.first_us);
        gaps_us.extend_from_slice(&o.gaps_us);
        if let Some(e) = o.error {
            errors.push(e);
        }
    }
    let total_time = t0.elapsed();
    pb.finish_and_clear();
    // Let the proxy drop what the streams held, then look at it idle again.
    tokio::time::sleep(Duration::from_secs_f64(args.hold_settle)).await;
    let after = (rss(ppid), hwm(ppid));
    let fds_after = ppid.and_then(fd_count);
    let sim_after = rss(sim_pid);
    first_us.sort_unstable();
    gaps_us.sort_unstable();

    println!();
    println!(
        "hold {n} streams ({}):",
        match args.api {
            Api::Ollama => "Ollama /api/chat, NDJSON",
            Api::Openai => "OpenAI /v1/chat/completions, SSE",
        }
    );
    println!(
        "  first chunk: {first_n} of {n} streams, all within {:.1}s of the first connect \
         (time to open all)",
        open_time.as_secs_f64()
    );
    println!(
        "  open while sampling: {open_at_sample} at the start of the sample, {open_at_end} \
         at its end"
    );
    println!(
        "  errors: {} (streams failed before their first chunk: {})",
        errors.len(),
        load(&st.failed_early)
    );
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for e in &errors {
        if let Some((_, c)) = kinds.iter_mut().find(|(k, _)| k == e) {
            *c += 1;
        } else if kinds.len() < 5 {
            kinds.push((e.clone(), 1));
        }
    }
    for (k, c) in kinds {
        println!("    {c} × {k}");
    }
    println!(
        "  proxy RSS: idle before {} (VmHWM {}), after one warm-up stream {}, peak while \
         opening {}, while all open {} (VmHWM {}), {:.0}s after the streams ended {} (VmHWM {})",
        fmt_mb(idle_before.0),
        fmt_mb(idle_before.1),
        fmt_mb(idle_warm),
        fmt_mb(peak_rss_opening),
        fmt_mb(peak_open),
        fmt_mb(hwm_open),
        args.hold_settle,
        fmt_mb(after.0),
        fmt_mb(after.1)
    );
    let fds = |n: Option<usize>| n.map_or_else(|| "-".into(), |n| n.to_string());
    println!(
        "  proxy descriptors: idle before {}, while all open {}, after {}",
        fds(fds_before),
        fds(fds_open),
        fds(fds_after)
    );
    println!(
        "  simulator RSS: while open {}, after {}; load generator RSS while open {}",
        fmt_mb(sim_open),
        fmt_mb(sim_after),
        fmt_mb(lg_open)
    );
    println!(
        "  time to first chunk p50 {} p99 {} max {}; chunk gaps p50 {} p99 {} max {}; all \
         ended after {:.1}s",
        fmt_lat(pct(&first_us, 0.5)),
        fmt_lat(pct(&first_us, 0.99)),
        fmt_lat(pct(&first_us, 1.0)),
        fmt_lat(pct(&gaps_us, 0.5)),
        fmt_lat(pct(&gaps_us, 0.99)),
        fmt_lat(pct(&gaps_us, 1.0)),
        total_time.as_secs_f64()
    );
    let yes = |b: bool| if b { "met" } else { "MISSED" };
    if let (Some(open_mb), Some(idle_mb)) = (omax(peak_open, hwm_open), idle_before.0) {
        println!(
            "  targets: {n} open streams with proxy RSS ≤ 256 MB: {} ({open_mb:.1} MB, {} \
             errors); idle RSS ≤ 40 MB: {} ({idle_mb:.1} MB)",
            yes(open_mb <= 256.0 && errors.is_empty() && first_n == n as u64),
            errors.len(),
            yes(idle_mb <= 40.0)
        );
    }
    if let (false, Some(p)) = (errors.is_empty(), &procs) {
        let log = std::fs::read_to_string(p.dir.join("proxy.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        println!("  the proxy's log ends with:");
        for l in &lines[lines.len().saturating_sub(5)..] {
            println!("    {}", strip_ansi(l));
        }
    }
    drop(procs);
    if errors.is_empty() && first_n == n as u64 {
        Ok(())
    } else {
        Err(format!(
            "{} of {n} streams failed or got no first chunk",
            errors.len().max(n - first_n as usize)
        ))
    }
}
