//! The placement planner, a pure function: (workers and their slots, load per expert,
//! replication, redundancy budget, current placement) → new placement and the replicas it
//! adds and drops.
//!
//! 1. **Replica counts.** Every expert gets `min_replicas` copies (at most one per worker),
//!    then the `redundancy` extra slots go one by one to the expert with the highest load
//!    per copy. A replicated expert's load is split evenly over its copies.
//! 2. **Keep.** Every copy the current placement has on a worker that is still in the plan
//!    stays (up to the new count and the worker's slots): kept copies cost no bytes.
//! 3. **Place.** Missing copies, heaviest first, go to the least-loaded worker with a free
//!    slot that does not hold that expert yet (copies of one expert never share a worker),
//!    a worker that holds the expert warm (a host-memory backup) before any other.
//! 4. **Repair.** While the most loaded worker is more than `tolerance` above the mean, the
//!    single move or swap of copies that lowers it most is applied; each one moves one or two
//!    experts' bytes, so the plan stops as soon as the balance is good enough.
//!
//! No expert is ever left without a copy: the plan fails instead when the workers' slots
//! cannot hold one copy of each.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use crate::placement::{PlacementError, WorkerSlots};

/// What to plan for.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The workers that may hold experts; `capacity` is slots (expert copies) per layer.
    pub workers: &'a [WorkerSlots],
    /// Load per expert (routed tokens in a window); its length is the expert count.
    pub load: &'a [f64],
    /// Copies of every expert (capped at the number of workers).
    pub min_replicas: usize,
    /// Extra copies for the hottest experts.
    pub redundancy: usize,
    /// `current[e]`: the workers holding expert e now (may name workers no longer present).
    pub current: &'a [Vec<u64>],
    /// Repair stops once max worker load ≤ (1 + tolerance) × mean.
    pub tolerance: f64,
    /// `warm[e]`: workers that keep a backup of expert e in host memory (may be empty or
    /// shorter than the expert count): a missing copy goes to one of them first.
    pub warm: &'a [Vec<u64>],
}

/// A placement and how it differs from the current one.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// `experts[e]`: the workers holding expert e (sorted by id).
    pub experts: Vec<Vec<u64>>,
    /// (expert, worker) copies the plan adds: what must be loaded.
    pub added: Vec<(u32, u64)>,
    /// (expert, worker) copies the plan drops.
    pub removed: Vec<(u32, u64)>,
}

/// Max worker load ÷ mean worker load of `experts` under `load` (1.0 is perfect), over
/// `workers` (a worker holding nothing counts, with load 0).
pub fn balance(experts: &[Vec<u64>], load: &[f64], workers: &[u64]) -> f64 {
    let mut per: BTreeMap<u64, f64> = workers.iter().map(|&w| (w, 0.0)).collect();
    for (e, replicas) in experts.iter().enumerate() {
        if replicas.is_empty() {
            continue;
        }
        let share = load.get(e).copied().unwrap_or(0.0) / replicas.len() as f64;
        for w in replicas {
            *per.entry(*w).or_insert(0.0) += share;
        }
    }
    let total: f64 = per.values().sum();
    if per.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let mean = total / per.len() as f64;
    per.values().copied().fold(0.0, f64::max) / mean
}

fn cmp_f64(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b).unwrap_or(Ordering::Equal)
}

pub fn plan(input: PlanInput<'_>) -> Result<Plan, PlacementError> {
    let num_experts = input.load.len();
    if input.workers.is_empty() {
        return Err(PlacementError::NoWorkers);
    }
    let mut workers = input.workers.to_vec();
    workers.sort_by_key(|w| w.id);
    workers.dedup_by_key(|w| w.id);
    let slots: Vec<usize> = workers
        .iter()
        .map(|w| w.capacity.unwrap_or(num_experts).min(num_experts))
        .collect();
    let total_slots: usize = slots.iter().sum();
    if total_slots < num_experts {
        return Err(PlacementError::InsufficientCapacity {
            needed: num_experts,
            available: total_slots,
        });
    }
    let index: BTreeMap<u64, usize> = workers.iter().enumerate().map(|(i, w)| (w.id, i)).collect();
    let load: Vec<f64> = input.load.iter().map(|l| l.max(0.0)).collect();

    // 1. Replica counts.
    let mut by_load: Vec<usize> = (0..num_experts).collect();
    by_load.sort_by(|&a, &b| cmp_f64(load[b], load[a]).then(a.cmp(&b)));
    let mut count = replica_counts(&input, &load, &by_load, workers.len(), total_slots);
    let share = |e: usize, count: &[usize]| load[e] / count[e] as f64;

    // 2. Keep what the current placement has where it can.
    let mut held: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); num_experts];
    let mut used = vec![0usize; workers.len()];
    let mut worker_load = vec![0.0f64; workers.len()];
    for &e in &by_load {
        let Some(current) = input.current.get(e) else {
            continue;
        };
        for w in current {
            let Some(&i) = index.get(w) else { continue };
            if held[e].len() < count[e] && used[i] < slots[i] && held[e].insert(i) {
                used[i] += 1;
                worker_load[i] += share(e, &count);
            }
        }
    }

    // 3. Place the missing copies, heaviest first, on the least-loaded worker that can.
    let mut missing: Vec<usize> = (0..num_experts)
        .flat_map(|e| std::iter::repeat_n(e, count[e] - held[e].len()))
        .collect();
    missing.sort_by(|&a, &b| cmp_f64(share(b, &count), share(a, &count)).then(a.cmp(&b)));
    for e in missing {
        let warm = |i: usize| {
            input
                .warm
                .get(e)
                .is_some_and(|ws| ws.contains(&workers[i].id))
        };
        let target = (0..workers.len())
            .filter(|&i| used[i] < slots[i] && !held[e].contains(&i))
            .min_by(|&a, &b| {
                warm(b)
                    .cmp(&warm(a))
                    .then(cmp_f64(worker_load[a], worker_load[b]))
                    .then(a.cmp(&b))
            });
        match target {
            Some(i) => {
                held[e].insert(i);
                used[i] += 1;
                worker_load[i] += share(e, &count);
            }
            // Only extra copies can fail to fit (every expert's first copy fits: slots
            // ≥ experts); the expert keeps fewer copies.
            None => {
                count[e] = held[e].len();
            }
        }
    }
    // Counts may have dropped: recompute loads exactly.
    let recompute = |held: &[BTreeSet<usize>], count: &[usize]| {
        let mut wl = vec![0.0f64; workers.len()];
        for (e, h) in held.iter().enumerate() {
            for &i in h {
                wl[i] += load[e] / count[e] as f64;
            }
        }
        wl
    };
    let worker_load = recompute(&held, &count);

    // 4. Repair: moves and swaps off the most loaded worker.
    let mut balance = Balance {
        load: &load,
        count: &count,
        slots: &slots,
        used,
        worker_load,
    };
    balance.repair(&mut held, input.tolerance);

    let experts: Vec<Vec<u64>> = held
        .iter()
        .map(|h| h.iter().map(|&i| workers[i].id).collect())
        .collect();
    let (added, removed) = changes(&experts, input.current);
    Ok(Plan {
        experts,
        added,
        removed,
    })
}

/// Step 1: copies per expert — `min_replicas` for every expert (hottest first while slots
/// last), then the redundancy budget, one copy at a time, to the expert with the highest
/// load per copy.
fn replica_counts(
    input: &PlanInput<'_>,
    load: &[f64],
    by_load: &[usize],
    max_copies: usize,
    total_slots: usize,
) -> Vec<usize> {
    let num_experts = load.len();
    let mut count = vec![1usize; num_experts];
    let mut budget = total_slots - num_experts;
    let base = input.min_replicas.clamp(1, max_copies);
    for _ in 1..base {
        for &e in by_load {
            if budget == 0 {
                break;
            }
            count[e] += 1;
            budget -= 1;
        }
    }
    let mut extra = input.redundancy.min(budget);
    while extra > 0 {
        let hottest = (0..num_experts)
            .filter(|&e| count[e] < max_copies)
            .max_by(|&a, &b| {
                cmp_f64(load[a] / count[a] as f64, load[b] / count[b] as f64).then(b.cmp(&a))
            });
        let Some(e) = hottest else { break };
        count[e] += 1;
        extra -= 1;
    }
    count
}

/// Step 4's state: the worker loads and slots used while copies move.
struct Balance<'a> {
    load: &'a [f64],
    count: &'a [usize],
    slots: &'a [usize],
    used: Vec<usize>,
    worker_load: Vec<f64>,
}

impl Balance<'_> {
    /// Moves (or swaps) copies off the most loaded worker while that lowers the larger load
    /// of the pair, until the most loaded is within `tolerance` of the mean.
    fn repair(&mut self, held: &mut [BTreeSet<usize>], tolerance: f64) {
        let (load, count, slots) = (self.load, self.count, self.slots);
        let share = |e: usize| load[e] / count[e] as f64;
        let (used, worker_load) = (&mut self.used, &mut self.worker_load);
        let num_experts = held.len();
        let workers = worker_load.len();
        let total: f64 = worker_load.iter().sum();
        let mean = total / workers as f64;
        let goal = mean * (1.0 + tolerance.max(0.0));
        let mut on: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); workers];
        for (e, h) in held.iter().enumerate() {
            for &i in h {
                on[i].insert(e);
            }
        }
        for _ in 0..(4 * num_experts + 64) {
            let (hi, &top) = worker_load
                .iter()
                .enumerate()
                .max_by(|a, b| cmp_f64(*a.1, *b.1).then(b.0.cmp(&a.0)))
                .expect("workers exist");
            if top <= goal || mean <= 0.0 {
                break;
            }
            // (new max of the pair, expert moved off hi, worker it goes to, expert coming back)
            let mut best: Option<(f64, usize, usize, Option<usize>)> = None;
            for &e in &on[hi] {
                let we = share(e);
                for t in 0..workers {
                    if t == hi || held[e].contains(&t) {
                        continue;
                    }
                    if used[t] < slots[t] {
                        let m = (top - we).max(worker_load[t] + we);
                        if m < top - 1e-12 && best.is_none_or(|b| m < b.0) {
                            best = Some((m, e, t, None));
                        }
                    }
                    for &f in &on[t] {
                        let wf = share(f);
                        if wf >= we || held[f].contains(&hi) {
                            continue;
                        }
                        let m = (top - we + wf).max(worker_load[t] + we - wf);
                        if m < top - 1e-12 && best.is_none_or(|b| m < b.0) {
                            best = Some((m, e, t, Some(f)));
                        }
                    }
                }
            }
            let Some((_, e, t, back)) = best else { break };
            held[e].remove(&hi);
            held[e].insert(t);
            on[hi].remove(&e);
            on[t].insert(e);
            let we = share(e);
            worker_load[hi] -= we;
            worker_load[t] += we;
            match back {
                None => {
                    used[hi] -= 1;
                    used[t] += 1;
                }
                Some(f) => {
                    held[f].remove(&t);
                    held[f].insert(hi);
                    on[t].remove(&f);
                    on[hi].insert(f);
                    let wf = share(f);
                    worker_load[t] -= wf;
                    worker_load[hi] += wf;
                }
            }
        }
    }
}

/// The copies `experts` adds to and drops from `current`: (expert, worker) pairs.
#[allow(clippy::type_complexity)]
fn changes(experts: &[Vec<u64>], current: &[Vec<u64>]) -> (Vec<(u32, u64)>, Vec<(u32, u64)>) {
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for (e, now) in experts.iter().enumerate() {
        let before: BTreeSet<u64> = current
            .get(e)
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default();
        for w in now {
            if !before.contains(w) {
                added.push((e as u32, *w));
            }
        }
        for w in &before {
            if !now.contains(w) {
                removed.push((e as u32, *w));
            }
        }
    }
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: u64, capacity: Option<usize>) -> WorkerSlots {
        WorkerSlots { id, capacity }
    }

    fn zipf(n: usize, s: f64) -> Vec<f64> {
        // A fixed, non-monotone order so hot experts are not neighbours.
        (0..n)
            .map(|e| 1000.0 / (((e * 37) % n) as f64 + 1.0).powf(s))
            .collect()
    }

    fn input<'a>(
        workers: &'a [WorkerSlots],
        load: &'a [f64],
        current: &'a [Vec<u64>],
        min_replicas: usize,
        redundancy: usize,
    ) -> PlanInput<'a> {
        PlanInput {
            workers,
            load,
            min_replicas,
            redundancy,
            current,
            tolerance: 0.01,
            warm: &[],
        }
    }

    fn ids(ws: &[WorkerSlots]) -> Vec<u64> {
        ws.iter().map(|w| w.id).collect()
    }

    /// Invariants every plan keeps: every expert placed, copies on distinct workers,
    /// slots respected.
    fn check(p: &Plan, workers: &[WorkerSlots]) {
        let mut used: BTreeMap<u64, usize> = BTreeMap::new();
        for (e, r) in p.experts.iter().enumerate() {
            assert!(!r.is_empty(), "expert {e} has no copy");
            let distinct: BTreeSet<_> = r.iter().collect();
            assert_eq!(
                distinct.len(),
                r.len(),
                "expert {e}: two copies on one worker"
            );
            for w in r {
                *used.entry(*w).or_default() += 1;
            }
        }
        for wk in workers {
            if let Some(c) = wk.capacity {
                assert!(
                    used.get(&wk.id).copied().unwrap_or(0) <= c,
                    "worker {} over",
                    wk.id
                );
            }
        }
    }

    #[test]
    fn table() {
        let uniform = vec![1.0; 16];
        let skewed = zipf(16, 1.2);
        struct Case {
            name: &'static str,
            workers: Vec<WorkerSlots>,
            load: Vec<f64>,
            min_replicas: usize,
            redundancy: usize,
            max_balance: f64,
            copies: usize,
        }
        let cases = [
            Case {
                name: "uniform, 4 workers",
                workers: (1..=4).map(|i| w(i, Some(4))).collect(),
                load: uniform.clone(),
                min_replicas: 1,
                redundancy: 0,
                max_balance: 1.0 + 1e-9,
                copies: 16,
            },
            Case {
                name: "skewed without redundancy is bounded by the hottest expert",
                workers: (1..=4).map(|i| w(i, Some(4))).collect(),
                load: skewed.clone(),
                min_replicas: 1,
                redundancy: 0,
                max_balance: 2.2,
                copies: 16,
            },
            Case {
                name: "skewed with 8 redundant slots",
                workers: (1..=4).map(|i| w(i, Some(6))).collect(),
                load: skewed.clone(),
                min_replicas: 1,
                redundancy: 8,
                max_balance: 1.1,
                copies: 24,
            },
            Case {
                name: "two copies of everything",
                workers: (1..=4).map(|i| w(i, Some(8))).collect(),
                load: uniform.clone(),
                min_replicas: 2,
                redundancy: 0,
                max_balance: 1.0 + 1e-9,
                copies: 32,
            },
            Case {
                name: "a worker without slots",
                workers: vec![w(1, Some(0)), w(2, None)],
                load: skewed.clone(),
                min_replicas: 1,
                redundancy: 0,
                max_balance: 2.0 + 1e-9,
                copies: 16,
            },
        ];
        for c in &cases {
            let p = plan(input(
                &c.workers,
                &c.load,
                &[],
                c.min_replicas,
                c.redundancy,
            ))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            check(&p, &c.workers);
            let b = balance(&p.experts, &c.load, &ids(&c.workers));
            assert!(b <= c.max_balance, "{}: balance {b}", c.name);
            let copies: usize = p.experts.iter().map(Vec::len).sum();
            assert_eq!(copies, c.copies, "{}", c.name);
        }
        let errors = [
            (vec![], PlacementError::NoWorkers),
            (
                vec![w(1, Some(5)), w(2, Some(5))],
                PlacementError::InsufficientCapacity {
                    needed: 16,
                    available: 10,
                },
            ),
        ];
        for (workers, expect) in errors {
            assert_eq!(plan(input(&workers, &uniform, &[], 1, 0)), Err(expect));
        }
    }

    #[test]
    fn an_unchanged_cluster_moves_nothing() {
        let workers: Vec<_> = (1..=8).map(|i| w(i, Some(20))).collect();
        let load = zipf(128, 1.0);
        let first = plan(input(&workers, &load, &[], 1, 32)).unwrap();
        let again = plan(input(&workers, &load, &first.experts, 1, 32)).unwrap();
        assert!(again.added.is_empty() && again.removed.is_empty());
        assert_eq!(again.experts, first.experts);
    }

    #[test]
    fn a_new_worker_takes_a_share_and_little_moves() {
        let load = zipf(128, 1.0);
        let four: Vec<_> = (1..=4).map(|i| w(i, Some(34))).collect();
        let before = plan(input(&four, &load, &[], 1, 8)).unwrap();
        let five: Vec<_> = (1..=5).map(|i| w(i, Some(34))).collect();
        let after = plan(input(&five, &load, &before.experts, 1, 8)).unwrap();
        check(&after, &five);
        let on_new = after.experts.iter().filter(|r| r.contains(&5)).count();
        assert!(on_new > 0, "the new worker got nothing");
        // Everything added went to the new worker or was one of few swaps.
        assert!(
            after.added.len() <= 40,
            "{} copies moved",
            after.added.len()
        );
        let b = balance(&after.experts, &load, &ids(&five));
        assert!(b < 1.05, "balance {b}");
    }

    #[test]
    fn a_lost_copy_goes_to_the_worker_that_keeps_it_warm() {
        // Four experts, one copy each on workers 1..=4, loads equal. Worker 4 dies: its
        // expert 3 would go to the least-loaded survivor (1, by id); worker 3 keeps a backup
        // of it, so it goes there, though 3 is no less loaded.
        let load = vec![1.0; 4];
        let current = vec![vec![1], vec![2], vec![3], vec![4]];
        let three: Vec<_> = (1..=3).map(|i| w(i, None)).collect();
        let mut cold = input(&three, &load, &current, 1, 0);
        cold.tolerance = 1.0;
        assert_eq!(plan(cold).unwrap().experts[3], vec![1]);
        let warm = vec![vec![], vec![], vec![], vec![3]];
        let with_backup = PlanInput {
            warm: &warm,
            ..cold
        };
        let p = plan(with_backup).unwrap();
        check(&p, &three);
        assert_eq!(p.experts[3], vec![3]);
        assert_eq!(p.added, vec![(3, 3)]);
    }

    #[test]
    fn a_lost_worker_leaves_no_expert_orphaned() {
        let load = zipf(64, 1.0);
        let three: Vec<_> = (1..=3).map(|i| w(i, None)).collect();
        let before = plan(input(&three, &load, &[], 2, 0)).unwrap();
        assert!(before.experts.iter().all(|r| r.len() == 2));
        let two = [w(1, None), w(3, None)];
        let after = plan(input(&two, &load, &before.experts, 2, 0)).unwrap();
        check(&after, &two);
        assert!(after.experts.iter().all(|r| !r.contains(&2)));
        // Copies on the survivors stay where they were.
        for (e, r) in before.experts.iter().enumerate() {
            for w in r.iter().filter(|w| **w != 2) {
                assert!(after.experts[e].contains(w), "expert {e} moved off {w}");
            }
        }
    }

    #[test]
    fn hot_experts_get_the_redundant_copies() {
        let mut load = vec![1.0; 32];
        load[7] = 40.0;
        let workers: Vec<_> = (1..=8).map(|i| w(i, Some(5))).collect();
        let p = plan(input(&workers, &load, &[], 1, 8)).unwrap();
        assert_eq!(p.experts[7].len(), 8, "{:?}", p.experts[7]);
    }
}
