//! # expertmesh-dispatch
//!
//! The data path between attention and expert workers (DESIGN.md §4): the [`Dispatch`] seam
//! (send one routed batch of one MoE layer to an expert worker, await its outputs), its
//! domain types, the one place the wire becomes domain ([`wire`]), and the transports:
//!
//! - [`local::InProcessDispatch`]: straight into an [`Answer`] in this process (an expert
//!   worker's batcher), with the wire path's dtype rounding — no sockets;
//! - [`grpc::GrpcDispatch`]: a long-lived bidirectional stream to a remote worker;
//! - [`framed::FramedDispatch`]: length-prefixed frames over a plain TCP (or Unix) socket
//!   to the same port, the tensor bytes written once and read in place ([`frame`]);
//! - `nccl::NcclDispatch` (feature `cuda`): the rows through NCCL between GPU ranks;
//! - [`fault::FaultyDispatch`]: a test double that drops, delays, hangs or answers
//!   `WrongEpoch`/`Unavailable` as scripted, around any other.
//!
//! [`Transport`] names them for config (`--dispatch local|grpc|tcp|nccl`). All of them pass one
//! conformance suite (`expert-worker/tests/conformance.rs`); the expert worker's
//! [`Answer`] is what the in-process and NCCL transports deliver to, and what its gRPC
//! server calls.

pub mod fault;
pub mod frame;
pub mod framed;
pub mod grpc;
mod link;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use fault::{Fault, FaultyDispatch};
pub use framed::FramedDispatch;
pub use grpc::GrpcDispatch;
pub use local::InProcessDispatch;

use expertmesh_model::fp8;
use expertmesh_model::moe::ExpertGroup;

/// Element type of activations on the wire. f32 keeps a cluster bit-identical to the
/// single process; bf16 halves the bytes (and rounds the activations); fp8 quarters them
/// and stays bit-identical for FP8 (W8A8) experts, whose first step is exactly that
/// quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    #[default]
    F32,
    Bf16,
    /// e4m3 codes with one f32 scale per row: each row quantized with its own dynamic
    /// scale (`expertmesh_model::fp8::quantize_activations`). Only for the inputs of FP8
    /// experts that quantize their inputs per token; the values that arrive are what such
    /// an expert would have computed from the f32 row, so it takes them as they are.
    /// Replies travel as f32.
    Fp8,
}

impl WireDType {
    /// Bytes per value (fp8 adds 4 bytes of scale per row: [`WireDType::row_bytes`]).
    pub fn size_bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::Bf16 => 2,
            WireDType::Fp8 => 1,
        }
    }

    /// Bytes of one row of `hidden` values on the wire.
    pub fn row_bytes(self, hidden: usize) -> usize {
        hidden * self.size_bytes() + if self == WireDType::Fp8 { 4 } else { 0 }
    }

    /// The dtype of the reply to a batch sent in this one: outputs are never FP8.
    pub fn reply(self) -> Self {
        match self {
            WireDType::Fp8 => WireDType::F32,
            other => other,
        }
    }

    /// Rows of `hidden` values as they arrive after a trip in this dtype.
    pub fn carry(self, values: &mut [f32], hidden: usize) {
        match self {
            WireDType::F32 => {}
            WireDType::Bf16 => expertmesh_model::kernels::round_bf16(values),
            WireDType::Fp8 => fp8::qdq_rows_in_place(values, hidden),
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            other => Err(format!("`{other}` is not a wire dtype (f32, bf16, fp8)")),
        }
    }
}

impl std::fmt::Display for WireDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        })
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
    /// The trace ids of the requests whose rows these are (log lines only; at most
    /// [`wire::TRACES_MAX`] travel).
    pub traces: Vec<u128>,
}

impl DispatchBatch {
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows as usize).sum()
    }
}

/// Why a batch was not answered. Every kind travels on the wire; `Unavailable` is also the
/// sender's own view of a worker it cannot reach, and is retried on another copy.
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

impl<D: Dispatch + ?Sized> Dispatch for Arc<D> {
    fn dispatch(&self, batch: DispatchBatch) -> DispatchFuture {
        (**self).dispatch(batch)
    }
}

/// The answering side: what an expert worker does with a batch that reached it (checks
/// against its shard, batching, compute). The in-process and NCCL transports deliver to it.
pub trait Answer: Send + Sync {
    fn answer(&self, batch: DispatchBatch) -> DispatchFuture;
}

/// Which transport carries routed batches (`--dispatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// In this process, to experts this process holds: a single-node deployment without
    /// sockets.
    Local,
    /// gRPC streams to expert workers.
    Grpc,
    /// Framed messages over plain TCP to the expert workers' same port, gRPC staying the
    /// control plane (the default: `bench dispatch` and `bench serve` measure it faster).
    #[default]
    Tcp,
    /// NCCL between GPU ranks (feature `cuda`), gRPC staying the control path.
    Nccl,
}

impl Transport {
    /// A client of the worker at `address` over this transport: the one place a socket
    /// transport is made from its name. `None` for `local` and `nccl`, which do not reach a
    /// worker by its address.
    pub fn client(self, address: &str) -> Option<Arc<dyn Dispatch>> {
        match self {
            Transport::Grpc => Some(GrpcDispatch::new(address)),
            Transport::Tcp => Some(FramedDispatch::new(address)),
            Transport::Local | Transport::Nccl => None,
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "grpc" => Ok(Self::Grpc),
            "tcp" => Ok(Self::Tcp),
            "nccl" => Ok(Self::Nccl),
            other => Err(format!(
                "`{other}` is not a transport (local, grpc, tcp, nccl)"
            )),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Grpc => "grpc",
            Self::Tcp => "tcp",
            Self::Nccl => "nccl",
        })
    }
}
