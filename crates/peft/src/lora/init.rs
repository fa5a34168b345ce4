//! LoRA initialisations from the base weight, as HF PEFT's `init_lora_weights` "pissa",
//! "pissa_niter_N" and "olora": A and B take the weight's principal part (the top singular
//! triplets, or the first columns of its QR decomposition) and the base keeps the residual
//! `W − s·B·A`, so that the model starts unchanged and training moves the principal part.
//! And "loftq": over a 4-bit base, A and B start as the principal part of the quantization
//! error `W − deq(Q(W))`, so that the quantized model starts closer to the original.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;

/// The `init_lora_weights` values peft-rs takes.
const SUPPORTED: &str =
    r#"true, false, "gaussian", "orthogonal", "pissa", "pissa_niter_N", "olora", "loftq""#;

/// What the base of an adapter saved with some `init_lora_weights` is, for every value HF
/// PEFT 0.21 takes: whatever initialised A and B, the saved ones are the trained ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SavedBase {
    /// The original weights: PEFT's own inits, LoftQ's (for the 4-bit base), EVA's,
    /// orthogonal, MiCA's (A, or B, starts at zero).
    Original,
    /// Weights that gave up the initial `s·B₀·A₀` (PiSSA, OLoRA, CorDA, LoRA-GA) until HF
    /// PEFT's `path_initial_model_for_weight_conversion` converts the adapter.
    Residual,
}

impl SavedBase {
    pub fn of(init: &Value) -> Result<Self> {
        let s = match init {
            Value::Bool(_) => return Ok(Self::Original),
            Value::String(s) => s.as_str(),
            other => bail!("init_lora_weights={other} is not supported ({SUPPORTED})"),
        };
        Ok(match s {
            "gaussian" | "loftq" | "eva" | "orthogonal" | "mica" => Self::Original,
            "olora" | "corda" | "lora_ga" => Self::Residual,
            s if s == "pissa" || s.starts_with("pissa_niter_") => Self::Residual,
            other => bail!("init_lora_weights={other:?} is not an init HF PEFT knows"),
        })
    }
}

/// An initialisation that decomposes the base weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightInit {
    /// PiSSA: the top `r` singular triplets, by a full SVD or, with `niter`, by torch's
    /// randomized `svd_lowrank` with that many subspace iterations.
    Pissa { niter: Option<usize> },
    /// OLoRA: the first `r` columns of Q and rows of R of `W = Q R`.
    Olora,
    /// LoftQ as HF PEFT's `replace_lora_weights_loftq` applies it: the base is quantized as
    /// it would be without LoftQ, and A and B take the top `r` singular triplets of its
    /// quantization error (see [`loftq`]). The adapter is then a plain LoRA for that base.
    Loftq,
}

impl WeightInit {
    /// The decomposing initialisation `init_lora_weights` names; `None` for true, false and
    /// "gaussian"; an error for any other value.
    pub fn parse(init: &Value) -> Result<Option<Self>> {
        let s = match init {
            Value::Bool(_) => return Ok(None),
            Value::String(s) => s.as_str(),
            other => bail!("init_lora_weights={other} is not supported ({SUPPORTED})"),
        };
        Ok(match s {
            "gaussian" | "orthogonal" => None,
            "pissa" => Some(Self::Pissa { niter: None }),
            "olora" => Some(Self::Olora),
            "loftq" => Some(Self::Loftq),
            other => match other.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                Some(Ok(n)) => Some(Self::Pissa { niter: Some(n) }),
                _ => bail!("init_lora_weights={other:?} is not supported ({SUPPORTED})"),
            },
        })
    }

    /// `(A [r, in], B [out, r], residual [out, in])` of `weight` `[out, in]` for rank `r` and
    /// scaling `scaling`, all f32 on the CPU; `seed` draws the randomized SVD's test matrix.
    /// LoftQ decomposes the quantization error instead: [`loftq`].
    pub fn decompose(
        self,
        weight: &Tensor,
        r: usize,
        scaling: f64,
        seed: u64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let w = to_mat(weight)?;
        let (out_f, in_f) = (w.nrows(), w.ncols());
        if r > out_f.min(in_f) {
            let name = match self {
                Self::Pissa { .. } => "pissa",
                Self::Olora => "olora",
                Self::Loftq => "loftq",
            };
            bail!(
                "init_lora_weights {name} needs r <= min(in, out) = {}, got r = {r}",
                out_f.min(in_f)
            );
        }
        let (a, b) = match self {
            Self::Pissa { niter } => {
                let triplets = match niter {
                    None => top_svd(&w, r)?,
                    Some(n) => svd_lowrank(&w, r, n, seed)?,
                };
                split_scaled(triplets, scaling)
            }
            Self::Olora => {
                let qr = w.qr();
                let q = qr.compute_thin_Q();
                let rr = qr.thin_R();
                let a = Mat::from_fn(r, in_f, |i, j| rr[(i, j)]);
                let b = Mat::from_fn(out_f, r, |i, j| q[(i, j)]);
                (a, b)
            }
            Self::Loftq => bail!("init_lora_weights loftq decomposes the quantization error of the weight, not the weight"),
        };
        let residual = &w - (&b * &a) * faer::Scale(scaling);
        Ok((to_tensor(&a)?, to_tensor(&b)?, to_tensor(&residual)?))
    }
}

/// LoftQ's `(A [r, in], B [out, r])` for `weight` `[out, in]`, whose quantized base weight
/// dequantizes to `dequantized`: the top `r` singular triplets of the error `W − deq(Q(W))`,
/// split so that `scaling·B·A` is that error's best rank-`r` approximation (f32, on the CPU).
/// Past the weight's smaller side the rank has nothing left to take: those rows of A and
/// columns of B are zero.
///
/// HF PEFT's LoftQ sets `B·A` to it, leaving the scaling out (huggingface/peft#1982), so that
/// its adapter starts at `scaling` times the correction; the two agree where `lora_alpha = r`.
pub fn loftq(
    weight: &Tensor,
    dequantized: &Tensor,
    r: usize,
    scaling: f64,
) -> Result<(Tensor, Tensor)> {
    let error = to_mat(&(weight.to_dtype(DType::F64)? - dequantized.to_dtype(DType::F64)?)?)?;
    let (out_f, in_f) = (error.nrows(), error.ncols());
    let (a, b) = split_scaled(top_svd(&error, r.min(out_f).min(in_f))?, scaling);
    let a = Mat::from_fn(r, in_f, |i, j| if i < a.nrows() { a[(i, j)] } else { 0.0 });
    let b = Mat::from_fn(out_f, r, |i, j| if j < b.ncols() { b[(i, j)] } else { 0.0 });
    Ok((to_tensor(&a)?, to_tensor(&b)?))
}

/// HF PEFT's "orthogonal" init (`(A [r, in], B [out, r])`, f32 on the CPU): the odd and even
/// rows of a random orthogonal `r × r` matrix span complementary halves of the rank, A is
/// Gaussian in the first and B in the second (each divided by 10), so that `B·A = 0` while
/// neither is zero and both train from the first step. `r` must be even.
pub fn orthogonal(
    r: usize,
    in_f: usize,
    out_f: usize,
    rng: &mut impl rand::Rng,
) -> Result<(Tensor, Tensor)> {
    if !r.is_multiple_of(2) {
        bail!("init_lora_weights \"orthogonal\" needs an even rank, got r={r}");
    }
    let mut normal =
        |rows, cols| Mat::from_fn(rows, cols, |_, _| -> f64 { StandardNormal.sample(rng) });
    let q = normal(r, r).qr().compute_Q();
    let half = r / 2;
    let q_odd = Mat::from_fn(half, r, |i, j| q[(2 * i, j)]);
    let q_even = Mat::from_fn(half, r, |i, j| q[(2 * i + 1, j)]);
    let a = (normal(in_f, half) * &q_odd).transpose() * faer::Scale(0.1);
    let b = normal(half, out_f).transpose() * &q_even * faer::Scale(0.1);
    Ok((to_tensor(&a)?, to_tensor(&b)?))
}

/// `(A, B)` of singular triplets `(U, S, V)`: `A = √(S/s) Vᵀ`, `B = U √(S/s)`, so that
/// `s·B·A = U S Vᵀ`.
fn split_scaled((u, s, v): (Mat<f64>, Vec<f64>, Mat<f64>), scaling: f64) -> (Mat<f64>, Mat<f64>) {
    let root: Vec<f64> = s.iter().map(|x| (x / scaling).sqrt()).collect();
    let a = Mat::from_fn(s.len(), v.nrows(), |i, j| root[i] * v[(j, i)]);
    let b = Mat::from_fn(u.nrows(), s.len(), |i, j| u[(i, j)] * root[j]);
    (a, b)
}

fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let rows: Vec<Vec<f64>> = t.to_dtype(DType::F64)?.to_vec2()?;
    let cols = rows.first().map_or(0, Vec::len);
    Ok(Mat::from_fn(rows.len(), cols, |i, j| rows[i][j]))
}

fn to_tensor(m: &Mat<f64>) -> Result<Tensor> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let values: Vec<f32> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| m[(i, j)] as f32))
        .collect();
    Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
}

/// The top `r` singular triplets `(U [m, r], S, V [n, r])` of a full thin SVD.
fn top_svd(w: &Mat<f64>, r: usize) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let svd = w
        .thin_svd()
        .map_err(|e| anyhow::anyhow!("SVD did not converge: {e:?}"))?;
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    Ok((
        u.subcols(0, r).to_owned(),
        (0..r).map(|i| s[i]).collect(),
        v.subcols(0, r).to_owned(),
    ))
}

/// torch's `svd_lowrank(w, q=r, niter)` (Halko et al.): an orthonormal basis of `w` times a
/// Gaussian test matrix, refined by `niter` subspace iterations, then the SVD of the projection.
fn svd_lowrank(
    w: &Mat<f64>,
    r: usize,
    niter: usize,
    seed: u64,
) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    // torch works on the wide or tall side alike by transposing a wide matrix.
    if w.nrows() < w.ncols() {
        let (u, s, v) = svd_lowrank(&w.transpose().to_owned(), r, niter, seed)?;
        return Ok((v, s, u));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let test = Mat::from_fn(w.ncols(), r, |_, _| -> f64 {
        StandardNormal.sample(&mut rng)
    });
    let basis = |x: Mat<f64>| x.qr().compute_thin_Q();
    let mut q = basis(w * &test);
    for _ in 0..niter {
        q = basis(w.transpose() * &q);
        q = basis(w * &q);
    }
    let projected = q.transpose() * w;
    let (u, s, v) = top_svd(&projected, r)?;
    Ok((&q * &u, s, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_models::testing::max_abs_diff;

    fn weight(out_f: usize, in_f: usize) -> Tensor {
        peft_models::testing::SeededNormal::new(4)
            .tensor(&[out_f, in_f], 1.0, &Device::Cpu)
            .unwrap()
    }

    /// Each decomposition leaves the weight unchanged (residual + s·B·A = W), and PiSSA's
    /// s·B·A is the best rank-r approximation: its residual's norm is the discarded singular
    /// values'. OLoRA's A is upper triangular and B orthonormal.
    #[test]
    fn decompositions_keep_the_weight() {
        let scaling = 2.0;
        for (out_f, in_f) in [(12, 8), (8, 12)] {
            let w = weight(out_f, in_f);
            let singular = top_svd(&to_mat(&w).unwrap(), 8).unwrap().1;
            for init in [
                WeightInit::Pissa { niter: None },
                WeightInit::Pissa { niter: Some(4) },
                WeightInit::Olora,
            ] {
                let (a, b, residual) = init.decompose(&w, 3, scaling, 1).unwrap();
                assert_eq!((a.dims(), b.dims()), (&[3, in_f][..], &[out_f, 3][..]));
                let rebuilt = (&residual + (b.matmul(&a).unwrap() * scaling).unwrap()).unwrap();
                assert!(max_abs_diff(&rebuilt, &w) < 1e-5, "{init:?}");
                let norm = residual.sqr().unwrap().sum_all().unwrap();
                let norm = norm.to_scalar::<f32>().unwrap().sqrt() as f64;
                match init {
                    WeightInit::Pissa { niter } => {
                        let want = singular[3..].iter().map(|s| s * s).sum::<f64>().sqrt();
                        // The randomized SVD finds nearly the same subspace.
                        let tol = if niter.is_some() { 0.05 * want } else { 1e-4 };
                        assert!((norm - want).abs() < tol, "{init:?}: {norm} vs {want}");
                    }
                    WeightInit::Olora => {
                        let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
                        assert!((0..3).all(|i| (0..i).all(|j| a[i][j].abs() < 1e-6)));
                        let gram = b.t().unwrap().matmul(&b).unwrap();
                        let eye = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
                        assert!(max_abs_diff(&gram, &eye) < 1e-5);
                    }
                    WeightInit::Loftq => unreachable!("not among the inits above"),
                }
            }
        }
    }

    /// LoftQ's s·B·A is the best rank-r approximation of the quantization error (PiSSA's
    /// principal part of it), so the corrected weight's error is the discarded part alone.
    #[test]
    fn loftq_takes_the_principal_part_of_the_quantization_error() {
        let (scaling, r) = (2.0, 3);
        let w = weight(12, 8);
        let noise = peft_models::testing::SeededNormal::new(9)
            .tensor(&[12, 8], 0.1, &Device::Cpu)
            .unwrap();
        let dequantized = (&w + &noise).unwrap();
        let (a, b) = loftq(&w, &dequantized, r, scaling).unwrap();
        let correction = (b.matmul(&a).unwrap() * scaling).unwrap();
        let error = (&w - &dequantized).unwrap();
        let (ap, bp, _) = WeightInit::Pissa { niter: None }
            .decompose(&error, r, scaling, 0)
            .unwrap();
        let principal = (bp.matmul(&ap).unwrap() * scaling).unwrap();
        assert!(max_abs_diff(&correction, &principal) < 1e-5);
        let singular = top_svd(&to_mat(&error).unwrap(), 8).unwrap().1;
        let left = (&error - &correction)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let left = left.to_scalar::<f32>().unwrap().sqrt() as f64;
        let want = singular[r..].iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((left - want).abs() < 1e-5, "{left} vs {want}");
        assert!(left < 0.9 * singular.iter().map(|s| s * s).sum::<f64>().sqrt());
    }

    #[test]
    fn orthogonal_pairs_start_at_zero_with_neither_zero() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (a, b) = orthogonal(8, 40, 24, &mut rng).unwrap();
        assert_eq!(
            (a.dims(), b.dims()),
            ([8, 40].as_slice(), [24, 8].as_slice())
        );
        let product = b.matmul(&a).unwrap().abs().unwrap().max_all().unwrap();
        assert!(product.to_scalar::<f32>().unwrap() < 1e-6);
        for m in [&a, &b] {
            // Gaussian entries over half of an orthogonal basis, divided by 10: variance
            // about (1/2)/100.
            let std = m
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            assert!((0.05..0.09).contains(&std), "{std}");
        }
        assert!(orthogonal(7, 40, 24, &mut rng).is_err());
    }

    #[test]
    fn parses_hf_names() {
        let parse = |v: Value| WeightInit::parse(&v).unwrap();
        assert_eq!(parse(Value::Bool(true)), None);
        assert_eq!(parse("gaussian".into()), None);
        assert_eq!(
            parse("pissa".into()),
            Some(WeightInit::Pissa { niter: None })
        );
        assert_eq!(
            parse("pissa_niter_16".into()),
            Some(WeightInit::Pissa { niter: Some(16) })
        );
        assert_eq!(parse("olora".into()), Some(WeightInit::Olora));
        assert_eq!(parse("loftq".into()), Some(WeightInit::Loftq));
        assert_eq!(parse("orthogonal".into()), None);
        let err = WeightInit::parse(&"eva".into()).unwrap_err().to_string();
        assert!(err.contains("\"eva\" is not supported"), "{err}");
    }
}
