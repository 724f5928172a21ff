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
    /// Tokens per reply (llama.cpp: when the request sets no limit).
    #[arg(long, default_value_t = 8)]
    pub reply_tokens: usize,
    /// Models: `name[=context_length][@size_mb]`, comma separated (default: a small catalogue).
    #[arg(long)]
    pub models: Option<String>,
    /// Models resident at once (Ollama's OLLAMA_MAX_LOADED_MODELS, default 3; llama.cpp router
    /// `--models-max`, default 4, 0 = unlimited; LM Studio keeps one JIT model).
    #[arg(long)]
    pub max_loaded: Option<usize>,
    /// Default keep-alive (Ollama) or JIT TTL (LM Studio), e.g. "5m".
    #[arg(long, value_parser = parse_duration)]
    pub keep_alive: Option<Duration>,
    /// Generations one model runs at once: Ollama `OLLAMA_NUM_PARALLEL` (0 = unlimited);
    /// llama.cpp `--parallel` slots (0 = 1).
    #[arg(long, default_value_t = 0)]
    pub num_parallel: usize,
    /// llama.cpp only: router mode (many models, `/models/load`), as `llama-server` started
    /// without `-m`; otherwise single-model mode serving the first model.
    #[arg(long)]
    pub router: bool,
    /// The context a model loads with when the request does not say (capped at the model's
    /// trained context): llama.cpp each slot's (`--ctx-size`), Ollama's default `num_ctx`
    /// (`OLLAMA_CONTEXT_LENGTH`).
    #[arg(long, default_value_t = 4096)]
    pub ctx_size: u32,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SimKind {
    Ollama,
    Lmstudio,
    Llamacpp,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    llm_warden::config::parse_duration(s)
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called (inside
/// the runtime), not when the future is first polled: a SIGTERM that arrives while the
/// server is still starting must stop it cleanly rather than kill it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async fn next(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        async move {
            tokio::select! {
                _ = next(term) => {},
                _ = next(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Completes on the next Ctrl-C or SIGTERM after it is first polled (a second signal
/// during shutdown: the handlers are installed only then, so the first one does not count).
pub async fn later_signal() {
    shutdown_signal().await
}

/// Runs a simulator until Ctrl-C or SIGTERM.
pub async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use llm_warden_sim::{llamacpp, lmstudio, ollama};
    let models = match args.models.as_deref() {
        Some(spec) => {
            Some(llm_warden_sim::parse_models(spec).map_err(|e| anyhow::anyhow!("--models: {e}"))?)
        }
        None => None,
    };
    match args.kind {
        SimKind::Ollama => {
            let mut cfg = ollama::OllamaConfig {
                load_latency: args.load_latency,
                token_delay: args.token_delay,
                reply_tokens: args.reply_tokens,
                max_loaded_models: args.max_loaded.unwrap_or(3),
                num_parallel: args.num_parallel,
                default_num_ctx: args.ctx_size,
                ..Default::default()
            };
            if let Some(m) = models {
                cfg.models = m;
            }
            if let Some(k) = args.keep_alive {
                cfg.keep_alive = k;
            }
            let addr = args.listen.as_deref().unwrap_or("127.0.0.1:11434");
            let server = ollama::bind(cfg, addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            tracing::info!(listen = %server.addr, "simulated Ollama running");
            shutdown_signal().await;
        }
        SimKind::Lmstudio => {
            let mut cfg = lmstudio::LmStudioConfig {
                load_latency: args.load_latency,
                token_delay: args.token_delay,
                reply_tokens: args.reply_tokens,
                ..Default::default()
            };
            if let Some(m) = models {
                cfg.models = m;
            }
            if let Some(k) = args.keep_alive {
                cfg.default_ttl = k;
            }
            let addr = args.listen.as_deref().unwrap_or("127.0.0.1:1234");
            let server = lmstudio::bind(cfg, addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            tracing::info!(listen = %server.addr, "simulated LM Studio running");
            shutdown_signal().await;
        }
        SimKind::Llamacpp => {
            let mut cfg = llamacpp::LlamaCppConfig {
                router: args.router,
                models_max: args.max_loaded.unwrap_or(4),
                n_ctx: args.ctx_size,
                parallel: u32::try_from(args.num_parallel.max(1)).unwrap_or(u32::MAX),
                load_latency: args.load_latency,
                token_delay: args.token_delay,
                max_tokens_default: u32::try_from(args.reply_tokens).unwrap_or(u32::MAX),
                ..Default::default()
            };
            if let Some(m) = models {
                cfg.models = m;
            }
            let addr = args.listen.as_deref().unwrap_or("127.0.0.1:8080");
            let server = llamacpp::bind(cfg, addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            let mode = if args.router {
                "router"
            } else {
                "single-model"
            };
            tracing::info!(listen = %server.addr, mode, "simulated llama-server running");
            shutdown_signal().await;
        }
    }
    Ok(())
}
