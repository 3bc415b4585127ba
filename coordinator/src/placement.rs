//! Expert placement as a pure function: which expert worker holds each expert.
//!
//! Every expert is placed on exactly one worker (replication comes later), workers with a
//! capacity limit never exceed it, and experts are spread as evenly as the capacities
//! allow: each expert goes to the worker holding the fewest so far (lowest id on ties),
//! which on equal workers is a round robin.

/// An expert worker as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSlots {
    pub id: u64,
    /// Experts per MoE layer this worker can hold; `None` means no limit.
    pub capacity: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no expert worker has registered")]
    NoWorkers,
    #[error("the expert workers hold {available} experts per layer; the model has {needed}")]
    InsufficientCapacity { needed: usize, available: usize },
}

/// `result[e]` lists the workers holding expert `e` (one, for now).
pub fn assign(
    num_experts: usize,
    workers: &[WorkerSlots],
) -> Result<Vec<Vec<u64>>, PlacementError> {
    if workers.is_empty() {
        return Err(PlacementError::NoWorkers);
    }
    let available = workers
        .iter()
        .map(|w| w.capacity.unwrap_or(num_experts))
        .fold(0usize, usize::saturating_add);
    if available < num_experts {
        return Err(PlacementError::InsufficientCapacity {
            needed: num_experts,
            available,
        });
    }
    let mut sorted = workers.to_vec();
    sorted.sort_by_key(|w| w.id);
    let mut held = vec![0usize; sorted.len()];
    let mut placement = Vec::with_capacity(num_experts);
    for _ in 0..num_experts {
        let (i, _) = sorted
            .iter()
            .enumerate()
            .filter(|(i, w)| w.capacity.is_none_or(|c| held[*i] < c))
            .min_by_key(|(i, _)| held[*i])
            .expect("capacity was checked above");
        held[i] += 1;
        placement.push(vec![sorted[i].id]);
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: u64, capacity: Option<usize>) -> WorkerSlots {
        WorkerSlots { id, capacity }
    }

    fn counts(p: &[Vec<u64>], id: u64) -> usize {
        p.iter().filter(|r| r.contains(&id)).count()
    }

    #[test]
    fn table() {
        struct Case {
            experts: usize,
            workers: Vec<WorkerSlots>,
            expect: Result<Vec<(u64, usize)>, PlacementError>,
        }
        let cases = [
            Case {
                experts: 128,
                workers: vec![w(1, None)],
                expect: Ok(vec![(1, 128)]),
            },
            Case {
                experts: 128,
                workers: vec![w(2, None), w(1, None)],
                expect: Ok(vec![(1, 64), (2, 64)]),
            },
            Case {
                experts: 16,
                workers: vec![w(1, None), w(2, None), w(3, None)],
                expect: Ok(vec![(1, 6), (2, 5), (3, 5)]),
            },
            Case {
                experts: 16,
                workers: vec![w(1, Some(0)), w(2, None)],
                expect: Ok(vec![(1, 0), (2, 16)]),
            },
            Case {
                experts: 16,
                workers: vec![w(1, Some(2)), w(2, None), w(3, None)],
                expect: Ok(vec![(1, 2), (2, 7), (3, 7)]),
            },
            Case {
                experts: 16,
                workers: vec![],
                expect: Err(PlacementError::NoWorkers),
            },
            Case {
                experts: 16,
                workers: vec![w(1, Some(5)), w(2, Some(5))],
                expect: Err(PlacementError::InsufficientCapacity {
                    needed: 16,
                    available: 10,
                }),
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            match (&c.expect, assign(c.experts, &c.workers)) {
                (Ok(expected), Ok(p)) => {
                    assert_eq!(p.len(), c.experts, "case {i}");
                    assert!(p.iter().all(|r| r.len() == 1), "case {i}");
                    for &(id, n) in expected {
                        assert_eq!(counts(&p, id), n, "case {i}, worker {id}");
                    }
                }
                (Err(e), Err(got)) => assert_eq!(e, &got, "case {i}"),
                (e, got) => panic!("case {i}: expected {e:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn same_inputs_same_placement() {
        let workers = [w(3, None), w(1, Some(10)), w(2, None)];
        assert_eq!(assign(128, &workers), assign(128, &workers));
    }
}
