// LoRA's low-rank kernels: the thin products (one side only r columns wide) and the add of the
// low-rank term to a frozen matmul's output. They read the activations in their storage dtype
// (no f32 copy of x or of dL/dy is written and read back), apply the dropout mask (drawn
// element by element, ops.cu's dropout_at) and the scale on the fly, and read consecutive
// columns with one vector load where alignment allows: these kernels are bound by memory, and
// by the latency of loads in flight. Appended to ops.cu (ld, st, Pack, load_pack, load_cols,
// store_pack, Dropout). f32 math; the composed path in fused.rs (cast, mask, matmul, scale) is
// the reference.

#define THIN_RANKS 16     // ranks per block; grid.y covers the rest
#define THIN_ROWS 32      // rows per block of thin_project: 8 warps of 4 rows
#define THIN_LANE_COLS 8  // consecutive columns a lane of thin_project reads per row
#define THIN_CHUNK 256    // columns per shared-memory stage of thin_project (32 lanes x 8)
#define THIN_WS_PITCH 33  // floats per 32 columns of a stage's shared rank row: fewer conflicts
#define THIN_STAGE 64     // rows of y per shared-memory stage of thin_outer
#define THIN_BATCH 16     // rows of x a thread of thin_outer loads at once (divides THIN_STAGE)
#define LRA_ROWS 64       // rows per block of low_rank_add
#define LRA_GROUP 16      // rows of low_rank_add summed at a time (in registers)
#define LRA_COLS 2        // consecutive columns per thread of low_rank_add
#define LRA_THREADS 128   // threads per block of low_rank_add

// One step of thin_project's warp reduction: v[0..2 HALF] of each lane become v[0..HALF],
// the lower or upper half (by lane bit HALF / 2) summed with the partner lane's.
template <int HALF>
__device__ __forceinline__ void halve_over_lanes(float* v, int lane) {
    bool upper = lane & (HALF / 2);
#pragma unroll
    for (int e = 0; e < HALF; ++e) {
        float give = upper ? v[e] : v[e + HALF];
        float keep = upper ? v[e + HALF] : v[e];
        v[e] = keep + __shfl_xor_sync(0xffffffffu, give, HALF / 2);
    }
}

// out[row, k] = scale · Σ_j x[row, j] · mask[row, j] · w[k · w_sk + j · w_sn] for k < r, the
// mask that of `drop` over [rows, n]: x [rows, n]; w as [r, n] through its strides (A [r, n]:
// w_sk = n, w_sn = 1; B [n, r]: w_sk = 1, w_sn = r). Grid (row blocks, rank groups, column
// splits of `per_split` columns, a multiple of THIN_CHUNK); 256 threads: warp w takes rows
// 4w..4w + 3 of the block, lane l columns 8l..8l + 7 of each stage, so that a warp reads
// 512-byte rows (bf16) and each weight from shared memory serves four rows. out is
// [splits, rows, r]: with several splits thin_outer_sum adds them (in order: the same result
// on every run), and scale is 1 here.
// The weights of a stage are read in their storage order (A [r, n] along a rank's columns,
// B [n, r] along a column's ranks), so that a warp's loads are coalesced; scattered reads, a
// sector per lane, had cost the L1 four times the stage's arithmetic.
template <typename T>
__device__ void thin_project(const T* x, const float* w, long long w_sk, long long w_sn,
                             float* out, long long rows, int n, int r, float scale,
                             int per_split, Dropout drop) {
    // Column 8l + e of the stage at ws[k][33e + l].
    __shared__ float ws[THIN_RANKS][THIN_LANE_COLS * THIN_WS_PITCH];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int k0 = blockIdx.y * THIN_RANKS;
    long long row0 = (long long)blockIdx.x * THIN_ROWS + warp * 4;
    int c_begin = blockIdx.z * per_split;
    int c_end = c_begin + per_split < n ? c_begin + per_split : n;
    bool vec = packable<THIN_LANE_COLS>(x, n);
    float acc[4][THIN_RANKS];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < THIN_RANKS; ++k) acc[i][k] = 0.f;
    for (int c0 = c_begin; c0 < c_end; c0 += THIN_CHUNK) {
        // This stage's x first, so that its loads are in flight while the weights arrive.
        int j = c0 + THIN_LANE_COLS * lane;
        float xv[4][THIN_LANE_COLS];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            long long row = row0 + i;
            if (row < rows && j < c_end)
                load_cols<THIN_LANE_COLS>(x, row * n + j, row * n + c_end, vec, drop, xv[i]);
            else
#pragma unroll
                for (int e = 0; e < THIN_LANE_COLS; ++e) xv[i][e] = 0.f;
        }
        __syncthreads();  // the previous stage is consumed
        for (int s = threadIdx.x; s < THIN_RANKS * THIN_CHUNK; s += blockDim.x) {
            int k = w_sn == 1 ? s / THIN_CHUNK : s % THIN_RANKS;
            int jj = w_sn == 1 ? s % THIN_CHUNK : s / THIN_RANKS, jw = c0 + jj;
            ws[k][(jj % THIN_LANE_COLS) * THIN_WS_PITCH + jj / THIN_LANE_COLS] =
                k0 + k < r && jw < c_end ? w[(k0 + k) * w_sk + (long long)jw * w_sn] : 0.f;
        }
        __syncthreads();
        if (j < c_end) {
#pragma unroll
            for (int e = 0; e < THIN_LANE_COLS; ++e)
#pragma unroll
                for (int k = 0; k < THIN_RANKS; ++k) {
                    float wk = ws[k][e * THIN_WS_PITCH + lane];
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[i][k] += xv[i][e] * wk;
                }
        }
    }
    // The warp's 64 sums over its lanes by recursive halving: at each step a lane keeps half
    // of its values (the lower or upper half by its lane bit), adds its partner's copy of
    // that half, and hands the other half over, so that lane l ends with the totals of values
    // 2l and 2l + 1, row l / 8, ranks 2 (l % 8) and + 1: 62 shuffles where a butterfly per
    // value took 320 (the block's other work is two or three column stages).
    float* v = &acc[0][0];
    halve_over_lanes<32>(v, lane);
    halve_over_lanes<16>(v, lane);
    halve_over_lanes<8>(v, lane);
    halve_over_lanes<4>(v, lane);
    halve_over_lanes<2>(v, lane);
    long long row = row0 + lane / 8;
    int k = k0 + 2 * (lane % 8);
    if (row < rows)
#pragma unroll
        for (int e = 0; e < 2; ++e)
            if (k + e < r) out[((long long)blockIdx.z * rows + row) * r + k + e] = scale * v[e];
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
            // THIN_BATCH rows' loads issued before their sums, so that they are in flight at
            // once (a loop of `len` iterations was not unrolled). Rows past len have zero
            // weights in ys.
            for (int i0 = 0; i0 < len; i0 += THIN_BATCH) {
                float xv[THIN_BATCH];
#pragma unroll
                for (int u = 0; u < THIN_BATCH; ++u) {
                    long long at = (s0 + i0 + u) * n + j;
                    xv[u] = i0 + u < len ? ld(x, at) * dropout_at(drop, at) : 0.f;
                }
#pragma unroll
                for (int u = 0; u < THIN_BATCH; ++u)
#pragma unroll
                    for (int k = 0; k < THIN_RANKS; ++k) acc[k] += xv[u] * ys[i0 + u][k];
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

// Ranks k0..k0 + 15 of the block's LRA_THREADS · LRA_COLS columns of right (from column c0)
// into rs[k][column - c0] (zeros past cols and r), read in storage order so that a warp's loads
// are coalesced: B [cols, r] along a column's ranks, A [r, cols] along a rank's columns.
__device__ __forceinline__ void stage_right(const float* right, long long c0, int cols, int k0,
                                            int r, long long ro, long long rk,
                                            float (*rs)[LRA_THREADS * LRA_COLS + 1]) {
    const int W = LRA_THREADS * LRA_COLS;
    for (int s = threadIdx.x; s < THIN_RANKS * W; s += blockDim.x) {
        int k = ro == 1 ? s / W : s % THIN_RANKS, oo = ro == 1 ? s % W : s / THIN_RANKS;
        long long o = c0 + oo;
        rs[k][oo] = o < cols && k0 + k < r ? right[o * ro + (k0 + k) * rk] : 0.f;
    }
}

// This thread's LRA_COLS columns of a staged rs.
__device__ __forceinline__ void read_right(const float (*rs)[LRA_THREADS * LRA_COLS + 1],
                                           float (*rr)[THIN_RANKS]) {
#pragma unroll
    for (int c = 0; c < LRA_COLS; ++c)
#pragma unroll
        for (int k = 0; k < THIN_RANKS; ++k) rr[c][k] = rs[k][threadIdx.x * LRA_COLS + c];
}

// out = base + scale · (left · rightᵀ) ∘ mask for the low-rank part of LoRA (r small): left
// [rows, r] f32, right's element (o, k) at right[o * ro + k * rk] (B [cols, r]: ro = r, rk = 1;
// A [r, cols]: ro = 1, rk = cols), mask [rows, cols] the dropout of `drop` (in the backward).
// One pass over base instead of a matmul, a scale, a mask, a cast and an add with f32
// [rows, cols] temporaries. base may be out itself (each element is read, then written, by
// one thread). Grid (row blocks of LRA_ROWS: rows in x, whose limit is 2^31 - 1 blocks, not
// y's 65535; column blocks of LRA_THREADS threads); each thread takes LRA_COLS consecutive
// columns and keeps 16 ranks of them of right in registers (staged once when r <= 16), the
// rows of left come from shared memory, 16 rows and 16 ranks at a time.
template <typename T>
__device__ void low_rank_add(const T* base, const float* left, const float* right, T* out,
                             long long rows, int cols, int r, long long ro, long long rk,
                             float scale, Dropout drop) {
    __shared__ float ls[LRA_GROUP][THIN_RANKS];
    __shared__ float rs[THIN_RANKS][LRA_THREADS * LRA_COLS + 1];  // padded: fewer conflicts
    long long c0 = (long long)blockIdx.y * LRA_THREADS * LRA_COLS;
    long long o = c0 + threadIdx.x * LRA_COLS;
    bool vec = packable<LRA_COLS>(base, cols) && packable<LRA_COLS>(out, cols);
    bool one_stage = r <= THIN_RANKS;
    float rr[LRA_COLS][THIN_RANKS];
    if (one_stage) {
        stage_right(right, c0, cols, 0, r, ro, rk, rs);
        __syncthreads();
        read_right(rs, rr);
    }
    long long first = (long long)blockIdx.x * LRA_ROWS;
    long long last = first + LRA_ROWS < rows ? first + LRA_ROWS : rows;
    for (long long g0 = first; g0 < last; g0 += LRA_GROUP) {
        // The group's rows of base first, all in flight while the low-rank term is summed:
        // base may be out itself, so no load could be moved above an earlier row's store.
        float acc[LRA_GROUP][LRA_COLS], b[LRA_GROUP][LRA_COLS];
#pragma unroll
        for (int i = 0; i < LRA_GROUP; ++i) {
            long long row = g0 + i;
#pragma unroll
            for (int c = 0; c < LRA_COLS; ++c) acc[i][c] = b[i][c] = 0.f;
            if (row < last && o < cols)
                load_pack<LRA_COLS>(base, row * cols + o, row * cols + cols, vec, b[i]);
        }
        for (int k0 = 0; k0 < r; k0 += THIN_RANKS) {
            __syncthreads();  // the previous rows of left (and ranks of right) are consumed
            if (!one_stage) stage_right(right, c0, cols, k0, r, ro, rk, rs);
            for (int e = threadIdx.x; e < LRA_GROUP * THIN_RANKS; e += blockDim.x) {
                int i = e / THIN_RANKS, k = e % THIN_RANKS;
                long long row = g0 + i;
                ls[i][k] = row < last && k0 + k < r ? left[row * r + k0 + k] : 0.f;
            }
            __syncthreads();
            if (!one_stage) read_right(rs, rr);
#pragma unroll
            for (int i = 0; i < LRA_GROUP; ++i)
#pragma unroll
                for (int k = 0; k < THIN_RANKS; ++k) {
                    float lk = ls[i][k];
#pragma unroll
                    for (int c = 0; c < LRA_COLS; ++c) acc[i][c] += lk * rr[c][k];
                }
        }
        if (o >= cols) continue;
#pragma unroll
        for (int i = 0; i < LRA_GROUP; ++i) {
            long long row = g0 + i;
            if (row >= last) break;
            long long idx = row * cols + o, end = row * cols + cols;
            float v[LRA_COLS];
#pragma unroll
            for (int c = 0; c < LRA_COLS; ++c)
                v[c] = b[i][c] + scale * acc[i][c] * dropout_at(drop, idx + c);
            store_pack<LRA_COLS>(out, idx, end, vec, v);
        }
    }
}

#define INSTANTIATE_LORA(T, S)                                                                  \
    /* Two blocks per SM: at most 128 registers a thread. */                                 \
    extern "C" __global__ void __launch_bounds__(256, 2)                                        \
        thin_project_##S(const T* x, const float* w, long long w_sk, long long w_sn, float* out, \
                         long long rows, int n, int r, float scale, int per_split,              \
                         DROPOUT_PARAMS) {                                                      \
        thin_project<T>(x, w, w_sk, w_sn, out, rows, n, r, scale, per_split, DROPOUT_STRUCT);   \
    }                                                                                           \
    extern "C" __global__ void thin_outer_##S(const T* x, const float* y, float* part,         \
                                              long long rows, int n, int r,                     \
                                              long long per_split, DROPOUT_PARAMS) {            \
        thin_outer<T>(x, y, part, rows, n, r, per_split, DROPOUT_STRUCT);                       \
    }                                                                                           \
    extern "C" __global__ void low_rank_add_##S(                                               \
        const T* base, const float* left, const float* right, T* out, long long rows, int cols, \
        int r, long long ro, long long rk, float scale, DROPOUT_PARAMS) {                       \
        low_rank_add<T>(base, left, right, out, rows, cols, r, ro, rk, scale, DROPOUT_STRUCT);  \
    }

INSTANTIATE_LORA(float, f32)
INSTANTIATE_LORA(bf16_t, bf16)
