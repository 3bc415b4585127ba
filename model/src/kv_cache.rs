//! Paged KV cache for incremental decoding.
//!
//! Keys and values live in fixed-size blocks of `block_tokens` positions, aligned to
//! absolute positions, taken from a shared [`BlockPool`] that bounds how many exist. RoPE
//! layers attend only within their aligned `attention_chunk_size` chunk (LLAMA4.md §2.4
//! step 7), so their cache keeps only the blocks of the current chunk and returns older
//! ones to the pool; NoPE layers attend to the whole context and keep every block
//! (transformers' "hybrid" cache). A scheduler admits and preempts sequences by the pool's
//! free blocks ([`KvCache::blocks_needed`]).
//!
//! Sequences with the same prompt (the choices of one request) share its blocks: a
//! [`KvCache::fork`] holds the same full blocks (counted once in the pool, given back when
//! the last holder lets go) and a copy of the partly filled one, so nobody ever writes a
//! shared block.

use std::sync::{Arc, Mutex};

/// Positions per block unless configured otherwise.
pub const BLOCK_TOKENS: usize = 16;

/// The block allocator shared by every sequence of one worker. A block holds the keys and
/// values of `block_tokens` positions of one layer, and has an id below the number of
/// blocks that exist at once. A *device* pool hands out ids only: the keys and values live
/// in the device's memory, in a store the device backend keeps for the pool
/// (`cuda::backend`).
pub struct BlockPool {
    block_tokens: usize,
    /// Blocks that may exist at once; `None` for no limit (single-request generation).
    capacity: Option<usize>,
    device: bool,
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockPool")
            .field("block_tokens", &self.block_tokens)
            .field("capacity", &self.capacity)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct PoolState {
    used: usize,
    /// Freed blocks kept for reuse, so steady state allocates nothing.
    spare: Vec<Box<[f32]>>,
    /// Ids of freed blocks, and the next id never handed out.
    free_ids: Vec<u32>,
    next_id: u32,
}

/// One block of a layer's cache: its id and, in a host pool, its keys then values.
#[derive(Debug)]
pub(crate) struct Block {
    id: u32,
    data: Box<[f32]>,
}

impl BlockPool {
    pub fn new(block_tokens: usize, capacity: Option<usize>) -> Arc<Self> {
        assert!(block_tokens > 0, "blocks hold at least one position");
        Arc::new(Self {
            block_tokens,
            capacity,
            device: false,
            state: Mutex::default(),
        })
    }

    /// A pool of `capacity` blocks whose keys and values live on a device.
    pub fn new_device(block_tokens: usize, capacity: usize) -> Arc<Self> {
        assert!(block_tokens > 0, "blocks hold at least one position");
        Arc::new(Self {
            block_tokens,
            capacity: Some(capacity),
            device: true,
            state: Mutex::default(),
        })
    }

    pub fn is_device(&self) -> bool {
        self.device
    }

    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// A pool without a limit, for one request at a time.
    pub fn unbounded() -> Arc<Self> {
        Self::new(BLOCK_TOKENS, None)
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn used(&self) -> usize {
        self.state.lock().expect("pool lock").used
    }

    /// Blocks that can still be taken (`usize::MAX` without a limit).
    pub fn available(&self) -> usize {
        self.capacity
            .map_or(usize::MAX, |c| c.saturating_sub(self.used()))
    }

    /// A block of `len` f32 values (keys then values). Callers check `available` first
    /// (see `Model::forward_with`); going past the capacity is a programming error.
    fn take(&self, len: usize) -> Block {
        let mut s = self.state.lock().expect("pool lock");
        if let Some(c) = self.capacity {
            assert!(
                s.used < c,
                "KV block pool over capacity: the caller did not reserve"
            );
        }
        s.used += 1;
        let id = s.free_ids.pop().unwrap_or_else(|| {
            s.next_id += 1;
            s.next_id - 1
        });
        let data = if self.device {
            Box::default()
        } else {
            match s.spare.pop() {
                Some(b) if b.len() == len => b,
                _ => vec![0.0; len].into_boxed_slice(),
            }
        };
        Block { id, data }
    }

    pub(crate) fn give_back(&self, blocks: impl IntoIterator<Item = Block>) {
        let mut s = self.state.lock().expect("pool lock");
        for b in blocks {
            s.used -= 1;
            s.free_ids.push(b.id);
            if !b.data.is_empty() && s.spare.len() < 1024 {
                s.spare.push(b.data);
            }
        }
    }
}

/// Keys and values of one layer of one sequence, positions `start_pos..start_pos + len`,
/// in blocks aligned to multiples of `block_tokens`.
#[derive(Debug)]
pub struct LayerCache {
    /// Absolute position of the first position of the first block.
    pub start_pos: usize,
    /// Positions stored from `start_pos` on.
    pub len: usize,
    /// f32 values per position of keys (and of values): kv_heads × head_dim.
    row: usize,
    /// Each block: keys `[block_tokens, row]` then values `[block_tokens, row]`; shared
    /// with forks only while full.
    blocks: Vec<Arc<Block>>,
}

impl LayerCache {
    pub(crate) fn new(row: usize) -> Self {
        Self {
            start_pos: 0,
            len: 0,
            row,
            blocks: Vec::new(),
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The block of absolute positions `j·bt..(j+1)·bt`, shared, when it is full and held.
    pub(crate) fn full_block(&self, bt: usize, j: usize) -> Option<Arc<Block>> {
        let first = self.start_pos / bt;
        if j < first || (j + 1) * bt > self.start_pos + self.len {
            return None;
        }
        self.blocks.get(j - first).cloned()
    }

    /// A layer cache of full shared `blocks` from `start_pos` on (a cached prefix).
    pub(crate) fn of_blocks(
        start_pos: usize,
        row: usize,
        blocks: Vec<Arc<Block>>,
        bt: usize,
    ) -> Self {
        Self {
            start_pos,
            len: blocks.len() * bt,
            row,
            blocks,
        }
    }

    /// Blocks held once `n` more positions are appended (blocks of `bt` positions).
    pub fn blocks_after(&self, bt: usize, n: usize) -> usize {
        (self.len + n).div_ceil(bt).max(self.blocks.len())
    }

    /// Appends the keys and values (`[n, row]` each) of the next positions.
    pub fn append(&mut self, pool: &BlockPool, k: &[f32], v: &[f32]) {
        let (bt, row) = (pool.block_tokens(), self.row);
        for (kr, vr) in k.chunks_exact(row).zip(v.chunks_exact(row)) {
            let slot = self.len % bt;
            if slot == 0 && self.len / bt == self.blocks.len() {
                self.blocks.push(Arc::new(pool.take(2 * bt * row)));
            }
            let block = &mut Arc::get_mut(&mut self.blocks[self.len / bt])
                .expect("a block being written is this sequence's alone: forks copy partial ones")
                .data;
            block[slot * row..(slot + 1) * row].copy_from_slice(kr);
            block[(bt + slot) * row..(bt + slot + 1) * row].copy_from_slice(vr);
            self.len += 1;
        }
    }

    /// For a device pool: takes room for `n` more positions and returns their slots
    /// (`block id · block_tokens + offset`), where the backend writes their keys and values.
    pub fn extend_slots(&mut self, pool: &BlockPool, n: usize) -> Vec<i32> {
        let bt = pool.block_tokens();
        (0..n)
            .map(|_| {
                let slot = self.len % bt;
                if slot == 0 && self.len / bt == self.blocks.len() {
                    self.blocks.push(Arc::new(pool.take(0)));
                }
                let id = self.blocks[self.len / bt].id as usize;
                self.len += 1;
                (id * bt + slot) as i32
            })
            .collect()
    }

    /// The ids of the blocks held, in position order.
    pub fn block_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks.iter().map(|b| b.id)
    }

    /// Positions `from..to` (absolute) where they lie, for attention to read in place: the
    /// keys and the values (`[bt, row]` each) of every block from the one holding `from`,
    /// and `from`'s row in the first.
    pub fn rows(&self, bt: usize, from: usize, to: usize) -> (Vec<&[f32]>, Vec<&[f32]>, usize) {
        assert!(
            from >= self.start_pos && from < to && to <= self.start_pos + self.len,
            "range not cached"
        );
        let (a, b) = (from - self.start_pos, to - self.start_pos);
        let blocks = &self.blocks[a / bt..b.div_ceil(bt)];
        let half = bt * self.row;
        let keys = blocks.iter().map(|x| &x.data[..half]).collect();
        let values = blocks.iter().map(|x| &x.data[half..2 * half]).collect();
        (keys, values, a % bt)
    }

    /// Copies positions `from..to` (absolute) into contiguous keys and values.
    pub fn gather(&self, bt: usize, from: usize, to: usize) -> (Vec<f32>, Vec<f32>) {
        assert!(
            from >= self.start_pos && to <= self.start_pos + self.len,
            "range not cached"
        );
        let row = self.row;
        let mut k = Vec::with_capacity((to - from) * row);
        let mut v = Vec::with_capacity((to - from) * row);
        let mut p = from - self.start_pos;
        while p < to - self.start_pos {
            let (b, slot) = (p / bt, p % bt);
            let n = (bt - slot).min(to - self.start_pos - p);
            let block = &self.blocks[b].data;
            k.extend_from_slice(&block[slot * row..(slot + n) * row]);
            v.extend_from_slice(&block[(bt + slot) * row..(bt + slot + n) * row]);
            p += n;
        }
        (k, v)
    }

    /// Returns whole blocks before `pos` to the pool (the start of the chunk the next
    /// token falls in).
    pub fn drop_before(&mut self, pool: &BlockPool, pos: usize) {
        let bt = pool.block_tokens();
        if pos <= self.start_pos {
            return;
        }
        let whole = ((pos - self.start_pos) / bt).min(self.blocks.len());
        pool.give_back(self.blocks.drain(..whole).filter_map(Arc::into_inner));
        self.start_pos += whole * bt;
        self.len -= (whole * bt).min(self.len);
    }

    fn release(&mut self, pool: &BlockPool) {
        pool.give_back(self.blocks.drain(..).filter_map(Arc::into_inner));
        self.len = 0;
    }

    /// This layer's positions before `upto`, for another sequence: the full blocks shared,
    /// the partly filled one copied. `None` when they are not all here from `need_from` on.
    fn fork(&self, pool: &BlockPool, upto: usize, need_from: usize) -> Option<Self> {
        let bt = pool.block_tokens();
        if self.start_pos > need_from.min(upto) || self.start_pos + self.len < upto {
            return None;
        }
        let kept = upto - self.start_pos;
        let (full, part) = (kept / bt, kept % bt);
        let mut blocks: Vec<Arc<Block>> = self.blocks[..full].to_vec();
        if part > 0 {
            let row = self.row;
            let mut copy = pool.take(2 * bt * row);
            let from = &self.blocks[full].data;
            copy.data[..part * row].copy_from_slice(&from[..part * row]);
            copy.data[bt * row..(bt + part) * row]
                .copy_from_slice(&from[bt * row..(bt + part) * row]);
            blocks.push(Arc::new(copy));
        }
        Some(Self {
            start_pos: self.start_pos,
            len: kept,
            row: self.row,
            blocks,
        })
    }
}

/// The cache of one sequence: one `LayerCache` per layer and the next position.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Number of tokens processed so far: the absolute position of the next token.
    pub next_pos: usize,
    pool: Arc<BlockPool>,
}

impl KvCache {
    /// An empty cache of `num_layers` layers of `row` values per position.
    pub fn new(num_layers: usize, row: usize, pool: Arc<BlockPool>) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::new(row)).collect(),
            next_pos: 0,
            pool,
        }
    }

    pub fn pool(&self) -> &Arc<BlockPool> {
        &self.pool
    }

    /// A cache made of `layers` whose next position is `next_pos` (a cached prefix).
    pub(crate) fn of_layers(
        layers: Vec<LayerCache>,
        next_pos: usize,
        pool: Arc<BlockPool>,
    ) -> Self {
        Self {
            layers,
            next_pos,
            pool,
        }
    }

    /// Layer `l`'s cache and the pool its blocks come from.
    pub fn layer_mut(&mut self, l: usize) -> (&BlockPool, &mut LayerCache) {
        (&self.pool, &mut self.layers[l])
    }

    /// A cache of this one's first `upto` positions for another sequence with the same
    /// prompt: full blocks shared, partly filled ones copied (host pools only; a device
    /// pool's blocks are not shared). `need_from[l]` is the first position layer `l` must
    /// still hold (a chunked layer's chunk start); `None` when a layer has dropped it, or
    /// the pool cannot give the copies.
    pub fn fork(&self, upto: usize, need_from: &[usize]) -> Option<KvCache> {
        if self.pool.is_device() || upto > self.next_pos || need_from.len() != self.layers.len() {
            return None;
        }
        let bt = self.pool.block_tokens();
        let copies = self
            .layers
            .iter()
            .filter(|l| (upto.saturating_sub(l.start_pos)) % bt != 0)
            .count();
        if copies > self.pool.available() {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .zip(need_from)
            .map(|(l, &from)| l.fork(&self.pool, upto, from))
            .collect::<Option<Vec<_>>>()?;
        Some(KvCache {
            layers,
            next_pos: upto,
            pool: self.pool.clone(),
        })
    }

    /// Blocks held, over all layers.
    pub fn blocks(&self) -> usize {
        self.layers.iter().map(LayerCache::blocks).sum()
    }

    /// Bytes of keys and values held, over all layers (f32, whole blocks): RoPE layers keep
    /// their current chunk only, NoPE layers the whole context.
    pub fn bytes(&self) -> usize {
        let bt = self.pool.block_tokens();
        self.layers
            .iter()
            .map(|l| l.blocks() * bt * l.row * 2 * std::mem::size_of::<f32>())
            .sum()
    }

    /// New blocks that appending `new_tokens` positions takes from the pool at its peak
    /// (RoPE layers give blocks of finished chunks back only after the step).
    pub fn blocks_needed(&self, new_tokens: usize) -> usize {
        let bt = self.pool.block_tokens();
        self.layers
            .iter()
            .map(|l| {
                let end = l.start_pos + l.len + new_tokens;
                let total = (end - l.start_pos).div_ceil(bt);
                total.saturating_sub(l.blocks.len())
            })
            .sum()
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        for l in &mut self.layers {
            l.release(&pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_and_go_with_positions() {
        let pool = BlockPool::new(4, Some(8));
        let mut cache = KvCache::new(1, 2, pool.clone());
        let rows =
            |n: usize, base: f32| -> Vec<f32> { (0..2 * n).map(|i| base + i as f32).collect() };
        assert_eq!(cache.blocks_needed(6), 2);
        cache.layers[0].append(&pool, &rows(6, 0.0), &rows(6, 100.0));
        assert_eq!((cache.blocks(), pool.used()), (2, 2));
        let (k, v) = cache.layers[0].gather(4, 3, 6);
        assert_eq!(k, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert_eq!(v, vec![106.0, 107.0, 108.0, 109.0, 110.0, 111.0]);
        // Dropping before position 5 frees the first block only (it holds 0..4).
        cache.layers[0].drop_before(&pool, 5);
        assert_eq!(
            (cache.layers[0].start_pos, cache.layers[0].len, pool.used()),
            (4, 2, 1)
        );
        assert_eq!(
            cache.layers[0].gather(4, 4, 6).0,
            vec![8.0, 9.0, 10.0, 11.0]
        );
        drop(cache);
        assert_eq!(pool.used(), 0);
        assert_eq!(pool.available(), 8);
    }

    /// A fork shares the full blocks before its end (counted once) and copies the partial
    /// one; either side writes on without touching the other; the blocks come back when
    /// the last holder goes. A layer that dropped positions the fork needs refuses it.
    #[test]
    fn forks_share_full_blocks_and_copy_the_partial_one() {
        let pool = BlockPool::new(4, Some(16));
        let mut a = KvCache::new(2, 1, pool.clone());
        let rows =
            |from: usize, n: usize| -> Vec<f32> { (from..from + n).map(|i| i as f32).collect() };
        for l in 0..2 {
            a.layers[l].append(&pool, &rows(0, 11), &rows(100, 11));
        }
        a.next_pos = 11;
        assert_eq!(pool.used(), 6);
        // The first 6 positions: one full block shared, the partial second one copied.
        let mut b = a.fork(6, &[0, 0]).unwrap();
        assert_eq!((b.next_pos, b.blocks(), pool.used()), (6, 4, 8));
        for l in 0..2 {
            b.layers[l].append(&pool, &[-1.0], &[-2.0]);
            assert_eq!(
                b.layers[l].gather(4, 0, 7).0,
                [rows(0, 6), vec![-1.0]].concat()
            );
            assert_eq!(a.layers[l].gather(4, 0, 11), (rows(0, 11), rows(100, 11)));
        }
        drop(a);
        assert_eq!(
            pool.used(),
            4,
            "the shared blocks stay while the fork holds them"
        );
        drop(b);
        assert_eq!(pool.used(), 0);
        // A chunked layer that has let go of positions before 8 cannot give positions 6..
        let mut c = KvCache::new(1, 1, pool.clone());
        c.layers[0].append(&pool, &rows(0, 10), &rows(0, 10));
        c.next_pos = 10;
        c.layers[0].drop_before(&pool, 8);
        assert!(c.fork(9, &[8]).is_some());
        assert!(c.fork(9, &[4]).is_none());
        assert!(c.fork(11, &[8]).is_none(), "past what it holds");
    }

    /// A device pool hands out ids below its capacity and slots inside those blocks; freed
    /// ids come back.
    #[test]
    fn device_pools_hand_out_ids_and_slots() {
        let pool = BlockPool::new_device(4, 3);
        assert!(pool.is_device());
        let mut a = KvCache::new(1, 2, pool.clone());
        let mut b = KvCache::new(1, 2, pool.clone());
        assert_eq!(a.layers[0].blocks_after(4, 6), 2);
        assert_eq!(a.layers[0].extend_slots(&pool, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.layers[0].blocks_after(4, 2), 2);
        assert_eq!(b.layers[0].extend_slots(&pool, 2), vec![8, 9]);
        assert_eq!(a.layers[0].block_ids().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(pool.available(), 0);
        // Block 0 (positions 0..4) is given back and taken again by the next block of b.
        a.layers[0].drop_before(&pool, 4);
        assert_eq!(b.layers[0].extend_slots(&pool, 3), vec![10, 11, 0]);
        assert_eq!(b.layers[0].block_ids().collect::<Vec<_>>(), vec![2, 0]);
        assert_eq!(a.layers[0].extend_slots(&pool, 2), vec![6, 7]);
        drop((a, b));
        assert_eq!(pool.used(), 0);
    }
}
