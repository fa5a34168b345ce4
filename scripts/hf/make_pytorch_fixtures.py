"""PyTorch-format (`torch.save`) files as HF writes them with `safe_serialization=False`.

- crates/peft/tests/fixtures/lora_layers_0_2_bin/: the `lora_layers_0_2` adapter loaded by HF
  PEFT and saved again as `adapter_model.bin` (its outputs are that fixture's
  expected.safetensors).
- crates/peft-models/tests/fixtures/tiny_llama_bin/: a tiny random Llama as transformers 4
  saved it with `safe_serialization=False` (`torch.save` of the state dict as
  `pytorch_model.bin`; transformers 5 writes safetensors only), and `reference.safetensors`
  with the logits transformers computes for input_ids [[1, 5, 9, 3]].
- crates/peft-models/tests/fixtures/tiny_llama_bin_sharded/: the same weights in two shards
  named by `pytorch_model.bin.index.json`, as transformers 4 sharded them.

    .venv/bin/python scripts/hf/make_pytorch_fixtures.py
"""
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

out = "crates/peft/tests/fixtures/lora_layers_0_2_bin"
base = AutoModelForCausalLM.from_pretrained("models/smollm2-135m-instruct", dtype=torch.float32)
model = PeftModel.from_pretrained(base, "crates/peft/tests/fixtures/lora_layers_0_2")
model.save_pretrained(out, safe_serialization=False)
os.remove(f"{out}/README.md")
print("written", out)

out = "crates/peft-models/tests/fixtures/tiny_llama_bin"
torch.manual_seed(3)
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
tiny = LlamaForCausalLM(cfg).eval()
os.makedirs(out, exist_ok=True)
cfg.save_pretrained(out)
state = tiny.state_dict()
torch.save(state, f"{out}/pytorch_model.bin")
ids = torch.tensor([[1, 5, 9, 3]])
with torch.no_grad():
    logits = tiny(input_ids=ids).logits
save_file({"expected_logits": logits.contiguous()}, f"{out}/reference.safetensors")
print("written", out, sorted(os.listdir(out)))

out = "crates/peft-models/tests/fixtures/tiny_llama_bin_sharded"
os.makedirs(out, exist_ok=True)
cfg.save_pretrained(out)
keys = list(state)
shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
          "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
weight_map = {}
for name, shard_keys in shards.items():
    torch.save({k: state[k] for k in shard_keys}, f"{out}/{name}")
    weight_map.update({k: name for k in shard_keys})
with open(f"{out}/pytorch_model.bin.index.json", "w") as f:
    json.dump({"metadata": {"total_size": sum(v.numel() * 4 for v in state.values())},
               "weight_map": weight_map}, f, indent=2)
print("written", out, sorted(os.listdir(out)))
