//! MXFP4 (OCP microscaling FP4) dequantization, as transformers' `convert_moe_packed_tensors`
//! does it for gpt-oss checkpoints (`*_blocks` / `*_scales`): blocks of 32 e2m1 values, packed
//! two a byte (the first value in the low nibble), sharing one e8m0 scale byte `2^(s - 127)`.
//!
//! Every value is computed exactly (`code · 2^(s-127)`, 2 significant bits) and only rounds
//! where it overflows, to ±inf, so the f32 values equal transformers' bf16 (and f32) output bit
//! for bit, scale byte 255 included (no NaN: `0 · 2^128` is 0, as `torch.ldexp` gives it).

use half::bf16;
use rayon::prelude::*;
use std::fmt;

/// Bytes of packed codes per block.
pub const MXFP4_BLOCK_BYTES: usize = 16;
/// Values per block (and per scale).
pub const MXFP4_BLOCK_VALUES: usize = 32;

/// The e2m1 values by 4-bit code (transformers' `FP4_VALUES`): bit 3 is the sign, so codes
/// 8..16 are the negatives of 0..8 (code 8 is -0).
pub const FP4_E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Blocks and scales that do not pair up: `blocks.len()` must be 16 · `scales.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4LenError {
    pub blocks: usize,
    pub scales: usize,
}

impl fmt::Display for Mxfp4LenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MXFP4: {} block bytes for {} scales (expected {} = {MXFP4_BLOCK_BYTES} per scale)",
            self.blocks,
            self.scales,
            self.scales.saturating_mul(MXFP4_BLOCK_BYTES)
        )
    }
}

impl std::error::Error for Mxfp4LenError {}

/// The 16 values of a block with scale byte `s`: each `FP4_E2M1[c] · 2^(s-127)`, exact in
/// f64 (2^-127..2^128), then rounded once to f32, which only overflows.
fn scaled_table(s: u8) -> [f32; 16] {
    let scale = f64::from_bits((u64::from(s) + 1023 - 127) << 52);
    FP4_E2M1.map(|v| (f64::from(v) * scale) as f32)
}

/// Rows below this many are decoded on the calling thread.
const PAR_MIN_ROWS: usize = 1024;

fn dequantize_with<T: Copy + Default + Send>(
    blocks: &[u8],
    scales: &[u8],
    cast: impl Fn(f32) -> T + Sync,
) -> Result<Vec<T>, Mxfp4LenError> {
    if scales.len().checked_mul(MXFP4_BLOCK_BYTES) != Some(blocks.len()) {
        return Err(Mxfp4LenError {
            blocks: blocks.len(),
            scales: scales.len(),
        });
    }
    let mut out = vec![T::default(); scales.len() * MXFP4_BLOCK_VALUES];
    let row = |((out, block), &s): ((&mut [T], &[u8]), &u8)| {
        let table = scaled_table(s).map(&cast);
        for (pair, &b) in out.chunks_exact_mut(2).zip(block) {
            pair[0] = table[usize::from(b & 0x0f)];
            pair[1] = table[usize::from(b >> 4)];
        }
    };
    if scales.len() < PAR_MIN_ROWS {
        out.chunks_exact_mut(MXFP4_BLOCK_VALUES)
            .zip(blocks.chunks_exact(MXFP4_BLOCK_BYTES))
            .zip(scales)
            .for_each(row);
    } else {
        out.par_chunks_exact_mut(MXFP4_BLOCK_VALUES)
            .zip(blocks.par_chunks_exact(MXFP4_BLOCK_BYTES))
            .zip(scales.par_iter())
            .with_min_len(PAR_MIN_ROWS)
            .for_each(row);
    }
    Ok(out)
}

/// Dequantizes MXFP4 `blocks` (16 bytes a block) with their `scales` (one e8m0 byte a block)
/// to `32 · scales.len()` f32 values, block after block, in the order of the bytes: a
/// `[..., G, 16]` / `[..., G]` pair gives `[..., G * 32]` (transformers then transposes the
/// last two dimensions of the gpt-oss experts' weights; that is the caller's to do).
pub fn dequantize_mxfp4(blocks: &[u8], scales: &[u8]) -> Result<Vec<f32>, Mxfp4LenError> {
    dequantize_with(blocks, scales, |v| v)
}

/// [`dequantize_mxfp4`] in bf16, the dtype transformers dequantizes gpt-oss to (every value
/// is a bf16 value already, so this equals the f32 result converted).
pub fn dequantize_mxfp4_bf16(blocks: &[u8], scales: &[u8]) -> Result<Vec<bf16>, Mxfp4LenError> {
    dequantize_with(blocks, scales, bf16::from_f32)
}

/// Bytes of one block of llama.cpp's MXFP4 type (`block_mxfp4`): its scale byte, then 16
/// bytes of codes.
pub const GGML_MXFP4_BLOCK_BYTES: usize = 1 + MXFP4_BLOCK_BYTES;

/// llama.cpp's MXFP4 tensor data (GGUF type 39, gpt-oss's experts) as f32: blocks of a scale
/// byte and 16 code bytes whose low nibbles are the block's first 16 values and high nibbles
/// its last 16 (its converter reorders transformers' pairs so), each value
/// `e2m1 · 2^(s - 127)` as in [`dequantize_mxfp4`] (ggml's zero has no sign). `None` when the
/// data is not whole blocks.
pub fn dequantize_ggml_mxfp4(data: &[u8]) -> Option<Vec<f32>> {
    if !data.len().is_multiple_of(GGML_MXFP4_BLOCK_BYTES) {
        return None;
    }
    let blocks = data.len() / GGML_MXFP4_BLOCK_BYTES;
    let mut out = vec![0f32; blocks * MXFP4_BLOCK_VALUES];
    out.par_chunks_exact_mut(MXFP4_BLOCK_VALUES)
        .zip(data.par_chunks_exact(GGML_MXFP4_BLOCK_BYTES))
        .for_each(|(out, block)| {
            // + 0.0: ggml's table holds an unsigned 0 where e2m1 has -0.
            let table = scaled_table(block[0]).map(|v| v + 0.0);
            let (low, high) = out.split_at_mut(MXFP4_BLOCK_BYTES);
            for ((l, h), &b) in low.iter_mut().zip(high).zip(&block[1..]) {
                *l = table[usize::from(b & 0x0f)];
                *h = table[usize::from(b >> 4)];
            }
        });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_nibble_first_and_scale_bias() {
        let mut blocks = [0u8; 16];
        blocks[0] = 0x72; // low 2 (1.0), high 7 (6.0)
        blocks[15] = 0xf9; // low 9 (-0.5), high 15 (-6.0)
        let v = dequantize_mxfp4(&blocks, &[128]).unwrap();
        assert_eq!(v.len(), 32);
        assert_eq!(&v[..2], &[2.0, 12.0]);
        assert_eq!(&v[30..], &[-1.0, -12.0]);
    }

    #[test]
    fn extreme_scales() {
        let blocks: Vec<u8> = (0..16).map(|i| (i as u8) | 0x80).collect();
        let lo = dequantize_mxfp4(&blocks, &[0]).unwrap();
        assert_eq!(lo[2], f32::from_bits(1 << 21)); // 0.5 · 2^-127 = 2^-128, subnormal
        let hi = dequantize_mxfp4(&blocks, &[255]).unwrap();
        assert_eq!(hi[0], 0.0);
        assert_eq!(hi[2], f32::from_bits(254 << 23)); // 0.5 · 2^128 = 2^127
        assert_eq!(hi[4], f32::INFINITY);
        assert_eq!(hi[1], -0.0);
        assert!(hi[1].is_sign_negative());
        assert!(hi.iter().all(|v| !v.is_nan()));
    }

    #[test]
    fn bf16_matches_f32() {
        let blocks: Vec<u8> = (0..=255).cycle().take(16 * 256).collect();
        let scales: Vec<u8> = (0..=255).collect();
        let f = dequantize_mxfp4(&blocks, &scales).unwrap();
        let b = dequantize_mxfp4_bf16(&blocks, &scales).unwrap();
        assert!(f
            .iter()
            .zip(&b)
            .all(|(x, y)| x.to_bits() == y.to_f32().to_bits()));
    }

    /// llama.cpp's block: the scale byte first, low nibbles the first 16 values, high nibbles
    /// the last 16, zero unsigned.
    #[test]
    fn ggml_blocks_put_low_nibbles_first() {
        let mut block = vec![128u8]; // 2^1
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = dequantize_ggml_mxfp4(&block).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], FP4_E2M1[j] * 2.0 + 0.0, "{j}");
            assert_eq!(out[16 + j], FP4_E2M1[15 - j] * 2.0 + 0.0, "{}", 16 + j);
        }
        assert!(out[8].is_sign_positive());
        assert!(dequantize_ggml_mxfp4(&block[1..]).is_none());
    }
}
