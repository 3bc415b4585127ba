//! The routing policy of an attention worker, as plain functions over plain data (no clock,
//! no socket): [`plan`] splits one MoE layer's routed batch into one piece per expert worker
//! under a placement, and [`next_step`] decides what a failed send leads to. `remote.rs`
//! carries the decisions out over the `Dispatch` seam.
//!
//! Replica choice: for each expert group in order, among the expert's copies on workers not
//! under suspicion, the one with the fewest rows in flight counting what this batch already
//! gives it (ties to the lowest worker id). An expert whose every copy is suspected has no
//! copy: the batch waits for a newer placement.
//!
//! After a failure:
//!
//! | answer | next |
//! |---|---|
//! | `WrongEpoch { current }`, worker ahead | resend under epoch ≥ current at once |
//! | `WrongEpoch`, worker behind | resend under this epoch after a pause (it catches up) |
//! | `WrongEpoch` more than `epoch_retries` times | fail: the placement keeps changing |
//! | `ExpertNotHere` | resend after a pause (the worker follows a newer placement) |
//! | `Unavailable` | avoid the worker; resend now to the other copies |
//! | no reachable copy | wait for a placement newer than this one |
//! | anything else (`Overloaded`, `DeadlineExceeded`, bad shapes) | fail, keeping its kind |

use std::collections::{BTreeMap, HashMap, HashSet};

use expertmesh_dispatch::DispatchError;
use expertmesh_model::moe::ExpertGroup;
use expertmesh_model::ExpertsFailure;

/// One worker's share of a routed batch: its groups and where their rows sit in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub worker: u64,
    pub groups: Vec<ExpertGroup>,
    /// (first row in the batch, rows) per group.
    pub spans: Vec<(usize, usize)>,
}

impl Piece {
    pub fn rows(&self) -> u64 {
        self.spans.iter().map(|s| s.1 as u64).sum()
    }
}

/// What the router knows of the workers when it plans.
#[derive(Debug, Clone, Copy)]
pub struct Workers<'a> {
    /// Workers avoided after failing to answer.
    pub suspects: &'a HashSet<u64>,
    /// Rows in flight per worker (other batches').
    pub in_flight: &'a HashMap<u64, u64>,
}

/// Splits `groups` (consecutive rows, in order) over the workers holding each expert
/// (`replicas[e]`, in preference order). `Err(expert)` when an expert has no copy on a
/// worker that is not suspected.
pub fn plan(
    groups: &[ExpertGroup],
    replicas: &[Vec<u64>],
    workers: Workers<'_>,
) -> Result<Vec<Piece>, u32> {
    let mut pieces: BTreeMap<u64, Piece> = BTreeMap::new();
    let mut row = 0;
    for g in groups {
        let copies = replicas
            .get(g.expert as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let worker = copies
            .iter()
            .copied()
            .filter(|w| !workers.suspects.contains(w))
            .min_by_key(|w| {
                let busy = workers.in_flight.get(w).copied().unwrap_or(0);
                let here = pieces.get(w).map_or(0, Piece::rows);
                (busy + here, *w)
            })
            .ok_or(g.expert)?;
        let p = pieces.entry(worker).or_insert_with(|| Piece {
            worker,
            groups: Vec::new(),
            spans: Vec::new(),
        });
        p.groups.push(*g);
        p.spans.push((row, g.rows as usize));
        row += g.rows as usize;
    }
    Ok(pieces.into_values().collect())
}

/// Why sending one routed batch under one placement failed.
#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// A worker's answer (or the transport's view of it).
    Worker(u64, DispatchError),
    /// Every copy of this expert is on a worker that cannot be reached.
    NoCopy(u32),
}

/// What to do after a failed send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send again under a placement of epoch ≥ `min_epoch`, after a short pause if `pause`.
    Resend { min_epoch: u64, pause: bool },
    /// Avoid `worker` for a while and send again at once (to the other copies).
    Avoid { worker: u64 },
    /// Give up on the batch, with the kind the error keeps.
    Fail(ExpertsFailure, String),
}

/// The retry state of one routed batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempts {
    pub epoch_retries: usize,
}

/// The decision after `error` under a placement of `epoch` (see the module's table).
pub fn next_step(
    error: &SendError,
    epoch: u64,
    attempts: &mut Attempts,
    epoch_retries_max: usize,
) -> Next {
    match error {
        SendError::Worker(_, DispatchError::WrongEpoch { current }) => {
            attempts.epoch_retries += 1;
            if attempts.epoch_retries > epoch_retries_max {
                Next::Fail(
                    ExpertsFailure::PlacementChanging,
                    format!("placement kept changing ({epoch_retries_max} retries)"),
                )
            } else if *current > epoch {
                Next::Resend {
                    min_epoch: *current,
                    pause: false,
                }
            } else {
                Next::Resend {
                    min_epoch: epoch,
                    pause: true,
                }
            }
        }
        SendError::Worker(_, DispatchError::ExpertNotHere { .. }) => Next::Resend {
            min_epoch: epoch,
            pause: true,
        },
        SendError::Worker(worker, DispatchError::Unavailable(_)) => Next::Avoid { worker: *worker },
        SendError::NoCopy(_) => Next::Resend {
            min_epoch: epoch + 1,
            pause: false,
        },
        SendError::Worker(worker, e) => {
            let kind = match e {
                DispatchError::DeadlineExceeded => ExpertsFailure::DeadlineExceeded,
                DispatchError::Overloaded { .. } => ExpertsFailure::Overloaded,
                _ => ExpertsFailure::Rejected,
            };
            Next::Fail(kind, format!("expert worker {worker}: {e}"))
        }
    }
}

/// Of several pieces' failures, the one to act on: a non-epoch error first (it will not go
/// away by retrying), else the first.
pub fn worst(errors: Vec<SendError>) -> Option<SendError> {
    let mut chosen: Option<SendError> = None;
    for e in errors {
        let epoch = matches!(e, SendError::Worker(_, DispatchError::WrongEpoch { .. }));
        if chosen.is_none() || !epoch {
            chosen = Some(e);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(g: &[(u32, u32)]) -> Vec<ExpertGroup> {
        g.iter()
            .map(|&(expert, rows)| ExpertGroup { expert, rows })
            .collect()
    }

    #[test]
    fn plans_pick_the_least_busy_unsuspected_copy() {
        // expert → copies
        let replicas = vec![vec![1], vec![1, 2], vec![2, 3], vec![3], vec![]];
        let none = HashSet::new();
        let idle = HashMap::new();
        let busy2: HashMap<u64, u64> = [(2, 10)].into();
        let suspect3: HashSet<u64> = [3].into();
        let suspect1: HashSet<u64> = [1].into();
        type Want = Result<Vec<(u64, Vec<(usize, usize)>)>, u32>;
        type Case<'a> = (
            &'a str,
            Vec<(u32, u32)>,
            &'a HashSet<u64>,
            &'a HashMap<u64, u64>,
            Want,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "one copy each",
                vec![(0, 2), (3, 1)],
                &none,
                &idle,
                Ok(vec![(1, vec![(0, 2)]), (3, vec![(2, 1)])]),
            ),
            (
                "rows already planned count: expert 1 goes to worker 2",
                vec![(0, 4), (1, 1)],
                &none,
                &idle,
                Ok(vec![(1, vec![(0, 4)]), (2, vec![(4, 1)])]),
            ),
            (
                "ties go to the lowest id",
                vec![(1, 3)],
                &none,
                &idle,
                Ok(vec![(1, vec![(0, 3)])]),
            ),
            (
                "rows in flight elsewhere count",
                vec![(2, 1)],
                &none,
                &busy2,
                Ok(vec![(3, vec![(0, 1)])]),
            ),
            (
                "a suspect is avoided",
                vec![(2, 1)],
                &suspect3,
                &busy2,
                Ok(vec![(2, vec![(0, 1)])]),
            ),
            (
                "every copy suspected",
                vec![(1, 1), (0, 1)],
                &suspect1,
                &idle,
                Err(0),
            ),
            ("no copy at all", vec![(4, 1)], &none, &idle, Err(4)),
            ("beyond the placement", vec![(9, 1)], &none, &idle, Err(9)),
        ];
        for (name, g, suspects, in_flight, want) in cases {
            let got = plan(
                &groups(&g),
                &replicas,
                Workers {
                    suspects,
                    in_flight,
                },
            )
            .map(|pieces| {
                pieces
                    .into_iter()
                    .map(|p| (p.worker, p.spans))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn failures_lead_where_the_table_says() {
        let worker = |e: DispatchError| SendError::Worker(4, e);
        let resend = |min_epoch, pause| Next::Resend { min_epoch, pause };
        let cases = [
            (
                "worker ahead",
                worker(DispatchError::WrongEpoch { current: 9 }),
                0,
                resend(9, false),
            ),
            (
                "worker behind",
                worker(DispatchError::WrongEpoch { current: 3 }),
                0,
                resend(5, true),
            ),
            (
                "too many epoch retries",
                worker(DispatchError::WrongEpoch { current: 9 }),
                2,
                Next::Fail(
                    ExpertsFailure::PlacementChanging,
                    "placement kept changing (2 retries)".into(),
                ),
            ),
            (
                "expert moved",
                worker(DispatchError::ExpertNotHere {
                    layer: 1,
                    expert: 2,
                }),
                0,
                resend(5, true),
            ),
            (
                "worker shutting down",
                worker(DispatchError::Unavailable("bye".into())),
                0,
                Next::Avoid { worker: 4 },
            ),
            ("no copy", SendError::NoCopy(7), 0, resend(6, false)),
            (
                "deadline",
                worker(DispatchError::DeadlineExceeded),
                0,
                Next::Fail(
                    ExpertsFailure::DeadlineExceeded,
                    "expert worker 4: deadline exceeded".into(),
                ),
            ),
            (
                "overloaded",
                worker(DispatchError::Overloaded { queued: 3 }),
                0,
                Next::Fail(
                    ExpertsFailure::Overloaded,
                    "expert worker 4: worker overloaded (3 batches queued)".into(),
                ),
            ),
        ];
        for (name, error, retries_before, want) in cases {
            let mut attempts = Attempts {
                epoch_retries: retries_before,
            };
            assert_eq!(next_step(&error, 5, &mut attempts, 2), want, "{name}");
        }
    }

    #[test]
    fn the_worst_failure_is_the_one_retrying_will_not_fix() {
        let epoch = SendError::Worker(1, DispatchError::WrongEpoch { current: 2 });
        let down = SendError::Worker(2, DispatchError::Unavailable("x".into()));
        assert_eq!(worst(vec![]), None);
        assert_eq!(worst(vec![epoch.clone()]), Some(epoch.clone()));
        assert_eq!(worst(vec![epoch.clone(), down.clone()]), Some(down.clone()));
        assert_eq!(worst(vec![down.clone(), epoch]), Some(down));
    }
}
