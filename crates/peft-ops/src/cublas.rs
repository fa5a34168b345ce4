//! Row-major products through cuBLAS's column-major `gemm`: LoRA's thin products on tensor
//! cores (bf16 operands, f32 accumulation), by default in place of our low-rank kernels
//! (`PEFT_CUDA_LORA=kernels` selects those). The mapping of a row-major product to cuBLAS's
//! arguments is a pure function, tested here against what cuBLAS computes for those arguments.

/// cuBLAS's arguments for the row-major `C[m×n] = alpha · op(A)[m×k] · op(B)[k×n] + beta · C`:
/// column-major, that is `Cᵀ = op(B)ᵀ · op(A)ᵀ`, so B's memory comes first.
#[cfg(any(feature = "cuda", test))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColumnMajor {
    /// Whether cuBLAS transposes its first operand (B's memory), its second (A's).
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
}

/// The call for contiguous row-major operands: `A` stored `[m, k]`, or `[k, m]` when `a_t`;
/// `B` stored `[k, n]`, or `[n, k]` when `b_t`; `C` `[m, n]`.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn column_major(m: usize, n: usize, k: usize, a_t: bool, b_t: bool) -> ColumnMajor {
    ColumnMajor {
        trans_first: b_t,
        trans_second: a_t,
        m: n,
        n: m,
        k,
        ld_first: if b_t { k } else { n },
        ld_second: if a_t { m } else { k },
        ldc: n,
    }
}

#[cfg(feature = "cuda")]
pub(crate) use device::{
    add_product_into, in_place, matmul, matmul_add_into, takes_products_in_place,
};

#[cfg(feature = "cuda")]
mod device {
    use super::column_major;
    use crate::cuda::{cuda_device, view, wrap};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, DType, Result, Tensor, WithDType};
    use half::bf16;
    use std::ffi::c_void;

    fn op(transposed: bool) -> sys::cublasOperation_t {
        if transposed {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    }

    /// `C = alpha · op(A) · op(B) + beta · C` (row-major, see [`column_major`]) into `c` (bf16
    /// or f32, `[m, n]` from its start). A and B: contiguous bf16 gpu tensors, `[m, k]` or
    /// `[k, m]`, and `[k, n]` or `[n, k]`.
    fn gemm<T: CudaDType + WithDType>(
        dev: &CudaDevice,
        (a, a_t): (&Tensor, bool),
        (b, b_t): (&Tensor, bool),
        (m, n, k): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        c: &CudaSlice<T>,
    ) -> Result<()> {
        let c_type = match T::DTYPE {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            dt => candle_core::bail!("cublas products write bf16 or f32, not {dt:?}"),
        };
        let call = column_major(m, n, k, a_t, b_t);
        let stream = dev.cuda_stream();
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        let (a_view, b_view) = (view::<bf16>(&sa, la)?, view::<bf16>(&sb, lb)?);
        let (a_ptr, _a_guard) = a_view.device_ptr(&stream);
        let (b_ptr, _b_guard) = b_view.device_ptr(&stream);
        let (c_ptr, _c_guard) = c.device_ptr(&stream);
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg("cublas: dimension over 2^31".into()))
        };
        let blas = dev.cublas_handle();
        // SAFETY: the pointers address contiguous buffers of the sizes the call reads and
        // writes (the callers check the shapes); alpha and beta are f32, as CUBLAS_COMPUTE_32F
        // takes them; the handle runs on the device's stream.
        unsafe {
            gemm_ex(
                *blas.handle(),
                op(call.trans_first),
                op(call.trans_second),
                int(call.m)?,
                int(call.n)?,
                int(call.k)?,
                (&alpha) as *const f32 as *const c_void,
                b_ptr as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                int(call.ld_first)?,
                a_ptr as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                int(call.ld_second)?,
                (&beta) as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                c_type,
                int(call.ldc)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cublas gemm: {e:?}")))
    }

    /// The `(m, k)` and `(k, n)` of `op(a) · op(b)`; an error when the inner sizes differ.
    fn product_dims(
        (a, a_t): (&Tensor, bool),
        (b, b_t): (&Tensor, bool),
    ) -> Result<(usize, usize, usize)> {
        let dims = |t: &Tensor, transposed: bool| -> Result<(usize, usize)> {
            let (r, c) = t.dims2()?;
            Ok(if transposed { (c, r) } else { (r, c) })
        };
        let ((m, k), (kb, n)) = (dims(a, a_t)?, dims(b, b_t)?);
        if k != kb {
            candle_core::bail!("cublas product: {:?} by {:?}", a.dims(), b.dims());
        }
        Ok((m, n, k))
    }

    /// `alpha · op(a) · op(b)` as a new `[m, n]` tensor of dtype `out` (bf16 or f32): `a`, `b`
    /// bf16 and contiguous, `a_t`/`b_t` transposing them.
    pub(crate) fn matmul(
        a: &Tensor,
        a_t: bool,
        b: &Tensor,
        b_t: bool,
        alpha: f32,
        out: DType,
    ) -> Result<Tensor> {
        fn f<T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
            a: (&Tensor, bool),
            b: (&Tensor, bool),
            alpha: f32,
        ) -> Result<Tensor> {
            let (m, n, k) = product_dims(a, b)?;
            let dev = cuda_device(a.0)?;
            if m * n * k == 0 {
                // No product to sum (an empty batch), or none to write: cuBLAS does not
                // document k = 0 and refuses leading dimensions of 0.
                return Ok(wrap(dev.alloc_zeros::<T>(m * n)?, &dev, &[m, n]));
            }
            // SAFETY: the gemm writes every element (beta = 0).
            let c = unsafe { dev.alloc::<T>(m * n)? };
            gemm(&dev, a, b, (m, n, k), (alpha, 0.0), &c)?;
            Ok(wrap(c, &dev, &[m, n]))
        }
        match out {
            DType::BF16 => f::<bf16>((a, a_t), (b, b_t), alpha),
            DType::F32 => f::<f32>((a, a_t), (b, b_t), alpha),
            dt => candle_core::bail!("cublas matmul: no {dt:?} output"),
        }
    }

    /// Whether [`add_product_into`] can add to `c`: a contiguous bf16 or f32 gpu tensor from
    /// its storage's start.
    pub(crate) fn takes_products_in_place(c: &Tensor) -> bool {
        c.device().is_cuda()
            && matches!(c.dtype(), DType::BF16 | DType::F32)
            && matches!(c.layout().contiguous_offsets(), Some((0, _)))
    }

    /// `c += alpha · op(a) · op(b)` in place for a tensor `c` that no one else reads meanwhile
    /// (see [`takes_products_in_place`]), viewed as `[m, n]` (`n` the product's columns); `a`,
    /// `b` bf16 and contiguous.
    pub(crate) fn add_product_into(
        c: &Tensor,
        (a, a_t): (&Tensor, bool),
        (b, b_t): (&Tensor, bool),
        alpha: f32,
    ) -> Result<()> {
        let n = if b_t { b.dim(0)? } else { b.dim(1)? };
        if n == 0 || !c.elem_count().is_multiple_of(n) {
            candle_core::bail!("cublas add: {:?} is not rows of {n}", c.shape());
        }
        in_place(c, |cs| {
            matmul_add_into(cs, (c.elem_count() / n, n), a, a_t, b, b_t, alpha)
        })
    }

    /// `f` on the storage of `c`, a tensor that takes sums in place (see
    /// [`takes_products_in_place`]) and that no one else reads meanwhile.
    pub(crate) fn in_place<R>(c: &Tensor, f: impl FnOnce(&CudaStorage) -> Result<R>) -> Result<R> {
        if !takes_products_in_place(c) {
            candle_core::bail!("{:?} cannot take a sum in place", c.shape());
        }
        let (s, _) = c.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(cs) => f(cs),
            _ => candle_core::bail!("the sum is not on the gpu"),
        }
    }

    /// `c += alpha · op(a) · op(b)` in place, `c` a contiguous bf16 or f32 `[m, n]` buffer that
    /// no one else reads meanwhile (an op's own output, or a gradient just computed).
    pub(crate) fn matmul_add_into(
        c: &CudaStorage,
        (m, n): (usize, usize),
        a: &Tensor,
        a_t: bool,
        b: &Tensor,
        b_t: bool,
        alpha: f32,
    ) -> Result<()> {
        let (am, bn, k) = product_dims((a, a_t), (b, b_t))?;
        if (am, bn) != (m, n) {
            candle_core::bail!(
                "cublas add: {:?} by {:?} into [{m}, {n}]",
                a.dims(),
                b.dims()
            );
        }
        if m * n * k == 0 {
            // Nothing to add (see `matmul`).
            return Ok(());
        }
        let (a, b) = ((a, a_t), (b, b_t));
        match c.dtype() {
            DType::F32 => gemm(
                c.device(),
                a,
                b,
                (m, n, k),
                (alpha, 1.0),
                c.as_cuda_slice::<f32>()?,
            ),
            _ => gemm(
                c.device(),
                a,
                b,
                (m, n, k),
                (alpha, 1.0),
                c.as_cuda_slice::<bf16>()?,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cuBLAS's column-major gemm computes for `call`:
    /// `C[i + j·ldc] = alpha · Σ_l op(first)[i, l] · op(second)[l, j] + beta · C[i + j·ldc]`.
    fn cublas_reference(call: &ColumnMajor, first: &[f32], second: &[f32], c: &mut [f32]) {
        let f = |i: usize, l: usize| {
            if call.trans_first {
                first[l + i * call.ld_first]
            } else {
                first[i + l * call.ld_first]
            }
        };
        let s = |l: usize, j: usize| {
            if call.trans_second {
                second[j + l * call.ld_second]
            } else {
                second[l + j * call.ld_second]
            }
        };
        for i in 0..call.m {
            for j in 0..call.n {
                let sum: f32 = (0..call.k).map(|l| f(i, l) * s(l, j)).sum();
                c[i + j * call.ldc] += sum;
            }
        }
    }

    #[test]
    fn row_major_products_map_to_cublas_arguments() {
        let (m, n, k) = (5, 3, 4);
        let value = |seed: usize, i: usize| ((i * 7 + seed * 13) % 11) as f32 - 5.0;
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<f32> = (0..m * k).map(|i| value(1, i)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(2, i)).collect();
            let a_at = |i: usize, l: usize| if a_t { a[l * m + i] } else { a[i * k + l] };
            let b_at = |l: usize, j: usize| if b_t { b[j * k + l] } else { b[l * n + j] };
            let c0: Vec<f32> = (0..m * n).map(|i| value(3, i)).collect();
            let mut c = c0.clone();
            cublas_reference(&column_major(m, n, k, a_t, b_t), &b, &a, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 =
                        c0[i * n + j] + (0..k).map(|l| a_at(i, l) * b_at(l, j)).sum::<f32>();
                    assert_eq!(c[i * n + j], want, "a_t {a_t} b_t {b_t} at ({i}, {j})");
                }
            }
        }
    }
}
