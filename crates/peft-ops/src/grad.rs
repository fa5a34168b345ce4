use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
/// Gradients of three arguments (`None` where an argument needs none).
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
type Backward3 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// Returns `value` as a tensor of the autograd graph whose only parent is `arg`.
///
/// `backward(arg, value, grad_value)` must return dL/d`arg`. `value` must have been computed
/// from `arg` without tracking (candle cannot attach a backward to an existing tensor, so the
/// forward of this op hands back a copy of `value`). When `arg` is not part of a graph, `value`
/// is returned unchanged and nothing is copied.
pub fn with_grad(
    arg: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !arg.track_op() {
        return Ok(value);
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
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value);
    }
    let op = WithGrad3 {
        value: ValueSlot::new(value)?,
        backward: Box::new(backward),
    };
    a.apply_op3(b, c, op)
}

/// The precomputed value, handed out once by the op's forward. Taken, not cloned: the graph
/// keeps the op alive and a second copy must not stay here.
struct ValueSlot(Mutex<Option<Tensor>>);

impl ValueSlot {
    fn new(value: Tensor) -> Result<Self> {
        Ok(Self(Mutex::new(Some(value.contiguous()?))))
    }

    fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("with_grad: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("with_grad: forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
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
        let value = self.take()?;
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
