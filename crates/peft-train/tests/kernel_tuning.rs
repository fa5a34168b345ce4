//! Kernel tuning on a tiny model (a test binary of its own: tuning sets process-wide switches
//! that other tests would read while they run): it times the paths that run on a CPU, leaves
//! one set as it reports, trains nothing while it times, skips a path the environment fixes,
//! the run then trains as an untuned one does, and a resumed run takes its checkpoint's paths.

use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::tiny_llama;
use peft_ops::KernelTuning;
use peft_train::{Batch, Example, TrainArgs, Trainer};

mod tiny_data;

fn examples() -> Vec<Example> {
    tiny_data::examples(8, 6, 3, 5, 0)
}

/// LoRA on q, k and v without dropout: the layers that share their products over one input.
fn lora() -> PeftModel {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Some(TargetModules::parse_flag("q_proj,k_proj,v_proj")),
        init_lora_weights: serde_json::json!("gaussian"),
        ..Default::default()
    };
    PeftModel::new(tiny_llama(7, true).unwrap(), config, 5).unwrap()
}

fn args(out: &std::path::Path, kernel_tuning: KernelTuning) -> TrainArgs {
    TrainArgs {
        max_steps: Some(6),
        batch_size: 4,
        lr: 5e-3,
        seed: 3,
        output_dir: out.to_path_buf(),
        base_model_name: "tiny".into(),
        show_progress: false,
        kernel_tuning,
        ..Default::default()
    }
}

fn weights(model: &PeftModel) -> Vec<Vec<f32>> {
    model
        .trainable()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn tuning_times_the_paths_and_trains_nothing() {
    // Fixed by the environment: left as it is (set before any switch is read).
    std::env::set_var(peft_ops::TAPE_GATHER_VAR, "on");
    let dir = tempfile::tempdir().unwrap();
    let train = |tuning| {
        let mut model = lora();
        let mut trainer = Trainer {
            model: &mut model,
            args: args(dir.path(), tuning),
            pad_id: 0,
        };
        trainer.train(&examples()).unwrap()
    };
    let untuned = train(KernelTuning::Off);
    assert_eq!(untuned.kernel_settings, None);
    let untuned = untuned.losses;

    let mut model = lora();
    let before = weights(&model);
    let mut trainer = Trainer {
        model: &mut model,
        args: args(dir.path(), KernelTuning::On),
        pad_id: 0,
    };
    let exs = examples();
    let refs: Vec<&Example> = exs.iter().take(4).collect();
    let batch = Batch::new(&refs, 0, &candle_core::Device::Cpu).unwrap();
    let tuning = trainer.tune_kernels(&batch).unwrap().expect("tuning is on");
    assert_eq!(weights(&model), before, "timing trained nothing");
    // On a CPU: the sharing of LoRA's products and the layer tapes are timed both ways (each
    // on by default: its trial turns it off); the tape's gathering is fixed by the
    // environment.
    let flipped: Vec<_> = tuning.trials.iter().map(|t| t.flipped.as_deref()).collect();
    assert_eq!(
        flipped,
        [
            None,
            Some("PEFT_LORA_SHARED=off"),
            Some("PEFT_LAYER_TAPE=off")
        ]
    );
    assert_eq!(tuning.passes, 6);
    assert!(tuning.trials.iter().all(|t| t.seconds.is_ok()));
    let (shared, tapes) = (peft_ops::lora_shared(), peft_ops::layer_tape_enabled());
    assert_eq!(tuning.trials[1].kept, !shared);
    assert_eq!(tuning.trials[2].kept, !tapes);
    let on_off = |on: bool| if on { "on" } else { "off" };
    let mut want = vec![
        format!("PEFT_LORA_SHARED={}", on_off(shared)),
        format!("PEFT_LAYER_TAPE={}", on_off(tapes)),
    ];
    if tapes {
        // Gathering applies on a tape only.
        want.push("PEFT_TAPE_GATHER=on".into());
    }
    assert_eq!(
        tuning.settings, want,
        "the settings reported are the ones set"
    );

    // A run that tunes first trains as one that does not (either setting computes the same).
    let tuned = train(KernelTuning::On);
    let settings = tuned.kernel_settings.expect("the run tuned");
    assert!(settings.iter().any(|s| s.starts_with("PEFT_LORA_SHARED=")));
    let tuned = tuned.losses;
    assert_eq!(tuned.len(), untuned.len());
    for (a, b) in tuned.iter().zip(&untuned) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{tuned:?} vs {untuned:?}");
    }

    // A checkpoint names the chosen paths, and a run resumed from it takes them again rather
    // than tuning anew (here: against every switch flipped meanwhile).
    let out = tempfile::tempdir().unwrap();
    let run = |resume: Option<std::path::PathBuf>| {
        let mut model = lora();
        let mut trainer = Trainer {
            model: &mut model,
            args: TrainArgs {
                save_steps: Some(3),
                resume_from: resume,
                ..args(out.path(), KernelTuning::On)
            },
            pad_id: 0,
        };
        trainer.train(&examples()).unwrap()
    };
    let first = run(None).kernel_settings.expect("the run tuned");
    let state =
        std::fs::read_to_string(out.path().join("checkpoint-3/trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["kernel_settings"], serde_json::json!(first));
    for knob in peft_ops::knobs() {
        if std::env::var_os(knob.var).is_none() {
            (knob.set)(!(knob.get)());
        }
    }
    let resumed = run(Some(out.path().join("checkpoint-3")));
    assert_eq!(resumed.kernel_settings.as_ref(), Some(&first));
    let now: Vec<String> = peft_ops::knobs()
        .iter()
        .filter(|k| (k.applies)(false))
        .map(|k| k.setting())
        .collect();
    assert_eq!(now, first, "the checkpoint's paths are set again");
}
