//! The `llm-warden` binary: parse the command line, set up logging, load the config, run.
//! Everything else lives in the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llm-warden",
    version,
    about = "A drop-in proxy that manages local LLM providers (Ollama, LM Studio)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (built-in defaults when no config is given).
    Serve {
        /// Config file; defaults to $LLM_WARDEN_CONFIG, else built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a config file and print the resolved listeners, then exit.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a simulated provider for trying llm-warden without a GPU.
    Simulate(llm_warden::cli::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Simulate(args) => {
            runtime().and_then(|rt| rt.block_on(llm_warden::cli::simulate(args)))
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
        let shutdown = llm_warden::cli::shutdown_signal();
        llm_warden::app::serve(config, shutdown, llm_warden::cli::later_signal()).await
    })?;
    Ok(())
}

fn check_config(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, origin) = llm_warden::config::load(config.as_deref())?;
    println!(
        "config: {}",
        origin.as_deref().unwrap_or("(built-in defaults)")
    );
    println!("admin: {}", config.admin.listen);
    for p in &config.providers {
        println!(
            "provider {} ({}): {} -> {}",
            p.name,
            p.kind.as_str(),
            p.listen,
            p.upstream
        );
    }
    Ok(())
}
