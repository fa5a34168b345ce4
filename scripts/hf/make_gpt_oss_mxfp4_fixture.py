"""A tiny gpt-oss checkpoint with its experts in MXFP4, as OpenAI releases gpt-oss (config.json's
`quantization_config: {"quant_method": "mxfp4"}`; each expert parameter as `<name>_blocks` and
`<name>_scales`), and the logits transformers gives when it loads it (on a CPU it dequantizes
the experts to bf16).

Writes crates/peft/tests/fixtures/arch/gpt_oss_mxfp4/{model/, expected.safetensors}.

    /work/venv-hf/bin/python scripts/hf/make_gpt_oss_mxfp4_fixture.py
"""
import shutil

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

from harness import mxfp4_experts

out = "crates/peft/tests/fixtures/arch/gpt_oss_mxfp4"
shutil.rmtree(out, ignore_errors=True)
torch.manual_seed(0)
# MXFP4 groups 32 inputs: hidden and intermediate sizes are multiples of 32.
cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention"], swiglu_limit=0.8)
model = GptOssForCausalLM(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith("sinks"):
            p.copy_(1.0 + torch.randn_like(p))
        else:
            p.copy_(0.15 * torch.randn_like(p))
model.save_pretrained(f"{out}/model")
# Values of magnitude up to 6 · 2^-3.
mxfp4_experts(f"{out}/model", cfg, (121, 125))

loaded = AutoModelForCausalLM.from_pretrained(f"{out}/model", dtype=torch.float32).eval()
experts = loaded.model.layers[0].mlp.experts
assert experts.gate_up_proj.shape == (4, 32, 64), experts.gate_up_proj.shape
ids = torch.tensor([[1, 5, 9, 33, 60, 2, 17, 40]])
with torch.no_grad():
    logits = loaded(input_ids=ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous(),
           "gate_up_proj_0": experts.gate_up_proj.detach().float().contiguous()},
          f"{out}/expected.safetensors")
print("written", out, experts.gate_up_proj.dtype, logits.abs().max().item())
