//! Fused training ops that keep only what their backward needs: the LoRA linear and SwiGLU.

use crate::bf16_gemm::with_cpu_f32;
use crate::grad::{with_grad3_acc, Accumulated};
#[cfg(feature = "cuda")]
use crate::grad::{GpuForward, GpuIn};
use crate::ops::add_input_grad;
use crate::{cpu_f32, frozen_matmul, with_grad3, Grads3, Kernel, LinearWeight, Value};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Inverted-dropout mask (`0` or `1/(1-p)`) drawn from `seed`: the same seed gives the same
/// mask, so the backward pass regenerates it instead of storing it. Each element is a hash of
/// its index and the seed ([`dropout_mix`]): drawn in parallel, independent of the thread
/// count, and drawn the same inside our CUDA kernels, which never store a mask.
pub fn dropout_mask(seed: u64, p: f64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let d = Dropout { p, seed };
    #[cfg(feature = "cuda")]
    if device.is_cuda() && crate::cuda_kernel_on(Kernel::Dropout) {
        return crate::cuda::dropout_mask(d, shape, device);
    }
    let ((k1, k2), threshold, scale) = (d.keys(), d.threshold(), d.scale());
    let mask = crate::par_build(shape.iter().product(), CPU_BLOCK, |c, chunk: &mut [f32]| {
        // A chunk never straddles a multiple of 2³² (CPU_BLOCK divides it): the index's upper
        // half is the chunk's, and the loop runs on 32-bit lanes.
        let first = (c * CPU_BLOCK) as u64;
        let fill = MaskFill {
            first: first as u32,
            k1,
            k2: second_key(k2, first),
            threshold,
            scale,
        };
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { fill.run_avx512(chunk) };
        } else if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { fill.run_avx2(chunk) };
        }
        fill.run(chunk);
    });
    Tensor::from_vec(mask, shape, device)
}

/// One chunk of a dropout mask: its first index (lower half), keys, threshold and scale.
struct MaskFill {
    first: u32,
    k1: u32,
    k2: u32,
    threshold: u32,
    scale: f32,
}

impl MaskFill {
    #[inline(always)]
    fn run(&self, chunk: &mut [f32]) {
        for (j, m) in chunk.iter_mut().enumerate() {
            let i = self.first.wrapping_add(j as u32);
            let keep = dropout_mix(dropout_mix(i ^ self.k1).wrapping_add(self.k2));
            *m = if keep < self.threshold {
                self.scale
            } else {
                0.0
            };
        }
    }

    /// [`Self::run`] compiled for AVX-512: 16 hashes per instruction (32-bit multiplies).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, chunk: &mut [f32]) {
        self.run(chunk)
    }

    /// [`Self::run`] compiled for AVX2: 8 hashes per instruction.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, chunk: &mut [f32]) {
        self.run(chunk)
    }
}

/// Dropout applied to a LoRA input: probability and the seed of its mask.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    /// Hashes below this keep their element.
    pub fn threshold(&self) -> u32 {
        ((1.0 - self.p) * u32::MAX as f64) as u32
    }

    /// The value of a kept element, `1 / (1 - p)`.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    /// The mask's two 32-bit hash keys, the seed mixed by SplitMix64's finaliser.
    pub fn keys(&self) -> (u32, u32) {
        let mut z = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z as u32, (z >> 32) as u32)
    }
}

/// Element `i` of a mask with keys `(k1, k2)` is kept when
/// `mix(mix(lo(i) ^ k1) + second_key(k2, i)) < threshold`: two rounds of a 32-bit integer
/// hash (Wellons' lowbias32), the index's upper half folded into the second key. `dropout_at`
/// in kernels/ops.cu computes the same bits.
#[inline(always)]
fn dropout_mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The second key for indices with the upper half of `i`.
fn second_key(k2: u32, i: u64) -> u32 {
    k2 ^ ((i >> 32) as u32).wrapping_mul(0x9e37_79b9)
}

/// Dropout on a LoRA input `[rows, n]`: drawn inside our CUDA kernels from its seed, or a
/// mask tensor for the composed ops.
pub(crate) enum InputDropout {
    Off,
    Mask(Tensor),
    Drawn(Dropout),
}

impl InputDropout {
    fn new(dropout: Option<Dropout>, x: &Tensor) -> Result<Self> {
        Ok(match dropout {
            None => Self::Off,
            Some(d) if thin_kernels(x) => Self::Drawn(d),
            Some(d) => Self::Mask(dropout_mask(d.seed, d.p, x.dims(), x.device())?),
        })
    }

    /// The mask as a tensor of `x`'s shape and device (none without dropout).
    fn mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Off => Ok(None),
            Self::Mask(m) => Ok(Some(m.clone())),
            Self::Drawn(d) => dropout_mask(d.seed, d.p, x.dims(), x.device()).map(Some),
        }
    }

    /// For our CUDA kernels, which draw the mask themselves.
    #[cfg(feature = "cuda")]
    fn drawn(&self) -> Option<Dropout> {
        match self {
            Self::Drawn(d) => Some(*d),
            _ => None,
        }
    }
}

/// Whether our CUDA kernels compute LoRA's low-rank products for `x`.
fn thin_kernels(x: &Tensor) -> bool {
    x.device().is_cuda() && crate::has_kernel(x, Kernel::LowRank)
}

/// `x·Wᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ` for a frozen `W` `[out, in]` and trainable `A` `[r, in]`,
/// `B` `[out, r]` (f32). Keeps `drop(x)·Aᵀ` (`rows × r`) for the backward; never forms `W + sBA`.
/// A quantized `W` is dequantized for the forward matmul and again in the backward.
pub fn lora_linear(
    x: &Tensor,
    w: &LinearWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (out_f, in_f) = w.dims();
    let rows = x.elem_count() / in_f;
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has dims") = out_f;
    let x2 = x.detach().reshape((rows, in_f))?;
    let (a_d, b_d) = (a.detach(), b.detach());
    let tracks = x.track_op() || a.track_op() || b.track_op();
    if !tracks
        && dropout.is_none()
        && rows < SMALL_ROWS
        && crate::has_kernel(&x2, Kernel::LowRank)
        && x2.device().is_cpu()
    {
        // Decoding: a token or a few. The LoRA path is then cheap arithmetic but several candle
        // ops (two matmuls, scale, add); one kernel adds it to the base output instead.
        let mut y = frozen_matmul(&x2, &w.dense()?, true)?.apply_op2_no_bwd(
            &x2.contiguous()?,
            &LoraDelta {
                a: a_d.contiguous()?,
                b: b_d.contiguous()?,
                scale: scale as f32,
            },
        )?;
        if let Some(bias) = bias {
            y = y.broadcast_add(bias)?;
        }
        return y.reshape(out_shape);
    }
    #[cfg(feature = "cuda")]
    if bias.is_none() && x2.dtype() == DType::BF16 && thin_kernels(&x2) && crate::lora_cublas() {
        return lora_linear_cublas((x, a, b), x2, w, (scale, dropout), out_shape);
    }
    let xa = thin_project(&x2, &InputDropout::new(dropout, &x2)?, &a_d, false, 1.0)?;
    let y = lora_output(&x2, &w.dense()?, bias, &xa, &b_d, scale, out_shape)?;
    let w = w.clone();
    let x_shape = x.shape().clone();
    let x_tracks = x.track_op();
    let (a_tracks, b_tracks) = (a.track_op(), b.track_op());
    with_grad3_acc((x, a, b), y, move |grad, gathered| -> Result<Grads3> {
        let g = grad.reshape((rows, out_f))?;
        // g·B, scaled: the gradient at the LoRA bottleneck.
        let gb = thin_project(&g, &InputDropout::Off, &b_d, true, scale)?;
        let drop = InputDropout::new(dropout, &x2)?;
        let d_b = if b_tracks {
            Some(thin_outer(&g, &InputDropout::Off, &xa, false, scale)?)
        } else {
            None
        };
        let d_a = if a_tracks {
            Some(thin_outer(&x2, &drop, &gb, true, 1.0)?)
        } else {
            None
        };
        let d_x = if x_tracks {
            let base = frozen_matmul(&g, &w.dense()?, false)?;
            let d_x = low_rank_add(&base, &gb, &a_d, true, &drop, 1.0)?.reshape(&x_shape)?;
            Some(Accumulated::sum(gathered, d_x)?)
        } else {
            None
        };
        Ok((d_x, d_a, d_b))
    })
}

/// [`lora_linear`] without bias on bf16 activations, its thin products by cuBLAS
/// ([`crate::lora_cublas`]): A, B, `drop(x)·Aᵀ` and `g·B` in bf16, products accumulated in
/// f32, the low-rank terms added into the frozen products' outputs (no `[rows, out]`
/// temporary). With dropout, `drop(x)` is drawn by our kernel into a bf16 copy for each pass
/// that reads it (the forward's `x·Aᵀ`, the backward's dL/dA) rather than kept between them,
/// and dL/dx's low-rank term is masked by our kernel.
#[cfg(feature = "cuda")]
fn lora_linear_cublas(
    (x, a, b): (&Tensor, &Tensor, &Tensor),
    x2: Tensor,
    w: &LinearWeight,
    (scale, dropout): (f64, Option<Dropout>),
    out_shape: Vec<usize>,
) -> Result<Tensor> {
    use crate::cublas::{add_product_into, is_bf16_matrix, matmul};
    let rows = x2.dims2()?.0;
    let out_f = w.dims().0;
    let x2 = x2.contiguous()?;
    let (a16, b16) = match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => {
            let (a, b) = (a.detach().contiguous()?, b.detach().contiguous()?);
            match crate::cuda::bf16_concat(&[&a, &b])?.1.as_slice() {
                [a16, b16] => (a16.clone(), b16.clone()),
                _ => candle_core::bail!("bf16 concat: two tensors in, two out"),
            }
        }
        _ => (
            a.detach().to_dtype(DType::BF16)?.contiguous()?,
            b.detach().to_dtype(DType::BF16)?.contiguous()?,
        ),
    };
    let scale = scale as f32;
    let dropped = move |x2: &Tensor| match dropout {
        Some(d) => crate::cuda::dropout_apply(x2, d),
        None => Ok(x2.clone()),
    };
    // drop(x)·Aᵀ [rows, r]
    let xa = matmul((&dropped(&x2)?, false), (&a16, true), 1.0, DType::BF16)?;
    let low_rank = (xa.clone(), b16.clone());
    let by = LowRankBy::Cublas(None);
    let y = lora_forward((&x2, w.dense()?), low_rank, scale, out_shape.into(), by);
    let w = w.clone();
    let x_shape = x.shape().clone();
    // f32 for the masked low-rank term of dL/dx (our kernel's operands).
    let a32 = match dropout {
        Some(_) => Some(a.detach().to_dtype(DType::F32)?),
        None => None,
    };
    let tracks = (x.track_op(), a.track_op(), b.track_op());
    with_grad3_acc((x, a, b), y, move |grad, gathered| -> Result<Grads3> {
        let g = grad.reshape((rows, out_f))?.contiguous()?;
        let d_b = match tracks.2 {
            true => Some(matmul((&g, true), (&xa, false), scale, DType::F32)?),
            false => None,
        };
        if !(tracks.0 || tracks.1) {
            return Ok((None, None, d_b));
        }
        // scale·g·B [rows, r]: the gradient at the bottleneck.
        let gb = matmul((&g, false), (&b16, false), scale, DType::BF16)?;
        let d_a = match tracks.1 {
            true => Some(matmul(
                (&gb, true),
                (&dropped(&x2)?, false),
                1.0,
                DType::F32,
            )?),
            false => None,
        };
        // dL/dx = g·W + ((scale·g·B)·A) ∘ mask, both added to the gradient gathered for x.
        let d_x = match tracks.0 {
            true => {
                let w = w.dense()?;
                if let (None, None, true) = (dropout, &gathered, is_bf16_matrix(&w)) {
                    // Nothing gathered yet: the low-rank term written into a new tensor, then
                    // g·W added onto it by the frozen product (beta = 1), as in the forward.
                    let d_x = matmul((&gb, false), (&a16, false), 1.0, DType::BF16)?;
                    add_product_into(&d_x, (&g, false), (&w, false), 1.0)?;
                    return Ok((Some(d_x.reshape(&x_shape)?), d_a, d_b));
                }
                // A new bf16 gpu tensor, or the gathered one that took g·W in place: either
                // takes the low-rank term in place.
                let d_x = add_input_grad(gathered, &g, &w, &x_shape)?;
                match (dropout, &a32) {
                    (Some(d), Some(a32)) => {
                        let gb = gb.to_dtype(DType::F32)?;
                        crate::cuda::low_rank_add_into(&d_x, &gb, (a32, true), Some(d), 1.0)?
                    }
                    _ => add_product_into(&d_x, (&gb, false), (&a16, false), 1.0)?,
                }
                Some(d_x)
            }
            false => None,
        };
        Ok((d_x, d_a, d_b))
    })
}

/// `scale · (x ∘ mask) · wᵀ` in f32 for `x` `[rows, n]` (any float dtype), `w` `[r, n]` f32
/// (or `[n, r]` when `w_t`), the mask `drop`'s: LoRA's `drop(x)·Aᵀ` and `g·B`. On CUDA one
/// kernel reads `x` as it is stored, without an f32 copy, and draws the mask itself.
pub(crate) fn thin_project(
    x: &Tensor,
    drop: &InputDropout,
    w: &Tensor,
    w_t: bool,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if thin_kernels(x) && w.dtype() == DType::F32 && !matches!(drop, InputDropout::Mask(_)) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return crate::cuda::thin_project(&x, drop.drawn(), &w, w_t, scale as f32);
    }
    let xd = masked_f32(x, drop)?;
    let product = if w_t {
        xd.matmul(w)?
    } else {
        xd.matmul(&w.t()?)?
    };
    scaled(product, scale)
}

/// `scale · (x ∘ mask)ᵀ · y` in f32 as `[n, r]` (or its transpose `[r, n]` when `out_t`) for
/// `x` `[rows, n]` (any float dtype), `y` `[rows, r]` f32, the mask `drop`'s: the gradients of
/// LoRA's B and A. On CUDA without an f32 copy of `x`, the mask drawn in the kernel.
pub(crate) fn thin_outer(
    x: &Tensor,
    drop: &InputDropout,
    y: &Tensor,
    out_t: bool,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if thin_kernels(x) && y.dtype() == DType::F32 && !matches!(drop, InputDropout::Mask(_)) {
        let (x, y) = (x.contiguous()?, y.contiguous()?);
        return crate::cuda::thin_outer(&x, drop.drawn(), &y, out_t, scale as f32);
    }
    let xd = masked_f32(x, drop)?;
    let product = if out_t {
        y.t()?.matmul(&xd)?
    } else {
        xd.t()?.matmul(y)?
    };
    scaled(product, scale)
}

/// `x` in f32 with `drop`'s mask applied (the composed path of the thin products).
fn masked_f32(x: &Tensor, drop: &InputDropout) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    match drop.mask(x)? {
        Some(m) => x32 * m,
        None => Ok(x32),
    }
}

/// `t · scale`, without a pass over `t` when the scale is 1.
fn scaled(t: Tensor, scale: f64) -> Result<Tensor> {
    if scale == 1.0 {
        Ok(t)
    } else {
        t * scale
    }
}

/// LoRA's forward output `x·Wᵀ (+ bias) + scale·xa·Bᵀ` (`xa` = drop(x)·Aᵀ) as the value of its
/// with_grad op: on GPUs the op computes it itself, the frozen matmul into its output and our
/// kernel adding the low-rank term there.
pub(crate) fn lora_output(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    xa: &Tensor,
    b: &Tensor,
    scale: f64,
    shape: Vec<usize>,
) -> Result<Value> {
    #[cfg(feature = "cuda")]
    if bias.is_none() && thin_kernels(x) && [xa, b].iter().all(|t| t.dtype() == DType::F32) {
        let low_rank = (xa.contiguous()?, b.contiguous()?);
        let x = x.contiguous()?;
        return Ok(lora_forward(
            (&x, w.clone()),
            low_rank,
            scale as f32,
            shape.into(),
            LowRankBy::Kernel,
        ));
    }
    let base = frozen_matmul(x, w, true)?;
    let mut y = low_rank_add(&base, xa, b, false, &InputDropout::Off, scale)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    Ok(Value::Computed(y.reshape(shape)?))
}

/// Which adds LoRA's low-rank term in [`lora_forward`].
#[cfg(feature = "cuda")]
#[derive(Clone, Copy)]
pub(crate) enum LowRankBy {
    /// Our kernel (`xa`, `b` f32).
    Kernel,
    /// cuBLAS (`xa`, `b` bf16), from the columns `(first, count)` of `xa` when given (one
    /// layer's share of the products of layers that read one input), all of them otherwise.
    Cublas(Option<(usize, usize)>),
}

/// LoRA's output `x·Wᵀ + scale·xa·Bᵀ` from `(x, W)` as its with_grad op computes it on GPUs.
/// By our kernel: the frozen matmul into the op's output, then the low-rank term added there.
/// By cuBLAS: where `x` and `W` are contiguous bf16 matrices, the low-rank term written first
/// and the frozen product added onto it (see [`crate::cublas::thin_then_frozen`]), otherwise
/// added after it.
#[cfg(feature = "cuda")]
pub(crate) fn lora_forward(
    (x, w): (&Tensor, Tensor),
    (xa, b): (Tensor, Tensor),
    scale: f32,
    shape: Shape,
    by: LowRankBy,
) -> Value {
    use crate::cublas::{is_bf16_matrix, matmul_add_into, thin_then_frozen, Mat};
    let (x_in, w_in) = (x.clone(), w.clone());
    let frozen_by_cublas = is_bf16_matrix(x) && is_bf16_matrix(&w);
    let f = move |x: GpuIn, w: GpuIn| {
        let cols = match by {
            LowRankBy::Kernel => {
                let out = crate::grad::linear_storage(x, w)?;
                let dims = (x.1.shape().dims2()?.0, w.1.shape().dims2()?.0);
                crate::cuda::low_rank_add_in_place(&out, dims, &xa, (&b, false), None, scale)?;
                return Ok((out, shape.clone()));
            }
            LowRankBy::Cublas(cols) => cols,
        };
        let xa = match cols {
            Some(cols) => Mat::columns(&xa, false, cols),
            None => Mat::from((&xa, false)),
        };
        let thin = (xa, Mat::from((&b, true)));
        let out = if frozen_by_cublas {
            let frozen = (Mat::from((&x_in, false)), Mat::from((&w_in, true)));
            thin_then_frozen(frozen, thin, scale)?
        } else {
            let out = crate::grad::linear_storage(x, w)?;
            let dims = (x.1.shape().dims2()?.0, w.1.shape().dims2()?.0);
            matmul_add_into(&out, dims, thin.0, thin.1, scale)?;
            out
        };
        Ok((out, shape.clone()))
    };
    Value::ByTheOp(Box::new(crate::grad::Op2Output {
        op: GpuForward { name: "lora", f },
        a: x.clone(),
        b: w,
    }))
}

/// `base + scale · (left · rightᵀ) ∘ mask` in `base`'s dtype, the product in f32: `left`
/// `[rows, r]`, `right` `[cols, r]`, or `[r, cols]` when `right_t`; the mask `drop`'s over
/// `[rows, cols]` (dropout, in the backward). On CUDA one kernel pass over `base`.
pub(crate) fn low_rank_add(
    base: &Tensor,
    left: &Tensor,
    right: &Tensor,
    right_t: bool,
    drop: &InputDropout,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if thin_kernels(base)
        && [left, right].iter().all(|x| x.dtype() == DType::F32)
        && !matches!(drop, InputDropout::Mask(_))
    {
        return crate::cuda::low_rank_add(
            &base.contiguous()?,
            &left.contiguous()?,
            &right.contiguous()?,
            right_t,
            drop.drawn(),
            scale as f32,
        );
    }
    let mut product = if right_t {
        left.matmul(right)?
    } else {
        left.matmul(&right.t()?)?
    };
    if let Some(m) = drop.mask(base)? {
        product = (product * m)?;
    }
    base + scaled(product, scale)?.to_dtype(base.dtype())?
}

/// Fewest rows for which the LoRA forward without gradients uses matmuls rather than
/// [`LoraDelta`].
pub(crate) const SMALL_ROWS: usize = 32;

/// `y + scale · (x · Aᵀ) · Bᵀ` for a few rows of `x` (f32, CPU), `y` the base output.
struct LoraDelta {
    a: Tensor,
    b: Tensor,
    scale: f32,
}

impl CustomOp2 for LoraDelta {
    fn name(&self) -> &'static str {
        "lora-delta"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, x) = (cpu_f32(y, yl)?, cpu_f32(x, xl)?);
        let (r, in_f) = self.a.dims2()?;
        let out_f = self.b.dim(0)?;
        let mut out = y.to_vec();
        with_cpu_f32(&self.a, |a| {
            with_cpu_f32(&self.b, |b| {
                let rows = RowsDelta {
                    x,
                    a,
                    b,
                    r,
                    in_f,
                    out_f,
                    scale: self.scale,
                };
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    unsafe { rows.add_to_avx512(&mut out) };
                    return Ok(());
                }
                rows.add_to(&mut out);
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// The operands of [`LoraDelta`] as slices.
struct RowsDelta<'a> {
    x: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
    r: usize,
    in_f: usize,
    out_f: usize,
    scale: f32,
}

impl RowsDelta<'_> {
    /// Adds `scale · (x · Aᵀ) · Bᵀ` to `out`. One thread: a few rows take microseconds, and
    /// plain loops stay inlined into the AVX-512 build.
    #[inline(always)]
    fn add_to(&self, out: &mut [f32]) {
        let mut xa = vec![0f32; self.r];
        for (y, x) in out.chunks_mut(self.out_f).zip(self.x.chunks(self.in_f)) {
            for (v, a) in xa.iter_mut().zip(self.a.chunks(self.in_f)) {
                *v = self.scale * dot(x, a);
            }
            for (y, b) in y.iter_mut().zip(self.b.chunks(self.r)) {
                *y += dot(&xa, b);
            }
        }
    }

    /// [`Self::add_to`] compiled for AVX-512: the 16-wide sums of [`dot`] become one register.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_to_avx512(&self, out: &mut [f32]) {
        self.add_to(out)
    }
}

/// `Σ a·b` with 16 independent sums, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The activation of a gated MLP's gate: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GatedActivation {
    /// SwiGLU (Llama): `silu(g) = g · sigmoid(g)`.
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`), written as
    /// `g · sigmoid(2·√(2/π)·(g + 0.044715·g³))`, which it equals.
    GeluTanh,
    /// gpt-oss's experts: `g' · sigmoid(alpha · g') · (u' + 1)` with `g' = min(g, limit)` and
    /// `u' = clamp(u, −limit, limit)` (its `swiglu_alpha` and `swiglu_limit`).
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// √(2/π).
const GELU_C: f64 = 0.797_884_560_802_865_4;

impl GatedActivation {
    /// `a(g)` with `act(g) = g · sigmoid(a(g))`, and `a'(g)` (of the clamped gate).
    #[inline]
    fn arg(self, g: f32) -> (f32, f32) {
        match self {
            Self::Silu => (g, 1.0),
            Self::GeluTanh => {
                let c = 2.0 * GELU_C as f32;
                (
                    c * (g + 0.044715 * g * g * g),
                    c * (1.0 + 3.0 * 0.044715 * g * g),
                )
            }
            Self::ClampedSwiglu { alpha, .. } => (alpha * g, alpha),
        }
    }

    /// The gate as the activation reads it, and its derivative (0 where clamped; torch's
    /// clamp passes the gradient at the limit itself).
    #[inline]
    fn gate(self, g: f32) -> (f32, f32) {
        match self {
            Self::ClampedSwiglu { limit, .. } if g > limit => (limit, 0.0),
            _ => (g, 1.0),
        }
    }

    /// The up projection as the product reads it, and its derivative.
    #[inline]
    fn up(self, u: f32) -> (f32, f32) {
        match self {
            Self::ClampedSwiglu { limit, .. } => match u.abs() > limit {
                true => (u.clamp(-limit, limit) + 1.0, 0.0),
                false => (u + 1.0, 1.0),
            },
            _ => (u, 1.0),
        }
    }

    /// Whether our fused kernel (CPU or CUDA) serves `t`.
    fn kernel_serves(self, t: &Tensor) -> bool {
        crate::has_kernel(t, Kernel::Swiglu)
    }

    /// `act(g) · u` by composed ops.
    fn composed(self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => g.silu()? * u,
            Self::GeluTanh => g.gelu()? * u,
            Self::ClampedSwiglu { alpha, limit } => {
                let (alpha, limit) = (alpha as f64, limit as f64);
                let g = g.minimum(limit)?;
                let s = candle_nn::ops::sigmoid(&(&g * alpha)?)?;
                (g * s)? * (u.clamp(-limit, limit)? + 1.0)?
            }
        }
    }
}

/// `act(gate) · up`, keeping only `gate` and `up` for the backward.
pub fn gated_act(gate: &Tensor, up: &Tensor, act: GatedActivation) -> Result<Tensor> {
    let (g, u) = (gate.detach(), up.detach());
    let kernel =
        act.kernel_serves(&g) && g.device().same_device(u.device()) && g.dtype() == u.dtype();
    let (g, u) = if kernel {
        (g.contiguous()?, u.contiguous()?)
    } else {
        (g, u)
    };
    let y = if kernel {
        // Run by the with_grad op's forward, into its own output.
        Value::ByTheOp(Box::new(crate::grad::Op2Output {
            op: GatedForward(act),
            a: g.clone(),
            b: u.clone(),
        }))
    } else {
        Value::Computed(act.composed(&g, &u)?)
    };
    let (g_tracks, u_tracks) = (gate.track_op(), up.track_op());
    // Third argument repeated: with_grad3 serves two inputs as well.
    with_grad3((gate, up, up), y, move |_, grad| -> Result<Grads3> {
        let (d_g, d_u) = gated_grads(&g, &u, grad, act, kernel)?;
        Ok((g_tracks.then_some(d_g), u_tracks.then_some(d_u), None))
    })
}

/// `act(g) · u` outside any graph, and whether the fused kernel computed it (the backward
/// then takes the kernel too).
pub(crate) fn gated_value(g: &Tensor, u: &Tensor, act: GatedActivation) -> Result<(Tensor, bool)> {
    let kernel = act.kernel_serves(g);
    let gated = match kernel {
        true => g.apply_op2_no_bwd(u, &GatedForward(act))?,
        false => act.composed(g, u)?,
    };
    Ok((gated, kernel))
}

/// dL/dgate and dL/dup of [`gated_act`] from the gradient of its output.
pub(crate) fn gated_grads(
    g: &Tensor,
    u: &Tensor,
    grad: &Tensor,
    act: GatedActivation,
    kernel: bool,
) -> Result<(Tensor, Tensor)> {
    if kernel {
        let n = g.elem_count();
        let grad = grad.to_dtype(g.dtype())?.contiguous()?;
        let both = g.apply_op3_no_bwd(u, &grad, &GatedBackward(act))?;
        let d_g = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let d_u = both.narrow(0, n, n)?.reshape(g.shape())?;
        return Ok((d_g, d_u));
    }
    // act(g) = g · s with s = sigmoid(a(g)): d act/dg = s + g · s · (1 − s) · a'(g).
    let (g, u, g_pass, u_pass) = match act {
        GatedActivation::ClampedSwiglu { limit, .. } => {
            let limit = limit as f64;
            let g_pass = g.le(limit)?.to_dtype(g.dtype())?;
            let u_pass = u.abs()?.le(limit)?.to_dtype(u.dtype())?;
            let u = (u.clamp(-limit, limit)? + 1.0)?;
            (g.minimum(limit)?, u, Some(g_pass), Some(u_pass))
        }
        _ => (g.clone(), u.clone(), None, None),
    };
    // a(g) and a'(g): a tensor for GELU, a constant (1, alpha) for the others.
    let (a, da, da_const) = match act {
        GatedActivation::Silu => (g.clone(), None, 1.0),
        GatedActivation::GeluTanh => {
            let g2 = g.sqr()?;
            let c = 2.0 * GELU_C;
            let a = ((&g + ((&g2 * &g)? * 0.044715)?)? * c)?;
            let da = ((g2 * (3.0 * 0.044715 * c))? + c)?;
            (a, Some(da), 1.0)
        }
        GatedActivation::ClampedSwiglu { alpha, .. } => ((&g * alpha as f64)?, None, alpha as f64),
    };
    let s = candle_nn::ops::sigmoid(&a)?;
    let value = (&g * &s)?;
    let mut d_u = (grad * &value)?;
    let mut slope = ((&value * (1.0 - &s)?)? * da_const)?;
    if let Some(da) = da {
        slope = (slope * da)?;
    }
    let mut d_g = ((grad * &u)? * (&s + slope)?)?;
    if let (Some(g_pass), Some(u_pass)) = (g_pass, u_pass) {
        d_g = (d_g * g_pass)?;
        d_u = (d_u * u_pass)?;
    }
    Ok((d_g, d_u))
}

/// A gated MLP `down(act(gate(x)) · up(x))` with three frozen weights (`gate`, `up`
/// `[inter, hidden]`, `down` `[hidden, inter]`) as one autograd node: keeps only the two
/// projections for the backward, and the autograd graph sees no intermediate tensor.
pub fn frozen_mlp(
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    act: GatedActivation,
) -> Result<Tensor> {
    let hidden = gate.dim(1)?;
    let rows = x.elem_count() / hidden;
    let x2 = x.detach().reshape((rows, hidden))?;
    let g = frozen_matmul(&x2, gate, true)?;
    let u = frozen_matmul(&x2, up, true)?;
    let (gated, kernel) = gated_value(&g, &u, act)?;
    let y = Value::linear(&gated, down, x.shape())?;
    drop(gated);
    let (gate, up, down) = (gate.clone(), up.clone(), down.clone());
    let x_shape = x.shape().clone();
    // Argument repeated: with_grad3 serves one input as well. The gate's and up's shares of
    // dL/dx go into one sum, with the gradient gathered for x on a layer tape.
    with_grad3_acc((x, x, x), y, move |grad, gathered| -> Result<Grads3> {
        let d_act = frozen_matmul(&grad.reshape((rows, hidden))?, &down, false)?;
        let (d_g, d_u) = gated_grads(&g, &u, &d_act, act, kernel)?;
        let d_x = add_input_grad(gathered, &d_g, &gate, &x_shape)?;
        let owned = Accumulated {
            grad: d_x,
            owned: true,
        };
        Ok((
            Some(add_input_grad(Some(owned), &d_u, &up, &x_shape)?),
            None,
            None,
        ))
    })
}

/// Elements per parallel task of the CPU kernels.
const CPU_BLOCK: usize = 1 << 14;

/// `act(gate) · up` in one kernel (CPU and CUDA).
struct GatedForward(GatedActivation);

impl CustomOp2 for GatedForward {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (cpu_f32(g, gl)?, cpu_f32(u, ul)?);
        let act = self.0;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CPU_BLOCK)
            .zip(g.par_chunks(CPU_BLOCK).zip(u.par_chunks(CPU_BLOCK)))
            .for_each(|(y, (g, u))| {
                for (y, &g) in y.iter_mut().zip(g) {
                    *y = -act.arg(act.gate(g).0).0;
                }
                crate::fast_exp::exp_in_place(y);
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = act.gate(g).0 / (1.0 + *y) * act.up(u).0;
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::cuda::gated_fwd((g, gl), (u, ul), self.0)?,
            gl.shape().clone(),
        ))
    }
}

/// `[d gate; d up]` (flat, `2 × n`) from `(gate, up, dL/dy)` in one kernel (CPU and CUDA).
struct GatedBackward(GatedActivation);

impl CustomOp3 for GatedBackward {
    fn name(&self) -> &'static str {
        "gated-activation-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        grad: &CpuStorage,
        gradl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u, dy) = (cpu_f32(g, gl)?, cpu_f32(u, ul)?, cpu_f32(grad, gradl)?);
        let act = self.0;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (d_g, d_u) = out.split_at_mut(n);
        d_g.par_chunks_mut(CPU_BLOCK)
            .zip(d_u.par_chunks_mut(CPU_BLOCK))
            .zip(g.par_chunks(CPU_BLOCK).zip(u.par_chunks(CPU_BLOCK)))
            .zip(dy.par_chunks(CPU_BLOCK))
            .for_each(|(((d_g, d_u), (g, u)), dy)| {
                // e^-a(g), in d_g until it is overwritten.
                for (e, &g) in d_g.iter_mut().zip(g) {
                    *e = -act.arg(act.gate(g).0).0;
                }
                crate::fast_exp::exp_in_place(d_g);
                for i in 0..g.len() {
                    let ((gi, g_pass), (ui, u_pass)) = (act.gate(g[i]), act.up(u[i]));
                    let s = 1.0 / (1.0 + d_g[i]);
                    let value = gi * s;
                    d_u[i] = dy[i] * value * u_pass;
                    // d (g·s)/dg = s + g·s·(1 − s)·a'(g).
                    d_g[i] = dy[i] * ui * (s + value * (1.0 - s) * act.arg(gi).1) * g_pass;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        grad: &candle_core::CudaStorage,
        gradl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::gated_bwd((g, gl), (u, ul), (grad, gradl), self.0)?;
        Ok((out, Shape::from(2 * gl.shape().elem_count())))
    }
}
