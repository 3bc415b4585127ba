//! `expertmesh bench decode`: decode and prefill throughput of the single-process engine,
//! set against this machine's memory bandwidth measured in the same run.
//!
//! Decoding reads every dense weight and each touched expert once per step, so the floor
//! for a step is "weight bytes touched ÷ bandwidth"; the report gives the measured median
//! step time as a ratio to that floor. Figures are medians over repeated runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_attention_worker::DispatchConfig;
use expertmesh_model::moe::{ExpertGroup, Experts};
use expertmesh_model::sampling::SplitMix64;
use expertmesh_model::{LogitRows, Model, ModelSource, Sequence, TextConfig, WeightSource};

use super::gpu::gpu_copy_gbps;
use super::steps::{bandwidth, decode_steps, median};
use crate::cluster::{ClusterSpec, LocalCluster};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Measure this checkpoint instead of the built-in Maverick-shaped random model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length before decoding starts; more lengths (comma-separated, e.g.
    /// 128,8192,32768) add a prefill measurement at each, with the KV cache's bytes per token
    /// (decode is measured after the first).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    prompt_tokens: Vec<usize>,
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
    /// How products over the bf16 weights compute (f32, bf16: activations rounded to bf16,
    /// on the CPU for the dense products).
    #[arg(long, default_value = "f32")]
    gemm: expertmesh_model::GemmPrecision,
    /// Measure the built-in model with its routed experts in FP8 (the same weights,
    /// quantized as `expertmesh quantize` does).
    #[arg(long, conflicts_with = "model")]
    fp8: bool,
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
    /// Prefill at each `--prompt-tokens` length.
    prefill: Vec<PrefillPoint>,
    decode: Vec<DecodePoint>,
    expert_swiglu_tokens: usize,
    expert_swiglu_gflops: f64,
    expert_workers: Option<usize>,
    cluster: Vec<ClusterPoint>,
}

#[derive(Serialize)]
struct PrefillPoint {
    prompt_tokens: usize,
    tokens_per_s: f64,
    /// The KV cache after the prompt ÷ its tokens (RoPE layers keep one chunk, NoPE layers
    /// everything, so this falls with length towards the NoPE layers' share).
    kv_bytes_per_token: f64,
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

pub fn run(args: DecodeArgs) -> Result<()> {
    if args.prompt_tokens.is_empty() || args.prompt_tokens.contains(&0) {
        anyhow::bail!("--prompt-tokens takes lengths of at least one token");
    }
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
    let (config, source): (TextConfig, Box<dyn WeightSource>) = match (&model_source, args.fp8) {
        (ModelSource::Synthetic(spec), true) => {
            progress("quantizing its routed experts to FP8");
            let (config, mut weights) = spec.build()?;
            let config = expertmesh_model::synthetic::to_fp8(&config, &mut weights)?;
            (config, Box::new(weights))
        }
        _ => (model_source.config()?, model_source.weights()?),
    };
    let name = if args.fp8 {
        format!("{name} (FP8 experts)")
    } else {
        name
    };
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

    let (prefill, decode) = single_process(
        &model,
        &args,
        &mut prompt,
        (memcpy_gbps, read_gbps),
        progress,
    )?;

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
        prompt_tokens: prefill[0].prompt_tokens,
        prefill_tokens_per_s: prefill[0].tokens_per_s,
        prefill,
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

/// Prefill at each prompt length after an untimed one (median of 3 for the first length,
/// one run for longer ones) and decode at each batch size of the single process after the
/// first length, each step's median against the bandwidth floors `(memcpy, read)` in GB/s.
fn single_process(
    model: &Model,
    args: &DecodeArgs,
    prompt: &mut impl FnMut(usize) -> Vec<u32>,
    (memcpy_gbps, read_gbps): (f64, f64),
    progress: impl Fn(&str),
) -> Result<(Vec<PrefillPoint>, Vec<DecodePoint>)> {
    let mut prefill = Vec::new();
    for (i, &n) in args.prompt_tokens.iter().enumerate() {
        progress(&format!("prefill: {n} tokens, batch 1"));
        let mut times = Vec::new();
        let mut kv_bytes = 0;
        // The first length's first run is not timed, as llama-bench's warm-up prompt run of
        // the size it measures: the first forwards after loading run cold. Without it, on a
        // Sapphire Rapids VM (2 threads), the median of the first three prefills of 128
        // tokens read 362 tokens/s in one run, and the side-by-side script's rounds 642-731,
        // where warm single prefills read ~880-930.
        let warm_up = usize::from(i == 0);
        for run in 0..if i == 0 { 3 + warm_up } else { 1 } {
            let p = prompt(n);
            let mut cache = model.new_cache();
            let t0 = Instant::now();
            model.forward(&mut [Sequence::new(&mut cache, &p)], LogitRows::Last)?;
            if run >= warm_up {
                times.push(t0.elapsed());
            }
            kv_bytes = cache.bytes();
        }
        prefill.push(PrefillPoint {
            prompt_tokens: n,
            tokens_per_s: n as f64 / median(&mut times).as_secs_f64(),
            kv_bytes_per_token: kv_bytes as f64 / n.max(1) as f64,
        });
    }
    let prompt_tokens = args.prompt_tokens[0];

    let mut decode = Vec::new();
    for &batch in &args.batch {
        progress(&format!("decode: batch {batch}, {} steps", args.steps));
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| prompt(prompt_tokens)).collect();
        let run = decode_steps(model, &model.local_experts(), &prompts, args.steps)?;
        let (mut times, bytes) = (run.steps, run.weight_bytes);
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
    Ok((prefill, decode))
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
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| prompt(args.prompt_tokens[0])).collect();
        let mut times = decode_steps(&model, &experts, &prompts, args.steps)?.steps;
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

/// GFLOP/s of one expert's SwiGLU (gate and up, activation, down) over 64 tokens, bf16
/// (fused tensors) or FP8 (per-expert projections) as the checkpoint holds it.
fn swiglu_gflops(config: &TextConfig, src: &dyn WeightSource) -> Result<(usize, f64)> {
    const TOKENS: usize = 64;
    let experts = Experts::load(src, config, config.moe_layers[0])?;
    let group = [ExpertGroup {
        expert: 0,
        rows: TOKENS as u32,
    }];
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut rng = SplitMix64::new(7);
    let u: Vec<f32> = (0..TOKENS * h)
        .map(|_| rng.next_f64() as f32 - 0.5)
        .collect();
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(experts.run_groups(&group, &u, h));
            t0.elapsed()
        })
        .collect();
    let flops = 2.0 * TOKENS as f64 * (h * 2 * i + i * h) as f64;
    Ok((TOKENS, flops / median(&mut times).as_secs_f64() / 1e9))
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
    for p in &r.prefill {
        println!(
            "prefill: {:.0} tokens/s ({} tokens, batch 1), KV cache {:.1} KB/token",
            p.tokens_per_s,
            p.prompt_tokens,
            p.kv_bytes_per_token / 1e3
        );
    }
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
