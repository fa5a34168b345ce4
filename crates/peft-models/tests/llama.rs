use candle_core::{DType, Device, IndexOp, Tensor};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_models::KvCache;

/// Decoding token by token with the cache gives the same last hidden state as one full pass.
#[test]
fn kv_cache_matches_full_forward() {
    let model = tiny_llama(3, true).unwrap();
    let ids: Vec<u32> = vec![5, 9, 13, 2, 40, 41];
    let full = model
        .forward(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            None,
            false,
        )
        .unwrap();
    let mut cache = KvCache::new(2);
    let prompt = Tensor::new(&ids[..3], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&prompt, None, Some(&mut cache), false)
        .unwrap();
    let mut last = None;
    for &t in &ids[3..] {
        let x = Tensor::new(&[t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        last = Some(model.forward(&x, None, Some(&mut cache), false).unwrap());
    }
    assert_eq!(cache.seq_len(), 6);
    let diff = max_abs_diff(&full.i((0, 5)).unwrap(), &last.unwrap().i((0, 0)).unwrap());
    assert!(diff < 1e-5, "{diff}");
}

/// Right padding with an attention mask leaves the real tokens' outputs unchanged.
#[test]
fn padding_mask_keeps_real_tokens_exact() {
    let model = tiny_llama(4, false).unwrap();
    let real = Tensor::new(&[[7u32, 8, 9]], &Device::Cpu).unwrap();
    let padded = Tensor::new(&[[7u32, 8, 9, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let a = model.forward(&real, None, None, false).unwrap();
    let b = model
        .forward(&padded, Some(&mask), None, false)
        .unwrap()
        .narrow(1, 0, 3)
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-5, "{diff}");
    assert_eq!(model.embed_tokens.dtype(), DType::F32);
}

/// Two sequences packed into one row (segment ids 1, 2, then padding) give each sequence the
/// outputs it has alone: positions restart and attention does not cross the boundary, also
/// for sequences behind a key/value cache (prefix tuning's layout).
#[test]
fn packed_sequences_are_computed_as_if_alone() {
    let model = tiny_llama(6, true).unwrap();
    let dev = Device::Cpu;
    let first = Tensor::new(&[[5u32, 9, 13, 2]], &dev).unwrap();
    let second = Tensor::new(&[[21u32, 4, 30]], &dev).unwrap();
    let packed = Tensor::new(&[[5u32, 9, 13, 2, 21, 4, 30, 0]], &dev).unwrap();
    let segments = Tensor::new(&[[1u32, 1, 1, 1, 2, 2, 2, 0]], &dev).unwrap();
    let alone = |ids: &Tensor| model.forward(ids, None, None, false).unwrap();
    let out = model
        .forward(&packed, Some(&segments), None, false)
        .unwrap();
    let d1 = max_abs_diff(&alone(&first), &out.narrow(1, 0, 4).unwrap());
    let d2 = max_abs_diff(&alone(&second), &out.narrow(1, 4, 3).unwrap());
    assert!(d1 < 1e-5 && d2 < 1e-5, "{d1} {d2}");
    // Without segment ids the second sequence sees the first: the outputs differ.
    let mut ones = Tensor::ones((1, 8), DType::U32, &dev).unwrap();
    let crossed = model.forward(&packed, Some(&ones), None, false).unwrap();
    assert!(max_abs_diff(&alone(&second), &crossed.narrow(1, 4, 3).unwrap()) > 1e-3);

    // Behind a cache of two positions that every sequence sees.
    let prefix = Tensor::new(&[[17u32, 3]], &dev).unwrap();
    let cached = |ids: &Tensor, mask: Option<&Tensor>| {
        let mut cache = KvCache::new(model.layers.len());
        model
            .forward(&prefix, None, Some(&mut cache), false)
            .unwrap();
        model.forward(ids, mask, Some(&mut cache), false).unwrap()
    };
    ones = Tensor::ones((1, 2), DType::U32, &dev).unwrap();
    let with_prefix = Tensor::cat(&[&ones, &segments], 1).unwrap();
    let out = cached(&packed, Some(&with_prefix));
    let d1 = max_abs_diff(&cached(&first, None), &out.narrow(1, 0, 4).unwrap());
    let d2 = max_abs_diff(&cached(&second, None), &out.narrow(1, 4, 3).unwrap());
    assert!(d1 < 1e-5 && d2 < 1e-5, "{d1} {d2}");
}

#[test]
fn wrong_weight_shape_is_a_clear_error() {
    let err =
        peft_models::LlamaConfig::from_json(serde_json::json!({"hidden_size": 8})).unwrap_err();
    assert!(format!("{err:#}").contains("Llama-family"), "{err:#}");
}

/// gemma-3-4b-it's config.json: its text_config gives five values and leaves the others to
/// Gemma3TextConfig's class defaults, as transformers 5.24 reads them (checked there:
/// vocab 262208, 8 heads of 256, 4 key-value heads, query_pre_attn_scalar 256, every sixth
/// layer global with linear RoPE scaling 8 over base 1e6, local base 1e4, tied by the top level).
#[test]
fn gemma3_image_text_config_takes_the_class_defaults() {
    let raw = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        },
        "torch_dtype": "bfloat16",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false}
    });
    let c = peft_models::LlamaConfig::from_json(raw.clone()).unwrap();
    assert_eq!(c.decoder_path(), "model.language_model");
    assert_eq!(c.image_text.as_ref(), Some(&raw));
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.head_dim),
        (262_208, 2560, 34, 256)
    );
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (8, 4));
    assert_eq!(c.attention_scale, 1.0 / 16.0);
    assert_eq!((c.rms_norm_eps, c.max_position_embeddings), (1e-6, 131_072));
    assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
    assert_eq!(c.rope_linear_factor, Some(8.0));
    let windows: Vec<Option<usize>> = c.layer_windows[..6].to_vec();
    assert_eq!(
        windows,
        [
            Some(1024),
            Some(1024),
            Some(1024),
            Some(1024),
            Some(1024),
            None
        ]
    );
    assert!(c.tie_word_embeddings && c.norm_adds_one);

    // The top level decides the tying, as in transformers.
    let mut untied = raw.clone();
    untied["tie_word_embeddings"] = false.into();
    untied["text_config"]["tie_word_embeddings"] = true.into();
    assert!(
        !peft_models::LlamaConfig::from_json(untied)
            .unwrap()
            .tie_word_embeddings
    );
    // Other image-text models are named, not misread.
    let mut other = raw;
    other["model_type"] = "llama4".into();
    let err = peft_models::LlamaConfig::from_json(other).unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported model_type \"llama4\""),
        "{err}"
    );
}

/// NEFTune perturbs the training embeddings only, by noise uniform within
/// ±alpha/sqrt(seq·hidden) (transformers' `neftune_post_forward_hook`), drawn from the seed.
#[test]
fn neftune_noise_is_bounded_seeded_and_training_only() {
    let mut model = tiny_llama(3, true).unwrap();
    let ids = Tensor::new(
        &[[1u32, 5, 9, 2, 7, 7, 3, 4], [4, 4, 8, 1, 0, 2, 6, 5]],
        &Device::Cpu,
    )
    .unwrap();
    let clean = model.input_embeds(&ids, true).unwrap();
    let neftune = peft_models::Neftune::new(5.0).unwrap();
    model.neftune = Some(neftune.clone());
    let (_, seq, hidden) = clean.dims3().unwrap();
    let bound = 5.0 / ((seq * hidden) as f64).sqrt();
    let noise_of = |seed: u64| -> Vec<f32> {
        neftune.set_seed(seed);
        let noisy = model.input_embeds(&ids, true).unwrap();
        (noisy - &clean)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let noise = noise_of(1);
    let largest = noise.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    assert!(largest <= bound * (1.0 + 1e-6), "{largest} beyond {bound}");
    assert!(
        largest > 0.9 * bound,
        "{largest} far below {bound}: not the full range"
    );
    let mean_square = noise.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / noise.len() as f64;
    let uniform = bound * bound / 3.0;
    assert!(
        (mean_square / uniform - 1.0).abs() < 0.1,
        "{mean_square} vs {uniform}"
    );
    assert_eq!(noise_of(1), noise, "the same seed draws the same noise");
    assert_ne!(noise_of(2), noise);
    let eval = model.input_embeds(&ids, false).unwrap();
    assert_eq!(
        max_abs_diff(&eval, &clean),
        0.0,
        "no noise outside training"
    );
    assert!(peft_models::Neftune::new(0.0).is_err());
}

/// A config that ties the head while the checkpoint stores a head of its own: as transformers
/// 5 loads it, a head equal to the embedding stays tied, one that differs is the model's head
/// (and the config saved with the model then says so).
#[test]
fn a_stored_head_that_differs_unties_the_model() {
    let config = peft_models::LlamaConfig::from_json(serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "tie_word_embeddings": true,
    }))
    .unwrap();
    let mut rng = peft_models::testing::SeededNormal::new(5);
    let weights = peft_models::shapes::llama_weights(&config, |_, shape| {
        rng.tensor(shape, 0.2, &Device::Cpu)
    })
    .unwrap();
    let embed = weights["model.embed_tokens.weight"].clone();
    let load = |head: Tensor| {
        let mut w = weights.clone();
        w.insert("lm_head.weight".into(), head);
        peft_models::Llama::from_weights(config.clone(), w, &Device::Cpu, DType::F32).unwrap()
    };
    let same = load(embed.clone());
    assert!(same.lm_head.is_none() && same.config.tie_word_embeddings);
    let other = (embed.clone() * 2.0).unwrap();
    let untied = load(other.clone());
    assert!(!untied.config.tie_word_embeddings);
    assert_eq!(untied.config.raw["tie_word_embeddings"], false);
    assert_eq!(max_abs_diff(&untied.lm_head_weight().unwrap(), &other), 0.0);
    let ids = Tensor::new(&[[3u32, 9, 27]], &Device::Cpu).unwrap();
    let logits = |m: &peft_models::Llama| m.logits(&m.forward(&ids, None, None, false).unwrap());
    let (tied_logits, untied_logits) = (logits(&same).unwrap(), logits(&untied).unwrap());
    assert!(max_abs_diff(&tied_logits, &untied_logits) > 1e-3);
}

/// A Mistral 3 `text_config` takes MistralConfig's class defaults for what it leaves out (as
/// transformers reads it: a window of 4096, eps 1e-6), and null where it says null; one of
/// Ministral 3 takes Ministral3Config's.
#[test]
fn mistral3_text_config_takes_mistral_defaults() {
    let raw = serde_json::json!({
        "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision_config": {"model_type": "pixtral"},
    });
    let c = peft_models::LlamaConfig::from_json(raw.clone()).unwrap();
    assert_eq!(c.decoder_path(), "model.language_model");
    assert_eq!((c.vocab_size, c.intermediate_size), (32_000, 14_336));
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.layer_windows, [Some(4096), Some(4096)]);
    let mut no_window = raw.clone();
    no_window["text_config"]["sliding_window"] = serde_json::Value::Null;
    let c = peft_models::LlamaConfig::from_json(no_window).unwrap();
    assert_eq!(c.layer_windows, [None, None]);
    // Ministral 3: Ministral3Config's YaRN and query scaling where its file says nothing.
    let mut ministral = raw.clone();
    ministral["text_config"]["model_type"] = "ministral3".into();
    let c = peft_models::LlamaConfig::from_json(ministral).unwrap();
    let yarn = c.yarn.unwrap();
    assert_eq!(
        (yarn.factor, yarn.original_max_position_embeddings),
        (16.0, 16_384)
    );
    let scaling = c.query_scaling.unwrap();
    assert_eq!(scaling.beta, 0.1);
    assert_eq!(scaling.factor(16_383), 1.0);
    assert!((scaling.factor(40_000) - (1.0 + 0.1 * 3f64.ln())).abs() < 1e-12);
    let mut other = raw;
    other["text_config"]["model_type"] = "qwen2".into();
    let err = peft_models::LlamaConfig::from_json(other).unwrap_err();
    assert!(err.to_string().contains("expected one of"), "{err}");
}

/// Mixture-of-experts configs: Qwen3-30B-A3B's fields, the dense layers Qwen's
/// `mlp_only_layers` and `decoder_sparse_step` leave, Mixtral's module names and its always
/// renormalized weights, and the training options that are refused by name.
#[test]
fn mixture_of_experts_configs() {
    let qwen3 = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 100, "num_experts": 128, "num_experts_per_tok": 8,
        "moe_intermediate_size": 24, "norm_topk_prob": true, "decoder_sparse_step": 2,
        "mlp_only_layers": [3], "output_router_logits": false,
    });
    let c = peft_models::LlamaConfig::from_json(qwen3.clone()).unwrap();
    let moe = c.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.expert_size), (128, 8, 24));
    assert!(moe.norm_topk_prob && moe.shared_expert_size.is_none());
    // Qwen3MoeConfig's router_aux_loss_coef where the file leaves it out.
    assert_eq!(moe.router_aux_loss_coef, 0.001);
    // Layers 1 and 3 are sparse by the step; 3 is dense by mlp_only_layers.
    assert_eq!(moe.sparse_layers, [false, true, false, false]);
    assert_eq!(moe.router_path(), "mlp.gate");
    assert_eq!(moe.expert_paths(5)[2], "mlp.experts.5.down_proj");
    let names = |l: usize| -> Vec<&str> { c.layer_linears(l).iter().map(|l| l.name).collect() };
    assert_eq!(
        names(1).len(),
        4,
        "a sparse layer's linears: the attention's"
    );
    assert_eq!(
        names(0)[4..],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    );
    assert_eq!(
        c.layer_linears(0)[4].out,
        96,
        "a dense layer's MLP of intermediate_size"
    );

    let mixtral = serde_json::json!({
        "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
        "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
        "output_router_logits": true,
    });
    let c = peft_models::LlamaConfig::from_json(mixtral).unwrap();
    let moe = c.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.expert_size), (8, 96));
    assert_eq!(moe.router_aux_loss_coef, 0.02);
    assert!(moe.norm_topk_prob);
    assert_eq!(moe.router_path(), "block_sparse_moe.gate");
    assert_eq!(
        moe.expert_paths(1),
        [
            "block_sparse_moe.experts.1.w1",
            "block_sparse_moe.experts.1.w3",
            "block_sparse_moe.experts.1.w2"
        ]
    );
    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-5));

    // GLM-4.5 by its class defaults: half of each head's dims rotated, the first layer
    // dense, one ungated shared expert, o_proj without the attention's biases.
    let glm = serde_json::json!({
        "model_type": "glm4_moe", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 100, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "moe_intermediate_size": 24, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "attention_bias": true, "use_qk_norm": true,
    });
    let c = peft_models::LlamaConfig::from_json(glm.clone()).unwrap();
    let moe = c.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.expert_size), (16, 4, 24));
    assert_eq!(moe.sparse_layers, [false, true, true]);
    assert_eq!(
        moe.scoring,
        peft_ops::Scoring::Sigmoid {
            n_group: 4,
            topk_group: 2,
            scale: 2.5
        }
    );
    assert_eq!(moe.shared_expert_size, Some(24));
    assert_eq!(moe.router_aux_loss_coef, 0.0);
    assert_eq!(c.rotary_dim, 16);
    assert!(c.qkv_bias && !c.o_bias);
    assert_eq!(c.qk_norm_sizes(), Some([32, 32]));
    let names = |l: usize| -> Vec<&str> { c.layer_linears(l).iter().map(|l| l.name).collect() };
    assert_eq!(
        names(1)[4..],
        [
            "mlp.shared_experts.gate_proj",
            "mlp.shared_experts.up_proj",
            "mlp.shared_experts.down_proj"
        ]
    );
    // ERNIE 4.5 MoE: experts from moe_layer_start_index to the last layer (-1), every
    // moe_layer_interval-th; its correction of the choice beside the router.
    let ernie = serde_json::json!({
        "model_type": "ernie4_5_moe", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 24,
        "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": -1,
        "moe_layer_interval": 2,
    });
    let c = peft_models::LlamaConfig::from_json(ernie).unwrap();
    let moe = c.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.expert_size), (8, 2, 24));
    assert_eq!(moe.sparse_layers, [false, true, false, true, false]);
    assert_eq!(moe.scoring, peft_ops::Scoring::Softmax);
    assert!(moe.norm_topk_prob && c.tie_word_embeddings);
    assert_eq!(moe.shared_expert_size, Some(48));
    assert_eq!(moe.router_aux_loss_coef, 0.001);
    assert_eq!(
        moe.choice_bias.unwrap().path(),
        "mlp.moe_statics.e_score_correction_bias"
    );

    // DeepSeek-V3's latent attention: heads of the unrotated and rotated dims, a key and a
    // value head per query head; the linears it adds under their names; the scores scaled by
    // YaRN's mscale_all_dim factor squared.
    let deepseek = serde_json::json!({
        "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 100, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 64, "mscale": 1.0,
                            "mscale_all_dim": 1.0},
    });
    let c = peft_models::LlamaConfig::from_json(deepseek).unwrap();
    assert_eq!(
        (c.head_dim, c.rotary_dim, c.num_key_value_heads),
        (24, 8, 4)
    );
    assert_eq!(
        c.moe.as_ref().unwrap().sparse_layers,
        [false, false, false, true]
    );
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((c.attention_scale - m * m / 24f64.sqrt()).abs() < 1e-12);
    let names = |l: usize| -> Vec<&str> { c.layer_linears(l).iter().map(|l| l.name).collect() };
    assert_eq!(
        names(0)[..5],
        [
            "self_attn.q_a_proj",
            "self_attn.q_b_proj",
            "self_attn.kv_a_proj_with_mqa",
            "self_attn.kv_b_proj",
            "self_attn.o_proj"
        ]
    );
    assert_eq!(c.layer_linears(0)[3].out, 4 * (16 + 12));
    // DeepSeek-V2's routing: a softmax limited to the best groups, never renormalized.
    let v2 = serde_json::json!({
        "model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
        "q_lora_rank": null, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 16.0, "norm_topk_prob": true,
    });
    let c = peft_models::LlamaConfig::from_json(v2.clone()).unwrap();
    let moe = c.moe.as_ref().unwrap();
    let limited = peft_ops::Scoring::LimitedSoftmax {
        n_group: 4,
        topk_group: 2,
        scale: 16.0,
    };
    assert_eq!(moe.scoring, limited);
    assert!(!moe.norm_topk_prob && !moe.has_load_balancing_loss());
    assert_eq!(moe.sparse_layers, [true, true]);
    assert_eq!(c.attention_projections()[0], "q_proj");
    let mut bad = v2;
    bad["topk_method"] = serde_json::json!("noaux_tc");
    let err = peft_models::LlamaConfig::from_json(bad).unwrap_err();
    assert!(err.to_string().contains("noaux_tc"), "{err}");

    let mut bad = glm.clone();
    bad["topk_group"] = serde_json::json!(1);
    bad["num_experts_per_tok"] = serde_json::json!(5);
    let err = peft_models::LlamaConfig::from_json(bad).unwrap_err();
    assert!(err.to_string().contains("topk_group"), "{err}");

    for (key, value, named) in [
        (
            "router_jitter_noise",
            serde_json::json!(0.01),
            "router_jitter_noise",
        ),
        ("clip_qkv", serde_json::json!(8.0), "clip_qkv"),
        (
            "num_experts_per_tok",
            serde_json::json!(200),
            "num_experts_per_tok",
        ),
    ] {
        let mut raw = qwen3.clone();
        raw[key] = value;
        let err = peft_models::LlamaConfig::from_json(raw).unwrap_err();
        assert!(err.to_string().contains(named), "{key}: {err}");
    }
}

/// Qwen2.5-VL's released config keeps the language model's fields at the top level (no
/// text_config) with `rope_scaling: {"type": "mrope"}`; transformers reads it as the text
/// config, and so does peft-rs: Qwen2's layer, untied by the class's default, the plain RoPE
/// on text.
#[test]
fn qwen2_5_vl_flat_config_is_its_text_config() {
    let raw = serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {"depth": 1, "hidden_size": 16},
    });
    let c = peft_models::LlamaConfig::from_json(raw).unwrap();
    assert_eq!(c.model_type, "qwen2_5_vl_text");
    assert_eq!(c.decoder_path(), "model.language_model");
    assert!(c.qkv_bias && !c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 1e6);
    assert!(c.rope_scaling.is_none() && c.yarn.is_none());
    let qwen3 = serde_json::json!({
        "model_type": "qwen3_vl",
        "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                        "vocab_size": 100},
    });
    let c = peft_models::LlamaConfig::from_json(qwen3).unwrap();
    assert_eq!(c.qk_norm, peft_models::config::QkNorm::PerHead);
    assert_eq!(c.rope_theta, 5e6);
}
