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
use crate::logprobs::Logprobs;
use crate::openai::Prompt;
use crate::request::ValidRequest;
use crate::stream::{fresh_key, Next, Started, Tokens};
use crate::tools::{may_be_call, parse_calls};
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

/// The prompt as an echo gives it back: the request's own text, or its ids decoded.
fn prompt_text(app: &App, job: &Completion) -> String {
    match &job.valid.request.prompt {
        Prompt::Text(s) => s.clone(),
        _ => app
            .validator
            .tokenizer
            .as_ref()
            .and_then(|t| t.decode(&job.valid.prompt).ok())
            .unwrap_or_default(),
    }
}

/// The tool calls in a chat choice's whole text, as OpenAI's `tool_calls` list (each with
/// its position, a fresh id, and the function's name and arguments), when the request reads
/// calls and the text is calls of its functions.
fn calls_in(job: &Completion, choice: usize, text: &str) -> Option<Value> {
    let tools = job.valid.request.tools.as_ref().filter(|t| t.parsed())?;
    let calls = parse_calls(text, &tools.names)?;
    let calls = calls.into_iter().enumerate().map(|(i, c)| {
        let id = fresh_key(((choice as u64) << 32) | i as u64);
        json!({"id": format!("call_{id:016x}"), "type": "function",
               "function": {"name": c.name, "arguments": c.arguments}})
    });
    Some(Value::Array(calls.collect()))
}

/// The echoed prompt's tokens into a choice's `logprobs`, with the figures the worker sent
/// before its first event.
fn echo_logprobs(job: &Completion, tokens: &mut Tokens<'_>, logprobs: Option<&mut Logprobs<'_>>) {
    if let Some(l) = logprobs {
        l.prompt(
            &job.valid.prompt,
            &tokens.take_prompt_logprobs().unwrap_or_default(),
        );
    }
}

/// A choice's log-probabilities, when its request asked for them.
fn new_logprobs<'a>(app: &'a App, job: &Completion) -> Option<Logprobs<'a>> {
    job.valid
        .request
        .logprobs
        .map(|_| Logprobs::new(app.validator.tokenizer.as_ref(), job.valid.chat))
}

/// One choice's whole answer: its JSON, how many tokens it generated, and their
/// cumulative logprob (when the worker sent logprobs).
async fn collect_choice(
    app: &App,
    job: &Completion,
    started: Started,
) -> Result<(Value, usize, f64), ApiError> {
    let mut cumulative = 0.0;
    let (mut out, mut ids) = (String::new(), Vec::new());
    let mut logprobs = new_logprobs(app, job);
    let echo = job.valid.request.echo;
    if echo {
        out.push_str(&prompt_text(app, job));
    }
    let mut tokens = Tokens::new(app, job, started);
    let index = tokens.index();
    let mut first = true;
    let (count, finish) = loop {
        let next = tokens.next().await?;
        if std::mem::take(&mut first) && echo {
            echo_logprobs(job, &mut tokens, logprobs.as_mut());
        }
        match next {
            Next::Token {
                id,
                text,
                logprobs: lp,
            } => {
                out.push_str(&text);
                ids.push(id);
                cumulative += lp.as_ref().map_or(0.0, |l| f64::from(l.logprob));
                if let (Some(l), Some(lp)) = (logprobs.as_mut(), lp) {
                    l.token(id, &lp);
                }
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
    let logprobs = logprobs.as_mut().map_or(Value::Null, Logprobs::take);
    let mut choice = if job.valid.chat {
        let (message, finish) = match calls_in(job, index, &out) {
            Some(calls) => (
                json!({"role": "assistant", "content": null, "tool_calls": calls}),
                "tool_calls",
            ),
            None => (json!({"role": "assistant", "content": out}), finish),
        };
        json!({"index": index, "message": message, "logprobs": logprobs,
               "finish_reason": finish})
    } else {
        json!({"index": index, "text": out, "logprobs": logprobs, "finish_reason": finish})
    };
    if job.valid.request.return_token_ids {
        choice["token_ids"] = json!(ids);
    }
    Ok((choice, count, cumulative))
}

/// The whole answer as one JSON body, its choices generated side by side.
pub async fn collect(
    app: &App,
    job: Completion,
    started: Vec<Started>,
) -> Result<Response, ApiError> {
    let each = started.into_iter().map(|s| collect_choice(app, &job, s));
    let mut choices = futures_util::future::try_join_all(each).await?;
    // Usage counts every token generated, best_of's discarded choices included.
    let count = choices.iter().map(|c| c.1).sum();
    let n = job.valid.request.n;
    if choices.len() > n {
        choices.sort_by(|a, b| b.2.total_cmp(&a.2));
        choices.truncate(n);
        for (i, c) in choices.iter_mut().enumerate() {
            c.0["index"] = json!(i);
        }
    }
    let chat = job.valid.chat;
    Ok(Json(json!({
        "id": job.id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": now_s(),
        "model": app.validator.model_name,
        "choices": choices.into_iter().map(|c| c.0).collect::<Vec<_>>(),
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
        index: usize,
        delta: Delta<'a>,
        logprobs: Option<&'a Value>,
        finish_reason: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token_ids: Option<&'a [u32]>,
    },
    Text {
        index: usize,
        text: &'a str,
        logprobs: Option<&'a Value>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a Value>,
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
    /// Which choice.
    index: usize,
    /// The log-probabilities of its tokens (when the request asked for them).
    logprobs: Option<&'a Value>,
    /// A piece of text.
    piece: Option<&'a str>,
    /// The token ids behind it (when the request asked for them).
    token_ids: Option<&'a [u32]>,
    finish: Option<&'a str>,
    /// The first chat chunk, which names the role.
    role: bool,
    /// The calls the answer made (chat with tools), in one delta.
    tool_calls: Option<&'a Value>,
    /// The closing usage chunk, which has no choice.
    usage: Option<&'a Value>,
}

/// One streamed chunk.
fn chunk(app: &App, job: &Completion, c: Content<'_>) -> Bytes {
    let Content {
        index,
        logprobs,
        piece,
        token_ids,
        finish,
        role,
        tool_calls,
        usage,
    } = c;
    let chat = job.valid.chat;
    let choice = if chat {
        StreamChoice::Chat {
            index,
            delta: Delta {
                role: role.then_some("assistant"),
                content: if role { Some("") } else { piece },
                tool_calls,
            },
            logprobs,
            finish_reason: finish,
            token_ids,
        }
    } else {
        StreamChoice::Text {
            index,
            text: piece.unwrap_or(""),
            logprobs,
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

/// Why a streamed choice stopped early.
enum Cut {
    /// The request failed: the error goes to the client.
    Failed(ApiError),
    /// The client went away.
    Gone,
}

/// One choice's chunks, sent as its tokens come: the echoed prompt first (completions'
/// `echo`), a chunk per token, the final chunk with its finish reason. The tokens it
/// generated.
async fn stream_choice(
    app: &App,
    job: &Completion,
    started: Started,
    tx: &mpsc::Sender<Bytes>,
) -> Result<usize, Cut> {
    let send = |event: Bytes| async move { tx.send(event).await.map_err(|_| Cut::Gone) };
    let with_ids = job.valid.request.return_token_ids;
    let mut logprobs = new_logprobs(app, job);
    let mut tokens = Tokens::new(app, job, started);
    let index = tokens.index();
    let mut echo = job.valid.request.echo && job.valid.request.resume_token_ids.is_empty();
    // With tools, text that may still be a call is held back until it is clearly not one
    // (then it streams) or the answer ends (then it is the calls, or text after all).
    let reads_calls = job.valid.request.tools.as_ref().is_some_and(|t| t.parsed())
        && job.valid.request.resume_token_ids.is_empty();
    let mut held = reads_calls.then(String::new);
    loop {
        let next = tokens.next().await.map_err(Cut::Failed)?;
        if std::mem::take(&mut echo) {
            let text = prompt_text(app, job);
            echo_logprobs(job, &mut tokens, logprobs.as_mut());
            let lp = logprobs.as_mut().map(Logprobs::take);
            let c = Content {
                index,
                piece: Some(&text),
                logprobs: lp.as_ref(),
                // The ids are the generated tokens' alone (what a resumed stream counts).
                token_ids: with_ids.then_some(&[][..]),
                ..Content::default()
            };
            send(chunk(app, job, c)).await?;
        }
        match next {
            Next::Token {
                id,
                text,
                logprobs: lp,
            } => {
                let lp = match (logprobs.as_mut(), lp) {
                    (Some(l), Some(lp)) => {
                        l.token(id, &lp);
                        Some(l.take())
                    }
                    _ => None,
                };
                let id = [id];
                let piece = match held.as_mut() {
                    Some(h) => {
                        h.push_str(&text);
                        if may_be_call(h) {
                            String::new()
                        } else {
                            held.take().expect("held")
                        }
                    }
                    None => text,
                };
                let c = Content {
                    index,
                    piece: Some(&piece),
                    logprobs: lp.as_ref(),
                    token_ids: with_ids.then_some(&id[..]),
                    ..Content::default()
                };
                send(chunk(app, job, c)).await?;
            }
            Next::End {
                tokens: count,
                finish,
                rest,
            } => {
                drop(tokens);
                let mut rest = rest;
                let mut finish = finish;
                let mut calls = None;
                if let Some(mut h) = held.take() {
                    h.push_str(&rest);
                    // A stream's deltas say which call each is.
                    calls = calls_in(job, index, &h).map(|mut calls| {
                        for (i, c) in calls.as_array_mut().into_iter().flatten().enumerate() {
                            c["index"] = json!(i);
                        }
                        calls
                    });
                    rest = if calls.is_some() { String::new() } else { h };
                }
                if calls.is_some() {
                    finish = "tool_calls";
                    let c = Content {
                        index,
                        tool_calls: calls.as_ref(),
                        ..Content::default()
                    };
                    send(chunk(app, job, c)).await?;
                }
                let end = Content {
                    index,
                    piece: (!rest.is_empty()).then_some(rest.as_str()),
                    token_ids: with_ids.then_some(&[][..]),
                    finish: Some(finish),
                    ..Content::default()
                };
                send(chunk(app, job, end)).await?;
                return Ok(count);
            }
        }
    }
}

/// The answer as server-sent events: a role chunk per choice (chat), the choices' chunks as
/// their tokens come (side by side, each with its `index`), usage when asked for, then
/// `[DONE]`; an error mid-stream is an error object, then `[DONE]`. `permit` is held until
/// the stream ends.
pub fn stream_events(
    app: Arc<App>,
    job: Completion,
    started: Vec<Started>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(EVENTS_BUFFERED);
    tokio::spawn(async move {
        let _permit = permit;
        if job.valid.chat {
            for index in 0..started.len() {
                let role = Content {
                    index,
                    role: true,
                    ..Content::default()
                };
                if tx.send(chunk(&app, &job, role)).await.is_err() {
                    return;
                }
            }
        }
        let each = started
            .into_iter()
            .map(|s| stream_choice(&app, &job, s, &tx));
        match futures_util::future::try_join_all(each).await {
            Ok(counts) => {
                let usage = usage(&app, &job, counts.iter().sum());
                if job.valid.request.include_usage {
                    let last = Content {
                        usage: Some(&usage),
                        ..Content::default()
                    };
                    let _ = tx.send(chunk(&app, &job, last)).await;
                }
            }
            Err(Cut::Failed(e)) => {
                let _ = tx.send(sse_event(&e.body())).await;
            }
            Err(Cut::Gone) => return,
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
                tool_calls: None,
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
