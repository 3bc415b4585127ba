//! The coordinator's gRPC service, served by every replica.
//!
//! - Writes (`Register`, `ChangeCoordinators`) are proposed through raft when this replica
//!   leads, and forwarded once to the leader otherwise.
//! - `GetState` is linearizable from any replica: it takes a raft read index (which a
//!   follower gets from the leader) and answers once that index is applied here.
//! - `WatchState` streams this replica's applied states, in order.
//! - `Heartbeat` is local: workers beat every coordinator; liveness and load are not
//!   replicated (the leader judges liveness from its own record).
//! - `Raft` carries raft's messages between coordinators; `Status` reports this replica.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertmesh_proto::tls::{self, PeerRole};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use expertmesh_proto::v1::coordinator_service_server::{
    CoordinatorService, CoordinatorServiceServer,
};
use protobuf::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::machine::{Command, Rejected, ADDRESS_MAX};
pub use crate::node::NodeConfig;
use crate::node::{Input, ProposeError, Shared};
use crate::replica::{RaftStatus, ReplicaError};
use crate::state::{ClusterView, Role};

/// How long a write waits to commit before the caller is told to retry.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a linearizable read waits for its read index.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Raft messages per `Raft` call at most.
const RAFT_BATCH_MAX: usize = 4096;

/// One coordinator replica: its raft node and its gRPC handlers.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
    inputs: mpsc::Sender<Input>,
}

impl Coordinator {
    /// Opens the replica's storage and starts its raft loop. The handle completes only when
    /// the storage fails (the process should stop then).
    pub fn start(
        config: NodeConfig,
    ) -> Result<(Self, tokio::task::JoinHandle<ReplicaError>), ReplicaError> {
        let (node, handle) = crate::node::start(config)?;
        Ok((
            Self {
                shared: node.shared,
                inputs: node.inputs,
            },
            handle,
        ))
    }

    /// The cluster state as this replica has applied it.
    pub fn view(&self) -> Arc<ClusterView> {
        self.shared.view.borrow().clone()
    }

    /// The latest load of every worker that reported one to this replica.
    pub fn loads(&self) -> HashMap<u64, pb::WorkerLoad> {
        self.shared.loads.lock().expect("loads lock").clone()
    }

    /// Times this replica saw the group's leader change.
    pub fn leader_changes(&self) -> u64 {
        self.shared
            .leader_changes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn status(&self) -> RaftStatus {
        *self.shared.status.lock().expect("status lock")
    }

    pub fn into_service(self) -> CoordinatorServiceServer<Self> {
        CoordinatorServiceServer::new(self)
            .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES)
    }

    async fn ask<T>(
        &self,
        input: impl FnOnce(oneshot::Sender<Result<T, ProposeError>>) -> Input,
        timeout: Duration,
    ) -> Result<T, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.inputs
            .try_send(input(tx))
            .map_err(|_| ProposeError::Busy)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::NotLeader),
        }
    }

    async fn propose(&self, command: Command) -> Result<u64, ProposeError> {
        self.ask(|reply| Input::Propose { command, reply }, COMMIT_TIMEOUT)
            .await
    }

    /// Proposes the expert digests (or the dense digest) a worker reports that the state has
    /// none for, one proposal at a time, without holding up the heartbeat. On a follower the
    /// proposal fails; the worker reports them again until the state has them.
    fn record_digests(
        &self,
        worker_id: u64,
        view: &ClusterView,
        digests: Vec<pb::ExpertDigest>,
        dense: Option<u32>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let new: Vec<(u32, u32)> = digests
            .into_iter()
            .take(view.num_experts)
            .filter(|d| {
                (d.expert as usize) < view.num_experts
                    && !view.expert_digests.contains_key(&d.expert)
            })
            .map(|d| (d.expert, d.crc32))
            .collect();
        let command = match dense {
            Some(crc32) => Command::DenseDigest { worker_id, crc32 },
            None if new.is_empty() => return,
            None => Command::ExpertDigests {
                worker_id,
                digests: new,
            },
        };
        if self.shared.digesting.swap(true, SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            match this.propose(command).await {
                Ok(0) | Err(ProposeError::NotLeader) => {}
                Ok(n) => tracing::warn!(
                    "coordinator {}: worker {worker_id} reported {n} digests unlike the recorded ones",
                    this.shared.id
                ),
                Err(e) => tracing::debug!("coordinator {}: expert digests: {e}", this.shared.id),
            }
            this.shared.digesting.store(false, SeqCst);
        });
    }

    /// A client to the leader, when another replica leads.
    fn leader(&self) -> Result<CoordinatorServiceClient<tonic::transport::Channel>, Status> {
        let (_, address) = self
            .shared
            .leader_address()
            .ok_or_else(|| Status::unavailable("no coordinator leader is known yet; retry"))?;
        let endpoint = expertmesh_proto::endpoint(&address, Duration::from_secs(1))
            .map_err(|e| Status::unavailable(format!("leader address {address}: {e}")))?;
        Ok(CoordinatorServiceClient::new(tls::channel(
            endpoint.timeout(COMMIT_TIMEOUT),
            &address,
            PeerRole::Coordinator,
        )))
    }
}

/// A proposal's failure as the status a caller sees: the one map of coordinator errors.
impl From<ProposeError> for Status {
    fn from(e: ProposeError) -> Status {
        match e {
            ProposeError::NotLeader | ProposeError::Busy | ProposeError::Stopped => {
                Status::unavailable(format!("{e}; retry"))
            }
            ProposeError::Rejected(r) => match r {
                Rejected::NotInitialized => Status::unavailable(format!("{r}; retry")),
                Rejected::JoinToken => Status::permission_denied(r.to_string()),
                Rejected::WrongModel { .. } | Rejected::AlreadyInitialized => {
                    Status::failed_precondition(r.to_string())
                }
                Rejected::Full => Status::resource_exhausted(r.to_string()),
                Rejected::UnknownWorker(_) => Status::not_found(r.to_string()),
                Rejected::Stale(_) => Status::failed_precondition(r.to_string()),
                Rejected::Invalid(_) | Rejected::Malformed(_) => {
                    Status::invalid_argument(r.to_string())
                }
            },
        }
    }
}

/// The raft messages of a `Raft` call to coordinator `me`: at most [`RAFT_BATCH_MAX`], each
/// decodable, each from the sender and to `me`.
pub fn decode_raft(r: &pb::RaftMessages, me: u64) -> Result<Vec<raft::eraftpb::Message>, String> {
    if r.messages.len() > RAFT_BATCH_MAX {
        return Err(format!(
            "{} raft messages in one call (at most {RAFT_BATCH_MAX})",
            r.messages.len()
        ));
    }
    let messages = r
        .messages
        .iter()
        .map(|b| raft::eraftpb::Message::parse_from_bytes(b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("undecodable raft message: {e}"))?;
    if let Some(m) = messages.iter().find(|m| m.to != me || m.from != r.from) {
        return Err(format!(
            "raft message from {} to {} sent by {} to {me}",
            m.from, m.to, r.from
        ));
    }
    Ok(messages)
}

/// Who may register, heartbeat and ask for NCCL ids: workers, and coordinators (a follower
/// forwards to the leader).
const WORKERS: &[PeerRole] = &[
    PeerRole::ExpertWorker,
    PeerRole::AttentionWorker,
    PeerRole::Coordinator,
];
/// Who may change the cluster (drain, rebalance, coordinators): admins, and coordinators
/// forwarding to the leader.
const ADMINS: &[PeerRole] = &[PeerRole::Admin, PeerRole::Coordinator];

#[tonic::async_trait]
impl CoordinatorService for Coordinator {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        tls::authorize(&request, WORKERS)?;
        let mut r = request.into_inner();
        let role = Role::try_from(r.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.address.is_empty() || r.address.len() > ADDRESS_MAX {
            return Err(Status::invalid_argument(format!(
                "address must be 1 to {ADDRESS_MAX} characters"
            )));
        }
        if r.request_id == 0 {
            r.request_id = crate::random_u64();
        }
        let command = Command::Register {
            request_id: r.request_id,
            role,
            address: r.address.clone(),
            capacity: r.has_capacity.then_some(r.expert_capacity as usize),
            pid: r.pid,
            model_fingerprint: r.model_fingerprint.clone(),
            join_token: r.join_token.clone(),
            holds_experts: r.holds_experts,
            weightless: r.weightless,
            backup: r.expert_backup as usize,
        };
        match self.propose(command).await {
            Ok(worker_id) => Ok(Response::new(pb::RegisterReply {
                worker_id,
                lease_ms: self.view().lease_ms,
            })),
            Err(ProposeError::NotLeader) if !r.forwarded => {
                r.forwarded = true;
                self.leader()?.register(r).await
            }
            Err(e) => Err(Status::from(e)),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        tls::authorize(&request, WORKERS)?;
        let r = request.into_inner();
        let id = r.worker_id;
        let view = self.view();
        match view.member(id) {
            None => return Err(Status::not_found(format!("worker {id} is not registered"))),
            // A distinct code: the worker registers again (a dead id never comes back).
            Some(m) if !m.alive => {
                return Err(Status::failed_precondition(format!(
                    "worker {id} was declared dead; register again"
                )))
            }
            Some(_) => {}
        }
        self.shared
            .liveness
            .lock()
            .expect("liveness lock")
            .insert(id, Instant::now());
        if r.prepared_epoch > 0 {
            self.shared
                .prepared
                .lock()
                .expect("prepared lock")
                .insert(id, r.prepared_epoch);
        }
        {
            // One report per live worker, at most one entry per expert in each list.
            let mut transfers = self.shared.transfers.lock().expect("transfers lock");
            transfers.retain(|w, _| view.member(*w).is_some_and(|m| m.alive));
            let (mut in_flight, mut fetched) = (r.transfers, r.fetched);
            in_flight.truncate(view.num_experts);
            fetched.truncate(view.num_experts);
            if in_flight.is_empty() && fetched.is_empty() {
                transfers.remove(&id);
            } else {
                transfers.insert(
                    id,
                    pb::WorkerTransfers {
                        worker_id: id,
                        in_flight,
                        fetched,
                    },
                );
            }
        }
        let dense = (r.has_dense_digest && view.dense_digest.is_none()).then_some(r.dense_digest);
        self.record_digests(id, &view, r.digests, dense);
        if let Some(load) = r.load {
            self.shared
                .load_window
                .lock()
                .expect("load window lock")
                .record(id, &load);
            self.shared
                .loads
                .lock()
                .expect("loads lock")
                .insert(id, load);
        }
        Ok(Response::new(pb::HeartbeatReply {
            state_version: view.version,
        }))
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::ClusterState>, Status> {
        tls::authorize(&request, tls::ANY)?;
        self.ask(|reply| Input::Read { reply }, READ_TIMEOUT)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ClusterState::from(self.view().as_ref())))
    }

    type WatchStateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ClusterState, Status>> + Send>,
    >;

    async fn watch_state(
        &self,
        request: Request<pb::WatchStateRequest>,
    ) -> Result<Response<Self::WatchStateStream>, Status> {
        tls::authorize(&request, tls::ANY)?;
        let after = request.into_inner().after_version;
        let stream = WatchStream::new(self.shared.view.subscribe())
            .filter(move |v| v.version > after)
            .map(|v| Ok(pb::ClusterState::from(v.as_ref())));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn raft(
        &self,
        request: Request<pb::RaftMessages>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        tls::authorize(&request, &[PeerRole::Coordinator])?;
        let messages =
            decode_raft(&request.into_inner(), self.shared.id).map_err(Status::invalid_argument)?;
        // A full queue drops them: raft resends.
        let _ = self.inputs.try_send(Input::Raft(messages));
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::CoordinatorStatus>, Status> {
        tls::authorize(&request, tls::ANY)?;
        let status = self.status();
        let coordinators = self
            .shared
            .coordinators
            .lock()
            .expect("coordinators lock")
            .iter()
            .map(|(&id, address)| pb::CoordinatorAddress {
                id,
                address: address.clone(),
            })
            .collect::<Vec<_>>();
        let address = coordinators
            .iter()
            .find(|c| c.id == self.shared.id)
            .map(|c| c.address.clone())
            .unwrap_or_default();
        let (moe_layers, expert_load) = self
            .shared
            .load_window
            .lock()
            .expect("load window lock")
            .matrix();
        let view = self.view();
        let mut transfers: Vec<pb::WorkerTransfers> = self
            .shared
            .transfers
            .lock()
            .expect("transfers lock")
            .values()
            .filter(|t| view.member(t.worker_id).is_some_and(|m| m.alive))
            .cloned()
            .collect();
        transfers.sort_by_key(|t| t.worker_id);
        Ok(Response::new(pb::CoordinatorStatus {
            moe_layers: moe_layers as u32,
            transfers,
            expert_load,
            id: self.shared.id,
            address,
            pid: std::process::id(),
            raft_state: status.role.name().into(),
            leader: status.leader,
            term: status.term,
            commit_index: status.commit,
            applied_index: status.applied,
            coordinators,
            state: Some(pb::ClusterState::from(view.as_ref())),
        }))
    }

    async fn change_coordinators(
        &self,
        request: Request<pb::ChangeCoordinatorsRequest>,
    ) -> Result<Response<pb::ChangeCoordinatorsReply>, Status> {
        tls::authorize(&request, ADMINS)?;
        let r = request.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("coordinator ids start at 1"));
        }
        if !r.remove && (r.address.is_empty() || r.address.len() > ADDRESS_MAX) {
            return Err(Status::invalid_argument(format!(
                "a new coordinator needs an address of 1 to {ADDRESS_MAX} characters"
            )));
        }
        let address = (!r.remove).then(|| r.address.clone());
        let id = r.id;
        match self
            .ask(
                |reply| Input::Membership { id, address, reply },
                COMMIT_TIMEOUT,
            )
            .await
        {
            Ok(_) => Ok(Response::new(pb::ChangeCoordinatorsReply {})),
            Err(ProposeError::NotLeader) => self.leader()?.change_coordinators(r).await,
            Err(e) => Err(Status::from(e)),
        }
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        tls::authorize(&request, ADMINS)?;
        let r = request.into_inner();
        match self
            .propose(Command::Drain {
                worker_id: r.worker_id,
            })
            .await
        {
            Ok(_) => Ok(Response::new(pb::DrainReply {})),
            Err(ProposeError::NotLeader) => self.leader()?.drain(r).await,
            Err(e) => Err(Status::from(e)),
        }
    }

    async fn nccl_id(
        &self,
        request: Request<pb::NcclIdRequest>,
    ) -> Result<Response<pb::NcclIdReply>, Status> {
        tls::authorize(&request, WORKERS)?;
        let r = request.into_inner();
        if !r.offer.is_empty() {
            let command = Command::NcclId {
                group: r.group.clone(),
                id: r.offer.clone(),
            };
            match self.propose(command).await {
                Ok(_) => {}
                Err(ProposeError::NotLeader) => return self.leader()?.nccl_id(r).await,
                Err(e) => return Err(Status::from(e)),
            }
        }
        self.ask(|reply| Input::Read { reply }, READ_TIMEOUT)
            .await
            .map_err(Status::from)?;
        match self.view().nccl_ids.get(&r.group) {
            Some(id) => Ok(Response::new(pb::NcclIdReply { id: id.clone() })),
            None => Err(Status::not_found(format!(
                "no NCCL id has been offered for group {:?} yet",
                r.group.chars().take(128).collect::<String>()
            ))),
        }
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceReply>, Status> {
        tls::authorize(&request, ADMINS)?;
        if self.status().role == crate::replica::RaftRole::Leader {
            self.inputs
                .try_send(Input::Rebalance)
                .map_err(|_| Status::unavailable("the coordinator is overloaded; retry"))?;
            return Ok(Response::new(pb::RebalanceReply {}));
        }
        self.leader()?.rebalance(request.into_inner()).await
    }
}
