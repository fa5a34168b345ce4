// Runs the fused optimizer kernels of src/kernels/optim.cu under the CPU emulation:
//   optim <input> <output>
// input: i32 tensors, kind (0: f32, 1: 8-bit moments, 2: bf16); f32 lr, beta1, beta2, eps,
// decay, bc1, bc2; f64 max_norm; f32 signed and unsigned maps (256 each); then per tensor i64 n,
// p, g (n each, f32 or bf16) and the moments: m, v (n each, f32 or bf16), or (8-bit) u8 m codes
// (n), f32 m scales (ceil(n / 256)), and the same for v. output: f64 sum of squared gradients,
// then per tensor p and the moments after one step, in the input's layout. Launch shapes as in
// src/cuda.rs (FusedAdamw).
#include "cuda.h"
#include "../../src/kernels/ops.cu"
#include "../../src/kernels/optim.cu"
#include <algorithm>

struct Tensor {
    std::vector<float> p, g, m, v, m_absmax, v_absmax;
    std::vector<bf16_t> pb, gb, mb, vb;
    std::vector<unsigned char> m_codes, v_codes;
};

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: optim <input> <output>\n"); return 2; }
    FILE* in = open_or_exit(argv[1], "rb");
    auto head = take<int>(in, 2);
    int tensors = head[0], kind = head[1];
    bool eight_bit = kind == 1, half = kind == 2;
    auto s = take<float>(in, 7);
    double max_norm = take<double>(in, 1)[0];
    auto signed_map = take<float>(in, 256), unsigned_map = take<float>(in, 256);
    std::vector<Tensor> ts(tensors);
    std::vector<long long> table;
    long long largest = 0;
    auto push = [&](const void* p) { table.push_back((long long)p); };
    for (auto& t : ts) {
        long long n = take<long long>(in, 1)[0];
        size_t blocks = (n + 255) / 256;
        if (half) {
            t.pb = take<bf16_t>(in, n), t.gb = take<bf16_t>(in, n);
            t.mb = take<bf16_t>(in, n), t.vb = take<bf16_t>(in, n);
            for (auto* x : {&t.pb, &t.gb, &t.mb, &t.vb}) push(x->data());
        } else {
            t.p = take<float>(in, n), t.g = take<float>(in, n);
            push(t.p.data()), push(t.g.data());
            if (eight_bit) {
                t.m_codes = take<unsigned char>(in, n), t.m_absmax = take<float>(in, blocks);
                t.v_codes = take<unsigned char>(in, n), t.v_absmax = take<float>(in, blocks);
                push(t.m_codes.data()), push(t.m_absmax.data());
                push(t.v_codes.data()), push(t.v_absmax.data());
            } else {
                t.m = take<float>(in, n), t.v = take<float>(in, n);
                push(t.m.data()), push(t.v.data());
            }
        }
        table.push_back(n);
        largest = std::max(largest, n);
    }
    fclose(in);
    int stride = eight_bit ? 7 : 5;
    unsigned chunks = (unsigned)std::clamp((largest + 2047) / 2048, 1LL, 1024LL);
    double sum = 0.0;
    emu::launch({chunks, (unsigned)tensors}, {256}, 0, [&] {
        if (half)
            sum_squares_multi_bf16(table.data(), stride, &sum);
        else
            sum_squares_multi_f32(table.data(), stride, &sum);
    });
    emu::launch({chunks, (unsigned)tensors}, {256}, 0, [&] {
        if (eight_bit)
            adamw8bit_multi_f32(table.data(), signed_map.data(), unsigned_map.data(), s[0], s[1],
                                s[2], s[3], s[4], s[5], s[6], &sum, max_norm);
        else if (half)
            adamw_multi_bf16(table.data(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], &sum,
                             max_norm);
        else
            adamw_multi_f32(table.data(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], &sum,
                            max_norm);
    });
    FILE* out = open_or_exit(argv[2], "wb");
    fwrite(&sum, 8, 1, out);
    auto put = [&](const auto& v) { fwrite(v.data(), sizeof(v[0]), v.size(), out); };
    for (auto& t : ts) {
        if (half) {
            put(t.pb), put(t.mb), put(t.vb);
        } else if (eight_bit) {
            put(t.p), put(t.m_codes), put(t.m_absmax), put(t.v_codes), put(t.v_absmax);
        } else {
            put(t.p), put(t.m), put(t.v);
        }
    }
    fclose(out);
    return 0;
}
