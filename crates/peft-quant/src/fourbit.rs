//! NF4/FP4 blockwise 4-bit quantization (bitsandbytes' `quantize_4bit`/`dequantize_4bit`).

use crate::blockwise8::{dequantize_blockwise, quantize_blockwise, Blockwise8, BLOCKSIZE_8BIT};
use crate::codes::{dynamic_map, fp4_code, NF4};
use rayon::prelude::*;

/// Values per 4-bit block (bitsandbytes' default).
pub const BLOCKSIZE_4BIT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    Nf4,
    Fp4,
}

/// FP4 magnitudes in ascending order and the code index of each.
const FP4_MAGNITUDES: [f32; 8] = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0];
const FP4_INDEX: [u8; 8] = [0, 1, 6, 7, 4, 5, 2, 3];

impl FourBit {
    pub fn name(self) -> &'static str {
        match self {
            FourBit::Nf4 => "nf4",
            FourBit::Fp4 => "fp4",
        }
    }

    /// The 16 values the codes stand for (scaled to [-1, 1]).
    pub fn code(self) -> [f32; 16] {
        match self {
            FourBit::Nf4 => NF4,
            FourBit::Fp4 => fp4_code(),
        }
    }

    /// Code of a value already scaled by its block's absmax.
    fn index(self, scaled: f32) -> u8 {
        match self {
            FourBit::Nf4 => below_or_above(&NF4, scaled) as u8,
            FourBit::Fp4 => {
                // Nearest magnitude, then the sign bit (as bitsandbytes' CUDA kernel does,
                // so that small negative values keep their sign as -0).
                let mags = FP4_MAGNITUDES.map(|m| m / 12.0);
                let idx = FP4_INDEX[below_or_above(&mags, scaled.abs())];
                if scaled < 0.0 {
                    idx | 8
                } else {
                    idx
                }
            }
        }
    }
}

/// Index of the code of the ascending `table` for `x`: the upper of its two neighbours where
/// `x` lies above their midpoint, else the lower, a tie included. bitsandbytes' CUDA kernels
/// compare with those midpoints (as f32 constants, equal to the f32 midpoints computed
/// here) and its CPU code bucketizes by them; the nearest code by distance would differ
/// where rounding makes the two distances of a value on a midpoint unequal.
fn below_or_above(table: &[f32], x: f32) -> usize {
    let p = table.partition_point(|&c| c < x);
    if p == 0 {
        return 0;
    }
    if p == table.len() {
        return table.len() - 1;
    }
    match x > (table[p - 1] + table[p]) / 2.0 {
        true => p,
        false => p - 1,
    }
}

/// The per-block scales: plain f32, or themselves quantized (double quantization).
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// `absmax - offset` in 8-bit blocks of 256 with the signed dynamic map.
    Double {
        q: Blockwise8,
        offset: f32,
    },
}

impl Absmax {
    /// The f32 scale of every block.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double { q, offset } => dequantize_blockwise(q, &dynamic_map(true))
                .into_iter()
                .map(|v| v + offset)
                .collect(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Double { q, .. } => q.codes.len() + 4 * q.absmax.len() + 4,
        }
    }
}

/// A 4-bit quantized tensor: two codes a byte (first value in the high nibble), `len` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant4 {
    pub kind: FourBit,
    pub blocksize: usize,
    pub len: usize,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// Quantizes `x` in blocks of `blocksize` (even): `absmax = max |x|` per block, each value to
/// the nearest code of `x / absmax` (a value on a midpoint between two codes takes the lower). With `double_quant`, the absmax values are quantized too:
/// their mean is subtracted and the rest stored as 8-bit codes in blocks of 256.
pub fn quantize_4bit(x: &[f32], kind: FourBit, blocksize: usize, double_quant: bool) -> Quant4 {
    assert!(
        blocksize >= 2 && blocksize.is_multiple_of(2),
        "4-bit block size must be even"
    );
    let mut packed = vec![0u8; x.len().div_ceil(2)];
    let absmax: Vec<f32> = packed
        .par_chunks_mut(blocksize / 2)
        .zip(x.par_chunks(blocksize))
        .map(|(bytes, block)| {
            let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Scaled by the reciprocal, as bitsandbytes does (a division can round otherwise).
            let inverse = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
            let code = |v: f32| kind.index(v * inverse);
            for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
                let hi = code(pair[0]);
                let lo = pair.get(1).map_or(0, |&v| code(v));
                *byte = (hi << 4) | lo;
            }
            absmax
        })
        .collect();
    let absmax = if double_quant {
        // The mean in f64, rounded once: bitsandbytes' own CPU and CUDA results differ in the
        // last bit here (summation order); this is the correctly rounded value.
        let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
        Absmax::Double {
            q: quantize_blockwise(&centred, &dynamic_map(true), BLOCKSIZE_8BIT),
            offset,
        }
    } else {
        Absmax::Plain(absmax)
    };
    Quant4 {
        kind,
        blocksize,
        len: x.len(),
        packed,
        absmax,
    }
}

impl Quant4 {
    /// The f32 values: `code[nibble] · absmax[block]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        self.dequantize_into(&mut out);
        out
    }

    /// [`Quant4::dequantize`] into a caller's buffer of `len` values.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len, "dequantize_into: wrong buffer length");
        let code = self.kind.code();
        let absmax = self.absmax.values();
        out.par_chunks_mut(self.blocksize)
            .zip(self.packed.par_chunks(self.blocksize / 2))
            .zip(absmax.par_iter())
            .for_each(|((o, bytes), &a)| {
                for (pair, &b) in o.chunks_mut(2).zip(bytes) {
                    pair[0] = code[(b >> 4) as usize] * a;
                    if let Some(v) = pair.get_mut(1) {
                        *v = code[(b & 15) as usize] * a;
                    }
                }
            });
    }

    /// Bytes held: packed codes plus scales.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }
}
