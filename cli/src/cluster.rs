//! Local clusters of real processes: the coordinator and workers started as children of
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

/// Starts `expertmesh <args>` and waits for its `LISTENING` line.
pub fn spawn(role: &'static str, args: &[String]) -> Result<Process> {
    Ok(spawn_reading(role, args, 1)?.0)
}

/// Starts `expertmesh <args>`, waits for its `LISTENING` line and returns the next
/// `lines - 1` lines of its stdout too.
fn spawn_reading(
    role: &'static str,
    args: &[String],
    lines: usize,
) -> Result<(Process, Vec<String>)> {
    let exe = std::env::current_exe().context("finding the expertmesh binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .env(PARENT_WATCH_ENV, "1")
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
            None => bail!("{role} exited before listening"),
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

/// A coordinator and its workers.
pub struct LocalCluster {
    pub coordinator: Process,
    /// The HTTP API's address, when the spec asked for one.
    pub http: Option<String>,
    pub expert_workers: Vec<Process>,
    pub attention_workers: Vec<Process>,
}

/// What to start.
pub struct ClusterSpec {
    pub model: String,
    /// One entry per expert worker: its capacity (None = no limit).
    pub expert_capacities: Vec<Option<usize>>,
    pub attention_workers: usize,
    /// Extra flags for attention workers (wire dtype, timeouts).
    pub attention_args: Vec<String>,
    /// Serve the OpenAI-compatible API from the coordinator at this address.
    pub http: Option<String>,
    /// API key the HTTP API requires.
    pub api_key: Option<String>,
}

impl ClusterSpec {
    /// A coordinator and `n` expert workers of unlimited capacity: the attention side
    /// runs in the calling process (`LocalCluster::attach`).
    pub fn expert_workers(model: &str, n: usize) -> Self {
        Self {
            model: model.into(),
            expert_capacities: vec![None; n],
            attention_workers: 0,
            attention_args: Vec::new(),
            http: None,
            api_key: None,
        }
    }
}

impl LocalCluster {
    pub fn start(spec: &ClusterSpec) -> Result<Self> {
        let model = spec.model.clone();
        let mut args: Vec<String> = ["coordinator", "--listen", "127.0.0.1:0", "--model", &model]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if let Some(h) = &spec.http {
            args.extend(["--http".into(), h.clone()]);
        }
        if let Some(k) = &spec.api_key {
            args.extend(["--api-key".into(), k.clone()]);
        }
        let (coordinator, more) =
            spawn_reading("coordinator", &args, 1 + usize::from(spec.http.is_some()))?;
        let http = more
            .first()
            .and_then(|l| l.strip_prefix("HTTP "))
            .map(str::to_owned);
        let worker = |role: &str, extra: &[String]| -> Vec<String> {
            let mut args: Vec<String> = [role, "--coordinator", &coordinator.address]
                .into_iter()
                .chain(["--listen", "127.0.0.1:0", "--model", &model])
                .map(str::to_owned)
                .collect();
            args.extend_from_slice(extra);
            args
        };
        let mut expert_workers = Vec::new();
        for capacity in &spec.expert_capacities {
            let extra: Vec<String> = match capacity {
                Some(c) => vec!["--capacity".into(), c.to_string()],
                None => Vec::new(),
            };
            expert_workers.push(spawn("expert-worker", &worker("expert-worker", &extra))?);
        }
        let mut attention_workers = Vec::new();
        for _ in 0..spec.attention_workers {
            let args = worker("attention-worker", &spec.attention_args);
            attention_workers.push(spawn("attention-worker", &args)?);
        }
        Ok(Self {
            coordinator,
            http,
            expert_workers,
            attention_workers,
        })
    }

    /// Waits until every worker has registered and every expert is placed.
    pub async fn ready(&self, patience: Duration) -> Result<ClusterView> {
        let client = CoordinatorClient::new(&self.coordinator.address)?;
        let give_up = Instant::now() + patience;
        loop {
            if let Ok(view) = client.state().await {
                let complete = view.count(Role::ExpertWorker) == self.expert_workers.len()
                    && view.count(Role::AttentionWorker) == self.attention_workers.len();
                if complete && view.unservable.is_none() {
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
        let (model, experts, _) = connect(&source, &self.coordinator.address, dispatch).await?;
        experts
            .ready(Duration::from_secs(60))
            .await
            .map_err(anyhow::Error::msg)?;
        Ok((model, experts))
    }

    /// Every process, for status lines and child monitoring.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        std::iter::once(&mut self.coordinator)
            .chain(self.expert_workers.iter_mut())
            .chain(self.attention_workers.iter_mut())
    }
}
