// Parameter structs of every kernel in cuda/. Each kernel takes exactly one of these by value.
//
// This header is the single contract between the CUDA side and the Rust side: bindgen turns it
// into src/cuda/params.rs (committed; `tests/bindgen_params.rs` regenerates it and fails on any
// difference). Keep it plain C: fixed-width integers, floats and untyped device pointers
// (bf16 data is `void*`; kernels cast to __nv_bfloat16). Sizes are int64 where a product of
// dimensions can pass 2^31.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------- LayerNorm (cuda/layernorm.cu)
// y[r, :] = (x[r, :] - mean_r) * rstd_r * weight + bias, eps given; x, y bf16 [rows, cols];
// weight, bias f32 [cols]; mean, rstd f32 [rows] (saved for backward).
typedef struct MapetLayerNormFwd {
    const void* x;
    void* y;
    const float* weight;
    const float* bias;
    float* mean;
    float* rstd;
    int64_t rows;
    int32_t cols;
    float eps;
} MapetLayerNormFwd;

// Backward of the above: dx bf16 [rows, cols] (written, or added to when accumulate != 0);
// dweight, dbias f32 [cols] accumulated (+=) through a two-pass reduction over `partial`,
// a f32 scratch of [grid_rows, 2 * cols].
typedef struct MapetLayerNormBwd {
    const void* x;
    const void* dy;
    const float* weight;
    const float* mean;
    const float* rstd;
    void* dx;
    float* dweight;
    float* dbias;
    float* partial;
    int64_t rows;
    int32_t cols;
    int32_t accumulate;
} MapetLayerNormBwd;

// Fused residual add + LayerNorm: h = residual + x (bf16, written to `h`), y = LN(h).
typedef struct MapetResidualLayerNormFwd {
    const void* residual;
    const void* x;
    void* h;
    void* y;
    const float* weight;
    const float* bias;
    float* mean;
    float* rstd;
    int64_t rows;
    int32_t cols;
    float eps;
} MapetResidualLayerNormFwd;

// ---------------------------------------------------------------- GELU, erf form (cuda/gelu.cu)
// y = x * 0.5 * (1 + erf(x / sqrt(2))); backward dx = dy * gelu'(x). bf16 in and out.
typedef struct MapetGelu {
    const void* x;
    const void* dy;   // backward only
    void* out;        // y (forward) or dx (backward)
    void* out_y;      // gelu_bwd_recompute_colsum only: y = GELU(x), recomputed beside dx
    float* partial;   // gelu_bwd_recompute_colsum: [groups, cols] column sums of dx per row group
    float* col_sums;  // gelu_colsum_finish: [cols], += the sum over the groups of partial
    int64_t n;
    int64_t cols;     // row width of x, dy, dx, y for the column sums (n = rows * cols)
    int32_t groups;   // row groups of the column sums
} MapetGelu;

// ---------------------------------------------------------------- AdamW (cuda/adamw.cu)
// One step over a flat f32 parameter buffer. decay_mask (uint8 [n], 1 = decayed) selects which
// elements get weight decay. Writes the bf16 copy of the updated parameters when param_bf16 is
// not null. grad_scale multiplies every gradient first (gradient clipping, loss scaling).
typedef struct MapetAdamW {
    float* param;
    const float* grad;
    float* m;
    float* v;
    const uint8_t* decay_mask;
    void* param_bf16;
    int64_t n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bias_correction1;  // 1 - beta1^t
    float bias_correction2;  // 1 - beta2^t
    float grad_scale;
} MapetAdamW;

// ---------------------------------------------------------------- global L2 norm (cuda/gradnorm.cu)
// Sum of squares of x f32 [n] in two passes: each block writes partial[block]; the last kernel
// (grid of 1) reduces partial[0..num_partials] into out[0] = sqrt(sum).
typedef struct MapetSquareSum {
    const float* x;
    float* partial;
    float* out;
    int64_t n;
    int32_t num_partials;
} MapetSquareSum;

// ---------------------------------------------------------------- two-stream attention (cuda/attention.cu)
// Rank-ordered layout of one sample (N tokens, C context tokens, P = N - C predicted):
//   query rows  [0, N)        content stream, rank = row
//               [N, N+P)      mask tokens in the content stream, rank = C + (row - N)
//               [N+P, N+2P)   query stream, rank = C + (row - N - P)
//   key rows    [0, N+P)      the first N+P query rows' tokens (the content stream h)
// Visibility per row: keys [0, a) and [m, N+P), with (r = the row's rank)
//   content row: a = max(C, r+1), m = N - C + max(C, r+1)
//   mask row:    a = C,           m = N
//   query row:   a = r,           m = N - C + r
// Element (b, row, head h, d) of q is at q[b*q_batch_stride + row*q_row_stride + h*head_dim + d];
// the same for k, v, o, d_o, dq, dk, dv with their own strides. lse and delta are f32
// [batch, heads, N+2P] contiguous. lse is the natural-log logsumexp of the scaled scores.
typedef struct MapetAttention {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;
    const void* d_o;  // backward only
    void* dq;         // backward only
    void* dk;         // backward only
    void* dv;         // backward only
    float* delta;     // backward scratch: rowsum(dO * O), [batch, heads, N+2P]
    int64_t q_batch_stride, q_row_stride;
    int64_t k_batch_stride, k_row_stride;
    int64_t v_batch_stride, v_row_stride;
    int64_t o_batch_stride, o_row_stride;
    int64_t do_batch_stride, do_row_stride;
    int64_t dq_batch_stride, dq_row_stride;
    int64_t dk_batch_stride, dk_row_stride;
    int64_t dv_batch_stride, dv_row_stride;
    int32_t batch;
    int32_t heads;
    int32_t head_dim;
    int32_t n_tokens;   // N
    int32_t n_context;  // C
    float scale;        // softmax scale, 1/sqrt(head_dim)
    // > 0 (MAPET_L2_AHEAD, experimental; read by the wgmma forward's and dQ's _l2 twins and the
    // wgmma dK/dV kernels): each CTA sends
    // to L2 what the CTA l2_ahead launches on, which starts about when this one ends, loads first
    // (its pair's K and V, its first row tiles' rows; next_wave_to_l2, dkdv_next_wave_to_l2 in
    // cuda/attention.cu). The CTAs an SM holds: twice the SM count for the forward and dQ, the SM
    // count for dK/dV. 0: none; the other kernels ignore it.
    int32_t l2_ahead;
} MapetAttention;

// The wgmma dK/dV kernel's parameters: MapetAttention and the launch's plan, which depends only on
// N, C and the CTAs a (sample, head) pair has (grid x), so the host works it out once a launch
// (src/ops/attention.rs, dkdv_params) rather than every CTA ahead of its first copies:
//   live[kt], partial[kt]  bit pc: the 32-position chunk pc has a visible pair with key tile kt
//                          (keys [64 kt, 64 kt + 64)); and a hidden one too (masked per element);
//   deal[3 x + w]          the key tiles warpgroup w of CTA x takes, in order, 4 bits each, the
//                          first in the lowest bits; deal_count[3 x + w] how many;
//   dq_acc                 the fused backward's scratch (mapet_attention_bwd_dkdv_wgmma_fused,
//                          one CTA a pair): f32 [batch, heads, 64, positions], dQ transposed
//                          (dims by positions in position order; positions = Lq rounded up to 64),
//                          zeroed, added to and converted into dq by the pair's CTA; null for the
//                          other dK/dV kernels.
// Read by the balanced and fused kernels alone (mapet_attention_bwd_dkdv_wgmma_balanced,
// mapet_attention_bwd_dkdv_wgmma_fused; the others take key tile kt as keys [64 kt, 64 kt + 64),
// whole, and ignore these):
//   tile_start[kt], tile_end[kt]  key tile kt's keys [tile_start, tile_end), at most 64 (the
//                          kernel computes the 64 keys from tile_start and stores these); live and
//                          partial are of these keys; the fused kernel's are the 64-key tiles
//                          (its dQ sums over keys, so a run must not leave keys of its 64
//                          unmasked);
//   keep_first[3 x + w], keep_last[3 x + w]  the chunks of its first (last) tile warpgroup w of
//                          CTA x computes, ANDed with the tile's live chunks (all bits: every one);
//   hand_out[3 x + w]      1 when its first tile is shared with the warpgroup that ends with it:
//                          it leaves its partial dK and dV in the CTA's hand-off slot (and arrives
//                          at named barrier 8) instead of storing them; else 0;
//   hand_in[3 x + w]       1 when its last tile is shared so: after its own chunks it waits at
//                          barrier 8, adds the slot's partial and stores; else 0. At most one tile
//                          a CTA is shared;
//   hand                   the fused kernel's hand-off slots, in global memory (its shared memory
//                          has no room for one): MAPET_DKDV_HAND_SLOT_BYTES a pair; null for the
//                          others, whose slot is in shared memory.
#define MAPET_DKDV_MAX_KEY_TILES 16
#define MAPET_DKDV_MAX_CTAS 6
typedef struct MapetAttentionDkdv {
    MapetAttention a;
    uint32_t live[MAPET_DKDV_MAX_KEY_TILES];
    uint32_t partial[MAPET_DKDV_MAX_KEY_TILES];
    uint64_t deal[3 * MAPET_DKDV_MAX_CTAS];
    int32_t deal_count[3 * MAPET_DKDV_MAX_CTAS];
    float* dq_acc;
    int32_t tile_start[MAPET_DKDV_MAX_KEY_TILES];
    int32_t tile_end[MAPET_DKDV_MAX_KEY_TILES];
    uint32_t keep_first[3 * MAPET_DKDV_MAX_CTAS];
    uint32_t keep_last[3 * MAPET_DKDV_MAX_CTAS];
    int32_t hand_out[3 * MAPET_DKDV_MAX_CTAS];
    int32_t hand_in[3 * MAPET_DKDV_MAX_CTAS];
    float* hand;
} MapetAttentionDkdv;

// The balanced dK/dV kernels' hand-off slot (hand_out, hand_in): a warpgroup's dK and dV
// accumulators in f32 (128 threads x 64 floats); the balanced kernel's after its other dynamic
// shared memory, the fused kernel's in `hand`.
#define MAPET_DKDV_HAND_SLOT_BYTES 32768

// ---------------------------------------------------------------- patch embedding (cuda/patch_embed.cu)
// Pixels -> the rank-ordered first rows of both streams (layout as MapetAttention above).
// B = batch, S = image (square), p = patch, G = S / p, N = 1 + G*G, C = n_context, P = N - C,
// K = 3*p*p, R = N + 2P rows per sample. pixels: uint8 [B, S, S, 3] (HWC; x = u8 * scale[c] +
// shift[c], i.e. scale = 1 / (255 std), shift = -mean / std) or f32 [B, 3, S, S] (normalized);
// ranks int32 [B, N]; weight bf16 [D, K] (= [D, 3, p, p]); bias, cls_token, mask_token f32 [D];
// pos_embed f32 [N, D]; out bf16 [B, R, D]. The GEMM kernels write the content rows of patch
// tokens; the rows kernel writes row 0 (CLS) and the 2P mask-token rows.
typedef struct MapetPatchEmbedFwd {
    const void* pixels;
    const int32_t* ranks;
    const void* weight;
    const float* bias;
    const float* pos_embed;
    const float* cls_token;
    const float* mask_token;
    void* out;
    // bf16 [D, p, p, 3] scratch of the HWC-order kernels (unused otherwise). For the
    // warp-specialised forwards (hwc-ws, hwc-ws-raw) it goes on past the weight with the
    // token-row table, bf16 [N, D] at element D*K: the values of the rows that hold no pixels,
    // row 0 = cls_token + pos_embed[0] (the CLS row) and row t >= 1 = mask_token + pos_embed[t]
    // (token t's mask-token rows), each rounded to bf16 once; the weight kernel launched before
    // them writes both.
    void* weight_hwc;
    float scale[3];
    float shift[3];
    int32_t batch;
    int32_t image;
    int32_t patch;
    int32_t dim;
    int32_t n_context;
    // f32 [D] scratch of the raw-pixel forward (hwc-ws-raw; null otherwise): bias plus the
    // normalisation's shifts through the weight, written by mapet_patch_embed_weight_hwc_raw.
    float* bias_raw;
} MapetPatchEmbedFwd;

// Backward, given d_out bf16 [B, R, D]; every gradient is f32 and accumulated (+=):
// dweight [D, K], dbias [D], dpos_embed [N, D], dcls_token [D], dmask_token [D].
// dweight: each (D tile, K tile, split) block contracts rows [split * split_rows, ...) of the
// B*(N-1) patch rows into partial [splits, D, K]; a second kernel sums the splits in order.
// token_sums f32 [2, N, D] is scratch for the other gradients (content and mask-row sums per token).
// row_info int32 [B*(N-1), 2] (the HWC weight-gradient kernels only, written by
// mapet_patch_embed_bwd_tokens): per patch row, the d_out row b*R + rank (-1: none) and the byte
// offset of its top-left pixel; null otherwise.
typedef struct MapetPatchEmbedBwd {
    const void* pixels;
    const int32_t* ranks;
    const void* d_out;
    float* dweight;
    float* dbias;
    float* dpos_embed;
    float* dcls_token;
    float* dmask_token;
    float* partial;
    float* token_sums;
    int32_t* row_info;
    float scale[3];
    float shift[3];
    int32_t batch;
    int32_t image;
    int32_t patch;
    int32_t dim;
    int32_t n_context;
    int32_t splits;
    int32_t split_rows;
} MapetPatchEmbedBwd;

// ---------------------------------------------------------------- codebook cross-entropy (cuda/cross_entropy.cu)
// Per-row softmax cross-entropy over one chunk of decoder logits: l = logits (bf16 [rows, ld],
// row-major, the GEMM output x W^T) + bias (f32 [vocab], added in the kernel). Per row: lse, loss
// (0 for targets < 0), argmax (lowest index on ties); with write_grad != 0 the logits are
// overwritten in place by dlogits = grad_scale * (softmax - onehot) (0 for ignored rows). The
// column-sum kernels add the column sums of dlogits to dbias through partial (f32 [groups, vocab]);
// the reduce kernel (one block, `rows` = all rows of the call, pointers not offset) writes
// result[0] = bits of the f32 mean loss over the `counted` rows with target >= 0 and
// result[1] = the number of those rows whose argmax equals the target.
typedef struct MapetCrossEntropy {
    void* logits;
    const float* bias;
    const int32_t* targets;
    float* row_loss;
    float* row_lse;
    int32_t* row_argmax;
    float* partial;
    float* dbias;
    int32_t* result;
    int64_t rows;
    int64_t ld;
    int64_t counted;
    int32_t vocab;
    int32_t write_grad;
    int32_t groups;
    float grad_scale;
    int32_t reverse_rows;  // nonzero: the row kernels visit the rows from the last back
} MapetCrossEntropy;

// ---------------------------------------------------------------- residual helpers (cuda/residual.cu)
// Layer-scale residual with per-sample drop path, rows r in [0, rows), sample(r) = r / rows_per_sample:
//   forward:  out[r, c] = x[r, c] + scale[sample(r)] * gamma[c] * y[r, c]
//   backward: dy[r, c] = dout[r, c] * scale[sample(r)] * gamma[c]      (written to `out`)
//             dgamma[c] += sum_r dout[r, c] * scale[sample(r)] * y[r, c]
// x, y, dout, out bf16 [rows, cols] (cols % 8 == 0, 16-byte aligned); gamma, dgamma f32 [cols];
// scale f32 [rows / rows_per_sample]. The backward's first kernel writes per-chunk column sums
// (chunk g = rows [g * chunk_rows, (g + 1) * chunk_rows)) into partial f32 [chunks, cols]; the
// second adds their sum over g, in order, to dgamma.
typedef struct MapetLayerScale {
    const void* x;     // forward only
    const void* y;
    const void* dout;  // backward only
    void* out;         // forward: the new residual stream; backward: dy
    const float* gamma;
    const float* scale;
    float* dgamma;     // backward only
    float* dy_col_sums;  // backward only: += the column sums of dy (a Linear's bias gradient), or null
    float* partial;    // backward only: [chunks, cols] (and [chunks, cols] more with dy_col_sums)
    int64_t rows;
    int32_t cols;
    int32_t rows_per_sample;
    int32_t chunk_rows;
    int32_t chunks;
} MapetLayerScale;

// Row copy between per-sample row ranges of two bf16 [batch, *, cols] tensors:
//   dst[b, dst_row0 + i, :] (+)= src[b, src_row0 + i, :]   for b < batch, i < count
// (accumulate != 0: added in f32 and rounded once). src_rows / dst_rows are the rows per sample
// of each tensor. cols % 8 == 0, both pointers 16-byte aligned.
typedef struct MapetRowCopy {
    const void* src;
    void* dst;
    int64_t batch;
    int32_t src_rows;
    int32_t dst_rows;
    int32_t src_row0;
    int32_t dst_row0;
    int32_t count;
    int32_t cols;
    int32_t accumulate;
} MapetRowCopy;

// Elementwise over n f32 values x: mapet_add_f32 does y[i] += x[i] (y f32);
// mapet_f32_to_bf16 writes y[i] = bf16(x[i]) (y bf16).
typedef struct MapetF32Vector {
    const float* x;
    void* y;
    int64_t n;
} MapetF32Vector;

// ---------------------------------------------------------------- k-means (cuda/kmeans.cu)
// Squared L2 norm of every row of a bf16 matrix x [rows, dim]: out f32 [rows].
typedef struct MapetKMeansRowNorms {
    const void* x;
    float* out;
    int64_t rows;
    int32_t dim;
} MapetKMeansRowNorms;

// Nearest centroid of each of `rows` points, given scores = x c^T (f32 [rows, k], the GEMM
// output) and c_norms = |c_j|^2 (f32 [k]): d_j = c_norms[j] - 2 scores[r, j]; ids[r] = the lowest
// j with the smallest d_j; sq_dists[r] = max(0, |x_r|^2 + d_{ids[r]}). x bf16 [rows, dim].
typedef struct MapetKMeansAssign {
    const float* scores;
    const float* c_norms;
    const void* x;
    uint32_t* ids;
    float* sq_dists;
    int64_t rows;
    int32_t k;
    int32_t dim;
} MapetKMeansAssign;

// Centroid update (the mean of each cluster), deterministic, no float atomics. x bf16 [n, dim];
// ids [n] (ids >= k are counted in column k and otherwise ignored). Scratch: tile_counts
// int32 [tiles, k + 1] (per scatter tile of `tile` points: counts, then start positions);
// counts int32 [k + 1]; offsets int32 [k + 1] (exclusive scan of counts[0..k], offsets[k] = the
// number of valid ids); order int32 [n] (point indices sorted by id, stable); slots f32
// [pieces, 2, dim] (sums of the clusters cut by the boundaries of the `piece`-position pieces of
// `order`). Output: centroids f32 [k, dim] and its bf16 copy centroids_bf16, rows of non-empty
// clusters only.
typedef struct MapetKMeansUpdate {
    const void* x;
    const uint32_t* ids;
    int32_t* tile_counts;
    int32_t* counts;
    int32_t* offsets;
    int32_t* order;
    float* slots;
    float* centroids;
    void* centroids_bf16;
    int64_t n;
    int32_t k;
    int32_t dim;
    int32_t tile;
    int32_t tiles;
    int32_t piece;
    int32_t pieces;
} MapetKMeansUpdate;

// Row gather: for r < rows, row dst_rows[r] (or r when dst_rows is null) of dst_bf16 (and of
// dst_f32 when not null, widened) = row src_rows[r] of src. src, dst_bf16 bf16 [*, dim].
typedef struct MapetKMeansGather {
    const void* src;
    const uint32_t* src_rows;
    const uint32_t* dst_rows;
    void* dst_bf16;
    float* dst_f32;
    int64_t rows;
    int32_t dim;
} MapetKMeansGather;

// ---------------------------------------------------------------- Hopper primitives (cuda/hopper.cu)
// An opaque CUtensorMap (the driver's 128-byte, 64-byte aligned TMA descriptor), encoded on the
// host by cuTensorMapEncodeTiled and passed by value inside a parameter struct.
typedef struct MapetTensorMap {
    uint64_t opaque[16];
} __attribute__((aligned(64))) MapetTensorMap;

// The warp-specialised patch-embedding forward (cuda/patch_embed.cu,
// mapet_patch_embed_fwd_u8_hwc_ws): a tensor map of weight_hwc (bf16 [D, K'] in boxes of 192
// channels x 64 k', 128-byte swizzle) for its TMA loads, and the forward's parameters (the map
// first, at its 64-byte alignment, so that no padding sits between them).
typedef struct MapetPatchEmbedFwdWs {
    MapetTensorMap weight_hwc;
    MapetPatchEmbedFwd p;
} MapetPatchEmbedFwdWs;

// Checks of the TMA / mbarrier / swizzled-wgmma building blocks, one block of 128 threads.
// `a` and `b` map bf16 matrices [rows, cols] (cols contiguous) in boxes of 64 rows x 64 columns
// (128 bytes) with 128-byte swizzle.
//   mapet_hopper_tma_roundtrip: the box of `a` at (row r0, column c0) -> out bf16 [64, 64].
//   mapet_hopper_wgmma_sw128:   out f32 [64, 64] = A[0:64, 0:k] B[0:64, 0:k]^T, k = 64 * k_atoms
//                               (k_atoms 1 or 2).
typedef struct MapetHopperCheck {
    MapetTensorMap a;
    MapetTensorMap b;
    void* out;
    int32_t r0;
    int32_t c0;
    int32_t k_atoms;
} MapetHopperCheck;

// Check of the attention kernels' wgmma forms (cuda/hopper.cu, mapet_hopper_wgmma_rs), one block
// of 128 threads: `a` and `b` bf16 [64, 64] row-major; b's rows >= b_rows (1..=64) are read as
// zeros (the zero fill of sw128_load_rows). out f32, all row-major: [64, 32] = A B[0:32]^T (A in
// registers, B K-major), then [64, 64] = A B (A in registers, B N-major), then [64, 32] =
// A B[32:64]^T (both from shared memory, K-major), then [64, 32] = A^T B[0:32]^T (A's tile read
// M-major from shared memory, B K-major), then [64, 64] = A^T B (both tiles read MN-major).
typedef struct MapetHopperRs {
    const void* a;
    const void* b;
    float* out;
    int32_t b_rows;
} MapetHopperRs;

// Check of sw128_store_frags_transposed (cuda/hopper.cu, mapet_hopper_store_transposed), one block
// of 128 threads: `a` bf16 [64, 32] row-major, loaded into A fragments by each warp (its 16
// rows), stored transposed into a 128-byte-swizzled tile, and read back through the swizzle:
// out f32 [32, 64] = A^T.
typedef struct MapetHopperTranspose {
    const void* a;
    float* out;
} MapetHopperTranspose;

// C = A B^T on Hopper's TMA + wgmma (cuda/hopper.cu, mapet_hopper_gemm_tn): A bf16 [m, k] mapped
// in boxes of 128 rows x 64 columns, B bf16 [n, k] in boxes of 256 rows x 64 columns (both
// 128-byte swizzle), C bf16 [m, n] row-major (written).
typedef struct MapetHopperGemm {
    MapetTensorMap a;
    MapetTensorMap b;
    void* c;
    int32_t m;
    int32_t n;
    int32_t k;
} MapetHopperGemm;

// A measurement, not part of the model (cuda/hopper.cu, mapet_hopper_dq_reduce): the f32
// reductions that a backward accumulating dQ inside the dK/dV kernel would make, in its pattern
// and at its scale, with nothing else around them. One block of 384 threads (three warpgroups,
// the dK/dV kernel's block) per (sample, head) pair. Block `pair`:
//   1. zeroes its accumulator acc[pair], f32 [64, positions] with positions = lq rounded up to
//      a multiple of 32 (dims by positions: dQ transposed, so that a thread's two adjacent
//      positions of a wgmma accumulator are adjacent in memory);
//   2. each warpgroup w adds `items` tiles of 64 dims x 32 positions into it, item i at position
//      chunk (5 i + 3 w) mod (positions / 32), each thread its 16 values of the tile in the wgmma
//      accumulator layout, as `mode` says (MAPET_DQ_REDUCE_*): NONE adds nothing; RED1 issues 16
//      red.global.add.f32 a thread a tile, RED2 8 red.global.add.v2.f32, RED4 4
//      red.global.add.v4.f32 (lanes t and t ^ 1 trade a pair first); STORE 8 plain 8-byte stores
//      (racy: what the same bytes cost as writes alone; the results are not checked);
//   3. converts acc[pair] into dq[pair], bf16 [lq, 64], and drops acc[pair]'s lines from L2
//      without writing them back (discard.global.L2).
// The value added at (pair, w, i, dim d, position q) is ((13 pair + 7 w + 5 i + 3 d + q) mod 5)
// - 2: small integers, so every sum is exact in f32 and in bf16 whatever the order, and the host
// computes it.
typedef struct MapetHopperDqReduce {
    float* acc;
    void* dq;
    int32_t lq;
    int32_t items;
    int32_t mode;
} MapetHopperDqReduce;

#define MAPET_DQ_REDUCE_NONE 0
#define MAPET_DQ_REDUCE_RED1 1
#define MAPET_DQ_REDUCE_RED2 2
#define MAPET_DQ_REDUCE_RED4 3
#define MAPET_DQ_REDUCE_STORE 4

// Check that a programmatic dependent launch starts early and waits (cuda/hopper.cu,
// mapet_hopper_pdl_primary and mapet_hopper_pdl_secondary, one block of 32 threads each, the
// second launched right after the first): the primary spins for spin_ns after its
// dependent_launch_start(), then writes times[0] = its end; the secondary writes times[1] = its
// start, read before its dependent_launch_start(), and times[2] = the moment that returned. All
// from %globaltimer (ns).
typedef struct MapetHopperPdl {
    uint64_t* times;
    int64_t spin_ns;
} MapetHopperPdl;

#ifdef __cplusplus
}
#endif
