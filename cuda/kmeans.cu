// k-means on the GPU: nearest-centroid assignment and the centroid update of Lloyd's algorithm.
//
// Assignment (src/ops/kmeans.rs runs it per chunk of points):
//
//   scores[r, j] = x_r . c_j              cuBLASLt, bf16 x [rows, dim] times bf16 c [k, dim]^T,
//                                         f32 accumulation, f32 output [rows, k]
//   d_j          = |c_j|^2 - 2 scores[r, j]          (f32; |c_j|^2 from kmeans_row_norms)
//   ids[r]       = lowest j with d_j = min d          (ties -> lowest index)
//   sq_dists[r]  = max(0, |x_r|^2 + d_{ids[r]})
//
// kmeans_assign_argmin gives each row one warp: the lanes walk the row's k scores in increasing
// index (float4 loads when k % 4 == 0), keep the first strict minimum, and a shuffle reduction
// over (value, index) pairs ordered lexicographically keeps the lowest index among equal values.
// The same warp sums |x_r|^2 from the bf16 row (16-byte loads when dim % 8 == 0). NaN scores
// never win; a row with no finite or infinite candidate gets id 0 and a NaN distance.
//
// Update: means of the clusters, c_j = (1 / n_j) sum_{ids[i] = j} x_i, deterministic (the same
// bits on every run) with no float atomics, in six small kernels:
//
//   kmeans_tile_counts     one warp per tile of `tile` consecutive points: zeroes its row of the
//                          table tile_counts [tiles, k + 1], then counts its ids with
//                          __match_any_sync (each id group's leader adds the group size: the row
//                          belongs to this warp alone, so no atomics). Ids >= k go to column k.
//   kmeans_tile_scan       one thread per column j: replaces the column by its exclusive prefix
//                          over tiles and writes counts[j] (counts[k] = number of invalid ids).
//   kmeans_offsets         one block: offsets = exclusive scan of counts[0..k], offsets[k] = total.
//   kmeans_scatter         one warp per tile again: order[offsets[j] + start of (tile, j) + rank
//                          among equal ids earlier in the tile] = i. `order` lists the points
//                          sorted by id, stable (increasing index inside each cluster).
//   kmeans_segment_sums    the sorted positions are cut into pieces of `piece` positions; one
//                          block per (piece, 256 columns of dim), one thread per column, walks its
//                          piece in order and sums x over each run of equal ids (one cluster's
//                          segment [offsets[j], offsets[j+1])) in f32. A segment that lies inside
//                          the piece is complete: its mean is written at once. A segment cut by a
//                          piece boundary has its partial sum stored in slots [pieces, 2, dim]:
//                          slot 0 ("head") when it contains the piece's first position, else
//                          slot 1 ("tail": then it runs past the piece's end).
//   kmeans_segment_fixup   one block per (cluster, 256 columns): for a segment spanning pieces
//                          p0 < p1, sums in f64 and in piece order slot (s == p0*piece ? 0 : 1)
//                          of p0 and slot 0 of p0+1 .. p1, and writes the mean.
//
// Every sum runs in a fixed order that depends only on the ids, so the result is bit-identical
// from run to run and does not depend on the card. Work is balanced whatever the cluster sizes:
// a block sums at most `piece` points per column. Rows of empty clusters are not written (the
// host re-seeds them). kmeans_gather copies rows (sub-sampling, initial and re-seeded centroids).
//
// Layouts: all matrices row-major and packed; x, centroids_bf16 bf16; ids uint32; positions and
// counts int32 (the host checks n < 2^31).
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "params.h"

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowWarps = 8;        // row kernels: 256 threads, one warp per row
constexpr int kTileWarps = 4;       // tile kernels: 128 threads, one warp per tile
constexpr int kColumnThreads = 256;  // column kernels: one thread per column of dim
constexpr uint32_t kSentinel = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

// Sum of squares of one bf16 row, by one warp; the result is valid in every lane.
__device__ __forceinline__ float row_sq_norm(const __nv_bfloat16* row, int dim, int lane) {
    float acc = 0.f;
    if ((dim & 7) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
        const uint4* v = reinterpret_cast<const uint4*>(row);
        for (int i = lane; i < dim / 8; i += kWarp) {
            const uint4 q = v[i];
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float2 f = __bfloat1622float2(h[t]);
                acc = fmaf(f.x, f.x, acc);
                acc = fmaf(f.y, f.y, acc);
            }
        }
    } else {
        for (int i = lane; i < dim; i += kWarp) {
            const float f = __bfloat162float(row[i]);
            acc = fmaf(f, f, acc);
        }
    }
    return warp_sum(acc);
}

// (d, j) replaces (best, best_j) when it is smaller in the order (value, then index). NaN never
// compares smaller, so it is never kept.
__device__ __forceinline__ void keep_min(float d, int j, float& best, int& best_j) {
    if (d < best || (d == best && j < best_j)) {
        best = d;
        best_j = j;
    }
}

__device__ __forceinline__ void store_mean(const MapetKMeansUpdate& p, int64_t c, int64_t d, float mean) {
    p.centroids[c * p.dim + d] = mean;
    static_cast<__nv_bfloat16*>(p.centroids_bf16)[c * p.dim + d] = __float2bfloat16_rn(mean);
}

// The end of a run of cluster `c` inside piece [a, b) of the sorted order, in column d: a whole
// segment gets its mean, a cut one goes to the piece's head or tail slot (see the top).
__device__ __forceinline__ void flush_segment(const MapetKMeansUpdate& p, int32_t c, float acc, int64_t a,
                                              int64_t b, int64_t d) {
    const int64_t s = p.offsets[c];
    const int64_t e = p.offsets[c + 1];
    if (s >= a && e <= b) {
        store_mean(p, c, d, acc / (float)(e - s));
    } else {
        const int64_t slot = s <= a ? 0 : 1;
        p.slots[((int64_t)blockIdx.x * 2 + slot) * p.dim + d] = acc;
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) kmeans_row_norms(MapetKMeansRowNorms p) {
    dependent_launch_start();
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int64_t row = (int64_t)blockIdx.x * kRowWarps + warp;
    if (row >= p.rows) return;
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + row * p.dim;
    const float s = row_sq_norm(x, p.dim, lane);
    if (lane == 0) p.out[row] = s;
}

extern "C" __global__ void __launch_bounds__(256) kmeans_assign_argmin(MapetKMeansAssign p) {
    dependent_launch_start();
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int64_t row = (int64_t)blockIdx.x * kRowWarps + warp;
    if (row >= p.rows) return;
    const float* s = p.scores + row * p.k;
    float best = INFINITY;
    int best_j = INT_MAX;
    // Each lane visits its indices in increasing order, so a strict comparison keeps the lowest.
    if ((p.k & 3) == 0) {
        const float4* s4 = reinterpret_cast<const float4*>(s);
        const float4* n4 = reinterpret_cast<const float4*>(p.c_norms);
        for (int i = lane; i < p.k / 4; i += kWarp) {
            const float4 sv = s4[i];
            const float4 nv = __ldg(n4 + i);
            keep_min(fmaf(-2.f, sv.x, nv.x), 4 * i, best, best_j);
            keep_min(fmaf(-2.f, sv.y, nv.y), 4 * i + 1, best, best_j);
            keep_min(fmaf(-2.f, sv.z, nv.z), 4 * i + 2, best, best_j);
            keep_min(fmaf(-2.f, sv.w, nv.w), 4 * i + 3, best, best_j);
        }
    } else {
        for (int j = lane; j < p.k; j += kWarp) keep_min(fmaf(-2.f, s[j], __ldg(p.c_norms + j)), j, best, best_j);
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(kFull, best, o);
        const int oj = __shfl_xor_sync(kFull, best_j, o);
        keep_min(ob, oj, best, best_j);
    }
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + row * p.dim;
    const float xn = row_sq_norm(x, p.dim, lane);
    if (lane == 0) {
        const bool found = best_j != INT_MAX;
        p.ids[row] = found ? (uint32_t)best_j : 0u;
        p.sq_dists[row] = found ? fmaxf(xn + best, 0.f) : NAN;
    }
}

extern "C" __global__ void __launch_bounds__(128) kmeans_tile_counts(MapetKMeansUpdate p) {
    dependent_launch_start();
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int64_t tile = (int64_t)blockIdx.x * kTileWarps + warp;
    if (tile >= p.tiles) return;
    const int64_t ld = (int64_t)p.k + 1;
    int32_t* row = p.tile_counts + tile * ld;
    for (int64_t c = lane; c < ld; c += kWarp) row[c] = 0;
    __syncwarp();
    const int64_t begin = tile * p.tile;
    const int64_t end = min(begin + (int64_t)p.tile, p.n);
    for (int64_t base = begin; base < end; base += kWarp) {
        const int64_t i = base + lane;
        uint32_t key = kSentinel;
        if (i < end) {
            const uint32_t id = p.ids[i];
            key = id < (uint32_t)p.k ? id : (uint32_t)p.k;
        }
        const unsigned peers = __match_any_sync(kFull, key);
        if (key != kSentinel && lane == __ffs(peers) - 1) row[key] += __popc(peers);
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(256) kmeans_tile_scan(MapetKMeansUpdate p) {
    dependent_launch_start();
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t ld = (int64_t)p.k + 1;
    if (c >= ld) return;
    int32_t run = 0;
    for (int64_t t = 0; t < p.tiles; ++t) {
        int32_t* e = p.tile_counts + t * ld + c;
        const int32_t v = *e;
        *e = run;
        run += v;
    }
    p.counts[c] = run;
}

extern "C" __global__ void __launch_bounds__(1024) kmeans_offsets(MapetKMeansUpdate p) {
    dependent_launch_start();
    __shared__ int32_t warp_prefix[32];
    __shared__ int32_t carry_shared;
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    if (threadIdx.x == 0) carry_shared = 0;
    __syncthreads();
    for (int64_t base = 0; base < p.k; base += blockDim.x) {
        const int64_t c = base + threadIdx.x;
        const int32_t v = c < p.k ? p.counts[c] : 0;
        int32_t incl = v;
#pragma unroll
        for (int o = 1; o < kWarp; o <<= 1) {
            const int32_t t = __shfl_up_sync(kFull, incl, o);
            if (lane >= o) incl += t;
        }
        if (lane == kWarp - 1) warp_prefix[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            const int32_t w = lane < warps ? warp_prefix[lane] : 0;
            int32_t wi = w;
#pragma unroll
            for (int o = 1; o < kWarp; o <<= 1) {
                const int32_t t = __shfl_up_sync(kFull, wi, o);
                if (lane >= o) wi += t;
            }
            warp_prefix[lane] = wi - w;  // exclusive prefix of the warp totals
        }
        __syncthreads();
        const int32_t carry = carry_shared;
        const int32_t before = carry + warp_prefix[warp] + incl;  // inclusive prefix of c
        if (c < p.k) p.offsets[c] = before - v;
        __syncthreads();  // every thread has read carry_shared and warp_prefix
        if (threadIdx.x == blockDim.x - 1) carry_shared = before;
        __syncthreads();
    }
    if (threadIdx.x == 0) p.offsets[p.k] = carry_shared;
}

extern "C" __global__ void __launch_bounds__(128) kmeans_scatter(MapetKMeansUpdate p) {
    dependent_launch_start();
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int64_t tile = (int64_t)blockIdx.x * kTileWarps + warp;
    if (tile >= p.tiles) return;
    const int64_t ld = (int64_t)p.k + 1;
    int32_t* row = p.tile_counts + tile * ld;  // start of each cluster's run of this tile
    const int64_t begin = tile * p.tile;
    const int64_t end = min(begin + (int64_t)p.tile, p.n);
    const unsigned lower = (1u << lane) - 1u;
    for (int64_t base = begin; base < end; base += kWarp) {
        const int64_t i = base + lane;
        uint32_t key = kSentinel;
        if (i < end) {
            const uint32_t id = p.ids[i];
            if (id < (uint32_t)p.k) key = id;
        }
        const unsigned peers = __match_any_sync(kFull, key);
        if (key != kSentinel) {
            const int32_t pos = p.offsets[key] + row[key] + __popc(peers & lower);
            p.order[pos] = (int32_t)i;
        }
        __syncwarp();  // every lane has read row[key] before its leader moves it on
        if (key != kSentinel && lane == __ffs(peers) - 1) row[key] += __popc(peers);
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(256) kmeans_segment_sums(MapetKMeansUpdate p) {
    dependent_launch_start();
    __shared__ int32_t s_point[kColumnThreads];
    __shared__ int32_t s_cluster[kColumnThreads];
    const int64_t total = p.offsets[p.k];
    const int64_t a = (int64_t)blockIdx.x * p.piece;
    const int64_t b = min(a + (int64_t)p.piece, total);
    if (a >= b) return;  // uniform over the block
    const int64_t d = (int64_t)blockIdx.y * kColumnThreads + threadIdx.x;
    const bool active = d < p.dim;
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
    int32_t cur = -1;
    float acc = 0.f;
    for (int64_t q0 = a; q0 < b; q0 += kColumnThreads) {
        const int cnt = (int)min((int64_t)kColumnThreads, b - q0);
        __syncthreads();  // the previous batch is consumed
        if (threadIdx.x < cnt) {
            const int32_t pt = p.order[q0 + threadIdx.x];
            s_point[threadIdx.x] = pt;
            s_cluster[threadIdx.x] = (int32_t)p.ids[pt];
        }
        __syncthreads();
        for (int i = 0; i < cnt; ++i) {
            const int32_t c = s_cluster[i];
            if (c != cur) {
                if (cur >= 0 && active) flush_segment(p, cur, acc, a, b, d);
                cur = c;
                acc = 0.f;
            }
            if (active) acc += __bfloat162float(x[(int64_t)s_point[i] * p.dim + d]);
        }
    }
    if (active) flush_segment(p, cur, acc, a, b, d);
}

extern "C" __global__ void __launch_bounds__(256) kmeans_segment_fixup(MapetKMeansUpdate p) {
    dependent_launch_start();
    const int64_t c = blockIdx.x;
    const int64_t s = p.offsets[c];
    const int64_t e = p.offsets[c + 1];
    if (s == e) return;
    const int64_t p0 = s / p.piece;
    const int64_t p1 = (e - 1) / p.piece;
    if (p0 == p1) return;  // written whole by kmeans_segment_sums
    const int64_t d = (int64_t)blockIdx.y * kColumnThreads + threadIdx.x;
    if (d >= p.dim) return;
    const int64_t first_slot = s == p0 * p.piece ? 0 : 1;
    double acc = (double)p.slots[(p0 * 2 + first_slot) * p.dim + d];
    for (int64_t q = p0 + 1; q <= p1; ++q) acc += (double)p.slots[(q * 2) * p.dim + d];
    store_mean(p, c, d, (float)(acc / (double)(e - s)));
}

extern "C" __global__ void __launch_bounds__(256) kmeans_gather(MapetKMeansGather p) {
    dependent_launch_start();
    const int64_t r = blockIdx.x;
    const int64_t d = (int64_t)blockIdx.y * kColumnThreads + threadIdx.x;
    if (r >= p.rows || d >= p.dim) return;
    const int64_t src_row = p.src_rows[r];
    const int64_t dst_row = p.dst_rows != nullptr ? (int64_t)p.dst_rows[r] : r;
    const __nv_bfloat16 v = static_cast<const __nv_bfloat16*>(p.src)[src_row * p.dim + d];
    static_cast<__nv_bfloat16*>(p.dst_bf16)[dst_row * p.dim + d] = v;
    if (p.dst_f32 != nullptr) p.dst_f32[dst_row * p.dim + d] = __bfloat162float(v);
}
