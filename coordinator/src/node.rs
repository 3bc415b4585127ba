//! The async coordinator node: one task owns the [`Replica`] and runs its loop — a tick
//! every `tick_ms`, raft messages from peers, proposals and reads from the gRPC handlers —
//! calling [`Replica::ready`] after each and acting on the output: messages go to peers over
//! gRPC (one bounded queue and sender task per peer; a full queue drops, raft resends),
//! applied entries answer their proposers, read indexes answer reads once applied, and a
//! changed state is published to watchers.
//!
//! The leader also proposes what the sans-I/O controllers of `placement::controller` decide:
//! `MarkDead` for a silent worker (the failure detector), and the placement's `Prepare` and
//! `Commit`; and the `Init` command that fixes the model identity when the cluster is new.
//! Peer sending lives in `transport.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expertmesh_proto::v1 as pb;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, oneshot, watch};

use crate::machine::{Command, Machine, Rejected, Settings};
use crate::placement::controller::{silent_members, Controller, Reports};
use crate::placement::load::LoadWindow;
use crate::replica::{RaftRole, RaftStatus, Replica, ReplicaError, Timing};
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

/// What the gRPC handlers and the gateway read without going through the loop.
pub(crate) struct Shared {
    pub id: u64,
    pub status: Mutex<RaftStatus>,
    pub coordinators: Mutex<BTreeMap<u64, String>>,
    pub view: watch::Sender<Arc<ClusterView>>,
    /// When each worker was last heard from (not replicated).
    pub liveness: Mutex<HashMap<u64, Instant>>,
    pub loads: Mutex<HashMap<u64, pb::WorkerLoad>>,
    pub load_window: Mutex<LoadWindow>,
    /// The pending epoch each expert worker reports it has loaded.
    pub prepared: Mutex<HashMap<u64, u64>>,
    /// What each expert worker last reported of its transfers (not replicated).
    pub transfers: Mutex<HashMap<u64, pb::WorkerTransfers>>,
    /// Times this replica saw the group's leader change (to a known one).
    pub leader_changes: std::sync::atomic::AtomicU64,
    /// Whether a proposal of reported expert digests is in flight (one at a time).
    pub digesting: std::sync::atomic::AtomicBool,
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
        tracing::info!("coordinator {}: {note}", config.id);
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
        load_window: Mutex::new(LoadWindow::default()),
        prepared: Mutex::new(HashMap::new()),
        transfers: Mutex::new(HashMap::new()),
        // A replica that starts knowing a leader (a group of one) has seen one change.
        leader_changes: std::sync::atomic::AtomicU64::new(u64::from(replica.status().leader != 0)),
        digesting: std::sync::atomic::AtomicBool::new(false),
    });
    let (inputs, rx) = mpsc::channel(INPUT_QUEUE);
    let driver = RaftLoop {
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
        controller: Controller::new(config.id),
        config,
    };
    let handle = tokio::spawn(driver.run(rx));
    Ok((Node { shared, inputs }, handle))
}

struct RaftLoop {
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
    /// The placement controller (used while leader).
    controller: Controller,
    config: NodeConfig,
}

impl RaftLoop {
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
                tracing::error!("coordinator {}: storage failed: {e}", self.config.id);
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
            Input::Rebalance => self.controller.request_rebalance(),
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
            self.controller.applied();
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
        let is_leader = status.role == RaftRole::Leader;
        if is_leader && !was_leader {
            self.leader_since = Some(Instant::now());
            self.marking.clear();
            tracing::info!(
                "coordinator {}: leader for term {}",
                self.config.id,
                status.term
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
        let mut known = self.shared.status.lock().expect("status lock");
        if status.leader != 0 && status.leader != known.leader {
            self.shared
                .leader_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        *known = status;
        drop(known);
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
        let lease_ms = machine.settings.lease_ms;
        let silent = {
            let heard = self.shared.liveness.lock().expect("liveness lock");
            silent_members(Instant::now(), since, machine, &heard, &self.marking)
        };
        for worker_id in silent {
            tracing::warn!(
                "coordinator {}: worker {worker_id} missed its {lease_ms} ms lease; marking it dead",
                self.config.id
            );
            self.marking.insert(worker_id);
            let context = self.context();
            let _ = self
                .replica
                .propose(context, Command::MarkDead { worker_id });
        }
    }

    /// Proposes what the placement controller decides (see `placement::controller`).
    fn drive_placement(&mut self) {
        let machine = self.replica.machine();
        let load = self
            .shared
            .load_window
            .lock()
            .expect("load window lock")
            .per_expert(machine.num_experts);
        let command = {
            let prepared = self.shared.prepared.lock().expect("prepared lock");
            let reports = Reports {
                prepared: &prepared,
                load: &load,
            };
            self.controller.step(Instant::now(), machine, reports)
        };
        if let Some(command) = command {
            let context = self.context();
            if self.replica.propose(context, command).is_err() {
                self.controller.not_proposed();
            }
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
