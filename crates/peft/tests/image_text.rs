//! Gemma 3's image-text model (the class of gemma-3-4b and up): its language model is read
//! from the checkpoint and trained under transformers' module names, the vision tower stays
//! on disk and is copied as it is into a saved model, and HF PEFT adapters that adapt the
//! tower too load. The fixture (scripts/hf/make_arch_fixtures.py, `gemma3`) holds a small
//! Gemma3ForConditionalGeneration and an HF PEFT all-linear LoRA, whose LoRA pairs on the
//! tower have B = 0, as text-only training leaves them; its logits are checked against
//! transformers in tests/architectures.rs.

use candle_core::{DType, Device, Tensor};
use peft::{Adapter, LoraConfig, PeftModel, TargetModules, TokensConfig, TokensModel, Tuned};
use peft_models::io::{load_safetensors, save_safetensors};
use peft_models::testing::max_abs_diff;
use peft_models::{load_model, Llama};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch/gemma3")
}

fn base() -> Llama {
    let m = load_model(&fixture().join("model"), &Device::Cpu, DType::F32).unwrap();
    m.into_model(&Device::Cpu, DType::F32).unwrap().0
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    load_safetensors(&fixture().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn logits(model: &Llama, ids: &Tensor) -> Tensor {
    let h = model.forward(ids, None, None, false).unwrap();
    model.logits(&h).unwrap()
}

fn input_ids() -> Tensor {
    expected()["input_ids"].to_dtype(DType::U32).unwrap()
}

#[test]
fn the_language_model_is_read_and_the_tower_left_on_disk() {
    let model = base();
    assert_eq!(model.config.decoder_path(), "model.language_model");
    assert_eq!(model.config.model_type, "gemma3_text");
    assert!(model.config.image_text.is_some());
    assert_eq!(
        model.other_parts(),
        ["multi_modal_projector", "vision_tower"]
    );
    let checkpoint =
        load_safetensors(&fixture().join("model/model.safetensors"), &Device::Cpu).unwrap();
    let outside: Vec<&String> = checkpoint
        .keys()
        .filter(|k| !k.starts_with("language_model."))
        .collect();
    assert_eq!(model.other_tensors.len(), outside.len());
    assert!(model
        .other_tensors
        .iter()
        .all(|t| outside.contains(&&t.name)));
    let paths: Vec<String> = model
        .clone()
        .linears_mut()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(paths[0], "model.language_model.layers.0.self_attn.q_proj");
}

#[test]
fn a_merged_model_is_saved_whole() {
    let checkpoint =
        load_safetensors(&fixture().join("model/model.safetensors"), &Device::Cpu).unwrap();
    let merged = PeftModel::load(base(), &fixture().join("lora"))
        .unwrap()
        .merge_and_unload()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut to_save = merged;
    peft_models::save::save_hf_model(&mut to_save, None, dir.path(), DType::F32).unwrap();
    let saved = load_safetensors(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    // transformers' layout, tensor for tensor; the tower's tensors as they were.
    let mut names: Vec<&String> = saved.keys().collect();
    let mut want: Vec<&String> = checkpoint.keys().collect();
    names.sort();
    want.sort();
    assert_eq!(names, want);
    for (name, t) in &checkpoint {
        let d = max_abs_diff(&saved[name], t);
        let merged_into = name.contains("_proj.weight") && name.starts_with("language_model.");
        assert_eq!(d > 0.0, merged_into, "{name} differs by {d}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gemma3");
    assert_eq!(config["text_config"]["model_type"], "gemma3_text");
    assert!(config["vision_config"].is_object());
    // Read back, it gives the adapter's logits.
    let m = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let reloaded = m.into_model(&Device::Cpu, DType::F32).unwrap().0;
    let d = max_abs_diff(&logits(&reloaded, &input_ids()), &expected()["lora_logits"]);
    assert!(d < 1e-4, "merged and reloaded logits differ by {d}");
}

/// The fixture's adapter with one of its vision-tower B matrices made non-zero.
fn adapter_changing_the_tower(dir: &Path) {
    std::fs::copy(
        fixture().join("lora/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let file = fixture().join("lora/adapter_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = load_safetensors(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let (_, b) = tensors
        .iter_mut()
        .find(|(k, _)| k.contains("vision_tower") && k.ends_with("lora_B.weight"))
        .expect("the fixture adapts the vision tower");
    *b = b.ones_like().unwrap();
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None).unwrap();
}

#[test]
fn an_adapter_that_changes_the_tower_runs_on_text_but_does_not_merge() {
    let dir = tempfile::tempdir().unwrap();
    adapter_changing_the_tower(dir.path());
    let peft = PeftModel::load(base(), dir.path()).unwrap();
    assert_eq!(peft.changes_elsewhere.len(), 1);
    // Text never reaches the tower.
    let d = max_abs_diff(
        &logits(&peft.base, &input_ids()),
        &expected()["lora_logits"],
    );
    assert!(d < 1e-4, "LoRA logits differ by {d}");
    let err = peft.merge_and_unload().err().expect("the merge is refused");
    assert!(
        err.to_string().contains("outside the language model"),
        "{err}"
    );
    // The fixture's own adapter (B = 0 on the tower) merges.
    let fixture_adapter = PeftModel::load(base(), &fixture().join("lora")).unwrap();
    assert!(fixture_adapter.changes_elsewhere.is_empty());
}

/// Adapters HF PEFT saved before transformers 4.52 (Gemma 3's first two months) name the
/// language model `language_model.model`: they load as the current ones do.
#[test]
fn adapters_of_the_old_layout_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("lora/adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let file = fixture().join("lora/adapter_model.safetensors");
    let old: Vec<(String, Tensor)> = load_safetensors(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            (
                k.replace("model.model.language_model.", "model.language_model.model."),
                t,
            )
        })
        .collect();
    assert!(old
        .iter()
        .any(|(k, _)| k.contains(".language_model.model.layers.")));
    save_safetensors(&dir.path().join("adapter_model.safetensors"), &old, None).unwrap();
    let peft = PeftModel::load(base(), dir.path()).unwrap();
    let d = max_abs_diff(
        &logits(&peft.base, &input_ids()),
        &expected()["lora_logits"],
    );
    assert!(d < 1e-4, "LoRA logits differ by {d}");
}

#[test]
fn adapters_trained_here_name_modules_as_hf_peft_does() {
    let config = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(TargetModules::parse_flag("q_proj,v_proj")),
        exclude_modules: Some(TargetModules::parse_flag("layers.1.self_attn.v_proj")),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    PeftModel::new(base(), config, 1)
        .unwrap()
        .save(dir.path(), "gemma3")
        .unwrap();
    let saved =
        load_safetensors(&dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        saved.len(),
        6,
        "q in both layers, v in the first: {saved:?}"
    );
    assert!(saved
        .keys()
        .all(|k| k.starts_with("base_model.model.model.language_model.layers.")));
    // HF PEFT sees the whole model: the tower is excluded for it, the user's exclusion kept.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        written["exclude_modules"],
        r"model\.(?:multi_modal_projector|vision_tower)\..*|(?:.*\.)?(?:layers\.1\.self_attn\.v_proj)"
    );
    // And it reads back here to the same selection, saved again unchanged.
    let loaded = PeftModel::load(base(), dir.path()).unwrap();
    assert_eq!(loaded.adapters.len(), 3);
    let again = tempfile::tempdir().unwrap();
    loaded.save(again.path(), "gemma3").unwrap();
    let rewritten: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(rewritten["exclude_modules"], written["exclude_modules"]);

    // Trainable tokens: the embedding by its path in this model.
    let tokens = TokensModel::new(base(), TokensConfig::new(&[3, 5]), 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tokens.save(dir.path(), "gemma3").unwrap();
    let saved =
        load_safetensors(&dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(saved
        .contains_key("base_model.model.model.language_model.embed_tokens.trainable_tokens_delta"));
    assert!(matches!(
        Adapter::load(base(), dir.path()).unwrap(),
        Adapter::Tokens(_)
    ));
}
