//! What the cluster records once, the first report standing: the NCCL unique id of each GPU
//! group (offered by its rank 0), the digest of every expert (from the expert workers with
//! the checkpoint's files) and of the dense weights (from an attention worker with them).
//! A later report that disagrees changes nothing.

use super::{Machine, Rejected, NCCL_GROUPS_MAX, NCCL_GROUP_NAME_MAX, NCCL_ID_BYTES};
use crate::state::Role;

impl Machine {
    /// The first offer of a group's NCCL id stands.
    pub(super) fn nccl_id(&mut self, group: String, id: Vec<u8>) -> Result<u64, Rejected> {
        if group.is_empty() || group.len() > NCCL_GROUP_NAME_MAX {
            return Err(Rejected::Invalid(format!(
                "an NCCL group name has 1 to {NCCL_GROUP_NAME_MAX} bytes"
            )));
        }
        if id.len() != NCCL_ID_BYTES {
            return Err(Rejected::Invalid(format!(
                "an NCCL unique id has {NCCL_ID_BYTES} bytes, not {}",
                id.len()
            )));
        }
        if !self.nccl_ids.contains_key(&group) && self.nccl_ids.len() >= NCCL_GROUPS_MAX {
            return Err(Rejected::Full);
        }
        self.nccl_ids.entry(group).or_insert(id);
        Ok(0)
    }

    /// Records the digests of experts that have none yet; a digest that disagrees with the
    /// recorded one changes nothing (the answer counts them, for the leader's log).
    pub(super) fn expert_digests(
        &mut self,
        worker_id: u64,
        digests: Vec<(u32, u32)>,
    ) -> Result<u64, Rejected> {
        let member = self
            .members
            .iter()
            .find(|m| m.id == worker_id && m.alive && m.role == Role::ExpertWorker)
            .ok_or(Rejected::UnknownWorker(worker_id))?;
        if member.weightless {
            return Err(Rejected::Invalid(format!(
                "worker {worker_id} has no checkpoint files to digest"
            )));
        }
        if digests.len() > self.num_experts {
            return Err(Rejected::Invalid(format!(
                "{} digests for {} experts",
                digests.len(),
                self.num_experts
            )));
        }
        if let Some((e, _)) = digests
            .iter()
            .find(|(e, _)| *e as usize >= self.num_experts)
        {
            return Err(Rejected::Invalid(format!("no expert {e}")));
        }
        let mut disagreeing = 0;
        for (e, crc) in digests {
            if *self.expert_digests.entry(e).or_insert(crc) != crc {
                disagreeing += 1;
            }
        }
        Ok(disagreeing)
    }

    /// Records the dense weights' digest when there is none yet; the answer is 1 when one
    /// that disagrees was recorded before.
    pub(super) fn record_dense_digest(
        &mut self,
        worker_id: u64,
        crc32: u32,
    ) -> Result<u64, Rejected> {
        if !self
            .members
            .iter()
            .any(|m| m.id == worker_id && m.alive && m.role == Role::AttentionWorker)
        {
            return Err(Rejected::UnknownWorker(worker_id));
        }
        Ok(u64::from(*self.dense_digest.get_or_insert(crc32) != crc32))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::tests::{apply, expert_worker, init, register};
    use super::super::{
        Command, Machine, Rejected, NCCL_GROUPS_MAX, NCCL_GROUP_NAME_MAX, NCCL_ID_BYTES,
    };
    use crate::state::Role;

    #[test]
    fn expert_digests_come_from_workers_with_files_and_the_first_stands() {
        let mut m = Machine::default();
        init(&mut m, None);
        let mut join =
            |id: u64, weightless: bool| apply(&mut m, expert_worker(id, weightless, 0)).unwrap();
        let (files, other, weightless) = (join(1, false), join(2, false), join(3, true));
        let digests = |worker_id: u64, digests: &[(u32, u32)]| Command::ExpertDigests {
            worker_id,
            digests: digests.to_vec(),
        };
        assert_eq!(apply(&mut m, digests(files, &[(0, 10), (3, 13)])), Ok(0));
        // A second report of expert 3 that disagrees is counted and changes nothing.
        assert_eq!(apply(&mut m, digests(other, &[(3, 99), (1, 11)])), Ok(1));
        assert_eq!(
            m.view().expert_digests,
            BTreeMap::from([(0, 10), (1, 11), (3, 13)])
        );
        let version = m.version;
        for bad in [
            digests(weightless, &[(2, 12)]),
            digests(files, &[(4, 14)]),
            digests(files, &[(2, 12); 5]),
        ] {
            assert!(matches!(apply(&mut m, bad), Err(Rejected::Invalid(_))));
        }
        assert_eq!(
            apply(&mut m, digests(77, &[(2, 12)])),
            Err(Rejected::UnknownWorker(77))
        );
        assert_eq!(m.version, version, "refused reports change nothing");
        assert_eq!(Machine::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn the_dense_digest_comes_from_an_attention_worker_and_the_first_stands() {
        let mut m = Machine::default();
        init(&mut m, None);
        let attention = m
            .apply(&register(1, Role::AttentionWorker, "", "fp"))
            .unwrap();
        let expert = m.apply(&register(2, Role::ExpertWorker, "", "fp")).unwrap();
        let dense = |worker_id, crc32| Command::DenseDigest { worker_id, crc32 };
        assert_eq!(
            apply(&mut m, dense(expert, 5)),
            Err(Rejected::UnknownWorker(expert))
        );
        assert_eq!(apply(&mut m, dense(attention, 5)), Ok(0));
        assert_eq!(apply(&mut m, dense(attention, 6)), Ok(1));
        assert_eq!(m.view().dense_digest, Some(5));
        assert_eq!(Machine::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn nccl_ids_first_offer_stands_and_the_table_is_bounded() {
        let mut m = Machine::default();
        let offer = |group: &str, byte: u8| Command::NcclId {
            group: group.into(),
            id: vec![byte; NCCL_ID_BYTES],
        };
        apply(&mut m, offer("g", 1)).unwrap();
        apply(&mut m, offer("g", 2)).unwrap();
        assert_eq!(m.nccl_ids["g"], vec![1; NCCL_ID_BYTES]);
        for bad in [
            Command::NcclId {
                group: "g".into(),
                id: vec![1; 3],
            },
            offer("", 1),
            offer(&"x".repeat(NCCL_GROUP_NAME_MAX + 1), 1),
        ] {
            assert!(matches!(apply(&mut m, bad), Err(Rejected::Invalid(_))));
        }
        for i in 1..NCCL_GROUPS_MAX {
            apply(&mut m, offer(&format!("group {i}"), 3)).unwrap();
        }
        assert_eq!(apply(&mut m, offer("one more", 3)), Err(Rejected::Full));
        apply(&mut m, offer("g", 4)).unwrap();
        assert_eq!(Machine::decode(&m.encode()).unwrap(), m);
    }
}
