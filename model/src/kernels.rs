//! Fused widen-and-multiply kernels for the weight products (see `Linear::forward_into`):
//! bf16 weights, and FP8 (e4m3) weights with one scale per row.
//!
//! Every product has one canonical reduction order, fixed by the weight layout and the
//! activations' precision:
//! - `[out, in]` rows (`dot_rows*`): `LANES` accumulators over K (lane `i` takes the
//!   elements `i mod LANES` of the full chunks, in order), the pairwise tree `lane_sum`, then
//!   the tail element by element;
//! - `[in, out]` ("x @ W", `axpy_rows*`): one accumulator per output, K ascending;
//! - `[out, in]` rows with activations rounded to bf16 (`dot_bf16_multi`, `--gemm bf16`):
//!   `VDPBF16PS`'s pairs per lane, then `lane_sum` and the tail (see `dot_bf16`).
//!
//! Register tiles (rows × tokens, or column chunks × tokens) decide only which products
//! share a pass over the weights, so a batch-1 call, any tile shape and any batch give a
//! token the same bits. Each kernel is written once over [`Lanes`] and built for baseline
//! arrays, AVX2 + FMA and AVX-512 (x86-64, chosen at run time) and NEON (aarch64); the builds
//! differ in tile shapes only, never in the per-lane operations.
#![allow(unsafe_code)]

/// Lanes of independent accumulators per row: one AVX-512 register, two AVX ones.
const LANES: usize = 16;

/// A public kernel that runs its portable body (`$body`, or one body per build where they
/// differ only in tile shape) compiled for the best instruction set the CPU has, chosen at
/// run time: AVX-512, AVX2 + FMA, or the baseline; NEON on aarch64. Each lane does the same
/// operations in the same order in every build (the loops are written per lane and sums are
/// taken in one fixed tree, `lane_sum`), so the bits never depend on which build runs: a
/// cluster of machines with different instruction sets computes what one does.
macro_rules! kernel {
    (
        $(#[$doc:meta])*
        pub fn $name:ident / $on:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) => $body:ident
    ) => {
        kernel! {
            $(#[$doc])*
            pub fn $name / $on $(<$g: $bound>)? ($($arg: $ty),*)
                => avx512: $body, avx2: $body, neon: $body, baseline: $body
        }
    };
    (
        $(#[$doc:meta])*
        pub fn $name:ident / $on:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?)
            => avx512: $b512:expr, avx2: $b2:expr, neon: $bn:expr, baseline: $b0:expr
    ) => {
        $(#[$doc])*
        pub fn $name $(<$g: $bound>)? ($($arg: $ty),*) {
            $on(isa(), $($arg),*)
        }

        /// The same kernel built for `isa` (at most what the CPU has; see `isa()`).
        pub fn $on $(<$g: $bound>)? (isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
                unsafe fn avx512 $(<$g: $bound>)? ($($arg: $ty),*) {
                    $b512($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) {
                    $b2($($arg),*)
                }
                let isa = isa.min(self::isa());
                if isa == Isa::Avx512 {
                    // SAFETY: the CPU supports AVX-512 (F, VL, BW), AVX2 and FMA (`isa()`).
                    return unsafe { avx512($($arg),*) };
                }
                if isa == Isa::Avx2 {
                    // SAFETY: the CPU supports AVX2 and FMA (`isa()`).
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[cfg(target_arch = "aarch64")]
            if isa.min(self::isa()) == Isa::Neon {
                return $bn($($arg),*);
            }
            let _ = isa;
            $b0($($arg),*)
        }
    };
}

/// The instruction set the kernels run with on this CPU, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    /// aarch64's (always there).
    Neon,
    Avx2,
    Avx512,
}

/// Every build of the kernels this CPU runs, the baseline first (the property tests compare
/// them).
pub fn builds() -> Vec<Isa> {
    let built: &[Isa] = if cfg!(target_arch = "aarch64") {
        &[Isa::Baseline, Isa::Neon]
    } else {
        &[Isa::Baseline, Isa::Avx2, Isa::Avx512]
    };
    built.iter().copied().filter(|&i| i <= isa()).collect()
}

/// What this CPU offers the kernels (detected once). `EXPERTMESH_ISA=avx2|baseline` asks
/// for less (to compare builds; never more than the CPU has).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let best = if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            Isa::Avx512
        } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            Isa::Avx2
        } else {
            Isa::Baseline
        };
        #[cfg(target_arch = "aarch64")]
        let best = Isa::Neon;
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let best = Isa::Baseline;
        let asked = match std::env::var("EXPERTMESH_ISA").as_deref() {
            Ok("avx2") => Isa::Avx2,
            Ok("baseline") => Isa::Baseline,
            _ => Isa::Avx512,
        };
        asked.min(best)
    })
}

/// A weight element the dot kernels widen to f32 on the fly.
pub trait Weight: Copy + Send + Sync {
    /// Rows carry a scale (`w[r, k] = f32(code) · scale[r]`).
    const SCALED: bool;
    /// The factor the kernels multiply a row's widened bits by, from the row's scale.
    fn row_factor(scale: f32) -> f32;
    /// The weight, from its bits and its row's factor.
    fn widen(self, factor: f32) -> f32;
    /// `LANES` weights widened at once into one build's registers (`widen` per lane).
    fn lanes<S: Lanes>(src: &[Self; LANES], factor: f32) -> S;
}

/// bf16 bits: widening is a shift.
impl Weight for u16 {
    const SCALED: bool = false;
    fn row_factor(_: f32) -> f32 {
        1.0
    }
    #[inline(always)]
    fn widen(self, _: f32) -> f32 {
        widen(self)
    }
    #[inline(always)]
    fn lanes<S: Lanes>(src: &[Self; LANES], _: f32) -> S {
        S::bf16(src)
    }
}

/// f32 values (the attention's keys and values): widening is nothing.
impl Weight for f32 {
    const SCALED: bool = false;
    fn row_factor(_: f32) -> f32 {
        1.0
    }
    #[inline(always)]
    fn widen(self, _: f32) -> f32 {
        self
    }
    #[inline(always)]
    fn lanes<S: Lanes>(src: &[Self; LANES], _: f32) -> S {
        S::load(src)
    }
}

/// 2^120: the bias of f32 exponents (127) less that of e4m3 (7).
const E4M3_REBIAS: f32 = f32::from_bits(0x7B80_0000);

/// e4m3fn codes. The code's exponent and mantissa bits, put where f32 keeps them, read as
/// f32 are the value scaled by 2^-120 (subnormals included) with the sign carried over; the
/// row factor is the row's scale times 2^120, so one multiply gives `f32(code) · scale`
/// exactly (at most 4 + 8 significant bits; `quant::linear` refuses scales that would
/// overflow). The NaN codes (0x7F, 0xFF) stay NaN. Branch-free, so that the loops vectorise.
impl Weight for u8 {
    const SCALED: bool = true;
    fn row_factor(scale: f32) -> f32 {
        scale * E4M3_REBIAS
    }
    #[inline(always)]
    fn widen(self, factor: f32) -> f32 {
        let c = u32::from(self);
        let v = f32::from_bits(((c & 0x7F) << 20) | ((c & 0x80) << 24)) * factor;
        if c & 0x7F == 0x7F {
            f32::NAN
        } else {
            v
        }
    }
    #[inline(always)]
    fn lanes<S: Lanes>(src: &[Self; LANES], factor: f32) -> S {
        S::e4m3(src, factor)
    }
}

mod lanes;
#[cfg(target_arch = "aarch64")]
use lanes::Neon;
#[cfg(target_arch = "x86_64")]
use lanes::{Avx2, Avx512};
pub use lanes::{Lanes, Scalar};

/// Hints the cache to fetch `w[i]` soon (into every level: a non-temporal hint for one
/// token's pass measured the same on a Zen 4 VM, one and two threads). Branch-free: an index
/// past the end (the rows after the last) hints at an address nothing reads, which a prefetch
/// never faults on.
#[inline(always)]
fn prefetch<W>(w: &[W], i: usize) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, i);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address, and the
    // pointer is never dereferenced.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            w.as_ptr().wrapping_add(i).cast::<i8>(),
        )
    };
}

#[inline(always)]
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Row `r`'s factor (`Weight::row_factor`; unscaled weights take no scales).
#[inline(always)]
fn row_scale<W: Weight>(scale: &[f32], r: usize) -> f32 {
    if W::SCALED {
        W::row_factor(scale[r])
    } else {
        1.0
    }
}

kernel! {
    /// `y[r] = Σ_k w[r, k] · x[k]` for the rows of `w` (`[y.len(), x.len()]`); scaled weights
    /// take `scale` (`[y.len()]`), bf16 ones an empty slice.
    pub fn dot_rows / dot_rows_on<W: Weight>(w: &[W], scale: &[f32], x: &[f32], y: &mut [f32])
        => avx512: dot_rows_generic::<Avx512, W, 1>,
            avx2: dot_rows_generic::<Avx2, W, 1>,
            neon: dot_rows_generic::<Neon, W, 1>,
            baseline: dot_rows_generic::<Scalar, W, 2>
}

kernel! {
    /// `dot_rows` for `t` tokens at once: `x` is `[t, k]` and `y` is `[t, rows]`. Each
    /// weight row is widened once for all tokens, and every (row, token)
    /// dot product is computed in exactly the order `dot_rows` uses for that token alone: a
    /// token's output never depends on which other tokens share the batch.
    pub fn dot_rows_multi / dot_rows_multi_on<W: Weight>(
        w: &[W],
        scale: &[f32],
        x: &[f32],
        t: usize,
        y: &mut [f32],
    ) => avx512: dot_rows_multi_generic::<Avx512, W, 4, 4>,
        avx2: dot_rows_multi_generic::<Avx2, W, 3, 2>,
        neon: dot_rows_multi_generic::<Neon, W, 1, 4>,
        baseline: dot_rows_multi_generic::<Scalar, W, 1, 4>
}

/// The canonical sum of one dot product's lane accumulators: halves added pairwise
/// (`a[i] + a[i + 8]`, then 4, 2, 1), the order a SIMD register's horizontal sum takes.
#[inline(always)]
fn lane_sum(a: &[f32; LANES]) -> f32 {
    let mut h = *a;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            h[i] += h[i + width];
        }
        width /= 2;
    }
    h[0]
}

/// `dot_rows_multi` in tiles of `R` rows × `T` tokens (the remainders in smaller tiles).
/// AVX-512 takes 4 × 4: on a 2-core AMD EPYC (Zen 4) VM, 6 × 4 with the rows outer measured
/// the same (104 GFLOP/s a core at 32 and 128 tokens, `examples/kernel_tiles.rs`), which is
/// what the best f32 tiles reached there in a C probe of this loop (105-108; loads, not
/// multiply-adds, set the pace). On a 2-core Sapphire Rapids VM, more tokens to a tile (one
/// row's widening shared by more multiply-adds) measured slower at 128 tokens: 3 × 8 ~70 and
/// 2 × 8 ~57 GFLOP/s against ~75 for 4 × 4 (medians of 6 alternating runs).
///
/// AVX2 takes 3 × 2. Measured and not kept, on a 2-core AMD EPYC (Zen 3) VM: 3 × 4 tiles
/// that run each of the two registers' 8 lanes over the whole of K in turn (the same bits:
/// each lane's chain is unchanged), so that 12 accumulators fit AVX2's 16 registers and
/// each widened weight serves four multiply-adds rather than two. In one process, the two
/// tiles interleaved call by call (medians of 300), it ran 1.02-1.05× at K = 1024 and
/// 0.87× at K = 2048, where four tokens' inputs no longer stay in L1 for the second pass;
/// LLVM kept every accumulator in registers in both.
#[inline(always)]
fn dot_rows_multi_generic<S: Lanes, W: Weight, const R: usize, const T: usize>(
    w: &[W],
    scale: &[f32],
    x: &[f32],
    t: usize,
    y: &mut [f32],
) {
    let k = x.len() / t.max(1);
    let rows = y.len() / t.max(1);
    assert!(
        w.len() >= rows * k && x.len() == t * k && y.len() == rows * t,
        "shapes do not match"
    );
    assert!(!W::SCALED || scale.len() >= rows, "one scale per row");
    let block = (X_BLOCK_BYTES / (4 * k.max(1))).max(1).next_multiple_of(T);
    for (t0, tn, r0, whole) in tile_walk(t, rows, block, R) {
        let (x, y) = (
            &x[t0 * k..(t0 + tn) * k],
            &mut y[t0 * rows..(t0 + tn) * rows],
        );
        if whole {
            row_tiles::<S, W, R, T>(w, scale, x, k, tn, r0, y)
        } else {
            row_tiles::<S, W, 1, T>(w, scale, x, k, tn, r0, y)
        }
    }
}

/// The walk of the dot kernels over a product: blocks of `block` tokens, whose inputs stay
/// in the core's cache while every row passes over them (a long prompt's inputs would
/// otherwise stream from memory once per row tile), and in each block the rows in tiles of
/// `r`, then one at a time. Yields `(t0, tn, r0, whole)`: tokens `t0..t0 + tn` of rows
/// `r0..r0 + r` (`whole`) or of row `r0` alone. (An iterator, not a closure that takes the
/// tiles: a closure is not built with its caller's instruction set, and its intrinsics
/// would not inline.)
fn tile_walk(
    t: usize,
    rows: usize,
    block: usize,
    r: usize,
) -> impl Iterator<Item = (usize, usize, usize, bool)> {
    let whole = rows / r * r;
    (0..t).step_by(block.max(1)).flat_map(move |t0| {
        let tn = block.min(t - t0);
        (0..whole)
            .step_by(r)
            .map(move |r0| (t0, tn, r0, true))
            .chain((whole..rows).map(move |r0| (t0, tn, r0, false)))
    })
}

/// The inputs one token block of `dot_rows_multi` holds (a share of a core's L2). 16 KB
/// (one 4 × 4 tile's inputs, in L1) ran `examples/kernel_tiles.rs` ~15% faster at 32 and 128
/// tokens on a Sapphire Rapids VM, but prefills of 128 and 8192 tokens (2 threads) read
/// within noise of 512 KB, so this stayed.
const X_BLOCK_BYTES: usize = 512 * 1024;

/// Rows `r0..r0 + R` for every token: tiles of `T` tokens, then pairs, then single tokens.
#[inline(always)]
fn row_tiles<S: Lanes, W: Weight, const R: usize, const T: usize>(
    w: &[W],
    scale: &[f32],
    x: &[f32],
    k: usize,
    t: usize,
    r0: usize,
    y: &mut [f32],
) {
    let n = y.len() / t;
    let s: [f32; R] = std::array::from_fn(|r| row_scale::<W>(scale, r0 + r));
    let rows: [&[W]; R] = std::array::from_fn(|r| &w[(r0 + r) * k..(r0 + r + 1) * k]);
    // The rows of the next tile, fetched into the cache while this one computes (empty
    // past the last row).
    let next: [&[W]; R] = std::array::from_fn(|r| {
        let at = ((r0 + R + r) * k).min(n * k).min(w.len());
        &w[at..((r0 + R + r + 1) * k).min(n * k).min(w.len())]
    });
    let mut i0 = 0;
    while i0 + T <= t {
        token_tile::<S, W, R, T>(&rows, &next, &s, x, k, i0, n, r0, y);
        i0 += T;
    }
    // Pairs before singles (`t` of 2 or 3, or the last of a longer batch).
    while T > 2 && i0 + 2 <= t {
        token_tile::<S, W, R, 2>(&rows, &next, &s, x, k, i0, n, r0, y);
        i0 += 2;
    }
    while i0 < t {
        token_tile::<S, W, R, 1>(&rows, &next, &s, x, k, i0, n, r0, y);
        i0 += 1;
    }
}

/// Tokens `i0..i0 + T` of `row_tiles`, stored into `y` (`[t, n]`) at rows `r0..r0 + R`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn token_tile<S: Lanes, W: Weight, const R: usize, const T: usize>(
    rows: &[&[W]; R],
    next: &[&[W]; R],
    s: &[f32; R],
    x: &[f32],
    k: usize,
    i0: usize,
    n: usize,
    r0: usize,
    y: &mut [f32],
) {
    let xs: [&[f32]; T] = std::array::from_fn(|j| &x[(i0 + j) * k..(i0 + j + 1) * k]);
    let out = dot_tile::<S, W, R, T>(rows, next, s, &xs);
    for (r, o) in out.iter().enumerate() {
        for (j, v) in o.iter().enumerate() {
            y[(i0 + j) * n + r0 + r] = *v;
        }
    }
}

/// The dot products of `R` weight rows (factors `s`) with `T` tokens, each in the one
/// canonical order: `LANES` accumulators over K (lane `i` takes the elements `i mod LANES`
/// of the full chunks, in order), summed by `lane_sum`, then the tail element by element.
/// The tile shape decides only which products share a pass over the weights, never a bit.
#[inline(always)]
fn dot_tile<S: Lanes, W: Weight, const R: usize, const T: usize>(
    rows: &[&[W]; R],
    next: &[&[W]; R],
    s: &[f32; R],
    xs: &[&[f32]; T],
) -> [[f32; T]; R] {
    let k = xs[0].len();
    let chunks = k / LANES;
    // Every row and input as exactly `chunks` full chunks: the loop below indexes them
    // without a bounds check.
    let wc: [&[[W; LANES]]; R] = std::array::from_fn(|r| &rows[r].as_chunks().0[..chunks]);
    let xc: [&[[f32; LANES]]; T] = std::array::from_fn(|j| &xs[j].as_chunks().0[..chunks]);
    let mut acc = [[S::zero(); T]; R];
    for c in 0..chunks {
        let mut wv = [S::zero(); R];
        for r in 0..R {
            prefetch(next[r], c * LANES);
            wv[r] = W::lanes(&wc[r][c], s[r]);
        }
        for j in 0..T {
            let xv = S::load(&xc[j][c]);
            for r in 0..R {
                acc[r][j] = acc[r][j].fma(wv[r], xv);
            }
        }
    }
    let mut out = [[0.0f32; T]; R];
    let sums = tile_sums(&acc);
    for r in 0..R {
        for j in 0..T {
            let mut sum = sums[r][j];
            for i in chunks * LANES..k {
                sum = rows[r][i].widen(s[r]).mul_add(xs[j][i], sum);
            }
            out[r][j] = sum;
        }
    }
    out
}

/// Each accumulator's `lane_sum` (sixteen at once where the tile has sixteen).
#[inline(always)]
fn tile_sums<S: Lanes, const R: usize, const T: usize>(acc: &[[S; T]; R]) -> [[f32; T]; R] {
    let mut sums = [[0.0f32; T]; R];
    if R * T == 16 {
        let all: [S; 16] = std::array::from_fn(|i| acc[i / T][i % T]);
        let s16 = S::sum16(&all);
        for (i, s) in s16.iter().enumerate() {
            sums[i / T][i % T] = *s;
        }
    } else {
        for r in 0..R {
            for j in 0..T {
                sums[r][j] = acc[r][j].sum();
            }
        }
    }
    sums
}

/// The `LANES` elements of `v` from `o`.
#[inline(always)]
fn chunk<T>(v: &[T], o: usize) -> &[T; LANES] {
    v[o..o + LANES].try_into().expect("a full chunk")
}

/// `dot_rows`: the tiles of `dot_rows_multi` for one token, `R` rows per pass. One row at a
/// time reads the matrix as one sequential stream per core, which the hardware prefetcher
/// follows best: on a 2-core AMD EPYC VM, 2 MB products ran at ~28 GB/s with one row per pass
/// against ~23 GB/s with 8 interleaved row streams (the read bandwidth: ~30 GB/s).
#[inline(always)]
fn dot_rows_generic<S: Lanes, W: Weight, const R: usize>(
    w: &[W],
    scale: &[f32],
    x: &[f32],
    y: &mut [f32],
) {
    assert_eq!(w.len(), y.len() * x.len(), "weight rows do not match");
    dot_rows_multi_generic::<S, W, R, 1>(w, scale, x, 1, y);
}

mod axpy;
use axpy::axpy_columns;
pub use axpy::{axpy_rows, axpy_rows_multi, axpy_rows_multi_on, axpy_rows_on};
mod attend;
mod dot_bf16;
pub use attend::{attend_block, attend_block_on, exp_canonical, HeadBlock, KvRows};
pub use dot_bf16::{
    bf16_dot_in_hardware, dot_bf16_emulated, dot_bf16_emulated_on, dot_bf16_multi,
    dot_bf16_multi_on, round_activations,
};
mod convert;
pub use convert::{
    from_bf16, from_bf16_on, from_bf16_vec, round_bf16, round_bf16_on, to_bf16, to_bf16_on,
    to_bf16_vec,
};

#[cfg(test)]
mod tests;
