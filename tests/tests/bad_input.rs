//! Bad checkpoints, configs and requests each give a typed error that names the file,
//! tensor or field at fault; nothing panics.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::fixture;
use expertmesh_model::{
    generate, GenerateRequest, Model, ModelError, SafetensorsCheckpoint, SamplingParams,
    WeightSource,
};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// A writable copy of a fixture.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// The shard that holds `tensor`, per the index.
fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    dir.join(index["weight_map"][tensor].as_str().unwrap())
}

/// Rewrites one tensor of a shard (all others unchanged).
fn rewrite_tensor(shard: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
    let data = std::fs::read(shard).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let mut views: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .collect();
    views.push((
        name.to_owned(),
        TensorView::new(dtype, shape, &bytes).unwrap(),
    ));
    let out = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
    std::fs::write(shard, out).unwrap();
}

fn load_err(dir: &Path) -> String {
    Model::load(dir).unwrap_err().to_string()
}

const NORM: &str = "language_model.model.norm.weight";

#[test]
fn missing_shard_names_the_file() {
    let dir = copy_fixture("tiny-maverick");
    let shard = shard_of(dir.path(), NORM);
    std::fs::remove_file(&shard).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn truncated_shard_names_the_file() {
    let dir = copy_fixture("tiny-maverick");
    let shard = shard_of(dir.path(), NORM);
    let data = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &data[..data.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("not a valid safetensors file"), "{err}");
    assert!(
        err.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn corrupt_headers_are_rejected() {
    let dir = copy_fixture("tiny-maverick");
    let shard = shard_of(dir.path(), NORM);
    let mut data = std::fs::read(&shard).unwrap();
    // A header length far past the end of the file.
    data[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&shard, &data).unwrap();
    assert!(load_err(dir.path()).contains("not a valid safetensors file"));
    // A header that is not JSON.
    let mut data = std::fs::read(shard_of(&fixture("tiny-maverick"), NORM)).unwrap();
    data[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&shard, &data).unwrap();
    assert!(load_err(dir.path()).contains("not a valid safetensors file"));
    // A file too short to hold the header length.
    std::fs::write(&shard, [1u8, 2, 3]).unwrap();
    assert!(load_err(dir.path()).contains("not a valid safetensors file"));
}

#[test]
fn wrong_shape_names_the_tensor() {
    let dir = copy_fixture("tiny-maverick");
    let shard = shard_of(dir.path(), NORM);
    rewrite_tensor(&shard, NORM, Dtype::BF16, vec![64], vec![0; 128]);
    let err = load_err(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("[64]"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let dir = copy_fixture("tiny-maverick");
    let shard = shard_of(dir.path(), NORM);
    rewrite_tensor(&shard, NORM, Dtype::U8, vec![128], vec![0; 128]);
    let err = load_err(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("dtype"),
        "{err}"
    );
}

#[test]
fn index_entry_without_tensor_is_reported() {
    let dir = copy_fixture("tiny-maverick");
    let shard = shard_of(dir.path(), NORM);
    let data = std::fs::read(&shard).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let views: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != NORM)
        .collect();
    let out = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
    std::fs::write(&shard, out).unwrap();
    let err = SafetensorsCheckpoint::open(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains(NORM), "{err}");
}

#[test]
fn missing_or_malformed_config_names_the_field() {
    let dir = copy_fixture("tiny-scout");
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config
        .as_object_mut()
        .unwrap()
        .remove("num_attention_heads");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("num_attention_heads"),
        "{err}"
    );

    std::fs::write(&path, "{ not json").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("not valid JSON"),
        "{err}"
    );

    std::fs::remove_file(&path).unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
}

#[test]
fn bad_requests_are_typed_errors() {
    let model = Model::load(&fixture("tiny-scout")).unwrap();
    let request = |prompt: Vec<u32>, max_new_tokens: usize| GenerateRequest {
        prompt,
        max_new_tokens,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        prompt_logits: false,
        images: Vec::new(),
        ..Default::default()
    };
    let vocab = model.config().vocab_size as u32;
    let err = generate(&model, &request(vec![1, vocab], 4), |_| {}).unwrap_err();
    assert!(
        matches!(err, ModelError::TokenOutOfVocab { id, .. } if id == vocab),
        "{err}"
    );

    let max = model.config().max_position_embeddings;
    let err = generate(&model, &request(vec![1; max + 1], 1), |_| {}).unwrap_err();
    assert!(matches!(err, ModelError::ContextExceeded { .. }), "{err}");
    let err = generate(&model, &request(vec![1; 10], max), |_| {}).unwrap_err();
    assert!(matches!(err, ModelError::ContextExceeded { .. }), "{err}");

    let err = generate(&model, &request(Vec::new(), 4), |_| {}).unwrap_err();
    assert!(matches!(err, ModelError::EmptyPrompt), "{err}");

    let mut bad = request(vec![1, 2], 4);
    bad.sampling.top_p = 0.0;
    assert!(matches!(
        generate(&model, &bad, |_| {}),
        Err(ModelError::Sampling { field: "top_p", .. })
    ));
}

/// The `WeightSource` seam: the in-memory fake and the safetensors checkpoint serve the same
/// tensors, and a model built from either computes the same logits.
#[test]
fn weight_sources_conform() {
    use expertmesh_model::synthetic::SyntheticSpec;
    use expertmesh_model::{LogitRows, Sequence};

    let spec = SyntheticSpec {
        hidden: 64,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        experts: 8,
        expert_inter: 32,
        dense_inter: 96,
        vocab: 300,
        chunk: 8,
        moe_step: 2,
        seed: 5,
    };
    let (config, memory) = spec.build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = memory.names().cloned().collect();
    let tensors: Vec<_> = names.iter().map(|n| memory.tensor(n).unwrap()).collect();
    let views: Vec<(String, TensorView<'_>)> = names
        .iter()
        .zip(&tensors)
        .map(|(n, t)| {
            (
                format!("language_model.{n}"),
                TensorView::new(Dtype::BF16, t.shape.clone(), t.bytes()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        None::<HashMap<String, String>>,
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
    let disk = SafetensorsCheckpoint::open(dir.path()).unwrap();
    for (name, t) in names.iter().zip(&tensors) {
        let d = disk.tensor(name).unwrap();
        assert_eq!(
            (d.shape.clone(), d.bytes()),
            (t.shape.clone(), t.bytes()),
            "{name}"
        );
    }
    for src in [&memory as &dyn WeightSource, &disk] {
        assert!(matches!(
            src.tensor("model.nothing"),
            Err(ModelError::MissingTensor { .. })
        ));
    }
    let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
    let logits = |src: &dyn WeightSource| {
        let model = Model::from_source(config.clone(), src).unwrap();
        let mut cache = model.new_cache();
        model
            .forward(&mut [Sequence::new(&mut cache, &tokens)], LogitRows::All)
            .unwrap()
            .logits
    };
    assert_eq!(logits(&memory), logits(&disk));
}
