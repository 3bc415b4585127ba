//! The Llama 4 text decoder (HF `Llama4ForCausalLM` / the language model of
//! `Llama4ForConditionalGeneration`; LLAMA4.md §2).
//!
//! `forward` runs a batch of sequences, each with its own KV cache and any number of new
//! tokens (a whole prompt, or one token while decoding). Linear layers see the whole batch
//! at once; attention runs per sequence. Embeddings, pre-norm blocks (attention, then a
//! dense or MoE feed-forward), final norm and `lm_head`.

use std::borrow::Borrow;
use std::path::Path;
use std::sync::Arc;

use crate::attention::Attention;
use crate::backend::{with_backend, Backend, Compute};
use crate::checkpoint::{SafetensorsCheckpoint, Tensor, WeightSource};
use crate::config::TextConfig;
use crate::cuda::CudaBackend;
use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockPool, KvCache};
use crate::linear::{Layout, Linear};
use crate::moe::{ExpertRunner, Experts, Mlp, Moe, PendingExperts, Route, RoutedBatch};

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
    /// Where forward passes and local experts run (`Model::to_device`).
    compute: Compute,
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
            compute: Compute::Cpu,
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
        self.compute = match device {
            crate::Device::Cpu => Compute::Cpu,
            crate::Device::Cuda(n) => {
                Compute::Cuda(Arc::new(CudaBackend::new(self, n, precision)?))
            }
        };
        Ok(())
    }

    /// Where forward passes run.
    pub fn device_name(&self) -> String {
        self.compute.name()
    }

    /// An empty cache with its own unbounded block pool (one request at a time); on a GPU,
    /// in the backend's default device pool.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_in(self.compute.default_pool())
    }

    /// A bounded block pool where this model's caches can live (on the device for a GPU).
    pub fn new_pool(&self, block_tokens: usize, blocks: usize) -> Arc<BlockPool> {
        with_backend!(&self.compute, b => b.new_pool(block_tokens, blocks))
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
        self.check_local_experts()?;
        self.forward_with(batch, rows, &self.local_experts())
    }

    /// The runner over this process's experts, computed where the model computes.
    pub fn local_experts(&self) -> LocalExperts<&Model> {
        LocalExperts(self)
    }

    /// `NoLocalExperts` unless this process holds the routed experts of every MoE layer.
    pub fn check_local_experts(&self) -> Result<()> {
        for (l, layer) in self.layers.iter().enumerate() {
            if matches!(layer.feed_forward, FeedForward::Moe(_)) {
                self.routed_experts(l)?;
            }
        }
        Ok(())
    }

    /// The routed experts of decoder layer `layer`, when this process holds them.
    pub(crate) fn routed_experts(&self, layer: usize) -> Result<&Experts> {
        self.layers
            .get(layer)
            .and_then(|l| match &l.feed_forward {
                FeedForward::Moe(m) => m.experts.as_ref(),
                FeedForward::Dense(_) => None,
            })
            .ok_or(ModelError::NoLocalExperts)
    }

    /// Runs a routed batch on the experts this process holds, where the model computes.
    pub fn run_local(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        with_backend!(&self.compute, b => b.run_experts(self, batch))
    }

    /// `forward` with the routed part of every MoE layer going through `runner`: the one
    /// forward pass (`forward::run`) on the model's backend.
    pub fn forward_with(
        &self,
        batch: &mut [Sequence<'_>],
        rows: LogitRows,
        runner: &dyn ExpertRunner,
    ) -> Result<Forward> {
        with_backend!(&self.compute, b => crate::forward::run(b, self, batch, rows, runner))
    }

    /// The embedding rows of the sequences' new tokens, `[tokens, hidden]` in batch order
    /// (gathered on the host: the table stays in the checkpoint's dtype there).
    pub(crate) fn embeddings(&self, seqs: &[Sequence<'_>]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut hidden = vec![0.0f32; rows * h];
        let ids = seqs.iter().flat_map(|s| s.tokens.iter());
        for (row, &id) in hidden.chunks_exact_mut(h).zip(ids) {
            self.embed.read_f32(id as usize * h, row);
        }
        hidden
    }

    /// The smallest batch (in tokens, with two sequences) split into micro-batches.
    pub(crate) fn micro_batch_min_tokens(&self) -> usize {
        self.micro_batch_min_tokens
    }

    /// Sets the smallest batch (in tokens, with at least two sequences) that is split
    /// into two micro-batches; `usize::MAX` turns splitting off.
    pub fn set_micro_batch_min_tokens(&mut self, tokens: usize) {
        self.micro_batch_min_tokens = tokens;
    }
}

/// The routed experts this process holds, computed where the model computes (CPU or GPU):
/// `LocalExperts(&model)` for one call, `LocalExperts(Arc<Model>)` for an engine that owns
/// its runner.
pub struct LocalExperts<M>(pub M);

impl<M: Borrow<Model> + Sync> ExpertRunner for LocalExperts<M> {
    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
        self.0.borrow().run_local(batch)
    }
}
