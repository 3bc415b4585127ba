//! Drives load: a closed loop of N concurrent clients, an open loop of Poisson arrivals at
//! a rate, or the arrivals of a recorded trace (the workload's `replay`), for a duration or
//! a number of requests, with a live progress line.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expertmesh_model::sampling::SplitMix64;

use crate::client::{Endpoint, Failure, Outcome};
use crate::report::Report;
use crate::workload::Workload;

/// Requests in flight at most in an open loop; arrivals past it count as `client_overload`.
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// N clients, each sending its next request when the last one ends.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` requests per second.
    Open { rate: f64 },
    /// The arrivals of the workload's replayed trace, `speedup` times faster.
    Replay { speedup: f64 },
}

impl Shape {
    pub fn label(&self) -> String {
        match self {
            Shape::Closed { concurrency } => format!("concurrency={concurrency}"),
            Shape::Open { rate } => format!("rate={rate}"),
            Shape::Replay { speedup } => format!("replay x{speedup}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Run {
    pub endpoint: Endpoint,
    pub workload: Arc<Workload>,
    pub shape: Shape,
    /// Stop starting requests after this long (warm-up included).
    pub duration: Option<Duration>,
    /// Stop after this many requests (warm-up included).
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub progress: bool,
}

type Record = Result<Outcome, (Duration, Failure)>;

struct Shared {
    records: Mutex<Vec<Record>>,
    next: AtomicU64,
    ok: AtomicUsize,
    failed: AtomicUsize,
    tokens: AtomicUsize,
}

impl Run {
    fn more(&self, i: u64, t0: Instant) -> bool {
        // In a multi-turn run, i counts conversations of `turns` requests.
        let per = self.workload.turns.max(1) as u64;
        let replayed = self
            .workload
            .replay
            .as_ref()
            .is_none_or(|t| i < t.len() as u64);
        replayed
            && self.requests.is_none_or(|n| i * per < n)
            && self.duration.is_none_or(|d| t0.elapsed() < d)
    }

    /// Runs the load and reports on it.
    pub async fn execute(self) -> Report {
        let run = Arc::new(self);
        let shared = Arc::new(Shared {
            records: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            tokens: AtomicUsize::new(0),
        });
        let t0 = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let progress = run
            .progress
            .then(|| tokio::spawn(progress_line(shared.clone(), done.clone(), t0)));
        match run.shape {
            Shape::Closed { concurrency } => {
                let clients: Vec<_> = (0..concurrency.max(1))
                    .map(|_| {
                        let (run, shared) = (run.clone(), shared.clone());
                        tokio::spawn(async move {
                            loop {
                                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                                if !run.more(i, t0) {
                                    return;
                                }
                                one(&run, &shared, i, t0).await;
                            }
                        })
                    })
                    .collect();
                for c in clients {
                    let _ = c.await;
                }
            }
            Shape::Open { .. } | Shape::Replay { .. } => {
                let mut rng = SplitMix64::new(run.workload.seed ^ 0x5eed);
                let in_flight = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::new();
                let mut at = Duration::ZERO;
                let mut i = 0;
                while run.more(i, t0) {
                    at = match (run.shape, &run.workload.replay) {
                        (Shape::Replay { speedup }, Some(trace)) => {
                            trace[i as usize].at.div_f64(speedup.max(1e-9))
                        }
                        (Shape::Open { rate }, _) => {
                            let gap = -(1.0 - rng.next_f64()).ln() / rate.max(1e-9);
                            at + Duration::from_secs_f64(gap)
                        }
                        _ => at,
                    };
                    tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + at)).await;
                    if !run.more(i, t0) {
                        break;
                    }
                    if in_flight.load(Ordering::Relaxed) >= OPEN_LOOP_IN_FLIGHT_MAX {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        let rec = Err((t0.elapsed(), Failure::Protocol));
                        shared.records.lock().expect("records lock").push(rec);
                    } else {
                        let (run, shared, in_flight) =
                            (run.clone(), shared.clone(), in_flight.clone());
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        tasks.push(tokio::spawn(async move {
                            one(&run, &shared, i, t0).await;
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                        }));
                    }
                    i += 1;
                }
                for t in tasks {
                    let _ = t.await;
                }
            }
        }
        done.store(true, Ordering::Relaxed);
        if let Some(p) = progress {
            let _ = p.await;
        }
        let records = std::mem::take(&mut *shared.records.lock().expect("records lock"));
        Report::build(&run.shape.label(), &records, run.warmup)
    }
}

/// Request `i`, or, in a multi-turn run, conversation `i`: its turns one after another, each
/// sending the answers before it.
async fn one(run: &Run, shared: &Shared, i: u64, t0: Instant) {
    let turns = run.workload.turns.max(1);
    if turns == 1 {
        let (path, body) = run.workload.request(i);
        send(run, shared, path, &body, t0).await;
        return;
    }
    let mut history: Vec<(String, String)> = Vec::new();
    for t in 0..turns {
        let (path, body) = run.workload.turn(i, t, &history);
        let Some(answer) = send(run, shared, path, &body, t0).await else {
            return;
        };
        let asked = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_owned();
        history.push((asked, answer));
    }
}

/// Sends one request and records it; the text it got, when it succeeded.
async fn send(
    run: &Run,
    shared: &Shared,
    path: &str,
    body: &serde_json::Value,
    t0: Instant,
) -> Option<String> {
    let started = t0.elapsed();
    let rec = run
        .endpoint
        .send(path, body, run.workload.stream, t0)
        .await
        .map_err(|f| (started, f));
    let text = rec.as_ref().ok().map(|o| o.text.clone());
    match &rec {
        Ok(o) => {
            shared.ok.fetch_add(1, Ordering::Relaxed);
            shared
                .tokens
                .fetch_add(o.usage_tokens.unwrap_or(o.client_tokens), Ordering::Relaxed);
        }
        Err(_) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.records.lock().expect("records lock").push(rec);
    text
}

/// Once a second: requests done / failed, throughput over the last second, p50 TTFT so far.
/// On a terminal the line rewrites itself; elsewhere each is its own line.
async fn progress_line(shared: Arc<Shared>, done: Arc<AtomicBool>, t0: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut last_tokens = 0;
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tokens = shared.tokens.load(Ordering::Relaxed);
        let mut ttft: Vec<Duration> = shared
            .records
            .lock()
            .expect("records lock")
            .iter()
            .filter_map(|r| r.as_ref().ok().and_then(|o| o.ttft))
            .collect();
        ttft.sort_unstable();
        let p50 = ttft
            .get(ttft.len() / 2)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let line = format!(
            "[{:>5.1}s] done {} failed {} | {} tok/s | TTFT p50 {:.0} ms",
            t0.elapsed().as_secs_f64(),
            shared.ok.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
            tokens - last_tokens,
            p50
        );
        last_tokens = tokens;
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r{line}   ")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
    if tty {
        eprintln!();
    }
}
