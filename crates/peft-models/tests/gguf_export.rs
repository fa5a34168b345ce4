//! `save_gguf` on small random models of each architecture it writes (Llama with attention
//! biases and Llama 3 rope scaling, Qwen2, Qwen3, Gemma 3): read back by our GGUF loader, the model
//! computes the same logits, and its tokenizer encodes alike. That the files are what llama.cpp
//! expects is checked against llama.cpp itself by scripts/hf/check_gguf_export.py.

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use peft_models::gguf::{save_gguf, GgufType};
use peft_models::shapes::random_llama;
use peft_models::testing::max_abs_diff;
use peft_models::tokenizer::Tokenizer;
use peft_models::{load_model, Llama, LlamaConfig};
use serde_json::json;
use std::collections::HashMap;

const VOCAB: usize = 320;

/// GPT-2's byte-to-character map: the 256 base tokens of a byte-level BPE vocabulary.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut by_byte: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    by_byte.sort();
    by_byte
        .into_iter()
        .map(|(_, c)| char::from_u32(c).unwrap())
        .collect()
}

/// A byte-level BPE tokenizer: the 256 byte tokens, a few merges, two special tokens and a
/// chat template; built from GGUF metadata as a llama.cpp file would give it.
fn tokenizer() -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
    tokens.extend(byte_chars().into_iter().map(String::from));
    let merges = ["h e", "l l", "he ll", "Ġ w", "o r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![Value::I32(3), Value::I32(3)];
    types.resize(tokens.len(), Value::I32(1));
    let md: HashMap<String, Value> = [
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                merges
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        (
            "tokenizer.chat_template",
            Value::String("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}".into()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Tokenizer::from_gguf_metadata(&md).unwrap()
}

/// The config of a test case: a model type, `phi4_mini` (Phi-3 with partial rotary) or
/// `qwen2_yarn` (Qwen2 with YaRN).
fn config(case: &str) -> LlamaConfig {
    let model_type = match case {
        "phi4_mini" => "phi3",
        "qwen2_yarn" => "qwen2",
        _ => case,
    };
    let mut c = json!({
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": model_type != "llama",
    });
    match case {
        // 12 of each head's 16 dims rotated, LongRoPE over them past 8 positions, tied.
        "phi4_mini" => {
            c["partial_rotary_factor"] = json!(0.75);
            c["original_max_position_embeddings"] = json!(8);
            c["tie_word_embeddings"] = json!(true);
            c["rope_scaling"] = json!({
                "type": "longrope",
                "short_factor": (0..6).map(|i| 1.0 + 0.2 * i as f64).collect::<Vec<_>>(),
                "long_factor": (0..6).map(|i| 1.0 + 0.9 * i as f64).collect::<Vec<_>>(),
            });
        }
        "llama" => {
            c["attention_bias"] = json!(true);
            c["rope_scaling"] = json!({
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            });
        }
        "qwen3" => c["head_dim"] = json!(32),
        // YaRN with a beta of its own (written) and the others left to their defaults.
        "qwen2_yarn" => {
            c["rope_theta"] = json!(1000.0);
            c["rope_scaling"] = json!({
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                "beta_fast": 16.0,
            });
        }
        // LongRoPE past its original context of 8 (10 test tokens), a window of 6.
        "phi3" => {
            c["sliding_window"] = json!(6);
            c["original_max_position_embeddings"] = json!(8);
            c["rope_scaling"] = json!({
                "type": "longrope",
                "short_factor": (0..8).map(|i| 1.0 + 0.1 * i as f64).collect::<Vec<_>>(),
                "long_factor": (0..8).map(|i| 1.0 + 0.7 * i as f64).collect::<Vec<_>>(),
            });
        }
        // Granite's four multipliers.
        "granite" => {
            c["attention_multiplier"] = json!(0.25);
            c["embedding_multiplier"] = json!(6.0);
            c["residual_multiplier"] = json!(0.5);
            c["logits_scaling"] = json!(3.0);
        }
        // Four layers, the fourth without RoPE (llama.cpp's smollm3 takes every fourth).
        "smollm3" => c["num_hidden_layers"] = json!(4),
        // Every other layer sliding (a window of 4 over the 10 test tokens), soft caps small
        // enough to change the scores and logits, and the RoPE base the converter leaves out.
        "gemma2" => {
            c["head_dim"] = json!(32);
            c["query_pre_attn_scalar"] = json!(32);
            c["sliding_window"] = json!(4);
            c["rope_theta"] = json!(10000.0);
            c["attn_logit_softcapping"] = json!(1.5);
            c["final_logit_softcapping"] = json!(4.0);
        }
        // Four layers, the fourth global (a window of 4 over the 10 test tokens), YaRN on it.
        "olmo3" => {
            c["num_hidden_layers"] = json!(4);
            c["sliding_window"] = json!(4);
            c["rope_scaling"] = json!({
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
            });
        }
        // The mixture-of-experts families as llama.cpp runs them: four experts, two per token.
        "mixtral" => {
            c["num_local_experts"] = json!(4);
            c["num_experts_per_tok"] = json!(2);
        }
        "qwen2_moe" | "qwen3_moe" => {
            c["num_experts"] = json!(4);
            c["num_experts_per_tok"] = json!(2);
            c["moe_intermediate_size"] = json!(32);
            if model_type == "qwen2_moe" {
                c["shared_expert_intermediate_size"] = json!(48);
            } else {
                c["head_dim"] = json!(32);
                c["norm_topk_prob"] = json!(true);
            }
        }
        "olmoe" => {
            c["num_key_value_heads"] = json!(4);
            c["num_experts"] = json!(4);
            c["num_experts_per_tok"] = json!(2);
        }
        // gpt-oss: sinks, biases, every other layer sliding (a window of 4 over the 10 test
        // tokens), its default YaRN, four experts with biases, two per token.
        "gpt_oss" => {
            c["head_dim"] = json!(16);
            c["num_local_experts"] = json!(4);
            c["num_experts_per_tok"] = json!(2);
            c["sliding_window"] = json!(4);
            c["tie_word_embeddings"] = json!(false);
        }
        // GLM-4.5: three layers, the first dense; four experts in two groups (one kept),
        // two per token, weights scaled by 2.5; a shared expert; q/k norms and biases; half
        // of each head's dims rotated.
        "glm4_moe" => {
            c["num_hidden_layers"] = json!(3);
            c["head_dim"] = json!(32);
            c["n_routed_experts"] = json!(4);
            c["num_experts_per_tok"] = json!(2);
            c["moe_intermediate_size"] = json!(32);
            c["n_group"] = json!(2);
            c["topk_group"] = json!(1);
            c["routed_scaling_factor"] = json!(2.5);
            c["use_qk_norm"] = json!(true);
            c["attention_bias"] = json!(true);
            c["tie_word_embeddings"] = json!(false);
        }
        // ERNIE 4.5 MoE: three layers, the first dense; four experts, two per token, a
        // corrected choice; a shared expert.
        "ernie4_5_moe" => {
            c["num_hidden_layers"] = json!(3);
            c["moe_num_experts"] = json!(4);
            c["moe_k"] = json!(2);
            c["moe_intermediate_size"] = json!(32);
            c["moe_num_shared_experts"] = json!(1);
            c["moe_layer_start_index"] = json!(1);
        }
        // Latent attention (llama.cpp's deepseek2): three layers, the first dense; DeepSeek-V3
        // with low-rank queries, values narrower than the heads and two groups of experts;
        // GLM-4.7-Flash; DeepSeek-V2 with plain queries and its softmax router.
        "deepseek_v3" | "glm4_moe_lite" | "deepseek_v2" => {
            c["num_hidden_layers"] = json!(3);
            c["num_key_value_heads"] = json!(4);
            c["kv_lora_rank"] = json!(16);
            c["qk_nope_head_dim"] = json!(16);
            c["qk_rope_head_dim"] = json!(8);
            c["v_head_dim"] = json!(12);
            c["n_routed_experts"] = json!(4);
            c["num_experts_per_tok"] = json!(2);
            c["moe_intermediate_size"] = json!(32);
            c["first_k_dense_replace"] = json!(1);
            c["routed_scaling_factor"] = json!(2.5);
            c["tie_word_embeddings"] = json!(false);
            // Plain queries (DeepSeek-V2-Lite's) only at its 27 layers, as llama.cpp reads them.
            c["q_lora_rank"] = match model_type {
                "deepseek_v2" => json!(null),
                _ => json!(24),
            };
            if model_type == "deepseek_v2" {
                c["num_hidden_layers"] = json!(27);
            }
            if model_type == "deepseek_v3" {
                c["n_group"] = json!(2);
                c["topk_group"] = json!(1);
            }
        }
        // Six layers: five sliding (a window of 4 over the 10 test tokens), one global.
        "gemma3_text" => {
            c["num_hidden_layers"] = json!(6);
            c["head_dim"] = json!(32);
            c["query_pre_attn_scalar"] = json!(32);
            c["sliding_window"] = json!(4);
        }
        _ => {}
    }
    LlamaConfig::from_json(c).unwrap()
}

/// A random model whose norms and biases are not at their init, so each one shows.
fn model(model_type: &str) -> Llama {
    let mut m = random_llama(config(model_type), &Device::Cpu, DType::F32, 5).unwrap();
    let mut stream = 100;
    let mut jitter = |t: &mut Tensor| {
        stream += 1;
        let noise =
            peft_ops::random_normal(9, stream, t.dims(), 0.3, DType::F32, &Device::Cpu).unwrap();
        *t = (&*t + noise).unwrap();
    };
    for (_, norm) in m.norms_mut() {
        jitter(norm);
    }
    for (_, lin) in m.linears_mut() {
        if let Some(b) = &mut lin.bias {
            jitter(b);
        }
    }
    // gpt-oss's router's and experts' biases, and its sinks.
    for (_, lin) in m.expert_linears_mut() {
        if let Some(b) = &mut lin.bias {
            jitter(b);
        }
    }
    for layer in &mut m.layers {
        if let Some(sinks) = &mut layer.self_attn.sinks {
            jitter(sinks);
        }
        if let peft_models::FeedForward::Sparse(s) = &mut layer.mlp {
            if let Some(b) = &mut s.choice_bias {
                jitter(b);
            }
        }
    }
    m
}

fn logits(m: &Llama) -> Tensor {
    let ids = Tensor::new(
        &[[1u32, 77, 200, 5, 319, 64, 140, 12, 9, 250]],
        &Device::Cpu,
    )
    .unwrap();
    m.logits(&m.forward(&ids, None, None, false).unwrap())
        .unwrap()
}

#[test]
fn written_models_read_back_alike() {
    let tok = tokenizer();
    let text = "hello world, 12 héllo\n\n  <|im_end|>";
    for model_type in [
        "llama",
        "qwen2",
        "qwen2_yarn",
        "qwen3",
        "smollm3",
        "granite",
        "olmo2",
        "olmo3",
        "gemma2",
        "gemma3_text",
        "phi3",
        "ernie4_5",
    ] {
        let mut original = model(model_type);
        let want = logits(&original);
        let dir = tempfile::tempdir().unwrap();
        for (ty, tol) in [
            (GgufType::F32, 1e-5),
            (GgufType::F16, 2e-2),
            (GgufType::Bf16, 1e-1),
            (GgufType::Q8_0, 1e-1),
            (GgufType::Q4KM, 1.0),
        ] {
            let path = dir.path().join(format!("{model_type}-{ty:?}.gguf"));
            save_gguf(&mut original, &tok, &path, ty, "tiny").unwrap();
            let loaded = load_model(&path, &Device::Cpu, DType::F32).unwrap();
            let c = &loaded.config;
            assert_eq!(c.model_type, original.config.model_type);
            match (&c.yarn, &original.config.yarn) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.factor, b.factor);
                    assert_eq!(a.original_max_position_embeddings, 256);
                    assert_eq!((a.beta_fast, a.beta_slow), (b.beta_fast, b.beta_slow));
                    assert_eq!(a.attention_factor, None);
                    assert_eq!(c.rope_inv_freq(), original.config.rope_inv_freq());
                }
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "{model_type}: YaRN"),
            }
            assert_eq!(c.rotary_dim, original.config.rotary_dim);
            assert_eq!(c.head_dim, original.config.head_dim);
            assert_eq!(c.qk_norm, original.config.qk_norm);
            assert_eq!(c.norms, original.config.norms);
            assert_eq!(
                c.qkv_bias,
                matches!(model_type, "llama" | "qwen2" | "qwen2_yarn")
            );
            assert_eq!(c.layer_windows, original.config.layer_windows);
            assert_eq!(c.attention_scale, original.config.attention_scale);
            assert_eq!(c.attn_softcap, original.config.attn_softcap);
            assert_eq!(c.final_softcap, original.config.final_softcap);
            assert_eq!(c.rope_theta, original.config.rope_theta);
            assert_eq!(c.layer_rope, original.config.layer_rope);
            assert_eq!(c.embedding_multiplier, original.config.embedding_multiplier);
            assert_eq!(c.residual_multiplier, original.config.residual_multiplier);
            assert_eq!(c.logits_scaling, original.config.logits_scaling);
            assert_eq!(c.rope_scaling.is_some(), model_type == "llama");
            assert_eq!(c.fused_projections, model_type.starts_with("phi"));
            if let (Some(a), Some(b)) = (&c.longrope, &original.config.longrope) {
                assert_eq!(a.short_factor, b.short_factor);
                assert_eq!(a.long_factor, b.long_factor);
                assert_eq!(a.original_max_position_embeddings, 8);
                assert!((a.attention_factor - b.attention_factor).abs() < 1e-6);
            } else {
                assert_eq!(c.longrope.is_some(), original.config.longrope.is_some());
            }
            assert_eq!(c.tie_word_embeddings, original.config.tie_word_embeddings);
            let back = loaded.tokenizer.unwrap();
            assert_eq!(
                back.encode(text, true).unwrap(),
                tok.encode(text, true).unwrap()
            );
            assert_eq!(back.eos_token_id(), Some(1));
            assert!(back.has_chat_template());
            let m = Llama::from_weights(loaded.config, loaded.weights, &Device::Cpu, DType::F32)
                .unwrap();
            let d = max_abs_diff(&logits(&m), &want);
            assert!(d < tol, "{model_type} {ty:?}: logits differ by {d}");
        }
        // Only the finished files: no temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
    }
}

/// Mixture-of-experts models go out as llama.cpp holds them (per layer the router and the
/// experts stacked, `blk.N.ffn_gate_exps.weight`) and read back alike; what llama.cpp would
/// run otherwise than the model is refused by name.
#[test]
fn mixture_of_experts_models_read_back_alike() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    for model_type in [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "gpt_oss",
        "glm4_moe",
        "ernie4_5_moe",
        "deepseek_v3",
        "glm4_moe_lite",
        "deepseek_v2",
    ] {
        let mut original = model(model_type);
        let want = logits(&original);
        for (ty, tol) in [(GgufType::F32, 1e-5), (GgufType::Q8_0, 1e-1)] {
            let path = dir.path().join(format!("{model_type}-{ty:?}.gguf"));
            save_gguf(&mut original, &tok, &path, ty, "tiny").unwrap();
            let loaded = load_model(&path, &Device::Cpu, DType::F32).unwrap();
            // llama.cpp's deepseek2 holds GLM-4.7-Flash's layers as DeepSeek-V3's.
            let read_as = match model_type {
                "glm4_moe_lite" => "deepseek_v3",
                other => other,
            };
            assert_eq!(loaded.config.model_type, read_as);
            assert_eq!(loaded.config.moe, original.config.moe, "{model_type}");
            let latent = (
                &loaded.config.latent_attention,
                &original.config.latent_attention,
            );
            assert_eq!(latent.0, latent.1, "{model_type}");
            let m = Llama::from_weights(loaded.config, loaded.weights, &Device::Cpu, DType::F32)
                .unwrap();
            let d = max_abs_diff(&logits(&m), &want);
            assert!(d < tol, "{model_type} {ty:?}: logits differ by {d}");
        }
        let err = save_gguf(
            &mut original,
            &tok,
            &dir.path().join("x.gguf"),
            GgufType::Q4KM,
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("mixes"), "{err}");
    }
    let refused = |model_type: &str, change: &dyn Fn(&mut serde_json::Value), named: &str| {
        let mut raw = config(model_type).raw;
        change(&mut raw);
        let c = LlamaConfig::from_json(raw).unwrap();
        let mut m = random_llama(c, &Device::Cpu, DType::F32, 5).unwrap();
        let err =
            save_gguf(&mut m, &tok, &dir.path().join("y.gguf"), GgufType::F32, "t").unwrap_err();
        assert!(err.to_string().contains(named), "{model_type}: {err}");
    };
    refused(
        "qwen3_moe",
        &|c| c["norm_topk_prob"] = json!(false),
        "norm_topk_prob",
    );
    refused(
        "qwen2_moe",
        &|c| c["mlp_only_layers"] = json!([1]),
        "dense layers",
    );
    refused(
        "olmoe",
        &|c| c["num_key_value_heads"] = json!(2),
        "num_key_value_heads",
    );
    refused(
        "gpt_oss",
        &|c| c["swiglu_limit"] = json!(5.0),
        "swiglu_limit",
    );
    refused(
        "glm4_moe_lite",
        &|c| c["q_lora_rank"] = json!(null),
        "26 or 27 layers",
    );
    refused(
        "deepseek_v2",
        &|c| {
            c["topk_method"] = json!("group_limited_greedy");
            c["n_group"] = json!(2);
            c["topk_group"] = json!(1);
        },
        "group_limited_greedy",
    );
    refused(
        "ernie4_5_moe",
        &|c| c["moe_layer_interval"] = json!(2),
        "moe_layer_interval",
    );
    refused(
        "glm4_moe",
        &|c| {
            c["rope_parameters"] =
                json!({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})
        },
        "RoPE scaling",
    );
    refused(
        "gpt_oss",
        &|c| c["layer_types"] = json!(["full_attention", "sliding_attention"]),
        "layer_types",
    );
}

#[test]
fn a_tokenizer_larger_than_the_model_is_an_error() {
    let mut small = random_llama(
        LlamaConfig::from_json(json!({
            "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 64,
        }))
        .unwrap(),
        &Device::Cpu,
        DType::F32,
        1,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    let err = save_gguf(&mut small, &tokenizer(), &path, GgufType::F16, "x").unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "cannot write the tokenizer as GGUF: the tokenizer has 263 tokens, more than the model's vocabulary of 64"
    );
    assert!(!path.exists());
}
