//! Checkpoint directories written by this binary, in the layout Hugging Face's loaders and
//! `SafetensorsCheckpoint` read: safetensors shards and `model.safetensors.index.json`
//! mapping every tensor to its shard (`quantize`'s FP8 copies, and the synthetic benchmark
//! model on disk for `bench join`, whose workers need files to send and to leave out).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use expertmesh_model::synthetic::SyntheticSpec;
use expertmesh_model::{DType, WeightSource};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

/// The most bytes a shard written here holds unless told otherwise (`quantize --shard-bytes`).
pub const SHARD_BYTES: usize = 4 << 30;

/// A tensor's dtype as safetensors names it.
pub fn dtype(d: DType) -> Dtype {
    match d {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        DType::F8E4M3 => Dtype::F8_E4M3,
    }
}

/// Writes `tensors` into `dir` in shards of at most `shard_bytes` (in the order given), and
/// the index of which shard holds each.
pub fn write_weights(
    dir: &Path,
    tensors: &[(String, TensorView<'_>)],
    shard_bytes: usize,
) -> Result<()> {
    let mut shards: Vec<Vec<&(String, TensorView<'_>)>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        let bytes = t.1.data().len();
        if size + bytes > shard_bytes && !shards.last().expect("one shard").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push(t);
    }
    let n = shards.len();
    let mut map = BTreeMap::new();
    for (k, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        for (name, _) in &shard {
            map.insert(name.clone(), file.clone());
        }
        // `serialize_to_file` takes (name, view) pairs; the shard holds references to them.
        let views = shard.iter().map(|t| (&t.0, &t.1));
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &dir.join(&file))
            .with_context(|| format!("writing {file}"))?;
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&json!({"metadata": {}, "weight_map": map}))?,
    )
    .context("writing the shard index")?;
    Ok(())
}

/// The synthetic model `spec` as a checkpoint directory in `dir` (which must exist):
/// `config.json`, shards of at most `shard_bytes` and their index. Its weights are the ones
/// `spec.build()` makes, bit for bit; it has no tokenizer.
pub fn write_synthetic(spec: &SyntheticSpec, dir: &Path, shard_bytes: usize) -> Result<()> {
    let (_, weights) = spec.build()?;
    let mut names: Vec<String> = weights.names().cloned().collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|n| weights.tensor(n))
        .collect::<expertmesh_model::Result<Vec<_>>>()?;
    let views = names
        .iter()
        .zip(&tensors)
        .map(|(n, t)| {
            let view = TensorView::new(dtype(t.dtype), t.shape.clone(), t.bytes())?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    write_weights(dir, &views, shard_bytes)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&spec.config_json())?,
    )
    .context("writing config.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_model::{ModelSource, SafetensorsCheckpoint};

    #[test]
    fn a_synthetic_model_on_disk_reads_back_as_built() {
        let spec = SyntheticSpec {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            experts: 4,
            expert_inter: 16,
            dense_inter: 48,
            vocab: 64,
            chunk: 16,
            moe_step: 2,
            seed: 7,
        };
        let dir = tempfile::tempdir().unwrap();
        // Shards of 4 KB: the weights span several, and the index says which holds each.
        write_synthetic(&spec, dir.path(), 4096).unwrap();
        let shards = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let path = e.as_ref().unwrap().path();
                path.extension().is_some_and(|x| x == "safetensors")
            })
            .count();
        assert!(shards > 1, "{shards} shards");
        let source = ModelSource::Dir(dir.path().to_owned());
        assert_eq!(source.config().unwrap(), spec.config().unwrap());
        let read = SafetensorsCheckpoint::open(dir.path()).unwrap();
        let (_, built) = spec.build().unwrap();
        assert_eq!(read.names().count(), built.names().count());
        for name in built.names() {
            let (got, want) = (read.tensor(name).unwrap(), built.tensor(name).unwrap());
            assert_eq!((got.dtype, &got.shape), (want.dtype, &want.shape), "{name}");
            assert_eq!(got.bytes(), want.bytes(), "{name}");
        }
    }
}
