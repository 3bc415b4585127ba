//! The CUDA side (cargo feature `cuda`): finding the CUDA libraries without panicking,
//! probing a device, and the NVRTC-compiled kernels with their typed launches ([`launch`]);
//! [`backend`] supplies the operations of the one forward pass on a GPU (and owns the device
//! KV store), [`gemm`] its cuBLAS products, [`experts`] the GPU expert shard, [`nccl`] the links of the
//! NCCL `Dispatch`, [`bench`] the GPU benchmarks.
//!
//! cudarc loads its libraries dynamically and panics when one is missing, so nothing here
//! calls cudarc before [`preload`] has found the library: it searches
//! `EXPERTMESH_CUDA_LIB_DIRS`, `LD_LIBRARY_PATH`, the usual system directories and the
//! `nvidia/*/lib` directories of Python packages (`pip install nvidia-cuda-nvrtc-cu12` gives
//! CPU machines NVRTC), and loads it by path; cudarc's later load by name then finds it
//! already loaded.

pub mod backend;
pub mod bench;
pub mod experts;
pub mod gemm;
pub mod launch;
pub mod nccl;

pub use backend::CudaBackend;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The kernels' source (see the file for each kernel's CPU counterpart).
pub const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block of `attention_paged` (`ATT_WARPS` warps in the kernel source).
pub const ATTENTION_THREADS: u32 = 256;
/// The largest head dimension `attention_paged` takes (32 · `ATT_PER_LANE`).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;

/// Every kernel in [`KERNELS`].
pub const KERNEL_NAMES: &[&str] = &[
    "rms_norm",
    "head_rms_norm",
    "rope_interleaved",
    "swiglu",
    "router_top1_sigmoid",
    "scale_rows",
    "f32_to_bf16_copy",
    "bf16_to_f32_copy",
    "fill_random_bf16",
    "attention_paged",
    "add_in_place",
    "kv_cache_write",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error(
        "the CUDA library {name} was not found (searched {searched}); install the CUDA \
         driver or toolkit, or point EXPERTMESH_CUDA_LIB_DIRS at the directory holding it"
    )]
    LibraryMissing { name: String, searched: String },
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    #[error("no CUDA device {ordinal} (this machine has {count})")]
    NoDevice { ordinal: usize, count: usize },
}

/// The library files looked for, by what they provide.
const LIBRARIES: &[(&str, &[&str])] = &[
    ("cuda", &["libcuda.so.1", "libcuda.so"]),
    (
        "nvrtc",
        &["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"],
    ),
    (
        "cublas",
        &["libcublas.so.12", "libcublas.so.13", "libcublas.so"],
    ),
    (
        "cublasLt",
        &["libcublasLt.so.12", "libcublasLt.so.13", "libcublasLt.so"],
    ),
    ("nccl", &["libnccl.so.2", "libnccl.so"]),
];

/// Directories that may hold CUDA libraries, in search order.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["EXPERTMESH_CUDA_LIB_DIRS", "LD_LIBRARY_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.extend(std::env::split_paths(&v));
        }
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/local/cuda/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(d.into());
    }
    // Python packages: <prefix>/lib/python3.*/site-packages/nvidia/*/lib.
    let mut prefixes: Vec<PathBuf> = vec!["/usr".into(), "/usr/local".into(), "/opt/conda".into()];
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        prefixes.push(home.join(".local"));
        if let Ok(versions) = std::fs::read_dir(home.join(".pyenv/versions")) {
            prefixes.extend(versions.flatten().map(|e| e.path()));
        }
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(v.into());
    }
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            let Ok(pythons) = std::fs::read_dir(prefix.join(lib)) else {
                continue;
            };
            for python in pythons.flatten() {
                for packages in ["site-packages", "dist-packages"] {
                    let nvidia = python.path().join(packages).join("nvidia");
                    if let Ok(parts) = std::fs::read_dir(&nvidia) {
                        dirs.extend(parts.flatten().map(|p| p.path().join("lib")));
                    }
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// Finds and loads the library providing `what` ("cuda", "nvrtc", "cublas", "cublasLt",
/// "nccl"), once per process; returns its path.
pub fn preload(what: &str) -> Result<PathBuf, CudaError> {
    static LOADED: OnceLock<std::sync::Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(Default::default);
    let mut loaded = loaded.lock().expect("library list lock");
    if let Some((_, path)) = loaded.iter().find(|(w, _)| w == what) {
        return Ok(path.clone());
    }
    let names = LIBRARIES
        .iter()
        .find(|(w, _)| *w == what)
        .map(|(_, n)| *n)
        .ok_or_else(|| CudaError::Driver(format!("unknown CUDA library {what}")))?;
    let dirs = library_dirs();
    for name in names {
        for dir in &dirs {
            let path = dir.join(name);
            if path.exists() && load(&path) {
                check_cudarc_finds(what, &path)?;
                loaded.push((what.to_owned(), path.clone()));
                return Ok(path);
            }
        }
    }
    Err(CudaError::LibraryMissing {
        name: names[0].to_owned(),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// cudarc loads its libraries by name (`libcublas.so`, `libcublas.so.12`, …, never
/// `libcublas.so.13` or `libnccl.so.2`) and panics when none loads; the dynamic linker
/// answers such a name with an already loaded library only when its SONAME matches. So
/// once a library is loaded by path, one of cudarc's names must reach it, or the run stops
/// here with the remedy instead of panicking later.
fn check_cudarc_finds(what: &str, path: &Path) -> Result<(), CudaError> {
    let candidates = cudarc::get_lib_name_candidates(what);
    // SAFETY: as in `load`: these are the same CUDA libraries, already initialised.
    #[allow(unsafe_code)]
    let found = candidates
        .iter()
        .any(|name| unsafe { libloading::Library::new(name) }.is_ok());
    if found {
        return Ok(());
    }
    Err(CudaError::Driver(format!(
        "found {} but cudarc loads it only as one of {}; put a directory with a link \
         named lib{what}.so to it first on LD_LIBRARY_PATH (scripts/gpu-check.sh does)",
        path.display(),
        candidates
            .iter()
            .filter(|c| c.starts_with("lib"))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Loads a shared library by path and keeps it loaded for the life of the process.
#[allow(unsafe_code)]
fn load(path: &Path) -> bool {
    // SAFETY: loading a CUDA library runs its initializers, which have no preconditions; the
    // handle is leaked on purpose so the library stays mapped for cudarc's later use.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// PTX for every kernel (NVRTC must be loadable: see [`preload`]).
pub fn compile_kernels() -> Result<cudarc::nvrtc::Ptx, CudaError> {
    preload("nvrtc")?;
    cudarc::nvrtc::compile_ptx_with_opts(
        KERNELS,
        cudarc::nvrtc::CompileOptions {
            name: Some("expertmesh_kernels.cu".into()),
            use_fast_math: Some(false),
            ..Default::default()
        },
    )
    .map_err(|e| CudaError::Compile(e.to_string()))
}

/// A device ready for GEMMs and kernels: probed, cuBLAS loaded, kernels compiled.
pub(crate) struct Opened {
    pub info: DeviceInfo,
    pub ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    pub stream: std::sync::Arc<cudarc::driver::CudaStream>,
    pub module: std::sync::Arc<cudarc::driver::CudaModule>,
    pub blas: cudarc::cublas::CudaBlas,
}

pub(crate) fn driver_error(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Opens device `ordinal` with the kernels loaded and a cuBLAS handle on its default stream.
pub(crate) fn open(ordinal: usize) -> Result<Opened, CudaError> {
    let info = probe(ordinal)?;
    preload("cublasLt")?;
    preload("cublas")?;
    let ptx = compile_kernels()?;
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(driver_error)?;
    let stream = ctx.default_stream();
    let module = ctx.load_module(ptx).map_err(driver_error)?;
    let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(driver_error)?;
    Ok(Opened {
        info,
        ctx,
        stream,
        module,
        blas,
    })
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
}

/// Checks that CUDA device `ordinal` can be used: the driver loads, the device exists.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    preload("cuda")?;
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| CudaError::Driver(e.to_string()))? as usize;
    if ordinal >= count {
        return Err(CudaError::NoDevice { ordinal, count });
    }
    let ctx =
        cudarc::driver::CudaContext::new(ordinal).map_err(|e| CudaError::Driver(e.to_string()))?;
    let name = ctx.name().map_err(|e| CudaError::Driver(e.to_string()))?;
    let total_memory = ctx
        .total_mem()
        .map_err(|e| CudaError::Driver(e.to_string()))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        total_memory,
    })
}
