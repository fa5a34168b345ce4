//! Several adapters of different methods on one tiny base: each, made active, gives the
//! outputs of the same folder loaded alone; the base is untouched by loading and switching;
//! names are checked.

use candle_core::{Device, Tensor};
use peft::{
    Adapter, Adapters, BottleneckConfig, BottleneckModel, Ia3Config, Ia3Model, LoraConfig,
    PeftModel, PromptInit, PromptModel, Tuned,
};
use peft_models::testing::{max_abs_diff, tiny_llama, SeededNormal};
use peft_models::Llama;
use std::path::{Path, PathBuf};

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

fn base() -> Llama {
    tiny_llama(11, true).unwrap()
}

fn base_logits(m: &Llama) -> Tensor {
    m.logits(&m.forward(&ids(), None, None, false).unwrap())
        .unwrap()
}

/// Moves every trainable tensor off its initial value (seeded, so that a run repeats), so that
/// each adapter changes the output.
fn perturb(model: &dyn Tuned, seed: u64) {
    for (i, (_, v)) in model.trainable().into_iter().enumerate() {
        let noise = SeededNormal::new(seed * 1000 + i as u64)
            .tensor(v.dims(), 0.3, &Device::Cpu)
            .unwrap();
        let scale = 1.0 + 0.1 * ((seed as usize + i) % 7) as f64;
        v.set(&(v.as_tensor() + (noise * scale).unwrap()).unwrap())
            .unwrap();
    }
}

/// Saves one adapter of each kind (LoRA twice) under `root` and returns (name, folder).
fn save_adapters(root: &Path) -> Vec<(&'static str, PathBuf)> {
    let dir = |name: &str| root.join(name);
    let lora = |seed: u64, targets: &str| {
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(peft::TargetModules::parse_flag(targets)),
            ..Default::default()
        };
        let m = PeftModel::new(base(), config, seed).unwrap();
        perturb(&m, seed);
        m
    };
    lora(1, "q_proj,v_proj").save(&dir("a"), "tiny").unwrap();
    lora(2, "all-linear").save(&dir("b"), "tiny").unwrap();
    let ia3 = Ia3Model::new(base(), Ia3Config::default()).unwrap();
    perturb(&ia3, 3);
    ia3.save(&dir("ia3"), "tiny").unwrap();
    let bottleneck = BottleneckModel::new(base(), BottleneckConfig::houlsby(4), 4).unwrap();
    perturb(&bottleneck, 4);
    bottleneck.save(&dir("bottleneck"), "tiny").unwrap();
    let prompt = PromptModel::new_prompt_tuning(base(), 3, PromptInit::Random, 5).unwrap();
    prompt.save(&dir("prompt"), "tiny").unwrap();
    ["a", "b", "ia3", "bottleneck", "prompt"]
        .into_iter()
        .map(|n| (n, dir(n)))
        .collect()
}

#[test]
fn switching_adapters_gives_each_ones_own_outputs() {
    let root = tempfile::tempdir().unwrap();
    let folders = save_adapters(root.path());
    // What each folder gives loaded alone onto a fresh base.
    let alone: Vec<Tensor> = folders
        .iter()
        .map(|(_, d)| Adapter::load(base(), d).unwrap().logits(&ids()).unwrap())
        .collect();
    let plain = base_logits(&base());

    let mut set = Adapters::new(base());
    for (name, dir) in &folders {
        set.load_adapter(name, dir).unwrap();
    }
    assert_eq!(
        set.names().collect::<Vec<_>>(),
        ["a", "b", "ia3", "bottleneck", "prompt"]
    );
    // Loading activates nothing, as HF PEFT's load_adapter.
    assert!(set.active().is_none());
    assert_eq!(max_abs_diff(&set.logits(&ids()).unwrap(), &plain), 0.0);

    // Every order of switching, twice over, gives each adapter's own logits.
    for round in 0..2 {
        for (i, (name, _)) in folders.iter().enumerate().rev() {
            set.set_adapter(name).unwrap();
            assert_eq!(set.active().unwrap().0, *name);
            let got = set.logits(&ids()).unwrap();
            assert_eq!(got.dims(), alone[i].dims(), "{name}");
            assert_eq!(max_abs_diff(&got, &alone[i]), 0.0, "{name}, round {round}");
            // Each adapter moves the output: the check above would see a mix-up.
            let rows = got.dim(1).unwrap();
            let tail = got.narrow(1, rows - 8, 8).unwrap();
            assert!(max_abs_diff(&tail, &plain) > 1e-3, "{name} changes nothing");
        }
        set.disable_adapter();
        assert_eq!(max_abs_diff(&set.logits(&ids()).unwrap(), &plain), 0.0);
    }
    assert_eq!(max_abs_diff(&base_logits(set.base()), &plain), 0.0);

    // Deleting the active adapter leaves the base running; the others keep their outputs.
    set.set_adapter("b").unwrap();
    set.delete_adapter("b").unwrap();
    assert!(set.active().is_none());
    assert_eq!(max_abs_diff(&set.logits(&ids()).unwrap(), &plain), 0.0);
    set.set_adapter("prompt").unwrap();
    set.delete_adapter("a").unwrap();
    assert_eq!(set.active().unwrap().0, "prompt");
    assert_eq!(max_abs_diff(&set.logits(&ids()).unwrap(), &alone[4]), 0.0);
    assert_eq!(set.get("ia3").unwrap().peft_type(), "IA3");
}

#[test]
fn adapter_names_are_checked() {
    let root = tempfile::tempdir().unwrap();
    let folders = save_adapters(root.path());
    let mut set = Adapters::new(base());
    set.load_adapter("a", &folders[0].1).unwrap();
    let err = |r: anyhow::Result<()>| r.unwrap_err().to_string();
    assert_eq!(
        err(set.load_adapter("a", &folders[1].1)),
        "an adapter named \"a\" is already loaded"
    );
    assert_eq!(
        err(set.set_adapter("c")),
        "no adapter named \"c\" is loaded (loaded: a)"
    );
    assert_eq!(
        err(set.delete_adapter("c")),
        "no adapter named \"c\" is loaded (loaded: a)"
    );
    assert!(err(set.load_adapter("missing", &root.path().join("nope")))
        .contains("adapter folder not found"));
    // A failed load leaves the set as it was.
    assert_eq!(set.names().collect::<Vec<_>>(), ["a"]);
    let merged = Adapter::load(base(), &folders[4].1)
        .unwrap()
        .merge_and_unload();
    assert_eq!(
        merged.err().unwrap().to_string(),
        "PROMPT_TUNING adapters add computation and cannot be merged into the weights"
    );
}

/// Adapters of a grown vocabulary: HF PEFT saves the resized embedding (and head) beside
/// LoRA's and IA3's tensors under `base_model.model.`, beside prompt learning's under
/// `base_model.` alone; each loads at the new size, giving the base's logits for the old
/// tokens (the embedding's old rows are the base's).
#[test]
fn adapters_of_a_grown_vocabulary_load_for_every_method() {
    let root = tempfile::tempdir().unwrap();
    let grown = |t: &Tensor| {
        let extra = Tensor::ones((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        Tensor::cat(&[t, &extra], 0).unwrap()
    };
    let embed = grown(&base().embed_tokens);
    for (name, dir) in save_adapters(root.path()) {
        let file = dir.join("adapter_model.safetensors");
        let alone = Adapter::load(base(), &dir).unwrap().logits(&ids()).unwrap();
        let mut tensors: Vec<(String, Tensor)> =
            peft_models::io::load_safetensors(&file, &Device::Cpu)
                .unwrap()
                .into_iter()
                .collect();
        let prefix = match name {
            "prompt" => "base_model.",
            _ => "base_model.model.",
        };
        tensors.push((format!("{prefix}model.embed_tokens.weight"), embed.clone()));
        tensors.push((format!("{prefix}lm_head.weight"), embed.clone()));
        if name == "bottleneck" {
            continue; // peft-rs' own format: HF PEFT writes none
        }
        peft_models::io::save_safetensors(&file, &tensors, None).unwrap();
        let loaded = Adapter::load(base(), &dir).unwrap();
        assert_eq!(loaded.model().config.vocab_size, 72, "{name}");
        let logits = loaded.logits(&ids()).unwrap();
        let old = logits.narrow(2, 0, 64).unwrap();
        assert!(max_abs_diff(&old, &alone) < 1e-5, "{name}");
    }
}
