//! The CUDA backend (`--device cuda:N`): the operations of the one forward pass
//! (`crate::forward`) on a GPU, with every dense weight on the device in bf16, products
//! through cuBLAS ([`Gemm`], f32 by default), the kernels of [`super::launch`] for the norms,
//! RoPE, SwiGLU, the router and attention, and the keys and values of each block pool in a
//! store this backend owns, addressed by the block ids of the sequences' `KvCache`s (which
//! keep the bookkeeping on the host).
//!
//! A MoE layer's router result and normed input come back to the host to be grouped and
//! sent through the `ExpertRunner` (this GPU's experts, or expert workers over the network);
//! the shared expert is queued on the device while they are away.

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{CudaSlice, CudaStream};

use super::experts::GpuExperts;
use super::gemm::{addr, DeviceWeight, Gemm, MatPtr, Precision};
use super::launch::{AttentionBuffers, AttentionShape, Kernels};
use super::{driver_error as err, CudaError};
use crate::backend::Backend;
use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockPool, BLOCK_TOKENS};
use crate::linear::Linear;
use crate::model::{FeedForward, Model, Sequence};
use crate::moe::{routed_inputs, Mlp, PendingExperts, Route, RoutedBatch};

/// Where a forward pass spends its time, when `EXPERTMESH_GPU_PROFILE` is set: each phase
/// ends with a stream synchronization (which slows the pass down), and every pass prints one
/// line to stderr.
struct Phases {
    on: bool,
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
const EMBED: usize = 0;
const ATTENTION: usize = 1;
const DENSE: usize = 2;
const ROUTER: usize = 3;
const SHARED: usize = 4;
const ROUTED: usize = 5;
const LOGITS: usize = 6;

impl Phases {
    fn new() -> Self {
        Self {
            on: std::env::var_os("EXPERTMESH_GPU_PROFILE").is_some(),
            last: std::time::Instant::now(),
            spent: Default::default(),
        }
    }

    /// Ends phase `i`.
    fn end(&mut self, s: &CudaStream, i: usize) -> Result<()> {
        if self.on {
            s.synchronize().map_err(driver)?;
            let now = std::time::Instant::now();
            self.spent[i] += now - self.last;
            self.last = now;
        }
        Ok(())
    }

    fn add(&mut self, other: &Phases) {
        for (a, b) in self.spent.iter_mut().zip(&other.spent) {
            *a += *b;
        }
    }

    fn report(&self, tokens: usize) {
        if self.on {
            let parts: Vec<String> = PHASES
                .iter()
                .zip(&self.spent)
                .map(|(name, d)| format!("{name} {:.3}", d.as_secs_f64() * 1e3))
                .collect();
            eprintln!("gpu forward, {tokens} tokens (ms): {}", parts.join(", "));
        }
    }
}

fn dev(e: CudaError) -> ModelError {
    ModelError::Device(e.to_string())
}

fn driver(e: cudarc::driver::DriverError) -> ModelError {
    dev(err(e))
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

/// A model's copy on one GPU: the CUDA backend.
pub struct CudaBackend {
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
    /// The key and value store of each pool this backend has computed on, made on first
    /// use; entries of dropped pools go when the next store is made.
    stores: Mutex<Vec<(Weak<BlockPool>, Arc<KvStore>)>>,
    /// One forward pass at a time on the device.
    running: Mutex<()>,
    /// "cuda:N name".
    device: String,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
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

/// Scratch buffers of one micro-batch, by use.
const X: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const ATTN: usize = 4;
const GATE_UP: usize = 5;
const ACT: usize = 6;
const ROUTER_LOGITS: usize = 7;
const SCORES: usize = 8;

/// One micro-batch on the device.
pub struct GpuRows {
    t: usize,
    /// Hidden size.
    h: usize,
    hidden: CudaSlice<f32>,
    /// Indexed by `X`, `Q`, … above.
    scratch: Vec<CudaSlice<f32>>,
    experts: CudaSlice<i32>,
    /// Sequence (within the micro-batch) and absolute position of each row.
    q_seq: CudaSlice<i32>,
    q_pos: CudaSlice<i32>,
    q_pos_host: Vec<i32>,
    /// The NoPE temperature of each row (made by the first NoPE layer).
    temperature: Option<CudaSlice<f32>>,
    store: Arc<KvStore>,
    phases: Phases,
}

impl CudaBackend {
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
        let up = |l: &Linear| {
            if l.is_fp8() {
                return Err(ModelError::Device(
                    "FP8 linear weights are not supported on the GPU yet; serve this \
                     checkpoint with --device cpu"
                        .into(),
                ));
            }
            DeviceWeight::upload(s, &l.weight, l.layout).map_err(dev)
        };
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
            stores: Mutex::new(Vec::new()),
            running: Mutex::new(()),
            device: format!("cuda:{ordinal} {}", info.name),
            gemm: Gemm::new(stream, blas, &module).map_err(dev)?,
        })
    }

    /// "cuda:N name".
    pub fn device_name(&self) -> &str {
        &self.device
    }

    pub fn default_pool(&self) -> Arc<BlockPool> {
        self.default_pool.clone()
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

    /// The key and value store of `pool`, made (zeroed, `capacity` blocks) on first use.
    fn store(&self, pool: &Arc<BlockPool>, kv_width: usize) -> Result<Arc<KvStore>> {
        let mut stores = self.stores.lock().expect("stores lock");
        // A live pool only: a dropped pool's address may be reused by a new one.
        if let Some((_, store)) = stores
            .iter()
            .find(|(p, _)| p.upgrade().is_some_and(|p| Arc::ptr_eq(&p, pool)))
        {
            return Ok(store.clone());
        }
        stores.retain(|(p, _)| p.strong_count() > 0);
        let n = pool.capacity().unwrap_or(0) * pool.block_tokens() * kv_width;
        let store = Arc::new(KvStore {
            k: self.zeros(n)?,
            v: self.zeros(n)?,
        });
        stores.push((Arc::downgrade(pool), store.clone()));
        Ok(store)
    }

    /// `out += down(silu(gate(x)) ⊙ up(x))` over the rows' normed input.
    fn mlp(&self, m: &GpuMlp, r: &GpuRows, h: usize) -> Result<()> {
        let s = self.stream();
        let (t, i, p) = (r.t, m.gate.out_dim, self.precision);
        let [x, gu, act] = [X, GATE_UP, ACT].map(|b| addr(&r.scratch[b], s));
        let xm = MatPtr { ptr: x, ld: h };
        let g = &self.gemm;
        g.linear(p, t, xm, &m.gate, MatPtr { ptr: gu, ld: 2 * i }, false)
            .map_err(dev)?;
        let up = MatPtr {
            ptr: gu + (i * 4) as u64,
            ld: 2 * i,
        };
        g.linear(p, t, xm, &m.up, up, false).map_err(dev)?;
        self.kernels.swiglu(s, gu, act, t, i).map_err(dev)?;
        let out = MatPtr {
            ptr: addr(&r.hidden, s),
            ld: h,
        };
        g.linear(p, t, MatPtr { ptr: act, ld: i }, &m.down, out, true)
            .map_err(dev)
    }

    /// q (and k) position-encoded in place: RoPE and qk-norm, or the NoPE temperature (in
    /// f64 on the host, as the CPU computes it; once per micro-batch, every NoPE layer
    /// shares it).
    fn position_encode(&self, model: &Model, l: usize, r: &mut GpuRows) -> Result<()> {
        let a = &model.layers[l].attention;
        let c = model.config();
        let s = self.stream();
        let (t, d) = (r.t, c.head_dim);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let [q, k] = [Q, K].map(|b| addr(&r.scratch[b], s));
        if a.use_rope {
            let (inv, pos) = (addr(&self.inv_freq, s), addr(&r.q_pos, s));
            for (buf, nh) in [(q, heads), (k, kv_heads)] {
                self.kernels.rope(s, buf, pos, inv, t, nh, d).map_err(dev)?;
                if a.qk_norm {
                    self.kernels
                        .head_norm(s, buf, t * nh, d, a.eps)
                        .map_err(dev)?;
                }
            }
        } else if a.temperature_tuning {
            if r.temperature.is_none() {
                let scale: Vec<f32> = r
                    .q_pos_host
                    .iter()
                    .map(|&pos| {
                        let steps = ((f64::from(pos) + 1.0) / a.floor_scale).floor();
                        (steps.ln_1p() * a.attn_scale + 1.0) as f32
                    })
                    .collect();
                r.temperature = Some(self.upload(&scale)?);
            }
            let scale = addr(r.temperature.as_ref().expect("made above"), s);
            self.kernels
                .scale_rows(s, q, scale, t, heads * d)
                .map_err(dev)?;
        }
        Ok(())
    }

    /// Room in the caches for the new tokens, their keys and values written, and attention
    /// over them into the rows' `ATTN` buffer. The layer's slots, first positions and
    /// block table go over in one copy.
    fn paged_attention(
        &self,
        model: &Model,
        l: usize,
        r: &GpuRows,
        seqs: &mut [Sequence<'_>],
    ) -> Result<()> {
        let c = model.config();
        let s = self.stream();
        let a = &model.layers[l].attention;
        let (t, n) = (r.t, seqs.len());
        let kw = c.num_key_value_heads * c.head_dim;
        let bt = seqs[0].cache.pool().block_tokens();
        let max_blocks = seqs
            .iter()
            .map(|sq| sq.cache.layers[l].blocks_after(bt, sq.tokens.len()))
            .max()
            .unwrap_or(1);
        let mut meta = vec![0i32; t + n + n * max_blocks];
        let (slots, rest) = meta.split_at_mut(t);
        let (first, table) = rest.split_at_mut(n);
        let mut row = 0;
        for (i, sq) in seqs.iter_mut().enumerate() {
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
        let (k_cache, v_cache) = (addr(&r.store.k, s), addr(&r.store.v, s));
        for (src, dst) in [(K, k_cache), (V, v_cache)] {
            let src = addr(&r.scratch[src], s);
            self.kernels
                .kv_write(s, src, dst, slots_d, t, kw)
                .map_err(dev)?;
        }
        let buffers = AttentionBuffers {
            q: addr(&r.scratch[Q], s),
            k_cache,
            v_cache,
            block_table: table_d,
            first_pos: first_d,
            q_seq: addr(&r.q_seq, s),
            q_pos: addr(&r.q_pos, s),
            out: addr(&r.scratch[ATTN], s),
        };
        let shape = AttentionShape {
            rows: t,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_tokens: bt,
            max_blocks,
            chunk: if a.use_rope { a.chunk } else { 0 },
        };
        self.kernels.attention(s, buffers, shape).map_err(dev)
        // `meta_d` is freed here; stream order keeps the launches' reads before any reuse.
    }
}

impl Backend for CudaBackend {
    type Rows = GpuRows;

    fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        let _running = self.running.lock().expect("forward lock");
        f()
    }

    fn check_caches(&self, batch: &[Sequence<'_>]) -> Result<()> {
        let pool = batch[0].cache.pool();
        if !pool.is_device() || batch.iter().any(|s| !Arc::ptr_eq(s.cache.pool(), pool)) {
            return Err(ModelError::Device(
                "a GPU forward pass needs every sequence's cache in one device pool \
                 (Model::new_pool / new_cache)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn embed(&self, model: &Model, seqs: &[Sequence<'_>]) -> Result<GpuRows> {
        let c = model.config();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qw, kw) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut phases = Phases::new();
        let hidden_host = model.embeddings(seqs);
        let (mut q_seq, mut q_pos) = (Vec::with_capacity(t), Vec::with_capacity(t));
        for (i, sq) in seqs.iter().enumerate() {
            for j in 0..sq.tokens.len() {
                q_seq.push(i as i32);
                q_pos.push((sq.cache.next_pos + j) as i32);
            }
        }
        let inter = c.intermediate_size.max(c.intermediate_size_mlp);
        let sizes = [
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
        let rows = GpuRows {
            t,
            h,
            hidden: self.upload(&hidden_host)?,
            scratch: sizes
                .iter()
                .map(|&n| self.zeros(n))
                .collect::<Result<_>>()?,
            experts: self.stream().alloc_zeros::<i32>(t.max(1)).map_err(driver)?,
            q_seq: self.upload(&q_seq)?,
            q_pos: self.upload(&q_pos)?,
            q_pos_host: q_pos,
            temperature: None,
            store: self.store(seqs[0].cache.pool(), kw)?,
            phases: {
                phases.end(self.stream(), EMBED)?;
                phases
            },
        };
        Ok(rows)
    }

    fn attention(
        &self,
        model: &Model,
        l: usize,
        r: &mut GpuRows,
        seqs: &mut [Sequence<'_>],
    ) -> Result<()> {
        let c = model.config();
        let s = self.stream();
        let layer = &self.layers[l];
        let (t, h, eps) = (r.t, c.hidden_size, c.rms_norm_eps);
        let (qw, kw) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let hid = addr(&r.hidden, s);
        let [x, q, k, v, attn] = [X, Q, K, V, ATTN].map(|b| addr(&r.scratch[b], s));
        let ks = &self.kernels;
        ks.rms_norm(s, hid, addr(&layer.input_norm, s), x, t, h, eps)
            .map_err(dev)?;
        let (g, p) = (&self.gemm, self.precision);
        let xm = MatPtr { ptr: x, ld: h };
        for (w, out, width) in [(&layer.q, q, qw), (&layer.k, k, kw), (&layer.v, v, kw)] {
            g.linear(
                p,
                t,
                xm,
                w,
                MatPtr {
                    ptr: out,
                    ld: width,
                },
                false,
            )
            .map_err(dev)?;
        }
        self.position_encode(model, l, r)?;
        self.paged_attention(model, l, r, seqs)?;
        let am = MatPtr { ptr: attn, ld: qw };
        g.linear(p, t, am, &layer.o, MatPtr { ptr: hid, ld: h }, true)
            .map_err(dev)?;
        ks.rms_norm(s, hid, addr(&layer.post_norm, s), x, t, h, eps)
            .map_err(dev)?;
        r.phases.end(s, ATTENTION)
    }

    fn dense(&self, model: &Model, l: usize, r: &mut GpuRows) -> Result<()> {
        let GpuFeedForward::Dense(m) = &self.layers[l].ff else {
            panic!("layer {l} is not a dense layer");
        };
        self.mlp(m, r, model.config().hidden_size)?;
        r.phases.end(self.stream(), DENSE)
    }

    fn route(&self, model: &Model, l: usize, r: &mut GpuRows) -> Result<Vec<Route>> {
        let GpuFeedForward::Moe { router, .. } = &self.layers[l].ff else {
            panic!("layer {l} is not a MoE layer");
        };
        let s = self.stream();
        let (t, h, e) = (r.t, model.config().hidden_size, router.out_dim);
        let [x, logits, scores] = [X, ROUTER_LOGITS, SCORES].map(|b| addr(&r.scratch[b], s));
        let rm = MatPtr { ptr: logits, ld: e };
        self.gemm
            .linear(
                self.precision,
                t,
                MatPtr { ptr: x, ld: h },
                router,
                rm,
                false,
            )
            .map_err(dev)?;
        let expert = addr(&r.experts, s);
        self.kernels
            .router(s, logits, t, e, expert, scores)
            .map_err(dev)?;
        let experts = self.download(&r.experts, t)?;
        let scores = self.download(&r.scratch[SCORES], t)?;
        r.phases.end(s, ROUTER)?;
        Ok(experts
            .iter()
            .zip(&scores)
            .map(|(&e, &score)| Route {
                expert: e as u32,
                score,
            })
            .collect())
    }

    fn routed_inputs(&self, r: &GpuRows, routes: &[Route], order: &[usize]) -> Result<Vec<f32>> {
        let x = self.download(&r.scratch[X], r.t * r.h)?;
        Ok(routed_inputs(&x, r.h, routes, order))
    }

    fn moe_finish(
        &self,
        model: &Model,
        l: usize,
        r: &mut GpuRows,
        order: &[usize],
        pending: PendingExperts,
    ) -> Result<()> {
        let GpuFeedForward::Moe { shared, .. } = &self.layers[l].ff else {
            panic!("layer {l} is not a MoE layer");
        };
        let s = self.stream();
        let h = model.config().hidden_size;
        // The shared expert is queued on the device while the routed rows are away.
        self.mlp(shared, r, h)?;
        r.phases.end(s, SHARED)?;
        let routed = pending.wait()?;
        let mut scattered = vec![0.0f32; r.t * h];
        for (&row, y) in order.iter().zip(routed.chunks_exact(h)) {
            scattered[row * h..(row + 1) * h].copy_from_slice(y);
        }
        let routed_d = self.upload(&scattered)?;
        self.kernels
            .add(s, addr(&r.hidden, s), addr(&routed_d, s), r.t * h)
            .map_err(dev)?;
        r.phases.end(s, ROUTED)
    }

    fn logits(&self, model: &Model, micro: Vec<GpuRows>, picked: &[usize]) -> Result<Vec<f32>> {
        let c = model.config();
        let s = self.stream();
        let h = c.hidden_size;
        let mut phases = Phases::new();
        let mut hidden = Vec::new();
        let mut tokens = 0;
        for r in &micro {
            hidden.extend(self.download(&r.hidden, r.t * h)?);
            phases.add(&r.phases);
            tokens += r.t;
        }
        let n = picked.len();
        let mut selected = Vec::with_capacity(n * h);
        for row in picked {
            selected.extend_from_slice(&hidden[row * h..(row + 1) * h]);
        }
        let sel = self.upload(&selected)?;
        let normed = self.zeros(n * h)?;
        let vocab = self.lm_head.out_dim;
        let logits = self.zeros(n * vocab)?;
        let (sel_p, normed_p) = (addr(&sel, s), addr(&normed, s));
        self.kernels
            .rms_norm(
                s,
                sel_p,
                addr(&self.norm, s),
                normed_p,
                n,
                h,
                c.rms_norm_eps,
            )
            .map_err(dev)?;
        let y = MatPtr {
            ptr: addr(&logits, s),
            ld: vocab,
        };
        self.gemm
            .linear(
                self.precision,
                n,
                MatPtr {
                    ptr: normed_p,
                    ld: h,
                },
                &self.lm_head,
                y,
                false,
            )
            .map_err(dev)?;
        let logits = self.download(&logits, n * vocab)?;
        phases.end(s, LOGITS)?;
        phases.report(tokens);
        Ok(logits)
    }

    fn run_experts(&self, model: &Model, batch: RoutedBatch) -> Result<PendingExperts> {
        let experts = model.routed_experts(batch.layer)?;
        let gpu = self.experts.as_ref().ok_or(ModelError::NoLocalExperts)?;
        let out = gpu
            .run_groups(batch.layer as u32, experts, &batch.groups, &batch.inputs)
            .map_err(dev)?;
        Ok(PendingExperts::later(move || Ok(out)))
    }

    fn new_pool(&self, block_tokens: usize, blocks: usize) -> Arc<BlockPool> {
        BlockPool::new_device(block_tokens, blocks)
    }
}
