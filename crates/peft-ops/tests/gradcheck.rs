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

/// Repeated tokens: the rows of the ids, and the weight's gradient (each token's rows summed)
/// against finite differences, in f64 and, rounded once from f32 sums, in bf16.
#[test]
fn embedding_rows_and_weight_grad() {
    let ids = Tensor::new(&[3u32, 0, 3, 5, 3, 1], &Device::Cpu).unwrap();
    let w = randn(&[7, 4], DType::F64, 30);
    let rows = embedding(&w, &ids).unwrap();
    assert!(max_abs_diff(&rows, &w.index_select(&ids, 0).unwrap()) == 0.0);
    check_grad(&w, |w| embedding(w, &ids), 1e-6, 1e-8);
    // bf16: a token's rows summed in f32, then rounded once.
    let w16 = Var::from_tensor(&w.to_dtype(DType::BF16).unwrap()).unwrap();
    let probe = randn(&[6, 4], DType::BF16, 31);
    let grads = (embedding(w16.as_tensor(), &ids).unwrap() * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let got = grads.get(w16.as_tensor()).unwrap();
    let p32 = probe.to_dtype(DType::F32).unwrap();
    let want = Tensor::zeros((7, 4), DType::F32, &Device::Cpu)
        .unwrap()
        .index_add(&ids, &p32, 0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(max_abs_diff(got, &want), 0.0);
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

/// The entropy and top-1 counts TRL logs, from the CPU kernel (f32) and the composed path
/// (f64), plain and soft-capped, against the full softmax in f64: labels past the vocabulary
/// count as its last token, ties go to the first index as argmax picks.
#[test]
fn cross_entropy_stats_match_full_softmax() {
    // Rows 2 and 7 of the head are equal and large: hidden rows of ones tie there.
    let mut weight: Vec<Vec<f64>> = randn(&[11, 4], DType::F64, 30).to_vec2().unwrap();
    weight[2] = vec![3.0; 4];
    weight[7] = vec![3.0; 4];
    let mut hidden: Vec<Vec<f64>> = randn(&[8, 4], DType::F64, 31).to_vec2().unwrap();
    hidden[5] = vec![1.0; 4];
    hidden[6] = vec![1.0; 4];
    let labels = [3i64, -100, 0, 12, 5, 7, 2, 9];
    let logits_of = |cap: Option<f64>| -> Vec<Vec<f64>> {
        hidden
            .iter()
            .map(|h| {
                weight
                    .iter()
                    .map(|w| {
                        let l: f64 = h.iter().zip(w).map(|(a, b)| a * b).sum();
                        cap.map_or(l, |c| c * (l / c).tanh())
                    })
                    .collect()
            })
            .collect()
    };
    let flat = |rows: &[Vec<f64>]| Tensor::new(rows.concat(), &Device::Cpu).unwrap();
    let (h, w) = (
        flat(&hidden).reshape((8, 4)).unwrap(),
        flat(&weight).reshape((11, 4)).unwrap(),
    );
    let labels_t = Tensor::new(&labels, &Device::Cpu).unwrap();
    for cap in [None, Some(3.0)] {
        let (mut entropy, mut hits) = (0f64, vec![false; labels.len()]);
        for (i, (row, &label)) in logits_of(cap).iter().zip(&labels).enumerate() {
            if label < 0 {
                continue;
            }
            let label = (label as usize).min(10);
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|l| (l - max).exp()).sum();
            entropy -= row
                .iter()
                .map(|l| (l - max).exp() / z * (l - max - z.ln()))
                .sum::<f64>();
            let argmax = row.iter().position(|&l| l == max).unwrap();
            hits[i] = argmax == label;
        }
        // Rows 5 (label 7, tied with 2 before it) and 6 (label 2) tell the tie apart.
        assert!(!hits[5] && hits[6]);
        let top1 = hits.iter().filter(|&&h| h).count() as f64;
        for dtype in [DType::F32, DType::F64] {
            let (h, w) = (h.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
            let (_, stats) = cross_entropy_sum_stats(&h, &w, &labels_t, 7, 3, cap).unwrap();
            let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let got = scalar(&stats.entropy_sum);
            assert!(
                (got - entropy).abs() < 1e-4,
                "{dtype:?} {cap:?}: entropy {got} vs {entropy}"
            );
            assert_eq!(scalar(&stats.top1), top1, "{dtype:?} {cap:?}: top-1");
        }
    }
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
    let y = causal_softmax(&x, 0.7, None).unwrap();
    let mask: Vec<f32> = (0..3)
        .flat_map(|i| (0..5).map(move |j| if j <= 2 + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (3, 5), &Device::Cpu).unwrap();
    let reference =
        candle_nn::ops::softmax_last_dim(&(&x * 0.7).unwrap().broadcast_add(&mask).unwrap())
            .unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-6);
    check_grad(&x, |x| causal_softmax(x, 0.7, None), 1e-2, 2e-3);
    // The composed fallback (used for other dtypes and devices) agrees.
    let f64_path = causal_softmax(&x.to_dtype(DType::F64).unwrap(), 0.7, None).unwrap();
    assert!(max_abs_diff(&f64_path.to_dtype(DType::F32).unwrap(), &reference) < 1e-6);
}

/// The additive mask of `q` queries over `k` keys (the last `q` of them new), with a window.
fn causal_mask(q: usize, k: usize, window: Option<usize>) -> Tensor {
    let mask: Vec<f32> = (0..q)
        .flat_map(|i| {
            (0..k).map(move |j| {
                let last = k - q + i;
                match j <= last && window.is_none_or(|w| j + w > last) {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (q, k), &Device::Cpu).unwrap()
}

/// `softmax([scores + mask, sink])` without the sink's column, as transformers' gpt-oss
/// computes it (`scores` `[b, heads, q, k]`, `sinks` `[heads]`).
fn sinks_reference(scores: &Tensor, mask: &Tensor, sinks: &Tensor) -> Result<Tensor> {
    let (b, h, q, k) = scores.dims4()?;
    let column = sinks
        .to_dtype(scores.dtype())?
        .reshape((1, h, 1, 1))?
        .broadcast_as((b, h, q, 1))?;
    let masked = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    softmax_last_dim(&Tensor::cat(&[&masked, &column], 3)?)?.narrow(3, 0, k)
}

/// gpt-oss's attention sinks join each row's softmax as one more logit per head, then leave:
/// the kernel (f32), the composed fallback (f64) and the reference agree, and the backward
/// (the plain one: the sink's column adds no value) matches finite differences.
#[test]
fn attention_sinks_join_the_softmax() {
    // 3 heads, 4 queries over 6 keys (2 cached).
    let x = randn(&[2, 3, 4, 6], DType::F32, 70);
    let sinks = (randn(&[3], DType::F32, 71) * 2.0).unwrap();
    for window in [None, Some(3)] {
        let y = causal_softmax_with_sinks(&x, 0.7, window, Some(&sinks)).unwrap();
        let scaled = (&x * 0.7).unwrap();
        let reference = sinks_reference(&scaled, &causal_mask(4, 6, window), &sinks).unwrap();
        assert!(max_abs_diff(&y, &reference) < 1e-6);
        let plain = causal_softmax(&x, 0.7, window).unwrap();
        assert!(max_abs_diff(&y, &plain) > 1e-2, "the sinks change nothing");
        check_grad(
            &x,
            |x| causal_softmax_with_sinks(x, 0.7, window, Some(&sinks)),
            1e-2,
            2e-3,
        );
        let x64 = x.to_dtype(DType::F64).unwrap();
        let sinks64 = sinks.to_dtype(DType::F64).unwrap();
        let composed = causal_softmax_with_sinks(&x64, 0.7, window, Some(&sinks64)).unwrap();
        assert!(max_abs_diff(&composed.to_dtype(DType::F32).unwrap(), &reference) < 1e-6);
        check_grad(
            &x64,
            |x| causal_softmax_with_sinks(x, 0.7, window, Some(&sinks64)),
            1e-5,
            1e-7,
        );
    }
    let wrong = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    assert!(causal_softmax_with_sinks(&x, 0.7, None, Some(&wrong)).is_err());
}

/// Self-attention with sinks (the fused CPU path) against attention composed of candle's ops
/// as transformers writes it, values and the gradients of q, k and v.
#[test]
fn causal_self_attention_with_sinks_matches_composed() {
    // 4 query heads over 2 kv heads, 6 positions, head dim 4, a window of 4.
    let (b, t, h, kvh, d) = (2, 6, 4, 2, 4);
    let inputs = [
        randn(&[b, t, h * d], DType::F32, 72),
        randn(&[b, t, kvh * d], DType::F32, 73),
        randn(&[b, t, kvh * d], DType::F32, 74),
    ];
    let sinks = (randn(&[h], DType::F32, 75) * 2.0).unwrap();
    let theta = randn(&[t, d / 2], DType::F32, 76);
    let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
    let scale = 0.5;
    for window in [None, Some(4)] {
        check_against_composed(
            &inputs,
            |x| {
                let (q, k, v) = (&x[0], &x[1], &x[2]);
                causal_self_attention(
                    q,
                    k,
                    v,
                    &cos,
                    &sin,
                    h,
                    kvh,
                    scale,
                    None,
                    window,
                    Some(&sinks),
                )
            },
            |x| {
                let split = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2);
                let rep = |x: Tensor| {
                    x.unsqueeze(2)?
                        .broadcast_as((b, kvh, h / kvh, t, d))?
                        .reshape((b, h, t, d))
                };
                let q = rope(&split(&x[0], h)?.contiguous()?, &cos, &sin)?;
                let k = rep(rope(&split(&x[1], kvh)?.contiguous()?, &cos, &sin)?)?;
                let v = rep(split(&x[2], kvh)?.contiguous()?)?;
                let scores = (q.matmul(&k.t()?)? * scale)?;
                sinks_reference(&scores, &causal_mask(t, t, window), &sinks)?
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((b, t, h * d))
            },
            1e-5,
        );
    }
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

/// Forward values and input gradients of `fused` against `composed` (plain candle ops with
/// candle's autograd), on the same inputs and a random output probe.
fn check_against_composed(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composed: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let probe = randn(y.dims(), y.dtype(), 77);
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
            .collect();
        (y, g)
    };
    let (y1, g1) = run(&fused);
    let (y2, g2) = run(&composed);
    assert!(
        max_abs_diff(&y1, &y2) < tol,
        "forward differs by {}",
        max_abs_diff(&y1, &y2)
    );
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < tol, "gradient of input {i} differs by {d}");
    }
}

#[test]
fn lora_linear_matches_composed_with_and_without_dropout() {
    let w = randn(&[6, 5], DType::F32, 20);
    let bias = randn(&[6], DType::F32, 21);
    let inputs = [
        randn(&[2, 3, 5], DType::F32, 22),
        randn(&[2, 5], DType::F32, 23),
        randn(&[6, 2], DType::F32, 24),
    ];
    for dropout in [None, Some(Dropout { p: 0.3, seed: 5 })] {
        check_against_composed(
            &inputs,
            |t| {
                lora_linear(
                    &t[0],
                    &LinearWeight::Dense(w.clone()),
                    Some(&bias),
                    &t[1],
                    &t[2],
                    1.5,
                    dropout,
                )
            },
            |t| {
                let base = t[0].broadcast_matmul(&w.t()?)?.broadcast_add(&bias)?;
                let xd = match dropout {
                    Some(d) => t[0].broadcast_mul(
                        &dropout_mask(d.seed, d.p, &[6, 5], &Device::Cpu)?.reshape((2, 3, 5))?,
                    )?,
                    None => t[0].clone(),
                };
                base + (xd
                    .broadcast_matmul(&t[1].t()?)?
                    .broadcast_matmul(&t[2].t()?)?
                    * 1.5)?
            },
            1e-5,
        );
    }
}

/// Without gradients and with few rows (decoding) the LoRA path is one kernel: same values as
/// the matmuls, for one token and for a few, with odd sizes (tails of the 16-wide sums).
#[test]
fn lora_linear_for_a_few_rows_without_grad_matches_composed() {
    let w = randn(&[37, 21], DType::F32, 25);
    let bias = randn(&[37], DType::F32, 26);
    let (a, b) = (
        randn(&[3, 21], DType::F32, 27),
        randn(&[37, 3], DType::F32, 28),
    );
    for rows in [1, 5, 31] {
        let x = randn(&[1, rows, 21], DType::F32, 29);
        let got = lora_linear(
            &x,
            &LinearWeight::Dense(w.clone()),
            Some(&bias),
            &a,
            &b,
            0.7,
            None,
        )
        .unwrap();
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            .add(
                &(x.broadcast_matmul(&a.t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&b.t().unwrap())
                    .unwrap()
                    * 0.7)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(got.dims(), &[1, rows, 37]);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{rows} rows: differs by {d}");
    }
}

#[test]
fn dropout_mask_is_deterministic_and_scaled() {
    let a = dropout_mask(3, 0.25, &[1000], &Device::Cpu).unwrap();
    let b = dropout_mask(3, 0.25, &[1000], &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let v: Vec<f32> = a.to_vec1().unwrap();
    let kept = v.iter().filter(|&&x| x > 0.0).count();
    assert!((700..800).contains(&kept), "{kept} of 1000 kept");
    assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
}

/// `act(g) · u` as candle computes it (its `gelu` is the tanh approximation; gpt-oss's clamps
/// as transformers writes them).
fn act_composed(act: GatedActivation, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    match act {
        GatedActivation::Silu => g.silu()? * u,
        GatedActivation::GeluTanh => g.gelu()? * u,
        GatedActivation::ClampedSwiglu { alpha, limit } => {
            let (alpha, limit) = (alpha as f64, limit as f64);
            let g = g.minimum(limit)?;
            let glu = (&g * candle_nn::ops::sigmoid(&(&g * alpha)?)?)?;
            (u.clamp(-limit, limit)? + 1.0)? * glu
        }
    }
}

/// gpt-oss's activation with a limit that clamps some of the test inputs (gates up to 3,
/// ups up to 1): its own limit is 7.
const ACTIVATIONS: [GatedActivation; 3] = [
    GatedActivation::Silu,
    GatedActivation::GeluTanh,
    GatedActivation::ClampedSwiglu {
        alpha: 1.702,
        limit: 0.7,
    },
];

/// The f32 CPU kernel and the composed fallback (f64) against candle's autograd (whose GELU
/// gradient rounds its constants to 6 digits: 1e-7 apart), and against finite differences.
#[test]
fn gated_activations_match_composed() {
    for act in ACTIVATIONS {
        let x = (randn(&[3, 7], DType::F64, 34) * 3.0).unwrap();
        let up = randn(&[3, 7], DType::F64, 35);
        check_grad(&x, |g| gated_act(g, &up, act), 1e-5, 1e-7);
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-6)] {
            let inputs = [
                (randn(&[3, 7], dtype, 30) * 3.0).unwrap(),
                randn(&[3, 7], dtype, 31),
            ];
            check_against_composed(
                &inputs,
                |t| gated_act(&t[0], &t[1], act),
                |t| act_composed(act, &t[0], &t[1]),
                tol,
            );
        }
    }
}

/// Several parallel blocks of the CPU kernel, the last one partial.
#[test]
fn gated_activations_match_composed_over_many_blocks() {
    for act in ACTIVATIONS {
        let inputs = [
            randn(&[3, 20_001], DType::F32, 32),
            randn(&[3, 20_001], DType::F32, 33),
        ];
        check_against_composed(
            &inputs,
            |t| gated_act(&t[0], &t[1], act),
            |t| act_composed(act, &t[0], &t[1]),
            1e-5,
        );
    }
}

#[test]
fn rms_norm_matches_composed() {
    let w = randn(&[64], DType::F32, 34);
    let inputs = [randn(&[5, 7, 64], DType::F32, 35)];
    check_against_composed(
        &inputs,
        |t| rms_norm(&t[0], &w, 1e-5),
        |t| {
            let r = (t[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
            t[0].broadcast_div(&r)?.broadcast_mul(&w)
        },
        1e-5,
    );
}

#[test]
fn causal_attention_matches_composed_gqa() {
    // 4 query heads over 2 kv heads, 5 positions, head dim 3.
    let inputs = [
        randn(&[2, 4, 5, 3], DType::F32, 40),
        randn(&[2, 2, 5, 3], DType::F32, 41),
        randn(&[2, 2, 5, 3], DType::F32, 42),
    ];
    let scale = 0.6;
    check_against_composed(
        &inputs,
        |t| causal_attention(&t[0], &t[1], &t[2], scale, None, None, None),
        |t| {
            let rep = |x: &Tensor| {
                x.unsqueeze(2)?
                    .broadcast_as((2, 2, 2, 5, 3))?
                    .reshape((2, 4, 5, 3))
            };
            let (k, v) = (rep(&t[1])?, rep(&t[2])?);
            let mask: Vec<f32> = (0..5)
                .flat_map(|i| (0..5).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (5, 5), &Device::Cpu)?;
            let s = (t[0].matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let m = s.max_keepdim(D::Minus1)?.detach();
            let e = s.broadcast_sub(&m)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)
        },
        1e-5,
    );
}

#[test]
fn soft_capped_attention_matches_composed() {
    // Gemma 2's cap: scores become cap · tanh(scale · s / cap) before the causal softmax. A cap
    // of 2 on scores up to about 3 changes them, so the test sees it.
    let inputs = [
        randn(&[2, 4, 6, 8], DType::F32, 60),
        randn(&[2, 2, 6, 8], DType::F32, 61),
        randn(&[2, 2, 6, 8], DType::F32, 62),
    ];
    let (scale, cap, window) = (0.9, 2.0, 4);
    let composed = |t: &[Tensor], cap: f64| {
        let rep = |x: &Tensor| {
            x.unsqueeze(2)?
                .broadcast_as((2, 2, 2, 6, 8))?
                .reshape((2, 4, 6, 8))
        };
        let (k, v) = (rep(&t[1])?, rep(&t[2])?);
        let mask: Vec<f32> = (0..6)
            .flat_map(|i| {
                (0..6).map(move |j| match j <= i && j + window > i {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (6, 6), &Device::Cpu)?;
        let s = ((t[0].matmul(&k.t()?)? * (scale / cap))?.tanh()? * cap)?;
        let s = s.broadcast_add(&mask)?;
        let m = s.max_keepdim(D::Minus1)?.detach();
        let e = s.broadcast_sub(&m)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)
    };
    check_against_composed(
        &inputs,
        |t| causal_attention(&t[0], &t[1], &t[2], scale, Some(cap), Some(window), None),
        |t| composed(t, cap),
        1e-5,
    );
    // The cap changes the result.
    let capped = causal_attention(
        &inputs[0],
        &inputs[1],
        &inputs[2],
        scale,
        Some(cap),
        None,
        None,
    );
    let plain = causal_attention(&inputs[0], &inputs[1], &inputs[2], scale, None, None, None);
    let d = max_abs_diff(&capped.unwrap(), &plain.unwrap());
    assert!(d > 1e-2, "the cap has no effect ({d})");
}

#[test]
fn sliding_window_softmax_matches_masked_softmax_and_grad() {
    // 4 queries over 6 keys (query i is at key 2 + i), window 3: query i sees keys i..=2+i.
    let x = randn(&[2, 3, 4, 6], DType::F32, 13);
    let y = causal_softmax(&x, 0.7, Some(3)).unwrap();
    let mask: Vec<f32> = (0..4)
        .flat_map(|i| {
            (0..6).map(move |j| {
                if j <= 2 + i && j + 3 > 2 + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (4, 6), &Device::Cpu).unwrap();
    let reference =
        candle_nn::ops::softmax_last_dim(&(&x * 0.7).unwrap().broadcast_add(&mask).unwrap())
            .unwrap();
    assert!(max_abs_diff(&y, &reference) < 1e-6);
    check_grad(&x, |x| causal_softmax(x, 0.7, Some(3)), 1e-2, 2e-3);
    let f64_path = causal_softmax(&x.to_dtype(DType::F64).unwrap(), 0.7, Some(3)).unwrap();
    assert!(max_abs_diff(&f64_path.to_dtype(DType::F32).unwrap(), &reference) < 1e-6);
    // A window as wide as the keys is plain causal attention.
    let wide = causal_softmax(&x, 0.7, Some(6)).unwrap();
    let causal = causal_softmax(&x, 0.7, None).unwrap();
    assert_eq!(max_abs_diff(&wide, &causal), 0.0);
}

/// The fused path with a sliding window, and with Gemma 2's soft cap of the scores too.
#[test]
fn sliding_window_self_attention_matches_split_rope_attention_merge() {
    let (b, t, h, kvh, d, window) = (2, 9, 4, 2, 4, 4);
    let inputs = [
        randn(&[b, t, h * d], DType::F32, 54),
        randn(&[b, t, kvh * d], DType::F32, 55),
        randn(&[b, t, kvh * d], DType::F32, 56),
    ];
    let theta = randn(&[t, d / 2], DType::F32, 57);
    let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
    let scale = 0.5;
    for softcap in [None, Some(0.4)] {
        let fused = |x: &[Tensor]| {
            let (q, k, v) = (&x[0], &x[1], &x[2]);
            causal_self_attention(
                q,
                k,
                v,
                &cos,
                &sin,
                h,
                kvh,
                scale,
                softcap,
                Some(window),
                None,
            )
        };
        check_against_composed(
            &inputs,
            fused,
            |x| {
                let split = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2);
                let q = rope(&split(&x[0], h)?.contiguous()?, &cos, &sin)?;
                let k = rope(&split(&x[1], kvh)?.contiguous()?, &cos, &sin)?;
                let v = split(&x[2], kvh)?;
                causal_attention(&q, &k, &v, scale, softcap, Some(window), None)?
                    .transpose(1, 2)?
                    .reshape((b, t, h * d))
            },
            1e-5,
        );
        // The window (the sequence is longer than it) and the cap change the result.
        let plain = causal_self_attention(
            &inputs[0], &inputs[1], &inputs[2], &cos, &sin, h, kvh, scale, None, None, None,
        );
        let d = max_abs_diff(&fused(&inputs).unwrap(), &plain.unwrap());
        assert!(d > 1e-2, "window has no effect ({d})");
        if softcap.is_some() {
            let uncapped = causal_self_attention(
                &inputs[0],
                &inputs[1],
                &inputs[2],
                &cos,
                &sin,
                h,
                kvh,
                scale,
                None,
                Some(window),
                None,
            );
            let d = max_abs_diff(&fused(&inputs).unwrap(), &uncapped.unwrap());
            assert!(d > 1e-2, "the cap has no effect ({d})");
        }
    }
}

#[test]
fn causal_self_attention_matches_split_rope_attention_merge() {
    // 6 query heads over 2 kv heads (3 per group), 7 positions, head dim 4.
    let (b, t, h, kvh, d) = (2, 7, 6, 2, 4);
    let inputs = [
        randn(&[b, t, h * d], DType::F32, 50),
        randn(&[b, t, kvh * d], DType::F32, 51),
        randn(&[b, t, kvh * d], DType::F32, 52),
    ];
    let theta = randn(&[t, d / 2], DType::F32, 53);
    let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
    let scale = 0.5;
    check_against_composed(
        &inputs,
        |x| {
            causal_self_attention(
                &x[0], &x[1], &x[2], &cos, &sin, h, kvh, scale, None, None, None,
            )
        },
        |x| {
            let split = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2);
            let q = rope(&split(&x[0], h)?.contiguous()?, &cos, &sin)?;
            let k = rope(&split(&x[1], kvh)?.contiguous()?, &cos, &sin)?;
            let v = split(&x[2], kvh)?;
            causal_attention(&q, &k, &v, scale, None, None, None)?
                .transpose(1, 2)?
                .reshape((b, t, h * d))
        },
        1e-5,
    );
}

#[test]
fn rms_norm_with_trainable_scale_matches_composed() {
    let inputs = [
        randn(&[5, 7, 64], DType::F32, 36),
        randn(&[64], DType::F32, 37),
    ];
    check_against_composed(
        &inputs,
        |t| rms_norm(&t[0], &t[1], 1e-5),
        |t| {
            let r = (t[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
            t[0].broadcast_div(&r)?.broadcast_mul(&t[1])
        },
        1e-5,
    );
}

#[test]
fn linear_with_a_trainable_weight_matches_matmul() {
    let inputs = [
        randn(&[3, 40, 24], DType::F32, 38),
        randn(&[33, 24], DType::F32, 39),
    ];
    check_against_composed(
        &inputs,
        |t| linear(&t[0], &t[1]),
        |t| t[0].broadcast_matmul(&t[1].t()?),
        1e-5,
    );
}

/// A trainable output head (full fine-tuning) gets its gradient from the chunked loss: the
/// CPU kernel (f32) and the composed path (f64, as on GPUs) against a full log-softmax; also
/// with Gemma 2's final soft cap, the loss of `cap · tanh(logits / cap)`.
#[test]
fn chunked_cross_entropy_trains_the_head() {
    // Hidden and head scaled so that the logits (up to about 6) reach past the cap of 3.
    let inputs = [
        (randn(&[7, 4], DType::F32, 13) * 2.0).unwrap(),
        (randn(&[11, 4], DType::F32, 14) * 1.5).unwrap(),
    ];
    let labels = Tensor::new(&[3i64, -100, 0, 10, 5, -100, 2], &Device::Cpu).unwrap();
    let reference = |t: &[Tensor], cap: Option<f64>| -> Result<Tensor> {
        let mut logits = t[0].matmul(&t[1].t()?)?;
        if let Some(cap) = cap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let mask = labels.ge(0i64)?.to_dtype(DType::F32)?;
        let picked = logp.gather(&labels.clamp(0i64, 10i64)?.unsqueeze(1)?, 1)?;
        (picked.squeeze(1)? * mask)?.sum_all()?.neg()? / 5.0
    };
    for cap in [None, Some(3.0)] {
        for dtype in [DType::F32, DType::F64] {
            check_against_composed(
                &inputs,
                |t| {
                    let (h, w) = (t[0].to_dtype(dtype)?, t[1].to_dtype(dtype)?);
                    cross_entropy_sum(&h, &w, &labels, 5, 3, cap)?.to_dtype(DType::F32)
                },
                |t| reference(t, cap),
                1e-5,
            );
        }
    }
    let loss = |cap| reference(&inputs, cap).unwrap().to_scalar::<f32>().unwrap();
    let (capped, plain) = (loss(Some(3.0)), loss(None));
    assert!(
        (capped - plain).abs() > 1e-2,
        "the cap has no effect ({capped} vs {plain})"
    );
}

#[test]
fn frozen_mlp_matches_composed() {
    let (gate, up, down) = (
        randn(&[48, 16], DType::F32, 60),
        randn(&[48, 16], DType::F32, 61),
        randn(&[16, 48], DType::F32, 62),
    );
    let inputs = [randn(&[2, 40, 16], DType::F32, 63)];
    for act in ACTIVATIONS {
        check_against_composed(
            &inputs,
            |t| frozen_mlp(&t[0], &gate, &up, &down, act),
            |t| {
                let g = t[0].broadcast_matmul(&gate.t()?)?;
                let u = t[0].broadcast_matmul(&up.t()?)?;
                act_composed(act, &g, &u)?.broadcast_matmul(&down.t()?)
            },
            1e-5,
        );
    }
}
