#!/usr/bin/env bash
# Prints the sm_90a SASS of a CUDA source compiled the way build.rs compiles it, or of one of its
# kernels: what ptxas made of the source (which wait it hoisted, which registers it copied, how
# many instructions a loop takes), which no test on a card shows directly. Needs no GPU.
#
#   scripts/sass.sh cuda/attention.cu                          # every kernel
#   scripts/sass.sh cuda/attention.cu mapet_attention_fwd_wgmma
#
# nvcc from $NVCC, else .cuda-toolchain/ (scripts/install-cuda-toolchain.sh, which also installs
# the cuobjdump and nvdisasm used here).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="${1:?usage: scripts/sass.sh cuda/FILE.cu [KERNEL]}"
kernel="${2:-}"
[ -f "$src" ] || { echo "error: no such source: $src" >&2; exit 2; }
nvcc="${NVCC:-$root/.cuda-toolchain/cuda/bin/nvcc}"
[ -x "$nvcc" ] || { echo "error: nvcc not found at $nvcc; run scripts/install-cuda-toolchain.sh or set NVCC" >&2; exit 2; }
bin="$(dirname "$nvcc")"
[ -x "$bin/cuobjdump" ] && [ -x "$bin/nvdisasm" ] || {
  echo "error: cuobjdump and nvdisasm are not beside $nvcc; run scripts/install-cuda-toolchain.sh" >&2
  exit 2
}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The flags of build.rs (compile_all), for the sm_90a target only.
"$nvcc" -cubin -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -lineinfo --expt-relaxed-constexpr \
  -I"$root/cuda" "$src" -o "$tmp/k.cubin"
if [ -z "$kernel" ]; then
  PATH="$bin:$PATH" "$bin/cuobjdump" -sass "$tmp/k.cubin"
else
  PATH="$bin:$PATH" "$bin/cuobjdump" -sass -fun "$kernel" "$tmp/k.cubin"
fi
