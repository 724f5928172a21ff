//! Run with: `cargo run --release --example loadgen -- ...` (after `cargo build --release`).
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
//! - `stream`: streamed `POST /api/chat` (NDJSON), one at a time: time to first body chunk
//!   and total time;
//! - `stream-paced`: the same against a simulator with a per-token delay (own processes only).
//!
//! CPU time comes from `/proc/<pid>/stat` (utime + stime, in clock ticks) read before and
//! after each run, divided by the requests of that run. See `benches/README.md`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;

#[derive(Parser, Debug)]
#[command(about = "Proxy overhead benchmark: direct vs through llm-warden, alternating")]
struct Args {
    /// The llm-warden binary (default: <crate>/target/release/llm-warden).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Measure an already running provider at this URL (needs --proxy).
    #[arg(long, requires = "proxy")]
    direct: Option<String>,
    /// Measure an already running proxy at this URL, in front of --direct.
    #[arg(long, requires = "direct")]
    proxy: Option<String>,
    /// PID of the external proxy, for its CPU time.
    #[arg(long, requires = "proxy")]
    proxy_pid: Option<u32>,
    /// PID of the external provider, for its CPU time.
    #[arg(long, requires = "direct")]
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
    /// Scenarios to run (version, chat, stream, stream-paced).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "version,chat,stream,stream-paced"
    )]
    scenarios: Vec<String>,
    /// Model name sent in chat requests.
    #[arg(long, default_value = "llama3.2")]
    model: String,
    /// Restart the (own) simulator before each scenario; it keeps every request in memory.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    restart_simulator: bool,
    /// Load generator worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
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
            if let Ok(r) = conn.once(&spec).await {
                if r.ok {
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

/// Starts two simulators and a proxy in front of both; returns (fast pair, paced pair).
async fn start_own(args: &Args) -> Res<(Procs, Pair, Option<Pair>)> {
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/llm-warden"),
    };
    if !bin.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first, or pass --bin PATH",
            bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("llm-warden-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut procs = Procs {
        children: Vec::new(),
        cmds: Vec::new(),
        dir,
    };
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
    let mut toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[providers]]\nname = \"fast\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:{prox1}\"\nupstream = \"http://127.0.0.1:{sim1}\"\n"
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

fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

// === HTTP client ===

/// What one request looks like; cloned cheaply per request (`Bytes`, `Uri` share storage).
struct ReqSpec {
    method: Method,
    uri: Uri,
    host: HeaderValue,
    body: Bytes,
}

impl ReqSpec {
    fn get(t: &Target, path: &str) -> ReqSpec {
        ReqSpec {
            method: Method::GET,
            uri: format!("{}{path}", t.prefix).parse().expect("path"),
            host: t.host.clone(),
            body: Bytes::new(),
        }
    }

    fn post(t: &Target, path: &str, body: String) -> ReqSpec {
        ReqSpec {
            method: Method::POST,
            body: Bytes::from(body),
            ..ReqSpec::get(t, path)
        }
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

/// One keep-alive HTTP/1.1 connection, owned by one worker.
struct Conn {
    tx: SendRequest<Full<Bytes>>,
}

/// What one request took.
struct Outcome {
    ok: bool,
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

    async fn once(&mut self, spec: &ReqSpec) -> Res<Outcome> {
        let req = spec.build();
        self.tx.ready().await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let resp = self.tx.send_request(req).await.map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        let mut body = resp.into_body();
        let mut first = None;
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Some(d) = frame.data_ref() {
                if !d.is_empty() {
                    if first.is_none() {
                        first = Some(t0.elapsed());
                    }
                    bytes += d.len() as u64;
                }
            }
        }
        let total = t0.elapsed();
        Ok(Outcome {
            ok,
            first: first.unwrap_or(total),
            total,
            bytes,
        })
    }
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
    ok: u64,
    errors: u64,
    bytes: u64,
    last_error: Option<String>,
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
                        out.errors += 1;
                        out.last_error = Some(e.clone());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
        };
        match c.once(&spec).await {
            Ok(o) if o.ok => {
                out.ok += 1;
                out.bytes += o.bytes;
                out.total_us.push(us(o.total));
                out.first_us.push(us(o.first));
            }
            Ok(_) => {
                out.errors += 1;
                out.last_error = Some("non-2xx status".into());
            }
            Err(e) => {
                out.errors += 1;
                out.last_error = Some(e);
                conn = Err(String::new());
            }
        }
    }
    out
}

/// Runs `conc` workers against `t` and measures.
async fn run_once(
    t: &Target,
    upstream_pid: Option<u32>,
    spec: &Arc<ReqSpec>,
    conc: usize,
    budget: Budget,
    tck: f64,
) -> RunStats {
    let start = Arc::new(Barrier::new(conc + 1));
    let issued = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..conc)
        .map(|_| {
            tokio::spawn(worker(
                t.addr,
                spec.clone(),
                budget,
                issued.clone(),
                start.clone(),
            ))
        })
        .collect();
    // Every worker has connected once the barrier opens; measure from here.
    let read = |pid: Option<u32>| pid.and_then(cpu_ticks);
    let (c0, u0, l0) = (read(t.pid), read(upstream_pid), self_ticks());
    start.wait().await;
    let t0 = Instant::now();
    let mut all = WorkerOut::default();
    for h in handles {
        let w = h.await.expect("worker panicked");
        all.total_us.extend_from_slice(&w.total_us);
        all.first_us.extend_from_slice(&w.first_us);
        all.ok += w.ok;
        all.errors += w.errors;
        all.bytes += w.bytes;
        if w.last_error.is_some() {
            all.last_error = w.last_error;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (c1, u1, l1) = (read(t.pid), read(upstream_pid), self_ticks());
    if let Some(e) = &all.last_error {
        eprintln!(
            "  warning: {} errors against {} (last: {e})",
            all.errors, t.addr
        );
    }
    all.total_us.sort_unstable();
    all.first_us.sort_unstable();
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

async fn run(args: Args) -> Res<()> {
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

    let chat_body = |stream: bool| {
        format!(
            r#"{{"model":{},"messages":[{{"role":"user","content":"Why is the sky blue?"}}],"stream":{stream}}}"#,
            serde_json::Value::String(args.model.clone())
        )
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
            other => return Err(format!("unknown scenario `{other}`")),
        };
        let pair = &pairs[pair_i];
        for &conc in concs {
            let spec = |t: &Target| {
                Arc::new(match name.as_str() {
                    "version" => ReqSpec::get(t, "/api/version"),
                    "chat" => ReqSpec::post(t, "/api/chat", chat_body(false)),
                    _ => ReqSpec::post(t, "/api/chat", chat_body(true)),
                })
            };
            scenarios.push(Scenario {
                name: format!("{name} c={conc}"),
                streaming,
                conc: conc.max(1),
                direct_spec: spec(&pair.direct),
                proxy_spec: spec(&pair.proxy),
                pair: pair_i,
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
        },
    );
    if cores < 4 {
        println!(
            "note: only {cores} cores: at high concurrency all three processes compete for CPU, \
             so req/s and tail latency include that contention."
        );
    }

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
        if args.warmup > 0.0 {
            let w = Budget::Time(Duration::from_secs_f64(args.warmup));
            run_once(&pair.direct, None, &sc.direct_spec, sc.conc, w, tck).await;
            run_once(&pair.proxy, None, &sc.proxy_spec, sc.conc, w, tck).await;
        }
        let (mut d_runs, mut p_runs) = (Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            // ABBA order: even rounds direct first, odd rounds proxy first.
            for proxy_side in [round % 2 == 1, round % 2 == 0] {
                let s = if proxy_side {
                    run_once(&pair.proxy, up, &sc.proxy_spec, sc.conc, budget, tck).await
                } else {
                    run_once(&pair.direct, None, &sc.direct_spec, sc.conc, budget, tck).await
                };
                eprintln!(
                    "  {:<18} round {} {:<6} {:>8.0} req/s  p50 {:>8}  p99 {:>8}",
                    sc.name,
                    round + 1,
                    if proxy_side { "proxy" } else { "direct" },
                    s.rps,
                    fmt_lat(s.p50),
                    fmt_lat(s.p99)
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
    println!();
    println!(
        "columns: p50/p90/p99 = full response time; 1st = time to first body chunk (streams); \
         cpu µs = proxy CPU per request; sim µs = provider CPU per request; lg µs = load \
         generator CPU per request; p/d = proxy/direct; * = a CPU figure of that run rests on \
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
            "stream TTFB {} p50",
            fmt_delta(r.proxy.ttfb50 - r.direct.ttfb50)
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
