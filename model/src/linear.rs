//! Matrix products on the CPU.
//!
//! Weights stay in the checkpoint's dtype (bf16 for every released Llama 4) and compute is
//! f32 (widening bf16 is exact). Two requirements shape the code:
//! - Decoding is bound by memory bandwidth, so a weight byte should be read once: the bf16
//!   kernels in `kernels` widen and multiply in one pass.
//! - A token's result must not depend on the other tokens of its batch (see
//!   `Linear::forward_into`). BLAS-style GEMMs (the `gemm` crate included) pick blocking and
//!   micro-kernels by matrix size, which changes rounding; the bf16 kernels compute every
//!   (feature, token) dot product in one fixed order instead.
//!
//! The `gemm` crate does the attention products (`gemm_f32`, per sequence) and the weight
//! products of other dtypes, one token at a time. Its entry point takes raw pointers, so
//! this module holds one `unsafe` block; `gemm_f32` checks every extent first.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::checkpoint::{DType, Tensor};
use crate::kernels;

/// Weight bytes read by all products so far, for benchmarks (bytes touched per step).
static WEIGHT_BYTES_READ: AtomicU64 = AtomicU64::new(0);

pub fn weight_bytes_read() -> u64 {
    WEIGHT_BYTES_READ.load(Ordering::Relaxed)
}

/// Scratch per block, in f32 elements: 128K elements = 512 KiB, inside L2 (measured best
/// for prefill on the benchmark model among 32K, 128K and 256K).
const BLOCK_ELEMENTS: usize = 128 * 1024;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear` orientation, `[out, in]`.
    OutIn,
    /// "x @ W" orientation, `[in, out]` (the fused expert tensors).
    InOut,
}

/// A weight matrix and the product `y = x · Wᵀ` (or `x · W` for `InOut`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    in_dim: usize,
    out_dim: usize,
    pub(crate) layout: Layout,
    /// FP8 weights (e4m3, `OutIn`): their scales, and how inputs are taken.
    fp8: Option<Fp8Weight>,
    /// bf16 `OutIn` products take their inputs rounded to bf16 (`GemmPrecision::Bf16`,
    /// `kernels::dot_bf16_multi`).
    bf16_activations: bool,
}

/// What an FP8 weight needs besides its codes (`FP8.md` §3).
#[derive(Debug, Clone)]
struct Fp8Weight {
    /// Per output row: `W[r, :] = f32(code) · scale[r]`.
    scale: std::sync::Arc<[f32]>,
    /// Inputs are quantize-dequantized per row first (W8A8); false: weight-only.
    qdq_input: bool,
}

impl Linear {
    /// Wraps a 2-D tensor. The caller has checked its shape against the config.
    pub fn new(weight: Tensor, layout: Layout) -> Self {
        assert_eq!(weight.shape.len(), 2, "a linear weight is 2-D");
        let (in_dim, out_dim) = match layout {
            Layout::OutIn => (weight.shape[1], weight.shape[0]),
            Layout::InOut => (weight.shape[0], weight.shape[1]),
        };
        Self {
            weight,
            in_dim,
            out_dim,
            layout,
            fp8: None,
            bf16_activations: false,
        }
    }

    /// Products with inputs rounded to bf16 (`GemmPrecision::Bf16`) or in f32 (the default).
    /// Only bf16 `[out, in]` weights take it: the fused expert tensors (`[in, out]`) and FP8
    /// weights keep their own products.
    pub(crate) fn set_precision(&mut self, precision: crate::GemmPrecision) {
        self.bf16_activations = precision == crate::GemmPrecision::Bf16
            && self.layout == Layout::OutIn
            && self.fp8.is_none();
    }

    /// An FP8 (e4m3) weight `[out, in]` with one scale per output row; `qdq_input`: inputs
    /// are quantized per token (W8A8, compressed-tensors' dynamic activations). The caller
    /// has checked the shapes.
    pub fn fp8(weight: Tensor, scale: Vec<f32>, qdq_input: bool) -> Self {
        assert_eq!(weight.dtype, DType::F8E4M3, "an FP8 weight");
        let mut l = Self::new(weight, Layout::OutIn);
        assert_eq!(scale.len(), l.out_dim, "one scale per output row");
        l.fp8 = Some(Fp8Weight {
            scale: scale.into(),
            qdq_input,
        });
        l
    }

    /// The weight as stored (FP8 codes for an FP8 weight).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The weight's tensor, to move its bytes (`checkpoint::make_resident`).
    pub(crate) fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
    }

    /// An FP8 weight's scale per output row.
    pub fn fp8_scale(&self) -> Option<&[f32]> {
        self.fp8.as_ref().map(|f| &f.scale[..])
    }

    /// Whether the weight is FP8.
    pub fn is_fp8(&self) -> bool {
        self.fp8.is_some()
    }

    /// Whether inputs are quantized to FP8 per token before the product (W8A8).
    pub fn quantizes_input(&self) -> bool {
        self.fp8.as_ref().is_some_and(|f| f.qdq_input)
    }

    /// `forward` for inputs already quantize-dequantized per row (`fp8::qdq_rows`), for a
    /// layer that `quantizes_input`: the same bits as `forward` on the rows before.
    pub fn forward_prequantized(&self, x: &[f32], t: usize) -> Vec<f32> {
        let f = self.fp8.as_ref().expect("an FP8 layer");
        let mut y = vec![0.0; t * self.out_dim];
        WEIGHT_BYTES_READ.fetch_add(self.size_bytes() as u64, Ordering::Relaxed);
        if t > 0 {
            self.forward_fused(Rows::Fp8(self.weight.bytes(), &f.scale), x, t, &mut y);
        }
        y
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Bytes of the weight as held (FP8: codes and f32 scales).
    pub fn size_bytes(&self) -> usize {
        self.weight.size_bytes() + self.fp8.as_ref().map_or(0, |f| 4 * f.scale.len())
    }

    /// `x` is `[t, in]` row-major; returns `[t, out]`.
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0.0; t * self.out_dim];
        self.forward_into(x, t, &mut y);
        y
    }

    /// Like `forward`, writing into `y` (`[t, out]`).
    ///
    /// Every token's output depends on that token alone, bit for bit, whatever else is in
    /// the batch: the tokens that meet in one product depend on batching, micro-batching,
    /// chunked prefill and expert placement, and none of those may change the math (a
    /// request gives the same tokens alone or among 32, in one process or a cluster).
    pub fn forward_into(&self, x: &[f32], t: usize, y: &mut [f32]) {
        assert_eq!(x.len(), t * self.in_dim, "input shape");
        assert_eq!(y.len(), t * self.out_dim, "output shape");
        if t == 0 {
            return;
        }
        WEIGHT_BYTES_READ.fetch_add(self.size_bytes() as u64, Ordering::Relaxed);
        if let Some(f) = &self.fp8 {
            let quantized;
            let x = if f.qdq_input {
                quantized = crate::fp8::qdq_rows(x, self.in_dim);
                &quantized
            } else {
                x
            };
            self.forward_fused(Rows::Fp8(self.weight.bytes(), &f.scale), x, t, y);
            return;
        }
        match self.bf16_bits() {
            Some(w) if self.bf16_activations => {
                let (k, x) = (self.in_dim, kernels::round_activations(x));
                self.forward_parts(t, y, &|j0, part| {
                    let n = part.len() / t;
                    kernels::dot_bf16_multi(&w[j0 * k..(j0 + n) * k], &x, t, part)
                });
            }
            Some(w) => self.forward_fused(Rows::Bf16(w), x, t, y),
            // Other dtypes (rare for Llama 4) go one token at a time through `gemm`.
            None => {
                for (xi, yi) in x
                    .chunks_exact(self.in_dim)
                    .zip(y.chunks_exact_mut(self.out_dim))
                {
                    self.forward_widened(xi, 1, yi);
                }
            }
        }
    }

    /// bf16 or FP8 weights through the fused kernels.
    fn forward_fused(&self, rows: Rows<'_>, x: &[f32], t: usize, y: &mut [f32]) {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        self.forward_parts(t, y, &|j0, part| match (self.layout, rows) {
            (Layout::OutIn, rows) if t == 1 => rows.dot(j0, in_dim, x, part),
            (Layout::OutIn, rows) => rows.dot_multi(j0, in_dim, x, t, part),
            (Layout::InOut, Rows::Bf16(w)) if t == 1 => kernels::axpy_rows(w, out_dim, j0, x, part),
            (Layout::InOut, Rows::Bf16(w)) => kernels::axpy_rows_multi(w, out_dim, j0, x, t, part),
            (Layout::InOut, Rows::Fp8(..)) => unreachable!("FP8 weights are OutIn"),
        });
    }

    /// A product with its output features split over the cores: `product(j0, part)` writes
    /// features `j0..j0 + n` of all `t` tokens into `part` (`[t, n]`).
    fn forward_parts(&self, t: usize, y: &mut [f32], product: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let out_dim = self.out_dim;
        if t == 1 {
            // One token: a few hundred µs of streaming at most, on the hot helpers (waking a
            // sleeping rayon worker can cost as much). A rayon worker (one of a step's
            // experts) already shares the cores with its siblings: it reads the matrix in one
            // pass, where parts of an "x @ W" matrix would each read a piece of every row.
            let parts = crate::hot::threads().min(out_dim);
            let per_part = out_dim.div_ceil(parts);
            let parts: Vec<std::sync::Mutex<&mut [f32]>> =
                y.chunks_mut(per_part).map(std::sync::Mutex::new).collect();
            crate::hot::run(parts.len(), &|p| {
                let mut y_part = parts[p].lock().unwrap_or_else(|e| e.into_inner());
                product(p * per_part, &mut y_part);
            });
            return;
        }
        // One part a thread (on the hot helpers from the driving thread, see `hot`).
        // Measured and not kept: four chunks of rows a thread, taken from the shared
        // counter, read within noise on a 2-core Zen 3 VM when the other steps still went to
        // rayon (prefills of 128 tokens, medians 422-487 against 447-481 tokens/s), and
        // slower on a Zen 5 VM with every step on the hot helpers (bf16, 3 alternating
        // rounds: 1528, 1503, 1388 against 1958, 2235, 1910).
        let parts = rayon::current_num_threads().min(out_dim);
        let per_part = out_dim.div_ceil(parts);
        // Each part computes its features for all tokens into its thread's buffer (`[t, n]`),
        // whose token rows are then copied into their places in `y`.
        let starts: Vec<usize> = (0..out_dim).step_by(per_part).collect();
        let mut places: Vec<Vec<&mut [f32]>> =
            starts.iter().map(|_| Vec::with_capacity(t)).collect();
        for mut row in y.chunks_exact_mut(out_dim) {
            for (p, &j0) in places.iter_mut().zip(&starts) {
                let (mine, rest) = row.split_at_mut(per_part.min(out_dim - j0));
                p.push(mine);
                row = rest;
            }
        }
        let part = |j0: usize, place: &mut Vec<&mut [f32]>| {
            let n = per_part.min(out_dim - j0);
            PART.with_borrow_mut(|buffer| {
                // The kernels write every output, so what the buffer held does not matter.
                if buffer.len() < t * n {
                    buffer.resize(t * n, 0.0);
                }
                let part = &mut buffer[..t * n];
                product(j0, part);
                for (dst, src) in place.iter_mut().zip(part.chunks_exact(n)) {
                    dst.copy_from_slice(src);
                }
                // A long prompt's products would otherwise keep tens of MB per thread.
                if buffer.len() > PART_KEEP_FLOATS {
                    *buffer = Vec::new();
                }
            });
        };
        if crate::hot::off_rayon() {
            let places: Vec<std::sync::Mutex<Vec<&mut [f32]>>> =
                places.into_iter().map(std::sync::Mutex::new).collect();
            crate::hot::run(starts.len(), &|p| {
                part(
                    starts[p],
                    &mut places[p].lock().unwrap_or_else(|e| e.into_inner()),
                )
            });
        } else {
            starts
                .par_iter()
                .zip(places)
                .for_each(|(&j0, mut place)| part(j0, &mut place));
        }
    }

    /// Widens cache-sized blocks of the weight to f32 and multiplies them with `gemm`.
    fn forward_widened(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let block = (BLOCK_ELEMENTS / self.in_dim)
            .clamp(8, 512)
            .min(self.out_dim);
        // Each part produces its output features for all tokens, as rows of yᵀ, so parts
        // write disjoint chunks; within a part, blocks are widened one at a time into a
        // scratch buffer that stays in cache.
        let mut yt = vec![0.0f32; self.out_dim * t];
        let parts = rayon::current_num_threads();
        let per_part = self.out_dim.div_ceil(parts).div_ceil(block) * block;
        yt.par_chunks_mut(per_part * t)
            .enumerate()
            .for_each(|(p, yt_part)| {
                let mut scratch = vec![0.0f32; block * self.in_dim];
                for (b, yt_block) in yt_part.chunks_mut(block * t).enumerate() {
                    let j0 = p * per_part + b * block;
                    let rows = yt_block.len() / t;
                    let w = &mut scratch[..rows * self.in_dim];
                    self.widen_block(j0, rows, w);
                    // lhs is the block as [rows, in]: row-major for OutIn, column-major
                    // (each input row holds `rows` consecutive features) for InOut.
                    let (lhs_rs, lhs_cs) = match self.layout {
                        Layout::OutIn => (self.in_dim, 1),
                        Layout::InOut => (1, rows),
                    };
                    gemm_f32(
                        Dims {
                            m: rows,
                            n: t,
                            k: self.in_dim,
                        },
                        Mat::new(yt_block, t, 1),
                        MatRef::new(w, lhs_rs, lhs_cs),
                        MatRef::new(x, 1, self.in_dim),
                        false,
                    );
                }
            });
        if t == 1 {
            y.copy_from_slice(&yt);
        } else {
            for (j, col) in yt.chunks_exact(t).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    y[i * self.out_dim + j] = *v;
                }
            }
        }
    }

    /// The weight as bf16 bits, when it is bf16 and 2-byte aligned.
    fn bf16_bits(&self) -> Option<&[u16]> {
        (self.weight.dtype == DType::BF16)
            .then(|| bytemuck::try_cast_slice(self.weight.bytes()).ok())
            .flatten()
    }

    /// Widens output features `[j0, j0 + rows)` into `out` (layout as stored).
    fn widen_block(&self, j0: usize, rows: usize, out: &mut [f32]) {
        match self.layout {
            Layout::OutIn => self.weight.read_f32(j0 * self.in_dim, out),
            Layout::InOut => {
                for (k, dst) in out.chunks_exact_mut(rows).enumerate() {
                    self.weight.read_f32(k * self.out_dim + j0, dst);
                }
            }
        }
    }
}

thread_local! {
    /// This thread's part of a multi-token product (`forward_fused`), kept from one product
    /// to the next: a fresh buffer per product cost page faults, page clearing and zeroing
    /// in every product of every decode step.
    static PART: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest `PART` buffer a thread keeps (4 MiB: a decode step's products fit).
const PART_KEEP_FLOATS: usize = 1 << 20;

/// Weight rows the fused kernels read: bf16 bits, or e4m3 codes with per-row scales.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Bf16(&'a [u16]),
    Fp8(&'a [u8], &'a [f32]),
}

impl Rows<'_> {
    /// Output features `j0..j0 + y.len()` of one token (`OutIn` rows of `k` weights).
    fn dot(self, j0: usize, k: usize, x: &[f32], y: &mut [f32]) {
        let n = y.len();
        match self {
            Rows::Bf16(w) => kernels::dot_rows(&w[j0 * k..(j0 + n) * k], &[], x, y),
            Rows::Fp8(w, s) => kernels::dot_rows(&w[j0 * k..(j0 + n) * k], &s[j0..j0 + n], x, y),
        }
    }

    /// Output features `j0..` of `t` tokens into `y` (`[t, features]`).
    fn dot_multi(self, j0: usize, k: usize, x: &[f32], t: usize, y: &mut [f32]) {
        let n = y.len() / t;
        match self {
            Rows::Bf16(w) => kernels::dot_rows_multi(&w[j0 * k..(j0 + n) * k], &[], x, t, y),
            Rows::Fp8(w, s) => {
                kernels::dot_rows_multi(&w[j0 * k..(j0 + n) * k], &s[j0..j0 + n], x, t, y)
            }
        }
    }
}

/// Matrix sizes of one product: dst `[m, n]` = lhs `[m, k]` · rhs `[k, n]`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// A strided view of a mutable f32 matrix.
pub struct Mat<'a> {
    data: &'a mut [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a mut [f32], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }
}

/// A strided view of an f32 matrix.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }
}

fn assert_extent(len: usize, rows: usize, cols: usize, rs: usize, cs: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1) * rs + (cols - 1) * cs;
    assert!(last < len, "{what} view out of bounds: {last} >= {len}");
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), single-threaded: callers
/// parallelise over independent products. Panics if a view reaches outside its slice.
pub fn gemm_f32(d: Dims, dst: Mat<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool) {
    assert_extent(dst.data.len(), d.m, d.n, dst.rs, dst.cs, "dst");
    assert_extent(lhs.data.len(), d.m, d.k, lhs.rs, lhs.cs, "lhs");
    assert_extent(rhs.data.len(), d.k, d.n, rhs.rs, rhs.cs, "rhs");
    if d.m == 0 || d.n == 0 {
        return;
    }
    if d.k == 0 {
        if !accumulate {
            for i in 0..d.m {
                for j in 0..d.n {
                    dst.data[i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: every element the product reads or writes lies inside its slice (checked by
    // `assert_extent` above with the same strides and sizes), `dst` is borrowed mutably so
    // nothing else aliases it, and the strides fit in isize because they index a slice.
    unsafe {
        gemm::gemm(
            d.m,
            d.n,
            d.k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], t: usize, inp: usize, out: usize) -> Vec<f32> {
        let mut y = vec![0.0; t * out];
        for i in 0..t {
            for j in 0..out {
                y[i * out + j] = (0..inp).map(|k| x[i * inp + k] * w[j * inp + k]).sum();
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                // bf16-representable values, so the reference needs no rounding.
                half::bf16::from_f32((v % 2001) as f32 / 1000.0 - 1.0).to_f32()
            })
            .collect()
    }

    #[test]
    fn both_layouts_match_a_plain_product() {
        for &(t, inp, out) in &[(1, 64, 40), (3, 300, 1000), (17, 128, 7), (2, 5000, 33)] {
            let x = values(t * inp, 1);
            let w = values(out * inp, 2);
            let expected = naive(&x, &w, t, inp, out);
            let oi = Linear::new(Tensor::bf16_from_f32(vec![out, inp], &w), Layout::OutIn);
            let mut wt = vec![0.0; inp * out];
            for j in 0..out {
                for k in 0..inp {
                    wt[k * out + j] = w[j * inp + k];
                }
            }
            let io = Linear::new(Tensor::bf16_from_f32(vec![inp, out], &wt), Layout::InOut);
            for lin in [oi, io] {
                let y = lin.forward(&x, t);
                for (a, b) in y.iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn strided_gemm_accumulates() {
        let a = [1.0, 2.0, 3.0, 4.0]; // [2,2]
        let b = [1.0, 0.0, 0.0, 1.0];
        let mut c = [10.0; 4];
        gemm_f32(
            Dims { m: 2, n: 2, k: 2 },
            Mat::new(&mut c, 2, 1),
            MatRef::new(&a, 2, 1),
            MatRef::new(&b, 2, 1),
            true,
        );
        assert_eq!(c, [11.0, 12.0, 13.0, 14.0]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn views_are_bounds_checked() {
        let a = [0.0; 3];
        let mut c = [0.0; 4];
        gemm_f32(
            Dims { m: 2, n: 2, k: 2 },
            Mat::new(&mut c, 2, 1),
            MatRef::new(&a, 2, 1),
            MatRef::new(&a, 2, 1),
            false,
        );
    }
}
