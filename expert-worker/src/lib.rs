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
//! The `Dispatch` seam that attention workers call, its wire form and its transports live
//! in `expertmesh-dispatch`; this crate is the answering side: the [`Batcher`] is the
//! seam's `Answer` (what the in-process and NCCL transports deliver to) and the
//! [`ExpertServer`] puts it behind gRPC.
//!
//! A worker without the checkpoint's weights takes its experts from peers ([`transfer`], over
//! gRPC or the port's framed form, [`framed_fetch`]);
//! the chunked, checked transfer of weights into a mapped file is [`weight_file`], which
//! attention workers use for their dense weights too.

pub mod batcher;
pub mod framed_fetch;
pub mod node;
pub mod server;
pub mod shard;
pub mod transfer;
pub mod weight_file;

pub use batcher::{Batcher, BatcherConfig};
pub use node::{run, ExpertWorkerConfig, NodeError, WorkerConfig};
pub use server::ExpertServer;
pub use shard::{Assignment, ExpertShard};
