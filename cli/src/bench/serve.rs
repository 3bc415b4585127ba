//! `expertmesh bench serve`: streams through the OpenAI-compatible API of a local cluster
//! (what `up` starts, with `--expert-workers` expert workers) at several concurrency levels:
//! output tokens/s, time to first token and inter-token latency (p50, p99), against the
//! single-process engine measured in the same run on the same work (the same number of
//! prompts of the same length, prefilled together, then decoded together): the ratio is the
//! serving overhead (HTTP, gRPC, scheduling and expert dispatch). The engine's pure decode
//! rate at the same batch size is shown too, and the attention worker's own timers (read
//! from `/metrics`) split its steps into compute, expert wait and serving.

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
    /// How the attention worker reaches the expert workers: tcp (framed) or grpc.
    #[arg(long, default_value = "tcp")]
    dispatch: expertmesh_dispatch::Transport,
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
    /// The single-process engine's output tokens/s on the same work: `concurrency` prompts
    /// prefilled together, then decoded together to `max_tokens` each.
    single_process_tokens_per_s: f64,
    /// Served tokens/s ÷ the single process's on the same work.
    ratio: f64,
    /// The single-process engine's pure decode tokens/s at batch `concurrency` (no prefill).
    single_process_decode_tokens_per_s: f64,
    /// Served tokens/s ÷ that pure decode rate.
    decode_ratio: f64,
    /// The attention worker's steps over the level, from its own timers.
    steps: Option<StepBreakdown>,
}

/// Where one engine step's time went, averaged over a level (ms per step).
#[derive(Serialize, Clone, Copy)]
struct StepBreakdown {
    steps: f64,
    /// Wall time of the level ÷ steps.
    wall_ms: f64,
    /// The forward pass, less the time blocked on routed experts.
    compute_ms: f64,
    /// Blocked waiting for routed experts' answers.
    expert_wait_ms: f64,
    /// The rest of a step: planning, sampling, handing tokens to the streams.
    serving_ms: f64,
    /// Between steps: waiting for requests, taking them in.
    idle_ms: f64,
    /// One MoE layer's routed batch, send to last answer (ms).
    routed_batch_ms: f64,
    /// Share of the routed batches' time hidden behind the attention worker's own work.
    hidden: f64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let source: ModelSource = args.model.parse()?;
    let progress = |m: &str| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    progress("single-process rates at each batch size (the same work, and decode alone)");
    let baseline = single_process_rates(&args, &source)?;
    progress(&format!(
        "starting a cluster: coordinator + HTTP, {} expert workers, 1 attention worker",
        args.expert_workers
    ));
    let cluster = LocalCluster::start(&ClusterSpec::serving(
        &args.model,
        args.expert_workers,
        vec!["--dispatch".into(), args.dispatch.to_string()],
    ))?;
    let http = cluster
        .http
        .first()
        .cloned()
        .context("the coordinator did not report its HTTP address")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(cluster.ready(Duration::from_secs(300)))?;
    let vocab = source.config()?.vocab_size as u64;
    let mut levels = Vec::new();
    let mut timers = runtime.block_on(engine_timers(&http))?;
    for (&c, &(same_work, decode)) in args.concurrency.iter().zip(&baseline) {
        progress(&format!("{c} concurrent streams"));
        let started = Instant::now();
        let level = runtime.block_on(load(&http, c, &args, vocab))?;
        let wall = started.elapsed();
        let after = runtime.block_on(engine_timers(&http))?;
        levels.push(Level {
            single_process_tokens_per_s: same_work,
            ratio: level.output_tokens_per_s / same_work,
            single_process_decode_tokens_per_s: decode,
            decode_ratio: level.output_tokens_per_s / decode,
            steps: after.since(&timers, wall),
            ..level
        });
        timers = after;
    }
    drop(cluster);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json!({"model": args.model, "levels": levels}))?
        );
        return Ok(());
    }
    print_levels(&args, &levels);
    Ok(())
}

/// For each concurrency: the single process's output tokens/s on the same work as the
/// streams (prompts prefilled together, then decoded to `max_tokens`), and its pure decode
/// tokens/s; medians of several runs.
fn single_process_rates(args: &ServeArgs, source: &ModelSource) -> Result<Vec<(f64, f64)>> {
    let mut model = Model::from_source(source.config()?, source.weights()?.as_ref())?;
    // As the cluster's attention worker holds its weights (`to_device`).
    model.to_device(expertmesh_model::Device::Cpu)?;
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
        // The same work `rounds` times, as the streams do it: medians.
        let steps = args.max_tokens.saturating_sub(1).max(1);
        let (mut works, mut decodes) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(3) {
            let run = decode_steps(&model, &model.local_experts(), &prompts, steps)?;
            decodes.push(median(&mut run.steps.clone()));
            works.push(run.prefill + run.steps.iter().sum::<Duration>());
        }
        rates.push((
            (c * (steps + 1)) as f64 / median(&mut works).as_secs_f64(),
            c as f64 / median(&mut decodes).as_secs_f64(),
        ));
    }
    Ok(rates)
}

/// The levels as two tables: served against the single process, and the step breakdown.
fn print_levels(args: &ServeArgs, levels: &[Level]) {
    println!(
        "served through the API with --dispatch {}; single: the single process on the same \
         work; decode: its decode steps alone",
        args.dispatch
    );
    println!(
        "{:>6} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>7} {:>12} {:>7}",
        "conc",
        "requests",
        "tokens/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "single tok/s",
        "ratio",
        "decode tok/s",
        "ratio"
    );
    for l in levels {
        println!(
            "{:>6} {:>9} {:>10.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>12.1} {:>7.2} {:>12.1} {:>7.2}",
            l.concurrency,
            l.requests,
            l.output_tokens_per_s,
            l.ttft_ms_p50,
            l.ttft_ms_p99,
            l.itl_ms_p50,
            l.itl_ms_p99,
            l.single_process_tokens_per_s,
            l.ratio,
            l.single_process_decode_tokens_per_s,
            l.decode_ratio
        );
    }
    println!("attention worker steps (its own timers; ms per step):");
    println!(
        "{:>6} {:>7} {:>8} {:>8} {:>12} {:>8} {:>7} {:>13} {:>7}",
        "conc",
        "steps",
        "wall",
        "compute",
        "expert wait",
        "serving",
        "idle",
        "routed batch",
        "hidden"
    );
    for l in levels {
        if let Some(b) = l.steps {
            println!(
                "{:>6} {:>7.0} {:>8.2} {:>8.2} {:>12.2} {:>8.2} {:>7.2} {:>13.2} {:>6.0}%",
                l.concurrency,
                b.steps,
                b.wall_ms,
                b.compute_ms,
                b.expert_wait_ms,
                b.serving_ms,
                b.idle_ms,
                b.routed_batch_ms,
                b.hidden * 100.0
            );
        }
    }
}

/// The attention workers' timers as `/metrics` shows them (summed over workers).
#[derive(Debug, Clone, Copy, Default)]
struct EngineTimers {
    steps: f64,
    step_s: f64,
    forward_s: f64,
    wait_s: f64,
    routed: f64,
    routed_s: f64,
}

/// Reads the timers once the heartbeat after the last step has reached the coordinator.
async fn engine_timers(http: &str) -> Result<EngineTimers> {
    // Workers report with their heartbeat (every second by default).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let endpoint = Endpoint::parse(&format!("http://{http}"), None, Duration::from_secs(10))
        .map_err(anyhow::Error::msg)?;
    let text = endpoint
        .get("/metrics")
        .await
        .map_err(|f| anyhow::anyhow!("reading /metrics: {f}"))?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok(EngineTimers {
        steps: sum("expertmesh_scheduler_steps_total"),
        step_s: sum("expertmesh_engine_step_seconds_total"),
        forward_s: sum("expertmesh_engine_forward_seconds_total"),
        wait_s: sum("expertmesh_engine_expert_wait_seconds_total"),
        routed: sum("expertmesh_routed_batch_seconds_count"),
        routed_s: sum("expertmesh_routed_batch_seconds_sum"),
    })
}

impl EngineTimers {
    /// The steps taken since `before`, over `wall` of load.
    fn since(&self, before: &EngineTimers, wall: Duration) -> Option<StepBreakdown> {
        let steps = self.steps - before.steps;
        if steps < 1.0 {
            return None;
        }
        let per = |s: f64| s * 1e3 / steps;
        let (step, forward, wait) = (
            self.step_s - before.step_s,
            self.forward_s - before.forward_s,
            self.wait_s - before.wait_s,
        );
        let (routed, routed_s) = (self.routed - before.routed, self.routed_s - before.routed_s);
        Some(StepBreakdown {
            steps,
            wall_ms: per(wall.as_secs_f64()),
            compute_ms: per(forward - wait),
            expert_wait_ms: per(wait),
            serving_ms: per(step - forward),
            idle_ms: per((wall.as_secs_f64() - step).max(0.0)),
            routed_batch_ms: if routed > 0.0 {
                routed_s * 1e3 / routed
            } else {
                0.0
            },
            hidden: if routed_s > 0.0 {
                (1.0 - wait / routed_s).max(0.0)
            } else {
                0.0
            },
        })
    }
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
        single_process_decode_tokens_per_s: 0.0,
        decode_ratio: 0.0,
        steps: None,
    })
}
