"""Compares the losses `peft train` logs on mixture-of-experts models with TRL's SFTTrainer,
which adds the routers' load-balancing loss (`aux_loss`) weighted by `router_aux_loss_coef`:
by default the model config's, here also a larger one, and 0 (off).

Small random Mixtral, Qwen3-MoE (renormalized top-k) and OLMoE models (SmolLM2's tokenizer,
router weights large enough that the routing is far from uniform); LoRA on q_proj and
v_proj; one step at a negligible learning rate over one batch of six padded records (so both
runs measure the base model, and the loss is each record's tokens plus the aux loss over
their real tokens), and an evaluation in batches of two. Checked: `loss`, `aux_loss`,
`eval_loss`, `eval_aux_loss` (absent when the coefficient is 0), within 1e-4.

    .venv/bin/python scripts/hf/check_router_aux.py [--peft PATH] [--smollm-dir DIR]
"""
import json
import tempfile

import torch
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from harness import arguments, exit_status, one_step_logs, random_model, report

ap = arguments("smollm-dir", "data")
args = ap.parse_args()

common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=False)
models = {
    "mixtral": (MixtralForCausalLM, MixtralConfig(**common, num_local_experts=8,
                                                  num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        norm_topk_prob=True)),
    "olmoe": (OlmoeForCausalLM, OlmoeConfig(**common, num_experts=8, num_experts_per_tok=2)),
}

records = [json.loads(line) for line in open(args.data)][:10]
train, evaluation = records[:6], records[6:]


for name, (cls, cfg) in models.items():
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = f"{tmp}/model"
        model = random_model(cls, cfg, model_dir, args.smollm_dir)
        # Routers of N(0, 1) weights: uneven routing, an aux loss well above its floor.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                    p.copy_(torch.randn_like(p))
        model.save_pretrained(model_dir)
        for coef in [None, 0.3, 0.0]:
            trl, ours = one_step_logs(
                args.peft, model_dir, train, evaluation, tmp, ["q_proj", "v_proj"],
                trl_args={"router_aux_loss_coef": coef},
                peft_flags=[] if coef is None else ["--router-aux-loss-coef", str(coef)])
            label = f"{name} coef {'config' if coef is None else coef}"
            for key in ["loss", "aux_loss", "eval_loss", "eval_aux_loss"]:
                if coef == 0.0 and "aux" in key:
                    report(key not in ours and key not in trl, f"{label}: {key} logged by neither")
                    continue
                ok = key in ours and key in trl and abs(ours[key] - trl[key]) <= 1e-4 * abs(trl[key])
                report(ok, f"{label}: {key} peft {ours.get(key)} TRL {trl.get(key)}")
raise SystemExit(exit_status())
