//! `expertmesh admin`: look at and change a running cluster through its coordinators.
//! Without `--coordinators` it reads the addresses `expertmesh up` wrote.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use expertmesh_coordinator::{ClusterView, CoordinatorClient, Role};
use expertmesh_proto::v1 as pb;
use serde_json::{json, Value};

use crate::cluster::LocalCluster;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// The coordinators (leader, term, commit index), the workers and the placement epoch.
    Status(StatusArgs),
    /// Add a coordinator to the raft group (start it first with `coordinator --join`).
    AddCoordinator {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        address: String,
    },
    /// Remove a coordinator from the raft group.
    RemoveCoordinator {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: u64,
    },
    /// Drain a worker. An expert worker's experts move to the others (returns once it holds
    /// none); an attention worker takes no new request, hands its running ones to the other
    /// attention workers (they resume there) and stops (returns once the cluster sees it
    /// gone).
    Drain {
        #[command(flatten)]
        target: Target,
        /// The worker's id (see `admin status`).
        worker: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Re-plan the placement from the current expert load now.
    Rebalance {
        #[command(flatten)]
        target: Target,
    },
    /// Per MoE layer: routed-token load of the experts (recent window) and their copies.
    Experts {
        #[command(flatten)]
        target: Target,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Experts shown per layer in the table.
        #[arg(long, default_value_t = 4)]
        top: usize,
    },
}

#[derive(Args, Debug)]
pub struct Target {
    /// Coordinator addresses, comma-separated (default: those `expertmesh up` wrote).
    #[arg(long)]
    coordinators: Option<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Where `up` writes its coordinators' addresses: `$EXPERTMESH_UP_FILE`, or a file in the
/// temporary directory.
pub fn up_file() -> PathBuf {
    std::env::var_os("EXPERTMESH_UP_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("expertmesh-up.json"))
}

/// Writes the up file, readable by this user only (it holds the join token): the
/// coordinators, `api` (the front door's address), each coordinator's gateway (`http`),
/// the join token and `up`'s pid.
pub fn write_up_file(cluster: &LocalCluster, api: &str) -> Result<PathBuf> {
    let path = up_file();
    let body = json!({
        "coordinators": cluster.coordinator_addresses(),
        "api": api,
        "http": cluster.http,
        "join_token": cluster.join_token,
        "tls_dir": cluster.tls_dir,
        "pid": std::process::id(),
    });
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(&body)?))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

impl Target {
    fn client(&self) -> Result<CoordinatorClient> {
        let addresses = match &self.coordinators {
            Some(a) => a.clone(),
            None => {
                let path = up_file();
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no --coordinators given and no running `expertmesh up` found ({})",
                        path.display()
                    )
                })?;
                let v: Value = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?;
                // A cluster with TLS: its admin certificate, unless one was given.
                if let Some(dir) = v["tls_dir"].as_str() {
                    if !expertmesh_proto::tls::enabled() {
                        expertmesh_proto::tls::install(std::path::Path::new(dir))?;
                    }
                }
                v["coordinators"]
                    .as_str()
                    .with_context(|| format!("{} names no coordinators", path.display()))?
                    .to_owned()
            }
        };
        Ok(CoordinatorClient::new(&addresses)?)
    }
}

pub fn run(command: AdminCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            AdminCommand::Status(args) => status(args).await,
            AdminCommand::AddCoordinator {
                target,
                id,
                address,
            } => {
                target
                    .client()?
                    .change_coordinators(id, Some(address.clone()))
                    .await?;
                println!("coordinator {id} at {address} added");
                Ok(())
            }
            AdminCommand::RemoveCoordinator { target, id } => {
                target.client()?.change_coordinators(id, None).await?;
                println!("coordinator {id} removed");
                Ok(())
            }
            AdminCommand::Drain {
                target,
                worker,
                timeout_s,
            } => drain(&target.client()?, worker, timeout_s).await,
            AdminCommand::Rebalance { target } => {
                target.client()?.rebalance().await?;
                println!("the leader re-plans the placement from the current load");
                Ok(())
            }
            AdminCommand::Experts { target, json, top } => {
                experts(&target.client()?, json, top).await
            }
        }
    })
}

/// What `admin status` reports, as JSON.
pub fn status_json(reports: &[(String, Option<pb::CoordinatorStatus>)]) -> Value {
    // Every coordinator any replica knows of, by address.
    let mut known: BTreeMap<String, u64> = BTreeMap::new();
    for (_, s) in reports {
        for c in s.iter().flat_map(|s| &s.coordinators) {
            known.insert(c.address.clone(), c.id);
        }
    }
    let answered: Vec<&pb::CoordinatorStatus> =
        reports.iter().filter_map(|(_, s)| s.as_ref()).collect();
    let leader = answered
        .iter()
        .filter(|s| s.raft_state == "leader")
        .max_by_key(|s| s.term);
    // The leader's figures first, else the replica that has applied the most.
    let preferred: Vec<&pb::CoordinatorStatus> = leader
        .into_iter()
        .chain(answered.iter().max_by_key(|s| s.applied_index))
        .copied()
        .collect();
    let freshest: Option<ClusterView> = preferred
        .iter()
        .find_map(|s| s.state.clone())
        .and_then(|s| ClusterView::try_from(s).ok());
    let mut addresses: Vec<String> = reports.iter().map(|(a, _)| a.clone()).collect();
    for a in known.keys() {
        if !addresses.contains(a) {
            addresses.push(a.clone());
        }
    }
    let coordinators: Vec<Value> = addresses
        .iter()
        .map(|a| {
            match reports
                .iter()
                .find(|(r, _)| r == a)
                .and_then(|(_, s)| s.as_ref())
            {
                Some(s) => json!({
                    "id": s.id, "address": a, "pid": s.pid, "state": s.raft_state,
                    "term": s.term, "commit_index": s.commit_index,
                    "applied_index": s.applied_index,
                    "state_version": s.state.as_ref().map(|st| st.version),
                }),
                None => json!({
                    "id": known.get(a), "address": a, "pid": null, "state": "unreachable",
                }),
            }
        })
        .collect();
    let workers: Vec<Value> = freshest
        .iter()
        .flat_map(|v| {
            v.members.iter().map(move |m| {
                json!({
                    "id": m.id,
                    "role": match m.role {
                        Role::ExpertWorker => "expert-worker",
                        Role::AttentionWorker => "attention-worker",
                    },
                    "address": m.address,
                    "pid": m.pid,
                    "status": match (m.alive, m.draining) {
                        (false, _) => "dead",
                        (true, true) => "draining",
                        (true, false) => "alive",
                    },
                    "experts": v.placement.experts_of(m.id).len(),
                    "backups": v.backups.iter().filter(|b| b.contains(&m.id)).count(),
                })
            })
        })
        .collect();
    // Workers report their transfers to every replica.
    let transfers: Vec<Value> = preferred
        .first()
        .map(|s| s.transfers.iter().map(transfers_json).collect())
        .unwrap_or_default();
    json!({
        "leader": leader.map(|l| l.id),
        "term": answered.iter().map(|s| s.term).max(),
        "commit_index": leader.map(|l| l.commit_index),
        "placement_epoch": freshest.as_ref().map(|v| v.placement.epoch),
        "pending_epoch": freshest.as_ref().and_then(|v| v.pending.as_ref().map(|p| p.epoch)),
        "state_version": freshest.as_ref().map(|v| v.version),
        "experts_digested": freshest.as_ref().map(|v| v.expert_digests.len()),
        "num_experts": freshest.as_ref().map(|v| v.num_experts),
        "dense_digested": freshest.as_ref().map(|v| v.dense_digest.is_some()),
        "unservable": freshest.as_ref().and_then(|v| v.unservable.clone()),
        "coordinators": coordinators,
        "workers": workers,
        "transfers": transfers,
        "planned_transfers": planned_transfers(freshest.as_ref()),
    })
}

/// The transfers the plan gives weightless workers (while a placement is pending): each
/// expert a worker gains and the peer it takes it from.
fn planned_transfers(view: Option<&ClusterView>) -> Vec<Value> {
    let Some(view) = view.filter(|v| v.pending.is_some()) else {
        return Vec::new();
    };
    view.transfer_sources()
        .into_iter()
        .map(|((worker, expert), from)| json!({"worker": worker, "expert": expert, "from": from}))
        .collect()
}

/// One worker's transfers: those in flight with their rate and ETA, and where its fetched
/// experts came from.
fn transfers_json(t: &pb::WorkerTransfers) -> Value {
    let in_flight: Vec<Value> = t
        .in_flight
        .iter()
        .map(|x| {
            let secs = x.elapsed_ms as f64 / 1e3;
            let rate = if secs > 0.0 {
                x.bytes as f64 / secs
            } else {
                0.0
            };
            let eta = (rate > 0.0).then(|| x.total.saturating_sub(x.bytes) as f64 / rate);
            json!({
                "expert": x.expert, "source": x.source, "bytes": x.bytes, "total": x.total,
                "bytes_per_second": rate, "eta_seconds": eta,
            })
        })
        .collect();
    let fetched: Vec<Value> = t
        .fetched
        .iter()
        .map(|o| json!({"expert": o.expert, "source": o.source}))
        .collect();
    json!({"worker": t.worker_id, "in_flight": in_flight, "fetched": fetched})
}

async fn status(args: StatusArgs) -> Result<()> {
    let client = args.target.client()?;
    let reports = client.statuses().await;
    if reports.iter().all(|(_, s)| s.is_none()) {
        bail!(
            "no coordinator answered at {}",
            client.addresses().join(", ")
        );
    }
    let v = status_json(&reports);
    if args.json {
        println!("{v}");
        return Ok(());
    }
    let show = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "leader {}  term {}  commit {}  placement epoch {}  expert digests {}/{}{}",
        show(&v["leader"]),
        show(&v["term"]),
        show(&v["commit_index"]),
        show(&v["placement_epoch"]),
        show(&v["experts_digested"]),
        show(&v["num_experts"]),
        match v["unservable"].as_str() {
            Some(why) => format!("  (cannot serve: {why})"),
            None => String::new(),
        }
    );
    println!(
        "{:<4} {:<22} {:<8} {:<14} {:>6} {:>8}",
        "ID", "COORDINATOR", "PID", "STATE", "TERM", "APPLIED"
    );
    for c in v["coordinators"].as_array().into_iter().flatten() {
        println!(
            "{:<4} {:<22} {:<8} {:<14} {:>6} {:>8}",
            show(&c["id"]),
            show(&c["address"]),
            show(&c["pid"]),
            show(&c["state"]),
            show(&c["term"]),
            show(&c["applied_index"])
        );
    }
    println!(
        "{:<4} {:<22} {:<8} {:<17} {:<6} {:>7} {:>7}",
        "ID", "WORKER", "PID", "ROLE", "STATUS", "EXPERTS", "BACKUPS"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<4} {:<22} {:<8} {:<17} {:<6} {:>7} {:>7}",
            show(&w["id"]),
            show(&w["address"]),
            show(&w["pid"]),
            show(&w["role"]),
            show(&w["status"]),
            show(&w["experts"]),
            show(&w["backups"])
        );
    }
    let mut planned: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for p in v["planned_transfers"].as_array().into_iter().flatten() {
        *planned
            .entry(show(&p["worker"]))
            .or_default()
            .entry(show(&p["from"]))
            .or_default() += 1;
    }
    for (worker, from) in &planned {
        let from: Vec<String> = from
            .iter()
            .map(|(w, n)| format!("{n} from worker {w}"))
            .collect();
        println!(
            "worker {worker}: the pending placement has it take {}",
            from.join(", ")
        );
    }
    for t in v["transfers"].as_array().into_iter().flatten() {
        let fetched = t["fetched"].as_array().map_or(0, Vec::len);
        let in_flight = t["in_flight"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        println!(
            "worker {}: {fetched} experts taken from peers, {} in flight",
            show(&t["worker"]),
            in_flight.len()
        );
        for x in in_flight {
            let mb = |k: &str| x[k].as_f64().unwrap_or(0.0) / 1e6;
            println!(
                "  expert {:<4} from {:<22} {:>8.1}/{:.1} MB  {:>8.1} MB/s  ETA {}",
                show(&x["expert"]),
                show(&x["source"]),
                mb("bytes"),
                mb("total"),
                mb("bytes_per_second"),
                x["eta_seconds"]
                    .as_f64()
                    .map_or("-".to_owned(), |s| format!("{s:.1} s"))
            );
        }
    }
    Ok(())
}

async fn drain(client: &CoordinatorClient, worker: u64, timeout_s: u64) -> Result<()> {
    let started = std::time::Instant::now();
    client.drain(worker).await?;
    loop {
        let view = client.state().await?;
        let attention = view
            .members
            .iter()
            .find(|m| m.id == worker)
            .filter(|m| m.role == Role::AttentionWorker);
        if let Some(m) = attention {
            // It hands its requests to the others and stops; the cluster sees it gone
            // after one lease.
            if !m.alive {
                println!(
                    "attention worker {worker} handed off its requests and stopped ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if started.elapsed().as_secs() >= timeout_s {
                bail!("attention worker {worker} is still alive after {timeout_s} s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        if view.placement.experts_of(worker).is_empty() && view.pending.is_none() {
            println!(
                "worker {worker} drained in {:.1} s (placement epoch {}); it can be stopped",
                started.elapsed().as_secs_f64(),
                view.placement.epoch
            );
            return Ok(());
        }
        if started.elapsed().as_secs() >= timeout_s {
            bail!(
                "worker {worker} still holds {} experts after {timeout_s} s",
                view.placement.experts_of(worker).len()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn experts(client: &CoordinatorClient, as_json: bool, top: usize) -> Result<()> {
    let reports = client.statuses().await;
    // The leader's figures when it answers (any replica has them: workers report to all).
    let status = reports
        .iter()
        .filter_map(|(_, s)| s.as_ref())
        .max_by_key(|s| (s.raft_state == "leader", s.applied_index))
        .context("no coordinator answered")?;
    let view = status
        .state
        .clone()
        .map(ClusterView::try_from)
        .transpose()?
        .context("the coordinator sent no state")?;
    let layers = status.moe_layers as usize;
    let load = &status.expert_load;
    // Experts per layer as the load was reported (a malformed report shows no load).
    let e = match layers {
        0 => view.num_experts.max(1),
        l => (load.len() / l).max(1),
    };
    let layers = if layers * e == load.len() { layers } else { 0 };
    let copies: Vec<usize> = view.placement.experts.iter().map(Vec::len).collect();
    // Copies taken from peers (the rest came from their workers' own checkpoint files).
    let fetched: Vec<Value> = status
        .transfers
        .iter()
        .flat_map(|t| {
            t.fetched
                .iter()
                .map(|o| json!({"worker": t.worker_id, "expert": o.expert, "source": o.source}))
        })
        .collect();
    if as_json {
        let rows: Vec<Value> = (0..layers)
            .map(|l| json!({"moe_layer": l, "load": &load[l * e..(l + 1) * e]}))
            .collect();
        println!(
            "{}",
            json!({
                "placement_epoch": view.placement.epoch,
                "replicas": view.placement.experts,
                "fetched": fetched,
                "layers": rows,
            })
        );
        return Ok(());
    }
    println!(
        "placement epoch {}: {} experts, {} copies in all (load: routed tokens, 30 s half-life window)",
        view.placement.epoch,
        view.num_experts,
        copies.iter().sum::<usize>()
    );
    for t in &status.transfers {
        let mut from: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &t.fetched {
            *from.entry(o.source.as_str()).or_default() += 1;
        }
        let from: Vec<String> = from.iter().map(|(s, n)| format!("{n} from {s}")).collect();
        println!(
            "worker {}: {} copies taken from peers ({}), the rest from its checkpoint files",
            t.worker_id,
            t.fetched.len(),
            from.join(", ")
        );
    }
    if layers == 0 {
        println!("no expert load reported yet");
        return Ok(());
    }
    println!(
        "{:>5} {:>10} {:>9}  hottest experts (expert: share of layer, copies)",
        "LAYER", "TOKENS", "MAX/MEAN"
    );
    for l in 0..layers {
        let row = &load[l * e..(l + 1) * e];
        let total: f64 = row.iter().sum();
        let max = row.iter().copied().fold(0.0, f64::max);
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let hot: Vec<String> = order
            .iter()
            .take(top)
            .filter(|&&x| row[x] > 0.0)
            .map(|&x| {
                format!(
                    "{x}: {:.1}%, {}",
                    100.0 * row[x] / total.max(f64::MIN_POSITIVE),
                    copies.get(x).copied().unwrap_or(0)
                )
            })
            .collect();
        println!(
            "{:>5} {:>10.0} {:>9.2}  {}",
            l,
            total,
            if total > 0.0 {
                max / (total / e as f64)
            } else {
                0.0
            },
            hot.join("  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a placement is pending, the status names each planned transfer's sender.
    #[test]
    fn status_lists_the_planned_transfers() {
        use expertmesh_coordinator::{Member, Placement};
        let member = |id, weightless| Member {
            id,
            role: Role::ExpertWorker,
            address: format!("127.0.0.1:{}", 7100 + id),
            pid: 1,
            alive: true,
            capacity: None,
            draining: false,
            holds_experts: false,
            weightless,
            backup: 0,
        };
        let mut view = ClusterView {
            version: 3,
            members: vec![member(1, false), member(2, false), member(3, true)],
            placement: Placement {
                epoch: 1,
                experts: vec![vec![1, 2]; 4],
            },
            model_fingerprint: String::new(),
            num_experts: 4,
            unservable: None,
            pending: None,
            lease_ms: 1000,
            nccl_ids: BTreeMap::new(),
            expert_digests: BTreeMap::from([(0, 1), (2, 3)]),
            dense_digest: None,
            backups: vec![vec![3], vec![], vec![], vec![3]],
        };
        let status = |view: &ClusterView| {
            let s = pb::CoordinatorStatus {
                raft_state: "leader".into(),
                state: Some(pb::ClusterState::from(view)),
                ..Default::default()
            };
            status_json(&[("127.0.0.1:7000".into(), Some(s))])
        };
        assert_eq!(status(&view)["planned_transfers"], json!([]));
        assert_eq!(status(&view)["experts_digested"], 2);
        assert_eq!(status(&view)["num_experts"], 4);
        assert_eq!(status(&view)["dense_digested"], false);
        assert_eq!(status(&view)["workers"][2]["backups"], 2);
        view.pending = Some(Placement {
            epoch: 2,
            experts: vec![vec![1, 3], vec![2, 3], vec![1, 2], vec![1, 2]],
        });
        assert_eq!(
            status(&view)["planned_transfers"],
            json!([
                {"worker": 3, "expert": 0, "from": 1},
                {"worker": 3, "expert": 1, "from": 2},
            ])
        );
    }

    #[test]
    fn a_transfer_shows_its_rate_and_eta() {
        let t = pb::WorkerTransfers {
            worker_id: 3,
            in_flight: vec![
                pb::Transfer {
                    expert: 5,
                    source: "10.0.0.2:7100".into(),
                    bytes: 30_000_000,
                    total: 50_000_000,
                    elapsed_ms: 2000,
                },
                // Not started: no rate, no ETA.
                pb::Transfer {
                    expert: 6,
                    source: "10.0.0.3:7100".into(),
                    bytes: 0,
                    total: 50_000_000,
                    elapsed_ms: 0,
                },
            ],
            fetched: vec![pb::ExpertOrigin {
                expert: 4,
                source: "10.0.0.2:7100".into(),
            }],
        };
        let v = transfers_json(&t);
        assert_eq!(v["worker"], 3);
        assert_eq!(v["in_flight"][0]["bytes_per_second"], 15e6);
        assert_eq!(v["in_flight"][0]["eta_seconds"], 20e6 / 15e6);
        assert_eq!(v["in_flight"][1]["eta_seconds"], Value::Null);
        assert_eq!(
            v["fetched"][0],
            json!({"expert": 4, "source": "10.0.0.2:7100"})
        );
    }
}
