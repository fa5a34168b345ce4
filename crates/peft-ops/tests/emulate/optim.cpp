// Runs the fused optimizer kernels of src/kernels/optim.cu under the CPU emulation:
//   optim <input> <output>
// input: i32 tensors; f32 lr, beta1, beta2, eps, decay, bc1, bc2, grad_scale; then per tensor
// i64 n and f32 p, g, m, v (n each). output: f64 sum of squared gradients, then per tensor f32
// p, m, v after one step. The launch shape is that of src/cuda.rs (FusedAdamw).
#include "cuda.h"
#include "../../src/kernels/ops.cu"
#include "../../src/kernels/optim.cu"
#include <algorithm>
#include <cstdio>
#include <cstdlib>

template <class T>
static std::vector<T> take(FILE* f, size_t n) {
    std::vector<T> v(n);
    if (fread(v.data(), sizeof(T), n, f) != n) { fprintf(stderr, "short input\n"); exit(1); }
    return v;
}

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: optim <input> <output>\n"); return 2; }
    FILE* in = fopen(argv[1], "rb");
    if (!in) { perror(argv[1]); return 1; }
    int tensors = take<int>(in, 1)[0];
    auto s = take<float>(in, 8);
    std::vector<std::vector<float>> p(tensors), g(tensors), m(tensors), v(tensors);
    std::vector<long long> table;
    long long largest = 0;
    for (int i = 0; i < tensors; ++i) {
        long long n = take<long long>(in, 1)[0];
        p[i] = take<float>(in, n), g[i] = take<float>(in, n);
        m[i] = take<float>(in, n), v[i] = take<float>(in, n);
        for (auto* x : {&p[i], &g[i], &m[i], &v[i]}) table.push_back((long long)x->data());
        table.push_back(n);
        largest = std::max(largest, n);
    }
    fclose(in);
    unsigned chunks = (unsigned)std::clamp((largest + 2047) / 2048, 1LL, 1024LL);
    double sum = 0.0;
    emu::launch({chunks, (unsigned)tensors}, {256}, 0,
                [&] { sum_squares_multi_f32(table.data(), &sum); });
    emu::launch({chunks, (unsigned)tensors}, {256}, 0, [&] {
        adamw_multi_f32(table.data(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    });
    FILE* out = fopen(argv[2], "wb");
    if (!out) { perror(argv[2]); return 1; }
    fwrite(&sum, 8, 1, out);
    for (int i = 0; i < tensors; ++i)
        for (auto* x : {&p[i], &m[i], &v[i]}) fwrite(x->data(), 4, x->size(), out);
    fclose(out);
    return 0;
}
