// Residual-stream helpers of the model: the layer-scale residual with drop path, row copies
// between the rank-ordered row ranges of the two streams, and two f32 vector ops.
//
// Math (sample(r) = r / rows_per_sample; s = per-sample drop-path scale, 0 or 1/keep; gamma the
// layer-scale vector):
//   mapet_layer_scale_fwd         out[r, c] = x[r, c] + (s[sample(r)] * gamma[c]) * y[r, c]
//   mapet_layer_scale_bwd         dy[r, c]  = (dout[r, c] * s[sample(r)]) * gamma[c]
//                                 partial[g, c] = sum_{r in chunk g} (dout[r, c] * s) * y[r, c]
//                                 (optionally partial[chunks + g, c] = sum_{r in chunk g} dy[r, c])
//   mapet_layer_scale_bwd_reduce  dgamma[c] += sum_g partial[g, c]        (g in increasing order)
//                                 (optionally dy_col_sums[c] += sum_g partial[chunks + g, c])
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
// and iteration, with grid-stride loops. The backward is one thread per 8 columns (16-byte loads:
// a warp reads 512 contiguous bytes of a row) walking the `chunk_rows` rows of its chunk
// (blockIdx.y): it writes dy as it goes and keeps the column sums in registers, then stores them
// as its chunk's row of `partial`. The reduce kernel (32 columns x 16 slices a block, as
// LayerNorm's) sums the chunks in a fixed order. No float atomics anywhere: results depend only on the inputs and
// on chunk_rows, which the host derives from the shape alone, so runs are bit-identical.
#include <cuda_bf16.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "colsum.cuh"
#include "bf16x8.cuh"
#include "params.h"

namespace {

constexpr int kRedX = 32;
constexpr int kRedY = 16;
constexpr int kBwdThreads = 32;  // mapet_layer_scale_bwd: one warp a block, 8 columns a thread
constexpr int kRowsInFlight = 4;  // mapet_layer_scale_bwd: rows whose loads are issued together


}  // namespace

extern "C" __global__ void __launch_bounds__(256) mapet_layer_scale_fwd(MapetLayerScale p) {
    dependent_launch_start();
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

// Grid (ceil(cols / 8 / kBwdThreads), chunks), kBwdThreads threads; thread t of block (bx, g) owns
// columns 8c..8c+7, c = bx * kBwdThreads + t, over the rows of chunk g: 16-byte loads (a warp reads
// 512 contiguous bytes of a row), and the sample's drop-path scale read again only when a row
// enters the next sample (one division per thread instead of one per row). With dy_col_sums it
// also sums, per column, the bf16 dy it stores into the second half of partial: the bias gradient
// of the Linear whose output y is, with no second pass over dy.
extern "C" __global__ void __launch_bounds__(kBwdThreads) mapet_layer_scale_bwd(MapetLayerScale p) {
    dependent_launch_start();
    const int cols8 = p.cols / 8;
    const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (c >= cols8) return;  // no barrier in this kernel
    const int64_t r0 = (int64_t)blockIdx.y * p.chunk_rows;
    const int64_t r1 = min(p.rows, r0 + p.chunk_rows);
    const uint4* dout = static_cast<const uint4*>(p.dout);
    const uint4* y = static_cast<const uint4*>(p.y);
    uint4* dy = static_cast<uint4*>(p.out);
    const float4 ga = __ldg(reinterpret_cast<const float4*>(p.gamma) + 2 * c);
    const float4 gb = __ldg(reinterpret_cast<const float4*>(p.gamma) + 2 * c + 1);
    const float g[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
    const bool sums = p.dy_col_sums != nullptr;
    int64_t sample = r0 / p.rows_per_sample;
    int64_t next = (sample + 1) * p.rows_per_sample;  // first row of the next sample
    float s = p.scale[sample];
    float ag[8], ab[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) ag[e] = ab[e] = 0.f;
    // kRowsInFlight rows at a time: their loads first (absent rows read as zeros, never stored),
    // then the math, stores and sums in row order, so the result does not depend on it.
    for (int64_t rb = r0; rb < r1; rb += kRowsInFlight) {
        uint4 dr[kRowsInFlight], yr[kRowsInFlight];
#pragma unroll
        for (int j = 0; j < kRowsInFlight; ++j) {
            const bool ok = rb + j < r1;
            const int64_t i = (rb + j) * cols8 + c;
            dr[j] = ok ? __ldg(dout + i) : make_uint4(0u, 0u, 0u, 0u);
            yr[j] = ok ? __ldg(y + i) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int j = 0; j < kRowsInFlight; ++j) {
            const int64_t r = rb + j;
            if (r >= r1) break;
            if (r == next) {
                ++sample;
                next += p.rows_per_sample;
                s = p.scale[sample];
            }
            float d[8], yv[8], o[8];
            unpack8(dr[j], d);
            unpack8(yr[j], yv);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float ds = d[e] * s;
                o[e] = ds * g[e];
                ag[e] += ds * yv[e];
            }
            const uint4 packed = pack8(o);
            dy[r * cols8 + c] = packed;
            if (sums) {
                unpack8(packed, o);  // the bf16 values just stored, which the weight-gradient GEMM reads
#pragma unroll
                for (int e = 0; e < 8; ++e) ab[e] += o[e];
            }
        }
    }
    float4* out = reinterpret_cast<float4*>(p.partial + (int64_t)blockIdx.y * p.cols + 8 * c);
    out[0] = make_float4(ag[0], ag[1], ag[2], ag[3]);
    out[1] = make_float4(ag[4], ag[5], ag[6], ag[7]);
    if (sums) {
        float4* out2 = reinterpret_cast<float4*>(p.partial + ((int64_t)p.chunks + blockIdx.y) * p.cols + 8 * c);
        out2[0] = make_float4(ab[0], ab[1], ab[2], ab[3]);
        out2[1] = make_float4(ab[4], ab[5], ab[6], ab[7]);
    }
}

// dgamma[c] += sum_g partial[g, c], g in [0, chunks), and, with dy_col_sums, dy_col_sums[c] += the
// same over the second half of partial. kRedX columns a block, kRedY slices: slice j sums chunks
// j, j + kRedY, ... in order, then slice 0 adds the slices' sums in order (colsum.cuh).
extern "C" __global__ void __launch_bounds__(kRedX * kRedY) mapet_layer_scale_bwd_reduce(MapetLayerScale p) {
    dependent_launch_start();
    add_group_sums<kRedX, kRedY>(p.partial, p.chunks, p.cols, p.dgamma);
    if (p.dy_col_sums != nullptr) {
        __syncthreads();  // every slice-0 read of the shared sums above precedes their rewrite
        add_group_sums<kRedX, kRedY>(p.partial + (int64_t)p.chunks * p.cols, p.chunks, p.cols, p.dy_col_sums);
    }
}

extern "C" __global__ void __launch_bounds__(256) mapet_rows_copy(MapetRowCopy p) {
    dependent_launch_start();
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
    dependent_launch_start();
    float* y = static_cast<float*>(p.y);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) y[i] += p.x[i];
}

extern "C" __global__ void __launch_bounds__(256) mapet_f32_to_bf16(MapetF32Vector p) {
    dependent_launch_start();
    __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        y[i] = __float2bfloat16_rn(p.x[i]);
    }
}
