//! `expertmesh bench expert-memory`: what an expert worker holding every expert of each
//! given checkpoint keeps resident — its resident set before and after the experts are
//! loaded (every page of their slices of the mapped checkpoint read, as a worker does when
//! a placement gives it experts) — against the expert bytes the checkpoint declares. Run it
//! on a bf16 checkpoint and its FP8 copy (`expertmesh quantize`) for the two side by side.

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_expert_worker::ExpertShard;
use expertmesh_model::{ModelSource, SafetensorsCheckpoint};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct ExpertMemoryArgs {
    /// Model directories (repeat the flag), e.g. a bf16 checkpoint and its FP8 copy.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    model: String,
    experts: usize,
    /// One copy of an expert in every MoE layer, as stored (FP8 codes and scales, or bf16).
    copy_bytes: usize,
    /// Every expert: `experts × copy_bytes`.
    expert_bytes: usize,
    /// What loading touched (pages of the mapped files).
    loaded_bytes: usize,
    rss_before: u64,
    rss_after: u64,
    /// Resident growth ÷ the first model's.
    ratio_to_first: f64,
}

/// This process's resident set (bytes), from `/proc/self/status`.
fn rss() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}

pub fn run(args: ExpertMemoryArgs) -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    for model in &args.models {
        let ModelSource::Dir(dir) = model.parse::<ModelSource>()? else {
            bail!("{model}: resident memory is measured on a checkpoint directory");
        };
        let config = expertmesh_model::TextConfig::from_dir(&dir)?;
        let ckpt = SafetensorsCheckpoint::open(&dir)?;
        let shard = ExpertShard::new(&config, &ckpt)?;
        let before = rss()?;
        let all = (0..config.num_local_experts as u32).collect();
        let loaded = shard.load(&all);
        let after = rss()?;
        rows.push(Row {
            model: model.clone(),
            experts: config.num_local_experts,
            copy_bytes: shard.copy_bytes(),
            expert_bytes: shard.copy_bytes() * config.num_local_experts,
            loaded_bytes: loaded,
            rss_before: before,
            rss_after: after,
            ratio_to_first: 0.0,
        });
        // The shard and the mapping go before the next model is measured.
        drop(shard);
        drop(ckpt);
    }
    let grown = |r: &Row| r.rss_after.saturating_sub(r.rss_before) as f64;
    let first = rows.first().map_or(1.0, grown).max(1.0);
    for r in &mut rows {
        r.ratio_to_first = grown(r) / first;
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<40} {:>8} {:>14} {:>14} {:>14} {:>8}",
        "model", "experts", "expert MB", "loaded MB", "resident +MB", "ratio"
    );
    for r in &rows {
        println!(
            "{:<40} {:>8} {:>14.1} {:>14.1} {:>14.1} {:>8.3}",
            r.model,
            r.experts,
            r.expert_bytes as f64 / 1e6,
            r.loaded_bytes as f64 / 1e6,
            grown(r) / 1e6,
            r.ratio_to_first
        );
    }
    Ok(())
}
