#!/usr/bin/env bash
# peft-rs vs Hugging Face PEFT on an NVIDIA GPU: the shapes of shared/gpu/README.md, HF first
# (shared/gpu/anchor_hf.py), then `peft bench --device cuda` on each, then the ratios. QLoRA,
# prompt and prefix tuning cases compare with HF's figures from that README
# (bench/hf_gpu_readme.jsonl).
#
#   bench/vs_hf_gpu.sh [--peft PATH] [--anchor PATH] [--out DIR] [--skip-hf FILE] [--cases A,B]
#
# Runs on the GPU machine (python3 with torch, transformers, peft; CUDA 13 libraries under
# site-packages/nvidia/cu13/lib). Build the binary elsewhere with `--features cuda`
# (docs/gpu.md). --skip-hf reuses an earlier hf_anchor.jsonl instead of running HF again;
# --cases runs only the named cases of ours (for a short lease); BENCH_FLAGS adds flags to each
# `peft bench` (say `--phases`).
set -uo pipefail
cd "$(dirname "$0")/.."
peft=target/release/peft anchor=../shared/gpu/anchor_hf.py out=${OUT:-bench/out} hf_file= cases=
while [ $# -gt 0 ]; do
  case "$1" in
    --peft) peft=$2; shift 2 ;;
    --anchor) anchor=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --skip-hf) hf_file=$2; shift 2 ;;
    --cases) cases=",$2,"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
# cuDNN (PyTorch's wheel), which the GPU attention loads.
if [ -d "$SP/nvidia/cudnn/lib" ]; then export LD_LIBRARY_PATH="$SP/nvidia/cudnn/lib:$LD_LIBRARY_PATH"; fi
if ldd "$peft" | grep 'not found'; then echo "missing libraries for $peft" >&2; exit 1; fi

if [ -z "$hf_file" ]; then
  rm -f "$out/hf_anchor.jsonl"
  PYTHONUNBUFFERED=1 python3 "$anchor" --out "$out" >&2
  hf_file=$out/hf_anchor.jsonl
fi

ours=$out/peft_gpu.jsonl
: > "$ours"
# name shape targets batch seq warmup steps extra-flags (the anchor's cases, in its order)
while read -r name shape targets batch seq warmup steps extra; do
  [ -z "$cases" ] || [[ $cases == *",$name,"* ]] || continue
  line=$(timeout "${CASE_TIMEOUT:-300}" "$peft" bench --device cuda --dtype bf16 --shape "$shape" --lora-dropout 0 \
      --r 16 --lora-alpha 32 --target-modules "$targets" --batch-size "$batch" --seq-len "$seq" \
      --warmup "$warmup" --steps "$steps" $extra ${BENCH_FLAGS:-} 2>"$out/err_$name.txt" | tail -n 1)
  [ -n "$line" ] || line=$(printf '{"error": %s}' "$(tail -c 300 "$out/err_$name.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')")
  echo "{\"case\": \"$name\", \"result\": $line}" | tee -a "$ours" >&2
done <<'CASES'
smol-attn-4x256 smollm2-135m q_proj,k_proj,v_proj,o_proj 4 256 3 10
smol-attn-8x1024 smollm2-135m q_proj,k_proj,v_proj,o_proj 8 1024 3 10
1b-attn-4x1024 llama-3.2-1b q_proj,k_proj,v_proj,o_proj 4 1024 3 10
1b-all-4x1024 llama-3.2-1b all-linear 4 1024 3 10
1b-full-4x1024 llama-3.2-1b all-linear 4 1024 3 10 --method full
8b-attn-2x2048 llama-3-8b q_proj,k_proj,v_proj,o_proj 2 2048 2 6
8b-attn-ckpt-2x2048 llama-3-8b q_proj,k_proj,v_proj,o_proj 2 2048 2 6 --gradient-checkpointing
1b-qlora-ckpt-4x1024 llama-3.2-1b all-linear 4 1024 3 10 --quantize nf4 --double-quant --optim paged_adamw_8bit --gradient-checkpointing
1b-qlora-4x1024 llama-3.2-1b all-linear 4 1024 3 10 --quantize nf4 --double-quant --optim paged_adamw_8bit
8b-qlora-ckpt-2x2048 llama-3-8b all-linear 2 2048 2 6 --quantize nf4 --double-quant --optim paged_adamw_8bit --gradient-checkpointing
1b-prompt-4x1024 llama-3.2-1b all-linear 4 1024 3 10 --method prompt --num-virtual-tokens 20
1b-prefix-4x1024 llama-3.2-1b all-linear 4 1024 3 10 --method prefix --num-virtual-tokens 20
CASES

# HF's QLoRA, prompt and prefix tuning figures are not in the anchor script:
# bench/hf_gpu_readme.jsonl holds those of shared/gpu/README.md, measured on the same machine.
python3 - "$hf_file" "$ours" "$out/vs_hf_gpu.md" bench/hf_gpu_readme.jsonl <<'PY'
import json, sys
hf = [json.loads(l) for f in (sys.argv[1], sys.argv[4]) for l in open(f) if l.strip()]
ours = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
key = lambda shape, method, b, s, ckpt: (shape, method, b, s, ckpt)
shape_of = {"smollm2-135m": "smol", "llama-3.2-1b": "1b", "llama-3-8b": "8b"}
hf_by = {key(r["shape"], r["method"], r["batch"], r["seq"], r["ckpt"]): r for r in hf if "shape" in r}
# The bf16 dense matmul peak measured on the H200 (shared/gpu/README.md).
PEAK_TFLOPS = 790
rows = ["| case | HF tok/s | ours tok/s | speed ratio | HF peak GiB | ours peak GiB | memory ratio | ours model TFLOP/s | % of peak | attention; kernel paths |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
# What served our attention: cuDNN (the passes it ran) or the flash kernels; and the paths
# kernel tuning chose, where it ran.
def served(r):
    runs = r.get("cudnn_attention_runs")
    attention = f"cuDNN {r.get('cudnn_version')}, {runs} passes" if runs else "flash"
    tuned = (r.get("kernel_tuning") or {}).get("settings")
    return attention + (f"; tuned: {' '.join(tuned)}" if tuned else "")
summary = {}
for o in ours:
    r = o["result"]
    if "error" in r:
        rows.append(f"| {o['case']} | | error: {r['error'][-120:].strip()} | | | | | | | |")
        continue
    if r["method"] in ("full", "prompt", "prefix"):
        method = r["method"]
    else:
        method = "lora-all" if r["target_modules"] == "all-linear" else "lora-attn"
    if r.get("quantize"):
        method = "q" + method
    h = hf_by.get(key(shape_of[r["shape"]], method, r["batch_size"], r["seq_len"], r["gradient_checkpointing"]))
    ours_gib = (r.get("peak_device_mib") or float("nan")) / 1024
    tflops = f"{r['model_tflops']:.1f} | {100 * r['model_tflops'] / PEAK_TFLOPS:.0f}%"
    if h is None:
        rows.append(f"| {o['case']} | n/a | {r['tokens_per_s']:.0f} | | | {ours_gib:.1f} | | {tflops} | {served(r)} |")
        continue
    sp, mem = r["tokens_per_s"] / h["tokens_per_s"], ours_gib / h["peak_gib"]
    summary[o["case"]] = {"speed_ratio": round(sp, 3), "memory_ratio": round(mem, 3),
                          "model_tflops": round(r["model_tflops"], 1)}
    rows.append(f"| {o['case']} | {h['tokens_per_s']} | {r['tokens_per_s']:.0f} | {sp:.2f} | {h['peak_gib']} | {ours_gib:.1f} | {mem:.2f} | {tflops} | {served(r)} |")
# Issue 4's targets: (case, least speed ratio, most memory ratio).
targets = [("1b-attn-4x1024", 2.0, 0.5), ("smol-attn-8x1024", 3.0, None), ("8b-attn-2x2048", 1.5, None)]
verdicts = []
for case, speed, memory in targets:
    got = summary.get(case)
    if got is None:
        verdicts.append(f"- {case}: no result")
        continue
    met = got["speed_ratio"] >= speed and (memory is None or got["memory_ratio"] <= memory)
    want = f"speed >= {speed}x" + (f", memory <= {memory}x" if memory else "")
    verdicts.append(f"- {case}: {'met' if met else 'NOT met'} ({want}; got {got['speed_ratio']}x, memory {got['memory_ratio']}x)")
table = "\n".join(rows) + "\n\nTargets:\n" + "\n".join(verdicts)
print(table)
print(json.dumps(summary))
open(sys.argv[3], "w").write(table + "\n\n" + json.dumps(summary) + "\n")
PY
