"""Adapters for Mixtral and Qwen3-MoE as HF PEFT saved them on transformers 4, when each
expert was a module of linear layers: a LoRA pair per expert's projection (Qwen's
`mlp.experts.3.gate_proj`, Mixtral's `block_sparse_moe.experts.3.w1`) and on the router
(`mlp.gate`, `block_sparse_moe.gate`), beside the attention's. HF PEFT 0.21 converts them as it
loads them on transformers 5 (the experts' pairs stacked, gate and up fused block-diagonally);
the logits it then computes are the fixture's.

For each of mixtral and qwen3_moe in crates/peft/tests/fixtures/arch/, writes lora_v4/
(adapter_config.json, adapter_model.safetensors) and lora_v4_logits.safetensors (the logits of
expected.safetensors' input_ids through HF PEFT).

    .venv/bin/python scripts/hf/make_moe_v4_fixture.py
"""
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

R, ALPHA = 2, 6
for name, block, projections in [("mixtral", "block_sparse_moe", ["w1", "w3", "w2"]),
                                 ("qwen3_moe", "mlp", ["gate_proj", "up_proj", "down_proj"])]:
    root = f"crates/peft/tests/fixtures/arch/{name}"
    with open(f"{root}/model/config.json") as f:
        cfg = json.load(f)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    size = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    torch.manual_seed(1)
    tensors = {}

    def pair(path, inp, out):
        tensors[f"base_model.model.{path}.lora_A.weight"] = 0.3 * torch.randn(R, inp)
        tensors[f"base_model.model.{path}.lora_B.weight"] = 0.3 * torch.randn(out, R)

    for l in range(layers):
        p = f"model.layers.{l}"
        pair(f"{p}.self_attn.q_proj", hidden, heads * head_dim)
        pair(f"{p}.{block}.gate", hidden, experts)
        for e in range(experts):
            gate, up, down = projections
            pair(f"{p}.{block}.experts.{e}.{gate}", hidden, size)
            pair(f"{p}.{block}.experts.{e}.{up}", hidden, size)
            pair(f"{p}.{block}.experts.{e}.{down}", size, hidden)
    out = f"{root}/lora_v4"
    os.makedirs(out, exist_ok=True)
    save_file(tensors, f"{out}/adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA,
              "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": None,
              "target_modules": ["q_proj", "gate", *projections], "inference_mode": True,
              "init_lora_weights": True, "fan_in_fan_out": False, "modules_to_save": None}
    with open(f"{out}/adapter_config.json", "w") as f:
        json.dump(config, f, indent=2)

    base = AutoModelForCausalLM.from_pretrained(f"{root}/model", dtype=torch.float32)
    ids = load_file(f"{root}/expected.safetensors")["input_ids"]
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, out).eval()
        logits = model(input_ids=ids).logits
    moved = (logits - plain).abs().max().item()
    assert moved > 0.1, f"{name}: the adapter moves the logits by {moved}"
    save_file({"logits": logits.contiguous()}, f"{root}/lora_v4_logits.safetensors")
    print(name, "written; the converted adapter moves the logits by", round(moved, 3),
          "| converted:", model.peft_config["default"].target_parameters,
          model.peft_config["default"].rank_pattern)
