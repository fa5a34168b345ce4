//! Our quantizer against bitsandbytes 0.50.2 (`../shared/golden/bnb`, made on CPU and on an H200).
//!
//! The contract (the fixtures' README): NF4 without double quantization byte-identical to both
//! files; everything else identical to at least one file except at exact rounding ties, with no
//! more differing codes than the two files have between themselves; dequantized values within
//! 1e-6 relative of the file matched. Which file we match, and why:
//! - FP4 and 8-bit codes: the CUDA file. bitsandbytes' CPU path writes the zero bucket of FP4
//!   with the opposite sign bit and breaks 8-bit ties the other way; its CUDA kernels (what
//!   bnb-4bit checkpoints on the Hub were quantized with) use nearest value + sign bit.
//! - The double-quantization offset (mean of the absmax values): correctly rounded, which equals
//!   one file or the other (their summation orders differ in the last bit).

use peft_quant::*;
use safetensors::SafeTensors;
use std::collections::HashMap;

const INPUTS: [&str; 3] = ["w_256x512", "w_576x192", "w_odd_1000"];

struct Fixture(HashMap<String, Vec<u8>>);

impl Fixture {
    fn load(device: &str) -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../../../shared/golden/bnb/bnb_quant_fixtures_{device}.safetensors"
        ));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        Self(
            st.tensors()
                .into_iter()
                .map(|(k, v)| (k, v.data().to_vec()))
                .collect(),
        )
    }

    fn u8(&self, key: &str) -> &[u8] {
        &self.0[key]
    }

    fn f32(&self, key: &str) -> Vec<f32> {
        self.0[key]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

fn differing(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1e-30),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn absmax_plain(q: &Quant4) -> &[f32] {
    match &q.absmax {
        Absmax::Plain(v) => v,
        Absmax::Double { .. } => panic!("expected plain absmax"),
    }
}

#[test]
fn code_tables_match() {
    let cpu = Fixture::load("cpu");
    assert_eq!(dynamic_map(true).to_vec(), cpu.f32("w_256x512.q8.code"));
    assert_eq!(
        dynamic_map(true).to_vec(),
        cpu.f32("w_256x512.nf4.dq.state2_code")
    );
    let unsigned = dynamic_map(false);
    assert!(
        unsigned.windows(2).all(|w| w[0] <= w[1]) && unsigned[0] == 0.0 && unsigned[255] == 1.0
    );
}

#[test]
fn nf4_is_byte_identical_to_both_files() {
    let (cpu, cuda) = (Fixture::load("cpu"), Fixture::load("cuda"));
    for name in INPUTS {
        let x = cpu.f32(name);
        let q = quantize_4bit(&x, FourBit::Nf4, 64, false);
        for (file, f) in [("cpu", &cpu), ("cuda", &cuda)] {
            assert_eq!(
                q.packed,
                f.u8(&format!("{name}.nf4.packed")),
                "{name} {file}"
            );
            assert_eq!(
                absmax_plain(&q),
                f.f32(&format!("{name}.nf4.absmax")),
                "{name} {file}"
            );
        }
        assert_close(
            name,
            &q.dequantize(),
            &cpu.f32(&format!("{name}.nf4.dequant")),
        );
    }
}

#[test]
fn fp4_is_byte_identical_to_the_cuda_file() {
    let (cpu, cuda) = (Fixture::load("cpu"), Fixture::load("cuda"));
    for name in INPUTS {
        let x = cpu.f32(name);
        let q = quantize_4bit(&x, FourBit::Fp4, 64, false);
        let key = format!("{name}.fp4.packed");
        assert_eq!(q.packed, cuda.u8(&key), "{name}");
        // The CPU file differs from ours exactly where it differs from the CUDA file.
        assert_eq!(
            differing(&q.packed, cpu.u8(&key)),
            differing(cuda.u8(&key), cpu.u8(&key))
        );
        assert_eq!(absmax_plain(&q), cuda.f32(&format!("{name}.fp4.absmax")));
        assert_close(
            name,
            &q.dequantize(),
            &cuda.f32(&format!("{name}.fp4.dequant")),
        );
    }
}

#[test]
fn double_quantization_matches_within_the_files_own_spread() {
    let (cpu, cuda) = (Fixture::load("cpu"), Fixture::load("cuda"));
    for name in INPUTS {
        let x = cpu.f32(name);
        for kind in [FourBit::Nf4, FourBit::Fp4] {
            let k = format!("{name}.{}.dq", kind.name());
            let q = quantize_4bit(&x, kind, 64, true);
            let Absmax::Double { q: qa, offset } = &q.absmax else {
                panic!("expected double quantization")
            };
            // The 4-bit codes use the exact absmax: the same bytes as without double quant.
            assert_eq!(q.packed, cuda.u8(&format!("{k}.packed")), "{k}");
            let file = [&cpu, &cuda]
                .into_iter()
                .find(|f| f.f32(&format!("{k}.offset"))[0] == *offset)
                .unwrap_or_else(|| panic!("{k}: offset {offset} matches neither file"));
            assert_eq!(qa.absmax, file.f32(&format!("{k}.state2_absmax")), "{k}");
            let ours = differing(&qa.codes, file.u8(&format!("{k}.absmax_q")));
            let between = differing(
                cpu.u8(&format!("{k}.absmax_q")),
                cuda.u8(&format!("{k}.absmax_q")),
            );
            assert!(
                ours <= between,
                "{k}: {ours} absmax codes differ, the files differ in {between}"
            );
            // Dequantized values agree wherever the block's absmax code agrees.
            let want = file.f32(&format!("{k}.dequant"));
            let got = q.dequantize();
            let codes = file.u8(&format!("{k}.absmax_q"));
            for (b, (ours, theirs)) in qa.codes.iter().zip(codes).enumerate() {
                if ours == theirs {
                    let r = b * 64..((b + 1) * 64).min(x.len());
                    assert_close(&k, &got[r.clone()], &want[r]);
                }
            }
        }
    }
}

#[test]
fn eight_bit_blockwise_matches_the_cuda_file() {
    let (cpu, cuda) = (Fixture::load("cpu"), Fixture::load("cuda"));
    let code = dynamic_map(true);
    for name in INPUTS {
        let x = cpu.f32(name);
        let q = quantize_blockwise(&x, &code, 256);
        let key = format!("{name}.q8.packed");
        assert_eq!(q.codes, cuda.u8(&key), "{name}");
        assert_eq!(q.absmax, cuda.f32(&format!("{name}.q8.absmax")));
        assert_close(
            name,
            &dequantize_blockwise(&q, &code),
            &cuda.f32(&format!("{name}.q8.dequant")),
        );
        assert!(differing(&q.codes, cpu.u8(&key)) <= differing(cuda.u8(&key), cpu.u8(&key)));
    }
}

#[test]
fn storage_is_about_half_a_byte_per_value() {
    let x: Vec<f32> = (0..64 * 1024)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let plain = quantize_4bit(&x, FourBit::Nf4, 64, false).bytes() as f64 / x.len() as f64;
    let dq = quantize_4bit(&x, FourBit::Nf4, 64, true).bytes() as f64 / x.len() as f64;
    assert!((plain - 0.5625).abs() < 1e-3, "{plain}");
    assert!(dq < 0.5165, "{dq}");
}

/// Values on the f32 midpoint between two NF4 codes (found in SmolLM2's weights, where the
/// nearest code by distance had rounded the other way): bitsandbytes' CUDA kernel (`x >
/// threshold`) and its CPU bucketize both give the lower code. Each block: the value, then
/// its absmax.
#[test]
fn nf4_values_on_a_midpoint_take_the_lower_code() {
    for (value, absmax, code) in [
        (-0.470_428_47_f32, 0.554_687_5_f32, 0u8), // between -1 and -0.6962
        (-0.179_138_18, 0.527_374_27, 3),          // between -0.3949 and -0.2844
    ] {
        let mut block = vec![0f32; 64];
        block[0] = value;
        block[1] = -absmax;
        let q = quantize_4bit(&block, FourBit::Nf4, BLOCKSIZE_4BIT, false);
        let scaled = value * (1.0 / absmax);
        let (lower, upper) = (NF4[code as usize], NF4[code as usize + 1]);
        assert_eq!(scaled, (lower + upper) / 2.0, "{value} is on the midpoint");
        assert_eq!(q.packed[0] >> 4, code, "{value}");
    }
}
