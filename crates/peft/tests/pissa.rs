//! PiSSA and OLoRA on a tiny random Llama: the decomposed model starts as the base did, and the
//! saved (converted) adapter applies to the original base as the trained residual model does.

use candle_core::{Device, Tensor};
use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::{max_abs_diff, tiny_llama, SeededNormal};
use serde_json::{json, Value};

fn logits(model: &peft_models::Llama) -> Tensor {
    let ids = Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap();
    model
        .logits(&model.forward(&ids, None, None, false).unwrap())
        .unwrap()
}

fn config(init: &str, use_rslora: bool) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora,
        target_modules: Some(TargetModules::parse_flag("all-linear")),
        init_lora_weights: Value::String(init.into()),
        ..Default::default()
    }
}

#[test]
fn decomposed_adapters_save_for_the_original_base() {
    let base_logits = logits(&tiny_llama(5, true).unwrap());
    for (init, rslora, use_dora) in [
        ("pissa", false, false),
        ("pissa_niter_2", true, false),
        ("olora", false, false),
        // DoRA's magnitude starts as ‖W‖ = ‖W_res + s·B₀·A₀‖, and the conversion keeps the
        // weight it scales (W + s·B'·A' = W_res + s·B·A).
        ("pissa", false, true),
        ("olora", true, true),
    ] {
        let config = LoraConfig {
            use_dora,
            ..config(init, rslora)
        };
        let model = PeftModel::new(tiny_llama(5, true).unwrap(), config, 1).unwrap();
        // The principal part moved into A and B: the model is unchanged.
        let start = logits(&model.base);
        assert!(max_abs_diff(&start, &base_logits) < 1e-4, "{init}");
        let layer = &model.adapters["model.layers.0.self_attn.q_proj"];
        assert!(
            layer
                .b
                .as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.1
        );
        // "Training": every A and B moves.
        for (i, (_, v)) in model.trainable().into_iter().enumerate() {
            let noise = SeededNormal::new(i as u64)
                .tensor(v.dims(), 0.05, &Device::Cpu)
                .unwrap();
            v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
        }
        let trained = logits(&model.base);
        assert!(
            max_abs_diff(&trained, &base_logits) > 1e-2,
            "{init}: training must matter"
        );

        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path(), "tiny").unwrap();
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved["r"], json!(8), "{init}");
        assert_eq!(saved["init_lora_weights"], json!(true));
        let alpha = saved["lora_alpha"].as_f64().unwrap();
        let want = if rslora { 8.0 * 2f64.sqrt() } else { 16.0 };
        assert!((alpha - want).abs() < 1e-12, "{init}: alpha {alpha}");
        // On the original base, the converted adapter gives the trained model's logits.
        let loaded = PeftModel::load(tiny_llama(5, true).unwrap(), dir.path()).unwrap();
        let reloaded = logits(&loaded.base);
        assert!(max_abs_diff(&reloaded, &trained) < 1e-4, "{init}");
        // The trained A and B come back from the converted file (a resumed checkpoint).
        let file = candle_core::safetensors::load(
            dir.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for (key, var) in model.trainable() {
            let back = model.trained_from_saved(&key, file[&key].clone()).unwrap();
            assert_eq!(max_abs_diff(&back, var.as_tensor()), 0.0, "{key}");
        }
    }
}

/// An adapter HF PEFT saved unconverted needs the residual base: refused, saying how to convert.
#[test]
fn unconverted_adapters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = PeftModel::new(tiny_llama(5, true).unwrap(), config("pissa", false), 1).unwrap();
    model.save(dir.path(), "tiny").unwrap();
    let path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "\"init_lora_weights\": true",
            "\"init_lora_weights\": \"pissa\"",
        ),
    )
    .unwrap();
    let err = PeftModel::load(tiny_llama(5, true).unwrap(), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("path_initial_model_for_weight_conversion"),
        "{err}"
    );
    // LoftQ's magnitude would scale the quantized weight, not the corrected one.
    let dora = LoraConfig {
        use_dora: true,
        ..config("loftq", false)
    };
    let err = PeftModel::new(tiny_llama(5, true).unwrap(), dora, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("with use_dora is not supported"), "{err}");
}

/// QPiSSA: quantizing PiSSA's residual to NF4 loses less of the model than quantizing the
/// weights themselves (QLoRA), as the principal part stays in f32 in A and B.
#[test]
fn quantized_residual_keeps_more_than_quantized_weights() {
    use peft_quant::FourBit;
    let base_logits = logits(&tiny_llama(5, true).unwrap());
    let mut qlora = tiny_llama(5, true).unwrap();
    qlora
        .quantize(FourBit::Nf4, false, candle_core::DType::F32)
        .unwrap();
    let mut qpissa =
        PeftModel::new(tiny_llama(5, true).unwrap(), config("pissa", false), 1).unwrap();
    qpissa
        .base
        .quantize(FourBit::Nf4, false, candle_core::DType::F32)
        .unwrap();
    let qlora_error = max_abs_diff(&logits(&qlora), &base_logits);
    let qpissa_error = max_abs_diff(&logits(&qpissa.base), &base_logits);
    assert!(
        qpissa_error < 0.7 * qlora_error,
        "QPiSSA {qpissa_error} vs QLoRA {qlora_error}"
    );
    // The decomposition needs the weights as they were, not their quantization.
    let err = PeftModel::new(qlora, config("olora", false), 1)
        .err()
        .expect("a quantized base is refused");
    assert!(
        err.to_string()
            .contains("needs the original weights of model.layers.0.self_attn.q_proj"),
        "{err}"
    );
}

/// Adapters HF PEFT saved after its other inits load by what their base is: EVA, orthogonal
/// and MiCA left the base as it was (their A and B are the trained ones), CorDA and LoRA-GA
/// gave up part of it, like PiSSA. Of those, only the orthogonal init trains here.
#[test]
fn adapters_of_other_hf_inits_load_by_their_base() {
    let model = PeftModel::new(tiny_llama(5, true).unwrap(), config("gaussian", false), 1).unwrap();
    let want = logits(&model.base);
    for (init, loads, trains) in [
        ("eva", true, false),
        ("orthogonal", true, true),
        ("mica", true, false),
        ("corda", false, false),
        ("lora_ga", false, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path(), "tiny").unwrap();
        let path = dir.path().join("adapter_config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            "\"init_lora_weights\": \"gaussian\"",
            &format!("\"init_lora_weights\": \"{init}\""),
        );
        assert!(text.contains(init));
        std::fs::write(&path, text).unwrap();
        match PeftModel::load(tiny_llama(5, true).unwrap(), dir.path()) {
            Ok(loaded) if loads => assert_eq!(max_abs_diff(&logits(&loaded.base), &want), 0.0),
            Err(e) if !loads => assert!(e.to_string().contains("residual base weights"), "{e}"),
            Ok(_) => panic!("{init}: loaded onto the original base"),
            Err(e) => panic!("{init}: {e}"),
        }
        match PeftModel::new(tiny_llama(5, true).unwrap(), config(init, false), 1) {
            Ok(_) => assert!(trains, "{init}: trained with"),
            Err(e) => assert!(
                !trains && e.to_string().contains("is not supported"),
                "{init}: {e}"
            ),
        }
    }
}
