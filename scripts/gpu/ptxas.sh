#!/usr/bin/env bash
# Registers and spills of our CUDA kernels on the H200 (sm_90), here, without a GPU: NVRTC
# compiles the kernels as the `cuda` feature does (the test kernels_compile_with_nvrtc writes
# the PTX), then ptxas from the pip CUDA 13 wheels assembles it for sm_90 and reports. A
# kernel's registers a thread bound its blocks per SM (65536 registers an SM); spills go to
# local memory. With --sass KERNEL, the kernel's machine code instead (cuobjdump and nvdisasm
# from NVIDIA's pip wheels, fetched once into the same cache): the instruction mix of its loops
# and of each straight-line run (scripts/gpu/sass.py), the full listing in $TMPDIR/KERNEL.sass.
# Instructions per tensor-core instruction on a loop's path is what an issue-bound kernel's
# speed follows.
#   scripts/gpu/ptxas.sh [REGEX]     (kernel names, default: all)
#   scripts/gpu/ptxas.sh --sass KERNEL
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(../shared/gpu/setup-cuda13.sh)"
lib=$CUDA_ROOT/lib
# NVRTC needs no driver, but the test program links libcuda: the stub of setup-cuda13.sh,
# under the versioned name the loader looks for.
[ -e "$lib/stubs/libcuda.so.1" ] || ln -s libcuda.so "$lib/stubs/libcuda.so.1"
export LD_LIBRARY_PATH="$lib/stubs:$lib:${LD_LIBRARY_PATH:-}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/peft-rs-cuda-target}
ptx=$(mktemp --suffix .ptx)
trap 'rm -f "$ptx"' EXIT
PEFT_PTX_OUT=$ptx cargo test -q --release -p peft-ops --features cuda --lib kernels_compile_with_nvrtc >&2
if [ "${1:-}" = --sass ]; then
  tools=${PEFT_CUDA_PREFIX:-$HOME/.cache/peft-cuda13}/sass-tools
  if [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
    mkdir -p "$tools"
    # No 13.0 builds of these on PyPI; newer ones read sm_90 code the same.
    python3 -m pip download -q --no-deps -d "$tools" nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.5.37 >&2
    for w in "$tools"/*.whl; do python3 -m zipfile -e "$w" "$tools"; done
    chmod +x "$tools"/nvidia/cu13/bin/*
  fi
  cubin=${ptx%.ptx}.cubin
  trap 'rm -f "$ptx" "$cubin"' EXIT
  "$CUDA_ROOT/bin/ptxas" -arch=sm_90 "$ptx" -o "$cubin"
  listing=${TMPDIR:-/tmp}/$2.sass
  PATH="$tools/nvidia/cu13/bin:$PATH" cuobjdump -sass -fun "$2" "$cubin" > "$listing"
  python3 scripts/gpu/sass.py < "$listing"
  exit 0
fi
"$CUDA_ROOT/bin/ptxas" -arch=sm_90 -v "$ptx" -o /dev/null 2>&1 | python3 -c '
import re, sys
pattern, name, spill = re.compile(sys.argv[1]), None, ("?", "?")
print("%-32s %9s %12s %11s" % ("kernel", "registers", "spill stores", "spill loads"))
for line in sys.stdin:
    if m := re.search(r"Compiling entry function .(\w+).", line):
        name = m.group(1)
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
        spill = m.groups()
    if (m := re.search(r"Used (\d+) registers", line)) and name and pattern.search(name):
        print(f"{name:32s} {m.group(1):>9s} {spill[0]:>12s} {spill[1]:>11s}")
' "${1:-.}"
