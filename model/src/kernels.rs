//! Fused widen-and-multiply kernels for the weight products (see `Linear::forward_into`):
//! bf16 weights, and FP8 (e4m3) weights with one scale per row. Each is written once in
//! portable Rust and compiled twice: for the baseline target and for AVX2 + FMA, chosen at
//! run time, where the loops become 8-lane widen-and-FMA code.
#![allow(unsafe_code)]

/// Lanes of independent accumulators per row: two AVX registers.
const LANES: usize = 16;

/// How far ahead of the current element each row's weights are prefetched.
const PREFETCH_AHEAD: usize = 512;

/// A public kernel that runs its portable body (`$body`) compiled for the best instruction
/// set the CPU has, chosen at run time: AVX-512, AVX2 + FMA, or the baseline. Each lane does
/// the same operations in the same order in every build (the loops are written per lane and
/// sums are taken lane by lane in source order), so the bits never depend on which build
/// runs: a cluster of machines with different instruction sets computes what one does.
macro_rules! kernel {
    (
        $(#[$doc:meta])*
        pub fn $name:ident / $on:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) => $body:ident
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
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) {
                    $body($($arg),*)
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
            $body($($arg),*)
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
    pub fn dot_rows / dot_rows_on<W: Weight>(w: &[W], scale: &[f32], x: &[f32], y: &mut [f32]) => dot_rows_generic
}

kernel! {
    /// `y[j] = Σ_k x[k] · w[k, j0 + j]` over a `[x.len(), cols]` bf16 matrix (the "x @ W"
    /// orientation), for the column range `j0..j0 + y.len()`.
    pub fn axpy_rows / axpy_rows_on(w: &[u16], cols: usize, j0: usize, x: &[f32], y: &mut [f32]) => axpy_rows_generic
}

kernel! {
    /// `axpy_rows` for `t` tokens at once: `x` is `[t, k]`, `y` is `[t, y_cols]`. Each token's
    /// result is computed in exactly the order `axpy_rows` uses for it alone, so a token's
    /// output never depends on which other tokens share the call.
    pub fn axpy_rows_multi / axpy_rows_multi_on(
        w: &[u16],
        cols: usize,
        j0: usize,
        x: &[f32],
        t: usize,
        y: &mut [f32],
    ) => axpy_rows_multi_generic
}

#[inline(always)]
fn axpy_rows_multi_generic(w: &[u16], cols: usize, j0: usize, x: &[f32], t: usize, y: &mut [f32]) {
    let k = x.len() / t.max(1);
    let n = y.len() / t.max(1);
    assert!(w.len() >= k * cols && j0 + n <= cols, "weight shape");
    y.fill(0.0);
    let mut row = vec![0.0f32; n];
    for kk in 0..k {
        let src = &w[kk * cols + j0..kk * cols + j0 + n];
        for (r, &b) in row.iter_mut().zip(src) {
            *r = widen(b);
        }
        for (y_i, x_i) in y.chunks_exact_mut(n).zip(x.chunks_exact(k)) {
            let xk = x_i[kk];
            for (out, &wv) in y_i.iter_mut().zip(&row) {
                *out = wv.mul_add(xk, *out);
            }
        }
    }
}

kernel! {
    /// `dot_rows` for `t` tokens at once: `x` is `[t, k]` and `yt` is `[rows, t]`
    /// (token-minor). Each weight row is widened once for all tokens, and every (row, token)
    /// dot product is computed in exactly the order `dot_rows` uses for that token alone: a
    /// token's output never depends on which other tokens share the batch.
    pub fn dot_rows_multi / dot_rows_multi_on<W: Weight>(
        w: &[W],
        scale: &[f32],
        x: &[f32],
        t: usize,
        yt: &mut [f32],
    ) => dot_rows_multi_generic
}

/// Tokens sharing one widened weight chunk.
const TOKENS: usize = 4;

#[inline(always)]
fn dot_rows_multi_generic<W: Weight>(w: &[W], scale: &[f32], x: &[f32], t: usize, yt: &mut [f32]) {
    let k = x.len() / t.max(1);
    let rows = yt.len() / t.max(1);
    assert!(
        w.len() >= rows * k && x.len() == t * k,
        "shapes do not match"
    );
    assert!(!W::SCALED || scale.len() >= rows, "one scale per row");
    for (r, (row, out)) in w.chunks_exact(k).zip(yt.chunks_exact_mut(t)).enumerate() {
        let s = row_scale::<W>(scale, r);
        let mut i0 = 0;
        while i0 + TOKENS <= t {
            dot_tokens::<W, TOKENS>(
                row,
                s,
                &x[i0 * k..(i0 + TOKENS) * k],
                &mut out[i0..i0 + TOKENS],
            );
            i0 += TOKENS;
        }
        while i0 < t {
            dot_tokens::<W, 1>(row, s, &x[i0 * k..(i0 + 1) * k], &mut out[i0..i0 + 1]);
            i0 += 1;
        }
    }
}

/// Dot products of one weight row (scale `s`) with `N` tokens (`x` is `[N, k]`).
#[inline(always)]
fn dot_tokens<W: Weight, const N: usize>(row: &[W], s: f32, x: &[f32], out: &mut [f32]) {
    let k = row.len();
    let chunks = k / LANES;
    let mut acc = [[0.0f32; LANES]; N];
    for c in 0..chunks {
        let mut wv = [0.0f32; LANES];
        for (v, &b) in wv.iter_mut().zip(&row[c * LANES..(c + 1) * LANES]) {
            *v = b.widen(s);
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let xv = &x[j * k + c * LANES..j * k + (c + 1) * LANES];
            for i in 0..LANES {
                a[i] = wv[i].mul_add(xv[i], a[i]);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let mut sum: f32 = a.iter().sum();
        for i in chunks * LANES..k {
            sum = row[i].widen(s).mul_add(x[j * k + i], sum);
        }
        out[j] = sum;
    }
}

/// Rows handled together: four independent weight streams per core keep more memory
/// requests in flight than one.
const ROWS: usize = 2;

#[inline(always)]
fn dot_rows_generic<W: Weight>(w: &[W], scale: &[f32], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    assert_eq!(w.len(), y.len() * k, "weight rows do not match");
    assert!(!W::SCALED || scale.len() >= y.len(), "one scale per row");
    let mut y_groups = y.chunks_exact_mut(ROWS);
    let mut w_groups = w.chunks_exact(ROWS * k);
    let mut r0 = 0;
    for (out, rows) in (&mut y_groups).zip(&mut w_groups) {
        let s: [f32; ROWS] = std::array::from_fn(|r| row_scale::<W>(scale, r0 + r));
        let mut acc = [[0.0f32; LANES]; ROWS];
        let mut c = 0;
        while c + LANES <= k {
            for r in 0..ROWS {
                prefetch(rows, r * k + c + PREFETCH_AHEAD);
            }
            let xv = &x[c..c + LANES];
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = &rows[r * k + c..r * k + c + LANES];
                for i in 0..LANES {
                    a[i] = wv[i].widen(s[r]).mul_add(xv[i], a[i]);
                }
            }
            c += LANES;
        }
        for (r, a) in acc.iter().enumerate() {
            let mut sum: f32 = a.iter().sum();
            for i in c..k {
                sum = rows[r * k + i].widen(s[r]).mul_add(x[i], sum);
            }
            out[r] = sum;
        }
        r0 += ROWS;
    }
    for (out, row) in y_groups
        .into_remainder()
        .iter_mut()
        .zip(w_groups.remainder().chunks_exact(k))
    {
        let s = row_scale::<W>(scale, r0);
        let mut acc = [0.0f32; LANES];
        let mut wc = row.chunks_exact(LANES);
        let mut xc = x.chunks_exact(LANES);
        for (wv, xv) in (&mut wc).zip(&mut xc) {
            for i in 0..LANES {
                acc[i] = wv[i].widen(s).mul_add(xv[i], acc[i]);
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (wv, xv) in wc.remainder().iter().zip(xc.remainder()) {
            sum = wv.widen(s).mul_add(*xv, sum);
        }
        *out = sum;
        r0 += 1;
    }
}

#[inline(always)]
fn axpy_rows_generic(w: &[u16], cols: usize, j0: usize, x: &[f32], y: &mut [f32]) {
    assert!(
        w.len() >= x.len() * cols && j0 + y.len() <= cols,
        "weight shape"
    );
    y.fill(0.0);
    let n = y.len();
    for (k, &xk) in x.iter().enumerate() {
        let row = &w[k * cols + j0..k * cols + j0 + n];
        for (out, &wv) in y.iter_mut().zip(row) {
            *out = widen(wv).mul_add(xk, *out);
        }
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
        dot_rows_generic(&w, &[], &x, &mut yg);
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
                assert_eq!(yt[r * 7 + i], alone[r], "row {r}, token {i}");
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
                assert_eq!(yt[r * 3 + i], alone[r], "row {r}, token {i}");
            }
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
                        let got: Vec<u32> = (0..rows).map(|r| yt[r * t + i].to_bits()).collect();
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
