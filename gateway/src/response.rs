//! Response shaping: a request's token events become text ([`Tokens`]: stop ids, stop
//! strings, the token deadline, latency metrics), then one OpenAI JSON body ([`collect`]) or
//! a stream of server-sent events ([`stream_events`], through a bounded channel: a slow
//! client slows its own request, never the gateway's memory), with usage counts.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use expertmesh_proto::v1 as pb;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::error::ApiError;
use crate::request::ValidRequest;
use crate::text::{Piece, StopText};
use crate::App;

/// SSE events buffered toward one client before its request waits.
const EVENTS_BUFFERED: usize = 64;

/// A request being answered: its checked form and its response id.
pub struct Completion {
    pub id: String,
    pub valid: ValidRequest,
}

/// What the token stream gave next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Text to send (possibly empty: one per token, so a client's count equals the usage).
    Text(String),
    /// The end: tokens generated, OpenAI's finish reason, text held back until now.
    End {
        tokens: usize,
        finish: &'static str,
        rest: String,
    },
}

/// One request's token events as text.
pub struct Tokens<'a> {
    stream: tonic::Streaming<pb::GenerateEvent>,
    text: StopText<'a>,
    app: &'a App,
    patience: Duration,
    started: Instant,
    last: Instant,
    tokens: usize,
    /// Set when a stop string ended the text: the next call ends.
    stopped: bool,
}

impl<'a> Tokens<'a> {
    pub fn new(
        app: &'a App,
        job: &Completion,
        stream: tonic::Streaming<pb::GenerateEvent>,
    ) -> Self {
        let now = Instant::now();
        Self {
            stream,
            text: StopText::new(
                app.validator.tokenizer.as_ref(),
                job.valid.request.stop.clone(),
            ),
            app,
            patience: Duration::from_millis(app.config.token_timeout_ms),
            started: now,
            last: now,
            tokens: 0,
            stopped: false,
        }
    }

    /// The next piece of text, or the end. Dropping `self` (after a stop string, or when the
    /// client leaves) drops the stream, which ends the request on the worker.
    pub async fn next(&mut self) -> Result<Next, ApiError> {
        if self.stopped {
            return Ok(self.end("stop", String::new()));
        }
        loop {
            let patience = self.patience;
            let event = tokio::time::timeout(patience, self.stream.message())
                .await
                .map_err(|_| {
                    ApiError::Unavailable(format!(
                        "the attention worker sent nothing for {patience:?}"
                    ))
                })??;
            let Some(event) = event else {
                let rest = self.text.finish();
                return Ok(self.end("length", rest));
            };
            match event.event {
                Some(pb::generate_event::Event::Token(t)) => return Ok(self.token(t.id)),
                Some(pb::generate_event::Event::Finished(f)) => {
                    let finish = if f.reason == pb::FinishReason::Stop as i32 {
                        "stop"
                    } else {
                        "length"
                    };
                    // Text still held back (an incomplete character) goes with the end.
                    let rest = self.text.finish();
                    return Ok(self.end(finish, rest));
                }
                Some(pb::generate_event::Event::PromptLogits(_)) | None => {}
            }
        }
    }

    fn token(&mut self, id: u32) -> Next {
        let now = Instant::now();
        let metrics = &self.app.metrics;
        if self.tokens == 0 {
            metrics.first_token((now - self.started).as_secs_f64());
        } else {
            metrics.inter_token((now - self.last).as_secs_f64());
        }
        self.last = now;
        self.tokens += 1;
        // A stop id has no text.
        if self.app.backend.stop_ids.contains(&id) {
            return Next::Text(String::new());
        }
        match self.text.push(id) {
            Piece::Text(s) => Next::Text(s),
            Piece::Stopped(s) => {
                self.stopped = true;
                Next::Text(s)
            }
        }
    }

    fn end(&self, finish: &'static str, rest: String) -> Next {
        Next::End {
            tokens: self.tokens,
            finish,
            rest,
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `usage` object, counted into the metrics.
fn usage(app: &App, job: &Completion, completion: usize) -> Value {
    let prompt = job.valid.prompt.len();
    app.metrics.tokens(prompt, completion);
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// The whole answer as one JSON body.
pub async fn collect(
    app: &App,
    job: Completion,
    stream: tonic::Streaming<pb::GenerateEvent>,
) -> Result<Response, ApiError> {
    let mut out = String::new();
    let mut tokens = Tokens::new(app, &job, stream);
    let (count, finish) = loop {
        match tokens.next().await? {
            Next::Text(s) => out.push_str(&s),
            Next::End {
                tokens,
                finish,
                rest,
            } => {
                out.push_str(&rest);
                break (tokens, finish);
            }
        }
    };
    drop(tokens);
    let chat = job.valid.chat;
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": out},
               "logprobs": null, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": out, "logprobs": null, "finish_reason": finish})
    };
    Ok(Json(json!({
        "id": job.id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": now_s(),
        "model": app.validator.model_name,
        "choices": [choice],
        "usage": usage(app, &job, count),
    }))
    .into_response())
}

/// One streamed chunk: a piece of text and/or the finish reason.
fn chunk(app: &App, job: &Completion, piece: Option<&str>, finish: Option<&str>) -> Value {
    let chat = job.valid.chat;
    let choice = if chat {
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
        "object": if chat { "chat.completion.chunk" } else { "text_completion" },
        "created": now_s(),
        "model": app.validator.model_name,
        "choices": [choice],
    })
}

/// The answer as server-sent events: a role chunk (chat), a chunk per token, a final chunk
/// with the finish reason, usage when asked for, then `[DONE]`; an error mid-stream is an
/// error object, then `[DONE]`. `permit` is held until the stream ends.
pub fn stream_events(
    app: Arc<App>,
    job: Completion,
    stream: tonic::Streaming<pb::GenerateEvent>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(EVENTS_BUFFERED);
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
        if job.valid.chat {
            let mut first = chunk(&app, &job, Some(""), None);
            first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            if !send(first).await {
                return;
            }
        }
        let mut tokens = Tokens::new(&app, &job, stream);
        loop {
            match tokens.next().await {
                Ok(Next::Text(p)) => {
                    if !send(chunk(&app, &job, Some(&p), None)).await {
                        return; // the client went away
                    }
                }
                Ok(Next::End {
                    tokens: count,
                    finish,
                    rest,
                }) => {
                    drop(tokens);
                    let piece = (!rest.is_empty()).then_some(rest.as_str());
                    let _ = send(chunk(&app, &job, piece, Some(finish))).await;
                    let usage = usage(&app, &job, count);
                    if job.valid.request.include_usage {
                        let mut last = chunk(&app, &job, None, None);
                        last["choices"] = json!([]);
                        last["usage"] = usage;
                        let _ = send(last).await;
                    }
                    break;
                }
                Err(e) => {
                    let _ = send(e.body()).await;
                    break;
                }
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}
