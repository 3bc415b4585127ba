//! Load for the fault tests: clients sending greedy completions through one URL (streamed
//! and whole in turn) and checking every text against the single process's, and the sum of
//! what they saw.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::post;

/// What a streamed completion gave: its text and finish reason, and the longest silence
/// between two events after the first.
pub struct Streamed {
    pub text: String,
    /// The token ids, when the request asked for them (`return_token_ids`).
    pub ids: Vec<u64>,
    pub finish: String,
    pub gap_max: Duration,
    /// When the longest silence ended.
    pub gap_end: Instant,
}

/// POSTs a streaming request (HTTP/1.0: the body is the raw event stream), signals `first`
/// when the first piece of text is in, and reads the events to `[DONE]`.
pub fn stream(
    http: &str,
    path: &str,
    body: &Value,
    first: mpsc::Sender<()>,
) -> Result<Streamed, String> {
    let mut s = std::net::TcpStream::connect(http).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(s).lines();
    let status = lines.next().ok_or("no reply")?.map_err(|e| e.to_string())?;
    if !status.contains(" 200") {
        return Err(status);
    }
    let (mut text, mut finish, mut ids) = (String::new(), None, Vec::new());
    let (mut last, mut gap_max, mut signalled) = (None::<Instant>, Duration::ZERO, false);
    let mut gap_end = Instant::now();
    for line in lines {
        let line = line.map_err(|e| format!("after {text:?}: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if let Some(t) = last {
            if t.elapsed() > gap_max {
                (gap_max, gap_end) = (t.elapsed(), Instant::now());
            }
        }
        last = Some(Instant::now());
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if v.get("error").is_some() {
            return Err(format!("error event after {text:?}: {v}"));
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        let piece = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str())
            .unwrap_or("");
        text.push_str(piece);
        if let Some(got) = choice["token_ids"].as_array() {
            ids.extend(got.iter().filter_map(Value::as_u64));
        }
        if !piece.is_empty() && !signalled {
            signalled = true;
            let _ = first.send(());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    let finish = finish.ok_or_else(|| format!("no finish reason after {text:?}"))?;
    Ok(Streamed {
        text,
        ids,
        finish,
        gap_max,
        gap_end,
    })
}

/// What the clients of [`under_load`] saw.
#[derive(Default)]
pub struct Tally {
    pub ok: usize,
    pub failed: Vec<String>,
    /// The longest silence inside each streamed answer, and when it ended.
    pub stalls: Vec<(Instant, Duration)>,
}

/// `clients` threads sending requests through `api` until `stop` is set: streamed and
/// whole in turn, greedy, each prompt's text checked against `expected` (prompt, text).
pub fn under_load(
    api: &str,
    clients: usize,
    stop: &Arc<AtomicBool>,
    expected: &[(Vec<u32>, String)],
) -> Vec<std::thread::JoinHandle<Tally>> {
    (0..clients)
        .map(|c| {
            let (api, expected, stop) = (api.to_owned(), expected.to_vec(), stop.clone());
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let (prompt, want) = &expected[i % expected.len()];
                    let mut r = json!({"prompt": prompt, "max_tokens": MAX_TOKENS,
                                       "temperature": 0});
                    let got = if i % 2 == 0 {
                        r["stream"] = json!(true);
                        let (tx, _rx) = mpsc::channel();
                        stream(&api, "/v1/completions", &r, tx).map(|s| {
                            tally.stalls.push((s.gap_end, s.gap_max));
                            s.text
                        })
                    } else {
                        post(&api, "/v1/completions", &r)
                            .map(|v| v["choices"][0]["text"].as_str().unwrap_or("").to_owned())
                    };
                    match got {
                        Ok(text) if text == *want => tally.ok += 1,
                        Ok(text) => tally
                            .failed
                            .push(format!("{prompt:?}: {text:?} != {want:?}")),
                        Err(e) => tally.failed.push(e),
                    }
                    i += 1;
                }
                tally
            })
        })
        .collect()
}

pub const MAX_TOKENS: u32 = 48;

/// The single process's greedy text for each of a few prompts.
pub fn single_process_texts(model: &str) -> Vec<(Vec<u32>, String)> {
    (0..4u32)
        .map(|k| {
            let prompt: Vec<u32> = (10 * k + 1..10 * k + 20).collect();
            let ids = prompt
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let out = super::json_out(&super::expertmesh(&[
                "generate",
                "--model",
                model,
                "--input-ids",
                &ids,
                "--max-tokens",
                &MAX_TOKENS.to_string(),
                "--json",
            ]));
            (prompt, out["text"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// Stops the clients and sums what they saw; prints, after each of `events` (when, what),
/// the longest silence a stream saw before the next event; asserts that nothing failed.
pub fn finish(
    stop: &AtomicBool,
    clients: Vec<std::thread::JoinHandle<Tally>>,
    events: &[(Instant, String)],
) -> Tally {
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for c in clients {
        let t = c.join().unwrap();
        all.ok += t.ok;
        all.failed.extend(t.failed);
        all.stalls.extend(t.stalls);
    }
    for (i, (at, what)) in events.iter().enumerate() {
        let next = events.get(i + 1).map(|e| e.0);
        let longest = all
            .stalls
            .iter()
            .filter(|(end, _)| end >= at && next.is_none_or(|n| *end < n))
            .map(|s| s.1)
            .max()
            .unwrap_or_default();
        eprintln!(
            "after {what}: longest silence inside a stream {:.0} ms",
            longest.as_secs_f64() * 1e3
        );
    }
    eprintln!("{} requests answered, {} failed", all.ok, all.failed.len());
    assert!(all.failed.is_empty(), "failed: {:#?}", all.failed);
    all
}

/// Free loopback ports for processes a test starts, and may start again, on fixed ports.
/// They are drawn below the system's ephemeral range, where `bind(…:0)` and outgoing
/// connections take their ports from: between this check and a process binding one (or
/// binding it again after a restart), no connection can take it, whatever else runs.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::hash::BuildHasher;
    const FLOOR: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low < FLOOR + 1_000 {
        // No room below the range here: bound and released.
        let held: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        return held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
    }
    let random = std::collections::hash_map::RandomState::new();
    let mut ports = Vec::with_capacity(n);
    let mut draw = 0u64;
    while ports.len() < n {
        assert!(draw < 10_000, "no free port below {ephemeral_low}");
        let span = u64::from(ephemeral_low - FLOOR);
        let port = (u64::from(FLOOR) + random.hash_one(draw) % span) as u16;
        draw += 1;
        if !ports.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}
