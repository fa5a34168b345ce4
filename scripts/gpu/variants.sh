#!/usr/bin/env bash
# On the GPU machine, with .gpu/ from scripts/gpu/prepare.sh: `peft bench` on issue 4's three
# shapes as built, then with each kernel variant DIR (PEFT_CUDA_KERNELS: the .cu files of
# crates/peft-ops/src/kernels, same kernel arguments) and each environment setting KEY=VALUE
# (say PEFT_CUDA_LORA=kernels, PEFT_LAYER_TAPE=off; several at once separated by spaces, as
# "PEFT_CUDA_LORA=kernels PEFT_CUDA_ATTENTION=flash"), side by side: what a variant gains,
# measured in one lease. variants.jsonl and a table go to $OUT; then one layer's attention of
# each shape alone under each variant (`peft bench --mode attention`, seconds each):
# variants_attention.jsonl and its table.
#   scripts/gpu/variants.sh [--kernels DIR]... [--env KEY=VALUE]...
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench/out}
mkdir -p "$out"
variants=(built)
while [ $# -gt 0 ]; do
  case "$1" in
    --kernels) variants+=("$2"); shift 2 ;;
    --env) variants+=("env:$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/gpu/env.sh
# Each variant as set, the rest at the defaults: no kernel tuning around it.
export PEFT_KERNEL_TUNING=off
# `peft bench ARGS...` under variant V (built, env:KEY=VALUE... or a kernel folder) within
# SECONDS: its JSON line, or {"error": the tail of its output}.
bench_under() {
  local v=$1 seconds=$2 env=() line
  shift 2
  case "$v" in
    built) ;;
    env:*) read -ra env <<< "${v#env:}" ;;
    *) env=(PEFT_CUDA_KERNELS="$v") ;;
  esac
  line=$(env "${env[@]}" timeout "$seconds" "$bin/peft" bench --device cuda --dtype bf16 "$@" 2>&1 | tail -n 1)
  case "$line" in
    \{*) echo "$line" ;;
    *) printf '{"error": %s}\n' "$(printf '%s' "$line" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()[-300:]))')" ;;
  esac
}
: > "$out/variants.jsonl"
while read -r name shape batch seq warmup steps; do
  for v in "${variants[@]}"; do
    line=$(bench_under "$v" "${CASE_TIMEOUT:-90}" --shape "$shape" --lora-dropout 0 --r 16 --lora-alpha 32 \
        --target-modules q_proj,k_proj,v_proj,o_proj --batch-size "$batch" --seq-len "$seq" \
        --warmup "$warmup" --steps "$steps")
    echo "{\"case\": \"$name\", \"kernels\": \"$v\", \"result\": $line}" >> "$out/variants.jsonl"
  done
done <<'CASES'
smol-attn-8x1024 smollm2-135m 8 1024 3 10
1b-attn-4x1024 llama-3.2-1b 4 1024 3 10
8b-attn-2x2048 llama-3-8b 2 2048 2 6
CASES
: > "$out/variants_attention.jsonl"
while read -r shape batch seq; do
  for v in "${variants[@]}"; do
    line=$(bench_under "$v" 60 --mode attention --shape "$shape" --batch-size "$batch" \
        --seq-len "$seq" --warmup 3 --steps 10)
    echo "{\"kernels\": \"$v\", \"result\": $line}" >> "$out/variants_attention.jsonl"
  done
done <<'CASES'
smollm2-135m 8 1024
llama-3.2-1b 4 1024
llama-3-8b 2 2048
CASES
python3 - "$out/variants.jsonl" "$out/variants_attention.jsonl" "$out/hf_anchor.jsonl" <<'PY'
import json, os, sys
# HF's figures of this run (check.sh runs the anchor first), for the speed and memory ratios.
hf = {}
if os.path.exists(sys.argv[3]):
    for line in open(sys.argv[3]):
        h = json.loads(line)
        if h.get("method") == "lora-attn" and not h.get("ckpt"):
            hf[f"{h['shape']}-attn-{h['batch']}x{h['seq']}"] = h
def versus(o, r):
    h = hf.get(o["case"])
    if h is None:
        return ["", ""]
    return [f"{r['tokens_per_s'] / h['tokens_per_s']:.2f}x",
            f"{r['peak_device_mib'] / 1024 / h['peak_gib']:.2f}x"]
# What served the run, as the bench reports it at its end (cuDNN falls back to the flash
# kernels, and says so on stderr, where it cannot serve: a shape it has no plan for, or all
# of them after an error; "cuDNN" counts the passes it ran).
def served(r):
    runs = r.get("cudnn_attention_runs")
    attention = "flash"
    if r.get("attention_cudnn") or runs:
        attention = f"cuDNN {r.get('cudnn_version')}" + (f" ({runs} runs)" if runs is not None else "")
    return [attention, "cuBLAS" if r.get("lora_cublas") else "kernels"]
tables = [
    ("case", ["tokens/s", "step ms", "peak MiB", "first loss", "last loss", "speed vs HF",
              "memory vs HF", "attention", "LoRA"],
     lambda o, r: [o["case"], f"{r['tokens_per_s']:.0f}", f"{1e3 * r['step_s_median']:.1f}",
                   f"{r['peak_device_mib']:.0f}", f"{r['loss_first']:.4f}", f"{r['loss_last']:.4f}"]
                  + versus(o, r) + served(r)),
    ("shape", ["forward ms", "backward ms", "forward TFLOP/s", "backward TFLOP/s", "attention"],
     lambda o, r: [r["shape"], f"{r['fwd_ms']:.2f}", f"{r['bwd_ms']:.2f}",
                   f"{r['fwd_tflops']:.0f}", f"{r['bwd_tflops']:.0f}", served(r)[0]]),
]
for path, (key, columns, row) in zip(sys.argv[1:], tables):
    print(f"| {key} | kernels | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for line in open(path):
        o = json.loads(line); r = o["result"]
        cells = ([o.get("case", ""), f"error: {r['error'][-100:]!r}"] + [""] * (len(columns) - 1)
                 if "error" in r else row(o, r))
        print(f"| {cells[0]} | {o['kernels']} | " + " | ".join(cells[1:]) + " |")
    print()
PY
