//! The example configs in `deploy/` parse into the roles' config types and validate.

use std::path::Path;

use expertmesh_attention_worker::AttentionWorkerConfig;
use expertmesh_coordinator::CoordinatorConfig;
use expertmesh_dispatch::WireDType;
use expertmesh_expert_worker::ExpertWorkerConfig;

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn deploy_examples_parse_and_validate() {
    let c: CoordinatorConfig = toml::from_str(&read("coordinator.toml")).unwrap();
    assert_eq!(c.listen, "0.0.0.0:7000");
    assert_eq!(c.http.as_deref(), Some("0.0.0.0:8000"));
    let node = c.node("fingerprint".into(), 128).unwrap();
    assert_eq!(node.peers.len(), 3);
    assert_eq!(
        node.settings.join_token, None,
        "the token comes from the environment"
    );
    // A join token of fewer than 128 bits (as hex) is refused.
    let mut short = c.clone();
    short.join_token = Some("change-me".into());
    let e = short.node("fingerprint".into(), 128).unwrap_err();
    assert!(e.to_string().contains("join_token"), "{e}");
    short.join_token = Some("0".repeat(32));
    assert!(short.node("fingerprint".into(), 128).is_ok());
    let e: ExpertWorkerConfig = toml::from_str(&read("expert-worker.toml")).unwrap();
    let e = e.validate().unwrap();
    assert_eq!(e.capacity, Some(16));
    assert_eq!(e.batcher.window_us, 200);
    assert_eq!(e.worker.device, expertmesh_model::Device::Cuda(0));
    assert_eq!(e.worker.gemm, expertmesh_model::GemmPrecision::F32);
    let a: AttentionWorkerConfig = toml::from_str(&read("attention-worker.toml")).unwrap();
    let a = a.validate().unwrap();
    assert_eq!(a.dispatch.wire_dtype, WireDType::F32);
    assert_eq!(a.scheduler.token_budget, 512);
    assert_eq!(a.worker.device, expertmesh_model::Device::Cuda(0));
}

#[test]
fn unknown_fields_are_rejected() {
    let err = toml::from_str::<ExpertWorkerConfig>("capacty = 3").unwrap_err();
    assert!(err.to_string().contains("capacty"), "{err}");
}

/// The Grafana dashboard parses, and every metric it queries is one a role serves (its name
/// appears in a renderer's source).
#[test]
fn the_dashboard_queries_metrics_the_roles_serve() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/expertmesh.json")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources: String = [
        "gateway/src/metrics.rs",
        "attention-worker/src/node.rs",
        "expert-worker/src/batcher.rs",
        "coordinator/src/metrics.rs",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
    .collect();
    let mut names = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("expertmesh_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = name.strip_suffix("_bucket").unwrap_or(&name);
                assert!(
                    sources.contains(base),
                    "{base} (panel {}) is served by no role",
                    panel["title"]
                );
                names += 1;
            }
        }
    }
    assert!(names > 30, "{names} metric references");
}
