//! RoPE scalings against transformers' own computation (fixtures from
//! `scripts/hf/make_rope_fixture.py`).

use peft_models::LlamaConfig;
use serde_json::Value;

/// YaRN's inverse frequencies and cos/sin scale equal transformers' (Qwen 3's 128k setting,
/// the betas, truncate, DeepSeek's mscale pair, an explicit attention factor, a factor left
/// to the context's growth).
#[test]
fn yarn_matches_transformers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/yarn.json");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (name, case) in cases {
        let config = LlamaConfig::from_json(case["config"].clone()).unwrap();
        assert!(config.yarn.is_some(), "{name}: not read as YaRN");
        let want: Vec<f64> = serde_json::from_value(case["inv_freq"].clone()).unwrap();
        let got = config.rope_inv_freq();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // One float32 rounding of the power apart at most.
            let tolerance = 2.0 * f32::EPSILON as f64 * w.abs();
            assert!(
                (*g as f64 - w).abs() <= tolerance,
                "{name}: inverse frequency {i} is {g}, transformers {w}"
            );
        }
        let want = case["attention_factor"].as_f64().unwrap();
        let got = config.rope_attention_factor();
        assert!(
            (got - want).abs() < 1e-12,
            "{name}: attention factor {got}, transformers {want}"
        );
    }
}

/// A YaRN setting that cannot be read is an error naming it.
#[test]
fn yarn_without_factor_is_refused() {
    let config = serde_json::json!({
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 64,
        "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 64},
    });
    let err = LlamaConfig::from_json(config.clone()).unwrap_err();
    assert!(
        format!("{err:#}").contains("yarn lacks its factor"),
        "{err:#}"
    );
    let mut bad = config;
    bad["rope_scaling"]["factor"] = serde_json::json!("four");
    let err = LlamaConfig::from_json(bad).unwrap_err();
    assert!(
        format!("{err:#}").contains("factor is not a number"),
        "{err:#}"
    );
}

/// A YaRN that llama.cpp would compute otherwise is not written as GGUF: Phi-3's (llama.cpp's
/// phi3 reads no YaRN settings), an unrounded ramp (`truncate: false`) or DeepSeek's mscales
/// (its converter writes neither).
#[test]
fn yarn_that_llama_cpp_reads_otherwise_is_not_written_as_gguf() {
    let config = |model_type: &str, extra: serde_json::Value| {
        let mut yarn = serde_json::json!({"rope_type": "yarn", "factor": 2.0,
            "original_max_position_embeddings": 64});
        yarn.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        LlamaConfig::from_json(serde_json::json!({
            "model_type": model_type, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 64,
            "rope_scaling": yarn,
        }))
        .unwrap()
    };
    let arch = |c: &LlamaConfig| peft_models::gguf::gguf_architecture(c).map_err(|e| e.to_string());
    assert!(arch(&config("phi3", serde_json::json!({})))
        .unwrap_err()
        .contains("reads no YaRN"));
    assert_eq!(
        arch(&config("qwen3", serde_json::json!({}))).unwrap(),
        "qwen3"
    );
    for extra in [
        serde_json::json!({"truncate": false}),
        serde_json::json!({"mscale": 0.707, "mscale_all_dim": 1.0}),
    ] {
        let err = arch(&config("qwen3", extra.clone())).unwrap_err();
        assert!(err.contains("this model's YaRN"), "{extra}: {err}");
    }
}
