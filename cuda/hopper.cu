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

#include "dependent_launch.cuh"
#include "hopper.cuh"
#include "params.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

constexpr int kBox = 64;                    // box rows and columns (64 bf16 = 128 bytes a row)
constexpr int kBoxBytes = kBox * kBox * 2;  // 8 KB

// The mma.sync A fragments of rows r and r + 8 of a row-major bf16 matrix of 16 C columns at `a`
// (global memory), its C 16-column steps, for lane t = lane % 4: what the check kernels feed
// their register-A products and fragment stores.
template <int C>
__device__ __forceinline__ void load_a_frags(uint32_t (&af)[C][4], const void* a, int r, int t) {
    const uint32_t* w = static_cast<const uint32_t*>(a);  // 8 C words a row
#pragma unroll
    for (int c = 0; c < C; ++c) {
        af[c][0] = w[r * 8 * C + 8 * c + t];
        af[c][1] = w[(r + 8) * 8 * C + 8 * c + t];
        af[c][2] = w[r * 8 * C + 8 * c + 4 + t];
        af[c][3] = w[(r + 8) * 8 * C + 8 * c + 4 + t];
    }
}

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

// out[64][n] (f32) = A[0:64, 0:k] B[0:n, 0:k]^T with k = 64 * k_atoms and n = 64 * kNBoxes: each
// 64-wide slice of K of A, and each 64-row part of it of B, is one TMA box (128-byte swizzle); B's
// boxes of a slice lie one after another, so that its 8-row atoms are 1024 bytes apart throughout
// (the stride sw128_desc gives). Four wgmma steps a slice read them through sw128_desc, the k-th
// step 32 k bytes into the slice: m64n64k16 for n = 64, m64n192k16 (the hwc-ws forward's product)
// for n = 192.
template <int kNBoxes, int kMaxAtoms>
__device__ __forceinline__ void wgmma_sw128_check(const MapetHopperCheck& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kN = kBox * kNBoxes;
    static_assert(kNBoxes == 1 || kNBoxes == 3, "n = 64 or 192");
    __shared__ __align__(1024) unsigned char a_tiles[kMaxAtoms][kBoxBytes];
    __shared__ __align__(1024) unsigned char b_tiles[kMaxAtoms][kNBoxes * kBoxBytes];
    __shared__ __align__(8) uint64_t bar;
    const int atoms = min(max(p.k_atoms, 1), kMaxAtoms);
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        mbar_fence_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(&bar, (1 + kNBoxes) * atoms * kBoxBytes);
        for (int j = 0; j < atoms; ++j) {
            tma_load_2d(a_tiles[j], &p.a, kBox * j, 0, &bar);
            for (int nb = 0; nb < kNBoxes; ++nb) tma_load_2d(b_tiles[j] + nb * kBoxBytes, &p.b, kBox * j, kBox * nb, &bar);
        }
    }
    mbar_wait(&bar, 0);

    float acc[kN / 2];
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) acc[i] = 0.f;
    wgmma_fence_acc();
    for (int j = 0; j < atoms; ++j) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const uint64_t a = sw128_desc(hopper_smem_addr(a_tiles[j]) + 32 * kk);
            const uint64_t b = sw128_desc(hopper_smem_addr(b_tiles[j]) + 32 * kk);
            if constexpr (kNBoxes == 1) {
                wgmma_m64n64k16(acc, a, b);
            } else {
                wgmma_m64n192k16(acc, a, b);
            }
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
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = 16 * warp + g + 8 * h;
            const int col = 8 * j + 2 * t;
            out[row * kN + col] = acc[4 * j + 2 * h];
            out[row * kN + col + 1] = acc[4 * j + 2 * h + 1];
        }
    }
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(128) mapet_hopper_wgmma_sw128(const __grid_constant__ MapetHopperCheck p) {
    wgmma_sw128_check<1, 2>(p);
}

extern "C" __global__ void __launch_bounds__(128) mapet_hopper_wgmma_sw128_n192(const __grid_constant__ MapetHopperCheck p) {
    wgmma_sw128_check<3, 1>(p);
}

// The wgmma forms the attention kernels use, on tiles that sw128_load_rows wrote (cp.async into
// the 128-byte swizzle, zero fill, the proxy fence): with A's fragments straight from global
// memory in the mma.sync layout, B is read once as K-major (B^T, n = 32, the first step not
// accumulating) and once as N-major (B itself, n = 64, 16 rows of B a step); with A from its own
// swizzled tile, B's rows 32..63 are read K-major (n = 32 from an offset atom); with A's tile
// read M-major (A^T, its rows as K), B's rows 0..31 K-major; and both tiles read MN-major (A^T B).
extern "C" __global__ void __launch_bounds__(128) mapet_hopper_wgmma_rs(const __grid_constant__ MapetHopperRs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ __align__(1024) unsigned char b_tile[kBoxBytes];
    __shared__ __align__(1024) unsigned char a_tile[kBoxBytes];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    sw128_load_rows(hopper_smem_addr(b_tile), p.b, 2 * kBox, kBox, p.b_rows, threadIdx.x, 128);
    sw128_load_rows(hopper_smem_addr(a_tile), p.a, 2 * kBox, kBox, kBox, threadIdx.x, 128);
    sw128_load_wait();
    __syncthreads();

    // A fragments of the warp's rows r = 16 warp + g (+ 8), the four 16-deep steps.
    const int r = 16 * warp + g;
    uint32_t af[4][4];
    load_a_frags(af, p.a, r, t);
    float kmajor[16];
    float nmajor[32];
    float shared_a[16];
    float mmajor_a[16];
    float mn[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) nmajor[i] = mn[i] = 0.f;
    const uint32_t b0 = hopper_smem_addr(b_tile);
    const uint32_t a0 = hopper_smem_addr(a_tile);
    wgmma_fence_acc();
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        if (c == 0)
            wgmma_m64n32k16_rs<0>(kmajor, af[c], sw128_desc(b0));
        else
            wgmma_m64n32k16_rs<1>(kmajor, af[c], sw128_desc(b0 + 32 * c));
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) wgmma_m64n64k16_rs_nmajor(nmajor, af[c], sw128_desc(b0 + 2048 * c));
    wgmma_m64n32k16_ss<0>(shared_a, sw128_desc(a0), sw128_desc(b0 + 32 * 128));
#pragma unroll
    for (int c = 1; c < 4; ++c) wgmma_m64n32k16_ss<1>(shared_a, sw128_desc(a0 + 32 * c), sw128_desc(b0 + 32 * 128 + 32 * c));
    // A's tile read M-major: A^T (the tile's columns as rows), 16 tile rows a step.
    wgmma_m64n32k16_ss_mmajor<0>(mmajor_a, sw128_desc(a0), sw128_desc(b0));
#pragma unroll
    for (int c = 1; c < 4; ++c) wgmma_m64n32k16_ss_mmajor<1>(mmajor_a, sw128_desc(a0 + 2048 * c), sw128_desc(b0 + 32 * c));
    // Both tiles read MN-major: A^T B, 16 rows of each a step.
#pragma unroll
    for (int c = 0; c < 4; ++c) wgmma_m64n64k16_ss_mn(mn, sw128_desc(a0 + 2048 * c), sw128_desc(b0 + 2048 * c));
    wgmma_commit_groups();
    wgmma_wait_groups<0>();

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r + 8 * h;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            p.out[row * 32 + 8 * j + 2 * t] = kmajor[4 * j + 2 * h];
            p.out[row * 32 + 8 * j + 2 * t + 1] = kmajor[4 * j + 2 * h + 1];
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            p.out[64 * 32 + row * 64 + 8 * j + 2 * t] = nmajor[4 * j + 2 * h];
            p.out[64 * 32 + row * 64 + 8 * j + 2 * t + 1] = nmajor[4 * j + 2 * h + 1];
            p.out[64 * 160 + row * 64 + 8 * j + 2 * t] = mn[4 * j + 2 * h];
            p.out[64 * 160 + row * 64 + 8 * j + 2 * t + 1] = mn[4 * j + 2 * h + 1];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            p.out[64 * 96 + row * 32 + 8 * j + 2 * t] = shared_a[4 * j + 2 * h];
            p.out[64 * 96 + row * 32 + 8 * j + 2 * t + 1] = shared_a[4 * j + 2 * h + 1];
            p.out[64 * 128 + row * 32 + 8 * j + 2 * t] = mmajor_a[4 * j + 2 * h];
            p.out[64 * 128 + row * 32 + 8 * j + 2 * t + 1] = mmajor_a[4 * j + 2 * h + 1];
        }
    }
#else
    __trap();
#endif
}

// A [64 x 32] matrix's A fragments (each warp its 16 rows, straight from global memory) stored
// transposed into a swizzled tile by sw128_store_frags_transposed, as the fused attention
// backward stores P^T and dS^T, then read back through the swizzle formula by hand: out = A^T.
extern "C" __global__ void __launch_bounds__(128) mapet_hopper_store_transposed(const MapetHopperTranspose p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ __align__(1024) unsigned char tile[32 * 128];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    // A fragments of rows r = 16 warp + g (+ 8), the two 16-column steps.
    const int r = 16 * warp + g;
    uint32_t af[2][4];
    load_a_frags(af, p.a, r, t);
    sw128_store_frags_transposed(hopper_smem_addr(tile), af, warp, lane);
    __syncthreads();
    for (int i = threadIdx.x; i < 32 * 64; i += 128) {
        const int row = i / 64, col = i % 64;
        const __nv_bfloat16 v =
            *reinterpret_cast<const __nv_bfloat16*>(tile + sw128_offset(row, col / 8) + 2 * (col % 8));
        p.out[i] = __bfloat162float(v);
    }
#else
    __trap();
#endif
}

// ------------------------------------------------------------------ a warp-specialised GEMM
//
// C[m, n] = A[m, k] B[n, k]^T (bf16 in, f32 accumulation, bf16 out), the shape of x W^T. The
// first kernel of the project built the way the fast Hopper GEMMs are, to measure how close the
// pieces above come to cuBLASLt before a fused kernel (a loss epilogue, a pixel prologue) is built
// on them. Experimental: its tests pass on an H200, where it runs at 0.71 to 0.93 of cuBLASLt's
// speed (BENCHMARKS.md); nothing in the model calls it.
//
// A block computes a 128 x 256 tile of C with 3 warpgroups:
// - warpgroup 0, the producer: one thread issues the TMA loads of each 64-deep slice of K (A: 128
//   rows x 64, 16 KB; B: 256 rows x 64, 32 KB) into a ring of kGemmStages stages, each completing
//   on the stage's `full` mbarrier; before reusing a stage it waits on the stage's `empty`
//   mbarrier for both consumers to have finished reading it. It keeps 40 registers.
// - warpgroups 1 and 2, the consumers: rows 0-63 and 64-127 of the tile, all 256 columns (128
//   f32 accumulators a thread, so 232 registers each): wait on `full`, issue the slice's four
//   m64n256k16 wgmma, and once the previous slice's wgmma are done (wait_group 1) release its
//   stage on `empty` (one thread a warpgroup). The tensor cores always have the current slice
//   queued while the previous stage is handed back.
// Edges: TMA fills rows and columns past the matrices with zeros (the expected byte count stays
// the full box), and the epilogue writes only inside C.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

constexpr int kGemmM = 128;
constexpr int kGemmN = 256;
constexpr int kGemmK = 64;
constexpr int kGemmStages = 4;
constexpr int kGemmABytes = kGemmM * kGemmK * 2;  // 16 KB
constexpr int kGemmBBytes = kGemmN * kGemmK * 2;  // 32 KB
constexpr int kGemmStageBytes = kGemmABytes + kGemmBBytes;
// Registers (setmaxnreg) of a producer and of a consumer thread, from the 168 each of the 384
// gets at launch: 128 x 40 + 256 x 232 <= 384 x 168.
constexpr int kGemmProducerRegs = 40;
constexpr int kGemmConsumerRegs = 232;

}  // namespace
#endif

// Grid (ceil(n/256), ceil(m/128)), 384 threads, dynamic shared memory 4 * 48 KB + 1 KB (the ring,
// aligned up to 1024 bytes inside it). k % 8 == 0 (16-byte rows for TMA).
extern "C" __global__ void __launch_bounds__(384, 1) mapet_hopper_gemm_tn(const __grid_constant__ MapetHopperGemm p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char gemm_smem_raw[];
    __shared__ __align__(8) uint64_t full[kGemmStages];
    __shared__ __align__(8) uint64_t empty[kGemmStages];
    // The ring, 1024-byte aligned (the swizzle's atoms): stage s holds A at s * 48 KB, B 16 KB on.
    unsigned char* ring = sw128_align(gemm_smem_raw);
    const int wg = threadIdx.x / 128;
    const int m0 = blockIdx.y * kGemmM;
    const int n0 = blockIdx.x * kGemmN;
    const int slices = (p.k + kGemmK - 1) / kGemmK;

    // full: the producer's arrive.expect_tx; empty: one arrival a consumer warpgroup.
    mbar_init_ring(full, empty, 1, 2);
    __syncthreads();

    if (wg == 0) {
        regs_release<kGemmProducerRegs>();
        if (threadIdx.x == 0) {
            for (int t = 0; t < slices; ++t) {
                const int s = t % kGemmStages;
                const int use = t / kGemmStages;
                if (use > 0) mbar_wait(&empty[s], (use - 1) & 1);
                unsigned char* stage = ring + s * kGemmStageBytes;
                mbar_arrive_expect_tx(&full[s], kGemmStageBytes);
                tma_load_2d(stage, &p.a, t * kGemmK, m0, &full[s]);
                tma_load_2d(stage + kGemmABytes, &p.b, t * kGemmK, n0, &full[s]);
            }
        }
        return;
    }

    regs_claim<kGemmConsumerRegs>();
    const int row_half = wg - 1;  // rows 64 row_half .. 64 row_half + 63 of the tile
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int t = 0; t < slices; ++t) {
        const int s = t % kGemmStages;
        mbar_wait(&full[s], (t / kGemmStages) & 1);
        const uint32_t a_s = hopper_smem_addr(ring + s * kGemmStageBytes) + row_half * 64 * 128;
        const uint32_t b_s = hopper_smem_addr(ring + s * kGemmStageBytes + kGemmABytes);
        wgmma_fence_acc();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16(acc, sw128_desc(a_s + 32 * kk), sw128_desc(b_s + 32 * kk));
        wgmma_commit_groups();
        // The previous slice's wgmma have finished reading their stage: hand it back.
        wgmma_wait_groups<1>();
        if (t > 0 && threadIdx.x % 128 == 0) mbar_arrive(&empty[(t - 1) % kGemmStages]);
    }
    wgmma_wait_groups<0>();
    pin_regs(acc);  // no read of the accumulators above the wait

    // Lane (g, q) of warp w of the warpgroup: rows 16 w + g (+ 8), columns 8 j + 2 q (+ 1).
    __nv_bfloat16* c = static_cast<__nv_bfloat16*>(p.c);
    const int lane = threadIdx.x & 31;
    const int warp = (threadIdx.x / 32) & 3;
    const int g = lane >> 2;
    const int q = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = m0 + 64 * row_half + 16 * warp + g + 8 * h;
        if (row >= p.m) continue;
        __nv_bfloat16* c_row = c + static_cast<int64_t>(row) * p.n;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            const int col = n0 + 8 * j + 2 * q;
            if (col + 1 < p.n && (p.n & 1) == 0) {
                *reinterpret_cast<__nv_bfloat162*>(c_row + col) =
                    __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            } else {
                if (col < p.n) c_row[col] = __float2bfloat16_rn(acc[4 * j + 2 * h]);
                if (col + 1 < p.n) c_row[col + 1] = __float2bfloat16_rn(acc[4 * j + 2 * h + 1]);
            }
        }
    }
#else
    __trap();
#endif
}

// ------------------------------------------------------------------ dQ reduced in L2: a measurement
//
// What a backward that accumulates dQ inside the dK/dV kernel would add to that kernel, alone:
// its f32 reductions into a per-pair accumulator that stays in L2, the accumulator's zeroing
// before and its conversion to bf16 after (params.h, MapetHopperDqReduce). The attention backward
// runs two kernels today (dQ, then dK/dV), recomputing S and dP in both: seven products of the
// (row, key) size where one fused kernel would run five. Whether fusing pays at ViT's 491 x 344
// pairs turns on what these reductions cost (BENCHMARKS.md): benches/hopper.rs times each mode at
// ViT-B's 1536 pairs against NONE, and tests/hopper.rs checks every sum. Nothing in the model
// calls it.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

constexpr int kDqReduceThreads = 384;

// The value added at (pair, warpgroup w, item i, dim d, position q): a small integer (params.h).
__device__ __forceinline__ float dq_probe_value(int pair, int w, int i, int d, int q) {
    return static_cast<float>((13 * pair + 7 * w + 5 * i + 3 * d + q) % 5 - 2);
}

__device__ __forceinline__ void red_add(float* a, float x) {
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(a), "f"(x) : "memory");
}

__device__ __forceinline__ void red_add_v2(float* a, float x, float y) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(a), "f"(x), "f"(y) : "memory");
}

// Adds one 64 x 32 tile (dims x positions q0 ..) into acc ([64, positions]) as `mode` says. v is
// the thread's part in the wgmma accumulator layout: v[4 j + e] is dim d_lo (e < 2) or d_lo + 8
// and position q0 + 8 j + 2 t + (e & 1). RED4 is hopper.cuh's red_add_acc_tile, as the fused
// attention backward adds its dQ tiles.
__device__ __forceinline__ void add_tile(float* acc, int positions, int q0, int d_lo, int t, int mode,
                                         const float (&v)[16]) {
    if (mode == MAPET_DQ_REDUCE_RED4) {
        red_add_acc_tile(acc + q0, positions, v);
        return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int q = q0 + 8 * j + 2 * t;
        float* lo = acc + static_cast<int64_t>(d_lo) * positions + q;
        float* hi = lo + 8 * static_cast<int64_t>(positions);
        if (mode == MAPET_DQ_REDUCE_RED1) {
            red_add(lo, v[4 * j]);
            red_add(lo + 1, v[4 * j + 1]);
            red_add(hi, v[4 * j + 2]);
            red_add(hi + 1, v[4 * j + 3]);
        } else if (mode == MAPET_DQ_REDUCE_RED2) {
            red_add_v2(lo, v[4 * j], v[4 * j + 1]);
            red_add_v2(hi, v[4 * j + 2], v[4 * j + 3]);
        } else if (mode == MAPET_DQ_REDUCE_STORE) {
            *reinterpret_cast<float2*>(lo) = make_float2(v[4 * j], v[4 * j + 1]);
            *reinterpret_cast<float2*>(hi) = make_float2(v[4 * j + 2], v[4 * j + 3]);
        }
    }
}

}  // namespace
#endif

// Grid (pairs), 384 threads; the launcher asks for dynamic shared memory the kernel never touches,
// so that one block runs an SM at a time, as the wgmma dK/dV kernel does. acc and dq 16-byte
// aligned.
extern "C" __global__ void __launch_bounds__(384, 1) mapet_hopper_dq_reduce(const MapetHopperDqReduce p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const int pair = blockIdx.x;
    const int positions = (p.lq + 31) / 32 * 32;
    const int chunks = positions / 32;
    float* acc = p.acc + static_cast<int64_t>(pair) * 64 * positions;
    const int tid = threadIdx.x;

    // 1. The accumulator zeroed (64 x positions floats, 16 bytes a store).
    for (int i = tid; i < 16 * positions; i += kDqReduceThreads)
        reinterpret_cast<float4*>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    __syncthreads();

    // 2. The warpgroups' tiles.
    const int w = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int d_lo = 16 * warp + g;
    for (int i = 0; i < p.items; ++i) {
        const int q0 = 32 * ((5 * i + 3 * w) % chunks);
        float v[16];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
                v[4 * j + e] = dq_probe_value(pair, w, i, d_lo + (e < 2 ? 0 : 8), q0 + 8 * j + 2 * t + (e & 1));
        }
        add_tile(acc, positions, q0, d_lo, t, p.mode, v);
    }
    // Every thread's additions performed at L2 (the fence waits for its own) before any thread
    // reads the accumulator back (ld.global.cg, from L2).
    __threadfence();
    __syncthreads();

    // 3. dq[pair] = bf16(acc^T), a warp 32 positions at a time (a lane a position: each load of
    // a dim's row reads 128 contiguous bytes), 16 bytes of a position's row a store.
    __nv_bfloat16* dq = static_cast<__nv_bfloat16*>(p.dq) + static_cast<int64_t>(pair) * p.lq * 64;
    for (int q = 32 * (tid >> 5) + lane; q < p.lq; q += kDqReduceThreads) {
#pragma unroll
        for (int d8 = 0; d8 < 8; ++d8) {
            uint32_t packed[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float a = __ldcg(acc + static_cast<int64_t>(8 * d8 + 2 * k) * positions + q);
                const float b = __ldcg(acc + static_cast<int64_t>(8 * d8 + 2 * k + 1) * positions + q);
                const __nv_bfloat162 ab = __floats2bfloat162_rn(a, b);
                packed[k] = *reinterpret_cast<const uint32_t*>(&ab);
            }
            *reinterpret_cast<uint4*>(dq + static_cast<int64_t>(q) * 64 + 8 * d8) =
                make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
    // Every read of the accumulator is done: its lines leave L2 unwritten.
    __syncthreads();
    discard_l2(acc, 64 * positions * 4, tid, kDqReduceThreads);
#else
    __trap();
#endif
}

// ================================================================================================ dependent launches
// Programmatic dependent launches, seen from inside (MapetHopperPdl in params.h): whether a
// kernel launched so starts while the one before it still runs (the primary spins long after
// letting it), and whether its dependent_launch_start() holds it until that one has completed.
// The op kernels' dependent launches save only the gap between two kernels, a few microseconds,
// which a bench cannot tell from noise when they do not happen at all (on some stream, driver
// or setting). Timed by %globaltimer, one clock for every SM.

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}

extern "C" __global__ void __launch_bounds__(32) mapet_hopper_pdl_primary(const MapetHopperPdl p) {
    dependent_launch_start();
    const uint64_t start = global_ns();
    while (global_ns() - start < static_cast<uint64_t>(p.spin_ns)) {
    }
    if (threadIdx.x == 0) p.times[0] = global_ns();
}

extern "C" __global__ void __launch_bounds__(32) mapet_hopper_pdl_secondary(const MapetHopperPdl p) {
    const uint64_t entered = global_ns();  // (a register read: no global access before the wait)
    dependent_launch_start();
    const uint64_t waited = global_ns();
    if (threadIdx.x == 0) {
        p.times[1] = entered;
        p.times[2] = waited;
    }
}
