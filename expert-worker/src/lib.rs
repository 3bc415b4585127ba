//! The expertmesh expert worker: holds a shard of the routed experts of every MoE layer
//! and answers dispatched batches. The per-expert SwiGLU it will run lives in
//! `expertmesh-model::moe` today.
