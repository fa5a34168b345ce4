"""Tiny random models of each supported architecture, with an HF PEFT LoRA adapter on each.

For every architecture, crates/peft/tests/fixtures/arch/<name>/ holds:
- model/: config.json + model.safetensors as transformers' `save_pretrained` writes them;
- lora/: a LoRA adapter (all-linear, r=4, random A and B) as HF PEFT saves it;
- expected.safetensors: input_ids, the logits of the base and of the adapted model, the
  logits of a padded batch of two (input_ids_b2, attention_mask_b2, lora_logits_b2) and of a
  20-token sequence (input_ids_long, lora_logits_long);
- grads.safetensors: the gradient of every LoRA weight (under its file key) of the mean
  next-token loss of input_ids (`model(input_ids, labels=input_ids).loss`).

The weights are N(0, 0.15²), norms 1 + N(0, 0.2²): large enough that a wrong detail (a missing
bias or norm, a permuted head) moves the logits by far more than the tests' tolerance.

    .venv/bin/python scripts/hf/make_arch_fixtures.py [NAME ...]   # default: all
"""
import copy
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import (Glm4MoeConfig, Glm4MoeForCausalLM, Ernie4_5_MoeConfig,
                          DeepseekV3Config, DeepseekV3ForCausalLM, Glm4MoeLiteConfig,
                          DeepseekV2Config, DeepseekV2ForCausalLM,
                          Glm4MoeLiteForCausalLM,
                          Ernie4_5_MoeForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig,
                          GraniteConfig, GraniteForCausalLM,
                          LlamaConfig, LlamaForCausalLM,
                          MinistralConfig, MinistralForCausalLM,
                          Ministral3Config, Ministral3ForCausalLM,
                          MistralConfig, MistralForCausalLM, Mistral3Config,
                          Mistral3ForConditionalGeneration, PixtralVisionConfig,
                          Olmo2Config, Olmo2ForCausalLM,
                          Olmo3Config, Olmo3ForCausalLM,
                          MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM,
                          Phi3Config, Phi3ForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
                          GptOssConfig, GptOssForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          SmolLM3Config, SmolLM3ForCausalLM)

common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6)
models = {
    # Biases everywhere and Llama 3.1 rope scaling.
    "llama_biases": (LlamaForCausalLM, LlamaConfig(
        **common, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    # Mistral 7B v0.1's sliding window on every layer (3 over 8 tokens here).
    "mistral": (MistralForCausalLM, MistralConfig(**common, tie_word_embeddings=False,
                                                  sliding_window=3)),
    # q/k/v biases, tied embeddings.
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True)),
    # Per-head q/k norms and a head_dim that is not hidden / heads (4 × 16 = 64 ≠ 32).
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)),
    # Qwen 3 with YaRN (its long-context setting): over the 8 pairs of a 16-dim head with
    # base 100 and 64 original positions, the first pair keeps its frequency, the last three
    # are divided by the factor and the four between are blended; cos and sin scaled by
    # 1 + 0.1 ln 2.
    "qwen3_yarn": (Qwen3ForCausalLM, Qwen3Config(
        **common, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0,
                         "original_max_position_embeddings": 64})),
    # SmolLM3: a layer without RoPE (every second here; every fourth in the released model).
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config(
        **common, no_rope_layer_interval=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    # Granite: its four multipliers (score scale, embeddings, residual branches, logits).
    "granite": (GraniteForCausalLM, GraniteConfig(
        **common, tie_word_embeddings=True, pad_token_id=0, attention_multiplier=0.3,
        embedding_multiplier=4.0, residual_multiplier=0.6, logits_scaling=2.5)),
    # OLMo 2: no norms before the attention and the MLP, norms of their outputs instead, and
    # q/k norms over the whole projections (not per head), attention biases.
    "olmo2": (Olmo2ForCausalLM, Olmo2Config(
        **common, tie_word_embeddings=False, pad_token_id=0, attention_bias=True)),
    # OLMo 3: OLMo 2's layer, a sliding window (3 over 8 tokens) on the first layer, YaRN on
    # the global one alone (the sliding one rotates by the plain RoPE of the same base).
    "olmo3": (Olmo3ForCausalLM, Olmo3Config(
        **common, tie_word_embeddings=False, pad_token_id=0, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 100.0,
                                            "factor": 2.0, "original_max_position_embeddings": 64},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # Gemma 2: Gemma 3's layer without q/k norms, every other layer sliding (window 3 over 8
    # tokens, the first one sliding), and soft caps of the attention scores and the logits,
    # small enough here to change them (the script checks that they do).
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(
        **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
        attn_logit_softcapping=0.8, final_logit_softcapping=2.5)),
    # Gemma 3: (1 + w) norms, four norms per layer, q/k norms, scaled embeddings, GeGLU, a
    # query_pre_attn_scalar that is not head_dim, sliding-window layers (window 3 over 8
    # tokens) with their own RoPE base, and linear RoPE scaling on the global layer.
    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig(
        **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # Gemma 3's image-text model (gemma-3-4b and up): the language model of gemma3_text above
    # under `language_model` (its text_config), beside a small SigLIP vision tower and the
    # projector, which text never reaches. HF PEFT's all-linear adapts the tower too; its
    # B matrices there (and in the projector) are zeroed below, as text-only training leaves them.
    "gemma3": (Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          image_size=28, patch_size=14),
        mm_tokens_per_image=4)),
    # Ministral 8B (2410): Mistral's layer, its layer_types choosing the sliding layers (the
    # first here, window 3 over 8 tokens); transformers needs its head_dim given.
    "ministral": (MinistralForCausalLM, MinistralConfig(
        **common, head_dim=8, tie_word_embeddings=False, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"])),
    # Ministral 3's language model: Mistral's layer with YaRN, and Llama 4's scaling of the
    # queries past the original context (8 positions here: `ids_long`, 20 tokens, crosses
    # it twice; beta 0.5 where the released models take 0.1, so that it shows).
    "ministral3": (Ministral3ForCausalLM, Ministral3Config(
        **common, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.5})),
    # Mistral 3's image-text model (Mistral Small 3.1 and 3.2, Magistral Small): a Mistral
    # language model (no window, head_dim 16 with 4 heads over a width of 32, as 128 with 32
    # over 5120 there) under `language_model`, beside a small Pixtral tower and the projector
    # (whose linear layers HF PEFT's all-linear adapts too: B zeroed below, as for the tower).
    "mistral3": (Mistral3ForConditionalGeneration, Mistral3Config(
        text_config=MistralConfig(**common, head_dim=16, sliding_window=None,
                                  tie_word_embeddings=False),
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          head_dim=8, image_size=28, patch_size=14),
        tie_word_embeddings=False)),
    # Phi-3: fused qkv_proj and gate_up_proj, a sliding window (5 over 8 tokens) on every
    # layer, LongRoPE (short factors within the original 16 positions; `ids_long`, 20 tokens,
    # takes the long ones) with its attention factor.
    "phi3": (Phi3ForCausalLM, Phi3Config(
        **common, sliding_window=5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.3, 2.1, 3.7],
                         "long_factor": [1.5, 2.9, 6.2, 11.0],
                         "original_max_position_embeddings": 16})),
    # Phi-4-mini's shape: partial rotary (6 of each head's 8 dims rotated, the first ones),
    # LongRoPE over the rotated pairs, tied embeddings, no window.
    "phi4_mini": (Phi3ForCausalLM, Phi3Config(
        **common, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75, "short_factor": [1.0, 1.6, 2.9],
                         "long_factor": [1.4, 3.1, 7.5], "original_max_position_embeddings": 16})),
    # Mixtral: Mistral's layer (a window of 3 over 8 tokens) with a mixture of 4 experts, 2
    # per token, renormalized over the two (`block_sparse_moe`, experts w1, w3, w2).
    "mixtral": (MixtralForCausalLM, MixtralConfig(
        **{**common, "intermediate_size": 24}, tie_word_embeddings=False, sliding_window=3,
        num_local_experts=4, num_experts_per_tok=2)),
    # Qwen3-MoE: Qwen3's per-head q/k norms, 6 experts of 16, 2 per token, renormalized.
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, head_dim=16, tie_word_embeddings=False, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)),
    # Qwen2-MoE: q/k/v biases, 4 experts of 16, 3 per token, not renormalized, and a shared
    # expert behind a sigmoid gate (both linear layers that all-linear adapts); the second
    # layer dense (mlp_only_layers), with its MLP of intermediate_size.
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **common, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=3,
        moe_intermediate_size=16, shared_expert_intermediate_size=20, mlp_only_layers=[1])),
    # OLMoE: q/k norms over the whole projections (norms before the sublayers, as Llama's),
    # 4 experts, 2 per token, not renormalized.
    "olmoe": (OlmoeForCausalLM, OlmoeConfig(
        **{**common, "intermediate_size": 16}, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=2, num_experts=4, num_experts_per_tok=2)),
}
# Qwen2.5-VL and Qwen3-VL: Qwen2's and Qwen3's layers under `language_model` (their
# multimodal RoPE split into three sections, one position grid on text alone), beside small
# vision towers (`visual`, which HF PEFT's all-linear adapts too: B zeroed below). Qwen2.5-VL's
# files keep the language model where a causal LM keeps it (`model.layers`, `visual`).
qwen_vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32)
models["qwen2_5_vl"] = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
    text_config=dict(**common, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                      "rope_theta": 10000.0}),
    vision_config=dict(**qwen_vision, fullatt_block_indexes=[0]), tie_word_embeddings=False))
models["qwen3_vl"] = (Qwen3VLForConditionalGeneration, Qwen3VLConfig(
    text_config=dict(**common, head_dim=16, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                      "mrope_interleaved": True, "rope_theta": 5000.0}),
    vision_config=dict(**qwen_vision, deepstack_visual_indexes=[0], num_position_embeddings=16),
    tie_word_embeddings=False))
# Qwen3-VL-MoE: Qwen3-MoE's layer (4 experts of 12, 2 per token, always renormalized) under
# `language_model`, its files holding each layer's experts stacked (`mlp.experts.gate_up_proj`);
# HF PEFT's all-linear takes the attention (and the tower) there.
models["qwen3_vl_moe"] = (Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeConfig(
    text_config=dict(**common, head_dim=16, tie_word_embeddings=False, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=12,
                     rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                      "mrope_interleaved": True, "rope_theta": 5000.0}),
    vision_config=dict(**qwen_vision, deepstack_visual_indexes=[0], num_position_embeddings=16),
    tie_word_embeddings=False))
# gpt-oss: attention sinks (large here, so that they matter), biases on q/k/v/o, a window of 3
# on the first layer, YaRN (truncate false), 4 experts of 16 with biases, 2 per token (the
# softmax of the two logits), gate and up interleaved in the stacked gate_up_proj, and the
# clamped SwiGLU with a limit small enough (0.8; gpt-oss's is 7) that it clamps here.
# HF PEFT's all-linear takes the attention alone there (its router and experts are no linear
# layers): target_parameters adds LoRA on the router's weight and the experts.
models["gpt_oss"] = (GptOssForCausalLM, GptOssConfig(
    **{**common, "intermediate_size": 16}, head_dim=8, tie_word_embeddings=False,
    num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
    layer_types=["sliding_attention", "full_attention"], swiglu_limit=0.8,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 16}))
# ERNIE 4.5: RoPE over adjacent dims (2i, 2i + 1), computed in f32, biases on every linear
# layer (`use_bias`), tied embeddings.
models["ernie4_5"] = (Ernie4_5ForCausalLM, Ernie4_5Config(
    **common, head_dim=16, use_bias=True, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
# GLM-4.5: sigmoid routing with a correction bias (random here) choosing within the best of
# two groups of experts, weights renormalized and scaled; a shared expert; the first layer
# dense; per-head q/k norms, q/k/v biases, RoPE on half of each head's dims.
models["glm4_moe"] = (Glm4MoeForCausalLM, Glm4MoeConfig(
    **common, head_dim=16, tie_word_embeddings=False, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=2,
    topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
    use_qk_norm=True, attention_bias=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                     "partial_rotary_factor": 0.5}))
# ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B's layer): a softmax router in f32 whose choice adds a
# correction bias (`moe_statics`), weights renormalized; shared experts; the first layer dense;
# RoPE over adjacent dims.
models["ernie4_5_moe"] = (Ernie4_5_MoeForCausalLM, Ernie4_5_MoeConfig(
    **common, head_dim=16, tie_word_embeddings=False, moe_num_experts=8, moe_k=2,
    moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
# DeepSeek-V3's multi-head latent attention: queries through a low-rank projection and its
# norm, keys and values from a shared latent (with its norm; both norms with their class's
# epsilon, 1e-6, not the config's, 1e-3 here) and one rotated key head; heads
# of 8 unrotated and 4 rotated dims (RoPE over interleaved pairs), values of 6; YaRN whose
# mscale_all_dim also scales the scores. GLM-4.5's routing (a random correction, two groups,
# scale 2.5), a shared expert, the first layer dense.
models["deepseek_v3"] = (DeepseekV3ForCausalLM, DeepseekV3Config(
    **{**common, "num_key_value_heads": 4, "rms_norm_eps": 1e-3}, tie_word_embeddings=False,
    q_lora_rank=16,
    kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=2,
    topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 32, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}))
# GLM-4.7-Flash's: DeepSeek-V3's layers with queries straight from a projection (no low rank
# here), values as wide as the query-key heads, dense layers by mlp_layer_types.
models["glm4_moe_lite"] = (Glm4MoeLiteForCausalLM, Glm4MoeLiteConfig(
    **{**common, "num_key_value_heads": 4, "rms_norm_eps": 1e-3}, tie_word_embeddings=False,
    q_lora_rank=None,
    kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
    routed_scaling_factor=1.8, mlp_layer_types=["dense", "sparse"],
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
# DeepSeek-V2's (V2-Lite's layout): latent attention with plain queries, RoPE over adjacent
# pairs (as complex numbers), YaRN with DeepSeek's mscale pair; a softmax router in f32 whose
# top-k, limited to the best group of two (a group scored by its best), weigh the experts
# unrenormalized, scaled by 2.
models["deepseek_v2"] = (DeepseekV2ForCausalLM, DeepseekV2Config(
    **{**common, "num_key_value_heads": 4, "rms_norm_eps": 1e-3}, tie_word_embeddings=False,
    q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
    topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=2.0,
    first_k_dense_replace=1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 32, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}))
lora_parameters = {"gpt_oss": ["mlp.router.weight", "mlp.experts.gate_up_proj",
                               "mlp.experts.down_proj"]}
# HF PEFT's all-linear on Mixtral, Qwen3-MoE and OLMoE also puts LoRA on the experts' stacked
# parameters and the router's weight (target_parameters, gate_up_proj with twice the rank),
# as it does on Mixtral's and Qwen3-MoE's here; OLMoE's adapter takes the attention alone, so
# that a block of frozen experts (one fused op in peft-rs) is checked too.
lora_targets = {"olmoe": ["q_proj", "k_proj", "v_proj", "o_proj"]}
if len(sys.argv) > 1:
    models = {name: models[name] for name in sys.argv[1:]}

ids = torch.tensor([[1, 5, 9, 33, 60, 2, 17, 40]])
ids_long = torch.tensor([[(7 * i + 3) % 64 for i in range(20)]])
ids_b2 = torch.tensor([[0, 0, 0, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9, 10]])
mask_b2 = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])

for name, (cls, cfg) in models.items():
    out = f"crates/peft/tests/fixtures/arch/{name}"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("sinks"):
                p.copy_(1.0 + torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn_like(b))
    model.save_pretrained(f"{out}/model")
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        caps = ["attn_logit_softcapping", "final_logit_softcapping"]
        for cap in [c for c in caps if getattr(cfg, c, None) is not None]:
            # A cap that changes nothing would not test its implementation.
            uncapped_cfg = copy.deepcopy(cfg)
            setattr(uncapped_cfg, cap, None)
            uncapped_model = cls(uncapped_cfg).eval()
            uncapped_model.load_state_dict(model.state_dict())
            uncapped = uncapped_model(input_ids=ids).logits
            assert (uncapped - base_logits).abs().max() > 0.1, cap
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type") == "yarn":
            # Nor would a YaRN that changed nothing.
            plain_cfg = copy.deepcopy(cfg)
            kept = ("rope_theta", "llama_4_scaling_beta", "original_max_position_embeddings")
            plain_cfg.rope_parameters = {"rope_type": "default",
                                         **{k: v for k, v in rope.items() if k in kept}}
            plain_model = cls(plain_cfg).eval()
            plain_model.load_state_dict(model.state_dict())
            plain = plain_model(input_ids=ids).logits
            assert (plain - base_logits).abs().max() > 0.1, "yarn"
        if "llama_4_scaling_beta" in rope:
            # Nor a query scaling that changed nothing (it starts past the original context).
            unscaled_cfg = copy.deepcopy(cfg)
            unscaled_cfg.rope_parameters = {**rope, "llama_4_scaling_beta": 0.0}
            unscaled_model = cls(unscaled_cfg).eval()
            unscaled_model.load_state_dict(model.state_dict())
            unscaled = unscaled_model(input_ids=ids_long).logits
            scaled = model(input_ids=ids_long).logits
            assert (unscaled - scaled).abs().max() > 0.1, "llama_4_scaling_beta"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets.get(name, "all-linear"),
                      target_parameters=lora_parameters.get(name), init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            outside = ("vision_tower", "multi_modal_projector", "visual")
            if any(part in pname for part in outside) and "lora_B" in pname:
                p.zero_()
    peft_model.save_pretrained(f"{out}/lora")
    os.remove(f"{out}/lora/README.md")
    with torch.no_grad():
        lora_logits = peft_model(input_ids=ids).logits
        lora_logits_b2 = peft_model(input_ids=ids_b2, attention_mask=mask_b2).logits
        lora_logits_long = peft_model(input_ids=ids_long).logits
    assert (lora_logits - base_logits).abs().max() > 0.1
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters()
             if p.requires_grad and p.grad is not None}
    save_file(grads, f"{out}/grads.safetensors")
    save_file({"input_ids": ids, "base_logits": base_logits.contiguous(),
               "lora_logits": lora_logits.contiguous(), "input_ids_b2": ids_b2,
               "attention_mask_b2": mask_b2, "lora_logits_b2": lora_logits_b2.contiguous(),
               "input_ids_long": ids_long, "lora_logits_long": lora_logits_long.contiguous()},
              f"{out}/expected.safetensors")
    print("written", out, sorted(os.listdir(f"{out}/model")), sorted(os.listdir(f"{out}/lora")))
