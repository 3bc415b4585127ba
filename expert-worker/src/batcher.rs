//! Expert-side batching: dispatches of the same layer that arrive within a short window
//! (from one or several attention workers) are merged into one batch per expert, so each
//! expert's weights are read once for all of them.
//!
//! The queue in front of the batcher is bounded; a full queue answers `Overloaded`. A batch
//! whose deadline passed while queued is answered `DeadlineExceeded` without computing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expertmesh_model::moe::ExpertGroup;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::shard::ExpertShard;
use expertmesh_dispatch::{Answer, DispatchBatch, DispatchError, DispatchFuture, WireDType};

/// Batching settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct BatcherConfig {
    /// How long the batcher waits for more dispatches after the first one, in µs.
    /// 0 merges only what is already queued.
    pub window_us: u64,
    /// Dispatches waiting at most; more are refused with `Overloaded`.
    pub queue_max: usize,
    /// Rows merged into one computation at most.
    pub rows_max: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            window_us: 0,
            queue_max: 256,
            rows_max: 8192,
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<f32>, DispatchError>>;

/// Input values (rows × hidden) up to which a lone batch is computed on the batching task
/// itself: 4 rows of Maverick's 5120.
const INLINE_VALUES_MAX: usize = 4 * 5120;

struct QueuedBatch {
    batch: DispatchBatch,
    deadline: Instant,
    reply: Reply,
}

/// What the batcher has done since it started (the expert worker's `/metrics`).
#[derive(Debug, Default)]
pub struct BatcherStats {
    /// Dispatches queued, refused for a full queue, and answered `DeadlineExceeded`
    /// because their deadline passed while queued.
    pub dispatches: AtomicU64,
    pub refused: AtomicU64,
    pub expired: AtomicU64,
    /// Computations (one per layer of a merged batch) and the dispatches they merged.
    pub computations: AtomicU64,
    pub merged_dispatches: AtomicU64,
    /// Per layer: (computations, their time in ns, rows).
    pub layers: Mutex<BTreeMap<u32, (u64, u64, u64)>>,
    /// Rows per expert, every layer together.
    pub expert_rows: Mutex<BTreeMap<u32, u64>>,
}

/// Handle to the batching task of one shard.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<QueuedBatch>,
    shard: Arc<ExpertShard>,
    queue_max: usize,
    stats: Arc<BatcherStats>,
}

impl Batcher {
    /// Starts the batching task on the current tokio runtime.
    pub fn spawn(shard: Arc<ExpertShard>, config: BatcherConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_max.max(1));
        let stats = Arc::new(BatcherStats::default());
        tokio::spawn(run(rx, shard.clone(), config, stats.clone()));
        Self {
            tx,
            shard,
            queue_max: config.queue_max,
            stats,
        }
    }

    pub fn shard(&self) -> &Arc<ExpertShard> {
        &self.shard
    }

    pub fn stats(&self) -> &Arc<BatcherStats> {
        &self.stats
    }

    /// Dispatches waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Checks, queues and awaits one batch, within its own timeout.
    pub async fn submit(&self, batch: DispatchBatch) -> Result<Vec<f32>, DispatchError> {
        self.shard.check(&batch)?;
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + batch.timeout;
        self.tx
            .try_send(QueuedBatch {
                batch,
                deadline,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    DispatchError::Overloaded {
                        queued: self.queue_max as u32,
                    }
                }
                mpsc::error::TrySendError::Closed(_) => {
                    DispatchError::Unavailable("the expert worker is shutting down".into())
                }
            })?;
        self.stats.dispatches.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(DispatchError::Unavailable("the batch was dropped".into())),
            Err(_) => Err(DispatchError::DeadlineExceeded),
        }
    }
}

impl Answer for Batcher {
    fn answer(&self, batch: DispatchBatch) -> DispatchFuture {
        let batcher = self.clone();
        Box::pin(async move { batcher.submit(batch).await })
    }
}

async fn run(
    mut rx: mpsc::Receiver<QueuedBatch>,
    shard: Arc<ExpertShard>,
    config: BatcherConfig,
    stats: Arc<BatcherStats>,
) {
    while let Some(first) = rx.recv().await {
        let mut rows = first.batch.rows();
        let mut jobs = vec![first];
        let until = Instant::now() + Duration::from_micros(config.window_us);
        while rows < config.rows_max {
            let next = if config.window_us == 0 {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(until, rx.recv())
                    .await
                    .ok()
                    .flatten()
            };
            let Some(job) = next else { break };
            rows += job.batch.rows();
            jobs.push(job);
        }
        // Rows merge with rows of the same layer that travelled as the same kind of value
        // (fp8 rows are already quantized, the others not).
        let mut by_layer: BTreeMap<(u32, bool), Vec<QueuedBatch>> = BTreeMap::new();
        for job in jobs {
            let key = (job.batch.layer, job.batch.dtype == WireDType::Fp8);
            by_layer.entry(key).or_default().push(job);
        }
        for ((layer, fp8), jobs) in by_layer {
            let dtype = if fp8 { WireDType::Fp8 } else { WireDType::F32 };
            stats.count(layer, &jobs);
            // The requests whose rows these are, for the line below (when it is written).
            let traces = tracing::enabled!(tracing::Level::DEBUG).then(|| trace_list(&jobs));
            let (dispatches, rows) = (
                jobs.len(),
                jobs.iter().map(|j| j.batch.rows()).sum::<usize>(),
            );
            // A span for the collector (with --otlp-endpoint): in the trace of the first
            // request with rows here, linked to the others'.
            let span = expertmesh_proto::trace::shared_span(traces_of(&jobs), || {
                tracing::info_span!("expert_batch", layer, dispatches, rows)
            });
            let started = std::time::Instant::now();
            let expired =
                tracing::Instrument::instrument(process(&shard, layer, dtype, jobs), span).await;
            let nanos = started.elapsed().as_nanos() as u64;
            stats.expired.fetch_add(expired as u64, Ordering::Relaxed);
            tracing::debug!(
                layer,
                dispatches,
                rows,
                expired,
                micros = nanos / 1000,
                traces = traces.as_deref().unwrap_or_default(),
                "computed a merged batch"
            );
            let mut layers = stats.layers.lock().expect("stats lock");
            let entry = layers.entry(layer).or_default();
            entry.0 += 1;
            entry.1 += nanos;
        }
    }
}

/// The distinct trace ids of `jobs`.
fn traces_of(jobs: &[QueuedBatch]) -> std::collections::BTreeSet<u128> {
    jobs.iter()
        .flat_map(|j| j.batch.traces.iter().copied())
        .collect()
}

/// The distinct trace ids of `jobs`, as W3C writes them, comma-separated.
fn trace_list(jobs: &[QueuedBatch]) -> String {
    traces_of(jobs)
        .iter()
        .map(|t| format!("{t:032x}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl BatcherStats {
    /// Counts the dispatches of one layer about to be computed together.
    fn count(&self, layer: u32, jobs: &[QueuedBatch]) {
        self.computations.fetch_add(1, Ordering::Relaxed);
        self.merged_dispatches
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let rows: usize = jobs.iter().map(|j| j.batch.rows()).sum();
        self.layers
            .lock()
            .expect("stats lock")
            .entry(layer)
            .or_default()
            .2 += rows as u64;
        let mut experts = self.expert_rows.lock().expect("stats lock");
        for g in jobs.iter().flat_map(|j| &j.batch.groups) {
            *experts.entry(g.expert).or_default() += u64::from(g.rows);
        }
    }
}

/// Merges the live jobs of one layer into one group per expert, computes, and answers each;
/// returns how many had expired while queued.
async fn process(
    shard: &Arc<ExpertShard>,
    layer: u32,
    dtype: WireDType,
    jobs: Vec<QueuedBatch>,
) -> usize {
    let now = Instant::now();
    let mut live = Vec::with_capacity(jobs.len());
    let mut expired = 0;
    for job in jobs {
        if job.deadline <= now {
            expired += 1;
            let _ = job.reply.send(Err(DispatchError::DeadlineExceeded));
        } else if let Err(e) = shard.check(&job.batch) {
            // The assignment may have changed while the job was queued.
            let _ = job.reply.send(Err(e));
        } else {
            live.push(job);
        }
    }
    if live.is_empty() {
        return expired;
    }
    let hidden = shard.hidden();
    if let [_] = live[..] {
        // One batch: its groups are already one per expert; compute it in place.
        let job = live.pop().expect("one job");
        let worker = shard.clone();
        let QueuedBatch { batch, reply, .. } = job;
        let result = if batch.activations.len() <= INLINE_VALUES_MAX {
            // A few rows (decode at small batch): microseconds of work, computed here
            // rather than paying two thread hand-offs for it. A panic fails the batch, as
            // it does on the blocking pool, and leaves the batcher running.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                worker.compute(layer, &batch.groups, &batch.activations, dtype)
            }))
            .unwrap_or_else(|_| {
                Err(DispatchError::Unavailable(
                    "expert computation failed: it panicked".into(),
                ))
            })
        } else {
            tokio::task::spawn_blocking(move || {
                worker.compute(layer, &batch.groups, &batch.activations, dtype)
            })
            .await
            .map_err(|e| DispatchError::Unavailable(format!("expert computation failed: {e}")))
            .and_then(|r| r)
        };
        let _ = reply.send(result);
        return expired;
    }
    // expert → (job, first row in that job, rows)
    let mut plan: BTreeMap<u32, Vec<(usize, usize, usize)>> = BTreeMap::new();
    for (j, job) in live.iter().enumerate() {
        let mut row = 0;
        for g in &job.batch.groups {
            plan.entry(g.expert)
                .or_default()
                .push((j, row, g.rows as usize));
            row += g.rows as usize;
        }
    }
    let mut groups = Vec::with_capacity(plan.len());
    let mut inputs = Vec::new();
    for (&expert, pieces) in &plan {
        let mut rows = 0;
        for &(j, start, n) in pieces {
            inputs.extend_from_slice(
                &live[j].batch.activations[start * hidden..(start + n) * hidden],
            );
            rows += n;
        }
        groups.push(ExpertGroup {
            expert,
            rows: rows as u32,
        });
    }
    let worker = shard.clone();
    let outputs =
        match tokio::task::spawn_blocking(move || worker.compute(layer, &groups, &inputs, dtype))
            .await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                for job in live {
                    let _ = job.reply.send(Err(e.clone()));
                }
                return expired;
            }
            Err(e) => {
                for job in live {
                    let _ = job.reply.send(Err(DispatchError::Unavailable(format!(
                        "expert computation failed: {e}"
                    ))));
                }
                return expired;
            }
        };
    let mut results: Vec<Vec<f32>> = live
        .iter()
        .map(|j| vec![0.0; j.batch.activations.len()])
        .collect();
    let mut offset = 0;
    for pieces in plan.values() {
        for &(j, start, n) in pieces {
            results[j][start * hidden..(start + n) * hidden]
                .copy_from_slice(&outputs[offset * hidden..(offset + n) * hidden]);
            offset += n;
        }
    }
    for (job, out) in live.into_iter().zip(results) {
        let _ = job.reply.send(Ok(out));
    }
    expired
}

/// The batcher's figures as Prometheus text (the expert worker's `/metrics`).
pub fn render_metrics(batcher: &Batcher) -> String {
    use expertmesh_proto::metrics::write_family;
    let s = &batcher.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let one = |v: f64| vec![(String::new(), v)];
    let mut out = String::new();
    for (name, help, value) in [
        (
            "expertmesh_expert_dispatches_total",
            "Dispatches queued.",
            get(&s.dispatches),
        ),
        (
            "expertmesh_expert_dispatches_refused_total",
            "Dispatches refused: the queue was full.",
            get(&s.refused),
        ),
        (
            "expertmesh_expert_dispatches_expired_total",
            "Dispatches whose deadline passed while queued.",
            get(&s.expired),
        ),
        (
            "expertmesh_expert_computations_total",
            "Merged computations (one per layer of a batch).",
            get(&s.computations),
        ),
        (
            "expertmesh_expert_merged_dispatches_total",
            "Dispatches the computations merged (their ratio is the batching window's fill).",
            get(&s.merged_dispatches),
        ),
        (
            "expertmesh_expert_queue_depth",
            "Dispatches waiting now.",
            batcher.queued() as f64,
        ),
        (
            "expertmesh_expert_loaded_bytes_total",
            "Expert bytes made resident by placements (what re-plans moved here).",
            batcher.shard().loaded_bytes() as f64,
        ),
        (
            "expertmesh_expert_sent_bytes_total",
            "Expert bytes sent to peers that fetched them (FetchExperts).",
            get(&batcher.shard().transfers().sent_bytes),
        ),
        (
            "expertmesh_expert_fetched_bytes_total",
            "Expert bytes fetched from peers and verified (a worker without the weights).",
            get(&batcher.shard().transfers().fetched_bytes),
        ),
        (
            "expertmesh_expert_fetches_in_flight",
            "Experts being fetched from peers now.",
            get(&batcher.shard().transfers().fetching),
        ),
        (
            "expertmesh_expert_fetches_failed_total",
            "Transfers from a peer that failed or failed their checks (the next holder was asked).",
            get(&batcher.shard().transfers().failed),
        ),
    ] {
        write_family(&mut out, name, help, &one(value));
    }
    let layers = s.layers.lock().expect("stats lock").clone();
    let per_layer = |f: fn(&(u64, u64, u64)) -> f64| -> Vec<(String, f64)> {
        layers
            .iter()
            .map(|(l, v)| (format!("layer=\"{l}\""), f(v)))
            .collect()
    };
    write_family(
        &mut out,
        "expertmesh_expert_compute_seconds_total",
        "Time computing merged batches, per layer.",
        &per_layer(|v| v.1 as f64 / 1e9),
    );
    write_family(
        &mut out,
        "expertmesh_expert_rows_total",
        "Rows computed, per layer.",
        &per_layer(|v| v.2 as f64),
    );
    let experts: Vec<(String, f64)> = s
        .expert_rows
        .lock()
        .expect("stats lock")
        .iter()
        .map(|(e, n)| (format!("expert=\"{e}\""), *n as f64))
        .collect();
    write_family(
        &mut out,
        "expertmesh_expert_rows_by_expert_total",
        "Rows computed, per expert (every layer).",
        &experts,
    );
    out
}
