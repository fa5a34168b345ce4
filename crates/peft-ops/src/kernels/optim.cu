// The optimizer step over every trainable f32 tensor in one launch each, instead of a dozen
// launches per tensor. Appended to ops.cu (block_reduce). `table` holds five values per
// tensor: the addresses of the parameter, its gradient, its first and second moments, then
// its element count. Grid (chunks, tensors); blocks of 256 threads, grid-stride within a tensor.

__device__ __forceinline__ const long long* table_entry(const long long* table) {
    return table + 5 * (long long)blockIdx.y;
}

// out[0] += sum of the squared gradients (f64), for the global gradient norm.
extern "C" __global__ void sum_squares_multi_f32(const long long* table, double* out) {
    __shared__ float sh[32];
    const long long* e = table_entry(table);
    const float* g = (const float*)e[1];
    long long n = e[4];
    float s = 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    s = block_reduce(s, sh, false);
    if (threadIdx.x == 0) atomicAdd(out, (double)s);
}

// AdamW as PyTorch computes it, on gradients scaled by `grad_scale` (the clipping factor):
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²; p = p · decay − lr · (m / bc1) / (√(v / bc2) + eps)
// with decay = 1 − lr · weight_decay and bc1, bc2 the bias corrections.
extern "C" __global__ void adamw_multi_f32(const long long* table, float lr, float beta1,
                                           float beta2, float eps, float decay, float bc1,
                                           float bc2, float grad_scale) {
    const long long* e = table_entry(table);
    float* p = (float*)e[0];
    const float* g = (const float*)e[1];
    float* m = (float*)e[2];
    float* v = (float*)e[3];
    long long n = e[4];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.f - beta1) * gi;
        float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps));
    }
}
