//! `AttentionService.Generate`: token ids and sampling settings in, a stream of tokens out,
//! through the continuous-batching [`Engine`]. A request's images (encoded files) are
//! preprocessed and run through the vision tower here, once, before the engine sees the
//! request; a bad image is `INVALID_ARGUMENT`. A full queue is `RESOURCE_EXHAUSTED`; a
//! client that goes away cancels its request.

use std::sync::Arc;

use expertmesh_expert_worker::transfer::RateLimit;
use expertmesh_model::vision::preprocess;
use expertmesh_model::{
    Adjust, Constraint, Fault, FinishReason, GenerateRequest, GrammarSpec, Grammars, ImageError,
    ImageLimits, ImageRows, Model, ModelError, ProcessorConfig, SamplingParams, TokenLogprobs,
};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::attention_service_server::{AttentionService, AttentionServiceServer};
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::scheduler::{Engine, Event, Prepared, SubmitError};

pub struct AttentionServer {
    model: Arc<Model>,
    engine: Engine,
    processor: ProcessorConfig,
    limits: ImageLimits,
    /// One vision-tower run at a time: it uses every core, and waiting requests hold
    /// only their encoded bytes meanwhile.
    vision: Arc<Semaphore>,
    /// Structured outputs' compiler (none for a model without a tokenizer).
    grammars: Option<Grammars>,
    /// The dense weights this worker sends to attention workers that start without them
    /// (none when its model is not a checkpoint's files).
    dense: Option<crate::dense::DenseWeights>,
    /// The pace of the dense weights this worker sends (`--migration-mbps`; 0: none).
    migration: Arc<RateLimit>,
}

impl AttentionServer {
    pub fn new(model: Arc<Model>, engine: Engine) -> Self {
        Self {
            model,
            engine,
            processor: ProcessorConfig::default(),
            limits: ImageLimits::default(),
            vision: Arc::new(Semaphore::new(1)),
            grammars: None,
            dense: None,
            migration: Arc::new(RateLimit::new(0)),
        }
    }

    /// Sends dense weights to peers at most this fast (megabits per second; 0: no limit).
    pub fn with_migration_mbps(self, megabits_per_second: u64) -> Self {
        Self {
            migration: Arc::new(RateLimit::new(megabits_per_second)),
            ..self
        }
    }

    /// Serves structured outputs with this model's grammar compiler.
    pub fn with_grammars(self, grammars: Option<Grammars>) -> Self {
        Self { grammars, ..self }
    }

    /// Sends these dense weights to attention workers that start without them.
    pub fn with_dense_weights(self, dense: Option<crate::dense::DenseWeights>) -> Self {
        Self { dense, ..self }
    }

    /// Compiles a request's grammar off the async threads and moves it past the tokens the
    /// request resumes after (the last `resumed` of its prompt).
    async fn constraint(&self, req: &GenerateRequest) -> Result<Option<Constraint>, Status> {
        let Some(spec) = req.grammar.clone() else {
            return Ok(None);
        };
        let grammars = self.grammars.clone().ok_or_else(|| {
            status(&ModelError::Grammar {
                reason: "this model has no tokenizer".into(),
            })
        })?;
        let resumed = req.prompt[req.prompt.len().saturating_sub(req.adjust.resumed)..].to_vec();
        tokio::task::spawn_blocking(move || -> Result<Constraint, ModelError> {
            let mut c = grammars.compile(&spec)?;
            for id in resumed {
                c.consume(id)?;
            }
            Ok(c)
        })
        .await
        .map_err(|e| Status::internal(format!("compiling the grammar failed: {e}")))?
        .map(Some)
        .map_err(|e| status(&e))
    }

    /// How this model's images become tiles, and the bounds on them.
    pub fn with_images(self, processor: ProcessorConfig, limits: ImageLimits) -> Self {
        Self {
            processor,
            limits,
            ..self
        }
    }

    /// Preprocesses a request's images and runs the vision tower over them, off the async
    /// threads: the rows for the prompt's `<|patch|>` tokens.
    async fn encode_images(
        &self,
        prompt: &[u32],
        images: Vec<Vec<u8>>,
    ) -> Result<ImageRows, Status> {
        if images.is_empty() {
            return Ok(ImageRows::default());
        }
        if images.len() > self.limits.images_max {
            return Err(status(
                &ImageError::TooMany {
                    count: images.len(),
                    max: self.limits.images_max,
                }
                .into(),
            ));
        }
        if self.model.vision().is_none() {
            return Err(status(&ImageError::NoVision.into()));
        }
        let _permit = self
            .vision
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the vision tower has stopped"))?;
        let (model, processor, limits) = (self.model.clone(), self.processor.clone(), self.limits);
        let prompt = prompt.to_vec();
        tokio::task::spawn_blocking(move || -> Result<ImageRows, ModelError> {
            let pixels = images
                .iter()
                .map(|b| preprocess(b, &processor, &limits))
                .collect::<Result<Vec<_>, _>>()?;
            let rows = model.encode_images(&pixels)?;
            model.check_image_rows(&prompt, &rows)?;
            Ok(rows)
        })
        .await
        .map_err(|e| Status::internal(format!("the vision tower failed: {e}")))?
        .map_err(|e| status(&e))
    }

    pub fn into_service(self) -> AttentionServiceServer<Self> {
        AttentionServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The status a client sees for a failure: the one map from `Fault` to gRPC.
pub fn fault_status(fault: Fault, message: String) -> Status {
    match fault {
        Fault::Request => Status::invalid_argument(message),
        Fault::Unavailable => Status::unavailable(message),
        Fault::Deadline => Status::deadline_exceeded(message),
        Fault::Internal => Status::internal(message),
    }
}

/// A model error as the status a client sees.
pub fn status(e: &ModelError) -> Status {
    fault_status(e.fault(), e.to_string())
}

fn request(r: &pb::GenerateRequest) -> GenerateRequest {
    GenerateRequest {
        prompt: r.input_ids.clone(),
        max_new_tokens: r.max_tokens as usize,
        sampling: SamplingParams {
            temperature: r.temperature,
            top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
            top_k: r.top_k as usize,
            seed: r.seed,
            min_tokens: r.min_tokens as usize,
        },
        stop_ids: r.stop_ids.clone(),
        prompt_logits: r.prompt_logits,
        images: Vec::new(),
        adjust: Adjust {
            repetition_penalty: if r.repetition_penalty == 0.0 {
                1.0
            } else {
                r.repetition_penalty
            },
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            logit_bias: r.logit_bias.iter().map(|b| (b.id, b.bias)).collect(),
            resumed: r.resumed_tokens as usize,
        },
        logprobs: r.logprobs.map(|n| n as usize),
        prompt_logprobs: r.prompt_logprobs.map(|n| n as usize),
        grammar: r.grammar.as_ref().and_then(grammar_spec),
        prompt_group: (r.prompt_group != 0).then_some(r.prompt_group),
        trace: None,
    }
}

/// A grammar off the wire (an empty one: none).
fn grammar_spec(g: &pb::Grammar) -> Option<GrammarSpec> {
    use pb::grammar::Kind;
    Some(match g.kind.as_ref()? {
        Kind::JsonObject(_) => GrammarSpec::JsonObject,
        Kind::JsonSchema(s) => GrammarSpec::JsonSchema(s.clone()),
        Kind::Regex(r) => GrammarSpec::Regex(r.clone()),
        Kind::Choice(c) => GrammarSpec::Choice(c.items.clone()),
        Kind::Lark(l) => GrammarSpec::Lark(l.clone()),
    })
}

/// Log-probabilities as the wire carries them.
pub fn logprobs_message(lp: TokenLogprobs) -> pb::TokenLogprobs {
    let (top_ids, top_logprobs) = lp.top.into_iter().unzip();
    pb::TokenLogprobs {
        logprob: lp.logprob,
        top_ids,
        top_logprobs,
    }
}

/// Prompt positions per `PromptLogprobs` message: a long prompt's logprobs go out in
/// pieces well under the message cap (20 alternatives are ~150 bytes a position).
const PROMPT_LOGPROBS_PER_MESSAGE: usize = 4096;

/// The stream messages of one engine event: one for a token (without allocating a list per
/// token), a long prompt's logprobs in several.
fn events(
    e: Event,
    prompt_rows: u64,
    vocab: u64,
) -> impl Iterator<Item = Result<pb::GenerateEvent, Status>> {
    // An empty vector allocates nothing.
    match e {
        Event::PromptLogprobs(lps) => {
            None.into_iter()
                .chain(prompt_logprobs(lps, prompt_rows, vocab))
        }
        e => Some(event(e, prompt_rows, vocab))
            .into_iter()
            .chain(Vec::new()),
    }
}

/// A long prompt's logprobs as messages of at most [`PROMPT_LOGPROBS_PER_MESSAGE`]
/// positions (one, empty, for a one-token prompt).
fn prompt_logprobs(
    lps: Vec<TokenLogprobs>,
    prompt_rows: u64,
    vocab: u64,
) -> Vec<Result<pb::GenerateEvent, Status>> {
    let mut out = Vec::with_capacity(lps.len().div_ceil(PROMPT_LOGPROBS_PER_MESSAGE).max(1));
    let mut lps = lps.into_iter().peekable();
    loop {
        let piece = lps.by_ref().take(PROMPT_LOGPROBS_PER_MESSAGE).collect();
        out.push(event(Event::PromptLogprobs(piece), prompt_rows, vocab));
        if lps.peek().is_none() {
            return out;
        }
    }
}

fn event(e: Event, prompt_rows: u64, vocab: u64) -> Result<pb::GenerateEvent, Status> {
    use pb::generate_event::Event as E;
    let event = match e {
        Event::Token(id, lp) => E::Token(pb::GenerateToken {
            id,
            logprobs: lp.map(logprobs_message),
        }),
        Event::PromptLogprobs(lps) => E::PromptLogprobs(pb::PromptLogprobs {
            positions: lps.into_iter().map(logprobs_message).collect(),
        }),
        Event::PromptLogits(logits) => E::PromptLogits(expertmesh_dispatch::wire::encode_tensor(
            &logits,
            prompt_rows as usize,
            vocab as usize,
            expertmesh_dispatch::WireDType::F32,
        )),
        Event::Finished(reason) => E::Finished(pb::GenerateFinished {
            reason: match reason {
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Length => pb::FinishReason::Length,
            } as i32,
        }),
        Event::Failed(f) => return Err(fault_status(f.fault, f.message)),
    };
    Ok(pb::GenerateEvent { event: Some(event) })
}

#[tonic::async_trait]
impl AttentionService for AttentionServer {
    type GenerateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateEvent, Status>> + Send>,
    >;

    type FetchDenseWeightsStream = ReceiverStream<Result<pb::DenseWeightsPart, Status>>;

    async fn fetch_dense_weights(
        &self,
        r: Request<pb::FetchDenseWeightsRequest>,
    ) -> Result<Response<Self::FetchDenseWeightsStream>, Status> {
        use expertmesh_proto::tls::{self, PeerRole};
        tls::authorize(&r, &[PeerRole::AttentionWorker, PeerRole::Admin])?;
        let Some(dense) = self.dense.clone() else {
            return Err(Status::unimplemented(
                "this attention worker's weights are not a checkpoint's files",
            ));
        };
        Ok(Response::new(dense.send(self.migration.clone())))
    }

    async fn generate(
        &self,
        r: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The gateway (in a coordinator's process) and operators' tools.
        use expertmesh_proto::tls::{self, PeerRole};
        tls::authorize(&r, &[PeerRole::Coordinator, PeerRole::Admin])?;
        // The gateway's trace context: this request's lines here carry its trace id.
        let trace = r
            .metadata()
            .get(expertmesh_proto::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(expertmesh_proto::trace::TraceParent::parse);
        let trace_id = trace.map_or_else(String::new, |t| t.trace_id_hex());
        // The request's span here: from admission to its last event (exported with
        // `--otlp-endpoint`, as a child of the gateway's).
        let span = tracing::info_span!("generate", trace_id);
        if let Some(t) = &trace {
            expertmesh_proto::trace::join(&span, t);
        }
        let mut r = r.into_inner();
        let images = std::mem::take(&mut r.images);
        if r.logit_bias.len() > expertmesh_model::sampling::LOGIT_BIAS_MAX {
            return Err(Status::invalid_argument("too many logit_bias entries"));
        }
        let mut req = request(&r);
        req.trace = trace.map(|t| t.trace_id);
        req.validate(self.model.config().vocab_size)
            .map_err(|e| status(&e))?;
        self.model
            .check_tokens(&self.model.new_cache(), &req.prompt, req.max_new_tokens)
            .map_err(|e| status(&e))?;
        if req.prompt.is_empty() {
            return Err(status(&ModelError::EmptyPrompt));
        }
        let image_rows = self.encode_images(&req.prompt, images).await?;
        let constraint = self.constraint(&req).await?;
        let rows = req.prompt.len() as u64;
        let vocab = self.model.config().vocab_size as u64;
        span.in_scope(|| {
            tracing::info!(
                trace_id,
                prompt_tokens = req.prompt.len(),
                max_tokens = req.max_new_tokens,
                "generate"
            );
        });
        let rx = self
            .engine
            .submit_with(
                req,
                Prepared {
                    images: image_rows,
                    constraint,
                },
            )
            .map_err(|e| match e {
                SubmitError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
                SubmitError::Stopped | SubmitError::Draining => Status::unavailable(e.to_string()),
            })?;
        let mut generated = 0usize;
        let stream = futures_util::StreamExt::flat_map(ReceiverStream::new(rx), move |e| {
            match &e {
                Event::Token(..) => generated += 1,
                Event::Finished(reason) => span.in_scope(|| {
                    tracing::info!(trace_id, generated, reason = ?reason, "finished");
                }),
                Event::Failed(f) => span.in_scope(|| {
                    tracing::warn!(trace_id, generated, reason = %f.message, "failed");
                }),
                _ => {}
            }
            futures_util::stream::iter(events(e, rows, vocab))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long prompt's logprobs leave in pieces under the message cap, in order; an empty
    /// list (a one-token prompt) is still one message.
    #[test]
    fn prompt_logprobs_go_out_in_pieces() {
        let lp = |i: usize| TokenLogprobs {
            logprob: -(i as f32),
            top: vec![(1, -0.5); 20],
        };
        let all: Vec<TokenLogprobs> = (0..10_000).map(lp).collect();
        let out: Vec<_> = events(Event::PromptLogprobs(all), 1, 8).collect();
        let sizes: Vec<usize> = out
            .iter()
            .map(|e| match &e.as_ref().unwrap().event {
                Some(pb::generate_event::Event::PromptLogprobs(p)) => p.positions.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![4096, 4096, 1808]);
        let Some(pb::generate_event::Event::PromptLogprobs(last)) = &out[2].as_ref().unwrap().event
        else {
            unreachable!()
        };
        assert_eq!(last.positions[1807].logprob, -9999.0);
        assert_eq!(events(Event::PromptLogprobs(Vec::new()), 1, 8).count(), 1);
        assert_eq!(events(Event::Token(5, None), 1, 8).count(), 1);
    }
}
