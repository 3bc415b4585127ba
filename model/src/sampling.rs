//! Choosing the next token: greedy, or temperature with top-k and top-p from a seeded
//! generator, in the order transformers' logits processors apply them (temperature, top-k,
//! top-p).
//!
//! The random draw for a token is a pure function of the seed and the token's position in
//! its sequence ([`SplitMix64::at`]), not of how many draws came before: a request resumed
//! elsewhere as prompt + the tokens already generated (the gateway's migration off a dead
//! attention worker) draws exactly what the uninterrupted one would have.

use crate::error::{ModelError, Result};

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
    /// Stop ids cannot end the text before this many tokens (vLLM's `min_tokens`).
    pub min_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            min_tokens: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(self) -> Result<Self> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::Sampling {
                field: "temperature",
                reason: format!("{} is not a finite number ≥ 0", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Sampling {
                field: "top_p",
                reason: format!("{} is not in (0, 1]", self.top_p),
            });
        }
        Ok(self)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// SplitMix64: a small, fast, seedable generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// The `index`-th draw (from 0) of the generator seeded with `seed`, uniform in [0, 1),
    /// without drawing the ones before it: SplitMix64's state is a counter.
    pub fn at(seed: u64, index: u64) -> f64 {
        unit(mix64(seed.wrapping_add(
            index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )))
    }
}

/// 53 random bits as a uniform value in [0, 1).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The SplitMix64 finaliser: a good 64-bit hash of `z`.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of the largest logit; the first one on ties, like `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self { params }
    }

    /// The token at `position` of its sequence, the `generated`-th (from 0) of its request:
    /// `stop_ids` are barred while fewer than `min_tokens` have been generated.
    pub fn next(&self, logits: &[f32], position: usize, generated: usize, stop_ids: &[u32]) -> u32 {
        if generated >= self.params.min_tokens || stop_ids.is_empty() {
            return self.sample(logits, position);
        }
        let mut barred = logits.to_vec();
        for &id in stop_ids {
            if let Some(l) = barred.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.sample(&barred, position)
    }

    /// The token at `position` of its sequence (prompt included), from the logits of the
    /// one before it.
    pub fn sample(&self, logits: &[f32], position: usize) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let max = logits[order[0] as usize] * inv_t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| f64::from((logits[i as usize] * inv_t - max).exp()))
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= f64::from(self.params.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
            let kept: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= kept);
        }
        let mut u = SplitMix64::at(self.params.seed, position as u64);
        for (&id, &p) in order.iter().zip(&probs) {
            if u < p {
                return id;
            }
            u -= p;
        }
        *order.last().expect("at least one token is kept")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            min_tokens: 0,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits = [0.0, 1.0, 0.5, 0.9];
        let s = Sampler::new(params(1.0, 1.0, 1, 7));
        assert!((0..50).all(|p| s.sample(&logits, p) == 1));
        let draw = |seed| {
            let s = Sampler::new(params(1.0, 1.0, 0, seed));
            (0..20).map(|p| s.sample(&logits, p)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let s = Sampler::new(params(1.0, 0.7, 0, 1));
        let seen: std::collections::BTreeSet<u32> =
            (0..500).map(|p| s.sample(&logits, p)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    /// A draw depends on the seed and the position only: the draws of the stream, taken at
    /// any position first, and so a sequence resumed at position p draws what it would have.
    #[test]
    fn draws_are_a_function_of_seed_and_position() {
        let mut stream = SplitMix64::new(11);
        let drawn: Vec<f64> = (0..100).map(|_| stream.next_f64()).collect();
        for p in [99, 0, 57, 3] {
            assert_eq!(SplitMix64::at(11, p as u64), drawn[p], "position {p}");
        }
        assert_ne!(SplitMix64::at(12, 5), drawn[5]);
    }

    #[test]
    fn stop_ids_wait_for_min_tokens() {
        let logits = [0.0, 5.0, 1.0];
        let s = Sampler::new(SamplingParams {
            min_tokens: 2,
            ..SamplingParams::default()
        });
        assert_eq!(s.next(&logits, 9, 0, &[1]), 2);
        assert_eq!(s.next(&logits, 10, 1, &[1]), 2);
        assert_eq!(s.next(&logits, 11, 2, &[1]), 1);
        assert_eq!(s.next(&logits, 9, 0, &[]), 1);
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(params(-1.0, 1.0, 0, 0).validate().is_err());
        assert!(params(f32::NAN, 1.0, 0, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0, 0).validate().is_err());
        assert!(params(1.0, 1.5, 0, 0).validate().is_err());
        assert!(params(0.7, 0.9, 40, 0).validate().is_ok());
    }
}
