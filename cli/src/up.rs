//! `expertmesh up`: a whole cluster on this machine — a coordinator, expert workers and
//! attention workers as separate processes on loopback — until Ctrl-C.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::cluster::{ClusterSpec, LocalCluster};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Model directory or `synthetic:bench`.
    #[arg(long, default_value = "tests/fixtures/tiny-maverick")]
    model: String,
    #[arg(long, default_value_t = 2)]
    expert_workers: usize,
    #[arg(long, default_value_t = 1)]
    attention_workers: usize,
    /// Where the OpenAI-compatible HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http: String,
    /// Require this API key on HTTP requests.
    #[arg(long)]
    api_key: Option<String>,
}

pub fn run(args: UpArgs) -> Result<()> {
    if args.expert_workers == 0 || args.attention_workers == 0 {
        anyhow::bail!("a cluster needs at least one expert worker and one attention worker");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut cluster = LocalCluster::start(&ClusterSpec {
        model: args.model.clone(),
        expert_capacities: vec![None; args.expert_workers],
        attention_workers: args.attention_workers,
        attention_args: Vec::new(),
        http: Some(args.http.clone()),
        api_key: args.api_key.clone(),
    })?;
    let view = runtime.block_on(cluster.ready(Duration::from_secs(120)))?;
    println!(
        "expertmesh cluster up: model {}, placement epoch {}",
        args.model, view.placement.epoch
    );
    println!(
        "  coordinator       {} (pid {})",
        cluster.coordinator.address,
        cluster.coordinator.child.id()
    );
    for m in &view.members {
        let experts = view.placement.experts_of(m.id).len();
        let role = match m.role {
            expertmesh_coordinator::Role::ExpertWorker => {
                format!("expert worker {} ({experts} experts)", m.id)
            }
            expertmesh_coordinator::Role::AttentionWorker => format!("attention worker {}", m.id),
        };
        println!("  {role:<30} {} (pid {})", m.address, m.pid);
    }
    if let Some(http) = &cluster.http {
        println!("  OpenAI-compatible API      http://{http}/v1");
        println!(
            "try: curl http://{http}/v1/chat/completions -H 'Content-Type: application/json' \\\n       -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'"
        );
    }
    if let Some(a) = cluster.attention_workers.first() {
        println!(
            " or: expertmesh generate --model {} --attention-worker {} --prompt \"Hello\" --max-tokens 16",
            args.model, a.address
        );
    }
    println!("Ctrl-C stops everything.");
    runtime.block_on(async {
        loop {
            tokio::select! {
                _ = crate::roles::shutdown_signal() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    for p in cluster.processes_mut() {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            eprintln!("{} at {} exited ({status}); the others keep running", p.role, p.address);
                            p.address = format!("{} (exited)", p.address);
                        }
                    }
                }
            }
        }
    });
    eprintln!("stopping the cluster");
    drop(cluster);
    Ok(())
}
