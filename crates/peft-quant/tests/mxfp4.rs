//! MXFP4 dequantization against transformers 5.24's `convert_moe_packed_tensors`
//! (`tests/fixtures/mxfp4.safetensors`, made by `scripts/hf/make_mxfp4_fixture.py`).
//!
//! The contract: bit-identical to transformers' bf16 output (and to its f32 output), -0,
//! subnormals and overflow to ±inf included. transformers returns `[E, G*32, R]` for blocks
//! `[E, R, G, 16]` (it swaps dims 1 and 2); we give `[E, R, G*32]`, so the test swaps them.

use half::bf16;
use peft_quant::mxfp4::{dequantize_mxfp4, dequantize_mxfp4_bf16, Mxfp4LenError};
use safetensors::{Dtype, SafeTensors};

struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn load() -> std::collections::HashMap<String, Tensor> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mxfp4.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let t = Tensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (k, t)
        })
        .collect()
}

/// Bits of transformers' output as f32 bits (bf16 widened exactly).
fn want_bits(t: &Tensor) -> Vec<u32> {
    match t.dtype {
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32().to_bits())
            .collect(),
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// `[E, R, C]` -> `[E, C, R]`, as transformers' `out.transpose(1, 2)`.
fn swap_last_two(x: &[u32], e: usize, r: usize, c: usize) -> Vec<u32> {
    let mut out = vec![0; x.len()];
    for ei in 0..e {
        for ri in 0..r {
            for ci in 0..c {
                out[(ei * c + ci) * r + ri] = x[(ei * r + ri) * c + ci];
            }
        }
    }
    out
}

fn check(set: &str, outputs: &[&str]) {
    let f = load();
    let blocks = &f[&format!("{set}_blocks")];
    let scales = &f[&format!("{set}_scales")];
    let (e, r, g) = (blocks.shape[0], blocks.shape[1], blocks.shape[2]);
    assert_eq!(blocks.shape, [e, r, g, 16]);
    assert_eq!(scales.shape, [e, r, g]);

    let ours = dequantize_mxfp4(&blocks.data, &scales.data).unwrap();
    let ours_bits: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
    let ours_bf16: Vec<u32> = dequantize_mxfp4_bf16(&blocks.data, &scales.data)
        .unwrap()
        .iter()
        .map(|v| v.to_f32().to_bits())
        .collect();
    assert_eq!(ours_bits, ours_bf16, "{set}: bf16 and f32 disagree");
    let got = swap_last_two(&ours_bits, e, r, g * 32);

    for name in outputs {
        let want = &f[&format!("{set}_{name}")];
        assert_eq!(want.shape, [e, g * 32, r], "{set}_{name}: shape");
        let want = want_bits(want);
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a,
                b,
                "{set}_{name}[{i}]: ours {} ({a:#010x}), transformers {} ({b:#010x})",
                f32::from_bits(*a),
                f32::from_bits(*b)
            );
        }
    }
}

#[test]
fn random_blocks_match_transformers_bitwise() {
    check("random", &["bf16"]);
}

#[test]
fn edge_scales_match_transformers_bitwise() {
    check("edge", &["bf16", "f32"]);
}

#[test]
fn wrong_lengths_are_errors() {
    assert_eq!(
        dequantize_mxfp4(&[0; 31], &[127; 2]),
        Err(Mxfp4LenError {
            blocks: 31,
            scales: 2
        })
    );
    assert!(dequantize_mxfp4(&[0; 16], &[]).is_err());
    assert!(dequantize_mxfp4_bf16(&[0; 48], &[127; 2]).is_err());
    let err = dequantize_mxfp4(&[0; 15], &[127]).unwrap_err();
    assert!(err.to_string().contains("expected 16"), "{err}");
    assert_eq!(dequantize_mxfp4(&[], &[]), Ok(vec![]));
}

#[test]
fn large_input_takes_the_parallel_path_alike() {
    let scales: Vec<u8> = (0..5000u32).map(|i| (100 + i % 41) as u8).collect();
    let blocks: Vec<u8> = (0..16 * 5000u32).map(|i| (i * 37 % 256) as u8).collect();
    let all = dequantize_mxfp4(&blocks, &scales).unwrap();
    for (k, (b, &s)) in blocks.chunks(16).zip(&scales).enumerate().step_by(997) {
        let one = dequantize_mxfp4(b, &[s]).unwrap();
        assert_eq!(&all[k * 32..(k + 1) * 32], &one[..]);
    }
}
