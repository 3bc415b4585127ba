//! Expert-side batching: dispatches of the same layer that arrive within a short window
//! (from one or several attention workers) are merged into one batch per expert, so each
//! expert's weights are read once for all of them.
//!
//! The queue in front of the batcher is bounded; a full queue answers `Overloaded`. A batch
//! whose deadline passed while queued is answered `DeadlineExceeded` without computing.

use std::collections::BTreeMap;
use std::sync::Arc;
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

/// Handle to the batching task of one shard.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<QueuedBatch>,
    shard: Arc<ExpertShard>,
    queue_max: usize,
}

impl Batcher {
    /// Starts the batching task on the current tokio runtime.
    pub fn spawn(shard: Arc<ExpertShard>, config: BatcherConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_max.max(1));
        tokio::spawn(run(rx, shard.clone(), config));
        Self {
            tx,
            shard,
            queue_max: config.queue_max,
        }
    }

    pub fn shard(&self) -> &Arc<ExpertShard> {
        &self.shard
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
                mpsc::error::TrySendError::Full(_) => DispatchError::Overloaded {
                    queued: self.queue_max as u32,
                },
                mpsc::error::TrySendError::Closed(_) => {
                    DispatchError::Unavailable("the expert worker is shutting down".into())
                }
            })?;
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

async fn run(mut rx: mpsc::Receiver<QueuedBatch>, shard: Arc<ExpertShard>, config: BatcherConfig) {
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
            process(&shard, layer, dtype, jobs).await;
        }
    }
}

/// Merges the live jobs of one layer into one group per expert, computes, and answers each.
async fn process(shard: &Arc<ExpertShard>, layer: u32, dtype: WireDType, jobs: Vec<QueuedBatch>) {
    let now = Instant::now();
    let mut live = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.deadline <= now {
            let _ = job.reply.send(Err(DispatchError::DeadlineExceeded));
        } else if let Err(e) = shard.check(&job.batch) {
            // The assignment may have changed while the job was queued.
            let _ = job.reply.send(Err(e));
        } else {
            live.push(job);
        }
    }
    if live.is_empty() {
        return;
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
        return;
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
                return;
            }
            Err(e) => {
                for job in live {
                    let _ = job.reply.send(Err(DispatchError::Unavailable(format!(
                        "expert computation failed: {e}"
                    ))));
                }
                return;
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
}
