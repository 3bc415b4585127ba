//! Feed-forward blocks: the dense SwiGLU MLP and the top-1 mixture of experts (HF
//! `Llama4TextMLP`, `Llama4TextMoe`, `Llama4TextExperts`; LLAMA4.md §2.5).
//!
//! MoE, per token: router logits `x · W_rᵀ`; the top-1 expert e; score `σ(logit_e)`; the
//! expert runs on the *scaled input* `σ · x` (not on x, since SwiGLU is not linear); the
//! shared expert runs on the unscaled x; the output is their sum. Routing is a pure
//! function (`route`) and the expert SwiGLU is a free function (`expert_swiglu`) so that the
//! data plane can run the same steps on other machines.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::checkpoint::{Tensor, WeightSource};
use crate::config::TextConfig;
use crate::error::Result;
use crate::linear::{Layout, Linear};
use crate::norm::{sigmoid, silu};

/// `down(silu(gate(x)) ⊙ up(x))` with `nn.Linear` weights.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(src: &dyn WeightSource, prefix: &str, hidden: usize, inter: usize) -> Result<Self> {
        let lin = |name: &str, shape: [usize; 2]| -> Result<Linear> {
            Ok(Linear::new(
                src.tensor_shaped(&format!("{prefix}.{name}.weight"), &shape)?,
                Layout::OutIn,
            ))
        };
        Ok(Self {
            gate: lin("gate_proj", [inter, hidden])?,
            up: lin("up_proj", [inter, hidden])?,
            down: lin("down_proj", [hidden, inter])?,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }

    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (mut g, u) = rayon::join(|| self.gate.forward(x, t), || self.up.forward(x, t));
        g.iter_mut().zip(&u).for_each(|(g, u)| *g = silu(*g) * u);
        self.down.forward(&g, t)
    }
}

/// One token's routing decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Route {
    pub expert: u32,
    /// `σ(logit)` of the chosen expert; it scales the expert's input.
    pub score: f32,
}

/// Top-1 routing over router logits `[t, experts]`. Ties go to the lowest index, as
/// `torch.topk` does on CPU.
pub fn route(logits: &[f32], experts: usize) -> Vec<Route> {
    logits
        .chunks_exact(experts)
        .map(|row| {
            let (expert, logit) =
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                        if v > best.1 {
                            (i, v)
                        } else {
                            best
                        }
                    });
            Route {
                expert: expert as u32,
                score: sigmoid(logit),
            }
        })
        .collect()
}

/// Token rows per expert, in token order, experts ascending.
pub fn group_by_expert(routes: &[Route]) -> BTreeMap<u32, Vec<usize>> {
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (row, r) in routes.iter().enumerate() {
        groups.entry(r.expert).or_default().push(row);
    }
    groups
}

/// The SwiGLU of one expert over its (already scaled) inputs `u` (`[n, hidden]`).
/// `gate_up` is that expert's `[hidden, 2·inter]` slice (gate = first half) and `down` its
/// `[inter, hidden]` slice, both in "x @ W" orientation as the checkpoint stores them.
pub fn expert_swiglu(gate_up: &Tensor, down: &Tensor, u: &[f32], n: usize) -> Vec<f32> {
    let gu = Linear::new(gate_up.clone(), Layout::InOut).forward(u, n);
    let inter = gate_up.shape[1] / 2;
    let mut act = vec![0.0f32; n * inter];
    for (a, row) in act.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
        let (gate, up) = row.split_at(inter);
        for ((a, g), u) in a.iter_mut().zip(gate).zip(up) {
            *a = silu(*g) * u;
        }
    }
    Linear::new(down.clone(), Layout::InOut).forward(&act, n)
}

/// The routed experts of one MoE layer, as fused checkpoint tensors.
#[derive(Debug, Clone)]
pub struct Experts {
    /// `[experts, hidden, 2·inter]`.
    pub gate_up: Tensor,
    /// `[experts, inter, hidden]`.
    pub down: Tensor,
}

impl Experts {
    pub fn count(&self) -> usize {
        self.gate_up.shape[0]
    }

    /// Bytes of one expert's weights.
    pub fn expert_bytes(&self) -> usize {
        (self.gate_up.size_bytes() + self.down.size_bytes()) / self.count()
    }

    /// Runs every expert group of `x` (`[t, hidden]`) and returns the routed output.
    pub fn forward(&self, x: &[f32], routes: &[Route], hidden: usize) -> Vec<f32> {
        let groups: Vec<(u32, Vec<usize>)> = group_by_expert(routes).into_iter().collect();
        let outputs: Vec<Vec<f32>> = groups
            .par_iter()
            .map(|(e, rows)| {
                let mut u = Vec::with_capacity(rows.len() * hidden);
                for &r in rows {
                    let s = routes[r].score;
                    u.extend(x[r * hidden..(r + 1) * hidden].iter().map(|v| v * s));
                }
                let e = *e as usize;
                expert_swiglu(&self.gate_up.outer(e), &self.down.outer(e), &u, rows.len())
            })
            .collect();
        let mut y = vec![0.0f32; x.len()];
        for ((_, rows), out) in groups.iter().zip(&outputs) {
            for (&r, src) in rows.iter().zip(out.chunks_exact(hidden)) {
                y[r * hidden..(r + 1) * hidden].copy_from_slice(src);
            }
        }
        y
    }
}

/// A MoE feed-forward block: router, routed experts, shared expert.
#[derive(Debug, Clone)]
pub struct Moe {
    router: Linear,
    pub experts: Experts,
    shared: Mlp,
    hidden: usize,
}

impl Moe {
    pub fn load(src: &dyn WeightSource, c: &TextConfig, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.feed_forward");
        let (e, h, i) = (c.num_local_experts, c.hidden_size, c.intermediate_size);
        Ok(Self {
            router: Linear::new(
                src.tensor_shaped(&format!("{p}.router.weight"), &[e, h])?,
                Layout::OutIn,
            ),
            experts: Experts {
                gate_up: src.tensor_shaped(&format!("{p}.experts.gate_up_proj"), &[e, h, 2 * i])?,
                down: src.tensor_shaped(&format!("{p}.experts.down_proj"), &[e, i, h])?,
            },
            shared: Mlp::load(src, &format!("{p}.shared_expert"), h, i)?,
            hidden: h,
        })
    }

    /// Bytes of the router and the shared expert (read by every token).
    pub fn dense_size_bytes(&self) -> usize {
        self.router.size_bytes() + self.shared.size_bytes()
    }

    /// Returns the block's output `[t, hidden]` and each token's route.
    pub fn forward(&self, x: &[f32], t: usize) -> (Vec<f32>, Vec<Route>) {
        let logits = self.router.forward(x, t);
        let routes = route(&logits, self.experts.count());
        let (mut out, routed) = rayon::join(
            || self.shared.forward(x, t),
            || self.experts.forward(x, &routes, self.hidden),
        );
        out.iter_mut().zip(&routed).for_each(|(o, r)| *o += r);
        (out, routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_top1_with_sigmoid_score() {
        let logits = [0.5, 2.0, -1.0, /* row 2 */ 3.0, 3.0, 0.0];
        let r = route(&logits, 3);
        assert_eq!(r[0].expert, 1);
        assert!((r[0].score - sigmoid(2.0)).abs() < 1e-7);
        assert_eq!(r[1].expert, 0, "ties go to the lowest index");
        let groups = group_by_expert(&r);
        assert_eq!(groups[&0], vec![1]);
        assert_eq!(groups[&1], vec![0]);
    }

    #[test]
    fn score_scales_the_expert_input_not_its_output() {
        // One expert, hidden 1, inter 1: gate = up = down = 1, so y = silu(u)·u with u = s·x.
        let gate_up = Tensor::bf16_from_f32(vec![1, 1, 2], &[1.0, 1.0]);
        let down = Tensor::bf16_from_f32(vec![1, 1, 1], &[1.0]);
        let experts = Experts { gate_up, down };
        let routes = [Route {
            expert: 0,
            score: 0.5,
        }];
        let y = experts.forward(&[2.0], &routes, 1);
        let u = 1.0f32;
        assert!((y[0] - silu(u) * u).abs() < 1e-6, "{}", y[0]);
    }
}
