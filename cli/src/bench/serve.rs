//! `expertmesh bench serve`: streams through the OpenAI-compatible API of a local cluster
//! (what `up` starts, with `--expert-workers` expert workers) at several concurrency levels:
//! output tokens/s, time to first token and inter-token latency (p50, p99), against the
//! single-process engine's batch decode rate at the same batch size, measured in the same
//! run. The ratio is the serving overhead: HTTP, gRPC, scheduling and expert dispatch.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_loadgen::Endpoint;
use expertmesh_model::sampling::SplitMix64;
use expertmesh_model::{Model, ModelSource};
use serde::Serialize;
use serde_json::json;

use super::{decode_steps, median};
use crate::cluster::{ClusterSpec, LocalCluster};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory or `synthetic:bench`.
    #[arg(long, default_value = "synthetic:bench")]
    model: String,
    /// Concurrent streams, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Requests each stream sends one after another.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long, default_value_t = 2)]
    expert_workers: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Level {
    concurrency: usize,
    requests: usize,
    output_tokens: usize,
    output_tokens_per_s: f64,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    itl_ms_p50: f64,
    itl_ms_p99: f64,
    /// The single-process engine's decode tokens/s at batch `concurrency`.
    single_process_tokens_per_s: f64,
    /// Served tokens/s ÷ single-process decode tokens/s.
    ratio: f64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let source: ModelSource = args.model.parse()?;
    let progress = |m: &str| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    progress("single-process decode rate at each batch size");
    let baseline = {
        let model = Model::from_source(source.config()?, source.weights()?.as_ref())?;
        let vocab = model.config().vocab_size as u64;
        let mut rng = SplitMix64::new(9);
        let mut rates = Vec::new();
        for &c in &args.concurrency {
            let prompts: Vec<Vec<u32>> = (0..c)
                .map(|_| {
                    (0..args.prompt_tokens)
                        .map(|_| (rng.next_u64() % vocab) as u32)
                        .collect()
                })
                .collect();
            let (mut times, _) = decode_steps(&model, &model.local_experts(), &prompts, 6)?;
            rates.push(c as f64 / median(&mut times).as_secs_f64());
        }
        rates
    };
    progress(&format!(
        "starting a cluster: coordinator + HTTP, {} expert workers, 1 attention worker",
        args.expert_workers
    ));
    let cluster = LocalCluster::start(&ClusterSpec {
        model: args.model.clone(),
        coordinators: 1,
        data_dir: None,
        expert_capacities: vec![None; args.expert_workers],
        attention_workers: 1,
        attention_args: Vec::new(),
        http: Some("127.0.0.1:0".into()),
        api_key: None,
        coordinator_args: Vec::new(),
        device: expertmesh_model::Device::Cpu,
        gemm: expertmesh_model::GemmPrecision::F32,
    })?;
    let http = cluster
        .http
        .first()
        .cloned()
        .context("the coordinator did not report its HTTP address")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(cluster.ready(Duration::from_secs(300)))?;
    let vocab = source.config()?.vocab_size as u64;
    let mut levels = Vec::new();
    for (&c, &single) in args.concurrency.iter().zip(&baseline) {
        progress(&format!("{c} concurrent streams"));
        let level = runtime.block_on(load(&http, c, &args, vocab))?;
        levels.push(Level {
            single_process_tokens_per_s: single,
            ratio: level.output_tokens_per_s / single,
            ..level
        });
    }
    drop(cluster);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json!({"model": args.model, "levels": levels}))?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>7}",
        "conc",
        "requests",
        "tokens/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "single tok/s",
        "ratio"
    );
    for l in &levels {
        println!(
            "{:>6} {:>9} {:>10.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>12.1} {:>7.2}",
            l.concurrency,
            l.requests,
            l.output_tokens_per_s,
            l.ttft_ms_p50,
            l.ttft_ms_p99,
            l.itl_ms_p50,
            l.itl_ms_p99,
            l.single_process_tokens_per_s,
            l.ratio
        );
    }
    Ok(())
}

async fn load(http: &str, c: usize, args: &ServeArgs, vocab: u64) -> Result<Level> {
    let started = Instant::now();
    let endpoint = Endpoint::parse(&format!("http://{http}"), None, Duration::from_secs(600))
        .map_err(anyhow::Error::msg)?;
    let tasks: Vec<_> = (0..c)
        .map(|i| {
            let endpoint = endpoint.clone();
            let (prompt_tokens, max_tokens, rounds) =
                (args.prompt_tokens, args.max_tokens, args.rounds);
            tokio::spawn(async move {
                let mut rng = SplitMix64::new(1000 + i as u64);
                let mut out = Vec::new();
                for _ in 0..rounds {
                    let prompt: Vec<u64> =
                        (0..prompt_tokens).map(|_| rng.next_u64() % vocab).collect();
                    let body = json!({"prompt": prompt, "max_tokens": max_tokens,
                                      "temperature": 0, "stream": true});
                    let o = endpoint
                        .send("/v1/completions", &body, true, started)
                        .await
                        .map_err(|f| anyhow::anyhow!("a request failed: {f}"))?;
                    out.push(o);
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    let mut timings = Vec::new();
    for t in tasks {
        timings.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tokens: usize = timings.iter().map(|t| t.client_tokens).sum();
    let mut ttft: Vec<Duration> = timings.iter().filter_map(|t| t.ttft).collect();
    let mut itl: Vec<Duration> = timings
        .iter()
        .flat_map(|t| t.gaps.iter().copied())
        .collect();
    let pct = |v: &mut Vec<Duration>, q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
    };
    Ok(Level {
        concurrency: c,
        requests: timings.len(),
        output_tokens: tokens,
        output_tokens_per_s: tokens as f64 / elapsed,
        ttft_ms_p50: pct(&mut ttft, 0.5),
        ttft_ms_p99: pct(&mut ttft, 0.99),
        itl_ms_p50: pct(&mut itl, 0.5),
        itl_ms_p99: pct(&mut itl, 0.99),
        single_process_tokens_per_s: 0.0,
        ratio: 0.0,
    })
}
