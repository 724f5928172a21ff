//! What the examples share (included with `#[path = "common/mod.rs"] mod common;`; Cargo
//! does not build this folder as an example of its own). Each example uses part of it.
#![allow(dead_code)]

use std::future::Future;

/// SplitMix64: a tiny seeded PRNG, the same sequence on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Runs `run` on a multi-threaded runtime; an error is printed as `<name>: <error>` and the
/// process exits with 2.
pub fn main_with<T, F: Future<Output = Result<T, String>>>(name: &str, run: F) -> T {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(2);
        }
    };
    match rt.block_on(run) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(2);
        }
    }
}

/// The examples' HTTP client: plain HTTP/1, pooled.
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// Starts llm-warden in this process from `toml`, and a client for it.
pub async fn start_proxy(toml: &str) -> Result<(llm_warden::app::Running, HttpClient), String> {
    let cfg = llm_warden::config::load_str(toml).map_err(|e| e.to_string())?;
    let proxy = llm_warden::app::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    Ok((proxy, client))
}
