//! How workers talk to the coordinators: register, heartbeat, and keep a current copy of the
//! cluster state. A client holds every coordinator's address: calls go to the one that last
//! answered and move on to the next when it is unreachable (any replica forwards writes to
//! the leader). Heartbeats go to every coordinator. The watch reconnects on its own, to any
//! replica, and only ever moves forward; while no coordinator answers a worker keeps the
//! last state it had.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use expertmesh_proto::tls::{self, PeerRole};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::state::{ClusterView, Role};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of every unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long a state read keeps trying other coordinators.
const STATE_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("coordinator refused: {0}")]
    Refused(String),
    #[error("{0}")]
    State(#[from] crate::state::StateError),
}

/// Connections to the coordinators.
#[derive(Clone)]
pub struct CoordinatorClient {
    addresses: Arc<Vec<String>>,
    clients: Arc<Vec<CoordinatorServiceClient<Channel>>>,
    /// The coordinator that answered last.
    current: Arc<AtomicUsize>,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub role: Role,
    pub address: String,
    pub capacity: Option<usize>,
    pub model_fingerprint: String,
    pub join_token: Option<String>,
    /// An attention worker that holds every routed expert itself (`--dispatch local`).
    pub holds_experts: bool,
    /// An expert worker without the checkpoint's weight files (it fetches from peers).
    pub weightless: bool,
    /// An expert worker's host-memory backup slots (`--expert-backup`).
    pub backup: usize,
}

/// A registered worker's place in the cluster: its id, which changes when the worker is
/// declared dead and registers again.
#[derive(Clone, Debug)]
pub struct Membership {
    id: Arc<AtomicU64>,
    /// Held while registering again, so that the beats to every coordinator register once.
    rejoining: Arc<tokio::sync::Mutex<()>>,
    /// Bumped to beat every coordinator now rather than at the next tick.
    beat_now: Arc<watch::Sender<u64>>,
}

impl Membership {
    /// The worker's current id.
    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    /// Beats every coordinator now instead of at the next tick: the worker has news the
    /// leader waits for (it loaded a pending placement's experts, which commits only once
    /// every worker gaining experts has said so), and a tick can be a second away.
    pub fn beat_now(&self) {
        self.beat_now.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The cell the id is kept in, for a server that reports it.
    pub fn id_cell(&self) -> Arc<AtomicU64> {
        self.id.clone()
    }
}

/// What one heartbeat carries.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    /// An attention worker's load.
    pub load: Option<pb::WorkerLoad>,
    /// An expert worker: the pending placement epoch whose experts it has loaded.
    pub prepared_epoch: u64,
    /// An expert worker: its transfers in flight, and which of its experts came from peers.
    pub transfers: Vec<pb::Transfer>,
    pub fetched: Vec<pb::ExpertOrigin>,
    /// An expert worker with the checkpoint's files: digests the cluster state lacks.
    pub digests: Vec<pb::ExpertDigest>,
    /// An attention worker with the checkpoint's files: its dense weights' digest, while the
    /// cluster state has none.
    pub dense_digest: Option<u32>,
}

/// Splits a comma-separated coordinator list.
pub fn split_addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

impl CoordinatorClient {
    /// `addresses` is one address or a comma-separated list. Connects lazily: the first call
    /// dials, with a connect timeout and a per-call deadline.
    pub fn new(addresses: &str) -> Result<Self, ClientError> {
        let addresses = split_addresses(addresses);
        if addresses.is_empty() {
            return Err(ClientError::Unreachable {
                address: String::new(),
                reason: "no coordinator address given".into(),
            });
        }
        let clients = addresses
            .iter()
            .map(|a| {
                // Pinged: a coordinator that dies silently breaks the watch stream within
                // a heartbeat or two, and the next coordinator is watched.
                let endpoint = expertmesh_proto::watched_endpoint(a, CONNECT_TIMEOUT)
                    .map_err(|e| ClientError::Unreachable {
                        address: a.clone(),
                        reason: e.to_string(),
                    })?
                    .timeout(CALL_TIMEOUT);
                Ok(CoordinatorServiceClient::new(tls::channel(
                    endpoint,
                    a,
                    PeerRole::Coordinator,
                )))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Self {
            addresses: Arc::new(addresses),
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    fn error(&self, i: usize, s: tonic::Status) -> ClientError {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ClientError::Unreachable {
                    address: self.addresses[i].clone(),
                    reason: s.message().into(),
                }
            }
            _ => ClientError::Refused(s.message().into()),
        }
    }

    /// Calls `f` on the current coordinator, moving to the next while they are unreachable
    /// (or have no leader), for at most `patience`.
    async fn call<T, F, Fut>(&self, patience: Duration, f: F) -> Result<T, ClientError>
    where
        F: Fn(CoordinatorServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let give_up = tokio::time::Instant::now() + patience;
        let n = self.clients.len();
        let mut tried = 0;
        loop {
            let i = self.current.load(Ordering::Relaxed) % n;
            match f(self.clients[i].clone()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(s) => match self.error(i, s) {
                    e @ ClientError::Unreachable { .. } => {
                        if tokio::time::Instant::now() >= give_up {
                            return Err(e);
                        }
                        let _ = self.current.compare_exchange(
                            i,
                            (i + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        tried += 1;
                        if tried % n == 0 {
                            tokio::time::sleep(RETRY_DELAY).await;
                        }
                    }
                    e => return Err(e),
                },
            }
        }
    }

    /// Registers, retrying while no coordinator can commit it, for at most `patience`. The
    /// request id is fixed across retries, so a registration is applied once.
    pub async fn register(&self, r: &Registration, patience: Duration) -> Result<u64, ClientError> {
        Ok(self.admit(r, patience).await?.worker_id)
    }

    /// `register`, with the coordinators' whole answer (the worker's id and its lease).
    async fn admit(
        &self,
        r: &Registration,
        patience: Duration,
    ) -> Result<pb::RegisterReply, ClientError> {
        let request = pb::RegisterRequest {
            role: pb::Role::from(r.role) as i32,
            address: r.address.clone(),
            expert_capacity: r.capacity.unwrap_or(0) as u32,
            has_capacity: r.capacity.is_some(),
            holds_experts: r.holds_experts,
            weightless: r.weightless,
            expert_backup: r.backup as u32,
            pid: std::process::id(),
            model_fingerprint: r.model_fingerprint.clone(),
            request_id: crate::random_u64(),
            join_token: r.join_token.clone().unwrap_or_default(),
            forwarded: false,
        };
        self.call(patience, |mut c| {
            let request = request.clone();
            async move { c.register(request).await }
        })
        .await
    }

    /// Registers and keeps heartbeating every `heartbeat`, each beat carrying what `beat`
    /// reports: what every worker does on start. Beats come at least three to a lease, whatever
    /// `heartbeat` says, so a worker that is alive is never declared dead for a lease shorter
    /// than its configured interval. A worker the coordinators declared dead (cut off for
    /// longer than its lease) registers again, as a new member under a new id: what
    /// [`Membership::id`] reads from then on.
    pub async fn join(
        &self,
        r: &Registration,
        patience: Duration,
        heartbeat: Duration,
        beat: impl Fn() -> Beat + Send + Sync + 'static,
    ) -> Result<Membership, ClientError> {
        let reply = self.admit(r, patience).await?;
        let membership = Membership {
            id: Arc::new(AtomicU64::new(reply.worker_id)),
            rejoining: Arc::new(tokio::sync::Mutex::new(())),
            beat_now: Arc::new(watch::channel(0).0),
        };
        self.spawn_heartbeat(
            membership.clone(),
            r.clone(),
            beat_interval(heartbeat, reply.lease_ms),
            beat,
        );
        Ok(membership)
    }

    /// Registers again after `dead` was declared dead, unless another beat already did: the
    /// coordinators gave this worker a new id, or they keep refusing it (logged).
    async fn rejoin(&self, membership: &Membership, r: &Registration, dead: u64) {
        let _one_at_a_time = membership.rejoining.lock().await;
        if membership.id() != dead {
            return;
        }
        match self.admit(r, STATE_PATIENCE).await {
            Ok(reply) => {
                membership.id.store(reply.worker_id, Ordering::Relaxed);
                tracing::info!(
                    "worker {dead} was declared dead; registered again as worker {}",
                    reply.worker_id
                );
            }
            Err(e) => tracing::warn!("worker {dead} was declared dead; registering again: {e}"),
        }
    }

    /// The cluster state, read linearizably from any coordinator.
    pub async fn state(&self) -> Result<ClusterView, ClientError> {
        let s = self
            .call(STATE_PATIENCE, |mut c| async move {
                c.get_state(pb::GetStateRequest {}).await
            })
            .await?;
        Ok(ClusterView::try_from(s)?)
    }

    /// Every coordinator's own report (`None` for one that does not answer).
    pub async fn statuses(&self) -> Vec<(String, Option<pb::CoordinatorStatus>)> {
        let mut out = Vec::new();
        for (address, client) in self.addresses.iter().zip(self.clients.iter()) {
            let mut request = tonic::Request::new(pb::StatusRequest {});
            request.set_timeout(Duration::from_secs(2));
            let status = client.clone().status(request).await.ok();
            out.push((address.clone(), status.map(|s| s.into_inner())));
        }
        out
    }

    /// Starts moving a worker's experts away.
    pub async fn drain(&self, worker_id: u64) -> Result<(), ClientError> {
        self.call(STATE_PATIENCE, |mut c| async move {
            c.drain(pb::DrainRequest { worker_id }).await
        })
        .await?;
        Ok(())
    }

    /// The NCCL unique id of `group`: rank 0 offers the id it made (`offer`), the other
    /// ranks pass `None` and wait, up to `patience`, for it to be offered.
    pub async fn nccl_id(
        &self,
        group: &str,
        offer: Option<&[u8]>,
        patience: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let give_up = tokio::time::Instant::now() + patience;
        loop {
            let request = pb::NcclIdRequest {
                group: group.to_owned(),
                offer: offer.map(<[u8]>::to_vec).unwrap_or_default(),
            };
            let answer = self
                .call(STATE_PATIENCE, |mut c| {
                    let request = request.clone();
                    async move { c.nccl_id(request).await }
                })
                .await;
            match answer {
                Ok(reply) => return Ok(reply.id),
                Err(ClientError::Refused(why))
                    if why.contains("no NCCL id") && tokio::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the leader to re-plan the placement from the current load.
    pub async fn rebalance(&self) -> Result<(), ClientError> {
        self.call(STATE_PATIENCE, |mut c| async move {
            c.rebalance(pb::RebalanceRequest {}).await
        })
        .await?;
        Ok(())
    }

    /// Adds (`Some(address)`) or removes a coordinator.
    pub async fn change_coordinators(
        &self,
        id: u64,
        address: Option<String>,
    ) -> Result<(), ClientError> {
        let request = pb::ChangeCoordinatorsRequest {
            id,
            remove: address.is_none(),
            address: address.unwrap_or_default(),
        };
        self.call(STATE_PATIENCE, |mut c| {
            let request = request.clone();
            async move { c.change_coordinators(request).await }
        })
        .await?;
        Ok(())
    }

    /// Heartbeats every coordinator every `interval`, and when asked to
    /// ([`Membership::beat_now`]), until the runtime stops; registers again (`rejoin`) when
    /// told this worker was declared dead.
    fn spawn_heartbeat(
        &self,
        membership: Membership,
        registration: Registration,
        interval: Duration,
        beat: impl Fn() -> Beat + Send + Sync + 'static,
    ) {
        let beat = Arc::new(beat);
        let registration = Arc::new(registration);
        for client in self.clients.iter() {
            let mut client = client.clone();
            let beat = beat.clone();
            let this = self.clone();
            let membership = membership.clone();
            let registration = registration.clone();
            let mut asked = membership.beat_now.subscribe();
            tokio::spawn(async move {
                // A fixed rate: a slow answer does not push the next beat later.
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut unknown = false;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        // The sender lives in `membership`, held here: it never closes.
                        Ok(()) = asked.changed() => {}
                    }
                    let Beat {
                        load,
                        prepared_epoch,
                        transfers,
                        fetched,
                        digests,
                        dense_digest,
                    } = beat();
                    let worker_id = membership.id();
                    let mut beat = tonic::Request::new(pb::HeartbeatRequest {
                        worker_id,
                        load,
                        prepared_epoch,
                        transfers,
                        fetched,
                        digests,
                        dense_digest: dense_digest.unwrap_or(0),
                        has_dense_digest: dense_digest.is_some(),
                    });
                    beat.set_timeout(interval.max(Duration::from_millis(500)));
                    match client.heartbeat(beat).await {
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                            this.rejoin(&membership, &registration, worker_id).await;
                        }
                        // Said once: a coordinator does not know this worker (yet: its copy
                        // of the state may lag the registration).
                        Err(s) if s.code() == tonic::Code::NotFound && !unknown => {
                            unknown = true;
                            tracing::warn!("worker {worker_id}: {}", s.message());
                        }
                        _ => {}
                    }
                }
            });
        }
    }

    /// A receiver that always holds the newest state seen (`None` before the first).
    pub fn watch(&self) -> watch::Receiver<Option<Arc<ClusterView>>> {
        let (tx, rx) = watch::channel(None);
        let this = self.clone();
        tokio::spawn(async move {
            let mut after = 0;
            let n = this.clients.len();
            loop {
                if tx.is_closed() {
                    return;
                }
                let i = this.current.load(Ordering::Relaxed) % n;
                let mut client = this.clients[i].clone();
                // The stream outlives the unary deadline: no timeout on this request.
                let request = pb::WatchStateRequest {
                    after_version: after,
                };
                if let Ok(response) = client.watch_state(request).await {
                    let mut stream = response.into_inner();
                    while let Ok(Some(state)) = stream.message().await {
                        let Ok(view) = ClusterView::try_from(state) else {
                            continue;
                        };
                        if view.version <= after {
                            continue;
                        }
                        after = view.version;
                        if tx.send(Some(Arc::new(view))).is_err() {
                            return;
                        }
                    }
                }
                let _ = this.current.compare_exchange(
                    i,
                    (i + 1) % n,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                tokio::time::sleep(RETRY_DELAY).await;
            }
        });
        rx
    }
}

/// How often a worker beats: its configured `heartbeat`, but at least three beats to a lease
/// (`lease_ms`, 0 when the coordinators did not say), and never more often than every 10 ms.
fn beat_interval(heartbeat: Duration, lease_ms: u64) -> Duration {
    let interval = match lease_ms {
        0 => heartbeat,
        lease => heartbeat.min(Duration::from_millis(lease) / 3),
    };
    interval.max(Duration::from_millis(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_come_three_to_a_lease() {
        let second = Duration::from_secs(1);
        assert_eq!(beat_interval(second, 5000), second);
        assert_eq!(beat_interval(second, 1000), second / 3);
        assert_eq!(beat_interval(second, 0), second);
        assert_eq!(beat_interval(second, 3), Duration::from_millis(10));
    }
}
