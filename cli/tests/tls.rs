//! `up --tls` against hostile and mistaken clients: every port of every role (coordinators,
//! expert workers' gRPC and framed data path, attention workers) refuses a plaintext client,
//! a TLS client without a certificate and one with a certificate from another CA; a
//! worker's certificate cannot send raft messages, an attention worker's cannot drain a
//! worker; the cluster itself serves requests and `admin` works with the up file's
//! `tls_dir`.

mod common;

use std::path::Path;
use std::time::Duration;

use expertmesh_dispatch::{Dispatch, DispatchBatch, WireDType};
use expertmesh_proto::tls::{self, PeerRole};
use expertmesh_proto::v1 as pb;
use pb::attention_service_client::AttentionServiceClient;
use pb::coordinator_service_client::CoordinatorServiceClient;
use pb::expert_service_client::ExpertServiceClient;
use serde_json::{json, Value};
use tonic::Code;

/// A client's credentials: the CA it trusts, and its certificate if any.
#[derive(Clone, Copy, Debug)]
enum Client<'a> {
    Plain,
    NoCertificate(&'a Path),
    /// (CA it trusts, its certificate's directory)
    Certificate(&'a Path, &'a Path),
}

/// A gRPC channel to `address` (a node of `peer`'s role) as `client`; `Err` when none can
/// be made (the handshake failed).
async fn channel(
    client: Client<'_>,
    address: &str,
    peer: PeerRole,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = expertmesh_proto::endpoint(address, Duration::from_secs(3)).unwrap();
    let config = match client {
        Client::Plain => return endpoint.connect().await.map_err(|e| e.to_string()),
        Client::NoCertificate(ca) => tls::client_config(&ca.join("ca.pem"), None),
        Client::Certificate(ca, dir) => tls::client_config(
            &ca.join("ca.pem"),
            Some((&dir.join("node.pem"), &dir.join("node.key"))),
        ),
    }
    .unwrap();
    tls::channel_with(config, endpoint, address, peer)
        .await
        .map_err(|e| e.to_string())
}

/// The status of one harmless call to the node of `peer`'s role at `address`, as `client`
/// (`Unavailable` when no channel could be made).
async fn call(client: Client<'_>, address: &str, peer: PeerRole) -> Code {
    let Ok(ch) = channel(client, address, peer).await else {
        return Code::Unavailable;
    };
    let mut request = tonic::Request::new(());
    request.set_timeout(Duration::from_secs(5));
    let result = match peer {
        PeerRole::Coordinator => CoordinatorServiceClient::new(ch)
            .status(pb::StatusRequest {})
            .await
            .map(drop),
        PeerRole::ExpertWorker => ExpertServiceClient::new(ch)
            .info(pb::InfoRequest {})
            .await
            .map(drop),
        _ => AttentionServiceClient::new(ch)
            .generate(pb::GenerateRequest {
                input_ids: vec![1, 2, 3],
                max_tokens: 1,
                ..Default::default()
            })
            .await
            .map(drop),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn certs(args: &[&str]) {
    let out = common::expertmesh(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_port_takes_only_the_clusters_certificates_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, cluster, printed) = common::start_up_printing(
        &["--tls", "--http", "127.0.0.1:0"],
        &dir.path().join("up.json"),
    );
    // The cluster works: a request through the front door, `admin` through the up file.
    let http = cluster["api"].as_str().unwrap();
    let done = common::post(
        http,
        "/v1/completions",
        &json!({"prompt": [10, 20], "max_tokens": 3, "temperature": 0}),
    )
    .unwrap();
    assert_eq!(done["usage"]["completion_tokens"], 3, "{done}");
    let status = common::bin()
        .args(["admin", "status", "--json"])
        .env("EXPERTMESH_UP_FILE", dir.path().join("up.json"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let admin = Path::new(cluster["tls_dir"].as_str().unwrap()).to_owned();
    let root = admin.parent().unwrap();
    let ca = root.join("ca");
    // Another cluster's CA and an admin certificate from it.
    let other = dir.path().join("other");
    certs(&["certs", "init", "--out", other.join("ca").to_str().unwrap()]);
    certs(&[
        "certs",
        "issue",
        "--ca",
        other.join("ca").to_str().unwrap(),
        "--role",
        "admin",
        "--name",
        "mallory",
        "--out",
        other.join("admin").to_str().unwrap(),
    ]);
    let mut ports: Vec<(String, PeerRole)> = cluster["coordinators"]
        .as_str()
        .unwrap()
        .split(',')
        .map(|a| (a.to_owned(), PeerRole::Coordinator))
        .collect();
    for w in status["workers"].as_array().unwrap() {
        let role = w["role"].as_str().unwrap().parse().unwrap();
        ports.push((w["address"].as_str().unwrap().to_owned(), role));
    }
    assert_eq!(ports.len(), 4, "{status}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for (address, role) in &ports {
            let role = *role;
            // The cluster's admin may make the call; nobody else gets through.
            assert_eq!(
                call(Client::Certificate(&ca, &admin), address, role).await,
                Code::Ok,
                "{role:?} {address}"
            );
            for stranger in [
                Client::Plain,
                Client::NoCertificate(&ca),
                Client::Certificate(&ca, &other.join("admin")),
            ] {
                // Refused at the transport: the handshake fails, or the server drops the
                // connection before any call is read.
                let code = call(stranger, address, role).await;
                assert!(
                    matches!(
                        code,
                        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
                    ),
                    "{stranger:?} at {role:?} {address}: {code:?}"
                );
            }
            // A client that trusts the other CA does not take the cluster's server either.
            let code = call(
                Client::Certificate(&other.join("ca"), &other.join("admin")),
                address,
                role,
            )
            .await;
            assert_eq!(code, Code::Unavailable, "{role:?} {address}");
        }
        // Roles: an expert worker's certificate cannot speak raft, an attention worker's
        // cannot drain a worker.
        let coordinator = ports[0].0.as_str();
        let worker = Client::Certificate(&ca, &root.join("expert-worker"));
        let ch = channel(worker, coordinator, PeerRole::Coordinator)
            .await
            .unwrap();
        let refused = CoordinatorServiceClient::new(ch)
            .raft(pb::RaftMessages {
                from: 9,
                messages: vec![vec![0; 8]],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
        let attention = Client::Certificate(&ca, &root.join("attention-worker"));
        let ch = channel(attention, coordinator, PeerRole::Coordinator)
            .await
            .unwrap();
        let refused = CoordinatorServiceClient::new(ch)
            .drain(pb::DrainRequest { worker_id: 1 })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
        // A client that dials an expert worker by a coordinator's role finds another role's
        // certificate and gives up.
        let (expert, _) = ports
            .iter()
            .find(|(_, r)| *r == PeerRole::ExpertWorker)
            .unwrap();
        assert!(channel(
            Client::Certificate(&ca, &admin),
            expert,
            PeerRole::Coordinator
        )
        .await
        .is_err());
        // The framed data path on the same port: a plaintext dispatch is not answered.
        let framed = expertmesh_dispatch::framed::FramedDispatch::new(expert.clone());
        let batch = DispatchBatch {
            epoch: 1,
            layer: 0,
            batch_id: 0,
            timeout: Duration::from_secs(5),
            groups: vec![expertmesh_model::moe::ExpertGroup { expert: 0, rows: 1 }],
            hidden: 8,
            dtype: WireDType::F32,
            activations: vec![0.0; 8],
            traces: Vec::new(),
        };
        assert!(framed.dispatch(batch).await.is_err());
    });
    // Renewal without a restart: the coordinator's certificate, issued again for 5 days, is
    // read within seconds (its expiry in /metrics moves) and still serves.
    let metrics = printed
        .iter()
        .find(|l| l.trim_start().starts_with("coordinator"))
        .and_then(|l| l.split("metrics http://").nth(1))
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let expiry = || {
        common::metrics(&metrics)
            .lines()
            .find(|l| l.starts_with("expertmesh_tls_certificate_expiry_seconds{cert=\"node\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let before = expiry();
    assert!((before - now - 30.0 * 86400.0).abs() < 7200.0, "{before}");
    certs(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--role",
        "coordinator",
        "--name",
        "renewed",
        "--hosts",
        "127.0.0.1",
        "--days",
        "5",
        "--out",
        root.join("coordinator").to_str().unwrap(),
    ]);
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while (expiry() - now - 5.0 * 86400.0).abs() > 7200.0 {
        assert!(
            std::time::Instant::now() < give_up,
            "the renewed certificate was not read"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    runtime.block_on(async {
        let (address, _) = &ports[0];
        let code = call(
            Client::Certificate(&ca, &admin),
            address,
            PeerRole::Coordinator,
        )
        .await;
        assert_eq!(code, Code::Ok);
    });
}
