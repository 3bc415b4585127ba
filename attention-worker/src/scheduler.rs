//! Iteration-level continuous batching over a paged KV cache.
//!
//! The engine thread owns every sequence. Each step it takes new requests, drops those whose
//! client went away, admits waiting sequences while the block pool has room for their
//! prompt (a prompt that begins like one computed before starts from the cached blocks of
//! that prefix, `expertmesh_model::prefix_cache`, and cached blocks are evicted for room
//! before anything is preempted), and builds one batch: one token for every decoding
//! sequence, then prompt chunks of prefilling sequences up to the step's token budget
//! (chunked prefill, so a long prompt never stalls decoding). If the step's KV blocks are
//! not free, the most recently admitted sequence is preempted: its blocks go back to the
//! pool and it is recomputed later from its prompt and the tokens it already produced
//! (exact, since a token's result does not depend on its batch). After the forward pass
//! each sequence publishes its newly full blocks to the prefix cache, and every sequence
//! whose tokens are all in its cache samples its next token and streams it out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertmesh_model::kv_cache::BlockPool;
use expertmesh_model::moe::ExpertRunner;
use expertmesh_model::{
    Constraint, Fault, FinishReason, GenerateRequest, ImageRows, KvCache, LogitRows, Model,
    ModelError, PrefixCache, Sampler, Sequence, TokenLogprobs,
};
use tokio::sync::mpsc;

use crate::sequence::{take_sharing, Grammar, Seq};

/// Scheduler settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// New tokens per step at most (decode tokens plus prefill chunks).
    pub token_budget: usize,
    /// Sequences in the running batch at most.
    pub running_max: usize,
    /// Requests waiting for admission at most; more are refused.
    pub queue_max: usize,
    /// KV blocks in the pool (each holds `block_tokens` positions of one layer).
    pub kv_blocks: usize,
    pub block_tokens: usize,
    /// Keep the full KV blocks of computed prompts for later requests that begin the same
    /// way (prefix caching; host pools only).
    pub prefix_cache: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            token_budget: 512,
            running_max: 64,
            queue_max: 256,
            kv_blocks: 16384,
            block_tokens: 16,
            prefix_cache: true,
        }
    }
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token, with its log-probabilities when the request asked for them.
    Token(u32, Option<TokenLogprobs>),
    /// The prompt's tokens' log-probabilities from the second on, when asked for: sent once
    /// the prompt is prefilled, before the first token.
    PromptLogprobs(Vec<TokenLogprobs>),
    /// `[prompt positions, vocab]`, sent before `Finished` when asked for.
    PromptLogits(Vec<f32>),
    Finished(FinishReason),
    Failed(Failure),
}

/// Why a request ended without finishing, as the client will be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Whose fault it was (`ModelError::fault`).
    pub fault: Fault,
    pub message: String,
}

impl From<&ModelError> for Failure {
    fn from(e: &ModelError) -> Self {
        Self {
            fault: e.fault(),
            message: e.to_string(),
        }
    }
}

/// Counters the engine publishes (read by heartbeats and `/metrics`).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub steps: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// KV blocks held by sequences; blocks only the prefix cache holds count as free.
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub preemptions: AtomicU64,
    /// Time in steps (planning, the forward pass, sampling, handing tokens on), in ns.
    pub step_nanos: AtomicU64,
    /// Time in the forward pass alone, in ns.
    pub forward_nanos: AtomicU64,
    /// Tokens run through the forward pass (prompt chunks and decode tokens).
    pub tokens_forwarded: AtomicU64,
    /// Choices that took another choice's prompt instead of prefilling it.
    pub forks: AtomicU64,
    /// Prefix caching: tokens of the sequences admitted, those of them taken from cached
    /// blocks, blocks the cache holds, and blocks it has given up.
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub prefix_cached_blocks: AtomicU64,
    pub prefix_evicted_blocks: AtomicU64,
}

impl EngineStats {
    pub fn free_blocks(&self) -> u64 {
        self.kv_blocks_total.load(Ordering::Relaxed) - self.kv_blocks_used.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("too many requests waiting ({0})")]
    Overloaded(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the attention worker is draining")]
    Draining,
}

/// What a drained request is told: the cluster's fault, so the gateway moves it on.
const DRAINED: &str = "the attention worker is draining: the request moves to another";

struct Submission {
    request: GenerateRequest,
    prepared: Prepared,
    events: mpsc::Sender<Event>,
}

/// What a request brings beyond its ids, worked out once before the engine takes it.
#[derive(Default)]
pub struct Prepared {
    /// The vision rows of the prompt's `<|patch|>` tokens (`Model::encode_images`, one per
    /// `<|patch|>` of the prompt, checked by the caller); none for text.
    pub images: ImageRows,
    /// The request's grammar, compiled, past the tokens it resumes after (structured
    /// outputs).
    pub constraint: Option<Constraint>,
}

/// Handle to a running engine.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Submission>,
    stats: Arc<EngineStats>,
    queue_max: usize,
    /// Set once: no new request, the running ones failed as `Unavailable` (to migrate).
    draining: Arc<AtomicBool>,
}

impl Engine {
    /// Starts the engine thread. `runner` reaches the routed experts.
    pub fn spawn<R: ExpertRunner + Send + 'static>(
        model: Arc<Model>,
        runner: R,
        config: SchedulerConfig,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_max.max(1));
        let stats = Arc::new(EngineStats::default());
        let pool = model.new_pool(config.block_tokens, config.kv_blocks);
        stats
            .kv_blocks_total
            .store(config.kv_blocks as u64, Ordering::Relaxed);
        let draining = Arc::new(AtomicBool::new(false));
        let prefix = config
            .prefix_cache
            .then(|| PrefixCache::new(pool.clone(), model.config()))
            .flatten();
        let mut scheduler = Scheduler {
            prefix,
            model,
            pool,
            config,
            stats: stats.clone(),
            draining: draining.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            parked: Vec::new(),
        };
        std::thread::Builder::new()
            .name("expertmesh-engine".into())
            .spawn(move || scheduler.run(rx, &runner))
            .expect("spawning the engine thread");
        Self {
            tx,
            stats,
            queue_max: config.queue_max,
            draining,
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Drains the engine: new requests are refused, and the queued and running ones end as
    /// `Unavailable` at the next step, which the gateway answers by resuming them on
    /// another attention worker.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether a drained engine has let go of every request.
    pub fn drained(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
            && self.stats.running.load(Ordering::Relaxed) == 0
            && self.stats.waiting.load(Ordering::Relaxed) == 0
    }

    /// Queues a request (checked by the caller); events arrive on the returned stream.
    /// Dropping the receiver cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        self.submit_with(request, Prepared::default())
    }

    /// `submit` for a request with images or a grammar, `prepared` once, before: chunked
    /// prefill and recompute after preemption take the rows from the request.
    pub fn submit_with(
        &self,
        request: GenerateRequest,
        prepared: Prepared,
    ) -> Result<mpsc::Receiver<Event>, SubmitError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(SubmitError::Draining);
        }
        // Room for every event the request can produce, so the engine never waits on a
        // slow client: tokens, prompt logits and logprobs, the end.
        let (events, rx) = mpsc::channel(request.max_new_tokens + 4);
        self.tx
            .try_send(Submission {
                request,
                prepared,
                events,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => SubmitError::Overloaded(self.queue_max),
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            })?;
        Ok(rx)
    }
}

struct Scheduler {
    /// Computed prefixes kept for later requests (`None`: off, or a device pool).
    prefix: Option<PrefixCache>,
    model: Arc<Model>,
    pool: Arc<BlockPool>,
    config: SchedulerConfig,
    stats: Arc<EngineStats>,
    draining: Arc<AtomicBool>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Choices waiting for another choice of their request to prefill the prompt they share.
    parked: Vec<Seq>,
}

impl Scheduler {
    fn run(&mut self, rx: Receiver<Submission>, runner: &dyn ExpertRunner) {
        loop {
            // Idle: block for work. Busy: take whatever arrived since the last step.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.accept(job);
            }
            if self.draining.load(Ordering::Relaxed) {
                self.let_go();
                continue;
            }
            let started = Instant::now();
            self.step(runner);
            self.publish();
            let nanos = started.elapsed().as_nanos() as u64;
            self.stats.step_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// Ends every request as `Unavailable` (the engine is draining); their caches go back.
    fn let_go(&mut self) {
        let failure = Failure {
            fault: Fault::Unavailable,
            message: DRAINED.into(),
        };
        let parked = self.parked.drain(..);
        for seq in self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .chain(parked)
        {
            seq.send(Event::Failed(failure.clone()));
        }
        self.publish();
    }

    fn accept(&mut self, job: Submission) {
        let r = &job.request;
        let sampler = Sampler::with_adjust(r.sampling, r.adjust.clone(), r.prompt.len());
        // Choices share a prompt's cache only when nothing else is read off its prefill.
        let group = r
            .prompt_group
            .filter(|_| job.prepared.images.rows.is_empty() && !r.prompt_logits)
            .filter(|_| r.prompt_logprobs.is_none());
        let seq = Seq {
            tokens: job.request.prompt.clone(),
            images: job.prepared.images,
            grammar: job.prepared.constraint.map(Grammar::after),
            prompt_logits: job.request.prompt_logits.then(Vec::new),
            prompt_logprobs: job.request.prompt_logprobs.map(|_| Vec::new()),
            request: job.request,
            sampler,
            generated: 0,
            cache: None,
            group,
            prompt_last: None,
            chain: Vec::new(),
            published: 0,
            events: job.events,
        };
        self.place(seq);
    }

    /// Where a new sequence goes: forked off a running choice of its request that has
    /// prefilled the prompt, parked while one is prefilling it, else to wait its turn.
    fn place(&mut self, seq: Seq) {
        if seq.group.is_none() {
            return self.waiting.push_back(seq);
        }
        let prefilled = self
            .running
            .iter()
            .find(|l| l.shares_prompt_with(&seq) && l.prompt_last.is_some());
        if let Some(leader) = prefilled {
            let logits = leader.prompt_last.clone().expect("checked");
            let cache = leader.cache.as_ref();
            let fork = cache.and_then(|c| self.model.fork_cache(c, seq.request.prompt.len()));
            if let Some(cache) = fork {
                return self.start_fork(seq, cache, &logits);
            }
        } else if self
            .running
            .iter()
            .chain(&self.waiting)
            .any(|l| l.shares_prompt_with(&seq))
        {
            return self.parked.push(seq);
        }
        self.waiting.push_back(seq);
    }

    /// A choice whose prompt is in `cache` (forked): samples its first token from the
    /// prompt's `logits`, then runs like any other.
    fn start_fork(&mut self, mut seq: Seq, cache: KvCache, logits: &[f32]) {
        if self.running.len() >= self.config.running_max {
            // No room to run it now: it waits and prefills in its turn.
            return self.waiting.push_back(seq);
        }
        seq.cache = Some(cache);
        self.stats.forks.fetch_add(1, Ordering::Relaxed);
        self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
        match seq.advance(logits) {
            Ok(None) => self.running.push(seq),
            Ok(Some(reason)) => seq.send(Event::Finished(reason)),
            Err(e) => seq.send(Event::Failed(Failure::from(&e))),
        }
    }

    /// Parked choices whose request has no choice left that will prefill their prompt
    /// (it ended, or was preempted) wait their own turn.
    fn unpark_orphans(&mut self) {
        let mut k = 0;
        while k < self.parked.len() {
            let p = &self.parked[k];
            let lead =
                self.running.iter().chain(&self.waiting).any(|l| {
                    l.shares_prompt_with(p) && l.prompt_last.is_none() && l.generated == 0
                });
            if lead {
                k += 1;
            } else {
                let seq = self.parked.swap_remove(k);
                self.waiting.push_back(seq);
            }
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.waiting.store(
            (self.waiting.len() + self.parked.len()) as u64,
            Ordering::Relaxed,
        );
        // Blocks only the prefix cache holds are free for the asking (evicted on demand).
        let evictable = self.prefix.as_ref().map_or(0, PrefixCache::evictable);
        s.kv_blocks_used
            .store((self.pool.used() - evictable) as u64, Ordering::Relaxed);
        if let Some(p) = &self.prefix {
            s.prefix_cached_blocks
                .store(p.blocks() as u64, Ordering::Relaxed);
            s.prefix_evicted_blocks
                .store(p.evicted(), Ordering::Relaxed);
        }
    }

    /// The `<|patch|>` token id (none for a model without vision).
    fn patch(&self) -> u32 {
        self.model
            .vision()
            .map_or(u32::MAX, |v| v.config().image_token_id)
    }

    /// Whether the pool has `blocks` free, evicting cached prefixes for them when that frees
    /// enough (`PrefixCache::make_room`).
    fn make_room(&mut self, blocks: usize) -> bool {
        match self.prefix.as_mut() {
            Some(p) => p.make_room(blocks),
            None => self.pool.available() >= blocks,
        }
    }

    fn step(&mut self, runner: &dyn ExpertRunner) {
        self.running.retain(|s| !s.events.is_closed());
        self.waiting.retain(|s| !s.events.is_closed());
        self.parked.retain(|s| !s.events.is_closed());
        self.unpark_orphans();
        // Admission by free blocks, keeping one block per layer for each running decoder;
        // a cached prefix of the prompt needs none of its own.
        let layers = self.model.config().num_hidden_layers;
        let patch = self.patch();
        while self.running.len() < self.config.running_max {
            let Some(next) = self.waiting.front_mut() else {
                break;
            };
            let reserve = self.running.len() * layers;
            let whole = layers * next.tokens.len().div_ceil(self.pool.block_tokens());
            let cached = self
                .prefix
                .as_mut()
                .and_then(|p| next.cached_prefix(p, patch));
            let need = cached
                .as_ref()
                .map_or(whole, |c| c.blocks_needed(next.tokens.len() - c.next_pos));
            if !self.make_room(need + reserve) && !self.running.is_empty() {
                break;
            }
            if whole > self.config.kv_blocks {
                let seq = self.waiting.pop_front().expect("front exists");
                seq.send(Event::Failed(Failure::from(&ModelError::KvCacheFull {
                    needed: whole,
                    available: self.config.kv_blocks,
                })));
                continue;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            let s = &self.stats;
            if let Some(c) = &cached {
                s.prefix_hit_tokens
                    .fetch_add(c.next_pos as u64, Ordering::Relaxed);
            }
            s.prefix_queried_tokens
                .fetch_add(seq.tokens.len() as u64, Ordering::Relaxed);
            seq.cache = Some(cached.unwrap_or_else(|| self.model.new_cache_in(self.pool.clone())));
            self.running.push(seq);
        }
        if self.running.is_empty() {
            return;
        }
        let plan = loop {
            let plan = self.plan();
            let needed: usize = plan
                .iter()
                .map(|&(i, n)| {
                    self.running[i]
                        .cache
                        .as_ref()
                        .map_or(0, |c| c.blocks_needed(n))
                })
                .sum();
            if self.make_room(needed) || self.running.len() == 1 {
                break plan;
            }
            self.preempt_newest();
        };
        self.run_batch(&plan, runner);
    }

    /// (running index, tokens this step): decoders first, then prefill chunks by budget.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut budget = self.config.token_budget;
        let mut plan = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.pending() == 1 && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let p = s.pending();
            if p > 1 && budget > 0 {
                let n = p.min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        plan.sort_unstable();
        plan
    }

    /// Sends the most recently admitted sequence back to wait, freeing its blocks.
    fn preempt_newest(&mut self) {
        let mut seq = self.running.pop().expect("at least two running");
        seq.cache = None;
        seq.prompt_last = None;
        seq.published = 0;
        // Recollected from the start when the prompt is recomputed.
        if seq.prompt_logits.is_some() {
            seq.prompt_logits = Some(Vec::new());
        }
        if seq.prompt_logprobs.is_some() {
            seq.prompt_logprobs = Some(Vec::new());
        }
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(seq);
    }

    fn run_batch(&mut self, plan: &[(usize, usize)], runner: &dyn ExpertRunner) {
        let want_all = plan.iter().any(|&(i, _)| {
            let s = &self.running[i];
            s.prompt_logits.is_some() || s.prompt_logprobs.is_some()
        });
        let rows = if want_all {
            LogitRows::All
        } else {
            LogitRows::Last
        };
        let patch = self.patch();
        let result = {
            let mut planned = plan.iter().peekable();
            let mut batch: Vec<Sequence<'_>> = Vec::with_capacity(plan.len());
            for (i, s) in self.running.iter_mut().enumerate() {
                if planned.peek().is_some_and(|&&(j, _)| j == i) {
                    let (_, n) = planned.next().expect("peeked");
                    let cache = s.cache.as_mut().expect("running sequences have a cache");
                    let from = cache.next_pos;
                    let mut seq = Sequence::new(cache, &s.tokens[from..from + n]);
                    seq.patches = s.images.chunk(&s.tokens, patch, from, from + n);
                    seq.trace = s.request.trace.unwrap_or(0);
                    batch.push(seq);
                }
            }
            let started = Instant::now();
            let result = self.model.forward_with(&mut batch, rows, runner);
            let nanos = started.elapsed().as_nanos() as u64;
            self.stats.forward_nanos.fetch_add(nanos, Ordering::Relaxed);
            result
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let tokens: usize = plan.iter().map(|&(_, n)| n).sum();
        self.stats
            .tokens_forwarded
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                // The whole batch failed (experts unreachable, say): end those requests.
                let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let seq = self.running.remove(i);
                    seq.send(Event::Failed(Failure::from(&e)));
                }
                return;
            }
        };
        if let Some(p) = self.prefix.as_mut() {
            for &(i, _) in plan {
                self.running[i].keep_prefix(p, patch);
            }
        }
        let vocab = self.model.config().vocab_size;
        let mut row = 0;
        let mut done = Vec::new();
        let mut forked = Vec::new();
        for &(i, n) in plan {
            let seq = &mut self.running[i];
            let rows_of_seq = if want_all { n } else { 1 };
            let last = &out.logits[(row + rows_of_seq - 1) * vocab..(row + rows_of_seq) * vocab];
            if want_all {
                seq.collect_prompt_rows(&out.logits[row * vocab..(row + n) * vocab], vocab);
            }
            row += rows_of_seq;
            if seq.pending() > 0 {
                continue; // a prefill chunk that did not finish the prompt
            }
            if let Some(lps) = seq.prompt_logprobs.take() {
                seq.send(Event::PromptLogprobs(lps));
            }
            if seq.group.is_some() && seq.generated == 0 {
                // The prompt is in: the request's other choices fork it from here on.
                let logits = Arc::new(last.to_vec());
                let waiting = &mut self.waiting;
                let parked = take_sharing(&mut self.parked, seq);
                for f in parked {
                    let cache = seq.cache.as_ref().expect("running sequences have a cache");
                    match self.model.fork_cache(cache, seq.request.prompt.len()) {
                        Some(c) => forked.push((f, c, logits.clone())),
                        None => waiting.push_back(f),
                    }
                }
                seq.prompt_last = Some(logits);
            }
            match seq.advance(last) {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    if let Some(logits) = seq.prompt_logits.take() {
                        seq.send(Event::PromptLogits(logits));
                    }
                    seq.send(Event::Finished(reason));
                    done.push(i);
                }
                Err(e) => {
                    seq.send(Event::Failed(Failure::from(&e)));
                    done.push(i);
                }
            }
            self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
        }
        for i in done.into_iter().rev() {
            self.running.remove(i);
        }
        for (seq, cache, logits) in forked {
            self.start_fork(seq, cache, &logits);
        }
    }
}
