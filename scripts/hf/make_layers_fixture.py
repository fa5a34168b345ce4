"""A LoRA adapter made by HF PEFT on SmolLM2 with `layers_to_transform`, and PEFT's outputs.

r=2 (alpha 4) on q_proj and v_proj of layers 0 and 2 only (`layers_to_transform=[0, 2]`,
`layers_pattern="layers"`), random B (init_lora_weights=False). Writes
crates/peft/tests/fixtures/lora_layers_0_2/ (adapter_config.json, adapter_model.safetensors,
expected.safetensors with `hidden` [1, 8, 576] and `last_logits` [49152] for input_ids
[504, 3575, 282, 4649, 314, 7042, 30, 378]).

    .venv/bin/python scripts/hf/make_layers_fixture.py
"""
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

out = "crates/peft/tests/fixtures/lora_layers_0_2"
torch.manual_seed(5)
base = AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct", dtype=torch.float32)
cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2],
                 layers_pattern="layers", init_lora_weights=False, lora_dropout=0.0,
                 task_type="CAUSAL_LM")
model = get_peft_model(base, cfg)
model.save_pretrained(out)
os.remove(f"{out}/README.md")
model.eval()
ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378]])
with torch.no_grad():
    o = model(input_ids=ids, output_hidden_states=True)
save_file({"hidden": o.hidden_states[-1].contiguous(), "last_logits": o.logits[0, -1].contiguous()},
          f"{out}/expected.safetensors")
print("written", out)
