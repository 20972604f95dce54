// Residual-stream helpers of the model: the layer-scale residual with drop path, row copies
// between the rank-ordered row ranges of the two streams, and two f32 vector ops.
//
// Math (sample(r) = r / rows_per_sample; s = per-sample drop-path scale, 0 or 1/keep; gamma the
// layer-scale vector):
//   mapet_layer_scale_fwd         out[r, c] = x[r, c] + (s[sample(r)] * gamma[c]) * y[r, c]
//   mapet_layer_scale_bwd         dy[r, c]  = (dout[r, c] * s[sample(r)]) * gamma[c]
//                                 partial[g, c] = sum_{r in chunk g} (dout[r, c] * s) * y[r, c]
//   mapet_layer_scale_bwd_reduce  dgamma[c] += sum_g partial[g, c]        (g in increasing order)
//   mapet_rows_copy               dst[b, dst_row0 + i, :] = src[b, src_row0 + i, :]  (or +=)
//   mapet_add_f32                 y[i] += x[i]             (f32; a bias-gradient scratch into grads)
//   mapet_f32_to_bf16             y[i] = bf16(x[i])        (the bf16 copy of the f32 weights)
// The gradient of x through the residual is dout itself, so the backward has no dx output.
//
// Layouts: x, y, out, dout, src, dst bf16, row-major [rows, cols] (rows = batch * rows per
// sample); gamma, dgamma f32 [cols]; s f32 [batch]; partial f32 [chunks, cols]. The host requires
// cols % 8 == 0 and 16-byte aligned bf16 pointers (gamma too, for the forward's float4 loads).
//
// Shape: all memory-bound. The elementwise kernels move one 16-byte vector (8 bf16) per thread
// and iteration, with grid-stride loops. The backward is one thread per pair of columns (bf162
// loads: a warp reads 128 contiguous bytes of a row) walking the `chunk_rows` rows of its chunk
// (blockIdx.y): it writes dy as it goes and keeps the two column sums in registers, then stores
// them as its chunk's row of `partial`. The reduce kernel (block 32 x 16, as LayerNorm's) sums
// the chunks in a fixed order. No float atomics anywhere: results depend only on the inputs and
// on chunk_rows, which the host derives from the shape alone, so runs are bit-identical.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params.h"

namespace {

constexpr int kRedX = 32;
constexpr int kRedY = 16;

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

extern "C" __global__ void __launch_bounds__(256) mapet_layer_scale_fwd(MapetLayerScale p) {
    const int nvr = p.cols / 8;
    const int64_t nvec = p.rows * nvr;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const uint4* x = static_cast<const uint4*>(p.x);
    const uint4* y = static_cast<const uint4*>(p.y);
    uint4* out = static_cast<uint4*>(p.out);
    const float4* gamma = reinterpret_cast<const float4*>(p.gamma);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) {
        const int64_t r = i / nvr;
        const int v = (int)(i - r * nvr);
        const float s = p.scale[r / p.rows_per_sample];
        const float4 g0 = __ldg(gamma + 2 * v);
        const float4 g1 = __ldg(gamma + 2 * v + 1);
        const float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
        float xv[8], yv[8];
        unpack8(x[i], xv);
        unpack8(y[i], yv);
#pragma unroll
        for (int e = 0; e < 8; ++e) xv[e] += (s * g[e]) * yv[e];
        out[i] = pack8(xv);
    }
}

// Grid (ceil(cols / 256), chunks), 128 threads; thread t of block (bx, g) owns columns
// c = 2 * (bx * 128 + t) and c + 1 over the rows of chunk g.
extern "C" __global__ void __launch_bounds__(128) mapet_layer_scale_bwd(MapetLayerScale p) {
    const int c = 2 * (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (c >= p.cols) return;
    const int64_t r0 = (int64_t)blockIdx.y * p.chunk_rows;
    const int64_t r1 = min(p.rows, r0 + p.chunk_rows);
    const __nv_bfloat16* dout = static_cast<const __nv_bfloat16*>(p.dout);
    const __nv_bfloat16* y = static_cast<const __nv_bfloat16*>(p.y);
    __nv_bfloat16* dy = static_cast<__nv_bfloat16*>(p.out);
    const float g0 = p.gamma[c];
    const float g1 = p.gamma[c + 1];
    float a0 = 0.f, a1 = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
        const float s = p.scale[r / p.rows_per_sample];
        const int64_t at = r * p.cols + c;
        const float2 d = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dout + at));
        const float2 yv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(y + at));
        const float ds0 = d.x * s;
        const float ds1 = d.y * s;
        *reinterpret_cast<__nv_bfloat162*>(dy + at) = __floats2bfloat162_rn(ds0 * g0, ds1 * g1);
        a0 += ds0 * yv.x;
        a1 += ds1 * yv.y;
    }
    *reinterpret_cast<float2*>(p.partial + (int64_t)blockIdx.y * p.cols + c) = make_float2(a0, a1);
}

// dgamma[c] += sum_g partial[g, c], g in [0, chunks). Block (32, 16): 32 columns; y-lane j sums
// chunks j, j + 16, ... in order, then y-lane 0 adds the 16 lane sums in order.
extern "C" __global__ void __launch_bounds__(kRedX * kRedY) mapet_layer_scale_bwd_reduce(MapetLayerScale p) {
    __shared__ float s[kRedY][kRedX + 1];
    const int col = blockIdx.x * kRedX + threadIdx.x;
    float acc = 0.f;
    if (col < p.cols) {
        for (int g = threadIdx.y; g < p.chunks; g += kRedY) acc += p.partial[(int64_t)g * p.cols + col];
    }
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < p.cols) {
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < kRedY; ++i) t += s[i][threadIdx.x];
        p.dgamma[col] += t;
    }
}

extern "C" __global__ void __launch_bounds__(256) mapet_rows_copy(MapetRowCopy p) {
    const int nvr = p.cols / 8;
    const int64_t per_sample = (int64_t)p.count * nvr;
    const int64_t nvec = p.batch * per_sample;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const uint4* src = static_cast<const uint4*>(p.src);
    uint4* dst = static_cast<uint4*>(p.dst);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) {
        const int64_t b = i / per_sample;
        const int64_t rem = i - b * per_sample;
        const int64_t r = rem / nvr;
        const int64_t v = rem - r * nvr;
        const int64_t si = (b * p.src_rows + p.src_row0 + r) * nvr + v;
        const int64_t di = (b * p.dst_rows + p.dst_row0 + r) * nvr + v;
        uint4 val = src[si];
        if (p.accumulate) {
            float a[8], d[8];
            unpack8(val, a);
            unpack8(dst[di], d);
#pragma unroll
            for (int e = 0; e < 8; ++e) d[e] += a[e];
            val = pack8(d);
        }
        dst[di] = val;
    }
}

extern "C" __global__ void __launch_bounds__(256) mapet_add_f32(MapetF32Vector p) {
    float* y = static_cast<float*>(p.y);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) y[i] += p.x[i];
}

extern "C" __global__ void __launch_bounds__(256) mapet_f32_to_bf16(MapetF32Vector p) {
    __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        y[i] = __float2bfloat16_rn(p.x[i]);
    }
}
