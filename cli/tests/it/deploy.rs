//! What ships under `deploy/`: the Kubernetes manifests validate (their kinds against the
//! Kubernetes and CRD schemas shipped with them, their cross-references), and every
//! llm-warden config they embed loads with the proxy's own loader. The Envoy config is run
//! as shipped by `epp::through_the_real_envoy`.

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_validate_and_their_configs_load() {
    let python = tokio::task::spawn_blocking(crate::python_clients::python)
        .await
        .expect("venv");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dump = std::env::temp_dir().join(format!("llm-warden-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dump).unwrap();
    let out = Command::new(python)
        .arg(root.join("cli/tests/python/k8s_manifests.py"))
        .env("WARDEN_DUMP_CONFIGS", &dump)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "k8s_manifests.py:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    let mut configs = 0;
    for entry in std::fs::read_dir(&dump).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // The admin token comes from a Secret through the environment.
        let env = |k: &str| (k == "LLM_WARDEN_ADMIN_TOKEN").then(|| "from-the-secret".to_string());
        let config = llm_warden::config::load_str_with_env(&text, &env)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if path.to_string_lossy().contains("epp") {
            let epp = config.epp.as_ref().expect("the EPP's config has [epp]");
            assert!(config.pools.iter().any(|p| p.name == epp.pool));
        }
        configs += 1;
    }
    assert_eq!(configs, 2, "the node's and the EPP's configs");
    let _ = std::fs::remove_dir_all(&dump);
}
