"""Checks FP8 checkpoints (transformers' FineGrainedFP8, `quant_method: "fp8"`, as the `-FP8`
releases and Ministral 3 ship) against transformers: a small random Llama (SmolLM2's tokenizer) whose decoder
linear weights are stored in float8 e4m3 with a `weight_scale_inv` per block of 32 x 32 (the
last blocks cut short), or one per tensor with activation scales beside them. transformers
loads each with `FineGrainedFP8Config(dequantize=True)`; `peft logits` gives its logits, and
a LoRA `peft train` makes on the FP8 model gives HF PEFT's logits on transformers' model.

    .venv/bin/python scripts/hf/check_fp8.py [--peft PATH]
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM

from harness import (arguments, exit_status, peft_logits, random_model, report,
                     trained_lora_vs_hf_peft)

args = arguments("smollm-dir", "data").parse_args()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]


def fp8_folder(dense, out, block):
    """`dense`'s checkpoint with its decoder linear weights in FP8: scales per `block` x
    `block` tiles, or per tensor (`None`, with activation scales as static FP8 keeps)."""
    os.makedirs(out)
    tensors = {}
    for name, w in load_file(os.path.join(dense, "model.safetensors")).items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
            tensors[name] = w
            continue
        rows, cols = w.shape
        b0, b1 = (block, block) if block else (rows, cols)
        scale = torch.zeros((rows + b0 - 1) // b0, (cols + b1 - 1) // b1)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                scale[i, j] = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].abs().max() / 448.0
        full = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
        tensors[name] = (w / full).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale if block else scale.reshape(())
        if not block:
            tensors[name.replace(".weight", ".activation_scale")] = torch.tensor(1.0)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(dense):
        if f.startswith("tokenizer") or f.endswith(".jinja"):
            shutil.copy(os.path.join(dense, f), out)
    with open(os.path.join(dense, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic" if block else "static",
        "weight_block_size": [block, block] if block else None}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)


with tempfile.TemporaryDirectory() as tmp:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    dense = os.path.join(tmp, "dense")
    model = random_model(LlamaForCausalLM, cfg, dense, args.smollm_dir)
    for block in [32, None]:
        what = f"blocks of {block}x{block}" if block else "one scale a tensor"
        folder = os.path.join(tmp, f"fp8-{block}")
        fp8_folder(dense, folder, block)
        hf = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32,
            quantization_config=FineGrainedFP8Config(
                weight_block_size=(block, block) if block else None, dequantize=True)).eval()
        with torch.no_grad():
            theirs = hf(torch.tensor([IDS])).logits
            moved = (theirs - model(torch.tensor([IDS])).logits).abs().max().item()
        ours = peft_logits(args.peft, folder, IDS, os.path.join(tmp, "l.safetensors"))
        d = (ours - theirs).abs().max().item()
        report(d < 1e-4, f"{what}: peft logits vs transformers' dequantized model: max |diff| "
                         f"{d:.2e} (FP8 moves them {moved:.2f} from the unquantized model)")
        _, d = trained_lora_vs_hf_peft(args, folder, hf, IDS, os.path.join(tmp, f"lora-{block}"))
        report(d < 1e-4, f"{what}: a LoRA trained on it in HF PEFT vs peft logits: max |diff| {d:.2e}")

sys.exit(exit_status())
