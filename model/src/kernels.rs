//! Fused widen-and-multiply kernels for the weight products (see `Linear::forward_into`):
//! bf16 weights, and FP8 (e4m3) weights with one scale per row.
//!
//! Every product has one canonical reduction order, fixed by the weight layout alone:
//! - `[out, in]` rows (`dot_rows*`): `LANES` accumulators over K (lane `i` takes the
//!   elements `i mod LANES` of the full chunks, in order), the pairwise tree `lane_sum`, then
//!   the tail element by element;
//! - `[in, out]` ("x @ W", `axpy_rows*`): one accumulator per output, K ascending.
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
    /// `y[j] = Σ_k x[k] · w[k, j0 + j]` over a `[x.len(), cols]` bf16 matrix (the "x @ W"
    /// orientation), for the column range `j0..j0 + y.len()`.
    pub fn axpy_rows / axpy_rows_on<W: Weight>(w: &[W], cols: usize, j0: usize, x: &[f32], y: &mut [f32])
        => avx512: axpy_blocks::<Avx512, W, 8, 1, 0>,
            avx2: axpy_blocks::<Avx2, W, 16, 1, 0>,
            neon: axpy_blocks::<Neon, W, 16, 1, 0>,
            baseline: axpy_blocks::<Scalar, W, 16, 1, 0>
}

kernel! {
    /// `axpy_rows` for `t` tokens at once: `x` is `[t, k]`, `y` is `[t, y_cols]`. Each token's
    /// result is computed in exactly the order `axpy_rows` uses for it alone, so a token's
    /// output never depends on which other tokens share the call.
    pub fn axpy_rows_multi / axpy_rows_multi_on<W: Weight>(
        w: &[W],
        cols: usize,
        j0: usize,
        x: &[f32],
        t: usize,
        y: &mut [f32],
    ) => avx512: axpy_rows_multi_generic::<Avx512, W, 4, 4, 8, 8>,
        avx2: axpy_rows_multi_generic::<Avx2, W, 2, 2, 16, 4>,
        neon: axpy_rows_multi_generic::<Neon, W, 1, 4, 16, 8>,
        baseline: axpy_rows_multi_generic::<Scalar, W, 1, 4, 16, 8>
}

/// `axpy_rows_multi`: up to `STREAM_TOKENS` tokens (an expert's few tokens of a step, its
/// weights read from memory once) in blocks of `KB` rows, as `axpy_rows` reads them, with
/// at most `G` tokens' accumulators in registers at a time (more in two groups); more
/// tokens in tiles of `C` lane chunks of columns × `T` tokens (the remainders in smaller
/// tiles, the last columns one by one). The canonical order of every output: one
/// accumulator from 0, `fma(w[k, j], x[k], acc)` for k ascending, in every tile shape,
/// block and group.
///
/// AVX2 keeps at most 4 tokens to a group: 8 tokens' accumulators take all 16 of its
/// registers, and its build of this kernel stored registers to the stack (12 spills, none
/// now). On a 2-core AMD EPYC (Zen 3) VM, 8 tokens through 16 experts' 1024 × 1024 slices
/// (`examples/kernel_tiles.rs`, one core, medians of 10 alternating runs) went from 2.7 to
/// 3.4 GB/s; 1 to 4 tokens run the same code as before. AVX-512 (32 registers) keeps 8,
/// and NEON and the baseline too (not measured).
#[inline(always)]
fn axpy_rows_multi_generic<
    S: Lanes,
    W: Weight,
    const C: usize,
    const T: usize,
    const KB: usize,
    const G: usize,
>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
) {
    let k = x.len() / t.max(1);
    assert_eq!(x.len(), t * k, "inputs shape");
    assert!(G >= STREAM_TOKENS / 2, "at most two groups of tokens");
    // One arm per count up to `STREAM_TOKENS` (the tokens' accumulators are arrays whose
    // lengths are constants): one group of `t`, or past `G`, two of about half.
    match t {
        1 => axpy_blocks::<S, W, KB, 1, 0>(w, cols, j0, x, y),
        2 => axpy_blocks::<S, W, KB, 2, 0>(w, cols, j0, x, y),
        3 => axpy_blocks::<S, W, KB, 3, 0>(w, cols, j0, x, y),
        4 => axpy_blocks::<S, W, KB, 4, 0>(w, cols, j0, x, y),
        5 if G >= 5 => axpy_blocks::<S, W, KB, 5, 0>(w, cols, j0, x, y),
        5 => axpy_blocks::<S, W, KB, 3, 2>(w, cols, j0, x, y),
        6 if G >= 6 => axpy_blocks::<S, W, KB, 6, 0>(w, cols, j0, x, y),
        6 => axpy_blocks::<S, W, KB, 3, 3>(w, cols, j0, x, y),
        7 if G >= 7 => axpy_blocks::<S, W, KB, 7, 0>(w, cols, j0, x, y),
        7 => axpy_blocks::<S, W, KB, 4, 3>(w, cols, j0, x, y),
        STREAM_TOKENS if G >= STREAM_TOKENS => {
            axpy_blocks::<S, W, KB, STREAM_TOKENS, 0>(w, cols, j0, x, y)
        }
        STREAM_TOKENS => axpy_blocks::<S, W, KB, 4, 4>(w, cols, j0, x, y),
        _ => axpy_columns::<S, W, C, T>(w, cols, j0, x, k, k, t, y, false),
    }
}

/// The most tokens `axpy_rows_multi` takes through `axpy_blocks`: an expert's weights come
/// from memory, and up to this many tokens its rows read in order outrun register tiles of
/// columns, which read each row in pieces far apart (2-core AMD EPYC (Zen 4) VM, one core,
/// 16 experts' 1024 × 1024 slices, `examples/kernel_tiles.rs`: 2 tokens ~12-13 against
/// ~6-7 GB/s, 4 ~11 against ~6, 8 ~7 against ~5; the AVX2 build 2 tokens ~10 against ~4.4,
/// 8 the same; at 16 the tiles' arithmetic is what counts).
const STREAM_TOKENS: usize = 8;

/// `axpy_rows_multi` where token `i`'s `k` inputs are `x[i·xs..i·xs + k]`; with
/// `accumulate` every output's chain continues from what `y` holds, so consecutive calls
/// over consecutive ranges of K give the bits of one call over all of it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn axpy_columns<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    t: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let n = y.len() / t.max(1);
    assert!(
        w.len() >= k * cols
            && j0 + n <= cols
            && (t == 0 || (t - 1) * xs + k <= x.len())
            && y.len() == t * n,
        "weight shape"
    );
    let mut j = 0;
    while j + C * LANES <= n {
        column_tiles::<S, W, C, T>(w, cols, j0, j, x, xs, k, t, y, accumulate);
        j += C * LANES;
    }
    while j + LANES <= n {
        column_tiles::<S, W, 1, T>(w, cols, j0, j, x, xs, k, t, y, accumulate);
        j += LANES;
    }
    for jj in j..n {
        for i in 0..t {
            let mut acc = if accumulate { y[i * n + jj] } else { 0.0 };
            for kk in 0..k {
                acc = w[kk * cols + j0 + jj]
                    .widen(1.0)
                    .mul_add(x[i * xs + kk], acc);
            }
            y[i * n + jj] = acc;
        }
    }
}

/// Output columns `j..j + C·LANES` (of the range from `j0`) for every token: tiles of `T`
/// tokens, then pairs, then single tokens.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_tiles<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    j: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    t: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let mut i0 = 0;
    while i0 + T <= t {
        column_tile::<S, W, C, T>(w, cols, j0 + j, j, x, xs, k, i0, t, y, accumulate);
        i0 += T;
    }
    // Pairs before singles: an expert's two or three tokens share each pass over its rows.
    while T > 2 && i0 + 2 <= t {
        column_tile::<S, W, C, 2>(w, cols, j0 + j, j, x, xs, k, i0, t, y, accumulate);
        i0 += 2;
    }
    while i0 < t {
        column_tile::<S, W, C, 1>(w, cols, j0 + j, j, x, xs, k, i0, t, y, accumulate);
        i0 += 1;
    }
}

/// Tokens `i0..i0 + T` of `column_tiles`: their accumulators start at 0 or, with
/// `accumulate`, at what `y` holds, and are stored back there.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_tile<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    col: usize,
    j: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    i0: usize,
    t: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let n = y.len() / t;
    let at = |i: usize, c: usize| (i0 + i) * n + j + c * LANES;
    // Loops, not `std::array::from_fn`, in the kernels' bodies: its closure is a function
    // of its own, compiled without the kernel's instruction set and called per element.
    let mut acc = [[S::zero(); C]; T];
    if accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            for (c, v) in a.iter_mut().enumerate() {
                *v = S::load(chunk(y, at(i, c)));
            }
        }
    }
    let acc = axpy_tile::<S, W, C, T>(w, cols, col, &x[i0 * xs..], xs, k, acc);
    for (i, a) in acc.iter().enumerate() {
        for (c, v) in a.iter().enumerate() {
            let o = at(i, c);
            v.store((&mut y[o..o + LANES]).try_into().expect("a chunk"));
        }
    }
}

/// Rows of the matrix ahead of the current one whose tile columns are prefetched.
const AXPY_PREFETCH_ROWS: usize = 8;

/// Columns `col..col + C·LANES` of `T` tokens (token `i`'s `k` inputs from `x[i·xs]`),
/// every weight row once, continuing the accumulators `acc`.
#[inline(always)]
fn axpy_tile<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    col: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    mut acc: [[S; C]; T],
) -> [[S; C]; T] {
    for kk in 0..k {
        let row = kk * cols + col;
        for line in (0..C * LANES).step_by(32) {
            prefetch(w, row + AXPY_PREFETCH_ROWS * cols + line);
        }
        let mut wv = [S::zero(); C];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = W::lanes(chunk(w, row + c * LANES), 1.0);
        }
        for i in 0..T {
            let xb = S::splat(x[i * xs + kk]);
            for c in 0..C {
                acc[i][c] = acc[i][c].fma(wv[c], xb);
            }
        }
    }
    acc
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
/// multiply-adds, set the pace).
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
    // Blocks of tokens whose inputs stay in the core's cache while every row passes over
    // them (a long prompt's inputs would otherwise stream from memory once per row tile).
    let block = (X_BLOCK_BYTES / (4 * k.max(1))).max(1).next_multiple_of(T);
    let mut t0 = 0;
    while t0 < t {
        let tn = block.min(t - t0);
        let (x, y) = (
            &x[t0 * k..(t0 + tn) * k],
            &mut y[t0 * rows..(t0 + tn) * rows],
        );
        let mut r0 = 0;
        while r0 + R <= rows {
            row_tiles::<S, W, R, T>(w, scale, x, k, tn, r0, y);
            r0 += R;
        }
        while r0 < rows {
            row_tiles::<S, W, 1, T>(w, scale, x, k, tn, r0, y);
            r0 += 1;
        }
        t0 += tn;
    }
}

/// The inputs one token block of `dot_rows_multi` holds (a share of a core's L2).
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
    let mut sums = [[0.0f32; T]; R];
    if R * T == 16 {
        let mut all = [S::zero(); 16];
        for r in 0..R {
            for j in 0..T {
                all[r * T + j] = acc[r][j];
            }
        }
        let s16 = S::sum16(&all);
        for r in 0..R {
            for j in 0..T {
                sums[r][j] = s16[r * T + j];
            }
        }
    } else {
        for r in 0..R {
            for j in 0..T {
                sums[r][j] = acc[r][j].sum();
            }
        }
    }
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

/// `A + B` tokens' `axpy_rows` (`x` is `[A + B, k]`, `y` is `[A + B, n]`) in one pass over
/// the rows: each block of `KB` rows, chunk by chunk of columns, carries every token's
/// accumulator for the chunk in `y`, the first `A` tokens' in registers, then the other
/// `B`'s (`B` is 0 where all fit). Every output's chain is the canonical one (from 0, `fma`
/// for k ascending), so the bits are those of the column tiles, whatever the block or group.
///
/// The rows stream in order, as one sequential read per core, where register tiles of
/// columns (`axpy_columns`) read each row in pieces far apart (one token, an expert's
/// 1024 × 1024 slice per core, 2-core EPYC VM: ~22 against ~19 GB/s, medians of 6). AVX-512
/// takes blocks of 8 rows: on a 2-core AMD EPYC (Zen 4) VM, one token through 16 experts'
/// 1024 × 1024 slices ran at ~14 GB/s against ~10 with 16 (`examples/kernel_tiles.rs`; 4 and
/// 32 were slower still).
#[inline(always)]
fn axpy_blocks<S: Lanes, W: Weight, const KB: usize, const A: usize, const B: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let t = A + B;
    let (k, n) = (x.len() / t, y.len() / t);
    assert!(
        x.len() == t * k && y.len() == t * n && w.len() >= k * cols && j0 + n <= cols,
        "weight shape"
    );
    y.fill(0.0);
    let full = n / LANES * LANES;
    let mut k0 = 0;
    while k0 < k {
        let kn = KB.min(k - k0);
        for o in (0..full).step_by(LANES) {
            if o % 32 == 0 {
                for r in 0..kn {
                    prefetch(w, (k0 + KB + r) * cols + j0 + o);
                }
            }
            // The second group reads the block's weights again, from L1.
            block_group::<S, W, A>(w, cols, j0 + o, k0, kn, &x[..A * k], &mut y[..A * n], o);
            block_group::<S, W, B>(w, cols, j0 + o, k0, kn, &x[A * k..], &mut y[A * n..], o);
        }
        for i in 0..t {
            for j in full..n {
                let out = &mut y[i * n + j];
                for kk in k0..k0 + kn {
                    *out = w[kk * cols + j0 + j]
                        .widen(1.0)
                        .mul_add(x[i * k + kk], *out);
                }
            }
        }
        k0 += kn;
    }
}

/// One group of `axpy_blocks`: `T` tokens (`x` is `[T, k]`, `y` is `[T, n]`), weight rows
/// `k0..k0 + kn` at columns `col..col + LANES`, continuing the accumulators that `y` holds
/// at `o`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_group<S: Lanes, W: Weight, const T: usize>(
    w: &[W],
    cols: usize,
    col: usize,
    k0: usize,
    kn: usize,
    x: &[f32],
    y: &mut [f32],
    o: usize,
) {
    if T == 0 {
        return;
    }
    let (k, n) = (x.len() / T, y.len() / T);
    let mut acc = [S::zero(); T];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = S::load(chunk(y, i * n + o));
    }
    for r in 0..kn {
        let kk = k0 + r;
        let wv = W::lanes(chunk(w, kk * cols + col), 1.0);
        for (i, a) in acc.iter_mut().enumerate() {
            *a = a.fma(wv, S::splat(x[i * k + kk]));
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let at = i * n + o;
        a.store((&mut y[at..at + LANES]).try_into().expect("a chunk"));
    }
}

mod attend;
pub use attend::{attend_block, attend_block_on, exp_canonical, HeadBlock, KvRows};
mod convert;
pub use convert::{
    from_bf16, from_bf16_on, from_bf16_vec, round_bf16, round_bf16_on, to_bf16, to_bf16_on,
    to_bf16_vec,
};

#[cfg(test)]
mod tests;
