//! The gRPC face of an expert worker: `ExpertService.Dispatch` (a bidirectional stream per
//! attention worker) and `Info`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::batcher::Batcher;
use expertmesh_dispatch::wire::{reply_err, reply_ok};
use expertmesh_dispatch::DispatchBatch;

/// Replies buffered per stream before the worker waits for the client to read.
const REPLY_QUEUE: usize = 64;
/// Batches in flight per stream; the stream is not read further until one finishes.
const IN_FLIGHT_PER_STREAM: usize = 256;

pub struct ExpertServer {
    batcher: Batcher,
    worker_id: Arc<AtomicU64>,
}

impl ExpertServer {
    pub fn new(batcher: Batcher, worker_id: Arc<AtomicU64>) -> Self {
        Self { batcher, worker_id }
    }

    /// The tonic service, with message size caps.
    pub fn into_service(self) -> ExpertServiceServer<Self> {
        ExpertServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl ExpertService for ExpertServer {
    type DispatchStream = ReceiverStream<Result<pb::DispatchReply, Status>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<pb::DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        expertmesh_proto::tls::authorize(&request, expertmesh_proto::tls::DISPATCHERS)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        let batcher = self.batcher.clone();
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_PER_STREAM));
        tokio::spawn(async move {
            // A stream error (client gone, oversized or undecodable message) ends the
            // stream; replies still queued are dropped with it.
            while let Ok(Some(msg)) = inbound.message().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let id = msg.batch_id;
                let tx = tx.clone();
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    let reply = match DispatchBatch::try_from(msg) {
                        Err(e) => reply_err(id, &e),
                        Ok(batch) => {
                            let (rows, hidden, dtype) = (batch.rows(), batch.hidden, batch.dtype);
                            match batcher.submit(batch).await {
                                Ok(out) => reply_ok(id, out, rows, hidden, dtype),
                                Err(e) => reply_err(id, &e),
                            }
                        }
                    };
                    let _ = tx.send(Ok(reply)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoReply>, Status> {
        expertmesh_proto::tls::authorize(&request, expertmesh_proto::tls::ANY)?;
        let shard = self.batcher.shard();
        let a = shard.assignment();
        let (batches, rows) = shard.served();
        Ok(Response::new(pb::InfoReply {
            worker_id: self.worker_id.load(Ordering::Relaxed),
            epoch: a.epoch,
            experts: a.experts.into_iter().collect(),
            batches_served: batches,
            rows_served: rows,
        }))
    }
}
