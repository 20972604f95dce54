// Patch embedding, from pixels to the rank-ordered first rows of both streams, forward and backward.
//
// Math (SPEC.md, "Inputs to the blocks"; DESIGN.md, "Rank order inside the model"). Per sample b,
// with S = image, p = patch, G = S / p, N = 1 + G*G tokens, C context tokens, P = N - C predicted,
// K = 3*p*p and R = N + 2P output rows:
//   out[b, rank(t)]     = (t == 0 ? cls_token : conv(image_b)[t-1] + bias) + pos_embed[t]
//   out[b, N + j]       = out[b, N + P + j] = mask_token + pos_embed[token of rank C + j]
// where conv(image)[i][d] = sum_k A[i][k] W[d][k] over the patch i = py*G + px (raster order) and
// k = (c*p + ky)*p + kx: A[i][k] = x[c, py*p + ky, px*p + kx], W = weight [D, 3, p, p] = [D, K].
// Backward (d_out given, all gradients f32 and added to):
//   dweight[d][k] = sum_{b, t >= 1} d_out[b, rank(t), d] * A_b[t-1][k]
//   dbias[d]      = sum_{b, t >= 1} d_out[b, rank(t), d];      dcls[d] = sum_b d_out[b, 0, d]
//   dpos[t][d]    = sum_b d_out[b, rank(t), d] + [rank(t) >= C] (d_out[b, N + j] + d_out[b, N + P + j])
//   dmask[d]      = sum_b sum_j (d_out[b, N + j, d] + d_out[b, N + P + j, d])      (j = rank - C)
//
// Layouts: pixels uint8 [B, S, S, 3] (HWC as decoded; normalised in registers as u8*scale[c] +
// shift[c]) or f32 [B, 3, S, S] (already normalised); ranks int32 [B, N]; weight bf16 [D, K];
// bias, cls, mask f32 [D]; pos f32 [N, D]; out and d_out bf16 [B, R, D]. D % 8 == 0 (16-byte rows).
//
// Which kernels run: on compute capability 9.0 the default pixel order, `hwc-ws-raw` (host:
// `PixelOrder`), runs the warp-specialised wgmma kernels of the sections "forward,
// warp-specialised on TMA" and "backward_weight_hwc_ws" below (its forward writes the CLS and
// mask-token rows itself and multiplies (u - 127) / 256 by an f16 weight with the normalisation
// folded in). The mma.sync GEMM kernels this header describes are the default elsewhere (`hwc`)
// and run the other orders; the backward's token sums and its reduction over splits serve every
// order.
//
// Why the kernels look like this:
// - The forward is one GEMM [B*(N-1), K] x [K, D] whose A operand is never stored: each block builds
//   its A tile from the pixels while the previous tile is multiplied (global -> registers ->
//   bf16 in shared memory), so the image is read as it is (1 byte a pixel for uint8) and there is no
//   im2col copy. When p % 8 == 0 (ViT /8, /16, /32) eight consecutive k of one row of A are eight
//   neighbouring pixels of one channel: two float4 loads (f32) or three 8-byte loads holding
//   8 pixels x 3 channels (uint8, HWC). Other p go through a scalar path with zero-filled tails.
// - Tensor cores through mma.sync m16n8k16 (bf16 in, f32 accumulate) and ldmatrix, which exist on
//   sm_80 and sm_90a alike; the block tile is 128 x 128 x 32 with 8 warps of 64 x 32. The weight
//   tile comes in by cp.async. Shared rows are padded by 16 bytes so that the 8 row addresses of
//   each ldmatrix phase fall in distinct banks.
// - The epilogue adds bias + pos_embed and scatters each patch row straight to its rank row, so the
//   permutation costs nothing; a small kernel writes the CLS row and the 2P mask-token rows.
// - dweight is the GEMM d_out^T [D, B*(N-1)] x A [B*(N-1), K], again with A built from pixels and
//   d_out rows gathered by rank (the HWC kernels read each row's d_out row and pixel base from a
//   small table, which the token sums below write as they load the ranks, instead of dividing
//   and looking the rank up per row, and copy both operands by cp.async three steps ahead:
//   backward_weight_hwc); both operands sit in shared memory with the contraction index as row,
//   so ldmatrix.trans gives the fragments. The contraction (25088 rows for ViT-B at B = 128) is
//   split over blocks for parallelism; each split writes its own f32 partial and a second kernel
//   sums the splits in a fixed order: deterministic, no atomics.
// - dpos (and from it dbias, dcls, dmask) is a reduction over the batch, bound by reading d_out
//   once: per token, warps read 512 contiguous bytes of a row (8 channels a lane) and four batch
//   slices a block keep enough loads in flight; then the sums over tokens, in blocks of the
//   weight's reduction over splits (which for `hwc-ws` needs the same column sums).
//   Fixed orders throughout: deterministic.
// - The backward's kernels in launch order: token sums (and the row table), weight gradient,
//   its reduction over splits (and the sums over tokens).
//
// Contraction order (the `_hwc` kernels; host: `PixelOrder`). A GEMM may sum over its K index in
// any order, as long as A and W agree. In the weight's order k = (c*p + ky)*p + kx, eight
// consecutive k of a uint8 HWC image are eight pixels of one channel, 3 bytes apart: three 8-byte
// loads and 24 byte extractions for 8 values, plus integer divisions to locate k. These kernels
// instead contract in the image's own order k' = (ky*p + kx)*3 + c, where eight consecutive k'
// (p % 8 == 0) are eight consecutive bytes: one 8-byte load, channels cycling c, c+1, c+2. Their
// A-tile build costs about a third of the instructions. That matters if, as their SASS suggests
// (the CHW kernels' main loops hold several non-MMA instructions per mma), those kernels are
// bound by instruction issue rather than by the tensor cores. The smaller raw staging (2
// registers a row) also lets the forward load pixels two steps ahead. The forward multiplies by
// a copy of the weight permuted to [D, p, p, 3] (mapet_patch_embed_weight_hwc, D*K bf16
// scratch); the weight-gradient partials come out in k' order and the reduction over splits
// writes each sum at the weight's own index, so every caller is unchanged.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "hopper.cuh"
#include "params.h"

namespace {

constexpr int kThreads = 256;
// Forward GEMM tile: 128 patch rows x 128 channels x 32 of K.
constexpr int kFwdM = 128;
constexpr int kFwdN = 128;
constexpr int kFwdK = 32;
constexpr int kFwdLd = kFwdK + 8;  // padded row, 80 bytes
// dweight GEMM tile: 128 channels x 128 of K, contracting 32 patch rows a step.
constexpr int kBwdN = 128;
constexpr int kBwdK = 128;
constexpr int kBwdC = 32;
constexpr int kBwdLd = 128 + 8;  // padded row, 272 bytes
// Batch sums per token (mapet_patch_embed_bwd_tokens): 8-channel groups x batch slices a block,
// and blocks an SM. 4 slices (128 threads) rather than 8: at ViT-B the grid is 3 x 197 = 591
// blocks, which at 8 slices (two 256-thread blocks an SM at 86 registers) ran as 2.2 waves on 132
// SMs, at 4 in one (five blocks an SM).
constexpr int kTokGroups = 32;
constexpr int kTokSlices = 4;
constexpr int kTokBlocksPerSm = 5;
// Samples whose ranks (of the block's token) a block holds in shared memory at a time.
constexpr int kTokRankChunk = 512;

// ------------------------------------------------------------------ PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, register j receives
// matrix j with lane l holding row l/4, columns 2(l%4) and 2(l%4)+1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// As above, transposed: lane l holds (row 2(l%4), column l/4) and (row 2(l%4)+1, column l/4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// D += A B for a 16x16 (row) A, 16x8 (col) B, bf16 in, f32 accumulate. With g = lane/4, q = lane%4:
// a0 = A[g][2q..], a1 = A[g+8][2q..], a2 = A[g][2q+8..], a3 = A[g+8][2q+8..];
// b0 = B[2q..][g], b1 = B[2q+8..][g]; d0,d1 = D[g][2q, 2q+1], d2,d3 = D[g+8][2q, 2q+1].
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy to the shared-space address dst; src_bytes = 0 fills the 16 bytes
// with zeros (nothing is read).
__device__ __forceinline__ void cp_async16_to(uint32_t dst, const void* src, bool valid) {
    const uint32_t n = valid ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    cp_async16_to(smem_addr(dst), src, valid);
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// 8-byte global -> shared copy (8-byte aligned both sides); valid = false fills the 8 bytes with
// zeros (nothing is read).
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
    const uint32_t n = valid ? 8u : 0u;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n) : "memory");
}

// Closes the thread's group of cp.async copies issued since the last commit (an empty group when
// none was).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A warp's mma.sync accumulators (4 x 4 tiles of m16n8), all 0.
__device__ __forceinline__ void zero_acc(float (&acc)[4][4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
}

// Bytes of dynamic shared memory this launch gave the block: the kernels that carve their
// buffers from it trap when the host gave less than they need, rather than overrun it.
__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
    uint32_t n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(n));
    return n;
}

// Eight bf16 (16 bytes, 16-byte aligned) through the read-only path.
__device__ __forceinline__ uint4 ldg16(const __nv_bfloat16* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// acc[e] += the e-th of the eight bf16 packed in v.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const uint4& v) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc[2 * i] += __uint_as_float(w[i] << 16);
        acc[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// The token-row table of the warp-specialised forwards, bf16 [N, D] in weight_hwc past the weight
// (params.h).
__device__ __forceinline__ __nv_bfloat16* token_rows_of(const MapetPatchEmbedFwd& p) {
    return static_cast<__nv_bfloat16*>(p.weight_hwc) + static_cast<int64_t>(p.dim) * 3 * p.patch * p.patch;
}

// Two channels of a token row that is a learned vector plus its position embedding (the CLS row,
// the mask-token rows): vec + pos in f32, rounded to bf16 once. The one rule for those rows, for
// mapet_patch_embed_fwd_rows and the hwc-ws forward that writes them itself.
__device__ __forceinline__ uint32_t token_pair(float2 vec, float2 pos) {
    return pack_bf16(vec.x + pos.x, vec.y + pos.y);
}

// ------------------------------------------------------------------ geometry and pixel reads

struct Geometry {
    int S, p, G, np, n_tokens, n_context, n_pred, rows, K, D, M;
};

__device__ __forceinline__ Geometry geometry(int batch, int image, int patch, int dim, int n_context) {
    Geometry g;
    g.S = image;
    g.p = patch;
    g.G = image / patch;
    g.np = g.G * g.G;
    g.n_tokens = g.np + 1;
    g.n_context = n_context;
    g.n_pred = g.n_tokens - n_context;
    g.rows = g.n_tokens + 2 * g.n_pred;
    g.K = 3 * patch * patch;
    g.D = dim;
    g.M = batch * g.np;
    return g;
}

// Scale and shift of the three channels of an HWC byte group, in the order its bytes cycle
// through them: a = the channel of byte 0 (bytes 0, 3, 6), b = the next (1, 4, 7), c = the one after
// (2, 5).
struct Norm3 {
    float sa, sb, sc, ha, hb, hc;
};

// Reads pixels of one image type; U8 = HWC uint8 normalised here, else CHW f32.
template <bool U8>
struct Pixels {
    const void* data;
    float s0, s1, s2, h0, h1, h2;  // scale and shift per channel (uint8 only)
    int S, p, pp, K;
    bool fast;  // p % 8 == 0: eight consecutive k are eight neighbouring pixels of one channel

    __device__ __forceinline__ float normalise(uint32_t u, int c) const {
        const float s = c == 0 ? s0 : (c == 1 ? s1 : s2);
        const float h = c == 0 ? h0 : (c == 1 ? h1 : h2);
        // u < 2^8: the float with bits 0x4B000000 | u is 2^23 + u exactly; one FADD, no I2F.
        return fmaf(__uint_as_float(0x4B000000u | u) - 8388608.f, s, h);
    }

    // Offset of the top-left pixel (channel 0) of patch row m (0 <= m < B*(N-1)).
    __device__ __forceinline__ int patch_base(int m, int G, int np) const {
        const int b = m / np;
        const int i = m - b * np;
        const int py = i / G;
        const int px = i - py * G;
        if (U8) return ((b * S + py * p) * S + px * p) * 3;
        return (b * 3 * S + py * p) * S + px * p;
    }

    // Offset of element k of a patch row relative to its patch base, and its channel.
    __device__ __forceinline__ int k_offset(int k, int& c) const {
        c = k / pp;
        const int rem = k - c * pp;
        const int ky = rem / p;
        const int kx = rem - ky * p;
        if (U8) return (ky * S + kx) * 3 + c;
        return (c * S + ky) * S + kx;
    }

    // Starts loading elements k0..k0+7 of the patch row at `base` (-1: a row past the end; zeros).
    // Fast path: raw loads into w (f32 bits, or 24 bytes of 8 HWC pixels), tag = channel. Other
    // cases: w[0..3] = the 8 values already normalised and packed as bf16 pairs, tag = -1.
    __device__ __forceinline__ void load(int base, int k0, uint32_t (&w)[8], int& tag) const {
        if (fast) {
            if (base >= 0 && k0 < K) {
                int c;
                const int off = base + k_offset(k0, c);
                if (U8) {
                    // 8 pixels x 3 channels = 24 bytes, 8-byte aligned: off - c is a multiple of 24.
                    const uint2* src = reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(data) + (off - c));
#pragma unroll
                    for (int j = 0; j < 3; ++j) {
                        const uint2 v = __ldg(src + j);
                        w[2 * j] = v.x;
                        w[2 * j + 1] = v.y;
                    }
                } else {
                    const float4* src = reinterpret_cast<const float4*>(static_cast<const float*>(data) + off);
                    const float4 a = __ldg(src);
                    const float4 b = __ldg(src + 1);
                    w[0] = __float_as_uint(a.x);
                    w[1] = __float_as_uint(a.y);
                    w[2] = __float_as_uint(a.z);
                    w[3] = __float_as_uint(a.w);
                    w[4] = __float_as_uint(b.x);
                    w[5] = __float_as_uint(b.y);
                    w[6] = __float_as_uint(b.z);
                    w[7] = __float_as_uint(b.w);
                }
                tag = c;
                return;
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) w[j] = 0u;
            tag = -1;
            return;
        }
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            v[j] = 0.f;
            const int k = k0 + j;
            if (base >= 0 && k < K) {
                int c;
                const int off = base + k_offset(k, c);
                if (U8) {
                    v[j] = normalise(__ldg(static_cast<const uint8_t*>(data) + off), c);
                } else {
                    v[j] = __ldg(static_cast<const float*>(data) + off);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = pack_bf16(v[2 * j], v[2 * j + 1]);
        tag = -1;
    }

    template <int C>
    __device__ __forceinline__ uint4 unpack_u8(const uint32_t (&w)[8]) const {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int q = 3 * j + C;  // byte of pixel j, channel C
            v[j] = normalise((w[q >> 2] >> ((q & 3) * 8)) & 0xffu, C);
        }
        return make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
    }

    // ---- HWC contraction order (uint8 HWC pixels, p % 8 == 0; see "Contraction order" above).
    // k' = (ky*p + kx)*3 + c, so the 8 values k'..k'+7 (k' % 8 == 0) are 8 consecutive bytes of
    // one pixel row of the patch: one aligned 8-byte load, whose byte j has channel (k' + j) % 3.

    // Starts loading the group at byte offset `off` from the patch base `base` (-1: a row past the
    // end); `valid` false (a row past the end, or k' >= K) gives zeros in finish_hwc.
    __device__ __forceinline__ uint2 load_hwc(int base, int off, bool valid) const {
        if (!valid || base < 0) return make_uint2(0u, 0u);
        return __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(data) + base + off));
    }

    // Byte j of w, normalised with (s, h): 0x4B0000uu is the float 2^23 + u (one PRMT, one FADD).
    __device__ __forceinline__ static float byte_norm(uint32_t w, int j, float s, float h) {
        return fmaf(__uint_as_float(__byte_perm(w, 0x4B00u, 0x5440u + j)) - 8388608.f, s, h);
    }

    // The 8 bf16 values of a group from load_hwc, normalised with n (set for the channel of the
    // group's first byte). No branch: the lanes of a warp hold groups of different first
    // channels, and a branch on the channel made each warp run all three variants.
    __device__ __forceinline__ static uint4 finish_hwc(uint2 w, const Norm3& n, bool valid) {
        // Bytes 0, 3, 6 have channel c; bytes 1, 4, 7 channel c + 1; bytes 2, 5 channel c + 2 (mod 3).
        const uint4 v = make_uint4(pack_bf16(byte_norm(w.x, 0, n.sa, n.ha), byte_norm(w.x, 1, n.sb, n.hb)),
                                   pack_bf16(byte_norm(w.x, 2, n.sc, n.hc), byte_norm(w.x, 3, n.sa, n.ha)),
                                   pack_bf16(byte_norm(w.y, 0, n.sb, n.hb), byte_norm(w.y, 1, n.sc, n.hc)),
                                   pack_bf16(byte_norm(w.y, 2, n.sa, n.ha), byte_norm(w.y, 3, n.sb, n.hb)));
        return valid ? v : make_uint4(0u, 0u, 0u, 0u);
    }

    // Scale and shift for a group whose first byte has channel c (once per thread; selects).
    __device__ __forceinline__ Norm3 norm3(int c) const {
        Norm3 n;
        n.sa = c == 0 ? s0 : (c == 1 ? s1 : s2);
        n.sb = c == 0 ? s1 : (c == 1 ? s2 : s0);
        n.sc = c == 0 ? s2 : (c == 1 ? s0 : s1);
        n.ha = c == 0 ? h0 : (c == 1 ? h1 : h2);
        n.hb = c == 0 ? h1 : (c == 1 ? h2 : h0);
        n.hc = c == 0 ? h2 : (c == 1 ? h0 : h1);
        return n;
    }

    // The 8 bf16 values of a group started by load().
    __device__ __forceinline__ uint4 finish(const uint32_t (&w)[8], int tag) const {
        if (tag < 0) return make_uint4(w[0], w[1], w[2], w[3]);
        if (U8) {
            if (tag == 0) return unpack_u8<0>(w);
            if (tag == 1) return unpack_u8<1>(w);
            return unpack_u8<2>(w);
        }
        return make_uint4(pack_bf16(__uint_as_float(w[0]), __uint_as_float(w[1])),
                          pack_bf16(__uint_as_float(w[2]), __uint_as_float(w[3])),
                          pack_bf16(__uint_as_float(w[4]), __uint_as_float(w[5])),
                          pack_bf16(__uint_as_float(w[6]), __uint_as_float(w[7])));
    }
};

template <bool U8, typename Params>
__device__ __forceinline__ Pixels<U8> make_pixels(const Params& P) {
    Pixels<U8> px;
    px.data = P.pixels;
    px.s0 = P.scale[0];
    px.s1 = P.scale[1];
    px.s2 = P.scale[2];
    px.h0 = P.shift[0];
    px.h1 = P.shift[1];
    px.h2 = P.shift[2];
    px.S = P.image;
    px.p = P.patch;
    px.pp = P.patch * P.patch;
    px.K = 3 * px.pp;
    px.fast = (P.patch % 8) == 0;
    return px;
}

// ------------------------------------------------------------------ forward: patch rows

// Weight tile rows n0..n0+127, k0..k0+31 into shared memory. K % 8 == 0: cp.async with zero fill;
// otherwise a synchronous scalar copy with zero-filled tails.
// KAligned: the caller knows K % 8 == 0 (the HWC kernels), so only the cp.async path is compiled.
template <bool KAligned = false>
__device__ __forceinline__ void load_weight_tile(__nv_bfloat16 (*dst)[kFwdLd], const __nv_bfloat16* weight, int n0,
                                                 int k0, int D, int K) {
    const int tid = threadIdx.x;
    if (KAligned || (K & 7) == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = (tid >> 2) + 64 * i;
            const int kc = (tid & 3) * 8;
            const int n = n0 + r;
            const int k = k0 + kc;
            const bool ok = n < D && k < K;
            cp_async16(&dst[r][kc], ok ? weight + static_cast<int64_t>(n) * K + k : weight, ok);
        }
    } else {
        const unsigned short* w = reinterpret_cast<const unsigned short*>(weight);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = (tid >> 2) + 64 * i;
            const int kc = (tid & 3) * 8;
            const int n = n0 + r;
            uint32_t v[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int k = k0 + kc + 2 * j;
                const uint32_t lo = (n < D && k < K) ? w[static_cast<int64_t>(n) * K + k] : 0u;
                const uint32_t hi = (n < D && k + 1 < K) ? w[static_cast<int64_t>(n) * K + k + 1] : 0u;
                v[j] = lo | (hi << 16);
            }
            *reinterpret_cast<uint4*>(&dst[r][kc]) = make_uint4(v[0], v[1], v[2], v[3]);
        }
    }
}

// Where the group of 8 contraction indices starting at k' sits in a patch, in HWC order, as k'
// advances by whole steps: its byte offset from the patch's top-left pixel and its channel.
struct HwcCursor {
    int k;    // k'
    int off;  // byte offset: (k' / 3p) image rows of 3S bytes, plus k' % 3p
    int rem;  // k' % 3p, the offset within the pixel row
    int c;    // k' % 3, the channel of its first byte
    int row_len, row_stride;  // 3p and 3S

    __device__ __forceinline__ HwcCursor(int k0, int patch, int image) {
        row_len = 3 * patch;
        row_stride = 3 * image;
        k = k0;
        rem = k0 % row_len;
        off = (k0 / row_len) * row_stride + rem;
        c = k0 % 3;
    }

    __device__ __forceinline__ void advance(int dk) {
        k += dk;
        rem += dk;
        off += dk;
        while (rem >= row_len) {  // at most twice for dk <= 32 (3p >= 24), three times for dk = 64
            rem -= row_len;
            off += row_stride - row_len;
        }
        c = rem % 3;  // 3p is a multiple of 3
    }
};

// Where patch row m goes: b*R + rank of its token, or -1 when none (m past the end, or a rank
// outside [1, N)); `tok` gets its token (0 past the end).
__device__ __forceinline__ int patch_row_dest(const MapetPatchEmbedFwd& P, const Geometry& g, int m, int& tok) {
    int dst = -1;
    tok = 0;
    if (m < g.M) {
        const int b = m / g.np;
        tok = m - b * g.np + 1;
        const int r = __ldg(P.ranks + static_cast<int64_t>(b) * g.n_tokens + tok);
        if (r >= 1 && r < g.n_tokens) dst = b * g.rows + r;
    }
    return dst;
}

// Where each of a forward tile's 128 patch rows m0.. goes: row_dst = b*R + rank of its token (-1
// when none: a row past the end, or a rank outside [1, N)), row_tok = its token. Threads 0..127.
__device__ __forceinline__ void find_rows(const MapetPatchEmbedFwd& P, const Geometry& g, int m0, int* row_dst,
                                          int* row_tok) {
    const int tid = threadIdx.x;
    if (tid < kFwdM) {
        int tok;
        row_dst[tid] = patch_row_dest(P, g, m0 + tid, tok);
        row_tok[tid] = tok;
    }
}

// The pixel bases of patch rows m and m + 64 (-1 past the end): the two rows a thread builds.
template <bool U8>
__device__ __forceinline__ void patch_bases(const Pixels<U8>& px, const Geometry& g, int m, int (&base)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) base[i] = m + 64 * i < g.M ? px.patch_base(m + 64 * i, g.G, g.np) : -1;
}

template <bool U8, bool HWC>
__device__ __forceinline__ void forward_patches(const MapetPatchEmbedFwd& P) {
    static_assert(U8 || !HWC, "the HWC contraction order is for uint8 HWC pixels");
    __shared__ __align__(16) __nv_bfloat16 a_tile[2][kFwdM][kFwdLd];
    __shared__ __align__(16) __nv_bfloat16 w_tile[2][kFwdN][kFwdLd];
    __shared__ int row_dst[kFwdM];  // b*R + rank of each patch row, -1 when none
    __shared__ int row_tok[kFwdM];

    const Geometry g = geometry(P.batch, P.image, P.patch, P.dim, P.n_context);
    const Pixels<U8> px = make_pixels<U8>(P);
    // The HWC order multiplies by the weight permuted the same way (mapet_patch_embed_weight_hwc).
    const __nv_bfloat16* weight = static_cast<const __nv_bfloat16*>(HWC ? P.weight_hwc : P.weight);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp >> 2;  // 64 rows each
    const int wn = warp & 3;   // 32 channels each
    const int n0 = blockIdx.x * kFwdN;
    const int m0 = blockIdx.y * kFwdM;

    find_rows(P, g, m0, row_dst, row_tok);

    // This thread builds 8 consecutive k of rows (tid/4) and (tid/4 + 64) of every A tile.
    int base[2];
    patch_bases(px, g, m0 + (tid >> 2), base);
    const int kgrp = (tid & 3) * 8;

    float acc[4][4][4];
    zero_acc(acc);

    const int steps = (g.K + kFwdK - 1) / kFwdK;

    // One step of MMAs: this warp's 64 x 32 block of the tile += A tile x W tile (32 of K).
    auto mma_step = [&](int buf) {
#pragma unroll
        for (int kk = 0; kk < kFwdK; kk += 16) {
            uint32_t bfrag[2][4];
#pragma unroll
            for (int nj = 0; nj < 2; ++nj)
                ldmatrix_x4(bfrag[nj], &w_tile[buf][wn * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8]
                                              [kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                uint32_t afrag[4];
                ldmatrix_x4(afrag, &a_tile[buf][wm * 64 + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
                    mma_bf16(acc[mi][ni], afrag, bfrag[ni >> 1][(ni & 1) * 2], bfrag[ni >> 1][(ni & 1) * 2 + 1]);
            }
        }
    };

    if constexpr (HWC) {
        // Pixel loads run two steps ahead (one 8-byte load per row a step, so two steps of raw
        // bytes cost 4 registers); the weight tile, an L2 hit, one step ahead by cp.async.
        struct Slot {
            uint2 w[2];  // raw bytes of this thread's two rows
            bool ok;     // k' < K
        };
        HwcCursor cur(kgrp, g.p, g.S);
        auto fetch = [&](Slot& slot) {
            slot.ok = cur.k < g.K;
#pragma unroll
            for (int i = 0; i < 2; ++i) slot.w[i] = px.load_hwc(base[i], cur.off, slot.ok);
            cur.advance(kFwdK);
        };
        // The group of step s starts at k' = kgrp + s * kFwdK, so its first channel is
        // (kgrp + s * kFwdK) % 3: set for step 0 here, moved on by kFwdK % 3 after each store
        // (the stores run in step order). The lanes of a warp differ in it, so the scales are
        // picked by selects, not branches.
        int c_store = kgrp % 3;
        auto store = [&](const Slot& slot, int buf) {
            const Norm3 nrm = px.norm3(c_store);
#pragma unroll
            for (int i = 0; i < 2; ++i)
                *reinterpret_cast<uint4*>(&a_tile[buf][(tid >> 2) + 64 * i][kgrp]) =
                    px.finish_hwc(slot.w[i], nrm, slot.ok && base[i] >= 0);
            c_store += kFwdK % 3;
            if (c_store >= 3) c_store -= 3;
        };
        Slot even, odd;  // steps 0, 2, 4, ... and 1, 3, 5, ...
        fetch(even);
        load_weight_tile<true>(w_tile[0], weight, n0, 0, g.D, g.K);
        fetch(odd);
        store(even, 0);
        cp_async_wait_all();
        __syncthreads();
        // Step s: fetch step s + 2 into the slot step s came from, multiply tile s, then store
        // step s + 1 (fetched a step earlier) into the other buffer.
        auto step = [&](int s, Slot& refill, const Slot& next) {
            const int buf = s & 1;
            const bool more = s + 1 < steps;
            if (more) load_weight_tile<true>(w_tile[buf ^ 1], weight, n0, (s + 1) * kFwdK, g.D, g.K);
            fetch(refill);
            mma_step(buf);
            if (more) {
                store(next, buf ^ 1);
                cp_async_wait_all();
            }
            __syncthreads();
        };
        for (int s = 0; s < steps; s += 2) {
            step(s, even, odd);
            if (s + 1 < steps) step(s + 1, odd, even);
        }
    } else {
        uint32_t raw[2][8];
        int tag[2];

        // Prologue: tile 0.
#pragma unroll
        for (int i = 0; i < 2; ++i) px.load(base[i], kgrp, raw[i], tag[i]);
        load_weight_tile(w_tile[0], weight, n0, 0, g.D, g.K);
#pragma unroll
        for (int i = 0; i < 2; ++i)
            *reinterpret_cast<uint4*>(&a_tile[0][(tid >> 2) + 64 * i][kgrp]) = px.finish(raw[i], tag[i]);
        cp_async_wait_all();
        __syncthreads();

        for (int s = 0; s < steps; ++s) {
            const int buf = s & 1;
            const bool more = s + 1 < steps;
            if (more) {
                const int k0 = (s + 1) * kFwdK;
#pragma unroll
                for (int i = 0; i < 2; ++i) px.load(base[i], k0 + kgrp, raw[i], tag[i]);
                if ((g.K & 7) == 0) load_weight_tile(w_tile[buf ^ 1], weight, n0, k0, g.D, g.K);
            }
            mma_step(buf);
            if (more) {
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    *reinterpret_cast<uint4*>(&a_tile[buf ^ 1][(tid >> 2) + 64 * i][kgrp]) =
                        px.finish(raw[i], tag[i]);
                if ((g.K & 7) != 0) load_weight_tile(w_tile[buf ^ 1], weight, n0, (s + 1) * kFwdK, g.D, g.K);
                cp_async_wait_all();
            }
            __syncthreads();
        }
    }

    // Epilogue: + bias + pos_embed[token], rounded to bf16, written to the token's rank row.
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(P.out);
    const int gq = lane >> 2;
    const int q = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = wm * 64 + mi * 16 + gq + 8 * h;
            const int dst = row_dst[row];
            if (dst < 0) continue;
            const float* pos = P.pos_embed + static_cast<int64_t>(row_tok[row]) * g.D;
            __nv_bfloat16* o = out + static_cast<int64_t>(dst) * g.D;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = n0 + wn * 32 + ni * 8 + 2 * q;
                if (col < g.D) {
                    const float2 bb = __ldg(reinterpret_cast<const float2*>(P.bias + col));
                    const float2 pe = __ldg(reinterpret_cast<const float2*>(pos + col));
                    const float v0 = acc[mi][ni][2 * h] + bb.x + pe.x;
                    const float v1 = acc[mi][ni][2 * h + 1] + bb.y + pe.y;
                    *reinterpret_cast<__nv_bfloat162*>(o + col) = __floats2bfloat162_rn(v0, v1);
                }
            }
        }
    }
}

// ------------------------------------------------------------------ shared-memory stores, raw pixels (sm_90a)
// The raw-pixel forward multiplies (u - kRawCenter) / kRawScale, exact in f16 (8 significant bits,
// magnitude at least 2^-8), by its f16 weight scaled by kRawScale, so that weights down to about
// 1e-5 stay normal in f16 (mapet_patch_embed_weight_hwc_raw).
constexpr int kRawCenter = 127;
constexpr float kRawScale = 256.f;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Bytes j and j + 1 of x as the f16 pair 1024 + u (byte j in the low half), exactly: one PRMT
// puts each byte under the exponent byte 0x64 (f16 holds 11 significant bits).
__device__ __forceinline__ uint32_t pixel_pair_f16_1024(uint32_t x, int j) {
    return __byte_perm(x, 0x64u, static_cast<uint32_t>(j | 0x40 | ((j + 1) << 8) | 0x4000));
}

// Bytes j and j + 1 of x, each plus one, as a bf16 pair (byte j in the low half), exactly:
// - one PRMT makes the f16 pair 0x64uu = 1024 + u (pixel_pair_f16_1024);
// - one f16x2 subtraction of 1023 leaves u + 1 in [1, 256], a normal f16 whose 10-bit mantissa
//   has its low 3 bits clear (u + 1 needs 8 significant bits);
// - so the bf16 bits are the f16 bits shifted right by 3 (the high half's clear low bits shift
//   into the low half's top as zeros) with the exponent rebased by 127 - 15 = 112 (0x3800 a half):
//   one shift-and-add. Three instructions a pair, where the f32 route (a PRMT and an FADD a value,
//   then F2FP) takes five. The +1 keeps 0 away from f16's subnormal, zero exponent (which the
//   rebase would turn into 2^-15); the reduction takes it back out with the column sum.
__device__ __forceinline__ uint32_t pixel_pair_plus1(uint32_t x, int j) {
    const uint32_t h = pixel_pair_f16_1024(x, j);
    uint32_t u;
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(u) : "r"(h), "r"(0x63FE63FEu));  // f16 1023 = 0x63FE
    return (u >> 3) + 0x38003800u;
}

// 8 pixel bytes, each plus one, as 8 bf16 values (pixel_pair_plus1).
__device__ __forceinline__ uint4 pixels_plus1_bf16x8(uint2 w) {
    return make_uint4(pixel_pair_plus1(w.x, 0), pixel_pair_plus1(w.x, 2), pixel_pair_plus1(w.y, 0),
                      pixel_pair_plus1(w.y, 2));
}

// Bytes j and j + 1 of x as (u - 127) / 256, an f16 pair (byte j in the low half), exactly: one
// PRMT makes the f16 pair 0x64uu = 1024 + u, one f16x2 FMA takes (1024 + u) 2^-8 - 1151 / 256
// (2^-8 is 0x1C00 and -1151 / 256 = -4.49609375 is 0xC47F, both exact in f16; so is the result,
// which the FMA rounds once). Two instructions a pair.
__device__ __forceinline__ uint32_t pixel_pair_centered_f16(uint32_t x, int j) {
    const uint32_t h = pixel_pair_f16_1024(x, j);
    uint32_t u;
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(u) : "r"(h), "r"(0x1C001C00u), "r"(0xC47FC47Fu));
    return u;
}

// 8 pixel bytes as (u - kRawCenter) / kRawScale, 8 f16 values (pixel_pair_centered_f16).
__device__ __forceinline__ uint4 pixels_centered_f16x8(uint2 w) {
    return make_uint4(pixel_pair_centered_f16(w.x, 0), pixel_pair_centered_f16(w.x, 2),
                      pixel_pair_centered_f16(w.y, 0), pixel_pair_centered_f16(w.y, 2));
}

// 16 bytes to the shared-space address dst.
__device__ __forceinline__ void st_shared16(uint32_t dst, const uint4& v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// 4 bytes to the shared-space address dst.
__device__ __forceinline__ void st_shared_b32(uint32_t dst, uint32_t v) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(v) : "memory");
}

// ------------------------------------------------------------------ forward, warp-specialised on TMA (sm_90a)
//
// The HWC forward built the way the fast Hopper GEMMs are (hopper.cu, mapet_hopper_gemm_tn), with
// the pixel path as the producer of A. Why: the mma.sync HWC kernel, and a wgmma form of it with
// the loads and the MMAs in the same warps (removed after the seventh run, slower: 0.191 ms
// against 0.176 at ViT-B in the sixth), kept the tensor cores waiting on loads (BENCHMARKS.md,
// fifth and sixth runs: 42% of the warps' time stalled on global loads; the weight re-read from L2
// for every 128-row tile with two tiles in flight). Here the loads run in warps of their own,
// several slices ahead:
// - a block computes tiles of 128 patch rows x 192 channels, persistent: tile i of the grid-stride
//   walk is channel tile i % nt and row tile i / nt (nt = ceil(D / 192)), so the nt blocks that
//   read one row tile's pixels run side by side and share them in L2. At ViT-B, 4 x 196 = 784
//   tiles over 132 blocks, one an SM: 5.9 tiles a block. K' is contracted in slices of 64 through
//   a ring of kWsStages stages (A: 128 rows x 64 k', 16 KB; weight: 192 channels x 64 k', 24 KB),
//   both K-major in the 128-byte swizzle (hopper.cuh), so the descriptors are gemm_tn's;
// - warpgroup 0 produces. One thread loads each slice's weight box by TMA (from weight_hwc) and
//   announces its bytes on the stage's `full` barrier. All 128 threads build the slice's A from
//   the pixels: thread i the 8-group i % 8 of k' of rows i / 8 + 16 r (r < 8), one 8-byte load
//   a group, kWsAhead slices of loads in flight ahead of the slice it normalises and stores. Each
//   fences its stores for the tensor cores (the async proxy) and arrives on `full`, whose count
//   is 129: the TMA thread's byte-announcing arrival and the 128 stores;
// - warpgroups 1 and 2 consume rows 0-63 and 64-127 of the tile, all 192 channels (m64n192k16,
//   96 f32 accumulators a thread). They start each tile's accumulators at bias + pos_embed, so
//   that the epilogue only rounds and scatters each row to its rank's row (no loads behind the
//   last MMA), and release a stage on `empty` (one arrival a warpgroup) once the wgmma that read
//   it are done. A warpgroup's epilogue writes its 64 rows into a staging tile of its own and
//   hands them to the copy engine, a bulk copy a row to its rank's row, then starts its next tile
//   while they drain;
// - the consumers also write the output's other rows, mapet_patch_embed_fwd_rows' work, which the
//   launcher then skips: for each of their rows, its token's two mask-token rows (when its rank is
//   C or more) and, for an image's first patch, the CLS row, in the tile's channels: a share each
//   slice, after the slice's wgmma are issued and the previous slice's stage is handed back
//   (write_other_rows; the CLS rows at a tile's first slice, write_cls_rows). They are 58 MB of the 96 MB
//   output at ViT-B, batch 128: as a kernel of their own, they ran with the tensor cores idle.
//   Their values come from the token-row table (params.h: N rows of bf16, 302 KB at ViT-B, made
//   by the weight kernel launched before this one), each slice's first ones loaded a slice ahead.
// A producer thread's proxy fence compiles to MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S with its later
// slices' pixel loads in flight; the removed wgmma form fenced the same way with register-staged
// loads in flight, and ncu counted no membar stalls there (fifth run), so the fence does not wait
// for them.
// The sums start from bias + pos_embed rather than ending with them, so they differ from the
// other HWC kernels' in the last bits (the same function, another f32 order). The default forward
// on compute capability 9.0 until the eighth run. In the seventh run its tests passed on an H200, and it took
// 0.150 ms at ViT-B against the mma.sync HWC kernel's 0.175 (BENCHMARKS.md). An L1 prefetch of
// the mask-token rows' values a slice ahead (prefetch.global.L1), added after that run, made it
// slower (0.1508 -> 0.1558 ms in the eighth run's A/B) and is gone; each slice loads the first of
// those values before its wait for the previous slice's wgmma instead (OtherStep; with the
// prefetch gone, 0.974 of the raw forward + backward's time in the ninth run's A/B). After that
// run they come from the bf16 token-row table, a slice ahead (compiles, unverified on GPU).
//
// kRaw (mapet_patch_embed_fwd_u8_hwc_ws_raw, MAPET_PATCH_EMBED_ORDER=hwc-ws-raw; the default
// forward on compute capability 9.0 since the eighth run, where it took 0.153 ms at ViT-B
// against this kernel's 0.157 on an H200): the producer stores the raw pixels as
// (u - 127) / 256, exact in f16 (pixels_centered_f16x8: a PRMT and an HFMA2 a pair of pixels,
// where normalising takes two PRMT, two FADD, two FFMA and an F2FP a pair, and selects), against
// the f16 weight box and bias_raw of mapet_patch_embed_weight_hwc_raw; the MMAs are f16. Its
// SASS: 96 HFMA2 and 99 PRMT where the normalising form has 192 FFMA, 300 FADD, 150 F2FP, 194
// PRMT and 104 SEL (both warpgroups' code; the producer's loop loses about 190 instructions a
// slice). Why: the profile of the seventh run had the consumers waiting on `full` (the
// producer's pace) for 13% of their samples.
//
// Tried and removed after that run: clusters of two and four blocks taking the same channel tile
// of adjacent row tiles, each loading its share of every weight box by TMA multicast into all of
// them. They cut the weight's L2 traffic to a half and a quarter, and took 0.163 and 0.181 ms:
// L2 is not what limits this kernel. Its warps wait on the ring's barriers instead.
constexpr int kWsN = 192;
constexpr int kWsK = 64;
constexpr int kWsStages = 4;
constexpr int kWsAhead = 3;                     // slices of pixel loads a producer thread holds
constexpr int kWsABytes = kFwdM * kWsK * 2;     // 16 KB
constexpr int kWsBBytes = kWsN * kWsK * 2;      // 24 KB
constexpr int kWsStageBytes = kWsABytes + kWsBBytes;
constexpr int kWsGroups = kFwdM * kWsK / 8 / 128;  // 8-groups a producer thread builds a slice
// Registers (setmaxnreg) of the producer and of each consumer thread, from the 168 a thread of
// the 384 gets at launch: 128 x 128 + 256 x 176 <= 384 x 168.
constexpr int kWsProducerRegs = 128;
constexpr int kWsConsumerRegs = 176;
static_assert(128 * kWsProducerRegs + 256 * kWsConsumerRegs <= 384 * 168, "setmaxnreg pool");
// A consumer warpgroup's staging tile for its 64 output rows (bf16): rows of 400 bytes, the 384 of
// a 192-channel row padded so that the accumulator writes (lane (g, q): row g, word 4j + q) fall
// in 32 distinct banks (row g starts at bank 4g), and every row starts 16-byte aligned for its
// bulk copy. After the ring, 1024-aligned.
constexpr int kWsOutLd = kWsN * 2 + 16;
constexpr int kWsOutBytes = 64 * kWsOutLd;  // 25,600 B
constexpr int kWsSmemBytes = kWsStages * kWsStageBytes + 2 * kWsOutBytes + 1023;

// One slice's raw pixels in a producer thread, and what storing them needs to know.
struct WsSlice {
    uint2 w[kWsGroups];
    bool ok;           // the slice is inside K'
    int c;             // the channel of each group's first byte
    uint32_t rows_ok;  // bit r: row r0 + 16r of the tile is a patch row
};

template <bool kRaw>
__device__ __forceinline__ void forward_hwc_ws(const MapetPatchEmbedFwdWs& T) {
    const MapetPatchEmbedFwd& P = T.p;
    extern __shared__ unsigned char ws_smem_raw[];
    __shared__ __align__(8) uint64_t full[kWsStages];
    __shared__ __align__(8) uint64_t empty[kWsStages];
    // The ring, 1024-byte aligned (the swizzle's atoms): stage s holds A, then the weight box.
    unsigned char* ring = sw128_align(ws_smem_raw);
    const Geometry g = geometry(P.batch, P.image, P.patch, P.dim, P.n_context);
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int n_tiles = (g.D + kWsN - 1) / kWsN;
    const int tiles = n_tiles * ((g.M + kFwdM - 1) / kFwdM);
    const int slices = (g.K + kWsK - 1) / kWsK;

    // The producer's rotation needs a multiple of 3 slices (K' = 3p^2, p % 8 == 0: see below).
    if (slices % 3 != 0 || dynamic_smem_bytes() < kWsSmemBytes) __trap();
    mbar_init_ring(full, empty, 129, 2);
    __syncthreads();

    if (wg == 0) {
        // ---- producer. It walks this block's (tile, slice) items in order, `it` counting them:
        // item it goes to stage it % kWsStages, its (it / kWsStages)-th use. Its pixel loads run
        // kWsAhead items ahead, across tile boundaries, so a new tile's first slices are in
        // flight while the last ones of the previous tile are stored.
        regs_release<kWsProducerRegs>();
        const Pixels<true> px = make_pixels<true>(P);
        const int kg = tid & 7;
        const int r0 = tid >> 3;
        // The fetch cursor: the tile and slice of the next item to load, its rows' pixel bases.
        int f_tile = blockIdx.x, f_t = 0;
        int base[kWsGroups];
        HwcCursor cur(kg * 8, g.p, g.S);
        auto start_tile = [&] {
            const int m0 = (f_tile / n_tiles) * kFwdM;
#pragma unroll
            for (int r = 0; r < kWsGroups; ++r) {
                const int m = m0 + r0 + 16 * r;
                base[r] = f_tile < tiles && m < g.M ? px.patch_base(m, g.G, g.np) : -1;
            }
            cur = HwcCursor(kg * 8, g.p, g.S);
        };
        auto fetch = [&](WsSlice& sl) {
            sl.ok = cur.k < g.K;
            sl.c = cur.c;
            sl.rows_ok = 0;
#pragma unroll
            for (int r = 0; r < kWsGroups; ++r) {
                sl.w[r] = px.load_hwc(base[r], cur.off, sl.ok);
                sl.rows_ok |= (base[r] >= 0 ? 1u : 0u) << r;
            }
            cur.advance(kWsK);
            if (++f_t == slices) {
                f_t = 0;
                f_tile += gridDim.x;
                start_tile();
            }
        };
        // Item it (slice t of a tile whose channels start at n0): the weight box, then A from
        // sl, whose loads were issued kWsAhead items ago; then the loads of item it + kWsAhead.
        int it = 0, p_tile = blockIdx.x, p_t = 0;
        auto produce = [&](WsSlice& sl) {
            const int s = it % kWsStages;
            if (it >= kWsStages) mbar_wait(&empty[s], (it / kWsStages - 1) & 1);
            unsigned char* stage = ring + s * kWsStageBytes;
            if (tid == 0) {
                mbar_arrive_expect_tx(&full[s], kWsBBytes);
                tma_load_2d(stage + kWsABytes, &T.weight_hwc, p_t * kWsK, (p_tile % n_tiles) * kWsN, &full[s]);
            }
            // Rows r0 + 16 r share r0's place in the swizzle: 16 rows on is 2048 bytes on.
            const uint32_t a = hopper_smem_addr(stage) + sw128_offset(r0, kg);
            if constexpr (kRaw) {
                // (u - 127) / 256 in f16, whatever the row: a row past the end (zero bytes) is never
                // stored.
#pragma unroll
                for (int r = 0; r < kWsGroups; ++r) st_shared16(a + r * 16 * 128, pixels_centered_f16x8(sl.w[r]));
            } else {
                const Norm3 nrm = px.norm3(sl.c);
#pragma unroll
                for (int r = 0; r < kWsGroups; ++r) {
                    const uint4 v = px.finish_hwc(sl.w[r], nrm, sl.ok && ((sl.rows_ok >> r) & 1u));
                    st_shared16(a + r * 16 * 128, v);
                }
            }
            fence_proxy_async_smem();
            mbar_arrive(&full[s]);
            ++it;
            if (++p_t == slices) {
                p_t = 0;
                p_tile += gridDim.x;
            }
            fetch(sl);
        };
        // Three items in rotation. A tile's slice count is a multiple of 3 (K' = 3p^2 with
        // p % 8 == 0, so K' / 64 = 3 (p / 8)^2), hence so is the block's item count.
        static_assert(kWsAhead == 3, "the producer's rotation below holds three slices");
        start_tile();
        WsSlice x, y, z;
        fetch(x);
        fetch(y);
        fetch(z);
        const int items = ((tiles - blockIdx.x + gridDim.x - 1) / gridDim.x) * slices;
        for (int i = 0; i < items; i += 3) {
            produce(x);
            produce(y);
            produce(z);
        }
        return;
    }

    // ---- consumers: warpgroup 1 rows 0-63 of each tile, warpgroup 2 rows 64-127.
    regs_claim<kWsConsumerRegs>();
    const int lane = tid & 31;
    const int warp = (tid >> 5) & 3;
    const int gq = lane >> 2;
    const int q = lane & 3;
    const int half = wg - 1;
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(P.out);
    // The epilogue: a thread i < 64 of the warpgroup copies row i of its staging tile out.
    const int i = tid & 127;
    const uint32_t stage = hopper_smem_addr(ring) + static_cast<uint32_t>(kWsStages * kWsStageBytes + half * kWsOutBytes);
    // What a tile needs to know of this thread's two accumulator rows, and of the row it copies
    // out, found one tile ahead so that the rank loads land during the previous tile's MMAs:
    // - tok: their tokens (their pos_embed rows);
    // - first: b*R, the first output row of their image (-1 for a row past the end), and rank: the
    //   token's rank, kept raw so that nothing waits on its load before the next tile
    //   (other_rows_of reads them);
    // - bulk_dst: where the row it copies out goes (b*R + rank, -1 for none).
    struct RowsOf {
        int tok[2], first[2], rank[2], bulk_dst;
    };
    auto rows_of = [&](int tile, RowsOf& r) {
        const int m0 = (tile / n_tiles) * kFwdM;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = tile < tiles ? m0 + 64 * half + 16 * warp + gq + 8 * h : g.M;
            r.tok[h] = m < g.M ? m % g.np + 1 : 0;
            r.first[h] = -1;
            r.rank[h] = 0;
            if (m < g.M) {
                const int b = m / g.np;
                r.first[h] = b * g.rows;
                r.rank[h] = __ldg(P.ranks + static_cast<int64_t>(b) * g.n_tokens + r.tok[h]);
            }
        }
        int unused;
        r.bulk_dst = i < 64 && tile < tiles ? patch_row_dest(P, g, m0 + 64 * half + i, unused) : -1;
    };
    // This thread's share of slice t's part of a tile's other rows: the mask-token rows of its two
    // rows' tokens (mapet_patch_embed_fwd_rows' values) in its columns n0 + 8j + 2q for j = t,
    // t + slices, ... (every column of the tile over its slices), written with 4-byte stores
    // while the tensor cores run the slice. The values are bf16 pairs of the token-row table
    // (params.h; the weight kernel made it), one 4-byte load a column pair and row, and the first
    // column pairs of a slice are loaded a slice ahead (OtherStep). Row pointers (from the
    // thread's first column) are set once a tile.
    struct OtherRows {
        const __nv_bfloat16* tr[2];  // the token-row table's row of each row's token
        __nv_bfloat16* mask[2];      // its content-stream mask-token row; nullptr for none
        __nv_bfloat16* cls[2];       // the CLS row; nullptr for none
    };
    const __nv_bfloat16* token_rows = token_rows_of(P);
    // The mask-token row of the content stream goes to b*R + N + rank - C (the query stream's is
    // P rows on) when the token's rank is C or more; the CLS row is b*R, written by the row that
    // is its image's first patch.
    auto other_rows_of = [&](const RowsOf& r, int n0) {
        OtherRows o;
        const int c0 = n0 + 2 * q;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const bool masked = r.first[h] >= 0 && r.rank[h] >= g.n_context && r.rank[h] < g.n_tokens;
            const int64_t mask_row = static_cast<int64_t>(r.first[h]) + g.n_tokens + (r.rank[h] - g.n_context);
            o.tr[h] = token_rows + static_cast<int64_t>(r.tok[h]) * g.D + c0;
            o.mask[h] = masked ? out + mask_row * g.D + c0 : nullptr;
            o.cls[h] = r.first[h] >= 0 && r.tok[h] == 1 ? out + static_cast<int64_t>(r.first[h]) * g.D + c0 : nullptr;
        }
        return o;
    };
    const int64_t query_rows = static_cast<int64_t>(g.n_pred) * g.D;  // content -> query-stream mask row
    // One step of write_other_rows: the values of column pairs j0 and j0 + slices (loads), then
    // their rows (stores).
    struct OtherStep {
        int x[2];  // offset of the column pair from the thread's first column
        bool ok[2];
        uint32_t val[2][2];  // [column pair][row]: a bf16 pair of the table
    };
    auto load_other_step = [&](const OtherRows& o, int n0, int j0, OtherStep& v) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int j = j0 + u * slices;
            v.x[u] = 8 * j;
            v.ok[u] = j < kWsN / 8 && n0 + 2 * q + v.x[u] < g.D;
#pragma unroll
            for (int h = 0; h < 2; ++h)
                v.val[u][h] = v.ok[u] && o.mask[h] ? __ldg(reinterpret_cast<const unsigned int*>(o.tr[h] + v.x[u])) : 0u;
        }
    };
    auto store_other_step = [&](const OtherRows& o, const OtherStep& v) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (v.ok[u] && o.mask[h]) {
                    *reinterpret_cast<uint32_t*>(o.mask[h] + v.x[u]) = v.val[u][h];
                    *reinterpret_cast<uint32_t*>(o.mask[h] + query_rows + v.x[u]) = v.val[u][h];
                }
            }
        }
    };
    // Slice t's share: its first step's values are `first` (loaded a slice ahead), the others
    // are loaded here.
    auto write_other_rows = [&](const OtherRows& o, int n0, int t, const OtherStep& first) {
        store_other_step(o, first);
        for (int j0 = t + 2 * slices; j0 < kWsN / 8; j0 += 2 * slices) {
            OtherStep v;
            load_other_step(o, n0, j0, v);
            store_other_step(o, v);
        }
    };
    // The CLS rows, one row in np: all the tile's columns at once, on a branch few warps take.
    auto write_cls_rows = [&](const OtherRows& o, int n0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (!o.cls[h]) continue;
#pragma unroll 1
            for (int x = 0; x < kWsN && n0 + 2 * q + x < g.D; x += 8)
                *reinterpret_cast<uint32_t*>(o.cls[h] + x) =
                    __ldg(reinterpret_cast<const unsigned int*>(token_rows + n0 + 2 * q + x));
        }
    };
    RowsOf cur, next;
    rows_of(blockIdx.x, next);
    int it = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int n0 = (tile % n_tiles) * kWsN;
        cur = next;
        const int (&tok)[2] = cur.tok;
        const OtherRows other = other_rows_of(cur, n0);
        // Slice 0's first values of the other rows (the next slice's are loaded in the loop).
        OtherStep ahead;
        load_other_step(other, n0, 0, ahead);
        // Accumulators start at bias + pos_embed: d[4j + 2h + e] is row h, column n0 + 8j + 2q + e.
        float acc[96];
#pragma unroll
        for (int j = 0; j < 24; ++j) {
            const int col = n0 + 8 * j + 2 * q;
            float2 bb = make_float2(0.f, 0.f);
            if (col < g.D) bb = __ldg(reinterpret_cast<const float2*>(P.bias + col));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float2 pe = make_float2(0.f, 0.f);
                if (col < g.D) pe = __ldg(reinterpret_cast<const float2*>(P.pos_embed + static_cast<int64_t>(tok[h]) * g.D + col));
                acc[4 * j + 2 * h] = bb.x + pe.x;
                acc[4 * j + 2 * h + 1] = bb.y + pe.y;
            }
        }
        for (int t = 0; t < slices; ++t, ++it) {
            const int s = it % kWsStages;
            mbar_wait(&full[s], (it / kWsStages) & 1);
            const uint32_t a_s = hopper_smem_addr(ring + s * kWsStageBytes) + static_cast<uint32_t>(half * 64 * 128);
            const uint32_t b_s = hopper_smem_addr(ring + s * kWsStageBytes + kWsABytes);
            pin_regs(acc);
            wgmma_fence_acc();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n192k16<kRaw>(acc, sw128_desc(a_s + 32 * kk), sw128_desc(b_s + 32 * kk));
            wgmma_commit_groups();
            if (t == 0) {
                rows_of(tile + gridDim.x, next);
                if (other.cls[0] || other.cls[1]) write_cls_rows(other, n0);
            }
            // The first values of the next slice's share of the other rows, loaded a slice's MMAs
            // before their use. Loaded next to their use, their wait was the largest stall of the
            // hwc-ws-raw forward in the eighth run's profile (10% of its samples, on the FADD of
            // the f32 values' sum); loaded just before this slice's wait below, it still was in the
            // ninth run's (7.8%): that wait is often short, the previous slice's MMAs long done.
            // A slice ahead, the f32 values (twelve registers) did not fit; the table's bf16 pairs
            // take four. The basic block ends after the loads, or ptxas moves them down to their
            // use. (No load after the last slice: column pair kWsN / 8 is past the tile.)
            const OtherStep first = ahead;
            load_other_step(other, n0, t + 1 < slices ? t + 1 : kWsN / 8, ahead);
            end_basic_block();
            // The previous slice's wgmma are done with their stage: hand it back.
            wgmma_wait_groups<1>();
            if (t > 0 && (tid & 127) == 0) mbar_arrive(&empty[(it - 1) % kWsStages]);
            // After the hand-back, so that waiting on its loads delays no stage.
            write_other_rows(other, n0, t, first);
        }
        wgmma_wait_groups<0>();
        pin_regs(acc);
        if ((tid & 127) == 0) mbar_arrive(&empty[(it - 1) % kWsStages]);  // the tile's last slice
        // Epilogue: the rows go through the staging tile, then out by the copy engine, one bulk
        // copy of min(192, D - n0) channels a row (D % 8 == 0, so 16-byte multiples at 16-byte
        // aligned addresses), while the warpgroup goes on to its next tile. Rows 4-byte store
        // by 4-byte store from the registers took the tensor cores' time: 48 stores a thread
        // writing half of each 32-byte sector they touch, with both warpgroups in them at once.
        if (i < 64) bulk_wait_read<0>();  // the previous tile's copies are done with the staging tile
        named_barrier(1 + half, 128);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t row = stage + static_cast<uint32_t>((16 * warp + gq + 8 * h) * kWsOutLd + 4 * q);
#pragma unroll
            for (int j = 0; j < 24; ++j) {
                const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                st_shared_b32(row + 16 * j, *reinterpret_cast<const uint32_t*>(&v));
            }
        }
        fence_proxy_async_smem();
        named_barrier(1 + half, 128);
        if (i < 64) {
            if (cur.bulk_dst >= 0)
                bulk_store(out + static_cast<int64_t>(cur.bulk_dst) * g.D + n0, stage + static_cast<uint32_t>(i * kWsOutLd),
                           static_cast<uint32_t>(min(kWsN, g.D - n0) * 2));
            bulk_commit();
        }
    }
    if (i < 64) bulk_wait<0>();  // the last copies read the staging tile: it must outlive them
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ------------------------------------------------------------------ backward: dweight partials

// A weight-gradient block's work: its k' (or k) tile from k0, its channel tile from n0, its split
// of the patch rows [m_begin, m_end), and the steps of `step` rows that cover them.
struct WeightBlock {
    int k0, n0, split, m_begin, m_end, steps;
};

__device__ __forceinline__ WeightBlock weight_block(const MapetPatchEmbedBwd& P, const Geometry& g, int step) {
    WeightBlock w;
    w.k0 = blockIdx.x * kBwdK;
    w.n0 = blockIdx.y * kBwdN;
    w.split = blockIdx.z;
    w.m_begin = w.split * P.split_rows;
    w.m_end = min(g.M, w.m_begin + P.split_rows);
    w.steps = w.m_end > w.m_begin ? (w.m_end - w.m_begin + step - 1) / step : 0;
    return w;
}

// Who a thread of the mma.sync weight-gradient kernels is (256 threads, 8 warps): its lane, and
// its warp's share of the 128 x 128 tile, 64 channels (wn) by 32 columns (wk).
struct WeightWarp {
    int tid, lane, wn, wk;
};

__device__ __forceinline__ WeightWarp weight_warp() {
    const int tid = threadIdx.x;
    return WeightWarp{tid, tid & 31, tid >> 7, (tid >> 5) & 3};
}

// One 32-row step of a weight-gradient tile on mma.sync: acc (warp (wn, wk): channels n0 + 64 wn +
// 16 mi + ..., columns k0 + 32 wk + 8 ni + ...) += g_tile^T p_tile, both [32 patch rows][128 + 8]
// bf16 with the contraction index as row, so ldmatrix.trans gives the fragments.
__device__ __forceinline__ void weight_step(float (&acc)[4][4][4], const __nv_bfloat16 (*g_tile)[kBwdLd],
                                            const __nv_bfloat16 (*p_tile)[kBwdLd], int lane, int wn, int wk) {
#pragma unroll
    for (int kk = 0; kk < kBwdC; kk += 16) {
        uint32_t bfrag[2][4];
#pragma unroll
        for (int nj = 0; nj < 2; ++nj)
            ldmatrix_x4_trans(bfrag[nj],
                              &p_tile[kk + (lane & 7) + ((lane >> 3) & 1) * 8][wk * 32 + nj * 16 + (lane >> 4) * 8]);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            uint32_t afrag[4];
            ldmatrix_x4_trans(afrag, &g_tile[kk + (lane & 7) + (lane >> 4) * 8][wn * 64 + mi * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
                mma_bf16(acc[mi][ni], afrag, bfrag[ni >> 1][(ni & 1) * 2], bfrag[ni >> 1][(ni & 1) * 2 + 1]);
        }
    }
}

// A block's tile of weight-gradient partials (weight_step's layout) into split `split` of
// P.partial, in the kernel's contraction order (k, or k' for the HWC kernel: the reduction maps
// it back); channels and columns past the matrix are skipped.
__device__ __forceinline__ void store_weight_tile(const MapetPatchEmbedBwd& P, const Geometry& g,
                                                  const float (&acc)[4][4][4], int split, int n0, int k0, int lane,
                                                  int wn, int wk) {
    float* partial = P.partial + static_cast<int64_t>(split) * g.D * g.K;
    const int gq = lane >> 2;
    const int q = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int n = n0 + wn * 64 + mi * 16 + gq + 8 * (r >> 1);
                const int k = k0 + wk * 32 + ni * 8 + 2 * q + (r & 1);
                if (n < g.D && k < g.K) partial[static_cast<int64_t>(n) * g.K + k] = acc[mi][ni][r];
            }
}

// The CHW weight gradient (uint8 or f32 pixels): two stages, d_out rows by cp.async and pixels
// through registers one step ahead.
template <bool U8>
__device__ __forceinline__ void backward_weight(const MapetPatchEmbedBwd& P) {
    __shared__ __align__(16) __nv_bfloat16 g_tile[2][kBwdC][kBwdLd];  // [patch row][channel]
    __shared__ __align__(16) __nv_bfloat16 p_tile[2][kBwdC][kBwdLd];  // [patch row][k]

    const Geometry g = geometry(P.batch, P.image, P.patch, P.dim, P.n_context);
    const Pixels<U8> px = make_pixels<U8>(P);
    const __nv_bfloat16* d_out = static_cast<const __nv_bfloat16*>(P.d_out);
    const WeightWarp ww = weight_warp();
    const int tid = ww.tid, lane = ww.lane, wn = ww.wn, wk = ww.wk;  // (lambdas capture these)
    const WeightBlock wb = weight_block(P, g, kBwdC);
    const int k0 = wb.k0, n0 = wb.n0, split = wb.split, m_begin = wb.m_begin, m_end = wb.m_end;
    const int steps = wb.steps;

    // This thread stages rows (tid/16) and (tid/16 + 16) of each step: 8 channels of d_out at
    // n0 + 8*(tid%16), and 8 pixels at k0 + 8*(tid%16).
    const int col8 = (tid & 15) * 8;
    const int n_col = n0 + col8;
    const int k_col = k0 + col8;

    float acc[4][4][4];
    zero_acc(acc);

    uint32_t raw[2][8];  // the pixel groups of the two rows
    int tag[2];
    // The ranks of this thread's two rows of the next stage (-1: no row), loaded one step ahead so
    // that the load's latency hides behind a step of MMAs.
    int rank_next[2];
    auto fetch_ranks = [&](int s) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int m = m_begin + s * kBwdC + (tid >> 4) + 16 * i;
            rank_next[i] = -1;
            if (m < m_end && n_col < g.D) {
                const int b = m / g.np;
                rank_next[i] = __ldg(P.ranks + static_cast<int64_t>(b) * g.n_tokens + (m - b * g.np + 1));
            }
        }
    };

    // Stages step s into buffer buf (d_out rows by cp.async, pixels into registers), then
    // fetches the ranks of step s + 1.
    auto stage = [&](int s, int buf) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = (tid >> 4) + 16 * i;
            const int m = m_begin + s * kBwdC + row;
            const bool in = m < m_end;
            // d_out row of patch m, gathered by rank.
            const int r = rank_next[i];
            const bool ok = r >= 1 && r < g.n_tokens;
            const __nv_bfloat16* src = ok ? d_out + (static_cast<int64_t>(m / g.np) * g.rows + r) * g.D + n_col : d_out;
            cp_async16(&g_tile[buf][row][col8], src, ok);
            const int pbase = in ? px.patch_base(m, g.G, g.np) : -1;
            px.load(pbase, k_col, raw[i], tag[i]);
        }
        fetch_ranks(s + 1);
    };
    auto commit = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            *reinterpret_cast<uint4*>(&p_tile[buf][(tid >> 4) + 16 * i][col8]) = px.finish(raw[i], tag[i]);
        cp_async_wait_all();
    };

    if (steps > 0) {
        fetch_ranks(0);
        stage(0, 0);
        commit(0);
    }
    __syncthreads();

    for (int s = 0; s < steps; ++s) {
        const int buf = s & 1;
        const bool more = s + 1 < steps;
        if (more) stage(s + 1, buf ^ 1);
        weight_step(acc, g_tile[buf], p_tile[buf], lane, wn, wk);
        if (more) commit(buf ^ 1);
        __syncthreads();
    }
    store_weight_tile(P, g, acc, split, n0, k0, lane, wn, wk);
}

// The HWC weight gradient (uint8 pixels, p % 8 == 0), contracting in k' order, on mma.sync with a
// four-stage copy ring. Every copy is a cp.async: a step's d_out rows (16 bytes a thread and row,
// gathered through the row table that mapet_patch_embed_bwd_tokens writes) and its raw pixel bytes (8 a
// thread and row, one HWC group of 8 consecutive k'). Step s + 3's copies are issued as step s's
// MMAs start, so a copy has three steps of MMAs to land (the two-stage kernel this replaced had
// one, and its warps stalled on global loads: BENCHMARKS.md). The pixels are normalised into the
// bf16 tile one step ahead, each thread converting the very bytes it copied (its own
// cp.async.wait_group makes them visible to it), so only the block barrier ending each step
// orders anything between threads. The table entries are read one step before their copies.
// Same tile, warps, MMAs and epilogue as the CHW kernel (weight_step, store_weight_tile). Its
// order is checked on the CPU (src/ops/patch_embed.rs,
// hwc_weight_copy_ring_orders_every_read_after_its_write), and its tests passed on an H200 in the
// seventh run, where it was no faster than the two-stage kernel before it (BENCHMARKS.md).
constexpr int kBwdStages = 4;
struct BwdHwcSmem {
    __nv_bfloat16 g[kBwdStages][kBwdC][kBwdLd];  // d_out rows: [patch row][channel]
    uint8_t raw[kBwdStages][kBwdC][kBwdK];        // raw pixel bytes: [patch row][k' - k0]
    __nv_bfloat16 p[2][kBwdC][kBwdLd];            // normalised pixels: [patch row][k' - k0]
};
static_assert(sizeof(BwdHwcSmem) == 68608, "BWD_HWC_SMEM in src/ops/patch_embed.rs");

__device__ __forceinline__ void backward_weight_hwc(const MapetPatchEmbedBwd& P) {
    extern __shared__ __align__(16) unsigned char bwd_hwc_raw[];
    if (dynamic_smem_bytes() < sizeof(BwdHwcSmem)) __trap();
    BwdHwcSmem& sm = *reinterpret_cast<BwdHwcSmem*>(bwd_hwc_raw);

    const Geometry g = geometry(P.batch, P.image, P.patch, P.dim, P.n_context);
    const Pixels<true> px = make_pixels<true>(P);
    const uint8_t* pixels = static_cast<const uint8_t*>(px.data);
    const __nv_bfloat16* d_out = static_cast<const __nv_bfloat16*>(P.d_out);
    const WeightWarp ww = weight_warp();
    const int tid = ww.tid, lane = ww.lane, wn = ww.wn, wk = ww.wk;  // (lambdas capture these)
    const WeightBlock wb = weight_block(P, g, kBwdC);
    const int steps = wb.steps;

    // This thread copies rows (tid/16) and (tid/16 + 16) of each step: 8 channels of d_out at
    // n0 + col8 and the 8 bytes of k' = k0 + col8.. of the row's patch. Its 8 contraction
    // indices are fixed; only the patch changes from row to row.
    const int col8 = (tid & 15) * 8;
    const int n_col = wb.n0 + col8;
    const HwcCursor col(wb.k0 + col8, g.p, g.S);
    const bool col_ok = col.k < g.K;
    const Norm3 col_norm = px.norm3(col.c);

    float acc[4][4][4];
    zero_acc(acc);

    // The table entries (d_out row, pixel base; {-1, -1} past the split) of the two rows of the
    // next step to be copied.
    int2 info[2];
    auto fetch_info = [&](int s) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int m = wb.m_begin + s * kBwdC + (tid >> 4) + 16 * i;
            info[i] = make_int2(-1, -1);
            if (m < wb.m_end) info[i] = __ldg(reinterpret_cast<const int2*>(P.row_info) + m);
        }
    };
    // Bit 2 (s % kBwdStages) + i: row i of step s has pixels (else its bf16 row is zeros: a
    // zero-filled copy would normalise to the channel shifts).
    uint32_t has_pixels = 0;
    // Issues step s's copies into its stage, then fetches the table entries of step s + 1.
    auto copy_step = [&](int s) {
        const int st = s % kBwdStages;
        uint32_t bits = 0;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = (tid >> 4) + 16 * i;
            const bool g_ok = info[i].x >= 0 && n_col < g.D;
            cp_async16(&sm.g[st][row][col8], g_ok ? d_out + static_cast<int64_t>(info[i].x) * g.D + n_col : d_out, g_ok);
            const bool p_ok = col_ok && info[i].y >= 0;
            cp_async8(&sm.raw[st][row][col8], p_ok ? pixels + info[i].y + col.off : pixels, p_ok);
            bits |= (p_ok ? 1u : 0u) << i;
        }
        has_pixels = (has_pixels & ~(3u << (2 * st))) | (bits << (2 * st));
        fetch_info(s + 1);
    };
    // Step s's normalised pixels into p[s & 1], from this thread's own landed bytes.
    auto convert_step = [&](int s) {
        const int st = s % kBwdStages;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = (tid >> 4) + 16 * i;
            const uint2 w = *reinterpret_cast<const uint2*>(&sm.raw[st][row][col8]);
            *reinterpret_cast<uint4*>(&sm.p[s & 1][row][col8]) =
                Pixels<true>::finish_hwc(w, col_norm, (has_pixels >> (2 * st + i)) & 1u);
        }
    };

    // Steps 0 .. kBwdStages - 2 in flight, one commit group each (empty past the split's end, so
    // that the group count, and with it every wait below, is the same in every block).
    fetch_info(0);
#pragma unroll 1
    for (int s = 0; s < kBwdStages - 1; ++s) {
        if (s < steps) copy_step(s);
        cp_async_commit();
    }
    if (steps > 0) {
        cp_async_wait_group<kBwdStages - 2>();  // step 0's group
        convert_step(0);
    }
    __syncthreads();

#pragma unroll 1
    for (int s = 0; s < steps; ++s) {
        // Step s + 3 into the stage step s - 1 used: its MMAs and its conversion are behind the
        // barrier that ended step s - 1.
        if (s + kBwdStages - 1 < steps) copy_step(s + kBwdStages - 1);
        cp_async_commit();
        weight_step(acc, sm.g[s % kBwdStages], sm.p[s & 1], lane, wn, wk);
        if (s + 1 < steps) {
            cp_async_wait_group<kBwdStages - 2>();  // step s + 1's group (the newer two may still fly)
            convert_step(s + 1);
        }
        __syncthreads();  // p[(s + 1) & 1] and step s + 1's d_out rows for all; p[s & 1] free
    }
    cp_async_wait_group<0>();  // only empty groups can be left; none outlives the block
    store_weight_tile(P, g, acc, wb.split, wb.n0, wb.k0, lane, wn, wk);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A warpgroup's 64 x (8 J) block of weight-gradient partials (an m64n(8J) accumulator: channels
// n_base + 16 warp + g (+ 8), k' columns k0 + 8j + 2t (+ 1) for lane (g, t), j < J) into split
// `split` of P.partial, in k' order (the reduction maps them back), two columns at a time (K =
// 3p^2 with p % 8 == 0 is even, and so is k': 8-byte aligned); channels and k' past the matrix are
// skipped.
template <int J>
__device__ __forceinline__ void store_wg_partials(const MapetPatchEmbedBwd& P, const Geometry& g,
                                                  const float (&acc)[4 * J], int split, int n_base, int k0, int lane,
                                                  int warp) {
    float* partial = P.partial + static_cast<int64_t>(split) * g.D * g.K;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int n = n_base + warp * 16 + (lane >> 2) + 8 * h;
        if (n >= g.D) continue;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int k = k0 + 8 * j + 2 * (lane & 3);
            if (k < g.K) {
                *reinterpret_cast<float2*>(partial + static_cast<int64_t>(n) * g.K + k) =
                    make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            }
        }
    }
}

// The HWC weight gradient, warp-specialised (sm_90a): a block takes 128 channels x 256 k' of one
// split's patch rows, in 64-row slices through a ring of kWbStages stages, with the loads in a
// warpgroup of their own (as in forward_hwc_ws) and both operands in the 128-byte swizzle, M/N-major
// (m64n256k16 with both transpose flags). Raw pixels, not normalised ones: u + 1 (u = 0..255) is
// exact in bf16, and the normalisation x = u * s[c] + h[c] = (u + 1) s[c] + (h[c] - s[c]) comes
// out of the sum,
//   sum_m d_out[m][n] x[m][k'] = s[c] sum_m d_out[m][n] (u[m][k'] + 1) + (h[c] - s[c]) sum_m d_out[m][n],
// so the block's partials are the first sum alone, and the reduction
// (mapet_patch_embed_bwd_weight_reduce_hwc_raw) applies s[c] and adds (h[c] - s[c]) times the
// column sum of d_out, which the token sums hold already. Each pair of pixels then costs three
// instructions (pixel_pair_plus1), with no scale, shift or select, and the sums are more exact than
// those of bf16-rounded normalised pixels.
// Why it looks like this: its earlier form (128 x 128 tiles, normalised pixels, no swizzle) took
// 0.226 ms at ViT-B against the mma.sync kernel's 0.198 (BENCHMARKS.md, seventh run). Its SASS
// showed the producer warpgroup issuing about 620 instructions a slice (one warp a scheduler, so
// every dependent instruction waited in full) against the 512 cycles of tensor-core work a slice
// held: the producer set the pace. Here a slice holds 1,024 cycles of tensor-core work for about
// the same producer work, and the grid is one wave (ceil(D/128) x ceil(K/256) tiles x splits, 126
// blocks at ViT-B), so no block pays a second ring fill.
// - The split's row table (d_out row and pixel base of each patch row, from mapet_patch_embed_bwd_tokens)
//   is copied into shared memory first, so that finding a row costs a shared load.
// - Warpgroup 0 produces. d_out: thread i copies the 16 bytes of channels n0 + 8 (i % 16) of rows
//   i / 16 + 8 r (r < 8) by cp.async. Pixels: thread i loads the 8 bytes of k' = k0 + 8 (i % 32) of
//   rows i / 32 + 4 r (r < 16) kWbAhead slices ahead (one fixed place in the patch, so one cursor),
//   and converts and stores them when their slice comes; the 8 lanes of a quarter warp store the 8
//   chunks of one 128-byte row, so the stores meet no bank conflict. A thread arrives on a slice's
//   `full` barrier (count 128) kWbLag slices after it issued the slice's copies, once
//   cp.async.wait_group says they have landed and a proxy fence has made them and its pixel
//   stores visible to the tensor cores.
// - Warpgroups 1 and 2 consume channels 0-63 and 64-127 of the tile, all 256 k' (128 f32
//   accumulators a thread), and release a stage on `empty` (count 2) once the wgmma that read it
//   are done.
// Stage layout, each 64-wide block [64 rows][128 bytes] in the 128-byte swizzle (16-byte chunk j of
// row r at r * 128 + ((j ^ (r % 8)) * 16)): d_out's two 64-channel blocks (16 KB), then the pixels'
// four 64-k' blocks (32 KB). A 16-deep step starts 16 rows (2048 bytes) further in; the stride
// between 8-row groups (SBO) is 1024, and between the pixels' 64-wide blocks (LBO) 8192.
// The default weight gradient on compute capability 9.0 since the eighth run (hwc-ws and
// hwc-ws-raw), where it took 0.152 ms of backward against the mma.sync kernel's 0.203 on an H200.
constexpr int kWbRows = 64;    // contraction rows a slice
constexpr int kWbC = 128;      // channels a block
constexpr int kWbN = 256;      // k' a block
constexpr int kWbStages = 4;
constexpr int kWbLag = 2;      // slices between a producer's copies and its arrival for them
constexpr int kWbAhead = 2;    // slices of pixel loads a producer thread holds
constexpr int kWbBlockBytes = kWbRows * 128;                 // 8 KB: one 64-wide block
constexpr int kWbGBytes = (kWbC / 64) * kWbBlockBytes;       // 16 KB of d_out
constexpr int kWbPBytes = (kWbN / 64) * kWbBlockBytes;       // 32 KB of pixels
constexpr int kWbStageBytes = kWbGBytes + kWbPBytes;         // 48 KB
constexpr int kWbRingBytes = kWbStages * kWbStageBytes + 1024;  // + slack to align the ring to 1024
constexpr int kWbProducerRegs = 104;
constexpr int kWbConsumerRegs = 200;
static_assert(128 * kWbProducerRegs + 256 * kWbConsumerRegs <= 384 * 168, "setmaxnreg pool");
// A consumer releases a slice's stage only after it has issued the next slice, which the producer
// hands over kWbLag slices after filling it: the producer must be able to fill kWbLag + 2 slices
// before it waits for a stage to come back.
static_assert(kWbStages >= kWbLag + 2, "a stage must be handed over before the producer needs it again");
static_assert(kWbAhead == 2, "the producer's rotation below holds two slices");

// One slice's raw pixels in a producer thread: its 16 rows' 8 bytes (zeros where the row or k'
// does not exist).
struct WbSlice {
    uint2 w[16];
};

// The 8 bytes at p when `ok` (one predicated load, no branch), else zeros.
__device__ __forceinline__ uint2 ld_pixels8_if(const uint8_t* p, bool ok) {
    uint2 v = make_uint2(0u, 0u);
    asm volatile(
        "{\n.reg .pred q;\nsetp.ne.b32 q, %2, 0;\n@q ld.global.nc.v2.u32 {%0, %1}, [%3];\n}\n"
        : "+r"(v.x), "+r"(v.y)
        : "r"(static_cast<int>(ok)), "l"(p));
    return v;
}

__device__ __forceinline__ void backward_weight_hwc_ws(const MapetPatchEmbedBwd& P) {
    extern __shared__ __align__(128) unsigned char wb_smem[];
    __shared__ __align__(8) uint64_t full[kWbStages];
    __shared__ __align__(8) uint64_t empty[kWbStages];
    const Geometry g = geometry(P.batch, P.image, P.patch, P.dim, P.n_context);
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int k0 = blockIdx.x * kWbN;
    const int n0 = blockIdx.y * kWbC;
    const int split = blockIdx.z;
    const int m_begin = split * P.split_rows;
    const int m_end = min(g.M, m_begin + P.split_rows);
    const int slices = m_end > m_begin ? (m_end - m_begin + kWbRows - 1) / kWbRows : 0;
    // The ring, aligned to 1024 bytes for the swizzle; the split's table, rows [m_begin, m_begin +
    // 64 slices), {-1, -1} past m_end, after it (kWbRingBytes from the 128-aligned start, so
    // 8-byte aligned).
    const uint32_t ring = (smem_addr(wb_smem) + 1023u) & ~1023u;
    int2* table = reinterpret_cast<int2*>(wb_smem + kWbRingBytes);
    if (dynamic_smem_bytes() < kWbRingBytes + 8u * kWbRows * slices) __trap();
    // Eight entries a thread at a time, their loads in flight together: one entry a loop trip, as
    // until the eighth run, the fill took a round trip to memory per trip (about ten at ViT-B),
    // and its stores' wait was 4% of the kernel's warp-stall samples in that run's profile.
    constexpr int kFill = 8;
    const int entries = slices * kWbRows;
    const int2* row_info = reinterpret_cast<const int2*>(P.row_info);
    for (int r0 = tid; r0 < entries; r0 += kFill * static_cast<int>(blockDim.x)) {
        int2 e[kFill];
#pragma unroll
        for (int u = 0; u < kFill; ++u) {
            const int r = r0 + u * static_cast<int>(blockDim.x);
            e[u] = m_begin + r < m_end ? __ldg(row_info + m_begin + r) : make_int2(-1, -1);
        }
#pragma unroll
        for (int u = 0; u < kFill; ++u) {
            const int r = r0 + u * static_cast<int>(blockDim.x);
            if (r < entries) table[r] = e[u];
        }
    }
    mbar_init_ring(full, empty, 128, 2);
    __syncthreads();

    if (wg == 0) {
        // ---- producer
        regs_release<kWbProducerRegs>();
        const __nv_bfloat16* d_out = static_cast<const __nv_bfloat16*>(P.d_out);
        // d_out: chunk cn (channels n0 + 8 cn) of rows gr + 8 r; its place in the stage.
        const int cn = tid & 15, gr = tid >> 4;
        const bool n_ok = n0 + 8 * cn < g.D;
        const __nv_bfloat16* g_src = d_out + n0 + 8 * cn;  // + a row's offset
        const uint32_t g_off = (cn >> 3) * kWbBlockBytes + gr * 128 + (((cn & 7) ^ gr) << 4);
        // Pixels: chunk cp (k' = k0 + 8 cp) of rows pr + 4 r; its place in rows pr and pr + 4 (row
        // pr + 4 r is 8 (r / 2) rows past one of them, and has its swizzle, the index mod 8).
        const int cp = tid & 31, pr = tid >> 5;
        const HwcCursor cur(k0 + 8 * cp, g.p, g.S);
        const bool k_ok = k0 + 8 * cp < g.K;
        const uint8_t* pix = static_cast<const uint8_t*>(P.pixels) + cur.off;  // + a row's pixel base
        const uint32_t p_even = kWbGBytes + (cp >> 3) * kWbBlockBytes + pr * 128 + (((cp & 7) ^ pr) << 4);
        const uint32_t p_odd = kWbGBytes + (cp >> 3) * kWbBlockBytes + (pr + 4) * 128 + (((cp & 7) ^ (pr + 4)) << 4);
        auto fetch = [&](WbSlice& sl, int t) {
            if (t >= slices) return;  // past the split: nothing of it is stored
#pragma unroll
            for (int r = 0; r < 16; ++r) {
                const int base = table[t * kWbRows + pr + 4 * r].y;
                sl.w[r] = ld_pixels8_if(pix + static_cast<uint32_t>(base), k_ok && base >= 0);
            }
        };
        auto produce = [&](int t, WbSlice& sl) {
            const int s = t % kWbStages;
            if (t >= kWbStages) mbar_wait(&empty[s], (t / kWbStages - 1) & 1);
            const uint32_t stage = ring + static_cast<uint32_t>(s * kWbStageBytes);
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                // A row of -1 (none) reads nothing: row 0's address, zero bytes.
                const int row = table[t * kWbRows + gr + 8 * r].x;
                const uint64_t at = static_cast<uint64_t>(static_cast<uint32_t>(max(row, 0))) * static_cast<uint32_t>(g.D);
                cp_async16_to(stage + g_off + r * 1024, g_src + at, row >= 0 && n_ok);
            }
            cp_async_commit();
#pragma unroll
            for (int r = 0; r < 16; ++r)
                st_shared16(stage + ((r & 1) ? p_odd : p_even) + (r >> 1) * 1024, pixels_plus1_bf16x8(sl.w[r]));
            fetch(sl, t + kWbAhead);
            if (t >= kWbLag) {
                cp_async_wait_group<kWbLag>();  // slice t - kWbLag's copies have landed
                fence_proxy_async_smem();
                mbar_arrive(&full[(t - kWbLag) % kWbStages]);
            }
        };
        WbSlice x, y;
        fetch(x, 0);
        fetch(y, 1);
        for (int t = 0; t < slices; t += 2) {
            produce(t, x);
            if (t + 1 < slices) produce(t + 1, y);
        }
        // The last kWbLag slices (or all, if fewer).
        cp_async_wait_group<0>();
        fence_proxy_async_smem();
        for (int t = max(0, slices - kWbLag); t < slices; ++t) mbar_arrive(&full[t % kWbStages]);
        return;
    }

    // ---- consumers: warpgroup 1 channels 0-63 of the tile, warpgroup 2 channels 64-127.
    regs_claim<kWbConsumerRegs>();
    const int half = wg - 1;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int t = 0; t < slices; ++t) {
        const int s = t % kWbStages;
        mbar_wait(&full[s], (t / kWbStages) & 1);
        const uint32_t a = ring + static_cast<uint32_t>(s * kWbStageBytes + half * kWbBlockBytes);
        const uint32_t b = ring + static_cast<uint32_t>(s * kWbStageBytes + kWbGBytes);
        pin_regs(acc);
        wgmma_fence_acc();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            wgmma_m64n256k16<1, 1>(acc, sw128_desc(a + kk * 2048), sw128_desc_lbo(b + kk * 2048, kWbBlockBytes));
        wgmma_commit_groups();
        wgmma_wait_groups<1>();
        if (t > 0 && (tid & 127) == 0) mbar_arrive(&empty[(t - 1) % kWbStages]);
    }
    wgmma_wait_groups<0>();
    pin_regs(acc);

    // This warpgroup's channels 64 half .. 64 half + 63 of the tile, all 256 k'.
    store_wg_partials<32>(P, g, acc, split, n0 + half * 64, k0, tid & 31, (tid >> 5) & 3);
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

// ------------------------------------------------------------------ kernels

// Content rows of the patch tokens. Grid (ceil(D/128), ceil(B*(N-1)/128)), 256 threads.
extern "C" __global__ void __launch_bounds__(kThreads, 2) mapet_patch_embed_fwd_u8(const MapetPatchEmbedFwd p) {
    dependent_launch_start();
    forward_patches<true, false>(p);
}

extern "C" __global__ void __launch_bounds__(kThreads, 2) mapet_patch_embed_fwd_f32(const MapetPatchEmbedFwd p) {
    dependent_launch_start();
    forward_patches<false, false>(p);
}

// As mapet_patch_embed_fwd_u8 in HWC contraction order (p % 8 == 0); reads weight_hwc, written
// first by mapet_patch_embed_weight_hwc.
extern "C" __global__ void __launch_bounds__(kThreads, 2) mapet_patch_embed_fwd_u8_hwc(const MapetPatchEmbedFwd p) {
    dependent_launch_start();
    forward_patches<true, true>(p);
}


// As mapet_patch_embed_fwd_u8_hwc, warp-specialised with TMA weight loads (see "forward,
// warp-specialised on TMA"); sm_90a only, as above. Grid min(tiles, SMs) (tiles =
// ceil(D/192) * ceil(B*(N-1)/128)), 384 threads, dynamic shared memory kWsSmemBytes: kWsStages *
// 40 KB of ring, two 25,600 B staging tiles and 1 KB of alignment slack.
extern "C" __global__ void __launch_bounds__(384, 1)
    mapet_patch_embed_fwd_u8_hwc_ws(const __grid_constant__ MapetPatchEmbedFwdWs p) {
    dependent_launch_start();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    forward_hwc_ws<false>(p);
#else
    __trap();
#endif
}

// As mapet_patch_embed_fwd_u8_hwc_ws on raw pixels (see "forward, warp-specialised on TMA"):
// weight_hwc and bias_raw as mapet_patch_embed_weight_hwc_raw writes them, p.bias = bias_raw.
// sm_90a only, as above; the same grid, block and shared memory.
extern "C" __global__ void __launch_bounds__(384, 1)
    mapet_patch_embed_fwd_u8_hwc_ws_raw(const __grid_constant__ MapetPatchEmbedFwdWs p) {
    dependent_launch_start();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    forward_hwc_ws<true>(p);
#else
    __trap();
#endif
}

// Row t of the token-row table: cls_token + pos_embed[0] for t = 0, mask_token + pos_embed[t]
// otherwise, by token_pair (the one rule for those rows). Channel pairs x0, x0 + stride, ...
// (D is even): coalesced.
__device__ __forceinline__ void write_token_row(const MapetPatchEmbedFwd& p, int t, int x0, int stride) {
    const float2* vec = reinterpret_cast<const float2*>(t == 0 ? p.cls_token : p.mask_token);
    const float2* pos = reinterpret_cast<const float2*>(p.pos_embed + static_cast<int64_t>(t) * p.dim);
    uint32_t* row = reinterpret_cast<uint32_t*>(token_rows_of(p) + static_cast<int64_t>(t) * p.dim);
    for (int i = x0; i < p.dim / 2; i += stride) row[i] = token_pair(vec[i], pos[i]);
}

// weight_hwc[d][k'] = weight[d][k] for k' = 3*(ky*p + kx) + c and k = c*p*p + ky*p + kx: the bf16
// weight [D, 3, p, p] as [D, p, p, 3]. Grid (ceil(K / blockDim.x), D): element (d, k') a thread,
// d from the grid, so that no index is divided (a 64-bit division by K per element was most of
// the kernel, as in the weight gradient's reduction); writes coalesced. For the hwc-ws forward
// the grid is (max(ceil(K / blockDim.x), ceil(D / blockDim.x)), D + N), and its rows D + t write
// row t of the token-row table, a channel pair a thread.
extern "C" __global__ void mapet_patch_embed_weight_hwc(const MapetPatchEmbedFwd p) {
    dependent_launch_start();
    if (blockIdx.y >= p.dim) {
        write_token_row(p, blockIdx.y - p.dim, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x);
        return;
    }
    const int pp = p.patch * p.patch;
    const int K = 3 * pp;
    const int kc = blockIdx.x * blockDim.x + threadIdx.x;
    if (kc >= K) return;
    const int64_t row = static_cast<int64_t>(blockIdx.y) * K;
    const unsigned short* src = static_cast<const unsigned short*>(p.weight);
    unsigned short* dst = static_cast<unsigned short*>(p.weight_hwc);
    dst[row + kc] = src[row + (kc % 3) * pp + kc / 3];
}

// The raw-pixel forward's weight and bias (hwc-ws-raw). With x = u s[c] + h[c] = (u - 127) s[c] +
// (h[c] + 127 s[c]) for a byte u of channel c,
//   sum_k W[d][k] x[k] + bias[d] = sum_k' (2^8 W[d][k] s[c]) (u[k'] - 127) 2^-8 + bias_raw[d],
//   bias_raw[d] = bias[d] + sum_k W[d][k] (h[c] + 127 s[c]),
// so the kernel multiplies (u - 127) 2^-8, exact in f16, by weight_hwc[d][k'] =
// f16(2^8 W[d][k] s[c]) (in HWC order, as mapet_patch_embed_weight_hwc; kRawScale = 2^8 keeps
// weights down to about 1e-5 normal in f16, and f16 holds them up to |W s| = 255: weights up to
// about 15,000 with ImageNet's std), from sums that start at bias_raw + pos_embed. Each product is
// rounded once, as in the other kernels, but at the weight, to f16's 11 bits, where they round
// the normalised pixel to bf16's 8: on the CPU the outputs come out
// nearer the f64 truth than the bf16 baseline's (tests/patch_embed.rs). Centring u keeps the
// rounded products about as large as those of the normalised pixels: with u + 1 and a bf16
// weight (the weight gradient's form) the outputs' error on the CPU came to 1.2-1.35 times the
// baseline's.
// Grid (D + N), block kRawThreads: block d < D writes channel d, thread t taking k' = t,
// t + kRawThreads, ... and the block adding the threads' sums in a fixed order (deterministic);
// block D + t writes row t of the token-row table (params.h, in weight_hwc past the weight).
constexpr int kRawThreads = 256;
extern "C" __global__ void __launch_bounds__(kRawThreads) mapet_patch_embed_weight_hwc_raw(const MapetPatchEmbedFwd p) {
    dependent_launch_start();
    __shared__ float s_sum[kRawThreads / 32];
    if (blockIdx.x >= p.dim) {
        write_token_row(p, blockIdx.x - p.dim, threadIdx.x, kRawThreads);
        return;
    }
    const int pp = p.patch * p.patch;
    const int K = 3 * pp;
    const int d = blockIdx.x;
    const int64_t row = static_cast<int64_t>(d) * K;
    const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(p.weight) + row;
    __half* dst = static_cast<__half*>(p.weight_hwc) + row;  // f16 here, in the bf16 scratch
    float fold = 0.f;
    for (int kc = threadIdx.x; kc < K; kc += kRawThreads) {
        const int c = kc % 3;
        // (selects: a run-time index into the parameter arrays would copy them to local memory)
        const float sc = c == 0 ? p.scale[0] : (c == 1 ? p.scale[1] : p.scale[2]);
        const float sh = c == 0 ? p.shift[0] : (c == 1 ? p.shift[1] : p.shift[2]);
        const float w = __bfloat162float(src[c * pp + kc / 3]);
        dst[kc] = __float2half_rn(w * sc * kRawScale);
        fold = fmaf(w, sh + static_cast<float>(kRawCenter) * sc, fold);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) fold += __shfl_xor_sync(0xffffffffu, fold, off);
    if ((threadIdx.x & 31) == 0) s_sum[threadIdx.x >> 5] = fold;
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = p.bias[d];
        for (int w = 0; w < kRawThreads / 32; ++w) b += s_sum[w];
        p.bias_raw[d] = b;
    }
}

// Row 0 (CLS) and the 2P mask-token rows. Grid (N, B), any block size; each thread writes 8
// channels at a time. (The hwc-ws forward writes these rows itself, the same values.)
extern "C" __global__ void mapet_patch_embed_fwd_rows(const MapetPatchEmbedFwd p) {
    dependent_launch_start();
    const int n_tokens = 1 + (p.image / p.patch) * (p.image / p.patch);
    const int n_pred = n_tokens - p.n_context;
    const int rows = n_tokens + 2 * n_pred;
    const int t = blockIdx.x;
    const int b = blockIdx.y;
    const int r = __ldg(p.ranks + static_cast<int64_t>(b) * n_tokens + t);
    const float* vec;
    int64_t row0, row1;
    if (t == 0) {
        vec = p.cls_token;
        row0 = row1 = static_cast<int64_t>(b) * rows;
    } else if (r >= p.n_context && r < n_tokens) {
        vec = p.mask_token;
        row0 = static_cast<int64_t>(b) * rows + n_tokens + (r - p.n_context);
        row1 = row0 + n_pred;
    } else {
        return;
    }
    const float* pos = p.pos_embed + static_cast<int64_t>(t) * p.dim;
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    for (int d = threadIdx.x * 8; d < p.dim; d += blockDim.x * 8) {
        const float4 v0 = __ldg(reinterpret_cast<const float4*>(vec + d));
        const float4 v1 = __ldg(reinterpret_cast<const float4*>(vec + d + 4));
        const float4 e0 = __ldg(reinterpret_cast<const float4*>(pos + d));
        const float4 e1 = __ldg(reinterpret_cast<const float4*>(pos + d + 4));
        const uint4 o = make_uint4(token_pair(make_float2(v0.x, v0.y), make_float2(e0.x, e0.y)),
                                   token_pair(make_float2(v0.z, v0.w), make_float2(e0.z, e0.w)),
                                   token_pair(make_float2(v1.x, v1.y), make_float2(e1.x, e1.y)),
                                   token_pair(make_float2(v1.z, v1.w), make_float2(e1.z, e1.w)));
        *reinterpret_cast<uint4*>(out + row0 * p.dim + d) = o;
        if (row1 != row0) *reinterpret_cast<uint4*>(out + row1 * p.dim + d) = o;
    }
}

// dweight partials. Grid (ceil(K/128), ceil(D/128), splits), 256 threads.
extern "C" __global__ void __launch_bounds__(kThreads, 2) mapet_patch_embed_bwd_weight_u8(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    backward_weight<true>(p);
}

extern "C" __global__ void __launch_bounds__(kThreads, 2) mapet_patch_embed_bwd_weight_f32(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    backward_weight<false>(p);
}

// The dweight partials in HWC contraction order (p % 8 == 0; backward_weight_hwc): the same grid
// and block as mapet_patch_embed_bwd_weight_u8, with sizeof(BwdHwcSmem) bytes of dynamic shared
// memory for its copy ring. The partials are in k' order, summed and put back in the weight's
// [D, 3, p, p] order by mapet_patch_embed_bwd_weight_reduce_hwc.
extern "C" __global__ void __launch_bounds__(kThreads, 2)
    mapet_patch_embed_bwd_weight_u8_hwc(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    backward_weight_hwc(p);
}


// The raw-pixel partials of the weight gradient, warp-specialised (backward_weight_hwc_ws);
// sm_90a only, as above. Grid (ceil(K'/256), ceil(D/128), splits), 384 threads, dynamic shared
// memory kWbRingBytes + 8 * 64 * ceil(split_rows / 64) (the split's row table). Same table (read
// from row_info); its reduction is mapet_patch_embed_bwd_weight_reduce_hwc_raw, after the token
// sums.
extern "C" __global__ void __launch_bounds__(384, 1)
    mapet_patch_embed_bwd_weight_u8_hwc_ws(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    backward_weight_hwc_ws(p);
#else
    __trap();
#endif
}

namespace {

// dweight[d][k] += sum over splits of partial[split][d][kc], splits in order, where kc is k in
// the kernel's contraction order: kc = k (CHW), or kc = k' = 3*(ky*p + kx) + c for the weight
// index k = c*p*p + ky*p + kx (HWC; the reads stay coalesced, the writes take the permutation).
// Grid (ceil(K / blockDim.x), D): one element a thread, its channel d = blockIdx.y and column kc
// from blockIdx.x, so that no index is divided (a 64-bit division by K per element was most of
// this kernel's instructions). The splits' loads are unrolled to be in flight together; the sum
// still runs over the splits in order.
template <bool HWC, bool RAW = false>
__device__ __forceinline__ void reduce_weight_partials(const MapetPatchEmbedBwd& p) {
    // Every reduction also finishes the token vectors' gradients from the token sums
    // (mapet_patch_embed_bwd_tokens, run before), in its blocks of column 0: warp 0 sums its
    // channel's content sums over tokens 1..N-1 (lanes over 1 + lane, 33 + lane, ..., then the
    // lanes in a fixed shuffle order: deterministic) into dbias and adds token 0's to dcls; warp 1
    // sums the mask sums of all tokens, token 0's (always 0: CLS is never masked) included
    // (lanes over lane, 32 + lane, ..., then the same shuffle order), into dmask.
    // RAW (HWC only): the partials are of raw pixels plus one (backward_weight_hwc_ws), normalised
    // here with that same column sum (the sum of d_out over the patch rows), which every block
    // of the RAW reduction takes for its own channel.
    __shared__ float s_colsum;
    const bool vectors = blockIdx.x == 0;
    if (RAW || vectors) {
        const int n_tokens = 1 + (p.image / p.patch) * (p.image / p.patch);
        const int d = blockIdx.y;
        const int lane = threadIdx.x % 32;
        if (threadIdx.x < 32) {
            float c = 0.f;
            for (int t = 1 + lane; t < n_tokens; t += 32) c += p.token_sums[static_cast<int64_t>(t) * p.dim + d];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) c += __shfl_xor_sync(0xffffffffu, c, off);
            if (lane == 0) {
                if (RAW) s_colsum = c;
                if (vectors) {
                    p.dbias[d] += c;
                    p.dcls_token[d] += p.token_sums[d];
                }
            }
        } else if (vectors && threadIdx.x < 64) {
            const float* mask_sums = p.token_sums + static_cast<int64_t>(n_tokens) * p.dim;
            float m = 0.f;
            for (int t = lane; t < n_tokens; t += 32) m += mask_sums[static_cast<int64_t>(t) * p.dim + d];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) m += __shfl_xor_sync(0xffffffffu, m, off);
            if (lane == 0) p.dmask_token[d] += m;
        }
    }
    if (RAW) __syncthreads();  // s_colsum (every block of a RAW reduction takes the branch above)
    const int pp = p.patch * p.patch;
    const int K = 3 * pp;
    const int kc = blockIdx.x * blockDim.x + threadIdx.x;
    if (kc >= K) return;
    const int64_t row = static_cast<int64_t>(blockIdx.y) * K;
    const int64_t total = static_cast<int64_t>(p.dim) * K;
    const float* src = p.partial + row + kc;
    float s = 0.f;
#pragma unroll 8
    for (int j = 0; j < p.splits; ++j) s += src[j * total];
    if (RAW) {
        const int c = kc % 3;
        s = p.scale[c] * s + (p.shift[c] - p.scale[c]) * s_colsum;
    }
    p.dweight[row + (HWC ? (kc % 3) * pp + kc / 3 : kc)] += s;
}

}  // namespace

// Grid (ceil(K / blockDim.x), D).
extern "C" __global__ void mapet_patch_embed_bwd_weight_reduce(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    reduce_weight_partials<false>(p);
}

// The reduction of mapet_patch_embed_bwd_weight_u8_hwc's partials (in k' order).
extern "C" __global__ void mapet_patch_embed_bwd_weight_reduce_hwc(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    reduce_weight_partials<true>(p);
}

// The reduction of mapet_patch_embed_bwd_weight_u8_hwc_ws's raw-pixel partials (in k' order, of
// sum_m d_out[m][d] (u[m][k'] + 1)): dweight[d][k] += s[c] * (sum over splits, in order) +
// (h[c] - s[c]) * colsum[d], for c = k' % 3, where colsum[d] = sum over tokens 1..N-1 of token_sums[t][d] is the
// sum of d_out over the patch rows that the partials cover (those with a rank in [1, N)).
// mapet_patch_embed_bwd_tokens must have run. Grid (ceil(K / blockDim.x), D); warp 0 of each
// block sums its channel's column (lanes over tokens 1 + lane, 33 + lane, ..., then the lanes in a
// fixed shuffle order: deterministic), and the blocks of column 0 also add dbias, dcls and dmask
// (reduce_weight_partials).
extern "C" __global__ void mapet_patch_embed_bwd_weight_reduce_hwc_raw(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    reduce_weight_partials<true, true>(p);
}

// Per token t and 8 channels: sums over the batch (in a fixed order) of its content row and of its
// two mask rows; dpos += both, and both are kept in token_sums [2, N, D] for the weight reduction.
// Grid (ceil(D/8 / kTokGroups), N), block kTokGroups x kTokSlices. Thread (g, k) owns channels
// 8g'..8g'+7 (g' = blockIdx.x * kTokGroups + g) and sums samples k, k + kTokSlices, ... in
// increasing order, loading four samples' rows before adding them; slice 0 then adds the slices'
// sums in slice order. A warp reads 512 contiguous bytes of one row (16 bytes a lane) and
// d_out is read exactly once. The slices split the batch so that no thread walks all of it, and
// kTokBlocksPerSm blocks an SM keep loads in flight (and the grid in one wave at ViT-B).
// The block first copies the ranks of token t for up to kTokRankChunk samples into shared memory
// (one load a thread, all in flight at once), so that each group of four samples waits on one
// round trip to memory, its rows, and not on two (the rank, then the rows it names), as when
// every thread loaded its own ranks: at ViT-B, 8 groups a thread, and the kernel ran at about
// half the card's bandwidth (BENCHMARKS.md). The staged ranks passed their tests on an H200
// (seventh run).
// For the HWC weight gradients (p.row_info set) the same loads fill their row table: for each
// patch row m = b*G*G + py*G + px, row_info[2m] = b*R + the rank of its token, the d_out row it
// takes its gradient from (-1 when the rank is outside [1, N)), and row_info[2m + 1] = the offset
// of its top-left pixel in the HWC image (in bytes). Column 0 of the grid writes it, so this
// kernel runs before the weight gradient; the table once had a kernel of its own, one launch more.
extern "C" __global__ void __launch_bounds__(kTokGroups * kTokSlices, kTokBlocksPerSm) mapet_patch_embed_bwd_tokens(const MapetPatchEmbedBwd p) {
    dependent_launch_start();
    __shared__ float s_part[kTokSlices][2][kTokGroups][8];
    __shared__ int s_rank[kTokRankChunk];
    const int n_tokens = 1 + (p.image / p.patch) * (p.image / p.patch);
    const int n_pred = n_tokens - p.n_context;
    const int rows = n_tokens + 2 * n_pred;
    const int g = threadIdx.x % kTokGroups;
    const int k = threadIdx.x / kTokGroups;
    const int d = 8 * (blockIdx.x * kTokGroups + g);
    const int t = blockIdx.y;
    const bool live = d < p.dim;  // no early return: every thread reaches the barrier
    // The row table of the HWC weight gradients (when it has one): the blocks of column 0 write
    // the entries of their token's patch, t - 1 = py*G + px, for every sample.
    const bool table = p.row_info != nullptr && blockIdx.x == 0 && t > 0;
    const int G = p.image / p.patch;
    const int py = t > 0 ? (t - 1) / G : 0;
    const int px = t > 0 ? (t - 1) - py * G : 0;
    const __nv_bfloat16* d_out = static_cast<const __nv_bfloat16*>(p.d_out);
    float c[8], m[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = m[e] = 0.f;
    constexpr int kUnroll = 4;
    static_assert(kTokRankChunk % (kUnroll * kTokSlices) == 0, "a chunk holds whole groups of every slice");
    // Samples in chunks of kTokRankChunk; inside a chunk, thread slice k visits samples k, k + 4, ...
    // in groups of four, as if there were no chunks (the same order, so the same sums).
    for (int c0 = 0; c0 < p.batch; c0 += kTokRankChunk) {
        const int n = min(kTokRankChunk, p.batch - c0);
        __syncthreads();  // the previous chunk's ranks are read by every thread
        for (int i = threadIdx.x; i < n; i += kTokGroups * kTokSlices) {
            const int r = __ldg(p.ranks + static_cast<int64_t>(c0 + i) * n_tokens + t);
            s_rank[i] = r;
            if (table) {
                const int b = c0 + i;
                const int row = r >= 1 && r < n_tokens ? b * rows + r : -1;
                const int base = ((b * p.image + py * p.patch) * p.image + px * p.patch) * 3;
                reinterpret_cast<int2*>(p.row_info)[static_cast<int64_t>(b) * (n_tokens - 1) + t - 1] =
                    make_int2(row, base);
            }
        }
        __syncthreads();
        for (int i0 = k; live && i0 < n; i0 += kUnroll * kTokSlices) {
            uint4 v[kUnroll], a[kUnroll], h[kUnroll];
#pragma unroll
            for (int j = 0; j < kUnroll; ++j) {
                const int i = i0 + j * kTokSlices;
                v[j] = a[j] = h[j] = make_uint4(0u, 0u, 0u, 0u);  // absent rows add zeros
                const int r = i < n ? s_rank[i] : -1;
                const int64_t row = static_cast<int64_t>(c0 + i) * rows;
                if (r >= 0 && r < n_tokens) v[j] = ldg16(d_out + (row + r) * p.dim + d);
                if (t > 0 && r >= p.n_context && r < n_tokens) {
                    const int64_t q = row + n_tokens + (r - p.n_context);
                    a[j] = ldg16(d_out + q * p.dim + d);
                    h[j] = ldg16(d_out + (q + n_pred) * p.dim + d);
                }
            }
#pragma unroll
            for (int j = 0; j < kUnroll; ++j) {
                add_bf16x8(c, v[j]);
                add_bf16x8(m, a[j]);
                add_bf16x8(m, h[j]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        s_part[k][0][g][e] = c[e];
        s_part[k][1][g][e] = m[e];
    }
    __syncthreads();
    if (k != 0 || !live) return;
#pragma unroll
    for (int s = 1; s < kTokSlices; ++s) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            c[e] += s_part[s][0][g][e];
            m[e] += s_part[s][1][g][e];
        }
    }
    const int64_t i = static_cast<int64_t>(t) * p.dim + d;
    const int64_t plane = static_cast<int64_t>(n_tokens) * p.dim;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        p.dpos_embed[i + e] += c[e] + m[e];
        p.token_sums[i + e] = c[e];
        p.token_sums[plane + i + e] = m[e];
    }
}
