//! `RemoteExperts`: the model's `ExpertRunner` seam carried out over the network. For each
//! MoE layer's routed batch it splits the expert groups by the worker that holds each
//! expert under the current placement, dispatches the pieces concurrently, and puts the
//! answers back in row order. A `WrongEpoch` answer means the placement moved: the runner
//! takes the newest state and sends again (a bounded number of times). An expert with
//! several copies gets its rows sent to the copy with the fewest rows in flight; a worker
//! that cannot be reached is avoided for a while and its experts' rows go to their other
//! copies at once, or, when it held the only copy, wait (within the batch's deadline) for
//! the coordinators to place them elsewhere. Any other failure is a typed error within the
//! batch's deadline, never a hang.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expertmesh_coordinator::{ClusterView, CoordinatorClient};
use expertmesh_expert_worker::{Dispatch, DispatchBatch, DispatchError, GrpcDispatch, WireDType};
use expertmesh_model::moe::{ExpertGroup, ExpertRunner, PendingExperts, RoutedBatch};
use expertmesh_model::{ModelError, Result};
use tokio::sync::watch;

/// Dispatch settings of an attention worker.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Time budget of one routed batch (all its pieces, retries included), in ms.
    pub timeout_ms: u64,
    /// Activation dtype on the wire: f32 (exact) or bf16 (half the bytes).
    pub wire_dtype: WireDType,
    /// Re-sends after `WrongEpoch`.
    pub epoch_retries: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            wire_dtype: WireDType::F32,
            epoch_retries: 3,
        }
    }
}

/// Routed experts on expert workers, as the placement says.
#[derive(Clone)]
pub struct RemoteExperts {
    inner: Arc<Inner>,
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
        }
    }
}

struct Inner {
    runtime: tokio::runtime::Handle,
    views: watch::Receiver<Option<Arc<ClusterView>>>,
    coordinator: CoordinatorClient,
    /// Worker id → (address, client).
    workers: Mutex<HashMap<u64, (String, Arc<GrpcDispatch>)>>,
    config: DispatchConfig,
    stats: Arc<DispatchStats>,
    /// Workers that failed to answer, avoided until the instant given.
    suspects: Mutex<HashMap<u64, std::time::Instant>>,
    /// Rows in flight per worker, for spreading an expert's rows over its copies.
    in_flight: Arc<Mutex<HashMap<u64, u64>>>,
    /// The placement this engine step routes under (see `ExpertRunner::begin_step`).
    step_view: Mutex<Option<Arc<ClusterView>>>,
}

/// How long a worker that failed to answer is avoided.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// Sends of one routed batch at most (each a new placement or another copy).
const ATTEMPTS_MAX: usize = 64;

/// Why sending one routed batch under one placement failed.
enum SendError {
    /// A worker's answer.
    Worker(u64, DispatchError),
    /// Every copy of this expert is on a worker that cannot be reached.
    NoCopy(u32),
}

impl RemoteExperts {
    /// `views` is the coordinator watch; `runtime` runs the network work; the model has
    /// `moe_layers` MoE layers of `num_experts` experts.
    pub fn new(
        runtime: tokio::runtime::Handle,
        coordinator: CoordinatorClient,
        views: watch::Receiver<Option<Arc<ClusterView>>>,
        config: DispatchConfig,
        moe_layers: usize,
        num_experts: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                runtime,
                views,
                coordinator,
                workers: Mutex::new(HashMap::new()),
                config,
                stats: Arc::new(DispatchStats::new(moe_layers, num_experts)),
                suspects: Mutex::new(HashMap::new()),
                in_flight: Arc::new(Mutex::new(HashMap::new())),
                step_view: Mutex::new(None),
            }),
        }
    }

    pub fn stats(&self) -> &Arc<DispatchStats> {
        &self.inner.stats
    }

    /// Waits until the cluster can serve (every expert placed), up to `patience`.
    pub async fn ready(&self, patience: Duration) -> Result<Arc<ClusterView>, String> {
        self.inner
            .servable_view(0, tokio::time::Instant::now() + patience)
            .await
    }
}

impl ExpertRunner for RemoteExperts {
    /// Pins the newest servable placement for the step's MoE layers: attention workers switch
    /// epochs at step boundaries (a retry after a failure may still move to a newer one).
    fn begin_step(&self) {
        let view = self
            .inner
            .views
            .borrow()
            .clone()
            .filter(|v| v.unservable.is_none());
        *self.inner.step_view.lock().expect("step view lock") = view;
    }

    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let inner = self.inner.clone();
        let layer = batch.layer;
        self.inner.runtime.spawn(async move {
            let _ = tx.send(inner.run(batch).await);
        });
        Ok(PendingExperts::later(move || {
            rx.recv().unwrap_or_else(|_| {
                Err(ModelError::ExpertsUnavailable {
                    layer,
                    reason: "the dispatch task ended without an answer".into(),
                })
            })
        }))
    }
}

/// One worker's share of a routed batch: its groups and where their rows sit in the batch.
struct Piece {
    worker: u64,
    groups: Vec<ExpertGroup>,
    /// (first row in the batch, rows) per group.
    spans: Vec<(usize, usize)>,
}

impl Inner {
    fn client(&self, worker: u64, view: &ClusterView) -> Result<Arc<GrpcDispatch>, String> {
        let member = view
            .member(worker)
            .ok_or_else(|| format!("worker {worker} is not a member"))?;
        let mut workers = self.workers.lock().expect("workers lock");
        match workers.get(&worker) {
            Some((address, client)) if *address == member.address => Ok(client.clone()),
            _ => {
                let client = GrpcDispatch::new(member.address.clone());
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
        let unavailable = |reason: String| ModelError::ExpertsUnavailable { layer, reason };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.timeout_ms);
        let mut min_epoch = 0;
        let mut epoch_retries = 0;
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
            match self.send(&batch, &view, deadline).await {
                Ok(out) => return Ok(out),
                Err(SendError::Worker(_, DispatchError::WrongEpoch { current })) => {
                    epoch_retries += 1;
                    if epoch_retries > self.config.epoch_retries {
                        return Err(unavailable(format!(
                            "placement kept changing ({} retries)",
                            self.config.epoch_retries
                        )));
                    }
                    // A worker ahead of us means a newer placement exists; a worker behind
                    // us will catch up with the coordinator shortly.
                    if current > view.placement.epoch {
                        min_epoch = current;
                    } else {
                        min_epoch = view.placement.epoch;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Err(SendError::Worker(_, DispatchError::ExpertNotHere { .. })) => {
                    // The worker already follows a newer placement than this view.
                    min_epoch = view.placement.epoch;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(SendError::Worker(worker, DispatchError::Unavailable(reason))) => {
                    // Avoid it and go to the other copies now (or wait for a new placement).
                    let address = view.member(worker).map_or("?", |m| m.address.as_str());
                    trouble =
                        format!(" (expert worker {worker} at {address} is unreachable: {reason})");
                    eprintln!("expert worker {worker} unreachable ({reason}); routing around it");
                    self.suspects
                        .lock()
                        .expect("suspects lock")
                        .insert(worker, std::time::Instant::now() + SUSPECT_FOR);
                }
                Err(SendError::NoCopy(expert)) => {
                    // Wait for the coordinators to place it elsewhere.
                    eprintln!(
                        "expert {expert}: no reachable copy under epoch {}; waiting for a new placement",
                        view.placement.epoch
                    );
                    min_epoch = view.placement.epoch + 1;
                }
                Err(SendError::Worker(worker, e)) => {
                    let address = view
                        .member(worker)
                        .map(|m| m.address.as_str())
                        .unwrap_or("?");
                    return Err(unavailable(format!(
                        "expert worker {worker} ({address}): {e}"
                    )));
                }
            }
        }
        Err(unavailable(format!(
            "no answer after {ATTEMPTS_MAX} attempts"
        )))
    }

    /// The copy of `expert` to send `rows` to: among workers not suspected, the one with the
    /// fewest rows in flight (counting what this batch already gives it).
    fn choose(
        &self,
        replicas: &[u64],
        planned: &BTreeMap<u64, Piece>,
        rows_of: impl Fn(&Piece) -> u64,
    ) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut suspects = self.suspects.lock().expect("suspects lock");
        suspects.retain(|_, until| *until > now);
        let in_flight = self.in_flight.lock().expect("in-flight lock");
        replicas
            .iter()
            .copied()
            .filter(|w| !suspects.contains_key(w))
            .min_by_key(|w| {
                let busy = in_flight.get(w).copied().unwrap_or(0);
                let here = planned.get(w).map_or(0, &rows_of);
                (busy + here, *w)
            })
    }

    /// Sends one piece per worker under `view`'s placement and reassembles the answer.
    async fn send(
        &self,
        batch: &RoutedBatch,
        view: &ClusterView,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<f32>, SendError> {
        let h = batch.hidden;
        let mut pieces: BTreeMap<u64, Piece> = BTreeMap::new();
        let mut row = 0;
        let rows_of = |p: &Piece| p.spans.iter().map(|s| s.1 as u64).sum::<u64>();
        for g in &batch.groups {
            let replicas = view
                .placement
                .experts
                .get(g.expert as usize)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let worker = self
                .choose(replicas, &pieces, rows_of)
                .ok_or(SendError::NoCopy(g.expert))?;
            let p = pieces.entry(worker).or_insert_with(|| Piece {
                worker,
                groups: Vec::new(),
                spans: Vec::new(),
            });
            p.groups.push(*g);
            p.spans.push((row, g.rows as usize));
            row += g.rows as usize;
        }
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut tasks = Vec::with_capacity(pieces.len());
        for p in pieces.into_values() {
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
                dtype: self.config.wire_dtype,
                activations,
            };
            let stats = self.stats.clone();
            let sent = client.dispatch(dispatch);
            let in_flight = self.in_flight.clone();
            let (worker, rows) = (p.worker, rows_of(&p));
            *in_flight
                .lock()
                .expect("in-flight lock")
                .entry(worker)
                .or_default() += rows;
            tasks.push((
                p,
                tokio::spawn(async move {
                    let t0 = tokio::time::Instant::now();
                    let out = sent.await;
                    if let Some(n) = in_flight.lock().expect("in-flight lock").get_mut(&worker) {
                        *n = n.saturating_sub(rows);
                    }
                    stats.dispatches.fetch_add(1, Ordering::Relaxed);
                    let nanos = t0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                    stats.dispatch_nanos.fetch_add(nanos, Ordering::Relaxed);
                    out
                }),
            ));
        }
        let mut out = vec![0.0f32; batch.inputs.len()];
        let mut first_error = None;
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
                Err(e) => {
                    // Prefer reporting a non-epoch error: it will not go away by retrying.
                    let epoch = matches!(e, DispatchError::WrongEpoch { .. });
                    if first_error.is_none() || !epoch {
                        first_error = Some(SendError::Worker(p.worker, e));
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}
