#!/usr/bin/env bash
# Here, before a GPU session: the kernel sources of git revision REV (the .cu files of
# crates/peft-ops/src/kernels) into .gpu/variants/NAME, which travels with .gpu. There,
# `scripts/gpu/check.sh --kernel-variant .gpu/variants/NAME` (or variants.sh --kernels) runs
# the binary as built with those kernels instead (PEFT_CUDA_KERNELS): a kernel change measured
# against its predecessor in one lease, without a second build. The kernels' arguments must be
# those the built launchers pass, and their shared memory at most what they allot.
#   scripts/gpu/kernel_variant.sh NAME REV
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 2 ] || { echo "usage: $0 NAME REV" >&2; exit 2; }
dir=.gpu/variants/$1
rm -rf "$dir" && mkdir -p "$dir"
for f in ops.cu lora.cu attention.cu optim.cu; do
  git show "$2:crates/peft-ops/src/kernels/$f" > "$dir/$f"
done
echo "$dir: kernels of $(git rev-parse --short "$2")"
