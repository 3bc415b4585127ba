# Sourced by scripts/gpu-check.sh (or by hand: `. scripts/gpu-env.sh`): finds the CUDA
# libraries (system driver, CUDA toolkit, and Python packages' site-packages/nvidia/*/lib) and
# exports LD_LIBRARY_PATH and EXPERTMESH_CUDA_LIB_DIRS for the prebuilt binaries.
dirs=()
for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
  [ -d "$d" ] && dirs+=("$d")
done
for py in python3 python; do
  command -v "$py" >/dev/null || continue
  site=$("$py" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null) || continue
  while read -r s; do
    for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && dirs+=("$d"); done
  done <<< "$site"
  break
done
# cudarc opens its libraries by unversioned or CUDA-12 names (libcublas.so, libnvrtc.so.12,
# never libcublas.so.13 or libnccl.so.2), while CUDA 13 wheels ship only versioned files:
# give it a directory of unversioned links to the first of each found.
links=$(mktemp -d)
for lib in cuda nvrtc cublas cublasLt nccl; do
  for d in "${dirs[@]}"; do
    f=$(ls "$d"/lib$lib.so* 2>/dev/null | grep -E "/lib$lib\.so(\.[0-9]+)*$" | sort -V | tail -1)
    if [ -n "$f" ]; then ln -sf "$f" "$links/lib$lib.so"; echo "   lib$lib.so -> $f"; break; fi
  done
done
dirs=("$links" "${dirs[@]}")
libs=$(IFS=:; echo "${dirs[*]}")
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EXPERTMESH_CUDA_LIB_DIRS="$libs"
echo "== CUDA library directories: $libs"
