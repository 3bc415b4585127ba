//! Live placement changes under a steady stream of requests on tiny-maverick, every expert
//! kept on two workers: two expert workers join a running cluster and get experts without a
//! restart, one is drained and stopped, another is killed with `kill -9` — and no request
//! fails, every output equals the single process's, and the placement recovers two copies of every expert.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{admin_status, bin, kill9, post, start_up, wait_status, Kill};
use serde_json::{json, Value};

fn experts_of(v: &Value, id: u64) -> u64 {
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id)
        .map_or(0, |w| w["experts"].as_u64().unwrap())
}

fn expert_workers(v: &Value, status: &str) -> Vec<Value> {
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["role"] == "expert-worker" && w["status"] == status)
        .cloned()
        .collect()
}

#[test]
fn grow_drain_and_lose_expert_workers_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let up_file = dir.path().join("up.json");
    let model = common::fixture("tiny-maverick").display().to_string();
    let (_up, cluster) = start_up(
        &[
            "--http",
            "127.0.0.1:0",
            "--replicas",
            "2",
            "--lease-ms",
            "2000",
            "--model",
            &model,
        ],
        &up_file,
    );
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let http = cluster["http"][0].as_str().unwrap().to_owned();
    let token = cluster["join_token"].as_str().unwrap().to_owned();
    // Both first workers hold every expert once the second copies are placed.
    wait_status(&coordinators, "two copies of every expert", |v| {
        v["pending_epoch"].is_null()
            && expert_workers(v, "alive")
                .iter()
                .all(|w| w["experts"] == 128)
    });
    let request = json!({
        "model": "tiny-maverick",
        "prompt": (1..30).collect::<Vec<u32>>(),
        "max_tokens": 16,
        "temperature": 0,
    });
    let expected = post(&http, "/v1/completions", &request).unwrap()["choices"][0]["text"].clone();
    // The single process, for the same prompt: the cluster must produce exactly this.
    let ids = (1..30).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let single = bin()
        .args([
            "generate",
            "--model",
            &model,
            "--input-ids",
            &ids,
            "--max-tokens",
            "16",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(single.status.success());
    let single: Value = serde_json::from_slice(&single.stdout).unwrap();
    assert_eq!(
        expected, single["text"],
        "the cluster differs from the single process"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (http, request, stop) = (http.clone(), request.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut results = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    results.push(post(&http, "/v1/completions", &request));
                }
                results
            })
        })
        .collect();

    // Grow from 2 to 4 expert workers.
    let joined = Instant::now();
    let join = || {
        Kill(
            bin()
                .args([
                    "expert-worker",
                    "--join",
                    &coordinators,
                    "--join-token",
                    &token,
                ])
                .args(["--listen", "127.0.0.1:0", "--model", &model])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _third = join();
    let _fourth = join();
    let grown = wait_status(&coordinators, "four workers holding experts", |v| {
        let alive = expert_workers(v, "alive");
        v["pending_epoch"].is_null()
            && alive.len() == 4
            && alive.iter().all(|w| w["experts"].as_u64() > Some(0))
    });
    eprintln!(
        "new workers took traffic (placement committed) {:.0} ms after they were started",
        joined.elapsed().as_secs_f64() * 1000.0
    );
    let ids: Vec<u64> = expert_workers(&grown, "alive")
        .iter()
        .map(|w| w["id"].as_u64().unwrap())
        .collect();

    // Drain the first, then stop it.
    let drained = common::expertmesh(&[
        "admin",
        "drain",
        &ids[0].to_string(),
        "--coordinators",
        &coordinators,
    ]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let after_drain = admin_status(&coordinators);
    assert_eq!(experts_of(&after_drain, ids[0]), 0);
    let pid = |v: &Value, id: u64| {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .unwrap()["pid"]
            .as_u64()
            .unwrap()
    };
    kill9(pid(&after_drain, ids[0]));

    // kill -9 a worker that holds experts: their other copies answer at once.
    let victim = ids[1];
    assert!(experts_of(&after_drain, victim) > 0);
    let killed = Instant::now();
    kill9(pid(&after_drain, victim));
    let first = post(&http, "/v1/completions", &request).expect("the first request after kill -9");
    eprintln!(
        "first request served without the killed worker {:.0} ms after kill -9",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(first["choices"][0]["text"], expected);
    let healed = wait_status(&coordinators, "two copies on the survivors", |v| {
        let alive = expert_workers(v, "alive");
        v["pending_epoch"].is_null()
            && alive.len() == 2
            && alive.iter().all(|w| w["experts"] == 128)
    });
    eprintln!(
        "two copies of every expert again {:.0} ms after kill -9 (placement epoch {})",
        killed.elapsed().as_secs_f64() * 1000.0,
        healed["placement_epoch"]
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for c in clients {
        for r in c.join().unwrap() {
            let r = r.expect("a request failed while the placement changed");
            assert_eq!(r["choices"][0]["text"], expected);
            served += 1;
        }
    }
    eprintln!("{served} requests served, none failed");
    assert!(served >= 10, "only {served} requests");
}
