//! Cluster state: members and placement, as the coordinator keeps it and as workers see it.
//! `ClusterView` is the domain form of the wire `ClusterState`, checked once on arrival.

use std::collections::BTreeMap;

use expertmesh_proto::v1 as pb;

/// A role a worker plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    ExpertWorker,
    AttentionWorker,
}

impl From<Role> for pb::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::ExpertWorker => pb::Role::ExpertWorker,
            Role::AttentionWorker => pb::Role::AttentionWorker,
        }
    }
}

impl TryFrom<i32> for Role {
    type Error = StateError;
    fn try_from(v: i32) -> Result<Self, StateError> {
        match pb::Role::try_from(v) {
            Ok(pb::Role::ExpertWorker) => Ok(Role::ExpertWorker),
            Ok(pb::Role::AttentionWorker) => Ok(Role::AttentionWorker),
            _ => Err(StateError(format!("unknown role {v}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster state: {0}")]
pub struct StateError(pub String);

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: u64,
    pub role: Role,
    pub address: String,
    pub pid: u32,
    pub alive: bool,
    pub capacity: Option<usize>,
    /// Alive, with its experts being moved away (it gets none in new placements).
    #[serde(default)]
    pub draining: bool,
    /// An attention worker holding every routed expert itself (`--dispatch local`): it
    /// serves whatever the expert placement is.
    #[serde(default)]
    pub holds_experts: bool,
    /// An expert worker without the checkpoint's weight files: it can send only the experts
    /// it holds (fetched), and takes what it gains from peers.
    #[serde(default)]
    pub weightless: bool,
    /// An expert worker: experts it keeps in host memory as backups, not served
    /// (`--expert-backup`).
    #[serde(default)]
    pub backup: usize,
}

/// Which worker holds each expert, under which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub epoch: u64,
    /// `experts[e]`: workers holding expert e, in preference order.
    pub experts: Vec<Vec<u64>>,
}

impl Placement {
    /// The experts a worker holds.
    pub fn experts_of(&self, worker: u64) -> Vec<u32> {
        self.experts
            .iter()
            .enumerate()
            .filter(|(_, r)| r.contains(&worker))
            .map(|(e, _)| e as u32)
            .collect()
    }
}

/// What every worker knows of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    pub version: u64,
    pub members: Vec<Member>,
    pub placement: Placement,
    pub model_fingerprint: String,
    pub num_experts: usize,
    /// Why the cluster cannot serve, when it cannot.
    pub unservable: Option<String>,
    /// The next placement (epoch + 1) while expert workers load its experts.
    pub pending: Option<Placement>,
    /// How long a worker may go unheard before it is declared dead (0 before `Init`).
    pub lease_ms: u64,
    /// NCCL unique ids by group (served by the `NcclId` call, not sent with the state).
    pub nccl_ids: BTreeMap<String, Vec<u8>>,
    /// Expert → the CRC-32 of its bytes in transfer order, as first reported by a worker
    /// with the checkpoint's files (experts nobody has digested yet are absent).
    pub expert_digests: BTreeMap<u32, u32>,
    /// The dense weights' digest (every tensor but the routed experts), as first reported
    /// by an attention worker with the checkpoint's files.
    pub dense_digest: Option<u32>,
    /// `backups[e]`: the worker keeping expert e in host memory, not served.
    pub backups: Vec<Vec<u64>>,
}

impl ClusterView {
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn count(&self, role: Role) -> usize {
        self.members
            .iter()
            .filter(|m| m.role == role && m.alive)
            .count()
    }

    /// The transfers of the plan from the committed placement to the pending one (to the
    /// committed one itself when none is pending): for each expert a weightless worker gains,
    /// the peer it takes it from, keyed (worker, expert). A worker with the checkpoint's
    /// files reads what it gains from them and has no entry. The sender is a live holder of
    /// the expert under the committed placement (any live worker with the files when no
    /// holder is left), the one with the fewest transfers planned so far, so that transfers
    /// spread over holders. A pure function of the replicated state: every coordinator and
    /// worker computes the same plan.
    pub fn transfer_sources(&self) -> BTreeMap<(u64, u32), u64> {
        let target = self.pending.as_ref().unwrap_or(&self.placement);
        let live = |m: &&Member| m.alive && m.role == Role::ExpertWorker;
        let receivers: Vec<u64> = self
            .members
            .iter()
            .filter(live)
            .filter(|m| m.weightless)
            .map(|m| m.id)
            .collect();
        let with_files: Vec<u64> = self
            .members
            .iter()
            .filter(live)
            .filter(|m| !m.weightless)
            .map(|m| m.id)
            .collect();
        let alive: Vec<u64> = self.members.iter().filter(live).map(|m| m.id).collect();
        let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
        let mut plan = BTreeMap::new();
        for (e, copies) in target.experts.iter().enumerate() {
            let held: &[u64] = self.placement.experts.get(e).map_or(&[], Vec::as_slice);
            for &w in copies.iter().filter(|w| receivers.contains(w)) {
                if held.contains(&w) {
                    continue;
                }
                // `w` holds none of it, and as a weightless worker has no files.
                let holders: Vec<u64> =
                    held.iter().copied().filter(|h| alive.contains(h)).collect();
                let candidates = if holders.is_empty() {
                    &with_files
                } else {
                    &holders
                };
                if let Some(&from) = candidates
                    .iter()
                    .min_by_key(|&&c| (busy.get(&c).copied().unwrap_or(0), c))
                {
                    *busy.entry(from).or_default() += 1;
                    plan.insert((w, e as u32), from);
                }
            }
        }
        plan
    }
}

impl From<&ClusterView> for pb::ClusterState {
    fn from(v: &ClusterView) -> Self {
        pb::ClusterState {
            version: v.version,
            members: v
                .members
                .iter()
                .map(|m| pb::Member {
                    id: m.id,
                    role: pb::Role::from(m.role) as i32,
                    address: m.address.clone(),
                    pid: m.pid,
                    status: match (m.alive, m.draining) {
                        (false, _) => pb::MemberStatus::Dead,
                        (true, false) => pb::MemberStatus::Alive,
                        (true, true) => pb::MemberStatus::Draining,
                    } as i32,
                    expert_capacity: m.capacity.unwrap_or(0) as u32,
                    has_capacity: m.capacity.is_some(),
                    holds_experts: m.holds_experts,
                    weightless: m.weightless,
                    expert_backup: m.backup as u32,
                })
                .collect(),
            placement: Some(pb::Placement::from(&v.placement)),
            pending: v.pending.as_ref().map(pb::Placement::from),
            model_fingerprint: v.model_fingerprint.clone(),
            num_experts: v.num_experts as u32,
            unservable_reason: v.unservable.clone().unwrap_or_default(),
            lease_ms: v.lease_ms,
            expert_digests: v
                .expert_digests
                .iter()
                .map(|(&expert, &crc32)| pb::ExpertDigest { expert, crc32 })
                .collect(),
            dense_digest: v.dense_digest.unwrap_or(0),
            has_dense_digest: v.dense_digest.is_some(),
            backups: v
                .backups
                .iter()
                .map(|w| pb::ExpertReplicas { workers: w.clone() })
                .collect(),
        }
    }
}

impl TryFrom<pb::ClusterState> for ClusterView {
    type Error = StateError;

    fn try_from(s: pb::ClusterState) -> Result<Self, StateError> {
        let members = s
            .members
            .into_iter()
            .map(|m| {
                Ok(Member {
                    id: m.id,
                    role: Role::try_from(m.role)?,
                    address: m.address,
                    pid: m.pid,
                    alive: m.status == pb::MemberStatus::Alive as i32
                        || m.status == pb::MemberStatus::Draining as i32,
                    draining: m.status == pb::MemberStatus::Draining as i32,
                    capacity: m.has_capacity.then_some(m.expert_capacity as usize),
                    holds_experts: m.holds_experts,
                    weightless: m.weightless,
                    backup: m.expert_backup as usize,
                })
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        let placement = s
            .placement
            .ok_or_else(|| StateError("missing placement".into()))?;
        let placement = Placement::from(placement);
        let unservable = (!s.unservable_reason.is_empty()).then_some(s.unservable_reason);
        let num_experts = s.num_experts as usize;
        if unservable.is_none() {
            check_placement(&placement, num_experts, &members)?;
        }
        if s.expert_digests.len() > num_experts {
            return Err(StateError(format!(
                "{} expert digests for {num_experts} experts",
                s.expert_digests.len()
            )));
        }
        let mut expert_digests = BTreeMap::new();
        for d in s.expert_digests {
            if d.expert as usize >= num_experts {
                return Err(StateError(format!("a digest for expert {}", d.expert)));
            }
            expert_digests.insert(d.expert, d.crc32);
        }
        if s.backups.len() > num_experts {
            return Err(StateError(format!(
                "backups for {} experts of {num_experts}",
                s.backups.len()
            )));
        }
        let backups: Vec<Vec<u64>> = s.backups.into_iter().map(|r| r.workers).collect();
        if backups.iter().any(|b| b.len() > members.len()) {
            return Err(StateError(
                "an expert backed up more times than there are members".into(),
            ));
        }
        let pending = s.pending.map(Placement::from);
        if let Some(p) = &pending {
            check_placement(p, num_experts, &members)?;
        }
        Ok(ClusterView {
            version: s.version,
            members,
            placement,
            model_fingerprint: s.model_fingerprint,
            num_experts,
            unservable,
            pending,
            lease_ms: s.lease_ms,
            nccl_ids: BTreeMap::new(),
            expert_digests,
            dense_digest: s.has_dense_digest.then_some(s.dense_digest),
            backups,
        })
    }
}

impl From<&Placement> for pb::Placement {
    fn from(p: &Placement) -> Self {
        pb::Placement {
            epoch: p.epoch,
            experts: p
                .experts
                .iter()
                .map(|w| pb::ExpertReplicas { workers: w.clone() })
                .collect(),
        }
    }
}

impl From<pb::Placement> for Placement {
    fn from(p: pb::Placement) -> Self {
        Placement {
            epoch: p.epoch,
            experts: p.experts.into_iter().map(|r| r.workers).collect(),
        }
    }
}

/// Every expert has a copy, and every copy is on a known member.
fn check_placement(
    p: &Placement,
    num_experts: usize,
    members: &[Member],
) -> Result<(), StateError> {
    if p.experts.len() != num_experts {
        return Err(StateError(format!(
            "placement covers {} experts of {num_experts}",
            p.experts.len()
        )));
    }
    for (e, replicas) in p.experts.iter().enumerate() {
        if replicas.is_empty() {
            return Err(StateError(format!("expert {e} has no worker")));
        }
        if let Some(w) = replicas
            .iter()
            .find(|w| !members.iter().any(|m| m.id == **w))
        {
            return Err(StateError(format!(
                "expert {e} is placed on unknown worker {w}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, weightless: bool) -> Member {
        Member {
            id,
            role: Role::ExpertWorker,
            address: format!("127.0.0.1:{}", 7100 + id),
            pid: 1,
            alive: true,
            capacity: None,
            draining: false,
            holds_experts: false,
            weightless,
            backup: 0,
        }
    }

    /// Workers 1 and 2 have the files and every expert; weightless 3 gains experts 0..8.
    fn view(pending: Vec<Vec<u64>>) -> ClusterView {
        ClusterView {
            version: 1,
            members: vec![member(1, false), member(2, false), member(3, true)],
            placement: Placement {
                epoch: 1,
                experts: vec![vec![1, 2]; 8],
            },
            model_fingerprint: String::new(),
            num_experts: 8,
            unservable: None,
            pending: Some(Placement {
                epoch: 2,
                experts: pending,
            }),
            lease_ms: 1000,
            nccl_ids: BTreeMap::new(),
            expert_digests: BTreeMap::new(),
            dense_digest: None,
            backups: Vec::new(),
        }
    }

    #[test]
    fn transfers_spread_over_live_holders_and_only_weightless_workers_fetch() {
        // 3 gains all 8; 1 keeps all; 2 keeps only the even ones.
        let pending = (0..8)
            .map(|e| {
                if e % 2 == 0 {
                    vec![1, 2, 3]
                } else {
                    vec![1, 3]
                }
            })
            .collect();
        let mut v = view(pending);
        let plan = v.transfer_sources();
        assert_eq!(plan.len(), 8, "{plan:?}");
        assert!(plan.keys().all(|(w, _)| *w == 3));
        let from = |p: &BTreeMap<(u64, u32), u64>, s| p.values().filter(|&&f| f == s).count();
        assert_eq!((from(&plan, 1), from(&plan, 2)), (4, 4), "{plan:?}");
        // A dead holder sends nothing: the other one sends all.
        v.members[1].alive = false;
        let plan = v.transfer_sources();
        assert_eq!((plan.len(), from(&plan, 1)), (8, 8), "{plan:?}");
        // A worker with the files reads what it gains: no transfer for it.
        v.members[1].alive = true;
        v.members[2].weightless = false;
        assert!(v.transfer_sources().is_empty());
    }

    #[test]
    fn a_weightless_holder_sends_what_it_holds_and_nothing_else() {
        // Committed: 3 (weightless) holds expert 0 alone; 1 holds the rest. Pending: 4
        // (weightless) gains 0 and 1.
        let mut v = view(vec![vec![3, 4], vec![1, 4]]);
        v.members.push(member(4, true));
        v.placement.experts = vec![vec![3], vec![1]];
        let plan = v.transfer_sources();
        assert_eq!(plan, BTreeMap::from([((4, 0), 3), ((4, 1), 1)]));
        // Its only holder dead: a worker with the files sends it.
        v.members[2].alive = false;
        assert_eq!(v.transfer_sources()[&(4, 0)], 1);
    }

    #[test]
    fn expert_digests_cross_the_wire_and_hostile_ones_are_refused() {
        let mut v = view(vec![vec![1, 2]; 8]);
        v.expert_digests = BTreeMap::from([(0, 7), (7, u32::MAX)]);
        v.dense_digest = Some(0);
        v.backups = vec![vec![3], vec![], vec![1]];
        let wire = pb::ClusterState::from(&v);
        assert_eq!(ClusterView::try_from(wire.clone()).unwrap(), v);
        let digest = |expert| pb::ExpertDigest { expert, crc32: 1 };
        for bad in [vec![digest(8)], vec![digest(0); 9]] {
            let mut w = wire.clone();
            w.expert_digests = bad;
            assert!(ClusterView::try_from(w).is_err());
        }
    }
}
