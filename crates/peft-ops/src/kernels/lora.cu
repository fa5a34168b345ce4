// LoRA's thin products (one side only r columns wide) read the activations in their storage
// dtype: no f32 copy of x or of dL/dy is written and read back, and the dropout mask (drawn
// element by element, ops.cu's dropout_at) and the scale are applied on the fly. Appended to
// ops.cu (ld, Dropout). f32 math; the composed path in fused.rs (cast, mask, matmul, scale) is
// the reference.

#define THIN_RANKS 16   // ranks per block; grid.y covers the rest
#define THIN_ROWS 32    // rows per block of thin_project: 8 warps of 4 rows
#define THIN_CHUNK 256  // columns of w per shared-memory stage
#define THIN_STAGE 64   // rows of y per shared-memory stage of thin_outer

// out[row, k] = scale · Σ_j x[row, j] · mask[row, j] · w[k · w_sk + j · w_sn] for k < r, the
// mask that of `drop` over [rows, n]: x [rows, n]; w as [r, n] through its strides (A [r, n]:
// w_sk = n, w_sn = 1; B [n, r]: w_sk = 1, w_sn = r); out [rows, r] f32. Grid (row blocks,
// rank groups); 256 threads: warp w takes rows 4w..4w + 3 of the block, lane l the columns
// l, l + 32, ... of each stage. Each warp sums its lanes' shares at the end.
template <typename T>
__device__ void thin_project(const T* x, const float* w, long long w_sk, long long w_sn,
                             float* out, long long rows, int n, int r, float scale,
                             Dropout drop) {
    __shared__ float ws[THIN_RANKS][THIN_CHUNK];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int k0 = blockIdx.y * THIN_RANKS;
    long long row0 = (long long)blockIdx.x * THIN_ROWS + warp * 4;
    float acc[4][THIN_RANKS];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < THIN_RANKS; ++k) acc[i][k] = 0.f;
    for (int c0 = 0; c0 < n; c0 += THIN_CHUNK) {
        __syncthreads();  // the previous stage is consumed
        for (int e = threadIdx.x; e < THIN_RANKS * THIN_CHUNK; e += blockDim.x) {
            int k = e / THIN_CHUNK, jj = e % THIN_CHUNK;
            long long j = c0 + jj;
            ws[k][jj] = k0 + k < r && j < n ? w[(k0 + k) * w_sk + j * w_sn] : 0.f;
        }
        __syncthreads();
        for (int jj = lane; jj < THIN_CHUNK && c0 + jj < n; jj += 32) {
            long long j = c0 + jj;
            float xv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                long long row = row0 + i;
                xv[i] = 0.f;
                if (row < rows) xv[i] = ld(x, row * n + j) * dropout_at(drop, row * n + j);
            }
#pragma unroll
            for (int k = 0; k < THIN_RANKS; ++k) {
                float wk = ws[k][jj];
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][k] += xv[i] * wk;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < THIN_RANKS; ++k) {
            float v = acc[i][k];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            long long row = row0 + i;
            if (lane == k && row < rows && k0 + k < r) out[row * r + k0 + k] = scale * v;
        }
}

// One split's share of out[j, k] = Σ_row x[row, j] · mask[row, j] · y[row, k]: rows
// split · per_split .. + per_split into part[split, j, k] (f32 [splits, n, r]); thin_outer_sum
// adds the splits in order, so the result is the same on every run (no atomics). x [rows, n],
// the mask that of `drop` over [rows, n], y [rows, r] f32. Grid (column blocks, rank groups,
// splits); thread = column.
template <typename T>
__device__ void thin_outer(const T* x, const float* y, float* part, long long rows, int n,
                           int r, long long per_split, Dropout drop) {
    __shared__ float ys[THIN_STAGE][THIN_RANKS];
    long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int k0 = blockIdx.y * THIN_RANKS;
    long long start = blockIdx.z * per_split;
    long long end = start + per_split < rows ? start + per_split : rows;
    float acc[THIN_RANKS];
#pragma unroll
    for (int k = 0; k < THIN_RANKS; ++k) acc[k] = 0.f;
    for (long long s0 = start; s0 < end; s0 += THIN_STAGE) {
        __syncthreads();  // the previous stage is consumed
        for (int e = threadIdx.x; e < THIN_STAGE * THIN_RANKS; e += blockDim.x) {
            int i = e / THIN_RANKS, k = e % THIN_RANKS;
            long long row = s0 + i;
            ys[i][k] = row < end && k0 + k < r ? y[row * r + k0 + k] : 0.f;
        }
        __syncthreads();
        if (j < n) {
            int len = end - s0 < THIN_STAGE ? (int)(end - s0) : THIN_STAGE;
            for (int i = 0; i < len; ++i) {
                long long at = (s0 + i) * n + j;
                float xv = ld(x, at) * dropout_at(drop, at);
#pragma unroll
                for (int k = 0; k < THIN_RANKS; ++k) acc[k] += xv * ys[i][k];
            }
        }
    }
    if (j < n)
#pragma unroll
        for (int k = 0; k < THIN_RANKS; ++k)
            if (k0 + k < r) part[((long long)blockIdx.z * n + j) * r + k0 + k] = acc[k];
}

// out[j · o_sn + k · o_sk] = scale · Σ_split part[split, j, k] ([n, r]: o_sn = r, o_sk = 1;
// [r, n]: o_sn = 1, o_sk = n). Grid-stride over the n · r values.
extern "C" __global__ void thin_outer_sum(const float* part, float* out, int splits, long long nr,
                                          int r, long long o_sn, long long o_sk, float scale) {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < nr;
         idx += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int sp = 0; sp < splits; ++sp) s += part[sp * nr + idx];
        out[(idx / r) * o_sn + (idx % r) * o_sk] = scale * s;
    }
}

#define INSTANTIATE_THIN(T, S)                                                                  \
    extern "C" __global__ void thin_project_##S(const T* x, const float* w, long long w_sk,    \
                                                long long w_sn, float* out, long long rows,     \
                                                int n, int r, float scale, DROPOUT_PARAMS) {    \
        thin_project<T>(x, w, w_sk, w_sn, out, rows, n, r, scale, DROPOUT_STRUCT);              \
    }                                                                                           \
    extern "C" __global__ void thin_outer_##S(const T* x, const float* y, float* part,         \
                                              long long rows, int n, int r,                     \
                                              long long per_split, DROPOUT_PARAMS) {            \
        thin_outer<T>(x, y, part, rows, n, r, per_split, DROPOUT_STRUCT);                       \
    }

INSTANTIATE_THIN(float, f32)
INSTANTIATE_THIN(bf16_t, bf16)
