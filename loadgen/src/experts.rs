//! `loadgen experts`: the expert tier alone. Synthetic routed batches (experts drawn from a
//! Zipf distribution) go straight to the expert workers over the dispatch protocol,
//! following the coordinator's current placement, to find what the expert tier sustains
//! without attention workers in front of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expertmesh_coordinator::CoordinatorClient;
use expertmesh_dispatch::{Dispatch, DispatchBatch, Transport, WireDType};
use expertmesh_model::moe::ExpertGroup;
use expertmesh_model::sampling::{mix64, SplitMix64};
use expertmesh_model::ModelSource;
use serde::Serialize;

use crate::report::Percentiles;

#[derive(Debug, Clone)]
pub struct ExpertLoad {
    pub coordinator: String,
    /// The cluster's model (for hidden size and MoE layers): directory or `synthetic:bench`.
    pub model: String,
    /// Tokens per routed batch.
    pub tokens: usize,
    /// Zipf exponent of expert popularity (0 = uniform).
    pub skew: f64,
    pub duration: Duration,
    /// Batches in flight at once.
    pub concurrency: usize,
    pub dtype: WireDType,
    /// How batches reach the workers: tcp (framed) or grpc.
    pub transport: Transport,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerFigures {
    pub worker: u64,
    pub address: String,
    pub batches: usize,
    pub tokens: usize,
    pub failed: usize,
    pub rtt_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExpertReport {
    pub duration_s: f64,
    pub batches: usize,
    pub batches_per_s: f64,
    pub tokens_per_s: f64,
    pub workers: Vec<WorkerFigures>,
}

/// Parses `zipf:S`.
pub fn parse_skew(s: &str) -> Result<f64, String> {
    s.strip_prefix("zipf:")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v >= 0.0)
        .ok_or_else(|| format!("`{s}` is not zipf:S with S ≥ 0"))
}

struct Sample {
    worker: u64,
    tokens: usize,
    rtt: Option<Duration>,
}

pub async fn run(cfg: ExpertLoad) -> Result<ExpertReport, String> {
    let source: ModelSource = cfg.model.parse().map_err(|e| format!("{e}"))?;
    let model = source.config().map_err(|e| e.to_string())?;
    let client = CoordinatorClient::new(&cfg.coordinator).map_err(|e| e.to_string())?;
    let view = client.state().await.map_err(|e| e.to_string())?;
    if let Some(r) = &view.unservable {
        return Err(format!("the cluster cannot serve: {r}"));
    }
    let experts = model.num_local_experts;
    let layer = *model
        .moe_layers
        .first()
        .ok_or("the model has no MoE layer")? as u32;
    let cdf = zipf_cdf(experts, cfg.skew);
    let owners: Vec<u64> = view.placement.experts.iter().map(|r| r[0]).collect();
    if !matches!(cfg.transport, Transport::Tcp | Transport::Grpc) {
        return Err(format!(
            "the expert tier is loaded over tcp or grpc, not {}",
            cfg.transport
        ));
    }
    let clients: BTreeMap<u64, (String, Arc<dyn Dispatch>)> = view
        .members
        .iter()
        .filter(|m| owners.contains(&m.id))
        .map(|m| {
            (
                m.id,
                (
                    m.address.clone(),
                    cfg.transport
                        .client(&m.address)
                        .expect("checked: a socket transport"),
                ),
            )
        })
        .collect();
    let clients = Arc::new(clients);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..cfg.concurrency.max(1))
        .map(|k| {
            let (cfg, cdf, owners, clients, samples) = (
                cfg.clone(),
                cdf.clone(),
                owners.clone(),
                clients.clone(),
                samples.clone(),
            );
            let (hidden, epoch) = (model.hidden_size, view.placement.epoch);
            tokio::spawn(async move {
                let mut rng = SplitMix64::new(mix64(cfg.seed ^ k as u64));
                let activations: Vec<f32> = (0..cfg.tokens * hidden)
                    .map(|_| rng.next_f64() as f32 - 0.5)
                    .collect();
                while t0.elapsed() < cfg.duration {
                    let mut counts = vec![0u32; cdf.len()];
                    for _ in 0..cfg.tokens {
                        let u = rng.next_f64();
                        counts[cdf.partition_point(|c| *c < u).min(cdf.len() - 1)] += 1;
                    }
                    let mut per_worker: BTreeMap<u64, Vec<ExpertGroup>> = BTreeMap::new();
                    for (e, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                        per_worker.entry(owners[e]).or_default().push(ExpertGroup {
                            expert: e as u32,
                            rows: n,
                        });
                    }
                    let sends: Vec<_> = per_worker
                        .into_iter()
                        .map(|(w, groups)| {
                            let rows: usize = groups.iter().map(|g| g.rows as usize).sum();
                            let batch = DispatchBatch {
                                epoch,
                                layer,
                                batch_id: 0,
                                timeout: Duration::from_secs(30),
                                groups,
                                hidden,
                                dtype: cfg.dtype,
                                activations: activations[..rows * hidden].to_vec(),
                                traces: Vec::new(),
                            };
                            let d = clients[&w].1.dispatch(batch);
                            async move {
                                let started = Instant::now();
                                let ok = d.await.is_ok();
                                Sample {
                                    worker: w,
                                    tokens: rows,
                                    rtt: ok.then(|| started.elapsed()),
                                }
                            }
                        })
                        .collect();
                    for s in sends {
                        let s = s.await;
                        samples.lock().expect("samples lock").push(s);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().expect("samples lock"));
    let workers = figures(&clients, &samples);
    let batches: usize = workers.iter().map(|w| w.batches).sum();
    let tokens: usize = workers.iter().map(|w| w.tokens).sum();
    Ok(ExpertReport {
        duration_s: elapsed,
        batches,
        batches_per_s: batches as f64 / elapsed,
        tokens_per_s: tokens as f64 / elapsed,
        workers,
    })
}

/// The cumulative Zipf distribution over `experts`: rank r (1-based) has weight r^-skew.
fn zipf_cdf(experts: usize, skew: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=experts).map(|r| (r as f64).powf(-skew)).collect();
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect()
}

/// Per worker: batches answered, tokens, failures and round-trip percentiles.
fn figures(
    clients: &BTreeMap<u64, (String, Arc<dyn Dispatch>)>,
    samples: &[Sample],
) -> Vec<WorkerFigures> {
    clients
        .iter()
        .map(|(&id, (address, _))| {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.worker == id).collect();
            let mut rtts: Vec<Duration> = mine.iter().filter_map(|s| s.rtt).collect();
            WorkerFigures {
                worker: id,
                address: address.clone(),
                batches: rtts.len(),
                tokens: mine
                    .iter()
                    .filter(|s| s.rtt.is_some())
                    .map(|s| s.tokens)
                    .sum(),
                failed: mine.iter().filter(|s| s.rtt.is_none()).count(),
                rtt_ms: Percentiles::of(&mut rtts),
            }
        })
        .collect()
}
