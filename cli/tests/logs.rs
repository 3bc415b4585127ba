//! `up --log-format json`: every line every process writes is one JSON object, and a
//! request's `traceparent` reaches the lines of the gateway, of the attention worker that
//! served it, and of the expert workers that computed its rows.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[test]
fn a_traceparent_reaches_every_process_that_serves_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("up.log");
    let mut up = common::Kill(
        common::bin()
            .args(["up", "--http", "127.0.0.1:0", "--log-format", "json"])
            .env("EXPERTMESH_UP_FILE", dir.path().join("up.json"))
            .env("RUST_LOG", "info,expertmesh_expert_worker=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    for line in BufReader::new(up.0.stdout.take().unwrap()).lines() {
        if line.unwrap().starts_with("Ctrl-C") {
            break;
        }
    }
    let cluster: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("up.json")).unwrap()).unwrap();
    let http = cluster["http"][0].as_str().unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = json!({"prompt": [10, 20, 30], "max_tokens": 3, "temperature": 0}).to_string();
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // The lines with the trace id: the gateway's request span, the attention worker's
    // generate and finished.
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let traced = |message: &str| {
            lines.iter().any(|l| {
                l["message"] == message
                    && (l["trace_id"] == trace || l["span"]["trace_id"] == trace)
            })
        };
        // The expert workers' merged batches name the requests whose rows they computed.
        let expert_line = lines.iter().any(|l| {
            l["message"] == "computed a merged batch"
                && l["traces"].as_str().is_some_and(|t| t.contains(trace))
        });
        if traced("request") && traced("generate") && traced("finished") && expert_line {
            assert!(lines
                .iter()
                .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
            break;
        }
        assert!(Instant::now() < give_up, "the trace id is missing:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
