#!/usr/bin/env bash
# peft-rs vs Hugging Face PEFT on this CPU, same shape, run alternately in one go.
# Prints each run's JSON and then the ratios (tokens/s ours / HF, peak RSS ours / HF).
#
#   bench/vs_hf_cpu.sh [--steps N] [--warmup N] [--threads N] [--rounds N] [-- extra peft bench flags]
#
# Needs Python 3 with pip: the first run makes .venv (torch, transformers, peft from PyPI,
# several GB) and the HF copy of the default model (models/smollm2-135m-instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=5 warmup=2 threads=2 rounds=1 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
model=$(scripts/fetch-model.sh)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r scripts/hf/requirements.txt
fi
[ -f models/smollm2-135m-instruct/model.safetensors ] || .venv/bin/python scripts/hf/build_base_model.py
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/peft"
shape=(--r 16 --seq-len 256 --steps "$steps" --warmup "$warmup" --threads "$threads")
log=$(mktemp)
for _ in $(seq "$rounds"); do
  hf=$(.venv/bin/python ../shared/bench/hf_peft_cpu.py --model-dir models/smollm2-135m-instruct \
        --method lora --alpha 32 --batch 4 --target q_proj,k_proj,v_proj,o_proj "${shape[@]}" 2>/dev/null | tail -n 1)
  ours=$("$bin" bench --model "$model" --lora-alpha 32 --batch-size 4 \
        --target-modules q_proj,k_proj,v_proj,o_proj "${shape[@]}" "${extra[@]}")
  echo "hf:   $hf"
  echo "ours: $ours"
  printf '%s\n%s\n' "$hf" "$ours" >> "$log"
done
python3 - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
hf, ours = rows[0::2], rows[1::2]
best = lambda rs, k, f: f(r[k] for r in rs)
tps = best(ours, "tokens_per_s", max) / best(hf, "tokens_per_s", max)
rss = best(ours, "peak_rss_mib", min) / best(hf, "peak_rss_mib", min)
print(json.dumps({"tokens_per_s_ratio": round(tps, 3), "peak_rss_ratio": round(rss, 3),
                  "target": {"tokens_per_s_ratio": ">= 1.5", "peak_rss_ratio": "<= 0.6"},
                  "met": tps >= 1.5 and rss <= 0.6}))
PY
rm -f "$log"
