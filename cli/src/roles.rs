//! The role subcommands: `coordinator`, `expert-worker`, `attention-worker`, `front`. Each takes a
//! TOML config (`--config`, examples in `deploy/`) overridden by flags, validates it, prints
//! `LISTENING <address>` as its first line on stdout once bound, and runs until SIGINT or
//! SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_attention_worker::AttentionWorkerConfig;
use expertmesh_coordinator::{Coordinator, CoordinatorConfig};
use expertmesh_dispatch::{Transport, WireDType};
use expertmesh_expert_worker::{ExpertWorkerConfig, WorkerConfig};
use expertmesh_gateway::images::ImageConfig;
use expertmesh_gateway::{Cluster, GatewayConfig};
use expertmesh_model::ModelSource;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    listen: Option<String>,
    /// Model directory or `synthetic:bench`.
    #[arg(long)]
    model: Option<String>,
    /// Serve the OpenAI-compatible HTTP API here, in this process.
    #[arg(long)]
    http: Option<String>,
    /// Serve the coordinator's Prometheus text at /metrics on this address.
    #[arg(long)]
    metrics: Option<String>,
    #[command(flatten)]
    keys: ApiKeyArgs,
    /// Let the HTTP API fetch http:// image URLs (by default only data: URLs are taken).
    #[arg(long)]
    allow_image_urls: bool,
    /// A Jinja chat template for the HTTP API, instead of the model's.
    #[arg(long)]
    chat_template: Option<String>,
    /// This coordinator's raft id.
    #[arg(long)]
    id: Option<u64>,
    /// Take the raft id from the host name's ordinal plus one (`coordinator-0` is 1): a
    /// Kubernetes StatefulSet's pods, which share one command line.
    #[arg(long, conflicts_with = "id")]
    id_from_hostname: bool,
    /// The initial coordinators, `ID=HOST:PORT` comma-separated, this one included.
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Where the raft log, hard state and snapshots live.
    #[arg(long)]
    data_dir: Option<String>,
    /// Start empty and wait to be added to a running group (`admin add-coordinator`).
    #[arg(long)]
    join: bool,
    /// The token workers must present to register.
    #[command(flatten)]
    token: JoinTokenArgs,
    /// A worker silent this long (ms) is declared dead.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Copies of every expert, on distinct workers (a new cluster fixes it).
    #[arg(long)]
    min_replicas: Option<usize>,
    /// Extra copies for the hottest experts (a new cluster fixes it).
    #[arg(long)]
    redundancy: Option<usize>,
    /// Re-plan on its own when max worker load exceeds the mean by this many percent (0: never).
    #[arg(long)]
    rebalance_percent: Option<u32>,
}

/// The HTTP API's keys (flags, or the environment, which `ps` does not show).
#[derive(Args, Debug, Clone, Default)]
pub struct ApiKeyArgs {
    /// Require this API key on HTTP requests (repeatable; EXPERTMESH_API_KEYS takes a
    /// comma-separated list).
    #[arg(
        long = "api-key",
        env = "EXPERTMESH_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` comments), read again when it changes.
    #[arg(long)]
    pub api_key_file: Option<String>,
    /// The key `/metrics` on the API port requires when API keys are set.
    #[arg(long, env = "EXPERTMESH_METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,
}

impl ApiKeyArgs {
    fn apply(self, c: &mut CoordinatorConfig) {
        if !self.api_keys.is_empty() {
            c.api_keys = self.api_keys;
        }
        if self.api_key_file.is_some() {
            c.api_key_file = self.api_key_file;
        }
        if self.metrics_key.is_some() {
            c.metrics_key = self.metrics_key;
        }
    }

    /// The environment that gives a child process these keys (the file as a flag).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if !self.api_keys.is_empty() {
            env.push(("EXPERTMESH_API_KEYS", self.api_keys.join(",")));
        }
        if let Some(k) = &self.metrics_key {
            env.push(("EXPERTMESH_METRICS_KEY", k.clone()));
        }
        env
    }
}

/// The join token: workers present it, coordinators require it.
#[derive(Args, Debug)]
pub struct JoinTokenArgs {
    /// The join token (or set EXPERTMESH_JOIN_TOKEN, which `ps` does not show).
    #[arg(long, env = "EXPERTMESH_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token (`certs cluster` writes one; a mounted Secret).
    #[arg(
        long,
        env = "EXPERTMESH_JOIN_TOKEN_FILE",
        conflicts_with = "join_token"
    )]
    join_token_file: Option<PathBuf>,
}

impl JoinTokenArgs {
    /// The token given, read from its file if that is how it was given.
    fn token(self) -> Result<Option<String>> {
        let Some(path) = self.join_token_file else {
            return Ok(self.join_token);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the join token from {}", path.display()))?;
        Ok(Some(text.trim().to_owned()))
    }
}

/// What every worker role takes.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to compute: cpu, or cuda[:N] (a build with `--features cuda`).
    #[arg(long)]
    device: Option<expertmesh_model::Device>,
    /// How products over the bf16 weights compute: f32 (the reference's numbers) or bf16
    /// (activations rounded to bf16, as llama.cpp does: tensor cores on a GPU, VDPBF16PS on
    /// a CPU with AVX512-BF16; on the CPU, the dense products only).
    #[arg(long)]
    gemm: Option<expertmesh_model::GemmPrecision>,
    /// Coordinator addresses, comma-separated.
    #[arg(long, alias = "coordinators", alias = "join")]
    coordinator: Option<String>,
    /// The token the coordinators require.
    #[command(flatten)]
    token: JoinTokenArgs,
    #[arg(long)]
    listen: Option<String>,
    /// The address other machines dial to reach this worker (its `listen` address by
    /// default: give the host's name when listening on 0.0.0.0).
    #[arg(long, env = "EXPERTMESH_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// Serve Prometheus text at /metrics on this address.
    #[arg(long)]
    metrics: Option<String>,
}

impl WorkerArgs {
    /// Overrides the shared `[worker]` section with the flags given.
    fn apply(self, c: &mut WorkerConfig) -> Result<()> {
        if let Some(v) = self.coordinator {
            c.coordinator = v;
        }
        if let Some(token) = self.token.token()? {
            c.join_token = Some(token);
        }
        if self.advertise.is_some() {
            c.advertise = self.advertise;
        }
        if let Some(v) = self.device {
            c.device = v;
        }
        if let Some(v) = self.gemm {
            c.gemm = v;
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.model {
            c.model = v;
        }
        if self.metrics.is_some() {
            c.metrics = self.metrics;
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct ExpertWorkerArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Experts per MoE layer this worker may hold.
    #[arg(long)]
    capacity: Option<usize>,
    /// Memory for expert weights (MiB): caps the experts per layer at what fits, at the
    /// checkpoint's dtype (an FP8 expert counts half a bf16 one).
    #[arg(long)]
    expert_memory_mib: Option<u64>,
    /// Batching window in µs.
    #[arg(long)]
    batch_window_us: Option<u64>,
    /// Send experts to peers that fetch them at most this fast (megabits per second).
    #[arg(long)]
    migration_mbps: Option<u64>,
    /// Keep experts fetched from peers in a file in this directory, when the model directory
    /// holds no weights (its name is removed once it is mapped: nothing is left after the
    /// worker); without it they land in memory.
    #[arg(long)]
    expert_cache: Option<String>,
    /// How experts are fetched from peers when the model directory holds no weights: `tcp`
    /// (framed, on the peers' port; the default) or `grpc` (`FetchExperts`).
    #[arg(long)]
    transfer: Option<Transport>,
    /// Keep this many experts in host memory as backups, not served: the coordinators spread
    /// them so that every expert has one off its primary workers, and a failure's
    /// re-placement takes lost copies from them first.
    #[arg(long)]
    expert_backup: Option<usize>,
}

#[derive(Args, Debug)]
pub struct AttentionWorkerArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Activation dtype on the wire: f32 (exact), bf16 (rounded) or fp8 (exact for FP8 experts).
    #[arg(long)]
    wire_dtype: Option<WireDType>,
    /// Time budget of one routed batch, in ms.
    #[arg(long)]
    dispatch_timeout_ms: Option<u64>,
    /// How routed batches travel: tcp (the default; to expert workers as framed messages over
    /// plain TCP), grpc (to the same workers over gRPC streams), local (every expert in this
    /// process, no sockets: a single-node deployment), nccl (GPU ranks).
    #[arg(long)]
    dispatch: Option<Transport>,
    /// Recompute every prompt from its start: no KV blocks kept for later requests that
    /// begin the same way (prefix caching is on by default).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Send the dense weights to attention workers that fetch them at most this fast
    /// (megabits per second).
    #[arg(long)]
    migration_mbps: Option<u64>,
}

fn load<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    match path {
        None => Ok(T::default()),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
    }
}

/// `expertmesh front`: the API's front door over several gateways (what `up` runs on its
/// public port), for deployments that want one URL without a load balancer.
#[derive(Args, Debug)]
pub struct FrontArgs {
    /// Where the front door listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// The gateways behind it (each coordinator's `--http`), `HOST:PORT` comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    gateways: Vec<String>,
    /// Largest request body taken, in bytes.
    #[arg(long, default_value_t = GatewayConfig::default().body_max_bytes)]
    body_max_bytes: usize,
}

pub fn front(args: FrontArgs) -> Result<()> {
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        announce(listener.local_addr()?);
        expertmesh_gateway::front::serve(
            listener,
            args.gateways,
            args.body_max_bytes,
            shutdown_signal(),
        )
        .await
        .context("serving the front door")
    })
}

fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    // The parent process (`up`) reads this line to learn the port.
    let _ = writeln!(out, "LISTENING {addr}");
    let _ = out.flush();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

impl CoordinatorArgs {
    /// Overrides the config file's settings with the flags given.
    fn apply(mut self, c: &mut CoordinatorConfig) -> Result<()> {
        if self.id_from_hostname {
            self.id = Some(id_from_hostname(&hostname()?)?);
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.model {
            c.model = v;
        }
        if self.metrics.is_some() {
            c.metrics = self.metrics;
        }
        if self.http.is_some() {
            c.http = self.http;
        }
        self.keys.apply(c);
        c.allow_image_urls |= self.allow_image_urls;
        if self.chat_template.is_some() {
            c.chat_template = self.chat_template;
        }
        if let Some(v) = self.id {
            c.id = v;
            if self.data_dir.is_none() && c.data_dir == CoordinatorConfig::default().data_dir {
                c.data_dir = format!("expertmesh-data/coordinator-{v}");
            }
        }
        if let Some(v) = self.peers {
            c.peers = v;
        }
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        c.join |= self.join;
        if let Some(token) = self.token.token()? {
            c.join_token = Some(token);
        }
        if let Some(v) = self.lease_ms {
            c.lease_ms = v;
        }
        if let Some(v) = self.min_replicas {
            c.min_replicas = v;
        }
        if let Some(v) = self.redundancy {
            c.redundancy = v;
        }
        if let Some(v) = self.rebalance_percent {
            c.rebalance_percent = v;
        }
        Ok(())
    }
}

/// This machine's host name (`HOSTNAME`, or the kernel's).
fn hostname() -> Result<String> {
    if let Ok(h) = std::env::var("HOSTNAME") {
        return Ok(h);
    }
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name")?
        .trim()
        .to_owned())
}

/// The raft id of a StatefulSet pod: its name's ordinal (after the last `-`) plus one.
fn id_from_hostname(host: &str) -> Result<u64> {
    let ordinal = host.rsplit_once('-').map_or(host, |(_, n)| n);
    match ordinal.parse::<u64>() {
        Ok(n) if n < u64::MAX => Ok(n + 1),
        _ => bail!("--id-from-hostname: {host:?} does not end in -N"),
    }
}

/// Set by `--insecure`: serve cluster ports without TLS on addresses other machines reach.
pub static INSECURE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `listen` (`host:port`) is reachable from this machine only.
fn loopback_only(listen: &str) -> bool {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(h, _)| h)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The production profile: a cluster port (gRPC, raft, dispatch) on an address other
/// machines reach is served with mutual TLS (`--tls-dir`), or, with `--insecure`, in the
/// clear after a loud warning; otherwise the role does not start.
fn check_exposure(role: &str, listen: &str) -> Result<()> {
    if loopback_only(listen) || expertmesh_proto::tls::enabled() {
        return Ok(());
    }
    if INSECURE.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "INSECURE: {role} serves {listen} without TLS: anyone who reaches this port can \
             send raft messages, register workers and dispatch batches. Use --tls-dir."
        );
        return Ok(());
    }
    bail!(
        "{role} would listen on {listen}, reachable from other machines, without TLS: give \
         --tls-dir (certificates from `expertmesh certs`), listen on a loopback address, or \
         pass --insecure to serve it in the clear"
    )
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let mut config: CoordinatorConfig = load(args.config.as_deref())?;
    args.apply(&mut config)?;
    check_exposure("the coordinator", &config.listen)?;
    let source: ModelSource = config.model.parse()?;
    let model = source
        .config()
        .with_context(|| format!("reading the model at {source}"))?;
    let node = config.node(source.fingerprint()?, model.num_local_experts)?;
    runtime()?.block_on(async {
        // Bind first: a taken port fails before the raft storage is touched.
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        // The metrics port too: a taken one stops the coordinator before it announces.
        let metrics_listener = match &config.metrics {
            Some(address) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("listening on {address}"))?,
            ),
            None => None,
        };
        let (coordinator, raft_loop) = Coordinator::start(node)
            .with_context(|| format!("opening the raft storage in {}", config.data_dir))?;
        announce(listener.local_addr()?);
        if let Some(metrics_listener) = metrics_listener {
            let metered = coordinator.clone();
            tokio::spawn(expertmesh_proto::metrics::serve_metrics(
                metrics_listener,
                Arc::new(move || expertmesh_coordinator::metrics::render(&metered)),
                shutdown_signal(),
            ));
        }
        if let Some(http) = &config.http {
            let http_listener = tokio::net::TcpListener::bind(http)
                .await
                .with_context(|| format!("listening on {http}"))?;
            {
                // `up` reads this second line to learn the HTTP address.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "HTTP {}", http_listener.local_addr()?);
                let _ = out.flush();
            }
            let gateway = GatewayConfig {
                http: http.clone(),
                model: config.model.clone(),
                api_keys: config.api_keys.clone(),
                api_key_file: config.api_key_file.clone(),
                metrics_key: config.metrics_key.clone(),
                images: ImageConfig {
                    allow_image_urls: config.allow_image_urls,
                    ..ImageConfig::default()
                },
                chat_template: config.chat_template.clone(),
                ..GatewayConfig::default()
            };
            let cluster: Arc<dyn Cluster> = Arc::new(coordinator.clone());
            tokio::spawn(async move {
                let served =
                    expertmesh_gateway::serve(gateway, cluster, http_listener, shutdown_signal());
                if let Err(e) = served.await {
                    tracing::error!("gateway: {e}");
                }
            });
        }
        tracing::info!(
            "coordinator {}: model {source} ({} experts), raft storage in {}",
            config.id,
            model.num_local_experts,
            config.data_dir
        );
        tokio::select! {
            served = expertmesh_coordinator::serve(coordinator, listener, shutdown_signal()) => {
                served?;
                Ok(())
            }
            failed = raft_loop => match failed {
                Ok(e) => Err(anyhow::Error::new(e).context("the raft loop stopped")),
                Err(e) => Err(anyhow::Error::new(e).context("the raft loop panicked")),
            },
        }
    })
}

pub fn expert_worker(args: ExpertWorkerArgs) -> Result<()> {
    let mut config: ExpertWorkerConfig = load(args.worker.config.as_deref())?;
    let c = &mut config;
    args.worker.apply(&mut c.worker)?;
    if args.capacity.is_some() {
        config.capacity = args.capacity;
    }
    if args.expert_memory_mib.is_some() {
        config.expert_memory_mib = args.expert_memory_mib;
    }
    if let Some(v) = args.batch_window_us {
        config.batcher.window_us = v;
    }
    if let Some(v) = args.migration_mbps {
        config.migration_mbps = v;
    }
    if args.expert_cache.is_some() {
        config.expert_cache = args.expert_cache;
    }
    if let Some(t) = args.transfer {
        config.transfer = t;
    }
    if let Some(n) = args.expert_backup {
        config.expert_backup = n;
    }
    check_exposure("the expert worker", &config.worker.listen)?;
    let config = config.validate()?;
    runtime()?.block_on(async {
        expertmesh_expert_worker::run(config, announce, shutdown_signal()).await?;
        Ok(())
    })
}

pub fn attention_worker(args: AttentionWorkerArgs) -> Result<()> {
    let mut config: AttentionWorkerConfig = load(args.worker.config.as_deref())?;
    let c = &mut config;
    args.worker.apply(&mut c.worker)?;
    if let Some(v) = args.wire_dtype {
        config.dispatch.wire_dtype = v;
    }
    if let Some(v) = args.dispatch_timeout_ms {
        config.dispatch.timeout_ms = v;
    }
    if let Some(v) = args.dispatch {
        config.dispatch.transport = v;
    }
    config.scheduler.prefix_cache &= !args.no_prefix_cache;
    if let Some(v) = args.migration_mbps {
        config.migration_mbps = v;
    }
    check_exposure("the attention worker", &config.worker.listen)?;
    let config = config.validate()?;
    runtime()?.block_on(async {
        expertmesh_attention_worker::run(config, announce, shutdown_signal()).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_addresses_are_told_apart() {
        for a in [
            "127.0.0.1:7000",
            "127.0.0.5:0",
            "localhost:80",
            "[::1]:7000",
        ] {
            assert!(super::loopback_only(a), "{a}");
        }
        for a in ["0.0.0.0:7000", "[::]:7000", "10.0.0.2:7000", "node1:7000"] {
            assert!(!super::loopback_only(a), "{a}");
        }
    }

    #[test]
    fn a_statefulset_pod_name_gives_the_raft_id() {
        assert_eq!(
            super::id_from_hostname("expertmesh-coordinator-0").unwrap(),
            1
        );
        assert_eq!(super::id_from_hostname("coordinator-12").unwrap(), 13);
        for bad in ["coordinator", "coordinator-x", "", "c-18446744073709551615"] {
            assert!(super::id_from_hostname(bad).is_err(), "{bad}");
        }
    }
}
