//! Prefix-aware routing: which attention worker most likely holds a prompt's prefix in its
//! prefix cache, as llm-d's scheduler and SGLang's router guess it.
//!
//! The gateway remembers, for the blocks of [`BLOCK_TOKENS`] token ids of every prompt it
//! sent (named by a hash chain over the ids up to each block's end), the workers it sent
//! them to. A new prompt goes to the worker that was sent its longest prefix, unless that
//! worker's load (running plus waiting sequences) is more than [`LOAD_SLACK`] above the
//! least loaded candidate's: a shared system prompt then spreads over every worker instead
//! of piling onto one. This is a hint only: a worker may have evicted the blocks, and images
//! are not part of the names (the worker's own cache names them by content).
//!
//! Plain data in, a choice out: no clock, no I/O. The memory is bounded (least recently
//! used names go first).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Token ids per remembered block (the attention workers' default KV block).
pub const BLOCK_TOKENS: usize = 16;
/// Block names remembered at most.
pub const BLOCKS_MAX: usize = 1 << 16;
/// Blocks of one prompt looked at (and remembered) at most.
const PROMPT_BLOCKS_MAX: usize = 1 << 12;
/// Workers remembered per block.
const HOLDERS_MAX: usize = 4;
/// Sequences a holder may carry beyond the least loaded candidate and still be chosen.
pub const LOAD_SLACK: u64 = 8;

/// A candidate worker as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub address: &'a str,
    /// Running plus waiting sequences, as last reported.
    pub load: u64,
}

#[derive(Debug, Default)]
struct Held {
    /// Most recent last.
    workers: Vec<String>,
    used: u64,
}

/// The prompts sent lately and where they went.
#[derive(Debug, Default)]
pub struct PrefixRoutes {
    blocks: HashMap<u64, Held>,
    /// Least recently used first: (tick, name).
    order: BTreeMap<u64, u64>,
    tick: u64,
}

/// The names of `prompt`'s full blocks (the first [`PROMPT_BLOCKS_MAX`]).
pub fn chain(prompt: &[u32]) -> Vec<u64> {
    let mut prev = 0u64;
    prompt
        .chunks_exact(BLOCK_TOKENS)
        .take(PROMPT_BLOCKS_MAX)
        .map(|block| {
            // A fixed hasher: the names only steer routing, and must be stable per process.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            prev.hash(&mut h);
            block.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

impl PrefixRoutes {
    /// Leading blocks of `chain` that were sent to `worker`.
    fn matched(&self, chain: &[u64], worker: &str) -> usize {
        chain
            .iter()
            .take_while(|k| {
                self.blocks
                    .get(k)
                    .is_some_and(|h| h.workers.iter().any(|w| w == worker))
            })
            .count()
    }

    /// The candidate to send a prompt named by `chain` to, when one holds a prefix of it
    /// and is not overloaded: the longest prefix, then the least load, then the first.
    pub fn holder<'a>(&self, chain: &[u64], candidates: &[Candidate<'a>]) -> Option<&'a str> {
        let least = candidates.iter().map(|c| c.load).min()?;
        candidates
            .iter()
            .filter(|c| c.load <= least + LOAD_SLACK)
            .map(|c| (self.matched(chain, c.address), c))
            .filter(|&(m, _)| m > 0)
            .max_by(|(ma, a), (mb, b)| ma.cmp(mb).then(b.load.cmp(&a.load)))
            .map(|(_, c)| c.address)
    }

    /// Remembers that the prompt named by `chain` went to `worker`.
    pub fn record(&mut self, chain: &[u64], worker: &str) {
        // The tail of a chain gets the older ticks: it goes before its head.
        for &k in chain.iter().rev() {
            let held = self.blocks.entry(k).or_default();
            self.order.remove(&held.used);
            held.used = self.tick;
            self.tick += 1;
            self.order.insert(held.used, k);
            held.workers.retain(|w| w != worker);
            held.workers.push(worker.to_owned());
            if held.workers.len() > HOLDERS_MAX {
                held.workers.remove(0);
            }
        }
        while self.blocks.len() > BLOCKS_MAX {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            self.blocks.remove(&k);
        }
    }

    /// Block names remembered.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(prefix: u32, blocks: usize, suffix: u32) -> Vec<u32> {
        let mut p: Vec<u32> = (0..(blocks * BLOCK_TOKENS) as u32)
            .map(|i| prefix * 100_000 + i)
            .collect();
        p.extend([suffix; 5]);
        p
    }

    fn candidates(loads: &[(&'static str, u64)]) -> Vec<Candidate<'static>> {
        loads
            .iter()
            .map(|&(address, load)| Candidate { address, load })
            .collect()
    }

    #[test]
    fn a_prompt_goes_to_the_worker_that_was_sent_its_prefix() {
        let mut routes = PrefixRoutes::default();
        routes.record(&chain(&prompt(1, 8, 0)), "a");
        routes.record(&chain(&prompt(2, 8, 0)), "b");
        let even = candidates(&[("a", 3), ("b", 3), ("c", 0)]);
        // Table: (prompt, chosen).
        let cases = [
            (prompt(1, 8, 7), Some("a")),
            (prompt(2, 8, 7), Some("b")),
            (prompt(3, 8, 7), None),
            // Shorter than one block: nothing to match.
            (vec![1, 2, 3], None),
        ];
        for (p, want) in cases {
            assert_eq!(routes.holder(&chain(&p), &even), want);
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_load_breaks_ties() {
        let mut routes = PrefixRoutes::default();
        let long = prompt(1, 8, 0);
        routes.record(&chain(&long[..4 * BLOCK_TOKENS]), "a");
        routes.record(&chain(&long), "b");
        let c = candidates(&[("a", 0), ("b", 5)]);
        assert_eq!(routes.holder(&chain(&long), &c), Some("b"));
        // Both hold the first four blocks: the less loaded one takes a four-block prompt.
        assert_eq!(
            routes.holder(&chain(&long[..4 * BLOCK_TOKENS + 3]), &c),
            Some("a")
        );
    }

    #[test]
    fn an_overloaded_holder_is_passed_over() {
        let mut routes = PrefixRoutes::default();
        let p = prompt(1, 8, 0);
        routes.record(&chain(&p), "a");
        let busy = candidates(&[("a", LOAD_SLACK + 1), ("b", 0)]);
        assert_eq!(routes.holder(&chain(&p), &busy), None);
        let fine = candidates(&[("a", LOAD_SLACK), ("b", 0)]);
        assert_eq!(routes.holder(&chain(&p), &fine), Some("a"));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_names_go_first() {
        let mut routes = PrefixRoutes::default();
        let old = prompt(0, 4, 0);
        routes.record(&chain(&old), "a");
        let mut n = 1;
        while routes.len() < BLOCKS_MAX {
            routes.record(&chain(&prompt(n, 64, 0)), "b");
            n += 1;
        }
        routes.record(&chain(&prompt(n, 64, 0)), "b");
        assert!(routes.len() <= BLOCKS_MAX);
        assert_eq!(routes.holder(&chain(&old), &candidates(&[("a", 0)])), None);
    }
}
