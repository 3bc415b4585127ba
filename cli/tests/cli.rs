//! The `expertmesh` binary as a user runs it: `generate` against the fixtures' reference
//! outputs, its error messages, and `bench decode --json`.

mod common;

use common::{expertmesh, fixture, ids_arg, json_out, reference_case};
use serde_json::Value;

#[test]
fn generate_json_reproduces_the_greedy_reference() {
    for model in ["tiny-maverick", "tiny-scout"] {
        let case = reference_case(&fixture(model), "long");
        let expected = &case["greedy_new_ids"];
        let n = expected.as_array().unwrap().len().to_string();
        let ids = ids_arg(&case["input_ids"]);
        let dir = fixture(model);
        let out = expertmesh(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--input-ids",
            &ids,
            "--max-tokens",
            &n,
            "--ignore-eos",
            "--json",
        ]);
        let v = json_out(&out);
        assert_eq!(&v["output_ids"], expected, "{model}");
        assert_eq!(v["input_ids"], case["input_ids"]);
        assert_eq!(v["finish_reason"], "length");
    }
}

/// Without `--model`, the demo model `up` serves (its own tokenizer and references).
#[test]
fn generate_tokenizes_prompts_like_transformers() {
    let case = reference_case(&common::demo_model(), "short");
    let out = expertmesh(&[
        "generate",
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    let v = json_out(&out);
    assert_eq!(v["input_ids"], case["input_ids"]);
    assert_eq!(v["output_ids"], case["greedy_new_ids"]);
    assert_eq!(v["text"], case["decoded_greedy_text"]);

    // Streaming text mode prints the same text.
    let out = expertmesh(&[
        "generate",
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "12",
        "--ignore-eos",
    ]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    let text = case["decoded_greedy_text"].as_str().unwrap();
    assert_eq!(
        printed.trim_end_matches('\n'),
        text.trim_end_matches('\u{fffd}')
    );
}

#[test]
fn chat_prompt_has_one_bos_and_the_generation_prompt() {
    let model = fixture("tiny-maverick");
    let out = expertmesh(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "2",
        "--json",
    ]);
    let v = json_out(&out);
    let ids: Vec<u64> = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // <|begin_of_text|> = 697, <|header_start|> = 702, <|header_end|> = 703 in the fixture.
    assert_eq!(ids[0], 697);
    assert_eq!(ids.iter().filter(|&&i| i == 697).count(), 1);
    assert_eq!(
        ids.iter().filter(|&&i| i == 702).count(),
        2,
        "user and assistant headers"
    );
    assert_eq!(&ids[ids.len() - 3..], &[703, 198, 198]);
}

#[test]
fn dump_logits_matches_the_reference() {
    let case = reference_case(&fixture("tiny-scout"), "random_ids");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("logits.safetensors");
    let model = fixture("tiny-scout");
    let out = expertmesh(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        &ids_arg(&case["input_ids"]),
        "--max-tokens",
        "1",
        "--json",
        "--dump-logits",
        file.to_str().unwrap(),
    ]);
    json_out(&out);
    let got = std::fs::read(&file).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let got = got.tensor("logits").unwrap();
    let reference = std::fs::read(model.join("reference.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let expected = reference.tensor("random_ids.logits").unwrap();
    assert_eq!(got.shape(), expected.shape());
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let worst = f32s(got.data())
        .iter()
        .zip(f32s(expected.data()))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 2e-3, "{worst}");
}

/// Stop ids come from `generation_config.json`: with the fixture's greedy continuation
/// [628, 556, ...] and 556 made a stop id, generation ends after two tokens.
#[test]
fn stop_ids_end_generation_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("tiny-maverick")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [556, 1]}"#,
    )
    .unwrap();
    let case = reference_case(&fixture("tiny-maverick"), "short");
    let ids = ids_arg(&case["input_ids"]);
    let model = dir.path().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--input-ids",
        &ids,
        "--max-tokens",
        "8",
        "--json",
    ];
    let v = json_out(&expertmesh(&args));
    assert_eq!(v["output_ids"], serde_json::json!([628, 556]));
    assert_eq!(v["finish_reason"], "stop");
    let mut ignoring = args.to_vec();
    ignoring.push("--ignore-eos");
    let v = json_out(&expertmesh(&ignoring));
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 8);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn errors_are_clear_and_exit_nonzero() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["generate", "--input-ids", "1,99999", "--max-tokens", "1"],
            "outside the vocabulary",
        ),
        (
            &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
            "/nonexistent/model",
        ),
        (
            &["generate", "--prompt", "x", "--max-tokens", "100000"],
            "exceeds the context",
        ),
        (&["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
        (&["generate", "--input-ids", "1,x"], "invalid value"),
    ];
    for (args, needle) in cases {
        let out = expertmesh(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A role whose port (its own or its metrics') is taken exits with the status `up` starts
/// its cluster again on: 98, EADDRINUSE.
#[test]
fn a_taken_port_exits_with_its_own_status() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let model = fixture("tiny-maverick").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let coordinator = [
        "coordinator",
        "--id",
        "1",
        "--model",
        &model,
        "--data-dir",
        &data,
    ];
    for extra in [["--listen", &taken], ["--metrics", &taken]] {
        let mut args = coordinator.to_vec();
        args.extend(extra);
        if extra[0] == "--metrics" {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        let out = expertmesh(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(98), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("listening on {taken}")),
            "{stderr}"
        );
    }
}

#[test]
fn bench_decode_reports_json() {
    let model = fixture("tiny-scout");
    let out = expertmesh(&[
        "bench",
        "decode",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "8,40",
        "--steps",
        "2",
        "--batch",
        "1,3",
        "--json",
    ]);
    let v = json_out(&out);
    assert!(v["memcpy_gbps"].as_f64().unwrap() > 0.0);
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    // One prefill point per length, each with the KV cache's bytes per token.
    let prefill = v["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), 2);
    assert_eq!(prefill[1]["prompt_tokens"], 40);
    assert!(prefill
        .iter()
        .all(|p| p["kv_bytes_per_token"].as_f64().unwrap() > 0.0));
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(decode.len(), 2);
    assert_eq!(decode[1]["batch"], 3);
    assert!(decode[0]["ratio_to_floor"].as_f64().unwrap() > 0.0);
    assert!(v["expert_swiglu_gflops"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_transfer_reports_json() {
    let model = fixture("tiny-maverick");
    let out = expertmesh(&[
        "bench",
        "transfer",
        "--model",
        model.to_str().unwrap(),
        "--runs",
        "1",
        "--json",
    ]);
    let v = json_out(&out);
    assert_eq!(v["experts"], 128);
    assert!(v["bytes"].as_u64().unwrap() > 0);
    for baseline in ["raw_tcp_mb_per_s", "raw_tcp_landed_mb_per_s"] {
        assert!(v[baseline].as_f64().unwrap() > 0.0, "{v}");
    }
    let transports = v["transports"].as_array().unwrap();
    assert_eq!(transports.len(), 2);
    for t in transports {
        assert!(t["ratio"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["ratio_to_landed"].as_f64().unwrap() > 0.0, "{t}");
    }
}

/// A worker with the files and a weightless one over framed TCP each join a fresh cluster of
/// the tiny checkpoint and are given experts (the weightless one only once every byte it
/// fetched is verified).
#[test]
fn bench_join_reports_json() {
    let model = fixture("tiny-maverick");
    let out = expertmesh(&[
        "bench",
        "join",
        "--model",
        model.to_str().unwrap(),
        "--runs",
        "1",
        "--transport",
        "tcp",
        "--json",
    ]);
    let v = json_out(&out);
    assert_eq!(v["experts"], 128);
    assert!(v["expert_mb"].as_f64().unwrap() > 0.0, "{v}");
    let joins = v["joins"].as_array().unwrap();
    let from: Vec<&str> = joins.iter().map(|j| j["from"].as_str().unwrap()).collect();
    assert_eq!(from, ["files", "tcp"]);
    for j in joins {
        assert!(j["experts"].as_u64().unwrap() > 0, "{j}");
        let committed = j["seconds_to_committed"].as_f64().unwrap();
        assert!(
            committed >= j["seconds_to_planned"].as_f64().unwrap(),
            "{j}"
        );
        assert!(j["mb_per_s"].as_f64().unwrap() > 0.0, "{j}");
        assert!(j["ratio_to_files"].as_f64().unwrap() > 0.0, "{j}");
    }
}

/// One process runs both ends of the dispatch link: under TLS (as every process of these
/// tests) its server presents the expert worker's certificate and its clients the admin's.
#[test]
fn bench_dispatch_reports_json() {
    let out = expertmesh(&[
        "bench",
        "dispatch",
        "--hidden",
        "64",
        "--tokens",
        "1,4",
        "--iterations",
        "3",
        "--transports",
        "grpc,tcp",
        "--json",
    ]);
    let v = json_out(&out);
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{v}");
    for p in points {
        let transports = p["transports"].as_array().unwrap();
        assert_eq!(transports.len(), 2, "{p}");
        for t in transports {
            assert!(t["p50_us"].as_f64().unwrap() > 0.0, "{t}");
        }
    }
}

#[test]
fn placement_sim_beats_round_robin_and_reads_a_measured_load() {
    let plan = [
        "placement-sim",
        "--workers",
        "8",
        "--redundancy",
        "16",
        "--layers",
        "4",
        "--replans",
        "2",
        "--json",
    ];
    let out = expertmesh(&plan);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["workers"], 8);
    assert_eq!(v["redundancy"], 16);
    let balance = v["balance"].as_f64().unwrap();
    assert!((1.0..1.05).contains(&balance), "{v}");
    assert!(v["baseline_balance"].as_f64().unwrap() > 1.5, "{v}");
    assert!(v["bytes_moved"].as_f64().unwrap() < v["scratch_bytes_moved"].as_f64().unwrap());
    // The same plans of FP8 experts move about half the bytes.
    let args = [&plan[..], &["--expert-dtype", "fp8"]].concat();
    let fp8: Value = serde_json::from_slice(&expertmesh(&args).stdout).unwrap();
    let ratio = fp8["bytes_moved"].as_f64().unwrap() / v["bytes_moved"].as_f64().unwrap();
    assert!((0.5..0.502).contains(&ratio), "{ratio}");
    assert_eq!(fp8["balance"], v["balance"]);

    let dir = tempfile::tempdir().unwrap();
    let load = dir.path().join("load.json");
    // Two layers of eight experts; expert 3 is hot in the first.
    std::fs::write(&load, "[[1,1,1,40,1,1,1,1],[2,2,2,2,2,2,2,2]]").unwrap();
    let out = expertmesh(&[
        "placement-sim",
        "--load",
        load.to_str().unwrap(),
        "--workers",
        "4",
        "--redundancy",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["balance"].as_f64().unwrap() < v["baseline_balance"].as_f64().unwrap(),
        "{v}"
    );
    std::fs::write(&load, "[[1,2],[3]]").unwrap();
    let out = expertmesh(&["placement-sim", "--load", load.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("same"));
}

#[test]
fn device_flag_is_checked_before_any_work() {
    let model = fixture("tiny-maverick").display().to_string();
    let out = expertmesh(&[
        "generate", "--model", &model, "--prompt", "hi", "--device", "cuda:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built without CUDA"), "{err}");
    let out = expertmesh(&[
        "generate", "--model", &model, "--prompt", "hi", "--device", "gpu",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a device"));
    let out = expertmesh(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "hi",
        "--device",
        "cpu",
        "--max-tokens",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `quantize` reproduces the FP8 fixtures from their bf16 sources: every tensor's dtype,
/// shape and bytes (FP8.md §4's double rounding included), the same `ignore` list and
/// config groups; a quantized checkpoint is not quantized again.
#[test]
fn quantize_reproduces_the_fp8_fixtures() {
    use safetensors::SafeTensors;
    use std::collections::BTreeSet;
    let tensors = |dir: &std::path::Path| -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let files: BTreeSet<String> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect();
        let mut all = Vec::new();
        for f in files {
            let bytes = std::fs::read(dir.join(f)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, t) in st.tensors() {
                all.push((
                    name,
                    format!("{:?}", t.dtype()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                ));
            }
        }
        all.sort();
        all
    };
    let quantization = |dir: &std::path::Path| -> (BTreeSet<String>, Value) {
        let c: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let q = &c["quantization_config"];
        let ignore = q["ignore"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        (ignore, q["config_groups"].clone())
    };
    for name in ["tiny-maverick", "tiny-scout"] {
        let out = tempfile::tempdir().unwrap();
        let dst = out.path().join("fp8");
        let src = fixture(name);
        let run = expertmesh(&[
            "quantize",
            "--model",
            src.to_str().unwrap(),
            "--out",
            dst.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let want = fixture(&format!("{name}-fp8"));
        let (got_t, want_t) = (tensors(&dst), tensors(&want));
        assert_eq!(got_t.len(), want_t.len(), "{name}: tensor count");
        for (g, w) in got_t.iter().zip(&want_t) {
            assert!(g == w, "{name}: tensor {} differs", w.0);
        }
        assert_eq!(
            quantization(&dst),
            quantization(&want),
            "{name}: quantization_config"
        );
        // Quantizing twice is refused.
        let again = expertmesh(&[
            "quantize",
            "--model",
            dst.to_str().unwrap(),
            "--out",
            out.path().join("again").to_str().unwrap(),
        ]);
        assert!(!again.status.success());
    }
}
