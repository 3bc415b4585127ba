//! Placement, in one place: what a plan is made over ([`WorkerSlots`]) and why one cannot
//! be made; the pure [`planner`] and host-memory [`backups`]; the expert [`load`] window it plans from; the one
//! validity [`check`] of a placement; and the leader's [`controller`] (with the failure
//! detector) that turns state, reports and time into the next `Prepare`, `Commit` or
//! `MarkDead`. The replicated machine (`machine/mod.rs`) applies those commands; epochs are the
//! machine's (`Placement::epoch`: a `Prepare` names the next one, a `Commit` makes it
//! current, a worker lost without another copy bumps it at once).

pub mod backups;
pub mod check;
pub mod controller;
pub mod load;
pub mod planner;

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
