//! RMS normalisation (HF `Llama4TextRMSNorm`, `Llama4TextL2Norm`; LLAMA4.md §2.3, §2.4.4).
//! Everything is f32 here, so the cast back to the activation dtype is the identity.

/// Normalises each `dim`-long row of `x` in place and multiplies by `weight` when given.
pub fn rms_norm_in_place(x: &mut [f32], dim: usize, weight: Option<&[f32]>, eps: f32) {
    for row in x.chunks_exact_mut(dim) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        match weight {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    }
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

    #[test]
    fn activations() {
        assert_eq!(silu(0.0), 0.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
    }
}
