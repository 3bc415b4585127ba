//! The attention-worker process: configuration and the main loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_coordinator::{
    Beat, ClusterView, CoordinatorClient, Member, Placement, Registration, Role,
};
use expertmesh_dispatch::{InProcessDispatch, Transport};
use expertmesh_expert_worker::node::bind;
pub use expertmesh_expert_worker::NodeError;
use expertmesh_expert_worker::{Assignment, Batcher, BatcherConfig, ExpertShard};
use expertmesh_model::{Model, ModelSource};
use tokio::sync::watch;

use std::sync::atomic::Ordering;

use expertmesh_proto::v1 as pb;

use crate::remote::{Connector, DispatchConfig, DispatchStats, RemoteExperts};
use crate::scheduler::{Engine, EngineStats, SchedulerConfig};
use crate::service::AttentionServer;

/// Attention-worker settings (TOML: `deploy/attention-worker.toml`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionWorkerConfig {
    /// Coordinator address, `host:port`.
    pub coordinator: String,
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// Address other processes reach this worker at (default: the bound address).
    pub advertise: Option<String>,
    /// Model directory, or `synthetic:bench`.
    pub model: String,
    pub dispatch: DispatchConfig,
    pub scheduler: SchedulerConfig,
    pub heartbeat_interval_ms: u64,
    /// How long to keep trying to reach the coordinator at start-up, in ms.
    pub register_patience_ms: u64,
    /// The token the coordinators require, if they require one.
    pub join_token: Option<String>,
    /// Where to compute (`cpu`, `cuda:N`).
    pub device: expertmesh_model::Device,
    /// How a CUDA device computes its products (`f32`, `bf16`).
    pub gemm: expertmesh_model::GemmPrecision,
}

impl Default for AttentionWorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "127.0.0.1:7000".into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            model: "tests/fixtures/tiny-maverick".into(),
            dispatch: DispatchConfig::default(),
            scheduler: SchedulerConfig::default(),
            heartbeat_interval_ms: 1000,
            register_patience_ms: 30_000,
            join_token: None,
            device: expertmesh_model::Device::Cpu,
            gemm: expertmesh_model::GemmPrecision::F32,
        }
    }
}

impl AttentionWorkerConfig {
    pub fn validate(self) -> Result<Self, NodeError> {
        if self.coordinator.is_empty() {
            return Err(NodeError::config("coordinator", "is required"));
        }
        for (field, value) in [
            ("dispatch.timeout_ms", self.dispatch.timeout_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ] {
            if value == 0 {
                return Err(NodeError::config(field, "must be positive"));
            }
        }
        Ok(self)
    }
}

/// The worker id the routed experts have under `--dispatch local`: this process.
pub const LOCAL_WORKER: u64 = 0;

/// Loads the model without its routed experts and connects them through the coordinator:
/// what an attention worker, and `generate --expert-workers`, run on. The transport comes
/// from `dispatch.transport`: `grpc` reaches the expert workers the placement names; `local`
/// holds every routed expert in this process, behind the same seam (an in-process shard and
/// its batcher, one fixed placement), with no expert workers and no sockets.
pub async fn connect(
    source: &ModelSource,
    coordinator: &str,
    dispatch: DispatchConfig,
    (device, gemm): (expertmesh_model::Device, expertmesh_model::GemmPrecision),
) -> Result<(Arc<Model>, RemoteExperts, CoordinatorClient), NodeError> {
    let config = source.config()?;
    let weights = source.weights()?;
    let mut model = Model::without_experts(config.clone(), weights.as_ref())?;
    model.to_device_with(device, gemm)?;
    let model = Arc::new(model);
    let client = CoordinatorClient::new(coordinator)?;
    let (connector, views) = match dispatch.transport {
        Transport::Grpc => (Connector::Grpc, client.watch()),
        Transport::Local => {
            let shard = Arc::new(ExpertShard::with_device(
                &config,
                weights.as_ref(),
                device,
                gemm,
            )?);
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
        Transport::Nccl => {
            return Err(NodeError::config(
                "dispatch.transport",
                "= nccl: NCCL links between attention and expert worker processes are not \
                 built yet (the NCCL transport runs in one process only); use grpc or local",
            ))
        }
    };
    let c = model.config();
    let experts = RemoteExperts::new(
        tokio::runtime::Handle::current(),
        (client.clone(), views),
        connector,
        dispatch,
        (c.moe_layers.len(), c.num_local_experts),
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
    config.device.check()?;
    let source: ModelSource = config.model.parse()?;
    let (model, experts, client) = connect(
        &source,
        &config.coordinator,
        config.dispatch,
        (config.device, config.gemm),
    )
    .await?;
    let dispatch_stats = experts.stats().clone();
    let engine = Engine::spawn(model.clone(), experts, config.scheduler);
    let engine_stats = engine.stats().clone();
    let load = move || Beat {
        load: Some(worker_load(&engine_stats, &dispatch_stats)),
        prepared_epoch: 0,
    };
    let (listener, bound) = bind(&config.listen).await?;
    on_listening(bound);
    client
        .join(
            &Registration {
                role: Role::AttentionWorker,
                address: config
                    .advertise
                    .clone()
                    .unwrap_or_else(|| bound.to_string()),
                capacity: None,
                model_fingerprint: source.fingerprint()?,
                join_token: config.join_token.clone(),
            },
            Duration::from_millis(config.register_patience_ms),
            Duration::from_millis(config.heartbeat_interval_ms),
            load,
        )
        .await?;
    expertmesh_proto::server_builder()
        .add_service(AttentionServer::new(model, engine).into_service())
        .serve_with_incoming_shutdown(expertmesh_proto::incoming(listener), shutdown)
        .await?;
    Ok(())
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
    }
}
