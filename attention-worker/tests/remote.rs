//! The attention side against real expert workers over gRPC, in one test process: a batch
//! of several sequences (split into two ping-ponging micro-batches) gives exactly the
//! logits and routes of the single-process engine, prefill and decode alike, also when a
//! worker joins mid-run and the placement moves to a new epoch.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fixture;
use expertmesh_attention_worker::{connect, DispatchConfig};
use expertmesh_coordinator::{Coordinator, NodeConfig};
use expertmesh_expert_worker::{ExpertWorkerConfig, WorkerConfig};
use expertmesh_model::{LogitRows, Model, ModelSource, Sequence};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_batched_remote_forward_equals_local() {
    let model_dir = fixture("tiny-scout");
    let source: ModelSource = model_dir.parse().unwrap();
    let config = source.config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator_addr = listener.local_addr().unwrap().to_string();
    let data_dir = std::env::temp_dir().join(format!("expertmesh-remote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let (coordinator, _) = Coordinator::start(NodeConfig::single(
        &data_dir,
        source.fingerprint().unwrap(),
        config.num_local_experts,
    ))
    .unwrap();
    tokio::spawn(expertmesh_coordinator::serve(
        coordinator.clone(),
        listener,
        std::future::pending(),
    ));
    let worker = ExpertWorkerConfig {
        worker: WorkerConfig {
            coordinator: coordinator_addr.clone(),
            model: model_dir.clone(),
            ..WorkerConfig::default()
        },
        ..ExpertWorkerConfig::default()
    };
    for _ in 0..3 {
        tokio::spawn(expertmesh_expert_worker::run(
            worker.clone(),
            |_| {},
            std::future::pending(),
        ));
    }
    let (remote_model, experts, _) = connect(
        &source,
        None,
        &coordinator_addr,
        DispatchConfig::default(),
        Default::default(),
    )
    .await
    .unwrap();
    // Wait for all three workers to be in the placement.
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while coordinator.view().members.len() < 3 || coordinator.view().unservable.is_some() {
        assert!(
            std::time::Instant::now() < give_up,
            "workers did not register"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    experts.ready(Duration::from_secs(10)).await.unwrap();

    let local = Model::load(Path::new(&model_dir)).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        (1..20).collect(),
        vec![697, 318, 676, 661, 546],
        (100..131).collect(),
        vec![5, 6],
    ];
    let runtime = tokio::runtime::Handle::current();
    let epoch_before = coordinator.view().placement.epoch;
    let epochs = coordinator.clone();
    tokio::task::spawn_blocking(move || {
        let run = |model: &Model, remote: bool| {
            let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
            let mut outputs = Vec::new();
            let mut tokens = prompts.clone();
            for _ in 0..3 {
                let mut batch: Vec<Sequence<'_>> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(cache, t)| Sequence::new(cache, t))
                    .collect();
                let out = if remote {
                    model
                        .forward_with(&mut batch, LogitRows::All, &experts)
                        .unwrap()
                } else {
                    model.forward(&mut batch, LogitRows::All).unwrap()
                };
                // Next step: each sequence's argmax at its last position.
                let mut end = 0;
                tokens = tokens
                    .iter()
                    .map(|t| {
                        end += t.len();
                        vec![expertmesh_model::sampling::argmax(out.row(end - 1))]
                    })
                    .collect();
                outputs.push((out.logits, out.routes));
                if remote && outputs.len() == 1 {
                    // A fourth worker joins between steps: the placement moves to a new
                    // epoch, and batches sent under the old one are re-sent.
                    runtime.spawn(expertmesh_expert_worker::run(
                        worker.clone(),
                        |_| {},
                        std::future::pending(),
                    ));
                    let give_up = std::time::Instant::now() + Duration::from_secs(30);
                    while epochs.view().placement.epoch == epoch_before {
                        assert!(std::time::Instant::now() < give_up, "no new epoch");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            outputs
        };
        let expected = run(&local, false);
        let got = run(&remote_model, true);
        for (step, (e, g)) in expected.iter().zip(&got).enumerate() {
            assert!(e.0 == g.0, "step {step}: logits differ");
            assert_eq!(e.1, g.1, "step {step}: routes differ");
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}
