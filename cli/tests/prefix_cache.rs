//! Prefix caching through a real cluster: a prompt that begins like one an attention worker
//! is serving goes to that worker (prefix-aware routing, though another worker has more
//! room), is served from its cached blocks, and gives exactly the single process's tokens.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Every series of `name` (labels included) and its value.
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Polls `/metrics` until `done` holds for the series of `name` (heartbeats carry them).
fn wait_metric(
    http: &str,
    name: &str,
    what: &str,
    done: impl Fn(&[(String, f64)]) -> bool,
) -> Vec<(String, f64)> {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let s = series(&common::metrics(http), name);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < give_up, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn single_process(model: &str, ids: &[u32], max_tokens: usize) -> Value {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    common::json_out(&common::expertmesh(&[
        "generate",
        "--model",
        model,
        "--input-ids",
        &ids.join(","),
        "--max-tokens",
        &max_tokens.to_string(),
        "--json",
    ]))
}

#[test]
fn a_shared_prefix_goes_to_its_holder_and_changes_no_token() {
    let model = common::fixture("tiny-maverick").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (_up, cluster) = common::start_up(
        &[
            "--tls",
            "--http",
            "127.0.0.1:0",
            "--model",
            &model,
            "--attention-workers",
            "2",
            "--expert-workers",
            "2",
        ],
        &dir.path().join("up.json"),
    );
    let http = cluster["http"][0].as_str().unwrap().to_owned();
    let prefix: Vec<u32> = (0..150).map(|j| (j * 37 + 11) % 690).collect();
    // A long stream of the prefix keeps one worker busy (fewer free blocks than the other).
    let mut holder_stream = std::net::TcpStream::connect(&http).unwrap();
    let body = json!({"prompt": prefix, "max_tokens": 3000, "temperature": 0,
                      "ignore_eos": true, "stream": true})
    .to_string();
    write!(
        holder_stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = String::new();
    let mut reader = BufReader::new(holder_stream);
    while !first.starts_with("data:") {
        first.clear();
        reader.read_line(&mut first).unwrap();
    }
    let running = wait_metric(
        &http,
        "expertmesh_running_sequences",
        "a worker reports the stream",
        |s| s.iter().any(|(_, v)| *v >= 1.0),
    );
    let holder = running
        .iter()
        .find(|(_, v)| *v >= 1.0)
        .unwrap()
        .0
        .replace("expertmesh_running_sequences", "");
    // Follow-ups that begin with the prefix: to the holder, from its cache, the single
    // process's tokens.
    for suffix in [[601u32, 602, 603], [7, 8, 9]] {
        let prompt = [&prefix[..], &suffix[..]].concat();
        let reply = common::post(
            &http,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "return_token_ids": true}),
        )
        .unwrap();
        let single = single_process(&model, &prompt, 8);
        assert_eq!(reply["choices"][0]["text"], single["text"], "{reply}");
    }
    let hits = wait_metric(
        &http,
        "expertmesh_prefix_cache_hit_tokens_total",
        "a worker reports the follow-ups' cache hits (144 tokens each)",
        |s| s.iter().any(|(_, v)| *v >= 288.0),
    );
    for (name, value) in &hits {
        if name.ends_with(&holder) {
            // The first 144 tokens (9 blocks of 16) of each follow-up.
            assert!(*value >= 288.0, "the holder: {hits:?}");
        } else {
            assert_eq!(*value, 0.0, "the other worker got a follow-up: {hits:?}");
        }
    }
    let rate = series(&common::metrics(&http), "expertmesh_prefix_cache_hit_rate");
    assert!(rate[0].1 > 0.0, "{rate:?}");
}
