"""Compares the token metrics `peft train` logs (entropy, mean_token_accuracy and their eval_
forms, with the losses) with TRL's SFTTrainer on the same records: SmolLM2, LoRA all-linear without dropout, one
step at a negligible learning rate, so that both runs measure the base model (the adapter's B
starts at zero). The train metrics are one batch of all the records; the eval metrics the mean
over eval batches of 2, which TRL and peft both average.

    .venv/bin/python scripts/hf/check_token_metrics.py [--peft PATH] [--model-dir DIR]
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ap = argparse.ArgumentParser()
ap.add_argument("--peft", default=os.path.expanduser("~/.cache/peft-rs-target/release/peft"))
ap.add_argument("--model-dir", default="models/smollm2-135m-instruct")
ap.add_argument("--data", default="data/pirate_qa.jsonl")
args = ap.parse_args()

records = [json.loads(line) for line in open(args.data)][:10]
train, evaluation = records[:6], records[6:]
tmp = tempfile.mkdtemp()
for name, rows in [("train", train), ("eval", evaluation)]:
    with open(f"{tmp}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
config = SFTConfig(
    output_dir=f"{tmp}/trl", max_steps=1, per_device_train_batch_size=len(train),
    per_device_eval_batch_size=2, learning_rate=1e-12, logging_steps=1, eval_strategy="steps",
    eval_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                  task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                     eval_dataset=Dataset.from_list(evaluation), processing_class=tokenizer,
                     peft_config=lora)
trainer.train()
trl = {}
for entry in trainer.state.log_history:
    trl.update(entry)

out = f"{tmp}/peft"
subprocess.run([args.peft, "train", "--model", args.model_dir, "--data", f"{tmp}/train.jsonl",
                "--eval-data", f"{tmp}/eval.jsonl", "--output", out, "--max-steps", "1",
                "--batch-size", str(len(train)), "--eval-batch-size", "2", "--lr", "1e-12",
                "--r", "8", "--lora-alpha", "16", "--lora-dropout", "0",
                "--target-modules", "all-linear", "--dtype", "f32", "--logging-steps", "1",
                # TRL's default: the loss on every token of a conversation.
                "--assistant-only-loss", "false",
                "--eval-steps", "1", "--quiet"], check=True, capture_output=True)
ours = json.loads(open(f"{out}/metrics.jsonl").readline())

failed = 0
for key in ["loss", "entropy", "mean_token_accuracy", "eval_loss", "eval_entropy",
            "eval_mean_token_accuracy"]:
    # f32 logits computed in another order can swap a near tie: allow one token of the batch.
    tolerance = 1 / 100 if "accuracy" in key else 1e-4 * abs(trl[key])
    ok = abs(ours[key] - trl[key]) <= tolerance
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {key:26s} peft {ours[key]:.6f}  TRL {trl[key]:.6f}")
raise SystemExit(failed)
