"""Compares `peft combine` with HF PEFT's `add_weighted_adapter` on SmolLM2: the golden
lora_qv_r8 adapter (q, v, rank 8) and a rank-4 adapter on q, k, v, o with rsLoRA trained here
by `peft train`, combined by "cat" (weights 0.7 and -0.4) and "linear" (the golden adapter
with itself, 0.5 and 0.5). Checks the written tensors against HF PEFT's and the logits of
`peft logits --adapter` on the combined adapter against HF PEFT's with that adapter active.

    .venv/bin/python scripts/hf/check_combine.py [--peft PATH]
"""

import os
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from harness import arguments, peft_logits, run

ap = arguments("model-dir")
ap.add_argument("--golden", default="../shared/golden/lora_qv_r8")
args = ap.parse_args()
ids = [1, 504, 3458, 282, 4649, 314, 20, 3275, 30, 2]


failed = False
with tempfile.TemporaryDirectory() as tmp:
    second = os.path.join(tmp, "qkvo_r4")
    run([args.peft, "train", "--model", args.model_dir, "--data", "data/pirate_qa.jsonl",
         "--output", second, "--max-steps", "3", "--r", "4", "--lora-alpha", "8",
         "--use-rslora", "true", "--target-modules", "q_proj,k_proj,v_proj,o_proj",
         "--lr", "1e-2", "--dtype", "f32", "--quiet"])
    cases = [("cat", [args.golden, second], [0.7, -0.4]), ("linear", [args.golden] * 2, [0.5, 0.5])]
    for how, dirs, weights in cases:
        ours = os.path.join(tmp, f"ours_{how}")
        cmd = [args.peft, "combine", "--combination", how, "--output", ours,
               "--weights", ",".join(map(str, weights))]
        for d in dirs:
            cmd += ["--adapter", d]
        run(cmd)
        base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, dirs[0], adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            model.load_adapter(d, adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(dirs))]
        model.add_weighted_adapter(names, weights, "combined", combination_type=how)
        theirs_dir = os.path.join(tmp, f"theirs_{how}")
        model.save_pretrained(theirs_dir, selected_adapters=["combined"])
        theirs = load_file(os.path.join(theirs_dir, "combined", "adapter_model.safetensors"))
        mine = load_file(os.path.join(ours, "adapter_model.safetensors"))
        problems = []
        if set(theirs) != set(mine):
            problems.append(f"keys differ: {sorted(set(theirs) ^ set(mine))[:4]}")
        worst = max(((theirs[k] - mine[k]).abs().max().item() for k in theirs if k in mine),
                    default=0.0)
        model.set_adapter("combined")
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([ids])).logits[0]
        out = os.path.join(tmp, f"logits_{how}.safetensors")
        ours_logits = peft_logits(args.peft, args.model_dir, ids, out, "--adapter", ours)
        d = (ours_logits.reshape(hf.shape) - hf).abs().max().item()
        # Logits: the golden fixtures' tolerance (f32 sums in another order).
        if worst > 1e-6 or d > 1e-3:
            problems.append(f"tensors {worst:.2e} apart, logits {d:.2e}")
        failed |= bool(problems)
        print(f"{how}: {len(mine)} tensors, max abs diff {worst:.2e} to HF PEFT's; logits "
              f"{d:.2e} apart" + ("" if not problems else "; " + "; ".join(problems)))
raise SystemExit(1 if failed else 0)
