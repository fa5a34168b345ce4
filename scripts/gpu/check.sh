#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu/ from scripts/gpu/prepare.sh: the CUDA
# tests, then the benchmark against HF PEFT (bench/vs_hf_gpu.sh). Everything goes to $OUT in
# five files: log.txt (tests and bench output), errors.txt (each bench case's stderr),
# hf_anchor.jsonl, peft_gpu.jsonl and vs_hf_gpu.md.
#   scripts/gpu/check.sh [--tests-only | --bench-only | --ablation] [--skip-hf FILE | --hf-reference]
#                        [--cases A,B] [--profile] [--env-variant KEY=VALUE]...
#                        [--kernel-variant DIR]... [--test-env KEY=VALUE]...
# --profile then times every kernel of a 1B and an 8B training step (scripts/gpu/profile.sh:
# ncu_1b.csv.gz, ncu_8b.csv.gz, profile_bench.jsonl): eight files in all, the most a call
# brings back. A whole run with it takes about five minutes on an H200.
# --env-variant: after the benchmark, scripts/gpu/variants.sh compares issue 4's three shapes
# as built and under each setting KEY=VALUE (variants.jsonl, variants_attention.jsonl): say
# PEFT_CUDA_LORA=kernels or PEFT_LAYER_TAPE=off. --kernel-variant adds the kernel sources of DIR
# to that comparison (scripts/gpu/kernel_variant.sh makes one from a git revision).
# --test-env runs the CUDA tests again with KEY=VALUE set (about 45 s each).
# --ablation runs bench/gpu_ablation.sh instead (each kernel group turned off in turn:
# ablation.jsonl and ablation.md).
# --hf-reference compares with HF's figures measured on the same machine
# (bench/hf_gpu_reference.jsonl, from shared/gpu/README.md) instead of running HF again: for a
# lease too short for both.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench/out}
mkdir -p "$out"
what=all skip=() cases=() profile=0 env_variants=() kernel_variants=() test_envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) what=tests; shift ;;
    --bench-only) what=bench; shift ;;
    --ablation) what=ablation; shift ;;
    --skip-hf) skip=(--skip-hf "$2"); shift 2 ;;
    --hf-reference) skip=(--skip-hf bench/hf_gpu_reference.jsonl); shift ;;
    --cases) cases=(--cases "$2"); shift 2 ;;
    --profile) profile=1; shift ;;
    --env-variant) env_variants+=("$2"); shift 2 ;;
    --kernel-variant) kernel_variants+=("$2"); shift 2 ;;
    --test-env) test_envs+=("$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/gpu/env.sh
log=$out/log.txt
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  if [ "$what" = all ] || [ "$what" = tests ]; then
    for setting in "" "${test_envs[@]}"; do
      for crate in peft-ops peft-train; do
        echo "== $crate CUDA tests ${setting:-as built}"
        (cd "crates/$crate" && env $setting timeout "${TEST_TIMEOUT:-300}" "$bin/test-$crate" --test-threads=1 --nocapture)
        echo "exit status $?"
      done
    done
  fi
  if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== benchmark"
    CASE_TIMEOUT=${CASE_TIMEOUT:-150} bench/vs_hf_gpu.sh --peft "$bin/peft" --anchor .gpu/anchor_hf.py --out "$out" "${skip[@]}" "${cases[@]}"
  fi
  if [ $((${#env_variants[@]} + ${#kernel_variants[@]})) -gt 0 ] && { [ "$what" = all ] || [ "$what" = bench ]; }; then
    echo "== variants"
    args=()
    for setting in "${env_variants[@]}"; do args+=(--env "$setting"); done
    for dir in "${kernel_variants[@]}"; do args+=(--kernels "$dir"); done
    scripts/gpu/variants.sh "${args[@]}"
  fi
  if [ "$profile" = 1 ]; then
    echo "== kernel times"
    scripts/gpu/profile.sh --no-hf 1b 8b
  fi
  if [ "$what" = ablation ]; then
    echo "== kernel ablation"
    CASE_TIMEOUT=${CASE_TIMEOUT:-150} bench/gpu_ablation.sh --peft "$bin/peft" --out "$out"
  fi
} > "$log" 2>&1
for f in "$out"/err_*.txt; do
  [ -e "$f" ] || continue
  echo "== $(basename "$f")"; cat "$f"; rm -f "$f"
done > "$out/errors.txt"
tail -n 40 "$log"
