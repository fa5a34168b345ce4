#!/usr/bin/env bash
# On the GPU machine, with .gpu/ from scripts/gpu/prepare.sh: where a training step's GPU time
# goes. Nsight Compute times every kernel of one `peft bench` step (ncu_<case>.csv.gz, one row
# per launch: name and gpu__time_duration; the bench's own JSON lines in profile_bench.jsonl),
# and torch's profiler does the same for HF PEFT on the 1B shape (hf_profile.txt).
# scripts/gpu/kernel_table.py sums the CSVs by kernel afterwards.
# The profiled step runs the paths kernel tuning chooses for its case: a tuned `peft bench`
# step outside the profiler first names them (its JSON's kernel_tuning.settings), and the
# profiled run takes them from the environment, untuned (tuning's passes would be profiled
# too). --as-built: the paths as built (or as the environment sets them), no tuning run.
#   scripts/gpu/profile.sh [--no-hf] [--as-built] [CASE...]
#   CASE: smol, 1b, 1b-all, 1b-full, 8b (default: 1b smol)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench/out}
mkdir -p "$out"
. scripts/gpu/env.sh
# Kernel times of one step, summed per kernel, are printed from the CSV by kernel_table.py.
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
echo "ncu: ${ncu:-none}"
hf=1 tuned=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-hf) hf=0; shift ;;
    --as-built) tuned=0; shift ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || set -- 1b smol
for c in "$@"; do
  case "$c" in
    smol) a=(--shape smollm2-135m --target-modules q_proj,k_proj,v_proj,o_proj --batch-size 8 --seq-len 1024) ;;
    1b) a=(--shape llama-3.2-1b --target-modules q_proj,k_proj,v_proj,o_proj --batch-size 4 --seq-len 1024) ;;
    1b-all) a=(--shape llama-3.2-1b --target-modules all-linear --batch-size 4 --seq-len 1024) ;;
    8b) a=(--shape llama-3-8b --target-modules q_proj,k_proj,v_proj,o_proj --batch-size 2 --seq-len 2048) ;;
    1b-full) a=(--shape llama-3.2-1b --method full --batch-size 4 --seq-len 1024) ;;
    *) echo "unknown case $c" >&2; continue ;;
  esac
  flags=(bench --device cuda --dtype bf16 --r 16 --lora-alpha 32 --lora-dropout 0 "${a[@]}")
  settings=()
  if [ "$tuned" = 1 ]; then
    read -ra settings < <(timeout 120 "$bin/peft" "${flags[@]}" --kernel-tuning on --warmup 0 --steps 1 \
        2>/dev/null | tail -n 1 | python3 -c 'import json, sys
try: print(" ".join(json.loads(sys.stdin.read())["kernel_tuning"]["settings"]))
except Exception: print()')
  fi
  echo "$c: paths ${settings[*]:-as built}"
  # One untimed step, then the profiled one (the first step also creates handles and pools).
  env "${settings[@]}" PEFT_KERNEL_TUNING=off timeout 80 "$ncu" --clock-control none \
      --metrics gpu__time_duration.sum --csv --page raw --log-file "$out/ncu_$c.csv" \
      "$bin/peft" "${flags[@]}" --warmup 1 --steps 1 | tail -n 1 >> "$out/profile_bench.jsonl"
  echo "$c: exit $?, $(wc -l < "$out/ncu_$c.csv") lines"
  gzip -9f "$out/ncu_$c.csv"
done
[ "$hf" = 1 ] || exit 0
PYTHONUNBUFFERED=1 timeout 50 python3 scripts/gpu/hf_profile.py > "$out/hf_profile.txt" 2>&1
echo "hf profile: exit $?"
tail -n 30 "$out/hf_profile.txt"
