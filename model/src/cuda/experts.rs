//! Routed experts on a GPU: an expert worker's shard with its experts' weights on the device
//! in bf16 (copied from the checkpoint on first use or when a placement is prepared), and
//! each routed batch computed as one cuBLAS GEMM pair per expert group around the SwiGLU
//! kernel, in the chosen [`Precision`] (f32 by default: the CPU backend's results up to the
//! order of the sums; bf16: tensor cores, activations rounded to bf16).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::gemm::{addr, DeviceWeight, Gemm, MatPtr, Precision};
use super::CudaError;
use crate::linear::Layout;
use crate::moe::{ExpertGroup, Experts};

use super::driver_error as err;

/// One expert's weights on the device, as bf16 bits.
struct ExpertWeights {
    /// `[hidden, 2·inter]`.
    gate_up: DeviceWeight,
    /// `[inter, hidden]`.
    down: DeviceWeight,
}

/// Experts of every MoE layer that this worker runs on one GPU.
pub struct GpuExperts {
    gemm: Gemm,
    swiglu: CudaFunction,
    precision: Precision,
    hidden: usize,
    inter: usize,
    weights: Mutex<HashMap<(u32, u32), Arc<ExpertWeights>>>,
    /// One routed batch at a time on the device (cuBLAS handles are not re-entrant).
    running: Mutex<()>,
    /// "cuda:N name".
    pub device: String,
}

impl std::fmt::Debug for GpuExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExperts")
            .field("device", &self.device)
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

impl GpuExperts {
    /// Opens device `ordinal` for experts of `hidden` × `inter`.
    pub fn new(
        ordinal: usize,
        hidden: usize,
        inter: usize,
        precision: Precision,
    ) -> Result<Self, CudaError> {
        let super::Opened {
            info,
            stream,
            module,
            blas,
            ..
        } = super::open(ordinal)?;
        Ok(Self {
            gemm: Gemm::new(stream, blas, &module)?,
            swiglu: module.load_function("swiglu").map_err(err)?,
            precision,
            hidden,
            inter,
            weights: Mutex::new(HashMap::new()),
            running: Mutex::new(()),
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
        let (gate_up, down) = experts.fused(e).ok_or_else(|| {
            CudaError::Driver(
                "unfused (FP8) experts are not supported on the GPU yet; run this expert \
                 worker on the CPU"
                    .into(),
            )
        })?;
        let bytes = 2 * (gate_up.numel() + down.numel());
        let s = &self.gemm.stream;
        let w = Arc::new(ExpertWeights {
            gate_up: DeviceWeight::upload(s, &gate_up, Layout::InOut)?,
            down: DeviceWeight::upload(s, &down, Layout::InOut)?,
        });
        self.weights
            .lock()
            .expect("weights lock")
            .insert((layer, expert), w.clone());
        Ok((w, bytes))
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
        let weights: Vec<Arc<ExpertWeights>> = groups
            .iter()
            .map(|g| Ok(self.weights_of(layer, g.expert, experts)?.0))
            .collect::<Result<_, CudaError>>()?;
        let _running = self.running.lock().expect("run lock");
        let s = &self.gemm.stream;
        let x = s.clone_htod(inputs).map_err(err)?;
        let gu = s.alloc_zeros::<f32>(rows * 2 * i).map_err(err)?;
        let mut act = s.alloc_zeros::<f32>(rows * i).map_err(err)?;
        let y: CudaSlice<f32> = s.alloc_zeros::<f32>(rows * h).map_err(err)?;
        let (x_ptr, gu_ptr, act_ptr, y_ptr) =
            (addr(&x, s), addr(&gu, s), addr(&act, s), addr(&y, s));
        // Each group's rows through its expert's matrix: `src` rows of `k`, `dst` rows of `n`.
        let per_group =
            |src: u64, k: usize, dst: u64, n: usize, pick: fn(&ExpertWeights) -> &DeviceWeight| {
                let mut row = 0usize;
                for (g, w) in groups.iter().zip(&weights) {
                    let t = g.rows as usize;
                    let x = MatPtr {
                        ptr: src + (row * k * 4) as u64,
                        ld: k,
                    };
                    let y = MatPtr {
                        ptr: dst + (row * n * 4) as u64,
                        ld: n,
                    };
                    self.gemm.linear(self.precision, t, x, pick(w), y, false)?;
                    row += t;
                }
                Ok::<(), CudaError>(())
            };
        per_group(x_ptr, h, gu_ptr, 2 * i, |w| &w.gate_up)?;
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
        per_group(act_ptr, i, y_ptr, h, |w| &w.down)?;
        s.clone_dtoh(&y).map_err(err)
    }
}
