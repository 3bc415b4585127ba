//! The leader's placement controller and failure detector, sans I/O (openraft's engine is
//! the model): each takes the time, the replicated state and what the leader has heard, and
//! returns the command to propose. `node.rs` proposes it; `tests/sim.rs` drives the same
//! controller through a simulated raft group.
//!
//! Placement, every `PLACEMENT_CHECK` and as soon as a member joins, dies or drains:
//! 1. While a proposal of ours is unapplied (for up to 5 s), wait.
//! 2. A pending placement commits (`Commit`) once every live expert worker that gains
//!    experts in it has reported loading it (looked at on every step, between checks too: a
//!    joining worker or a failover waits for it); one that keeps heartbeating without loading for
//!    `PREPARE_LEASES` leases is left out of plans for `EXCLUDE_FOR` and a re-plan replaces
//!    the pending placement.
//! 3. Otherwise a re-plan (`Prepare` of the next epoch, from [`planner::plan`]) happens when
//!    asked, when a worker drains, when a worker holds no expert, when an expert has fewer
//!    copies than `min_replicas` allows, or (at most every `AUTO_REPLAN_EVERY`) when the
//!    measured load is out of balance by more than `rebalance_percent`. A plan that moves
//!    nothing proposes nothing.
//!
//! Failure detection: a live member silent for one lease is marked dead (`MarkDead`); a new
//! leader first waits one lease, so it judges nobody on heartbeats it had no chance to see.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::machine::{Command, Machine};
use crate::placement::{planner, WorkerSlots};

/// How often the leader looks at the placement.
pub const PLACEMENT_CHECK: Duration = Duration::from_millis(500);
/// Automatic re-plans (for imbalance) at most this often.
pub const AUTO_REPLAN_EVERY: Duration = Duration::from_secs(30);
/// How long a prepared placement waits for its workers to load their experts, in leases.
pub const PREPARE_LEASES: u32 = 12;
/// How long a worker that did not load in time is left out of plans.
pub const EXCLUDE_FOR: Duration = Duration::from_secs(300);
/// How long an unapplied proposal of ours holds the controller back.
const PROPOSAL_PATIENCE: Duration = Duration::from_secs(5);

/// The live expert workers that gain experts in the pending placement and have not reported
/// loading it (none when nothing is pending).
fn waiting_for(machine: &Machine, prepared: &HashMap<u64, u64>) -> Vec<u64> {
    let Some(p) = machine.pending.as_ref() else {
        return Vec::new();
    };
    let gains = |id: u64| {
        let before = machine.placement.experts_of(id);
        p.experts_of(id).iter().any(|e| !before.contains(e))
    };
    let loaded = |id: u64| prepared.get(&id).is_some_and(|&e| e >= p.epoch);
    machine
        .members
        .iter()
        .filter(|m| m.alive && m.role == crate::state::Role::ExpertWorker)
        .filter(|m| gains(m.id) && !loaded(m.id))
        .map(|m| m.id)
        .collect()
}

/// A member as placement sees it: id, alive, draining.
type Roster = (u64, bool, bool);

fn roster(machine: &Machine) -> Vec<Roster> {
    machine
        .members
        .iter()
        .map(|m| (m.id, m.alive, m.draining))
        .collect()
}

/// What step 2 found about the pending placement.
enum Pending {
    /// Every worker that gains experts has loaded them: commit this epoch.
    Commit(u64),
    Wait,
    Replan,
}

/// What the leader has heard from workers, beside the replicated state.
#[derive(Debug, Clone, Copy)]
pub struct Reports<'a> {
    /// The newest epoch each worker has loaded the experts of.
    pub prepared: &'a HashMap<u64, u64>,
    /// Measured routed tokens per expert over the load window (all zero: nothing measured).
    pub load: &'a [f64],
}

/// The placement controller's memory between checks.
#[derive(Debug, Clone)]
pub struct Controller {
    checked: Option<Instant>,
    /// The members as the last check saw them: a worker that joins, dies or drains makes the
    /// next step a check, without waiting out `PLACEMENT_CHECK`.
    roster: Vec<Roster>,
    /// When the last plan was proposed.
    last_plan: Option<Instant>,
    /// An operator asked for a re-plan.
    rebalance: bool,
    /// Our proposal not yet applied: (epoch, when).
    proposed: Option<(u64, Instant)>,
    /// Since when the pending placement (by epoch) has waited for workers to load.
    pending_since: Option<(u64, Instant)>,
    /// Workers left out of plans until the instant given.
    excluded: HashMap<u64, Instant>,
    /// This coordinator's id, for its log lines.
    id: u64,
}

impl Controller {
    pub fn new(id: u64) -> Self {
        Self {
            checked: None,
            roster: Vec::new(),
            last_plan: None,
            rebalance: false,
            proposed: None,
            pending_since: None,
            excluded: HashMap::new(),
            id,
        }
    }

    /// An operator asked for a re-plan.
    pub fn request_rebalance(&mut self) {
        self.rebalance = true;
    }

    /// Entries were applied: our proposal (if any) is in, or was overtaken.
    pub fn applied(&mut self) {
        self.proposed = None;
    }

    /// The command `step` returned could not be proposed (no longer leader).
    pub fn not_proposed(&mut self) {
        self.proposed = None;
    }

    /// The command to propose now, if any (see the module doc).
    pub fn step(
        &mut self,
        now: Instant,
        machine: &Machine,
        reports: Reports<'_>,
    ) -> Option<Command> {
        let roster = roster(machine);
        if roster == self.roster
            && self
                .checked
                .is_some_and(|t| now.duration_since(t) < PLACEMENT_CHECK)
        {
            // Between checks, only a pending placement that every worker gaining experts in
            // it has loaded: it commits at once (a join or a failover waits for it, and
            // knowing is a lookup per worker).
            if self.proposed.is_some() || !waiting_for(machine, reports.prepared).is_empty() {
                return None;
            }
            let epoch = machine.pending.as_ref()?.epoch;
            self.proposed = Some((epoch, now));
            return Some(Command::Commit { epoch });
        }
        self.checked = Some(now);
        self.roster = roster;
        if let Some((_, at)) = self.proposed {
            if now.duration_since(at) < PROPOSAL_PATIENCE {
                return None;
            }
            self.proposed = None;
        }
        if machine.pending.is_some() {
            match self.pending(now, machine, reports.prepared) {
                Pending::Commit(epoch) => {
                    self.proposed = Some((epoch, now));
                    return Some(Command::Commit { epoch });
                }
                Pending::Wait => return None,
                Pending::Replan => {}
            }
        }
        if machine.unservable.is_some() || !machine.initialized {
            return None;
        }
        let command = self.replan(now, machine, reports.load)?;
        if let Command::Prepare { epoch, .. } = &command {
            self.proposed = Some((*epoch, now));
        }
        Some(command)
    }

    /// Step 2: commit the pending placement when its workers are ready; otherwise wait, or
    /// once it has waited too long, leave out the workers that did not load and re-plan.
    fn pending(
        &mut self,
        now: Instant,
        machine: &Machine,
        prepared: &HashMap<u64, u64>,
    ) -> Pending {
        let Some(p) = machine.pending.as_ref() else {
            return Pending::Replan;
        };
        let waiting = waiting_for(machine, prepared);
        if waiting.is_empty() {
            return Pending::Commit(p.epoch);
        }
        let since = match self.pending_since {
            Some((epoch, t)) if epoch == p.epoch => t,
            _ => {
                self.pending_since = Some((p.epoch, now));
                now
            }
        };
        let timeout = Duration::from_millis(machine.settings.lease_ms) * PREPARE_LEASES;
        if now.duration_since(since) < timeout {
            return Pending::Wait;
        }
        // Workers that keep heartbeating without loading their experts: plan without them
        // for a while (the new plan replaces the pending one).
        for id in waiting {
            tracing::warn!(
                "coordinator {}: worker {id} did not load its experts for epoch {} in {:.1} s; planning without it",
                self.id,
                p.epoch,
                timeout.as_secs_f64()
            );
            self.excluded.insert(id, now + EXCLUDE_FOR);
        }
        self.pending_since = None;
        self.rebalance = true;
        Pending::Replan
    }

    /// Why a re-plan over `workers` is due now, if it is.
    fn reason(
        &self,
        now: Instant,
        machine: &Machine,
        load: &[f64],
        workers: &[WorkerSlots],
    ) -> Option<&'static str> {
        let holds = |id: u64| !machine.placement.experts_of(id).is_empty();
        let min_copies = machine.settings.min_replicas.min(workers.len()).max(1);
        let measured = load.iter().sum::<f64>() > 0.0;
        let ids: Vec<u64> = workers.iter().map(|w| w.id).collect();
        if self.rebalance {
            Some("requested")
        } else if machine
            .members
            .iter()
            .any(|m| m.draining && m.alive && holds(m.id))
        {
            Some("a worker is draining")
        } else if workers
            .iter()
            .any(|w| w.capacity != Some(0) && !holds(w.id))
        {
            Some("a worker holds no expert")
        } else if machine
            .placement
            .experts
            .iter()
            .any(|r| r.len() < min_copies)
        {
            Some("experts lack copies")
        } else if machine.settings.rebalance_percent > 0
            && measured
            && self
                .last_plan
                .is_none_or(|t| now.duration_since(t) >= AUTO_REPLAN_EVERY)
            && planner::balance(&machine.placement.experts, load, &ids)
                > 1.0 + f64::from(machine.settings.rebalance_percent) / 100.0
        {
            Some("load is out of balance")
        } else {
            None
        }
    }

    /// Step 3: the next epoch's `Prepare`, when a re-plan is due and moves something.
    fn replan(&mut self, now: Instant, machine: &Machine, load: &[f64]) -> Option<Command> {
        self.excluded.retain(|_, until| *until > now);
        let mut workers = machine.plannable_workers();
        if workers.iter().any(|w| !self.excluded.contains_key(&w.id)) {
            workers.retain(|w| !self.excluded.contains_key(&w.id));
        }
        let reason = self.reason(now, machine, load, &workers)?;
        self.rebalance = false;
        self.last_plan = Some(now);
        let uniform;
        let load = if load.iter().sum::<f64>() > 0.0 {
            load
        } else {
            uniform = vec![1.0; machine.num_experts];
            &uniform
        };
        let planned = planner::plan(planner::PlanInput {
            workers: &workers,
            load,
            min_replicas: machine.settings.min_replicas,
            redundancy: machine.settings.redundancy,
            current: &machine.placement.experts,
            tolerance: 0.02,
            warm: &machine.backups,
        });
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("coordinator {}: cannot re-plan ({reason}): {e}", self.id);
                return None;
            }
        };
        // Nothing to move: done, unless a pending placement must be replaced (by the current
        // one, which commits at once).
        if plan.added.is_empty() && plan.removed.is_empty() && machine.pending.is_none() {
            return None;
        }
        let epoch = machine.placement.epoch + 1;
        tracing::info!(
            "coordinator {}: re-planning ({reason}): epoch {epoch} adds {} and drops {} expert copies",
            self.id,
            plan.added.len(),
            plan.removed.len()
        );
        Some(Command::Prepare {
            epoch,
            experts: plan.experts,
        })
    }
}

/// The failure detector: the live members (not already being marked) silent for one
/// `lease` by `now`, counting a heartbeat from before `leader_since` as heard at
/// `leader_since`; nobody before the leader has led for one lease.
pub fn silent_members(
    now: Instant,
    leader_since: Instant,
    machine: &Machine,
    heard: &HashMap<u64, Instant>,
    marking: &HashSet<u64>,
) -> Vec<u64> {
    let lease = Duration::from_millis(machine.settings.lease_ms);
    if now.duration_since(leader_since) < lease {
        return Vec::new();
    }
    machine
        .members
        .iter()
        .filter(|m| m.alive && !marking.contains(&m.id))
        .filter(|m| {
            heard
                .get(&m.id)
                .is_none_or(|t| now.duration_since((*t).max(leader_since)) >= lease)
        })
        .map(|m| m.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::machine::{Envelope, Settings};
    use crate::state::Role;

    /// A machine with `workers` expert workers (ids 1..), 4 experts, 2 copies wanted.
    fn machine(workers: u64) -> Machine {
        let mut m = Machine::default();
        let apply = |m: &mut Machine, c: Command| m.apply(&Envelope::encode(c)).unwrap();
        apply(
            &mut m,
            Command::Init {
                model_fingerprint: "fp".into(),
                num_experts: 4,
                settings: Settings {
                    lease_ms: 1000,
                    min_replicas: 2,
                    ..Settings::default()
                },
                coordinators: BTreeMap::new(),
            },
        );
        for request_id in 1..=workers {
            register(&mut m, request_id);
        }
        m
    }

    /// An expert worker registers (id `request_id` when registrations come in order).
    fn register(m: &mut Machine, request_id: u64) {
        apply(
            m,
            Command::Register {
                request_id,
                role: Role::ExpertWorker,
                address: format!("w{request_id}"),
                capacity: None,
                pid: 1,
                model_fingerprint: "fp".into(),
                join_token: String::new(),
                holds_experts: false,
                weightless: false,
                backup: 0,
            },
        );
    }

    fn apply(m: &mut Machine, c: Command) {
        m.apply(&Envelope::encode(c)).unwrap();
    }

    fn kind(c: &Option<Command>) -> &'static str {
        match c {
            None => "nothing",
            Some(Command::Prepare { .. }) => "prepare",
            Some(Command::Commit { .. }) => "commit",
            Some(_) => "other",
        }
    }

    #[test]
    fn the_controller_prepares_commits_and_waits() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let none = HashMap::new();
        let zeros = vec![0.0; 4];
        let reports = |prepared| Reports {
            prepared,
            load: &zeros,
        };
        // Two workers, one copy each so far: experts lack copies → prepare epoch 2.
        let mut m = machine(2);
        let mut c = Controller::new(1);
        let prepare = c.step(at(0), &m, reports(&none));
        let Some(Command::Prepare { epoch, experts }) = prepare.clone() else {
            panic!("{prepare:?}");
        };
        assert_eq!(epoch, m.placement.epoch + 1);
        assert!(experts.iter().all(|r| r.len() == 2));
        // Within the check interval, and while the proposal is unapplied: nothing.
        assert_eq!(kind(&c.step(at(100), &m, reports(&none))), "nothing");
        assert_eq!(kind(&c.step(at(600), &m, reports(&none))), "nothing");
        apply(&mut m, prepare.unwrap());
        c.applied();
        // Pending, nobody loaded: wait; one of two loaded: wait; both: commit.
        assert_eq!(kind(&c.step(at(1200), &m, reports(&none))), "nothing");
        let one: HashMap<u64, u64> = [(1, epoch)].into();
        assert_eq!(kind(&c.step(at(1800), &m, reports(&one))), "nothing");
        // Between checks nothing but a commit is looked at: with one of two loaded,
        // nothing; once both have, the commit at once, proposed once.
        assert_eq!(kind(&c.step(at(1850), &m, reports(&one))), "nothing");
        let both: HashMap<u64, u64> = [(1, epoch), (2, epoch)].into();
        let commit = c.step(at(1900), &m, reports(&both));
        assert_eq!(commit, Some(Command::Commit { epoch }));
        assert_eq!(kind(&c.step(at(1950), &m, reports(&both))), "nothing");
        apply(&mut m, commit.unwrap());
        c.applied();
        // Balanced and complete: nothing more.
        assert_eq!(kind(&c.step(at(3000), &m, reports(&both))), "nothing");
        // An operator's rebalance that moves nothing proposes nothing.
        c.request_rebalance();
        assert_eq!(kind(&c.step(at(3600), &m, reports(&both))), "nothing");
        // A worker that joins between checks is planned for at the next step.
        register(&mut m, 3);
        assert_eq!(kind(&c.step(at(3650), &m, reports(&both))), "prepare");
    }

    #[test]
    fn a_worker_that_never_loads_is_planned_around() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let zeros = vec![0.0; 4];
        let mut m = machine(3);
        let mut c = Controller::new(1);
        let prepare = c.step(
            at(0),
            &m,
            Reports {
                prepared: &HashMap::new(),
                load: &zeros,
            },
        );
        let Some(Command::Prepare { epoch, .. }) = prepare.clone() else {
            panic!("{prepare:?}");
        };
        apply(&mut m, prepare.unwrap());
        c.applied();
        // Workers 1 and 2 load, 3 never does.
        let loaded: HashMap<u64, u64> = [(1, epoch), (2, epoch)].into();
        let reports = Reports {
            prepared: &loaded,
            load: &zeros,
        };
        let gains_3 = m
            .pending
            .as_ref()
            .unwrap()
            .experts_of(3)
            .iter()
            .any(|e| !m.placement.experts_of(3).contains(e));
        assert!(gains_3, "worker 3 gains experts in the plan");
        assert_eq!(kind(&c.step(at(600), &m, reports)), "nothing");
        let patience = 1000 * u64::from(PREPARE_LEASES);
        assert_eq!(
            kind(&c.step(at(600 + patience - 500), &m, reports)),
            "nothing"
        );
        // Past the patience: a new plan without worker 3 replaces the pending one.
        let replan = c.step(at(600 + patience + 100), &m, reports);
        let Some(Command::Prepare { experts, .. }) = replan else {
            panic!("{replan:?}");
        };
        assert!(experts.iter().flatten().all(|&w| w != 3), "{experts:?}");
    }

    #[test]
    fn the_failure_detector_waits_a_lease() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let m = machine(3);
        let heard: HashMap<u64, Instant> = [(1, at(1500)), (2, at(100))].into();
        type Case = (&'static str, u64, u64, HashSet<u64>, Vec<u64>);
        let cases: [Case; 4] = [
            ("a new leader judges nobody", 0, 900, HashSet::new(), vec![]),
            ("silent for a lease", 0, 2000, HashSet::new(), vec![2, 3]),
            (
                "heard before the leader led counts from then",
                1500,
                2400,
                HashSet::new(),
                vec![],
            ),
            ("being marked already", 0, 2000, [3].into(), vec![2]),
        ];
        for (name, since, now, marking, want) in cases {
            assert_eq!(
                silent_members(at(now), at(since), &m, &heard, &marking),
                want,
                "{name}"
            );
        }
    }
}
