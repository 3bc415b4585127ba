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

pub use client::{ClientError, CoordinatorClient, Registration};
pub use service::Coordinator;
pub use state::{ClusterView, Member, Placement, Role};

/// Coordinator settings (TOML: `deploy/coordinator.toml`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// The model the cluster serves (directory or `synthetic:bench`): the coordinator
    /// reads its expert count and fingerprint, not its weights.
    pub model: String,
    /// Where the OpenAI-compatible HTTP API listens; none runs no gateway here.
    pub http: Option<String>,
    /// When set, HTTP requests must carry `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7000".into(),
            model: "tests/fixtures/tiny-maverick".into(),
            http: None,
            api_key: None,
        }
    }
}

/// Serves `coordinator` on `listener` until `shutdown` completes.
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    expertmesh_proto::server_builder()
        .add_service(coordinator.into_service())
        .serve_with_incoming_shutdown(expertmesh_proto::incoming(listener), shutdown)
        .await
}
