//! # expertmesh-expert-worker
//!
//! An expert worker holds a shard of the routed experts of every MoE layer and answers
//! routed batches. Its main loop: register with the coordinator, take the placement it
//! publishes (which experts this worker owns, under which epoch), and serve
//! `ExpertService.Dispatch` streams. Each incoming batch is converted from the wire once
//! ([`wire`]), checked against the shard ([`shard`]: epoch, layer, experts owned, shapes),
//! queued in the bounded [`batcher`] that merges batches of the same layer into one group
//! per expert, computed on the CPU (`expertmesh_model::moe::Experts::run_groups`), and
//! answered in the request's row order and dtype.
//!
//! The [`dispatch::Dispatch`] seam is what attention workers call; [`client::GrpcDispatch`],
//! [`local::InProcessDispatch`] and (feature `cuda`) `nccl::NcclDispatch` implement it.

pub mod batcher;
pub mod client;
pub mod dispatch;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod node;
pub mod server;
pub mod shard;
pub mod wire;

pub use batcher::{Batcher, BatcherConfig};
pub use client::GrpcDispatch;
pub use dispatch::{Dispatch, DispatchBatch, DispatchError, WireDType};
pub use local::InProcessDispatch;
pub use node::{run, ExpertWorkerConfig, NodeError};
pub use server::ExpertServer;
pub use shard::{Assignment, ExpertShard};
