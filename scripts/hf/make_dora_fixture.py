"""A DoRA adapter made by HF PEFT on SmolLM2 and the outputs PEFT computes with it.

LoRA r=2 (alpha 4) on q_proj and v_proj with use_dora=True, random B (init_lora_weights=False),
and the magnitude vector scaled by 1 + 0.05·N(0,1) so that it differs from ||W + sBA||: a
loader that ignores the magnitude is off. Writes crates/peft/tests/fixtures/dora_qv_r2/
(adapter_config.json, adapter_model.safetensors, expected.safetensors with `hidden` [1, 8, 576]
and `last_logits` [49152] for input_ids [504, 3575, 282, 4649, 314, 7042, 30, 378], and
`merged_last_logits` after merge_and_unload).

    .venv/bin/python scripts/hf/make_dora_fixture.py
"""
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

out = "crates/peft/tests/fixtures/dora_qv_r2"
torch.manual_seed(7)
base = AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct", dtype=torch.float32)
cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                 init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
model = get_peft_model(base, cfg)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.05 * torch.randn_like(p))
model.save_pretrained(out)
model.eval()
ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378]])
with torch.no_grad():
    o = model(input_ids=ids, output_hidden_states=True)
    merged = model.merge_and_unload()
    m = merged(input_ids=ids)
save_file({"hidden": o.hidden_states[-1].contiguous(), "last_logits": o.logits[0, -1].contiguous(),
           "merged_last_logits": m.logits[0, -1].contiguous()}, f"{out}/expected.safetensors")
print("written", out)
