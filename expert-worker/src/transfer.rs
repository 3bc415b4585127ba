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
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expertmesh_dispatch::Transport;
use expertmesh_model::moe::{ExpertWeights, Experts};
use expertmesh_model::TextConfig;
use expertmesh_proto::v1 as pb;
use tokio_stream::Stream;

use crate::shard::ExpertShard;
pub use crate::weight_file::Arrived;
use crate::weight_file::{Piece, TensorSpec, WeightFile};

pub use crate::weight_file::CHUNK_BYTES;
/// Experts a worker fetches at once (spread over their holders).
pub const FETCHES_IN_FLIGHT: usize = 8;
/// How long one expert's transfer from one peer may take before the next peer is asked.
pub(crate) const EXPERT_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("the checkpoint cannot travel between workers: {0}")]
    Unsupported(String),
    #[error("the expert cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The image arriving weights land in could not be had, or what landed cannot be read.
    #[error("the arriving weights' image: {0}")]
    Image(String),
    #[error("{peer}: {reason}")]
    Peer { peer: String, reason: String },
    #[error("{what} from {peer}: {reason}")]
    Corrupt {
        what: String,
        peer: String,
        reason: String,
    },
    #[error("{what}: no holder could send it ({tried})")]
    NoHolder { what: String, tried: String },
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
    /// Per expert, the turn to fetch it (one fetch of an expert at a time).
    turns: Mutex<BTreeMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// Per expert held here, the CRC-32 of each chunk it travels in, from when its bytes
    /// were digested or arrived ([`crate::weight_file::chunk_crcs`]): sending reads them
    /// from here instead of working them out again.
    chunk_crcs: Mutex<BTreeMap<u32, Arc<[u32]>>>,
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

    /// Keeps expert `e`'s chunk CRCs for sending it.
    fn keep_chunk_crcs(&self, e: u32, crcs: Vec<u32>) {
        self.chunk_crcs
            .lock()
            .expect("chunk CRCs lock")
            .insert(e, crcs.into());
    }

    /// Expert `e`'s chunk CRCs, when they are known.
    fn chunk_crcs(&self, e: u32) -> Option<Arc<[u32]>> {
        self.chunk_crcs
            .lock()
            .expect("chunk CRCs lock")
            .get(&e)
            .cloned()
    }

    /// Expert `e`'s fetching turn (at most one per expert of the model, kept).
    fn expert_turn(&self, e: u32) -> Arc<tokio::sync::Mutex<()>> {
        self.turns
            .lock()
            .expect("turns lock")
            .entry(e)
            .or_default()
            .clone()
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

/// The expert tensors of a checkpoint, in the order their pieces travel (MoE layers
/// ascending): a fused one's `gate_up_proj` then `down_proj` (every expert in each), or an
/// unfused one's `experts.{e}.{gate,up,down}_proj.weight`, each FP8 with its
/// `weight_scale` (as f32, `[out, 1]`) or in the checkpoint's dtype. Name, dtype, shape and
/// the expert of each.
fn cache_layout(c: &TextConfig, dtype: &'static str) -> Vec<TensorSpec> {
    let (e, h, i) = (
        c.num_local_experts as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
    );
    let spec = |name, dtype, shape, expert| TensorSpec {
        name,
        dtype,
        shape,
        expert,
    };
    let mut out = Vec::new();
    for l in &c.moe_layers {
        let p = format!("model.layers.{l}.feed_forward.experts");
        let Some(q) = &c.quantization else {
            out.push(spec(
                format!("{p}.gate_up_proj"),
                dtype,
                vec![e, h, 2 * i],
                None,
            ));
            out.push(spec(format!("{p}.down_proj"), dtype, vec![e, i, h], None));
            continue;
        };
        for x in 0..e as u32 {
            for (name, rows, cols) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
            {
                let module = format!("{p}.{x}.{name}");
                if q.is_quantized(&module) {
                    out.push(spec(
                        format!("{module}.weight"),
                        "F8_E4M3",
                        vec![rows, cols],
                        Some(x),
                    ));
                    out.push(spec(
                        format!("{module}.weight_scale"),
                        "F32",
                        vec![rows, 1],
                        Some(x),
                    ));
                } else {
                    out.push(spec(
                        format!("{module}.weight"),
                        dtype,
                        vec![rows, cols],
                        Some(x),
                    ));
                }
            }
        }
    }
    out
}

/// Where fetched experts are written: a [`WeightFile`] of every expert tensor at its full
/// shape, sparse until written.
#[derive(Debug)]
pub struct ExpertCache {
    file: WeightFile,
    /// The model's config: an unfused expert is read anew from the file once fetched
    /// ([`ExpertCache::reread`]).
    config: TextConfig,
}

impl ExpertCache {
    /// Makes the cache for `config`'s experts in memory, or with `dir` in a file there (a
    /// previous cache file there is replaced; nothing else in `dir` is touched). The
    /// checkpoint's dtype comes from the config (`torch_dtype`; bf16 when it says nothing);
    /// an FP8 checkpoint's experts are FP8 where `quantization_config` says so.
    pub fn create(dir: Option<&Path>, config: &TextConfig) -> Result<Self, TransferError> {
        let dtype = match config.dtype.as_deref() {
            None | Some("bfloat16") => "BF16",
            Some("float32") => "F32",
            Some(other) => {
                return Err(TransferError::Unsupported(format!("torch_dtype {other}")));
            }
        };
        Ok(Self {
            file: match dir {
                Some(dir) => WeightFile::create(dir, cache_layout(config, dtype))?,
                None => WeightFile::in_memory(cache_layout(config, dtype))?,
            },
            config: config.clone(),
        })
    }

    /// The cache mapped as a checkpoint, for the shard that computes with it.
    pub fn weights(&self) -> &expertmesh_model::SafetensorsCheckpoint {
        self.file.weights()
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
            let w = ExpertWeights::load(self.weights(), &self.config, l, e as usize)
                .map_err(|err| TransferError::Image(format!("expert {e}: {err}")))?;
            out.insert(l as u32, w);
        }
        Ok(Some(out))
    }

    /// Removes the cache file's name once the shard has mapped it ([`WeightFile::unlink`]).
    pub fn unlink(&self) -> Result<(), TransferError> {
        self.file.unlink()
    }

    /// The directory the cache file is in (none in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.file.dir()
    }

    /// Bytes of one expert over every MoE layer.
    pub fn expert_bytes(&self) -> u64 {
        self.file
            .expert_regions(0)
            .iter()
            .map(|(_, start, end)| end - start)
            .sum()
    }
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
                        bytes: weight.clone(),
                    });
                    // The scales as the shard holds them: f32, widened exactly from the
                    // checkpoint's bf16/f16/f32, so the receiver computes the same bits.
                    if let Some(scale) = linear.fp8_scale() {
                        pieces.push(Piece {
                            tensor: format!("{module}.weight_scale"),
                            dtype: expertmesh_model::DType::F32,
                            shape: vec![scale.len(), 1],
                            base: 0,
                            bytes: expertmesh_model::Tensor::from_bytes(
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
                bytes: slice,
            });
        }
    }
    Ok(pieces)
}

/// The CRC-32 of expert `e`'s bytes in the order they travel: what the coordinators record
/// from workers with the checkpoint's files, and what a fetched expert must match. Reads
/// every byte of the expert once, and keeps each chunk's CRC for sending it.
pub fn expert_digest(shard: &ExpertShard, e: u32) -> Result<u32, TransferError> {
    let (crcs, whole) = crate::weight_file::chunk_crcs(&expert_pieces(shard, e)?);
    shard.transfers().keep_chunk_crcs(e, crcs);
    Ok(whole)
}

/// Why a worker will not send the experts asked of it.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{asked} experts asked for (the model has {experts})")]
    TooMany { asked: usize, experts: usize },
    #[error("expert {0} is not held here")]
    NotHeld(u32),
    #[error(transparent)]
    Unsupported(TransferError),
}

/// The chunks of `experts`, one after another, as this shard sends them (made one at a time
/// as they go); refused whole when one of them is not held here.
pub fn chunks_to_send(
    shard: &ExpertShard,
    experts: &[u32],
) -> Result<impl Iterator<Item = pb::WeightChunk> + Send + 'static, Refusal> {
    if experts.len() > shard.num_experts() {
        return Err(Refusal::TooMany {
            asked: experts.len(),
            experts: shard.num_experts(),
        });
    }
    let mut chunks = Vec::new();
    for &e in experts {
        if !shard.holds(e) {
            return Err(Refusal::NotHeld(e));
        }
        chunks.push(expert_chunks(shard, e).map_err(Refusal::Unsupported)?);
    }
    Ok(chunks.into_iter().flatten())
}

/// The chunks of expert `e` as this shard holds it, made one at a time as they are sent.
pub fn expert_chunks(
    shard: &ExpertShard,
    e: u32,
) -> Result<impl Iterator<Item = pb::WeightChunk> + Send + 'static, TransferError> {
    Ok(crate::weight_file::chunks(
        expert_pieces(shard, e)?,
        e,
        shard.transfers().chunk_crcs(e),
    ))
}

/// The peer expert worker at `address` as a source over `transport`: `grpc`
/// ([`GrpcSource`]) or, for any other, the port's framed form
/// ([`crate::framed_fetch::FramedSource`]).
pub fn source(transport: Transport, address: &str) -> Result<Arc<dyn ExpertSource>, TransferError> {
    Ok(match transport {
        Transport::Grpc => Arc::new(GrpcSource::new(address)?),
        _ => Arc::new(crate::framed_fetch::FramedSource::new(address)),
    })
}

/// A stream of one expert's chunks from a peer.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, TransferError>> + Send>>;

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
        Ok(crate::weight_file::from_peer(&self.address, stream))
    }
}

/// Takes expert `e` from `stream` into `cache`, checking every chunk against the piece it
/// must be and the whole expert against the sender's CRC and `digest` (the coordinators'
/// record, when they have one), counting verified bytes in `progress`; what arrived, once
/// all of it has and has been verified.
pub async fn receive(
    cache: &ExpertCache,
    e: u32,
    digest: Option<u32>,
    peer: &str,
    mut stream: ChunkStream,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<Arrived, TransferError> {
    let what = format!("expert {e}");
    if e as usize >= cache.config.num_local_experts {
        return Err(TransferError::Corrupt {
            what,
            peer: peer.to_owned(),
            reason: "no such expert".into(),
        });
    }
    let regions = cache.file.expert_regions(e);
    let arrived = crate::weight_file::receive(
        &cache.file,
        &regions,
        e,
        (&what, peer),
        &mut stream,
        progress,
    )
    .await?;
    if digest.is_some_and(|d| d != arrived.whole.clone().finalize()) {
        return Err(TransferError::Corrupt {
            what,
            peer: peer.to_owned(),
            reason: "the whole expert is not the checkpoint's: its CRC differs from the digest the coordinators hold".into(),
        });
    }
    Ok(arrived)
}

/// Fetches expert `e` into `cache` from the first of `sources` that sends it whole, intact
/// and matching `digest` (a failed or corrupt transfer moves on to the next); marks it
/// held in `shard`. The bytes and who sent them (none when it was held already).
pub async fn fetch_expert(
    shard: &ExpertShard,
    cache: &ExpertCache,
    e: u32,
    digest: Option<u32>,
    sources: &[Arc<dyn ExpertSource>],
) -> Result<(u64, String), TransferError> {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = shard.transfers();
    // One fetch of an expert at a time (a placement's gains and the backups may both want
    // it): a second one finds it held, and a held expert's bytes are never written again.
    let turn = stats.expert_turn(e);
    let _turn = turn.lock().await;
    if shard.holds(e) {
        return Ok((0, String::new()));
    }
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
        let outcome = outcome.and_then(|arrived| {
            if let Some(weights) = cache.reread(e)? {
                shard.replace_expert(e, weights);
            }
            Ok(arrived)
        });
        match outcome {
            Ok(Arrived {
                bytes, chunk_crcs, ..
            }) => {
                stats.keep_chunk_crcs(e, chunk_crcs);
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
        what: format!("expert {e}"),
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
/// every other live expert worker (a worker with the checkpoint can send any expert), each
/// over `transport` ([`source`]). `peers` keeps one source per address across calls.
///
/// [`ClusterView::transfer_sources`]: expertmesh_coordinator::ClusterView::transfer_sources
pub fn sources_for(
    view: &expertmesh_coordinator::ClusterView,
    me: u64,
    e: u32,
    planned: Option<u64>,
    transport: Transport,
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
                peers.insert(address.to_owned(), source(transport, address).ok()?);
            }
            peers.get(address).cloned()
        })
        .collect()
}
