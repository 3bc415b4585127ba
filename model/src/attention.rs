//! Grouped-query self-attention of one decoder layer (HF `Llama4TextAttention`,
//! LLAMA4.md §2.4).
//!
//! Per sequence: project q/k/v; on RoPE layers rotate adjacent pairs and, where the config
//! asks, apply the weightless RMS qk-norm; on NoPE layers scale q by the temperature
//! `1 + attn_scale · ln(1 + ⌊(p+1)/floor_scale⌋)`; append k/v to the cache; attend. A query
//! at absolute position p sees the keys in `[lo(p), p]`, where lo(p) is the start of p's
//! aligned chunk on RoPE layers and 0 on NoPE layers. Scores, softmax and the weighted sum
//! run per (KV head, block of queries) in `kernels::attend_block`, blocked over the keys;
//! masked entries weigh an exact zero.

use rayon::prelude::*;

use crate::checkpoint::WeightSource;
use crate::config::TextConfig;
use crate::error::Result;
use crate::hot::for_each_row;
use crate::kernels::{self, KvRows};
use crate::kv_cache::{BlockPool, LayerCache};
use crate::linear::Linear;
use crate::norm::rms_norm_in_place;
use crate::rope::Rope;

/// Queries attended together (with the query heads of one KV head): they share each pass
/// over the keys. Each query's result is still what it gets alone (`kernels::attend_block`),
/// so whole-prompt prefill, chunked prefill and decode agree bit for bit, and a preempted
/// sequence recomputes exactly what it had.
const QUERY_BLOCK: usize = 16;

#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) use_rope: bool,
    pub(crate) qk_norm: bool,
    pub(crate) temperature_tuning: bool,
    pub(crate) chunk: usize,
    pub(crate) floor_scale: f64,
    pub(crate) attn_scale: f64,
    pub(crate) eps: f32,
    pub(crate) rope: Rope,
}

/// One sequence's share of a batched attention call.
pub struct SeqSlice<'a> {
    pub cache: &'a mut LayerCache,
    pub pool: &'a BlockPool,
    /// Absolute position of the first new token.
    pub start_pos: usize,
    /// Number of new tokens of this sequence in the batch.
    pub len: usize,
}

impl Attention {
    pub fn load(src: &dyn WeightSource, c: &TextConfig, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.self_attn");
        let (h, q_out, kv_out) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let lin = |name: &str, [out, inp]: [usize; 2]| -> Result<Linear> {
            crate::quant::linear(
                src,
                c.quantization.as_ref(),
                &format!("{p}.{name}"),
                out,
                inp,
            )
        };
        let use_rope = c.rope_layers[layer];
        Ok(Self {
            q: lin("q_proj", [q_out, h])?,
            k: lin("k_proj", [kv_out, h])?,
            v: lin("v_proj", [kv_out, h])?,
            o: lin("o_proj", [h, q_out])?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            use_rope,
            qk_norm: c.use_qk_norm && use_rope,
            temperature_tuning: c.attn_temperature_tuning && !use_rope,
            chunk: c.attention_chunk_size,
            floor_scale: c.floor_scale,
            attn_scale: c.attn_scale,
            eps: c.rms_norm_eps,
            rope: Rope::new(c),
        })
    }

    pub fn size_bytes(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.o]
            .iter()
            .map(|l| l.size_bytes())
            .sum()
    }

    /// `x` is the normed hidden state `[t, hidden]` of all sequences in batch order; the
    /// result is the attention output `[t, hidden]` before the residual add. The caches
    /// grow by the new keys and values; giving back the blocks of finished chunks is the
    /// forward pass's (`forward::layer_start`).
    pub fn forward(&self, x: &[f32], t: usize, seqs: &mut [SeqSlice<'_>]) -> Vec<f32> {
        let mut q = self.q.forward(x, t);
        let mut k = self.k.forward(x, t);
        let v = self.v.forward(x, t);
        let (qw, kw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);

        let mut row = 0;
        let mut pieces = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let rows = row..row + s.len;
            pieces.push((s, rows.clone()));
            row = rows.end;
        }
        assert_eq!(row, t, "sequence lengths must add up to the batch");

        let mut attn = vec![0.0f32; t * qw];
        let q_chunks = split_rows(&mut q, &pieces, qw);
        let k_chunks = split_rows(&mut k, &pieces, kw);
        let out_chunks = split_rows(&mut attn, &pieces, qw);
        // One sequence (decode of one request) stays on this thread; its heads split in
        // `attend`.
        let work = pieces
            .into_iter()
            .zip(q_chunks)
            .zip(k_chunks)
            .zip(out_chunks);
        crate::hot::map_items(work.collect(), |((((s, rows), q), k), out)| {
            self.position_encode(q, k, s.start_pos);
            s.cache
                .append(s.pool, k, &v[rows.start * kw..rows.end * kw]);
            let lo = self.first_visible(s.start_pos);
            let end = s.start_pos + s.len;
            let bt = s.pool.block_tokens();
            let (keys, values, first) = s.cache.rows(bt, lo, end);
            let (keys, values) = (
                KvRows::paged(&keys, bt, first, kw),
                KvRows::paged(&values, bt, first, kw),
            );
            attend_rows(self.geometry(), q, keys, values, lo, s.start_pos, out);
        });
        self.o.forward(&attn, t)
    }

    /// RoPE and qk-norm on RoPE layers, temperature tuning on NoPE layers. A prompt's
    /// tokens go over the cores (`hot::for_each_row`); each token's bits are its own.
    fn position_encode(&self, q: &mut [f32], k: &mut [f32], start_pos: usize) {
        let d = self.head_dim;
        for_each_row(q, self.heads * d, |i, row| {
            self.encode_row(row, start_pos + i, Side::Query)
        });
        for_each_row(k, self.kv_heads * d, |i, row| {
            self.encode_row(row, start_pos + i, Side::Key)
        });
    }

    /// `position_encode` for one token's query or key row at `pos` (temperature tuning
    /// scales queries only).
    fn encode_row(&self, row: &mut [f32], pos: usize, side: Side) {
        let d = self.head_dim;
        if self.use_rope {
            for head in row.chunks_exact_mut(d) {
                self.rope.rotate(head, pos);
            }
            if self.qk_norm {
                rms_norm_in_place(row, d, None, self.eps);
            }
        } else if self.temperature_tuning && side == Side::Query {
            let steps = ((pos as f64 + 1.0) / self.floor_scale).floor();
            let scale = (steps.ln_1p() * self.attn_scale + 1.0) as f32;
            row.iter_mut().for_each(|v| *v *= scale);
        }
    }

    /// First key position a query at `pos` may see.
    fn first_visible(&self, pos: usize) -> usize {
        self.geometry().first_visible(pos)
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            chunk: self.use_rope.then_some(self.chunk),
        }
    }
}

/// Which row of a token `Attention::encode_row` takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Query,
    Key,
}

/// One layer's attention shape: query and KV heads (GQA), head size, and for chunked (RoPE)
/// layers the chunk a query's keys must share with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub chunk: Option<usize>,
}

impl Geometry {
    /// The first position a query at `pos` sees.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.chunk {
            Some(c) => pos - pos % c,
            None => 0,
        }
    }
}

/// Attention of one sequence's new queries `q` (`[len, heads·d]`, positions from
/// `start_pos`) over `keys`/`values` (`[n, kv_heads·d]`, positions from `base`), which hold
/// every key the queries can see, their own included: causal, chunked where `g` says, GQA.
/// The CPU reference of the CUDA attention kernels.
pub fn attend(
    g: Geometry,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    base: usize,
    start_pos: usize,
    out: &mut [f32],
) {
    let kw = g.kv_heads * g.head_dim;
    let (keys, values) = (&[keys], &[values]);
    let (keys, values) = (KvRows::contiguous(keys, kw), KvRows::contiguous(values, kw));
    attend_rows(g, q, keys, values, base, start_pos, out);
}

/// `attend` over keys and values where they lie (a paged cache's blocks, `KvRows`): the
/// same bits as over one contiguous copy of them.
pub fn attend_rows(
    g: Geometry,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    base: usize,
    start_pos: usize,
    out: &mut [f32],
) {
    let d = g.head_dim;
    let (qw, kw) = (g.heads * d, g.kv_heads * d);
    let len = q.len() / qw;
    let group = g.heads / g.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // One unit per (KV head, block of queries): the `group` query heads that read the
    // same keys share each pass over them.
    let blocks = len.div_ceil(QUERY_BLOCK);
    let unit = |u: usize| {
        let (kv, b0) = (u / blocks, (u % blocks) * QUERY_BLOCK);
        let b1 = (b0 + QUERY_BLOCK).min(len);
        let visible: Vec<(usize, usize)> = (b0..b1)
            .map(|i| {
                let pos = start_pos + i;
                (g.first_visible(pos) - base, pos - base)
            })
            .collect();
        let mut o = vec![0.0f32; (b1 - b0) * group * d];
        kernels::attend_block(
            &kernels::HeadBlock {
                q: &q[b0 * qw..b1 * qw],
                q_stride: qw,
                q_off: kv * group * d,
                heads: group,
                keys,
                values,
                kv_stride: kw,
                kv_off: kv * d,
                d,
                visible: &visible,
                scale,
            },
            &mut o,
        );
        o
    };
    let units = g.kv_heads * blocks;
    // On the driving thread the units go to the hot helpers (a rayon fork would wake
    // sleeping workers, and block this thread); from a rayon worker, to rayon.
    let done: Vec<Vec<f32>> = if crate::hot::off_rayon() {
        crate::hot::map(units, unit)
    } else {
        (0..units).into_par_iter().map(unit).collect()
    };
    let width = group * d;
    for (u, o) in done.iter().enumerate() {
        let (kv, b0) = (u / blocks, (u % blocks) * QUERY_BLOCK);
        for (i, src) in o.chunks_exact(width).enumerate() {
            let at = (b0 + i) * qw + kv * width;
            out[at..at + width].copy_from_slice(src);
        }
    }
}

/// Splits a `[t, width]` buffer into the row ranges of consecutive sequences.
fn split_rows<'b, S>(
    mut buf: &'b mut [f32],
    pieces: &[(S, std::ops::Range<usize>)],
    width: usize,
) -> Vec<&'b mut [f32]> {
    let mut out = Vec::with_capacity(pieces.len());
    for (_, rows) in pieces {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(rows.len() * width);
        out.push(head);
        buf = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention over a paged cache's blocks where they lie gives the bits of attention over
    /// one contiguous copy of the same positions: blocks of 4 positions (far fewer than a
    /// chunk of keys of the weighted sum), from a position inside a block, over more keys
    /// than one such chunk (up to 128, and 72 in the second attention chunk), for blocks of
    /// queries and for one.
    #[test]
    fn paged_rows_give_the_bits_of_a_contiguous_copy() {
        let g = Geometry {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            chunk: Some(128),
        };
        let kw = g.kv_heads * g.head_dim;
        let pool = BlockPool::new(4, Some(64));
        let mut cache = crate::kv_cache::KvCache::new(1, kw, pool.clone());
        let positions = 200;
        let val = |i: usize, m: f32| ((i * 37 % 101) as f32 / 50.0 - 1.0) * m;
        let k: Vec<f32> = (0..positions * kw).map(|i| val(i + 7, 1.0)).collect();
        let v: Vec<f32> = (0..positions * kw).map(|i| val(i + 3, 2.0)).collect();
        let layer = &mut cache.layers[0];
        layer.append(&pool, &k, &v);
        for (from, start_pos, len) in [(0, 100, 28), (0, 127, 1), (125, 190, 10), (126, 199, 1)] {
            let qw = g.heads * g.head_dim;
            let q: Vec<f32> = (0..len * qw).map(|i| val(i, 1.5)).collect();
            let (keys, values) = layer.gather(4, from, start_pos + len);
            let mut want = vec![0.0f32; len * qw];
            attend(g, &q, &keys, &values, from, start_pos, &mut want);
            let (keys, values, first) = layer.rows(4, from, start_pos + len);
            let mut got = vec![0.0f32; len * qw];
            let (keys, values) = (
                KvRows::paged(&keys, 4, first, kw),
                KvRows::paged(&values, 4, first, kw),
            );
            assert!(
                keys.len() >= start_pos + len - from,
                "every position readable"
            );
            attend_rows(g, &q, keys, values, from, start_pos, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want),
                "from {from}, queries {start_pos}..+{len}"
            );
        }
    }

    /// Chunked causal GQA attention against a plain f64 softmax, and each query's bits the
    /// same whether its block attends together or one query at a time (decode): heads of
    /// 20, and of 64 and 128 (which the AVX2 build attends to with packed keys and values).
    #[test]
    fn attend_matches_a_plain_softmax_and_each_query_alone() {
        for head_dim in [20, 64, 128] {
            attend_head_matches_a_plain_softmax_and_each_query_alone(head_dim);
        }
    }

    fn attend_head_matches_a_plain_softmax_and_each_query_alone(head_dim: usize) {
        let g = Geometry {
            heads: 4,
            kv_heads: 2,
            head_dim,
            chunk: Some(24),
        };
        let (d, qw, kw) = (g.head_dim, g.heads * g.head_dim, g.kv_heads * g.head_dim);
        let (base, start_pos, len) = (24, 29, 37);
        let keys_n = start_pos + len - base;
        let val = |i: usize, m: f32| ((i * 37 % 101) as f32 / 50.0 - 1.0) * m;
        let q: Vec<f32> = (0..len * qw).map(|i| val(i, 1.5)).collect();
        let keys: Vec<f32> = (0..keys_n * kw).map(|i| val(i + 7, 1.0)).collect();
        let values: Vec<f32> = (0..keys_n * kw).map(|i| val(i + 3, 2.0)).collect();
        let mut out = vec![0.0f32; len * qw];
        attend(g, &q, &keys, &values, base, start_pos, &mut out);
        let scale = 1.0 / (d as f64).sqrt();
        for i in 0..len {
            let pos = start_pos + i;
            let lo = g.first_visible(pos).max(base) - base;
            for h in 0..g.heads {
                let kv = (h / 2) * d;
                let s: Vec<f64> = (lo..=pos - base)
                    .map(|j| {
                        (0..d)
                            .map(|e| (q[i * qw + h * d + e] * keys[j * kw + kv + e]) as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let total: f64 = w.iter().sum();
                for e in 0..d {
                    let want: f64 = w
                        .iter()
                        .enumerate()
                        .map(|(n, p)| p * values[(lo + n) * kw + kv + e] as f64)
                        .sum::<f64>()
                        / total;
                    let got = out[i * qw + h * d + e] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "query {i} head {h}: {got} vs {want}"
                    );
                }
            }
            // The query alone, as decode computes it.
            let mut alone = vec![0.0f32; qw];
            let keys_to = (pos + 1 - base) * kw;
            attend(
                g,
                &q[i * qw..(i + 1) * qw],
                &keys[..keys_to],
                &values[..keys_to],
                base,
                pos,
                &mut alone,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone), bits(&out[i * qw..(i + 1) * qw]), "query {i}");
        }
    }
}
