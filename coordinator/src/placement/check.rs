//! The one validity check of a placement: every expert placed, each copy on a live expert
//! worker, one copy per worker per expert, no worker over its capacity — and, for a new
//! placement, no copy on a draining worker. A `Prepare` must pass it strictly; the placement
//! in force (after a worker is lost) and the simulation's invariants allow draining workers,
//! whose copies stay until a new placement moves them.

use std::collections::BTreeMap;

use crate::state::{Member, Role};

/// Why a placement cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("a placement of {got} experts for a model of {experts}")]
    WrongSize { got: usize, experts: usize },
    #[error("expert {expert} has no worker")]
    NoCopy { expert: usize },
    #[error("expert {expert} twice on worker {worker}")]
    Twice { expert: usize, worker: u64 },
    #[error("worker {worker} is not a live, non-draining expert worker")]
    NotUsable { worker: u64 },
    #[error("worker {worker} would hold {held} experts, over its capacity")]
    OverCapacity { worker: u64, held: usize },
}

/// Whether copies on draining workers are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draining {
    /// A new placement: draining workers get nothing.
    Refused,
    /// The placement in force: a draining worker keeps its copies until they move.
    Allowed,
}

/// Checks `experts` (expert → workers) for a model of `num_experts` over `members`.
pub fn check(
    experts: &[Vec<u64>],
    num_experts: usize,
    members: &[Member],
    draining: Draining,
) -> Result<(), Invalid> {
    if experts.len() != num_experts {
        return Err(Invalid::WrongSize {
            got: experts.len(),
            experts: num_experts,
        });
    }
    let mut used: BTreeMap<u64, usize> = BTreeMap::new();
    for (expert, replicas) in experts.iter().enumerate() {
        if replicas.is_empty() {
            return Err(Invalid::NoCopy { expert });
        }
        for (i, &worker) in replicas.iter().enumerate() {
            if replicas[..i].contains(&worker) {
                return Err(Invalid::Twice { expert, worker });
            }
            let usable = members.iter().any(|m| {
                m.id == worker
                    && m.alive
                    && (draining == Draining::Allowed || !m.draining)
                    && m.role == Role::ExpertWorker
            });
            if !usable {
                return Err(Invalid::NotUsable { worker });
            }
            *used.entry(worker).or_default() += 1;
        }
    }
    for (worker, held) in used {
        let capacity = members
            .iter()
            .find(|m| m.id == worker)
            .and_then(|m| m.capacity);
        if capacity.is_some_and(|c| held > c) {
            return Err(Invalid::OverCapacity { worker, held });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, alive: bool, draining: bool, capacity: Option<usize>) -> Member {
        Member {
            id,
            role: Role::ExpertWorker,
            address: format!("w{id}"),
            pid: 0,
            alive,
            capacity,
            draining,
            holds_experts: false,
            weightless: false,
            backup: 0,
        }
    }

    #[test]
    fn placements_are_checked() {
        let mut attention = member(4, true, false, None);
        attention.role = Role::AttentionWorker;
        let members = [
            member(1, true, false, None),
            member(2, true, false, Some(1)),
            member(3, false, false, None),
            member(5, true, true, None),
            attention,
        ];
        type Case = (&'static str, Vec<Vec<u64>>, Result<(), Invalid>);
        let cases: [Case; 8] = [
            ("valid", vec![vec![1, 2], vec![1]], Ok(())),
            (
                "size",
                vec![vec![1]],
                Err(Invalid::WrongSize { got: 1, experts: 2 }),
            ),
            (
                "empty",
                vec![vec![1], vec![]],
                Err(Invalid::NoCopy { expert: 1 }),
            ),
            (
                "twice",
                vec![vec![1, 1], vec![1]],
                Err(Invalid::Twice {
                    expert: 0,
                    worker: 1,
                }),
            ),
            (
                "dead",
                vec![vec![3], vec![1]],
                Err(Invalid::NotUsable { worker: 3 }),
            ),
            (
                "draining",
                vec![vec![5], vec![1]],
                Err(Invalid::NotUsable { worker: 5 }),
            ),
            (
                "not an expert worker",
                vec![vec![4], vec![1]],
                Err(Invalid::NotUsable { worker: 4 }),
            ),
            (
                "capacity",
                vec![vec![2], vec![2]],
                Err(Invalid::OverCapacity { worker: 2, held: 2 }),
            ),
        ];
        for (name, experts, want) in cases {
            assert_eq!(
                check(&experts, 2, &members, Draining::Refused),
                want,
                "{name}"
            );
        }
        // The placement in force may still hold a draining worker's copies.
        let in_force = vec![vec![5], vec![1]];
        assert_eq!(check(&in_force, 2, &members, Draining::Allowed), Ok(()));
    }
}
