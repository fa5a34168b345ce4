// peft-rs CUDA kernels, compiled at run time by NVRTC (no CUDA headers needed: bf16 is
// handled as raw bits). Math in f32 whatever the storage type; one block per row for the
// row-wise ops. Each kernel has a CPU reference in peft-ops and a test comparing the two.

typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
// Rounded to nearest even. On the GPU one instruction (sm_80+; a NaN becomes the canonical
// one), where the bit arithmetic below (the emulation's) takes about eight.
__device__ __forceinline__ bf16_t to_bf16(float v) {
#ifdef PEFT_EMULATE
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (bf16_t)(u >> 16);
#else
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
#endif
}
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) { p[i] = to_bf16(v); }

#define NEG_INF __int_as_float(0xff800000)

// N consecutive elements, loaded or stored as one (16 bytes at most: larger packs are split).
template <typename T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) Pack {
    T e[N];
};

// Whether p is aligned for Packs of N.
template <int N, typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
    return (unsigned long long)p % alignof(Pack<T, N>) == 0;
}

// Whether rows of n elements at p, accessed N at a time from multiples of N, can use Packs.
template <int N, typename T>
__device__ __forceinline__ bool packable(const T* p, long long n) {
    return n % N == 0 && pack_aligned<N>(p);
}

// p[i..i + N] as f32; indices at or past `end` read as 0. `vec`: i is a multiple of N in
// Pack-aligned rows (packable), so that a whole pack is one load.
template <int N, typename T>
__device__ __forceinline__ void load_pack(const T* p, long long i, long long end, bool vec,
                                          float* v) {
    if (vec && i + N <= end) {
        Pack<T, N> raw = *(const Pack<T, N>*)(p + i);
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] = ld(raw.e, e);
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] = i + e < end ? ld(p, i + e) : 0.f;
    }
}

// p[i..i + N] = v, up to `end`; `vec` as for load_pack.
template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, long long i, long long end, bool vec,
                                           const float* v) {
    if (vec && i + N <= end) {
        Pack<T, N> raw;
#pragma unroll
        for (int e = 0; e < N; ++e) st(raw.e, e, v[e]);
        *(Pack<T, N>*)(p + i) = raw;
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e)
            if (i + e < end) st(p, i + e, v[e]);
    }
}

// Sum (or max) of v over the warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce(float v, bool is_max) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    return v;
}

// Sum (or max) of v over the block; every thread gets the result. `sh` holds 32 floats.
__device__ float block_reduce(float v, float* sh, bool is_max) {
    v = warp_reduce(v, is_max);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // `sh` may still be read from a previous reduction
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = warp_reduce(lane < warps ? sh[lane] : (is_max ? NEG_INF : 0.f), is_max);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

// softmax(scale * x + causal mask) over rows of k keys; query row i of q sees keys
// 0..=(k - q) + i. Masked entries are written as 0.
template <typename T>
__device__ void causal_softmax_fwd(const T* x, T* y, int q, int k, float scale) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    const T* xr = x + row * k;
    T* yr = y + row * k;
    int visible = (k - q) + (int)(row % q) + 1;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, ld(xr, j) * scale);
    m = block_reduce(m, sh, true);
    float s = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) s += expf(ld(xr, j) * scale - m);
    float inv = 1.f / block_reduce(s, sh, false);
    for (int j = threadIdx.x; j < k; j += blockDim.x)
        st(yr, j, j < visible ? expf(ld(xr, j) * scale - m) * inv : 0.f);
}

// d scores = scale * y * (g - sum(g * y)) row by row.
template <typename T>
__device__ void causal_softmax_bwd(const T* y, const T* g, T* dx, int k, float scale) {
    __shared__ float sh[32];
    long long off = (long long)blockIdx.x * k;
    float dot = 0.f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) dot += ld(y, off + j) * ld(g, off + j);
    dot = block_reduce(dot, sh, false);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        float yj = ld(y, off + j);
        st(dx, off + j, scale * yj * (ld(g, off + j) - dot));
    }
}

// RMSNorm takes one warp per row (NORM_ROWS rows a 256-thread block), NORM_PACK consecutive
// elements a lane at a time, read as one where alignment allows, and sums over the warp by
// shuffles: no shared memory and no block barrier (a block per row waited at two per pass).
#define NORM_PACK 8
#define NORM_ROWS 8

// y = x / rms(x) * w over rows of d, in f32 (as candle's RMSNorm kernel).
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, long long rows, int d, float eps) {
    const int N = NORM_PACK;
    long long row = (long long)blockIdx.x * NORM_ROWS + threadIdx.x / 32;
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    long long off = row * d, end = off + d;
    bool vec = packable<N>(x + off, d) && packable<N>(y + off, d) && pack_aligned<N>(w);
    float ss = 0.f;
    for (int j = lane * N; j < d; j += 32 * N) {
        float v[N];
        load_pack<N>(x, off + j, end, vec, v);
#pragma unroll
        for (int e = 0; e < N; ++e) ss += v[e] * v[e];
    }
    float r = rsqrtf(warp_reduce(ss, false) / d + eps);
    for (int j = lane * N; j < d; j += 32 * N) {
        float v[N], wv[N];
        load_pack<N>(x, off + j, end, vec, v);
        load_pack<N>(w, j, d, vec, wv);
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] = v[e] * r * wv[e];
        store_pack<N>(y, off + j, end, vec, v);
    }
}

// Gradient of y = x / rms(x) * w with respect to x, rows of d, plus `res` (the gradient the
// residual stream gathered for x, when not null: added before the one rounding to T, where a
// separate add would round twice and read and write the whole tensor again); launched as
// rms_norm_fwd.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* g, const T* res, T* dx,
                             long long rows, int d, float eps) {
    const int N = NORM_PACK;
    long long row = (long long)blockIdx.x * NORM_ROWS + threadIdx.x / 32;
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    long long off = row * d, end = off + d;
    bool vec = packable<N>(x + off, d) && packable<N>(g + off, d) &&
               packable<N>(dx + off, d) && pack_aligned<N>(w) &&
               (res == nullptr || packable<N>(res + off, d));
    // x, g and w at columns j..j + N - 1 (both passes read them).
    auto load = [&](int j, float* xv, float* gv, float* wv) {
        load_pack<N>(x, off + j, end, vec, xv);
        load_pack<N>(g, off + j, end, vec, gv);
        load_pack<N>(w, j, d, vec, wv);
    };
    float ss = 0.f, gwx = 0.f;
    for (int j = lane * N; j < d; j += 32 * N) {
        float xv[N], gv[N], wv[N];
        load(j, xv, gv, wv);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            ss += xv[e] * xv[e];
            gwx += gv[e] * wv[e] * xv[e];
        }
    }
    float r = rsqrtf(warp_reduce(ss, false) / d + eps);
    float dot = warp_reduce(gwx, false) * r / d;  // mean(g * w * xhat)
    for (int j = lane * N; j < d; j += 32 * N) {
        float xv[N], gv[N], wv[N];
        load(j, xv, gv, wv);
#pragma unroll
        for (int e = 0; e < N; ++e) xv[e] = (gv[e] * wv[e] - xv[e] * r * dot) * r;
        if (res != nullptr) {
            float rv[N];
            load_pack<N>(res, off + j, end, vec, rv);
#pragma unroll
            for (int e = 0; e < N; ++e) xv[e] += rv[e];
        }
        store_pack<N>(dx, off + j, end, vec, xv);
    }
}

// dL/dw of y = x / rms(x) * w (a trained norm: full fine-tuning), Σ over rows of g · x / rms(x),
// in two launches where composed ops took about ten passes and a strided column sum:
// rms_norm_dw_part has 256-thread block c sum rows [c·per, (c + 1)·per) (thread t owns
// columns t, t + 256, ..., at most NORM_DW_COLS of them: d ≤ 256 · NORM_DW_COLS) into
// partial[c·d ..]; rms_norm_dw_sum adds the blocks' sums per column, in block order (the same
// result on every run).
#define NORM_DW_COLS 32
template <typename T>
__device__ void rms_norm_dw_part(const T* x, const T* g, float* partial, long long rows, int d,
                                 float eps, long long per) {
    __shared__ float sh[32];
    float acc[NORM_DW_COLS];
#pragma unroll
    for (int k = 0; k < NORM_DW_COLS; ++k) acc[k] = 0.f;
    long long first = (long long)blockIdx.x * per;
    long long last = first + per < rows ? first + per : rows;
    int t = threadIdx.x;
    for (long long i = first; i < last; ++i) {
        const T* xr = x + i * d;
        const T* gr = g + i * d;
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < NORM_DW_COLS; ++k) {
            int j = t + 256 * k;
            if (j < d) {
                float v = ld(xr, j);
                ss += v * v;
            }
        }
        float r = rsqrtf(block_reduce(ss, sh, false) / d + eps);
#pragma unroll
        for (int k = 0; k < NORM_DW_COLS; ++k) {
            int j = t + 256 * k;
            if (j < d) acc[k] += ld(gr, j) * ld(xr, j) * r;
        }
    }
#pragma unroll
    for (int k = 0; k < NORM_DW_COLS; ++k) {
        int j = t + 256 * k;
        if (j < d) partial[(long long)blockIdx.x * d + j] = acc[k];
    }
}

// dw[j] = Σ over the `blocks` partial sums of column j (a thread a column).
extern "C" __global__ void rms_norm_dw_sum(const float* partial, float* dw, int blocks, int d) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float s = 0.f;
    for (int c = 0; c < blocks; ++c) s += partial[(long long)c * d + j];
    dw[j] = s;
}

// A trained embedding's gradient, dL/dW[v] = Σ over the positions j with ids[j] = v of
// grad[j], each row summed in f32 in ascending j and rounded once (the same result on every
// run), where an add per position into the stored type (candle's index_add: a thread a column
// walking all positions) rounded at every repeat of a token. embedding_chains links each
// position to the next one of its id (next[j], -1 at the end) and marks the first (lead[j]);
// blocks of 256 threads, each comparing its id with every position's, tile by tile.
#define EMBED_TILE 1024
extern "C" __global__ void embedding_chains(const unsigned* ids, int n, int* next, int* lead) {
    __shared__ unsigned tile[EMBED_TILE];
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned id = j < n ? ids[j] : 0u;
    int after = -1, first = 1;
    for (int base = 0; base < n; base += EMBED_TILE) {
        int len = n - base < EMBED_TILE ? n - base : EMBED_TILE;
        __syncthreads();  // the previous tile is read by every thread
        for (int k = threadIdx.x; k < len; k += blockDim.x) tile[k] = ids[base + k];
        __syncthreads();
        if (j < n)
            for (int k = 0; k < len; ++k) {
                int at = base + k;
                if (tile[k] == id) {
                    if (at < j) first = 0;
                    else if (at > j && after < 0) after = at;
                }
            }
    }
    if (j < n) {
        next[j] = after;
        lead[j] = first;
    }
}

// Columns a thread sums in one walk of a chain (blockDim.x apart).
#define EMBED_COLS 16

// out[ids[j]] = the chain's rows of grad summed, by block j where j leads its chain (rows of
// d; ids past the vocab have no row). Each thread walks the chain once for EMBED_COLS columns,
// not once a column: a token repeated thousands of times (padding) is a long walk.
template <typename T>
__device__ void embedding_bwd(const unsigned* ids, const T* grad, const int* next,
                              const int* lead, T* out, int d, long long vocab) {
    int j = blockIdx.x;
    long long row = ids[j];
    if (!lead[j] || row >= vocab) return;
    for (int c0 = threadIdx.x; c0 < d; c0 += blockDim.x * EMBED_COLS) {
        float s[EMBED_COLS];
#pragma unroll
        for (int e = 0; e < EMBED_COLS; ++e) s[e] = 0.f;
        for (int k = j; k >= 0; k = next[k]) {
            const T* g = grad + (long long)k * d;
#pragma unroll
            for (int e = 0; e < EMBED_COLS; ++e) {
                int c = c0 + e * blockDim.x;
                if (c < d) s[e] += ld(g, c);
            }
        }
#pragma unroll
        for (int e = 0; e < EMBED_COLS; ++e) {
            int c = c0 + e * blockDim.x;
            if (c < d) st(out, row * d + c, s[e]);
        }
    }
}

// Gated MLP activations as act(g) · u with act(g) = g · sigmoid(a(g)), by `act`: 0, SiLU
// (SwiGLU, a(g) = g); 1, GELU's tanh approximation (GeGLU, a(g) = 2·√(2/π)·(g + 0.044715·g³));
// 2, gpt-oss's clamped SwiGLU (a(g) = alpha · g, the gate clamped to at most `limit` and the
// up projection to ±limit, plus 1).
#define GATED_GELU 1
#define GATED_CLAMPED 2

__device__ __forceinline__ float gate_arg(float g, int act, float alpha) {
    return act == GATED_GELU      ? 1.5957691216f * (g + 0.044715f * g * g * g)
           : act == GATED_CLAMPED ? alpha * g
                                  : g;
}

// a'(g).
__device__ __forceinline__ float gate_slope(float g, int act, float alpha) {
    return act == GATED_GELU ? 1.5957691216f * (1.f + 0.134145f * g * g)
           : act == GATED_CLAMPED ? alpha
                                  : 1.f;
}

// The gate and up values the activation reads (gpt-oss's clamped ones), and whether the
// gradient passes the clamp (torch's clamp passes it at the limits themselves).
__device__ __forceinline__ void gate_inputs(float& g, float& u, bool& g_pass, bool& u_pass,
                                            int act, float limit) {
    g_pass = u_pass = true;
    if (act != GATED_CLAMPED) return;
    g_pass = g <= limit;
    u_pass = fabsf(u) <= limit;
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit) + 1.f;
}

// The elementwise kernels take GATED_PACK consecutive elements a thread, read and written
// as one where the buffers' alignment allows.
#define GATED_PACK 8

// y = act(g) * u over chunks of GATED_PACK elements (grid-stride over n / GATED_PACK, rounded
// up).
template <typename T>
__device__ void gated_fwd(const T* g, const T* u, T* y, long long n, int act, float alpha,
                          float limit) {
    const int N = GATED_PACK;
    bool vec = pack_aligned<N>(g) && pack_aligned<N>(u) && pack_aligned<N>(y);
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c * N < n;
         c += (long long)gridDim.x * blockDim.x) {
        long long i = c * N;
        float gv[N], uv[N], out[N];
        load_pack<N>(g, i, n, vec, gv);
        load_pack<N>(u, i, n, vec, uv);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            bool g_pass, u_pass;
            gate_inputs(gv[e], uv[e], g_pass, u_pass, act, limit);
            out[e] = gv[e] / (1.f + expf(-gate_arg(gv[e], act, alpha))) * uv[e];
        }
        store_pack<N>(y, i, n, vec, out);
    }
}

// y = a + b over chunks as gated_fwd: the residual adds and the gradient sums of a layer tape,
// where candle's binary kernel takes one element a thread through its strided indexing.
template <typename T>
__device__ void add_same(const T* a, const T* b, T* y, long long n) {
    const int N = GATED_PACK;
    bool vec = pack_aligned<N>(a) && pack_aligned<N>(b) && pack_aligned<N>(y);
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c * N < n;
         c += (long long)gridDim.x * blockDim.x) {
        long long i = c * N;
        float av[N], bv[N];
        load_pack<N>(a, i, n, vec, av);
        load_pack<N>(b, i, n, vec, bv);
#pragma unroll
        for (int e = 0; e < N; ++e) av[e] += bv[e];
        store_pack<N>(y, i, n, vec, av);
    }
}

// out[0..n] = d gate, out[n..2n] = d up, over chunks as gated_fwd.
template <typename T>
__device__ void gated_bwd(const T* g, const T* u, const T* grad, T* out, long long n, int act,
                          float alpha, float limit) {
    const int N = GATED_PACK;
    bool vec = pack_aligned<N>(g) && pack_aligned<N>(u) && pack_aligned<N>(grad) &&
               pack_aligned<N>(out) && pack_aligned<N>(out + n);
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c * N < n;
         c += (long long)gridDim.x * blockDim.x) {
        long long i = c * N;
        float gv[N], uv[N], gr[N], dg[N], du[N];
        load_pack<N>(g, i, n, vec, gv);
        load_pack<N>(u, i, n, vec, uv);
        load_pack<N>(grad, i, n, vec, gr);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            bool g_pass, u_pass;
            gate_inputs(gv[e], uv[e], g_pass, u_pass, act, limit);
            float s = 1.f / (1.f + expf(-gate_arg(gv[e], act, alpha)));
            float value = gv[e] * s;
            float slope = s + value * (1.f - s) * gate_slope(gv[e], act, alpha);
            dg[e] = g_pass ? gr[e] * uv[e] * slope : 0.f;
            du[e] = u_pass ? gr[e] * value : 0.f;
        }
        store_pack<N>(out, i, n, vec, dg);
        store_pack<N>(out + n, i, n, vec, du);
    }
}

// Cross-entropy of rows of logits (one block per row of `vocab`): row_loss = logsumexp − the
// label's logit (0 for a label < 0), the row's entropy and whether the label is its argmax
// (TRL's logged metrics; 0 for a label < 0), and, when `grad` is set, dlogits = (softmax −
// one_hot) · weight, with weight = inv_denom for counted rows and 0 otherwise. Two passes over
// the row (the maximum and the sums of exponentials together, as online softmax rescales its
// running sum; then the gradient), eight logits a thread at a time, replace a dozen full-size
// f32 temporaries. Launched with ROW_THREADS (256) threads; the launch bound of 8 blocks an SM
// keeps full occupancy (32 registers, no spills: scripts/gpu/ptxas.sh).
#define CE_PACK 8
template <typename T>
__device__ void cross_entropy_rows(const T* logits, const long long* labels, T* dlogits,
                                   float* row_loss, float* row_entropy, float* row_top1,
                                   int vocab, float inv_denom, int grad) {
    __shared__ float sh[32];
    const int N = CE_PACK;
    const T* row = logits + (long long)blockIdx.x * vocab;
    long long label = labels[blockIdx.x];
    bool vec = packable<N>(row, vocab);
    // Per thread: the running maximum, where it first occurs, and the sums of e^(v - m) and
    // v · e^(v - m) (the entropy's), rescaled as the maximum grows.
    float m = NEG_INF, s = 0.f, xs = 0.f;
    int first = 0;
    for (int j = threadIdx.x * N; j < vocab; j += blockDim.x * N) {
        float v[N];
        load_pack<N>(row, j, vocab, vec, v);
        int valid = vocab - j < N ? vocab - j : N;
        float mx = m;
        for (int e = 0; e < valid; ++e)
            if (v[e] > mx) mx = v[e], first = j + e;
        float r = m == NEG_INF ? 0.f : expf(m - mx);
        float sum = s * r, xsum = xs * r;
        for (int e = 0; e < valid; ++e) {
            float ex = expf(v[e] - mx);
            sum += ex;
            xsum += ex * v[e];
        }
        m = mx, s = sum, xs = xsum;
    }
    float row_max = block_reduce(m, sh, true);
    float r = m == NEG_INF ? 0.f : expf(m - row_max);
    s = block_reduce(s * r, sh, false);
    xs = block_reduce(xs * r, sh, false);
    // The smallest index holding the row's maximum (exact in f32 below 2^24), as argmax.
    float argmax = -block_reduce(m == row_max ? -(float)first : NEG_INF, sh, true);
    bool counted = label >= 0 && label < vocab;
    if (threadIdx.x == 0) {
        float log_z = logf(s) + row_max;
        row_loss[blockIdx.x] = counted ? log_z - ld(row, label) : 0.f;
        row_entropy[blockIdx.x] = counted ? log_z - xs / s : 0.f;
        row_top1[blockIdx.x] = counted && argmax == (float)label ? 1.f : 0.f;
    }
    if (!grad) return;
    T* drow = dlogits + (long long)blockIdx.x * vocab;
    bool dvec = vec && packable<N>(drow, vocab);
    float w = counted ? inv_denom : 0.f, inv = 1.f / s;
    for (int j = threadIdx.x * N; j < vocab; j += blockDim.x * N) {
        float v[N];
        load_pack<N>(row, j, vocab, dvec, v);
#pragma unroll
        for (int e = 0; e < N; ++e)
            v[e] = (expf(v[e] - row_max) * inv - (j + e == label ? 1.f : 0.f)) * w;
        store_pack<N>(drow, j, vocab, dvec, v);
    }
}

// bitsandbytes' 4-bit blocks to dense values (QLoRA's frozen weights, per matmul): two codes a
// byte, the first in the high nibble, times the block's scale: absmax[block], or with double
// quantization code2[qabsmax[block]] * absmax2[block / blocksize2] + offset, rounded as the
// CPU path rounds (no fused multiply-add). One thread per byte, grid-stride.
template <typename T>
__device__ void dequantize_4bit(const unsigned char* packed, const float* code4,
                                const float* absmax, const unsigned char* qabsmax,
                                const float* absmax2, const float* code2, float offset, T* out,
                                long long len, int blocksize, int blocksize2, int double_quant) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; 2 * i < len;
         i += (long long)gridDim.x * blockDim.x) {
        long long block = 2 * i / blocksize;
        float a = double_quant
                      ? __fadd_rn(__fmul_rn(code2[qabsmax[block]], absmax2[block / blocksize2]),
                                  offset)
                      : absmax[block];
        unsigned char b = packed[i];
        st(out, 2 * i, __fmul_rn(code4[b >> 4], a));
        if (2 * i + 1 < len) st(out, 2 * i + 1, __fmul_rn(code4[b & 15], a));
    }
}

// LoRA dropout, drawn where it is applied: element i of a mask is `scale` where a 32-bit hash
// of (i, the mask's two keys) falls below `threshold`, else 0, as fused.rs's dropout_hash
// computes it on the CPU (bit for bit). Each element on its own, so no mask is ever stored.
struct Dropout {
    int on;
    unsigned k1, k2, threshold;
    float scale;
};

__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// The mask's value at element i (1 when dropout is off).
__device__ __forceinline__ float dropout_at(const Dropout& d, long long i) {
    if (!d.on) return 1.f;
    unsigned hi = (unsigned)((unsigned long long)i >> 32);
    unsigned x = mix32(mix32((unsigned)i ^ d.k1) + (d.k2 ^ hi * 0x9e3779b9u));
    return x < d.threshold ? d.scale : 0.f;
}

#define DROPOUT_PARAMS int drop_on, unsigned drop_k1, unsigned drop_k2, unsigned drop_threshold, \
                       float drop_scale
#define DROPOUT_ARGS drop_on, drop_k1, drop_k2, drop_threshold, drop_scale
#define DROPOUT_STRUCT Dropout{drop_on, drop_k1, drop_k2, drop_threshold, drop_scale}

// p[i..i + N] as f32 times the mask of `drop` there; indices at or past `end` read as 0.
template <int N, typename T>
__device__ __forceinline__ void load_cols(const T* p, long long i, long long end, bool vec,
                                          const Dropout& drop, float* v) {
    load_pack<N>(p, i, end, vec, v);
    if (drop.on)
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] *= dropout_at(drop, i + e);
}

// A dropout mask as a tensor (`dropout_mask` in fused.rs). Grid-stride over the elements.
extern "C" __global__ void dropout_mask_f32(float* out, long long n, DROPOUT_PARAMS) {
    Dropout drop = DROPOUT_STRUCT;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = dropout_at(drop, i);
}

// x ∘ mask in x's type (the input of LoRA's A when cuBLAS computes the thin products: the
// mask drawn here, never stored). Grid-stride over the elements.
template <typename T>
__device__ void dropout_apply(const T* x, T* out, long long n, const Dropout& drop) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        st(out, i, ld(x, i) * dropout_at(drop, i));
}
extern "C" __global__ void dropout_apply_f32(const float* x, float* out, long long n,
                                             DROPOUT_PARAMS) {
    dropout_apply(x, out, n, DROPOUT_STRUCT);
}
extern "C" __global__ void dropout_apply_bf16(const bf16_t* x, bf16_t* out, long long n,
                                              DROPOUT_PARAMS) {
    dropout_apply(x, out, n, DROPOUT_STRUCT);
}

// Up to six f32 segments (n = 0 for those unused) rounded to bf16 one after another into out,
// in one launch: LoRA's A and B for cuBLAS's thin products, of one layer, or of the projections
// that read one input (every A, then every B). Grid-stride over the total.
extern "C" __global__ void bf16_concat(const float* s0, long long n0, const float* s1,
                                       long long n1, const float* s2, long long n2,
                                       const float* s3, long long n3, const float* s4,
                                       long long n4, const float* s5, long long n5,
                                       bf16_t* out) {
    const float* src[6] = {s0, s1, s2, s3, s4, s5};
    const long long n[6] = {n0, n1, n2, n3, n4, n5};
    const long long total = n0 + n1 + n2 + n3 + n4 + n5;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long j = i;
        int s = 0;
        while (s < 5 && j >= n[s]) j -= n[s++];
        out[i] = to_bf16(src[s][j]);
    }
}

// N(0, std²) values of the counter-based stream `key` (init.rs's random_normal): element i is
// Box-Muller of the splitmix64 draws 2i + 1 and 2i + 2, computed in f64 as on the CPU.
__device__ __forceinline__ double splitmix_uniform(unsigned long long key, unsigned long long i) {
    unsigned long long z = key + i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}

template <typename T>
__device__ void random_normal(T* out, long long n, unsigned long long key, float std) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned long long j = (unsigned long long)i;
        double u1 = fmax(splitmix_uniform(key, 2 * j + 1), 1e-300);
        double u2 = splitmix_uniform(key, 2 * j + 2);
        double r = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
        st(out, i, (float)(r * (double)std));
    }
}

// Values uniform in [low, high) of the stream `key` (init.rs's random_uniform): element i is
// low + (high - low) times the splitmix64 draw i + 1, computed in f64 as on the CPU.
template <typename T>
__device__ void random_uniform(T* out, long long n, unsigned long long key, float low,
                               float high) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        double u = splitmix_uniform(key, (unsigned long long)i + 1);
        st(out, i, (float)((double)low + ((double)high - (double)low) * u));
    }
}

#define INSTANTIATE(T, S)                                                                       \
    extern "C" __global__ void causal_softmax_fwd_##S(const T* x, T* y, int q, int k,         \
                                                      float scale) {                          \
        causal_softmax_fwd<T>(x, y, q, k, scale);                                              \
    }                                                                                          \
    extern "C" __global__ void causal_softmax_bwd_##S(const T* y, const T* g, T* dx, int k,   \
                                                      float scale) {                          \
        causal_softmax_bwd<T>(y, g, dx, k, scale);                                             \
    }                                                                                          \
    extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, long long rows,  \
                                                int d, float eps) {                           \
        rms_norm_fwd<T>(x, w, y, rows, d, eps);                                                \
    }                                                                                          \
    extern "C" __global__ void rms_norm_bwd_##S(const T* x, const T* w, const T* g, T* dx,    \
                                                long long rows, int d, float eps) {           \
        rms_norm_bwd<T>(x, w, g, nullptr, dx, rows, d, eps);                                   \
    }                                                                                          \
    extern "C" __global__ void rms_norm_dw_part_##S(const T* x, const T* g, float* partial,    \
                                                    long long rows, int d, float eps,          \
                                                    long long per) {                           \
        rms_norm_dw_part<T>(x, g, partial, rows, d, eps, per);                                 \
    }                                                                                          \
    extern "C" __global__ void embedding_bwd_##S(const unsigned* ids, const T* grad,         \
                                                 const int* next, const int* lead, T* out,   \
                                                 int d, long long vocab) {                     \
        embedding_bwd<T>(ids, grad, next, lead, out, d, vocab);                                \
    }                                                                                          \
    extern "C" __global__ void rms_norm_bwd_add_##S(const T* x, const T* w, const T* g,       \
                                                    const T* res, T* dx, long long rows, int d, \
                                                    float eps) {                              \
        rms_norm_bwd<T>(x, w, g, res, dx, rows, d, eps);                                       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 8) cross_entropy_rows_##S(               \
        const T* logits, const long long* labels, T* dlogits, float* row_loss,                 \
        float* row_entropy, float* row_top1, int vocab, float inv_denom, int grad) {           \
        cross_entropy_rows<T>(logits, labels, dlogits, row_loss, row_entropy, row_top1, vocab, \
                              inv_denom, grad);                                                \
    }                                                                                          \
    extern "C" __global__ void dequantize_4bit_##S(                                            \
        const unsigned char* packed, const float* code4, const float* absmax,                  \
        const unsigned char* qabsmax, const float* absmax2, const float* code2, float offset,  \
        T* out, long long len, int blocksize, int blocksize2, int double_quant) {              \
        dequantize_4bit<T>(packed, code4, absmax, qabsmax, absmax2, code2, offset, out, len,   \
                           blocksize, blocksize2, double_quant);                              \
    }                                                                                          \
    extern "C" __global__ void random_normal_##S(T* out, long long n, unsigned long long key,  \
                                                 float std) {                                  \
        random_normal<T>(out, n, key, std);                                                    \
    }                                                                                          \
    extern "C" __global__ void random_uniform_##S(T* out, long long n, unsigned long long key, \
                                                  float low, float high) {                     \
        random_uniform<T>(out, n, key, low, high);                                             \
    }                                                                                          \
    extern "C" __global__ void gated_fwd_##S(const T* g, const T* u, T* y, long long n,      \
                                             int act, float alpha, float limit) {             \
        gated_fwd<T>(g, u, y, n, act, alpha, limit);                                           \
    }                                                                                          \
    extern "C" __global__ void add_same_##S(const T* a, const T* b, T* y, long long n) {     \
        add_same<T>(a, b, y, n);                                                               \
    }                                                                                          \
    extern "C" __global__ void gated_bwd_##S(const T* g, const T* u, const T* grad, T* out,   \
                                             long long n, int act, float alpha, float limit) { \
        gated_bwd<T>(g, u, grad, out, n, act, alpha, limit);                                   \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
