"""Checks bitsandbytes 4-bit checkpoints (what transformers' `save_pretrained` writes for a
model loaded with `BitsAndBytesConfig(load_in_4bit=True)`, as Unsloth's `-bnb-4bit` uploads
are) against transformers and bitsandbytes on the CPU: a small random Llama (SmolLM2's
tokenizer) quantized by bitsandbytes to NF4 with double quantization, and to FP4 without,
saved, then read by `peft logits` (the 4-bit weights as stored: the logits of transformers'
4-bit model, its layers' products taken of their dequantized weights, as bitsandbytes does on
a GPU), and a LoRA `peft train` makes on it gives HF PEFT's logits on that model.

    .venv/bin/python scripts/hf/check_bnb_checkpoint.py [--peft PATH]
"""
import os
import sys
import tempfile

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from harness import (arguments, exit_status, peft_logits, random_model, report,
                     trained_lora_vs_hf_peft)

args = arguments("smollm-dir", "data").parse_args()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]


def dequantize_linears(model):
    """Replaces each bitsandbytes 4-bit layer by a dense one of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense.weight.data = weight.float()
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, dense)


with tempfile.TemporaryDirectory() as tmp:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    dense = os.path.join(tmp, "dense")
    random_model(LlamaForCausalLM, cfg, dense, args.smollm_dir)
    for kind, double in [("nf4", True), ("fp4", False)]:
        what = f"{kind}{' with double quantization' if double else ''}"
        quantized = os.path.join(tmp, f"bnb-{kind}")
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                 bnb_4bit_use_double_quant=double,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=quantization,
                                                     dtype=torch.float32, device_map="cpu")
        model.save_pretrained(quantized)
        for f in os.listdir(dense):
            if f.startswith("tokenizer") or f.endswith(".jinja"):
                os.link(os.path.join(dense, f), os.path.join(quantized, f))
        load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            quantized, dtype=torch.float32, device_map="cpu").eval()
        with torch.no_grad():
            kernel = load()(torch.tensor([IDS])).logits
        # bitsandbytes' 4-bit layer on a GPU dequantizes its weight to the compute dtype and
        # multiplies; its CPU kernel approximates that (and repacks the weight on its first
        # call). The reference is the product of the dequantized weights.
        model = load()
        dequantize_linears(model)
        with torch.no_grad():
            theirs = model(torch.tensor([IDS])).logits
        print(f"     (bitsandbytes' CPU kernel is {(kernel - theirs).abs().max().item():.2e} "
              f"from the dequantized weights' products)")
        ours = peft_logits(args.peft, quantized, IDS, os.path.join(tmp, "l.safetensors"))
        d = (ours - theirs).abs().max().item()
        report(d < 1e-4, f"{what}: peft logits vs transformers' 4-bit model: max |diff| {d:.2e}")
        adapted, d = trained_lora_vs_hf_peft(args, quantized, model, IDS,
                                             os.path.join(tmp, f"lora-{kind}"))
        moved = (adapted - theirs).abs().max().item()
        report(d < 1e-4 and moved > 1e-3,
               f"{what}: a LoRA trained on it in HF PEFT vs peft logits: max |diff| {d:.2e} "
               f"(the adapter moves them {moved:.2f})")

sys.exit(exit_status())
