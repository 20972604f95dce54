// Codebook cross-entropy: the per-row part of the fused decoder head + loss, and the small
// deterministic reductions around it. The GEMMs (acc = x W^T, dx = dlogits W, dW += dlogits^T x)
// run in cuBLASLt; src/ops/cross_entropy.rs drives them chunk by chunk so that no [R, V] tensor
// ever exists in device memory, only one chunk of bf16 logits.
//
// Math, for one row r of a chunk (V = vocab, t = targets[r]):
//   l_j    = acc[r, j] + bias[j]       acc is the bf16 GEMM output; the f32 bias is added here,
//                                      in f32, so it is never rounded to bf16 (cuBLASLt's bias
//                                      epilogue takes the bias in the output type, bf16)
//   m      = max_j l_j
//   lse_r  = m + log(sum_j exp(l_j - m))                      (f32)
//   loss_r = lse_r - l_t,  0 when t < 0 (ignored row)
//   argmax_r = the LOWEST j with l_j == m (ties resolve to the lowest index, as on the CPU)
//   training variant, in place:  acc[r, j] <- grad_scale * (exp(l_j - lse_r) - [j == t])  as bf16,
//                                all 0 for an ignored row; grad_scale = dloss / n_valid, where
//                                n_valid counts the rows of the whole call with t >= 0.
//
// Layouts: logits bf16 [rows, ld] row-major (ld >= vocab; the host passes ld = vocab, packed, as
// the GEMM wrapper writes it). When vocab and ld are multiples of 8 (V = 8192), every row starts
// 16-byte aligned and is read and written 8 values (one uint4) at a time, the bias 8 floats (two
// float4) at a time; otherwise a scalar path runs (any V, e.g. 37 or 8191). bias f32 [vocab];
// targets i32 [rows]; row_loss, row_lse f32 [rows]; row_argmax i32 [rows]; partial f32
// [groups, vocab] (16-byte aligned); dbias f32 [vocab]; result i32 [2].
//
// Kernels:
//   cross_entropy_rows           (vocab % 8 != 0 or vocab > 8192) one block of 256 threads per row. One pass over the row keeps,
//                                per thread, an online (max, sum-exp, argmax) triple; the block
//                                merges them (warp shuffles, then one warp over the warp
//                                results) in a fixed order, so the result is deterministic. The
//                                training variant then re-reads the row (it is in L1/L2: the
//                                block read it moments ago) and overwrites it with dlogits.
//                                (The model's V = 8192 runs cross_entropy_rows_held instead.)
//   cross_entropy_rows_held      what cross_entropy_rows does (both variants) where vocab % 8
//                                == 0 and vocab <= 8192 (the model's 8192): a block per group
//                                of rows, each thread's slice of a row held in registers (read
//                                once, never re-read; one exponential per logit), and in
//                                training the column sums of the dlogits it writes accumulated
//                                per thread over the block's rows and added to partial[block, :]
//                                (the bias gradient, with no second pass over the dlogits). One
//                                kernel for both variants, so the forward alone and training
//                                give the same statistics bit for bit.
//   cross_entropy_rows_paired    cross_entropy_rows_held with two rows at a time a block (two
//                                halves of 256 threads, the halves' column sums added before
//                                the block's): half the groups for as many rows in flight, so
//                                half the column-sum scratch and larger chunks (an experiment,
//                                off by default: MAPET_CE_ROW_BLOCKS=paired).
//   cross_entropy_colsum_partial db's column sums of dlogits, without float atomics, for the
//                                other vocab sizes: block (x, g) adds the sum of rows
//                                [g*per, (g+1)*per) of its columns to partial[g, :].
//   cross_entropy_colsum_finish  dbias[c] += sum_g partial[g, c] in a fixed order, once per call
//                                (partial is zeroed by the host and added to by every chunk).
//   cross_entropy_reduce         one block: mean loss over the rows with t >= 0 (f64
//                                accumulation, fixed order) and the count of rows whose
//                                argmax equals the target; written to result[0] (f32 bits) and
//                                result[1], so the host reads back 8 bytes once per call.
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "colsum.cuh"
#include "params.h"

namespace {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kReduceThreads = 1024;
// cross_entropy_rows_held: 8-column groups per thread, so vocab <= 8 * kRowThreads * kGradPer.
constexpr int kGradPer = 4;
constexpr int kGradMaxVocab = 8 * kRowThreads * kGradPer;
static_assert(kGradMaxVocab == 8192, "GRAD_MAX_VOCAB in src/ops/cross_entropy.rs");
// cross_entropy_colsum_finish: columns per block and slices of the groups per column.
constexpr int kFinishCols = 32;
constexpr int kFinishSlices = 8;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNoIndex = 0x7fffffff;

// Online softmax statistics of a set of logits: m = max, s = sum exp(l - m), idx = lowest index
// of the max. The empty set is (-inf, 0, kNoIndex).
struct Stat {
    float m;
    float s;
    int idx;
};

constexpr float kLog2e = 1.4426950408889634f;

// 2^x on the SFU (MUFU.EX2, within 2 ulp): +0 for -inf, NaN for NaN.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// e^x as 2^(x log2(e)): one multiply and one MUFU.EX2, against about eight instructions for the
// accurate expf, in kernels bound by instruction issue (BENCHMARKS.md, third run). The rounding
// of x * log2(e) (or of the FFMA that cross_entropy_rows_held folds it into) adds a relative
// error of about |x| * 2^-24: about 1e-6 for the |x| <= 20 whose terms matter against a sum of
// at least 1, far below the bf16 roundings around it.
__device__ __forceinline__ float fast_exp(float x) {
    return ex2(x * kLog2e);
}

// a <- a merged with b. The max and its lowest index are exact and order-free; s depends on the
// order through rounding only, and the callers fix the order.
__device__ __forceinline__ void merge(Stat& a, const Stat& b) {
    if (b.m > a.m || (b.m == a.m && b.idx < a.idx)) {
        a.idx = b.idx;
    }
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) {
        return;  // both empty: s stays 0
    }
    a.s = a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m);
    a.m = m;
}

__device__ __forceinline__ Stat warp_merge(Stat v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        Stat o;
        o.m = __shfl_xor_sync(kFullMask, v.m, off);
        o.s = __shfl_xor_sync(kFullMask, v.s, off);
        o.idx = __shfl_xor_sync(kFullMask, v.idx, off);
        merge(v, o);
    }
    return v;
}

__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8]) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 pair;
        memcpy(&pair, &w[i], sizeof(pair));
        const float2 f = __bfloat1622float2(pair);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&w[i], &pair, sizeof(pair));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// x += the 8 floats q[0], q[1] (x[e] + q, each rounded once), and q[0], q[1] = x: a thread's 8
// column sums to and from shared or global memory as two float4.
__device__ __forceinline__ void add8(float (&x)[8], const float4* q) {
    const float4 a = q[0], b = q[1];
    x[0] += a.x;
    x[1] += a.y;
    x[2] += a.z;
    x[3] += a.w;
    x[4] += b.x;
    x[5] += b.y;
    x[6] += b.z;
    x[7] += b.w;
}

__device__ __forceinline__ void store8(float4* q, const float (&x)[8]) {
    q[0] = make_float4(x[0], x[1], x[2], x[3]);
    q[1] = make_float4(x[4], x[5], x[6], x[7]);
}

// Logits j = 8c .. 8c+8 of a row (vector path): bf16 GEMM output plus the f32 bias.
__device__ __forceinline__ void load_logits8(const __nv_bfloat16* rowp, const float* bias, int c, float (&v)[8]) {
    unpack8(reinterpret_cast<const uint4*>(rowp)[c], v);
    add8(v, reinterpret_cast<const float4*>(bias) + 2 * c);
}

// Per-thread statistics over the thread's elements of a row. A thread visits its elements in
// increasing index order, so a strict '>' keeps the lowest index of the thread's max.
template <bool kVec>
__device__ __forceinline__ Stat thread_stats(const __nv_bfloat16* rowp, const float* bias, int vocab) {
    Stat st{-INFINITY, 0.0f, kNoIndex};
    if (kVec) {
        const int n8 = vocab / 8;
        for (int c = threadIdx.x; c < n8; c += kRowThreads) {
            float v[8];
            load_logits8(rowp, bias, c, v);
            float lm = -INFINITY;  // the group's max and its lowest index; NaN is never kept
            int li = 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                if (v[e] > lm) {
                    lm = v[e];
                    li = e;
                }
            }
            if (lm > st.m) {
                st.s *= fast_exp(st.m - lm);
                st.m = lm;
                st.idx = 8 * c + li;
            }
            // -inf logits add nothing; a NaN one makes s (so lse and the loss) NaN, as in
            // cross_entropy_rows_held and on the CPU.
            float add = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                add += v[e] == -INFINITY ? 0.0f : fast_exp(v[e] - st.m);
            }
            st.s += add;
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += kRowThreads) {
            const float v = __bfloat162float(rowp[j]) + bias[j];
            if (v > st.m) {
                st.s = st.s * fast_exp(st.m - v) + 1.0f;
                st.m = v;
                st.idx = j;
            } else if (v != -INFINITY) {
                st.s += fast_exp(v - st.m);
            }
        }
    }
    return st;
}

// Training variant: the row becomes dlogits = scale * (softmax - onehot(target)), in place.
template <bool kVec>
__device__ __forceinline__ void write_dlogits(__nv_bfloat16* rowp, const float* bias, int vocab, int target, float lse,
                                              float scale) {
    if (kVec) {
        const int n8 = vocab / 8;
        uint4* row8 = reinterpret_cast<uint4*>(rowp);
        for (int c = threadIdx.x; c < n8; c += kRowThreads) {
            float v[8];
            load_logits8(rowp, bias, c, v);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                v[e] = scale * (fast_exp(v[e] - lse) - (8 * c + e == target ? 1.0f : 0.0f));
            }
            row8[c] = pack8(v);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += kRowThreads) {
            const float v = __bfloat162float(rowp[j]) + bias[j];
            rowp[j] = __float2bfloat16_rn(scale * (fast_exp(v - lse) - (j == target ? 1.0f : 0.0f)));
        }
    }
}

// Ignored row: dlogits are all 0.
template <bool kVec>
__device__ __forceinline__ void write_zeros(__nv_bfloat16* rowp, int vocab) {
    if (kVec) {
        uint4* row8 = reinterpret_cast<uint4*>(rowp);
        for (int c = threadIdx.x; c < vocab / 8; c += kRowThreads) {
            row8[c] = make_uint4(0u, 0u, 0u, 0u);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += kRowThreads) {
            rowp[j] = __float2bfloat16_rn(0.0f);
        }
    }
}

// Shared memory of cross_entropy_rows_held's block statistics of one row.
struct HeldShared {
    float m[kRowWarps];
    int idx[kRowWarps];
    float s[kRowWarps];
};

// Shared memory of the block merge of one row.
struct RowShared {
    float m[kRowWarps];
    float s[kRowWarps];
    int idx[kRowWarps];
    float lse;
};

// Merges the block's per-thread statistics of one row in a fixed order (lanes by xor butterfly,
// then warp 0 over the warp results), writes the row's loss, lse and argmax, and returns lse to
// every thread. The caller must not overwrite the row before this returns: the loss reads the
// target's logit from it.
__device__ __forceinline__ float row_result(Stat st, const __nv_bfloat16* rowp, const MapetCrossEntropy& p,
                                            int64_t row, int target, RowShared& sh) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    st = warp_merge(st);
    if (lane == 0) {
        sh.m[warp] = st.m;
        sh.s[warp] = st.s;
        sh.idx[warp] = st.idx;
    }
    __syncthreads();
    if (warp == 0) {
        Stat w{-INFINITY, 0.0f, kNoIndex};
        if (lane < kRowWarps) {
            w = Stat{sh.m[lane], sh.s[lane], sh.idx[lane]};
        }
        w = warp_merge(w);
        if (lane == 0) {
            const float lse = w.m + logf(w.s);
            float loss = 0.0f;
            if (target >= 0) {
                // Every thread has finished reading the row (the barrier above) and none writes
                // it before the barrier below, so this reads the logit, not a gradient.
                loss = lse - (__bfloat162float(rowp[target]) + p.bias[target]);
            }
            p.row_loss[row] = loss;
            p.row_lse[row] = lse;
            // No element was ever kept (every logit -inf or NaN, only from non-finite inputs):
            // index 0, as on the CPU, rather than the out-of-range kNoIndex.
            p.row_argmax[row] = w.idx == kNoIndex ? 0 : w.idx;
            sh.lse = lse;
        }
    }
    // Also orders warp 0's reads of sh.m/s/idx before the next row's writes of them, and every
    // thread's read of sh.lse (below) before the next row's write of it (after its first barrier).
    __syncthreads();
    return sh.lse;
}


// The barrier of the threads that work on one row: the block's for one-row blocks; for the
// paired kernel's halves, named barrier 1 + half over its kRowThreads threads (0 is the block's).
// (Constant ids: with the id in a register, ptxas reserved all 16 barriers and gave the warp
// shuffles a divergent fallback path.)
template <int kHalves>
__device__ __forceinline__ void rows_sync(int half) {
    if (kHalves == 1) {
        __syncthreads();
    } else if (half == 0) {
        asm volatile("bar.sync 1, %0;\n" ::"n"(kRowThreads) : "memory");
    } else {
        asm volatile("bar.sync 2, %0;\n" ::"n"(kRowThreads) : "memory");
    }
}

// The row a kernel's v-th visit goes to: v itself, or with p.reverse_rows the rows from the last
// back, so that the rows the logits GEMM wrote last, the likeliest to be still in L2, are read
// first (what each row gets is the same either way; the column sums add the rows of a block in
// the order it visits them). Off by default: on an H200 it was within the bench's noise of the
// forward order (BENCHMARKS.md, seventh run). Row numbers fit 32 bits: a pass has fewer rows
// than a grid has blocks, and a chunk's logits are at most 59 MiB (paired rows).
__device__ __forceinline__ int visited_row(const MapetCrossEntropy& p, int v) {
    return p.reverse_rows ? static_cast<int>(p.rows) - 1 - v : v;
}

template <bool kVec>
__device__ __forceinline__ void rows_body(const MapetCrossEntropy& p) {
    __shared__ RowShared sh;
    const int64_t row = visited_row(p, blockIdx.x);
    __nv_bfloat16* rowp = static_cast<__nv_bfloat16*>(p.logits) + row * p.ld;
    const int target = p.targets[row];
    const float lse = row_result(thread_stats<kVec>(rowp, p.bias, p.vocab), rowp, p, row, target, sh);
    if (!p.write_grad) {
        return;
    }
    if (target < 0) {
        write_zeros<kVec>(rowp, p.vocab);
    } else {
        write_dlogits<kVec>(rowp, p.bias, p.vocab, target, lse, p.grad_scale);
    }
}

__device__ __forceinline__ bool vector_path(const MapetCrossEntropy& p) {
    return p.vocab % 8 == 0 && p.ld % 8 == 0;
}

}  // namespace

// Grid: (rows of the chunk), block: kRowThreads. logits, targets, row_loss, row_lse and row_argmax
// are offset to the chunk's first row by the host.
extern "C" __global__ void __launch_bounds__(kRowThreads) cross_entropy_rows(MapetCrossEntropy p) {
    dependent_launch_start();
    if (vector_path(p)) {
        rows_body<true>(p);
    } else {
        rows_body<false>(p);
    }
}

// Grid: (groups), groups <= rows of the chunk; block: kRowThreads. Both variants when vocab % 8 ==
// 0, ld % 8 == 0 and vocab <= kGradMaxVocab (the host checks). Block g handles rows
// g, g + groups, g + 2 groups, ... (counted from the last row back when p.reverse_rows:
// visited_row) and thread t owns the same columns of every row: the 8-column
// groups c = t + i * kRowThreads, i < kGradPer. So the whole row slice of a thread stays in
// registers (read once, four 16-byte loads in flight), and the thread sums its columns of the
// dlogits it writes, over its block's rows in increasing order, into partial[g, :] (added to:
// the host zeroes partial once per call and every chunk adds, so the finish kernel runs once per
// call); the finish kernel adds the groups in order. No float atomics: deterministic.
// kFull: vocab == kGradMaxVocab, every thread owns kGradPer groups and no column test is needed
// (the model's vocab); otherwise each group is tested against vocab / 8.
//
// Per row, each logit costs one exponential: the thread's exponentials e_j = exp(l_j - m_t),
// taken against the thread's own max m_t, replace the logits in its registers; the block's sum
// is sum_t s_t exp(m_t - m) over the threads' sums s_t, and dlogit_j = e_j * grad_scale *
// exp(m_t - lse), one multiply, minus grad_scale at the target alone (only the thread that owns
// the target's column tests it). e_j <= 1 and exp(m_t - lse) <= 1: nothing overflows. The block
// statistics take two barriers a row: the first publishes the warps' maxima (every thread then
// merges the eight in the same order), the second the warps' rescaled sums; every thread then
// holds lse, so no warp waits on another to finish a serial merge.
//
// The column sums stay in registers: with them in shared memory (80 registers, three blocks an
// SM instead of two) the whole call gained nothing beyond the bench's noise on an H200
// (BENCHMARKS.md, seventh run).
// sh_of: each half's row statistics; handed (paired kernel only): 2 kGradPer kRowThreads float4
// for half 1's column sums. Both are the kernel's, declared there once for its two instances.
template <bool kFull, int kHalves>
__device__ __forceinline__ void rows_held_body(const MapetCrossEntropy& p, HeldShared (&sh_of)[kHalves],
                                               float4* handed) {
    static_assert(kHalves == 1 || kHalves == 2, "one row at a time a block, or two (paired)");
    // The half of the block this thread works in (0 for one-row blocks), and the thread's index
    // in it, which fixes the columns it owns.
    // (Through a shuffle, so that ptxas knows it uniform across the warp: it then gives the row's
    // shuffles no divergent fallback path, as in the one-row kernel.)
    const int half = kHalves == 1 ? 0 : __shfl_sync(kFullMask, static_cast<int>(threadIdx.x) / kRowThreads, 0);
    const int tid = kHalves == 1 ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) % kRowThreads;
    HeldShared& sh = sh_of[half];
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n8 = p.vocab / 8;
    auto owned = [&](int c) { return kFull || c < n8; };
    // Column sums of the 8 columns of the thread's group i.
    float colsum[kGradPer][8];
#pragma unroll
    for (int i = 0; i < kGradPer; ++i) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            colsum[i][e] = 0.0f;
        }
    }
    // The thread's 16-byte groups of row r (zeros past the vocab) and the row's target. Rows
    // belong to one block each, so loading the block's next row early races with nothing.
    uint4 next[kGradPer];
    int next_target = -1;
    // Row numbers fit 32 bits (a chunk's logits are at most 59 MiB, so fewer than 2^22 rows of at
    // least 8 columns); products with ld are taken in 64 bits.
    const int rows = static_cast<int>(p.rows);
    auto prefetch = [&](int r) {
        const uint4* src =
            reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.logits) + static_cast<int64_t>(r) * p.ld);
#pragma unroll
        for (int i = 0; i < kGradPer; ++i) {
            const int c = tid + i * kRowThreads;
            next[i] = owned(c) ? src[c] : make_uint4(0u, 0u, 0u, 0u);
        }
        next_target = p.targets[r];
    };
    // The half's visits: half h of block b takes visits b kHalves + h, then every kHalves gridDim.x.
    const int first_visit = static_cast<int>(blockIdx.x) * kHalves + half;
    const int visit_step = static_cast<int>(gridDim.x) * kHalves;
    if (first_visit < rows) {
        prefetch(visited_row(p, first_visit));
    }
    for (int visit = first_visit; visit < rows; visit += visit_step) {
        const int row = visited_row(p, visit);
        __nv_bfloat16* rowp = static_cast<__nv_bfloat16*>(p.logits) + static_cast<int64_t>(row) * p.ld;
        uint4* row8 = reinterpret_cast<uint4*>(rowp);
        const int target = next_target;
        uint4 raw[kGradPer];
#pragma unroll
        for (int i = 0; i < kGradPer; ++i) {
            raw[i] = next[i];
        }
        // The block's next row is loaded while this one is reduced and written: a row's loads no
        // longer wait on the previous row's two barriers.
        if (visit + visit_step < rows) {
            prefetch(visited_row(p, visit + visit_step));
        }
        // The target's logit, for the loss: thread 0 reads it now, before the row's first barrier;
        // the other threads overwrite the row with dlogits only after the second.
        float target_logit = 0.0f;
        if (tid == 0 && target >= 0) {
            target_logit = __bfloat162float(rowp[target]) + __ldg(p.bias + target);
        }
        // The thread's logits and their max (lowest index on ties: increasing index order and a
        // strict '>'; a NaN is never kept).
        float v[kGradPer][8];
        float m = -INFINITY;
        int idx = kNoIndex;
#pragma unroll
        for (int i = 0; i < kGradPer; ++i) {
            const int c = tid + i * kRowThreads;
            unpack8(raw[i], v[i]);
            if (owned(c)) {
                const float4 b0 = __ldg(reinterpret_cast<const float4*>(p.bias) + 2 * c);
                const float4 b1 = __ldg(reinterpret_cast<const float4*>(p.bias) + 2 * c + 1);
                const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    v[i][e] += b[e];
                    if (v[i][e] > m) {
                        m = v[i][e];
                        idx = 8 * c + e;
                    }
                }
            }
        }
        // e_j = 2^(l_j log2(e) - m_t log2(e)), one FFMA and one MUFU.EX2, in place of l_j. -inf
        // logits give +0; NaN ones NaN, so s (and lse, the loss) is NaN, as on the CPU. A thread
        // whose logits are all -inf or NaN (m_t = -inf) subtracts 0 instead of -inf (no inf - inf).
        const float m_log2 = m == -INFINITY ? 0.0f : m * kLog2e;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < kGradPer; ++i) {
            if (owned(tid + i * kRowThreads)) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    v[i][e] = ex2(fmaf(v[i][e], kLog2e, -m_log2));
                    s += v[i][e];
                }
            }
        }
        // The block's max and its lowest index, merged in the same order by every thread.
        float bm = m;
        int bi = idx;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float om = __shfl_xor_sync(kFullMask, bm, off);
            const int oi = __shfl_xor_sync(kFullMask, bi, off);
            if (om > bm || (om == bm && oi < bi)) {
                bm = om;
                bi = oi;
            }
        }
        if (lane == 0) {
            sh.m[warp] = bm;
            sh.idx[warp] = bi;
        }
        rows_sync<kHalves>(half);
        bm = sh.m[0];
        bi = sh.idx[0];
#pragma unroll
        for (int w = 1; w < kRowWarps; ++w) {
            const float om = sh.m[w];
            const int oi = sh.idx[w];
            if (om > bm || (om == bm && oi < bi)) {
                bm = om;
                bi = oi;
            }
        }
        // The thread's sum against the block max, then the block's sum: an xor butterfly leaves
        // the same bits in every lane, and every thread adds the warps' sums in warp order.
        float bs = s * (bm == -INFINITY ? 0.0f : ex2((m - bm) * kLog2e));
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            bs += __shfl_xor_sync(kFullMask, bs, off);
        }
        if (lane == 0) {
            sh.s[warp] = bs;
        }
        // Also orders every thread's reads of sh.m/idx before the next row's writes of them; the
        // reads of sh.s below come before the next row's first barrier, so before its writes.
        rows_sync<kHalves>(half);
        bs = sh.s[0];
#pragma unroll
        for (int w = 1; w < kRowWarps; ++w) {
            bs += sh.s[w];
        }
        const float lse = bm + logf(bs);
        if (tid == 0) {
            p.row_loss[row] = target >= 0 ? lse - target_logit : 0.0f;
            p.row_lse[row] = lse;
            // No element was ever kept (every logit -inf or NaN, only from non-finite inputs):
            // index 0, as on the CPU, rather than the out-of-range kNoIndex.
            p.row_argmax[row] = bi == kNoIndex ? 0 : bi;
        }
        if (!p.write_grad) {
            continue;  // uniform over the block
        }
        if (target < 0) {  // an ignored row: dlogits 0, nothing added to the sums
#pragma unroll
            for (int i = 0; i < kGradPer; ++i) {
                const int c = tid + i * kRowThreads;
                if (owned(c)) {
                    row8[c] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
            continue;
        }
        // grad_scale * softmax_j = e_j * grad_scale * exp(m_t - lse).
        const float f = m == -INFINITY ? 0.0f : p.grad_scale * ex2((m - lse) * kLog2e);
#pragma unroll
        for (int i = 0; i < kGradPer; ++i) {
            const int c = tid + i * kRowThreads;
            if (!owned(c)) {
                continue;
            }
            float d[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                d[e] = v[i][e] * f;
            }
            const int local = target - 8 * c;
            if (static_cast<unsigned>(local) < 8u) {  // this thread owns the target's column
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    d[e] -= e == local ? p.grad_scale : 0.0f;
                }
            }
            row8[c] = pack8(d);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                colsum[i][e] += d[e];
            }
        }
    }
    if (!p.write_grad) {
        return;
    }
    if constexpr (kHalves == 2) {
        // One column sum a block: half 1 hands its sums to half 0 through shared memory (32 KB at
        // V = 8192), and half 0 adds them to its own, (half 0) + (half 1), a fixed order.
        if (half == 1) {
#pragma unroll
            for (int i = 0; i < kGradPer; ++i) {
                const int c = tid + i * kRowThreads;
                if (owned(c)) store8(handed + 2 * c, colsum[i]);
            }
        }
        __syncthreads();
        if (half == 1) {
            return;
        }
#pragma unroll
        for (int i = 0; i < kGradPer; ++i) {
            const int c = tid + i * kRowThreads;
            if (owned(c)) add8(colsum[i], handed + 2 * c);
        }
    }
    // partial[block, :] += the sums (x + y == y + x exactly: the order of the two is free).
    float4* out = reinterpret_cast<float4*>(p.partial + static_cast<int64_t>(blockIdx.x) * p.vocab);
#pragma unroll
    for (int i = 0; i < kGradPer; ++i) {
        const int c = tid + i * kRowThreads;
        if (owned(c)) {
            add8(colsum[i], out + 2 * c);
            store8(out + 2 * c, colsum[i]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(kRowThreads) cross_entropy_rows_held(MapetCrossEntropy p) {
    dependent_launch_start();
    __shared__ HeldShared sh[1];
    if (p.vocab == kGradMaxVocab) {
        rows_held_body<true, 1>(p, sh, nullptr);
    } else {
        rows_held_body<false, 1>(p, sh, nullptr);
    }
}

// cross_entropy_rows_held with two rows at a time a block: block (2 kRowThreads threads) = two
// halves that each run the one-row block's loop over their own rows (barriers of their own), and
// add their column sums together before the block adds them to partial[block, :]. So it takes
// the rows with half the groups: one block an SM (at most 128 registers a thread) keeps as many
// rows in flight as two one-row blocks do, and the column-sum scratch is half as large, which
// lets a chunk hold more rows within the 64 MiB budget (src/ops/cross_entropy.rs, "Paired rows").
// Grid: (groups), groups <= ceil(rows of the pass / 2).
extern "C" __global__ void __launch_bounds__(2 * kRowThreads, 1) cross_entropy_rows_paired(MapetCrossEntropy p) {
    dependent_launch_start();
    __shared__ HeldShared sh[2];
    __shared__ float4 handed[2 * kGradPer * kRowThreads];
    if (p.vocab == kGradMaxVocab) {
        rows_held_body<true, 2>(p, sh, handed);
    } else {
        rows_held_body<false, 2>(p, sh, handed);
    }
}

// Grid: (ceil(vocab / blockDim.x), groups). Each thread sums one column over its group's rows,
// in increasing order, and adds the sum to partial[group, column]. Used where cross_entropy_rows_held is not
// (vocab % 8 != 0 or vocab > 8192), so loads are scalar; a warp still reads 64 contiguous bytes
// per row.
extern "C" __global__ void cross_entropy_colsum_partial(MapetCrossEntropy p) {
    dependent_launch_start();
    const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= p.vocab) {
        return;
    }
    const int64_t per = (p.rows + p.groups - 1) / p.groups;
    const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per;
    const int64_t r1 = min(p.rows, r0 + per);
    const __nv_bfloat16* base = static_cast<const __nv_bfloat16*>(p.logits);
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t r = r0; r < r1; ++r) {
        acc += __bfloat162float(base[r * p.ld + c]);
    }
    p.partial[static_cast<int64_t>(blockIdx.y) * p.vocab + c] += acc;  // zeroed once per call
}

// Grid: ceil(vocab / kFinishCols); block: kFinishCols x kFinishSlices threads. dbias[c] += the
// sum over groups g of partial[g, c]: slice k of a column sums groups k, k + kFinishSlices, ... in
// increasing order (a warp reads 32 consecutive columns of one group), then the first slice adds
// the slices' sums in slice order. Fixed order: deterministic.
extern "C" __global__ void __launch_bounds__(kFinishCols * kFinishSlices) cross_entropy_colsum_finish(MapetCrossEntropy p) {
    dependent_launch_start();
    add_group_sums<kFinishCols, kFinishSlices>(p.partial, p.groups, p.vocab, p.dbias);
}

// Grid: 1 block of kReduceThreads. Reads the per-row values of all rows of the call.
extern "C" __global__ void __launch_bounds__(kReduceThreads) cross_entropy_reduce(MapetCrossEntropy p) {
    dependent_launch_start();
    constexpr int kWarps = kReduceThreads / 32;
    // Rows go kBatch at a time per thread, their loads issued together: at the model's 18816
    // rows a thread has 19. The earlier loop (a target load, then the loss and argmax loads it
    // gates), which nvcc unrolled by 4, made about 14 dependent round trips to L2, at a few
    // hundred ns each the likely bulk of its 9.6 us under ncu on an H200 (not profiled
    // further); this one makes about 5.
    constexpr int kBatch = 4;
    __shared__ double s_sum[kWarps];
    __shared__ int s_correct[kWarps];
    double sum = 0.0;
    int correct = 0;
    for (int64_t r0 = threadIdx.x; r0 < p.rows; r0 += kBatch * kReduceThreads) {
        int t[kBatch];
        float loss[kBatch];
        int arg[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
            const int64_t r = r0 + i * kReduceThreads;
            const bool in = r < p.rows;
            t[i] = in ? p.targets[r] : -1;
            loss[i] = in ? p.row_loss[r] : 0.0f;
            arg[i] = in ? p.row_argmax[r] : -1;
        }
        // The thread's counted rows in increasing order (a select, not an add of 0, keeps sum's
        // bits whatever the ignored rows hold).
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
            sum = t[i] >= 0 ? sum + static_cast<double>(loss[i]) : sum;
            correct += t[i] >= 0 && arg[i] == t[i] ? 1 : 0;
        }
    }
    // Fixed order: an xor butterfly within each warp, then thread 0 adds the warps' sums in order.
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(kFullMask, sum, off);
        correct += __shfl_xor_sync(kFullMask, correct, off);
    }
    if (lane == 0) {
        s_sum[warp] = sum;
        s_correct[warp] = correct;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        int hits = 0;
        for (int w = 0; w < kWarps; ++w) {
            total += s_sum[w];
            hits += s_correct[w];
        }
        const float mean = p.counted > 0 ? static_cast<float>(total / static_cast<double>(p.counted)) : 0.0f;
        p.result[0] = __float_as_int(mean);
        p.result[1] = hits;
    }
}
