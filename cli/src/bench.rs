//! `expertmesh bench decode`: decode and prefill throughput of the single-process engine,
//! set against this machine's memory bandwidth measured in the same run.
//!
//! Decoding reads every dense weight and each touched expert once per step, so the floor
//! for a step is "weight bytes touched ÷ bandwidth"; the report gives the measured median
//! step time as a ratio to that floor. Figures are medians over repeated runs.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use expertmesh_attention_worker::DispatchConfig;
use expertmesh_model::linear::weight_bytes_read;
use expertmesh_model::moe::expert_swiglu;
use expertmesh_model::moe::ExpertRunner;
use expertmesh_model::sampling::{argmax, SplitMix64};
use expertmesh_model::{
    KvCache, LogitRows, Model, ModelSource, Sequence, TextConfig, WeightSource,
};

use crate::cluster::{ClusterSpec, LocalCluster};
use rayon::prelude::*;
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Decode tokens/s at several batch sizes after a prompt, against the bandwidth floor.
    Decode(DecodeArgs),
    /// One dispatch round trip over loopback gRPC against a raw TCP echo of the same bytes.
    Dispatch(crate::bench_dispatch::DispatchArgs),
    /// Streams through the OpenAI API of a local cluster at several concurrency levels.
    Serve(crate::bench_serve::ServeArgs),
    /// One MoE layer's expert shard at Maverick size on a GPU: grouped cuBLAS GEMMs against
    /// a dense GEMM of the same FLOPs and a device-to-device copy (a `--features cuda` build).
    GpuExperts(GpuExpertsArgs),
}

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

fn gpu_experts(args: GpuExpertsArgs) -> Result<()> {
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

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Measure this checkpoint instead of the built-in Maverick-shaped random model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length before decoding starts.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decode steps measured per batch size (after 2 warm-up steps).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure through a local cluster of this many expert-worker processes (same
    /// model, same run), and report cluster ÷ single-process throughput.
    #[arg(long)]
    expert_workers: Option<usize>,
    /// Where the single process computes: cpu, or cuda[:N] (the floor is then the GPU's
    /// device-to-device copy traffic).
    #[arg(long, default_value = "cpu")]
    device: expertmesh_model::Device,
    /// How a GPU computes products over the bf16 weights (f32, bf16).
    #[arg(long, default_value = "f32")]
    gemm: expertmesh_model::GemmPrecision,
}

#[derive(Serialize)]
struct ClusterPoint {
    batch: usize,
    tokens_per_s: f64,
    step_ms_median: f64,
    /// Cluster tokens/s ÷ single-process tokens/s at this batch size.
    ratio_to_single: f64,
}

#[derive(Serialize)]
struct DecodeReport {
    model: String,
    threads: usize,
    weight_bytes_total: u64,
    memcpy_gbps: f64,
    read_gbps: f64,
    prompt_tokens: usize,
    prefill_tokens_per_s: f64,
    decode: Vec<DecodePoint>,
    expert_swiglu_tokens: usize,
    expert_swiglu_gflops: f64,
    expert_workers: Option<usize>,
    cluster: Vec<ClusterPoint>,
}

#[derive(Serialize)]
struct DecodePoint {
    batch: usize,
    tokens_per_s: f64,
    step_ms_median: f64,
    weight_bytes_per_step: u64,
    /// Weight bytes per step ÷ memcpy bandwidth.
    floor_ms: f64,
    /// Median step time ÷ floor (1.0 would be at the memcpy bandwidth).
    ratio_to_floor: f64,
    /// The same ratio against the read-only bandwidth.
    ratio_to_read_floor: f64,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode(args),
        BenchCommand::Dispatch(args) => crate::bench_dispatch::run(args),
        BenchCommand::GpuExperts(a) => gpu_experts(a),
        BenchCommand::Serve(args) => crate::bench_serve::run(args),
    }
}

fn decode(args: DecodeArgs) -> Result<()> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting the thread count")?;
    }
    let threads = rayon::current_num_threads();
    let progress = |msg: &str| {
        if !args.json {
            eprintln!("{msg}");
        }
    };

    args.device.check()?;
    if args.device != expertmesh_model::Device::Cpu && args.expert_workers.is_some() {
        anyhow::bail!("--expert-workers measures the CPU engine; leave out --device");
    }
    let (memcpy_gbps, read_gbps) = match args.device {
        expertmesh_model::Device::Cpu => {
            progress("measuring memory bandwidth (256 MiB copies and reads)");
            bandwidth()
        }
        expertmesh_model::Device::Cuda(n) => {
            progress("measuring the GPU's memory bandwidth (1 GiB device-to-device copies)");
            let gbps = gpu_copy_gbps(n)?;
            (gbps, gbps)
        }
    };

    let started = Instant::now();
    let model_arg = match &args.model {
        Some(dir) => dir.display().to_string(),
        None => {
            progress(
                "building the Maverick-shaped random model (hidden 1024, 8 layers, 128 experts)",
            );
            "synthetic:bench".to_string()
        }
    };
    let model_source: ModelSource = model_arg.parse()?;
    let name = model_source.to_string();
    let config: TextConfig = model_source.config()?;
    let source: Box<dyn WeightSource> = model_source.weights()?;
    let mut model = Model::from_source(config.clone(), source.as_ref())?;
    model.to_device_with(args.device, args.gemm)?;
    let weight_bytes_total =
        model.decode_weight_bytes(&vec![config.num_local_experts; config.moe_layers.len()]) as u64;
    progress(&format!(
        "model ready on {} in {:.1} s: {:.2} GB of weights",
        model.device_name(),
        started.elapsed().as_secs_f64(),
        weight_bytes_total as f64 / 1e9
    ));

    let mut rng = SplitMix64::new(42);
    let mut prompt = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
            .collect()
    };

    progress(&format!("prefill: {} tokens, batch 1", args.prompt_tokens));
    let mut prefill_times = Vec::new();
    for _ in 0..3 {
        let p = prompt(args.prompt_tokens);
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        model.forward(
            &mut [Sequence {
                cache: &mut cache,
                tokens: &p,
            }],
            LogitRows::Last,
        )?;
        prefill_times.push(t0.elapsed());
    }
    let prefill_tokens_per_s = args.prompt_tokens as f64 / median(&mut prefill_times).as_secs_f64();

    let mut decode = Vec::new();
    for &batch in &args.batch {
        progress(&format!("decode: batch {batch}, {} steps", args.steps));
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| prompt(args.prompt_tokens)).collect();
        let (mut times, bytes) =
            decode_steps(&model, &model.local_experts(), &prompts, args.steps)?;
        let step = median(&mut times).as_secs_f64();
        let floor = bytes as f64 / (memcpy_gbps * 1e9);
        let read_floor = bytes as f64 / (read_gbps * 1e9);
        decode.push(DecodePoint {
            batch,
            tokens_per_s: batch as f64 / step,
            step_ms_median: step * 1e3,
            weight_bytes_per_step: bytes,
            floor_ms: floor * 1e3,
            ratio_to_floor: step / floor,
            ratio_to_read_floor: step / read_floor,
        });
    }

    let (swiglu_tokens, expert_swiglu_gflops) = swiglu_gflops(&config, source.as_ref())?;
    drop(source);
    let cluster = match args.expert_workers {
        Some(n) => {
            drop(model);
            progress(&format!(
                "starting a local cluster: coordinator + {n} expert workers"
            ));
            through_cluster(&model_arg, n, &args, &decode, &mut prompt)?
        }
        None => Vec::new(),
    };
    let report = DecodeReport {
        model: name,
        threads,
        weight_bytes_total,
        memcpy_gbps,
        read_gbps,
        prompt_tokens: args.prompt_tokens,
        prefill_tokens_per_s,
        decode,
        expert_swiglu_tokens: swiglu_tokens,
        expert_swiglu_gflops,
        expert_workers: args.expert_workers,
        cluster,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// The same decode measurement with the experts on `n` expert-worker processes.
fn through_cluster(
    model_arg: &str,
    n: usize,
    args: &DecodeArgs,
    single: &[DecodePoint],
    prompt: &mut impl FnMut(usize) -> Vec<u32>,
) -> Result<Vec<ClusterPoint>> {
    let cluster = LocalCluster::start(&ClusterSpec::expert_workers(model_arg, n))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (model, experts) =
        runtime.block_on(cluster.attach(model_arg, DispatchConfig::default()))?;
    let mut points = Vec::new();
    for (&batch, single) in args.batch.iter().zip(single) {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| prompt(args.prompt_tokens)).collect();
        let (mut times, _) = decode_steps(&model, &experts, &prompts, args.steps)?;
        let step = median(&mut times).as_secs_f64();
        let tokens_per_s = batch as f64 / step;
        points.push(ClusterPoint {
            batch,
            tokens_per_s,
            step_ms_median: step * 1e3,
            ratio_to_single: tokens_per_s / single.tokens_per_s,
        });
    }
    Ok(points)
}

/// Prefills every prompt in one batch, then decodes `steps` greedy steps for all of them
/// together. Returns each measured step's time and the median weight bytes per step.
pub(crate) fn decode_steps(
    model: &Model,
    runner: &dyn ExpertRunner,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<(Vec<Duration>, u64)> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut batch: Vec<Sequence<'_>> = caches
        .iter_mut()
        .zip(prompts)
        .map(|(cache, p)| Sequence { cache, tokens: p })
        .collect();
    let out = model.forward_with(&mut batch, LogitRows::Last, runner)?;
    let mut next: Vec<[u32; 1]> = (0..prompts.len()).map(|i| [argmax(out.row(i))]).collect();
    let mut times = Vec::new();
    let mut bytes = Vec::new();
    for step in 0..steps + 2 {
        let mut batch: Vec<Sequence<'_>> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, t)| Sequence { cache, tokens: t })
            .collect();
        let before = weight_bytes_read();
        let t0 = Instant::now();
        let out = model.forward_with(&mut batch, LogitRows::Last, runner)?;
        let elapsed = t0.elapsed();
        if step >= 2 {
            times.push(elapsed);
            let counted = weight_bytes_read() - before;
            // The CPU counts the bytes its products read; a GPU step reads every dense
            // weight and the experts its tokens were routed to.
            bytes.push(if counted > 0 {
                counted
            } else {
                let touched: Vec<usize> = out
                    .routes
                    .iter()
                    .map(|r| r.iter().map(|r| r.expert).collect::<BTreeSet<_>>().len())
                    .collect();
                model.decode_weight_bytes(&touched) as u64
            });
        }
        next = (0..prompts.len()).map(|i| [argmax(out.row(i))]).collect();
    }
    bytes.sort_unstable();
    Ok((times, bytes[bytes.len() / 2]))
}

/// GFLOP/s of one expert's SwiGLU (gate_up, activation, down) over 64 tokens.
fn swiglu_gflops(config: &TextConfig, src: &dyn WeightSource) -> Result<(usize, f64)> {
    const TOKENS: usize = 64;
    let layer = config.moe_layers[0];
    let p = format!("model.layers.{layer}.feed_forward.experts");
    let gate_up = src.tensor(&format!("{p}.gate_up_proj"))?.outer(0);
    let down = src.tensor(&format!("{p}.down_proj"))?.outer(0);
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut rng = SplitMix64::new(7);
    let u: Vec<f32> = (0..TOKENS * h)
        .map(|_| rng.next_f64() as f32 - 0.5)
        .collect();
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(expert_swiglu(&gate_up, &down, &u, TOKENS));
            t0.elapsed()
        })
        .collect();
    let flops = 2.0 * TOKENS as f64 * (h * 2 * i + i * h) as f64;
    Ok((TOKENS, flops / median(&mut times).as_secs_f64() / 1e9))
}

/// The GPU's device-to-device copy traffic (bytes read and written), GB/s.
fn gpu_copy_gbps(ordinal: usize) -> Result<f64> {
    #[cfg(feature = "cuda")]
    return Ok(expertmesh_model::cuda::bench::copy_traffic_gbps(
        ordinal, 10,
    )?);
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("cuda:{ordinal}: this expertmesh was built without CUDA")
}

/// (memcpy GB/s counting bytes copied, read-only GB/s), both cores, medians of 5.
fn bandwidth() -> (f64, f64) {
    const BYTES: usize = 256 << 20;
    let src = vec![1u64; BYTES / 8];
    let mut dst = vec![0u64; BYTES / 8];
    let chunk = src.len() / rayon::current_num_threads().max(1);
    let mut copies: Vec<Duration> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&dst);
            t0.elapsed()
        })
        .collect();
    let mut reads: Vec<Duration> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            let sum: u64 = src
                .par_chunks(chunk)
                .map(|s| {
                    s.chunks_exact(8)
                        .fold([0u64; 8], |mut acc, c| {
                            for (a, v) in acc.iter_mut().zip(c) {
                                *a = a.wrapping_add(*v);
                            }
                            acc
                        })
                        .iter()
                        .fold(0u64, |a, b| a.wrapping_add(*b))
                })
                .sum();
            std::hint::black_box(sum);
            t0.elapsed()
        })
        .collect();
    let gbps = |d: Duration| BYTES as f64 / d.as_secs_f64() / 1e9;
    (gbps(median(&mut copies)), gbps(median(&mut reads)))
}

pub(crate) fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn print_table(r: &DecodeReport) {
    println!(
        "model: {} ({:.2} GB of weights), {} threads",
        r.model,
        r.weight_bytes_total as f64 / 1e9,
        r.threads
    );
    println!(
        "memory bandwidth: memcpy {:.1} GB/s, read {:.1} GB/s",
        r.memcpy_gbps, r.read_gbps
    );
    println!(
        "prefill: {:.0} tokens/s ({} tokens, batch 1)",
        r.prefill_tokens_per_s, r.prompt_tokens
    );
    println!(
        "{:>6} {:>12} {:>10} {:>14} {:>10} {:>9} {:>9}",
        "batch", "tokens/s", "step ms", "weight MB/step", "floor ms", "x floor", "x read"
    );
    for d in &r.decode {
        println!(
            "{:>6} {:>12.1} {:>10.2} {:>14.1} {:>10.2} {:>9.2} {:>9.2}",
            d.batch,
            d.tokens_per_s,
            d.step_ms_median,
            d.weight_bytes_per_step as f64 / 1e6,
            d.floor_ms,
            d.ratio_to_floor,
            d.ratio_to_read_floor
        );
    }
    println!(
        "expert SwiGLU, {} tokens: {:.1} GFLOP/s",
        r.expert_swiglu_tokens, r.expert_swiglu_gflops
    );
    if let Some(n) = r.expert_workers {
        println!("through a local cluster of {n} expert workers (same run):");
        println!(
            "{:>6} {:>12} {:>10} {:>10}",
            "batch", "tokens/s", "step ms", "x single"
        );
        for c in &r.cluster {
            println!(
                "{:>6} {:>12.1} {:>10.2} {:>10.2}",
                c.batch, c.tokens_per_s, c.step_ms_median, c.ratio_to_single
            );
        }
    }
}
