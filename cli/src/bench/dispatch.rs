//! `expertmesh bench dispatch`: one routed batch's round trip over loopback gRPC (the real
//! `GrpcDispatch` client and `ExpertServer`), next to the same bytes echoed over a plain
//! TCP socket in the same run, the floor. The expert worker runs experts of width 1, so
//! the figure is transport, not compute. A counting proxy between client and server
//! measures the bytes on the wire per token.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_dispatch::{Dispatch, DispatchBatch, GrpcDispatch, WireDType};
use expertmesh_expert_worker::{Assignment, Batcher, BatcherConfig, ExpertServer, ExpertShard};
use expertmesh_model::moe::ExpertGroup;
use expertmesh_model::synthetic::SyntheticSpec;
use expertmesh_model::{InMemoryWeights, Tensor};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args, Debug)]
pub struct DispatchArgs {
    /// Hidden size of the activations (Maverick: 5120).
    #[arg(long, default_value_t = 5120)]
    hidden: usize,
    /// Tokens per batch, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    tokens: Vec<usize>,
    /// Activation dtype on the wire.
    #[arg(long, default_value = "bf16")]
    dtype: WireDType,
    /// Round trips measured per size.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Point {
    tokens: usize,
    payload_bytes_per_token: usize,
    wire_bytes_per_token: f64,
    grpc_p50_us: f64,
    grpc_p99_us: f64,
    tcp_echo_p50_us: f64,
    tcp_echo_p99_us: f64,
    /// gRPC p50 ÷ TCP echo p50.
    ratio_p50: f64,
    /// The expert worker's compute for the batch alone (p50), included in the gRPC time.
    compute_p50_us: f64,
    /// (gRPC p50 − compute p50) ÷ TCP echo p50: the transport's own cost against the floor.
    transport_ratio_p50: f64,
}

#[derive(Serialize)]
struct Report {
    hidden: usize,
    dtype: WireDType,
    iterations: usize,
    points: Vec<Point>,
}

const EXPERTS: usize = 8;

pub fn run(args: DispatchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "dispatch round trip over loopback, hidden {}, {:?} on the wire, {} iterations (medians)",
        report.hidden, report.dtype, report.iterations
    );
    println!(
        "{:>7} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>8}",
        "tokens",
        "payload B/t",
        "wire B/t",
        "gRPC p50",
        "gRPC p99",
        "TCP p50",
        "TCP p99",
        "x TCP",
        "compute",
        "x TCP -c"
    );
    for p in &report.points {
        println!(
            "{:>7} {:>12} {:>10.0} {:>8.0}us {:>8.0}us {:>8.0}us {:>8.0}us {:>8.2} {:>8.0}us {:>8.2}",
            p.tokens,
            p.payload_bytes_per_token,
            p.wire_bytes_per_token,
            p.grpc_p50_us,
            p.grpc_p99_us,
            p.tcp_echo_p50_us,
            p.tcp_echo_p99_us,
            p.ratio_p50,
            p.compute_p50_us,
            p.transport_ratio_p50
        );
    }
    Ok(())
}

async fn measure(args: &DispatchArgs) -> Result<Report> {
    let h = args.hidden;
    let shard = shard(h, args.dtype)?;
    let compute_shard = shard.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let server = ExpertServer::new(
        Batcher::spawn(shard, BatcherConfig::default()),
        Arc::default(),
    );
    tokio::spawn(
        expertmesh_proto::server_builder()
            .add_service(server.into_service())
            .serve_with_incoming(expertmesh_proto::incoming(listener)),
    );
    let counted = Arc::new(AtomicU64::new(0));
    let proxy_addr = proxy(server_addr.to_string(), counted.clone()).await?;
    let echo_addr = echo_server().await?;
    // Timed directly; the counting proxy's extra hop only serves the byte count.
    let client = GrpcDispatch::new(server_addr.to_string());
    let counting_client = GrpcDispatch::new(proxy_addr);
    let mut echo = TcpStream::connect(&echo_addr).await?;
    echo.set_nodelay(true)?;

    let mut points = Vec::new();
    for &n in &args.tokens {
        let batch = batch(n, h, args.dtype);
        for _ in 0..10 {
            client
                .dispatch(batch.clone())
                .await
                .context("warm-up dispatch")?;
        }
        let mut grpc = Vec::with_capacity(args.iterations);
        for _ in 0..args.iterations {
            let t0 = Instant::now();
            client.dispatch(batch.clone()).await?;
            grpc.push(t0.elapsed());
        }
        const COUNTED: usize = 10;
        counting_client.dispatch(batch.clone()).await?;
        let before = counted.load(Ordering::Relaxed);
        for _ in 0..COUNTED {
            counting_client.dispatch(batch.clone()).await?;
        }
        let wire = (counted.load(Ordering::Relaxed) - before) as f64 / (COUNTED * n) as f64;
        let mut compute: Vec<Duration> = (0..20)
            .map(|_| {
                let t0 = Instant::now();
                let out =
                    compute_shard.compute(1, &batch.groups, &batch.activations, batch.dtype)?;
                std::hint::black_box(out);
                Ok(t0.elapsed())
            })
            .collect::<Result<_, expertmesh_dispatch::DispatchError>>()?;
        let (c50, _) = percentiles(&mut compute);
        // The echo carries the same bytes as the request and the reply, half each way.
        let per_token = args.dtype.row_bytes(h) + args.dtype.reply().row_bytes(h);
        let payload = n * per_token / 2;
        let mut tcp = Vec::with_capacity(args.iterations);
        let buf = vec![7u8; payload];
        let mut back = vec![0u8; payload];
        for i in 0..args.iterations + 10 {
            let t0 = Instant::now();
            echo.write_all(&(payload as u64).to_le_bytes()).await?;
            echo.write_all(&buf).await?;
            let mut len = [0u8; 8];
            echo.read_exact(&mut len).await?;
            echo.read_exact(&mut back).await?;
            if i >= 10 {
                tcp.push(t0.elapsed());
            }
        }
        let (g50, g99) = percentiles(&mut grpc);
        let (t50, t99) = percentiles(&mut tcp);
        points.push(Point {
            tokens: n,
            payload_bytes_per_token: per_token,
            wire_bytes_per_token: wire,
            grpc_p50_us: g50,
            grpc_p99_us: g99,
            tcp_echo_p50_us: t50,
            tcp_echo_p99_us: t99,
            ratio_p50: g50 / t50,
            compute_p50_us: c50,
            transport_ratio_p50: (g50 - c50) / t50,
        });
    }
    Ok(Report {
        hidden: h,
        dtype: args.dtype,
        iterations: args.iterations,
        points,
    })
}

/// A shard of `EXPERTS` tiny experts (inter 1) of hidden size `h`, every one owned under
/// epoch 1: the computation is negligible next to the transport. FP8 experts for an fp8
/// wire (the only experts that take it).
fn shard(h: usize, dtype: WireDType) -> Result<Arc<ExpertShard>> {
    let spec = SyntheticSpec {
        hidden: h,
        layers: 2,
        heads: 1,
        kv_heads: 1,
        head_dim: 2,
        experts: EXPERTS,
        expert_inter: 1,
        dense_inter: 1,
        vocab: 8,
        chunk: 8192,
        moe_step: 2,
        seed: 0,
    };
    let config = spec.config()?;
    let mut weights = InMemoryWeights::default();
    let p = "model.layers.1.feed_forward.experts";
    weights.insert(
        format!("{p}.gate_up_proj"),
        Tensor::bf16_from_f32(vec![EXPERTS, h, 2], &vec![0.01; EXPERTS * h * 2]),
    );
    weights.insert(
        format!("{p}.down_proj"),
        Tensor::bf16_from_f32(vec![EXPERTS, 1, h], &vec![0.01; EXPERTS * h]),
    );
    let config = match dtype {
        WireDType::Fp8 => expertmesh_model::synthetic::to_fp8(&config, &mut weights)?,
        _ => config,
    };
    let shard = Arc::new(ExpertShard::new(&config, &weights)?);
    shard.assign(Assignment {
        epoch: 1,
        experts: (0..EXPERTS as u32).collect::<BTreeSet<_>>(),
    });
    Ok(shard)
}

/// `n` rows spread over the experts.
fn batch(n: usize, h: usize, dtype: WireDType) -> DispatchBatch {
    let groups: Vec<ExpertGroup> = (0..EXPERTS)
        .map(|e| ExpertGroup {
            expert: e as u32,
            rows: (n / EXPERTS + usize::from(e < n % EXPERTS)) as u32,
        })
        .filter(|g| g.rows > 0)
        .collect();
    DispatchBatch {
        epoch: 1,
        layer: 1,
        batch_id: 0,
        timeout: Duration::from_secs(10),
        groups,
        hidden: h,
        dtype,
        activations: (0..n * h).map(|i| (i % 97) as f32 / 97.0).collect(),
    }
}

fn percentiles(times: &mut [Duration]) -> (f64, f64) {
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

/// A TCP proxy to `target` that counts the bytes it forwards in both directions.
async fn proxy(target: String, counted: Arc<AtomicU64>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                continue;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, counted.clone()));
            tokio::spawn(pump(ro, wi, counted.clone()));
        }
    });
    Ok(addr)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counted: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 256 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counted.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Echoes length-prefixed messages.
async fn echo_server() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut len = [0u8; 8];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    // Bounded by what this benchmark sends (512 × 5120 × 4 bytes).
                    let n = (u64::from_le_bytes(len) as usize).min(64 << 20);
                    buf.resize(n, 0);
                    if s.read_exact(&mut buf).await.is_err()
                        || s.write_all(&len).await.is_err()
                        || s.write_all(&buf).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}
