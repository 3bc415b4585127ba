//! `expertmesh placement-sim`: the placement planner on synthetic skewed load (or a measured
//! load matrix), against a no-replication round-robin baseline.
//!
//! Per configuration (workers W, redundancy R): every worker has ⌈(E + R) / W⌉ slots per
//! layer; each MoE layer is planned on its own load (Zipf over a per-layer random order of
//! experts), starting from round robin; then the load drifts (`--replans` times) and each
//! re-plan starts from the previous placement. Balance is the mean over layers of max worker
//! load ÷ mean worker load; bytes moved are the expert copies a re-plan adds, at Maverick's
//! expert size (3 × 5120 × 8192 bf16 = 252 MB; FP8, `--expert-dtype fp8`, 126 MB), summed
//! over layers. For comparison the same
//! re-plan done from scratch (as EPLB does) is counted too.

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_coordinator::placement::planner::{balance, plan, PlanInput};
use expertmesh_coordinator::placement::WorkerSlots;
use expertmesh_model::sampling::SplitMix64;
use serde_json::json;

/// Maverick's expert shapes: hidden size and expert intermediate size.
const HIDDEN: f64 = 5120.0;
const INTER: f64 = 8192.0;

/// The dtype of the experts placed (`--expert-dtype`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertDType {
    Bf16,
    Fp8,
}

impl ExpertDType {
    /// Bytes of one Maverick expert (gate, up and down projections) as a checkpoint stores
    /// it: bf16 weights, or FP8 codes with a bf16 scale per output row (half a bf16 copy).
    fn expert_bytes(self) -> f64 {
        match self {
            ExpertDType::Bf16 => 3.0 * HIDDEN * INTER * 2.0,
            ExpertDType::Fp8 => 3.0 * HIDDEN * INTER + (2.0 * INTER + HIDDEN) * 2.0,
        }
    }
}

#[derive(Args, Debug)]
pub struct PlacementSimArgs {
    #[arg(long, default_value_t = 128)]
    experts: usize,
    /// Expert workers (default: 8, 16, 32 and 64).
    #[arg(long)]
    workers: Option<usize>,
    /// Redundant expert slots over the whole cluster, per layer (default: 0, 16 and 32).
    #[arg(long)]
    redundancy: Option<usize>,
    /// MoE layers (Maverick has 24).
    #[arg(long, default_value_t = 24)]
    layers: usize,
    /// Zipf exponent of the synthetic per-layer expert load.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Fraction of each layer's expert order that changes between re-plans.
    #[arg(long, default_value_t = 0.1)]
    drift: f64,
    /// Re-plans after the first plan.
    #[arg(long, default_value_t = 4)]
    replans: usize,
    /// The planner stops repairing once max load ≤ (1 + tolerance) × mean.
    #[arg(long, default_value_t = 0.005)]
    tolerance: f64,
    /// A measured load matrix (JSON: per MoE layer, a list of per-expert token counts)
    /// instead of the synthetic one.
    #[arg(long)]
    load: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The experts' dtype, for the bytes a re-plan moves (an FP8 copy is half a bf16 one).
    #[arg(long, value_enum, default_value_t = ExpertDType::Bf16)]
    expert_dtype: ExpertDType,
    /// One JSON object per configuration, one per line.
    #[arg(long)]
    json: bool,
}

fn zipf_layer(rng: &mut SplitMix64, experts: usize, s: f64) -> (Vec<usize>, Vec<f64>) {
    let mut order: Vec<usize> = (0..experts).collect();
    for i in (1..experts).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let load = zipf_load(&order, s);
    (order, load)
}

/// `order[r]` is the expert of rank r; its load is 1/(r+1)^s (in units of 1e6 tokens).
fn zipf_load(order: &[usize], s: f64) -> Vec<f64> {
    let mut load = vec![0.0; order.len()];
    for (rank, &e) in order.iter().enumerate() {
        load[e] = 1e6 / ((rank + 1) as f64).powf(s);
    }
    load
}

/// Changes about `drift` of the order: random swaps of ranks.
fn drift_order(rng: &mut SplitMix64, order: &mut [usize], drift: f64) {
    let n = order.len();
    let swaps = ((n as f64 * drift) / 2.0).ceil() as usize;
    for _ in 0..swaps {
        let a = (rng.next_u64() % n as u64) as usize;
        let b = (rng.next_u64() % n as u64) as usize;
        order.swap(a, b);
    }
}

struct Outcome {
    balance: f64,
    baseline_balance: f64,
    bytes_moved: f64,
    scratch_bytes_moved: f64,
    slots: usize,
}

fn round_robin(experts: usize, workers: usize) -> Vec<Vec<u64>> {
    (0..experts)
        .map(|e| vec![(e % workers) as u64 + 1])
        .collect()
}

fn simulate(
    args: &PlacementSimArgs,
    w: usize,
    r: usize,
    measured: Option<&[Vec<f64>]>,
) -> Result<Outcome> {
    let experts = measured.map_or(args.experts, |m| m[0].len());
    let layers = measured.map_or(args.layers, <[Vec<f64>]>::len);
    let slots = (experts + r).div_ceil(w);
    let workers: Vec<WorkerSlots> = (1..=w as u64)
        .map(|id| WorkerSlots {
            id,
            capacity: Some(slots),
        })
        .collect();
    let ids: Vec<u64> = workers.iter().map(|w| w.id).collect();
    let mut rng = SplitMix64::new(args.seed ^ (w as u64) << 32 ^ r as u64);
    let input = |load: &'_ [f64], current: &'_ [Vec<u64>]| -> Result<Vec<Vec<u64>>> {
        Ok(plan(PlanInput {
            workers: &workers,
            load,
            min_replicas: 1,
            redundancy: r,
            current,
            tolerance: args.tolerance,
            warm: &[],
        })?
        .experts)
    };
    let (mut balance_sum, mut baseline_sum, mut moved, mut scratch_moved) = (0.0, 0.0, 0.0, 0.0);
    let rr = round_robin(experts, w);
    let rounds = if measured.is_some() {
        1
    } else {
        args.replans.max(1)
    };
    for l in 0..layers {
        let (mut order, mut load) = match measured {
            Some(m) => ((0..experts).collect(), m[l].clone()),
            None => zipf_layer(&mut rng, experts, args.zipf),
        };
        let mut current = input(&load, &rr)?;
        if measured.is_some() {
            balance_sum += balance(&current, &load, &ids);
            baseline_sum += balance(&rr, &load, &ids);
            moved += count_added(&rr, &current) as f64;
            continue;
        }
        for _ in 0..rounds {
            drift_order(&mut rng, &mut order, args.drift);
            load = zipf_load(&order, args.zipf);
            let next = input(&load, &current)?;
            let scratch = input(&load, &[])?;
            moved += count_added(&current, &next) as f64;
            scratch_moved += count_added(&current, &scratch) as f64;
            balance_sum += balance(&next, &load, &ids);
            baseline_sum += balance(&rr, &load, &ids);
            current = next;
        }
    }
    let n = (layers * rounds) as f64;
    Ok(Outcome {
        balance: balance_sum / n,
        baseline_balance: baseline_sum / n,
        bytes_moved: moved * args.expert_dtype.expert_bytes() / rounds as f64,
        scratch_bytes_moved: scratch_moved * args.expert_dtype.expert_bytes() / rounds as f64,
        slots,
    })
}

fn count_added(before: &[Vec<u64>], after: &[Vec<u64>]) -> usize {
    after
        .iter()
        .enumerate()
        .map(|(e, r)| r.iter().filter(|w| !before[e].contains(w)).count())
        .sum()
}

pub fn run(args: PlacementSimArgs) -> Result<()> {
    let measured: Option<Vec<Vec<f64>>> = match &args.load {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let m: Vec<Vec<f64>> = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected a list per MoE layer of per-expert token counts",
                    path.display()
                )
            })?;
            if m.is_empty() || m[0].is_empty() || m.iter().any(|l| l.len() != m[0].len()) {
                bail!(
                    "{}: every layer needs the same, non-zero number of experts",
                    path.display()
                );
            }
            if m.iter().flatten().any(|v| !v.is_finite() || *v < 0.0) {
                bail!("{}: loads must be finite and non-negative", path.display());
            }
            Some(m)
        }
    };
    let experts = measured.as_ref().map_or(args.experts, |m| m[0].len());
    if experts == 0 || args.layers == 0 {
        bail!("--experts and --layers must be positive");
    }
    let workers = match args.workers {
        Some(0) => bail!("--workers must be positive"),
        Some(w) => vec![w],
        None => vec![8, 16, 32, 64],
    };
    let redundancy = match args.redundancy {
        Some(r) => vec![r],
        None => vec![0, 16, 32],
    };
    if !args.json {
        println!(
            "{} experts, {} MoE layers, {}; {} re-plans, tolerance {}",
            experts,
            measured.as_ref().map_or(args.layers, Vec::len),
            match &args.load {
                Some(p) => format!("load from {}", p.display()),
                None => format!(
                    "Zipf({}) load, {:.0}% drift per re-plan",
                    args.zipf,
                    args.drift * 100.0
                ),
            },
            args.replans,
            args.tolerance
        );
        println!(
            "{:>7} {:>10} {:>6} {:>8} {:>9} {:>14} {:>16}",
            "workers",
            "redundancy",
            "slots",
            "balance",
            "baseline",
            "moved GB/plan",
            "scratch GB/plan"
        );
    }
    for &w in &workers {
        for &r in &redundancy {
            let o = simulate(&args, w, r, measured.as_deref())?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "workers": w, "redundancy": r, "slots_per_worker": o.slots,
                        "balance": o.balance, "baseline_balance": o.baseline_balance,
                        "bytes_moved": o.bytes_moved,
                        "scratch_bytes_moved": o.scratch_bytes_moved,
                    })
                );
            } else {
                println!(
                    "{:>7} {:>10} {:>6} {:>8.4} {:>9.4} {:>14.1} {:>16.1}",
                    w,
                    r,
                    o.slots,
                    o.balance,
                    o.baseline_balance,
                    o.bytes_moved / 1e9,
                    o.scratch_bytes_moved / 1e9
                );
            }
        }
    }
    Ok(())
}
