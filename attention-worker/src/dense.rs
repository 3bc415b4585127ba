//! Dense weights that travel between attention workers (`AttentionService.FetchDenseWeights`):
//! an attention worker started without the checkpoint's weights (its model directory holds
//! `config.json`, the tokenizer and the shard index only) takes every tensor but the routed
//! experts from a live attention worker, into a mapped file it loads the model from.
//!
//! The sender streams a manifest (every tensor's name, dtype and shape, by name) and then
//! the tensors' chunks in that order ([`DenseWeights`]); the receiver checks the manifest
//! ([`check_manifest`]: bounded, no routed expert, dtypes the engine reads), lays the file
//! out from it, checks every chunk as experts' are (`expertmesh_expert_worker::weight_file`),
//! and the whole against the digest the coordinators hold (of the manifest and the bytes,
//! [`dense_digest`]), recorded from the attention workers with the files. A sender that
//! fails or lies is left for the next ([`fetch_dense`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_expert_worker::transfer::{ChunkStream, RateLimit, TransferError};
use expertmesh_expert_worker::weight_file::{self, dtype_bytes, Piece, TensorSpec, WeightFile};
use expertmesh_model::SafetensorsCheckpoint;
use expertmesh_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Parts of the dense weights queued to a receiver at most (each at most a 1 MiB chunk).
const DENSE_PARTS_QUEUE: usize = 4;
/// Tensors a manifest may list at most.
pub const DENSE_TENSORS_MAX: usize = 200_000;
/// Bytes the dense weights may take at most (Maverick's are ~14 GB in bf16).
pub const DENSE_BYTES_MAX: u64 = 1 << 40;
/// Bytes of a tensor name at most.
const NAME_BYTES_MAX: usize = 512;
/// Dimensions of a tensor at most.
const DIMS_MAX: usize = 8;
/// How long one transfer of the dense weights may take before the next sender is asked.
const DENSE_DEADLINE: Duration = Duration::from_secs(3600);

/// Whether a checkpoint tensor is a routed expert's (those travel between expert workers).
fn is_routed_expert(name: &str) -> bool {
    name.contains(".feed_forward.experts.")
}

/// An attention worker's dense weights as it sends them: its checkpoint's tensors but the
/// routed experts, by name.
#[derive(Clone)]
pub struct DenseWeights {
    checkpoint: Arc<SafetensorsCheckpoint>,
    names: Arc<Vec<String>>,
}

impl DenseWeights {
    pub fn new(checkpoint: Arc<SafetensorsCheckpoint>) -> Self {
        let mut names: Vec<String> = checkpoint
            .names()
            .filter(|n| !is_routed_expert(n))
            .cloned()
            .collect();
        names.sort();
        Self {
            checkpoint,
            names: Arc::new(names),
        }
    }

    /// Every tensor, in the order it travels.
    pub fn manifest(&self) -> Vec<TensorSpec> {
        self.pieces()
            .map(|p| TensorSpec {
                name: p.tensor,
                dtype: weight_file::dtype_name(p.dtype),
                shape: p.shape.iter().map(|&d| d as u64).collect(),
                expert: None,
            })
            .collect()
    }

    fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        self.names.iter().filter_map(|n| {
            let t = self.checkpoint.stored(n)?;
            Some(Piece {
                tensor: n.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                base: 0,
                bytes: t.clone(),
            })
        })
    }

    /// The manifest and then every chunk, as `FetchDenseWeights` sends them.
    pub fn parts(&self) -> impl Iterator<Item = pb::DenseWeightsPart> + Send + 'static {
        let manifest = pb::DenseManifest {
            tensors: self.manifest().iter().map(wire_tensor).collect(),
        };
        let chunks = weight_file::chunks(self.pieces().collect(), 0, None);
        std::iter::once(pb::dense_weights_part::Part::Manifest(manifest))
            .chain(chunks.map(pb::dense_weights_part::Part::Chunk))
            .map(|part| pb::DenseWeightsPart { part: Some(part) })
    }

    /// `FetchDenseWeights`'s stream: [`parts`](Self::parts) through a bounded queue, each
    /// chunk once `pace` lets its bytes go (the sender's `--migration-mbps`: what it spares
    /// from serving).
    pub fn send(
        &self,
        pace: Arc<RateLimit>,
    ) -> ReceiverStream<Result<pb::DenseWeightsPart, tonic::Status>> {
        let (tx, rx) = tokio::sync::mpsc::channel(DENSE_PARTS_QUEUE);
        let parts = self.parts();
        tokio::spawn(async move {
            for part in parts {
                let bytes = match &part.part {
                    Some(pb::dense_weights_part::Part::Chunk(c)) => c.data.len(),
                    _ => 0,
                };
                pace.take(bytes).await;
                if tx.send(Ok(part)).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// The digest of the dense weights ([`dense_digest`]); reads every byte.
    pub fn digest(&self) -> u32 {
        let mut data = crc32fast::Hasher::new();
        for p in self.pieces() {
            data.update(p.bytes.bytes());
        }
        dense_digest(&self.manifest(), &data)
    }
}

fn wire_tensor(t: &TensorSpec) -> pb::DenseTensor {
    pb::DenseTensor {
        name: t.name.clone(),
        dtype: t.dtype.into(),
        shape: t.shape.clone(),
    }
}

/// The dense weights' digest: the CRC-32 of the manifest (each tensor's name, dtype and
/// shape) followed by every tensor's bytes, given the CRC of the bytes.
pub fn dense_digest(manifest: &[TensorSpec], data: &crc32fast::Hasher) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for t in manifest {
        crc.update(t.name.as_bytes());
        crc.update(&[0]);
        crc.update(t.dtype.as_bytes());
        crc.update(&[0]);
        for d in &t.shape {
            crc.update(&d.to_le_bytes());
        }
    }
    crc.combine(data);
    crc.finalize()
}

/// A manifest from the wire, checked: at most [`DENSE_TENSORS_MAX`] tensors of names
/// in order, no routed expert, dtypes the engine reads, at most [`DENSE_BYTES_MAX`] in all.
pub fn check_manifest(m: pb::DenseManifest) -> Result<Vec<TensorSpec>, String> {
    if m.tensors.len() > DENSE_TENSORS_MAX {
        return Err(format!("{} tensors listed", m.tensors.len()));
    }
    let mut total = 0u64;
    let mut out: Vec<TensorSpec> = Vec::with_capacity(m.tensors.len());
    for t in m.tensors {
        if t.name.is_empty() || t.name.len() > NAME_BYTES_MAX || is_routed_expert(&t.name) {
            return Err(format!("a tensor named {:?}", t.name));
        }
        if out.last().is_some_and(|p| p.name >= t.name) {
            return Err(format!("{} is out of order or listed twice", t.name));
        }
        let dtype = match t.dtype.as_str() {
            "BF16" => "BF16",
            "F16" => "F16",
            "F32" => "F32",
            "F8_E4M3" => "F8_E4M3",
            other => return Err(format!("{} has dtype {other:?}", t.name)),
        };
        let size = dtype_bytes(dtype).expect("a dtype the engine reads");
        let bytes = (t.shape.len() <= DIMS_MAX)
            .then(|| t.shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d)))
            .flatten()
            .filter(|&b| b <= DENSE_BYTES_MAX)
            .ok_or_else(|| format!("{} has shape {:?}", t.name, t.shape))?;
        total += bytes;
        if total > DENSE_BYTES_MAX {
            return Err(format!("more than {DENSE_BYTES_MAX} bytes listed"));
        }
        out.push(TensorSpec {
            name: t.name,
            dtype,
            shape: t.shape,
            expert: None,
        });
    }
    Ok(out)
}

/// A stream of dense weight parts from a peer.
pub type PartStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DenseWeightsPart, TransferError>> + Send>,
>;

/// Where dense weights can come from: a peer attention worker (over gRPC), or a test's fake.
#[tonic::async_trait]
pub trait DenseSource: Send + Sync {
    fn name(&self) -> String;
    async fn fetch(&self) -> Result<PartStream, TransferError>;
}

/// A peer attention worker's `FetchDenseWeights`.
pub struct GrpcDenseSource {
    address: String,
}

impl GrpcDenseSource {
    pub fn new(address: &str) -> Self {
        Self {
            address: address.to_owned(),
        }
    }
}

#[tonic::async_trait]
impl DenseSource for GrpcDenseSource {
    fn name(&self) -> String {
        self.address.clone()
    }

    async fn fetch(&self) -> Result<PartStream, TransferError> {
        use expertmesh_proto::v1::attention_service_client::AttentionServiceClient;
        let failed = |reason: String| TransferError::Peer {
            peer: self.address.clone(),
            reason,
        };
        let endpoint = expertmesh_proto::watched_endpoint(&self.address, Duration::from_secs(3))
            .map_err(|e| failed(e.to_string()))?;
        let channel = expertmesh_proto::tls::channel(
            endpoint,
            &self.address,
            expertmesh_proto::tls::PeerRole::AttentionWorker,
        );
        let mut request = tonic::Request::new(pb::FetchDenseWeightsRequest {});
        request.set_timeout(DENSE_DEADLINE);
        let stream = AttentionServiceClient::new(channel)
            .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES)
            .fetch_dense_weights(request)
            .await
            .map_err(|s| failed(s.to_string()))?
            .into_inner();
        Ok(weight_file::from_peer(&self.address, stream))
    }
}

/// Takes the dense weights from `source` into a weight file in `dir`: the manifest, then
/// every chunk, checked, and the whole against `digest` (the coordinators' record, when they
/// have one).
pub async fn receive_dense(
    dir: &Path,
    source: &dyn DenseSource,
    digest: Option<u32>,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<WeightFile, TransferError> {
    let peer = source.name();
    let corrupt = |reason: String| TransferError::Corrupt {
        what: "the dense weights".into(),
        peer: peer.clone(),
        reason,
    };
    let mut parts = source.fetch().await?;
    let manifest = match parts.next().await {
        Some(Ok(pb::DenseWeightsPart {
            part: Some(pb::dense_weights_part::Part::Manifest(m)),
        })) => check_manifest(m).map_err(|why| corrupt(format!("the manifest: {why}")))?,
        Some(Err(e)) => return Err(e),
        _ => return Err(corrupt("the stream did not start with a manifest".into())),
    };
    let file = WeightFile::create(dir, manifest.clone())?;
    let mut chunks: ChunkStream = Box::pin(parts.map(|r| match r {
        Ok(pb::DenseWeightsPart {
            part: Some(pb::dense_weights_part::Part::Chunk(c)),
        }) => Ok(c),
        Ok(_) => Err(TransferError::Peer {
            peer: String::new(),
            reason: "a second manifest, or an empty part, among the chunks".into(),
        }),
        Err(e) => Err(e),
    }));
    let regions = file.all_regions();
    let whole = weight_file::receive(
        &file,
        &regions,
        0,
        ("the dense weights", &peer),
        &mut chunks,
        progress,
    )
    .await?
    .whole;
    if digest.is_some_and(|d| d != dense_digest(&manifest, &whole)) {
        return Err(corrupt(
            "they are not the checkpoint's: their digest differs from the one the coordinators hold".into(),
        ));
    }
    Ok(file)
}

/// Takes the dense weights from the first of `sources` that sends them whole, intact and
/// matching `digest`, into a weight file in `dir`; the file and who sent it.
pub async fn fetch_dense(
    dir: &Path,
    sources: &[Arc<dyn DenseSource>],
    digest: Option<u32>,
) -> Result<(WeightFile, String), TransferError> {
    let mut tried = Vec::new();
    for source in sources {
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let started = std::time::Instant::now();
        let watch = {
            let (progress, name) = (progress.clone(), source.name());
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(Duration::from_secs(5));
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    let got = progress.load(std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        "attention worker: {:.1} MB of dense weights from {name} ({:.1} MB/s)",
                        got as f64 / 1e6,
                        got as f64 / 1e6 / started.elapsed().as_secs_f64()
                    );
                }
            })
        };
        let outcome = receive_dense(dir, source.as_ref(), digest, &progress).await;
        watch.abort();
        match outcome {
            Ok(file) => return Ok((file, source.name())),
            Err(err) => {
                tracing::warn!("attention worker: dense weights: {err}; asking the next sender");
                tried.push(err.to_string());
            }
        }
    }
    Err(match tried.is_empty() {
        true => no_sender(),
        false => TransferError::NoHolder {
            what: "the dense weights".into(),
            tried: tried.join("; "),
        },
    })
}

/// No live attention worker to send the dense weights.
pub fn no_sender() -> TransferError {
    TransferError::NoHolder {
        what: "the dense weights".into(),
        tried: "no live attention worker to send them".into(),
    }
}
