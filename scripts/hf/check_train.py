"""Trains a LoRA with `peft train` on small random models of the families whose layers differ
most from Llama's, and checks each in HF PEFT.

The models: 6 layers, hidden 64, SmolLM2's tokenizer and chat template, saved by transformers:
Gemma 3 (five sliding-window layers with a window of 16, one global), Gemma 2 (every other
layer sliding, the same window, soft caps of the scores and logits small enough to change
them), SmolLM3 (the fourth layer without RoPE), Granite (its four multipliers), OLMo 2
(output norms, q/k norms over the whole projections), OLMo 3 (OLMo 2's layers, three of
four sliding with a window of 16, YaRN on the global ones), Qwen3 with YaRN,
Phi-4-mini's shape (partial rotary, fused projections, tied embeddings) and the
mixture-of-experts families: Mixtral (8 experts, 2 per token), Qwen3-MoE (8 of 32, 3 per
token, renormalized) and OLMoE, where all-linear also adapts the experts' stacked
parameters and the router (HF PEFT's target_parameters; without dropout there, as HF PEFT
requires), and Qwen2-MoE (a gated shared expert, which all-linear adapts, every second layer
dense), gpt-oss (attention sinks, biased experts with a clamped SwiGLU, LoRA on its router
and experts by target_parameters), ERNIE 4.5 (RoPE over adjacent dims), GLM-4.5
(sigmoid routing over groups of experts, a shared expert, partial rotary), ERNIE 4.5 MoE
(a corrected softmax routing, shared experts), DeepSeek-V3, GLM-4.7-Flash and DeepSeek-V2
(latent attention). `peft train` runs on
the shipped pirate data (all-linear LoRA, f32, packed rows of 96 tokens, so most queries see
only part of their sequence through a window). Then, for each:
1. HF PEFT loads the adapter (no missing or unexpected keys) and its logits on a 40-token
   input equal `peft logits --adapter` within 1e-4;
2. transformers loads the folder `peft merge` writes, and its logits equal the adapter's.

    .venv/bin/python scripts/hf/check_train.py [--peft target/release/peft] [--only NAME,...]
"""
import json
import os
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GraniteConfig, GraniteForCausalLM, Olmo2Config,
                          Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SmolLM3Config,
                          SmolLM3ForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM, GptOssConfig, GptOssForCausalLM, Ernie4_5Config,
                          Ernie4_5ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM,
                          Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM,
                          DeepseekV2Config, DeepseekV2ForCausalLM)

from harness import arguments, peft_logits, random_model, run

ap = arguments("smollm-dir", "data")
ap.add_argument("--only", help="check only these models (comma-separated names)")
args = ap.parse_args()


def check(name, cls, cfg, tmp, flags=()):
    """Trains, compares and merges on model `name`; True when a check failed."""
    model_dir, adapter, merged = (os.path.join(tmp, n) for n in ["model", "adapter", "merged"])
    model = random_model(cls, cfg, model_dir, args.smollm_dir)

    out = run([args.peft, "train", "--model", model_dir, "--data", args.data, "--output", adapter,
               "--target-modules", "all-linear", "--r", "8", "--lora-alpha", "16",
               "--max-steps", "6", "--batch-size", "2", "--lr", "5e-3", "--dtype", "f32",
               "--packing", "--max-seq-length", "96", "--quiet", *flags])
    print(f"{name}:", (out.stdout.strip() or out.stderr.strip()).splitlines()[-1])

    ours = peft_logits(args.peft, model_dir, ids, os.path.join(tmp, "ours.safetensors"),
                       "--adapter", adapter)

    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        hf = peft_model(input_ids=torch.tensor([ids])).logits.float()
    with torch.no_grad():
        peft_model.disable_adapter_layers()
        plain = peft_model(input_ids=torch.tensor([ids])).logits.float()
        peft_model.enable_adapter_layers()
    d = (ours - hf).abs().max().item()
    moved = (hf - plain).abs().max().item()
    print(f"peft logits vs HF PEFT: max abs diff {d:.2e} (the adapter moves the logits by "
          f"{moved:.2f})")

    run([args.peft, "merge", "--model", model_dir, "--adapter", adapter, "--output", merged])
    m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        dm = (m(input_ids=torch.tensor([ids])).logits.float() - hf).abs().max().item()
    print(f"merged folder in transformers vs HF PEFT: max abs diff {dm:.2e}")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        print("adapter targets", json.load(f)["target_modules"])
    return d > 1e-4 or dm > 1e-4 or moved < 1e-2


ids = [i % 49152 for i in range(3, 3 + 40 * 977, 977)]
common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
gemma = dict(common, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
models = {
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**gemma)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(**gemma, attn_logit_softcapping=0.5,
                                               final_logit_softcapping=2.0)),
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config(**common)),
    "granite": (GraniteForCausalLM, GraniteConfig(
        **common, tie_word_embeddings=True, attention_multiplier=0.2, embedding_multiplier=4.0,
        residual_multiplier=0.7, logits_scaling=1.5)),
    "olmo2": (Olmo2ForCausalLM, Olmo2Config(**common, tie_word_embeddings=False)),
    "olmo3": (Olmo3ForCausalLM, Olmo3Config(
        **common, tie_word_embeddings=False, sliding_window=16,
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 10000.0,
                                            "factor": 4.0, "original_max_position_embeddings": 512},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "qwen3_yarn": (Qwen3ForCausalLM, Qwen3Config(
        **common, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 512})),
    "phi4_mini": (Phi3ForCausalLM, Phi3Config(
        **common, tie_word_embeddings=True, original_max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75})),
    "mixtral": (MixtralForCausalLM, MixtralConfig(**common, num_local_experts=8,
                                                  num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        norm_topk_prob=True)),
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, decoder_sparse_step=2)),
    "olmoe": (OlmoeForCausalLM, OlmoeConfig(**common, num_experts=8, num_experts_per_tok=2)),
    # gpt-oss: attention sinks, every other layer sliding (a window of 16), YaRN, 8 experts
    # with biases, 2 per token, the clamped SwiGLU (a limit of 1, which clamps here); all-linear
    # takes its attention, target_parameters the router and the experts.
    "gpt_oss": (GptOssForCausalLM, GptOssConfig(
        **common, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
        swiglu_limit=1.0)),
    # ERNIE 4.5: RoPE over adjacent dims (2i, 2i + 1), tied embeddings.
    "ernie4_5": (Ernie4_5ForCausalLM, Ernie4_5Config(**common, head_dim=32)),
    # GLM-4.5: sigmoid routing within the best 2 of 4 groups of 16 experts, 4 per token,
    # scaled by 2.5, a shared expert, the first layer dense, q/k norms, RoPE on half the dims.
    "glm4_moe": (Glm4MoeForCausalLM, Glm4MoeConfig(
        **common, head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True,
        attention_bias=True)),
    # ERNIE 4.5 MoE: a softmax router with a correction of its choice, 16 experts, 4 per
    # token, two shared experts, the first layer dense, RoPE over adjacent dims.
    "ernie4_5_moe": (Ernie4_5_MoeForCausalLM, Ernie4_5_MoeConfig(
        **common, head_dim=32, moe_num_experts=16, moe_k=4, moe_intermediate_size=32,
        moe_num_shared_experts=2, moe_layer_start_index=1)),
    # DeepSeek-V3: latent attention (low-rank queries, values narrower than the query-key
    # heads, RoPE over interleaved pairs, YaRN whose mscale_all_dim scales the scores) and
    # GLM-4.5's routing in groups; GLM-4.7-Flash: latent attention without the low-rank
    # queries, its dense layers by mlp_layer_types.
    "deepseek_v3": (DeepseekV3ForCausalLM, DeepseekV3Config(
        **{**common, "num_key_value_heads": 4}, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 512, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "glm4_moe_lite": (Glm4MoeLiteForCausalLM, Glm4MoeLiteConfig(
        **{**common, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1,
        mlp_layer_types=["dense"] + ["sparse"] * 5)),
    # DeepSeek-V2: latent attention with plain queries, its softmax routing limited to the
    # best 2 of 4 groups, unrenormalized weights scaled by 2.
    "deepseek_v2": (DeepseekV2ForCausalLM, DeepseekV2Config(
        **{**common, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
        first_k_dense_replace=1)),
}
# LoRA on parameters (the experts') takes no dropout, in HF PEFT either.
no_dropout = ["--lora-dropout", "0"]
extra_flags = {name: no_dropout
               for name in ("mixtral", "qwen3_moe", "olmoe", "glm4_moe", "ernie4_5_moe",
                            "deepseek_v3", "glm4_moe_lite", "deepseek_v2")}
extra_flags["gpt_oss"] = [*no_dropout, "--target-parameters",
                          "mlp.router.weight,mlp.experts.gate_up_proj,mlp.experts.down_proj"]
failed = False
for name, (cls, cfg) in models.items():
    if args.only and name not in args.only.split(","):
        continue
    with tempfile.TemporaryDirectory() as tmp:
        failed |= check(name, cls, cfg, tmp, extra_flags.get(name, []))
sys.exit(1 if failed else 0)
