//! The client commands of the CLI (`status`, `load`, `unload`): talk to a running proxy's
//! admin listener. Where it is: `--admin URL`, else the config's `[admin] listen` (`--config`
//! or `$LLM_WARDEN_CONFIG`), else `127.0.0.1:11400`.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Where the admin listener is.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The admin listener's URL, e.g. http://127.0.0.1:11400 [default: the config's [admin]
    /// listen, else http://127.0.0.1:11400]
    #[arg(long, env = "LLM_WARDEN_ADMIN")]
    pub admin: Option<String>,
    /// Config file to read [admin] listen from [default: $LLM_WARDEN_CONFIG]
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The admin token (the proxy's [admin] token), sent as `Authorization: Bearer`
    #[arg(long, env = "LLM_WARDEN_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The admin listener's default address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:11400";
const TIMEOUT: Duration = Duration::from_secs(30);

impl AdminArgs {
    /// The base URL: `--admin`, else the config's, else the default.
    pub fn base_url(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.admin {
            let a = a.trim_end_matches('/');
            return Ok(if a.contains("://") {
                a.to_string()
            } else {
                format!("http://{a}")
            });
        }
        let from_file = self.config.is_some()
            || std::env::var_os(llm_warden::config::CONFIG_ENV).is_some_and(|v| !v.is_empty());
        if from_file {
            let (config, _) = llm_warden::config::load(self.config.as_deref())?;
            return Ok(format!("http://{}", config.admin.listen));
        }
        Ok(format!("http://{DEFAULT_ADMIN}"))
    }
}

/// One request to the admin API (with the token, if given, as a bearer token): the status
/// and the JSON answer.
pub async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<(StatusCode, Value)> {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("{url}: {e} (is llm-warden running? see --admin)"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("{url}: the answer is not JSON ({e})"))?;
    Ok((status, v))
}

/// `llm-warden status`: the models as a table, or the whole `/status` as JSON.
pub async fn status(args: &AdminArgs, json: bool) -> anyhow::Result<()> {
    let url = format!("{}/status", args.base_url()?);
    let (code, v) = call(Method::GET, &url, args.token.as_deref()).await?;
    if !code.is_success() {
        anyhow::bail!("{url}: {code}: {v}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render_status(&v));
    }
    Ok(())
}

/// `llm-warden load|unload PROVIDER MODEL`.
pub async fn model_action(
    args: &AdminArgs,
    action: &str,
    provider: &str,
    model: &str,
) -> anyhow::Result<()> {
    let url = format!(
        "{}/models/{}/{}/{action}",
        args.base_url()?,
        encode(provider),
        encode(model)
    );
    let (code, v) = call(Method::POST, &url, args.token.as_deref()).await?;
    if !code.is_success() {
        let why = v["error"].as_str().unwrap_or("failed");
        if code == StatusCode::UNAUTHORIZED {
            anyhow::bail!("{action} {provider}/{model}: {code}: {why}; pass the token with --token or $LLM_WARDEN_ADMIN_TOKEN");
        }
        anyhow::bail!("{action} {provider}/{model}: {code}: {why}");
    }
    let m = &v["model"];
    println!(
        "{provider}/{}: {}{}",
        m["model"].as_str().unwrap_or(model),
        m["status"].as_str().unwrap_or("?"),
        m["load_time_ms"]
            .as_u64()
            .filter(|_| action == "load")
            .map(|ms| format!(" (loaded in {ms} ms)"))
            .unwrap_or_default()
    );
    Ok(())
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `/status` answer as a plain table: the machine, then one row per model.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    let sys = &v["system"];
    if let Some(total) = sys["total_memory_mb"].as_u64() {
        out.push_str(&format!(
            "memory {} / {} MB used, pressure {} ({})\n",
            sys["used_memory_mb"].as_u64().unwrap_or(0),
            total,
            sys["memory_pressure"]
                .as_f64()
                .map(|p| format!("{:.0}%", p * 100.0))
                .unwrap_or_else(|| "?".into()),
            sys["pressure_level"].as_str().unwrap_or("?"),
        ));
    }
    for g in sys["gpu_memory"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "gpu {} {} / {} MB used\n",
            g["index"].as_u64().unwrap_or(0),
            g["used_mb"].as_u64().unwrap_or(0),
            g["total_mb"].as_u64().unwrap_or(0)
        ));
    }
    for p in v["providers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "provider {} ({}) {} -> {} {}\n",
            p["name"].as_str().unwrap_or("?"),
            p["kind"].as_str().unwrap_or("?"),
            p["listen"].as_str().unwrap_or("?"),
            p["upstream"].as_str().unwrap_or("?"),
            if p["reachable"] == true {
                "up"
            } else {
                "unreachable"
            }
        ));
    }
    let header = [
        "PROVIDER",
        "MODEL",
        "STATE",
        "ACTIVE",
        "QUEUE",
        "REQUESTS",
        "ERRORS",
        "TOKENS IN/OUT",
        "CONTEXT",
        "MEMORY MB",
        "LAST USED",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for m in v["models"].as_array().into_iter().flatten() {
        let n = |k: &str| {
            m[k].as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        };
        // Tokens in context as the proxy counts them: what the provider reported for the
        // latest request (prompt + reply), else the estimate of the latest prompt.
        let in_context = m["context_tokens_reported"]
            .as_u64()
            .or_else(|| m["context_tokens_estimated"].as_u64());
        let context = match (in_context, m["context_length"].as_u64()) {
            (Some(t), Some(w)) => format!("{t}/{w}"),
            (None, Some(w)) => format!("-/{w}"),
            _ => "-".into(),
        };
        rows.push(vec![
            m["provider"].as_str().unwrap_or("?").into(),
            m["model"].as_str().unwrap_or("?").into(),
            m["status"].as_str().unwrap_or("-").into(),
            n("active_requests"),
            n("queue_depth"),
            n("total_requests"),
            n("errors"),
            format!("{}/{}", n("prompt_tokens"), n("completion_tokens")),
            context,
            m["memory"]["allocated_mb"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            m["last_used"].as_str().unwrap_or("never").into(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.len() == 1 {
        out.push_str("(no models seen yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_table_has_a_row_per_model() {
        let v = json!({
            "system": {"total_memory_mb": 24000, "used_memory_mb": 12000, "memory_pressure": 0.5, "pressure_level": "normal"},
            "providers": [{"name": "ollama", "kind": "ollama", "listen": "127.0.0.1:11435", "upstream": "http://127.0.0.1:11434", "reachable": true}],
            "models": [{"provider": "ollama", "model": "llama3.2:latest", "status": "ready", "active_requests": 1,
                        "queue_depth": 0, "total_requests": 7, "errors": 0, "prompt_tokens": 70, "completion_tokens": 56,
                        "context_tokens_estimated": 900, "context_length": 4096, "memory": {"allocated_mb": 2374},
                        "last_used": "2026-11-26T16:39:39.756Z"}]
        });
        let t = render_status(&v);
        assert!(
            t.contains("memory 12000 / 24000 MB used, pressure 50% (normal)"),
            "{t}"
        );
        let row = t
            .lines()
            .find(|l| l.starts_with("ollama  "))
            .expect("a model row");
        for cell in ["llama3.2:latest", "ready", "70/56", "900/4096", "2374"] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert!(render_status(&json!({"models": []})).contains("no models seen yet"));
    }

    #[test]
    fn context_column_shows_the_reported_tokens() {
        let model = |extra: serde_json::Value| {
            let mut m = json!({"provider": "ollama", "model": "m", "status": "ready", "context_length": 4096});
            if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
                m.extend(extra.clone());
            }
            let t = render_status(&json!({ "models": [m] }));
            t.lines()
                .find(|l| l.starts_with("ollama  "))
                .expect("a model row")
                .to_string()
        };
        let reported = model(json!({"context_tokens_reported": 120}));
        assert!(reported.contains(" 120/4096 "), "{reported}");
        let both = model(json!({"context_tokens_reported": 120, "context_tokens_estimated": 900}));
        assert!(
            both.contains(" 120/4096 "),
            "the provider's count wins: {both}"
        );
        let none = model(json!({}));
        assert!(none.contains(" -/4096 "), "{none}");
    }

    #[test]
    fn admin_url_from_flag_or_default() {
        let a = AdminArgs {
            admin: Some("127.0.0.1:9/".into()),
            config: None,
            token: None,
        };
        assert_eq!(a.base_url().unwrap(), "http://127.0.0.1:9");
        assert_eq!(encode("hf.co/x/y:q4"), "hf.co%2Fx%2Fy:q4");
    }
}
