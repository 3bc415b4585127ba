//! Where weights come from: the `WeightSource` seam, Hugging Face safetensors checkpoints
//! (memory-mapped, single file or sharded with an index) and an in-memory source for
//! synthetic models and tests.
//!
//! A `Tensor` is a typed view of bytes that stay where the checkpoint keeps them (the page
//! cache, for a mapped file) or, for the weights every token reads, in one huge-page copy
//! (`make_resident`): weights are never widened to f32 in memory, only tile by tile while a
//! product runs (see `linear`). Names are looked up as given and then with the
//! `language_model.` prefix that `Llama4ForConditionalGeneration` checkpoints carry.
#![allow(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::landing::Landing;

/// Element types the engine reads. Everything is computed in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
    /// FP8 e4m3fn: only quantized weights, which come with a scale
    /// ([`WeightSource::fp8_tensor`]); `tensor` refuses them so that no product reads
    /// FP8 bytes without their scale.
    F8E4M3,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F8E4M3 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
enum Storage {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
    Landed(Arc<Landing>),
}

/// A tensor's bytes and type; cloning shares the storage.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: Storage,
    start: usize,
    len: usize,
}

impl Tensor {
    /// A tensor that owns its little-endian bytes. Panics if the byte count does not match
    /// the shape: callers build these from data they made themselves.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(
            numel * dtype.size_bytes(),
            bytes.len(),
            "bytes do not match shape"
        );
        let len = bytes.len();
        Self {
            dtype,
            shape,
            storage: Storage::Owned(Arc::new(bytes)),
            start: 0,
            len,
        }
    }

    /// Rounds f32 values to bf16 (round to nearest even) and keeps them as a tensor.
    pub fn bf16_from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        Self::from_bytes(DType::BF16, shape, bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.storage {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
            Storage::Landed(l) => return l.bytes(self.start, self.len),
        };
        &all[self.start..self.start + self.len]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_bytes(&self) -> usize {
        self.len
    }

    /// The `index`-th slice along the first dimension (one expert of a fused tensor). It
    /// shares the storage, so only that slice's bytes are ever read.
    pub fn outer(&self, index: usize) -> Tensor {
        assert!(index < self.shape[0], "outer index out of range");
        let inner = self.len / self.shape[0];
        Tensor {
            dtype: self.dtype,
            shape: self.shape[1..].to_vec(),
            storage: self.storage.clone(),
            start: self.start + index * inner,
            len: inner,
        }
    }

    /// Widens elements `[offset, offset + out.len())` into `out`.
    pub fn read_f32(&self, offset: usize, out: &mut [f32]) {
        let size = self.dtype.size_bytes();
        let bytes = &self.bytes()[offset * size..(offset + out.len()) * size];
        widen(self.dtype, bytes, out);
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.read_f32(0, &mut out);
        out
    }
}

/// Alignment of a 2 MB huge page: where a resident arena's first tensor starts.
const HUGE_PAGE: usize = 2 << 20;

/// Copies the tensors' bytes into one anonymous mapping that the kernel is asked to back with
/// transparent huge pages (`MADV_HUGEPAGE`), each tensor 64-byte aligned, and points every
/// tensor there: weights read on every token then stream without a TLB miss per 4 KB page
/// (a one-token product over them measured 10–20% faster than from the mapped file's 4 KB
/// pages). The storage they came from is released once nothing else holds it. The bytes, and
/// so every product, are the same.
pub fn make_resident(tensors: &mut [&mut Tensor]) -> Result<()> {
    let offsets: Vec<usize> = tensors
        .iter()
        .scan(0usize, |at, t| {
            let o = *at;
            *at = (o + t.len).next_multiple_of(64);
            Some(o)
        })
        .collect();
    let total = tensors
        .last()
        .map_or(0, |t| offsets[offsets.len() - 1] + t.len);
    if total == 0 {
        return Ok(());
    }
    let memory = |source| ModelError::Memory {
        bytes: total,
        source,
    };
    let mut map = memmap2::MmapMut::map_anon(total + HUGE_PAGE).map_err(memory)?;
    // Without transparent huge pages in the kernel the copy still works, on 4 KB pages.
    let _ = map.advise(memmap2::Advice::HugePage);
    let base = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
    for (t, o) in tensors.iter().zip(&offsets) {
        map[base + o..base + o + t.len].copy_from_slice(t.bytes());
    }
    let map = Arc::new(map.make_read_only().map_err(memory)?);
    for (t, o) in tensors.iter_mut().zip(offsets) {
        t.storage = Storage::Mapped(map.clone());
        t.start = base + o;
    }
    Ok(())
}

/// Converts little-endian bf16/f16/f32 bytes to f32. bf16 → f32 is exact (a shift).
pub fn widen(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::BF16 => {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { widen_bf16_avx2(bytes, out) };
            }
            widen_bf16(bytes, out)
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F8E4M3 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = crate::fp8::decode(b);
            }
        }
    }
}

/// The same loop compiled for AVX2, where it becomes 8-lane shifts: widening is on the
/// decode hot path (every weight byte goes through it), and the portable build targets
/// baseline x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(bytes: &[u8], out: &mut [f32]) {
    widen_bf16(bytes, out)
}

#[inline(always)]
fn widen_bf16(bytes: &[u8], out: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, u16>(bytes) {
        Ok(bits) => {
            for (o, &b) in out.iter_mut().zip(bits) {
                *o = f32::from_bits(u32::from(u16::from_le(b)) << 16);
            }
        }
        Err(_) => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
    }
}

/// The seam between the engine and wherever weights live.
pub trait WeightSource: Send + Sync {
    /// The tensor called `name` (canonical name, without the `language_model.` prefix).
    fn tensor(&self, name: &str) -> Result<Tensor>;

    /// An FP8 (e4m3) tensor called `name`: `None` when the checkpoint has no FP8 tensor of
    /// that name (none at all, or one of another dtype, which `tensor` reads).
    fn fp8_tensor(&self, name: &str) -> Result<Option<Tensor>>;

    /// The tensor, checked against the shape the config implies.
    fn tensor_shaped(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.shape != expected {
            return Err(ModelError::TensorShape {
                name: name.into(),
                expected: expected.to_vec(),
                got: t.shape,
            });
        }
        Ok(t)
    }
}

/// Tensors held in memory, keyed by name; the fake weight source and the home of
/// synthetic benchmark models.
#[derive(Debug, Default, Clone)]
pub struct InMemoryWeights {
    tensors: HashMap<String, Tensor>,
}

impl InMemoryWeights {
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Drops a tensor (tests break checkpoints with it).
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The tensor stored under exactly `name` (as `names` gives it), whatever its dtype.
    pub fn stored(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
}

impl WeightSource for InMemoryWeights {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        lookup(&self.tensors, name)
    }

    fn fp8_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        lookup_fp8(&self.tensors, name)
    }
}

fn find<'t>(tensors: &'t HashMap<String, Tensor>, name: &str) -> Option<&'t Tensor> {
    tensors
        .get(name)
        .or_else(|| tensors.get(&format!("language_model.{name}")))
}

/// A tensor of a dtype products read as they are (FP8 ones need their scale).
fn lookup(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    match find(tensors, name) {
        Some(t) if t.dtype == DType::F8E4M3 => Err(ModelError::Quantized {
            name: name.into(),
            reason: "is F8_E4M3, but only routed experts may be FP8".into(),
        }),
        Some(t) => Ok(t.clone()),
        None => Err(ModelError::MissingTensor { name: name.into() }),
    }
}

fn lookup_fp8(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Option<Tensor>> {
    match find(tensors, name) {
        Some(t) if t.dtype == DType::F8E4M3 => Ok(Some(t.clone())),
        // Another dtype (a bf16 expert of a partly quantized checkpoint): `tensor` reads it.
        Some(_) | None => Ok(None),
    }
}

/// A Hugging Face safetensors checkpoint, memory-mapped.
#[derive(Debug)]
pub struct SafetensorsCheckpoint {
    tensors: HashMap<String, Tensor>,
    /// Tensors of a dtype the engine does not read, by name, with that dtype.
    unsupported: HashMap<String, String>,
}

impl SafetensorsCheckpoint {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            Self::open_sharded(dir, &index_path)
        } else if single.exists() {
            let mut ckpt = Self {
                tensors: HashMap::new(),
                unsupported: HashMap::new(),
            };
            ckpt.load_file(&single)?;
            Ok(ckpt)
        } else {
            Err(ModelError::io(
                single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ))
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(index_path).map_err(|e| ModelError::io(index_path, e))?;
        let index: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index_path.into(),
            source,
        })?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::MissingField {
                file: index_path.display().to_string(),
                field: "weight_map".into(),
            })?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::InvalidField {
                file: index_path.display().to_string(),
                field: format!("weight_map.{name}"),
                reason: "not a file name".into(),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(ModelError::InvalidField {
                    file: index_path.display().to_string(),
                    field: format!("weight_map.{name}"),
                    reason: format!("`{file}` is not a file in the model directory"),
                });
            }
            shards.insert(file.to_owned());
        }
        let mut ckpt = Self {
            tensors: HashMap::new(),
            unsupported: HashMap::new(),
        };
        for shard in shards {
            let path = dir.join(&shard);
            ckpt.load_file(&path)?;
        }
        let held = |n: &String| ckpt.tensors.contains_key(n) || ckpt.unsupported.contains_key(n);
        if let Some(name) = map.keys().find(|n| !held(n)) {
            return Err(ModelError::Safetensors {
                path: dir.join(map[name].as_str().unwrap_or_default()),
                reason: format!("the index lists `{name}` but the shard does not hold it"),
            });
        }
        Ok(ckpt)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The tensor stored under exactly `name` (as `names` gives it), whatever its dtype.
    pub fn stored(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
}

impl WeightSource for SafetensorsCheckpoint {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let prefixed = format!("language_model.{name}");
        if let Some(dtype) = self
            .unsupported
            .get(name)
            .or_else(|| self.unsupported.get(&prefixed))
        {
            return Err(ModelError::TensorDtype {
                name: name.into(),
                dtype: dtype.clone(),
            });
        }
        lookup(&self.tensors, name)
    }

    fn fp8_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        lookup_fp8(&self.tensors, name)
    }
}

impl SafetensorsCheckpoint {
    /// Maps one safetensors file and registers its tensors. The whole header is validated by
    /// the `safetensors` crate (offsets inside the file, sizes matching shapes) before any
    /// tensor is used.
    fn load_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only and the engine never writes through it. A checkpoint
        // file truncated by another process while mapped would fault on access; that is the
        // usual contract of memory-mapped model loading (safetensors, candle, llama.cpp).
        let mmap = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?);
        self.register(path, &mmap, || Storage::Mapped(mmap.clone()))
    }

    /// A safetensors image laid out in `landing` (its header written, its data arriving):
    /// its tensors read the landing's memory, as a mapped file's read the file.
    pub fn landed(landing: Arc<Landing>) -> Result<Self> {
        let mut ckpt = Self {
            tensors: HashMap::new(),
            unsupported: HashMap::new(),
        };
        let image = landing.bytes(0, landing.len());
        ckpt.register(Path::new("(landed in memory)"), image, || {
            Storage::Landed(landing.clone())
        })?;
        Ok(ckpt)
    }

    /// Registers the tensors of the safetensors `image` (from `path`), each over the
    /// storage `storage` makes. The whole header is validated by the `safetensors` crate
    /// (offsets inside the image, sizes matching shapes) before any tensor is used.
    fn register(&mut self, path: &Path, image: &[u8], storage: impl Fn() -> Storage) -> Result<()> {
        let bad = |reason: String| ModelError::Safetensors {
            path: path.into(),
            reason,
        };
        SafeTensors::deserialize(image).map_err(|e| bad(e.to_string()))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(image).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + header_len;
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                Dtype::BF16 => DType::BF16,
                Dtype::F16 => DType::F16,
                Dtype::F32 => DType::F32,
                Dtype::F8_E4M3 => DType::F8E4M3,
                other => {
                    self.unsupported.insert(name, format!("{other:?}"));
                    continue;
                }
            };
            let (begin, end) = info.data_offsets;
            self.tensors.insert(
                name,
                Tensor {
                    dtype,
                    shape: info.shape.clone(),
                    storage: storage(),
                    start: data_start + begin,
                    len: end - begin,
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_tensors_keep_their_bytes_aligned_in_one_mapping() {
        let made: Vec<Tensor> = [
            (DType::BF16, vec![3, 5]),
            (DType::F8E4M3, vec![7, 3]),
            (DType::F32, vec![4]),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (dtype, shape))| {
            let len = shape.iter().product::<usize>() * dtype.size_bytes();
            let bytes = (0..len).map(|b| (b * 31 + i) as u8).collect();
            Tensor::from_bytes(dtype, shape, bytes)
        })
        .collect();
        let mut moved = made.clone();
        make_resident(&mut moved.iter_mut().collect::<Vec<_>>()).unwrap();
        for (a, b) in made.iter().zip(&moved) {
            assert_eq!(a.bytes(), b.bytes());
            assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape));
            assert_eq!(b.bytes().as_ptr() as usize % 64, 0, "64-byte aligned");
        }
        assert_eq!(
            moved[0].bytes().as_ptr() as usize % HUGE_PAGE,
            0,
            "on a huge page"
        );
        // One slice of a resident tensor is that slice of the original.
        assert_eq!(made[1].outer(2).bytes(), moved[1].outer(2).bytes());
        make_resident(&mut []).unwrap();
    }
}
