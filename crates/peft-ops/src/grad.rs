use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

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
    let value = value.contiguous()?;
    arg.apply_op1(WithGrad {
        value: Mutex::new(Some(value)),
        backward: Box::new(backward),
    })
}

struct WithGrad {
    /// Taken by the forward: the graph keeps this op alive, the copy must not stay here too.
    value: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl WithGrad {
    fn take_value(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("with_grad: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("with_grad: forward ran twice".into()))
    }
}

fn slice_cpu(storage: &CpuStorage, start: usize, end: usize) -> Result<CpuStorage> {
    Ok(match storage {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        _ => candle_core::bail!("with_grad: unsupported dtype {:?}", storage.dtype()),
    })
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        "with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let value = self.take_value()?;
        let (storage, layout) = value.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("with_grad: value not contiguous".into()))?;
        match &*storage {
            Storage::Cpu(s) => Ok((slice_cpu(s, start, end)?, layout.shape().clone())),
            _ => candle_core::bail!("with_grad: value is not on the cpu"),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let value = self.take_value()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("with_grad: value is not on the gpu"),
        }
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(arg, res, grad_res).map(Some)
    }
}
