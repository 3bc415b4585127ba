//! Routed experts on a GPU: an expert worker's shard with its experts' weights on the device
//! in bf16 (copied from the checkpoint on first use or when a placement is prepared), and
//! each routed batch computed as one cuBLAS GEMM pair per expert group (bf16 operands, f32
//! accumulation and output) around the SwiGLU kernel. Activations are rounded to bf16 for the
//! GEMMs, so results differ from the CPU backend (f32 activations) by bf16 rounding; the GPU
//! test states the tolerance.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::CudaError;
use crate::checkpoint::{DType, Tensor};
use crate::moe::{ExpertGroup, Experts};

use super::driver_error as err;

/// One expert's weights on the device, as bf16 bits.
struct ExpertWeights {
    /// `[hidden, 2·inter]`.
    gate_up: CudaSlice<u16>,
    /// `[inter, hidden]`.
    down: CudaSlice<u16>,
}

/// Experts of every MoE layer that this worker runs on one GPU.
pub struct GpuExperts {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    swiglu: CudaFunction,
    to_bf16: CudaFunction,
    hidden: usize,
    inter: usize,
    weights: Mutex<HashMap<(u32, u32), Arc<ExpertWeights>>>,
    /// "cuda:N name".
    pub device: String,
}

impl std::fmt::Debug for GpuExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExperts")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// A tensor's values as bf16 bits (bf16 is copied as is; f32 and f16 are rounded).
fn bf16_bits(t: &Tensor) -> Vec<u16> {
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
    }
}

impl GpuExperts {
    /// Opens device `ordinal` for experts of `hidden` × `inter`.
    pub fn new(ordinal: usize, hidden: usize, inter: usize) -> Result<Self, CudaError> {
        let super::Opened {
            info,
            stream,
            module,
            blas,
            ..
        } = super::open(ordinal)?;
        Ok(Self {
            blas,
            swiglu: module.load_function("swiglu").map_err(err)?,
            to_bf16: module.load_function("f32_to_bf16_copy").map_err(err)?,
            stream,
            hidden,
            inter,
            weights: Mutex::new(HashMap::new()),
            device: format!("cuda:{ordinal} {}", info.name),
        })
    }

    /// Copies expert `expert` of MoE layer `layer` to the device (once); returns the bytes
    /// copied (0 when it was there already).
    pub fn load(&self, layer: u32, expert: u32, experts: &Experts) -> Result<usize, CudaError> {
        Ok(self.weights_of(layer, expert, experts)?.1)
    }

    fn weights_of(
        &self,
        layer: u32,
        expert: u32,
        experts: &Experts,
    ) -> Result<(Arc<ExpertWeights>, usize), CudaError> {
        if let Some(w) = self
            .weights
            .lock()
            .expect("weights lock")
            .get(&(layer, expert))
        {
            return Ok((w.clone(), 0));
        }
        let e = expert as usize;
        let gate_up = bf16_bits(&experts.gate_up.outer(e));
        let down = bf16_bits(&experts.down.outer(e));
        let bytes = 2 * (gate_up.len() + down.len());
        let w = Arc::new(ExpertWeights {
            gate_up: self.stream.clone_htod(&gate_up).map_err(err)?,
            down: self.stream.clone_htod(&down).map_err(err)?,
        });
        self.weights
            .lock()
            .expect("weights lock")
            .insert((layer, expert), w.clone());
        Ok((w, bytes))
    }

    /// Row-major `c[m, n] = a[m, k] · b[k, n]` with bf16 `a` and `b` and f32 `c`, given as
    /// device addresses with leading dimensions (cuBLAS is column-major: `cᵀ = bᵀ · aᵀ`).
    #[allow(clippy::too_many_arguments, unsafe_code)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        c: u64,
        ldc: usize,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the addresses point into live device buffers that hold the described
        // sub-matrices; the call is queued on this stream, before the buffers are freed.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_N,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const c_void,
                b as *const c_void,
                cudaDataType::CUDA_R_16BF,
                ldb as i32,
                a as *const c_void,
                cudaDataType::CUDA_R_16BF,
                lda as i32,
                (&beta) as *const f32 as *const c_void,
                c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ldc as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(err)
    }

    /// f32 → bf16 on the device.
    #[allow(unsafe_code)]
    fn narrow(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<u16>) -> Result<(), CudaError> {
        let n = src.len() as i64;
        // SAFETY: the kernel reads and writes n elements of buffers holding n.
        unsafe {
            self.stream
                .launch_builder(&self.to_bf16)
                .arg(src)
                .arg(dst)
                .arg(&n)
                .launch(LaunchConfig::for_num_elems(n as u32))
        }
        .map(|_| ())
        .map_err(err)
    }

    /// Runs the groups of one routed batch of MoE layer `layer` (`inputs` is `[Σ rows,
    /// hidden]`, group after group); outputs in the same row order.
    #[allow(unsafe_code)]
    pub fn run_groups(
        &self,
        layer: u32,
        experts: &Experts,
        groups: &[ExpertGroup],
        inputs: &[f32],
    ) -> Result<Vec<f32>, CudaError> {
        let (h, i) = (self.hidden, self.inter);
        let rows: usize = groups.iter().map(|g| g.rows as usize).sum();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let s = &self.stream;
        let x = s.clone_htod(inputs).map_err(err)?;
        let mut xb = s.alloc_zeros::<u16>(rows * h).map_err(err)?;
        self.narrow(&x, &mut xb)?;
        let gu = s.alloc_zeros::<f32>(rows * 2 * i).map_err(err)?;
        let mut act = s.alloc_zeros::<f32>(rows * i).map_err(err)?;
        let mut actb = s.alloc_zeros::<u16>(rows * i).map_err(err)?;
        let y = s.alloc_zeros::<f32>(rows * h).map_err(err)?;
        let weights: Vec<Arc<ExpertWeights>> = groups
            .iter()
            .map(|g| Ok(self.weights_of(layer, g.expert, experts)?.0))
            .collect::<Result<_, CudaError>>()?;
        {
            let (xb_ptr, _g1) = xb.device_ptr(s);
            let (gu_ptr, _g2) = gu.device_ptr(s);
            let mut row = 0usize;
            for (g, w) in groups.iter().zip(&weights) {
                let t = g.rows as usize;
                let (w_ptr, _g) = w.gate_up.device_ptr(s);
                self.gemm(
                    t,
                    2 * i,
                    h,
                    xb_ptr + (row * h * 2) as u64,
                    h,
                    w_ptr,
                    2 * i,
                    gu_ptr + (row * 2 * i * 4) as u64,
                    2 * i,
                )?;
                row += t;
            }
        }
        let (rows_i, inter_i) = (rows as i32, i as i32);
        // SAFETY: swiglu reads rows × 2·inter and writes rows × inter values.
        unsafe {
            s.launch_builder(&self.swiglu)
                .arg(&gu)
                .arg(&mut act)
                .arg(&rows_i)
                .arg(&inter_i)
                .launch(LaunchConfig::for_num_elems((rows * i) as u32))
        }
        .map_err(err)?;
        self.narrow(&act, &mut actb)?;
        {
            let (a_ptr, _g1) = actb.device_ptr(s);
            let (y_ptr, _g2) = y.device_ptr(s);
            let mut row = 0usize;
            for (g, w) in groups.iter().zip(&weights) {
                let t = g.rows as usize;
                let (w_ptr, _g) = w.down.device_ptr(s);
                self.gemm(
                    t,
                    h,
                    i,
                    a_ptr + (row * i * 2) as u64,
                    i,
                    w_ptr,
                    h,
                    y_ptr + (row * h * 4) as u64,
                    h,
                )?;
                row += t;
            }
        }
        s.clone_dtoh(&y).map_err(err)
    }
}
