// Flash attention for training: causal, grouped-query heads, q and k rotated by RoPE once
// beforehand (rope_rotate_bf16), bf16 storage, f32 math, tensor cores (mma.sync m16n8k16). No
// t x t tensor is ever stored: the forward keeps the log-sum-exp of each row and the backward
// recomputes the probabilities.
// Appended to ops.cu (ld, st, to_bf16, bf16_t) and compiled by NVRTC (compute_80, or
// compute_90 on Hopper: __CUDA_ARCH__ >= 900 code paths); tests run it on the CPU through
// tests/emulate (PEFT_EMULATE), against the CPU reference attention. The loops are written
// for instruction issue as much as for memory: scripts/gpu/ptxas.sh --sass shows what each
// tile costs.
//
// Layouts are those of the projections: q, o, dq: [b, t, heads * D]; k, v, dk, dv:
// [b, t, kv_heads * D]; cos, sin (rope_rotate, and dq, dk taken back through the rotation):
// [t, D / 2] f32, or [b, t, D / 2] for packed rows (their positions restart with each
// sequence), the batch stride rope_bstride (0 when shared); lse, delta: [b, heads, t] f32;
// the dq accumulator: [b, heads, t, D] f32, and the query heads' shares of dk and dv:
// [b, t, heads, D] f32, all three in rotated space and without the scale.
//
// Packed rows (several sequences in one row, as TRL's packing makes them): seg [b, t] holds
// each row's segment id (0: padding), or is null for plain causal attention. A query sees the
// earlier keys of its own segment; a padding query sees every earlier non-padding key (its
// row stays finite); padding keys are seen by no one, as llama.rs's mask_layout builds the
// mask on the CPU. Keys of segment FA_SHARED (prefix tuning's virtual tokens, placed before the
// row's first token) are seen by every query.
//
// Attention sinks (gpt-oss): sinks [heads] f32, or null, one logit per head that joins each
// row's softmax as a key without a value. Only the forward reads them: the log-sum-exp it
// saves includes the sink, so the backward's probabilities are the right ones.
//
// A sliding window (Gemma's, Mistral's, gpt-oss's local layers): window > 0 limits query i to
// keys i - window + 1 ..= i; key tiles wholly before a block's window (forward) and query
// tiles wholly past a key tile's (backward) are skipped. 0: causal attention over every key.
//
// Fragments follow the PTX ISA for mma.m16n8k16 with .bf16 (lane = 4 * g + c), loaded from
// shared memory by ldmatrix (rows padded by 8 elements: no bank conflicts):
//   A (16 x 16, row-major) reg 0: (g, 2c..2c+1), reg 1: (g + 8, 2c..), reg 2: (g, 2c + 8..),
//     reg 3: (g + 8, 2c + 8..);
//   B (16 x 8, "col")      reg 0: (k = 2c..2c+1, n = g), reg 1: (k = 2c + 8.., n = g);
//   C (16 x 8, f32)        c0, c1: (g, 2c..2c+1), c2, c3: (g + 8, 2c..2c+1).
// The lower-index element sits in the low 16 bits of a register.

#define FA_TILE 64      // rows per tile: query rows per forward block (64 · M with the 128-row
                        // forward), kv rows per backward block
#define FA_THREADS 128  // 4 warps, 16 rows each
#define FA_LOG2E 1.4426950408889634f
#define FA_SHARED 0xffffffffu  // the segment id of keys every query sees

typedef unsigned int u32;

#ifdef PEFT_EMULATE
#define FA_SMEM(name) unsigned char* name = emu_dynamic_smem()
#else
#define FA_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// d += a * b on the tensor cores (one warp, every lane).
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, const u32* b) {
#ifdef PEFT_EMULATE
    emu_mma_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two values rounded to bf16 and packed, lo in the low half: one instruction on the GPU.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
#ifdef PEFT_EMULATE
    return (u32)to_bf16(lo) | ((u32)to_bf16(hi) << 16);
#else
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// 2^x by the special function unit alone (ex2.approx.ftz: about 2 ulp, results below 2^-126
// flushed to 0), where exp2f adds a fix-up for those around it.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef PEFT_EMULATE
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// Shared memory is addressed by 32-bit offsets in the shared window where ldmatrix and
// cp.async take it: offsets from a tile's base fold into the instructions, where each generic
// pointer took a 64-bit computation and a conversion (about two integer instructions per
// ldmatrix in the flash kernels' loops).
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// ldmatrix .x4: lane l gives the address of row l % 8 of 8 x 8 matrix l / 8 (16 bytes,
// 16-byte aligned, in shared memory); register i receives, of matrix i, row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1, or with .trans column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr, bool trans) {
#ifdef PEFT_EMULATE
    emu_ldmatrix_x4(r, (const bf16_t*)emu_shared_at(addr), trans);
#else
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
#endif
}

// The byte address of element (row, col) of a row-major bf16 tile at s.
__device__ __forceinline__ u32 at(u32 s, int pitch, int row, int col) {
    return s + 2u * (u32)(row * pitch + col);
}

// The A fragment of the 16 x 16 block at (row0, col0) of a row-major shared tile s: matrices
// (rows, cols) 0: (+0, +0), 1: (+8, +0), 2: (+0, +8), 3: (+8, +8).
__device__ __forceinline__ void load_a(u32* a, u32 s, int pitch, int row0, int col0) {
    int l = threadIdx.x & 31, m = l >> 3;
    ldmatrix_x4(a, at(s, pitch, (l & 7) + 8 * (m & 1), 8 * (m >> 1)) + 2u * (row0 * pitch + col0),
                false);
}

// The B fragments of Xᵀ's two 16 x 8 blocks n0..n0+15 for a row-major tile X:
// B_j(k, n) = X(n0 + 8 j + n, k0 + k). Matrices 0: (n +0, k +0), 1: (+0, +8), 2: (+8, +0),
// 3: (+8, +8).
__device__ __forceinline__ void load_b_t(u32 (*b)[2], u32 s, int pitch, int n0, int k0) {
    int l = threadIdx.x & 31, m = l >> 3;
    u32 r[4];
    ldmatrix_x4(r, at(s, pitch, (l & 7) + 8 * (m >> 1), 8 * (m & 1)) + 2u * (n0 * pitch + k0),
                false);
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// The B fragments of X's two 16 x 8 blocks n0..n0+15 for a row-major tile X:
// B_j(k, n) = X(k0 + k, n0 + 8 j + n), loaded transposed. Matrices 0: (k +0, n +0),
// 1: (+8, +0), 2: (+0, +8), 3: (+8, +8).
__device__ __forceinline__ void load_b(u32 (*b)[2], u32 s, int pitch, int k0, int n0) {
    int l = threadIdx.x & 31, m = l >> 3;
    u32 r[4];
    ldmatrix_x4(r, at(s, pitch, (l & 7) + 8 * (m & 1), 8 * (m >> 1)) + 2u * (k0 * pitch + n0),
                true);
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// C fragments of two adjacent 16 x 8 blocks (columns 16j..16j+15) as the A fragment of the
// next product, rounded to bf16.
__device__ __forceinline__ void c_to_a(u32* a, const float* c0, const float* c1) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// Copies from global to shared memory that run while the threads compute (cp.async, sm_80+):
// a kernel issues the copies of its next tile, commits them as a group, and waits for a group
// (cp_async_wait<N>: all but the N newest groups landed) before the __syncthreads that makes
// the tile visible to the block. No registers hold the tile meanwhile.
// BYTES (16: a tile's chunk, not cached in L1 (.cg); 4: an f32), aligned to their size, or as
// many zero bytes where !valid.
template <int BYTES>
__device__ __forceinline__ void cp_async(u32 dst, const void* src, bool valid) {
#ifdef PEFT_EMULATE
    emu_cp_async(emu_shared_at(dst), src, BYTES, valid);
#else
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                     "r"(valid ? 16 : 0));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                     "r"(valid ? 4 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef PEFT_EMULATE
    emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef PEFT_EMULATE
    emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rows row0..row0 + ROWS - 1 of one head into a shared tile of pitch D + 8, by cp.async (a
// block of THREADS threads); rows at or past t are zeros. `x` points at the head's element 0
// of row 0; rows are `stride` apart, 16-byte aligned. A thread copies the same 16-byte column
// of every R-th row, its source one pointer stepped R rows at a time (a 64-bit multiply per
// copy took most of the loops' integer instructions).
template <int D, int ROWS = FA_TILE, int THREADS = FA_THREADS>
__device__ __forceinline__ void load_tile_async(u32 s, const bf16_t* x, long long stride,
                                                int row0, int t) {
    const int P = D + 8, CHUNKS = D / 8, R = THREADS / CHUNKS;
    const int r = threadIdx.x / CHUNKS, j = (threadIdx.x % CHUNKS) * 8;
    const bf16_t* src = x + (row0 + r) * stride + j;
    const u32 dst = at(s, P, r, j);
    if (row0 + ROWS <= t) {
#pragma unroll
        for (int it = 0; it < ROWS / R; ++it, src += R * stride)
            cp_async<16>(dst + 2u * it * R * P, src, true);
    } else {
#pragma unroll
        for (int it = 0; it < ROWS / R; ++it, src += R * stride) {
            bool valid = row0 + r + it * R < t;
            cp_async<16>(dst + 2u * it * R * P, valid ? src : x, valid);
        }
    }
}

// x[row0..row0+63] (f32) into shared s by cp.async, by threads first..first+63; zeros at or
// past t.
__device__ __forceinline__ void load_rows_async(u32 s, const float* x, int row0, int t,
                                                int first) {
    int i = (int)threadIdx.x - first;
    if (i < 0 || i >= FA_TILE) return;
    bool valid = row0 + i < t;
    cp_async<4>(s + 4u * i, x + (valid ? row0 + i : 0), valid);
}

// Chunks lo = x[j..j + 7] and hi = x[j + H..j + H + 7] of one row rotated by RoPE (HF's
// rotate_half: pairs (j, j + H)), cs and sn the row's cos and sin from j.
__device__ __forceinline__ void rope8(uint4& lo, uint4& hi, const float* cs, const float* sn) {
    const bf16_t* a = (const bf16_t*)&lo;
    const bf16_t* b = (const bf16_t*)&hi;
    u32 ra[4], rb[4];
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
        float a0 = ld(a, e), a1 = ld(a, e + 1), b0 = ld(b, e), b1 = ld(b, e + 1);
        ra[e / 2] = pack_bf16(a0 * cs[e] - b0 * sn[e], a1 * cs[e + 1] - b1 * sn[e + 1]);
        rb[e / 2] = pack_bf16(b0 * cs[e] + a0 * sn[e], b1 * cs[e + 1] + a1 * sn[e + 1]);
    }
    lo = make_uint4(ra[0], ra[1], ra[2], ra[3]);
    hi = make_uint4(rb[0], rb[1], rb[2], rb[3]);
}

// q or k ([b, t, heads * d] bf16, rows 16-byte aligned) rotated by RoPE into out: the flash
// kernels take q and k rotated once rather than rotating each tile each time they load it.
// One thread per 8 pairs, grid-stride; chunks ordered as [b, t, heads, d / 16].
extern "C" __global__ void rope_rotate_bf16(const bf16_t* x, const float* cos, const float* sin,
                                            long long rope_bstride, bf16_t* out, int t,
                                            int heads, int d, long long chunks) {
    int h = d / 2, per_head = h / 8;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < chunks;
         i += (long long)gridDim.x * blockDim.x) {
        int j = (int)(i % per_head) * 8;
        long long row = i / per_head;  // (b, t, head)
        long long bt = row / heads;
        long long at = bt / t * rope_bstride + (bt % t) * h + j;
        const bf16_t* src = x + row * d;
        uint4 lo = *(const uint4*)(src + j), hi = *(const uint4*)(src + j + h);
        rope8(lo, hi, cos + at, sin + at);
        *(uint4*)(out + row * d + j) = lo;
        *(uint4*)(out + row * d + j + h) = hi;
    }
}

// Whether key k lies in query q's sliding window (k <= q given; window 0: no window).
__device__ __forceinline__ bool in_window(int k, int q, int window) {
    return window <= 0 || k + window > q;
}

// Whether query q sees key k (k <= q) given their segment ids (packed rows). The masks combine
// their conditions with & and |, not && and ||: short-circuits compile to a branch per score.
__device__ __forceinline__ bool same_sequence(unsigned q_seg, unsigned k_seg) {
    return (k_seg != 0) & ((q_seg == 0) | (k_seg == q_seg) | (k_seg == FA_SHARED));
}

// Max and sum over the four lanes that hold one fragment row.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Whether the forward keeps the query fragments in registers for all key tiles (d = 64), or
// reads them from shared memory for each (d = 128: registers are short).
#define FA_Q_IN_REGS(D) ((D) <= 64)

// Forward. Grid (query blocks of 64 · M rows, heads, batch); block FA_THREADS: warp w takes
// rows 64 mt + 16 w .. + 15 of the block for each mt < M, so that each key and value fragment
// a warp reads from shared memory serves M row tiles (M = 2: FlashAttention-2's 128-row
// blocks, at twice the accumulators). Shared memory: the key and value tiles (64 x (D + 8)
// bf16 each), the block's query rows (with d = 128 M tiles of their own; with d = 64 in the
// value tile's space (M = 1) or the key and value tiles' (M = 2) until their fragments are in
// registers), and 64 u32 (the key tile's segment ids). The value tile is copied in while the
// scores are computed and the next key tile while P · V is.
template <int D, int M>
__device__ void flash_fwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,
                          bf16_t* o, float* lse, int t, int heads, int kv_heads, float scale,
                          const float* sinks, int window) {
    const int P = D + 8, TILE = FA_TILE * P;
    constexpr bool QREG = FA_Q_IN_REGS(D);
    // With M = 2 and d = 64 the query rows fill the key tile's space: K's first tile follows.
    constexpr bool K_WITH_Q = !(QREG && M > 1);
    FA_SMEM(smem);
    const u32 Ks = smem_addr(smem), Vs = Ks + 2 * TILE;
    const u32 Qs = !QREG ? Vs + 2 * TILE : M == 1 ? Vs : Ks;
    unsigned* Gs = (unsigned*)(smem + 2 * TILE * (QREG ? 2 : 2 + M));
    int qt = gridDim.x - 1 - blockIdx.x;  // longest rows first
    int hi = blockIdx.y, bi = blockIdx.z, kh = hi / (heads / kv_heads);
    long long qs = (long long)heads * D, ks = (long long)kv_heads * D;
    const bf16_t* qb = q + bi * t * qs + hi * D;
    const bf16_t* kb = k + bi * t * ks + kh * D;
    const bf16_t* vb = v + bi * t * ks + kh * D;
    const unsigned* segb = seg ? seg + (long long)bi * t : 0;
    int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    const int q0 = qt * M * FA_TILE;
    const int n_tiles = (t + FA_TILE - 1) / FA_TILE;
    const int last = (qt + 1) * M < n_tiles ? (qt + 1) * M - 1 : n_tiles - 1;  // key tiles
    // The first key tile the block's first row's window reaches.
    const int first = window > 0 && q0 - window + 1 > 0 ? (q0 - window + 1) / FA_TILE : 0;

#pragma unroll
    for (int mt = 0; mt < M; ++mt)
        load_tile_async<D>(Qs + 2 * mt * TILE, qb, qs, q0 + mt * FA_TILE, t);
    if (K_WITH_Q) load_tile_async<D>(Ks, kb, ks, first * FA_TILE, t);
    cp_async_commit();
    int loaded = K_WITH_Q ? first : -1;  // the key tile in Ks, or on its way there
    u32 qa[QREG ? M : 1][QREG ? D / 16 : 1][4];
    if constexpr (QREG) {
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < M; ++mt)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                load_a(qa[mt][kk], Qs + 2 * mt * TILE, P, warp * 16, kk * 16);
        if (!K_WITH_Q) __syncthreads();  // the key tile's copy overwrites the query rows
    }

    float acc[M][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][n][i] = 0.f;
    float m[M][2], l[M][2];
    int row[M][2];
    unsigned row_seg[M][2];
#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m[mt][r] = NEG_INF;
            l[mt][r] = 0.f;
            row[mt][r] = q0 + mt * FA_TILE + warp * 16 + g + 8 * r;
            row_seg[mt][r] = segb && row[mt][r] < t ? segb[row[mt][r]] : 0;
        }
    const float scale2 = scale * FA_LOG2E;

    for (int kt = first; kt <= last; ++kt) {
        if (segb) {
            // Packed rows: a key tile that none of the block's rows sees (another sequence's)
            // is skipped whole; its scores would all be masked. (Gs was last read before the
            // previous tile's second barrier.)
            for (int i = threadIdx.x; i < FA_TILE; i += blockDim.x)
                Gs[i] = kt * FA_TILE + i < t ? segb[kt * FA_TILE + i] : 0;
            __syncthreads();
            bool seen = false;
            for (int cl = 2 * c; cl < FA_TILE; cl += 8)
                for (int e = 0; e < 2; ++e)
                    for (int mt = 0; mt < M; ++mt)
                        for (int r = 0; r < 2; ++r)
                            seen |= row[mt][r] < t && kt * FA_TILE + cl + e <= row[mt][r] &&
                                    in_window(kt * FA_TILE + cl + e, row[mt][r], window) &&
                                    same_sequence(row_seg[mt][r], Gs[cl + e]);
            if (!__syncthreads_or(seen)) {
                cp_async_wait<0>();  // a key tile on its way lands before Ks is loaded again
                continue;
            }
        }
        if (loaded != kt) {
            load_tile_async<D>(Ks, kb, ks, kt * FA_TILE, t);
            cp_async_commit();
            loaded = kt;
        }
        cp_async_wait<0>();
        __syncthreads();  // the key tile is in; the last tile's reads of Vs (and qa's) are done
        load_tile_async<D>(Vs, vb, ks, kt * FA_TILE, t);
        cp_async_commit();

        float s[M][8][4];
#pragma unroll
        for (int mt = 0; mt < M; ++mt)
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) s[mt][n][i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32* a[M];
            u32 qf[M][4];
#pragma unroll
            for (int mt = 0; mt < M; ++mt) {
                if constexpr (QREG) {
                    a[mt] = qa[mt][kk];
                } else {
                    load_a(qf[mt], Qs + 2 * mt * TILE, P, warp * 16, kk * 16);
                    a[mt] = qf[mt];
                }
            }
#pragma unroll
            for (int n = 0; n < 8; n += 2) {
                u32 b[2][2];
                load_b_t(b, Ks, P, n * 8, kk * 16);
#pragma unroll
                for (int mt = 0; mt < M; ++mt) {
                    mma_bf16(s[mt][n], a[mt], b[0]);
                    mma_bf16(s[mt][n + 1], a[mt], b[1]);
                }
            }
        }
        // Only a tile that reaches the block's first row, or packed rows, need masks: every key
        // of an earlier tile precedes every row (keys past t lie in a tile that reaches it);
        // with a window, also a tile whose first key some row's window leaves out.
        const bool masked = segb || kt * FA_TILE + FA_TILE - 1 > q0 ||
                            (window > 0 && kt * FA_TILE + window < q0 + M * FA_TILE);
#pragma unroll
        for (int mt = 0; mt < M; ++mt) {
            // The running row maxima of the raw scores (the scale is positive: the same
            // order), masked scores -inf.
            float mx[2] = {m[mt][0], m[mt][1]};
            // Each path its own loop, as in the backward.
            auto keep = [&](int n, int i, bool seen) {
                s[mt][n][i] = seen ? s[mt][n][i] : NEG_INF;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[mt][n][i]);
            };
            if (segb) {
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        int cl = n * 8 + 2 * c + (i & 1), col = kt * FA_TILE + cl;
                        keep(n, i,
                             (col <= row[mt][i >> 1]) & in_window(col, row[mt][i >> 1], window) &
                                 same_sequence(row_seg[mt][i >> 1], Gs[cl]));
                    }
            } else if (masked) {
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        int col = kt * FA_TILE + n * 8 + 2 * c + (i & 1);
                        keep(n, i, (col <= row[mt][i >> 1]) & in_window(col, row[mt][i >> 1], window));
                    }
            } else {
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) keep(n, i, true);
            }
            // Exponentials in log2 units, the scale folded into one multiply-add each. In
            // packed rows a tile may hold no key a row sees yet (its maximum still -inf): they
            // then start from 0, not from -inf - -inf.
            float alpha[2], base[2], sum[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = quad_max(mx[r]);
                base[r] = mx[r] == NEG_INF ? 0.f : mx[r] * scale2;
                alpha[r] = fast_exp2(m[mt][r] * scale2 - base[r]);
                m[mt][r] = mx[r];
            }
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float p = fast_exp2(fmaf(s[mt][n][i], scale2, -base[i >> 1]));
                    s[mt][n][i] = p;
                    sum[i >> 1] += p;
                }
#pragma unroll
            for (int r = 0; r < 2; ++r) l[mt][r] = l[mt][r] * alpha[r] + sum[r];
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[mt][n][i] *= alpha[i >> 1];
        }
        cp_async_wait<0>();
        __syncthreads();  // the value tile is in; every warp is done with Ks
        if (kt < last) {
            load_tile_async<D>(Ks, kb, ks, (kt + 1) * FA_TILE, t);
            cp_async_commit();
            loaded = kt + 1;
        }
        // acc += P · V
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[M][4];
#pragma unroll
            for (int mt = 0; mt < M; ++mt) c_to_a(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                u32 b[2][2];
                load_b(b, Vs, P, kk * 16, n * 8);
#pragma unroll
                for (int mt = 0; mt < M; ++mt) {
                    mma_bf16(acc[mt][n], pa[mt], b[0]);
                    mma_bf16(acc[mt][n + 1], pa[mt], b[1]);
                }
            }
        }
    }

#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float total = quad_sum(l[mt][r]);
            if (row[mt][r] >= t) continue;
            // A row that sees no key (a padding row at the start of a packed row): zeros.
            bool none = total == 0.f;
            // The row's maximum in log2 units, which `total` is relative to.
            float top = none ? 0.f : m[mt][r] * scale2;
            float kept = 1.f;
            if (sinks) {
                // gpt-oss's sink: one more logit of the head (unscaled) in the softmax, with no
                // value; the sums move to the larger of the two maxima.
                float sink = sinks[hi] * FA_LOG2E;
                float both = none ? sink : fmaxf(top, sink);
                kept = none ? 0.f : fast_exp2(top - both);
                total = total * kept + fast_exp2(sink - both);
                top = both;
                none = false;
            }
            float inv = none ? 0.f : kept / total;
            bf16_t* dst = o + (bi * t + row[mt][r]) * qs + hi * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                dst[n * 8 + 2 * c] = to_bf16(acc[mt][n][2 * r] * inv);
                dst[n * 8 + 2 * c + 1] = to_bf16(acc[mt][n][2 * r + 1] * inv);
            }
            if (c == 0)
                lse[((long long)bi * heads + hi) * t + row[mt][r]] =
                    none ? 0.f : (top + log2f(total)) / FA_LOG2E;
        }
}

// delta = rowsum(dO ∘ O) per query row and head; one warp per row. Grid: b * t * heads / 4
// blocks of FA_THREADS (rows ordered as [b, t, heads], delta written as [b, heads, t]).
__device__ void flash_bwd_delta(const bf16_t* o, const bf16_t* dout, float* delta, int t,
                                int heads, int d, long long rows) {
    long long r = (long long)blockIdx.x * (FA_THREADS / 32) + (threadIdx.x >> 5);
    if (r >= rows) return;
    int lane = threadIdx.x & 31;
    float s = 0.f;
    for (int j = lane; j < d; j += 32) s += ld(o, r * d + j) * ld(dout, r * d + j);
    s = warp_reduce(s, false);
    long long hi = r % heads, bt = r / heads;
    if (lane == 0) delta[((bt / t) * heads + hi) * t + bt % t] = s;
}

// Backward. Grid (key blocks of 64 · KB keys, heads, batch): one block per key block and query
// head, so that the work spreads over heads · blocks (a block's share grows with the queries
// after it). Block KB · FA_THREADS, a warp per 16 keys; shared memory: the K and V tiles (64 ·
// KB x (D + 8) bf16 each), two buffers of Q and dO tiles (64 x (D + 8)), dS (64 x (64 · KB +
// 8) bf16), two buffers of log-sum-exp and delta (64 f32 each) and the segment ids of the
// query tile and of the block's keys (64 and 64 · KB u32). The next query
// tile's Q, dO, log-sum-exp and delta are copied into the other buffer while this one is
// computed. Each block writes its query head's share of its keys' dK and dV (f32, rotated
// space, unscaled) to dk_part and dv_part ([b, t, heads, D]), which flash_bwd_dkv sums per kv
// head, and adds its share of dQ to the f32 accumulator with atomics.
template <int D, int KB>
__device__ void flash_bwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,
                          const bf16_t* dout, const float* lse, const float* delta,
                          float* dq_acc, float* dk_part, float* dv_part, int t, int heads,
                          int kv_heads, float scale, int window) {
    // KB 64-key tiles a block, a warp per 16 keys: KB = 2 reads each query tile once for 128
    // keys and adds its dQ share once for them (PEFT_CUDA_FLASH_BWD=wide).
    const int KEYS = KB * FA_TILE, THREADS = KB * FA_THREADS;
    const int P = D + 8, PS = KEYS + 8, TILE = FA_TILE * P;
    FA_SMEM(smem);
    const u32 Ks = smem_addr(smem), Vs = Ks + 2 * KB * TILE;
    const u32 Qbuf = Vs + 2 * KB * TILE;  // two tiles
    const u32 Obuf = Qbuf + 4 * TILE;     // dO, two tiles
    bf16_t* Ss = (bf16_t*)(smem + 2 * (2 * KB + 4) * TILE);  // dS as [query][key]
    const u32 Ss_at = smem_addr(Ss);
    float* Lbuf = (float*)(Ss + FA_TILE * PS);  // two rows of 64
    float* Ebuf = Lbuf + 2 * FA_TILE;
    unsigned* Gs = (unsigned*)(Ebuf + 2 * FA_TILE);  // segment ids of the query tile
    unsigned* Gk = Gs + FA_TILE;                     // and of the block's keys
    int kt = blockIdx.x, hi = blockIdx.y, bi = blockIdx.z;
    int kh = hi / (heads / kv_heads), nq = (t + FA_TILE - 1) / FA_TILE;
    if (window > 0) {
        // The last query tile whose rows' windows reach the block's last key.
        int last_query = (kt + 1) * KEYS - 1 + window - 1;
        if (last_query / FA_TILE + 1 < nq) nq = last_query / FA_TILE + 1;
    }
    long long qs = (long long)heads * D, ks = (long long)kv_heads * D;
    int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    int key[2] = {kt * KEYS + warp * 16 + g, kt * KEYS + warp * 16 + g + 8};
    // The segment ids are read through the kernel parameter, not a pointer of our own: the
    // d = 128 kernel has no register to spare.
    const bool packed = seg != 0;
    if (packed)
        for (int i = threadIdx.x; i < KEYS; i += blockDim.x)
            Gk[i] = kt * KEYS + i < t ? seg[(long long)bi * t + kt * KEYS + i] : 0;
    const float scale2 = scale * FA_LOG2E;

    load_tile_async<D, KEYS, THREADS>(Ks, k + bi * t * ks + kh * D, ks, kt * KEYS, t);
    load_tile_async<D, KEYS, THREADS>(Vs, v + bi * t * ks + kh * D, ks, kt * KEYS, t);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk_acc[n][i] = dv_acc[n][i] = 0.f;

    const bf16_t* qb = q + bi * t * qs + hi * D;
    const bf16_t* ob = dout + bi * t * qs + hi * D;
    const float* lb = lse + ((long long)bi * heads + hi) * t;
    const float* eb = delta + ((long long)bi * heads + hi) * t;
    float* dqb = dq_acc + ((long long)bi * heads + hi) * t * D;
    // Query tile qt's Q, dO, log-sum-exp and delta into buffer `buf`, as one group.
    auto load_queries = [&](int buf, int qt) {
        load_tile_async<D, FA_TILE, THREADS>(Qbuf + 2 * buf * TILE, qb, qs, qt * FA_TILE, t);
        load_tile_async<D, FA_TILE, THREADS>(Obuf + 2 * buf * TILE, ob, qs, qt * FA_TILE, t);
        load_rows_async(smem_addr(Lbuf + buf * FA_TILE), lb, qt * FA_TILE, t, 0);
        load_rows_async(smem_addr(Ebuf + buf * FA_TILE), eb, qt * FA_TILE, t, FA_TILE);
        cp_async_commit();
    };
    // One barrier a tile where there were two: a tile's reads of its buffer and of Gs end
    // before the barrier that follows its dS store, so the next tile may refill the other
    // buffer and Gs at once; its reads of Ss end before the next tile's barrier after loading.
    int cur = 0, loaded = -1;  // the query tile in buffer cur, or on its way there
    for (int qt = kt * KB; qt < nq; ++qt) {
        if (packed) {
            // Packed rows: a query tile that sees none of the block's keys is skipped whole.
            for (int i = threadIdx.x; i < FA_TILE; i += blockDim.x) {
                int r = qt * FA_TILE + i;
                Gs[i] = r < t ? seg[(long long)bi * t + r] : 0;
            }
            __syncthreads();
            bool seen = false;
#pragma unroll 1
            for (int ql = 2 * c; ql < FA_TILE; ql += 8)
                for (int e = 0; e < 2; ++e)
                    for (int r = 0; r < 2; ++r) {
                        int query = qt * FA_TILE + ql + e;
                        seen |= key[r] < t && query < t && query >= key[r] &&
                                in_window(key[r], query, window) &&
                                same_sequence(Gs[ql + e], Gk[warp * 16 + g + 8 * r]);
                    }
            if (!__syncthreads_or(seen)) {
                cp_async_wait<0>();  // a tile on its way lands before its buffer is loaded again
                continue;
            }
        }
        if (loaded != qt) load_queries(cur, qt);
        const bool next = qt + 1 < nq;
        if (next) {
            load_queries(cur ^ 1, qt + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u32 Qs = Qbuf + 2 * cur * TILE;
        const u32 Os = Obuf + 2 * cur * TILE;
        const float* Ls = Lbuf + cur * FA_TILE;
        const float* Es = Ebuf + cur * FA_TILE;
        if (next) {
            loaded = qt + 1;
            cur ^= 1;
        }

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's 16 keys and the tile's 64 queries.
        float st[8][4], dpt[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) st[n][i] = dpt[n][i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 ka[4], va[4];
            load_a(ka, Ks, P, warp * 16, kk * 16);
            load_a(va, Vs, P, warp * 16, kk * 16);
#pragma unroll
            for (int n = 0; n < 8; n += 2) {
                u32 b[2][2];
                load_b_t(b, Qs, P, n * 8, kk * 16);
                mma_bf16(st[n], ka, b[0]);
                mma_bf16(st[n + 1], ka, b[1]);
                load_b_t(b, Os, P, n * 8, kk * 16);
                mma_bf16(dpt[n], va, b[0]);
                mma_bf16(dpt[n + 1], va, b[1]);
            }
        }
        // Pᵀ (zero where the query precedes the key, lies past t or, in packed rows, does not
        // see it), then dSᵀ in place of dPᵀ: P ∘ (dP − delta), without the scale. Besides packed
        // rows, only the query tiles that overlap the block's keys and the last one (rows past
        // t) need the causal mask.
        // Each path its own loop over the scores: one loop whose mask tested `packed` per
        // score would cost every tile the packed rows' checks.
        auto to_ds = [&](int n, int i, bool seen) {
            int ql = n * 8 + 2 * c + (i & 1);
            float p = seen ? fast_exp2(fmaf(st[n][i], scale2, -Ls[ql] * FA_LOG2E)) : 0.f;
            st[n][i] = p;
            dpt[n][i] = p * (dpt[n][i] - Es[ql]);
        };
        if (packed) {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    int ql = n * 8 + 2 * c + (i & 1), query = qt * FA_TILE + ql;
                    to_ds(n, i,
                          (query >= key[i >> 1]) & (query < t) &
                              in_window(key[i >> 1], query, window) &
                              same_sequence(Gs[ql], Gk[warp * 16 + g + 8 * (i >> 1)]));
                }
        } else if (qt * FA_TILE < (kt + 1) * KEYS || qt * FA_TILE + FA_TILE > t ||
                   (window > 0 && qt * FA_TILE + FA_TILE - 1 >= kt * KEYS + window)) {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    int query = qt * FA_TILE + n * 8 + 2 * c + (i & 1);
                    to_ds(n, i,
                          (query >= key[i >> 1]) & (query < t) &
                              in_window(key[i >> 1], query, window));
                }
        } else {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) to_ds(n, i, true);
        }
        // dV += Pᵀ dO, dK += dSᵀ Q
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[4], sa[4];
            c_to_a(pa, st[2 * kk], st[2 * kk + 1]);
            c_to_a(sa, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                u32 b[2][2];
                load_b(b, Os, P, kk * 16, n * 8);
                mma_bf16(dv_acc[n], pa, b[0]);
                mma_bf16(dv_acc[n + 1], pa, b[1]);
                load_b(b, Qs, P, kk * 16, n * 8);
                mma_bf16(dk_acc[n], sa, b[0]);
                mma_bf16(dk_acc[n + 1], sa, b[1]);
            }
        }
        // dS to shared memory as [query][key] for dQ = dS K.
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                Ss[(n * 8 + 2 * c + (i & 1)) * PS + warp * 16 + g + 8 * (i >> 1)] =
                    to_bf16(dpt[n][i]);
        __syncthreads();
        // dQ = dS K for the tile's 64 queries: warp w takes queries 16 (w % 4).. and, with
        // KB = 2, half of the columns; at most 64 columns at a time (fewer live registers).
        constexpr int NCOLS = D / 8 / KB, NB = NCOLS < 8 ? NCOLS : 8;
        const int qrow = (warp % 4) * 16, nbeg = (warp / 4) * NCOLS;
#pragma unroll
        for (int n0 = nbeg; n0 < nbeg + NCOLS; n0 += NB) {
            float dq[NB][4];
#pragma unroll
            for (int n = 0; n < NB; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) dq[n][i] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                u32 sa[4];
                load_a(sa, Ss_at, PS, qrow, kk * 16);
#pragma unroll
                for (int n = 0; n < NB; n += 2) {
                    u32 b[2][2];
                    load_b(b, Ks, P, kk * 16, (n0 + n) * 8);
                    mma_bf16(dq[n], sa, b[0]);
                    mma_bf16(dq[n + 1], sa, b[1]);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                int query = qt * FA_TILE + qrow + g + 8 * r;
                if (query >= t) continue;
                float* dst = dqb + (long long)query * D + n0 * 8 + 2 * c;
#pragma unroll
                for (int n = 0; n < NB; ++n) {
#if __CUDA_ARCH__ >= 900
                    // One vector atomic per pair (sm_90): half the atomic operations.
                    atomicAdd((float2*)(dst + n * 8), make_float2(dq[n][2 * r], dq[n][2 * r + 1]));
#else
                    atomicAdd(dst + n * 8, dq[n][2 * r]);
                    atomicAdd(dst + n * 8 + 1, dq[n][2 * r + 1]);
#endif
                }
            }
        }
    }

    // This head's share of dK and dV for the block's keys.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (key[r] >= t) continue;
        long long row = ((long long)bi * t + key[r]) * heads + hi;
        float* kdst = dk_part + row * D;
        float* vdst = dv_part + row * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                kdst[n * 8 + 2 * c + e] = dk_acc[n][2 * r + e];
                vdst[n * 8 + 2 * c + e] = dv_acc[n][2 * r + e];
            }
    }
}

// dk, dv ([b, t, kv_heads * d], bf16) from the query heads' shares: summed over each kv
// head's group, dk scaled and taken back through the rotation (the inverse RoPE: sin
// negated). One thread per pair (j, j + d/2) of a kv head, grid-stride; pairs ordered as
// [b, t, kv_heads, d/2].
__device__ void flash_bwd_dkv(const float* dk_part, const float* dv_part, const float* cos,
                              const float* sin, long long rope_bstride, bf16_t* dk, bf16_t* dv,
                              int t, int heads, int kv_heads, int d, float scale,
                              long long pairs) {
    int h = d / 2, n_rep = heads / kv_heads;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < pairs;
         i += (long long)gridDim.x * blockDim.x) {
        int j = (int)(i % h);
        long long rest = i / h;
        int kh = (int)(rest % kv_heads);
        long long bt = rest / kv_heads;
        int ti = (int)(bt % t);
        float k1 = 0.f, k2 = 0.f, v1 = 0.f, v2 = 0.f;
        for (int r = 0; r < n_rep; ++r) {
            long long src = (bt * heads + kh * n_rep + r) * d;
            k1 += dk_part[src + j];
            k2 += dk_part[src + j + h];
            v1 += dv_part[src + j];
            v2 += dv_part[src + j + h];
        }
        k1 *= scale;
        k2 *= scale;
        long long at = bt / t * rope_bstride + ti * h + j;
        float cs = cos[at], sn = sin[at];
        long long dst = (bt * kv_heads + kh) * d;
        dk[dst + j] = to_bf16(k1 * cs + k2 * sn);
        dk[dst + j + h] = to_bf16(k2 * cs - k1 * sn);
        dv[dst + j] = to_bf16(v1);
        dv[dst + j + h] = to_bf16(v2);
    }
}

// dq = inverse RoPE of (scale * the accumulator), as [b, t, heads * d]. One thread per pair
// (j, j + d/2), grid-stride; pairs ordered as [b, t, heads, d/2].
__device__ void flash_bwd_dq(const float* dq_acc, const float* cos, const float* sin,
                             long long rope_bstride, bf16_t* dq, int t, int heads, int d,
                             float scale, long long pairs) {
    int h = d / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < pairs;
         i += (long long)gridDim.x * blockDim.x) {
        int j = (int)(i % h);
        long long rest = i / h;
        int hi = (int)(rest % heads);
        long long bt = rest / heads;
        int ti = (int)(bt % t);
        long long bi = bt / t;
        const float* src = dq_acc + ((bi * heads + hi) * t + ti) * d;
        float x1 = src[j] * scale, x2 = src[j + h] * scale;
        long long at = bi * rope_bstride + ti * h + j;
        float cs = cos[at], sn = sin[at];
        bf16_t* dst = dq + (bt * heads + hi) * d;
        dst[j] = to_bf16(x1 * cs + x2 * sn);
        dst[j + h] = to_bf16(x2 * cs - x1 * sn);
    }
}

// Blocks per SM the kernels are built for (the register budget: 65536 / (128 · blocks) a
// thread); shared memory allows them. ptxas (sm_90): forward 128 registers (d = 64) and 164
// (d = 128) without spills; the backward at three blocks would spill hundreds of bytes.
#define FA_FWD_BLOCKS(D) ((D) <= 64 ? 4 : 3)
#define FA_BWD_BLOCKS 2
// Each kernel twice: plain causal attention (no sinks, no window: constants the compiler folds,
// so these keep the registers they had before either existed), and `_ext` with gpt-oss's sinks
// (forward) and a sliding window.
#define FLASH(D)                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, FA_FWD_BLOCKS(D))                  \
        flash_fwd_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg, \
                       bf16_t* o, float* lse, int t, int heads, int kv_heads, float scale) {    \
        flash_fwd<D, 1>(q, k, v, seg, o, lse, t, heads, kv_heads, scale, nullptr, 0);           \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, FA_FWD_BLOCKS(D))                  \
        flash_fwd_ext_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* v,                  \
                           const unsigned* seg, bf16_t* o, float* lse, int t, int heads,        \
                           int kv_heads, float scale, const float* sinks, int window) {         \
        flash_fwd<D, 1>(q, k, v, seg, o, lse, t, heads, kv_heads, scale, sinks, window);        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, FA_BWD_BLOCKS) flash_bwd_d##D(     \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,                 \
        const bf16_t* dout, const float* lse, const float* delta, float* dq_acc, float* dk_part, \
        float* dv_part, int t, int heads, int kv_heads, float scale) {                          \
        flash_bwd<D, 1>(q, k, v, seg, dout, lse, delta, dq_acc, dk_part, dv_part, t, heads,     \
                        kv_heads, scale, 0);                                                    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, FA_BWD_BLOCKS) flash_bwd_ext_d##D( \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,                 \
        const bf16_t* dout, const float* lse, const float* delta, float* dq_acc, float* dk_part, \
        float* dv_part, int t, int heads, int kv_heads, float scale, int window) {              \
        flash_bwd<D, 1>(q, k, v, seg, dout, lse, delta, dq_acc, dk_part, dv_part, t, heads,     \
                        kv_heads, scale, window);                                               \
    }                                                                                           \
    /* 128 keys a block (PEFT_CUDA_FLASH_BWD=wide): eight warps, one block an SM. */            \
    extern "C" __global__ void __launch_bounds__(2 * FA_THREADS, 1) flash_bwd_wide_d##D(        \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,                 \
        const bf16_t* dout, const float* lse, const float* delta, float* dq_acc, float* dk_part, \
        float* dv_part, int t, int heads, int kv_heads, float scale) {                          \
        flash_bwd<D, 2>(q, k, v, seg, dout, lse, delta, dq_acc, dk_part, dv_part, t, heads,     \
                        kv_heads, scale, 0);                                                    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(2 * FA_THREADS, 1) flash_bwd_wide_ext_d##D(    \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,                 \
        const bf16_t* dout, const float* lse, const float* delta, float* dq_acc, float* dk_part, \
        float* dv_part, int t, int heads, int kv_heads, float scale, int window) {              \
        flash_bwd<D, 2>(q, k, v, seg, dout, lse, delta, dq_acc, dk_part, dv_part, t, heads,     \
                        kv_heads, scale, window);                                               \
    }

// The forward with 128-row query blocks (M = 2; PEFT_CUDA_FLASH=wide), d = 64 only: 247
// registers at two blocks an SM (three spill 500 bytes); with d = 128 it spills at one.
extern "C" __global__ void __launch_bounds__(FA_THREADS, 2)
    flash_fwd_wide_d64(const bf16_t* q, const bf16_t* k, const bf16_t* v, const unsigned* seg,
                       bf16_t* o, float* lse, int t, int heads, int kv_heads, float scale) {
    flash_fwd<64, 2>(q, k, v, seg, o, lse, t, heads, kv_heads, scale, nullptr, 0);
}
extern "C" __global__ void __launch_bounds__(FA_THREADS, 2)
    flash_fwd_wide_ext_d64(const bf16_t* q, const bf16_t* k, const bf16_t* v,
                           const unsigned* seg, bf16_t* o, float* lse, int t, int heads,
                           int kv_heads, float scale, const float* sinks, int window) {
    flash_fwd<64, 2>(q, k, v, seg, o, lse, t, heads, kv_heads, scale, sinks, window);
}

FLASH(64)
FLASH(128)

extern "C" __global__ void flash_bwd_delta_bf16(const bf16_t* o, const bf16_t* dout,
                                                float* delta, int t, int heads, int d,
                                                long long rows) {
    flash_bwd_delta(o, dout, delta, t, heads, d, rows);
}

extern "C" __global__ void flash_bwd_dkv_bf16(const float* dk_part, const float* dv_part,
                                              const float* cos, const float* sin,
                                              long long rope_bstride, bf16_t* dk, bf16_t* dv,
                                              int t, int heads, int kv_heads, int d, float scale,
                                              long long pairs) {
    flash_bwd_dkv(dk_part, dv_part, cos, sin, rope_bstride, dk, dv, t, heads, kv_heads, d, scale,
                  pairs);
}

extern "C" __global__ void flash_bwd_dq_bf16(const float* dq_acc, const float* cos,
                                             const float* sin, long long rope_bstride,
                                             bf16_t* dq, int t, int heads, int d, float scale,
                                             long long pairs) {
    flash_bwd_dq(dq_acc, cos, sin, rope_bstride, dq, t, heads, d, scale, pairs);
}
