//! Shared by the tests that compare a training path with the CPU float32 one.

use candle_core::{DType, Device};
use peft::{LoraConfig, PeftModel, PromptModel, TargetModules, Tuned};
use peft_models::shapes::random_llama;
use peft_models::LlamaConfig;
use peft_train::{Batch, Example, SchedulerKind, TrainArgs, Trainer};
use serde_json::json;

/// What [`losses`] trains.
#[derive(Clone, Copy, Default)]
pub struct Setup {
    pub checkpointing: bool,
    /// Each row holds two sequences (30 tokens, then 50, or 40 and padding).
    pub packed: bool,
    /// Prefix tuning (10 virtual tokens) in place of LoRA.
    pub prefix_tuning: bool,
}

/// LoRA (all-linear, r 8) or prefix tuning on a tiny random Llama, and a batch of 4 × 80
/// tokens: heads of 64 (what the CUDA flash attention kernels serve) over sequences that end
/// mid-tile; with the learning rate the tests train it at.
pub fn model_and_batch(
    device: &Device,
    dtype: DType,
    setup: Setup,
) -> (Box<dyn Tuned>, Batch, f64) {
    let Setup {
        checkpointing,
        packed,
        prefix_tuning,
    } = setup;
    let config = LlamaConfig::from_json(json!({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true,
    }))
    .unwrap();
    let mut base = random_llama(config, device, dtype, 3).unwrap();
    base.gradient_checkpointing = checkpointing;
    let model: Box<dyn Tuned> = if prefix_tuning {
        Box::new(PromptModel::new_prefix_tuning(base, 10, 7, None).unwrap())
    } else {
        let lora = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: Some(TargetModules::parse_flag("all-linear")),
            ..Default::default()
        };
        Box::new(PeftModel::new(base, lora, 7).unwrap())
    };
    // Four sequences repeated every step: memorisable, so the loss falls steadily.
    let examples: Vec<Example> = (0..4u32)
        .map(|s| {
            let len = if packed && s == 3 { 70 } else { 80 };
            let ids: Vec<u32> = (0..len).map(|i| (i * 37 + s * 101) % 512).collect();
            let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            let lengths = if packed {
                // Nothing in the first sequence predicts the second one's first token.
                labels[30] = peft_ops::IGNORE_INDEX;
                vec![30, len as usize - 30]
            } else {
                Vec::new()
            };
            Example {
                labels,
                input_ids: ids,
                packed: lengths,
            }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = Batch::new(&refs, 0, device).unwrap();
    // Prefix tuning's few parameters need a larger step to move the loss in 10 steps.
    let lr = if prefix_tuning { 0.1 } else { 5e-3 };
    (model, batch, lr)
}

/// The first 10 losses of [`model_and_batch`]'s model trained on its batch.
pub fn losses(device: &Device, dtype: DType, setup: Setup) -> Vec<f64> {
    let (mut model, batch, lr) = model_and_batch(device, dtype, setup);
    let args = TrainArgs {
        lr,
        scheduler: SchedulerKind::Constant,
        show_progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer {
        model: model.as_mut(),
        args,
        pad_id: 0,
    };
    let mut opt = trainer.optimizer().unwrap();
    (0..10)
        .map(|step| {
            trainer
                .step(&mut opt, std::slice::from_ref(&batch), step, lr)
                .unwrap()
                .loss
        })
        .collect()
}

/// Every loss of `got` within `rel` (relative) of `want`, and `want` falling by more than twice
/// that tolerance (so that tracking it says something).
pub fn assert_tracks(what: &str, got: &[f64], want: &[f64], rel: f64) {
    eprintln!("{what}: {got:?}\n  cpu f32: {want:?}");
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((g - w) / w).abs() <= rel,
            "{what}: step {} loss {g} vs CPU f32 {w} (tolerance {rel})",
            i + 1
        );
    }
    assert!(
        want[9] < (1.0 - 2.0 * rel) * want[0],
        "the loss must fall by more than {}: {want:?}",
        2.0 * rel
    );
}
