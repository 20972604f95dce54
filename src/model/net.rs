//! The whole two-stream MaPeT forward and backward, written once over [`Backend`]: the CPU model
//! ([`crate::model::cpu::CpuModel`], f32, the reference checked against the authors' model on the
//! golden cases) and the GPU model ([`crate::model::cuda::CudaModel`], bf16 activations, f32
//! master weights) both run [`step`]. What differs between them is only what the backend's ops do
//! (precision, kernels) and who owns the buffers.
//!
//! # Layout
//!
//! Rank order (see [`crate::ops::attention`]): each sample has R = N + 2P rows of width D, the N
//! content tokens by rank, the P mask tokens of the content stream h by rank, then the P
//! query-stream rows g. Row-wise work (LayerNorm, the q projection, proj, the MLP, the residuals)
//! runs over all B·R rows at once, since both streams share the weights; keys and values come
//! from the first N + P rows of each sample, which are gathered into a packed `[B, N + P, D]`
//! buffer first (and their gradients scattered back); the head gathers the last P rows of each
//! sample.
//!
//! ```text
//! x0  = patch_embed(images, ranks)                                  [B, R, D]
//! per block:  a = LN1(x);  q = a Wq^T + bq;  a_h = gather(a);  k = a_h Wk^T + bk;  v = a_h Wv^T + bv
//!             o = attention(q, k, v);  y1 = o Wproj^T + bproj;  x_mid = x + (dp1 * ls1) * y1
//!             c = LN2(x_mid);  u = c W1^T + b1;  f = GELU(u);  y2 = f W2^T + b2;  x' = x_mid + (dp2 * ls2) * y2
//! z = LN(gather_g(x));  loss = mean CE(z Wdec^T + bdec) over the B·P predicted tokens
//! ```
//! `dp` is drop path: one scale per sample and residual branch (0, or 1/keep), shared by both
//! streams of the sample; all ones in eval mode.
//!
//! # Precision
//!
//! Parameters come in two copies ([`Weights`]): the f32 master, read by LayerNorm, layer scale,
//! the patch embedding's bias and tokens and the decoder bias; and the activation-precision copy
//! the GEMMs read (the Linear weights and biases, the patch and decoder weights). On the CPU both
//! are the same f32 buffer; on the GPU the second is the bf16 copy. Gradients are f32 and
//! accumulated (+=). GELU's output is not saved: the backward recomputes it from its input u
//! (bit-identical, and 4·D fewer saved values per row), in the same pass over u that forms
//! GELU's input gradient.
//!
//! # Memory
//!
//! [`Activations`] holds every buffer a step touches, allocated once for a maximum batch: the
//! residual stream at each block boundary, what each block saves for its backward, the scratch
//! the backward reuses from block to block, and the inputs. A step with a smaller batch uses the
//! leading part of each buffer.

use std::ops::Range;

use rand::Rng;

use crate::backend::{Backend, CeGrads, CeRows, PixelView, Scalar};
use crate::cuda::pinned::HostBytes;
use crate::error::{check_len, Error, Result};
use crate::model::params::{ModelConfig, ParamLayout};
use crate::ops::attention::AttentionShape;
use crate::ops::cross_entropy::{CrossEntropyShape, CrossEntropyStats};
use crate::ops::patch_embed::{Normalize, PatchEmbedShape};
use crate::ops::residual::{LayerScaleShape, RowCopy};
use crate::perm;

/// LayerNorm epsilon of every norm in the model.
pub const LN_EPS: f32 = 1e-6;

/// The pixels of a batch, in one of the two forms the patch embedding reads.
#[derive(Clone, Debug)]
pub enum Images {
    /// Normalized f32 `[B, 3, S, S]` (the golden cases and `check-step` use this form).
    F32(Vec<f32>),
    /// Decoded uint8 `[B, S, S, 3]` (HWC, as the data loader produces them), normalized with
    /// `norm` inside the patch embedding: on the GPU in the kernel's registers, so that a step
    /// moves a quarter of the f32 bytes and no float copy of the images exists.
    U8 {
        /// The pixels: a vector, or page-locked memory the GPU backend uploads by DMA.
        hwc: HostBytes,
        /// Per-channel mean and standard deviation.
        norm: Normalize,
    },
}

impl Images {
    /// Number of pixel values (B·3·S·S in both forms).
    pub fn len(&self) -> usize {
        match self {
            Images::F32(v) => v.len(),
            Images::U8 { hwc, .. } => hwc.len(),
        }
    }

    /// True when there are no pixels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The normalized f32 images, when that is the form.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Images::F32(v) => Some(v),
            Images::U8 { .. } => None,
        }
    }

    /// The normalized f32 images, mutable, when that is the form.
    pub fn as_f32_mut(&mut self) -> Option<&mut Vec<f32>> {
        match self {
            Images::F32(v) => Some(v),
            Images::U8 { .. } => None,
        }
    }
}

/// One batch in the form the model consumes (host memory).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Images in the batch.
    pub batch: usize,
    /// The pixels, f32 `[B, 3, S, S]` or uint8 `[B, S, S, 3]`.
    pub images: Images,
    /// Codebook id of each patch [B, N-1], raster order.
    pub tokens: Vec<i32>,
    /// Rank of each token in its sample's permutation [B, N] (rank[.., 0] = 0).
    pub ranks: Vec<i32>,
}

impl Batch {
    /// Checks sizes, ranks and token ids against `config`; the error names the tensor.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        let (n, s) = (config.n_tokens(), config.image);
        check_len("batch.images", self.images.len(), self.batch * 3 * s * s)?;
        if let Images::U8 { norm, .. } = &self.images {
            norm.validate()?;
        }
        check_len("batch.tokens", self.tokens.len(), self.batch * (n - 1))?;
        check_len("batch.ranks", self.ranks.len(), self.batch * n)?;
        for (b, r) in self.ranks.chunks_exact(n).enumerate() {
            let r: Vec<u32> = r.iter().map(|&x| x.max(0) as u32).collect();
            perm::validate_ranks(&r).map_err(|e| Error::Value {
                tensor: "batch.ranks",
                expected: format!("a permutation of 0..{n} with rank 0 for CLS"),
                got: match e {
                    Error::Shape { got, .. } => format!("{got} in sample {b}"),
                    Error::Unsupported { detail, .. } => format!("{detail} in sample {b}"),
                    other => format!("{other} in sample {b}"),
                },
            })?;
        }
        if let Some((i, &t)) = self.tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= config.vocab) {
            return Err(Error::Value {
                tensor: "batch.tokens",
                expected: format!("ids in 0..{}", config.vocab),
                got: format!("{t} at sample {}, patch {}", i / (n - 1), i % (n - 1)),
            });
        }
        Ok(())
    }

    /// Draws fresh permutations for every sample.
    pub fn resample_ranks(&mut self, config: &ModelConfig, rng: &mut impl Rng) {
        let n = config.n_tokens();
        self.ranks = (0..self.batch).flat_map(|_| perm::sample_ranks(rng, n)).map(|r| r as i32).collect();
    }

    /// Targets of the query rows in rank order: row j of sample b predicts the token of rank
    /// C + j, whose target is `tokens[b][token - 1]`.
    pub fn targets(&self, config: &ModelConfig) -> Vec<i32> {
        let (n, c) = (config.n_tokens(), config.context);
        let mut t = Vec::with_capacity(self.batch * config.n_pred());
        for (ranks, tokens) in self.ranks.chunks_exact(n).zip(self.tokens.chunks_exact(n - 1)) {
            let r: Vec<u32> = ranks.iter().map(|&x| x as u32).collect();
            let order = perm::order_from_ranks(&r);
            t.extend(order[c..].iter().map(|&tok| tokens[tok as usize - 1]));
        }
        t
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Mean cross-entropy over the predicted tokens.
    pub loss: f32,
    /// Loss, accuracy and counts.
    pub stats: CrossEntropyStats,
    /// Decoder logits [B, P, V], rows in rank order (rank C + j for row j) when requested.
    pub logits: Option<Vec<f32>>,
}

/// Drop-path rate of block `i` of `depth`: linear from 0 at the first block to `max_rate` at the
/// last.
pub fn drop_path_rate(depth: usize, i: usize, max_rate: f32) -> f32 {
    if depth <= 1 {
        0.0
    } else {
        max_rate * i as f32 / (depth - 1) as f32
    }
}

/// Per-sample drop-path scales for every block and both branches: `[depth][2][B]`, 1/keep or 0,
/// drawn from `rng` in that order; all ones (and nothing drawn) where the rate is 0.
pub fn draw_drop_path(depth: usize, batch: usize, max_rate: f32, rng: &mut impl Rng) -> Vec<[Vec<f32>; 2]> {
    (0..depth)
        .map(|i| {
            let rate = drop_path_rate(depth, i, max_rate);
            let mut draw = || -> Vec<f32> {
                (0..batch)
                    .map(|_| {
                        if rate == 0.0 {
                            1.0
                        } else if rng.random::<f32>() < 1.0 - rate {
                            1.0 / (1.0 - rate)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            };
            [draw(), draw()]
        })
        .collect()
}

/// The two copies of the parameters a step reads (see the module docs, "Precision"), each the
/// whole flat buffer in [`ParamLayout`] order.
pub struct Weights<'a, B: Backend> {
    /// f32 master parameters.
    pub master: B::Ref<'a, f32>,
    /// The GEMMs' copy (the master itself on the CPU).
    pub act: B::Ref<'a, B::Act>,
}

impl<B: Backend> Clone for Weights<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Weights<'_, B> {}

/// Activations one block saves for its backward.
struct BlockActs<B: Backend> {
    /// LN1(x_in) [rows, D] and its statistics [rows].
    a: B::Buf<B::Act>,
    mean1: B::Buf<f32>,
    rstd1: B::Buf<f32>,
    /// [rows, D].
    q: B::Buf<B::Act>,
    /// [kv, D].
    k: B::Buf<B::Act>,
    v: B::Buf<B::Act>,
    /// Attention output [rows, D] and its logsumexp [B, heads, R].
    o: B::Buf<B::Act>,
    lse: B::Buf<f32>,
    /// proj output [rows, D].
    y1: B::Buf<B::Act>,
    /// The residual stream after the attention branch [rows, D].
    x_mid: B::Buf<B::Act>,
    /// LN2(x_mid) [rows, D] and its statistics [rows].
    c: B::Buf<B::Act>,
    mean2: B::Buf<f32>,
    rstd2: B::Buf<f32>,
    /// fc1 output (GELU input) [rows, 4D].
    u: B::Buf<B::Act>,
    /// fc2 output [rows, D].
    y2: B::Buf<B::Act>,
}

/// Buffers reused across blocks and steps.
struct Scratch<B: Backend> {
    /// Gathered key/value rows of a (forward and backward) [kv, D].
    a_h: B::Buf<B::Act>,
    /// GELU output [rows, 4D] (forward; recomputed in the backward).
    f: B::Buf<B::Act>,
    /// Head: gathered query-stream rows, their final LayerNorm and its statistics [B·P, D].
    xg: B::Buf<B::Act>,
    z: B::Buf<B::Act>,
    meanf: B::Buf<f32>,
    rstdf: B::Buf<f32>,
    /// Head gradients [B·P, D].
    dz: B::Buf<B::Act>,
    dxg: B::Buf<B::Act>,
    /// The residual stream's gradient [rows, D].
    dx: B::Buf<B::Act>,
    /// Gradients of one branch's output (dy2, then dy1) [rows, D].
    dy: B::Buf<B::Act>,
    /// [rows, 4D].
    df: B::Buf<B::Act>,
    du: B::Buf<B::Act>,
    /// [rows, D].
    dc: B::Buf<B::Act>,
    d_o: B::Buf<B::Act>,
    dq: B::Buf<B::Act>,
    da: B::Buf<B::Act>,
    /// [kv, D].
    dk: B::Buf<B::Act>,
    dv: B::Buf<B::Act>,
    da_h: B::Buf<B::Act>,
    /// Room for the GPU's bias-gradient epilogue, f32 [4D] (as wide as fc1's output; only q, k
    /// and v use it now, D wide: the other bias gradients come from the GELU and layer-scale
    /// backward passes).
    bias_grad: B::Buf<f32>,
}

/// Every buffer a step works in, for batches of at most `max_batch` images.
pub struct Activations<B: Backend> {
    max_batch: usize,
    bytes: usize,
    /// The residual stream at every block boundary: xs[i] is block i's input, xs[depth] the
    /// blocks' output [rows, D].
    xs: Vec<B::Buf<B::Act>>,
    blocks: Vec<BlockActs<B>>,
    scratch: Scratch<B>,
    /// The batch's pixels in the form it came in (each allocated for the maximum batch on first
    /// use): normalized f32 `[B, 3, S, S]` or uint8 `[B, S, S, 3]`.
    images_f32: Option<B::Buf<f32>>,
    images_u8: Option<B::Buf<u8>>,
    ranks: B::Buf<i32>,
    /// Drop-path scales [depth, 2, B].
    drop_scales: B::Buf<f32>,
    /// Per-row cross-entropy outputs, with their row count (the last step's B·P).
    rows_out: Option<(usize, CeRows<B>)>,
}

/// Counts the bytes of every allocation made through it.
struct Alloc<'a, B: Backend> {
    be: &'a B,
    bytes: usize,
}

impl<B: Backend> Alloc<'_, B> {
    fn buf<T: Scalar>(&mut self, len: usize) -> Result<B::Buf<T>> {
        self.bytes += len.max(1) * std::mem::size_of::<T>();
        self.be.alloc(len)
    }
}

impl<B: Backend> Activations<B> {
    /// Buffers for `config` and batches of 1 to `max_batch` images.
    pub fn new(be: &B, config: &ModelConfig, max_batch: usize) -> Result<Self> {
        if max_batch == 0 {
            return Err(Error::Unsupported { what: "batch size", detail: "max_batch must be at least 1".into() });
        }
        let cfg = config;
        let (n, pr, d) = (cfg.n_tokens(), cfg.n_pred(), cfg.dim);
        let r = cfg.rows_per_sample();
        let rows = max_batch * r;
        let kv = max_batch * (n + pr);
        let gr = max_batch * pr;
        let hd = 4 * d;
        let mut al = Alloc { be, bytes: 0 };
        let xs = (0..=cfg.depth).map(|_| al.buf(rows * d)).collect::<Result<Vec<_>>>()?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for _ in 0..cfg.depth {
            blocks.push(BlockActs {
                a: al.buf(rows * d)?,
                mean1: al.buf(rows)?,
                rstd1: al.buf(rows)?,
                q: al.buf(rows * d)?,
                k: al.buf(kv * d)?,
                v: al.buf(kv * d)?,
                o: al.buf(rows * d)?,
                lse: al.buf(max_batch * cfg.heads * r)?,
                y1: al.buf(rows * d)?,
                x_mid: al.buf(rows * d)?,
                c: al.buf(rows * d)?,
                mean2: al.buf(rows)?,
                rstd2: al.buf(rows)?,
                u: al.buf(rows * hd)?,
                y2: al.buf(rows * d)?,
            });
        }
        let scratch = Scratch {
            a_h: al.buf(kv * d)?,
            f: al.buf(rows * hd)?,
            xg: al.buf(gr * d)?,
            z: al.buf(gr * d)?,
            meanf: al.buf(gr)?,
            rstdf: al.buf(gr)?,
            dz: al.buf(gr * d)?,
            dxg: al.buf(gr * d)?,
            dx: al.buf(rows * d)?,
            dy: al.buf(rows * d)?,
            df: al.buf(rows * hd)?,
            du: al.buf(rows * hd)?,
            dc: al.buf(rows * d)?,
            d_o: al.buf(rows * d)?,
            dq: al.buf(rows * d)?,
            da: al.buf(rows * d)?,
            dk: al.buf(kv * d)?,
            dv: al.buf(kv * d)?,
            da_h: al.buf(kv * d)?,
            bias_grad: al.buf(hd)?,
        };
        let ranks = al.buf(max_batch * n)?;
        let drop_scales = al.buf(cfg.depth * 2 * max_batch)?;
        let bytes = al.bytes;
        Ok(Activations {
            max_batch,
            bytes,
            xs,
            blocks,
            scratch,
            images_f32: None,
            images_u8: None,
            ranks,
            drop_scales,
            rows_out: None,
        })
    }

    /// The largest batch these buffers hold.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Bytes of the buffers allocated so far: by [`Self::new`], and the pixel buffer of each form
    /// a step has used (the per-row cross-entropy outputs, sized by the last step, are not
    /// counted).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// `K` exclusive views of parameters' gradients (their ranges from [`ParamLayout::ranges`])
/// inside the flat gradient buffer.
fn grad_views<'b, B: Backend, const K: usize>(
    layout: &ParamLayout,
    grads: &'b mut B::Mut<'_, f32>,
    ranges: [&Range<usize>; K],
) -> Result<[B::Mut<'b, f32>; K]> {
    B::split_mut(B::sub_mut(grads, 0..layout.total)?, ranges.map(Range::clone))
}

/// Forward and, when `grads` is given, backward of one batch (see the module docs).
///
/// `drop_path` is `[depth][2][B]` per-sample scales from [`draw_drop_path`] (`None`: eval mode,
/// all ones). Gradients are accumulated (+=) into `grads`, the flat f32 buffer of the layout's
/// size. `want_logits` also returns the decoder logits `[B, P, V]` in rank order (one extra
/// GEMM; meant for small checks such as the golden cases). On the GPU this returns once the loss
/// is read back; the backward's work may still be running on the stream (anything that reads the
/// gradients waits for it).
#[allow(clippy::too_many_arguments)]
pub fn step<B: Backend>(
    be: &B,
    layout: &ParamLayout,
    acts: &mut Activations<B>,
    weights: Weights<'_, B>,
    batch: &Batch,
    drop_path: Option<&[[Vec<f32>; 2]]>,
    grads: Option<B::Mut<'_, f32>>,
    want_logits: bool,
) -> Result<ForwardOutput> {
    let cfg = layout.config;
    batch.validate(&cfg)?;
    let b = batch.batch;
    if b == 0 || b > acts.max_batch {
        return Err(Error::Unsupported {
            what: "batch size",
            detail: format!("{b} images: these buffers were allocated for 1 to {}", acts.max_batch),
        });
    }
    check_len("parameters", B::len(weights.master), layout.total)?;
    check_len("parameters (GEMM copy)", B::len(weights.act), layout.total)?;
    let mut grads = grads;
    if let Some(g) = &grads {
        check_len("gradients", B::len(B::freeze(g)), layout.total)?;
    }
    let (n, c, pr, d, depth) = (cfg.n_tokens(), cfg.context, cfg.n_pred(), cfg.dim, cfg.depth);
    let hd = 4 * d;
    let r = cfg.rows_per_sample();
    let lk = n + pr;
    let rows = b * r;
    let kv = b * lk;
    let gr = b * pr;
    let (nd, kvd, gd, nh) = (rows * d, kv * d, gr * d, rows * hd);
    let att = AttentionShape { batch: b, heads: cfg.heads, head_dim: cfg.head_dim(), n_tokens: n, n_context: c };
    let pe = PatchEmbedShape { batch: b, image: cfg.image, patch: cfg.patch, dim: d, n_context: c };
    let ls = LayerScaleShape { samples: b, rows_per_sample: r, cols: d };
    // Parameters by their ranges in the layout's table (built with the layout: no lookups here).
    let p = layout.ranges();
    if p.blocks.len() != depth || acts.blocks.len() != depth {
        return Err(Error::Shape {
            tensor: "activations",
            expected: format!("{depth} blocks (the layout's config)"),
            got: format!("{} in the activations, {} in the layout's table", acts.blocks.len(), p.blocks.len()),
        });
    }
    let master = |r: &Range<usize>| -> Result<B::Ref<'_, f32>> { B::sub(weights.master, r.clone()) };
    let act = |r: &Range<usize>| -> Result<B::Ref<'_, B::Act>> { B::sub(weights.act, r.clone()) };
    // Inputs: pixels (in the form they came in), ranks and the drop-path scales [depth][2][B].
    let n_pixels = b * 3 * cfg.image * cfg.image;
    let max_pixels = acts.max_batch * 3 * cfg.image * cfg.image;
    match &batch.images {
        Images::F32(host) => {
            if acts.images_f32.is_none() {
                acts.images_f32 = Some(be.alloc(max_pixels)?);
                acts.bytes += max_pixels * 4;
            }
            let buf = acts.images_f32.as_mut().expect("allocated just above");
            be.copy_from_host(host, &mut B::view_mut(buf, 0..n_pixels)?)?;
        }
        Images::U8 { hwc, .. } => {
            if acts.images_u8.is_none() {
                acts.images_u8 = Some(be.alloc(max_pixels)?);
                acts.bytes += max_pixels;
            }
            let buf = acts.images_u8.as_mut().expect("allocated just above");
            be.copy_pixels(hwc, &mut B::view_mut(buf, 0..n_pixels)?)?;
        }
    }
    let Activations { xs, blocks, scratch: s, images_f32, images_u8, ranks, drop_scales, rows_out, .. } = acts;
    be.copy_from_host(&batch.ranks, &mut B::view_mut(ranks, 0..b * n)?)?;
    let mut scales = Vec::with_capacity(depth * 2 * b);
    match drop_path {
        None => scales.resize(depth * 2 * b, 1.0f32),
        Some(dp) => {
            check_len("drop_path blocks", dp.len(), depth)?;
            for block in dp {
                for branch in block {
                    check_len("drop_path scales", branch.len(), b)?;
                    scales.extend_from_slice(branch);
                }
            }
        }
    }
    be.copy_from_host(&scales, &mut B::view_mut(drop_scales, 0..scales.len())?)?;
    let drop_scales = B::view(drop_scales, 0..scales.len())?;
    let dp = |i: usize, j: usize| B::sub(drop_scales, (2 * i + j) * b..(2 * i + j + 1) * b);
    let img = match &batch.images {
        Images::F32(_) => PixelView::F32(B::view(images_f32.as_ref().expect("uploaded above"), 0..n_pixels)?),
        Images::U8 { norm, .. } => {
            PixelView::U8 { hwc: B::view(images_u8.as_ref().expect("uploaded above"), 0..n_pixels)?, norm: *norm }
        }
    };
    let rk = B::view(ranks, 0..b * n)?;

    // Patch embedding into rank order.
    be.patch_embed_forward(
        &pe,
        img,
        rk,
        act(&p.patch_embed_proj_weight)?,
        master(&p.patch_embed_proj_bias)?,
        master(&p.pos_embed)?,
        master(&p.cls_token)?,
        master(&p.mask_positional_token)?,
        &mut B::view_mut(&mut xs[0], 0..nd)?,
    )?;

    for (i, (blk, bp)) in blocks.iter_mut().zip(&p.blocks).enumerate() {
        let (lo, hi) = xs.split_at_mut(i + 1);
        let x_in = B::view(&lo[i], 0..nd)?;

        be.layernorm_forward(
            x_in,
            master(&bp.norm1_weight)?,
            master(&bp.norm1_bias)?,
            LN_EPS,
            rows,
            d,
            &mut B::view_mut(&mut blk.a, 0..nd)?,
            &mut B::view_mut(&mut blk.mean1, 0..rows)?,
            &mut B::view_mut(&mut blk.rstd1, 0..rows)?,
        )?;
        let a = B::view(&blk.a, 0..nd)?;
        be.linear(a, act(&bp.attn_q_weight)?, act(&bp.attn_q_bias)?, rows, d, d, &mut B::view_mut(&mut blk.q, 0..nd)?)?;
        // Keys and values from the content stream: the first N + P rows of each sample.
        be.copy_rows(&RowCopy::gather(b, d, r, 0, lk), a, &mut B::view_mut(&mut s.a_h, 0..kvd)?, false)?;
        let a_h = B::view(&s.a_h, 0..kvd)?;
        let (wkv, bkv) = (act(&bp.attn_kv_weight)?, act(&bp.attn_kv_bias)?);
        let (wk, wv) = (B::sub(wkv, 0..d * d)?, B::sub(wkv, d * d..2 * d * d)?);
        let (bk, bv) = (B::sub(bkv, 0..d)?, B::sub(bkv, d..2 * d)?);
        be.linear(a_h, wk, bk, kv, d, d, &mut B::view_mut(&mut blk.k, 0..kvd)?)?;
        be.linear(a_h, wv, bv, kv, d, d, &mut B::view_mut(&mut blk.v, 0..kvd)?)?;
        be.attention_forward(
            &att,
            B::view(&blk.q, 0..nd)?,
            B::view(&blk.k, 0..kvd)?,
            B::view(&blk.v, 0..kvd)?,
            &mut B::view_mut(&mut blk.o, 0..nd)?,
            &mut B::view_mut(&mut blk.lse, 0..att.lse_len())?,
        )?;
        let o = B::view(&blk.o, 0..nd)?;
        let (w_proj, b_proj) = (act(&bp.attn_proj_weight)?, act(&bp.attn_proj_bias)?);
        be.linear(o, w_proj, b_proj, rows, d, d, &mut B::view_mut(&mut blk.y1, 0..nd)?)?;
        be.layer_scale_forward(
            &ls,
            x_in,
            B::view(&blk.y1, 0..nd)?,
            master(&bp.ls1_gamma)?,
            dp(i, 0)?,
            &mut B::view_mut(&mut blk.x_mid, 0..nd)?,
        )?;
        let x_mid = B::view(&blk.x_mid, 0..nd)?;
        be.layernorm_forward(
            x_mid,
            master(&bp.norm2_weight)?,
            master(&bp.norm2_bias)?,
            LN_EPS,
            rows,
            d,
            &mut B::view_mut(&mut blk.c, 0..nd)?,
            &mut B::view_mut(&mut blk.mean2, 0..rows)?,
            &mut B::view_mut(&mut blk.rstd2, 0..rows)?,
        )?;
        let cn = B::view(&blk.c, 0..nd)?;
        let (w_fc1, b_fc1) = (act(&bp.mlp_fc1_weight)?, act(&bp.mlp_fc1_bias)?);
        be.linear(cn, w_fc1, b_fc1, rows, d, hd, &mut B::view_mut(&mut blk.u, 0..nh)?)?;
        be.gelu_forward(B::view(&blk.u, 0..nh)?, &mut B::view_mut(&mut s.f, 0..nh)?)?;
        let f = B::view(&s.f, 0..nh)?;
        let (w_fc2, b_fc2) = (act(&bp.mlp_fc2_weight)?, act(&bp.mlp_fc2_bias)?);
        be.linear(f, w_fc2, b_fc2, rows, hd, d, &mut B::view_mut(&mut blk.y2, 0..nd)?)?;
        be.layer_scale_forward(
            &ls,
            x_mid,
            B::view(&blk.y2, 0..nd)?,
            master(&bp.ls2_gamma)?,
            dp(i, 1)?,
            &mut B::view_mut(&mut hi[0], 0..nd)?,
        )?;
    }

    // Head on the query stream: rows N + P .. R of each sample, in rank order.
    be.copy_rows(
        &RowCopy::gather(b, d, r, lk, pr),
        B::view(&xs[depth], 0..nd)?,
        &mut B::view_mut(&mut s.xg, 0..gd)?,
        false,
    )?;
    let xg = B::view(&s.xg, 0..gd)?;
    be.layernorm_forward(
        xg,
        master(&p.norm_weight)?,
        master(&p.norm_bias)?,
        LN_EPS,
        gr,
        d,
        &mut B::view_mut(&mut s.z, 0..gd)?,
        &mut B::view_mut(&mut s.meanf, 0..gr)?,
        &mut B::view_mut(&mut s.rstdf, 0..gr)?,
    )?;
    let z = B::view(&s.z, 0..gd)?;
    let targets = batch.targets(&cfg);
    let ce = CrossEntropyShape::new(gr, d, cfg.vocab);
    let (wdec, bdec) = (act(&p.decoder_weight)?, master(&p.decoder_bias)?);
    if rows_out.as_ref().is_none_or(|(len, _)| *len != gr) {
        *rows_out = None; // free the old one first
        *rows_out = Some((gr, be.ce_rows(gr)?));
    }
    let (_, row_outputs) = rows_out.as_mut().expect("allocated just above");
    let stats = match grads.as_mut() {
        Some(g) => {
            let [mut dw, mut db] = grad_views::<B, 2>(layout, g, [&p.decoder_weight, &p.decoder_bias])?;
            let mut dz = B::view_mut(&mut s.dz, 0..gd)?;
            let ce_grads = CeGrads { dloss: 1.0, dx: &mut dz, dw: &mut dw, db: &mut db };
            be.cross_entropy(&ce, z, wdec, bdec, &targets, row_outputs, Some(ce_grads))?
        }
        None => be.cross_entropy(&ce, z, wdec, bdec, &targets, row_outputs, None)?,
    };
    let logits = if want_logits { Some(be.logits_to_host(z, wdec, bdec, gr, d, cfg.vocab)?) } else { None };
    let out = ForwardOutput { loss: stats.loss, stats, logits };
    let Some(mut grads) = grads else { return Ok(out) };

    // Final norm, then the query rows' gradient into the residual stream's (zero elsewhere).
    {
        let [mut dw, mut db] = grad_views::<B, 2>(layout, &mut grads, [&p.norm_weight, &p.norm_bias])?;
        be.layernorm_backward(
            xg,
            B::view(&s.dz, 0..gd)?,
            master(&p.norm_weight)?,
            B::view(&s.meanf, 0..gr)?,
            B::view(&s.rstdf, 0..gr)?,
            gr,
            d,
            &mut B::view_mut(&mut s.dxg, 0..gd)?,
            false,
            &mut dw,
            &mut db,
        )?;
    }
    let mut dx = B::view_mut(&mut s.dx, 0..nd)?;
    be.fill_zero(&mut dx)?;
    be.copy_rows(&RowCopy::scatter(b, d, r, lk, pr), B::view(&s.dxg, 0..gd)?, &mut dx, false)?;

    for (i, (blk, bp)) in blocks.iter().zip(&p.blocks).enumerate().rev() {
        let x_in = B::view(&xs[i], 0..nd)?;
        let a = B::view(&blk.a, 0..nd)?;
        let o = B::view(&blk.o, 0..nd)?;
        let cn = B::view(&blk.c, 0..nd)?;
        let u = B::view(&blk.u, 0..nh)?;
        let mut dy = B::view_mut(&mut s.dy, 0..nd)?;

        // x_out = x_mid + s2 * ls2 * y2, y2 = fc2's output: fc2's bias gradient (the column sums
        // of dy2) comes out of the same pass.
        {
            let [mut dls2, mut db2] = grad_views::<B, 2>(layout, &mut grads, [&bp.ls2_gamma, &bp.mlp_fc2_bias])?;
            let y2 = B::view(&blk.y2, 0..nd)?;
            let (g2, s2) = (master(&bp.ls2_gamma)?, dp(i, 1)?);
            be.layer_scale_backward(&ls, B::freeze(&dx), y2, g2, s2, &mut dy, &mut dls2, Some(&mut db2))?;
        }
        // fc2's input gradient df; then, in one pass over u, du = df * GELU'(u), fc2's input
        // f = GELU(u) (which the forward did not keep) and fc1's bias gradient (the column sums
        // of du); then fc2's weight gradient from f and fc1's weight gradient alone.
        let mut df = B::view_mut(&mut s.df, 0..nh)?;
        be.linear_input_grad(B::freeze(&dy), act(&bp.mlp_fc2_weight)?, rows, hd, d, &mut df, false)?;
        {
            let [mut db1] = grad_views::<B, 1>(layout, &mut grads, [&bp.mlp_fc1_bias])?;
            be.gelu_backward_recompute(
                u,
                B::freeze(&df),
                hd,
                &mut B::view_mut(&mut s.du, 0..nh)?,
                &mut B::view_mut(&mut s.f, 0..nh)?,
                &mut db1,
            )?;
        }
        {
            let [mut dw] = grad_views::<B, 1>(layout, &mut grads, [&bp.mlp_fc2_weight])?;
            let f = B::view(&s.f, 0..nh)?;
            let mut sc = B::view_mut(&mut s.bias_grad, 0..hd)?;
            be.linear_weight_grads(f, B::freeze(&dy), rows, hd, d, &mut dw, None, &mut sc)?;
        }
        let du = B::view(&s.du, 0..nh)?;
        {
            let [mut dw] = grad_views::<B, 1>(layout, &mut grads, [&bp.mlp_fc1_weight])?;
            let mut sc = B::view_mut(&mut s.bias_grad, 0..hd)?;
            be.linear_weight_grads(cn, du, rows, d, hd, &mut dw, None, &mut sc)?;
        }
        let mut dc = B::view_mut(&mut s.dc, 0..nd)?;
        be.linear_input_grad(du, act(&bp.mlp_fc1_weight)?, rows, d, hd, &mut dc, false)?;
        {
            let [mut dw, mut db] = grad_views::<B, 2>(layout, &mut grads, [&bp.norm2_weight, &bp.norm2_bias])?;
            be.layernorm_backward(
                B::view(&blk.x_mid, 0..nd)?,
                B::freeze(&dc),
                master(&bp.norm2_weight)?,
                B::view(&blk.mean2, 0..rows)?,
                B::view(&blk.rstd2, 0..rows)?,
                rows,
                d,
                &mut dx,
                true,
                &mut dw,
                &mut db,
            )?;
        }

        // x_mid = x_in + s1 * ls1 * y1, y1 = proj's output: proj's bias gradient from the same pass.
        {
            let [mut dls1, mut db1] = grad_views::<B, 2>(layout, &mut grads, [&bp.ls1_gamma, &bp.attn_proj_bias])?;
            let y1 = B::view(&blk.y1, 0..nd)?;
            let (g1, s1) = (master(&bp.ls1_gamma)?, dp(i, 0)?);
            be.layer_scale_backward(&ls, B::freeze(&dx), y1, g1, s1, &mut dy, &mut dls1, Some(&mut db1))?;
        }
        {
            let [mut dw] = grad_views::<B, 1>(layout, &mut grads, [&bp.attn_proj_weight])?;
            let mut sc = B::view_mut(&mut s.bias_grad, 0..hd)?;
            be.linear_weight_grads(o, B::freeze(&dy), rows, d, d, &mut dw, None, &mut sc)?;
        }
        let mut d_o = B::view_mut(&mut s.d_o, 0..nd)?;
        be.linear_input_grad(B::freeze(&dy), act(&bp.attn_proj_weight)?, rows, d, d, &mut d_o, false)?;
        let (mut dq, mut dk, mut dv) =
            (B::view_mut(&mut s.dq, 0..nd)?, B::view_mut(&mut s.dk, 0..kvd)?, B::view_mut(&mut s.dv, 0..kvd)?);
        be.attention_backward(
            &att,
            B::view(&blk.q, 0..nd)?,
            B::view(&blk.k, 0..kvd)?,
            B::view(&blk.v, 0..kvd)?,
            o,
            B::view(&blk.lse, 0..att.lse_len())?,
            B::freeze(&d_o),
            &mut dq,
            &mut dk,
            &mut dv,
        )?;
        let (dq, dk, dv) = (B::freeze(&dq), B::freeze(&dk), B::freeze(&dv));
        {
            let [mut dw, mut db] = grad_views::<B, 2>(layout, &mut grads, [&bp.attn_q_weight, &bp.attn_q_bias])?;
            let mut sc = B::view_mut(&mut s.bias_grad, 0..hd)?;
            be.linear_weight_grads(a, dq, rows, d, d, &mut dw, Some(&mut db), &mut sc)?;
        }
        let mut da = B::view_mut(&mut s.da, 0..nd)?;
        be.linear_input_grad(dq, act(&bp.attn_q_weight)?, rows, d, d, &mut da, false)?;
        // Keys and values: their input rows gathered again, their input gradient scattered back
        // into the first N + P rows of each sample.
        be.copy_rows(&RowCopy::gather(b, d, r, 0, lk), a, &mut B::view_mut(&mut s.a_h, 0..kvd)?, false)?;
        let a_h = B::view(&s.a_h, 0..kvd)?;
        {
            let [dw, db] = grad_views::<B, 2>(layout, &mut grads, [&bp.attn_kv_weight, &bp.attn_kv_bias])?;
            let [mut dwk, mut dwv] = B::split_mut(dw, [0..d * d, d * d..2 * d * d])?;
            let [mut dbk, mut dbv] = B::split_mut(db, [0..d, d..2 * d])?;
            let mut sc = B::view_mut(&mut s.bias_grad, 0..hd)?;
            be.linear_weight_grads(a_h, dk, kv, d, d, &mut dwk, Some(&mut dbk), &mut sc)?;
            be.linear_weight_grads(a_h, dv, kv, d, d, &mut dwv, Some(&mut dbv), &mut sc)?;
        }
        let wkv = act(&bp.attn_kv_weight)?;
        let (wk, wv) = (B::sub(wkv, 0..d * d)?, B::sub(wkv, d * d..2 * d * d)?);
        let mut da_h = B::view_mut(&mut s.da_h, 0..kvd)?;
        be.linear_input_grad(dk, wk, kv, d, d, &mut da_h, false)?;
        be.linear_input_grad(dv, wv, kv, d, d, &mut da_h, true)?;
        be.copy_rows(&RowCopy::scatter(b, d, r, 0, lk), B::freeze(&da_h), &mut da, true)?;
        {
            let [mut dw, mut db] = grad_views::<B, 2>(layout, &mut grads, [&bp.norm1_weight, &bp.norm1_bias])?;
            be.layernorm_backward(
                x_in,
                B::freeze(&da),
                master(&bp.norm1_weight)?,
                B::view(&blk.mean1, 0..rows)?,
                B::view(&blk.rstd1, 0..rows)?,
                rows,
                d,
                &mut dx,
                true,
                &mut dw,
                &mut db,
            )?;
        }
    }

    // Patch embedding.
    let ranges =
        [&p.patch_embed_proj_weight, &p.patch_embed_proj_bias, &p.pos_embed, &p.cls_token, &p.mask_positional_token];
    let [mut dw, mut db, mut dpos, mut dcls, mut dmask] = grad_views::<B, 5>(layout, &mut grads, ranges)?;
    be.patch_embed_backward(&pe, img, rk, B::freeze(&dx), &mut dw, &mut db, &mut dpos, &mut dcls, &mut dmask)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes are shape errors; a token id past the vocabulary or ranks that are not a
    /// permutation are value errors, naming the tensor, the sample and the position.
    #[test]
    fn batch_errors_tell_sizes_from_values() {
        let cfg = ModelConfig { image: 16, patch: 8, dim: 8, depth: 1, heads: 1, vocab: 4, context: 2 };
        let n = cfg.n_tokens();
        let good = || Batch {
            batch: 2,
            images: Images::F32(vec![0.5; 2 * 3 * 16 * 16]),
            tokens: vec![1; 2 * (n - 1)],
            ranks: (0..2).flat_map(|_| 0..n as i32).collect(),
        };
        good().validate(&cfg).unwrap();
        let mut b = good();
        b.tokens.pop();
        assert!(matches!(b.validate(&cfg), Err(Error::Shape { tensor: "batch.tokens", .. })));
        let mut b = good();
        b.tokens[n - 1 + 2] = 4;
        let e = b.validate(&cfg).unwrap_err();
        assert!(matches!(e, Error::Value { tensor: "batch.tokens", .. }), "{e}");
        assert_eq!(e.to_string(), "bad value in `batch.tokens`: expected ids in 0..4, got 4 at sample 1, patch 2");
        let mut b = good();
        b.ranks[n + 1] = 2; // rank 2 twice in sample 1
        let e = b.validate(&cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad value in `batch.ranks`: expected a permutation of 0..5 with rank 0 for CLS, got rank 2 repeated (at token 2) in sample 1"
        );
    }
}
