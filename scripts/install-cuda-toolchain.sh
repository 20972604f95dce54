#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, ptxas, nvvm, headers) and a disassembler (cuobjdump,
# nvdisasm) from PyPI wheels into .cuda-toolchain/ at the project root (ignored by git).
# Idempotent: a second run with the same pins does nothing. Prints the path of nvcc last.
#
# The pins matter: every compiler wheel is 13.0.x so that the PTX and cubins it makes load on a
# CUDA 13.0 driver. An unpinned nvidia-nvvm pulls 13.5, whose PTX the 13.0 ptxas rejects.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${MAPET_CUDA_TOOLCHAIN:-$root/.cuda-toolchain}"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  # The disassembler (cuobjdump -sass and the nvdisasm it runs), for tests/kernel_schedule.rs. It
  # only reads the cubins; PyPI has no 13.0 build of either, and 13.2 reads 13.0's sm_90a.
  nvidia-cuda-cuobjdump==13.2.86
  nvidia-cuda-nvdisasm==13.2.86
)
stamp="$dest/.installed"
want="$(printf '%s\n' "${pins[@]}")"

py="${PYTHON:-python3}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dest/cuda/bin/nvcc" ]; then
  echo "$dest/cuda/bin/nvcc"
  exit 0
fi

echo "installing CUDA 13.0 compiler wheels into $dest" >&2
rm -rf "$dest"
mkdir -p "$dest/site"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest/site" "${pins[@]}" >&2

# The wheels unpack under site/nvidia/<component>/ (13.x wheels use a cu13/ sub-folder). Merge
# them into one CUDA-like tree: bin/ include/ lib/ nvvm/, which is the layout nvcc expects.
tree="$dest/cuda"
mkdir -p "$tree"
shopt -s nullglob
for comp in "$dest"/site/nvidia/*/ "$dest"/site/nvidia/cu13/; do
  for sub in bin include lib lib64 nvvm; do
    [ -d "$comp/$sub" ] || continue
    mkdir -p "$tree/$sub"
    cp -a "$comp/$sub/." "$tree/$sub/"
  done
done
[ -d "$tree/lib" ] && [ ! -e "$tree/lib64" ] && ln -s lib "$tree/lib64"
chmod +x "$tree"/bin/* "$tree"/nvvm/bin/* 2>/dev/null || true

if [ ! -x "$tree/bin/nvcc" ]; then
  echo "error: nvcc not found after installing the wheels; look under $dest/site/nvidia" >&2
  exit 1
fi
"$tree/bin/nvcc" --version >&2
printf '%s\n' "${pins[@]}" >"$stamp"
echo "$tree/bin/nvcc"
