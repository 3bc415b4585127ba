//! Feed-forward blocks: the dense SwiGLU MLP and the top-1 mixture of experts (HF
//! `Llama4TextMLP`, `Llama4TextMoe`, `Llama4TextExperts`; LLAMA4.md §2.5).
//!
//! MoE, per token: router logits `x · W_rᵀ`; the top-1 expert e; score `σ(logit_e)`; the
//! expert runs on the *scaled input* `σ · x` (not on x, since SwiGLU is not linear); the
//! shared expert runs on the unscaled x; the output is their sum. Routing is a pure
//! function (`route`) and the expert SwiGLU is a free function (`expert_swiglu`) so that the
//! data plane can run the same steps on other machines.

use std::collections::BTreeMap;

use crate::checkpoint::{Tensor, WeightSource};
use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::fp8;
use crate::linear::{Layout, Linear};
use crate::norm::{sigmoid, silu};
use crate::quant::{self, Quantization};

/// `down(silu(gate(x)) ⊙ up(x))` with `nn.Linear` weights.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Mlp {
    /// `{prefix}.{gate,up,down}_proj`, each bf16 or FP8 as the checkpoint's
    /// `quantization_config` (`q`) says.
    pub fn load(
        src: &dyn WeightSource,
        q: Option<&Quantization>,
        prefix: &str,
        hidden: usize,
        inter: usize,
    ) -> Result<Self> {
        let lin = |name: &str, out: usize, inp: usize| {
            quant::linear(src, q, &format!("{prefix}.{name}"), out, inp)
        };
        Ok(Self {
            gate: lin("gate_proj", inter, hidden)?,
            up: lin("up_proj", inter, hidden)?,
            down: lin("down_proj", hidden, inter)?,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }

    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (mut g, u) = if t == 1 {
            // One token: each product splits over the hot helpers (see `Linear`).
            (self.gate.forward(x, t), self.up.forward(x, t))
        } else {
            crate::hot::join(|| self.gate.forward(x, t), || self.up.forward(x, t))
        };
        let inter = self.gate.out_dim();
        crate::hot::for_each_row(&mut g, inter, |i, row| {
            let u = &u[i * inter..(i + 1) * inter];
            row.iter_mut().zip(u).for_each(|(g, u)| *g = silu(*g) * u);
        });
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

/// Consecutive rows of a routed batch that go to one expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroup {
    pub expert: u32,
    pub rows: u32,
}

/// The routed part of one MoE layer for a batch: router-scaled inputs grouped by expert.
#[derive(Debug, Clone)]
pub struct RoutedBatch {
    /// Index among the MoE layers (0 = first MoE layer).
    pub moe_index: usize,
    /// Decoder layer index.
    pub layer: usize,
    pub groups: Vec<ExpertGroup>,
    pub hidden: usize,
    /// `[Σ rows, hidden]`, group after group.
    pub inputs: Vec<f32>,
    /// The trace ids of the requests whose rows these are (for the expert side's lines).
    pub traces: Vec<u128>,
}

impl RoutedBatch {
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows as usize).sum()
    }
}

/// The experts' answer to a `RoutedBatch`, possibly still being computed elsewhere.
pub struct PendingExperts(Box<dyn FnOnce() -> Result<Vec<f32>> + Send>);

impl PendingExperts {
    /// Work that runs when the answer is awaited.
    pub fn later(f: impl FnOnce() -> Result<Vec<f32>> + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    /// Blocks until the outputs (`[Σ rows, hidden]`, in the batch's row order) are there.
    /// Call it from the thread driving the forward pass, not from inside a rayon job:
    /// a worker blocked here cannot help compute the answer it waits for.
    pub fn wait(self) -> Result<Vec<f32>> {
        (self.0)()
    }
}

/// The seam between a MoE layer and wherever its routed experts run: in this process
/// (`Model` with local experts) or on expert workers across the network.
pub trait ExpertRunner: Sync {
    /// Starts computing a routed batch; the caller overlaps the shared expert with it.
    fn start(&self, batch: RoutedBatch) -> Result<PendingExperts>;

    /// A forward pass (one engine step) begins: a runner whose placement can change picks
    /// the one it uses for the whole step here.
    fn begin_step(&self) {}

    /// Whether the experts compute while `start`'s caller goes on (on other machines): then
    /// a batch splits into two micro-batches, one computing while the other's tokens are
    /// away. A runner that computes them inside `start` gains nothing from a split and
    /// loses by it: every product runs twice on half the tokens, and an expert that both
    /// halves route to is read twice.
    fn overlaps(&self) -> bool {
        true
    }
}

/// Groups routed tokens by expert: the groups, and for each batch row the token it holds.
pub fn plan_groups(routes: &[Route]) -> (Vec<ExpertGroup>, Vec<usize>) {
    let mut groups = Vec::new();
    let mut order = Vec::with_capacity(routes.len());
    for (expert, rows) in group_by_expert(routes) {
        groups.push(ExpertGroup {
            expert,
            rows: rows.len() as u32,
        });
        order.extend(rows);
    }
    (groups, order)
}

/// The routed batch's inputs: each token's row of `x` (`[t, hidden]`) scaled by its router
/// score, in `order` (from `plan_groups`).
pub fn routed_inputs(x: &[f32], hidden: usize, routes: &[Route], order: &[usize]) -> Vec<f32> {
    let mut inputs = Vec::with_capacity(order.len() * hidden);
    for &r in order {
        let s = routes[r].score;
        inputs.extend(x[r * hidden..(r + 1) * hidden].iter().map(|v| v * s));
    }
    inputs
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

/// One expert of an unfused checkpoint (`experts.{e}.{gate,up,down}_proj`), each
/// projection bf16 or FP8.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl ExpertWeights {
    /// Whether gate and up both quantize their input per token (W8A8 FP8): then the
    /// quantize-dequantized rows can be computed before they reach this expert (the fp8
    /// wire) and taken as they are.
    pub fn takes_quantized_inputs(&self) -> bool {
        self.gate.quantizes_input() && self.up.quantizes_input()
    }

    /// The SwiGLU over scaled inputs `u` (`[n, hidden]`). W8A8 projections see their input
    /// quantize-dequantized per row: gate and up the same one (computed once here), down its
    /// own. `quantized`: `u` is already that of gate and up (see `takes_quantized_inputs`).
    fn swiglu(&self, u: &[f32], n: usize, quantized: bool) -> Vec<f32> {
        if n == 0 {
            // A group of no rows (the wire allows one): nothing to compute.
            return Vec::new();
        }
        let (gate, up) = if quantized || self.takes_quantized_inputs() {
            let q;
            let x = if quantized {
                u
            } else {
                q = fp8::qdq_rows(u, u.len() / n);
                &q
            };
            (
                self.gate.forward_prequantized(x, n),
                self.up.forward_prequantized(x, n),
            )
        } else {
            (self.gate.forward(u, n), self.up.forward(u, n))
        };
        let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        self.down.forward(&act, n)
    }

    fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }
}

/// The routed experts of one MoE layer, as the checkpoint stores them.
#[derive(Debug, Clone)]
pub enum Experts {
    /// The bf16 checkpoints' fused tensors: `gate_up` `[experts, hidden, 2·inter]` and
    /// `down` `[experts, inter, hidden]`, "x @ W" orientation.
    Fused { gate_up: Tensor, down: Tensor },
    /// One set per expert (compressed-tensors FP8 checkpoints), each projection FP8 or
    /// bf16.
    Unfused(Vec<ExpertWeights>),
}

impl Experts {
    pub fn count(&self) -> usize {
        match self {
            Self::Fused { gate_up, .. } => gate_up.shape[0],
            Self::Unfused(list) => list.len(),
        }
    }

    /// Bytes of one expert's weights (the largest, for a mixed checkpoint).
    pub fn expert_bytes(&self) -> usize {
        match self {
            Self::Fused { gate_up, down } => {
                (gate_up.size_bytes() + down.size_bytes()) / self.count()
            }
            Self::Unfused(list) => list
                .iter()
                .map(ExpertWeights::size_bytes)
                .max()
                .unwrap_or(0),
        }
    }

    /// Expert `e`'s fused bf16 slices (`gate_up`, `down`), for backends that only take those.
    pub fn fused(&self, e: usize) -> Option<(Tensor, Tensor)> {
        match self {
            Self::Fused { gate_up, down } => Some((gate_up.outer(e), down.outer(e))),
            Self::Unfused(_) => None,
        }
    }

    /// Brings expert `e`'s weights into memory (every page of its slices of the mapped
    /// checkpoint is read) and returns how many bytes that covers: what loading an expert
    /// means on the CPU backend.
    pub fn load_expert(&self, e: usize) -> usize {
        let mut seen = 0u8;
        let mut bytes = 0;
        let mut touch = |b: &[u8]| {
            bytes += b.len();
            for page in b.chunks(4096) {
                seen ^= page[0];
            }
        };
        match self {
            Self::Fused { gate_up, down } => {
                touch(gate_up.outer(e).bytes());
                touch(down.outer(e).bytes());
            }
            Self::Unfused(list) => {
                let w = &list[e];
                for l in [&w.gate, &w.up, &w.down] {
                    touch(l.weight.bytes());
                }
            }
        }
        std::hint::black_box(seen);
        bytes
    }

    /// Runs every group of a routed batch (`inputs` is `[Σ rows, hidden]`, group after
    /// group) and returns the outputs in the same row order. Each token's output depends
    /// on that token alone (see `Linear::forward_into`).
    pub fn run_groups(&self, groups: &[ExpertGroup], inputs: &[f32], hidden: usize) -> Vec<f32> {
        self.run(groups, inputs, hidden, false)
    }

    /// Whether expert `e` can take inputs already quantized per token (the fp8 wire):
    /// an FP8 expert whose gate and up quantize their inputs (W8A8).
    pub fn takes_quantized_inputs(&self, e: usize) -> bool {
        match self {
            Self::Fused { .. } => false,
            Self::Unfused(list) => list
                .get(e)
                .is_some_and(ExpertWeights::takes_quantized_inputs),
        }
    }

    /// `run_groups` for inputs that are already each row's FP8 quantize-dequantize
    /// (`fp8::qdq_rows`), for experts that `takes_quantized_inputs`: the same bits as
    /// `run_groups` on the rows before quantization.
    pub fn run_quantized_groups(
        &self,
        groups: &[ExpertGroup],
        inputs: &[f32],
        hidden: usize,
    ) -> Vec<f32> {
        self.run(groups, inputs, hidden, true)
    }

    fn run(
        &self,
        groups: &[ExpertGroup],
        inputs: &[f32],
        hidden: usize,
        quantized: bool,
    ) -> Vec<f32> {
        let mut starts = Vec::with_capacity(groups.len());
        let mut row = 0;
        for g in groups {
            starts.push(row);
            row += g.rows as usize;
        }
        assert_eq!(row * hidden, inputs.len(), "inputs do not match the groups");
        // One expert (a decode step's only token) runs on this thread: its products split
        // over the cores themselves.
        let work: Vec<_> = groups.iter().zip(&starts).collect();
        let outputs = crate::hot::map_items(work, |(g, &start)| {
            let (e, n) = (g.expert as usize, g.rows as usize);
            let u = &inputs[start * hidden..(start + n) * hidden];
            match self {
                Self::Fused { gate_up, down } => {
                    assert!(!quantized, "bf16 experts take f32 inputs");
                    expert_swiglu(&gate_up.outer(e), &down.outer(e), u, n)
                }
                Self::Unfused(list) => list[e].swiglu(u, n, quantized),
            }
        });
        outputs.concat()
    }
}

/// A MoE feed-forward block: router, routed experts, shared expert.
#[derive(Debug, Clone)]
pub struct Moe {
    pub(crate) router: Linear,
    /// The routed experts, when this process holds them.
    pub experts: Option<Experts>,
    pub(crate) shared: Mlp,
    hidden: usize,
    pub(crate) num_experts: usize,
}

impl Moe {
    /// Loads the block; the routed experts only when `with_experts`.
    pub fn load(
        src: &dyn WeightSource,
        c: &TextConfig,
        layer: usize,
        with_experts: bool,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}.feed_forward");
        let (e, h) = (c.num_local_experts, c.hidden_size);
        Ok(Self {
            router: Linear::new(
                src.tensor_shaped(&format!("{p}.router.weight"), &[e, h])?,
                Layout::OutIn,
            ),
            experts: if with_experts {
                Some(Experts::load(src, c, layer)?)
            } else {
                None
            },
            shared: Mlp::load(
                src,
                c.quantization.as_ref(),
                &format!("{p}.shared_expert"),
                h,
                c.intermediate_size,
            )?,
            hidden: h,
            num_experts: e,
        })
    }

    /// Bytes of the router and the shared expert (read by every token).
    pub fn dense_size_bytes(&self) -> usize {
        self.router.size_bytes() + self.shared.size_bytes()
    }

    /// The shared expert on `x` (`[t, hidden]`), computed while the routed rows are away,
    /// plus the routed outputs put back by `order`: the block's output `[t, hidden]`.
    pub fn combine(
        &self,
        x: &[f32],
        t: usize,
        order: &[usize],
        pending: PendingExperts,
    ) -> Result<Vec<f32>> {
        let h = self.hidden;
        // The shared expert runs (on all cores) while the routed part is away; the wait
        // then happens on this thread, never on a rayon worker, so a remote answer that
        // needs the pool (an in-process expert worker) can always be computed.
        let mut out = self.shared.forward(x, t);
        let routed = pending.wait()?;
        for (&r, y) in order.iter().zip(routed.chunks_exact(h)) {
            out[r * h..(r + 1) * h]
                .iter_mut()
                .zip(y)
                .for_each(|(o, v)| *o += v);
        }
        Ok(out)
    }
}

impl Experts {
    /// The routed experts of one MoE layer: the fused tensors of a bf16 checkpoint, or
    /// one set per expert (compressed-tensors), each projection FP8 with its `weight_scale`
    /// or bf16. With a mapped checkpoint nothing is read until an expert runs, and then
    /// only that expert's bytes.
    pub fn load(src: &dyn WeightSource, c: &TextConfig, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.feed_forward.experts");
        let (e, h, i) = (c.num_local_experts, c.hidden_size, c.intermediate_size);
        match src.tensor_shaped(&format!("{p}.gate_up_proj"), &[e, h, 2 * i]) {
            Ok(gate_up) => {
                let module = format!("{p}.0.gate_proj");
                if c.quantization
                    .as_ref()
                    .is_some_and(|q| q.is_quantized(&module))
                {
                    return Err(ModelError::Quantized {
                        name: format!("{p}.gate_up_proj"),
                        reason: format!(
                            "is a fused bf16 tensor but quantization_config quantizes `{module}`"
                        ),
                    });
                }
                return Ok(Self::Fused {
                    gate_up,
                    down: src.tensor_shaped(&format!("{p}.down_proj"), &[e, i, h])?,
                });
            }
            Err(ModelError::MissingTensor { .. }) => {}
            Err(other) => return Err(other),
        }
        (0..e)
            .map(|x| ExpertWeights::load(src, c, layer, x))
            .collect::<Result<Vec<_>>>()
            .map(Self::Unfused)
    }
}

impl ExpertWeights {
    /// Expert `e` of MoE layer `layer` in an unfused checkpoint
    /// (`experts.{e}.{gate,up,down}_proj`, each FP8 with its `weight_scale` or bf16).
    pub fn load(src: &dyn WeightSource, c: &TextConfig, layer: usize, e: usize) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let lin = |name: &str, out: usize, inp: usize| {
            quant::linear(
                src,
                c.quantization.as_ref(),
                &format!("model.layers.{layer}.feed_forward.experts.{e}.{name}"),
                out,
                inp,
            )
        };
        Ok(Self {
            gate: lin("gate_proj", i, h)?,
            up: lin("up_proj", i, h)?,
            down: lin("down_proj", h, i)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_group_of_fp8_experts_computes_nothing() {
        let fp8 = |out: usize, inp: usize| {
            Linear::fp8(
                Tensor::from_bytes(
                    crate::checkpoint::DType::F8E4M3,
                    vec![out, inp],
                    vec![0x38; out * inp],
                ),
                vec![1.0; out],
                true,
            )
        };
        let experts = Experts::Unfused(vec![ExpertWeights {
            gate: fp8(2, 3),
            up: fp8(2, 3),
            down: fp8(3, 2),
        }]);
        let out = experts.run_groups(&[ExpertGroup { expert: 0, rows: 0 }], &[], 3);
        assert!(out.is_empty());
        // And one row: gate = up = 3·x (weights 1), down sums the two activations.
        let out = experts.run_groups(&[ExpertGroup { expert: 0, rows: 1 }], &[1.0, 1.0, 1.0], 3);
        let a = silu(3.0) * 3.0;
        assert!((out[0] - 2.0 * a).abs() < 0.1 * a, "{out:?}");
    }

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

    /// Runs groups on experts held by the test.
    struct Direct(Experts);

    impl ExpertRunner for Direct {
        fn start(&self, batch: RoutedBatch) -> Result<PendingExperts> {
            let out = self
                .0
                .run_groups(&batch.groups, &batch.inputs, batch.hidden);
            Ok(PendingExperts::later(move || Ok(out)))
        }
    }

    fn linear(shape: [usize; 2], values: &[f32], layout: Layout) -> Linear {
        Linear::new(Tensor::bf16_from_f32(shape.to_vec(), values), layout)
    }

    #[test]
    fn score_scales_the_expert_input_not_its_output() {
        // Hidden 1, two experts of width 1 (gate = up = down = 1), router logits (2x, -x),
        // and a shared expert of zeros: the output is silu(u)·u with u = σ(2x)·x.
        let experts = Experts::Fused {
            gate_up: Tensor::bf16_from_f32(vec![2, 1, 2], &[1.0, 1.0, 1.0, 1.0]),
            down: Tensor::bf16_from_f32(vec![2, 1, 1], &[1.0, 1.0]),
        };
        let moe = Moe {
            router: linear([2, 1], &[2.0, -1.0], Layout::OutIn),
            experts: None,
            shared: Mlp {
                gate: linear([1, 1], &[0.0], Layout::OutIn),
                up: linear([1, 1], &[0.0], Layout::OutIn),
                down: linear([1, 1], &[0.0], Layout::OutIn),
            },
            hidden: 1,
            num_experts: 2,
        };
        let x = 2.0f32;
        let routes = route(&moe.router.forward(&[x], 1), 2);
        let (groups, order) = plan_groups(&routes);
        let pending = Direct(experts)
            .start(RoutedBatch {
                moe_index: 0,
                layer: 0,
                groups,
                hidden: 1,
                inputs: routed_inputs(&[x], 1, &routes, &order),
                traces: Vec::new(),
            })
            .unwrap();
        let y = moe.combine(&[x], 1, &order, pending).unwrap();
        assert_eq!(routes[0].expert, 0);
        let u = sigmoid(2.0 * x) * x;
        assert!((y[0] - silu(u) * u).abs() < 1e-5, "{}", y[0]);
        let scaled_output = sigmoid(2.0 * x) * silu(x) * x;
        assert!((y[0] - scaled_output).abs() > 1e-2);
    }
}
