//! Each op's backward against central finite differences of its forward (f64 where the op
//! allows it, f32 otherwise), and its forward against a composed candle reference.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use peft_ops::*;

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Checks d(sum(f(x) * probe))/dx against finite differences.
fn check_grad(x0: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, eps: f64, tol: f64) {
    let probe = randn(f(x0).unwrap().dims(), x0.dtype(), 99);
    let loss = |x: &Tensor| -> f64 {
        (f(x).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let x = Var::from_tensor(x0).unwrap();
    let y = (f(x.as_tensor()).unwrap() * &probe)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(x.as_tensor())
        .expect("gradient reaches the input")
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let flat: Vec<f64> = x0
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in 0..flat.len() {
        let bump = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            Tensor::from_vec(v, x0.dims(), &Device::Cpu)
                .unwrap()
                .to_dtype(x0.dtype())
                .unwrap()
        };
        let numeric = (loss(&bump(eps)) - loss(&bump(-eps))) / (2.0 * eps);
        let diff = (numeric - analytic[i]).abs();
        assert!(
            diff <= tol * (1.0 + numeric.abs()),
            "element {i}: numeric {numeric} vs analytic {}",
            analytic[i]
        );
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn frozen_linear_matches_matmul_and_gives_no_weight_grad() {
    let w = randn(&[5, 4], DType::F64, 1);
    let x = randn(&[2, 3, 4], DType::F64, 2);
    let y = frozen_linear(&x, &w).unwrap();
    let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-12);
    check_grad(&x, |x| frozen_linear(x, &w), 1e-6, 1e-7);
}

#[test]
fn rms_norm_forward_and_grad() {
    let w = randn(&[6], DType::F32, 3);
    let x = randn(&[2, 3, 6], DType::F32, 4);
    let y = rms_norm(&x, &w, 1e-5).unwrap();
    let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
        .unwrap()
        .sqrt()
        .unwrap();
    let reference = x.broadcast_div(&r).unwrap().broadcast_mul(&w).unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-5);
    check_grad(&x, |x| rms_norm(x, &w, 1e-5), 1e-2, 2e-3);
}

#[test]
fn softmax_forward_and_grad() {
    let x = randn(&[2, 3, 7], DType::F64, 5);
    let y = softmax_last_dim(&x).unwrap();
    let e = x.exp().unwrap();
    let reference = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-12);
    check_grad(&x, softmax_last_dim, 1e-6, 1e-7);
}

#[test]
fn rope_forward_and_grad() {
    let (t, d) = (5, 8);
    let x = randn(&[2, 3, t, d], DType::F32, 6);
    let theta: Vec<f32> = (0..t)
        .flat_map(|p| (0..d / 2).map(move |i| p as f32 / 10000f32.powf(2.0 * i as f32 / d as f32)))
        .collect();
    let theta = Tensor::from_vec(theta, (t, d / 2), &Device::Cpu).unwrap();
    let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
    let y = rope(&x, &cos, &sin).unwrap();
    // rotate_half reference: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    let x1 = x.narrow(3, 0, d / 2).unwrap();
    let x2 = x.narrow(3, d / 2, d / 2).unwrap();
    let reference = Tensor::cat(
        &[
            (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap(),
            (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap(),
        ],
        3,
    )
    .unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-5);
    check_grad(&x, |x| rope(x, &cos, &sin), 1e-2, 2e-3);
}

#[test]
fn chunked_cross_entropy_matches_full_softmax() {
    let hidden = randn(&[7, 4], DType::F32, 7);
    let weight = randn(&[11, 4], DType::F32, 8);
    let labels = Tensor::new(&[3i64, -100, 0, 10, 5, -100, 2], &Device::Cpu).unwrap();
    let (loss, n_valid) = cross_entropy_chunked(&hidden, &weight, &labels, 3).unwrap();
    assert_eq!(n_valid, 5);
    let logits = hidden.matmul(&weight.t().unwrap()).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let lp: Vec<Vec<f32>> = log_probs.to_vec2().unwrap();
    let expected: f32 = [(0, 3), (2, 0), (3, 10), (4, 5), (6, 2)]
        .iter()
        .map(|&(r, c)| -lp[r][c])
        .sum::<f32>()
        / 5.0;
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    check_grad(
        &hidden,
        |h| Ok(cross_entropy_chunked(h, &weight, &labels, 2)?.0),
        1e-2,
        2e-3,
    );
}

#[test]
fn chunked_cross_entropy_with_no_valid_label_is_zero() {
    let hidden = randn(&[3, 4], DType::F32, 9);
    let weight = randn(&[6, 4], DType::F32, 10);
    let labels = Tensor::new(&[-100i64, -100, -100], &Device::Cpu).unwrap();
    let (loss, n) = cross_entropy_chunked(&hidden, &weight, &labels, 2).unwrap();
    assert_eq!(n, 0);
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn causal_softmax_matches_masked_softmax_and_grad() {
    // 3 queries over 5 keys: query i sees keys 0..=2+i.
    let x = randn(&[2, 3, 3, 5], DType::F32, 12);
    let y = causal_softmax(&x, 0.7).unwrap();
    let mask: Vec<f32> = (0..3)
        .flat_map(|i| (0..5).map(move |j| if j <= 2 + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (3, 5), &Device::Cpu).unwrap();
    let reference =
        candle_nn::ops::softmax_last_dim(&(&x * 0.7).unwrap().broadcast_add(&mask).unwrap())
            .unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-6);
    check_grad(&x, |x| causal_softmax(x, 0.7), 1e-2, 2e-3);
    // The composed fallback (used for other dtypes and devices) agrees.
    let f64_path = causal_softmax(&x.to_dtype(DType::F64).unwrap(), 0.7).unwrap();
    assert!(max_abs_diff(&f64_path.to_dtype(DType::F32).unwrap(), &reference) < 1e-6);
}

#[test]
fn checkpoint_gives_the_same_input_and_parameter_gradients() {
    use std::sync::Arc;
    let w = Var::from_tensor(&randn(&[4, 4], DType::F64, 13)).unwrap();
    let x0 = Var::from_tensor(&randn(&[3, 4], DType::F64, 14)).unwrap();
    let block = {
        let w = w.clone();
        move |x: &Tensor| -> Result<Tensor> { x.matmul(&param(w.as_tensor()))?.tanh()?.sqr() }
    };
    let plain = block(x0.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let sink = Arc::new(GradSink::default());
    let y = checkpoint(x0.as_tensor(), &sink, block).unwrap();
    let mut grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(w.as_tensor()).is_none(),
        "parameter gradients come through the sink"
    );
    sink.drain_into(&mut grads).unwrap();
    for v in [&w, &x0] {
        let d = max_abs_diff(
            grads.get(v.as_tensor()).unwrap(),
            plain.get(v.as_tensor()).unwrap(),
        );
        assert!(d < 1e-12, "{d}");
    }
}
