//! Rotary position embedding on adjacent pairs, with llama3 frequency scaling.
//!
//! Mirrors HF `modeling_llama4.py::apply_rotary_emb` (`view_as_complex` over pairs
//! `(x[2j], x[2j+1])`) and `modeling_rope_utils.py::_compute_llama3_parameters`
//! (LLAMA4.md §2.4 step 3). Angles are `position · θ_j` in f32, as in transformers.

use crate::config::{RopeScaling, TextConfig};

/// Inverse frequencies `θ_j`, j = 0..head_dim/2, with any scaling applied.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &TextConfig) -> Self {
        Self::with(config.head_dim, config.rope_theta, &config.rope_scaling)
    }

    pub fn with(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|j| {
                // transformers: 1 / base^(arange(0, d, 2).float() / d), in f32.
                let exponent = (2 * j) as f32 / head_dim as f32;
                1.0 / (theta as f32).powf(exponent)
            })
            .map(|f| scale(f, scaling))
            .collect();
        Self { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates one head vector (`head_dim` values) for absolute position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        debug_assert_eq!(x.len(), self.inv_freq.len() * 2);
        let p = pos as f32;
        for (pair, &f) in x.chunks_exact_mut(2).zip(&self.inv_freq) {
            let angle = p * f;
            let (sin, cos) = angle.sin_cos();
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// llama3 band scaling. The band is chosen before any smoothing is computed, so
/// `low_freq_factor == high_freq_factor` (Scout's current config) never divides by zero.
fn scale(inv_freq: f32, scaling: &RopeScaling) -> f32 {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = *scaling
    else {
        return inv_freq;
    };
    let (factor, low, high, old) = (
        factor as f32,
        low_freq_factor as f32,
        high_freq_factor as f32,
        original_max_position_embeddings as f32,
    );
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    let low_freq_wavelen = old / low;
    let high_freq_wavelen = old / high;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / factor
    } else if high == low {
        // The medium band is a single wavelength; transformers keeps θ/factor there.
        inv_freq / factor
    } else {
        let s = (old / wavelen - low) / (high - low);
        (1.0 - s) * inv_freq / factor + s * inv_freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(factor: f64, low: f64, high: f64) -> RopeScaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: 8192.0,
        }
    }

    #[test]
    fn scout_bands_with_equal_factors() {
        // LLAMA4.md §2.4: j = 0..34 unchanged, j = 35..63 divided by 16.
        let plain = Rope::with(128, 500000.0, &RopeScaling::None);
        let scaled = Rope::with(128, 500000.0, &llama3(16.0, 1.0, 1.0));
        for j in 0..64 {
            let (p, s) = (plain.inv_freq()[j], scaled.inv_freq()[j]);
            if j <= 34 {
                assert_eq!(p, s, "j = {j}");
            } else {
                assert_eq!(p / 16.0, s, "j = {j}");
            }
            assert!(s.is_finite());
        }
    }

    #[test]
    fn original_scout_values_interpolate_the_middle_band() {
        let plain = Rope::with(128, 500000.0, &RopeScaling::None);
        let scaled = Rope::with(128, 500000.0, &llama3(8.0, 1.0, 4.0));
        for j in 0..64 {
            let (p, s) = (plain.inv_freq()[j], scaled.inv_freq()[j]);
            match j {
                0..=28 => assert_eq!(p, s, "j = {j}"),
                29..=34 => assert!(s < p && s > p / 8.0, "j = {j}"),
                _ => assert_eq!(p / 8.0, s, "j = {j}"),
            }
        }
    }

    #[test]
    fn rotation_uses_adjacent_pairs() {
        let rope = Rope::with(4, 10000.0, &RopeScaling::None);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope.rotate(&mut x, 1);
        // Pair 0 has θ = 1: (1, 0) -> (cos 1, sin 1).
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        // Pair 1 has θ = 0.01: (0, 1) -> (-sin, cos).
        assert!((x[2] + 0.01f32.sin()).abs() < 1e-6 && (x[3] - 0.01f32.cos()).abs() < 1e-6);
        let mut y = [3.0, 4.0];
        Rope::with(2, 10000.0, &RopeScaling::None).rotate(&mut y, 0);
        assert_eq!(y, [3.0, 4.0]);
    }
}
