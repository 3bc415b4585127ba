//! `expertmesh bench prefix`: time to first token of requests that share a long prefix (a
//! system prompt, a RAG context) through the OpenAI API of a local cluster, with prefix
//! caching and then with `--no-prefix-cache`, in one run: the loadgen's `shared-prefix`
//! workload against each, TTFT and end-to-end percentiles, their ratio, and the cache's hit
//! rate from `/metrics`. Each cluster first gets one request per prefix group (not timed), so
//! both are measured warm and the cached one from its cache.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_loadgen::workload::SharedPrefix;
use expertmesh_loadgen::{Endpoint, Lengths, Report, Run, Shape, Workload};
use expertmesh_model::ModelSource;
use serde_json::json;

use crate::cluster::{ClusterSpec, LocalCluster};

#[derive(Args, Debug)]
pub struct PrefixArgs {
    /// Model directory or `synthetic:bench`.
    #[arg(long, default_value = "tests/fixtures/tiny-maverick")]
    model: String,
    /// Token ids every request of a group begins with.
    #[arg(long, default_value_t = 2048)]
    prefix_tokens: usize,
    /// Each request's own token ids after the prefix.
    #[arg(long, default_value_t = 32)]
    suffix_tokens: usize,
    /// Distinct prefixes (request i takes prefix i mod this).
    #[arg(long, default_value_t = 1)]
    prefix_groups: u64,
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Concurrent streams.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Timed requests against each cluster.
    #[arg(long, default_value_t = 48)]
    requests: u64,
    #[arg(long, default_value_t = 2)]
    expert_workers: usize,
    #[arg(long)]
    json: bool,
}

/// One cluster's figures.
struct Measured {
    report: Report,
    hit_rate: Option<f64>,
}

pub fn run(args: PrefixArgs) -> Result<()> {
    let source: ModelSource = args.model.parse()?;
    let vocab = source.config()?.vocab_size as u32;
    let workload = Arc::new(Workload {
        model: None,
        chat: false,
        stream: true,
        prompt_lengths: Lengths::Fixed(args.suffix_tokens),
        output_lengths: Lengths::Fixed(args.max_tokens),
        token_ids_below: Some(vocab),
        dataset: None,
        shared_prefix: Some(SharedPrefix {
            len: args.prefix_tokens,
            groups: args.prefix_groups,
        }),
        replay: None,
        turns: 1,
        seed: 7,
    });
    let runtime = tokio::runtime::Runtime::new()?;
    let mut measured = Vec::new();
    for cached in [true, false] {
        let label = if cached { "cache" } else { "no cache" };
        if !args.json {
            eprintln!(
                "{label}: a cluster with {} expert workers{}",
                args.expert_workers,
                if cached { "" } else { ", --no-prefix-cache" }
            );
        }
        measured.push(runtime.block_on(measure(&args, cached, label, &workload))?);
    }
    let (with, without) = (&measured[0], &measured[1]);
    let ratio = without.report.ttft_ms.p50 / with.report.ttft_ms.p50;
    if args.json {
        let figures = |m: &Measured| {
            json!({"ttft_ms": m.report.ttft_ms, "e2e_ms": m.report.e2e_ms,
                   "requests_ok": m.report.requests_ok, "requests_failed": m.report.requests_failed,
                   "hit_rate": m.hit_rate})
        };
        let out = json!({"model": args.model, "prefix_tokens": args.prefix_tokens,
                         "suffix_tokens": args.suffix_tokens, "concurrency": args.concurrency,
                         "cache": figures(with), "no_cache": figures(without),
                         "ttft_p50_ratio": ratio});
        println!("{out}");
        return Ok(());
    }
    println!(
        "{} requests of a {}-token shared prefix + {} own tokens, {} at a time, {} new tokens",
        args.requests, args.prefix_tokens, args.suffix_tokens, args.concurrency, args.max_tokens
    );
    println!(
        "{:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99", "hit rate", "failed"
    );
    for m in &measured {
        let r = &m.report;
        println!(
            "{:>9} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>9} {:>7}",
            r.label,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.e2e_ms.p50,
            r.e2e_ms.p99,
            m.hit_rate
                .map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0)),
            r.requests_failed
        );
    }
    println!("TTFT p50 without the cache / with it: {ratio:.2}x");
    Ok(())
}

/// Starts a cluster (prefix caching on or off), warms it with one request per prefix group
/// and runs the timed requests.
async fn measure(
    args: &PrefixArgs,
    cached: bool,
    label: &str,
    workload: &Arc<Workload>,
) -> Result<Measured> {
    let no_cache = (!cached).then(|| "--no-prefix-cache".to_owned());
    let cluster = LocalCluster::start(&ClusterSpec::serving(
        &args.model,
        args.expert_workers,
        no_cache.into_iter().collect(),
    ))?;
    cluster.ready(Duration::from_secs(300)).await?;
    let http = cluster
        .http
        .first()
        .cloned()
        .context("the coordinator did not report its HTTP address")?;
    let endpoint = Endpoint::parse(&format!("http://{http}"), None, Duration::from_secs(600))
        .map_err(anyhow::Error::msg)?;
    let run = |requests: u64, shape: Shape| Run {
        endpoint: endpoint.clone(),
        workload: workload.clone(),
        shape,
        duration: None,
        requests: Some(requests),
        warmup: Duration::ZERO,
        progress: false,
    };
    // One request per group, one at a time: both clusters warm, the cache holding each
    // prefix.
    let warm = run(args.prefix_groups.max(1), Shape::Closed { concurrency: 1 })
        .execute()
        .await;
    anyhow::ensure!(
        warm.requests_failed == 0,
        "the warm-up failed: {:?}",
        warm.failures
    );
    let mut report = run(
        args.requests,
        Shape::Closed {
            concurrency: args.concurrency,
        },
    )
    .execute()
    .await;
    report.label = label.to_owned();
    // The workers' counters reach `/metrics` with their next heartbeat.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let page = endpoint.get("/metrics").await.map_err(anyhow::Error::msg)?;
    let hit_rate = page.lines().find_map(|l| {
        l.strip_prefix("expertmesh_prefix_cache_hit_rate ")?
            .trim()
            .parse()
            .ok()
    });
    drop(cluster);
    Ok(Measured { report, hit_rate })
}
