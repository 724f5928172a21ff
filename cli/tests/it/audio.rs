//! `POST /v1/audio/transcriptions` through the proxy to the simulated Ollama: the model is
//! read from the multipart form, the request is counted (its own endpoint label) and holds a
//! lease while it runs (an admin unload waits), the body reaches Ollama byte for byte, and a
//! form that names no model gets the proxy's 400 in the OpenAI shape with nothing counted,
//! loaded or left in flight.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use llm_warden_sim::ollama::OllamaConfig;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(10);
const BOUNDARY: &str = "----llmwardenTestBoundary7MA4YWxk";
const PATH: &str = "/v1/audio/transcriptions";

/// A form as the OpenAI SDK writes it: the file first, then the fields.
fn form(fields: &[(&str, &str)], audio: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"hello.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    b.extend_from_slice(audio);
    b.extend_from_slice(b"\r\n");
    for (name, value) in fields {
        b.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

/// A WAV-ish payload with the boundary's prefix and CRLFs inside it.
fn audio() -> Vec<u8> {
    let mut a = b"RIFF\x24\x00\x00\x00WAVEfmt ".to_vec();
    for i in 0..20_000u32 {
        a.push((i % 253) as u8);
        if i % 997 == 0 {
            a.extend_from_slice(b"\r\n------llmwarden");
        }
    }
    a
}

async fn transcribe(c: &TestClient, url: &str, content_type: &str, body: Vec<u8>) -> Reply {
    send(
        c,
        Method::POST,
        url,
        &[("content-type", content_type)],
        Bytes::from(body),
    )
    .await
}

fn multipart() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

#[tokio::test]
async fn a_transcription_is_counted_and_holds_its_lease_against_an_admin_unload() {
    let sim = start_ollama(OllamaConfig {
        token_delay: Duration::from_millis(60),
        reply_tokens: 24,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let url = format!("http://{}{PATH}", proxy.proxy_addr(0));
    let body = form(&[("model", "Llama3.2"), ("language", "en")], &audio());
    let running = {
        let (c, url, body) = (c.clone(), url.clone(), body.clone());
        tokio::spawn(async move { transcribe(&c, &url, &multipart(), body).await })
    };
    // Loaded lazily by the proxy, then answering: in flight under its lease.
    wait_for("the transcription runs", LIMIT, || async {
        sim.state.active_requests() == 1
    })
    .await;
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(m["active_requests"], 1, "{s}");
    let unload = {
        let c = c.clone();
        let url = format!(
            "http://{}/models/ollama0/llama3.2:latest/unload",
            proxy.admin_addr
        );
        tokio::spawn(async move { post_json(&c, &url, "").await })
    };
    let r = running.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    let text = r.json()["text"].as_str().unwrap_or_default().to_string();
    assert!(!text.is_empty() && text == text.trim(), "{}", r.text());
    let u = unload.await.unwrap();
    assert_eq!(u.status, 200, "{}", u.text());
    assert!(sim.state.loaded().is_empty(), "unloaded after it finished");
    assert_eq!(sim.state.unloads_while_busy(), 0);
    // Forwarded byte for byte, headers included.
    let call = sim
        .state
        .log
        .calls()
        .into_iter()
        .rfind(|c| c.path == PATH)
        .expect("forwarded");
    assert_eq!(call.body, body, "the form went on unchanged");
    assert_eq!(call.headers["content-type"], multipart().as_str());
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2:latest");
    assert_eq!(
        (
            m["total_requests"].as_u64(),
            m["active_requests"].as_u64(),
            m["errors"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{m}"
    );
    let metrics = get(&c, &format!("http://{}/metrics", proxy.admin_addr)).await;
    assert!(
        metrics
            .text()
            .contains("endpoint=\"v1_audio_transcriptions\""),
        "its own label"
    );
    // `response_format=text`: the bare text, as Ollama writes it.
    let r = transcribe(
        &c,
        &url,
        &multipart(),
        form(
            &[("model", "llama3.2"), ("response_format", "text")],
            b"RIFF",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["content-type"], "text/plain");
    assert!(
        !r.text().is_empty() && !r.text().starts_with('{'),
        "{}",
        r.text()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_malformed_transcription_gets_a_400_and_leaks_nothing() {
    let sim = start_ollama(OllamaConfig::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let url = format!("http://{}{PATH}", proxy.proxy_addr(0));
    let whole = form(&[("model", "llama3.2")], &audio());
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "no model field",
            multipart(),
            form(&[("language", "en")], &audio()),
            "model is required",
        ),
        (
            "truncated",
            multipart(),
            whole[..whole.len() - 12].to_vec(),
            "failed to parse multipart form: unexpected EOF",
        ),
        (
            "wrong content type",
            "application/json".into(),
            whole.clone(),
            "failed to parse multipart form: request Content-Type isn't multipart/form-data",
        ),
        (
            "no boundary",
            "multipart/form-data".into(),
            whole.clone(),
            "failed to parse multipart form: no multipart boundary param in Content-Type",
        ),
        (
            "no file",
            multipart(),
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nllama3.2\r\n--{BOUNDARY}--\r\n").into_bytes(),
            "file is required: http: no such file",
        ),
        (
            "an empty file",
            multipart(),
            form(&[("model", "llama3.2")], b""),
            "audio file is empty",
        ),
    ];
    for (what, ct, body, message) in cases {
        let r = transcribe(&c, &url, &ct, body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["message"], message, "{what}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}");
    }
    assert!(
        !sim.state.log.calls().iter().any(|c| c.path == PATH),
        "nothing forwarded"
    );
    assert!(sim.state.loaded().is_empty(), "nothing loaded");
    let s = status(&c, &proxy).await;
    for m in s["models"].as_array().into_iter().flatten() {
        assert_eq!(m["active_requests"], 0, "{m}");
        assert_eq!(m["total_requests"], 0, "{m}");
    }
    // A model Ollama does not have: its own 404, in the OpenAI shape, relayed.
    let r = transcribe(
        &c,
        &url,
        &multipart(),
        form(&[("model", "nope:1b")], b"RIFF"),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let s = status(&c, &proxy).await;
    for m in s["models"].as_array().into_iter().flatten() {
        assert_eq!(m["active_requests"], 0, "{m}");
    }
    proxy.shutdown().await;
}
