//! `expertmesh up`: a whole cluster on this machine — coordinators (a raft group), expert
//! workers and attention workers as separate processes on loopback — until Ctrl-C. It
//! writes the coordinators' addresses where `expertmesh admin` finds them. When a child
//! dies, `up` says so and keeps the others running.
//!
//! The API's address (`--http`) is `up`'s own: a front door (`expertmesh_gateway::front`)
//! over every coordinator's gateway, so the printed URL serves while any coordinator lives,
//! and a stream whose gateway dies is resumed on another.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::cluster::{ClusterSpec, LocalCluster};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Model directory or `synthetic:bench`.
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    model: String,
    /// Coordinator replicas: 1, 3 or 5.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// Keep the coordinators' raft storage here (a temporary directory otherwise).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 2)]
    expert_workers: usize,
    #[arg(long, default_value_t = 1)]
    attention_workers: usize,
    /// Where the OpenAI-compatible HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http: String,
    #[command(flatten)]
    keys: crate::roles::ApiKeyArgs,
    /// Let the HTTP API fetch http:// image URLs (by default only data: URLs are taken).
    #[arg(long)]
    allow_image_urls: bool,
    /// A Jinja chat template for the HTTP API, instead of the model's (vLLM's
    /// `--chat-template`).
    #[arg(long)]
    chat_template: Option<String>,
    /// Copies of every expert, on distinct expert workers.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Extra copies for the hottest experts, over the whole cluster.
    #[arg(long, default_value_t = 0)]
    redundancy: usize,
    /// A worker silent this long (ms) is declared dead and its experts re-placed.
    #[arg(long, default_value_t = 5000)]
    lease_ms: u64,
    /// Where the workers compute: cpu, or cuda[:N] (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: expertmesh_model::Device,
    /// How products over the bf16 weights compute: f32 (the reference's numbers) or bf16
    /// (activations rounded to bf16, as llama.cpp does: tensor cores on a GPU, VDPBF16PS on
    /// a CPU with AVX512-BF16; on the CPU, the dense products only).
    #[arg(long, default_value = "f32")]
    gemm: expertmesh_model::GemmPrecision,
    /// How the attention workers reach the routed experts: tcp (the expert workers, framed
    /// messages over plain TCP), grpc (the same workers over gRPC streams) or local (every
    /// expert in each attention worker; `--expert-workers 0` then runs none).
    #[arg(long, default_value = "tcp")]
    dispatch: expertmesh_dispatch::Transport,
    /// Routed rows on the wire: f32 (exact), bf16 (half the bytes, rounded) or fp8 (FP8
    /// experts' rows as e4m3 with a scale per row, exact; f32 for other experts).
    #[arg(long, default_value = "f32")]
    wire_dtype: expertmesh_dispatch::WireDType,
    /// Recompute every prompt from its start (no prefix caching on the attention workers).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Mutual TLS between every process: a CA and a certificate per role are made in the
    /// data directory; the up file's `tls_dir` holds the admin's (what `admin` uses).
    #[arg(long)]
    tls: bool,
}

/// Runs `up`; `tls_root` holds certificates to use (`--tls-root`), which implies TLS.
pub fn run(args: UpArgs, tls_root: Option<std::path::PathBuf>) -> Result<()> {
    let local = args.dispatch == expertmesh_dispatch::Transport::Local;
    if args.attention_workers == 0 || (args.expert_workers == 0 && !local) {
        anyhow::bail!(
            "a cluster needs at least one attention worker, and one expert worker unless \
             --dispatch local"
        );
    }
    if ![1, 3, 5].contains(&args.coordinators) {
        anyhow::bail!("--coordinators must be 1, 3 or 5 (a raft group of an odd size)");
    }
    args.device.check()?;
    let runtime = tokio::runtime::Runtime::new()?;
    // The public port first: a port in use fails before any process starts.
    let front = runtime
        .block_on(tokio::net::TcpListener::bind(&args.http))
        .with_context(|| format!("listening on {}", args.http))?;
    let api = front.local_addr()?;
    let mut spec = spec(&args);
    spec.tls |= tls_root.is_some();
    spec.tls_root = tls_root;
    let mut cluster = LocalCluster::start(&spec)?;
    let view = runtime.block_on(cluster.ready(Duration::from_secs(120)))?;
    println!(
        "expertmesh cluster up: model {}, placement epoch {}",
        args.model, view.placement.epoch
    );
    runtime.spawn(expertmesh_gateway::front::serve(
        front,
        cluster.http.clone(),
        expertmesh_gateway::GatewayConfig::default().body_max_bytes,
        std::future::pending(),
    ));
    let up_file = crate::admin::write_up_file(&cluster, &api.to_string())?;
    print_cluster(&args, &cluster, &view, api, &up_file);
    runtime.block_on(supervise(&mut cluster));
    tracing::info!("stopping the cluster");
    drop(cluster);
    let _ = std::fs::remove_file(&up_file);
    Ok(())
}

/// The cluster `args` asks for; the coordinators' gateways on free ports (the public one is
/// the front door's).
fn spec(args: &UpArgs) -> ClusterSpec {
    ClusterSpec {
        model: args.model.clone(),
        coordinators: args.coordinators,
        data_dir: args.data_dir.clone(),
        expert_capacities: vec![None; args.expert_workers],
        attention_workers: args.attention_workers,
        attention_args: vec![
            "--dispatch".into(),
            args.dispatch.to_string(),
            "--wire-dtype".into(),
            args.wire_dtype.to_string(),
        ]
        .into_iter()
        .chain(
            args.no_prefix_cache
                .then(|| "--no-prefix-cache".to_string()),
        )
        .collect(),
        http: Some("127.0.0.1:0".into()),
        keys: args.keys.clone(),
        coordinator_args: [
            "--min-replicas".into(),
            args.replicas.to_string(),
            "--redundancy".into(),
            args.redundancy.to_string(),
            "--lease-ms".into(),
            args.lease_ms.to_string(),
        ]
        .into_iter()
        .chain(
            args.allow_image_urls
                .then(|| "--allow-image-urls".to_string()),
        )
        .chain(
            args.chat_template
                .iter()
                .flat_map(|t| ["--chat-template".to_string(), t.clone()]),
        )
        .collect(),
        device: args.device,
        gemm: args.gemm,
        metrics: true,
        tls: args.tls,
        tls_root: None,
    }
}

/// Where each process listens, the API's URL and commands to try.
fn print_cluster(
    args: &UpArgs,
    cluster: &LocalCluster,
    view: &expertmesh_coordinator::ClusterView,
    api: std::net::SocketAddr,
    up_file: &std::path::Path,
) {
    let metrics = |pid: u32| {
        cluster
            .metrics
            .get(&pid)
            .map_or(String::new(), |m| format!(", metrics http://{m}/metrics"))
    };
    for (i, c) in cluster.coordinators.iter().enumerate() {
        let http = match cluster.http.get(i) {
            Some(h) => format!(", gateway {h}"),
            None => String::new(),
        };
        let pid = c.child.id();
        println!(
            "  {:<30} {} (pid {pid}{http}{})",
            format!("coordinator {}", i + 1),
            c.address,
            metrics(pid)
        );
    }
    for m in &view.members {
        let experts = view.placement.experts_of(m.id).len();
        let role = match m.role {
            expertmesh_coordinator::Role::ExpertWorker => {
                format!("expert worker {} ({experts} experts)", m.id)
            }
            expertmesh_coordinator::Role::AttentionWorker => format!("attention worker {}", m.id),
        };
        println!(
            "  {role:<30} {} (pid {}{})",
            m.address,
            m.pid,
            metrics(m.pid)
        );
    }
    println!(
        "  OpenAI-compatible API      http://{api}/v1 (in front of {} gateway{})",
        cluster.http.len(),
        if cluster.http.len() == 1 { "" } else { "s" }
    );
    println!(
        "try: curl http://{api}/v1/chat/completions -H 'Content-Type: application/json' \\\n       -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is a lantern?\"}}], \"temperature\": 0}}'"
    );
    if let Some(a) = cluster.attention_workers.first() {
        let tls = cluster
            .tls_dir
            .as_ref()
            .map_or(String::new(), |d| format!(" --tls-dir {}", d.display()));
        println!(
            " or: expertmesh generate --model {} --attention-worker {}{tls} --chat --prompt \"What is a lantern?\"",
            args.model, a.address
        );
    }
    println!(
        " or: expertmesh admin status   (reads {})",
        up_file.display()
    );
    println!("Ctrl-C stops everything.");
}

/// Until Ctrl-C: says when a child exits, and keeps the others running.
async fn supervise(cluster: &mut LocalCluster) {
    let mut exited = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = crate::roles::shutdown_signal() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for p in cluster.processes_mut() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        if exited.insert(p.child.id()) {
                            tracing::warn!("{} at {} exited ({status}); the others keep running", p.role, p.address);
                        }
                    }
                }
            }
        }
    }
}
