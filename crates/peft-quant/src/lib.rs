//! bitsandbytes-compatible quantization: NF4/FP4 blockwise 4-bit weights with optional double
//! quantization of their scales, and 8-bit blockwise "dynamic" quantization (the format of
//! 8-bit optimizer states). Same codes, same packing, same rounding as bitsandbytes, so a model
//! quantized here and by bitsandbytes is the same model. Also llama.cpp's k-quant blocks for
//! GGUF files (`kquants`), and the MXFP4 blocks of gpt-oss checkpoints, dequantized as
//! transformers does (`mxfp4`).

mod blockwise8;
mod codes;
mod fourbit;
pub mod kquants;
pub mod mxfp4;

pub use blockwise8::{dequantize_blockwise, quantize_blockwise, Blockwise8, BLOCKSIZE_8BIT};
pub use codes::{dynamic_map, fp4_code, NF4};
pub use fourbit::{quantize_4bit, Absmax, FourBit, Quant4, BLOCKSIZE_4BIT};
pub use mxfp4::{dequantize_mxfp4, dequantize_mxfp4_bf16, Mxfp4LenError};

/// Index of the value of the ascending `table` nearest to `x`; on a tie the lower index, as
/// `argmin(|x - table|)` picks it.
pub(crate) fn nearest(table: &[f32], x: f32) -> usize {
    let p = table.partition_point(|&c| c < x);
    if p == 0 {
        return 0;
    }
    if p == table.len() {
        return table.len() - 1;
    }
    if (x - table[p - 1]).abs() <= (table[p] - x).abs() {
        p - 1
    } else {
        p
    }
}
