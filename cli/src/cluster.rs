//! Local clusters of real processes: the coordinators and workers started as children of
//! this binary on loopback, for `up` and `generate --expert-workers`. Children are killed
//! when the `LocalCluster` is dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use expertmesh_attention_worker::{connect, DispatchConfig, RemoteExperts};
use expertmesh_coordinator::{ClusterView, CoordinatorClient, Role};
use expertmesh_model::{Model, ModelSource};

/// How long a child may take to bind its port (model loading included).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The exit status of a process that could not listen because its port was taken
/// (EADDRINUSE's number on Linux).
pub const EXIT_PORT_TAKEN: u8 = 98;

/// How many times a local cluster is started on fresh ports before a taken port is an error.
const START_ATTEMPTS: usize = 4;

/// A child could not listen: a port this process had found free for it was taken before the
/// child bound it (by another process's outgoing connection, say).
#[derive(Debug)]
pub struct PortTaken(&'static str);

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} could not listen: its port was taken meanwhile",
            self.0
        )
    }
}

impl std::error::Error for PortTaken {}

/// The variable that tells a child to exit when its stdin closes (see `main`).
pub const PARENT_WATCH_ENV: &str = "EXPERTMESH_EXIT_WITH_PARENT";

/// One child process and the address it listens on.
pub struct Process {
    pub role: &'static str,
    pub address: String,
    pub child: Child,
    /// Held open for the child's lifetime: when this process dies, even by SIGKILL, the
    /// pipe closes and the child exits instead of living on as an orphan.
    _lifeline: Option<std::process::ChildStdin>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variable a role reads its join token from (`--join-token` too, but a
/// command line is visible to every user of the machine in `ps`; the environment is not).
pub const JOIN_TOKEN_ENV: &str = "EXPERTMESH_JOIN_TOKEN";

/// Starts `expertmesh <args>` with `env` (secrets: the join token, API keys) and waits for
/// its `LISTENING` line.
pub fn spawn(role: &'static str, args: &[String], env: &[(&str, String)]) -> Result<Process> {
    Ok(spawn_reading(role, args, env, 1)?.0)
}

/// Starts `expertmesh <args>`, waits for its `LISTENING` line and returns the next
/// `lines - 1` lines of its stdout too.
fn spawn_reading(
    role: &'static str,
    args: &[String],
    env: &[(&str, String)],
    lines: usize,
) -> Result<(Process, Vec<String>)> {
    let exe = std::env::current_exe().context("finding the expertmesh binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .args(crate::logging::telemetry().args())
        .env(PARENT_WATCH_ENV, "1")
        // Each process gets its own role's certificate as a flag (or none): a certificate
        // directory in this process's environment is not theirs.
        .env_remove("EXPERTMESH_TLS_DIR")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {role}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        for _ in 0..lines {
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let lifeline = child.stdin.take();
    let mut process = Process {
        role,
        address: String::new(),
        child,
        _lifeline: lifeline,
    };
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) => match line.trim().strip_prefix("LISTENING ") {
            Some(addr) => process.address = addr.to_owned(),
            None => {
                // Its stdout ended: it is exiting (or said something else; it is killed then).
                let status = exit_status(&mut process.child, Duration::from_secs(5));
                return Err(exited_before_listening(role, status));
            }
        },
        Err(_) => bail!("{role} did not start listening within {START_TIMEOUT:?}"),
    }
    let mut more = Vec::new();
    for _ in 1..lines {
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) if !line.is_empty() => more.push(line.trim().to_owned()),
            _ => bail!("{role} stopped before it was ready"),
        }
    }
    Ok((process, more))
}

/// How `child` exited, if it does within `patience`.
fn exit_status(child: &mut Child, patience: Duration) -> Option<std::process::ExitStatus> {
    let give_up = Instant::now() + patience;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < give_up => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Why `role` stopped before listening, given how it exited.
fn exited_before_listening(
    role: &'static str,
    status: Option<std::process::ExitStatus>,
) -> anyhow::Error {
    match status {
        Some(s) if s.code() == Some(EXIT_PORT_TAKEN.into()) => PortTaken(role).into(),
        _ => anyhow::anyhow!("{role} exited before listening"),
    }
}

/// `start()`, again while it fails on a taken port, `attempts` times at most.
fn again_if_ports_taken<T>(attempts: usize, mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match start() {
            Err(e) if attempt < attempts && e.is::<PortTaken>() => {
                tracing::warn!("{e}: starting the cluster again on other ports");
                attempt += 1;
            }
            started => return started,
        }
    }
}

/// The coordinators and their workers.
pub struct LocalCluster {
    pub coordinators: Vec<Process>,
    /// Each coordinator's HTTP API address, when the spec asked for one.
    pub http: Vec<String>,
    pub expert_workers: Vec<Process>,
    pub attention_workers: Vec<Process>,
    /// The coordinators' raft storage; removed on drop when the cluster made it.
    data_dir: std::path::PathBuf,
    remove_data: bool,
    /// What workers present to register (`expertmesh expert-worker --join-token`).
    pub join_token: String,
    /// Each process's `/metrics` address by pid, when the spec asked for them.
    pub metrics: std::collections::BTreeMap<u32, String>,
    /// With TLS, the admin's certificate directory (`--tls-dir` for `admin` and the like).
    pub tls_dir: Option<std::path::PathBuf>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Workers first, then the coordinators, then their storage.
        self.attention_workers.clear();
        self.expert_workers.clear();
        self.coordinators.clear();
        if self.remove_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// What to start.
pub struct ClusterSpec {
    pub model: String,
    /// Coordinator replicas (1, 3 or 5).
    pub coordinators: usize,
    /// Where the coordinators keep their raft storage (one directory each below it); none
    /// makes a temporary one, removed when the cluster stops.
    pub data_dir: Option<std::path::PathBuf>,
    /// One entry per expert worker: its capacity (None = no limit).
    pub expert_capacities: Vec<Option<usize>>,
    pub attention_workers: usize,
    /// Extra flags for attention workers (wire dtype, timeouts).
    pub attention_args: Vec<String>,
    /// Serve the OpenAI-compatible API from the first coordinator at this address (the
    /// others serve it on free ports).
    pub http: Option<String>,
    /// The keys the HTTP API requires.
    pub keys: crate::roles::ApiKeyArgs,
    /// Extra flags for the coordinators (replication, leases).
    pub coordinator_args: Vec<String>,
    /// Where both kinds of worker compute, and how a GPU computes products.
    pub device: expertmesh_model::Device,
    pub gemm: expertmesh_model::GemmPrecision,
    /// Give every process a `/metrics` endpoint on a free loopback port.
    pub metrics: bool,
    /// Mutual TLS on every port: a CA and each role's certificate are made in the data
    /// directory (or taken from `tls_root`), and this process takes the admin's.
    pub tls: bool,
    /// Certificates made before, a directory per role (`--tls-root`).
    pub tls_root: Option<std::path::PathBuf>,
}

impl ClusterSpec {
    /// A coordinator and `n` expert workers of unlimited capacity: the attention side
    /// runs in the calling process (`LocalCluster::attach`).
    pub fn expert_workers(model: &str, n: usize) -> Self {
        Self {
            model: model.into(),
            coordinators: 1,
            data_dir: None,
            expert_capacities: vec![None; n],
            attention_workers: 0,
            attention_args: Vec::new(),
            http: None,
            keys: crate::roles::ApiKeyArgs::default(),
            coordinator_args: Vec::new(),
            device: expertmesh_model::Device::Cpu,
            gemm: expertmesh_model::GemmPrecision::F32,
            metrics: false,
            tls: false,
            tls_root: None,
        }
    }

    /// A coordinator serving the HTTP API on a free port, `n` expert workers and one
    /// attention worker started with `attention_args` (what the serving benchmarks load).
    pub fn serving(model: &str, n: usize, attention_args: Vec<String>) -> Self {
        Self {
            attention_workers: 1,
            attention_args,
            http: Some("127.0.0.1:0".into()),
            ..Self::expert_workers(model, n)
        }
    }
}

/// `n` free loopback ports (bound and released: another process could take one first; the
/// child then exits with `EXIT_PORT_TAKEN` and `LocalCluster::start` starts again).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The flags of coordinator `i` (0-based, listening on `port`) of a local cluster whose
/// group is `peers` (`ID=HOST:PORT`).
fn coordinator_args(
    spec: &ClusterSpec,
    i: usize,
    port: u16,
    peers: &[String],
    data_dir: &std::path::Path,
) -> Vec<String> {
    let id = i + 1;
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--id".into(),
        id.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--peers".into(),
        peers.join(","),
        "--data-dir".into(),
        data_dir
            .join(format!("coordinator-{id}"))
            .display()
            .to_string(),
        "--model".into(),
        spec.model.clone(),
    ];
    if let Some(h) = &spec.http {
        let h = if i == 0 {
            h.clone()
        } else {
            "127.0.0.1:0".into()
        };
        args.extend(["--http".into(), h]);
    }
    if let Some(file) = &spec.keys.api_key_file {
        args.extend(["--api-key-file".into(), file.clone()]);
    }
    args.extend(spec.coordinator_args.iter().cloned());
    args
}

/// With TLS, the directory of the cluster's certificates (a directory per role): the
/// spec's, or a CA and a certificate per role made in `data_dir`; this process takes the
/// admin's.
fn tls_certificates(
    spec: &ClusterSpec,
    data_dir: &std::path::Path,
) -> Result<Option<std::path::PathBuf>> {
    if !spec.tls {
        return Ok(None);
    }
    let root = match &spec.tls_root {
        Some(root) => root.clone(),
        None => {
            let root = data_dir.join("tls");
            crate::certs::local_cluster(&root)?;
            root
        }
    };
    expertmesh_proto::tls::install(&root.join("admin"))?;
    Ok(Some(root))
}

impl LocalCluster {
    /// Starts the cluster `spec` asks for. The ports it picks are free when picked but
    /// released until each child binds its own: when another process took one meanwhile,
    /// the cluster is stopped and started again on fresh ones.
    pub fn start(spec: &ClusterSpec) -> Result<Self> {
        again_if_ports_taken(START_ATTEMPTS, || Self::start_once(spec))
    }

    fn start_once(spec: &ClusterSpec) -> Result<Self> {
        let model = spec.model.clone();
        let n = spec.coordinators.max(1);
        let (data_dir, remove_data) = match &spec.data_dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!(
                    "expertmesh-up-{}",
                    &expertmesh_proto::secret::random_token()[..16]
                )),
                true,
            ),
        };
        // A token only this cluster's workers know, given to them (and the API keys to the
        // coordinators) in the environment, not on command lines `ps` shows.
        let token = expertmesh_proto::secret::random_token();
        let worker_env = [(JOIN_TOKEN_ENV, token.clone())];
        let mut coordinator_env = spec.keys.env();
        coordinator_env.extend(worker_env.iter().cloned());
        let tls_root = tls_certificates(spec, &data_dir)?;
        let tls_args = |role: &str| -> Vec<String> {
            tls_root
                .iter()
                .flat_map(|root| {
                    [
                        "--tls-dir".to_owned(),
                        root.join(role).display().to_string(),
                    ]
                })
                .collect()
        };
        let ports = free_ports(n)?;
        let peers: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect();
        let mut cluster = Self {
            coordinators: Vec::new(),
            http: Vec::new(),
            expert_workers: Vec::new(),
            attention_workers: Vec::new(),
            data_dir: data_dir.clone(),
            remove_data,
            join_token: token.clone(),
            metrics: std::collections::BTreeMap::new(),
            tls_dir: tls_root.as_ref().map(|root| root.join("admin")),
        };
        // A free port per process for its `/metrics`, when asked for.
        let processes = n + spec.expert_capacities.len() + spec.attention_workers;
        let mut metrics_ports = match spec.metrics {
            true => free_ports(processes)?,
            false => Vec::new(),
        }
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"));
        for (i, &port) in ports.iter().enumerate() {
            let mut args = coordinator_args(spec, i, port, &peers, &data_dir);
            let metrics = metrics_ports.next();
            args.extend(metrics.iter().flat_map(|m| ["--metrics".into(), m.clone()]));
            args.extend(tls_args("coordinator"));
            let (process, more) = spawn_reading(
                "coordinator",
                &args,
                &coordinator_env,
                1 + usize::from(spec.http.is_some()),
            )?;
            if let Some(m) = metrics {
                cluster.metrics.insert(process.child.id(), m);
            }
            if let Some(http) = more.first().and_then(|l| l.strip_prefix("HTTP ")) {
                cluster.http.push(http.to_owned());
            }
            cluster.coordinators.push(process);
        }
        let coordinators = cluster.coordinator_addresses();
        let worker = |role: &str, extra: &[String]| -> Vec<String> {
            let mut args: Vec<String> = [role, "--coordinator", &coordinators]
                .into_iter()
                .chain(["--listen", "127.0.0.1:0", "--model", &model])
                .map(str::to_owned)
                .chain(["--device".to_owned(), spec.device.to_string()])
                .chain(["--gemm".to_owned(), spec.gemm.to_string()])
                .chain(tls_args(role))
                .collect();
            args.extend_from_slice(extra);
            args
        };
        // A worker of `role` with `extra` flags (and its `/metrics` port, when asked for).
        let mut start_worker = |role: &'static str, mut extra: Vec<String>| -> Result<Process> {
            let metrics = metrics_ports.next();
            extra.extend(metrics.iter().flat_map(|m| ["--metrics".into(), m.clone()]));
            let process = spawn(role, &worker(role, &extra), &worker_env)?;
            if let Some(m) = metrics {
                cluster.metrics.insert(process.child.id(), m);
            }
            Ok(process)
        };
        let mut expert_workers = Vec::new();
        for capacity in &spec.expert_capacities {
            let extra: Vec<String> = match capacity {
                Some(c) => vec!["--capacity".into(), c.to_string()],
                None => Vec::new(),
            };
            expert_workers.push(start_worker("expert-worker", extra)?);
        }
        let mut attention_workers = Vec::new();
        for _ in 0..spec.attention_workers {
            attention_workers.push(start_worker(
                "attention-worker",
                spec.attention_args.clone(),
            )?);
        }
        cluster.expert_workers = expert_workers;
        cluster.attention_workers = attention_workers;
        Ok(cluster)
    }

    /// The coordinators' addresses, comma-separated (what workers and `admin` take).
    pub fn coordinator_addresses(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| c.address.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every worker has registered and every expert is placed.
    pub async fn ready(&self, patience: Duration) -> Result<ClusterView> {
        let client = CoordinatorClient::new(&self.coordinator_addresses())?;
        let give_up = Instant::now() + patience;
        loop {
            if let Ok(view) = client.state().await {
                let complete = view.count(Role::ExpertWorker) == self.expert_workers.len()
                    && view.count(Role::AttentionWorker) == self.attention_workers.len();
                // Settled: no placement pending, every expert worker given experts.
                let settled = view.pending.is_none()
                    && view
                        .members
                        .iter()
                        .filter(|m| m.role == Role::ExpertWorker && m.alive)
                        .filter(|m| m.capacity != Some(0))
                        .all(|m| !view.placement.experts_of(m.id).is_empty());
                // Attention workers that hold every expert serve whatever the placement is.
                let self_contained = view
                    .members
                    .iter()
                    .filter(|m| m.role == Role::AttentionWorker)
                    .all(|m| m.holds_experts);
                let servable =
                    view.unservable.is_none() || (self.expert_workers.is_empty() && self_contained);
                if complete && settled && servable {
                    return Ok(view);
                }
                if complete && Instant::now() >= give_up {
                    bail!(
                        "the cluster cannot serve: {}",
                        view.unservable.unwrap_or_default()
                    );
                }
            }
            if Instant::now() >= give_up {
                bail!("the cluster was not ready within {patience:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the cluster, then loads the model without its experts here and connects
    /// them: the attention side of `generate --expert-workers` and `bench decode`.
    pub async fn attach(
        &self,
        model: &str,
        dispatch: DispatchConfig,
    ) -> Result<(Arc<Model>, RemoteExperts)> {
        self.ready(Duration::from_secs(300)).await?;
        let source: ModelSource = model.parse()?;
        let (model, experts, _) = connect(
            &source,
            None,
            &self.coordinator_addresses(),
            dispatch,
            Default::default(),
        )
        .await?;
        experts
            .ready(Duration::from_secs(60))
            .await
            .map_err(anyhow::Error::msg)?;
        Ok((model, experts))
    }

    /// Every process, for status lines and child monitoring.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        self.coordinators
            .iter_mut()
            .chain(self.expert_workers.iter_mut())
            .chain(self.attention_workers.iter_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: u8) -> Option<std::process::ExitStatus> {
        let mut child = Command::new("sh")
            .args(["-c", &format!("exit {code}")])
            .spawn()
            .unwrap();
        exit_status(&mut child, Duration::from_secs(10))
    }

    #[test]
    fn a_taken_port_is_told_from_other_failures() {
        let taken = exited_before_listening("coordinator", exit(EXIT_PORT_TAKEN));
        assert!(taken.is::<PortTaken>(), "{taken}");
        let other = exited_before_listening("coordinator", exit(1));
        assert!(!other.is::<PortTaken>());
        assert_eq!(other.to_string(), "coordinator exited before listening");
        // One that goes on running: no status, not a taken port (the caller kills it).
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let status = exit_status(&mut sleeper, Duration::from_millis(50));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(status.is_none());
        assert!(!exited_before_listening("coordinator", status).is::<PortTaken>());
    }

    #[test]
    fn only_taken_ports_start_the_cluster_again() {
        // Taken twice, then started: the third attempt's result.
        let mut tries = 0;
        let started = again_if_ports_taken(4, || {
            tries += 1;
            match tries {
                1 | 2 => Err(PortTaken("coordinator").into()),
                _ => Ok(tries),
            }
        });
        assert_eq!(started.unwrap(), 3);
        // Taken every time: the last attempt's error.
        let mut tries = 0;
        let taken = again_if_ports_taken(4, || -> Result<()> {
            tries += 1;
            Err(PortTaken("expert-worker").into())
        });
        assert!(taken.unwrap_err().is::<PortTaken>());
        assert_eq!(tries, 4);
        // Any other failure: at once.
        let mut tries = 0;
        let failed = again_if_ports_taken(4, || -> Result<()> {
            tries += 1;
            bail!("no model here")
        });
        assert_eq!(failed.unwrap_err().to_string(), "no model here");
        assert_eq!(tries, 1);
    }
}
