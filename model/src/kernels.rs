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
//! token the same bits. Each kernel is written once over [`Lanes`] and built three times
//! (baseline arrays, AVX2 + FMA, AVX-512), chosen at run time; the builds differ in tile
//! shapes only, never in the per-lane operations.
#![allow(unsafe_code)]

/// Lanes of independent accumulators per row: one AVX-512 register, two AVX ones.
const LANES: usize = 16;

/// How far ahead of the current element each row's weights are prefetched.
const PREFETCH_AHEAD: usize = 512;

/// A public kernel that runs its portable body (`$body`, or one body per build where they
/// differ only in tile shape) compiled for the best instruction set the CPU has, chosen at
/// run time: AVX-512, AVX2 + FMA, or the baseline. Each lane does the same operations in the
/// same order in every build (the loops are written per lane and sums are taken in one fixed
/// tree, `lane_sum`), so the bits never depend on which build runs: a cluster of machines
/// with different instruction sets computes what one does.
macro_rules! kernel {
    (
        $(#[$doc:meta])*
        pub fn $name:ident / $on:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) => $body:ident
    ) => {
        kernel! {
            $(#[$doc])*
            pub fn $name / $on $(<$g: $bound>)? ($($arg: $ty),*)
                => avx512: $body, avx2: $body, baseline: $body
        }
    };
    (
        $(#[$doc:meta])*
        pub fn $name:ident / $on:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?)
            => avx512: $b512:expr, avx2: $b2:expr, baseline: $b0:expr
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
            let _ = isa;
            $b0($($arg),*)
        }
    };
}

/// The instruction set the kernels run with on this CPU, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    Avx2,
    Avx512,
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
        #[cfg(not(target_arch = "x86_64"))]
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

/// `LANES` f32 lanes held the way one build holds them: an array (the baseline), two AVX
/// registers, one AVX-512 register. Every operation is the same per-lane IEEE operation in
/// each, so a kernel written over `Lanes` gives the same bits in every build.
pub trait Lanes: Copy {
    fn zero() -> Self;
    fn load(x: &[f32; LANES]) -> Self;
    /// bf16 bits widened (`Weight::widen` for `u16`).
    fn bf16(w: &[u16; LANES]) -> Self;
    /// e4m3 codes times their row factor (`Weight::widen` for `u8`).
    fn e4m3(w: &[u8; LANES], factor: f32) -> Self;
    /// `self + w · x` per lane, fused (one rounding).
    fn fma(self, w: Self, x: Self) -> Self;
    /// The lanes summed in the canonical tree (`lane_sum`).
    fn sum(self) -> f32;
    /// `sum` of 16 registers at once (a build may share the tree's steps between them).
    #[inline(always)]
    fn sum16(v: &[Self; 16]) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        for (o, x) in out.iter_mut().zip(v) {
            *o = x.sum();
        }
        out
    }
    /// Every lane `v`.
    fn splat(v: f32) -> Self;
    fn store(self, out: &mut [f32; LANES]);
}

/// The baseline build's lanes: plain arrays.
#[derive(Clone, Copy)]
pub struct Scalar([f32; LANES]);

impl Lanes for Scalar {
    #[inline(always)]
    fn zero() -> Self {
        Self([0.0; LANES])
    }
    #[inline(always)]
    fn load(x: &[f32; LANES]) -> Self {
        Self(*x)
    }
    #[inline(always)]
    fn bf16(w: &[u16; LANES]) -> Self {
        Self(std::array::from_fn(|i| widen(w[i])))
    }
    #[inline(always)]
    fn e4m3(w: &[u8; LANES], factor: f32) -> Self {
        Self(std::array::from_fn(|i| w[i].widen(factor)))
    }
    #[inline(always)]
    fn fma(self, w: Self, x: Self) -> Self {
        Self(std::array::from_fn(|i| w.0[i].mul_add(x.0[i], self.0[i])))
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        lane_sum(&self.0)
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Self([v; LANES])
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; LANES]) {
        *out = self.0;
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{Avx2, Avx512};

/// The AVX2 and AVX-512 lanes. Their methods are reached only from kernels built with those
/// features (`kernel!` runs a build only on a CPU that has it), where they are inlined; the
/// types stay private to this module, so nothing else can call them on a CPU without them.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{Lanes, LANES};

    /// Two AVX registers: lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    pub struct Avx2([__m256; 2]);

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    /// The last steps of the canonical sum from 8 partial sums `h[i] + h[i + 8]`: then
    /// `+ [i + 4]`, `+ [i + 2]`, `+ [i + 1]`.
    #[inline(always)]
    fn sum8(s8: __m256) -> f32 {
        // SAFETY: only inlined into AVX2 (or AVX-512) builds (see the module doc).
        unsafe {
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
            _mm_cvtss_f32(s1)
        }
    }

    /// e4m3 codes (as 32-bit lanes) to f32 times `factor`, NaN codes to NaN: the bit moves
    /// of `Weight::widen` for `u8`.
    #[inline(always)]
    fn e4m3_8(c: __m256i, factor: f32) -> __m256 {
        // SAFETY: only inlined into AVX2 (or AVX-512) builds (see the module doc).
        unsafe {
            let mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
            let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(c, _mm256_set1_epi32(0x80)));
            let bits = _mm256_or_si256(_mm256_slli_epi32::<20>(mag), sign);
            let v = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(factor));
            let nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F)));
            _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), nan)
        }
    }

    /// 8 bf16 bits widened.
    #[inline(always)]
    fn bf16_8(w: &[u16]) -> __m256 {
        assert!(w.len() >= 8);
        // SAFETY: AVX2 builds only; `w` holds at least 8 u16 (one unaligned 16-byte load).
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.as_ptr().cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }

    /// 8 codes as 32-bit lanes.
    #[inline(always)]
    fn codes_8(w: &[u8]) -> __m256i {
        assert!(w.len() >= 8);
        // SAFETY: AVX2 builds only; `w` holds at least 8 bytes (one unaligned 8-byte load).
        unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(w.as_ptr().cast())) }
    }

    impl Lanes for Avx2 {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: AVX builds only (see the module doc).
            unsafe { Self([_mm256_setzero_ps(); 2]) }
        }
        #[inline(always)]
        fn load(x: &[f32; LANES]) -> Self {
            // SAFETY: AVX builds only; `x` holds 16 floats (two unaligned 8-lane loads).
            unsafe {
                Self([
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                ])
            }
        }
        #[inline(always)]
        fn bf16(w: &[u16; LANES]) -> Self {
            Self([bf16_8(&w[..8]), bf16_8(&w[8..])])
        }
        #[inline(always)]
        fn e4m3(w: &[u8; LANES], factor: f32) -> Self {
            Self([
                e4m3_8(codes_8(&w[..8]), factor),
                e4m3_8(codes_8(&w[8..]), factor),
            ])
        }
        #[inline(always)]
        fn fma(self, w: Self, x: Self) -> Self {
            // SAFETY: FMA builds only (see the module doc).
            unsafe {
                Self([
                    _mm256_fmadd_ps(w.0[0], x.0[0], self.0[0]),
                    _mm256_fmadd_ps(w.0[1], x.0[1], self.0[1]),
                ])
            }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            // SAFETY: AVX builds only (see the module doc).
            sum8(unsafe { _mm256_add_ps(self.0[0], self.0[1]) })
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX builds only (see the module doc).
            unsafe { Self([_mm256_set1_ps(v); 2]) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            // SAFETY: AVX builds only; `out` holds 16 floats (two unaligned 8-lane stores).
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), self.0[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), self.0[1]);
            }
        }
    }

    impl Lanes for Avx512 {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: AVX-512 builds only (see the module doc).
            unsafe { Self(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        fn load(x: &[f32; LANES]) -> Self {
            // SAFETY: AVX-512 builds only; `x` holds 16 floats (one unaligned load).
            unsafe { Self(_mm512_loadu_ps(x.as_ptr())) }
        }
        #[inline(always)]
        fn bf16(w: &[u16; LANES]) -> Self {
            // SAFETY: AVX-512 builds only; `w` holds 16 u16 (one unaligned 32-byte load).
            unsafe {
                let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(w.as_ptr().cast()));
                Self(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide)))
            }
        }
        #[inline(always)]
        fn e4m3(w: &[u8; LANES], factor: f32) -> Self {
            // SAFETY: AVX-512 builds only; `w` holds 16 bytes (one unaligned 16-byte load).
            unsafe {
                let c = _mm512_cvtepu8_epi32(_mm_loadu_si128(w.as_ptr().cast()));
                let mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
                let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(c, _mm512_set1_epi32(0x80)));
                let bits = _mm512_or_si512(_mm512_slli_epi32::<20>(mag), sign);
                let v = _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(factor));
                let nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F));
                Self(_mm512_mask_blend_ps(nan, v, _mm512_set1_ps(f32::NAN)))
            }
        }
        #[inline(always)]
        fn fma(self, w: Self, x: Self) -> Self {
            // SAFETY: AVX-512 builds only (see the module doc).
            unsafe { Self(_mm512_fmadd_ps(w.0, x.0, self.0)) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            // SAFETY: AVX-512 builds only (see the module doc).
            unsafe {
                let lo = _mm512_castps512_ps256(self.0);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
                sum8(_mm256_add_ps(lo, hi))
            }
        }
        /// The tree of `lane_sum` for 16 registers, two at a time per step: halves of two
        /// registers added in one (45 shuffles and adds instead of 16 × 8).
        #[inline(always)]
        fn sum16(v: &[Self; 16]) -> [f32; 16] {
            // SAFETY: AVX-512 builds only (see the module doc).
            unsafe {
                // Width 8: u[m] holds v[2m]'s h[i] + h[i + 8] in its low half, v[2m + 1]'s in
                // its high half.
                let mut u = [_mm512_setzero_ps(); 8];
                for (m, u) in u.iter_mut().enumerate() {
                    let (a, b) = (v[2 * m].0, v[2 * m + 1].0);
                    *u = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b0100_0100>(a, b),
                        _mm512_shuffle_f32x4::<0b1110_1110>(a, b),
                    );
                }
                // Width 4: quarter k of w[p] holds v[4p + k]'s four partial sums.
                let mut w = [_mm512_setzero_ps(); 4];
                for (p, w) in w.iter_mut().enumerate() {
                    let (a, b) = (u[2 * p], u[2 * p + 1]);
                    *w = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b1000_1000>(a, b),
                        _mm512_shuffle_f32x4::<0b1101_1101>(a, b),
                    );
                }
                // Width 2: quarter k of z[r] holds v[8r + k]'s two, then v[8r + 4 + k]'s.
                let mut z = [_mm512_setzero_ps(); 2];
                for (r, z) in z.iter_mut().enumerate() {
                    let (a, b) = (w[2 * r], w[2 * r + 1]);
                    *z = _mm512_add_ps(
                        _mm512_shuffle_ps::<0b0100_0100>(a, b),
                        _mm512_shuffle_ps::<0b1110_1110>(a, b),
                    );
                }
                // Width 1: lane 4k + m holds v[4m + k]'s sum.
                let s = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b1000_1000>(z[0], z[1]),
                    _mm512_shuffle_ps::<0b1101_1101>(z[0], z[1]),
                );
                let mut lanes = [0.0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), s);
                std::array::from_fn(|i| lanes[4 * (i % 4) + i / 4])
            }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX-512 builds only (see the module doc).
            unsafe { Self(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            // SAFETY: AVX-512 builds only; `out` holds 16 floats (one unaligned store).
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), self.0) }
        }
    }
}

/// Hints the cache to fetch `w[i]` soon. Out-of-range indices are skipped.
#[inline(always)]
fn prefetch<W>(w: &[W], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = w.get(i) {
        // SAFETY: a prefetch is only a hint; it never faults and `p` is a valid reference.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                (p as *const W).cast::<i8>(),
            )
        };
    }
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
        => avx512: dot_rows_generic::<Avx512, W, 4>,
            avx2: dot_rows_generic::<Avx2, W, 2>,
            baseline: dot_rows_generic::<Scalar, W, 2>
}

kernel! {
    /// `y[j] = Σ_k x[k] · w[k, j0 + j]` over a `[x.len(), cols]` bf16 matrix (the "x @ W"
    /// orientation), for the column range `j0..j0 + y.len()`.
    pub fn axpy_rows / axpy_rows_on<W: Weight>(w: &[W], cols: usize, j0: usize, x: &[f32], y: &mut [f32])
        => avx512: axpy_rows_generic::<Avx512, W, 8>,
            avx2: axpy_rows_generic::<Avx2, W, 4>,
            baseline: axpy_rows_generic::<Scalar, W, 1>
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
    ) => avx512: axpy_rows_multi_generic::<Avx512, W, 4, 4>,
        avx2: axpy_rows_multi_generic::<Avx2, W, 2, 2>,
        baseline: axpy_rows_multi_generic::<Scalar, W, 1, 4>
}

/// `axpy_rows_multi` in tiles of `C` lane chunks of columns × `T` tokens (the remainders in
/// smaller tiles, the last columns one by one). The canonical order of every output: one
/// accumulator from 0, `fma(w[k, j], x[k], acc)` for k ascending, in every tile shape.
#[inline(always)]
fn axpy_rows_multi_generic<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
) {
    let k = x.len() / t.max(1);
    let n = y.len() / t.max(1);
    assert!(
        w.len() >= k * cols && j0 + n <= cols && x.len() == t * k && y.len() == t * n,
        "weight shape"
    );
    let mut j = 0;
    while j + C * LANES <= n {
        column_tiles::<S, W, C, T>(w, cols, j0, j, x, k, t, y);
        j += C * LANES;
    }
    while j + LANES <= n {
        column_tiles::<S, W, 1, T>(w, cols, j0, j, x, k, t, y);
        j += LANES;
    }
    for jj in j..n {
        for i in 0..t {
            let mut acc = 0.0f32;
            for kk in 0..k {
                acc = w[kk * cols + j0 + jj]
                    .widen(1.0)
                    .mul_add(x[i * k + kk], acc);
            }
            y[i * n + jj] = acc;
        }
    }
}

/// Output columns `j..j + C·LANES` (of the range from `j0`) for every token: tiles of `T`
/// tokens, then single tokens.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_tiles<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    j: usize,
    x: &[f32],
    k: usize,
    t: usize,
    y: &mut [f32],
) {
    let n = y.len() / t;
    let mut i0 = 0;
    while i0 + T <= t {
        let acc = axpy_tile::<S, W, C, T>(w, cols, j0 + j, &x[i0 * k..(i0 + T) * k], k);
        for (i, a) in acc.iter().enumerate() {
            let row = (i0 + i) * n + j;
            for (c, v) in a.iter().enumerate() {
                v.store(
                    (&mut y[row + c * LANES..row + (c + 1) * LANES])
                        .try_into()
                        .expect("a chunk"),
                );
            }
        }
        i0 += T;
    }
    while i0 < t {
        let acc = axpy_tile::<S, W, C, 1>(w, cols, j0 + j, &x[i0 * k..(i0 + 1) * k], k);
        let row = i0 * n + j;
        for (c, v) in acc[0].iter().enumerate() {
            v.store(
                (&mut y[row + c * LANES..row + (c + 1) * LANES])
                    .try_into()
                    .expect("a chunk"),
            );
        }
        i0 += 1;
    }
}

/// Rows of the matrix ahead of the current one whose tile columns are prefetched.
const AXPY_PREFETCH_ROWS: usize = 8;

/// Columns `col..col + C·LANES` of `T` tokens (`x` is `[T, k]`), every weight row once.
#[inline(always)]
fn axpy_tile<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    col: usize,
    x: &[f32],
    k: usize,
) -> [[S; C]; T] {
    let mut acc = [[S::zero(); C]; T];
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
            let xb = S::splat(x[i * k + kk]);
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
        avx2: dot_rows_multi_generic::<Avx2, W, 2, 2>,
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
    let mut r0 = 0;
    while r0 + R <= rows {
        row_tiles::<S, W, R, T>(w, scale, x, k, t, r0, y);
        r0 += R;
    }
    while r0 < rows {
        row_tiles::<S, W, 1, T>(w, scale, x, k, t, r0, y);
        r0 += 1;
    }
}

/// Rows `r0..r0 + R` for every token: tiles of `T` tokens, then single tokens.
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
    let mut i0 = 0;
    while i0 + T <= t {
        let xs: [&[f32]; T] = std::array::from_fn(|j| &x[(i0 + j) * k..(i0 + j + 1) * k]);
        let out = dot_tile::<S, W, R, T>(&rows, &s, &xs);
        for (r, o) in out.iter().enumerate() {
            for (j, v) in o.iter().enumerate() {
                y[(i0 + j) * n + r0 + r] = *v;
            }
        }
        i0 += T;
    }
    while i0 < t {
        let out = dot_tile::<S, W, R, 1>(&rows, &s, &[&x[i0 * k..(i0 + 1) * k]]);
        for (r, o) in out.iter().enumerate() {
            y[i0 * n + r0 + r] = o[0];
        }
        i0 += 1;
    }
}

/// The dot products of `R` weight rows (factors `s`) with `T` tokens, each in the one
/// canonical order: `LANES` accumulators over K (lane `i` takes the elements `i mod LANES`
/// of the full chunks, in order), summed by `lane_sum`, then the tail element by element.
/// The tile shape decides only which products share a pass over the weights, never a bit.
#[inline(always)]
fn dot_tile<S: Lanes, W: Weight, const R: usize, const T: usize>(
    rows: &[&[W]; R],
    s: &[f32; R],
    xs: &[&[f32]; T],
) -> [[f32; T]; R] {
    let k = xs[0].len();
    let chunks = k / LANES;
    let mut acc = [[S::zero(); T]; R];
    for c in 0..chunks {
        let o = c * LANES;
        let mut wv = [S::zero(); R];
        for r in 0..R {
            prefetch(rows[r], o + PREFETCH_AHEAD);
            wv[r] = W::lanes(chunk(rows[r], o), s[r]);
        }
        for j in 0..T {
            let xv = S::load(chunk(xs[j], o));
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

/// `dot_rows`: the tiles of `dot_rows_multi` for one token, `R` rows per pass (several
/// independent weight streams per core keep more memory requests in flight than one).
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

/// `axpy_rows`: the tiles of `axpy_rows_multi` for one token, `C` lane chunks wide.
#[inline(always)]
fn axpy_rows_generic<S: Lanes, W: Weight, const C: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    y: &mut [f32],
) {
    axpy_rows_multi_generic::<S, W, C, 1>(w, cols, j0, x, 1, y);
}

/// One head's attention for a block of queries (see `attend_block`).
#[derive(Debug, Clone, Copy)]
pub struct HeadBlock<'a> {
    /// The block's queries, `[n, q_stride]`; this head's `d` values start at `q_off`.
    pub q: &'a [f32],
    pub q_stride: usize,
    pub q_off: usize,
    /// Keys and values, `[keys, kv_stride]`; this head's start at `kv_off`.
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub kv_stride: usize,
    pub kv_off: usize,
    pub d: usize,
    /// Per query, the key indices it sees (`lo..=hi`).
    pub visible: &'a [(usize, usize)],
    /// Scores are multiplied by it before the softmax.
    pub scale: f32,
}

kernel! {
    /// `out[i] = Σ_j p_ij · v_j / Σ_j p_ij` with `p_ij = exp(s_ij − max_j s_ij)` and
    /// `s_ij = scale · (q_i · k_j)` over query i's visible keys (`HeadBlock`), `out` `[n, d]`.
    /// Every query's bits are those it gets alone: scores are `dot_rows` products, the max
    /// and the sum (`LANES` accumulators from the first visible key, `lane_sum`, tail) run
    /// over its own keys, `exp_canonical` is one fixed formula, and the weighted sum is the
    /// `axpy_rows` order over the block's keys, where the keys a query does not see weigh
    /// an exact 0 and add nothing.
    pub fn attend_block / attend_block_on(h: &HeadBlock<'_>, out: &mut [f32])
        => avx512: attend_block_generic::<Avx512, 4, 4, 4>,
            avx2: attend_block_generic::<Avx2, 2, 2, 2>,
            baseline: attend_block_generic::<Scalar, 1, 4, 1>
}

/// `attend_block` with key tiles of `R` keys × `T` queries for the scores and `C` lane
/// chunks of the head for the weighted sum.
#[inline(always)]
fn attend_block_generic<S: Lanes, const R: usize, const T: usize, const C: usize>(
    h: &HeadBlock<'_>,
    out: &mut [f32],
) {
    let (n, d) = (h.visible.len(), h.d);
    assert_eq!(out.len(), n * d, "one output row per query");
    if n == 0 {
        return;
    }
    let lo = h.visible.iter().map(|v| v.0).min().expect("a query");
    let hi = h.visible.iter().map(|v| v.1).max().expect("a query");
    assert!(
        h.visible.iter().all(|&(a, b)| a <= b)
            && (hi + 1) * h.kv_stride <= h.keys.len().min(h.values.len())
            && h.kv_off + d <= h.kv_stride
            && h.q_off + d <= h.q_stride
            && (n - 1) * h.q_stride + h.q_off + d <= h.q.len(),
        "attention shapes"
    );
    let span = hi + 1 - lo;
    let key = |j: usize| &h.keys[j * h.kv_stride + h.kv_off..j * h.kv_stride + h.kv_off + d];
    let query = |i: usize| &h.q[i * h.q_stride + h.q_off..i * h.q_stride + h.q_off + d];
    // Scores, [n, span].
    let mut p = vec![0.0f32; n * span];
    let ones = [1.0f32; R];
    let mut j0 = lo;
    while j0 <= hi {
        let rr = (hi + 1 - j0).min(R);
        let mut i0 = 0;
        while i0 < n {
            let tt = (n - i0).min(T);
            if rr == R && tt == T {
                let rows: [&[f32]; R] = std::array::from_fn(|r| key(j0 + r));
                let xs: [&[f32]; T] = std::array::from_fn(|i| query(i0 + i));
                let s = dot_tile::<S, f32, R, T>(&rows, &ones, &xs);
                for (r, col) in s.iter().enumerate() {
                    for (i, v) in col.iter().enumerate() {
                        p[(i0 + i) * span + j0 + r - lo] = *v;
                    }
                }
            } else if rr == R {
                // Fewer queries than a tile (decode): R keys at a time for each.
                let rows: [&[f32]; R] = std::array::from_fn(|r| key(j0 + r));
                for i in i0..i0 + tt {
                    let s = dot_tile::<S, f32, R, 1>(&rows, &ones, &[query(i)]);
                    for (r, v) in s.iter().enumerate() {
                        p[i * span + j0 + r - lo] = v[0];
                    }
                }
            } else {
                for r in 0..rr {
                    for i in 0..tt {
                        let s = dot_tile::<S, f32, 1, 1>(&[key(j0 + r)], &[1.0], &[query(i0 + i)]);
                        p[(i0 + i) * span + j0 + r - lo] = s[0][0];
                    }
                }
            }
            i0 += tt;
        }
        j0 += rr;
    }
    // Softmax weights (unnormalised) over each query's own keys, zero elsewhere.
    let mut sums = vec![0.0f32; n];
    for (i, (row, &(a, b))) in p.chunks_exact_mut(span).zip(h.visible).enumerate() {
        let (a, b) = (a - lo, b - lo);
        let seen = &mut row[a..=b];
        let max = seen
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v * h.scale));
        for v in seen.iter_mut() {
            *v = exp_canonical(*v * h.scale - max);
        }
        sums[i] = lane_total(seen);
        row[..a].fill(0.0);
        row[b + 1..].fill(0.0);
    }
    // Weighted sums of the values, then the normalisation.
    axpy_rows_multi_generic::<S, f32, C, T>(
        &h.values[lo * h.kv_stride..(hi + 1) * h.kv_stride],
        h.kv_stride,
        h.kv_off,
        &p,
        n,
        out,
    );
    for (row, s) in out.chunks_exact_mut(d).zip(&sums) {
        row.iter_mut().for_each(|v| *v /= s);
    }
}

/// `Σ v` in the canonical order of a dot product: `LANES` accumulators over the full chunks,
/// `lane_sum`, then the tail in order.
#[inline(always)]
fn lane_total(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut sum = lane_sum(&acc);
    for x in chunks.remainder() {
        sum += x;
    }
    sum
}

/// `e^x` in one fixed sequence of IEEE operations, so that every build and every vector
/// width gives the same bits: evaluated in f64 (`x = n·ln 2 + r`, n nearest to x·log2 e, r by
/// Cody–Waite; `e^r` by its Taylor series to degree 10, relative error below 2e-13) and
/// rounded once to f32, which is the correctly rounded value but for ties closer than that.
/// Below −87.3 (where e^x leaves f32's normal range) the result is 0.
#[inline(always)]
pub fn exp_canonical(x: f32) -> f32 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2: the high part has its low 32 bits zero, so n · LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const LIMIT: f32 = -87.336_55;
    // 1.5 · 2^52: adding it rounds to an integer (nearest-even) in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let xd = f64::from(x.clamp(LIMIT, 88.0));
    let shifted = xd.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xd));
    let mut p: f64 = 1.0 / 3_628_800.0;
    for c in [
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // The low bits of `shifted` are n (two's complement): n + 1023 moved into the exponent.
    let scale = f64::from_bits(shifted.to_bits().wrapping_add(1023) << 52);
    if x < LIMIT {
        0.0
    } else {
        (p * scale) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kernels_match_plain_sums() {
        let (rows, k) = (7, 37);
        let w: Vec<u16> = (0..rows * k)
            .map(|i| half::bf16::from_f32((i % 11) as f32 - 5.0).to_bits())
            .collect();
        let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.25).collect();
        let mut y = vec![0.0; rows];
        dot_rows(&w, &[], &x, &mut y);
        let mut yg = vec![0.0; rows];
        dot_rows_generic::<Scalar, u16, 2>(&w, &[], &x, &mut yg);
        for r in 0..rows {
            let expected: f32 = (0..k).map(|i| widen(w[r * k + i]) * x[i]).sum();
            assert!((y[r] - expected).abs() < 1e-4 && (yg[r] - expected).abs() < 1e-4);
        }
        // The multi-token dot kernel gives each token's single-token result, bit for bit.
        let xs3: Vec<f32> = (0..7 * k).map(|i| (i % 13) as f32 * 0.37 - 2.0).collect();
        let mut yt = vec![0.0; rows * 7];
        dot_rows_multi(&w, &[], &xs3, 7, &mut yt);
        for i in 0..7 {
            let mut alone = vec![0.0; rows];
            dot_rows(&w, &[], &xs3[i * k..(i + 1) * k], &mut alone);
            for r in 0..rows {
                assert_eq!(yt[i * rows + r], alone[r], "row {r}, token {i}");
            }
        }
        // Several tokens at once give each token's single-token result, bit for bit.
        let xs2: Vec<f32> = (0..2 * rows).map(|i| (i % 5) as f32 - 2.25).collect();
        let mut y2 = vec![0.0; 2 * 4];
        axpy_rows_multi(&w, k, 3, &xs2, 2, &mut y2);
        for i in 0..2 {
            let mut alone = vec![0.0; 4];
            axpy_rows(&w, k, 3, &xs2[i * rows..(i + 1) * rows], &mut alone);
            assert_eq!(&y2[i * 4..(i + 1) * 4], &alone[..]);
        }
        // The same matrix read as [k', cols] with k' = rows: columns 2..5.
        let xs: Vec<f32> = (0..rows).map(|i| i as f32 - 1.5).collect();
        let mut ya = vec![0.0; 3];
        axpy_rows(&w, k, 2, &xs, &mut ya);
        for (j, v) in ya.iter().enumerate() {
            let expected: f32 = (0..rows).map(|r| xs[r] * widen(w[r * k + 2 + j])).sum();
            assert!((v - expected).abs() < 1e-4, "{v} vs {expected}");
        }
    }

    #[test]
    fn e4m3_widening_matches_the_table_and_scaled_rows() {
        for c in 0..=255u8 {
            let got = c.widen(<u8 as Weight>::row_factor(1.0));
            let want = crate::fp8::decode(c);
            if want.is_nan() {
                assert!(got.is_nan(), "code {c:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {c:#x}");
            }
        }
        // Scaled FP8 rows: the same as the rows dequantized first, one token or several.
        let (rows, k) = (5, 41);
        let w: Vec<u8> = (0..rows * k).map(|i| (i * 29 % 251) as u8 & 0x7E).collect();
        let scale: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 * 0.25).collect();
        let x: Vec<f32> = (0..3 * k).map(|i| (i % 9) as f32 * 0.1 - 0.4).collect();
        let mut y = vec![0.0; rows];
        dot_rows(&w, &scale, &x[..k], &mut y);
        for r in 0..rows {
            let want: f32 = (0..k)
                .map(|i| crate::fp8::decode(w[r * k + i]) * scale[r] * x[i])
                .sum();
            assert!(
                (y[r] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{} {want}",
                y[r]
            );
        }
        let mut yt = vec![0.0; rows * 3];
        dot_rows_multi(&w, &scale, &x, 3, &mut yt);
        for i in 0..3 {
            let mut alone = vec![0.0; rows];
            dot_rows(&w, &scale, &x[i * k..(i + 1) * k], &mut alone);
            for r in 0..rows {
                assert_eq!(yt[i * rows + r], alone[r], "row {r}, token {i}");
            }
        }
    }

    #[test]
    fn canonical_exp_is_close_and_the_same_in_every_build() {
        let xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.0047).collect();
        for &x in &xs {
            let got = exp_canonical(x) as f64;
            let want = (x as f64).exp();
            if x < -87.336_55 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, not {want}"
                );
            }
        }
        // Through the attention kernel of each build: the same weights, bit for bit.
        let d = 16;
        let keys: Vec<f32> = (0..40 * d).map(|i| (i % 23) as f32 * 0.4 - 4.0).collect();
        let q: Vec<f32> = (0..3 * d).map(|i| (i % 7) as f32 * 0.9 - 3.0).collect();
        let visible = [(0, 20), (3, 39), (39, 39)];
        let block = HeadBlock {
            q: &q,
            q_stride: d,
            q_off: 0,
            keys: &keys,
            values: &keys,
            kv_stride: d,
            kv_off: 0,
            d,
            visible: &visible,
            scale: 0.7,
        };
        let run = |isa: Isa| {
            let mut out = vec![0.0f32; 3 * d];
            attend_block_on(isa, &block, &mut out);
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let base = run(Isa::Baseline);
        for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= isa()) {
            assert_eq!(run(isa), base, "{isa:?}");
        }
    }

    /// For random shapes and batch compositions, every build of every kernel this CPU can
    /// run (baseline, AVX2, AVX-512) gives each token the bits of the baseline batch-1 dot
    /// kernel: bf16 and FP8 rows, one token or several, and the "x @ W" kernels likewise
    /// against their own batch-1 form.
    #[test]
    fn every_build_and_batch_gives_the_batch_1_bits() {
        let mut rng = crate::sampling::SplitMix64::new(42);
        let mut next = |n: usize| (rng.next_u64() % n as u64) as usize;
        let isas: Vec<Isa> = [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= isa())
            .collect();
        for _ in 0..40 {
            let (rows, k, t) = (1 + next(9), 1 + next(150), 1 + next(9));
            let bf16: Vec<u16> = (0..rows * k)
                .map(|_| half::bf16::from_f32(next(2001) as f32 / 1000.0 - 1.0).to_bits())
                .collect();
            let fp8: Vec<u8> = (0..rows * k).map(|_| next(256) as u8 & 0xFE | 1).collect();
            let scale: Vec<f32> = (0..rows).map(|_| 0.01 + next(100) as f32 * 1e-3).collect();
            let x: Vec<f32> = (0..t * k)
                .map(|_| next(4001) as f32 / 1000.0 - 2.0)
                .collect();
            let alone = |isa: Isa, i: usize, fp: bool| {
                let mut y = vec![0.0; rows];
                let xi = &x[i * k..(i + 1) * k];
                if fp {
                    dot_rows_on(isa, &fp8, &scale, xi, &mut y);
                } else {
                    dot_rows_on(isa, &bf16, &[], xi, &mut y);
                }
                y
            };
            for fp in [false, true] {
                let want: Vec<Vec<f32>> = (0..t).map(|i| alone(Isa::Baseline, i, fp)).collect();
                for &isa in &isas {
                    let mut yt = vec![0.0; rows * t];
                    if fp {
                        dot_rows_multi_on(isa, &fp8, &scale, &x, t, &mut yt);
                    } else {
                        dot_rows_multi_on(isa, &bf16, &[], &x, t, &mut yt);
                    }
                    for (i, w) in want.iter().enumerate() {
                        let got: Vec<u32> = (0..rows).map(|r| yt[i * rows + r].to_bits()).collect();
                        let w: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, w, "{isa:?} fp8={fp} rows {rows} k {k} token {i}/{t}");
                        let single: Vec<u32> =
                            alone(isa, i, fp).iter().map(|v| v.to_bits()).collect();
                        assert_eq!(single, w, "{isa:?} fp8={fp} batch-1");
                    }
                }
            }
            // "x @ W": the matrix read as [rows, k] with x of `rows` values per token.
            let cols = k;
            let j0 = next(cols);
            let n = 1 + next(cols - j0);
            let xa: Vec<f32> = (0..t * rows)
                .map(|_| next(2001) as f32 / 500.0 - 2.0)
                .collect();
            let base: Vec<Vec<u32>> = (0..t)
                .map(|i| {
                    let mut y = vec![0.0; n];
                    axpy_rows_on(
                        Isa::Baseline,
                        &bf16,
                        cols,
                        j0,
                        &xa[i * rows..(i + 1) * rows],
                        &mut y,
                    );
                    y.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            for &isa in &isas {
                let mut y = vec![0.0; t * n];
                axpy_rows_multi_on(isa, &bf16, cols, j0, &xa, t, &mut y);
                for (i, b) in base.iter().enumerate() {
                    let got: Vec<u32> = y[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(&got, b, "{isa:?} x @ W token {i}");
                }
            }
        }
    }
}
