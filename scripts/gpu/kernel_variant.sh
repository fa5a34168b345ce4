#!/usr/bin/env bash
# Here, before a GPU session: the kernel sources of crates/peft-ops/src/kernels into
# .gpu/variants/NAME (which travels with .gpu), the FILEs (default: all four) as of git
# revision REV and the others as they are now. There,
# `scripts/gpu/check.sh --kernel-variant .gpu/variants/NAME` (or variants.sh --kernels) runs
# the binary as built with those kernels instead (PEFT_CUDA_KERNELS): a kernel change measured
# against its predecessor in one lease, without a second build. The kernels' arguments must be
# those the built launchers pass, and their shared memory at most what they allot: take from
# REV only the files whose kernels kept their arguments.
#   scripts/gpu/kernel_variant.sh NAME REV [FILE...]     (FILE: ops.cu lora.cu attention.cu optim.cu)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { echo "usage: $0 NAME REV [FILE...]" >&2; exit 2; }
dir=.gpu/variants/$1 rev=$2
shift 2
old=("$@")
[ ${#old[@]} -gt 0 ] || old=(ops.cu lora.cu attention.cu optim.cu)
rm -rf "$dir" && mkdir -p "$dir"
cp crates/peft-ops/src/kernels/{ops,lora,attention,optim}.cu "$dir/"
for f in "${old[@]}"; do
  git show "$rev:crates/peft-ops/src/kernels/$f" > "$dir/$f"
done
echo "$dir: ${old[*]} of $(git rev-parse --short "$rev"), the rest as now"
