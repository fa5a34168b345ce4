// Runs the row-wise and elementwise kernels of src/kernels/ops.cu (f32) under the CPU emulation:
//   ops <kernel> <input> <output>
// rms_norm_bwd:   i32 rows, d; f32 eps; f32 x (rows·d), w (d), g (rows·d), res (rows·d) -> y,
//                 dx, then dx + res (rows·d each; y by rms_norm_fwd, the last by
//                 rms_norm_bwd_add)
// rms_norm_dw:    i32 rows, d, per; f32 eps; f32 x (rows·d), g (rows·d) -> dw (d), by
//                 rms_norm_dw_part over blocks of `per` rows, then rms_norm_dw_sum
// embedding:      i32 n, d, vocab; u32 ids (n); f32 grad (n·d) -> dW (vocab·d), by
//                 embedding_chains then embedding_bwd
// bf16_concat:    i64 n (6); f32 segments (n[0], then n[1], ...) -> one after another,
//                 rounded to bf16 (as f32)
// add_same:       i64 n; f32 a, b (n each) -> a + b in bf16 (as f32), one element past an
//                 aligned start when n is odd (every pack read one by one)
// gated:          i64 n; i32 act; f32 alpha, limit; f32 gate, up, grad (n each) -> y (n), then
//                 d gate, d up (2n)
// causal_softmax: i32 rows, q, k; f32 scale; f32 x, g (rows·k each) -> y, then dx (rows·k)
// Dropout (D below): i32 on; u32 k1, k2, threshold; f32 scale (ops.cu's Dropout).
// low_rank_add:   i64 rows; i32 cols, r, right_t; f32 scale; D; f32 base (rows·cols), left
//                 (rows·r), right (cols·r, as [r, cols] when right_t) -> out (rows·cols)
// dropout_mask:   i64 n; D; f32 x (n) -> mask (n), then x ∘ mask (n, by dropout_apply)
// random_normal:  u64 key; i64 n; f32 std -> values (n)
// random_uniform: u64 key; i64 n; f32 low, high -> values (n)
// thin_project:   i64 rows; i32 n, r, w_t, splits; f32 scale; D; f32 x (rows·n), w (r·n, as
//                 [n, r] when w_t) -> out (rows·r)
// thin_outer:     i64 rows; i32 n, r, out_t, splits; f32 scale; D; f32 x (rows·n), y (rows·r)
//                 -> out (n·r, as [r, n] when out_t)
// Launch shapes as in src/cuda.rs: a warp per row for RMSNorm (8 a block), 256-thread blocks for
// the elementwise kernels; low_rank_add and the thin kernels as its launchers set them.
#include "cuda.h"
#include "../../src/kernels/ops.cu"
#include "../../src/kernels/lora.cu"
#include <string>

Dropout take_dropout(FILE* in) {
    int on = take<int>(in, 1)[0];
    auto u = take<unsigned>(in, 3);
    return Dropout{on, u[0], u[1], u[2], take<float>(in, 1)[0]};
}

int main(int argc, char** argv) {
    if (argc != 4) { fprintf(stderr, "usage: ops <kernel> <input> <output>\n"); return 2; }
    std::string kernel = argv[1];
    FILE* in = open_or_exit(argv[2], "rb");
    std::vector<float> out;
    if (kernel == "rms_norm_bwd") {
        auto dims = take<int>(in, 2);
        unsigned rows = dims[0];
        int d = dims[1];
        float eps = take<float>(in, 1)[0];
        auto x = take<float>(in, (size_t)rows * d), w = take<float>(in, d);
        auto g = take<float>(in, (size_t)rows * d), res = take<float>(in, (size_t)rows * d);
        std::vector<float> dx(x.size()), dx_res(x.size());
        out.resize(x.size());
        unsigned blocks = (rows + NORM_ROWS - 1) / NORM_ROWS;
        emu::launch({blocks}, {32 * NORM_ROWS}, 0,
                    [&] { rms_norm_fwd_f32(x.data(), w.data(), out.data(), rows, d, eps); });
        emu::launch({blocks}, {32 * NORM_ROWS}, 0, [&] {
            rms_norm_bwd_f32(x.data(), w.data(), g.data(), dx.data(), rows, d, eps);
        });
        emu::launch({blocks}, {32 * NORM_ROWS}, 0, [&] {
            rms_norm_bwd_add_f32(x.data(), w.data(), g.data(), res.data(), dx_res.data(), rows,
                                 d, eps);
        });
        out.insert(out.end(), dx.begin(), dx.end());
        out.insert(out.end(), dx_res.begin(), dx_res.end());
    } else if (kernel == "rms_norm_dw") {
        auto dims = take<int>(in, 3);
        long long rows = dims[0], per = dims[2];
        int d = dims[1];
        float eps = take<float>(in, 1)[0];
        auto x = take<float>(in, (size_t)rows * d), g = take<float>(in, (size_t)rows * d);
        int blocks = (int)((rows + per - 1) / per);
        std::vector<float> partial((size_t)blocks * d);
        out.resize(d);
        emu::launch({(unsigned)blocks}, {256}, 0, [&] {
            rms_norm_dw_part_f32(x.data(), g.data(), partial.data(), rows, d, eps, per);
        });
        emu::launch({(unsigned)((d + 255) / 256)}, {256}, 0,
                    [&] { rms_norm_dw_sum(partial.data(), out.data(), blocks, d); });
    } else if (kernel == "embedding") {
        auto dims = take<int>(in, 3);
        int n = dims[0], d = dims[1], vocab = dims[2];
        auto ids = take<unsigned>(in, n);
        auto grad = take<float>(in, (size_t)n * d);
        std::vector<int> next(n), lead(n);
        out.assign((size_t)vocab * d, 0.f);
        emu::launch({(unsigned)((n + 255) / 256)}, {256}, 0, [&] {
            embedding_chains(ids.data(), n, next.data(), lead.data());
        });
        emu::launch({(unsigned)n}, {256}, 0, [&] {
            embedding_bwd_f32(ids.data(), grad.data(), next.data(), lead.data(), out.data(), d,
                              vocab);
        });
    } else if (kernel == "bf16_concat") {
        auto n = take<long long>(in, 6);
        std::vector<std::vector<float>> seg;
        long long total = 0;
        for (long long k : n) {
            seg.push_back(take<float>(in, k));
            total += k;
        }
        std::vector<bf16_t> all(total);
        emu::launch({(unsigned)((total + 255) / 256)}, {256}, 0, [&] {
            bf16_concat(seg[0].data(), n[0], seg[1].data(), n[1], seg[2].data(), n[2],
                        seg[3].data(), n[3], seg[4].data(), n[4], seg[5].data(), n[5],
                        all.data());
        });
        for (auto v : all) out.push_back(ld(&v, 0));
    } else if (kernel == "add_same") {
        long long n = take<long long>(in, 1)[0];
        auto a = take<float>(in, n), b = take<float>(in, n);
        long long skip = n % 2;
        std::vector<bf16_t> a16(n + 1), b16(n + 1), y(n + 1);
        for (long long i = 0; i < n; ++i) {
            a16[skip + i] = to_bf16(a[i]);
            b16[skip + i] = to_bf16(b[i]);
        }
        emu::launch({(unsigned)(((n + 7) / 8 + 255) / 256)}, {256}, 0, [&] {
            add_same_bf16(a16.data() + skip, b16.data() + skip, y.data() + skip, n);
        });
        for (long long i = 0; i < n; ++i) out.push_back(ld(y.data() + skip, i));
    } else if (kernel == "gated") {
        long long n = take<long long>(in, 1)[0];
        int act = take<int>(in, 1)[0];
        auto params = take<float>(in, 2);
        float alpha = params[0], limit = params[1];
        auto gate = take<float>(in, n), up = take<float>(in, n), grad = take<float>(in, n);
        std::vector<float> y(n), d(2 * n);
        unsigned blocks = (unsigned)(((n + 7) / 8 + 255) / 256);  // 8 elements a thread
        emu::launch({blocks}, {256}, 0, [&] {
            gated_fwd_f32(gate.data(), up.data(), y.data(), n, act, alpha, limit);
        });
        emu::launch({blocks}, {256}, 0, [&] {
            gated_bwd_f32(gate.data(), up.data(), grad.data(), d.data(), n, act, alpha, limit);
        });
        out = y;
        out.insert(out.end(), d.begin(), d.end());
    } else if (kernel == "causal_softmax") {
        auto dims = take<int>(in, 3);
        unsigned rows = dims[0];
        int q = dims[1], k = dims[2];
        float scale = take<float>(in, 1)[0];
        auto x = take<float>(in, (size_t)rows * k), g = take<float>(in, (size_t)rows * k);
        std::vector<float> y(x.size()), dx(x.size());
        emu::launch({rows}, {256}, 0,
                    [&] { causal_softmax_fwd_f32(x.data(), y.data(), q, k, scale); });
        emu::launch({rows}, {256}, 0,
                    [&] { causal_softmax_bwd_f32(y.data(), g.data(), dx.data(), k, scale); });
        out = y;
        out.insert(out.end(), dx.begin(), dx.end());
    } else if (kernel == "low_rank_add") {
        long long rows = take<long long>(in, 1)[0];
        auto dims = take<int>(in, 3);
        int cols = dims[0], r = dims[1];
        bool right_t = dims[2] != 0;
        float scale = take<float>(in, 1)[0];
        Dropout d = take_dropout(in);
        auto base = take<float>(in, rows * cols), left = take<float>(in, rows * r);
        auto right = take<float>(in, (size_t)cols * r);
        long long ro = right_t ? 1 : r, rk = right_t ? cols : 1;
        out.resize(base.size());
        emu::launch({(unsigned)((rows + 63) / 64), (unsigned)((cols + 255) / 256)}, {128}, 0, [&] {
            low_rank_add_f32(base.data(), left.data(), right.data(), out.data(), rows, cols, r, ro,
                             rk, scale, d.on, d.k1, d.k2, d.threshold, d.scale);
        });
    } else if (kernel == "dropout_mask") {
        long long n = take<long long>(in, 1)[0];
        Dropout d = take_dropout(in);
        auto x = take<float>(in, n);
        std::vector<float> dropped(n);
        out.resize(n);
        emu::launch({(unsigned)((n + 255) / 256)}, {256}, 0, [&] {
            dropout_mask_f32(out.data(), n, d.on, d.k1, d.k2, d.threshold, d.scale);
        });
        emu::launch({(unsigned)((n + 255) / 256)}, {256}, 0, [&] {
            dropout_apply_f32(x.data(), dropped.data(), n, d.on, d.k1, d.k2, d.threshold,
                              d.scale);
        });
        out.insert(out.end(), dropped.begin(), dropped.end());
    } else if (kernel == "random_normal") {
        unsigned long long key = take<unsigned long long>(in, 1)[0];
        long long n = take<long long>(in, 1)[0];
        float std = take<float>(in, 1)[0];
        out.resize(n);
        emu::launch({(unsigned)((n + 255) / 256)}, {256}, 0,
                    [&] { random_normal_f32(out.data(), n, key, std); });
    } else if (kernel == "random_uniform") {
        unsigned long long key = take<unsigned long long>(in, 1)[0];
        long long n = take<long long>(in, 1)[0];
        auto range = take<float>(in, 2);
        out.resize(n);
        emu::launch({(unsigned)((n + 255) / 256)}, {256}, 0,
                    [&] { random_uniform_f32(out.data(), n, key, range[0], range[1]); });
    } else if (kernel == "thin_project") {
        long long rows = take<long long>(in, 1)[0];
        auto dims = take<int>(in, 4);
        int n = dims[0], r = dims[1], splits = dims[3];
        bool w_t = dims[2] != 0;
        float scale = take<float>(in, 1)[0];
        Dropout d = take_dropout(in);
        auto x = take<float>(in, rows * n), w = take<float>(in, (size_t)r * n);
        long long w_sk = w_t ? 1 : n, w_sn = w_t ? r : 1;
        // Splits of whole 256-column stages, as thin_project_splits in src/cuda.rs.
        int chunks = (n + 255) / 256, per_split = (chunks + splits - 1) / splits * 256;
        splits = (n + per_split - 1) / per_split;
        std::vector<float> part((size_t)splits * rows * r);
        emu::launch({(unsigned)((rows + 31) / 32), (unsigned)((r + 15) / 16), (unsigned)splits},
                    {256}, 0, [&] {
                        thin_project_f32(x.data(), w.data(), w_sk, w_sn, part.data(), rows, n, r,
                                         splits > 1 ? 1.f : scale, per_split, d.on, d.k1, d.k2,
                                         d.threshold, d.scale);
                    });
        out = part;
        if (splits > 1) {
            out.resize(rows * r);
            long long nr = rows * r;
            emu::launch({(unsigned)((nr + 255) / 256)}, {256}, 0, [&] {
                thin_outer_sum(part.data(), out.data(), splits, nr, r, r, 1, scale);
            });
        }
    } else if (kernel == "thin_outer") {
        long long rows = take<long long>(in, 1)[0];
        auto dims = take<int>(in, 4);
        int n = dims[0], r = dims[1], splits = dims[3];
        bool out_t = dims[2] != 0;
        float scale = take<float>(in, 1)[0];
        Dropout d = take_dropout(in);
        auto x = take<float>(in, rows * n), y = take<float>(in, rows * r);
        long long per_split = (rows + splits - 1) / splits;
        std::vector<float> part((size_t)splits * n * r);
        emu::launch({(unsigned)((n + 127) / 128), (unsigned)((r + 15) / 16), (unsigned)splits},
                    {128}, 0, [&] {
                        thin_outer_f32(x.data(), y.data(), part.data(), rows, n, r, per_split,
                                       d.on, d.k1, d.k2, d.threshold, d.scale);
                    });
        out.resize((size_t)n * r);
        long long nr = (long long)n * r, o_sn = out_t ? 1 : r, o_sk = out_t ? n : 1;
        emu::launch({(unsigned)((nr + 255) / 256)}, {256}, 0, [&] {
            thin_outer_sum(part.data(), out.data(), splits, nr, r, o_sn, o_sk, scale);
        });
    } else {
        fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
        return 2;
    }
    fclose(in);
    FILE* o = open_or_exit(argv[3], "wb");
    fwrite(out.data(), 4, out.size(), o);
    fclose(o);
    return 0;
}
