//! The expert-worker process: configuration and the main loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use expertmesh_coordinator::{
    Beat, ClusterView, CoordinatorClient, Membership, Registration, Role,
};
use expertmesh_dispatch::Transport;
use expertmesh_model::ModelSource;

use crate::batcher::{Batcher, BatcherConfig};
use crate::server::ExpertServer;
use crate::shard::{Assignment, ExpertShard};
use crate::transfer::{fetch_expert, ExpertCache};

/// What every worker role is configured with (the `[worker]` section of its TOML): where
/// the coordinators are, where it listens, the model, where it computes, and its heartbeat.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Every coordinator's address, `host:port`, comma-separated.
    pub coordinator: String,
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// Address other processes reach this worker at (default: the bound address).
    pub advertise: Option<String>,
    /// Model directory, or `synthetic:bench`.
    pub model: String,
    /// The token the coordinators require, if they require one.
    pub join_token: Option<String>,
    /// Where to compute (`cpu`, `cuda:N`).
    pub device: expertmesh_model::Device,
    /// How a CUDA device computes its products (`f32`, `bf16`).
    pub gemm: expertmesh_model::GemmPrecision,
    pub heartbeat_interval_ms: u64,
    /// How long to keep trying to reach the coordinator at start-up, in ms.
    pub register_patience_ms: u64,
    /// Serve Prometheus text at `/metrics` on this address.
    pub metrics: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "127.0.0.1:7000".into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            model: "tests/fixtures/tiny-maverick".into(),
            join_token: None,
            device: expertmesh_model::Device::Cpu,
            gemm: expertmesh_model::GemmPrecision::F32,
            heartbeat_interval_ms: 1000,
            register_patience_ms: 30_000,
            metrics: None,
        }
    }
}

impl WorkerConfig {
    pub fn validate(self) -> Result<Self, NodeError> {
        if self.coordinator.is_empty() {
            return Err(NodeError::config("worker.coordinator", "is required"));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(NodeError::config(
                "worker.heartbeat_interval_ms",
                "must be positive",
            ));
        }
        Ok(self)
    }
}

/// Expert-worker settings (TOML: `deploy/expert-worker.toml`).
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpertWorkerConfig {
    pub worker: WorkerConfig,
    /// Experts per MoE layer this worker may hold (default: no limit).
    pub capacity: Option<usize>,
    /// Memory for expert weights, in MiB (default: no limit): caps the experts per MoE layer
    /// at what fits, one copy of an expert counted at its checkpoint's size in every MoE
    /// layer — an FP8 expert half a bf16 one. With `capacity` too, the smaller one holds.
    pub expert_memory_mib: Option<u64>,
    /// The most this worker sends to peers that fetch experts from it, in megabits per
    /// second (0: no limit).
    pub migration_mbps: u64,
    /// Where a worker whose model directory holds no weights keeps the experts it fetches
    /// from peers: a cache file in this directory (default: none, in memory — one copy per
    /// chunk instead of the page cache's copy and the disk's writes; a file lets the system
    /// drop pages it needs back, e.g. once a GPU worker has its experts on the device).
    pub expert_cache: Option<String>,
    /// How such a worker fetches experts from peers: `tcp` (the default: framed, on the
    /// peers' port, `crate::framed_fetch`) or `grpc` (`ExpertService.FetchExperts`).
    pub transfer: Transport,
    /// Experts this worker keeps in host memory as backups, not served (the coordinators
    /// choose them so that every expert has one off its primary workers; a failure's
    /// re-placement takes a lost copy from a backup first). 0: none.
    pub expert_backup: usize,
    pub batcher: BatcherConfig,
}

/// What ends a worker process (expert or attention worker).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid config: `{field}` {reason}")]
    Config { field: &'static str, reason: String },
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Coordinator(#[from] expertmesh_coordinator::ClientError),
    #[error("serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Transfer(#[from] crate::transfer::TransferError),
}

impl NodeError {
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            field,
            reason: reason.into(),
        }
    }
}

impl ExpertWorkerConfig {
    pub fn validate(self) -> Result<Self, NodeError> {
        let worker = self.worker.validate()?;
        for (field, value) in [
            ("batcher.queue_max", self.batcher.queue_max),
            ("batcher.rows_max", self.batcher.rows_max),
        ] {
            if value == 0 {
                return Err(NodeError::config(field, "must be positive"));
            }
        }
        if !matches!(self.transfer, Transport::Tcp | Transport::Grpc) {
            return Err(NodeError::config(
                "transfer",
                format!("is {}: experts travel over tcp or grpc", self.transfer),
            ));
        }
        Ok(Self { worker, ..self })
    }

    /// Experts per MoE layer this worker offers, for experts of `copy_bytes` (one expert in
    /// every MoE layer, `ExpertShard::copy_bytes`).
    pub fn capacity_for(&self, copy_bytes: usize) -> Option<usize> {
        let by_memory = self.expert_memory_mib.map(|mib| {
            let bytes = u128::from(mib) << 20;
            usize::try_from(bytes / copy_bytes.max(1) as u128).unwrap_or(usize::MAX)
        });
        match (self.capacity, by_memory) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Binds `address` (port 0 picks a free one) and returns the listener with its real address.
pub async fn bind(address: &str) -> Result<(tokio::net::TcpListener, SocketAddr), NodeError> {
    let listen_error = |source| NodeError::Listen {
        address: address.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    Ok((listener, bound))
}

/// Binds a worker's `metrics` address, when it has one: before the worker announces its
/// own port, so that a taken port stops the worker before anyone relies on it.
pub async fn bind_metrics(
    address: Option<&str>,
) -> Result<Option<tokio::net::TcpListener>, NodeError> {
    Ok(match address {
        Some(address) => Some(bind(address).await?.0),
        None => None,
    })
}

/// Serves `render()`'s Prometheus text at `/metrics` on `listener` (from `bind_metrics`),
/// when there is one, for as long as the process runs.
pub fn serve_metrics(
    listener: Option<tokio::net::TcpListener>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    if let Some(listener) = listener {
        tokio::spawn(expertmesh_proto::metrics::serve_metrics(
            listener,
            render,
            std::future::pending(),
        ));
    }
}

/// Runs an expert worker until `shutdown` completes. `on_listening` gets the bound address
/// before the worker registers.
pub async fn run(
    config: ExpertWorkerConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let source: ModelSource = config.worker.model.parse()?;
    let model_config = source.config()?;
    // Without the weights on disk, every expert comes from peers into memory (or a cache
    // file, when the config names a directory).
    let cache = if has_weights(&source) {
        None
    } else {
        let dir = config.expert_cache.as_deref().map(std::path::Path::new);
        let into = dir.map_or("memory".into(), |d| {
            format!("a cache file in {}", d.display())
        });
        tracing::info!(
            "expert worker: {source} holds no weights: experts come from peers over {} (into {into})",
            config.transfer,
        );
        Some(Arc::new(ExpertCache::create(dir, &model_config)?))
    };
    let files;
    let weights: &dyn expertmesh_model::WeightSource = match &cache {
        None => {
            files = source.weights()?;
            files.as_ref()
        }
        Some(c) => c.weights(),
    };
    let shard = ExpertShard::with_device(
        &model_config,
        weights,
        config.worker.device,
        config.worker.gemm,
    )?;
    if let Some(c) = &cache {
        // Mapped now: the file needs no name any more.
        c.unlink()?;
    }
    let shard = Arc::new(if cache.is_some() {
        shard.weightless()
    } else {
        shard
    });
    let metrics = bind_metrics(config.worker.metrics.as_deref()).await?;
    let (listener, bound) = bind(&config.worker.listen).await?;
    on_listening(bound);

    let client = CoordinatorClient::new(&config.worker.coordinator)?;
    // The pending placement epoch whose experts this worker has loaded, for heartbeats.
    let prepared = Arc::new(AtomicU64::new(0));
    let reported = prepared.clone();
    let beat_shard = shard.clone();
    let membership = client
        .join(
            &Registration {
                role: Role::ExpertWorker,
                address: config
                    .worker
                    .advertise
                    .clone()
                    .unwrap_or_else(|| bound.to_string()),
                capacity: config.capacity_for(shard.copy_bytes()),
                model_fingerprint: source.fingerprint()?,
                join_token: config.worker.join_token.clone(),
                holds_experts: false,
                weightless: shard.is_weightless(),
                backup: config.expert_backup,
            },
            Duration::from_millis(config.worker.register_patience_ms),
            Duration::from_millis(config.worker.heartbeat_interval_ms),
            move || {
                let (transfers, fetched) = beat_shard.transfer_report();
                Beat {
                    load: None,
                    prepared_epoch: reported.load(Ordering::Relaxed),
                    transfers,
                    fetched,
                    digests: beat_shard.transfers().digests.unrecorded(),
                    dense_digest: None,
                }
            },
        )
        .await?;
    let id = membership.id_cell();
    let fetching = cache.map(|cache| Fetching {
        cache,
        transport: config.transfer,
    });
    tokio::spawn(follow_placement(
        client.watch(),
        shard.clone(),
        fetching,
        membership,
        prepared,
    ));

    let batcher = Batcher::spawn(shard, config.batcher);
    let metered = batcher.clone();
    serve_metrics(
        metrics,
        Arc::new(move || crate::batcher::render_metrics(&metered)),
    );
    // One port for every data path: framed dispatch connections are answered by the same
    // batcher, framed expert fetches by the shard at the service's pace, gRPC ones by the
    // service.
    let server = ExpertServer::new(batcher, id).with_migration_limit(config.migration_mbps);
    let incoming = server.incoming(listener);
    let (_health, health) = expertmesh_proto::health::service();
    expertmesh_proto::server_builder()
        .add_service(health)
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Follows the cluster state: takes each new placement's assignment, and loads the experts a
/// pending placement gives this worker before reporting it prepared (the leader commits the
/// placement once every worker that gains experts is prepared). A worker without the
/// weights (`fetching`) fetches them from the peers that hold them instead.
async fn follow_placement(
    mut views: tokio::sync::watch::Receiver<Option<Arc<ClusterView>>>,
    shard: Arc<ExpertShard>,
    fetching: Option<Fetching>,
    membership: Membership,
    prepared: Arc<AtomicU64>,
) {
    let mut loading = 0;
    let mut digesting: Option<tokio::task::JoinHandle<()>> = None;
    let mut backups = std::collections::BTreeSet::new();
    while views.changed().await.is_ok() {
        let Some(view) = views.borrow_and_update().clone() else {
            continue;
        };
        // Read each time: a worker declared dead registers again under a new id, and from
        // then on holds only what the placement gives that id.
        let worker_id = membership.id();
        if view.unservable.is_none() {
            shard.assign(Assignment {
                epoch: view.placement.epoch,
                experts: view.placement.experts_of(worker_id).into_iter().collect(),
            });
        }
        if fetching.is_none() {
            digest_experts(&shard, &view, worker_id, &mut digesting);
        }
        keep_backups(&shard, fetching.as_ref(), &view, worker_id, &mut backups);
        let Some(pending) = view.pending.clone() else {
            continue;
        };
        if pending.epoch <= prepared.load(Ordering::Relaxed) || pending.epoch == loading {
            continue;
        }
        loading = pending.epoch;
        let held = shard.assignment().experts;
        let gains: std::collections::BTreeSet<u32> = pending
            .experts_of(worker_id)
            .into_iter()
            .filter(|&e| !shard.holds(e) || !held.contains(&e))
            .collect();
        let shard = shard.clone();
        let prepared = prepared.clone();
        let fetching = fetching.clone();
        let membership = membership.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let count = gains.len();
            let bytes = match fetching {
                None => tokio::task::spawn_blocking(move || shard.load(&gains) as u64)
                    .await
                    .unwrap_or(0),
                Some(f) => match fetch_all(&shard, &f, &view, worker_id, &gains).await {
                    Ok(bytes) => {
                        // What loading does beyond reading (a GPU's copy), from the cache.
                        let _ = tokio::task::spawn_blocking(move || shard.load(&gains)).await;
                        bytes
                    }
                    // Not prepared: the leader plans around a worker that never is.
                    Err(e) => return tracing::error!("expert worker {worker_id}: {e}"),
                },
            };
            if count > 0 {
                tracing::info!(
                    "expert worker {worker_id}: loaded {count} experts ({:.1} MB) for epoch {} in {:.0} ms",
                    bytes as f64 / 1e6,
                    pending.epoch,
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
            prepared.fetch_max(pending.epoch, Ordering::Relaxed);
            membership.beat_now();
        });
    }
}

/// Keeps the experts the cluster state makes this worker's backups in host memory, each
/// once: a worker with the files reads their pages in; a weightless one fetches them from
/// peers (held, and served only once a placement gives them to it). Backups it no longer
/// has stay where they are (pages the system may evict; a weightless worker's cache).
fn keep_backups(
    shard: &Arc<ExpertShard>,
    fetching: Option<&Fetching>,
    view: &Arc<ClusterView>,
    me: u64,
    kept: &mut std::collections::BTreeSet<u32>,
) {
    let wanted: std::collections::BTreeSet<u32> = view
        .backups
        .iter()
        .enumerate()
        .filter(|(_, w)| w.contains(&me))
        .map(|(e, _)| e as u32)
        .collect();
    let new: std::collections::BTreeSet<u32> = wanted.difference(kept).copied().collect();
    *kept = wanted;
    if new.is_empty() {
        return;
    }
    let (shard, fetching, view) = (shard.clone(), fetching.cloned(), view.clone());
    tokio::spawn(async move {
        let count = new.len();
        let bytes = match fetching {
            None => tokio::task::spawn_blocking(move || shard.warm(&new))
                .await
                .unwrap_or(0) as u64,
            Some(f) => match fetch_all(&shard, &f, &view, me, &new).await {
                Ok(bytes) => bytes,
                Err(e) => return tracing::warn!("expert worker {me}: backups: {e}"),
            },
        };
        tracing::info!(
            "expert worker {me}: keeping {count} more backup experts in memory ({:.1} MB)",
            bytes as f64 / 1e6
        );
    });
}

/// For a worker with the checkpoint's files: notes the expert digests the cluster state has
/// recorded (logging any expert whose files here differ), and digests the experts the
/// placement gives this worker (committed or pending) in the background, one pass at a
/// time, for the heartbeat to report.
fn digest_experts(
    shard: &Arc<ExpertShard>,
    view: &ClusterView,
    me: u64,
    digesting: &mut Option<tokio::task::JoinHandle<()>>,
) {
    let digests = &shard.transfers().digests;
    for e in digests.recorded(&view.expert_digests) {
        tracing::error!(
            "expert worker {me}: expert {e} in this worker's checkpoint files differs from the digest the coordinators hold"
        );
    }
    if digesting.as_ref().is_some_and(|t| !t.is_finished()) {
        // The next view digests what this one adds.
        return;
    }
    let mut experts = view.placement.experts_of(me);
    if let Some(p) = &view.pending {
        experts.extend(p.experts_of(me));
    }
    let shard = shard.clone();
    *digesting = Some(tokio::task::spawn_blocking(move || {
        shard.transfers().digests.compute(&shard, experts)
    }));
}

/// How a weightless worker takes experts from peers: into its cache, over its transport.
#[derive(Clone)]
struct Fetching {
    cache: Arc<ExpertCache>,
    transport: Transport,
}

/// Fetches every expert of `gains` not held yet from the peers that hold it,
/// [`crate::transfer::FETCHES_IN_FLIGHT`] at a time, logging progress; the bytes fetched.
async fn fetch_all(
    shard: &Arc<ExpertShard>,
    fetching: &Fetching,
    view: &ClusterView,
    me: u64,
    gains: &std::collections::BTreeSet<u32>,
) -> Result<u64, crate::transfer::TransferError> {
    use tokio_stream::StreamExt;
    let wanted: Vec<u32> = gains.iter().copied().filter(|&e| !shard.holds(e)).collect();
    let started = std::time::Instant::now();
    let mut peers = std::collections::BTreeMap::new();
    let plan = view.transfer_sources();
    let undigested = wanted
        .iter()
        .filter(|e| !view.expert_digests.contains_key(e))
        .count();
    if undigested > 0 {
        tracing::warn!(
            "expert worker {me}: the coordinators hold no digest of {undigested} of the experts to fetch yet: those are checked against their senders' CRCs only"
        );
    }
    let mut fetches = tokio_stream::iter(wanted.iter().map(|&e| {
        let planned = plan.get(&(me, e)).copied();
        let sources =
            crate::transfer::sources_for(view, me, e, planned, fetching.transport, &mut peers);
        let digest = view.expert_digests.get(&e).copied();
        let (shard, cache) = (shard.clone(), fetching.cache.clone());
        async move { fetch_expert(&shard, &cache, e, digest, &sources).await }
    }))
    .map(tokio::spawn);
    let (mut done, mut bytes) = (0, 0u64);
    let mut in_flight = std::collections::VecDeque::new();
    loop {
        while in_flight.len() < crate::transfer::FETCHES_IN_FLIGHT {
            match fetches.next().await {
                Some(task) => in_flight.push_back(task),
                None => break,
            }
        }
        let Some(task) = in_flight.pop_front() else {
            break;
        };
        let (b, _) = task.await.expect("a fetch task does not panic")?;
        done += 1;
        bytes += b;
        if done % 16 == 0 || done == wanted.len() {
            tracing::info!(
                "expert worker {me}: fetched {done}/{} experts from peers ({:.1} MB, {:.1} MB/s)",
                wanted.len(),
                bytes as f64 / 1e6,
                bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3)
            );
        }
    }
    Ok(bytes)
}

/// Whether the checkpoint's weight files are in its directory (a synthetic model always has
/// its weights): `model.safetensors`, or every file the shard index names.
pub fn has_weights(source: &ModelSource) -> bool {
    let ModelSource::Dir(dir) = source else {
        return true;
    };
    if dir.join("model.safetensors").exists() {
        return true;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("model.safetensors.index.json")) else {
        return false;
    };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&text) else {
        // Unreadable: let the checkpoint loader say why.
        return true;
    };
    index["weight_map"].as_object().is_some_and(|m| {
        m.values()
            .filter_map(|f| f.as_str())
            .all(|f| dir.join(f).exists())
    })
}
