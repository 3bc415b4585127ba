//! One sequence of the engine: its request, its tokens and cache, its grammar, what it reads
//! off its prefill, its place in the prefix cache, and the sampling of its next token.

use std::sync::Arc;

use expertmesh_model::{
    logprobs, prompt_logprobs, ChainKey, Constraint, FinishReason, GenerateRequest, ImageRows,
    KvCache, ModelError, PrefixCache, Sampler, TokenLogprobs, TokenMask,
};
use tokio::sync::mpsc;

use crate::scheduler::Event;

/// A sequence's grammar: the mask of its next token, or that mask being computed on a
/// rayon thread while the engine runs the step's forward pass (it is needed only when the
/// sequence samples).
pub(crate) enum Grammar {
    Ready(Constraint, TokenMask),
    Computing(std::sync::mpsc::Receiver<Result<(Constraint, TokenMask), ModelError>>),
}

impl Grammar {
    /// Starts computing the mask that follows `constraint`'s state.
    pub(crate) fn after(mut constraint: Constraint) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rayon::spawn(move || {
            let _ = tx.send(constraint.mask().map(|m| (constraint, m)));
        });
        Self::Computing(rx)
    }

    /// The constraint and its mask, waiting for the mask if it is still being computed.
    fn ready(&mut self) -> Result<(&mut Constraint, &TokenMask), ModelError> {
        if let Self::Computing(rx) = self {
            let (c, m) = rx.recv().map_err(|_| ModelError::Grammar {
                reason: "the mask computation panicked".into(),
            })??;
            *self = Self::Ready(c, m);
        }
        match self {
            Self::Ready(c, m) => Ok((c, m)),
            Self::Computing(_) => unreachable!("just made ready"),
        }
    }
}

pub(crate) struct Seq {
    pub(crate) request: GenerateRequest,
    pub(crate) sampler: Sampler,
    /// Prompt, then every generated token.
    pub(crate) tokens: Vec<u32>,
    /// The vision rows of the prompt's `<|patch|>` tokens (none for text).
    pub(crate) images: ImageRows,
    pub(crate) generated: usize,
    pub(crate) cache: Option<KvCache>,
    pub(crate) prompt_logits: Option<Vec<f32>>,
    /// Collected while the prompt is prefilled when asked for; `None` once sent.
    pub(crate) prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// Structured outputs: where the sequence stands in its grammar.
    pub(crate) grammar: Option<Grammar>,
    /// The request's choices share this key (`GenerateRequest::prompt_group`): the first
    /// to prefill the prompt lends its cache to the others.
    pub(crate) group: Option<u64>,
    /// The logits after the prompt, kept while other choices may still fork this one.
    pub(crate) prompt_last: Option<Arc<Vec<f32>>>,
    /// Prefix caching: the names of the token blocks so far, and how many of them are
    /// published.
    pub(crate) chain: Vec<ChainKey>,
    pub(crate) published: usize,
    pub(crate) events: mpsc::Sender<Event>,
}

/// Takes out of `parked` the choices that share `leader`'s prompt.
pub(crate) fn take_sharing(parked: &mut Vec<Seq>, leader: &Seq) -> Vec<Seq> {
    let (sharing, others) = std::mem::take(parked)
        .into_iter()
        .partition(|p| p.shares_prompt_with(leader));
    *parked = others;
    sharing
}

impl Seq {
    /// Keeps what the request reads off its prefill from `rows`, the logits of the `n`
    /// positions this step ran (`[n, vocab]`, ending at the cache's next position): the
    /// prompt's logits, its tokens' logprobs.
    pub(crate) fn collect_prompt_rows(&mut self, rows: &[f32], vocab: usize) {
        let n = rows.len() / vocab;
        let prompt = &self.request.prompt;
        if let Some(logits) = self.prompt_logits.as_mut() {
            if logits.len() < prompt.len() * vocab {
                let take = (prompt.len() * vocab - logits.len()).min(n * vocab);
                logits.extend_from_slice(&rows[..take]);
            }
        }
        if let (Some(lps), Some(top)) =
            (self.prompt_logprobs.as_mut(), self.request.prompt_logprobs)
        {
            // Row k is position `from + k`, which predicts the token after it.
            let from = self.cache.as_ref().map_or(0, |c| c.next_pos) - n;
            if from == lps.len() && from + 1 < prompt.len() {
                let upto = (from + n).min(prompt.len() - 1);
                let rows = &rows[..(upto - from) * vocab];
                lps.extend(prompt_logprobs(rows, vocab, &prompt[from..=upto], top));
            }
        }
    }

    /// Whether `other` is a choice of the same request: it can take this one's prompt.
    pub(crate) fn shares_prompt_with(&self, other: &Seq) -> bool {
        self.group.is_some()
            && self.group == other.group
            && self.request.prompt == other.request.prompt
    }

    /// The cache of the longest cached prefix of the sequence, when it reads nothing off
    /// its prompt's prefill (prompt logits and logprobs need every position computed).
    pub(crate) fn cached_prefix(
        &mut self,
        prefix: &mut PrefixCache,
        patch: u32,
    ) -> Option<KvCache> {
        if self.prompt_logits.is_some() || self.prompt_logprobs.is_some() {
            return None;
        }
        let blocks = self.tokens.len() / prefix.block_tokens();
        let (tokens, images) = (&self.tokens, &self.images);
        prefix.extend(&mut self.chain, tokens, blocks, |from, to| {
            images.chunk(tokens, patch, from, to)
        });
        prefix.lookup(&self.chain, self.tokens.len())
    }

    /// Publishes the full blocks of the sequence's cache not published yet.
    pub(crate) fn keep_prefix(&mut self, prefix: &mut PrefixCache, patch: u32) {
        let Some(cache) = self.cache.as_ref() else {
            return;
        };
        let full = cache.next_pos / prefix.block_tokens();
        if full <= self.published {
            return;
        }
        let (tokens, images) = (&self.tokens, &self.images);
        prefix.extend(&mut self.chain, tokens, full, |from, to| {
            images.chunk(tokens, patch, from, to)
        });
        prefix.publish(&self.chain[..full], cache);
        self.published = full;
    }

    pub(crate) fn pending(&self) -> usize {
        self.tokens.len() - self.cache.as_ref().map_or(0, |c| c.next_pos)
    }

    pub(crate) fn send(&self, e: Event) {
        // The channel holds every event a request can produce; a closed one means the
        // client left, which the next step notices.
        let _ = self.events.try_send(e);
    }

    /// Samples one token; returns why the sequence ends, if it does (a grammar that failed
    /// ends it with its error).
    pub(crate) fn advance(&mut self, logits: &[f32]) -> Result<Option<FinishReason>, ModelError> {
        if self.generated >= self.request.max_new_tokens {
            return Ok(Some(FinishReason::Length));
        }
        let (constraint, mask) = match self.grammar.as_mut() {
            Some(g) => g.ready().map(|(c, m)| (Some(c), Some(m)))?,
            None => (None, None),
        };
        let id = self.sampler.next(
            logits,
            &self.tokens,
            self.generated,
            &self.request.stop_ids,
            mask,
        );
        let mut complete = false;
        if let Some(c) = constraint {
            c.consume(id)?;
            complete = c.is_done();
        }
        if let Some(Grammar::Ready(c, _)) = self.grammar.take() {
            self.grammar = (!complete).then(|| Grammar::after(c));
        }
        let lp = self.request.logprobs.map(|top| logprobs(logits, id, top));
        self.tokens.push(id);
        self.generated += 1;
        self.send(Event::Token(id, lp));
        Ok(if self.request.stop_ids.contains(&id) || complete {
            Some(FinishReason::Stop)
        } else if self.generated >= self.request.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        })
    }
}
