"""What the check scripts share: their usual flags, running a peft command, and reading the
logits `peft logits` writes. The scripts import it from their own folder."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file

SMOLLM2_DIR = "models/smollm2-135m-instruct"
DEFAULTS = {
    "peft": os.path.expanduser("~/.cache/peft-rs-target/release/peft"),
    "model-dir": SMOLLM2_DIR,
    "smollm-dir": SMOLLM2_DIR,
    "data": "data/pirate_qa.jsonl",
}


def arguments(*flags):
    """A parser with `--peft` and the usual `flags` (`model-dir`, `smollm-dir`, `data`) at
    their defaults; a script adds its own flags before parsing."""
    ap = argparse.ArgumentParser()
    for flag in ("peft",) + flags:
        ap.add_argument(f"--{flag}", default=DEFAULTS[flag])
    return ap


FAILURES = []


def report(ok, what):
    """Prints `what`, marked `ok` or `FAIL`; failures are kept for `exit_status`."""
    if not ok:
        FAILURES.append(what)
    print(("ok   " if ok else "FAIL ") + what)


def exit_status():
    """The exit status of a script whose checks `report` printed: 1 if any failed."""
    return 1 if FAILURES else 0


def run(cmd, **kw):
    """Runs `cmd` (keyword arguments go to subprocess.run); on failure, exits with the end of
    its stderr."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")
    return r


def peft_logits(peft, model, ids, out, *flags):
    """The logits `peft logits --model MODEL FLAGS` writes to `out` for `ids`, in float32
    (`[1, len(ids), vocab]`)."""
    run([peft, "logits", "--model", model, "--input-ids", ",".join(map(str, ids)), "--out", out,
         *flags])
    return load_file(out)["logits"].float()


def trained_lora_vs_hf_peft(args, model_dir, hf_model, ids, out):
    """Trains a LoRA with `peft train` on `model_dir` (3 steps of 2 rows, lr 1e-2, f32, no
    dropout) into `out`, loads it in HF PEFT onto `hf_model` (the same base in transformers),
    and returns HF PEFT's logits for `ids` and their max |diff| from `peft logits`'."""
    run([args.peft, "train", "--model", model_dir, "--data", args.data, "--output", out,
         "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--dtype", "f32",
         "--lora-dropout", "0", "--max-seq-length", "128", "--quiet"])
    peft_model = PeftModel.from_pretrained(hf_model, out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor([ids])).logits
    ours = peft_logits(args.peft, model_dir, ids, os.path.join(out, "logits.safetensors"),
                       "--adapter", out)
    return theirs, (ours - theirs).abs().max().item()


def random_model(cls, config, model_dir, smollm_dir):
    """A model of class `cls` with small random weights (norms N(0, 0.2²), the rest
    N(0, 0.05²), seed 0), saved by transformers into `model_dir` with SmolLM2's tokenizer and
    chat template; returns it in eval mode."""
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(model_dir)
    for f in ["tokenizer.json", "chat_template.jinja", "tokenizer_config.json"]:
        shutil.copy(os.path.join(smollm_dir, f), model_dir)
    return model


def mxfp4_experts(model_dir, config, scales):
    """Turns the experts of the gpt-oss transformers saved in `model_dir` into MXFP4, as OpenAI
    releases gpt-oss: each stacked expert parameter becomes `<name>_blocks` (random codes,
    seed 1) and `<name>_scales` (e8m0 bytes in `range(*scales)`), and config.json gains
    `quantization_config: {"quant_method": "mxfp4", ...}`. The sizes must be multiples of 32."""
    from safetensors.torch import save_file
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    shapes = {"gate_up_proj": (2 * config.intermediate_size, config.hidden_size),
              "down_proj": (config.hidden_size, config.intermediate_size)}
    for layer in range(config.num_hidden_layers):
        for param, (rows, cols) in shapes.items():
            name = f"model.layers.{layer}.mlp.experts.{param}"
            del tensors[name]
            e = config.num_local_experts
            tensors[f"{name}_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16),
                                                      generator=gen, dtype=torch.uint8)
            tensors[f"{name}_scales"] = torch.randint(*scales, (e, rows, cols // 32),
                                                      generator=gen, dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2)


def one_step_logs(peft, model_dir, train, evaluation, tmp, targets, trl_args=None,
                  peft_flags=()):
    """The metrics TRL's SFTTrainer and `peft train` log for one step at a negligible learning
    rate (so both measure the base model; LoRA r 8 on `targets`, no dropout) over one batch of
    the `train` records, with an evaluation on `evaluation` in batches of 2: (TRL's, peft's),
    each a dict of the logged values. `trl_args` go to SFTConfig, `peft_flags` to peft."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = SFTConfig(
        output_dir=f"{tmp}/trl", max_steps=1, per_device_train_batch_size=len(train),
        per_device_eval_batch_size=2, learning_rate=1e-12, logging_steps=1,
        eval_strategy="steps", eval_steps=1, report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", **(trl_args or {}),
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(evaluation), processing_class=tokenizer,
                         peft_config=lora)
    trainer.train()
    trl = {}
    for entry in trainer.state.log_history:
        trl.update(entry)

    data = {}
    for name, rows in [("train", train), ("eval", evaluation)]:
        data[name] = f"{tmp}/{name}.jsonl"
        with open(data[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    out = f"{tmp}/peft"
    target_flag = targets if isinstance(targets, str) else ",".join(targets)
    run([peft, "train", "--model", model_dir, "--data", data["train"],
         "--eval-data", data["eval"], "--output", out, "--max-steps", "1",
         "--batch-size", str(len(train)), "--eval-batch-size", "2", "--lr", "1e-12",
         "--r", "8", "--lora-alpha", "16", "--lora-dropout", "0",
         "--target-modules", target_flag, "--dtype", "f32", "--logging-steps", "1",
         # TRL's default: the loss on every token of a conversation.
         "--assistant-only-loss", "false", "--eval-steps", "1", "--quiet", *peft_flags])
    with open(f"{out}/metrics.jsonl") as f:
        return trl, json.loads(f.readline())
