//! The compute-backend seam: what a backend supplies to the one forward pass
//! ([`crate::forward`]). The layer loop, micro-batching, the MoE start/finish around the
//! [`ExpertRunner`] and the KV-cache bookkeeping are written once over these operations;
//! the CPU backend ([`crate::cpu`], the reference, always built) and the CUDA backend
//! (`cuda::CudaBackend`, feature `cuda`; an uninhabited stub without it, so no code outside
//! `cuda/` needs a `cfg`) supply them and own their device memory — the CUDA backend keeps
//! the keys and values of its block pools.
//!
//! Each backend keeps its arithmetic where it is exact: the CPU backend's operations are the
//! reference's, in the same order of sums, so the single process and a cluster agree bit
//! for bit.

use std::sync::Arc;

use crate::cuda::CudaBackend;
use crate::error::Result;
use crate::kv_cache::BlockPool;
use crate::model::{Model, Sequence};
use crate::moe::{PendingExperts, Route, RoutedBatch};

/// The operations of one forward pass, over a backend's own activations.
pub(crate) trait Backend: Sync {
    /// One micro-batch's hidden state `[rows, hidden]`, its normed input of the current
    /// sub-layer, and whatever else the backend keeps for it during a step.
    type Rows;

    /// Runs one forward pass with the device to itself.
    fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }

    /// Checks that every sequence's cache can be used by this backend.
    fn check_caches(&self, _batch: &[Sequence<'_>]) -> Result<()> {
        Ok(())
    }

    /// The embeddings of the micro-batch's new tokens, in batch order.
    fn embed(&self, model: &Model, seqs: &[Sequence<'_>]) -> Result<Self::Rows>;

    /// Layer `l`'s input norm, self-attention (the new keys and values written into the
    /// sequences' caches, which grow by their new tokens) and residual add, then the
    /// post-attention norm into the rows' normed input.
    fn attention(
        &self,
        model: &Model,
        l: usize,
        rows: &mut Self::Rows,
        seqs: &mut [Sequence<'_>],
    ) -> Result<()>;

    /// hidden += the dense MLP of layer `l` over the normed input.
    fn dense(&self, model: &Model, l: usize, rows: &mut Self::Rows) -> Result<()>;

    /// The top-1 route of every row under layer `l`'s router.
    fn route(&self, model: &Model, l: usize, rows: &mut Self::Rows) -> Result<Vec<Route>>;

    /// The routed batch's inputs: the normed input's rows in `order`, each scaled by its
    /// router score (`moe::routed_inputs`), on the host.
    fn routed_inputs(
        &self,
        rows: &Self::Rows,
        routes: &[Route],
        order: &[usize],
    ) -> Result<Vec<f32>>;

    /// hidden += shared expert (computed while the routed rows are away) + the routed
    /// outputs, put back by `order`. Waits for `pending` on this thread.
    fn moe_finish(
        &self,
        model: &Model,
        l: usize,
        rows: &mut Self::Rows,
        order: &[usize],
        pending: PendingExperts,
    ) -> Result<()>;

    /// Final norm and `lm_head` over rows `picked` of the micro-batches taken in order.
    fn logits(&self, model: &Model, micro: Vec<Self::Rows>, picked: &[usize]) -> Result<Vec<f32>>;

    /// Runs a routed batch on the experts this process holds.
    fn run_experts(&self, model: &Model, batch: RoutedBatch) -> Result<PendingExperts>;

    /// A bounded block pool for this backend's caches.
    fn new_pool(&self, block_tokens: usize, blocks: usize) -> Arc<BlockPool>;
}

/// Where a model computes: a closed set of backends (candle's habit). Without the `cuda`
/// feature `CudaBackend` is uninhabited, so the `Cuda` arm costs nothing and needs no `cfg`.
#[derive(Debug, Clone)]
pub(crate) enum Compute {
    Cpu,
    Cuda(Arc<CudaBackend>),
}

/// Runs `$body` with `$b` bound to the model's backend (`&CpuBackend` or `&CudaBackend`).
macro_rules! with_backend {
    ($compute:expr, $b:ident => $body:expr) => {
        match $compute {
            $crate::backend::Compute::Cpu => {
                let $b = &$crate::cpu::CpuBackend;
                $body
            }
            $crate::backend::Compute::Cuda(gpu) => {
                let $b: &$crate::cuda::CudaBackend = gpu;
                $body
            }
        }
    };
}
pub(crate) use with_backend;

impl Compute {
    /// "cpu", or "cuda:N name".
    pub(crate) fn name(&self) -> String {
        match self {
            Compute::Cpu => "cpu".into(),
            Compute::Cuda(gpu) => gpu.device_name().to_string(),
        }
    }

    /// The pool of `Model::new_cache`: unbounded on the host, the backend's own on a device.
    pub(crate) fn default_pool(&self) -> Arc<BlockPool> {
        match self {
            Compute::Cpu => BlockPool::unbounded(),
            Compute::Cuda(gpu) => gpu.default_pool(),
        }
    }
}
