"""An IA3 adapter made by HF PEFT on SmolLM2 and the outputs PEFT computes with it.

PEFT's Llama defaults (k_proj, v_proj, down_proj; down_proj feed-forward), vectors moved off
their init of ones by 1 + 0.1·N(0,1). Writes crates/peft/tests/fixtures/ia3/
(adapter_config.json, adapter_model.safetensors, expected.safetensors with `hidden` [1, 8, 576],
`last_logits` [49152] for input_ids [504, 3575, 282, 4649, 314, 7042, 30, 378], and
`merged_last_logits` after merge_and_unload).

    .venv/bin/python scripts/hf/make_ia3_fixture.py
"""
import os
import torch
from peft import IA3Config, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

out = "crates/peft/tests/fixtures/ia3"
torch.manual_seed(11)
base = AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct", dtype=torch.float32)
model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"))
with torch.no_grad():
    for name, p in model.named_parameters():
        if "ia3_l" in name:
            p.mul_(1 + 0.1 * torch.randn_like(p))
model.save_pretrained(out)
os.remove(f"{out}/README.md")
model.eval()
ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378]])
with torch.no_grad():
    o = model(input_ids=ids, output_hidden_states=True)
    m = model.merge_and_unload()(input_ids=ids)
save_file({"hidden": o.hidden_states[-1].contiguous(), "last_logits": o.logits[0, -1].contiguous(),
           "merged_last_logits": m.logits[0, -1].contiguous()}, f"{out}/expected.safetensors")
print("written", out)
