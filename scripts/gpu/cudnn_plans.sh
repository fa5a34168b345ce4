#!/usr/bin/env bash
# Builds cuDNN's execution plans for our attention graphs (crates/peft-ops/src/cudnn) for an
# H200, here, without a GPU: cuDNN (9.8 and later) accepts a device described in JSON, picks
# its engines and compiles their kernels with NVRTC; only loading them needs a driver, which a
# stand-in libcuda.so.1 answers (it loads nothing and runs nothing, and prints the name of
# each kernel cuDNN compiled for a plan). A plan that builds means
# cuDNN recognises the graph and has a fused engine for it on that GPU; whether the engine
# computes the right values is the CUDA test's to say on a GPU.
#   scripts/gpu/cudnn_plans.sh [CUDNN_VERSION]     # a pip version of nvidia-cudnn-cu13
# The wheel (about 500 MB) is kept in ~/.cache/peft-cudnn/VERSION.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${1:-9.28.1.4}
eval "$(../shared/gpu/setup-cuda13.sh)" >/dev/null
venv=$HOME/.cache/peft-cuda13/venv
lib=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13/lib)
cache=$HOME/.cache/peft-cudnn/$version
if [ ! -e "$cache/nvidia/cudnn/lib/libcudnn.so.9" ]; then
  mkdir -p "$cache"
  "$venv/bin/pip" download -q --no-deps -d "$cache" "nvidia-cudnn-cu13==$version" >&2
  (cd "$cache" && unzip -q -o ./*.whl && rm -f ./*.whl)
fi
# The stand-in driver: the CUDA stub's symbols (and the unversioned names cuDNN looks up),
# failing, except those cuDNN's plan building calls, which succeed with placeholders.
fake=$HOME/.cache/peft-cudnn/fake-driver
mkdir -p "$fake"
nm -D "$lib/stubs/libcuda.so.1" | python3 -c '
import sys
symbols = [line.split()[-1] for line in sys.stdin if " T " in line]
answers = {
    "cuInit": "int cuInit(unsigned f) { return 0; }",
    "cuDriverGetVersion": "int cuDriverGetVersion(int *v) { *v = 13000; return 0; }",
    "cuDeviceGetCount": "int cuDeviceGetCount(int *n) { *n = 1; return 0; }",
    "cuDeviceGet": "int cuDeviceGet(int *d, int i) { *d = i; return 0; }",
    "cuCtxGetCurrent": "int cuCtxGetCurrent(void **c) { *c = (void *)0x1000; return 0; }",
    "cuGetErrorString": "int cuGetErrorString(int e, const char **s) { *s = \"no GPU\"; return 0; }",
    "cuGetErrorName": "int cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_UNKNOWN\"; return 0; }",
    "cuLibraryLoadData": "int cuLibraryLoadData(void **l, const void *c, void *a, void *b, unsigned n, void *d, void *e, unsigned m) { *l = (void *)0x5000; return 0; }",
    "cuLibraryGetKernel": "int cuLibraryGetKernel(void **k, void *l, const char *n) { fprintf(stderr, \"kernel %s\\n\", n); *k = (void *)0x6000; return 0; }",
    "cuKernelGetFunction": "int cuKernelGetFunction(void **f, void *k) { *f = (void *)0x4000; return 0; }",
    "cuLibraryUnload": "int cuLibraryUnload(void *l) { return 0; }",
}
print("#include <stdio.h>")
print("\n".join(answers.get(s, "int %s(void) { return 999; }" % s) for s in symbols))
for name in ["cuCtxPopCurrent", "cuCtxPushCurrent", "cuLinkCreate", "cuLinkAddData"]:
    print("int %s(void) __attribute__((alias(\"%s_v2\")));" % (name, name))
' > "$fake/fake.c"
cc -shared -fPIC -w -o "$fake/libcuda.so.1" "$fake/fake.c" -Wl,-soname,libcuda.so.1
LD_LIBRARY_PATH="$fake:$cache/nvidia/cudnn/lib:$lib" \
  cargo test --release -p peft-ops --lib cudnn_builds_attention_plans -- --nocapture 2>&1 |
  grep -E '^cuDNN|^kernel|skipped|test result|panicked'
