//! A request's tokens as text, whichever attention worker produces them ([`Tokens`]).
//!
//! The gateway keeps what it needs to start a request again: the prompt, the sampling
//! parameters and every token already generated. When the worker's stream breaks (the
//! connection fails, the stream ends without finishing, or the worker is silent past the
//! token deadline), the request migrates: it is resubmitted to another attention worker as
//! prompt + generated tokens with the remaining budget, and the client's text simply goes
//! on. The engine is batch-invariant and a sampled draw is a function of the seed and the
//! position (`expertmesh_model::sampling`), so the migrated request produces the very tokens
//! the uninterrupted one would have. Whether a break migrates is [`migrates`], a pure
//! function; a request migrates at most [`MIGRATIONS_MAX`] times and never back to a
//! worker that failed it.

use std::time::{Duration, Instant};

use expertmesh_model::sampling::mix64;
use expertmesh_model::TokenLogprobs;
use expertmesh_proto::v1 as pb;

use crate::backend::{Resume, StartFailure};
use crate::error::ApiError;
use crate::response::Completion;
use crate::text::{Piece, StopText};
use crate::App;

/// Workers a request may be started on or moved to after its first, at most.
pub const MIGRATIONS_MAX: usize = 3;

/// What the token stream gave next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A token and the text it releases (possibly empty: one per token, so a client's count
    /// equals the usage), with its log-probabilities when the request asked for them.
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The end: tokens generated, OpenAI's finish reason, text held back until now.
    End {
        tokens: usize,
        finish: &'static str,
        rest: String,
    },
}

/// How a worker's stream broke.
#[derive(Debug)]
pub enum Break {
    /// The worker (or the connection to it) answered with a status.
    Status(tonic::Status),
    /// The stream ended without a finish event: the worker went away.
    Ended,
    /// Nothing for the token deadline.
    Silent(Duration),
}

/// Whether a request whose stream broke this way moves to another worker: every break but
/// one the request caused itself (an invalid request would fail anywhere).
pub fn migrates(b: &Break) -> bool {
    match b {
        Break::Status(s) => s.code() != tonic::Code::InvalidArgument,
        Break::Ended | Break::Silent(_) => true,
    }
}

impl Break {
    fn into_error(self) -> ApiError {
        match self {
            Break::Status(s) => s.into(),
            Break::Ended => ApiError::Unavailable("the attention worker went away".into()),
            Break::Silent(d) => {
                ApiError::Unavailable(format!("the attention worker sent nothing for {d:?}"))
            }
        }
    }
}

/// The seed of a request's `index`-th choice: the request's own for the first, so that
/// `n = 1` draws what it always did; a hash of it and the index for the others (seed + i
/// would replay the first choice's draws one position along).
pub fn choice_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        seed
    } else {
        mix64(seed ^ mix64(index as u64))
    }
}

/// One choice of a request started on a worker, before its first token.
pub struct Started {
    index: usize,
    /// The key the request's choices share (0: none).
    group: u64,
    worker: String,
    stream: Option<tonic::Streaming<pb::GenerateEvent>>,
    /// Workers that could not take it.
    failed: Vec<String>,
}

/// Whether `job`'s prompt log-probabilities are asked for (an echo with logprobs, not yet
/// given: a resumed stream gave them before).
pub fn wants_prompt_logprobs(job: &Completion) -> bool {
    let r = &job.valid.request;
    r.echo && r.logprobs.is_some() && r.resume_token_ids.is_empty()
}

/// The key `job`'s choices share on a worker (nonzero, from its id), or 0 for one choice.
fn prompt_group(job: &Completion) -> u64 {
    if job.valid.request.best_of < 2 {
        return 0;
    }
    fresh_key(job.id.bytes().fold(0, |h, b| mix64(h ^ u64::from(b)))).max(1)
}

/// A key unlikely to repeat: the clock's nanoseconds mixed with `salt` (request and tool-call
/// ids are in it).
pub fn fresh_key(salt: u64) -> u64 {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix64(stamp ^ mix64(salt))
}

/// Starts choice `index` of `job` on an attention worker (`prefer` when it can take it,
/// another one when the first cannot), after the tokens it resumes from; a failure here is
/// the response's status.
pub async fn start(
    app: &App,
    job: &Completion,
    index: usize,
    group: u64,
    prefer: Option<&str>,
) -> Result<Started, ApiError> {
    let mut failed = Vec::new();
    let resumed = &job.valid.request.resume_token_ids;
    let prompt_logprobs = wants_prompt_logprobs(job);
    if finish_of(app, job, resumed).is_some() && !prompt_logprobs {
        return Ok(Started {
            index,
            group,
            worker: String::new(),
            stream: None,
            failed,
        });
    }
    let choice = Resume {
        seed: choice_seed(job.valid.request.seed, index),
        generated: resumed,
        prompt_logprobs,
        group,
        prefer,
    };
    let (worker, stream) = resubmit(app, job, choice, &mut failed, None).await?;
    Ok(Started {
        index,
        group,
        worker,
        stream: Some(stream),
        failed,
    })
}

/// Starts every choice of `job`: the first, then the others on its worker (where they
/// share its prompt's cache); the first failure is the response's status.
pub async fn start_all(app: &App, job: &Completion) -> Result<Vec<Started>, ApiError> {
    let group = prompt_group(job);
    let first = start(app, job, 0, group, None).await?;
    let prefer = Some(first.worker.as_str()).filter(|w| !w.is_empty());
    let others = (1..job.valid.request.best_of).map(|i| start(app, job, i, group, prefer));
    let mut all = futures_util::future::try_join_all(others).await?;
    all.insert(0, first);
    Ok(all)
}

/// Why a request that generated `generated` is over without another token, if it is: its
/// last token ended it (a stop id, unless it ignores them), or its budget is spent.
fn finish_of(app: &App, job: &Completion, generated: &[u32]) -> Option<&'static str> {
    if generated.last().is_some_and(|&id| is_stop(app, job, id)) {
        Some("stop")
    } else if generated.len() >= job.valid.max_tokens {
        Some("length")
    } else {
        None
    }
}

/// Whether `id` ends `job` (the model's end ids, unless the request ignores them, and its
/// own `stop_token_ids`).
fn is_stop(app: &App, job: &Completion, id: u32) -> bool {
    let r = &job.valid.request;
    r.stop_token_ids.contains(&id) || (!r.ignore_eos && app.backend.stop_ids.contains(&id))
}

/// Starts a choice of `job` after the tokens it generated on a worker not in `failed`,
/// trying others while workers fail it in a way that [`migrates`] (each added to `failed`),
/// up to [`MIGRATIONS_MAX`] failures in all. `last` is the break that asked for it, if any.
async fn resubmit(
    app: &App,
    job: &Completion,
    choice: Resume<'_>,
    failed: &mut Vec<String>,
    mut last: Option<Break>,
) -> Result<(String, tonic::Streaming<pb::GenerateEvent>), ApiError> {
    loop {
        if let Some(b) = last.take() {
            if !migrates(&b) || failed.len() > MIGRATIONS_MAX {
                return Err(b.into_error());
            }
            last = Some(b);
        }
        match app.backend.generate(&job.valid, choice, failed).await {
            Ok(started) => return Ok(started),
            Err(StartFailure::Worker(worker, b)) => {
                if migrates(&b) {
                    app.backend.suspect(&worker);
                }
                failed.push(worker);
                last = Some(b);
            }
            // With nobody left, the last worker's failure says more than "nobody".
            Err(StartFailure::NoWorker(e)) => return Err(last.map_or(e, Break::into_error)),
        }
    }
}

/// One choice's token events as text, migrating off workers that fail it.
pub struct Tokens<'a> {
    app: &'a App,
    job: &'a Completion,
    /// Which choice of the request (`n`).
    index: usize,
    /// The key the request's choices share (0: none).
    group: u64,
    /// The prompt's log-probabilities, once the worker sent them (when asked for).
    prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// `None` when the request was already complete when it was resumed.
    stream: Option<tonic::Streaming<pb::GenerateEvent>>,
    /// The worker the stream comes from.
    worker: String,
    /// Workers that failed this request (never picked again for it).
    failed: Vec<String>,
    /// Every token generated so far, stop ids included: what a migration resubmits.
    generated: Vec<u32>,
    text: StopText<'a>,
    patience: Duration,
    started: Instant,
    last: Instant,
    /// Set when a stop string ended the text: the next call ends.
    stopped: bool,
}

impl<'a> Tokens<'a> {
    /// The text of `job`, from the worker it was [`start`]ed on. Tokens it resumes from
    /// are replayed into the stop-string state, their text not given again.
    pub fn new(app: &'a App, job: &'a Completion, started: Started) -> Self {
        let now = Instant::now();
        let mut tokens = Self {
            app,
            job,
            index: started.index,
            group: started.group,
            prompt_logprobs: None,
            stream: started.stream,
            worker: started.worker,
            failed: started.failed,
            generated: Vec::new(),
            text: StopText::new(
                app.validator.tokenizer.as_ref(),
                job.valid.request.stop.clone(),
            ),
            patience: Duration::from_millis(app.config.token_timeout_ms),
            started: now,
            last: now,
            stopped: false,
        };
        for &id in &job.valid.request.resume_token_ids {
            tokens.generated.push(id);
            if !is_stop(app, job, id) {
                tokens.stopped |= matches!(tokens.text.push(id), Piece::Stopped(_));
            }
        }
        tokens
    }

    /// Which choice of the request this is.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The prompt's log-probabilities (from its second token), once the worker sent them:
    /// before the first token, when [`wants_prompt_logprobs`]. Taken once.
    pub fn take_prompt_logprobs(&mut self) -> Option<Vec<TokenLogprobs>> {
        self.prompt_logprobs.take()
    }

    /// The next piece of text, or the end. Dropping `self` (after a stop string, or when the
    /// client leaves) drops the stream, which ends the request on the worker.
    pub async fn next(&mut self) -> Result<Next, ApiError> {
        if self.stopped {
            return Ok(self.end("stop", String::new()));
        }
        loop {
            let Some(stream) = self.stream.as_mut() else {
                let finish = finish_of(self.app, self.job, &self.generated).unwrap_or("length");
                let rest = self.text.finish();
                return Ok(self.end(finish, rest));
            };
            let event = match tokio::time::timeout(self.patience, stream.message()).await {
                Err(_) => Err(Break::Silent(self.patience)),
                Ok(Err(status)) => Err(Break::Status(status)),
                Ok(Ok(None)) => Err(Break::Ended),
                Ok(Ok(Some(event))) => Ok(event),
            };
            let event = match event {
                Ok(e) => e,
                Err(b) => {
                    if let Some(end) = self.migrate(b).await? {
                        return Ok(end);
                    }
                    continue;
                }
            };
            match event.event {
                Some(pb::generate_event::Event::Token(t)) => {
                    return Ok(self.token(t.id, t.logprobs.map(token_logprobs)))
                }
                Some(pb::generate_event::Event::PromptLogprobs(p)) => {
                    // Several messages for a long prompt, in order.
                    let lps = self.prompt_logprobs.get_or_insert_with(Vec::new);
                    lps.extend(p.positions.into_iter().map(token_logprobs));
                    lps.truncate(self.job.valid.prompt.len().saturating_sub(1));
                }
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

    /// Moves the request to another worker after `b`; the end instead when nothing is left
    /// to generate (the worker died between the last token and its finish event).
    async fn migrate(&mut self, b: Break) -> Result<Option<Next>, ApiError> {
        // The prompt's logprobs come in several messages: a break among them asks again.
        let whole = self.job.valid.prompt.len().saturating_sub(1);
        let prompt_logprobs = wants_prompt_logprobs(self.job)
            && self
                .prompt_logprobs
                .as_ref()
                .is_none_or(|l| l.len() < whole);
        if prompt_logprobs {
            self.prompt_logprobs = None;
        }
        if let Some(finish) = finish_of(self.app, self.job, &self.generated) {
            if !prompt_logprobs {
                let rest = self.text.finish();
                return Ok(Some(self.end(finish, rest)));
            }
        }
        if !migrates(&b) {
            return Err(b.into_error());
        }
        self.app.backend.suspect(&self.worker);
        self.failed.push(std::mem::take(&mut self.worker));
        self.app.metrics.migration();
        let choice = Resume {
            seed: choice_seed(self.job.valid.request.seed, self.index),
            generated: &self.generated,
            prompt_logprobs,
            group: self.group,
            prefer: None,
        };
        let (worker, stream) =
            resubmit(self.app, self.job, choice, &mut self.failed, Some(b)).await?;
        self.worker = worker;
        self.stream = Some(stream);
        Ok(None)
    }

    fn token(&mut self, id: u32, logprobs: Option<TokenLogprobs>) -> Next {
        let now = Instant::now();
        let metrics = &self.app.metrics;
        if self.generated.len() == self.job.valid.request.resume_token_ids.len() {
            metrics.first_token((now - self.started).as_secs_f64());
        } else {
            metrics.inter_token((now - self.last).as_secs_f64());
        }
        self.last = now;
        self.generated.push(id);
        // A stop id has no text.
        let text = if is_stop(self.app, self.job, id) {
            String::new()
        } else {
            match self.text.push(id) {
                Piece::Text(s) => s,
                Piece::Stopped(s) => {
                    self.stopped = true;
                    s
                }
            }
        };
        Next::Token { id, text, logprobs }
    }

    fn end(&self, finish: &'static str, rest: String) -> Next {
        Next::End {
            tokens: self.generated.len(),
            finish,
            rest,
        }
    }
}

/// Log-probabilities off the wire (a worker's alternatives paired as far as both lists go).
fn token_logprobs(t: pb::TokenLogprobs) -> TokenLogprobs {
    TokenLogprobs {
        logprob: t.logprob,
        top: t.top_ids.into_iter().zip(t.top_logprobs).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_draw_apart() {
        assert_eq!(choice_seed(42, 0), 42);
        let seeds: std::collections::BTreeSet<u64> = (0..16).map(|i| choice_seed(42, i)).collect();
        assert_eq!(seeds.len(), 16);
        assert_ne!(choice_seed(42, 1), choice_seed(43, 1));
    }

    #[test]
    fn only_the_requests_own_faults_stay_put() {
        use tonic::{Code, Status};
        let cases = [
            (Break::Status(Status::invalid_argument("too long")), false),
            (
                Break::Status(Status::unavailable("connection refused")),
                true,
            ),
            (Break::Status(Status::unknown("error reading a body")), true),
            (Break::Status(Status::internal("h2 protocol error")), true),
            (
                Break::Status(Status::resource_exhausted("queue full")),
                true,
            ),
            (Break::Status(Status::new(Code::DeadlineExceeded, "")), true),
            (Break::Ended, true),
            (Break::Silent(Duration::from_secs(1)), true),
        ];
        for (b, want) in cases {
            assert_eq!(migrates(&b), want, "{b:?}");
        }
    }
}
