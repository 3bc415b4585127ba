//! `expertmesh bench dispatch`: one routed batch's round trip over loopback through each
//! socket transport — gRPC (the real `GrpcDispatch` client and `ExpertServer`), framed TCP to
//! the same port, framed over a Unix socket — next to the same bytes echoed over a plain
//! TCP socket and a Unix socket in the same run, the floors. The expert worker runs experts of width 1, so
//! the figure is transport, not compute. A counting proxy between client and server
//! measures the bytes on the wire per token.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_dispatch::{
    framed, Dispatch, DispatchBatch, FramedDispatch, GrpcDispatch, InProcessDispatch, WireDType,
};
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
    /// Transports measured, comma-separated: local (in-process, the same batcher: compute
    /// and batching without a socket), grpc, tcp (framed), unix (framed over a Unix socket).
    #[arg(long, value_delimiter = ',', default_value = "local,grpc,tcp,unix")]
    transports: Vec<String>,
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
    /// Bytes on the wire per token, both ways, per transport (counted by a proxy).
    wire_bytes_per_token: Vec<(String, f64)>,
    tcp_echo_p50_us: f64,
    tcp_echo_p99_us: f64,
    /// The same echo served by a thread of its own with blocking I/O (a peer outside the
    /// client's runtime, as a remote worker is).
    tcp_thread_echo_p50_us: f64,
    unix_echo_p50_us: f64,
    unix_echo_p99_us: f64,
    /// The expert worker's compute for the batch alone (p50), included in each transport's
    /// time.
    compute_p50_us: f64,
    transports: Vec<TransportPoint>,
}

#[derive(Serialize)]
struct TransportPoint {
    /// grpc, tcp (framed over TCP) or unix (framed over a Unix socket).
    name: &'static str,
    p50_us: f64,
    p99_us: f64,
    /// p50 ÷ the echo p50 of its socket kind (TCP, or Unix for `unix`).
    ratio_p50: f64,
    /// (p50 − compute p50) ÷ the echo p50: the transport's own cost against the floor.
    transport_ratio_p50: f64,
    /// (p50 − compute p50) ÷ the thread echo's p50 (TCP transports).
    transport_ratio_thread_p50: f64,
    /// (p50 − the in-process dispatch's p50) ÷ the echo p50: what the socket adds to the
    /// same batcher, compute and dtype rounding in this process.
    beyond_local_ratio_p50: Option<f64>,
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
        "interleaved rounds; x echo -c: (p50 - compute) / echo p50 of the same socket kind (TCP; \
         Unix for unix); x echo -local: (p50 - local p50) / echo p50; thr: the TCP echo served \
         by a thread of its own"
    );
    println!(
        "{:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>10} {:>9} {:>13} {:>9}",
        "tokens",
        "payload B/t",
        "wire B/t",
        "TCP echo",
        "thr echo",
        "Unix echo",
        "compute",
        "transport",
        "p50",
        "x echo -c",
        "x thr -c",
        "x echo -local",
        "p99"
    );
    for p in &report.points {
        for (i, t) in p.transports.iter().enumerate() {
            let wire = p
                .wire_bytes_per_token
                .iter()
                .find(|(n, _)| n == t.name)
                .map_or(String::from("-"), |(_, w)| format!("{w:.0}"));
            if i == 0 {
                print!(
                    "{:>7} {:>11} {:>9} {:>7.0}us {:>7.0}us {:>7.0}us {:>5.0}us",
                    p.tokens,
                    p.payload_bytes_per_token,
                    wire,
                    p.tcp_echo_p50_us,
                    p.tcp_thread_echo_p50_us,
                    p.unix_echo_p50_us,
                    p.compute_p50_us
                );
            } else {
                print!(
                    "{:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>7}",
                    "", "", wire, "", "", "", ""
                );
            }
            let beyond_local = t
                .beyond_local_ratio_p50
                .filter(|_| t.name != "local")
                .map_or(String::from("-"), |r| format!("{r:.2}"));
            println!(
                " {:>9} {:>7.0}us {:>10.2} {:>9.2} {:>13} {:>7.0}us",
                t.name,
                t.p50_us,
                t.transport_ratio_p50,
                t.transport_ratio_thread_p50,
                beyond_local,
                t.p99_us
            );
        }
    }
    Ok(())
}

/// Rounds not counted, at the start of each size.
const WARM_UP: usize = 10;

/// One round trip of `batch` through `d`.
async fn round_trip(d: &dyn Dispatch, batch: &DispatchBatch) -> Result<Duration> {
    let b = batch.clone();
    let t0 = Instant::now();
    d.dispatch(b).await.context("dispatch")?;
    Ok(t0.elapsed())
}

/// Bytes per token both ways through the counting proxy.
async fn wire_bytes(d: &dyn Dispatch, batch: &DispatchBatch, counted: &AtomicU64) -> Result<f64> {
    const COUNTED: usize = 10;
    d.dispatch(batch.clone()).await?;
    let before = counted.load(Ordering::Relaxed);
    for _ in 0..COUNTED {
        d.dispatch(batch.clone()).await?;
    }
    let rows = batch.rows().max(1);
    Ok((counted.load(Ordering::Relaxed) - before) as f64 / (COUNTED * rows) as f64)
}

/// A transport's name, its client, and a client of the same kind through the counting proxy.
type Client = (&'static str, Arc<dyn Dispatch>, Option<Arc<dyn Dispatch>>);

async fn measure(args: &DispatchArgs) -> Result<Report> {
    let h = args.hidden;
    let shard = shard(h, args.dtype)?;
    let compute_shard = shard.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    // The worker's port as an expert worker serves it: gRPC and framed TCP on one listener.
    let batcher = Batcher::spawn(shard, BatcherConfig::default());
    tokio::spawn(ExpertServer::new(batcher.clone(), Arc::default()).serve(listener));
    let socket = std::env::temp_dir().join(format!("expertmesh-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    tokio::spawn(framed::serve_unix(
        tokio::net::UnixListener::bind(&socket)?,
        Arc::new(batcher.clone()),
    ));
    let counted = Arc::new(AtomicU64::new(0));
    let proxy_addr = proxy(server_addr.to_string(), counted.clone()).await?;
    // Timed directly; the counting proxy's extra hop only serves the byte counts.
    let clients: [Client; 4] = [
        (
            "local",
            Arc::new(InProcessDispatch::new(Arc::new(batcher.clone()))),
            None,
        ),
        (
            "grpc",
            GrpcDispatch::new(server_addr.to_string()),
            Some(GrpcDispatch::new(proxy_addr.clone())),
        ),
        (
            "tcp",
            FramedDispatch::new(server_addr.to_string()),
            Some(FramedDispatch::new(proxy_addr)),
        ),
        (
            "unix",
            FramedDispatch::new(format!("unix:{}", socket.display())),
            None,
        ),
    ];
    let tcp_echo = TcpStream::connect(&tcp_echo_server().await?).await?;
    tcp_echo.set_nodelay(true)?;
    let thread_echo = TcpStream::connect(&tcp_echo_thread()?).await?;
    thread_echo.set_nodelay(true)?;
    let echo_socket = socket.with_extension("echo.sock");
    let mut rig = Rig {
        compute: compute_shard,
        clients,
        counted,
        tcp_echo,
        thread_echo,
        unix_echo: unix_echo_server(&echo_socket).await?,
    };
    let mut points = Vec::new();
    for &n in &args.tokens {
        points.push(rig.point(args, n).await?);
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&echo_socket);
    Ok(Report {
        hidden: h,
        dtype: args.dtype,
        iterations: args.iterations,
        points,
    })
}

/// What one size's measurement runs against: the shard computed directly, the transports'
/// clients, the proxy's byte counter and the two echo connections.
struct Rig {
    compute: Arc<ExpertShard>,
    clients: [Client; 4],
    counted: Arc<AtomicU64>,
    tcp_echo: TcpStream,
    thread_echo: TcpStream,
    unix_echo: tokio::net::UnixStream,
}

impl Rig {
    /// Batches of `n` tokens through each chosen transport.
    async fn point(&mut self, args: &DispatchArgs, n: usize) -> Result<Point> {
        let h = args.hidden;
        let batch = batch(n, h, args.dtype);
        // The echo carries the same bytes as the request and the reply, half each way.
        let per_token = args.dtype.row_bytes(h) + args.dtype.reply().row_bytes(h);
        let payload = n * per_token / 2;
        let chosen: Vec<&Client> = self
            .clients
            .iter()
            .filter(|(name, ..)| args.transports.iter().any(|t| t == name))
            .collect();
        // Interleaved rounds (compute, both echoes, each transport once per round), so that
        // the machine's drifts touch every figure alike; medians after the warm-up.
        let (mut compute, mut tcp, mut unix) = (Vec::new(), Vec::new(), Vec::new());
        let mut thread = Vec::new();
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); chosen.len()];
        let (sent, mut echoed) = (vec![7u8; payload], vec![0u8; payload]);
        for round in 0..WARM_UP + args.iterations {
            let t0 = Instant::now();
            let out = self
                .compute
                .compute(1, &batch.groups, &batch.activations, batch.dtype)?;
            let c = t0.elapsed();
            std::hint::black_box(out);
            let t = echo(&mut self.tcp_echo, &sent, &mut echoed).await?;
            let th = echo(&mut self.thread_echo, &sent, &mut echoed).await?;
            let u = echo(&mut self.unix_echo, &sent, &mut echoed).await?;
            let mut each = Vec::with_capacity(chosen.len());
            for (_, client, _) in &chosen {
                each.push(round_trip(client.as_ref(), &batch).await?);
            }
            if round >= WARM_UP {
                compute.push(c);
                tcp.push(t);
                thread.push(th);
                unix.push(u);
                for (all, one) in times.iter_mut().zip(each) {
                    all.push(one);
                }
            }
        }
        let (c50, _) = percentiles(&mut compute);
        let (t50, t99) = percentiles(&mut tcp);
        let (u50, u99) = percentiles(&mut unix);
        let (th50, _) = percentiles(&mut thread);
        let p50s: Vec<f64> = times.iter_mut().map(|t| percentiles(t).0).collect();
        let local_p50 = chosen
            .iter()
            .position(|(name, ..)| *name == "local")
            .map(|i| p50s[i]);
        let (mut transports, mut wire) = (Vec::new(), Vec::new());
        for ((name, _, counting), t) in chosen.iter().zip(times.iter_mut()) {
            let (p50, p99) = percentiles(t);
            if let Some(counting) = counting {
                let bytes = wire_bytes(counting.as_ref(), &batch, &self.counted).await?;
                wire.push((name.to_string(), bytes));
            }
            let floor = if *name == "unix" { u50 } else { t50 };
            transports.push(TransportPoint {
                name,
                p50_us: p50,
                p99_us: p99,
                ratio_p50: p50 / floor,
                transport_ratio_p50: (p50 - c50) / floor,
                transport_ratio_thread_p50: (p50 - c50) / if *name == "unix" { u50 } else { th50 },
                beyond_local_ratio_p50: local_p50.map(|l| (p50 - l) / floor),
            });
        }
        Ok(Point {
            tokens: n,
            payload_bytes_per_token: per_token,
            wire_bytes_per_token: wire,
            tcp_echo_p50_us: t50,
            tcp_echo_p99_us: t99,
            tcp_thread_echo_p50_us: th50,
            unix_echo_p50_us: u50,
            unix_echo_p99_us: u99,
            compute_p50_us: c50,
            transports,
        })
    }
}

/// One length-prefixed echo of `out` (the same number of bytes back into `back`).
async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    out: &[u8],
    back: &mut [u8],
) -> Result<Duration> {
    let t0 = Instant::now();
    s.write_all(&(out.len() as u64).to_le_bytes()).await?;
    s.write_all(out).await?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).await?;
    s.read_exact(back).await?;
    Ok(t0.elapsed())
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
        traces: Vec::new(),
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

/// Echoes length-prefixed messages over TCP.
async fn tcp_echo_server() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(echo_loop(s));
        }
    });
    Ok(addr)
}

/// Echoes length-prefixed messages over TCP from a thread of its own per connection, with
/// blocking reads and writes: a peer that does not share the client's runtime threads.
fn tcp_echo_thread() -> Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut len = [0u8; 8];
                while s.read_exact(&mut len).is_ok() {
                    // Bounded by what this benchmark sends (512 × 5120 × 4 bytes).
                    let n = (u64::from_le_bytes(len) as usize).min(64 << 20);
                    buf.resize(n, 0);
                    if s.read_exact(&mut buf).is_err()
                        || s.write_all(&len).is_err()
                        || s.write_all(&buf).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Echoes length-prefixed messages over a Unix socket at `path`; returns a connection to it.
async fn unix_echo_server(path: &std::path::Path) -> Result<tokio::net::UnixStream> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(echo_loop(s));
        }
    });
    Ok(tokio::net::UnixStream::connect(path).await?)
}

async fn echo_loop<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut s: S) {
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
}
