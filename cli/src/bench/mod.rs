//! `expertmesh bench …`: benchmarks that report numbers against a baseline measured in the
//! same run, never timed tests.
//!
//! - [`decode`]: single-process decode and prefill against this machine's memory bandwidth
//!   (and, with `--expert-workers`, through a local cluster as a ratio to it);
//! - [`dispatch`]: one dispatch round trip over loopback through each transport against raw
//!   TCP and Unix echoes;
//! - [`serve`]: streams through the OpenAI API of a local cluster;
//! - [`prefix`]: time to first token of requests sharing a long prefix, with prefix caching
//!   and without it;
//! - [`image`]: image prefill (vision tower + merged prefill) against text prefill of the
//!   same token count;
//! - [`transfer`]: every expert of a checkpoint fetched from a peer over loopback against raw
//!   TCP moving the same bytes;
//! - [`join`]: the time from a weightless expert worker's start to the placement that gives
//!   it experts, against a worker with the checkpoint's files;
//! - [`gpu`]: the Maverick expert shard on a GPU against a dense GEMM and the copy bandwidth;
//! - [`steps`]: what they share (timed decode steps, medians, the host's bandwidth).

mod decode;
mod dispatch;
mod gpu;
mod image;
mod join;
mod memory;
mod prefix;
mod serve;
mod steps;
mod transfer;

use anyhow::Result;
use clap::Subcommand;

pub(crate) use steps::{decode_steps, median, median_of, turn};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Decode tokens/s at several batch sizes after a prompt, against the bandwidth floor.
    Decode(decode::DecodeArgs),
    /// One dispatch round trip over loopback through each transport against raw TCP and Unix
    /// echoes of the same bytes.
    Dispatch(dispatch::DispatchArgs),
    /// Resident memory of an expert worker holding every expert of each checkpoint given
    /// (a bf16 one and its FP8 copy side by side).
    ExpertMemory(memory::ExpertMemoryArgs),
    /// Image prefill at 1, 4 and 16 tiles against text prefill of the same token count.
    Image(image::ImageArgs),
    /// Streams through the OpenAI API of a local cluster at several concurrency levels.
    Serve(serve::ServeArgs),
    /// Time to first token of requests sharing a long prefix through a local cluster, with
    /// prefix caching and with `--no-prefix-cache`, in one run.
    Prefix(prefix::PrefixArgs),
    /// The time from an expert worker's start to the committed placement that gives it
    /// experts: without the checkpoint's weights (fetched over each transport) against with
    /// them.
    Join(join::JoinArgs),
    /// Every expert of a checkpoint fetched from a peer (`FetchExperts`) against raw TCP
    /// moving the same bytes over loopback.
    Transfer(transfer::TransferArgs),
    /// One MoE layer's expert shard at Maverick size on a GPU: grouped cuBLAS GEMMs against
    /// a dense GEMM of the same FLOPs and a device-to-device copy (a `--features cuda` build).
    GpuExperts(gpu::GpuExpertsArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::Dispatch(args) => dispatch::run(args),
        BenchCommand::ExpertMemory(args) => memory::run(args),
        BenchCommand::GpuExperts(a) => gpu::run(a),
        BenchCommand::Image(args) => image::run(args),
        BenchCommand::Join(args) => join::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Prefix(args) => prefix::run(args),
        BenchCommand::Transfer(args) => transfer::run(args),
    }
}
