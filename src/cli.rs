//! Pieces of the command line that belong with the library: the `simulate` command and the
//! shutdown signal. `main.rs` only dispatches.

use std::time::Duration;

/// Arguments of `llm-warden simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Which provider to simulate.
    #[arg(value_enum)]
    pub kind: SimKind,
    /// Address to listen on (default: the provider's usual port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Cold-load latency, e.g. "2s".
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub load_latency: Duration,
    /// Delay before each generated token, e.g. "20ms".
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    pub token_delay: Duration,
    /// Tokens per reply.
    #[arg(long, default_value_t = 8)]
    pub reply_tokens: usize,
    /// Models: `name[=context_length][@size_mb]`, comma separated (default: a small catalogue).
    #[arg(long)]
    pub models: Option<String>,
    /// Models resident at once (Ollama's OLLAMA_MAX_LOADED_MODELS).
    #[arg(long, default_value_t = 3)]
    pub max_loaded: usize,
    /// Default keep-alive (Ollama) or JIT TTL (LM Studio), e.g. "5m".
    #[arg(long, value_parser = parse_duration)]
    pub keep_alive: Option<Duration>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SimKind {
    Ollama,
    Lmstudio,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs a simulator until Ctrl-C.
pub async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("simulators are not wired yet")
}
