//! The decoder on a GPU (`--device cuda:N`): the same steps as `Model::forward_with`, with
//! every dense weight on the device in bf16, products through cuBLAS ([`Gemm`], f32 by
//! default), NVRTC kernels for the norms, RoPE, SwiGLU, the router and attention, and the
//! keys and values in a paged store on the device, addressed by the block ids of the
//! sequences' `KvCache`s (which keep the bookkeeping on the host).
//!
//! Per step: embeddings are gathered on the host and copied over; each layer runs on the
//! device; a MoE layer's router result and normed input come back to the host to be grouped
//! and sent through the `ExpertRunner` (local GPU experts, or expert workers over the
//! network), while the shared expert runs on the device. Batches are not split into
//! micro-batches here.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::experts::GpuExperts;
use super::gemm::{addr, DeviceWeight, Gemm, MatPtr, Precision};
use super::{driver_error as err, CudaError};
use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockPool, BLOCK_TOKENS};
use crate::linear::Linear;
use crate::model::{FeedForward, Forward, LogitRows, Model, Sequence};
use crate::moe::{plan_groups, routed_inputs, Experts, Mlp, PendingExperts, Route, RoutedBatch};

/// Where a forward pass spends its time, when `EXPERTMESH_GPU_PROFILE` is set: each phase
/// ends with a stream synchronization (which slows the pass down), and every pass prints one
/// line to stderr.
struct Phases<'a> {
    stream: Option<&'a CudaStream>,
    last: std::time::Instant,
    spent: [std::time::Duration; PHASES.len()],
}

const PHASES: [&str; 7] = [
    "embed",
    "attention",
    "dense mlp",
    "router",
    "shared expert",
    "routed experts",
    "logits",
];

impl<'a> Phases<'a> {
    fn new(stream: &'a CudaStream) -> Self {
        let on = std::env::var_os("EXPERTMESH_GPU_PROFILE").is_some();
        Self {
            stream: on.then_some(stream),
            last: std::time::Instant::now(),
            spent: Default::default(),
        }
    }

    /// Ends phase `i`.
    fn end(&mut self, i: usize) -> Result<()> {
        if let Some(s) = self.stream {
            s.synchronize().map_err(driver)?;
            let now = std::time::Instant::now();
            self.spent[i] += now - self.last;
            self.last = now;
        }
        Ok(())
    }

    fn report(&self, tokens: usize) {
        if self.stream.is_some() {
            let parts: Vec<String> = PHASES
                .iter()
                .zip(&self.spent)
                .map(|(name, d)| format!("{name} {:.3}", d.as_secs_f64() * 1e3))
                .collect();
            eprintln!("gpu forward, {tokens} tokens (ms): {}", parts.join(", "));
        }
    }
}

/// One block of 256 threads per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dev(e: CudaError) -> ModelError {
    ModelError::Device(e.to_string())
}

fn driver(e: cudarc::driver::DriverError) -> ModelError {
    dev(err(e))
}

struct Kernels {
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
    fn load(m: &Arc<CudaModule>) -> std::result::Result<Self, CudaError> {
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
}

struct GpuMlp {
    gate: DeviceWeight,
    up: DeviceWeight,
    down: DeviceWeight,
}

enum GpuFeedForward {
    Dense(GpuMlp),
    Moe {
        router: DeviceWeight,
        shared: GpuMlp,
    },
}

struct GpuLayer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    q: DeviceWeight,
    k: DeviceWeight,
    v: DeviceWeight,
    o: DeviceWeight,
    ff: GpuFeedForward,
}

/// Keys and values of every block of one pool: `[blocks, block_tokens, kv_heads·d]` each.
struct KvStore {
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

/// A model's copy on one GPU.
pub struct GpuModel {
    gemm: Gemm,
    kernels: Kernels,
    precision: Precision,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    lm_head: DeviceWeight,
    inv_freq: CudaSlice<f32>,
    /// The routed experts, when the model holds them (copied on first use).
    experts: Option<GpuExperts>,
    /// The pool of `Model::new_cache` (single requests).
    default_pool: Arc<BlockPool>,
    /// One forward pass at a time on the device.
    running: Mutex<()>,
    /// "cuda:N name".
    pub device: String,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Blocks of the default pool: every layer's cache of one sequence up to 32 768 positions
/// (or the context, when shorter).
fn default_blocks(model: &Model) -> usize {
    let c = model.config();
    c.num_hidden_layers * c.max_position_embeddings.min(32_768).div_ceil(BLOCK_TOKENS)
}

impl GpuModel {
    /// Copies `model`'s dense weights to device `ordinal`.
    pub fn new(model: &Model, ordinal: usize, precision: Precision) -> Result<Self> {
        let super::Opened {
            info,
            stream,
            module,
            blas,
            ..
        } = super::open(ordinal).map_err(dev)?;
        let head_dim = model.config().head_dim;
        if head_dim > super::ATTENTION_MAX_HEAD_DIM {
            return Err(ModelError::Device(format!(
                "head_dim {head_dim}: the CUDA attention kernel takes at most {}",
                super::ATTENTION_MAX_HEAD_DIM
            )));
        }
        let s = &stream;
        let up = |l: &Linear| DeviceWeight::upload(s, &l.weight, l.layout).map_err(dev);
        let vector = |v: &[f32]| s.clone_htod(v).map_err(driver);
        let mlp = |m: &Mlp| -> Result<GpuMlp> {
            Ok(GpuMlp {
                gate: up(&m.gate)?,
                up: up(&m.up)?,
                down: up(&m.down)?,
            })
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut has_experts = false;
        for layer in &model.layers {
            let a = &layer.attention;
            let ff = match &layer.feed_forward {
                FeedForward::Dense(m) => GpuFeedForward::Dense(mlp(m)?),
                FeedForward::Moe(m) => {
                    has_experts |= m.experts.is_some();
                    GpuFeedForward::Moe {
                        router: up(&m.router)?,
                        shared: mlp(&m.shared)?,
                    }
                }
            };
            layers.push(GpuLayer {
                input_norm: vector(&layer.input_norm)?,
                post_norm: vector(&layer.post_attention_norm)?,
                q: up(&a.q)?,
                k: up(&a.k)?,
                v: up(&a.v)?,
                o: up(&a.o)?,
                ff,
            });
        }
        let c = model.config();
        let inv_freq = match model.layers.first() {
            Some(l) => vector(l.attention.rope.inv_freq())?,
            None => vector(&[0.0])?,
        };
        let experts = if has_experts {
            Some(
                GpuExperts::new(ordinal, c.hidden_size, c.intermediate_size, precision)
                    .map_err(dev)?,
            )
        } else {
            None
        };
        Ok(Self {
            kernels: Kernels::load(&module).map_err(dev)?,
            precision,
            layers,
            norm: vector(&model.norm)?,
            lm_head: up(&model.lm_head)?,
            inv_freq,
            experts,
            default_pool: BlockPool::new_device(BLOCK_TOKENS, default_blocks(model)),
            running: Mutex::new(()),
            device: format!("cuda:{ordinal} {}", info.name),
            gemm: Gemm::new(stream, blas, &module).map_err(dev)?,
        })
    }

    pub fn default_pool(&self) -> Arc<BlockPool> {
        self.default_pool.clone()
    }

    /// Runs a routed batch on the model's own experts, on this GPU.
    pub fn run_local(&self, model: &Model, batch: RoutedBatch) -> Result<PendingExperts> {
        let experts: &Experts = model
            .layers
            .get(batch.layer)
            .and_then(|l| match &l.feed_forward {
                FeedForward::Moe(m) => m.experts.as_ref(),
                FeedForward::Dense(_) => None,
            })
            .ok_or(ModelError::NoLocalExperts)?;
        let gpu = self.experts.as_ref().ok_or(ModelError::NoLocalExperts)?;
        let out = gpu
            .run_groups(batch.layer as u32, experts, &batch.groups, &batch.inputs)
            .map_err(dev)?;
        Ok(PendingExperts::later(move || Ok(out)))
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.gemm.stream
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream().clone_htod(v).map_err(driver)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream().alloc_zeros::<f32>(n.max(1)).map_err(driver)
    }

    fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        d: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut v = self.stream().clone_dtoh(d).map_err(driver)?;
        v.truncate(n);
        Ok(v)
    }

    /// `y[rows, dim] = rms_norm(x) · w`.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    fn rms_norm(&self, x: u64, w: u64, y: u64, rows: usize, dim: usize, eps: f32) -> Result<()> {
        let (rows_i, dim_i) = (rows as i32, dim as i32);
        // SAFETY: x and y hold rows × dim f32, w dim f32.
        unsafe {
            self.stream()
                .launch_builder(&self.kernels.rms_norm)
                .arg(&x)
                .arg(&w)
                .arg(&y)
                .arg(&rows_i)
                .arg(&dim_i)
                .arg(&eps)
                .launch(per_row(rows))
        }
        .map(drop)
        .map_err(driver)
    }

    /// The weightless RMS norm of each of `vectors` head vectors of `dim`, in place.
    #[allow(unsafe_code)]
    fn head_norm(&self, x: u64, vectors: usize, dim: usize, eps: f32) -> Result<()> {
        let (vectors_i, dim_i) = (vectors as i32, dim as i32);
        // SAFETY: x holds vectors × dim f32.
        unsafe {
            self.stream()
                .launch_builder(&self.kernels.head_rms_norm)
                .arg(&x)
                .arg(&vectors_i)
                .arg(&dim_i)
                .arg(&eps)
                .launch(per_row(vectors))
        }
        .map(drop)
        .map_err(driver)
    }

    /// `out += down(silu(gate(x)) ⊙ up(x))`, with `gu` and `act` as scratch.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    fn mlp(
        &self,
        m: &GpuMlp,
        x: u64,
        t: usize,
        h: usize,
        gu: u64,
        act: u64,
        out: u64,
    ) -> Result<()> {
        let i = m.gate.out_dim;
        let p = self.precision;
        let xm = MatPtr { ptr: x, ld: h };
        let g = &self.gemm;
        g.linear(p, t, xm, &m.gate, MatPtr { ptr: gu, ld: 2 * i }, false)
            .map_err(dev)?;
        let up = MatPtr {
            ptr: gu + (i * 4) as u64,
            ld: 2 * i,
        };
        g.linear(p, t, xm, &m.up, up, false).map_err(dev)?;
        let (rows_i, inter_i) = (t as i32, i as i32);
        // SAFETY: gu holds t × 2i values, act t × i.
        unsafe {
            self.stream()
                .launch_builder(&self.kernels.swiglu)
                .arg(&gu)
                .arg(&act)
                .arg(&rows_i)
                .arg(&inter_i)
                .launch(LaunchConfig::for_num_elems((t * i) as u32))
        }
        .map_err(driver)?;
        g.linear(
            p,
            t,
            MatPtr { ptr: act, ld: i },
            &m.down,
            MatPtr { ptr: out, ld: h },
            true,
        )
        .map_err(dev)
    }

    /// `y += x` over `n` values.
    #[allow(unsafe_code)]
    fn add(&self, y: u64, x: u64, n: usize) -> Result<()> {
        let n = n as i64;
        // SAFETY: y and x hold n f32.
        unsafe {
            self.stream()
                .launch_builder(&self.kernels.add)
                .arg(&y)
                .arg(&x)
                .arg(&n)
                .launch(LaunchConfig::for_num_elems(n as u32))
        }
        .map(drop)
        .map_err(driver)
    }

    /// The forward pass of `Model::forward_with` on the device. The caller has checked the
    /// tokens and that the pool has the blocks the step takes.
    #[allow(unsafe_code, clippy::too_many_lines)]
    pub fn forward(
        &self,
        model: &Model,
        batch: &mut [Sequence<'_>],
        rows: LogitRows,
        runner: &dyn crate::moe::ExpertRunner,
    ) -> Result<Forward> {
        let Some(first) = batch.first() else {
            let moe_layers = model.config().moe_layers.len();
            return Ok(Forward {
                logits: Vec::new(),
                rows: 0,
                routes: vec![Vec::new(); moe_layers],
            });
        };
        let pool = first.cache.pool().clone();
        if !pool.is_device() || batch.iter().any(|s| !Arc::ptr_eq(s.cache.pool(), &pool)) {
            return Err(ModelError::Device(
                "a GPU forward pass needs every sequence's cache in one device pool \
                 (Model::new_pool / new_cache)"
                    .into(),
            ));
        }
        let _running = self.running.lock().expect("forward lock");
        let c = model.config();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let (qw, kw) = (heads * d, kv_heads * d);
        let t: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let bt = pool.block_tokens();
        let blocks = pool.capacity().unwrap_or(0);
        let store = pool.attachment(|| -> Result<KvStore> {
            Ok(KvStore {
                k: self.zeros(blocks * bt * kw)?,
                v: self.zeros(blocks * bt * kw)?,
            })
        })?;
        let s = self.stream();
        let (k_store, v_store) = (addr(&store.k, s), addr(&store.v, s));

        let mut hidden_host = vec![0.0f32; t * h];
        let ids = batch.iter().flat_map(|s| s.tokens.iter());
        for (row, &id) in hidden_host.chunks_exact_mut(h).zip(ids) {
            model.embed.read_f32(id as usize * h, row);
        }
        let (mut q_seq, mut q_pos) = (Vec::with_capacity(t), Vec::with_capacity(t));
        for (i, sq) in batch.iter().enumerate() {
            for j in 0..sq.tokens.len() {
                q_seq.push(i as i32);
                q_pos.push((sq.cache.next_pos + j) as i32);
            }
        }
        let hidden = self.upload(&hidden_host)?;
        let (q_seq_d, q_pos_d) = (self.upload(&q_seq)?, self.upload(&q_pos)?);
        let inter = c.intermediate_size.max(c.intermediate_size_mlp);
        let bufs = [
            t * h,
            t * qw,
            t * kw,
            t * kw,
            t * qw,
            t * 2 * inter,
            t * inter,
            t * c.num_local_experts.max(1),
            t,
        ];
        let b: Vec<CudaSlice<f32>> = bufs.iter().map(|&n| self.zeros(n)).collect::<Result<_>>()?;
        let [x, q, k, v, attn, gu, act, router_logits, scores] =
            [0, 1, 2, 3, 4, 5, 6, 7, 8].map(|i| addr(&b[i], s));
        let experts_d = s.alloc_zeros::<i32>(t.max(1)).map_err(driver)?;
        let hid = addr(&hidden, s);
        let (q_seq_p, q_pos_p) = (addr(&q_seq_d, s), addr(&q_pos_d, s));
        let eps = c.rms_norm_eps;
        let p = self.precision;
        let g = &self.gemm;
        let mut routes_all: Vec<Vec<Route>> = Vec::new();
        let mut moe_index = 0;

        let mut temperature: Option<CudaSlice<f32>> = None;
        let mut phases = Phases::new(s);
        phases.end(0)?;
        for (l, (layer, cpu)) in self.layers.iter().zip(&model.layers).enumerate() {
            let a = &cpu.attention;
            self.rms_norm(hid, addr(&layer.input_norm, s), x, t, h, eps)?;
            let xm = MatPtr { ptr: x, ld: h };
            g.linear(p, t, xm, &layer.q, MatPtr { ptr: q, ld: qw }, false)
                .map_err(dev)?;
            g.linear(p, t, xm, &layer.k, MatPtr { ptr: k, ld: kw }, false)
                .map_err(dev)?;
            g.linear(p, t, xm, &layer.v, MatPtr { ptr: v, ld: kw }, false)
                .map_err(dev)?;
            if a.use_rope {
                let inv = addr(&self.inv_freq, s);
                for (buf, nh) in [(q, heads), (k, kv_heads)] {
                    let args = [t as i32, nh as i32, d as i32];
                    let pairs = t * nh * d / 2;
                    // SAFETY: buf holds t × nh × d f32, positions t ints, inv_freq d/2 f32.
                    unsafe {
                        s.launch_builder(&self.kernels.rope)
                            .arg(&buf)
                            .arg(&q_pos_p)
                            .arg(&inv)
                            .arg(&args[0])
                            .arg(&args[1])
                            .arg(&args[2])
                            .launch(LaunchConfig::for_num_elems(pairs as u32))
                    }
                    .map_err(driver)?;
                    if a.qk_norm {
                        self.head_norm(buf, t * nh, d, a.eps)?;
                    }
                }
            } else if a.temperature_tuning {
                // The scale in f64, as the CPU computes it (once per step: every NoPE layer
                // shares it), then one multiply per row.
                if temperature.is_none() {
                    let scale: Vec<f32> = q_pos
                        .iter()
                        .map(|&pos| {
                            let steps = ((f64::from(pos) + 1.0) / a.floor_scale).floor();
                            (steps.ln_1p() * a.attn_scale + 1.0) as f32
                        })
                        .collect();
                    temperature = Some(self.upload(&scale)?);
                }
                let scale_d = temperature.as_ref().expect("made above");
                let (rows_i, dim_i) = (t as i32, qw as i32);
                // SAFETY: q holds t × qw f32, scale t f32.
                unsafe {
                    s.launch_builder(&self.kernels.scale_rows)
                        .arg(&q)
                        .arg(scale_d)
                        .arg(&rows_i)
                        .arg(&dim_i)
                        .launch(LaunchConfig::for_num_elems((t * qw) as u32))
                }
                .map_err(driver)?;
            }
            // Room in the caches, keys and values written, then attention over them. The
            // layer's slots, first positions and block table go over in one copy.
            let max_blocks = batch
                .iter()
                .map(|sq| sq.cache.layers[l].blocks_after(bt, sq.tokens.len()))
                .max()
                .unwrap_or(1);
            let n = batch.len();
            let mut meta = vec![0i32; t + n + n * max_blocks];
            let (slots, rest) = meta.split_at_mut(t);
            let (first, table) = rest.split_at_mut(n);
            let mut row = 0;
            for (i, sq) in batch.iter_mut().enumerate() {
                let (pool, cache) = sq.cache.layer_mut(l);
                let new = cache.extend_slots(pool, sq.tokens.len());
                slots[row..row + new.len()].copy_from_slice(&new);
                row += new.len();
                first[i] = cache.start_pos as i32;
                for (j, id) in cache.block_ids().enumerate() {
                    table[i * max_blocks + j] = id as i32;
                }
            }
            let meta_d = self.upload(&meta)?;
            let slots_d = addr(&meta_d, s);
            let first_d = slots_d + (t * 4) as u64;
            let table_d = first_d + (n * 4) as u64;
            for (src, dst) in [(k, k_store), (v, v_store)] {
                let (rows_i, width) = (t as i32, kw as i32);
                // SAFETY: src holds t × kw f32; every slot is below the store's blocks × bt.
                unsafe {
                    s.launch_builder(&self.kernels.kv_write)
                        .arg(&src)
                        .arg(&dst)
                        .arg(&slots_d)
                        .arg(&rows_i)
                        .arg(&width)
                        .launch(LaunchConfig::for_num_elems((t * kw) as u32))
                }
                .map_err(driver)?;
            }
            let chunk = if a.use_rope { a.chunk as i32 } else { 0 };
            let args = [t, heads, kv_heads, d, bt, max_blocks].map(|v| v as i32);
            let scale = 1.0 / (d as f32).sqrt();
            // SAFETY: the buffers hold what the kernel's comment describes for these sizes.
            unsafe {
                s.launch_builder(&self.kernels.attention)
                    .arg(&q)
                    .arg(&k_store)
                    .arg(&v_store)
                    .arg(&table_d)
                    .arg(&first_d)
                    .arg(&q_seq_p)
                    .arg(&q_pos_p)
                    .arg(&attn)
                    .arg(&args[0])
                    .arg(&args[1])
                    .arg(&args[2])
                    .arg(&args[3])
                    .arg(&args[4])
                    .arg(&args[5])
                    .arg(&chunk)
                    .arg(&scale)
                    .launch(LaunchConfig {
                        grid_dim: (t as u32, heads as u32, 1),
                        block_dim: (super::ATTENTION_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })
            }
            .map_err(driver)?;
            if a.use_rope {
                for sq in batch.iter_mut() {
                    let end = sq.cache.next_pos + sq.tokens.len();
                    let (pool, cache) = sq.cache.layer_mut(l);
                    // Stream order keeps this step's reads before any reuse of the blocks.
                    cache.drop_before(pool, end - end % a.chunk);
                }
            }
            let am = MatPtr { ptr: attn, ld: qw };
            g.linear(p, t, am, &layer.o, MatPtr { ptr: hid, ld: h }, true)
                .map_err(dev)?;

            self.rms_norm(hid, addr(&layer.post_norm, s), x, t, h, eps)?;
            phases.end(1)?;
            match &layer.ff {
                GpuFeedForward::Dense(m) => {
                    self.mlp(m, x, t, h, gu, act, hid)?;
                    phases.end(2)?;
                }
                GpuFeedForward::Moe { router, shared } => {
                    let e = router.out_dim;
                    let rm = MatPtr {
                        ptr: router_logits,
                        ld: e,
                    };
                    g.linear(p, t, xm, router, rm, false).map_err(dev)?;
                    let (t_i, e_i) = (t as i32, e as i32);
                    let expert_p = addr(&experts_d, s);
                    // SAFETY: logits t × e f32; expert t ints; scores t f32.
                    unsafe {
                        s.launch_builder(&self.kernels.router)
                            .arg(&router_logits)
                            .arg(&t_i)
                            .arg(&e_i)
                            .arg(&expert_p)
                            .arg(&scores)
                            .launch(LaunchConfig::for_num_elems(t as u32))
                    }
                    .map_err(driver)?;
                    let expert_ids = self.download(&experts_d, t)?;
                    let score_v = self.download(&b[8], t)?;
                    let x_host = self.download(&b[0], t * h)?;
                    let routes: Vec<Route> = expert_ids
                        .iter()
                        .zip(&score_v)
                        .map(|(&e, &score)| Route {
                            expert: e as u32,
                            score,
                        })
                        .collect();
                    let (groups, order) = plan_groups(&routes);
                    let inputs = routed_inputs(&x_host, h, &routes, &order);
                    phases.end(3)?;
                    let pending = runner.start(RoutedBatch {
                        moe_index,
                        layer: l,
                        groups,
                        hidden: h,
                        inputs,
                    })?;
                    phases.end(5)?;
                    // The shared expert is queued on the device while the routed rows are away.
                    self.mlp(shared, x, t, h, gu, act, hid)?;
                    phases.end(4)?;
                    let routed = pending.wait()?;
                    let mut scattered = vec![0.0f32; t * h];
                    for (&r, y) in order.iter().zip(routed.chunks_exact(h)) {
                        scattered[r * h..(r + 1) * h].copy_from_slice(y);
                    }
                    let routed_d = self.upload(&scattered)?;
                    self.add(hid, addr(&routed_d, s), t * h)?;
                    phases.end(5)?;
                    routes_all.push(routes);
                    moe_index += 1;
                }
            }
        }
        for sq in batch.iter_mut() {
            sq.cache.next_pos += sq.tokens.len();
        }

        let picked: Vec<usize> = match rows {
            LogitRows::All => (0..t).collect(),
            LogitRows::Last => {
                let mut end = 0;
                batch
                    .iter()
                    .map(|sq| {
                        end += sq.tokens.len();
                        end - 1
                    })
                    .collect()
            }
        };
        let n = picked.len();
        let hidden_host = self.download(&hidden, t * h)?;
        let mut selected = Vec::with_capacity(n * h);
        for r in &picked {
            selected.extend_from_slice(&hidden_host[r * h..(r + 1) * h]);
        }
        let sel = self.upload(&selected)?;
        let normed = self.zeros(n * h)?;
        let vocab = self.lm_head.out_dim;
        let logits = self.zeros(n * vocab)?;
        self.rms_norm(
            addr(&sel, s),
            addr(&self.norm, s),
            addr(&normed, s),
            n,
            h,
            eps,
        )?;
        let nm = MatPtr {
            ptr: addr(&normed, s),
            ld: h,
        };
        g.linear(
            p,
            n,
            nm,
            &self.lm_head,
            MatPtr {
                ptr: addr(&logits, s),
                ld: vocab,
            },
            false,
        )
        .map_err(dev)?;
        let logits = self.download(&logits, n * vocab)?;
        phases.end(6)?;
        phases.report(t);
        Ok(Forward {
            logits,
            rows: n,
            routes: routes_all,
        })
    }
}
