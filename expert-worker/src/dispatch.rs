//! The `Dispatch` seam (DESIGN.md §4): send one routed batch of one MoE layer to an expert
//! worker and await its outputs. Implementations: `InProcessDispatch` (the shard in this
//! process), `GrpcDispatch` (a long-lived bidirectional stream to a remote worker). Both
//! pass the conformance suite in `tests/conformance.rs`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use expertmesh_model::moe::ExpertGroup;

/// Element type of activations on the wire. f32 keeps a cluster bit-identical to the
/// single process; bf16 halves the bytes (and rounds the activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    #[default]
    F32,
    Bf16,
}

impl WireDType {
    pub fn size_bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::Bf16 => 2,
        }
    }

    /// The value as it arrives after a trip in this dtype.
    pub fn round(self, v: f32) -> f32 {
        match self {
            WireDType::F32 => v,
            WireDType::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("`{other}` is not a wire dtype (f32, bf16)")),
        }
    }
}

/// One routed batch: the domain form of `DispatchRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchBatch {
    pub epoch: u64,
    pub layer: u32,
    pub batch_id: u64,
    /// Time the sender will wait for the answer.
    pub timeout: Duration,
    pub groups: Vec<ExpertGroup>,
    pub hidden: usize,
    pub dtype: WireDType,
    /// `[Σ rows, hidden]`, group after group.
    pub activations: Vec<f32>,
}

impl DispatchBatch {
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows as usize).sum()
    }
}

/// Why a batch was not answered. The first six travel on the wire; `Unavailable` is the
/// sender's own view of a worker it cannot reach.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    #[error("wrong placement epoch: the worker is at epoch {current}")]
    WrongEpoch { current: u64 },
    #[error("expert {expert} of layer {layer} is not on this worker")]
    ExpertNotHere { layer: u32, expert: u32 },
    #[error("worker overloaded ({queued} batches queued)")]
    Overloaded { queued: u32 },
    #[error("activations have shape {got:?}, expected {expected:?}")]
    ShapeMismatch { expected: Vec<u64>, got: Vec<u64> },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("expert worker unavailable: {0}")]
    Unavailable(String),
}

pub type DispatchFuture = Pin<Box<dyn Future<Output = Result<Vec<f32>, DispatchError>> + Send>>;

/// Sends routed batches to one expert worker.
pub trait Dispatch: Send + Sync {
    /// Outputs are `[Σ rows, hidden]` in the batch's row order.
    fn dispatch(&self, batch: DispatchBatch) -> DispatchFuture;
}
