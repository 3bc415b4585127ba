//! `expertmesh bench transfer`: every expert of a checkpoint fetched over loopback from an
//! expert worker into a weightless shard's cache, as many at a time as a worker that joins
//! without the checkpoint does, over each transport (the port's framed form, gRPC's
//! `FetchExperts`), against raw TCP moving the same bytes over loopback in the same run
//! (1 MiB writes into a reader that discards them), and against the same with the reader
//! writing them into a new file (what keeping the bytes costs any receiver). The transports
//! and the baselines take turns; medians of `--runs`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_dispatch::Transport;
use expertmesh_expert_worker::transfer::{
    expert_digest, fetch_expert, ExpertCache, ExpertSource, TransferError, FETCHES_IN_FLIGHT,
};
use expertmesh_expert_worker::{Batcher, BatcherConfig, ExpertServer, ExpertShard};
use expertmesh_model::ModelSource;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args, Debug)]
pub struct TransferArgs {
    /// The checkpoint whose experts travel.
    #[arg(long, default_value = "tests/fixtures/tiny-maverick")]
    model: String,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The transports measured, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "tcp,grpc")]
    transport: Vec<Transport>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    experts: usize,
    bytes: u64,
    raw_tcp_mb_per_s: f64,
    /// Raw TCP whose reader writes the bytes into a new file, as a receiver must keep them.
    raw_tcp_landed_mb_per_s: f64,
    transports: Vec<TransportReport>,
}

#[derive(Serialize)]
struct TransportReport {
    transport: String,
    fetch_mb_per_s: f64,
    /// The median of each run's fetch rate over the same run's raw TCP rate.
    ratio: f64,
    /// The same over the same run's landed raw TCP rate: what the protocol and its checks
    /// cost beyond keeping the bytes.
    ratio_to_landed: f64,
}

pub fn run(args: TransferArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime.block_on(measure(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} experts, {:.1} MB; raw TCP {:.0} MB/s, landed in a file {:.0} MB/s",
            report.model,
            report.experts,
            report.bytes as f64 / 1e6,
            report.raw_tcp_mb_per_s,
            report.raw_tcp_landed_mb_per_s,
        );
        for t in &report.transports {
            println!(
                "  {:>4}: {:.0} MB/s, ratio {:.2} (to landed {:.2})",
                t.transport, t.fetch_mb_per_s, t.ratio, t.ratio_to_landed
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn measure(args: &TransferArgs) -> Result<Report> {
    let source: ModelSource = args.model.parse()?;
    let config = source.config()?;
    let sender = Arc::new(ExpertShard::new(&config, source.weights()?.as_ref())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let batcher = Batcher::spawn(sender.clone(), BatcherConfig::default());
    tokio::spawn(ExpertServer::new(batcher, Arc::default()).serve(listener));
    let experts = config.num_local_experts;
    // As the coordinators hold them: every fetched expert is checked against its digest.
    let digests: Arc<Vec<Option<u32>>> = Arc::new(
        (0..experts as u32)
            .map(|e| expert_digest(&sender, e).map(Some))
            .collect::<Result<_, _>>()?,
    );
    let runs = args.runs.max(1);
    let (mut rates, mut raw, mut landed) = (
        vec![Vec::new(); args.transport.len()],
        Vec::new(),
        Vec::new(),
    );
    let mut bytes = 0;
    for run in 0..runs {
        for (t, &transport) in args.transport.iter().enumerate() {
            let dir = scratch(&format!("{run}-{transport}"));
            let cache = Arc::new(ExpertCache::create(&dir, &config)?);
            let receiver = Arc::new(ExpertShard::new(&config, cache.weights())?.weightless());
            let peer = vec![expertmesh_expert_worker::transfer::source(
                transport, &address,
            )?];
            let started = Instant::now();
            bytes = fetch_every_expert(&receiver, &cache, &digests, &peer).await?;
            rates[t].push(bytes as f64 / 1e6 / started.elapsed().as_secs_f64());
            let _ = std::fs::remove_dir_all(&dir);
        }
        raw.push(raw_tcp(bytes, None).await?);
        landed.push(raw_tcp(bytes, Some(scratch(&format!("{run}-raw")))).await?);
        eprintln!("run {}/{runs} done", run + 1);
    }
    let transports = args
        .transport
        .iter()
        .zip(rates)
        .map(|(t, r)| TransportReport {
            transport: t.to_string(),
            ratio: median(r.iter().zip(&raw).map(|(f, w)| f / w).collect()),
            ratio_to_landed: median(r.iter().zip(&landed).map(|(f, w)| f / w).collect()),
            fetch_mb_per_s: median(r),
        })
        .collect();
    Ok(Report {
        model: args.model.clone(),
        experts,
        bytes,
        raw_tcp_mb_per_s: median(raw),
        raw_tcp_landed_mb_per_s: median(landed),
        transports,
    })
}

/// A path of this run's own in the temporary directory, where the caches and the landed
/// baseline's file go.
fn scratch(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "expertmesh-bench-transfer-{}-{what}",
        std::process::id()
    ))
}

/// Fetches every expert into `receiver`'s `cache` from `peer`, [`FETCHES_IN_FLIGHT`] at a
/// time; the bytes fetched.
async fn fetch_every_expert(
    receiver: &Arc<ExpertShard>,
    cache: &Arc<ExpertCache>,
    digests: &Arc<Vec<Option<u32>>>,
    peer: &[Arc<dyn ExpertSource>],
) -> Result<u64> {
    let mut tasks: tokio::task::JoinSet<Result<(u64, String), TransferError>> =
        tokio::task::JoinSet::new();
    let mut bytes = 0;
    for e in 0..digests.len() as u32 {
        if tasks.len() == FETCHES_IN_FLIGHT {
            bytes += tasks.join_next().await.expect("a task")??.0;
        }
        let (receiver, cache, peer, digests) = (
            receiver.clone(),
            cache.clone(),
            peer.to_vec(),
            digests.clone(),
        );
        tasks.spawn(
            async move { fetch_expert(&receiver, &cache, e, digests[e as usize], &peer).await },
        );
    }
    while let Some(done) = tasks.join_next().await {
        bytes += done??.0;
    }
    Ok(bytes)
}

/// MB/s of `bytes` written in 1 MiB pieces over a loopback connection to a reader that
/// discards them, or with `land`, writes each read at its offset into a new file there (what
/// any receiver pays to keep the bytes, before a protocol or a check), and answers one byte
/// at the end.
async fn raw_tcp(bytes: u64, land: Option<std::path::PathBuf>) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let file = land
            .as_ref()
            .map(|path| std::fs::File::create_new(path).context("the landing file"))
            .transpose()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the writer hung up");
            if let Some(file) = &file {
                file.write_all_at(&buf[..n], got)?;
            }
            got += n as u64;
        }
        if let Some(path) = &land {
            std::fs::remove_file(path)?;
        }
        s.write_all(&[1]).await?;
        anyhow::Ok(())
    });
    let mut s = tokio::net::TcpStream::connect(address).await?;
    s.set_nodelay(true)?;
    let piece = vec![7u8; 1 << 20];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(piece.len() as u64) as usize;
        s.write_all(&piece[..n]).await?;
        sent += n as u64;
    }
    let mut done = [0u8; 1];
    s.read_exact(&mut done).await?;
    let took = started.elapsed().as_secs_f64();
    reader.await??;
    Ok(bytes as f64 / 1e6 / took)
}
