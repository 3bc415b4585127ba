//! Random Llama 4 models of any shape, built in memory, for benchmarks and tests that need
//! a model bigger than the fixtures. Weights are bf16, drawn from a counter-based hash so
//! that building is parallel and the same seed gives the same model.

use rayon::prelude::*;
use serde_json::json;

use crate::checkpoint::{DType, InMemoryWeights, Tensor};
use crate::config::TextConfig;
use crate::error::Result;
use crate::sampling::mix64;

/// The shape of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub expert_inter: usize,
    pub dense_inter: usize,
    pub vocab: usize,
    pub chunk: usize,
    /// MoE every `moe_step`-th layer (2 = Maverick's interleave).
    pub moe_step: usize,
    pub seed: u64,
}

impl SyntheticSpec {
    /// The Maverick-shaped benchmark model of the engine issue: hidden 1024, 8 layers,
    /// 16/4 heads of 64, 128 experts of 512 plus a shared expert, MoE every 2nd layer,
    /// dense 2048, vocabulary 32000, chunk 8192.
    pub fn bench_maverick() -> Self {
        Self {
            hidden: 1024,
            layers: 8,
            heads: 16,
            kv_heads: 4,
            head_dim: 64,
            experts: 128,
            expert_inter: 512,
            dense_inter: 2048,
            vocab: 32000,
            chunk: 8192,
            moe_step: 2,
            seed: 0,
        }
    }

    pub fn config(&self) -> Result<TextConfig> {
        TextConfig::from_json(&json!({
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.experts,
            "intermediate_size": self.expert_inter,
            "intermediate_size_mlp": self.dense_inter,
            "vocab_size": self.vocab,
            "attention_chunk_size": self.chunk,
            "interleave_moe_layer_step": self.moe_step,
            "use_qk_norm": false,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
        }))
    }

    /// Builds the config and every tensor a `Model` loads.
    pub fn build(&self) -> Result<(TextConfig, InMemoryWeights)> {
        let c = self.config()?;
        let mut w = InMemoryWeights::default();
        let mut id = 0u64;
        let mut rnd = |shape: Vec<usize>, fan_in: usize| {
            id += 1;
            random_bf16(shape, fan_in, self.seed, id)
        };
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        w.insert("model.embed_tokens.weight", rnd(vec![self.vocab, h], 1));
        w.insert("lm_head.weight", rnd(vec![self.vocab, h], h));
        w.insert("model.norm.weight", ones(h));
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            w.insert(format!("{p}.input_layernorm.weight"), ones(h));
            w.insert(format!("{p}.post_attention_layernorm.weight"), ones(h));
            w.insert(format!("{p}.self_attn.q_proj.weight"), rnd(vec![q, h], h));
            w.insert(format!("{p}.self_attn.k_proj.weight"), rnd(vec![kv, h], h));
            w.insert(format!("{p}.self_attn.v_proj.weight"), rnd(vec![kv, h], h));
            w.insert(format!("{p}.self_attn.o_proj.weight"), rnd(vec![h, q], q));
            let f = format!("{p}.feed_forward");
            if c.is_moe_layer(l) {
                let (e, i) = (self.experts, self.expert_inter);
                w.insert(format!("{f}.router.weight"), rnd(vec![e, h], h));
                w.insert(
                    format!("{f}.experts.gate_up_proj"),
                    rnd(vec![e, h, 2 * i], h),
                );
                w.insert(format!("{f}.experts.down_proj"), rnd(vec![e, i, h], i));
                w.insert(
                    format!("{f}.shared_expert.gate_proj.weight"),
                    rnd(vec![i, h], h),
                );
                w.insert(
                    format!("{f}.shared_expert.up_proj.weight"),
                    rnd(vec![i, h], h),
                );
                w.insert(
                    format!("{f}.shared_expert.down_proj.weight"),
                    rnd(vec![h, i], i),
                );
            } else {
                let i = self.dense_inter;
                w.insert(format!("{f}.gate_proj.weight"), rnd(vec![i, h], h));
                w.insert(format!("{f}.up_proj.weight"), rnd(vec![i, h], h));
                w.insert(format!("{f}.down_proj.weight"), rnd(vec![h, i], i));
            }
        }
        Ok((c, w))
    }
}

fn ones(n: usize) -> Tensor {
    Tensor::bf16_from_f32(vec![n], &vec![1.0; n])
}

/// Uniform values in ±sqrt(3 / fan_in) (unit variance after the product), as bf16.
fn random_bf16(shape: Vec<usize>, fan_in: usize, seed: u64, tensor: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let bound = (3.0 / fan_in as f64).sqrt() as f32;
    let base = mix64(seed ^ tensor.wrapping_mul(0xA24B_AED4_963E_E407));
    let mut bytes = vec![0u8; n * 2];
    bytes
        .par_chunks_mut(2 * 4096)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, b) in chunk.chunks_exact_mut(2).enumerate() {
                let r = mix64(base.wrapping_add((c * 4096 + i) as u64));
                let u = (r >> 40) as f32 / (1u64 << 24) as f32;
                let v = half::bf16::from_f32((2.0 * u - 1.0) * bound);
                b.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        });
    Tensor::from_bytes(DType::BF16, shape, bytes)
}
