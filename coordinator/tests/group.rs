//! Coordinator nodes in one process talking real gRPC on loopback: a write through any
//! replica, consistent reads, adding and removing coordinators (the new one catches up from a
//! snapshot), and the leader's failure detector.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertmesh_coordinator::{
    Beat, Coordinator, CoordinatorClient, NodeConfig, Registration, Role, Settings, Timing,
};

struct Node {
    coordinator: Coordinator,
    address: String,
    stop: tokio::sync::oneshot::Sender<()>,
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("expertmesh-group-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start(
    id: u64,
    listener: tokio::net::TcpListener,
    peers: &BTreeMap<u64, String>,
    dir: &std::path::Path,
    join: bool,
    lease_ms: u64,
) -> Node {
    let address = listener.local_addr().unwrap().to_string();
    let config = NodeConfig {
        id,
        peers: peers.clone(),
        data_dir: dir.join(id.to_string()),
        join,
        tick: Duration::from_millis(50),
        timing: Timing {
            compact_every: 4,
            ..Timing::default()
        },
        model_fingerprint: "fp".into(),
        num_experts: 8,
        settings: Settings {
            lease_ms,
            ..Settings::default()
        },
    };
    let (coordinator, _) = Coordinator::start(config).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(expertmesh_coordinator::serve(
        coordinator.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    Node {
        coordinator,
        address,
        stop,
    }
}

async fn listeners(n: usize) -> Vec<tokio::net::TcpListener> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    v
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn registration(port: u16) -> Registration {
    Registration {
        role: Role::ExpertWorker,
        address: format!("127.0.0.1:{port}"),
        capacity: None,
        model_fingerprint: "fp".into(),
        join_token: None,
        holds_experts: false,
        weightless: false,
        backup: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_coordinators() {
    let dir = scratch("membership");
    let mut ls = listeners(4).await;
    let mut peers: BTreeMap<u64, String> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string()))
        .collect();
    let fourth = ls.pop().unwrap();
    let fourth_address = peers.remove(&4).unwrap();
    let mut nodes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        nodes.push(start(i as u64 + 1, l, &peers, &dir, false, 60_000).await);
    }
    eventually("a leader", || {
        nodes
            .iter()
            .any(|n| n.coordinator.status().role.name() == "leader")
    })
    .await;
    let list = nodes
        .iter()
        .map(|n| n.address.clone())
        .collect::<Vec<_>>()
        .join(",");
    let client = CoordinatorClient::new(&list).unwrap();
    // Enough writes that the log is compacted: the new member catches up by snapshot.
    for port in 1..=6 {
        client
            .register(&registration(port), Duration::from_secs(10))
            .await
            .unwrap();
    }
    let state = client.state().await.unwrap();
    assert_eq!(
        state.members.len(),
        6,
        "a linearizable read sees every write"
    );
    // NCCL unique ids: rank 0 offers through one coordinator, every coordinator hands the
    // same id out, and a second offer does not replace it.
    let id: Vec<u8> = (0..128u8).collect();
    let first = CoordinatorClient::new(&nodes[2].address).unwrap();
    let got = first
        .nccl_id("attn0-experts", Some(&id), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, id);
    for n in &nodes {
        let c = CoordinatorClient::new(&n.address).unwrap();
        let got = c
            .nccl_id("attn0-experts", None, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, id, "from {}", n.address);
    }
    let other = vec![7u8; 128];
    let got = client
        .nccl_id("attn0-experts", Some(&other), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, id, "the first offer stands");
    let waited = client
        .nccl_id("nobody", None, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(waited.to_string().contains("no NCCL id"), "{waited}");

    let mut all_peers = peers.clone();
    all_peers.insert(4, fourth_address.clone());
    nodes.push(start(4, fourth, &all_peers, &dir, true, 60_000).await);
    client
        .change_coordinators(4, Some(fourth_address.clone()))
        .await
        .unwrap();
    eventually("the new coordinator to catch up", || {
        nodes[3].coordinator.view().members.len() == 6
    })
    .await;

    // Remove coordinator 1, whoever leads; the other three go on.
    client.change_coordinators(1, None).await.unwrap();
    let first = nodes.remove(0);
    let _ = first.stop.send(());
    let client = CoordinatorClient::new(&format!(
        "{},{},{}",
        nodes[0].address, nodes[1].address, fourth_address
    ))
    .unwrap();
    client
        .register(&registration(7), Duration::from_secs(20))
        .await
        .unwrap();
    eventually("every remaining coordinator to apply the write", || {
        nodes
            .iter()
            .all(|n| n.coordinator.view().members.len() == 7)
    })
    .await;
    for n in &nodes {
        assert_eq!(
            n.coordinator.view().placement,
            nodes[0].coordinator.view().placement
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_declared_dead_and_its_experts_move() {
    let dir = scratch("lease");
    let mut ls = listeners(1).await;
    let l = ls.pop().unwrap();
    let peers = BTreeMap::from([(1, l.local_addr().unwrap().to_string())]);
    let node = start(1, l, &peers, &dir, false, 600).await;
    let client = CoordinatorClient::new(&node.address).unwrap();
    // The first expert worker gets every expert at once, then falls silent.
    let silent = client
        .register(&registration(2), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        node.coordinator.view().placement.experts_of(silent).len(),
        8
    );
    let epoch = node.coordinator.view().placement.epoch;
    // The second heartbeats but never reports a prepared placement: the leader's plan to
    // move experts to it stays pending.
    let beating = client
        .join(
            &registration(1),
            Duration::from_secs(10),
            Duration::from_millis(100),
            Beat::default,
        )
        .await
        .unwrap()
        .id();
    eventually("the silent worker declared dead", || {
        let v = node.coordinator.view();
        v.member(silent).is_some_and(|m| !m.alive)
    })
    .await;
    // Without a second copy, its experts are placed on the survivor at once.
    let v = node.coordinator.view();
    assert!(v.member(beating).unwrap().alive);
    assert_eq!(v.placement.epoch, epoch + 1);
    assert_eq!(v.placement.experts_of(beating).len(), 8);
    assert!(v.placement.experts_of(silent).is_empty());
    assert!(v.pending.is_none());
    let _ = node.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_loads_its_experts_is_planned_around() {
    let dir = scratch("stuck");
    let mut ls = listeners(1).await;
    let l = ls.pop().unwrap();
    let peers = BTreeMap::from([(1, l.local_addr().unwrap().to_string())]);
    // Lease 300 ms: a prepared placement waits 12 leases (3.6 s) for its workers.
    let node = start(1, l, &peers, &dir, false, 300).await;
    let client = CoordinatorClient::new(&node.address).unwrap();
    let first = client
        .join(
            &registration(1),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || Beat {
                load: None,
                prepared_epoch: u64::MAX,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id();
    // Heartbeats, but never reports a prepared placement.
    let stuck = client
        .join(
            &registration(2),
            Duration::from_secs(10),
            Duration::from_millis(50),
            Beat::default,
        )
        .await
        .unwrap()
        .id();
    eventually("a placement prepared for the new worker", || {
        node.coordinator.view().pending.is_some()
    })
    .await;
    let started = Instant::now();
    eventually("the stuck placement replaced and committed", || {
        let v = node.coordinator.view();
        v.pending.is_none() && v.placement.epoch >= 2
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "gave up too early"
    );
    let v = node.coordinator.view();
    assert_eq!(v.placement.experts_of(first).len(), 8);
    assert!(v.placement.experts_of(stuck).is_empty());
    assert!(v.member(stuck).unwrap().alive);
    let _ = node.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_get_typed_errors_and_change_nothing() {
    use expertmesh_proto::v1 as pb;
    use expertmesh_proto::v1::coordinator_service_client::CoordinatorServiceClient;
    let dir = scratch("hostile");
    let mut ls = listeners(1).await;
    let l = ls.pop().unwrap();
    let peers = BTreeMap::from([(1, l.local_addr().unwrap().to_string())]);
    let node = start(1, l, &peers, &dir, false, 60_000).await;
    eventually("an initialized cluster", || {
        node.coordinator.view().unservable.as_deref() == Some("no expert worker has registered")
    })
    .await;
    let before = node.coordinator.view();
    let mut raw = CoordinatorServiceClient::connect(format!("http://{}", node.address))
        .await
        .unwrap();
    let garbage = raw
        .raft(pb::RaftMessages {
            from: 2,
            messages: vec![vec![0xff; 64]],
        })
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage}");
    let too_many = raw
        .raft(pb::RaftMessages {
            from: 2,
            messages: vec![Vec::new(); 5000],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    let long_address = raw
        .register(pb::RegisterRequest {
            role: pb::Role::ExpertWorker as i32,
            address: "x".repeat(10_000),
            model_fingerprint: "fp".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(long_address.code(), tonic::Code::InvalidArgument);
    let bad_role = raw
        .register(pb::RegisterRequest {
            role: 99,
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_role.code(), tonic::Code::InvalidArgument);
    let wrong_model = raw
        .register(pb::RegisterRequest {
            role: pb::Role::ExpertWorker as i32,
            address: "127.0.0.1:1".into(),
            model_fingerprint: "another model".into(),
            request_id: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_model.code(), tonic::Code::FailedPrecondition);
    let unknown = raw
        .drain(pb::DrainRequest { worker_id: 42 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let no_id = raw
        .change_coordinators(pb::ChangeCoordinatorsRequest {
            id: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_id.code(), tonic::Code::InvalidArgument);
    for (group, offer) in [
        ("g", vec![1u8; 127]),
        ("", vec![1u8; 128]),
        (&*"x".repeat(129), vec![1u8; 128]),
    ] {
        let bad = raw
            .nccl_id(pb::NcclIdRequest {
                group: group.into(),
                offer,
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{group:?}");
    }
    let unknown = raw
        .nccl_id(pb::NcclIdRequest {
            group: "g".into(),
            offer: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let after = node.coordinator.view();
    assert_eq!(after.members, before.members);
    assert_eq!(after.placement, before.placement);
    assert_eq!(node.coordinator.status().role.name(), "leader");
    let _ = node.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_declared_dead_registers_again_under_a_new_id() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = scratch("rejoin");
    let l = listeners(1).await.pop().unwrap();
    let peers = BTreeMap::from([(1, l.local_addr().unwrap().to_string())]);
    let node = start(1, l, &peers, &dir, false, 300).await;
    // Told to stall, its next beat comes 1.5 s late: five leases, as if cut off. The worker
    // runs on a runtime of its own (a process of its own, stalled), so that the stall does
    // not also stop the coordinator's failure detector in this one.
    let stall = std::sync::Arc::new(AtomicBool::new(false));
    let stalls = stall.clone();
    let (joined, membership) = tokio::sync::oneshot::channel();
    let (stop_worker, stopped) = tokio::sync::oneshot::channel::<()>();
    let address = node.address.clone();
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = CoordinatorClient::new(&address).unwrap();
            let m = client
                .join(
                    &registration(1),
                    Duration::from_secs(10),
                    Duration::from_millis(50),
                    move || {
                        if stalls.swap(false, Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(1500));
                        }
                        Beat {
                            load: None,
                            prepared_epoch: u64::MAX,
                            ..Default::default()
                        }
                    },
                )
                .await
                .unwrap();
            let _ = joined.send(m);
            let _ = stopped.await;
        });
    });
    let membership = membership.await.unwrap();
    let first = membership.id();
    eventually("the worker placed", || {
        node.coordinator.view().placement.experts_of(first).len() == 8
    })
    .await;
    stall.store(true, Ordering::SeqCst);
    eventually("the worker registered again", || membership.id() != first).await;
    let again = membership.id();
    eventually("its experts placed on the new id", || {
        let v = node.coordinator.view();
        v.member(again).is_some_and(|m| m.alive) && v.placement.experts_of(again).len() == 8
    })
    .await;
    // The old id stays dead: nothing is placed on it again.
    let v = node.coordinator.view();
    assert!(!v.member(first).unwrap().alive);
    assert!(v.placement.experts_of(first).is_empty());
    let _ = stop_worker.send(());
    worker.join().unwrap();
    let _ = node.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker beats at once when it has loaded a pending placement (`Membership::beat_now`),
/// and the leader commits at once when every gaining worker has: the placement does not wait
/// for the next heartbeat tick (a minute here) or the next placement check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_commits_as_soon_as_its_worker_says_it_loaded() {
    let dir = scratch("beat-now");
    let mut ls = listeners(1).await;
    let l = ls.pop().unwrap();
    let peers = BTreeMap::from([(1, l.local_addr().unwrap().to_string())]);
    // A lease of three minutes: a beat a minute.
    let node = start(1, l, &peers, &dir, false, 180_000).await;
    let client = CoordinatorClient::new(&node.address).unwrap();
    // The first worker takes every expert as it registers; the second is planned for.
    client
        .join(
            &registration(1),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || Beat {
                prepared_epoch: u64::MAX,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let loaded = Arc::new(AtomicU64::new(0));
    let reported = loaded.clone();
    let membership = client
        .join(
            &registration(2),
            Duration::from_secs(10),
            Duration::from_secs(60),
            move || Beat {
                prepared_epoch: reported.load(Ordering::Relaxed),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually("a placement prepared for the worker", || {
        node.coordinator.view().pending.is_some()
    })
    .await;
    let epoch = node.coordinator.view().pending.as_ref().unwrap().epoch;
    loaded.store(epoch, Ordering::Relaxed);
    membership.beat_now();
    // Within `eventually`'s 30 s: half the tick the beat would otherwise have waited for.
    eventually("the placement committed", || {
        node.coordinator.view().placement.epoch == epoch
    })
    .await;
    let view = node.coordinator.view();
    assert!(!view.placement.experts_of(membership.id()).is_empty());
    let _ = node.stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}
