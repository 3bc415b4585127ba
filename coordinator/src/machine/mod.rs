//! The replicated state machine: what every coordinator holds once a raft entry commits.
//!
//! Commands are small JSON documents with a format version. They are validated when they
//! are applied (never only when proposed: a replica must reach the same verdict from the
//! same log), and every command that a client may retry carries a request id, so a retry
//! of an applied command returns the first answer instead of applying twice.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::placement::check::{check, Draining, Invalid};
use crate::placement::planner::{plan, PlanInput};
use crate::placement::WorkerSlots;
use crate::state::{ClusterView, Member, Placement, Role};

mod records;

/// Format version of [`Envelope`]; an entry with another version is refused on apply.
pub const COMMAND_VERSION: u32 = 1;
/// Longest worker address accepted.
pub const ADDRESS_MAX: usize = 256;
/// Members at most; registrations past it are refused.
pub const MEMBERS_MAX: usize = 4096;
/// Answers remembered for idempotent retries.
const REQUESTS_REMEMBERED: usize = 4096;

/// Cluster-wide settings, fixed by the command that initializes the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// A worker silent for this long is declared dead by the leader.
    pub lease_ms: u64,
    /// Registrations must carry this token when it is set.
    pub join_token: Option<String>,
    /// Copies of every expert (on distinct workers, when there are enough).
    #[serde(default = "one")]
    pub min_replicas: usize,
    /// Extra copies for the hottest experts, over the whole cluster.
    #[serde(default)]
    pub redundancy: usize,
    /// The leader re-plans on its own when max worker load exceeds the mean by this many
    /// percent (0: never on its own).
    #[serde(default = "twenty_five")]
    pub rebalance_percent: u32,
}

fn one() -> usize {
    1
}

fn twenty_five() -> u32 {
    25
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease_ms: 5000,
            join_token: None,
            min_replicas: 1,
            redundancy: 0,
            rebalance_percent: 25,
        }
    }
}

/// A state change, as it travels in a raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Fixes the model identity and settings; proposed by the first leader. Applied once:
    /// later ones are refused.
    Init {
        model_fingerprint: String,
        num_experts: usize,
        settings: Settings,
        coordinators: BTreeMap<u64, String>,
    },
    Register {
        request_id: u64,
        role: Role,
        address: String,
        capacity: Option<usize>,
        pid: u32,
        model_fingerprint: String,
        join_token: String,
        /// An attention worker holding every routed expert itself.
        #[serde(default)]
        holds_experts: bool,
        /// An expert worker without the checkpoint's weight files.
        #[serde(default)]
        weightless: bool,
        /// An expert worker's backup slots (`--expert-backup`).
        #[serde(default)]
        backup: usize,
    },
    /// The leader's failure detector: the worker missed its lease.
    MarkDead { worker_id: u64 },
    /// The next placement: expert workers load what it gives them and report ready.
    Prepare { epoch: u64, experts: Vec<Vec<u64>> },
    /// Every worker is ready: the prepared placement becomes current.
    Commit { epoch: u64 },
    /// Move a worker's experts away before it leaves.
    Drain { worker_id: u64 },
    /// The NCCL unique id of a group of GPU ranks, offered by its rank 0; the first offer
    /// for a group stands.
    NcclId { group: String, id: Vec<u8> },
    /// Digests of experts (CRC-32 of their bytes in transfer order) computed by a worker
    /// from the checkpoint's files; the first recorded for an expert stands.
    ExpertDigests {
        worker_id: u64,
        digests: Vec<(u32, u32)>,
    },
    /// The digest of the dense weights, computed by an attention worker from the
    /// checkpoint's files; the first recorded stands.
    DenseDigest { worker_id: u64, crc32: u32 },
}

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;
/// NCCL groups remembered at most.
pub const NCCL_GROUPS_MAX: usize = 1024;
/// Bytes of an NCCL group name at most.
pub const NCCL_GROUP_NAME_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    pub command: Command,
}

impl Envelope {
    pub fn encode(command: Command) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            version: COMMAND_VERSION,
            command,
        })
        .expect("commands serialize")
    }
}

/// Why an applied command changed nothing. Every replica reaches the same verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("malformed command: {0}")]
    Malformed(String),
    #[error("the cluster is not initialized yet")]
    NotInitialized,
    #[error("the cluster is already initialized")]
    AlreadyInitialized,
    #[error("{0}")]
    Invalid(String),
    #[error("wrong join token")]
    JoinToken,
    #[error("the worker serves model {worker}, the cluster serves {cluster}")]
    WrongModel { worker: String, cluster: String },
    #[error("the cluster has too many members")]
    Full,
    #[error("worker {0} is not a live member")]
    UnknownWorker(u64),
    #[error("stale placement: {0}")]
    Stale(String),
}

/// The replicated cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Machine {
    /// Bumped by every applied change; equal on every replica at the same log index.
    pub version: u64,
    pub initialized: bool,
    pub model_fingerprint: String,
    pub num_experts: usize,
    pub settings: Settings,
    /// The coordinators: raft ids and their gRPC addresses.
    pub coordinators: BTreeMap<u64, String>,
    pub members: Vec<Member>,
    pub next_id: u64,
    pub placement: Placement,
    /// The prepared next placement (epoch = placement.epoch + 1).
    pub pending: Option<Placement>,
    pub unservable: Option<String>,
    /// (request id, answer) of recent registrations, for idempotent retries.
    pub answered: VecDeque<(u64, u64)>,
    /// NCCL unique ids by group name.
    #[serde(default)]
    pub nccl_ids: BTreeMap<String, Vec<u8>>,
    /// Expert → the CRC-32 of its bytes, as a worker with the files first reported it.
    #[serde(default)]
    pub expert_digests: BTreeMap<u32, u32>,
    /// The dense weights' digest, as an attention worker with the files first reported it.
    #[serde(default)]
    pub dense_digest: Option<u32>,
    /// `backups[e]`: the worker keeping expert e in host memory, not served; planned after
    /// every applied command ([`crate::placement::backups::plan_backups`]).
    #[serde(default)]
    pub backups: Vec<Vec<u64>>,
}

impl Machine {
    /// Applies one committed entry's data; the answer is a worker id for registrations.
    pub fn apply(&mut self, data: &[u8]) -> Result<u64, Rejected> {
        let envelope: Envelope =
            serde_json::from_slice(data).map_err(|e| Rejected::Malformed(e.to_string()))?;
        if envelope.version != COMMAND_VERSION {
            return Err(Rejected::Malformed(format!(
                "command version {} (this coordinator reads {COMMAND_VERSION})",
                envelope.version
            )));
        }
        let answer = self.apply_command(envelope.command)?;
        self.plan_backups();
        self.version += 1;
        Ok(answer)
    }

    /// Applies one command: one function per command, each validating before it changes
    /// anything.
    fn apply_command(&mut self, command: Command) -> Result<u64, Rejected> {
        match command {
            Command::Init {
                model_fingerprint,
                num_experts,
                settings,
                coordinators,
            } => self.init(model_fingerprint, num_experts, settings, coordinators),
            Command::Register {
                request_id,
                role,
                address,
                capacity,
                pid,
                model_fingerprint,
                join_token,
                holds_experts,
                weightless,
                backup,
            } => self.register(
                request_id,
                Member {
                    id: 0,
                    role,
                    address,
                    pid,
                    alive: true,
                    capacity,
                    draining: false,
                    holds_experts: holds_experts && role == Role::AttentionWorker,
                    weightless: weightless && role == Role::ExpertWorker,
                    backup: if role == Role::ExpertWorker {
                        backup.min(self.num_experts)
                    } else {
                        0
                    },
                },
                &model_fingerprint,
                &join_token,
            ),
            Command::MarkDead { worker_id } => self.mark_dead(worker_id),
            Command::Prepare { epoch, experts } => self.prepare(epoch, experts),
            Command::Commit { epoch } => self.commit(epoch),
            Command::NcclId { group, id } => self.nccl_id(group, id),
            Command::Drain { worker_id } => self.drain(worker_id),
            Command::ExpertDigests { worker_id, digests } => {
                self.expert_digests(worker_id, digests)
            }
            Command::DenseDigest { worker_id, crc32 } => self.record_dense_digest(worker_id, crc32),
        }
    }

    fn init(
        &mut self,
        model_fingerprint: String,
        num_experts: usize,
        settings: Settings,
        coordinators: BTreeMap<u64, String>,
    ) -> Result<u64, Rejected> {
        if self.initialized {
            return Err(Rejected::AlreadyInitialized);
        }
        if num_experts == 0 || settings.lease_ms == 0 {
            return Err(Rejected::Invalid(
                "num_experts and lease_ms must be positive".into(),
            ));
        }
        self.initialized = true;
        self.model_fingerprint = model_fingerprint;
        self.num_experts = num_experts;
        self.settings = settings;
        self.coordinators = coordinators;
        self.next_id = 1;
        self.unservable = Some("no expert worker has registered".into());
        Ok(0)
    }

    /// Admits `member` (its id is assigned here); a retried request gets the first answer.
    fn register(
        &mut self,
        request_id: u64,
        mut member: Member,
        model_fingerprint: &str,
        join_token: &str,
    ) -> Result<u64, Rejected> {
        if !self.initialized {
            return Err(Rejected::NotInitialized);
        }
        if let Some(&(_, id)) = self.answered.iter().find(|(r, _)| *r == request_id) {
            return Ok(id);
        }
        if self
            .settings
            .join_token
            .as_ref()
            .is_some_and(|t| !expertmesh_proto::secret::matches(t, join_token))
        {
            return Err(Rejected::JoinToken);
        }
        if member.address.is_empty() || member.address.len() > ADDRESS_MAX {
            return Err(Rejected::Invalid(format!(
                "address must be 1 to {ADDRESS_MAX} characters"
            )));
        }
        if model_fingerprint != self.model_fingerprint {
            return Err(Rejected::WrongModel {
                worker: model_fingerprint.to_owned(),
                cluster: self.model_fingerprint.clone(),
            });
        }
        if self.members.len() >= MEMBERS_MAX {
            return Err(Rejected::Full);
        }
        let id = self.next_id;
        self.next_id += 1;
        member.id = id;
        let role = member.role;
        self.members.push(member);
        if self.answered.len() == REQUESTS_REMEMBERED {
            self.answered.pop_front();
        }
        self.answered.push_back((request_id, id));
        if role == Role::ExpertWorker {
            self.ensure_servable();
        }
        Ok(id)
    }

    /// The live member `worker_id`.
    fn live_member_mut(&mut self, worker_id: u64) -> Result<&mut Member, Rejected> {
        self.members
            .iter_mut()
            .find(|m| m.id == worker_id && m.alive)
            .ok_or(Rejected::UnknownWorker(worker_id))
    }

    fn mark_dead(&mut self, worker_id: u64) -> Result<u64, Rejected> {
        let member = self.live_member_mut(worker_id)?;
        member.alive = false;
        if member.role == Role::ExpertWorker {
            self.ensure_servable();
        }
        Ok(worker_id)
    }

    fn prepare(&mut self, epoch: u64, experts: Vec<Vec<u64>>) -> Result<u64, Rejected> {
        if epoch != self.placement.epoch + 1 {
            return Err(Rejected::Stale(format!(
                "prepared epoch {epoch}, current is {}",
                self.placement.epoch
            )));
        }
        self.check_experts(&experts)?;
        self.pending = Some(Placement { epoch, experts });
        Ok(epoch)
    }

    fn commit(&mut self, epoch: u64) -> Result<u64, Rejected> {
        match self.pending.take() {
            Some(p) if p.epoch == epoch => {
                self.placement = p;
                self.unservable = None;
                Ok(epoch)
            }
            other => {
                self.pending = other;
                Err(Rejected::Stale(format!("no prepared placement {epoch}")))
            }
        }
    }

    fn drain(&mut self, worker_id: u64) -> Result<u64, Rejected> {
        let member = self.live_member_mut(worker_id)?;
        // An expert worker's copies move off it (the placement controller); an attention
        // worker gets no new requests, hands its running ones to the others and stops.
        member.draining = true;
        Ok(worker_id)
    }

    /// A placement may only use live, non-draining expert workers, one copy per worker per
    /// expert, within their capacities, and must place every expert (`placement::check`).
    fn check_experts(&self, experts: &[Vec<u64>]) -> Result<(), Rejected> {
        check(experts, self.num_experts, &self.members, Draining::Refused).map_err(|e| match e {
            Invalid::NotUsable { worker } => Rejected::UnknownWorker(worker),
            other => Rejected::Invalid(other.to_string()),
        })
    }

    /// Plans the host-memory backups over the placement (pending, else current): the live,
    /// non-draining expert workers that offer backup slots.
    fn plan_backups(&mut self) {
        let slots: BTreeMap<u64, usize> = self
            .members
            .iter()
            .filter(|m| m.role == Role::ExpertWorker && m.alive && !m.draining && m.backup > 0)
            .map(|m| (m.id, m.backup))
            .collect();
        if slots.is_empty() {
            self.backups.clear();
            return;
        }
        let experts = &self.pending.as_ref().unwrap_or(&self.placement).experts;
        self.backups = crate::placement::backups::plan_backups(experts, &slots, &self.backups);
    }

    /// The expert workers a plan may use: live and not draining (the draining ones too
    /// when nothing else is left).
    pub fn plannable_workers(&self) -> Vec<WorkerSlots> {
        let pick = |draining_ok: bool| -> Vec<WorkerSlots> {
            self.members
                .iter()
                .filter(|m| m.role == Role::ExpertWorker && m.alive && (draining_ok || !m.draining))
                .map(|m| WorkerSlots {
                    id: m.id,
                    capacity: m.capacity,
                })
                .collect()
        };
        let workers = pick(false);
        if workers.is_empty() {
            pick(true)
        } else {
            workers
        }
    }

    /// Adds or removes a coordinator after a committed configuration change.
    pub fn set_coordinator(&mut self, id: u64, address: Option<String>) {
        match address {
            Some(a) => self.coordinators.insert(id, a),
            None => self.coordinators.remove(&id),
        };
        self.version += 1;
    }

    /// After a worker joins or dies: drops dead copies, and when some expert is left with
    /// no copy (or nothing was placed yet) places it at once with the planner on uniform
    /// load (a pure function of the replicated state, so every replica computes the same).
    /// Copies that remain never move here; the leader's planner balances later.
    fn ensure_servable(&mut self) {
        let alive = |m: &Member| m.alive && m.role == Role::ExpertWorker;
        let live: Vec<u64> = self
            .members
            .iter()
            .filter(|m| alive(m))
            .map(|m| m.id)
            .collect();
        let mut experts = self.placement.experts.clone();
        for r in &mut experts {
            r.retain(|w| live.contains(w));
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.experts.iter().flatten().any(|w| !live.contains(w)))
        {
            self.pending = None;
        }
        let complete = check(&experts, self.num_experts, &self.members, Draining::Allowed).is_ok();
        if complete {
            if experts != self.placement.experts {
                self.placement = Placement {
                    epoch: self.placement.epoch + 1,
                    experts,
                };
                self.pending = None;
            }
            self.unservable = None;
            return;
        }
        let workers = self.plannable_workers();
        let load = vec![1.0; self.num_experts];
        match plan(PlanInput {
            workers: &workers,
            load: &load,
            min_replicas: self.settings.min_replicas,
            redundancy: 0,
            current: &experts,
            tolerance: 0.0,
            warm: &self.backups,
        }) {
            Ok(p) => {
                self.placement = Placement {
                    epoch: self.placement.epoch + 1,
                    experts: p.experts,
                };
                self.pending = None;
                self.unservable = None;
            }
            Err(e) => self.unservable = Some(e.to_string()),
        }
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            version: self.version,
            members: self.members.clone(),
            placement: self.placement.clone(),
            model_fingerprint: self.model_fingerprint.clone(),
            num_experts: self.num_experts,
            pending: self.pending.clone(),
            lease_ms: if self.initialized {
                self.settings.lease_ms
            } else {
                0
            },
            nccl_ids: self.nccl_ids.clone(),
            expert_digests: self.expert_digests.clone(),
            dense_digest: self.dense_digest,
            backups: self.backups.clone(),
            unservable: if self.initialized {
                self.unservable.clone()
            } else {
                Some("the coordinators have not elected a leader yet".into())
            },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serializes")
    }

    pub fn decode(data: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(data).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn init(m: &mut Machine, token: Option<&str>) {
        m.apply(&Envelope::encode(Command::Init {
            model_fingerprint: "fp".into(),
            num_experts: 4,
            settings: Settings {
                lease_ms: 1000,
                join_token: token.map(str::to_owned),
                ..Settings::default()
            },
            coordinators: BTreeMap::from([(1, "a:1".into())]),
        }))
        .unwrap();
    }

    pub(super) fn register(request_id: u64, role: Role, token: &str, fp: &str) -> Vec<u8> {
        Envelope::encode(Command::Register {
            request_id,
            role,
            address: "127.0.0.1:9".into(),
            capacity: None,
            pid: 1,
            model_fingerprint: fp.into(),
            join_token: token.into(),
            holds_experts: false,
            weightless: false,
            backup: 0,
        })
    }

    /// An expert worker's registration, with or without the files, offering `backup` slots.
    pub(super) fn expert_worker(request_id: u64, weightless: bool, backup: usize) -> Command {
        Command::Register {
            request_id,
            role: Role::ExpertWorker,
            address: format!("127.0.0.1:{request_id}"),
            capacity: None,
            pid: 1,
            model_fingerprint: "fp".into(),
            join_token: String::new(),
            holds_experts: false,
            weightless,
            backup,
        }
    }

    #[test]
    fn commands_are_validated_on_apply() {
        let mut m = Machine::default();
        assert_eq!(
            m.apply(&register(1, Role::ExpertWorker, "", "fp")),
            Err(Rejected::NotInitialized)
        );
        init(&mut m, Some("secret"));
        let v = m.version;
        let cases: [(Vec<u8>, Rejected); 4] = [
            (
                register(2, Role::ExpertWorker, "wrong", "fp"),
                Rejected::JoinToken,
            ),
            (
                register(3, Role::ExpertWorker, "secret", "other"),
                Rejected::WrongModel {
                    worker: "other".into(),
                    cluster: "fp".into(),
                },
            ),
            (
                Envelope::encode(Command::MarkDead { worker_id: 9 }),
                Rejected::UnknownWorker(9),
            ),
            (b"{not json".to_vec(), Rejected::Malformed(String::new())),
        ];
        for (i, (data, expect)) in cases.iter().enumerate() {
            match (m.apply(data), expect) {
                (Err(Rejected::Malformed(_)), Rejected::Malformed(_)) => {}
                (got, expect) => assert_eq!(got, Err(expect.clone()), "case {i}"),
            }
        }
        assert_eq!(m.version, v, "rejected commands change nothing");
        let wrong_version = serde_json::to_vec(&Envelope {
            version: 99,
            command: Command::MarkDead { worker_id: 1 },
        })
        .unwrap();
        assert!(matches!(
            m.apply(&wrong_version),
            Err(Rejected::Malformed(_))
        ));
    }

    #[test]
    fn retried_registration_applies_once() {
        let mut m = Machine::default();
        init(&mut m, None);
        let a = m.apply(&register(7, Role::ExpertWorker, "", "fp")).unwrap();
        let again = m.apply(&register(7, Role::ExpertWorker, "", "fp")).unwrap();
        assert_eq!(a, again);
        assert_eq!(m.members.len(), 1);
        // The first expert worker gets every expert at once; a second joins empty (the
        // leader moves experts to it through Prepare and Commit).
        assert_eq!(m.placement.epoch, 1);
        assert!(m.unservable.is_none());
        let b = m.apply(&register(8, Role::ExpertWorker, "", "fp")).unwrap();
        assert_ne!(a, b);
        assert_eq!(m.placement.epoch, 1);
        assert!(m.placement.experts_of(b).is_empty());
    }

    pub(super) fn apply(m: &mut Machine, c: Command) -> Result<u64, Rejected> {
        m.apply(&Envelope::encode(c))
    }

    #[test]
    fn prepare_commit_and_losing_workers() {
        let mut m = Machine::default();
        init(&mut m, None);
        let a = m.apply(&register(1, Role::ExpertWorker, "", "fp")).unwrap();
        let b = m.apply(&register(2, Role::ExpertWorker, "", "fp")).unwrap();
        let split = vec![vec![a], vec![a, b], vec![b], vec![b]];
        // Validation: the epoch must be next, every expert placed, live workers only.
        let bad = [
            (
                Command::Prepare {
                    epoch: 5,
                    experts: split.clone(),
                },
                "stale",
            ),
            (
                Command::Prepare {
                    epoch: 2,
                    experts: vec![vec![a]; 3],
                },
                "short",
            ),
            (
                Command::Prepare {
                    epoch: 2,
                    experts: vec![vec![a], vec![], vec![b], vec![b]],
                },
                "orphan",
            ),
            (
                Command::Prepare {
                    epoch: 2,
                    experts: vec![vec![a, a], vec![a], vec![b], vec![b]],
                },
                "twice",
            ),
            (
                Command::Prepare {
                    epoch: 2,
                    experts: vec![vec![9], vec![a], vec![b], vec![b]],
                },
                "unknown",
            ),
            (Command::Commit { epoch: 2 }, "nothing prepared"),
        ];
        for (c, why) in bad {
            assert!(apply(&mut m, c).is_err(), "{why}");
        }
        apply(
            &mut m,
            Command::Prepare {
                epoch: 2,
                experts: split.clone(),
            },
        )
        .unwrap();
        assert_eq!(m.placement.epoch, 1, "prepared, not yet current");
        assert_eq!(m.view().pending.unwrap().experts, split);
        apply(&mut m, Command::Commit { epoch: 2 }).unwrap();
        assert_eq!(m.placement.epoch, 2);
        assert!(m.pending.is_none());
        // Losing b: expert 1 keeps its copy on a; experts 2 and 3 are placed on a at once.
        apply(&mut m, Command::MarkDead { worker_id: b }).unwrap();
        assert_eq!(m.placement.epoch, 3);
        assert_eq!(m.placement.experts_of(a).len(), 4);
        assert_eq!(
            apply(&mut m, Command::MarkDead { worker_id: b }),
            Err(Rejected::UnknownWorker(b))
        );
        // A draining worker may not be given experts.
        let c = m.apply(&register(3, Role::ExpertWorker, "", "fp")).unwrap();
        apply(&mut m, Command::Drain { worker_id: c }).unwrap();
        assert!(apply(
            &mut m,
            Command::Prepare {
                epoch: 4,
                experts: vec![vec![c]; 4]
            }
        )
        .is_err());
        assert_eq!(Machine::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn every_expert_has_a_backup_off_its_workers_and_a_lost_copy_goes_to_it() {
        let mut m = Machine::default();
        init(&mut m, None);
        for id in 1..=3 {
            apply(&mut m, expert_worker(id, false, 2)).unwrap();
        }
        let placed = m.placement.experts.clone();
        assert_eq!(m.backups.len(), 4);
        for (e, b) in m.backups.iter().enumerate() {
            assert_eq!(b.len(), 1, "expert {e}");
            assert!(
                !placed[e].contains(&b[0]),
                "expert {e} backed up on its worker"
            );
        }
        // The worker with the most experts dies: each of its experts goes to its backup.
        let victim = (1..=3)
            .max_by_key(|&w| m.placement.experts_of(w).len())
            .unwrap();
        let lost = m.placement.experts_of(victim);
        let backups = m.backups.clone();
        apply(&mut m, Command::MarkDead { worker_id: victim }).unwrap();
        for e in lost {
            assert_eq!(
                m.placement.experts[e as usize], backups[e as usize],
                "expert {e}"
            );
        }
        // The backups follow: none on the dead worker, none on an expert's own worker.
        for (e, b) in m.backups.iter().enumerate() {
            assert!(!b.contains(&victim) && !m.placement.experts[e].iter().any(|w| b.contains(w)));
        }
        assert_eq!(Machine::decode(&m.encode()).unwrap(), m);
    }
}
