//! A run stopped at a checkpoint and resumed gives the same loss at every later step as the
//! run that never stopped (bitwise, CPU f32), dropout included.

use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::tiny_llama;
use peft_train::{Example, TrainArgs, Trainer, Warmup};
use std::path::Path;

mod tiny_data;

fn examples() -> Vec<Example> {
    tiny_data::examples(10, 6, 4, 7, 0)
}

fn run(out: &Path, max_steps: usize, resume: Option<&str>) -> anyhow::Result<Vec<f64>> {
    run_on(out, max_steps, resume, "all-linear")
}

fn run_on(
    out: &Path,
    max_steps: usize,
    resume: Option<&str>,
    targets: &str,
) -> anyhow::Result<Vec<f64>> {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(TargetModules::parse_flag(targets)),
        ..Default::default()
    };
    let mut model = PeftModel::new(tiny_llama(21, true).unwrap(), config, 5).unwrap();
    let args = TrainArgs {
        max_steps: Some(max_steps),
        batch_size: 2,
        grad_accum: 2,
        lr: 5e-3,
        warmup: Warmup::Ratio(0.1),
        weight_decay: 0.01,
        seed: 3,
        save_steps: Some(2),
        save_total_limit: Some(3),
        resume_from: resume.map(|r| r.into()),
        output_dir: out.to_path_buf(),
        base_model_name: "tiny".into(),
        show_progress: false,
        ..Default::default()
    };
    Ok(Trainer {
        model: &mut model,
        args,
        pad_id: 0,
    }
    .train(&examples())?
    .losses)
}

#[test]
fn resumed_run_continues_bitwise() {
    let full_dir = tempfile::tempdir().unwrap();
    // 8 steps over 10 examples in batches of 2 with accumulation 2: crosses an epoch boundary.
    let full = run(full_dir.path(), 8, None).unwrap();
    assert_eq!(full.len(), 8);
    let names: Vec<String> = peft_train::checkpoint::list(full_dir.path())
        .iter()
        .map(|(s, _)| s.to_string())
        .collect();
    // Every second step, the last one included (as transformers' Trainer saves).
    assert_eq!(
        names,
        ["4", "6", "8"],
        "save_total_limit keeps the newest three"
    );

    let dir = tempfile::tempdir().unwrap();
    let first = run(dir.path(), 8, None).unwrap();
    assert_eq!(first, full, "the same seed gives the same run");
    // Drop the later checkpoints, as if the run had been killed after step 4 (mid-epoch).
    for later in ["checkpoint-6", "checkpoint-8"] {
        std::fs::remove_dir_all(dir.path().join(later)).unwrap();
    }
    let resumed = run(dir.path(), 8, Some("latest")).unwrap();
    assert_eq!(resumed, full[4..].to_vec());
    assert_eq!(
        tiny_data::logged_steps(dir.path()),
        (1..=8).collect::<Vec<_>>(),
        "one line per step, none twice"
    );
}

#[test]
fn resume_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), 4, None).unwrap();
    let err = run(dir.path(), 6, Some("latest")).unwrap_err().to_string();
    assert!(err.contains("total steps 4, this run 6"), "{err}");
    // Training other modules would silently drop those the checkpoint trained.
    let err = run_on(dir.path(), 4, Some("latest"), "q_proj")
        .unwrap_err()
        .to_string();
    assert!(err.contains("which this run does not"), "{err}");
    // A state that contradicts itself (edited by hand, or another run's file).
    let state = dir.path().join("checkpoint-4/trainer_state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["global_step"] = 99.into();
    std::fs::write(&state, json.to_string()).unwrap();
    let err = run(dir.path(), 4, Some("latest")).unwrap_err().to_string();
    assert!(err.contains("at step 99 of 4"), "{err}");
    let err = run(dir.path(), 4, Some("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a checkpoint folder"), "{err}");
}

/// Every method resumes bitwise, including prefix tuning trained through its projection MLP
/// (whose tensors the adapter file does not hold) and IA3 and bottleneck adapters.
#[test]
fn other_methods_resume_bitwise() {
    use peft::{BottleneckConfig, BottleneckModel, Ia3Config, Ia3Model, PromptModel, Tuned};
    let build = |method: &str| -> Box<dyn Tuned> {
        let base = tiny_llama(22, true).unwrap();
        match method {
            "prefix-projection" => {
                Box::new(PromptModel::new_prefix_tuning(base, 3, 5, Some(8)).unwrap())
            }
            "ia3" => Box::new(Ia3Model::new(base, Ia3Config::default()).unwrap()),
            _ => Box::new(BottleneckModel::new(base, BottleneckConfig::houlsby(4), 5).unwrap()),
        }
    };
    for method in ["prefix-projection", "ia3", "adapter"] {
        let train = |out: &Path, resume: Option<&str>| -> Vec<f64> {
            let mut model = build(method);
            let args = TrainArgs {
                max_steps: Some(6),
                batch_size: 2,
                lr: 1e-2,
                seed: 3,
                save_steps: Some(3),
                resume_from: resume.map(|r| r.into()),
                output_dir: out.to_path_buf(),
                base_model_name: "tiny".into(),
                show_progress: false,
                ..Default::default()
            };
            Trainer {
                model: model.as_mut(),
                args,
                pad_id: 0,
            }
            .train(&examples())
            .unwrap()
            .losses
        };
        let dir = tempfile::tempdir().unwrap();
        let full = train(dir.path(), None);
        let at_3 = dir.path().join("checkpoint-3");
        let resumed = train(dir.path(), Some(at_3.to_str().unwrap()));
        assert_eq!(resumed, full[3..].to_vec(), "{method}");
    }
}
