//! The catalogue and embedding routes end to end: tags, show, `/v1/models`, copy, delete,
//! pull, ps ordering, and the three embedding shapes.

use super::*;

#[tokio::test]
async fn catalogue_routes() {
    let srv = start(manual()).await;
    let tags = get(&srv, "/api/tags").await;
    assert_eq!(tags.content_type(), "application/json; charset=utf-8");
    let t = tags.json();
    assert_eq!(t["models"].as_array().unwrap().len(), 3);
    let first = tags.text();
    assert!(first.starts_with(
        r#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","modified_at":"#
    ));
    assert!(first.contains(r#""details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"3.2B","quantization_level":"Q4_K_M"}"#));
    assert_eq!(t["models"][0]["digest"].as_str().unwrap().len(), 64);

    let show = post(&srv, "/api/show", r#"{"name":"qwen2.5:7b"}"#)
        .await
        .json();
    assert_eq!(show["model_info"]["general.architecture"], "qwen2");
    assert_eq!(show["model_info"]["qwen2.context_length"], 32768);
    assert!(show["model_info"]["qwen2.attention.head_count_kv"].is_u64());
    let params = show["parameters"].as_str().unwrap();
    assert!(
        params.starts_with("num_ctx                        8192\n"),
        "{params}"
    );
    assert_eq!(
        show["capabilities"],
        serde_json::json!(["completion", "tools"])
    );
    let show = post(&srv, "/api/show", r#"{"model":"llama3.2"}"#).await;
    assert!(show
        .text()
        .contains(r#""parameters":"stop                           \"\u003c|eot_id|\u003e\"""#));

    let models = get(&srv, "/v1/models").await;
    assert!(models.text().ends_with("\n"));
    let v = models.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "llama3.2:latest");
    assert_eq!(v["data"][0]["owned_by"], "library");
    let one = get(&srv, "/v1/models/qwen2.5:7b").await.json();
    assert_eq!(one["id"], "qwen2.5:7b");
    assert_eq!(
        get(&srv, "/v1/models/nope").await.status,
        StatusCode::NOT_FOUND
    );

    // copy, delete, pull
    let r = post(
        &srv,
        "/api/copy",
        r#"{"source":"llama3.2","destination":"mine"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    let r = send(&srv, Method::DELETE, "/api/delete", r#"{"model":"mine"}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&srv, Method::DELETE, "/api/delete", r#"{"model":"mine"}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = post(&srv, "/api/pull", r#"{"model":"llama3.2"}"#).await;
    assert_eq!(r.content_type(), "application/x-ndjson");
    let lines = r.lines();
    assert_eq!(
        lines.last().unwrap(),
        &serde_json::json!({"status":"success"})
    );
    let r = post(&srv, "/api/pull", r#"{"model":"llama3.2","stream":false}"#).await;
    assert_eq!(r.text(), r#"{"status":"success"}"#);

    // ps lists latest expiry first.
    post(
        &srv,
        "/api/generate",
        r#"{"model":"llama3.2","keep_alive":"1m"}"#,
    )
    .await;
    post(
        &srv,
        "/api/generate",
        r#"{"model":"qwen2.5:7b","keep_alive":"1h"}"#,
    )
    .await;
    let ps = get(&srv, "/api/ps").await.json();
    assert_eq!(ps["models"][0]["name"], "qwen2.5:7b");
    assert_eq!(ps["models"][0]["context_length"], 8192);
    assert_eq!(ps["models"][1]["name"], "llama3.2:latest");
    assert_eq!(ps["models"][1]["context_length"], 4096);
}

#[tokio::test]
async fn embeddings_routes() {
    let srv = start(manual()).await;
    let r = post(
        &srv,
        "/api/embed",
        r#"{"model":"nomic-embed-text","input":["hello","world!"]}"#,
    )
    .await;
    let v = r.json();
    assert_eq!(v["model"], "nomic-embed-text");
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 8);
    assert_eq!(v["prompt_eval_count"], 2 + 2);
    assert!(r
        .text()
        .starts_with(r#"{"model":"nomic-embed-text","embeddings":[["#));
    let expected: Vec<f64> = common::embedding("hello", 8)
        .into_iter()
        .map(f64::from)
        .collect();
    let got: Vec<f64> = v["embeddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (a, b) in expected.iter().zip(&got) {
        assert!((a - b).abs() < 1e-6);
    }
    let r = post(
        &srv,
        "/api/embeddings",
        r#"{"model":"nomic-embed-text","prompt":"hello"}"#,
    )
    .await;
    assert_eq!(r.json()["embedding"], v["embeddings"][0]);
    let r = post(
        &srv,
        "/v1/embeddings",
        r#"{"model":"nomic-embed-text","input":"hello"}"#,
    )
    .await;
    let o = r.json();
    assert_eq!(o["object"], "list");
    assert_eq!(o["data"][0]["object"], "embedding");
    assert_eq!(o["data"][0]["embedding"], v["embeddings"][0]);
    assert_eq!(
        o["usage"],
        serde_json::json!({"prompt_tokens":2,"total_tokens":2})
    );
    assert!(r.text().ends_with("}\n"));
    let r = post(
        &srv,
        "/api/embed",
        r#"{"model":"nomic-embed-text","input":"x","keep_alive":"0s","truncate":false}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(srv.state.loaded().is_empty());
    assert_eq!(
        GoFloat(1.0)
            .serialize(serde_json::value::Serializer)
            .unwrap(),
        1
    );
    assert_eq!(
        String::from_utf8(common::go_json(&GoFloat(-1.0))).unwrap(),
        "-1"
    );
}
