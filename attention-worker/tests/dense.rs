//! Dense weights sent between attention workers, in one process: a receiver takes the tiny
//! fixture's dense weights from senders that corrupt a chunk, lie about a dtype, list a
//! routed expert or too much; what it keeps is byte for byte the checkpoint's, and a model
//! loads from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;

use expertmesh_attention_worker::dense::{
    check_manifest, fetch_dense, receive_dense, DenseSource, DenseWeights, PartStream,
};
use expertmesh_expert_worker::transfer::TransferError;
use expertmesh_model::{Model, ModelSource, SafetensorsCheckpoint};
use expertmesh_proto::v1 as pb;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick")
}

fn dense() -> DenseWeights {
    DenseWeights::new(Arc::new(SafetensorsCheckpoint::open(&fixture()).unwrap()))
}

/// What a sender does wrong.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Flips a byte of the chunk after its CRC was computed.
    Corrupt(usize),
    /// Calls the first tensor F16 (a lie that keeps every size and CRC right).
    Relabel,
    /// Lists a routed expert's tensor.
    ListExpert,
}

struct FakeSource {
    dense: DenseWeights,
    fault: Fault,
}

#[tonic::async_trait]
impl DenseSource for FakeSource {
    fn name(&self) -> String {
        "fake".into()
    }

    async fn fetch(&self) -> Result<PartStream, TransferError> {
        use pb::dense_weights_part::Part;
        let mut parts: Vec<pb::DenseWeightsPart> = self.dense.parts().collect();
        match (self.fault, &mut parts[0].part) {
            (Fault::Relabel, Some(Part::Manifest(m))) => {
                let first = m.tensors[0].name.clone();
                m.tensors[0].dtype = "F16".into();
                for p in &mut parts[1..] {
                    if let Some(Part::Chunk(c)) = &mut p.part {
                        if c.tensor == first {
                            c.dtype = "F16".into();
                        }
                    }
                }
            }
            (Fault::ListExpert, Some(Part::Manifest(m))) => {
                m.tensors[0].name = "model.layers.1.feed_forward.experts.gate_up_proj".into();
            }
            (Fault::Corrupt(k), _) => {
                if let Some(Part::Chunk(c)) = &mut parts[k].part {
                    let mut data = c.data.to_vec();
                    data[3] ^= 1;
                    c.data = data.into();
                }
            }
            _ => {}
        }
        Ok(Box::pin(tokio_stream::iter(parts.into_iter().map(Ok))))
    }
}

fn source(fault: Fault) -> Arc<dyn DenseSource> {
    Arc::new(FakeSource {
        dense: dense(),
        fault,
    })
}

fn dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("expertmesh-dense-{name}-{}", std::process::id()))
}

#[tokio::test]
async fn dense_weights_arrive_whole_and_a_model_loads_from_them() {
    let sent = dense();
    let digest = sent.digest();
    let sources = [source(Fault::Corrupt(2)), source(Fault::None)];
    let (file, _) = fetch_dense(&dir("whole"), &sources, Some(digest))
        .await
        .unwrap();
    let original = SafetensorsCheckpoint::open(&fixture()).unwrap();
    let mut tensors = 0;
    for name in original
        .names()
        .filter(|n| !n.contains(".feed_forward.experts."))
    {
        let want = original.stored(name).unwrap();
        let got = file.weights().stored(name).expect(name);
        assert_eq!((got.dtype, &got.shape), (want.dtype, &want.shape), "{name}");
        assert_eq!(got.bytes(), want.bytes(), "{name}");
        tensors += 1;
    }
    assert!(tensors > 10);
    assert_eq!(DenseWeights::new(file.shared_weights()).digest(), digest);
    let config = ModelSource::Dir(fixture()).config().unwrap();
    Model::without_experts(config, file.weights()).unwrap();
    file.unlink().unwrap();
}

#[tokio::test]
async fn a_sender_that_lies_or_corrupts_is_refused() {
    let digest = dense().digest();
    let at = dir("lies");
    let corrupt = receive_dense(
        &at,
        source(Fault::Corrupt(1)).as_ref(),
        None,
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(corrupt.to_string().contains("CRC"), "{corrupt}");
    // Every size and CRC agrees with what it sends: only the coordinators' digest tells.
    let relabelled = receive_dense(
        &at,
        source(Fault::Relabel).as_ref(),
        Some(digest),
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(relabelled.to_string().contains("digest"), "{relabelled}");
    let expert = receive_dense(
        &at,
        source(Fault::ListExpert).as_ref(),
        None,
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(expert.to_string().contains("manifest"), "{expert}");
    let none = fetch_dense(&at, &[], Some(digest)).await.unwrap_err();
    assert!(
        none.to_string().contains("no live attention worker"),
        "{none}"
    );
    let _ = std::fs::remove_dir_all(&at);
}

#[test]
fn hostile_manifests_are_refused() {
    let tensor = |name: &str, dtype: &str, shape: Vec<u64>| pb::DenseTensor {
        name: name.into(),
        dtype: dtype.into(),
        shape,
    };
    let ok = tensor("a", "BF16", vec![2, 3]);
    assert!(check_manifest(pb::DenseManifest {
        tensors: vec![ok.clone(), tensor("b", "F8_E4M3", vec![4])],
    })
    .is_ok());
    for bad in [
        vec![ok.clone(), ok.clone()],
        vec![tensor("b", "BF16", vec![1]), ok.clone()],
        vec![tensor("", "BF16", vec![1])],
        vec![tensor("a", "I64", vec![1])],
        vec![tensor("a", "BF16", vec![u64::MAX, 2])],
        vec![tensor("a", "F32", vec![1 << 20, 1 << 20])],
        vec![tensor("a", "BF16", vec![1; 9])],
        vec![tensor(&"x".repeat(600), "BF16", vec![1])],
        vec![ok.clone(); 200_001],
    ] {
        assert!(
            check_manifest(pb::DenseManifest { tensors: bad }).is_err(),
            "accepted"
        );
    }
}

/// The sender keeps to its `--migration-mbps`: the tiny checkpoint's dense weights at a rate
/// that makes them a ~10 s transfer (on tokio's clock) arrive within 10% of that, whole and in
/// order; with no limit they go at once.
#[tokio::test(start_paused = true)]
async fn a_sender_keeps_to_its_rate() {
    use expertmesh_expert_worker::transfer::RateLimit;
    let dense = dense();
    let want: Vec<pb::DenseWeightsPart> = dense.parts().collect();
    let bytes: usize = want
        .iter()
        .map(|p| match &p.part {
            Some(pb::dense_weights_part::Part::Chunk(c)) => c.data.len(),
            _ => 0,
        })
        .sum();
    let mbps = ((bytes * 8) as f64 / 10e6).round().max(1.0) as u64;
    let expected = Duration::from_secs_f64((bytes * 8) as f64 / (mbps as f64 * 1e6));
    assert!(
        expected >= Duration::from_secs(5),
        "{bytes} bytes is too little to time"
    );
    for (limit, window) in [
        (mbps, expected.mul_f64(0.9)..=expected.mul_f64(1.1)),
        (0, Duration::ZERO..=Duration::ZERO),
    ] {
        let started = tokio::time::Instant::now();
        let got: Vec<pb::DenseWeightsPart> = dense
            .send(Arc::new(RateLimit::new(limit)))
            .map(|p| p.unwrap())
            .collect()
            .await;
        let took = started.elapsed();
        assert!(
            window.contains(&took),
            "{limit} Mbit/s: {took:?} for {bytes} bytes"
        );
        assert!(
            got == want,
            "{limit} Mbit/s: the parts as `parts` gives them"
        );
    }
}
