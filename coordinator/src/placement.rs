//! What placement is planned over: expert workers and their slots, and why a placement
//! cannot be made. The planner itself is `planner::plan`.

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
