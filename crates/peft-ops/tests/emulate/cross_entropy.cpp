// Runs cross_entropy_rows_f32 of src/kernels/ops.cu under the CPU emulation:
//   cross_entropy <input> <output>
// input: i32 rows, vocab; f32 inv_denom; f32 logits (rows x vocab); i64 labels (rows).
// output: f32 row losses, entropies, top-1 hits, then f32 logits gradient. Launch shape as in
// src/cuda.rs.
#include "cuda.h"
#include "../../src/kernels/ops.cu"

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: cross_entropy <input> <output>\n"); return 2; }
    FILE* in = open_or_exit(argv[1], "rb");
    auto dims = take<int>(in, 2);
    int rows = dims[0], vocab = dims[1];
    float inv_denom = take<float>(in, 1)[0];
    auto logits = take<float>(in, (size_t)rows * vocab);
    auto labels = take<long long>(in, rows);
    fclose(in);
    std::vector<float> loss(rows), entropy(rows), top1(rows), grad((size_t)rows * vocab);
    emu::launch({(unsigned)rows}, {256}, 0, [&] {
        cross_entropy_rows_f32(logits.data(), labels.data(), grad.data(), loss.data(),
                               entropy.data(), top1.data(), vocab, inv_denom, 1);
    });
    FILE* out = open_or_exit(argv[2], "wb");
    fwrite(loss.data(), 4, loss.size(), out);
    fwrite(entropy.data(), 4, entropy.size(), out);
    fwrite(top1.data(), 4, top1.size(), out);
    fwrite(grad.data(), 4, grad.size(), out);
    fclose(out);
    return 0;
}
