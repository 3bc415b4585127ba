//! The routing policy carried out over the `Dispatch` seam, without sockets: `--dispatch
//! local` gives the single process's logits bit for bit, and the fault-injecting double in
//! front of two copies of every expert shows each fault routed around (or failing in time)
//! as `routing.rs`'s table says.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fixture;
use expertmesh_attention_worker::remote::Connector;
use expertmesh_attention_worker::{connect, DispatchConfig, RemoteExperts};
use expertmesh_coordinator::{ClusterView, CoordinatorClient, Member, Placement, Role};
use expertmesh_dispatch::{Dispatch, Fault, FaultyDispatch, InProcessDispatch, Transport};
use expertmesh_expert_worker::{Assignment, Batcher, BatcherConfig, ExpertShard};
use expertmesh_model::{Forward, LogitRows, Model, ModelError, ModelSource, Sequence};

fn prompts() -> Vec<Vec<u32>> {
    vec![(1..20).collect(), vec![697, 318, 676, 661, 546], vec![5, 6]]
}

/// One step of every prompt (a micro-batched batch) through `model`.
fn step(model: &Model, runner: Option<&RemoteExperts>) -> Result<Forward, ModelError> {
    let mut caches: Vec<_> = prompts().iter().map(|_| model.new_cache()).collect();
    let prompts = prompts();
    let mut batch: Vec<Sequence<'_>> = caches
        .iter_mut()
        .zip(&prompts)
        .map(|(cache, tokens)| Sequence::new(cache, tokens))
        .collect();
    match runner {
        Some(r) => model.forward_with(&mut batch, LogitRows::All, r),
        None => model.forward(&mut batch, LogitRows::All),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dispatch_equals_the_single_process() {
    let dir = fixture("tiny-scout");
    let source: ModelSource = dir.parse().unwrap();
    let dispatch = DispatchConfig {
        transport: Transport::Local,
        ..DispatchConfig::default()
    };
    // No coordinator is reached: `local` routes under its own fixed placement.
    let (model, experts, _) = connect(&source, None, "127.0.0.1:1", dispatch, Default::default())
        .await
        .unwrap();
    let single = Model::load(Path::new(&dir)).unwrap();
    tokio::task::spawn_blocking(move || {
        let want = step(&single, None).unwrap();
        let got = step(&model, Some(&experts)).unwrap();
        assert!(want.logits == got.logits, "logits differ");
        assert_eq!(want.routes, got.routes);
    })
    .await
    .unwrap();
}

/// Two workers (addresses "w1", "w2") each holding every expert under epoch 5, each behind
/// its own fault double.
struct TwoCopies {
    model: Arc<Model>,
    single: Model,
    runner: RemoteExperts,
    workers: HashMap<String, Arc<FaultyDispatch>>,
    /// Keeps the placement watch open for the runner.
    _views: tokio::sync::watch::Sender<Option<Arc<ClusterView>>>,
}

async fn two_copies(timeout_ms: u64) -> TwoCopies {
    let dir = fixture("tiny-scout");
    let source: ModelSource = dir.parse().unwrap();
    let config = source.config().unwrap();
    let weights = source.weights().unwrap();
    let mut workers = HashMap::new();
    for name in ["w1", "w2"] {
        let shard = Arc::new(ExpertShard::new(&config, weights.as_ref()).unwrap());
        shard.assign(Assignment {
            epoch: 5,
            experts: (0..config.num_local_experts as u32).collect(),
        });
        let batcher = Arc::new(Batcher::spawn(shard, BatcherConfig::default()));
        let inner: Arc<dyn Dispatch> = Arc::new(InProcessDispatch::new(batcher));
        workers.insert(name.to_string(), Arc::new(FaultyDispatch::new(inner)));
    }
    let member = |id: u64, address: &str| Member {
        id,
        role: Role::ExpertWorker,
        address: address.into(),
        pid: 0,
        alive: true,
        capacity: None,
        draining: false,
        holds_experts: false,
        weightless: false,
        backup: 0,
    };
    let view = ClusterView {
        members: vec![member(1, "w1"), member(2, "w2")],
        placement: Placement {
            epoch: 5,
            experts: vec![vec![1, 2]; config.num_local_experts],
        },
        num_experts: config.num_local_experts,
        ..ClusterView::default()
    };
    let (keep, views) = tokio::sync::watch::channel(Some(Arc::new(view)));
    let doubles = workers.clone();
    let connector = Connector::Custom(Arc::new(move |address: &str| -> Arc<dyn Dispatch> {
        doubles[address].clone()
    }));
    let model = Model::without_experts(config.clone(), weights.as_ref()).unwrap();
    let runner = RemoteExperts::new(
        tokio::runtime::Handle::current(),
        (CoordinatorClient::new("127.0.0.1:1").unwrap(), views),
        connector,
        DispatchConfig {
            timeout_ms,
            epoch_retries: 2,
            ..DispatchConfig::default()
        },
        &config,
    );
    TwoCopies {
        model: Arc::new(model),
        single: Model::load(Path::new(&dir)).unwrap(),
        runner,
        workers,
        _views: keep,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_routed_around_or_fail_in_time() {
    let t = two_copies(2_000).await;
    let (w1, w2) = (t.workers["w1"].clone(), t.workers["w2"].clone());
    tokio::task::spawn_blocking(move || {
        let want = step(&t.single, None).unwrap();
        let exact = |f: Result<Forward, ModelError>, what: &str| {
            let f = f.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(f.logits == want.logits, "{what}: logits differ");
        };
        // Both copies answer (rows spread by rows in flight): exact.
        exact(step(&t.model, Some(&t.runner)), "healthy");
        assert!(w1.calls() > 0 && w2.calls() > 0, "both copies used");

        // A worker shutting down (and then one whose batches are lost): avoided, its rows
        // go to the other copy, the answer stays exact.
        w1.script([Fault::Unavailable]);
        w1.always(Fault::Drop);
        exact(step(&t.model, Some(&t.runner)), "w1 unavailable");
        let (c1, c2) = (w1.calls(), w2.calls());
        exact(step(&t.model, Some(&t.runner)), "w1 suspected");
        assert_eq!(w1.calls(), c1, "a suspect gets nothing");
        assert!(w2.calls() > c2);

        // A late answer within the deadline is just late.
        w2.script([Fault::Delay(Duration::from_millis(50))]);
        exact(step(&t.model, Some(&t.runner)), "w2 late");

        // The worker claims a newer placement that never comes: retried, then a typed
        // error naming the cause.
        w2.script([Fault::WrongEpoch(6)]);
        let err = step(&t.model, Some(&t.runner)).unwrap_err();
        assert!(
            matches!(&err, ModelError::ExpertsUnavailable { reason, .. } if reason.contains("placement")),
            "{err}"
        );

        // The last copy hangs: the batch fails at its deadline, not later.
        w2.always(Fault::Hang);
        let started = std::time::Instant::now();
        let err = step(&t.model, Some(&t.runner)).unwrap_err();
        assert!(matches!(err, ModelError::ExpertsUnavailable { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    })
    .await
    .unwrap();
}
