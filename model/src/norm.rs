//! RMS normalisation (HF `Llama4TextRMSNorm`, `Llama4TextL2Norm`; LLAMA4.md §2.3, §2.4.4).
//! Everything is f32 here, so the cast back to the activation dtype is the identity.

/// Normalises each `dim`-long row of `x` in place and multiplies by `weight` when given.
/// A prompt's rows go over the cores (`hot::for_each_row`); each row's bits are its own.
pub fn rms_norm_in_place(x: &mut [f32], dim: usize, weight: Option<&[f32]>, eps: f32) {
    crate::hot::for_each_row(x, dim, |_, row| {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        match weight {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    });
}

/// Returns the normalised copy of `x`.
pub fn rms_norm(x: &[f32], dim: usize, weight: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    rms_norm_in_place(&mut y, dim, Some(weight), eps);
    y
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_has_unit_rms_before_weight() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        rms_norm_in_place(&mut x, 4, None, 0.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
        let y = rms_norm(&[1.0, 1.0], 2, &[2.0, 3.0], 0.0);
        assert_eq!(y, vec![2.0, 3.0]);
    }

    /// A prompt's rows, normalised over the cores, have the bits each row gets alone.
    #[test]
    fn a_prompts_rows_over_the_cores_have_the_bits_of_each_row_alone() {
        let dim = 1024;
        let rows = crate::hot::SPLIT_VALUES_MIN / dim + 3;
        let mut rng = crate::sampling::SplitMix64::new(7);
        let x: Vec<f32> = (0..rows * dim)
            .map(|_| (rng.next_u64() % 2001) as f32 / 500.0 - 2.0)
            .collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let all = rms_norm(&x, dim, &w, 1e-5);
        for (r, row) in x.chunks_exact(dim).enumerate() {
            let alone = rms_norm(row, dim, &w, 1e-5);
            let got = &all[r * dim..(r + 1) * dim];
            assert!(
                got.iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r}"
            );
        }
    }

    #[test]
    fn activations() {
        assert_eq!(silu(0.0), 0.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
    }
}
