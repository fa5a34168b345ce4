//! Launchers for our CUDA kernels (`kernels/ops.cu`), compiled once per process with NVRTC so
//! that building needs no CUDA compiler. Inputs must be contiguous; outputs are fresh buffers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};
use half::bf16;
use std::sync::OnceLock;

const SOURCE: &str = include_str!("kernels/ops.cu");
const MODULE: &str = "peft_ops";
/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("peft-ops cuda: {e:?}"))
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile kernels/ops.cu: {e:?}"))
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
        dev.get_or_load_custom_func(&format!("{name}_{}", suffix(T::DTYPE)?), MODULE, ptx()?)?;
    let views = inputs
        .iter()
        .map(|(s, l)| {
            contiguous(l)?;
            Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
        })
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

pub(crate) fn rms_norm_bwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        g: (&CudaStorage, &Layout),
        eps: f32,
    ) -> Result<CudaStorage> {
        let n = x.1.shape().elem_count();
        let d = w.1.shape().elem_count();
        launch::<T>(
            x.0.device(),
            "rms_norm_bwd",
            &[x, w, g],
            n,
            rows_config(n / d),
            &[Scalar::I32(d as i32), Scalar::F32(eps)],
        )
    }
    dispatch!(x.0.dtype(), f(x, w, g, eps))
}

fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn swiglu_fwd(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        g: (&CudaStorage, &Layout),
        u: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let n = g.1.shape().elem_count();
        launch::<T>(
            g.0.device(),
            "swiglu_fwd",
            &[g, u],
            n,
            elementwise_config(n),
            &[Scalar::I64(n as i64)],
        )
    }
    dispatch!(g.0.dtype(), f(g, u))
}

/// `[d gate; d up]` stacked: `2 × n` elements.
pub(crate) fn swiglu_bwd(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn f<T: CudaDType + DeviceRepr + WithDType>(
        g: (&CudaStorage, &Layout),
        u: (&CudaStorage, &Layout),
        grad: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let n = g.1.shape().elem_count();
        launch::<T>(
            g.0.device(),
            "swiglu_bwd",
            &[g, u, grad],
            2 * n,
            elementwise_config(n),
            &[Scalar::I64(n as i64)],
        )
    }
    dispatch!(g.0.dtype(), f(g, u, grad))
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: the kernel source must compile wherever the `cuda` feature builds.
    #[test]
    fn kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        for name in [
            "causal_softmax_fwd",
            "causal_softmax_bwd",
            "rms_norm_bwd",
            "swiglu_fwd",
            "swiglu_bwd",
        ] {
            for dtype in ["f32", "bf16"] {
                assert!(
                    ptx.contains(&format!(".entry {name}_{dtype}(")),
                    "{name}_{dtype} missing"
                );
            }
        }
    }
}
