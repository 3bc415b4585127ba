//! What the fixture tests share: where fixtures are, token ids out of reference JSON, and a
//! batch run together and alone.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use expertmesh_model::moe::{ExpertRunner, PendingExperts, RoutedBatch};
use expertmesh_model::{LocalExperts, LogitRows, Model, Sequence};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The trained demo model that `up` serves by default (`models/`, beside the fixtures'
/// folder's crate).
pub fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/expertmesh-demo")
}

/// A JSON list of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The `rows` logits of `inputs` run as one batch (in two micro-batches, as a cluster runs
/// it), and of each run alone (concatenated).
pub fn together_and_alone(m: &Model, inputs: &[Vec<u32>], rows: LogitRows) -> (Vec<f32>, Vec<f32>) {
    let run = |batch: &[Vec<u32>]| {
        let mut caches: Vec<_> = batch.iter().map(|_| m.new_cache()).collect();
        let mut seqs: Vec<Sequence> = caches
            .iter_mut()
            .zip(batch)
            .map(|(c, t)| Sequence::new(c, t))
            .collect();
        m.forward_with(&mut seqs, rows, &Split(LocalExperts(m)))
            .unwrap()
            .logits
    };
    let alone = inputs
        .iter()
        .flat_map(|i| run(std::slice::from_ref(i)))
        .collect();
    (run(inputs), alone)
}

/// The model's own experts, run as if they were elsewhere: a batch splits into two
/// micro-batches, as it does in front of expert workers.
struct Split<'a>(LocalExperts<&'a Model>);

impl ExpertRunner for Split<'_> {
    fn start(&self, batch: RoutedBatch) -> expertmesh_model::Result<PendingExperts> {
        self.0.start(batch)
    }
}
