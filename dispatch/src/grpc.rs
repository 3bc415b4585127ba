//! `GrpcDispatch`: the `Dispatch` seam over one long-lived bidirectional gRPC stream to a
//! remote expert worker. Requests are multiplexed by batch id; a reader task hands each
//! reply to its waiter. When the stream breaks, every waiter gets `Unavailable` at once
//! (no hang), and the next dispatch opens a new stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::wire::decode_reply;
use crate::{Dispatch, DispatchBatch, DispatchError, DispatchFuture};

/// Requests buffered toward one worker before senders wait.
const REQUEST_QUEUE: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type Waiters = Arc<
    Mutex<
        HashMap<
            u64,
            (
                usize,
                usize,
                oneshot::Sender<Result<Vec<f32>, DispatchError>>,
            ),
        >,
    >,
>;

struct Stream {
    tx: mpsc::Sender<pb::DispatchRequest>,
    waiters: Waiters,
}

/// A client of one expert worker.
pub struct GrpcDispatch {
    link: Arc<Link>,
}

/// The stream to one worker, shared by the dispatches in flight.
struct Link {
    address: String,
    stream: tokio::sync::Mutex<Option<Arc<Stream>>>,
    next_id: AtomicU64,
}

impl GrpcDispatch {
    /// `address` is `host:port`; nothing is connected until the first dispatch.
    pub fn new(address: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            link: Arc::new(Link {
                address: address.into(),
                stream: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// A channel to `address` with connect timeout and message caps.
    pub async fn channel(address: &str) -> Result<Channel, DispatchError> {
        expertmesh_proto::endpoint(address, CONNECT_TIMEOUT)
            .map_err(|e| DispatchError::Unavailable(format!("{address}: {e}")))?
            .connect()
            .await
            .map_err(|e| DispatchError::Unavailable(format!("{address}: {e}")))
    }
}

impl Link {
    async fn open(&self) -> Result<Arc<Stream>, DispatchError> {
        let mut guard = self.stream.lock().await;
        if let Some(s) = guard.as_ref() {
            if !s.tx.is_closed() {
                return Ok(s.clone());
            }
        }
        let channel = GrpcDispatch::channel(&self.address).await?;
        let mut client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let response =
            tokio::time::timeout(CONNECT_TIMEOUT, client.dispatch(ReceiverStream::new(rx)))
                .await
                .map_err(|_| {
                    DispatchError::Unavailable(format!("{}: stream setup timed out", self.address))
                })?
                .map_err(|s| {
                    DispatchError::Unavailable(format!("{}: {}", self.address, s.message()))
                })?;
        let mut inbound = response.into_inner();
        let waiters: Waiters = Arc::default();
        let stream = Arc::new(Stream {
            tx,
            waiters: waiters.clone(),
        });
        let address = self.address.clone();
        let reader_stream = Arc::downgrade(&stream);
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(reply)) => {
                        let waiter = waiters
                            .lock()
                            .expect("waiters lock")
                            .remove(&reply.batch_id);
                        if let Some((rows, hidden, w)) = waiter {
                            let _ = w.send(decode_reply(reply, rows, hidden));
                        }
                    }
                    Ok(None) => break "the worker closed the stream".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            };
            // Closing the request side makes the next dispatch reconnect.
            drop(reader_stream);
            let drained: Vec<_> = waiters.lock().expect("waiters lock").drain().collect();
            for (_, (_, _, w)) in drained {
                let _ = w.send(Err(DispatchError::Unavailable(format!("{address}: {why}"))));
            }
        });
        *guard = Some(stream.clone());
        Ok(stream)
    }

    async fn send(self: Arc<Self>, mut batch: DispatchBatch) -> Result<Vec<f32>, DispatchError> {
        let deadline = tokio::time::Instant::now() + batch.timeout;
        let attempt = async {
            let stream = self.open().await?;
            batch.batch_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let id = batch.batch_id;
            let (w, rx) = oneshot::channel();
            stream
                .waiters
                .lock()
                .expect("waiters lock")
                .insert(id, (batch.rows(), batch.hidden, w));
            let request = pb::DispatchRequest::from(&batch);
            if stream.tx.send(request).await.is_err() {
                stream.waiters.lock().expect("waiters lock").remove(&id);
                *self.stream.lock().await = None;
                return Err(DispatchError::Unavailable(format!(
                    "{}: stream closed",
                    self.address
                )));
            }
            let result = rx.await.unwrap_or_else(|_| {
                Err(DispatchError::Unavailable(format!(
                    "{}: stream closed",
                    self.address
                )))
            });
            if matches!(result, Err(DispatchError::Unavailable(_))) {
                *self.stream.lock().await = None;
            }
            result
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(r) => r,
            Err(_) => Err(DispatchError::DeadlineExceeded),
        }
    }
}

impl Dispatch for GrpcDispatch {
    fn dispatch(&self, batch: DispatchBatch) -> DispatchFuture {
        Box::pin(self.link.clone().send(batch))
    }
}
