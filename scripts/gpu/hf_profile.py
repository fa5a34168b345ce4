"""HF PEFT's kernels in one training step (Llama-3.2-1B shape, LoRA q,k,v,o, 4 x 1024, bf16,
sdpa), the same model and step as shared/gpu/anchor_hf.py, under torch's profiler: GPU time per
kernel, to set beside ours (scripts/gpu/profile.sh)."""
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

torch.manual_seed(0)
cfg = LlamaConfig(max_position_embeddings=2048, rope_theta=10000.0, hidden_size=2048,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
cfg._attn_implementation = "sdpa"
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
ids = torch.randint(0, cfg.vocab_size, (4, 1024), device="cuda")


def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
events = [e for e in prof.key_averages() if e.device_time_total > 0]
events.sort(key=lambda e: -e.self_device_time_total)
total = sum(e.self_device_time_total for e in events)
print(f"HF 1B LoRA q,k,v,o 4x1024: GPU kernel time {total / 1e3:.2f} ms in one step")
for e in events[:60]:
    print(f"{e.self_device_time_total / 1e3:9.3f} ms {e.count:6d}x  {e.key[:150]}")
