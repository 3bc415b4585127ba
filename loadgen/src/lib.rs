//! # expertmesh-loadgen
//!
//! Load generation against any OpenAI-compatible endpoint (expertmesh, vLLM, SGLang): a
//! [`workload`] draws requests (synthetic lengths or a JSONL dataset, seeded), the
//! [`runner`] sends them as a closed or open loop through the small HTTP [`client`], and the
//! [`report`] turns what came back into counts, throughput, latency percentiles and goodput
//! against an [`slo`], printed as a table, written as JSON (with `vllm bench serve`'s keys),
//! drawn as SVG [`plot`]s and put on one self-contained [`html`] page; [`repeat`]ed runs of
//! a level give each figure's mean and confidence interval. [`experts`] loads the expert
//! tier alone, straight over the dispatch protocol.

pub mod client;
pub mod experts;
pub mod html;
pub mod plot;
pub mod repeat;
pub mod report;
pub mod runner;
pub mod slo;
pub mod workload;

pub use client::{Endpoint, Failure, Outcome};
pub use report::Report;
pub use runner::{Run, Shape};
pub use workload::{Lengths, Workload};
