// Runs our CUDA kernels on the CPU, one OS thread per CUDA thread, so that their indexing,
// tiling, masking and synchronisation are tested without a GPU. Blocks run one after another;
// the threads of a block run concurrently and meet at __syncthreads (a block barrier) and at
// warp-collective operations (a warp barrier). mma.sync is reassembled from the lanes'
// fragments by the layout of the PTX ISA. Shared memory starts as NaN bytes at every block.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// CUDA's device math has these in the global namespace.
using std::isfinite;

namespace emu {
struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 thread_index, block_index;
inline Dim3 block_dim, grid_dim;

struct Warp {
    std::barrier<> bar{32};
    float value[32];
    uint32_t a[32][4], b[32][2];
    const uint16_t* rows[32];
};
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::vector<unsigned char> shared_bytes;
inline std::mutex atomic_lock;

inline Warp& my_warp() { return *warps[thread_index.x >> 5]; }

// Runs `kernel` (a callable taking no arguments) over the grid. Block sizes are multiples of 32.
template <class F>
void launch(Dim3 grid, Dim3 block, size_t shared, F&& kernel) {
    grid_dim = grid;
    block_dim = block;
    unsigned threads = block.x;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                shared_bytes.assign(shared + 16, 0xff);
                block_barrier = std::make_unique<std::barrier<>>(threads);
                warps.clear();
                for (unsigned w = 0; w < threads / 32; ++w)
                    warps.push_back(std::make_unique<Warp>());
                std::vector<std::thread> pool;
                for (unsigned i = 0; i < threads; ++i)
                    pool.emplace_back([&, i] {
                        thread_index = {i, 0, 0};
                        block_index = {x, y, z};
                        kernel();
                        // An exited thread no longer holds back barriers, as on the GPU.
                        my_warp().bar.arrive_and_drop();
                        block_barrier->arrive_and_drop();
                    });
                for (auto& t : pool) t.join();
            }
}

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace emu

#define threadIdx emu::thread_index
#define blockIdx emu::block_index
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

namespace emu {
inline std::atomic<int> vote{0};
}

// Non-zero when any thread of the block passes a non-zero predicate; a barrier too. Cleared,
// set and read in three barrier-separated steps, so that no thread's vote can land in another
// round.
inline int __syncthreads_or(int predicate) {
    if (threadIdx.x == 0) emu::vote.store(0);
    __syncthreads();
    if (predicate) emu::vote.store(1);
    __syncthreads();
    int any = emu::vote.load();
    __syncthreads();
    return any;
}

inline unsigned char* emu_dynamic_smem() {
    auto p = reinterpret_cast<uintptr_t>(emu::shared_bytes.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

// Shared-window addresses (what ldmatrix and cp.async take) as offsets into the block's
// dynamic shared memory.
inline uint32_t __cvta_generic_to_shared(const void* p) {
    return (uint32_t)(reinterpret_cast<const unsigned char*>(p) - emu_dynamic_smem());
}
inline unsigned char* emu_shared_at(uint32_t addr) { return emu_dynamic_smem() + addr; }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    auto& w = emu::my_warp();
    int lane = emu::thread_index.x & 31;
    w.value[lane] = v;
    w.bar.arrive_and_wait();
    float r = w.value[lane ^ mask];
    w.bar.arrive_and_wait();
    return r;
}

// d (16 x 8, f32) += A (16 x 16, bf16) · B (16 x 8, bf16), fragments as in the PTX ISA.
inline void emu_mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
    auto& w = emu::my_warp();
    int lane = emu::thread_index.x & 31;
    std::memcpy(w.a[lane], a, 16);
    std::memcpy(w.b[lane], b, 8);
    w.bar.arrive_and_wait();
    auto half = [](uint32_t reg, int k) {
        return emu::bits_to_float(((reg >> (16 * (k & 1))) & 0xffffu) << 16);
    };
    auto A = [&](int row, int k) {
        return half(w.a[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)], k);
    };
    auto B = [&](int k, int n) { return half(w.b[n * 4 + ((k & 7) >> 1)][k >> 3], k); };
    int g = lane >> 2, c = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        int row = g + 8 * (i >> 1), col = 2 * c + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[i] = acc;
    }
    w.bar.arrive_and_wait();
    std::memcpy(d, out, 16);
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane l gives row l % 8 of matrix l / 8;
// register i receives, of matrix i, row l / 4 at columns 2 (l % 4) and +1, or (.trans)
// column l / 4 at rows 2 (l % 4) and +1.
inline void emu_ldmatrix_x4(uint32_t* r, const uint16_t* row, bool trans) {
    auto& w = emu::my_warp();
    int lane = emu::thread_index.x & 31;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
        abort();
    }
    w.rows[lane] = row;
    w.bar.arrive_and_wait();
    int g = lane >> 2, c = lane & 3;
    uint32_t out[4];
    for (int i = 0; i < 4; ++i) {
        const uint16_t* const* m = w.rows + 8 * i;
        uint32_t lo = trans ? m[2 * c][g] : m[g][2 * c];
        uint32_t hi = trans ? m[2 * c + 1][g] : m[g][2 * c + 1];
        out[i] = lo | (hi << 16);
    }
    w.bar.arrive_and_wait();
    std::memcpy(r, out, 16);
}

// cp.async: copies are queued per thread, grouped at commit and done at a wait that needs
// them, so that a kernel that reads a tile before waiting for it reads the NaN bytes shared
// memory starts with. A copy that is not valid writes zeros.
namespace emu {
struct AsyncCopy {
    void* dst;
    const void* src;
    size_t bytes;
    bool valid;
};
inline thread_local std::vector<AsyncCopy> async_open;
inline thread_local std::vector<std::vector<AsyncCopy>> async_groups;  // oldest first
}  // namespace emu

inline void emu_cp_async(void* dst, const void* src, size_t bytes, bool valid) {
    if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
        fprintf(stderr, "cp.async: address not %zu-byte aligned\n", bytes);
        abort();
    }
    emu::async_open.push_back({dst, src, bytes, valid});
}

inline void emu_cp_async_commit() {
    emu::async_groups.push_back(std::move(emu::async_open));
    emu::async_open.clear();
}

// Waits until at most `pending` committed groups are outstanding.
inline void emu_cp_async_wait(int pending) {
    auto& groups = emu::async_groups;
    while (groups.size() > (size_t)pending) {
        for (auto& c : groups.front()) {
            if (c.valid)
                std::memcpy(c.dst, c.src, c.bytes);
            else
                std::memset(c.dst, 0, c.bytes);
        }
        groups.erase(groups.begin());
    }
}

template <class T>
inline T atomicAdd(T* p, T v) {
    std::lock_guard<std::mutex> hold(emu::atomic_lock);
    T old = *p;
    *p = old + v;
    return old;
}

struct uint4 {
    uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

inline float __uint_as_float(unsigned u) { return emu::bits_to_float(u); }
inline float __int_as_float(int i) { return emu::bits_to_float((uint32_t)i); }
inline unsigned __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
// Opens a harness's input or output file, or exits.
inline FILE* open_or_exit(const char* path, const char* mode) {
    FILE* f = fopen(path, mode);
    if (!f) {
        perror(path);
        exit(1);
    }
    return f;
}

// Reads n values of T from a harness's input file, or exits.
template <class T>
std::vector<T> take(FILE* f, size_t n) {
    std::vector<T> v(n);
    if (fread(v.data(), sizeof(T), n, f) != n) {
        fprintf(stderr, "short input\n");
        exit(1);
    }
    return v;
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
