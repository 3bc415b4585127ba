//! `expertmesh loadgen`: load against an OpenAI-compatible endpoint (or, with `experts`,
//! against the expert tier alone), with a live progress line, a report table, JSON and
//! SVG plots. The work is in `expertmesh-loadgen`; this parses flags.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use expertmesh_dispatch::WireDType;
use expertmesh_loadgen::experts::{parse_skew, ExpertLoad};
use expertmesh_loadgen::html::Figure;
use expertmesh_loadgen::repeat::Summary;
use expertmesh_loadgen::slo::Slo;
use expertmesh_loadgen::workload::{read_dataset, read_trace, SharedPrefix};
use expertmesh_loadgen::{plot, Endpoint, Lengths, Report, Run, Shape, Workload};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadgenCommand {
    #[command(subcommand)]
    which: Option<LoadgenMode>,
    #[command(flatten)]
    args: LoadgenArgs,
}

#[derive(Subcommand, Debug)]
enum LoadgenMode {
    /// Synthetic dispatch batches straight to the expert workers.
    Experts(ExpertArgs),
}

/// What synthetic prompts share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum WorkloadKind {
    Synthetic,
    SharedPrefix,
}

#[derive(Args, Debug)]
struct LoadgenArgs {
    /// The endpoint, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine).
    #[arg(long)]
    url: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    /// Closed loop: this many concurrent clients (default 8 without --rate).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send for: 30s, 2m, 1h, 500ms or plain seconds (default 10s unless
    /// --requests).
    #[arg(long, value_parser = seconds)]
    duration: Option<f64>,
    /// Requests to send in all.
    #[arg(long)]
    requests: Option<u64>,
    /// Time at the start whose requests the figures leave out (30s, 1m, ...).
    #[arg(long, value_parser = seconds, default_value = "0")]
    warmup: f64,
    /// Prompt lengths (words, or token ids with --token-ids-below): fixed:N, uniform:A-B, normal:M,SD.
    #[arg(long, default_value = "fixed:32")]
    prompt_len: Lengths,
    /// Output lengths (max_tokens): fixed:N, uniform:A-B, normal:M,SD.
    #[arg(long, default_value = "fixed:32")]
    output_len: Lengths,
    /// Send synthetic prompts as token ids below this (models without a tokenizer).
    #[arg(long)]
    token_ids_below: Option<u32>,
    /// A JSONL dataset of prompts (`prompt`, `messages`, or ShareGPT `conversations`).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Replay a recorded trace: JSONL of `timestamp` (ms), `input_length`, `output_length`
    /// (a Mooncake trace, say): each request at its time, with its lengths (synthetic
    /// prompts).
    #[arg(long, conflicts_with_all = ["rate", "concurrency", "sweep", "dataset"])]
    trace: Option<PathBuf>,
    /// Replay the trace this many times faster.
    #[arg(long, default_value_t = 1.0, requires = "trace")]
    trace_speedup: f64,
    /// What synthetic prompts share: nothing (`synthetic`), or a prefix per group
    /// (`shared-prefix`: a system prompt or a RAG context before each request's own part).
    #[arg(long, value_enum, default_value_t = WorkloadKind::Synthetic)]
    workload: WorkloadKind,
    /// `shared-prefix`: words (or token ids) of the shared prefix.
    #[arg(long, default_value_t = 2048)]
    prefix_len: usize,
    /// `shared-prefix`: distinct prefixes; request i takes prefix i mod this.
    #[arg(long, default_value_t = 1)]
    prefix_groups: u64,
    /// Use the chat API.
    #[arg(long)]
    chat: bool,
    /// Multi-turn conversations of this many user turns (chat): each turn sends the whole
    /// history, the server's answers included (requests then count turns).
    #[arg(long, default_value_t = 1, requires = "chat")]
    turns: usize,
    /// Ask for whole responses instead of streams.
    #[arg(long)]
    no_stream: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run each level this many times: the table and JSON add each figure's mean and 95%
    /// confidence interval over the runs.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Run several levels in turn: concurrency=1,4,16,64 or rate=1,2,4.
    #[arg(long)]
    sweep: Option<String>,
    /// Per-request timeout (300s, 5m, ...).
    #[arg(long, value_parser = seconds, default_value = "300")]
    timeout: f64,
    /// Service-level objectives for goodput: ttft_ms=N,tpot_ms=N,e2e_ms=N (any of them;
    /// itl_ms is tpot_ms: a request's mean time per output token after the first).
    #[arg(long)]
    slo: Option<Slo>,
    /// Write the report(s) as JSON here (with `vllm bench serve`'s result keys).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write SVG plots into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write one self-contained HTML page here: the table, the plots, the JSON.
    #[arg(long)]
    html: Option<PathBuf>,
}

/// A duration as seconds: `30s`, `2m`, `1h`, `500ms`, `1.5s` or a plain number of seconds.
fn seconds(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("`{s}`: a duration is N followed by ms, s, m or h")),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v * scale),
        _ => Err(format!(
            "`{s}`: a duration is a number ≥ 0 and a unit (30s, 2m)"
        )),
    }
}

#[derive(Args, Debug)]
struct ExpertArgs {
    #[arg(long)]
    coordinator: String,
    /// The cluster's model: directory or synthetic:bench.
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    model: String,
    /// Tokens per routed batch.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Expert popularity: zipf:S (0 = uniform).
    #[arg(long, default_value = "zipf:1.0")]
    skew: String,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value = "bf16")]
    dtype: WireDType,
    /// How batches reach the workers: tcp (framed, the attention workers' default) or grpc.
    #[arg(long, default_value = "tcp")]
    dispatch: expertmesh_dispatch::Transport,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: LoadgenCommand) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    match cmd.which {
        Some(LoadgenMode::Experts(a)) => runtime.block_on(experts(a)),
        None => runtime.block_on(http(cmd.args)),
    }
}

fn levels(args: &LoadgenArgs) -> Result<Vec<Shape>> {
    if let Some(sweep) = &args.sweep {
        let (kind, values) = sweep
            .split_once('=')
            .ok_or_else(|| anyhow!("--sweep takes concurrency=... or rate=..."))?;
        return values
            .split(',')
            .map(|v| match kind {
                "concurrency" => Ok(Shape::Closed {
                    concurrency: v.trim().parse()?,
                }),
                "rate" => Ok(Shape::Open {
                    rate: v.trim().parse()?,
                }),
                _ => bail!("--sweep takes concurrency=... or rate=..."),
            })
            .collect();
    }
    if args.trace.is_some() {
        return Ok(vec![Shape::Replay {
            speedup: args.trace_speedup,
        }]);
    }
    Ok(vec![match args.rate {
        Some(rate) => Shape::Open { rate },
        None => Shape::Closed {
            concurrency: args.concurrency.unwrap_or(8),
        },
    }])
}

async fn http(args: LoadgenArgs) -> Result<()> {
    let url = args.url.clone().context("--url is required")?;
    let endpoint = Endpoint::parse(
        &url,
        args.api_key.clone(),
        Duration::from_secs_f64(args.timeout),
    )
    .map_err(anyhow::Error::msg)?;
    let workload = Arc::new(workload(&args)?);
    // A replayed trace runs to its end unless told otherwise.
    let duration = match (args.duration, args.requests) {
        (None, None) if args.trace.is_none() => Some(Duration::from_secs(10)),
        (d, _) => d.map(Duration::from_secs_f64),
    };
    let mut reports = Vec::new();
    let mut summaries = Vec::new();
    let repeat = args.repeat.max(1);
    for shape in levels(&args)? {
        let mut runs = Vec::new();
        for k in 0..repeat {
            let run = if repeat > 1 {
                format!(" (run {} of {repeat})", k + 1)
            } else {
                String::new()
            };
            eprintln!("load: {} against {url}{run}", shape.label());
            let mut report = Run {
                endpoint: endpoint.clone(),
                workload: workload.clone(),
                shape,
                duration,
                requests: args.requests,
                warmup: Duration::from_secs_f64(args.warmup),
                progress: true,
            }
            .execute()
            .await;
            if let Some(slo) = args.slo {
                report.apply_slo(slo);
            }
            runs.push(report);
        }
        summaries.push(Summary::of(&shape.label(), &runs));
        reports.extend(runs);
    }
    print!("{}", Report::table(&reports));
    if repeat > 1 {
        summaries.iter().for_each(|s| print!("{}", s.line()));
    }
    if let Some(out) = &args.out {
        write_json(out, &reports, &summaries, repeat)?;
    }
    let plots = match (&args.plot, &args.html) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(_)) => {
            Some(std::env::temp_dir().join(format!("expertmesh-loadgen-{}", std::process::id())))
        }
        (None, None) => None,
    };
    if let Some(dir) = &plots {
        let figures = draw_plots(&reports, &endpoint, dir).await?;
        if let Some(html) = &args.html {
            let page = expertmesh_loadgen::html::page(
                &format!("expertmesh loadgen: {url}"),
                &reports,
                &figures,
            );
            std::fs::write(html, page).with_context(|| format!("writing {}", html.display()))?;
            eprintln!("report page {}", html.display());
        }
        if args.plot.is_some() {
            eprintln!("plots in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}

/// What the run sends, as the flags describe it.
fn workload(args: &LoadgenArgs) -> Result<Workload> {
    if args.workload == WorkloadKind::SharedPrefix && args.dataset.is_some() {
        bail!("--workload shared-prefix draws synthetic prompts: it takes no --dataset");
    }
    Ok(Workload {
        model: args.model.clone(),
        chat: args.chat,
        stream: !args.no_stream,
        prompt_lengths: args.prompt_len,
        output_lengths: args.output_len,
        token_ids_below: args.token_ids_below,
        dataset: args
            .dataset
            .as_deref()
            .map(read_dataset)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        shared_prefix: (args.workload == WorkloadKind::SharedPrefix).then_some(SharedPrefix {
            len: args.prefix_len,
            groups: args.prefix_groups,
        }),
        replay: args
            .trace
            .as_deref()
            .map(read_trace)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        turns: args.turns.max(1),
        seed: args.seed,
    })
}

/// The report(s) as JSON at `out`: one level's object, every level's list, or with repeated
/// runs every run and each level's summary.
fn write_json(
    out: &std::path::Path,
    reports: &[Report],
    summaries: &[Summary],
    repeat: usize,
) -> Result<()> {
    let all: Vec<_> = reports.iter().map(Report::to_json).collect();
    let json = match (reports.len(), repeat) {
        (1, _) => serde_json::to_string_pretty(&all[0])?,
        (_, 1) => serde_json::to_string_pretty(&all)?,
        _ => {
            serde_json::to_string_pretty(&serde_json::json!({"runs": all, "summaries": summaries}))?
        }
    };
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Draws the plots of a run as SVG files into `dir`; each drawn, with its caption.
async fn draw_plots(
    reports: &[Report],
    endpoint: &Endpoint,
    dir: &std::path::Path,
) -> Result<Vec<Figure>> {
    std::fs::create_dir_all(dir)?;
    let last = reports.last().expect("at least one level");
    let mut drawn = vec![
        (
            "latency",
            "Latency distributions (last level)",
            plot::latency(last),
        ),
        (
            "timeline",
            "Throughput over time (last level)",
            plot::timeline(last),
        ),
    ];
    if reports.len() > 1 {
        drawn.push((
            "sweep",
            "The sweep: end-to-end latency against throughput",
            plot::sweep(reports),
        ));
        drawn.push((
            "pareto",
            "The sweep's Pareto curve: tokens/s per user against total tokens/s",
            plot::pareto(reports),
        ));
    }
    // expertmesh targets also show where the load went; other servers have no such metrics.
    if let Ok(page) = endpoint.get("/metrics").await {
        for (name, caption, svg) in [
            (
                "experts",
                "Routed tokens per expert",
                plot::expert_heatmap(&page),
            ),
            ("workers", "Load per worker", plot::worker_load(&page)),
        ] {
            if svg.is_ok() {
                drawn.push((name, caption, svg));
            }
        }
    }
    let mut figures = Vec::new();
    for (name, caption, svg) in drawn {
        let svg = svg.map_err(anyhow::Error::msg)?;
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(&path, &svg).with_context(|| format!("writing {}", path.display()))?;
        figures.push(Figure {
            caption: caption.to_owned(),
            svg,
        });
    }
    Ok(figures)
}

async fn experts(a: ExpertArgs) -> Result<()> {
    let report = expertmesh_loadgen::experts::run(ExpertLoad {
        coordinator: a.coordinator,
        model: a.model,
        tokens: a.tokens,
        skew: parse_skew(&a.skew).map_err(anyhow::Error::msg)?,
        duration: Duration::from_secs_f64(a.duration),
        concurrency: a.concurrency,
        dtype: a.dtype,
        transport: a.dispatch,
        seed: 0,
    })
    .await
    .map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "expert tier: {:.1} batches/s, {:.0} tokens/s over {:.1} s",
        report.batches_per_s, report.tokens_per_s, report.duration_s
    );
    println!(
        "{:>7} {:<22} {:>8} {:>9} {:>7} {:>21}",
        "worker", "address", "batches", "tokens", "failed", "RTT ms p50/p90/p99"
    );
    for w in &report.workers {
        println!(
            "{:>7} {:<22} {:>8} {:>9} {:>7} {:>21}",
            w.worker,
            w.address,
            w.batches,
            w.tokens,
            w.failed,
            format!(
                "{:.1}/{:.1}/{:.1}",
                w.rtt_ms.p50, w.rtt_ms.p90, w.rtt_ms.p99
            )
        );
    }
    Ok(())
}
