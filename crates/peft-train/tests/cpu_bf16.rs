//! CPU bf16 mixed precision (`--dtype bf16` on a CPU: f32 weights, bf16 matmuls with f32
//! accumulation) tracks the f32 path: the first 10 losses of the same run within 2% (plain
//! and packed rows).
//! Its own test binary: the bf16 switch is process-wide.

mod common;

use candle_core::{DType, Device};
use common::{assert_tracks, losses, Setup};

#[test]
fn cpu_bf16_losses_track_the_f32_path() {
    let reference = losses(&Device::Cpu, DType::F32, Setup::default());
    let packed_reference = losses(
        &Device::Cpu,
        DType::F32,
        Setup {
            packed: true,
            ..Setup::default()
        },
    );
    if !peft_ops::set_bf16_matmul(true) {
        eprintln!("this CPU has no AVX512-BF16: bf16 matmuls stay off");
        assert!(!peft_ops::bf16_matmul_enabled());
        return;
    }
    let bf16 = losses(&Device::Cpu, DType::F32, Setup::default());
    assert_tracks("cpu bf16", &bf16, &reference, 0.02);
    // bf16 rounding shows: the runs are not the f32 run under another name.
    assert!(bf16.iter().zip(&reference).any(|(a, b)| a != b));
    assert_tracks(
        "cpu bf16 + checkpointing",
        &losses(
            &Device::Cpu,
            DType::F32,
            Setup {
                checkpointing: true,
                ..Setup::default()
            },
        ),
        &reference,
        0.02,
    );
    assert_tracks(
        "cpu bf16, packed rows",
        &losses(
            &Device::Cpu,
            DType::F32,
            Setup {
                packed: true,
                ..Setup::default()
            },
        ),
        &packed_reference,
        0.02,
    );
    let prefix = Setup {
        prefix_tuning: true,
        packed: true,
        ..Setup::default()
    };
    peft_ops::set_bf16_matmul(false);
    let prefix_reference = losses(&Device::Cpu, DType::F32, prefix);
    peft_ops::set_bf16_matmul(true);
    assert_tracks(
        "cpu bf16, prefix tuning, packed rows",
        &losses(&Device::Cpu, DType::F32, prefix),
        &prefix_reference,
        0.02,
    );
}
