use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
/// Gradients of three arguments (`None` where an argument needs none).
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// The output of a [`with_grad`] op.
pub enum Value {
    /// Computed beforehand, from the arguments detached: candle cannot attach a backward to an
    /// existing tensor, so the op's forward hands out a copy of it.
    Computed(Tensor),
    /// `x · wᵀ` (`x` `[rows, in]`, `w` `[out, in]`) in the shape `shape`: the last step of a
    /// linear layer, computed by the op's forward into its own output, so nothing is copied.
    Linear { x: Tensor, w: Tensor, shape: Shape },
    /// LoRA's output `x · wᵀ + scale · left · rightᵀ` (`left` = x·Aᵀ `[rows, r]`, `right` = B
    /// `[out, r]`, both f32) in the shape `shape`, computed by the op's forward into its own
    /// output: the frozen matmul, then our kernel adds the low-rank term in place (GPUs).
    #[cfg(feature = "cuda")]
    LowRank {
        x: Tensor,
        w: Tensor,
        left: Tensor,
        right: Tensor,
        scale: f32,
        shape: Shape,
    },
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Computed(t)
    }
}

impl Value {
    /// `x · wᵀ` as a [`Value::Linear`] where candle's matmul computes it (the CPU's bf16
    /// kernel does not run inside an op's forward), computed now otherwise.
    pub fn linear(x: &Tensor, w: &Tensor, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        let empty = x.elem_count() == 0 || w.elem_count() == 0;
        if empty || crate::bf16_gemm::bf16_gemm_serves(x, &w.t()?) {
            return Ok(Value::Computed(
                crate::frozen_matmul(x, w, true)?.reshape(shape)?,
            ));
        }
        Ok(Value::Linear {
            x: x.clone(),
            w: w.clone(),
            shape,
        })
    }

    /// The value as a tensor outside any graph.
    fn into_tensor(self) -> Result<Tensor> {
        match self {
            Value::Computed(t) => Ok(t),
            Value::Linear { x, w, shape } => x.matmul(&w.t()?)?.reshape(shape),
            #[cfg(feature = "cuda")]
            Value::LowRank {
                x,
                w,
                left,
                right,
                scale,
                shape,
            } => {
                let base = x.matmul(&w.t()?)?;
                crate::cuda::low_rank_add(&base, &left, &right, false, None, scale)?.reshape(shape)
            }
        }
    }
}

/// `x · wᵀ` on storages: `x` `[rows, in]`, `w` `[out, in]`.
fn linear_storage<S: BackendStorage>(x: (&S, &Layout), w: (&S, &Layout)) -> Result<S> {
    let (rows, inner) = x.1.shape().dims2()?;
    let out = w.1.shape().dims2()?.0;
    x.0.matmul(w.0, (1, rows, out, inner), x.1, &w.1.transpose(0, 1)?)
}

/// Returns `value` as a tensor of the autograd graph whose only parent is `arg`.
///
/// `backward(arg, value, grad_value)` must return dL/d`arg`. `value` must be computed from
/// `arg` without tracking (see [`Value`]). When `arg` is not part of a graph, the value is
/// returned as it is.
pub fn with_grad(
    arg: &Tensor,
    value: impl Into<Value>,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let value = value.into();
    if !arg.track_op() {
        return value.into_tensor();
    }
    arg.apply_op1(WithGrad {
        value: ValueSlot::new(value)?,
        backward: Box::new(backward),
    })
}

/// [`with_grad`] for a value computed from three tensors: `backward(value, grad_value)` returns
/// the gradients of `a`, `b` and `c` (`value` is the graph's copy: a backward that needs the
/// output reads it there instead of keeping a second one). Whatever else the backward needs
/// (inputs, saved intermediates) it captures itself, so the graph keeps only what it chooses to.
pub fn with_grad3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: impl Into<Value>,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    let value = value.into();
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return value.into_tensor();
    }
    let op = WithGrad3 {
        value: ValueSlot::new(value)?,
        backward: Box::new(backward),
    };
    a.apply_op3(b, c, op)
}

/// The value, handed out once by the op's forward. Taken, not cloned: the graph keeps the op
/// alive and a second copy must not stay here.
struct ValueSlot(Mutex<Option<Value>>);

impl ValueSlot {
    fn new(value: Value) -> Result<Self> {
        let value = match value {
            Value::Computed(t) => Value::Computed(t.contiguous()?),
            computed_by_the_op => computed_by_the_op,
        };
        Ok(Self(Mutex::new(Some(value))))
    }

    fn take(&self) -> Result<Value> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("with_grad: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("with_grad: forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let value = match self.take()? {
            Value::Computed(t) => t,
            Value::Linear { x, w, shape } => {
                let (xs, xl) = x.storage_and_layout();
                let (ws, wl) = w.storage_and_layout();
                return match (&*xs, &*ws) {
                    (Storage::Cpu(xs), Storage::Cpu(ws)) => {
                        Ok((linear_storage((xs, xl), (ws, wl))?, shape))
                    }
                    _ => candle_core::bail!("with_grad: linear inputs are not on the cpu"),
                };
            }
            #[cfg(feature = "cuda")]
            Value::LowRank { .. } => candle_core::bail!("with_grad: LoRA's kernel runs on GPUs"),
        };
        let (storage, layout) = value.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("with_grad: value not contiguous".into()))?;
        let copy = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => CpuStorage::F32(v[start..end].to_vec()),
            Storage::Cpu(CpuStorage::BF16(v)) => CpuStorage::BF16(v[start..end].to_vec()),
            Storage::Cpu(CpuStorage::F16(v)) => CpuStorage::F16(v[start..end].to_vec()),
            Storage::Cpu(CpuStorage::F64(v)) => CpuStorage::F64(v[start..end].to_vec()),
            Storage::Cpu(s) => candle_core::bail!("with_grad: unsupported dtype {:?}", s.dtype()),
            _ => candle_core::bail!("with_grad: value is not on the cpu"),
        };
        Ok((copy, layout.shape().clone()))
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let value = match self.take()? {
            Value::Computed(t) => t,
            Value::Linear { x, w, shape } => {
                let (xs, xl) = x.storage_and_layout();
                let (ws, wl) = w.storage_and_layout();
                return match (&*xs, &*ws) {
                    (Storage::Cuda(xs), Storage::Cuda(ws)) => {
                        Ok((linear_storage((xs, xl), (ws, wl))?, shape))
                    }
                    _ => candle_core::bail!("with_grad: linear inputs are not on the gpu"),
                };
            }
            #[cfg(feature = "cuda")]
            Value::LowRank {
                x,
                w,
                left,
                right,
                scale,
                shape,
            } => {
                let storage = {
                    let (xs, xl) = x.storage_and_layout();
                    let (ws, wl) = w.storage_and_layout();
                    match (&*xs, &*ws) {
                        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
                            linear_storage((xs, xl), (ws, wl))?
                        }
                        _ => candle_core::bail!("with_grad: LoRA inputs are not on the gpu"),
                    }
                };
                let dims = (x.dim(0)?, w.dim(0)?);
                crate::cuda::low_rank_add_in_place(&storage, dims, &left, &right, scale)?;
                return Ok((storage, shape));
            }
        };
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("with_grad: value is not on the gpu"),
        }
    }
}

struct WithGrad {
    value: ValueSlot,
    backward: Backward,
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        "with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(arg, res, grad_res).map(Some)
    }
}

struct WithGrad3 {
    value: ValueSlot,
    backward: Backward3,
}

impl CustomOp3 for WithGrad3 {
    fn name(&self) -> &'static str {
        "with-grad3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        (self.backward)(res, grad)
    }
}
