//! `expertmesh`: the command line. It parses arguments, loads and validates what they
//! name, and calls into the libraries; nothing else lives here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod bench;
mod certs;
mod checkpoint_dir;
mod cluster;
mod generate;
mod health;
mod loadgen;
mod logging;
mod placement_sim;
mod quantize;
mod roles;
mod up;

/// The model `up`, `generate` and `loadgen` serve when given none: the trained demo model
/// (`tools/train_demo_model.py`), relative to the repository root where the README's
/// commands run.
pub const DEFAULT_MODEL: &str = "models/expertmesh-demo";

#[derive(Parser)]
#[command(
    name = "expertmesh",
    version,
    about = "Serve Llama 4 with experts spread over machines"
)]
struct Cli {
    /// Log lines as text or as one JSON object per line (filtered by RUST_LOG; `up` passes
    /// it to every process it starts).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    /// Mutual TLS with the certificates in this directory (ca.pem, node.pem, node.key:
    /// `expertmesh certs issue`): every port served over TLS only, every peer's certificate
    /// checked. Also EXPERTMESH_TLS_DIR. (`up` ignores it: its cluster's certificates are
    /// made by `--tls` or taken from `--tls-root`.)
    #[arg(long, global = true, value_name = "DIR", env = "EXPERTMESH_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// A directory of certificate directories, one per role (coordinator, expert-worker,
    /// attention-worker, admin: what `up --tls` makes): this process takes its role's
    /// (`--tls-dir` wins). `up` given one uses those certificates instead of making new
    /// ones (and turns TLS on). Also EXPERTMESH_TLS_ROOT.
    #[arg(long, global = true, value_name = "DIR", env = "EXPERTMESH_TLS_ROOT")]
    tls_root: Option<std::path::PathBuf>,
    /// Serve cluster ports without TLS even on addresses other machines reach (a role
    /// refuses to otherwise). Also EXPERTMESH_INSECURE=1.
    #[arg(long, global = true, env = "EXPERTMESH_INSECURE")]
    insecure: bool,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when
    /// not given. `up` passes it to every process it starts.
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with the single-process engine.
    Generate(generate::GenerateArgs),
    /// Write an FP8 copy of a bf16 checkpoint (its routed experts; compressed-tensors layout).
    Quantize(quantize::QuantizeArgs),
    /// Start a whole cluster on this machine (coordinator, expert and attention workers).
    Up(up::UpArgs),
    /// Run the coordinator.
    Coordinator(roles::CoordinatorArgs),
    /// Run an expert worker.
    ExpertWorker(roles::ExpertWorkerArgs),
    /// Run an attention worker.
    AttentionWorker(roles::AttentionWorkerArgs),
    /// Run the API's front door over several gateways (streams resumed across them).
    Front(roles::FrontArgs),
    /// Inspect and change a running cluster.
    Admin {
        #[command(subcommand)]
        which: admin::AdminCommand,
    },
    /// Run the placement planner on synthetic skewed (or measured) expert load.
    PlacementSim(placement_sim::PlacementSimArgs),
    /// Load-test an OpenAI-compatible endpoint, or the expert tier (`loadgen experts`).
    Loadgen(Box<loadgen::LoadgenCommand>),
    /// Check that nodes answer (grpc.health.v1, or a gateway's /health): for probes.
    Health(health::HealthArgs),
    /// Make a cluster CA and issue nodes' certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        which: certs::CertsCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

impl Command {
    /// The role whose certificate this process presents (`--tls-root`).
    fn tls_role(&self) -> &'static str {
        match self {
            Self::Coordinator(_) => "coordinator",
            Self::ExpertWorker(_) => "expert-worker",
            // Both its ends are expert workers: one sends experts, the other fetches them.
            Self::Bench {
                which: bench::BenchCommand::Transfer(_),
            } => "expert-worker",
            Self::AttentionWorker(_) => "attention-worker",
            _ => "admin",
        }
    }

    /// The role whose certificate this process's servers present instead (`--tls-root`),
    /// for a process that runs both ends of a link: `bench dispatch` serves as an expert
    /// worker and dispatches as an operator's tool.
    fn tls_server_role(&self) -> Option<&'static str> {
        match self {
            Self::Bench {
                which: bench::BenchCommand::Dispatch(_),
            } => Some("expert-worker"),
            _ => None,
        }
    }

    /// The `service.name` this process's spans are exported under.
    fn service(&self) -> &'static str {
        match self {
            Self::Coordinator(_) => "expertmesh-coordinator",
            Self::ExpertWorker(_) => "expertmesh-expert-worker",
            Self::AttentionWorker(_) => "expertmesh-attention-worker",
            Self::Front(_) => "expertmesh-front",
            Self::Up(_) => "expertmesh-up",
            _ => "expertmesh",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = logging::Telemetry {
        format: cli.log_format,
        otlp_endpoint: cli.otlp_endpoint.clone(),
    };
    if let Err(e) = logging::init(telemetry, cli.command.service()) {
        eprintln!("error: the OTLP exporter: {e:#}");
        return ExitCode::FAILURE;
    }
    roles::INSECURE.store(cli.insecure, std::sync::atomic::Ordering::Relaxed);
    // `up` takes the admin's certificate from the cluster it makes (or from --tls-root).
    let own_dir = match cli.command {
        Command::Up(_) => None,
        _ => cli.tls_dir.clone(),
    };
    let installed = match (own_dir, &cli.tls_root) {
        (Some(_), _) if cli.command.tls_server_role().is_some() => {
            eprintln!(
                "error: TLS: this command serves and dispatches in one process, with a certificate \
                 for each end: give --tls-root (a certificate directory per role), not --tls-dir"
            );
            return ExitCode::FAILURE;
        }
        (Some(dir), _) => Some(expertmesh_proto::tls::install(&dir)),
        (None, Some(root)) => {
            let client = root.join(cli.command.tls_role());
            Some(match cli.command.tls_server_role() {
                Some(server) => expertmesh_proto::tls::install_split(&root.join(server), &client),
                None => expertmesh_proto::tls::install(&client),
            })
        }
        (None, None) => None,
    };
    if let Some(Err(e)) = installed {
        eprintln!("error: TLS: {e}");
        return ExitCode::FAILURE;
    }
    if std::env::var_os(cluster::PARENT_WATCH_ENV).is_some() {
        // Started by `up` (or another local cluster): leave with the parent.
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            logging::flush();
            std::process::exit(0);
        });
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Up(args) => up::run(args, cli.tls_root.clone()),
        Command::Health(args) => health::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Coordinator(args) => roles::coordinator(args),
        Command::ExpertWorker(args) => roles::expert_worker(args),
        Command::AttentionWorker(args) => roles::attention_worker(args),
        Command::Front(args) => roles::front(args),
        Command::Admin { which } => admin::run(which),
        Command::PlacementSim(args) => placement_sim::run(args),
        Command::Loadgen(cmd) => loadgen::run(*cmd),
        Command::Bench { which } => bench::run(which),
        Command::Certs { which } => certs::run(which),
    };
    logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match cli.log_format {
                logging::LogFormat::Text => eprintln!("error: {e:#}"),
                logging::LogFormat::Json => tracing::error!("{e:#}"),
            }
            if port_taken(&e) {
                ExitCode::from(cluster::EXIT_PORT_TAKEN)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether `e` comes from a port another process holds.
fn port_taken(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}
