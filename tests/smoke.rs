mod support;
use support::*;

#[tokio::test]
async fn chat_through_the_proxy_is_counted() {
    let sim = start_ollama(Default::default()).await;
    let proxy = start_proxy(&[("ollama", sim.url())], "").await;
    let c = client();
    let r = post_json(
        &c,
        &format!("http://{}/api/chat", proxy.proxy_addr(0)),
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let s = status(&c, &proxy).await;
    let m = model_entry(&s, "ollama0", "llama3.2");
    assert_eq!(m["total_requests"], 1);
    assert_eq!(m["completion_tokens"], 8);
    proxy.shutdown().await;
}
