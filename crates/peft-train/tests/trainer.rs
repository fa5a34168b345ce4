//! The loop's guards and extras on a tiny model: packed rows train like separate examples,
//! evaluation and early stopping (also across a resume), and a NaN loss stops the run naming
//! the last good checkpoint.

use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::tiny_llama;
use peft_train::{pack, Batch, Example, TrainArgs, TrainSummary, Trainer, Warmup};
use std::path::Path;

mod tiny_data;

fn examples(n: u32, salt: u32) -> Vec<Example> {
    tiny_data::examples(n, 4, 5, 7, salt)
}

fn lora() -> PeftModel {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(TargetModules::parse_flag("all-linear")),
        init_lora_weights: serde_json::json!("gaussian"),
        ..Default::default()
    };
    PeftModel::new(tiny_llama(31, true).unwrap(), config, 5).unwrap()
}

fn args(out: &Path) -> TrainArgs {
    TrainArgs {
        max_steps: Some(8),
        batch_size: 2,
        lr: 5e-3,
        seed: 3,
        output_dir: out.to_path_buf(),
        base_model_name: "tiny".into(),
        show_progress: false,
        ..Default::default()
    }
}

/// The loss of packed rows equals the loss of the same examples padded one per row.
#[test]
fn packed_rows_give_the_unpacked_loss() {
    let mut model = lora();
    let trainer = Trainer {
        model: &mut model,
        args: args(Path::new("unused")),
        pad_id: 0,
    };
    let exs = examples(9, 1);
    let rows = pack(&exs, 16);
    assert!(rows.len() < exs.len());
    let loss = |exs: &[Example]| {
        let refs: Vec<&Example> = exs.iter().collect();
        let batch = Batch::new(&refs, 0, &candle_core::Device::Cpu).unwrap();
        trainer
            .batch_loss(&batch, batch.n_trained, false)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (packed, plain) = (loss(&rows), loss(&exs));
    assert!((packed - plain).abs() < 1e-5, "{packed} vs {plain}");
}

/// Batches padded to a multiple of 16 positions (`--pad-to-multiple-of`) give the loss and the
/// gradients of the same batches padded to their longest: padding carries no loss and,
/// attention being causal, changes no real position.
#[test]
fn padding_to_a_multiple_changes_no_loss_or_gradient() {
    let mut model = lora();
    let trainer = Trainer {
        model: &mut model,
        args: args(Path::new("unused")),
        pad_id: 0,
    };
    let exs = examples(5, 2);
    let refs: Vec<&Example> = exs.iter().collect();
    let device = candle_core::Device::Cpu;
    let (plain, padded) = (
        Batch::new(&refs, 0, &device).unwrap(),
        Batch::padded(&refs, 0, 16, &device).unwrap(),
    );
    let (t, t16) = (
        plain.input_ids.dim(1).unwrap(),
        padded.input_ids.dim(1).unwrap(),
    );
    assert!(t % 16 != 0 && t16 == t.next_multiple_of(16), "{t} -> {t16}");
    assert_eq!(
        (plain.n_tokens, plain.n_trained),
        (padded.n_tokens, padded.n_trained)
    );
    let grads = |batch: &Batch| {
        let loss = trainer.batch_loss(batch, batch.n_trained, false).unwrap();
        let grads = trainer.model.base().backward(&loss).unwrap();
        let g: Vec<f32> = trainer
            .model
            .trainable()
            .iter()
            .flat_map(|(_, v)| {
                grads
                    .get(v)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), g)
    };
    let ((l1, g1), (l2, g2)) = (grads(&plain), grads(&padded));
    assert!((l1 - l2).abs() < 1e-5, "loss {l1} vs {l2}");
    let worst = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        !g1.is_empty() && worst < 1e-5,
        "gradients differ by {worst}"
    );
}

fn train(out: &Path, resume: Option<&Path>, save_steps: Option<usize>) -> TrainSummary {
    let mut model = lora();
    let mut a = args(out);
    a.eval_steps = Some(1);
    a.early_stopping_patience = Some(2);
    // No eval loss can improve by this much: the run stops after the third evaluation.
    a.early_stopping_threshold = 1e9;
    a.save_steps = save_steps;
    a.resume_from = resume.map(Into::into);
    Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    }
    .train_with_eval(&examples(12, 0), &examples(4, 40))
    .unwrap()
}

/// Evaluations land in metrics.jsonl with their perplexity, dropout is off while evaluating
/// (the same adapter gives the same eval loss), and early stopping ends the run, also when
/// it is resumed from a checkpoint in between.
#[test]
fn eval_and_early_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let full = train(dir.path(), None, None);
    assert!(full.stopped_early);
    assert_eq!(full.steps, 3);
    assert_eq!(
        full.evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let lines = tiny_data::metrics(dir.path());
    assert_eq!(lines.len(), 3);
    for (line, (_, eval)) in lines.iter().zip(&full.evals) {
        assert_eq!(line["eval_loss"].as_f64().unwrap(), *eval);
        let ppl = line["eval_perplexity"].as_f64().unwrap();
        assert!((ppl - eval.exp()).abs() < 1e-9 * ppl);
    }

    let reloaded_eval = {
        let mut model = PeftModel::load(tiny_llama(31, true).unwrap(), dir.path()).unwrap();
        let trainer = Trainer {
            model: &mut model,
            args: args(dir.path()),
            pad_id: 0,
        };
        (
            trainer.eval_loss(&examples(4, 40)).unwrap(),
            trainer.eval_loss(&examples(4, 40)).unwrap(),
        )
    };
    assert_eq!(reloaded_eval.0, reloaded_eval.1);
    assert!((reloaded_eval.0 - full.evals[2].1).abs() < 1e-6);

    let dir = tempfile::tempdir().unwrap();
    let first = train(dir.path(), None, Some(1));
    assert_eq!(first.losses, full.losses);
    // The step that stopped the run saved its checkpoint, as transformers does.
    assert!(dir.path().join("checkpoint-3").exists());
    // Continue from checkpoint-2, which counts one evaluation without improvement: the
    // resumed run stops after one more, as the uninterrupted run did.
    let resumed = train(dir.path(), Some(&dir.path().join("checkpoint-2")), Some(1));
    assert!(resumed.stopped_early);
    assert_eq!(resumed.steps, 3);
    assert_eq!(resumed.losses, full.losses[2..].to_vec());
}

/// As transformers' Trainer: a metrics line carries the mean loss of the steps since the
/// previous line, and the last step writes a checkpoint even off the save schedule.
#[test]
fn logging_window_and_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = lora();
    let mut a = args(dir.path());
    a.logging_steps = 3;
    a.save_steps = Some(3);
    let summary = Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    }
    .train(&examples(12, 0))
    .unwrap();
    assert_eq!(summary.losses.len(), 8);
    let lines = tiny_data::metrics(dir.path());
    assert_eq!(tiny_data::logged_steps(dir.path()), [3, 6, 8]);
    for (line, window) in lines.iter().zip([0..3, 3..6, 6..8]) {
        let n = window.len() as f64;
        let mean = summary.losses[window].iter().sum::<f64>() / n;
        assert!((line["loss"].as_f64().unwrap() - mean).abs() < 1e-12);
    }
    let saved: Vec<usize> = peft_train::checkpoint::list(dir.path())
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(saved, [3, 6, 8]);
}

/// A loss that overflows stops the run at that step, naming the last good checkpoint.
#[test]
fn nan_loss_names_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = lora();
    let mut a = args(dir.path());
    a.lr = 1e30;
    a.warmup = Warmup::Steps(0);
    a.save_steps = Some(1);
    let err = Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    }
    .train(&examples(12, 0))
    .unwrap_err()
    .to_string();
    let checkpoint = dir.path().join("checkpoint-1");
    assert!(
        err.starts_with("training loss is NaN at step 2")
            || err.starts_with("training loss is inf at step 2"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "the last good checkpoint is {}",
            checkpoint.display()
        )),
        "{err}"
    );
    assert!(checkpoint.join("trainer_state.json").exists());
}

/// LoRA+ (HF PEFT's `create_loraplus_optimizer`): B's learning rate is `ratio` times A's.
/// Adam's first update is linear in the learning rate, so one step with ratio 16 moves every
/// B weight 16 times as far as without it, and A as far.
#[test]
fn loraplus_scales_the_learning_rate_of_b() {
    let step_deltas = |ratio: Option<f64>| -> Vec<(String, Vec<f32>)> {
        let mut model = lora();
        let before: Vec<(String, Vec<f32>)> = flat(&model);
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.max_steps = Some(1);
        a.warmup = Warmup::Steps(0);
        a.lr = 1e-4;
        a.loraplus_lr_ratio = ratio;
        Trainer {
            model: &mut model,
            args: a,
            pad_id: 0,
        }
        .train(&examples(4, 2))
        .unwrap();
        flat(&model)
            .into_iter()
            .zip(before)
            .map(|((k, after), (_, before))| {
                (k, after.iter().zip(&before).map(|(x, y)| x - y).collect())
            })
            .collect()
    };
    let plain = step_deltas(None);
    let plus = step_deltas(Some(16.0));
    let mut b_checked = 0;
    for ((key, d1), (_, d16)) in plain.iter().zip(&plus) {
        let ratio = if key.contains("lora_B") { 16.0 } else { 1.0 };
        b_checked += key.contains("lora_B") as usize;
        for (x, y) in d1.iter().zip(d16) {
            assert!(
                (y - ratio * x).abs() <= 1e-3 * ratio * x.abs() + 1e-9,
                "{key}: moved {y}, expected {ratio} × {x}"
            );
        }
    }
    assert!(b_checked > 0);
}

/// Weight decay spares biases and norms, as transformers' Trainer does.
#[test]
fn weight_decay_spares_biases_and_norms() {
    use peft_train::ParamGroup;
    for name in [
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_norm.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.bias",
    ] {
        assert!(!ParamGroup::decays(name), "{name}");
    }
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        assert!(ParamGroup::decays(name), "{name}");
    }
}

fn flat(model: &PeftModel) -> Vec<(String, Vec<f32>)> {
    model
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = peft_models::io::load_safetensors(
        &dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
    .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// `load_best_model_at_end`, as transformers' Trainer: the output holds the weights of the
/// checkpoint with the lowest eval loss (here not the last one: the learning rate is too
/// high to keep improving), which outlives `save_total_limit`'s pruning beside the newest.
#[test]
fn load_best_model_at_end_saves_the_best_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = lora();
    let mut a = args(dir.path());
    a.max_steps = Some(12);
    a.lr = 1.0;
    a.warmup = Warmup::Steps(0);
    a.eval_steps = Some(2);
    a.save_steps = Some(2);
    a.save_total_limit = Some(2);
    a.load_best_model_at_end = true;
    let eval = examples(4, 40);
    let summary = Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    }
    .train_with_eval(&examples(12, 0), &eval)
    .unwrap();
    let (best, loss) =
        summary.evals.iter().fold(
            (0, f64::INFINITY),
            |b, &(s, l)| if l < b.1 { (s, l) } else { b },
        );
    assert_eq!(summary.evals.len(), 6);
    assert!(
        best < 10,
        "a late checkpoint is the best: {:?}",
        summary.evals
    );
    assert_eq!(summary.best_checkpoint, Some((best, loss)));
    let kept: Vec<usize> = peft_train::checkpoint::list(dir.path())
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [best, 12]);
    let best_dir = dir.path().join(format!("checkpoint-{best}"));
    assert_eq!(adapter_tensors(dir.path()), adapter_tensors(&best_dir));
    // And the saved adapter evaluates to the best loss.
    let mut reloaded = PeftModel::load(tiny_llama(31, true).unwrap(), dir.path()).unwrap();
    let again = Trainer {
        model: &mut reloaded,
        args: args(dir.path()),
        pad_id: 0,
    }
    .eval_loss(&eval)
    .unwrap();
    assert!((again - loss).abs() < 1e-6, "{again} vs {loss}");
}

/// The eval loss is the mean of each eval batch's token loss, weighted by its examples (as
/// transformers computes it), so it depends on the eval batch size
/// (`per_device_eval_batch_size`): one example a batch gives the mean of the examples' losses.
#[test]
fn eval_batch_size_sets_the_batches_of_the_eval_loss() {
    let mut model = lora();
    let mut a = args(Path::new("unused"));
    let eval = examples(6, 40);
    let mut trainer = Trainer {
        model: &mut model,
        args: a.clone(),
        pad_id: 0,
    };
    let per_example: Vec<f64> = eval
        .iter()
        .map(|e| trainer.eval_loss(std::slice::from_ref(e)).unwrap())
        .collect();
    let mean = per_example.iter().sum::<f64>() / per_example.len() as f64;
    let batched = trainer.eval_loss(&eval).unwrap();
    a.eval_batch_size = Some(1);
    trainer.args = a;
    let one_by_one = trainer.eval_loss(&eval).unwrap();
    assert!((one_by_one - mean).abs() < 1e-9, "{one_by_one} vs {mean}");
    // Batches of two weight their examples' tokens together: another mean.
    assert!((batched - mean).abs() > 1e-6, "{batched} vs {mean}");
}

/// `logging_first_step` adds a metrics line at step 1 to the interval's.
#[test]
fn logging_first_step_logs_step_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = lora();
    let mut a = args(dir.path());
    a.logging_steps = 3;
    a.logging_first_step = true;
    Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    }
    .train(&examples(12, 0))
    .unwrap();
    assert_eq!(tiny_data::logged_steps(dir.path()), [1, 3, 6, 8]);
}

/// `save_only_model`: checkpoints hold the adapter and the position, no optimizer state, and
/// resuming from one is refused with an error that says why; the best checkpoint still loads.
#[test]
fn checkpoints_of_the_model_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = lora();
    let mut a = args(dir.path());
    a.save_steps = Some(4);
    a.eval_steps = Some(4);
    a.save_only_model = true;
    a.load_best_model_at_end = true;
    let summary = Trainer {
        model: &mut model,
        args: a.clone(),
        pad_id: 0,
    }
    .train_with_eval(&examples(12, 0), &examples(4, 40))
    .unwrap();
    let checkpoint = dir.path().join("checkpoint-4");
    assert!(checkpoint.join("adapter_model.safetensors").exists());
    assert!(!checkpoint.join("optimizer.safetensors").exists());
    assert!(summary.best_checkpoint.is_some());
    a.resume_from = Some(checkpoint);
    let err = Trainer {
        model: &mut lora(),
        args: a,
        pad_id: 0,
    }
    .train_with_eval(&examples(12, 0), &examples(4, 40))
    .unwrap_err();
    assert!(err.to_string().contains("cannot be resumed"), "{err}");
}

/// TRL's `entropy` and `mean_token_accuracy` of a batch, from its full logits in f64.
fn token_metrics(trainer: &Trainer, batch: &Batch) -> (f64, f64) {
    let base = trainer.model.base();
    let (hidden, _) = trainer.model.hidden(&batch.input_ids, None, false).unwrap();
    let d = hidden.dim(2).unwrap();
    let hidden = base.head_input(&hidden.reshape(((), d)).unwrap()).unwrap();
    let logits: Vec<Vec<f64>> = hidden
        .matmul(&base.lm_head_weight().unwrap().t().unwrap())
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let labels: Vec<i64> = batch.labels.flatten_all().unwrap().to_vec1().unwrap();
    let (mut entropy, mut hits, mut n) = (0.0, 0.0, 0.0);
    for (row, &label) in logits.iter().zip(&labels) {
        if label < 0 {
            continue;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|l| (l - max).exp()).sum();
        entropy -= row
            .iter()
            .map(|l| (l - max).exp() / z * (l - max - z.ln()))
            .sum::<f64>();
        hits += (row.iter().position(|&l| l == max) == Some(label as usize)) as u8 as f64;
        n += 1.0;
    }
    (entropy / n, hits / n)
}

/// TRL's token metrics: an evaluation's are the mean over its batches of each batch's
/// (from the full logits here), and training on two repeated examples drives the logged
/// accuracy up and the entropy down.
#[test]
fn entropy_and_token_accuracy_as_trl_logs_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::parse_flag("all-linear")),
        init_lora_weights: serde_json::json!("gaussian"),
        ..Default::default()
    };
    let mut model = PeftModel::new(tiny_llama(31, true).unwrap(), config, 5).unwrap();
    let data = examples(2, 9);
    let mut a = args(dir.path());
    a.max_steps = Some(60);
    a.lr = 3e-2;
    a.logging_steps = 10;
    a.logging_first_step = true;
    a.eval_batch_size = Some(1);
    let mut trainer = Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    };
    let device = candle_core::Device::Cpu;
    let per_batch: Vec<(f64, f64)> = data
        .iter()
        .map(|e| token_metrics(&trainer, &Batch::new(&[e], 0, &device).unwrap()))
        .collect();
    let eval = trainer.evaluate(&data).unwrap().tokens;
    let entropy = (per_batch[0].0 + per_batch[1].0) / 2.0;
    let accuracy = (per_batch[0].1 + per_batch[1].1) / 2.0;
    assert!(
        (eval.entropy - entropy).abs() < 1e-5,
        "{eval:?} vs {entropy}"
    );
    assert!(
        (eval.mean_token_accuracy - accuracy).abs() < 1e-12,
        "{eval:?}"
    );
    trainer.train(&data).unwrap();
    let lines = tiny_data::metrics(dir.path());
    let (first, last) = (&lines[0], lines.last().unwrap());
    let value = |line: &serde_json::Value, key: &str| line[key].as_f64().unwrap();
    for line in &lines {
        assert!((0.0..=1.0).contains(&value(line, "mean_token_accuracy")));
        assert!(value(line, "entropy") > 0.0);
    }
    assert!(value(first, "mean_token_accuracy") < 0.5, "{first}");
    assert!(value(last, "mean_token_accuracy") > 0.9, "{last}");
    assert!(
        value(last, "entropy") < 0.5 * value(first, "entropy"),
        "{first} {last}"
    );
    let trained = trainer.evaluate(&data).unwrap().tokens;
    assert!(trained.mean_token_accuracy > 0.9, "{trained:?}");
}

/// OLMoE's tiny model of crates/peft (its experts' fused block) with LoRA on the attention.
fn moe_lora() -> PeftModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures/arch/olmoe/model");
    let dtype = candle_core::DType::F32;
    let base = peft_models::load_model(&dir, &candle_core::Device::Cpu, dtype)
        .unwrap()
        .into_model(&candle_core::Device::Cpu, dtype)
        .unwrap()
        .0;
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::parse_flag("q_proj,v_proj")),
        init_lora_weights: serde_json::json!("gaussian"),
        ..Default::default()
    };
    PeftModel::new(base, config, 5).unwrap()
}

/// A mixture-of-experts model's step adds the routers' load-balancing loss as TRL's
/// SFTTrainer does: each micro-batch's, over its real tokens (a padded batch's equals the same
/// examples' packed in one row), weighted by the coefficient over the micro-batches; 0 turns
/// it off, and a dense model refuses a coefficient.
#[test]
fn router_load_balancing_loss_as_trl_adds_it() {
    let mut model = moe_lora();
    let coef = 0.3;
    let mut a = args(Path::new("unused"));
    a.router_aux_loss_coef = Some(coef);
    let mut trainer = Trainer {
        model: &mut model,
        args: a,
        pad_id: 0,
    };
    let device = candle_core::Device::Cpu;
    let exs = examples(4, 3);
    let batches: Vec<Batch> = exs
        .chunks(2)
        .map(|c| Batch::new(&c.iter().collect::<Vec<_>>(), 0, &device).unwrap())
        .collect();
    assert!(
        batches.iter().all(|b| b.lengths[0] != b.lengths[1]),
        "padding in each batch"
    );
    let aux_of = |trainer: &Trainer, batch: &Batch| {
        let out = trainer.batch_loss_stats(batch, 1, 1, false).unwrap();
        out.aux.unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let packed = pack(&exs[..2], 64);
    assert_eq!(packed.len(), 1);
    let packed = Batch::new(&[&packed[0]], 0, &device).unwrap();
    let (padded, in_one_row) = (aux_of(&trainer, &batches[0]), aux_of(&trainer, &packed));
    assert!(
        (padded - in_one_row).abs() < 1e-6,
        "{padded} vs {in_one_row}"
    );

    let denom: usize = batches.iter().map(|b| b.n_trained).sum();
    let token_losses: Vec<f64> = {
        let mut off = args(Path::new("unused"));
        off.router_aux_loss_coef = Some(0.0);
        let plain = Trainer {
            model: &mut *trainer.model,
            args: off,
            pad_id: 0,
        };
        let out = plain.batch_loss_stats(&batches[0], 1, 1, false).unwrap();
        assert!(out.aux.is_none(), "a coefficient of 0 adds no aux loss");
        batches
            .iter()
            .map(|b| {
                plain
                    .batch_loss(b, denom, false)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .collect()
    };
    let mut opt = trainer.optimizer().unwrap();
    let out = trainer.step(&mut opt, &batches, 0, 1e-12).unwrap();
    let aux: Vec<f64> = out
        .token_metrics
        .iter()
        .map(|m| m.aux_loss.unwrap())
        .collect();
    let want = token_losses.iter().sum::<f64>() + coef * aux.iter().sum::<f64>() / 2.0;
    assert!((out.loss - want).abs() < 1e-5, "{} vs {want}", out.loss);
    assert!(aux.iter().all(|&a| a > 1.0), "{aux:?}");

    let mut dense = lora();
    let mut a = args(tempfile::tempdir().unwrap().path());
    a.router_aux_loss_coef = Some(coef);
    let mut trainer = Trainer {
        model: &mut dense,
        args: a,
        pad_id: 0,
    };
    let err = trainer.train(&examples(4, 1)).unwrap_err().to_string();
    assert!(
        err.contains(
            "router_aux_loss_coef is set to 0.3 but llama is not a mixture-of-experts model"
        ),
        "{err}"
    );
}
