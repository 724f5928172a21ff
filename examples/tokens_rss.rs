//! Run with: `cargo run --release --example tokens_rss` (Linux; reads /proc/self/status).
//! Pass encodings to load them in another order: `-- o200k cl100k`.
//!
//! What loading each BPE table costs: the time of the first count (which builds the table)
//! and the process's resident memory (VmRSS) and peak (VmHWM) before and after. Each load is
//! a process-wide singleton, so a second count in the same encoding costs nothing more.

use std::time::Instant;

use llm_warden::tokens::{Encoding, TokenCounter};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let order = match args
        .iter()
        .map(|a| Encoding::parse(a))
        .collect::<Option<Vec<_>>>()
    {
        Some(order) if !order.is_empty() => order,
        Some(_) => vec![Encoding::Cl100k, Encoding::O200k],
        None => {
            eprintln!("usage: tokens_rss [cl100k|o200k]...");
            std::process::exit(2);
        }
    };
    let counter = TokenCounter::new();
    let (mut rss, hwm) = memory_kib();
    println!("start: rss {} MiB, peak {} MiB", mib(rss), mib(hwm));
    for enc in order {
        let started = Instant::now();
        let tokens = counter.count_text(enc, "hello world");
        let took = started.elapsed();
        let (now, hwm) = memory_kib();
        println!(
            "{enc}: first count ({tokens} tokens) took {took:.0?}; rss {} MiB (+{} MiB), peak {} MiB",
            mib(now),
            mib(now.saturating_sub(rss)),
            mib(hwm),
        );
        rss = now;
        let started = Instant::now();
        counter.count_text(enc, "hello again");
        println!("{enc}: second count took {:.0?}", started.elapsed());
    }
}

/// (VmRSS, VmHWM) in KiB, 0 where unreadable.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
