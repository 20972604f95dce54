// Two-stream permutation attention (MaPeT), forward and backward. bf16 in and out, f32 accumulation,
// head_dim 64 only (the launcher refuses any other size).
//
// ---------------------------------------------------------------------------------------------- math
// Per (sample b, head h), with Q [Lq, 64], K, V [Lk, 64], scale s = 1/sqrt(64):
//   S = Q K^T,  P = softmax_row(s * S over the visible keys),  O = P V,  lse_i = log sum_j exp(s * S_ij)
// Backward, with dO given:
//   delta_i = sum_d dO_id O_id                     (= sum_j P_ij dP_ij)
//   dP = dO V^T,  dS = P o (dP - delta),  dQ = s * dS K,  dK = s * dS^T Q,  dV = P^T dO
//
// ---------------------------------------------------------------------------------------------- layout
// One sample's query rows in rank order (params.h, MapetAttention): [0, N) content, [N, N+P) mask tokens
// of the content stream, [N+P, N+2P) query stream; Lq = N + 2P. Keys/values are the first Lk = N + P
// rows (the content stream h). Row `row` sees keys [0, a) and [m, Lk), and in all three segments
// m = a + P (content: m = N - C + max(C, r+1); mask: a = C, m = N; query: m = N - C + r). So each row
// hides exactly one window [a, a + P) of P keys and sees Lk - P = N keys, never zero. The kernels only
// need the first hidden key a(row) (`first_hidden`):
//   content row:          a = max(C, row + 1)
//   mask row:             a = C
//   query row:            a = C + (row - N - P)
// a is non-decreasing inside each segment and lies in [C, N]. Element (b, row, h, d) of q is at
// q[b*q_batch_stride + row*q_row_stride + h*64 + d] (likewise k, v, o, d_o, dq, dk, dv with their own
// strides); lse and delta are f32 [B, H, Lq] contiguous. lse is in natural-log units of scaled scores.
//
// ---------------------------------------------------------------------------------------------- kernels
// Both streams go through one launch: every K/V tile is loaded once per 64 query rows, whichever
// segments those rows belong to (for ViT-B, 491 rows against 344 keys). Three families, each a
// forward, a dQ and a dK/dV kernel (src/ops/attention.rs, AttentionKernels, picks them):
//   - wgmma (sm_90a, the default on compute capability 9.0): mapet_attention_{fwd,bwd_dq,bwd_dkdv}_wgmma,
//     Hopper's warpgroup MMA over operands held in swizzled shared memory, rows in "position"
//     order; described at "wgmma forward" below, with their experimental variants:
//     _wgmma_persistent (forward), _wgmma_peek, _wgmma_balanced, _wgmma_fused (dK/dV; the fused
//     one computes dQ too), and the _l2 twins of the forward and dQ (MAPET_L2_AHEAD);
//   - resident (mma.sync; the default elsewhere): the pair's K and V (Q and dO) held in shared memory;
//   - tiled (mma.sync): operands streamed a tile at a time; where the resident ones do not fit.
// The two mma.sync families give the same bits; this section and the next ones, down to "wgmma
// forward", describe them:
//
//   mapet_attention_fwd       grid (ceil(Lq/64), H, B), 128 threads. CTA = 64 contiguous query rows
//                             (16 per warp; a CTA may straddle segment boundaries). Loops over key
//                             tiles of 64, double-buffered with cp.async.
//   mapet_attention_bwd_dq    same grid and tiling. Computes delta for its rows (written to
//                             params.delta: the dK/dV kernel reads it), then dQ.
//   mapet_attention_bwd_dkdv  grid (ceil(Lk/64), H, B), 128 threads. CTA = 64 keys (16 per warp), keys
//                             as the M dimension of every product; loops over query tiles of 64.
//                             Must run after bwd_dq (it reads delta).
//   mapet_attention_fwd_resident, mapet_attention_bwd_dq_resident
//                             grid (splits, H, B), 256 threads, dynamic shared memory: the forward and
//                             dQ with all of a (sample, head) pair's K and V held in shared memory,
//                             loaded once per CTA instead of once per 64 query rows; the tiled
//                             kernels' results bit for bit ("K/V-resident variants" below). The
//                             default off compute capability 9.0.
//   mapet_attention_bwd_dkdv_resident
//                             grid (splits, H, B), 384 threads, dynamic shared memory: dK/dV with all
//                             of a pair's Q, dO, lse, delta and hidden windows held in shared memory,
//                             its warps taking 16-key tiles; the tiled kernel's bits. The default
//                             off compute capability 9.0. Runs after either dQ kernel.
// 128 query rows per CTA (forward and dQ) and a dK/dV kernel that re-reads K and V from shared memory
// (4 CTAs per SM) were tried and measured slower / no faster on an H200 (BENCHMARKS.md).
// The tiled kernels' shared memory is static: two stages x two [64 x 72] bf16 tiles = 36,864 B (fwd, bwd_dq), + 2 KiB of
// per-row lse, delta and hidden window in bwd_dkdv (38,912 B). The operand loaded once per CTA (Q,
// Q + dO, or K + V) is first staged in the second stage's slots and moved into registers before they
// are first refilled, so it costs no shared memory of its own.
// Registers bound the occupancy: fwd and bwd_dq fit 128 (4 CTAs = 16 warps per SM), bwd_dkdv needs
// 168 (3 CTAs; at 128 it spills). Shared rows are padded to 72 bf16 (144 B): the eight 16-byte row
// addresses of one ldmatrix phase then fall 36 words apart and cover all 32 banks once, and the
// cp.async stores (8 threads per 128-byte row) are conflict-free too.
// Inside a tile, each warp works in halves of 32 keys (fwd, bwd_dq) or 32 query rows (bwd_dkdv): the
// backward kernels hold S and dP of one half only (32 registers, not 64: what gets bwd_dq to 128
// registers), and a half that the warp's rows cannot see is skipped (about 1.24x the visible pairs are
// computed for ViT-B, against 1.49x at whole-tile granularity).
//
// Tile classification. For a set of rows with first-hidden extrema amin, amax and a key range
// [k0, k1) (k1 may pass Lk; keys >= Lk do not exist):
//   EMPTY    k0 >= amax and min(k1, Lk) <= amin + P: every key is inside every row's hidden window
//            (or k0 >= Lk). Not loaded (CTA level) / not computed (warp level, per half).
//   FULL     (k1 <= amin or k0 >= amax + P), k1 <= Lk (and, for dK/dV, all rows < Lq): every pair is
//            visible, no per-element mask.
//   PARTIAL  otherwise: per-element mask.
// The extrema are exact and cheap: a is monotone on each segment, so they sit at the ends of the <= 3
// segment pieces the row range covers (`hidden_extrema`). The CTA decides loads with the extrema of
// all its rows (keys); each warp decides its own math with the extrema of its rows (keys), with
// warp-uniform branches. Checked exhaustively against SPEC's visibility table for every 0 < C < N < 40
// and N in {65, 100, 130, 197}: no EMPTY block holds a visible pair, no FULL block a hidden one, and
// every block without a visible pair is EMPTY.
//
// Per-element mask: a key is hidden iff (unsigned)(key - a) < P (below a, the difference wraps to a
// large unsigned value), one add, one compare and one select per score, no branch; the tile that
// reaches past Lk adds a second compare (a separate instantiation, so other tiles do not pay it).
// bwd_dkdv keeps, per stage, a window {a, w} per query row in shared memory; rows past Lq get a window
// holding every key, so the same compare removes them. Hidden scores are set to -inf before the
// exponential, so their probability is exactly 0 (no multiply by a mask, which 0 * inf would break).
// Out-of-range rows and keys are zero-filled by cp.async (src-size 0), so they never bring NaN/Inf
// into a product. In bwd_dkdv, keys past Lk are not masked: a row of the A operand only reaches the
// same row of the product, and those dK, dV rows are never stored.
//
// Tensor cores: mma.sync m16n8k16 bf16 -> f32 (sm_80 and sm_90a alike), operands from shared memory
// with ldmatrix (.trans where the reduction runs along the stored rows). Fragment layouts, from the
// PTX ISA, with g = lane / 4 and t = lane % 4:
//   A (16x16, row): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..)
//   B (16x8, col):  reg0 = (k = 2t..2t+1, n = g), reg1 = (k = 2t+8..2t+9, n = g)
//   C (16x8, f32):  c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
//   ldmatrix x4: lanes 8i..8i+7 give the row addresses of matrix i; register i of lane l receives
//   row l/4, columns 2(l%4)..+1 of matrix i (.trans: rows 2(l%4)..+1 of column l/4).
// A C fragment pair of n-tiles (2c, 2c+1) is exactly the A fragment of k-chunk c once packed to bf16:
// {C[2c].c01, C[2c].c23, C[2c+1].c01, C[2c+1].c23} (used for P V, dS K, P^T dO, dS^T Q).
//
// Online softmax (forward, `online_softmax`): scores stay in raw units; the running row max mx is
// raw, and p = 2^(S * s*log2(e) - mx * s*log2(e)) with the scale folded into one FFMA. The max is
// updated lazily (only when a tile's max exceeds it by more than 2^8 in p), which saves rescaling the
// accumulator on most tiles. A row may see no key of a given tile (and, before its first visible
// tile, have mx = -inf): the subtracted max is then taken as 0, so exp2(-inf - 0) = 0 instead of
// NaN, and the correction factor exp2(-inf) = 0 clears nothing that was not already 0. Every row
// sees N >= 1 keys overall, so its final l > 0.
//   O = acc / l,  lse = mx * s + ln(l).
//
// Backward is deterministic (every family; the experimental fused dK/dV kernel excepted, whose dQ
// is summed by float reductions: fused_dq_notes): no float atomics. dQ (row-owned) and dK/dV
// (key-owned) come from two kernels, each owning its outputs and accumulating them in a fixed
// order in registers. The cost is recomputing S = Q K^T and dP = dO V^T in both kernels: 7 GEMMs
// of the (row, key) size instead of 5, about 40% more tensor-core work than an atomic dQ, in
// exchange for bitwise-reproducible gradients, no f32 dQ scratch and no extra conversion pass.
//
// For head_dim 64, one exp2 (MUFU, 16 per clock per SM) goes with only 256 tensor FLOPs per pair,
// so the exponentials and the instruction issue, not the tensor cores, bound the mma.sync
// forward; the wgmma kernels overlap the one with the other. Where the time goes now, kernel by
// kernel, is in BENCHMARKS.md (the latest runs' profiles).
//
// The launcher must enforce: head_dim == 64; 0 < C < N (and N < 2^28); base pointers 16-byte aligned;
// all strides multiples of 8 elements (16-byte cp.async and vector accesses); row strides < 2^31 (the
// loads take them as 32-bit); B <= 65535 (grid.z), H <= 65535 (grid.y); lse and delta hold B*H*Lq
// floats; launch order fwd, then bwd_dq, then bwd_dkdv (or the fused dK/dV kernel alone), on one stream. scale is used as given (1/8 for
// MaPeT); any positive value works.

#include <cuda_bf16.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "hopper.cuh"
#include "params.h"

// Launch constants, restated by the launcher.
#define MAPET_ATTN_HEAD_DIM 64      // the only head size the kernels support
#define MAPET_ATTN_THREADS 128      // block size of the tiled kernels (4 warps)
#define MAPET_ATTN_BLOCK_M 64       // query rows per CTA (fwd, bwd_dq) = per inner tile (bwd_dkdv)
#define MAPET_ATTN_BLOCK_N 64       // keys per inner tile (fwd, bwd_dq) = per CTA (bwd_dkdv)
#define MAPET_ATTN_DYNAMIC_SMEM 0   // dynamic shared bytes of the tiled kernels (static shared memory)
#define MAPET_ATTN_RES_THREADS 256  // block size of the K/V-resident kernels (8 warps)
#define MAPET_ATTN_RES_DKDV_THREADS 384  // block size of the Q/dO-resident dK/dV kernel (12 warps)
#define MAPET_ATTN_WG_THREADS 256  // block size of the wgmma forward (2 warpgroups)
#define MAPET_ATTN_WGP_THREADS 512  // block size of the persistent wgmma forward (4 warpgroups)
#define MAPET_ATTN_WG_DQ_THREADS 256    // block size of the wgmma dQ kernel (2 warpgroups)
#define MAPET_ATTN_WG_DKDV_THREADS 384  // block size of the wgmma dK/dV kernel (3 warpgroups)

namespace {

typedef __nv_bfloat16 bf16;

constexpr int kD = MAPET_ATTN_HEAD_DIM;
constexpr int kThreads = MAPET_ATTN_THREADS;
constexpr int kBM = MAPET_ATTN_BLOCK_M;
constexpr int kBN = MAPET_ATTN_BLOCK_N;
constexpr int kHalf = 32;                     // warp sub-tile: 32 keys (fwd, bwd_dq) / 32 query rows (bwd_dkdv)
constexpr int kHalfTiles = kHalf / 8;         // 8-wide n-tiles of an MMA in one half
constexpr int kLds = kD + 8;                  // padded shared row, bf16 elements (144 B)
constexpr int kTileElems = 64 * kLds;         // one [64 x 72] bf16 tile
constexpr uint32_t kTileBytes = kTileElems * 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kResDkdvThreads = MAPET_ATTN_RES_DKDV_THREADS;
constexpr int kResDkdvWarps = kResDkdvThreads / 32;
static_assert(kResDkdvThreads == 3 * kThreads, "the resident dK/dV kernel loads Q, dO and the row data with a third each");
constexpr int kResThreads = MAPET_ATTN_RES_THREADS;
constexpr int kResWarps = kResThreads / 32;
static_assert(kResThreads == 2 * kThreads, "the resident kernels load K with one half of the block, V with the other");
static_assert(kBM == 64 && kBN == 64 && kThreads == 128,
              "the index maths below assumes 4 warps x 16 rows, 64-wide tiles");

// ---------------------------------------------------------------------------------- PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with pred false nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

// 4-byte variant (lse/delta rows, which need not be 16-byte aligned); zero-fills when pred is false.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
    const int n = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// d += a * b for one 16x8x16 tile (A row-major 16x16 bf16, B column-major 16x8 bf16, f32 accumulate).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with the hardware approximation (2 ulp, flushes denormals; 2^-inf = +0, which masking relies on).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats -> packed bf16x2, `lo` in the low half (the lower column of an mma fragment pair).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------- fragment addressing
// ldmatrix row addresses = tile base + lane part (computed once per kernel) + tile_off(r0, c0) of the
// 16x16 block (a compile-time constant, folded into the instruction's immediate offset).

// Byte offset of element (r, c) of a padded [64 x 72] tile.
__host__ __device__ constexpr uint32_t tile_off(int r, int c) { return static_cast<uint32_t>((r * kLds + c) * 2); }

// A operand from a row-major tile (rows = M, columns = K), no transpose: lanes 8i..8i+7 address matrix
// i = (rows + 8 (i & 1), columns + 8 (i >> 1)), so register i is A reg i: (g, 2t..), (g+8, 2t..),
// (g, 2t+8..), (g+8, 2t+8..).
// The same addresses serve the B operand of X * T with T row-major (rows = K, columns = N) read with
// .trans: matrix i is then (K rows + 8 (i & 1), N columns + 8 (i >> 1)), lane l receives
// T[2(l%4)..+1 + 8 (i & 1)][l/4 + 8 (i >> 1)] = B(k = 2t.. (+8), n = g) of n-tile i >> 1: registers
// {0, 1} = {b0, b1} of the first n-tile, {2, 3} of the second.
__device__ __forceinline__ uint32_t lane_off_a(int lane) { return tile_off(lane & 15, (lane >> 4) * 8); }

// B operand of X * T^T with T row-major (rows = N, columns = K), no transpose: matrix i = (N rows +
// 8 (i >> 1), K columns + 8 (i & 1)); lane l receives T[l/4][2(l%4)..+1] of it = B(k = 2t.., n = g).
// Registers {0, 1} = {b0, b1} of n-tile rows [0, 8), {2, 3} of n-tile rows [8, 16).
__device__ __forceinline__ uint32_t lane_off_bt(int lane) {
    return tile_off((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
}

// ---------------------------------------------------------------------------------- visibility

struct Geometry {
    int n;   // N tokens
    int c;   // C context tokens
    int p;   // P = N - C predicted tokens = length of every row's hidden key window
    int lq;  // N + 2P query rows
    int lk;  // N + P keys
};

__device__ __forceinline__ Geometry geometry_of(const MapetAttention& prm) {
    Geometry g;
    g.n = prm.n_tokens;
    g.c = prm.n_context;
    g.p = prm.n_tokens - prm.n_context;
    g.lq = g.n + 2 * g.p;
    g.lk = g.n + g.p;
    return g;
}

// First hidden key a of query row `row` (0 <= row < Lq): the row sees keys [0, a) and [a + P, Lk).
__device__ __forceinline__ int first_hidden(int row, const Geometry& G) {
    if (row < G.n) return max(G.c, row + 1);  // content: context keys and content keys of rank <= r
    if (row < G.n + G.p) return G.c;          // mask token in h: context content keys, all mask keys
    return row - G.n - G.p + G.c;             // query stream: rank r = C + (row - N - P), sees ranks < r
}

// Extrema of first_hidden over rows [r0, r1), r0 < r1 <= Lq. first_hidden is non-decreasing on each
// segment, so the minimum is at the start and the maximum at the end of one of the <= 3 pieces.
__device__ __forceinline__ void hidden_extrema(int r0, int r1, const Geometry& G, int& amin, int& amax) {
    amin = 0x7fffffff;
    amax = -0x7fffffff;
    const int lo[3] = {r0, max(r0, G.n), max(r0, G.n + G.p)};
    const int hi[3] = {min(r1, G.n), min(r1, G.n + G.p), r1};
#pragma unroll
    for (int s = 0; s < 3; ++s) {
        if (lo[s] < hi[s]) {
            amin = min(amin, first_hidden(lo[s], G));
            amax = max(amax, first_hidden(hi[s] - 1, G));
        }
    }
}

enum TileKind { kEmpty = 0, kFull = 1, kPartial = 2 };

// Class of the (rows, keys [k0, k1)) block for rows with first-hidden extrema amin, amax (see the
// opening comment). rows_complete: no row of the block is >= Lq (only the dK/dV kernel cares, since
// there a phantom row would add to real keys' gradients).
__device__ __forceinline__ int classify(int amin, int amax, int k0, int k1, bool rows_complete, const Geometry& G) {
    if (k0 >= G.lk) return kEmpty;
    if (k0 >= amax && min(k1, G.lk) <= amin + G.p) return kEmpty;
    if ((k1 <= amin || k0 >= amax + G.p) && k1 <= G.lk && rows_complete) return kFull;
    return kPartial;
}

// Is key `key` inside the hidden window [a, a + w)? One subtraction and one unsigned compare, no
// branch: below a, the difference wraps to a large unsigned value.
__device__ __forceinline__ bool in_window(int key, int a, int w) {
    return static_cast<unsigned>(key - a) < static_cast<unsigned>(w);
}

// Sets the hidden scores of a 32-key half (kHalfTiles 8-key n-tiles) of a warp's S fragment to -inf.
// s[j][e] is the score of row g (e < 2) or g+8 and key kb + x0 + 8j + (e & 1), kb = k0 + 2t the
// lane's first key in the tile; rel_lo/rel_hi = a(row) - kb for the two rows, lk_rel = Lk - kb. The
// offsets x are compile-time, so an element costs one add, one compare and one select. kTail: the run
// may reach Lk (the last tile), whose missing keys are hidden too.
template <bool kTail>
__device__ __forceinline__ void mask_half(float (&s)[kHalfTiles][4], int x0, int rel_lo, int rel_hi, int lk_rel,
                                          int p) {
#pragma unroll
    for (int j = 0; j < kHalfTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int x = x0 + 8 * j + (e & 1);
            bool hid = in_window(x, e < 2 ? rel_lo : rel_hi, p);
            if (kTail) hid |= x >= lk_rel;
            s[j][e] = hid ? -INFINITY : s[j][e];
        }
    }
}

// The narrowest hidden window for which mask_half_one_edge holds: one less than the span of a
// half's offsets x (x0 + 8j + (e & 1), j < kHalfTiles: x0 to x0 + 25), 25 keys. Every ViT
// (P = N - C = 147) and the wgmma forward's absent chunk (a window of 32) are wider.
constexpr int kOneEdgeMinWindow = 8 * (kHalfTiles - 1) + 1;

// A row's hidden window within a half, as one compare: with a window [rel, rel + p) at least
// kOneEdgeMinWindow wide, no half holds both of its edges (both would need x0 < rel and
// rel + p <= x0 + 25, so p <= 24). So if it starts inside the half (rel > x0), the keys from rel on are
// hidden; else those below its end rel + p (none when rel + p <= x0, all when rel + p > x0 + 25).
// hidden(x) = (x >= thr) != below. Transcribed into src/ops/attention.rs and checked there against
// in_window for every offset and window.
struct OneEdge {
    int thr;
    bool below;
};

__device__ __forceinline__ OneEdge one_edge(int rel, int x0, int p) {
    const bool below = rel <= x0;
    return OneEdge{below ? rel + p : rel, below};
}

// mask_half for a window at least kOneEdgeMinWindow wide (p >= kOneEdgeMinWindow): the same
// scores hidden, for one compare and one select an element (a second compare in the last tile),
// against mask_half's add, compare and select; the edge is found once a row and half.
template <bool kTail>
__device__ __forceinline__ void mask_half_one_edge(float (&s)[kHalfTiles][4], int x0, int rel_lo, int rel_hi,
                                                   int lk_rel, int p) {
    const OneEdge lo = one_edge(rel_lo, x0, p), hi = one_edge(rel_hi, x0, p);
#pragma unroll
    for (int j = 0; j < kHalfTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int x = x0 + 8 * j + (e & 1);
            const OneEdge& w = e < 2 ? lo : hi;
            bool hid = (x >= w.thr) != w.below;
            if (kTail) hid |= x >= lk_rel;
            s[j][e] = hid ? -INFINITY : s[j][e];
        }
    }
}

// Applies a run's class to its scores (warp-uniform branches): PARTIAL -> per-element mask, FULL ->
// nothing. EMPTY runs are never computed. Windows of at least kOneEdgeMinWindow keys (every ViT)
// take mask_half_one_edge; narrower ones (small shapes) mask_half, with keys past Lk tested
// whether or not the run reaches them (lk_rel then lies past the run), to keep one copy of it.
// kOneEdge = false keeps mask_half for every window (the mma.sync dQ kernels: the edges' two
// registers a row made the resident one spill 8 bytes on sm_80).
template <bool kOneEdge = true>
__device__ __forceinline__ void mask_scores(float (&s)[kHalfTiles][4], int kind, bool tail, int x0, int rel_lo,
                                            int rel_hi, int lk_rel, int p) {
    if (kind != kPartial) return;
    if (!kOneEdge || p < kOneEdgeMinWindow)
        mask_half<true>(s, x0, rel_lo, rel_hi, lk_rel, p);
    else if (tail)
        mask_half_one_edge<true>(s, x0, rel_lo, rel_hi, lk_rel, p);
    else
        mask_half_one_edge<false>(s, x0, rel_lo, rel_hi, lk_rel, p);
}

// ---------------------------------------------------------------------------------- tile movement

// Starts copying rows [row0, row0 + 64) x 64 columns of a bf16 matrix (row r at src + r * stride) into
// a padded shared tile at dst. Rows >= row_end (>= 1) are zero-filled. Thread tid moves the 16-byte
// chunk tid % 8 of rows tid / 8 + 16i: 8 consecutive threads cover one 128-byte row (coalesced reads,
// conflict-free shared writes). The stride is 32-bit (the launcher checks) so that each address is one
// widening multiply-add.
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* src, int stride, int row0, int row_end, int tid) {
    const int r = tid >> 3, ch = (tid & 7) * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + r + 16 * i;
        // A row past the end is clamped to a real one: the address stays valid, and src-size 0 reads
        // nothing from it.
        const bf16* gp = src + static_cast<int64_t>(min(row, row_end - 1)) * stride + ch;
        cp_async16(dst + tile_off(r + 16 * i, ch), gp, row < row_end);
    }
}

// Writes one warp's 16 x 64 f32 accumulator (C fragments acc[n-tile][4]) as bf16 rows
// [row0, row0 + 16) of a global matrix (row r at dst + r * stride), rows >= row_end skipped.
// Row g is multiplied by mul_lo, row g+8 by mul_hi. Goes through the warp's own 16 rows of a padded
// shared tile `stage` so that global stores are 16-byte and coalesced; the fragment writes (4 bytes,
// word 36*row + 4j + t) hit 32 distinct banks.
__device__ __forceinline__ void store_warp_rows(const float (&acc)[8][4], float mul_lo, float mul_hi, bf16* stage,
                                                bf16* dst, int64_t stride, int row0, int row_end, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        *reinterpret_cast<uint32_t*>(stage + g * kLds + 8 * j + 2 * t) =
            pack_bf16(acc[j][0] * mul_lo, acc[j][1] * mul_lo);
        *reinterpret_cast<uint32_t*>(stage + (g + 8) * kLds + 8 * j + 2 * t) =
            pack_bf16(acc[j][2] * mul_hi, acc[j][3] * mul_hi);
    }
    __syncwarp();  // the rows were written by other lanes of this warp
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = lane + 32 * i;
        const int r = idx >> 3, ch = idx & 7;
        if (row0 + r < row_end) {
            *reinterpret_cast<uint4*>(dst + (row0 + r) * stride + ch * 8) =
                *reinterpret_cast<const uint4*>(stage + r * kLds + ch * 8);
        }
    }
}

// Dot product of 16 bf16 pairs held as two uint4 each (delta = rowsum(dO * O), f32 from bf16 values).
__device__ __forceinline__ float dot16_bf16(const uint4 (&x)[2], const uint4 (&y)[2]) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const __nv_bfloat162* a = reinterpret_cast<const __nv_bfloat162*>(&x[i]);
        const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&y[i]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 fa = __bfloat1622float2(a[k]);
            const float2 fb = __bfloat1622float2(b[k]);
            s = fmaf(fa.x, fb.x, s);
            s = fmaf(fa.y, fb.y, s);
        }
    }
    return s;
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return v;
}

// The forwards' finish of a lane's two rows: l summed over the row's quad, and 1 / l for O.
__device__ __forceinline__ void finish_row_sums(float (&l)[2], float (&inv)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] = quad_sum(l[i]);
        inv[i] = 1.f / l[i];
    }
}

// The forwards' lse of rows r_lo and r_hi (those below Lq) of pair (b, head), mx * scale + ln l,
// stored by lane t == 0 of the quad.
__device__ __forceinline__ void store_row_lse(const MapetAttention& prm, int lq, int b, int head, int r_lo, int r_hi,
                                              const float (&mx)[2], const float (&l)[2], int t) {
    if (t == 0) {
        float* lse = prm.lse + (static_cast<int64_t>(b) * prm.heads + head) * lq;
        if (r_lo < lq) lse[r_lo] = mx[0] * prm.scale + logf(l[0]);
        if (r_hi < lq) lse[r_hi] = mx[1] * prm.scale + logf(l[1]);
    }
}

// How far (in log2 units of scaled scores) a row's tile max may exceed its running max before the
// forward rescales: see online_softmax.
constexpr float kLazyRescale = 8.f;

// One online-softmax step of the forward for the rows g, g+8 of one m-tile over one 64-key tile:
// s = its raw scores (-inf where hidden), [half][n-tile][element], overwritten by p; mx = the rows'
// running raw max, l = this lane's running exp sum, acc = the O accumulator (C fragments).
//
// Lazy rescaling: the running max moves only when some row of the warp finds a tile max more than
// kLazyRescale above it. Otherwise p is taken against the stale max (so p <= 2^8: harmless in f32
// and in bf16, which keeps 8 exponent bits) and acc and l need no rescaling; 32 multiplies a lane
// saved on most tiles. The function is unchanged, since O = acc / l and lse = mx * s + ln l share
// one base whatever it is. The rounding is not quite: P goes to bf16 for P V while l sums it in
// f32, and against the true max the largest p is exactly 1 (no rounding), against a stale one it is
// not; on a sharply peaked row that adds up to about one bf16 ulp of O. kLazyRescale = 0 gives the
// strict update back, bit for bit (a tile that raises no row's max then rescales by exactly 1). The decision is warp-uniform (__any_sync), so the branch never diverges.
// Infinities: a row whose max is still -inf either stays so (no visible key yet: (-inf) - (-inf) is
// NaN, which compares false) or grows (any finite score against -inf); the subtracted base of a row
// at -inf is 0, so exp2(-inf - 0) = 0 instead of NaN, and its correction factor exp2(-inf) = 0
// clears nothing that was not already 0.
// One online-softmax step without the accumulator: the tile's row max, the lazy decision, p in
// place of s, l updated; where the max moves, on_grow(i, corr) is called for row i (0: g, 1: g+8)
// just before l is rescaled, for the caller to rescale (or note) the accumulator's row.
// kQuadMaxOnGrow (the wgmma forward): the lazy decision is taken on each lane's own part of the
// rows' tile max, and the quad's shuffles that complete it run only where the max moves. The same
// decision: mx is the same in the 4 lanes of a row, so some lane's part exceeds it by more than
// kLazyRescale exactly when the row's max does (x -> (x - mx) * sl2 is monotone). So the same
// bits, without 4 shuffles, 4 max and the shuffles' latency ahead of the exponentials on the
// tiles that keep the max, most of them.
template <bool kQuadMaxOnGrow = false, typename OnGrow>
__device__ __forceinline__ void softmax_tile(float (&s)[2][4][4], float (&mx)[2], float (&l)[2], float sl2,
                                             OnGrow on_grow) {
    float tmax[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        // The lane's 16 scores of row i by a tree of maxima, 4 deep rather than a chain 9 deep
        // (the exponentials wait for it). The same value: the maximum is exact in any order, and
        // fmaxf ignores a NaN in any order too; the last step against -inf keeps a row of 16
        // NaNs at -inf, as the chain from -inf did.
        float m[8];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 4; ++j) m[4 * h + j] = fmaxf(s[h][j][2 * i], s[h][j][2 * i + 1]);
#pragma unroll
        for (int w = 4; w >= 1; w /= 2)
#pragma unroll
            for (int k = 0; k < w; ++k) m[k] = fmaxf(m[k], m[k + w]);
        tmax[i] = fmaxf(-INFINITY, m[0]);
        if (!kQuadMaxOnGrow) tmax[i] = quad_max(tmax[i]);
    }
    const bool grow = __any_sync(0xffffffffu, (tmax[0] - mx[0]) * sl2 > kLazyRescale ||
                                                  (tmax[1] - mx[1]) * sl2 > kLazyRescale);
    if (kQuadMaxOnGrow && grow) {
        tmax[0] = quad_max(tmax[0]);
        tmax[1] = quad_max(tmax[1]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float corr = 1.f;
        if (grow) {
            const float mnew = fmaxf(mx[i], tmax[i]);
            corr = fast_exp2(mx[i] * sl2 - (mnew == -INFINITY ? 0.f : mnew * sl2));
            mx[i] = mnew;
        }
        const float base = mx[i] == -INFINITY ? 0.f : mx[i] * sl2;
        // The row's sum starts at its first pair of exponentials, not at 0 + it: the same bits
        // (p >= 0, so no -0 is lost), an add fewer a row (ptxas keeps a 0 + x).
        float rs;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                s[h][j][2 * i] = fast_exp2(fmaf(s[h][j][2 * i], sl2, -base));
                s[h][j][2 * i + 1] = fast_exp2(fmaf(s[h][j][2 * i + 1], sl2, -base));
                const float pair = s[h][j][2 * i] + s[h][j][2 * i + 1];
                rs = h == 0 && j == 0 ? pair : rs + pair;
            }
        }
        if (grow) {
            on_grow(i, corr);
            l[i] *= corr;
        }
        l[i] += rs;
    }
}

// The mma.sync kernels' step: the accumulator's rows rescaled where the max moves.
__device__ __forceinline__ void online_softmax(float (&s)[2][4][4], float (&mx)[2], float (&l)[2],
                                               float (&acc)[8][4], float sl2) {
    softmax_tile(s, mx, l, sl2, [&acc](int i, float corr) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc[j][2 * i] *= corr;
            acc[j][2 * i + 1] *= corr;
        }
    });
}

// Next key tile at or after kt that is not EMPTY for query rows with extrema amin, amax (CTA level).
__device__ __forceinline__ int next_key_tile(int kt, int nkt, int amin, int amax, const Geometry& G) {
    while (kt < nkt && classify(amin, amax, kt * kBN, kt * kBN + kBN, true, G) == kEmpty) ++kt;
    return kt;
}

// Next query tile at or after qt that has a visible pair with keys [k0, k0 + 64) (CTA level).
__device__ __forceinline__ int next_query_tile(int qt, int nqt, int k0, const Geometry& G) {
    for (; qt < nqt; ++qt) {
        int amin, amax;
        hidden_extrema(qt * kBM, min(qt * kBM + kBM, G.lq), G, amin, amax);
        if (classify(amin, amax, k0, k0 + kBN, true, G) != kEmpty) break;
    }
    return qt;
}

// The rows one warp owns in the row-owning kernels (forward, dQ): rows [wr0, wr0 + 16), of which
// the lane holds g and g + 8.
struct WarpRows {
    bool live;        // some row is < Lq (a warp entirely past Lq computes nothing)
    int amin, amax;   // first-hidden extrema of the warp's rows below Lq
    int a_lo, a_hi;   // first hidden key of rows g and g + 8 (rows past Lq borrow row Lq-1's)
};

__device__ __forceinline__ WarpRows warp_rows(int wr0, int g, const Geometry& G) {
    WarpRows w;
    w.live = wr0 < G.lq;
    w.amin = 0;
    w.amax = 0;
    if (w.live) hidden_extrema(wr0, min(wr0 + 16, G.lq), G, w.amin, w.amax);
    w.a_lo = first_hidden(min(wr0 + g, G.lq - 1), G);
    w.a_hi = first_hidden(min(wr0 + g + 8, G.lq - 1), G);
    return w;
}

// The forward's work on one 64-key tile (keys [k0, k0 + 64)) for one warp's 16 rows: S = Q K^T over
// the tile's halves the rows can see, hidden scores masked, one online-softmax step, O += P V.
// ks = the K tile's shared address + lane_bt (K as the B operand of Q K^T, keys = n); vs = the V
// tile's + lane_a (V as the B operand of P V, keys = k, .trans); both padded [64 x 72] tiles.
// Shared by both forward kernels.
__device__ __forceinline__ void fwd_tile(const uint32_t (&qf)[4][4], uint32_t ks, uint32_t vs, int k0,
                                         const WarpRows& w, int t, const Geometry& G, float sl2, float (&mx)[2],
                                         float (&l)[2], float (&acc)[8][4]) {
    // Classified per 32-key half for the warp's rows: a half the rows cannot see costs no mma
    // (its scores stay -inf, so it adds nothing to the softmax either).
    int kind[2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
        kind[h] = w.live ? classify(w.amin, w.amax, k0 + h * kHalf, k0 + h * kHalf + kHalf, true, G) : kEmpty;
    if (kind[0] == kEmpty && kind[1] == kEmpty) return;
    // S = Q K^T for the warp's 16 rows x 64 keys: s[h][j] = C fragment of keys
    // k0 + 32h + [8j, 8j+8). Lane holds s[h][j][0..1] = (row g, keys k0 + 32h + 8j + 2t + {0,1}),
    // s[h][j][2..3] = the same keys for row g+8.
    float s[2][4][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (kind[h] == kEmpty) {
#pragma unroll
            for (int j = 0; j < 4; ++j) s[h][j][0] = s[h][j][1] = s[h][j][2] = s[h][j][3] = -INFINITY;
            continue;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) s[h][j][0] = s[h][j][1] = s[h][j][2] = s[h][j][3] = 0.f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                uint32_t kb[4];  // b0, b1 of key n-tiles 2jp, 2jp+1 of the half, head columns [16c, 16c+16)
                ldmatrix_x4(kb, ks + tile_off(h * kHalf + jp * 16, c * 16));
                mma_bf16(s[h][2 * jp], qf[c], kb[0], kb[1]);
                mma_bf16(s[h][2 * jp + 1], qf[c], kb[2], kb[3]);
            }
        }
    }
    const int kb0 = k0 + 2 * t;          // the lane's first key in the tile
    const bool tail = k0 + kBN > G.lk;  // the tile reaches past the last key
#pragma unroll
    for (int h = 0; h < 2; ++h) mask_scores(s[h], kind[h], tail, h * kHalf, w.a_lo - kb0, w.a_hi - kb0, G.lk - kb0, G.p);

    // Online softmax, rows g (i = 0: elements 0, 1) and g+8 (i = 1: elements 2, 3). The four
    // lanes of a quad hold one row between them, so max and sum are quad reductions.
    online_softmax(s, mx, l, acc, sl2);
    // O += P V. The P C-fragments of n-tiles 2c, 2c+1 of a half repack into the A fragment of the
    // half's key chunk c (keys k0 + 32h + [16c, 16c+16)):
    // {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (kind[h] == kEmpty) continue;  // P = 0 there
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            uint32_t pa[4];
            pa[0] = pack_bf16(s[h][2 * c][0], s[h][2 * c][1]);
            pa[1] = pack_bf16(s[h][2 * c][2], s[h][2 * c][3]);
            pa[2] = pack_bf16(s[h][2 * c + 1][0], s[h][2 * c + 1][1]);
            pa[3] = pack_bf16(s[h][2 * c + 1][2], s[h][2 * c + 1][3]);
#pragma unroll
            for (int dp = 0; dp < 4; ++dp) {
                uint32_t vb[4];  // b0, b1 of output n-tiles 2dp, 2dp+1 over the chunk's 16 keys
                ldmatrix_x4_trans(vb, vs + tile_off(h * kHalf + c * 16, dp * 16));
                mma_bf16(acc[2 * dp], pa, vb[0], vb[1]);
                mma_bf16(acc[2 * dp + 1], pa, vb[2], vb[3]);
            }
        }
    }
}

// What the dQ kernels keep per lane for its rows g, g + 8: lse in log2 units and delta.
struct RowStats {
    float lse2_lo, lse2_hi;
    float delta_lo, delta_hi;
};

// The dQ kernels' work on one 64-key tile (keys [k0, k0 + 64)) for one warp's 16 rows: per 32-key
// half the rows can see, S = Q K^T and dP = dO V^T, P = exp(S * scale - lse), dS = P (dP - delta),
// dQ += dS K. k_tile, v_tile = the shared addresses of the padded K and V tiles. Shared by both dQ
// kernels.
__device__ __forceinline__ void dq_tile(const uint32_t (&qf)[4][4], const uint32_t (&df)[4][4], uint32_t k_tile,
                                        uint32_t v_tile, uint32_t lane_a, uint32_t lane_bt, int k0, const WarpRows& w,
                                        const RowStats& rs, int t, const Geometry& G, float sl2, float (&dq)[8][4]) {
    const int kb0 = k0 + 2 * t;
    const bool tail = k0 + kBN > G.lk;
    const uint32_t ks = k_tile + lane_bt;  // K as the B operand of Q K^T (keys = n)
    const uint32_t vs = v_tile + lane_bt;  // V as the B operand of dO V^T (keys = n)
    const uint32_t kts = k_tile + lane_a;  // K as the B operand of dS K (keys = k), .trans
    // The 64 keys go in two halves of 32 (kHalf): S and dP of one half are 32 registers instead of
    // 64, which keeps the kernel at <= 128 registers (4 CTAs per SM instead of 3), and a half that
    // the warp's rows cannot see is skipped.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int kh0 = k0 + h * kHalf;  // first key of the half
        const int kind = w.live ? classify(w.amin, w.amax, kh0, kh0 + kHalf, true, G) : kEmpty;
        if (kind == kEmpty) continue;
        // S = Q K^T and dP = dO V^T, 16 rows x 32 keys; [j] = C fragment of keys k0 + 32h + [8j, 8j+8).
        // Element e: row g (e < 2) or g+8, key k0 + 32h + 8j + 2t + (e & 1).
        float s[4][4], dp[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                uint32_t kb[4], vb[4];  // key n-tiles 2jp, 2jp+1 of the half over head columns [16c, 16c+16)
                ldmatrix_x4(kb, ks + tile_off(h * kHalf + jp * 16, c * 16));
                ldmatrix_x4(vb, vs + tile_off(h * kHalf + jp * 16, c * 16));
                mma_bf16(s[2 * jp], qf[c], kb[0], kb[1]);
                mma_bf16(s[2 * jp + 1], qf[c], kb[2], kb[3]);
                mma_bf16(dp[2 * jp], df[c], vb[0], vb[1]);
                mma_bf16(dp[2 * jp + 1], df[c], vb[2], vb[3]);
            }
        }
        // Hidden scores -> -inf, so that P = exp2(-inf) = 0 exactly.
        mask_scores<false>(s, kind, tail, h * kHalf, w.a_lo - kb0, w.a_hi - kb0, G.lk - kb0, G.p);
        // P = exp(S * scale - lse), dS = P (dP - delta), kept in s.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pv = fast_exp2(fmaf(s[j][e], sl2, -(e < 2 ? rs.lse2_lo : rs.lse2_hi)));
                s[j][e] = pv * (dp[j][e] - (e < 2 ? rs.delta_lo : rs.delta_hi));
            }
        }
        // dQ += dS K: dS C-fragments of n-tiles 2c, 2c+1 -> A fragment of the half's key chunk c
        // (keys k0 + 32h + [16c, 16c+16)); B from K[key][d] with .trans (reduction over the stored rows).
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            uint32_t da[4];
            da[0] = pack_bf16(s[2 * c][0], s[2 * c][1]);
            da[1] = pack_bf16(s[2 * c][2], s[2 * c][3]);
            da[2] = pack_bf16(s[2 * c + 1][0], s[2 * c + 1][1]);
            da[3] = pack_bf16(s[2 * c + 1][2], s[2 * c + 1][3]);
#pragma unroll
            for (int dn = 0; dn < 4; ++dn) {
                uint32_t kb[4];  // b0, b1 of head n-tiles 2dn, 2dn+1 over the chunk's 16 keys
                ldmatrix_x4_trans(kb, kts + tile_off(h * kHalf + c * 16, dn * 16));
                mma_bf16(dq[2 * dn], da, kb[0], kb[1]);
                mma_bf16(dq[2 * dn + 1], da, kb[2], kb[3]);
            }
        }
    }
}

// The dK/dV kernels' work on one 64-row query tile (rows [q0, q0 + 64)) for one warp's 16 keys
// [kw0, kw0 + 16): per 32-row half that can see the keys, S^T = K Q^T and dP^T = V dO^T, P^T, dS^T,
// then dV += P^T dO and dK += dS^T Q. q_tile, do_tile = the shared addresses of the padded Q and dO
// tiles; lse_t, delta_t, win_t = the tile's 64 rows' lse, delta and hidden window in shared memory.
// Shared by both dK/dV kernels.
__device__ __forceinline__ void dkdv_tile(const uint32_t (&kf)[4][4], const uint32_t (&vf)[4][4], uint32_t q_tile,
                                          uint32_t do_tile, uint32_t lane_a, uint32_t lane_bt, const float* lse_t,
                                          const float* delta_t, const int2* win_t, int q0, int kw0, int t,
                                          const Geometry& G, float sl2, float (&dk)[8][4], float (&dv)[8][4]) {
    const int g = (threadIdx.x & 31) >> 2;
    const int key_lo = kw0 + g, key_hi = kw0 + g + 8;  // the lane's two keys (rows of every C fragment)
    const uint32_t qs = q_tile + lane_bt;    // Q as the B operand of K Q^T (rows = n)
    const uint32_t ds = do_tile + lane_bt;   // dO as the B operand of V dO^T (rows = n)
    const uint32_t qts = q_tile + lane_a;    // Q as the B operand of dS^T Q (rows = k), .trans
    const uint32_t dts = do_tile + lane_a;   // dO as the B operand of P^T dO (rows = k), .trans
    // The 64 query rows go in two halves of 32 (as in bwd_dq): half the S^T / dP^T registers, and
    // a half whose rows cannot see the warp's keys (or lie past Lq) is skipped.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int qh0 = q0 + h * kHalf;  // first query row of the half
        if (qh0 >= G.lq) continue;
        int amin, amax;
        hidden_extrema(qh0, min(qh0 + kHalf, G.lq), G, amin, amax);
        const int kind = classify(amin, amax, kw0, kw0 + 16, qh0 + kHalf <= G.lq, G);
        if (kind == kEmpty) continue;
        // S^T = K Q^T and dP^T = V dO^T, 16 keys x 32 query rows; [j] = C fragment of query rows
        // qh0 + [8j, 8j+8). Element e: key g (e < 2) or g+8, query row qh0 + 8j + 2t + (e & 1).
        float st[4][4], dpt[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
            dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            uint32_t ka[4], va[4];  // the warp's K and V fragments of head columns [16c, 16c+16)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                ka[e] = kf[c][e];
                va[e] = vf[c][e];
            }
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                uint32_t qb[4], db[4];  // query n-tiles 2jp, 2jp+1 of the half over head columns [16c, 16c+16)
                ldmatrix_x4(qb, qs + tile_off(h * kHalf + jp * 16, c * 16));
                ldmatrix_x4(db, ds + tile_off(h * kHalf + jp * 16, c * 16));
                mma_bf16(st[2 * jp], ka, qb[0], qb[1]);
                mma_bf16(st[2 * jp + 1], ka, qb[2], qb[3]);
                mma_bf16(dpt[2 * jp], va, db[0], db[1]);
                mma_bf16(dpt[2 * jp + 1], va, db[2], db[3]);
            }
        }
        // P^T = exp(S^T * scale - lse_col) (hidden -> -inf -> 0), dS^T = P^T (dP^T - delta_col). The
        // lane's columns 8j + 2t, +1 are adjacent: one 8-byte shared read each for lse and delta, one
        // 16-byte read for the two windows (the 8 lanes with the same t read the same words: broadcast).
        // Keys past Lk are not masked: their K, V rows are zero and their dK, dV rows are never
        // stored, and a row of A only reaches the same row of the product.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = h * kHalf + 8 * j + 2 * t;  // row within the stage's tile
            const float2 ls = *reinterpret_cast<const float2*>(&lse_t[col]);
            const float2 dl = *reinterpret_cast<const float2*>(&delta_t[col]);
            if (kind == kPartial) {
                const int4 w = *reinterpret_cast<const int4*>(&win_t[col]);  // {a0, w0, a1, w1}
                if (in_window(key_lo, w.x, w.y)) st[j][0] = -INFINITY;
                if (in_window(key_lo, w.z, w.w)) st[j][1] = -INFINITY;
                if (in_window(key_hi, w.x, w.y)) st[j][2] = -INFINITY;
                if (in_window(key_hi, w.z, w.w)) st[j][3] = -INFINITY;
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int cc = e & 1;
                const float pv = fast_exp2(fmaf(st[j][e], sl2, -(cc ? ls.y : ls.x) * kLog2e));
                st[j][e] = pv;
                dpt[j][e] = pv * (dpt[j][e] - (cc ? dl.y : dl.x));
            }
        }
        // dV += P^T dO and dK += dS^T Q: the C fragments of n-tiles 2c, 2c+1 repack into the A
        // fragment of the half's query chunk c (rows qh0 + [16c, 16c+16)); B from dO[row][d] and
        // Q[row][d] with .trans (reduction over the stored rows).
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            uint32_t pa[4], da[4];
            pa[0] = pack_bf16(st[2 * c][0], st[2 * c][1]);
            pa[1] = pack_bf16(st[2 * c][2], st[2 * c][3]);
            pa[2] = pack_bf16(st[2 * c + 1][0], st[2 * c + 1][1]);
            pa[3] = pack_bf16(st[2 * c + 1][2], st[2 * c + 1][3]);
            da[0] = pack_bf16(dpt[2 * c][0], dpt[2 * c][1]);
            da[1] = pack_bf16(dpt[2 * c][2], dpt[2 * c][3]);
            da[2] = pack_bf16(dpt[2 * c + 1][0], dpt[2 * c + 1][1]);
            da[3] = pack_bf16(dpt[2 * c + 1][2], dpt[2 * c + 1][3]);
#pragma unroll
            for (int dn = 0; dn < 4; ++dn) {
                uint32_t db[4], qb[4];  // b0, b1 of head n-tiles 2dn, 2dn+1 over the chunk's 16 rows
                ldmatrix_x4_trans(db, dts + tile_off(h * kHalf + c * 16, dn * 16));
                ldmatrix_x4_trans(qb, qts + tile_off(h * kHalf + c * 16, dn * 16));
                mma_bf16(dv[2 * dn], pa, db[0], db[1]);
                mma_bf16(dv[2 * dn + 1], pa, db[2], db[3]);
                mma_bf16(dk[2 * dn], da, qb[0], qb[1]);
                mma_bf16(dk[2 * dn + 1], da, qb[2], qb[3]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------- K/V-resident kernels

// Loads all of the K and V of sample b, head `head` into shared memory at s0: nkt padded [64 x 72]
// tiles of K, then nkt of V (keys >= Lk zero-filled), and waits for them. Threads [0, 128) move K,
// threads [128, 256) V, each as load_tile does. Every thread of the block must call it (it ends on
// a barrier).
__device__ __forceinline__ void load_kv_resident(uint32_t s0, const MapetAttention& prm, int b, int head, int nkt,
                                                 const Geometry& G, int tid) {
    const bf16* kg = static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD;
    const bf16* vg = static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD;
    const bool is_v = tid >= kThreads;  // warps 4..7: uniform per warp
    const bf16* src = is_v ? vg : kg;
    const int stride = static_cast<int>(is_v ? prm.v_row_stride : prm.k_row_stride);
    const uint32_t dst = s0 + static_cast<uint32_t>(is_v ? nkt : 0) * kTileBytes;
    for (int kt = 0; kt < nkt; ++kt) load_tile(dst + kt * kTileBytes, src, stride, kt * kBN, G.lk, tid & (kThreads - 1));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
}

// blockIdx.z, blockIdx.y and the lane, read again from their special registers. asm volatile keeps the
// compiler from reusing the reads at the kernel's start: where they are needed only after a long loop,
// reading them again is cheaper than holding them (and what they derive) through it at 128 registers.
struct BlockIds {
    int b, head, lane;
};

__device__ __forceinline__ BlockIds block_ids_again() {
    unsigned b, head, lane;
    asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(b));
    asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(head));
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    return BlockIds{static_cast<int>(b), static_cast<int>(head), static_cast<int>(lane)};
}

// A fragments of rows r_lo = row0 + g and r_hi = row0 + g + 8 over all 64 columns, straight from global
// memory (4-byte loads; rows >= row_end read as zeros): frag[c] = {(r_lo, 16c+2t..), (r_hi, 16c+2t..),
// (r_lo, 16c+8+2t..), (r_hi, 16c+8+2t..)}, the registers ldmatrix_x4 gives from a row-major tile.
__device__ __forceinline__ void load_a_frags(uint32_t (&frag)[4][4], const bf16* src, int64_t stride, int r_lo,
                                             int r_hi, int row_end, int t) {
    const uint32_t* lo = reinterpret_cast<const uint32_t*>(src + static_cast<int64_t>(min(r_lo, row_end - 1)) * stride);
    const uint32_t* hi = reinterpret_cast<const uint32_t*>(src + static_cast<int64_t>(min(r_hi, row_end - 1)) * stride);
    const bool ok_lo = r_lo < row_end, ok_hi = r_hi < row_end;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        // Element 16c + 2t is 32-bit word 8c + t of the row.
        frag[c][0] = ok_lo ? __ldg(lo + 8 * c + t) : 0u;
        frag[c][1] = ok_hi ? __ldg(hi + 8 * c + t) : 0u;
        frag[c][2] = ok_lo ? __ldg(lo + 8 * c + 4 + t) : 0u;
        frag[c][3] = ok_hi ? __ldg(hi + 8 * c + 4 + t) : 0u;
    }
}

// Writes one warp's 16 x 64 f32 accumulator (C fragments acc[n-tile][4]) as bf16 straight from the
// fragments: row r_lo gets elements 0, 1 times mul_lo, row r_hi elements 2, 3 times mul_hi (4-byte
// stores; rows >= row_end skipped). The same values store_warp_rows writes.
__device__ __forceinline__ void store_frag_rows(const float (&acc)[8][4], float mul_lo, float mul_hi, bf16* dst,
                                                int64_t stride, int r_lo, int r_hi, int row_end, int t) {
    if (r_lo < row_end) {
        uint32_t* row = reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(r_lo) * stride);
#pragma unroll
        for (int j = 0; j < 8; ++j) row[4 * j + t] = pack_bf16(acc[j][0] * mul_lo, acc[j][1] * mul_lo);
    }
    if (r_hi < row_end) {
        uint32_t* row = reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(r_hi) * stride);
#pragma unroll
        for (int j = 0; j < 8; ++j) row[4 * j + t] = pack_bf16(acc[j][2] * mul_hi, acc[j][3] * mul_hi);
    }
}

// store_frag_rows's values in half as many stores, each a whole 32-byte sector of its row (the
// wgmma kernels' epilogues). In store_frag_rows a warp's store writes 16 bytes of each of 8 rows
// (lane t of a quad holds columns 8j + 2t, +1 of n-tile j), so the 16 stores a thread issues per
// tile queue up in the load/store unit: in the wgmma forward, the instructions after them waited
// there to reuse the stored registers (about 4% of its warp-stall samples, seventh run). Here the
// two lanes t, t ^ 1 of a quad trade one word per pair of n-tiles (2b, 2b + 1): the even lane
// keeps n-tile 2b and gets its partner's word of it, the odd lane keeps n-tile 2b + 1 and gets
// its partner's word of that. Each then holds 4 adjacent columns: the even lane columns
// 16b + 2t .. +3, the odd lane 16b + 2t + 6 .. +3, so a warp's store writes columns 16b .. 16b + 15
// (32 bytes) of each of its 8 rows. Every lane of the warp must call it (the shuffles); rows >=
// row_end are skipped after the shuffles.
__device__ __forceinline__ void store_frag_rows_paired(const float (&acc)[8][4], float mul_lo, float mul_hi, bf16* dst,
                                                       int64_t stride, int r_lo, int r_hi, int row_end, int t) {
    const bool odd = t & 1;
    uint2 lo[4], hi[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const uint32_t a_lo = pack_bf16(acc[2 * b][0] * mul_lo, acc[2 * b][1] * mul_lo);
        const uint32_t c_lo = pack_bf16(acc[2 * b + 1][0] * mul_lo, acc[2 * b + 1][1] * mul_lo);
        const uint32_t a_hi = pack_bf16(acc[2 * b][2] * mul_hi, acc[2 * b][3] * mul_hi);
        const uint32_t c_hi = pack_bf16(acc[2 * b + 1][2] * mul_hi, acc[2 * b + 1][3] * mul_hi);
        const uint32_t got_lo = __shfl_xor_sync(0xffffffffu, odd ? a_lo : c_lo, 1);
        const uint32_t got_hi = __shfl_xor_sync(0xffffffffu, odd ? a_hi : c_hi, 1);
        lo[b] = odd ? make_uint2(got_lo, c_lo) : make_uint2(a_lo, got_lo);
        hi[b] = odd ? make_uint2(got_hi, c_hi) : make_uint2(a_hi, got_hi);
    }
    // The lane's first column in each 16-column block (then 32 bytes a block: immediate offsets).
    bf16* const col = dst + 2 * t + (odd ? 6 : 0);
    if (r_lo < row_end) {
        uint2* row = reinterpret_cast<uint2*>(col + static_cast<int64_t>(r_lo) * stride);
#pragma unroll
        for (int b = 0; b < 4; ++b) row[4 * b] = lo[b];
    }
    if (r_hi < row_end) {
        uint2* row = reinterpret_cast<uint2*>(col + static_cast<int64_t>(r_hi) * stride);
#pragma unroll
        for (int b = 0; b < 4; ++b) row[4 * b] = hi[b];
    }
}

// The 16 bf16 columns [16t, 16t+16) of row `row` of a row-major bf16 matrix (row stride `stride`
// elements), zeros when !ok.
__device__ __forceinline__ void load_row_cols16(uint4 (&x)[2], const bf16* src, int64_t stride, int row, bool ok,
                                                int t) {
    x[0] = x[1] = make_uint4(0, 0, 0, 0);
    if (ok) {
        const uint4* p = reinterpret_cast<const uint4*>(src + row * stride + 16 * t);
        x[0] = __ldg(p);
        x[1] = __ldg(p + 1);
    }
}

// delta = rowsum(dO * O) of rows row_lo, row_hi (0 for a row that is not ok): lane t of the quad
// takes columns [16t, 16t+16) of both rows, and the quad sum finishes the dot products. (Its loads
// are load_row_cols16's, written out: built on it, the resident dQ kernel's SASS changed, and that
// kernel is kept as measured on a card, the control the wgmma kernels are timed against.)
__device__ __forceinline__ void row_deltas(const MapetAttention& prm, const bf16* og, const bf16* dog, int row_lo,
                                           int row_hi, bool ok_lo, bool ok_hi, int t, float& delta_lo, float& delta_hi) {
    uint4 o_lo[2], o_hi[2], d_lo[2], d_hi[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) o_lo[i] = o_hi[i] = d_lo[i] = d_hi[i] = make_uint4(0, 0, 0, 0);
    if (ok_lo) {
        const uint4* os = reinterpret_cast<const uint4*>(og + row_lo * prm.o_row_stride + 16 * t);
        const uint4* ds = reinterpret_cast<const uint4*>(dog + row_lo * prm.do_row_stride + 16 * t);
        o_lo[0] = __ldg(os);
        o_lo[1] = __ldg(os + 1);
        d_lo[0] = __ldg(ds);
        d_lo[1] = __ldg(ds + 1);
    }
    if (ok_hi) {
        const uint4* os = reinterpret_cast<const uint4*>(og + row_hi * prm.o_row_stride + 16 * t);
        const uint4* ds = reinterpret_cast<const uint4*>(dog + row_hi * prm.do_row_stride + 16 * t);
        o_hi[0] = __ldg(os);
        o_hi[1] = __ldg(os + 1);
        d_hi[0] = __ldg(ds);
        d_hi[1] = __ldg(ds + 1);
    }
    delta_lo = quad_sum(dot16_bf16(d_lo, o_lo));
    delta_hi = quad_sum(dot16_bf16(d_hi, o_hi));
}

}  // namespace
// ================================================================================================ forward
// o, lse from q, k, v. Shared: stage st holds the K tile at sK(st) and the V tile at sV(st); Q is first
// staged in stage 1's K slot, O in stage 0's K slot at the end.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_THREADS, 4) mapet_attention_fwd(const MapetAttention prm) {
    dependent_launch_start();
    __shared__ __align__(128) bf16 smem[4 * kTileElems];

    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * kBM;
    const int head = blockIdx.y, b = blockIdx.z;
    const float sl2 = prm.scale * kLog2e;

    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const bf16* kg = static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD;
    const bf16* vg = static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD;

    // Stage st: K tile at sK(st), V tile at sV(st). Computed, not an array indexed by a run-time stage
    // (that would live in local memory).
    const uint32_t s0 = smem_addr(smem);
    auto sK = [s0](int st) { return s0 + static_cast<uint32_t>(st) * 2 * kTileBytes; };
    auto sV = [s0](int st) { return s0 + static_cast<uint32_t>(st) * 2 * kTileBytes + kTileBytes; };
    const uint32_t lane_a = lane_off_a(lane), lane_bt = lane_off_bt(lane);

    // Which key tiles the CTA needs (its rows, clipped to Lq), and which halves its warp computes.
    int cta_amin, cta_amax;
    hidden_extrema(q0, min(q0 + kBM, G.lq), G, cta_amin, cta_amax);
    const int wr0 = q0 + warp * 16;
    const WarpRows wrows = warp_rows(wr0, g, G);

    const int nkt = (G.lk + kBN - 1) / kBN;
    load_tile(sK(1), qg, static_cast<int>(prm.q_row_stride), q0, G.lq, tid);
    cp_async_commit();
    int kt = next_key_tile(0, nkt, cta_amin, cta_amax, G);
    if (kt < nkt) {
        load_tile(sK(0), kg, static_cast<int>(prm.k_row_stride), kt * kBN, G.lk, tid);
        load_tile(sV(0), vg, static_cast<int>(prm.v_row_stride), kt * kBN, G.lk, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q has landed (the first K/V tile may still be in flight)
    __syncthreads();

    // Q fragments of the warp's 16 rows, all 64 columns: qf[c] = A fragment of columns [16c, 16c+16).
    uint32_t qf[4][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) ldmatrix_x4(qf[c], sK(1) + lane_a + tile_off(warp * 16, c * 16));
    __syncthreads();  // stage 1 (holding Q) is refilled by the first prefetch below

    float acc[8][4];  // O accumulator: acc[j] = C fragment of output columns [8j, 8j+8)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float mx[2] = {-INFINITY, -INFINITY};  // running raw-score max of rows g, g+8
    float l[2] = {0.f, 0.f};                // running sum of this lane's exp terms (quad-reduced at the end)

    int stage = 0;
    while (kt < nkt) {
        const int kn = next_key_tile(kt + 1, nkt, cta_amin, cta_amax, G);
        if (kn < nkt) {
            load_tile(sK(stage ^ 1), kg, static_cast<int>(prm.k_row_stride), kn * kBN, G.lk, tid);
            load_tile(sV(stage ^ 1), vg, static_cast<int>(prm.v_row_stride), kn * kBN, G.lk, tid);
        }
        cp_async_commit();  // possibly empty: keeps "all but the newest group" = tile kt
        cp_async_wait<1>();
        __syncthreads();    // tile kt is visible to every warp

        fwd_tile(qf, sK(stage) + lane_bt, sV(stage) + lane_a, kt * kBN, wrows, t, G, sl2, mx, l, acc);
        __syncthreads();  // every warp is done with this stage before the next prefetch refills it
        stage ^= 1;
        kt = kn;
    }

    // Finish: l over the whole row, O = acc / l, lse = mx * scale + ln l. Rows past Lq (l may be 0 for
    // rows of a dead warp) are computed but never stored.
    float inv[2];
    finish_row_sums(l, inv);
    bf16* og = static_cast<bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
    // All cp.async groups are complete and the loop ended on a barrier: stage 0's K slot is free.
    store_warp_rows(acc, inv[0], inv[1], smem + warp * 16 * kLds, og, prm.o_row_stride, wr0, G.lq, lane);
    store_row_lse(prm, G.lq, b, head, wr0 + g, wr0 + g + 8, mx, l, t);
}

// ================================================================================================ backward dQ
// delta and dq from q, k, v, o, lse, d_o. Same grid and stages as forward; Q and dO are first staged
// in stage 1 (K slot, V slot), dQ in stage 0's K slot at the end.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_THREADS, 4) mapet_attention_bwd_dq(const MapetAttention prm) {
    dependent_launch_start();
    __shared__ __align__(128) bf16 smem[4 * kTileElems];

    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * kBM;
    const int head = blockIdx.y, b = blockIdx.z;
    const float sl2 = prm.scale * kLog2e;

    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const bf16* kg = static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD;
    const bf16* vg = static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD;
    const bf16* og = static_cast<const bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
    const bf16* dog = static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
    const int64_t stat0 = (static_cast<int64_t>(b) * prm.heads + head) * G.lq;  // lse/delta row 0

    // Stage st: K tile at sK(st), V tile at sV(st) (computed, see forward).
    const uint32_t s0 = smem_addr(smem);
    auto sK = [s0](int st) { return s0 + static_cast<uint32_t>(st) * 2 * kTileBytes; };
    auto sV = [s0](int st) { return s0 + static_cast<uint32_t>(st) * 2 * kTileBytes + kTileBytes; };
    const uint32_t lane_a = lane_off_a(lane), lane_bt = lane_off_bt(lane);

    int cta_amin, cta_amax;
    hidden_extrema(q0, min(q0 + kBM, G.lq), G, cta_amin, cta_amax);
    const int wr0 = q0 + warp * 16;
    const WarpRows wrows = warp_rows(wr0, g, G);
    const int row_lo = wr0 + g, row_hi = wr0 + g + 8;  // the lane's two rows
    const bool ok_lo = row_lo < G.lq, ok_hi = row_hi < G.lq;

    const int nkt = (G.lk + kBN - 1) / kBN;
    load_tile(sK(1), qg, static_cast<int>(prm.q_row_stride), q0, G.lq, tid);
    load_tile(sV(1), dog, static_cast<int>(prm.do_row_stride), q0, G.lq, tid);
    cp_async_commit();
    int kt = next_key_tile(0, nkt, cta_amin, cta_amax, G);
    if (kt < nkt) {
        load_tile(sK(0), kg, static_cast<int>(prm.k_row_stride), kt * kBN, G.lk, tid);
        load_tile(sV(0), vg, static_cast<int>(prm.v_row_stride), kt * kBN, G.lk, tid);
    }
    cp_async_commit();

    // O for delta, straight from global while the copies fly: columns [16t, 16t+16) of rows g, g+8
    // (a quad covers a whole row; the quad sum below finishes the dot product).
    uint4 o_lo[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)}, o_hi[2] = {o_lo[0], o_lo[0]};
    if (ok_lo) {
        const uint4* src = reinterpret_cast<const uint4*>(og + row_lo * prm.o_row_stride + 16 * t);
        o_lo[0] = __ldg(src);
        o_lo[1] = __ldg(src + 1);
    }
    if (ok_hi) {
        const uint4* src = reinterpret_cast<const uint4*>(og + row_hi * prm.o_row_stride + 16 * t);
        o_hi[0] = __ldg(src);
        o_hi[1] = __ldg(src + 1);
    }
    const float lse2_lo = ok_lo ? prm.lse[stat0 + row_lo] * kLog2e : 0.f;  // lse in log2 units
    const float lse2_hi = ok_hi ? prm.lse[stat0 + row_hi] * kLog2e : 0.f;

    cp_async_wait<1>();  // Q and dO have landed
    __syncthreads();

    uint32_t qf[4][4], df[4][4];  // A fragments of the warp's Q and dO rows, columns [16c, 16c+16)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        ldmatrix_x4(qf[c], sK(1) + lane_a + tile_off(warp * 16, c * 16));
        ldmatrix_x4(df[c], sV(1) + lane_a + tile_off(warp * 16, c * 16));
    }
    // delta = rowsum(dO * O): dO from the staged tile (16-byte reads; the 8 lanes of one phase hit
    // rows g, g+1 at words 36g + 8t: all 32 banks once), rows past Lq are zeros.
    float delta_lo, delta_hi;
    {
        const bf16* dst = smem + 3 * kTileElems + (warp * 16) * kLds;  // stage 1 V slot = dO
        uint4 d_lo[2], d_hi[2];
        d_lo[0] = *reinterpret_cast<const uint4*>(dst + g * kLds + 16 * t);
        d_lo[1] = *reinterpret_cast<const uint4*>(dst + g * kLds + 16 * t + 8);
        d_hi[0] = *reinterpret_cast<const uint4*>(dst + (g + 8) * kLds + 16 * t);
        d_hi[1] = *reinterpret_cast<const uint4*>(dst + (g + 8) * kLds + 16 * t + 8);
        delta_lo = quad_sum(dot16_bf16(d_lo, o_lo));
        delta_hi = quad_sum(dot16_bf16(d_hi, o_hi));
    }
    if (t == 0) {
        if (ok_lo) prm.delta[stat0 + row_lo] = delta_lo;
        if (ok_hi) prm.delta[stat0 + row_hi] = delta_hi;
    }
    __syncthreads();  // stage 1 (holding Q, dO) is refilled by the first prefetch below
    const RowStats rstats{lse2_lo, lse2_hi, delta_lo, delta_hi};

    float dq[8][4];  // dQ accumulator: dq[j] = C fragment of head columns [8j, 8j+8)
#pragma unroll
    for (int j = 0; j < 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

    int stage = 0;
    while (kt < nkt) {
        const int kn = next_key_tile(kt + 1, nkt, cta_amin, cta_amax, G);
        if (kn < nkt) {
            load_tile(sK(stage ^ 1), kg, static_cast<int>(prm.k_row_stride), kn * kBN, G.lk, tid);
            load_tile(sV(stage ^ 1), vg, static_cast<int>(prm.v_row_stride), kn * kBN, G.lk, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        dq_tile(qf, df, sK(stage), sV(stage), lane_a, lane_bt, kt * kBN, wrows, rstats, t, G, sl2, dq);
        __syncthreads();
        stage ^= 1;
        kt = kn;
    }

    bf16* dqg = static_cast<bf16*>(prm.dq) + b * prm.dq_batch_stride + head * kD;
    store_warp_rows(dq, prm.scale, prm.scale, smem + warp * 16 * kLds, dqg, prm.dq_row_stride, wr0, G.lq, lane);
}

// ================================================================================================ K/V-resident variants
// The same functions as mapet_attention_fwd and mapet_attention_bwd_dq, organised around a (sample,
// head) pair instead of a 64-row tile: a CTA of 8 warps loads all of its pair's K and V into shared
// memory once (2 * ceil(Lk / 64) padded tiles: 110,592 B for ViT's 344 keys, two CTAs per SM), then
// each warp works through 16-row tiles of the pair's query rows, mt = blockIdx.x * 8 + warp,
// + gridDim.x * 8, ..., with no further barrier. The tiled kernels bring every K/V tile from L2 once
// per 64 query rows: for ViT-B at batch 128, about 1.1 GB of L2 -> SM traffic per call; here the
// pair's K and V cross once per CTA (0.14 GB with gridDim.x = 1), and no warp waits at a barrier
// for another. On an H200 that made the forward 7% faster, not more: the kernels are bound by
// latency (dependent MMAs and softmax arithmetic at 4 warps per scheduler), not by L2 traffic
// (BENCHMARKS.md, fourth run). Q and dO come
// from global memory straight into A fragments (4-byte loads), O and dQ go out of the C fragments as
// 4-byte stores: shared memory holds K and V only. Per warp, the tiles, halves and arithmetic are
// those of the tiled kernels in the same order (fwd_tile, dq_tile), so the results are bit for bit
// the same (tests/attention_gpu.rs, resident_kernels_match_the_tiled_ones_bit_for_bit, which held
// on an H200). The launcher uses them only where the shared memory fits (Lk <= 384 on
// H100/H200).
// Grid (splits, H, B); block 256; dynamic shared memory 2 * ceil(Lk / 64) * 9,216 B.

extern "C" __global__ void __launch_bounds__(MAPET_ATTN_RES_THREADS, 2) mapet_attention_fwd_resident(const MapetAttention prm) {
    dependent_launch_start();
    extern __shared__ __align__(128) bf16 rsmem[];

    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int head = blockIdx.y, b = blockIdx.z;
    const float sl2 = prm.scale * kLog2e;

    const int nkt = (G.lk + kBN - 1) / kBN;
    const uint32_t s0 = smem_addr(rsmem);
    load_kv_resident(s0, prm, b, head, nkt, G, tid);

    // Pointers and lane offsets are formed afresh per row tile from the parameters (constant bank):
    // cheaper than holding them across the tile's work at 128 registers.
#pragma unroll 1
    for (int wr0 = (blockIdx.x * kResWarps + warp) * 16; wr0 < G.lq; wr0 += gridDim.x * kResWarps * 16) {
        const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
        const uint32_t k_lane = s0 + lane_off_bt(lane);  // + kt * kTileBytes
        const uint32_t v_lane = s0 + static_cast<uint32_t>(nkt) * kTileBytes + lane_off_a(lane);
        const WarpRows wrows = warp_rows(wr0, g, G);
        uint32_t qf[4][4];
        load_a_frags(qf, qg, prm.q_row_stride, wr0 + g, wr0 + g + 8, G.lq, t);
        float acc[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        float mx[2] = {-INFINITY, -INFINITY};
        float l[2] = {0.f, 0.f};
        for (int kt = 0; kt < nkt; ++kt)
            fwd_tile(qf, k_lane + kt * kTileBytes, v_lane + kt * kTileBytes, kt * kBN, wrows, t, G, sl2, mx, l, acc);
        float inv[2];
        finish_row_sums(l, inv);
        bf16* og = static_cast<bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
        store_frag_rows(acc, inv[0], inv[1], og, prm.o_row_stride, wr0 + g, wr0 + g + 8, G.lq, t);
        store_row_lse(prm, G.lq, b, head, wr0 + g, wr0 + g + 8, mx, l, t);
    }
}

extern "C" __global__ void __launch_bounds__(MAPET_ATTN_RES_THREADS, 2) mapet_attention_bwd_dq_resident(const MapetAttention prm) {
    dependent_launch_start();
    extern __shared__ __align__(128) bf16 rsmem[];

    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int head = blockIdx.y, b = blockIdx.z;
    const float sl2 = prm.scale * kLog2e;

    const int nkt = (G.lk + kBN - 1) / kBN;
    const uint32_t s0 = smem_addr(rsmem);
    load_kv_resident(s0, prm, b, head, nkt, G, tid);

    // Pointers and lane offsets formed afresh per row tile, as in the forward.
#pragma unroll 1
    for (int wr0 = (blockIdx.x * kResWarps + warp) * 16; wr0 < G.lq; wr0 += gridDim.x * kResWarps * 16) {
        const bf16* og = static_cast<const bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
        const bf16* dog = static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
        const int64_t stat0 = (static_cast<int64_t>(b) * prm.heads + head) * G.lq;  // lse/delta row 0
        const WarpRows wrows = warp_rows(wr0, g, G);
        const int row_lo = wr0 + g, row_hi = wr0 + g + 8;  // the lane's two rows
        const bool ok_lo = row_lo < G.lq, ok_hi = row_hi < G.lq;
        // delta = rowsum(dO * O): columns [16t, 16t+16) of rows g, g+8 of both (a quad covers a whole
        // row; the quad sum finishes the dot product), rows past Lq zeros. The same products in the
        // same order as the tiled kernel, so the same delta. Formed before the A fragments are
        // loaded, so that the 16 registers of raw rows are free again by then.
        RowStats rstats;
        row_deltas(prm, og, dog, row_lo, row_hi, ok_lo, ok_hi, t, rstats.delta_lo, rstats.delta_hi);
        rstats.lse2_lo = ok_lo ? prm.lse[stat0 + row_lo] * kLog2e : 0.f;  // lse in log2 units
        rstats.lse2_hi = ok_hi ? prm.lse[stat0 + row_hi] * kLog2e : 0.f;
        if (t == 0) {
            if (ok_lo) prm.delta[stat0 + row_lo] = rstats.delta_lo;
            if (ok_hi) prm.delta[stat0 + row_hi] = rstats.delta_hi;
        }
        uint32_t qf[4][4], df[4][4];  // A fragments of the warp's Q and dO rows, columns [16c, 16c+16)
        load_a_frags(qf, static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD, prm.q_row_stride,
                     row_lo, row_hi, G.lq, t);
        load_a_frags(df, dog, prm.do_row_stride, row_lo, row_hi, G.lq, t);
        float dq[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
        for (int kt = 0; kt < nkt; ++kt) {
            const uint32_t k_tile = s0 + static_cast<uint32_t>(kt) * kTileBytes;
            const uint32_t v_tile = s0 + static_cast<uint32_t>(nkt + kt) * kTileBytes;
            dq_tile(qf, df, k_tile, v_tile, lane_off_a(lane), lane_off_bt(lane), kt * kBN, wrows, rstats, t, G, sl2, dq);
        }
        const BlockIds id = block_ids_again();  // (sm_80 spilled holding them through the loop)
        bf16* dqg = static_cast<bf16*>(prm.dq) + id.b * prm.dq_batch_stride + id.head * kD;
        const int gq = id.lane >> 2;
        store_frag_rows(dq, prm.scale, prm.scale, dqg, prm.dq_row_stride, wr0 + gq, wr0 + gq + 8, G.lq, id.lane & 3);
    }
}

// The dK/dV kernel's counterpart, with the roles turned: a CTA of 12 warps loads all of its pair's Q
// and dO (2 * ceil(Lq / 64) padded tiles) and the lse, delta and hidden window of every row into
// shared memory once (155,648 B for ViT's 491 rows: one CTA per SM, 12 warps at 168 registers, as
// many warps as three tiled CTAs), then each warp works through 16-key tiles of the pair's keys
// (kw0 = (blockIdx.x * 12 + warp) * 16, + gridDim.x * 192, ...) with no further barrier, K and V
// fragments straight from global memory. The tiled kernel brings every Q/dO tile once per 64 keys
// (1.16 GB of L2 traffic per ViT-B call); this one once per CTA. Per warp the query tiles, halves
// and arithmetic are those of mapet_attention_bwd_dkdv in the same order (dkdv_tile): the same
// bits. Grid (splits, H, B); block 384; dynamic shared memory ceil(Lq / 64) * (2 * 9,216 + 64 * 16) B.
// Must run after a dQ kernel (it reads delta).
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_RES_DKDV_THREADS, 1)
    mapet_attention_bwd_dkdv_resident(const MapetAttention prm) {
    dependent_launch_start();
    extern __shared__ __align__(128) bf16 rsmem[];

    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int head = blockIdx.y, b = blockIdx.z;
    const float sl2 = prm.scale * kLog2e;

    // Q tiles at s0 + qt * kTileBytes, dO tiles after them, then lse [nqt * 64], delta [nqt * 64]
    // and the hidden windows [nqt * 64] (int2; 16-byte aligned: the tiles take a multiple of 16 B).
    const int nqt = (G.lq + kBM - 1) / kBM;
    const uint32_t s0 = smem_addr(rsmem);
    float* s_lse = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(rsmem) + 2 * nqt * kTileBytes);
    float* s_delta = s_lse + nqt * kBM;
    int2* s_win = reinterpret_cast<int2*>(s_delta + nqt * kBM);
    {
        const int part = tid / kThreads, ptid = tid % kThreads;  // warp-uniform
        const int64_t stat0 = (static_cast<int64_t>(b) * prm.heads + head) * G.lq;
        if (part < 2) {  // Q, then dO: load_tile as in the tiled kernels, rows >= Lq zero-filled
            const bf16* src = part == 0 ? static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD
                                        : static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
            const int stride = static_cast<int>(part == 0 ? prm.q_row_stride : prm.do_row_stride);
            const uint32_t dst = s0 + static_cast<uint32_t>(part * nqt) * kTileBytes;
            for (int qt = 0; qt < nqt; ++qt) load_tile(dst + qt * kTileBytes, src, stride, qt * kBM, G.lq, ptid);
        } else {  // per row: lse, delta (0 past Lq) and the window (all keys hidden past Lq)
            for (int r = ptid; r < nqt * kBM; r += kThreads) {
                const bool ok = r < G.lq;
                cp_async4(smem_addr(&s_lse[r]), prm.lse + stat0 + (ok ? r : 0), ok);
                cp_async4(smem_addr(&s_delta[r]), prm.delta + stat0 + (ok ? r : 0), ok);
                s_win[r] = ok ? make_int2(first_hidden(r, G), G.p) : make_int2(-(1 << 29), 0x7fffffff);
            }
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
    }

#pragma unroll 1
    for (int kw0 = (blockIdx.x * kResDkdvWarps + warp) * 16; kw0 < G.lk; kw0 += gridDim.x * kResDkdvWarps * 16) {
        uint32_t kf[4][4], vf[4][4];  // A fragments of the warp's K and V rows (keys >= Lk: zeros)
        load_a_frags(kf, static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD, prm.k_row_stride,
                     kw0 + g, kw0 + g + 8, G.lk, t);
        load_a_frags(vf, static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD, prm.v_row_stride,
                     kw0 + g, kw0 + g + 8, G.lk, t);
        float dk[8][4], dv[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
            dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
        }
        for (int qt = 0; qt < nqt; ++qt) {
            const uint32_t q_tile = s0 + static_cast<uint32_t>(qt) * kTileBytes;
            const uint32_t do_tile = s0 + static_cast<uint32_t>(nqt + qt) * kTileBytes;
            dkdv_tile(kf, vf, q_tile, do_tile, lane_off_a(lane), lane_off_bt(lane), s_lse + qt * kBM,
                      s_delta + qt * kBM, s_win + qt * kBM, qt * kBM, kw0, t, G, sl2, dk, dv);
        }
        const BlockIds id = block_ids_again();
        const int gq = id.lane >> 2, tq = id.lane & 3;
        bf16* dkg = static_cast<bf16*>(prm.dk) + id.b * prm.dk_batch_stride + id.head * kD;
        bf16* dvg = static_cast<bf16*>(prm.dv) + id.b * prm.dv_batch_stride + id.head * kD;
        store_frag_rows(dk, prm.scale, prm.scale, dkg, prm.dk_row_stride, kw0 + gq, kw0 + gq + 8, G.lk, tq);
        store_frag_rows(dv, 1.f, 1.f, dvg, prm.dv_row_stride, kw0 + gq, kw0 + gq + 8, G.lk, tq);
    }
}

// ================================================================================================ backward dK dV
// dk, dv from q, k, v, lse, delta (written by bwd_dq), d_o. CTA = 64 keys; stage st holds the Q tile at
// sQ(st), the dO tile at sdO(st), and lse, delta and the hidden window of those rows; dK and dV go out
// through stage 0 at the end. K and V are staged in stage 1, then held as A fragments in registers for
// the whole kernel (32 registers; 168 in all, 3 CTAs per SM).
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_THREADS, 3) mapet_attention_bwd_dkdv(const MapetAttention prm) {
    dependent_launch_start();
    __shared__ __align__(128) bf16 smem[4 * kTileElems];
    __shared__ __align__(16) float s_lse[2][kBM];    // lse of the stage's query rows (0 past Lq)
    __shared__ __align__(16) float s_delta[2][kBM];  // delta of the stage's query rows (0 past Lq)
    // Hidden key window {a, w} of the stage's query rows: key hidden iff in_window(key, a, w). Rows
    // past Lq get a window that holds every key (a = -2^29, w = 2^31 - 1), so they add nothing.
    __shared__ __align__(16) int2 s_win[2][kBM];

    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int t = lane & 3;
    const int k0 = blockIdx.x * kBN;
    const int head = blockIdx.y, b = blockIdx.z;
    const float sl2 = prm.scale * kLog2e;

    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const bf16* kg = static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD;
    const bf16* vg = static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD;
    const bf16* dog = static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
    const int64_t stat0 = (static_cast<int64_t>(b) * prm.heads + head) * G.lq;

    // Stage st: Q tile at sQ(st), dO tile at sdO(st) (computed, see forward).
    const uint32_t s0 = smem_addr(smem);
    auto sQ = [s0](int st) { return s0 + static_cast<uint32_t>(st) * 2 * kTileBytes; };
    auto sdO = [s0](int st) { return s0 + static_cast<uint32_t>(st) * 2 * kTileBytes + kTileBytes; };
    const uint32_t lane_a = lane_off_a(lane), lane_bt = lane_off_bt(lane);

    // Starts the loads of query tile qt into stage st. Threads tid < 64 copy lse of row r0 + tid and
    // write its hidden window; the others copy delta of row r0 + tid - 64.
    auto load_query_tile = [&](int qt, int st) {
        const int r0 = qt * kBM;
        load_tile(sQ(st), qg, static_cast<int>(prm.q_row_stride), r0, G.lq, tid);
        load_tile(sdO(st), dog, static_cast<int>(prm.do_row_stride), r0, G.lq, tid);
        const int r = tid & (kBM - 1);
        const bool ok = r0 + r < G.lq;
        const float* src = (tid < kBM ? prm.lse : prm.delta) + stat0 + (ok ? r0 + r : 0);
        float* dst = tid < kBM ? &s_lse[st][r] : &s_delta[st][r];
        cp_async4(smem_addr(dst), src, ok);
        if (tid < kBM) s_win[st][r] = ok ? make_int2(first_hidden(r0 + r, G), G.p) : make_int2(-(1 << 29), 0x7fffffff);
    };

    const int kw0 = k0 + warp * 16;  // the warp's 16 keys

    const int nqt = (G.lq + kBM - 1) / kBM;
    // K and V: staged in stage 1's Q and dO slots.
    const uint32_t sK = sQ(1);
    const uint32_t sV = sdO(1);
    load_tile(sK, kg, static_cast<int>(prm.k_row_stride), k0, G.lk, tid);
    load_tile(sV, vg, static_cast<int>(prm.v_row_stride), k0, G.lk, tid);
    cp_async_commit();
    int qt = next_query_tile(0, nqt, k0, G);
    if (qt < nqt) load_query_tile(qt, 0);
    cp_async_commit();

    uint32_t kf[4][4], vf[4][4];  // registers: A fragments of the warp's K and V rows, columns [16c, 16c+16)
    cp_async_wait<1>();  // K, V have landed
    __syncthreads();
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        ldmatrix_x4(kf[c], sK + lane_a + tile_off(warp * 16, c * 16));
        ldmatrix_x4(vf[c], sV + lane_a + tile_off(warp * 16, c * 16));
    }
    __syncthreads();  // stage 1 is refilled by the first prefetch below

    float dk[8][4], dv[8][4];  // accumulators: [j] = C fragment of head columns [8j, 8j+8)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
        dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
    }

    int stage = 0;
    while (qt < nqt) {
        const int qn = next_query_tile(qt + 1, nqt, k0, G);
        if (qn < nqt) load_query_tile(qn, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // also publishes s_win of this stage, written by plain stores

        dkdv_tile(kf, vf, sQ(stage), sdO(stage), lane_a, lane_bt, s_lse[stage], s_delta[stage], s_win[stage], qt * kBM,
                  kw0, t, G, sl2, dk, dv);
        __syncthreads();
        stage ^= 1;
        qt = qn;
    }

    // Stage 0 is free (loop ended on a barrier, no copies in flight): dK through its Q slot, dV through
    // its dO slot, each warp its own 16 rows.
    bf16* dkg = static_cast<bf16*>(prm.dk) + b * prm.dk_batch_stride + head * kD;
    bf16* dvg = static_cast<bf16*>(prm.dv) + b * prm.dv_batch_stride + head * kD;
    store_warp_rows(dk, prm.scale, prm.scale, smem + warp * 16 * kLds, dkg, prm.dk_row_stride, kw0, G.lk, lane);
    store_warp_rows(dv, 1.f, 1.f, smem + kTileElems + warp * 16 * kLds, dvg, prm.dv_row_stride, kw0, G.lk, lane);
}

// ================================================================================================ wgmma forward (sm_90a)
// (The swizzled tiles below hold one head's 64 bf16 = 128 bytes a row: one swizzle atom wide, which
// is what lets every descriptor, the N-major ones included, use sw128_desc's fixed fields.)
static_assert(kD == 64, "the wgmma kernels' tiles are one 128-byte swizzle atom wide");
// The default forward on compute capability 9.0. In the seventh run its tests passed on an H200,
// and it was 20% faster there than the resident one at ViT-B (BENCHMARKS.md). The forward on
// Hopper's warpgroup MMA, written because the mma.sync kernels are latency bound
// (BENCHMARKS.md: issue slots half busy, the top stall the fixed latency of dependent MMAs and
// softmax arithmetic), and wgmma is asynchronous: a warpgroup can run one key tile's softmax
// while the tensor cores work on its neighbours.
//
// Organisation: as mapet_attention_fwd_resident, a CTA per (sample, head) pair (or a few) holds the
// pair's K and V in shared memory, here in the 128-byte swizzle wgmma reads (hopper.cuh: row r at
// 128 r, 16-byte chunk j at j ^ (r & 7); ceil(Lk / 64) * 8 KB each, 96 KB for ViT's 344 keys; two
// CTAs an SM). Each of its 2 warpgroups takes 64-row tiles of the pair's query rows, copying the
// tile's Q rows into a swizzled 8 KB tile of its own (the first by wg_start_q; each next one loaded
// into registers a tile ahead, load_q_next, and stored once the current tile's last S is done,
// store_q_next). It works through the tile's
// non-EMPTY 32-key chunks two at a time (a pair need not be adjacent); per pair:
//   S  = Q K^T  two m64n32k16 products of 4 steps of 16 head columns, Q and K both read K-major
//               from shared memory (Q in registers instead left the kernel 11 registers short of
//               128 and spilling);
//   P  = the online softmax of S (softmax_tile, per warp, in registers: the accumulator layout of
//               wgmma is the mma.sync C layout per warp, so the masks and the softmax are the
//               mma.sync kernels' own);
//   O += P V    P repacked to bf16 A fragments, V read N-major from the same swizzled rows
//               (hopper.cuh, wgmma_m64n64k16_rs_nmajor), two 16-key steps a chunk.
// The pipeline (wg_pipeline): S of pair n+1 is issued before P V of pair n, so the softmax of pair
// n+1 runs while P V of pair n is on the tensor cores; the rescale of O and the repack of P wait
// for it. Across row tiles: a tile's first S is issued before the previous tile's epilogue (the
// normalisation and the stores of O and lse), which it runs under (written after the seventh
// run; its tests passed on an H200 in the eighth).
//
// Row order. A warpgroup's 64 rows share one skip decision per key chunk, and 64 consecutive rows
// in rank order span 64 different hidden windows (a content row's window moves with its rank), so
// few tiles would be empty for all of them. So the rows are taken in "position" order (row_at),
// where first_hidden is non-decreasing: content rows 0..C-1 and the mask rows (all a = C), then
// query row q and content row C + q in turn (a = C + q and C + q + 1); a 64-row tile then spans
// about 32 windows. Pairs computed at ViT-B over the visible ones: 64 rows x 32 keys, 1.46x in rank
// order, 1.29x in position order (the wgmma kernels); 64 x 64, 1.74x and 1.57x; 16 x 64, 1.49x,
// and 16 x 32, 1.24x (the mma.sync kernels' tiles and halves).
//
// ptxas must report no "wgmma serialized" message (C7510-C7520) for this kernel: each one means the
// overlap above is gone. What it takes: every wgmma of a group in one basic block with its fence
// and commit (so a pair's two chunks always, and no issue under a condition inside the loop),
// registers pinned around fences and waits (pin_regs), and the warpgroup index made warp-uniform
// by a shuffle (wg_thread).
//
// Grid (splits, H, B); block 256; dynamic shared memory (2 * ceil(Lk / 64) + 2) * 8 KB + 1 KB (to
// align the tiles to 1024 bytes): 113 KB for Lk <= 384, two CTAs an SM. Compute capability 9.0
// (sm_90a cubin) only; elsewhere it traps, and the launcher never picks it.

namespace {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kWgTileBytes = 64 * 128;  // one swizzled 64 x 64 bf16 tile

// The query row at position pos of the position order (above); Lq for positions past the end.
__device__ __forceinline__ int row_at(int pos, const Geometry& G) {
    if (pos < G.c) return pos;                  // content rows of the context (a = C)
    if (pos < G.c + G.p) return G.n + pos - G.c;  // mask rows (a = C)
    const int j = pos - G.c - G.p;
    if (j >= 2 * G.p) return G.lq;
    return (j & 1) ? G.c + (j >> 1) : G.n + G.p + (j >> 1);  // content C + q (a = C+q+1), query q (a = C+q)
}

constexpr int kChunk = 32;  // keys (forward, dQ) or positions (dK/dV) a chunk

static_assert(kChunk == 32, "chunk masks: chunk c is bit c, found with shifts by 5");

// A row or key tile's 32-wide chunks as bit masks, chunk c in bit c: live = not EMPTY, partial =
// PARTIAL (classify's classes). Found once a tile, so that the chunk loops step with __ffs and
// test a bit, where they called classify for every chunk twice (finding the next one, then
// masking it). 32 chunks at most: the launcher picks the wgmma kernels only for Lk <= 384
// (forward, dQ: two CTAs an SM) and Lq <= 1024 (dK/dV).
struct ChunkMasks {
    uint32_t live, partial;
};

// Bits [0, n) for n in [0, 32] (none for n <= 0).
__device__ __forceinline__ uint32_t low_bits(int n) { return n >= 32 ? ~0u : (1u << max(n, 0)) - 1u; }

// The 32-key chunks of [0, Lk) for rows with first-hidden extrema amin, amax, in closed form: both
// classes are ranges of chunks. EMPTY (k0 >= amax, min(k1, Lk) <= amin + P): chunks from
// ceil(amax / 32) to below (amin + P) / 32, or to the last if Lk <= amin + P. FULL (k1 <= amin or
// k0 >= amax + P, and k1 <= Lk): chunks below amin / 32, and from ceil((amax + P) / 32) on, below
// Lk / 32. Transcribed into src/ops/attention.rs and checked there against classify for every
// chunk of every extrema pair.
__device__ __forceinline__ ChunkMasks key_chunks(int amin, int amax, int nkc, const Geometry& G) {
    const int empty_end = G.lk <= amin + G.p ? nkc : (amin + G.p) >> 5;
    const uint32_t empty = low_bits(empty_end) & ~low_bits((amax + 31) >> 5);
    const uint32_t full = (low_bits(amin >> 5) | ~low_bits((amax + G.p + 31) >> 5)) & low_bits(G.lk >> 5);
    const uint32_t live = low_bits(nkc) & ~empty;
    return ChunkMasks{live, live & ~full};
}

// The lowest chunk of `rest`, taken out of it; -1 when it is empty.
__device__ __forceinline__ int take_chunk(uint32_t& rest) {
    const int c = __ffs(rest) - 1;
    rest &= rest - 1u;
    return c;
}

// The chunk take_chunk takes next from `rest`, left in it; -1 when it is empty. (take_chunk does
// not call this: written through a call, its SASS in the forward and dQ came out different.)
__device__ __forceinline__ int next_chunk(uint32_t rest) { return __ffs(rest) - 1; }

// First-hidden extrema of positions [p0, min(p0 + n, Lq)) (first_hidden is monotone in the position).
__device__ __forceinline__ void position_extrema(int p0, int n, const Geometry& G, int& amin, int& amax) {
    amin = first_hidden(row_at(p0, G), G);
    amax = first_hidden(row_at(min(p0 + n, G.lq) - 1, G), G);
}

// The non-EMPTY (and PARTIAL) 32-key chunks of the 64-position row tile from p0 (nkc chunks in all),
// from its hidden-window extrema: the forward's and dQ's tiles.
__device__ __forceinline__ ChunkMasks row_tile_chunks(int p0, int nkc, const Geometry& G) {
    int amin, amax;
    position_extrema(p0, 64, G, amin, amax);
    return key_chunks(amin, amax, nkc, G);
}

// A softmax step's rescale of the O accumulator, kept until the P V product that reads it is done:
// rows g and g+8 times corr[0], corr[1] where grow.
struct Rescale {
    bool grow;
    float corr[2];
};

// Two 32-key chunks the forward computes together; c[1] = -1 when there is no second one.
struct ChunkPair {
    int c[2];
    // The chunks whose K and V rows the products read: the first again in place of an absent second.
    __device__ __forceinline__ ChunkPair rows() const { return ChunkPair{{c[0], c[1] < 0 ? c[0] : c[1]}}; }
};

__device__ __forceinline__ void rescale_acc(float (&acc)[8][4], const Rescale& r) {
    if (!r.grow) return;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        acc[j][0] *= r.corr[0];
        acc[j][1] *= r.corr[0];
        acc[j][2] *= r.corr[1];
        acc[j][3] *= r.corr[1];
    }
}

// Who a thread of a wgmma kernel is: its index, its warpgroup, its warp in the warpgroup, its
// lane's g = lane / 4 and t = lane % 4, and the block's head and sample. The warpgroup index goes
// through a shuffle: ptxas then knows it (and the row tiles, extrema and tile classes derived from
// it) to be uniform across the warp. Derived from threadIdx.x alone, the branches around the
// wgmma look divergent to it, and it serialises every wgmma.
struct WgThread {
    int tid, wg, warp, g, t, head, b;
};

__device__ __forceinline__ WgThread wg_thread() {
    const int tid = threadIdx.x;
    return WgThread{tid,
                    __shfl_sync(0xffffffffu, tid >> 7, 0),
                    (tid >> 5) & 3,
                    (tid & 31) >> 2,
                    tid & 3,
                    static_cast<int>(blockIdx.y),
                    static_cast<int>(blockIdx.z)};
}

// The keys whose K and V rows the forward's and dQ's first group of copies brings (wg_load_kv):
// the first two 64-key tiles, chunks 0 to 3.
constexpr int kKvFirstKeys = 2 * kBN;

// Loads the pair's K (warpgroup 0) and V (warpgroup 1; i = the thread's index in it) into
// swizzled tiles at k_smem and v_smem, keys past Lk zero-filled up to the last tile's end, in two
// cp.async groups: keys [0, kKvFirstKeys), then the rest. Waits for the first (with every copy
// the thread started before it: the first Q or dO tile) and makes it visible to every
// warpgroup's wgmma (ends on a block barrier); the rest lands while the first chunks are
// computed, and KvRest::need waits for it before the first chunk that reads it. In the seventh
// run's profiles the wait for all of K and V was the largest single stall of both kernels (4.0%
// of the forward's warp-stall samples, 3.3% of dQ's): a CTA's 88 KB at ViT, before any work,
// where a row tile's first two pairs of chunks need the first 32 KB.
__device__ __forceinline__ void wg_load_kv(const MapetAttention& prm, const Geometry& G, int b, int head,
                                           uint32_t k_smem, uint32_t v_smem, int nkt, int wg, int i) {
    const bool is_v = wg == 1;
    const bf16* src = static_cast<const bf16*>(is_v ? prm.v : prm.k) +
                      b * (is_v ? prm.v_batch_stride : prm.k_batch_stride) + head * kD;
    const int64_t stride = is_v ? prm.v_row_stride : prm.k_row_stride;
    const uint32_t dst = is_v ? v_smem : k_smem;
    const int rows = nkt * kBN, first = min(rows, kKvFirstKeys);
    sw128_load_rows(dst, src, 2 * stride, first, G.lk, i, 128);
    cp_async_commit();
    // (rows > first means Lk > kKvFirstKeys, so the rest's row_end is >= 1.)
    if (rows > first) sw128_load_rows(dst + first * 128, src + first * stride, 2 * stride, rows - first, G.lk - first, i, 128);
    cp_async_commit();
    sw128_load_wait_groups<1>();
    __syncthreads();
}

// The K and V rows past kKvFirstKeys (wg_load_kv's second group): need(c) before the first
// products that read key chunk c, finish() once a warpgroup has issued its last, so that every
// thread of the block meets the others at barrier 3 exactly once. Each warpgroup copied one of
// K and V, so the rows are visible to a thread only after that barrier, not after its own wait.
// A pair with no key past the first group (ready from the start, the same in every thread) never
// meets there.
static_assert(MAPET_ATTN_WG_THREADS == MAPET_ATTN_WG_DQ_THREADS, "KvRest's barrier counts the block");
struct KvRest {
    bool ready;
    __device__ __forceinline__ explicit KvRest(int nkt) : ready(nkt * kBN <= kKvFirstKeys) {}
    __device__ __forceinline__ void need(int chunk) {
        if (!ready && chunk >= kKvFirstKeys / kChunk) finish();
    }
    __device__ __forceinline__ void finish() {
        if (ready) return;
        sw128_load_wait();
        named_barrier_anywhere(3, MAPET_ATTN_WG_THREADS);
        ready = true;
    }
};

__device__ __forceinline__ float (&flat16(float (&x)[4][4]))[16] { return reinterpret_cast<float (&)[16]>(x); }
__device__ __forceinline__ float (&flat32(float (&x)[8][4]))[32] { return reinterpret_cast<float (&)[32]>(x); }
__device__ __forceinline__ float (&flat32(float (&x)[2][4][4]))[32] { return reinterpret_cast<float (&)[32]>(x); }
__device__ __forceinline__ uint32_t (&flat16(uint32_t (&x)[2][2][4]))[16] {
    return reinterpret_cast<uint32_t (&)[16]>(x);
}

// The chunk pipeline of the wgmma kernels, the one place that orders their issues, waits and
// register pins. A kernel walks the items of its tile (a pair of key chunks in the forward, a key
// chunk in dQ, a position chunk in dK/dV) through four stages:
//   issue_g1(it)     one wgmma group: the products into the item's G1 accumulators (S, dP);
//   elementwise(it)  the work on those accumulators once they have landed (softmax, P, dS), in
//                    place; returns what finish needs;
//   finish(e)        what must wait for the previous item's G2 to be done: rescaling its
//                    accumulators, packing this item's A fragments for G2;
//   issue_g2(it)     one wgmma group: the products that read those A fragments (P V, dS K, ...).
// G1 of item n+1 is issued before G2 of item n, so elementwise(n+1) runs while G2(n) is on the
// tensor cores. pin_g1 / pin_g2 pin the G1 accumulators / the G2 accumulators and A fragments
// (pin_regs), so that no access to them moves across a wait. next(it, nxt) sets the item after it
// and says whether there is one. The first item always exists. on_last() runs once every G1 is
// done, after the last G2 is issued and before it is waited for: what reads only G1's operands is
// finished there (the forward starts loading its next row tile's Q then), while G2 runs. (Run
// before the last G2's issue until the seventh run, its named barrier and copies held that G2
// back from the tensor cores.)
// The wait for G2(n) opens the loop's body, and end_basic_block closes it after elementwise(n+1):
// written as "wait<1>, elementwise, wait<0>" in one block, ptxas issued the second wait first and
// ran all of the forward's softmax (and 12 of dQ's 16, 7 of dK/dV's 16 exponentials) after it,
// with the tensor cores idle (hopper.cuh, end_basic_block). tests/kernel_schedule.rs checks the
// overlap in the SASS.
// kFirstIssued: the caller has issued the first item's G1 already (the forward issues a row tile's
// first G1 under the previous tile's epilogue).
template <bool kFirstIssued = false, typename Item, typename Next, typename IssueG1, typename PinG1,
          typename Elementwise, typename PinG2, typename Finish, typename IssueG2, typename OnLast>
__device__ __forceinline__ void wg_pipeline(Item cur, Next next, IssueG1 issue_g1, PinG1 pin_g1,
                                            Elementwise elementwise, PinG2 pin_g2, Finish finish, IssueG2 issue_g2,
                                            OnLast on_last) {
    if constexpr (!kFirstIssued) issue_g1(cur);
    wgmma_wait_groups<0>();
    pin_g1();
    auto e = elementwise(cur);
    Item nxt;
    for (;;) {
        wgmma_wait_groups<0>();  // G2 of the previous item (none at the first): its registers are free
        pin_g2();
        finish(e);
        pin_g2();
        if (!next(cur, nxt)) break;
        issue_g1(nxt);
        issue_g2(cur);
        wgmma_wait_groups<1>();  // G1 of nxt (G2 of cur may still run)
        pin_g1();
        e = elementwise(nxt);
        end_basic_block();  // so that the wait opening the next iteration stays below elementwise
        cur = nxt;
    }
    issue_g2(cur);
    on_last();
    wgmma_wait_groups<0>();
    pin_g2();
}

// Issues S = Q K^T for two 32-key chunks, c[0] and c[1]: s[h] = the C fragments of keys
// 32 c[h] + [0, 32), as fwd_tile's of a half, two m64n32k16 products of 4 steps, Q from the
// warpgroup's swizzled tile. One wgmma group. The chunks need not be adjacent: the loop pairs the
// row tile's non-EMPTY chunks, so that no wgmma is skipped under a branch inside the group (which
// makes ptxas serialise every wgmma of the kernel, C7515) and yet no EMPTY chunk is computed
// but where their count is odd: 1.36x the visible pairs at ViT-B (1.29x without that one chunk a
// row tile), against 1.57x for adjacent 64-key tiles.
// qd, kd: the descriptors (sw128_desc) of the Q tile and of K's first row.
__device__ __forceinline__ void wg_issue_scores(float (&s)[2][4][4], uint64_t qd, uint64_t kd, const int (&c)[2]) {
    pin_regs(flat32(s));
    wgmma_fence_acc();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const uint64_t rows = sw128_desc_plus(kd, static_cast<uint32_t>(c[h] * kChunk) * 128);
        wgmma_m64n32k16_ss<0>(flat16(s[h]), qd, rows);
#pragma unroll
        for (int k = 1; k < 4; ++k)
            wgmma_m64n32k16_ss<1>(flat16(s[h]), sw128_desc_plus(qd, 32 * k), sw128_desc_plus(rows, 32 * k));
    }
    wgmma_commit_groups();
}

// Starts cp.async copies of the rows of positions [p0, p0 + rows) of a bf16 [Lq x 64] matrix (row
// r at src + r * stride; row_at; positions past Lq zero-filled) into the swizzled tile at dst, by
// thread i of n (n a multiple of 8; 8 consecutive threads copy one row).
__device__ __forceinline__ void copy_positions(uint32_t dst, const bf16* src, int64_t stride, int p0, int rows, int i,
                                               int n, const Geometry& G) {
    sw128_gather_rows(dst, src, 2 * stride, rows, G.lq, i, n, [p0, &G](int r) { return row_at(p0 + r, G); });
}

// copy_positions of the same positions of Q (into q_dst) and dO (into do_dst), each row found
// once for both (the dK/dV kernel's prologue: row_at and the row's addresses were half its
// copies' instructions when done once per matrix).
__device__ __forceinline__ void copy_positions_q_do(uint32_t q_dst, const bf16* qg, int64_t q_stride, uint32_t do_dst,
                                                    const bf16* dog, int64_t do_stride, int p0, int rows, int i, int n,
                                                    const Geometry& G) {
    sw128_gather_rows2(q_dst, qg, 2 * q_stride, do_dst, dog, 2 * do_stride, rows, G.lq, i, n,
                       [p0, &G](int r) { return row_at(p0 + r, G); });
}

// The row whose Q (dO, O) thread i of a warpgroup sends to L2 (prefetch_l2) for the warpgroup's
// next row tile, at positions [p_next, p_next + 64): threads i < 64 take position p_next + i; -1
// when the thread has none (i >= 64, no next tile, or a position past Lq). Found and sent once a
// tile, at its start (dQ).
__device__ __forceinline__ int prefetch_row(int p_next, int i, const Geometry& G) {
    if (i >= 64 || p_next >= G.lq) return -1;
    const int row = row_at(p_next + i, G);
    return row < G.lq ? row : -1;
}

// The CTA launched `ahead` CTAs after this one (grids (CTAs a pair, H, B), taken in launch order:
// x fastest): its index x among its pair's CTAs, its pair (b H + head), head and sample; x = -1
// past the grid's end. For the MAPET_L2_AHEAD prefetches (next_wave_to_l2, dkdv_next_wave_to_l2).
struct LaterCta {
    int x, head, b;
    int64_t pair;
};

__device__ __forceinline__ LaterCta later_cta(int64_t ahead) {
    const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z;
    const int64_t target =
        blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z) + ahead;
    if (target >= ctas) return LaterCta{-1, 0, 0, 0};
    const int64_t pair = target / gridDim.x;
    return LaterCta{static_cast<int>(target % gridDim.x), static_cast<int>(pair % gridDim.y),
                    static_cast<int>(pair / gridDim.y), pair};
}

// prm.l2_ahead > 0 (MAPET_L2_AHEAD, experimental): the wgmma forward and dQ kernels run two CTAs
// an SM. Each starts by copying its pair's K and V (88 KB at ViT) and its first row tiles' rows,
// and waits for them with little else on the SM to cover the wait: the eighth run's profile put
// 18% of the forward's warp-stall samples in that prologue, where a wave's CTAs ask DRAM for
// some 27 MB together. The CTA that starts in this one's place is about the one launched
// prm.l2_ahead (the CTAs the device holds at once) after it, since CTAs are handed out in launch
// order. So once its own first products are issued, this one sends to L2 what that CTA's
// prologue copies, while DRAM has time to spare (the forward moves about 1.6 TB/s on average):
// - the rows of its two warpgroups' first row tiles, positions [128 x, 128 x + 128) of its pair
//   (x: its index among the pair's CTAs): Q, and for dQ (kBackward) dO and O too;
// - where it is its pair's first CTA, all of the pair's K and V rows and, for dQ, its lse (a
//   pair's other CTAs start beside its first and find them there too).
// About 104 KB a CTA at ViT (dQ 139 KB), 28 MB (37 MB) for a wave of 264. Hints only: nothing
// waits for them or reads them here, so no result can change. A prefetch a 32-byte sector, as
// in dkdv_next_wave_to_l2 below.
template <bool kBackward>
__device__ __forceinline__ void next_wave_to_l2(const MapetAttention& prm, const Geometry& G, int tid) {
    static_assert(MAPET_ATTN_WG_THREADS == MAPET_ATTN_WG_DQ_THREADS, "one stride for both kernels' loops");
    if (prm.l2_ahead <= 0) return;  // (0: none, as for every kernel that reads it)
    const LaterCta later = later_cta(prm.l2_ahead);
    if (later.x < 0) return;
    const int x = later.x, head = later.head, b = later.b;
    const int64_t pair = later.pair;
    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    for (int i = tid; i < 4 * 128; i += MAPET_ATTN_WG_THREADS) {
        const int64_t r = row_at(128 * x + (i >> 2), G), col = 16 * (i & 3);  // sector i % 4 of the row
        if (r >= G.lq) continue;
        prefetch_l2(qg + r * prm.q_row_stride + col);
        if constexpr (kBackward) {
            prefetch_l2(static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD + r * prm.do_row_stride + col);
            prefetch_l2(static_cast<const bf16*>(prm.o) + b * prm.o_batch_stride + head * kD + r * prm.o_row_stride + col);
        }
    }
    if (x != 0) return;
    const bf16* kg = static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD;
    const bf16* vg = static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD;
    for (int i = tid; i < 4 * G.lk; i += MAPET_ATTN_WG_THREADS) {
        const int64_t r = i >> 2, col = 16 * (i & 3);
        prefetch_l2(kg + r * prm.k_row_stride + col);
        prefetch_l2(vg + r * prm.v_row_stride + col);
    }
    // lse: G.lq floats from pair * Lq, a sector (8 floats) a prefetch, the last at the last float.
    if constexpr (kBackward) {
        for (int i = 8 * tid; i < G.lq + 7; i += 8 * MAPET_ATTN_WG_THREADS) prefetch_l2(prm.lse + pair * G.lq + min(i, G.lq - 1));
    }
}

// The forward's first Q tile: wg_start_q starts copying the Q rows of positions [p0, p0 + 64) into
// the warpgroup's swizzled tile, by its 128 threads (i = the thread's index in it), with K and V's
// first group (wg_load_kv waits for them).
__device__ __forceinline__ void wg_start_q(uint32_t q_smem, const bf16* qg, int64_t stride, int p0, int i,
                                           const Geometry& G) {
    copy_positions(q_smem, qg, stride, p0, 64, i, 128, G);
}

// The forward's next Q tile, staged in registers: thread i of the warpgroup loads the 16-byte
// chunk i % 8 of the rows i / 8 + 16 k (k < 4) of positions [p0, p0 + 64) (zeros past Lq) at the
// current tile's start (load_q_next, 16 registers: the forward then takes 124 of its 128), and
// stores them into the swizzled Q tile once every S of the current tile is done (store_q_next,
// after a warpgroup barrier; the next tile's start meets at another before its first S).
struct QNext {
    uint4 v[4];
};

__device__ __forceinline__ void load_q_next(QNext& qn, const bf16* qg, int64_t stride, int p0, int i,
                                            const Geometry& G) {
    const int j = i & 7;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int row = row_at(p0 + (i >> 3) + 16 * k, G);
        qn.v[k] = row < G.lq ? __ldg(reinterpret_cast<const uint4*>(qg + static_cast<int64_t>(row) * stride) + j)
                             : make_uint4(0u, 0u, 0u, 0u);
    }
}

__device__ __forceinline__ void store_q_next(uint32_t q_smem, const QNext& qn, int i) {
    const int j = i & 7;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const uint32_t d = q_smem + sw128_offset((i >> 3) + 16 * k, j);
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(d), "r"(qn.v[k].x), "r"(qn.v[k].y),
                     "r"(qn.v[k].z), "r"(qn.v[k].w)
                     : "memory");
    }
    fence_proxy_async_smem();
}


// Issues O += P V for the chunks c[0], c[1]: pa[h][k] = the A fragment of keys 32 c[h] + 16 k +
// [0, 16) (zeros where the keys are hidden); vd = the descriptor of V's first row. One wgmma group.
__device__ __forceinline__ void wg_issue_pv(float (&acc)[8][4], const uint32_t (&pa)[2][2][4], uint64_t vd,
                                            const int (&c)[2]) {
    pin_regs(flat32(acc));
    wgmma_fence_acc();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const uint32_t rows = static_cast<uint32_t>(c[h] * kChunk + 16 * k) * 128;
            wgmma_m64n64k16_rs_nmajor(flat32(acc), pa[h][k], sw128_desc_plus(vd, rows));
        }
    }
    wgmma_commit_groups();
}

// The softmax of a finished pair of chunks c[0], c[1]: masks (the chunks in `partial` per element,
// a second chunk marked absent by c[1] < 0 all to -inf), one softmax_tile step (the accumulator's
// rescale returned, not applied); p left in s.
__device__ __forceinline__ Rescale wg_softmax(float (&s)[2][4][4], uint32_t partial, const int (&c)[2], int a_lo,
                                              int a_hi, int t, const Geometry& G, float sl2, float (&mx)[2],
                                              float (&l)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        // An absent chunk goes through the element mask with a window of all its keys, rather than
        // a branch of its own that fills -inf: ptxas ran such a fill on every pair, ahead of the
        // branch, and the absent chunk comes once a row tile at most.
        const bool absent = c[h] < 0;
        const int k0 = c[h] * kChunk, kb0 = k0 + 2 * t;
        const int kind = absent || ((partial >> c[h]) & 1u) ? kPartial : kFull;
        mask_scores(s[h], kind, !absent && k0 + kChunk > G.lk, 0, absent ? 0 : a_lo - kb0, absent ? 0 : a_hi - kb0,
                    G.lk - kb0, absent ? kChunk : G.p);
    }
    Rescale r{false, {1.f, 1.f}};
    softmax_tile<true>(s, mx, l, sl2, [&r](int i, float corr) {
        r.grow = true;
        r.corr[i] = corr;
    });
    return r;
}

// The A fragments of a chunk's two 16-deep steps from its C fragments x[n-chunk][4] (f32, packed
// to bf16).
__device__ __forceinline__ void pack_chunk(uint32_t (&a)[2][4], const float (&x)[4][4]) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        a[c][0] = pack_bf16(x[2 * c][0], x[2 * c][1]);
        a[c][1] = pack_bf16(x[2 * c][2], x[2 * c][3]);
        a[c][2] = pack_bf16(x[2 * c + 1][0], x[2 * c + 1][1]);
        a[c][3] = pack_bf16(x[2 * c + 1][2], x[2 * c + 1][3]);
    }
}

// P of a pair of chunks into the A fragments of P V: each chunk as pack_chunk does.
__device__ __forceinline__ void wg_pack_p(uint32_t (&pa)[2][2][4], const float (&s)[2][4][4]) {
    pack_chunk(pa[0], s[0]);
    pack_chunk(pa[1], s[1]);
}

// A forward row tile's non-EMPTY 32-key chunks (row_tile_chunks), and the first pair of them with
// the chunks left after it. A pair's second chunk may be absent (-1: an odd count); its products
// then read the first chunk's rows again, and its scores are -inf. Every row sees N >= 1 keys, so
// the first chunk exists. The wgmma forwards find it twice for each tile (when its first S is
// issued, and at its start), rather than keep it in registers across the previous tile's
// epilogue.
struct FwdRowTile {
    ChunkMasks chunks;
    uint32_t rest;
    ChunkPair first;
};

__device__ __forceinline__ FwdRowTile fwd_row_tile(int p0, int nkc, const Geometry& G) {
    FwdRowTile rt;
    rt.chunks = row_tile_chunks(p0, nkc, G);
    rt.rest = rt.chunks.live;
    rt.first.c[0] = take_chunk(rt.rest);
    rt.first.c[1] = take_chunk(rt.rest);
    return rt;
}

// The lane's two rows of the wgmma forwards' row tile at positions [p0, p0 + 64): r_lo (its
// warp's row g) and r_hi (g + 8), Lq past the last, and their first hidden keys.
struct FwdRows {
    int r_lo, r_hi, a_lo, a_hi;
};

__device__ __forceinline__ FwdRows fwd_rows(int p0, int warp, int g, const Geometry& G) {
    FwdRows r;
    r.r_lo = row_at(p0 + 16 * warp + g, G);
    r.r_hi = row_at(p0 + 16 * warp + g + 8, G);
    r.a_lo = first_hidden(min(r.r_lo, G.lq - 1), G);
    r.a_hi = first_hidden(min(r.r_hi, G.lq - 1), G);
    return r;
}

// The products and softmax of the wgmma forwards' row tile at p0 (its rows `rows`), whose first
// pair's S the caller has issued into s: every pair of its chunks through wg_pipeline (S = Q K^T
// from the Q tile qd and the K tiles kd, the softmax, O += P V from the V tiles vd). need(c) runs
// before each later S issue with the pair's higher chunk c (the caller's wait for K rows still in
// flight, or nothing); on_last() once every S of the tile is done, while its last P V runs. Leaves
// the unnormalised O in acc, the rows' running max in mx and the lane's sums in l.
template <typename Need, typename OnLast>
__device__ __forceinline__ void fwd_tile_products(float (&s)[2][4][4], float (&acc)[8][4], float (&mx)[2],
                                                  float (&l)[2], int p0, const FwdRows& rows, int nkc, uint64_t qd,
                                                  uint64_t kd, uint64_t vd, int t, const Geometry& G, float sl2,
                                                  Need need, OnLast on_last) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    mx[0] = mx[1] = -INFINITY;
    l[0] = l[1] = 0.f;
    uint32_t pa[2][2][4];
    const FwdRowTile cur = fwd_row_tile(p0, nkc, G);
    uint32_t rest = cur.rest;
    const ChunkMasks chunks = cur.chunks;
    wg_pipeline<true>(
        cur.first,
        [&](const ChunkPair&, ChunkPair& nxt) {
            if (rest == 0) return false;
            nxt.c[0] = take_chunk(rest);
            nxt.c[1] = take_chunk(rest);
            return true;
        },
        [&](const ChunkPair& p) {
            need(p.rows().c[1]);
            wg_issue_scores(s, qd, kd, p.rows().c);
        },
        [&] { pin_regs(flat32(s)); },
        [&](const ChunkPair& p) {
            return wg_softmax(s, chunks.partial, p.c, rows.a_lo, rows.a_hi, t, G, sl2, mx, l);
        },
        [&] {
            pin_regs(flat32(acc));
            pin_regs(flat16(pa));
        },
        [&](const Rescale& r) {
            rescale_acc(acc, r);  // (O is still 0 at the first pair)
            wg_pack_p(pa, s);
        },
        [&](const ChunkPair& p) { wg_issue_pv(acc, pa, vd, p.rows().c); },
        on_last);
}

// The wgmma forwards' epilogue of a row tile of pair (b, head): O = acc / l into the lane's rows
// of O (bf16), and their lse.
__device__ __forceinline__ void fwd_store_tile(const float (&acc)[8][4], float (&l)[2], const float (&mx)[2],
                                               const FwdRows& rows, int b, int head, int t, const Geometry& G,
                                               const MapetAttention& prm) {
    float inv[2];
    finish_row_sums(l, inv);
    bf16* og = static_cast<bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
    store_frag_rows_paired(acc, inv[0], inv[1], og, prm.o_row_stride, rows.r_lo, rows.r_hi, G.lq, t);
    store_row_lse(prm, G.lq, b, head, rows.r_lo, rows.r_hi, mx, l, t);
}

#endif

// The wgmma forward's body; kL2Ahead: the CTA sends the next wave's operands to L2 (next_wave_to_l2).
template <bool kL2Ahead>
__device__ __forceinline__ void fwd_wgmma(const MapetAttention& prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char wg_smem_raw[];
    const Geometry G = geometry_of(prm);
    const auto [tid, wg, warp, g, t, head, b] = wg_thread();
    const float sl2 = prm.scale * kLog2e;
    const int nkt = (G.lk + kBN - 1) / kBN;
    const uint32_t k_smem = sw128_align(smem_addr(wg_smem_raw));
    const uint32_t v_smem = k_smem + static_cast<uint32_t>(nkt) * kWgTileBytes;
    const uint32_t q_smem = v_smem + static_cast<uint32_t>(nkt + wg) * kWgTileBytes;  // this warpgroup's Q tile
    const int nkc = (G.lk + kChunk - 1) / kChunk;
    const uint64_t qd = sw128_desc(q_smem), kd = sw128_desc(k_smem), vd = sw128_desc(v_smem);

    // The first row tile's Q flies with K and V (wg_load_kv waits for every copy of the thread).
    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const int tile_step = gridDim.x * 2 * 64;
    const int p_first = (blockIdx.x * 2 + wg) * 64;
    if (p_first < G.lq) wg_start_q(q_smem, qg, prm.q_row_stride, p_first, tid & 127, G);
    wg_load_kv(prm, G, b, head, k_smem, v_smem, nkt, wg, tid & 127);
    KvRest kv_rest(nkt);

    float s[2][4][4];
    // A row tile's first S is issued before its pipeline starts: the first tile's here, each next
    // one's under the epilogue of the tile before (the tensor cores were idle there: the end of a
    // row tile held 23% of the forward's warp-stall samples in the seventh run's profile). A
    // warpgroup with no row tile issues one on the first tile's rows (p = 0), and a last tile
    // issues its own first S again: unconditional issues, whose S is dropped (a wgmma issued under
    // a branch makes ptxas serialise every wgmma of the kernel). The first tile's Q and K rows are
    // in (wg_load_kv waits for both).
    {
        const FwdRowTile first = fwd_row_tile(p_first < G.lq ? p_first : 0, nkc, G);
        kv_rest.need(first.first.rows().c[1]);  // (the pair's higher chunk)
        wg_issue_scores(s, qd, kd, first.first.rows().c);
    }
    // The next wave's operands to L2 (MAPET_L2_AHEAD), while that S runs.
    if constexpr (kL2Ahead) next_wave_to_l2<false>(prm, G, tid);

#pragma unroll 1
    for (int p0 = p_first; p0 < G.lq; p0 += tile_step) {
        // The next tile's Q rows, into registers a tile ahead: they land while this tile's
        // pairs run, and on_last stores them into the Q tile. (Copied by cp.async from on_last,
        // as until the seventh run, they were waited for at the next tile's start: 2.2% of the
        // forward's warp-stall samples there.)
        const bool more = p0 + tile_step < G.lq;
        QNext qn;
        if (more) load_q_next(qn, qg, prm.q_row_stride, p0 + tile_step, tid & 127, G);

        // The lane's two rows and their windows, and the row tile's pairs of chunks, its first
        // pair's S in flight.
        float acc[8][4], mx[2], l[2];
        const FwdRows rows = fwd_rows(p0, warp, g, G);
        const int lwg = wg, ltid = tid;  // (C++17 lambdas may not capture a structured binding)
        fwd_tile_products(
            s, acc, mx, l, p0, rows, nkc, qd, kd, vd, t, G, sl2,
            [&](int chunk) { kv_rest.need(chunk); },
            [&] {
                // Every S of the tile is done (its last P V still runs): the Q tile is free for the
                // next tile's rows, loaded into registers at this tile's start.
                if (more) {
                    named_barrier(1 + lwg, 128);
                    store_q_next(q_smem, qn, ltid & 127);
                }
            });

        // The next tile's first S (or, after the last tile, this one's again, dropped), issued
        // once every thread of the warpgroup has stored its share of the next Q tile; it runs
        // while the epilogue below normalises and stores this tile's rows.
        named_barrier(1 + wg, 128);
        {
            const FwdRowTile next = fwd_row_tile(more ? p0 + tile_step : p0, nkc, G);
            kv_rest.need(next.first.rows().c[1]);
            wg_issue_scores(s, qd, kd, next.first.rows().c);
        }

        fwd_store_tile(acc, l, mx, rows, b, head, t, G, prm);
    }
    wgmma_wait_groups<0>();  // the last S issued, dropped
    pin_regs(flat32(s));
    kv_rest.finish();  // barrier 3, for a warpgroup that has not needed the rest of K and V
#else
    __trap();
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_THREADS, 2) mapet_attention_fwd_wgmma(const MapetAttention prm) {
    dependent_launch_start();
    fwd_wgmma<false>(prm);
}

// mapet_attention_fwd_wgmma_l2 (MAPET_L2_AHEAD=1, experimental): the wgmma forward, each CTA also
// sending what the CTA prm.l2_ahead launches on copies first to L2 (next_wave_to_l2). A kernel of
// its own, so that the default's code stays as a card measured it.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_THREADS, 2) mapet_attention_fwd_wgmma_l2(const MapetAttention prm) {
    dependent_launch_start();
    fwd_wgmma<true>(prm);
}

// ================================================================================================ wgmma forward, persistent (sm_90a)
// mapet_attention_fwd_wgmma_persistent (the `wgmma-persistent` set's forward; experimental): the
// wgmma forward's per-tile work, in one CTA an SM that goes through its (sample, head) pairs in
// turn (pairs blockIdx.x, blockIdx.x + gridDim.x, ...) with four warpgroups, and loads the next
// pair's K and V into a second buffer while it computes this one's.
// Why. The eighth run's profile of mapet_attention_fwd_wgmma put 18% of its warp-stall samples in
// the CTA's prologue, where both CTAs of an SM, each with the same work, start together and wait
// together for their pair's 88 KB of K and V (the seventh run's profile: 4.0% on that wait
// alone, 2-3% left of it since keys [0, 128) go first). Here only a CTA's first pair waits for
// its K and V; every later pair's were copied while the pair before it ran.
// Layout: grid (min(SMs, pairs)), 512 threads, one CTA an SM (two K/V buffers of ceil(Lk / 64)
// tiles each for K and for V, and a Q tile per warpgroup: 225 KB at ViT). Warpgroup w takes the
// row tiles w, w + 4, ... of every pair, so the launcher runs it only where the row tiles are a
// multiple of 4 (ViT: 8), which gives every warpgroup as many tiles a pair and makes the pair's
// end the same step of every warpgroup's loop; elsewhere the wgmma forward runs.
// Per tile: mapet_attention_fwd_wgmma's work, the same operations in the same order (the same bits:
// tests/attention_gpu.rs asserts it), its next tile's Q in registers a tile ahead and its next
// tile's first S under its epilogue. At a pair's end the next pair's first S reads the other
// buffer: each thread waits for its own copies of it and the block meets at a barrier first,
// which also tells every thread that no warpgroup reads the buffer just finished; once that S is
// issued and the tile's rows stored, the block starts copying the pair after next into it.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WGP_THREADS, 1)
    mapet_attention_fwd_wgmma_persistent(const MapetAttention prm) {
    dependent_launch_start();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char wg_smem_raw[];
    const Geometry G = geometry_of(prm);
    const int tid = threadIdx.x;
    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // (uniform to ptxas: see wg_thread)
    const int warp = (tid >> 5) & 3, g = (tid & 31) >> 2, t = tid & 3;
    const float sl2 = prm.scale * kLog2e;
    const int nkt = (G.lk + kBN - 1) / kBN;
    const int nkc = (G.lk + kChunk - 1) / kChunk;
    const int pairs = prm.batch * prm.heads;
    // K of buffer u at kv_smem(u), its V nkt tiles later; the warpgroups' Q tiles after both.
    const uint32_t base = sw128_align(smem_addr(wg_smem_raw));
    const uint32_t buf_bytes = 2u * static_cast<uint32_t>(nkt) * kWgTileBytes;
    auto kv_smem = [&](int u) { return base + static_cast<uint32_t>(u) * buf_bytes; };
    const uint32_t q_smem = base + 2u * buf_bytes + static_cast<uint32_t>(wg) * kWgTileBytes;
    const uint64_t qd = sw128_desc(q_smem);
    auto q_of = [&](int pair) {
        return static_cast<const bf16*>(prm.q) + (pair / prm.heads) * prm.q_batch_stride + (pair % prm.heads) * kD;
    };
    // Copies of a pair's K (threads 0-255) and V (256-511) into buffer u, keys past Lk zero-filled
    // up to the last tile's end; the caller commits them as one group.
    auto copy_kv = [&](int pair, int u) {
        const bool is_v = tid >= 2 * 128;
        const int bb = pair / prm.heads, hh = pair % prm.heads;
        const bf16* src = static_cast<const bf16*>(is_v ? prm.v : prm.k) +
                          bb * (is_v ? prm.v_batch_stride : prm.k_batch_stride) + hh * kD;
        const int64_t stride = is_v ? prm.v_row_stride : prm.k_row_stride;
        const uint32_t dst = kv_smem(u) + (is_v ? static_cast<uint32_t>(nkt) * kWgTileBytes : 0u);
        sw128_load_rows(dst, src, 2 * stride, nkt * kBN, G.lk, tid & 255, 256);
    };

    // The row tiles a warpgroup takes in a pair (every warpgroup as many), and its first one.
    const int tile_step = 4 * 64;
    const int tiles = (G.lq + 63) / 64 / 4;
    const int p_first = wg * 64;
    int pair = blockIdx.x;
    // The launcher's promises (persistent_launch), which the loop's bounds rest on: a CTA has a
    // pair, and the row tiles are a multiple of the warpgroups. Broken, rows would be skipped or
    // written out of bounds; the kernel stops instead (the same in every thread).
    if (pair >= pairs || (G.lq + 63) / 64 % 4 != 0) __trap();

    // The first pair's K, V and Q tiles, waited for; the second pair's K and V then start.
    wg_start_q(q_smem, q_of(pair), prm.q_row_stride, p_first, tid & 127, G);
    copy_kv(pair, 0);
    cp_async_commit();
    sw128_load_wait();
    __syncthreads();
    if (pair + static_cast<int>(gridDim.x) < pairs) copy_kv(pair + gridDim.x, 1);
    cp_async_commit();

    float s[2][4][4];
    int buf = 0;
    {
        const FwdRowTile first = fwd_row_tile(p_first, nkc, G);
        wg_issue_scores(s, qd, sw128_desc(kv_smem(buf)), first.first.rows().c);
    }

    // One step a row tile of the CTA's pairs: tile j of pair `pair` (p0 = p_first + j tile_step).
    int j = 0;
#pragma unroll 1
    for (;;) {
        const int p0 = p_first + j * tile_step;
        const bool pair_end = j + 1 == tiles;
        const int next_pair = pair + static_cast<int>(gridDim.x);
        const bool last = pair_end && next_pair >= pairs;
        const uint64_t kd = sw128_desc(kv_smem(buf));
        const uint64_t vd = sw128_desc(kv_smem(buf) + static_cast<uint32_t>(nkt) * kWgTileBytes);
        const int b = pair / prm.heads, head = pair % prm.heads;

        // The next tile's Q rows (this pair's next tile, or the next pair's first), into registers
        // a tile ahead, stored into the Q tile once every S of this tile is done.
        const int q_next_p0 = pair_end ? p_first : p0 + tile_step;
        QNext qn;
        if (!last) load_q_next(qn, q_of(pair_end ? next_pair : pair), prm.q_row_stride, q_next_p0, tid & 127, G);

        float acc[8][4], mx[2], l[2];
        const FwdRows rows = fwd_rows(p0, warp, g, G);
        fwd_tile_products(
            s, acc, mx, l, p0, rows, nkc, qd, kd, vd, t, G, sl2, [](int) {},
            [&] {
                if (!last) {
                    named_barrier(1 + wg, 128);
                    store_q_next(q_smem, qn, tid & 127);
                }
            });

        // Every thread of the warpgroup has stored its share of the next Q tile. At a pair's end
        // (not the last), the next pair's K and V: this thread's copies, then the block's barrier,
        // after which no warpgroup reads this pair's buffer; the pair after next then starts
        // copying into it.
        named_barrier(1 + wg, 128);
        if (pair_end && !last) {
            sw128_load_wait();
            __syncthreads();
        }
        // The next tile's first S (after the last tile, this one's again, dropped), unconditional
        // (a wgmma under a branch serialises them all); it runs under the epilogue below.
        {
            const int nbuf = pair_end && !last ? buf ^ 1 : buf;
            const FwdRowTile next = fwd_row_tile(last ? p0 : q_next_p0, nkc, G);
            wg_issue_scores(s, qd, sw128_desc(kv_smem(nbuf)), next.first.rows().c);
        }

        fwd_store_tile(acc, l, mx, rows, b, head, t, G, prm);
        // Then the pair after next into the buffer just freed, behind that S and the epilogue
        // (copies issued before them held the S back, and kept registers live across it).
        if (pair_end && !last) {
            if (next_pair + static_cast<int>(gridDim.x) < pairs) copy_kv(next_pair + gridDim.x, buf);
            cp_async_commit();
        }
        if (last) break;
        if (pair_end) {
            pair = next_pair;
            buf ^= 1;
            j = 0;
        } else {
            ++j;
        }
    }
    wgmma_wait_groups<0>();  // the last S issued, dropped
    pin_regs(flat32(s));
#else
    __trap();
#endif
}

// ================================================================================================ wgmma backward (sm_90a)
// The default backward on compute capability 9.0. In the eighth run its tests passed on an H200,
// and at ViT-B it took 0.546 ms there against the resident one's 0.797 (BENCHMARKS.md); the
// changes listed as unverified in earlier comments all ran in that run. Since then dQ and dK/dV
// send their next tile's rows to L2 at the tile's start (dQ's ran in the ninth run), their masks
// take one compare an element and dK/dV's FULL chunks skip them: neither kernel has run on a card
// as it now is (BENCHMARKS.md lists what has not).
// The dQ and dK/dV kernels on wgmma, the forward's pieces in the backward's roles, deterministic as the
// mma.sync ones (each output owned by one warpgroup, accumulated in a fixed order; no atomics).
// Both work in 32-wide chunks of the dimension they loop over (keys for dQ, positions for dK/dV),
// so that a chunk no row of the tile can see is skipped at the loop level, with no wgmma under a
// branch. Pairs computed at ViT-B over the visible ones: dQ 1.29x (61 chunks of 64 rows x 32 keys
// a pair, as the forward); dK/dV 1.50x (71 chunks of 64 keys x 32 positions): its 64-key tiles
// each straddle a hidden window's edge for some positions, and the last holds 24 keys (344 =
// 5 x 64 + 24) but costs a whole tile for every position chunk. Re-tiling the keys cannot help the
// CTA's time: the best split of the 344 keys into six runs of at most 64 computes 67 chunks, but
// the tiles holding content key 0 and the last mask key are seen by every position chunk (16
// each), and no split and deal leaves every warpgroup under 25, the busiest one's load now
// (25 / 21 / 25; an exhaustive search, scripts/dkdv-tiling.py).
// Per chunk two wgmma groups:
//   G1  S and dP (4 m64n32k16 steps each) from shared memory, both operands K-major;
//   G2  the products that take dS (and P) from registers, B read N-major from the same tiles.
// G1 of chunk n+1 is issued before G2 of chunk n, so the elementwise work of chunk n+1 (P, dS)
// runs while G2 of chunk n is on the tensor cores.
//
// mapet_attention_bwd_dq_wgmma: grid (splits, H, B), 256 threads (2 warpgroups), two CTAs an SM
//   (so that one CTA's K/V load overlaps the other's work). K and V of the pair resident (as the
//   forward), a dO tile per warpgroup (64 positions), Q's A fragments in registers (a Q tile too
//   would not leave room for two CTAs); per 32-key chunk: S = Q K^T, dP = dO V^T (G1); P =
//   exp2(S scale log2e - lse log2e), dS = P (dP - delta); dQ += dS K (G2, 2 steps of 16 keys).
//   Writes delta = rowsum(dO * O) for the dK/dV kernel. Dynamic shared memory
//   (2 ceil(Lk / 64) + 2) * 8 KB + 1 KB: 113 KB at ViT.
// mapet_attention_bwd_dkdv_wgmma: grid (splits, H, B), 384 threads (3 warpgroups), one CTA an SM.
//   Q and dO of every position of the pair resident (positions in row_at order, ceil(Lq / 64) * 64
//   rows each), with lse (log2 units; +inf past Lq, which makes P = 0 there), delta and the first
//   hidden key of each position; each warpgroup takes 64-key tiles (K and V copied into tiles of
//   its own); per 32-position chunk: S^T = K Q^T, dP^T = V dO^T (G1); P^T, dS^T elementwise with
//   the position's lse, delta and window; dV += P^T dO, dK += dS^T Q (G2). One CTA an SM, so its
//   load is not hidden behind another CTA's work: the warpgroups start once the first half of
//   the positions and their first K/V tile are in, while the second half still lands. Must run
//   after the dQ kernel (delta). Which position chunks each key tile computes, and which key tiles
//   each warpgroup takes (dealt by their live chunk counts), come with the parameters
//   (MapetAttentionDkdv, made by the host). Dynamic shared memory ceil(Lq / 64) * 64 * (256 + 12)
//   B + 48 KB + 1 KB: 183 KB at ViT (491 rows, padded to 512).

namespace {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// G1 of both kernels: x = A0 B0^T and y = A1 B1^T over 64 head columns (4 steps of 16), the A
// tiles (64 rows) and the B rows (32) K-major in swizzled shared memory, given by their
// descriptors (sw128_desc). One wgmma group.
__device__ __forceinline__ void wg_issue_pair(float (&x)[4][4], float (&y)[4][4], uint64_t a0, uint64_t b0, uint64_t a1,
                                              uint64_t b1) {
    pin_regs(flat16(x));
    pin_regs(flat16(y));
    wgmma_fence_acc();
    wgmma_m64n32k16_ss<0>(flat16(x), a0, b0);
#pragma unroll
    for (int c = 1; c < 4; ++c)
        wgmma_m64n32k16_ss<1>(flat16(x), sw128_desc_plus(a0, 32 * c), sw128_desc_plus(b0, 32 * c));
    wgmma_m64n32k16_ss<0>(flat16(y), a1, b1);
#pragma unroll
    for (int c = 1; c < 4; ++c)
        wgmma_m64n32k16_ss<1>(flat16(y), sw128_desc_plus(a1, 32 * c), sw128_desc_plus(b1, 32 * c));
    wgmma_commit_groups();
}

// dQ's G1: s = Q K^T with Q's A fragments in registers (qf[c]: head columns [16c, 16c + 16)) and
// dp = dO V^T with dO's tile in shared memory, each against the chunk's 32 rows of K or V
// (K-major), all three given by their descriptors (sw128_desc). One wgmma group.
__device__ __forceinline__ void wg_issue_s_dp(float (&s)[4][4], float (&dp)[4][4], const uint32_t (&qf)[4][4],
                                              uint64_t k_rows, uint64_t do_tile, uint64_t v_rows) {
    pin_regs(flat16(s));
    pin_regs(flat16(dp));
    wgmma_fence_acc();
    wgmma_m64n32k16_rs<0>(flat16(s), qf[0], k_rows);
#pragma unroll
    for (int c = 1; c < 4; ++c) wgmma_m64n32k16_rs<1>(flat16(s), qf[c], sw128_desc_plus(k_rows, 32 * c));
    wgmma_m64n32k16_ss<0>(flat16(dp), do_tile, v_rows);
#pragma unroll
    for (int c = 1; c < 4; ++c)
        wgmma_m64n32k16_ss<1>(flat16(dp), sw128_desc_plus(do_tile, 32 * c), sw128_desc_plus(v_rows, 32 * c));
    wgmma_commit_groups();
}

// acc += A B over a 32-deep chunk: A = a[c] (register fragments of the chunk's 16-deep step c), B
// the chunk's 32 rows (descriptor rows, 128 bytes a row) read N-major. No fence or commit: the
// caller's.
__device__ __forceinline__ void wg_chunk_product(float (&acc)[8][4], const uint32_t (&a)[2][4], uint64_t rows) {
#pragma unroll
    for (int c = 0; c < 2; ++c) wgmma_m64n64k16_rs_nmajor(flat32(acc), a[c], sw128_desc_plus(rows, 16 * 128 * c));
}

__device__ __forceinline__ uint32_t (&flat8(uint32_t (&x)[2][4]))[8] { return reinterpret_cast<uint32_t (&)[8]>(x); }
__device__ __forceinline__ uint32_t (&flat16(uint32_t (&x)[4][4]))[16] { return reinterpret_cast<uint32_t (&)[16]>(x); }


// dQ's elementwise step on a finished chunk (keys [k0, k0 + 32), PARTIAL or FULL): hidden scores
// masked, then s <- dS = P (dP - delta), P = exp2(S sl2 - lse2), for the lane's rows g (elements
// 0, 1) and g+8.
__device__ __forceinline__ void dq_chunk_ds(float (&s)[4][4], const float (&dp)[4][4], int k0, bool partial, int a_lo,
                                            int a_hi, const RowStats& rs, int t, const Geometry& G, float sl2) {
    const int kb0 = k0 + 2 * t;
    mask_scores(s, partial ? kPartial : kFull, k0 + kChunk > G.lk, 0, a_lo - kb0, a_hi - kb0, G.lk - kb0, G.p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float pv = fast_exp2(fmaf(s[j][e], sl2, -(e < 2 ? rs.lse2_lo : rs.lse2_hi)));
            s[j][e] = pv * (dp[j][e] - (e < 2 ? rs.delta_lo : rs.delta_hi));
        }
    }
}

// Starts copying the pair's K and V rows [k0, k0 + 64) into a warpgroup's swizzled tiles at k_smem
// and v_smem (keys past Lk zero-filled), by the warpgroup's thread i.
__device__ __forceinline__ void copy_kv_tile(const MapetAttention& prm, const Geometry& G, int b, int head,
                                             uint32_t k_smem, uint32_t v_smem, int k0, int i) {
    const bf16* kg = static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD;
    const bf16* vg = static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD;
    sw128_load_rows(k_smem, kg + static_cast<int64_t>(k0) * prm.k_row_stride, 2 * prm.k_row_stride, kBN, G.lk - k0,
                    i, 128);
    sw128_load_rows(v_smem, vg + static_cast<int64_t>(k0) * prm.v_row_stride, 2 * prm.v_row_stride, kBN, G.lk - k0,
                    i, 128);
}

// The 16 bf16 columns [16t, 16t+16) of row r of a 128-byte-swizzled 64-column tile: its chunks
// 2t and 2t + 1 (sw128_offset).
__device__ __forceinline__ void tile_row_cols16(uint4 (&x)[2], const unsigned char* tile, int r, int t) {
    x[0] = *reinterpret_cast<const uint4*>(tile + sw128_offset(r, 2 * t));
    x[1] = *reinterpret_cast<const uint4*>(tile + sw128_offset(r, 2 * t + 1));
}

// Most 64-key tiles the wgmma dK/dV kernel takes: Lk < Lq <= 1024 (the launcher's CUDA_WG_MAX_ROWS).
constexpr int kDkdvMaxKeyTiles = 16;
static_assert(kDkdvMaxKeyTiles == MAPET_DKDV_MAX_KEY_TILES, "the plan's arrays (params.h)");
// Most positions of that kernel's stats a thread loads (lqp <= 1024 over the block's threads).
constexpr int kDkdvStatsPerThread = (kDkdvMaxKeyTiles * kBN + MAPET_ATTN_WG_DKDV_THREADS - 1) / MAPET_ATTN_WG_DKDV_THREADS;

// The key tiles a warpgroup of the dK/dV kernel computes, in order: 4 bits a tile, the first in
// the lowest bits, and their count; from the launch's plan (MapetAttentionDkdv::deal, made by
// the host: src/ops/attention.rs, dkdv_params). The CTA's key tiles (those kt with (kt / 3) %
// gridDim.x == blockIdx.x) are dealt to its three warpgroups so that their live chunk counts come
// out even: at ViT's N = 197, C = 50 the six tiles have 16, 9, 5, 11, 14 and 16 live chunks,
// which a fixed deal (tile w and w + 3 to warpgroup w) split 27 / 23 / 21, and this one 25 / 21 /
// 25. Each tile is computed the same whichever warpgroup takes it, so the results do not depend
// on the deal. (Until the seventh run every CTA classified the chunks and dealt the tiles itself,
// ahead of its first K/V copies: a block barrier and a chain of shared-memory loads, about 6% of
// the kernel's warp-stall samples in that run's profile.)
struct TileList {
    uint64_t tiles;
    int n;
    __device__ __forceinline__ int at(int i) const { return static_cast<int>((tiles >> (4 * i)) & 15u); }
};

// The per-position data a lane's elements of one 32-position chunk need (positions p0 + 8j + 2t
// and the one after, for j < 4): lse (log2 units), delta and first hidden key, from shared memory.
struct DkdvChunkStats {
    float2 lse2[4];
    float2 delta[4];
    int2 a[4];
};

// Loads the stats of chunk p0 for lane t. The dK/dV kernel loads a chunk's stats when it issues
// the chunk's G1, so that they land while the tensor cores run it: loaded after the wait, as
// they were, their first uses stalled on shared-memory latency with the tensor cores idle (about
// a tenth of the kernel's warp-stall samples in the seventh run's profile, BENCHMARKS.md).
// kPinned (the wgmma-peek kernel): volatile loads, which the compiler keeps where they are among
// the kernel's other volatile asm (end_basic_block's, the wgmma's) instead of sinking them into
// the block that uses them.
template <bool kPinned = false>
__device__ __forceinline__ void load_dkdv_chunk_stats(DkdvChunkStats& cs, int p0, const float* s_lse2,
                                                      const float* s_delta, const int* s_a, int t) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int pos = p0 + 8 * j + 2 * t;
        if constexpr (kPinned) {
            asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                         : "=f"(cs.lse2[j].x), "=f"(cs.lse2[j].y)
                         : "r"(smem_addr(s_lse2 + pos)));
            asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                         : "=f"(cs.delta[j].x), "=f"(cs.delta[j].y)
                         : "r"(smem_addr(s_delta + pos)));
            asm volatile("ld.shared.v2.s32 {%0, %1}, [%2];\n" : "=r"(cs.a[j].x), "=r"(cs.a[j].y) : "r"(smem_addr(s_a + pos)));
        } else {
            cs.lse2[j] = *reinterpret_cast<const float2*>(s_lse2 + pos);
            cs.delta[j] = *reinterpret_cast<const float2*>(s_delta + pos);
            cs.a[j] = *reinterpret_cast<const int2*>(s_a + pos);
        }
    }
}

// plan.a.l2_ahead > 0 (MAPET_L2_AHEAD, experimental): the wgmma dK/dV kernels run one CTA an SM,
// and each starts by copying the Q and dO rows of the first half of its pair's positions (the
// fused kernel: reading every O and dO row too, for delta) with nothing else on the SM to cover
// the wait, from DRAM: those rows were last touched by other kernels. The CTA that starts on an
// SM when this one ends is about the one launched plan.a.l2_ahead (the SM count) after it, since
// CTAs are handed out in launch order. So this one sends that CTA's rows to L2 once its own
// copies are queued (behind them, and while its threads wait for them):
// - the Q and dO rows of the first half of the positions (`half`, as the copies' group A; the
//   second half lands while the warpgroups compute); the fused kernel's dO rows all, and its O
//   rows, which its prologue reads all of;
// - the pair's lse, and delta (not the fused kernel's: it has none).
// Where a pair has several CTAs (gridDim.x > 1), only its first one's predecessor sends them,
// once. About 63 KB a pair at ViT (157 KB fused), 8 MB (21 MB) for a wave of 132. Hints only:
// nothing waits for them or reads them here, so no result can change.
// Each 32-byte sector gets a prefetch of its own (consecutive threads take a row's four), since
// a prefetch is only sure to bring the sector it names. Not the bulk prefetch
// (cp.async.bulk.prefetch.L2), which takes a whole span in one instruction: its address is a
// uniform register, so per-thread rows compile to a loop over the warp's lanes, 32 in turn.
template <bool kFused>
__device__ __forceinline__ void dkdv_next_wave_to_l2(const MapetAttentionDkdv& plan, const Geometry& G, int half,
                                                     int tid) {
    const MapetAttention& prm = plan.a;
    const LaterCta later = later_cta(plan.a.l2_ahead);
    if (later.x != 0) return;  // past the grid, or not its pair's first CTA
    const int head = later.head, b = later.b;
    const int64_t pair = later.pair;
    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const bf16* dog = static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
    const bf16* og = static_cast<const bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
    // Q (and dO) rows of the first half's positions, in position order (row_at).
    for (int i = tid; i < 4 * half; i += MAPET_ATTN_WG_DKDV_THREADS) {
        const int64_t r = row_at(i >> 2, G), col = 16 * (i & 3);  // sector i % 4 (16 bf16) of the row
        if (r >= G.lq) continue;
        prefetch_l2(qg + r * prm.q_row_stride + col);
        if constexpr (!kFused) prefetch_l2(dog + r * prm.do_row_stride + col);
    }
    // The fused kernel's O and dO rows, all of them, in row order.
    if constexpr (kFused) {
        for (int i = tid; i < 4 * G.lq; i += MAPET_ATTN_WG_DKDV_THREADS) {
            const int64_t r = i >> 2, col = 16 * (i & 3);
            prefetch_l2(dog + r * prm.do_row_stride + col);
            prefetch_l2(og + r * prm.o_row_stride + col);
        }
    }
    // lse and delta: G.lq floats each from (b H + head) Lq, a 32-byte sector (8 floats) a
    // prefetch, the last one at the last float (the span need not start on a sector).
    for (int i = 8 * tid; i < G.lq + 7; i += 8 * MAPET_ATTN_WG_DKDV_THREADS) {
        const int64_t at = pair * G.lq + min(i, G.lq - 1);
        prefetch_l2(prm.lse + at);
        if constexpr (!kFused) prefetch_l2(prm.delta + at);
    }
}

// dK/dV's elementwise step on a finished chunk (positions [p0, p0 + 32), PARTIAL or FULL against
// the warpgroup's keys): st <- P^T, dpt <- dS^T.
// Element e of n-chunk j is key key_lo (e < 2) or key_hi against position p0 + 8j + 2t + (e & 1),
// whose stats are cs's. Positions past Lq have lse = +inf, so P = 0 there with no mask.
// A PARTIAL chunk's hidden scores are first set to -inf, so that their P = 2^-inf is 0, behind a
// branch on `partial`, which is the same in every thread of the warpgroup (a chunk's class): a
// FULL chunk (24 of ViT's 71 a pair) then runs no test at all. Until then each element's test
// and a select ran in every chunk, a third of the step's instructions an element. The same
// bits either way wherever a position's lse is finite (every real row: it sees N >= 1 keys) or
// +inf (past Lq): 2^(-inf * sl2 - lse2) = +0, as the select's 0 was.
// kTail (the fused kernel): keys past Lk are hidden too. Their K and V rows are zeros, so their
// dK and dV rows (never stored) are all the other kernels get from them; the fused kernel's
// dQ^T = K^T dS^T sums over keys, and 0 * dS is NaN where P = 2^-lse2 overflows (lse below about
// -88). A tile that reaches past Lk is always PARTIAL, so no FULL chunk pays for the test.
template <bool kTail = false>
__device__ __forceinline__ void dkdv_chunk_grads(float (&st)[4][4], float (&dpt)[4][4], bool partial, int key_lo,
                                                 int key_hi, const DkdvChunkStats& cs, const Geometry& G, float sl2) {
    if (partial) {
        // kTail: whether the lane's two keys are past Lk, once a chunk. The tests are bitwise:
        // with || ptxas made every element a branch of its own (BSSY, BRA, BSYNC).
        const bool dead_lo = kTail && key_lo >= G.lk, dead_hi = kTail && key_hi >= G.lk;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool hid = in_window(e < 2 ? key_lo : key_hi, (e & 1) ? cs.a[j].y : cs.a[j].x, G.p) |
                                 (e < 2 ? dead_lo : dead_hi);
                st[j][e] = hid ? -INFINITY : st[j][e];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 lse2 = cs.lse2[j];
        const float2 delta = cs.delta[j];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float pv = fast_exp2(fmaf(st[j][e], sl2, -((e & 1) ? lse2.y : lse2.x)));
            dpt[j][e] = pv * (dpt[j][e] - ((e & 1) ? delta.y : delta.x));
            st[j][e] = pv;
        }
    }
}

#endif

// The wgmma dQ kernel's body; kL2Ahead: the CTA sends the next wave's operands to L2 (next_wave_to_l2).
template <bool kL2Ahead>
__device__ __forceinline__ void bwd_dq_wgmma(const MapetAttention& prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char wg_smem_raw[];
    const Geometry G = geometry_of(prm);
    const auto [tid, wg, warp, g, t, head, b] = wg_thread();
    const float sl2 = prm.scale * kLog2e;
    const int nkt = (G.lk + kBN - 1) / kBN;
    const int nkc = (G.lk + kChunk - 1) / kChunk;
    const uint32_t k_smem = sw128_align(smem_addr(wg_smem_raw));
    const uint32_t v_smem = k_smem + static_cast<uint32_t>(nkt) * kWgTileBytes;
    const uint32_t do_smem = v_smem + static_cast<uint32_t>(nkt + wg) * kWgTileBytes;  // this warpgroup's dO tile
    const uint64_t kd = sw128_desc(k_smem), vd = sw128_desc(v_smem), dod = sw128_desc(do_smem);
    const unsigned char* do_tile = wg_smem_raw + (do_smem - smem_addr(wg_smem_raw));

    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const bf16* og = static_cast<const bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
    const bf16* dog = static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
    const int64_t stat0 = (static_cast<int64_t>(b) * prm.heads + head) * G.lq;  // lse/delta row 0
    // A row tile's operands that only G1 reads, and what its rows' delta and lse are made of: its
    // dO rows into the warpgroup's tile, its Q rows into A fragments, the lane's O columns and the
    // lse of its two rows into registers (the dO columns of delta are read from the tile). Started
    // for the first tile beside K and V (wg_load_kv waits for every copy of the thread), and for
    // each next one under the current tile's last dQ product (on_last), so that a tile starts
    // with its loads landed.
    uint32_t qf[4][4];
    uint4 o_lo[2], o_hi[2];
    float lse_lo = 0.f, lse_hi = 0.f;
    const int lwarp = warp, lg = g, lt = t, lwg = wg, ltid = tid;  // (lambdas may not capture a structured binding)
    auto start_tile = [&](int p) {
        const int lo = row_at(p + 16 * lwarp + lg, G), hi = row_at(p + 16 * lwarp + lg + 8, G);
        copy_positions(do_smem, dog, prm.do_row_stride, p, 64, ltid & 127, 128, G);
        load_a_frags(qf, qg, prm.q_row_stride, lo, hi, G.lq, lt);
        load_row_cols16(o_lo, og, prm.o_row_stride, lo, lo < G.lq, lt);
        load_row_cols16(o_hi, og, prm.o_row_stride, hi, hi < G.lq, lt);
        lse_lo = lo < G.lq ? prm.lse[stat0 + lo] : 0.f;
        lse_hi = hi < G.lq ? prm.lse[stat0 + hi] : 0.f;
    };
    const int tile_step = gridDim.x * 2 * 64;
    const int p_first = (blockIdx.x * 2 + wg) * 64;
    if (p_first < G.lq) start_tile(p_first);
    wg_load_kv(prm, G, b, head, k_smem, v_smem, nkt, wg, tid & 127);
    KvRest kv_rest(nkt);

    // G1 (S and dP) of a row tile's first chunk, from its Q fragments and dO tile. A tile's first
    // G1 is issued before its pipeline starts, as the forward's first S: the first tile's here,
    // each next one's under the epilogue of the tile before. Unconditional issues (see the
    // forward): a warpgroup with no row tile issues one on tile 0's chunk (its Q and dO never
    // loaded), and a last tile issues its own again; both are dropped.
    float s[4][4], dp[4][4];
    auto issue_first_g1 = [&](int p) {
        uint32_t live = row_tile_chunks(p, nkc, G).live;  // (every row sees N >= 1 keys: a first)
        const int kc = take_chunk(live);
        kv_rest.need(kc);
        const uint32_t rows = static_cast<uint32_t>(kc * kChunk) * 128;
        wg_issue_s_dp(s, dp, qf, sw128_desc_plus(kd, rows), dod, sw128_desc_plus(vd, rows));
    };
    issue_first_g1(p_first < G.lq ? p_first : 0);
    // The next wave's operands to L2 (MAPET_L2_AHEAD), while that G1 runs.
    if constexpr (kL2Ahead) next_wave_to_l2<true>(prm, G, tid);

#pragma unroll 1
    for (int p0 = p_first; p0 < G.lq; p0 += tile_step) {
        const int r_lo = row_at(p0 + 16 * warp + g, G), r_hi = row_at(p0 + 16 * warp + g + 8, G);
        const bool ok_lo = r_lo < G.lq, ok_hi = r_hi < G.lq;
        const int a_lo = first_hidden(min(r_lo, G.lq - 1), G), a_hi = first_hidden(min(r_hi, G.lq - 1), G);
        // The next tile's Q, dO and O rows, on their way to L2 from the tile's start, a tile
        // before on_last loads them (a chunk before, as until the eighth run, left most of
        // their DRAM latency to the wait after the pipeline: 6% of the kernel's warp-stall
        // samples in that run's profile).
        const int pf_row = prefetch_row(p0 + tile_step, tid & 127, G);
        if (pf_row >= 0) {
            prefetch_l2(qg + static_cast<int64_t>(pf_row) * prm.q_row_stride);
            prefetch_l2(dog + static_cast<int64_t>(pf_row) * prm.do_row_stride);
            prefetch_l2(og + static_cast<int64_t>(pf_row) * prm.o_row_stride);
        }

        // The rows' delta and lse, from the tile's dO rows (positions past Lq zero-filled; landed
        // before the tile's first G1 was issued) and the loads start_tile made.
        pin_regs(flat16(qf));
        RowStats rs;
        {
            uint4 d_lo[2], d_hi[2];
            tile_row_cols16(d_lo, do_tile, 16 * warp + g, t);
            tile_row_cols16(d_hi, do_tile, 16 * warp + g + 8, t);
            rs.delta_lo = quad_sum(dot16_bf16(d_lo, o_lo));
            rs.delta_hi = quad_sum(dot16_bf16(d_hi, o_hi));
        }
        rs.lse2_lo = ok_lo ? lse_lo * kLog2e : 0.f;  // rows past Lq: P = 1, dS = 0
        rs.lse2_hi = ok_hi ? lse_hi * kLog2e : 0.f;
        if (t == 0) {
            if (ok_lo) prm.delta[stat0 + r_lo] = rs.delta_lo;
            if (ok_hi) prm.delta[stat0 + r_hi] = rs.delta_hi;
        }

        float dq[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
        uint32_t ds[2][4];

        const ChunkMasks chunks = row_tile_chunks(p0, nkc, G);
        uint32_t rest = chunks.live;
        const bool more = p0 + tile_step < G.lq;
        wg_pipeline<true>(
            take_chunk(rest),  // its G1 in flight
            [&](int, int& kn) {
                if (rest == 0) return false;
                kn = take_chunk(rest);
                return true;
            },
            [&](int kc) {
                kv_rest.need(kc);
                const uint32_t rows = static_cast<uint32_t>(kc * kChunk) * 128;
                wg_issue_s_dp(s, dp, qf, sw128_desc_plus(kd, rows), dod, sw128_desc_plus(vd, rows));
            },
            [&] {
                pin_regs(flat16(s));
                pin_regs(flat16(dp));
            },
            [&](int kc) {
                dq_chunk_ds(s, dp, kc * kChunk, (chunks.partial >> kc) & 1u, a_lo, a_hi, rs, lt, G, sl2);
                return 0;
            },
            [&] {
                pin_regs(flat32(dq));
                pin_regs(flat8(ds));
            },
            [&](int) { pack_chunk(ds, s); },
            [&](int kc) {
                pin_regs(flat32(dq));
                wgmma_fence_acc();
                wg_chunk_product(dq, ds, sw128_desc_plus(kd, static_cast<uint32_t>(kc * kChunk) * 128));
                wgmma_commit_groups();
            },
            [&] {
                // Every G1 of the tile is done: its dO tile and Q fragments are free.
                if (more) {
                    named_barrier(1 + lwg, 128);
                    start_tile(p0 + tile_step);
                }
            });

        // The next tile's first G1 (or, after the last tile, this one's again, dropped), once its
        // dO rows have landed (each thread its own copies, then all of the warpgroup's), under the
        // epilogue below. Its Q fragments came with start_tile; the issue waits for their loads.
        sw128_load_wait();
        named_barrier(1 + wg, 128);
        issue_first_g1(more ? p0 + tile_step : p0);

        bf16* dqg = static_cast<bf16*>(prm.dq) + b * prm.dq_batch_stride + head * kD;
        store_frag_rows_paired(dq, prm.scale, prm.scale, dqg, prm.dq_row_stride, r_lo, r_hi, G.lq, t);
    }
    wgmma_wait_groups<0>();  // the last G1 issued, dropped
    pin_regs(flat16(s));
    pin_regs(flat16(dp));
    kv_rest.finish();  // barrier 3, for a warpgroup that has not needed the rest of K and V
#else
    __trap();
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_DQ_THREADS, 2)
    mapet_attention_bwd_dq_wgmma(const MapetAttention prm) {
    dependent_launch_start();
    bwd_dq_wgmma<false>(prm);
}

// mapet_attention_bwd_dq_wgmma_l2 (MAPET_L2_AHEAD=1, experimental): the wgmma dQ kernel, each CTA
// also sending what the CTA prm.l2_ahead launches on copies first to L2 (next_wave_to_l2), a
// kernel of its own as the forward's.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_DQ_THREADS, 2)
    mapet_attention_bwd_dq_wgmma_l2(const MapetAttention prm) {
    dependent_launch_start();
    bwd_dq_wgmma<true>(prm);
}

namespace {

// ---- The fused backward (wgmma-fused; fused_dq_notes)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// fused_dq_notes: mapet_attention_bwd_dkdv_wgmma_fused is the wgmma dK/dV kernel that also
// computes dQ, so that the backward runs five products of the (row, key) size where the dQ and
// dK/dV kernels run seven (both recompute S and dP). Per position chunk, after G1 and the
// elementwise step, each warpgroup has P^T and dS^T (its 64 keys x the chunk's 32 positions) in
// registers. Its finish stores both transposed into tiles of its own ([32 positions x 64 keys]
// bf16, 128-byte swizzle; sw128_store_frags_transposed), once the warpgroup has met at a barrier
// (a warp's wait covers only its own part of the previous G2, and every part reads all of the
// tiles), and G2 reads them from there, after a second barrier: dV += P^T dO and dK += dS^T Q
// with A read M-major from the tiles (wg_fused_g2), and a third product, dQ^T (64 dims x 32
// positions) = K^T dS^T (A = the warpgroup's K tile read M-major, B = the dS tile). With A from
// shared memory, P^T's and dS^T's 16 registers are free once stored, which pays for dQ^T's 16
// (with A in registers, as the other dK/dV kernels run G2, ptxas spilled 344 bytes). The next chunk's G2 issue (or the end of the key tile) first adds that dQ^T tile into
// the pair's f32 accumulator in global memory by red.global.add.v4.f32 (red_add_acc_tile): after
// the chunk after it has had its G1 issued, so that the reductions and the warpgroup's barrier
// for the tile stores run while the tensor cores have that G1. One CTA a pair, so the
// accumulator (64 x 512 f32 at ViT, 128 KB; 17 MB for 132 CTAs) only lives while its CTA runs:
// the CTA zeroes it first, and at its end converts it into dq and drops its lines from L2
// unwritten (discard_l2), so it never costs a DRAM pass. delta, which the dQ kernels compute on
// the way, the CTA computes in its prologue from its positions' O and dO rows (row_delta), while
// its copies fly.
// Not deterministic: the three warpgroups' additions into an element of dQ come in no fixed
// order, so dQ may differ in its last bits from run to run (dK and dV do not).
// Keys past Lk are masked in its elementwise step (dkdv_chunk_grads<true>): dQ^T sums over keys.
// What it costs beside the saved products: a third product and a shared-memory round trip a
// chunk for P^T and dS^T with two warpgroup barriers, 16 registers held from one G2 to the next,
// the reductions (about 0.9 GB at ViT-B, what mapet_hopper_dq_reduce measures alone), and the
// next key tile's K and V copied only after the tile's last G2 (which now reads K).
// Its deal is the balanced kernel's on the 64-key tiles (balanced_notes: one tile a CTA may be
// shared by two warpgroups; at ViT 24 / 23 / 24 chunks where whole tiles give 25 / 21 / 25). Its
// key runs stay the 64-key tiles, since its dQ sums over keys and a FULL chunk masks none; the
// hand-off slot is the pair's in global memory (plan.hand: its shared memory has no 32 KB left),
// whose lines the taking warpgroup drops from L2 once read.
// Experimental, unverified on GPU.

constexpr int kPosTileBytes = 32 * 128;  // a [32 positions x 64 keys] bf16 tile (P^T's, dS^T's)

// delta of one row: sum_d dO[d] O[d] over its 64 bf16 values, by dot16_bf16 16 at a time.
__device__ __forceinline__ float row_delta(const bf16* o, const bf16* d_o) {
    const uint4* ov = reinterpret_cast<const uint4*>(o);
    const uint4* dv = reinterpret_cast<const uint4*>(d_o);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint4 x[2] = {__ldg(dv + 2 * i), __ldg(dv + 2 * i + 1)};
        const uint4 y[2] = {__ldg(ov + 2 * i), __ldg(ov + 2 * i + 1)};
        s += dot16_bf16(x, y);
    }
    return s;
}

// The fused kernel's G2 for a chunk, one wgmma group: dv += P^T dO and dk += dS^T Q, A from the
// P and dS tiles (pd, dsd: positions as rows) read M-major and B the chunk's dO and Q rows (dor,
// qr) read N-major, two 16-position steps; then dQ^T (64 dims x 32 positions) = K^T dS^T into
// dqt, A = the warpgroup's K tile (kd, keys as rows) read M-major, B = the dS tile K-major, four
// 16-key steps.
__device__ __forceinline__ void wg_fused_g2(float (&dv)[32], float (&dk)[32], float (&dqt)[16], uint64_t pd,
                                            uint64_t dsd, uint64_t dor, uint64_t qr, uint64_t kd) {
    pin_regs(dv);
    pin_regs(dk);
    pin_regs(dqt);
    wgmma_fence_acc();
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        wgmma_m64n64k16_ss_mn(dv, sw128_desc_plus(pd, 2048 * c), sw128_desc_plus(dor, 2048 * c));
        wgmma_m64n64k16_ss_mn(dk, sw128_desc_plus(dsd, 2048 * c), sw128_desc_plus(qr, 2048 * c));
    }
    wgmma_m64n32k16_ss_mmajor<0>(dqt, kd, dsd);
#pragma unroll
    for (int c = 1; c < 4; ++c)
        wgmma_m64n32k16_ss_mmajor<1>(dqt, sw128_desc_plus(kd, 2048 * c), sw128_desc_plus(dsd, 32 * c));
    wgmma_commit_groups();
}

// dq rows = scale * the pair's accumulator (f32 [64, lqp], dims by positions), as bf16, through
// `stage` ([lqp, 64] bf16, the Q tiles, free once every product is done): first the accumulator
// in 16-byte loads (a lane a dim: one row of the accumulator each, four positions a load, several
// loads in flight a thread), transposed into stage; then a position's 128 bytes of stage to its
// row row_at(position) of dq, 8 threads a row (positions past Lq are not stored). Read straight
// from the accumulator a lane a position, 64 loads a position held ptxas to 168 registers and
// spilled. Every thread of the dK/dV block; ends with the stores in flight.
__device__ __forceinline__ void convert_dq_acc(bf16* dqg, int64_t row_stride, const float* acc, int lqp, float scale,
                                               unsigned char* stage, int tid, const Geometry& G) {
    __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(stage);
    const int n = 64 * (lqp / 4);
#pragma unroll 4
    for (int i = tid; i < n; i += MAPET_ATTN_WG_DKDV_THREADS) {
        const int d = i & 63, q = 4 * (i >> 6);
        const float4 v = __ldcg(reinterpret_cast<const float4*>(acc + static_cast<int64_t>(d) * lqp + q));
        tile[(q + 0) * 64 + d] = __float2bfloat16_rn(v.x * scale);
        tile[(q + 1) * 64 + d] = __float2bfloat16_rn(v.y * scale);
        tile[(q + 2) * 64 + d] = __float2bfloat16_rn(v.z * scale);
        tile[(q + 3) * 64 + d] = __float2bfloat16_rn(v.w * scale);
    }
    __syncthreads();
    for (int i = tid; i < 8 * lqp; i += MAPET_ATTN_WG_DKDV_THREADS) {
        const int q = i >> 3, part = i & 7;
        const int row = row_at(q, G);
        if (row < G.lq)
            *reinterpret_cast<uint4*>(dqg + static_cast<int64_t>(row) * row_stride + 8 * part) =
                *reinterpret_cast<const uint4*>(tile + q * 64 + 8 * part);
    }
}
#endif

// The wgmma dK/dV kernels' body. kPeek (mapet_attention_bwd_dkdv_wgmma_peek, the wgmma-peek set;
// written after the ninth run, unverified on GPU): each chunk's stats are loaded at the end of the
// previous chunk's elementwise step (the next chunk is the lowest bit of the chunks left), a
// basic block before their first use and away from every wgmma issue; the default loads them
// at the chunk's G1 issue, where ptxas puts the loads and the hidden-key tests that use them in
// among the issues (about 9% of the kernel's warp-stall samples in the eighth run's profile; loaded
// after all the issues instead, the kernel took 8% longer in the ninth run, BENCHMARKS.md). The
// same operations in the same order, so the same bits.
// kFused (mapet_attention_bwd_dkdv_wgmma_fused, the wgmma-fused set; written after the ninth run,
// unverified on GPU): dQ too, so that no dQ kernel runs (fused_dq_notes below).
// kBalanced (mapet_attention_bwd_dkdv_wgmma_balanced, the wgmma-balanced set; written after the
// ninth run, unverified on GPU): the plan's key tiles and shares of them (balanced_notes below).
template <bool kPeek, bool kFused = false, bool kBalanced = false>
__device__ __forceinline__ void bwd_dkdv_wgmma(const MapetAttentionDkdv& plan) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char wg_smem_raw[];
    const MapetAttention& prm = plan.a;
    const Geometry G = geometry_of(prm);
    const auto [tid, wg, warp, g, t, head, b] = wg_thread();
    const float sl2 = prm.scale * kLog2e;
    const int nkt = (G.lk + kBN - 1) / kBN;
    const int lqp = (G.lq + 63) / 64 * 64;  // positions held (whole 64-row tiles)
    const int npc = (G.lq + kChunk - 1) / kChunk;
    // [Q | dO | K tiles | V tiles | lse2 | delta | first hidden], the swizzled parts 1024-aligned.
    const uint32_t q_smem = sw128_align(smem_addr(wg_smem_raw));
    const uint32_t do_smem = q_smem + static_cast<uint32_t>(lqp) * 128;
    const uint32_t k_smem = do_smem + static_cast<uint32_t>(lqp) * 128 + wg * kWgTileBytes;  // this warpgroup's
    const uint32_t v_smem = k_smem + 3 * kWgTileBytes;                                       // K and V tiles
    const uint64_t qd = sw128_desc(q_smem), dod = sw128_desc(do_smem), kd = sw128_desc(k_smem), vd = sw128_desc(v_smem);
    // kFused: this warpgroup's P^T and dS^T tiles, [32 positions x 64 keys] bf16 each, after the
    // K and V tiles.
    const uint32_t p_smem = q_smem + static_cast<uint32_t>(lqp) * 256 + 6 * kWgTileBytes + wg * 2 * kPosTileBytes;
    const uint32_t ds_smem = p_smem + kPosTileBytes;
    const uint64_t pd = sw128_desc(p_smem), dsd = sw128_desc(ds_smem);
    float* s_lse2 = reinterpret_cast<float*>(wg_smem_raw + (q_smem - smem_addr(wg_smem_raw)) + 2 * lqp * 128 +
                                             6 * kWgTileBytes + (kFused ? 6 * kPosTileBytes : 0));
    float* s_delta = s_lse2 + lqp;
    int* s_a = reinterpret_cast<int*>(s_delta + lqp);
    // kBalanced: the hand-off slot (a warpgroup's dK and dV in f32, MAPET_DKDV_HAND_SLOT_BYTES),
    // after the stats (16-byte aligned, as 12 lqp bytes are); the fused kernel's, whose shared
    // memory has no room for it, the pair's in global memory (plan.hand; one CTA a pair).
    float4* const hand = kFused ? reinterpret_cast<float4*>(plan.hand) +
                                      (static_cast<int64_t>(b) * prm.heads + head) * (MAPET_DKDV_HAND_SLOT_BYTES / 16)
                                : reinterpret_cast<float4*>(s_a + lqp);
    if (nkt > kDkdvMaxKeyTiles || static_cast<int>(gridDim.x) > MAPET_DKDV_MAX_CTAS) __trap();  // (the plan's bounds)
    const int me = 3 * blockIdx.x + wg;  // this warpgroup's entries of the plan
    const TileList mine{plan.deal[me], plan.deal_count[me]};
    // Key tile kt's first key, and the end of the keys it stores.
    auto tile_key0 = [&](int kt) { return kBalanced ? plan.tile_start[kt] : kt * kBN; };
    auto tile_key_end = [&](int kt) { return kBalanced ? plan.tile_end[kt] : G.lk; };

    // The copies, in three cp.async groups so that work starts before they have all landed:
    // (A) the Q and dO rows of the first half of the positions, (K) the K and V tile of this
    // warpgroup's first key tile, (B) the second half's rows. The warpgroups start once A and K
    // are in (a block barrier); B is waited for, with a second block barrier that every thread
    // reaches exactly once (b_ready), before the first chunk that needs it, or at the end.
    const int half = lqp / 2 / kChunk * kChunk;
    const bf16* qg = static_cast<const bf16*>(prm.q) + b * prm.q_batch_stride + head * kD;
    const bf16* dog = static_cast<const bf16*>(prm.d_o) + b * prm.do_batch_stride + head * kD;
    // The thread's positions' lse and delta (pos = tid + k * threads), loaded before any copy is
    // started: issued after them (as until the seventh run), they queued behind the block's
    // 176 KB of copies and came after all three groups, where the start waits for two; and a
    // loop of loads and shared stores served the positions one after the other. Their wait was
    // the largest single stall of the kernel's prologue there (4.4% of its warp-stall samples).
    // Stored to shared memory below, while the copies fly.
    if (lqp > kDkdvStatsPerThread * MAPET_ATTN_WG_DKDV_THREADS) __trap();  // (within CUDA_WG_MAX_ROWS; never taken)
    const int64_t stat0 = (static_cast<int64_t>(b) * prm.heads + head) * G.lq;
    int stat_row[kDkdvStatsPerThread];
    float stat_lse[kDkdvStatsPerThread], stat_delta[kDkdvStatsPerThread];
#pragma unroll
    for (int k = 0; k < kDkdvStatsPerThread; ++k) {
        const int pos = tid + k * MAPET_ATTN_WG_DKDV_THREADS;
        stat_row[k] = pos < lqp ? row_at(pos, G) : G.lq;
        const bool ok = stat_row[k] < G.lq;
        stat_lse[k] = ok ? __ldg(prm.lse + stat0 + stat_row[k]) : 0.f;
        if constexpr (!kFused) stat_delta[k] = ok ? __ldg(prm.delta + stat0 + stat_row[k]) : 0.f;
    }
    copy_positions_q_do(q_smem, qg, prm.q_row_stride, do_smem, dog, prm.do_row_stride, 0, half, tid,
                        MAPET_ATTN_WG_DKDV_THREADS, G);
    cp_async_commit();
    if (mine.n > 0) copy_kv_tile(prm, G, b, head, k_smem, v_smem, tile_key0(mine.at(0)), tid & 127);
    cp_async_commit();
    copy_positions_q_do(q_smem + half * 128, qg, prm.q_row_stride, do_smem + half * 128, dog, prm.do_row_stride, half,
                        lqp - half, tid, MAPET_ATTN_WG_DKDV_THREADS, G);
    cp_async_commit();
    // kFused: no dQ kernel ran before to compute delta = rowsum(dO * O): the thread computes its
    // positions' from their O and dO rows, one position at a time, while the copies fly (the dO
    // rows are the ones the copies bring, so one of the two reads is served by L2).
    if constexpr (kFused) {
        const bf16* og = static_cast<const bf16*>(prm.o) + b * prm.o_batch_stride + head * kD;
#pragma unroll
        for (int k = 0; k < kDkdvStatsPerThread; ++k) {
            const int row = stat_row[k];
            stat_delta[k] = row < G.lq ? row_delta(og + static_cast<int64_t>(row) * prm.o_row_stride,
                                                   dog + static_cast<int64_t>(row) * prm.do_row_stride)
                                       : 0.f;
        }
    }
    // Every position's lse (log2 units), delta and first hidden key, while the copies fly.
#pragma unroll
    for (int k = 0; k < kDkdvStatsPerThread; ++k) {
        const int pos = tid + k * MAPET_ATTN_WG_DKDV_THREADS, row = stat_row[k];
        if (pos >= lqp) continue;
        const bool ok = row < G.lq;
        // Past Lq: lse = +inf, so P = exp2(S sl2 - inf) = 0 and dS = 0 (S and dP are 0 there).
        s_lse2[pos] = ok ? stat_lse[k] * kLog2e : INFINITY;
        s_delta[pos] = ok ? stat_delta[k] : 0.f;
        s_a[pos] = ok ? first_hidden(row, G) : 0;
    }
    if (plan.a.l2_ahead > 0) dkdv_next_wave_to_l2<kFused>(plan, G, half, tid);
    // kFused: the pair's dQ accumulator zeroed before any warpgroup adds to it (the barrier
    // below). One CTA a pair (the launcher's grid), so it holds every key tile's share.
    float* dq_acc = nullptr;
    if constexpr (kFused) {
        if (gridDim.x != 1) __trap();
        dq_acc = plan.dq_acc + (static_cast<int64_t>(b) * prm.heads + head) * 64 * lqp;
        for (int i = tid; i < 16 * lqp; i += MAPET_ATTN_WG_DKDV_THREADS)
            reinterpret_cast<float4*>(dq_acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    sw128_load_wait_groups<1>();  // A and K
    __syncthreads();
    // The second half has landed once every thread has waited for its own copies of it and met
    // the others at barrier 4: a warpgroup arrives there from inside its tile loop, when its first
    // chunk past the half comes up, or after the loop, so the barrier is the unaligned form.
    bool b_ready = false;
    auto need_chunk = [&](int pc) {
        if (!b_ready && (pc + 1) * kChunk > half) {
            sw128_load_wait();
            named_barrier_anywhere(4, MAPET_ATTN_WG_DKDV_THREADS);
            b_ready = true;
        }
    };

    const int lwg = wg, ltid = tid, lb = b, lhead = head;  // (lambdas may not capture a structured binding)
    const int lwarp = warp, llane = tid & 31;
#pragma unroll 1
    for (int i = 0; i < mine.n; ++i) {
        const int kt = mine.at(i);
        const int k0 = tile_key0(kt);
        if (i != 0) {
            sw128_load_wait();  // this tile's K and V, started under the previous tile's last products
            named_barrier(1 + wg, 128);
        }
        // The next tile's K and V into the warpgroup's tiles, once every product that reads this
        // tile's is done: from the pipeline's on_last (all G1 done; G2 reads Q and dO only), or
        // here below when this tile has no chunk to compute.
        bool next_started = false;
        auto start_next = [&] {
            if (i + 1 < mine.n) {
                named_barrier(1 + lwg, 128);
                copy_kv_tile(prm, G, lb, lhead, k_smem, v_smem, tile_key0(mine.at(i + 1)), ltid & 127);
            }
            next_started = true;
        };
        const int key_lo = k0 + 16 * warp + g, key_hi = key_lo + 8;  // the lane's two keys
        // The warpgroup's next K and V rows, on their way to L2 from this tile's start (threads
        // < 64, one key each), a tile before on_last copies them (a chunk before until the eighth
        // run).
        if (i + 1 < mine.n && (tid & 127) < kBN) {
            const int pf_key = tile_key0(mine.at(i + 1)) + (tid & 127);
            if (pf_key < G.lk) {
                prefetch_l2(static_cast<const bf16*>(prm.k) + b * prm.k_batch_stride + head * kD +
                            static_cast<int64_t>(pf_key) * prm.k_row_stride);
                prefetch_l2(static_cast<const bf16*>(prm.v) + b * prm.v_batch_stride + head * kD +
                            static_cast<int64_t>(pf_key) * prm.v_row_stride);
            }
        }

        float dk[8][4], dv[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
            dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
        }
        float st[4][4], dpt[4][4];
        uint32_t pa[2][4], da[2][4];
        DkdvChunkStats cs;  // the stats of the chunk whose G1 was issued last
        // kFused: the dQ^T tile of the chunk dq_pc (64 dims x its 32 positions), in flight from
        // its G2 until the next chunk's G2 issue (or the pipeline's end) adds it to dq_acc.
        float dqt[16];
        int dq_pc = -1;

        // A tile no position can see (none at ViT) stores zeros. kBalanced: of a tile shared with
        // another warpgroup, the chunks the plan gives this one.
        uint32_t keep = ~0u;
        if constexpr (kBalanced) {
            if (i == 0) keep &= plan.keep_first[me];
            if (i == mine.n - 1) keep &= plan.keep_last[me];
        }
        const ChunkMasks chunks{plan.live[kt] & keep, plan.partial[kt]};
        uint32_t rest = chunks.live;
        const int lt = t;  // (C++17 lambdas may not capture a structured binding)
        if (rest != 0) {
            const int first = take_chunk(rest);
            if constexpr (kPeek) load_dkdv_chunk_stats<true>(cs, first * kChunk, s_lse2, s_delta, s_a, lt);
            wg_pipeline(
                first,
                [&](int, int& pn) {
                    if (rest == 0) return false;
                    pn = take_chunk(rest);
                    return true;
                },
                [&](int pc) {
                    need_chunk(pc);
                    const uint32_t rows = static_cast<uint32_t>(pc * kChunk) * 128;
                    wg_issue_pair(st, dpt, kd, sw128_desc_plus(qd, rows), vd, sw128_desc_plus(dod, rows));
                    if constexpr (!kPeek) load_dkdv_chunk_stats(cs, pc * kChunk, s_lse2, s_delta, s_a, lt);
                },
                [&] {
                    pin_regs(flat16(st));
                    pin_regs(flat16(dpt));
                },
                [&](int pc) {
                    dkdv_chunk_grads<kFused>(st, dpt, (chunks.partial >> pc) & 1u, key_lo, key_hi, cs, G, sl2);
                    // The next chunk's stats (the pipeline's next takes it from rest).
                    if constexpr (kPeek) {
                        if (rest != 0) load_dkdv_chunk_stats<true>(cs, next_chunk(rest) * kChunk, s_lse2, s_delta, s_a, lt);
                    }
                    return 0;
                },
                [&] {
                    pin_regs(flat32(dv));
                    pin_regs(flat32(dk));
                    if constexpr (kFused) {
                        pin_regs(dqt);  // (P^T and dS^T go to G2 through shared memory)
                    } else {
                        pin_regs(flat8(pa));
                        pin_regs(flat8(da));
                    }
                },
                [&](int) {
                    pack_chunk(pa, st);
                    pack_chunk(da, dpt);
                    if constexpr (kFused) {
                        // The previous chunk's G2 is done in every warp of the warpgroup (each
                        // warp's wait covers only the products it issued, and every warp's part
                        // of G2 reads all of the tiles): the tiles take this chunk's P^T and
                        // dS^T, for this chunk's G2 (issue_g2 below, after the next chunk's G1).
                        named_barrier(5 + lwg, 128);
                        sw128_store_frags_transposed(p_smem, pa, lwarp, llane);
                        sw128_store_frags_transposed(ds_smem, da, lwarp, llane);
                        fence_proxy_async_smem();
                    }
                },
                [&](int pc) {
                    const uint32_t rows = static_cast<uint32_t>(pc * kChunk) * 128;
                    if constexpr (kFused) {
                        // The previous chunk's dQ^T (its G2 is done) goes to L2 while the next
                        // chunk's G1, issued just before, runs on the tensor cores; then every
                        // warp's tile stores (finish) are in before this chunk's G2 reads them.
                        if (dq_pc >= 0) red_add_acc_tile(dq_acc + dq_pc * kChunk, lqp, dqt);
                        dq_pc = pc;
                        named_barrier(5 + lwg, 128);
                        wg_fused_g2(flat32(dv), flat32(dk), dqt, pd, dsd, sw128_desc_plus(dod, rows),
                                    sw128_desc_plus(qd, rows), kd);
                        return;
                    }
                    pin_regs(flat32(dv));
                    pin_regs(flat32(dk));
                    wgmma_fence_acc();
                    wg_chunk_product(dv, pa, sw128_desc_plus(dod, rows));
                    wg_chunk_product(dk, da, sw128_desc_plus(qd, rows));
                    wgmma_commit_groups();
                },
                // kFused: the last G2 reads K as well (dQ^T = K^T dS^T), so the next tile's K
                // and V wait for it: start_next below, after the pipeline.
                [&] {
                    if constexpr (!kFused) start_next();
                });
            if constexpr (kFused) {
                red_add_acc_tile(dq_acc + dq_pc * kChunk, lqp, dqt);  // the last chunk's
                dq_pc = -1;
            }
        }
        if (!next_started) start_next();
        if constexpr (kBalanced) {
            // A shared tile (balanced_notes): the warpgroup that starts with it leaves its part
            // in the slot, the one that ends with it adds that part to its own and stores. The
            // same thread of both holds the same (key, dim) elements.
            // Thread i of a warpgroup writes its 16 float4 at i + 128 j: a warp's stores and loads
            // are 512 contiguous bytes. The barrier orders the global slot's accesses as it does
            // shared memory's (both warpgroups are of this CTA); they go through L2 (.cg).
            float4* const h = hand + (tid & 127);
            if (i == 0 && plan.hand_out[me] != 0) {
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    const float(&x)[4] = j < 8 ? dk[j] : dv[j - 8];
                    const float4 v = make_float4(x[0], x[1], x[2], x[3]);
                    if constexpr (kFused) {
                        __stcg(h + 128 * j, v);
                    } else {
                        h[128 * j] = v;
                    }
                }
                named_barrier_arrive(8, 256);
                continue;
            }
            if (i == mine.n - 1 && plan.hand_in[me] != 0) {
                named_barrier(8, 256);
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    float(&x)[4] = j < 8 ? dk[j] : dv[j - 8];
                    const float4 v = kFused ? __ldcg(h + 128 * j) : h[128 * j];
                    x[0] += v.x, x[1] += v.y, x[2] += v.z, x[3] += v.w;
                }
            }
        }
        bf16* dkg = static_cast<bf16*>(prm.dk) + b * prm.dk_batch_stride + head * kD;
        bf16* dvg = static_cast<bf16*>(prm.dv) + b * prm.dv_batch_stride + head * kD;
        const int key_end = tile_key_end(kt);
        store_frag_rows_paired(dk, prm.scale, prm.scale, dkg, prm.dk_row_stride, key_lo, key_hi, key_end, t);
        store_frag_rows_paired(dv, 1.f, 1.f, dvg, prm.dv_row_stride, key_lo, key_hi, key_end, t);
        if constexpr (kFused && kBalanced) {
            if (i == mine.n - 1 && plan.hand_in[me] != 0) {
                // The warp's 64 lines of the global slot (4 a j) leave L2 unwritten, two a lane:
                // after the stores, which used every value the warp loaded from them, so that no
                // load of the warp is still in flight (__syncwarp orders them too, but ptxas emits
                // nothing for it).
                __syncwarp();
                const int lane = tid & 31;
#pragma unroll
                for (int l = 2 * lane; l < 2 * lane + 2; ++l)
                    discard_l2(hand + 128 * (l >> 2) + 32 * warp + 8 * (l & 3), 128, 0, 1);
            }
        }
    }
    need_chunk(npc);  // barrier 4, for a warpgroup that has not needed the second half
    if constexpr (kFused) {
        // Every warpgroup's additions performed at L2 (each thread's fence waits for its own)
        // before the block reads the accumulator back, converts it into dq and lets L2 drop it.
        __threadfence();
        __syncthreads();
        bf16* dqg = static_cast<bf16*>(prm.dq) + b * prm.dq_batch_stride + head * kD;
        unsigned char* stage = wg_smem_raw + (q_smem - smem_addr(wg_smem_raw));  // the Q tiles, done with
        convert_dq_acc(dqg, prm.dq_row_stride, dq_acc, lqp, prm.scale, stage, tid, G);
        __syncthreads();
        discard_l2(dq_acc, 64 * lqp * 4, tid, MAPET_ATTN_WG_DKDV_THREADS);
    }
#else
    __trap();
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_DKDV_THREADS, 1)
    mapet_attention_bwd_dkdv_wgmma(const __grid_constant__ MapetAttentionDkdv plan) {
    dependent_launch_start();
    bwd_dkdv_wgmma<false>(plan);
}

extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_DKDV_THREADS, 1)
    mapet_attention_bwd_dkdv_wgmma_peek(const __grid_constant__ MapetAttentionDkdv plan) {
    dependent_launch_start();
    bwd_dkdv_wgmma<true>(plan);
}

// balanced_notes: mapet_attention_bwd_dkdv_wgmma_balanced is the wgmma dK/dV kernel on a plan
// that evens out its warpgroups' work. The default's CTA waits for its busiest warpgroup: at
// ViT's N = 197, C = 50 the six 64-key tiles have 16, 9, 5, 11, 14 and 16 live chunks (71), dealt
// whole as 25 / 21 / 25. The balanced plan (src/ops/attention.rs, balanced_runs, balanced_deal):
//  - splits the keys into as many runs of at most 64 as the default has tiles, with the fewest
//    live chunks over all such splits (67 at ViT: [0, 63), [63, 127), [127, 191), [191, 216),
//    [216, 280), [280, 344), with 16, 9, 5, 9, 12 and 16). The kernel computes the 64 keys from a
//    run's start and stores the run's; the keys past it are computed and dropped (no key's dK or
//    dV depends on another's);
//  - deals the runs to the warpgroups so that the busiest computes the fewest chunks, letting one
//    run a CTA be shared by two warpgroups (23 / 21 / 23 at ViT, the 16-chunk run [280, 344)
//    shared as 14 + 2). Of a shared run, one warpgroup computes its first chunks (those of the
//    copy group that lands first) as its first tile, leaves its partial dK and dV (f32) in the
//    hand-off slot and arrives at named barrier 8; the other computes the rest as its last tile,
//    waits there, adds the partial and stores the run. No wait can close a cycle with barrier 4 (the second
//    copy group, which every thread meets once): the handing warpgroup meets barrier 4 before it
//    arrives at 8 only if its chunks reach the second group, and then so do the waiting one's
//    (later chunks), which meets 4 in its tile loop, before its wait at 8.
// dK and dV of a shared run are summed in another order than the default's (deterministic still).

// The fused backward's one kernel (fused_dq_notes): grid (1, H, B); plan.dq_acc holds B * H * 64 *
// (Lq rounded up to 64) floats; plan.hand, where the plan shares a tile, B * H hand-off slots of
// MAPET_DKDV_HAND_SLOT_BYTES; prm.delta is not read.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_DKDV_THREADS, 1)
    mapet_attention_bwd_dkdv_wgmma_fused(const __grid_constant__ MapetAttentionDkdv plan) {
    dependent_launch_start();
    bwd_dkdv_wgmma<false, true, true>(plan);
}

// The balanced dK/dV kernel (balanced_notes): the wgmma dK/dV kernel's launch, with
// MAPET_DKDV_HAND_SLOT_BYTES more dynamic shared memory where its plan shares a run.
extern "C" __global__ void __launch_bounds__(MAPET_ATTN_WG_DKDV_THREADS, 1)
    mapet_attention_bwd_dkdv_wgmma_balanced(const __grid_constant__ MapetAttentionDkdv plan) {
    dependent_launch_start();
    bwd_dkdv_wgmma<false, false, true>(plan);
}
