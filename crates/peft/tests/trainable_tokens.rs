//! LoRA with `trainable_token_indices` on a tiny random Llama: the listed tokens' embedding
//! rows (and, tied, their head rows) are trained tensors saved under HF PEFT's key, equal to
//! a model whose embedding holds them, merged into it, and trained only by what reads them.

use candle_core::{Device, Tensor};
use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::{max_abs_diff, tiny_llama, SeededNormal};
use peft_models::Llama;
use peft_ops::cross_entropy_chunked;
use serde_json::json;

const KEY: &str = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

fn logits(model: &Llama) -> Tensor {
    model
        .logits(&model.forward(&ids(), None, None, false).unwrap())
        .unwrap()
}

fn config(tokens: serde_json::Value) -> LoraConfig {
    let mut c = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(TargetModules::parse_flag("q_proj")),
        ..Default::default()
    };
    c.other.insert("trainable_token_indices".into(), tokens);
    c
}

/// The model with the token rows of `tokens` set to seeded values; returns those values.
fn with_new_rows(seed: u64, tied: bool, tokens: serde_json::Value) -> (PeftModel, Tensor) {
    let model = PeftModel::new(tiny_llama(seed, tied).unwrap(), config(tokens), 1).unwrap();
    let var = model
        .trainable()
        .into_iter()
        .find(|(k, _)| k == KEY)
        .expect("the token rows train")
        .1;
    let rows = SeededNormal::new(8)
        .tensor(var.dims(), 1.0, &Device::Cpu)
        .unwrap();
    var.set(&rows).unwrap();
    (model, rows)
}

/// `base` with the embedding rows of `tokens` replaced by `rows`.
fn replaced(mut base: Llama, tokens: &[u32], rows: &Tensor) -> Llama {
    let mut embed: Vec<Vec<f32>> = base.embed_tokens.to_vec2().unwrap();
    let rows: Vec<Vec<f32>> = rows.to_vec2().unwrap();
    for (&t, row) in tokens.iter().zip(rows) {
        embed[t as usize] = row;
    }
    let (v, h) = base.embed_tokens.dims2().unwrap();
    let flat: Vec<f32> = embed.into_iter().flatten().collect();
    base.embed_tokens = Tensor::from_vec(flat, (v, h), &Device::Cpu).unwrap();
    base
}

#[test]
fn token_rows_replace_the_embedding_and_the_tied_head() {
    let untouched = PeftModel::new(tiny_llama(3, true).unwrap(), config(json!([9, 3])), 1).unwrap();
    let base_logits = logits(&tiny_llama(3, true).unwrap());
    // Each row starts as the token's own.
    assert!(max_abs_diff(&logits(&untouched.base), &base_logits) < 1e-5);

    for tied in [true, false] {
        let (model, rows) = with_new_rows(3, tied, json!({"embed_tokens": [9, 3]}));
        let got = logits(&model.base);
        assert!(max_abs_diff(&got, &base_logits) > 1e-2);
        // Rows in the listed order: 9 first, then 3 (HF PEFT keeps the user's order).
        // Untied, the head keeps its rows (HF PEFT adapts a head only where it is tied).
        let want = logits(&replaced(tiny_llama(3, tied).unwrap(), &[9, 3], &rows));
        assert!(max_abs_diff(&got, &want) < 1e-5, "tied {tied}");
        // Merging writes them into the embedding (which a tied head reads).
        let merged = model.merge_and_unload().unwrap();
        assert!(max_abs_diff(&logits(&merged), &want) < 1e-5, "tied {tied}");
    }
}

/// Untied, a row trains only where its token is read: 3 is in the input, 60 is not. Tied,
/// the head reads every row.
#[test]
fn token_rows_get_the_gradient_of_what_reads_them() {
    for tied in [false, true] {
        let (model, _) = with_new_rows(5, tied, json!([3, 60]));
        let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
        let h = model.base.forward(&ids(), None, None, true).unwrap();
        let weight = model.base.lm_head_weight().unwrap();
        let (loss, _) = cross_entropy_chunked(&h.squeeze(0).unwrap(), &weight, &labels, 3).unwrap();
        let grads = model.base.backward(&loss).unwrap();
        let var = model
            .trainable()
            .into_iter()
            .find(|(k, _)| k == KEY)
            .unwrap()
            .1;
        let g: Vec<Vec<f32>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
        let norm = |row: &Vec<f32>| row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm(&g[0]) > 1e-4, "tied {tied}: token 3 is read");
        match tied {
            true => assert!(norm(&g[1]) > 1e-4, "the tied head reads token 60's row"),
            false => assert_eq!(norm(&g[1]), 0.0, "nothing reads token 60's row"),
        }
    }
}

#[test]
fn token_rows_save_under_hf_peft_key_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let (model, rows) = with_new_rows(4, true, json!([9, 3]));
    model.save(dir.path(), "tiny").unwrap();
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["trainable_token_indices"], json!([9, 3]));
    let tensors = peft_models::io::load_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(max_abs_diff(&tensors[KEY], &rows), 0.0);
    let loaded = PeftModel::load(tiny_llama(4, true).unwrap(), dir.path()).unwrap();
    assert_eq!(
        max_abs_diff(&logits(&loaded.base), &logits(&model.base)),
        0.0
    );
    let (t, all) = PeftModel::new(tiny_llama(4, true).unwrap(), config(json!([9, 3])), 1)
        .unwrap()
        .parameter_counts();
    // HF PEFT counts the rows as trainable and once more in all parameters.
    let lora = 2 * (2 * 32 + 32 * 2);
    assert_eq!(t, lora + 2 * 32);
    assert_eq!(all, tiny_llama(4, true).unwrap().parameter_count() + t);
}

#[test]
fn bad_token_lists_are_refused() {
    for (tokens, message) in [
        (json!([3, 3]), "lists token 3 twice"),
        (json!([64]), "token 64 is outside the vocabulary (size 64)"),
        (json!({"lm_head": [3]}), "only the input embedding"),
        (json!([]), "lists no token"),
        (json!(["a"]), "must list token ids"),
    ] {
        let err = match PeftModel::new(tiny_llama(1, true).unwrap(), config(tokens), 1) {
            Ok(_) => panic!("accepted where {message}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(message), "{err}");
    }
}

/// The method alone (HF PEFT's TrainableTokensConfig): rows under the embedding's key and,
/// for a tied head, the same rows under the head's, as HF PEFT saves them; loaded by type.
#[test]
fn trainable_tokens_method_saves_as_hf_peft_and_loads_by_type() {
    use peft::{Adapter, TokensConfig, TokensModel, Tuned};
    let embed_key = "base_model.model.model.embed_tokens.trainable_tokens_delta";
    let head_key = "base_model.model.lm_head.trainable_tokens_delta";
    for tied in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let model =
            TokensModel::new(tiny_llama(2, tied).unwrap(), TokensConfig::new(&[9, 3]), 1).unwrap();
        let (_, var) = &model.trainable()[0];
        let rows = SeededNormal::new(3)
            .tensor(var.dims(), 1.0, &Device::Cpu)
            .unwrap();
        var.set(&rows).unwrap();
        let want = logits(&replaced(tiny_llama(2, tied).unwrap(), &[9, 3], &rows));
        assert!(
            max_abs_diff(&logits(&model.base), &want) < 1e-5,
            "tied {tied}"
        );
        model.save(dir.path(), "tiny").unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], json!("TRAINABLE_TOKENS"));
        assert_eq!(config["token_indices"], json!([9, 3]));
        let file = dir.path().join("adapter_model.safetensors");
        let tensors = peft_models::io::load_safetensors(&file, &Device::Cpu).unwrap();
        let mut keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
        keys.sort();
        let want_keys = match tied {
            true => vec![head_key, embed_key],
            false => vec![embed_key],
        };
        assert_eq!(keys, want_keys);
        let loaded = Adapter::load(tiny_llama(2, tied).unwrap(), dir.path()).unwrap();
        assert_eq!(loaded.peft_type(), "TRAINABLE_TOKENS");
        assert_eq!(
            max_abs_diff(&logits(loaded.model()), &logits(&model.base)),
            0.0
        );
        let merged = loaded.merge_and_unload().unwrap();
        assert!(max_abs_diff(&logits(&merged), &want) < 1e-5);
        if tied {
            // The head's rows belong to a tied head only.
            let err = match TokensModel::load(tiny_llama(2, false).unwrap(), dir.path()) {
                Ok(_) => panic!("loaded a tied head's rows onto an untied model"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("not tied to the embedding"), "{err}");
        }
    }
}

/// `init_weights: false` starts the rows as N(0, 1) draws (HF PEFT's torch.randn), the same
/// for the same seed.
#[test]
fn random_token_rows_are_standard_normal_and_seeded() {
    use peft::{TokensConfig, TokensModel, Tuned};
    let rows = |seed: u64| {
        let config = TokensConfig {
            init_weights: false,
            ..TokensConfig::new(&(0..64).collect::<Vec<u32>>())
        };
        let model = TokensModel::new(tiny_llama(2, true).unwrap(), config, seed).unwrap();
        let t = model.trainable()[0].1.as_tensor().flatten_all().unwrap();
        t.to_vec1::<f32>().unwrap()
    };
    let (a, b) = (rows(1), rows(2));
    assert_eq!(a, rows(1));
    assert_ne!(a, b);
    let n = a.len() as f32;
    let mean = a.iter().sum::<f32>() / n;
    let var = a.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    assert!(
        mean.abs() < 0.1 && (var - 1.0).abs() < 0.1,
        "mean {mean}, var {var}"
    );
}

/// TRL's recipe for added tokens (the embedding resized, then LoRA with the new tokens' rows
/// trained): HF PEFT saves the resized embedding as the token adapter's base layer, and for a
/// tied head a copy of it and of the rows. The model takes the new size, and the new tokens'
/// rows are the trained ones.
#[test]
fn rows_of_added_tokens_load_with_the_resized_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let (model, rows) = with_new_rows(4, true, json!([3, 5]));
    model.save(dir.path(), "tiny").unwrap();
    // The same adapter as HF PEFT writes it for tokens 64 and 65 of a vocabulary grown to 72.
    let config_path = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["trainable_token_indices"] = json!([64, 65]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let file = dir.path().join("adapter_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = peft_models::io::load_safetensors(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let base = tiny_llama(4, true).unwrap();
    let extra = Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let grown = Tensor::cat(&[&base.embed_tokens, &extra], 0).unwrap();
    let layer = "token_adapter.base_layer.weight";
    tensors.push((
        format!("base_model.model.model.embed_tokens.{layer}"),
        grown.clone(),
    ));
    tensors.push((format!("base_model.model.lm_head.{layer}"), grown));
    let head_rows = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";
    tensors.push((head_rows.into(), rows.clone()));
    peft_models::io::save_safetensors(&file, &tensors, None).unwrap();

    let loaded = PeftModel::load(tiny_llama(4, true).unwrap(), dir.path()).unwrap();
    assert_eq!(loaded.base.config.vocab_size, 72);
    let ids = Tensor::new(&[64u32, 65], &Device::Cpu).unwrap();
    let embedded = loaded.base.embedding_rows(&ids).unwrap();
    assert_eq!(max_abs_diff(&embedded, &rows), 0.0);
}
