"""Checks `peft train --chat-template TOKENIZER` against TRL's `clone_chat_template` (what
`SFTConfig(chat_template_path=...)` runs for a tokenizer) on SmolLM2: a source tokenizer made
from SmolLM2's with a template of its own, an EOS token of its own and three added tokens (two
special, one not; one SmolLM2 already has). TRL's tokenizer after cloning and the one peft
saves beside the adapter have the same vocabulary (the added tokens and TRL's `<extra_id_N>`
placeholders at the same ids, their special flags), EOS and template, and tokenize a rendered
conversation alike; the adapter's `trainable_token_indices` are TRL's added tokens; HF PEFT
loads the adapter onto TRL's resized model and gives `peft logits`' logits (as close to its
float64 logits as its own float32 ones).

    .venv/bin/python scripts/hf/check_clone_template.py [--peft PATH] [--model-dir DIR]
"""
import json
import os
import sys
import tempfile

import torch
from peft import PeftModel
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import clone_chat_template

from harness import arguments, exit_status, peft_logits, report, run

args = arguments("model-dir", "data").parse_args()


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|eot|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

with tempfile.TemporaryDirectory() as tmp:
    source_dir = os.path.join(tmp, "source")
    source = AutoTokenizer.from_pretrained(args.model_dir)
    source.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    source.add_special_tokens({"additional_special_tokens": ["<|eot|>", "<|im_start|>",
                                                             "<tool>"]})
    source.chat_template = TEMPLATE
    source.eos_token = "<|eot|>"
    source.save_pretrained(source_dir)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model, tok, added = clone_chat_template(model, tok, source_dir)

    out = os.path.join(tmp, "cloned")
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", out,
         "--chat-template", source_dir, "--max-steps", "2", "--batch-size", "2", "--lr", "5e-2",
         "--warmup-steps", "0", "--dtype", "f32", "--lora-dropout", "0", "--quiet"])
    ours = AutoTokenizer.from_pretrained(out)
    same_vocab = ours.get_vocab() == tok.get_vocab()
    flags = lambda t: {i: (a.content, a.special) for i, a in t.added_tokens_decoder.items()}
    same_flags = flags(ours) == flags(tok)
    report(same_vocab and same_flags and len(ours) == len(tok) == model.vocab_size,
           f"the saved tokenizer has TRL's vocabulary ({len(ours)} entries, TRL's "
           f"{len(tok)}; embedding {model.vocab_size}), added tokens and flags alike: "
           f"{same_flags}")
    report(ours.eos_token == tok.eos_token and ours.chat_template == tok.chat_template,
           f"EOS {ours.eos_token!r} (TRL {tok.eos_token!r}) and the template alike")
    messages = [{"role": "user", "content": "Where is <think> the treasure?"},
                {"role": "assistant", "content": "Buried <tool> on the isle."}]
    ids_ours = ours.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids_trl = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    report(ids_ours == ids_trl, f"a rendered conversation tokenizes alike ({len(ids_ours)} ids)")

    config = json.load(open(os.path.join(out, "adapter_config.json")))
    report(config.get("trainable_token_indices") == added,
           f"trainable_token_indices are TRL's added tokens ({len(added)}: "
           f"{added[:4]} ... {added[-1]})")

    peft_model = PeftModel.from_pretrained(model, out).eval()
    ids = [1] + list(ids_trl[:20]) + added[:3]
    with torch.no_grad():
        theirs = peft_model(torch.tensor([ids])).logits
    logits = peft_logits(args.peft, args.model_dir, ids, os.path.join(tmp, "l.safetensors"),
                         "--adapter", out)
    d = (logits - theirs).abs().max().item() if logits.shape == theirs.shape else float("inf")
    # The trained adapter (all 64 new rows move through the tied head) amplifies float32
    # rounding: HF's own float32 logits are compared with its float64 ones as well.
    peft_model.double()
    with torch.no_grad():
        exact = peft_model(torch.tensor([ids])).logits
    ours_err = (logits.double() - exact).abs().max().item()
    hf_err = (theirs.double() - exact).abs().max().item()
    report(d < 2e-4 or ours_err <= 1.5 * hf_err,
           f"HF PEFT on TRL's resized model vs peft logits: max |diff| {d:.2e}; from HF PEFT "
           f"in float64: peft {ours_err:.2e}, HF PEFT in float32 {hf_err:.2e}")

sys.exit(exit_status())
