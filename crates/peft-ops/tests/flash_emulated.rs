//! The CUDA flash attention kernels (`src/kernels/attention.cu`) run on the CPU under the
//! emulation of `tests/emulate` (one thread per CUDA thread, `mma.sync` rebuilt from its
//! fragments), against the CPU f32 reference `causal_self_attention`: output and the gradients
//! of q, k and v, with grouped-query heads, RoPE, a sequence that is not a multiple of the
//! 64-row tile, and head sizes 64 and 128. Needs a C++20 compiler (`CXX`, default `g++`).

use candle_core::{DType, Device, Tensor, Var};
use peft_ops::causal_self_attention;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod common;
use common::{max_abs, randn};

/// The emulated kernels, built once per test run.
fn emulator() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flash_emulated");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let status = Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-pthread",
                "-fno-strict-aliasing",
                "-DPEFT_EMULATE",
            ])
            .arg(dir.join("flash.cpp"))
            .arg("-o")
            .arg(&bin)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cxx}: {e}"));
        assert!(
            status.success(),
            "{cxx} could not build tests/emulate/flash.cpp"
        );
        bin
    })
}

/// `randn` rounded to bf16, as f32.
fn bf16_values(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    (randn(shape, seed) * scale)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn bf16_bytes(t: &Tensor) -> Vec<u8> {
    let v = t.to_dtype(DType::BF16).unwrap().flatten_all().unwrap();
    let v = v.to_vec1::<half::bf16>().unwrap();
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// RoPE tables `[t, d / 2]` with HF's default base.
fn rope_tables(t: usize, d: usize) -> (Tensor, Tensor) {
    let half = d / 2;
    let angles: Vec<f32> = (0..t)
        .flat_map(|p| (0..half).map(move |i| p as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32)))
        .collect();
    let a = Tensor::from_vec(angles, (t, half), &Device::Cpu).unwrap();
    (a.cos().unwrap(), a.sin().unwrap())
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let scale = max_abs(want);
    let diff = max_abs(&(got - want).unwrap());
    println!("{what}: max abs diff {diff:.3e}, reference scale {scale:.3e}");
    assert!(
        diff <= tol * scale,
        "{what}: max abs diff {diff} exceeds {tol} of the reference scale {scale}"
    );
}

fn compare(b: usize, t: usize, heads: usize, kv_heads: usize, d: usize) {
    let scale = 1.0 / (d as f64).sqrt();
    let q = bf16_values(&[b, t, heads * d], 1, 2.0);
    let k = bf16_values(&[b, t, kv_heads * d], 2, 2.0);
    let v = bf16_values(&[b, t, kv_heads * d], 3, 1.0);
    let dout = bf16_values(&[b, t, heads * d], 4, 1.0);
    let (cos, sin) = rope_tables(t, d);

    let vars: Vec<Var> = [&q, &k, &v]
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    let o = causal_self_attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        &cos,
        &sin,
        heads,
        kv_heads,
        scale,
    )
    .unwrap();
    let grads = (&o * &dout).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |i: usize| grads.get(vars[i].as_tensor()).unwrap().clone();

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let name = format!("flash_{b}_{t}_{heads}_{kv_heads}_{d}");
    let (input, output) = (
        dir.join(format!("{name}.in")),
        dir.join(format!("{name}.out")),
    );
    let mut bytes: Vec<u8> = [b, t, heads, kv_heads, d]
        .iter()
        .flat_map(|&x| (x as i32).to_le_bytes())
        .collect();
    bytes.extend((scale as f32).to_le_bytes());
    for x in [&q, &k, &v, &dout] {
        bytes.extend(bf16_bytes(x));
    }
    bytes.extend(f32_bytes(&cos));
    bytes.extend(f32_bytes(&sin));
    std::fs::write(&input, bytes).unwrap();
    let status = Command::new(emulator())
        .arg(&input)
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success(), "the emulated kernels failed");

    let out = std::fs::read(&output).unwrap();
    let floats: Vec<f32> = out
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (nq, nk, nl) = (b * t * heads * d, b * t * kv_heads * d, b * heads * t);
    assert_eq!(floats.len(), 2 * nq + nl + 2 * nk, "output size");
    let mut at = 0;
    let mut next = |n: usize, shape: &[usize]| {
        let t = Tensor::from_vec(floats[at..at + n].to_vec(), shape, &Device::Cpu).unwrap();
        at += n;
        t
    };
    let o_emu = next(nq, &[b, t, heads * d]);
    let lse = next(nl, &[b, heads, t]);
    let dq = next(nq, &[b, t, heads * d]);
    let dk = next(nk, &[b, t, kv_heads * d]);
    let dv = next(nk, &[b, t, kv_heads * d]);

    check("output", &o_emu, &o, 1e-2);
    check("dq", &dq, &grad(0), 2e-2);
    check("dk", &dk, &grad(1), 2e-2);
    check("dv", &dv, &grad(2), 2e-2);
    // The log-sum-exp of the scaled, rotated scores, recomputed here in f32.
    let split = |x: &Tensor, n: usize| {
        x.reshape((b, t, n, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let qr = peft_ops::rope(&split(&q, heads), &cos, &sin).unwrap();
    let kr = peft_ops::rope(&split(&k, kv_heads), &cos, &sin).unwrap();
    let kr = kr
        .unsqueeze(2)
        .unwrap()
        .broadcast_as((b, kv_heads, heads / kv_heads, t, d))
        .unwrap()
        .reshape((b, heads, t, d))
        .unwrap();
    let scores = (qr.matmul(&kr.t().unwrap()).unwrap() * scale).unwrap();
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let want = scores
        .broadcast_add(&mask)
        .unwrap()
        .exp()
        .unwrap()
        .sum(3)
        .unwrap()
        .log()
        .unwrap();
    let diff = max_abs(&(&lse - &want).unwrap());
    println!("lse: max abs diff {diff:.3e}");
    assert!(diff < 2e-2, "lse: max abs diff {diff}");
}

#[test]
fn flash_attention_head_dim_64_grouped_query() {
    compare(1, 80, 4, 2, 64);
}

#[test]
fn flash_attention_head_dim_128_two_batches() {
    compare(2, 70, 2, 1, 128);
}
