// Deterministic column sums, shared by the kernels that form a bias gradient from per-group
// partial sums (cuda/cross_entropy.cu, cuda/gelu.cu): no float atomics, a fixed order.
#pragma once

#include <stdint.h>

// out[c] += sum over g < groups of partial[g * cols + c], for the columns of this block: block
// (blockIdx.x) covers columns [blockIdx.x * kCols, + kCols) with kCols x kSlices threads. Slice k
// of a column sums groups k, k + kSlices, ... in increasing order (a warp reads kCols = 32
// consecutive columns of one group), then slice 0 adds the slices' sums in slice order.
template <int kCols, int kSlices>
__device__ __forceinline__ void add_group_sums(const float* partial, int groups, int64_t cols, float* out) {
    __shared__ float s_part[kSlices][kCols];
    const int col = threadIdx.x % kCols;
    const int slice = threadIdx.x / kCols;
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + col;
    float acc = 0.0f;
    if (c < cols) {
        // nvcc unrolls this loop by itself, with 16 groups' loads issued before their adds
        // (sm_90a SASS); an explicit `#pragma unroll 8` halved that.
        for (int g = slice; g < groups; g += kSlices) {
            acc += partial[static_cast<int64_t>(g) * cols + c];
        }
    }
    s_part[slice][col] = acc;
    __syncthreads();
    if (slice == 0 && c < cols) {
        float sum = s_part[0][col];
#pragma unroll
        for (int k = 1; k < kSlices; ++k) {
            sum += s_part[k][col];
        }
        out[c] += sum;
    }
}
