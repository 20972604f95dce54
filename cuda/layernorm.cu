// LayerNorm over the last dimension, forward, backward, and fused residual-add + forward.
//
// Math (one row r of `cols` values, statistics in f32):
//   mean_r = sum_c x[r,c] / cols
//   var_r  = sum_c (x[r,c] - mean_r)^2 / cols            (biased, computed from the centred values)
//   rstd_r = 1 / sqrt(var_r + eps)                        (eps inside the square root)
//   xhat   = (x - mean_r) * rstd_r,   y = xhat * weight + bias
// Backward, with g = dy * weight:
//   dx = rstd_r * (g - mean_c(g) - xhat * mean_c(g * xhat))      (written, or added to dx)
//   dweight += sum_r dy * xhat,   dbias += sum_r dy
// Residual variant: h = bf16(residual + x) is written, and y = LN(h) is computed from the rounded
// h, the very tensor the backward will later read, so forward and backward see the same input.
//
// Layouts: x, y, h, residual, dy, dx bf16 [rows, cols] row-major, contiguous; weight, bias,
// dweight, dbias f32 [cols]; mean, rstd f32 [rows]; partial f32 [num_partials, 2 * cols]
// (dweight partials in the first `cols` columns, dbias partials in the last `cols`).
//
// Shape of the kernels. These are memory-bound (62848 x 768 rows in the model), so the goal is
// to touch every byte once with wide loads:
// - One warp per row, 8 rows per 256-thread block. When cols % 8 == 0, cols <= 1024 and every
//   pointer is 16-byte aligned, lane l loads the 16-byte vectors l, l + 32, ... of the row
//   (VPL = ceil(cols / 256) vectors per lane, a template parameter), keeps them in registers,
//   and reduces with xor-butterfly shuffles (every lane ends with the same bits). The row is read
//   once and written once. Otherwise a generic scalar path (same warp-per-row split, re-reading
//   the row from L1/L2 for each pass) serves odd sizes such as 37 and rows wider than 1024.
// - Backward: each block owns a contiguous chunk of rows. Its warps compute dx row by row and
//   keep per-lane column sums of dy * xhat and dy in registers (a lane always sees the same
//   columns). The warps of a block then fold their sums through shared memory in a fixed order
//   (warp 0, then 1, ...) and the last warp writes the block's row of `partial`. A second kernel,
//   layernorm_bwd_reduce, sums `partial` over its rows in a fixed order and adds the result to
//   dweight and dbias. No float atomics anywhere: the result depends only on the inputs and the
//   grid size, so repeated runs are bit-identical.
// - layernorm_bwd_reduce reads the number of partial rows from `rows` of its parameter struct
//   (for that kernel `partial` is the [rows, 2 * cols] matrix being reduced).
#include <cuda_bf16.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "bf16x8.cuh"
#include "params.h"

namespace {

constexpr int kWarp = 32;
// Threads of the reduction kernel: 32 columns x 16 partial-row lanes.
constexpr int kRedX = 32;
constexpr int kRedY = 16;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}


__device__ __forceinline__ void load8f(const float* p, float (&f)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ float bf(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ float round_bf(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// ------------------------------------------------------------------------------------ forward

// Vector path. RESIDUAL: the row is bf16(residual + x), which is also written to h.
template <int VPL, bool RESIDUAL>
__device__ __forceinline__ void fwd_vec(const void* residual_, const void* x_, void* h_, void* y_,
                                        const float* __restrict__ weight, const float* __restrict__ bias,
                                        float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                                        int cols, float eps) {
    const int lane = threadIdx.x % kWarp;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= rows) return;
    const int nvec = cols / 8;
    const uint4* x = reinterpret_cast<const uint4*>(x_) + row * nvec;
    uint4* y = reinterpret_cast<uint4*>(y_) + row * nvec;

    // Issue every load of the row before using any of them.
    uint4 q[VPL];
    uint4 qr[RESIDUAL ? VPL : 1];
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
        const int c = j * kWarp + lane;
        if (c < nvec) {
            q[j] = x[c];
            if constexpr (RESIDUAL) qr[j] = (reinterpret_cast<const uint4*>(residual_) + row * nvec)[c];
        }
    }

    float v[VPL][8];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
        const int c = j * kWarp + lane;
        if (c < nvec) {
            unpack8(q[j], v[j]);
            if constexpr (RESIDUAL) {
                float r[8];
                unpack8(qr[j], r);
#pragma unroll
                for (int e = 0; e < 8; ++e) v[j][e] = round_bf(r[e] + v[j][e]);
                (reinterpret_cast<uint4*>(h_) + row * nvec)[c] = pack8(v[j]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) v[j][e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += v[j][e];
    }
    const float mean = warp_sum(sum) / (float)cols;

    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
        if (j * kWarp + lane < nvec) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float d = v[j][e] - mean;
                sq += d * d;
            }
        }
    }
    const float rstd = 1.0f / sqrtf(warp_sum(sq) / (float)cols + eps);

#pragma unroll
    for (int j = 0; j < VPL; ++j) {
        const int c = j * kWarp + lane;
        if (c < nvec) {
            float w[8], b[8], o[8];
            load8f(weight + c * 8, w);
            load8f(bias + c * 8, b);
#pragma unroll
            for (int e = 0; e < 8; ++e) o[e] = (v[j][e] - mean) * rstd * w[e] + b[e];
            y[c] = pack8(o);
        }
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// Generic path: any cols, any alignment; three passes over the row (the later ones hit L1/L2).
template <bool RESIDUAL>
__device__ __forceinline__ void fwd_generic(const void* residual_, const void* x_, void* h_, void* y_,
                                            const float* __restrict__ weight, const float* __restrict__ bias,
                                            float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                            int64_t rows, int cols, float eps) {
    const int lane = threadIdx.x % kWarp;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= rows) return;
    const int64_t base = row * cols;
    const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(x_) + base;
    const __nv_bfloat16* res = reinterpret_cast<const __nv_bfloat16*>(residual_) + (RESIDUAL ? base : 0);
    auto value = [&](int c) -> float {
        if constexpr (RESIDUAL) {
            return round_bf(bf(res, c) + bf(x, c));
        } else {
            return bf(x, c);
        }
    };

    float sum = 0.f;
    for (int c = lane; c < cols; c += kWarp) sum += value(c);
    const float mean = warp_sum(sum) / (float)cols;
    float sq = 0.f;
    for (int c = lane; c < cols; c += kWarp) {
        const float d = value(c) - mean;
        sq += d * d;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(sq) / (float)cols + eps);

    __nv_bfloat16* y = reinterpret_cast<__nv_bfloat16*>(y_) + base;
    for (int c = lane; c < cols; c += kWarp) {
        const float hv = value(c);
        if constexpr (RESIDUAL) (reinterpret_cast<__nv_bfloat16*>(h_) + base)[c] = __float2bfloat16_rn(hv);
        y[c] = __float2bfloat16_rn((hv - mean) * rstd * weight[c] + bias[c]);
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// ----------------------------------------------------------------------------------- backward

// Rows [r0, r1) of this block: a contiguous chunk, the same split for every path.
__device__ __forceinline__ void block_rows(int64_t rows, int64_t& r0, int64_t& r1) {
    const int64_t chunk = (rows + gridDim.x - 1) / gridDim.x;
    r0 = min(rows, (int64_t)blockIdx.x * chunk);
    r1 = min(rows, r0 + chunk);
}

// Vector path. Dynamic shared memory: 2 * cols floats.
template <int VPL>
__device__ __forceinline__ void bwd_vec(const MapetLayerNormBwd& p) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    const int cols = p.cols;
    const int nvec = cols / 8;
    const float inv_cols = 1.0f / (float)cols;
    int64_t r0, r1;
    block_rows(p.rows, r0, r1);

    float dw[VPL][8], db[VPL][8];
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) dw[j][e] = db[j][e] = 0.f;
    }

    for (int64_t row = r0 + warp; row < r1; row += nwarps) {
        const uint4* x = reinterpret_cast<const uint4*>(p.x) + row * nvec;
        const uint4* dy = reinterpret_cast<const uint4*>(p.dy) + row * nvec;
        uint4 qx[VPL], qdy[VPL];
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * kWarp + lane;
            if (c < nvec) {
                qx[j] = x[c];
                qdy[j] = dy[c];
            }
        }
        const float mu = p.mean[row];
        const float rs = p.rstd[row];

        float g[VPL][8];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * kWarp + lane;
            if (c < nvec) {
                float xv[8], dv[8], w[8];
                unpack8(qx[j], xv);
                unpack8(qdy[j], dv);
                load8f(p.weight + c * 8, w);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float xh = (xv[e] - mu) * rs;
                    g[j][e] = dv[e] * w[e];
                    s1 += g[j][e];
                    s2 += g[j][e] * xh;
                    dw[j][e] += dv[e] * xh;
                    db[j][e] += dv[e];
                }
            }
        }
        const float m1 = warp_sum(s1) * inv_cols;
        const float m2 = warp_sum(s2) * inv_cols;

        uint4* dx = reinterpret_cast<uint4*>(p.dx) + row * nvec;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * kWarp + lane;
            if (c < nvec) {
                float xv[8], o[8];
                unpack8(qx[j], xv);
                if (p.accumulate) {
                    unpack8(dx[c], o);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) o[e] = 0.f;
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float xh = (xv[e] - mu) * rs;
                    o[e] += rs * (g[j][e] - m1 - xh * m2);
                }
                dx[c] = pack8(o);
            }
        }
    }

    // Fold the warps' column sums in warp order; the last warp writes the block's partial row.
    float4* out = reinterpret_cast<float4*>(p.partial + (int64_t)blockIdx.x * 2 * cols);
    float4* sw = reinterpret_cast<float4*>(smem);
    float4* sb = reinterpret_cast<float4*>(smem + cols);
    for (int w = 0; w < nwarps; ++w) {
        if (warp == w) {
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                const int c = j * kWarp + lane;
                if (c < nvec) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int i = 2 * c + hh;  // float4 index within [0, cols / 4)
                        float4 a = make_float4(dw[j][4 * hh], dw[j][4 * hh + 1], dw[j][4 * hh + 2],
                                               dw[j][4 * hh + 3]);
                        float4 b = make_float4(db[j][4 * hh], db[j][4 * hh + 1], db[j][4 * hh + 2],
                                               db[j][4 * hh + 3]);
                        if (w > 0) {
                            const float4 pa = sw[i], pb = sb[i];
                            a.x += pa.x, a.y += pa.y, a.z += pa.z, a.w += pa.w;
                            b.x += pb.x, b.y += pb.y, b.z += pb.z, b.w += pb.w;
                        }
                        if (w == nwarps - 1) {
                            out[i] = a;
                            out[cols / 4 + i] = b;
                        } else {
                            sw[i] = a;
                            sb[i] = b;
                        }
                    }
                }
            }
        }
        __syncthreads();
    }
}

// Generic path: dx by a warp per row, then the block's column sums by a thread per column
// (re-reading its chunk of x and dy, mostly from L2).
__device__ __forceinline__ void bwd_generic(const MapetLayerNormBwd& p) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    const int cols = p.cols;
    const float inv_cols = 1.0f / (float)cols;
    const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(p.x);
    const __nv_bfloat16* dy = reinterpret_cast<const __nv_bfloat16*>(p.dy);
    __nv_bfloat16* dx = reinterpret_cast<__nv_bfloat16*>(p.dx);
    int64_t r0, r1;
    block_rows(p.rows, r0, r1);

    for (int64_t row = r0 + warp; row < r1; row += nwarps) {
        const int64_t base = row * cols;
        const float mu = p.mean[row];
        const float rs = p.rstd[row];
        float s1 = 0.f, s2 = 0.f;
        for (int c = lane; c < cols; c += kWarp) {
            const float xh = (bf(x, base + c) - mu) * rs;
            const float g = bf(dy, base + c) * p.weight[c];
            s1 += g;
            s2 += g * xh;
        }
        const float m1 = warp_sum(s1) * inv_cols;
        const float m2 = warp_sum(s2) * inv_cols;
        for (int c = lane; c < cols; c += kWarp) {
            const float xh = (bf(x, base + c) - mu) * rs;
            const float g = bf(dy, base + c) * p.weight[c];
            float o = rs * (g - m1 - xh * m2);
            if (p.accumulate) o += bf(dx, base + c);
            dx[base + c] = __float2bfloat16_rn(o);
        }
    }

    float* out = p.partial + (int64_t)blockIdx.x * 2 * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float a = 0.f, b = 0.f;
        for (int64_t row = r0; row < r1; ++row) {
            const float d = bf(dy, row * cols + c);
            a += d * ((bf(x, row * cols + c) - p.mean[row]) * p.rstd[row]);
            b += d;
        }
        out[c] = a;
        out[cols + c] = b;
    }
}

}  // namespace

// ------------------------------------------------------------------------------------ kernels

#define MAPET_LN_FWD(VPL)                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 4) layernorm_fwd_v##VPL(MapetLayerNormFwd p) {    \
        dependent_launch_start();                                                                         \
        fwd_vec<VPL, false>(nullptr, p.x, nullptr, p.y, p.weight, p.bias, p.mean, p.rstd, p.rows, p.cols, \
                            p.eps);                                                                   \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 4)                                              \
        layernorm_residual_fwd_v##VPL(MapetResidualLayerNormFwd p) {                                 \
        dependent_launch_start();                                                                       \
        fwd_vec<VPL, true>(p.residual, p.x, p.h, p.y, p.weight, p.bias, p.mean, p.rstd, p.rows, p.cols, \
                           p.eps);                                                                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) layernorm_bwd_v##VPL(MapetLayerNormBwd p) {    \
        dependent_launch_start();                                                                     \
        bwd_vec<VPL>(p);                                                                              \
    }

MAPET_LN_FWD(1)
MAPET_LN_FWD(2)
MAPET_LN_FWD(3)
MAPET_LN_FWD(4)

extern "C" __global__ void __launch_bounds__(256) layernorm_fwd_generic(MapetLayerNormFwd p) {
    dependent_launch_start();
    fwd_generic<false>(nullptr, p.x, nullptr, p.y, p.weight, p.bias, p.mean, p.rstd, p.rows, p.cols, p.eps);
}

extern "C" __global__ void __launch_bounds__(256) layernorm_residual_fwd_generic(MapetResidualLayerNormFwd p) {
    dependent_launch_start();
    fwd_generic<true>(p.residual, p.x, p.h, p.y, p.weight, p.bias, p.mean, p.rstd, p.rows, p.cols, p.eps);
}

extern "C" __global__ void __launch_bounds__(256) layernorm_bwd_generic(MapetLayerNormBwd p) {
    dependent_launch_start();
    bwd_generic(p);
}

// dweight[c] += sum_g partial[g, c]; dbias[c] += sum_g partial[g, cols + c], g in [0, p.rows).
// Block (32, 16): 32 output columns; the 16 y-lanes each sum every 16th partial row in order,
// then y-lane 0 adds the 16 sums in order. Fixed order throughout: deterministic.
extern "C" __global__ void __launch_bounds__(kRedX * kRedY) layernorm_bwd_reduce(MapetLayerNormBwd p) {
    dependent_launch_start();
    __shared__ float s[kRedY][kRedX + 1];
    const int total = 2 * p.cols;
    const int col = blockIdx.x * kRedX + threadIdx.x;
    float acc = 0.f;
    if (col < total) {
        for (int64_t g = threadIdx.y; g < p.rows; g += kRedY) acc += p.partial[g * total + col];
    }
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < total) {
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < kRedY; ++i) t += s[i][threadIdx.x];
        float* dst = col < p.cols ? p.dweight + col : p.dbias + (col - p.cols);
        *dst += t;
    }
}
