//! The vision tower (HF `Llama4VisionModel` + `Llama4MultiModalProjector`; LLAMA4.md §4.3,
//! §4.4): tiles of pixels in, one text-width row per `<|patch|>` out.
//!
//! 1. Patchify (`nn.Unfold`, each patch ordered channel, row, column) and project without
//!    bias; append the class embedding as the **last** token; add the positional
//!    embedding; `layernorm_pre`.
//! 2. Pre-norm encoder layers: `h += o(attn(LN1(h)))`, `h += fc2(GELU(fc1(LN2(h))))`, every
//!    projection with a bias; attention is bidirectional per tile, with 2D RoPE on q and k
//!    (the class token unrotated).
//! 3. `layernorm_post`, drop the class token, pixel-shuffle 2×2 blocks into channels, the
//!    adapter MLP (GELU after both layers) and the projector to the text width.
//!
//! Everything is f32 over the checkpoint's weights; products go through [`Linear`], so a
//! tile's rows depend on that tile alone, whatever else is encoded with it.

use rayon::prelude::*;

use crate::checkpoint::WeightSource;
use crate::error::Result;
use crate::linear::{gemm_f32, Dims, Layout, Linear, Mat, MatRef};
use crate::vision::config::VisionConfig;

/// A linear layer with an optional bias.
#[derive(Debug, Clone)]
struct Affine {
    linear: Linear,
    bias: Option<Vec<f32>>,
}

impl Affine {
    fn load(
        src: &dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let linear = Linear::new(
            src.tensor_shaped(&format!("{name}.weight"), &[out, inp])?,
            Layout::OutIn,
        );
        let bias = match bias {
            true => Some(
                src.tensor_shaped(&format!("{name}.bias"), &[out])?
                    .to_f32_vec(),
            ),
            false => None,
        };
        Ok(Self { linear, bias })
    }

    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = self.linear.forward(x, rows);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        y
    }

    fn size_bytes(&self) -> usize {
        self.linear.size_bytes()
    }
}

/// `nn.LayerNorm` with weight and bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(src: &dyn WeightSource, name: &str, dim: usize, eps: f32) -> Result<Self> {
        let v = |s: &str| -> Result<Vec<f32>> {
            Ok(src
                .tensor_shaped(&format!("{name}.{s}"), &[dim])?
                .to_f32_vec())
        };
        Ok(Self {
            weight: v("weight")?,
            bias: v("bias")?,
            eps,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.weight.len();
        let mut y = x.to_vec();
        for row in y.chunks_exact_mut(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *v = (*v - mean) * inv * w + b;
            }
        }
        y
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    input_norm: LayerNorm,
    q: Affine,
    k: Affine,
    v: Affine,
    o: Affine,
    post_attention_norm: LayerNorm,
    fc1: Affine,
    fc2: Affine,
}

/// The vision tower and projector of a multimodal checkpoint.
#[derive(Debug, Clone)]
pub struct VisionModel {
    config: VisionConfig,
    patch_embedding: Affine,
    class_embedding: Vec<f32>,
    positional_embedding: Vec<f32>,
    layernorm_pre: LayerNorm,
    layernorm_post: LayerNorm,
    layers: Vec<EncoderLayer>,
    adapter_fc1: Affine,
    adapter_fc2: Affine,
    projector: Affine,
    /// Per token of a tile (the class token last), the RoPE angle of each pair of a head.
    angles: Vec<f32>,
}

/// GELU in its exact erf form (`nn.GELU()`).
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl VisionModel {
    /// Loads `vision_model.*` and `multi_modal_projector.*`, checking every shape.
    pub fn load(config: VisionConfig, src: &dyn WeightSource) -> Result<Self> {
        let c = &config;
        let (h, eps) = (c.hidden_size, c.norm_eps);
        let patch_in = c.num_channels * c.patch_size * c.patch_size;
        let tokens = c.patches() + 1;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("vision_model.model.layers.{l}");
            let proj = |n: &str| Affine::load(src, &format!("{p}.self_attn.{n}_proj"), h, h, true);
            layers.push(EncoderLayer {
                input_norm: LayerNorm::load(src, &format!("{p}.input_layernorm"), h, eps)?,
                q: proj("q")?,
                k: proj("k")?,
                v: proj("v")?,
                o: proj("o")?,
                post_attention_norm: LayerNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                )?,
                fc1: Affine::load(src, &format!("{p}.mlp.fc1"), c.intermediate_size, h, true)?,
                fc2: Affine::load(src, &format!("{p}.mlp.fc2"), h, c.intermediate_size, true)?,
            });
        }
        Ok(Self {
            patch_embedding: Affine::load(
                src,
                "vision_model.patch_embedding.linear",
                h,
                patch_in,
                false,
            )?,
            class_embedding: src
                .tensor_shaped("vision_model.class_embedding", &[h])?
                .to_f32_vec(),
            positional_embedding: src
                .tensor_shaped("vision_model.positional_embedding_vlm", &[tokens, h])?
                .to_f32_vec(),
            layernorm_pre: LayerNorm::load(src, "vision_model.layernorm_pre", h, eps)?,
            layernorm_post: LayerNorm::load(src, "vision_model.layernorm_post", h, eps)?,
            layers,
            adapter_fc1: Affine::load(
                src,
                "vision_model.vision_adapter.mlp.fc1",
                c.projector_dim,
                c.intermediate_size,
                false,
            )?,
            adapter_fc2: Affine::load(
                src,
                "vision_model.vision_adapter.mlp.fc2",
                c.projector_dim,
                c.projector_dim,
                false,
            )?,
            projector: Affine::load(
                src,
                "multi_modal_projector.linear_1",
                c.text_hidden_size,
                c.vision_output_dim,
                false,
            )?,
            angles: rope_angles(c),
            config,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Bytes of the tower's weights.
    pub fn size_bytes(&self) -> usize {
        let layer = |l: &EncoderLayer| {
            [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2]
                .iter()
                .map(|a| a.size_bytes())
                .sum::<usize>()
        };
        self.layers.iter().map(layer).sum::<usize>()
            + self.patch_embedding.size_bytes()
            + self.adapter_fc1.size_bytes()
            + self.adapter_fc2.size_bytes()
            + self.projector.size_bytes()
    }

    /// Encodes `tiles` tiles of `pixels` (`[tiles, channels, size, size]`) into
    /// `[tiles · tokens_per_tile, text_hidden]`: the rows that replace the `<|patch|>`
    /// embeddings, in tile order.
    pub fn encode(&self, pixels: &[f32], tiles: usize) -> Vec<f32> {
        let c = &self.config;
        assert_eq!(
            pixels.len(),
            tiles * c.tile_values(),
            "pixel values of whole tiles"
        );
        if tiles == 0 {
            return Vec::new();
        }
        let h = c.hidden_size;
        let s = c.patches() + 1;
        let patches = self.patchify(pixels, tiles);
        let embedded = self.patch_embedding.forward(&patches, tiles * c.patches());
        let mut x = vec![0.0f32; tiles * s * h];
        for (t, seq) in x.chunks_exact_mut(s * h).enumerate() {
            let src = &embedded[t * c.patches() * h..(t + 1) * c.patches() * h];
            seq[..src.len()].copy_from_slice(src);
            seq[src.len()..].copy_from_slice(&self.class_embedding);
            seq.iter_mut()
                .zip(&self.positional_embedding)
                .for_each(|(v, p)| *v += p);
        }
        let mut x = self.layernorm_pre.forward(&x);
        for layer in &self.layers {
            self.layer(layer, &mut x, tiles);
        }
        let x = self.layernorm_post.forward(&x);
        let shuffled = self.pixel_shuffle(&x, tiles);
        let rows = tiles * c.tokens_per_tile();
        let mut a = self.adapter_fc1.forward(&shuffled, rows);
        a.iter_mut().for_each(|v| *v = gelu(*v));
        let mut a = self.adapter_fc2.forward(&a, rows);
        a.iter_mut().for_each(|v| *v = gelu(*v));
        self.projector.forward(&a, rows)
    }

    /// `[tiles · patches, channels · p · p]`, each patch vector ordered (channel, ky, kx)
    /// and the patches of a tile in raster order (`nn.Unfold`).
    fn patchify(&self, pixels: &[f32], tiles: usize) -> Vec<f32> {
        let c = &self.config;
        let (p, side, size) = (c.patch_size, c.patches_per_side(), c.image_size);
        let width = c.num_channels * p * p;
        let mut out = Vec::with_capacity(tiles * c.patches() * width);
        for tile in pixels.chunks_exact(c.tile_values()) {
            for py in 0..side {
                for px in 0..side {
                    for ch in 0..c.num_channels {
                        for ky in 0..p {
                            let row = (ch * size + py * p + ky) * size + px * p;
                            out.extend_from_slice(&tile[row..row + p]);
                        }
                    }
                }
            }
        }
        out
    }

    /// One encoder layer over `[tiles, tokens, hidden]`, in place.
    fn layer(&self, layer: &EncoderLayer, x: &mut [f32], tiles: usize) {
        let c = &self.config;
        let rows = tiles * (c.patches() + 1);
        let normed = layer.input_norm.forward(x);
        let mut q = layer.q.forward(&normed, rows);
        let mut k = layer.k.forward(&normed, rows);
        let v = layer.v.forward(&normed, rows);
        self.rotate(&mut q);
        self.rotate(&mut k);
        let attn = self.attention(&q, &k, &v, tiles);
        let out = layer.o.forward(&attn, rows);
        x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
        let normed = layer.post_attention_norm.forward(x);
        let mut m = layer.fc1.forward(&normed, rows);
        m.iter_mut().for_each(|v| *v = gelu(*v));
        let out = layer.fc2.forward(&m, rows);
        x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
    }

    /// 2D RoPE on every head of every token (`[tiles, tokens, hidden]`), in f32 complex
    /// arithmetic on adjacent pairs, as `vision_apply_rotary_emb`.
    fn rotate(&self, x: &mut [f32]) {
        let c = &self.config;
        let (hd, pairs) = (c.head_dim(), c.head_dim() / 2);
        let s = c.patches() + 1;
        for (i, token) in x.chunks_exact_mut(c.hidden_size).enumerate() {
            let angles = &self.angles[(i % s) * pairs..(i % s + 1) * pairs];
            for head in token.chunks_exact_mut(hd) {
                for (pair, &a) in head.chunks_exact_mut(2).zip(angles) {
                    let (cos, sin) = (a.cos(), a.sin());
                    let (re, im) = (pair[0], pair[1]);
                    pair[0] = re * cos - im * sin;
                    pair[1] = re * sin + im * cos;
                }
            }
        }
    }

    /// Bidirectional attention of every head within each tile; `[tiles · tokens, hidden]`.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], tiles: usize) -> Vec<f32> {
        let c = &self.config;
        let (h, hd, heads) = (c.hidden_size, c.head_dim(), c.num_attention_heads);
        let s = c.patches() + 1;
        let scale = 1.0 / (hd as f32).sqrt();
        let per: Vec<(usize, Vec<f32>)> = (0..tiles * heads)
            .into_par_iter()
            .map(|job| {
                let (t, head) = (job / heads, job % heads);
                let base = t * s * h + head * hd;
                let mut scores = vec![0.0f32; s * s];
                gemm_f32(
                    Dims { m: s, n: s, k: hd },
                    Mat::new(&mut scores, s, 1),
                    MatRef::new(&q[base..], h, 1),
                    MatRef::new(&k[base..], 1, h),
                    false,
                );
                for row in scores.chunks_exact_mut(s) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                    let mut sum = 0.0;
                    for x in row.iter_mut() {
                        *x = (*x * scale - max).exp();
                        sum += *x;
                    }
                    row.iter_mut().for_each(|x| *x /= sum);
                }
                let mut o = vec![0.0f32; s * hd];
                gemm_f32(
                    Dims { m: s, n: hd, k: s },
                    Mat::new(&mut o, hd, 1),
                    MatRef::new(&scores, s, 1),
                    MatRef::new(&v[base..], h, 1),
                    false,
                );
                (job, o)
            })
            .collect();
        let mut out = vec![0.0f32; tiles * s * h];
        for (job, o) in per {
            let (t, head) = (job / heads, job % heads);
            for (i, src) in o.chunks_exact(hd).enumerate() {
                let at = (t * s + i) * h + head * hd;
                out[at..at + hd].copy_from_slice(src);
            }
        }
        out
    }

    /// Drops each tile's class token and merges 2×2 blocks of patches into one token of
    /// 4 × hidden channels: token (h/2)·(side/2) + w/2, channel (h%2)·2H + (w%2)·H + c
    /// (HF `pixel_shuffle` with ratio 0.5).
    fn pixel_shuffle(&self, x: &[f32], tiles: usize) -> Vec<f32> {
        let c = &self.config;
        let (h, side) = (c.hidden_size, c.patches_per_side());
        let s = c.patches() + 1;
        let half = side / 2;
        let mut out = vec![0.0f32; tiles * c.tokens_per_tile() * 4 * h];
        for t in 0..tiles {
            for n in 0..c.patches() {
                let (row, col) = (n / side, n % side);
                let token = t * c.tokens_per_tile() + (row / 2) * half + col / 2;
                let channel = (row % 2) * 2 * h + (col % 2) * h;
                let src = &x[(t * s + n) * h..(t * s + n + 1) * h];
                out[token * 4 * h + channel..token * 4 * h + channel + h].copy_from_slice(src);
            }
        }
        out
    }
}

/// Per token of a tile, the angle of each pair of a head (LLAMA4.md §4.4): patch n sits at
/// column x = n % side and row y = n / side; pairs 0..P/2 turn by (x+1)·f_k, the rest by
/// (y+1)·f_k, with f_k = θ^(−2k/(head_dim/2)) in f32; the class token (last) is unrotated.
fn rope_angles(c: &VisionConfig) -> Vec<f32> {
    let pairs = c.head_dim() / 2;
    let per_axis = pairs / 2;
    let freqs: Vec<f32> = (0..per_axis)
        .map(|k| 1.0 / (c.rope_theta as f32).powf((2 * k) as f32 / pairs as f32))
        .collect();
    let side = c.patches_per_side();
    let mut angles = vec![0.0f32; (c.patches() + 1) * pairs];
    for n in 0..c.patches() {
        let (x, y) = ((n % side + 1) as f32, (n / side + 1) as f32);
        let token = &mut angles[n * pairs..(n + 1) * pairs];
        for (k, &f) in freqs.iter().enumerate() {
            token[k] = x * f;
            token[per_axis + k] = y * f;
        }
    }
    angles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_the_erf_form() {
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-3.0) + 0.004_049_7).abs() < 1e-6);
    }
}
