//! Context compaction end to end: a conversation longer than the model's window is rewritten
//! before it reaches the simulated Ollama (its window is 4096 tokens here), and the client is
//! told in a header. The simulator's summarizer answers a fixed text, so every byte of the
//! rewritten request is known.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::support::*;
use llm_warden::context::summarize::PROMPT;
use llm_warden_sim::ollama::OllamaConfig;
use llm_warden_sim::{ollama::OllamaSim, SimServer};
use serde_json::{json, Value};

const SUMMARY: &str =
    "SUMMARY: the user asked about turns one to many and the assistant answered each.";
const SYSTEM: &str = "You are a careful assistant. Answer in English.";

fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "llm-warden-compaction-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn sim() -> SimServer<OllamaSim> {
    sim_with_window(4096).await
}

async fn sim_with_window(num_ctx: u32) -> SimServer<OllamaSim> {
    start_ollama(OllamaConfig {
        default_num_ctx: num_ctx,
        fixed_reply: Some(SUMMARY.to_string()),
        ..Default::default()
    })
    .await
}

/// A simulated Ollama (window 4096), the proxy in front of it with its summary cache in a
/// fresh directory, and a client.
struct Rig {
    sim: SimServer<OllamaSim>,
    proxy: llm_warden::app::Running,
    cache: PathBuf,
    c: TestClient,
}

impl Rig {
    async fn start(tag: &str, extra: &str) -> Rig {
        Rig::with(sim().await, tag, extra).await
    }

    async fn with(sim: SimServer<OllamaSim>, tag: &str, extra: &str) -> Rig {
        let cache = tempdir(tag);
        let proxy = start_proxy(&[("ollama", sim.url())], &config(&cache, extra)).await;
        Rig {
            sim,
            proxy,
            cache,
            c: client(),
        }
    }
}

/// `POST /api/chat` through the proxy.
async fn chat_via(c: &TestClient, proxy: &llm_warden::app::Running, messages: &[Value]) -> Reply {
    post_json(
        c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        &chat(messages),
    )
    .await
}

fn config(cache: &std::path::Path, extra: &str) -> String {
    format!(
        "[compaction]\ncache_dir = \"{}\"\nreply_reserve = 256\n{extra}",
        cache.display()
    )
}

/// A system message and `turns` user/assistant messages of ~90 tokens each, ending with a user.
fn conversation(turns: usize) -> Vec<Value> {
    let mut m = vec![json!({"role": "system", "content": SYSTEM})];
    for i in 0..turns {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let filler = "the quick brown fox jumps over the lazy dog while it rains ".repeat(7);
        m.push(json!({"role": role, "content": format!("turn {i}: {filler}")}));
    }
    if turns.is_multiple_of(2) {
        m.push(json!({"role": "user", "content": "and finally, what did we say first?"}));
    }
    m
}

fn chat(messages: &[Value]) -> String {
    json!({"model": "llama3.2", "messages": messages, "stream": false}).to_string()
}

/// The `x-llm-warden-compacted` header of a reply, and its `before->after` tokens.
fn compacted(r: &Reply) -> (String, u64, u64) {
    let header = r.headers["x-llm-warden-compacted"]
        .to_str()
        .unwrap()
        .to_string();
    let (before, after) = header.split_once("->").unwrap();
    let (before, after) = (before.parse().unwrap(), after.parse().unwrap());
    (header, before, after)
}

/// The chat requests that reached the simulator: the summarizer's and the others.
fn upstream_chats(sim: &SimServer<OllamaSim>) -> (Vec<Value>, Vec<Value>) {
    let chats: Vec<Value> = sim
        .state
        .log
        .calls()
        .into_iter()
        .filter(|c| c.path == "/api/chat")
        .map(|c| c.json())
        .collect();
    chats
        .into_iter()
        .partition(|c| c["messages"][0]["content"] == PROMPT)
}

#[tokio::test]
async fn a_long_conversation_is_summarized_to_fit_and_the_client_is_told() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("fit", "").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let messages = conversation(40);
    let r = post_json(&c, &url, &chat(&messages)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (header, before, after) = compacted(&r);
    // The budget: 0.9 × 4096 − 256 for the reply.
    assert!(before > 3430 && after <= 3430, "{header}");
    // The provider got the prompt whole: its own count is within the window.
    assert!(r.json()["prompt_eval_count"].as_u64().unwrap() < 4096);

    let (summarizer, forwarded) = upstream_chats(&sim);
    assert_eq!(summarizer.len(), 1, "one summarizer call");
    assert_eq!(forwarded.len(), 1);
    // Byte for byte: the system message and the last turn as the client wrote them.
    let raw = sim
        .state
        .log
        .calls()
        .into_iter()
        .filter(|c| c.path == "/api/chat")
        .map(|c| String::from_utf8(c.body.to_vec()).unwrap())
        .find(|b| !b.contains(PROMPT))
        .unwrap();
    for m in [&messages[0], messages.last().unwrap()] {
        assert!(raw.contains(&m.to_string()), "{m} verbatim");
    }
    let sent = forwarded[0]["messages"].as_array().unwrap();
    assert_eq!(sent[0], messages[0], "the system message, verbatim");
    assert_eq!(sent[1]["role"], "system");
    let summary = sent[1]["content"].as_str().unwrap();
    assert!(summary.contains(SUMMARY), "{summary}");
    assert_eq!(sent.last(), messages.last(), "the last turn, verbatim");
    // Every summarized message reached the summarizer; the kept ones are the newest, in order.
    let kept = sent.len() - 2;
    let evicted = &messages[1..messages.len() - kept];
    let transcript = summarizer[0]["messages"][1]["content"].as_str().unwrap();
    for m in evicted {
        assert!(
            transcript.contains(m["content"].as_str().unwrap()),
            "{m} reached the summarizer"
        );
    }
    assert_eq!(&sent[2..], &messages[messages.len() - kept..]);
    // /status tells the same story.
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(m["compactions"], 1, "{m}");
    assert_eq!(m["tokens_saved"], before - after);
    let e = &s["compaction"]["events"][0];
    assert_eq!(
        (e["action"].as_str(), e["summarizer_calls"].as_u64()),
        (Some("summarized"), Some(1)),
        "{e}"
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn the_next_turn_and_a_restarted_proxy_reuse_the_summary() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("reuse", "").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let mut messages = conversation(40);
    let r = post_json(&c, &url, &chat(&messages)).await;
    assert_eq!(r.status, 200);
    // The next turn: the reply and a new question.
    messages.push(json!({"role": "assistant", "content": "turn 40 was about the fox."}));
    messages.push(json!({"role": "user", "content": "thanks; and the dog?"}));
    let r = post_json(&c, &url, &chat(&messages)).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    let (summarizer, forwarded) = upstream_chats(&sim);
    assert_eq!(
        summarizer.len(),
        1,
        "the summary of the unchanged prefix was reused"
    );
    assert_eq!(
        forwarded[1]["messages"].as_array().unwrap().last(),
        messages.last()
    );
    let s = status(&c, &proxy).await;
    let ratio = model_entry(&s, "ollama0", "llama3.2:latest")["token_ratio"].clone();
    assert!(ratio.as_f64().is_some(), "a ratio was learned");
    proxy.shutdown().await;

    // A new proxy on the same cache directory: no summarizer call at all, and the learned
    // token ratio comes back (the model is still loaded, so it is listed at once).
    let proxy = start_proxy(&[("ollama", sim.url())], &config(&cache, "")).await;
    let s = status(&c, &proxy).await;
    assert_eq!(
        model_entry(&s, "ollama0", "llama3.2:latest")["token_ratio"],
        ratio
    );
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let r = post_json(&c, &url, &chat(&messages)).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    let (summarizer, _) = upstream_chats(&sim);
    assert_eq!(summarizer.len(), 1, "the summary came from disk");
    let s = status(&c, &proxy).await;
    assert_eq!(
        s["compaction"]["summary_cache"]["disk_hits"], 1,
        "{}",
        s["compaction"]
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn reject_answers_400_in_the_clients_format() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("reject", "on_overflow = \"reject\"\n").await;
    let base = format!("http://{}", proxy.proxy_addr(0));
    let messages = conversation(40);
    let r = post_json(&c, &format!("{base}/api/chat"), &chat(&messages)).await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("maximum context length is 4096 tokens"),
        "{msg}"
    );
    let r = post_json(&c, &format!("{base}/v1/chat/completions"), &chat(&messages)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let (summarizer, forwarded) = upstream_chats(&sim);
    assert!(
        summarizer.is_empty() && forwarded.is_empty(),
        "nothing was forwarded"
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// Issue 18 §8: a conversation the provider would refuse (an entry that is not a message)
/// goes on unchanged for the provider's own 400, however long it is; compacting it would
/// have dropped the bad entry and made the provider's "no" a "yes".
#[tokio::test]
async fn a_conversation_the_provider_would_refuse_is_not_compacted_into_one_it_accepts() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("refuse", "on_overflow = \"truncate_oldest\"\n").await;
    for bad in [
        json!(null),
        json!(42),
        json!("hi"),
        json!({"role": 7, "content": "x"}),
    ] {
        let mut messages = conversation(40);
        messages.insert(2, bad.clone());
        let r = chat_via(&c, &proxy, &messages).await;
        assert!(!r.headers.contains_key("x-llm-warden-compacted"), "{bad}");
        let (_, forwarded) = upstream_chats(&sim);
        let sent = &forwarded.last().unwrap()["messages"];
        assert_eq!(
            sent.as_array().unwrap().len(),
            messages.len(),
            "{bad}: unchanged"
        );
        assert_eq!(sent[2], bad);
        // The simulator answers as Ollama does: a 400 for a body it cannot decode.
        if !bad.is_null() {
            assert_eq!(r.status, 400, "{bad}: {}", r.text());
        }
    }
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn truncate_oldest_drops_turns_without_a_summary() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("truncate", "on_overflow = \"truncate_oldest\"\n").await;
    let messages = conversation(40);
    let r = chat_via(&c, &proxy, &messages).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    let (summarizer, forwarded) = upstream_chats(&sim);
    assert!(summarizer.is_empty());
    let sent = forwarded[0]["messages"].as_array().unwrap();
    assert_eq!(sent[0], messages[0]);
    assert_eq!(&sent[1..], &messages[messages.len() - (sent.len() - 1)..]);
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_summarizer_that_is_down_falls_back_to_truncation_loudly() {
    let sim = sim().await;
    let cache = tempdir("down");
    // The summarizer is a provider nobody listens on.
    let mut toml = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
    toml.push_str(&format!(
        "[[providers]]\nname = \"ollama0\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        sim.url()
    ));
    toml.push_str("[[providers]]\nname = \"gone\"\nkind = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n");
    toml.push_str(&config(&cache, "summarizer_provider = \"gone\"\n"));
    let proxy = llm_warden::app::start(llm_warden::config::load_str(&toml).unwrap())
        .await
        .unwrap();
    let c = client();
    let messages = conversation(40);
    let r = chat_via(&c, &proxy, &messages).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    let (_, forwarded) = upstream_chats(&sim);
    let sent = forwarded[0]["messages"].as_array().unwrap();
    assert!(sent
        .iter()
        .all(|m| !m["content"].as_str().unwrap_or("").contains("SUMMARY")));
    let s = status(&c, &proxy).await;
    let e = &s["compaction"]["events"][0];
    assert_eq!(e["action"], "truncated", "{e}");
    assert!(e["failure"].as_str().unwrap().contains("summarizer"), "{e}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_different_num_ctx_is_normalized_instead_of_reloading_the_model() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("numctx", "").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let r = post_json(&c, &url, &chat(&conversation(1))).await;
    assert_eq!(r.status, 200);
    proxy.refresh(0).await;
    // A client (aider, paperless-ai...) asks for another num_ctx on a small prompt.
    let body = json!({"model": "llama3.2", "messages": conversation(1), "stream": false,
                      "options": {"temperature": 0, "num_ctx": 8192}})
    .to_string();
    let r = post_json(&c, &url, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-llm-warden-num-ctx"], "8192->4096");
    assert_eq!(sim.state.load_count("llama3.2:latest"), 1, "no reload");
    let (_, forwarded) = upstream_chats(&sim);
    assert_eq!(
        forwarded[1]["options"],
        json!({"temperature": 0, "num_ctx": 4096})
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// Issue 17's first bug: right after the proxy's own load, before any poll has listed the
/// model, a request with another `num_ctx` must be normalized to the window the load
/// answered with, not forwarded (Ollama would reload the model). Clients such as aider send
/// exactly this: a first chat without options, then one with `num_ctx`.
#[tokio::test]
async fn num_ctx_is_normalized_right_after_the_proxys_own_load() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::with(sim_with_window(512).await, "numctx-load", "").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let short = [json!({"role": "user", "content": "hi"})];
    let r = post_json(&c, &url, &chat(&short)).await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.state.load_count("llama3.2:latest"), 1);
    for _ in 0..2 {
        let body = json!({"model": "llama3.2", "messages": short, "stream": false,
                          "options": {"num_ctx": 2048}})
        .to_string();
        let r = post_json(&c, &url, &body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-llm-warden-num-ctx"], "2048->512");
    }
    assert_eq!(sim.state.load_count("llama3.2:latest"), 1, "no reload");
    let (_, forwarded) = upstream_chats(&sim);
    assert_eq!(forwarded[1]["options"], json!({"num_ctx": 512}));
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn streams_and_lm_studio_are_compacted_too_and_the_token_ratio_is_learned() {
    let ollama = sim().await;
    let lmstudio = start_lmstudio(llm_warden_sim::lmstudio::LmStudioConfig {
        default_context_length: 4096,
        ..Default::default()
    })
    .await;
    let cache = tempdir("stream");
    let proxy = start_proxy(
        &[("ollama", ollama.url()), ("lmstudio", lmstudio.url())],
        &config(&cache, ""),
    )
    .await;
    let c = client();
    let messages = conversation(40);
    let body = json!({"model": "llama3.2", "messages": messages, "stream": true}).to_string();
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    let last: Value = serde_json::from_str(r.text().lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true, "a whole NDJSON stream");

    let body =
        json!({"model": "qwen2.5-7b-instruct", "messages": messages, "stream": true}).to_string();
    let r = post_json(
        &c,
        &format!("http://{}/v1/chat/completions", proxy.proxy_addr(1)),
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    assert!(r.text().ends_with("data: [DONE]\n\n"));
    let summarizer = lmstudio
        .state
        .log
        .calls()
        .into_iter()
        .filter(|c| c.path == "/v1/chat/completions")
        .map(|c| c.json())
        .filter(|c| c["messages"][0]["content"] == PROMPT)
        .count();
    assert_eq!(summarizer, 1, "LM Studio's own model summarized");

    // The streams reported their prompt tokens: the estimate's ratio to them is learned.
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    let ratio = m["token_ratio"].as_f64().expect("a learned ratio");
    assert!(ratio > 0.25 && ratio < 4.0, "{m}");
    assert!(m["context_tokens_reported"].as_u64().unwrap() > 0, "{m}");
    assert!(m["context_tokens_estimated"].as_u64().unwrap() > 0, "{m}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_summarizer_with_a_small_window_reads_the_history_in_pieces() {
    // Window 2048 and summaries of up to 512 tokens: the summarizer can read ~770 tokens of
    // transcript at a time, less than what must be summarized.
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::with(sim_with_window(2048).await, "pieces", "").await;
    let messages = conversation(40);
    let r = chat_via(&c, &proxy, &messages).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    let (summarizer, forwarded) = upstream_chats(&sim);
    assert!(summarizer.len() >= 2, "{} calls", summarizer.len());
    let transcripts: Vec<&str> = summarizer
        .iter()
        .map(|c| c["messages"][1]["content"].as_str().unwrap())
        .collect();
    assert!(!transcripts[0].starts_with("Summary of the conversation so far"));
    for t in &transcripts[1..] {
        // Each piece carries the previous piece's summary.
        assert!(
            t.starts_with(&format!("Summary of the conversation so far:\n{SUMMARY}")),
            "{t}"
        );
    }
    let sent = forwarded[0]["messages"].as_array().unwrap();
    let kept = sent.len() - 2;
    for m in &messages[1..messages.len() - kept] {
        let text = m["content"].as_str().unwrap();
        assert_eq!(
            transcripts.iter().filter(|t| t.contains(text)).count(),
            1,
            "{text} reached exactly one piece"
        );
    }
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_num_ctx_above_buffers_context_max_is_capped() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("cap", "[buffers.context]\nmax = 8192\n").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    assert_eq!(
        post_json(&c, &url, &chat(&conversation(1))).await.status,
        200
    );
    proxy.refresh(0).await;
    // Too long for the loaded 4096 (so not normalized to it), and asking for 65536.
    let body = json!({"model": "llama3.2", "messages": conversation(50), "stream": false,
                      "options": {"num_ctx": 65536}})
    .to_string();
    let r = post_json(&c, &url, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-llm-warden-num-ctx"], "65536->8192");
    assert!(
        !r.headers.contains_key("x-llm-warden-compacted"),
        "it fits 8192 as it is"
    );
    let (_, forwarded) = upstream_chats(&sim);
    assert_eq!(
        forwarded.last().unwrap()["options"],
        json!({"num_ctx": 8192})
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_small_window_is_summarized_not_refused() {
    // Issue 19 §1: window 512, a 24-word system prompt, 40 turns of ~25 words, a 9-word
    // question. The prompt budget is 0.9 × 512 − 128 (the reply's room, at most a quarter of
    // the window) = 332 tokens, less than the 512 of `summary_max_tokens`: the summary gets
    // what the system message and the last turn leave, instead of the request being refused.
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::with(sim_with_window(512).await, "small", "").await;
    let system = "You are a careful assistant for a small team. Answer briefly, in plain English, \
                  and say so when you do not know the answer to a question.";
    let mut messages = vec![json!({"role": "system", "content": system})];
    for i in 0..40 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let text = format!(
            "turn {i}: {}",
            "we talked about the build and the tests again ".repeat(3)
        );
        messages.push(json!({"role": role, "content": text}));
    }
    messages.push(json!({"role": "user", "content": "so what did we decide about the tests?"}));
    let r = chat_via(&c, &proxy, &messages).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (header, before, after) = compacted(&r);
    assert!(before > 332 && after <= 332, "{header}");
    let (summarizer, forwarded) = upstream_chats(&sim);
    // The summarizer (the same model, window 512) reads the history in pieces.
    assert!(!summarizer.is_empty());
    // Each call asks for no more than the room left, not the full 512, and fits the
    // summarizer's window whole (instructions, transcript and reply; by the simulator's
    // count, with 4 tokens a message for the template), so no provider has to cut it.
    for call in &summarizer {
        let asked = call["options"]["num_predict"].as_u64().unwrap();
        assert!(asked < 332, "num_predict {asked}");
        let prompt: u64 = call["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                u64::from(llm_warden_sim::common::count_tokens(
                    m["content"].as_str().unwrap(),
                )) + 4
            })
            .sum();
        assert!(prompt + asked <= 512, "prompt {prompt} + reply {asked}");
    }
    let sent = forwarded[0]["messages"].as_array().unwrap();
    assert_eq!(sent[0], messages[0], "the system message, verbatim");
    assert_eq!(sent.last(), messages.last(), "the last turn, verbatim");
    assert!(sent[1]["content"].as_str().unwrap().contains(SUMMARY));
    // The same request again: the summary comes from the cache, no second call.
    let r = chat_via(&c, &proxy, &messages).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        upstream_chats(&sim).0.len(),
        summarizer.len(),
        "a cache hit"
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// A source file of about 6 KB, as a `read_file` tool prints it.
fn source_file() -> String {
    (0..120)
        .map(|i| format!("    let value_{i} = compute(input, {i}); // step {i} of the parser\n"))
        .collect()
}

/// An agent's tool loop: the same file read three times, then the user's next request.
/// Written as raw JSON (the bytes the client sends), with the tool results' keys in the
/// client's own order and spacing.
fn tool_loop_raw() -> Vec<String> {
    let file = serde_json::to_string(&source_file()).unwrap();
    let call = |id: &str| {
        format!(
            r#"{{"role":"assistant","content":"","tool_calls":[{{"id":"{id}","type":"function","function":{{"name":"read_file","arguments":{{"path":"src/parser.rs"}}}}}}]}}"#
        )
    };
    let result = |id: &str, content: &str| {
        format!(r#"{{"role": "tool", "content": {content}, "tool_call_id": "{id}"}}"#)
    };
    vec![
        format!(r#"{{"role":"system","content":"{SYSTEM}"}}"#),
        r#"{"role":"user","content":"The parser fails on empty input. Find out why."}"#.into(),
        call("c1"),
        result("c1", &file),
        call("c2"),
        result("c2", &file),
        call("c3"),
        result("c3", &file),
        r#"{"role":"assistant","content":"Step 0 does not check for empty input."}"#.into(),
        r#"{"role":"user","content":"Fix it."}"#.into(),
    ]
}

fn raw_chat(messages: &[String]) -> String {
    format!(
        r#"{{"model":"llama3.2","messages":[{}],"stream":false}}"#,
        messages.join(",")
    )
}

/// The body of the one chat request that reached the simulator and is not the summarizer's.
fn forwarded_raw(sim: &SimServer<OllamaSim>) -> Vec<String> {
    sim.state
        .log
        .calls()
        .into_iter()
        .filter(|c| c.path == "/api/chat")
        .map(|c| String::from_utf8(c.body.to_vec()).unwrap())
        .filter(|b| !b.contains(PROMPT))
        .collect()
}

/// The `messages` array of a body, as its raw bytes.
fn messages_raw(body: &str) -> String {
    let v: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_str(body).unwrap();
    v["messages"].get().to_string()
}

#[tokio::test]
async fn repeated_tool_outputs_are_pruned_without_a_summarizer_call() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("prune", "").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let messages = tool_loop_raw();
    let r = post_json(&c, &url, &raw_chat(&messages)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (header, before, after) = compacted(&r);
    assert!(before > 3430 && after <= 3430, "{header}");
    assert_eq!(r.headers["x-llm-warden-pruned"], "duplicates=2, images=0");

    let (summarizer, _) = upstream_chats(&sim);
    assert!(
        summarizer.is_empty(),
        "pruning was enough: no summarizer call"
    );
    let bodies = forwarded_raw(&sim);
    assert_eq!(bodies.len(), 1);
    // The exact bytes: the first two reads are markers (every other key as the client wrote
    // it), the third read and every other message byte for byte.
    let marker = format!(
        "[llm-warden: {} bytes pruned here; the same content appears again later in this conversation]",
        {
            let n = source_file().len();
            format!("{},{:03}", n / 1000, n % 1000)
        }
    );
    let pruned =
        |id: &str| format!(r#"{{"role": "tool", "content": "{marker}", "tool_call_id": "{id}"}}"#);
    let mut expected = messages.clone();
    expected[3] = pruned("c1");
    expected[5] = pruned("c2");
    assert_eq!(
        messages_raw(&bodies[0]),
        format!("[{}]", expected.join(",")),
        "the forwarded messages, byte for byte"
    );
    // /status and the metrics count it as a compaction, and as a prune.
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (m["compactions"].as_u64(), m["prunes"].as_u64()),
        (Some(1), Some(1)),
        "{m}"
    );
    assert_eq!(m["tokens_saved"], before - after);
    assert_eq!(m["pruned_tokens"], before - after);
    let e = &s["compaction"]["events"][0];
    assert_eq!(e["action"], "pruned", "{e}");
    assert_eq!(e["summarizer_calls"], 0);
    assert_eq!(
        e["pruned"],
        json!({"duplicates": 2, "images": 0, "tokens": before - after})
    );

    // The next turn: the pruned messages are the same bytes (the provider's prefix cache
    // keeps hitting); the newest read is still the last copy, and stays whole.
    let mut next = messages.clone();
    next.push(r#"{"role":"assistant","content":"Done: step 0 returns early."}"#.into());
    next.push(r#"{"role":"user","content":"Thanks."}"#.into());
    let r = post_json(&c, &url, &raw_chat(&next)).await;
    assert_eq!(r.status, 200);
    let bodies = forwarded_raw(&sim);
    let prefix = format!("[{},", expected[..8].join(","));
    let sent = messages_raw(&bodies[1]);
    assert!(sent.starts_with(&prefix), "{sent}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn with_prune_off_for_the_model_the_same_loop_is_summarized() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("prune-off", "[models.\"llama3.2\"]\nprune = false\n").await;
    let url = format!("http://{}/api/chat", proxy.proxy_addr(0));
    let r = post_json(&c, &url, &raw_chat(&tool_loop_raw())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.headers.contains_key("x-llm-warden-pruned"));
    // The summarizer reads the three copies (in pieces: its window is 4096 tokens too).
    let (summarizer, _) = upstream_chats(&sim);
    assert!(!summarizer.is_empty());
    let s = status(&c, &proxy).await;
    let e = &s["compaction"]["events"][0];
    assert_eq!(e["action"], "summarized", "{e}");
    assert_eq!(e["summarizer_calls"], summarizer.len());
    assert!(e.get("pruned").is_none(), "{e}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// The bodies that reached the simulator on `path`.
fn upstream_raw(sim: &SimServer<OllamaSim>, path: &str) -> Vec<String> {
    sim.state
        .log
        .calls()
        .into_iter()
        .filter(|c| c.path == path)
        .map(|c| String::from_utf8(c.body.to_vec()).unwrap())
        .collect()
}

/// The raw value of a top-level field of a body.
fn field_raw(body: &str, key: &str) -> String {
    let v: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_str(body).unwrap();
    v[key].get().to_string()
}

/// The raw items of a top-level array field of a body, each as written.
fn items_raw(body: &str, key: &str) -> Vec<String> {
    serde_json::from_str::<Vec<&serde_json::value::RawValue>>(&field_raw(body, key))
        .unwrap()
        .iter()
        .map(|r| r.get().to_string())
        .collect()
}

/// Posts `body` to `path` through the proxy, which must compact it; the one body the
/// simulator received.
async fn sent_compacted(
    c: &TestClient,
    proxy: &llm_warden::app::Running,
    sim: &SimServer<OllamaSim>,
    path: &str,
    body: &str,
) -> String {
    let url = format!("http://{}{path}", proxy.proxy_addr(0));
    let r = post_json(c, &url, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (header, before, after) = compacted(&r);
    assert!(before > after, "{header}");
    let mut forwarded = upstream_raw(sim, path);
    assert_eq!(forwarded.len(), 1);
    forwarded.remove(0)
}

const FILLER: &str = "the quick brown fox jumps over the lazy dog while it rains ";

/// An Anthropic Messages tool loop of `loops` rounds (user, tool_use, tool_result,
/// assistant), ending with a user question; raw, with the client's own spacing.
fn messages_loop(loops: usize) -> Vec<String> {
    let filler = FILLER.repeat(7);
    let mut m = Vec::new();
    for i in 0..loops {
        m.push(format!(
            r#"{{"role":"user", "content":"turn {i}: {filler}"}}"#
        ));
        m.push(format!(
            r#"{{"role":"assistant","content":[{{"type":"text","text":"reading {i}"}},{{"type":"tool_use","id":"toolu_{i}","name":"read","input":{{"path":"f{i}"}}}}]}}"#
        ));
        m.push(format!(
            r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"toolu_{i}","content":"file {i}: {filler}"}}]}}"#
        ));
        m.push(format!(
            r#"{{"role":"assistant", "content":"answer {i}: {filler}"}}"#
        ));
    }
    m.push(r#"{"role":"user","content":"and finally, what did we read first?"}"#.into());
    m
}

#[tokio::test]
async fn a_long_messages_conversation_with_tool_use_is_summarized() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("messages", "").await;
    let messages = messages_loop(12);
    let system = format!(r#"[{{"type":"text","text":"{SYSTEM}"}}]"#);
    let body = format!(
        r#"{{"model":"llama3.2","max_tokens":64,"system":{system},"messages":[{}]}}"#,
        messages.join(",")
    );
    let sent = &sent_compacted(&c, &proxy, &sim, "/v1/messages", &body).await;
    assert_eq!(
        field_raw(sent, "system"),
        system,
        "the system, byte for byte"
    );
    let out = items_raw(sent, "messages");
    let values: Vec<Value> = out
        .iter()
        .map(|m| serde_json::from_str(m).unwrap())
        .collect();
    // The summary is the first message, a user one, then (the next kept being user) an
    // assistant acknowledgement; roles alternate.
    assert_eq!(values[0]["role"], "user");
    assert!(values[0]["content"].as_str().unwrap().contains(SUMMARY));
    // The acknowledgement only where the first kept message is a user's.
    let ack = usize::from(values[1]["content"] == llm_warden::context::apis::ACK);
    assert_eq!(
        values[1 + ack]["role"],
        if ack == 1 { "user" } else { "assistant" }
    );
    let roles: Vec<&str> = values.iter().map(|v| v["role"].as_str().unwrap()).collect();
    assert!(roles.windows(2).all(|w| w[0] != w[1]), "{roles:?}");
    // The kept messages are the newest, byte for byte; none is a tool_result whose
    // tool_use was evicted.
    let kept = &out[1 + ack..];
    assert!(kept.len() > 1);
    assert_eq!(kept, &messages[messages.len() - kept.len()..]);
    for (i, v) in values.iter().enumerate() {
        for b in v["content"].as_array().into_iter().flatten() {
            if b["type"] == "tool_result" {
                let id = b["tool_use_id"].as_str().unwrap();
                assert!(out[..i]
                    .iter()
                    .any(|m| m.contains(&format!("\"id\":\"{id}\""))));
            }
        }
    }
    let s = status(&c, &proxy).await;
    let e = &s["compaction"]["events"][0];
    assert_eq!(e["action"], "summarized", "{e}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// A Responses API tool loop: user, function_call, function_call_output, assistant message.
fn responses_loop(loops: usize) -> Vec<String> {
    let filler = FILLER.repeat(7);
    let mut m = Vec::new();
    for i in 0..loops {
        m.push(format!(
            r#"{{"role":"user", "content":"turn {i}: {filler}"}}"#
        ));
        m.push(format!(
            r#"{{"type":"function_call","call_id":"call_{i}","name":"read","arguments":"{{\"path\":\"f{i}\"}}"}}"#
        ));
        m.push(format!(
            r#"{{"type":"function_call_output","call_id":"call_{i}","output":"file {i}: {filler}"}}"#
        ));
        m.push(format!(
            r#"{{"type":"message","role":"assistant","content":[{{"type":"output_text","text":"answer {i}: {filler}"}}]}}"#
        ));
    }
    m.push(r#"{"role":"user","content":"and finally, what did we read first?"}"#.into());
    m
}

#[tokio::test]
async fn a_long_responses_input_with_function_calls_is_summarized() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("responses", "").await;
    let items = responses_loop(12);
    let body = format!(
        r#"{{"model":"llama3.2","instructions":"{SYSTEM}","input":[{}]}}"#,
        items.join(",")
    );
    let sent = &sent_compacted(&c, &proxy, &sim, "/v1/responses", &body).await;
    assert_eq!(field_raw(sent, "instructions"), format!("\"{SYSTEM}\""));
    let out = items_raw(sent, "input");
    let first: Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(first["role"], "system");
    assert!(first["content"].as_str().unwrap().contains(SUMMARY));
    let kept = &out[1..];
    assert!(kept.len() > 1);
    assert_eq!(kept, &items[items.len() - kept.len()..], "byte for byte");
    for (i, m) in out.iter().enumerate() {
        let v: Value = serde_json::from_str(m).unwrap();
        if v["type"] == "function_call_output" {
            let id = v["call_id"].as_str().unwrap();
            let call = format!("\"type\":\"function_call\",\"call_id\":\"{id}\"");
            assert!(out[..i].iter().any(|m| m.contains(&call)), "{id}");
        }
    }

    // With previous_response_id: forwarded as sent, and /status says why (longer: the
    // first reply calibrated the token ratio).
    let url = format!("http://{}/v1/responses", proxy.proxy_addr(0));
    let body = format!(
        r#"{{"model":"llama3.2","previous_response_id":"resp_1","input":[{}]}}"#,
        responses_loop(24).join(",")
    );
    let r = post_json(&c, &url, &body).await;
    assert!(r.headers.get("x-llm-warden-compacted").is_none());
    let forwarded = upstream_raw(&sim, "/v1/responses");
    assert_eq!(forwarded.last().unwrap(), &body, "unchanged");
    let s = status(&c, &proxy).await;
    let e = &s["compaction"]["events"][1];
    assert_eq!(e["action"], "not_compacted", "{e}");
    assert!(e["failure"]
        .as_str()
        .unwrap()
        .contains("previous_response_id"));
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// The usage a streamed `/v1/messages` or `/v1/responses` reply reported last (Anthropic's
/// `message_delta`, the Responses API's `response.completed`): (input, output) tokens.
fn stream_usage(text: &str) -> (u64, u64) {
    let mut last = None;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let v: Value = serde_json::from_str(data).unwrap();
        for u in [&v["usage"], &v["message"]["usage"], &v["response"]["usage"]] {
            if let (Some(i), Some(o)) = (u["input_tokens"].as_u64(), u["output_tokens"].as_u64()) {
                last = Some((i, o));
            }
        }
    }
    last.unwrap_or_else(|| panic!("no usage in {text}"))
}

/// The time between tokens the simulator streams with, in the streamed tests below.
const TOKEN_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// A streamed reply arrived event by event: each `delta_event` in its own frame, the frames
/// spread over the time the simulator took to write them (not gathered, then sent).
fn arrived_frame_by_frame(r: &Reply, delta_event: &str) {
    let deltas = r.text().matches(delta_event).count();
    assert!(deltas >= 5, "{}", r.text());
    let frames: Vec<&(std::time::Instant, bytes::Bytes)> = r
        .frames
        .iter()
        .filter(|(_, b)| String::from_utf8_lossy(b).contains(delta_event))
        .collect();
    assert_eq!(frames.len(), deltas, "one delta per frame");
    let spread = frames[deltas - 1].0 - frames[0].0;
    assert!(
        spread >= TOKEN_DELAY * (deltas as u32 - 1) / 2,
        "{deltas} deltas within {spread:?}"
    );
}

#[tokio::test]
async fn streamed_messages_and_responses_are_compacted_and_relayed_frame_by_frame() {
    let sim = start_ollama(OllamaConfig {
        default_num_ctx: 4096,
        fixed_reply: Some(SUMMARY.to_string()),
        token_delay: TOKEN_DELAY,
        ..Default::default()
    })
    .await;
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::with(sim, "streamed-apis", "").await;
    let base = format!("http://{}", proxy.proxy_addr(0));
    let mut usage = (0, 0);

    // Messages: the system and the last message byte for byte, the rest summarized.
    let messages = messages_loop(12);
    let system = format!(r#"[{{"type":"text","text":"{SYSTEM}"}}]"#);
    let body = format!(
        r#"{{"model":"llama3.2","max_tokens":64,"stream":true,"system":{system},"messages":[{}]}}"#,
        messages.join(",")
    );
    let r = post_json(&c, &format!("{base}/v1/messages"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (header, before, after) = compacted(&r);
    assert!(before > after, "{header}");
    let text = r.text();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{events:?}");
    assert_eq!(events.last(), Some(&"message_stop"), "{events:?}");
    arrived_frame_by_frame(&r, "event: content_block_delta");
    let (i, o) = stream_usage(&text);
    assert!(i > 0 && o > 0);
    usage = (usage.0 + i, usage.1 + o);
    let forwarded = upstream_raw(&sim, "/v1/messages");
    assert_eq!(forwarded.len(), 1);
    let sent = &forwarded[0];
    assert!(sent.len() < body.len(), "{} !< {}", sent.len(), body.len());
    assert_eq!(field_raw(sent, "system"), system);
    assert_eq!(field_raw(sent, "stream"), "true");
    let out = items_raw(sent, "messages");
    assert_eq!(out.last(), messages.last());
    assert!(out[0].contains(SUMMARY), "{}", out[0]);

    // Responses: the instructions and the last item byte for byte (longer: the first
    // reply calibrated the token ratio).
    let items = responses_loop(24);
    let body = format!(
        r#"{{"model":"llama3.2","instructions":"{SYSTEM}","stream":true,"input":[{}]}}"#,
        items.join(",")
    );
    let r = post_json(&c, &format!("{base}/v1/responses"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (header, before, after) = compacted(&r);
    assert!(before > after, "{header}");
    let text = r.text();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"response.created"), "{events:?}");
    assert_eq!(events.last(), Some(&"response.completed"), "{events:?}");
    arrived_frame_by_frame(&r, "event: response.output_text.delta");
    let (i, o) = stream_usage(&text);
    assert!(i > 0 && o > 0);
    usage = (usage.0 + i, usage.1 + o);
    let forwarded = upstream_raw(&sim, "/v1/responses");
    assert_eq!(forwarded.len(), 1);
    let sent = &forwarded[0];
    assert!(sent.len() < body.len(), "{} !< {}", sent.len(), body.len());
    assert_eq!(field_raw(sent, "instructions"), format!("\"{SYSTEM}\""));
    assert_eq!(field_raw(sent, "stream"), "true");
    let out = items_raw(sent, "input");
    assert_eq!(out.last(), items.last());
    assert!(out[0].contains(SUMMARY), "{}", out[0]);

    // Both counted with the streams' own usage, as compactions.
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (
            m["total_requests"].as_u64(),
            m["prompt_tokens"].as_u64(),
            m["completion_tokens"].as_u64(),
            m["errors"].as_u64(),
            m["compactions"].as_u64(),
        ),
        (Some(2), Some(usage.0), Some(usage.1), Some(0), Some(2)),
        "{m}"
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ";

/// The duplicate marker for `source_file()`.
fn file_marker() -> String {
    let n = source_file().len();
    format!(
        "[llm-warden: {},{:03} bytes pruned here; the same content appears again later in this conversation]",
        n / 1000,
        n % 1000
    )
}

const IMAGE_MARKER: &str = "[llm-warden: 1 image removed; already answered]";

/// An Anthropic tool loop: a screenshot in the task, the same file read three times as
/// `tool_result`s of text blocks, then the user's next request.
fn messages_prune_loop() -> Vec<String> {
    let file = serde_json::to_string(&source_file()).unwrap();
    let read = |id: &str| {
        format!(
            r#"{{"role":"assistant","content":[{{"type":"tool_use","id":"{id}","name":"read_file","input":{{"path":"src/parser.rs"}}}}]}}"#
        )
    };
    let result = |id: &str, text: &str| {
        format!(
            r#"{{"role": "user", "content": [{{"type": "tool_result", "tool_use_id": "{id}", "content": [{{"type": "text", "text": {text}}}]}}]}}"#
        )
    };
    vec![
        format!(
            r#"{{"role":"user","content":[{{"type":"text","text":"The parser fails on this input."}},{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{PNG}"}}}}]}}"#
        ),
        read("toolu_1"),
        result("toolu_1", &file),
        read("toolu_2"),
        result("toolu_2", &file),
        read("toolu_3"),
        result("toolu_3", &file),
        r#"{"role":"assistant","content":"Step 0 does not check for empty input."}"#.into(),
        r#"{"role":"user","content":"Fix it."}"#.into(),
    ]
}

/// The same loop in the Responses API: `function_call_output`s as `input_text` parts and
/// as a string.
fn responses_prune_loop() -> Vec<String> {
    let file = serde_json::to_string(&source_file()).unwrap();
    let call = |id: &str| {
        format!(
            r#"{{"type":"function_call","call_id":"{id}","name":"read_file","arguments":"{{\"path\":\"src/parser.rs\"}}"}}"#
        )
    };
    let parts = |id: &str, text: &str| {
        format!(
            r#"{{"type": "function_call_output", "call_id": "{id}", "output": [{{"type": "input_text", "text": {text}}}]}}"#
        )
    };
    vec![
        format!(
            r#"{{"role":"user","content":[{{"type":"input_text","text":"The parser fails on this input."}},{{"type":"input_image","image_url":"data:image/png;base64,{PNG}","detail":"auto"}}]}}"#
        ),
        call("call_1"),
        parts("call_1", &file),
        call("call_2"),
        format!(r#"{{"type":"function_call_output","call_id":"call_2","output":{file}}}"#),
        call("call_3"),
        parts("call_3", &file),
        r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Step 0 does not check for empty input."}]}"#.into(),
        r#"{"role":"user","content":"Fix it."}"#.into(),
    ]
}

#[tokio::test]
async fn messages_and_responses_tool_loops_are_pruned_images_and_array_results_too() {
    let Rig {
        sim,
        proxy,
        cache,
        c,
    } = Rig::start("prune-apis", "").await;
    let base = format!("http://{}", proxy.proxy_addr(0));
    let file = serde_json::to_string(&source_file()).unwrap();
    let marker = serde_json::to_string(&file_marker()).unwrap();

    let messages = messages_prune_loop();
    let body = format!(
        r#"{{"model":"llama3.2","max_tokens":64,"messages":[{}]}}"#,
        messages.join(",")
    );
    let r = post_json(&c, &format!("{base}/v1/messages"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    assert_eq!(r.headers["x-llm-warden-pruned"], "duplicates=2, images=1");
    let mut want = messages.clone();
    want[0] = want[0].replace(
        &format!(
            r#"{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{PNG}"}}}}"#
        ),
        &format!(r#"{{"text":"{IMAGE_MARKER}","type":"text"}}"#),
    );
    want[2] = want[2].replace(&file, &marker);
    want[4] = want[4].replace(&file, &marker);
    assert_ne!(want[0], messages[0]);
    assert_ne!(want[2], messages[2]);
    let forwarded = upstream_raw(&sim, "/v1/messages");
    assert_eq!(forwarded.len(), 1);
    assert_eq!(items_raw(&forwarded[0], "messages"), want, "byte for byte");

    let items = responses_prune_loop();
    let body = format!(
        r#"{{"model":"llama3.2","instructions":"{SYSTEM}","input":[{}]}}"#,
        items.join(",")
    );
    let r = post_json(&c, &format!("{base}/v1/responses"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.contains_key("x-llm-warden-compacted"));
    assert_eq!(r.headers["x-llm-warden-pruned"], "duplicates=2, images=1");
    let mut want = items.clone();
    want[0] = want[0].replace(
        &format!(
            r#"{{"type":"input_image","image_url":"data:image/png;base64,{PNG}","detail":"auto"}}"#
        ),
        &format!(r#"{{"text":"{IMAGE_MARKER}","type":"input_text"}}"#),
    );
    want[2] = want[2].replace(&file, &marker);
    want[4] = want[4].replace(&file, &marker);
    assert_ne!(want[0], items[0]);
    let forwarded = upstream_raw(&sim, "/v1/responses");
    assert_eq!(forwarded.len(), 1);
    assert_eq!(items_raw(&forwarded[0], "input"), want, "byte for byte");

    // No summarizer call; /status, its events and the metrics count both as prunes.
    let (summarizer, _) = upstream_chats(&sim);
    assert!(summarizer.is_empty());
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (m["compactions"].as_u64(), m["prunes"].as_u64()),
        (Some(2), Some(2)),
        "{m}"
    );
    for e in s["compaction"]["events"].as_array().unwrap() {
        assert_eq!(e["action"], "pruned", "{e}");
        assert_eq!(e["pruned"]["duplicates"], 2, "{e}");
        assert_eq!(e["pruned"]["images"], 1, "{e}");
    }
    let page = get(&c, &format!("http://{}/metrics", proxy.admin_addr)).await;
    let prunes = page
        .text()
        .lines()
        .find(|l| l.starts_with("llm_warden_compaction_prunes_total{") && l.contains("llama3.2"))
        .map(str::to_string);
    assert!(
        prunes.as_deref().is_some_and(|l| l.ends_with(" 2")),
        "{prunes:?}"
    );
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}
