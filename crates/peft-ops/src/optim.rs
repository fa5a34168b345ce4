//! The optimizer step on the GPU as two kernel launches for all tensors together (the squared
//! gradient sum for clipping, then AdamW), instead of about fifteen launches per tensor.

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
    /// Multiplies every gradient first (the clipping factor).
    pub grad_scale: f32,
}

/// Parameters, gradients and moments that one fused step updates in place.
pub struct AdamwSlot<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
}

#[cfg(feature = "cuda")]
pub use crate::cuda::FusedAdamw;

/// Without the `cuda` feature no tensor qualifies: [`FusedAdamw::new`] always answers `None`.
#[cfg(not(feature = "cuda"))]
pub enum FusedAdamw {}

#[cfg(not(feature = "cuda"))]
impl FusedAdamw {
    /// The fused step for `slots`, or `None` when they are not all contiguous f32 tensors on
    /// one CUDA device.
    pub fn new(_slots: &[AdamwSlot]) -> candle_core::Result<Option<Self>> {
        Ok(None)
    }

    /// Sum of the squared gradients.
    pub fn grad_sum_squares(&self) -> candle_core::Result<f64> {
        match *self {}
    }

    /// Updates every parameter and its moments in place.
    pub fn step(&self, _scalars: &AdamwScalars) -> candle_core::Result<()> {
        match *self {}
    }
}
