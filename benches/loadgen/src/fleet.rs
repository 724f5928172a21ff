//! Fleet mode (`loadgen --fleet`, issue 21 §5): many hosts, one address.
//!
//! N simulated hosts, each an Ollama simulator (`llm-warden simulate ollama`, a realistic
//! `--load-latency`, room for every model so that only the node decides what is resident)
//! with a node in front of it (`llm-warden serve`, `[limits] max_models_loaded` slots);
//! M models with Zipf popularity; C clients sending non-streamed `POST /api/chat` in a
//! closed loop. Six strategies, one phase each, each on freshly started hosts:
//!
//! - `picker`: the clients send to a front (`llm-warden serve` with a `[[pools]]` config
//!   over the N nodes), which picks the node per request;
//! - `envoy+epp` (issue 22): the clients send to the real Envoy running the shipped
//!   `deploy/envoy/envoy.yaml` (rewritten to loopback ports), which asks the endpoint picker
//!   (the same `llm-warden serve` config plus `[epp]`) over ext_proc for each request;
//! - `round-robin`: the benchmark itself sends each request straight to a node's provider
//!   listener, the next node each time (what a plain load balancer does);
//! - `least-request`: straight to the node with the fewest requests this benchmark has in
//!   flight to it (ties: round-robin);
//! - `envoy-rr`, `envoy-lr`: a plain Envoy, no ext_proc: a generated static config (a
//!   STATIC cluster of the nodes' provider listeners, `lb_policy` ROUND_ROBIN resp.
//!   LEAST_REQUEST, the shipped config's route timeouts, circuit breakers and access log),
//!   checked with `envoy --mode validate` before it starts.
//!
//! A phase runs `--fleet-warmup` seconds unmeasured, then `--fleet-duration` seconds
//! measured: requests started in that window count (latency, errors), and the loads are
//! the nodes' own counts (`/status`: the `loads` of every model, which the node's lifecycle
//! makes; the simulators are never asked to evict by themselves) read when the window opens
//! and once its last request has ended. Duplicate residency: every node's `/node` view is
//! read every `--fleet-sample-ms`; a sample counts the models ready or loading on two hosts
//! or more at once.
//!
//! Then (`--fleet-epp-latency`, on by default) the EPP's added latency per request: one
//! host, one client, small non-streamed chats straight to the node, through the built-in
//! front, through Envoy with a static cluster, and through Envoy with the shipped config and
//! the EPP (`epp_latency`).

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
    /// Fleet: strategies to run, in this order (picker, envoy+epp, round-robin,
    /// least-request, envoy-rr, envoy-lr).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "picker,envoy+epp,round-robin,least-request,envoy-rr,envoy-lr"
    )]
    fleet_strategies: Vec<String>,
    /// Fleet: also measure the endpoint picker's added latency per request (one host, one
    /// client, small non-streamed chats: straight to the node, the built-in front, Envoy
    /// with a static cluster, Envoy with the shipped config and the EPP).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fleet_epp_latency: bool,
    /// Fleet: measured seconds per path of the EPP latency measurement (in 5 rounds, the
    /// paths taking turns).
    #[arg(long, default_value_t = 5.0)]
    fleet_epp_latency_secs: f64,
    /// Fleet: the Envoy binary (default `$ENVOY`, else `.envoy/bin/envoy` as
    /// `.ci/envoy-env.sh` installs it).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// Fleet: seed of the clients' model draws (the same sequence for every strategy).
    #[arg(long, default_value_t = 1)]
    fleet_seed: u64,
    /// Fleet: write every node's `/status` (its lifecycle events: loads, evictions) and the
    /// front's (or the EPP's process's) at the end of each phase into this directory
    /// (`<strategy>-node-<i>.json`, `<strategy>-front.json`), and Envoy's logs with its
    /// access log (`<strategy>-envoy.log`), to see why the loads happened.
    #[arg(long)]
    fleet_dump: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Picker,
    EnvoyEpp,
    RoundRobin,
    LeastRequest,
    EnvoyRr,
    EnvoyLr,
}

impl Strategy {
    fn parse(s: &str) -> Res<Strategy> {
        match s {
            "picker" => Ok(Strategy::Picker),
            "envoy+epp" | "envoy-epp" | "epp" => Ok(Strategy::EnvoyEpp),
            "round-robin" | "rr" => Ok(Strategy::RoundRobin),
            "least-request" | "lr" => Ok(Strategy::LeastRequest),
            "envoy-rr" => Ok(Strategy::EnvoyRr),
            "envoy-lr" => Ok(Strategy::EnvoyLr),
            other => Err(format!(
                "unknown strategy `{other}` (picker, envoy+epp, round-robin, least-request, \
                 envoy-rr, envoy-lr)"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Strategy::Picker => "picker",
            Strategy::EnvoyEpp => "envoy+epp",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastRequest => "least-request",
            Strategy::EnvoyRr => "envoy-rr",
            Strategy::EnvoyLr => "envoy-lr",
        }
    }

    fn envoy(self) -> bool {
        matches!(
            self,
            Strategy::EnvoyEpp | Strategy::EnvoyRr | Strategy::EnvoyLr
        )
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
    let envoy = if strategies.iter().any(|s| s.envoy()) || f.fleet_epp_latency {
        Some(envoy_path(f)?)
    } else {
        None
    };
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
        let r = phase(args, &bin, envoy.as_deref(), &mut procs, s, &weights).await;
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
    if let (true, Some(envoy)) = (f.fleet_epp_latency, envoy.as_deref()) {
        let dir = base.dir.join("epp-latency");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut procs = Procs {
            children: Vec::new(),
            cmds: Vec::new(),
            dir,
        };
        match epp_latency(args, &bin, envoy, &mut procs).await {
            Ok(rows) => {
                if let Some(dir) = &f.fleet_dump {
                    keep_envoy_log(&procs, dir, "epp-latency");
                }
                print_latency(f, &rows);
            }
            Err(e) => {
                print_logs(&mut procs);
                return Err(format!("EPP latency: {e}"));
            }
        }
    }
    Ok(())
}

/// The EPP's added latency per request: one host (its simulator without token delay, m0
/// loaded), one client sending small non-streamed chats one at a time through each path:
/// straight to the node, the built-in front, Envoy with a static cluster of that node (no
/// ext_proc), Envoy with the shipped config and the EPP. The paths take turns in 5 rounds
/// (a busy machine's drift falls on all of them), after 20 unmeasured requests each.
async fn epp_latency(
    args: &Args,
    bin: &Path,
    envoy: &Path,
    procs: &mut Procs,
) -> Res<Vec<(&'static str, Vec<u32>)>> {
    let f = &args.fleet_args;
    let models = format!("m0@{}", f.fleet_model_mb);
    let hosts = start_hosts(args, bin, procs, 1, &models, 0).await?;
    let node = hosts[0].node;
    let epp = free_port()?;
    let (front, _) = start_front(args, bin, procs, &hosts, Some(epp)).await?;
    let plain = start_envoy(procs, envoy, "envoy-static", |l, a| {
        Ok(static_envoy(l, a, &[node], "ROUND_ROBIN"))
    })
    .await?;
    let with_epp = start_envoy(procs, envoy, "envoy", |l, a| shipped_envoy(l, epp, a)).await?;
    let paths = [
        ("node (direct)", node),
        ("built-in front", front),
        ("envoy, static cluster", plain),
        ("envoy + EPP (shipped config)", with_epp),
    ];
    let targets: Vec<Target> = paths
        .iter()
        .map(|&(_, p)| url_target(p))
        .collect::<Res<_>>()?;
    let mut conns: Vec<Option<Conn>> = targets.iter().map(|_| None).collect();
    let body = chat_body(
        "m0",
        &[json!({"role": "user", "content": "Why is the sky blue?"})],
        false,
        json!({}),
    );
    // The first request loads m0; then 20 unmeasured requests per path.
    for (i, t) in targets.iter().enumerate() {
        for _ in 0..20 {
            send(&mut conns[i], t, body.clone()).await?;
        }
    }
    let rounds = 5;
    let per = Duration::from_secs_f64(f.fleet_epp_latency_secs.max(0.1) / rounds as f64);
    let mut lat: Vec<Vec<u32>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, t) in targets.iter().enumerate() {
            let end = Instant::now() + per;
            while Instant::now() < end {
                let t0 = Instant::now();
                send(&mut conns[i], t, body.clone()).await?;
                lat[i].push(us(t0.elapsed()));
            }
        }
    }
    Ok(paths
        .iter()
        .zip(lat)
        .map(|(&(name, _), mut l)| {
            l.sort_unstable();
            (name, l)
        })
        .collect())
}

fn print_latency(f: &FleetArgs, rows: &[(&'static str, Vec<u32>)]) {
    println!();
    println!(
        "EPP latency: 1 host (m0 loaded, no token delay), 1 client, non-streamed chats, \
         {} s per path in 5 rounds",
        f.fleet_epp_latency_secs
    );
    println!();
    println!("| path | requests | p50 | p90 | p99 | mean |");
    println!("|---|---|---|---|---|---|");
    let mean = |l: &[u32]| l.iter().map(|&x| x as f64).sum::<f64>() / l.len().max(1) as f64;
    for (name, l) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            l.len(),
            fmt_lat(pct(l, 0.50)),
            fmt_lat(pct(l, 0.90)),
            fmt_lat(pct(l, 0.99)),
            fmt_lat(mean(l))
        );
    }
    println!();
    let diff = |what: &str, a: usize, b: usize| {
        if let (Some((_, la)), Some((_, lb))) = (rows.get(a), rows.get(b)) {
            println!(
                "{what}: p50 {}, p99 {}, mean {}",
                fmt_delta(pct(la, 0.50) - pct(lb, 0.50)),
                fmt_delta(pct(la, 0.99) - pct(lb, 0.99)),
                fmt_delta(mean(la) - mean(lb))
            );
        }
    };
    diff("the EPP's cost (envoy + EPP - envoy static)", 3, 2);
    diff("Envoy's own (envoy static - node)", 2, 0);
    diff("the built-in front's (front - node)", 1, 0);
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

/// A phase's processes, started: the hosts, where the clients send, and the admin port of
/// the llm-warden process that picks (the front, or the EPP's process), if any.
struct Started {
    hosts: Vec<Host>,
    targets: Vec<u16>,
    front_admin: Option<u16>,
}

/// Starts `n` hosts: a simulator and a node each, `models` (`m0@512,...`), the simulator's
/// delay per token `token_ms`.
async fn start_hosts(
    args: &Args,
    bin: &Path,
    procs: &mut Procs,
    n: usize,
    models: &str,
    token_ms: u64,
) -> Res<Vec<Host>> {
    let f = &args.fleet_args;
    let mut hosts = Vec::new();
    for i in 0..n {
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
                models,
                "--max-loaded",
                &(f.fleet_models + 1).to_string(),
                "--load-latency",
                &format!("{}ms", f.fleet_load_latency),
                "--token-delay",
                &format!("{token_ms}ms"),
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
    Ok(hosts)
}

/// Starts the front over `hosts` (`llm-warden serve` with one `[[pools]]` entry), with the
/// endpoint picker on `epp` if given; returns its (pool listener, admin) ports once every
/// node is up in its view.
async fn start_front(
    args: &Args,
    bin: &Path,
    procs: &mut Procs,
    hosts: &[Host],
    epp: Option<u16>,
) -> Res<(u16, u16)> {
    let f = &args.fleet_args;
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
    let mut toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[compaction]\ncache_dir = {cache}\n\n\
         [[pools]]\nname = \"gpus\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:{listen}\"\n\
         poll_interval = \"{}ms\"\nnodes = [\n  {}\n]\n",
        f.fleet_poll,
        nodes.join(",\n  ")
    );
    if let Some(epp) = epp {
        let _ = write!(
            toml,
            "\n[epp]\nlisten = \"127.0.0.1:{epp}\"\npool = \"gpus\"\n"
        );
    }
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
    Ok((listen, admin))
}

/// Starts a phase's processes: the hosts, then what `strategy` sends through.
async fn start_phase(
    args: &Args,
    bin: &Path,
    envoy: Option<&Path>,
    procs: &mut Procs,
    strategy: Strategy,
) -> Res<Started> {
    let f = &args.fleet_args;
    let models: Vec<String> = (0..f.fleet_models)
        .map(|k| format!("m{k}@{}", f.fleet_model_mb))
        .collect();
    let hosts = start_hosts(
        args,
        bin,
        procs,
        f.fleet_hosts,
        &models.join(","),
        f.fleet_token_delay,
    )
    .await?;
    let envoy_bin = || envoy.ok_or_else(|| "no Envoy binary".to_string());
    let (targets, front_admin) = match strategy {
        Strategy::RoundRobin | Strategy::LeastRequest => {
            (hosts.iter().map(|h| h.node).collect(), None)
        }
        Strategy::Picker => {
            let (listen, admin) = start_front(args, bin, procs, &hosts, None).await?;
            (vec![listen], Some(admin))
        }
        Strategy::EnvoyEpp => {
            let epp = free_port()?;
            let (_, admin) = start_front(args, bin, procs, &hosts, Some(epp)).await?;
            let listen = start_envoy(procs, envoy_bin()?, "envoy", |l, a| {
                shipped_envoy(l, epp, a)
            })
            .await?;
            (vec![listen], Some(admin))
        }
        Strategy::EnvoyRr | Strategy::EnvoyLr => {
            let lb = if strategy == Strategy::EnvoyRr {
                "ROUND_ROBIN"
            } else {
                "LEAST_REQUEST"
            };
            let nodes: Vec<u16> = hosts.iter().map(|h| h.node).collect();
            let listen = start_envoy(procs, envoy_bin()?, "envoy", |l, a| {
                Ok(static_envoy(l, a, &nodes, lb))
            })
            .await?;
            (vec![listen], None)
        }
    };
    Ok(Started {
        hosts,
        targets,
        front_admin,
    })
}

// === Envoy ===

/// The Envoy binary: `--envoy`, else `$ENVOY`, else `<repo>/.envoy/bin/envoy`.
fn envoy_path(f: &FleetArgs) -> Res<PathBuf> {
    let p = match (&f.envoy, std::env::var_os("ENVOY")) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.envoy/bin/envoy"),
    };
    if !p.is_file() {
        return Err(format!(
            "Envoy not found at {}: run `bash .ci/envoy-env.sh`, or pass --envoy PATH",
            p.display()
        ));
    }
    Ok(p)
}

/// The shipped `deploy/envoy/envoy.yaml` on loopback: its listener on 127.0.0.1:`listen`,
/// the EPP at 127.0.0.1:`epp`, its admin on `admin` (the rewrite the tests make).
fn shipped_envoy(listen: u16, epp: u16, admin: u16) -> Res<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/envoy/envoy.yaml");
    let shipped = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = shipped;
    for (from, to) in [
        ("address: 0.0.0.0", "address: 127.0.0.1".to_string()),
        ("port_value: 8080", format!("port_value: {listen}")),
        ("port_value: 9002", format!("port_value: {epp}")),
        ("port_value: 9901", format!("port_value: {admin}")),
    ] {
        if !out.contains(from) {
            return Err(format!("{}: no `{from}` to rewrite", path.display()));
        }
        out = out.replace(from, &to);
    }
    Ok(out)
}

/// What a plain Envoy does: a listener, the router, and a STATIC cluster of the nodes'
/// provider listeners with `lb_policy` (ROUND_ROBIN or LEAST_REQUEST, Envoy's defaults
/// otherwise); the shipped config's access log, route timeouts and raised circuit breakers,
/// no ext_proc. JSON (Envoy reads a `.json` config as JSON).
fn static_envoy(listen: u16, admin: u16, nodes: &[u16], lb_policy: &str) -> String {
    let addr = |port: u16| json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    let endpoints: Vec<Value> = nodes
        .iter()
        .map(|&p| json!({"endpoint": {"address": addr(p)}}))
        .collect();
    let log_format = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
        %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% \
        %BYTES_RECEIVED% %BYTES_SENT% %DURATION%ms upstream=%UPSTREAM_HOST% \
        node=%RESP(X-LLM-WARDEN-NODE)%\n";
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inference",
        "codec_type": "AUTO",
        "access_log": [{
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {"text_format_source": {"inline_string": log_format}}
            }
        }],
        "route_config": {
            "name": "inference",
            "virtual_hosts": [{
                "name": "inference",
                "domains": ["*"],
                "routes": [{
                    "match": {"prefix": "/"},
                    "route": {"cluster": "models", "timeout": "0s", "idle_timeout": "900s"}
                }]
            }]
        },
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            }
        }]
    });
    let config = json!({
        "admin": {"address": addr(admin)},
        "static_resources": {
            "listeners": [{
                "name": "inference",
                "address": addr(listen),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm
                }]}]
            }],
            "clusters": [{
                "name": "models",
                "type": "STATIC",
                "lb_policy": lb_policy,
                "connect_timeout": "5s",
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 100000,
                    "max_pending_requests": 100000,
                    "max_requests": 100000
                }]},
                "load_assignment": {
                    "cluster_name": "models",
                    "endpoints": [{"lb_endpoints": endpoints}]
                }
            }]
        }
    });
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

/// Writes the config `make(listen, admin)` gives, has Envoy validate it (`--mode
/// validate`), starts Envoy on it (`--base-id` its listener's port, so that several can
/// run; access log and errors into `<name>.log`) and waits until a request through it is
/// answered (`GET /api/version`, which a node answers). Returns the listener's port.
async fn start_envoy(
    procs: &mut Procs,
    envoy: &Path,
    name: &'static str,
    make: impl FnOnce(u16, u16) -> Res<String>,
) -> Res<u16> {
    let (listen, admin) = (free_port()?, free_port()?);
    let config = make(listen, admin)?;
    let ext = if config.trim_start().starts_with('{') {
        "json"
    } else {
        "yaml"
    };
    let path = procs.dir.join(format!("{name}.{ext}"));
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    let (bin, p) = (envoy.to_owned(), path.clone());
    let check = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["--mode", "validate", "-l", "warn", "-c"])
            .arg(p)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .map_err(|e| format!("envoy --mode validate: {e}"))?
    .map_err(|e| format!("cannot start {}: {e}", envoy.display()))?;
    if !check.status.success() {
        return Err(format!(
            "envoy --mode validate rejects {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    let log = std::fs::File::create(procs.dir.join(format!("{name}.log")))
        .map_err(|e| format!("log file: {e}"))?;
    let args: Vec<String> = vec![
        "-c".into(),
        path.to_string_lossy().into_owned(),
        "--base-id".into(),
        listen.to_string(),
        "-l".into(),
        "warn".into(),
    ];
    let child = Command::new(envoy)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| format!("log file: {e}"))?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", envoy.display()))?;
    procs.children.push((name, child));
    procs.cmds.push((envoy.to_owned(), args));
    wait_ready(&url_target(listen)?, procs).await?;
    Ok(listen)
}

/// Copies the phase's Envoy logs (`envoy*.log`: the access log, one line per request) to
/// `dir` as `<prefix>-envoy*.log`.
fn keep_envoy_log(procs: &Procs, dir: &Path, prefix: &str) {
    let _ = std::fs::create_dir_all(dir);
    let Ok(rd) = std::fs::read_dir(&procs.dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("envoy") && name.ends_with(".log") {
            let _ = std::fs::copy(e.path(), dir.join(format!("{prefix}-{name}")));
        }
    }
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
            Strategy::Picker | Strategy::EnvoyEpp | Strategy::EnvoyRr | Strategy::EnvoyLr => 0,
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
    envoy: Option<&Path>,
    procs: &mut Procs,
    strategy: Strategy,
    weights: &[f64],
) -> Res<PhaseStats> {
    let f = &args.fleet_args;
    let Started {
        hosts,
        targets,
        front_admin,
    } = start_phase(args, bin, envoy, procs, strategy).await?;
    let targets: Vec<Target> = targets.into_iter().map(url_target).collect::<Res<_>>()?;
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
        if let Some(admin) = front_admin {
            admins.push((format!("{}-front.json", strategy.name()), admin));
        }
        keep_envoy_log(procs, dir, strategy.name());
        for (name, port) in admins {
            let v = get_json(port, "/status").await?;
            let path = dir.join(name);
            std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap_or_default())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let mut routed = Vec::new();
    let mut retries = 0;
    if let Some(admin) = front_admin {
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
    // Through Envoy: its own policies against the EPP's, and the EPP against the front.
    for (other, base) in [
        (Strategy::EnvoyRr, Strategy::EnvoyEpp),
        (Strategy::EnvoyLr, Strategy::EnvoyEpp),
        (Strategy::EnvoyEpp, Strategy::Picker),
    ] {
        if let (Some(o), Some(b)) = (get(other), get(base)) {
            let per_k = |st: &PhaseStats| st.total_loads() as f64 / st.requests.max(1) as f64;
            println!(
                "{} / {}: loads per request {}, p50 {}, p99 {}, req/s {}",
                other.name(),
                base.name(),
                ratio(per_k(o), per_k(b)),
                ratio(o.p50, b.p50),
                ratio(o.p99, b.p99),
                ratio(o.rps, b.rps),
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
