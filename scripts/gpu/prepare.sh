#!/usr/bin/env bash
# Builds here (no GPU needed) what a GPU session runs: the `peft` binary and the CUDA test
# programs, with the `cuda` feature, gzipped into .gpu/ (git-ignored). Then, on the GPU
# machine, run scripts/gpu/check.sh with .gpu carried along (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(../shared/gpu/setup-cuda13.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/peft-rs-cuda-target}
cargo build --release -p peft-cli --features peft-cli/cuda >&2
# The test programs named `cuda` of peft-ops and peft-train, as cargo reports them.
mapfile -t tests < <(cargo test --release --no-run -p peft-ops -p peft-train --features peft-train/cuda,peft-ops/cuda \
    --test cuda --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["package_id"].split("#")[0].rsplit("/", 1)[-1] + " " + m["executable"])
')
[ "${#tests[@]}" -eq 2 ] || { echo "expected 2 CUDA test programs, found ${#tests[@]}" >&2; exit 1; }
rm -rf .gpu && mkdir .gpu
# Without debug info: the lease carries at most 64 MiB.
pack() { strip --strip-debug -o .gpu/tmp "$1" && gzip -9c .gpu/tmp > "$2" && rm .gpu/tmp; }
pack "$CARGO_TARGET_DIR/release/peft" .gpu/peft.gz
for t in "${tests[@]}"; do
  read -r crate exe <<<"$t"
  pack "$exe" ".gpu/test-$crate.gz"
done
# ../shared does not travel to the GPU machine: HF's side of the benchmark goes along in .gpu.
cp ../shared/gpu/anchor_hf.py .gpu/
ls -l .gpu >&2
du -sh .gpu >&2
