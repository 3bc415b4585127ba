//! The coordinators as a raft group of real processes: `kill -9` of the leader while
//! requests run (a new leader is elected, no request fails, nothing committed is lost, and
//! writes work again), every coordinator stopped and started again (the state comes back
//! from disk), and a damaged log refused at start-up.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::load::free_ports;
use common::{bin, kill9, post, start_up, wait_status};
use serde_json::{json, Value};

fn fixture(name: &str) -> String {
    common::fixture(name).display().to_string()
}

#[test]
fn killing_the_leader_loses_nothing_and_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-maverick");
    let (_up, cluster) = start_up(
        &[
            "--coordinators",
            "3",
            "--http",
            "127.0.0.1:0",
            "--model",
            &model,
        ],
        &dir.path().join("up.json"),
    );
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let http: Vec<String> = serde_json::from_value(cluster["http"].clone()).unwrap();
    // Settled: a leader, three workers, both expert workers holding experts, nothing pending.
    let before = wait_status(&coordinators, "a settled cluster", |v| {
        let workers = v["workers"].as_array().unwrap();
        v["leader"].is_u64()
            && workers.len() == 3
            && v["pending_epoch"].is_null()
            && workers
                .iter()
                .filter(|w| w["role"] == "expert-worker")
                .all(|w| w["experts"].as_u64() > Some(0))
    });
    let leader = before["leader"].as_u64().unwrap();
    let coordinator_list: Vec<Value> = before["coordinators"].as_array().unwrap().clone();
    let leader_pid = coordinator_list
        .iter()
        .find(|c| c["id"].as_u64() == Some(leader))
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    // A gateway on a coordinator that survives (coordinator i serves http[i]).
    let follower = coordinator_list
        .iter()
        .position(|c| c["id"].as_u64() != Some(leader))
        .unwrap();
    let gateway = http[follower].clone();
    let request = json!({
        "model": "tiny-maverick",
        "prompt": (1..40).collect::<Vec<u32>>(),
        "max_tokens": 24,
        "temperature": 0,
    });
    let reference = post(&gateway, "/v1/completions", &request).unwrap();
    let expected = reference["choices"][0]["text"].clone();
    // The single process, for the same prompt: the cluster must produce exactly this.
    let ids = (1..40).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let single = bin()
        .args([
            "generate",
            "--model",
            &fixture("tiny-maverick"),
            "--input-ids",
            &ids,
        ])
        .args(["--max-tokens", "24", "--json"])
        .output()
        .unwrap();
    assert!(single.status.success());
    let single: Value = serde_json::from_slice(&single.stdout).unwrap();
    assert_eq!(
        expected, single["text"],
        "the cluster differs from the single process"
    );

    // Requests back to back on two connections while the leader dies.
    let run_until = Instant::now() + Duration::from_secs(8);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let gateway = gateway.clone();
            let request = request.clone();
            std::thread::spawn(move || {
                let mut results = Vec::new();
                while Instant::now() < run_until {
                    results.push(post(&gateway, "/v1/completions", &request));
                }
                results
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    kill9(leader_pid);
    let after = wait_status(&coordinators, "a new leader", |v| {
        v["leader"].as_u64().is_some_and(|l| l != leader)
    });
    let election = killed.elapsed();
    eprintln!(
        "new leader {} elected {:.0} ms after kill -9 of leader {leader}",
        after["leader"],
        election.as_secs_f64() * 1000.0
    );
    let mut served = 0;
    for c in clients {
        for r in c.join().unwrap() {
            let r = r.expect("a request failed while the leader died");
            assert_eq!(r["choices"][0]["text"], expected);
            served += 1;
        }
    }
    assert!(served >= 4, "only {served} requests completed");
    // Nothing committed is lost: the same workers, the same placement.
    assert_eq!(after["placement_epoch"], before["placement_epoch"]);
    assert_eq!(after["workers"], before["workers"]);
    let dead = after["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"].as_u64() == Some(leader))
        .unwrap();
    assert_eq!(dead["state"], "unreachable");

    // Writes work under the new leader: one more expert worker joins through the list
    // that still names the dead coordinator first.
    let token = cluster["join_token"].as_str().unwrap();
    let _extra = common::start(&[
        "expert-worker",
        "--coordinator",
        &coordinators,
        "--join-token",
        token,
        "--listen",
        "127.0.0.1:0",
        "--model",
        &fixture("tiny-maverick"),
    ]);
    let epoch = before["placement_epoch"].as_u64().unwrap();
    wait_status(&coordinators, "the new worker placed", |v| {
        v["workers"].as_array().unwrap().len() == 4 && v["placement_epoch"].as_u64() > Some(epoch)
    });
    let later = post(&gateway, "/v1/completions", &request).unwrap();
    assert_eq!(later["choices"][0]["text"], expected);
}

fn coordinator_args(id: usize, ports: &[u16], data: &Path, model: &str) -> Vec<String> {
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    vec![
        "coordinator".into(),
        "--id".into(),
        id.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", ports[id - 1]),
        "--peers".into(),
        peers.join(","),
        "--data-dir".into(),
        data.join(id.to_string()).display().to_string(),
        "--model".into(),
        model.into(),
        // Long enough that the stopped worker is not declared dead during the test.
        "--lease-ms".into(),
        "600000".into(),
    ]
}

#[test]
fn coordinators_come_back_from_disk_and_refuse_a_damaged_log() {
    let model = fixture("tiny-scout");
    let data = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let list = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let start_all = || -> Vec<common::Role> {
        (1..=3)
            .map(|id| {
                let args = coordinator_args(id, &ports, data.path(), &model);
                common::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .collect()
    };
    let coordinators = start_all();
    let worker = common::start_worker("expert-worker", &list, &model, &[]);
    let before = wait_status(&list, "the worker placed", |v| {
        v["workers"].as_array().unwrap().len() == 1 && v["placement_epoch"] == 1
    });
    drop(worker);
    drop(coordinators); // SIGKILL, all three
    let coordinators = start_all();
    let after = wait_status(&list, "a leader after the restart", |v| {
        v["leader"].is_u64()
    });
    assert_eq!(after["workers"], before["workers"]);
    assert_eq!(after["placement_epoch"], before["placement_epoch"]);
    assert!(after["term"].as_u64() > before["term"].as_u64());
    drop(coordinators);

    // Damage an acknowledged byte of coordinator 3's log.
    let log = std::fs::read_dir(data.path().join("3"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("log-"))
        .unwrap();
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(!bytes.is_empty());
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&log, bytes).unwrap();
    let args = coordinator_args(3, &ports, data.path(), &model);
    let mut child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > give_up {
            let _ = child.kill();
            panic!("a coordinator with a damaged log kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(stderr.contains(log.to_str().unwrap()), "{stderr}");
}
