pub(crate) use crate::tape::Accumulated;
use crate::tape::{record1, record3, record_accumulating, Backward1, Backward3, BackwardAcc};
use crate::{cuda_kernel_on, Kernel};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape,
    Storage, Tensor,
};
use std::sync::{Arc, Mutex};

/// Gradients of three arguments (`None` where an argument needs none).
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The output of a [`with_grad`] op.
pub enum Value {
    /// Computed beforehand, from the arguments detached: candle cannot attach a backward to an
    /// existing tensor, so the op's forward hands out a copy of it.
    Computed(Tensor),
    /// Computed by the op's forward into its own output: nothing is copied.
    ByTheOp(Box<dyn OpOutput>),
}

/// An output that a [`with_grad`] op computes in its forward, from tensors it holds. Those
/// may share storage with the op's arguments, whose read locks candle holds meanwhile: it reads
/// them again (a recursive read), so nothing may write those storages from another thread
/// during a forward pass (nothing does: training runs on one host thread, as candle's CUDA
/// stream per thread requires).
pub trait OpOutput: Send + Sync {
    fn cpu(self: Box<Self>) -> Result<(CpuStorage, Shape)>;
    fn cuda(self: Box<Self>) -> Result<(CudaStorage, Shape)>;
    /// The output as a tensor outside any graph (when no argument needs a gradient).
    fn tensor(self: Box<Self>) -> Result<Tensor>;
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Computed(t)
    }
}

impl Value {
    /// `x · wᵀ` (`x` `[rows, in]`, `w` `[out, in]`) in the shape `shape`, the last step of a
    /// linear layer: computed by the op where candle's matmul computes it (the CPU's bf16
    /// kernel does not run inside an op's forward), computed now otherwise.
    pub fn linear(x: &Tensor, w: &Tensor, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        let ((rows, inner), (out, w_inner)) = (x.dims2()?, w.dims2()?);
        if inner != w_inner || shape.elem_count() != rows * out {
            candle_core::bail!(
                "linear: input {:?} and weight {:?} do not give {:?}",
                x.dims(),
                w.dims(),
                shape.dims()
            );
        }
        let empty = x.elem_count() == 0 || w.elem_count() == 0;
        if empty || crate::bf16_gemm::bf16_gemm_serves(x, &w.t()?) {
            return Ok(Value::Computed(
                crate::frozen_matmul(x, w, true)?.reshape(shape)?,
            ));
        }
        Ok(Value::ByTheOp(Box::new(Op2Output {
            op: LinearForward { shape },
            a: x.clone(),
            b: w.clone(),
        })))
    }

    /// The value as the op should take it: computed now where `PEFT_CUDA_OFF=in_op` turns
    /// outputs computed inside the op off on GPUs.
    fn settled(self, device: &Device) -> Result<Self> {
        match self {
            Value::ByTheOp(out) if device.is_cuda() && !cuda_kernel_on(Kernel::InOp) => {
                Ok(Value::Computed(out.tensor()?))
            }
            value => Ok(value),
        }
    }

    pub(crate) fn into_tensor(self) -> Result<Tensor> {
        match self {
            Value::Computed(t) => Ok(t),
            Value::ByTheOp(out) => out.tensor(),
        }
    }
}

/// `x · wᵀ` (`x` `[rows, in]`, `w` `[out, in]`) as `shape`: see [`Value::linear`].
pub(crate) struct LinearForward {
    pub shape: Shape,
}

impl CustomOp2 for LinearForward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((linear_storage((x, xl), (w, wl))?, self.shape.clone()))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Ok((linear_storage((x, xl), (w, wl))?, self.shape.clone()))
    }
}

/// `x · wᵀ` on storages, `[rows, out]`: the backend call `x.matmul(&w.t())` makes.
pub(crate) fn linear_storage<S: BackendStorage>(
    (x, xl): (&S, &Layout),
    (w, wl): (&S, &Layout),
) -> Result<S> {
    let (rows, inner) = xl.shape().dims2()?;
    let out = wl.shape().dims2()?.0;
    x.matmul(w, (1, rows, out, inner), xl, &wl.transpose(0, 1)?)
}

/// A forward that only our CUDA code computes, from two storages: `name` and the computation
/// `f`, as the op of an [`Op2Output`] (the CPU path computes the value otherwise).
#[cfg(feature = "cuda")]
pub(crate) struct GpuForward<F> {
    pub name: &'static str,
    pub f: F,
}

#[cfg(feature = "cuda")]
pub(crate) type GpuIn<'a> = (&'a CudaStorage, &'a Layout);

#[cfg(feature = "cuda")]
impl<F> CustomOp2 for GpuForward<F>
where
    F: Fn(GpuIn, GpuIn) -> Result<(CudaStorage, Shape)> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: our kernel runs on GPUs", self.name)
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        (self.f)((a, al), (b, bl))
    }
}

/// Our custom op `op` on `(a, b)`, run by the with_grad op's forward (CPU and CUDA).
pub(crate) struct Op2Output<O> {
    pub op: O,
    pub a: Tensor,
    pub b: Tensor,
}

impl<O: CustomOp2 + Send + Sync> OpOutput for Op2Output<O> {
    fn cpu(self: Box<Self>) -> Result<(CpuStorage, Shape)> {
        let (sa, la) = self.a.storage_and_layout();
        let (sb, lb) = self.b.storage_and_layout();
        match (&*sa, &*sb) {
            (Storage::Cpu(a), Storage::Cpu(b)) => self.op.cpu_fwd(a, la, b, lb),
            _ => candle_core::bail!("{}: inputs are not on the cpu", self.op.name()),
        }
    }

    fn cuda(self: Box<Self>) -> Result<(CudaStorage, Shape)> {
        let (sa, la) = self.a.storage_and_layout();
        let (sb, lb) = self.b.storage_and_layout();
        match (&*sa, &*sb) {
            (Storage::Cuda(a), Storage::Cuda(b)) => self.op.cuda_fwd(a, la, b, lb),
            _ => candle_core::bail!("{}: inputs are not on the gpu", self.op.name()),
        }
    }

    fn tensor(self: Box<Self>) -> Result<Tensor> {
        self.a.apply_op2_no_bwd(&self.b, &self.op)
    }
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
    let value = value.settled(arg.device())?;
    let backward: Backward1 = Arc::new(backward);
    let y = arg.apply_op1(WithGrad {
        value: ValueSlot::new(value)?,
        backward: backward.clone(),
    })?;
    record1(arg, &y, &backward);
    Ok(y)
}

/// [`with_grad`] for a value computed from three tensors: `backward(value, grad_value)` returns
/// the gradients of `a`, `b` and `c` (`value` is the op's output in the graph: a backward that
/// needs it reads it there instead of keeping a second copy). Whatever else the backward needs
/// (inputs, saved intermediates) it captures itself, so the graph keeps only what it chooses to.
pub fn with_grad3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: impl Into<Value>,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    let backward: Backward3 = Arc::new(backward);
    attach3((a, b, c), value.into(), backward.clone(), |y| {
        record3([a, b, c], y, &backward)
    })
}

/// [`with_grad3`] for an op whose backward adds `a`'s gradient to the one gathered for `a` so
/// far, when a layer tape hands it one (see [`Accumulated`]): `backward(grad_value,
/// gathered)`, which does not read the op's output. candle's graph calls it without.
pub(crate) fn with_grad3_acc(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: impl Into<Value>,
    backward: impl Fn(&Tensor, Option<Accumulated>) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    let backward: BackwardAcc = Arc::new(backward);
    let graph_backward = backward.clone();
    let graph: Backward3 = Arc::new(move |_, grad| graph_backward(grad, None));
    attach3((a, b, c), value.into(), graph, |y| {
        record_accumulating([a, b, c], y, &backward)
    })
}

/// `value` as the output of a node of candle's graph over `a`, `b` and `c` with `backward`, then
/// `record`ed on a running tape; as it is when no argument needs a gradient.
fn attach3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    value: Value,
    backward: Backward3,
    record: impl FnOnce(&Tensor),
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return value.into_tensor();
    }
    let value = value.settled(a.device())?;
    let op = WithGrad3 {
        value: ValueSlot::new(value)?,
        backward,
    };
    let y = a.apply_op3(b, c, op)?;
    record(&y);
    Ok(y)
}

/// The value, handed out once by the op's forward. Taken, not cloned: the graph keeps the op
/// alive and a second copy must not stay here.
struct ValueSlot(Mutex<Option<Value>>);

impl ValueSlot {
    fn new(value: Value) -> Result<Self> {
        let value = match value {
            Value::Computed(t) => Value::Computed(t.contiguous()?),
            by_the_op => by_the_op,
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
            Value::ByTheOp(out) => return out.cpu(),
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
            Value::ByTheOp(out) => return out.cuda(),
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
    backward: Backward1,
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
