//! `expertmesh bench join`: the time from an expert worker's start to the committed placement
//! that gives it experts, for a worker whose model directory holds no weights (it fetches
//! every expert it gains from the workers with the checkpoint, over each transport, and
//! checks each against the digests the coordinators hold) against one with the checkpoint's
//! files joining the same cluster (it reads them from its own disk): what taking experts over
//! the network adds to a scale-out. Each join gets a fresh local cluster (a coordinator and
//! `--expert-workers` workers with the files, their experts digested first); the ways to join
//! take turns, in an order that turns each run (`turn`); medians of `--runs`.
//! `synthetic:bench` is written to a temporary directory first, as a checkpoint the workers
//! open (a weightless worker needs files to leave out).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_coordinator::{ClusterView, CoordinatorClient, Placement, Role};
use expertmesh_dispatch::Transport;
use expertmesh_model::{ModelSource, SafetensorsCheckpoint, WeightSource};
use serde::Serialize;

use super::{median_of, turn};

use crate::cluster::{ClusterSpec, LocalCluster, JOIN_TOKEN_ENV};

/// How long a cluster may take to place every expert and digest it, and a newcomer to be
/// given its experts.
const PATIENCE: Duration = Duration::from_secs(600);

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Model directory, or `synthetic:bench` (written to a temporary directory first).
    #[arg(long, default_value = "synthetic:bench")]
    model: String,
    /// Expert workers with the checkpoint's files in each cluster (the newcomer's peers).
    #[arg(long, default_value_t = 2)]
    expert_workers: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The transports a weightless newcomer fetches over, comma-separated.
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
    /// The checkpoint's bytes of one expert (every MoE layer's slices of it).
    expert_mb: f64,
    joins: Vec<JoinReport>,
}

#[derive(Serialize)]
struct JoinReport {
    /// `files` (the newcomer has the checkpoint), or the transport a weightless one fetches
    /// over.
    from: String,
    /// From its start to the first placement (pending or committed) that gives it experts:
    /// its registration and the leader's plan.
    seconds_to_planned: f64,
    /// From its start to the committed placement that gives it experts (all of them held,
    /// every byte verified).
    seconds_to_committed: f64,
    /// Experts it was given.
    experts: usize,
    /// Their bytes over the seconds from planned to committed: taking them (from peers or its
    /// own files), checking them, and the commit.
    mb_per_s: f64,
    /// `seconds_to_committed` over the same run's join with the files.
    ratio_to_files: f64,
}

/// One join: how long it took and what it was given.
struct Joined {
    planned: Duration,
    committed: Duration,
    experts: usize,
}

pub fn run(args: JoinArgs) -> Result<()> {
    let scratch =
        std::env::temp_dir().join(format!("expertmesh-bench-join-{}", std::process::id()));
    let result = measure(&args, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} experts of {:.1} MB; medians of {} runs",
        report.model,
        report.experts,
        report.expert_mb,
        args.runs.max(1)
    );
    println!(" from     planned s   committed s   experts     MB/s   x files");
    for j in &report.joins {
        println!(
            "{:>5}   {:>11.2}   {:>11.2}   {:>7}   {:>6.0}   {:>7.2}",
            j.from,
            j.seconds_to_planned,
            j.seconds_to_committed,
            j.experts,
            j.mb_per_s,
            j.ratio_to_files
        );
    }
    Ok(())
}

fn measure(args: &JoinArgs, scratch: &Path) -> Result<Report> {
    let (model, weightless) = model_dirs(&args.model, scratch)?;
    let config = ModelSource::Dir(model.clone()).config()?;
    let expert_bytes = expert_bytes(&model)? / config.num_local_experts.max(1) as f64;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let ways: Vec<Option<Transport>> = std::iter::once(None)
        .chain(args.transport.iter().copied().map(Some))
        .collect();
    let mut joins: Vec<Vec<Joined>> = ways.iter().map(|_| Vec::new()).collect();
    let runs = args.runs.max(1);
    for run in 0..runs {
        for k in turn(run, ways.len()) {
            let way = ways[k];
            let newcomer = match way {
                None => &model,
                Some(_) => &weightless,
            };
            let joined = join_once(&runtime, args, &model, newcomer, way, &config)?;
            eprintln!(
                "run {}/{runs}: {} joined with {} experts in {:.2} s",
                run + 1,
                name(way),
                joined.experts,
                joined.committed.as_secs_f64()
            );
            joins[k].push(joined);
        }
    }
    let files: Vec<f64> = joins[0].iter().map(|j| j.committed.as_secs_f64()).collect();
    let joins = ways
        .iter()
        .zip(&joins)
        .map(|(way, runs)| {
            let rate = |j: &Joined| {
                let fetching = (j.committed - j.planned).as_secs_f64().max(1e-3);
                j.experts as f64 * expert_bytes / 1e6 / fetching
            };
            JoinReport {
                from: name(*way),
                seconds_to_planned: median_of(runs.iter().map(|j| j.planned.as_secs_f64())),
                seconds_to_committed: median_of(runs.iter().map(|j| j.committed.as_secs_f64())),
                experts: median_of(runs.iter().map(|j| j.experts as f64)) as usize,
                mb_per_s: median_of(runs.iter().map(rate)),
                ratio_to_files: median_of(
                    runs.iter()
                        .zip(&files)
                        .map(|(j, f)| j.committed.as_secs_f64() / f),
                ),
            }
        })
        .collect();
    Ok(Report {
        model: args.model.clone(),
        experts: config.num_local_experts,
        expert_mb: expert_bytes / 1e6,
        joins,
    })
}

fn name(way: Option<Transport>) -> String {
    way.map_or_else(|| "files".to_owned(), |t| t.to_string())
}

/// The checkpoint's directory (`synthetic:bench` written into `scratch`) and a copy of it
/// in `scratch` without its weight files.
fn model_dirs(model: &str, scratch: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = match model.parse::<ModelSource>()? {
        ModelSource::Dir(dir) => dir,
        ModelSource::Synthetic(spec) => {
            let dir = scratch.join("model");
            std::fs::create_dir_all(&dir)?;
            eprintln!("writing {model} to {}", dir.display());
            crate::checkpoint_dir::write_synthetic(
                &spec,
                &dir,
                crate::checkpoint_dir::SHARD_BYTES,
            )?;
            dir
        }
    };
    let weightless = scratch.join("weightless");
    std::fs::create_dir_all(&weightless)?;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let weights = path.extension().is_some_and(|x| x == "safetensors");
        if path.is_file() && !weights {
            let file = path.file_name().expect("a file has a name");
            std::fs::copy(&path, weightless.join(file))?;
        }
    }
    Ok((dir, weightless))
}

/// The bytes of every routed expert's weights in the checkpoint at `dir`.
fn expert_bytes(dir: &Path) -> Result<f64> {
    let checkpoint = SafetensorsCheckpoint::open(dir)?;
    let mut bytes = 0usize;
    for name in checkpoint.names().filter(|n| n.contains(".experts.")) {
        bytes += checkpoint.tensor(name)?.bytes().len();
    }
    Ok(bytes as f64)
}

/// Starts a cluster of `model`, waits until every expert is placed and digested, then starts
/// an expert worker over `newcomer` (fetching over `transport` when weightless) and times it
/// until the committed placement gives it experts.
fn join_once(
    runtime: &tokio::runtime::Runtime,
    args: &JoinArgs,
    model: &Path,
    newcomer: &Path,
    transport: Option<Transport>,
    config: &expertmesh_model::TextConfig,
) -> Result<Joined> {
    let model_arg = model.display().to_string();
    let cluster = LocalCluster::start(&ClusterSpec::expert_workers(
        &model_arg,
        args.expert_workers,
    ))?;
    let client = {
        let _entered = runtime.enter();
        CoordinatorClient::new(&cluster.coordinator_addresses())?
    };
    runtime.block_on(async {
        cluster.ready(PATIENCE).await?;
        wait_for(&client, "every expert digested", |v| {
            v.expert_digests.len() == config.num_local_experts
        })
        .await
    })?;
    let mut flags: Vec<String> = [
        "expert-worker",
        "--coordinator",
        &cluster.coordinator_addresses(),
        "--listen",
        "127.0.0.1:0",
        "--model",
        &newcomer.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(t) = transport {
        flags.extend(["--transfer".to_owned(), t.to_string()]);
    }
    let started = Instant::now();
    let process = crate::cluster::spawn(
        "expert-worker",
        &flags,
        &[(JOIN_TOKEN_ENV, cluster.join_token.clone())],
    )?;
    let mut planned = None;
    let view = runtime.block_on(wait_for(&client, "the newcomer given experts", |v| {
        let address = process.address.as_str();
        let committed = given(v, &v.placement, address) > 0;
        let pending = v.pending.as_ref().is_some_and(|p| given(v, p, address) > 0);
        if planned.is_none() && (pending || committed) {
            planned = Some(started.elapsed());
        }
        committed && v.pending.is_none()
    }))?;
    Ok(Joined {
        planned: planned.expect("committed, so planned"),
        committed: started.elapsed(),
        experts: given(&view, &view.placement, &process.address),
    })
}

/// The experts `placement` (the committed one or the pending one) gives the live expert
/// worker at `address`.
fn given(view: &ClusterView, placement: &Placement, address: &str) -> usize {
    view.members
        .iter()
        .find(|m| m.role == Role::ExpertWorker && m.alive && m.address == address)
        .map_or(0, |m| placement.experts_of(m.id).len())
}

/// The first cluster state that `done` accepts, within [`PATIENCE`].
async fn wait_for(
    client: &CoordinatorClient,
    what: &str,
    mut done: impl FnMut(&ClusterView) -> bool,
) -> Result<ClusterView> {
    let give_up = Instant::now() + PATIENCE;
    loop {
        if let Ok(view) = client.state().await {
            if done(&view) {
                return Ok(view);
            }
        }
        if Instant::now() >= give_up {
            bail!("{what}: not within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
