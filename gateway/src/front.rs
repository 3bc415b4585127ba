//! The front door: one HTTP address in front of several gateways (one per coordinator), so
//! that the API outlives any coordinator. `expertmesh up` serves it on its public port; a
//! real deployment puts a load balancer with health checks in the same place.
//!
//! Every request is read whole (bounded) and sent to a gateway, the one that answered last
//! first; a gateway that cannot be reached, or fails before its answer is complete, is left
//! for the next one. Completions are pure functions of their request (greedy, or sampled
//! from a seed), so trying again elsewhere gives the same answer:
//!
//! - an answer that is not streamed is read whole before it is passed on, and tried again
//!   on the next gateway when the gateway dies on the way;
//! - a streamed completion is resumed: the front door asks for each chunk's token ids
//!   (`return_token_ids`), and when its gateway dies mid-stream it sends the same request to
//!   another gateway with the tokens the client already has (`resume_token_ids`). That
//!   gateway continues after them (the migration of `stream.rs`), and the client's stream
//!   goes on: the resumed stream's role chunk is dropped, its chunks keep the first id, and
//!   the token ids are taken out again unless the client asked for them.
//!
//! When every gateway fails a request at once (restarts under way, connections being made
//! again), the front door goes round them again, [`RETRY_PAUSE`] apart, for up to
//! [`RETRY_FOR`] before it answers 503.
//!
//! A gateway that hangs (its process frozen, its machine unreachable) accepts connections
//! or holds them open without answering. The front door probes each gateway's `/health`
//! every [`PROBE_INTERVAL`]; one that gives no HTTP answer within [`PROBE_TIMEOUT`] is
//! passed over for new requests, and the requests waiting on it leave it at once (whole
//! answers tried on the next gateway, streams resumed), until it answers again.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;

/// How long a gateway may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a gateway may be silent in the middle of an answer (its own token deadline
/// bounds a request's silence before this).
const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a whole (not streamed) answer may take: its head comes only with its end, after
/// the whole generation (a hung gateway is found by the probes long before).
const WHOLE_ANSWER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest answer read whole, and largest single event of a stream.
const ANSWER_BYTES_MAX: usize = 64 << 20;
/// Events buffered toward one client.
const EVENTS_BUFFERED: usize = 64;
/// How often each gateway is probed, and how long a probe may wait for any HTTP answer.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a request keeps trying while every gateway fails it (restarts under way,
/// connections being made again): rounds over all of them, [`RETRY_PAUSE`] apart.
const RETRY_FOR: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The gateways behind the door.
pub struct Front {
    gateways: Vec<String>,
    /// The gateway that answered last: tried first.
    preferred: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
    body_max_bytes: usize,
    /// Per gateway: whether its last probe got an answer.
    alive: Vec<AtomicBool>,
    /// Bumped whenever a gateway stops answering its probes (requests waiting on it leave).
    lost: watch::Sender<u64>,
}

/// Serves the front door for `gateways` (`host:port` each) on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateways: Vec<String>,
    body_max_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    assert!(
        !gateways.is_empty(),
        "a front door needs a gateway behind it"
    );
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    let front = Arc::new(Front {
        alive: gateways.iter().map(|_| AtomicBool::new(true)).collect(),
        gateways,
        preferred: AtomicUsize::new(0),
        client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
        body_max_bytes,
        lost: watch::channel(0).0,
    });
    let probing = tokio::spawn(probe(front.clone()));
    let router = Router::new().fallback(handle).with_state(front);
    let served = crate::http::serve(listener, router, shutdown).await;
    probing.abort();
    served
}

/// Probes every gateway's `/health` forever, keeping `alive` and `lost` up to date.
async fn probe(front: Arc<Front>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut round = tokio::task::JoinSet::new();
        for g in 0..front.gateways.len() {
            let front = front.clone();
            round.spawn(async move {
                let request = hyper::Request::get(format!("http://{}/health", front.gateways[g]))
                    .body(Full::new(Bytes::new()))
                    .expect("a valid probe");
                // Any HTTP answer (a 503 included) shows the gateway's process is there.
                let answered = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, front.client.request(request)).await,
                    Ok(Ok(_))
                );
                let was = front.alive[g].swap(answered, Ordering::Relaxed);
                if was && !answered {
                    tracing::warn!(
                        "front door: gateway {} stopped answering",
                        front.gateways[g]
                    );
                    front.lost.send_modify(|n| *n += 1);
                }
            });
        }
        while round.join_next().await.is_some() {}
    }
}

/// Why a gateway gave no (complete) answer.
type Failure = String;

async fn handle(State(front): State<Arc<Front>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, front.body_max_bytes).await else {
        return ApiError::TooLarge(front.body_max_bytes).into_response();
    };
    let path = parts.uri.path().to_owned();
    let completion = parts.method == Method::POST
        && (path == "/v1/completions" || path == "/v1/chat/completions");
    let streamed = completion
        .then(|| serde_json::from_slice::<Value>(&body).ok())
        .flatten()
        .filter(|v| v.get("stream") == Some(&Value::Bool(true)));
    let target = Target {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.to_string()),
        headers: forwarded(&parts.headers),
    };
    match streamed {
        Some(request) => resume_stream(front, target, request).await,
        None => whole(&front, &target, body).await,
    }
}

/// Where a request goes on each gateway, and its headers.
struct Target {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
}

/// The headers passed on either way: all but those of one hop and the length (bodies are
/// sent and passed on whole or re-framed).
fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        header::HOST,
        header::UPGRADE,
        header::TE,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h
}

/// The front door's own 503, in OpenAI's shape.
fn unavailable(message: &str) -> Response {
    ApiError::Unavailable(message.to_owned()).into_response()
}

impl Front {
    /// The gateways in the order to try them: those answering their probes first, from the
    /// preferred one on.
    fn order(&self) -> Vec<usize> {
        let first = self.preferred.load(Ordering::Relaxed);
        let n = self.gateways.len();
        let mut order: Vec<usize> = (0..n).map(|i| (first + i) % n).collect();
        order.sort_by_key(|&g| !self.alive[g].load(Ordering::Relaxed));
        order
    }

    /// Completes once gateway `g` stops answering its probes; never when it had already
    /// stopped (then it was chosen because none answers, and it has its own timeouts).
    async fn lost(&self, g: usize) {
        let mut lost = self.lost.subscribe();
        if !self.alive[g].load(Ordering::Relaxed) {
            return std::future::pending().await;
        }
        while self.alive[g].load(Ordering::Relaxed) {
            if lost.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Sends `body` to gateway `g`: its answer's head and body, once the head is in (within
    /// `patience`).
    async fn send(
        &self,
        g: usize,
        target: &Target,
        body: Bytes,
        patience: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Failure> {
        let uri = format!("http://{}{}", self.gateways[g], target.path_and_query);
        let started = tokio::time::Instant::now();
        // A pooled connection to a gateway process that has since been restarted fails
        // at once (`SendRequest`); the second try opens a fresh one.
        let mut tries = 0;
        loop {
            tries += 1;
            let mut request = hyper::Request::builder()
                .method(target.method.clone())
                .uri(&uri)
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            *request.headers_mut() = target.headers.clone();
            let left = patience.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.client.request(request)).await {
                Err(_) => return Err(format!("{}: no answer", self.gateways[g])),
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) if tries < 2 && !e.is_connect() => continue,
                Ok(Err(e)) => return Err(format!("{}: {}", self.gateways[g], causes(&e))),
            }
        }
    }
}

/// An error and its causes, the way hyper's terse errors need to be read
/// ("client error (Connect): tcp connect error: Connection refused (os error 111)").
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// `attempt` on every gateway in turn ([`Front::order`]) until one succeeds, in rounds
/// [`RETRY_PAUSE`] apart for [`RETRY_FOR`] while they all fail; the last round's failures
/// otherwise.
async fn first_success<T, A>(
    front: &Front,
    mut attempt: impl FnMut(usize) -> A,
) -> Result<T, Vec<Failure>>
where
    A: std::future::Future<Output = Result<T, Failure>>,
{
    let started = tokio::time::Instant::now();
    loop {
        let mut why = Vec::new();
        for g in front.order() {
            match attempt(g).await {
                Ok(t) => {
                    front.preferred.store(g, Ordering::Relaxed);
                    return Ok(t);
                }
                Err(e) => why.push(e),
            }
        }
        if started.elapsed() + RETRY_PAUSE >= RETRY_FOR {
            return Err(why);
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Passes on the first answer a gateway gives whole.
async fn whole(front: &Front, target: &Target, body: Bytes) -> Response {
    let answered = first_success(front, |g| {
        let body = body.clone();
        async move {
            tokio::select! {
                a = answer_whole(front, g, target, body) => a,
                _ = front.lost(g) => Err(format!("{}: stopped answering", front.gateways[g])),
            }
        }
    })
    .await;
    answered.unwrap_or_else(|why| unavailable(&format!("no gateway answered: {}", why.join("; "))))
}

/// Gateway `g`'s whole answer to `body`, read to its end.
async fn answer_whole(
    front: &Front,
    g: usize,
    target: &Target,
    body: Bytes,
) -> Result<Response, Failure> {
    let answer = front.send(g, target, body, WHOLE_ANSWER_TIMEOUT).await?;
    read_whole(answer)
        .await
        .map_err(|e| format!("{}: {e}", front.gateways[g]))
}

/// An answer read to its end (bounded), as the response passed on.
async fn read_whole(answer: hyper::Response<hyper::body::Incoming>) -> Result<Response, Failure> {
    let (parts, incoming) = answer.into_parts();
    let collected = tokio::time::timeout(
        IDLE_TIMEOUT,
        http_body_util::Limited::new(incoming, ANSWER_BYTES_MAX).collect(),
    )
    .await
    .map_err(|_| "the answer stalled".to_string())?
    .map_err(|e| e.to_string())?;
    let mut response = Response::new(Body::from(collected.to_bytes()));
    *response.status_mut() = parts.status;
    *response.headers_mut() = forwarded(&parts.headers);
    Ok(response)
}

/// A streamed completion, resumed on another gateway whenever its gateway dies.
async fn resume_stream(front: Arc<Front>, target: Target, mut request: Value) -> Response {
    let asked_ids = request.get("return_token_ids") == Some(&Value::Bool(true));
    request["return_token_ids"] = Value::Bool(true);
    let body = Bytes::from(request.to_string());
    // The first answer: an error status passes to the client as it is.
    let first = first_success(&front, |g| {
        let (front, target, body) = (&front, &target, body.clone());
        async move {
            let sent = tokio::select! {
                a = front.send(g, target, body, IDLE_TIMEOUT) => a,
                _ = front.lost(g) => Err(format!("{}: stopped answering", front.gateways[g])),
            }?;
            if sent.status() == StatusCode::OK {
                return Ok(Ok((g, sent)));
            }
            match read_whole(sent).await {
                Ok(response) => Ok(Err(response)),
                Err(e) => Err(format!("{}: {e}", front.gateways[g])),
            }
        }
    })
    .await;
    let (g, answer) = match first {
        Ok(Ok(streaming)) => streaming,
        Ok(Err(passed_on)) => return passed_on,
        Err(why) => return unavailable(&format!("no gateway answered: {}", why.join("; "))),
    };
    let headers = forwarded(answer.headers());
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(EVENTS_BUFFERED);
    let mut resumed = Resumed {
        request,
        asked_ids,
        emitted: Vec::new(),
        id: None,
        attempt: 0,
    };
    tokio::spawn(async move {
        let mut answer = answer.into_body();
        let mut gateway = g;
        loop {
            let pumped = tokio::select! {
                p = resumed.pump(&mut answer, &tx) => p,
                _ = front.lost(gateway) => Pumped::Broken("the gateway stopped answering".into()),
            };
            match pumped {
                Pumped::Done | Pumped::ClientGone => return,
                Pumped::Broken(why) => tracing::warn!(
                    "front door: the stream from {} broke off ({why}); resuming it after {} \
                     tokens",
                    front.gateways[gateway],
                    resumed.emitted.len()
                ),
            }
            // The gateway died mid-stream: the same request elsewhere, after what the
            // client has; several choices' streams interleave and are not resumed.
            let several = resumed
                .request
                .get("n")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                > 1;
            let reopened = match several {
                true => None,
                false => resumed.reopen(&front, &target, gateway).await,
            };
            match reopened {
                Some((g, a)) => {
                    gateway = g;
                    answer = a.into_body();
                }
                None => {
                    let e = ApiError::Unavailable("every gateway failed this stream".into()).body();
                    let _ = tx.send(Ok(Bytes::from(format!("data: {e}\n\n")))).await;
                    let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                    return;
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    *response.headers_mut() = headers;
    response
}

/// How pumping one gateway's stream ended.
enum Pumped {
    /// `[DONE]` passed on.
    Done,
    ClientGone,
    /// The gateway's stream broke off (why).
    Broken(String),
}

/// A streamed completion's state across gateways.
struct Resumed {
    request: Value,
    asked_ids: bool,
    /// The token ids the client has (from the chunks passed on).
    emitted: Vec<u32>,
    /// The id of the first gateway's chunks, kept by every later one.
    id: Option<Value>,
    /// Gateways tried after the first.
    attempt: usize,
}

impl Resumed {
    /// The same request on another gateway (those answering their probes first, the next
    /// ones after `failed` first among them), after the tokens emitted so far; `None` when
    /// every gateway has been tried twice.
    async fn reopen(
        &mut self,
        front: &Front,
        target: &Target,
        failed: usize,
    ) -> Option<(usize, hyper::Response<hyper::body::Incoming>)> {
        let n = front.gateways.len();
        self.request["resume_token_ids"] = json!(self.emitted);
        let body = Bytes::from(self.request.to_string());
        while self.attempt < 2 * n {
            self.attempt += 1;
            let mut g = (failed + self.attempt) % n;
            if !front.alive[g].load(Ordering::Relaxed) {
                // Skip to the next gateway that answers its probes, if any does.
                g = (1..=n)
                    .map(|i| (g + i) % n)
                    .find(|&h| h != failed && front.alive[h].load(Ordering::Relaxed))
                    .unwrap_or(g);
            }
            let sent = tokio::select! {
                a = front.send(g, target, body.clone(), IDLE_TIMEOUT) => a.ok(),
                _ = front.lost(g) => None,
            };
            if let Some(a) = sent.filter(|a| a.status() == StatusCode::OK) {
                front.preferred.store(g, Ordering::Relaxed);
                return Some((g, a));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Passes one gateway's events to the client until `[DONE]`, the client leaves, or the
    /// stream breaks off.
    async fn pump(
        &mut self,
        answer: &mut hyper::body::Incoming,
        tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    ) -> Pumped {
        let mut pending = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, answer.frame()).await {
                Err(_) => return Pumped::Broken("the stream stalled".into()),
                Ok(None) => return Pumped::Broken("the stream ended before [DONE]".into()),
                Ok(Some(Err(e))) => return Pumped::Broken(e.to_string()),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            if pending.len() > ANSWER_BYTES_MAX {
                return Pumped::Broken("an event too large".into());
            }
            let mut out = BytesMut::new();
            let mut done = false;
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event = pending.split_to(end + 2);
                if let Some(e) = self.event(&event[..end]) {
                    out.extend_from_slice(&e);
                }
                if &event[..end] == b"data: [DONE]" {
                    done = true;
                    break;
                }
            }
            if !out.is_empty() && tx.send(Ok(out.freeze())).await.is_err() {
                return Pumped::ClientGone;
            }
            if done {
                return Pumped::Done;
            }
        }
    }

    /// One event as the client gets it (`None`: dropped).
    fn event(&mut self, event: &[u8]) -> Option<Bytes> {
        let pass = || Some(Bytes::from([event, b"\n\n"].concat()));
        let Some(data) = event.strip_prefix(b"data: ") else {
            return pass();
        };
        let Ok(mut chunk) = serde_json::from_slice::<Value>(data) else {
            return pass(); // `[DONE]`, or not JSON: as it is
        };
        if chunk.get("error").is_some() {
            return pass();
        }
        if let Some(choice) = chunk.get_mut("choices").and_then(|c| c.get_mut(0)) {
            if self.attempt > 0 && choice["delta"].get("role").is_some() {
                return None; // the client has its role chunk already
            }
            // Only a single choice is resumed (`n` > 1 streams are not): its ids are the
            // first choice's.
            let first = choice.get("index").and_then(Value::as_u64).unwrap_or(0) == 0;
            if let Some(ids) = choice
                .get("token_ids")
                .and_then(Value::as_array)
                .filter(|_| first)
            {
                self.emitted
                    .extend(ids.iter().filter_map(|v| v.as_u64().map(|id| id as u32)));
            }
            if !self.asked_ids {
                if let Some(o) = choice.as_object_mut() {
                    o.remove("token_ids");
                }
            }
        }
        match &self.id {
            Some(id) => chunk["id"] = id.clone(),
            None => self.id = chunk.get("id").cloned(),
        }
        Some(Bytes::from(format!("data: {chunk}\n\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resumed(asked_ids: bool) -> Resumed {
        Resumed {
            request: json!({}),
            asked_ids,
            emitted: Vec::new(),
            id: None,
            attempt: 0,
        }
    }

    fn data(event: Option<Bytes>) -> Value {
        let e = event.expect("passed on");
        let text = std::str::from_utf8(&e).unwrap();
        serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap()
    }

    /// The client sees one stream: token ids gathered (and taken out unless asked for),
    /// the first gateway's id kept, the resumed stream's role chunk dropped.
    #[test]
    fn a_resumed_stream_reads_as_one() {
        let mut r = resumed(false);
        let role = br#"data: {"id":"a-1","choices":[{"delta":{"role":"assistant","content":""},"token_ids":[]}]}"#;
        assert_eq!(
            data(r.event(role))["choices"][0]["delta"]["role"],
            "assistant"
        );
        let token = br#"data: {"id":"a-1","choices":[{"delta":{"content":"hi"},"token_ids":[7]}]}"#;
        let out = data(r.event(token));
        assert_eq!(out["choices"][0].get("token_ids"), None);
        assert_eq!(r.emitted, vec![7]);
        // The gateway died; another one answers the same request after token 7.
        r.attempt = 1;
        let role_again = br#"data: {"id":"b-9","choices":[{"delta":{"role":"assistant","content":""},"token_ids":[]}]}"#;
        assert!(r.event(role_again).is_none());
        let next =
            br#"data: {"id":"b-9","choices":[{"delta":{"content":" there"},"token_ids":[8]}]}"#;
        let out = data(r.event(next));
        assert_eq!(out["id"], "a-1");
        assert_eq!(out["choices"][0]["delta"]["content"], " there");
        assert_eq!(r.emitted, vec![7, 8]);
        assert_eq!(
            r.event(b"data: [DONE]").unwrap(),
            Bytes::from("data: [DONE]\n\n")
        );
        // Ids stay when the client asked for them.
        let mut asked = resumed(true);
        assert_eq!(
            data(asked.event(token))["choices"][0]["token_ids"],
            json!([7])
        );
    }
}
