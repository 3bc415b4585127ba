//! Experts that travel between workers (`ExpertService.FetchExperts`): a worker started
//! without the checkpoint's weights (its model directory holds `config.json`, the tokenizer
//! and the shard index only) takes every expert the placement gives it from the peers that
//! hold it.
//!
//! The receiver keeps what arrives in a cache file laid out as a safetensors file of the
//! expert tensors at their full shapes, sparse until written ([`ExpertCache`]); the shard maps
//! it like any checkpoint, so fetched experts are computed exactly as read ones, and the
//! file's name is removed once it is mapped (nothing outlives the worker). An FP8
//! checkpoint's experts travel per projection: the e4m3 codes as stored and the scales as
//! the shard holds them (f32, widened exactly), and a fetched one is read anew from the
//! cache ([`ExpertCache::reread`]). An expert's chunks come in one fixed order (MoE layers
//! ascending; gate_up then down, or gate, up, down with each weight's scale after it; each
//! slice front to back): the receiver checks every chunk against the next piece it expects (tensor,
//! offset, length, dtype, shape) and its CRC-32 before writing it, and the whole expert's
//! CRC-32 and size at the end. Only then is the expert marked held
//! ([`crate::shard::ExpertShard::mark_fetched`]); a stream that fails or lies leaves it
//! unheld, and the next holder is asked ([`fetch_expert`]). Senders pace themselves with a
//! shared [`RateLimit`] so that serving is not starved.
//!
//! The CRCs catch corruption on the way; the coordinators' digest of each expert
//! ([`expert_digest`], recorded from the workers with the checkpoint's files) catches a peer
//! whose copy is not the checkpoint's although its CRCs agree with what it sends. The peers'
//! identity is mutual TLS's job.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expertmesh_model::moe::{ExpertWeights, Experts};
use expertmesh_model::TextConfig;
use expertmesh_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};

use crate::shard::ExpertShard;

/// The most bytes of one chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Experts a worker fetches at once (spread over their holders).
pub const FETCHES_IN_FLIGHT: usize = 8;
/// How long one expert's transfer from one peer may take before the next peer is asked.
const EXPERT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the next chunk may keep the receiver waiting (a stalled sender is left sooner).
const CHUNK_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("the checkpoint cannot travel between workers: {0}")]
    Unsupported(String),
    #[error("the expert cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{peer}: {reason}")]
    Peer { peer: String, reason: String },
    #[error("expert {expert} from {peer}: {reason}")]
    Corrupt {
        expert: u32,
        peer: String,
        reason: String,
    },
    #[error("expert {expert}: no holder could send it ({tried})")]
    NoHolder { expert: u32, tried: String },
}

/// What a worker's transfers have moved, for `/metrics`, and which are in flight, for its
/// heartbeat (`admin status`; the experts that arrived are the shard's
/// [`ExpertShard::transfer_report`]).
#[derive(Debug, Default)]
pub struct TransferStats {
    /// Expert bytes sent to peers.
    pub sent_bytes: std::sync::atomic::AtomicU64,
    /// Expert bytes received from peers and verified.
    pub fetched_bytes: std::sync::atomic::AtomicU64,
    /// Experts being fetched now.
    pub fetching: std::sync::atomic::AtomicU64,
    /// Transfers that failed or lied (another holder was asked).
    pub failed: std::sync::atomic::AtomicU64,
    /// The transfers in flight, by expert.
    active: Mutex<BTreeMap<u32, Active>>,
    /// The digests of experts this worker holds from the checkpoint's files.
    pub digests: Digests,
}

/// The digests ([`expert_digest`]) a worker with the checkpoint's files has computed of its
/// experts, until the cluster state records them (each heartbeat reports the rest).
#[derive(Debug, Default)]
pub struct Digests {
    /// Expert → its digest, and whether the cluster state has one for it.
    computed: Mutex<BTreeMap<u32, (u32, bool)>>,
}

impl Digests {
    /// Digests every expert of `experts` not digested yet (reading all its bytes).
    pub fn compute(&self, shard: &ExpertShard, experts: impl IntoIterator<Item = u32>) {
        for e in experts {
            if self.computed.lock().expect("digests lock").contains_key(&e) {
                continue;
            }
            match expert_digest(shard, e) {
                Ok(crc) => {
                    self.computed
                        .lock()
                        .expect("digests lock")
                        .insert(e, (crc, false));
                }
                Err(err) => return tracing::debug!("no expert digests: {err}"),
            }
        }
    }

    /// Notes what the cluster state has recorded; the experts whose recorded digest differs
    /// from the one computed here (this worker's files are not the cluster's checkpoint).
    pub fn recorded(&self, state: &BTreeMap<u32, u32>) -> Vec<u32> {
        let mut differ = Vec::new();
        for (e, (crc, known)) in self.computed.lock().expect("digests lock").iter_mut() {
            if let Some(&recorded) = state.get(e) {
                if !*known && recorded != *crc {
                    differ.push(*e);
                }
                *known = true;
            }
        }
        differ
    }

    /// The digests the cluster state has not recorded yet, as a heartbeat carries them.
    pub fn unrecorded(&self) -> Vec<pb::ExpertDigest> {
        self.computed
            .lock()
            .expect("digests lock")
            .iter()
            .filter(|(_, (_, known))| !known)
            .map(|(&expert, &(crc32, _))| pb::ExpertDigest { expert, crc32 })
            .collect()
    }
}

/// One expert being received.
#[derive(Debug)]
struct Active {
    source: String,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    total: u64,
    started: std::time::Instant,
}

/// A transfer in flight in [`TransferStats`]: it leaves the report when dropped, however the
/// transfer ended (a cancelled one included).
struct InFlight<'a> {
    stats: &'a TransferStats,
    expert: u32,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats
            .active
            .lock()
            .expect("transfers lock")
            .remove(&self.expert);
    }
}

impl TransferStats {
    /// Starts expert `e`'s transfer from `source`; its verified bytes go to the guard's
    /// counter.
    fn begin(&self, e: u32, source: &str, total: u64) -> InFlight<'_> {
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.active.lock().expect("transfers lock").insert(
            e,
            Active {
                source: source.to_owned(),
                bytes: bytes.clone(),
                total,
                started: std::time::Instant::now(),
            },
        );
        InFlight {
            stats: self,
            expert: e,
            bytes,
        }
    }

    /// The transfers in flight, as the heartbeat carries them.
    pub fn in_flight(&self) -> Vec<pb::Transfer> {
        self.active
            .lock()
            .expect("transfers lock")
            .iter()
            .map(|(&expert, a)| pb::Transfer {
                expert,
                source: a.source.clone(),
                bytes: a.bytes.load(std::sync::atomic::Ordering::Relaxed),
                total: a.total,
                elapsed_ms: a.started.elapsed().as_millis() as u64,
            })
            .collect()
    }
}

/// The safetensors name of a dtype.
fn dtype_name(d: expertmesh_model::DType) -> &'static str {
    use expertmesh_model::DType;
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F8E4M3 => "F8_E4M3",
    }
}

/// One expert tensor of the cache: where its bytes start in the file, its shape, and whose
/// it is.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    file_offset: u64,
    bytes: u64,
    /// The expert whose tensor this is (an unfused checkpoint's), or `None` for a fused
    /// tensor whose first dimension is the expert.
    expert: Option<u32>,
}

impl Slot {
    /// Where expert `e`'s bytes are in this tensor (`[start, end)`), if anywhere.
    fn region(&self, e: u32) -> Option<(u64, u64)> {
        match self.expert {
            None => {
                let stride = self.bytes / self.shape[0];
                (u64::from(e) < self.shape[0])
                    .then(|| (u64::from(e) * stride, (u64::from(e) + 1) * stride))
            }
            Some(x) => (x == e).then_some((0, self.bytes)),
        }
    }
}

/// The expert tensors of a checkpoint, in the order their pieces travel (MoE layers
/// ascending): a fused one's `gate_up_proj` then `down_proj` (every expert in each), or an
/// unfused one's `experts.{e}.{gate,up,down}_proj.weight`, each FP8 with its
/// `weight_scale` (as f32, `[out, 1]`) or in the checkpoint's dtype. Name, dtype, shape and
/// the expert of each.
fn cache_layout(
    c: &TextConfig,
    dtype: &'static str,
) -> Vec<(String, &'static str, Vec<u64>, Option<u32>)> {
    let (e, h, i) = (
        c.num_local_experts as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
    );
    let mut out = Vec::new();
    for l in &c.moe_layers {
        let p = format!("model.layers.{l}.feed_forward.experts");
        let Some(q) = &c.quantization else {
            out.push((format!("{p}.gate_up_proj"), dtype, vec![e, h, 2 * i], None));
            out.push((format!("{p}.down_proj"), dtype, vec![e, i, h], None));
            continue;
        };
        for x in 0..e as u32 {
            for (name, rows, cols) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
            {
                let module = format!("{p}.{x}.{name}");
                if q.is_quantized(&module) {
                    out.push((
                        format!("{module}.weight"),
                        "F8_E4M3",
                        vec![rows, cols],
                        Some(x),
                    ));
                    out.push((
                        format!("{module}.weight_scale"),
                        "F32",
                        vec![rows, 1],
                        Some(x),
                    ));
                } else {
                    out.push((format!("{module}.weight"), dtype, vec![rows, cols], Some(x)));
                }
            }
        }
    }
    out
}

/// Where fetched experts are written: `dir/model.safetensors`, a safetensors file of every
/// expert tensor at its full shape whose data stays a hole until written.
#[derive(Debug)]
pub struct ExpertCache {
    dir: PathBuf,
    file: Mutex<std::fs::File>,
    slots: Vec<Slot>,
    /// Whether `create` made the directory (`unlink` then removes it too).
    made_dir: bool,
    /// The cache as a checkpoint, and the model's config: an unfused expert is read anew
    /// from it once fetched ([`ExpertCache::reread`]).
    mapped: expertmesh_model::SafetensorsCheckpoint,
    config: TextConfig,
}

impl ExpertCache {
    /// Makes the cache for `config`'s experts in `dir` (a previous cache file there is
    /// replaced; nothing else in `dir` is touched). The checkpoint's dtype comes from the
    /// config (`torch_dtype`; bf16 when it says nothing); an FP8 checkpoint's experts are
    /// FP8 where `quantization_config` says so.
    pub fn create(dir: &Path, config: &TextConfig) -> Result<Self, TransferError> {
        let dtype = match config.dtype.as_deref() {
            None | Some("bfloat16") => "BF16",
            Some("float32") => "F32",
            Some(other) => {
                return Err(TransferError::Unsupported(format!("torch_dtype {other}")));
            }
        };
        let io = |source| TransferError::Cache {
            path: dir.to_owned(),
            source,
        };
        let made_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("model.safetensors");
        // A previous run's cache: its experts are fetched again (nothing vouches for them).
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut header = serde_json::Map::new();
        let mut slots = Vec::new();
        let mut at = 0u64;
        for (name, dtype, shape, expert) in cache_layout(config, dtype) {
            let size = match dtype {
                "F8_E4M3" => 1,
                "BF16" => 2,
                _ => 4,
            };
            let bytes = shape.iter().product::<u64>() * size;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
            );
            slots.push(Slot {
                name,
                dtype,
                shape,
                file_offset: at,
                bytes,
                expert,
            });
            at += bytes;
        }
        let mut head = serde_json::to_vec(&header).expect("a JSON map serializes");
        // The data starts 8-byte aligned, as safetensors writers leave it.
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let data_start = 8 + head.len() as u64;
        for s in &mut slots {
            s.file_offset += data_start;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        file.write_all_at(&(head.len() as u64).to_le_bytes(), 0)
            .and_then(|()| file.write_all_at(&head, 8))
            .and_then(|()| file.set_len(data_start + at))
            .map_err(io)?;
        let mapped = expertmesh_model::SafetensorsCheckpoint::open(dir)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        Ok(Self {
            dir: dir.to_owned(),
            file: Mutex::new(file),
            slots,
            made_dir,
            mapped,
            config: config.clone(),
        })
    }

    /// The cache mapped as a checkpoint, for the shard that computes with it.
    pub fn weights(&self) -> &expertmesh_model::SafetensorsCheckpoint {
        &self.mapped
    }

    /// Expert `e`'s regions of the cache in the order its pieces travel: each tensor and
    /// the byte range of it that is the expert's.
    fn regions(&self, e: u32) -> impl Iterator<Item = (&Slot, u64, u64)> {
        self.slots
            .iter()
            .filter_map(move |s| s.region(e).map(|(start, end)| (s, start, end)))
    }

    /// Expert `e`'s weights in every MoE layer as the cache now holds them, for an unfused
    /// checkpoint (whose FP8 scales the shard read at load); `None` for a fused one (its
    /// shard reads the mapped bytes as they are).
    pub fn reread(&self, e: u32) -> Result<Option<BTreeMap<u32, ExpertWeights>>, TransferError> {
        if self.config.quantization.is_none() {
            return Ok(None);
        }
        let mut out = BTreeMap::new();
        for &l in &self.config.moe_layers {
            let w =
                ExpertWeights::load(&self.mapped, &self.config, l, e as usize).map_err(|err| {
                    TransferError::Cache {
                        path: self.dir.clone(),
                        source: std::io::Error::other(err.to_string()),
                    }
                })?;
            out.insert(l as u32, w);
        }
        Ok(Some(out))
    }

    /// Removes the cache file's name (and the directory, when `create` made it) once the
    /// shard has mapped it: the worker's writes and its map share the file, which the system
    /// frees when the worker exits, however it exits. Nothing is left on disk.
    pub fn unlink(&self) -> Result<(), TransferError> {
        std::fs::remove_file(self.dir.join("model.safetensors")).map_err(|source| {
            TransferError::Cache {
                path: self.dir.clone(),
                source,
            }
        })?;
        if self.made_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
        Ok(())
    }

    /// The directory to open as the shard's weights.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of one expert over every MoE layer.
    pub fn expert_bytes(&self) -> u64 {
        self.regions(0).map(|(_, start, end)| end - start).sum()
    }

    fn write(&self, slot: &Slot, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        // One writer at a time: the filesystem serializes writes to one file anyway (the
        // inode lock), and a writer left to wait there spins on the core the network needs.
        let file = self.file.lock().expect("cache file lock");
        file.write_all_at(data, slot.file_offset + offset)
            .map_err(|source| TransferError::Cache {
                path: self.dir.clone(),
                source,
            })
    }
}

/// One tensor of an expert as it travels: the cache tensor's name, dtype and full shape,
/// where the expert's slice starts in it, and the slice.
struct Piece {
    tensor: String,
    dtype: expertmesh_model::DType,
    shape: Vec<usize>,
    base: u64,
    slice: expertmesh_model::Tensor,
}

/// Expert `e`'s tensors as this shard holds them, in the order they travel (MoE layers
/// ascending, `gate_up_proj` then `down_proj`).
fn expert_pieces(shard: &ExpertShard, e: u32) -> Result<Vec<Piece>, TransferError> {
    let mut pieces = Vec::new();
    for (l, experts) in shard.layers().iter() {
        let p = format!("model.layers.{l}.feed_forward.experts");
        let (gate_up, down) = match experts {
            Experts::Fused { gate_up, down } => (gate_up, down),
            Experts::Unfused(list) => {
                let Some(w) = list.get(e as usize) else {
                    return Err(TransferError::Unsupported(format!("no expert {e}")));
                };
                for (name, linear) in [
                    ("gate_proj", &w.gate),
                    ("up_proj", &w.up),
                    ("down_proj", &w.down),
                ] {
                    let module = format!("{p}.{e}.{name}");
                    let weight = linear.weight();
                    pieces.push(Piece {
                        tensor: format!("{module}.weight"),
                        dtype: weight.dtype,
                        shape: weight.shape.clone(),
                        base: 0,
                        slice: weight.clone(),
                    });
                    // The scales as the shard holds them: f32, widened exactly from the
                    // checkpoint's bf16/f16/f32, so the receiver computes the same bits.
                    if let Some(scale) = linear.fp8_scale() {
                        pieces.push(Piece {
                            tensor: format!("{module}.weight_scale"),
                            dtype: expertmesh_model::DType::F32,
                            shape: vec![scale.len(), 1],
                            base: 0,
                            slice: expertmesh_model::Tensor::from_bytes(
                                expertmesh_model::DType::F32,
                                vec![scale.len(), 1],
                                scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
                            ),
                        });
                    }
                }
                continue;
            }
        };
        for (tensor, t) in [
            (format!("{p}.gate_up_proj"), gate_up),
            (format!("{p}.down_proj"), down),
        ] {
            let slice = t.outer(e as usize);
            pieces.push(Piece {
                tensor,
                dtype: t.dtype,
                shape: t.shape.clone(),
                base: (e as usize * slice.size_bytes()) as u64,
                slice,
            });
        }
    }
    Ok(pieces)
}

/// The CRC-32 of expert `e`'s bytes in the order they travel: what the coordinators record
/// from workers with the checkpoint's files, and what a fetched expert must match. Reads
/// every byte of the expert.
pub fn expert_digest(shard: &ExpertShard, e: u32) -> Result<u32, TransferError> {
    let mut crc = crc32fast::Hasher::new();
    for piece in expert_pieces(shard, e)? {
        crc.update(piece.slice.bytes());
    }
    Ok(crc.finalize())
}

/// The chunks of expert `e` as this shard holds it, made one at a time as they are sent.
pub fn expert_chunks(
    shard: &ExpertShard,
    e: u32,
) -> Result<impl Iterator<Item = pb::ExpertChunk> + Send + 'static, TransferError> {
    let pieces = expert_pieces(shard, e)?;
    let total: u64 = pieces.iter().map(|p| p.slice.size_bytes() as u64).sum();
    let mut whole = crc32fast::Hasher::new();
    let mut sent = 0u64;
    Ok(pieces
        .into_iter()
        .flat_map(|piece| {
            let len = piece.slice.size_bytes();
            // The chunks are views of the held tensor (the mapped checkpoint or cache):
            // their bytes are copied once, into the frame.
            let bytes = bytes::Bytes::from_owner(Held(piece.slice));
            let (tensor, dtype, shape, base) = (piece.tensor, piece.dtype, piece.shape, piece.base);
            (0..len.div_ceil(CHUNK_BYTES)).map(move |k| {
                let from = k * CHUNK_BYTES;
                let data = bytes.slice(from..(from + CHUNK_BYTES).min(len));
                (
                    tensor.clone(),
                    dtype,
                    shape.clone(),
                    base + from as u64,
                    data,
                )
            })
        })
        .map(move |(tensor, dtype, shape, offset, data)| {
            // One pass over the bytes: the chunk's CRC, folded into the expert's.
            let mut crc = crc32fast::Hasher::new();
            crc.update(&data);
            whole.combine(&crc);
            sent += data.len() as u64;
            let last = sent == total;
            pb::ExpertChunk {
                expert: e,
                tensor,
                dtype: dtype_name(dtype).into(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                offset,
                crc32: crc.finalize(),
                data,
                last,
                expert_crc32: if last { whole.clone().finalize() } else { 0 },
                expert_bytes: if last { total } else { 0 },
            }
        }))
}

/// A held expert tensor's bytes, shared with the chunks that send them.
struct Held(expertmesh_model::Tensor);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A stream of one expert's chunks from a peer.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ExpertChunk, TransferError>> + Send>>;

/// Where an expert's bytes can come from: a peer worker (over gRPC), or a test's fake.
#[tonic::async_trait]
pub trait ExpertSource: Send + Sync {
    /// Who it is, for logs and errors.
    fn name(&self) -> String;
    /// Expert `e`'s chunks, in order.
    async fn fetch(&self, e: u32) -> Result<ChunkStream, TransferError>;
}

/// A peer expert worker's `FetchExperts`, over one channel for every expert asked of it.
pub struct GrpcSource {
    address: String,
    channel: tonic::transport::Channel,
}

impl GrpcSource {
    /// A source at `address` (connected on first use).
    pub fn new(address: &str) -> Result<Self, TransferError> {
        let endpoint = expertmesh_proto::watched_endpoint(address, Duration::from_secs(3))
            .map_err(|e| TransferError::Peer {
                peer: address.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            address: address.to_owned(),
            channel: expertmesh_proto::tls::channel(
                endpoint,
                address,
                expertmesh_proto::tls::PeerRole::ExpertWorker,
            ),
        })
    }
}

#[tonic::async_trait]
impl ExpertSource for GrpcSource {
    fn name(&self) -> String {
        self.address.clone()
    }

    async fn fetch(&self, e: u32) -> Result<ChunkStream, TransferError> {
        use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
        let failed = |s: tonic::Status| TransferError::Peer {
            peer: self.address.clone(),
            reason: s.to_string(),
        };
        let mut request = tonic::Request::new(pb::FetchExpertsRequest { experts: vec![e] });
        request.set_timeout(EXPERT_DEADLINE);
        let stream = ExpertServiceClient::new(self.channel.clone())
            .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES)
            .fetch_experts(request)
            .await
            .map_err(failed)?
            .into_inner();
        let peer = self.address.clone();
        Ok(Box::pin(stream.map(move |r| {
            r.map_err(|s| TransferError::Peer {
                peer: peer.clone(),
                reason: s.to_string(),
            })
        })))
    }
}

/// Takes expert `e` from `stream` into `cache`, checking every chunk against the piece it
/// must be and the whole expert against the sender's CRC and `digest` (the coordinators'
/// record, when they have one), counting verified bytes in `progress`; the expert's bytes,
/// once all have arrived and been verified.
pub async fn receive(
    cache: &ExpertCache,
    e: u32,
    digest: Option<u32>,
    peer: &str,
    mut stream: ChunkStream,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<u64, TransferError> {
    let corrupt = |reason: String| TransferError::Corrupt {
        expert: e,
        peer: peer.to_owned(),
        reason,
    };
    if e as usize >= cache.config.num_local_experts {
        return Err(corrupt("no such expert".into()));
    }
    let mut whole = crc32fast::Hasher::new();
    let mut got = 0u64;
    for (slot, start, end) in cache.regions(e) {
        let mut at = start;
        while at < end {
            let chunk = match tokio::time::timeout(CHUNK_DEADLINE, stream.next()).await {
                Err(_) => return Err(corrupt("the stream stalled".into())),
                Ok(None) => {
                    return Err(corrupt(format!(
                        "the stream ended at {} of {}",
                        slot.name, at
                    )))
                }
                Ok(Some(chunk)) => chunk?,
            };
            let expected = (end - at).min(CHUNK_BYTES as u64);
            if chunk.expert != e
                || chunk.tensor != slot.name
                || chunk.offset != at
                || chunk.data.len() as u64 != expected
                || chunk.dtype != slot.dtype
                || chunk.shape != slot.shape
            {
                return Err(corrupt(format!(
                    "a chunk of {} {:?} at {} ({} bytes) where {} {} at {at} ({expected} bytes) was due",
                    chunk.tensor,
                    chunk.shape,
                    chunk.offset,
                    chunk.data.len(),
                    slot.name,
                    slot.dtype,
                )));
            }
            let mut crc = crc32fast::Hasher::new();
            crc.update(&chunk.data);
            if crc.clone().finalize() != chunk.crc32 {
                return Err(corrupt(format!(
                    "the chunk of {} at {at} fails its CRC",
                    slot.name
                )));
            }
            cache.write(slot, at, &chunk.data)?;
            whole.combine(&crc);
            got += expected;
            progress.store(got, std::sync::atomic::Ordering::Relaxed);
            at += expected;
            let last = got == cache.expert_bytes();
            if chunk.last != last {
                return Err(corrupt(format!("the last chunk came after {got} bytes")));
            }
            if last && (chunk.expert_crc32 != whole.clone().finalize() || chunk.expert_bytes != got)
            {
                return Err(corrupt("the whole expert fails its CRC".into()));
            }
            if last && digest.is_some_and(|d| d != whole.clone().finalize()) {
                return Err(corrupt(
                    "the whole expert is not the checkpoint's: its CRC differs from the digest the coordinators hold"
                        .into(),
                ));
            }
        }
    }
    Ok(got)
}

/// Fetches expert `e` into `cache` from the first of `sources` that sends it whole, intact
/// and matching `digest` (a failed or corrupt transfer moves on to the next); marks it
/// held in `shard`. The bytes and who sent them.
pub async fn fetch_expert(
    shard: &ExpertShard,
    cache: &ExpertCache,
    e: u32,
    digest: Option<u32>,
    sources: &[Arc<dyn ExpertSource>],
) -> Result<(u64, String), TransferError> {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = shard.transfers();
    stats.fetching.fetch_add(1, Relaxed);
    let mut tried = Vec::new();
    for source in sources {
        let peer = source.name();
        let in_flight = stats.begin(e, &peer, cache.expert_bytes());
        let outcome = match source.fetch(e).await {
            Ok(stream) => receive(cache, e, digest, &peer, stream, &in_flight.bytes).await,
            Err(err) => Err(err),
        };
        // An unfused expert is read anew from the cache (its scales were read at load).
        let outcome = outcome.and_then(|bytes| {
            if let Some(weights) = cache.reread(e)? {
                shard.replace_expert(e, weights);
            }
            Ok(bytes)
        });
        match outcome {
            Ok(bytes) => {
                shard.mark_fetched(e, &peer);
                stats.fetching.fetch_sub(1, Relaxed);
                stats.fetched_bytes.fetch_add(bytes, Relaxed);
                return Ok((bytes, peer));
            }
            Err(err) => {
                stats.failed.fetch_add(1, Relaxed);
                tracing::warn!("expert {e}: {err}; asking the next holder");
                tried.push(err.to_string());
            }
        }
    }
    stats.fetching.fetch_sub(1, Relaxed);
    Err(TransferError::NoHolder {
        expert: e,
        tried: tried.join("; "),
    })
}

/// A sender's pace: at most `bytes_per_second` over all its transfers, in bursts of at most
/// one second's worth.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: f64,
    /// Bytes that may go now, and when that was last worked out.
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimit {
    /// `megabits_per_second` of 0 means no limit.
    pub fn new(megabits_per_second: u64) -> Self {
        Self {
            bytes_per_second: megabits_per_second as f64 * 1e6 / 8.0,
            state: Mutex::new((0.0, tokio::time::Instant::now())),
        }
    }

    /// Waits until `bytes` more may go.
    pub async fn take(&self, bytes: usize) {
        if self.bytes_per_second <= 0.0 {
            return;
        }
        let wait = {
            let mut s = self.state.lock().expect("rate lock");
            let now = tokio::time::Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.bytes_per_second;
            s.0 = (s.0 + refill).min(self.bytes_per_second) - bytes as f64;
            s.1 = now;
            // In debt: wait until it is paid back.
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / self.bytes_per_second))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The peers a weightless worker takes expert `e` from, in the order to ask them: the one
/// the plan names (`planned`, from [`ClusterView::transfer_sources`]), then the other live
/// workers whose committed placement holds it (from the one the expert's index picks), then
/// every other live expert worker (a worker with the checkpoint can send any expert).
/// `peers` keeps one source per address across calls.
///
/// [`ClusterView::transfer_sources`]: expertmesh_coordinator::ClusterView::transfer_sources
pub fn sources_for(
    view: &expertmesh_coordinator::ClusterView,
    me: u64,
    e: u32,
    planned: Option<u64>,
    peers: &mut BTreeMap<String, Arc<dyn ExpertSource>>,
) -> Vec<Arc<dyn ExpertSource>> {
    use expertmesh_coordinator::Role;
    let live: BTreeMap<u64, &str> = view
        .members
        .iter()
        .filter(|m| m.alive && m.role == Role::ExpertWorker && m.id != me)
        .map(|m| (m.id, m.address.as_str()))
        .collect();
    let mut order: Vec<u64> = live
        .keys()
        .copied()
        .filter(|w| view.placement.experts_of(*w).contains(&e))
        .collect();
    if !order.is_empty() {
        let k = e as usize % order.len();
        order.rotate_left(k);
    }
    let rest: Vec<u64> = live
        .keys()
        .filter(|w| !order.contains(w))
        .copied()
        .collect();
    order.extend(rest);
    if let Some(at) = planned.and_then(|p| order.iter().position(|&w| w == p)) {
        let first = order.remove(at);
        order.insert(0, first);
    }
    order
        .into_iter()
        .filter_map(|w| {
            let address = live[&w];
            if !peers.contains_key(address) {
                let source = GrpcSource::new(address).ok()?;
                peers.insert(address.to_owned(), Arc::new(source));
            }
            peers.get(address).cloned()
        })
        .collect()
}
