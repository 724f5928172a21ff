//! Run with: `cargo run --release --example ctxbench` (flags after `--`, e.g. `-- --requests 400`).
//!
//! What the context stage costs on an intercepted chat request with a long history (the issue's
//! 32k-token chat). Everything runs in this process: a simulated Ollama (replies of one token,
//! no delays) and llm-warden in front of it. Requests go one at a time, alternating direct and
//! through the proxy, and the medians are compared:
//!
//! - `fits`: the window (`num_ctx` 131072) holds the conversation: the proxy counts it (it is
//!   too large for the byte bound to skip counting), finds that it fits, and forwards it
//!   unchanged;
//! - `cold`: the same, but every proxied request is a conversation the proxy has never seen,
//!   so every message is tokenized (in the steady state of a chat only the new turns are:
//!   counts are remembered per message);
//! - `cached`: the window is 16384 tokens: the proxy compacts every request, and after the
//!   first one the summary comes from the cache (no summarizer call), so what is measured is
//!   counting, planning, the cache lookup and the rewrite. The direct side sends the same
//!   (uncompacted) body, so the proxy's row also carries the smaller prompt's savings at the
//!   simulator: read its added time as an upper bound of the proxy's own work.
//!
//! The proxy's added p50 is proxy p50 − direct p50. Target (issue): ≤ 2 ms for `fits`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use llm_warden_sim::ollama::{self, OllamaConfig};
use serde_json::json;
use tokio::net::TcpListener;

#[path = "common/mod.rs"]
mod common;

#[derive(Parser, Debug)]
#[command(about = "added latency of the context stage on a long chat")]
struct Args {
    /// Requests per side and scenario.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Approximate tokens of the conversation (about 4 bytes each).
    #[arg(long, default_value_t = 32_000)]
    tokens: usize,
}

use common::HttpClient;

fn main() {
    common::main_with("ctxbench", run(Args::parse()));
}

/// A system message and user/assistant turns of ~100 tokens, about `tokens` in all; `tag`
/// makes every message different from other conversations'.
fn conversation(tokens: usize, tag: usize) -> serde_json::Value {
    let mut m = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    let turn = "Tell me more about the history of the river and the bridges built across it over the centuries, the floods, the trade it carried, and how the city grew along both banks. ";
    let per_turn = turn.len() / 4;
    for i in 0..tokens / per_turn {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        m.push(json!({"role": role, "content": format!("{tag}.{i}: {turn}")}));
    }
    m.push(json!({"role": "user", "content": "Sum it up."}));
    serde_json::Value::Array(m)
}

async fn post(client: &HttpClient, url: &str, body: &Bytes) -> Result<(Duration, bool), String> {
    let req = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let compacted = resp.headers().contains_key("x-llm-warden-compacted");
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{url}: {status}"));
    }
    Ok((t0.elapsed(), compacted))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn scenario(args: &Args, name: &str, num_ctx: u32, cold: bool) -> Result<(), String> {
    let sim = ollama::spawn(
        OllamaConfig {
            default_num_ctx: num_ctx,
            reply_tokens: 1,
            fixed_reply: Some("SUMMARY: a long talk about a river and its city.".into()),
            ..Default::default()
        },
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?,
    );
    let cache = std::env::temp_dir().join(format!("ctxbench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nname = \"ollama\"\nkind = \"ollama\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n[compaction]\ncache_dir = \"{}\"\n",
        sim.url(),
        cache.display()
    );
    let (proxy, client) = common::start_proxy(&toml).await?;
    let make = |tag: usize| {
        Bytes::from(
            json!({"model": "llama3.2", "messages": conversation(args.tokens, tag), "stream": false})
                .to_string(),
        )
    };
    let body = make(0);
    // Cold: every proxied request is a conversation never seen (nothing counted yet).
    let fresh: Vec<Bytes> = if cold {
        (1..=args.requests).map(make).collect()
    } else {
        Vec::new()
    };
    let direct = format!("{}/api/chat", sim.url());
    let through = format!("http://{}/api/chat", proxy.proxy_addr(0));
    // Warm up: loads, the first (uncached) summary, connections.
    for _ in 0..3 {
        post(&client, &direct, &body).await?;
        post(&client, &through, &body).await?;
    }
    let (mut d, mut p) = (Vec::new(), Vec::new());
    let mut compacted = 0;
    for i in 0..args.requests * 2 {
        if (i / 2) % 2 == i % 2 {
            d.push(post(&client, &direct, &body).await?.0);
        } else {
            let b = fresh.get(p.len()).unwrap_or(&body);
            let (t, c) = post(&client, &through, b).await?;
            p.push(t);
            compacted += usize::from(c);
        }
    }
    let (dm, pm) = (median(&mut d), median(&mut p));
    println!(
        "{name:<8} {:>6} KB  direct p50 {:>8.3} ms  proxy p50 {:>8.3} ms  added {:>7.3} ms  compacted {compacted}/{}",
        body.len() / 1024,
        dm.as_secs_f64() * 1e3,
        pm.as_secs_f64() * 1e3,
        (pm.as_secs_f64() - dm.as_secs_f64()) * 1e3,
        p.len()
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    println!(
        "ctxbench: a ~{}-token chat, {} requests per side, one at a time",
        args.tokens, args.requests
    );
    scenario(&args, "fits", 131_072, false).await?;
    scenario(&args, "cold", 131_072, true).await?;
    scenario(&args, "cached", 16_384, false).await?;
    Ok(())
}
