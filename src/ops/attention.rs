//! Two-stream permutation attention of MaPeT, in rank order: the CPU reference (f32, and f64 as
//! the truth for GPU tests).
//!
//! # Layout
//! Per sample, N tokens, C context tokens, P = N - C predicted ones. Rows are in rank order
//! (see [`crate::perm`] and `cuda/params.h`, `MapetAttention`):
//!
//! ```text
//! query rows  [0, N)        content stream h, the token of rank = row
//!             [N, N+P)      mask tokens of h, rank C + (row - N)
//!             [N+P, N+2P)   query stream g, rank C + (row - N - P)
//! key rows    [0, N+P)      the first N+P query rows' tokens (keys and values come from h only)
//! ```
//!
//! Tensors are contiguous: `q`, `o` (and `d_o`, `dq`) are `[B, N+2P, heads*head_dim]`; `k`, `v`
//! (and `dk`, `dv`) are `[B, N+P, heads*head_dim]`, head h of a row at columns
//! `h*head_dim..(h+1)*head_dim`; `lse` is `[B, heads, N+2P]`.
//!
//! # Math
//! Per sample and head, for query row i with visible keys V(i) = [0, a) ∪ [m, N+P) given by
//! [`visible_bounds`] (exactly N keys, never empty; this is SPEC.md's table in rank order):
//!
//! ```text
//! s_ij  = scale * q_i . k_j                     (j in V(i), scale = 1/sqrt(head_dim))
//! lse_i = ln sum_{j in V(i)} exp(s_ij)          (natural log, saved for backward)
//! o_i   = sum_{j in V(i)} exp(s_ij - lse_i) v_j
//! ```
//!
//! Backward, from dO (the standard softmax backward with P_ij = exp(s_ij - lse_i)):
//!
//! ```text
//! delta_i = dO_i . o_i
//! dv_j    = sum_i P_ij dO_i
//! dS_ij   = P_ij (dO_i . v_j - delta_i)
//! dq_i    = scale * sum_j dS_ij k_j
//! dk_j    = scale * sum_i dS_ij q_i               (i over both streams: dK, dV collect all N+2P rows)
//! ```
//!
//! The CPU reference works one (sample, head) pair per rayon task on a contiguous copy of that
//! head's rows, then writes the results into the interleaved outputs.

use std::collections::HashMap;
use std::ops::{Add, AddAssign, Div, Mul, Sub};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::LaunchConfig;
use half::bf16;
use rayon::prelude::*;

use crate::cuda::params::{MapetAttention, MapetAttentionDkdv};
use crate::cuda::{check_aligned, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};
use crate::ops::KernelChoice;
use crate::perm::visible_bounds;

/// Sizes of one attention call. Valid when every field is positive and `0 < n_context < n_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// N: CLS + patches.
    pub n_tokens: usize,
    /// C: context tokens (rank < C), CLS included.
    pub n_context: usize,
}

impl AttentionShape {
    /// P = N - C, the predicted tokens.
    pub fn n_pred(&self) -> usize {
        self.n_tokens.saturating_sub(self.n_context)
    }

    /// N + 2P: content rows, mask rows of h, query-stream rows.
    pub fn q_rows(&self) -> usize {
        self.n_tokens.saturating_add(self.n_pred().saturating_mul(2))
    }

    /// N + P: the rows of h, which give the keys and values.
    pub fn k_rows(&self) -> usize {
        self.n_tokens.saturating_add(self.n_pred())
    }

    /// heads * head_dim, the width of a row of q, k, v, o.
    pub fn model_dim(&self) -> usize {
        self.heads.saturating_mul(self.head_dim)
    }

    /// The softmax scale 1/sqrt(head_dim), correctly rounded to f32.
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    /// Elements of q and o (and d_o, dq): B * (N+2P) * heads * head_dim.
    pub fn q_len(&self) -> usize {
        self.batch.saturating_mul(self.q_rows()).saturating_mul(self.model_dim())
    }

    /// Elements of k and v (and dk, dv): B * (N+P) * heads * head_dim.
    pub fn k_len(&self) -> usize {
        self.batch.saturating_mul(self.k_rows()).saturating_mul(self.model_dim())
    }

    /// Elements of lse: B * heads * (N+2P).
    pub fn lse_len(&self) -> usize {
        self.batch.saturating_mul(self.heads).saturating_mul(self.q_rows())
    }

    /// Every field positive, `0 < n_context < n_tokens`, and every buffer size fits in usize.
    pub fn validate(&self) -> Result<()> {
        for (what, value) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("n_tokens", self.n_tokens),
            ("n_context", self.n_context),
        ] {
            if value == 0 {
                return Err(Error::Unsupported { what, detail: "must be positive, got 0".into() });
            }
        }
        if self.n_context >= self.n_tokens {
            return Err(Error::Unsupported {
                what: "n_context",
                detail: format!(
                    "need 0 < n_context < n_tokens, got n_context = {}, n_tokens = {}",
                    self.n_context, self.n_tokens
                ),
            });
        }
        let fits = self
            .n_pred()
            .checked_mul(2)
            .and_then(|x| x.checked_add(self.n_tokens))
            .and_then(|x| x.checked_mul(self.batch))
            .and_then(|x| x.checked_mul(self.heads))
            .and_then(|x| x.checked_mul(self.head_dim))
            .is_some();
        if !fits {
            return Err(Error::Unsupported { what: "shape", detail: format!("{self:?}: buffer sizes overflow usize") });
        }
        Ok(())
    }

    /// Validates the shape and the lengths (in elements) of q, k, v, o and lse.
    pub fn check_buffers(&self, q_len: usize, k_len: usize, v_len: usize, o_len: usize, lse_len: usize) -> Result<()> {
        self.validate()?;
        check_len("q", q_len, self.q_len())?;
        check_len("k", k_len, self.k_len())?;
        check_len("v", v_len, self.k_len())?;
        check_len("o", o_len, self.q_len())?;
        check_len("lse", lse_len, self.lse_len())
    }

    /// Backward's extra buffers: d_o, dq, dk, dv.
    fn check_grad_buffers(&self, do_len: usize, dq_len: usize, dk_len: usize, dv_len: usize) -> Result<()> {
        check_len("d_o", do_len, self.q_len())?;
        check_len("dq", dq_len, self.q_len())?;
        check_len("dk", dk_len, self.k_len())?;
        check_len("dv", dv_len, self.k_len())
    }
}

/// f32 forward: writes `o` [B, N+2P, heads*head_dim] and `lse` [B, heads, N+2P].
pub fn cpu_forward(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    forward(shape, shape.scale(), q, k, v, o, lse)
}

/// f64 forward, the truth GPU and f32 results are compared against (scale 1/sqrt(head_dim) in f64).
pub fn f64_forward(
    shape: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    o: &mut [f64],
    lse: &mut [f64],
) -> Result<()> {
    forward(shape, 1.0 / (shape.head_dim as f64).sqrt(), q, k, v, o, lse)
}

/// f32 backward: given the forward's `o` and `lse` and the upstream `d_o`, writes (does not
/// accumulate) `dq`, `dk`, `dv`; dk and dv collect the rows of both streams.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    backward(shape, shape.scale(), |x| x, q, k, v, o, lse, d_o, dq, dk, dv)
}

/// f64 backward, the truth for gradients (see [`cpu_backward`]).
#[allow(clippy::too_many_arguments)]
pub fn f64_backward(
    shape: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    o: &[f64],
    lse: &[f64],
    d_o: &[f64],
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
) -> Result<()> {
    backward(shape, 1.0 / (shape.head_dim as f64).sqrt(), |x| x, q, k, v, o, lse, d_o, dq, dk, dv)
}

/// The arithmetic the reference needs, for f32 (the baseline) and f64 (the truth).
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::ZERO, |acc, (&x, &y)| acc + x * y)
}

/// y += alpha * x
fn axpy<T: Real>(y: &mut [T], alpha: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// The rows of head `head` of sample `b` of a [B, rows, heads*head_dim] tensor, contiguous
/// [rows, head_dim].
fn head_rows<T: Real>(x: &[T], b: usize, head: usize, rows: usize, shape: &AttentionShape) -> Vec<T> {
    let (hd, dm) = (shape.head_dim, shape.model_dim());
    let sample = &x[b * rows * dm..(b + 1) * rows * dm];
    sample.chunks_exact(dm).flat_map(|row| &row[head * hd..(head + 1) * hd]).copied().collect()
}

/// Writes per-(sample, head) results [rows, head_dim] (index b*heads + h) into a
/// [B, rows, heads*head_dim] tensor.
fn write_heads<T: Real>(dst: &mut [T], per_head: &[Vec<T>], rows: usize, shape: &AttentionShape) {
    let (hd, dm) = (shape.head_dim, shape.model_dim());
    dst.par_chunks_mut(rows * dm).enumerate().for_each(|(b, sample)| {
        for (head, src) in per_head[b * shape.heads..(b + 1) * shape.heads].iter().enumerate() {
            for (row, src_row) in sample.chunks_exact_mut(dm).zip(src.chunks_exact(hd)) {
                row[head * hd..(head + 1) * hd].copy_from_slice(src_row);
            }
        }
    });
}

fn forward<T: Real>(
    shape: &AttentionShape,
    scale: T,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [T],
    lse: &mut [T],
) -> Result<()> {
    shape.check_buffers(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    let (n, c, hd) = (shape.n_tokens, shape.n_context, shape.head_dim);
    let (q_rows, k_rows) = (shape.q_rows(), shape.k_rows());

    // One task per (sample, head): its lse rows are contiguous, its o rows are returned.
    let o_heads: Vec<Vec<T>> = lse
        .par_chunks_mut(q_rows)
        .enumerate()
        .map(|(bh, lse_bh)| {
            let (b, head) = (bh / shape.heads, bh % shape.heads);
            let qh = head_rows(q, b, head, q_rows, shape);
            let kh = head_rows(k, b, head, k_rows, shape);
            let vh = head_rows(v, b, head, k_rows, shape);
            let mut oh = vec![T::ZERO; q_rows * hd];
            let mut p = Vec::with_capacity(n);
            for (i, (qi, oi)) in qh.chunks_exact(hd).zip(oh.chunks_exact_mut(hd)).enumerate() {
                let (a, m) = visible_bounds(n, c, i);
                let keys = (0..a).chain(m..k_rows);
                p.clear();
                p.extend(keys.clone().map(|j| scale * dot(qi, &kh[j * hd..(j + 1) * hd])));
                let max = p.iter().fold(T::NEG_INFINITY, |mx, &s| if s > mx { s } else { mx });
                let mut sum = T::ZERO;
                for s in p.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (&pj, j) in p.iter().zip(keys) {
                    axpy(oi, pj, &vh[j * hd..(j + 1) * hd]);
                }
                let inv = T::ONE / sum;
                for x in oi.iter_mut() {
                    *x = *x * inv;
                }
                lse_bh[i] = max + sum.ln();
            }
            oh
        })
        .collect();
    write_heads(o, &o_heads, q_rows, shape);
    Ok(())
}

/// The backward of every precision. `round` is applied where the CUDA kernels round to bf16 before
/// a product (P for dV, dS = P (dP - delta) for dQ and dK; the identity for the references); the
/// softmax scale goes onto dQ and dK at the end, as in the kernels (exact for power-of-two scales).
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    shape: &AttentionShape,
    scale: T,
    round: fn(T) -> T,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    d_o: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    shape.check_buffers(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    shape.check_grad_buffers(d_o.len(), dq.len(), dk.len(), dv.len())?;
    let (n, c, hd) = (shape.n_tokens, shape.n_context, shape.head_dim);
    let (q_rows, k_rows) = (shape.q_rows(), shape.k_rows());

    // One task per (sample, head), returning (dq, dk, dv) of that head.
    let grads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = lse
        .par_chunks(q_rows)
        .enumerate()
        .map(|(bh, lse_bh)| {
            let (b, head) = (bh / shape.heads, bh % shape.heads);
            let qh = head_rows(q, b, head, q_rows, shape);
            let kh = head_rows(k, b, head, k_rows, shape);
            let vh = head_rows(v, b, head, k_rows, shape);
            let oh = head_rows(o, b, head, q_rows, shape);
            let doh = head_rows(d_o, b, head, q_rows, shape);
            let mut dqh = vec![T::ZERO; q_rows * hd];
            let mut dkh = vec![T::ZERO; k_rows * hd];
            let mut dvh = vec![T::ZERO; k_rows * hd];
            for (i, &lse_i) in lse_bh.iter().enumerate() {
                let row = i * hd..(i + 1) * hd;
                let (qi, doi) = (&qh[row.clone()], &doh[row.clone()]);
                let delta = dot(doi, &oh[row.clone()]);
                let dqi = &mut dqh[row];
                let (a, m) = visible_bounds(n, c, i);
                for j in (0..a).chain(m..k_rows) {
                    let col = j * hd..(j + 1) * hd;
                    let p = (scale * dot(qi, &kh[col.clone()]) - lse_i).exp();
                    axpy(&mut dvh[col.clone()], round(p), doi);
                    let ds = round(p * (dot(doi, &vh[col.clone()]) - delta));
                    axpy(dqi, ds, &kh[col.clone()]);
                    axpy(&mut dkh[col], ds, qi);
                }
            }
            dqh.iter_mut().chain(dkh.iter_mut()).for_each(|x| *x = *x * scale);
            (dqh, dkh, dvh)
        })
        .collect();
    let (dq_heads, (dk_heads, dv_heads)): (Vec<_>, (Vec<_>, Vec<_>)) =
        grads.into_iter().map(|(a, b, c)| (a, (b, c))).unzip();
    write_heads(dq, &dq_heads, q_rows, shape);
    write_heads(dk, &dk_heads, k_rows, shape);
    write_heads(dv, &dv_heads, k_rows, shape);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The CUDA kernels' internal roundings, emulated in f32 (for crate::emulate)

/// How far the CUDA forward lets a row's tile max pass its running max before it rescales, in
/// log2 units of scaled scores (`kLazyRescale` in cuda/attention.cu).
pub const CUDA_LAZY_RESCALE: f32 = 8.0;
/// Query rows that take the forward's lazy-rescaling decision together (one warp's m-tile).
const CUDA_DECISION_ROWS: usize = 16;

fn round_to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// [`cpu_forward`] with the CUDA forward's own roundings: keys in tiles of 64 in order, the online
/// softmax with its lazy running max (decided per 16 query rows together, as a warp decides), and
/// P rounded to bf16 for P V while the row sum adds it unrounded. `o` is left in f32 (the caller
/// rounds what the kernel stores). Summation orders inside a dot product are not modelled.
pub fn cpu_forward_kernel_rounding(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    shape.check_buffers(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    let (n, c, hd) = (shape.n_tokens, shape.n_context, shape.head_dim);
    let (q_rows, k_rows) = (shape.q_rows(), shape.k_rows());
    let (scale, tile) = (shape.scale(), CUDA_BLOCK_N);
    let sl2 = scale * std::f32::consts::LOG2_E;
    let o_heads: Vec<Vec<f32>> = lse
        .par_chunks_mut(q_rows)
        .enumerate()
        .map(|(bh, lse_bh)| {
            let (b, head) = (bh / shape.heads, bh % shape.heads);
            let qh = head_rows(q, b, head, q_rows, shape);
            let kh = head_rows(k, b, head, k_rows, shape);
            let vh = head_rows(v, b, head, k_rows, shape);
            let mut oh = vec![0.0f32; q_rows * hd];
            for r0 in (0..q_rows).step_by(CUDA_DECISION_ROWS) {
                let rows = r0..(r0 + CUDA_DECISION_ROWS).min(q_rows);
                let (mut mx, mut l) = (vec![f32::NEG_INFINITY; rows.len()], vec![0.0f32; rows.len()]);
                let mut acc = vec![0.0f32; rows.len() * hd];
                for k0 in (0..k_rows).step_by(tile) {
                    let keys = k0..(k0 + tile).min(k_rows);
                    // Raw scores of the tile, -inf where hidden.
                    let s: Vec<Vec<f32>> = rows
                        .clone()
                        .map(|i| {
                            let (a, m) = visible_bounds(n, c, i);
                            let qi = &qh[i * hd..(i + 1) * hd];
                            keys.clone()
                                .map(|j| {
                                    if j < a || j >= m {
                                        dot(qi, &kh[j * hd..(j + 1) * hd])
                                    } else {
                                        f32::NEG_INFINITY
                                    }
                                })
                                .collect()
                        })
                        .collect();
                    let tmax: Vec<f32> = s.iter().map(|r| r.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y))).collect();
                    let grow = tmax.iter().zip(&mx).any(|(&t, &m)| (t - m) * sl2 > CUDA_LAZY_RESCALE);
                    for (r, row_s) in s.iter().enumerate() {
                        let acc_r = &mut acc[r * hd..(r + 1) * hd];
                        if grow {
                            let mnew = mx[r].max(tmax[r]);
                            let base = if mnew == f32::NEG_INFINITY { 0.0 } else { mnew * sl2 };
                            let corr = (mx[r] * sl2 - base).exp2();
                            mx[r] = mnew;
                            acc_r.iter_mut().for_each(|x| *x *= corr);
                            l[r] *= corr;
                        }
                        let base = if mx[r] == f32::NEG_INFINITY { 0.0 } else { mx[r] * sl2 };
                        for (&sj, j) in row_s.iter().zip(keys.clone()) {
                            let p = (sj * sl2 - base).exp2();
                            l[r] += p;
                            axpy(acc_r, round_to_bf16(p), &vh[j * hd..(j + 1) * hd]);
                        }
                    }
                }
                for (r, i) in rows.enumerate() {
                    let inv = 1.0 / l[r];
                    for (x, &a) in oh[i * hd..(i + 1) * hd].iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                        *x = a * inv;
                    }
                    lse_bh[i] = mx[r] * scale + l[r].ln();
                }
            }
            oh
        })
        .collect();
    write_heads(o, &o_heads, q_rows, shape);
    Ok(())
}

/// [`cpu_backward`] with the CUDA backward's own roundings: P and dS = P (dP - delta) rounded to
/// bf16 where the kernels feed them to the tensor cores (dV += P^T dO, dQ += dS K, dK += dS^T Q).
/// Outputs are left in f32 (the caller rounds).
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward_kernel_rounding(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    backward(shape, shape.scale(), round_to_bf16, q, k, v, o, lse, d_o, dq, dk, dv)
}

// ------------------------------------------------------------------------------------------------
// CUDA launcher (cuda/attention.cu)

/// The only head size the CUDA kernels support (ViT-T/S/B all use 64).
pub const CUDA_HEAD_DIM: usize = 64;
/// Threads per block of every attention kernel (`MAPET_ATTN_THREADS`).
pub const CUDA_THREADS: u32 = 128;
/// Query rows per block of the forward and dQ kernels (`MAPET_ATTN_BLOCK_M`).
const CUDA_BLOCK_M: usize = 64;
/// Keys per block of the dK/dV kernel (`MAPET_ATTN_BLOCK_N`).
const CUDA_BLOCK_N: usize = 64;

/// Threads per block of the K/V-resident kernels (`MAPET_ATTN_RES_THREADS`).
const CUDA_RES_THREADS: u32 = 256;
/// Bytes of one padded `[64 x 72]` bf16 tile (`kTileBytes`).
const CUDA_TILE_BYTES: usize = 64 * 72 * 2;
/// Most dynamic shared memory a K/V-resident CTA may take: two CTAs must fit one SM of an
/// H100/H200 (228 KiB, 1 KiB of it reserved per CTA). ViT's 344 keys take 110,592 B.
const CUDA_RES_MAX_SMEM: usize = 113 << 10;
/// Resident CTAs per SM (`__launch_bounds__(MAPET_ATTN_RES_THREADS, 2)`).
const CUDA_RES_CTAS_PER_SM: usize = 2;
/// Threads per block of the wgmma forward (`MAPET_ATTN_WG_THREADS`): two warpgroups.
const CUDA_WG_THREADS: u32 = 256;
/// Bytes of one 128-byte-swizzled 64 x 64 bf16 tile (`kWgTileBytes`).
const CUDA_WG_TILE_BYTES: usize = 64 * 128;
/// Threads per block of the persistent wgmma forward (`MAPET_ATTN_WGP_THREADS`): four warpgroups.
const CUDA_WGP_THREADS: u32 = 512;
/// Its warpgroups: each takes every fourth row tile of a pair.
const CUDA_WGP_WARPGROUPS: usize = 4;
/// Threads per block of the wgmma dQ kernel (`MAPET_ATTN_WG_DQ_THREADS`): two warpgroups.
const CUDA_WG_DQ_THREADS: u32 = 256;
/// Most query rows the wgmma dK/dV kernel takes: it holds a key tile's 32-row position chunks as
/// the bits of one 32-bit mask (`ChunkMasks` in cuda/attention.cu). On an H100/H200 shared memory
/// refuses larger shapes first; this keeps the bound on any card. (The forward and dQ, whose masks
/// hold key chunks, stay far below it: two CTAs an SM keep Lk <= 384.)
const CUDA_WG_MAX_ROWS: usize = 32 * 32;
/// Threads per block of the wgmma dK/dV kernel (`MAPET_ATTN_WG_DKDV_THREADS`): three warpgroups.
const CUDA_WG_DKDV_THREADS: u32 = 384;
/// Most 64-key tiles the wgmma dK/dV kernel's plan holds (`kDkdvMaxKeyTiles`, the chunk masks
/// of MapetAttentionDkdv in cuda/params.h): keys are
/// fewer than query rows, so CUDA_WG_MAX_ROWS keeps them within it.
const CUDA_WG_DKDV_MAX_KEY_TILES: usize = 16;
/// Most CTAs a (sample, head) pair the wgmma dK/dV kernel's plan deals key tiles to
/// (`MAPET_DKDV_MAX_CTAS`): the launch gives a pair at most one CTA per 3 of its at most 16 key
/// tiles (ctas_per_pair), so 6.
const CUDA_WG_DKDV_MAX_CTAS: usize = 6;
/// Bytes of the balanced dK/dV kernel's hand-off slot (`MAPET_DKDV_HAND_SLOT_BYTES`), through
/// which the one tile a CTA may share between two warpgroups passes: a warpgroup's dK and dV
/// accumulators of a 64-key tile in f32.
const CUDA_DKDV_HAND_SLOT_BYTES: usize = 32 << 10;
/// Threads per block of the Q/dO-resident dK/dV kernel (`MAPET_ATTN_RES_DKDV_THREADS`), one CTA
/// per SM.
const CUDA_RES_DKDV_THREADS: u32 = 384;
/// Shared bytes per query row of the resident dK/dV kernel besides its Q and dO tiles: lse, delta
/// and the hidden window (4 + 4 + 8).
const CUDA_RES_DKDV_ROW_BYTES: usize = 16;

/// Which kernels compute the attention forward and backward. `Tiled` and `Resident` are written to
/// give the same results bit for bit: per warp, the same tiles, halves and arithmetic in the same
/// order (`fwd_tile`, `dq_tile`, `dkdv_tile` in cuda/attention.cu; tests/attention_gpu.rs asserts
/// it, and it held on an H200). They differ in how K and V (Q and dO) reach the SMs. `Wgmma`
/// computes the same function with other tiles and summation orders, so to the tolerance of
/// DESIGN.md, not to the bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionKernels {
    /// One CTA of 4 warps per 64 query rows, K and V streamed through shared memory a 64-key tile
    /// at a time (double-buffered cp.async, a barrier per tile): every K/V tile crosses from L2 once
    /// per 64 rows. Also what `Resident` falls back to where its shared memory does not suffice.
    Tiled,
    /// Forward and dQ: one CTA of 8 warps per (sample, head) pair (or a few, for small batches)
    /// that loads the pair's K and V into shared memory once; its warps then take 16-row tiles of
    /// the pair's rows with no further barrier. dK/dV: one CTA of 12 warps per pair that holds the
    /// pair's Q, dO and per-row data, its warps taking 16-key tiles. About 8x (forward, dQ) and 6x
    /// (dK/dV) less L2 traffic at ViT-B. Where the shared memory does not suffice (more than 384
    /// keys for the forward and dQ; more than 704 query rows for dK/dV on an H100/H200), the tiled kernel
    /// runs instead. On an H200 it gave the tiled kernels' bits 7% (forward) and 3% (forward +
    /// backward) faster at ViT-B (BENCHMARKS.md); what `Wgmma` runs off compute capability 9.0.
    Resident,
    /// The default: forward, dQ and dK/dV on Hopper's warpgroup MMA
    /// (`mapet_attention_{fwd,bwd_dq,bwd_dkdv}_wgmma`): the resident operands in
    /// 128-byte-swizzled shared memory, 64-row (64-key) tiles a warpgroup with the rows in an
    /// order that keeps their hidden windows together, and the next chunk's products in flight
    /// while the elementwise work of the current one runs. Deterministic, as the others. Compute
    /// capability 9.0 only; elsewhere, or where the shared memory does not suffice, the
    /// `Resident` (or tiled) kernels run. In the eighth run their tests passed on an H200, and at
    /// ViT-B they took 0.213 ms forward and 0.759 ms forward + backward, against `Resident`'s
    /// 0.276 and 1.072 (BENCHMARKS.md). Since then all three kernels have changed (the next
    /// tile's rows sent to L2 at the tile's start, which dQ's tests passed in the ninth run; the
    /// forward's tree of maxima, the masks' one compare an element, dK/dV's FULL chunks
    /// unmasked): none has run on a card as it now is.
    #[default]
    Wgmma,
    /// `Wgmma` with its dK/dV kernel loading each chunk's per-position stats at the end of the
    /// previous chunk's elementwise step (`mapet_attention_bwd_dkdv_wgmma_peek`), away from the
    /// wgmma issues, where the default's loads and their first uses sit among them (about 9% of
    /// its warp-stall samples in the eighth run). The same operations in the same order, so the
    /// default's bits (`tests/attention_gpu.rs` asserts it). Experimental, written after the
    /// ninth run: unverified on GPU.
    WgmmaPeek,
    /// `Wgmma`'s forward with a fused backward: one kernel (`mapet_attention_bwd_dkdv_wgmma_fused`)
    /// computes delta, dK, dV and dQ, five products of the (row, key) size where the dQ and dK/dV
    /// kernels run seven. Each warpgroup adds its dQ tiles into an f32 accumulator of the pair
    /// by `red.global.add`, which its CTA (one a pair) zeroes first and converts into dq last, so
    /// that it stays in L2 (cuda/attention.cu, fused_dq_notes). So dQ is **not deterministic**:
    /// its last bits may change from run to run (dK and dV do not). Its warpgroups take the
    /// 64-key tiles on `WgmmaBalanced`'s deal (one tile a CTA shared where that helps, handed
    /// over through 32 KB of global memory a pair). Needs one CTA a pair and 4 bytes x 64 x (Lq
    /// rounded up to 64) of scratch a pair (201 MB at ViT-B, batch 128; 50 MB more for the
    /// hand-off where a tile is shared). Experimental, written after the ninth run: unverified on
    /// GPU.
    WgmmaFused,
    /// `Wgmma` with a persistent forward (`mapet_attention_fwd_wgmma_persistent`): one CTA an SM
    /// of four warpgroups goes through its (sample, head) pairs in turn, copying the next pair's
    /// K and V into a second buffer while it computes this one's, so that only its first pair
    /// waits for them (the wgmma forward's two CTAs an SM start together and wait together, 18%
    /// of its warp-stall samples in the eighth run's profile). Each row tile's work is the
    /// `Wgmma` forward's, so the same bits (`tests/attention_gpu.rs` asserts it); its backward is
    /// `Wgmma`'s. Runs where the row tiles are a multiple of 4 (ViT: 8) and both buffers fit
    /// (Lk <= 384 on an H100/H200); elsewhere the `Wgmma` forward does. Experimental, written
    /// after the ninth run: unverified on GPU.
    WgmmaPersistent,
    /// `Wgmma` with its dK/dV kernel on a plan that evens out the three warpgroups of a CTA
    /// (`mapet_attention_bwd_dkdv_wgmma_balanced`; cuda/attention.cu, balanced_notes): the keys
    /// split into runs of at most 64 with the fewest live chunks over all splits, and the runs
    /// dealt to the warpgroups so that the busiest computes the fewest chunks, one run a CTA
    /// shared by two warpgroups where that helps (their partial dK and dV added through shared
    /// memory). At
    /// ViT's N = 197, C = 50 the busiest warpgroup computes 23 chunks where `Wgmma`'s computes
    /// 25, and the CTA waits for it. Deterministic; dK and dV of a shared run are summed in
    /// another order than `Wgmma`'s, so their last bits may differ from it. Where its hand-off
    /// slots do not fit, `Wgmma`'s dK/dV kernel runs. Experimental, written after the ninth run:
    /// unverified on GPU.
    WgmmaBalanced,
}

impl AttentionKernels {
    /// Every set, for tests and benches.
    pub const ALL: [AttentionKernels; 7] = [
        AttentionKernels::Tiled,
        AttentionKernels::Resident,
        AttentionKernels::Wgmma,
        AttentionKernels::WgmmaPeek,
        AttentionKernels::WgmmaFused,
        AttentionKernels::WgmmaPersistent,
        AttentionKernels::WgmmaBalanced,
    ];

    /// Whether its backward gives the same bits on every run (all but `WgmmaFused`, whose dQ
    /// adds its tiles in no fixed order).
    pub fn deterministic(self) -> bool {
        self != AttentionKernels::WgmmaFused
    }

    /// The wgmma forward's launch for `shape` on a device of compute capability `cc` with
    /// `sm_count` SMs whose blocks may take `max_smem` bytes of shared memory: grid x and dynamic
    /// shared bytes; `None` when another forward runs (not chosen, not compute capability 9.0,
    /// or K and V too large for two CTAs per SM).
    fn wgmma_launch(self, shape: &AttentionShape, cc: (u32, u32), sm_count: u32, max_smem: u32) -> Option<(u32, u32)> {
        if !self.is_wgmma() || cc != (9, 0) {
            return None;
        }
        // K and V tiles, a Q tile per warpgroup, and 1 KiB to align them to the swizzle's
        // 1024-byte atoms.
        let smem = (2 * shape.k_rows().div_ceil(CUDA_BLOCK_N) + 2) * CUDA_WG_TILE_BYTES + 1024;
        if smem > CUDA_RES_MAX_SMEM.min(max_smem as usize) {
            return None;
        }
        // 64-row tiles, two warpgroups a CTA.
        let split = ctas_per_pair(shape, sm_count as usize * CUDA_RES_CTAS_PER_SM, shape.q_rows().div_ceil(64), 2);
        Some((split, smem as u32))
    }

    /// The persistent wgmma forward's launch for `shape` on a device of compute capability `cc`
    /// with `sm_count` SMs whose blocks may take `max_smem` bytes of shared memory: grid x (one
    /// CTA an SM, at most one a pair) and dynamic shared bytes; `None` when another forward runs
    /// (not the `WgmmaPersistent` set, not compute capability 9.0, row tiles not a multiple of its
    /// 4 warpgroups, or its two K/V buffers too large).
    fn persistent_launch(
        self,
        shape: &AttentionShape,
        cc: (u32, u32),
        sm_count: u32,
        max_smem: u32,
    ) -> Option<(u32, u32)> {
        let tiles = shape.q_rows().div_ceil(64);
        if self != AttentionKernels::WgmmaPersistent || cc != (9, 0) || !tiles.is_multiple_of(CUDA_WGP_WARPGROUPS) {
            return None;
        }
        // Two buffers of K and V tiles, a Q tile per warpgroup, and 1 KiB to align them to the
        // swizzle's 1024-byte atoms.
        let smem = (4 * shape.k_rows().div_ceil(CUDA_BLOCK_N) + CUDA_WGP_WARPGROUPS) * CUDA_WG_TILE_BYTES + 1024;
        // (Its chunk masks hold 32 key chunks, as the wgmma forward's: Lk <= 1024. Shared memory
        // stops it first on an H100/H200, at Lk = 384; the bound holds on any card. Its pair
        // index is a 32-bit int.)
        let pairs = shape.batch * shape.heads;
        if smem > max_smem as usize || shape.k_rows() > 32 * 32 || pairs > i32::MAX as usize {
            return None;
        }
        Some((pairs.min(sm_count as usize).max(1) as u32, smem as u32))
    }

    /// The wgmma dK/dV kernel's launch (grid x, dynamic shared bytes), as [`Self::wgmma_launch`]:
    /// Q, dO and per-position lse, delta and hidden window of every position (whole 64-row tiles),
    /// a K and a V tile for each of 3 warpgroups, one CTA per SM.
    fn wgmma_dkdv_launch(
        self,
        shape: &AttentionShape,
        cc: (u32, u32),
        sm_count: u32,
        max_smem: u32,
    ) -> Option<(u32, u32)> {
        if !self.is_wgmma() || cc != (9, 0) || shape.q_rows() > CUDA_WG_MAX_ROWS {
            return None;
        }
        let positions = shape.q_rows().div_ceil(64) * 64;
        // The fused kernel's P^T and dS^T tiles, [32 positions x 64 keys] bf16 a warpgroup.
        let fused = self == AttentionKernels::WgmmaFused;
        let smem = positions * (2 * 128 + 12) + 6 * CUDA_WG_TILE_BYTES + 1024 + if fused { 6 * 32 * 128 } else { 0 };
        if smem > max_smem as usize {
            return None;
        }
        // 64-key tiles, three warpgroups a CTA, one CTA per SM; the fused kernel's CTA holds
        // its pair's dQ, so one CTA a pair.
        let split =
            if fused { 1 } else { ctas_per_pair(shape, sm_count as usize, shape.k_rows().div_ceil(CUDA_BLOCK_N), 3) };
        Some((split, smem as u32))
    }

    /// The resident forward and dQ kernels' launch for `shape` on a device with `sm_count` SMs
    /// whose blocks may take `max_smem` bytes of shared memory: grid x (CTAs per pair) and dynamic
    /// shared bytes; `None` when the tiled kernels run (tiled chosen, or K and V too large for two
    /// CTAs per SM of an H100/H200, or for the device).
    fn resident_launch(self, shape: &AttentionShape, sm_count: u32, max_smem: u32) -> Option<(u32, u32)> {
        if self == AttentionKernels::Tiled {
            return None;
        }
        let smem = 2 * shape.k_rows().div_ceil(CUDA_BLOCK_N) * CUDA_TILE_BYTES;
        if smem > CUDA_RES_MAX_SMEM.min(max_smem as usize) {
            return None;
        }
        // 16-row tiles, one a warp.
        let slots = sm_count as usize * CUDA_RES_CTAS_PER_SM;
        let split = ctas_per_pair(shape, slots, shape.q_rows().div_ceil(16), CUDA_RES_THREADS as usize / 32);
        Some((split, smem as u32))
    }

    /// The resident dK/dV kernel's launch for `shape` on a device with `sm_count` SMs whose blocks
    /// may take `max_smem` bytes of shared memory: grid x and dynamic shared bytes; `None` when the
    /// tiled kernel runs (tiled chosen, or Q and dO too large).
    fn resident_dkdv_launch(self, shape: &AttentionShape, sm_count: u32, max_smem: u32) -> Option<(u32, u32)> {
        if self == AttentionKernels::Tiled {
            return None;
        }
        let tiles = shape.q_rows().div_ceil(CUDA_BLOCK_M);
        let smem = tiles * (2 * CUDA_TILE_BYTES + CUDA_BLOCK_M * CUDA_RES_DKDV_ROW_BYTES);
        if smem > max_smem as usize {
            return None;
        }
        // One CTA per SM; 16-key tiles, one a warp.
        let split =
            ctas_per_pair(shape, sm_count as usize, shape.k_rows().div_ceil(16), CUDA_RES_DKDV_THREADS as usize / 32);
        Some((split, smem as u32))
    }
}

/// CTAs per (sample, head) pair for the kernels that hold a pair's operands in shared memory
/// (grid x), when `slots` CTAs fit the device at once and a pair has `tiles` tiles of work, taken
/// `per_cta` at a time by a CTA's warps (warpgroups): enough CTAs for about two waves, since more
/// CTAs per pair load its operands more times only when there are few pairs, and never more
/// than one tile per warp (warpgroup).
fn ctas_per_pair(shape: &AttentionShape, slots: usize, tiles: usize, per_cta: usize) -> u32 {
    let max_split = tiles.div_ceil(per_cta).max(1);
    (2 * slots).div_ceil(shape.batch * shape.heads).clamp(1, max_split) as u32
}

/// `MAPET_ATTENTION_KERNELS=tiled|resident|wgmma|wgmma-peek|wgmma-fused|wgmma-persistent|wgmma-balanced`
/// picks the kernels the CUDA backend passes to [`cuda_forward`] and [`cuda_backward`] (read once,
/// when the backend is made).
impl KernelChoice for AttentionKernels {
    const VAR: &'static str = "MAPET_ATTENTION_KERNELS";
    const CHOICES: &'static [Self] = &AttentionKernels::ALL;

    fn name(self) -> &'static str {
        match self {
            AttentionKernels::Tiled => "tiled",
            AttentionKernels::Resident => "resident",
            AttentionKernels::Wgmma => "wgmma",
            AttentionKernels::WgmmaPeek => "wgmma-peek",
            AttentionKernels::WgmmaFused => "wgmma-fused",
            AttentionKernels::WgmmaPersistent => "wgmma-persistent",
            AttentionKernels::WgmmaBalanced => "wgmma-balanced",
        }
    }
}

impl AttentionKernels {
    /// The set whose split backward (dQ, then dK/dV) runs where this one's does not: `Wgmma` for
    /// `WgmmaFused`, whose one kernel does not fit every shape the split kernels do; else itself.
    fn split_backward(self) -> AttentionKernels {
        if self == AttentionKernels::WgmmaFused {
            AttentionKernels::Wgmma
        } else {
            self
        }
    }

    /// Whether this set runs the wgmma kernels (on compute capability 9.0).
    fn is_wgmma(self) -> bool {
        matches!(
            self,
            AttentionKernels::Wgmma
                | AttentionKernels::WgmmaPeek
                | AttentionKernels::WgmmaFused
                | AttentionKernels::WgmmaPersistent
                | AttentionKernels::WgmmaBalanced
        )
    }

    /// The environment variable that picks the backward's kernels apart from the forward's.
    pub const BACKWARD_VAR: &'static str = "MAPET_ATTENTION_BACKWARD_KERNELS";

    /// The backward's kernels: those [`Self::BACKWARD_VAR`] names when it is set, else `forward`
    /// (the set `MAPET_ATTENTION_KERNELS` picked). A forward and a backward of different sets
    /// work together: every set reads and writes O and lse in the same layout
    /// (`mixed_forward_and_backward_sets_match_cpu` in `tests/attention_gpu.rs`). So one
    /// experimental set can be used for one direction alone, e.g. the `wgmma` forward with the
    /// `resident` backward.
    pub fn selected_backward(forward: AttentionKernels) -> Result<AttentionKernels> {
        Self::selected_or(Self::BACKWARD_VAR, forward)
    }
}

/// Checks that the CUDA kernels support `shape` (on top of [`AttentionShape::validate`]): head_dim
/// 64, grid dimensions and 32-bit row counts within range.
pub fn check_cuda_shape(shape: &AttentionShape) -> Result<()> {
    shape.validate()?;
    if shape.head_dim != CUDA_HEAD_DIM {
        return Err(Error::Unsupported {
            what: "head_dim",
            detail: format!(
                "the CUDA attention kernels support head_dim {CUDA_HEAD_DIM} only (ViT-T/S/B), got {}; \
                 use the CPU backend for other sizes",
                shape.head_dim
            ),
        });
    }
    if shape.batch > 65_535 || shape.heads > 65_535 {
        return Err(Error::Unsupported {
            what: "batch/heads",
            detail: format!("batch {} and heads {} must each be at most 65535 (grid limits)", shape.batch, shape.heads),
        });
    }
    if shape.n_tokens >= 1 << 28 {
        return Err(Error::Unsupported {
            what: "n_tokens",
            detail: format!(
                "{} tokens: the CUDA kernels index rows with 32-bit integers (at most 2^28)",
                shape.n_tokens
            ),
        });
    }
    if shape.model_dim() >= 1 << 31 {
        return Err(Error::Unsupported {
            what: "heads",
            detail: format!("row width {} must stay below 2^31 elements", shape.model_dim()),
        });
    }
    Ok(())
}

/// The parameter struct for contiguous tensors laid out as [`cpu_forward`] documents.
fn contiguous_params(shape: &AttentionShape) -> MapetAttention {
    let d = shape.model_dim() as i64;
    let (lq, lk) = (shape.q_rows() as i64, shape.k_rows() as i64);
    MapetAttention {
        q: std::ptr::null(),
        k: std::ptr::null(),
        v: std::ptr::null(),
        o: std::ptr::null_mut(),
        lse: std::ptr::null_mut(),
        d_o: std::ptr::null(),
        dq: std::ptr::null_mut(),
        dk: std::ptr::null_mut(),
        dv: std::ptr::null_mut(),
        delta: std::ptr::null_mut(),
        q_batch_stride: lq * d,
        q_row_stride: d,
        k_batch_stride: lk * d,
        k_row_stride: d,
        v_batch_stride: lk * d,
        v_row_stride: d,
        o_batch_stride: lq * d,
        o_row_stride: d,
        do_batch_stride: lq * d,
        do_row_stride: d,
        dq_batch_stride: lq * d,
        dq_row_stride: d,
        dk_batch_stride: lk * d,
        dk_row_stride: d,
        dv_batch_stride: lk * d,
        dv_row_stride: d,
        batch: shape.batch as i32,
        heads: shape.heads as i32,
        head_dim: shape.head_dim as i32,
        n_tokens: shape.n_tokens as i32,
        n_context: shape.n_context as i32,
        scale: shape.scale(),
        l2_ahead: 0,
    }
}

/// `row_at` of cuda/attention.cu: the query row at position `pos` of the wgmma kernels' position
/// order for N = `n`, C = `c` (Lq past the end). The order keeps the rows' first hidden keys
/// non-decreasing: the context's content rows and the mask rows (a = C), then each rank's content
/// row after its query-stream row (a = C + q + 1 after a = C + q).
fn row_at(n: usize, c: usize, pos: usize) -> usize {
    let p = n - c;
    if pos < c {
        pos
    } else if pos < c + p {
        n + pos - c
    } else if pos - c - p >= 2 * p {
        n + 2 * p
    } else {
        let j = pos - c - p;
        if j % 2 == 1 {
            c + j / 2
        } else {
            n + p + j / 2
        }
    }
}

/// `classify` of cuda/attention.cu: the class of the block of rows with first-hidden extrema
/// `amin`, `amax` against keys [k0, k1), for P = `p` and Lk = `lk` keys (0 EMPTY, 1 FULL, 2
/// PARTIAL; rows complete).
fn classify(p: usize, lk: usize, amin: usize, amax: usize, k0: usize, k1: usize) -> u8 {
    if k0 >= lk || (k0 >= amax && k1.min(lk) <= amin + p) {
        0
    } else if (k1 <= amin || k0 >= amax + p) && k1 <= lk {
        1
    } else {
        2
    }
}

/// The wgmma dK/dV kernel's chunk masks of each 64-key tile kt, (live, partial): bit pc is set
/// when the 32-position chunk pc (positions in `row_at` order) has a visible pair with the tile's
/// keys (live), and a hidden one as well (partial, masked per element).
fn dkdv_chunk_masks(n: usize, c: usize) -> Vec<(u32, u32)> {
    let extrema = chunk_extrema(n, c);
    let (p, lk) = (n - c, 2 * n - c);
    (0..lk.div_ceil(64)).map(|kt| run_chunk_masks(p, lk, &extrema, 64 * kt, 64 * kt + 64)).collect()
}

/// The first-hidden extrema (first, last) of each 32-position chunk in `row_at` order
/// (first_hidden is monotone along the order).
fn chunk_extrema(n: usize, c: usize) -> Vec<(usize, usize)> {
    let lq = 3 * n - 2 * c;
    let first_hidden = |row: usize| visible_bounds(n, c, row).0;
    (0..lq.div_ceil(32))
        .map(|pc| (first_hidden(row_at(n, c, 32 * pc)), first_hidden(row_at(n, c, (32 * pc + 32).min(lq) - 1))))
        .collect()
}

/// (live, partial) chunk masks of the keys [k0, k1) (`classify`; keys past Lk count as hidden).
fn run_chunk_masks(p: usize, lk: usize, extrema: &[(usize, usize)], k0: usize, k1: usize) -> (u32, u32) {
    extrema.iter().enumerate().fold((0u32, 0u32), |(live, partial), (pc, &(amin, amax))| {
        match classify(p, lk, amin, amax, k0, k1) {
            0 => (live, partial),
            1 => (live | 1 << pc, partial),
            _ => (live | 1 << pc, partial | 1 << pc),
        }
    })
}

/// The key tiles the three warpgroups of CTA `x` of `grid` CTAs a pair compute, in order: the
/// CTA's tiles (those kt with (kt / 3) % grid == x) dealt so that their live chunk counts
/// (`live[kt]`) come out even, the tile with the most first (the lowest index among equals) to
/// the warpgroup with the fewest so far (the lowest index among equals).
fn dkdv_deal(live: &[u32], grid: usize, x: usize) -> [Vec<usize>; 3] {
    let mut todo: Vec<usize> = (0..live.len()).filter(|kt| (kt / 3) % grid == x).collect();
    let mut load = [0u32; 3];
    let mut out: [Vec<usize>; 3] = Default::default();
    while !todo.is_empty() {
        let i = (0..todo.len()).fold(0, |b, i| if live[todo[i]] > live[todo[b]] { i } else { b });
        let best = todo.remove(i);
        let w = (0..3).fold(0, |w, v| if load[v] < load[w] { v } else { w });
        load[w] += live[best];
        out[w].push(best);
    }
    out
}

/// The balanced dK/dV kernel's key runs for N = `n`, C = `c` (cuda/attention.cu, balanced_notes):
/// as many runs of 1 to 64 keys as the other kernels have 64-key tiles, covering [0, Lk) in order,
/// with the fewest live chunks (`run_chunk_masks`) over all such splits (the shortest first run
/// among equals), by dynamic programming over the runs' ends.
fn balanced_runs(n: usize, c: usize) -> Vec<(usize, usize)> {
    let (p, lk) = (n - c, 2 * n - c);
    let tiles = lk.div_ceil(64);
    let extrema = chunk_extrema(n, c);
    // live[s][len - 1]: live chunks of the keys [s, s + len).
    let live: Vec<Vec<u32>> = (0..lk)
        .map(|s| (1..=64.min(lk - s)).map(|len| run_chunk_masks(p, lk, &extrema, s, s + len).0.count_ones()).collect())
        .collect();
    // fewest[t][s]: the fewest live chunks of t runs covering [s, Lk); end[t][s]: the first run's end.
    let mut fewest = vec![vec![u32::MAX; lk + 1]; tiles + 1];
    let mut end = vec![vec![0usize; lk + 1]; tiles + 1];
    fewest[0][lk] = 0;
    for t in 1..=tiles {
        for s in (0..lk).rev() {
            for e in s + 1..=(s + 64).min(lk) {
                if fewest[t - 1][e] != u32::MAX && fewest[t - 1][e] + live[s][e - s - 1] < fewest[t][s] {
                    (fewest[t][s], end[t][s]) = (fewest[t - 1][e] + live[s][e - s - 1], e);
                }
            }
        }
    }
    let mut runs = Vec::with_capacity(tiles);
    let mut s = 0;
    for t in (1..=tiles).rev() {
        runs.push((s, end[t][s]));
        s = end[t][s];
    }
    runs
}

/// One warpgroup's share of a balanced plan (`balanced_deal`): its key tiles in order, the chunks
/// of its first and last tile it computes (ANDed with the tile's live chunks), and whether its
/// first tile's partial goes to the CTA's hand-off slot (it shares that tile with the warpgroup
/// that ends with it) and whether its last tile takes the slot's partial.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WarpgroupShare {
    tiles: Vec<usize>,
    keep_first: u32,
    keep_last: u32,
    hand_out: bool,
    hand_in: bool,
}

impl WarpgroupShare {
    fn whole(tiles: Vec<usize>) -> Self {
        WarpgroupShare { tiles, keep_first: !0, keep_last: !0, hand_out: false, hand_in: false }
    }
}

/// Most key tiles of a CTA `balanced_deal` searches every deal of (3^8 = 6561); with more it
/// takes `dkdv_deal`'s. The balanced kernel's shared memory holds at most 8 at Lk < Lq <= 512.
const BALANCED_DEAL_MAX_TILES: usize = 8;

/// The balanced plan's deal of the key tiles of CTA `x` of `grid` (those kt with (kt / 3) % grid ==
/// x) to its three warpgroups, from each tile's live chunk mask (cuda/attention.cu,
/// balanced_notes). Over every deal of whole tiles, and for each, every move of part of one tile
/// of its busiest warpgroup to another (as even as that tile allows), the one whose busiest
/// warpgroup computes the fewest chunks; among equals, no shared tile, then the first found. The
/// shared tile is its first warpgroup's last (its last chunks, computed last; that warpgroup takes
/// the slot's partial) and the other's first (its first chunks, computed first and handed out).
/// Where none beats `dkdv_deal`, that deal, whole.
fn balanced_deal(live: &[u32], grid: usize, x: usize) -> [WarpgroupShare; 3] {
    let counts: Vec<u32> = live.iter().map(|m| m.count_ones()).collect();
    let whole = dkdv_deal(&counts, grid, x);
    let whole_max = whole.iter().map(|t| t.iter().map(|&kt| counts[kt]).sum::<u32>()).max().unwrap_or(0);
    let mine: Vec<usize> = (0..live.len()).filter(|kt| (kt / 3) % grid == x).collect();
    if mine.len() > BALANCED_DEAL_MAX_TILES {
        return whole.map(WarpgroupShare::whole);
    }
    // (busiest load, shared, deal: mine[i] to warpgroup deal[i], move: (i, to, chunks))
    type Candidate = (u32, bool, Vec<usize>, Option<(usize, usize, u32)>);
    let mut best: Option<Candidate> = None;
    for code in 0..3usize.pow(mine.len() as u32) {
        let deal: Vec<usize> = (0..mine.len()).map(|i| code / 3usize.pow(i as u32) % 3).collect();
        let mut loads = [0u32; 3];
        deal.iter().zip(&mine).for_each(|(&w, &kt)| loads[w] += counts[kt]);
        let busiest = (0..3).fold(0, |m, w| if loads[w] > loads[m] { w } else { m });
        let mut consider = |max: u32, mv: Option<(usize, usize, u32)>| {
            if best.as_ref().is_none_or(|b| (max, mv.is_some()) < (b.0, b.1)) {
                best = Some((max, mv.is_some(), deal.clone(), mv));
            }
        };
        consider(loads[busiest], None);
        for (i, &kt) in mine.iter().enumerate().filter(|&(i, _)| deal[i] == busiest) {
            for to in (0..3).filter(|&w| w != busiest) {
                if counts[kt] < 2 || loads[to] >= loads[busiest] {
                    continue;
                }
                let moved = ((loads[busiest] - loads[to]) / 2).clamp(1, counts[kt] - 1);
                let mut after = loads;
                (after[busiest], after[to]) = (after[busiest] - moved, after[to] + moved);
                consider(after.into_iter().max().unwrap_or(0), Some((i, to, moved)));
            }
        }
    }
    let Some((max, _, deal, mv)) = best.filter(|b| b.0 < whole_max) else {
        return whole.map(WarpgroupShare::whole);
    };
    debug_assert!(max < whole_max);
    // Each warpgroup's whole tiles, the most live chunks first (the lowest index among equals).
    let mut out: [WarpgroupShare; 3] = std::array::from_fn(|w| {
        let mut tiles: Vec<usize> = mine.iter().zip(&deal).filter(|&(_, &d)| d == w).map(|(&kt, _)| kt).collect();
        tiles.sort_by_key(|&kt| (std::cmp::Reverse(counts[kt]), kt));
        WarpgroupShare::whole(tiles)
    });
    if let Some((i, to, moved)) = mv {
        let (kt, from) = (mine[i], deal[i]);
        // The first `moved` chunks go to `to`, first; `from` keeps the rest, last.
        let mut first = 0u32;
        let mut left = live[kt];
        for _ in 0..moved {
            let low = left & left.wrapping_neg();
            (first, left) = (first | low, left & !low);
        }
        let tiles = &mut out[from].tiles;
        tiles.retain(|&t| t != kt);
        tiles.push(kt);
        (out[from].keep_last, out[from].hand_in) = (left, true);
        out[to].tiles.insert(0, kt);
        (out[to].keep_first, out[to].hand_out) = (first, true);
    }
    out
}

/// Which tiling a wgmma dK/dV kernel's plan takes (`dkdv_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DkdvPlan {
    /// 64-key tiles from 0, dealt whole (`dkdv_deal`): the wgmma and wgmma-peek kernels.
    Aligned,
    /// The fewest-chunk key runs (`balanced_runs`), one of them a CTA shared where that helps
    /// (`balanced_deal`): the balanced kernel.
    Balanced,
    /// 64-key tiles, one of them a CTA shared where that helps: the fused kernel, whose dQ sums
    /// over keys, so that a run must not leave keys of its 64 unmasked.
    AlignedShared,
}

/// The wgmma dK/dV kernel's parameters for `grid` CTAs a pair: `p` and the plan the kernel reads
/// (MapetAttentionDkdv in cuda/params.h): the chunk masks of every key tile and every warpgroup's
/// key tiles. They depend on N, C and `grid` alone, and are worked out here once a launch, where
/// every CTA used to work them out ahead of its first copies. The second value says whether a CTA
/// shares a tile between two warpgroups (so that the kernel needs its hand-off slot).
fn dkdv_params(
    p: MapetAttention,
    shape: &AttentionShape,
    grid: usize,
    kind: DkdvPlan,
) -> Result<(MapetAttentionDkdv, bool)> {
    let (n, c) = (shape.n_tokens, shape.n_context);
    // (The arrays' lengths are the header's: a mismatch does not compile.)
    let (tiles, deals) = (CUDA_WG_DKDV_MAX_KEY_TILES, 3 * CUDA_WG_DKDV_MAX_CTAS);
    if shape.k_rows().div_ceil(64) > tiles || 3 * grid > deals {
        return Err(Error::Unsupported {
            what: "attention shape",
            detail: format!(
                "the wgmma dK/dV kernel's plan holds {tiles} key tiles and {CUDA_WG_DKDV_MAX_CTAS} CTAs a pair, not {} \
                 and {grid}",
                shape.k_rows().div_ceil(64)
            ),
        });
    }
    let tiling = match kind {
        DkdvPlan::Aligned => Arc::new(DkdvTiling::aligned(n, c, grid)),
        DkdvPlan::Balanced => balanced_tiling(n, c, grid, true),
        DkdvPlan::AlignedShared => balanced_tiling(n, c, grid, false),
    };
    let mut plan = MapetAttentionDkdv {
        a: p,
        live: [0; CUDA_WG_DKDV_MAX_KEY_TILES],
        partial: [0; CUDA_WG_DKDV_MAX_KEY_TILES],
        deal: [0; 3 * CUDA_WG_DKDV_MAX_CTAS],
        deal_count: [0; 3 * CUDA_WG_DKDV_MAX_CTAS],
        dq_acc: std::ptr::null_mut(),
        tile_start: [0; CUDA_WG_DKDV_MAX_KEY_TILES],
        tile_end: [0; CUDA_WG_DKDV_MAX_KEY_TILES],
        keep_first: [!0; 3 * CUDA_WG_DKDV_MAX_CTAS],
        keep_last: [!0; 3 * CUDA_WG_DKDV_MAX_CTAS],
        hand_out: [0; 3 * CUDA_WG_DKDV_MAX_CTAS],
        hand_in: [0; 3 * CUDA_WG_DKDV_MAX_CTAS],
        hand: std::ptr::null_mut(),
    };
    for (kt, (&(live, partial), &(k0, k1))) in tiling.masks.iter().zip(&tiling.runs).enumerate() {
        (plan.live[kt], plan.partial[kt]) = (live, partial);
        (plan.tile_start[kt], plan.tile_end[kt]) = (k0 as i32, k1 as i32);
    }
    let mut shared = false;
    for (x, shares) in tiling.shares.iter().enumerate() {
        for (w, share) in shares.iter().enumerate() {
            let at = 3 * x + w;
            plan.deal[at] = share.tiles.iter().enumerate().map(|(i, &kt)| (kt as u64) << (4 * i)).sum();
            plan.deal_count[at] = share.tiles.len() as i32;
            (plan.keep_first[at], plan.keep_last[at]) = (share.keep_first, share.keep_last);
            (plan.hand_out[at], plan.hand_in[at]) = (share.hand_out as i32, share.hand_in as i32);
            shared |= share.hand_in;
        }
    }
    Ok((plan, shared))
}

/// A dK/dV plan's tiling for (N, C, CTAs a pair): the key runs, their (live, partial) chunk masks,
/// and each CTA's warpgroups' shares.
#[derive(Debug)]
struct DkdvTiling {
    runs: Vec<(usize, usize)>,
    masks: Vec<(u32, u32)>,
    shares: Vec<[WarpgroupShare; 3]>,
}

impl DkdvTiling {
    /// The wgmma dK/dV kernel's: 64-key tiles from 0 (`aligned_runs`, `dkdv_chunk_masks`), dealt
    /// whole (`dkdv_deal`).
    fn aligned(n: usize, c: usize, grid: usize) -> Self {
        let masks = dkdv_chunk_masks(n, c);
        let counts: Vec<u32> = masks.iter().map(|m| m.0.count_ones()).collect();
        DkdvTiling {
            runs: aligned_runs(n, c),
            shares: (0..grid).map(|x| dkdv_deal(&counts, grid, x).map(WarpgroupShare::whole)).collect(),
            masks,
        }
    }
}

/// The 64-key tiles from 0 as key runs, the last ending at Lk.
fn aligned_runs(n: usize, c: usize) -> Vec<(usize, usize)> {
    let lk = 2 * n - c;
    (0..lk).step_by(64).map(|k| (k, (k + 64).min(lk))).collect()
}

/// A tiling with shared tiles (`balanced_deal`): on the fewest-chunk runs (`balanced_runs`) or on
/// 64-key tiles (`fewest_runs` false), worked out once for each (N, C, CTAs a pair, runs) a
/// process meets: about 50 us at ViT's, up to a millisecond at eight runs, where the aligned one
/// dealt whole takes well under a microsecond.
fn balanced_tiling(n: usize, c: usize, grid: usize, fewest_runs: bool) -> Arc<DkdvTiling> {
    type Tilings = Mutex<HashMap<(usize, usize, usize, bool), Arc<DkdvTiling>>>;
    static TILINGS: OnceLock<Tilings> = OnceLock::new();
    let cache = TILINGS.get_or_init(Default::default);
    let key = (n, c, grid, fewest_runs);
    if let Some(t) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Arc::clone(t);
    }
    let (p, lk) = (n - c, 2 * n - c);
    let (runs, masks) = if fewest_runs {
        let runs = balanced_runs(n, c);
        let extrema = chunk_extrema(n, c);
        let masks = runs.iter().map(|&(k0, k1)| run_chunk_masks(p, lk, &extrema, k0, k1)).collect();
        (runs, masks)
    } else {
        // The aligned tiles' own masks: a tile reaching past Lk is PARTIAL in every chunk, so that
        // the fused kernel masks its keys past Lk (its dQ sums over them).
        (aligned_runs(n, c), dkdv_chunk_masks(n, c))
    };
    let live: Vec<u32> = masks.iter().map(|m| m.0).collect();
    let shares = (0..grid).map(|x| balanced_deal(&live, grid, x)).collect();
    let tiling = Arc::new(DkdvTiling { runs, masks, shares });
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Arc::clone(&tiling));
    tiling
}

/// The `WgmmaFused` backward ([`AttentionKernels::WgmmaFused`]) on the launch and plan
/// `wgmma_dkdv` gave (`shared`: a CTA shares a tile): delta, dK, dV and dQ in one kernel.
fn fused_backward(
    gpu: &Gpu,
    shape: &AttentionShape,
    mut plan: MapetAttentionDkdv,
    shared: bool,
    launch: (u32, u32),
) -> Result<()> {
    // The pair's dQ accumulator: 64 dims x its positions (whole 64-row tiles), f32.
    let acc = gpu.alloc::<f32>(shape.batch * shape.heads * 64 * shape.q_rows().div_ceil(64) * 64)?;
    plan.dq_acc = acc.f32_ptr();
    // A pair's hand-off slot where a CTA shares a tile (its CTA drops the lines once read).
    let hand =
        if shared { Some(gpu.alloc::<f32>(shape.batch * shape.heads * CUDA_DKDV_HAND_SLOT_BYTES / 4)?) } else { None };
    plan.hand = hand.as_ref().map_or(std::ptr::null_mut(), |h| h.f32_ptr());
    let cfg = resident_grid(launch, CUDA_WG_DKDV_THREADS, shape);
    // SAFETY: as for the wgmma dK/dV kernel in cuda_backward, with one CTA a pair (launch.0 is 1
    // for this set: wgmma_dkdv_launch), which zeroes, adds to, converts and discards only its
    // pair's 64 x positions floats of `acc` (allocated for every pair above), reads its pair's
    // rows of o and d_o (checked in cuda_backward) and writes its pair's rows of dq; where the
    // plan shares a tile, its warpgroups write and read only their pair's slot of `hand`
    // (allocated for every pair above; never touched when no tile is shared).
    unsafe { gpu.launch_dependent("attention", "mapet_attention_bwd_dkdv_wgmma_fused", cfg, &plan) }
}

fn grid(rows: usize, per_block: usize, shape: &AttentionShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(per_block) as u32, shape.heads as u32, shape.batch as u32),
        block_dim: (CUDA_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn resident_grid((split, smem): (u32, u32), threads: u32, shape: &AttentionShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (split, shape.heads as u32, shape.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The wgmma dK/dV kernel `cuda_backward` runs for `kernels` at `shape` on a device of compute
/// capability `cc` with `sm_count` SMs whose blocks may take `max_smem` bytes of shared memory:
/// its name, launch (grid x, dynamic shared bytes), plan with `p`, and whether a CTA shares a key
/// run between two warpgroups (the balanced and fused plans); `None` where no wgmma dK/dV kernel
/// of this set runs (for `WgmmaFused`, where its kernel does not fit: `split_backward` then). The
/// balanced kernel's hand-off slot is added to the shared memory where a run is shared; where
/// that does not fit, the wgmma kernel runs on its own plan.
#[allow(clippy::type_complexity)]
fn wgmma_dkdv(
    (cc, sm_count, max_smem): ((u32, u32), u32, u32),
    kernels: AttentionKernels,
    shape: &AttentionShape,
    p: MapetAttention,
) -> Result<Option<(&'static str, (u32, u32), MapetAttentionDkdv, bool)>> {
    let Some((grid_x, smem)) = kernels.wgmma_dkdv_launch(shape, cc, sm_count, max_smem) else { return Ok(None) };
    if kernels == AttentionKernels::WgmmaFused {
        let (plan, shared) = dkdv_params(p, shape, grid_x as usize, DkdvPlan::AlignedShared)?;
        return Ok(Some(("mapet_attention_bwd_dkdv_wgmma_fused", (grid_x, smem), plan, shared)));
    }
    if kernels == AttentionKernels::WgmmaBalanced {
        let (plan, shared) = dkdv_params(p, shape, grid_x as usize, DkdvPlan::Balanced)?;
        let with_slot = smem + if shared { CUDA_DKDV_HAND_SLOT_BYTES as u32 } else { 0 };
        if with_slot <= max_smem {
            return Ok(Some(("mapet_attention_bwd_dkdv_wgmma_balanced", (grid_x, with_slot), plan, shared)));
        }
    }
    let (plan, _) = dkdv_params(p, shape, grid_x as usize, DkdvPlan::Aligned)?;
    let name = match kernels {
        AttentionKernels::WgmmaPeek => "mapet_attention_bwd_dkdv_wgmma_peek",
        _ => "mapet_attention_bwd_dkdv_wgmma",
    };
    Ok(Some((name, (grid_x, smem), plan, false)))
}

/// The wgmma kernels' `l2_ahead` (MapetAttention) on `gpu`, for a kernel that runs `ctas_per_sm`
/// CTAs an SM: 0, or where [`Gpu::next_wave_to_l2`] asks for it, that many CTAs for every SM. The
/// CTA that follows one on its SM is then about that many launches later.
fn next_wave_ahead(gpu: &Gpu, ctas_per_sm: u32) -> i32 {
    if gpu.next_wave_to_l2() {
        (ctas_per_sm * gpu.sm_count()) as i32
    } else {
        0
    }
}

/// `plain`, or where [`Gpu::next_wave_to_l2`] asks for it its twin `l2`, which also sends the
/// next wave's operands to L2 (the wgmma forward's and dQ's `_l2` kernels: `next_wave_to_l2` in
/// cuda/attention.cu; the same code otherwise, so the default's stays as measured).
fn plain_or_l2(gpu: &Gpu, plain: &'static str, l2: &'static str) -> &'static str {
    if gpu.next_wave_to_l2() {
        l2
    } else {
        plain
    }
}

/// What the launchers' choices depend on: `gpu`'s compute capability, SM count and the shared
/// memory a block may take.
fn device_limits(gpu: &Gpu) -> ((u32, u32), u32, u32) {
    (gpu.compute_capability(), gpu.sm_count(), gpu.max_shared_memory_per_block())
}

/// The wgmma dK/dV kernel [`cuda_backward`] runs for `kernels` at `shape` on `gpu` (the fused one
/// for `WgmmaFused` where it fits), and whether its plan has a CTA share a key run between two
/// warpgroups (the `WgmmaBalanced` and `WgmmaFused` sets' hand-off); `None` where another dK/dV
/// kernel runs (another set, another compute capability, or too little shared memory) or the
/// shape is refused. For a test to tell what it compared.
pub fn cuda_dkdv_kernel(gpu: &Gpu, kernels: AttentionKernels, shape: &AttentionShape) -> Option<(&'static str, bool)> {
    let p = contiguous_params(shape);
    let device = device_limits(gpu);
    let chosen = wgmma_dkdv(device, kernels, shape, p).ok().flatten();
    let chosen = chosen.or_else(|| wgmma_dkdv(device, kernels.split_backward(), shape, p).ok().flatten());
    chosen.map(|(name, _, _, shared)| (name, shared))
}

/// Forward on the GPU: `o` (bf16) and `lse` (f32) from bf16 `q`, `k`, `v`, all contiguous as
/// [`cpu_forward`] documents, with the `kernels` asked for. Head dim 64 only
/// ([`check_cuda_shape`]).
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward(
    gpu: &Gpu,
    kernels: AttentionKernels,
    shape: &AttentionShape,
    q: &dyn DeviceRead<bf16>,
    k: &dyn DeviceRead<bf16>,
    v: &dyn DeviceRead<bf16>,
    o: &mut dyn DeviceWrite<bf16>,
    lse: &mut dyn DeviceWrite<f32>,
) -> Result<()> {
    check_cuda_shape(shape)?;
    shape.check_buffers(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    for (tensor, ptr) in [("q", q.ptr()), ("k", k.ptr()), ("v", v.ptr()), ("o", o.ptr())] {
        check_aligned(tensor, ptr, 16)?;
    }
    let mut p = contiguous_params(shape);
    (p.q, p.k, p.v, p.o, p.lse) = (q.ptr(), k.ptr(), v.ptr(), o.ptr_mut(), lse.f32_ptr());
    // (Read by mapet_attention_fwd_wgmma_l2 alone, which runs two CTAs an SM.)
    p.l2_ahead = next_wave_ahead(gpu, CUDA_RES_CTAS_PER_SM as u32);
    let (kernel, cfg) = forward_launch(gpu, kernels, shape);
    // SAFETY: check_cuda_shape and check_buffers bound every row, head and column the kernel
    // touches by the buffer lengths; every bf16 pointer is 16-byte aligned (checked above) and
    // every stride is a multiple of 64 elements (head_dim 64), as the kernel's 16-byte copies and
    // 4-byte fragment loads and stores need. The tiled kernel handles rows [blockIdx.x * 64, +64)
    // clipped to Lq; the resident and wgmma ones rows < Lq of their pair, with the dynamic shared
    // memory that all of its pair's K and V tiles take (resident_launch, wgmma_launch); the
    // persistent wgmma one rows < Lq of its CTA's pairs (blockIdx.x + i gridDim.x, below batch *
    // heads: its grid holds at most one CTA a pair), with two buffers of a pair's K and V tiles
    // and a Q tile per warpgroup, and row tiles a multiple of its 4 warpgroups, as it requires
    // (persistent_launch); the wgmma ones only on compute capability 9.0, where their sm_90a
    // code exists. Every attention kernel
    // waits for the kernel before it first (dependent_launch_start), so it may be a dependent
    // launch (a test holds the source to that).
    unsafe { gpu.launch_dependent("attention", kernel, cfg, &p) }
}

/// The forward kernel [`cuda_forward`] launches for `kernels` and `shape` on `gpu` (the set's
/// kernel, or the one it falls back to where its own does not fit the shape or the device), e.g.
/// for a test to tell which kernel it compared.
pub fn cuda_forward_kernel(gpu: &Gpu, kernels: AttentionKernels, shape: &AttentionShape) -> &'static str {
    forward_launch(gpu, kernels, shape).0
}

/// The forward's kernel and launch (`cuda_forward`).
fn forward_launch(gpu: &Gpu, kernels: AttentionKernels, shape: &AttentionShape) -> (&'static str, LaunchConfig) {
    let (cc, sm_count, max_smem) = device_limits(gpu);
    if let Some((ctas, smem)) = kernels.persistent_launch(shape, cc, sm_count, max_smem) {
        let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (CUDA_WGP_THREADS, 1, 1), shared_mem_bytes: smem };
        return ("mapet_attention_fwd_wgmma_persistent", cfg);
    }
    let wgmma = kernels.wgmma_launch(shape, cc, sm_count, max_smem);
    match (wgmma, kernels.resident_launch(shape, sm_count, max_smem)) {
        (Some(launch), _) => {
            let kernel = plain_or_l2(gpu, "mapet_attention_fwd_wgmma", "mapet_attention_fwd_wgmma_l2");
            (kernel, resident_grid(launch, CUDA_WG_THREADS, shape))
        }
        (None, Some(launch)) => ("mapet_attention_fwd_resident", resident_grid(launch, CUDA_RES_THREADS, shape)),
        (None, None) => ("mapet_attention_fwd", grid(shape.q_rows(), CUDA_BLOCK_M, shape)),
    }
}

/// The dQ kernel [`cuda_backward`] launches for `kernels` and `shape` on `gpu`; `None` where the
/// set's backward runs no dQ kernel (`WgmmaFused`, where its kernel fits). For a test to tell
/// which kernel it compared.
pub fn cuda_dq_kernel(gpu: &Gpu, kernels: AttentionKernels, shape: &AttentionShape) -> Option<&'static str> {
    let fused = kernels == AttentionKernels::WgmmaFused
        && wgmma_dkdv(device_limits(gpu), kernels, shape, contiguous_params(shape)).is_ok_and(|k| k.is_some());
    (!fused).then(|| dq_launch(gpu, kernels.split_backward(), shape).0)
}

/// The dQ kernel's launch (`cuda_backward`, for a set whose backward is split): the wgmma one has
/// the forward's (grid, shared memory, two CTAs per SM).
fn dq_launch(gpu: &Gpu, kernels: AttentionKernels, shape: &AttentionShape) -> (&'static str, LaunchConfig) {
    let (cc, sm_count, max_smem) = device_limits(gpu);
    match (kernels.wgmma_launch(shape, cc, sm_count, max_smem), kernels.resident_launch(shape, sm_count, max_smem)) {
        (Some(launch), _) => {
            let kernel = plain_or_l2(gpu, "mapet_attention_bwd_dq_wgmma", "mapet_attention_bwd_dq_wgmma_l2");
            (kernel, resident_grid(launch, CUDA_WG_DQ_THREADS, shape))
        }
        (None, Some(launch)) => ("mapet_attention_bwd_dq_resident", resident_grid(launch, CUDA_RES_THREADS, shape)),
        (None, None) => ("mapet_attention_bwd_dq", grid(shape.q_rows(), CUDA_BLOCK_M, shape)),
    }
}

/// Backward on the GPU: `dq`, `dk`, `dv` (bf16, written, not accumulated) from the forward's
/// inputs, its `o` and `lse`, and `d_o`. Deterministic for every set but `WgmmaFused`: no float
/// atomics (two kernels, dQ then dK/dV, each owning its outputs), with a [B, H, N+2P] f32 scratch
/// for rowsum(dO * O). `WgmmaFused` runs one kernel whose dQ is summed by float reductions in no
/// fixed order ([`AttentionKernels::deterministic`]), with a [B, H, 64, Lq rounded up to 64] f32
/// scratch; where its kernel does not fit (more than 576 query rows), the `Wgmma` set runs.
#[allow(clippy::too_many_arguments)]
pub fn cuda_backward(
    gpu: &Gpu,
    kernels: AttentionKernels,
    shape: &AttentionShape,
    q: &dyn DeviceRead<bf16>,
    k: &dyn DeviceRead<bf16>,
    v: &dyn DeviceRead<bf16>,
    o: &dyn DeviceRead<bf16>,
    lse: &dyn DeviceRead<f32>,
    d_o: &dyn DeviceRead<bf16>,
    dq: &mut dyn DeviceWrite<bf16>,
    dk: &mut dyn DeviceWrite<bf16>,
    dv: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    check_cuda_shape(shape)?;
    shape.check_buffers(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    check_len("d_o", d_o.len(), shape.q_len())?;
    check_len("dq", dq.len(), shape.q_len())?;
    check_len("dk", dk.len(), shape.k_len())?;
    check_len("dv", dv.len(), shape.k_len())?;
    let ptrs = [("q", q.ptr()), ("k", k.ptr()), ("v", v.ptr()), ("o", o.ptr()), ("d_o", d_o.ptr())];
    let outs = [("dq", dq.ptr()), ("dk", dk.ptr()), ("dv", dv.ptr())];
    for (tensor, ptr) in ptrs.into_iter().chain(outs) {
        check_aligned(tensor, ptr, 16)?;
    }
    let mut p = contiguous_params(shape);
    (p.q, p.k, p.v, p.o, p.lse) = (q.ptr(), k.ptr(), v.ptr(), o.ptr() as *mut _, lse.f32_ptr());
    (p.d_o, p.dq, p.dk, p.dv) = (d_o.ptr(), dq.ptr_mut(), dk.ptr_mut(), dv.ptr_mut());
    let (cc, sm_count, max_smem) = device_limits(gpu);
    if kernels == AttentionKernels::WgmmaFused {
        if let Some((_, launch, mut plan, shared)) = wgmma_dkdv((cc, sm_count, max_smem), kernels, shape, p)? {
            plan.a.l2_ahead = next_wave_ahead(gpu, 1);
            return fused_backward(gpu, shape, plan, shared, launch);
        }
    }
    // Where the fused kernel does not fit, the split wgmma kernels may still (their dK/dV kernel
    // holds no P^T and dS^T tiles).
    let kernels = kernels.split_backward();
    // delta (rowsum(dO * O)): written by the dQ kernel, read by the dK/dV kernel after it.
    let delta = gpu.alloc::<f32>(shape.lse_len())?;
    p.delta = delta.f32_ptr();
    p.l2_ahead = next_wave_ahead(gpu, CUDA_RES_CTAS_PER_SM as u32);
    let (kernel, cfg) = dq_launch(gpu, kernels, shape);
    // SAFETY: as in cuda_forward; d_o and dq have the query rows' size (checked above) and delta
    // has [B, H, N+2P] elements, all of which every dQ kernel writes (the same values).
    unsafe { gpu.launch_dependent("attention", kernel, cfg, &p)? };
    if let Some((kernel, launch, mut plan, _)) = wgmma_dkdv((cc, sm_count, max_smem), kernels, shape, p)? {
        plan.a.l2_ahead = next_wave_ahead(gpu, 1);
        let cfg = resident_grid(launch, CUDA_WG_DKDV_THREADS, shape);
        // SAFETY: as below; the plan's chunk masks and deal are those of this shape and grid
        // (dkdv_params): every key is stored by exactly one warpgroup, every chunk of a shared
        // tile computed by exactly one of its two, and the balanced kernel's hand-off slot, which
        // a CTA with a shared tile uses, is in its dynamic shared memory.
        return unsafe { gpu.launch_dependent("attention", kernel, cfg, &plan) };
    }
    let (kernel, cfg) = match kernels.resident_dkdv_launch(shape, sm_count, max_smem) {
        Some(launch) => ("mapet_attention_bwd_dkdv_resident", resident_grid(launch, CUDA_RES_DKDV_THREADS, shape)),
        None => ("mapet_attention_bwd_dkdv", grid(shape.k_rows(), CUDA_BLOCK_N, shape)),
    };
    // SAFETY: as above, with dk and dv of the keys' size; the dQ kernel wrote delta before this
    // reads it, since both run in order on this Gpu's one stream (as a dependent launch, this one
    // waits for dQ to complete before its first access). The resident and wgmma kernels'
    // dynamic shared memory holds all of their pair's Q and dO rows and per-row data
    // (resident_dkdv_launch, wgmma_dkdv_launch).
    unsafe { gpu.launch_dependent("attention", kernel, cfg, &p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, heads: usize, n_tokens: usize, n_context: usize) -> AttentionShape {
        AttentionShape { batch, heads, head_dim: 64, n_tokens, n_context }
    }

    #[test]
    fn persistent_launch_takes_vit_shapes_or_falls_back() {
        let p = AttentionKernels::WgmmaPersistent;
        let (h100, max) = ((9, 0), 227 << 10);
        // ViT-B/S/T at batch 128: one CTA an SM; 2 x 12 K/V tiles and 4 Q tiles of 8 KiB, and
        // 1 KiB of alignment: 230,400 B of the 232,448 an H100/H200 block may take.
        for heads in [12, 6, 3] {
            assert_eq!(p.persistent_launch(&shape(128, heads, 197, 50), h100, 132, max), Some((132, 230_400)));
        }
        // Fewer pairs than SMs: one CTA a pair.
        assert_eq!(p.persistent_launch(&shape(2, 3, 197, 50), h100, 132, max), Some((6, 230_400)));
        // Four row tiles (Lq 200, 256), one per warpgroup.
        assert!(p.persistent_launch(&shape(60, 12, 70, 5), h100, 132, max).is_some());
        assert!(p.persistent_launch(&shape(60, 12, 128, 64), h100, 132, max).is_some());
        // Row tiles not a multiple of 4 (Lq 270: 5 tiles; Lq 131: 3), another set, another
        // device, or too little shared memory: the other forwards run.
        assert_eq!(p.persistent_launch(&shape(60, 12, 130, 60), h100, 132, max), None);
        assert_eq!(p.persistent_launch(&shape(2, 2, 65, 32), h100, 132, max), None);
        assert_eq!(AttentionKernels::Wgmma.persistent_launch(&shape(128, 12, 197, 50), h100, 132, max), None);
        assert_eq!(p.persistent_launch(&shape(128, 12, 197, 50), (8, 0), 108, 163 << 10), None);
        assert_eq!(p.persistent_launch(&shape(128, 12, 197, 50), h100, 132, (225 << 10) - 1), None);
        // Lk = 384 (N = 256, C = 128: Lq = 512, 8 tiles) still fits, with 6 K/V tiles a buffer;
        // Lk = 385 (N = 258, C = 131: Lq = 512 too) does not.
        assert!(p.persistent_launch(&shape(128, 12, 256, 128), h100, 132, max).is_some());
        assert_eq!(p.persistent_launch(&shape(128, 12, 258, 131), h100, 132, max), None);
        // Its backward is the wgmma set's.
        assert!(p.is_wgmma() && p.deterministic() && p.split_backward() == p);
    }

    #[test]
    fn resident_launch_fits_two_ctas_per_sm_or_falls_back() {
        let r = AttentionKernels::Resident;
        let max = 227 << 10; // an H100/H200 block's opt-in limit
                             // ViT-B at batch 128 on 132 SMs: one CTA per pair, 6 K and 6 V tiles of 9216 B.
        assert_eq!(r.resident_launch(&shape(128, 12, 197, 50), 132, max), Some((1, 110_592)));
        // Few pairs: more CTAs per pair, at most one 16-row tile per warp (491 rows: 31 tiles, 4 CTAs).
        assert_eq!(r.resident_launch(&shape(1, 1, 197, 50), 132, max), Some((4, 110_592)));
        assert_eq!(r.resident_launch(&shape(2, 3, 5, 1), 132, max), Some((1, 2 * CUDA_TILE_BYTES as u32)));
        // Lk = 384 is the largest that fits; 385 keys do not.
        assert!(r.resident_launch(&shape(128, 12, 256, 128), 132, max).is_some());
        assert_eq!(r.resident_launch(&shape(128, 12, 257, 129), 132, max), None);
        assert_eq!(r.resident_launch(&shape(128, 12, 300, 50), 132, max), None);
        // A device with less shared memory per block (an sm_86/89 card) runs the tiled kernels.
        assert_eq!(r.resident_launch(&shape(128, 12, 197, 50), 84, 99 << 10), None);
        // dK/dV: ViT's 491 rows take 8 tiles of 19,456 B; one CTA per SM; 12 warps of 16 keys.
        assert_eq!(r.resident_dkdv_launch(&shape(128, 12, 197, 50), 132, max), Some((1, 155_648)));
        assert_eq!(r.resident_dkdv_launch(&shape(1, 1, 197, 50), 132, max), Some((2, 155_648)));
        assert_eq!(r.resident_dkdv_launch(&shape(1, 1, 197, 50), 132, 100 << 10), None);
        assert_eq!(r.resident_dkdv_launch(&shape(8, 12, 577, 100), 132, max), None);
        assert_eq!(AttentionKernels::Tiled.resident_dkdv_launch(&shape(128, 12, 197, 50), 132, max), None);
        // The tiled choice never takes the resident kernels.
        assert_eq!(AttentionKernels::Tiled.resident_launch(&shape(128, 12, 197, 50), 132, max), None);
        for s in [shape(128, 12, 197, 50), shape(1, 1, 197, 50), shape(7, 5, 100, 3)] {
            if let Some((_, smem)) = r.resident_launch(&s, 132, max) {
                assert!(smem as usize <= CUDA_RES_MAX_SMEM && 2 * (smem as usize + 1024) <= 228 << 10, "{s:?}");
            }
        }
    }

    #[test]
    fn wgmma_launches_need_hopper_and_fitting_shared_memory() {
        let w = AttentionKernels::Wgmma;
        let (max, hopper) = (227 << 10, (9, 0));
        // Forward and dQ at ViT-B, batch 128: one CTA per pair, 6 + 6 + 2 swizzled tiles of 8 KiB
        // and the alignment (two CTAs per SM).
        assert_eq!(w.wgmma_launch(&shape(128, 12, 197, 50), hopper, 132, max), Some((1, 115_712)));
        // Few pairs: at most one 64-row tile per warpgroup (491 rows: 8 tiles, 4 CTAs).
        assert_eq!(w.wgmma_launch(&shape(1, 1, 197, 50), hopper, 132, max), Some((4, 115_712)));
        // Another compute capability, another choice, or keys past 384: not these kernels; the
        // resident ones run instead where they fit.
        assert_eq!(w.wgmma_launch(&shape(128, 12, 197, 50), (8, 0), 108, 163 << 10), None);
        assert_eq!(w.wgmma_launch(&shape(128, 12, 197, 50), (10, 0), 148, max), None);
        assert_eq!(AttentionKernels::Resident.wgmma_launch(&shape(128, 12, 197, 50), hopper, 132, max), None);
        assert!(w.wgmma_launch(&shape(128, 12, 256, 128), hopper, 132, max).is_some());
        assert_eq!(w.wgmma_launch(&shape(128, 12, 257, 129), hopper, 132, max), None);
        assert!(w.resident_launch(&shape(128, 12, 197, 50), 132, max).is_some());
        assert!(w.resident_dkdv_launch(&shape(128, 12, 197, 50), 132, max).is_some());
        // dK/dV at ViT-B: 512 positions of Q, dO and 12 bytes of row data, and 6 key tiles (183
        // KiB, one CTA per SM); few pairs: one key tile per warpgroup (6 tiles, 2 CTAs).
        assert_eq!(w.wgmma_dkdv_launch(&shape(128, 12, 197, 50), hopper, 132, max), Some((1, 187_392)));
        assert_eq!(w.wgmma_dkdv_launch(&shape(1, 1, 197, 50), hopper, 132, max), Some((2, 187_392)));
        // The fused kernel: one CTA a pair, whatever the batch, and its P^T and dS^T tiles (4 KiB
        // each a warpgroup) on top; it stops fitting at fewer positions (577 to 640 do not).
        let f = AttentionKernels::WgmmaFused;
        assert_eq!(f.wgmma_dkdv_launch(&shape(128, 12, 197, 50), hopper, 132, max), Some((1, 211_968)));
        assert_eq!(f.wgmma_dkdv_launch(&shape(1, 1, 197, 50), hopper, 132, max), Some((1, 211_968)));
        assert_eq!(f.wgmma_dkdv_launch(&shape(128, 12, 197, 50), (8, 0), 108, 163 << 10), None);
        assert!(f.wgmma_dkdv_launch(&shape(2, 2, 200, 20), hopper, 132, max).is_some());
        assert_eq!(f.wgmma_dkdv_launch(&shape(2, 2, 300, 150), hopper, 132, max), None);
        // There its backward runs the split kernels of `wgmma`, whose dK/dV kernel still fits.
        let split = f.split_backward();
        assert_eq!(split, w);
        assert!(split.wgmma_dkdv_launch(&shape(2, 2, 300, 150), hopper, 132, max).is_some());
        assert_eq!(AttentionKernels::WgmmaPeek.split_backward(), AttentionKernels::WgmmaPeek);
        assert_eq!(w.wgmma_dkdv_launch(&shape(128, 12, 197, 50), (8, 0), 108, 163 << 10), None);
        assert_eq!(AttentionKernels::Resident.wgmma_dkdv_launch(&shape(128, 12, 197, 50), hopper, 132, max), None);
        // More than 640 positions do not fit.
        assert_eq!(w.wgmma_dkdv_launch(&shape(2, 2, 300, 100), hopper, 132, max), None);
        assert!(w.wgmma_dkdv_launch(&shape(2, 2, 300, 150), hopper, 132, max).is_some());
        for s in [shape(128, 12, 197, 50), shape(1, 1, 197, 50), shape(7, 5, 100, 3), shape(2, 2, 256, 128)] {
            if let Some((_, smem)) = w.wgmma_launch(&s, hopper, 132, max) {
                assert!(2 * (smem as usize + 1024) <= 228 << 10, "{s:?}");
            }
        }
    }

    /// The (N, C) the tile-logic tests run through: every N < 48 with 0 < C < N, and larger N with
    /// a few C.
    fn spec_cases() -> Vec<(usize, usize)> {
        let mut cases: Vec<(usize, usize)> = (2..48).flat_map(|n| (1..n).map(move |c| (n, c))).collect();
        cases.extend([65, 100, 130, 197].iter().flat_map(|&n| [1, 2, 50, 64, n - 1].map(|c| (n, c))));
        cases
    }

    /// Whether query row `r` sees key `k` by SPEC.md's table (`perm::visible_bounds`), keys past
    /// Lk = N + P not existing.
    fn spec_visible(n: usize, c: usize, r: usize, k: usize) -> bool {
        let (a, m) = visible_bounds(n, c, r);
        k < n + (n - c) && (k < a || k >= m)
    }

    /// The wgmma kernels hold a tile's 32-row chunks in one 32-bit mask: whatever shared memory a
    /// card offers, no launch they are picked for has more than 32 chunks of keys (forward, dQ:
    /// bounded by the two-CTAs-an-SM cap on shared memory) or of query rows (dK/dV: by
    /// CUDA_WG_MAX_ROWS).
    #[test]
    fn wgmma_launches_fit_the_chunk_masks() {
        let w = AttentionKernels::Wgmma;
        let hopper = (9, 0);
        for n in (2..1200).step_by(7) {
            for c in [1, n / 4, n / 2, n - 1].into_iter().filter(|&c| c >= 1 && c < n) {
                let s = shape(1, 1, n, c);
                for max in [227 << 10, u32::MAX] {
                    if w.wgmma_launch(&s, hopper, 132, max).is_some() {
                        assert!(s.k_rows().div_ceil(32) <= 32, "{s:?}: {} key chunks", s.k_rows().div_ceil(32));
                    }
                    if w.wgmma_dkdv_launch(&s, hopper, 132, max).is_some() {
                        assert!(s.q_rows().div_ceil(32) <= 32, "{s:?}: {} row chunks", s.q_rows().div_ceil(32));
                        let key_tiles = s.k_rows().div_ceil(64);
                        assert!(key_tiles <= CUDA_WG_DKDV_MAX_KEY_TILES, "{s:?}: {key_tiles} key tiles");
                    }
                }
            }
        }
    }

    /// `key_chunks` of cuda/attention.cu, transcribed: the forward's and dQ's 32-key chunks as
    /// live (not EMPTY) and partial masks in closed form, equal to classifying every chunk (the
    /// `classify` below is the CUDA one's transcription too) for every pair of first-hidden
    /// extrema a row tile can have (C <= amin <= amax <= N), every N < 70 and 0 < C < N, and ViT's.
    #[test]
    fn wgmma_key_chunk_masks_equal_classify() {
        let mut cases: Vec<(usize, usize)> = (2..70).flat_map(|n| (1..n).map(move |c| (n, c))).collect();
        cases.extend([(197, 50), (197, 1), (197, 196), (257, 64), (400, 399)]);
        for (n, c) in cases {
            let p = n - c;
            let lk = n + p;
            let nkc = lk.div_ceil(32);
            if nkc > 32 {
                continue;
            }
            let low_bits = |n: i64| if n >= 32 { u32::MAX } else { (1u32 << n.max(0)) - 1 };
            for amin in c..=n {
                for amax in amin..=n {
                    let (amin_i, amax_i, p_i, lk_i) = (amin as i64, amax as i64, p as i64, lk as i64);
                    let empty_end = if lk_i <= amin_i + p_i { nkc as i64 } else { (amin_i + p_i) >> 5 };
                    let empty = low_bits(empty_end) & !low_bits((amax_i + 31) >> 5);
                    let full = (low_bits(amin_i >> 5) | !low_bits((amax_i + p_i + 31) >> 5)) & low_bits(lk_i >> 5);
                    let live = low_bits(nkc as i64) & !empty;
                    let partial = live & !full;
                    for chunk in 0..32 {
                        let want =
                            if chunk < nkc { classify(p, lk, amin, amax, 32 * chunk, 32 * chunk + 32) } else { 0 };
                        let got = if live >> chunk & 1 == 0 {
                            0
                        } else if partial >> chunk & 1 == 1 {
                            2
                        } else {
                            1
                        };
                        assert_eq!(got, want, "N {n} C {c} amin {amin} amax {amax} chunk {chunk}");
                    }
                }
            }
        }
    }

    /// `one_edge` and `mask_half_one_edge` of cuda/attention.cu, transcribed: for a hidden window
    /// of at least `kOneEdgeMinWindow` (25) keys, `(x >= thr) != below` hides exactly the keys
    /// `in_window` (`(x - rel) as unsigned < p`) hides, at every offset x of a half (x0 + 8j +
    /// (e & 1), j < 4; x0 = 0 in the wgmma kernels, 32 for the mma.sync kernels' second half), for
    /// every window start around the half and every width up to past ViT's 147; and 24 keys is
    /// too narrow (a window inside the half has both edges there), which is why the kernels take
    /// mask_half below 25.
    #[test]
    fn one_edge_masks_equal_the_window_test() {
        const MIN_WINDOW: i64 = 8 * (4 - 1) + 1;
        let in_window = |x: i64, rel: i64, p: i64| ((x - rel) as i32 as u32) < (p as u32);
        let one_edge = |rel: i64, x0: i64, p: i64| {
            let below = rel <= x0;
            (if below { rel + p } else { rel }, below)
        };
        for x0 in [0i64, 32] {
            let xs: Vec<i64> = (0..4).flat_map(|j| [x0 + 8 * j, x0 + 8 * j + 1]).collect();
            assert_eq!(xs.iter().max().unwrap() - xs.iter().min().unwrap(), MIN_WINDOW, "a half's span, less one");
            for p in MIN_WINDOW..=200 {
                for rel in (x0 - 260)..=(x0 + 60) {
                    let (thr, below) = one_edge(rel, x0, p);
                    for &x in &xs {
                        assert_eq!((x >= thr) != below, in_window(x, rel, p), "x0 {x0} p {p} rel {rel} x {x}");
                    }
                }
            }
            // One key narrower, a window from the half's second offset to before its last hides
            // keys between two that it shows: one compare cannot say it.
            let (rel, p) = (x0 + 1, MIN_WINDOW - 1);
            let (thr, below) = one_edge(rel, x0, p);
            assert!(xs.iter().any(|&x| ((x >= thr) != below) != in_window(x, rel, p)), "x0 {x0}: p {p} must fail");
        }
    }

    /// The wgmma kernels' tile logic, transcribed from cuda/attention.cu (`row_at`,
    /// `first_hidden`, `classify`, `position_extrema`) and checked exhaustively against the
    /// visibility of SPEC.md (`perm::visible_bounds`): the position order is a permutation of the
    /// query rows along which the first hidden key never decreases, no block the kernels skip
    /// holds a visible pair, and no block they leave unmasked holds a hidden one, for the
    /// forward's 64 x 64 tiles, dQ's 64 x 32 and dK/dV's 32 positions x 64 keys.
    #[test]
    fn wgmma_position_order_and_tile_classes_agree_with_the_spec() {
        for (n, c) in spec_cases() {
            let p = n - c;
            let (lq, lk) = (n + 2 * p, n + p);
            let first_hidden = |r: usize| crate::perm::visible_bounds(n, c, r).0;
            let visible = |r: usize, k: usize| spec_visible(n, c, r, k);
            let row_at = |pos: usize| row_at(n, c, pos);
            let rows: Vec<usize> = (0..lq).map(row_at).collect();
            let mut sorted = rows.clone();
            sorted.sort();
            assert_eq!(sorted, (0..lq).collect::<Vec<_>>(), "N {n} C {c}: not a permutation");
            assert!(rows.windows(2).all(|w| first_hidden(w[0]) <= first_hidden(w[1])), "N {n} C {c}: not monotone");
            let extrema =
                |p0: usize, len: usize| (first_hidden(row_at(p0)), first_hidden(row_at((p0 + len).min(lq) - 1)));
            let check = |p0: usize, plen: usize, k0: usize, klen: usize| {
                let (amin, amax) = extrema(p0, plen);
                let kind = classify(p, lk, amin, amax, k0, k0 + klen);
                let pairs = (p0..(p0 + plen).min(lq)).flat_map(|pos| (k0..k0 + klen).map(move |k| (pos, k)));
                let vis: Vec<bool> = pairs.map(|(pos, k)| visible(row_at(pos), k)).collect();
                let at = format!("N {n} C {c}: positions {p0}+{plen}, keys {k0}+{klen}");
                match kind {
                    0 => assert!(!vis.iter().any(|&v| v), "{at}: EMPTY holds a visible pair"),
                    1 => assert!(vis.iter().all(|&v| v), "{at}: FULL holds a hidden pair"),
                    _ => {}
                }
            };
            for p0 in (0..lq).step_by(64) {
                for k0 in (0..lk).step_by(64) {
                    check(p0, 64, k0, 64);
                }
                for k0 in (0..lk).step_by(32) {
                    check(p0, 64, k0, 32);
                }
            }
            for p0 in (0..lq).step_by(32) {
                for k0 in (0..lk).step_by(64) {
                    check(p0, 32, k0, 64);
                }
            }
        }
    }

    /// The wgmma dK/dV kernel's chunk masks (`dkdv_chunk_masks`, which the launcher passes it)
    /// against SPEC.md's visibility (`perm::visible_bounds`), pair by pair: a chunk left out of
    /// `live` holds no visible pair, and one in `live` but not `partial` (computed with no mask)
    /// holds no hidden pair of a real position and key, for every N < 48 and 0 < C < N, and
    /// larger N with a few C.
    #[test]
    fn wgmma_dkdv_chunk_masks_agree_with_the_spec() {
        for (n, c) in spec_cases() {
            let p = n - c;
            let (lq, lk) = (n + 2 * p, n + p);
            let (masks, chunks) = (dkdv_chunk_masks(n, c), lq.div_ceil(32));
            assert_eq!(masks.len(), lk.div_ceil(64), "N {n} C {c}: one mask pair a key tile");
            for (kt, &(live, partial)) in masks.iter().enumerate() {
                assert_eq!(partial & !live, 0, "N {n} C {c} tile {kt}: partial chunks must be live");
                assert!(chunks >= 32 || live >> chunks == 0, "N {n} C {c} tile {kt}: chunks past Lq");
                for pc in 0..chunks {
                    let vis: Vec<bool> = (32 * pc..(32 * pc + 32).min(lq))
                        .flat_map(|pos| (64 * kt..64 * kt + 64).map(move |k| spec_visible(n, c, row_at(n, c, pos), k)))
                        .collect();
                    let at = format!("N {n} C {c}: key tile {kt}, position chunk {pc}");
                    if live >> pc & 1 == 0 {
                        assert!(!vis.iter().any(|&v| v), "{at}: left out, yet holds a visible pair");
                    } else if partial >> pc & 1 == 0 {
                        assert!(vis.iter().all(|&v| v), "{at}: computed unmasked, yet holds a hidden pair");
                    }
                }
            }
        }
    }

    /// The plan the launcher passes the wgmma dK/dV kernel (`dkdv_params`): the chunk masks of
    /// every key tile and each warpgroup's key tiles, 4 bits a tile in order, as the kernel's
    /// `TileList` reads them; every launch the launcher makes fits it (CTAs a pair at most
    /// `deal.len() / 3`), and a grid it cannot hold is refused with the reason.
    #[test]
    fn wgmma_dkdv_plan_holds_the_masks_and_the_deal() {
        let s = shape(128, 12, 197, 50);
        let (plan, shared) = dkdv_params(contiguous_params(&s), &s, 2, DkdvPlan::Aligned).unwrap();
        assert!(!shared);
        let masks = dkdv_chunk_masks(197, 50);
        assert_eq!(&plan.live[..6], &masks.iter().map(|m| m.0).collect::<Vec<_>>()[..]);
        assert_eq!(&plan.partial[..6], &masks.iter().map(|m| m.1).collect::<Vec<_>>()[..]);
        assert!(plan.live[6..].iter().chain(&plan.partial[6..]).all(|&m| m == 0));
        let counts: Vec<u32> = masks.iter().map(|m| m.0.count_ones()).collect();
        for x in 0..2 {
            for (w, tiles) in dkdv_deal(&counts, 2, x).iter().enumerate() {
                let (packed, n) = (plan.deal[3 * x + w], plan.deal_count[3 * x + w] as usize);
                let decoded: Vec<usize> = (0..n).map(|i| (packed >> (4 * i) & 15) as usize).collect();
                assert_eq!(&decoded, tiles, "CTA {x} warpgroup {w}");
            }
        }
        assert!(plan.deal[6..].iter().all(|&d| d == 0) && plan.deal_count[6..].iter().all(|&n| n == 0));
        let refused = dkdv_params(contiguous_params(&s), &s, 7, DkdvPlan::Aligned).unwrap_err().to_string();
        assert!(refused.contains("6 CTAs a pair"), "{refused}");
        for n in (2..1100).step_by(9) {
            for c in [1, n / 3, n - 1].into_iter().filter(|&c| c >= 1 && c < n) {
                for batch in [1, 4, 128] {
                    let s = shape(batch, 1, n, c);
                    if let Some((grid, _)) = AttentionKernels::Wgmma.wgmma_dkdv_launch(&s, (9, 0), 132, 227 << 10) {
                        for kind in [DkdvPlan::Aligned, DkdvPlan::Balanced, DkdvPlan::AlignedShared] {
                            dkdv_params(contiguous_params(&s), &s, grid as usize, kind).unwrap();
                        }
                    }
                }
            }
        }
    }

    /// The wgmma dK/dV kernel's deal of key tiles to warpgroups (`dkdv_deal`, which the launcher
    /// passes it): every key tile goes to exactly one warpgroup of one CTA, for any number of CTAs
    /// a pair; the deal is never worse than the fixed one it replaced (tile w + 3 j to warpgroup
    /// w) for the slowest warpgroup of a CTA; and at ViT's N = 197, C = 50 it gives the loads the
    /// kernel's comment states. The kernel's bound on key tiles is the launcher's.
    #[test]
    fn wgmma_dkdv_deal_covers_every_key_tile_once() {
        let source = std::fs::read_to_string(crate::testing::project_root().join("cuda/attention.cu")).unwrap();
        let max_tiles = crate::testing::cuda_constant(&source, "attention.cu", "kDkdvMaxKeyTiles");
        assert_eq!(max_tiles, CUDA_WG_DKDV_MAX_KEY_TILES);
        let live_counts =
            |n: usize, c: usize| -> Vec<u32> { dkdv_chunk_masks(n, c).iter().map(|m| m.0.count_ones()).collect() };
        let deal = dkdv_deal;
        let vit = live_counts(197, 50);
        assert_eq!(vit, [16, 9, 5, 11, 14, 16]);
        let loads = |d: &[Vec<usize>; 3], live: &[u32]| d.clone().map(|t| t.iter().map(|&kt| live[kt]).sum::<u32>());
        assert_eq!(loads(&deal(&vit, 1, 0), &vit), [25, 21, 25]);
        let mut cases: Vec<(usize, usize)> = (2..90).flat_map(|n| (1..n).step_by(3).map(move |c| (n, c))).collect();
        cases.extend([(197, 1), (197, 196), (300, 150), (257, 64)]);
        for (n, c) in cases {
            let live = live_counts(n, c);
            for grid in 1..=4 {
                let mut seen = vec![0; live.len()];
                for x in 0..grid {
                    let d = deal(&live, grid, x);
                    d.iter().flatten().for_each(|&kt| seen[kt] += 1);
                    let fixed: [u32; 3] = std::array::from_fn(|w| {
                        (0..live.len()).filter(|kt| (kt / 3) % grid == x && kt % 3 == w).map(|kt| live[kt]).sum()
                    });
                    let worst = |l: [u32; 3]| l.into_iter().max().unwrap();
                    assert!(
                        worst(loads(&d, &live)) <= worst(fixed),
                        "N {n} C {c} grid {grid} CTA {x}: {d:?} over {live:?} against the fixed deal's {fixed:?}"
                    );
                }
                assert!(seen.iter().all(|&s| s == 1), "N {n} C {c} grid {grid}: tiles dealt {seen:?} times");
            }
        }
    }

    /// The balanced dK/dV kernel's plan (`dkdv_params` with `balanced`; cuda/attention.cu,
    /// balanced_notes), as the kernel reads it, against SPEC.md's visibility: the runs cover the
    /// keys in order, 1 to 64 each; a position chunk left out of a run's live chunks holds no
    /// visible pair of its keys, one computed unmasked no hidden one; every live chunk of a run is
    /// computed by exactly one warpgroup and the run stored by exactly one; at most one run a CTA
    /// is shared, handed out as one warpgroup's first tile and taken in as another's last; the
    /// busiest warpgroup never computes more chunks than `dkdv_deal`'s. At ViT's N = 197, C = 50
    /// the runs, chunks and loads are those balanced_notes states.
    #[test]
    fn balanced_dkdv_plan_computes_every_chunk_once() {
        let mut cases = spec_cases();
        cases.extend([(257, 64), (300, 150), (145, 36), (200, 100), (170, 1)]);
        for ((n, c), kind) in cases.into_iter().flat_map(|nc| [(nc, DkdvPlan::Balanced), (nc, DkdvPlan::AlignedShared)])
        {
            let (lk, lq) = (2 * n - c, 3 * n - 2 * c);
            let s = shape(1, 1, n, c);
            let max_grid = lk.div_ceil(64).div_ceil(3).min(CUDA_WG_DKDV_MAX_CTAS);
            let counts: Vec<u32> = dkdv_chunk_masks(n, c).iter().map(|m| m.0.count_ones()).collect();
            for grid in 1..=max_grid {
                let at = format!("N {n} C {c} grid {grid} {kind:?}");
                let (plan, shared) = dkdv_params(contiguous_params(&s), &s, grid, kind).unwrap();
                let tiles = lk.div_ceil(64);
                if kind == DkdvPlan::AlignedShared {
                    // The fused kernel's: the aligned tiles and their masks (a tile reaching past
                    // Lk PARTIAL in every chunk), only the deal differs.
                    let aligned = dkdv_chunk_masks(n, c);
                    assert_eq!(&plan.live[..tiles], &aligned.iter().map(|m| m.0).collect::<Vec<_>>()[..], "{at}");
                    assert_eq!(&plan.partial[..tiles], &aligned.iter().map(|m| m.1).collect::<Vec<_>>()[..], "{at}");
                    assert!((0..tiles).all(|kt| plan.tile_start[kt] as usize == 64 * kt), "{at}");
                }
                let runs: Vec<(usize, usize)> =
                    (0..tiles).map(|kt| (plan.tile_start[kt] as usize, plan.tile_end[kt] as usize)).collect();
                assert_eq!(runs.first().map(|r| r.0), Some(0), "{at}");
                assert_eq!(runs.last().map(|r| r.1), Some(lk), "{at}");
                assert!(runs.windows(2).all(|w| w[0].1 == w[1].0), "{at}: runs {runs:?}");
                assert!(runs.iter().all(|&(k0, k1)| k0 < k1 && k1 - k0 <= 64), "{at}: runs {runs:?}");
                for (kt, &(k0, k1)) in runs.iter().enumerate() {
                    let (live, partial) = (plan.live[kt], plan.partial[kt]);
                    assert_eq!(partial & !live, 0, "{at} run {kt}");
                    for pc in 0..lq.div_ceil(32) {
                        let vis: Vec<bool> = (32 * pc..(32 * pc + 32).min(lq))
                            .flat_map(|pos| (k0..k1).map(move |k| spec_visible(n, c, row_at(n, c, pos), k)))
                            .collect();
                        if live >> pc & 1 == 0 {
                            assert!(!vis.iter().any(|&v| v), "{at} run {kt} chunk {pc}: left out, yet seen");
                        } else if partial >> pc & 1 == 0 {
                            assert!(vis.iter().all(|&v| v), "{at} run {kt} chunk {pc}: unmasked, yet hidden");
                        }
                    }
                }
                let mut any_shared = false;
                for x in 0..grid {
                    let mut computed = vec![0u32; tiles]; // chunks computed of each run, as a mask
                    let (mut stored, mut outs, mut ins) = (vec![0; tiles], vec![], vec![]);
                    let mut loads = [0u32; 3];
                    for (w, load) in loads.iter_mut().enumerate() {
                        let at = format!("{at} CTA {x} warpgroup {w}");
                        let e = 3 * x + w;
                        let n_tiles = plan.deal_count[e] as usize;
                        for i in 0..n_tiles {
                            let kt = (plan.deal[e] >> (4 * i) & 15) as usize;
                            assert_eq!((kt / 3) % grid, x, "{at}: run {kt} of another CTA");
                            let mut keep = !0u32;
                            if i == 0 {
                                keep &= plan.keep_first[e];
                            }
                            if i + 1 == n_tiles {
                                keep &= plan.keep_last[e];
                            }
                            let mine = plan.live[kt] & keep;
                            assert_eq!(computed[kt] & mine, 0, "{at}: run {kt} has chunks computed twice");
                            computed[kt] |= mine;
                            *load += mine.count_ones();
                            if i == 0 && plan.hand_out[e] != 0 {
                                outs.push((kt, w, mine));
                            } else {
                                stored[kt] += 1;
                            }
                            if i + 1 == n_tiles && plan.hand_in[e] != 0 {
                                ins.push((kt, w, mine));
                            }
                        }
                        if plan.hand_out[e] != 0 && plan.hand_in[e] != 0 {
                            assert!(n_tiles >= 2, "{at}: hands out and takes in the same tile");
                        }
                    }
                    for kt in (0..tiles).filter(|kt| (kt / 3) % grid == x) {
                        assert_eq!(computed[kt], plan.live[kt], "{at} CTA {x}: run {kt}'s chunks");
                        assert_eq!(stored[kt], 1, "{at} CTA {x}: run {kt} stored {} times", stored[kt]);
                    }
                    assert!(outs.len() <= 1 && outs.len() == ins.len(), "{at} CTA {x}: out {outs:?}, in {ins:?}");
                    if let (Some(&(ko, wo, mo)), Some(&(ki, wi, mi))) = (outs.first(), ins.first()) {
                        assert!(ko == ki && wo != wi, "{at} CTA {x}: out {outs:?}, in {ins:?}");
                        // The handing warpgroup's chunks all come before the taking one's: it
                        // meets barrier 4 (the second copy group) ahead of its hand-off only
                        // if the taker meets it ahead of its wait (balanced_notes).
                        assert!(mo != 0 && mi != 0, "{at} CTA {x}: an empty share of run {ko}");
                        assert!(31 - mo.leading_zeros() < mi.trailing_zeros(), "{at} CTA {x}: {mo:b} vs {mi:b}");
                        any_shared = true;
                    }
                    let whole = dkdv_deal(&counts, grid, x).map(|t| t.iter().map(|&kt| counts[kt]).sum::<u32>());
                    assert!(loads.iter().max() <= whole.iter().max(), "{at} CTA {x}: {loads:?} against {whole:?}");
                }
                assert_eq!(shared, any_shared, "{at}");
            }
        }
        // ViT: the runs and loads of balanced_notes.
        let s = shape(128, 12, 197, 50);
        assert_eq!(balanced_runs(197, 50), [(0, 63), (63, 127), (127, 191), (191, 216), (216, 280), (280, 344)]);
        let (plan, shared) = dkdv_params(contiguous_params(&s), &s, 1, DkdvPlan::Balanced).unwrap();
        assert_eq!(plan.live[..6].iter().map(|m| m.count_ones()).collect::<Vec<_>>(), [16, 9, 5, 9, 12, 16]);
        // The busiest warpgroup's chunks under a deal.
        let busiest = |live: &[u32], share: &[WarpgroupShare; 3]| -> u32 {
            let load = |w: &WarpgroupShare| -> u32 {
                (w.tiles.iter().enumerate())
                    .map(|(i, &kt)| {
                        let first = if i == 0 { w.keep_first } else { !0 };
                        let last = if i + 1 == w.tiles.len() { w.keep_last } else { !0 };
                        (live[kt] & first & last).count_ones()
                    })
                    .sum()
            };
            share.iter().map(load).max().unwrap_or(0)
        };
        assert!(shared);
        let share = balanced_deal(&plan.live[..6], 1, 0);
        assert_eq!(busiest(&plan.live, &share), 23, "{share:?}");
        // The fused kernel's: ViT's aligned tiles (16, 9, 5, 11, 14, 16), 24 with a shared tile
        // where whole tiles give 25.
        let (fused, shared) = dkdv_params(contiguous_params(&s), &s, 1, DkdvPlan::AlignedShared).unwrap();
        let share = balanced_deal(&fused.live[..6], 1, 0);
        assert!(shared);
        assert_eq!(busiest(&fused.live, &share), 24, "{share:?}");
    }

    /// The balanced kernel's hand-off slot: the header's size, and the launch adds it to the wgmma
    /// dK/dV kernel's shared memory only where a CTA shares a run; at ViT-B it fits an H100/H200.
    #[test]
    fn balanced_dkdv_hand_off_slot_is_the_headers() {
        let header = std::fs::read_to_string(crate::testing::project_root().join("cuda/params.h")).unwrap();
        let define = format!("#define MAPET_DKDV_HAND_SLOT_BYTES {CUDA_DKDV_HAND_SLOT_BYTES}");
        assert!(header.lines().any(|l| l.trim() == define), "no `{define}` in cuda/params.h");
        let b = AttentionKernels::WgmmaBalanced;
        let s = shape(128, 12, 197, 50);
        let (grid, smem) = b.wgmma_dkdv_launch(&s, (9, 0), 132, 227 << 10).unwrap();
        assert_eq!((grid, smem), (1, 187_392));
        assert!(smem as usize + CUDA_DKDV_HAND_SLOT_BYTES <= 227 << 10);
        // The kernels and launches cuda_backward picks: ViT-B with a shared run and the slot;
        // 8 runs (N = 400, C = 345: Lk 455, Lq 510) likewise; Lq 598 (N = 200, C = 1: 640
        // positions) shares a run but leaves no room for the slot: the wgmma kernel on its own
        // plan; Lq 600 (N = 300, C = 150) shares none: the balanced kernel with no slot; off
        // Hopper, none.
        let h200 = ((9, 0), 132, 227 << 10);
        let pick = |s: &AttentionShape, device| {
            let got = wgmma_dkdv(device, b, s, contiguous_params(s)).unwrap();
            got.map(|(name, launch, plan, shared)| (name, launch, shared, plan.deal_count[..3].to_vec()))
        };
        let bal = "mapet_attention_bwd_dkdv_wgmma_balanced";
        assert_eq!(pick(&s, h200), Some((bal, (1, 187_392 + 32_768), true, vec![3, 2, 2])));
        let eight = shape(128, 4, 400, 345);
        let got = pick(&eight, h200).unwrap();
        assert_eq!((got.0, got.1, got.2), (bal, (1, 187_392 + 32_768), true), "{got:?}");
        let wide = shape(128, 12, 200, 1);
        assert!(dkdv_params(contiguous_params(&wide), &wide, 1, DkdvPlan::Balanced).unwrap().1);
        let plain = "mapet_attention_bwd_dkdv_wgmma";
        assert_eq!(pick(&wide, h200).map(|g| (g.0, g.1, g.2)), Some((plain, (1, 221_696), false)));
        let unshared = shape(128, 12, 300, 150);
        assert_eq!(pick(&unshared, h200).map(|g| (g.0, g.1, g.2)), Some((bal, (1, 221_696), false)));
        assert_eq!(pick(&s, ((8, 0), 108, 163 << 10)), None);
        // The fused set: its own kernel and launch, the aligned tiles with one shared (its slot in
        // global memory, so no more shared memory); where its kernel does not fit, none (the
        // caller takes `split_backward`'s).
        let fused = |s: &AttentionShape| {
            let got = wgmma_dkdv(h200, AttentionKernels::WgmmaFused, s, contiguous_params(s)).unwrap();
            got.map(|(name, launch, _, shared)| (name, launch, shared))
        };
        assert_eq!(fused(&s), Some(("mapet_attention_bwd_dkdv_wgmma_fused", (1, 211_968), true)));
        assert_eq!(fused(&shape(2, 2, 300, 150)), None);
        // Two runs of 6 live chunks (N = 65, C = 16): nothing to share, and no slot.
        let s = shape(128, 12, 65, 16);
        let (plan, shared) = dkdv_params(contiguous_params(&s), &s, 1, DkdvPlan::Balanced).unwrap();
        assert_eq!(plan.live[..2].iter().map(|m| m.count_ones()).collect::<Vec<_>>(), [6, 6]);
        assert!(!shared);
    }

    #[test]
    fn kernel_choice_names_parse() {
        for k in AttentionKernels::ALL {
            assert_eq!(AttentionKernels::parse_name(k.name()), Ok(k));
        }
        // The backward's own variable: the forward's set when unset, any set by name, and an
        // unknown name refused naming that variable.
        let w = AttentionKernels::Wgmma;
        let var = AttentionKernels::BACKWARD_VAR;
        assert_eq!(AttentionKernels::named_or(var, None, w).unwrap(), w);
        assert_eq!(AttentionKernels::named_or(var, Some("resident"), w).unwrap(), AttentionKernels::Resident);
        let bad = AttentionKernels::named_or(var, Some("wgmma2"), w).unwrap_err().to_string();
        assert!(bad.contains(AttentionKernels::BACKWARD_VAR) && bad.contains("wgmma2"), "{bad}");
        let err = AttentionKernels::parse_name("fast").unwrap_err();
        assert!(err.contains("MAPET_ATTENTION_KERNELS") && err.contains("tiled") && err.contains("resident"), "{err}");
    }

    #[test]
    fn kernel_lists_parse_or_name_the_variable() {
        let var = "MAPET_BENCH_ATTENTION_SETS";
        assert_eq!(AttentionKernels::listed(var, None).unwrap(), AttentionKernels::ALL.to_vec());
        let two = AttentionKernels::listed(var, Some("tiled, resident")).unwrap();
        assert_eq!(two, vec![AttentionKernels::Tiled, AttentionKernels::Resident]);
        let bad = AttentionKernels::listed(var, Some("resident,wgmma3")).unwrap_err().to_string();
        assert!(bad.contains(var) && bad.contains("wgmma3"), "{bad}");
    }
}
