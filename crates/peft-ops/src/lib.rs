//! Differentiable building blocks that candle lacks or computes wastefully.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward, and its matmul
//! backward also computes gradients for frozen weights. Each op here runs the fast forward on
//! detached inputs and attaches a hand-written backward through [`with_grad`].

mod checkpoint;
mod fused;
mod grad;
mod ops;
mod softmax;

pub use checkpoint::{add_grad, checkpoint, grad_enabled, no_grad, param, GradSink};
pub use fused::{causal_attention, dropout_mask, lora_linear, swiglu, Dropout};
pub use grad::{with_grad, with_grad3, Grads3};
pub use ops::{
    cross_entropy_chunked, frozen_linear, rms_norm, rope, softmax_last_dim, IGNORE_INDEX,
};
pub use softmax::{causal_softmax, causal_softmax_backward};
