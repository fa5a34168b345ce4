#!/usr/bin/env bash
# peft-rs vs Hugging Face PEFT on this CPU, same shape, run alternately in one go.
# Prints each run's JSON and then the ratios (tokens/s ours / HF, peak RSS ours / HF).
#
#   bench/vs_hf_cpu.sh [--steps N] [--warmup N] [--threads N] [--rounds N] [--dtype bf16|f32]
#                      [--all] [-- extra peft bench flags]
#
# peft-rs trains in --dtype (default bf16: on a CPU that is mixed precision as PyTorch's CPU
# autocast does it, f32 weights with bf16 matmuls on AVX512-BF16); HF PEFT runs the reference
# script in float32. The same shape is then trained by peft-rs in f32 too, and the first losses
# of the two peft-rs runs must agree within 2% (the "same loss curve" condition).
#
# --all then also measures, once each and side by side: all-linear LoRA training, full
# fine-tuning, forward-only throughput (base + unmerged LoRA) and greedy generation (batch 1,
# 64 new tokens) with the adapter unmerged and merged.
#
# Needs Python 3 with pip: the first run makes .venv (torch, transformers, peft from PyPI,
# several GB) and the HF copy of the default model (models/smollm2-135m-instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=8 warmup=2 threads=2 rounds=1 all=0 dtype=bf16 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --all) all=1; shift ;;
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
  ours=$("$bin" bench --model "$model" --lora-alpha 32 --batch-size 4 --dtype "$dtype" \
        --target-modules q_proj,k_proj,v_proj,o_proj "${shape[@]}" "${extra[@]}")
  echo "hf:   $hf"
  echo "ours: $ours"
  printf '%s\n%s\n' "$hf" "$ours" >> "$log"
done
f32=$("$bin" bench --model "$model" --lora-alpha 32 --batch-size 4 --dtype f32 \
      --target-modules q_proj,k_proj,v_proj,o_proj "${shape[@]}" "${extra[@]}")
echo "ours f32 reference: $f32"
python3 - "$log" "$f32" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
hf, ours = rows[0::2], rows[1::2]
best = lambda rs, k, f: f(r[k] for r in rs)
tps = best(ours, "tokens_per_s", max) / best(hf, "tokens_per_s", max)
rss = best(ours, "peak_rss_mib", min) / best(hf, "peak_rss_mib", min)
ref = json.loads(sys.argv[2])["losses"][:10]
curve = max(abs(a - b) / abs(b) for a, b in zip(ours[0]["losses"][:10], ref))
print(json.dumps({"tokens_per_s_ratio": round(tps, 3), "peak_rss_ratio": round(rss, 3),
                  "losses_compared": len(ref), "loss_curve_max_rel_diff_vs_f32": round(curve, 5),
                  "target": {"tokens_per_s_ratio": ">= 1.5", "peak_rss_ratio": "<= 0.6",
                             "loss_curve_max_rel_diff_vs_f32": "<= 0.02"},
                  "met": tps >= 1.5 and rss <= 0.6 and curve <= 0.02}))
PY
rm -f "$log"
[ "$all" = 1 ] || exit 0

hf_run() { .venv/bin/python ../shared/bench/hf_peft_cpu.py --model-dir models/smollm2-135m-instruct \
             --alpha 32 --threads "$threads" "$@" 2>/dev/null | tail -n 1; }
ours_run() { "$bin" bench --model "$model" --lora-alpha 32 --threads "$threads" "$@"; }
train=(--r 16 --seq-len 256 --steps "$steps" --warmup "$warmup")
log=$(mktemp)
{
  echo "lora-all $(hf_run --method lora-all --batch 4 "${train[@]}")"
  echo "lora-all $(ours_run --batch-size 4 --dtype "$dtype" --target-modules all-linear "${train[@]}")"
  echo "full $(hf_run --method full --batch 4 "${train[@]}")"
  echo "full $(ours_run --method full --batch-size 4 --dtype "$dtype" "${train[@]}")"
  echo "forward $(hf_run --method fwd-lora --batch 4 --target q_proj,k_proj,v_proj,o_proj "${train[@]}")"
  echo "forward $(ours_run --mode forward --batch-size 4 --dtype "$dtype" --target-modules q_proj,k_proj,v_proj,o_proj "${train[@]}")"
  echo "gen-unmerged $(hf_run --method gen-lora --batch 1 --r 16 --steps 6 --warmup 1)"
  echo "gen-merged $(hf_run --method gen-merged --batch 1 --r 16 --steps 6 --warmup 1)"
  echo "gen $(ours_run --mode generate --r 16 --target-modules q_proj,k_proj,v_proj,o_proj --steps 6 --warmup 1)"
} | tee "$log"
python3 - "$log" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
    name, _, text = line.partition(" ")
    runs.setdefault(name, []).append(json.loads(text))
rows = []
def row(what, hf, ours, key="tokens_per_s"):
    rows.append({"run": what, "hf_tokens_per_s": hf and round(hf[key], 1),
                 "ours_tokens_per_s": ours and round(ours, 1),
                 "ratio": round(ours / hf[key], 3) if hf and ours else None,
                 "hf_peak_rss_mib": hf and round(hf["peak_rss_mib"]),})
hf_all, ours_all = runs["lora-all"]
row("lora all-linear train", hf_all, ours_all["tokens_per_s"])
rows[-1]["ours_peak_rss_mib"] = round(ours_all["peak_rss_mib"])
hf_full, ours_full = runs["full"]
row("full fine-tuning train", hf_full, ours_full["tokens_per_s"])
rows[-1]["ours_peak_rss_mib"] = round(ours_full["peak_rss_mib"])
hf_fwd, ours_fwd = runs["forward"]
row("forward (unmerged lora)", hf_fwd, ours_fwd["tokens_per_s"])
gen = runs["gen"][0]
row("generate, lora unmerged", runs["gen-unmerged"][0], gen["unmerged_tokens_per_s"])
row("generate, merged", runs["gen-merged"][0], gen["merged_tokens_per_s"])
for r in rows:
    print(json.dumps(r))
print(json.dumps({"ours_generate_unmerged_vs_merged": round(gen["unmerged_vs_merged"], 3),
                  "target": ">= 0.95"}))
PY
rm -f "$log"
