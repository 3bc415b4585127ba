//! How workers talk to the coordinator: register, heartbeat, and keep a current copy of the
//! cluster state. The watch reconnects on its own; while the coordinator is unreachable a
//! worker keeps the last state it had.

use std::sync::Arc;
use std::time::Duration;

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::state::{ClusterView, Role};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of every unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("coordinator refused: {0}")]
    Refused(String),
    #[error("{0}")]
    State(#[from] crate::state::StateError),
}

/// A connection to the coordinator.
#[derive(Clone)]
pub struct CoordinatorClient {
    address: String,
    client: CoordinatorServiceClient<Channel>,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub role: Role,
    pub address: String,
    pub capacity: Option<usize>,
    pub model_fingerprint: String,
}

impl CoordinatorClient {
    /// Connects lazily: the first call dials, with a connect timeout and a per-call deadline.
    pub fn new(address: &str) -> Result<Self, ClientError> {
        let channel = expertmesh_proto::endpoint(address, CONNECT_TIMEOUT)
            .map_err(|e| ClientError::Unreachable {
                address: address.into(),
                reason: e.to_string(),
            })?
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        Ok(Self {
            address: address.into(),
            client: CoordinatorServiceClient::new(channel),
        })
    }

    fn status(&self, s: tonic::Status) -> ClientError {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ClientError::Unreachable {
                    address: self.address.clone(),
                    reason: s.message().into(),
                }
            }
            _ => ClientError::Refused(s.message().into()),
        }
    }

    /// Registers, retrying while the coordinator is unreachable, for at most `patience`.
    pub async fn register(&self, r: &Registration, patience: Duration) -> Result<u64, ClientError> {
        let request = pb::RegisterRequest {
            role: pb::Role::from(r.role) as i32,
            address: r.address.clone(),
            expert_capacity: r.capacity.unwrap_or(0) as u32,
            has_capacity: r.capacity.is_some(),
            pid: std::process::id(),
            model_fingerprint: r.model_fingerprint.clone(),
        };
        let give_up = tokio::time::Instant::now() + patience;
        loop {
            match self.client.clone().register(request.clone()).await {
                Ok(reply) => return Ok(reply.into_inner().worker_id),
                Err(s) => match self.status(s) {
                    e @ ClientError::Unreachable { .. }
                        if tokio::time::Instant::now() >= give_up =>
                    {
                        return Err(e)
                    }
                    ClientError::Unreachable { .. } => tokio::time::sleep(RETRY_DELAY).await,
                    e => return Err(e),
                },
            }
        }
    }

    /// Registers and keeps heartbeating every `heartbeat`, each beat carrying what `load`
    /// reports: what every worker does on start.
    pub async fn join(
        &self,
        r: &Registration,
        patience: Duration,
        heartbeat: Duration,
        load: impl Fn() -> Option<pb::WorkerLoad> + Send + 'static,
    ) -> Result<u64, ClientError> {
        let id = self.register(r, patience).await?;
        self.spawn_heartbeat(id, heartbeat, load);
        Ok(id)
    }

    pub async fn state(&self) -> Result<ClusterView, ClientError> {
        let s = self
            .client
            .clone()
            .get_state(pb::GetStateRequest {})
            .await
            .map_err(|s| self.status(s))?;
        Ok(ClusterView::try_from(s.into_inner())?)
    }

    /// Heartbeats every `interval` until the task is dropped with the runtime.
    pub fn spawn_heartbeat(
        &self,
        worker_id: u64,
        interval: Duration,
        load: impl Fn() -> Option<pb::WorkerLoad> + Send + 'static,
    ) {
        let mut client = self.client.clone();
        tokio::spawn(async move {
            loop {
                let beat = pb::HeartbeatRequest {
                    worker_id,
                    load: load(),
                };
                let _ = client.heartbeat(beat).await;
                tokio::time::sleep(interval).await;
            }
        });
    }

    /// A receiver that always holds the newest state seen (`None` before the first).
    pub fn watch(&self) -> watch::Receiver<Option<Arc<ClusterView>>> {
        let (tx, rx) = watch::channel(None);
        let mut client = self.client.clone();
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                if tx.is_closed() {
                    return;
                }
                if let Ok(response) = client
                    .watch_state(pb::WatchStateRequest {
                        after_version: after,
                    })
                    .await
                {
                    let mut stream = response.into_inner();
                    while let Ok(Some(state)) = stream.message().await {
                        if let Ok(view) = ClusterView::try_from(state) {
                            after = view.version;
                            if tx.send(Some(Arc::new(view))).is_err() {
                                return;
                            }
                        }
                    }
                }
                tokio::time::sleep(RETRY_DELAY).await;
            }
        });
        rx
    }
}
