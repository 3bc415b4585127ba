//! Response shaping: a request's text ([`Tokens`], which also migrates it off a failed
//! worker) becomes one OpenAI JSON body ([`collect`]) or
//! a stream of server-sent events ([`stream_events`], through a bounded channel: a slow
//! client slows its own request, never the gateway's memory; each chunk serialized once from
//! borrowed fields, and the events queued when the connection can take more written
//! together), with usage counts.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::Stream;

use crate::error::ApiError;
use crate::request::ValidRequest;
use crate::stream::{Next, Started, Tokens};
use crate::App;

/// SSE events buffered toward one client before its request waits.
const EVENTS_BUFFERED: usize = 64;

/// A request being answered: its checked form and its response id.
pub struct Completion {
    pub id: String,
    pub valid: ValidRequest,
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
pub async fn collect(app: &App, job: Completion, started: Started) -> Result<Response, ApiError> {
    let (mut out, mut ids) = (String::new(), Vec::new());
    let mut tokens = Tokens::new(app, &job, started);
    let (count, finish) = loop {
        match tokens.next().await? {
            Next::Token { id, text } => {
                out.push_str(&text);
                ids.push(id);
            }
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
    let mut choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": out},
               "logprobs": null, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": out, "logprobs": null, "finish_reason": finish})
    };
    if job.valid.request.return_token_ids {
        choice["token_ids"] = json!(ids);
    }
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

/// One streamed chunk as OpenAI shapes it, serialized straight from borrowed fields (no JSON
/// tree per token).
#[derive(Serialize)]
struct StreamChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    /// One choice, or none in the closing usage chunk.
    choices: &'a [StreamChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum StreamChoice<'a> {
    Chat {
        index: u32,
        delta: Delta<'a>,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token_ids: Option<&'a [u32]>,
    },
    Text {
        index: u32,
        text: &'a str,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token_ids: Option<&'a [u32]>,
    },
}

/// A chat chunk's delta: `{}`, `{"content": …}`, or the first chunk's role.
#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// One server-sent event, rendered: `data: <json>` and the blank line.
fn sse_event(data: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, data).expect("chunks serialize to JSON");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// What one streamed chunk carries.
#[derive(Default)]
struct Content<'a> {
    /// A piece of text.
    piece: Option<&'a str>,
    /// The token ids behind it (when the request asked for them).
    token_ids: Option<&'a [u32]>,
    finish: Option<&'a str>,
    /// The first chat chunk, which names the role.
    role: bool,
    /// The closing usage chunk, which has no choice.
    usage: Option<&'a Value>,
}

/// One streamed chunk.
fn chunk(app: &App, job: &Completion, c: Content<'_>) -> Bytes {
    let Content {
        piece,
        token_ids,
        finish,
        role,
        usage,
    } = c;
    let chat = job.valid.chat;
    let choice = if chat {
        StreamChoice::Chat {
            index: 0,
            delta: Delta {
                role: role.then_some("assistant"),
                content: if role { Some("") } else { piece },
            },
            logprobs: None,
            finish_reason: finish,
            token_ids,
        }
    } else {
        StreamChoice::Text {
            index: 0,
            text: piece.unwrap_or(""),
            logprobs: None,
            finish_reason: finish,
            token_ids,
        }
    };
    let choices = [choice];
    sse_event(&StreamChunk {
        id: &job.id,
        object: if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        },
        created: now_s(),
        model: &app.validator.model_name,
        choices: if usage.is_some() { &[] } else { &choices },
        usage,
    })
}

/// The events of one response as its body: every event already queued goes out in one
/// write (a slow reader, or several tokens at once, costs one write, not one each).
struct Batched(mpsc::Receiver<Bytes>);

impl Stream for Batched {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let first = match self.0.poll_recv(cx) {
            Poll::Ready(Some(b)) => b,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let Ok(second) = self.0.try_recv() else {
            return Poll::Ready(Some(Ok(first)));
        };
        let mut all = Vec::with_capacity(first.len() + second.len());
        all.extend_from_slice(&first);
        all.extend_from_slice(&second);
        while let Ok(more) = self.0.try_recv() {
            all.extend_from_slice(&more);
        }
        Poll::Ready(Some(Ok(Bytes::from(all))))
    }
}

/// The answer as server-sent events: a role chunk (chat), a chunk per token, a final chunk
/// with the finish reason, usage when asked for, then `[DONE]`; an error mid-stream is an
/// error object, then `[DONE]`. `permit` is held until the stream ends.
pub fn stream_events(
    app: Arc<App>,
    job: Completion,
    started: Started,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(EVENTS_BUFFERED);
    tokio::spawn(async move {
        let _permit = permit;
        let send = |event: Bytes| {
            let tx = tx.clone();
            async move { tx.send(event).await.is_ok() }
        };
        let role = Content {
            role: true,
            ..Content::default()
        };
        if job.valid.chat && !send(chunk(&app, &job, role)).await {
            return;
        }
        let with_ids = job.valid.request.return_token_ids;
        let mut tokens = Tokens::new(&app, &job, started);
        loop {
            match tokens.next().await {
                Ok(Next::Token { id, text }) => {
                    let id = [id];
                    let c = Content {
                        piece: Some(&text),
                        token_ids: with_ids.then_some(&id[..]),
                        ..Content::default()
                    };
                    if !send(chunk(&app, &job, c)).await {
                        return; // the client went away
                    }
                }
                Ok(Next::End {
                    tokens: count,
                    finish,
                    rest,
                }) => {
                    drop(tokens);
                    let end = Content {
                        piece: (!rest.is_empty()).then_some(rest.as_str()),
                        token_ids: with_ids.then_some(&[][..]),
                        finish: Some(finish),
                        ..Content::default()
                    };
                    let _ = send(chunk(&app, &job, end)).await;
                    let usage = usage(&app, &job, count);
                    if job.valid.request.include_usage {
                        let last = Content {
                            usage: Some(&usage),
                            ..Content::default()
                        };
                        let _ = send(chunk(&app, &job, last)).await;
                    }
                    break;
                }
                Err(e) => {
                    let _ = send(sse_event(&e.body())).await;
                    break;
                }
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(Batched(rx)))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[test]
    fn chunks_have_the_openai_shape() {
        let choice = [StreamChoice::Chat {
            index: 0,
            delta: Delta {
                role: None,
                content: Some("hi"),
            },
            logprobs: None,
            finish_reason: None,
            token_ids: None,
        }];
        let c = StreamChunk {
            id: "chatcmpl-1",
            object: "chat.completion.chunk",
            created: 7,
            model: "m",
            choices: &choice,
            usage: None,
        };
        let event = sse_event(&c);
        let text = std::str::from_utf8(&event).unwrap();
        let json = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(json).unwrap(),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                   "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"},
                   "logprobs": null, "finish_reason": null}]})
        );
        let usage = json!({"prompt_tokens": 1});
        let last = StreamChunk {
            choices: &[],
            usage: Some(&usage),
            ..c
        };
        let v: Value =
            serde_json::from_slice(&sse_event(&last)[6..]).expect("the usage chunk is JSON");
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"], usage);
    }

    /// Events already queued leave in one body chunk, in order; one alone is not copied.
    #[tokio::test]
    async fn queued_events_are_written_together() {
        let (tx, rx) = mpsc::channel(8);
        for e in ["a", "b", "c"] {
            tx.send(Bytes::from(e)).await.unwrap();
        }
        let mut body = Batched(rx);
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from("abc"));
        tx.send(Bytes::from("d")).await.unwrap();
        drop(tx);
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from("d"));
        assert!(body.next().await.is_none());
    }
}
