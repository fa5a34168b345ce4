//! Our CUDA kernels run on the CPU under the emulation of `tests/emulate` (one thread per CUDA
//! thread, `mma.sync` rebuilt from its fragments), against CPU references:
//! - flash attention (`src/kernels/attention.cu`) against `causal_self_attention` in f32:
//!   output and the gradients of q, k and v, with grouped-query heads, RoPE, a sequence that is
//!   not a multiple of the 64-row tile, head sizes 64 and 128, and gpt-oss's attention sinks;
//! - the fused optimizer step (`src/kernels/optim.cu`) against PyTorch's AdamW rule in f64
//!   (f32 and bf16 tensors), and its 8-bit form against the CPU path bit for bit;
//! - the cross-entropy row kernel (`src/kernels/ops.cu`) against log-softmax in f64;
//! - the 4-bit dequantization (`src/kernels/ops.cu`) against peft-quant, bit for bit;
//! - the RMSNorm backward, SwiGLU and causal softmax kernels (`src/kernels/ops.cu`) against
//!   the CPU ops' forward and autograd gradients, LoRA's low-rank add against matmuls, and the
//!   dropout mask against the CPU's, bit for bit.
//!
//! Needs a C++20 compiler (`CXX`, default `g++`).

use candle_core::{DType, Device, Tensor, Var};
use peft_ops::{
    causal_self_attention, causal_softmax, dropout_mask, gated_act, rms_norm, Dropout,
    GatedActivation, PrefixedRows, SHARED_SEGMENT,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

mod common;
use common::{
    max_abs, packed_reference, packed_rows, prefixed_reference, prefixed_rows, randn, repeat_kv,
    rope_tables, split_heads,
};

/// Builds `tests/emulate/<name>.cpp` once per test run and returns the program.
fn emulator(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap();
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(bin) = built.get(name) {
        return bin.clone();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emulated_{name}"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let status = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-fno-strict-aliasing",
            "-DPEFT_EMULATE",
        ])
        .arg(dir.join(format!("{name}.cpp")))
        .arg("-o")
        .arg(&bin)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cxx}: {e}"));
    assert!(
        status.success(),
        "{cxx} could not build tests/emulate/{name}.cpp"
    );
    built.insert(name.into(), bin.clone());
    bin
}

/// Runs emulator `name` on `input` and returns its output.
fn emulate(name: &str, case: &str, input: &[u8]) -> Vec<u8> {
    emulate_with(name, &[], case, input)
}

/// [`emulate`] with leading arguments (the kernel to run).
fn emulate_with(name: &str, args: &[&str], case: &str, input: &[u8]) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (inp, out) = (
        dir.join(format!("{case}.in")),
        dir.join(format!("{case}.out")),
    );
    std::fs::write(&inp, input).unwrap();
    let status = Command::new(emulator(name))
        .args(args)
        .arg(&inp)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "the emulated {name} kernels failed");
    std::fs::read(&out).unwrap()
}

fn to_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
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

fn f32_le(v: &[f32]) -> impl Iterator<Item = u8> + '_ {
    v.iter().flat_map(|f| f.to_le_bytes())
}

/// `got` is `want` bit for bit (one length, every value).
fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: value {i}: {g} vs {w}");
    }
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    f32_le(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// The harnesses' dropout fields (ops.cu's `Dropout`): on, keys, threshold, scale.
fn dropout_bytes(d: Option<Dropout>) -> Vec<u8> {
    let (on, (k1, k2), threshold, scale) = match d {
        Some(d) => (1i32, d.keys(), d.threshold(), d.scale()),
        None => (0, (0, 0), 0, 0.0),
    };
    let mut out = on.to_le_bytes().to_vec();
    for v in [k1, k2, threshold] {
        out.extend(v.to_le_bytes());
    }
    out.extend(scale.to_le_bytes());
    out
}

/// Sizes as the harnesses' i32 header fields.
fn i32_bytes(values: &[usize]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&x| (x as i32).to_le_bytes())
        .collect()
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
    compare_with(b, t, heads, kv_heads, d, FlashBwd::Tile64);
}

/// The flash backward the emulated harness runs: 64 keys a block, or 128 (`wide-bwd`).
#[derive(Clone, Copy, PartialEq)]
enum FlashBwd {
    Tile64,
    Wide,
}

impl FlashBwd {
    fn args(self) -> &'static [&'static str] {
        match self {
            FlashBwd::Tile64 => &[],
            FlashBwd::Wide => &["wide-bwd"],
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            FlashBwd::Tile64 => "",
            FlashBwd::Wide => "_wide",
        }
    }
}

fn compare_with(b: usize, t: usize, heads: usize, kv_heads: usize, d: usize, bwd: FlashBwd) {
    compare_extras(b, t, heads, kv_heads, d, bwd, None, None);
}

/// [`compare_with`], with gpt-oss's attention sinks (a logit per head) and a sliding window
/// where given.
#[allow(clippy::too_many_arguments)]
fn compare_extras(
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    bwd: FlashBwd,
    sinks: Option<&Tensor>,
    window: Option<usize>,
) {
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
        None,
        window,
        sinks,
    )
    .unwrap();
    let grads = (&o * &dout).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |i: usize| grads.get(vars[i].as_tensor()).unwrap().clone();

    let with_sinks = sinks.is_some() as usize;
    let w = window.unwrap_or(0);
    let mut bytes: Vec<u8> = i32_bytes(&[b, t, heads, kv_heads, d, 0, with_sinks, w]);
    bytes.extend((scale as f32).to_le_bytes());
    if let Some(s) = sinks {
        bytes.extend(f32_bytes(s));
    }
    for x in [&q, &k, &v, &dout] {
        bytes.extend(bf16_bytes(x));
    }
    bytes.extend(f32_bytes(&cos));
    bytes.extend(f32_bytes(&sin));
    let sinks_case = if sinks.is_some() { "_sinks" } else { "" };
    let case = format!(
        "flash_{b}_{t}_{heads}_{kv_heads}_{d}{}{sinks_case}_w{w}",
        bwd.suffix()
    );
    let floats = to_f32s(&emulate_with("flash", bwd.args(), &case, &bytes));
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
    let qr = peft_ops::rope(&split_heads(&q, heads), &cos, &sin).unwrap();
    let kr = repeat_kv(
        &peft_ops::rope(&split_heads(&k, kv_heads), &cos, &sin).unwrap(),
        heads,
    );
    let scores = (qr.matmul(&kr.t().unwrap()).unwrap() * scale).unwrap();
    let seen = |i: usize, j: usize| j <= i && window.is_none_or(|w| j + w > i);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if seen(i, j) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let mut sums = scores
        .broadcast_add(&mask)
        .unwrap()
        .exp()
        .unwrap()
        .sum(3)
        .unwrap();
    if let Some(s) = sinks {
        // The sink's term of each row's sum.
        let sink_terms = s.exp().unwrap().reshape((1, heads, 1)).unwrap();
        sums = sums.broadcast_add(&sink_terms).unwrap();
    }
    let want = sums.log().unwrap();
    let diff = max_abs(&(&lse - &want).unwrap());
    println!("lse: max abs diff {diff:.3e}");
    assert!(diff < 2e-2, "lse: max abs diff {diff}");
}

/// Packed rows (`segments` per batch row: sequence lengths, then padding up to `t`): each
/// sequence's output and q, k, v gradients equal those of the sequence attended alone (its
/// positions from 0), padding rows stay finite and, with a zero output gradient there, add
/// nothing to any gradient.
fn compare_packed(t: usize, heads: usize, kv_heads: usize, d: usize, segments: &[&[usize]]) {
    compare_packed_with(t, (heads, kv_heads, d), segments, FlashBwd::Tile64);
}

fn compare_packed_with(
    t: usize,
    sizes: (usize, usize, usize),
    segments: &[&[usize]],
    bwd: FlashBwd,
) {
    compare_packed_windowed(t, sizes, segments, bwd, None);
}

/// [`compare_packed_with`] with a sliding window within each sequence.
fn compare_packed_windowed(
    t: usize,
    (heads, kv_heads, d): (usize, usize, usize),
    segments: &[&[usize]],
    bwd: FlashBwd,
    window: Option<usize>,
) {
    let b = segments.len();
    let scale = 1.0 / (d as f64).sqrt();
    let q = bf16_values(&[b, t, heads * d], 11, 2.0);
    let k = bf16_values(&[b, t, kv_heads * d], 12, 2.0);
    let v = bf16_values(&[b, t, kv_heads * d], 13, 1.0);
    let rows = packed_rows(t, d, segments);
    let real = &rows.real;
    let dout = bf16_values(&[b, t, heads * d], 14, 1.0)
        .broadcast_mul(real)
        .unwrap();
    let [o_want, dq_want, dk_want, dv_want] =
        packed_reference((&q, &k, &v), &dout, segments, (heads, kv_heads, d), window);

    let w = window.unwrap_or(0);
    let mut bytes: Vec<u8> = i32_bytes(&[b, t, heads, kv_heads, d, 1, 0, w]);
    bytes.extend((scale as f32).to_le_bytes());
    for x in [&q, &k, &v, &dout] {
        bytes.extend(bf16_bytes(x));
    }
    let ids = rows.ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    bytes.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
    bytes.extend(f32_bytes(&rows.cos));
    bytes.extend(f32_bytes(&rows.sin));
    let case = format!(
        "flash_packed_{t}_{heads}_{kv_heads}_{d}{}_w{w}",
        bwd.suffix()
    );
    let floats = to_f32s(&emulate_with("flash", bwd.args(), &case, &bytes));
    let (nq, nk, nl) = (b * t * heads * d, b * t * kv_heads * d, b * heads * t);
    assert_eq!(floats.len(), 2 * nq + nl + 2 * nk, "output size");
    assert!(floats.iter().all(|x| x.is_finite()), "a non-finite value");
    let tensor = |at: usize, n: usize| tensor_at(&floats, at, &[b, t, n * d]);
    // Padding rows attend across sequences: compare the real rows' outputs only.
    let o = tensor(0, heads).broadcast_mul(real).unwrap();
    check("packed output", &o, &o_want, 1e-2);
    let at = nq + nl;
    check("packed dq", &tensor(at, heads), &dq_want, 2e-2);
    check("packed dk", &tensor(at + nq, kv_heads), &dk_want, 2e-2);
    check("packed dv", &tensor(at + nq + nk, kv_heads), &dv_want, 2e-2);
}

/// Three sequences and padding in one row (the boundaries mid-tile, a tile with no key its
/// rows see), one sequence filling the other: grouped-query heads.
#[test]
fn flash_attention_packed_rows() {
    compare_packed(150, 4, 2, 64, &[&[40, 70, 30], &[150]]);
}

/// Head size 128, a sequence starting past the first tile.
#[test]
fn flash_attention_packed_rows_head_dim_128() {
    compare_packed(140, 2, 2, 128, &[&[70, 60]]);
}

/// Tiles that no row of a block sees (the first sequence's keys for the third sequence's
/// queries, and back in the backward) are skipped: the results are those of visiting them.
#[test]
fn flash_attention_packed_rows_skip_unseen_tiles() {
    compare_packed(200, 2, 1, 64, &[&[64, 70, 66], &[130, 60]]);
}

/// Attention over a prefix (prefix tuning's virtual keys and values, unrotated, seen by every
/// query) laid out by `PrefixedRows` as self-attention over `p + t` rows: the new rows' output
/// and the gradients of q, k, v and of the prefix keys and values equal transformers' attention
/// over a pre-filled cache. `masked`: packed sequences and padding (segment ids, the prefix's
/// shared); otherwise one sequence per row and plain causal attention.
fn compare_prefixed(
    p: usize,
    t: usize,
    (heads, kv_heads, d): (usize, usize, usize),
    lengths: &[&[usize]],
    masked: bool,
) {
    let b = lengths.len();
    let scale = 1.0 / (d as f64).sqrt();
    let q = bf16_values(&[b, t, heads * d], 21, 2.0);
    let k = bf16_values(&[b, t, kv_heads * d], 22, 2.0);
    let v = bf16_values(&[b, t, kv_heads * d], 23, 1.0);
    let pk = bf16_values(&[b, kv_heads, p, d], 24, 2.0);
    let pv = bf16_values(&[b, kv_heads, p, d], 25, 1.0);
    let rows = prefixed_rows(p, t, d, lengths);
    let real = &rows.real;
    let dout = bf16_values(&[b, t, heads * d], 26, 1.0)
        .broadcast_mul(real)
        .unwrap();
    let want = prefixed_reference((&q, &k, &v), (&pk, &pv), &rows, &dout, (heads, kv_heads, d));

    let (cos, sin) = if masked {
        (rows.cos.clone(), rows.sin.clone())
    } else {
        (rows.cos.get(0).unwrap(), rows.sin.get(0).unwrap())
    };
    let mask = masked.then_some(&rows.ids);
    let all = PrefixedRows::new((&q, &k, &v), (&pk, &pv), &cos, &sin, mask, heads).unwrap();
    let n = p + t;
    let zeros = Tensor::zeros((b, p, heads * d), DType::F32, &Device::Cpu).unwrap();
    let dout_all = Tensor::cat(&[&zeros, &dout], 1).unwrap();
    let mut bytes: Vec<u8> = i32_bytes(&[b, n, heads, kv_heads, d, masked as usize, 0, 0]);
    bytes.extend((scale as f32).to_le_bytes());
    for x in [&all.q, &all.k, &all.v, &dout_all] {
        bytes.extend(bf16_bytes(x));
    }
    if let Some(ids) = &all.segments {
        let ids = ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        assert!(ids[..p].iter().all(|&i| i == SHARED_SEGMENT));
        bytes.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
    }
    bytes.extend(f32_bytes(&all.cos));
    bytes.extend(f32_bytes(&all.sin));
    let case = format!("flash_prefixed_{p}_{t}_{heads}_{kv_heads}_{d}_{masked}");
    let floats = to_f32s(&emulate("flash", &case, &bytes));
    let (nq, nk, nl) = (b * n * heads * d, b * n * kv_heads * d, b * heads * n);
    assert_eq!(floats.len(), 2 * nq + nl + 2 * nk, "output size");
    assert!(floats.iter().all(|x| x.is_finite()), "a non-finite value");
    let tensor = |at: usize, w: usize| tensor_at(&floats, at, &[b, n, w * d]);
    let new = |x: Tensor| x.narrow(1, p, t).unwrap();
    let prefix = |x: Tensor| {
        x.narrow(1, 0, p)
            .unwrap()
            .reshape((b, p, kv_heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    let at = nq + nl;
    // Padding rows too: a padding query sees every earlier key, the prefix's included.
    check("prefixed output", &new(tensor(0, heads)), &want[0], 1e-2);
    check("prefixed dq", &new(tensor(at, heads)), &want[1], 2e-2);
    check(
        "prefixed dk",
        &new(tensor(at + nq, kv_heads)),
        &want[2],
        2e-2,
    );
    check(
        "prefixed dv",
        &new(tensor(at + nq + nk, kv_heads)),
        &want[3],
        2e-2,
    );
    check(
        "prefix dk",
        &prefix(tensor(at + nq, kv_heads)),
        &want[4],
        2e-2,
    );
    check(
        "prefix dv",
        &prefix(tensor(at + nq + nk, kv_heads)),
        &want[5],
        2e-2,
    );
}

/// Prefix tuning's attention with packed rows and padding: every sequence sees the prefix.
#[test]
fn flash_attention_over_a_prefix_packed_rows() {
    compare_prefixed(20, 150, (4, 2, 64), &[&[40, 70, 30], &[150]], true);
}

/// A prefix longer than a tile, head size 128, plain causal rows.
#[test]
fn flash_attention_over_a_prefix_head_dim_128() {
    compare_prefixed(70, 60, (2, 2, 128), &[&[60]], false);
}

#[test]
fn flash_attention_head_dim_64_grouped_query() {
    compare(1, 80, 4, 2, 64);
}

#[test]
fn flash_attention_head_dim_128_two_batches() {
    compare(2, 70, 2, 1, 128);
}

/// The backward over 128 keys a block (`PEFT_CUDA_FLASH_BWD=wide`): head sizes 64 and 128, a
/// partial last block, packed rows with skipped tiles.
#[test]
fn flash_attention_wide_backward() {
    compare_with(1, 200, 2, 1, 64, FlashBwd::Wide);
    compare_with(2, 70, 2, 1, 128, FlashBwd::Wide);
    compare_packed_with(
        200,
        (2, 1, 64),
        &[&[64, 70, 66], &[130, 60]],
        FlashBwd::Wide,
    );
}

/// gpt-oss's attention sinks: the forward folds each head's sink into its rows' sums and into
/// the log-sum-exp the backward reads. Output, gradients and log-sum-exp as the CPU's, over
/// several tiles, grouped heads, head sizes 64 (with the 128-row forward's bits) and 128.
#[test]
fn flash_attention_with_sinks() {
    let sinks = Tensor::new(&[2.5f32, -1.0, 0.5, 4.0], &Device::Cpu).unwrap();
    compare_extras(1, 150, 4, 2, 64, FlashBwd::Tile64, Some(&sinks), None);
    compare_extras(2, 70, 4, 1, 128, FlashBwd::Wide, Some(&sinks), None);
}

/// A sliding window (Gemma's, Mistral's, gpt-oss's local layers): windows shorter than a
/// tile and longer, over 200 positions (key tiles before a block's window and query tiles
/// past a key tile's skipped), both backwards, head sizes 64 (with the 128-row forward's
/// bits) and 128, and gpt-oss's sinks with a window.
#[test]
fn flash_attention_with_a_sliding_window() {
    compare_extras(1, 200, 2, 1, 64, FlashBwd::Tile64, None, Some(40));
    compare_extras(1, 200, 2, 2, 64, FlashBwd::Wide, None, Some(100));
    compare_extras(2, 150, 2, 1, 128, FlashBwd::Tile64, None, Some(70));
    let sinks = Tensor::new(&[1.5f32, -0.5], &Device::Cpu).unwrap();
    compare_extras(1, 160, 2, 1, 64, FlashBwd::Wide, Some(&sinks), Some(65));
    // Packed rows (sequences starting mid-tile, padding) with a window within each sequence.
    let packed = [&[64, 70, 66][..], &[130, 60]];
    compare_packed_windowed(200, (2, 1, 64), &packed, FlashBwd::Tile64, Some(50));
    compare_packed_windowed(200, (2, 1, 64), &packed, FlashBwd::Wide, Some(90));
}

/// A sequence shorter than one tile: every copy of every tile partial.
#[test]
fn flash_attention_shorter_than_a_tile() {
    compare(2, 40, 2, 1, 64);
}

/// Four tiles: key tiles wholly before the queries' (unmasked, in both passes), the 128-row
/// forward's second block partial.
#[test]
fn flash_attention_four_tiles() {
    compare(1, 200, 2, 1, 64);
}

/// AdamW's scalars at step 3 (bias corrections below 1), clipping and weight decay on.
struct Adamw {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    /// Below the test gradients' norms, so clipping engages.
    max_norm: f64,
}

impl Adamw {
    fn new() -> Self {
        let (lr, beta1, beta2, weight_decay) = (1e-3f64, 0.9f64, 0.999f64, 0.01f64);
        Self {
            lr: lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: 1e-8,
            decay: (1.0 - lr * weight_decay) as f32,
            bc1: (1.0 - beta1.powi(3)) as f32,
            bc2: (1.0 - beta2.powi(3)) as f32,
            max_norm: 10.0,
        }
    }

    /// The clipping factor for the squared-gradient sum `sum`, as peft-train computes it.
    fn grad_scale(&self, sum: f64) -> f32 {
        let norm = sum.sqrt();
        assert!(norm > self.max_norm, "clipping must engage: norm {norm}");
        (self.max_norm / (norm + 1e-6)) as f32
    }

    /// The emulator's input header for `tensors` tensors of `kind` (0: f32, 1: 8-bit
    /// moments, 2: bf16).
    fn header(&self, tensors: usize, kind: i32) -> Vec<u8> {
        let mut input = Vec::new();
        for v in [tensors as i32, kind] {
            input.extend(v.to_le_bytes());
        }
        let s = [
            self.lr, self.beta1, self.beta2, self.eps, self.decay, self.bc1, self.bc2,
        ];
        for v in &s {
            input.extend(v.to_le_bytes());
        }
        input.extend(self.max_norm.to_le_bytes());
        for v in peft_quant::dynamic_map(true)
            .iter()
            .chain(&peft_quant::dynamic_map(false))
        {
            input.extend(v.to_le_bytes());
        }
        input
    }
}

/// `n` values: uniform in [-1, 1), or `lo + |·|` when `lo` > 0.
fn values(n: usize, seed: u64, lo: f32) -> Vec<f32> {
    let r = randn(&[n], seed).to_vec1::<f32>().unwrap();
    r.iter()
        .map(|x| if lo > 0.0 { lo + x.abs() } else { *x })
        .collect()
}

/// Three tensors of different sizes (one spans several blocks): parameters and moments within
/// 1e-6 relative of PyTorch's rule computed in f64, and the squared-gradient sum within 1e-5
/// relative.
#[test]
fn fused_adamw_matches_the_pytorch_rule() {
    let sizes = [5usize, 700, 3000];
    let a = Adamw::new();
    let mut input = a.header(sizes.len(), 0);
    let mut tensors = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let (p, g) = (values(n, seed, 0.0), values(n, seed + 1, 0.0));
        let (m, v) = (values(n, seed + 2, 0.0), values(n, seed + 3, 1e-3));
        input.extend((n as i64).to_le_bytes());
        for x in [&p, &g, &m, &v] {
            input.extend(f32_le(x));
        }
        tensors.push((p, g, m, v));
    }
    let out = emulate("optim", "adamw", &input);
    let sum = f64::from_le_bytes(out[..8].try_into().unwrap());
    let floats = to_f32s(&out[8..]);
    let want_sum: f64 = tensors
        .iter()
        .flat_map(|(_, g, _, _)| g.iter().map(|&x| x as f64 * x as f64))
        .sum();
    assert!(
        (sum - want_sum).abs() <= 1e-5 * want_sum,
        "squared gradient sum {sum}, want {want_sum}"
    );
    let f = |x: f32| x as f64;
    let scale = a.grad_scale(sum);
    let mut at = 0;
    for (p, g, m, v) in &tensors {
        let n = p.len();
        let (got_p, got_m, got_v) = (
            &floats[at..at + n],
            &floats[at + n..at + 2 * n],
            &floats[at + 2 * n..at + 3 * n],
        );
        at += 3 * n;
        for j in 0..n {
            let gj = f(g[j]) * f(scale);
            let mj = f(a.beta1) * f(m[j]) + (1.0 - f(a.beta1)) * gj;
            let vj = f(a.beta2) * f(v[j]) + (1.0 - f(a.beta2)) * gj * gj;
            let pj = f(p[j]) * f(a.decay)
                - f(a.lr) * (mj / f(a.bc1)) / ((vj / f(a.bc2)).sqrt() + f(a.eps));
            for (what, got, want) in [
                ("p", got_p[j], pj),
                ("m", got_m[j], mj),
                ("v", got_v[j], vj),
            ] {
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{what}[{j}] of a tensor of {n}: {got}, want {want}"
                );
            }
        }
    }
    assert_eq!(at, floats.len(), "output size");
}

/// A NaN gradient makes the norm NaN: the kernels then leave every parameter and moment as it
/// was (f32 and 8-bit moments), as peft-train's CPU path does.
#[test]
fn fused_adamw_skips_a_step_with_a_non_finite_norm() {
    use peft_quant::{dynamic_map, quantize_blockwise};
    let sizes = [700usize, 300];
    let a = Adamw::new();
    for kind in [0, 1] {
        let mut input = a.header(sizes.len(), kind);
        let mut state = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let seed = 700 + 10 * i as u64;
            let (p, mut g) = (values(n, seed, 0.0), values(n, seed + 1, 0.0));
            if i == 1 {
                g[n / 2] = f32::NAN;
            }
            let (m, v) = (values(n, seed + 2, 0.0), values(n, seed + 3, 1e-3));
            input.extend((n as i64).to_le_bytes());
            let mut tensor = f32_le(&p).collect::<Vec<_>>();
            if kind == 1 {
                for (x, signed) in [(&m, true), (&v, false)] {
                    let q = quantize_blockwise(x, &dynamic_map(signed), 256);
                    tensor.extend(&q.codes);
                    tensor.extend(f32_le(&q.absmax));
                }
            } else {
                tensor.extend(f32_le(&m));
                tensor.extend(f32_le(&v));
            }
            input.extend(f32_le(&p));
            input.extend(f32_le(&g));
            input.extend(&tensor[4 * n..]);
            state.extend(tensor);
        }
        let out = emulate("optim", &format!("adamw_nan_{kind}"), &input);
        assert!(f64::from_le_bytes(out[..8].try_into().unwrap()).is_nan());
        assert!(out[8..] == state[..], "kind {kind}: the state changed");
    }
}

/// bf16 parameters, gradients and moments (full fine-tuning in bf16): the update computed in
/// f32 from the stored values and rounded once, within bf16's rounding (2⁻⁸ relative) of the
/// rule in f64.
#[test]
fn fused_bf16_adamw_matches_the_pytorch_rule() {
    let n = 3000usize;
    let a = Adamw::new();
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let (p, g) = (round(values(n, 600, 0.0)), round(values(n, 601, 0.0)));
    let (m, v) = (round(values(n, 602, 0.0)), round(values(n, 603, 1e-3)));
    let mut input = a.header(1, 2);
    input.extend((n as i64).to_le_bytes());
    for x in [&p, &g, &m, &v] {
        input.extend(
            x.iter()
                .flat_map(|f| half::bf16::from_f32(*f).to_bits().to_le_bytes()),
        );
    }
    let out = emulate("optim", "adamw_bf16", &input);
    let sum = f64::from_le_bytes(out[..8].try_into().unwrap());
    let want_sum: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
    assert!(
        (sum - want_sum).abs() <= 1e-5 * want_sum,
        "sum {sum}, want {want_sum}"
    );
    let got: Vec<f32> = out[8..]
        .chunks_exact(2)
        .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect();
    assert_eq!(got.len(), 3 * n, "output size");
    let f = |x: f32| x as f64;
    let scale = a.grad_scale(sum);
    for j in 0..n {
        let gj = f(g[j]) * f(scale);
        let mj = f(a.beta1) * f(m[j]) + (1.0 - f(a.beta1)) * gj;
        let vj = f(a.beta2) * f(v[j]) + (1.0 - f(a.beta2)) * gj * gj;
        let pj =
            f(p[j]) * f(a.decay) - f(a.lr) * (mj / f(a.bc1)) / ((vj / f(a.bc2)).sqrt() + f(a.eps));
        for (what, got, want) in [
            ("p", got[j], pj),
            ("m", got[n + j], mj),
            ("v", got[2 * n + j], vj),
        ] {
            assert!(
                (got as f64 - want).abs() <= 4e-3 * want.abs() + 1e-9,
                "{what}[{j}]: {got}, want {want}"
            );
        }
    }
}

/// 8-bit moments (blocks of 256, one tensor ending mid-block): the parameters, codes and block
/// scales are bit for bit what peft-train's CPU path computes (dequantize with peft-quant,
/// update in f32, quantize again).
#[test]
fn fused_8bit_adamw_matches_the_cpu_path() {
    use peft_quant::{dequantize_blockwise, dynamic_map, quantize_blockwise, Blockwise8};
    let (signed, unsigned) = (dynamic_map(true), dynamic_map(false));
    let sizes = [4096usize, 5000];
    let a = Adamw::new();
    let mut input = a.header(sizes.len(), 1);
    let mut tensors = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let seed = 400 + 10 * i as u64;
        let (p, g) = (values(n, seed, 0.0), values(n, seed + 1, 0.0));
        let m = quantize_blockwise(&values(n, seed + 2, 0.0), &signed, 256);
        let v = quantize_blockwise(&values(n, seed + 3, 1e-3), &unsigned, 256);
        input.extend((n as i64).to_le_bytes());
        input.extend(f32_le(&p));
        input.extend(f32_le(&g));
        for q in [&m, &v] {
            input.extend(&q.codes);
            input.extend(f32_le(&q.absmax));
        }
        tensors.push((p, g, m, v));
    }
    let out = emulate("optim", "adamw8bit", &input);
    let scale = a.grad_scale(f64::from_le_bytes(out[..8].try_into().unwrap()));
    let mut at = 8;
    let mut take = |len: usize| {
        let part = out[at..at + len].to_vec();
        at += len;
        part
    };
    for (p, g, m, v) in &tensors {
        let n = p.len();
        let blocks = n.div_ceil(256);
        // The CPU path, as in peft-train's AdamW::step.
        let mut mf = dequantize_blockwise(m, &signed);
        let mut vf = dequantize_blockwise(v, &unsigned);
        let mut w = p.clone();
        for j in 0..n {
            let gj = g[j] * scale;
            mf[j] = a.beta1 * mf[j] + (1.0 - a.beta1) * gj;
            vf[j] = a.beta2 * vf[j] + (1.0 - a.beta2) * gj * gj;
            let update = (mf[j] / a.bc1) / ((vf[j] / a.bc2).sqrt() + a.eps);
            w[j] = w[j] * a.decay - a.lr * update;
        }
        let want_m: Blockwise8 = quantize_blockwise(&mf, &signed, 256);
        let want_v: Blockwise8 = quantize_blockwise(&vf, &unsigned, 256);
        let got_p = to_f32s(&take(4 * n));
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got_p), bits(&w), "parameters of a tensor of {n}");
        for (what, want) in [("m", &want_m), ("v", &want_v)] {
            assert_eq!(take(n), want.codes, "{what} codes of a tensor of {n}");
            let absmax = to_f32s(&take(4 * blocks));
            assert_eq!(
                bits(&absmax),
                bits(&want.absmax),
                "{what} scales, tensor of {n}"
            );
        }
    }
    assert_eq!(at, out.len(), "output size");
}

/// Rows of a vocabulary that is not a multiple of the block, read eight logits at a time
/// (1000) and one by one (1003, rows misaligned), one label not counted: losses, entropies
/// and logits gradients within 1e-5 of log-softmax computed in f64, and the top-1 hits (a tie
/// goes to the first index).
#[test]
fn fused_cross_entropy_rows_match_log_softmax() {
    for vocab in [1000, 1003] {
        cross_entropy_case(vocab);
    }
}

fn cross_entropy_case(vocab: usize) {
    let rows = 5usize;
    let mut logits = (randn(&[rows * vocab], 200) * 4.0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let labels: [i64; 5] = [3, 999, -100, 0, 517];
    // Row 0's label is its largest logit; row 4's ties with an earlier one, which argmax picks.
    logits[3] = 40.0;
    logits[4 * vocab + 100] = 40.0;
    logits[4 * vocab + 517] = 40.0;
    let inv_denom = 0.25f32;
    let mut input: Vec<u8> = i32_bytes(&[rows, vocab]);
    input.extend(inv_denom.to_le_bytes());
    input.extend(f32_le(&logits));
    input.extend(labels.iter().flat_map(|x| x.to_le_bytes()));
    let out = to_f32s(&emulate("cross_entropy", "cross_entropy", &input));
    assert_eq!(out.len(), 3 * rows + rows * vocab, "output size");
    let (losses, entropies, top1) = (&out[..rows], &out[rows..2 * rows], &out[2 * rows..3 * rows]);
    let grads = &out[3 * rows..];
    assert_eq!(top1, [1.0, 0.0, 0.0, 0.0, 0.0], "top-1 hits");
    for (r, &label) in labels.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let counted = label >= 0;
        let (want_loss, want_entropy) = if counted {
            let entropy: f64 = row
                .iter()
                .map(|&x| {
                    let logp = x as f64 - max - sum.ln();
                    -logp.exp() * logp
                })
                .sum();
            (sum.ln() + max - row[label as usize] as f64, entropy)
        } else {
            (0.0, 0.0)
        };
        assert!(
            (losses[r] as f64 - want_loss).abs() <= 1e-5 * (1.0 + want_loss.abs()),
            "row {r}: loss {}, want {want_loss}",
            losses[r]
        );
        assert!(
            (entropies[r] as f64 - want_entropy).abs() <= 1e-5 * (1.0 + want_entropy.abs()),
            "row {r}: entropy {}, want {want_entropy}",
            entropies[r]
        );
        for (j, &x) in row.iter().enumerate() {
            let p = (x as f64 - max).exp() / sum;
            let one_hot = if j as i64 == label { 1.0 } else { 0.0 };
            let want = if counted {
                (p - one_hot) * inv_denom as f64
            } else {
                0.0
            };
            let got = grads[r * vocab + j] as f64;
            assert!(
                (got - want).abs() <= 1e-6,
                "row {r}, logit {j}: gradient {got}, want {want}"
            );
        }
    }
}

/// NF4 and FP4, with and without double quantization, over more than 256 blocks and an odd
/// length: the kernel gives exactly the values of the CPU dequantization (which matches
/// bitsandbytes; see peft-quant's tests).
#[test]
fn dequantize_4bit_matches_the_cpu_bit_for_bit() {
    use peft_quant::{dynamic_map, quantize_4bit, Absmax, FourBit, BLOCKSIZE_4BIT};
    let len = BLOCKSIZE_4BIT * 300 + 7;
    let x = (randn(&[len], 300) * 0.05)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for kind in [FourBit::Nf4, FourBit::Fp4] {
        for double_quant in [false, true] {
            let q = quantize_4bit(&x, kind, BLOCKSIZE_4BIT, double_quant);
            let mut input = (len as i64).to_le_bytes().to_vec();
            let (offset, blocksize2) = match &q.absmax {
                Absmax::Double { q, offset } => (*offset, q.blocksize),
                Absmax::Plain(_) => (0.0, 1),
            };
            for v in [
                BLOCKSIZE_4BIT as i32,
                blocksize2 as i32,
                double_quant as i32,
            ] {
                input.extend(v.to_le_bytes());
            }
            input.extend(offset.to_le_bytes());
            input.extend(f32_le(&kind.code()));
            input.extend(f32_le(&dynamic_map(true)));
            input.extend(&q.packed);
            match &q.absmax {
                Absmax::Plain(a) => input.extend(f32_le(a)),
                Absmax::Double { q, .. } => {
                    input.extend(&q.codes);
                    input.extend(f32_le(&q.absmax));
                }
            }
            let case = format!("dequantize_{kind:?}_{double_quant}");
            let got = to_f32s(&emulate("dequantize", &case, &input));
            let want = q.dequantize();
            assert_same_bits(&case, &got, &want);
        }
    }
}

/// Forward values and the gradients of `sum(f(inputs) · probe)` on the CPU.
fn cpu_grads(
    inputs: &[&Tensor],
    probe: &Tensor,
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs).unwrap();
    let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
        .collect();
    (y, g)
}

fn tensor_at(values: &[f32], at: usize, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(values[at..at + n].to_vec(), shape, &Device::Cpu).unwrap()
}

/// A warp per row: rows of 300 (read one by one: not a multiple of the pack of 8) and of 576
/// (packs, 2.25 per lane; 11 rows: a second, partial block of 8): y within 1e-6 of candle's
/// RMSNorm and dL/dx within 1e-5 of the CPU's autograd, also with a residual gradient added
/// (the layer tape's form).
#[test]
fn rms_norm_kernels_match_the_cpu() {
    for (rows, d) in [(5usize, 300usize), (11, 576)] {
        rms_norm_case(rows, d);
    }
}

fn rms_norm_case(rows: usize, d: usize) {
    let eps = 1e-5f32;
    let x = randn(&[rows, d], 500);
    let w = (randn(&[d], 501) + 1.5).unwrap();
    let g = randn(&[rows, d], 502);
    let res = randn(&[rows, d], 503);
    let (y, grads) = cpu_grads(&[&x], &g, |v| rms_norm(&v[0], &w, eps as f64));
    let mut input: Vec<u8> = i32_bytes(&[rows, d]);
    input.extend(eps.to_le_bytes());
    for t in [&x, &w, &g, &res] {
        input.extend(f32_bytes(t));
    }
    let out = to_f32s(&emulate_with(
        "ops",
        &["rms_norm_bwd"],
        &format!("rms_norm_bwd_{d}"),
        &input,
    ));
    check("rms_norm y", &tensor_at(&out, 0, &[rows, d]), &y, 1e-6);
    check(
        "rms_norm dx",
        &tensor_at(&out, rows * d, &[rows, d]),
        &grads[0],
        1e-5,
    );
    check(
        "rms_norm dx + residual",
        &tensor_at(&out, 2 * rows * d, &[rows, d]),
        &(&grads[0] + &res).unwrap(),
        1e-5,
    );
}

/// A trained norm's weight gradient: rows of 300 (the second of a thread's columns only
/// partly there) and 576, in blocks of 5 rows (the last one short) and of 1: within 1e-5 of
/// the CPU's autograd.
#[test]
fn rms_norm_weight_gradient_kernels_match_the_cpu() {
    for (rows, d, per) in [(37usize, 300usize, 5usize), (11, 576, 1)] {
        let eps = 1e-5f32;
        let x = randn(&[rows, d], 510);
        let w = (randn(&[d], 511) + 1.5).unwrap();
        let g = randn(&[rows, d], 512);
        let (_, grads) = cpu_grads(&[&x, &w], &g, |v| rms_norm(&v[0], &v[1], eps as f64));
        let mut input: Vec<u8> = i32_bytes(&[rows, d, per]);
        input.extend(eps.to_le_bytes());
        for t in [&x, &g] {
            input.extend(f32_bytes(t));
        }
        let out = to_f32s(&emulate_with(
            "ops",
            &["rms_norm_dw"],
            &format!("rms_norm_dw_{d}_{per}"),
            &input,
        ));
        check("rms_norm dw", &tensor_at(&out, 0, &[d]), &grads[1], 1e-5);
    }
}

/// A trained embedding's gradient: 1,500 positions (two tiles of ids to compare against), ids
/// repeated up to hundreds of times, rows of 300 (a thread's second column only partly there)
/// and of 4,200 (a second walk of each chain for the columns past 16 a thread), one id past
/// the vocab (skipped): bit for bit the CPU's position-ordered f32 sums.
#[test]
fn embedding_gradient_kernels_match_the_cpu() {
    for (n, d) in [(1500, 300), (300, 4200)] {
        embedding_case(n, d);
    }
}

fn embedding_case(n: usize, d: usize) {
    let vocab = 50usize;
    let ids: Vec<u32> = (0..n as u32)
        .map(|j| match j {
            7 => vocab as u32 + 3,
            j if j % 3 == 0 => 5,
            j => (j * 7919) % vocab as u32,
        })
        .collect();
    let grad = randn(&[n, d], 520);
    let kept: Vec<u32> = (0..n as u32)
        .filter(|&j| ids[j as usize] < vocab as u32)
        .collect();
    let kept = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
    let kept_ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .index_select(&kept, 0)
        .unwrap();
    let want = Tensor::zeros((vocab, d), DType::F32, &Device::Cpu)
        .unwrap()
        .index_add(&kept_ids, &grad.index_select(&kept, 0).unwrap(), 0)
        .unwrap();
    let mut input: Vec<u8> = i32_bytes(&[n, d, vocab]);
    input.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
    input.extend(f32_bytes(&grad));
    let got = to_f32s(&emulate_with(
        "ops",
        &["embedding"],
        &format!("embedding_{d}"),
        &input,
    ));
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_same_bits(&format!("dW of rows of {d}"), &got, &want);
}

/// The add kernel in bf16 (residual connections): each sum as candle's bf16 add rounds it,
/// packs of eight read as one with a partial last pack (4100), and one by one from an
/// unaligned start (4099).
#[test]
fn add_kernel_rounds_as_candle() {
    for n in [4100usize, 4099] {
        let (a, b) = (randn(&[n], 540), (randn(&[n], 541) * 3.0).unwrap());
        let mut input = (n as i64).to_le_bytes().to_vec();
        input.extend(f32_bytes(&a));
        input.extend(f32_bytes(&b));
        let got = to_f32s(&emulate_with("ops", &["add_same"], "add_same", &input));
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let want = (bf16(&a) + bf16(&b))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_same_bits(&format!("sums of {n}"), &got, &want);
    }
}

/// LoRA's A and B rounded to bf16 in one launch: each value as candle rounds it (to nearest,
/// ties to even), one segment after another across the seams, empty segments skipped (one
/// layer's A and B; the A, then the B of q, k and v).
#[test]
fn bf16_concat_rounds_as_candle() {
    let small = |shape: &[usize], seed| (randn(shape, seed) * 1e-3).unwrap();
    let empty = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    let one_layer = [randn(&[16, 300], 530), small(&[300, 16], 531)];
    let three = [
        randn(&[16, 300], 532),
        empty.clone(),
        randn(&[8, 300], 533),
        small(&[300, 16], 534),
        small(&[77, 8], 535),
        empty,
    ];
    for segments in [&one_layer[..], &three[..]] {
        let mut counts = [0i64; 6];
        for (c, t) in counts.iter_mut().zip(segments) {
            *c = t.elem_count() as i64;
        }
        let mut input: Vec<u8> = counts.iter().flat_map(|n| n.to_le_bytes()).collect();
        for t in segments {
            input.extend(f32_bytes(t));
        }
        let got = to_f32s(&emulate_with(
            "ops",
            &["bf16_concat"],
            "bf16_concat",
            &input,
        ));
        let want: Vec<f32> = segments
            .iter()
            .flat_map(|t| {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        assert_same_bits(&format!("{} segments", segments.len()), &got, &want);
    }
}

/// Several blocks of the elementwise kernels, packs of eight read as one (and the partial last
/// one, and every pack one by one when the second half of the gradient is misaligned):
/// act(gate)·up and both gradients within 1e-5, for SwiGLU, GeGLU and gpt-oss's clamped SwiGLU.
#[test]
fn gated_activation_kernels_match_the_cpu() {
    for n in [4100, 4099] {
        gated_case(n);
    }
}

fn gated_case(n: usize) {
    let gate = (randn(&[n], 510) * 4.0).unwrap();
    let up = randn(&[n], 511);
    let probe = randn(&[n], 512);
    // gpt-oss's with a limit that clamps some gates (up to 4 here) and ups (up to 1).
    let clamped = GatedActivation::ClampedSwiglu {
        alpha: 1.702,
        limit: 0.8,
    };
    for act in [GatedActivation::Silu, GatedActivation::GeluTanh, clamped] {
        let (y, grads) = cpu_grads(&[&gate, &up], &probe, |v| gated_act(&v[0], &v[1], act));
        let mut input = (n as i64).to_le_bytes().to_vec();
        let (kind, alpha, limit) = match act {
            GatedActivation::Silu => (0i32, 1.0f32, 0.0f32),
            GatedActivation::GeluTanh => (1, 1.0, 0.0),
            GatedActivation::ClampedSwiglu { alpha, limit } => (2, alpha, limit),
        };
        input.extend(kind.to_le_bytes());
        input.extend(alpha.to_le_bytes());
        input.extend(limit.to_le_bytes());
        for t in [&gate, &up, &probe] {
            input.extend(f32_bytes(t));
        }
        let out = to_f32s(&emulate_with("ops", &["gated"], "gated", &input));
        check(&format!("{act:?} y"), &tensor_at(&out, 0, &[n]), &y, 1e-5);
        let d_gate = tensor_at(&out, n, &[n]);
        check(&format!("{act:?} d gate"), &d_gate, &grads[0], 1e-5);
        let d_up = tensor_at(&out, 2 * n, &[n]);
        check(&format!("{act:?} d up"), &d_up, &grads[1], 1e-5);
    }
}

/// Queries after past keys (k > q) and rows longer than the block: probabilities and
/// dL/dscores within 1e-5 of the CPU kernel's.
#[test]
fn causal_softmax_kernels_match_the_cpu() {
    let (batch, q, k, scale) = (2usize, 5usize, 300usize, 0.7f32);
    let x = (randn(&[batch, q, k], 520) * 3.0).unwrap();
    let probe = randn(&[batch, q, k], 521);
    let (y, grads) = cpu_grads(&[&x], &probe, |v| causal_softmax(&v[0], scale as f64, None));
    let mut input: Vec<u8> = i32_bytes(&[batch * q, q, k]);
    input.extend(scale.to_le_bytes());
    for t in [&x, &probe] {
        input.extend(f32_bytes(t));
    }
    let out = to_f32s(&emulate_with(
        "ops",
        &["causal_softmax"],
        "causal_softmax",
        &input,
    ));
    let n = batch * q * k;
    check(
        "causal softmax y",
        &tensor_at(&out, 0, &[batch, q, k]),
        &y,
        1e-5,
    );
    check(
        "causal softmax dx",
        &tensor_at(&out, n, &[batch, q, k]),
        &grads[0],
        1e-5,
    );
}

/// LoRA's low-rank add, with B as `[cols, r]` (forward) and A as `[r, cols]` (backward, with
/// and without a dropout mask), ranks in one group of 16 and in two (the second partial),
/// rows and columns ending mid-block, pairs of columns read as one (even columns) and one by
/// one (odd): within 1e-5 of `base + scale · (left · rightᵀ) ∘ mask` by matmuls.
#[test]
fn low_rank_add_matches_matmuls() {
    for (rows, cols, r, right_t, masked) in [
        (37, 300, 16, false, false),
        (37, 300, 16, true, false),
        (37, 300, 20, true, true),
        (37, 300, 8, false, true),
        (150, 301, 16, false, false),
        (150, 301, 20, true, true),
        (150, 301, 24, false, true),
    ] {
        low_rank_add_case(rows, cols, r, right_t, masked);
    }
}

fn low_rank_add_case(rows: usize, cols: usize, r: usize, right_t: bool, masked: bool) {
    let scale = 0.5f32;
    let base = randn(&[rows, cols], 530);
    let left = randn(&[rows, r], 531);
    let drop = Dropout { p: 0.25, seed: 7 };
    let right = if right_t {
        randn(&[r, cols], 532)
    } else {
        randn(&[cols, r], 532)
    };
    let mut product = if right_t {
        left.matmul(&right).unwrap()
    } else {
        left.matmul(&right.t().unwrap()).unwrap()
    };
    if masked {
        let mask = dropout_mask(drop.seed, drop.p, &[rows, cols], &Device::Cpu).unwrap();
        product = (product * mask).unwrap();
    }
    let want = (&base + (product * scale as f64).unwrap()).unwrap();
    let mut input = (rows as i64).to_le_bytes().to_vec();
    input.extend(i32_bytes(&[cols, r, right_t as usize]));
    input.extend(scale.to_le_bytes());
    input.extend(dropout_bytes(masked.then_some(drop)));
    for t in [&base, &left, &right] {
        input.extend(f32_bytes(t));
    }
    let case = format!("low_rank_add_{r}_{right_t}_{masked}");
    let out = to_f32s(&emulate_with("ops", &["low_rank_add"], &case, &input));
    check(&case, &tensor_at(&out, 0, &[rows, cols]), &want, 1e-5);
}

/// LoRA's thin products without f32 copies of their wide operand: `scale · (x ∘ mask) · Aᵀ`
/// (forward, A `[r, n]`) and `scale · x · B` (backward, B `[n, r]`), for ranks that fill one
/// group of 16 and that need two (the second one partial), rows that end mid-block, columns
/// that end mid-stage, read eight at a time (n a multiple of 8) or one by one, and the
/// columns split over blocks (the last split short): within 1e-5 of the matmuls.
#[test]
fn thin_project_matches_matmuls() {
    for (n, splits) in [(300, 1), (300, 2), (520, 2)] {
        thin_project_case(45, n, splits);
    }
}

fn thin_project_case(rows: usize, n: usize, splits: usize) {
    let scale = 0.5f32;
    let x = randn(&[rows, n], 540);
    let drop = Dropout { p: 0.25, seed: 9 };
    let mask = dropout_mask(drop.seed, drop.p, &[rows, n], &Device::Cpu).unwrap();
    for (r, w_t, masked) in [(16usize, false, true), (20, true, false), (8, false, false)] {
        let w = if w_t {
            randn(&[n, r], 541)
        } else {
            randn(&[r, n], 541)
        };
        let xd = if masked {
            (&x * &mask).unwrap()
        } else {
            x.clone()
        };
        let product = if w_t {
            xd.matmul(&w).unwrap()
        } else {
            xd.matmul(&w.t().unwrap()).unwrap()
        };
        let want = (product * scale as f64).unwrap();
        let mut input = (rows as i64).to_le_bytes().to_vec();
        input.extend(i32_bytes(&[n, r, w_t as usize, splits]));
        input.extend(scale.to_le_bytes());
        input.extend(dropout_bytes(masked.then_some(drop)));
        input.extend(f32_bytes(&x));
        input.extend(f32_bytes(&w));
        let case = format!("thin_project_{n}_{splits}_{r}_{w_t}_{masked}");
        let out = to_f32s(&emulate_with("ops", &["thin_project"], &case, &input));
        check(&case, &tensor_at(&out, 0, &[rows, r]), &want, 1e-5);
    }
}

/// The gradients of LoRA's weights without f32 copies: `scale · (x ∘ mask)ᵀ · y` as `[n, r]`
/// (dB) or `[r, n]` (dA), with the rows split in one part and in several (the last one short
/// or empty), the last column block full and partial: within 1e-5 of the matmuls.
#[test]
fn thin_outer_matches_matmuls() {
    for n in [200, 203] {
        thin_outer_case(150, n);
    }
}

fn thin_outer_case(rows: usize, n: usize) {
    let scale = 0.25f32;
    let x = randn(&[rows, n], 550);
    let drop = Dropout { p: 0.1, seed: 11 };
    let mask = dropout_mask(drop.seed, drop.p, &[rows, n], &Device::Cpu).unwrap();
    for (r, out_t, masked, splits) in [
        (16usize, false, false, 1usize),
        (16, true, true, 4),
        (20, false, false, 7),
        (4, true, false, 40),
    ] {
        let y = randn(&[rows, r], 551);
        let xd = if masked {
            (&x * &mask).unwrap()
        } else {
            x.clone()
        };
        let product = if out_t {
            y.t().unwrap().matmul(&xd).unwrap()
        } else {
            xd.t().unwrap().matmul(&y).unwrap()
        };
        let want = (product * scale as f64).unwrap();
        let mut input = (rows as i64).to_le_bytes().to_vec();
        input.extend(i32_bytes(&[n, r, out_t as usize, splits]));
        input.extend(scale.to_le_bytes());
        input.extend(dropout_bytes(masked.then_some(drop)));
        input.extend(f32_bytes(&x));
        input.extend(f32_bytes(&y));
        let case = format!("thin_outer_{n}_{r}_{out_t}_{masked}_{splits}");
        let out = to_f32s(&emulate_with("ops", &["thin_outer"], &case, &input));
        let dims = if out_t { [r, n] } else { [n, r] };
        check(&case, &tensor_at(&out, 0, &dims), &want, 1e-5);
    }
}

/// Random normal weights drawn by the GPU kernel are the CPU's, bit for bit where both use
/// the same libm (the emulation; on a GPU up to the last bit of its f64 log and cosine).
#[test]
fn random_normal_matches_the_cpu() {
    let (seed, n, std) = (0x5eed_u64, 5000usize, 0.02f32);
    // Stream 0: the key is the seed.
    let want = peft_ops::random_normal(seed, 0, &[n], std, DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut input = seed.to_le_bytes().to_vec();
    input.extend((n as i64).to_le_bytes());
    input.extend(std.to_le_bytes());
    let got = to_f32s(&emulate_with(
        "ops",
        &["random_normal"],
        "random_normal",
        &input,
    ));
    assert_eq!(want.len(), n);
    assert_same_bits("random_normal", &got, &want);
}

/// NEFTune's uniform noise drawn by the GPU kernel is the CPU's, bit for bit.
#[test]
fn random_uniform_matches_the_cpu() {
    let (seed, n, range) = (0x5eed_u64, 5000usize, (-0.03f32, 0.03f32));
    let want = peft_ops::random_uniform(seed, 0, &[n], range, DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut input = seed.to_le_bytes().to_vec();
    input.extend((n as i64).to_le_bytes());
    input.extend(range.0.to_le_bytes());
    input.extend(range.1.to_le_bytes());
    let got = to_f32s(&emulate_with(
        "ops",
        &["random_uniform"],
        "random_uniform",
        &input,
    ));
    assert_eq!(want.len(), n);
    assert_same_bits("random_uniform", &got, &want);
}

/// A mask longer than the CPU's parallel chunks: the GPU's dropout mask is the CPU's, and
/// `dropout_apply` (cuBLAS LoRA's dropped input) multiplies by that mask.
#[test]
fn dropout_mask_matches_the_cpu_bit_for_bit() {
    let (seed, p, n) = (0x1234_5678_9abc_def0u64, 0.1f64, 2 * 16384 + 1000);
    let want = dropout_mask(seed, p, &[n], &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let x = randn(&[n], 504);
    let mut input = (n as i64).to_le_bytes().to_vec();
    input.extend(dropout_bytes(Some(Dropout { p, seed })));
    input.extend(f32_bytes(&x));
    let out = to_f32s(&emulate_with(
        "ops",
        &["dropout_mask"],
        "dropout_mask",
        &input,
    ));
    assert_eq!(out.len(), 2 * n);
    let (got, dropped) = out.split_at(n);
    // dropout_apply: x times the same mask (an exact f32 product).
    let x = x.to_vec1::<f32>().unwrap();
    for (i, (d, (x, w))) in dropped.iter().zip(x.iter().zip(&want)).enumerate() {
        assert_eq!(
            d.to_bits(),
            (x * w).to_bits(),
            "dropped value {i}: {d} vs {x} · {w}"
        );
    }
    let kept = want.iter().filter(|&&m| m > 0.0).count() as f64 / n as f64;
    assert!((kept - 0.9).abs() < 0.01, "kept {kept}");
    assert_same_bits("mask", got, &want);
}
