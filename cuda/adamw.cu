// AdamW, one step over a flat f32 parameter buffer (all weights of the model side by side).
//
// Per element, as PyTorch's torch.optim.AdamW (decoupled weight decay), t = step (1-based):
//   g  = grad * grad_scale
//   p  = p * (1 - lr * weight_decay)                       only where decay_mask = 1
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p  = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),  bc1 = 1 - beta1^t, bc2 = 1 - beta2^t
//   param_bf16 = bf16(p)                                    when param_bf16 is not null
// bc1 and bc2 come from the host (computed in f64 there). The CPU reference in src/ops/adamw.rs
// does the same f32 operations in the same order.
//
// Layout: param, grad, m, v f32 [n]; decay_mask u8 [n]; param_bf16 bf16 [n]; all contiguous.
//
// Shape: memory-bound (31 bytes per element with the bf16 copy), so each thread handles 4
// elements with 16-byte loads of param, grad, m and v, a 4-byte load of the mask and an 8-byte
// store of the bf16 copy, in a grid-stride loop. The n % 4 tail is done one element each by the
// first threads. The host requires 16-byte aligned buffers (every DeviceBuffer is).
#include <cuda_bf16.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "bf16x8.cuh"
#include "params.h"

namespace {

struct Coefs {
    float decay;      // 1 - lr * weight_decay
    float step_size;  // lr / bc1
    float inv_sqrt_bc2;
};

__device__ __forceinline__ float update(float& p, float g, float& m, float& v, bool decayed, const MapetAdamW& a,
                                        const Coefs& k) {
    g *= a.grad_scale;
    if (decayed) p *= k.decay;
    m = a.beta1 * m + (1.0f - a.beta1) * g;
    v = a.beta2 * v + (1.0f - a.beta2) * (g * g);
    const float denom = sqrtf(v) * k.inv_sqrt_bc2 + a.eps;
    p -= k.step_size * (m / denom);
    return p;
}


}  // namespace

extern "C" __global__ void __launch_bounds__(256) adamw_step(MapetAdamW a) {
    dependent_launch_start();
    Coefs k;
    k.decay = 1.0f - a.lr * a.weight_decay;
    k.step_size = a.lr / a.bias_correction1;
    k.inv_sqrt_bc2 = 1.0f / sqrtf(a.bias_correction2);

    const int64_t nvec = a.n / 4;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    float4* p4 = reinterpret_cast<float4*>(a.param);
    const float4* g4 = reinterpret_cast<const float4*>(a.grad);
    float4* m4 = reinterpret_cast<float4*>(a.m);
    float4* v4 = reinterpret_cast<float4*>(a.v);
    const uint32_t* mask4 = reinterpret_cast<const uint32_t*>(a.decay_mask);
    uint2* copy4 = reinterpret_cast<uint2*>(a.param_bf16);

    for (int64_t i = tid; i < nvec; i += stride) {
        float4 p = p4[i];
        const float4 g = g4[i];
        float4 m = m4[i];
        float4 v = v4[i];
        const uint32_t mk = mask4[i];
        update(p.x, g.x, m.x, v.x, (mk & 0xffu) != 0, a, k);
        update(p.y, g.y, m.y, v.y, (mk & 0xff00u) != 0, a, k);
        update(p.z, g.z, m.z, v.z, (mk & 0xff0000u) != 0, a, k);
        update(p.w, g.w, m.w, v.w, (mk & 0xff000000u) != 0, a, k);
        p4[i] = p;
        m4[i] = m;
        v4[i] = v;
        if (copy4 != nullptr) copy4[i] = make_uint2(pack2(p.x, p.y), pack2(p.z, p.w));
    }

    const int64_t t = nvec * 4 + tid;
    if (t < a.n) {
        float p = a.param[t], m = a.m[t], v = a.v[t];
        update(p, a.grad[t], m, v, a.decay_mask[t] != 0, a, k);
        a.param[t] = p;
        a.m[t] = m;
        a.v[t] = v;
        if (a.param_bf16 != nullptr) reinterpret_cast<__nv_bfloat16*>(a.param_bf16)[t] = __float2bfloat16_rn(p);
    }
}
