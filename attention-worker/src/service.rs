//! `AttentionService.Generate`: token ids and sampling settings in, a stream of tokens out.
//! One generation runs at a time (continuous batching comes with the serving issue);
//! requests beyond the queue bound are refused with `RESOURCE_EXHAUSTED`.

use std::sync::Arc;

use expertmesh_model::{
    generate_with, FinishReason, GenerateRequest, Model, ModelError, SamplingParams,
};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::attention_service_server::{AttentionService, AttentionServiceServer};
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::remote::RemoteExperts;

/// Generations running or waiting at most.
const QUEUE_MAX: usize = 64;
/// Token events buffered before the generation waits for the client.
const EVENT_QUEUE: usize = 256;

pub struct AttentionServer {
    model: Arc<Model>,
    experts: RemoteExperts,
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

impl AttentionServer {
    pub fn new(model: Arc<Model>, experts: RemoteExperts) -> Self {
        Self {
            model,
            experts,
            admitted: Arc::new(Semaphore::new(QUEUE_MAX)),
            running: Arc::new(Semaphore::new(1)),
        }
    }

    pub fn into_service(self) -> AttentionServiceServer<Self> {
        AttentionServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Maps a model error to the status a client sees: its request's fault, or the cluster's.
pub fn status(e: &ModelError) -> Status {
    match e {
        ModelError::TokenOutOfVocab { .. }
        | ModelError::ContextExceeded { .. }
        | ModelError::EmptyPrompt
        | ModelError::Sampling { .. } => Status::invalid_argument(e.to_string()),
        ModelError::ExpertsUnavailable { .. } => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
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
        },
        stop_ids: r.stop_ids.clone(),
        prompt_logits: r.prompt_logits,
    }
}

#[tonic::async_trait]
impl AttentionService for AttentionServer {
    type GenerateStream = ReceiverStream<Result<pb::GenerateEvent, Status>>;

    async fn generate(
        &self,
        r: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request(&r.into_inner());
        req.sampling.validate().map_err(|e| status(&e))?;
        self.model
            .check_tokens(&self.model.new_cache(), &req.prompt, req.max_new_tokens)
            .map_err(|e| status(&e))?;
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many generations queued"))?;
        let running = self.running.clone();
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let model = self.model.clone();
        let experts = self.experts.clone();
        tokio::spawn(async move {
            let Ok(slot) = running.acquire_owned().await else {
                return;
            };
            let events = tx.clone();
            let result = tokio::task::spawn_blocking(move || {
                let out = generate_with(&model, &req, &experts, |id| {
                    let token = pb::generate_event::Event::Token(pb::GenerateToken { id });
                    // A client that went away only stops the echo.
                    let _ = events.blocking_send(Ok(pb::GenerateEvent { event: Some(token) }));
                });
                (out, req.prompt.len(), model.config().vocab_size)
            })
            .await;
            drop(slot);
            drop(admitted);
            let event = match result {
                Ok((Ok(out), rows, vocab)) => {
                    if let Some(logits) = &out.prompt_logits {
                        let t = pb::Tensor {
                            dtype: pb::DType::DtypeF32 as i32,
                            shape: vec![rows as u64, vocab as u64],
                            data: logits
                                .iter()
                                .flat_map(|v| v.to_le_bytes())
                                .collect::<Vec<u8>>()
                                .into(),
                        };
                        let e = pb::generate_event::Event::PromptLogits(t);
                        let _ = tx.send(Ok(pb::GenerateEvent { event: Some(e) })).await;
                    }
                    let reason = match out.finish_reason {
                        FinishReason::Stop => pb::FinishReason::Stop,
                        FinishReason::Length => pb::FinishReason::Length,
                    };
                    Ok(pb::GenerateEvent {
                        event: Some(pb::generate_event::Event::Finished(pb::GenerateFinished {
                            reason: reason as i32,
                        })),
                    })
                }
                Ok((Err(e), _, _)) => Err(status(&e)),
                Err(e) => Err(Status::internal(format!("generation task failed: {e}"))),
            };
            let _ = tx.send(event).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
