//! The CPU backend, the reference every other backend is tested against: f32 compute over
//! the model's weights as the checkpoint stores them, batch-invariant products
//! ([`crate::linear`]), attention per sequence over the host block pool
//! ([`crate::attention`]), rayon for parallelism.

use std::sync::Arc;

use crate::attention::SeqSlice;
use crate::backend::Backend;
use crate::error::Result;
use crate::kv_cache::BlockPool;
use crate::model::{FeedForward, Model, Sequence};
use crate::moe::{route, routed_inputs, Mlp, Moe, PendingExperts, Route, RoutedBatch};
use crate::norm::rms_norm;

/// The CPU backend: the model's own weights are its weights.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuBackend;

/// A micro-batch on the CPU.
pub(crate) struct CpuRows {
    /// `[rows, hidden]`.
    hidden: Vec<f32>,
    /// The current sub-layer's normed input, `[rows, hidden]`.
    x: Vec<f32>,
    rows: usize,
    /// Hidden size.
    h: usize,
}

fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

fn dense_mlp(model: &Model, l: usize) -> &Mlp {
    match &model.layers[l].feed_forward {
        FeedForward::Dense(m) => m,
        FeedForward::Moe(_) => panic!("layer {l} is not a dense layer"),
    }
}

fn moe(model: &Model, l: usize) -> &Moe {
    match &model.layers[l].feed_forward {
        FeedForward::Moe(m) => m,
        FeedForward::Dense(_) => panic!("layer {l} is not a MoE layer"),
    }
}

impl Backend for CpuBackend {
    type Rows = CpuRows;

    fn embed(&self, model: &Model, seqs: &[Sequence<'_>]) -> Result<CpuRows> {
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        Ok(CpuRows {
            hidden: model.embeddings(seqs),
            x: Vec::new(),
            rows,
            h: model.config().hidden_size,
        })
    }

    fn attention(
        &self,
        model: &Model,
        l: usize,
        rows: &mut CpuRows,
        seqs: &mut [Sequence<'_>],
    ) -> Result<()> {
        let c = model.config();
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let layer = &model.layers[l];
        let x = rms_norm(&rows.hidden, h, &layer.input_norm, eps);
        let mut slices: Vec<SeqSlice<'_>> = seqs
            .iter_mut()
            .map(|s| {
                let start_pos = s.cache.next_pos;
                let (pool, cache) = s.cache.layer_mut(l);
                SeqSlice {
                    start_pos,
                    len: s.tokens.len(),
                    pool,
                    cache,
                }
            })
            .collect();
        let attn = layer.attention.forward(&x, rows.rows, &mut slices);
        add_into(&mut rows.hidden, &attn);
        rows.x = rms_norm(&rows.hidden, h, &layer.post_attention_norm, eps);
        Ok(())
    }

    fn dense(&self, model: &Model, l: usize, rows: &mut CpuRows) -> Result<()> {
        let out = dense_mlp(model, l).forward(&rows.x, rows.rows);
        add_into(&mut rows.hidden, &out);
        Ok(())
    }

    fn route(&self, model: &Model, l: usize, rows: &mut CpuRows) -> Result<Vec<Route>> {
        let m = moe(model, l);
        let logits = m.router.forward(&rows.x, rows.rows);
        Ok(route(&logits, m.num_experts))
    }

    fn routed_inputs(&self, rows: &CpuRows, routes: &[Route], order: &[usize]) -> Result<Vec<f32>> {
        Ok(routed_inputs(&rows.x, rows.h, routes, order))
    }

    fn moe_finish(
        &self,
        model: &Model,
        l: usize,
        rows: &mut CpuRows,
        order: &[usize],
        pending: PendingExperts,
    ) -> Result<()> {
        let out = moe(model, l).combine(&rows.x, rows.rows, order, pending)?;
        add_into(&mut rows.hidden, &out);
        Ok(())
    }

    fn logits(&self, model: &Model, micro: Vec<CpuRows>, picked: &[usize]) -> Result<Vec<f32>> {
        let c = model.config();
        let h = c.hidden_size;
        let mut hidden = Vec::with_capacity(micro.iter().map(|m| m.hidden.len()).sum());
        for m in micro {
            hidden.extend(m.hidden);
        }
        // `picked` ascends: when it has every row (all logits, or decoding one token per
        // sequence) the hidden state is the selection as it is.
        let selected = if picked.len() * h == hidden.len() {
            hidden
        } else {
            let mut selected = Vec::with_capacity(picked.len() * h);
            for &r in picked {
                selected.extend_from_slice(&hidden[r * h..(r + 1) * h]);
            }
            selected
        };
        let x = rms_norm(&selected, h, &model.norm, c.rms_norm_eps);
        Ok(model.lm_head.forward(&x, picked.len()))
    }

    fn run_experts(&self, model: &Model, batch: RoutedBatch) -> Result<PendingExperts> {
        let experts = model.routed_experts(batch.layer)?;
        let out = experts.run_groups(&batch.groups, &batch.inputs, batch.hidden);
        Ok(PendingExperts::later(move || Ok(out)))
    }

    fn new_pool(&self, block_tokens: usize, blocks: usize) -> Arc<BlockPool> {
        BlockPool::new(block_tokens, Some(blocks))
    }
}
