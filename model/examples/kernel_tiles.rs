//! Single-thread throughput of the weight-product kernels on this CPU, every build it has
//! (the tile shapes are chosen from figures like these):
//!
//!     cargo run --release -p expertmesh-model --example kernel_tiles
//!
//! Prints GFLOP/s (multi-token products: compute-bound) and GB/s of weights (one token:
//! bandwidth-bound), medians of 7 runs; and the attention kernel's time per (query row,
//! key) pair over a long prompt's keys.
use std::time::Instant;

use expertmesh_model::kernels::{self, HeadBlock, Isa, KvRows};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per call, median of 7 after a warm-up.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let (rows, k) = (2048, 1024);
    let w: Vec<u16> = (0..rows * k).map(|i| 0x3F80 ^ (i as u16 & 0x7F)).collect();
    for isa in kernels::builds()
        .into_iter()
        .filter(|&i| i != Isa::Baseline)
    {
        for t in [4, 32, 128] {
            let x: Vec<f32> = (0..t * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let mut y = vec![0.0f32; t * rows];
            let s = time(|| kernels::dot_rows_multi_on(isa, &w, &[], &x, t, &mut y));
            let gflops = 2.0 * (rows * k * t) as f64 / s / 1e9;
            println!("{isa:?} dot_rows_multi {rows}x{k}, {t:>3} tokens: {gflops:6.1} GFLOP/s");
            let mut y = vec![0.0f32; t * k];
            let s =
                time(|| kernels::axpy_rows_multi_on(isa, &w, k, 0, &x[..t * rows / 2], t, &mut y));
            let gflops = 2.0 * (rows / 2 * k * t) as f64 / s / 1e9;
            println!(
                "{isa:?} axpy_rows_multi {}x{k}, {t:>3} tokens: {gflops:6.1} GFLOP/s",
                rows / 2
            );
        }
        // One token over a matrix larger than the caches: weight bytes per second.
        let (big_rows, big_k) = (16384, 1024);
        let big: Vec<u16> = (0..big_rows * big_k).map(|i| i as u16 & 0x3FFF).collect();
        let x: Vec<f32> = (0..big_k).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut y = vec![0.0f32; big_rows];
        let s = time(|| kernels::dot_rows_on(isa, &big, &[], &x, &mut y));
        println!(
            "{isa:?} dot_rows {big_rows}x{big_k}, 1 token: {:6.1} GB/s",
            (big.len() * 2) as f64 / s / 1e9
        );
        let xk: Vec<f32> = (0..big_rows).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut y = vec![0.0f32; big_k];
        let s = time(|| kernels::axpy_rows_on(isa, &big, big_k, 0, &xk, &mut y));
        println!(
            "{isa:?} axpy_rows {big_rows}x{big_k}, 1 token: {:6.1} GB/s",
            (big.len() * 2) as f64 / s / 1e9
        );
        // One token through each of 16 experts' [1024, 1024] slices in turn (a decode step's
        // routed experts: each matrix read once, from memory).
        let e = 1024 * 1024;
        let xe = &xk[..1024];
        let s = time(|| {
            for m in big.chunks_exact(e) {
                kernels::axpy_rows_on(isa, m, 1024, 0, xe, &mut y);
            }
        });
        println!(
            "{isa:?} axpy_rows 16 x 1024x1024, 1 token: {:6.1} GB/s",
            (big.len() * 2) as f64 / s / 1e9
        );
        // A few tokens through each of 64 experts' slices (an expert's tokens of a prefill or
        // a batch): 128 MB, past the caches, so the weights come from memory once per pass.
        let experts: Vec<u16> = (0..64 * e).map(|i| i as u16 & 0x3FFF).collect();
        for t in [2, 4, 8, 16, 32] {
            let xt: Vec<f32> = (0..t * 1024).map(|i| (i % 13) as f32 * 0.1).collect();
            let mut yt = vec![0.0f32; t * 1024];
            let s = time(|| {
                for m in experts.chunks_exact(e) {
                    kernels::axpy_rows_multi_on(isa, m, 1024, 0, &xt, t, &mut yt);
                }
            });
            println!(
                "{isa:?} axpy_rows_multi 64 x 1024x1024, {t:>2} tokens: {:6.1} GB/s {:6.1} GFLOP/s",
                (experts.len() * 2) as f64 / s / 1e9,
                (2 * experts.len() * t) as f64 / s / 1e9
            );
        }
        attention(isa, 16);
        attention(isa, 1);
    }
    // Products with bf16 activations (`--gemm bf16`): VDPBF16PS where the CPU has it, and the
    // emulation in the best build.
    let hardware = [false, true]
        .into_iter()
        .filter(|&h| !h || kernels::bf16_dot_in_hardware());
    for hw in hardware {
        let how = if hw { "VDPBF16PS" } else { "emulated" };
        for t in [4, 32, 128] {
            let x = kernels::round_activations(
                &(0..t * k)
                    .map(|i| (i % 13) as f32 * 0.1)
                    .collect::<Vec<_>>(),
            );
            let mut y = vec![0.0f32; t * rows];
            let s = time(|| kernels::dot_bf16_multi_on(hw, kernels::isa(), &w, &x, t, &mut y));
            let gflops = 2.0 * (rows * k * t) as f64 / s / 1e9;
            println!("{how} dot_bf16_multi {rows}x{k}, {t:>3} tokens: {gflops:6.1} GFLOP/s");
        }
        let (big_rows, big_k) = (16384, 1024);
        let big: Vec<u16> = (0..big_rows * big_k).map(|i| i as u16 & 0x3FFF).collect();
        let x = kernels::round_activations(
            &(0..big_k)
                .map(|i| (i % 13) as f32 * 0.1)
                .collect::<Vec<_>>(),
        );
        let mut y = vec![0.0f32; big_rows];
        let s = time(|| kernels::dot_bf16_multi_on(hw, kernels::isa(), &big, &x, 1, &mut y));
        println!(
            "{how} dot_bf16_multi {big_rows}x{big_k}, 1 token: {:6.1} GB/s",
            (big.len() * 2) as f64 / s / 1e9
        );
    }
}

/// `attend_block` for one KV head of the bench model's shape (head 64 wide, 4 query heads to
/// a KV head, a block of `queries`: 16 in a prefill, 1 in decode) over 4096 keys where they
/// lie in a cache's rows (4 KV heads to a row): nanoseconds per (query row, key) pair, and
/// GFLOP/s of its two products (scores and the weighted sum; the softmax's exponentials
/// come on top).
fn attention(isa: Isa, queries: usize) {
    let (d, kv_heads, group, keys_n) = (64, 4, 4, 4096);
    let (kw, qw) = (kv_heads * d, kv_heads * group * d);
    let keys: Vec<f32> = (0..keys_n * kw)
        .map(|i| (i * 7919 % 113) as f32 * 0.01 - 0.5)
        .collect();
    let values: Vec<f32> = (0..keys_n * kw)
        .map(|i| (i * 7907 % 97) as f32 * 0.02 - 1.0)
        .collect();
    let q: Vec<f32> = (0..queries * qw)
        .map(|i| (i * 31 % 53) as f32 * 0.03 - 0.8)
        .collect();
    let visible: Vec<(usize, usize)> = (0..queries).map(|i| (0, keys_n - queries + i)).collect();
    let (key_run, value_run) = ([&keys[..]], [&values[..]]);
    let block = HeadBlock {
        q: &q,
        q_stride: qw,
        q_off: group * d,
        heads: group,
        keys: KvRows::contiguous(&key_run, kw),
        values: KvRows::contiguous(&value_run, kw),
        kv_stride: kw,
        kv_off: d,
        d,
        visible: &visible,
        scale: 0.125,
    };
    let mut out = vec![0.0f32; queries * group * d];
    let s = time(|| kernels::attend_block_on(isa, &block, &mut out));
    let pairs = (queries * group * keys_n) as f64;
    println!(
        "{isa:?} attend_block {} rows x {keys_n} keys, head {d}: {:5.2} ns per pair, {:6.1} GFLOP/s",
        queries * group,
        s / pairs * 1e9,
        4.0 * d as f64 * pairs / s / 1e9
    );
}
