//! The optimizer step on the GPU as two kernel launches per kind of tensors (the squared
//! gradient sum for clipping, then AdamW, which computes the clipping factor from that sum on
//! the device), instead of about fifteen launches per tensor.

use candle_core::Tensor;

/// One AdamW update's scalars (PyTorch's rule; see `kernels/optim.cu`).
#[derive(Clone, Copy, Debug)]
pub struct AdamwScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    /// `1 − beta1^step` and `1 − beta2^step`.
    pub bias_correction1: f32,
    pub bias_correction2: f32,
}

/// A parameter, its gradient and its moments, which one fused step updates in place.
pub struct AdamwSlot<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub moments: SlotMoments<'a>,
    /// Which of the step's scalars (one set per parameter group) update it.
    pub group: usize,
}

/// The moments of one [`AdamwSlot`].
pub enum SlotMoments<'a> {
    /// In the parameter's dtype and shape (f32, or bf16 for full fine-tuning in bf16).
    Dense { m: &'a Tensor, v: &'a Tensor },
    /// 8-bit codes (u8, one per element) and f32 scales per block of 256: the first moment on
    /// the signed dynamic map, the second on the unsigned one (bitsandbytes' 8-bit AdamW).
    Q8 {
        m_codes: &'a Tensor,
        m_absmax: &'a Tensor,
        v_codes: &'a Tensor,
        v_absmax: &'a Tensor,
    },
}

#[cfg(feature = "cuda")]
pub use crate::cuda::FusedAdamw;

/// Without the `cuda` feature no tensor qualifies: [`FusedAdamw::new`] always answers `None`.
#[cfg(not(feature = "cuda"))]
pub enum FusedAdamw {}

#[cfg(not(feature = "cuda"))]
impl FusedAdamw {
    /// The fused step for `slots`, or `None` when they cannot take it (not all on one CUDA
    /// device, or of other dtypes).
    pub fn new(_slots: &[AdamwSlot]) -> candle_core::Result<Option<Self>> {
        Ok(None)
    }

    /// Clips the gradients to a global norm of `max_norm`, updates every parameter and its
    /// moments in place (with the scalars of its group), and returns the norm before clipping.
    pub fn step(&self, _scalars: &[AdamwScalars], _max_norm: f64) -> candle_core::Result<f64> {
        match *self {}
    }
}
