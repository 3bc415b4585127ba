//! `NcclDispatch` (cargo feature `cuda`): the `Dispatch` seam with the routed rows moving
//! between GPU ranks through NCCL. Each batch's activations go from the attention rank to
//! the expert rank, and the outputs back, as one grouped NCCL send and receive each
//! (`expertmesh_model::cuda::nccl::NcclLink`); the expert rank checks, batches and computes
//! them exactly as the other two implementations do, so it passes the same conformance
//! suite. The group's NCCL unique id is made by rank 0 and handed out by the coordinator
//! (`CoordinatorClient::nccl_id`, called by whoever builds the link: this crate does not
//! talk to coordinators). On one GPU the group has a single rank that is both ends.

use std::future::Future;
use std::sync::Arc;

use expertmesh_model::cuda::nccl::{unique_id, NcclLink};

use crate::{Answer, Dispatch, DispatchBatch, DispatchError, DispatchFuture, WireDType};

pub struct NcclDispatch {
    link: Arc<NcclLink>,
    answer: Arc<dyn Answer>,
}

impl NcclDispatch {
    pub fn new(link: Arc<NcclLink>, answer: Arc<dyn Answer>) -> Self {
        Self { link, answer }
    }

    /// A single-rank group on device `ordinal`: this process makes an id offer, `agree`
    /// turns it into the group's id (the coordinators' `nccl_id`: an earlier offer stands),
    /// and the link serves `answer`.
    pub async fn single_rank<F, E>(
        ordinal: usize,
        agree: impl FnOnce(Vec<u8>) -> F,
        answer: Arc<dyn Answer>,
    ) -> Result<Self, DispatchError>
    where
        F: Future<Output = Result<Vec<u8>, E>>,
        E: std::fmt::Display,
    {
        let unavailable = |e: &dyn std::fmt::Display| DispatchError::Unavailable(e.to_string());
        let offer = unique_id().map_err(|e| unavailable(&e))?;
        let id = agree(offer.to_vec()).await.map_err(|e| unavailable(&e))?;
        let link = tokio::task::spawn_blocking(move || NcclLink::connect(ordinal, 0, 1, 0, &id))
            .await
            .map_err(|e| unavailable(&e))?
            .map_err(|e| unavailable(&e))?;
        Ok(Self::new(Arc::new(link), answer))
    }

    pub fn link(&self) -> &NcclLink {
        &self.link
    }
}

/// Moves rows of `hidden` values to the peer rank in the wire dtype (bf16 travels as NCCL
/// bf16; fp8 as the rows' e4m3 codes, u8, then their f32 scales).
async fn carry(
    link: &Arc<NcclLink>,
    dtype: WireDType,
    hidden: usize,
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
        WireDType::Fp8 => {
            let hidden = hidden.max(1);
            let mut codes = vec![0u8; rows.len()];
            let scales: Vec<f32> = codes
                .chunks_exact_mut(hidden)
                .zip(rows.chunks_exact(hidden))
                .map(|(c, r)| expertmesh_model::fp8::quantize_activations(r, c))
                .collect();
            let codes = link.transfer(&codes)?;
            let scales = link.transfer(&scales)?;
            let mut out = vec![0.0f32; codes.len()];
            for ((o, c), s) in out
                .chunks_exact_mut(hidden)
                .zip(codes.chunks_exact(hidden))
                .zip(scales)
            {
                expertmesh_model::fp8::dequantize_activations(c, s, o);
            }
            Ok(out)
        }
    })
    .await
    .map_err(|e| DispatchError::Unavailable(e.to_string()))?
    .map_err(|e| DispatchError::Unavailable(e.to_string()))
}

impl Dispatch for NcclDispatch {
    fn dispatch(&self, mut batch: DispatchBatch) -> DispatchFuture {
        let (link, answer) = (self.link.clone(), self.answer.clone());
        Box::pin(async move {
            let (dtype, hidden) = (batch.dtype, batch.hidden);
            let rows = std::mem::take(&mut batch.activations);
            batch.activations = carry(&link, dtype, hidden, rows).await?;
            let out = answer.answer(batch).await?;
            carry(&link, dtype.reply(), hidden, out).await
        })
    }
}
