#!/usr/bin/env bash
# What each of our GPU kernel groups gains: one `peft bench --device cuda` case with every
# kernel on, then with each group turned off in turn (PEFT_CUDA_OFF, docs/gpu.md), then with
# all off, and a table of tokens/s, peak memory and losses against the all-on run. A group
# whose run gives other losses than the all-on run (beyond bf16 noise) is also the place to
# look when a GPU result is wrong.
#
#   bench/gpu_ablation.sh [--peft PATH] [--out DIR] [--qlora] [-- extra bench flags]
#
# Default case: Llama-3.2-1B shape, LoRA q,k,v,o, 4 x 1024, bf16. --qlora: all-linear QLoRA
# (NF4, double quantization, paged 8-bit AdamW), which also exercises dequantization.
set -uo pipefail
cd "$(dirname "$0")/.."
peft=target/release/peft out=${OUT:-bench/out} qlora=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --peft) peft=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --qlora) qlora=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
# Each group off against the defaults: no kernel tuning around it.
export PEFT_KERNEL_TUNING=off
SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
export LD_LIBRARY_PATH="${SP:+$SP/nvidia/cu13/lib:}${LD_LIBRARY_PATH:-}"
flags=(bench --device cuda --dtype bf16 --shape llama-3.2-1b --r 16 --lora-alpha 32
       --batch-size 4 --seq-len 1024 --warmup 2 --steps 5)
groups="attention rms_norm swiglu low_rank loss optimizer add in_op"
if [ "$qlora" = 1 ]; then
  flags+=(--target-modules all-linear --quantize nf4 --double-quant --optim paged_adamw_8bit)
  groups="$groups dequantize"
else
  flags+=(--target-modules q_proj,k_proj,v_proj,o_proj)
fi
results=$out/ablation.jsonl
: > "$results"
for off in "" $groups all; do
  line=$(PEFT_CUDA_OFF=$off timeout "${CASE_TIMEOUT:-240}" "$peft" "${flags[@]}" "${extra[@]}" \
      2>"$out/err_ablation_${off:-none}.txt" | tail -n 1)
  [ -n "$line" ] || line='{"error": "no result (see errors)"}'
  echo "{\"off\": \"${off:-none}\", \"result\": $line}" | tee -a "$results" >&2
done
python3 - "$results" "$out/ablation.md" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = next((r["result"] for r in runs if r["off"] == "none" and "error" not in r["result"]), None)
rows = ["| kernels off | tokens/s | vs all on | step ms | peak MiB | last loss | max loss diff vs all on |",
        "|---|---:|---:|---:|---:|---:|---:|"]
for run in runs:
    r = run["result"]
    if "error" in r:
        rows.append(f"| {run['off']} | error | | | | | |")
        continue
    speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"])) if base else float("nan")
    rows.append(f"| {run['off']} | {r['tokens_per_s']:.0f} | {speed:.2f} | {1000 * r['step_s_median']:.1f} "
                f"| {r['peak_device_mib'] or 0:.0f} | {r['loss_last']:.4f} | {diff:.4f} |")
table = "\n".join(rows)
print(table)
open(sys.argv[2], "w").write(table + "\n")
PY
