//! The Llama 4 text decoder (HF `Llama4ForCausalLM` / the language model of
//! `Llama4ForConditionalGeneration`; LLAMA4.md §2).
//!
//! `forward` runs a batch of sequences, each with its own KV cache and any number of new
//! tokens (a whole prompt, or one token while decoding). Linear layers see the whole batch
//! at once; attention runs per sequence. Embeddings, pre-norm blocks (attention, then a
//! dense or MoE feed-forward), final norm and `lm_head`.

use std::path::Path;

use crate::attention::{Attention, SeqSlice};
use crate::checkpoint::{SafetensorsCheckpoint, Tensor, WeightSource};
use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use std::sync::Arc;

use crate::kv_cache::{BlockPool, KvCache};
use crate::linear::{Layout, Linear};
use crate::moe::{
    ExpertRunner, Experts, Mlp, Moe, MoeInFlight, PendingExperts, Route, RoutedBatch,
};
use crate::norm::rms_norm;

// One per layer, built once: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_attention_norm: Vec<f32>,
    pub(crate) attention: Attention,
    pub(crate) feed_forward: FeedForward,
}

/// One sequence of a batch: its cache and its new tokens.
pub struct Sequence<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// The last new token of each sequence (decoding).
    Last,
    /// Every new token (prefill checks, `--dump-logits`).
    All,
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Forward {
    /// `[rows, vocab]` row-major.
    pub logits: Vec<f32>,
    pub rows: usize,
    /// Per MoE layer (in layer order), the route of every new token in batch order.
    pub routes: Vec<Vec<Route>>,
}

impl Forward {
    pub fn row(&self, i: usize) -> &[f32] {
        let vocab = self.logits.len() / self.rows;
        &self.logits[i * vocab..(i + 1) * vocab]
    }
}

/// A loaded model, ready to run.
#[derive(Debug, Clone)]
pub struct Model {
    config: TextConfig,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Linear,
    micro_batch_min_tokens: usize,
    /// The model's copy on a GPU (`Model::to_device`), which then runs every forward pass.
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<crate::cuda::forward::GpuModel>>,
}

/// Batches of at least this many tokens (and two sequences) run as two micro-batches.
pub const MICRO_BATCH_MIN_TOKENS: usize = 16;

impl Model {
    /// Loads `config.json` and the safetensors checkpoint of a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = TextConfig::from_dir(dir)?;
        let ckpt = SafetensorsCheckpoint::open(dir)?;
        Self::from_source(config, &ckpt)
    }

    /// Builds the model from any weight source, checking every tensor's shape.
    pub fn from_source(config: TextConfig, src: &dyn WeightSource) -> Result<Self> {
        Self::build(config, src, true)
    }

    /// Everything but the routed experts: what an attention worker holds. Run it with
    /// `forward_with` and a runner that reaches the experts.
    pub fn without_experts(config: TextConfig, src: &dyn WeightSource) -> Result<Self> {
        Self::build(config, src, false)
    }

    fn build(config: TextConfig, src: &dyn WeightSource, with_experts: bool) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let vector =
            |name: &str| -> Result<Vec<f32>> { Ok(src.tensor_shaped(name, &[h])?.to_f32_vec()) };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let feed_forward = if c.is_moe_layer(l) {
                FeedForward::Moe(Moe::load(src, c, l, with_experts)?)
            } else {
                FeedForward::Dense(Mlp::load(
                    src,
                    &format!("{p}.feed_forward"),
                    h,
                    c.intermediate_size_mlp,
                )?)
            };
            layers.push(Layer {
                input_norm: vector(&format!("{p}.input_layernorm.weight"))?,
                post_attention_norm: vector(&format!("{p}.post_attention_layernorm.weight"))?,
                attention: Attention::load(src, c, l)?,
                feed_forward,
            });
        }
        Ok(Self {
            embed: src.tensor_shaped("model.embed_tokens.weight", &[c.vocab_size, h])?,
            norm: vector("model.norm.weight")?,
            lm_head: Linear::new(
                src.tensor_shaped("lm_head.weight", &[c.vocab_size, h])?,
                Layout::OutIn,
            ),
            layers,
            config,
            micro_batch_min_tokens: MICRO_BATCH_MIN_TOKENS,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// Moves the computation to `device`: for `cuda:N`, every dense weight is copied to the
    /// GPU (the routed experts follow on first use) and later forward passes run there, f32
    /// products over the bf16 weights. Errors without CUDA in the build or the machine.
    pub fn to_device(&mut self, device: crate::Device) -> Result<()> {
        self.to_device_with(device, crate::GemmPrecision::F32)
    }

    /// `to_device` with the products in `precision` (see `GemmPrecision`).
    pub fn to_device_with(
        &mut self,
        device: crate::Device,
        precision: crate::GemmPrecision,
    ) -> Result<()> {
        device.check()?;
        #[cfg(not(feature = "cuda"))]
        let _ = precision;
        #[cfg(feature = "cuda")]
        {
            self.gpu = match device {
                crate::Device::Cpu => None,
                crate::Device::Cuda(n) => Some(Arc::new(crate::cuda::forward::GpuModel::new(
                    self, n, precision,
                )?)),
            };
        }
        Ok(())
    }

    /// Where forward passes run.
    pub fn device_name(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.device.clone();
        }
        "cpu".into()
    }

    /// An empty cache with its own unbounded block pool (one request at a time); on a GPU,
    /// in the model's default device pool.
    pub fn new_cache(&self) -> KvCache {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return self.new_cache_in(gpu.default_pool());
        }
        self.new_cache_in(BlockPool::unbounded())
    }

    /// A bounded block pool where this model's caches can live (on the device for a GPU).
    pub fn new_pool(&self, block_tokens: usize, blocks: usize) -> Arc<BlockPool> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return BlockPool::new_device(block_tokens, blocks);
        }
        BlockPool::new(block_tokens, Some(blocks))
    }

    /// An empty cache whose blocks come from a shared, bounded pool.
    pub fn new_cache_in(&self, pool: Arc<BlockPool>) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.num_hidden_layers,
            c.num_key_value_heads * c.head_dim,
            pool,
        )
    }

    /// Bytes of the weights a decode step reads for `experts_touched` distinct experts per
    /// MoE layer: every dense weight, one embedding row per token is ignored, and the
    /// experts actually used.
    pub fn decode_weight_bytes(&self, experts_touched: &[usize]) -> usize {
        let mut bytes = self.lm_head.size_bytes();
        let mut moe = 0;
        for layer in &self.layers {
            bytes += layer.attention.size_bytes();
            bytes += match &layer.feed_forward {
                FeedForward::Dense(m) => m.size_bytes(),
                FeedForward::Moe(m) => {
                    let touched = experts_touched.get(moe).copied().unwrap_or(1);
                    moe += 1;
                    let expert = m.experts.as_ref().map_or(0, |e| e.expert_bytes());
                    m.dense_size_bytes() + touched * expert
                }
            };
        }
        bytes
    }

    /// Checks a request before it touches any cache.
    pub fn check_tokens(&self, cache: &KvCache, tokens: &[u32], new_tokens: usize) -> Result<()> {
        if tokens.is_empty() && cache.next_pos == 0 {
            return Err(ModelError::EmptyPrompt);
        }
        let vocab = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::TokenOutOfVocab { id, vocab });
        }
        let max = self.config.max_position_embeddings;
        if cache.next_pos + tokens.len() + new_tokens > max {
            return Err(ModelError::ContextExceeded {
                len: cache.next_pos + tokens.len(),
                new: new_tokens,
                max,
            });
        }
        Ok(())
    }

    /// Runs new tokens of every sequence through the model, extending their caches, with
    /// the routed experts held in this process.
    pub fn forward(&self, batch: &mut [Sequence<'_>], rows: LogitRows) -> Result<Forward> {
        self.local_runner()?;
        self.forward_with(batch, rows, &self.experts_runner())
    }

    /// The runner over this process's experts, where the model computes (CPU or GPU).
    pub fn experts_runner(&self) -> impl ExpertRunner + '_ {
        OwnLocalExperts(self)
    }

    /// Runs a routed batch on the experts this process holds, where the model computes.
    pub fn run_local(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.run_local(self, batch);
        }
        self.local_runner()?.start(batch)
    }

    /// The runner over the experts this process holds (`NoLocalExperts` without them).
    pub fn local_runner(&self) -> Result<LocalExperts<'_>> {
        let experts = self
            .layers
            .iter()
            .filter_map(|l| match &l.feed_forward {
                FeedForward::Moe(m) => Some(m.experts.as_ref().ok_or(ModelError::NoLocalExperts)),
                FeedForward::Dense(_) => None,
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalExperts { experts })
    }

    /// `forward` with the routed part of every MoE layer going through `runner`.
    pub fn forward_with(
        &self,
        batch: &mut [Sequence<'_>],
        rows: LogitRows,
        runner: &dyn ExpertRunner,
    ) -> Result<Forward> {
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::EmptyPrompt);
            }
            self.check_tokens(s.cache, s.tokens, 0)?;
        }
        runner.begin_step();
        // Every block the step takes must be there before anything changes.
        let mut needed: Vec<(*const BlockPool, usize, usize)> = Vec::new();
        for s in batch.iter() {
            let pool = Arc::as_ptr(s.cache.pool());
            let n = s.cache.blocks_needed(s.tokens.len());
            match needed.iter_mut().find(|(p, _, _)| *p == pool) {
                Some(entry) => entry.1 += n,
                None => needed.push((pool, n, s.cache.pool().available())),
            }
        }
        if let Some(&(_, n, available)) = needed.iter().find(|(_, n, a)| n > a) {
            return Err(ModelError::KvCacheFull {
                needed: n,
                available,
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.forward(self, batch, rows, runner);
        }
        let c = &self.config;
        let h = c.hidden_size;
        let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut hidden = vec![0.0f32; t * h];
        let ids = batch.iter().flat_map(|s| s.tokens.iter());
        for (row, &id) in hidden.chunks_exact_mut(h).zip(ids) {
            self.embed.read_f32(id as usize * h, row);
        }

        let split = self.micro_batch_split(batch);
        let (first, second) = batch.split_at_mut(split);
        let first_rows: usize = first.iter().map(|s| s.tokens.len()).sum();
        let second_hidden = hidden.split_off(first_rows * h);
        let mut micro = vec![MicroBatch::new(first, hidden)];
        if !second.is_empty() {
            micro.push(MicroBatch::new(second, second_hidden));
        }

        let mut moe_index = 0;
        for (l, layer) in self.layers.iter().enumerate() {
            // Ping-pong: every micro-batch runs attention and sends its routed tokens
            // before any waits, so one computes while the other's tokens are away.
            let mut flights = Vec::with_capacity(micro.len());
            for mb in micro.iter_mut() {
                flights.push(self.layer_start(mb, l, layer, moe_index, runner)?);
            }
            for (mb, flight) in micro.iter_mut().zip(flights) {
                if let (FeedForward::Moe(moe), Some((x, flight))) = (&layer.feed_forward, flight) {
                    let (out, routes) = moe.finish(flight, &x, mb.rows)?;
                    mb.hidden.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
                    mb.routes.push(routes);
                }
            }
            if matches!(layer.feed_forward, FeedForward::Moe(_)) {
                moe_index += 1;
            }
        }
        for s in micro.iter_mut().flat_map(|mb| mb.seqs.iter_mut()) {
            s.cache.next_pos += s.tokens.len();
        }

        let mut routes = vec![Vec::new(); moe_index];
        let mut hidden = Vec::with_capacity(t * h);
        for mb in micro {
            for (all, r) in routes.iter_mut().zip(mb.routes) {
                all.extend(r);
            }
            hidden.extend(mb.hidden);
        }
        let selected: Vec<f32> = match rows {
            LogitRows::All => hidden,
            LogitRows::Last => {
                let mut end = 0;
                let mut out = Vec::with_capacity(batch.len() * h);
                for s in batch.iter() {
                    end += s.tokens.len();
                    out.extend_from_slice(&hidden[(end - 1) * h..end * h]);
                }
                out
            }
        };
        let n = selected.len() / h;
        let x = rms_norm(&selected, h, &self.norm, c.rms_norm_eps);
        Ok(Forward {
            logits: self.lm_head.forward(&x, n),
            rows: n,
            routes,
        })
    }

    /// Where the batch splits into two micro-batches (sequences before the index go first),
    /// or `batch.len()` for no split: only batches of at least two sequences and
    /// `micro_batch_min_tokens` tokens are split, at the sequence nearest half the tokens.
    fn micro_batch_split(&self, batch: &[Sequence<'_>]) -> usize {
        let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if batch.len() < 2 || t < self.micro_batch_min_tokens {
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

    /// Attention and, for a dense layer, the whole feed-forward of one micro-batch; for a
    /// MoE layer, the routed tokens are sent and the normed input is returned with them.
    fn layer_start(
        &self,
        mb: &mut MicroBatch<'_, '_>,
        l: usize,
        layer: &Layer,
        moe_index: usize,
        runner: &dyn ExpertRunner,
    ) -> Result<Option<(Vec<f32>, MoeInFlight)>> {
        let c = &self.config;
        let h = c.hidden_size;
        let x = rms_norm(&mb.hidden, h, &layer.input_norm, c.rms_norm_eps);
        let mut slices: Vec<SeqSlice<'_>> = mb
            .seqs
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
        let attn = layer.attention.forward(&x, mb.rows, &mut slices);
        mb.hidden.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);
        let x = rms_norm(&mb.hidden, h, &layer.post_attention_norm, c.rms_norm_eps);
        match &layer.feed_forward {
            FeedForward::Dense(mlp) => {
                let out = mlp.forward(&x, mb.rows);
                mb.hidden.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
                Ok(None)
            }
            FeedForward::Moe(moe) => {
                let flight = moe.start(&x, mb.rows, moe_index, l, runner)?;
                Ok(Some((x, flight)))
            }
        }
    }

    /// Sets the smallest batch (in tokens, with at least two sequences) that is split
    /// into two micro-batches; `usize::MAX` turns splitting off.
    pub fn set_micro_batch_min_tokens(&mut self, tokens: usize) {
        self.micro_batch_min_tokens = tokens;
    }
}

/// Some sequences of a batch and their hidden state, moving through the layers together.
struct MicroBatch<'b, 's> {
    seqs: &'b mut [Sequence<'s>],
    hidden: Vec<f32>,
    rows: usize,
    /// Per MoE layer so far, the routes of this micro-batch's tokens.
    routes: Vec<Vec<Route>>,
}

impl<'b, 's> MicroBatch<'b, 's> {
    fn new(seqs: &'b mut [Sequence<'s>], hidden: Vec<f32>) -> Self {
        let rows = seqs.iter().map(|s| s.tokens.len()).sum();
        Self {
            seqs,
            hidden,
            rows,
            routes: Vec::new(),
        }
    }
}

/// Routed experts computed in this process, from the model's own expert tensors.
pub struct LocalExperts<'a> {
    /// Per MoE layer, in order.
    experts: Vec<&'a Experts>,
}

impl ExpertRunner for LocalExperts<'_> {
    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        let out =
            self.experts[batch.moe_index].run_groups(&batch.groups, &batch.inputs, batch.hidden);
        Ok(PendingExperts::later(move || Ok(out)))
    }
}

/// The routed experts of a shared model, for engines that own their runner.
pub struct OwnedLocalExperts(pub Arc<Model>);

impl ExpertRunner for OwnedLocalExperts {
    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        self.0.run_local(batch)
    }
}

/// The model's own experts, where the model computes (`Model::run_local`).
struct OwnLocalExperts<'a>(&'a Model);

impl ExpertRunner for OwnLocalExperts<'_> {
    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        self.0.run_local(batch)
    }
}
