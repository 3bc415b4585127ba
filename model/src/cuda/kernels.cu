// expertmesh CUDA kernels, compiled at run time by NVRTC (no headers needed).
//
// Conventions: activations are f32, weights are bf16 stored as `unsigned short` (the top 16
// bits of an f32), matrices are row-major. Each kernel mirrors one CPU function of the model
// crate (named beside it); the GPU tests compare them on the same inputs.

typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// Round to nearest even, as `half::bf16::from_f32` does for finite values.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int bits = __float_as_uint(f);
    if ((bits & 0x7f800000u) == 0x7f800000u) {
        return (bf16_t)((bits >> 16) | ((bits & 0xffffu) ? 0x40u : 0u));
    }
    unsigned int rounding = ((bits >> 16) & 1u) + 0x7fffu;
    return (bf16_t)((bits + rounding) >> 16);
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += partial[w];
    __syncthreads();
    return total;
}

// norm.rs `rms_norm`: y = x · rsqrt(mean(x²) + eps) · w. One block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int rows, int dim,
                                    float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (long long)row * dim;
    float* yr = y + (long long)row * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float weight = w ? w[i] : 1.0f;
        yr[i] = xr[i] * inv * weight;
    }
}

// attention.rs qk-norm: the weightless RMS norm of every head vector, in place. One block per
// head vector.
extern "C" __global__ void head_rms_norm(float* x, int vectors, int dim, float eps) {
    int v = blockIdx.x;
    if (v >= vectors) return;
    float* xv = x + (long long)v * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xv[i] * xv[i];
    float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xv[i] *= inv;
}

// rope.rs `Rope::rotate`: adjacent pairs (x[2j], x[2j+1]) rotated by pos·θ_j, angles in f32.
// x is [tokens, heads, head_dim]; one thread per (token, head, pair).
extern "C" __global__ void rope_interleaved(float* x, const int* positions, const float* inv_freq,
                                            int tokens, int heads, int head_dim) {
    long long pairs = (long long)tokens * heads * (head_dim / 2);
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    int half = head_dim / 2;
    int j = (int)(i % half);
    long long th = i / half;
    int token = (int)(th / heads);
    float angle = (float)positions[token] * inv_freq[j];
    float s, c;
    sincosf(angle, &s, &c);
    float* p = x + th * head_dim + 2 * j;
    float a = p[0], b = p[1];
    p[0] = a * c - b * s;
    p[1] = a * s + b * c;
}

// norm.rs `silu` and the experts' SwiGLU: out[r, i] = silu(gu[r, i]) · gu[r, I + i]
// (gate is the first I columns, up the second I).
extern "C" __global__ void swiglu(const float* gate_up, float* out, int rows, int inter) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * inter) return;
    long long r = i / inter;
    int c = (int)(i % inter);
    float g = gate_up[r * 2 * inter + c];
    float u = gate_up[r * 2 * inter + inter + c];
    out[i] = g / (1.0f + expf(-g)) * u;
}

// moe.rs `route`: top-1 expert (lowest index on ties) and the sigmoid of its raw logit.
// One thread per token.
extern "C" __global__ void router_top1_sigmoid(const float* logits, int tokens, int experts,
                                               int* expert, float* score) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* l = logits + (long long)t * experts;
    int best = 0;
    for (int e = 1; e < experts; ++e) {
        if (l[e] > l[best]) best = e;
    }
    expert[t] = best;
    score[t] = 1.0f / (1.0f + expf(-l[best]));
}

// x[r] *= score[r]: the NoPE layers' temperature (attention.rs; the scale is computed in f64 on
// the host, as the CPU computes it) and the router score on an expert's input (moe.rs).
extern "C" __global__ void scale_rows(float* x, const float* score, int rows, int dim) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * dim) return;
    x[i] *= score[i / dim];
}

// Widening and narrowing copies between f32 activations and bf16 GEMM operands.
extern "C" __global__ void f32_to_bf16_copy(const float* x, bf16_t* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void bf16_to_f32_copy(const bf16_t* x, float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = bf16_to_f32(x[i]);
}

// Deterministic pseudo-random bf16 values in [-scale, scale), for benchmarks.
extern "C" __global__ void fill_random_bf16(bf16_t* x, long long n, unsigned long long seed,
                                            float scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long z = seed + (unsigned long long)i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) / (float)(1ull << 24);
    x[i] = f32_to_bf16((2.0f * u - 1.0f) * scale);
}

// kv_cache.rs + attention.rs over the paged cache: each query row r belongs to sequence
// q_seq[r] and sits at absolute position q_pos[r]; its own key is already in the cache. It sees
// the cached positions from the start of its aligned chunk (chunk > 0) or from the first cached
// position, up to its own. k_cache, v_cache are [blocks, block_tokens, kv_heads, d];
// block_table is [seqs, max_blocks]; cache slot j of sequence s holds position first_pos[s] + j.
// q, out are [rows, q_heads, d], d ≤ 32 · ATT_PER_LANE.
//
// One block of ATT_WARPS warps per (row, head). Warp w takes every ATT_WARPS-th visible key
// from the w-th on; its lanes split the head dimension, so a score is one warp reduction
// (no block-wide barrier per key). Each warp keeps its own online softmax; the warps' states
// are merged at the end.
#define ATT_WARPS 8
#define ATT_PER_LANE 8
extern "C" __global__ void attention_paged(const float* q, const float* k_cache,
                                           const float* v_cache, const int* block_table,
                                           const int* first_pos, const int* q_seq,
                                           const int* q_pos, float* out, int rows, int q_heads,
                                           int kv_heads, int d, int block_tokens, int max_blocks,
                                           int chunk, float scale) {
    __shared__ float warp_m[ATT_WARPS];
    __shared__ float warp_l[ATT_WARPS];
    __shared__ float warp_acc[ATT_WARPS][32 * ATT_PER_LANE];
    int r = blockIdx.x;
    int h = blockIdx.y;
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows || h >= q_heads || d > 32 * ATT_PER_LANE) return;
    int kvh = h / (q_heads / kv_heads);
    int s = q_seq[r];
    int pos = q_pos[r];
    int first = first_pos[s];
    int lo = 0;
    if (chunk > 0) {
        int c = (pos / chunk) * chunk - first;
        if (c > lo) lo = c;
    }
    float qv[ATT_PER_LANE], acc[ATT_PER_LANE];
    const float* qr = q + ((long long)r * q_heads + h) * d;
    for (int e = 0; e < ATT_PER_LANE; ++e) {
        int i = lane + 32 * e;
        qv[e] = (i < d) ? qr[i] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = __int_as_float(0xff800000), l = 0.0f;
    for (int j = lo + warp; j <= pos - first; j += ATT_WARPS) {
        int block = block_table[(long long)s * max_blocks + j / block_tokens];
        long long row = ((long long)block * block_tokens + j % block_tokens) * kv_heads + kvh;
        const float* kr = k_cache + row * d;
        const float* vr = v_cache + row * d;
        float dot = 0.0f;
        for (int e = 0; e < ATT_PER_LANE; ++e) {
            int i = lane + 32 * e;
            if (i < d) dot += qv[e] * kr[i];
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        float score = dot * scale;
        float m2 = fmaxf(m, score);
        float corr = expf(m - m2);
        float w = expf(score - m2);
        l = l * corr + w;
        for (int e = 0; e < ATT_PER_LANE; ++e) {
            int i = lane + 32 * e;
            acc[e] = acc[e] * corr + ((i < d) ? w * vr[i] : 0.0f);
        }
        m = m2;
    }
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
    for (int e = 0; e < ATT_PER_LANE; ++e) warp_acc[warp][lane + 32 * e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float big = __int_as_float(0xff800000);
    for (int w = 0; w < ATT_WARPS; ++w) big = fmaxf(big, warp_m[w]);
    float total = 0.0f;
    for (int w = 0; w < ATT_WARPS; ++w) {
        if (warp_l[w] > 0.0f) total += warp_l[w] * expf(warp_m[w] - big);
    }
    float* o = out + ((long long)r * q_heads + h) * d;
    for (int e = 0; e < ATT_PER_LANE; ++e) {
        int i = lane + 32 * e;
        if (i >= d) continue;
        float sum = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) {
            if (warp_l[w] > 0.0f) sum += warp_acc[w][i] * expf(warp_m[w] - big);
        }
        o[i] = sum / total;
    }
}

// y += x, elementwise (residual adds).
extern "C" __global__ void add_in_place(float* y, const float* x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// kv_cache.rs: writes new keys or values ([tokens, kv_heads, d]) into cache slots
// (slot[t] = block * block_tokens + offset).
extern "C" __global__ void kv_cache_write(const float* src, float* cache, const int* slot,
                                          int tokens, int width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * width) return;
    int t = (int)(i / width);
    int c = (int)(i % width);
    cache[(long long)slot[t] * width + c] = src[i];
}
