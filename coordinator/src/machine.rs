//! The replicated state machine: what every coordinator holds once a raft entry commits.
//!
//! Commands are small JSON documents with a format version. They are validated when they
//! are applied (never only when proposed: a replica must reach the same verdict from the
//! same log), and every command that a client may retry carries a request id, so a retry
//! of an applied command returns the first answer instead of applying twice.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::placement::{assign, WorkerSlots};
use crate::state::{ClusterView, Member, Placement, Role};

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease_ms: 5000,
            join_token: None,
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
    },
    /// The leader's failure detector: the worker missed its lease.
    MarkDead { worker_id: u64 },
}

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
    pub unservable: Option<String>,
    /// (request id, answer) of recent registrations, for idempotent retries.
    pub answered: VecDeque<(u64, u64)>,
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
        self.version += 1;
        Ok(answer)
    }

    fn apply_command(&mut self, command: Command) -> Result<u64, Rejected> {
        match command {
            Command::Init {
                model_fingerprint,
                num_experts,
                settings,
                coordinators,
            } => {
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
            Command::Register {
                request_id,
                role,
                address,
                capacity,
                pid,
                model_fingerprint,
                join_token,
            } => {
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
                    .is_some_and(|t| *t != join_token)
                {
                    return Err(Rejected::JoinToken);
                }
                if address.is_empty() || address.len() > ADDRESS_MAX {
                    return Err(Rejected::Invalid(format!(
                        "address must be 1 to {ADDRESS_MAX} characters"
                    )));
                }
                if model_fingerprint != self.model_fingerprint {
                    return Err(Rejected::WrongModel {
                        worker: model_fingerprint,
                        cluster: self.model_fingerprint.clone(),
                    });
                }
                if self.members.len() >= MEMBERS_MAX {
                    return Err(Rejected::Full);
                }
                let id = self.next_id;
                self.next_id += 1;
                self.members.push(Member {
                    id,
                    role,
                    address,
                    pid,
                    alive: true,
                    capacity,
                });
                if self.answered.len() == REQUESTS_REMEMBERED {
                    self.answered.pop_front();
                }
                self.answered.push_back((request_id, id));
                if role == Role::ExpertWorker {
                    self.replan();
                }
                Ok(id)
            }
            Command::MarkDead { worker_id } => {
                let member = self
                    .members
                    .iter_mut()
                    .find(|m| m.id == worker_id && m.alive)
                    .ok_or(Rejected::UnknownWorker(worker_id))?;
                member.alive = false;
                if member.role == Role::ExpertWorker {
                    self.replan();
                }
                Ok(worker_id)
            }
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

    /// Re-plans the placement over the live expert workers (a pure function of the
    /// replicated state, so every replica computes the same one).
    fn replan(&mut self) {
        let workers: Vec<WorkerSlots> = self
            .members
            .iter()
            .filter(|m| m.role == Role::ExpertWorker && m.alive)
            .map(|m| WorkerSlots {
                id: m.id,
                capacity: m.capacity,
            })
            .collect();
        match assign(self.num_experts, &workers) {
            Ok(experts) => {
                if experts != self.placement.experts {
                    self.placement = Placement {
                        epoch: self.placement.epoch + 1,
                        experts,
                    };
                }
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

    fn init(m: &mut Machine, token: Option<&str>) {
        m.apply(&Envelope::encode(Command::Init {
            model_fingerprint: "fp".into(),
            num_experts: 4,
            settings: Settings {
                lease_ms: 1000,
                join_token: token.map(str::to_owned),
            },
            coordinators: BTreeMap::from([(1, "a:1".into())]),
        }))
        .unwrap();
    }

    fn register(request_id: u64, role: Role, token: &str, fp: &str) -> Vec<u8> {
        Envelope::encode(Command::Register {
            request_id,
            role,
            address: "127.0.0.1:9".into(),
            capacity: None,
            pid: 1,
            model_fingerprint: fp.into(),
            join_token: token.into(),
        })
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
        let b = m.apply(&register(8, Role::ExpertWorker, "", "fp")).unwrap();
        assert_ne!(a, b);
        assert_eq!(m.placement.epoch, 2);
        assert!(m.unservable.is_none());
    }

    #[test]
    fn mark_dead_replans_and_roundtrips() {
        let mut m = Machine::default();
        init(&mut m, None);
        let a = m.apply(&register(1, Role::ExpertWorker, "", "fp")).unwrap();
        let b = m.apply(&register(2, Role::ExpertWorker, "", "fp")).unwrap();
        assert_eq!(m.placement.experts_of(b).len(), 2);
        m.apply(&Envelope::encode(Command::MarkDead { worker_id: b }))
            .unwrap();
        assert_eq!(m.placement.experts_of(a).len(), 4);
        assert_eq!(m.placement.epoch, 3);
        assert_eq!(
            m.apply(&Envelope::encode(Command::MarkDead { worker_id: b })),
            Err(Rejected::UnknownWorker(b))
        );
        assert_eq!(Machine::decode(&m.encode()).unwrap(), m);
    }
}
