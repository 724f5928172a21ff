//! `llm-warden demo`: llm-warden at work without a GPU or a provider installed. Starts a
//! simulated Ollama and LM Studio and the proxy in front of them on free local ports (every
//! listener, the admin one included, on port 0 unless `--admin` names one), drives a short
//! mixed workload that shows each thing the proxy does (lazy loads, a limit that makes it
//! evict, an oversized conversation compacted, an idle model unloaded), prints what happened,
//! and leaves everything up, dashboard included, until Ctrl-C.
//!
//! The story is the demo's stdout; the proxy's own log goes to a file ([`init_logging`]), with
//! only warnings and errors on the terminal unless `--verbose`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use llm_warden_sim::{lmstudio, ollama};

/// Arguments of `llm-warden demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where the admin API and dashboard listen [default: a free port on 127.0.0.1, as for
    /// every other listener of the demo].
    #[arg(long)]
    pub admin: Option<String>,
    /// Exit after the workload instead of staying up until Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
    /// Also show the proxy's log on the terminal (levels from RUST_LOG, default `info`);
    /// without it only its warnings and errors are shown, between the demo's lines.
    #[arg(long, short)]
    pub verbose: bool,
    /// Where the proxy's log is written [default: llm-warden-demo-<pid>.log in the system's
    /// temporary directory].
    #[arg(long)]
    pub log_file: Option<PathBuf>,
}

/// The demo's logging: every line (levels from `RUST_LOG`, default `info`) to `--log-file`
/// or a file in the temporary directory; on stderr only warnings and errors, or with
/// `--verbose` the same lines as the file. Returns the file's path and the writers' guards
/// (they flush what is queued when dropped). Colourless on both: the two writers share the
/// spans' formatted fields, so a colour on one would reach the file.
pub fn init_logging(
    args: &DemoArgs,
) -> anyhow::Result<(PathBuf, Vec<tracing_appender::non_blocking::WorkerGuard>)> {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};
    use tracing_subscriber::prelude::*;

    let path = args.log_file.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("llm-warden-demo-{}.log", std::process::id()))
    });
    let file = std::fs::File::create(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the demo's log file {}: {e} (choose another with --log-file)",
            path.display()
        )
    })?;
    let writer = |w: Box<dyn std::io::Write + Send>| {
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .finish(w)
    };
    let (to_file, file_guard) = writer(Box::new(file));
    let (to_terminal, terminal_guard) = writer(Box::new(std::io::stderr()));
    let levels = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal_levels = if args.verbose {
        levels()
    } else {
        EnvFilter::default().add_directive(LevelFilter::WARN.into())
    };
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .fmt_fields(crate::log::fields())
                .with_writer(to_file)
                .with_filter(levels()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .fmt_fields(crate::log::fields())
                .with_writer(to_terminal)
                .with_filter(terminal_levels),
        );
    // Installed once, at start; a second install (none happens) would keep the first.
    let _ = tracing::dispatcher::set_global_default(subscriber.into());
    Ok((path, vec![file_guard, terminal_guard]))
}

/// How long the demo's idle model may stay idle before the proxy unloads it.
const IDLE: Duration = Duration::from_secs(3);

struct Http {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Value,
}

impl Http {
    async fn send(&self, method: Method, url: &str, body: Value) -> anyhow::Result<Answer> {
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let resp = self.client.request(req).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }
}

fn step(t0: Instant, what: &str) {
    println!("[{:>5.1}s] {what}", t0.elapsed().as_secs_f64());
}

/// The model's `/status` entry.
fn model<'a>(status: &'a Value, provider: &str, name: &str) -> &'a Value {
    status["models"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["provider"] == provider && m["model"] == name)
        })
        .unwrap_or(&Value::Null)
}

/// Runs the demo; `log` is where [`init_logging`] sends the proxy's log.
pub async fn run(args: DemoArgs, log: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let sim_ollama = ollama::bind(
        ollama::OllamaConfig {
            load_latency: Duration::from_millis(400),
            token_delay: Duration::from_millis(15),
            ..Default::default()
        },
        "127.0.0.1:0",
    )
    .await?;
    let sim_lmstudio = lmstudio::bind(
        lmstudio::LmStudioConfig {
            load_latency: Duration::from_millis(400),
            token_delay: Duration::from_millis(15),
            ..Default::default()
        },
        "127.0.0.1:0",
    )
    .await?;
    // The config's own checks say what is wrong with an `--admin` that is not an address.
    let admin = args.admin.as_deref().unwrap_or("127.0.0.1:0");
    let cache = std::env::temp_dir().join(format!("llm-warden-demo-{}", std::process::id()));
    let toml = format!(
        "[admin]\nlisten = \"{admin}\"\n\
         [[providers]]\nname = \"ollama\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npoll_interval = \"1s\"\n\
         [[providers]]\nname = \"lmstudio\"\nkind = \"lmstudio\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npoll_interval = \"1s\"\n\
         [limits]\nmax_models_loaded = 2\n\
         [compaction]\ncache_dir = \"{}\"\n\
         [models.\"nomic-embed-text\"]\ninactivity_timeout = \"{}s\"\n",
        sim_ollama.url(),
        sim_lmstudio.url(),
        cache.display(),
        IDLE.as_secs()
    );
    let config = llm_warden::config::load_str(&toml)?;
    let proxy = llm_warden::app::start(config).await?;
    let (ollama_url, lmstudio_url, admin_url) = (
        format!("http://{}", proxy.proxy_addr(0)),
        format!("http://{}", proxy.proxy_addr(1)),
        format!("http://{}", proxy.admin_addr),
    );
    println!("llm-warden demo: simulated providers behind the proxy (no GPU, nothing installed)");
    println!("  Ollama    {} -> proxy {ollama_url}", sim_ollama.url());
    println!("  LM Studio {} -> proxy {lmstudio_url}", sim_lmstudio.url());
    println!("  admin     {admin_url}  (dashboard, /status)");
    println!(
        "  limits: 2 models loaded at once per provider; nomic-embed-text unloads after {}s idle",
        IDLE.as_secs()
    );
    println!(
        "  the proxy's log: {}{}\n",
        log.display(),
        if args.verbose {
            ""
        } else {
            " (warnings and errors also here; --verbose for all)"
        }
    );
    let http = Http {
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let chat = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": text}], "stream": false});

    // 1. A first request: the proxy loads the model itself, then forwards.
    let r = http
        .send(
            Method::POST,
            &format!("{ollama_url}/api/chat"),
            chat("llama3.2", "Why is the sky blue?"),
        )
        .await?;
    let s = crate::admin_client::call(Method::GET, &format!("{admin_url}/status"), None)
        .await?
        .1;
    let m = model(&s, "ollama", "llama3.2:latest");
    step(t0, &format!(
        "ollama  llama3.2      chat -> {}; loaded on first use in {} ms; {} prompt + {} reply tokens",
        r.status,
        m["load_time_ms"].as_u64().unwrap_or(0),
        r.body["prompt_eval_count"].as_u64().unwrap_or(0),
        r.body["eval_count"].as_u64().unwrap_or(0)
    ));

    // 2. Concurrent requests for two models: one load each, shared by all their requests.
    let chat_url = format!("{ollama_url}/api/chat");
    let mut burst = Vec::new();
    for i in 0..6 {
        let m = if i % 2 == 0 { "llama3.2" } else { "qwen2.5:7b" };
        burst.push(http.send(Method::POST, &chat_url, chat(m, "Tell me a short fact.")));
    }
    let answers = futures_util::future::join_all(burst).await;
    let ok = answers
        .iter()
        .filter(|a| matches!(a, Ok(a) if a.status == 200))
        .count();
    step(t0, &format!("ollama  burst of 6 chats over llama3.2 and qwen2.5:7b -> {ok}/6 OK, one load for qwen2.5:7b"));

    // 3. A third model with room for two: the least recently used idle one is unloaded.
    let r = http
        .send(
            Method::POST,
            &format!("{ollama_url}/api/embed"),
            json!({"model": "nomic-embed-text", "input": ["a", "b"]}),
        )
        .await?;
    let s = crate::admin_client::call(Method::GET, &format!("{admin_url}/status"), None)
        .await?
        .1;
    let evicted: Vec<&str> = s["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["provider"] == "ollama" && m["unloads"].as_u64().unwrap_or(0) > 0)
        .filter_map(|m| m["model"].as_str())
        .collect();
    step(t0, &format!(
        "ollama  nomic-embed-text embed -> {}; limit of 2: unloaded the least recently used idle model {evicted:?}",
        r.status
    ));

    // 4. LM Studio through its OpenAI API.
    let r = http
        .send(
            Method::POST,
            &format!("{lmstudio_url}/v1/chat/completions"),
            chat("qwen2.5-7b-instruct", "Hello!"),
        )
        .await?;
    step(
        t0,
        &format!(
            "lmstudio qwen2.5-7b-instruct /v1/chat/completions -> {}; {} prompt + {} reply tokens",
            r.status,
            r.body["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            r.body["usage"]["completion_tokens"].as_u64().unwrap_or(0)
        ),
    );

    // 5. A conversation longer than the model's window: compacted, not silently truncated.
    let mut messages = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    for i in 0..100 {
        messages.push(json!({"role": "user", "content": format!("Step {i}: note that order {i} ships {} boxes to warehouse {} on day {}, and remember it for later questions.", i * 3 + 1, i % 7, i + 1)}));
        messages.push(json!({"role": "assistant", "content": format!("Noted: order {i}, {} boxes, warehouse {}, day {}.", i * 3 + 1, i % 7, i + 1)}));
    }
    messages.push(json!({"role": "user", "content": "How many boxes does order 69 ship?"}));
    let r = http
        .send(
            Method::POST,
            &format!("{ollama_url}/api/chat"),
            json!({"model": "llama3.2", "messages": messages, "stream": false}),
        )
        .await?;
    let compacted = r
        .headers
        .get(llm_warden::proxy::COMPACTED_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("not compacted");
    step(t0, &format!(
        "ollama  llama3.2 201-message conversation over its 4096-token window -> {}; compacted {compacted} tokens (older turns summarized)",
        r.status
    ));

    // 6. The idle model goes once its timeout passes.
    let deadline = Instant::now() + IDLE + Duration::from_secs(10);
    loop {
        let s = crate::admin_client::call(Method::GET, &format!("{admin_url}/status"), None)
            .await?
            .1;
        let m = model(&s, "ollama", "nomic-embed-text:latest");
        if m["status"] == "unloaded" || Instant::now() > deadline {
            step(
                t0,
                &format!(
                    "ollama  nomic-embed-text is {} after {}s without requests",
                    m["status"].as_str().unwrap_or("?"),
                    IDLE.as_secs()
                ),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let s = crate::admin_client::call(Method::GET, &format!("{admin_url}/status"), None)
        .await?
        .1;
    println!("\n{}", crate::admin_client::render_status(&s));
    println!("Dashboard:  {admin_url}/");
    println!("Status:     {admin_url}/status   (or: llm-warden status --admin {admin_url})");
    println!("Try:        curl {ollama_url}/api/chat -d '{{\"model\":\"qwen2.5:7b\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
    if !args.no_wait {
        println!("\nRunning until Ctrl-C.");
        crate::cli::shutdown_signal().await;
    }
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
    drop((sim_ollama, sim_lmstudio));
    Ok(())
}
