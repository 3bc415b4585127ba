//! The forward pass, once for every backend (`Model::forward_with`; HF
//! `Llama4TextModel.forward`, LLAMA4.md §2).
//!
//! 1. Check every sequence (tokens in the vocabulary, room in the context) and reserve: the
//!    blocks the step takes must be free before anything changes.
//! 2. Split the batch into at most two micro-batches (`micro_batch_split`) and embed each.
//! 3. Per layer, ping-pong: every micro-batch runs attention (the caches grow by its new
//!    tokens; RoPE layers then give back the blocks of finished chunks) and, for a MoE
//!    layer, routes its rows and sends the routed part through the [`ExpertRunner`], before
//!    any micro-batch waits; then each finishes its feed-forward (dense MLP, or shared expert
//!    + routed outputs), so one computes while the other's tokens are at the experts.
//! 4. Advance every cache by its new tokens; final norm and `lm_head` over the logit rows.
//!
//! The arithmetic lives in the backend ([`Backend`]); this file decides only what runs when.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{ModelError, Result};
use crate::kv_cache::BlockPool;
use crate::model::{FeedForward, Forward, LogitRows, Model, Sequence};
use crate::moe::{plan_groups, ExpertRunner, PendingExperts, Route, RoutedBatch};

/// Some sequences of a batch and their rows on the backend, moving through the layers.
struct MicroBatch<'b, 's, R> {
    seqs: &'b mut [Sequence<'s>],
    rows: R,
    /// Per MoE layer so far, the routes of this micro-batch's tokens.
    routes: Vec<Vec<Route>>,
}

/// A MoE layer's routed rows, away at the experts.
struct InFlight {
    routes: Vec<Route>,
    /// Batch row of each routed row.
    order: Vec<usize>,
    pending: PendingExperts,
}

/// The forward pass of `model` on backend `b` (see the module doc).
pub(crate) fn run<B: Backend>(
    b: &B,
    model: &Model,
    batch: &mut [Sequence<'_>],
    rows: LogitRows,
    runner: &dyn ExpertRunner,
) -> Result<Forward> {
    for s in batch.iter() {
        if s.tokens.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        model.check_tokens(s.cache, s.tokens, 0)?;
        model.check_patches(s)?;
    }
    runner.begin_step();
    reserve(batch)?;
    if batch.is_empty() {
        return Ok(Forward {
            logits: Vec::new(),
            rows: 0,
            routes: vec![Vec::new(); model.config().moe_layers.len()],
        });
    }
    b.check_caches(batch)?;
    b.exclusive(|| layers(b, model, batch, rows, runner))
}

/// Fails with `KvCacheFull` unless every pool has the blocks the step takes.
fn reserve(batch: &[Sequence<'_>]) -> Result<()> {
    let mut needed: Vec<(*const BlockPool, usize, usize)> = Vec::new();
    for s in batch {
        let pool = Arc::as_ptr(s.cache.pool());
        let n = s.cache.blocks_needed(s.tokens.len());
        match needed.iter_mut().find(|(p, _, _)| *p == pool) {
            Some(entry) => entry.1 += n,
            None => needed.push((pool, n, s.cache.pool().available())),
        }
    }
    match needed.iter().find(|(_, n, a)| n > a) {
        Some(&(_, needed, available)) => Err(ModelError::KvCacheFull { needed, available }),
        None => Ok(()),
    }
}

/// Steps 2–4 of the module doc, on a checked and reserved batch.
fn layers<B: Backend>(
    b: &B,
    model: &Model,
    batch: &mut [Sequence<'_>],
    rows: LogitRows,
    runner: &dyn ExpertRunner,
) -> Result<Forward> {
    let picked = logit_rows(batch, rows);
    let split = match runner.overlaps() {
        true => micro_batch_split(batch, model.micro_batch_min_tokens()),
        false => batch.len(),
    };
    let (first, second) = batch.split_at_mut(split);
    let mut micro = Vec::with_capacity(2);
    for seqs in [first, second] {
        if !seqs.is_empty() {
            micro.push(MicroBatch {
                rows: b.embed(model, seqs)?,
                seqs,
                routes: Vec::new(),
            });
        }
    }
    let mut moe_index = 0;
    for (l, layer) in model.layers.iter().enumerate() {
        let mut flights = Vec::with_capacity(micro.len());
        for mb in micro.iter_mut() {
            flights.push(layer_start(b, model, l, moe_index, mb, runner)?);
        }
        for (mb, flight) in micro.iter_mut().zip(flights) {
            if let Some(f) = flight {
                b.moe_finish(model, l, &mut mb.rows, &f.order, f.pending)?;
                mb.routes.push(f.routes);
            }
        }
        if matches!(layer.feed_forward, FeedForward::Moe(_)) {
            moe_index += 1;
        }
    }
    let mut routes = vec![Vec::new(); moe_index];
    let mut states = Vec::with_capacity(micro.len());
    for mb in micro {
        for s in mb.seqs.iter_mut() {
            s.cache.next_pos += s.tokens.len();
        }
        for (all, r) in routes.iter_mut().zip(mb.routes) {
            all.extend(r);
        }
        states.push(mb.rows);
    }
    Ok(Forward {
        logits: b.logits(model, states, &picked)?,
        rows: picked.len(),
        routes,
    })
}

/// Attention of one micro-batch at layer `l` and then its dense feed-forward, or, for a MoE
/// layer, its routed rows sent on their way.
fn layer_start<B: Backend>(
    b: &B,
    model: &Model,
    l: usize,
    moe_index: usize,
    mb: &mut MicroBatch<'_, '_, B::Rows>,
    runner: &dyn ExpertRunner,
) -> Result<Option<InFlight>> {
    b.attention(model, l, &mut mb.rows, mb.seqs)?;
    let layer = &model.layers[l];
    let attention = &layer.attention;
    if attention.use_rope {
        // Chunked layers keep only the chunk the next token falls in; the backend has
        // finished (or, on a device, queued in order) every read of the older blocks.
        for s in mb.seqs.iter_mut() {
            let end = s.cache.next_pos + s.tokens.len();
            let (pool, cache) = s.cache.layer_mut(l);
            cache.drop_before(pool, end - end % attention.chunk);
        }
    }
    if matches!(layer.feed_forward, FeedForward::Dense(_)) {
        b.dense(model, l, &mut mb.rows)?;
        return Ok(None);
    }
    let routes = b.route(model, l, &mut mb.rows)?;
    let (groups, order) = plan_groups(&routes);
    let inputs = b.routed_inputs(&mb.rows, &routes, &order)?;
    let pending = runner.start(RoutedBatch {
        moe_index,
        layer: l,
        groups,
        hidden: model.config().hidden_size,
        inputs,
        traces: mb
            .seqs
            .iter()
            .map(|s| s.trace)
            .filter(|&t| t != 0)
            .collect(),
    })?;
    Ok(Some(InFlight {
        routes,
        order,
        pending,
    }))
}

/// The batch rows (over all sequences, in order) that get logits.
fn logit_rows(batch: &[Sequence<'_>], rows: LogitRows) -> Vec<usize> {
    let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
    match rows {
        LogitRows::All => (0..t).collect(),
        LogitRows::Last => {
            let mut end = 0;
            batch
                .iter()
                .map(|s| {
                    end += s.tokens.len();
                    end - 1
                })
                .collect()
        }
    }
}

/// Where the batch splits into two micro-batches (sequences before the index go first),
/// or `batch.len()` for no split: only batches of at least two sequences and `min_tokens`
/// tokens are split, at the sequence nearest half the tokens.
pub(crate) fn micro_batch_split(batch: &[Sequence<'_>], min_tokens: usize) -> usize {
    let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
    if batch.len() < 2 || t < min_tokens {
        return batch.len();
    }
    let mut rows = 0;
    for (i, s) in batch.iter().enumerate() {
        rows += s.tokens.len();
        if 2 * rows >= t {
            return (i + 1).min(batch.len() - 1);
        }
    }
    batch.len() - 1
}
