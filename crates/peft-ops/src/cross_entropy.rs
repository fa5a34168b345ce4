//! The CPU path of [`crate::cross_entropy_chunked`]: the output head is packed once per call
//! (bf16 matmuls) and each row's softmax, loss and dL/dlogits are computed in place, in
//! parallel, so a chunk of logits is written once and read twice.

use crate::bf16_gemm::{batched_matmul, bf16_matmul_enabled, with_cpu_f32, PackedB, Weight};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// `hidden · weightᵀ` and `dlogits · weight` for one head.
enum Head {
    /// bf16 panels of `weightᵀ` (logits) and, when training, of `weight` (input gradient).
    Packed {
        logits: PackedB,
        input_grad: Option<PackedB>,
    },
    F32(Tensor),
}

impl Head {
    fn new(weight: &Tensor, need_grad: bool) -> Result<Self> {
        let (vocab, d) = weight.dims2()?;
        if bf16_matmul_enabled() {
            let packed = with_cpu_f32(&weight.contiguous()?, |w| {
                let logits = PackedB::new(w, d, vocab, Weight::Rows);
                let grad = need_grad.then(|| PackedB::new(w, vocab, d, Weight::Cols));
                Ok(logits.map(|l| (l, grad.flatten())))
            })?;
            if let Some((logits, input_grad)) = packed {
                return Ok(Head::Packed { logits, input_grad });
            }
        }
        Ok(Head::F32(weight.clone()))
    }

    /// Logits of `rows` hidden states into `out` (`rows · vocab`).
    fn logits(&self, h: &[f32], rows: usize, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        match self {
            Head::Packed { logits, .. } => {
                let n = rows * logits.n();
                out.reserve(n);
                logits.matmul_into(h, rows, out.spare_capacity_mut());
                // SAFETY: `matmul_into` wrote all rows · vocab values.
                unsafe { out.set_len(n) };
            }
            Head::F32(w) => {
                let d = w.dim(1)?;
                let h = Tensor::from_slice(h, (rows, d), &Device::Cpu)?;
                let l = h.matmul(&w.t()?)?;
                with_cpu_f32(&l, |l| {
                    out.extend_from_slice(l);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// `dlogits · weight` for `rows` rows.
    fn input_grad(&self, dlogits: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self {
            Head::Packed {
                input_grad: Some(g),
                ..
            } => {
                let mut out = Vec::with_capacity(rows * g.n());
                g.matmul_into(dlogits, rows, out.spare_capacity_mut());
                // SAFETY: `matmul_into` wrote all rows · d values.
                unsafe { out.set_len(rows * g.n()) };
                Ok(out)
            }
            Head::Packed { .. } => candle_core::bail!("the head was packed without its gradient"),
            Head::F32(w) => {
                let dl = Tensor::from_slice(dlogits, (rows, w.dim(0)?), &Device::Cpu)?;
                dl.matmul(w)?.flatten_all()?.to_vec1()
            }
        }
    }
}

/// Sum of the token losses of `hidden` `[n, d]` (f32, CPU) under `weight` `[vocab, d]`, and,
/// when `need_grad`, d(loss sum / `denom`)/dhidden `[n, d]`; when `weight_grad`, also
/// d(loss sum / `denom`)/dweight `[vocab, d]` (a trainable head), summed chunk by chunk.
pub(crate) fn cross_entropy_cpu(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &[i64],
    need_grad: bool,
    weight_grad: bool,
    Chunks {
        rows: chunk_rows,
        denom,
        softcap,
    }: Chunks,
) -> Result<HeadLoss> {
    let (n, d) = hidden.dims2()?;
    let vocab = weight.dim(0)?;
    let head = Head::new(weight, need_grad)?;
    let hidden = hidden.contiguous()?;
    let scale = (1.0 / denom) as f32;
    let mut logits = Vec::new();
    // Per chunk, the tanh of each capped logit (Gemma 2's final soft cap), for its gradient.
    let mut tanh = Vec::new();
    let mut row_stats = vec![RowStats::default(); n];
    let mut dhidden = Vec::with_capacity(if need_grad { n * d } else { 0 });
    let mut dweight = weight_grad.then(|| vec![0f32; vocab * d]);
    let chunk_rows = chunk_rows.max(1);
    with_cpu_f32(&hidden, |h| {
        for start in (0..n).step_by(chunk_rows) {
            let rows = chunk_rows.min(n - start);
            let h = &h[start * d..(start + rows) * d];
            head.logits(h, rows, &mut logits)?;
            let grads = need_grad || weight_grad;
            let grad_scale = grads.then_some(scale);
            match softcap {
                None => logits
                    .par_chunks_mut(vocab)
                    .zip(&labels[start..start + rows])
                    .zip(&mut row_stats[start..start + rows])
                    .for_each(|((row, &label), stats)| *stats = row_loss(row, label, grad_scale)),
                Some(cap) => {
                    let cap = cap as f32;
                    tanh.resize(logits.len(), 0.0);
                    logits
                        .par_chunks_mut(vocab)
                        .zip(tanh.par_chunks_mut(vocab))
                        .zip(&labels[start..start + rows])
                        .zip(&mut row_stats[start..start + rows])
                        .for_each(|(((row, tanh), &label), stats)| {
                            *stats = capped_row_loss(row, tanh, cap, label, grad_scale)
                        });
                }
            }
            if need_grad {
                dhidden.extend(head.input_grad(&logits, rows)?);
            }
            if let Some(dw) = &mut dweight {
                // dlogitsᵀ · h: the transposed view is packed as stored, without a copy.
                let dl = Tensor::from_slice(&logits, (rows, vocab), &Device::Cpu)?;
                let hc = Tensor::from_slice(h, (rows, d), &Device::Cpu)?;
                let part = batched_matmul(&dl.t()?, &hc)?;
                with_cpu_f32(&part, |part| {
                    dw.par_chunks_mut(d)
                        .zip(part.par_chunks(d))
                        .for_each(|(acc, p)| acc.iter_mut().zip(p).for_each(|(a, p)| *a += p));
                    Ok(())
                })?;
            }
        }
        Ok(())
    })?;
    Ok(HeadLoss {
        loss_sum: row_stats.iter().map(|r| r.loss).sum(),
        entropy_sum: row_stats.iter().map(|r| r.entropy).sum(),
        top1: row_stats.iter().filter(|r| r.top1).count(),
        dhidden: need_grad.then_some(dhidden),
        dweight,
    })
}

/// How the chunked loss goes over the rows: `rows` at a time, the summed loss divided by
/// `denom`, the logits capped by `softcap` (see [`crate::cross_entropy_sum`]).
pub(crate) struct Chunks {
    pub rows: usize,
    pub denom: f64,
    pub softcap: Option<f64>,
}

/// What [`cross_entropy_cpu`] computes.
pub(crate) struct HeadLoss {
    pub loss_sum: f64,
    /// The entropies of the labelled rows' next-token distributions, summed.
    pub entropy_sum: f64,
    /// The labelled rows whose label is the most likely token (the first of equals).
    pub top1: usize,
    /// d(loss sum / denom)/dhidden `[n, d]`, when asked for.
    pub dhidden: Option<Vec<f32>>,
    /// d(loss sum / denom)/dweight `[vocab, d]`, when asked for.
    pub dweight: Option<Vec<f32>>,
}

/// [`row_loss`] of the logits capped as Gemma 2 caps them, `cap · tanh(l / cap)` (`tanh`: room
/// for the row's tanh values); the gradient, when asked for, is the raw logits'.
fn capped_row_loss(
    row: &mut [f32],
    tanh: &mut [f32],
    cap: f32,
    label: i64,
    grad_scale: Option<f32>,
) -> RowStats {
    for (v, t) in row.iter_mut().zip(tanh.iter_mut()) {
        *t = (*v / cap).tanh();
        *v = cap * *t;
    }
    let stats = row_loss(row, label, grad_scale);
    // d(cap · tanh(l / cap))/dl = 1 − tanh².
    if grad_scale.is_some() {
        row.iter_mut()
            .zip(tanh)
            .for_each(|(d, t)| *d *= 1.0 - *t * *t);
    }
    stats
}

/// One row's loss and what TRL logs beside it (0 and false for a row without a label).
#[derive(Clone, Copy, Default)]
struct RowStats {
    loss: f64,
    /// The entropy of the row's softmax, `ln Σ e^l − Σ p·l`.
    entropy: f64,
    /// Whether the label is the row's first largest logit (argmax's pick, as TRL's `is_top1`).
    top1: bool,
}

/// The loss of one row of logits for `label` (0 for a negative label, which has none), with
/// its entropy and top-1 hit; with `grad_scale`, replaces the row by
/// `grad_scale · (softmax − one_hot(label))` (zeros for a negative label). A label past the
/// vocabulary counts as its last token.
fn row_loss(row: &mut [f32], label: i64, grad_scale: Option<f32>) -> RowStats {
    if label < 0 {
        if grad_scale.is_some() {
            row.fill(0.0);
        }
        return RowStats::default();
    }
    let label = (label as usize).min(row.len() - 1);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let target = row[label] - max;
    // Most rows miss (their label is below the maximum): the scan before the label is rare.
    let top1 = row[label] >= max && row[..label].iter().all(|&v| v < row[label]);
    // Σ e^x and Σ x·e^x of the shifted logits x = l − max.
    let (sum, moment): (f64, f64) = match grad_scale {
        Some(scale) => {
            row.iter_mut().for_each(|v| *v -= max);
            let moment = crate::fast_exp::exp_in_place_moment(row);
            let sum = row.iter().map(|&v| v as f64).sum();
            let k = (scale as f64 / sum) as f32;
            row.iter_mut().for_each(|v| *v *= k);
            row[label] -= scale;
            (sum, moment)
        }
        None => row.iter().fold((0.0, 0.0), |(s, m), &v| {
            let x = v - max;
            let e = x.exp() as f64;
            (s + e, m + e * x as f64)
        }),
    };
    RowStats {
        loss: sum.ln() - target as f64,
        entropy: sum.ln() - moment / sum,
        top1,
    }
}
