//! Attention of the query heads that share one KV head over a block of queries, blocked
//! over the keys, in the kernels' canonical orders (see the parent module).

use std::cell::RefCell;

use super::*;

/// The query heads of one KV head for a block of queries (see `attend_block`).
#[derive(Debug, Clone, Copy)]
pub struct HeadBlock<'a> {
    /// The block's queries, `[n, q_stride]`; the `heads` heads (`d` values each) that share
    /// this KV head lie one after the other from `q_off`.
    pub q: &'a [f32],
    pub q_stride: usize,
    pub q_off: usize,
    pub heads: usize,
    /// Keys and values, rows of `kv_stride`; this head's start at `kv_off`.
    pub keys: KvRows<'a>,
    pub values: KvRows<'a>,
    pub kv_stride: usize,
    pub kv_off: usize,
    pub d: usize,
    /// Per query, the key indices it sees (`lo..=hi`).
    pub visible: &'a [(usize, usize)],
    /// Scores are multiplied by it before the softmax.
    pub scale: f32,
}

#[cfg(test)]
impl<'a> HeadBlock<'a> {
    /// One head of width `d` whose keys and values are the same contiguous rows (`run`),
    /// for queries of `d` values each: what the kernel tests attend over.
    pub(crate) fn one_head(
        q: &'a [f32],
        run: &'a [&'a [f32]; 1],
        d: usize,
        visible: &'a [(usize, usize)],
        scale: f32,
    ) -> Self {
        Self {
            q,
            q_stride: d,
            q_off: 0,
            heads: 1,
            keys: KvRows::contiguous(run, d),
            values: KvRows::contiguous(run, d),
            kv_stride: d,
            kv_off: 0,
            d,
            visible,
            scale,
        }
    }
}

/// Rows of keys (or values) indexed from 0, as a paged cache holds them: in blocks of
/// `block_tokens` rows, the first row at `first` in the first block. One contiguous run is
/// a single block (`contiguous`). Read where they lie: copying a sequence's cache into one
/// run for every layer and step cost more than the attention itself.
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a> {
    blocks: &'a [&'a [f32]],
    block_tokens: usize,
    first: usize,
    stride: usize,
}

impl<'a> KvRows<'a> {
    /// Rows of `stride` values in blocks of `block_tokens` rows (each block at least that
    /// long but the last), row 0 at row `first` of `blocks[0]`.
    pub fn paged(
        blocks: &'a [&'a [f32]],
        block_tokens: usize,
        first: usize,
        stride: usize,
    ) -> Self {
        assert!(
            block_tokens > 0 && first < block_tokens && stride > 0,
            "kv rows"
        );
        Self {
            blocks,
            block_tokens,
            first,
            stride,
        }
    }

    /// One run of rows (`run` is a one-element array: `&[keys]`): one block.
    pub fn contiguous(run: &'a [&'a [f32]; 1], stride: usize) -> Self {
        let rows = (run[0].len() / stride.max(1)).max(1);
        Self::paged(run, rows, 0, stride.max(1))
    }

    /// How many rows the blocks hold from row 0 (a last block's rows not written yet
    /// included: callers read only the rows they know).
    pub(crate) fn len(&self) -> usize {
        let Some((last, whole)) = self.blocks.split_last() else {
            return 0;
        };
        (whole.len() * self.block_tokens + (last.len() / self.stride).min(self.block_tokens))
            .saturating_sub(self.first)
    }

    /// Row `j` and the rows after it in the same block (how many rows that is, with it).
    #[inline(always)]
    fn run(&self, j: usize) -> (&'a [f32], usize) {
        let p = self.first + j;
        let (b, slot) = (p / self.block_tokens, p % self.block_tokens);
        let block = self.blocks[b];
        let rows = (block.len() / self.stride).min(self.block_tokens);
        (&block[slot * self.stride..rows * self.stride], rows - slot)
    }
}

/// One head's values of `count` rows of `KvRows` from a row on, in order, without a
/// division per row (finding a row divides by the block size); past the last, the last
/// again.
struct HeadRows<'a> {
    rows: KvRows<'a>,
    block: usize,
    slot: usize,
    left: usize,
    /// The head's values in a row: `off..off + d`.
    off: usize,
    d: usize,
    last: &'a [f32],
}

impl<'a> HeadRows<'a> {
    fn new(rows: KvRows<'a>, from: usize, count: usize, off: usize, d: usize) -> Self {
        let p = rows.first + from;
        Self {
            rows,
            block: p / rows.block_tokens,
            slot: p % rows.block_tokens,
            left: count,
            off,
            d,
            last: &[],
        }
    }

    #[inline(always)]
    fn next(&mut self) -> &'a [f32] {
        if self.left > 0 {
            self.left -= 1;
            let at = self.slot * self.rows.stride + self.off;
            self.last = &self.rows.blocks[self.block][at..at + self.d];
            self.slot += 1;
            if self.slot == self.rows.block_tokens {
                (self.block, self.slot) = (self.block + 1, 0);
            }
        }
        self.last
    }
}

kernel! {
    /// `out[i] = Σ_j p_ij · v_j / Σ_j p_ij` with `p_ij = exp(s_ij − max_j s_ij)` and
    /// `s_ij = scale · (q_i · k_j)` over query i's visible keys (`HeadBlock`), for each of
    /// the block's heads: `out` is `[n, heads·d]`. Every (query, head)'s bits are those it
    /// gets alone: scores are `dot_rows` products, the max and the sum (`LANES`
    /// accumulators from the first visible key, `lane_sum`, tail) run over its own keys,
    /// `exp_canonical` is one fixed formula, and the weighted sum is the `axpy_rows` order
    /// over the block's keys (one accumulator per output, keys ascending, carried from one
    /// chunk of keys to the next), where the keys a query does not see weigh an exact 0
    /// and add nothing.
    pub fn attend_block / attend_block_on(h: &HeadBlock<'_>, out: &mut [f32])
        => avx512: attend_block_generic::<Avx512, 4, 4, 4, false>,
            avx2: attend_block_generic::<Avx2, 2, 2, 2, true>,
            neon: attend_block_generic::<Neon, 1, 4, 1, false>,
            baseline: attend_block_generic::<Scalar, 1, 4, 1, false>
}

/// Keys whose values one pass of the weighted sum holds in cache for every query row.
const KEY_CHUNK: usize = 64;

thread_local! {
    /// The scores of the block being computed on this thread, kept between blocks.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `attend_block` with key tiles of `R` keys × `T` query rows for the scores and `C` lane
/// chunks of the head for the weighted sum; with `PACKED`, heads of 64 and 128 take the
/// packed steps instead (`packed_scores`, `packed_weighted_sums`: the same bits).
///
/// The AVX2 build packs. On a 2-core AMD EPYC (Zen 3) VM, 64 rows over 4096 keys
/// (`examples/kernel_tiles.rs`), the tiles took ~8.7 ns per (row, key) pair, ~29 GFLOP/s
/// against ~58 for the weight products: the scores ~3.7 ns, the softmax ~1.8 (the f64
/// exponentials), the weighted sum ~3 (each measured by leaving the later steps out), and
/// a prefill of 8192 tokens spent ~60% of its time here. With a head only 4 chunks wide,
/// each score tile's fixed work (its set-up, prefetches, sums and scattered stores)
/// outweighed its multiply-adds, and a cache's rows, 1 KB apart, share a handful of L1 sets.
/// Packed, the same block takes ~5.8 ns a pair (scores ~2.4, softmax ~1.7, weighted sum
/// ~1.7), and 1 query's 4 rows 9.3-10.7 against 9.9-11.3. Measured and not kept, on the tiles
/// (against them in the same minute, 512 and 4096 keys): within ±4%, rows of scores padded
/// to an odd number of cache lines, score tiles of 3 × 2, weighted-sum tiles of 1 × 6,
/// 2 × 3 and 1 × 4; slower, score tiles of 4 × 1, 6 × 1 and 8 × 1 (0.7-0.8×) and a
/// weighted-sum tile of 4 × 1 (0.85×); `KEY_CHUNK` 16 and 32, 1.05× at 512 keys but within
/// noise at 4096. AVX-512 keeps its 4 × 4 tiles (not measured packed: no such CPU here).
#[inline(always)]
fn attend_block_generic<
    S: Lanes,
    const R: usize,
    const T: usize,
    const C: usize,
    const PACKED: bool,
>(
    h: &HeadBlock<'_>,
    out: &mut [f32],
) {
    let (n, d, heads) = (h.visible.len(), h.d, h.heads);
    let rows = n * heads;
    assert_eq!(out.len(), rows * d, "one output row per query and head");
    if rows == 0 {
        return;
    }
    let lo = h.visible.iter().map(|v| v.0).min().expect("a query");
    let hi = h.visible.iter().map(|v| v.1).max().expect("a query");
    assert!(
        h.visible.iter().all(|&(a, b)| a <= b)
            && hi < h.keys.len().min(h.values.len())
            && h.keys.stride == h.kv_stride
            && h.values.stride == h.kv_stride
            && h.kv_off + d <= h.kv_stride
            && h.q_off + heads * d <= h.q_stride
            && (n - 1) * h.q_stride + h.q_off + heads * d <= h.q.len(),
        "attention shapes"
    );
    let span = hi + 1 - lo;
    // Taken out and put back rather than borrowed in a closure: a closure would not be
    // compiled for this function's instruction set.
    let mut p = SCORES.take();
    p.clear();
    p.resize(rows * span, 0.0);
    let sums = match (PACKED, d) {
        (true, 64) => packed_steps::<S, 4>(h, lo, hi, &mut p, out),
        (true, 128) => packed_steps::<S, 8>(h, lo, hi, &mut p, out),
        _ => {
            scores::<S, R, T>(h, lo, hi, &mut p);
            let sums = softmax_rows(h, lo, span, &mut p);
            weighted_sums::<S, C, T>(h, lo, span, &p, out);
            sums
        }
    };
    for (row, s) in out.chunks_exact_mut(d).zip(&sums) {
        row.iter_mut().for_each(|v| *v /= s);
    }
    SCORES.set(p);
}

/// Row `r`'s query: query `r / heads`, head `r % heads`.
#[inline(always)]
fn query<'a>(h: &HeadBlock<'a>, r: usize) -> &'a [f32] {
    let o = (r / h.heads) * h.q_stride + h.q_off + (r % h.heads) * h.d;
    &h.q[o..o + h.d]
}

/// The scores `q_i · k_j` of every row with keys `lo..=hi` into `p` (`[rows, hi + 1 - lo]`),
/// in tiles of `R` keys × `T` rows.
#[inline(always)]
fn scores<S: Lanes, const R: usize, const T: usize>(
    h: &HeadBlock<'_>,
    lo: usize,
    hi: usize,
    p: &mut [f32],
) {
    let (rows, span) = (h.visible.len() * h.heads, hi + 1 - lo);
    let ones = [1.0f32; R];
    // Each row's query, found once (finding one divides by the head count).
    let queries: Vec<&[f32]> = (0..rows).map(|r| query(h, r)).collect();
    // The keys in order, and those of the tile after the current one (fetched while it
    // computes), walked: looking every tile's keys up for every tile of rows cost a tenth of
    // a long prompt's attention.
    let walk = |from| HeadRows::new(h.keys, from, span.saturating_sub(from - lo), h.kv_off, h.d);
    let mut ahead = walk((lo + R).min(hi));
    let mut now = walk(lo);
    let mut keys: [&[f32]; R] = [&[]; R];
    for k in &mut keys {
        *k = now.next();
    }
    let mut j0 = lo;
    while j0 <= hi {
        let rr = (hi + 1 - j0).min(R);
        // Past the last key, the last key again (an empty slice, as once before, hinted at
        // an unmapped address: perf put a third of the attention's samples on those
        // prefetches).
        let mut next: [&[f32]; R] = [&[]; R];
        for k in &mut next {
            *k = ahead.next();
        }
        let mut i0 = 0;
        while i0 < rows {
            let tt = (rows - i0).min(T);
            if rr == R && tt == T {
                let mut xs: [&[f32]; T] = [&[]; T];
                xs.copy_from_slice(&queries[i0..i0 + T]);
                let s = dot_tile::<S, f32, R, T>(&keys, &next, &ones, &xs);
                for (r, col) in s.iter().enumerate() {
                    for (i, v) in col.iter().enumerate() {
                        p[(i0 + i) * span + j0 + r - lo] = *v;
                    }
                }
            } else if rr == R {
                // Fewer rows than a tile: R keys at a time for each.
                for i in i0..i0 + tt {
                    let s = dot_tile::<S, f32, R, 1>(&keys, &next, &ones, &[queries[i]]);
                    for (r, v) in s.iter().enumerate() {
                        p[i * span + j0 + r - lo] = v[0];
                    }
                }
            } else {
                for (r, &k) in keys.iter().enumerate().take(rr) {
                    for i in i0..i0 + tt {
                        let k = [k];
                        let s = dot_tile::<S, f32, 1, 1>(&k, &[next[0]], &[1.0], &[queries[i]]);
                        p[i * span + j0 + r - lo] = s[0][0];
                    }
                }
            }
            i0 += tt;
        }
        keys = next;
        j0 += rr;
    }
}

/// Keys a packed step copies out of the cache at a time (8 KB of one head's keys or values
/// at 64 values a head, 16 KB at 128).
const PACKED_KEYS: usize = 32;

/// The scores, softmax and weighted sums of `attend_block_generic` for heads of `CHUNKS`
/// whole lane chunks, with keys and values packed (one 16 KB buffer on the stack for
/// both); returns each row's sum of weights.
#[inline(always)]
fn packed_steps<S: Lanes, const CHUNKS: usize>(
    h: &HeadBlock<'_>,
    lo: usize,
    hi: usize,
    p: &mut [f32],
    out: &mut [f32],
) -> Vec<f32> {
    let mut pack = [0.0f32; PACKED_KEYS * 8 * LANES];
    packed_scores::<S, CHUNKS>(h, lo, hi, &mut pack, p);
    let sums = softmax_rows(h, lo, hi + 1 - lo, p);
    packed_weighted_sums::<S, CHUNKS>(h, lo, hi + 1 - lo, &mut pack, p, out);
    sums
}

/// A head's keys (or values) `from..from + count` (at most `PACKED_KEYS`) copied into
/// `pack`, one after the other (`d` values each): a cache's rows lie a whole KV row apart
/// (1 KB for 4 heads of 64), so a few dozen of them share a handful of L1 sets and evict
/// each other while every row of the block passes over them.
#[inline(always)]
fn pack_rows(rows: KvRows<'_>, from: usize, count: usize, off: usize, d: usize, pack: &mut [f32]) {
    let mut walk = HeadRows::new(rows, from, count, off, d);
    for row in pack.chunks_exact_mut(d).take(count) {
        row.copy_from_slice(walk.next());
    }
}

/// `scores` for heads of `CHUNKS` whole lane chunks (64 or 128 values): the same products
/// in the same order (each lane's multiply-adds over the chunks from 0, then `lane_sum`),
/// a row at a time against keys packed `PACKED_KEYS` at a time, the row's query loaded
/// once for them. The tiles of `scores` spend more on each tile's set-up, hints, sums and
/// scattered stores than on a short head's multiply-adds.
#[inline(always)]
fn packed_scores<S: Lanes, const CHUNKS: usize>(
    h: &HeadBlock<'_>,
    lo: usize,
    hi: usize,
    pack: &mut [f32],
    p: &mut [f32],
) {
    let d = CHUNKS * LANES;
    let (rows, span) = (h.visible.len() * h.heads, hi + 1 - lo);
    let mut j0 = lo;
    while j0 <= hi {
        let kn = PACKED_KEYS.min(hi + 1 - j0);
        pack_rows(h.keys, j0, kn, h.kv_off, d, pack);
        let keys = &pack[..kn * d];
        for r in 0..rows {
            let q = query(h, r);
            let mut qv = [S::zero(); CHUNKS];
            for (c, v) in qv.iter_mut().enumerate() {
                *v = S::load(chunk(q, c * LANES));
            }
            let out = &mut p[r * span + j0 - lo..][..kn];
            // Four keys at a time, their sums' steps shared (`Lanes::sum4`), then one by one.
            let mut quads = keys.chunks_exact(4 * d);
            let mut outs = out.chunks_exact_mut(4);
            for (four, o) in (&mut quads).zip(&mut outs) {
                let mut acc = [S::zero(); 4];
                for (c, v) in qv.iter().enumerate() {
                    for (a, key) in acc.iter_mut().zip(four.chunks_exact(d)) {
                        *a = a.fma(S::load(chunk(key, c * LANES)), *v);
                    }
                }
                o.copy_from_slice(&S::sum4(&acc));
            }
            for (key, o) in quads.remainder().chunks_exact(d).zip(outs.into_remainder()) {
                let mut acc = S::zero();
                for (c, v) in qv.iter().enumerate() {
                    acc = acc.fma(S::load(chunk(key, c * LANES)), *v);
                }
                *o = acc.sum();
            }
        }
        j0 += kn;
    }
}

/// `weighted_sums` for heads of `CHUNKS` whole lane chunks: each output's chain the same
/// (from 0, `p_ij · v_j` fused in for keys ascending), a row and 4 chunks of its outputs
/// at a time in registers, against values packed `PACKED_KEYS` keys at a time.
#[inline(always)]
fn packed_weighted_sums<S: Lanes, const CHUNKS: usize>(
    h: &HeadBlock<'_>,
    lo: usize,
    span: usize,
    pack: &mut [f32],
    p: &[f32],
    out: &mut [f32],
) {
    const GROUP: usize = 4;
    let d = CHUNKS * LANES;
    let rows = p.len() / span;
    let mut k0 = 0;
    while k0 < span {
        let kn = PACKED_KEYS.min(span - k0);
        pack_rows(h.values, lo + k0, kn, h.kv_off, d, pack);
        let values = &pack[..kn * d];
        for (r, o) in out.chunks_exact_mut(d).enumerate().take(rows) {
            let weights = &p[r * span + k0..][..kn];
            for g in (0..CHUNKS).step_by(GROUP) {
                let col = g * LANES;
                let mut acc = [S::zero(); GROUP];
                if k0 > 0 {
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = S::load(chunk(o, col + c * LANES));
                    }
                }
                for (value, &w) in values.chunks_exact(d).zip(weights) {
                    let wv = S::splat(w);
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = a.fma(S::load(chunk(value, col + c * LANES)), wv);
                    }
                }
                for (c, a) in acc.iter().enumerate() {
                    let at = col + c * LANES;
                    a.store((&mut o[at..at + LANES]).try_into().expect("a chunk"));
                }
            }
        }
        k0 += kn;
    }
}

/// The scores in `p` become softmax weights (unnormalised) over each row's own keys, zero
/// elsewhere; returns each row's sum of them.
#[inline(always)]
fn softmax_rows(h: &HeadBlock<'_>, lo: usize, span: usize, p: &mut [f32]) -> Vec<f32> {
    let mut sums = vec![0.0f32; p.len() / span];
    for (r, row) in p.chunks_exact_mut(span).enumerate() {
        let (a, b) = h.visible[r / h.heads];
        let (a, b) = (a - lo, b - lo);
        let seen = &mut row[a..=b];
        let max = seen
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v * h.scale));
        for v in seen.iter_mut() {
            *v = exp_canonical(*v * h.scale - max);
        }
        sums[r] = lane_total(seen);
        row[..a].fill(0.0);
        row[b + 1..].fill(0.0);
    }
    sums
}

/// `out = p · V` over keys `lo..lo + span`, in chunks of keys that lie in one block, each
/// output's chain carried from one chunk to the next.
#[inline(always)]
fn weighted_sums<S: Lanes, const C: usize, const T: usize>(
    h: &HeadBlock<'_>,
    lo: usize,
    span: usize,
    p: &[f32],
    out: &mut [f32],
) {
    let rows = p.len() / span;
    let mut k0 = 0;
    while k0 < span {
        let (values, here) = h.values.run(lo + k0);
        let kn = KEY_CHUNK.min(span - k0).min(here);
        axpy_columns::<S, f32, C, T>(
            values,
            h.kv_stride,
            h.kv_off,
            &p[k0..],
            span,
            kn,
            rows,
            out,
            k0 > 0,
        );
        k0 += kn;
    }
}

/// `Σ v` in the canonical order of a dot product: `LANES` accumulators over the full chunks,
/// `lane_sum`, then the tail in order.
#[inline(always)]
fn lane_total(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut sum = lane_sum(&acc);
    for x in chunks.remainder() {
        sum += x;
    }
    sum
}

/// `e^x` in one fixed sequence of IEEE operations, so that every build and every vector
/// width gives the same bits: evaluated in f64 (`x = n·ln 2 + r`, n nearest to x·log2 e, r by
/// Cody–Waite; `e^r` by its Taylor series to degree 10, relative error below 2e-13) and
/// rounded once to f32, which is the correctly rounded value but for ties closer than that.
/// Below −87.3 (where e^x leaves f32's normal range) the result is 0.
#[inline(always)]
pub fn exp_canonical(x: f32) -> f32 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2: the high part has its low 32 bits zero, so n · LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const LIMIT: f32 = -87.336_55;
    // 1.5 · 2^52: adding it rounds to an integer (nearest-even) in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let xd = f64::from(x.clamp(LIMIT, 88.0));
    let shifted = xd.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xd));
    let mut p: f64 = 1.0 / 3_628_800.0;
    for c in [
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // The low bits of `shifted` are n (two's complement): n + 1023 moved into the exponent.
    let scale = f64::from_bits(shifted.to_bits().wrapping_add(1023) << 52);
    if x < LIMIT {
        0.0
    } else {
        (p * scale) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_exp_is_close_and_the_same_in_every_build() {
        let xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.0047).collect();
        for &x in &xs {
            let got = exp_canonical(x) as f64;
            let want = (x as f64).exp();
            if x < -87.336_55 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, not {want}"
                );
            }
        }
        // Through the attention kernel of each build: the same weights, bit for bit.
        let d = 16;
        let keys: Vec<f32> = (0..40 * d).map(|i| (i % 23) as f32 * 0.4 - 4.0).collect();
        let q: Vec<f32> = (0..3 * d).map(|i| (i % 7) as f32 * 0.9 - 3.0).collect();
        let visible = [(0, 20), (3, 39), (39, 39)];
        let run = [&keys[..]];
        let block = HeadBlock::one_head(&q, &run, d, &visible, 0.7);
        let run = |isa: Isa| {
            let mut out = vec![0.0f32; 3 * d];
            attend_block_on(isa, &block, &mut out);
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let base = run(Isa::Baseline);
        for isa in super::builds() {
            assert_eq!(run(isa), base, "{isa:?}");
        }
    }
}
