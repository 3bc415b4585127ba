//! FP8 (e4m3fn) weights on the CPU: W8A8 with per-token dynamic activation scales, the
//! arithmetic of `../shared/fixtures/FP8.md` §3 with one scale per row (what the checkpoint
//! declares, `input_activations.strategy: token`, and what vLLM computes).
//!
//! - Weights stay e4m3 bytes `[out, in]` (memory-mapped) with one f32 scale per output row.
//! - An input row `x` is quantize-dequantized: `s = absmax(x) / 448` in f32 (`2^-23` when
//!   the row is all zero), `q = e4m3_rne(clamp(x / s, ±448))`, value `f32(q) · s`.
//! - `y_r = Σ_j xq_j · (f32(w_rj) · scale_r)` (the product is exact: the reference's
//!   dequantized weight), widened and multiplied in one pass by the same fused kernels as
//!   bf16 (`kernels`, through `Linear`), each (row, token) sum in one fixed order, so a
//!   token's bits never depend on its batch.

/// The largest finite e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;

/// e4m3fn code → f32 (all 256 codes; 0x7F and 0xFF are NaN).
static DECODE: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| {
    let mut t = [0.0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        *v = decode(c as u8);
    }
    t
});

/// One e4m3fn code as f32.
pub fn decode(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((c >> 3) & 0xF), f32::from(c & 7));
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    sign * match e {
        0 => m * 2f32.powi(-9),
        _ => (1.0 + m / 8.0) * 2f32.powi(e - 7),
    }
}

/// f32 → e4m3fn, round to nearest even (subnormals included); saturates at ±448, as the
/// reference clamps before it casts. Integer rounding on the bits (as for bf16), branch-free
/// so that a row's loop vectorises.
#[inline]
pub fn encode(v: f32) -> u8 {
    let sign = ((v.to_bits() >> 24) & 0x80) as u8;
    let a = v.abs().min(E4M3_MAX);
    // Normal range: keep 3 mantissa bits, rounding the 20 dropped ones to nearest even;
    // a carry moves into the exponent. Rebias 127 → 7 (the f32 exponent of 2^-6 is 121).
    let b = a.to_bits();
    let rounded = (b + 0x7_FFFF + ((b >> 20) & 1)) >> 20;
    let normal = rounded.wrapping_sub(120 << 3) as u8;
    // Subnormal range (below 2^-6): steps of 2^-9; 8 is 2^-6, the smallest normal.
    let subnormal = (a * 512.0).round_ties_even() as u8;
    let code = if a < 2f32.powi(-6) { subnormal } else { normal };
    if v.is_nan() {
        0x7F
    } else {
        sign | code
    }
}

/// Quantizes one activation row with its own dynamic scale (`FP8.md` §3.2, per token):
/// `s = absmax / 448` in f32 (`f32::EPSILON` for an all-zero row), codes
/// `e4m3(clamp(x / s, ±448))`. Returns `s`; the row's values are `decode(code) · s`.
pub fn quantize_activations(x: &[f32], codes: &mut [u8]) -> f32 {
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut s = absmax / E4M3_MAX;
    if s == 0.0 {
        s = f32::EPSILON;
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = encode((v / s).clamp(-E4M3_MAX, E4M3_MAX));
    }
    s
}

/// The values of a row quantized by [`quantize_activations`]: `decode(code) · scale`.
pub fn dequantize_activations(codes: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = DECODE[c as usize] * scale;
    }
}

/// Replaces each row of `width` values by its quantize-dequantize (per-token dynamic
/// scale, `quantize_activations` then `dequantize_activations`).
pub fn qdq_rows_in_place(values: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    let mut codes = vec![0u8; width];
    for row in values.chunks_exact_mut(width) {
        let s = quantize_activations(row, &mut codes);
        dequantize_activations(&codes, s, row);
    }
}

/// `[n, in]` rows, each quantize-dequantized on its own.
pub fn qdq_rows(x: &[f32], width: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    qdq_rows_in_place(&mut out, width);
    out
}

/// Quantizes one bf16 weight row the way compressed-tensors writes FP8 checkpoints
/// (`FP8.md` §4): scale `bf16(absmax / 448)` (`2^-7` for an all-zero row), codes
/// `e4m3(bf16(w / scale))` — the quotient rounded to bf16 first, as the reference's bf16
/// tensor division does. Returns the scale's bf16 bits.
pub fn quantize_row(row: &[half::bf16], codes: &mut [u8]) -> u16 {
    let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
    let mut scale = half::bf16::from_f32(absmax / E4M3_MAX);
    if scale.to_f32() == 0.0 {
        scale = half::bf16::from_f32(2f32.powi(-7));
    }
    let s = scale.to_f32();
    for (c, w) in codes.iter_mut().zip(row) {
        let q = half::bf16::from_f32(w.to_f32() / s).to_f32();
        *c = encode(q.clamp(-E4M3_MAX, E4M3_MAX) + 0.0);
    }
    scale.to_bits()
}

/// A bf16 `nn.Linear` weight `[out, in]` as FP8: the e4m3 weight `[out, in]` and its BF16
/// `weight_scale` `[out, 1]` (`quantize_row`), as compressed-tensors writes them.
pub fn quantize_linear(
    weight: &crate::checkpoint::Tensor,
) -> (crate::checkpoint::Tensor, crate::checkpoint::Tensor) {
    let (out, inp) = (weight.shape[0], weight.shape[1]);
    let v = weight.to_f32_vec();
    quantize_matrix(out, inp, |r, j| v[r * inp + j])
}

/// Output rows `r < out` of `inp` weights each, `at(r, j)` (bf16 values widened), as FP8
/// codes `[out, inp]` and BF16 scales `[out, 1]`.
fn quantize_matrix(
    out: usize,
    inp: usize,
    at: impl Fn(usize, usize) -> f32,
) -> (crate::checkpoint::Tensor, crate::checkpoint::Tensor) {
    use crate::checkpoint::{DType, Tensor};
    let mut codes = vec![0u8; out * inp];
    let mut scales = Vec::with_capacity(2 * out);
    let mut row = vec![half::bf16::ZERO; inp];
    for (r, c) in codes.chunks_exact_mut(inp.max(1)).enumerate() {
        for (j, w) in row.iter_mut().enumerate() {
            // Widened from bf16, so narrowing back is exact.
            *w = half::bf16::from_f32(at(r, j));
        }
        scales.extend_from_slice(&quantize_row(&row, c).to_le_bytes());
    }
    (
        Tensor::from_bytes(DType::F8E4M3, vec![out, inp], codes),
        Tensor::from_bytes(DType::BF16, vec![out, 1], scales),
    )
}

/// One expert of fused bf16 tensors (`gate_up` `[hidden, 2·inter]`, `down` `[inter,
/// hidden]`, "x @ W") as FP8 `nn.Linear` weights: for `gate_proj`, `up_proj`, `down_proj`,
/// the e4m3 weight `[out, in]` and its BF16 `weight_scale` `[out, 1]` (`quantize_row`).
pub fn quantize_fused_expert(
    gate_up: &crate::checkpoint::Tensor,
    down: &crate::checkpoint::Tensor,
) -> [(
    &'static str,
    crate::checkpoint::Tensor,
    crate::checkpoint::Tensor,
); 3] {
    let (h, i2) = (gate_up.shape[0], gate_up.shape[1]);
    let i = i2 / 2;
    let (gu, d) = (gate_up.to_f32_vec(), down.to_f32_vec());
    // "x @ W": output feature r of input j is column r of row j.
    let (gw, gs) = quantize_matrix(i, h, |r, j| gu[j * i2 + r]);
    let (uw, us) = quantize_matrix(i, h, |r, j| gu[j * i2 + i + r]);
    let (dw, ds) = quantize_matrix(h, i, |r, j| d[j * h + r]);
    [
        ("gate_proj", gw, gs),
        ("up_proj", uw, us),
        ("down_proj", dw, ds),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for c in 0..=255u8 {
            let v = decode(c);
            if v.is_nan() {
                continue;
            }
            let back = encode(v);
            // ±0 both decode to 0; the sign is kept.
            assert_eq!(back, c, "code {c:#x} = {v}");
        }
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
    }

    /// The bit-rounding `encode` equals a plain nearest-even search over every code, for
    /// every f32 up to 480 on a fine grid and around every midpoint between codes.
    #[test]
    fn encoding_is_the_nearest_code_ties_to_even() {
        let finite: Vec<(u8, f32)> = (0..0x7Fu8).map(|c| (c, decode(c))).collect();
        let nearest = |a: f32| -> u8 {
            let a = a.min(E4M3_MAX);
            let mut best = (0u8, f32::INFINITY);
            for &(c, v) in &finite {
                let d = (v - a).abs();
                if d < best.1 || (d == best.1 && c % 2 == 0) {
                    best = (c, d);
                }
            }
            best.0
        };
        let mut values: Vec<f32> = (0..=480_000).map(|i| i as f32 / 1000.0).collect();
        values.extend((0..=4096).map(|i| i as f32 * 2f32.powi(-16)));
        for w in finite.windows(2) {
            let mid = (w[0].1 + w[1].1) / 2.0;
            for m in [
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                values.push(m);
            }
        }
        for a in values {
            assert_eq!(encode(a), nearest(a), "{a}");
            assert_eq!(encode(-a), nearest(a) | 0x80, "-{a}");
        }
        assert_eq!(encode(f32::NAN), 0x7F);
        assert_eq!(encode(f32::INFINITY), 0x7E);
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code 0x38.
        assert_eq!(encode(1.0625), 0x38);
        assert_eq!(encode(1.0626), 0x39);
        // Between 1.125 and 1.25 (0x3A): the midpoint goes to 0x3A.
        assert_eq!(encode(1.1875), 0x3A);
        // Subnormal midpoint 1.5 · 2^-9 goes to 2 · 2^-9; below 2^-10 becomes 0.
        assert_eq!(encode(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(encode(0.4 * 2f32.powi(-9)), 0x00);
        assert_eq!(encode(1e9), 0x7E);
        assert_eq!(encode(-1e9), 0xFE);
    }

    /// An FP8 `Linear`: the W8A8 product of `FP8.md` §3 (inputs quantized per row, weights
    /// `f32(code) · scale`), weight-only without input quantization, each token's row the
    /// same alone as in a batch, and `forward_prequantized` on quantized rows the same bits.
    #[test]
    fn fp8_linears_compute_the_documented_product() {
        use crate::checkpoint::{DType, Tensor};
        use crate::linear::Linear;
        let (out, inp, n) = (37, 29, 5);
        let codes: Vec<u8> = (0..out * inp)
            .map(|i| ((i * 73 + 11) % 256) as u8)
            .map(|c| if c & 0x7F == 0x7F { 0x3A } else { c })
            .collect();
        let scale: Vec<f32> = (0..out).map(|r| 0.01 + r as f32 * 1e-3).collect();
        let x: Vec<f32> = (0..n * inp)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 3.0)
            .collect();
        let weight = || Tensor::from_bytes(DType::F8E4M3, vec![out, inp], codes.clone());
        for qdq in [true, false] {
            let l = Linear::fp8(weight(), scale.clone(), qdq);
            assert_eq!(l.quantizes_input(), qdq);
            let y = l.forward(&x, n);
            let xs = if qdq { qdq_rows(&x, inp) } else { x.clone() };
            for t in 0..n {
                for r in 0..out {
                    let want: f64 = (0..inp)
                        .map(|j| {
                            f64::from(xs[t * inp + j])
                                * f64::from(decode(codes[r * inp + j]))
                                * f64::from(scale[r])
                        })
                        .sum();
                    let got = f64::from(y[t * out + r]);
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{got} {want}"
                    );
                }
                let alone = l.forward(&x[t * inp..(t + 1) * inp], 1);
                assert_eq!(alone, &y[t * out..(t + 1) * out], "row {t} alone");
            }
            if qdq {
                assert_eq!(l.forward_prequantized(&xs, n), y);
            }
        }
    }

    #[test]
    fn qdq_keeps_the_row_max_and_zero_rows() {
        let out = qdq_rows(&[2.0, -1.0, 0.0], 3);
        assert!((out[0] - 2.0).abs() < 1e-6, "{}", out[0]);
        assert_eq!(out[2], 0.0);
        assert_eq!(qdq_rows(&[0.0; 3], 3), [0.0; 3]);
    }
}
