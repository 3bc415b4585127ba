//! One coordinator's raft replica as a synchronous state machine: raft-rs's `RawNode` over
//! [`DiskStorage`], and the replicated [`Machine`]. It knows nothing of time or sockets:
//! callers tick it, step messages into it and call [`Replica::ready`], which runs one
//! `Ready` round (persist → send → apply → advance) and returns what to send and what was
//! applied. The async node drives it with a clock and gRPC; the simulation tests drive it
//! with a seeded fake network.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, EntryType, Message};
use raft::{Config, RawNode, ReadOnlyOption, ReadState, StateRole, Storage};

use crate::machine::{Command, Envelope, Machine, Rejected};
use crate::storage::{DiskStorage, LogError};

/// Raft timing, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Election timeouts are drawn from [election_ticks, max_election_ticks); 0 means
    /// twice `election_ticks`.
    pub max_election_ticks: usize,
    /// A snapshot is taken (and the log before it dropped) every this many applied entries.
    pub compact_every: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_election_ticks: 0,
            compact_every: 1024,
        }
    }
}

/// A committed entry this replica applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    /// The term the entry was proposed in: (index, term) names one entry.
    pub term: u64,
    /// The proposer's context (empty for entries proposed without one).
    pub context: Vec<u8>,
    pub result: Result<u64, Rejected>,
}

/// What one `Ready` round produced.
#[derive(Debug, Default)]
pub struct Output {
    pub messages: Vec<Message>,
    pub applied: Vec<Applied>,
    pub read_states: Vec<ReadState>,
    /// The replicated state changed (publish it).
    pub changed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the snapshot's state image does not decode: {0}")]
    Image(String),
    #[error("the coordinator is shutting down")]
    Stopped,
}

/// Where the replica stands, for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RaftStatus {
    pub role: RaftRole,
    /// 0 when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RaftRole {
    #[default]
    Follower,
    Candidate,
    PreCandidate,
    Leader,
}

impl RaftRole {
    pub fn name(self) -> &'static str {
        match self {
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::PreCandidate => "pre-candidate",
            RaftRole::Leader => "leader",
        }
    }
}

pub struct Replica {
    raw: RawNode<DiskStorage>,
    machine: Machine,
    applied: u64,
    compact_every: u64,
    /// A membership change was applied after the latest snapshot: the next one is taken at
    /// once, since a snapshot sent to a new member must name it (raft-rs refuses to restore a
    /// snapshot whose configuration leaves the receiver out).
    membership_since_snapshot: bool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.raw.raft.id)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Replica {
    /// Opens replica `id` on `storage` (see [`DiskStorage::open`]).
    pub fn open(id: u64, storage: DiskStorage, timing: Timing) -> Result<Self, ReplicaError> {
        let machine = match storage.snapshot_data() {
            Some(data) => Machine::decode(data).map_err(ReplicaError::Image)?,
            None => Machine::default(),
        };
        let applied = storage.snapshot_index();
        let config = Config {
            id,
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            min_election_tick: timing.election_ticks,
            max_election_tick: if timing.max_election_ticks > timing.election_ticks {
                timing.max_election_ticks
            } else {
                2 * timing.election_ticks
            },
            pre_vote: true,
            check_quorum: true,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            read_only_option: ReadOnlyOption::Safe,
            ..Config::default()
        };
        let raw = RawNode::new(&config, storage, &discard_logger())?;
        Ok(Self {
            raw,
            machine,
            applied,
            compact_every: timing.compact_every.max(1),
            membership_since_snapshot: false,
        })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Steps a message from a peer in; a message raft cannot use is dropped.
    pub fn step(&mut self, m: Message) {
        let _ = self.raw.step(m);
    }

    /// Proposes a command; fails at once when this replica is not the leader.
    pub fn propose(&mut self, context: Vec<u8>, command: Command) -> Result<(), raft::Error> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(raft::Error::ProposalDropped);
        }
        self.raw.propose(context, Envelope::encode(command))
    }

    /// Proposes adding (with its address) or removing a coordinator.
    pub fn propose_membership(
        &mut self,
        context: Vec<u8>,
        id: u64,
        address: Option<String>,
    ) -> Result<(), raft::Error> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(raft::Error::ProposalDropped);
        }
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(match address {
            Some(_) => ConfChangeType::AddNode,
            None => ConfChangeType::RemoveNode,
        });
        cc.context = address.unwrap_or_default().into_bytes().into();
        self.raw.propose_conf_change(context, cc)
    }

    /// Asks for a read index (answered in a later [`Output::read_states`]).
    pub fn read_index(&mut self, context: Vec<u8>) {
        self.raw.read_index(context);
    }

    pub fn status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        RaftStatus {
            role: match raft.state {
                StateRole::Leader => RaftRole::Leader,
                StateRole::Candidate => RaftRole::Candidate,
                StateRole::PreCandidate => RaftRole::PreCandidate,
                StateRole::Follower => RaftRole::Follower,
            },
            leader: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied,
        }
    }

    /// The voters of the current configuration.
    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    /// One `Ready` round: persist (fsync) → collect messages → apply → advance.
    pub fn ready(&mut self) -> Result<Output, ReplicaError> {
        let mut out = Output::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        // Messages a leader may send before its own entries are durable.
        out.messages.extend(rd.take_messages());
        let mut dirty = false;
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.machine = Machine::decode(&snap.data).map_err(ReplicaError::Image)?;
            self.applied = snap.get_metadata().index;
            self.raw.mut_store().install_snapshot(snap)?;
            out.changed = true;
        }
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries())?;
            dirty = true;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs.clone());
            dirty = true;
        }
        if dirty {
            self.raw.mut_store().sync()?;
        }
        out.messages.extend(rd.take_persisted_messages());
        out.read_states = rd.take_read_states();
        let committed = rd.take_committed_entries();
        self.apply(committed, &mut out)?;
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed, &mut out)?;
        self.raw.advance_apply();
        let store = self.raw.store();
        if (self.applied >= store.snapshot_index() + self.compact_every
            || self.membership_since_snapshot)
            && self.applied >= store.first_index()?
        {
            let image = self.machine.encode();
            self.raw.mut_store().compact(self.applied, image)?;
            self.membership_since_snapshot = false;
        }
        Ok(out)
    }

    fn apply(
        &mut self,
        entries: Vec<raft::eraftpb::Entry>,
        out: &mut Output,
    ) -> Result<(), ReplicaError> {
        let mut conf_changed = false;
        for e in entries {
            self.applied = e.index;
            if e.data.is_empty() {
                // A new leader's empty entry.
                continue;
            }
            let result = match e.get_entry_type() {
                EntryType::EntryNormal => self.machine.apply(&e.data),
                EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&e.data) {
                    Ok(cc) => {
                        let cs = self.raw.apply_conf_change(&cc)?;
                        self.raw.mut_store().set_conf_state(cs);
                        conf_changed = true;
                        let address = (cc.get_change_type() == ConfChangeType::AddNode)
                            .then(|| String::from_utf8_lossy(&cc.context).into_owned());
                        self.machine.set_coordinator(cc.node_id, address);
                        Ok(cc.node_id)
                    }
                    Err(e) => Err(Rejected::Malformed(e.to_string())),
                },
                EntryType::EntryConfChangeV2 => Err(Rejected::Malformed(
                    "joint configuration changes are not used".into(),
                )),
            };
            out.changed |= result.is_ok();
            out.applied.push(Applied {
                index: e.index,
                term: e.term,
                context: e.context.to_vec(),
                result,
            });
        }
        if conf_changed {
            self.raw.mut_store().sync()?;
            self.membership_since_snapshot = true;
        }
        Ok(())
    }

    /// Notes that a peer could not be reached (raft backs off sending to it).
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Tells raft whether a snapshot reached a peer.
    pub fn report_snapshot(&mut self, id: u64, delivered: bool) {
        self.raw.report_snapshot(
            id,
            if delivered {
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            },
        );
    }

    /// Starts an election now (a group of one need not wait out an election timeout).
    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }
}
