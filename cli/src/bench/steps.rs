//! What the benchmarks share: timed decode steps of a model, medians, and this machine's
//! memory bandwidth (the baselines they report against).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use expertmesh_model::linear::weight_bytes_read;
use expertmesh_model::moe::ExpertRunner;
use expertmesh_model::sampling::argmax;
use expertmesh_model::{KvCache, LogitRows, Model, Sequence};
use rayon::prelude::*;

/// What [`decode_steps`] measured.
pub(crate) struct DecodeRun {
    /// The prefill of every prompt, in one batch.
    pub prefill: Duration,
    /// Each measured decode step (after two unmeasured ones).
    pub steps: Vec<Duration>,
    /// The median weight bytes read per step.
    pub weight_bytes: u64,
}

/// Prefills every prompt in one batch, then decodes `steps` greedy steps for all of them
/// together (two more first, not measured).
pub(crate) fn decode_steps(
    model: &Model,
    runner: &dyn ExpertRunner,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<DecodeRun> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut batch: Vec<Sequence<'_>> = caches
        .iter_mut()
        .zip(prompts)
        .map(|(cache, p)| Sequence::new(cache, p))
        .collect();
    let t0 = Instant::now();
    let out = model.forward_with(&mut batch, LogitRows::Last, runner)?;
    let prefill = t0.elapsed();
    let mut next: Vec<[u32; 1]> = (0..prompts.len()).map(|i| [argmax(out.row(i))]).collect();
    let mut times = Vec::new();
    let mut bytes = Vec::new();
    for step in 0..steps + 2 {
        let mut batch: Vec<Sequence<'_>> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, t)| Sequence::new(cache, t))
            .collect();
        let before = weight_bytes_read();
        let t0 = Instant::now();
        let out = model.forward_with(&mut batch, LogitRows::Last, runner)?;
        let elapsed = t0.elapsed();
        if step >= 2 {
            times.push(elapsed);
            let counted = weight_bytes_read() - before;
            // The CPU counts the bytes its products read; a GPU step reads every dense
            // weight and the experts its tokens were routed to.
            bytes.push(if counted > 0 {
                counted
            } else {
                let touched: Vec<usize> = out
                    .routes
                    .iter()
                    .map(|r| r.iter().map(|r| r.expert).collect::<BTreeSet<_>>().len())
                    .collect();
                model.decode_weight_bytes(&touched) as u64
            });
        }
        next = (0..prompts.len()).map(|i| [argmax(out.row(i))]).collect();
    }
    bytes.sort_unstable();
    Ok(DecodeRun {
        prefill,
        steps: times,
        weight_bytes: bytes[bytes.len() / 2],
    })
}

/// (memcpy GB/s counting bytes copied, read-only GB/s), both cores, medians of 5.
pub(super) fn bandwidth() -> (f64, f64) {
    const BYTES: usize = 256 << 20;
    let src = vec![1u64; BYTES / 8];
    let mut dst = vec![0u64; BYTES / 8];
    let chunk = src.len() / rayon::current_num_threads().max(1);
    let mut copies: Vec<Duration> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&dst);
            t0.elapsed()
        })
        .collect();
    let mut reads: Vec<Duration> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            let sum: u64 = src
                .par_chunks(chunk)
                .map(|s| {
                    s.chunks_exact(8)
                        .fold([0u64; 8], |mut acc, c| {
                            for (a, v) in acc.iter_mut().zip(c) {
                                *a = a.wrapping_add(*v);
                            }
                            acc
                        })
                        .iter()
                        .fold(0u64, |a, b| a.wrapping_add(*b))
                })
                .sum();
            std::hint::black_box(sum);
            t0.elapsed()
        })
        .collect();
    let gbps = |d: Duration| BYTES as f64 / d.as_secs_f64() / 1e9;
    (gbps(median(&mut copies)), gbps(median(&mut reads)))
}

pub(crate) fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// The median of `values` (the upper one of an even count; 0 of none).
pub(crate) fn median_of(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The order in which run `run` measures `n` things that each land bytes in new memory: it
/// turns by one each run. Memory the system has just freed is cheaper to touch than memory
/// it has not handed out lately (in a VM, the host's first touch of a page costs more than
/// the guest's), so whichever always went first would pay more.
pub(crate) fn turn(run: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + run) % n)
}
