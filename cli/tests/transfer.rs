//! An expert worker that joins without the checkpoint's weights: under load, a third expert
//! worker starts on a model directory holding only the config, the shard index and the
//! tokenizer, takes every expert the placement gives it from the two workers that have the
//! checkpoint (`FetchExperts`), and serves them; then one of those two is killed and the
//! newcomer also takes the experts only that one had a copy of from the other. No request
//! fails and every text is the single process's. Both for the bf16 checkpoint and the FP8 one.
//! The newcomer also keeps 16 backup experts in memory. An attention worker without the
//! weights likewise takes its dense weights from a peer.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use common::load::{finish, single_process_texts, under_load};
use common::{bin, kill9, start_up, wait_status};
use serde_json::Value;

/// The live expert worker at `address`, from a status.
fn worker<'a>(v: &'a Value, address: &str) -> Option<&'a Value> {
    v["workers"]
        .as_array()?
        .iter()
        .find(|w| w["address"] == address && w["status"] == "alive")
}

/// A copy of `model`'s directory in `dir` without a single weight file: the config, the
/// shard index and the tokenizer.
fn weightless_copy(model: &Path, dir: &Path) -> PathBuf {
    let weightless = dir.join("weightless");
    std::fs::create_dir(&weightless).unwrap();
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(model.join(f), weightless.join(f)).unwrap();
    }
    weightless
}

/// Starts `expertmesh <args>` on a free loopback port, joining with `token`, its log in
/// `log`: the process (killed when dropped) and the address it listens on.
fn join(args: &[&str], token: &str, log: &Path) -> (common::Role, String) {
    let mut command = bin();
    command
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("EXPERTMESH_JOIN_TOKEN", token)
        .stderr(std::fs::File::create(log).unwrap());
    let role = common::listening(command);
    let address = role.address.clone();
    (role, address)
}

#[test]
fn a_worker_without_weights_takes_its_experts_from_peers_under_load() {
    joins_without_weights("tiny-maverick", "tcp", Landing::Memory);
}

/// The same with the FP8 checkpoint, over gRPC, into a cache file: its experts travel per
/// projection, codes and scales.
#[test]
fn a_worker_without_weights_takes_fp8_experts_from_peers_under_load() {
    joins_without_weights("tiny-maverick-fp8", "grpc", Landing::CacheFile);
}

/// Where a weightless worker keeps the experts it fetches.
#[derive(PartialEq)]
enum Landing {
    /// In memory (the default).
    Memory,
    /// In a file (`--expert-cache`).
    CacheFile,
}

/// `fixture`'s experts go to a weightless worker over `transport`, landing in `landing`.
fn joins_without_weights(fixture: &str, transport: &str, landing: Landing) {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture(fixture);
    let weightless = weightless_copy(&model, dir.path());
    let model = model.display().to_string();
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
        &dir.path().join("up.json"),
    );
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let api = cluster["api"].as_str().unwrap().to_owned();
    let token = cluster["join_token"].as_str().unwrap().to_owned();
    // The workers with the checkpoint digest their experts; the coordinators record one
    // digest per expert, which every fetched expert is checked against.
    wait_status(&coordinators, "two copies of every expert, digested", |v| {
        v["pending_epoch"].is_null()
            && v["experts_digested"] == 128
            && v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["experts"] == 128)
                .count()
                == 2
    });
    let expected = single_process_texts(&model);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = under_load(&api, 4, &stop, &expected);
    let mut events = vec![(Instant::now(), "load".to_owned())];

    let log = dir.path().join("weightless.log");
    let cache = dir.path().join("cache");
    let mut args = vec![
        "expert-worker",
        "--coordinator",
        &coordinators,
        "--model",
        weightless.to_str().unwrap(),
        "--migration-mbps",
        "400",
        "--expert-backup",
        "16",
        "--transfer",
        transport,
    ];
    if landing == Landing::CacheFile {
        args.extend(["--expert-cache", cache.to_str().unwrap()]);
    }
    let joined = Instant::now();
    let (_newcomer, address) = join(&args, &token, &log);
    events.push((joined, "a weightless expert worker joins".into()));
    let placed = wait_status(&coordinators, "the newcomer placed with experts", |v| {
        v["pending_epoch"].is_null()
            && worker(v, &address).is_some_and(|w| w["experts"].as_u64() > Some(0))
    });
    let held = worker(&placed, &address).unwrap()["experts"]
        .as_u64()
        .unwrap();
    // It also keeps 16 experts it does not serve in memory (the only worker offering
    // backups), fetched like the rest.
    wait_status(&coordinators, "the newcomer's backups", |v| {
        worker(v, &address).is_some_and(|w| w["backups"] == 16)
    });
    eprintln!(
        "the weightless worker holds {held} experts, {:.1} s after it started",
        joined.elapsed().as_secs_f64()
    );
    // One of the two workers with the checkpoint dies: the newcomer takes the experts only
    // it had copies of from the other.
    let victim = placed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| {
            w["role"] == "expert-worker"
                && w["status"] == "alive"
                && w["address"] != address.as_str()
        })
        .unwrap()
        .clone();
    kill9(victim["pid"].as_u64().unwrap());
    events.push((Instant::now(), "a worker with the checkpoint killed".into()));
    wait_status(&coordinators, "every expert on the two survivors", |v| {
        v["pending_epoch"].is_null() && worker(v, &address).is_some_and(|w| w["experts"] == 128)
    });
    // Where its copies came from, as `admin status` and `admin experts` show it: every one
    // of its 128 from a worker that has the checkpoint.
    let checkpoint_holders: Vec<&str> = placed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["role"] == "expert-worker" && w["address"] != address.as_str())
        .filter_map(|w| w["address"].as_str())
        .collect();
    let reported = wait_status(&coordinators, "the newcomer's fetched experts", |v| {
        let id = worker(v, &address).map(|w| w["id"].clone());
        v["transfers"].as_array().into_iter().flatten().any(|t| {
            Some(&t["worker"]) == id.as_ref() && t["fetched"].as_array().map(Vec::len) == Some(128)
        })
    });
    let id = worker(&reported, &address).unwrap()["id"].clone();
    let experts = common::json_out(
        &bin()
            .args([
                "admin",
                "experts",
                "--json",
                "--coordinators",
                &coordinators,
            ])
            .output()
            .unwrap(),
    );
    let fetched: Vec<&Value> = experts["fetched"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["worker"] == id)
        .collect();
    assert_eq!(fetched.len(), 128, "{experts}");
    for f in &fetched {
        assert!(
            checkpoint_holders.contains(&f["source"].as_str().unwrap()),
            "{f} not from {checkpoint_holders:?}"
        );
    }
    // The plan spread the first placement's transfers over both holders.
    for holder in &checkpoint_holders {
        assert!(
            fetched.iter().any(|f| f["source"] == *holder),
            "nothing came from {holder}: {experts}"
        );
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    let tally = finish(&stop, clients, &events);
    assert!(tally.ok > 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("experts come from peers over {transport}")),
        "{text}"
    );
    assert!(text.contains("experts from peers ("), "{text}");
    assert!(!text.contains("no digest"), "{text}");
    assert!(text.contains("backup experts in memory"), "{text}");
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.contains("fetched"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// An attention worker started on a model directory without weight files takes its dense
/// weights from the running attention worker (checked against the digest the coordinators
/// recorded from it); once that one is killed, the newcomer serves every request with the
/// single process's texts.
#[test]
fn an_attention_worker_without_weights_takes_its_dense_weights_from_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny-maverick");
    let weightless = weightless_copy(&model, dir.path());
    let model = model.display().to_string();
    let (_up, cluster) = start_up(
        &[
            "--http",
            "127.0.0.1:0",
            "--lease-ms",
            "1000",
            "--model",
            &model,
        ],
        &dir.path().join("up.json"),
    );
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let api = cluster["api"].as_str().unwrap().to_owned();
    let token = cluster["join_token"].as_str().unwrap().to_owned();
    let attention = |v: &Value| -> Vec<Value> {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == "attention-worker" && w["status"] == "alive")
            .cloned()
            .collect()
    };
    let ready = wait_status(&coordinators, "the dense weights digested", |v| {
        v["dense_digested"] == true && attention(v).len() == 1
    });
    let first = attention(&ready)[0].clone();
    let log = dir.path().join("newcomer.log");
    let (_newcomer, address) = join(
        &[
            "attention-worker",
            "--coordinator",
            &coordinators,
            "--model",
            weightless.to_str().unwrap(),
        ],
        &token,
        &log,
    );
    wait_status(&coordinators, "the newcomer registered", |v| {
        attention(v)
            .iter()
            .any(|w| w["address"] == address.as_str())
    });
    kill9(first["pid"].as_u64().unwrap());
    wait_status(&coordinators, "only the newcomer left", |v| {
        let alive = attention(v);
        alive.len() == 1 && alive[0]["address"] == address.as_str()
    });
    let expected = single_process_texts(&model);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = under_load(&api, 2, &stop, &expected);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let tally = finish(&stop, clients, &[(Instant::now(), "load".into())]);
    assert!(tally.ok > 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the dense weights come from peers"), "{text}");
    assert!(text.contains("took the dense weights from"), "{text}");
    assert!(!text.contains("no digest"), "{text}");
}
