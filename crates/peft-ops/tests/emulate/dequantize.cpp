// Runs dequantize_4bit_f32 of src/kernels/ops.cu under the CPU emulation:
//   dequantize <input> <output>
// input: i64 len; i32 blocksize, blocksize2, double_quant; f32 offset; f32 code4[16],
// code2[256]; u8 packed[(len + 1) / 2]; then f32 absmax[blocks] (plain) or u8 qabsmax[blocks]
// and f32 absmax2[ceil(blocks / blocksize2)] (double). output: f32 values[len].
#include "cuda.h"
#include "../../src/kernels/ops.cu"

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: dequantize <input> <output>\n"); return 2; }
    FILE* in = open_or_exit(argv[1], "rb");
    long long len = take<long long>(in, 1)[0];
    auto ints = take<int>(in, 3);
    int blocksize = ints[0], blocksize2 = ints[1], double_quant = ints[2];
    float offset = take<float>(in, 1)[0];
    auto code4 = take<float>(in, 16), code2 = take<float>(in, 256);
    auto packed = take<unsigned char>(in, (len + 1) / 2);
    size_t blocks = (len + blocksize - 1) / blocksize;
    std::vector<float> absmax(1), absmax2(1);
    std::vector<unsigned char> qabsmax(1);
    if (double_quant) {
        qabsmax = take<unsigned char>(in, blocks);
        absmax2 = take<float>(in, (blocks + blocksize2 - 1) / blocksize2);
    } else {
        absmax = take<float>(in, blocks);
    }
    fclose(in);
    std::vector<float> out(len);
    long long bytes = (len + 1) / 2;
    emu::launch({(unsigned)((bytes + 255) / 256)}, {256}, 0, [&] {
        dequantize_4bit_f32(packed.data(), code4.data(), absmax.data(), qabsmax.data(),
                            absmax2.data(), code2.data(), offset, out.data(), len, blocksize,
                            blocksize2, double_quant);
    });
    FILE* o = open_or_exit(argv[2], "wb");
    fwrite(out.data(), 4, out.size(), o);
    fclose(o);
    return 0;
}
