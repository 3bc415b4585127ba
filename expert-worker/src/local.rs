//! `InProcessDispatch`: the `Dispatch` seam straight into a shard's batcher in this process,
//! with the same checks, batching, deadlines and dtype rounding as the wire path.

use crate::batcher::Batcher;
use crate::dispatch::{Dispatch, DispatchBatch, DispatchFuture};

pub struct InProcessDispatch {
    batcher: Batcher,
}

impl InProcessDispatch {
    pub fn new(batcher: Batcher) -> Self {
        Self { batcher }
    }
}

impl Dispatch for InProcessDispatch {
    fn dispatch(&self, mut batch: DispatchBatch) -> DispatchFuture {
        let batcher = self.batcher.clone();
        Box::pin(async move {
            let dtype = batch.dtype;
            batch
                .activations
                .iter_mut()
                .for_each(|v| *v = dtype.round(*v));
            let mut out = batcher.submit(batch).await?;
            out.iter_mut().for_each(|v| *v = dtype.round(*v));
            Ok(out)
        })
    }
}
