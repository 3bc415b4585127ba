//! Routes and handlers: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
//! `/health`, `/metrics`. A completion is: authorize, read the body under its cap, parse
//! ([`crate::openai`]) and validate ([`crate::request`]), take a permit (429 past
//! `requests_max`), start it on a worker ([`crate::backend`]), shape the answer
//! ([`crate::response`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use expertmesh_proto::secret;
use expertmesh_proto::v1 as pb;
use serde_json::json;

use crate::error::ApiError;
use crate::images::{self, image_error};
use crate::openai::{self, CompletionRequest};
use crate::response::{collect, stream_events, Completion};
use crate::stream;
use crate::App;
use expertmesh_model::ImageError;

/// Every route of the API over the gateway's state.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/v1/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(app)
}

/// How long a request body may take to arrive (a client trickling one in holds a request
/// permit no longer than this).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads a request body of at most `limit` bytes within [`BODY_TIMEOUT`]: 413 beyond the
/// size, 408 beyond the time.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    tokio::time::timeout(BODY_TIMEOUT, read_body_bytes(body, limit))
        .await
        .map_err(|_| ApiError::SlowBody(BODY_TIMEOUT.as_secs()))?
}

/// Reads a request body of at most `limit` bytes. A larger one is read on (and dropped) up
/// to `DRAIN_MAX_BYTES`, so that the client, still sending, gets to read the 413.
async fn read_body_bytes(body: Body, limit: usize) -> Result<Bytes, ApiError> {
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

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// `Authorization: Bearer <key>` with one of the API keys, when the gateway has any.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    if !app.keys.required() || bearer(headers).is_some_and(|k| app.keys.allows(k)) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// `/metrics` on the API port: open when the API is, else only with the metrics key.
fn authorize_metrics(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match &app.config.metrics_key {
        Some(key) if bearer(headers).is_some_and(|k| secret::matches(key, k)) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized),
        None if app.keys.required() => Err(ApiError::NotFound(
            "/metrics is not served on the API port of a gateway with API keys: set a \
             metrics key or serve metrics on their own address"
                .into(),
        )),
        None => Ok(()),
    }
}

async fn not_found() -> Response {
    ApiError::NotFound("no such route".into()).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": app.validator.model_name, "object": "model", "created": 0, "owned_by": "expertmesh",
        "max_model_len": app.validator.config.max_position_embeddings,
    }]}))
    .into_response()
}

/// vLLM's `/tokenize`: `prompt` (text or ids) or `messages` (rendered by the chat template
/// with the generation prompt) → `{"count", "max_model_len", "tokens"}`.
async fn tokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        authorize(&app, &headers)?;
        let bytes = read_body(body, app.config.body_max_bytes).await?;
        let (prompt, tools) = openai::tokenize_request(&bytes)?;
        let tokens = app
            .validator
            .tokenize_with_tools(&prompt, tools.as_ref().map(|t| &t.list))?;
        Ok::<_, ApiError>(Json(json!({
            "count": tokens.len(),
            "max_model_len": app.validator.config.max_position_embeddings,
            "tokens": tokens,
        })))
    };
    answer.await.into_response()
}

/// vLLM's `/detokenize`: `{"tokens": [...]}` → `{"prompt": text}`.
async fn detokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        authorize(&app, &headers)?;
        let bytes = read_body(body, app.config.body_max_bytes).await?;
        let tokens = openai::detokenize_request(&bytes)?;
        app.validator.check_vocabulary(&tokens, "tokens")?;
        let tokenizer = app
            .validator
            .tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad("this model has no tokenizer", "tokens"))?;
        let prompt = tokenizer
            .decode(&tokens)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok::<_, ApiError>(Json(json!({ "prompt": prompt })))
    };
    answer.await.into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.backend.unavailable() {
        None => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": r})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize_metrics(&app, &headers) {
        return e.into_response();
    }
    let loads: BTreeMap<u64, pb::WorkerLoad> = app.backend.cluster.loads().into_iter().collect();
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
    // The request's trace: the caller's (`traceparent`), else a new one. Every line of this
    // request here, and the attention worker's, carry its `trace_id`.
    let trace = headers
        .get(expertmesh_proto::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(expertmesh_proto::trace::TraceParent::parse)
        .unwrap_or_else(expertmesh_proto::trace::TraceParent::start);
    let span = tracing::info_span!(
        "request",
        trace_id = %trace.trace_id_hex(),
        endpoint,
        request_id = tracing::field::Empty
    );
    // What the attention worker gets: this trace, this span as its parent.
    let onward = expertmesh_proto::trace::join(&span, &trace);
    let completed = complete(app.clone(), headers, body, chat, onward);
    let response = match tracing::Instrument::instrument(completed, span.clone()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    span.in_scope(|| tracing::info!(status = response.status().as_u16(), "answered"));
    app.metrics.in_flight(-1);
    app.metrics.request(endpoint, response.status().as_u16());
    response
}

async fn complete(
    app: Arc<App>,
    headers: HeaderMap,
    body: Body,
    chat: bool,
    trace: expertmesh_proto::trace::TraceParent,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let bytes = read_body(body, app.config.body_max_bytes).await?;
    let request = CompletionRequest::parse(&bytes, chat)?;
    drop(bytes);
    if !request.images.is_empty() && app.validator.vision.is_none() {
        return Err(image_error(ImageError::NoVision));
    }
    // The permit comes before the images are decoded: it bounds how many decode at once.
    let permit = app
        .permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded("too many requests in flight".into()))?;
    let images = images::load(&request.images, &app.config.images, &app.processor).await?;
    let mut valid = app.validator.validate(request, chat, images)?;
    valid.trace = Some(trace);
    if let Some((spec, field)) = &valid.request.grammar {
        app.validator.check_grammar(spec, field).await?;
    }
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let job = Completion {
        id: format!("{}-{n}", if chat { "chatcmpl" } else { "cmpl" }),
        valid,
    };
    tracing::Span::current().record("request_id", job.id.as_str());
    tracing::info!(
        request_id = %job.id,
        prompt_tokens = job.valid.prompt.len(),
        max_tokens = job.valid.max_tokens,
        stream = job.valid.request.stream,
        "request"
    );
    let started = stream::start_all(&app, &job).await?;
    if job.valid.request.stream {
        Ok(stream_events(app, job, started, permit))
    } else {
        let r = collect(&app, job, started).await;
        drop(permit);
        r
    }
}
