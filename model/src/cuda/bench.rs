//! The expert-shard benchmark of the CUDA issue: one Maverick MoE layer's expert shard at real
//! size on one GPU (16 experts, hidden 5120, intermediate 8192, bf16, random weights), routed
//! batches of 16 to 8192 tokens spread evenly over the 16 experts, each expert's
//! gate_up and down products as cuBLAS bf16 GEMMs (f32 accumulation), one call per expert.
//! Measured in the same run: a dense cuBLAS GEMM of the same total FLOPs, and a device-to-device
//! copy for the weight-read bandwidth floor. Times are CUDA-event medians.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use half::bf16;

use super::CudaError;

/// The shard's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

impl Shape {
    pub const MAVERICK_SHARD: Shape = Shape {
        experts: 16,
        hidden: 5120,
        inter: 8192,
    };
}

/// One batch size's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub tokens: usize,
    pub grouped_ms: f64,
    pub grouped_tflops: f64,
    pub dense_ms: f64,
    pub dense_tflops: f64,
    /// Weight bytes the grouped GEMMs read ÷ their time, GB/s.
    pub weight_read_gbps: f64,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub device: String,
    /// Device-to-device copy: bytes read and written ÷ time (the memory bandwidth), GB/s.
    pub copy_traffic_gbps: f64,
    pub rows: Vec<Row>,
}

use super::driver_error as err;

/// Device-to-device copy of 1 GiB on device `ordinal`: bytes read and written ÷ time, GB/s
/// (median of `runs`): the memory bandwidth a weight-bound step is measured against.
pub fn copy_traffic_gbps(ordinal: usize, runs: usize) -> Result<f64, CudaError> {
    let super::Opened {
        ctx,
        stream,
        module,
        ..
    } = super::open(ordinal)?;
    let fill = module.load_function("fill_random_bf16").map_err(err)?;
    copy_gbps(&ctx, &stream, &fill, runs)
}

/// A copy reads and writes every byte: its traffic is the memory's bandwidth, the floor a
/// weight-bound product (which only reads) is measured against.
fn copy_gbps(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    fill: &CudaFunction,
    runs: usize,
) -> Result<f64, CudaError> {
    let elems = (1usize << 30) / 2;
    let src = fill_random(stream, fill, elems, 4)?;
    let mut dst = stream.alloc_zeros::<bf16>(elems).map_err(err)?;
    let ms = time_ms(ctx, stream, runs, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(err)
    })?;
    Ok((2 * elems * 2) as f64 / (ms * 1e6))
}

/// `n` deterministic random bf16 values in [-0.02, 0.02) on the device.
fn fill_random(
    stream: &Arc<CudaStream>,
    fill: &CudaFunction,
    n: usize,
    seed: u64,
) -> Result<CudaSlice<bf16>, CudaError> {
    let mut buf = stream.alloc_zeros::<bf16>(n).map_err(err)?;
    let (n64, scale) = (n as i64, 0.02f32);
    // SAFETY: the kernel writes exactly n values into a buffer of n.
    #[allow(unsafe_code)]
    unsafe {
        stream
            .launch_builder(fill)
            .arg(&mut buf)
            .arg(&n64)
            .arg(&seed)
            .arg(&scale)
            .launch(LaunchConfig::for_num_elems(n as u32))
            .map_err(err)?;
    }
    Ok(buf)
}

/// Median of `runs` timings (ms) of `work`, after one warm-up.
fn time_ms(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    runs: usize,
    mut work: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    work()?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = ctx.new_event(timing).map_err(err)?;
        start.record(stream).map_err(err)?;
        work()?;
        let end = stream.record_event(timing).map_err(err)?;
        end.synchronize().map_err(err)?;
        times.push(f64::from(start.elapsed_ms(&end).map_err(err)?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Row-major `c[m, n] = a[m, k] · b[k, n]` on cuBLAS (column-major): `cᵀ = bᵀ · aᵀ`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: &impl DevicePtr<bf16>,
    lda: usize,
    b: &impl DevicePtr<bf16>,
    ldb: usize,
    c: &mut CudaSlice<bf16>,
    c_offset: usize,
    ldc: usize,
) -> Result<(), CudaError> {
    let cfg = GemmConfig {
        transa: CUBLAS_OP_N,
        transb: CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: ldb as i32,
        ldb: lda as i32,
        beta: bf16::ZERO,
        ldc: ldc as i32,
    };
    let mut out = c.slice_mut(c_offset..);
    // SAFETY: the shapes and leading dimensions describe sub-matrices inside the buffers.
    #[allow(unsafe_code)]
    unsafe {
        blas.gemm(cfg, b, a, &mut out).map_err(err)
    }
}

/// Runs the benchmark on device `ordinal` for `token_counts`.
pub fn expert_shard(
    ordinal: usize,
    shape: Shape,
    token_counts: &[usize],
    runs: usize,
) -> Result<Report, CudaError> {
    let super::Opened {
        info,
        ctx,
        stream,
        module,
        blas,
    } = super::open(ordinal)?;
    let fill = module.load_function("fill_random_bf16").map_err(err)?;
    let Shape {
        experts,
        hidden: h,
        inter: i,
    } = shape;
    let max_tokens = token_counts.iter().copied().max().unwrap_or(0).max(experts);
    let random = |n: usize, seed: u64| fill_random(&stream, &fill, n, seed);
    let gate_up = random(experts * h * 2 * i, 1)?;
    let down = random(experts * i * h, 2)?;
    let x = random(max_tokens * h, 3)?;
    let mut gu = stream
        .alloc_zeros::<bf16>(max_tokens * 2 * i)
        .map_err(err)?;
    let mut y = stream.alloc_zeros::<bf16>(max_tokens * h).map_err(err)?;
    let mut dense_out = stream
        .alloc_zeros::<bf16>(max_tokens * 3 * i)
        .map_err(err)?;

    let copy_traffic_gbps = copy_gbps(&ctx, &stream, &fill, runs)?;

    let mut rows = Vec::new();
    for &tokens in token_counts {
        let per = tokens / experts;
        let touched = if per == 0 { tokens } else { experts };
        let flops = 6.0 * tokens as f64 * h as f64 * i as f64;
        let grouped_ms = time_ms(&ctx, &stream, runs, || {
            for e in 0..touched {
                let t = per.max(1);
                let xe = x.slice(e * t * h..(e * t + t) * h);
                let we = gate_up.slice(e * h * 2 * i..(e + 1) * h * 2 * i);
                matmul(
                    &blas,
                    t,
                    2 * i,
                    h,
                    &xe,
                    h,
                    &we,
                    2 * i,
                    &mut gu,
                    e * t * 2 * i,
                    2 * i,
                )?;
                let ae = gu.slice(e * t * 2 * i..);
                let de = down.slice(e * i * h..(e + 1) * i * h);
                matmul(&blas, t, h, i, &ae, 2 * i, &de, h, &mut y, e * t * h, h)?;
            }
            Ok(())
        })?;
        let w = gate_up.slice(0..h * 3 * i);
        let dense_ms = time_ms(&ctx, &stream, runs, || {
            matmul(
                &blas,
                tokens,
                3 * i,
                h,
                &x,
                h,
                &w,
                3 * i,
                &mut dense_out,
                0,
                3 * i,
            )
        })?;
        let weight_bytes = touched as f64 * 3.0 * h as f64 * i as f64 * 2.0;
        rows.push(Row {
            tokens,
            grouped_ms,
            grouped_tflops: flops / (grouped_ms * 1e9),
            dense_ms,
            dense_tflops: flops / (dense_ms * 1e9),
            weight_read_gbps: weight_bytes / (grouped_ms * 1e6),
        });
    }
    Ok(Report {
        device: format!(
            "cuda:{ordinal} {} ({:.0} GiB)",
            info.name,
            info.total_memory as f64 / (1u64 << 30) as f64
        ),
        copy_traffic_gbps,
        rows,
    })
}
