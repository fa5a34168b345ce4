#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, fine-tune a LoRA adapter on the shipped pirate
# data set for a few minutes, and show a generation before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-model.sh)
cargo build --release --quiet
peft="${CARGO_TARGET_DIR:-target}/release/peft"
out=${1:-out/pirate-lora}
prompt="What is the capital of France?"

echo "== before: $prompt"
$peft generate --model "$model" --prompt "$prompt" --chat --max-new-tokens 40

$peft train --model "$model" --data data/pirate_qa.jsonl --output "$out" \
  --r 16 --lora-alpha 32 --target-modules q_proj,k_proj,v_proj,o_proj \
  --epochs 1 --batch-size 4 --lr 1e-3 --warmup-ratio 0.03 --lr-scheduler cosine \
  --max-seq-length 256 --seed 42

echo "== after (adapter $out): $prompt"
$peft generate --model "$model" --adapter "$out" --prompt "$prompt" --chat --max-new-tokens 40
echo "== after, a question not in the training data"
$peft generate --model "$model" --adapter "$out" --prompt "Why do cats purr?" --chat --max-new-tokens 40
