//! The experts this worker holds and the checks every batch passes before it is computed.
//!
//! The shard keeps the fused expert tensors of every MoE layer as views of the mapped
//! checkpoint; only the slices of the experts it owns are ever read (DESIGN.md §6). The
//! coordinator's placement decides which experts those are, stamped with an epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long batches routed under the previous epoch are still answered.
pub const EPOCH_GRACE: Duration = Duration::from_secs(10);

use expertmesh_model::moe::{ExpertGroup, ExpertWeights, Experts};
use expertmesh_model::{Device, GemmPrecision, ModelError, TextConfig, WeightSource};

use expertmesh_dispatch::{DispatchBatch, DispatchError, WireDType};
use expertmesh_proto::v1 as pb;

/// The worker's current assignment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub epoch: u64,
    pub experts: BTreeSet<u32>,
}

/// The current assignment and the one before it, answered for [`EPOCH_GRACE`].
#[derive(Debug, Default)]
struct Assignments {
    current: Assignment,
    previous: Option<(Assignment, Instant)>,
}

#[derive(Debug)]
pub struct ExpertShard {
    hidden: usize,
    num_experts: usize,
    /// Decoder layer index → that MoE layer's expert tensors. Replaced whole (copy on
    /// write) when a fetched FP8 expert's scales are read anew; readers hold a snapshot.
    layers: RwLock<Arc<BTreeMap<u32, Experts>>>,
    assignment: RwLock<Assignments>,
    batches_served: AtomicU64,
    rows_served: AtomicU64,
    /// Expert bytes made resident by placements (what re-plans moved here).
    loaded_bytes: AtomicU64,
    /// A worker without the checkpoint (`transfer`): the experts whose bytes have arrived
    /// from peers and been verified, and the peer each came from; no other expert is ever
    /// computed. `None`: every expert is in the mapped checkpoint.
    fetched: Option<RwLock<BTreeMap<u32, String>>>,
    /// Bytes sent to and fetched from peers.
    transfers: crate::transfer::TransferStats,
    /// The experts on a GPU (`--device cuda:N`), fed from the same mapped tensors.
    #[cfg(feature = "cuda")]
    gpu: Option<expertmesh_model::cuda::experts::GpuExperts>,
}

impl ExpertShard {
    /// Maps the expert tensors of every MoE layer; owns no expert until assigned.
    pub fn new(config: &TextConfig, src: &dyn WeightSource) -> Result<Self, ModelError> {
        Self::with_device(config, src, Device::Cpu, GemmPrecision::F32)
    }

    /// As [`ExpertShard::new`], computing on `device` (`cuda:N` needs a `--features cuda`
    /// build; the weights then go to the GPU as they are loaded, and products run in `gemm`).
    pub fn with_device(
        config: &TextConfig,
        src: &dyn WeightSource,
        device: Device,
        gemm: GemmPrecision,
    ) -> Result<Self, ModelError> {
        #[cfg(not(feature = "cuda"))]
        let _ = gemm;
        device.check()?;
        let mut layers = BTreeMap::new();
        for &l in &config.moe_layers {
            layers.insert(l as u32, Experts::load(src, config, l)?);
        }
        #[cfg(feature = "cuda")]
        let gpu = match device {
            Device::Cpu => None,
            Device::Cuda(n) => Some(
                expertmesh_model::cuda::experts::GpuExperts::new(
                    n,
                    config.hidden_size,
                    config.intermediate_size,
                    gemm,
                )
                .map_err(|e| ModelError::Device(e.to_string()))?,
            ),
        };
        Ok(Self {
            hidden: config.hidden_size,
            num_experts: config.num_local_experts,
            layers: RwLock::new(Arc::new(layers)),
            assignment: RwLock::new(Assignments::default()),
            batches_served: AtomicU64::new(0),
            rows_served: AtomicU64::new(0),
            loaded_bytes: AtomicU64::new(0),
            fetched: None,
            transfers: Default::default(),
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    /// This shard's tensors are a cache that peers fill (`transfer::ExpertCache`): it holds
    /// no expert until [`ExpertShard::mark_fetched`] says its bytes are verified.
    pub fn weightless(mut self) -> Self {
        self.fetched = Some(RwLock::new(BTreeMap::new()));
        self
    }

    /// Whether expert `e`'s weights are here to compute with (and to send to a peer).
    pub fn holds(&self, e: u32) -> bool {
        (e as usize) < self.num_experts
            && self
                .fetched
                .as_ref()
                .is_none_or(|f| f.read().expect("fetched lock").contains_key(&e))
    }

    /// Whether the shard started without the checkpoint's weights.
    pub fn is_weightless(&self) -> bool {
        self.fetched.is_some()
    }

    /// Expert `e`'s bytes arrived from `source` and were verified: it may be computed and
    /// sent on.
    pub fn mark_fetched(&self, e: u32, source: &str) {
        if let Some(f) = &self.fetched {
            f.write()
                .expect("fetched lock")
                .insert(e, source.to_owned());
        }
    }

    /// The transfers in flight and the experts that came from peers (with their senders),
    /// as the heartbeat carries them.
    pub fn transfer_report(&self) -> (Vec<pb::Transfer>, Vec<pb::ExpertOrigin>) {
        let fetched = self.fetched.as_ref().map_or_else(Vec::new, |f| {
            f.read()
                .expect("fetched lock")
                .iter()
                .map(|(&expert, source)| pb::ExpertOrigin {
                    expert,
                    source: source.clone(),
                })
                .collect()
        });
        (self.transfers.in_flight(), fetched)
    }

    /// What transfers to and from peers have moved.
    pub fn transfers(&self) -> &crate::transfer::TransferStats {
        &self.transfers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Every MoE layer's experts, by decoder layer, ascending.
    pub fn layers(&self) -> Arc<BTreeMap<u32, Experts>> {
        self.layers.read().expect("layers lock").clone()
    }

    /// Puts in expert `e`'s weights as read again from the checkpoint it came into, layer
    /// by layer (an unfused checkpoint's experts keep their FP8 scales as values read at
    /// load, so a fetched one is read anew); layers stored fused are left as they are.
    pub fn replace_expert(&self, e: u32, weights: BTreeMap<u32, ExpertWeights>) {
        let mut layers = self.layers.write().expect("layers lock");
        let mut next = BTreeMap::clone(&layers);
        for (l, w) in weights {
            if let Some(Experts::Unfused(list)) = next.get_mut(&l) {
                if let Some(slot) = list.get_mut(e as usize) {
                    *slot = w;
                }
            }
        }
        *layers = Arc::new(next);
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Bytes of one copy of an expert: its weights in every MoE layer, in the checkpoint's
    /// dtype (FP8 codes and scales, or bf16), the largest for a mixed checkpoint.
    pub fn copy_bytes(&self) -> usize {
        self.layers().values().map(Experts::expert_bytes).sum()
    }

    pub fn assignment(&self) -> Assignment {
        self.assignment
            .read()
            .expect("assignment lock")
            .current
            .clone()
    }

    /// Takes a new assignment; the previous one is still answered for [`EPOCH_GRACE`] (batches
    /// routed before an attention worker saw the new epoch). Expert slices not loaded
    /// beforehand ([`ExpertShard::load`]) are read on first use.
    pub fn assign(&self, assignment: Assignment) {
        let mut a = self.assignment.write().expect("assignment lock");
        if a.current.epoch != assignment.epoch {
            let previous = std::mem::replace(&mut a.current, assignment);
            a.previous = Some((previous, Instant::now()));
        } else {
            a.current = assignment;
        }
    }

    /// Loads `experts` in every MoE layer (see `Experts::load_expert`); returns the bytes.
    pub fn load(&self, experts: &BTreeSet<u32>) -> usize {
        let mut bytes = 0;
        for (&l, layer) in self.layers().iter() {
            for &e in experts {
                if (e as usize) >= self.num_experts {
                    continue;
                }
                bytes += layer.load_expert(e as usize);
                #[cfg(feature = "cuda")]
                if let Some(gpu) = &self.gpu {
                    // A failed copy shows again, as an error, when a batch needs it.
                    let _ = gpu.load(l, e, layer);
                }
                #[cfg(not(feature = "cuda"))]
                let _ = l;
            }
        }
        self.loaded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        bytes
    }

    /// Reads `experts`' pages into memory in every MoE layer (host-memory backups, not
    /// served); the bytes.
    pub fn warm(&self, experts: &BTreeSet<u32>) -> usize {
        let layers = self.layers();
        experts
            .iter()
            .filter(|&&e| (e as usize) < self.num_experts)
            .map(|&e| {
                layers
                    .values()
                    .map(|l| l.load_expert(e as usize))
                    .sum::<usize>()
            })
            .sum()
    }

    /// Expert bytes made resident by placements since the worker started.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded_bytes.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> (u64, u64) {
        (
            self.batches_served.load(Ordering::Relaxed),
            self.rows_served.load(Ordering::Relaxed),
        )
    }

    /// Everything about a batch that can be checked without computing it.
    pub fn check(&self, b: &DispatchBatch) -> Result<(), DispatchError> {
        let all = self.assignment.read().expect("assignment lock");
        let a = match &all.previous {
            _ if b.epoch == all.current.epoch => &all.current,
            Some((p, since)) if p.epoch == b.epoch && since.elapsed() < EPOCH_GRACE => p,
            _ => {
                return Err(DispatchError::WrongEpoch {
                    current: all.current.epoch,
                })
            }
        };
        if !self.layers().contains_key(&b.layer) {
            return Err(DispatchError::BadRequest(format!(
                "layer {} is not a MoE layer",
                b.layer
            )));
        }
        if b.hidden != self.hidden {
            return Err(DispatchError::ShapeMismatch {
                expected: vec![b.rows() as u64, self.hidden as u64],
                got: vec![b.rows() as u64, b.hidden as u64],
            });
        }
        if b.activations.len() != b.rows() * b.hidden {
            return Err(DispatchError::ShapeMismatch {
                expected: vec![b.rows() as u64, b.hidden as u64],
                got: vec![
                    (b.activations.len() / b.hidden.max(1)) as u64,
                    b.hidden as u64,
                ],
            });
        }
        for g in &b.groups {
            if g.expert as usize >= self.num_experts {
                return Err(DispatchError::BadRequest(format!(
                    "expert {} does not exist (the model has {})",
                    g.expert, self.num_experts
                )));
            }
            if !a.experts.contains(&g.expert) || !self.holds(g.expert) {
                return Err(DispatchError::ExpertNotHere {
                    layer: b.layer,
                    expert: g.expert,
                });
            }
            if b.dtype == WireDType::Fp8 && !self.takes_fp8(b.layer, g.expert) {
                return Err(DispatchError::BadRequest(format!(
                    "expert {} of layer {} does not quantize its inputs to FP8 here: send \
                     its rows as f32 or bf16",
                    g.expert, b.layer
                )));
            }
        }
        Ok(())
    }

    /// Whether `expert` of `layer` takes rows already quantized to FP8 (`--wire-dtype
    /// fp8`): a W8A8 FP8 expert computed on the CPU.
    fn takes_fp8(&self, layer: u32, expert: u32) -> bool {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return false;
        }
        self.layers()[&layer].takes_quantized_inputs(expert as usize)
    }

    /// Runs the groups of one layer (checked before) on rows that travelled in `dtype`
    /// (fp8: already quantized, taken as they are). Outputs are in the input row order.
    pub fn compute(
        &self,
        layer: u32,
        groups: &[ExpertGroup],
        inputs: &[f32],
        dtype: WireDType,
    ) -> Result<Vec<f32>, DispatchError> {
        let layers = self.layers();
        let experts = &layers[&layer];
        if dtype == WireDType::Fp8 {
            let out = experts.run_quantized_groups(groups, inputs, self.hidden);
            self.count(inputs);
            return Ok(out);
        }
        #[cfg(feature = "cuda")]
        let out = match &self.gpu {
            Some(gpu) => gpu
                .run_groups(layer, experts, groups, inputs)
                .map_err(|e| DispatchError::Unavailable(format!("{}: {e}", gpu.device)))?,
            None => experts.run_groups(groups, inputs, self.hidden),
        };
        #[cfg(not(feature = "cuda"))]
        let out = experts.run_groups(groups, inputs, self.hidden);
        self.count(inputs);
        Ok(out)
    }

    fn count(&self, inputs: &[f32]) {
        self.batches_served.fetch_add(1, Ordering::Relaxed);
        self.rows_served
            .fetch_add((inputs.len() / self.hidden) as u64, Ordering::Relaxed);
    }
}
