// GELU, exact (erf) form, elementwise over a flat bf16 tensor of n values.
//
//   forward:   y  = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
//   backward:  dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   backward with recomputation (gelu_bwd_recompute): dx as above and y = GELU(x) again, in one
//   pass. The model saves only the MLP's pre-activation x; its backward needs y for the second
//   Linear's weight gradient and dx for the first's, and this kernel reads x once for both
//   (the separate gelu_fwd + gelu_bwd read it twice: 2 bytes more per value). Bit for bit the
//   values the two separate kernels write: the same f32 expressions (erf(x/sqrt2) shared).
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

#include "params.h"

namespace {

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

__device__ __forceinline__ void unpack8(const uint4& q, float (&f)[8]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint32_t pack2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) gelu_fwd(MapetGelu p) {
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

// dx = dy * GELU'(x) into p.out and y = GELU(x) into p.out_y, x read once.
extern "C" __global__ void __launch_bounds__(256) gelu_bwd_recompute(MapetGelu p) {
    const int64_t nvec = p.n / 8;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    const uint4* dy = reinterpret_cast<const uint4*>(p.dy);
    uint4* dx = reinterpret_cast<uint4*>(p.out);
    uint4* y = reinterpret_cast<uint4*>(p.out_y);
    for (int64_t i = tid; i < nvec; i += stride) {
        float v[8], d[8], f[8];
        unpack8(x[i], v);
        unpack8(dy[i], d);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float g;
            gelu_and_grad(v[e], f[e], g);
            d[e] *= g;
        }
        dx[i] = pack8(d);
        y[i] = pack8(f);
    }
    const int64_t t = nvec * 8 + tid;
    if (t < p.n) {
        const float v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[t]);
        const float d = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.dy)[t]);
        float f, g;
        gelu_and_grad(v, f, g);
        reinterpret_cast<__nv_bfloat16*>(p.out)[t] = __float2bfloat16_rn(d * g);
        reinterpret_cast<__nv_bfloat16*>(p.out_y)[t] = __float2bfloat16_rn(f);
    }
}
