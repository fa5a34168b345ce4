"""Compares `peft generate` with transformers' `generate` on SmolLM2 in the settings that
decide tokens without a random draw: greedy decoding, with and without transformers'
repetition_penalty (which also applies to greedy decoding), and sampling whose top-k or
min-p cut leaves a single token.

    .venv/bin/python scripts/hf/check_generate.py [--peft target/release/peft]
"""

import argparse
import subprocess

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", default="models/smollm2-135m-instruct")
ap.add_argument("--peft", default="target/release/peft")
args = ap.parse_args()

tok = AutoTokenizer.from_pretrained(args.model_dir)
model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
PROMPTS = ["Write a list of fruits.", "What is the capital of France?"]
# (label, transformers' generate options, peft's flags)
SETTINGS = [
    ("greedy", {}, []),
    ("greedy, repetition_penalty 1.3", {"repetition_penalty": 1.3}, ["--repetition-penalty", "1.3"]),
    ("greedy, repetition_penalty 0.8", {"repetition_penalty": 0.8}, ["--repetition-penalty", "0.8"]),
    ("sampling, top_k 1, repetition_penalty 1.2",
     {"do_sample": True, "top_k": 1, "temperature": 0.7, "repetition_penalty": 1.2},
     ["--temperature", "0.7", "--top-k", "1", "--repetition-penalty", "1.2"]),
    ("sampling, min_p 1", {"do_sample": True, "min_p": 1.0, "temperature": 1.3},
     ["--temperature", "1.3", "--min-p", "1"]),
]
failed = False
for prompt in PROMPTS:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    for label, options, flags in SETTINGS:
        options = dict(options)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, top_p=None, top_k=options.pop("top_k", None),
                                 temperature=options.pop("temperature", None),
                                 do_sample=options.pop("do_sample", False), **options)
        theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        ours = subprocess.run([args.peft, "generate", "--model", args.model_dir, "--chat",
                               "--prompt", prompt, "--max-new-tokens", "48", *flags],
                              check=True, capture_output=True, text=True).stdout.strip()
        same = ours == theirs.strip()
        failed |= not same
        print(f"{prompt!r}, {label}: " + ("identical" if same else
                                           f"DIFFER\n  peft         {ours!r}\n  transformers {theirs!r}"))
raise SystemExit(1 if failed else 0)
