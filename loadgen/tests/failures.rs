//! The load generator against a small test server that fails some requests on purpose,
//! one that never answers, and a port where nothing listens: every failure is counted
//! and classified, and the successes are counted exactly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use expertmesh_loadgen::{Endpoint, Lengths, Run, Shape, Workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads one request (the load generator's: a head, then a JSON body) and returns its body;
/// `None` when the client leaves first.
async fn read_request(s: &mut tokio::net::TcpStream) -> Option<serde_json::Value> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
        let text = String::from_utf8_lossy(&got);
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            if let Ok(v) = serde_json::from_str(body) {
                return Some(v);
            }
        }
    }
}

/// Serves request i: 503 when i % 3 == 0, 429 when i % 3 == 1, otherwise a stream of
/// three tokens with usage. `silent` servers read the request and never answer.
async fn server(silent: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = n.clone();
            tokio::spawn(async move {
                if read_request(&mut s).await.is_none() {
                    return;
                }
                if silent {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let reply = match n.fetch_add(1, Ordering::SeqCst) % 3 {
                    0 => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}"
                        .to_string(),
                    1 => {
                        "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}".to_string()
                    }
                    _ => {
                        let mut body = String::new();
                        for t in ["a", "b", "c"] {
                            body += &format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"{t}\",\"finish_reason\":null}}]}}\n\n");
                        }
                        body += "data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"length\"}]}\n\n";
                        body += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}\n\n";
                        body += "data: [DONE]\n\n";
                        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n{body}")
                    }
                };
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

fn run(address: String, requests: u64, timeout: Duration) -> Run {
    Run {
        endpoint: Endpoint {
            address,
            prefix: String::new(),
            api_key: None,
            timeout,
        },
        workload: Arc::new(Workload {
            model: None,
            chat: false,
            stream: true,
            prompt_lengths: Lengths::Fixed(4),
            output_lengths: Lengths::Fixed(3),
            token_ids_below: None,
            dataset: None,
            shared_prefix: None,
            replay: None,
            turns: 1,
            seed: 1,
        }),
        shape: Shape::Closed { concurrency: 2 },
        duration: None,
        requests: Some(requests),
        warmup: Duration::ZERO,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_and_classified() {
    let addr = server(false).await;
    let report = run(addr, 12, Duration::from_secs(10)).execute().await;
    assert_eq!(report.requests_ok, 4);
    assert_eq!(report.requests_failed, 8);
    assert_eq!(report.failures.get("http_503"), Some(&4));
    assert_eq!(report.failures.get("http_429"), Some(&4));
    assert_eq!(report.output_tokens, 12);
    assert_eq!(report.client_counted_tokens, 12);
    assert_eq!(report.samples.itl.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_and_refusal_are_timeouts_and_connect_errors() {
    let silent = server(true).await;
    let report = run(silent, 2, Duration::from_millis(200)).execute().await;
    assert_eq!(report.failures.get("timeout"), Some(&2));
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let report = run(closed, 3, Duration::from_secs(2)).execute().await;
    assert_eq!(report.failures.get("connect"), Some(&3));
    assert_eq!(report.requests_ok, 0);
}

/// Streams three tokens to every request, the first after 20 ms for even requests and after
/// 400 ms for odd ones, the others 10 ms apart.
async fn paced_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = n.clone();
            tokio::spawn(async move {
                if read_request(&mut s).await.is_none() {
                    return;
                }
                let first = if n.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                    20
                } else {
                    400
                };
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(first)).await;
                for t in ["a", "b", "c"] {
                    let event = format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"{t}\",\"finish_reason\":null}}]}}\n\n");
                    let _ = s.write_all(event.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let tail = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}\n\ndata: [DONE]\n\n";
                let _ = s.write_all(tail.as_bytes()).await;
            });
        }
    });
    addr
}

/// Goodput against a server of known latencies: half the requests have their first token
/// after 20 ms, half after 400 ms; with a 200 ms TTFT objective, half meet it. The JSON
/// carries vLLM's result keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodput_counts_the_requests_within_the_slo() {
    let addr = paced_server().await;
    let mut report = run(addr, 8, Duration::from_secs(10)).execute().await;
    assert_eq!(report.requests_ok, 8);
    report.apply_slo("ttft_ms=200,tpot_ms=100".parse().unwrap());
    let goodput = report.goodput.unwrap();
    assert_eq!(goodput.requests_met, 4);
    assert_eq!(goodput.met_share, 0.5);
    assert!((goodput.request_goodput - 4.0 / report.duration_s).abs() < 1e-9);
    // Three tokens 10 ms apart: a mean time per output token after the first of ~10 ms.
    assert!(
        report.tpot_ms.p50 >= 9.0 && report.tpot_ms.p50 < 100.0,
        "{:?}",
        report.tpot_ms
    );
    let json = report.to_json();
    assert_eq!(json["completed"], 8);
    assert_eq!(json["total_input_tokens"], 32);
    assert_eq!(json["total_output_tokens"], 24);
    for key in [
        "median_ttft_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "std_e2el_ms",
        "request_goodput",
    ] {
        assert!(json[key].as_f64().is_some(), "{key} missing: {json}");
    }
    assert!(json["median_ttft_ms"].as_f64().unwrap() >= 20.0);
}

/// A replayed trace sends each request at its time (here twice as fast), with its lengths,
/// and stops at the trace's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_replays_at_its_times() {
    let addr = paced_server().await;
    let trace: Vec<expertmesh_loadgen::workload::TraceEntry> = [0u64, 300, 600, 900]
        .iter()
        .map(|&ms| expertmesh_loadgen::workload::TraceEntry {
            at: Duration::from_millis(ms),
            input_tokens: 5,
            output_tokens: 3,
        })
        .collect();
    let mut r = run(addr, 100, Duration::from_secs(10));
    r.requests = None;
    r.shape = Shape::Replay { speedup: 2.0 };
    r.workload = Arc::new(Workload {
        replay: Some(trace),
        ..(*r.workload).clone()
    });
    let report = r.execute().await;
    assert_eq!(report.requests_ok, 4, "the trace's requests, no more");
    let mut starts: Vec<Duration> = report.samples.starts.iter().map(|s| s.0).collect();
    starts.sort();
    for (got, want_ms) in starts.iter().zip([0u64, 150, 300, 450]) {
        let want = Duration::from_millis(want_ms);
        assert!(
            *got >= want && *got < want + Duration::from_millis(100),
            "{starts:?}"
        );
    }
}

/// Multi-turn conversations: each turn sends the history, the server's earlier answers as
/// the assistant's turns, then a new user message; turns count as requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_send_their_history_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(body) = read_request(&mut s).await else {
                    return;
                };
                let turn = body["messages"].as_array().map_or(0, Vec::len) / 2;
                seen.lock().unwrap().push(body);
                let mut events = String::new();
                for piece in ["answer ", &turn.to_string()] {
                    events += &format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{piece}\"}},\"finish_reason\":null}}]}}\n\n");
                }
                events += "data: [DONE]\n\n";
                let reply =
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n{events}");
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    let mut r = run(addr, 6, Duration::from_secs(10));
    r.shape = Shape::Closed { concurrency: 1 };
    r.workload = Arc::new(Workload {
        chat: true,
        turns: 3,
        ..(*r.workload).clone()
    });
    let report = r.execute().await;
    assert_eq!(report.requests_ok, 6, "two conversations of three turns");
    let bodies = bodies.lock().unwrap();
    for (k, body) in bodies.iter().enumerate() {
        let messages = body["messages"].as_array().unwrap();
        let turn = k % 3;
        assert_eq!(messages.len(), 2 * turn + 1, "{body}");
        for (t, answer) in messages.iter().skip(1).step_by(2).enumerate() {
            assert_eq!(answer["role"], "assistant");
            assert_eq!(answer["content"], format!("answer {t}"));
        }
        // The same first message for every turn of a conversation.
        let first = &bodies[k - turn]["messages"][0];
        assert_eq!(&messages[0], first);
    }
    assert_ne!(bodies[0]["messages"][0], bodies[3]["messages"][0]);
}
