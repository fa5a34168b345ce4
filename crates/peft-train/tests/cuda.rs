//! LoRA training on the GPU tracks the CPU float32 path: the same random model and data give
//! the same first 10 losses (within 0.1% in f32, 2% in bf16), with and without gradient
//! checkpointing. Built only with `--features cuda`; run on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device};
use common::{assert_tracks, losses};

#[test]
fn gpu_losses_track_the_cpu_f32_path() {
    let gpu = peft_ops::open_device("cuda").unwrap();
    let reference = losses(&Device::Cpu, DType::F32, false);
    assert_tracks(
        "cuda f32",
        &losses(&gpu, DType::F32, false),
        &reference,
        1e-3,
    );
    assert_tracks(
        "cuda bf16",
        &losses(&gpu, DType::BF16, false),
        &reference,
        0.02,
    );
    assert_tracks(
        "cuda bf16 + checkpointing",
        &losses(&gpu, DType::BF16, true),
        &reference,
        0.02,
    );
}
