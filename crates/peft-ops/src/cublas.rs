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

/// The call for row-major operands whose rows lie `row stride` elements apart: `A` stored
/// `[m, k]`, or `[k, m]` when `a_t`; `B` stored `[k, n]`, or `[n, k]` when `b_t`; `C` `[m, n]`.
/// A matrix's row stride is its stored row length, or more for some columns of a wider one.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn column_major(
    (m, n, k): (usize, usize, usize),
    (a_t, a_stride): (bool, usize),
    (b_t, b_stride): (bool, usize),
    c_stride: usize,
) -> ColumnMajor {
    ColumnMajor {
        trans_first: b_t,
        trans_second: a_t,
        m: n,
        n: m,
        k,
        ld_first: b_stride,
        ld_second: a_stride,
        ldc: c_stride,
    }
}

#[cfg(feature = "cuda")]
pub(crate) use device::{
    add_product_into, in_place, is_bf16_matrix, matmul, matmul_add_into, matmul_into_columns,
    takes_products_in_place, thin_then_frozen, Mat,
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

    /// A row-major bf16 operand: a contiguous 2-D gpu tensor, or some of its columns (one
    /// projection's share of a product over several, read where it lies), transposed in the
    /// product when `transposed`.
    #[derive(Clone, Copy)]
    pub(crate) struct Mat<'a> {
        tensor: &'a Tensor,
        transposed: bool,
        /// The first column and the number of columns, when not all of them.
        columns: Option<(usize, usize)>,
    }

    impl<'a> From<(&'a Tensor, bool)> for Mat<'a> {
        fn from((tensor, transposed): (&'a Tensor, bool)) -> Self {
            Self {
                tensor,
                transposed,
                columns: None,
            }
        }
    }

    impl<'a> Mat<'a> {
        /// Columns `first..first + count` of `tensor`.
        pub(crate) fn columns(
            tensor: &'a Tensor,
            transposed: bool,
            (first, count): (usize, usize),
        ) -> Self {
            Self {
                tensor,
                transposed,
                columns: Some((first, count)),
            }
        }

        /// Rows and columns as stored, the row stride, and the first element.
        fn stored(&self) -> Result<(usize, usize, usize, usize)> {
            let (rows, cols) = self.tensor.dims2()?;
            match self.columns {
                None => Ok((rows, cols, cols, 0)),
                Some((first, count)) if first + count <= cols => Ok((rows, count, cols, first)),
                Some((first, count)) => candle_core::bail!(
                    "cublas operand: columns {first}..{} of {:?}",
                    first + count,
                    self.tensor.dims()
                ),
            }
        }

        /// Rows and columns in the product.
        fn dims(&self) -> Result<(usize, usize)> {
            let (rows, cols, _, _) = self.stored()?;
            Ok(if self.transposed {
                (cols, rows)
            } else {
                (rows, cols)
            })
        }
    }

    fn op(transposed: bool) -> sys::cublasOperation_t {
        if transposed {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    }

    /// Where a product goes: `[m, n]` at element `first` of `c`, rows `stride` apart.
    struct Out<'a, T> {
        c: &'a CudaSlice<T>,
        first: usize,
        stride: usize,
    }

    /// `C = alpha · op(A) · op(B) + beta · C` (row-major, see [`column_major`]) into `out`
    /// (bf16 or f32). A and B: bf16 operands (see [`Mat`]) of `[m, k]` and `[k, n]`.
    fn gemm<T: CudaDType + WithDType>(
        dev: &CudaDevice,
        a: Mat,
        b: Mat,
        (m, n, k): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        out: Out<T>,
    ) -> Result<()> {
        let c_type = match T::DTYPE {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            dt => candle_core::bail!("cublas products write bf16 or f32, not {dt:?}"),
        };
        if out.first + (m - 1) * out.stride + n > out.c.len() || n > out.stride {
            candle_core::bail!("cublas product: [{m}, {n}] does not fit its output");
        }
        let ((_, _, a_stride, a_first), (_, _, b_stride, b_first)) = (a.stored()?, b.stored()?);
        let call = column_major(
            (m, n, k),
            (a.transposed, a_stride),
            (b.transposed, b_stride),
            out.stride,
        );
        let stream = dev.cuda_stream();
        let (sa, la) = a.tensor.storage_and_layout();
        let (sb, lb) = b.tensor.storage_and_layout();
        let (a_view, b_view) = (view::<bf16>(&sa, la)?, view::<bf16>(&sb, lb)?);
        let (a_ptr, _a_guard) = a_view.device_ptr(&stream);
        let (b_ptr, _b_guard) = b_view.device_ptr(&stream);
        let (c_ptr, _c_guard) = out.c.device_ptr(&stream);
        let at =
            |ptr: u64, first: usize, size: usize| (ptr + (first * size) as u64) as *const c_void;
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg("cublas: dimension over 2^31".into()))
        };
        let blas = dev.cublas_handle();
        // SAFETY: the pointers address the operands' first elements in buffers that hold
        // every row the call reads or writes (`Mat::stored` and the check above bound the
        // columns; the callers check the shapes); alpha and beta are f32, as
        // CUBLAS_COMPUTE_32F takes them; the handle runs on the device's stream.
        unsafe {
            gemm_ex(
                *blas.handle(),
                op(call.trans_first),
                op(call.trans_second),
                int(call.m)?,
                int(call.n)?,
                int(call.k)?,
                (&alpha) as *const f32 as *const c_void,
                at(b_ptr, b_first, 2),
                sys::cudaDataType::CUDA_R_16BF,
                int(call.ld_first)?,
                at(a_ptr, a_first, 2),
                sys::cudaDataType::CUDA_R_16BF,
                int(call.ld_second)?,
                (&beta) as *const f32 as *const c_void,
                at(c_ptr, out.first, std::mem::size_of::<T>()) as *mut c_void,
                c_type,
                int(call.ldc)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cublas gemm: {e:?}")))
    }

    /// The `(m, n, k)` of `a · b`; an error when the inner sizes differ.
    fn product_dims(a: Mat, b: Mat) -> Result<(usize, usize, usize)> {
        let ((m, k), (kb, n)) = (a.dims()?, b.dims()?);
        if k != kb {
            candle_core::bail!(
                "cublas product: {:?} by {:?}",
                a.tensor.dims(),
                b.tensor.dims()
            );
        }
        Ok((m, n, k))
    }

    /// `alpha · a · b` as a new `[m, n]` tensor of dtype `out` (bf16 or f32).
    pub(crate) fn matmul<'a>(
        a: impl Into<Mat<'a>>,
        b: impl Into<Mat<'a>>,
        alpha: f32,
        out: DType,
    ) -> Result<Tensor> {
        fn f<T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
            a: Mat,
            b: Mat,
            alpha: f32,
        ) -> Result<Tensor> {
            let (m, n, k) = product_dims(a, b)?;
            let dev = cuda_device(a.tensor)?;
            if m * n * k == 0 {
                // No product to sum (an empty batch), or none to write: cuBLAS does not
                // document k = 0 and refuses leading dimensions of 0.
                return Ok(wrap(dev.alloc_zeros::<T>(m * n)?, &dev, &[m, n]));
            }
            // SAFETY: the gemm writes every element (beta = 0).
            let c = unsafe { dev.alloc::<T>(m * n)? };
            let out = Out {
                c: &c,
                first: 0,
                stride: n,
            };
            gemm(&dev, a, b, (m, n, k), (alpha, 0.0), out)?;
            Ok(wrap(c, &dev, &[m, n]))
        }
        let (a, b) = (a.into(), b.into());
        match out {
            DType::BF16 => f::<bf16>(a, b, alpha),
            DType::F32 => f::<f32>(a, b, alpha),
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

    /// `c += alpha · a · b` in place for a tensor `c` that no one else reads meanwhile (see
    /// [`takes_products_in_place`]), viewed as `[m, n]` (`n` the product's columns).
    pub(crate) fn add_product_into<'a>(
        c: &Tensor,
        a: impl Into<Mat<'a>>,
        b: impl Into<Mat<'a>>,
        alpha: f32,
    ) -> Result<()> {
        let (a, b) = (a.into(), b.into());
        let n = b.dims()?.1;
        if n == 0 || !c.elem_count().is_multiple_of(n) {
            candle_core::bail!("cublas add: {:?} is not rows of {n}", c.shape());
        }
        in_place(c, |cs| {
            matmul_add_into(cs, (c.elem_count() / n, n), a, b, alpha)
        })
    }

    /// `alpha · a · b` into columns `first..first + n` of `c`, a `[m, width]` tensor that takes
    /// products in place (see [`takes_products_in_place`]) and that no one else reads
    /// meanwhile: several products side by side, each written where it lies.
    pub(crate) fn matmul_into_columns<'a>(
        c: &Tensor,
        first: usize,
        a: impl Into<Mat<'a>>,
        b: impl Into<Mat<'a>>,
        alpha: f32,
    ) -> Result<()> {
        let (a, b) = (a.into(), b.into());
        let (m, n, k) = product_dims(a, b)?;
        let (rows, width) = c.dims2()?;
        if rows != m || first + n > width {
            candle_core::bail!(
                "cublas product: [{m}, {n}] into columns {first}.. of {:?}",
                c.dims()
            );
        }
        if m * n == 0 {
            return Ok(());
        }
        in_place(c, |cs| {
            if k == 0 {
                candle_core::bail!("cublas product into columns: no inner dimension");
            }
            gemm_into(cs, a, b, (m, n, k), (alpha, 0.0), (first, width))
        })
    }

    /// `x · wᵀ + alpha · left · right` as a new bf16 `[m, n]` storage, the thin product
    /// `left · right` (inner size r) written first and the frozen `x · wᵀ` added onto it by
    /// cuBLAS with beta = 1: the output is read back inside the large product's epilogue,
    /// which waits on its arithmetic anyway, where adding the thin product afterwards read
    /// and wrote it again in a pass of its own.
    pub(crate) fn thin_then_frozen<'a>(
        (x, w): (Mat<'a>, Mat<'a>),
        (left, right): (Mat<'a>, Mat<'a>),
        alpha: f32,
    ) -> Result<CudaStorage> {
        let (m, n, k) = product_dims(x, w)?;
        let (lm, ln, r) = product_dims(left, right)?;
        if (lm, ln) != (m, n) {
            candle_core::bail!(
                "cublas thin and frozen products: [{lm}, {ln}] and [{m}, {n}] differ"
            );
        }
        let dev = cuda_device(x.tensor)?;
        if m * n * k == 0 {
            // No rows, or nothing to sum (see `matmul`).
            return Ok(CudaStorage::wrap_cuda_slice(
                dev.alloc_zeros::<bf16>(m * n)?,
                dev,
            ));
        }
        // SAFETY: the first gemm writes every element (beta = 0).
        let c = unsafe { dev.alloc::<bf16>(m * n)? };
        let out = || Out {
            c: &c,
            first: 0,
            stride: n,
        };
        // A rank of 0 leaves no thin product (cuBLAS refuses its leading dimension of 0).
        let frozen_beta = if r == 0 {
            0.0
        } else {
            gemm(&dev, left, right, (m, n, r), (alpha, 0.0), out())?;
            1.0
        };
        gemm(&dev, x, w, (m, n, k), (1.0, frozen_beta), out())?;
        Ok(CudaStorage::wrap_cuda_slice(c, dev))
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

    /// `c += alpha · a · b` in place, `c` a contiguous bf16 or f32 `[m, n]` buffer that no one
    /// else reads meanwhile (an op's own output, or a gradient just computed).
    pub(crate) fn matmul_add_into<'a>(
        c: &CudaStorage,
        (m, n): (usize, usize),
        a: impl Into<Mat<'a>>,
        b: impl Into<Mat<'a>>,
        alpha: f32,
    ) -> Result<()> {
        let (a, b) = (a.into(), b.into());
        let (am, bn, k) = product_dims(a, b)?;
        if (am, bn) != (m, n) {
            candle_core::bail!(
                "cublas add: {:?} by {:?} into [{m}, {n}]",
                a.tensor.dims(),
                b.tensor.dims()
            );
        }
        if m * n * k == 0 {
            // Nothing to add (see `matmul`).
            return Ok(());
        }
        gemm_into(c, a, b, (m, n, k), (alpha, 1.0), (0, n))
    }

    /// [`gemm`] into the storage `c` (f32, or bf16 otherwise), the product's rows from element
    /// `first` on, `stride` apart.
    fn gemm_into(
        c: &CudaStorage,
        a: Mat,
        b: Mat,
        mnk: (usize, usize, usize),
        alpha_beta: (f32, f32),
        (first, stride): (usize, usize),
    ) -> Result<()> {
        fn f<T: CudaDType + WithDType>(
            c: &CudaStorage,
            a: Mat,
            b: Mat,
            mnk: (usize, usize, usize),
            alpha_beta: (f32, f32),
            (first, stride): (usize, usize),
        ) -> Result<()> {
            let out = Out {
                c: c.as_cuda_slice::<T>()?,
                first,
                stride,
            };
            gemm(c.device(), a, b, mnk, alpha_beta, out)
        }
        match c.dtype() {
            DType::F32 => f::<f32>(c, a, b, mnk, alpha_beta, (first, stride)),
            _ => f::<bf16>(c, a, b, mnk, alpha_beta, (first, stride)),
        }
    }

    /// Whether [`Mat`] takes `t` whole: a contiguous bf16 matrix.
    pub(crate) fn is_bf16_matrix(t: &Tensor) -> bool {
        t.dtype() == DType::BF16 && t.rank() == 2 && t.is_contiguous()
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

    /// A row-major `[rows, cols]` matrix stored from column `first` of rows `stride` long, the
    /// other elements of the buffer junk: its buffer, from the matrix's first element on.
    fn stored(rows: usize, cols: usize, (first, stride): (usize, usize), seed: usize) -> Vec<f32> {
        let value = |i: usize| ((i * 7 + seed * 13) % 11) as f32 - 5.0;
        (0..rows * stride)
            .map(|i| match (i % stride).checked_sub(first) {
                Some(j) if j < cols => value((i / stride) * cols + j),
                _ => 1e6,
            })
            .skip(first)
            .collect()
    }

    #[test]
    fn row_major_products_map_to_cublas_arguments() {
        let (m, n, k) = (5, 3, 4);
        // Whole matrices, and some columns of wider ones (one projection's share of several).
        for (first, pad) in [(0, 0), (2, 3)] {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a_rows, a_cols) = if a_t { (k, m) } else { (m, k) };
                let (b_rows, b_cols) = if b_t { (n, k) } else { (k, n) };
                let at = |cols: usize| (first, cols + pad);
                let a = stored(a_rows, a_cols, at(a_cols), 1);
                let b = stored(b_rows, b_cols, at(b_cols), 2);
                let c0 = stored(m, n, at(n), 3);
                let a_at = |i: usize, l: usize| {
                    let (r, c) = if a_t { (l, i) } else { (i, l) };
                    a[r * (a_cols + pad) + c]
                };
                let b_at = |l: usize, j: usize| {
                    let (r, c) = if b_t { (j, l) } else { (l, j) };
                    b[r * (b_cols + pad) + c]
                };
                let call =
                    column_major((m, n, k), (a_t, a_cols + pad), (b_t, b_cols + pad), n + pad);
                let mut c = c0.clone();
                cublas_reference(&call, &b, &a, &mut c);
                for (e, (&got, &before)) in c.iter().zip(&c0).enumerate() {
                    let (i, j) = (e / (n + pad), e % (n + pad));
                    let want = match j < n {
                        true => before + (0..k).map(|l| a_at(i, l) * b_at(l, j)).sum::<f32>(),
                        false => before,
                    };
                    assert_eq!(got, want, "a_t {a_t} b_t {b_t} pad {pad} at ({i}, {j})");
                }
            }
        }
    }
}
