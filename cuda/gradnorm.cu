// Global L2 norm of a flat f32 buffer (the gradient of every parameter, for clipping).
//
//   out[0] = sqrt(sum_i x[i]^2)
//
// Layout: x f32 [n] contiguous; partial f32 [num_partials]; out f32 [1].
//
// Shape: two passes with a fixed reduction order, so the result is bit-identical from run to run
// (no atomics). square_sum_partial runs num_partials blocks of 256 threads: each thread sums the
// squares of 16-byte vectors i, i + stride, ... in f32 (the n % 4 tail goes to the first threads),
// then the block reduces with warp shuffles and a shared-memory step and writes partial[block].
// square_sum_final is one block that sums the partials in f64 (cheap: at most a few thousand
// values) and writes the square root. The host picks num_partials from n alone, so the result does
// not depend on the card either. x must be 16-byte aligned (every DeviceBuffer is).
#include <stdint.h>

#include "dependent_launch.cuh"
#include "params.h"

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block in a fixed order; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T s[32];
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    v = warp_sum(v);
    if (lane == 0) s[warp] = v;
    __syncthreads();
    T t = 0;
    if (warp == 0) {
        t = lane < (int)(blockDim.x / kWarp) ? s[lane] : T(0);
        t = warp_sum(t);
    }
    return t;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) square_sum_partial(MapetSquareSum p) {
    dependent_launch_start();
    const int64_t nvec = p.n / 4;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const float4* x4 = reinterpret_cast<const float4*>(p.x);
    float acc = 0.f;
#pragma unroll 4
    for (int64_t i = tid; i < nvec; i += stride) {
        const float4 q = x4[i];
        acc = fmaf(q.x, q.x, acc);
        acc = fmaf(q.y, q.y, acc);
        acc = fmaf(q.z, q.z, acc);
        acc = fmaf(q.w, q.w, acc);
    }
    const int64_t t = nvec * 4 + tid;
    if (t < p.n) acc = fmaf(p.x[t], p.x[t], acc);
    const float s = block_sum(acc);
    if (threadIdx.x == 0) p.partial[blockIdx.x] = s;
}

extern "C" __global__ void __launch_bounds__(1024) square_sum_final(MapetSquareSum p) {
    dependent_launch_start();
    double acc = 0.0;
    for (int i = threadIdx.x; i < p.num_partials; i += blockDim.x) acc += (double)p.partial[i];
    const double s = block_sum(acc);
    if (threadIdx.x == 0) p.out[0] = (float)sqrt(s);
}
