//! # expertmesh-gateway
//!
//! The OpenAI-compatible HTTP API (DESIGN.md §7), run inside the coordinator process by
//! default. A request is read with a size cap, checked ([`openai`]), tokenized here (the
//! model's tokenizer and chat template), and sent to the attention worker with the most
//! free KV blocks as one `AttentionService.Generate` stream; tokens come back, are turned
//! into text with stop strings applied ([`text`]), and go out as one JSON response or as
//! server-sent events. A client that disconnects drops the stream, which cancels the
//! request on the worker. Errors take OpenAI's shape ([`error`]); `/metrics` speaks
//! Prometheus ([`metrics`]).

pub mod error;
pub mod metrics;
pub mod openai;
pub mod text;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use expertmesh_coordinator::{ClusterView, Coordinator, Role};
use expertmesh_model::config::generation_eos_ids;
use expertmesh_model::{ChatTemplate, ModelSource, TextConfig, TextTokenizer};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::attention_service_client::AttentionServiceClient;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{CompletionRequest, Prompt};
use crate::text::{Piece, StopText};

/// Gateway settings.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// HTTP address to listen on.
    pub http: String,
    /// The model directory (tokenizer, chat template, config).
    pub model: String,
    /// When set, requests must carry `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    pub body_max_bytes: usize,
    /// Requests in flight at most; more get 429.
    pub requests_max: usize,
    /// Default `max_tokens` of `/v1/completions`.
    pub completion_tokens_default: usize,
    /// A request fails when its worker sends nothing for this long, in ms (first token
    /// included: a long queue or prompt must still make progress within it).
    pub token_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            http: "127.0.0.1:8000".into(),
            model: "tests/fixtures/tiny-maverick".into(),
            api_key: None,
            body_max_bytes: 1 << 20,
            requests_max: 512,
            completion_tokens_default: 16,
            token_timeout_ms: 120_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// What the gateway needs of the cluster: its state and its workers' load.
pub trait Cluster: Send + Sync + 'static {
    fn view(&self) -> Arc<ClusterView>;
    fn loads(&self) -> HashMap<u64, pb::WorkerLoad>;
}

impl Cluster for Coordinator {
    fn view(&self) -> Arc<ClusterView> {
        Coordinator::view(self)
    }
    fn loads(&self) -> HashMap<u64, pb::WorkerLoad> {
        Coordinator::loads(self)
    }
}

struct App {
    /// None for synthetic models: prompts are token ids and tokens have no text.
    tokenizer: Option<TextTokenizer>,
    template: Option<ChatTemplate>,
    config: TextConfig,
    stop_ids: Vec<u32>,
    model_name: String,
    model_path: String,
    cluster: Arc<dyn Cluster>,
    channels: Mutex<HashMap<String, Channel>>,
    metrics: Metrics,
    gateway: GatewayConfig,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    config: GatewayConfig,
    cluster: Arc<dyn Cluster>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let source: ModelSource = config.model.parse()?;
    let model_config = source.config()?;
    let (tokenizer, template, stop_ids, model_name) = match &source {
        ModelSource::Dir(dir) => (
            Some(TextTokenizer::from_dir(dir)?),
            ChatTemplate::from_dir(dir)?,
            generation_eos_ids(dir)?.unwrap_or_else(|| model_config.eos_token_ids.clone()),
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| config.model.clone()),
        ),
        ModelSource::Synthetic(_) => (None, None, Vec::new(), "synthetic-bench".to_owned()),
    };
    let app = Arc::new(App {
        tokenizer,
        template,
        config: model_config,
        stop_ids,
        model_name,
        model_path: config.model.clone(),
        cluster,
        channels: Mutex::new(HashMap::new()),
        metrics: Metrics::default(),
        permits: Arc::new(Semaphore::new(config.requests_max)),
        gateway: config,
        next_id: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Reads a request body of at most `limit` bytes. A larger one is read on (and dropped) up
/// to `DRAIN_MAX_BYTES`, so that the client, still sending, gets to read the 413.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    const DRAIN_MAX_BYTES: usize = 64 << 20;
    use tokio_stream::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("reading the body: {e}"), "body"))?;
        seen += chunk.len();
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > DRAIN_MAX_BYTES {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::TooLarge(limit));
    }
    Ok(Bytes::from(buf))
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn not_found() -> Response {
    ApiError::NotFound("no such route".into()).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": app.model_name, "object": "model", "created": 0, "owned_by": "expertmesh"
    }]}))
    .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let view = app.cluster.view();
    let reason = match (&view.unservable, view.count(Role::AttentionWorker)) {
        (Some(r), _) => Some(r.clone()),
        (None, 0) => Some("no attention worker has registered".into()),
        (None, _) => None,
    };
    match reason {
        None => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": r})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let loads: BTreeMap<u64, pb::WorkerLoad> = app.cluster.loads().into_iter().collect();
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(&loads),
    )
        .into_response()
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, headers, body, false).await
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, headers, body, true).await
}

async fn handle(app: Arc<App>, headers: HeaderMap, body: Body, chat: bool) -> Response {
    let endpoint = if chat {
        "chat_completions"
    } else {
        "completions"
    };
    app.metrics.in_flight(1);
    let response = match app.clone().complete(headers, body, chat).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    app.metrics.in_flight(-1);
    app.metrics.request(endpoint, response.status().as_u16());
    response
}

/// A checked request, tokenized, ready to send.
struct Job {
    id: String,
    chat: bool,
    prompt: Vec<u32>,
    request: CompletionRequest,
    max_tokens: usize,
}

impl App {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.gateway.api_key else {
            return Ok(());
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    async fn complete(
        self: Arc<Self>,
        headers: HeaderMap,
        body: Body,
        chat: bool,
    ) -> Result<Response, ApiError> {
        self.authorize(&headers)?;
        let bytes = read_body(body, self.gateway.body_max_bytes).await?;
        let request = CompletionRequest::parse(&bytes, chat)?;
        if let Some(m) = &request.model {
            if *m != self.model_name && *m != self.model_path {
                return Err(ApiError::NotFound(format!(
                    "the model `{m}` does not exist"
                )));
            }
        }
        let prompt = self.tokenize(&request.prompt)?;
        let context = self.config.max_position_embeddings;
        let room = context.saturating_sub(prompt.len());
        let max_tokens = match request.max_tokens {
            Some(n) if n > room => {
                return Err(ApiError::bad(
                    format!(
                        "{} prompt tokens + max_tokens {n} exceed the context of {context} tokens",
                        prompt.len()
                    ),
                    "max_tokens",
                ))
            }
            Some(n) => n,
            None if chat => room,
            None => self.gateway.completion_tokens_default.min(room),
        };
        if max_tokens == 0 {
            return Err(ApiError::bad(
                format!("the prompt fills the context of {context} tokens"),
                "prompt",
            ));
        }
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded("too many requests in flight".into()))?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id: format!("{}-{n}", if chat { "chatcmpl" } else { "cmpl" }),
            chat,
            prompt,
            request,
            max_tokens,
        };
        let stream = self.start(&job).await?;
        if job.request.stream {
            Ok(self.stream_events(job, stream, permit))
        } else {
            let r = self.collect(job, stream).await;
            drop(permit);
            r
        }
    }

    fn tokenizer(&self) -> Result<&TextTokenizer, ApiError> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad("this model has no tokenizer: send token ids", "prompt"))
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        let internal = |e: expertmesh_model::ModelError| ApiError::Internal(e.to_string());
        let ids = match prompt {
            Prompt::Ids(ids) => {
                let vocab = self.config.vocab_size;
                if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::bad(
                        format!("token id {id} is outside the vocabulary of {vocab}"),
                        "prompt",
                    ));
                }
                ids.clone()
            }
            Prompt::Text(text) => {
                let mut ids = self.tokenizer()?.encode(text, true).map_err(internal)?;
                if let Some(bos) = self.config.bos_token_id {
                    if ids.first() != Some(&bos) {
                        ids.insert(0, bos);
                    }
                }
                ids
            }
            Prompt::Chat(messages) => {
                let template = self
                    .template
                    .as_ref()
                    .ok_or_else(|| ApiError::bad("this model has no chat template", "messages"))?;
                let rendered = template
                    .render(messages, true)
                    .map_err(|e| ApiError::bad(e.to_string(), "messages"))?;
                self.tokenizer()?
                    .encode(&rendered, false)
                    .map_err(internal)?
            }
        };
        if ids.is_empty() {
            return Err(ApiError::bad("the prompt is empty", "prompt"));
        }
        Ok(ids)
    }

    /// The attention worker with the most free KV blocks (lowest id on ties).
    fn pick_worker(&self) -> Result<String, ApiError> {
        let view = self.cluster.view();
        if let Some(reason) = &view.unservable {
            return Err(ApiError::Unavailable(format!(
                "the cluster cannot serve: {reason}"
            )));
        }
        let loads = self.cluster.loads();
        view.members
            .iter()
            .filter(|m| m.role == Role::AttentionWorker && m.alive)
            .max_by_key(|m| {
                (
                    loads.get(&m.id).map_or(0, |l| l.free_kv_blocks),
                    std::cmp::Reverse(m.id),
                )
            })
            .map(|m| m.address.clone())
            .ok_or_else(|| ApiError::Unavailable("no attention worker is available".into()))
    }

    async fn start(&self, job: &Job) -> Result<tonic::Streaming<pb::GenerateEvent>, ApiError> {
        let address = self.pick_worker()?;
        let channel = {
            let mut channels = self.channels.lock().expect("channels lock");
            match channels.get(&address) {
                Some(c) => c.clone(),
                None => {
                    let c = expertmesh_proto::endpoint(&address, Duration::from_secs(3))
                        .map_err(|e| ApiError::Internal(e.to_string()))?
                        .connect_lazy();
                    channels.insert(address.clone(), c.clone());
                    c
                }
            }
        };
        let r = &job.request;
        let request = pb::GenerateRequest {
            input_ids: job.prompt.clone(),
            max_tokens: job.max_tokens as u32,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k as u32,
            seed: r.seed,
            stop_ids: self.stop_ids.clone(),
            prompt_logits: false,
        };
        let mut client = AttentionServiceClient::new(channel);
        Ok(client.generate(request).await?.into_inner())
    }

    fn usage(&self, job: &Job, completion: usize) -> Value {
        self.metrics.tokens(job.prompt.len(), completion);
        json!({"prompt_tokens": job.prompt.len(), "completion_tokens": completion,
               "total_tokens": job.prompt.len() + completion})
    }

    /// Runs the token stream to its end, calling `emit` with each piece of text.
    async fn drive(
        &self,
        job: &Job,
        mut stream: tonic::Streaming<pb::GenerateEvent>,
        mut emit: impl FnMut(String) -> bool,
    ) -> Result<(usize, &'static str, String), ApiError> {
        let mut text = StopText::new(self.tokenizer.as_ref(), job.request.stop.clone());
        let started = Instant::now();
        let mut last = started;
        let mut tokens = 0;
        let mut finish = "length";
        let patience = Duration::from_millis(self.gateway.token_timeout_ms);
        loop {
            let next = tokio::time::timeout(patience, stream.message())
                .await
                .map_err(|_| {
                    ApiError::Unavailable(format!(
                        "the attention worker sent nothing for {patience:?}"
                    ))
                })??;
            let Some(event) = next else { break };
            match event.event {
                Some(pb::generate_event::Event::Token(t)) => {
                    let now = Instant::now();
                    if tokens == 0 {
                        self.metrics.first_token((now - started).as_secs_f64());
                    } else {
                        self.metrics.inter_token((now - last).as_secs_f64());
                    }
                    last = now;
                    tokens += 1;
                    // One event per token, even when its text is held back or empty (a stop
                    // id has none), so a client's count equals the usage.
                    let piece = if self.stop_ids.contains(&t.id) {
                        Piece::Text(String::new())
                    } else {
                        text.push(t.id)
                    };
                    match piece {
                        Piece::Text(s) => {
                            if !emit(s) {
                                return Ok((tokens, "cancelled", String::new()));
                            }
                        }
                        Piece::Stopped(s) => {
                            emit(s);
                            // Dropping the stream ends the request on the worker.
                            return Ok((tokens, "stop", String::new()));
                        }
                    }
                }
                Some(pb::generate_event::Event::Finished(f)) => {
                    if f.reason == pb::FinishReason::Stop as i32 {
                        finish = "stop";
                    }
                    break;
                }
                Some(pb::generate_event::Event::PromptLogits(_)) | None => {}
            }
        }
        // Text still held back (an incomplete character) goes with the final event.
        Ok((tokens, finish, text.finish()))
    }

    async fn collect(
        &self,
        job: Job,
        stream: tonic::Streaming<pb::GenerateEvent>,
    ) -> Result<Response, ApiError> {
        let mut out = String::new();
        let (tokens, finish, rest) = self
            .drive(&job, stream, |s| {
                out.push_str(&s);
                true
            })
            .await?;
        out.push_str(&rest);
        let choice = if job.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": out},
                   "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": out, "logprobs": null, "finish_reason": finish})
        };
        Ok(Json(json!({
            "id": job.id,
            "object": if job.chat { "chat.completion" } else { "text_completion" },
            "created": now_s(),
            "model": self.model_name,
            "choices": [choice],
            "usage": self.usage(&job, tokens),
        }))
        .into_response())
    }

    fn chunk(&self, job: &Job, piece: Option<&str>, finish: Option<&str>) -> Value {
        let choice = if job.chat {
            let delta = match piece {
                Some(p) => json!({"content": p}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": piece.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        };
        json!({
            "id": job.id,
            "object": if job.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": now_s(),
            "model": self.model_name,
            "choices": [choice],
        })
    }

    fn stream_events(
        self: Arc<Self>,
        job: Job,
        stream: tonic::Streaming<pb::GenerateEvent>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Response {
        let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(async move {
            let _permit = permit;
            let send = |v: Value| {
                let tx = tx.clone();
                async move {
                    tx.send(Ok(SseEvent::default().data(v.to_string())))
                        .await
                        .is_ok()
                }
            };
            if job.chat {
                let mut first = self.chunk(&job, Some(""), None);
                first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                if !send(first).await {
                    return;
                }
            }
            let (pieces_tx, mut pieces_rx) = mpsc::unbounded_channel::<String>();
            let app = self.clone();
            let job_ref = &job;
            let driven = {
                let forward = async {
                    while let Some(p) = pieces_rx.recv().await {
                        if !send(app.chunk(job_ref, Some(&p), None)).await {
                            return false;
                        }
                    }
                    true
                };
                let drive = async {
                    let r = app
                        .drive(job_ref, stream, |s| pieces_tx.send(s).is_ok())
                        .await;
                    drop(pieces_tx);
                    r
                };
                let (r, delivered) = tokio::join!(drive, forward);
                if delivered {
                    Some(r)
                } else {
                    None
                }
            };
            match driven {
                None => {} // the client went away
                Some(Ok((tokens, finish, rest))) => {
                    let piece = (!rest.is_empty()).then_some(rest.as_str());
                    let _ = send(app.chunk(&job, piece, Some(finish))).await;
                    let usage = app.usage(&job, tokens);
                    if job.request.include_usage {
                        let mut last = app.chunk(&job, None, None);
                        last["choices"] = json!([]);
                        last["usage"] = usage;
                        let _ = send(last).await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                }
                Some(Err(e)) => {
                    let _ = send(e.body()).await;
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                }
            }
        });
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
    }
}
