//! The whole two-stream MaPeT forward and backward on the GPU. It mirrors [`crate::model::cpu`]
//! (the reference, checked against the authors' model on the golden cases): the same rank-order
//! layout, the same math, the same order of operations, with the precision of DESIGN.md: f32
//! master weights (and a bf16 copy of them for the GEMMs), bf16 activations, f32 gradients, f32
//! statistics, softmax and loss, f32 accumulation everywhere.
//!
//! # Layout
//!
//! As in the CPU model, each sample has R = N + 2P rows of width D in rank order: the N content
//! tokens, the P mask tokens of the content stream h, then the P query-stream rows g. Row-wise
//! work (LayerNorm, the q projection, proj, the MLP, the residuals) runs over all B·R rows at once;
//! keys and values come from the first N + P rows of each sample, which are gathered into a
//! packed `[B, N + P, D]` buffer first (and their gradients scattered back); the head gathers the
//! last P rows of each sample.
//!
//! ```text
//! x0  = patch_embed(images, ranks)                                  [B, R, D]      bf16
//! per block:  a = LN1(x);  q = a Wq^T + bq;  a_h = gather(a);  k = a_h Wk^T + bk;  v = a_h Wv^T + bv
//!             o = attention(q, k, v);  y1 = o Wproj^T + bproj;  x_mid = x + (dp1 * ls1) * y1
//!             c = LN2(x_mid);  u = c W1^T + b1;  f = GELU(u);  y2 = f W2^T + b2;  x' = x_mid + (dp2 * ls2) * y2
//! z = LN(gather_g(x));  loss = CE(z Wdec^T + bdec)   (the cross-entropy op never holds all logits)
//! ```
//!
//! # Numerics (what differs from the f32 CPU model)
//!
//! - GEMMs (cuBLASLt) take bf16 operands, accumulate in f32 and write bf16; the forward's bias is
//!   the bf16 copy, added in the epilogue. Weight gradients are f32 GEMM outputs accumulated with
//!   `beta = 1` straight into the f32 gradient buffer; bias gradients come from the same GEMM's
//!   bias-gradient epilogue (written into an f32 scratch, then added: the epilogue writes, it
//!   does not accumulate).
//! - GELU is the erf form (`ops::gelu`), not cuBLASLt's tanh epilogue. Its input u is saved; its
//!   output f is recomputed in the backward (bit-identical, and 4·D fewer saved values per row).
//! - LayerNorm, the layer-scale residual and the patch embedding read f32 weights (the master
//!   copy) and keep f32 statistics; the residual stream x and every activation gradient are bf16.
//! - Every reduction is deterministic (no float atomics): two runs of a step on the same inputs
//!   and the same card give bit-identical losses and gradients.
//!
//! # Memory
//!
//! Everything is allocated once, in [`CudaModel::new`], for a maximum batch: the f32 parameters,
//! their bf16 copy, the f32 gradients, the activations every block saves for the backward, and
//! the scratch the backward reuses from block to block. A step allocates only what the op
//! launchers allocate internally (the LayerNorm, layer-scale, attention and patch-embedding
//! backward scratch, the cross-entropy chunk buffers), in stream order. [`CudaModel::device_bytes`]
//! gives the total of the model's own buffers.

use std::sync::Arc;

use cudarc::driver::DeviceRepr;
use half::bf16;

use crate::cuda::gemm::{Epilogue, Gemm, Vector, VectorMut};
use crate::cuda::{DeviceBuffer, DeviceRead, DeviceView, DeviceViewMut, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};
use crate::model::cpu::{Batch, ForwardOutput, LN_EPS};
use crate::model::params::{ModelConfig, ParamLayout};
use crate::ops::attention::{self, AttentionShape};
use crate::ops::cross_entropy::{self, CrossEntropyShape, CudaRowOutputs};
use crate::ops::patch_embed::{self, DevicePixels, PatchEmbedShape};
use crate::ops::residual::{self, LayerScaleShape, RowCopy};
use crate::ops::{gelu, layernorm};
use crate::perm;

/// Activations one block saves for its backward, sized for the maximum batch (`rows` = B·R,
/// `kv` = B·(N+P) rows).
struct BlockActs {
    /// LN1(x_in) [rows, D].
    a: DeviceBuffer<bf16>,
    /// LN1 statistics [rows].
    mean1: DeviceBuffer<f32>,
    rstd1: DeviceBuffer<f32>,
    /// [rows, D].
    q: DeviceBuffer<bf16>,
    /// [kv, D].
    k: DeviceBuffer<bf16>,
    v: DeviceBuffer<bf16>,
    /// Attention output [rows, D] and its logsumexp [B, heads, R].
    o: DeviceBuffer<bf16>,
    lse: DeviceBuffer<f32>,
    /// proj output [rows, D].
    y1: DeviceBuffer<bf16>,
    /// The residual stream after the attention branch [rows, D].
    x_mid: DeviceBuffer<bf16>,
    /// LN2(x_mid) [rows, D] and its statistics [rows].
    c: DeviceBuffer<bf16>,
    mean2: DeviceBuffer<f32>,
    rstd2: DeviceBuffer<f32>,
    /// fc1 output (GELU input) [rows, 4D].
    u: DeviceBuffer<bf16>,
    /// fc2 output [rows, D].
    y2: DeviceBuffer<bf16>,
}

/// Buffers reused across blocks and steps.
struct Scratch {
    /// Gathered key/value rows of a (forward and backward) [kv, D].
    a_h: DeviceBuffer<bf16>,
    /// GELU output [rows, 4D] (forward; recomputed in the backward).
    f: DeviceBuffer<bf16>,
    /// Head: gathered query-stream rows, their final LayerNorm and its statistics [B·P, D].
    xg: DeviceBuffer<bf16>,
    z: DeviceBuffer<bf16>,
    meanf: DeviceBuffer<f32>,
    rstdf: DeviceBuffer<f32>,
    /// Head gradients [B·P, D].
    dz: DeviceBuffer<bf16>,
    dxg: DeviceBuffer<bf16>,
    /// The residual stream's gradient [rows, D].
    dx: DeviceBuffer<bf16>,
    /// Gradients of one branch's output (dy2, then dy1) [rows, D].
    dy: DeviceBuffer<bf16>,
    /// [rows, 4D].
    df: DeviceBuffer<bf16>,
    du: DeviceBuffer<bf16>,
    /// [rows, D].
    dc: DeviceBuffer<bf16>,
    d_o: DeviceBuffer<bf16>,
    dq: DeviceBuffer<bf16>,
    da: DeviceBuffer<bf16>,
    /// [kv, D].
    dk: DeviceBuffer<bf16>,
    dv: DeviceBuffer<bf16>,
    da_h: DeviceBuffer<bf16>,
    /// Bias-gradient epilogue output, f32 [4D] (the widest Linear of a block).
    bias_grad: DeviceBuffer<f32>,
}

/// The model on one GPU: its parameters, gradients and activation buffers.
pub struct CudaModel {
    /// Parameter layout (config, names, offsets), the same as the CPU model's.
    pub layout: ParamLayout,
    gpu: Arc<Gpu>,
    gemm: Gemm,
    max_batch: usize,
    device_bytes: usize,
    params: DeviceBuffer<f32>,
    params_bf16: DeviceBuffer<bf16>,
    grads: DeviceBuffer<f32>,
    /// The residual stream at every block boundary: xs[i] is block i's input, xs[depth] the
    /// blocks' output [rows, D].
    xs: Vec<DeviceBuffer<bf16>>,
    blocks: Vec<BlockActs>,
    scratch: Scratch,
    images: DeviceBuffer<f32>,
    ranks: DeviceBuffer<i32>,
    /// Drop-path scales [depth, 2, B].
    drop_scales: DeviceBuffer<f32>,
    /// Per-row cross-entropy outputs, for the batch size of the last step.
    rows_out: Option<CudaRowOutputs>,
}

/// Counts the bytes of every allocation made through it.
struct Alloc<'a> {
    gpu: &'a Gpu,
    bytes: usize,
}

impl Alloc<'_> {
    fn buf<T: DeviceRepr>(&mut self, len: usize) -> Result<DeviceBuffer<T>> {
        self.bytes += len.max(1) * std::mem::size_of::<T>();
        self.gpu.alloc(len)
    }

    fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&mut self, len: usize) -> Result<DeviceBuffer<T>> {
        self.bytes += len.max(1) * std::mem::size_of::<T>();
        self.gpu.zeros(len)
    }
}

/// A shared view of parameter `name` inside a flat buffer.
fn pv<'a, T: DeviceRepr>(layout: &ParamLayout, buf: &'a DeviceBuffer<T>, name: &str) -> Result<DeviceView<'a, T>> {
    buf.view(layout.get(name)?.range())
}

/// Exclusive views of the gradients of two parameters (a Linear's weight and bias, a norm's
/// weight and bias).
fn grad_pair<'a>(
    layout: &ParamLayout,
    grads: &'a mut DeviceBuffer<f32>,
    a: &str,
    b: &str,
) -> Result<[DeviceViewMut<'a, f32>; 2]> {
    grads.views_mut([layout.get(a)?.range(), layout.get(b)?.range()])
}

/// `y[rows, out] = x[rows, inp] W^T + b`, W the bf16 copy stored [out, inp], b its bf16 copy.
#[allow(clippy::too_many_arguments)]
fn linear(
    gemm: &Gemm,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<bf16>,
    rows: usize,
    inp: usize,
    out: usize,
    y: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    gemm.matmul(rows, out, inp, x, false, w, true, y, 1.0, 0.0, Epilogue::Bias { bias: Vector::Bf16(b) })
}

/// Weight and bias gradients of a Linear: `dW += dy^T x` (f32, beta = 1) and `db += column sums
/// of dy` (the GEMM's bias-gradient epilogue writes them into `scratch`, which is then added).
#[allow(clippy::too_many_arguments)]
fn linear_weight_grads(
    gpu: &Gpu,
    gemm: &Gemm,
    x: &dyn DeviceRead<bf16>,
    dy: &dyn DeviceRead<bf16>,
    rows: usize,
    inp: usize,
    out: usize,
    dw: &mut dyn DeviceWrite<f32>,
    db: &mut dyn DeviceWrite<f32>,
    scratch: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let mut sums = scratch.view_mut(0..out)?;
    let epilogue = Epilogue::BiasGradFromA { bias_grad: VectorMut::F32(&mut sums) };
    gemm.matmul_f32_out(out, inp, rows, dy, true, x, false, dw, 1.0, 1.0, epilogue)?;
    residual::cuda_add_f32(gpu, &sums, db)
}

/// `dx[rows, inp] = dy[rows, out] W` (W stored [out, inp]), written (`beta` 0) or added (1).
#[allow(clippy::too_many_arguments)]
fn linear_input_grad(
    gemm: &Gemm,
    dy: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    rows: usize,
    inp: usize,
    out: usize,
    dx: &mut dyn DeviceWrite<bf16>,
    beta: f32,
) -> Result<()> {
    gemm.matmul(rows, inp, out, dy, false, w, false, dx, 1.0, beta, Epilogue::None)
}

/// Targets of the query rows in rank order (as [`crate::model::cpu::CpuModel::targets`]).
fn targets(cfg: &ModelConfig, batch: &Batch) -> Vec<i32> {
    let (n, c) = (cfg.n_tokens(), cfg.context);
    let mut t = Vec::with_capacity(batch.batch * cfg.n_pred());
    for (ranks, tokens) in batch.ranks.chunks_exact(n).zip(batch.tokens.chunks_exact(n - 1)) {
        let r: Vec<u32> = ranks.iter().map(|&x| x as u32).collect();
        let order = perm::order_from_ranks(&r);
        t.extend(order[c..].iter().map(|&tok| tokens[tok as usize - 1]));
    }
    t
}

impl CudaModel {
    /// A model of `config` on `gpu` for batches of at most `max_batch` images, with every
    /// parameter and gradient zero (load parameters with [`Self::upload_params`]). Refuses
    /// configs the kernels do not support (head dim other than 64, `dim % 8 != 0`).
    pub fn new(gpu: Arc<Gpu>, config: ModelConfig, max_batch: usize) -> Result<Self> {
        let layout = ParamLayout::new(config)?;
        if max_batch == 0 {
            return Err(Error::Unsupported { what: "batch size", detail: "max_batch must be at least 1".into() });
        }
        let cfg = config;
        let (n, pr, d) = (cfg.n_tokens(), cfg.n_pred(), cfg.dim);
        attention::check_cuda_shape(&AttentionShape {
            batch: max_batch,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
            n_tokens: n,
            n_context: cfg.context,
        })?;
        PatchEmbedShape { batch: max_batch, image: cfg.image, patch: cfg.patch, dim: d, n_context: cfg.context }
            .validate_cuda()?;
        let gemm = Gemm::new(&gpu)?;
        let r = cfg.rows_per_sample();
        let rows = max_batch * r;
        let kv = max_batch * (n + pr);
        let gr = max_batch * pr;
        let hd = 4 * d;

        let mut al = Alloc { gpu: &gpu, bytes: 0 };
        let params = al.zeros::<f32>(layout.total)?;
        let params_bf16 = al.zeros::<bf16>(layout.total)?;
        let grads = al.zeros::<f32>(layout.total)?;
        let xs = (0..=cfg.depth).map(|_| al.buf::<bf16>(rows * d)).collect::<Result<Vec<_>>>()?;
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
        let images = al.buf(max_batch * 3 * cfg.image * cfg.image)?;
        let ranks = al.buf(max_batch * n)?;
        let drop_scales = al.buf(cfg.depth * 2 * max_batch)?;
        let device_bytes = al.bytes;
        Ok(CudaModel {
            layout,
            gpu,
            gemm,
            max_batch,
            device_bytes,
            params,
            params_bf16,
            grads,
            xs,
            blocks,
            scratch,
            images,
            ranks,
            drop_scales,
            rows_out: None,
        })
    }

    /// The GPU everything runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The cuBLASLt handle the model's GEMMs use.
    pub fn gemm(&self) -> &Gemm {
        &self.gemm
    }

    /// The largest batch [`Self::step`] takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Bytes of device memory the model's own buffers hold (not counting the cuBLASLt workspace
    /// and what the op launchers allocate during a step).
    pub fn device_bytes(&self) -> usize {
        self.device_bytes
    }

    /// The f32 master parameters (flat, [`ParamLayout`] order).
    pub fn params(&self) -> &DeviceBuffer<f32> {
        &self.params
    }

    /// The f32 gradients (flat, [`ParamLayout`] order).
    pub fn grads(&self) -> &DeviceBuffer<f32> {
        &self.grads
    }

    /// The bf16 copy of the parameters the GEMMs read.
    pub fn params_bf16(&self) -> &DeviceBuffer<bf16> {
        &self.params_bf16
    }

    /// What an optimizer step needs at once: the f32 parameters (updated), the gradients (read),
    /// and the bf16 copy (rewritten from the new parameters, e.g. by `ops::adamw::cuda_step`'s
    /// `copy`). After changing the parameters any other way, call [`Self::refresh_bf16_copy`].
    pub fn optimizer_buffers(&mut self) -> (&mut DeviceBuffer<f32>, &DeviceBuffer<f32>, &mut DeviceBuffer<bf16>) {
        (&mut self.params, &self.grads, &mut self.params_bf16)
    }

    /// The gradients, for clipping or zeroing.
    pub fn grads_mut(&mut self) -> &mut DeviceBuffer<f32> {
        &mut self.grads
    }

    /// Rewrites the bf16 copy from the f32 parameters (round to nearest even).
    pub fn refresh_bf16_copy(&mut self) -> Result<()> {
        residual::cuda_f32_to_bf16(&self.gpu, &self.params, &mut self.params_bf16)
    }

    /// Copies a flat host parameter buffer ([`ParamLayout::total`] values, e.g. from
    /// [`ParamLayout::init`] or [`ParamLayout::load_safetensors`]) to the device and refreshes the
    /// bf16 copy.
    pub fn upload_params(&mut self, host: &[f32]) -> Result<()> {
        check_len("parameters", host.len(), self.layout.total)?;
        self.params.copy_from_host(host)?;
        self.refresh_bf16_copy()
    }

    /// The f32 parameters on the host (waits for the stream).
    pub fn download_params(&self) -> Result<Vec<f32>> {
        self.params.to_host()
    }

    /// The f32 gradients on the host (waits for the stream).
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        self.grads.to_host()
    }

    /// Sets every gradient to zero (in stream order).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill_zero()
    }

    /// Forward and, when `backward`, backward of one batch: the GPU twin of
    /// [`crate::model::cpu::CpuModel::step`]. `drop_path` is `[depth][2][B]` per-sample scales from
    /// [`crate::model::cpu::CpuModel::draw_drop_path`] (`None`: eval mode, all ones). Gradients
    /// are accumulated (+=) into the model's f32 gradient buffer ([`Self::zero_grads`] first for
    /// a fresh step). `want_logits` also returns the decoder logits `[B, P, V]` in rank order,
    /// computed with one extra GEMM into a `[B·P, V]` buffer allocated for the call (meant for
    /// small checks, e.g. the golden cases): `bf16(z Wdec^T) + bdec` in f32, the same values the
    /// cross-entropy op works on. Returns after the loss is read back; the backward's work may
    /// still be running on the stream (anything that reads the gradients waits for it).
    pub fn step(
        &mut self,
        batch: &Batch,
        drop_path: Option<&[[Vec<f32>; 2]]>,
        backward: bool,
        want_logits: bool,
    ) -> Result<ForwardOutput> {
        let CudaModel {
            layout,
            gpu,
            gemm,
            max_batch,
            params,
            params_bf16,
            grads,
            xs,
            blocks,
            scratch: s,
            images,
            ranks,
            drop_scales,
            rows_out,
            ..
        } = self;
        let layout: &ParamLayout = layout;
        let gpu: &Gpu = gpu;
        let gemm: &Gemm = gemm;
        let params: &DeviceBuffer<f32> = params;
        let params_bf16: &DeviceBuffer<bf16> = params_bf16;

        let cfg = layout.config;
        batch.validate(&cfg)?;
        let b = batch.batch;
        if b == 0 || b > *max_batch {
            return Err(Error::Unsupported {
                what: "batch size",
                detail: format!("{b} images: this model was allocated for 1 to {max_batch}"),
            });
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
        let range = |name: &str| -> Result<std::ops::Range<usize>> { Ok(layout.get(name)?.range()) };

        // Inputs: pixels, ranks and the drop-path scales [depth][2][B].
        let n_pixels = b * 3 * cfg.image * cfg.image;
        images.view_mut(0..n_pixels)?.copy_from_host(&batch.images)?;
        ranks.view_mut(0..b * n)?.copy_from_host(&batch.ranks)?;
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
        drop_scales.view_mut(0..scales.len())?.copy_from_host(&scales)?;
        let drop_scales: &DeviceBuffer<f32> = drop_scales;
        let dp = |i: usize, j: usize| drop_scales.view((2 * i + j) * b..(2 * i + j + 1) * b);
        let images: &DeviceBuffer<f32> = images;
        let ranks: &DeviceBuffer<i32> = ranks;
        let img = images.view(0..n_pixels)?;
        let rk = ranks.view(0..b * n)?;

        // Patch embedding into rank order.
        patch_embed::cuda_forward_f32(
            gpu,
            &pe,
            &img,
            &rk,
            &pv(layout, params_bf16, "patch_embed.proj.weight")?,
            &pv(layout, params, "patch_embed.proj.bias")?,
            &pv(layout, params, "pos_embed")?,
            &pv(layout, params, "cls_token")?,
            &pv(layout, params, "mask_positional_token")?,
            &mut xs[0].view_mut(0..nd)?,
        )?;

        for (i, blk) in blocks.iter_mut().enumerate() {
            let w16 = move |s: &str| pv(layout, params_bf16, &format!("blocks.{i}.{s}"));
            let w32 = move |s: &str| pv(layout, params, &format!("blocks.{i}.{s}"));
            let (lo, hi) = xs.split_at_mut(i + 1);
            let x_in = lo[i].view(0..nd)?;
            let mut x_out = hi[0].view_mut(0..nd)?;

            layernorm::cuda_forward(
                gpu,
                &x_in,
                &w32("norm1.weight")?,
                &w32("norm1.bias")?,
                LN_EPS,
                rows,
                d,
                &mut blk.a.view_mut(0..nd)?,
                &mut blk.mean1.view_mut(0..rows)?,
                &mut blk.rstd1.view_mut(0..rows)?,
            )?;
            let a = blk.a.view(0..nd)?;
            let q_b = w16("attn.q.bias")?;
            linear(gemm, &a, &w16("attn.q.weight")?, &q_b, rows, d, d, &mut blk.q.view_mut(0..nd)?)?;
            // Keys and values from the content stream: the first N + P rows of each sample.
            residual::cuda_copy_rows(gpu, &RowCopy::gather(b, d, r, 0, lk), &a, &mut s.a_h.view_mut(0..kvd)?, false)?;
            let a_h = s.a_h.view(0..kvd)?;
            let (wkv, bkv) = (w16("attn.kv.weight")?, w16("attn.kv.bias")?);
            let (wk, wv) = (wkv.view(0..d * d)?, wkv.view(d * d..2 * d * d)?);
            let (bk, bv) = (bkv.view(0..d)?, bkv.view(d..2 * d)?);
            linear(gemm, &a_h, &wk, &bk, kv, d, d, &mut blk.k.view_mut(0..kvd)?)?;
            linear(gemm, &a_h, &wv, &bv, kv, d, d, &mut blk.v.view_mut(0..kvd)?)?;
            attention::cuda_forward(
                gpu,
                &att,
                &blk.q.view(0..nd)?,
                &blk.k.view(0..kvd)?,
                &blk.v.view(0..kvd)?,
                &mut blk.o.view_mut(0..nd)?,
                &mut blk.lse.view_mut(0..att.lse_len())?,
            )?;
            let proj_b = w16("attn.proj.bias")?;
            let o = blk.o.view(0..nd)?;
            linear(gemm, &o, &w16("attn.proj.weight")?, &proj_b, rows, d, d, &mut blk.y1.view_mut(0..nd)?)?;
            residual::cuda_layer_scale_forward(
                gpu,
                &ls,
                &x_in,
                &blk.y1.view(0..nd)?,
                &w32("ls1.gamma")?,
                &dp(i, 0)?,
                &mut blk.x_mid.view_mut(0..nd)?,
            )?;
            let x_mid = blk.x_mid.view(0..nd)?;
            layernorm::cuda_forward(
                gpu,
                &x_mid,
                &w32("norm2.weight")?,
                &w32("norm2.bias")?,
                LN_EPS,
                rows,
                d,
                &mut blk.c.view_mut(0..nd)?,
                &mut blk.mean2.view_mut(0..rows)?,
                &mut blk.rstd2.view_mut(0..rows)?,
            )?;
            let fc1_b = w16("mlp.fc1.bias")?;
            let cn = blk.c.view(0..nd)?;
            linear(gemm, &cn, &w16("mlp.fc1.weight")?, &fc1_b, rows, d, hd, &mut blk.u.view_mut(0..nh)?)?;
            gelu::cuda_forward(gpu, &blk.u.view(0..nh)?, &mut s.f.view_mut(0..nh)?)?;
            let fc2_b = w16("mlp.fc2.bias")?;
            let f = s.f.view(0..nh)?;
            linear(gemm, &f, &w16("mlp.fc2.weight")?, &fc2_b, rows, hd, d, &mut blk.y2.view_mut(0..nd)?)?;
            residual::cuda_layer_scale_forward(
                gpu,
                &ls,
                &x_mid,
                &blk.y2.view(0..nd)?,
                &w32("ls2.gamma")?,
                &dp(i, 1)?,
                &mut x_out,
            )?;
        }

        // Head on the query stream: rows N + P .. R of each sample, in rank order.
        residual::cuda_copy_rows(
            gpu,
            &RowCopy::gather(b, d, r, lk, pr),
            &xs[depth].view(0..nd)?,
            &mut s.xg.view_mut(0..gd)?,
            false,
        )?;
        let xg = s.xg.view(0..gd)?;
        layernorm::cuda_forward(
            gpu,
            &xg,
            &pv(layout, params, "norm.weight")?,
            &pv(layout, params, "norm.bias")?,
            LN_EPS,
            gr,
            d,
            &mut s.z.view_mut(0..gd)?,
            &mut s.meanf.view_mut(0..gr)?,
            &mut s.rstdf.view_mut(0..gr)?,
        )?;
        let z = s.z.view(0..gd)?;
        let tgt = targets(&cfg, batch);
        let ce = CrossEntropyShape::new(gr, d, cfg.vocab);
        let wdec = pv(layout, params_bf16, "decoder.weight")?;
        let bdec = pv(layout, params, "decoder.bias")?;
        let stale = match rows_out {
            Some(ro) => ro.loss.len() != gr,
            None => true,
        };
        if stale {
            *rows_out = None; // free the old one first
            *rows_out = Some(CudaRowOutputs::new(gpu, gr)?);
        }
        let row_outputs = rows_out.as_mut().expect("allocated just above");
        let stats = if backward {
            let [mut dw, mut db] = grad_pair(layout, grads, "decoder.weight", "decoder.bias")?;
            let mut dz = s.dz.view_mut(0..gd)?;
            cross_entropy::cuda_forward_backward(
                gpu,
                gemm,
                &ce,
                &z,
                &wdec,
                &bdec,
                &tgt,
                1.0,
                row_outputs,
                &mut dz,
                &mut dw,
                &mut db,
            )?
        } else {
            cross_entropy::cuda_forward(gpu, gemm, &ce, &z, &wdec, &bdec, &tgt, row_outputs)?
        };
        let logits = if want_logits {
            let v = cfg.vocab;
            let mut acc = gpu.alloc::<bf16>(gr * v)?;
            gemm.matmul(gr, v, d, &z, false, &wdec, true, &mut acc, 1.0, 0.0, Epilogue::None)?;
            let bias = bdec.to_host()?;
            let mut l = acc.to_host_f32()?;
            for row in l.chunks_exact_mut(v) {
                for (x, &bb) in row.iter_mut().zip(&bias) {
                    *x += bb;
                }
            }
            Some(l)
        } else {
            None
        };
        let out = ForwardOutput { loss: stats.loss, stats, logits };
        if !backward {
            return Ok(out);
        }

        // Final norm, then the query rows' gradient into the residual stream's (zero elsewhere).
        {
            let [mut dw, mut db] = grad_pair(layout, grads, "norm.weight", "norm.bias")?;
            layernorm::cuda_backward(
                gpu,
                &xg,
                &s.dz.view(0..gd)?,
                &pv(layout, params, "norm.weight")?,
                &s.meanf.view(0..gr)?,
                &s.rstdf.view(0..gr)?,
                gr,
                d,
                &mut s.dxg.view_mut(0..gd)?,
                false,
                &mut dw,
                &mut db,
            )?;
        }
        let mut dx = s.dx.view_mut(0..nd)?;
        dx.fill_zero()?;
        residual::cuda_copy_rows(gpu, &RowCopy::scatter(b, d, r, lk, pr), &s.dxg.view(0..gd)?, &mut dx, false)?;

        for (i, blk) in blocks.iter().enumerate().rev() {
            let name = |s: &str| format!("blocks.{i}.{s}");
            let w16 = move |s: &str| pv(layout, params_bf16, &format!("blocks.{i}.{s}"));
            let w32 = move |s: &str| pv(layout, params, &format!("blocks.{i}.{s}"));
            let x_in = xs[i].view(0..nd)?;
            let a = blk.a.view(0..nd)?;
            let o = blk.o.view(0..nd)?;
            let cn = blk.c.view(0..nd)?;
            let u = blk.u.view(0..nh)?;

            // x_out = x_mid + s2 * ls2 * y2.
            let mut dy = s.dy.view_mut(0..nd)?;
            residual::cuda_layer_scale_backward(
                gpu,
                &ls,
                &dx,
                &blk.y2.view(0..nd)?,
                &w32("ls2.gamma")?,
                &dp(i, 1)?,
                &mut dy,
                &mut grads.view_mut(range(&name("ls2.gamma"))?)?,
            )?;
            // fc2, with its input f = GELU(u) recomputed.
            gelu::cuda_forward(gpu, &u, &mut s.f.view_mut(0..nh)?)?;
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("mlp.fc2.weight"), &name("mlp.fc2.bias"))?;
                let f = s.f.view(0..nh)?;
                linear_weight_grads(gpu, gemm, &f, &dy, rows, hd, d, &mut dw, &mut db, &mut s.bias_grad)?;
            }
            linear_input_grad(gemm, &dy, &w16("mlp.fc2.weight")?, rows, hd, d, &mut s.df.view_mut(0..nh)?, 0.0)?;
            gelu::cuda_backward(gpu, &u, &s.df.view(0..nh)?, &mut s.du.view_mut(0..nh)?)?;
            let du = s.du.view(0..nh)?;
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("mlp.fc1.weight"), &name("mlp.fc1.bias"))?;
                linear_weight_grads(gpu, gemm, &cn, &du, rows, d, hd, &mut dw, &mut db, &mut s.bias_grad)?;
            }
            linear_input_grad(gemm, &du, &w16("mlp.fc1.weight")?, rows, d, hd, &mut s.dc.view_mut(0..nd)?, 0.0)?;
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("norm2.weight"), &name("norm2.bias"))?;
                layernorm::cuda_backward(
                    gpu,
                    &blk.x_mid.view(0..nd)?,
                    &s.dc.view(0..nd)?,
                    &w32("norm2.weight")?,
                    &blk.mean2.view(0..rows)?,
                    &blk.rstd2.view(0..rows)?,
                    rows,
                    d,
                    &mut dx,
                    true,
                    &mut dw,
                    &mut db,
                )?;
            }

            // x_mid = x_in + s1 * ls1 * y1.
            residual::cuda_layer_scale_backward(
                gpu,
                &ls,
                &dx,
                &blk.y1.view(0..nd)?,
                &w32("ls1.gamma")?,
                &dp(i, 0)?,
                &mut dy,
                &mut grads.view_mut(range(&name("ls1.gamma"))?)?,
            )?;
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("attn.proj.weight"), &name("attn.proj.bias"))?;
                linear_weight_grads(gpu, gemm, &o, &dy, rows, d, d, &mut dw, &mut db, &mut s.bias_grad)?;
            }
            linear_input_grad(gemm, &dy, &w16("attn.proj.weight")?, rows, d, d, &mut s.d_o.view_mut(0..nd)?, 0.0)?;
            attention::cuda_backward(
                gpu,
                &att,
                &blk.q.view(0..nd)?,
                &blk.k.view(0..kvd)?,
                &blk.v.view(0..kvd)?,
                &o,
                &blk.lse.view(0..att.lse_len())?,
                &s.d_o.view(0..nd)?,
                &mut s.dq.view_mut(0..nd)?,
                &mut s.dk.view_mut(0..kvd)?,
                &mut s.dv.view_mut(0..kvd)?,
            )?;
            let dq = s.dq.view(0..nd)?;
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("attn.q.weight"), &name("attn.q.bias"))?;
                linear_weight_grads(gpu, gemm, &a, &dq, rows, d, d, &mut dw, &mut db, &mut s.bias_grad)?;
            }
            let mut da = s.da.view_mut(0..nd)?;
            linear_input_grad(gemm, &dq, &w16("attn.q.weight")?, rows, d, d, &mut da, 0.0)?;
            // Keys and values: their input rows gathered again, their input gradient scattered
            // back into the first N + P rows of each sample.
            residual::cuda_copy_rows(gpu, &RowCopy::gather(b, d, r, 0, lk), &a, &mut s.a_h.view_mut(0..kvd)?, false)?;
            let a_h = s.a_h.view(0..kvd)?;
            let (dk, dv) = (s.dk.view(0..kvd)?, s.dv.view(0..kvd)?);
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("attn.kv.weight"), &name("attn.kv.bias"))?;
                let (dwk, dbk) = (&mut dw.view_mut(0..d * d)?, &mut db.view_mut(0..d)?);
                linear_weight_grads(gpu, gemm, &a_h, &dk, kv, d, d, dwk, dbk, &mut s.bias_grad)?;
                let (dwv, dbv) = (&mut dw.view_mut(d * d..2 * d * d)?, &mut db.view_mut(d..2 * d)?);
                linear_weight_grads(gpu, gemm, &a_h, &dv, kv, d, d, dwv, dbv, &mut s.bias_grad)?;
            }
            let wkv = w16("attn.kv.weight")?;
            let (wk, wv) = (wkv.view(0..d * d)?, wkv.view(d * d..2 * d * d)?);
            let mut da_h = s.da_h.view_mut(0..kvd)?;
            linear_input_grad(gemm, &dk, &wk, kv, d, d, &mut da_h, 0.0)?;
            linear_input_grad(gemm, &dv, &wv, kv, d, d, &mut da_h, 1.0)?;
            residual::cuda_copy_rows(gpu, &RowCopy::scatter(b, d, r, 0, lk), &da_h, &mut da, true)?;
            {
                let [mut dw, mut db] = grad_pair(layout, grads, &name("norm1.weight"), &name("norm1.bias"))?;
                layernorm::cuda_backward(
                    gpu,
                    &x_in,
                    &da,
                    &w32("norm1.weight")?,
                    &blk.mean1.view(0..rows)?,
                    &blk.rstd1.view(0..rows)?,
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
        let names =
            ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "mask_positional_token"];
        let [r0, r1, r2, r3, r4] = names.map(range);
        let [mut dw, mut db, mut dpos, mut dcls, mut dmask] = grads.views_mut([r0?, r1?, r2?, r3?, r4?])?;
        patch_embed::cuda_backward(
            gpu,
            &pe,
            DevicePixels::F32 { chw: &img },
            &rk,
            &dx,
            &mut dw,
            &mut db,
            &mut dpos,
            &mut dcls,
            &mut dmask,
        )?;
        Ok(out)
    }
}
