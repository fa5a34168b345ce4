//! SmolLM2 on the shipped data: 30 LoRA steps lower the loss by at least 30%, and the saved
//! adapter, loaded onto a fresh base, gives the very same logits as the trained model.

use candle_core::{DType, Device, Tensor};
use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::{default_model, max_abs_diff, shipped_data};
use peft_models::{load_model, Llama};
use peft_train::{load_records, tokenize_records, TrainArgs, Trainer};

fn base(path: &std::path::Path) -> (Llama, peft_models::tokenizer::Tokenizer) {
    let m = load_model(path, &Device::Cpu, DType::F32).unwrap();
    let tok = m.tokenizer.unwrap();
    (
        Llama::from_weights(m.config, m.weights, &Device::Cpu, DType::F32).unwrap(),
        tok,
    )
}

fn logits(model: &Llama) -> Tensor {
    let ids = Tensor::new(
        &[[504u32, 3575, 282, 4649, 314, 7042, 30, 378]],
        &Device::Cpu,
    )
    .unwrap();
    model
        .logits(&model.forward(&ids, None, None, false).unwrap())
        .unwrap()
}

#[test]
fn thirty_steps_lower_the_loss_and_the_adapter_round_trips() {
    let Some(path) = default_model() else { return };
    let (llama, tok) = base(&path);
    let records = load_records(&shipped_data()).unwrap();
    let (examples, _) = tokenize_records(&records, &tok, 256).unwrap();
    let config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: Some(TargetModules::parse_flag("q_proj,k_proj,v_proj,o_proj")),
        ..Default::default()
    };
    let mut model = PeftModel::new(llama, config, 1).unwrap();
    let out = tempfile::tempdir().unwrap();
    let args = TrainArgs {
        max_steps: Some(30),
        lr: 1e-3,
        seed: 1,
        output_dir: out.path().to_path_buf(),
        base_model_name: "smollm2".into(),
        show_progress: false,
        ..Default::default()
    };
    let summary = Trainer {
        model: &mut model,
        args,
        pad_id: tok.pad_token_id().unwrap(),
    }
    .train(&examples)
    .unwrap();
    let first = summary.losses[0];
    let last5: f64 = summary.losses[25..].iter().sum::<f64>() / 5.0;
    eprintln!("loss {first:.4} -> {last5:.4} (mean of the last 5 steps)");
    assert!(
        last5 <= 0.7 * first,
        "loss {first} -> {last5}: less than a 30% drop"
    );
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 30);

    let trained = logits(&model.base);
    let (fresh, _) = base(&path);
    let loaded = PeftModel::load(fresh, out.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&loaded.base), &trained), 0.0);
}
