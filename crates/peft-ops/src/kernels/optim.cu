// The optimizer step over every trainable tensor in a few launches, instead of a dozen launches
// per tensor. Appended to ops.cu (ld, st, block_reduce). A table describes the tensors of one
// kind: with moments in the parameter's dtype (f32 or bf16) five values each (the addresses of
// the parameter, its gradient, its first and second moments, then its element count); with
// 8-bit moments seven (parameter, gradient, the codes and block scales of each moment,
// count). Grid (chunks, tensors); blocks of 256 threads. Math in f32 whatever the storage.

__device__ __forceinline__ const long long* table_entry(const long long* table, int stride) {
    return table + stride * (long long)blockIdx.y;
}

// The dense kernels take OPTIM_PACK consecutive elements a thread, read and written as one
// where the tensor's buffers are aligned for it (full fine-tuning passes over every weight).
#define OPTIM_PACK 8

// The first element a thread takes in a grid-stride loop over packs, and the stride.
__device__ __forceinline__ long long pack_start() {
    return ((long long)blockIdx.x * blockDim.x + threadIdx.x) * OPTIM_PACK;
}
__device__ __forceinline__ long long pack_stride() {
    return (long long)gridDim.x * blockDim.x * OPTIM_PACK;
}

// out[0] += sum of the squared gradients (f64), for the global gradient norm. Entries are
// `stride` values apart, the gradient's address second and the element count last.
template <typename T>
__device__ void sum_squares_multi(const long long* table, int stride, double* out) {
    const int N = OPTIM_PACK;
    __shared__ float sh[32];
    const long long* e = table_entry(table, stride);
    const T* g = (const T*)e[1];
    long long n = e[stride - 1];
    // A block past a small tensor's end (the grid fits the largest) adds no zero atomically:
    // the test is the same for the whole block, before its barriers.
    if ((long long)blockIdx.x * blockDim.x * N >= n) return;
    bool vec = pack_aligned<N>(g);
    float s = 0.f;
    for (long long i = pack_start(); i < n; i += pack_stride()) {
        float gv[N];
        load_pack<N>(g, i, n, vec, gv);
#pragma unroll
        for (int k = 0; k < N; ++k) s += gv[k] * gv[k];
    }
    s = block_reduce(s, sh, false);
    if (threadIdx.x == 0) atomicAdd(out, (double)s);
}

// The clipping factor from the squared-gradient sum that sum_squares_multi left in device
// memory, as peft-train's clip_factor computes it on the host (in f64, then rounded to f32), so
// the step needs no read back to the host. False when the norm is not finite: then nothing is
// updated.
__device__ __forceinline__ bool clip_scale(const double* sum_sq, double max_norm, float* scale) {
    double norm = sqrt(*sum_sq);
    if (!isfinite(norm)) return false;
    *scale = max_norm > 0.0 && norm > max_norm ? (float)(max_norm / (norm + 1e-6)) : 1.f;
    return true;
}

// AdamW as PyTorch computes it, on gradients scaled by the clipping factor `grad_scale`:
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²;
// p = p · decay − lr · (m / bc1) / (√(v / bc2) + eps)
// with decay = 1 − lr · weight_decay and bc1, bc2 the bias corrections.
template <typename T>
__device__ void adamw_multi(const long long* table, float lr, float beta1, float beta2,
                            float eps, float decay, float bc1, float bc2, const double* sum_sq,
                            double max_norm) {
    float grad_scale;
    if (!clip_scale(sum_sq, max_norm, &grad_scale)) return;
    const long long* e = table_entry(table, 5);
    T* p = (T*)e[0];
    const T* g = (const T*)e[1];
    T* m = (T*)e[2];
    T* v = (T*)e[3];
    long long n = e[4];
    const int N = OPTIM_PACK;
    bool vec = pack_aligned<N>(p) && pack_aligned<N>(g) && pack_aligned<N>(m) &&
               pack_aligned<N>(v);
    for (long long i = pack_start(); i < n; i += pack_stride()) {
        float pv[N], gv[N], mv[N], vv[N];
        load_pack<N>(p, i, n, vec, pv);
        load_pack<N>(g, i, n, vec, gv);
        load_pack<N>(m, i, n, vec, mv);
        load_pack<N>(v, i, n, vec, vv);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            float gi = gv[k] * grad_scale;
            mv[k] = beta1 * mv[k] + (1.f - beta1) * gi;
            vv[k] = beta2 * vv[k] + (1.f - beta2) * gi * gi;
            pv[k] = pv[k] * decay - lr * ((mv[k] / bc1) / (sqrtf(vv[k] / bc2) + eps));
        }
        store_pack<N>(m, i, n, vec, mv);
        store_pack<N>(v, i, n, vec, vv);
        store_pack<N>(p, i, n, vec, pv);
    }
}

#define INSTANTIATE_OPTIM(T, S)                                                                 \
    extern "C" __global__ void sum_squares_multi_##S(const long long* table, int stride,       \
                                                     double* out) {                            \
        sum_squares_multi<T>(table, stride, out);                                              \
    }                                                                                          \
    extern "C" __global__ void adamw_multi_##S(const long long* table, float lr, float beta1,  \
                                               float beta2, float eps, float decay, float bc1, \
                                               float bc2, const double* sum_sq,                \
                                               double max_norm) {                              \
        adamw_multi<T>(table, lr, beta1, beta2, eps, decay, bc1, bc2, sum_sq, max_norm);       \
    }

INSTANTIATE_OPTIM(float, f32)
INSTANTIATE_OPTIM(bf16_t, bf16)

// The index of the value of `table` (256 ascending values) nearest to x, ties to the lower
// one, as peft-quant's `nearest`.
__device__ int nearest_code(const float* table, float x) {
    int lo = 0, hi = 256;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (table[mid] < x) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return 0;
    if (lo == 256) return 255;
    return fabsf(x - table[lo - 1]) <= fabsf(table[lo] - x) ? lo - 1 : lo;
}

// AdamW with bitsandbytes-style 8-bit moments (blocks of 256: the first moment on the signed
// dynamic map, the second on the unsigned one), bit for bit as peft-train's CPU path computes
// it: each block is dequantized, updated as in adamw_multi_f32, and quantized again with fresh
// block scales. One CUDA block of 256 threads per quantization block, grid-stride over blocks.
extern "C" __global__ void adamw8bit_multi_f32(const long long* table, const float* signed_map,
                                               const float* unsigned_map, float lr, float beta1,
                                               float beta2, float eps, float decay, float bc1,
                                               float bc2, const double* sum_sq,
                                               double max_norm) {
    float grad_scale;
    if (!clip_scale(sum_sq, max_norm, &grad_scale)) return;
    __shared__ float sh[32];
    __shared__ float smap[256], umap[256];
    for (int j = threadIdx.x; j < 256; j += blockDim.x) {
        smap[j] = signed_map[j];
        umap[j] = unsigned_map[j];
    }
    __syncthreads();
    const long long* e = table_entry(table, 7);
    float* p = (float*)e[0];
    const float* g = (const float*)e[1];
    unsigned char* mc = (unsigned char*)e[2];
    float* ma = (float*)e[3];
    unsigned char* vc = (unsigned char*)e[4];
    float* va = (float*)e[5];
    long long n = e[6], blocks = (n + 255) / 256;
    for (long long blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
        long long i = blk * 256 + threadIdx.x;
        bool in = i < n;
        float m = 0.f, v = 0.f;
        if (in) {
            // Rounded step by step as on the CPU (no fused multiply-add): a code that flips at
            // a rounding boundary would change the moment by a whole step.
            float gi = __fmul_rn(g[i], grad_scale);
            float m0 = __fmul_rn(smap[mc[i]], ma[blk]), v0 = __fmul_rn(umap[vc[i]], va[blk]);
            m = __fadd_rn(__fmul_rn(beta1, m0), __fmul_rn(1.f - beta1, gi));
            v = __fadd_rn(__fmul_rn(beta2, v0), __fmul_rn(__fmul_rn(1.f - beta2, gi), gi));
            float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(v, bc2)), eps);
            float update = __fdiv_rn(__fdiv_rn(m, bc1), denom);
            p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(lr, update));
        }
        // Every thread has read the old scales before the reductions' barriers.
        float am = block_reduce(fabsf(m), sh, true);
        float av = block_reduce(fabsf(v), sh, true);
        if (in) {
            mc[i] = (unsigned char)nearest_code(smap, am > 0.f ? m / am : 0.f);
            vc[i] = (unsigned char)nearest_code(umap, av > 0.f ? v / av : 0.f);
        }
        if (threadIdx.x == 0) {
            ma[blk] = am;
            va[blk] = av;
        }
    }
}
