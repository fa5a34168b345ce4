"""Checks LoRA with `trainable_token_indices`, and the trainable-tokens method alone
(`--method trainable-tokens`, HF PEFT's TrainableTokensConfig), against HF PEFT on SmolLM2
(tied embedding), each way:

- `peft train --trainable-token-indices 2,1` (<|im_end|>, <|im_start|>: in the user's order)
  writes an adapter that HF PEFT loads with no missing or unexpected key and whose logits
  equal `peft logits`'s;
- an adapter HF PEFT made (its token rows, and LoRA weights, moved by seeded noise) gives in
  `peft logits` the logits HF PEFT gives, unmerged and merged (`merge_and_unload`).

    .venv/bin/python scripts/hf/check_trainable_tokens.py [--peft PATH] [--model-dir DIR]
"""

import json
import sys
import tempfile
import warnings

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from harness import arguments, peft_logits, run

args = arguments("model-dir", "data").parse_args()
tmp = tempfile.mkdtemp()
# <|im_start|> (1) and <|im_end|> (2) among ordinary tokens.
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 520, 9531, 198, 11173, 3365, 2]
KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def adapter_logits(adapter, merged=False):
    out = f"{adapter}/logits.safetensors"
    flags = ["--adapter", adapter] + (["--merged"] if merged else [])
    return peft_logits(args.peft, args.model_dir, IDS, out, *flags)[0]


def base():
    return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)


@torch.no_grad()
def logits(model):
    return model(torch.tensor([IDS])).logits[0]


failed = 0


def check(ok, what):
    global failed
    failed += not ok
    print(("ok   " if ok else "FAIL ") + what)


def both_ways(what, train_flags, hf_config, key):
    ours = f"{tmp}/{what}-ours"
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", ours,
         "--trainable-token-indices", "2,1", "--max-steps", "4", "--batch-size", "2", "--lr",
         "1e-2", "--dtype", "f32", "--quiet"] + train_flags)
    config = json.load(open(f"{ours}/adapter_config.json"))
    saved = load_file(f"{ours}/adapter_model.safetensors")
    indices = config.get("trainable_token_indices", config.get("token_indices"))
    moved = (saved[key] - base().model.embed_tokens.weight[[2, 1]]).abs().max().item()
    check(indices == [2, 1] and moved > 1e-3,
          f"{what}: saved tokens {indices}, rows {tuple(saved[key].shape)} moved by up to "
          f"{moved:.3f} in training")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = PeftModel.from_pretrained(base(), ours)
    keys = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    check(not keys, f"{what}: HF PEFT loads peft's adapter with no missing or unexpected key {keys}")
    diff = (logits(hf) - adapter_logits(ours)).abs().max().item()
    check(diff < 1e-4, f"{what}: peft's adapter in HF PEFT vs peft logits: max |diff| {diff:.2e}")

    theirs = f"{tmp}/{what}-theirs"
    torch.manual_seed(0)
    model = get_peft_model(base(), hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(theirs)
    want = logits(model)
    diff = (adapter_logits(theirs) - want).abs().max().item()
    check(diff < 1e-4, f"{what}: HF PEFT's adapter in peft logits: max |diff| {diff:.2e}")
    merged = logits(model.merge_and_unload())
    diff = (adapter_logits(theirs, merged=True) - merged).abs().max().item()
    check(diff < 1e-4, f"{what}: merged, both: max |diff| {diff:.2e} (unmerged vs merged in HF: "
          f"{(merged - want).abs().max().item():.1e})")


both_ways("LoRA", ["--target-modules", "q_proj,v_proj", "--r", "8"],
          LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     trainable_token_indices=[2, 1, 100]), KEY)
both_ways("trainable tokens", ["--method", "trainable-tokens"],
          TrainableTokensConfig(token_indices=[2, 1, 100]),
          "base_model.model.model.embed_tokens.trainable_tokens_delta")
sys.exit(1 if failed else 0)
