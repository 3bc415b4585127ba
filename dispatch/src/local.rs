//! `InProcessDispatch`: the `Dispatch` seam straight into an [`Answer`] in this process (an
//! expert worker's batcher), with the same checks, batching, deadlines and dtype rounding as
//! the wire path.

use std::sync::Arc;

use crate::{Answer, Dispatch, DispatchBatch, DispatchFuture};

pub struct InProcessDispatch {
    answer: Arc<dyn Answer>,
}

impl InProcessDispatch {
    pub fn new(answer: Arc<dyn Answer>) -> Self {
        Self { answer }
    }
}

impl Dispatch for InProcessDispatch {
    fn dispatch(&self, mut batch: DispatchBatch) -> DispatchFuture {
        let answer = self.answer.clone();
        Box::pin(async move {
            let (dtype, hidden) = (batch.dtype, batch.hidden);
            dtype.carry(&mut batch.activations, hidden);
            let mut out = answer.answer(batch).await?;
            dtype.reply().carry(&mut out, hidden);
            Ok(out)
        })
    }
}
