//! Fleet mode (`loadgen --fleet`, issue 21 §5): many hosts, one address.
//!
//! N simulated hosts, each an Ollama simulator (`llm-warden simulate ollama`, a realistic
//! `--load-latency`, room for every model so that only the node decides what is resident)
//! with a node in front of it (`llm-warden serve`, `[limits] max_models_loaded` slots);
//! M models with Zipf popularity; C clients sending non-streamed `POST /api/chat` in a
//! closed loop. Three strategies, one phase each, each on freshly started hosts:
//!
//! - `picker`: the clients send to a front (`llm-warden serve` with a `[[pools]]` config
//!   over the N nodes), which picks the node per request;
//! - `round-robin`: the benchmark itself sends each request straight to a node's provider
//!   listener, the next node each time (what a plain load balancer does);
//! - `least-request`: straight to the node with the fewest requests this benchmark has in
//!   flight to it (ties: round-robin).
//!
//! A phase runs `--fleet-warmup` seconds unmeasured, then `--fleet-duration` seconds
//! measured: requests started in that window count (latency, errors), and the loads are
//! the nodes' own counts (`/status`: the `loads` of every model, which the node's lifecycle
//! makes; the simulators are never asked to evict by themselves) read when the window opens
//! and once its last request has ended. Duplicate residency: every node's `/node` view is
//! read every `--fleet-sample-ms`; a sample counts the models ready or loading on two hosts
//! or more at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;

use super::*;

#[derive(clap::Args, Debug)]
pub(crate) struct FleetArgs {
    /// Fleet: simulated hosts (a simulator and a node each).
    #[arg(long, default_value_t = 3)]
    fleet_hosts: usize,
    /// Fleet: models each node keeps loaded at once (its `max_models_loaded`).
    #[arg(long, default_value_t = 2)]
    fleet_slots: u32,
    /// Fleet: models (m0 .. m{M-1}, m0 the most popular).
    #[arg(long, default_value_t = 8)]
    fleet_models: usize,
    /// Fleet: size of each model as the simulator reports it (MiB).
    #[arg(long, default_value_t = 512)]
    fleet_model_mb: u64,
    /// Fleet: Zipf exponent of the models' popularity (model k drawn ∝ 1/(k+1)^s).
    #[arg(long, default_value_t = 1.0)]
    fleet_zipf: f64,
    /// Fleet: clients, each sending one request at a time (closed loop).
    #[arg(long, default_value_t = 32)]
    fleet_clients: usize,
    /// Fleet: measured seconds per strategy.
    #[arg(long, default_value_t = 20.0)]
    fleet_duration: f64,
    /// Fleet: unmeasured seconds before each measured window (the cold loads).
    #[arg(long, default_value_t = 5.0)]
    fleet_warmup: f64,
    /// Fleet: the simulators' cold-load latency (ms).
    #[arg(long, default_value_t = 1000)]
    fleet_load_latency: u64,
    /// Fleet: the simulators' delay per generated token (ms; 8 tokens a reply).
    #[arg(long, default_value_t = 10)]
    fleet_token_delay: u64,
    /// Fleet: the front's poll interval of the nodes' views (ms).
    #[arg(long, default_value_t = 250)]
    fleet_poll: u64,
    /// Fleet: how often every node's `/node` view is sampled for duplicate residency (ms).
    #[arg(long, default_value_t = 250)]
    fleet_sample: u64,
    /// Fleet: strategies to run, in this order (picker, round-robin, least-request).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "picker,round-robin,least-request"
    )]
    fleet_strategies: Vec<String>,
    /// Fleet: seed of the clients' model draws (the same sequence for every strategy).
    #[arg(long, default_value_t = 1)]
    fleet_seed: u64,
    /// Fleet: write every node's `/status` (its lifecycle events: loads, evictions) and the
    /// front's at the end of each phase into this directory (`<strategy>-node-<i>.json`,
    /// `picker-front.json`), to see why the loads happened.
    #[arg(long)]
    fleet_dump: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Picker,
    RoundRobin,
    LeastRequest,
}

impl Strategy {
    fn parse(s: &str) -> Res<Strategy> {
        match s {
            "picker" => Ok(Strategy::Picker),
            "round-robin" | "rr" => Ok(Strategy::RoundRobin),
            "least-request" | "lr" => Ok(Strategy::LeastRequest),
            other => Err(format!(
                "unknown strategy `{other}` (picker, round-robin, least-request)"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Strategy::Picker => "picker",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastRequest => "least-request",
        }
    }
}

/// One host's ports.
struct Host {
    sim: u16,
    /// The node's provider listener.
    node: u16,
    admin: u16,
}

/// What one phase measured.
#[derive(Default)]
struct PhaseStats {
    requests: u64,
    errors: u64,
    last_error: Option<String>,
    p50: f64,
    p99: f64,
    rps: f64,
    /// Loads the nodes made in the measured window, per node.
    loads: Vec<u64>,
    /// Loads during the warm-up (cold starts included), all nodes.
    warmup_loads: u64,
    /// Models ready or loading on ≥ 2 hosts, per sample.
    dup: Vec<u32>,
    /// Requests each node's provider listener got (from the nodes' `/status`), measured
    /// window only.
    served: Vec<u64>,
    /// Picker only: the front's `routed_by_reason` per node, the whole phase.
    routed: Vec<BTreeMap<String, u64>>,
    retries: u64,
}

impl PhaseStats {
    fn total_loads(&self) -> u64 {
        self.loads.iter().sum()
    }
    fn dup_mean(&self) -> f64 {
        if self.dup.is_empty() {
            return f64::NAN;
        }
        self.dup.iter().map(|&d| d as f64).sum::<f64>() / self.dup.len() as f64
    }
    fn dup_max(&self) -> u32 {
        self.dup.iter().copied().max().unwrap_or(0)
    }
}

pub(crate) async fn run(args: &Args) -> Res<()> {
    let f = &args.fleet_args;
    if f.fleet_hosts == 0 || f.fleet_models == 0 || f.fleet_clients == 0 {
        return Err("--fleet-hosts, --fleet-models and --fleet-clients must be > 0".into());
    }
    let strategies: Vec<Strategy> = f
        .fleet_strategies
        .iter()
        .map(|s| Strategy::parse(s))
        .collect::<Res<_>>()?;
    // Its Drop removes the temp directory (the phases' logs are in subdirectories).
    let (bin, base) = own_setup(args)?;
    println!(
        "fleet: {} hosts x {} slots, {} models ({} MiB each, Zipf s={}), {} clients, \
         load {} ms, {} ms/token; {} s warm-up + {} s measured per strategy; logs in {}",
        f.fleet_hosts,
        f.fleet_slots,
        f.fleet_models,
        f.fleet_model_mb,
        f.fleet_zipf,
        f.fleet_clients,
        f.fleet_load_latency,
        f.fleet_token_delay,
        f.fleet_warmup,
        f.fleet_duration,
        base.dir.display()
    );
    let weights = zipf(f.fleet_models, f.fleet_zipf);
    let total_w: f64 = weights.iter().sum();
    println!(
        "popularity: {}",
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("m{i} {:.1}%", w / total_w * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut results = Vec::new();
    for &s in &strategies {
        let dir = base.dir.join(s.name());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut procs = Procs {
            children: Vec::new(),
            cmds: Vec::new(),
            dir,
        };
        let r = phase(args, &bin, &mut procs, s, &weights).await;
        match r {
            Ok(st) => {
                println!(
                    "{}: {} requests, {} loads ({} in the warm-up), p99 {}, {} errors",
                    s.name(),
                    st.requests,
                    st.total_loads(),
                    st.warmup_loads,
                    fmt_lat(st.p99),
                    st.errors
                );
                if let Some(e) = &st.last_error {
                    eprintln!("  warning: {} errors (last: {e})", st.errors);
                }
                results.push((s, st));
            }
            Err(e) => {
                print_logs(&mut procs);
                return Err(format!("{}: {e}", s.name()));
            }
        }
        // `procs` drops here: every process of the phase is killed before the next starts.
    }
    print_fleet(f, &results);
    Ok(())
}

/// Model k's weight: 1 / (k+1)^s.
fn zipf(m: usize, s: f64) -> Vec<f64> {
    (0..m).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect()
}

/// SplitMix64: a small, seeded generator (the same draws for every strategy).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An index drawn from the cumulative weights `cdf` (its last entry the total).
    fn draw(&mut self, cdf: &[f64]) -> usize {
        let total = cdf.last().copied().unwrap_or(0.0);
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
        cdf.iter()
            .position(|&c| u < c)
            .unwrap_or(cdf.len().saturating_sub(1))
    }
}

/// The last lines of every log of a failed phase.
fn print_logs(procs: &mut Procs) {
    for (name, c) in &mut procs.children {
        if let Ok(Some(st)) = c.try_wait() {
            eprintln!("{name} exited: {st}");
        }
    }
    let Ok(rd) = std::fs::read_dir(&procs.dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last lines)", p.display());
            for l in &lines[lines.len().saturating_sub(10)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Starts the hosts (and the front for the picker): returns the hosts, and the front's
/// (pool listener, admin) ports.
async fn start_phase(
    args: &Args,
    bin: &Path,
    procs: &mut Procs,
    with_front: bool,
) -> Res<(Vec<Host>, Option<(u16, u16)>)> {
    let f = &args.fleet_args;
    let models: Vec<String> = (0..f.fleet_models)
        .map(|k| format!("m{k}@{}", f.fleet_model_mb))
        .collect();
    let models = models.join(",");
    let mut hosts = Vec::new();
    for i in 0..f.fleet_hosts {
        let h = Host {
            sim: free_port()?,
            node: free_port()?,
            admin: free_port()?,
        };
        spawn(
            procs,
            leak(format!("sim-{i}")),
            bin,
            &[
                "simulate",
                "ollama",
                "--listen",
                &format!("127.0.0.1:{}", h.sim),
                "--models",
                &models,
                "--max-loaded",
                &(f.fleet_models + 1).to_string(),
                "--load-latency",
                &format!("{}ms", f.fleet_load_latency),
                "--token-delay",
                &format!("{}ms", f.fleet_token_delay),
            ],
        )?;
        let cache = Value::String(
            procs
                .dir
                .join(format!("cache-{i}"))
                .to_string_lossy()
                .into_owned(),
        );
        let toml = format!(
            "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[limits]\nmax_models_loaded = {}\n\n\
             [compaction]\ncache_dir = {cache}\n\n[[providers]]\nname = \"sim\"\n\
             kind = \"ollama\"\nlisten = \"127.0.0.1:{}\"\nupstream = \"http://127.0.0.1:{}\"\n",
            h.admin, f.fleet_slots, h.node, h.sim
        );
        let cfg = procs.dir.join(format!("node-{i}.toml"));
        std::fs::write(&cfg, toml).map_err(|e| format!("{}: {e}", cfg.display()))?;
        spawn(
            procs,
            leak(format!("node-{i}")),
            bin,
            &["serve", "--config", &cfg.to_string_lossy()],
        )?;
        hosts.push(h);
    }
    for h in &hosts {
        wait_ready(&url_target(h.sim)?, procs).await?;
        wait_ready(&url_target(h.node)?, procs).await?;
        wait_json(procs, h.admin, "/node", |v| {
            v["providers"][0]["reachable"] == true
        })
        .await?;
    }
    if !with_front {
        return Ok((hosts, None));
    }
    let (listen, admin) = (free_port()?, free_port()?);
    let nodes: Vec<String> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                "{{ name = \"h{i}\", url = \"http://127.0.0.1:{}\", admin = \"http://127.0.0.1:{}\" }}",
                h.node, h.admin
            )
        })
        .collect();
    let cache = Value::String(procs.dir.join("cache-front").to_string_lossy().into_owned());
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[compaction]\ncache_dir = {cache}\n\n\
         [[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:{listen}\"\n\
         poll_interval = \"{}ms\"\nnodes = [\n  {}\n]\n",
        f.fleet_poll,
        nodes.join(",\n  ")
    );
    let cfg = procs.dir.join("front.toml");
    std::fs::write(&cfg, toml).map_err(|e| format!("{}: {e}", cfg.display()))?;
    spawn(
        procs,
        "front",
        bin,
        &["serve", "--config", &cfg.to_string_lossy()],
    )?;
    let n = hosts.len() as u64;
    wait_json(procs, admin, "/status", |v| {
        v["pools"][0]["nodes_up"].as_u64() == Some(n)
    })
    .await?;
    wait_ready(&url_target(listen)?, procs).await?;
    Ok((hosts, Some((listen, admin))))
}

fn url_target(port: u16) -> Res<Target> {
    target(&format!("http://127.0.0.1:{port}"), None)
}

/// `GET path` on 127.0.0.1:`port`, parsed as JSON (a new connection each time).
async fn get_json(port: u16, path: &str) -> Res<Value> {
    let t = url_target(port)?;
    let mut conn = Conn::open(t.addr).await?;
    get_json_on(&mut conn, &t, path).await
}

async fn get_json_on(conn: &mut Conn, t: &Target, path: &str) -> Res<Value> {
    let req = ReqSpec::get(t, path).build();
    conn.tx.ready().await.map_err(|e| e.to_string())?;
    let resp = conn.tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("GET {path}: status {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))
}

/// Waits until `GET path` on the admin `port` answers JSON that satisfies `ok`.
async fn wait_json(
    procs: &mut Procs,
    port: u16,
    path: &str,
    ok: impl Fn(&Value) -> bool,
) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (name, c) in &mut procs.children {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!("{name} exited ({st})"));
            }
        }
        if let Ok(v) = get_json(port, path).await {
            if ok(&v) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("127.0.0.1:{port}{path} not as expected within 20s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node's `/status` counters: (loads, requests) over its models.
async fn node_counts(admin: u16) -> Res<(u64, u64)> {
    let v = get_json(admin, "/status").await?;
    let models = v["models"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| models.iter().filter_map(|m| m[k].as_u64()).sum::<u64>();
    Ok((sum("loads"), sum("total_requests")))
}

async fn all_counts(hosts: &[Host]) -> Res<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for h in hosts {
        out.push(node_counts(h.admin).await?);
    }
    Ok(out)
}

/// The models ready or loading in a node view (`:latest` dropped).
fn resident(view: &Value) -> Vec<String> {
    view["providers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["models"].as_array().into_iter().flatten())
        .filter(|m| m["state"] == "ready" || m["state"] == "loading")
        .filter_map(|m| m["model"].as_str())
        .map(|m| m.strip_suffix(":latest").unwrap_or(m).to_string())
        .collect()
}

/// Shared between the clients of one phase.
struct Shared {
    strategy: Strategy,
    targets: Vec<Target>,
    bodies: Vec<Vec<Bytes>>,
    cdf: Vec<f64>,
    rr: AtomicU64,
    in_flight: Vec<AtomicU64>,
    live: Live,
    measure_from: Instant,
    end: Instant,
}

#[derive(Default)]
struct ClientOut {
    lat_us: Vec<u32>,
    ok: u64,
    errors: u64,
    last_error: Option<String>,
}

/// One closed-loop client.
async fn client(sh: Arc<Shared>, id: usize, seed: u64) -> ClientOut {
    let mut out = ClientOut::default();
    let mut rng = Rng(seed ^ (id as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut conns: Vec<Option<Conn>> = sh.targets.iter().map(|_| None).collect();
    let n = sh.targets.len();
    let mut k = 0usize;
    while Instant::now() < sh.end {
        let model = rng.draw(&sh.cdf);
        let t = match sh.strategy {
            Strategy::Picker => 0,
            Strategy::RoundRobin => (sh.rr.fetch_add(1, Ordering::Relaxed) as usize) % n,
            Strategy::LeastRequest => {
                let start = (sh.rr.fetch_add(1, Ordering::Relaxed) as usize) % n;
                (0..n)
                    .map(|j| (start + j) % n)
                    .min_by_key(|&j| sh.in_flight[j].load(Ordering::Relaxed))
                    .unwrap_or(0)
            }
        };
        let body = sh.bodies[model][k % sh.bodies[model].len()].clone();
        k += 1;
        sh.in_flight[t].fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = send(&mut conns[t], &sh.targets[t], body).await;
        let took = t0.elapsed();
        sh.in_flight[t].fetch_sub(1, Ordering::Relaxed);
        let counted = t0 >= sh.measure_from;
        match r {
            Ok(()) => {
                sh.live.ok.fetch_add(1, Ordering::Relaxed);
                if counted {
                    out.ok += 1;
                    out.lat_us.push(us(took));
                }
            }
            Err(e) => {
                sh.live.errors.fetch_add(1, Ordering::Relaxed);
                conns[t] = None;
                if counted {
                    out.errors += 1;
                    out.last_error = Some(e);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    out
}

/// Sends one chat on `conn` (opened on first use) and reads the answer.
async fn send(conn: &mut Option<Conn>, t: &Target, body: Bytes) -> Res<()> {
    if conn.is_none() {
        *conn = Some(Conn::open(t.addr).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let spec = ReqSpec::post(t, "/api/chat", body, Expect::Any);
    let o = c.once(&spec, &mut Vec::new(), |_| {}, || {}).await?;
    match o.fail {
        None => Ok(()),
        Some(e) => Err(format!("{}: {e}", t.addr)),
    }
}

/// One strategy on fresh hosts.
async fn phase(
    args: &Args,
    bin: &Path,
    procs: &mut Procs,
    strategy: Strategy,
    weights: &[f64],
) -> Res<PhaseStats> {
    let f = &args.fleet_args;
    let (hosts, front) = start_phase(args, bin, procs, strategy == Strategy::Picker).await?;
    let targets: Vec<Target> = match front {
        Some((listen, _)) => vec![url_target(listen)?],
        None => hosts
            .iter()
            .map(|h| url_target(h.node))
            .collect::<Res<_>>()?,
    };
    // A few distinct conversations per model (the front's affinity key is the
    // conversation's first messages: distinct ones spread its ties as real users would).
    let bodies: Vec<Vec<Bytes>> = (0..f.fleet_models)
        .map(|m| {
            (0..16)
                .map(|c| {
                    let msg = vec![json!({"role": "user",
                        "content": format!("Conversation {c}: why is the sky blue?")})];
                    chat_body(&format!("m{m}"), &msg, false, json!({}))
                })
                .collect()
        })
        .collect();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in weights {
        acc += w;
        cdf.push(acc);
    }
    let warmup = Duration::from_secs_f64(f.fleet_warmup.max(0.0));
    let measured = Duration::from_secs_f64(f.fleet_duration.max(0.1));
    let t0 = Instant::now();
    let sh = Arc::new(Shared {
        strategy,
        in_flight: targets.iter().map(|_| AtomicU64::new(0)).collect(),
        targets,
        bodies,
        cdf,
        rr: AtomicU64::new(0),
        live: Live::default(),
        measure_from: t0 + warmup,
        end: t0 + warmup + measured,
    });
    let clients: Vec<_> = (0..f.fleet_clients)
        .map(|i| tokio::spawn(client(sh.clone(), i, f.fleet_seed)))
        .collect();

    let total_ms = (warmup + measured).as_millis() as u64;
    let pb = bar(
        !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        total_ms,
        "{prefix:>14} [{bar:30}] {elapsed:>4} {msg}",
        strategy.name().to_string(),
    );
    let tick = (!pb.is_hidden()).then(|| {
        let (pb, sh) = (pb.clone(), sh.clone());
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(200));
            loop {
                iv.tick().await;
                let el = t0.elapsed();
                pb.set_position(el.as_millis() as u64);
                let ok = sh.live.ok.load(Ordering::Relaxed);
                let errors = sh.live.errors.load(Ordering::Relaxed);
                let what = if Instant::now() < sh.measure_from {
                    "warm-up"
                } else {
                    "measuring"
                };
                pb.set_message(format!(
                    "{what}, {:.0} req/s, {errors} errors",
                    ok as f64 / el.as_secs_f64().max(1e-3)
                ));
            }
        })
    });

    let before_warmup = all_counts(&hosts).await?;
    tokio::time::sleep_until(sh.measure_from.into()).await;
    let before = all_counts(&hosts).await?;
    // Duplicate residency, sampled over the measured window.
    let stop = Arc::new(AtomicBool::new(false));
    let admins: Vec<u16> = hosts.iter().map(|h| h.admin).collect();
    let sampler = {
        let stop = stop.clone();
        let every = Duration::from_millis(f.fleet_sample.max(10));
        tokio::spawn(async move {
            let mut conns: Vec<Option<Conn>> = admins.iter().map(|_| None).collect();
            let mut dup = Vec::new();
            let mut iv = tokio::time::interval(every);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                iv.tick().await;
                let mut on: HashMap<String, u32> = HashMap::new();
                let mut complete = true;
                for (i, &port) in admins.iter().enumerate() {
                    let Ok(t) = url_target(port) else {
                        complete = false;
                        continue;
                    };
                    if conns[i].is_none() {
                        conns[i] = Conn::open(t.addr).await.ok();
                    }
                    let Some(c) = conns[i].as_mut() else {
                        complete = false;
                        continue;
                    };
                    match get_json_on(c, &t, "/node").await {
                        Ok(v) => {
                            for m in resident(&v) {
                                *on.entry(m).or_default() += 1;
                            }
                        }
                        Err(_) => {
                            conns[i] = None;
                            complete = false;
                        }
                    }
                }
                if complete {
                    dup.push(on.values().filter(|&&n| n >= 2).count() as u32);
                }
            }
            dup
        })
    };
    let mut lat = Vec::new();
    let (mut ok, mut errors, mut last_error) = (0u64, 0u64, None);
    for c in clients {
        let o = c.await.map_err(|e| format!("client: {e}"))?;
        lat.extend_from_slice(&o.lat_us);
        ok += o.ok;
        errors += o.errors;
        if o.last_error.is_some() {
            last_error = o.last_error;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let dup = sampler.await.map_err(|e| format!("sampler: {e}"))?;
    let after = all_counts(&hosts).await?;
    if let Some(t) = tick {
        t.abort();
    }
    pb.finish_and_clear();
    if let Some(dir) = &f.fleet_dump {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut admins: Vec<(String, u16)> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (format!("{}-node-{i}.json", strategy.name()), h.admin))
            .collect();
        if let Some((_, admin)) = front {
            admins.push(("picker-front.json".into(), admin));
        }
        for (name, port) in admins {
            let v = get_json(port, "/status").await?;
            let path = dir.join(name);
            std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap_or_default())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let mut routed = Vec::new();
    let mut retries = 0;
    if let Some((_, admin)) = front {
        let v = get_json(admin, "/status").await?;
        for n in v["pools"][0]["nodes"].as_array().into_iter().flatten() {
            let mut m = BTreeMap::new();
            for (k, c) in n["routed_by_reason"].as_object().into_iter().flatten() {
                m.insert(k.clone(), c.as_u64().unwrap_or(0));
            }
            routed.push(m);
            retries += n["retries"].as_u64().unwrap_or(0);
        }
    }
    lat.sort_unstable();
    Ok(PhaseStats {
        requests: ok,
        errors,
        last_error,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        rps: ok as f64 / measured.as_secs_f64(),
        loads: before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.0.saturating_sub(b.0))
            .collect(),
        warmup_loads: before_warmup
            .iter()
            .zip(&before)
            .map(|(b, a)| a.0.saturating_sub(b.0))
            .sum(),
        dup,
        served: before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.1.saturating_sub(b.1))
            .collect(),
        routed,
        retries,
    })
}

fn print_fleet(f: &FleetArgs, results: &[(Strategy, PhaseStats)]) {
    println!();
    println!(
        "| strategy | requests | loads | loads / 1k req | p50 | p99 | req/s | errors | \
         duplicate residency (mean / max) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (s, st) in results {
        let per_k = st.total_loads() as f64 * 1000.0 / st.requests.max(1) as f64;
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.1} | {} | {:.2} / {} |",
            s.name(),
            st.requests,
            st.total_loads(),
            per_k,
            fmt_lat(st.p50),
            fmt_lat(st.p99),
            st.rps,
            st.errors,
            st.dup_mean(),
            st.dup_max()
        );
    }
    println!();
    let get = |want: Strategy| results.iter().find(|(s, _)| *s == want).map(|(_, st)| st);
    if let Some(p) = get(Strategy::Picker) {
        for other in [Strategy::RoundRobin, Strategy::LeastRequest] {
            if let Some(o) = get(other) {
                let per_k = |st: &PhaseStats| st.total_loads() as f64 / st.requests.max(1) as f64;
                println!(
                    "{} / picker: loads {}, loads per request {}, p99 {}",
                    other.name(),
                    ratio(o.total_loads() as f64, p.total_loads() as f64),
                    ratio(per_k(o), per_k(p)),
                    ratio(o.p99, p.p99),
                );
            }
        }
        if let Some(rr) = get(Strategy::RoundRobin) {
            // Per request: in a fixed time a strategy that serves more requests also meets
            // more misses; the measure is loads per 1,000 requests.
            let per = |st: &PhaseStats| st.total_loads() as f64 / st.requests.max(1) as f64;
            let fewer = per(rr) / per(p).max(1e-9);
            println!(
                "target (>= 3x fewer loads per 1,000 requests than round-robin, p99 no worse): \
                 {:.2}x fewer {}, p99 {} of round-robin's {} (in absolute loads over the \
                 same {} s: {})",
                fewer,
                if fewer >= 3.0 { "met" } else { "NOT met" },
                ratio(p.p99, rr.p99),
                if p.p99 <= rr.p99 { "met" } else { "NOT met" },
                f.fleet_duration,
                ratio(rr.total_loads() as f64, p.total_loads() as f64),
            );
        }
    }
    println!();
    for (s, st) in results {
        let mut line = format!(
            "{}: loads per node {:?}, requests per node {:?}",
            s.name(),
            st.loads,
            st.served
        );
        if !st.routed.is_empty() {
            let _ = write!(
                line,
                ", front routed by reason (whole phase) {:?}",
                st.routed
            );
            let _ = write!(line, ", retries {}", st.retries);
        }
        println!("{line}");
    }
    println!(
        "(loads: the nodes' own counts, /status `loads` summed over models, measured window \
         only; {} hosts x {} slots, {} models)",
        f.fleet_hosts, f.fleet_slots, f.fleet_models
    );
}
