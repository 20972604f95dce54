// GELU, exact (erf) form, elementwise over a flat bf16 tensor of n values.
//
//   forward:   y  = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
//   backward:  dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   backward with recomputation (gelu_bwd_recompute_colsum): dx as above and y = GELU(x) again,
//   in one pass, with the column sums of dx. The model saves only the MLP's pre-activation x; its
//   backward needs y for the second Linear's weight gradient, dx for the first's, and the column
//   sums of dx for the first Linear's bias gradient. This kernel reads x once for all three (the
//   separate gelu_fwd + gelu_bwd read it twice, and cuBLASLt's bias-gradient epilogue reads dx
//   again in a kernel of its own). y and dx are written to be bit for bit what the two separate
//   kernels write: the same f32 expressions (erf(x/sqrt2) shared), the same contractions in the
//   PTX; tests/gelu.rs asserts it (it held on an H200).
//
// Layout: x, dy, y, dx bf16 [n], contiguous, any shape flattened (the MLP hidden activations,
// [tokens, 4 * D] in the model). Math in f32, one rounding to bf16 on the way out.
//
// Shape: purely memory-bound, so each thread moves 16 bytes (8 bf16) per load and store, one
// vector per thread, with a grid-stride loop for grids that would not fit. The n % 8 tail
// values are done one each by the first threads of the grid. The host requires 16-byte aligned
// buffers (every DeviceBuffer is: allocations are 256-byte aligned).
#include <cuda_bf16.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "colsum.cuh"
#include "bf16x8.cuh"
#include "params.h"

namespace {

// gelu_bwd_recompute_colsum: threads per block, each owning 8 columns.
constexpr int kColThreads = 128;
// gelu_bwd_recompute_colsum: rows whose loads are issued together.
constexpr int kRowsInFlight = 4;
// gelu_colsum_finish: columns per block and slices of the groups per column.
constexpr int kFinishCols = 32;
constexpr int kFinishSlices = 8;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * kInvSqrt2)); }

__device__ __forceinline__ float gelu_grad(float x) {
    const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
    return cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

// GELU(x) and GELU'(x) from one erf. y is formed as in gelu() (0.5 * x, exact, then times
// 1 + erf), g as in gelu_grad(), so both round exactly as the separate functions do.
__device__ __forceinline__ void gelu_and_grad(float x, float& y, float& g) {
    const float e = erff(x * kInvSqrt2);
    y = 0.5f * x * (1.0f + e);
    g = 0.5f * (1.0f + e) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}


}  // namespace

extern "C" __global__ void __launch_bounds__(256) gelu_fwd(MapetGelu p) {
    dependent_launch_start();
    const int64_t nvec = p.n / 8;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    uint4* y = reinterpret_cast<uint4*>(p.out);
    for (int64_t i = tid; i < nvec; i += stride) {
        float v[8];
        unpack8(x[i], v);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = gelu(v[e]);
        y[i] = pack8(v);
    }
    const int64_t t = nvec * 8 + tid;
    if (t < p.n) {
        const float v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[t]);
        reinterpret_cast<__nv_bfloat16*>(p.out)[t] = __float2bfloat16_rn(gelu(v));
    }
}

extern "C" __global__ void __launch_bounds__(256) gelu_bwd(MapetGelu p) {
    dependent_launch_start();
    const int64_t nvec = p.n / 8;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    const uint4* dy = reinterpret_cast<const uint4*>(p.dy);
    uint4* dx = reinterpret_cast<uint4*>(p.out);
    for (int64_t i = tid; i < nvec; i += stride) {
        float v[8], d[8];
        unpack8(x[i], v);
        unpack8(dy[i], d);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = d[e] * gelu_grad(v[e]);
        dx[i] = pack8(v);
    }
    const int64_t t = nvec * 8 + tid;
    if (t < p.n) {
        const float v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[t]);
        const float d = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.dy)[t]);
        reinterpret_cast<__nv_bfloat16*>(p.out)[t] = __float2bfloat16_rn(d * gelu_grad(v));
    }
}

// dx = dy * GELU'(x) into p.out and y = GELU(x) into p.out_y, x read once, and the column sums of
// dx (the bf16 values written, which the Linear's weight-gradient GEMM reads) into p.partial: the
// bias gradient of the Linear whose output gradient dx is, without a second pass over dx.
// Grid (ceil(cols / 8 / kColThreads), groups), block kColThreads: thread (x, g) owns the 8
// columns 8c..8c+7, c = blockIdx.x * kColThreads + threadIdx.x, and walks rows [g*per,
// (g+1)*per) in increasing order (a warp reads 512 contiguous bytes of a row), summing its
// columns in f32, then writes partial[g, 8c..8c+8). gelu_colsum_finish adds the groups to
// col_sums in a fixed order: deterministic, no atomics. The host requires cols % 8 == 0 and
// n % cols == 0.
extern "C" __global__ void __launch_bounds__(kColThreads) gelu_bwd_recompute_colsum(MapetGelu p) {
    dependent_launch_start();
    const int64_t cols8 = p.cols / 8;
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
    if (c >= cols8) return;  // no barrier in this kernel
    const int64_t rows = p.n / p.cols;
    const int64_t per = (rows + p.groups - 1) / p.groups;
    const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per;
    const int64_t r1 = min(rows, r0 + per);
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    const uint4* dy = reinterpret_cast<const uint4*>(p.dy);
    uint4* dx = reinterpret_cast<uint4*>(p.out);
    uint4* y = reinterpret_cast<uint4*>(p.out_y);
    float sum[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] = 0.f;
    // kRowsInFlight rows at a time: all their loads first (absent rows read as zeros and are not
    // stored), then the math, stores and sums in row order, so the result does not depend on it.
    for (int64_t rb = r0; rb < r1; rb += kRowsInFlight) {
        uint4 xr[kRowsInFlight], dr[kRowsInFlight];
#pragma unroll
        for (int j = 0; j < kRowsInFlight; ++j) {
            const bool ok = rb + j < r1;
            const int64_t i = (rb + j) * cols8 + c;
            xr[j] = ok ? __ldg(x + i) : make_uint4(0u, 0u, 0u, 0u);
            dr[j] = ok ? __ldg(dy + i) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int j = 0; j < kRowsInFlight; ++j) {
            if (rb + j >= r1) break;
            const int64_t i = (rb + j) * cols8 + c;
            float v[8], d[8], f[8];
            unpack8(xr[j], v);
            unpack8(dr[j], d);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float g;
                gelu_and_grad(v[e], f[e], g);
                d[e] *= g;
            }
            const uint4 packed = pack8(d);
            dx[i] = packed;
            y[i] = pack8(f);
            unpack8(packed, d);  // the bf16 values just written
#pragma unroll
            for (int e = 0; e < 8; ++e) sum[e] += d[e];
        }
    }
    float4* out = reinterpret_cast<float4*>(p.partial + static_cast<int64_t>(blockIdx.y) * p.cols + 8 * c);
    out[0] = make_float4(sum[0], sum[1], sum[2], sum[3]);
    out[1] = make_float4(sum[4], sum[5], sum[6], sum[7]);
}

// col_sums[c] += sum over g of partial[g, c]. Grid ceil(cols / kFinishCols), block kFinishCols x
// kFinishSlices (colsum.cuh).
extern "C" __global__ void __launch_bounds__(kFinishCols * kFinishSlices) gelu_colsum_finish(MapetGelu p) {
    dependent_launch_start();
    add_group_sums<kFinishCols, kFinishSlices>(p.partial, p.groups, p.cols, p.col_sums);
}
