//! Causal attention softmax fused with the score scale and the causal mask: no mask tensor,
//! no scaled copy of the scores, rows in parallel.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `softmax(scale · scores + causal mask)` over the last dim of `[.., q, k]` scores, where
/// query row `i` sees keys `0..=past + i` (`past = k - q`), and with a sliding `window` only
/// the last `window` of those (Gemma 3's local layers: key `j` is seen when `past + i − j <
/// window`). Kernels for f32 on the CPU and f32/bf16 on CUDA (no window there); other cases
/// use the composed ops.
pub fn causal_softmax(scores: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    causal_softmax_with_sinks(scores, scale, window, None)
}

/// [`causal_softmax`] with gpt-oss's attention sinks: `sinks` `[heads]` holds one logit per
/// head (scores `[.., heads, q, k]`) that joins each row's softmax as one more key, whose
/// probability is then dropped (the row sums to less than 1; its value is 0). The backward
/// is [`causal_softmax`]'s: the sink's column adds nothing to the output.
pub fn causal_softmax_with_sinks(
    scores: &Tensor,
    scale: f64,
    window: Option<usize>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = scores.dims();
    let (q, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    // A window as wide as the keys hides nothing.
    let window = window.filter(|&w| w < k);
    let cpu = matches!(scores.device(), candle_core::Device::Cpu);
    let kernel = crate::has_kernel(scores, crate::Kernel::Softmax)
        && ((window.is_none() && sinks.is_none()) || cpu);
    if let Some(s) = sinks {
        let heads = dims.len().checked_sub(3).map(|h| dims[h]);
        if heads != Some(s.elem_count()) {
            candle_core::bail!(
                "{} attention sinks for scores {dims:?} ([.., heads, q, k])",
                s.elem_count()
            );
        }
    }
    if !kernel {
        let past = k - q;
        let qi = Tensor::arange(0u32, q as u32, scores.device())?.unsqueeze(1)?;
        let kj = Tensor::arange(0u32, k as u32, scores.device())?.unsqueeze(0)?;
        let last = (qi + past as f64)?;
        let mut allowed = kj.broadcast_le(&last)?;
        if let Some(w) = window {
            // j > last − w, written as j + w > last to stay in u32.
            allowed = (allowed * (kj + w as f64)?.broadcast_gt(&last)?)?;
        }
        let neg =
            Tensor::full(f32::NEG_INFINITY, (q, k), scores.device())?.to_dtype(scores.dtype())?;
        let zeros = Tensor::zeros((q, k), scores.dtype(), scores.device())?;
        let bias = allowed.where_cond(&zeros, &neg)?;
        let masked = (scores * scale)?.broadcast_add(&bias)?;
        return softmax_with_sinks(&masked, sinks);
    }
    let sinks = sinks
        .map(|s| {
            s.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        })
        .transpose()?;
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
        q,
        k,
        window,
        sinks,
    })
}

/// The softmax over the last dim of masked scores `[.., heads, q, k]` (composed ops, with
/// their autograd), with gpt-oss's `sinks` `[heads]` as one more column per head, dropped
/// after it (see [`causal_softmax_with_sinks`]).
pub fn softmax_with_sinks(scores: &Tensor, sinks: Option<&Tensor>) -> Result<Tensor> {
    let Some(s) = sinks else {
        return crate::softmax_last_dim(scores);
    };
    let dims = scores.dims();
    let last = dims.len() - 1;
    let mut shape = dims.to_vec();
    shape[last] = 1;
    let column = s
        .to_dtype(scores.dtype())?
        .reshape((s.elem_count(), 1, 1))?
        .broadcast_as(shape)?;
    let all = crate::softmax_last_dim(&Tensor::cat(&[scores, &column], last)?)?;
    all.narrow(last, 0, dims[last])
}

/// Causal attention probabilities of raw scores `s = q·kᵀ` (see [`causal_softmax`]): of
/// `scale · s`, or with Gemma 2's soft cap of `cap · tanh(scale · s / cap)`; with gpt-oss's
/// `sinks` (see [`causal_softmax_with_sinks`]). Returns the
/// probabilities and, with a cap, the tanh values that [`attention_probs_backward`] reads.
pub fn attention_probs(
    scores: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    sinks: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let Some(cap) = softcap else {
        return Ok((
            causal_softmax_with_sinks(scores, scale, window, sinks)?,
            None,
        ));
    };
    // One multiply for the scale and the cap: in bf16, one rounding fewer.
    let tanh = (scores * (scale / cap))?.tanh()?;
    let probs = causal_softmax_with_sinks(&(&tanh * cap)?, 1.0, window, sinks)?;
    Ok((probs, Some(tanh)))
}

/// Gemma 2's soft cap, `cap · tanh(x / cap)`, by candle's ops (their autograd carries the
/// gradient): of the scores where attention is composed, and of the logits.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(soft_cap_parts(x, cap)?.0)
}

/// [`soft_cap`] and the tanh its gradient reads (see [`soft_cap_slope`]).
pub(crate) fn soft_cap_parts(x: &Tensor, cap: f64) -> Result<(Tensor, Tensor)> {
    let tanh = (x / cap)?.tanh()?;
    Ok(((&tanh * cap)?, tanh))
}

/// `scale · d(cap · tanh(x / cap))/dx = scale · (1 − tanh²)` from the tanh values.
pub(crate) fn soft_cap_slope(tanh: &Tensor, scale: f64) -> Result<Tensor> {
    tanh.sqr()?.affine(-scale, scale)
}

/// dL/ds of [`attention_probs`] from its probabilities `y`, tanh values and dL/dy.
pub fn attention_probs_backward(
    y: &Tensor,
    tanh: Option<&Tensor>,
    grad: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    match tanh {
        None => causal_softmax_backward(y, grad, scale),
        // d(cap · tanh(scale · s / cap))/ds = scale · (1 − tanh²).
        Some(t) => causal_softmax_backward(y, grad, 1.0)? * soft_cap_slope(t, scale)?,
    }
}

struct CausalSoftmax {
    scale: f32,
    q: usize,
    k: usize,
    window: Option<usize>,
    /// One logit per head, the heads being the dim before the `q` rows.
    sinks: Option<Vec<f32>>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu_f32(s, l)?;
        let (q, k, scale) = (self.q, self.k, self.scale);
        let past = k - q;
        let out = crate::par_build(x.len(), k, |row, y: &mut [f32]| {
            // Keys `first..end` are seen; the others keep probability 0.
            let end = past + row % q + 1;
            let first = self.window.map_or(0, |w| end.saturating_sub(w));
            let (x, y) = (&x[row * k..][first..end], &mut y[first..end]);
            let sink = self.sinks.as_ref().map(|s| s[(row / q) % s.len()]);
            let max = x
                .iter()
                .fold(sink.unwrap_or(f32::NEG_INFINITY), |m, &v| m.max(v * scale));
            for (yi, &xi) in y.iter_mut().zip(x) {
                *yi = xi * scale - max;
            }
            crate::fast_exp::exp_in_place(y);
            let sum: f32 = y.iter().sum::<f32>() + sink.map_or(0.0, |s| (s - max).exp());
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.sinks.is_some() || self.window.is_some() {
            candle_core::bail!("the CUDA causal softmax has no window or sinks");
        }
        let out = crate::cuda::causal_softmax_fwd(s, l, self.q, self.k, self.scale)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &g,
            &CausalSoftmaxBackward {
                scale: self.scale,
                k: self.k,
            },
        )?))
    }
}

/// Gradient of [`causal_softmax`] with respect to its scores, from its output `y` and the
/// output gradient: `scale · y · (g − Σ g·y)` row by row.
pub fn causal_softmax_backward(y: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    if !crate::has_kernel(y, crate::Kernel::Softmax) {
        let dot = (grad * y)?.sum_keepdim(candle_core::D::Minus1)?;
        return (grad.broadcast_sub(&dot)? * y)? * scale;
    }
    let k = y.dim(candle_core::D::Minus1)?;
    y.contiguous()?.apply_op2_no_bwd(
        &grad.contiguous()?,
        &CausalSoftmaxBackward {
            scale: scale as f32,
            k,
        },
    )
}

struct CausalSoftmaxBackward {
    scale: f32,
    k: usize,
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (crate::cpu_f32(ys, yl)?, crate::cpu_f32(gs, gl)?);
        let mut out = vec![0f32; y.len()];
        let scale = self.scale;
        out.par_chunks_mut(self.k)
            .zip(y.par_chunks(self.k).zip(g.par_chunks(self.k)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(g) {
                    *d = scale * yi * (gi - dot);
                }
            });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::causal_softmax_bwd((ys, yl), (gs, gl), self.k, self.scale)?;
        Ok((out, yl.shape().clone()))
    }
}
