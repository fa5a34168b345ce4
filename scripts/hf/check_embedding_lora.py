"""Checks LoRA on the embedding (`target_modules` with `embed_tokens`: HF PEFT's
`lora_embedding_A` and `lora_embedding_B`) against HF PEFT on SmolLM2, whose head is tied to
the embedding:
1. an adapter HF PEFT made (q_proj and embed_tokens, random A and B; HF PEFT also saves the
   embedding's own weight beside them) gives HF's logits in `peft logits`, unmerged (the tied
   head reads the embedding as it was) and merged (the head reads the merged embedding, as in
   HF's merged model);
2. `peft train --target-modules q_proj,v_proj,embed_tokens` trains both kinds of pair, and HF
   PEFT loads the adapter with no missing or unexpected key and gives `peft logits`' logits.

    .venv/bin/python scripts/hf/check_embedding_lora.py [--peft PATH] [--model-dir DIR]
"""
import os
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from harness import arguments, peft_logits, run

args = arguments("model-dir", "data").parse_args()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
failed = False


def report(ok, what):
    global failed
    failed |= not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}")


def base():
    return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()


with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    torch.manual_seed(0)
    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "embed_tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.05)
    model.eval().save_pretrained(hf_dir)
    keys = sorted(k for k in load_file(os.path.join(hf_dir, "adapter_model.safetensors"))
                  if "embed_tokens" in k)
    with torch.no_grad():
        hf = model(torch.tensor([IDS])).logits
        with model.disable_adapter():
            plain = model(torch.tensor([IDS])).logits
        merged = model.merge_and_unload()(torch.tensor([IDS])).logits
    ours = peft_logits(args.peft, args.model_dir, IDS, os.path.join(tmp, "a.safetensors"),
                       "--adapter", hf_dir)
    ours_merged = peft_logits(args.peft, args.model_dir, IDS, os.path.join(tmp, "b.safetensors"),
                              "--adapter", hf_dir, "--merged")
    d, dm = (ours - hf).abs().max().item(), (ours_merged - merged).abs().max().item()
    moved = (hf - plain).abs().max().item()
    report(d < 2e-4 and moved > 0.1,
           f"HF PEFT's adapter ({', '.join(k.rsplit('.', 1)[-1] for k in keys)} on embed_tokens) "
           f"in peft logits: max |diff| {d:.2e} (the adapter moves them by {moved:.2f})")
    report(dm < 2e-4, f"merged: max |diff| {dm:.2e} (HF's merged vs unmerged: "
                      f"{(merged - hf).abs().max().item():.2e}, the tied head)")

    ours_dir = os.path.join(tmp, "ours")
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", ours_dir,
         "--target-modules", "q_proj,v_proj,embed_tokens", "--r", "8", "--lora-alpha", "16",
         "--lora-dropout", "0", "--max-steps", "4", "--batch-size", "2", "--lr", "5e-3",
         "--warmup-steps", "0", "--dtype", "f32", "--quiet"])
    saved = load_file(os.path.join(ours_dir, "adapter_model.safetensors"))
    a = saved["base_model.model.model.embed_tokens.lora_embedding_A"]
    report(a.abs().max().item() > 0, f"peft train moved lora_embedding_A {tuple(a.shape)} "
                                     f"from zero by up to {a.abs().max().item():.2e}")
    peft_model = PeftModel.from_pretrained(base(), ours_dir).eval()
    made = {k.replace(".default", "") for k in peft_model.state_dict() if "lora_" in k}
    missing, unexpected = sorted(made - set(saved)), sorted(set(saved) - made)
    report(not missing and not unexpected,
           f"HF PEFT loads peft's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        theirs = peft_model(torch.tensor([IDS])).logits
    ours = peft_logits(args.peft, args.model_dir, IDS, os.path.join(tmp, "c.safetensors"),
                       "--adapter", ours_dir)
    d = (ours - theirs).abs().max().item()
    report(d < 2e-4, f"peft's adapter in HF PEFT vs peft logits: max |diff| {d:.2e}")

sys.exit(1 if failed else 0)
