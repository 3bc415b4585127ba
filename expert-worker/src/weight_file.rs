//! Weights on their way between workers, whatever they are (an expert's slices, an attention
//! worker's dense tensors): the sender cuts tensors into [`pb::WeightChunk`]s ([`chunks`]);
//! the receiver writes them into a [`WeightFile`], a safetensors image laid out in advance
//! (in memory, or in a file) whose data stays a hole until written, checking each chunk
//! against the piece due next (tensor, offset, length, dtype, shape) and its CRC-32 before
//! writing it, and the whole set's CRC-32 and size at the end ([`receive`]). The image is
//! mapped as a checkpoint, so what arrives is computed exactly as what is read from a model
//! directory.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use expertmesh_model::landing::Landing;
use expertmesh_model::{DType, SafetensorsCheckpoint, Tensor};
use expertmesh_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::transfer::{ChunkStream, TransferError};

/// The most bytes of one chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How long the next chunk may keep the receiver waiting (a stalled sender is left sooner).
const CHUNK_DEADLINE: Duration = Duration::from_secs(10);

/// The safetensors name of a dtype.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F8E4M3 => "F8_E4M3",
    }
}

/// Bytes per element of a safetensors dtype the engine reads.
pub fn dtype_bytes(name: &str) -> Option<u64> {
    match name {
        "F8_E4M3" => Some(1),
        "BF16" | "F16" => Some(2),
        "F32" => Some(4),
        _ => None,
    }
}

/// One tensor of a weight file: its name, dtype, whole shape, and whose it is (an
/// unfused checkpoint's expert tensor: that expert; a fused expert tensor, whose first
/// dimension is the expert, or a dense tensor: `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub expert: Option<u32>,
}

/// A tensor of the file and where its bytes are.
#[derive(Debug, Clone)]
pub struct Slot {
    pub spec: TensorSpec,
    file_offset: u64,
    bytes: u64,
}

impl Slot {
    /// Where expert `e`'s bytes are in this tensor (`[start, end)`), if anywhere.
    fn expert_region(&self, e: u32) -> Option<(u64, u64)> {
        match self.spec.expert {
            None => {
                let experts = self.spec.shape[0];
                let stride = self.bytes / experts;
                (u64::from(e) < experts)
                    .then(|| (u64::from(e) * stride, (u64::from(e) + 1) * stride))
            }
            Some(x) => (x == e).then_some((0, self.bytes)),
        }
    }
}

/// A piece of a tensor as it travels: the file tensor's name, dtype and whole shape, where
/// the piece starts in it, and its bytes.
pub struct Piece {
    pub tensor: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub base: u64,
    pub bytes: Tensor,
}

/// A held tensor's bytes, shared with the chunks that send them.
struct Held(Tensor);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// Where each chunk of a piece of `len` bytes starts and ends in it, in the order they
/// travel: [`CHUNK_BYTES`] each, the last what is left.
fn chunk_spans(len: usize) -> impl ExactSizeIterator<Item = std::ops::Range<usize>> {
    (0..len.div_ceil(CHUNK_BYTES)).map(move |k| k * CHUNK_BYTES..((k + 1) * CHUNK_BYTES).min(len))
}

/// The CRC-32 of every chunk of `pieces` in the order [`chunks`] sends them, and of them
/// all: what a holder works out once (the whole is the expert's digest) and sends with the
/// chunks thereafter, so that sending reads each byte once, to copy it, and the fetcher's
/// check covers the bytes from when they were digested to when they land.
pub fn chunk_crcs(pieces: &[Piece]) -> (Vec<u32>, u32) {
    let mut whole = crc32fast::Hasher::new();
    let crcs = pieces
        .iter()
        .flat_map(|p| {
            let bytes = p.bytes.bytes();
            chunk_spans(bytes.len()).map(move |span| &bytes[span])
        })
        .map(|chunk| {
            let crc = crc32fast::hash(chunk);
            fold(&mut whole, crc, chunk.len());
            crc
        })
        .collect();
    (crcs, whole.finalize())
}

/// Folds a chunk of `len` bytes whose CRC-32 is `crc` into the CRC of the whole before it.
fn fold(whole: &mut crc32fast::Hasher, crc: u32, len: usize) {
    whole.combine(&crc32fast::Hasher::new_with_initial_len(crc, len as u64));
}

/// `pieces` as chunks of at most [`CHUNK_BYTES`], made one at a time as they are sent, the
/// last with the CRC-32 and size of them all; `expert` is the expert they are (0 for dense
/// weights). `known` is every chunk's CRC as [`chunk_crcs`] gave it when the holder digested
/// the same bytes (each chunk's is worked out as it goes when there are none, or not one per
/// chunk).
pub fn chunks(
    pieces: Vec<Piece>,
    expert: u32,
    known: Option<std::sync::Arc<[u32]>>,
) -> impl Iterator<Item = pb::WeightChunk> + Send {
    let total: u64 = pieces.iter().map(|p| p.bytes.size_bytes() as u64).sum();
    let count: usize = pieces
        .iter()
        .map(|p| chunk_spans(p.bytes.size_bytes()).len())
        .sum();
    let known = known.filter(|k| k.len() == count);
    let mut whole = crc32fast::Hasher::new();
    let mut sent = 0u64;
    pieces
        .into_iter()
        .flat_map(|piece| {
            // The chunks are views of the held tensor (the mapped checkpoint or cache):
            // their bytes are copied once, into the frame.
            let spans = chunk_spans(piece.bytes.size_bytes());
            let bytes = bytes::Bytes::from_owner(Held(piece.bytes));
            let (tensor, dtype, shape, base) = (piece.tensor, piece.dtype, piece.shape, piece.base);
            spans.map(move |span| {
                (
                    tensor.clone(),
                    dtype,
                    shape.clone(),
                    base + span.start as u64,
                    bytes.slice(span),
                )
            })
        })
        .enumerate()
        .map(move |(i, (tensor, dtype, shape, offset, data))| {
            let crc = match &known {
                Some(k) => k[i],
                None => crc32fast::hash(&data),
            };
            fold(&mut whole, crc, data.len());
            sent += data.len() as u64;
            let last = sent == total;
            pb::WeightChunk {
                expert,
                tensor,
                dtype: dtype_name(dtype).into(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                offset,
                crc32: crc,
                data,
                last,
                whole_crc32: if last { whole.clone().finalize() } else { 0 },
                whole_bytes: if last { total } else { 0 },
                refused: String::new(),
            }
        })
}

/// A safetensors image of the given tensors at their whole shapes, laid out in advance and
/// mapped as a checkpoint, whose data stays a hole until written: in memory (the default,
/// [`expertmesh_model::landing`]) or in `dir/model.safetensors`.
#[derive(Debug)]
pub struct WeightFile {
    backing: Backing,
    slots: Vec<Slot>,
    mapped: std::sync::Arc<SafetensorsCheckpoint>,
}

/// Where a [`WeightFile`]'s bytes are.
#[derive(Debug)]
enum Backing {
    Memory(std::sync::Arc<Landing>),
    File {
        dir: PathBuf,
        file: std::sync::Arc<std::fs::File>,
        /// One writer at a time (see [`WeightFile::write`]).
        writing: tokio::sync::Mutex<()>,
        /// Whether `create` made the directory (`unlink` then removes it too).
        made_dir: bool,
    },
}

/// The safetensors header of `tensors` laid out one after the other (8-byte aligned, as
/// safetensors writers leave it), and each tensor's slot.
fn layout(tensors: Vec<TensorSpec>) -> (Vec<u8>, Vec<Slot>, u64) {
    let mut header = serde_json::Map::new();
    let mut slots = Vec::new();
    let mut at = 0u64;
    for spec in tensors {
        let size = dtype_bytes(spec.dtype).expect("the layout's dtypes are the engine's");
        let bytes = spec.shape.iter().product::<u64>() * size;
        header.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": spec.dtype, "shape": spec.shape, "data_offsets": [at, at + bytes]}),
        );
        slots.push(Slot {
            spec,
            file_offset: at,
            bytes,
        });
        at += bytes;
    }
    let mut head = serde_json::to_vec(&header).expect("a JSON map serializes");
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let data_start = 8 + head.len() as u64;
    for s in &mut slots {
        s.file_offset += data_start;
    }
    let mut image_head = (head.len() as u64).to_le_bytes().to_vec();
    image_head.extend(head);
    (image_head, slots, data_start + at)
}

impl WeightFile {
    /// Lays the image of `tensors` out in memory.
    pub fn in_memory(tensors: Vec<TensorSpec>) -> Result<Self, TransferError> {
        let (head, slots, len) = layout(tensors);
        let memory = |e: expertmesh_model::ModelError| TransferError::Image(e.to_string());
        let landing = std::sync::Arc::new(Landing::new(len as usize).map_err(memory)?);
        // SAFETY: the landing is new: nothing reads it yet.
        #[allow(unsafe_code)]
        let fits = unsafe { landing.write(0, &head) };
        assert!(fits, "the header fits");
        let mapped = SafetensorsCheckpoint::landed(landing.clone()).map_err(memory)?;
        Ok(Self {
            backing: Backing::Memory(landing),
            slots,
            mapped: mapped.into(),
        })
    }

    /// Makes the file for `tensors` in `dir` (a previous file there is replaced; nothing
    /// else in `dir` is touched) and maps it.
    pub fn create(dir: &Path, tensors: Vec<TensorSpec>) -> Result<Self, TransferError> {
        let io = |source| TransferError::Cache {
            path: dir.to_owned(),
            source,
        };
        let made_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("model.safetensors");
        // A previous run's file: its weights are fetched again (nothing vouches for them).
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let (head, slots, len) = layout(tensors);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        file.write_all_at(&head, 0)
            .and_then(|()| file.set_len(len))
            .map_err(io)?;
        let mapped = SafetensorsCheckpoint::open(dir)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?
            .into();
        Ok(Self {
            backing: Backing::File {
                dir: dir.to_owned(),
                file: std::sync::Arc::new(file),
                writing: tokio::sync::Mutex::new(()),
                made_dir,
            },
            slots,
            mapped,
        })
    }

    /// The image mapped as a checkpoint.
    pub fn weights(&self) -> &SafetensorsCheckpoint {
        &self.mapped
    }

    /// The same, to keep beyond the image's handle.
    pub fn shared_weights(&self) -> std::sync::Arc<SafetensorsCheckpoint> {
        self.mapped.clone()
    }

    /// The directory the file is in (none in memory).
    pub fn dir(&self) -> Option<&Path> {
        match &self.backing {
            Backing::File { dir, .. } => Some(dir),
            Backing::Memory(_) => None,
        }
    }

    /// Expert `e`'s regions of the image in the order its pieces travel: each tensor and the
    /// byte range of it that is the expert's.
    pub fn expert_regions(&self, e: u32) -> Vec<(&Slot, u64, u64)> {
        self.slots
            .iter()
            .filter_map(|s| s.expert_region(e).map(|(start, end)| (s, start, end)))
            .collect()
    }

    /// Every tensor of the image, whole, in the order they were laid out.
    pub fn all_regions(&self) -> Vec<(&Slot, u64, u64)> {
        self.slots.iter().map(|s| (s, 0, s.bytes)).collect()
    }

    /// Removes a file's name (and the directory, when `create` made it) once what uses it
    /// has mapped it: the writes and the map share the file, which the system frees when the
    /// worker exits, however it exits. Nothing is left on disk. Nothing to do in memory.
    pub fn unlink(&self) -> Result<(), TransferError> {
        let Backing::File { dir, made_dir, .. } = &self.backing else {
            return Ok(());
        };
        std::fs::remove_file(dir.join("model.safetensors")).map_err(|source| {
            TransferError::Cache {
                path: dir.clone(),
                source,
            }
        })?;
        if *made_dir {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    /// Writes a checked chunk at `offset` of `slot`. Only [`receive`] writes, into regions
    /// of weights nobody computes with yet (an expert not held, dense weights before the
    /// model is built), one transfer per region at a time.
    async fn write(
        &self,
        slot: &Slot,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<(), TransferError> {
        let at = slot.file_offset + offset;
        let (dir, file, writing) = match &self.backing {
            Backing::Memory(landing) => {
                // SAFETY: `receive` writes a region only while no tensor over it is read
                // (see above), and `data` is the chunk's own buffer.
                #[allow(unsafe_code)]
                let fits = unsafe { landing.write(at as usize, &data) };
                assert!(fits, "a slot's region inside the image");
                return Ok(());
            }
            Backing::File {
                dir, file, writing, ..
            } => (dir, file.clone(), writing),
        };
        // One writer at a time: the filesystem serializes writes to one file anyway (the
        // inode lock), and a writer left to wait there spins on the core the network needs.
        // The others wait here without holding a runtime thread, and the write itself runs
        // off the runtime, so the transfers keep reading their sockets meanwhile.
        let _turn = writing.lock().await;
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| TransferError::Cache {
                path: dir.clone(),
                source,
            })
    }
}

/// A peer's server stream with its errors as [`TransferError::Peer`]s naming the peer.
pub fn from_peer<T: Send + 'static>(
    peer: &str,
    stream: tonic::Streaming<T>,
) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, TransferError>> + Send>> {
    let peer = peer.to_owned();
    Box::pin(stream.map(move |r| {
        r.map_err(|s| TransferError::Peer {
            peer: peer.clone(),
            reason: s.to_string(),
        })
    }))
}

/// Takes `regions` of `file` from `stream`, in order, checking every chunk against the piece
/// it must be (of `expert`, 0 for dense weights) and its CRC, counting verified bytes in
/// `progress`, and the whole against the sender's CRC: what arrived, once all has and has been
/// verified; `what` names it in errors.
pub async fn receive(
    file: &WeightFile,
    regions: &[(&Slot, u64, u64)],
    expert: u32,
    (what, peer): (&str, &str),
    stream: &mut ChunkStream,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<Arrived, TransferError> {
    let corrupt = |reason: String| TransferError::Corrupt {
        what: what.to_owned(),
        peer: peer.to_owned(),
        reason,
    };
    let total: u64 = regions.iter().map(|(_, start, end)| end - start).sum();
    let mut whole = crc32fast::Hasher::new();
    let mut got = 0u64;
    let mut chunk_crcs = Vec::new();
    for &(slot, start, end) in regions {
        let spec = &slot.spec;
        let mut at = start;
        while at < end {
            let chunk = match tokio::time::timeout(CHUNK_DEADLINE, stream.next()).await {
                Err(_) => return Err(corrupt("the stream stalled".into())),
                Ok(None) => {
                    return Err(corrupt(format!(
                        "the stream ended at {} of {}",
                        spec.name, at
                    )))
                }
                Ok(Some(chunk)) => chunk?,
            };
            let expected = (end - at).min(CHUNK_BYTES as u64);
            if chunk.expert != expert
                || chunk.tensor != spec.name
                || chunk.offset != at
                || chunk.data.len() as u64 != expected
                || chunk.dtype != spec.dtype
                || chunk.shape != spec.shape
            {
                return Err(corrupt(format!(
                    "a chunk of {} {:?} at {} ({} bytes) where {} {} at {at} ({expected} bytes) was due",
                    chunk.tensor,
                    chunk.shape,
                    chunk.offset,
                    chunk.data.len(),
                    spec.name,
                    spec.dtype,
                )));
            }
            let mut crc = crc32fast::Hasher::new();
            crc.update(&chunk.data);
            if crc.clone().finalize() != chunk.crc32 {
                return Err(corrupt(format!(
                    "the chunk of {} at {at} fails its CRC",
                    spec.name
                )));
            }
            file.write(slot, at, chunk.data).await?;
            whole.combine(&crc);
            chunk_crcs.push(chunk.crc32);
            got += expected;
            progress.store(got, std::sync::atomic::Ordering::Relaxed);
            at += expected;
            let last = got == total;
            if chunk.last != last {
                return Err(corrupt(format!("the last chunk came after {got} bytes")));
            }
            if last && (chunk.whole_crc32 != whole.clone().finalize() || chunk.whole_bytes != got) {
                return Err(corrupt(format!("the whole of {what} fails its CRC")));
            }
        }
    }
    Ok(Arrived {
        whole,
        bytes: got,
        chunk_crcs,
    })
}

/// What [`receive`] took in: the whole's CRC-32, its bytes, and each chunk's CRC-32 in order
/// (what [`chunk_crcs`] gives for the same bytes, for sending them on).
#[derive(Debug)]
pub struct Arrived {
    pub whole: crc32fast::Hasher,
    pub bytes: u64,
    pub chunk_crcs: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of `lens` bytes, every byte different from its neighbours.
    fn pieces(lens: &[usize]) -> Vec<Piece> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| Piece {
                tensor: format!("t{i}"),
                dtype: DType::BF16,
                shape: vec![len / 2],
                base: 0,
                bytes: Tensor::from_bytes(
                    DType::BF16,
                    vec![len / 2],
                    (0..len).map(|b| (b * 31 + i * 7 + b / 251) as u8).collect(),
                ),
            })
            .collect()
    }

    #[test]
    fn kept_chunk_crcs_are_what_sending_works_out_and_fold_into_the_whole() {
        // Pieces of several chunks, one of less than a chunk, one cut mid-chunk.
        let lens = [2 * CHUNK_BYTES + 10, 4096, CHUNK_BYTES];
        let (crcs, whole) = chunk_crcs(&pieces(&lens));
        let all: Vec<u8> = pieces(&lens)
            .iter()
            .flat_map(|p| p.bytes.bytes().to_vec())
            .collect();
        assert_eq!(whole, crc32fast::hash(&all));
        assert_eq!(crcs.len(), 3 + 1 + 1);
        let anew: Vec<pb::WeightChunk> = chunks(pieces(&lens), 4, None).collect();
        let kept: Vec<pb::WeightChunk> =
            chunks(pieces(&lens), 4, Some(crcs.clone().into())).collect();
        assert_eq!(kept, anew);
        assert_eq!(anew.iter().map(|c| c.crc32).collect::<Vec<_>>(), crcs);
        let last = anew.last().unwrap();
        assert_eq!(
            (last.whole_crc32, last.whole_bytes),
            (whole, all.len() as u64)
        );
        // Kept CRCs are what is sent, not worked out again: ones that no longer match the
        // bytes (memory changed since the digest) go out as kept, for the fetcher to refuse.
        let stale: Vec<u32> = crcs.iter().map(|c| c ^ 1).collect();
        let sent: Vec<u32> = chunks(pieces(&lens), 4, Some(stale.clone().into()))
            .map(|c| c.crc32)
            .collect();
        assert_eq!(sent, stale);
        // CRCs that are not one per chunk are not used.
        let short: Vec<pb::WeightChunk> =
            chunks(pieces(&lens), 4, Some(crcs[1..].into())).collect();
        assert_eq!(short, anew);
    }
}
