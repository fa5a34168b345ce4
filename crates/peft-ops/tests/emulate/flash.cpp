// Runs the flash attention kernels of src/kernels/attention.cu under the CPU emulation:
//   flash <input> <output>
// input: i32 b, t, heads, kv_heads, d, packed, sinks, window; f32 scale; with sinks f32
// sinks [heads]; bf16 q, k, v, dout; then, for
// plain rows, f32 cos, sin [t, d / 2], or, for packed rows, u32 segment ids [b, t] and f32
// cos, sin [b, t, d / 2].
// output (f32): o, lse, dq, dk, dv. The launch shapes are those of src/cuda.rs. With d = 64
// the wide forward runs too and must give the same bits.
#include "cuda.h"
#include <string>
#include <tuple>
#include "../../src/kernels/ops.cu"
#include "../../src/kernels/attention.cu"

static void put(FILE* f, const std::vector<float>& v) { fwrite(v.data(), 4, v.size(), f); }

static std::vector<float> widen(const std::vector<bf16_t>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = __uint_as_float((unsigned)v[i] << 16);
    return out;
}

int main(int argc, char** argv) {
    // `wide-bwd` first: the backward over 128 keys a block (flash_bwd_wide_d*).
    bool wide_bwd = argc == 4 && std::string(argv[1]) == "wide-bwd";
    if (wide_bwd) ++argv, --argc;
    if (argc != 3) { fprintf(stderr, "usage: flash [wide-bwd] <input> <output>\n"); return 2; }
    FILE* in = open_or_exit(argv[1], "rb");
    auto dims = take<int>(in, 8);
    int b = dims[0], t = dims[1], heads = dims[2], kvh = dims[3], d = dims[4], window = dims[7];
    bool packed = dims[5] != 0, has_sinks = dims[6] != 0;
    float scale = take<float>(in, 1)[0];
    std::vector<float> sink_logits = has_sinks ? take<float>(in, heads) : std::vector<float>();
    const float* sinks = has_sinks ? sink_logits.data() : nullptr;
    size_t nq = (size_t)b * t * heads * d, nk = (size_t)b * t * kvh * d;
    auto q = take<bf16_t>(in, nq), k = take<bf16_t>(in, nk), v = take<bf16_t>(in, nk);
    auto dout = take<bf16_t>(in, nq);
    std::vector<unsigned> seg_ids = packed ? take<unsigned>(in, (size_t)b * t) : std::vector<unsigned>();
    const unsigned* seg = packed ? seg_ids.data() : nullptr;
    long long rope_bstride = packed ? (long long)t * d / 2 : 0;
    size_t nr = (size_t)(packed ? b : 1) * t * d / 2;
    auto cos = take<float>(in, nr), sin = take<float>(in, nr);
    fclose(in);

    unsigned tiles = (t + FA_TILE - 1) / FA_TILE;
    size_t pitch = d + 8;
    std::vector<bf16_t> o(nq), dq(nq), dk(nk), dv(nk);
    std::vector<float> lse((size_t)b * heads * t), delta(lse.size()), dq_acc(nq, 0.f);
    // q and k rotated once, as src/cuda.rs does.
    std::vector<bf16_t> qr(nq), kr(nk);
    for (auto [x, r, h] : {std::tuple{&q, &qr, heads}, std::tuple{&k, &kr, kvh}}) {
        long long chunks = (long long)x->size() / 16;
        emu::launch({(unsigned)((chunks + 255) / 256)}, {256}, 0, [&] {
            rope_rotate_bf16(x->data(), cos.data(), sin.data(), rope_bstride, r->data(), t, h, d,
                             chunks);
        });
    }
    // Sinks or a window take the `_ext` kernels; plain rows the others.
    bool ext = has_sinks || window > 0;
    auto fwd_ext = d == 64 ? flash_fwd_ext_d64 : flash_fwd_ext_d128;
    auto bwd_ext = wide_bwd ? (d == 64 ? flash_bwd_wide_ext_d64 : flash_bwd_wide_ext_d128)
                            : (d == 64 ? flash_bwd_ext_d64 : flash_bwd_ext_d128);
    auto fwd_plain = d == 64 ? flash_fwd_d64 : flash_fwd_d128;
    auto bwd_plain = wide_bwd ? (d == 64 ? flash_bwd_wide_d64 : flash_bwd_wide_d128)
                              : (d == 64 ? flash_bwd_d64 : flash_bwd_d128);
    unsigned keys = wide_bwd ? 2 * FA_TILE : FA_TILE, kb = keys / FA_TILE;
    size_t fwd_shared = (FA_Q_IN_REGS(d) ? 2 : 3) * FA_TILE * pitch * 2 + FA_TILE * 4;
    emu::launch({tiles, (unsigned)heads, (unsigned)b}, {FA_THREADS}, fwd_shared, [&] {
        if (ext)
            fwd_ext(qr.data(), kr.data(), v.data(), seg, o.data(), lse.data(), t, heads, kvh,
                    scale, sinks, window);
        else
            fwd_plain(qr.data(), kr.data(), v.data(), seg, o.data(), lse.data(), t, heads, kvh,
                      scale);
    });
    if (d == 64) {
        // The 128-row forward (PEFT_CUDA_FLASH=wide) visits the same key tiles in the same
        // order for each row (and masked ones, which change nothing): the same bits.
        std::vector<bf16_t> o_wide(nq);
        std::vector<float> lse_wide(lse.size());
        emu::launch({(unsigned)((t + 2 * FA_TILE - 1) / (2 * FA_TILE)), (unsigned)heads, (unsigned)b},
                    {FA_THREADS}, fwd_shared, [&] {
            if (ext)
                flash_fwd_wide_ext_d64(qr.data(), kr.data(), v.data(), seg, o_wide.data(),
                                       lse_wide.data(), t, heads, kvh, scale, sinks, window);
            else
                flash_fwd_wide_d64(qr.data(), kr.data(), v.data(), seg, o_wide.data(),
                                   lse_wide.data(), t, heads, kvh, scale);
        });
        if (o_wide != o || memcmp(lse_wide.data(), lse.data(), lse.size() * 4) != 0) {
            fprintf(stderr, "flash_fwd_wide_d64 differs from flash_fwd_d64\n");
            return 1;
        }
    }
    long long rows = (long long)b * t * heads;
    emu::launch({(unsigned)((rows + 3) / 4)}, {FA_THREADS}, 0, [&] {
        flash_bwd_delta_bf16(o.data(), dout.data(), delta.data(), t, heads, d, rows);
    });
    size_t shared = (2 * kb + 4) * FA_TILE * pitch * 2 + FA_TILE * (keys + 8) * 2 +
                    (5 * FA_TILE + keys) * 4;
    std::vector<float> dk_part(nq, NAN), dv_part(nq, NAN);
    emu::launch({(t + keys - 1) / keys, (unsigned)heads, (unsigned)b}, {kb * FA_THREADS}, shared, [&] {
        if (ext)
            bwd_ext(qr.data(), kr.data(), v.data(), seg, dout.data(), lse.data(), delta.data(),
                    dq_acc.data(), dk_part.data(), dv_part.data(), t, heads, kvh, scale, window);
        else
            bwd_plain(qr.data(), kr.data(), v.data(), seg, dout.data(), lse.data(), delta.data(),
                      dq_acc.data(), dk_part.data(), dv_part.data(), t, heads, kvh, scale);
    });
    long long kv_pairs = (long long)nk / 2;
    emu::launch({(unsigned)((kv_pairs + 255) / 256)}, {256}, 0, [&] {
        flash_bwd_dkv_bf16(dk_part.data(), dv_part.data(), cos.data(), sin.data(), rope_bstride,
                           dk.data(), dv.data(), t, heads, kvh, d, scale, kv_pairs);
    });
    long long pairs = (long long)nq / 2;
    emu::launch({(unsigned)((pairs + 255) / 256)}, {256}, 0, [&] {
        flash_bwd_dq_bf16(dq_acc.data(), cos.data(), sin.data(), rope_bstride, dq.data(), t, heads,
                          d, scale, pairs);
    });

    FILE* out = open_or_exit(argv[2], "wb");
    put(out, widen(o));
    put(out, lse);
    put(out, widen(dq));
    put(out, widen(dk));
    put(out, widen(dv));
    fclose(out);
    return 0;
}
