//! Full fine-tuning on a tiny model: every tensor trains, the loss falls, the saved folder is
//! a model that reloads to the same outputs, and a resumed run continues bitwise.

use candle_core::{DType, Device, Tensor};
use peft::{FullModel, Tuned};
use peft_models::loader::load_model;
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_models::Llama;
use peft_train::{Example, TrainArgs, Trainer};
use std::path::Path;

mod tiny_data;

fn examples() -> Vec<Example> {
    tiny_data::examples(8, 6, 3, 5, 0)
}

fn run(out: &Path, resume: bool) -> (FullModel, Vec<f64>) {
    let mut model = FullModel::new(tiny_llama(41, true).unwrap()).unwrap();
    let args = TrainArgs {
        max_steps: Some(8),
        batch_size: 2,
        lr: 2e-3,
        seed: 3,
        save_steps: Some(4),
        resume_from: resume.then(|| "latest".into()),
        output_dir: out.to_path_buf(),
        base_model_name: "tiny".into(),
        show_progress: false,
        ..Default::default()
    };
    let losses = Trainer {
        model: &mut model,
        args,
        pad_id: 0,
    }
    .train(&examples())
    .unwrap()
    .losses;
    (model, losses)
}

fn hidden(m: &Llama) -> Tensor {
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 26, 5]], &Device::Cpu).unwrap();
    m.forward(&ids, None, None, false).unwrap()
}

#[test]
fn full_fine_tuning_trains_saves_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut model, losses) = run(dir.path(), false);
    // Embeddings (tied head), norms and every linear weight of both layers.
    assert_eq!(model.trainable().len(), 1 + 1 + 2 * (2 + 7));
    let (trainable, all) = model.parameter_counts();
    assert_eq!(trainable, all);
    // The same 8 examples come back every epoch (4 steps): compare epoch to epoch.
    let (first, second): (f64, f64) = (losses[..4].iter().sum(), losses[4..].iter().sum());
    assert!(second < 0.9 * first, "loss did not fall: {losses:?}");

    // The output folder is a plain model: it reloads to the trained outputs.
    let loaded = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let reloaded =
        Llama::from_weights(loaded.config, loaded.weights, &Device::Cpu, DType::F32).unwrap();
    let d = max_abs_diff(&hidden(&reloaded), &hidden(&model.base));
    assert!(d < 1e-6, "reloaded model differs by {d}");

    // Killed after step 4 and resumed: the same losses as the run that never stopped.
    let dir2 = tempfile::tempdir().unwrap();
    run(dir2.path(), false);
    std::fs::remove_dir_all(dir2.path().join("checkpoint-8")).ok();
    let (_, resumed) = run(dir2.path(), true);
    assert_eq!(resumed, losses[4..].to_vec());
}
