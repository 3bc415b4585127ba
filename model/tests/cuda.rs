//! The CUDA kernels (cargo feature `cuda`). Without a GPU: every kernel compiles through NVRTC
//! (the `nvidia-cuda-nvrtc-cu12` wheel provides the library on CPU machines; `.ci/run` installs
//! it and sets `EXPERTMESH_REQUIRE_NVRTC=1`, so there a missing NVRTC fails instead of
//! skipping). With a GPU: kernels against the CPU functions on the same inputs. A test that
//! needs what the machine lacks prints why and returns.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use expertmesh_model::cuda::gemm::addr;
use expertmesh_model::cuda::launch::{AttentionBuffers, AttentionShape, Kernels};
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

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tol, "{name}: max |gpu − cpu| = {worst} > {tol}");
}

/// The kernels, loaded for the typed launches the CUDA backend uses.
fn kernels(module: &Arc<CudaModule>) -> Kernels {
    Kernels::load(module).unwrap()
}

#[test]
fn rms_norm_swiglu_and_router_match_the_cpu() {
    let Some((ctx, module)) = gpu() else { return };
    let k = kernels(&module);
    let stream = ctx.default_stream();
    let s = &stream;
    let (rows, dim) = (7usize, 256usize);
    let x = random(rows * dim, 1);
    let w = random(dim, 2);
    let want = rms_norm(&x, dim, &w, 1e-5);
    let dx = stream.clone_htod(&x).unwrap();
    let dw = stream.clone_htod(&w).unwrap();
    let dy = stream.alloc_zeros::<f32>(rows * dim).unwrap();
    k.rms_norm(s, addr(&dx, s), addr(&dw, s), addr(&dy, s), rows, dim, 1e-5)
        .unwrap();
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
    let dout = stream.alloc_zeros::<f32>(rows * inter).unwrap();
    k.swiglu(s, addr(&dgu, s), addr(&dout, s), rows, inter)
        .unwrap();
    assert_close("swiglu", &stream.clone_dtoh(&dout).unwrap(), &want, 1e-5);

    let experts = 16usize;
    let logits = random(rows * experts, 4);
    let dl = stream.clone_htod(&logits).unwrap();
    let de = stream.alloc_zeros::<i32>(rows).unwrap();
    let ds = stream.alloc_zeros::<f32>(rows).unwrap();
    k.router(s, addr(&dl, s), rows, experts, addr(&de, s), addr(&ds, s))
        .unwrap();
    let chosen = stream.clone_dtoh(&de).unwrap();
    let scores = stream.clone_dtoh(&ds).unwrap();
    for t in 0..rows {
        let row = &logits[t * experts..(t + 1) * experts];
        let best = expertmesh_model::sampling::argmax(row) as usize;
        assert_eq!(chosen[t] as usize, best, "token {t}");
        assert!((scores[t] - sigmoid(row[best])).abs() <= 1e-6, "token {t}");
    }
}

#[test]
fn rope_qk_norm_and_attention_match_the_cpu() {
    use expertmesh_model::attention::{attend, Geometry};
    use expertmesh_model::norm::rms_norm_in_place;
    use expertmesh_model::rope::Rope;
    let Some((ctx, module)) = gpu() else { return };
    let kn = kernels(&module);
    let stream = ctx.default_stream();
    let s = &stream;
    let (heads, kv_heads, d) = (8usize, 2usize, 128usize);

    // RoPE on [tokens, heads, d] at positions 5.., then the weightless head norm.
    let tokens = 6usize;
    let positions: Vec<i32> = (5..5 + tokens as i32).collect();
    let rope = Rope::with(d, 500000.0, &expertmesh_model::config::RopeScaling::None);
    let x = random(tokens * heads * d, 5);
    let mut want = x.clone();
    for (t, row) in want.chunks_exact_mut(heads * d).enumerate() {
        for head in row.chunks_exact_mut(d) {
            rope.rotate(head, positions[t] as usize);
        }
    }
    let dx = stream.clone_htod(&x).unwrap();
    let dp = stream.clone_htod(&positions).unwrap();
    let df = stream.clone_htod(rope.inv_freq()).unwrap();
    kn.rope(
        s,
        addr(&dx, s),
        addr(&dp, s),
        addr(&df, s),
        tokens,
        heads,
        d,
    )
    .unwrap();
    assert_close("rope", &stream.clone_dtoh(&dx).unwrap(), &want, 2e-5);
    let eps = 1e-5f32;
    rms_norm_in_place(&mut want, d, None, eps);
    kn.head_norm(s, addr(&dx, s), tokens * heads, d, eps)
        .unwrap();
    assert_close(
        "head_rms_norm",
        &stream.clone_dtoh(&dx).unwrap(),
        &want,
        2e-5,
    );

    // Attention: 12 new queries after 9 cached keys, global (the cache holds every position
    // from 0) and chunked (chunk 8; it holds 11.., the queries' chunks start at 16 and 24).
    let (past, new) = (9usize, 12usize);
    let kv_len = past + new;
    let q = random(new * heads * d, 6);
    let k = random(kv_len * kv_heads * d, 7);
    let v = random(kv_len * kv_heads * d, 8);
    for chunk in [None, Some(8usize)] {
        let start_pos = if chunk.is_some() { 20 } else { past };
        let g = Geometry {
            heads,
            kv_heads,
            head_dim: d,
            chunk,
        };
        let base = start_pos - past;
        let mut want = vec![0.0f32; new * heads * d];
        // The CPU reference wants keys from the first visible position on.
        let lo = g.first_visible(start_pos).max(base);
        let kw = kv_heads * d;
        attend(
            g,
            &q,
            &k[(lo - base) * kw..],
            &v[(lo - base) * kw..],
            lo,
            start_pos,
            &mut want,
        );

        // Over a paged cache of 4-token blocks laid out in reverse order: every new query
        // (prefill) and the last one alone (decode).
        let block_tokens = 4usize;
        let blocks = kv_len.div_ceil(block_tokens);
        let table: Vec<i32> = (0..blocks as i32).rev().collect();
        let mut kc = vec![0.0f32; blocks * block_tokens * kw];
        let mut vc = kc.clone();
        for j in 0..kv_len {
            let slot = table[j / block_tokens] as usize * block_tokens + j % block_tokens;
            kc[slot * kw..(slot + 1) * kw].copy_from_slice(&k[j * kw..(j + 1) * kw]);
            vc[slot * kw..(slot + 1) * kw].copy_from_slice(&v[j * kw..(j + 1) * kw]);
        }
        let dkc = stream.clone_htod(&kc).unwrap();
        let dvc = stream.clone_htod(&vc).unwrap();
        let dtable = stream.clone_htod(&table).unwrap();
        let first = stream.clone_htod(&[base as i32]).unwrap();
        for from in [0, new - 1] {
            let rows = new - from;
            let dq = stream.clone_htod(&q[from * heads * d..]).unwrap();
            let seq = stream.clone_htod(&vec![0i32; rows]).unwrap();
            let pos: Vec<i32> = (from..new).map(|t| (start_pos + t) as i32).collect();
            let pos = stream.clone_htod(&pos).unwrap();
            let dout = stream.alloc_zeros::<f32>(rows * heads * d).unwrap();
            let buffers = AttentionBuffers {
                q: addr(&dq, s),
                k_cache: addr(&dkc, s),
                v_cache: addr(&dvc, s),
                block_table: addr(&dtable, s),
                first_pos: addr(&first, s),
                q_seq: addr(&seq, s),
                q_pos: addr(&pos, s),
                out: addr(&dout, s),
            };
            let shape = AttentionShape {
                rows,
                heads,
                kv_heads,
                head_dim: d,
                block_tokens,
                max_blocks: blocks,
                chunk: chunk.unwrap_or(0),
            };
            kn.attention(s, buffers, shape).unwrap();
            let got = stream.clone_dtoh(&dout).unwrap();
            assert_close(
                &format!("attention_paged chunk {chunk:?}, queries {from}.."),
                &got,
                &want[from * heads * d..],
                1e-4,
            );
        }
    }
}

/// The routed experts of tiny-scout's first MoE layer on the GPU against `Experts::run_groups`
/// on the CPU: in f32 (widened weights) to 1e-5 of the largest output; with bf16 activations
/// (tensor cores) to 2% of it plus 1e-3.
#[test]
fn gpu_experts_match_the_cpu() {
    use expertmesh_model::cuda::experts::GpuExperts;
    use expertmesh_model::cuda::gemm::Precision;
    use expertmesh_model::moe::{ExpertGroup, Experts};
    use expertmesh_model::ModelSource;
    if let Err(e) = probe(0) {
        return skip(e);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-scout");
    let source: ModelSource = dir.display().to_string().parse().unwrap();
    let config = source.config().unwrap();
    let weights = source.weights().unwrap();
    let layer = config.moe_layers[0];
    let experts = Experts::load(weights.as_ref(), &config, layer).unwrap();
    let groups = [
        ExpertGroup { expert: 0, rows: 3 },
        ExpertGroup { expert: 5, rows: 1 },
        ExpertGroup {
            expert: 15,
            rows: 4,
        },
    ];
    let hidden = config.hidden_size;
    let inputs: Vec<f32> = random(8 * hidden, 9).iter().map(|v| v * 0.25).collect();
    let want = experts.run_groups(&groups, &inputs, hidden);
    let largest = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (precision, tol) in [
        (Precision::F32, 1e-5 * largest + 1e-6),
        (Precision::Bf16, 0.02 * largest + 1e-3),
    ] {
        let gpu = GpuExperts::new(0, hidden, config.intermediate_size, precision).unwrap();
        let got = gpu
            .run_groups(layer as u32, &experts, &groups, &inputs)
            .unwrap();
        assert_close(&format!("experts {precision:?}"), &got, &want, tol);
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Two sequences batched through uneven prefill pieces and decode steps on the GPU (4-token
/// blocks, so chunked layers drop blocks and ids are reused) against the same steps on the
/// CPU: logits within 1e-3.
#[test]
fn gpu_batches_and_paged_decoding_match_the_cpu() {
    use expertmesh_model::kv_cache::BlockPool;
    use expertmesh_model::{Device, LogitRows, Model, Sequence};
    if let Err(e) = probe(0) {
        return skip(e);
    }
    let cpu = Model::load(&fixture("tiny-maverick")).unwrap();
    let mut gpu = cpu.clone();
    gpu.to_device(Device::Cuda(0)).unwrap();
    let vocab = cpu.config().vocab_size as u32;
    let a: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % vocab).collect();
    let b: Vec<u32> = (0..30).map(|i| (i * 53 + 5) % vocab).collect();
    let cpu_pool = BlockPool::new(4, Some(512));
    let gpu_pool = gpu.new_pool(4, 512);
    let mut caches = [
        cpu.new_cache_in(cpu_pool.clone()),
        cpu.new_cache_in(cpu_pool),
        gpu.new_cache_in(gpu_pool.clone()),
        gpu.new_cache_in(gpu_pool),
    ];
    // (tokens of a, tokens of b) per step.
    let steps = [
        (5, 3),
        (1, 1),
        (11, 1),
        (1, 9),
        (1, 1),
        (13, 1),
        (1, 1),
        (7, 13),
    ];
    let (mut at, mut bt) = (0, 0);
    for (step, &(na, nb)) in steps.iter().enumerate() {
        let (ta, tb) = (&a[at..at + na], &b[bt..bt + nb]);
        let (c, g) = caches.split_at_mut(2);
        let [ca, cb] = c else { unreachable!() };
        let [ga, gb] = g else { unreachable!() };
        let want = cpu
            .forward(
                &mut [Sequence::new(ca, ta), Sequence::new(cb, tb)],
                LogitRows::All,
            )
            .unwrap();
        let got = gpu
            .forward(
                &mut [Sequence::new(ga, ta), Sequence::new(gb, tb)],
                LogitRows::All,
            )
            .unwrap();
        assert_close(
            &format!("step {step} logits"),
            &got.logits,
            &want.logits,
            1e-3,
        );
        for (g, w) in got
            .routes
            .iter()
            .flatten()
            .zip(want.routes.iter().flatten())
        {
            assert_eq!(g.expert, w.expert, "step {step} routes");
            assert!((g.score - w.score).abs() <= 1e-5, "step {step} scores");
        }
        at += na;
        bt += nb;
    }
}

/// `--gemm bf16` (activations rounded to bf16, tensor cores) against the CPU on the long case
/// of tiny-maverick: logits within 3% of the largest plus 0.03 (bf16 keeps 8 bits of mantissa;
/// the stated bound leaves room for their accumulation over 4 layers).
#[test]
fn bf16_gemms_stay_near_the_cpu() {
    use expertmesh_model::{Device, GemmPrecision, LogitRows, Model, Sequence};
    if let Err(e) = probe(0) {
        return skip(e);
    }
    let cpu = Model::load(&fixture("tiny-maverick")).unwrap();
    let mut gpu = cpu.clone();
    gpu.to_device_with(Device::Cuda(0), GemmPrecision::Bf16)
        .unwrap();
    let vocab = cpu.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..48).map(|i| (i * 41 + 3) % vocab).collect();
    let run = |m: &Model| {
        let mut cache = m.new_cache();
        m.forward(&mut [Sequence::new(&mut cache, &tokens)], LogitRows::All)
            .unwrap()
    };
    let (want, got) = (run(&cpu), run(&gpu));
    let largest = want.logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = got
        .logits
        .iter()
        .zip(&want.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("bf16 GEMMs: worst |logit − cpu| = {worst:e} (largest logit {largest:e})");
    assert_close(
        "bf16 logits",
        &got.logits,
        &want.logits,
        0.03 * largest + 0.03,
    );
}
