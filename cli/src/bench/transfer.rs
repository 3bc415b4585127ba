//! `expertmesh bench transfer`: every expert of a checkpoint fetched over loopback from an
//! expert worker into a weightless shard's cache, as many at a time as a worker that joins
//! without the checkpoint does, over each transport (the port's framed form, gRPC's
//! `FetchExperts`), against raw TCP moving the same bytes over loopback in the same run
//! (1 MiB writes into a reader that discards them), and against the same with the reader
//! keeping them where the cache does: in new memory (the default), or in a new file with
//! `--expert-cache` (what keeping the bytes costs any receiver). The transports and the
//! landed baseline take turns, in an order that turns each run (`turn`); medians of `--runs`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_dispatch::Transport;
use expertmesh_expert_worker::transfer::{
    expert_digest, fetch_expert, ExpertCache, ExpertSource, TransferError, FETCHES_IN_FLIGHT,
};
use expertmesh_expert_worker::{Batcher, BatcherConfig, ExpertServer, ExpertShard};
use expertmesh_model::landing::Landing;
use expertmesh_model::ModelSource;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{median_of, turn};

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
    /// Land the experts in a cache file in this directory, as a worker given
    /// `--expert-cache` does (default: in memory).
    #[arg(long)]
    expert_cache: Option<std::path::PathBuf>,
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
    /// Raw TCP whose reader keeps the bytes where the cache does (new memory, or a new file).
    raw_tcp_landed_mb_per_s: f64,
    /// Where the bytes landed: `memory` or `file`.
    landed_in: &'static str,
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
            "{}: {} experts, {:.1} MB; raw TCP {:.0} MB/s, landed in {} {:.0} MB/s",
            report.model,
            report.experts,
            report.bytes as f64 / 1e6,
            report.raw_tcp_mb_per_s,
            report.landed_in,
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
    // The transports, then the landed baseline (the first run learns the bytes it moves).
    let slots = args.transport.len() + 1;
    for run in 0..runs {
        for slot in turn(run, slots) {
            let Some(&transport) = args.transport.get(slot) else {
                let land = match &args.expert_cache {
                    Some(d) => Land::File(d.join(scratch(&format!("{run}-raw")))),
                    None => Land::Memory,
                };
                landed.push(raw_tcp(bytes, Some(land)).await?);
                continue;
            };
            let dir = args
                .expert_cache
                .as_ref()
                .map(|d| d.join(scratch(&format!("{run}-{transport}"))));
            let cache = Arc::new(ExpertCache::create(dir.as_deref(), &config)?);
            let receiver = Arc::new(ExpertShard::new(&config, cache.weights())?.weightless());
            let peer = vec![expertmesh_expert_worker::transfer::source(
                transport, &address,
            )?];
            let started = Instant::now();
            bytes = fetch_every_expert(&receiver, &cache, &digests, &peer).await?;
            rates[slot].push(bytes as f64 / 1e6 / started.elapsed().as_secs_f64());
            if let Some(dir) = dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // Into a buffer it reuses: no new memory, so last.
        raw.push(raw_tcp(bytes, None).await?);
        eprintln!("run {}/{runs} done", run + 1);
    }
    let transports = args
        .transport
        .iter()
        .zip(rates)
        .map(|(t, r)| TransportReport {
            transport: t.to_string(),
            ratio: median_of(r.iter().zip(&raw).map(|(f, w)| f / w)),
            ratio_to_landed: median_of(r.iter().zip(&landed).map(|(f, w)| f / w)),
            fetch_mb_per_s: median_of(r),
        })
        .collect();
    Ok(Report {
        model: args.model.clone(),
        experts,
        bytes,
        raw_tcp_mb_per_s: median_of(raw),
        raw_tcp_landed_mb_per_s: median_of(landed),
        landed_in: if args.expert_cache.is_some() {
            "file"
        } else {
            "memory"
        },
        transports,
    })
}

/// A name of this run's own, for the caches and the landed baseline's file.
fn scratch(what: &str) -> String {
    format!("expertmesh-bench-transfer-{}-{what}", std::process::id())
}

/// Where the landed baseline keeps the bytes.
enum Land {
    /// New anonymous memory, as an in-memory cache.
    Memory,
    /// A new file at this path, as a cache file.
    File(std::path::PathBuf),
}

/// What the raw TCP reader keeps the bytes in (`Land`, opened).
enum Kept {
    Nowhere,
    Memory(Landing),
    File(std::fs::File),
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
/// discards them, or with `land`, copies each read to its offset in new memory or a new
/// file (what any receiver pays to keep the bytes, before a protocol or a check), and
/// answers one byte at the end.
async fn raw_tcp(bytes: u64, land: Option<Land>) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let kept = match &land {
            None => Kept::Nowhere,
            Some(Land::Memory) => Kept::Memory(Landing::new(bytes as usize)?),
            Some(Land::File(path)) => {
                Kept::File(std::fs::File::create_new(path).context("the landing file")?)
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the writer hung up");
            match &kept {
                Kept::Nowhere => {}
                Kept::File(file) => file.write_all_at(&buf[..n], got)?,
                Kept::Memory(memory) => {
                    // SAFETY: nothing reads this memory.
                    #[allow(unsafe_code)]
                    let fits = unsafe { memory.write(got as usize, &buf[..n]) };
                    anyhow::ensure!(fits, "more than was sent");
                }
            }
            got += n as u64;
        }
        if let Some(Land::File(path)) = &land {
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
