//! The async coordinator node: one task owns the [`Replica`] and runs its loop — a tick
//! every `tick_ms`, raft messages from peers, proposals and reads from the gRPC handlers —
//! calling [`Replica::ready`] after each and acting on the output: messages go to peers over
//! gRPC (one bounded queue and sender task per peer; a full queue drops, raft resends),
//! applied entries answer their proposers, read indexes answer reads once applied, and a
//! changed state is published to watchers.
//!
//! The leader also runs the controller: a failure detector that commits `MarkDead` for a
//! worker silent for one lease (a new leader first waits one lease, so it judges nobody on
//! heartbeats it never had a chance to see), the `Init` command that fixes the model
//! identity when the cluster is new, and the placement loop (`drive_placement`). Peer
//! sending lives in `transport.rs`, the expert load window in `load.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expertmesh_proto::v1 as pb;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, oneshot, watch};

use crate::machine::{Command, Machine, Rejected, Settings};
use crate::replica::{RaftStatus, Replica, ReplicaError, Role, Timing};
use crate::state::ClusterView;
use crate::storage::DiskStorage;

/// Inputs queued for the loop at most; raft messages past it are dropped (raft resends),
/// requests past it are refused as unavailable.
const INPUT_QUEUE: usize = 4096;
/// Message batches queued per peer at most.
const PEER_QUEUE: usize = 256;

/// What the node needs to run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Every coordinator of the initial configuration (this one included): id → address.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: std::path::PathBuf,
    /// Start without bootstrapping a configuration: this node waits to be added.
    pub join: bool,
    pub tick: Duration,
    pub timing: Timing,
    /// What `Init` fixes when this node is the first leader of a new cluster.
    pub model_fingerprint: String,
    pub num_experts: usize,
    pub settings: Settings,
}

impl NodeConfig {
    /// A group of one (elects itself at once): for tests and single-machine use.
    pub fn single(
        data_dir: impl Into<std::path::PathBuf>,
        model_fingerprint: String,
        num_experts: usize,
    ) -> Self {
        Self {
            id: 1,
            peers: BTreeMap::from([(1, "127.0.0.1:0".to_owned())]),
            data_dir: data_dir.into(),
            join: false,
            tick: Duration::from_millis(50),
            timing: Timing::default(),
            model_fingerprint,
            num_experts,
            settings: Settings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("this coordinator is not the leader")]
    NotLeader,
    #[error("the coordinator is overloaded")]
    Busy,
    #[error("the coordinator stopped")]
    Stopped,
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

pub(crate) enum Input {
    Raft(Vec<Message>),
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    Membership {
        id: u64,
        address: Option<String>,
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    /// Answered once this replica has applied everything committed when it asked.
    Read {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Sent {
        to: u64,
        delivered: bool,
        snapshot: bool,
    },
    /// Re-plan the placement at the next chance (leader only).
    Rebalance,
}

/// How often the leader looks at the placement.
const PLACEMENT_CHECK: Duration = Duration::from_millis(500);
/// Automatic re-plans (for imbalance) at most this often.
const AUTO_REPLAN_EVERY: Duration = Duration::from_secs(30);
/// How long a prepared placement waits for its workers to load their experts, in leases.
const PREPARE_LEASES: u32 = 12;
/// How long a worker that did not load in time is left out of plans.
const EXCLUDE_FOR: Duration = Duration::from_secs(300);

/// What the gRPC handlers and the gateway read without going through the loop.
pub(crate) struct Shared {
    pub id: u64,
    pub status: Mutex<RaftStatus>,
    pub coordinators: Mutex<BTreeMap<u64, String>>,
    pub view: watch::Sender<Arc<ClusterView>>,
    /// When each worker was last heard from (not replicated).
    pub liveness: Mutex<HashMap<u64, Instant>>,
    pub loads: Mutex<HashMap<u64, pb::WorkerLoad>>,
    pub load_window: Mutex<crate::load::LoadWindow>,
    /// The pending epoch each expert worker reports it has loaded.
    pub prepared: Mutex<HashMap<u64, u64>>,
}

impl Shared {
    pub fn leader_address(&self) -> Option<(u64, String)> {
        let leader = self.status.lock().expect("status lock").leader;
        if leader == 0 || leader == self.id {
            return None;
        }
        let address = self
            .coordinators
            .lock()
            .expect("coordinators lock")
            .get(&leader)
            .cloned()?;
        Some((leader, address))
    }
}

pub(crate) struct Node {
    pub shared: Arc<Shared>,
    pub inputs: mpsc::Sender<Input>,
}

/// Opens the storage (reporting what start-up repaired) and starts the loop. The returned
/// handle completes only if storage fails, with the error.
pub(crate) fn start(
    config: NodeConfig,
) -> Result<(Node, tokio::task::JoinHandle<ReplicaError>), ReplicaError> {
    let voters: Vec<u64> = if config.join {
        Vec::new()
    } else {
        config.peers.keys().copied().collect()
    };
    let storage = DiskStorage::open(&config.data_dir, &voters)?;
    for note in &storage.notes {
        eprintln!("coordinator {}: {note}", config.id);
    }
    let mut replica = Replica::open(config.id, storage, config.timing)?;
    if replica.voters() == [config.id] {
        // A group of one need not wait out an election timeout.
        replica.campaign();
    }
    let mut coordinators = config.peers.clone();
    coordinators.extend(replica.machine().coordinators.clone());
    let (view, _) = watch::channel(Arc::new(replica.machine().view()));
    let shared = Arc::new(Shared {
        id: config.id,
        status: Mutex::new(replica.status()),
        coordinators: Mutex::new(coordinators),
        view,
        liveness: Mutex::new(HashMap::new()),
        loads: Mutex::new(HashMap::new()),
        load_window: Mutex::new(crate::load::LoadWindow::default()),
        prepared: Mutex::new(HashMap::new()),
    });
    let (inputs, rx) = mpsc::channel(INPUT_QUEUE);
    let driver = Driver {
        replica,
        shared: shared.clone(),
        inputs: inputs.clone(),
        peers: HashMap::new(),
        next_context: 0,
        proposals: HashMap::new(),
        reads: Vec::new(),
        pending_reads: HashMap::new(),
        leader_since: None,
        marking: HashSet::new(),
        placement_checked: Instant::now(),
        last_plan: None,
        rebalance: false,
        proposed: None,
        pending_since: None,
        excluded: HashMap::new(),
        config,
    };
    let handle = tokio::spawn(driver.run(rx));
    Ok((Node { shared, inputs }, handle))
}

struct Driver {
    replica: Replica,
    shared: Arc<Shared>,
    inputs: mpsc::Sender<Input>,
    peers: HashMap<u64, mpsc::Sender<Vec<Message>>>,
    next_context: u64,
    proposals: HashMap<Vec<u8>, oneshot::Sender<Result<u64, ProposeError>>>,
    /// Reads waiting for their read index, by context.
    pending_reads: HashMap<Vec<u8>, oneshot::Sender<Result<(), ProposeError>>>,
    /// Reads that have a read index, waiting for it to be applied.
    reads: Vec<(u64, oneshot::Sender<Result<(), ProposeError>>)>,
    leader_since: Option<Instant>,
    /// Workers whose `MarkDead` is proposed and not yet applied.
    marking: HashSet<u64>,
    placement_checked: Instant,
    /// When the leader last proposed a placement.
    last_plan: Option<Instant>,
    /// An operator asked for a re-plan.
    rebalance: bool,
    /// The placement command proposed and not yet applied: (what, epoch, when).
    proposed: Option<(&'static str, u64, Instant)>,
    /// Since when the pending placement (by epoch) has waited for workers to load.
    pending_since: Option<(u64, Instant)>,
    /// Workers left out of plans until the instant given (they did not load in time).
    excluded: HashMap<u64, Instant>,
    config: NodeConfig,
}

impl Driver {
    /// A context unique across replicas: this node's id, then a counter.
    fn context(&mut self) -> Vec<u8> {
        self.next_context += 1;
        let mut c = self.config.id.to_le_bytes().to_vec();
        c.extend_from_slice(&self.next_context.to_le_bytes());
        c
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Input>) -> ReplicaError {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.replica.tick();
                    self.control();
                }
                input = rx.recv() => {
                    let Some(input) = input else { return ReplicaError::Stopped };
                    self.handle(input);
                    // Take whatever else is queued before the next Ready round.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.round() {
                eprintln!("coordinator {}: storage failed: {e}", self.config.id);
                return e;
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(messages) => {
                for m in messages {
                    self.replica.step(m);
                }
            }
            Input::Propose { command, reply } => {
                let context = self.context();
                match self.replica.propose(context.clone(), command) {
                    Ok(()) => {
                        self.proposals.insert(context, reply);
                    }
                    Err(_) => {
                        let _ = reply.send(Err(ProposeError::NotLeader));
                    }
                }
            }
            Input::Membership { id, address, reply } => {
                let context = self.context();
                match self
                    .replica
                    .propose_membership(context.clone(), id, address)
                {
                    Ok(()) => {
                        self.proposals.insert(context, reply);
                    }
                    Err(_) => {
                        let _ = reply.send(Err(ProposeError::NotLeader));
                    }
                }
            }
            Input::Read { reply } => {
                let context = self.context();
                self.replica.read_index(context.clone());
                self.pending_reads.insert(context, reply);
            }
            Input::Rebalance => self.rebalance = true,
            Input::Sent {
                to,
                delivered,
                snapshot,
            } => {
                if !delivered {
                    self.replica.report_unreachable(to);
                }
                if snapshot {
                    self.replica.report_snapshot(to, delivered);
                }
            }
        }
    }

    fn round(&mut self) -> Result<(), ReplicaError> {
        let out = self.replica.ready()?;
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for m in out.messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, messages) in by_peer {
            self.send(to, messages);
        }
        if !out.applied.is_empty() {
            self.proposed = None;
        }
        for applied in &out.applied {
            if let Some(reply) = self.proposals.remove(&applied.context) {
                let _ = reply.send(applied.result.clone().map_err(ProposeError::from));
            }
        }
        for rs in out.read_states {
            if let Some(reply) = self.pending_reads.remove(&rs.request_ctx) {
                self.reads.push((rs.index, reply));
            }
        }
        let status = self.replica.status();
        let applied = status.applied;
        let mut i = 0;
        while i < self.reads.len() {
            if self.reads[i].0 <= applied {
                let (_, reply) = self.reads.swap_remove(i);
                let _ = reply.send(Ok(()));
            } else {
                i += 1;
            }
        }
        if out.changed {
            let machine = self.replica.machine();
            self.shared
                .coordinators
                .lock()
                .expect("coordinators lock")
                .extend(machine.coordinators.clone());
            // A new member's lease starts when this replica learns of it.
            let now = Instant::now();
            let mut liveness = self.shared.liveness.lock().expect("liveness lock");
            for m in machine.members.iter().filter(|m| m.alive) {
                liveness.entry(m.id).or_insert(now);
            }
            drop(liveness);
            self.marking.retain(|id| {
                (*id == 0 && !machine.initialized)
                    || machine.members.iter().any(|m| m.id == *id && m.alive)
            });
            self.shared.view.send_replace(Arc::new(machine.view()));
        }
        let was_leader = self.leader_since.is_some();
        let is_leader = status.role == Role::Leader;
        if is_leader && !was_leader {
            self.leader_since = Some(Instant::now());
            self.marking.clear();
            eprintln!(
                "coordinator {}: leader for term {}",
                self.config.id, status.term
            );
        } else if !is_leader && was_leader {
            self.leader_since = None;
            // Proposals may still commit under the next leader; their callers retry with
            // the same request id and get the same answer.
            for (_, reply) in self.proposals.drain() {
                let _ = reply.send(Err(ProposeError::NotLeader));
            }
        }
        if !is_leader {
            // A read index is only answered while a leader is known; drop the waiters so
            // callers retry instead of waiting for their deadline.
            if status.leader == 0 {
                for (_, reply) in self.pending_reads.drain() {
                    let _ = reply.send(Err(ProposeError::NotLeader));
                }
            }
        }
        // Callers that gave up (their deadline passed) leave nothing behind.
        self.proposals.retain(|_, reply| !reply.is_closed());
        self.pending_reads.retain(|_, reply| !reply.is_closed());
        self.reads.retain(|(_, reply)| !reply.is_closed());
        *self.shared.status.lock().expect("status lock") = status;
        Ok(())
    }

    /// The leader's controller, run on every tick.
    fn control(&mut self) {
        let Some(since) = self.leader_since else {
            return;
        };
        let machine: &Machine = self.replica.machine();
        if !machine.initialized {
            if self.marking.insert(0) {
                let context = self.context();
                let init = Command::Init {
                    model_fingerprint: self.config.model_fingerprint.clone(),
                    num_experts: self.config.num_experts,
                    settings: self.config.settings.clone(),
                    coordinators: self.config.peers.clone(),
                };
                let _ = self.replica.propose(context, init);
            }
            return;
        }
        self.drive_placement();
        let machine: &Machine = self.replica.machine();
        let lease = Duration::from_millis(machine.settings.lease_ms);
        let now = Instant::now();
        if now.duration_since(since) < lease {
            return;
        }
        let liveness = self.shared.liveness.lock().expect("liveness lock");
        let silent: Vec<u64> = machine
            .members
            .iter()
            .filter(|m| m.alive && !self.marking.contains(&m.id))
            .filter(|m| {
                liveness
                    .get(&m.id)
                    .is_none_or(|t| now.duration_since((*t).max(since)) >= lease)
            })
            .map(|m| m.id)
            .collect();
        drop(liveness);
        for worker_id in silent {
            eprintln!(
                "coordinator {}: worker {worker_id} missed its {} ms lease; marking it dead",
                self.config.id,
                lease.as_millis()
            );
            self.marking.insert(worker_id);
            let context = self.context();
            let _ = self
                .replica
                .propose(context, Command::MarkDead { worker_id });
        }
    }

    /// The leader's placement loop: commits a prepared placement once every worker that
    /// gains experts has loaded them; otherwise re-plans when a worker drains or joins
    /// empty, when an expert lacks copies, when asked, or (at most every 30 s) when the load
    /// is out of balance.
    fn drive_placement(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.placement_checked) < PLACEMENT_CHECK {
            return;
        }
        self.placement_checked = now;
        let machine = self.replica.machine();
        if let Some((_, _, at)) = self.proposed {
            // Wait for the proposal to apply (or give up on it after a while).
            if now.duration_since(at) < Duration::from_secs(5) {
                return;
            }
            self.proposed = None;
        }
        if let Some(p) = &machine.pending {
            let prepared = self.shared.prepared.lock().expect("prepared lock");
            let ready = machine
                .members
                .iter()
                .filter(|m| m.alive && m.role == crate::state::Role::ExpertWorker)
                .filter(|m| {
                    let before = machine.placement.experts_of(m.id);
                    p.experts_of(m.id).iter().any(|e| !before.contains(e))
                })
                .all(|m| prepared.get(&m.id).is_some_and(|&e| e >= p.epoch));
            if ready {
                drop(prepared);
                let epoch = p.epoch;
                let context = self.context();
                if self
                    .replica
                    .propose(context, Command::Commit { epoch })
                    .is_ok()
                {
                    self.proposed = Some(("commit", epoch, now));
                }
                return;
            }
            let since = match self.pending_since {
                Some((epoch, t)) if epoch == p.epoch => t,
                _ => {
                    self.pending_since = Some((p.epoch, now));
                    now
                }
            };
            let timeout = Duration::from_millis(machine.settings.lease_ms) * PREPARE_LEASES;
            if now.duration_since(since) < timeout {
                return;
            }
            // Workers that keep heartbeating without loading their experts: plan without
            // them for a while (the new plan replaces the pending one).
            for m in machine.members.iter().filter(|m| m.alive) {
                let gains = p
                    .experts_of(m.id)
                    .iter()
                    .any(|e| !machine.placement.experts_of(m.id).contains(e));
                if gains && prepared.get(&m.id).is_none_or(|&e| e < p.epoch) {
                    eprintln!(
                        "coordinator {}: worker {} did not load its experts for epoch {} in {:.1} s; planning without it",
                        self.config.id,
                        m.id,
                        p.epoch,
                        timeout.as_secs_f64()
                    );
                    self.excluded.insert(m.id, now + EXCLUDE_FOR);
                }
            }
            drop(prepared);
            self.pending_since = None;
            self.rebalance = true;
        }
        if machine.unservable.is_some() || !machine.initialized {
            return;
        }
        self.excluded.retain(|_, until| *until > now);
        let mut workers = machine.plannable_workers();
        if workers.iter().any(|w| !self.excluded.contains_key(&w.id)) {
            workers.retain(|w| !self.excluded.contains_key(&w.id));
        }
        let holds = |id: u64| !machine.placement.experts_of(id).is_empty();
        let min_copies = machine.settings.min_replicas.min(workers.len()).max(1);
        let load = self
            .shared
            .load_window
            .lock()
            .expect("load window lock")
            .per_expert(machine.num_experts);
        let measured = load.iter().sum::<f64>() > 0.0;
        let ids: Vec<u64> = workers.iter().map(|w| w.id).collect();
        let reason = if self.rebalance {
            Some("requested")
        } else if machine
            .members
            .iter()
            .any(|m| m.draining && m.alive && holds(m.id))
        {
            Some("a worker is draining")
        } else if workers
            .iter()
            .any(|w| w.capacity != Some(0) && !holds(w.id))
        {
            Some("a worker holds no expert")
        } else if machine
            .placement
            .experts
            .iter()
            .any(|r| r.len() < min_copies)
        {
            Some("experts lack copies")
        } else if machine.settings.rebalance_percent > 0
            && measured
            && self
                .last_plan
                .is_none_or(|t| now.duration_since(t) >= AUTO_REPLAN_EVERY)
            && crate::planner::balance(&machine.placement.experts, &load, &ids)
                > 1.0 + f64::from(machine.settings.rebalance_percent) / 100.0
        {
            Some("load is out of balance")
        } else {
            None
        };
        let Some(reason) = reason else { return };
        self.rebalance = false;
        self.last_plan = Some(now);
        let load = if measured {
            load
        } else {
            vec![1.0; machine.num_experts]
        };
        let planned = crate::planner::plan(crate::planner::PlanInput {
            workers: &workers,
            load: &load,
            min_replicas: machine.settings.min_replicas,
            redundancy: machine.settings.redundancy,
            current: &machine.placement.experts,
            tolerance: 0.02,
        });
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "coordinator {}: cannot re-plan ({reason}): {e}",
                    self.config.id
                );
                return;
            }
        };
        // Nothing to move: done, unless a pending placement must be replaced (by the current
        // one, which commits at once).
        if plan.added.is_empty() && plan.removed.is_empty() && machine.pending.is_none() {
            return;
        }
        let epoch = machine.placement.epoch + 1;
        eprintln!(
            "coordinator {}: re-planning ({reason}): epoch {epoch} adds {} and drops {} expert copies",
            self.config.id,
            plan.added.len(),
            plan.removed.len()
        );
        let context = self.context();
        let command = Command::Prepare {
            epoch,
            experts: plan.experts,
        };
        if self.replica.propose(context, command).is_ok() {
            self.proposed = Some(("prepare", epoch, now));
        }
    }

    fn send(&mut self, to: u64, messages: Vec<Message>) {
        if !self.peers.contains_key(&to) {
            let address = self
                .shared
                .coordinators
                .lock()
                .expect("coordinators lock")
                .get(&to)
                .cloned();
            let Some(address) = address else {
                return;
            };
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(crate::transport::peer_sender(
                self.config.id,
                to,
                address,
                rx,
                self.inputs.clone(),
            ));
            self.peers.insert(to, tx);
        }
        if let Some(tx) = self.peers.get(&to) {
            // Full: drop, raft resends.
            let _ = tx.try_send(messages);
        }
    }
}
