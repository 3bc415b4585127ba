//! The attention-worker process: configuration and the main loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_coordinator::{
    Beat, ClusterView, CoordinatorClient, Member, Membership, Placement, Registration, Role,
};
use expertmesh_dispatch::{InProcessDispatch, Transport};
use expertmesh_expert_worker::node::bind;
use expertmesh_expert_worker::node::has_weights;
use expertmesh_expert_worker::weight_file::WeightFile;
pub use expertmesh_expert_worker::NodeError;
use expertmesh_expert_worker::{Assignment, Batcher, BatcherConfig, ExpertShard, WorkerConfig};
use expertmesh_model::{ImageLimits, Model, ModelSource, SafetensorsCheckpoint, WeightSource};
use tokio::sync::watch;

use std::sync::atomic::Ordering;

use expertmesh_proto::v1 as pb;

use crate::dense::{DenseSource, DenseWeights, GrpcDenseSource};
use crate::remote::{Connector, DispatchConfig, DispatchStats, RemoteExperts};
use crate::scheduler::{Engine, EngineStats, SchedulerConfig};
use crate::service::AttentionServer;

/// Attention-worker settings (TOML: `deploy/attention-worker.toml`).
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionWorkerConfig {
    pub worker: WorkerConfig,
    pub dispatch: DispatchConfig,
    pub scheduler: SchedulerConfig,
    /// Bounds on a request's images (the gateway applies the same ones first).
    pub images: ImageLimits,
    /// The most this worker sends to attention workers that fetch the dense weights from it,
    /// in megabits per second (0: no limit).
    pub migration_mbps: u64,
}

impl AttentionWorkerConfig {
    pub fn validate(self) -> Result<Self, NodeError> {
        let worker = self.worker.validate()?;
        self.dispatch.validate()?;
        Ok(Self { worker, ..self })
    }
}

/// The worker id the routed experts have under `--dispatch local`: this process.
pub const LOCAL_WORKER: u64 = 0;

/// Loads the model without its routed experts (from `weights`, else `source`'s files) and
/// connects them through the coordinator:
/// what an attention worker, and `generate --expert-workers`, run on. The transport comes
/// from `dispatch.transport`: `grpc` reaches the expert workers the placement names; `local`
/// holds every routed expert in this process, behind the same seam (an in-process shard and
/// its batcher, one fixed placement), with no expert workers and no sockets.
pub async fn connect(
    source: &ModelSource,
    weights: Option<&dyn WeightSource>,
    coordinator: &str,
    dispatch: DispatchConfig,
    (device, gemm): (expertmesh_model::Device, expertmesh_model::GemmPrecision),
) -> Result<(Arc<Model>, RemoteExperts, CoordinatorClient), NodeError> {
    dispatch.validate()?;
    let config = source.config()?;
    let files;
    let weights = match weights {
        Some(w) => w,
        None => {
            files = source.weights()?;
            files.as_ref()
        }
    };
    let mut model = Model::without_experts(config.clone(), weights)?;
    model.load_vision(source.vision_config()?, weights)?;
    model.to_device_with(device, gemm)?;
    if device == expertmesh_model::Device::Cpu
        && gemm == expertmesh_model::GemmPrecision::Bf16
        && !expertmesh_model::kernels::bf16_dot_in_hardware()
    {
        tracing::warn!(
            "--gemm bf16 without AVX512-BF16: its products are emulated, bit for bit and \
             several times slower than f32 (a mixed cluster computes as one process does)"
        );
    }
    let model = Arc::new(model);
    let client = CoordinatorClient::new(coordinator)?;
    let (connector, views) = match dispatch.transport {
        t @ (Transport::Grpc | Transport::Tcp) => (Connector::Socket(t), client.watch()),
        Transport::Local => {
            let shard = Arc::new(ExpertShard::with_device(&config, weights, device, gemm)?);
            let everything = Assignment {
                epoch: 0,
                experts: (0..config.num_local_experts as u32).collect(),
            };
            shard.assign(everything);
            let batcher = Batcher::spawn(shard, BatcherConfig::default());
            let local = Arc::new(InProcessDispatch::new(Arc::new(batcher)));
            let (_, views) = watch::channel(Some(Arc::new(local_view(config.num_local_experts))));
            (Connector::Local(local), views)
        }
        Transport::Nccl => unreachable!("refused by DispatchConfig::validate"),
    };
    let c = model.config();
    let experts = RemoteExperts::new(
        tokio::runtime::Handle::current(),
        (client.clone(), views),
        connector,
        dispatch,
        c,
    );
    Ok((model, experts, client))
}

/// The one placement of `--dispatch local`: every expert on this process, epoch 0.
fn local_view(num_experts: usize) -> ClusterView {
    ClusterView {
        members: vec![Member {
            id: LOCAL_WORKER,
            role: Role::ExpertWorker,
            address: "in-process".into(),
            pid: std::process::id(),
            alive: true,
            capacity: None,
            draining: false,
            holds_experts: false,
            weightless: false,
            backup: 0,
        }],
        placement: Placement {
            epoch: 0,
            experts: vec![vec![LOCAL_WORKER]; num_experts],
        },
        num_experts,
        ..ClusterView::default()
    }
}

/// Runs an attention worker until `shutdown` completes.
pub async fn run(
    config: AttentionWorkerConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    config.worker.device.check()?;
    let source: ModelSource = config.worker.model.parse()?;
    // Without the weights on disk, the dense weights come from another attention worker.
    let fetched = if has_weights(&source) {
        None
    } else {
        Some(fetch_dense_weights(&config, &source).await?)
    };
    // The checkpoint the model loads from (opened once), which is also what this worker
    // sends to attention workers that start without the weights.
    let checkpoint = match (&fetched, &source) {
        (Some(f), _) => Some(f.shared_weights()),
        (None, ModelSource::Dir(d)) => Some(Arc::new(SafetensorsCheckpoint::open(d)?)),
        (None, ModelSource::Synthetic(_)) => None,
    };
    let (model, experts, client) = connect(
        &source,
        checkpoint.as_deref().map(|c| c as &dyn WeightSource),
        &config.worker.coordinator,
        config.dispatch,
        (config.worker.device, config.worker.gemm),
    )
    .await?;
    if let Some(f) = &fetched {
        // Loaded: the file needs no name any more.
        f.unlink()?;
    }
    let dense = checkpoint.map(DenseWeights::new);
    // When the weights are this worker's own files, their digest for the coordinators.
    let dense_digest = Arc::new(std::sync::OnceLock::new());
    if let (None, Some(dense)) = (&fetched, dense.clone()) {
        let digest = dense_digest.clone();
        tokio::task::spawn_blocking(move || digest.set(dense.digest()));
    }
    let dispatch_stats = experts.stats().clone();
    let engine = Engine::spawn(model.clone(), experts, config.scheduler);
    let engine_stats = engine.stats().clone();
    let (e, d) = (engine_stats.clone(), dispatch_stats.clone());
    let metrics =
        expertmesh_expert_worker::node::bind_metrics(config.worker.metrics.as_deref()).await?;
    expertmesh_expert_worker::node::serve_metrics(
        metrics,
        Arc::new(move || render_metrics(&e, &d)),
    );
    let load = move || Beat {
        load: Some(worker_load(&engine_stats, &dispatch_stats)),
        prepared_epoch: 0,
        dense_digest: dense_digest.get().copied(),
        ..Default::default()
    };
    let (listener, bound) = bind(&config.worker.listen).await?;
    on_listening(bound);
    let membership = client
        .join(
            &Registration {
                role: Role::AttentionWorker,
                address: config
                    .worker
                    .advertise
                    .clone()
                    .unwrap_or_else(|| bound.to_string()),
                capacity: None,
                model_fingerprint: source.fingerprint()?,
                join_token: config.worker.join_token.clone(),
                holds_experts: config.dispatch.transport == Transport::Local,
                weightless: false,
                backup: 0,
            },
            Duration::from_millis(config.worker.register_patience_ms),
            Duration::from_millis(config.worker.heartbeat_interval_ms),
            load,
        )
        .await?;
    let drained = drained(client.watch(), membership.clone(), engine.clone());
    let (_health, health) = expertmesh_proto::health::service();
    expertmesh_proto::server_builder()
        .add_service(health)
        .add_service(
            AttentionServer::new(model, engine)
                .with_images(source.processor_config()?, config.images)
                .with_grammars(source.grammars()?)
                .with_dense_weights(dense)
                .with_migration_mbps(config.migration_mbps)
                .into_service(),
        )
        .serve_with_incoming_shutdown(expertmesh_proto::incoming(listener), async {
            tokio::select! {
                _ = shutdown => {}
                _ = drained => tracing::info!("attention worker {}: drained, stopping", membership.id()),
            }
        })
        .await?;
    Ok(())
}

/// Takes the dense weights from a live attention worker into a file in the temporary
/// directory, checked against the digest the coordinators hold (waiting up to the register
/// patience for one to be recorded and for a sender to be up).
async fn fetch_dense_weights(
    config: &AttentionWorkerConfig,
    source: &ModelSource,
) -> Result<WeightFile, NodeError> {
    if config.dispatch.transport == Transport::Local {
        return Err(NodeError::config(
            "dispatch.transport",
            "local needs the routed experts' files: a worker without the weights takes its dense weights from peers and its experts from expert workers",
        ));
    }
    let client = CoordinatorClient::new(&config.worker.coordinator)?;
    let mut views = client.watch();
    let give_up =
        tokio::time::Instant::now() + Duration::from_millis(config.worker.register_patience_ms);
    let view = loop {
        let view = views.borrow_and_update().clone();
        let senders = view.as_ref().map_or(0, |v| v.count(Role::AttentionWorker));
        let ready = view.as_ref().is_some_and(|v| v.dense_digest.is_some());
        if senders > 0 && (ready || tokio::time::Instant::now() >= give_up) {
            break view.expect("a view with senders");
        }
        match tokio::time::timeout_at(give_up, views.changed()).await {
            Ok(Ok(())) => {}
            // Out of patience, or no more views: go with the senders there are.
            _ if senders > 0 => break view.expect("a view with senders"),
            _ => return Err(crate::dense::no_sender().into()),
        }
    };
    let sources: Vec<Arc<dyn DenseSource>> = view
        .members
        .iter()
        .filter(|m| m.alive && !m.draining && m.role == Role::AttentionWorker)
        .map(|m| Arc::new(GrpcDenseSource::new(&m.address)) as Arc<dyn DenseSource>)
        .collect();
    if view.dense_digest.is_none() {
        tracing::warn!(
            "attention worker: the coordinators hold no digest of the dense weights yet: they are checked against their sender's CRCs only"
        );
    }
    let dir = std::env::temp_dir().join(format!("expertmesh-dense-{}", std::process::id()));
    tracing::info!(
        "attention worker: {source} holds no weights: the dense weights come from peers (file in {})",
        dir.display()
    );
    let started = std::time::Instant::now();
    let (file, peer) = crate::dense::fetch_dense(&dir, &sources, view.dense_digest).await?;
    tracing::info!(
        "attention worker: took the dense weights from {peer} in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(file)
}

/// Completes once the cluster has this worker draining and its engine, told to drain, has
/// let go of every request (they resume on other attention workers).
async fn drained(
    mut views: watch::Receiver<Option<Arc<ClusterView>>>,
    membership: Membership,
    engine: Engine,
) {
    loop {
        let id = membership.id();
        let draining = views
            .borrow_and_update()
            .as_ref()
            .is_some_and(|v| v.members.iter().any(|m| m.id == id && m.draining));
        if draining {
            break;
        }
        if views.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
    engine.drain();
    while !engine.drained() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The load an attention worker reports with its heartbeat.
pub fn worker_load(engine: &EngineStats, dispatch: &DispatchStats) -> pb::WorkerLoad {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    pb::WorkerLoad {
        free_kv_blocks: engine.free_blocks(),
        total_kv_blocks: get(&engine.kv_blocks_total),
        running: get(&engine.running),
        waiting: get(&engine.waiting),
        steps: get(&engine.steps),
        tokens_generated: get(&engine.tokens_generated),
        routed_tokens: dispatch.routed_tokens.iter().map(get).collect(),
        num_experts: dispatch.num_experts as u32,
        dispatches: get(&dispatch.dispatches),
        dispatch_seconds: get(&dispatch.dispatch_nanos) as f64 / 1e9,
        step_seconds: get(&engine.step_nanos) as f64 / 1e9,
        forward_seconds: get(&engine.forward_nanos) as f64 / 1e9,
        expert_wait_seconds: get(&dispatch.wait_nanos) as f64 / 1e9,
        routed_batches: get(&dispatch.routed_batches),
        routed_batch_seconds: get(&dispatch.routed_batch_nanos) as f64 / 1e9,
        prefix_queried_tokens: get(&engine.prefix_queried_tokens),
        prefix_hit_tokens: get(&engine.prefix_hit_tokens),
        prefix_evicted_blocks: get(&engine.prefix_evicted_blocks),
        prefix_cached_blocks: get(&engine.prefix_cached_blocks),
    }
}

/// The attention worker's figures as Prometheus text (its `/metrics`): the engine's steps
/// and where their time went, its sequences and KV blocks, the prefix cache, and the
/// routed batches it dispatched.
pub fn render_metrics(engine: &EngineStats, dispatch: &DispatchStats) -> String {
    use expertmesh_proto::metrics::write_family;
    let l = worker_load(engine, dispatch);
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut out = String::new();
    let figures = [
        (
            "expertmesh_engine_steps_total",
            "Batched forward steps.",
            l.steps as f64,
        ),
        (
            "expertmesh_engine_step_seconds_total",
            "Time in steps: planning, the forward pass, sampling, handing tokens on.",
            l.step_seconds,
        ),
        (
            "expertmesh_engine_forward_seconds_total",
            "Time in the forward pass.",
            l.forward_seconds,
        ),
        (
            "expertmesh_engine_expert_wait_seconds_total",
            "Time blocked waiting for routed experts' answers.",
            l.expert_wait_seconds,
        ),
        (
            "expertmesh_engine_tokens_forwarded_total",
            "Tokens run through the model (prompt chunks and decode tokens).",
            get(&engine.tokens_forwarded),
        ),
        (
            "expertmesh_engine_tokens_generated_total",
            "Tokens sampled.",
            l.tokens_generated as f64,
        ),
        (
            "expertmesh_engine_preemptions_total",
            "Sequences preempted for KV blocks.",
            get(&engine.preemptions),
        ),
        (
            "expertmesh_engine_forks_total",
            "Choices that took another choice's prompt.",
            get(&engine.forks),
        ),
        (
            "expertmesh_running_sequences",
            "Sequences in the running batch.",
            l.running as f64,
        ),
        (
            "expertmesh_queue_depth",
            "Requests waiting for admission.",
            l.waiting as f64,
        ),
        (
            "expertmesh_kv_blocks_used",
            "KV blocks held by sequences (those only the prefix cache holds count as free).",
            (l.total_kv_blocks - l.free_kv_blocks) as f64,
        ),
        (
            "expertmesh_kv_blocks_total",
            "KV blocks in the pool.",
            l.total_kv_blocks as f64,
        ),
        (
            "expertmesh_prefix_cache_queried_tokens_total",
            "Prompt tokens of the sequences admitted.",
            l.prefix_queried_tokens as f64,
        ),
        (
            "expertmesh_prefix_cache_hit_tokens_total",
            "Prompt tokens taken from cached KV blocks.",
            l.prefix_hit_tokens as f64,
        ),
        (
            "expertmesh_prefix_cache_evicted_blocks_total",
            "Cached KV blocks given up for room.",
            l.prefix_evicted_blocks as f64,
        ),
        (
            "expertmesh_prefix_cache_blocks",
            "KV blocks the prefix cache holds.",
            l.prefix_cached_blocks as f64,
        ),
        (
            "expertmesh_dispatches_total",
            "Pieces of routed batches sent to expert workers.",
            l.dispatches as f64,
        ),
        (
            "expertmesh_dispatch_seconds_total",
            "Their round trips, in all.",
            l.dispatch_seconds,
        ),
        (
            "expertmesh_routed_batches_total",
            "Routed batches (every piece of one MoE layer's batch).",
            l.routed_batches as f64,
        ),
        (
            "expertmesh_routed_batch_seconds_total",
            "Their time from the start to the last answer, in all.",
            l.routed_batch_seconds,
        ),
    ];
    for (name, help, value) in figures {
        write_family(&mut out, name, help, &[(String::new(), value)]);
    }
    out
}
