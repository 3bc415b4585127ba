//! Per-sequence KV cache for incremental decoding.
//!
//! RoPE layers attend only within their aligned `attention_chunk_size` block (LLAMA4.md
//! §2.4 step 7), so their cache keeps only the current chunk: once the next position
//! starts a new chunk, older keys are dropped. NoPE layers attend to the whole context
//! and keep everything (transformers' "hybrid" cache).

/// Keys and values of one layer for positions `start_pos..start_pos + len`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Absolute position of the first cached row.
    pub start_pos: usize,
    /// `[len, kv_heads · head_dim]` row-major.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl LayerCache {
    pub fn len(&self, row: usize) -> usize {
        self.k.len() / row
    }

    /// Drops rows before `pos` (the start of the chunk the next token falls in).
    pub fn drop_before(&mut self, pos: usize, row: usize) {
        if pos <= self.start_pos {
            return;
        }
        let drop_rows = (pos - self.start_pos).min(self.len(row));
        self.k.drain(..drop_rows * row);
        self.v.drain(..drop_rows * row);
        self.start_pos += drop_rows;
    }
}

/// The cache of one sequence: one `LayerCache` per layer and the next position.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Number of tokens processed so far: the absolute position of the next token.
    pub next_pos: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
            next_pos: 0,
        }
    }

    /// f32 values held, over all layers (for tests and accounting).
    pub fn stored_values(&self) -> usize {
        self.layers.iter().map(|l| l.k.len() + l.v.len()).sum()
    }
}
