//! Differentiable building blocks that candle lacks or computes wastefully.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward, and its matmul
//! backward also computes gradients for frozen weights. Each op here runs the fast forward on
//! detached inputs and attaches a hand-written backward through [`with_grad`].

mod attention;
mod bf16_gemm;
mod checkpoint;
mod cross_entropy;
mod cublas;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", test))]
mod cudnn;
mod device;
mod fast_exp;
mod fused;
mod grad;
mod init;
mod lora_shared;
mod moe;
mod ops;
mod optim;
mod softmax;
mod switches;
mod tape;
mod tuning;
mod weight;

use rayon::prelude::*;

pub use attention::{
    causal_attention, causal_self_attention, packed_self_attention, prefixed_self_attention,
    PrefixedRows, SHARED_SEGMENT,
};
pub use bf16_gemm::{
    batched_matmul, bf16_matmul_enabled, bf16_supported, frozen_matmul, gemm_bf16, set_bf16_matmul,
    Weight,
};
pub use checkpoint::{add_grad, checkpoint, grad_enabled, no_grad, param, GradSink, NoGrad};
pub use device::{open_device, peak_memory, release_unused_memory, reset_peak_memory};
pub use fused::{dropout_mask, frozen_mlp, gated_act, lora_linear, Dropout, GatedActivation};
pub use grad::{with_grad, with_grad3, Grads3, OpOutput, Value};
pub use init::{random_normal, random_uniform};
pub use lora_shared::{
    lora_linears, lora_shared, set_lora_shared, with_lora_shared, LoraProjection, LORA_SHARED_VAR,
};
pub use moe::{
    frozen_moe, route, sigmoid_gated, ExpertRows, ExpertWeights, FrozenRouter, LoadBalance,
    RouterKind, Routing, Scoring,
};
pub use ops::{
    cross_entropy_chunked, cross_entropy_sum, cross_entropy_sum_stats, embedding, frozen_linear,
    linear, rms_norm, rope, softmax_last_dim, TokenStats, IGNORE_INDEX,
};
pub use optim::{AdamwScalars, AdamwSlot, FusedAdamw, SlotMoments};
pub use softmax::{
    attention_probs, attention_probs_backward, causal_softmax, causal_softmax_backward,
    causal_softmax_with_sinks, soft_cap, softmax_with_sinks,
};
pub use switches::{
    attention_cudnn, cuda_kernel_on, cuda_kernels_off, flash_wide, flash_wide_backward,
    lora_cublas, parse_kernels_off, set_attention_cudnn, set_flash_wide, set_flash_wide_backward,
    set_lora_cublas, Kernel, CUDA_ATTENTION_VAR, CUDA_FLASH_BWD_VAR, CUDA_FLASH_VAR, CUDA_LORA_VAR,
    CUDA_OFF_VAR,
};
pub use tape::{
    add, add_bias, cast, layer_tape_enabled, narrow_last, permute_last, reshape, scale,
    set_layer_tape, set_tape_gather, tape_gather_enabled, taped, with_layer_tape, LAYER_TAPE_VAR,
    TAPE_GATHER_VAR,
};
pub use tuning::{
    apply_settings, knobs, tune, KernelTuning, Knob, Pass, Trial, Tuning, KERNEL_TUNING_VAR,
};
pub use weight::{quantized_linear, LinearWeight, QuantizedWeight};

/// Whether our own kernel (of group `k` on GPUs) serves `t`: f32 on the CPU, f32 or bf16 on
/// CUDA unless `PEFT_CUDA_OFF` turns the group off.
pub(crate) fn has_kernel(t: &candle_core::Tensor, k: Kernel) -> bool {
    use candle_core::DType;
    match t.device() {
        candle_core::Device::Cpu => t.dtype() == DType::F32,
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && matches!(t.dtype(), DType::F32 | DType::BF16)
                && cuda_kernel_on(k)
        }
        _ => false,
    }
}

/// The values of a contiguous f32 CPU tensor.
pub(crate) fn cpu_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("expected a contiguous f32 tensor"),
    }
}

/// A vector of `len` values built in parallel: `fill(i, chunk)` writes chunk `i` (`chunk`
/// values, the last one shorter). Each chunk is zeroed by its own task just before `fill`
/// runs, not all at once on the calling thread.
pub(crate) fn par_build<T: Copy + Default + Send + Sync>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, dst)| {
            dst.fill(std::mem::MaybeUninit::new(T::default()));
            // SAFETY: every element was just initialised.
            fill(i, unsafe {
                &mut *(dst as *mut [std::mem::MaybeUninit<T>] as *mut [T])
            });
        });
    // SAFETY: every chunk was initialised above.
    unsafe { out.set_len(len) };
    out
}

/// The version of the cuDNN that the GPU attention loads (e.g. 92801 for 9.28.1), or
/// `None` where it cannot be loaded (or without the `cuda` feature).
pub fn cudnn_version() -> Option<usize> {
    #[cfg(feature = "cuda")]
    return cudnn::backend::version().ok();
    #[cfg(not(feature = "cuda"))]
    None
}

/// How many times cuDNN's attention plans have run in this process (0 without the `cuda`
/// feature): whether cuDNN, not the flash kernels (`PEFT_CUDA_ATTENTION=flash`), served a pass.
pub fn cudnn_attention_runs() -> usize {
    #[cfg(feature = "cuda")]
    return cudnn::RUNS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "cuda"))]
    0
}
