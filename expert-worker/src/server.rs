//! The gRPC face of an expert worker: `ExpertService.Dispatch` (a bidirectional stream per
//! attention worker), `Info`, and `FetchExperts` (experts sent to a peer, `transfer`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::batcher::Batcher;
use crate::transfer::{chunks_to_send, RateLimit, Refusal};
use expertmesh_dispatch::wire::{reply_err, reply_ok};
use expertmesh_dispatch::DispatchBatch;

/// Replies buffered per stream before the worker waits for the client to read.
const REPLY_QUEUE: usize = 64;
/// Batches in flight per stream; the stream is not read further until one finishes.
const IN_FLIGHT_PER_STREAM: usize = 256;

/// Chunks buffered per `FetchExperts` stream.
const CHUNK_QUEUE: usize = 4;

pub struct ExpertServer {
    batcher: Batcher,
    worker_id: Arc<AtomicU64>,
    /// The pace of every expert this worker sends to peers.
    migration: Arc<RateLimit>,
}

impl ExpertServer {
    pub fn new(batcher: Batcher, worker_id: Arc<AtomicU64>) -> Self {
        Self {
            batcher,
            worker_id,
            migration: Arc::new(RateLimit::new(0)),
        }
    }

    /// Sends experts to peers at most this fast (megabits per second; 0: no limit).
    pub fn with_migration_limit(mut self, megabits_per_second: u64) -> Self {
        self.migration = Arc::new(RateLimit::new(megabits_per_second));
        self
    }

    /// `FetchExperts` over the port's plain-socket form ([`crate::framed_fetch`]), at the
    /// same pace as over gRPC.
    pub fn framed_fetch(&self) -> expertmesh_dispatch::framed::Protocol {
        crate::framed_fetch::protocol(self.batcher.shard().clone(), self.migration.clone())
    }

    /// The connections of this worker's port: framed dispatch (answered by the batcher) and
    /// framed fetches are served here; the rest (gRPC) come out for `tonic`'s
    /// `serve_with_incoming`, with [`ExpertServer::into_service`].
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
    ) -> ReceiverStream<std::io::Result<expertmesh_proto::tls::Conn>> {
        expertmesh_dispatch::framed::incoming(
            listener,
            Arc::new(self.batcher.clone()),
            vec![self.framed_fetch()],
        )
    }

    /// Serves this worker's port on `listener` (every protocol of [`ExpertServer::incoming`],
    /// gRPC with this service alone: no health service, no shutdown but the listener's end),
    /// as benchmarks and tests serve a shard.
    pub fn serve(
        self,
        listener: tokio::net::TcpListener,
    ) -> impl std::future::Future<Output = Result<(), tonic::transport::Error>> {
        let incoming = self.incoming(listener);
        expertmesh_proto::server_builder()
            .add_service(self.into_service())
            .serve_with_incoming(incoming)
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
    type FetchExpertsStream = ReceiverStream<Result<pb::WeightChunk, Status>>;

    async fn fetch_experts(
        &self,
        request: Request<pb::FetchExpertsRequest>,
    ) -> Result<Response<Self::FetchExpertsStream>, Status> {
        expertmesh_proto::tls::authorize(
            &request,
            &[
                expertmesh_proto::tls::PeerRole::ExpertWorker,
                expertmesh_proto::tls::PeerRole::Admin,
            ],
        )?;
        let shard = self.batcher.shard();
        let chunks = chunks_to_send(shard, &request.into_inner().experts).map_err(|r| match r {
            Refusal::TooMany { .. } => Status::invalid_argument(r.to_string()),
            Refusal::NotHeld(_) => Status::not_found(r.to_string()),
            Refusal::Unsupported(_) => Status::unimplemented(r.to_string()),
        })?;
        let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
        let pace = self.migration.clone();
        let shard = shard.clone();
        tokio::spawn(async move {
            for chunk in chunks {
                let bytes = chunk.data.len();
                pace.take(bytes).await;
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                shard
                    .transfers()
                    .sent_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

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
