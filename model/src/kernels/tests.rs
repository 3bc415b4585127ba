//! The kernels against plain sums and against each other: every build and batch shape gives
//! a token the bits of the baseline batch-1 kernel.
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

/// `rows × k` random weights as bf16, and as FP8 codes (never NaN) with a scale per row.
fn random_rows(
    next: &mut impl FnMut(usize) -> usize,
    rows: usize,
    k: usize,
) -> (Vec<u16>, Vec<u8>, Vec<f32>) {
    let bf16 = (0..rows * k)
        .map(|_| half::bf16::from_f32(next(2001) as f32 / 1000.0 - 1.0).to_bits())
        .collect();
    let fp8 = (0..rows * k).map(|_| next(256) as u8 & 0xFE | 1).collect();
    let scale = (0..rows).map(|_| 0.01 + next(100) as f32 * 1e-3).collect();
    (bf16, fp8, scale)
}

/// For random shapes and batch compositions, every build of every kernel this CPU can
/// run (baseline, AVX2, AVX-512) gives each token the bits of the baseline batch-1 dot
/// kernel: bf16 and FP8 rows, one token or several, and the "x @ W" kernels likewise
/// against their own batch-1 form.
#[test]
fn every_build_and_batch_gives_the_batch_1_bits() {
    let mut rng = crate::sampling::SplitMix64::new(42);
    let mut next = |n: usize| (rng.next_u64() % n as u64) as usize;
    let isas = builds();
    for _ in 0..40 {
        // Now and then more rows than one block of `axpy_rows` (the K of its "x @ W").
        let rows = match next(3) {
            0 => 17 + next(40),
            _ => 1 + next(9),
        };
        let k = 1 + next(150);
        // Now and then more tokens than one cache block of `dot_rows_multi` holds, or than
        // `axpy_rows_multi` streams in groups.
        let t = match next(5) {
            0 => X_BLOCK_BYTES / (4 * k) + 1 + next(300),
            1 => 10 + next(60),
            _ => 1 + next(9),
        };
        let (bf16, fp8, scale) = random_rows(&mut next, rows, k);
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
                    let single: Vec<u32> = alone(isa, i, fp).iter().map(|v| v.to_bits()).collect();
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

/// The bits every kernel gives on fixed inputs, folded into one number that was recorded on
/// x86-64: every build on every architecture must give it (baseline, AVX2 and AVX-512 on
/// x86-64; baseline and NEON on aarch64, which `scripts/aarch64-check.sh` runs under
/// qemu-user). The kernels use IEEE operations only (the exp is `exp_canonical`, never a
/// libm's), so a cluster that mixes these machines computes what one machine does.
#[test]
fn every_architecture_gives_the_recorded_bits() {
    const RECORDED: u64 = 0x9050_09BE_9FC1_C9AD;
    let mut rng = crate::sampling::SplitMix64::new(7);
    let mut next = |n: usize| (rng.next_u64() % n as u64) as usize;
    let (rows, k, t) = (37, 211, 9);
    let (bf16, fp8, scale) = random_rows(&mut next, rows, k);
    let x: Vec<f32> = (0..t * k)
        .map(|_| next(4001) as f32 / 1000.0 - 2.0)
        .collect();
    let xa: Vec<f32> = (0..t * rows)
        .map(|_| next(2001) as f32 / 500.0 - 2.0)
        .collect();
    // Attention over 40 keys of one head for three queries, as `attend`'s own test.
    let d = 16;
    let kv: Vec<f32> = (0..40 * d)
        .map(|_| next(801) as f32 / 100.0 - 4.0)
        .collect();
    let q: Vec<f32> = (0..3 * d).map(|_| next(601) as f32 / 100.0 - 3.0).collect();
    let visible = [(0, 20), (3, 39), (39, 39)];
    let run = [&kv[..]];
    let block = HeadBlock::one_head(&q, &run, d, &visible, 0.25);
    let fold = |h: u64, v: &[f32]| {
        v.iter().fold(h, |h, x| {
            (h ^ u64::from(x.to_bits())).wrapping_mul(0x0000_0100_0000_01B3)
        })
    };
    for isa in builds() {
        let mut h = 0xCBF2_9CE4_8422_2325;
        let mut y = vec![0.0; rows * t];
        dot_rows_multi_on(isa, &bf16, &[], &x, t, &mut y);
        h = fold(h, &y);
        dot_rows_multi_on(isa, &fp8, &scale, &x, t, &mut y);
        h = fold(h, &y);
        let mut y = vec![0.0; (k - 5) * t];
        axpy_rows_multi_on(isa, &bf16, k, 5, &xa, t, &mut y);
        h = fold(h, &y);
        let mut out = vec![0.0; 3 * d];
        attend_block_on(isa, &block, &mut out);
        h = fold(h, &out);
        assert_eq!(h, RECORDED, "{isa:?}: {h:#018X}");
    }
}

/// `dot_bf16_multi`'s canonical order written out plainly, one (row, token) at a time:
/// pairs `2i + 1` then `2i` into lane `i` with subnormals read and left as zero, the lane
/// tree, the tail.
fn bf16_products_plainly(w: &[u16], x: &[u16], rows: usize, k: usize, t: usize) -> Vec<u32> {
    let flush = |v: f32| {
        if v.is_subnormal() {
            0.0f32.copysign(v)
        } else {
            v
        }
    };
    let value = |h: u16| flush(widen(h));
    let mut out = vec![0; t * rows];
    for i in 0..t {
        for r in 0..rows {
            let (wr, xi) = (&w[r * k..(r + 1) * k], &x[i * k..(i + 1) * k]);
            let mut lanes = [0.0f32; LANES];
            for c in 0..k / 32 {
                for (l, acc) in lanes.iter_mut().enumerate() {
                    for e in [2 * l + 1, 2 * l] {
                        let at = 32 * c + e;
                        *acc = flush(value(wr[at]).mul_add(value(xi[at]), *acc));
                    }
                }
            }
            let mut sum = lane_sum(&lanes);
            for at in k / 32 * 32..k {
                sum = widen(wr[at]).mul_add(widen(xi[at]), sum);
            }
            out[i * rows + r] = sum.to_bits();
        }
    }
    out
}

/// The bf16-activation products: `VDPBF16PS` where this CPU has it and the emulation in
/// every build give each token the bits of the plain loop, alone or in any batch, with
/// subnormal weights (read as zero) and sums that fall below the smallest normal (flushed).
#[test]
fn bf16_products_follow_the_instruction_in_every_build_and_batch() {
    let mut rng = crate::sampling::SplitMix64::new(11);
    let mut next = |n: usize| (rng.next_u64() % n as u64) as usize;
    let hardware = if bf16_dot_in_hardware() {
        vec![false, true]
    } else {
        vec![false]
    };
    for case in 0..40 {
        let rows = match next(3) {
            0 => 17 + next(40),
            _ => 1 + next(9),
        };
        let k = 1 + next(200);
        let t = match next(5) {
            0 => X_BLOCK_BYTES / (2 * k) + 1 + next(100),
            1 => 10 + next(40),
            _ => 1 + next(9),
        };
        let (mut w, _, _) = random_rows(&mut next, rows, k);
        for v in w.iter_mut().skip(next(5)).step_by(1 + next(6)) {
            *v = match case % 3 {
                // Subnormal weights.
                0 => next(0x80) as u16 | (next(2) as u16) << 15,
                // Weights near the smallest normal: products and sums down there.
                1 => (*v & 0x807F) | (1 + next(12) as u16) << 7,
                _ => *v,
            };
        }
        let xf: Vec<f32> = (0..t * k)
            .map(|_| next(4001) as f32 / 1000.0 - 2.0)
            .collect();
        let x = round_activations(&xf);
        let want = bf16_products_plainly(&w, &x, rows, k, t);
        for &hw in &hardware {
            for isa in builds() {
                let mut y = vec![0.0; rows * t];
                dot_bf16_multi_on(hw, isa, &w, &x, t, &mut y);
                let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "hardware={hw} {isa:?} rows {rows} k {k} t {t}");
                let i = next(t);
                let mut alone = vec![0.0; rows];
                dot_bf16_multi_on(hw, isa, &w, &x[i * k..(i + 1) * k], 1, &mut alone);
                let alone: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
                assert_eq!(
                    alone,
                    want[i * rows..(i + 1) * rows],
                    "hardware={hw} {isa:?} alone"
                );
            }
        }
        // And they are the products: within float rounding of an f64 sum.
        for (o, got) in want.iter().enumerate().take(50) {
            let (i, r) = (o / rows, o % rows);
            let (mut sum, mut size) = (0.0f64, 0.0f64);
            for at in 0..k {
                let p = f64::from(widen(w[r * k + at])) * f64::from(widen(x[i * k + at]));
                sum += p;
                size += p.abs();
            }
            let got = f64::from(f32::from_bits(*got));
            assert!((got - sum).abs() <= 1e-5 * size + 1e-30, "{got} vs {sum}");
        }
    }
}

#[test]
fn activations_round_to_nearest_even_with_subnormals_to_zero() {
    let x = [
        1.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -3.0e-39,
        1e-40,
        f32::NAN,
        -2.5,
    ];
    let h = round_activations(&x);
    assert_eq!(&h[..3], &[0x3F80, 0x3F80, 0x3F82], "ties to even");
    assert_eq!(
        &h[3..5],
        &[0x8000, 0x0000],
        "subnormals to zero of their sign"
    );
    assert!(widen(h[5]).is_nan());
    assert_eq!(widen(h[6]), -2.5);
}

/// Attention with the head widths the builds may take another path for (64 and 128: AVX2
/// packs keys and values and holds a row's query and outputs in registers): every build
/// gives the baseline's bits, over a paged cache read where it lies (blocks of 5 rows, from
/// inside one) and over a contiguous copy of it, for blocks of queries whose visible keys
/// start and end in different places, more keys than one pack holds and a last pack short.
#[test]
fn attention_gives_the_baseline_bits_at_every_head_width() {
    let mut rng = crate::sampling::SplitMix64::new(11);
    let mut next = |n: usize| (rng.next_u64() % n as u64) as usize;
    for (d, keys_n) in [(64, 75), (128, 70), (64, 1), (48, 40)] {
        let (kv_heads, group, block_rows, first) = (2, 3, 5, 2);
        let kw = kv_heads * d;
        let qw = kv_heads * group * d;
        let kv: Vec<f32> = (0..(keys_n + first) * kw)
            .map(|_| next(801) as f32 / 100.0 - 4.0)
            .collect();
        let vv: Vec<f32> = (0..(keys_n + first) * kw)
            .map(|_| next(1601) as f32 / 200.0 - 4.0)
            .collect();
        let visible: Vec<(usize, usize)> =
            [(0, keys_n - 1), (3, keys_n / 2), (keys_n - 1, keys_n - 1)]
                .iter()
                .map(|&(a, b): &(usize, usize)| (a.min(b), b))
                .collect();
        let q: Vec<f32> = (0..visible.len() * qw)
            .map(|_| next(601) as f32 / 100.0 - 3.0)
            .collect();
        // The paged blocks (the first row at `first` of the first block) and one contiguous
        // run of the same rows.
        let paged = |v: &[f32]| -> Vec<Vec<f32>> {
            v.chunks(block_rows * kw).map(<[f32]>::to_vec).collect()
        };
        let (kb, vb) = (paged(&kv), paged(&vv));
        let (kb, vb): (Vec<&[f32]>, Vec<&[f32]>) = (
            kb.iter().map(Vec::as_slice).collect(),
            vb.iter().map(Vec::as_slice).collect(),
        );
        let (kr, vr) = ([&kv[first * kw..]], [&vv[first * kw..]]);
        let layouts = [
            (
                KvRows::paged(&kb, block_rows, first, kw),
                KvRows::paged(&vb, block_rows, first, kw),
            ),
            (KvRows::contiguous(&kr, kw), KvRows::contiguous(&vr, kw)),
        ];
        let mut want = None;
        for (keys, values) in layouts {
            for kv_head in 0..kv_heads {
                let block = HeadBlock {
                    q: &q,
                    q_stride: qw,
                    q_off: kv_head * group * d,
                    heads: group,
                    keys,
                    values,
                    kv_stride: kw,
                    kv_off: kv_head * d,
                    d,
                    visible: &visible,
                    scale: 0.2,
                };
                for isa in builds() {
                    let mut out = vec![0.0f32; visible.len() * group * d];
                    attend_block_on(isa, &block, &mut out);
                    let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert!(out.iter().all(|v| v.is_finite()), "d {d}");
                    let want = want.get_or_insert_with(Vec::new);
                    if want.len() <= kv_head {
                        want.push(bits);
                    } else {
                        assert_eq!(bits, want[kv_head], "d {d}, {isa:?}, KV head {kv_head}");
                    }
                }
            }
        }
    }
}
