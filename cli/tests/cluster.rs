//! Clusters of real `expertmesh` processes on loopback against the single process: the
//! same tokens and the same logits, bit for bit, with 1 to 4 expert workers, with a worker
//! that owns no expert, and a clear error (not a hang) when an expert worker dies.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{expertmesh, ids_arg, reference_case, root, start, start_worker};
use serde_json::Value;

fn fixture(name: &str) -> String {
    common::fixture(name).display().to_string()
}

fn long_case(model: &str) -> (String, usize) {
    let case = reference_case(&common::fixture(model), "long");
    (
        ids_arg(&case["input_ids"]),
        case["greedy_new_ids"].as_array().unwrap().len(),
    )
}

/// `generate --json --dump-logits` with `args`: its output and the dumped logits.
fn generate_with_logits(args: &[&str]) -> (Value, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("logits.safetensors");
    let mut all = vec!["generate", "--ignore-eos", "--json", "--dump-logits"];
    all.push(logits.to_str().unwrap());
    all.extend_from_slice(args);
    let out = expertmesh(&all);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).unwrap(),
        std::fs::read(&logits).unwrap(),
    )
}

/// `generate` output and dumped logits for one configuration (`extra` adds flags).
fn run_generate(model: &str, extra: &[&str]) -> (Value, Vec<u8>) {
    let (ids, n) = long_case(model);
    let n = n.to_string();
    let path = fixture(model);
    let mut args = vec!["--model", &path, "--input-ids", &ids, "--max-tokens", &n];
    args.extend_from_slice(extra);
    generate_with_logits(&args)
}

#[test]
fn clusters_of_1_to_4_expert_workers_equal_the_single_process() {
    for model in ["tiny-maverick", "tiny-scout"] {
        let (single, single_logits) = run_generate(model, &[]);
        for n in ["1", "2", "3", "4"] {
            let (cluster, cluster_logits) = run_generate(model, &["--expert-workers", n]);
            assert_eq!(cluster, single, "{model} with {n} expert workers");
            assert!(
                cluster_logits == single_logits,
                "{model} with {n} expert workers: logits differ"
            );
        }
    }
}

/// Framed TCP dispatch (`--dispatch tcp`, to the expert workers' same ports) gives the
/// single process's tokens and logits bit for bit, in f32 and, for FP8 experts, in fp8.
#[test]
fn tcp_dispatch_clusters_equal_the_single_process() {
    for (model, wire) in [("tiny-maverick", "f32"), ("tiny-maverick-fp8", "fp8")] {
        let (single, single_logits) = run_generate(model, &[]);
        let (cluster, cluster_logits) = run_generate(
            model,
            &[
                "--expert-workers",
                "2",
                "--dispatch",
                "tcp",
                "--wire-dtype",
                wire,
            ],
        );
        assert_eq!(cluster, single, "{model}, {wire} over framed tcp");
        assert!(
            cluster_logits == single_logits,
            "{model}, {wire} over framed tcp: logits differ"
        );
    }
}

/// FP8 experts (compressed-tensors checkpoints) held and computed by expert workers give
/// the single process's tokens and logits, bit for bit, with f32 and with fp8 on the wire
/// (the experts' own input quantization, done before the trip). A bf16 model asked for fp8
/// sends f32 (its experts do not quantize their inputs) and is exact too.
#[test]
fn fp8_clusters_equal_the_single_process() {
    for model in ["tiny-maverick-fp8", "tiny-scout-fp8", "tiny-maverick"] {
        let (single, single_logits) = run_generate(model, &[]);
        let wires: &[&str] = if model.ends_with("fp8") {
            &["f32", "fp8"]
        } else {
            &["fp8"]
        };
        for &wire in wires {
            for n in ["1", "3"] {
                let (cluster, cluster_logits) =
                    run_generate(model, &["--expert-workers", n, "--wire-dtype", wire]);
                let what = format!("{model} with {n} expert workers, {wire} on the wire");
                assert_eq!(cluster, single, "{what}");
                assert!(cluster_logits == single_logits, "{what}: logits differ");
            }
        }
    }
}

/// Standalone roles: a coordinator, an expert worker that may hold no expert, one that
/// holds them all, and an attention worker serving `Generate`.
#[test]
fn an_expert_worker_without_experts_changes_nothing() {
    let model = fixture("tiny-scout");
    let (coordinator, _data) = common::start_coordinator(&model);
    let c = coordinator.address.as_str();
    let _empty = start_worker("expert-worker", c, &model, &["--capacity", "0"]);
    let _full = start_worker("expert-worker", c, &model, &[]);
    let attention = start_worker("attention-worker", c, &model, &[]);
    common::install_tls();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let view = rt.block_on(async {
        let client = expertmesh_coordinator::CoordinatorClient::new(c).unwrap();
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            let v = client.state().await.unwrap();
            if v.members.len() == 3 && v.unservable.is_none() {
                return v;
            }
            assert!(Instant::now() < give_up, "cluster not ready: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // By capacity, not by the order the two workers happened to register in.
    let mut held: Vec<(Option<usize>, usize)> = view
        .members
        .iter()
        .filter(|m| m.role == expertmesh_coordinator::Role::ExpertWorker)
        .map(|m| (m.capacity, view.placement.experts_of(m.id).len()))
        .collect();
    held.sort();
    assert_eq!(held, vec![(None, 16), (Some(0), 0)]);
    let (single, single_logits) = run_generate("tiny-scout", &[]);
    let (remote, remote_logits) =
        run_generate("tiny-scout", &["--attention-worker", &attention.address]);
    assert_eq!(remote, single);
    assert!(remote_logits == single_logits, "logits differ");
}

/// `attention-worker --dispatch local`: every routed expert in the attention worker's own
/// process behind the same seam, no expert worker at all: the single process's tokens and
/// logits, bit for bit.
#[test]
fn local_dispatch_serves_without_expert_workers() {
    let model = fixture("tiny-maverick");
    let (coordinator, _data) = common::start_coordinator(&model);
    let attention = start_worker(
        "attention-worker",
        &coordinator.address,
        &model,
        &["--dispatch", "local"],
    );
    let (single, single_logits) = run_generate("tiny-maverick", &[]);
    let (local, local_logits) =
        run_generate("tiny-maverick", &["--attention-worker", &attention.address]);
    assert_eq!(local, single);
    assert!(local_logits == single_logits, "logits differ");
    // `nccl` between processes is refused with the field named, not accepted and hung.
    let out = expertmesh(&[
        "attention-worker",
        "--dispatch",
        "nccl",
        "--coordinator",
        &coordinator.address,
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dispatch.transport"), "{err}");
}

/// `generate --image` (the fixture's image case) and its dumped prefill logits.
fn run_image_generate(extra: &[&str]) -> (Value, Vec<u8>) {
    let model = fixture("tiny-maverick");
    let image = common::fixture("tiny-maverick").join("test-image.png");
    let mut args = vec![
        "--model",
        &model,
        "--chat",
        "--prompt",
        "What is in this picture?",
        "--image",
        image.to_str().unwrap(),
        "--max-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    generate_with_logits(&args)
}

/// An image prompt through remote expert workers — the attention side in `generate`, and a
/// standalone attention worker that receives the encoded image over gRPC and runs the vision
/// tower itself — gives the single process's tokens and prefill logits, bit for bit.
#[test]
fn image_prompts_through_a_cluster_equal_the_single_process() {
    let (single, single_logits) = run_image_generate(&[]);
    let reference = reference_case(&common::fixture("tiny-maverick"), "image");
    assert_eq!(single["input_ids"], reference["input_ids"]);
    assert_eq!(single["output_ids"], reference["greedy_new_ids"]);
    let (cluster, cluster_logits) = run_image_generate(&["--expert-workers", "2"]);
    assert_eq!(cluster, single);
    assert!(cluster_logits == single_logits, "logits differ");

    let model = fixture("tiny-maverick");
    let (coordinator, _data) = common::start_coordinator(&model);
    let c = coordinator.address.as_str();
    let _experts = [
        start_worker("expert-worker", c, &model, &[]),
        start_worker("expert-worker", c, &model, &[]),
    ];
    wait_balanced(c, 2);
    let attention = start_worker("attention-worker", c, &model, &[]);
    let (remote, remote_logits) = run_image_generate(&["--attention-worker", &attention.address]);
    assert_eq!(remote, single);
    assert!(remote_logits == single_logits, "logits differ");
}

/// Waits until every expert worker holds experts and no placement is pending.
fn wait_balanced(coordinator: &str, workers: usize) {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let out = expertmesh(&["admin", "status", "--json", "--coordinators", coordinator]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let holding = v["workers"].as_array().map_or(0, |ws| {
            ws.iter()
                .filter(|w| w["role"] == "expert-worker" && w["experts"].as_u64() > Some(0))
                .count()
        });
        if holding == workers && v["pending_epoch"].is_null() {
            return;
        }
        assert!(Instant::now() < give_up, "placement not balanced: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Killing an expert worker in the middle of a long generation, when the survivor cannot
/// hold the whole model (its capacity is half the experts), ends the request with an error
/// that names the worker, within the dispatch deadline.
#[test]
fn a_killed_expert_worker_is_a_clear_error_not_a_hang() {
    let model = fixture("tiny-maverick");
    let (coordinator, _data) = common::start_coordinator(&model);
    let c = coordinator.address.as_str();
    let mut victim = start_worker("expert-worker", c, &model, &[]);
    let _other = start_worker("expert-worker", c, &model, &["--capacity", "64"]);
    wait_balanced(c, 2);
    let attention = start_worker(
        "attention-worker",
        c,
        &model,
        &["--dispatch-timeout-ms", "3000"],
    );
    // Wait for both workers to hold experts: a first short generation must succeed.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let out = expertmesh(&[
            "generate",
            "--model",
            &model,
            "--attention-worker",
            &attention.address,
            "--input-ids",
            "697,318",
            "--max-tokens",
            "2",
            "--json",
        ]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut client = common::bin()
        .args([
            "generate",
            "--model",
            &model,
            "--attention-worker",
            &attention.address,
            "--input-ids",
            "697,318,676",
            "--max-tokens",
            "4000",
            "--ignore-eos",
        ])
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generation is under way once text arrives.
    let mut stdout = client.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "generation hung after the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "generation survived the kill");
    assert!(stderr.contains("expert worker"), "{stderr}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        killed_at.elapsed()
    );
}

/// Without a second copy, killing an expert worker mid-generation makes the dispatches wait
/// until the coordinator re-places its experts on the survivor (after the worker's lease):
/// the generation finishes, with the same tokens as without the kill.
#[test]
fn a_killed_expert_worker_without_copies_is_replaced_and_nothing_fails() {
    let model = fixture("tiny-maverick");
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    let coordinator = start(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--data-dir",
        &data_dir,
        "--lease-ms",
        "1000",
    ]);
    let c = coordinator.address.as_str();
    let mut victim = start_worker("expert-worker", c, &model, &[]);
    let _other = start_worker("expert-worker", c, &model, &[]);
    wait_balanced(c, 2);
    let attention = start_worker("attention-worker", c, &model, &[]);
    let args = [
        "generate",
        "--model",
        &model,
        "--attention-worker",
        &attention.address,
        "--input-ids",
        "697,318,676",
        "--max-tokens",
        "1500",
        "--ignore-eos",
    ];
    let reference = expertmesh(&args);
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let mut client = common::bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Text streams out as it is generated: kill once the first byte is here.
    let mut stdout = client.stdout.take().unwrap();
    let mut text = vec![0u8; 1];
    stdout.read_exact(&mut text).unwrap();
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    stdout.read_to_end(&mut text).unwrap();
    let status = client.wait().unwrap();
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(text, reference.stdout);
}

/// `up` with `flags` serves the OpenAI API and gives the single process's greedy text.
fn up_serves_the_single_process_text(model: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture(model);
    let mut args = vec!["--http", "127.0.0.1:0", "--model", &model];
    args.extend_from_slice(flags);
    let (_up, cluster) = common::start_up(&args, &dir.path().join("up.json"));
    let http = cluster["http"][0].as_str().unwrap().to_owned();
    let ids = [697u32, 318, 676, 661, 546];
    let reply = common::post(
        &http,
        "/v1/completions",
        &serde_json::json!({"prompt": ids, "max_tokens": 6, "temperature": 0}),
    )
    .unwrap();
    assert_eq!(reply["usage"]["completion_tokens"], 6, "{reply}");
    let single = common::json_out(&expertmesh(&[
        "generate",
        "--model",
        &model,
        "--input-ids",
        "697,318,676,661,546",
        "--max-tokens",
        "6",
        "--json",
    ]));
    assert_eq!(
        reply["choices"][0]["text"], single["text"],
        "{flags:?}: {reply}"
    );
}

/// `up --expert-workers 0 --dispatch local`: a single-node deployment with no expert worker
/// serves the OpenAI API (the gateway routes to attention workers that hold every expert
/// themselves) and gives the single process's greedy text.
#[test]
fn up_with_local_dispatch_serves_the_api() {
    up_serves_the_single_process_text(
        "tiny-maverick",
        &["--expert-workers", "0", "--dispatch", "local"],
    );
}

/// `up --dispatch tcp`: the attention worker reaches the expert workers over framed TCP and
/// the API gives the single process's text.
#[test]
fn up_with_tcp_dispatch_serves_the_api() {
    up_serves_the_single_process_text(
        "tiny-maverick",
        &["--expert-workers", "2", "--dispatch", "tcp"],
    );
}

/// `up --tls`: every process speaks mutual TLS, over gRPC dispatch and over the framed data
/// path, and the API still gives the single process's text, bit for bit.
#[test]
fn up_with_tls_serves_the_single_process_text() {
    for dispatch in ["grpc", "tcp"] {
        up_serves_the_single_process_text(
            "tiny-maverick",
            &["--tls", "--expert-workers", "2", "--dispatch", dispatch],
        );
    }
}

/// `up --wire-dtype fp8` on an FP8 checkpoint: expert workers get the rows in fp8 and the API
/// gives the single process's text.
#[test]
fn up_with_an_fp8_wire_serves_the_api() {
    up_serves_the_single_process_text(
        "tiny-maverick-fp8",
        &["--expert-workers", "2", "--wire-dtype", "fp8"],
    );
}
