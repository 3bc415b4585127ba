//! Prefix caching: the KV blocks of prompts already computed, kept for the requests that
//! begin the same way (vLLM's automatic prefix caching, SGLang's RadixAttention).
//!
//! A full block of positions is named by a hash chain over every token up to its end (and
//! the vision rows of any image patches among them): equal names mean equal keys and values
//! in every layer, because a token's keys and values never depend on its batch or on how its
//! prompt was split into chunks. An entry holds that block of every layer that still had it
//! when it was published. NoPE layers keep every block of a sequence; RoPE layers only the
//! blocks of the chunk the next token falls in (LLAMA4.md §2.4 step 7), so an entry whose
//! chunked layers had already let go of their block serves only continuations that start in
//! a later chunk, which never look at it.
//!
//! A lookup cuts the prompt at the longest chain of blocks whose every needed block is here
//! — NoPE layers every block before the cut, RoPE layers those from the cut's chunk on —
//! and always leaves at least one prompt token to compute (its logits pick the first token).
//! The blocks are shared, as forks share them ([`KvCache::fork`]): nobody writes a full
//! block, and a block goes back to the pool when its last holder lets go.
//!
//! Entries are evicted least recently used first, and of those touched together the tail
//! of a chain before its head, when the pool needs blocks and eviction can free enough
//! ([`PrefixCache::make_room`]): the scheduler evicts before it preempts. Entries whose
//! blocks running sequences all hold are passed over: evicting them would free nothing.
//!
//! The cache lives on the host pool only: a device pool's blocks are not shared.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Arc;

use crate::config::TextConfig;
use crate::kv_cache::{Block, BlockPool, KvCache, LayerCache};

/// The name of a full block: a 128-bit hash of every token up to its end, keyed per
/// process (two SipHash-1-3 with random keys), so nobody can aim a collision at it.
pub type ChainKey = u128;

/// The cached blocks of one block position of one prefix.
#[derive(Debug)]
struct Entry {
    /// Per layer: the block, or `None` where a chunked layer had let it go.
    blocks: Vec<Option<Arc<Block>>>,
    /// Every layer's block is here.
    complete: bool,
    /// Blocks before this one in its chain.
    depth: u32,
    /// When it was last used (a tick of the cache).
    used: u64,
}

/// The shared prefixes of one attention worker's sequences.
#[derive(Debug)]
pub struct PrefixCache {
    pool: Arc<BlockPool>,
    /// Which layers are chunked (RoPE), and their chunk.
    rope_layers: Vec<bool>,
    chunk: usize,
    row: usize,
    keys: (RandomState, RandomState),
    entries: HashMap<ChainKey, Entry>,
    /// Eviction order: least recently used first, deeper first among equals.
    order: BTreeSet<(u64, Reverse<u32>, ChainKey)>,
    tick: u64,
    /// Blocks the entries hold (each counted once).
    blocks: usize,
    /// Blocks given up by evictions so far.
    evicted: u64,
}

impl PrefixCache {
    /// A cache over `pool` for a model of `config`; `None` for a device pool.
    pub fn new(pool: Arc<BlockPool>, config: &TextConfig) -> Option<Self> {
        let row = config.num_key_value_heads * config.head_dim;
        let rope = config.rope_layers.clone();
        Self::of_layers(pool, rope, config.attention_chunk_size, row)
    }

    /// A cache over `pool` for layers that are chunked (`rope_layers`) with chunks of
    /// `chunk` positions, or global, keeping `row` values per position.
    fn of_layers(
        pool: Arc<BlockPool>,
        rope_layers: Vec<bool>,
        chunk: usize,
        row: usize,
    ) -> Option<Self> {
        if pool.is_device() {
            return None;
        }
        assert!(chunk > 0, "chunks hold at least one position");
        Some(Self {
            pool,
            rope_layers,
            chunk,
            row,
            keys: (RandomState::new(), RandomState::new()),
            entries: HashMap::new(),
            order: BTreeSet::new(),
            tick: 0,
            blocks: 0,
            evicted: 0,
        })
    }

    pub fn block_tokens(&self) -> usize {
        self.pool.block_tokens()
    }

    /// Blocks held by the cache (some may be shared with running sequences).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Blocks given up by evictions so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Blocks that evicting would give back to the pool now: those no running sequence
    /// holds too.
    pub fn evictable(&self) -> usize {
        self.entries
            .values()
            .flat_map(|e| e.blocks.iter().flatten())
            .filter(|b| Arc::strong_count(b) == 1)
            .count()
    }

    /// Extends `chain` (the names of `tokens`' full blocks so far) to the first `blocks`
    /// blocks; `rows(from, to)` gives the vision rows of the image patches among
    /// `tokens[from..to]` (empty for text).
    pub fn extend<'a>(
        &self,
        chain: &mut Vec<ChainKey>,
        tokens: &[u32],
        blocks: usize,
        rows: impl Fn(usize, usize) -> &'a [f32],
    ) {
        let bt = self.block_tokens();
        let blocks = blocks.min(tokens.len() / bt);
        while chain.len() < blocks {
            let (from, to) = (chain.len() * bt, (chain.len() + 1) * bt);
            let prev = chain.last().copied().unwrap_or_default();
            let name = |keys: &RandomState| {
                let mut h = keys.build_hasher();
                prev.hash(&mut h);
                tokens[from..to].hash(&mut h);
                for v in rows(from, to) {
                    h.write_u32(v.to_bits());
                }
                h.finish()
            };
            chain.push(u128::from(name(&self.keys.0)) << 64 | u128::from(name(&self.keys.1)));
        }
    }

    /// The cache of the longest cached prefix of a sequence of `tokens` tokens whose full
    /// blocks are named by `chain`, leaving at least one token to compute; `None` when no
    /// block of it is here.
    pub fn lookup(&mut self, chain: &[ChainKey], tokens: usize) -> Option<KvCache> {
        let bt = self.block_tokens();
        let most = chain.len().min(tokens.saturating_sub(1) / bt);
        let found = chain[..most]
            .iter()
            .take_while(|k| self.entries.contains_key(k))
            .count();
        let cut = (1..=found).rev().find(|&k| self.serves(chain, k))?;
        let first = self.chunk_block(cut);
        let layers = self
            .rope_layers
            .iter()
            .enumerate()
            .map(|(l, &rope)| {
                let from = if rope { first } else { 0 };
                let blocks = chain[from..cut]
                    .iter()
                    .map(|k| {
                        self.entries[k].blocks[l]
                            .clone()
                            .expect("checked by serves")
                    })
                    .collect();
                LayerCache::of_blocks(from * bt, self.row, blocks, bt)
            })
            .collect();
        self.touch(&chain[..cut]);
        Some(KvCache::of_layers(layers, cut * bt, self.pool.clone()))
    }

    /// The first block a chunked layer needs to continue after `cut` blocks: the one that
    /// holds the start of the cut's chunk.
    fn chunk_block(&self, cut: usize) -> usize {
        let pos = cut * self.block_tokens();
        (pos - pos % self.chunk) / self.block_tokens()
    }

    /// Whether every block a continuation after `cut` blocks reads is here: the entries of
    /// its chunk complete (NoPE layers keep every block, so earlier entries serve them).
    fn serves(&self, chain: &[ChainKey], cut: usize) -> bool {
        chain[self.chunk_block(cut)..cut]
            .iter()
            .all(|k| self.entries[k].complete)
    }

    /// Keeps the full blocks of `cache`, whose first `chain.len()` blocks `chain` names.
    pub fn publish(&mut self, chain: &[ChainKey], cache: &KvCache) {
        let bt = self.block_tokens();
        assert!(
            chain.len() * bt <= cache.next_pos,
            "only full blocks are published"
        );
        for (j, key) in chain.iter().enumerate() {
            if self.entries.contains_key(key) {
                continue;
            }
            let blocks: Vec<Option<Arc<Block>>> =
                cache.layers.iter().map(|l| l.full_block(bt, j)).collect();
            let held = blocks.iter().flatten().count();
            if held == 0 {
                continue;
            }
            self.blocks += held;
            self.entries.insert(
                *key,
                Entry {
                    complete: held == blocks.len(),
                    blocks,
                    depth: j as u32,
                    used: 0,
                },
            );
        }
        self.touch(chain);
    }

    /// Marks the entries of `chain` (those here) as used now.
    fn touch(&mut self, chain: &[ChainKey]) {
        self.tick += 1;
        for key in chain {
            if let Some(e) = self.entries.get_mut(key) {
                self.order.remove(&(e.used, Reverse(e.depth), *key));
                e.used = self.tick;
                self.order.insert((e.used, Reverse(e.depth), *key));
            }
        }
    }

    /// Whether the pool has `blocks` free, evicting entries (least recently used first, of
    /// those that free a block) for them when that frees enough — and only then: the cache is
    /// not emptied for a request that would wait anyway.
    pub fn make_room(&mut self, blocks: usize) -> bool {
        let available = self.pool.available();
        if available >= blocks {
            return true;
        }
        if available.saturating_add(self.evictable()) < blocks {
            return false;
        }
        // Least recently used first, passing over entries that would free nothing (a running
        // sequence holds all their blocks: they are in use).
        let frees = |e: &Entry| e.blocks.iter().flatten().any(|b| Arc::strong_count(b) == 1);
        let victims: Vec<(u64, Reverse<u32>, ChainKey)> = self
            .order
            .iter()
            .filter(|(_, _, key)| frees(&self.entries[key]))
            .copied()
            .collect();
        for victim in victims {
            if self.pool.available() >= blocks {
                break;
            }
            self.order.remove(&victim);
            let entry = self
                .entries
                .remove(&victim.2)
                .expect("ordered entries exist");
            let held: Vec<Arc<Block>> = entry.blocks.into_iter().flatten().collect();
            self.blocks -= held.len();
            self.evicted += held.len() as u64;
            self.pool
                .give_back(held.into_iter().filter_map(Arc::into_inner));
        }
        self.pool.available() >= blocks
    }

    /// Gives every block back.
    pub fn clear(&mut self) {
        self.order.clear();
        self.blocks = 0;
        let held = self.entries.drain().flat_map(|(_, e)| e.blocks).flatten();
        self.pool.give_back(held.filter_map(Arc::into_inner));
    }
}

impl Drop for PrefixCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layers chunked or not (`rope`), chunks of `chunk` positions, one value per position.
    struct Layers {
        rope: Vec<bool>,
        chunk: usize,
    }

    fn config(rope: &[bool], chunk: usize) -> Layers {
        Layers {
            rope: rope.to_vec(),
            chunk,
        }
    }

    impl PrefixCache {
        fn for_tests(pool: Arc<BlockPool>, c: &Layers) -> Option<Self> {
            Self::of_layers(pool, c.rope.clone(), c.chunk, 1)
        }
    }

    /// A cache of `tokens` whose keys are the token ids (values their negatives), chunked
    /// layers having let go of the blocks before their chunk, as the forward pass does.
    fn filled(pool: &Arc<BlockPool>, c: &Layers, tokens: &[u32]) -> KvCache {
        let mut cache = KvCache::new(c.rope.len(), 1, pool.clone());
        let k: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let end = tokens.len();
        for l in 0..c.rope.len() {
            let (pool, layer) = cache.layer_mut(l);
            layer.append(pool, &k, &v);
            if c.rope[l] {
                layer.drop_before(pool, end - end % c.chunk);
            }
        }
        cache.next_pos = end;
        cache
    }

    fn chain_of(cache: &PrefixCache, tokens: &[u32]) -> Vec<ChainKey> {
        let mut chain = Vec::new();
        cache.extend(&mut chain, tokens, usize::MAX, |_, _| &[]);
        chain
    }

    /// A prompt that shares 9 tokens with a cached one reuses its first two blocks (of 4),
    /// in every layer, with the same keys and values; a prompt that differs in its first
    /// block reuses nothing.
    #[test]
    fn a_shared_prefix_is_served_from_the_cached_blocks() {
        let c = config(&[false, false], 8);
        let pool = BlockPool::new(4, Some(64));
        let mut prefix = PrefixCache::for_tests(pool.clone(), &c).unwrap();
        let a: Vec<u32> = (0..11).collect();
        let cache = filled(&pool, &c, &a);
        let chain = chain_of(&prefix, &a);
        assert_eq!(chain.len(), 2);
        prefix.publish(&chain, &cache);
        drop(cache);
        assert_eq!(
            (prefix.blocks(), pool.used()),
            (4, 4),
            "full blocks kept, the partial one given back"
        );
        let b: Vec<u32> = (0..9).chain([77, 78, 79]).collect();
        let hit = prefix.lookup(&chain_of(&prefix, &b), b.len()).unwrap();
        assert_eq!(hit.next_pos, 8);
        for l in 0..2 {
            let (k, v) = hit.layers[l].gather(4, 0, 8);
            assert_eq!(k, (0..8).map(|x| x as f32).collect::<Vec<_>>());
            assert_eq!(v, (0..8).map(|x| -(x as f32)).collect::<Vec<_>>());
        }
        // At least one token is left to compute: 8 tokens reuse one block, not two.
        let short: Vec<u32> = (0..8).collect();
        let hit = prefix.lookup(&chain_of(&prefix, &short), 8).unwrap();
        assert_eq!(hit.next_pos, 4);
        let other: Vec<u32> = [5].into_iter().chain(1..12).collect();
        assert!(prefix.lookup(&chain_of(&prefix, &other), 12).is_none());
    }

    /// Chunked layers: a continuation reads its own chunk only. Blocks a chunked layer let
    /// go before they were published serve cuts in a later chunk, never cuts inside theirs.
    #[test]
    fn chunked_layers_keep_only_the_chunk_a_continuation_reads() {
        // Blocks of 4, chunks of 8: layer 0 chunked, layer 1 global.
        let c = config(&[true, false], 8);
        let pool = BlockPool::new(4, Some(64));
        let mut prefix = PrefixCache::for_tests(pool.clone(), &c).unwrap();
        // 14 tokens: the chunked layer holds 8..14 only when they are published.
        let a: Vec<u32> = (0..14).collect();
        let cache = filled(&pool, &c, &a);
        let chain = chain_of(&prefix, &a);
        assert_eq!(chain.len(), 3);
        prefix.publish(&chain, &cache);
        drop(cache);
        // A cut after 12 tokens (chunk 8..16): the chunked layer's block 8..12 is here.
        let hit = prefix.lookup(&chain, 13).unwrap();
        assert_eq!(hit.next_pos, 12);
        assert_eq!(
            (hit.layers[0].start_pos, hit.layers[0].len),
            (8, 4),
            "the chunked layer starts at its chunk"
        );
        assert_eq!((hit.layers[1].start_pos, hit.layers[1].len), (0, 12));
        // A cut after 8 tokens is a chunk start: nothing of the chunked layer is read.
        let hit = prefix.lookup(&chain[..2], 9).unwrap();
        assert_eq!((hit.next_pos, hit.layers[0].len), (8, 0));
        // A cut after 4 tokens would need the chunked layer's block 0..4, let go: the
        // first block alone serves nothing.
        assert!(prefix.lookup(&chain[..1], 7).is_none());
    }

    /// The pool runs out: the least recently used chain goes first, its tail before its
    /// head; entries a running sequence holds are passed over (they would free nothing) and
    /// come back only when it lets go; nothing is evicted when eviction cannot free enough.
    #[test]
    fn eviction_frees_the_least_recently_used_tail_first() {
        let c = config(&[false], 8);
        let pool = BlockPool::new(4, Some(6));
        let mut prefix = PrefixCache::for_tests(pool.clone(), &c).unwrap();
        let a: Vec<u32> = (0..12).collect();
        let b: Vec<u32> = (100..112).collect();
        for t in [&a, &b] {
            let cache = filled(&pool, &c, t);
            prefix.publish(&chain_of(&prefix, t), &cache);
        }
        assert_eq!((prefix.blocks(), pool.available()), (6, 0));
        // `a` used again: `b` is older, and its last block goes first.
        assert_eq!(prefix.evictable(), 6);
        let held = prefix.lookup(&chain_of(&prefix, &a), 13).unwrap();
        assert_eq!(prefix.evictable(), 3, "a's blocks are held");
        // Four blocks cannot be freed while `a`'s are held: nothing is evicted for them.
        assert!(!prefix.make_room(4));
        assert_eq!((prefix.blocks(), prefix.evicted()), (6, 0));
        assert!(prefix.make_room(1));
        assert_eq!(
            (prefix.blocks(), prefix.evicted(), pool.available()),
            (5, 1, 1)
        );
        assert_eq!(
            prefix.lookup(&chain_of(&prefix, &b), 13).unwrap().next_pos,
            8,
            "b's head is still here"
        );
        // All that can go: `b`'s blocks; what `held` shares stays until it is dropped.
        assert!(prefix.make_room(3));
        assert_eq!((prefix.blocks(), pool.available()), (3, 3));
        drop(held);
        assert_eq!(prefix.evictable(), 3);
        assert!(prefix.make_room(6));
        assert_eq!((prefix.blocks(), pool.available()), (0, 6));
    }

    /// Image patches are part of a block's name: the same token ids with other vision rows
    /// are another prefix.
    #[test]
    fn image_rows_are_part_of_the_name() {
        let c = config(&[false], 8);
        let pool = BlockPool::new(4, Some(8));
        let prefix = PrefixCache::for_tests(pool, &c).unwrap();
        let tokens = [1, 2, 3, 4];
        let name = |rows: &'static [f32]| {
            let mut chain = Vec::new();
            prefix.extend(&mut chain, &tokens, 1, |_, _| rows);
            chain
        };
        assert_eq!(name(&[1.0, 2.0]), name(&[1.0, 2.0]));
        assert_ne!(name(&[1.0, 2.0]), name(&[1.0, 2.5]));
        assert_ne!(name(&[]), name(&[1.0, 2.0]));
    }
}
