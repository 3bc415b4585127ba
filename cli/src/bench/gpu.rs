//! `expertmesh bench gpu-experts`: one MoE layer's expert shard at Maverick size on a GPU,
//! grouped cuBLAS GEMMs against a dense GEMM of the same FLOPs and a device-to-device copy
//! (a `--features cuda` build).

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct GpuExpertsArgs {
    #[arg(long, default_value = "cuda:0")]
    device: expertmesh_model::Device,
    /// Routed tokens per batch, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,128,1024,8192")]
    tokens: Vec<usize>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: GpuExpertsArgs) -> Result<()> {
    let expertmesh_model::Device::Cuda(ordinal) = args.device else {
        anyhow::bail!("bench gpu-experts needs --device cuda[:N]");
    };
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ordinal, args.tokens, args.runs, args.json);
        anyhow::bail!(
            "this expertmesh was built without CUDA; rebuild with `cargo build --release --features cuda`"
        );
    }
    #[cfg(feature = "cuda")]
    {
        use expertmesh_model::cuda::bench::{expert_shard, Shape};
        if args.tokens.is_empty() || args.runs == 0 {
            anyhow::bail!("--tokens and --runs must not be empty or zero");
        }
        let report = expert_shard(ordinal, Shape::MAVERICK_SHARD, &args.tokens, args.runs)?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        println!(
            "{}: 16 experts × (5120 × 16384 + 8192 × 5120) bf16, one cuBLAS GEMM pair per expert; \
             device-to-device copy moves {:.0} GB/s (read + written)",
            report.device, report.copy_traffic_gbps
        );
        println!(
            "{:>7} {:>11} {:>9} {:>11} {:>9} {:>7} {:>14} {:>10}",
            "tokens",
            "grouped ms",
            "TFLOP/s",
            "dense ms",
            "TFLOP/s",
            "ratio",
            "weights GB/s",
            "of copy"
        );
        for r in &report.rows {
            println!(
                "{:>7} {:>11.3} {:>9.1} {:>11.3} {:>9.1} {:>7.2} {:>14.0} {:>9.0}%",
                r.tokens,
                r.grouped_ms,
                r.grouped_tflops,
                r.dense_ms,
                r.dense_tflops,
                r.grouped_tflops / r.dense_tflops,
                r.weight_read_gbps,
                100.0 * r.weight_read_gbps / report.copy_traffic_gbps
            );
        }
        Ok(())
    }
}

/// The GPU's device-to-device copy traffic (bytes read and written), GB/s.
pub(super) fn gpu_copy_gbps(ordinal: usize) -> Result<f64> {
    #[cfg(feature = "cuda")]
    return Ok(expertmesh_model::cuda::bench::copy_traffic_gbps(
        ordinal, 10,
    )?);
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("cuda:{ordinal}: this expertmesh was built without CUDA")
}
