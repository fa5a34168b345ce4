//! bf16 matmuls on the CPU (AVX512-BF16) against f32 references: the frozen linear (both
//! orientations), the batched attention matmul (plain and transposed operands) and the
//! cross-entropy head (input and weight gradients). Its own test binary: the bf16 switch is process-wide, and every test
//! here turns it on.

use candle_core::{DType, Device, Tensor, D};
use peft_ops::{batched_matmul, cross_entropy_chunked, frozen_matmul, set_bf16_matmul};

mod common;
use common::{max_abs, randn};

/// Largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    max_abs(&(got - want).unwrap()) / max_abs(want)
}

/// The bf16 path is on; `false` (and the test returns) on a CPU without AVX512-BF16.
fn bf16_on() -> bool {
    let on = set_bf16_matmul(true);
    if !on {
        eprintln!("this CPU has no AVX512-BF16: nothing to compare");
    }
    on
}

/// bf16 inputs carry 8 significant bits: results move by ~2⁻⁹ relative, never by more than 1%.
const BF16_REL: f32 = 1e-2;

#[test]
fn frozen_matmul_in_bf16_tracks_f32() {
    if !bf16_on() {
        return;
    }
    let x = randn(&[70, 96], 1);
    let w = randn(&[45, 96], 2);
    let g = randn(&[70, 45], 3);
    let fwd = frozen_matmul(&x, &w, true).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap();
    let d = rel_diff(&fwd, &want);
    assert!(d > 0.0 && d < BF16_REL, "x·wᵀ: {d}");
    let bwd = frozen_matmul(&g, &w, false).unwrap();
    let d = rel_diff(&bwd, &g.matmul(&w).unwrap());
    assert!(d > 0.0 && d < BF16_REL, "g·w: {d}");
    // Below the row threshold (one token while decoding) it stays f32: exact.
    let row = x.narrow(0, 0, 1).unwrap();
    let d = rel_diff(
        &frozen_matmul(&row, &w, true).unwrap(),
        &row.matmul(&w.t().unwrap()).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn batched_matmul_in_bf16_tracks_f32() {
    if !bf16_on() {
        return;
    }
    let q = randn(&[2, 3, 40, 16], 4);
    let k = randn(&[2, 3, 40, 16], 5);
    // kᵀ is a transposed view (packed as rows), k a plain right operand.
    let scores = batched_matmul(&q, &k.t().unwrap()).unwrap();
    let want = q.matmul(&k.t().unwrap()).unwrap();
    assert_eq!(scores.dims(), &[2, 3, 40, 40]);
    let d = rel_diff(&scores, &want);
    assert!(d > 0.0 && d < BF16_REL, "q·kᵀ: {d}");
    let out = batched_matmul(&scores, &k).unwrap();
    let d = rel_diff(&out, &want.matmul(&k).unwrap());
    assert!(d > 0.0 && d < BF16_REL, "p·v: {d}");
    // A transposed left operand (pᵀ·g in the attention backward) is packed as stored.
    let back = batched_matmul(&scores.t().unwrap(), &q).unwrap();
    let d = rel_diff(&back, &want.t().unwrap().matmul(&q).unwrap());
    assert!(d > 0.0 && d < BF16_REL, "pᵀ·q: {d}");
}

#[test]
fn cross_entropy_head_in_bf16_tracks_f32() {
    if !bf16_on() {
        return;
    }
    let hidden = randn(&[50, 32], 6);
    let weight = randn(&[300, 32], 7);
    let labels: Vec<i64> = (0..50)
        .map(|i| if i % 7 == 3 { -100 } else { (i * 13) % 300 })
        .collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    // A trainable head (full fine-tuning) gets its gradient too.
    let h = candle_core::Var::from_tensor(&hidden).unwrap();
    let wv = candle_core::Var::from_tensor(&weight).unwrap();
    let (loss, n_valid) =
        cross_entropy_chunked(h.as_tensor(), wv.as_tensor(), &labels, 16).unwrap();
    assert_eq!(n_valid, 43);
    let grads = loss.backward().unwrap();
    let grad = grads.get(h.as_tensor()).unwrap().clone();
    let grad_w = grads.get(wv.as_tensor()).unwrap().clone();

    // The f32 reference, composed from candle ops.
    let h2 = candle_core::Var::from_tensor(&hidden).unwrap();
    let w2 = candle_core::Var::from_tensor(&weight).unwrap();
    let logp = candle_nn::ops::log_softmax(
        &h2.as_tensor().matmul(&w2.as_tensor().t().unwrap()).unwrap(),
        D::Minus1,
    )
    .unwrap();
    let mask = labels.ge(0i64).unwrap().to_dtype(DType::F32).unwrap();
    let picked = logp
        .gather(&labels.clamp(0i64, 299).unwrap().unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let want = ((picked * mask).unwrap().sum_all().unwrap().neg().unwrap() / 43.0).unwrap();
    let want_grads = want.backward().unwrap();
    let want_grad = want_grads.get(h2.as_tensor()).unwrap().clone();
    let want_grad_w = want_grads.get(w2.as_tensor()).unwrap().clone();
    let (l, w) = (
        loss.to_scalar::<f32>().unwrap(),
        want.to_scalar::<f32>().unwrap(),
    );
    assert!(((l - w) / w).abs() < 1e-3, "loss {l} vs f32 {w}");
    let d = rel_diff(&grad, &want_grad);
    assert!(d > 0.0 && d < BF16_REL, "dL/dhidden: {d}");
    let d = rel_diff(&grad_w, &want_grad_w);
    assert!(d > 0.0 && d < BF16_REL, "dL/dweight: {d}");
}
