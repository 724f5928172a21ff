//! The `llm-warden` binary: parse the command line, set up logging, load the config, run.
//! The proxy itself lives in the library (`llm_warden`, the repository's root crate), the
//! simulators in `llm_warden_sim`; this crate is the command line around them.
#![forbid(unsafe_code)]

mod admin_client;
mod cli;
mod demo;
mod log;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "llm-warden",
    version,
    about = "A drop-in proxy that manages local LLM providers (Ollama, LM Studio, llama.cpp)",
    long_about = "A drop-in proxy that manages local LLM providers (Ollama, LM Studio, llama.cpp's \
llama-server): clients point at the proxy instead of the provider; it loads models on first use, \
unloads idle ones, keeps within limits, compacts conversations that would overflow, and shows it \
all at /status, /metrics and a dashboard. New here? Run `llm-warden demo`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (built-in defaults when no config is given: Ollama on :11435 -> :11434,
    /// LM Studio on :1235 -> :1234, admin API and dashboard on 127.0.0.1:11400).
    Serve {
        /// Config file [default: $LLM_WARDEN_CONFIG, else built-in defaults]
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log lines as text, or as one JSON object per line (levels from RUST_LOG either
        /// way, default `info`).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file and print the effective config (every key, defaults filled in);
    /// exits non-zero with each problem's key path if it is invalid.
    CheckConfig {
        /// Config file [default: --config, else $LLM_WARDEN_CONFIG, else built-in defaults]
        path: Option<PathBuf>,
        #[arg(long, short, hide = true)]
        config: Option<PathBuf>,
    },
    /// Show the models of a running proxy as a table (from its admin API).
    Status {
        #[command(flatten)]
        admin: crate::admin_client::AdminArgs,
        /// Print the whole /status answer as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Load a model on a provider now (waits until it is loaded).
    Load {
        #[command(flatten)]
        admin: crate::admin_client::AdminArgs,
        /// The provider's name in the config (e.g. ollama).
        provider: String,
        /// The model, as clients name it (e.g. llama3.2).
        model: String,
    },
    /// Unload a model now, gracefully (requests in flight finish first).
    Unload {
        #[command(flatten)]
        admin: crate::admin_client::AdminArgs,
        /// The provider's name in the config (e.g. ollama).
        provider: String,
        /// The model, as clients name it (e.g. llama3.2).
        model: String,
    },
    /// Run a simulated provider (Ollama, LM Studio, llama-server) for trying llm-warden
    /// without a GPU.
    Simulate(crate::cli::SimulateArgs),
    /// Start simulated providers and the proxy, drive a short workload that shows what the
    /// proxy does, and keep the dashboard up until Ctrl-C.
    Demo(crate::demo::DemoArgs),
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.command {
        Command::Serve { log_format, .. } => log_format,
        _ => LogFormat::Text,
    };
    // The demo's log file, and the log writers' guards (they flush when `main` returns).
    let (demo_log, _guards) = match &cli.command {
        Command::Demo(args) => match crate::demo::init_logging(args) {
            Ok((path, guards)) => (Some(path), guards),
            Err(e) => {
                eprintln!("llm-warden: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => (None, vec![init_tracing(format)]),
    };
    raise_fd_limit();
    let result = match cli.command {
        Command::Serve { config, .. } => serve(config),
        Command::CheckConfig { path, config } => check_config(path.or(config)),
        Command::Simulate(args) => runtime().and_then(|rt| rt.block_on(crate::cli::simulate(args))),
        Command::Status { admin, json } => {
            runtime().and_then(|rt| rt.block_on(crate::admin_client::status(&admin, json)))
        }
        Command::Load {
            admin,
            provider,
            model,
        } => runtime().and_then(|rt| {
            rt.block_on(crate::admin_client::model_action(
                &admin, "load", &provider, &model,
            ))
        }),
        Command::Unload {
            admin,
            provider,
            model,
        } => runtime().and_then(|rt| {
            rt.block_on(crate::admin_client::model_action(
                &admin, "unload", &provider, &model,
            ))
        }),
        Command::Demo(args) => {
            let log = demo_log.unwrap_or_default();
            runtime().and_then(|rt| rt.block_on(crate::demo::run(args, &log)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-warden: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logging to stderr through a writer thread: a request handler formats its access line and
/// hands it over, and never waits for the terminal or the file behind stderr (measured: a
/// synchronous writer cost 10 µs a request and a fifth of the throughput at 64 clients). The
/// guard flushes what is queued when `main` returns.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Under a burst, wait for room rather than drop lines: an access log with holes is
        // worse than a slower burst.
        .lossy(false)
        .finish(std::io::stderr());
    let ansi = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // Installed once, at start; a second install (none happens) would keep the first.
    let _ = tracing::dispatcher::set_global_default(subscriber(format, writer, ansi, "info"));
    guard
}

/// The subscriber: levels from `RUST_LOG` (else `default_filter`), lines in `format` to
/// `writer`, every field value escaped (`log`: one event is one line).
fn subscriber<W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
    default_filter: &str,
) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => fmt
            .with_ansi(ansi)
            .fmt_fields(crate::log::fields())
            .with_writer(writer)
            .finish()
            .into(),
        LogFormat::Json => fmt
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_writer(crate::log::MakeJsonSafe(writer))
            .finish()
            .into(),
    }
}

/// Each proxied connection holds two descriptors (client and upstream), so the common soft
/// limit of 1024 would cap a proxy at about 500 open streams, far below
/// `proxy.max_connections` (10,000). Raise the soft limit to the hard one, as Go programs
/// (Ollama among them) and nginx's `worker_rlimit_nofile` do. Failure is not fatal: the
/// proxy then runs with what it has, and says so.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => {
            tracing::warn!(
                limit = n,
                "open-file limit is low; each proxied stream uses two"
            )
        }
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, origin) = llm_warden::config::load(config.as_deref())?;
    match &origin {
        Some(path) => tracing::info!(config = %path, "config loaded"),
        None => tracing::info!("no config file; using built-in defaults"),
    }
    runtime()?.block_on(async {
        // Installed before anything starts; the second only once shutdown has begun.
        let shutdown = crate::cli::shutdown_signal();
        let path = origin.map(PathBuf::from);
        llm_warden::app::serve(config, path, shutdown, crate::cli::later_signal()).await
    })?;
    Ok(())
}

fn check_config(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, origin) = llm_warden::config::load(config.as_deref())?;
    println!(
        "# llm-warden: the config is valid. Effective settings ({}):",
        origin.as_deref().unwrap_or("built-in defaults")
    );
    print!("{}", config.to_toml());
    Ok(())
}
