//! Products with bf16 weights on the device, in one of two precisions:
//!
//! - [`Precision::F32`] (the default): the weight is widened to f32 in a workspace and the
//!   product runs in f32 (`CUBLAS_COMPUTE_32F_PEDANTIC`: no TF32, no reduced precision), so the
//!   GPU computes what the CPU backend computes up to the order of the sums — what the
//!   `transformers` reference (f32 compute on bf16 weights) and the golden tests ask for.
//! - [`Precision::Bf16`]: the activations are rounded to bf16 and the product runs on the
//!   tensor cores (bf16 operands, f32 accumulation and output): the fast path, off by bf16
//!   rounding of the activations.
//!
//! Matrices are row-major and given as device addresses; every call is queued on one stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::driver_error as err;
use super::CudaError;
use crate::checkpoint::{DType, Tensor};
use crate::linear::Layout;

/// How products with bf16 weights are computed (see the module).
pub use crate::device::GemmPrecision as Precision;

/// A tensor's values as bf16 bits (bf16 is copied as is; f32 and f16 are rounded).
pub(crate) fn bf16_bits(t: &Tensor) -> Vec<u16> {
    let b = t.bytes();
    match t.dtype {
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| {
                let v = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                half::bf16::from_f32(v).to_bits()
            })
            .collect(),
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits())
            .collect(),
        // Exact (e4m3 fits in bf16); only scale-less uses reach here, and none do today.
        DType::F8E4M3 => b
            .iter()
            .map(|&c| half::bf16::from_f32(crate::fp8::decode(c)).to_bits())
            .collect(),
    }
}

/// A weight matrix on the device in bf16, with its orientation (as `linear::Linear`).
pub struct DeviceWeight {
    pub data: CudaSlice<u16>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub layout: Layout,
}

impl DeviceWeight {
    /// Copies a 2-D tensor to the device.
    pub fn upload(stream: &Arc<CudaStream>, t: &Tensor, layout: Layout) -> Result<Self, CudaError> {
        let (in_dim, out_dim) = match layout {
            Layout::OutIn => (t.shape[1], t.shape[0]),
            Layout::InOut => (t.shape[0], t.shape[1]),
        };
        Ok(Self {
            data: stream.clone_htod(&bf16_bits(t)).map_err(err)?,
            in_dim,
            out_dim,
            layout,
        })
    }

    pub fn ptr(&self, stream: &CudaStream) -> u64 {
        self.data.device_ptr(stream).0
    }
}

/// A row-major f32 matrix on the device: address and leading dimension.
#[derive(Debug, Clone, Copy)]
pub struct MatPtr {
    pub ptr: u64,
    pub ld: usize,
}

/// The device address of a buffer (valid while the buffer lives; all work is on one stream).
pub fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// cuBLAS and the widening/narrowing kernels on one stream, with a reusable workspace.
pub struct Gemm {
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    widen: CudaFunction,
    narrow: CudaFunction,
    workspace: Mutex<Option<CudaSlice<u16>>>,
}

impl Gemm {
    pub fn new(
        stream: Arc<CudaStream>,
        blas: CudaBlas,
        module: &Arc<CudaModule>,
    ) -> Result<Self, CudaError> {
        Ok(Self {
            widen: module.load_function("bf16_to_f32_copy").map_err(err)?,
            narrow: module.load_function("f32_to_bf16_copy").map_err(err)?,
            stream,
            blas,
            workspace: Mutex::new(None),
        })
    }

    /// The workspace's address, grown to at least `bytes`. The lock is held only while the
    /// work is queued: stream order keeps one product's use before the next one's.
    fn workspace(&self, bytes: usize) -> Result<u64, CudaError> {
        let mut ws = self.workspace.lock().expect("workspace lock");
        let elems = bytes.div_ceil(2);
        if ws.as_ref().is_none_or(|w| w.len() < elems) {
            *ws = Some(self.stream.alloc_zeros::<u16>(elems).map_err(err)?);
        }
        Ok(addr(ws.as_ref().expect("workspace"), &self.stream))
    }

    /// `n` elements from `src` to `dst` through `f` (bf16 → f32 or f32 → bf16).
    #[allow(unsafe_code)]
    fn convert(&self, f: &CudaFunction, src: u64, dst: u64, n: usize) -> Result<(), CudaError> {
        let n = n as i64;
        // SAFETY: both addresses hold n elements of the kernel's types.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&src)
                .arg(&dst)
                .arg(&n)
                .launch(LaunchConfig::for_num_elems(n as u32))
        }
        .map(|_| ())
        .map_err(err)
    }

    /// `y[t, out] (+)= x[t, in] · W` for a weight in either layout; `accumulate` adds to `y`.
    /// `y` may be strided (`ld > out`); in bf16, `x` must be contiguous.
    pub fn linear(
        &self,
        precision: Precision,
        t: usize,
        x: MatPtr,
        w: &DeviceWeight,
        y: MatPtr,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        if t == 0 {
            return Ok(());
        }
        let (k, n) = (w.in_dim, w.out_dim);
        let (op_w, ld_w) = match w.layout {
            Layout::OutIn => (cublasOperation_t::CUBLAS_OP_T, k),
            Layout::InOut => (cublasOperation_t::CUBLAS_OP_N, n),
        };
        let w_ptr = w.ptr(&self.stream);
        match precision {
            Precision::F32 => {
                let ws = self.workspace(4 * k * n)?;
                self.convert(&self.widen, w_ptr, ws, k * n)?;
                self.gemm(
                    (op_w, ws, ld_w),
                    (x.ptr, x.ld),
                    (y.ptr, y.ld),
                    (t, n, k),
                    cudaDataType::CUDA_R_32F,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC,
                    accumulate,
                )
            }
            Precision::Bf16 => {
                if x.ld != k {
                    return Err(CudaError::Driver(format!(
                        "bf16 products take contiguous inputs (leading dimension {} for {k} columns)",
                        x.ld
                    )));
                }
                let ws = self.workspace(2 * t * k)?;
                self.convert(&self.narrow, x.ptr, ws, t * k)?;
                self.gemm(
                    (op_w, w_ptr, ld_w),
                    (ws, k),
                    (y.ptr, y.ld),
                    (t, n, k),
                    cudaDataType::CUDA_R_16BF,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    accumulate,
                )
            }
        }
    }

    /// Row-major `y[m, n] (+)= x[m, k] · W`: cuBLAS is column-major, so it computes
    /// `yᵀ[n, m] = op(W)[n, k] · xᵀ[k, m]`, `op` transposing an `[out, in]` weight.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    fn gemm(
        &self,
        (op_w, w, ld_w): (cublasOperation_t, u64, usize),
        (x, ld_x): (u64, usize),
        (y, ld_y): (u64, usize),
        (m, n, k): (usize, usize, usize),
        operand: cudaDataType,
        compute: cublasComputeType_t,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: the addresses point into live device buffers holding the described
        // matrices; the call is queued on this handle's stream before any buffer is freed.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op_w,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const c_void,
                w as *const c_void,
                operand,
                ld_w as i32,
                x as *const c_void,
                operand,
                ld_x as i32,
                (&beta) as *const f32 as *const c_void,
                y as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ld_y as i32,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(err)
    }
}
