//! `NcclDispatch` (cargo feature `cuda`): the `Dispatch` seam with the routed rows moving
//! between GPU ranks through NCCL. Each batch's activations go from the attention rank to
//! the expert rank, and the outputs back, as one grouped NCCL send and receive each
//! (`expertmesh_model::cuda::nccl::NcclLink`); the expert rank checks, batches and computes
//! them exactly as the other two implementations do, so it passes the same conformance
//! suite. The group's NCCL unique id is made by rank 0 and handed out by the coordinator
//! (`CoordinatorClient::nccl_id`). On one GPU the group has a single rank that is both ends.

use std::sync::Arc;
use std::time::Duration;

use expertmesh_coordinator::CoordinatorClient;
use expertmesh_model::cuda::nccl::{unique_id, NcclLink};

use crate::batcher::Batcher;
use crate::dispatch::{Dispatch, DispatchBatch, DispatchError, DispatchFuture, WireDType};

pub struct NcclDispatch {
    link: Arc<NcclLink>,
    batcher: Batcher,
}

impl NcclDispatch {
    pub fn new(link: Arc<NcclLink>, batcher: Batcher) -> Self {
        Self { link, batcher }
    }

    /// A single-rank group on device `ordinal` whose id comes from the coordinators under
    /// `group` (this process offers one; an earlier offer stands), serving `batcher`.
    pub async fn single_rank(
        ordinal: usize,
        coordinators: &CoordinatorClient,
        group: &str,
        batcher: Batcher,
    ) -> Result<Self, DispatchError> {
        let unavailable = |e: &dyn std::fmt::Display| DispatchError::Unavailable(e.to_string());
        let offer = unique_id().map_err(|e| unavailable(&e))?;
        let id = coordinators
            .nccl_id(group, Some(&offer), Duration::from_secs(10))
            .await
            .map_err(|e| unavailable(&e))?;
        let link = tokio::task::spawn_blocking(move || NcclLink::connect(ordinal, 0, 1, 0, &id))
            .await
            .map_err(|e| unavailable(&e))?
            .map_err(|e| unavailable(&e))?;
        Ok(Self::new(Arc::new(link), batcher))
    }

    pub fn link(&self) -> &NcclLink {
        &self.link
    }
}

/// Moves rows to the peer rank in the wire dtype (bf16 travels as NCCL bf16).
async fn carry(
    link: &Arc<NcclLink>,
    dtype: WireDType,
    rows: Vec<f32>,
) -> Result<Vec<f32>, DispatchError> {
    let link = link.clone();
    tokio::task::spawn_blocking(move || match dtype {
        WireDType::F32 => link.transfer(&rows),
        WireDType::Bf16 => {
            let bits: Vec<half::bf16> = rows.iter().map(|v| half::bf16::from_f32(*v)).collect();
            link.transfer(&bits)
                .map(|v| v.into_iter().map(f32::from).collect())
        }
    })
    .await
    .map_err(|e| DispatchError::Unavailable(e.to_string()))?
    .map_err(|e| DispatchError::Unavailable(e.to_string()))
}

impl Dispatch for NcclDispatch {
    fn dispatch(&self, mut batch: DispatchBatch) -> DispatchFuture {
        let (link, batcher) = (self.link.clone(), self.batcher.clone());
        Box::pin(async move {
            let dtype = batch.dtype;
            let rows = std::mem::take(&mut batch.activations);
            batch.activations = carry(&link, dtype, rows).await?;
            let out = batcher.submit(batch).await?;
            carry(&link, dtype, out).await
        })
    }
}
