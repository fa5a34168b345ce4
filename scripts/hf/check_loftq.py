"""Checks `peft train --init-lora-weights loftq` against HF PEFT and bitsandbytes on SmolLM2
(all-linear, r 8, lora_alpha 8: HF's LoftQ leaves the scaling out, so the two agree where it
is 1), in f32:

- the base: each decoder linear's weight as bitsandbytes quantizes it to NF4 and dequantizes
  it (`quantize_4bit`, `dequantize_4bit`, blocks of 64: what `BitsAndBytesConfig(load_in_4bit)`
  computes with; its CPU layer, used below too, rounds the dequantized weights to bf16);
- the initial s·B·A of every module against HF PEFT's LoftQ (`_low_rank_decomposition` of
  W - dequantize_4bit(Q(W)), as `replace_lora_weights_loftq` computes it; that function
  itself runs on a GPU alone), and how much of the quantization error each leaves;
- the initial adapter in HF PEFT on that base: its logits equal `peft logits --quantize nf4`
  and are closer to the unquantized model's than QLoRA's (B = 0) are, also on bitsandbytes'
  own 4-bit model;
- the adapter after a few training steps: HF PEFT on that base gives the logits
  `peft logits --quantize nf4` gives, and it loads on bitsandbytes' 4-bit model.

    .venv/bin/python scripts/hf/check_loftq.py [--peft PATH] [--model-dir DIR]

Needs bitsandbytes (CPU 4-bit: 0.46 or later).
"""

import json
import sys
import tempfile

import bitsandbytes.functional as bnbf
import torch
from peft import PeftModel
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from harness import arguments, peft_logits, run

args = arguments("model-dir", "data").parse_args()
tmp = tempfile.mkdtemp()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
R = 8


def train(lr, steps, out):
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", out,
         "--init-lora-weights", "loftq", "--quantize", "nf4", "--target-modules", "all-linear",
         "--r", str(R), "--lora-alpha", str(R), "--lora-dropout", "0", "--max-steps", str(steps),
         "--batch-size", "2", "--lr", str(lr), "--dtype", "f32", "--quiet"])


def logits_on_nf4(adapter):
    out = f"{adapter}/logits.safetensors"
    return peft_logits(args.peft, args.model_dir, IDS, out, "--adapter", adapter, "--quantize",
                       "nf4")[0]


def quantized_model():
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=False)
    return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                quantization_config=bnb, device_map="cpu")


@torch.no_grad()
def logits(model):
    return model(torch.tensor([IDS])).logits[0].float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


failed = 0


def check(ok, what):
    global failed
    failed += not ok
    print(("ok   " if ok else "FAIL ") + what)


def dequantized(w):
    return bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4"))


dense = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
dense_logits = logits(dense)
weights = {k: v.clone() for k, v in dense.state_dict().items()}
# The base bitsandbytes computes with, in f32: every decoder linear dequantized.
for name, module in dense.named_modules():
    if isinstance(module, torch.nn.Linear) and name != "lm_head":
        module.weight.data = dequantized(module.weight.data)
base_q = dense

# peft's own 4-bit base, written dequantized by `peft merge --quantize nf4`: bitsandbytes'.
run([args.peft, "merge", "--model", args.model_dir, "--quantize", "nf4", "--dtype", "f32",
     "--output", f"{tmp}/base-nf4"])
ours_base = load_file(f"{tmp}/base-nf4/model.safetensors")
differ = total = 0
for name, module in base_q.named_modules():
    if isinstance(module, torch.nn.Linear) and name != "lm_head":
        differ += (ours_base[f"{name}.weight"] != module.weight.data).sum().item()
        total += module.weight.numel()
check(differ == 0, f"peft's NF4 base vs bitsandbytes': {differ} of {total} weights differ")

start = f"{tmp}/loftq-start"
train(1e-12, 1, start)
saved = load_file(f"{start}/adapter_model.safetensors")
config = json.load(open(f"{start}/adapter_config.json"))
check(config["init_lora_weights"] is True and config["r"] == R,
      f"saved as a plain LoRA: init_lora_weights {config['init_lora_weights']}, r {config['r']}")

worst_product, worst_left, modules = 0.0, 0.0, 0
for name in saved:
    if not name.endswith("lora_A.weight"):
        continue
    path = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    w = weights[f"{path}.weight"]
    error = w - dequantized(w)
    hf = _low_rank_decomposition(error, reduced_rank=R)
    hf_product = hf["L"] @ hf["R"]
    ours = saved[name.replace("lora_A", "lora_B")] @ saved[name]
    worst_product = max(worst_product, rel(ours, hf_product))
    # What each correction leaves of the error (the best rank-r correction leaves the least).
    left_ours, left_hf = (error - ours).norm().item(), (error - hf_product).norm().item()
    worst_left = max(worst_left, abs(left_ours - left_hf) / left_hf)
    modules += 1
check(modules == 210 and worst_product < 1e-3,
      f"initial B·A of {modules} modules vs HF PEFT's LoftQ: worst relative difference "
      f"{worst_product:.2e}")
check(worst_left < 1e-5, f"the error each leaves: worst relative difference {worst_left:.2e}")

qlora_logits = logits(base_q)
loftq = PeftModel.from_pretrained(base_q, start)
loftq_logits = logits(loftq)
diff = (logits_on_nf4(start) - loftq_logits).abs().max().item()
check(diff < 1e-3, f"initial adapter in HF PEFT vs peft logits --quantize nf4: max |diff| "
      f"{diff:.2e}")
base_q = loftq.unload()
print(f"     logits vs the unquantized model: QLoRA {rel(qlora_logits, dense_logits):.4f}, "
      f"LoftQ {rel(loftq_logits, dense_logits):.4f}")
check(rel(loftq_logits, dense_logits) < rel(qlora_logits, dense_logits),
      "LoftQ's start is closer to the unquantized model than QLoRA's")
bnb_qlora = logits(quantized_model())
bnb_loftq = logits(PeftModel.from_pretrained(quantized_model(), start))
print(f"     on bitsandbytes' 4-bit model: QLoRA {rel(bnb_qlora, dense_logits):.4f}, "
      f"LoftQ {rel(bnb_loftq, dense_logits):.4f}")
check(rel(bnb_loftq, dense_logits) < rel(bnb_qlora, dense_logits),
      "so on bitsandbytes' 4-bit model")

trained = f"{tmp}/loftq-trained"
train(2e-3, 4, trained)
hf_trained = logits(PeftModel.from_pretrained(base_q, trained))
diff = (logits_on_nf4(trained) - hf_trained).abs().max().item()
moved = (hf_trained - loftq_logits).abs().max().item()
check(diff < 1e-3 and moved > 0.1, f"trained adapter in HF PEFT vs peft logits --quantize nf4: "
      f"max |diff| {diff:.2e} (training moved them {moved:.2f})")
sys.exit(1 if failed else 0)
