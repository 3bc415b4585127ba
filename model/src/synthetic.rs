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
        TextConfig::from_json(&self.config_json())
    }

    /// The `config.json` of this model, as a checkpoint directory of it would hold.
    pub fn config_json(&self) -> serde_json::Value {
        json!({
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
        })
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

/// The routed experts of a built synthetic model converted to the compressed-tensors FP8
/// layout (`fp8::quantize_fused_expert`), with the matching `quantization_config`: the FP8
/// twin of the same model, for side-by-side benchmarks.
pub fn to_fp8(config: &TextConfig, weights: &mut InMemoryWeights) -> Result<TextConfig> {
    use crate::checkpoint::WeightSource;
    for &l in &config.moe_layers {
        let p = format!("model.layers.{l}.feed_forward.experts");
        let gate_up = weights.tensor(&format!("{p}.gate_up_proj"))?;
        let down = weights.tensor(&format!("{p}.down_proj"))?;
        for e in 0..config.num_local_experts {
            for (proj, w, scale) in
                crate::fp8::quantize_fused_expert(&gate_up.outer(e), &down.outer(e))
            {
                weights.insert(format!("{p}.{e}.{proj}.weight"), w);
                weights.insert(format!("{p}.{e}.{proj}.weight_scale"), scale);
            }
        }
        weights.remove(&format!("{p}.gate_up_proj"));
        weights.remove(&format!("{p}.down_proj"));
    }
    let quantization = crate::quant::Quantization::from_json(
        json!({"quantization_config": {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                    "symmetric": true, "dynamic": true}}},
            "ignore": ["re:^(model\\.layers\\.\\d+\\.(self_attn|feed_forward\\.(router|shared_expert|gate_proj|up_proj|down_proj))|lm_head).*"]
        }})
        .as_object()
        .expect("an object"),
    )?;
    Ok(TextConfig {
        quantization,
        ..config.clone()
    })
}

/// The shape of a synthetic vision tower, in the Llama 4 layout: tiles of `image_size`
/// pixels in patches of 14, a 2×2 pixel shuffle, the adapter and the projector to the text
/// model's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticVisionSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub image_size: usize,
    pub projector_dim: usize,
    pub seed: u64,
}

impl SyntheticVisionSpec {
    /// The benchmark model's tower: Maverick's tile geometry (336 pixels, 576 patches, 144
    /// rows per tile) with the width and depth cut as the text model's are — hidden 256
    /// (Maverick 1408), 8 layers (34), 4 heads of 64, adapter 1024 (4096).
    pub fn bench() -> Self {
        Self {
            hidden: 256,
            layers: 8,
            heads: 4,
            image_size: 336,
            projector_dim: 1024,
            seed: 1,
        }
    }

    pub fn config(&self, text_hidden: usize) -> Result<crate::vision::VisionConfig> {
        crate::vision::VisionConfig::from_json(
            &json!({
                "image_token_index": 200092,
                "vision_config": {
                    "hidden_size": self.hidden,
                    "intermediate_size": 4 * self.hidden,
                    "num_hidden_layers": self.layers,
                    "num_attention_heads": self.heads,
                    "image_size": self.image_size,
                    "patch_size": 14,
                    "projector_input_dim": self.projector_dim,
                    "projector_output_dim": self.projector_dim,
                    "vision_output_dim": self.projector_dim,
                }
            }),
            text_hidden,
        )
        .map(|c| c.expect("a vision config was given"))
    }

    /// Every `vision_model.*` and `multi_modal_projector.*` tensor, into `w`.
    pub fn build_into(&self, text_hidden: usize, w: &mut InMemoryWeights) -> Result<()> {
        let c = self.config(text_hidden)?;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut id = 1 << 32;
        let mut rnd = |shape: Vec<usize>, fan_in: usize| {
            id += 1;
            random_bf16(shape, fan_in, self.seed, id)
        };
        let zeros = |n: usize| Tensor::bf16_from_f32(vec![n], &vec![0.0; n]);
        let patch_in = 3 * 14 * 14;
        w.insert(
            "vision_model.patch_embedding.linear.weight",
            rnd(vec![h, patch_in], patch_in),
        );
        w.insert("vision_model.class_embedding", rnd(vec![h], 1));
        w.insert(
            "vision_model.positional_embedding_vlm",
            rnd(vec![c.patches() + 1, h], h),
        );
        for norm in ["layernorm_pre", "layernorm_post"] {
            w.insert(format!("vision_model.{norm}.weight"), ones(h));
            w.insert(format!("vision_model.{norm}.bias"), zeros(h));
        }
        for l in 0..c.num_hidden_layers {
            let p = format!("vision_model.model.layers.{l}");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                w.insert(format!("{p}.{norm}.weight"), ones(h));
                w.insert(format!("{p}.{norm}.bias"), zeros(h));
            }
            for proj in ["q", "k", "v", "o"] {
                w.insert(
                    format!("{p}.self_attn.{proj}_proj.weight"),
                    rnd(vec![h, h], h),
                );
                w.insert(format!("{p}.self_attn.{proj}_proj.bias"), zeros(h));
            }
            w.insert(format!("{p}.mlp.fc1.weight"), rnd(vec![i, h], h));
            w.insert(format!("{p}.mlp.fc1.bias"), zeros(i));
            w.insert(format!("{p}.mlp.fc2.weight"), rnd(vec![h, i], i));
            w.insert(format!("{p}.mlp.fc2.bias"), zeros(h));
        }
        let d = c.projector_dim;
        w.insert(
            "vision_model.vision_adapter.mlp.fc1.weight",
            rnd(vec![d, i], i),
        );
        w.insert(
            "vision_model.vision_adapter.mlp.fc2.weight",
            rnd(vec![d, d], d),
        );
        w.insert(
            "multi_modal_projector.linear_1.weight",
            rnd(vec![text_hidden, d], d),
        );
        Ok(())
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
