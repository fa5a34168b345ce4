//! Causal self-attention for training: the probabilities are recomputed in the backward pass,
//! so no `t × t` tensor outlives the forward.
//!
//! [`causal_self_attention`] takes the projections as they come out of the linear layers
//! (`[b, t, heads · d]`) and returns the input of `o_proj`: the head split, RoPE and the merge
//! back are one parallel pass each way, and grouped-query heads share their kv head without a
//! copy. [`causal_attention`] is the same attention on split, rotated heads.

use crate::bf16_gemm::with_cpu_f32;
use crate::softmax::{attention_probs, attention_probs_backward};
use crate::{batched_matmul, par_build, rope, with_grad3, Grads3};
use candle_core::{DType, Device, Result, Tensor};
#[cfg(feature = "cuda")]
use {
    crate::Value,
    std::sync::{Arc, OnceLock},
};

/// Causal attention `softmax(scale·q·kᵀ + causal)·v` for `q` `[b, heads, t, d]` and `k`, `v`
/// `[b, kv_heads, t_k, d]` (grouped-query heads share kv heads). The probabilities are
/// recomputed in the backward pass: no `t × t_k` tensor outlives the forward. A sliding
/// `window` limits each query to its last `window` keys (see [`crate::causal_softmax`]); a
/// `softcap` caps the scores as Gemma 2 does and `sinks` add gpt-oss's sink logit per head
/// (see [`attention_probs`]).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let n_rep = h / kvh;
    let expand = move |t: &Tensor| -> Result<Tensor> {
        if n_rep == 1 {
            return Ok(t.clone());
        }
        let tk = t.dim(2)?;
        t.unsqueeze(2)?
            .broadcast_as((b, kvh, n_rep, tk, d))?
            .reshape((b, h, tk, d))
    };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let sinks = sinks.map(Tensor::detach);
    let probs = move |q: &Tensor, k: &Tensor| {
        attention_probs(
            &batched_matmul(q, &k.t()?)?.contiguous()?,
            scale,
            softcap,
            window,
            sinks.as_ref(),
        )
    };
    let out = batched_matmul(&probs(&qd, &expand(&kd)?)?.0, &expand(&vd)?)?;
    let fold = move |t: Tensor| -> Result<Tensor> {
        if n_rep == 1 {
            return Ok(t);
        }
        let tk = t.dim(2)?;
        t.reshape((b, kvh, n_rep, tk, d))?.sum(2)
    };
    with_grad3((q, k, v), out, move |_, grad| -> Result<Grads3> {
        let (kr, vr) = (expand(&kd)?, expand(&vd)?);
        let (p, tanh) = probs(&qd, &kr)?;
        let d_v = fold(batched_matmul(&p.t()?, grad)?)?;
        let d_p = batched_matmul(grad, &vr.t()?)?.contiguous()?;
        let d_s = attention_probs_backward(&p, tanh.as_ref(), &d_p, scale)?;
        let d_q = batched_matmul(&d_s, &kr)?;
        let d_k = fold(batched_matmul(&d_s.t()?, &qd)?)?;
        Ok((Some(d_q), Some(d_k), Some(d_v)))
    })
}

/// Causal self-attention from the q/k/v projections `[b, t, heads · d]` (k and v with
/// `kv_heads`) to the attention output `[b, t, heads · d]`, with RoPE (`cos`/`sin`
/// `[t, d / 2]`, positions `0..t`) applied to q and k. Equal to splitting the heads, [`rope`],
/// [`causal_attention`] and merging the heads; f32 CPU tensors take one fused path, bf16 CUDA
/// tensors with head size 64 or 128 the flash attention kernels (which take a sliding
/// `window` and gpt-oss's `sinks`, not a `softcap`, Gemma 2's cap of the scores, see
/// [`attention_probs`]).
#[allow(clippy::too_many_arguments)]
pub fn causal_self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let d = hd / heads;
    let window = window.filter(|&w| w < t);
    #[cfg(feature = "cuda")]
    if softcap.is_none()
        && flash_serves((q, k, v), heads, kv_heads)
        && cos.dims() == [t, d / 2]
        && sin.dims() == [t, d / 2]
    {
        let rows = (cos, sin);
        let extras = FlashExtras { sinks, window };
        return flash_self_attention((q, k, v), rows, None, extras, heads, kv_heads, scale);
    }
    let fused = matches!(q.device(), Device::Cpu)
        && [q, k, v, cos, sin].iter().all(|x| x.dtype() == DType::F32)
        && cos.dims() == [t, d / 2]
        && sin.dims() == [t, d / 2]
        && d.is_multiple_of(2)
        && heads.is_multiple_of(kv_heads);
    if !fused {
        let split = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let qh = rope(&split(q, heads)?, cos, sin)?;
        let kh = rope(&split(k, kv_heads)?, cos, sin)?;
        let v = split(v, kv_heads)?;
        let out = causal_attention(&qh, &kh, &v, scale, softcap, window, sinks)?;
        return out.transpose(1, 2)?.reshape((b, t, hd));
    }
    let n_rep = heads / kv_heads;
    let shape = Heads { b, t, d };
    let rot = Rotation {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
    };
    let (qd, kd, vd) = (
        q.detach().contiguous()?,
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    // Heads as `[b, kv_heads, n_rep · t, d]`: the n_rep query heads of a kv head are
    // consecutive, so stacking their rows is a free reshape and one matmul serves the group.
    let group = move |x: Tensor| x.reshape((b, kv_heads, n_rep * t, d));
    let rotation = rot.clone();
    let inputs = move || -> Result<(Tensor, Tensor, Tensor)> {
        let rot = &rotation;
        Ok((
            group(shape.split(&qd, heads, Some((rot, 1.0)))?)?,
            shape.split(&kd, kv_heads, Some((rot, 1.0)))?,
            shape.split(&vd, kv_heads, None)?,
        ))
    };
    // The probabilities grouped as the heads are, and the capped scores' tanh per head.
    let sinks = sinks.map(Tensor::detach);
    let probs = move |qh: &Tensor, kh: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
        let scores = batched_matmul(qh, &kh.t()?)?.reshape((b, heads, t, t))?;
        let (p, tanh) = attention_probs(&scores, scale, softcap, window, sinks.as_ref())?;
        Ok((p.reshape((b, kv_heads, n_rep * t, t))?, tanh))
    };
    let (qh, kh, vh) = inputs()?;
    let out = batched_matmul(&probs(&qh, &kh)?.0, &vh)?;
    let out = shape.merge(&out, heads, None)?;
    drop((qh, kh, vh));
    with_grad3((q, k, v), out, move |_, grad| -> Result<Grads3> {
        let g = group(shape.split(&grad.contiguous()?, heads, None)?)?;
        let (qh, kh, vh) = inputs()?;
        let (p, tanh) = probs(&qh, &kh)?;
        let d_v = batched_matmul(&p.t()?, &g)?;
        let d_p = batched_matmul(&g, &vh.t()?)?.reshape((b, heads, t, t))?;
        let p = p.reshape((b, heads, t, t))?;
        let d_s = attention_probs_backward(&p, tanh.as_ref(), &d_p, scale)?.reshape((
            b,
            kv_heads,
            n_rep * t,
            t,
        ))?;
        let d_q = batched_matmul(&d_s, &kh)?;
        let d_k = batched_matmul(&d_s.t()?, &qh)?;
        Ok((
            Some(shape.merge(&d_q, heads, Some((&rot, -1.0)))?),
            Some(shape.merge(&d_k, kv_heads, Some((&rot, -1.0)))?),
            Some(shape.merge(&d_v, kv_heads, None)?),
        ))
    })
}

/// [`causal_self_attention`] over packed rows, several sequences in each (TRL's packing):
/// `segments` `[b, t]` holds each position's sequence id (0: padding) and `cos`/`sin`
/// `[b, t, d / 2]` the RoPE tables of each position (positions restart with each sequence;
/// `[t, d / 2]` when they do not: one sequence and padding per row). A
/// query sees the earlier keys of its own sequence; a padding query sees every earlier
/// non-padding key. With gpt-oss's `sinks` (see [`attention_probs`]) and a sliding `window`
/// within each sequence. By the flash attention kernels where they serve the tensors (bf16 on
/// CUDA, head size 64 or 128); `None` elsewhere, and the caller masks the scores itself.
#[allow(clippy::too_many_arguments)]
pub fn packed_self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    segments: &Tensor,
    sinks: Option<&Tensor>,
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (b, t, hd) = q.dims3()?;
    let d = hd / heads;
    let tables = |x: &Tensor| x.dims() == [b, t, d / 2] || x.dims() == [t, d / 2];
    let shapes = tables(cos) && cos.dims() == sin.dims() && segments.dims() == [b, t];
    #[cfg(feature = "cuda")]
    if shapes && flash_serves((q, k, v), heads, kv_heads) {
        let segments = segments.to_dtype(DType::U32)?;
        let window = window.filter(|&w| w < t);
        let extras = FlashExtras { sinks, window };
        let rows = (cos, sin);
        return flash_self_attention(
            (q, k, v),
            rows,
            Some(&segments),
            extras,
            heads,
            kv_heads,
            scale,
        )
        .map(Some);
    }
    let _ = (k, v, shapes, sinks, window, kv_heads, scale);
    Ok(None)
}

/// The segment id of keys that every query sees, in the segment ids the flash attention
/// kernels read (`FA_SHARED` of `kernels/attention.cu`).
pub const SHARED_SEGMENT: u32 = u32::MAX;

/// Attention of new tokens over a prefix of keys and values and their own keys: prefix
/// tuning's virtual tokens, as transformers attends over a pre-filled cache. `prefix` holds the
/// keys and values `[b, kv_heads, p, d]` as they are (no RoPE), seen by every new token; `q`,
/// `k`, `v` `[b, t, heads · d]` are the new tokens' projections, rotated by `cos`/`sin`
/// (`[t, d / 2]` or `[b, t, d / 2]`: positions after the prefix) and attended causally.
/// `mask` `[b, p + t]` (segment ids over the prefix and the new positions, as llama's
/// attention mask) hides padding keys and separates packed sequences; none of them hides a
/// prefix key unless its own entry is 0. By the flash attention kernels where they serve the
/// tensors (bf16 on CUDA, head size 64 or 128); `None` elsewhere (the caller then concatenates
/// the cache and masks the scores itself).
#[allow(clippy::too_many_arguments)]
pub fn prefixed_self_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    prefix: (&Tensor, &Tensor),
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if flash_serves((q, k, v), heads, kv_heads) {
        let p = prefix.0.dim(2)?;
        let all = PrefixedRows::new((q, k, v), prefix, cos, sin, mask, heads)?;
        let out = flash_self_attention(
            (&all.q, &all.k, &all.v),
            (&all.cos, &all.sin),
            all.segments.as_ref(),
            FlashExtras::default(),
            heads,
            kv_heads,
            scale,
        )?;
        return Ok(Some(out.narrow(1, p, q.dim(1)?)?));
    }
    let _ = (q, k, v, prefix, cos, sin, mask, heads, kv_heads, scale);
    Ok(None)
}

/// Attention over a prefix as self-attention over `p + t` rows, the layout the flash kernels
/// read (see [`prefixed_self_attention`]): the prefix keys and values come first, unrotated
/// (cos 1, sin 0 on their rows), and `p` zero query rows in front of the new ones, whose
/// outputs are dropped (a zero output gradient adds nothing to any other gradient). Row
/// `p + i` then sees the prefix and the new keys up to `i` causally; with a mask, the prefix
/// keys carry [`SHARED_SEGMENT`] so that every packed sequence sees them.
pub struct PrefixedRows {
    /// `[b, p + t, heads · d]`, and `[b, p + t, kv_heads · d]` for k and v.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// `[p + t, d / 2]`, or `[b, p + t, d / 2]` when the new tokens' tables are per row.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[b, p + t]` u32, when a mask is given.
    pub segments: Option<Tensor>,
}

impl PrefixedRows {
    pub fn new(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (pk, pv): (&Tensor, &Tensor),
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        heads: usize,
    ) -> Result<Self> {
        let (b, t, hd) = q.dims3()?;
        let (_, kv_heads, p, d) = pk.dims4()?;
        if hd != heads * d || pv.dims() != pk.dims() {
            candle_core::bail!(
                "prefix keys {:?} and values {:?} do not fit queries {:?} of {heads} heads",
                pk.dims(),
                pv.dims(),
                q.dims()
            );
        }
        let rows = |x: &Tensor, like: &Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.reshape((b, p, kv_heads * d))?;
            Tensor::cat(&[&x.to_dtype(like.dtype())?, like], 1)
        };
        let front = |x: &Tensor, value: f32| -> Result<Tensor> {
            let mut shape = x.dims().to_vec();
            let time = shape.len() - 2;
            shape[time] = p;
            let fill = Tensor::full(value, shape, x.device())?.to_dtype(x.dtype())?;
            Tensor::cat(&[&fill, x], time)
        };
        let segments = match mask {
            None => None,
            Some(m) => {
                if m.dims() != [b, p + t] {
                    candle_core::bail!("attention mask {:?}, expected [{b}, {}]", m.dims(), p + t);
                }
                let m = m.to_dtype(DType::U32)?;
                let head = m.narrow(1, 0, p)?;
                let shared = Tensor::full(SHARED_SEGMENT, (b, p), m.device())?;
                let head = head.ne(0u32)?.where_cond(&shared, &head)?;
                Some(Tensor::cat(&[&head, &m.narrow(1, p, t)?], 1)?)
            }
        };
        Ok(Self {
            q: Tensor::cat(&[&Tensor::zeros((b, p, hd), q.dtype(), q.device())?, q], 1)?,
            k: rows(pk, k)?,
            v: rows(pv, v)?,
            cos: front(cos, 1.0)?,
            sin: front(sin, 0.0)?,
            segments,
        })
    }
}

/// Whether the flash attention kernels serve these projections: bf16 CUDA tensors of the
/// shapes they read (`[b, t, heads · d]`, k and v `[b, t, kv_heads · d]`), head size 64 or
/// 128, whole groups of query heads per kv head, the kernel group not turned off.
#[cfg(feature = "cuda")]
fn flash_serves((q, k, v): (&Tensor, &Tensor, &Tensor), heads: usize, kv_heads: usize) -> bool {
    let Ok((b, t, hd)) = q.dims3() else {
        return false;
    };
    let d = hd / heads.max(1);
    q.device().is_cuda()
        && crate::cuda_kernel_on(crate::Kernel::Attention)
        && [q, k, v].iter().all(|x| x.dtype() == DType::BF16)
        && crate::cuda::flash_head_dim_supported(d)
        && hd == heads * d
        && heads.is_multiple_of(kv_heads.max(1))
        && k.dims() == [b, t, kv_heads * d]
        && v.dims() == k.dims()
}

/// What the flash kernels add to causal attention: gpt-oss's sinks and a sliding window.
#[cfg(feature = "cuda")]
#[derive(Default)]
struct FlashExtras<'a> {
    sinks: Option<&'a Tensor>,
    window: Option<usize>,
}

/// [`causal_self_attention`] (and, with `segments`, [`packed_self_attention`]) by the flash
/// attention kernels (bf16 on CUDA): the forward keeps only its output and the log-sum-exp of
/// each row; the backward recomputes the rest.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn flash_self_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    segments: Option<&Tensor>,
    FlashExtras { sinks, window }: FlashExtras,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    // The kernels read rows with 16-byte loads: contiguous, starting at a multiple of 8.
    let aligned = |t: &Tensor| -> Result<Tensor> {
        let t = t.detach().contiguous()?;
        if t.layout().start_offset() % 8 == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    };
    let inputs = crate::cuda::FlashInputs {
        q: aligned(q)?,
        k: aligned(k)?,
        v: aligned(v)?,
        cos: cos.to_dtype(DType::F32)?.contiguous()?,
        sin: sin.to_dtype(DType::F32)?.contiguous()?,
        segments: segments.map(|s| s.contiguous()).transpose()?,
        sinks: sinks
            .map(|s| s.detach().to_dtype(DType::F32)?.contiguous())
            .transpose()?,
        window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        heads,
        kv_heads,
        scale: scale as f32,
        rotated: false,
    };
    // The op's forward runs the kernel into its own output and leaves what the backward reads
    // here: the log-sum-exp and q and k as it rotated them, which take the inputs' place (the
    // backward reads the output from the graph: no copy of it is made or kept).
    let saved = Arc::new(OnceLock::new());
    let output = FlashOutput {
        inputs: inputs.clone(),
        saved: saved.clone(),
    };
    let for_backward = Arc::new(OnceLock::new());
    let inputs_back = for_backward.clone();
    let y = with_grad3(
        (q, k, v),
        Value::ByTheOp(Box::new(output)),
        move |out, grad| {
            let missing =
                || candle_core::Error::Msg("flash attention: backward before forward".into());
            let (inputs, lse): &(crate::cuda::FlashInputs, Tensor) =
                inputs_back.get().ok_or_else(missing)?;
            let grad = aligned(&grad.to_dtype(DType::BF16)?)?;
            let (dq, dk, dv) = inputs.backward(&aligned(out)?, lse, &grad)?;
            Ok((Some(dq), Some(dk), Some(dv)))
        },
    )?;
    // The forward has run (in the op, or before it, or alone where nothing trains).
    if let Some(crate::cuda::FlashSaved { lse, rotated }) = saved.get() {
        let inputs = match rotated {
            Some((q, k)) => crate::cuda::FlashInputs {
                q: q.clone(),
                k: k.clone(),
                rotated: true,
                ..inputs
            },
            None => inputs,
        };
        let _ = for_backward.set((inputs, lse.clone()));
    }
    Ok(y)
}

/// The flash attention output as its with_grad op computes it (see [`flash_self_attention`]).
#[cfg(feature = "cuda")]
struct FlashOutput {
    inputs: crate::cuda::FlashInputs,
    /// What the backward pass reads (see [`crate::cuda::FlashSaved`]).
    saved: Arc<OnceLock<crate::cuda::FlashSaved>>,
}

#[cfg(feature = "cuda")]
impl crate::OpOutput for FlashOutput {
    fn cpu(self: Box<Self>) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("flash attention runs on GPUs")
    }

    fn cuda(self: Box<Self>) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (out, shape, saved) = self.inputs.forward_storage()?;
        self.saved
            .set(saved)
            .map_err(|_| candle_core::Error::Msg("flash attention: forward ran twice".into()))?;
        Ok((out, shape))
    }

    fn tensor(self: Box<Self>) -> Result<Tensor> {
        let (out, saved) = self.inputs.forward()?;
        // Kept for a backward too (`PEFT_CUDA_OFF=in_op` computes the output here).
        let _ = self.saved.set(saved);
        Ok(out)
    }
}

/// RoPE tables `[t, d / 2]`.
#[derive(Clone)]
struct Rotation {
    cos: Tensor,
    sin: Tensor,
}

/// Batch, sequence and head sizes of the head split.
#[derive(Clone, Copy)]
struct Heads {
    b: usize,
    t: usize,
    d: usize,
}

impl Heads {
    /// `[b, t, n · d]` to `[b, n, t, d]`, rotated when `rot` is given (`sign` 1: RoPE, -1: its
    /// inverse).
    fn split(&self, x: &Tensor, n: usize, rot: Option<(&Rotation, f32)>) -> Result<Tensor> {
        let Heads { b, t, d } = *self;
        let out = with_tables(rot, |tables| {
            with_cpu_f32(x, |x| {
                Ok(par_build(x.len(), t * d, |bh, dst| {
                    let (bi, hi) = (bh / n, bh % n);
                    for (ti, dst) in dst.chunks_mut(d).enumerate() {
                        let src = &x[((bi * t + ti) * n + hi) * d..][..d];
                        rotate(src, dst, ti, tables);
                    }
                }))
            })
        })?;
        Tensor::from_vec(out, (b, n, t, d), &Device::Cpu)
    }

    /// `[b, n, t, d]` (any shape with those elements) back to `[b, t, n · d]`, rotated when
    /// `rot` is given.
    fn merge(&self, x: &Tensor, n: usize, rot: Option<(&Rotation, f32)>) -> Result<Tensor> {
        let Heads { b, t, d } = *self;
        let out = with_tables(rot, |tables| {
            with_cpu_f32(x, |x| {
                Ok(par_build(x.len(), n * d, |bt, dst| {
                    let (bi, ti) = (bt / t, bt % t);
                    for (hi, dst) in dst.chunks_mut(d).enumerate() {
                        let src = &x[((bi * n + hi) * t + ti) * d..][..d];
                        rotate(src, dst, ti, tables);
                    }
                }))
            })
        })?;
        Tensor::from_vec(out, (b, t, n * d), &Device::Cpu)
    }
}

/// The cos and sin values of a rotation and its sign, as slices.
type Tables<'a> = Option<(&'a [f32], &'a [f32], f32)>;

fn with_tables<T>(rot: Option<(&Rotation, f32)>, f: impl FnOnce(Tables) -> Result<T>) -> Result<T> {
    match rot {
        None => f(None),
        Some((r, sign)) => with_cpu_f32(&r.cos, |cos| {
            with_cpu_f32(&r.sin, |sin| f(Some((cos, sin, sign))))
        }),
    }
}

/// Copies one head vector at position `ti`, rotated as HF's `rotate_half` RoPE does when
/// `tables` are given: `(x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin)` (sin negated for the
/// inverse).
fn rotate(src: &[f32], dst: &mut [f32], ti: usize, tables: Tables) {
    let Some((cos, sin, sign)) = tables else {
        dst.copy_from_slice(src);
        return;
    };
    let half = src.len() / 2;
    let (c, s) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
    let (x1, x2) = src.split_at(half);
    let (y1, y2) = dst.split_at_mut(half);
    for i in 0..half {
        let s = sign * s[i];
        y1[i] = x1[i] * c[i] - x2[i] * s;
        y2[i] = x2[i] * c[i] + x1[i] * s;
    }
}
