"""Checks that adapters HF PEFT made with its inits that peft-rs does not train with (EVA, with
its data-driven ranks; MiCA) or does (orthogonal) load in `peft logits` with HF PEFT's logits,
that peft-rs's orthogonal init has HF PEFT's (B·A = 0, the same spreads of A and B), and that
one made with CorDA's (whose base gave up part of its weights) is refused. SmolLM2, q/v/o,
their tensors moved by seeded noise after the init (an untrained EVA or MiCA adapter changes
nothing).

    .venv/bin/python scripts/hf/check_other_inits.py [--peft PATH] [--model-dir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--peft", default=os.path.expanduser("~/.cache/peft-rs-target/release/peft"))
ap.add_argument("--model-dir", default="models/smollm2-135m-instruct")
args = ap.parse_args()
tmp = tempfile.mkdtemp()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
TARGETS = ["q_proj", "v_proj", "o_proj"]
failed = 0


def check(ok, what):
    global failed
    failed += not ok
    print(("ok   " if ok else "FAIL ") + what)


def base():
    return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)


def peft_logits(adapter):
    out = f"{adapter}/logits.safetensors"
    r = subprocess.run([args.peft, "logits", "--model", args.model_dir, "--adapter", adapter,
                        "--input-ids", ",".join(map(str, IDS)), "--out", out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1]
    return load_file(out)["logits"][0], None


def moved_and_saved(model, name):
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
        want = model(torch.tensor([IDS])).logits[0]
    out = f"{tmp}/{name}"
    model.save_pretrained(out)
    return out, want


torch.manual_seed(0)
# EVA: the inputs' principal directions over a few batches, ranks redistributed (rho 2).
model = get_peft_model(base(), LoraConfig(r=8, target_modules=TARGETS, init_lora_weights="eva",
                                          eva_config=EvaConfig(rho=2.0)))
batches = [{"input_ids": torch.randint(0, 49152, (4, 64)),
            "attention_mask": torch.ones(4, 64, dtype=torch.long)} for _ in range(6)]
initialize_lora_eva_weights(model, batches, show_progress_bar=False)
for name, init in [("eva", None), ("orthogonal", "orthogonal"), ("mica", "mica")]:
    if init is not None:
        model = get_peft_model(base(), LoraConfig(r=8, target_modules=TARGETS,
                                                  init_lora_weights=init))
    out, want = moved_and_saved(model, name)
    config = json.load(open(f"{out}/adapter_config.json"))
    got, err = peft_logits(out)
    diff = float("inf") if got is None else (got - want).abs().max().item()
    ranks = sorted(set(config.get("rank_pattern", {}).values()))
    # f32 noise: the base alone is 9e-5 apart from transformers' on these ids.
    check(diff < 2e-4, f"{name}: HF PEFT's adapter in peft logits: max |diff| {diff:.2e}"
          + (f" (ranks {ranks} by EVA's redistribution)" if ranks else "") + (err or ""))

# Orthogonal, trained here: at a learning rate of 0 the saved pairs are the init, whose
# products are zero and whose spreads are HF PEFT's (same shapes, r 8).
ours = f"{tmp}/orthogonal_here"
subprocess.run([args.peft, "train", "--model", args.model_dir, "--data", "data/pirate_qa.jsonl",
                "--output", ours, "--init-lora-weights", "orthogonal", "--r", "8",
                "--target-modules", ",".join(TARGETS), "--max-steps", "1", "--lr", "0",
                "--dtype", "f32", "--quiet"], check=True, capture_output=True)
saved = load_file(f"{ours}/adapter_model.safetensors")
hf = get_peft_model(base(), LoraConfig(r=8, target_modules=TARGETS, init_lora_weights="orthogonal"))
hf_state = {k.replace(".default", ""): v for k, v in hf.state_dict().items() if "lora_" in k}
worst_product, spreads = 0.0, []
for key, a in saved.items():
    if not key.endswith("lora_A.weight"):
        continue
    b = saved[key.replace("lora_A", "lora_B")]
    worst_product = max(worst_product, (b @ a).abs().max().item())
    spreads.append((a.std().item(), hf_state[key].std().item()))
    spreads.append((b.std().item(), hf_state[key.replace("lora_A", "lora_B")].std().item()))
ratio = max(max(o / t, t / o) for o, t in spreads)
got, err = peft_logits(ours)
with torch.no_grad():
    start = base()(torch.tensor([IDS])).logits[0]
diff = float("inf") if got is None else (got - start).abs().max().item()
check(worst_product < 1e-6 and ratio < 1.15 and diff < 2e-4,
      f"orthogonal, trained here: max |B·A| {worst_product:.1e}, the spreads of A and B within "
      f"{(ratio - 1) * 100:.1f}% of HF PEFT's, the model unchanged at the start (max |diff| "
      f"{diff:.2e})" + (err or ""))

model = get_peft_model(base(), LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=True))
out, _ = moved_and_saved(model, "corda")
config = json.load(open(f"{out}/adapter_config.json"))
config["init_lora_weights"] = "corda"
json.dump(config, open(f"{out}/adapter_config.json", "w"))
got, err = peft_logits(out)
check(got is None and "residual base weights" in err, f"corda: refused ({err})")
sys.exit(1 if failed else 0)
