"""Checks `peft train --init-lora-weights pissa|olora` against HF PEFT on SmolLM2 (all-linear,
r 8): the initial s·B·A of every module equals HF PEFT's PiSSA/OLoRA init (the product: the
factors' signs are the decomposition's choice), and the adapter peft saves after training
(converted for the original base, as HF's path_initial_model_for_weight_conversion) loads in
HF PEFT onto the original model with the logits `peft logits` gives.

    .venv/bin/python scripts/hf/check_pissa.py [--peft PATH] [--model-dir DIR]
"""

import json
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from harness import arguments, peft_logits, run

args = arguments("model-dir", "data").parse_args()
tmp = tempfile.mkdtemp()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]


def train(init, lr, steps, out, extra=()):
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", out,
         "--init-lora-weights", init, "--target-modules", "all-linear", "--r", "8",
         "--lora-alpha", "16", "--lora-dropout", "0", "--max-steps", str(steps),
         "--batch-size", "2", "--lr", str(lr), "--dtype", "f32", "--quiet", *extra])


failed = 0
for init in ["pissa", "olora"]:
    # A negligible step leaves the initial A and B: the first r rows / columns of the file.
    start = f"{tmp}/{init}-start"
    train(init, 1e-12, 1, start)
    saved = load_file(f"{start}/adapter_model.safetensors")
    config = json.load(open(f"{start}/adapter_config.json"))
    assert config["r"] == 16 and config["init_lora_weights"] is True, config
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    hf = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                          init_lora_weights=init))
    worst, modules = 0.0, 0
    for name, module in hf.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a = saved[f"{name}.lora_A.weight"][:8]
        b = saved[f"{name}.lora_B.weight"][:, :8]
        modules += 1
        ours = 2.0 * b @ a
        theirs = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    ok = worst < 1e-3 and modules > 0
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {init}: initial s·B·A of {modules} modules, worst relative diff {worst:.2e}")

    # With DoRA too: its magnitudes scale W + s·B'·A', the same weights on either base.
    for dora in [False, True]:
        what = f"{init}{' with DoRA' if dora else ''}"
        trained = f"{tmp}/{init}-{dora}-trained"
        train(init, 2e-4, 4, trained, ["--use-dora", "true"] if dora else [])
        ours = peft_logits(args.peft, args.model_dir, IDS, f"{tmp}/ours.safetensors",
                           "--adapter", trained)
        base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        with torch.no_grad():
            plain = base(torch.tensor([IDS])).logits
            theirs = PeftModel.from_pretrained(base, trained)(torch.tensor([IDS])).logits
        diff = (ours - theirs).abs().max().item()
        moved = (theirs - plain).abs().max().item()
        ok = diff < 1e-3 and moved > 1e-2
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}: trained adapter in HF PEFT on the original "
              f"base, logits {diff:.1e} from peft's (training moved them {moved:.2f})")
raise SystemExit(failed)
