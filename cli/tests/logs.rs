//! `up --log-format json`: every line every process writes is one JSON object, and a
//! request's `traceparent` reaches the lines of the gateway, of the attention worker that
//! served it, and of the expert workers that computed its rows. `up --otlp-endpoint`: the
//! spans of every process reach an OTLP collector (a real tonic server speaking the
//! OpenTelemetry protocol) in the request's trace, each the child of the one before.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
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
    let body = json!({"prompt": [10, 20, 30], "max_tokens": 3, "temperature": 0});
    let reply = common::post_traced(http, &body, &format!("00-{trace}-00f067aa0ba902b7-01"));
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

/// One span as the collector got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// A test OTLP collector: keeps every span it is sent.
#[derive(Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut got = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn spans_of_every_process_reach_an_otlp_collector_in_the_requests_trace() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let (_up, cluster) = common::start_up(
        &[
            "--tls",
            "--http",
            "127.0.0.1:0",
            "--otlp-endpoint",
            &endpoint,
        ],
        &dir.path().join("up.json"),
    );
    let http = cluster["http"][0].as_str().unwrap();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let body = json!({"prompt": [10, 20, 30], "max_tokens": 3, "temperature": 0});
    let reply = common::post_traced(http, &body, &format!("00-{trace}-{caller}-01"));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // The gateway's span is the caller's child, the attention worker's the gateway's; the
    // attention worker's dispatches and the expert workers' batches are in the trace.
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<Received> = spans.lock().unwrap().clone();
        let find = |service: &str, name: &str| {
            got.iter()
                .find(|s| s.service == service && s.name == name && s.trace_id == trace)
                .cloned()
        };
        if let (Some(request), Some(generate), Some(_), Some(batch)) = (
            find("expertmesh-coordinator", "request"),
            find("expertmesh-attention-worker", "generate"),
            find("expertmesh-attention-worker", "dispatch"),
            find("expertmesh-expert-worker", "expert_batch"),
        ) {
            assert_eq!(request.parent_span_id, caller, "{request:?}");
            assert_eq!(generate.parent_span_id, request.span_id, "{generate:?}");
            assert!(!batch.span_id.is_empty(), "{batch:?}");
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the collector did not get the request's spans: {got:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
