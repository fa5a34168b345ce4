//! Launchers for our CUDA kernels (`kernels/*.cu`), compiled once per process with NVRTC so
//! that building needs no CUDA compiler. Inputs must be contiguous; outputs are fresh buffers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::CompileOptions;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use half::bf16;
use std::sync::OnceLock;

const SOURCE: &str = concat!(
    include_str!("kernels/ops.cu"),
    include_str!("kernels/lora.cu"),
    include_str!("kernels/attention.cu"),
    include_str!("kernels/optim.cu")
);
/// The files of `SOURCE`, in its order.
const SOURCE_FILES: [&str; 4] = ["ops.cu", "lora.cu", "attention.cu", "optim.cu"];
const MODULE: &str = "peft_ops";
/// The virtual architectures our kernels are compiled for: compute_80, the first with the bf16
/// tensor-core, `ldmatrix` and `cp.async` instructions they use (the driver compiles it for any
/// GPU from sm_80 on), and compute_90 for Hopper and later, where the kernels use what sm_90
/// adds (vector atomics: `__CUDA_ARCH__ >= 900` in the source). candle's own kernels are built
/// for the GPU `CUDA_COMPUTE_CAP` names.
const ARCHS: [&str; 2] = ["compute_80", "compute_90"];
/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("peft-ops cuda: {e:?}"))
}

/// Our kernels' source: the embedded one, or with `PEFT_CUDA_KERNELS=DIR` the files of
/// `SOURCE_FILES` in DIR. That compares variants of a kernel (with the same arguments) on a
/// GPU without another build of the binary (scripts/gpu/variants.sh).
fn kernel_source() -> std::result::Result<String, String> {
    let Some(dir) = std::env::var_os("PEFT_CUDA_KERNELS") else {
        return Ok(SOURCE.to_string());
    };
    let dir = std::path::Path::new(&dir);
    let read = |f: &&str| {
        let path = dir.join(f);
        std::fs::read_to_string(&path)
            .map_err(|e| format!("PEFT_CUDA_KERNELS: cannot read {}: {e}", path.display()))
    };
    Ok(SOURCE_FILES
        .iter()
        .map(read)
        .collect::<std::result::Result<Vec<_>, _>>()?
        .concat())
}

/// Our kernels as PTX for the GPU of `dev` (compiled once per process and architecture; each
/// GPU's architecture asked of the driver once).
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static ARCH_OF_GPU: std::sync::Mutex<Vec<(usize, &'static str)>> =
        std::sync::Mutex::new(Vec::new());
    let context = dev.cuda_stream().context().clone();
    let ordinal = context.ordinal();
    let mut known = ARCH_OF_GPU.lock().unwrap();
    let arch = match known.iter().find(|(o, _)| *o == ordinal) {
        Some(&(_, arch)) => arch,
        None => {
            let (major, _) = context.compute_capability().map_err(err)?;
            let arch = ARCHS[usize::from(major >= 9)];
            known.push((ordinal, arch));
            arch
        }
    };
    drop(known);
    ptx_for(arch)
}

/// Our kernels as PTX for virtual architecture `arch` (one of [`ARCHS`]).
fn ptx_for(arch: &'static str) -> Result<&'static str> {
    static PTX: [OnceLock<std::result::Result<String, String>>; 2] =
        [OnceLock::new(), OnceLock::new()];
    let slot = ARCHS
        .iter()
        .position(|a| *a == arch)
        .ok_or_else(|| err(format!("no PTX for {arch}")))?;
    PTX[slot]
        .get_or_init(|| {
            let opts = CompileOptions {
                arch: Some(arch),
                ..Default::default()
            };
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(kernel_source()?, opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("NVRTC could not compile our CUDA kernels: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        dt => candle_core::bail!("peft-ops cuda kernels support f32 and bf16, not {dt:?}"),
    }
}

fn contiguous(l: &Layout) -> Result<()> {
    if l.is_contiguous() {
        Ok(())
    } else {
        candle_core::bail!("peft-ops cuda: input not contiguous")
    }
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A scalar kernel argument.
enum Scalar {
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Launches `name_<dtype>` over `inputs` (all of `T`), a fresh output of `out_len` elements,
/// then `scalars`, in the order of the kernel's parameters.
fn launch<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    cfg: LaunchConfig,
    scalars: &[Scalar],
) -> Result<CudaStorage> {
    let func =
        dev.get_or_load_custom_func(&format!("{name}_{}", suffix(T::DTYPE)?), MODULE, ptx(dev)?)?;
    let views = inputs
        .iter()
        .map(|(s, l)| cuda_view::<T>(s, l))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<T>(out_len)? };
    let mut builder = func.builder();
    for v in &views {
        builder.arg(v);
    }
    builder.arg(&out);
    for s in scalars {
        match s {
            Scalar::I32(v) => builder.arg(v),
            Scalar::I64(v) => builder.arg(v),
            Scalar::F32(v) => builder.arg(v),
        };
    }
    // SAFETY: argument list matches the kernel's signature in kernels/ops.cu.
    unsafe { builder.launch(cfg) }.map_err(err)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            dt => candle_core::bail!("peft-ops cuda kernels support f32 and bf16, not {dt:?}"),
        }
    };
}

pub(crate) fn causal_softmax_fwd(
    x: &CudaStorage,
    l: &Layout,
    q: usize,
    k: usize,
    scale: f32,
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        l: &Layout,
        q: usize,
        k: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let n = l.shape().elem_count();
        launch::<T>(
            x.device(),
            "causal_softmax_fwd",
            &[(x, l)],
            n,
            rows_config(n / k),
            &[
                Scalar::I32(q as i32),
                Scalar::I32(k as i32),
                Scalar::F32(scale),
            ],
        )
    }
    dispatch!(x.dtype(), f(x, l, q, k, scale))
}

pub(crate) fn causal_softmax_bwd(
    y: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    k: usize,
    scale: f32,
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        y: (&CudaStorage, &Layout),
        g: (&CudaStorage, &Layout),
        k: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let n = y.1.shape().elem_count();
        launch::<T>(
            y.0.device(),
            "causal_softmax_bwd",
            &[y, g],
            n,
            rows_config(n / k),
            &[Scalar::I32(k as i32), Scalar::F32(scale)],
        )
    }
    dispatch!(y.0.dtype(), f(y, g, k, scale))
}

/// `x / rms(x) * w` over rows of `w`'s length (contiguous, f32 or bf16).
pub(crate) fn rms_norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    rms_norm_rows("rms_norm_fwd", &[x, w], eps)
}

/// dL/dx of [`rms_norm_fwd`] from `x`, `w` and dL/dy, plus `res` (x's size) when given.
pub(crate) fn rms_norm_bwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    res: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<CudaStorage> {
    match res {
        Some(res) => rms_norm_rows("rms_norm_bwd_add", &[x, w, g, res], eps),
        None => rms_norm_rows("rms_norm_bwd", &[x, w, g], eps),
    }
}

/// A trained embedding's gradient `[vocab, d]` (`grad`'s dtype) from the token ids `[n]` (u32)
/// and the gradient of their rows `[n, d]` (contiguous): each row of ids summed in f32 in
/// position order (`embedding_chains`, then `embedding_bwd` in kernels/ops.cu).
pub(crate) fn embedding_grad(ids: &Tensor, grad: &Tensor, vocab: usize) -> Result<Tensor> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        ids: &Tensor,
        grad: &Tensor,
        vocab: usize,
    ) -> Result<Tensor> {
        let dev = cuda_device(grad)?;
        let (n, d) = grad.dims2()?;
        if ids.dims() != [n] || ids.dtype() != DType::U32 || n > i32::MAX as usize {
            candle_core::bail!(
                "embedding grad: ids {:?} for rows {:?}",
                ids.shape(),
                grad.shape()
            );
        }
        let out = Tensor::zeros((vocab, d), T::DTYPE, grad.device())?;
        if n == 0 {
            return Ok(out);
        }
        let ((is, il), (gs, gl)) = (ids.storage_and_layout(), grad.storage_and_layout());
        let (iv, gv) = (view::<u32>(&is, il)?, view::<T>(&gs, gl)?);
        // SAFETY: embedding_chains writes every position's entries.
        let (next, lead) = unsafe { (dev.alloc::<i32>(n)?, dev.alloc::<i32>(n)?) };
        let n_ = n as i32;
        let chains = dev.get_or_load_custom_func("embedding_chains", MODULE, ptx(&dev)?)?;
        let mut builder = chains.builder();
        builder.arg(&iv).arg(&n_).arg(&next).arg(&lead);
        // SAFETY: the arguments match embedding_chains in kernels/ops.cu.
        unsafe { builder.launch(elementwise_config(n)) }.map_err(err)?;
        {
            let (os, ol) = out.storage_and_layout();
            let ov = view::<T>(&os, ol)?;
            let bwd = dev.get_or_load_custom_func(
                &format!("embedding_bwd_{}", suffix(T::DTYPE)?),
                MODULE,
                ptx(&dev)?,
            )?;
            let (d_, vocab_) = (d as i32, vocab as i64);
            let mut builder = bwd.builder();
            builder.arg(&iv).arg(&gv).arg(&next).arg(&lead).arg(&ov);
            builder.arg(&d_).arg(&vocab_);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match embedding_bwd_* in kernels/ops.cu; `out` is a new
            // `[vocab, d]` tensor only this kernel writes, at rows below `vocab`.
            unsafe { builder.launch(cfg) }.map_err(err)?;
        }
        Ok(out)
    }
    dispatch!(grad.dtype(), f(ids, grad, vocab))
}

/// Columns a thread of `rms_norm_dw_part` sums at most (`NORM_DW_COLS` in kernels/ops.cu):
/// rows of up to 256 times this many take the kernels.
pub(crate) const NORM_DW_MAX: usize = 256 * 32;

/// Blocks of rows whose sums `rms_norm_dw_sum` adds (fewer when there are fewer rows).
const NORM_DW_BLOCKS: usize = 512;

/// dL/dw of [`rms_norm_fwd`] (f32, `[d]`) from `x` and dL/dy (contiguous, f32 or bf16, rows of
/// `d` ≤ [`NORM_DW_MAX`]): Σ over rows of `g · x / rms(x)`, the same sums on every run.
pub(crate) fn rms_norm_dw(x: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        x: &Tensor,
        g: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let dev = cuda_device(x)?;
        let d = x.dims().last().copied().unwrap_or(0);
        if d == 0 || d > NORM_DW_MAX || g.shape() != x.shape() {
            candle_core::bail!(
                "rms_norm dw: rows {:?} and gradient {:?}",
                x.shape(),
                g.shape()
            );
        }
        let rows = x.elem_count() / d;
        if rows == 0 {
            return Tensor::zeros(d, DType::F32, x.device());
        }
        let blocks = rows.min(NORM_DW_BLOCKS);
        let per = rows.div_ceil(blocks);
        let blocks = rows.div_ceil(per);
        let ((xs, xl), (gs, gl)) = (x.storage_and_layout(), g.storage_and_layout());
        let (xv, gv) = (view::<T>(&xs, xl)?, view::<T>(&gs, gl)?);
        // SAFETY: rms_norm_dw_part writes every block's d sums.
        let partial = unsafe { dev.alloc::<f32>(blocks * d)? };
        let part = dev.get_or_load_custom_func(
            &format!("rms_norm_dw_part_{}", suffix(T::DTYPE)?),
            MODULE,
            ptx(&dev)?,
        )?;
        let (rows_, d_, per_) = (rows as i64, d as i32, per as i64);
        let mut builder = part.builder();
        builder.arg(&xv).arg(&gv).arg(&partial);
        builder.arg(&rows_).arg(&d_).arg(&eps).arg(&per_);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match rms_norm_dw_part_* in kernels/ops.cu.
        unsafe { builder.launch(cfg) }.map_err(err)?;
        // SAFETY: every column is written.
        let dw = unsafe { dev.alloc::<f32>(d)? };
        let sum = dev.get_or_load_custom_func("rms_norm_dw_sum", MODULE, ptx(&dev)?)?;
        let blocks_ = blocks as i32;
        let mut builder = sum.builder();
        builder.arg(&partial).arg(&dw).arg(&blocks_).arg(&d_);
        // SAFETY: the arguments match rms_norm_dw_sum in kernels/ops.cu.
        unsafe { builder.launch(elementwise_config(d)) }.map_err(err)?;
        Ok(wrap(dw, &dev, &[d]))
    }
    dispatch!(x.dtype(), f(x, g, eps))
}

/// Rows per 256-thread block of the RMSNorm kernels, a warp each (`NORM_ROWS` in kernels/ops.cu).
const NORM_ROWS: usize = 8;

/// Launches the RMSNorm kernel `name` (a warp per row of `w`'s length) on `inputs`, `x` and
/// `w` first, for an output of `x`'s size.
fn rms_norm_rows(name: &str, inputs: &[(&CudaStorage, &Layout)], eps: f32) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        eps: f32,
    ) -> Result<CudaStorage> {
        let (x, w) = (inputs[0], inputs[1]);
        let n = x.1.shape().elem_count();
        let d = w.1.shape().elem_count();
        if x.1.shape().dims().last() != Some(&d) || n == 0 {
            candle_core::bail!(
                "rms_norm: input {:?} and weight {:?} do not fit",
                x.1.shape(),
                w.1.shape()
            );
        }
        let rows = n / d;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(NORM_ROWS) as u32, 1, 1),
            block_dim: (32 * NORM_ROWS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scalars = [
            Scalar::I64(rows as i64),
            Scalar::I32(d as i32),
            Scalar::F32(eps),
        ];
        launch::<T>(x.0.device(), name, inputs, n, cfg, &scalars)
    }
    dispatch!(inputs[0].0.dtype(), f(name, inputs, eps))
}

fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elements per thread of the gated-activation kernels (`GATED_PACK` in kernels/ops.cu).
const GATED_PACK: usize = 8;

/// `act(g) · u` (SwiGLU, or GeGLU when `gelu`).
pub(crate) fn gated_fwd(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
    act: crate::GatedActivation,
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        g: (&CudaStorage, &Layout),
        u: (&CudaStorage, &Layout),
        act: crate::GatedActivation,
    ) -> Result<CudaStorage> {
        let n = g.1.shape().elem_count();
        let [kind, alpha, limit] = gated_args(act);
        launch::<T>(
            g.0.device(),
            "gated_fwd",
            &[g, u],
            n,
            elementwise_config(n.div_ceil(GATED_PACK)),
            &[Scalar::I64(n as i64), kind, alpha, limit],
        )
    }
    dispatch!(g.0.dtype(), f(g, u, act))
}

/// The gated kernels' activation arguments: its kind (`GATED_*` of kernels/ops.cu), and
/// gpt-oss's alpha and limit.
fn gated_args(act: crate::GatedActivation) -> [Scalar; 3] {
    use crate::GatedActivation::*;
    let (kind, alpha, limit) = match act {
        Silu => (0, 1.0, 0.0),
        GeluTanh => (1, 1.0, 0.0),
        ClampedSwiglu { alpha, limit } => (2, alpha, limit),
    };
    [Scalar::I32(kind), Scalar::F32(alpha), Scalar::F32(limit)]
}

/// `a + b` (one shape, contiguous), eight elements a thread.
pub(crate) fn add_same(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let n = a.1.shape().elem_count();
        launch::<T>(
            a.0.device(),
            "add_same",
            &[a, b],
            n,
            elementwise_config(n.div_ceil(GATED_PACK)),
            &[Scalar::I64(n as i64)],
        )
    }
    dispatch!(a.0.dtype(), f(a, b))
}

/// `[d gate; d up]` stacked: `2 × n` elements.
pub(crate) fn gated_bwd(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    act: crate::GatedActivation,
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        g: (&CudaStorage, &Layout),
        u: (&CudaStorage, &Layout),
        grad: (&CudaStorage, &Layout),
        act: crate::GatedActivation,
    ) -> Result<CudaStorage> {
        let n = g.1.shape().elem_count();
        let [kind, alpha, limit] = gated_args(act);
        launch::<T>(
            g.0.device(),
            "gated_bwd",
            &[g, u, grad],
            2 * n,
            elementwise_config(n.div_ceil(GATED_PACK)),
            &[Scalar::I64(n as i64), kind, alpha, limit],
        )
    }
    dispatch!(g.0.dtype(), f(g, u, grad, act))
}

/// Per-row cross-entropy losses of `logits` `[rows, vocab]` (f32 or bf16, contiguous) against
/// `labels` `[rows]` (i64; negative: not counted, loss 0), the rows' entropies and top-1 hits
/// (1 where the label is the first largest logit; both 0 on rows not counted), and when `grad`
/// the logits' gradient `(softmax − one_hot) · inv_denom` (0 on rows not counted) in the
/// logits' dtype.
pub(crate) fn cross_entropy_rows(
    logits: &Tensor,
    labels: &Tensor,
    inv_denom: f32,
    grad: bool,
) -> Result<crate::ops::RowsLoss> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        logits: &Tensor,
        labels: &Tensor,
        inv_denom: f32,
        grad: bool,
    ) -> Result<crate::ops::RowsLoss> {
        let (rows, vocab) = logits.dims2()?;
        let dev = cuda_device(logits)?;
        let (ls, ll) = logits.storage_and_layout();
        let (bs, bl) = labels.storage_and_layout();
        let (lv, bv) = (view::<T>(&ls, ll)?, view::<i64>(&bs, bl)?);
        // SAFETY: one loss, entropy and top-1 hit per row, written by that row's block.
        let loss = unsafe { dev.alloc::<f32>(rows)? };
        let entropy = unsafe { dev.alloc::<f32>(rows)? };
        let top1 = unsafe { dev.alloc::<f32>(rows)? };
        // SAFETY: written in full when `grad`; a one-element placeholder otherwise.
        let dlogits = unsafe { dev.alloc::<T>(if grad { rows * vocab } else { 1 })? };
        let func = dev.get_or_load_custom_func(
            &format!("cross_entropy_rows_{}", suffix(T::DTYPE)?),
            MODULE,
            ptx(&dev)?,
        )?;
        let (vocab_, grad_) = (vocab as i32, grad as i32);
        let mut builder = func.builder();
        builder.arg(&lv).arg(&bv).arg(&dlogits).arg(&loss);
        builder.arg(&entropy).arg(&top1);
        builder.arg(&vocab_).arg(&inv_denom).arg(&grad_);
        // SAFETY: the arguments match cross_entropy_rows_{f32,bf16} in kernels/ops.cu.
        unsafe { builder.launch(rows_config(rows)) }.map_err(err)?;
        Ok(crate::ops::RowsLoss {
            loss: wrap(loss, &dev, &[rows]),
            entropy: wrap(entropy, &dev, &[rows]),
            top1: wrap(top1, &dev, &[rows]),
            dlogits: grad.then(|| wrap(dlogits, &dev, &[rows, vocab])),
        })
    }
    dispatch!(logits.dtype(), f(logits, labels, inv_denom, grad))
}

/// Rows per block of `low_rank_add` (`LRA_ROWS` in kernels/lora.cu).
const LOW_RANK_ADD_ROWS: usize = 64;
/// Threads per block of `low_rank_add` (`LRA_THREADS`), each taking `LRA_COLS` (2) columns.
const LOW_RANK_ADD_THREADS: usize = 128;

/// The dropout arguments of our LoRA kernels (`DROPOUT_PARAMS` in kernels/ops.cu): off, or
/// the keys, threshold and scale of a mask, which the kernels draw element by element.
struct DropoutArgs {
    on: i32,
    k1: u32,
    k2: u32,
    threshold: u32,
    scale: f32,
}

impl DropoutArgs {
    fn new(dropout: Option<crate::Dropout>) -> Self {
        match dropout {
            Some(d) => {
                let (k1, k2) = d.keys();
                Self {
                    on: 1,
                    k1,
                    k2,
                    threshold: d.threshold(),
                    scale: d.scale(),
                }
            }
            None => Self {
                on: 0,
                k1: 0,
                k2: 0,
                threshold: 0,
                scale: 0.0,
            },
        }
    }

    fn push<'a>(&'a self, builder: &mut LaunchArgs<'a>) {
        builder
            .arg(&self.on)
            .arg(&self.k1)
            .arg(&self.k2)
            .arg(&self.threshold)
            .arg(&self.scale);
    }
}

/// `base + scale · (left · rightᵀ) ∘ mask` (`right_t`: `right` given as `[r, cols]`, else
/// `[cols, r]`; the mask that of `dropout` over `[rows, cols]`, drawn in the kernel) for
/// `base` `[rows, cols]` (f32 or bf16) and f32 `left` `[rows, r]`: one kernel pass. All
/// contiguous.
pub(crate) fn low_rank_add(
    base: &Tensor,
    left: &Tensor,
    right: &Tensor,
    right_t: bool,
    dropout: Option<crate::Dropout>,
    scale: f32,
) -> Result<Tensor> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        base: &Tensor,
        left: &Tensor,
        right: &Tensor,
        right_t: bool,
        dropout: Option<crate::Dropout>,
        scale: f32,
    ) -> Result<Tensor> {
        let (rows, cols) = base.dims2()?;
        let dev = cuda_device(base)?;
        let (bs, bl) = base.storage_and_layout();
        // SAFETY: every element is written.
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let low_rank = LowRank {
            left,
            right,
            right_t,
            dropout,
            scale,
        };
        launch_low_rank_add(&dev, &view::<T>(&bs, bl)?, &out, (rows, cols), &low_rank)?;
        Ok(wrap(out, &dev, &[rows, cols]))
    }
    dispatch!(base.dtype(), f(base, left, right, right_t, dropout, scale))
}

/// [`low_rank_add`] into `base` itself, `[rows, cols]` contiguous from the storage's start and
/// read by no one else meanwhile (the frozen matmul's output before it becomes a tensor, an
/// input gradient just summed): no second `[rows, cols]` buffer.
pub(crate) fn low_rank_add_in_place(
    base: &CudaStorage,
    (rows, cols): (usize, usize),
    left: &Tensor,
    (right, right_t): (&Tensor, bool),
    dropout: Option<crate::Dropout>,
    scale: f32,
) -> Result<()> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        base: &CudaStorage,
        dims: (usize, usize),
        low_rank: &LowRank,
    ) -> Result<()> {
        let out = base.as_cuda_slice::<T>()?;
        launch_low_rank_add(base.device(), &out.as_view(), out, dims, low_rank)
    }
    let low_rank = LowRank {
        left,
        right,
        right_t,
        dropout,
        scale,
    };
    dispatch!(base.dtype(), f(base, (rows, cols), &low_rank))
}

/// [`low_rank_add_in_place`] into a tensor `[.., cols]` that no one else reads meanwhile
/// (see `cublas::takes_products_in_place`).
pub(crate) fn low_rank_add_into(
    base: &Tensor,
    left: &Tensor,
    (right, right_t): (&Tensor, bool),
    dropout: Option<crate::Dropout>,
    scale: f32,
) -> Result<()> {
    let cols = base.dims().last().copied().unwrap_or(0);
    if cols == 0 {
        candle_core::bail!("low-rank add: no columns in {:?}", base.shape());
    }
    let dims = (base.elem_count() / cols, cols);
    crate::cublas::in_place(base, |cs| {
        low_rank_add_in_place(cs, dims, left, (right, right_t), dropout, scale)
    })
}

/// The low-rank term of [`low_rank_add`].
struct LowRank<'a> {
    left: &'a Tensor,
    right: &'a Tensor,
    right_t: bool,
    dropout: Option<crate::Dropout>,
    scale: f32,
}

/// Launches low_rank_add_{f32,bf16}: `out = base + low-rank term`. `base` may view `out`
/// itself: each element is read, then written, by the same thread.
fn launch_low_rank_add<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    base: &CudaView<T>,
    out: &CudaSlice<T>,
    (rows, cols): (usize, usize),
    low_rank: &LowRank,
) -> Result<()> {
    let LowRank {
        left,
        right,
        right_t,
        dropout,
        scale,
    } = *low_rank;
    let r = left.dim(1)?;
    let (ro, rk) = if right_t {
        (1i64, cols as i64)
    } else {
        (r as i64, 1i64)
    };
    let (ls, ll) = left.storage_and_layout();
    let (rs, rl) = right.storage_and_layout();
    let (lv, rv) = (view::<f32>(&ls, ll)?, view::<f32>(&rs, rl)?);
    let func = dev.get_or_load_custom_func(
        &format!("low_rank_add_{}", suffix(T::DTYPE)?),
        MODULE,
        ptx(dev)?,
    )?;
    let (rows_, cols_, r_) = (rows as i64, cols as i32, r as i32);
    let drop = DropoutArgs::new(dropout);
    let mut builder = func.builder();
    builder.arg(base).arg(&lv).arg(&rv).arg(out);
    builder
        .arg(&rows_)
        .arg(&cols_)
        .arg(&r_)
        .arg(&ro)
        .arg(&rk)
        .arg(&scale);
    drop.push(&mut builder);
    let cfg = LaunchConfig {
        grid_dim: (
            rows.div_ceil(LOW_RANK_ADD_ROWS) as u32,
            cols.div_ceil(LOW_RANK_ADD_THREADS * 2) as u32,
            1,
        ),
        block_dim: (LOW_RANK_ADD_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match low_rank_add_{f32,bf16} in kernels/lora.cu.
    unsafe { builder.launch(cfg) }.map_err(err)?;
    Ok(())
}

/// Ranks per block of the thin kernels (`THIN_RANKS` in kernels/lora.cu).
const THIN_RANKS: usize = 16;
/// Rows per block of `thin_project` (`THIN_ROWS`).
const THIN_ROWS: usize = 32;
/// Columns per shared-memory stage of `thin_project` (`THIN_CHUNK`); its column splits are
/// multiples of it.
const THIN_CHUNK: usize = 256;
/// Columns per block of `thin_outer` (one thread each).
const THIN_OUTER_THREADS: usize = 128;
/// Blocks that keep an H100/H200 busy (132 SMs): about four 256-thread blocks per SM.
const BUSY_BLOCKS: usize = 528;

/// The column splits of `thin_project` for `blocks` blocks per split: enough splits to keep
/// the GPU busy, each a multiple of `THIN_CHUNK` columns. Returns (splits, columns per split).
fn thin_project_splits(n: usize, blocks: usize) -> (usize, usize) {
    let chunks = n.div_ceil(THIN_CHUNK).max(1);
    let wanted = BUSY_BLOCKS.div_ceil(blocks).clamp(1, chunks);
    let per_split = chunks.div_ceil(wanted) * THIN_CHUNK;
    (n.div_ceil(per_split).max(1), per_split)
}

/// Launches thin_outer_sum: `out[j · o_sn + k · o_sk] = scale · Σ_split part[split, j, k]`
/// over the `nr` values of `[n, r]` (or `[rows, r]`).
fn launch_thin_sum(
    dev: &CudaDevice,
    part: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    (splits, nr, r): (usize, usize, usize),
    (o_sn, o_sk): (i64, i64),
    scale: f32,
) -> Result<()> {
    let func = dev.get_or_load_custom_func("thin_outer_sum", MODULE, ptx(dev)?)?;
    let (splits_, nr_, r_) = (splits as i32, nr as i64, r as i32);
    let mut builder = func.builder();
    builder.arg(part).arg(out).arg(&splits_).arg(&nr_).arg(&r_);
    builder.arg(&o_sn).arg(&o_sk).arg(&scale);
    // SAFETY: the arguments match thin_outer_sum in kernels/lora.cu.
    unsafe { builder.launch(elementwise_config(nr)) }.map_err(err)?;
    Ok(())
}

/// `scale · (x ∘ mask) · wᵀ` (f32 `[rows, r]`) for `x` `[rows, n]` (f32 or bf16), the mask
/// that of `dropout` (drawn in the kernel), and f32 `w` `[r, n]` (or `[n, r]` when `w_t`): one
/// kernel that reads `x` as it is stored. All contiguous.
pub(crate) fn thin_project(
    x: &Tensor,
    dropout: Option<crate::Dropout>,
    w: &Tensor,
    w_t: bool,
    scale: f32,
) -> Result<Tensor> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        x: &Tensor,
        dropout: Option<crate::Dropout>,
        w: &Tensor,
        w_t: bool,
        scale: f32,
    ) -> Result<Tensor> {
        let (rows, n) = x.dims2()?;
        let r = if w_t { w.dim(1)? } else { w.dim(0)? };
        let (w_sk, w_sn) = if w_t {
            (1i64, r as i64)
        } else {
            (n as i64, 1i64)
        };
        let dev = cuda_device(x)?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (xv, wv) = (view::<T>(&xs, xl)?, view::<f32>(&ws, wl)?);
        let (row_blocks, rank_groups) = (rows.div_ceil(THIN_ROWS), r.div_ceil(THIN_RANKS));
        let (splits, per_split) = thin_project_splits(n, row_blocks * rank_groups);
        // SAFETY: every element is written (the splits' partial sums, then their total).
        let out = unsafe { dev.alloc::<f32>(rows * r)? };
        // SAFETY: as `out`.
        let part = (splits > 1)
            .then(|| unsafe { dev.alloc::<f32>(splits * rows * r) })
            .transpose()?;
        let func = dev.get_or_load_custom_func(
            &format!("thin_project_{}", suffix(T::DTYPE)?),
            MODULE,
            ptx(&dev)?,
        )?;
        let (rows_, n_, r_, per_split_) = (rows as i64, n as i32, r as i32, per_split as i32);
        // Several splits write unscaled partial sums; their sum takes the scale.
        let kernel_scale = if part.is_some() { 1.0f32 } else { scale };
        let drop = DropoutArgs::new(dropout);
        let mut builder = func.builder();
        builder.arg(&xv).arg(&wv).arg(&w_sk).arg(&w_sn);
        builder.arg(part.as_ref().unwrap_or(&out));
        builder
            .arg(&rows_)
            .arg(&n_)
            .arg(&r_)
            .arg(&kernel_scale)
            .arg(&per_split_);
        drop.push(&mut builder);
        let cfg = LaunchConfig {
            grid_dim: (row_blocks as u32, rank_groups as u32, splits as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match thin_project_{f32,bf16} in kernels/lora.cu.
        unsafe { builder.launch(cfg) }.map_err(err)?;
        if let Some(part) = &part {
            launch_thin_sum(
                &dev,
                part,
                &out,
                (splits, rows * r, r),
                (r as i64, 1),
                scale,
            )?;
        }
        Ok(wrap(out, &dev, &[rows, r]))
    }
    dispatch!(x.dtype(), f(x, dropout, w, w_t, scale))
}

/// `scale · (x ∘ mask)ᵀ · y` as f32 `[n, r]` (or `[r, n]` when `out_t`) for `x` `[rows, n]`
/// (f32 or bf16), the mask that of `dropout` (drawn in the kernel), and f32 `y` `[rows, r]`:
/// the rows are split over blocks whose partial sums a second kernel adds in a fixed order.
/// All contiguous.
pub(crate) fn thin_outer(
    x: &Tensor,
    dropout: Option<crate::Dropout>,
    y: &Tensor,
    out_t: bool,
    scale: f32,
) -> Result<Tensor> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        x: &Tensor,
        dropout: Option<crate::Dropout>,
        y: &Tensor,
        out_t: bool,
        scale: f32,
    ) -> Result<Tensor> {
        let (rows, n) = x.dims2()?;
        let r = y.dim(1)?;
        let (column_blocks, rank_groups) = (n.div_ceil(THIN_OUTER_THREADS), r.div_ceil(THIN_RANKS));
        // About four blocks per SM, each with at least 128 rows. (Four columns a thread, with
        // a quarter of the threads, ran at half the speed on the H200: too few warps.)
        let splits = BUSY_BLOCKS
            .div_ceil(column_blocks * rank_groups)
            .clamp(1, (rows / 128).max(1));
        let per_split = rows.div_ceil(splits).max(1);
        let splits = rows.div_ceil(per_split).max(1);
        let dev = cuda_device(x)?;
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (xv, yv) = (view::<T>(&xs, xl)?, view::<f32>(&ys, yl)?);
        // SAFETY: every element is written (splits past the rows write zeros).
        let part = unsafe { dev.alloc::<f32>(splits * n * r)? };
        let func = dev.get_or_load_custom_func(
            &format!("thin_outer_{}", suffix(T::DTYPE)?),
            MODULE,
            ptx(&dev)?,
        )?;
        let (rows_, n_, r_, per_split_) = (rows as i64, n as i32, r as i32, per_split as i64);
        let drop = DropoutArgs::new(dropout);
        let mut builder = func.builder();
        builder.arg(&xv).arg(&yv).arg(&part);
        builder.arg(&rows_).arg(&n_).arg(&r_).arg(&per_split_);
        drop.push(&mut builder);
        let cfg = LaunchConfig {
            grid_dim: (column_blocks as u32, rank_groups as u32, splits as u32),
            block_dim: (THIN_OUTER_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match thin_outer_{f32,bf16} in kernels/lora.cu.
        unsafe { builder.launch(cfg) }.map_err(err)?;

        // SAFETY: every element is written.
        let out = unsafe { dev.alloc::<f32>(n * r)? };
        let strides = if out_t {
            (1i64, n as i64)
        } else {
            (r as i64, 1i64)
        };
        launch_thin_sum(&dev, &part, &out, (splits, n * r, r), strides, scale)?;
        let dims = if out_t { [r, n] } else { [n, r] };
        Ok(wrap(out, &dev, &dims))
    }
    dispatch!(x.dtype(), f(x, dropout, y, out_t, scale))
}

/// [`crate::dropout_mask`] drawn on the GPU, bit for bit the CPU's mask.
pub(crate) fn dropout_mask(
    dropout: crate::Dropout,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let Device::Cuda(dev) = device else {
        candle_core::bail!("peft-ops cuda: dropout mask for a non-CUDA device");
    };
    let n: usize = shape.iter().product();
    // SAFETY: every element is written.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let func = dev.get_or_load_custom_func("dropout_mask_f32", MODULE, ptx(dev)?)?;
    let n_ = n as i64;
    let drop = DropoutArgs::new(Some(dropout));
    let mut builder = func.builder();
    builder.arg(&out).arg(&n_);
    drop.push(&mut builder);
    // SAFETY: the arguments match dropout_mask_f32 in kernels/ops.cu.
    unsafe { builder.launch(elementwise_config(n)) }.map_err(err)?;
    Ok(wrap(out, dev, shape))
}

/// `x ∘ mask` in `x`'s dtype (contiguous), the mask `dropout`'s over `x`'s elements (bit for
/// bit [`dropout_mask`]'s).
pub(crate) fn dropout_apply(x: &Tensor, dropout: crate::Dropout) -> Result<Tensor> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        x: &Tensor,
        dropout: crate::Dropout,
    ) -> Result<Tensor> {
        let dev = cuda_device(x)?;
        let n = x.elem_count();
        let (s, l) = x.storage_and_layout();
        let input = view::<T>(&s, l)?;
        // SAFETY: every element is written.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(
            &format!("dropout_apply_{}", suffix(T::DTYPE)?),
            MODULE,
            ptx(&dev)?,
        )?;
        let n_ = n as i64;
        let drop = DropoutArgs::new(Some(dropout));
        let mut builder = func.builder();
        builder.arg(&input).arg(&out).arg(&n_);
        drop.push(&mut builder);
        // SAFETY: the arguments match dropout_apply_* in kernels/ops.cu.
        unsafe { builder.launch(elementwise_config(n)) }.map_err(err)?;
        Ok(wrap(out, &dev, x.dims()))
    }
    dispatch!(x.dtype(), f(x, dropout))
}

/// Up to six contiguous f32 tensors in bf16, by one launch into one buffer: that buffer (the
/// tensors one after another, flat) and each tensor's view of it. LoRA's A and B for cuBLAS,
/// each forward: one layer's, or every A and then every B of the projections that read one
/// input (their A side by side as one matrix).
pub(crate) fn bf16_concat(parts: &[&Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
    const MAX: usize = 6;
    let dev = cuda_device(
        parts
            .first()
            .copied()
            .ok_or_else(|| candle_core::Error::Msg("bf16 concat: no tensors".into()))?,
    )?;
    if parts.len() > MAX || parts.iter().any(|t| t.dtype() != DType::F32) {
        candle_core::bail!("bf16 concat: at most {MAX} f32 tensors");
    }
    let counts: Vec<usize> = parts.iter().map(|t| t.elem_count()).collect();
    let total: usize = counts.iter().sum();
    let guards: Vec<_> = parts.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards
        .iter()
        .map(|(s, l)| view::<f32>(s, l))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every element is written.
    let out = unsafe { dev.alloc::<bf16>(total.max(1))? };
    let func = dev.get_or_load_custom_func("bf16_concat", MODULE, ptx(&dev)?)?;
    let mut ns = [0i64; MAX];
    for (n, &c) in ns.iter_mut().zip(&counts) {
        *n = c as i64;
    }
    // Unused segments point at the last tensor's (n = 0: never read).
    let mut builder = func.builder();
    for i in 0..MAX {
        builder.arg(&views[i.min(views.len() - 1)]).arg(&ns[i]);
    }
    builder.arg(&out);
    if total > 0 {
        // SAFETY: the arguments match bf16_concat in kernels/ops.cu.
        unsafe { builder.launch(elementwise_config(total)) }.map_err(err)?;
    }
    drop(builder);
    let all = wrap(out, &dev, &[total.max(1)]).narrow(0, 0, total)?;
    let mut start = 0;
    let mut each = Vec::with_capacity(parts.len());
    for (t, n) in parts.iter().zip(counts) {
        each.push(all.narrow(0, start, n)?.reshape(t.shape())?);
        start += n;
    }
    Ok((all, each))
}

/// A new `[rows, cols]` bf16 gpu tensor on `like`'s device whose elements are not set: for a
/// buffer every element of which the caller writes before anything reads it.
pub(crate) fn unset_bf16(like: &Tensor, (rows, cols): (usize, usize)) -> Result<Tensor> {
    let dev = cuda_device(like)?;
    // SAFETY: bf16 has no invalid bit patterns; the callers write each element before reading
    // it (see the doc comment).
    let buf = unsafe { dev.alloc::<bf16>((rows * cols).max(1))? };
    wrap(buf, &dev, &[(rows * cols).max(1)])
        .narrow(0, 0, rows * cols)?
        .reshape((rows, cols))
}

/// [`crate::random_normal`] or [`crate::random_uniform`] drawn on the GPU in `dtype` (f32 or
/// bf16).
pub(crate) fn random_values(
    key: u64,
    draw: crate::init::Draw,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    use crate::init::Draw;
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        key: u64,
        draw: Draw,
        shape: &[usize],
        dev: &CudaDevice,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        // SAFETY: every element is written.
        let out = unsafe { dev.alloc::<T>(n)? };
        let name = match draw {
            Draw::Normal { .. } => "random_normal",
            Draw::Uniform { .. } => "random_uniform",
        };
        let func = dev.get_or_load_custom_func(
            &format!("{name}_{}", suffix(T::DTYPE)?),
            MODULE,
            ptx(dev)?,
        )?;
        let n_ = n as i64;
        let mut builder = func.builder();
        builder.arg(&out).arg(&n_).arg(&key);
        let (a, b);
        match draw {
            Draw::Normal { std } => {
                a = std;
                builder.arg(&a);
            }
            Draw::Uniform { low, high } => {
                (a, b) = (low, high);
                builder.arg(&a).arg(&b);
            }
        }
        // SAFETY: the arguments match random_{normal,uniform}_{f32,bf16} in kernels/ops.cu.
        unsafe { builder.launch(elementwise_config(n)) }.map_err(err)?;
        Ok(wrap(out, dev, shape))
    }
    let Device::Cuda(dev) = device else {
        candle_core::bail!("peft-ops cuda: random values for a non-CUDA device");
    };
    dispatch!(dtype, f(key, draw, shape, dev))
}

/// A 4-bit weight ([`peft_quant::Quant4`]) in GPU memory: codes, block scales (plain, or
/// double-quantized with their second-level scales) and the code tables.
#[derive(Debug)]
pub(crate) struct DeviceQuant4 {
    packed: Tensor,
    code4: Tensor,
    scales: DeviceScales,
    len: usize,
    blocksize: usize,
}

#[derive(Debug)]
enum DeviceScales {
    Plain(Tensor),
    Double {
        codes: Tensor,
        absmax2: Tensor,
        code2: Tensor,
        offset: f32,
        blocksize2: usize,
    },
}

impl DeviceQuant4 {
    pub(crate) fn upload(q: &peft_quant::Quant4, device: &Device) -> Result<Self> {
        let f32s = |v: &[f32]| Tensor::from_slice(v, v.len(), device);
        let scales = match &q.absmax {
            peft_quant::Absmax::Plain(a) => DeviceScales::Plain(f32s(a)?),
            peft_quant::Absmax::Double { q: aq, offset } => DeviceScales::Double {
                codes: Tensor::from_slice(&aq.codes, aq.codes.len(), device)?,
                absmax2: f32s(&aq.absmax)?,
                code2: f32s(&peft_quant::dynamic_map(true))?,
                offset: *offset,
                blocksize2: aq.blocksize,
            },
        };
        Ok(Self {
            packed: Tensor::from_slice(&q.packed, q.packed.len(), device)?,
            code4: f32s(&q.kind.code())?,
            scales,
            len: q.len,
            blocksize: q.blocksize,
        })
    }

    /// The dense values as a `shape` tensor of `dtype` (f32 or bf16 directly, others by a cast).
    pub(crate) fn dequantize(&self, dtype: DType, shape: (usize, usize)) -> Result<Tensor> {
        fn f<T: CudaDType + DeviceRepr + WithDType>(
            q: &DeviceQuant4,
            shape: (usize, usize),
        ) -> Result<Tensor> {
            let dev = cuda_device(&q.packed)?;
            // Unused slots of the plain form get placeholders of the right type.
            let (absmax, qabsmax, absmax2, code2, offset, blocksize2, double) = match &q.scales {
                DeviceScales::Plain(a) => (a, &q.packed, &q.code4, &q.code4, 0f32, 1usize, 0i32),
                DeviceScales::Double {
                    codes,
                    absmax2,
                    code2,
                    offset,
                    blocksize2,
                } => (&q.code4, codes, absmax2, code2, *offset, *blocksize2, 1),
            };
            let (ps, pl) = q.packed.storage_and_layout();
            let (cs, cl) = q.code4.storage_and_layout();
            let (as_, al) = absmax.storage_and_layout();
            let (qs, ql) = qabsmax.storage_and_layout();
            let (a2s, a2l) = absmax2.storage_and_layout();
            let (c2s, c2l) = code2.storage_and_layout();
            // SAFETY: every element is written (one thread per byte, both nibbles).
            let out = unsafe { dev.alloc::<T>(q.len)? };
            let func = dev.get_or_load_custom_func(
                &format!("dequantize_4bit_{}", suffix(T::DTYPE)?),
                MODULE,
                ptx(&dev)?,
            )?;
            let (len, bs, bs2) = (q.len as i64, q.blocksize as i32, blocksize2 as i32);
            let (pv, cv) = (view::<u8>(&ps, pl)?, view::<f32>(&cs, cl)?);
            let (av, qv) = (view::<f32>(&as_, al)?, view::<u8>(&qs, ql)?);
            let (a2v, c2v) = (view::<f32>(&a2s, a2l)?, view::<f32>(&c2s, c2l)?);
            let mut builder = func.builder();
            builder
                .arg(&pv)
                .arg(&cv)
                .arg(&av)
                .arg(&qv)
                .arg(&a2v)
                .arg(&c2v);
            builder
                .arg(&offset)
                .arg(&out)
                .arg(&len)
                .arg(&bs)
                .arg(&bs2)
                .arg(&double);
            // SAFETY: the arguments match dequantize_4bit_{f32,bf16} in kernels/ops.cu.
            unsafe { builder.launch(elementwise_config(q.len.div_ceil(2))) }.map_err(err)?;
            Ok(wrap(out, &dev, &[shape.0, shape.1]))
        }
        match dtype {
            DType::F32 | DType::BF16 => dispatch!(dtype, f(self, shape)),
            _ => f::<f32>(self, shape)?.to_dtype(dtype),
        }
    }
}

/// Rows per tile and threads per block of the flash attention kernels (`FA_TILE`,
/// `FA_THREADS` in `kernels/attention.cu`).
const FA_TILE: usize = 64;
const FA_THREADS: u32 = 128;

/// Head sizes the flash attention kernels are built for.
pub(crate) fn flash_head_dim_supported(d: usize) -> bool {
    d == 64 || d == 128
}

/// The contiguous device buffer of a CUDA storage and layout, as `T`.
fn cuda_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    contiguous(l)?;
    let start = l.start_offset();
    let slice = s.as_cuda_slice::<T>()?;
    let end = start + l.shape().elem_count();
    if end > slice.len() {
        candle_core::bail!(
            "peft-ops cuda: a view past its storage ({end} > {})",
            slice.len()
        );
    }
    // The tensor's elements only: a kernel that sizes its work by the view (rope_rotate) must
    // not run on into the rest of a larger buffer.
    Ok(slice.slice(start..end))
}

/// [`cuda_view`] of a tensor's storage.
pub(crate) fn view<'a, T: CudaDType>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, T>> {
    match s {
        Storage::Cuda(c) => cuda_view(c, l),
        _ => candle_core::bail!("peft-ops cuda: tensor is not on the gpu"),
    }
}

pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("peft-ops cuda: tensor is not on the gpu"),
    }
}

pub(crate) fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Lets `func` use `shared` bytes of dynamic shared memory (over 48 KiB needs the opt-in).
fn allow_shared(func: &CudaFunction, shared: usize) -> Result<()> {
    if shared > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// The inputs of the flash attention kernels: `q` `[b, t, heads · d]`, `k`, `v`
/// `[b, t, kv_heads · d]` (contiguous bf16, starting at a multiple of 8 elements), `cos`,
/// `sin` `[t, d / 2]` (contiguous f32), and the score scale.
#[derive(Clone)]
pub(crate) struct FlashInputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// f32 RoPE tables, `[t, d / 2]`, or `[b, t, d / 2]` for packed rows.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Packed rows: the segment id of every position, u32 `[b, t]` (0: padding).
    pub segments: Option<Tensor>,
    /// gpt-oss's attention sinks, f32 `[heads]` (only the forward reads them).
    pub sinks: Option<Tensor>,
    /// A sliding window of keys, 0 for none.
    pub window: i32,
    pub heads: usize,
    pub kv_heads: usize,
    pub scale: f32,
    /// Whether `q` and `k` are rotated by RoPE already: the forward's rotation, which the
    /// backward reads instead of rotating again (see [`FlashInputs::forward_storage`]).
    pub rotated: bool,
}

/// What a flash attention forward keeps for its backward: the log-sum-exp of each query row
/// `[b, heads, t]` (f32), and q and k as it rotated them (`None` when they came rotated).
pub(crate) struct FlashSaved {
    pub lse: Tensor,
    pub rotated: Option<(Tensor, Tensor)>,
}

/// Device views of a [`FlashInputs`], in the kernels' argument order.
struct FlashViews<'a> {
    q: CudaView<'a, bf16>,
    k: CudaView<'a, bf16>,
    rotated: bool,
    v: CudaView<'a, bf16>,
    cos: CudaView<'a, f32>,
    sin: CudaView<'a, f32>,
    /// The segment ids, or a null pointer for plain rows.
    segments: SegmentsArg<'a>,
    /// The attention sinks, or a null pointer.
    sinks: SinksArg<'a>,
    /// Elements between two batch rows' RoPE tables (0: one table for all).
    rope_bstride: i64,
}

enum SegmentsArg<'a> {
    Packed(CudaView<'a, u32>),
    Plain(u64),
}

enum SinksArg<'a> {
    Some(CudaView<'a, f32>),
    None(u64),
}

impl<'a> FlashViews<'a> {
    /// Pushes q and k as rotated by [`Self::rotate`], v and the segment ids: the first
    /// arguments of the tile kernels.
    fn push(
        &'a self,
        builder: &mut LaunchArgs<'a>,
        (q, k): (&'a CudaView<'a, bf16>, &'a CudaView<'a, bf16>),
    ) {
        builder.arg(q).arg(k).arg(&self.v);
        match &self.segments {
            SegmentsArg::Packed(s) => builder.arg(s),
            SegmentsArg::Plain(null) => builder.arg(null),
        };
    }

    /// q and k rotated by RoPE (rope_rotate_bf16), once per pass: the tile kernels would
    /// otherwise rotate every tile each time they load it. `None` when they are already
    /// ([`FlashInputs::rotated`]): [`Self::qk`] then views them as they are.
    fn rotate(
        &self,
        dev: &CudaDevice,
        (t, heads, kv_heads, d): (usize, usize, usize, usize),
    ) -> Result<Option<RotatedQk>> {
        if self.rotated {
            return Ok(None);
        }
        let rot = (&self.cos, &self.sin, self.rope_bstride);
        Ok(Some((
            rope_rotate(dev, &self.q, rot, (t, heads, d))?,
            rope_rotate(dev, &self.k, rot, (t, kv_heads, d))?,
        )))
    }

    /// Views of the rotated q and k: those [`Self::rotate`] made, or the inputs themselves.
    fn qk<'b>(
        &'b self,
        rotated: &'b Option<RotatedQk>,
    ) -> (CudaView<'b, bf16>, CudaView<'b, bf16>) {
        match rotated {
            Some((q, k)) => (q.as_view(), k.as_view()),
            None => (self.q.slice(..), self.k.slice(..)),
        }
    }
}

/// q and k as [`FlashViews::rotate`] rotated them.
type RotatedQk = (CudaSlice<bf16>, CudaSlice<bf16>);

/// `x` (`[b, t, heads · d]`, bf16) rotated by RoPE's `cos` and `sin` tables (`[t, d / 2]`,
/// or a table per batch row `rope_bstride` elements apart); with `sin` negated, rotated back.
fn rope_rotate(
    dev: &CudaDevice,
    x: &CudaView<bf16>,
    (cos, sin, rope_bstride): (&CudaView<f32>, &CudaView<f32>, i64),
    (t, heads, d): (usize, usize, usize),
) -> Result<CudaSlice<bf16>> {
    let func = dev.get_or_load_custom_func("rope_rotate_bf16", MODULE, ptx(dev)?)?;
    let n = x.len();
    // SAFETY: one thread per 16-element chunk writes both of its halves' 8 elements.
    let out = unsafe { dev.alloc::<bf16>(n)? };
    let (t_, h_, d_, chunks) = (t as i32, heads as i32, d as i32, (n / 16) as i64);
    let mut builder = func.builder();
    builder.arg(x).arg(cos).arg(sin).arg(&rope_bstride);
    builder.arg(&out).arg(&t_).arg(&h_).arg(&d_).arg(&chunks);
    // SAFETY: the arguments match rope_rotate_bf16 in kernels/attention.cu.
    unsafe { builder.launch(elementwise_config(n / 16)) }.map_err(err)?;
    Ok(out)
}

/// The launch of a tile kernel over (blocks of `rows` rows, heads, batch) of `threads` threads
/// with `shared` bytes of dynamic shared memory, allowed to `func`. Shared memory takes the largest share of each
/// SM's L1/shared space (the tiles go by cp.async, past L1), so that registers, not the
/// driver's choice of split, bound the blocks per SM.
fn tile_launch(
    func: &CudaFunction,
    (b, t, heads): (usize, usize, usize),
    (rows, threads): (usize, u32),
    shared: usize,
) -> Result<LaunchConfig> {
    allow_shared(func, shared)?;
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .map_err(err)?;
    Ok(LaunchConfig {
        grid_dim: (t.div_ceil(rows) as u32, heads as u32, b as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    })
}

impl FlashInputs {
    /// Runs `f` with the device views of the inputs.
    fn with_views<R>(&self, f: impl FnOnce(&FlashViews) -> Result<R>) -> Result<R> {
        let (qs, ql) = self.q.storage_and_layout();
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let segments = self.segments.as_ref().map(|s| s.storage_and_layout());
        let sinks = self.sinks.as_ref().map(|s| s.storage_and_layout());
        let (_, t, _) = self.q.dims3()?;
        let rope_bstride = if self.cos.rank() == 3 {
            (t * self.cos.dim(2)?) as i64
        } else {
            0
        };
        f(&FlashViews {
            q: view(&qs, ql)?,
            k: view(&ks, kl)?,
            rotated: self.rotated,
            v: view(&vs, vl)?,
            cos: view(&cs, cl)?,
            sin: view(&ss, sl)?,
            segments: match &segments {
                Some((s, l)) => SegmentsArg::Packed(view(s, l)?),
                None => SegmentsArg::Plain(0),
            },
            sinks: match &sinks {
                Some((s, l)) => SinksArg::Some(view(s, l)?),
                None => SinksArg::None(0),
            },
            rope_bstride,
        })
    }

    /// The kernels' name part for sinks or a window (`_ext`), empty for plain causal rows (the
    /// kernels without those arguments, whose registers they do not cost).
    fn ext(&self) -> &'static str {
        match self.sinks.is_some() || self.window > 0 {
            true => "_ext",
            false => "",
        }
    }

    /// `(b, t, d)` and the kernels' integer arguments `t`, `heads`, `kv_heads`.
    fn dims(&self) -> Result<((usize, usize, usize), [i32; 3])> {
        let (b, t, hd) = self.q.dims3()?;
        let ints = [t as i32, self.heads as i32, self.kv_heads as i32];
        Ok(((b, t, hd / self.heads), ints))
    }

    /// The problem for cuDNN's attention when it is to compute this one
    /// ([`crate::attention_cudnn`]): plain rows (packed rows' segments are our kernels' only).
    fn cudnn_problem(&self) -> Result<Option<crate::cudnn::graph::Problem>> {
        // Packed rows' segments, attention sinks and windows are our kernels' only.
        let ours = self.segments.is_some() || self.sinks.is_some() || self.window > 0;
        if ours || !crate::attention_cudnn() {
            return Ok(None);
        }
        let ((b, t, d), _) = self.dims()?;
        Ok(Some(crate::cudnn::graph::Problem {
            b,
            heads: self.heads,
            kv_heads: self.kv_heads,
            t,
            d,
            scale: self.scale,
        }))
    }

    /// The attention output `[b, t, heads · d]` (bf16), and for the backward pass the
    /// log-sum-exp of each query row `[b, heads, t]` (f32) and q and k as the forward rotated
    /// them (none when they came rotated).
    pub(crate) fn forward(&self) -> Result<(Tensor, FlashSaved)> {
        let (o, shape, saved) = self.forward_storage()?;
        Ok((
            Tensor::from_storage(Storage::Cuda(o), shape, BackpropOp::none(), false),
            saved,
        ))
    }

    /// [`Self::forward`] with the output as a storage and its shape (for an op's forward).
    pub(crate) fn forward_storage(&self) -> Result<(CudaStorage, Shape, FlashSaved)> {
        let ((b, t, d), [t_, h_, kvh_]) = self.dims()?;
        let heads = self.heads;
        let dev = cuda_device(&self.q)?;
        // SAFETY: the kernel (or cuDNN's plan) writes every element of both outputs.
        let o = unsafe { dev.alloc::<bf16>(b * t * heads * d)? };
        let lse = unsafe { dev.alloc::<f32>(b * heads * t)? };
        let cudnn = self.cudnn_problem()?;
        let rotated = self.with_views(|x| {
            let rotated = x.rotate(&dev, (t, heads, self.kv_heads, d))?;
            let (q, k) = x.qk(&rotated);
            if let Some(p) = &cudnn {
                match crate::cudnn::forward(&dev, p, (&q, &k, &x.v), &o, &lse) {
                    Ok(true) => return Ok(rotated),
                    Ok(false) => {}
                    Err(why) => crate::cudnn::fall_back(&why),
                }
            }
            // K and V tiles, and Q's with d = 128 (bf16), the key tile's segment ids (u32):
            // FA_Q_IN_REGS in kernels/attention.cu.
            let tiles = if d <= 64 { 2 } else { 3 };
            let shared = tiles * FA_TILE * (d + 8) * 2 + FA_TILE * 4;
            // 128-row query blocks (flash_fwd_wide_d64) need no more shared memory: with d = 64
            // their rows pass through the key and value tiles' space.
            let ext = self.ext();
            let (name, rows) = if d == 64 && crate::flash_wide() {
                (format!("flash_fwd_wide{ext}_d64"), 2 * FA_TILE)
            } else {
                (format!("flash_fwd{ext}_d{d}"), FA_TILE)
            };
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx(&dev)?)?;
            // The forward's four warps take every row tile of a block.
            let cfg = tile_launch(&func, (b, t, heads), (rows, FA_THREADS), shared)?;
            let mut builder = func.builder();
            x.push(&mut builder, (&q, &k));
            builder.arg(&o).arg(&lse);
            builder.arg(&t_).arg(&h_).arg(&kvh_).arg(&self.scale);
            if !ext.is_empty() {
                match &x.sinks {
                    SinksArg::Some(s) => builder.arg(s),
                    SinksArg::None(null) => builder.arg(null),
                };
                builder.arg(&self.window);
            }
            // SAFETY: the arguments match flash_fwd{,_wide}{,_ext}_d{64,128} in
            // kernels/attention.cu.
            unsafe { builder.launch(cfg) }.map_err(err)?;
            Ok(rotated)
        })?;
        let saved = FlashSaved {
            lse: wrap(lse, &dev, &[b, heads, t]),
            rotated: rotated.map(|(q, k)| {
                (
                    wrap(q, &dev, &[b, t, heads * d]),
                    wrap(k, &dev, &[b, t, self.kv_heads * d]),
                )
            }),
        };
        Ok((
            CudaStorage::wrap_cuda_slice(o, dev.clone()),
            Shape::from((b, t, heads * d)),
            saved,
        ))
    }

    /// The gradients of `q`, `k` and `v` (bf16, their shapes) from the forward's output `o`,
    /// its log-sum-exp and the output gradient `dout` (bf16, aligned as the inputs).
    pub(crate) fn backward(
        &self,
        o: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let ((b, t, d), [t_, h_, kvh_]) = self.dims()?;
        let (heads, hd, kvd) = (self.heads, self.heads * d, self.kv_heads * d);
        let (d_, scale) = (d as i32, self.scale);
        let dev = cuda_device(&self.q)?;
        let (os, ol) = o.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let (gs, gl) = dout.storage_and_layout();
        let (ov, lv, gv) = (
            view::<bf16>(&os, ol)?,
            view::<f32>(&ls, ll)?,
            view::<bf16>(&gs, gl)?,
        );
        if let Some(p) = self.cudnn_problem()? {
            match self.backward_cudnn(&dev, &p, (&ov, &gv, &lv)) {
                Ok(Some(grads)) => return Ok(grads),
                Ok(None) => {}
                Err(why) => crate::cudnn::fall_back(&why.to_string()),
            }
        }

        // delta = rowsum(dO ∘ O), one warp per (row, head).
        let rows = (b * t * heads) as i64;
        // SAFETY: written for every row.
        let delta = unsafe { dev.alloc::<f32>(b * heads * t)? };
        let func = dev.get_or_load_custom_func("flash_bwd_delta_bf16", MODULE, ptx(&dev)?)?;
        let warps = FA_THREADS as usize / 32;
        let cfg = LaunchConfig {
            grid_dim: ((rows as usize).div_ceil(warps) as u32, 1, 1),
            block_dim: (FA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&ov).arg(&gv).arg(&delta);
        builder.arg(&t_).arg(&h_).arg(&d_).arg(&rows);
        // SAFETY: the arguments match flash_bwd_delta_bf16.
        unsafe { builder.launch(cfg) }.map_err(err)?;

        // Per key tile and query head: its shares of dK and dV, and dQ accumulated in f32.
        let dq_acc = dev.alloc_zeros::<f32>(b * t * hd)?;
        // SAFETY: every row below t of every head is written.
        let dk_part = unsafe { dev.alloc::<f32>(b * t * hd)? };
        let dv_part = unsafe { dev.alloc::<f32>(b * t * hd)? };
        // 64 keys a block, or 128 (flash_bwd_wide_d*, PEFT_CUDA_FLASH_BWD=wide). K and V tiles,
        // two buffers of Q and dO tiles, dS [64 queries, keys] (bf16); two buffers of
        // log-sum-exp and delta (f32); the segment ids of the query tile and of the keys (u32).
        let ext = self.ext();
        let (name, keys) = if crate::flash_wide_backward() {
            (format!("flash_bwd_wide{ext}_d{d}"), 2 * FA_TILE)
        } else {
            (format!("flash_bwd{ext}_d{d}"), FA_TILE)
        };
        let shared = (2 * keys + 4 * FA_TILE) * (d + 8) * 2
            + FA_TILE * (keys + 8) * 2
            + (5 * FA_TILE + keys) * 4;
        let func = dev.get_or_load_custom_func(&name, MODULE, ptx(&dev)?)?;
        // A warp per 16 keys.
        let threads = FA_THREADS * (keys / FA_TILE) as u32;
        let cfg = tile_launch(&func, (b, t, heads), (keys, threads), shared)?;
        let kv_pairs = (b * t * kvd / 2) as i64;
        let pairs = (b * t * hd / 2) as i64;
        // SAFETY: one thread per pair writes both of its elements.
        let dq = unsafe { dev.alloc::<bf16>(b * t * hd)? };
        let dk = unsafe { dev.alloc::<bf16>(b * t * kvd)? };
        let dv = unsafe { dev.alloc::<bf16>(b * t * kvd)? };
        self.with_views(|x| {
            let rotated = x.rotate(&dev, (t, heads, self.kv_heads, d))?;
            let (q, k) = x.qk(&rotated);
            let mut builder = func.builder();
            x.push(&mut builder, (&q, &k));
            builder
                .arg(&gv)
                .arg(&lv)
                .arg(&delta)
                .arg(&dq_acc)
                .arg(&dk_part)
                .arg(&dv_part);
            builder.arg(&t_).arg(&h_).arg(&kvh_).arg(&scale);
            if !ext.is_empty() {
                builder.arg(&self.window);
            }
            // SAFETY: the arguments match flash_bwd{,_wide}{,_ext}_d{64,128}.
            unsafe { builder.launch(cfg) }.map_err(err)?;

            // dk, dv: the shares summed per kv head, dk scaled and rotated back.
            let func = dev.get_or_load_custom_func("flash_bwd_dkv_bf16", MODULE, ptx(&dev)?)?;
            let mut builder = func.builder();
            builder
                .arg(&dk_part)
                .arg(&dv_part)
                .arg(&x.cos)
                .arg(&x.sin)
                .arg(&x.rope_bstride)
                .arg(&dk)
                .arg(&dv);
            builder
                .arg(&t_)
                .arg(&h_)
                .arg(&kvh_)
                .arg(&d_)
                .arg(&scale)
                .arg(&kv_pairs);
            // SAFETY: the arguments match flash_bwd_dkv_bf16.
            unsafe { builder.launch(elementwise_config(kv_pairs as usize)) }.map_err(err)?;

            // dq: scaled and rotated back, in the projection layout.
            let func = dev.get_or_load_custom_func("flash_bwd_dq_bf16", MODULE, ptx(&dev)?)?;
            let mut builder = func.builder();
            builder.arg(&dq_acc).arg(&x.cos).arg(&x.sin);
            builder.arg(&x.rope_bstride).arg(&dq);
            builder.arg(&t_).arg(&h_).arg(&d_).arg(&scale).arg(&pairs);
            // SAFETY: the arguments match flash_bwd_dq_bf16.
            unsafe { builder.launch(elementwise_config(pairs as usize)) }.map_err(err)
        })?;
        Ok((
            wrap(dq, &dev, &[b, t, hd]),
            wrap(dk, &dev, &[b, t, kvd]),
            wrap(dv, &dev, &[b, t, kvd]),
        ))
    }
}

impl FlashInputs {
    /// [`Self::backward`] by cuDNN: the gradients of the rotated q and k and of v, then q's
    /// and k's rotated back (RoPE with `sin` negated); `None` where the flash kernels are to
    /// (a shape past cuDNN's plans).
    fn backward_cudnn(
        &self,
        dev: &CudaDevice,
        p: &crate::cudnn::graph::Problem,
        (o, dout, lse): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<f32>),
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let (b, t, d) = (p.b, p.t, p.d);
        let (hd, kvd) = (p.heads * d, p.kv_heads * d);
        // Nothing is rotated or allocated for a backward the flash kernels are to run.
        if !crate::cudnn::has_plan(dev, p, false).map_err(candle_core::Error::Msg)? {
            return Ok(None);
        }
        // SAFETY: the plan writes every element of the three gradients.
        let (dq_rot, dk_rot, dv) = unsafe {
            (
                dev.alloc::<bf16>(b * t * hd)?,
                dev.alloc::<bf16>(b * t * kvd)?,
                dev.alloc::<bf16>(b * t * kvd)?,
            )
        };
        let rotated_back = self.with_views(|x| {
            let rotated = x.rotate(dev, (t, p.heads, p.kv_heads, d))?;
            let (q, k) = x.qk(&rotated);
            let grads = (&dq_rot, &dk_rot, &dv);
            if !crate::cudnn::backward(dev, p, (&q, &k, &x.v), (o, dout, lse), grads)
                .map_err(candle_core::Error::Msg)?
            {
                return Ok(None);
            }
            let sin_back = self.sin.neg()?;
            let (ns, nl) = sin_back.storage_and_layout();
            let back = (&x.cos, &view::<f32>(&ns, nl)?, x.rope_bstride);
            Ok(Some((
                rope_rotate(dev, &dq_rot.as_view(), back, (t, p.heads, d))?,
                rope_rotate(dev, &dk_rot.as_view(), back, (t, p.kv_heads, d))?,
            )))
        })?;
        Ok(rotated_back.map(|(dq, dk)| {
            (
                wrap(dq, dev, &[b, t, hd]),
                wrap(dk, dev, &[b, t, kvd]),
                wrap(dv, dev, &[b, t, kvd]),
            )
        }))
    }
}

/// The fused optimizer step (`kernels/optim.cu`) over a fixed set of tensors: their addresses
/// and sizes, uploaded once per step, in one table per kind of tensors.
pub struct FusedAdamw {
    dev: CudaDevice,
    tables: Vec<Table>,
}

/// What the tensors of a [`Table`] hold.
#[derive(Clone, Copy, PartialEq)]
enum TableKind {
    /// Parameters, gradients and moments of one dtype (f32 or bf16).
    Dense(DType),
    /// f32 parameters and gradients, 8-bit moments.
    EightBit,
}

/// Entries of one kind of tensors of one parameter group for the kernels.
struct Table {
    kind: TableKind,
    /// The parameter group: which scalars the step launches it with.
    group: usize,
    entries: CudaSlice<i64>,
    /// Values per entry (5 for dense moments, 7 for 8-bit ones).
    stride: i32,
    tensors: usize,
    largest: usize,
}

impl Table {
    fn config(&self) -> LaunchConfig {
        let chunks = self.largest.div_ceil(256 * 8).clamp(1, 1024);
        LaunchConfig {
            grid_dim: (chunks as u32, self.tensors as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The dtype suffix of the parameter and gradient kernels.
    fn suffix(&self) -> Result<&'static str> {
        match self.kind {
            TableKind::Dense(dtype) => suffix(dtype),
            TableKind::EightBit => Ok("f32"),
        }
    }
}

impl FusedAdamw {
    /// The fused step for `slots`, or `None` when they are not all contiguous tensors of the
    /// expected dtypes and sizes on one CUDA device: f32 or bf16 parameters with gradients and
    /// dense moments of the same dtype, or f32 parameters with 8-bit moments. The tensors must
    /// outlive the step.
    pub fn new(slots: &[crate::optim::AdamwSlot]) -> Result<Option<Self>> {
        use crate::optim::SlotMoments;
        let Some(first) = slots.first() else {
            return Ok(None);
        };
        let Device::Cuda(dev) = first.param.device() else {
            return Ok(None);
        };
        if !crate::cuda_kernel_on(crate::Kernel::Optimizer) {
            return Ok(None);
        }
        let dev = dev.clone();
        let fits = |t: &Tensor, dtype: DType, len: usize| {
            t.dtype() == dtype
                && t.is_contiguous()
                && t.elem_count() == len
                && t.device().same_device(first.param.device())
        };
        let kind = |s: &crate::optim::AdamwSlot| -> Option<TableKind> {
            let (n, dtype) = (s.param.elem_count(), s.param.dtype());
            let dense = fits(s.param, dtype, n) && fits(s.grad, dtype, n);
            match s.moments {
                SlotMoments::Dense { m, v }
                    if dense
                        && matches!(dtype, DType::F32 | DType::BF16)
                        && fits(m, dtype, n)
                        && fits(v, dtype, n) =>
                {
                    Some(TableKind::Dense(dtype))
                }
                SlotMoments::Q8 {
                    m_codes,
                    m_absmax,
                    v_codes,
                    v_absmax,
                } if dense && dtype == DType::F32 => {
                    let blocks = n.div_ceil(256);
                    (fits(m_codes, DType::U8, n)
                        && fits(v_codes, DType::U8, n)
                        && fits(m_absmax, DType::F32, blocks)
                        && fits(v_absmax, DType::F32, blocks))
                    .then_some(TableKind::EightBit)
                }
                _ => None,
            }
        };
        let Some(kinds) = slots.iter().map(kind).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        if slots.len() > 65_535 {
            return Ok(None);
        }
        let stream = dev.cuda_stream();
        let address = |t: &Tensor| -> Result<i64> {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(c) = &*storage else {
                candle_core::bail!("peft-ops cuda: tensor is not on the gpu");
            };
            let base = match t.dtype() {
                DType::U8 => c.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
                DType::BF16 => c.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
                _ => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            };
            Ok((base + (t.dtype().size_in_bytes() * layout.start_offset()) as u64) as i64)
        };
        let mut tables = Vec::new();
        let groups = slots.iter().map(|s| s.group).max().unwrap_or(0) + 1;
        let table_kinds = [
            TableKind::Dense(DType::F32),
            TableKind::Dense(DType::BF16),
            TableKind::EightBit,
        ];
        for (group, table_kind) in (0..groups).flat_map(|g| table_kinds.map(|k| (g, k))) {
            let mut entries = Vec::new();
            let mut largest = 0;
            let members = slots.iter().zip(&kinds);
            for (s, _) in members.filter(|(s, k)| **k == table_kind && s.group == group) {
                entries.push(address(s.param)?);
                entries.push(address(s.grad)?);
                let moments = match s.moments {
                    SlotMoments::Dense { m, v } => vec![m, v],
                    SlotMoments::Q8 {
                        m_codes,
                        m_absmax,
                        v_codes,
                        v_absmax,
                    } => vec![m_codes, m_absmax, v_codes, v_absmax],
                };
                for t in moments {
                    entries.push(address(t)?);
                }
                entries.push(s.param.elem_count() as i64);
                largest = largest.max(s.param.elem_count());
            }
            if entries.is_empty() {
                continue;
            }
            let stride = if table_kind == TableKind::EightBit {
                7
            } else {
                5
            };
            tables.push(Table {
                kind: table_kind,
                group,
                tensors: entries.len() / stride,
                entries: dev.clone_htod(&entries)?,
                stride: stride as i32,
                largest,
            });
        }
        Ok(Some(Self { dev, tables }))
    }

    /// Clips the gradients to a global norm of `max_norm` (none when it is 0) and updates every
    /// parameter and its moments in place; returns the norm before clipping. The norm and the
    /// clipping factor stay on the device until every kernel is queued, and the norm is then
    /// read back: one host synchronisation, at the end of the step. When the norm is not
    /// finite, the kernels update nothing.
    pub fn step(&self, scalars: &[crate::optim::AdamwScalars], max_norm: f64) -> Result<f64> {
        let sum_sq = self.dev.alloc_zeros::<f64>(1)?;
        for table in &self.tables {
            let name = format!("sum_squares_multi_{}", table.suffix()?);
            let func = self
                .dev
                .get_or_load_custom_func(&name, MODULE, ptx(&self.dev)?)?;
            let mut builder = func.builder();
            builder.arg(&table.entries).arg(&table.stride).arg(&sum_sq);
            // SAFETY: the arguments match sum_squares_multi_*; the addresses are live.
            unsafe { builder.launch(table.config()) }.map_err(err)?;
        }
        for table in &self.tables {
            let Some(s) = scalars.get(table.group) else {
                candle_core::bail!(
                    "peft-ops cuda: no optimizer scalars for group {}",
                    table.group
                );
            };
            let scalars = [
                s.lr,
                s.beta1,
                s.beta2,
                s.eps,
                s.decay,
                s.bias_correction1,
                s.bias_correction2,
            ];
            let maps = match table.kind {
                TableKind::Dense(_) => None,
                TableKind::EightBit => Some((
                    self.dev.clone_htod(&peft_quant::dynamic_map(true))?,
                    self.dev.clone_htod(&peft_quant::dynamic_map(false))?,
                )),
            };
            let name = match table.kind {
                TableKind::Dense(_) => format!("adamw_multi_{}", table.suffix()?),
                TableKind::EightBit => "adamw8bit_multi_f32".to_string(),
            };
            let func = self
                .dev
                .get_or_load_custom_func(&name, MODULE, ptx(&self.dev)?)?;
            let mut builder = func.builder();
            builder.arg(&table.entries);
            if let Some((signed, unsigned)) = &maps {
                builder.arg(signed).arg(unsigned);
            }
            for x in &scalars {
                builder.arg(x);
            }
            builder.arg(&sum_sq).arg(&max_norm);
            // SAFETY: the arguments match adamw_multi_* or adamw8bit_multi_f32; the addresses
            // are live and each tensor (each 256-block for 8-bit moments) is written by its
            // own blocks only.
            unsafe { builder.launch(table.config()) }.map_err(err)?;
        }
        Ok(self.dev.clone_dtoh(&sum_sq)?[0].sqrt())
    }
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: the kernel source must compile, for both architectures, wherever
    /// the `cuda` feature builds.
    #[test]
    fn kernels_compile_with_nvrtc() {
        for arch in super::ARCHS {
            let ptx = super::ptx_for(arch).unwrap();
            check_entries(ptx);
            // scripts/gpu/ptxas.sh reads the H200's PTX from here: registers and spills
            // without a GPU.
            if arch == "compute_90" {
                if let Some(path) = std::env::var_os("PEFT_PTX_OUT") {
                    std::fs::write(path, ptx).unwrap();
                }
                // The dQ sums of the flash backward: one vector atomic per pair.
                assert!(ptx.contains("atom.global.add.v2.f32"));
            }
        }
    }

    fn check_entries(ptx: &str) {
        for name in [
            "causal_softmax_fwd",
            "causal_softmax_bwd",
            "rms_norm_fwd",
            "rms_norm_bwd",
            "gated_fwd",
            "gated_bwd",
            "cross_entropy_rows",
            "dequantize_4bit",
            "low_rank_add",
            "thin_project",
            "thin_outer",
            "random_normal",
        ] {
            for dtype in ["f32", "bf16"] {
                assert!(
                    ptx.contains(&format!(".entry {name}_{dtype}(")),
                    "{name}_{dtype} missing"
                );
            }
        }
        for name in [
            "dropout_mask_f32",
            "flash_fwd_d64",
            "flash_fwd_d128",
            "flash_fwd_wide_d64",
            "flash_bwd_d64",
            "flash_bwd_d128",
            "flash_bwd_wide_d64",
            "flash_bwd_wide_d128",
            "flash_fwd_ext_d64",
            "flash_fwd_ext_d128",
            "flash_fwd_wide_ext_d64",
            "flash_bwd_ext_d64",
            "flash_bwd_ext_d128",
            "flash_bwd_wide_ext_d64",
            "flash_bwd_wide_ext_d128",
            "flash_bwd_delta_bf16",
            "flash_bwd_dkv_bf16",
            "flash_bwd_dq_bf16",
            "rope_rotate_bf16",
            "thin_outer_sum",
        ] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing");
        }
        for name in [
            "adamw_multi_f32",
            "adamw_multi_bf16",
            "adamw8bit_multi_f32",
            "sum_squares_multi_f32",
            "sum_squares_multi_bf16",
        ] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing");
        }
        assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    }
}
