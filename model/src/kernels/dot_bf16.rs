//! Products with bf16 activations (`GemmPrecision::Bf16` on the CPU): bf16 weight rows
//! (`[out, in]`) times activations rounded to bf16, as llama.cpp computes every bf16 product
//! and as a GPU's tensor cores do. Where the CPU has AVX512-BF16, `VDPBF16PS` takes two
//! products per lane per instruction, twice the f32 multiply-adds' rate (on a Zen 5 core:
//! 2 instructions a cycle either way, 32 products against 16); elsewhere the same steps are
//! emulated, bit for bit.
//!
//! The one canonical order (`VDPBF16PS`'s, Intel's pseudo-code, which a Zen 5 core was
//! measured to follow in 3.2M random cases):
//! - the activations are rounded to bf16 to nearest even, subnormals to signed zero
//!   ([`round_activations`]);
//! - K is taken in chunks of 32; lane `i` of a chunk adds the product of its elements
//!   `2i + 1`, then that of `2i`, each step `acc = fma(w, x, acc)` with subnormal inputs read
//!   as zero and a subnormal result flushed to zero (the instruction's DAZ and FTZ);
//! - the lanes are summed in `lane_sum`'s tree, then the tail (`K mod 32` elements) is added
//!   element by element (plain `fma`).
//!
//! Tiles decide only which products share a pass over the weights, as in `dot_rows_multi`:
//! a token's bits never depend on its batch, and the emulation gives the instruction's bits
//! on any CPU (for finite values; the one place they could part is a sum landing within
//! 2^-150 of the smallest normal: the emulation flushes what rounds to a subnormal, x86
//! what is below the smallest normal once rounded to 24 bits). So a cluster that runs in
//! bf16 computes what one process does, whatever mix of CPUs its attention workers have.
//! The emulation costs: on a Zen 5 core (`examples/kernel_tiles.rs`), ~38 GFLOP/s in the
//! AVX-512 build and ~16 in the AVX2 one, against ~180 and ~100 for the f32 products and
//! ~260 on `VDPBF16PS`.

use super::lanes::Scalar;
use super::*;

/// Elements per chunk: a pair for each of the `LANES` lanes.
const PAIRS: usize = 2 * LANES;

/// Lanes that take one chunk's pair steps.
pub(super) trait PairLanes: Lanes {
    /// `self` after chunk `w` × `x`: per lane `i`, the product of elements `2i + 1`, then of
    /// `2i`, each fused into the lane with subnormals read and written as zero.
    fn pair_step(self, w: &[u16; PAIRS], x: &[u16; PAIRS]) -> Self;
}

/// A subnormal (`bits`' exponent zero) as zero of its sign: DAZ and FTZ, on f32 bits.
#[inline(always)]
fn flush(bits: u32) -> f32 {
    let keep = if bits & 0x7F80_0000 == 0 {
        0x8000_0000
    } else {
        u32::MAX
    };
    f32::from_bits(bits & keep)
}

impl PairLanes for Scalar {
    #[inline(always)]
    fn pair_step(self, w: &[u16; PAIRS], x: &[u16; PAIRS]) -> Self {
        // Each pair as one 32-bit word: element `2i + 1` is its high half, which read as f32
        // is that bf16's value; element `2i`, shifted up, likewise.
        let words = |v: &[u16; PAIRS]| -> [u32; LANES] {
            std::array::from_fn(|i| u32::from(v[2 * i]) | u32::from(v[2 * i + 1]) << 16)
        };
        let (w, x) = (words(w), words(x));
        let mut acc = [0.0f32; LANES];
        self.store(&mut acc);
        let odd: [f32; LANES] = std::array::from_fn(|i| {
            let p = flush(w[i] & 0xFFFF_0000).mul_add(flush(x[i] & 0xFFFF_0000), acc[i]);
            flush(p.to_bits())
        });
        Self::load(&std::array::from_fn(|i| {
            flush((flush(w[i] << 16).mul_add(flush(x[i] << 16), odd[i])).to_bits())
        }))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::Avx512Bf16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{PairLanes, PAIRS};
    use crate::kernels::{Avx2, Avx512, Lanes, LANES};

    /// `bits` with a subnormal (exponent zero) as zero of its sign, 16 lanes.
    #[inline(always)]
    fn flush16(bits: __m512i) -> __m512 {
        // SAFETY: only inlined into AVX-512 builds (the lanes' types are reached only there).
        unsafe {
            let tiny = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7F80_0000));
            _mm512_castsi512_ps(_mm512_mask_and_epi32(
                bits,
                tiny,
                bits,
                _mm512_set1_epi32(i32::MIN),
            ))
        }
    }

    /// The same, 8 lanes.
    #[inline(always)]
    fn flush8(bits: __m256i) -> __m256 {
        // SAFETY: only inlined into AVX2 builds (the lanes' types are reached only there).
        unsafe {
            let exponent = _mm256_and_si256(bits, _mm256_set1_epi32(0x7F80_0000));
            let tiny = _mm256_cmpeq_epi32(exponent, _mm256_setzero_si256());
            let signed = _mm256_and_si256(bits, _mm256_set1_epi32(i32::MIN));
            _mm256_castsi256_ps(_mm256_blendv_epi8(bits, signed, tiny))
        }
    }

    /// The emulated steps (the module doc's), 16 lanes in one register: each pair is one
    /// 32-bit word, element `2i + 1` its high half.
    impl PairLanes for Avx512 {
        #[inline(always)]
        fn pair_step(self, w: &[u16; PAIRS], x: &[u16; PAIRS]) -> Self {
            // SAFETY: AVX-512 builds only; `w` and `x` hold 32 u16 each (one unaligned
            // 64-byte load each).
            unsafe {
                let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
                let (w, x) = (
                    _mm512_loadu_si512(w.as_ptr().cast()),
                    _mm512_loadu_si512(x.as_ptr().cast()),
                );
                let odd = _mm512_fmadd_ps(
                    flush16(_mm512_and_si512(w, high)),
                    flush16(_mm512_and_si512(x, high)),
                    self.register(),
                );
                let odd = _mm512_castps_si512(odd);
                let even = _mm512_fmadd_ps(
                    flush16(_mm512_slli_epi32::<16>(w)),
                    flush16(_mm512_slli_epi32::<16>(x)),
                    flush16(odd),
                );
                Self::from_register(flush16(_mm512_castps_si512(even)))
            }
        }
    }

    /// The same in two AVX registers (lanes 0–7 from elements 0–15, 8–15 from 16–31).
    impl PairLanes for Avx2 {
        #[inline(always)]
        fn pair_step(self, w: &[u16; PAIRS], x: &[u16; PAIRS]) -> Self {
            let [lo, hi] = self.registers();
            let (w, x) = (w.split_at(LANES), x.split_at(LANES));
            Self::from_registers([pair_step8(lo, w.0, x.0), pair_step8(hi, w.1, x.1)])
        }
    }

    /// Eight lanes of `Avx2`'s steps over 16 elements of `w` and `x`.
    #[inline(always)]
    fn pair_step8(acc: __m256, w: &[u16], x: &[u16]) -> __m256 {
        assert!(w.len() == LANES && x.len() == LANES, "8 pairs");
        // SAFETY: AVX2 builds only; `w` and `x` hold 16 u16 each (one unaligned 32-byte
        // load each).
        unsafe {
            let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            let (w, x) = (
                _mm256_loadu_si256(w.as_ptr().cast()),
                _mm256_loadu_si256(x.as_ptr().cast()),
            );
            let odd = _mm256_fmadd_ps(
                flush8(_mm256_and_si256(w, high)),
                flush8(_mm256_and_si256(x, high)),
                acc,
            );
            let even = _mm256_fmadd_ps(
                flush8(_mm256_slli_epi32::<16>(w)),
                flush8(_mm256_slli_epi32::<16>(x)),
                flush8(_mm256_castps_si256(odd)),
            );
            flush8(_mm256_castps_si256(even))
        }
    }

    /// AVX-512 lanes whose pair steps are `VDPBF16PS`. Reached only from the AVX512-BF16
    /// build (`dot_bf16_hardware`, run only on a CPU that has it), where it is inlined.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub struct Avx512Bf16(Avx512);

    impl Lanes for Avx512Bf16 {
        #[inline(always)]
        fn zero() -> Self {
            Self(Avx512::zero())
        }
        #[inline(always)]
        fn load(x: &[f32; LANES]) -> Self {
            Self(Avx512::load(x))
        }
        #[inline(always)]
        fn bf16(w: &[u16; LANES]) -> Self {
            Self(Avx512::bf16(w))
        }
        #[inline(always)]
        fn e4m3(w: &[u8; LANES], factor: f32) -> Self {
            Self(Avx512::e4m3(w, factor))
        }
        #[inline(always)]
        fn fma(self, w: Self, x: Self) -> Self {
            Self(self.0.fma(w.0, x.0))
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            self.0.sum()
        }
        #[inline(always)]
        fn sum16(v: &[Self; 16]) -> [f32; 16] {
            // Viewed in place: `v.map(|l| l.0)` was a 1 KB copy in a call of its own
            // (`array::try_map`, not inlined), 4.4% of a prefill of 128 tokens on a Zen 5 VM.
            // SAFETY: `Avx512Bf16` is `repr(transparent)` over `Avx512`, so the arrays have
            // the same layout.
            Avx512::sum16(unsafe { &*(v as *const [Self; 16]).cast::<[Avx512; 16]>() })
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            Self(Avx512::splat(v))
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            self.0.store(out)
        }
    }

    impl PairLanes for Avx512Bf16 {
        #[inline(always)]
        fn pair_step(self, w: &[u16; PAIRS], x: &[u16; PAIRS]) -> Self {
            // SAFETY: only inlined into the AVX512-BF16 build (see the type's doc); `w` and
            // `x` hold 32 u16 each (one unaligned 64-byte load each).
            unsafe {
                let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.as_ptr().cast()));
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x.as_ptr().cast()));
                let sum = _mm512_dpbf16_ps(self.0.register(), wv, xv);
                Self(Avx512::from_register(sum))
            }
        }
    }
}

/// `x` rounded to bf16 for [`dot_bf16_multi`]: to nearest even, subnormals to zero of their
/// sign (the products read them as zero anyway), a NaN a quiet NaN.
pub fn round_activations(x: &[f32]) -> Vec<u16> {
    let mut out = to_bf16_vec(x);
    // A mask for every element, not a branch: this loop then vectorizes. Written as a
    // conditional store it took ~40 µs of a 128 × 1024 input's ~48 (~7 µs branch-free) on a
    // Zen 5 VM, on the driving thread before every product of a prefill.
    for h in &mut out {
        *h &= if *h & 0x7F80 == 0 { 0x8000 } else { 0xFFFF };
    }
    out
}

/// Whether `dot_bf16_multi` runs on `VDPBF16PS` here (AVX512-BF16 beside the AVX-512 build;
/// `EXPERTMESH_ISA` asking for less turns it off too).
pub fn bf16_dot_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| isa() == Isa::Avx512 && std::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `y[i, r] = Σ_k w[r, k] · x[i, k]` in the canonical order of the module's doc, for `t`
/// tokens: `w` is bf16 `[rows, k]`, `x` is `[t, k]` from [`round_activations`], `y` is
/// `[t, rows]`. Runs on `VDPBF16PS` where the CPU has it, else emulated (the same bits).
pub fn dot_bf16_multi(w: &[u16], x: &[u16], t: usize, y: &mut [f32]) {
    dot_bf16_multi_on(bf16_dot_in_hardware(), isa(), w, x, t, y)
}

/// `dot_bf16_multi` on `VDPBF16PS` (`hardware`, where there: see [`bf16_dot_in_hardware`]) or
/// emulated in the build for `isa`.
pub fn dot_bf16_multi_on(hardware: bool, isa: Isa, w: &[u16], x: &[u16], t: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if hardware && bf16_dot_in_hardware() {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16,avx2,fma")]
        unsafe fn dot_bf16_hardware(w: &[u16], x: &[u16], t: usize, y: &mut [f32]) {
            // One token reads its rows one at a time, a sequential stream per core (as
            // `dot_rows`): four at a time made a decode step of one sequence 4.9 ms against
            // 3.9 in f32, one at a time 3.9 (Zen 5, 2 threads).
            if t == 1 {
                dot_bf16_generic::<Avx512Bf16, 1, 1>(w, x, t, y)
            } else {
                dot_bf16_generic::<Avx512Bf16, 4, 4>(w, x, t, y)
            }
        }
        // SAFETY: the CPU supports AVX512-BF16 besides AVX-512 (F, VL, BW), AVX2 and FMA
        // (`bf16_dot_in_hardware`).
        return unsafe { dot_bf16_hardware(w, x, t, y) };
    }
    let _ = hardware;
    dot_bf16_emulated_on(isa, w, x, t, y)
}

kernel! {
    /// `dot_bf16_multi` without `VDPBF16PS`: its steps lane by lane in each build's registers
    /// (the same per-lane operations, so the same bits).
    pub fn dot_bf16_emulated / dot_bf16_emulated_on(w: &[u16], x: &[u16], t: usize, y: &mut [f32])
        => avx512: dot_bf16_generic::<Avx512, 4, 4>,
            avx2: dot_bf16_generic::<Avx2, 2, 2>,
            neon: dot_bf16_generic::<Scalar, 1, 4>,
            baseline: dot_bf16_generic::<Scalar, 1, 4>
}

/// `dot_bf16_multi` in tiles of `R` rows × `T` tokens (then pairs and single tokens), over
/// token blocks whose inputs stay in the core's cache (`tile_walk`).
#[inline(always)]
fn dot_bf16_generic<P: PairLanes, const R: usize, const T: usize>(
    w: &[u16],
    x: &[u16],
    t: usize,
    y: &mut [f32],
) {
    let k = x.len() / t.max(1);
    let rows = y.len() / t.max(1);
    assert!(
        w.len() >= rows * k && x.len() == t * k && y.len() == rows * t,
        "shapes do not match"
    );
    let block = (X_BLOCK_BYTES / (2 * k.max(1))).max(1).next_multiple_of(T);
    for (t0, tn, r0, whole) in tile_walk(t, rows, block, R) {
        let (x, y) = (
            &x[t0 * k..(t0 + tn) * k],
            &mut y[t0 * rows..(t0 + tn) * rows],
        );
        if whole {
            pair_row_tiles::<P, R, T>(w, x, k, tn, r0, y)
        } else {
            pair_row_tiles::<P, 1, T>(w, x, k, tn, r0, y)
        }
    }
}

/// Rows `r0..r0 + R` for every token: tiles of `T` tokens, then pairs, then single tokens.
#[inline(always)]
fn pair_row_tiles<P: PairLanes, const R: usize, const T: usize>(
    w: &[u16],
    x: &[u16],
    k: usize,
    t: usize,
    r0: usize,
    y: &mut [f32],
) {
    let n = y.len() / t;
    let rows: [&[u16]; R] = std::array::from_fn(|r| &w[(r0 + r) * k..(r0 + r + 1) * k]);
    // The rows of the next tile, fetched into the cache while this one computes (empty
    // past the last row).
    let next: [&[u16]; R] = std::array::from_fn(|r| {
        let at = ((r0 + R + r) * k).min(n * k).min(w.len());
        &w[at..((r0 + R + r + 1) * k).min(n * k).min(w.len())]
    });
    // Whether the token tiles hint at the next rows: only for a few tokens, whose products
    // wait on the rows; not for one token, whose rows stream one at a time, nor for many,
    // whose later tiles find the rows in the cache. On a Zen 5 VM (2 threads): hints made 4
    // tokens ~220 GFLOP/s against ~120 without, and a decode step of 8 sequences 10.0 ms
    // against 12.1 (f32: 9.5-10.8); hints in the first of many tiles made a prefill of 128
    // tokens ~1.2x slower (1860-2160 tokens/s against 2340-2370).
    let tiles = (&rows, &next, (2..=16).contains(&t));
    let mut i0 = 0;
    while i0 < t {
        let taken = if i0 + T <= t {
            pair_token_tile::<P, R, T>(tiles, x, k, i0, n, r0, y)
        } else if T > 2 && i0 + 2 <= t {
            pair_token_tile::<P, R, 2>(tiles, x, k, i0, n, r0, y)
        } else {
            pair_token_tile::<P, R, 1>(tiles, x, k, i0, n, r0, y)
        };
        i0 += taken;
    }
}

/// Tokens `i0..i0 + T` of rows `r0..r0 + R`, stored into `y` (`[t, n]`), hinting at the
/// `next` rows if `hinting`; returns `T`.
#[inline(always)]
fn pair_token_tile<P: PairLanes, const R: usize, const T: usize>(
    (rows, next, hinting): (&[&[u16]; R], &[&[u16]; R], bool),
    x: &[u16],
    k: usize,
    i0: usize,
    n: usize,
    r0: usize,
    y: &mut [f32],
) -> usize {
    let xs: [&[u16]; T] = std::array::from_fn(|j| &x[(i0 + j) * k..(i0 + j + 1) * k]);
    let chunks = k / PAIRS;
    let wc: [&[[u16; PAIRS]]; R] = std::array::from_fn(|r| &rows[r].as_chunks().0[..chunks]);
    let xc: [&[[u16; PAIRS]]; T] = std::array::from_fn(|j| &xs[j].as_chunks().0[..chunks]);
    let mut acc = [[P::zero(); T]; R];
    for c in 0..chunks {
        if hinting {
            for next in next {
                prefetch(next, c * PAIRS);
            }
        }
        for j in 0..T {
            for r in 0..R {
                acc[r][j] = acc[r][j].pair_step(&wc[r][c], &xc[j][c]);
            }
        }
    }
    let sums = tile_sums(&acc);
    for r in 0..R {
        for j in 0..T {
            let mut sum = sums[r][j];
            for i in chunks * PAIRS..k {
                sum = widen(rows[r][i]).mul_add(widen(xs[j][i]), sum);
            }
            y[(i0 + j) * n + r0 + r] = sum;
        }
    }
    T
}
