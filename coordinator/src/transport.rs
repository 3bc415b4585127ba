//! Raft messages to one peer coordinator over gRPC.

use std::time::Duration;

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;

use crate::node::Input;

/// Deadline of one raft RPC to a peer.
const PEER_RPC_TIMEOUT: Duration = Duration::from_secs(1);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Sends one peer's message batches, in order, each RPC with a deadline; reports failures
/// (and snapshot outcomes) back to the loop.
pub(crate) async fn peer_sender(
    from: u64,
    to: u64,
    address: String,
    mut rx: mpsc::Receiver<Vec<Message>>,
    inputs: mpsc::Sender<Input>,
) {
    // Pinged: a connection that stops carrying anything (a peer cut off, or back under a
    // new address while this end still holds the old connection) is dropped within
    // KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT and dialled again, instead of timing out every
    // batch on it forever.
    let Ok(endpoint) = expertmesh_proto::watched_endpoint(&address, PEER_CONNECT_TIMEOUT) else {
        tracing::warn!("coordinator {from}: bad address {address:?} for coordinator {to}");
        return;
    };
    let channel = expertmesh_proto::tls::channel(
        endpoint.timeout(PEER_RPC_TIMEOUT),
        &address,
        expertmesh_proto::tls::PeerRole::Coordinator,
    );
    let mut client = CoordinatorServiceClient::new(channel)
        .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES);
    let mut reachable = true;
    while let Some(mut batch) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let snapshot = batch
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let request = pb::RaftMessages {
            from,
            messages: batch
                .iter()
                .map(|m| m.write_to_bytes().expect("raft messages encode"))
                .collect(),
        };
        let outcome = client.raft(request).await;
        let delivered = outcome.is_ok();
        // Said when the peer stops answering and when it answers again, not per batch.
        match (&outcome, reachable) {
            (Err(status), true) => {
                tracing::warn!(
                    "coordinator {from}: raft messages to coordinator {to} fail: {status}"
                );
            }
            (Ok(_), false) => tracing::info!("coordinator {from}: coordinator {to} answers again"),
            _ => {}
        }
        reachable = delivered;
        if !delivered || snapshot {
            let _ = inputs.try_send(Input::Sent {
                to,
                delivered,
                snapshot,
            });
        }
    }
}
