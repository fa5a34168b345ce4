//! Each supported architecture (Llama with biases and Llama 3 rope scaling, Mistral, Qwen2,
//! Qwen3, SmolLM3 with a layer without RoPE, Granite with its multipliers, Gemma 2 with soft
//! caps, Gemma 3 with sliding-window layers (also as the language model of its image-text
//! model, whose adapter from HF PEFT adapts the vision tower too), Phi-3 with fused
//! projections, LongRoPE and a sliding window, Phi-4-mini's partial rotary) as transformers
//! computes it, with an HF PEFT LoRA adapter on top: logits unmerged, merged and over a padded
//! batch, and the LoRA gradients of the next-token loss. Fixtures from
//! scripts/hf/make_arch_fixtures.py.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use peft::{AdapterConfig, PeftModel, Tuned};
use peft_models::io::load_safetensors;
use peft_models::testing::{max_abs, max_abs_diff};
use peft_models::{load_model, KvCache, Llama};
use peft_ops::cross_entropy_sum;
use peft_ops::LinearWeight;
use std::collections::HashMap;
use std::path::PathBuf;

const ARCHITECTURES: &[&str] = &[
    "llama_biases",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_yarn",
    "smollm3",
    "granite",
    "olmo2",
    "olmo3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "mistral3",
    "ministral",
    "ministral3",
    "phi3",
    "phi4_mini",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "gpt_oss",
    "ernie4_5",
    "glm4_moe",
    "ernie4_5_moe",
    "deepseek_v3",
    "glm4_moe_lite",
    "deepseek_v2",
];

/// The mixture-of-experts fixtures among [`ARCHITECTURES`].
const MIXTURES_OF_EXPERTS: &[&str] = &[
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
    "qwen3_vl_moe",
    "gpt_oss",
    "glm4_moe",
    "ernie4_5_moe",
    "deepseek_v3",
    "glm4_moe_lite",
    "deepseek_v2",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/arch/{name}"))
}

fn base(name: &str) -> Llama {
    base_in(name, DType::F32)
}

fn base_in(name: &str, dtype: DType) -> Llama {
    let m = load_model(&fixture(name).join("model"), &Device::Cpu, dtype).unwrap();
    m.into_model(&Device::Cpu, dtype).unwrap().0
}

fn logits(model: &Llama, ids: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let h = model.forward(ids, mask, None, false).unwrap();
    model.logits(&h).unwrap()
}

#[test]
fn base_and_lora_logits_match_transformers() {
    for &name in ARCHITECTURES {
        let exp =
            load_safetensors(&fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let model = base(name);
        let d = max_abs_diff(&logits(&model, &ids, None), &exp["base_logits"]);
        assert!(d < 1e-4, "{name}: base logits differ by {d}");

        let peft = PeftModel::load(model, &fixture(name).join("lora")).unwrap();
        let d = max_abs_diff(&logits(&peft.base, &ids, None), &exp["lora_logits"]);
        assert!(d < 1e-4, "{name}: LoRA logits differ by {d}");

        // Left padding: the real positions of each row.
        let ids2 = exp["input_ids_b2"].to_dtype(DType::U32).unwrap();
        let mask2 = &exp["attention_mask_b2"];
        let got = logits(&peft.base, &ids2, Some(mask2));
        let want = &exp["lora_logits_b2"];
        let rows: Vec<Vec<i64>> = mask2.to_vec2().unwrap();
        for (b, row) in rows.iter().enumerate() {
            let first = row.iter().position(|&m| m == 1).unwrap();
            let d = max_abs_diff(
                &got.i((b, first..)).unwrap(),
                &want.i((b, first..)).unwrap(),
            );
            assert!(d < 1e-4, "{name}: padded row {b} differs by {d}");
        }

        let merged = peft.merge_and_unload().unwrap();
        let d = max_abs_diff(&logits(&merged, &ids, None), &exp["lora_logits"]);
        assert!(d < 1e-4, "{name}: merged logits differ by {d}");
    }
}

#[test]
fn lora_gradients_match_hf_peft() {
    peft_ops::with_layer_tape(true, lora_gradients_on_tapes);
}

fn lora_gradients_on_tapes() {
    for &name in ARCHITECTURES {
        let dir = fixture(name);
        let exp = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let want = load_safetensors(&dir.join("grads.safetensors"), &Device::Cpu).unwrap();
        let peft = PeftModel::load(base(name), &dir.join("lora")).unwrap();
        // transformers' loss: token t predicts token t + 1, the mean over the others.
        let ids: Vec<i64> = exp["input_ids"].squeeze(0).unwrap().to_vec1().unwrap();
        let mut labels = ids[1..].to_vec();
        labels.push(-100);
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let h = peft.base.forward(&ids, None, None, true).unwrap();
        let h = peft.base.head_input(&h).unwrap();
        let head = peft.base.lm_head_weight().unwrap();
        // Gemma 2 caps the logits before the loss.
        let cap = peft.base.config.final_softcap;
        let n = ids.dim(1).unwrap() - 1;
        let loss = cross_entropy_sum(&h.squeeze(0).unwrap(), &head, &labels, n, 4, cap).unwrap();
        // The decoder stack is one node (peft_ops::taped) for every architecture: the
        // gradients below then come from its tape. LoRA on experts' parameters runs on
        // candle's graph.
        let nodes = loss.sorted_nodes().len();
        assert!(
            nodes <= 6 || peft.config.adapts_parameters(),
            "{name}: {nodes} nodes, the layer tape does not serve"
        );
        let grads = peft.base.backward(&loss).unwrap();
        let trainable = peft.trainable();
        assert_eq!(trainable.len(), want.len(), "{name}: LoRA tensors");
        for (key, var) in trainable {
            let got = grads.get(var.as_tensor()).unwrap();
            let w = &want[&key];
            let scale = max_abs(w);
            let d = max_abs_diff(got, w);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{name}: {key} gradient differs by {d}"
            );
        }
    }
}

/// A mixture-of-experts block whose experts are not frozen dense weights (trained in full
/// fine-tuning, 4-bit under QLoRA) runs composed of candle's ops instead of the fused op: the
/// same logits and LoRA gradients as HF PEFT's.
#[test]
fn composed_moe_blocks_match_hf_peft() {
    for &name in MIXTURES_OF_EXPERTS {
        let dir = fixture(name);
        let exp = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let want = load_safetensors(&dir.join("grads.safetensors"), &Device::Cpu).unwrap();
        let mut base = base(name);
        let experts = base.expert_linears_mut();
        assert!(!experts.is_empty(), "{name}: no experts");
        for (_, lin) in experts {
            if let LinearWeight::Dense(w) = &mut lin.weight {
                *w = Var::from_tensor(w).unwrap().as_tensor().clone();
            }
        }
        let peft = PeftModel::load(base, &dir.join("lora")).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let d = max_abs_diff(&logits(&peft.base, &ids, None), &exp["lora_logits"]);
        assert!(d < 1e-4, "{name}: LoRA logits differ by {d}");
        let h = peft.base.forward(&ids, None, None, true).unwrap();
        let logits = peft.base.logits(&h).unwrap().squeeze(0).unwrap();
        let n = ids.dim(1).unwrap() - 1;
        let targets = ids.squeeze(0).unwrap().narrow(0, 1, n).unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&logits.narrow(0, 0, n).unwrap(), &targets).unwrap();
        let grads = peft.base.backward(&loss).unwrap();
        for (key, var) in peft.trainable() {
            let got = grads.get(var.as_tensor()).unwrap();
            let w = &want[&key];
            let d = max_abs_diff(got, w);
            assert!(
                d <= 1e-4 * max_abs(w).max(1.0),
                "{name}: {key} gradient differs by {d}"
            );
        }
    }
}

/// A block of frozen experts (one fused op, its own backward) gives the gradients candle's
/// autograd gives through the same block composed of ops (its experts made variables, which
/// the comparisons with HF PEFT above check), here for LoRA on the attention alone, whose
/// gradient reaches the first layer through every router and expert.
#[test]
fn frozen_moe_blocks_backpropagate_as_composed_ones() {
    for &name in MIXTURES_OF_EXPERTS {
        let exp =
            load_safetensors(&fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = exp["input_ids_long"].to_dtype(DType::U32).unwrap();
        let grads = |composed: bool| {
            let mut base = base(name);
            if composed {
                for (_, lin) in base.expert_linears_mut() {
                    if let LinearWeight::Dense(w) = &mut lin.weight {
                        *w = Var::from_tensor(w).unwrap().as_tensor().clone();
                    }
                }
            }
            let config = peft::LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                target_modules: Some(peft::TargetModules::parse_flag(
                    r"re:.*\.self_attn\.(q_proj|v_proj|o_proj)",
                )),
                init_lora_weights: serde_json::json!("gaussian"),
                ..Default::default()
            };
            let peft = PeftModel::new(base, config, 7).unwrap();
            let h = peft.base.forward(&ids, None, None, true).unwrap();
            let loss = peft
                .base
                .logits(&h)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            let g = peft.base.backward(&loss).unwrap();
            peft.trainable()
                .into_iter()
                .map(|(key, var)| (key, g.get(var.as_tensor()).unwrap().clone()))
                .collect::<Vec<_>>()
        };
        for ((key, fused), (_, composed)) in grads(false).iter().zip(grads(true)) {
            let d = max_abs_diff(fused, &composed);
            assert!(
                d <= 1e-4 * max_abs(&composed).max(1e-3),
                "{name}: {key} gradient differs by {d}"
            );
        }
    }
}

/// The routers' load-balancing loss over a right-padded batch, as transformers computes it
/// (`output_router_logits=True`; scripts/hf/make_router_aux_fixture.py): its value, the LoRA
/// gradients of it alone and of TRL's loss with it weighted by 0.5, through the fused frozen
/// blocks (OLMoE, Qwen2-MoE) and the composed ones (LoRA on the experts' parameters), on layer
/// tapes, and with gradient checkpointing recomputing the layers.
#[test]
fn router_load_balancing_loss_matches_transformers() {
    peft_ops::with_layer_tape(true, router_load_balancing_on_tapes);
}

fn router_load_balancing_on_tapes() {
    // GLM-4.5's and DeepSeek's routings have no load-balancing loss in transformers.
    let no_aux_loss = ["glm4_moe", "deepseek_v3", "glm4_moe_lite", "deepseek_v2"];
    for &name in MIXTURES_OF_EXPERTS
        .iter()
        .filter(|n| !no_aux_loss.contains(n))
    {
        let dir = fixture(name);
        let exp = load_safetensors(&dir.join("router_aux.safetensors"), &Device::Cpu).unwrap();
        let mut peft = PeftModel::load(base(name), &dir.join("lora")).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let mask: Vec<Vec<bool>> = exp["attention_mask"]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(|m| m == 1).collect())
            .collect();
        // Token t predicts token t + 1 where both are real.
        let mut labels = Vec::new();
        for (b, row) in ids.to_vec2::<u32>().unwrap().iter().enumerate() {
            for t in 0..row.len() {
                let next = (t + 1 < row.len() && mask[b][t + 1]).then(|| row[t + 1] as i64);
                labels.push(next.unwrap_or(-100));
            }
        }
        let labelled = labels.iter().filter(|&&l| l >= 0).count();
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        // The LoRA gradients of the token loss plus `weight` times the aux loss (whose value
        // adds nothing: its gradient comes from the routers' backward), with the aux loss.
        let mut run = |weight: f64, checkpointing: bool| {
            peft.base.gradient_checkpointing = checkpointing;
            let balance = peft.base.load_balance(&mask).unwrap();
            let h = peft
                .base
                .balancing(&balance, || peft.base.forward(&ids, None, None, true))
                .unwrap()
                .unwrap();
            let aux = balance.finish(weight).unwrap().unwrap();
            let (b, t, d) = h.dims3().unwrap();
            let h = peft
                .base
                .head_input(&h.reshape((b * t, d)).unwrap())
                .unwrap();
            let head = peft.base.lm_head_weight().unwrap();
            let tokens = cross_entropy_sum(&h, &head, &labels, labelled, 4, None).unwrap();
            let grads = peft.base.backward(&(tokens + &aux).unwrap()).unwrap();
            let grads: HashMap<String, Tensor> = peft
                .trainable()
                .into_iter()
                .filter_map(|(key, var)| Some((key, grads.get(var.as_tensor())?.clone())))
                .collect();
            (aux.to_scalar::<f32>().unwrap(), grads)
        };
        let (aux, tokens_only) = run(0.0, false);
        let want = exp["aux_loss"].to_scalar::<f32>().unwrap();
        assert!(
            (aux - want).abs() < 1e-5,
            "{name}: aux loss {aux}, not {want}"
        );
        let aux_only: HashMap<String, Tensor> = run(1.0, false)
            .1
            .into_iter()
            .map(|(key, g)| {
                let d = (&g - &tokens_only[&key]).unwrap();
                (key, d)
            })
            .collect();
        for (prefix, checkpointing, got) in [
            ("aux", false, aux_only),
            ("total", false, run(0.5, false).1),
            ("total", true, run(0.5, true).1),
        ] {
            for (key, _) in peft.trainable() {
                let (d, scale) = match exp.get(&format!("{prefix}.{key}")) {
                    Some(w) => (max_abs_diff(&got[&key], w), max_abs(w)),
                    // transformers has no gradient where the loss does not reach.
                    None => (got.get(&key).map_or(0.0, max_abs), 0.0),
                };
                assert!(
                    d <= 1e-4 * scale.max(1.0),
                    "{name} ({prefix}, checkpointing {checkpointing}): {key} gradient differs by {d}"
                );
            }
        }
    }
}

/// Adapters saved on transformers 4, a LoRA pair per expert's projection and on the router
/// (scripts/hf/make_moe_v4_fixture.py), load as HF PEFT 0.21 converts them: the same logits.
#[test]
fn transformers_4_experts_adapters_load_as_hf_peft_converts_them() {
    for name in ["mixtral", "qwen3_moe"] {
        let dir = fixture(name);
        let exp = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let want = load_safetensors(&dir.join("lora_v4_logits.safetensors"), &Device::Cpu).unwrap();
        let peft = PeftModel::load(base(name), &dir.join("lora_v4")).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let d = max_abs_diff(&logits(&peft.base, &ids, None), &want["logits"]);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let keys: Vec<String> = peft.trainable().into_iter().map(|(k, _)| k).collect();
        assert!(keys
            .iter()
            .any(|k| k.ends_with("mlp.experts.base_layer.lora_B.weight")));
    }
}

/// Qwen3-VL-MoE's released files hold the stacked experts transposed (`gate_up_proj`
/// `[experts, hidden, 2 · size]`, `down_proj` `[experts, size, hidden]`), which transformers 5
/// turns as it loads them: so do we. A merged model saves them stacked again, as transformers
/// 5 saves them, and reads back alike.
#[test]
fn stacked_experts_load_either_way_and_save_stacked() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("qwen3_vl_moe").join("model");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tensors = load_safetensors(&src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut released = Vec::new();
    for (name, t) in tensors {
        let t = match name.contains(".mlp.experts.") {
            true => t.transpose(1, 2).unwrap().contiguous().unwrap(),
            false => t,
        };
        released.push((name, t));
    }
    peft_models::io::save_safetensors(&dir.path().join("model.safetensors"), &released, None)
        .unwrap();
    let exp = load_safetensors(
        &fixture("qwen3_vl_moe").join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let loaded = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let mut model = loaded.into_model(&Device::Cpu, DType::F32).unwrap().0;
    let d = max_abs_diff(&logits(&model, &ids, None), &exp["base_logits"]);
    assert!(d < 1e-4, "transposed experts: logits differ by {d}");

    let saved = dir.path().join("saved");
    peft_models::save::save_hf_model(&mut model, None, &saved, DType::F32).unwrap();
    let written = load_safetensors(&saved.join("model.safetensors"), &Device::Cpu).unwrap();
    let gate_up = &written["model.language_model.layers.0.mlp.experts.gate_up_proj"];
    assert_eq!(gate_up.dims(), [4, 24, 32]);
    assert!(!written.keys().any(|k| k.contains("experts.0.")));
    let back = base_from(&saved);
    let d = max_abs_diff(&logits(&back, &ids, None), &exp["base_logits"]);
    assert!(d < 1e-4, "saved and read back: logits differ by {d}");
}

/// gpt-oss as OpenAI releases it, its experts in MXFP4 (`*_blocks`, `*_scales`;
/// scripts/hf/make_gpt_oss_mxfp4_fixture.py): dequantized as transformers dequantizes them,
/// the same logits. A model saved from it writes its experts dense, stacked and interleaved as
/// transformers 5 holds them, with no quantization_config, and reads back alike; a merged
/// adapter on the experts saves and reads back to the adapted model's logits.
#[test]
fn gpt_oss_mxfp4_experts_load_and_save_dense() {
    let src = fixture("gpt_oss_mxfp4");
    let exp = load_safetensors(&src.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let mut model = base_from(&src.join("model"));
    let d = max_abs_diff(&logits(&model, &ids, None), &exp["logits"]);
    assert!(d < 1e-4, "MXFP4 experts: logits differ by {d}");

    let dir = tempfile::tempdir().unwrap();
    peft_models::save::save_hf_model(&mut model, None, dir.path(), DType::F32).unwrap();
    let written = load_safetensors(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let gate_up = &written["model.layers.0.mlp.experts.gate_up_proj"];
    assert_eq!(max_abs_diff(gate_up, &exp["gate_up_proj_0"]), 0.0);
    assert_eq!(
        written["model.layers.0.mlp.experts.gate_up_proj_bias"].dims(),
        [4, 64]
    );
    assert_eq!(
        written["model.layers.1.mlp.experts.down_proj"].dims(),
        [4, 32, 32]
    );
    assert!(!written
        .keys()
        .any(|k| k.contains("experts.0.") || k.ends_with("_blocks")));
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"));
    let back = base_from(dir.path());
    let d = max_abs_diff(&logits(&back, &ids, None), &exp["logits"]);
    assert!(d < 1e-4, "saved and read back: logits differ by {d}");

    // HF PEFT's adapter of the fixture's gpt-oss, merged, saved and read back.
    let src = fixture("gpt_oss");
    let exp = load_safetensors(&src.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let mut merged = PeftModel::load(base("gpt_oss"), &src.join("lora"))
        .unwrap()
        .merge_and_unload()
        .unwrap();
    let saved = dir.path().join("merged");
    peft_models::save::save_hf_model(&mut merged, None, &saved, DType::F32).unwrap();
    let back = base_from(&saved);
    let d = max_abs_diff(&logits(&back, &ids, None), &exp["lora_logits"]);
    assert!(
        d < 1e-4,
        "merged, saved and read back: logits differ by {d}"
    );
}

fn base_from(dir: &std::path::Path) -> Llama {
    let m = load_model(dir, &Device::Cpu, DType::F32).unwrap();
    m.into_model(&Device::Cpu, DType::F32).unwrap().0
}

/// Generation's path: a prompt, then one token at a time over the key/value cache (past
/// Gemma 3's 3-token window: the cached keys it hides must stay hidden), gives the logits of
/// one forward over the whole sequence.
#[test]
fn cached_decoding_matches_the_full_forward() {
    for &name in ARCHITECTURES {
        let exp =
            load_safetensors(&fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let peft = PeftModel::load(base(name), &fixture(name).join("lora")).unwrap();
        let model = &peft.base;
        let t = ids.dim(1).unwrap();
        let mut cache = KvCache::new(model.layers.len());
        let prompt = 4;
        let h = model
            .forward(
                &ids.narrow(1, 0, prompt).unwrap(),
                None,
                Some(&mut cache),
                false,
            )
            .unwrap();
        let mut steps = vec![model.logits(&h).unwrap()];
        for i in prompt..t {
            let h = model
                .forward(&ids.narrow(1, i, 1).unwrap(), None, Some(&mut cache), false)
                .unwrap();
            steps.push(model.logits(&h).unwrap());
        }
        let cached = Tensor::cat(&steps, 1).unwrap();
        let d = max_abs_diff(&cached, &exp["lora_logits"]);
        assert!(d < 1e-4, "{name}: cached decoding differs by {d}");
    }
}

/// Phi-3's LongRoPE past its original context (20 tokens over 16): the long factors, as
/// transformers switches to them, for the whole sequence (Phi-4-mini's over its rotated
/// pairs only).
#[test]
fn longrope_takes_its_long_factors_past_the_original_context() {
    for name in ["phi3", "phi4_mini"] {
        let exp =
            load_safetensors(&fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = exp["input_ids_long"].to_dtype(DType::U32).unwrap();
        let peft = PeftModel::load(base(name), &fixture(name).join("lora")).unwrap();
        let d = max_abs_diff(&logits(&peft.base, &ids, None), &exp["lora_logits_long"]);
        assert!(d < 1e-4, "{name}: long-context logits differ by {d}");
    }
}

/// Decoding a LongRoPE model token by token past its original context (16 of 20 tokens): at
/// the switch to the long factors the cache is dropped and the sequence fed again, as
/// transformers' Phi-3 generation does (and `peft generate`), so each later logit is the
/// long-factor forward's.
#[test]
fn longrope_decoding_recomputes_at_the_switch() {
    let exp =
        load_safetensors(&fixture("phi3").join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["input_ids_long"].to_dtype(DType::U32).unwrap();
    let peft = PeftModel::load(base("phi3"), &fixture("phi3").join("lora")).unwrap();
    let model = &peft.base;
    let mut cache = KvCache::new(model.layers.len());
    let mut switched = 0;
    for i in 0..ids.dim(1).unwrap() {
        let (start, n) = match model.rope_switches(cache.seq_len(), 1) {
            true => {
                switched += 1;
                cache.truncate(0).unwrap();
                (0, i + 1)
            }
            false => (i, 1),
        };
        let h = model
            .forward(
                &ids.narrow(1, start, n).unwrap(),
                None,
                Some(&mut cache),
                false,
            )
            .unwrap();
        let got = model.logits(&h.narrow(1, n - 1, 1).unwrap()).unwrap();
        if i >= 16 {
            let want = exp["lora_logits_long"].narrow(1, i, 1).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "token {i}: logits differ by {d}");
        }
    }
    assert_eq!(switched, 1);
}

/// Ministral 3's queries scaled past its original context (8 positions; 20 tokens cross it
/// twice), in one forward and token by token over the cache, whose positions continue.
#[test]
fn ministral3_scales_its_queries_past_the_original_context() {
    let exp = load_safetensors(
        &fixture("ministral3").join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = exp["input_ids_long"].to_dtype(DType::U32).unwrap();
    let peft = PeftModel::load(base("ministral3"), &fixture("ministral3").join("lora")).unwrap();
    let model = &peft.base;
    let d = max_abs_diff(&logits(model, &ids, None), &exp["lora_logits_long"]);
    assert!(d < 1e-4, "long-context logits differ by {d}");
    let mut cache = KvCache::new(model.layers.len());
    for i in 0..ids.dim(1).unwrap() {
        let h = model
            .forward(&ids.narrow(1, i, 1).unwrap(), None, Some(&mut cache), false)
            .unwrap();
        let got = model.logits(&h).unwrap();
        let want = exp["lora_logits_long"].narrow(1, i, 1).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "token {i}: logits differ by {d}");
    }
}

/// Phi-3's fused projections are what the default targets name: LoRA on `qkv_proj` (PEFT's
/// q and v), IA3 on `qkv_proj` and `down_proj` (its k, v and feed-forward).
#[test]
fn phi3_default_targets_are_its_fused_projections() {
    let lora = PeftModel::new(base("phi3"), peft::LoraConfig::default(), 0).unwrap();
    let keys: Vec<String> = lora.trainable().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.contains("self_attn.qkv_proj.lora_")),
        "{keys:?}"
    );
    let ia3 = peft::Ia3Model::new(base("phi3"), peft::Ia3Config::default()).unwrap();
    let keys: Vec<String> = ia3.trainable().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(
        keys.iter().any(|k| k.contains("qkv_proj")) && keys.iter().any(|k| k.contains("down_proj"))
    );
}

/// HF PEFT's conversion of targets on the mixture-of-experts models whose experts
/// transformers 5 fused: `all-linear` (or the experts' and router's old module names) becomes
/// LoRA on the attention's linear layers plus `target_parameters` on the experts and router,
/// with twice the rank and alpha for the fused gate_up_proj: the same config as HF PEFT wrote
/// for the fixtures. Qwen2-MoE is not converted (its all-linear adapts the shared expert and
/// the dense MLPs). Dropout, and half of the fused pair, are refused as in HF PEFT.
#[test]
fn experts_targets_convert_as_in_hf_peft() {
    let sorted = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v
    };
    let all_linear = || peft::LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(peft::TargetModules::parse_flag("all-linear")),
        ..Default::default()
    };
    for name in [
        "mixtral",
        "qwen3_moe",
        "glm4_moe",
        "ernie4_5_moe",
        "deepseek_v3",
        "glm4_moe_lite",
        "deepseek_v2",
    ] {
        let ours = PeftModel::new(base(name), all_linear(), 0).unwrap().config;
        let hf =
            peft::LoraConfig::from_file(&fixture(name).join("lora/adapter_config.json")).unwrap();
        let listed = |c: &peft::LoraConfig| match &c.target_modules {
            Some(peft::TargetModules::List(l)) => sorted(l.clone()),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(listed(&ours), listed(&hf), "{name}");
        assert_eq!(
            sorted(ours.target_parameters.clone().unwrap()),
            sorted(hf.target_parameters.clone().unwrap()),
            "{name}"
        );
        assert_eq!(ours.rank_pattern, hf.rank_pattern, "{name}");
        assert_eq!(ours.alpha_pattern, hf.alpha_pattern, "{name}");
    }
    // Qwen2-MoE: all-linear stays, and adapts linear layers only.
    let lora = PeftModel::new(base("qwen2_moe"), all_linear(), 0).unwrap();
    assert!(lora.config.target_parameters.is_none());
    let keys: Vec<String> = lora.trainable().into_iter().map(|(k, _)| k).collect();
    assert!(keys.iter().any(|k| k.contains("shared_expert_gate.lora_A")));
    assert!(keys
        .iter()
        .all(|k| !k.contains("experts") && !k.contains("mlp.gate.")));

    let dropout = peft::LoraConfig {
        lora_dropout: 0.05,
        ..all_linear()
    };
    let err = PeftModel::new(base("qwen3_moe"), dropout, 0).err().unwrap();
    assert!(err.to_string().contains("lora_dropout"), "{err}");
    let half = peft::LoraConfig {
        target_modules: Some(peft::TargetModules::parse_flag("q_proj,gate_proj")),
        ..all_linear()
    };
    let err = PeftModel::new(base("qwen3_moe"), half, 0).err().unwrap();
    assert!(err.to_string().contains("up_proj"), "{err}");
    // IA3's defaults name only what the model has: no down_proj where experts are the MLPs.
    let ia3 = peft::Ia3Model::new(base("qwen3_moe"), peft::Ia3Config::default()).unwrap();
    let names = |t: &Option<peft::TargetModules>| match t {
        Some(peft::TargetModules::List(l)) => l.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(names(&ia3.config.target_modules), ["k_proj", "v_proj"]);
    assert!(names(&ia3.config.feedforward_modules).is_empty());
}

/// transformers keeps only the last window of a sliding layer's cache, which prefix tuning
/// fills: refused on such models, with an error that says so; and on partial rotary ones.
#[test]
fn prefix_tuning_is_refused_on_sliding_window_models() {
    let err = peft::PromptModel::new_prefix_tuning(base("gemma3_text"), 4, 0, None)
        .err()
        .expect("prefix tuning on Gemma 3 is refused");
    assert!(err.to_string().contains("sliding-window"), "{err}");
    let err = peft::PromptModel::new_prefix_tuning(base("phi4_mini"), 4, 0, None)
        .err()
        .expect("prefix tuning on Phi-4-mini is refused");
    assert!(err.to_string().contains("partial rotary"), "{err}");
    let err = peft::PromptModel::new_prefix_tuning(base("ernie4_5"), 4, 0, None)
        .err()
        .expect("prefix tuning on ERNIE 4.5 is refused");
    assert!(err.to_string().contains("interleaved rotary"), "{err}");
    assert!(peft::PromptModel::new_prefix_tuning(base("qwen3"), 4, 0, None).is_ok());
}

/// In bf16 (what `peft train` runs in by default, where the CPU has bf16 or on a GPU), every
/// architecture with its LoRA computes the same logits up to bf16 rounding, and training's
/// forward and backward run: the f32 norm scales of Gemma, its scaled embeddings, GeGLU and
/// the windowed softmax meet bf16 activations.
#[test]
fn bf16_models_match_f32_within_rounding() {
    for &name in ARCHITECTURES {
        let exp =
            load_safetensors(&fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let base = base_in(name, DType::BF16);
        let peft = PeftModel::load(base, &fixture(name).join("lora")).unwrap();
        let got = logits(&peft.base, &ids, None).to_dtype(DType::F32).unwrap();
        let want = &exp["lora_logits"];
        let scale = max_abs(want);
        let d = max_abs_diff(&got, want);
        assert!(
            d < 0.05 * scale,
            "{name}: bf16 logits differ by {d} (scale {scale})"
        );

        let h = peft.base.forward(&ids, None, None, true).unwrap();
        let h = peft.base.head_input(&h).unwrap();
        let loss = h
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = peft.base.backward(&loss).unwrap();
        for (key, var) in peft.trainable() {
            let g = grads
                .get(var.as_tensor())
                .expect("a gradient for every LoRA tensor");
            let finite = g.to_dtype(DType::F32).unwrap().sum_all().unwrap();
            assert!(
                finite.to_scalar::<f32>().unwrap().is_finite(),
                "{name}: {key}"
            );
        }
    }
}
