"""A P-tuning adapter (PEFT's P_TUNING: a prompt encoder MLP) made by HF PEFT on SmolLM2, and the
outputs PEFT computes with it after loading it from disk.

8 virtual tokens, MLP reparameterization with encoder_hidden_size 64. PEFT saves the encoder's
output as `prompt_embeddings` and, loaded for inference, prepends those rows as prompt tuning
does; this script checks that the reloaded adapter gives the outputs of the model it was saved
from. Writes crates/peft/tests/fixtures/ptuning_mlp_8/ (adapter_config.json,
adapter_model.safetensors, expected.safetensors with the golden prompts' `input_ids`,
`attention_mask`, `input_ids_b2`, `attention_mask_b2`, and `hidden` [1, 20, 576], `hidden_b2`
[2, 16, 576], `last_logits` [49152], `logits_b2_last` [2, 49152]).

    .venv/bin/python scripts/hf/make_ptuning_fixture.py
"""
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

out = "crates/peft/tests/fixtures/ptuning_mlp_8"
golden = load_file("../shared/golden/prompt_tuning_8/expected.safetensors")
torch.manual_seed(11)
load = lambda: AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct", dtype=torch.float32)
cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                          encoder_reparameterization_type="MLP", encoder_hidden_size=64)
model = get_peft_model(load(), cfg)
model.save_pretrained(out)


def outputs(m):
    m.eval()
    with torch.no_grad():
        o = m(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"],
              output_hidden_states=True)
        o2 = m(input_ids=golden["input_ids_b2"], attention_mask=golden["attention_mask_b2"],
               output_hidden_states=True)
    last = [8 + int(row.nonzero().max()) for row in golden["attention_mask_b2"]]
    return {"hidden": o.hidden_states[-1].contiguous(), "last_logits": o.logits[0, -1].contiguous(),
            "hidden_b2": o2.hidden_states[-1].contiguous(),
            "logits_b2_last": torch.stack([o2.logits[b, t] for b, t in enumerate(last)]).contiguous()}


trained = outputs(model)
reloaded = outputs(PeftModel.from_pretrained(load(), out))
for k in trained:
    assert torch.allclose(trained[k], reloaded[k], atol=1e-5), k
keep = {k: golden[k] for k in ["input_ids", "attention_mask", "input_ids_b2", "attention_mask_b2"]}
save_file({**keep, **reloaded}, f"{out}/expected.safetensors")
print("written", out)
