//! The "x @ W" products (`[in, out]` weights, `axpy_rows*`): one accumulator per output,
//! K ascending, whatever the tile, block or group (see the parent module). An expert's few
//! tokens stream its rows in blocks (`axpy_blocks`); more tokens take register tiles of
//! columns (`axpy_columns`), which attention's values use too.

use super::*;

kernel! {
    /// `y[j] = Σ_k x[k] · w[k, j0 + j]` over a `[x.len(), cols]` bf16 matrix (the "x @ W"
    /// orientation), for the column range `j0..j0 + y.len()`.
    pub fn axpy_rows / axpy_rows_on<W: Weight>(w: &[W], cols: usize, j0: usize, x: &[f32], y: &mut [f32])
        => avx512: axpy_blocks::<Avx512, W, 8, 1, 1, 0>,
            avx2: axpy_blocks::<Avx2, W, 16, 1, 1, 0>,
            neon: axpy_blocks::<Neon, W, 16, 1, 1, 0>,
            baseline: axpy_blocks::<Scalar, W, 16, 1, 1, 0>
}

kernel! {
    /// `axpy_rows` for `t` tokens at once: `x` is `[t, k]`, `y` is `[t, y_cols]`. Each token's
    /// result is computed in exactly the order `axpy_rows` uses for it alone, so a token's
    /// output never depends on which other tokens share the call.
    pub fn axpy_rows_multi / axpy_rows_multi_on<W: Weight>(
        w: &[W],
        cols: usize,
        j0: usize,
        x: &[f32],
        t: usize,
        y: &mut [f32],
    ) => avx512: axpy_rows_multi_generic::<Avx512, W, 3, 8, 8, 8, 2>,
        avx2: axpy_rows_multi_generic::<Avx2, W, 2, 2, 16, 4, 1>,
        neon: axpy_rows_multi_generic::<Neon, W, 1, 4, 16, 8, 1>,
        baseline: axpy_rows_multi_generic::<Scalar, W, 1, 4, 16, 8, 1>
}

/// `axpy_rows_multi`: up to `STREAM_TOKENS` tokens (an expert's few tokens of a step, its
/// weights read from memory once) in blocks of `KB` rows, as `axpy_rows` reads them, with
/// at most `G` tokens' accumulators for `CB` lane chunks of columns in registers at a time
/// (more tokens in two groups); more tokens in tiles of `C` lane chunks of columns × `T`
/// tokens (the remainders in smaller tiles, the last columns one by one). The canonical
/// order of every output: one accumulator from 0, `fma(w[k, j], x[k], acc)` for k
/// ascending, in every tile shape, block and group.
///
/// AVX2 keeps at most 4 tokens × 1 chunk to a group: 8 tokens' accumulators take all 16 of
/// its registers, and its build of this kernel stored registers to the stack (12 spills,
/// none now). On a 2-core AMD EPYC (Zen 3) VM, 8 tokens through 16 experts' 1024 × 1024
/// slices (`examples/kernel_tiles.rs`, one core, medians of 10 alternating runs) went from
/// 2.7 to 3.4 GB/s. AVX-512 (32 registers) keeps 8 tokens × 2 chunks, so that each token's
/// input, broadcast once per row, serves two multiply-adds: on a 2-core AMD EPYC (Zen 4) VM,
/// 64 experts' 1024 × 1024 slices from memory (one core, medians of 5 alternating runs), 4
/// tokens went from 36 to 50 GFLOP/s and 8 from 56 to 68, 1 and 2 tokens within noise.
/// NEON and the baseline keep 8 × 1 (not measured).
///
/// Past `STREAM_TOKENS`, AVX-512 takes tiles of 3 chunks × 8 tokens (24 accumulators; each
/// row's 3 widened chunks serve 8 broadcasts). On a 2-core AMD EPYC (Zen 5) VM, one core,
/// 16 experts' 1024 × 1024 slices, medians of 9 interleaved runs: 16 tokens 65-74 → 97-103
/// GFLOP/s against 4 × 4, 24 tokens 90-95 → 118-121, 32 tokens 103-110 → 133-137, 53
/// tokens 116-120 → 137-138; 2 × 8, 4 × 6, 2 × 12, 3 × 7, 3 × 9 and 1 × 16 gained less or
/// lost. A prompt's tokens crowd onto a few experts (a bench prefill of 128 tokens: 12-30
/// experts a layer, up to 53 rows one), so its experts run here.
#[inline(always)]
fn axpy_rows_multi_generic<
    S: Lanes,
    W: Weight,
    const C: usize,
    const T: usize,
    const KB: usize,
    const G: usize,
    const CB: usize,
>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
) {
    let k = x.len() / t.max(1);
    assert_eq!(x.len(), t * k, "inputs shape");
    assert!(G >= STREAM_TOKENS / 2, "at most two groups of tokens");
    // One arm per count up to `STREAM_TOKENS` (the tokens' accumulators are arrays whose
    // lengths are constants): one group of `t`, or past `G`, two of about half.
    match t {
        1 => axpy_blocks::<S, W, KB, CB, 1, 0>(w, cols, j0, x, y),
        2 => axpy_blocks::<S, W, KB, CB, 2, 0>(w, cols, j0, x, y),
        3 => axpy_blocks::<S, W, KB, CB, 3, 0>(w, cols, j0, x, y),
        4 => axpy_blocks::<S, W, KB, CB, 4, 0>(w, cols, j0, x, y),
        5 if G >= 5 => axpy_blocks::<S, W, KB, CB, 5, 0>(w, cols, j0, x, y),
        5 => axpy_blocks::<S, W, KB, CB, 3, 2>(w, cols, j0, x, y),
        6 if G >= 6 => axpy_blocks::<S, W, KB, CB, 6, 0>(w, cols, j0, x, y),
        6 => axpy_blocks::<S, W, KB, CB, 3, 3>(w, cols, j0, x, y),
        7 if G >= 7 => axpy_blocks::<S, W, KB, CB, 7, 0>(w, cols, j0, x, y),
        7 => axpy_blocks::<S, W, KB, CB, 4, 3>(w, cols, j0, x, y),
        STREAM_TOKENS if G >= STREAM_TOKENS => {
            axpy_blocks::<S, W, KB, CB, STREAM_TOKENS, 0>(w, cols, j0, x, y)
        }
        STREAM_TOKENS => axpy_blocks::<S, W, KB, CB, 4, 4>(w, cols, j0, x, y),
        _ => axpy_columns::<S, W, C, T>(w, cols, j0, x, k, k, t, y, false),
    }
}

/// The most tokens `axpy_rows_multi` takes through `axpy_blocks`: an expert's weights come
/// from memory, and up to this many tokens its rows read in order outrun register tiles of
/// columns, which read each row in pieces far apart (2-core AMD EPYC (Zen 4) VM, one core,
/// 16 experts' 1024 × 1024 slices, `examples/kernel_tiles.rs`: 2 tokens ~12-13 against
/// ~6-7 GB/s, 4 ~11 against ~6, 8 ~7 against ~5; the AVX2 build 2 tokens ~10 against ~4.4,
/// 8 the same; at 16 the tiles' arithmetic is what counts).
const STREAM_TOKENS: usize = 8;

/// `axpy_rows_multi` where token `i`'s `k` inputs are `x[i·xs..i·xs + k]`; with
/// `accumulate` every output's chain continues from what `y` holds, so consecutive calls
/// over consecutive ranges of K give the bits of one call over all of it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn axpy_columns<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    t: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let n = y.len() / t.max(1);
    assert!(
        w.len() >= k * cols
            && j0 + n <= cols
            && (t == 0 || (t - 1) * xs + k <= x.len())
            && y.len() == t * n,
        "weight shape"
    );
    let mut j = 0;
    while j + C * LANES <= n {
        column_tiles::<S, W, C, T>(w, cols, j0, j, x, xs, k, t, y, accumulate);
        j += C * LANES;
    }
    while j + LANES <= n {
        column_tiles::<S, W, 1, T>(w, cols, j0, j, x, xs, k, t, y, accumulate);
        j += LANES;
    }
    for jj in j..n {
        for i in 0..t {
            let mut acc = if accumulate { y[i * n + jj] } else { 0.0 };
            for kk in 0..k {
                acc = w[kk * cols + j0 + jj]
                    .widen(1.0)
                    .mul_add(x[i * xs + kk], acc);
            }
            y[i * n + jj] = acc;
        }
    }
}

/// Output columns `j..j + C·LANES` (of the range from `j0`) for every token: tiles of `T`
/// tokens, then pairs, then single tokens.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_tiles<S: Lanes, W: Weight, const C: usize, const T: usize>(
    w: &[W],
    cols: usize,
    j0: usize,
    j: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    t: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    const AHEAD: usize = AXPY_PREFETCH_ROWS;
    let mut i0 = 0;
    while i0 + T <= t {
        column_tile::<S, W, C, T, AHEAD>(w, cols, j0 + j, j, x, xs, k, i0, t, y, accumulate);
        i0 += T;
    }
    // Pairs before singles: an expert's two or three tokens share each pass over its rows.
    while T > 2 && i0 + 2 <= t {
        column_tile::<S, W, C, 2, AHEAD>(w, cols, j0 + j, j, x, xs, k, i0, t, y, accumulate);
        i0 += 2;
    }
    while i0 < t {
        column_tile::<S, W, C, 1, AHEAD>(w, cols, j0 + j, j, x, xs, k, i0, t, y, accumulate);
        i0 += 1;
    }
}

/// Tokens `i0..i0 + T` of `column_tiles` (or a group of `axpy_blocks` over one block of
/// rows): their accumulators start at 0 or, with `accumulate`, at what `y` holds, and are
/// stored back there; rows prefetch `AHEAD` on (`axpy_tile`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_tile<S: Lanes, W: Weight, const C: usize, const T: usize, const AHEAD: usize>(
    w: &[W],
    cols: usize,
    col: usize,
    j: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    i0: usize,
    t: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let n = y.len() / t;
    let at = |i: usize, c: usize| (i0 + i) * n + j + c * LANES;
    // Loops, not `std::array::from_fn`, in the kernels' bodies: its closure is a function
    // of its own, compiled without the kernel's instruction set and called per element.
    let mut acc = [[S::zero(); C]; T];
    if accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            for (c, v) in a.iter_mut().enumerate() {
                *v = S::load(chunk(y, at(i, c)));
            }
        }
    }
    let acc = axpy_tile::<S, W, C, T, AHEAD>(w, cols, col, &x[i0 * xs..], xs, k, acc);
    for (i, a) in acc.iter().enumerate() {
        for (c, v) in a.iter().enumerate() {
            let o = at(i, c);
            v.store((&mut y[o..o + LANES]).try_into().expect("a chunk"));
        }
    }
}

/// Rows of the matrix ahead of the current one whose tile columns are prefetched.
const AXPY_PREFETCH_ROWS: usize = 8;

/// Columns `col..col + C·LANES` of `T` tokens (token `i`'s `k` inputs from `x[i·xs]`),
/// every weight row once, continuing the accumulators `acc`; each row prefetches the tile's
/// columns `AHEAD` rows on (none at 0: `axpy_blocks` fetches its next block itself).
#[inline(always)]
fn axpy_tile<S: Lanes, W: Weight, const C: usize, const T: usize, const AHEAD: usize>(
    w: &[W],
    cols: usize,
    col: usize,
    x: &[f32],
    xs: usize,
    k: usize,
    mut acc: [[S; C]; T],
) -> [[S; C]; T] {
    for kk in 0..k {
        let row = kk * cols + col;
        if AHEAD > 0 {
            for line in (0..C * LANES).step_by(32) {
                prefetch(w, row + AHEAD * cols + line);
            }
        }
        let mut wv = [S::zero(); C];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = W::lanes(chunk(w, row + c * LANES), 1.0);
        }
        for i in 0..T {
            let xb = S::splat(x[i * xs + kk]);
            for c in 0..C {
                acc[i][c] = acc[i][c].fma(wv[c], xb);
            }
        }
    }
    acc
}

/// `A + B` tokens' `axpy_rows` (`x` is `[A + B, k]`, `y` is `[A + B, n]`) in one pass over
/// the rows: each block of `KB` rows, `CB` lane chunks of columns at a time (the last
/// chunks one by one), carries every token's accumulators for those columns in `y`, the
/// first `A` tokens' in registers, then the other `B`'s (`B` is 0 where all fit). Every
/// output's chain is the canonical one (from 0, `fma` for k ascending), so the bits are those
/// of the column tiles, whatever the block, chunk or group.
///
/// The rows stream in order, as one sequential read per core, where register tiles of
/// columns (`axpy_columns`) read each row in pieces far apart (one token, an expert's
/// 1024 × 1024 slice per core, 2-core EPYC VM: ~22 against ~19 GB/s, medians of 6). AVX-512
/// takes blocks of 8 rows: on a 2-core AMD EPYC (Zen 4) VM, one token through 16 experts'
/// 1024 × 1024 slices ran at ~14 GB/s against ~10 with 16 (`examples/kernel_tiles.rs`; 4 and
/// 32 were slower still).
#[inline(always)]
fn axpy_blocks<
    S: Lanes,
    W: Weight,
    const KB: usize,
    const CB: usize,
    const A: usize,
    const B: usize,
>(
    w: &[W],
    cols: usize,
    j0: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let t = A + B;
    let (k, n) = (x.len() / t, y.len() / t);
    assert!(
        x.len() == t * k && y.len() == t * n && w.len() >= k * cols && j0 + n <= cols,
        "weight shape"
    );
    y.fill(0.0);
    let full = n / LANES * LANES;
    let mut k0 = 0;
    while k0 < k {
        let kn = KB.min(k - k0);
        let mut o = 0;
        while o + CB * LANES <= full {
            block_chunk::<S, W, KB, CB, A, B>(w, cols, j0, o, x, k0, kn, y);
            o += CB * LANES;
        }
        while o < full {
            block_chunk::<S, W, KB, 1, A, B>(w, cols, j0, o, x, k0, kn, y);
            o += LANES;
        }
        for i in 0..t {
            for j in full..n {
                let out = &mut y[i * n + j];
                for kk in k0..k0 + kn {
                    *out = w[kk * cols + j0 + j]
                        .widen(1.0)
                        .mul_add(x[i * k + kk], *out);
                }
            }
        }
        k0 += kn;
    }
}

/// `C` lane chunks of columns from `o` over the block of `kn` rows from `k0` (`axpy_blocks`):
/// the next block's rows are prefetched, then each group of tokens runs its tile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_chunk<
    S: Lanes,
    W: Weight,
    const KB: usize,
    const C: usize,
    const A: usize,
    const B: usize,
>(
    w: &[W],
    cols: usize,
    j0: usize,
    o: usize,
    x: &[f32],
    k0: usize,
    kn: usize,
    y: &mut [f32],
) {
    let t = A + B;
    let (k, n) = (x.len() / t, y.len() / t);
    for c in 0..C {
        let line = o + c * LANES;
        if line.is_multiple_of(32) {
            for r in 0..kn {
                prefetch(w, (k0 + KB + r) * cols + j0 + line);
            }
        }
    }
    let (wb, col) = (&w[k0 * cols..], j0 + o);
    let (ya, yb) = y.split_at_mut(A * n);
    column_tile::<S, W, C, A, 0>(wb, cols, col, o, &x[k0..], k, kn, 0, A, ya, true);
    if B > 0 {
        // The second group reads the block's weights again, from L1.
        let xb = &x[A * k + k0..];
        column_tile::<S, W, C, B, 0>(wb, cols, col, o, xb, k, kn, 0, B, yb, true);
    }
}
