//! # expertmesh-attention-worker
//!
//! An attention worker holds everything of the model but the routed experts: embeddings,
//! attention and the KV cache, norms, routers, shared experts, dense layers, `lm_head`.
//! Its main loop serves `AttentionService.Generate`: it runs the same forward pass as the
//! single-process engine (`expertmesh_model::Model::forward_with`), and at each MoE layer
//! the model hands the router-scaled tokens to [`remote::RemoteExperts`], which splits
//! them by the worker holding each expert under the current placement epoch, dispatches
//! the pieces concurrently over gRPC while the shared expert is computed here, and puts
//! the answers back in token order. With f32 on the wire the result is bit-identical to
//! the single process. Replica choice and what a failure leads to are the pure functions of
//! [`routing`]; the transport is chosen once, from config ([`remote::Connector`]).

pub mod dense;
pub mod node;
pub mod remote;
pub mod routing;
pub mod scheduler;
mod sequence;
pub mod service;

pub use node::{connect, run, AttentionWorkerConfig, NodeError};
pub use remote::{DispatchConfig, RemoteExperts};
pub use scheduler::{Engine, EngineStats, Event, Failure, Prepared, SchedulerConfig, SubmitError};
pub use service::AttentionServer;
