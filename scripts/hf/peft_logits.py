#!/usr/bin/env python3
"""Reference forward pass with Hugging Face transformers + PEFT, for interop checks of peft-rs.

Loads the base model (float32), applies an adapter folder with PeftModel.from_pretrained, runs one
plain forward call on the given token ids and saves the float32 logits as tensor `logits`
[1, seq, vocab] in a safetensors file (plus `input_ids`). For prompt tuning, PEFT returns outputs for
the virtual tokens too, so seq = virtual tokens + input length there (as in the golden fixtures).

    python scripts/hf/peft_logits.py --model-dir models/smollm2-135m-instruct \
        --adapter /work/shared/golden/lora_qv_r8 --out out/lora_qv_r8_logits.safetensors \
        [--input-ids 1,2,3] [--expected /work/shared/golden/lora_qv_r8/expected.safetensors]
"""
import argparse
import logging
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never try the hub

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# Batch-1 prompt of the golden fixtures (/work/shared/golden/README.md):
# "The capital of France is Paris. The capital of Germany is"
DEFAULT_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314]


def adapter_file(adapter_dir):
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        p = os.path.join(adapter_dir, name)
        if os.path.exists(p):
            return p
    sys.exit(f"no adapter_model.safetensors in {adapter_dir}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="HF folder of the base model")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--out", required=True, help="output .safetensors (tensor `logits`, f32 [1, seq, vocab])")
    ap.add_argument("--input-ids", default=",".join(map(str, DEFAULT_IDS)), help="comma-separated token ids")
    ap.add_argument("--expected", help="optional safetensors file with a reference `logits` tensor to diff against")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the golden set)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    ids = torch.tensor([[int(t) for t in a.input_ids.split(",") if t.strip()]], dtype=torch.long)
    mask = torch.ones_like(ids)

    base = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    base.eval()
    total = sum(p.numel() for p in base.parameters())  # before PEFT injects its layers

    # PEFT reports missing/unexpected adapter keys with warnings.warn / logging; capture and echo them.
    logging.basicConfig(level=logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    for w in caught:
        msg = str(w.message)
        if "key" in msg.lower():
            print(f"PEFT WARNING: {msg}")

    # Independent key check: the tensors in the file vs the adapter tensors the model expects.
    file_sd = load_file(adapter_file(a.adapter))
    model_sd = get_peft_model_state_dict(model, save_embedding_layers=False)
    missing = sorted(set(model_sd) - set(file_sd))
    unexpected = sorted(set(file_sd) - set(model_sd))
    bad_shape = sorted(k for k in set(file_sd) & set(model_sd) if file_sd[k].shape != model_sd[k].shape)
    print(f"adapter: {a.adapter} ({model.peft_config['default'].peft_type.value}), {len(file_sd)} tensors in file")
    print(f"missing keys: {len(missing)}  unexpected keys: {len(unexpected)}  shape mismatches: {len(bad_shape)}")
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)):
        for k in keys[:10]:
            print(f"  {label}: {k}")
        if len(keys) > 10:
            print(f"  ... {len(keys) - 10} more {label}")

    adapter_params = sum(t.numel() for t in model_sd.values())
    print(f"adapter (trainable) parameters: {adapter_params:,}  base parameters: {total:,}")

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float().contiguous()
    print(f"logits shape: {list(logits.shape)}")

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file({"logits": logits, "input_ids": ids}, a.out)
    print(f"wrote {a.out}")

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    probs = torch.softmax(logits[0, -1], dim=-1)
    top = torch.topk(logits[0, -1], 5)
    print("top-5 next tokens:")
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {i:6d} {tok.decode([i])!r:20} logit {v:9.4f}  p {probs[i].item():.4f}")

    if a.expected:
        with safe_open(a.expected, "pt") as fh:
            ref = fh.get_tensor("logits").float()
        if ref.shape != logits.shape:
            print(f"expected shape {list(ref.shape)} != {list(logits.shape)}: not compared")
            sys.exit(1)
        diff = (ref - logits).abs().max().item()
        print(f"max abs diff vs {a.expected} `logits`: {diff:.3e}")


if __name__ == "__main__":
    main()
