# Sourced by the scripts of scripts/gpu on the GPU machine, from the repository root: the pip
# CUDA 13 libraries (and cuDNN's) on the library path, and the programs of .gpu (scripts/gpu/prepare.sh)
# unpacked into $bin. Unpacked at every call: a warm machine keeps /tmp from the last one.
SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
# cuDNN (PyTorch's wheel), which the GPU attention loads.
if [ -d "$SP/nvidia/cudnn/lib" ]; then export LD_LIBRARY_PATH="$SP/nvidia/cudnn/lib:$LD_LIBRARY_PATH"; fi
bin=/tmp/peft-gpu
mkdir -p "$bin"
for f in .gpu/*.gz; do
  exe=$bin/$(basename "$f" .gz)
  gunzip -c "$f" > "$exe" && chmod +x "$exe"
done
