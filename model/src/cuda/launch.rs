//! Typed launches of the kernels in `kernels.cu`: one function per kernel, taking device
//! addresses and sizes, with the grid each kernel expects. The CUDA backend
//! ([`super::backend`]) and the kernel tests go through these, so an argument list is
//! written once.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};

use super::{driver_error as err, CudaError};

/// One block of 256 threads per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The shape of one `attention_paged` launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query rows (tokens of every sequence).
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
    /// Columns of the block table (the most blocks any sequence holds).
    pub max_blocks: usize,
    /// The chunk of chunked (RoPE) layers; 0 for global attention.
    pub chunk: usize,
}

/// The device addresses of one `attention_paged` launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionBuffers {
    /// `[rows, heads·d]`.
    pub q: u64,
    /// `[blocks, block_tokens, kv_heads·d]` each.
    pub k_cache: u64,
    pub v_cache: u64,
    /// `[sequences, max_blocks]` block ids.
    pub block_table: u64,
    /// First cached position of each sequence.
    pub first_pos: u64,
    /// Sequence and position of each query row.
    pub q_seq: u64,
    pub q_pos: u64,
    /// `[rows, heads·d]`.
    pub out: u64,
}

/// The kernels of the forward pass, loaded from the compiled module.
pub struct Kernels {
    rms_norm: CudaFunction,
    head_rms_norm: CudaFunction,
    rope: CudaFunction,
    swiglu: CudaFunction,
    router: CudaFunction,
    scale_rows: CudaFunction,
    kv_write: CudaFunction,
    attention: CudaFunction,
    add: CudaFunction,
}

impl Kernels {
    pub fn load(m: &Arc<CudaModule>) -> Result<Self, CudaError> {
        let f = |name: &str| m.load_function(name).map_err(err);
        Ok(Self {
            rms_norm: f("rms_norm")?,
            head_rms_norm: f("head_rms_norm")?,
            rope: f("rope_interleaved")?,
            swiglu: f("swiglu")?,
            router: f("router_top1_sigmoid")?,
            scale_rows: f("scale_rows")?,
            kv_write: f("kv_cache_write")?,
            attention: f("attention_paged")?,
            add: f("add_in_place")?,
        })
    }

    /// `y[rows, dim] = rms_norm(x) · w`.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        s: &CudaStream,
        x: u64,
        w: u64,
        y: u64,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (rows_i, dim_i) = (rows as i32, dim as i32);
        // SAFETY: x and y hold rows × dim f32, w dim f32.
        unsafe {
            s.launch_builder(&self.rms_norm)
                .arg(&x)
                .arg(&w)
                .arg(&y)
                .arg(&rows_i)
                .arg(&dim_i)
                .arg(&eps)
                .launch(per_row(rows))
        }
        .map(drop)
        .map_err(err)
    }

    /// The weightless RMS norm of each of `vectors` head vectors of `dim`, in place.
    #[allow(unsafe_code)]
    pub fn head_norm(
        &self,
        s: &CudaStream,
        x: u64,
        vectors: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (vectors_i, dim_i) = (vectors as i32, dim as i32);
        // SAFETY: x holds vectors × dim f32.
        unsafe {
            s.launch_builder(&self.head_rms_norm)
                .arg(&x)
                .arg(&vectors_i)
                .arg(&dim_i)
                .arg(&eps)
                .launch(per_row(vectors))
        }
        .map(drop)
        .map_err(err)
    }

    /// Interleaved RoPE in place on `x` (`[tokens, heads, d]`) at `positions` (tokens ints).
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub fn rope(
        &self,
        s: &CudaStream,
        x: u64,
        positions: u64,
        inv_freq: u64,
        tokens: usize,
        heads: usize,
        d: usize,
    ) -> Result<(), CudaError> {
        let args = [tokens as i32, heads as i32, d as i32];
        let pairs = tokens * heads * d / 2;
        // SAFETY: x holds tokens × heads × d f32, positions tokens ints, inv_freq d/2 f32.
        unsafe {
            s.launch_builder(&self.rope)
                .arg(&x)
                .arg(&positions)
                .arg(&inv_freq)
                .arg(&args[0])
                .arg(&args[1])
                .arg(&args[2])
                .launch(LaunchConfig::for_num_elems(pairs as u32))
        }
        .map(drop)
        .map_err(err)
    }

    /// `out[rows, inter] = silu(gate) ⊙ up` of `gate_up` (`[rows, 2·inter]`, gate first).
    #[allow(unsafe_code)]
    pub fn swiglu(
        &self,
        s: &CudaStream,
        gate_up: u64,
        out: u64,
        rows: usize,
        inter: usize,
    ) -> Result<(), CudaError> {
        let (rows_i, inter_i) = (rows as i32, inter as i32);
        // SAFETY: gate_up holds rows × 2·inter values, out rows × inter.
        unsafe {
            s.launch_builder(&self.swiglu)
                .arg(&gate_up)
                .arg(&out)
                .arg(&rows_i)
                .arg(&inter_i)
                .launch(LaunchConfig::for_num_elems((rows * inter) as u32))
        }
        .map(drop)
        .map_err(err)
    }

    /// Top-1 expert and its sigmoid score per row of router `logits` (`[tokens, experts]`).
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub fn router(
        &self,
        s: &CudaStream,
        logits: u64,
        tokens: usize,
        experts: usize,
        expert: u64,
        score: u64,
    ) -> Result<(), CudaError> {
        let (t_i, e_i) = (tokens as i32, experts as i32);
        // SAFETY: logits tokens × experts f32; expert tokens ints; score tokens f32.
        unsafe {
            s.launch_builder(&self.router)
                .arg(&logits)
                .arg(&t_i)
                .arg(&e_i)
                .arg(&expert)
                .arg(&score)
                .launch(LaunchConfig::for_num_elems(tokens as u32))
        }
        .map(drop)
        .map_err(err)
    }

    /// Row `i` of `x` (`[rows, dim]`) times `scale[i]`, in place.
    #[allow(unsafe_code)]
    pub fn scale_rows(
        &self,
        s: &CudaStream,
        x: u64,
        scale: u64,
        rows: usize,
        dim: usize,
    ) -> Result<(), CudaError> {
        let (rows_i, dim_i) = (rows as i32, dim as i32);
        // SAFETY: x holds rows × dim f32, scale rows f32.
        unsafe {
            s.launch_builder(&self.scale_rows)
                .arg(&x)
                .arg(&scale)
                .arg(&rows_i)
                .arg(&dim_i)
                .launch(LaunchConfig::for_num_elems((rows * dim) as u32))
        }
        .map(drop)
        .map_err(err)
    }

    /// Rows of `src` (`[tokens, width]`) into `cache` at `slots` (tokens ints).
    #[allow(unsafe_code)]
    pub fn kv_write(
        &self,
        s: &CudaStream,
        src: u64,
        cache: u64,
        slots: u64,
        tokens: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        let (rows_i, width_i) = (tokens as i32, width as i32);
        // SAFETY: src holds tokens × width f32; the caller keeps every slot below the
        // cache's blocks × block_tokens.
        unsafe {
            s.launch_builder(&self.kv_write)
                .arg(&src)
                .arg(&cache)
                .arg(&slots)
                .arg(&rows_i)
                .arg(&width_i)
                .launch(LaunchConfig::for_num_elems((tokens * width) as u32))
        }
        .map(drop)
        .map_err(err)
    }

    /// Attention of every query row over the paged cache (causal by position, chunked
    /// where `shape.chunk` says, GQA, online softmax).
    #[allow(unsafe_code)]
    pub fn attention(
        &self,
        s: &CudaStream,
        b: AttentionBuffers,
        shape: AttentionShape,
    ) -> Result<(), CudaError> {
        let a = shape;
        let args = [
            a.rows,
            a.heads,
            a.kv_heads,
            a.head_dim,
            a.block_tokens,
            a.max_blocks,
            a.chunk,
        ]
        .map(|v| v as i32);
        let scale = 1.0 / (a.head_dim as f32).sqrt();
        // SAFETY: the buffers hold what the kernel's comment describes for these sizes.
        unsafe {
            s.launch_builder(&self.attention)
                .arg(&b.q)
                .arg(&b.k_cache)
                .arg(&b.v_cache)
                .arg(&b.block_table)
                .arg(&b.first_pos)
                .arg(&b.q_seq)
                .arg(&b.q_pos)
                .arg(&b.out)
                .arg(&args[0])
                .arg(&args[1])
                .arg(&args[2])
                .arg(&args[3])
                .arg(&args[4])
                .arg(&args[5])
                .arg(&args[6])
                .arg(&scale)
                .launch(LaunchConfig {
                    grid_dim: (a.rows as u32, a.heads as u32, 1),
                    block_dim: (super::ATTENTION_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
        }
        .map(drop)
        .map_err(err)
    }

    /// `y += x` over `n` values.
    #[allow(unsafe_code)]
    pub fn add(&self, s: &CudaStream, y: u64, x: u64, n: usize) -> Result<(), CudaError> {
        let n = n as i64;
        // SAFETY: y and x hold n f32.
        unsafe {
            s.launch_builder(&self.add)
                .arg(&y)
                .arg(&x)
                .arg(&n)
                .launch(LaunchConfig::for_num_elems(n as u32))
        }
        .map(drop)
        .map_err(err)
    }
}
