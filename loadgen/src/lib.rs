//! # expertmesh-loadgen
//!
//! Load generation against any OpenAI-compatible endpoint (expertmesh, vLLM, SGLang): a
//! [`workload`] draws requests (synthetic lengths or a JSONL dataset, seeded), the
//! [`runner`] sends them as a closed or open loop through the small HTTP [`client`], and the
//! [`report`] turns what came back into counts, throughput and latency percentiles, printed
//! as a table, written as JSON, and drawn as PNG [`plot`]s. [`experts`] loads the expert
//! tier alone, straight over the dispatch protocol.

pub mod client;
pub mod experts;
pub mod plot;
pub mod report;
pub mod runner;
pub mod workload;

pub use client::{Endpoint, Failure, Outcome};
pub use report::Report;
pub use runner::{Run, Shape};
pub use workload::{Lengths, Workload};
