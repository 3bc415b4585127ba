//! `GrpcDispatch`: the `Dispatch` seam over one long-lived bidirectional gRPC stream to a
//! remote expert worker ([`crate::link`] multiplexes the batches in flight on it and
//! reconnects after it breaks).

use std::sync::Arc;
use std::time::Duration;

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::link::{Connect, Link, Opening, Waiters};
use crate::{Dispatch, DispatchBatch, DispatchError, DispatchFuture};

/// Requests buffered toward one worker before senders wait.
const REQUEST_QUEUE: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of one expert worker.
pub struct GrpcDispatch {
    link: Arc<Link<GrpcStream>>,
}

impl GrpcDispatch {
    /// `address` is `host:port`; nothing is connected until the first dispatch.
    pub fn new(address: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            link: Arc::new(Link::new(address.into(), GrpcStream)),
        })
    }

    /// A channel to `address` with connect timeout and message caps.
    pub async fn channel(address: &str) -> Result<Channel, DispatchError> {
        let endpoint = expertmesh_proto::endpoint(address, CONNECT_TIMEOUT)
            .map_err(|e| DispatchError::Unavailable(format!("{address}: {e}")))?;
        expertmesh_proto::tls::connect_channel(
            endpoint,
            address,
            expertmesh_proto::tls::PeerRole::ExpertWorker,
        )
        .await
        .map_err(|e| DispatchError::Unavailable(format!("{address}: {e}")))
    }
}

/// One `ExpertService.Dispatch` stream per connection.
struct GrpcStream;

impl Connect for GrpcStream {
    type Message = pb::DispatchRequest;

    fn open(&self, address: String, waiters: Arc<Waiters>) -> Opening<pb::DispatchRequest> {
        Box::pin(async move {
            let channel = GrpcDispatch::channel(&address).await?;
            let mut client = ExpertServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
            let unavailable = |why: &str| DispatchError::Unavailable(format!("{address}: {why}"));
            let response =
                tokio::time::timeout(CONNECT_TIMEOUT, client.dispatch(ReceiverStream::new(rx)))
                    .await
                    .map_err(|_| unavailable("stream setup timed out"))?
                    .map_err(|s| unavailable(s.message()))?;
            let mut inbound = response.into_inner();
            tokio::spawn(async move {
                let why = loop {
                    match inbound.message().await {
                        Ok(Some(reply)) => waiters.answer(reply),
                        Ok(None) => break "the worker closed the stream".to_string(),
                        Err(s) => break s.message().to_string(),
                    }
                };
                // The request side closes with the stream (the call owns it), so the next
                // dispatch reconnects.
                waiters.fail_all(&format!("{address}: {why}"));
            });
            Ok(tx)
        })
    }

    fn encode(&self, batch: DispatchBatch) -> Result<pb::DispatchRequest, DispatchError> {
        Ok(pb::DispatchRequest::from(batch))
    }
}

impl Dispatch for GrpcDispatch {
    fn dispatch(&self, batch: DispatchBatch) -> DispatchFuture {
        Box::pin(self.link.clone().send(batch))
    }
}
