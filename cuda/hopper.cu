// Checks of the Hopper building blocks in hopper.cuh, one small kernel each, run by
// tests/hopper.rs against host computations on a compute capability 9.0 device. They exist so
// that a kernel built on TMA, mbarriers and swizzled wgmma starts from pieces known to work:
// each isolates one thing that can be wrong without a visible cause (a tensor-map encoding, the
// swizzle pattern, a descriptor field) and turns it into a wrong number at a known place.
//
// Both kernels: one block of 128 threads (one warpgroup); sm_90a only (elsewhere they trap, and
// the host refuses to launch them off compute capability 9.0).
#include <cuda_bf16.h>
#include <stdint.h>

#include "hopper.cuh"
#include "params.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

constexpr int kBox = 64;                    // box rows and columns (64 bf16 = 128 bytes a row)
constexpr int kBoxBytes = kBox * kBox * 2;  // 8 KB

}  // namespace
#endif

// out[r][c] = the box of `a` at (r0, c0), read back through the 128-byte swizzle by hand: a TMA
// load, an mbarrier wait, and the pattern hopper.cuh states. Elements of the box outside the
// matrix come back as zeros (TMA's fill).
extern "C" __global__ void __launch_bounds__(128) mapet_hopper_tma_roundtrip(const __grid_constant__ MapetHopperCheck p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ __align__(1024) unsigned char tile[kBoxBytes];
    __shared__ __align__(8) uint64_t bar;
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        mbar_fence_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(&bar, kBoxBytes);
        tma_load_2d(tile, &p.a, p.c0, p.r0, &bar);
    }
    mbar_wait(&bar, 0);
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    const __nv_bfloat16* t = reinterpret_cast<const __nv_bfloat16*>(tile);
    for (int i = threadIdx.x; i < kBox * kBox; i += blockDim.x) {
        const int r = i / kBox;
        const int c = i % kBox;
        const int o = r * 128 + c * 2;
        out[i] = t[(o ^ ((r & 7) << 4)) / 2];
    }
#else
    __trap();
#endif
}

// out[64][64] (f32) = A[0:64, 0:k] B[0:64, 0:k]^T with k = 64 * k_atoms: each 64-wide slice of
// K of A and B is one TMA box (128-byte swizzle), and four m64n64k16 wgmma steps a slice read
// them through sw128_desc, the k-th step 32 k bytes into the slice.
extern "C" __global__ void __launch_bounds__(128) mapet_hopper_wgmma_sw128(const __grid_constant__ MapetHopperCheck p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kMaxAtoms = 2;
    __shared__ __align__(1024) unsigned char a_tiles[kMaxAtoms][kBoxBytes];
    __shared__ __align__(1024) unsigned char b_tiles[kMaxAtoms][kBoxBytes];
    __shared__ __align__(8) uint64_t bar;
    const int atoms = min(max(p.k_atoms, 1), kMaxAtoms);
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        mbar_fence_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(&bar, 2 * atoms * kBoxBytes);
        for (int j = 0; j < atoms; ++j) {
            tma_load_2d(a_tiles[j], &p.a, kBox * j, 0, &bar);
            tma_load_2d(b_tiles[j], &p.b, kBox * j, 0, &bar);
        }
    }
    mbar_wait(&bar, 0);

    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    wgmma_fence_acc();
    for (int j = 0; j < atoms; ++j) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const uint64_t a = sw128_desc(hopper_smem_addr(a_tiles[j]) + 32 * kk);
            const uint64_t b = sw128_desc(hopper_smem_addr(b_tiles[j]) + 32 * kk);
            wgmma_m64n64k16(acc, a, b);
        }
    }
    wgmma_commit_groups();
    wgmma_wait_groups<0>();

    float* out = static_cast<float*>(p.out);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = 16 * warp + g + 8 * h;
            const int col = 8 * j + 2 * t;
            out[row * kBox + col] = acc[4 * j + 2 * h];
            out[row * kBox + col + 1] = acc[4 * j + 2 * h + 1];
        }
    }
#else
    __trap();
#endif
}
