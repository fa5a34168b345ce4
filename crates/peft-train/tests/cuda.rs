//! Training on the GPU tracks the CPU float32 path: the same random model and data give the
//! same first 10 losses (within 0.1% in f32, 2% in bf16), LoRA with and without gradient
//! checkpointing, and prefix tuning; kernel tuning finds every GPU path computing alike. Built
//! only with `--features cuda`; run on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device};
use common::{assert_tracks, losses, Setup};

#[test]
fn gpu_losses_track_the_cpu_f32_path() {
    let gpu = peft_ops::open_device("cuda").unwrap();
    let reference = losses(&Device::Cpu, DType::F32, Setup::default());
    assert_tracks(
        "cuda f32",
        &losses(&gpu, DType::F32, Setup::default()),
        &reference,
        1e-3,
    );
    assert_tracks(
        "cuda bf16",
        &losses(&gpu, DType::BF16, Setup::default()),
        &reference,
        0.02,
    );
    assert_tracks(
        "cuda bf16 + checkpointing",
        &losses(
            &gpu,
            DType::BF16,
            Setup {
                checkpointing: true,
                ..Setup::default()
            },
        ),
        &reference,
        0.02,
    );
}

/// Packed rows (two sequences per row, one row padded): the flash attention kernels with
/// segment ids and per-position RoPE tables against the CPU's masked attention.
#[test]
fn gpu_packed_losses_track_the_cpu_f32_path() {
    let gpu = peft_ops::open_device("cuda").unwrap();
    assert_tracks(
        "cuda bf16, packed rows",
        &losses(
            &gpu,
            DType::BF16,
            Setup {
                packed: true,
                ..Setup::default()
            },
        ),
        &losses(
            &Device::Cpu,
            DType::F32,
            Setup {
                packed: true,
                ..Setup::default()
            },
        ),
        0.02,
    );
}

/// Prefix tuning (virtual keys and values in a pre-filled cache), plain and packed rows, with
/// and without checkpointing: the flash kernels attend over the prefix against the CPU's
/// attention over the cache.
#[test]
fn gpu_prefix_tuning_losses_track_the_cpu_f32_path() {
    let gpu = peft_ops::open_device("cuda").unwrap();
    for (packed, checkpointing) in [(false, false), (true, false), (true, true)] {
        let setup = Setup {
            prefix_tuning: true,
            packed,
            checkpointing,
        };
        assert_tracks(
            &format!("cuda bf16, prefix tuning, packed {packed}, checkpointing {checkpointing}"),
            &losses(&gpu, DType::BF16, setup),
            &losses(&Device::Cpu, DType::F32, setup),
            0.02,
        );
    }
}

/// The fused optimizer step on the GPU (f32 and bf16 tensors, and 8-bit moments for the large
/// tensor under `adamw_8bit`; two parameter groups) against the CPU f32 step: three clipped steps give the same parameters
/// within 1e-5 (the f32 kernel rounds `1 − beta` in f32, the CPU in f64; the 8-bit kernel
/// rounds as the CPU does).
#[test]
fn fused_optimizer_tracks_the_cpu_step() {
    use candle_core::{Tensor, Var};
    use peft_train::{AdamW, OptimKind};
    let gpu = peft_ops::open_device("cuda").unwrap();
    let run = |device: &Device, kind: OptimKind, dtype: DType| -> Vec<Vec<f32>> {
        let init = |n: usize, seed: u64| {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 2_654_435_761 + seed) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let t = Tensor::from_vec(v, n, device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let params = vec![init(4096 + 300, 1), init(64, 2), init(96, 3)];
        let mut opt = AdamW::with_kind(params.clone(), 0.9, 0.999, 1e-8, 0.01, kind).unwrap();
        // Parameter groups: a faster one without decay (LoRA+'s B, a bias) beside the default.
        let fast = peft_train::ParamGroup {
            lr_scale: 4.0,
            decay: false,
        };
        let groups = [peft_train::ParamGroup::default(), fast, fast];
        opt.set_groups(&groups).unwrap();
        for step in 0..3 {
            // Linear in the parameters: the gradients (the coefficients) are exact on both
            // devices, so only the optimizer can make them differ.
            let loss = params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let n = p.elem_count();
                    let coeff =
                        init(n, (10 * step + i) as u64).as_tensor().detach() * (step + 2) as f64;
                    (p.as_tensor() * coeff.unwrap()).unwrap().sum_all().unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let mut grads = loss.backward().unwrap();
            let norm = opt.step_clipped(&mut grads, 1.0, 1e-2).unwrap();
            assert!(norm > 1.0, "clipping must engage: norm {norm}");
        }
        params
            .iter()
            .map(|p| {
                let p = p.to_dtype(DType::F32).unwrap();
                p.to_device(&Device::Cpu).unwrap().to_vec1().unwrap()
            })
            .collect()
    };
    // bf16 parameters and moments (full fine-tuning in bf16) take the bf16 kernel: within
    // bf16's rounding of the f32 run.
    for (kind, dtype, tol) in [
        (OptimKind::Adamw, DType::F32, 1e-5),
        (OptimKind::Adamw8bit, DType::F32, 1e-5),
        (OptimKind::Adamw, DType::BF16, 2e-2),
    ] {
        let want = run(&Device::Cpu, kind, DType::F32);
        let got = run(&gpu, kind, dtype);
        for (w, g) in want.iter().zip(&got) {
            let diff = w
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= tol,
                "{kind:?} {dtype:?}: max parameter difference {diff}"
            );
        }
    }
}

/// A NaN gradient: the fused step reports a NaN norm and leaves the parameters as they were
/// (the kernels read the norm on the device and skip the update), as the CPU step does.
#[test]
fn fused_optimizer_skips_a_step_with_a_nan_gradient() {
    use candle_core::{Tensor, Var};
    use peft_train::{AdamW, OptimKind};
    let gpu = peft_ops::open_device("cuda").unwrap();
    for kind in [OptimKind::Adamw, OptimKind::Adamw8bit] {
        let values: Vec<f32> = (0..5000).map(|i| (i % 7) as f32 - 3.0).collect();
        let p = Var::from_tensor(&Tensor::new(values.as_slice(), &gpu).unwrap()).unwrap();
        let mut opt = AdamW::with_kind(vec![p.clone()], 0.9, 0.999, 1e-8, 0.01, kind).unwrap();
        let mut coeff = vec![1f32; 5000];
        coeff[17] = f32::NAN;
        let coeff = Tensor::new(coeff.as_slice(), &gpu).unwrap();
        let loss = (p.as_tensor() * coeff).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = opt.step_clipped(&mut grads, 1.0, 1e-2).unwrap();
        assert!(norm.is_nan(), "{kind:?}: norm {norm}");
        let after: Vec<f32> = p
            .as_tensor()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(after, values, "{kind:?}: the parameters changed");
    }
}

/// Kernel tuning on the GPU tries every path it knows on a bf16 LoRA model (q, k and v
/// sharing their products, gate and up too), and each reproduces the starting paths' loss and
/// gradient norm: no trial fails. The switches are set back afterwards, for the tests that
/// follow in this process.
#[test]
fn kernel_tuning_finds_every_gpu_path_computing_alike() {
    struct Restore(Vec<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            for (knob, &on) in peft_ops::knobs().iter().zip(&self.0) {
                (knob.set)(on);
            }
        }
    }
    let _restore = Restore(peft_ops::knobs().iter().map(|k| (k.get)()).collect());
    let gpu = peft_ops::open_device("cuda").unwrap();
    let (mut model, batch, lr) = common::model_and_batch(&gpu, DType::BF16, Setup::default());
    let mut trainer = peft_train::Trainer {
        model: model.as_mut(),
        args: peft_train::TrainArgs {
            lr,
            show_progress: false,
            kernel_tuning: peft_ops::KernelTuning::On,
            ..Default::default()
        },
        pad_id: 0,
    };
    let tuning = trainer.tune_kernels(&batch).unwrap().expect("tuning is on");
    eprintln!("{}\n{:#?}", tuning.summary(), tuning.trials);
    for t in &tuning.trials {
        assert!(t.seconds.is_ok(), "{:?}: {:?}", t.flipped, t.seconds);
    }
    let tried: Vec<&str> = tuning
        .trials
        .iter()
        .filter_map(|t| t.flipped.as_deref())
        .collect();
    // Unless the environment fixes them (check.sh's --test-env runs); cuDNN's attention where
    // cuDNN loads.
    let mut vars = vec![peft_ops::CUDA_LORA_VAR, peft_ops::LORA_SHARED_VAR];
    if peft_ops::cudnn_version().is_some() {
        vars.push(peft_ops::CUDA_ATTENTION_VAR);
    }
    for var in vars.into_iter().filter(|v| std::env::var_os(v).is_none()) {
        assert!(
            tried.iter().any(|t| t.starts_with(var)),
            "{var} not tried: {tried:?}"
        );
    }
}
