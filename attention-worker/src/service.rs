//! `AttentionService.Generate`: token ids and sampling settings in, a stream of tokens out,
//! through the continuous-batching [`Engine`]. A full queue is `RESOURCE_EXHAUSTED`; a
//! client that goes away cancels its request.

use std::sync::Arc;

use expertmesh_model::{Fault, FinishReason, GenerateRequest, Model, ModelError, SamplingParams};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::attention_service_server::{AttentionService, AttentionServiceServer};
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::scheduler::{Engine, Event, SubmitError};

pub struct AttentionServer {
    model: Arc<Model>,
    engine: Engine,
}

impl AttentionServer {
    pub fn new(model: Arc<Model>, engine: Engine) -> Self {
        Self { model, engine }
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
        },
        stop_ids: r.stop_ids.clone(),
        prompt_logits: r.prompt_logits,
    }
}

fn event(e: Event, prompt_rows: u64, vocab: u64) -> Result<pb::GenerateEvent, Status> {
    use pb::generate_event::Event as E;
    let event = match e {
        Event::Token(id) => E::Token(pb::GenerateToken { id }),
        Event::PromptLogits(logits) => E::PromptLogits(pb::Tensor {
            dtype: pb::DType::DtypeF32 as i32,
            shape: vec![prompt_rows, vocab],
            data: logits
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }),
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

    async fn generate(
        &self,
        r: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request(&r.into_inner());
        req.sampling.validate().map_err(|e| status(&e))?;
        self.model
            .check_tokens(&self.model.new_cache(), &req.prompt, req.max_new_tokens)
            .map_err(|e| status(&e))?;
        if req.prompt.is_empty() {
            return Err(status(&ModelError::EmptyPrompt));
        }
        let rows = req.prompt.len() as u64;
        let vocab = self.model.config().vocab_size as u64;
        let rx = self.engine.submit(req).map_err(|e| match e {
            SubmitError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            SubmitError::Stopped => Status::unavailable(e.to_string()),
        })?;
        let stream = ReceiverStream::new(rx).map(move |e| event(e, rows, vocab));
        Ok(Response::new(Box::pin(stream)))
    }
}
