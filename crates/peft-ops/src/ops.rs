use crate::cross_entropy::Chunks;
use crate::grad::{with_grad3_acc, Accumulated};
#[cfg(feature = "cuda")]
use crate::grad::{GpuForward, GpuIn};
use crate::tape::cast;
use crate::{batched_matmul, cpu_f32, frozen_matmul, with_grad, with_grad3, Grads3, Kernel, Value};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Label value that contributes no loss (PyTorch's and TRL's convention).
pub const IGNORE_INDEX: i64 = -100;

/// `x · wᵀ` for a frozen weight `w` of shape `[out, in]`: backward returns dL/dx only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear(x, &w.detach())
}

/// `x · wᵀ` for `w` `[out, in]`, frozen or trainable (full fine-tuning, `modules_to_save`):
/// the forward and dL/dx use [`frozen_matmul`] (bf16 when enabled), and dL/dw = `gradᵀ · x`
/// over all rows is computed only when `w` trains.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = w.dims2()?;
    let mut out_shape = x.dims().to_vec();
    let rows = x.elem_count() / in_features;
    *out_shape.last_mut().expect("x has at least one dim") = out_features;
    let x2 = x.detach().reshape((rows, in_features))?;
    let wd = w.detach();
    let y = Value::linear(&x2, &wd, out_shape)?;
    let x_tracks = x.track_op();
    // The input is kept for the backward only when the weight needs its gradient.
    let x_saved = w.track_op().then_some(x2);
    let x_shape = x.shape().clone();
    // Third argument repeated: with_grad3 serves two inputs as well. On a layer tape, dL/dx is
    // added to the gradient gathered for x (q, k and v read one input).
    with_grad3_acc((x, w, w), y, move |grad, gathered| -> Result<Grads3> {
        let g = grad.reshape((rows, out_features))?;
        let d_x = if x_tracks {
            Some(add_input_grad(gathered, &g, &wd, &x_shape)?)
        } else {
            None
        };
        let d_w = match &x_saved {
            Some(x2) => Some(batched_matmul(&g.t()?, x2)?.to_dtype(wd.dtype())?),
            None => None,
        };
        Ok((d_x, d_w, None))
    })
}

/// `gathered + g · w`, shaped `x_shape`: the input gradient of `x·wᵀ` (`g` `[rows, out]`, `w`
/// `[out, in]`) added to the one gathered for x. On GPUs an owned bf16 sum takes the product
/// in place (cuBLAS with beta = 1): no `[rows, in]` temporary and no separate add. The result
/// is held by no one else (see [`Accumulated`]).
pub(crate) fn add_input_grad(
    gathered: Option<Accumulated>,
    g: &Tensor,
    w: &Tensor,
    x_shape: &Shape,
) -> Result<Tensor> {
    let Some(acc) = gathered else {
        return frozen_matmul(g, w, false)?.reshape(x_shape);
    };
    #[cfg(feature = "cuda")]
    if acc.owned
        && crate::cublas::takes_products_in_place(&acc.grad)
        && [g, w]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && t.is_contiguous())
    {
        crate::cublas::add_product_into(&acc.grad, (g, false), (w, false), 1.0)?;
        return Ok(acc.grad);
    }
    acc.plus(&frozen_matmul(g, w, false)?.reshape(x_shape)?)
}

/// `a + b` outside any graph: on GPUs by our kernel where [`add_value`] serves, by candle's
/// add otherwise.
pub(crate) fn add_same(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match add_value(a, b)? {
        Some(value) => value.into_tensor(),
        None => a + b,
    }
}

/// `a + b` as the value of the op that carries its gradient, computed there by our kernel
/// (kernel group `add`: contiguous f32 or bf16 tensors of one shape on a GPU, eight elements
/// a thread where candle's binary kernel takes one through its strided indexing); `None`
/// where candle's add is to compute it.
pub(crate) fn add_value(a: &Tensor, b: &Tensor) -> Result<Option<Value>> {
    #[cfg(feature = "cuda")]
    if a.device().is_cuda()
        && crate::has_kernel(a, Kernel::Add)
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
        && a.is_contiguous()
        && b.is_contiguous()
    {
        let f = |a: GpuIn, b: GpuIn| Ok((crate::cuda::add_same(a, b)?, a.1.shape().clone()));
        return Ok(Some(Value::ByTheOp(Box::new(crate::grad::Op2Output {
            op: GpuForward { name: "add", f },
            a: a.detach(),
            b: b.detach(),
        }))));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (a, b);
    Ok(None)
}

/// The rows of `weight` `[vocab, d]` at `ids` `[n]` (u32): an embedding layer. A trained
/// weight's gradient sums each token's rows in f32 (f64 weights: f64), in position order, and
/// is rounded once to the weight's dtype (on GPUs by our kernels: candle's backward added
/// position by position in the weight's dtype, one thread a column).
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let rows = weight.detach().index_select(ids, 0)?;
    if !weight.track_op() {
        return Ok(rows);
    }
    let (vocab, d) = weight.dims2()?;
    let ids = ids.to_dtype(DType::U32)?.contiguous()?;
    with_grad(weight, rows, move |w, _, grad| {
        let grad = grad.reshape(((), d))?.to_dtype(w.dtype())?.contiguous()?;
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() && matches!(grad.dtype(), DType::F32 | DType::BF16) {
            return crate::cuda::embedding_grad(&ids, &grad, vocab);
        }
        // Summed in f32 at least (f64 weights in f64).
        let sum_dtype = match w.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        Tensor::zeros((vocab, d), sum_dtype, grad.device())?
            .index_add(&ids, &grad.to_dtype(sum_dtype)?, 0)?
            .to_dtype(w.dtype())
    })
}

/// RMSNorm over the last dim with scale `w` (Llama's `x / rms(x) * w`); `w` gets its gradient
/// when it is trainable (full fine-tuning).
///
/// With f32 norm weights on lower-precision activations (k-bit training), the norm computes in
/// f32 and casts back, as transformers' `LlamaRMSNorm` computes in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if w.dtype() != x.dtype() {
        return cast(&rms_norm(&cast(x, w.dtype())?, w, eps)?, x.dtype());
    }
    let y = rms_norm_output(&x.detach().contiguous()?, &w.detach(), eps as f32)?;
    let (x_tracks, w_tracks) = (x.track_op(), w.track_op());
    let (xd, wd) = (x.detach(), w.detach());
    // Third argument repeated: with_grad3 serves two inputs as well. On a layer tape, the
    // gradient the residual stream gathered for x is added by the backward kernel.
    with_grad3_acc((x, w, w), y, move |grad, gathered| -> Result<Grads3> {
        let d_x = match x_tracks {
            true => Some(rms_norm_input_grad(&xd, &wd, grad, gathered, eps)?),
            false => None,
        };
        let d_w = match w_tracks {
            true => Some(rms_norm_weight_grad(&xd, &wd, grad, eps)?),
            false => None,
        };
        Ok((d_x, d_w, None))
    })
}

/// dL/dw of [`rms_norm`] (a trained scale): Σ over rows of dL/dy · x / rms(x), in w's dtype.
fn rms_norm_weight_grad(x: &Tensor, w: &Tensor, grad: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && crate::has_kernel(x, Kernel::RmsNorm)
        && w.elem_count() <= crate::cuda::NORM_DW_MAX
    {
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        let dw = crate::cuda::rms_norm_dw(&x.contiguous()?, &g, eps as f32)?;
        return dw.to_dtype(w.dtype());
    }
    let x32 = x.to_dtype(DType::F32)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let hidden = w.elem_count();
    let dw = (grad.to_dtype(DType::F32)? * x32.broadcast_mul(&r)?)?
        .reshape(((), hidden))?
        .sum(0)?;
    dw.to_dtype(w.dtype())
}

/// The output of [`rms_norm`]: on GPUs computed by its with_grad op, by our kernel (the
/// kernel group `rms_norm`), into the op's own output.
fn rms_norm_output(x: &Tensor, w: &Tensor, eps: f32) -> Result<Value> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::has_kernel(x, Kernel::RmsNorm) {
        let f = move |x: GpuIn, w: GpuIn| {
            Ok((crate::cuda::rms_norm_fwd(x, w, eps)?, x.1.shape().clone()))
        };
        return Ok(Value::ByTheOp(Box::new(crate::grad::Op2Output {
            op: GpuForward {
                name: "rms-norm",
                f,
            },
            a: x.clone(),
            b: w.contiguous()?,
        })));
    }
    Ok(Value::Computed(candle_nn::ops::rms_norm(x, w, eps)?))
}

/// dL/dx of [`rms_norm`].
fn rms_norm_input_grad(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    gathered: Option<Accumulated>,
    eps: f64,
) -> Result<Tensor> {
    let dt = x.dtype();
    let kernel_adds = |g: &Accumulated| g.grad.dtype() == dt && g.grad.shape() == x.shape();
    if crate::has_kernel(x, Kernel::RmsNorm) && gathered.as_ref().is_none_or(kernel_adds) {
        let res = gathered.map(|g| g.grad.contiguous()).transpose()?;
        return x.contiguous()?.apply_op3_no_bwd(
            &w.to_dtype(dt)?.contiguous()?,
            &grad.to_dtype(dt)?.contiguous()?,
            &RmsNormBackward {
                eps: eps as f32,
                res,
            },
        );
    }
    Accumulated::sum(gathered, rms_norm_input_grad_composed(x, w, grad, eps)?)
}

fn rms_norm_input_grad_composed(x: &Tensor, w: &Tensor, grad: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let gw = grad
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let xhat = x32.broadcast_mul(&r)?;
    let dot = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
    (gw - xhat.broadcast_mul(&dot)?)?
        .broadcast_mul(&r)?
        .to_dtype(x.dtype())
}

/// dL/dx of [`rms_norm`] from `(x, w, dL/dy)` in one kernel (CPU and CUDA), plus `res` (a
/// contiguous tensor of x's shape and dtype) when given.
struct RmsNormBackward {
    eps: f32,
    res: Option<Tensor>,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (cpu_f32(x, xl)?, cpu_f32(w, wl)?, cpu_f32(g, gl)?);
        let d = w.len();
        let mut dx = match &self.res {
            Some(res) => {
                let (s, l) = res.storage_and_layout();
                match &*s {
                    candle_core::Storage::Cpu(s) => cpu_f32(s, l)?.to_vec(),
                    _ => candle_core::bail!("rms_norm backward: the residual is not on the cpu"),
                }
            }
            None => vec![0f32; x.len()],
        };
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (x, g))| {
                let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let r = (1.0 / (ms + self.eps as f64).sqrt()) as f32;
                let dot = x
                    .iter()
                    .zip(g.iter().zip(w))
                    .map(|(&x, (&g, &w))| (g * w) as f64 * (x * r) as f64)
                    .sum::<f64>()
                    / d as f64;
                let dot = dot as f32;
                for i in 0..d {
                    dx[i] += (g[i] * w[i] - x[i] * r * dot) * r;
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let res = self.res.as_ref().map(|r| r.storage_and_layout());
        let res = match &res {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cuda(s) => Some((s, *l)),
                _ => candle_core::bail!("rms_norm backward: the residual is not on the gpu"),
            },
            None => None,
        };
        let out = crate::cuda::rms_norm_bwd((x, xl), (w, wl), (g, gl), res, self.eps)?;
        Ok((out, xl.shape().clone()))
    }
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    with_grad(x, y, |_, y, grad| {
        let y = y.detach();
        let dot = (grad * &y)?.sum_keepdim(D::Minus1)?;
        grad.broadcast_sub(&dot)?.mul(&y)
    })
}

/// Rotary position embedding, HF "rotate_half" layout. `x`: [batch, heads, seq, head_dim],
/// `cos`/`sin`: [seq, head_dim / 2] (cast to `x`'s dtype). The backward is the inverse
/// rotation.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, &cos, &sin)?;
    let neg_sin = sin.neg()?;
    with_grad(x, y, move |_, _, grad| {
        candle_nn::rotary_emb::rope(&grad.contiguous()?, &cos, &neg_sin)
    })
}

/// Mean token cross-entropy of `hidden · weightᵀ` against `labels`, never materialising more
/// than `chunk_rows` rows of logits. `hidden`: [n, d], `weight`: [vocab, d] (frozen, or
/// trainable: full fine-tuning, `modules_to_save`), `labels`: [n] i64 with [`IGNORE_INDEX`]
/// for positions without loss.
///
/// The gradients (dL/dhidden, and dL/dweight summed over chunks) are computed chunk by chunk
/// in the forward, while each chunk's logits exist, and scaled by the incoming gradient in the
/// backward, so the logits are never recomputed.
/// Returns `(mean_loss, n_valid)`; the loss is 0 when no label counts.
pub fn cross_entropy_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    let valid = labels.to_dtype(DType::I64)?.ge(0i64)?;
    let n_valid = valid.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let loss = cross_entropy_sum(hidden, weight, labels, n_valid.max(1), chunk_rows, None)?;
    Ok((loss, n_valid))
}

/// [`cross_entropy_chunked`]'s summed token loss divided by `denom`, which the caller knows
/// (the trainer: the labelled tokens of an accumulation group). Counting the labels here would
/// read a value back from a GPU and stall the host until the forward pass has run. A
/// `softcap` caps the logits first, `cap · tanh(logits / cap)` (Gemma 2's final soft cap).
pub fn cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    denom: usize,
    chunk_rows: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    Ok(cross_entropy_sum_stats(hidden, weight, labels, denom, chunk_rows, softcap)?.0)
}

/// What TRL's SFT trainer logs beside the loss, over the labelled rows: the summed entropy of
/// the next-token distributions (its `entropy` is the mean) and the number of rows whose label
/// is the most likely token, the first of equals as argmax picks (`mean_token_accuracy`).
/// f32 scalars on the loss's device: reading them is left to the caller, once per step.
pub struct TokenStats {
    pub entropy_sum: Tensor,
    pub top1: Tensor,
}

/// [`cross_entropy_sum`] and the [`TokenStats`] of the same logits (capped ones with a
/// `softcap`), which cost no further pass over them.
pub fn cross_entropy_sum_stats(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    denom: usize,
    chunk_rows: usize,
    softcap: Option<f64>,
) -> Result<(Tensor, TokenStats)> {
    hidden.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    let valid = labels.ge(0i64)?;
    let denom = denom.max(1) as f64;
    let need_grad = hidden.track_op();
    let weight_grad = weight.track_op();
    let dev = hidden.device();
    let chunks = Chunks {
        rows: chunk_rows,
        denom,
        softcap,
    };
    let (loss, stats, dhidden, dweight) = if crate::has_kernel(hidden, Kernel::Loss)
        && crate::has_kernel(weight, Kernel::Loss)
        && dev.is_cpu()
    {
        let labels: Vec<i64> = labels.to_vec1()?;
        let crate::cross_entropy::HeadLoss {
            loss_sum,
            entropy_sum,
            top1,
            dhidden: dh,
            dweight: dw,
        } = crate::cross_entropy::cross_entropy_cpu(
            &hidden.detach(),
            &weight.detach(),
            &labels,
            need_grad,
            weight_grad,
            chunks,
        )?;
        let loss = Tensor::new((loss_sum / denom) as f32, dev)?;
        let stats = TokenStats {
            entropy_sum: Tensor::new(entropy_sum as f32, dev)?,
            top1: Tensor::new(top1 as f32, dev)?,
        };
        let dh = dh
            .map(|dh| Tensor::from_vec(dh, hidden.shape(), dev))
            .transpose()?;
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, weight.shape(), dev))
            .transpose()?;
        (loss, stats, dh, dw)
    } else {
        cross_entropy_composed(hidden, weight, &labels, &valid, chunks)?
    };
    if !(need_grad || weight_grad) {
        return Ok((loss, stats));
    }
    // Third argument repeated: with_grad3 serves two inputs as well.
    let loss = with_grad3(
        (hidden, weight, weight),
        loss,
        move |_, grad| -> Result<Grads3> {
            let scaled = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                t.as_ref()
                    .map(|t| t.broadcast_mul(&grad.to_dtype(t.dtype())?))
                    .transpose()
            };
            Ok((scaled(&dhidden)?, scaled(&dweight)?, None))
        },
    )?;
    Ok((loss, stats))
}

/// `acc + dlogitsᵀ · h` in f32 (a trainable head's gradient, summed over chunks of rows). On
/// GPUs (bf16 chunks) cuBLAS adds each chunk's product into the f32 sum with beta = 1, where a
/// product, its f32 copy and an add each passed over the `[vocab, d]` sum.
fn add_weight_grad(acc: Option<Tensor>, dlogits: &Tensor, h: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if dlogits.device().is_cuda()
        && [dlogits, h]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && t.is_contiguous())
    {
        // The sum is the first chunk's new f32 product: it takes the others in place.
        return match acc {
            None => crate::cublas::matmul((dlogits, true), (h, false), 1.0, DType::F32),
            Some(acc) => {
                crate::cublas::add_product_into(&acc, (dlogits, true), (h, false), 1.0)?;
                Ok(acc)
            }
        };
    }
    let part = dlogits.t()?.matmul(h)?.to_dtype(DType::F32)?;
    match acc {
        Some(acc) => acc + part,
        None => Ok(part),
    }
}

/// Per-row losses, entropies and top-1 hits (0 where the label does not count) and, when
/// `grad`, the logits' gradient scaled by `1 / denom`, by one CUDA kernel (f32 or bf16
/// logits); `None` elsewhere.
fn fused_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    denom: f64,
    grad: bool,
) -> Result<Option<RowsLoss>> {
    #[cfg(feature = "cuda")]
    if crate::has_kernel(logits, Kernel::Loss) && logits.device().is_cuda() {
        let logits = logits.contiguous()?;
        let labels = labels.contiguous()?;
        return crate::cuda::cross_entropy_rows(&logits, &labels, (1.0 / denom) as f32, grad)
            .map(Some);
    }
    let _ = (logits, labels, denom, grad);
    Ok(None)
}

/// One chunk's rows under the loss: [`fused_cross_entropy`]'s values.
pub(crate) struct RowsLoss {
    pub loss: Tensor,
    pub entropy: Tensor,
    pub top1: Tensor,
    pub dlogits: Option<Tensor>,
}

/// The loss rows of f32 `logits` with candle ops: loss, entropy and top-1 hit per row (0
/// where `mask` is), and when `grad` the logits' gradient scaled by `1 / denom`.
fn composed_rows(
    logits: &Tensor,
    lab: &Tensor,
    mask: &Tensor,
    denom: f64,
    grad: bool,
) -> Result<RowsLoss> {
    let (_, vocab) = logits.dims2()?;
    let vocab_ids = Tensor::arange(0i64, vocab as i64, logits.device())?.unsqueeze(0)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum_exp = exp.sum_keepdim(D::Minus1)?;
    let safe_lab = lab.clamp(0i64, vocab as i64 - 1)?.unsqueeze(1)?;
    let target = shifted.gather(&safe_lab, 1)?;
    let log_sum = sum_exp.log()?;
    let loss = ((&log_sum - &target)?.squeeze(1)? * mask)?;
    // ln Σ e^x − Σ p·x of the shifted logits.
    let mean_x = ((&exp * &shifted)?.sum_keepdim(D::Minus1)? / &sum_exp)?;
    let entropy = ((log_sum - mean_x)?.squeeze(1)? * mask)?;
    // The label is argmax's pick: a maximum (shifted to 0), above every logit before it.
    let before = vocab_ids.broadcast_lt(&safe_lab)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, shifted.shape(), shifted.device())?;
    let max_before = before
        .where_cond(&shifted, &neg_inf)?
        .max_keepdim(D::Minus1)?;
    let top1 =
        (target.ge(0f64)?.to_dtype(DType::F32)? * target.gt(&max_before)?.to_dtype(DType::F32)?)?;
    let top1 = (top1.squeeze(1)? * mask)?;
    let dlogits = if grad {
        let probs = exp.broadcast_div(&sum_exp)?;
        let one_hot = vocab_ids.broadcast_eq(&safe_lab)?.to_dtype(DType::F32)?;
        Some((probs - one_hot)?.broadcast_mul(&(mask.unsqueeze(1)? / denom)?)?)
    } else {
        None
    };
    Ok(RowsLoss {
        loss,
        entropy,
        top1,
        dlogits,
    })
}

/// [`cross_entropy_chunked`] with candle ops (GPUs, other dtypes): the mean loss, its
/// [`TokenStats`] and the gradients of the inputs that track them.
fn cross_entropy_composed(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    valid: &Tensor,
    Chunks {
        rows: chunk_rows,
        denom,
        softcap,
    }: Chunks,
) -> Result<(Tensor, TokenStats, Option<Tensor>, Option<Tensor>)> {
    let (n, _) = hidden.dims2()?;
    let (need_grad, weight_grad) = (hidden.track_op(), weight.track_op());
    let dev = hidden.device();
    let weight = weight.detach();
    // Logits come from a matmul in the weight's dtype (bf16 on GPUs, as PyTorch does) and are
    // upcast per chunk: a full f32 copy of a 128k-vocab head would cost GBs every step.
    let mut loss_sum = Tensor::zeros((), DType::F32, dev)?;
    let mut entropy_sum = loss_sum.clone();
    let mut top1_sum = loss_sum.clone();
    let mut grads = Vec::new();
    let mut dweight: Option<Tensor> = None;
    let hidden_d = hidden.detach();
    for start in (0..n).step_by(chunk_rows.max(1)) {
        let len = chunk_rows.min(n - start);
        let h = hidden_d.narrow(0, start, len)?.to_dtype(weight.dtype())?;
        let lab = labels.narrow(0, start, len)?;
        let logits = frozen_matmul(&h, &weight, true)?;
        // Capped logits in f32, and their tanh for the gradient.
        let (logits, tanh) = match softcap {
            None => (logits, None),
            Some(cap) => {
                let (capped, tanh) =
                    crate::softmax::soft_cap_parts(&logits.to_dtype(DType::F32)?, cap)?;
                (capped, Some(tanh))
            }
        };
        let want_grad = need_grad || weight_grad;
        let rows = match fused_cross_entropy(&logits, &lab, denom, want_grad)? {
            Some(fused) => fused,
            None => {
                let mask = valid.narrow(0, start, len)?.to_dtype(DType::F32)?;
                let mut rows =
                    composed_rows(&logits.to_dtype(DType::F32)?, &lab, &mask, denom, want_grad)?;
                rows.dlogits = rows
                    .dlogits
                    .map(|d| d.to_dtype(weight.dtype()))
                    .transpose()?;
                rows
            }
        };
        loss_sum = (loss_sum + rows.loss.sum_all()?)?;
        entropy_sum = (entropy_sum + rows.entropy.sum_all()?)?;
        top1_sum = (top1_sum + rows.top1.sum_all()?)?;
        let dlogits = rows.dlogits;
        let dlogits = match (dlogits, &tanh) {
            // d(cap · tanh(l / cap))/dl = 1 − tanh².
            (Some(d), Some(t)) => Some(
                (d.to_dtype(DType::F32)? * crate::softmax::soft_cap_slope(t, 1.0)?)?
                    .to_dtype(weight.dtype())?,
            ),
            (d, _) => d,
        };
        if let Some(dlogits) = dlogits {
            if need_grad {
                grads.push(frozen_matmul(&dlogits, &weight, false)?);
            }
            if weight_grad {
                dweight = Some(add_weight_grad(dweight, &dlogits, &h)?);
            }
        }
    }
    let loss = (loss_sum / denom)?;
    let dhidden = if need_grad {
        Some(Tensor::cat(&grads, 0)?.to_dtype(hidden.dtype())?)
    } else {
        None
    };
    let dweight = dweight.map(|d| d.to_dtype(weight.dtype())).transpose()?;
    let stats = TokenStats {
        entropy_sum,
        top1: top1_sum,
    };
    Ok((loss, stats, dhidden, dweight))
}
