//! The expertmesh wire protocol (package `expertmesh.v1`).
//!
//! Empty for now: the gRPC services (`ExpertService`, `AttentionService`,
//! `CoordinatorService`, `RaftService`) land with the expert-parallel data plane. Generated
//! types will stay in this crate; wire-to-domain conversion happens here once, with
//! `TryFrom` and a typed error per missing or out-of-range field.
