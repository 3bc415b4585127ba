//! The coordinator's gRPC service: registration, heartbeats, and the cluster state that
//! workers read and watch. One replica, state in memory (raft replication is a later
//! issue). Every change bumps the state version; every placement change bumps the epoch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::coordinator_service_server::{
    CoordinatorService, CoordinatorServiceServer,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::placement::{assign, WorkerSlots};
use crate::state::{ClusterView, Member, Placement, Role};

/// Longest worker address accepted.
const ADDRESS_MAX: usize = 256;
/// Members at most; registrations past it are refused.
const MEMBERS_MAX: usize = 4096;

struct Inner {
    view: ClusterView,
    next_id: u64,
    /// The latest load each worker reported (not part of the published state: it changes
    /// with every heartbeat).
    loads: HashMap<u64, pb::WorkerLoad>,
}

/// The coordinator's state and its gRPC handlers.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
    published: watch::Sender<Arc<ClusterView>>,
}

impl Coordinator {
    pub fn new(num_experts: usize, model_fingerprint: String) -> Self {
        let view = ClusterView {
            version: 1,
            members: Vec::new(),
            placement: Placement::default(),
            model_fingerprint,
            num_experts,
            unservable: Some("no expert worker has registered".into()),
        };
        let (published, _) = watch::channel(Arc::new(view.clone()));
        Self {
            inner: Arc::new(Mutex::new(Inner {
                view,
                next_id: 1,
                loads: HashMap::new(),
            })),
            published,
        }
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.published.borrow().clone()
    }

    /// The latest load of every worker that reported one.
    pub fn loads(&self) -> HashMap<u64, pb::WorkerLoad> {
        self.inner
            .lock()
            .expect("coordinator state lock")
            .loads
            .clone()
    }

    pub fn into_service(self) -> CoordinatorServiceServer<Self> {
        CoordinatorServiceServer::new(self)
    }

    fn publish(&self, inner: &mut Inner) {
        inner.view.version += 1;
        self.published.send_replace(Arc::new(inner.view.clone()));
    }

    /// Re-plans the placement over the live expert workers.
    fn replan(inner: &mut Inner) {
        let workers: Vec<WorkerSlots> = inner
            .view
            .members
            .iter()
            .filter(|m| m.role == Role::ExpertWorker && m.alive)
            .map(|m| WorkerSlots {
                id: m.id,
                capacity: m.capacity,
            })
            .collect();
        match assign(inner.view.num_experts, &workers) {
            Ok(experts) => {
                if experts != inner.view.placement.experts {
                    inner.view.placement = Placement {
                        epoch: inner.view.placement.epoch + 1,
                        experts,
                    };
                }
                inner.view.unservable = None;
            }
            Err(e) => inner.view.unservable = Some(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl CoordinatorService for Coordinator {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let r = request.into_inner();
        let role = Role::try_from(r.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.address.is_empty() || r.address.len() > ADDRESS_MAX {
            return Err(Status::invalid_argument(
                "address must be 1 to 256 characters",
            ));
        }
        let mut inner = self.inner.lock().expect("coordinator state lock");
        if !r.model_fingerprint.is_empty()
            && !inner.view.model_fingerprint.is_empty()
            && r.model_fingerprint != inner.view.model_fingerprint
        {
            return Err(Status::failed_precondition(format!(
                "the worker serves model {} but the cluster serves {}",
                r.model_fingerprint, inner.view.model_fingerprint
            )));
        }
        if inner.view.members.len() >= MEMBERS_MAX {
            return Err(Status::resource_exhausted(
                "the cluster has too many members",
            ));
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.view.members.push(Member {
            id,
            role,
            address: r.address,
            pid: r.pid,
            alive: true,
            capacity: r.has_capacity.then_some(r.expert_capacity as usize),
        });
        if role == Role::ExpertWorker {
            Self::replan(&mut inner);
        }
        self.publish(&mut inner);
        Ok(Response::new(pb::RegisterReply { worker_id: id }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let r = request.into_inner();
        let id = r.worker_id;
        let mut inner = self.inner.lock().expect("coordinator state lock");
        if inner.view.member(id).is_none() {
            return Err(Status::not_found(format!("worker {id} is not registered")));
        }
        if let Some(load) = r.load {
            inner.loads.insert(id, load);
        }
        Ok(Response::new(pb::HeartbeatReply {
            state_version: inner.view.version,
        }))
    }

    async fn get_state(
        &self,
        _: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::ClusterState>, Status> {
        Ok(Response::new(pb::ClusterState::from(self.view().as_ref())))
    }

    type WatchStateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ClusterState, Status>> + Send>,
    >;

    async fn watch_state(
        &self,
        request: Request<pb::WatchStateRequest>,
    ) -> Result<Response<Self::WatchStateStream>, Status> {
        let after = request.into_inner().after_version;
        let stream = WatchStream::new(self.published.subscribe())
            .filter(move |v| v.version > after)
            .map(|v| Ok(pb::ClusterState::from(v.as_ref())));
        Ok(Response::new(Box::pin(stream)))
    }
}
