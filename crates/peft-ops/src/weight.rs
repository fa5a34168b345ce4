//! The weight of a linear layer: dense (possibly trainable), or 4-bit quantized and frozen
//! (QLoRA). A quantized weight is dequantized on the fly for each matmul, in the forward and
//! again in the backward pass, so only its 4-bit form stays in memory (on a GPU, in GPU memory,
//! dequantized by a kernel there).

use crate::{frozen_matmul, with_grad, Value};
use candle_core::{DType, Device, Result, Tensor};
use peft_quant::{quantize_4bit, FourBit, Quant4, BLOCKSIZE_4BIT};
use std::sync::Arc;

/// A frozen `[out, in]` weight in bitsandbytes' 4-bit format.
#[derive(Debug)]
pub struct QuantizedWeight {
    pub q: Quant4,
    pub out_features: usize,
    pub in_features: usize,
    /// Dtype the weight is dequantized to for compute.
    pub dtype: DType,
    pub device: Device,
    /// The 4-bit form in GPU memory, dequantized there for each matmul (none on the CPU).
    #[cfg(feature = "cuda")]
    on_device: Option<crate::cuda::DeviceQuant4>,
}

impl QuantizedWeight {
    /// Quantizes a dense `[out, in]` weight (any dtype and device).
    pub fn quantize(w: &Tensor, kind: FourBit, double_quant: bool, dtype: DType) -> Result<Self> {
        let (out_features, in_features) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let q = quantize_4bit(&values, kind, BLOCKSIZE_4BIT, double_quant);
        Self::from_quant4(q, (out_features, in_features), dtype, w.device())
    }

    /// An `[out, in]` weight already in 4 bits (a bitsandbytes checkpoint's), computed in
    /// `dtype` on `device`.
    pub fn from_quant4(
        q: Quant4,
        dims: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if q.len != dims.0 * dims.1 {
            candle_core::bail!("4-bit weight of {} values for a {dims:?} weight", q.len);
        }
        Ok(Self {
            #[cfg(feature = "cuda")]
            on_device: match device {
                Device::Cuda(_) if crate::cuda_kernel_on(crate::Kernel::Dequantize) => {
                    Some(crate::cuda::DeviceQuant4::upload(&q, device)?)
                }
                _ => None,
            },
            q,
            out_features: dims.0,
            in_features: dims.1,
            dtype,
            device: device.clone(),
        })
    }

    /// The dense weight, `[out, in]` in the compute dtype (on a GPU, by a kernel there).
    pub fn dequantize(&self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(q) = &self.on_device {
            return q.dequantize(self.dtype, (self.out_features, self.in_features));
        }
        Tensor::from_vec(
            self.q.dequantize(),
            (self.out_features, self.in_features),
            &Device::Cpu,
        )?
        .to_dtype(self.dtype)?
        .to_device(&self.device)
    }
}

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A tensor; trainable when it is a `Var` (full fine-tuning, `modules_to_save`).
    Dense(Tensor),
    Quantized(Arc<QuantizedWeight>),
}

impl LinearWeight {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(t) => {
                let d = t.dims();
                (d[0], d[1])
            }
            LinearWeight::Quantized(q) => (q.out_features, q.in_features),
        }
    }

    /// The dense values (a dequantized copy for a quantized weight).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => Ok(t.clone()),
            LinearWeight::Quantized(q) => q.dequantize(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, LinearWeight::Quantized(_))
    }
}

/// `x · wᵀ` for a frozen quantized `w`: dequantized for the matmul and again in the
/// backward, which returns dL/dx only.
pub fn quantized_linear(x: &Tensor, w: &Arc<QuantizedWeight>) -> Result<Tensor> {
    let (out_f, in_f) = (w.out_features, w.in_features);
    let rows = x.elem_count() / in_f;
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has dims") = out_f;
    let x2 = x.detach().reshape((rows, in_f))?;
    let y = Value::linear(&x2, &w.dequantize()?, out_shape)?;
    let w = w.clone();
    with_grad(x, y, move |x, _, grad| {
        frozen_matmul(&grad.reshape((rows, out_f))?, &w.dequantize()?, false)?.reshape(x.shape())
    })
}
