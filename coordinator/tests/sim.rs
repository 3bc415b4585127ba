//! The coordinators' raft group in one process over a fake network that drops, delays and
//! partitions messages, driven tick by tick from a seeded generator: the same seed gives
//! the same run. Every replica is the real [`Replica`] on real disk storage. After every
//! round the safety invariant is checked: two replicas never apply different entries at the
//! same index. With [`Control`] on, the leader also runs the real placement controller and
//! failure detector on simulated time, simulated expert workers heartbeat and load what is
//! prepared, and after every round each replica's placement is checked: its epoch never goes
//! back, and it places every expert on live workers only (`placement::check`, draining
//! workers allowed until a new placement replaces them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use expertmesh_coordinator::machine::{Command, Machine, Settings};
use expertmesh_coordinator::placement::check::{check, Draining};
use expertmesh_coordinator::placement::controller::{silent_members, Controller, Reports};
use expertmesh_coordinator::replica::{RaftRole, Replica, Timing};
use expertmesh_coordinator::storage::DiskStorage;
use expertmesh_coordinator::Role as WorkerRole;
use raft::eraftpb::{Message, MessageType};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

struct Sim {
    rng: Rng,
    root: PathBuf,
    timing: Timing,
    nodes: BTreeMap<u64, Option<Replica>>,
    /// (deliver at round, message)
    in_flight: Vec<(u64, Message)>,
    round: u64,
    drop_rate: f64,
    max_delay: u64,
    /// Nodes in different groups cannot talk; empty means no partition.
    groups: Vec<HashSet<u64>>,
    /// Every applied (index → entry data) seen on any replica, for the safety check.
    applied: BTreeMap<u64, Vec<u8>>,
    next_request: u64,
    /// (round, node, role, term, applied): the run's trace, for the determinism check.
    trace: Vec<(u64, u64, &'static str, u64, u64)>,
    control: Option<Control>,
}

/// The leader's controllers and the simulated expert workers around them.
struct Control {
    /// Simulated time at tick 0; each tick is `TICK`.
    start: Instant,
    ticks: u64,
    /// (node, term) of the leader the controller runs for, its controller, and since when.
    leader: Option<(u64, u64, Controller, Instant)>,
    /// Last heartbeat per worker, as the leader heard it.
    heard: HashMap<u64, Instant>,
    /// Newest prepared epoch each worker has loaded.
    prepared: HashMap<u64, u64>,
    /// Workers that stopped (no heartbeats, no loading).
    stopped: HashSet<u64>,
    /// `MarkDead` proposed by the current leader.
    marking: HashSet<u64>,
    /// Newest placement epoch each replica has shown since it (re)started.
    epochs: BTreeMap<u64, u64>,
}

/// Simulated time per tick (the real node's default tick).
const TICK: Duration = Duration::from_millis(100);

const ROUNDS_PER_TICK: u64 = 3;

impl Sim {
    fn new(name: &str, seed: u64, n: u64, timing: Timing) -> Self {
        let root = std::env::temp_dir().join(format!(
            "expertmesh-sim-{name}-{seed}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let voters: Vec<u64> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let storage = DiskStorage::open(&root.join(id.to_string()), &voters).unwrap();
            nodes.insert(
                id,
                Some(Replica::open(id, storage, timing.jittered(seed, id)).unwrap()),
            );
        }
        Self {
            rng: Rng(seed),
            root,
            timing,
            nodes,
            in_flight: Vec::new(),
            round: 0,
            drop_rate: 0.0,
            max_delay: 1,
            groups: Vec::new(),
            applied: BTreeMap::new(),
            next_request: 1,
            trace: Vec::new(),
            control: None,
        }
    }

    /// Turns the placement controller and the simulated workers on.
    fn with_control(mut self) -> Self {
        self.control = Some(Control {
            start: Instant::now(),
            ticks: 0,
            leader: None,
            heard: HashMap::new(),
            prepared: HashMap::new(),
            stopped: HashSet::new(),
            marking: HashSet::new(),
            epochs: BTreeMap::new(),
        });
        self
    }

    /// One tick of the simulated workers and the leader's controllers.
    fn control(&mut self) {
        let Some(leader) = self.leader_in(&[]) else {
            return;
        };
        let term = self.node(leader).status().term;
        let Some(mut c) = self.control.take() else {
            return;
        };
        c.ticks += 1;
        let now = c.start + TICK * c.ticks as u32;
        if c.leader
            .as_ref()
            .is_none_or(|(id, t, _, _)| (*id, *t) != (leader, term))
        {
            c.leader = Some((leader, term, Controller::new(leader), now));
            c.marking.clear();
        }
        let machine = self.node(leader).machine().clone();
        for m in machine.members.iter().filter(|m| m.alive) {
            if !c.stopped.contains(&m.id) {
                c.heard.insert(m.id, now);
                if let Some(p) = &machine.pending {
                    c.prepared.insert(m.id, p.epoch);
                }
            }
        }
        let (_, _, controller, since) = c.leader.as_mut().expect("set above");
        let mut commands = Vec::new();
        if machine.initialized {
            let load = vec![0.0; machine.num_experts];
            let reports = Reports {
                prepared: &c.prepared,
                load: &load,
            };
            commands.extend(controller.step(now, &machine, reports));
            for worker_id in silent_members(now, *since, &machine, &c.heard, &c.marking) {
                c.marking.insert(worker_id);
                commands.push(Command::MarkDead { worker_id });
            }
        }
        for command in commands {
            let placement = !matches!(command, Command::MarkDead { .. });
            if self.node(leader).propose(Vec::new(), command).is_err() && placement {
                controller.not_proposed();
            }
        }
        self.control = Some(c);
    }

    /// After a replica's Ready: its placement epoch never goes back, and its placement puts
    /// every expert on live expert workers.
    fn check_placement(&mut self, id: u64, applied_any: bool) {
        let Some(c) = self.control.as_mut() else {
            return;
        };
        if applied_any {
            if let Some((leader, _, controller, _)) = c.leader.as_mut() {
                if *leader == id {
                    controller.applied();
                }
            }
        }
        let m = self.nodes[&id].as_ref().expect("a live replica").machine();
        let epoch = m.placement.epoch;
        let seen = c.epochs.entry(id).or_insert(epoch);
        assert!(
            epoch >= *seen,
            "replica {id}: epoch went back from {seen} to {epoch}"
        );
        *seen = epoch;
        let live = m
            .members
            .iter()
            .filter(|w| w.alive && w.role == WorkerRole::ExpertWorker)
            .count();
        if m.initialized && live > 0 && m.unservable.is_none() {
            if let Err(e) = check(
                &m.placement.experts,
                m.num_experts,
                &m.members,
                Draining::Allowed,
            ) {
                panic!("replica {id}: epoch {epoch}: {e}");
            }
        }
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|g| g.contains(&a) && g.contains(&b))
    }

    fn partition(&mut self, groups: &[&[u64]]) {
        self.groups = groups.iter().map(|g| g.iter().copied().collect()).collect();
    }

    fn heal(&mut self) {
        self.groups.clear();
    }

    fn crash(&mut self, id: u64) {
        self.nodes.insert(id, None);
        self.in_flight.retain(|(_, m)| m.to != id);
    }

    fn restart(&mut self, id: u64) {
        let storage = DiskStorage::open(&self.root.join(id.to_string()), &[]).unwrap();
        let timing = self.timing.jittered(self.rng.next(), id);
        self.nodes
            .insert(id, Some(Replica::open(id, storage, timing).unwrap()));
        if let Some(c) = self.control.as_mut() {
            // A restarted replica shows its snapshot before it re-applies the log.
            c.epochs.remove(&id);
        }
    }

    /// One round: deliver what is due, then run every replica's Ready.
    fn round(&mut self) {
        self.round += 1;
        let now = self.round;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.in_flight = later;
        for (_, m) in due {
            let (from, to) = (m.from, m.to);
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let delivered =
                self.connected(from, to) && matches!(self.nodes.get(&to), Some(Some(_)));
            if delivered {
                self.node(to).step(m);
            }
            // What the gRPC transport tells the sender about a snapshot it sent.
            if snapshot {
                if let Some(Some(sender)) = self.nodes.get_mut(&from) {
                    sender.report_snapshot(to, delivered);
                }
            }
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(Some(node)) = self.nodes.get_mut(&id) else {
                continue;
            };
            let out = node.ready().unwrap();
            let status = node.status();
            for a in &out.applied {
                let data = format!("term {} {:?}", a.term, a.result).into_bytes();
                match self.applied.get(&a.index) {
                    Some(seen) => assert_eq!(
                        seen, &data,
                        "replica {id} applied a different entry at index {}",
                        a.index
                    ),
                    None => {
                        self.applied.insert(a.index, data);
                    }
                }
            }
            self.trace
                .push((now, id, status.role.name(), status.term, status.applied));
            let applied_any = !out.applied.is_empty();
            for m in out.messages {
                if self.rng.chance(self.drop_rate) {
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        node.report_snapshot(m.to, false);
                    }
                    continue;
                }
                let at = now + 1 + self.rng.below(self.max_delay);
                self.in_flight.push((at, m));
            }
            self.check_placement(id, applied_any);
        }
    }

    fn tick(&mut self) {
        for node in self.nodes.values_mut().flatten() {
            node.tick();
        }
        self.control();
        for _ in 0..ROUNDS_PER_TICK {
            self.round();
        }
    }

    fn run(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.tick();
        }
    }

    /// The leader of the highest term among live replicas in `among` (all when empty).
    fn leader_in(&self, among: &[u64]) -> Option<u64> {
        self.nodes
            .iter()
            .filter(|(id, _)| among.is_empty() || among.contains(id))
            .filter_map(|(id, n)| n.as_ref().map(|n| (*id, n.status())))
            .filter(|(_, s)| s.role == RaftRole::Leader)
            .max_by_key(|(_, s)| s.term)
            .map(|(id, _)| id)
    }

    fn wait_leader(&mut self, among: &[u64], ticks: u64) -> u64 {
        for _ in 0..ticks {
            if let Some(l) = self.leader_in(among) {
                return l;
            }
            self.tick();
        }
        panic!("no leader among {among:?} after {ticks} ticks");
    }

    fn node(&mut self, id: u64) -> &mut Replica {
        self.nodes.get_mut(&id).unwrap().as_mut().unwrap()
    }

    fn init(&mut self) {
        self.init_with(Settings::default());
    }

    fn init_with(&mut self, settings: Settings) {
        let leader = self.wait_leader(&[], 200);
        self.node(leader)
            .propose(
                Vec::new(),
                Command::Init {
                    model_fingerprint: "fp".into(),
                    num_experts: 8,
                    settings,
                    coordinators: BTreeMap::new(),
                },
            )
            .unwrap();
    }

    fn register(&mut self, on: u64) -> Result<(), raft::Error> {
        self.next_request += 1;
        let request_id = self.next_request;
        self.node(on).propose(
            Vec::new(),
            Command::Register {
                request_id,
                role: WorkerRole::ExpertWorker,
                address: format!("10.0.0.{request_id}:9000"),
                capacity: None,
                pid: 1,
                model_fingerprint: "fp".into(),
                join_token: String::new(),
                holds_experts: false,
                weightless: false,
                // Backups are planned on every replica as commands apply: they must agree.
                backup: 1,
            },
        )
    }

    fn machine(&self, id: u64) -> Machine {
        self.nodes[&id].as_ref().unwrap().machine().clone()
    }

    /// Runs until every live replica holds `members` members and the same state.
    fn converge(&mut self, members: usize, ticks: u64) {
        for _ in 0..ticks {
            let machines: Vec<Machine> = self
                .nodes
                .values()
                .flatten()
                .map(|n| n.machine().clone())
                .collect();
            if machines
                .iter()
                .all(|m| m.members.len() == members && *m == machines[0])
            {
                return;
            }
            self.tick();
        }
        let counts: Vec<(u64, usize)> = self
            .nodes
            .iter()
            .filter_map(|(id, n)| n.as_ref().map(|n| (*id, n.machine().members.len())))
            .collect();
        panic!("replicas did not converge on {members} members: {counts:?}");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn timing() -> Timing {
    Timing {
        election_ticks: 10,
        heartbeat_ticks: 2,
        compact_every: 8,
        max_election_ticks: 0,
    }
}

trait Jitter {
    fn jittered(self, seed: u64, id: u64) -> Self;
}

impl Jitter for Timing {
    /// raft-rs draws election timeouts from the thread's random generator; a fixed timeout
    /// per replica, drawn from the seed, keeps runs reproducible.
    fn jittered(mut self, seed: u64, id: u64) -> Self {
        let mut rng = Rng(seed ^ id.wrapping_mul(0xA24B_AED4_963E_E407));
        self.election_ticks += rng.below(self.election_ticks as u64) as usize;
        self.max_election_ticks = self.election_ticks + 1;
        self
    }
}

#[test]
fn election_and_replication_under_loss_and_delay() {
    for seed in [1, 2, 3] {
        let mut sim = Sim::new("replicate", seed, 3, timing());
        sim.drop_rate = 0.1;
        sim.max_delay = 3;
        sim.init();
        sim.run(20);
        let mut proposed = 0;
        while proposed < 30 {
            let leader = sim.wait_leader(&[], 300);
            if sim.register(leader).is_ok() {
                proposed += 1;
            }
            sim.run(2);
        }
        // Proposals dropped with a leader change are lost (their callers retry); what
        // committed is on every replica.
        sim.drop_rate = 0.0;
        sim.run(50);
        let members = sim.machine(1).members.len();
        assert!(members > 20, "seed {seed}: only {members} of 30 committed");
        sim.converge(members, 200);
    }
}

#[test]
fn same_seed_same_run() {
    let trace = |seed| {
        let mut sim = Sim::new("determinism", seed, 3, timing());
        sim.drop_rate = 0.2;
        sim.max_delay = 4;
        sim.init();
        for _ in 0..10 {
            if let Some(l) = sim.leader_in(&[]) {
                let _ = sim.register(l);
            }
            sim.run(5);
        }
        std::mem::take(&mut sim.trace)
    };
    assert_eq!(trace(7), trace(7));
}

#[test]
fn isolated_leader_cannot_commit_and_a_new_one_takes_over() {
    let mut sim = Sim::new("isolated", 11, 3, timing());
    sim.init();
    sim.run(10);
    let old = sim.wait_leader(&[], 100);
    sim.register(old).unwrap();
    sim.converge(1, 100);
    let rest: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    sim.partition(&[&[old], &rest]);
    // The isolated leader still accepts this proposal, but can never commit it.
    sim.register(old).unwrap();
    let new = sim.wait_leader(&rest, 200);
    assert_ne!(new, old);
    sim.register(new).unwrap();
    sim.run(30);
    assert_eq!(sim.machine(new).members.len(), 2);
    assert_eq!(sim.machine(old).members.len(), 1, "a minority committed");
    // Check-quorum: the isolated leader steps down.
    assert_ne!(sim.node(old).status().role, RaftRole::Leader);
    sim.heal();
    sim.converge(2, 300);
    // The old leader's uncommitted registration is gone everywhere.
    assert!(sim
        .machine(old)
        .members
        .iter()
        .all(|m| m.address != "10.0.0.3:9000"));
}

#[test]
fn minority_and_majority_partitions() {
    let mut sim = Sim::new("partitions", 5, 5, timing());
    sim.init();
    sim.run(10);
    sim.partition(&[&[1, 2], &[3, 4, 5]]);
    sim.run(60);
    let majority = sim.wait_leader(&[3, 4, 5], 300);
    sim.register(majority).unwrap();
    sim.run(30);
    for id in [3, 4, 5] {
        assert_eq!(sim.machine(id).members.len(), 1);
    }
    for id in [1, 2] {
        assert!(sim.machine(id).members.is_empty());
        // The minority can elect no one (pre-vote keeps its terms from inflating).
        assert_ne!(sim.node(id).status().role, RaftRole::Leader);
    }
    let term_before = sim.node(majority).status().term;
    sim.heal();
    sim.converge(1, 300);
    // Pre-vote: rejoining the minority did not force a new election.
    assert_eq!(sim.node(majority).status().term, term_before);
}

#[test]
fn restart_from_disk_and_catch_up_by_snapshot() {
    let mut sim = Sim::new("restart", 21, 3, timing());
    sim.init();
    sim.run(10);
    let leader = sim.wait_leader(&[], 100);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    for _ in 0..3 {
        sim.register(leader).unwrap();
    }
    sim.converge(3, 100);
    sim.crash(follower);
    // Enough entries that the leader compacts past what the follower has.
    for _ in 0..20 {
        let l = sim.wait_leader(&[], 100);
        sim.register(l).unwrap();
        sim.run(1);
    }
    sim.run(20);
    sim.restart(follower);
    sim.converge(23, 300);
    // Every replica down at once, then back: the state comes back from disk.
    let before = sim.machine(1);
    for id in 1..=3 {
        sim.crash(id);
    }
    for id in 1..=3 {
        sim.restart(id);
    }
    // One round re-applies the committed entries after each replica's snapshot.
    sim.round();
    for id in 1..=3 {
        assert_eq!(sim.machine(id), before, "replica {id} restored from disk");
    }
    let l = sim.wait_leader(&[], 300);
    sim.register(l).unwrap();
    sim.converge(24, 300);
}

/// The placement controller and failure detector through a lossy raft group: workers join,
/// one stops (marked dead, its experts re-placed), one drains (its experts move off), the
/// leader crashes and another takes over; the placement invariants hold after every round,
/// and the cluster ends with every expert on two live, non-draining workers.
#[test]
fn placement_controller_keeps_the_invariants() {
    for seed in [3, 4] {
        let mut sim = Sim::new("control", seed, 3, timing()).with_control();
        sim.drop_rate = 0.05;
        sim.max_delay = 2;
        sim.init_with(Settings {
            lease_ms: 1000,
            min_replicas: 2,
            ..Settings::default()
        });
        sim.run(20);
        let mut joined = 0;
        while joined < 4 {
            let leader = sim.wait_leader(&[], 300);
            if sim.register(leader).is_ok() {
                joined += 1;
            }
            sim.run(5);
        }
        sim.run(60);
        let leader = sim.wait_leader(&[], 300);
        let ids: Vec<u64> = sim.machine(leader).members.iter().map(|m| m.id).collect();
        assert!(ids.len() >= 3, "seed {seed}: {ids:?}");
        let epoch_before = sim.machine(leader).placement.epoch;
        // A worker stops: no heartbeats for a lease.
        let stopped = ids[0];
        sim.control.as_mut().unwrap().stopped.insert(stopped);
        sim.run(40);
        // Another drains.
        let draining = ids[1];
        let leader = sim.wait_leader(&[], 300);
        let _ = sim.node(leader).propose(
            Vec::new(),
            Command::Drain {
                worker_id: draining,
            },
        );
        sim.run(20);
        // The leader crashes; the next one picks the controller up.
        sim.crash(leader);
        sim.run(60);
        sim.restart(leader);
        sim.drop_rate = 0.0;
        sim.run(120);
        let l = sim.wait_leader(&[], 300);
        let m = sim.machine(l);
        assert!(
            m.placement.epoch > epoch_before,
            "seed {seed}: no new epoch"
        );
        let dead = m.members.iter().find(|w| w.id == stopped).unwrap();
        assert!(
            !dead.alive,
            "seed {seed}: the stopped worker is not marked dead"
        );
        for (e, copies) in m.placement.experts.iter().enumerate() {
            assert!(
                !copies.contains(&stopped) && !copies.contains(&draining),
                "seed {seed}: expert {e} on {copies:?}"
            );
            assert_eq!(copies.len(), 2, "seed {seed}: expert {e} has {copies:?}");
        }
    }
}
