//! No request fails when a node dies: real processes on loopback, `kill -9` under load, and
//! every answer compared with the answer the undisturbed cluster gives.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::load::{finish, free_ports, single_process_texts, stream, under_load};
use common::{kill9, post, start, start_up, wait_status, Role};
use serde_json::{json, Value};

/// The requests of the test: greedy and seeded-sampling completions of a few prompts.
fn requests() -> Vec<Value> {
    (0..6u32)
        .map(|i| {
            let prompt: Vec<u32> = (1 + i..30 + 3 * i).collect();
            let sampling = if i % 3 == 2 {
                json!({"temperature": 0.9, "top_p": 0.95, "seed": 7 + i})
            } else {
                json!({"temperature": 0})
            };
            let mut r = json!({"prompt": prompt, "max_tokens": 1500, "ignore_eos": true,
                               "return_token_ids": true});
            r.as_object_mut()
                .unwrap()
                .extend(sampling.as_object().unwrap().clone());
            r
        })
        .collect()
}

/// The value of the series `name` (its full name, labels included).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// The status entry of an attention worker (of `status`) running two sequences or more
/// (the reference requests before ran one at a time: a load report of theirs is not
/// mistaken for the streams), once one does.
fn busy_attention_worker(http: &str, status: &Value) -> Value {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let text = common::metrics(http);
        for w in status["workers"].as_array().unwrap() {
            let series = format!("expertmesh_running_sequences{{worker=\"{}\"}}", w["id"]);
            if w["role"] == "attention-worker" && metric(&text, &series).unwrap_or(0.0) >= 2.0 {
                return w.clone();
            }
        }
        assert!(
            Instant::now() < give_up,
            "no attention worker reports running sequences"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` of the attention worker that streams the requests: every stream goes on from
/// another attention worker, and every text — greedy and seeded sampling alike — equals the
/// one the undisturbed cluster gave for the same request.
#[test]
fn a_killed_attention_worker_fails_no_request() {
    streams_survive("kill -9", |worker, _| {
        kill9(worker["pid"].as_u64().unwrap())
    });
}

/// `kill -STOP` of the attention worker that streams the requests: it says nothing, its
/// connections stay open, and the gateway's keepalive pings find it out within about a
/// second and a half (long before any lease or token deadline); the streams go on elsewhere.
#[test]
fn a_frozen_attention_worker_fails_no_request() {
    let mut frozen = None;
    let stall = streams_survive("kill -STOP", |worker, _| {
        let pid = worker["pid"].as_u64().unwrap();
        signal("-STOP", pid);
        frozen = Some(pid);
    });
    // A stopped process still dies of SIGKILL.
    kill9(frozen.unwrap());
    assert!(
        stall < Duration::from_secs(5),
        "the frozen worker was noticed only after {stall:?}"
    );
}

fn signal(which: &str, pid: u64) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `admin drain` of the attention worker that streams the requests: it takes no new one,
/// its streams resume on the other attention worker with the same texts, and it stops.
#[test]
fn a_drained_attention_worker_hands_its_streams_over_and_stops() {
    streams_survive("admin drain", |worker, coordinators| {
        let id = worker["id"].to_string();
        admin_drain(coordinators, &id);
        let status = wait_status(coordinators, "the drained worker gone", |v| {
            v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["id"] == worker["id"] && w["status"] == "dead")
        });
        assert!(status["workers"].is_array());
    });
}

/// `admin drain ID` against `coordinators`, which must succeed; prints what it says.
fn admin_drain(coordinators: &str, id: &str) {
    let out = common::expertmesh(&["admin", "drain", id, "--coordinators", coordinators]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
}

/// Streams from two attention workers while `disrupt` (named `what`) is done to the busy
/// one (given its status entry and the coordinators): every stream ends as the undisturbed
/// cluster's does, some of them having migrated.
fn streams_survive(what: &str, disrupt: impl FnOnce(&Value, &str)) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny-maverick").display().to_string();
    let (_up, cluster) = start_up(
        &[
            "--http",
            "127.0.0.1:0",
            "--model",
            &model,
            "--attention-workers",
            "2",
        ],
        &dir.path().join("up.json"),
    );
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let http = cluster["http"][0].as_str().unwrap().to_owned();
    let status = wait_status(&coordinators, "four workers", |v| {
        v["workers"].as_array().unwrap().len() == 4 && v["pending_epoch"].is_null()
    });
    let requests = requests();
    let expected: Vec<Value> = requests
        .iter()
        .map(|r| post(&http, "/v1/completions", r).unwrap()["choices"][0].clone())
        .collect();
    let (first_tx, first_rx) = mpsc::channel();
    let clients: Vec<_> = requests
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["stream"] = json!(true);
            let (http, first) = (http.clone(), first_tx.clone());
            std::thread::spawn(move || stream(&http, "/v1/completions", &r, first))
        })
        .collect();
    // Disrupt an attention worker that reports running sequences (its load, as the
    // gateway sees it through the coordinator).
    first_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let victim = busy_attention_worker(&http, &status);
    let disrupted = Instant::now();
    disrupt(&victim, &coordinators);
    let mut stall = Duration::ZERO;
    for (i, (c, want)) in clients.into_iter().zip(&expected).enumerate() {
        let got = c
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(got.text, want["text"].as_str().unwrap(), "request {i}");
        // Token for token, sampled ones included.
        let want_ids: Vec<u64> = serde_json::from_value(want["token_ids"].clone()).unwrap();
        assert_eq!(got.ids, want_ids, "request {i}");
        assert_eq!(
            got.finish,
            want["finish_reason"].as_str().unwrap(),
            "request {i}"
        );
        stall = stall.max(got.gap_max);
    }
    let migrations = metric(
        &common::metrics(&http),
        "expertmesh_request_migrations_total",
    )
    .expect("the migrations counter");
    eprintln!(
        "{what} of attention worker {}: {migrations} requests migrated, longest stall a \
         client saw {:.0} ms, all done {:.0} ms after",
        victim["id"],
        stall.as_secs_f64() * 1e3,
        disrupted.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        migrations >= 1.0,
        "no request was streaming from the disrupted worker"
    );
    // New requests go to the other worker.
    let after = post(&http, "/v1/completions", &requests[0]).unwrap();
    assert_eq!(after["choices"][0]["text"], expected[0]["text"]);
    stall
}

/// The pid of the first live worker of `role` in `status`.
fn worker_pid(status: &Value, role: &str) -> u64 {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["role"] == role && w["status"] == "alive")
        .unwrap_or_else(|| panic!("no live {role}: {status}"))["pid"]
        .as_u64()
        .unwrap()
}

/// A node `kill -9`'d (or frozen with `kill -STOP`) under load.
#[derive(Clone, Copy, Debug)]
enum Victim {
    ExpertWorker,
    AttentionWorker,
    /// The leader coordinator (whose gateway the front door uses first, as it started first).
    Leader,
    /// Frozen, not killed: its connections stay open and nothing answers on them.
    FrozenExpertWorker,
    FrozenAttentionWorker,
    /// Coordinator 1, whose gateway the front door uses first.
    FrozenFirstCoordinator,
}

/// Through `up`'s one URL, 8 clients for 26 s while, 6 s apart, an expert worker, an
/// attention worker and the leader coordinator are killed with `kill -9`: no request fails,
/// and every text is the single process's.
#[test]
fn nothing_fails_while_a_node_of_each_role_dies() {
    nothing_fails_while(&[
        Victim::ExpertWorker,
        Victim::AttentionWorker,
        Victim::Leader,
    ]);
}

/// The same with one expert worker killed alone.
#[test]
fn nothing_fails_while_an_expert_worker_dies() {
    nothing_fails_while(&[Victim::ExpertWorker]);
}

/// The same with the leader coordinator killed alone.
#[test]
fn nothing_fails_while_the_leader_coordinator_dies() {
    nothing_fails_while(&[Victim::Leader]);
}

/// The same with a node of each role frozen (`kill -STOP`) instead: nothing is reset, the
/// silence itself must be noticed (the lease for the expert worker, keepalive pings for the
/// attention worker, the front door's probes for the gateway).
#[test]
fn nothing_fails_while_a_node_of_each_role_freezes() {
    nothing_fails_while(&[
        Victim::FrozenExpertWorker,
        Victim::FrozenAttentionWorker,
        Victim::FrozenFirstCoordinator,
    ]);
}

/// `up --coordinators 3 --expert-workers 3 --attention-workers 2 --replicas 2`, 8 clients
/// through its one URL, each of `victims` killed 6 s after the one before, 8 s more after
/// the last: nothing fails, every text is the single process's.
fn nothing_fails_while(victims: &[Victim]) {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny-maverick").display().to_string();
    let expected = single_process_texts(&model);
    let (_up, cluster) = start_up(
        &[
            "--http",
            "127.0.0.1:0",
            "--model",
            &model,
            "--coordinators",
            "3",
            "--expert-workers",
            "3",
            "--attention-workers",
            "2",
            "--replicas",
            "2",
            "--lease-ms",
            "2000",
        ],
        &dir.path().join("up.json"),
    );
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let api = cluster["api"].as_str().unwrap().to_owned();
    let status = wait_status(&coordinators, "a settled cluster", |v| {
        v["leader"].is_u64()
            && v["workers"].as_array().unwrap().len() == 5
            && v["pending_epoch"].is_null()
    });
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = under_load(&api, 8, &stop, &expected);
    let at = |s: u64| {
        let t = started + Duration::from_secs(s);
        std::thread::sleep(t.saturating_duration_since(Instant::now()));
    };
    let mut events = vec![(started, "the start".to_owned())];
    let mut frozen = Vec::new();
    let mut freeze = |pid: u64| {
        signal("-STOP", pid);
        frozen.push(pid);
    };
    for (i, victim) in victims.iter().enumerate() {
        let second = 6 * (i as u64 + 1);
        at(second);
        let what = match victim {
            Victim::FrozenExpertWorker => {
                freeze(worker_pid(&status, "expert-worker"));
                "an expert worker frozen".to_owned()
            }
            Victim::FrozenAttentionWorker => {
                freeze(worker_pid(&status, "attention-worker"));
                "an attention worker frozen".to_owned()
            }
            Victim::FrozenFirstCoordinator => {
                let first = status["coordinators"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["id"] == 1)
                    .unwrap()["pid"]
                    .as_u64()
                    .unwrap();
                freeze(first);
                "coordinator 1 frozen".to_owned()
            }
            Victim::ExpertWorker => {
                kill9(worker_pid(&status, "expert-worker"));
                "kill -9 of an expert worker".to_owned()
            }
            Victim::AttentionWorker => {
                kill9(worker_pid(&status, "attention-worker"));
                "kill -9 of an attention worker".to_owned()
            }
            Victim::Leader => {
                let now = wait_status(&coordinators, "a leader", |v| v["leader"].is_u64());
                let leader = now["leader"].as_u64().unwrap();
                let pid = now["coordinators"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["id"].as_u64() == Some(leader))
                    .unwrap()["pid"]
                    .as_u64()
                    .unwrap();
                let killed = Instant::now();
                kill9(pid);
                wait_status(&coordinators, "a new leader", |v| {
                    v["leader"].as_u64().is_some_and(|l| l != leader)
                });
                eprintln!(
                    "a new leader {:.0} ms after the kill of leader coordinator {leader}",
                    killed.elapsed().as_secs_f64() * 1e3
                );
                format!("kill -9 of leader coordinator {leader}")
            }
        };
        events.push((Instant::now(), format!("{what} ({second} s)")));
    }
    let end = 6 * victims.len() as u64 + 8;
    at(end);
    let all = finish(&stop, clients, &events);
    // A stopped process still dies of SIGKILL.
    frozen.into_iter().for_each(kill9);
    assert!(
        all.ok >= 2 * end as usize,
        "only {} requests in {end} s",
        all.ok
    );
}

/// The status entry of the worker whose process is `pid`.
fn member(coordinators: &str, pid: u32) -> Value {
    common::admin_status(coordinators)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"].as_u64() == Some(u64::from(pid)))
        .unwrap_or_else(|| panic!("no worker with pid {pid}"))
        .clone()
}

/// Every process of a cluster (3 coordinators with their gateways, 3 expert workers with
/// two copies of every expert, 2 attention workers, a front door) restarted one at a time
/// under load: expert workers killed, attention workers drained, coordinators killed, each
/// started again and back in the cluster before the next. No request fails.
#[test]
fn a_rolling_restart_of_every_process_fails_no_request() {
    let model = common::fixture("tiny-maverick").display().to_string();
    let expected = single_process_texts(&model);
    let data = tempfile::tempdir().unwrap();
    let ports = free_ports(6);
    let peers: Vec<String> = (0..3)
        .map(|i| format!("{}=127.0.0.1:{}", i + 1, ports[i]))
        .collect();
    let peers = peers.join(",");
    let gateways: Vec<String> = (3..6).map(|i| format!("127.0.0.1:{}", ports[i])).collect();
    let coordinator_args = |i: usize| -> Vec<String> {
        let dir = data.path().join(format!("c{i}")).display().to_string();
        [
            "coordinator",
            "--id",
            &(i + 1).to_string(),
            "--listen",
            &format!("127.0.0.1:{}", ports[i]),
            "--peers",
            &peers,
            "--data-dir",
            &dir,
            "--model",
            &model,
            "--http",
            &gateways[i],
            "--lease-ms",
            "2000",
            "--min-replicas",
            "2",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let start_args = |a: &[String]| start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut coordinators: Vec<Role> = (0..3).map(|i| start_args(&coordinator_args(i))).collect();
    let list = (0..3)
        .map(|i| format!("127.0.0.1:{}", ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    let worker = |role: &str| common::start_worker(role, &list, &model, &[]);
    let mut experts: Vec<Role> = (0..3).map(|_| worker("expert-worker")).collect();
    let mut attention: Vec<Role> = (0..2).map(|_| worker("attention-worker")).collect();
    let front = start(&[
        "front",
        "--listen",
        "127.0.0.1:0",
        "--gateways",
        &gateways.join(","),
    ]);
    // Settled: a leader, nothing pending, every coordinator answering, three expert
    // workers holding two copies of every expert between them and two attention workers
    // alive, among them `new` (a pid) and not `old`.
    let settled = |what: &str, old: Option<u32>, new: Option<u32>| {
        wait_status(&list, what, |v| {
            let workers = v["workers"].as_array().unwrap();
            let live = |w: &&Value| w["status"] == "alive";
            let count = |role: &str| {
                workers
                    .iter()
                    .filter(live)
                    .filter(|w| w["role"] == role)
                    .filter(|w| role == "attention-worker" || w["experts"].as_u64() > Some(0))
                    .count()
            };
            let has = |pid: u32| {
                workers
                    .iter()
                    .filter(live)
                    .any(|w| w["pid"].as_u64() == Some(u64::from(pid)))
            };
            // Every expert back to two copies (128 experts), so that the next kill leaves one.
            let copies: u64 = workers
                .iter()
                .filter(live)
                .filter_map(|w| w["experts"].as_u64())
                .sum();
            v["leader"].is_u64()
                && v["pending_epoch"].is_null()
                && v["unservable"].is_null()
                && copies >= 2 * 128
                && count("expert-worker") == 3
                && count("attention-worker") == 2
                && old.is_none_or(|p| !has(p))
                && new.is_none_or(has)
                && v["coordinators"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["state"] != "unreachable")
        })
    };
    settled("a settled cluster", None, None);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = under_load(&front.address, 8, &stop, &expected);
    let mut events = vec![(Instant::now(), "the start".to_owned())];
    std::thread::sleep(Duration::from_secs(2));
    for (i, e) in experts.iter_mut().enumerate() {
        let t = Instant::now();
        let old = e.child.id();
        let _ = e.child.kill();
        let _ = e.child.wait();
        events.push((t, format!("kill -9 of expert worker {}", i + 1)));
        *e = worker("expert-worker");
        settled("a new expert worker placed", Some(old), Some(e.child.id()));
        eprintln!(
            "expert worker {} replaced in {:.1} s",
            i + 1,
            t.elapsed().as_secs_f64()
        );
    }
    for (i, a) in attention.iter_mut().enumerate() {
        let t = Instant::now();
        let old = a.child.id();
        let id = member(&list, old)["id"].to_string();
        events.push((t, format!("admin drain of attention worker {}", i + 1)));
        admin_drain(&list, &id);
        let exit = a.child.wait().unwrap();
        assert!(exit.success(), "the drained worker exited with {exit}");
        *a = worker("attention-worker");
        settled("a new attention worker", Some(old), Some(a.child.id()));
        eprintln!(
            "attention worker {} drained and replaced in {:.1} s",
            i + 1,
            t.elapsed().as_secs_f64()
        );
    }
    for (i, c) in coordinators.iter_mut().enumerate() {
        let t = Instant::now();
        let _ = c.child.kill();
        let _ = c.child.wait();
        events.push((t, format!("kill -9 of coordinator {}", i + 1)));
        // Seen down, then back.
        wait_status(&list, "the coordinator seen down", |v| {
            v["coordinators"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["state"] == "unreachable")
        });
        *c = start_args(&coordinator_args(i));
        settled("the coordinator back in the group", None, None);
        // Its gateway serving again, before the next coordinator goes (the group's status
        // can read settled before the new process even listens).
        let give_up = Instant::now() + Duration::from_secs(60);
        while !common::healthy(&gateways[i]) {
            assert!(
                Instant::now() < give_up,
                "gateway {} did not come back",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "coordinator {} restarted in {:.1} s",
            i + 1,
            t.elapsed().as_secs_f64()
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let all = finish(&stop, clients, &events);
    assert!(all.ok >= 50, "only {} requests", all.ok);
}
