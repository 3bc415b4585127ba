//! Host-memory backups (`--expert-backup N`), a pure function: (placement, the workers'
//! backup slots, current backups) → which worker keeps each expert in memory, not served.
//!
//! 1. **Keep.** An expert's current backup stays where it is while that worker still offers
//!    a free slot and does not serve the expert itself.
//! 2. **Place.** Every expert left without a backup gets one on the worker with the most free
//!    backup slots that does not serve it (ties: the lowest id); an expert every offering
//!    worker serves has none.
//!
//! One backup per expert: enough that a failure of its primary workers finds a copy in
//! memory off them. The planner places a lost copy on a worker holding it warm first
//! ([`super::planner::PlanInput::warm`]), so re-placement loads from backups first.

use std::collections::BTreeMap;

/// `backups[e]`: the worker keeping expert e in memory (none or one). `experts[e]` are its
/// primary copies, `slots` each offering worker's backup slots, `current` the backups now.
pub fn plan_backups(
    experts: &[Vec<u64>],
    slots: &BTreeMap<u64, usize>,
    current: &[Vec<u64>],
) -> Vec<Vec<u64>> {
    let mut free = slots.clone();
    let mut out = vec![Vec::new(); experts.len()];
    // 1. Keep.
    for (e, primaries) in experts.iter().enumerate() {
        let kept = current
            .get(e)
            .into_iter()
            .flatten()
            .find(|w| !primaries.contains(w) && free.get(w).is_some_and(|&f| f > 0));
        if let Some(&w) = kept {
            out[e].push(w);
            *free.get_mut(&w).expect("a worker with slots") -= 1;
        }
    }
    // 2. Place.
    for (e, primaries) in experts.iter().enumerate() {
        if !out[e].is_empty() {
            continue;
        }
        let best = free
            .iter()
            .filter(|(w, f)| **f > 0 && !primaries.contains(w))
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(&w, _)| w);
        if let Some(w) = best {
            out[e].push(w);
            *free.get_mut(&w).expect("a worker with slots") -= 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            experts: Vec<Vec<u64>>,
            slots: Vec<(u64, usize)>,
            current: Vec<Vec<u64>>,
            want: Vec<Vec<u64>>,
        }
        let cases = [
            Case {
                name: "spread over the most free slots, never on a primary",
                experts: vec![vec![1], vec![2], vec![3], vec![1, 2]],
                slots: vec![(1, 2), (2, 2), (3, 2)],
                current: vec![],
                want: vec![vec![2], vec![1], vec![1], vec![3]],
            },
            Case {
                name: "current backups stay",
                experts: vec![vec![1], vec![2], vec![3], vec![2]],
                slots: vec![(1, 2), (2, 2), (3, 2)],
                current: vec![vec![3], vec![3], vec![2], vec![3]],
                want: vec![vec![3], vec![3], vec![2], vec![1]],
            },
            Case {
                name: "a backup on a worker that now serves the expert moves",
                experts: vec![vec![1, 2]],
                slots: vec![(2, 1), (3, 1)],
                current: vec![vec![2]],
                want: vec![vec![3]],
            },
            Case {
                name: "no slots left, or only primaries offer: none",
                experts: vec![vec![1], vec![2], vec![3]],
                slots: vec![(1, 1), (3, 0)],
                current: vec![],
                want: vec![vec![], vec![1], vec![]],
            },
        ];
        for c in cases {
            let slots: BTreeMap<u64, usize> = c.slots.into_iter().collect();
            let got = plan_backups(&c.experts, &slots, &c.current);
            assert_eq!(got, c.want, "{}", c.name);
            for (e, b) in got.iter().enumerate() {
                assert!(b.iter().all(|w| !c.experts[e].contains(w)), "{}", c.name);
            }
        }
    }
}
