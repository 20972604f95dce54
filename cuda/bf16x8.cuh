// Eight bf16 values as one 16-byte vector (uint4), the unit of the memory-bound kernels' loads and
// stores, to and from f32. A 32-bit word holds two bf16 values, the lower-addressed one in the low
// half; a bf16 is the top half of the f32 with the same bits, so widening is a shift or a mask.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

namespace {

__device__ __forceinline__ void unpack8(const uint4& q, float (&f)[8]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// a and b rounded to bf16 (nearest even), a in the low half.
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
