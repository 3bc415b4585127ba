//! The CUDA kernels (cargo feature `cuda`). Without a GPU: every kernel compiles through NVRTC
//! (the `nvidia-cuda-nvrtc-cu12` wheel provides the library on CPU machines; `.ci/run` installs
//! it and sets `EXPERTMESH_REQUIRE_NVRTC=1`, so there a missing NVRTC fails instead of
//! skipping). With a GPU: kernels against the CPU functions on the same inputs. A test that
//! needs what the machine lacks prints why and returns.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, LaunchConfig, PushKernelArg};
use expertmesh_model::cuda::{compile_kernels, preload, probe, KERNEL_NAMES};
use expertmesh_model::norm::{rms_norm, sigmoid, silu};
use expertmesh_model::sampling::SplitMix64;

fn skip(why: impl std::fmt::Display) {
    println!("skipped: {why}");
}

#[test]
fn every_kernel_compiles_through_nvrtc() {
    if let Err(e) = preload("nvrtc") {
        assert!(
            std::env::var_os("EXPERTMESH_REQUIRE_NVRTC").is_none(),
            "NVRTC is required here: {e}"
        );
        return skip(e);
    }
    let ptx = compile_kernels().unwrap();
    let src = ptx.to_src();
    for name in KERNEL_NAMES {
        assert!(
            src.contains(&format!(".entry {name}(")),
            "kernel {name} is missing from the PTX"
        );
    }
}

/// The GPU and the compiled kernels, or why not.
fn gpu() -> Option<(Arc<CudaContext>, Arc<CudaModule>)> {
    if let Err(e) = probe(0) {
        skip(e);
        return None;
    }
    let ptx = match compile_kernels() {
        Ok(p) => p,
        Err(e) => {
            skip(e);
            return None;
        }
    };
    let ctx = CudaContext::new(0).unwrap();
    let module = ctx.load_module(ptx).unwrap();
    Some((ctx, module))
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
        .collect()
}

fn bf16(v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = v
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect();
    let back = bits
        .iter()
        .map(|b| half::bf16::from_bits(*b).to_f32())
        .collect();
    (bits, back)
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tol, "{name}: max |gpu − cpu| = {worst} > {tol}");
}

#[test]
fn rms_norm_swiglu_and_router_match_the_cpu() {
    let Some((ctx, module)) = gpu() else { return };
    let stream = ctx.default_stream();
    let (rows, dim) = (7usize, 256usize);
    let x = random(rows * dim, 1);
    let (w_bits, w) = bf16(&random(dim, 2));
    let want = rms_norm(&x, dim, &w, 1e-5);
    let dx = stream.clone_htod(&x).unwrap();
    let dw = stream.clone_htod(&w_bits).unwrap();
    let mut dy = stream.alloc_zeros::<f32>(rows * dim).unwrap();
    let f = module.load_function("rms_norm").unwrap();
    let (rows_i, dim_i, eps) = (rows as i32, dim as i32, 1e-5f32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    #[allow(unsafe_code)]
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&dx)
            .arg(&dw)
            .arg(&mut dy)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&eps)
            .launch(cfg)
            .unwrap();
    }
    assert_close("rms_norm", &stream.clone_dtoh(&dy).unwrap(), &want, 1e-5);

    let inter = 96usize;
    let gu = random(rows * 2 * inter, 3);
    let want: Vec<f32> = (0..rows * inter)
        .map(|i| {
            let (r, c) = (i / inter, i % inter);
            silu(gu[r * 2 * inter + c]) * gu[r * 2 * inter + inter + c]
        })
        .collect();
    let dgu = stream.clone_htod(&gu).unwrap();
    let mut dout = stream.alloc_zeros::<f32>(rows * inter).unwrap();
    let f = module.load_function("swiglu").unwrap();
    let inter_i = inter as i32;
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&dgu)
            .arg(&mut dout)
            .arg(&rows_i)
            .arg(&inter_i)
            .launch(LaunchConfig::for_num_elems((rows * inter) as u32))
            .unwrap();
    }
    assert_close("swiglu", &stream.clone_dtoh(&dout).unwrap(), &want, 1e-5);

    let experts = 16usize;
    let logits = random(rows * experts, 4);
    let dl = stream.clone_htod(&logits).unwrap();
    let mut de = stream.alloc_zeros::<i32>(rows).unwrap();
    let mut ds = stream.alloc_zeros::<f32>(rows).unwrap();
    let f = module.load_function("router_top1_sigmoid").unwrap();
    let experts_i = experts as i32;
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&dl)
            .arg(&rows_i)
            .arg(&experts_i)
            .arg(&mut de)
            .arg(&mut ds)
            .launch(LaunchConfig::for_num_elems(rows as u32))
            .unwrap();
    }
    let chosen = stream.clone_dtoh(&de).unwrap();
    let scores = stream.clone_dtoh(&ds).unwrap();
    for t in 0..rows {
        let row = &logits[t * experts..(t + 1) * experts];
        let best = expertmesh_model::sampling::argmax(row) as usize;
        assert_eq!(chosen[t] as usize, best, "token {t}");
        assert!((scores[t] - sigmoid(row[best])).abs() <= 1e-6, "token {t}");
    }
}
