//! A coordinator's `/metrics` (`coordinator --metrics ADDR`): its raft replica (term, commit
//! and applied index, the apply lag, whether it leads, whom it follows and how often that
//! changed) and the cluster
//! state it has applied (placement epoch, a placement pending, workers by role and state,
//! whether the cluster can serve).

use expertmesh_proto::metrics::write_family;

use crate::replica::RaftRole;
use crate::service::Coordinator;
use crate::state::Role;

/// The coordinator's figures as Prometheus text.
pub fn render(coordinator: &Coordinator) -> String {
    let status = coordinator.status();
    let view = coordinator.view();
    let mut out = String::new();
    let one = |v: f64| vec![(String::new(), v)];
    let figures = [
        (
            "expertmesh_raft_term",
            "The replica's raft term.",
            status.term as f64,
        ),
        (
            "expertmesh_raft_commit_index",
            "The last log index known committed.",
            status.commit as f64,
        ),
        (
            "expertmesh_raft_applied_index",
            "The last log index applied to the cluster state.",
            status.applied as f64,
        ),
        (
            "expertmesh_raft_apply_lag",
            "Committed entries not yet applied.",
            status.commit.saturating_sub(status.applied) as f64,
        ),
        (
            "expertmesh_raft_is_leader",
            "1 on the leader.",
            f64::from(u8::from(status.role == RaftRole::Leader)),
        ),
        (
            "expertmesh_raft_leader_id",
            "The leader this replica knows (0: none).",
            status.leader as f64,
        ),
        (
            "expertmesh_raft_leader_changes_total",
            "Times this replica saw the leader change.",
            coordinator.leader_changes() as f64,
        ),
        (
            "expertmesh_placement_epoch",
            "The committed placement's epoch (one per re-plan).",
            view.placement.epoch as f64,
        ),
        (
            "expertmesh_placement_pending",
            "1 while a new placement's experts are being loaded.",
            f64::from(u8::from(view.pending.is_some())),
        ),
        (
            "expertmesh_cluster_servable",
            "1 when every expert has a live holder.",
            f64::from(u8::from(view.unservable.is_none())),
        ),
    ];
    for (name, help, value) in figures {
        write_family(&mut out, name, help, &one(value));
    }
    let mut workers = Vec::new();
    for role in [Role::ExpertWorker, Role::AttentionWorker] {
        let name = match role {
            Role::ExpertWorker => "expert-worker",
            Role::AttentionWorker => "attention-worker",
        };
        let of_role = view.members.iter().filter(|m| m.role == role);
        let (mut alive, mut draining, mut dead) = (0, 0, 0);
        for m in of_role {
            match (m.alive, m.draining) {
                (false, _) => dead += 1,
                (true, true) => draining += 1,
                (true, false) => alive += 1,
            }
        }
        for (state, n) in [("alive", alive), ("draining", draining), ("dead", dead)] {
            workers.push((format!("role=\"{name}\",state=\"{state}\""), f64::from(n)));
        }
    }
    write_family(
        &mut out,
        "expertmesh_workers",
        "Workers the cluster state holds, by role and state.",
        &workers,
    );
    out
}
