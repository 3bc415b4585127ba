//! # expertmesh-coordinator
//!
//! The coordinator keeps the cluster's membership and decides which expert worker holds
//! which expert. Its loop: workers `Register` (role, address, capacity); each expert-worker
//! registration re-runs [`placement::assign`] (a pure function) over the live expert
//! workers; a changed placement gets a new epoch; the new [`state::ClusterView`] is
//! published to every `WatchState` stream. Attention workers route under the epoch they
//! see; expert workers load the experts it gives them.
//!
//! One replica for now, state in memory; raft replication and failure detection come with
//! the replicated-coordinator issue.

pub mod client;
pub mod placement;
pub mod service;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;

pub use client::{ClientError, CoordinatorClient, Registration};
pub use service::Coordinator;
pub use state::{ClusterView, Member, Placement, Role};

/// Serves `coordinator` on `listener` until `shutdown` completes.
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(coordinator.into_service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// The address a listener actually bound (port 0 becomes a real port).
pub fn bound(listener: &tokio::net::TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
