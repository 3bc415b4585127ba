//! The experts this worker holds and the checks every batch passes before it is computed.
//!
//! The shard keeps the fused expert tensors of every MoE layer as views of the mapped
//! checkpoint; only the slices of the experts it owns are ever read (DESIGN.md §6). The
//! coordinator's placement decides which experts those are, stamped with an epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use expertmesh_model::moe::{ExpertGroup, Experts};
use expertmesh_model::{ModelError, TextConfig, WeightSource};

use crate::dispatch::{DispatchBatch, DispatchError};

/// The worker's current assignment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub epoch: u64,
    pub experts: BTreeSet<u32>,
}

#[derive(Debug)]
pub struct ExpertShard {
    hidden: usize,
    num_experts: usize,
    /// Decoder layer index → that MoE layer's fused expert tensors.
    layers: BTreeMap<u32, Experts>,
    assignment: RwLock<Assignment>,
    batches_served: AtomicU64,
    rows_served: AtomicU64,
}

impl ExpertShard {
    /// Maps the expert tensors of every MoE layer; owns no expert until assigned.
    pub fn new(config: &TextConfig, src: &dyn WeightSource) -> Result<Self, ModelError> {
        let mut layers = BTreeMap::new();
        for &l in &config.moe_layers {
            layers.insert(l as u32, Experts::load(src, config, l)?);
        }
        Ok(Self {
            hidden: config.hidden_size,
            num_experts: config.num_local_experts,
            layers,
            assignment: RwLock::new(Assignment::default()),
            batches_served: AtomicU64::new(0),
            rows_served: AtomicU64::new(0),
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn assignment(&self) -> Assignment {
        self.assignment.read().expect("assignment lock").clone()
    }

    /// Takes a new assignment. Expert slices are read lazily, on first use.
    pub fn assign(&self, assignment: Assignment) {
        *self.assignment.write().expect("assignment lock") = assignment;
    }

    pub fn served(&self) -> (u64, u64) {
        (
            self.batches_served.load(Ordering::Relaxed),
            self.rows_served.load(Ordering::Relaxed),
        )
    }

    /// Everything about a batch that can be checked without computing it.
    pub fn check(&self, b: &DispatchBatch) -> Result<(), DispatchError> {
        let a = self.assignment.read().expect("assignment lock");
        if b.epoch != a.epoch {
            return Err(DispatchError::WrongEpoch { current: a.epoch });
        }
        if !self.layers.contains_key(&b.layer) {
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
            if !a.experts.contains(&g.expert) {
                return Err(DispatchError::ExpertNotHere {
                    layer: b.layer,
                    expert: g.expert,
                });
            }
        }
        Ok(())
    }

    /// Runs the groups of one layer (checked before). Outputs are in the input row order.
    pub fn compute(&self, layer: u32, groups: &[ExpertGroup], inputs: &[f32]) -> Vec<f32> {
        let experts = &self.layers[&layer];
        let out = experts.run_groups(groups, inputs, self.hidden);
        self.batches_served.fetch_add(1, Ordering::Relaxed);
        self.rows_served
            .fetch_add((inputs.len() / self.hidden) as u64, Ordering::Relaxed);
        out
    }
}
