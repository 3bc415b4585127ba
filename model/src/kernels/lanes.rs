//! How each build of the kernels holds `LANES` f32 lanes (see the parent module).
#![allow(unsafe_code)]

use super::{lane_sum, widen, Weight, LANES};

/// `LANES` f32 lanes held the way one build holds them: an array (the baseline), two AVX
/// registers, one AVX-512 register, four NEON registers. Every operation is the same per-lane IEEE operation in
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
    /// `sum` of 4 registers at once (as `sum16`).
    #[inline(always)]
    fn sum4(v: &[Self; 4]) -> [f32; 4] {
        [v[0].sum(), v[1].sum(), v[2].sum(), v[3].sum()]
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
pub(super) use x86::{Avx2, Avx512};

/// The AVX2 and AVX-512 lanes. Their methods are reached only from kernels built with those
/// features (`kernel!` runs a build only on a CPU that has it), where they are inlined; the
/// types stay private to this module, so nothing else can call them on a CPU without them.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::Lanes;
    use crate::kernels::LANES;

    /// Two AVX registers: lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    pub struct Avx2([__m256; 2]);

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Avx2 {
        /// The registers (for `dot_bf16`'s own steps).
        #[inline(always)]
        pub(in crate::kernels) fn registers(self) -> [__m256; 2] {
            self.0
        }
        #[inline(always)]
        pub(in crate::kernels) fn from_registers(v: [__m256; 2]) -> Self {
            Self(v)
        }
    }

    impl Avx512 {
        /// The register (for `dot_bf16`'s own steps and instructions).
        #[inline(always)]
        pub(in crate::kernels) fn register(self) -> __m512 {
            self.0
        }
        #[inline(always)]
        pub(in crate::kernels) fn from_register(v: __m512) -> Self {
            Self(v)
        }
    }

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

    /// 8 bf16 bits widened: a load that widens each to 32 bits, then a shift.
    ///
    /// Measured and not kept (2-core Sapphire Rapids VM, the AVX2 build,
    /// `examples/kernel_tiles.rs`, medians of 6–10 alternating runs): widening 16 from one
    /// 32-byte load into lanes held in another order, with the dot products' inputs laid out
    /// in that order once per call. Lanes 0–3, 8–11 | 4–7, 12–15 (`vpunpck{l,h}wd` below
    /// zero words) or even | odd lanes (`vpslld 16` | `vpand 0xFFFF0000`) both gave the same
    /// bits, since the canonical tree pairs such lanes until its last step. But the 3 × 2 dot
    /// tile fell from ~50–60 to ~38–45 GFLOP/s with either. Both registers come from one
    /// load: in the unpack build's loop, LLVM kept each row's load live until its second
    /// unpack and spilled 5 accumulators to the stack; its 2 × 2, 1 × 4 and 2 × 3 tiles were
    /// 0.72–0.89× the 3 × 2 here. The "x @ W" kernels moved by −8% to +9%, within noise.
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
        /// The tree of `lane_sum` for 4 registers, its steps shared: each register's halves
        /// (`h[i] + h[i + 8]`), then quarters two registers to an add, then pairs and
        /// neighbours four to an add (16 shuffles and adds instead of 4 × 7).
        #[inline(always)]
        fn sum4(v: &[Self; 4]) -> [f32; 4] {
            // SAFETY: AVX builds only (see the module doc).
            unsafe {
                let h0 = _mm256_add_ps(v[0].0[0], v[0].0[1]);
                let h1 = _mm256_add_ps(v[1].0[0], v[1].0[1]);
                let h2 = _mm256_add_ps(v[2].0[0], v[2].0[1]);
                let h3 = _mm256_add_ps(v[3].0[0], v[3].0[1]);
                // Width 4: v[0]'s (v[2]'s) in the low half, v[1]'s (v[3]'s) in the high one.
                let q01 = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(h0, h1),
                    _mm256_permute2f128_ps::<0x31>(h0, h1),
                );
                let q23 = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(h2, h3),
                    _mm256_permute2f128_ps::<0x31>(h2, h3),
                );
                // Width 2: in each half, lanes 0-1 from q01 and 2-3 from q23.
                let w2 = _mm256_add_ps(
                    _mm256_shuffle_ps::<0b01_00_01_00>(q01, q23),
                    _mm256_shuffle_ps::<0b11_10_11_10>(q01, q23),
                );
                // Width 1: lanes 0, 2, 4 and 6 hold v[0], v[2], v[1] and v[3]'s sums.
                let w1 = _mm256_add_ps(w2, _mm256_shuffle_ps::<0b10_11_00_01>(w2, w2));
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), w1);
                [lanes[0], lanes[4], lanes[2], lanes[6]]
            }
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

/// The NEON build (aarch64, where NEON is always present): four 4-lane registers, lane `i` in
/// register `i / 4`.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Lanes, LANES};
    use core::arch::aarch64::*;

    #[derive(Clone, Copy)]
    pub struct Neon([float32x4_t; 4]);

    impl Lanes for Neon {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: NEON is always there on aarch64.
            unsafe { Self([vdupq_n_f32(0.0); 4]) }
        }
        #[inline(always)]
        fn load(x: &[f32; LANES]) -> Self {
            // SAFETY: NEON is always there on aarch64; the pointer covers `LANES` elements.
            unsafe { Self(std::array::from_fn(|i| vld1q_f32(x.as_ptr().add(4 * i)))) }
        }
        #[inline(always)]
        fn bf16(w: &[u16; LANES]) -> Self {
            // SAFETY: NEON is always there on aarch64; the pointer covers `LANES` elements.
            unsafe {
                Self(std::array::from_fn(|i| {
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(w.as_ptr().add(4 * i))))
                }))
            }
        }
        #[inline(always)]
        fn e4m3(w: &[u8; LANES], factor: f32) -> Self {
            // SAFETY: NEON is always there on aarch64; the pointer covers `LANES` elements.
            unsafe {
                let bytes = vld1q_u8(w.as_ptr());
                let halves = [vmovl_u8(vget_low_u8(bytes)), vmovl_u8(vget_high_u8(bytes))];
                Self(std::array::from_fn(|i| {
                    let h = halves[i / 2];
                    let c = if i % 2 == 0 {
                        vmovl_u16(vget_low_u16(h))
                    } else {
                        vmovl_u16(vget_high_u16(h))
                    };
                    // The bit moves of `Weight::widen` for `u8`.
                    let mag = vandq_u32(c, vdupq_n_u32(0x7F));
                    let sign = vshlq_n_u32::<24>(vandq_u32(c, vdupq_n_u32(0x80)));
                    let bits = vorrq_u32(vshlq_n_u32::<20>(mag), sign);
                    let v = vmulq_f32(vreinterpretq_f32_u32(bits), vdupq_n_f32(factor));
                    let nan = vceqq_u32(mag, vdupq_n_u32(0x7F));
                    vbslq_f32(nan, vdupq_n_f32(f32::NAN), v)
                }))
            }
        }
        #[inline(always)]
        fn fma(self, w: Self, x: Self) -> Self {
            // SAFETY: NEON is always there on aarch64.
            unsafe {
                Self(std::array::from_fn(|i| {
                    vfmaq_f32(self.0[i], w.0[i], x.0[i])
                }))
            }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            // `lane_sum`'s tree: lanes i + 8 (registers 2, 3 onto 0, 1), i + 4, i + 2, i + 1.
            // SAFETY: NEON is always there on aarch64.
            unsafe {
                let s8 = [
                    vaddq_f32(self.0[0], self.0[2]),
                    vaddq_f32(self.0[1], self.0[3]),
                ];
                let s4 = vaddq_f32(s8[0], s8[1]);
                let s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
                vget_lane_f32::<0>(s2) + vget_lane_f32::<1>(s2)
            }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: NEON is always there on aarch64.
            unsafe { Self([vdupq_n_f32(v); 4]) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            // SAFETY: NEON is always there on aarch64; the pointer covers `LANES` elements.
            unsafe {
                for (i, r) in self.0.iter().enumerate() {
                    vst1q_f32(out.as_mut_ptr().add(4 * i), *r);
                }
            }
        }
    }
}
#[cfg(target_arch = "aarch64")]
pub use neon::Neon;
