//! `RemoteExperts`: the model's `ExpertRunner` seam carried out over the network. For each
//! MoE layer's routed batch it splits the expert groups by the worker that holds each
//! expert under the current placement, dispatches the pieces concurrently, and puts the
//! answers back in row order. A `WrongEpoch` answer means the placement moved: the runner
//! takes the newest state and sends again (a bounded number of times). An expert with
//! several copies gets its rows sent to the copy with the fewest rows in flight; a worker
//! that cannot be reached is avoided for a while and its experts' rows go to their other
//! copies at once, or, when it held the only copy, wait (within the batch's deadline) for
//! the coordinators to place them elsewhere. Any other failure is a typed error within the
//! batch's deadline, never a hang. The decisions are [`crate::routing`]'s; this file carries
//! them out over `Dispatch` values made by one [`Connector`] (`--dispatch`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expertmesh_coordinator::{ClusterView, CoordinatorClient};
use expertmesh_dispatch::{Dispatch, DispatchBatch, DispatchError, Transport, WireDType};
use expertmesh_expert_worker::NodeError;
use expertmesh_model::moe::{ExpertRunner, PendingExperts, RoutedBatch};
use expertmesh_model::{ExpertsFailure, ModelError, Result, TextConfig};
use tokio::sync::watch;

use crate::routing::{self, Attempts, Next, Piece, SendError, Workers};

/// Dispatch settings of an attention worker.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Time budget of one routed batch (all its pieces, retries included), in ms.
    pub timeout_ms: u64,
    /// Activation dtype on the wire: f32 (exact), bf16 (half the bytes) or fp8 (a quarter,
    /// plus a scale per row; exact for FP8 experts, and f32 for layers whose experts are
    /// not FP8).
    pub wire_dtype: WireDType,
    /// Re-sends after `WrongEpoch`.
    pub epoch_retries: usize,
    /// How routed batches travel: `tcp` (the default) to expert workers as framed messages
    /// over plain TCP (gRPC staying the control plane), `grpc` to the same workers over gRPC
    /// streams, `local` to the experts this process holds (no sockets), `nccl` between GPU
    /// ranks.
    pub transport: Transport,
}

impl DispatchConfig {
    /// Refuses what cannot run: a zero time budget, and NCCL between processes (not built).
    pub fn validate(&self) -> Result<(), NodeError> {
        if self.timeout_ms == 0 {
            return Err(NodeError::config("dispatch.timeout_ms", "must be positive"));
        }
        if self.transport == Transport::Nccl {
            return Err(NodeError::config(
                "dispatch.transport",
                "= nccl: NCCL links between attention and expert worker processes are not \
                 built yet (the NCCL transport runs in one process only); use grpc or local",
            ));
        }
        Ok(())
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            wire_dtype: WireDType::F32,
            epoch_retries: 3,
            transport: Transport::Tcp,
        }
    }
}

/// Makes the `Dispatch` that reaches one expert worker: the one place a transport is
/// chosen.
pub enum Connector {
    /// A connection per worker address over a socket transport (grpc or tcp).
    Socket(Transport),
    /// Every worker id is this process's own shard (`--dispatch local`).
    Local(Arc<dyn Dispatch>),
    /// Any other `Dispatch` by worker address: test doubles (`FaultyDispatch`).
    Custom(Arc<MakeDispatch>),
}

/// Makes the `Dispatch` of a worker address.
pub type MakeDispatch = dyn Fn(&str) -> Arc<dyn Dispatch> + Send + Sync;

/// A worker's client, with the address it was made for.
type Client = (String, Arc<dyn Dispatch>);

impl Connector {
    pub fn connect(&self, address: &str) -> Arc<dyn Dispatch> {
        match self {
            Connector::Socket(t) => t
                .client(address)
                .expect("Connector::Socket holds a socket transport"),
            Connector::Local(d) => d.clone(),
            Connector::Custom(make) => make(address),
        }
    }
}

/// Routed experts on expert workers, as the placement says.
#[derive(Clone)]
pub struct RemoteExperts {
    router: Arc<Router>,
}

/// What the runner has sent, for heartbeats and `/metrics`.
#[derive(Debug)]
pub struct DispatchStats {
    pub num_experts: usize,
    /// Routed tokens per (MoE layer, expert), layer-major.
    pub routed_tokens: Vec<AtomicU64>,
    /// Pieces sent (one routed batch to one worker) and their total round-trip time.
    pub dispatches: AtomicU64,
    pub dispatch_nanos: AtomicU64,
    /// Routed batches (every piece of one MoE layer's batch) and their time from the start
    /// to the last answer.
    pub routed_batches: AtomicU64,
    pub routed_batch_nanos: AtomicU64,
    /// Time the engine spent blocked waiting for routed batches' answers: the part of
    /// `routed_batch_nanos` not hidden behind its own work (the shared expert, the other
    /// micro-batch).
    pub wait_nanos: AtomicU64,
}

impl DispatchStats {
    fn new(moe_layers: usize, num_experts: usize) -> Self {
        Self {
            num_experts,
            routed_tokens: (0..moe_layers * num_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            dispatches: AtomicU64::new(0),
            dispatch_nanos: AtomicU64::new(0),
            routed_batches: AtomicU64::new(0),
            routed_batch_nanos: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
        }
    }
}

/// The routing state of one attention worker, shared by its dispatch tasks.
struct Router {
    runtime: tokio::runtime::Handle,
    views: watch::Receiver<Option<Arc<ClusterView>>>,
    coordinator: CoordinatorClient,
    connector: Connector,
    /// Worker id → (address, client).
    workers: Mutex<HashMap<u64, Client>>,
    config: DispatchConfig,
    stats: Arc<DispatchStats>,
    /// Workers that failed to answer, avoided until the instant given.
    suspects: Mutex<HashMap<u64, std::time::Instant>>,
    /// Rows in flight per worker, for spreading an expert's rows over its copies.
    in_flight: Arc<Mutex<HashMap<u64, u64>>>,
    /// The placement this engine step routes under (see `ExpertRunner::begin_step`).
    step_view: Mutex<Option<Arc<ClusterView>>>,
    /// Decoder layers whose routed rows may travel in fp8 (every expert W8A8 FP8); with
    /// `--wire-dtype fp8` the other MoE layers' rows travel as f32.
    fp8_layers: HashSet<usize>,
}

/// How long a worker that failed to answer is avoided.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// Sends of one routed batch at most (each a new placement or another copy).
const ATTEMPTS_MAX: usize = 64;

impl RemoteExperts {
    /// `views` is the coordinator watch; `runtime` runs the network work; `connector`
    /// reaches the workers; `model` is the text model's configuration.
    pub fn new(
        runtime: tokio::runtime::Handle,
        (coordinator, views): (CoordinatorClient, watch::Receiver<Option<Arc<ClusterView>>>),
        connector: Connector,
        config: DispatchConfig,
        model: &TextConfig,
    ) -> Self {
        let (moe_layers, num_experts) = (model.moe_layers.len(), model.num_local_experts);
        let fp8_layers = model
            .moe_layers
            .iter()
            .copied()
            .filter(|&l| model.experts_take_fp8_inputs(l))
            .collect();
        Self {
            router: Arc::new(Router {
                runtime,
                views,
                coordinator,
                connector,
                workers: Mutex::new(HashMap::new()),
                config,
                stats: Arc::new(DispatchStats::new(moe_layers, num_experts)),
                suspects: Mutex::new(HashMap::new()),
                in_flight: Arc::new(Mutex::new(HashMap::new())),
                step_view: Mutex::new(None),
                fp8_layers,
            }),
        }
    }

    pub fn stats(&self) -> &Arc<DispatchStats> {
        &self.router.stats
    }

    /// Waits until the cluster can serve (every expert placed), up to `patience`.
    pub async fn ready(&self, patience: Duration) -> Result<Arc<ClusterView>, String> {
        self.router
            .servable_view(0, tokio::time::Instant::now() + patience)
            .await
    }
}

impl ExpertRunner for RemoteExperts {
    /// Pins the newest servable placement for the step's MoE layers: attention workers switch
    /// epochs at step boundaries (a retry after a failure may still move to a newer one).
    fn begin_step(&self) {
        let view = self
            .router
            .views
            .borrow()
            .clone()
            .filter(|v| v.unservable.is_none());
        *self.router.step_view.lock().expect("step view lock") = view;
    }

    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let router = self.router.clone();
        let layer = batch.layer;
        let stats = self.router.stats.clone();
        self.router.runtime.spawn(async move {
            let started = std::time::Instant::now();
            let answer = router.run(batch).await;
            let nanos = started.elapsed().as_nanos() as u64;
            router.stats.routed_batches.fetch_add(1, Ordering::Relaxed);
            router
                .stats
                .routed_batch_nanos
                .fetch_add(nanos, Ordering::Relaxed);
            let _ = tx.send(answer);
        });
        Ok(PendingExperts::later(move || {
            let waiting = std::time::Instant::now();
            let answer = rx.recv();
            let nanos = waiting.elapsed().as_nanos() as u64;
            stats.wait_nanos.fetch_add(nanos, Ordering::Relaxed);
            answer.unwrap_or_else(|_| {
                Err(ModelError::ExpertsUnavailable {
                    layer,
                    kind: ExpertsFailure::Unreachable,
                    reason: "the dispatch task ended without an answer".into(),
                })
            })
        }))
    }
}

impl Router {
    /// The dtype layer `layer`'s rows travel in: `--wire-dtype`, except that fp8 is only
    /// for layers whose experts all take FP8 inputs (the others' rows go as f32, exact).
    fn wire_dtype(&self, layer: usize) -> WireDType {
        match self.config.wire_dtype {
            WireDType::Fp8 if !self.fp8_layers.contains(&layer) => WireDType::F32,
            d => d,
        }
    }

    fn client(&self, worker: u64, view: &ClusterView) -> Result<Arc<dyn Dispatch>, String> {
        let member = view
            .member(worker)
            .ok_or_else(|| format!("worker {worker} is not a member"))?;
        let mut workers = self.workers.lock().expect("workers lock");
        match workers.get(&worker) {
            Some((address, client)) if *address == member.address => Ok(client.clone()),
            _ => {
                let client = self.connector.connect(&member.address);
                workers.insert(worker, (member.address.clone(), client.clone()));
                Ok(client)
            }
        }
    }

    /// The newest servable state with epoch ≥ `min_epoch`, waiting for one until `deadline`.
    async fn servable_view(
        &self,
        min_epoch: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<ClusterView>, String> {
        let mut views = self.views.clone();
        loop {
            let current = views.borrow_and_update().clone();
            match current {
                Some(v) if v.unservable.is_none() && v.placement.epoch >= min_epoch => {
                    return Ok(v)
                }
                _ => {}
            }
            let why = match views.borrow().as_ref() {
                None => "no cluster state from the coordinator yet".to_string(),
                Some(v) => match &v.unservable {
                    Some(reason) => format!("the cluster cannot serve: {reason}"),
                    None => format!("waiting for placement epoch {min_epoch}"),
                },
            };
            match tokio::time::timeout_at(deadline, views.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    // The watch may lag; ask the coordinator directly once before giving up.
                    if let Ok(v) = self.coordinator.state().await {
                        if v.unservable.is_none() && v.placement.epoch >= min_epoch {
                            return Ok(Arc::new(v));
                        }
                    }
                    return Err(why);
                }
            }
        }
    }

    async fn run(&self, batch: RoutedBatch) -> Result<Vec<f32>> {
        let layer = batch.layer;
        let base = batch.moe_index * self.stats.num_experts;
        for g in &batch.groups {
            if let Some(c) = self.stats.routed_tokens.get(base + g.expert as usize) {
                c.fetch_add(u64::from(g.rows), Ordering::Relaxed);
            }
        }
        let failed = |kind, reason: String| ModelError::ExpertsUnavailable {
            layer,
            kind,
            reason,
        };
        let unavailable = |reason: String| failed(ExpertsFailure::Unreachable, reason);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.timeout_ms);
        let mut min_epoch = 0;
        let mut attempts = Attempts::default();
        // What went wrong last, for the error if the deadline passes.
        let mut trouble = String::new();
        for _ in 0..ATTEMPTS_MAX {
            let pinned = self
                .step_view
                .lock()
                .expect("step view lock")
                .clone()
                .filter(|v| v.placement.epoch >= min_epoch);
            let view = match pinned {
                Some(v) => v,
                None => self
                    .servable_view(min_epoch, deadline)
                    .await
                    .map_err(|why| unavailable(format!("{why}{trouble}")))?,
            };
            let error = match self.send(&batch, &view, deadline).await {
                Ok(out) => return Ok(out),
                Err(e) => e,
            };
            let epoch = view.placement.epoch;
            match routing::next_step(&error, epoch, &mut attempts, self.config.epoch_retries) {
                Next::Resend {
                    min_epoch: m,
                    pause,
                } => {
                    if let SendError::NoCopy(expert) = error {
                        tracing::warn!(
                            "expert {expert}: no reachable copy under epoch {epoch}; waiting for a new placement"
                        );
                    }
                    min_epoch = m;
                    if pause {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Next::Avoid { worker } => {
                    let reason = match &error {
                        SendError::Worker(_, e) => e.to_string(),
                        SendError::NoCopy(_) => String::new(),
                    };
                    let address = view.member(worker).map_or("?", |m| m.address.as_str());
                    trouble =
                        format!(" (expert worker {worker} at {address} is unreachable: {reason})");
                    tracing::warn!(
                        "expert worker {worker} unreachable ({reason}); routing around it"
                    );
                    self.suspects
                        .lock()
                        .expect("suspects lock")
                        .insert(worker, std::time::Instant::now() + SUSPECT_FOR);
                }
                Next::Fail(kind, why) => {
                    let address = match &error {
                        SendError::Worker(w, _) => view.member(*w).map(|m| m.address.as_str()),
                        SendError::NoCopy(_) => None,
                    };
                    return Err(failed(
                        kind,
                        match address {
                            Some(a) => format!("{why} ({a})"),
                            None => why,
                        },
                    ));
                }
            }
        }
        Err(unavailable(format!(
            "no answer after {ATTEMPTS_MAX} attempts"
        )))
    }

    /// The pieces of `batch` under `view`, planned around suspects and rows in flight.
    fn plan(&self, batch: &RoutedBatch, view: &ClusterView) -> Result<Vec<Piece>, SendError> {
        let now = std::time::Instant::now();
        let mut suspects = self.suspects.lock().expect("suspects lock");
        suspects.retain(|_, until| *until > now);
        let suspects: HashSet<u64> = suspects.keys().copied().collect();
        let in_flight = self.in_flight.lock().expect("in-flight lock").clone();
        let workers = Workers {
            suspects: &suspects,
            in_flight: &in_flight,
        };
        routing::plan(&batch.groups, &view.placement.experts, workers).map_err(SendError::NoCopy)
    }

    /// Sends one piece per worker under `view`'s placement and reassembles the answer.
    async fn send(
        &self,
        batch: &RoutedBatch,
        view: &ClusterView,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<f32>, SendError> {
        let h = batch.hidden;
        let pieces = self.plan(batch, view)?;
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut tasks = Vec::with_capacity(pieces.len());
        for p in pieces {
            let client = self
                .client(p.worker, view)
                .map_err(|e| SendError::Worker(p.worker, DispatchError::Unavailable(e)))?;
            let mut activations =
                Vec::with_capacity(p.spans.iter().map(|s| s.1).sum::<usize>() * h);
            for &(start, n) in &p.spans {
                activations.extend_from_slice(&batch.inputs[start * h..(start + n) * h]);
            }
            let dispatch = DispatchBatch {
                epoch: view.placement.epoch,
                layer: batch.layer as u32,
                batch_id: 0,
                timeout,
                groups: p.groups.clone(),
                hidden: h,
                dtype: self.wire_dtype(batch.layer),
                activations,
                traces: batch.traces.clone(),
            };
            let stats = self.stats.clone();
            let sent = client.dispatch(dispatch);
            let mut views = self.views.clone();
            let in_flight = self.in_flight.clone();
            let (worker, rows) = (p.worker, p.rows());
            let (epoch, layer) = (view.placement.epoch, batch.layer);
            *in_flight
                .lock()
                .expect("in-flight lock")
                .entry(worker)
                .or_default() += rows;
            // A span for the collector (with --otlp-endpoint), in the requests' traces.
            let span = expertmesh_proto::trace::shared_span(batch.traces.iter().copied(), || {
                tracing::info_span!("dispatch", epoch, layer, worker, rows)
            });
            let task = async move {
                let t0 = tokio::time::Instant::now();
                // A worker that froze (or lost its network) keeps the connection open
                // and never answers: once the cluster declares it dead, its piece goes
                // to another copy instead of waiting out the batch's deadline.
                let out = tokio::select! {
                    out = sent => out,
                    why = declared_dead(&mut views, worker) => {
                        Err(DispatchError::Unavailable(why))
                    }
                };
                if let Some(n) = in_flight.lock().expect("in-flight lock").get_mut(&worker) {
                    *n = n.saturating_sub(rows);
                }
                stats.dispatches.fetch_add(1, Ordering::Relaxed);
                let nanos = t0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                stats.dispatch_nanos.fetch_add(nanos, Ordering::Relaxed);
                tracing::debug!(
                    epoch,
                    layer,
                    worker,
                    rows,
                    micros = nanos / 1000,
                    ok = out.is_ok(),
                    "dispatch"
                );
                out
            };
            tasks.push((p, tokio::spawn(tracing::Instrument::instrument(task, span))));
        }
        let mut out = vec![0.0f32; batch.inputs.len()];
        let mut errors = Vec::new();
        for (p, task) in tasks {
            let result = task
                .await
                .unwrap_or_else(|e| Err(DispatchError::Unavailable(e.to_string())));
            match result {
                Ok(values) => {
                    let mut offset = 0;
                    for &(start, n) in &p.spans {
                        out[start * h..(start + n) * h]
                            .copy_from_slice(&values[offset * h..(offset + n) * h]);
                        offset += n;
                    }
                }
                Err(e) => errors.push(SendError::Worker(p.worker, e)),
            }
        }
        match routing::worst(errors) {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Completes once the cluster declares `worker` dead (its lease ran out without a
/// heartbeat), with why; never while it is alive.
async fn declared_dead(
    views: &mut watch::Receiver<Option<Arc<ClusterView>>>,
    worker: u64,
) -> String {
    loop {
        let dead = views
            .borrow_and_update()
            .as_ref()
            .is_some_and(|v| v.members.iter().any(|m| m.id == worker && !m.alive));
        if dead {
            return format!("expert worker {worker} was declared dead with a batch unanswered");
        }
        if views.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
