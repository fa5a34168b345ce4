//! 8-bit blockwise quantization against a 256-entry code (bitsandbytes' `quantize_blockwise`).

use crate::nearest;
use rayon::prelude::*;

/// Block size of 8-bit quantization (optimizer states, double-quantized scales).
pub const BLOCKSIZE_8BIT: usize = 256;

/// Codes (one byte per value) and the f32 absmax of each block.
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8 {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
    pub blocksize: usize,
}

/// Per block: `absmax = max |x|`, then each `x / absmax` becomes the index of the nearest
/// value of `code` (ascending, 256 entries).
pub fn quantize_blockwise(x: &[f32], code: &[f32; 256], blocksize: usize) -> Blockwise8 {
    let mut codes = vec![0u8; x.len()];
    let absmax: Vec<f32> = codes
        .par_chunks_mut(blocksize)
        .zip(x.par_chunks(blocksize))
        .map(|(q, block)| {
            let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (qi, &v) in q.iter_mut().zip(block) {
                let scaled = if absmax > 0.0 { v / absmax } else { 0.0 };
                *qi = nearest(code, scaled) as u8;
            }
            absmax
        })
        .collect();
    Blockwise8 {
        codes,
        absmax,
        blocksize,
    }
}

/// `code[q] · absmax[block]` for every value.
pub fn dequantize_blockwise(q: &Blockwise8, code: &[f32; 256]) -> Vec<f32> {
    let mut out = vec![0f32; q.codes.len()];
    out.par_chunks_mut(q.blocksize)
        .zip(q.codes.par_chunks(q.blocksize))
        .zip(q.absmax.par_iter())
        .for_each(|((o, c), &a)| {
            for (oi, &ci) in o.iter_mut().zip(c) {
                *oi = code[ci as usize] * a;
            }
        });
    out
}
