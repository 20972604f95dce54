//! The whole two-stream MaPeT forward and backward on the CPU, in f32, composed from the ops'
//! CPU references. It is the model's reference: `mapet check-step` runs it on the golden cases,
//! and the GPU model is checked against it.
//!
//! Layout (rank order, see [`crate::ops::attention`]): each sample has R = N + 2P rows of width D,
//! the N content tokens by rank, the P mask tokens of the content stream h by rank, then the P
//! query-stream rows g. All per-row work (LayerNorm, the q projection, MLP, residuals) runs over
//! all B·R rows at once, since both streams share the weights; keys and values come from the first
//! N + P rows of each sample only.
//!
//! ```text
//! x   = patch_embed(images, ranks)                         [B, R, D]
//! per block:  a = LN1(x);  q = a Wq^T + bq;  [k, v] = a_h Wkv^T + bkv
//!             o = attention(q, k, v);  x += dp1 * ls1 * (o Wproj^T + bproj)
//!             c = LN2(x);  x += dp2 * ls2 * (GELU(c W1^T + b1) W2^T + b2)
//! logits = LN(x_g) Wdec^T + bdec;  loss = mean CE over the B·P predicted tokens
//! ```
//! `dp` is drop path: one scale per sample and residual branch (0, or 1/keep), shared by both
//! streams of the sample; all ones in eval mode.

use rand::Rng;

use crate::cpu::sgemm;
use crate::error::{check_len, Error, Result};
use crate::model::params::{ModelConfig, ParamLayout};
use crate::ops::attention::{self, AttentionShape};
use crate::ops::cross_entropy::{self, CpuRowOutputs, CrossEntropyShape, CrossEntropyStats};
use crate::ops::patch_embed::{self, PatchEmbedShape, Pixels};
use crate::ops::{gelu, layernorm};
use crate::perm;

/// LayerNorm epsilon of every norm in the model.
pub const LN_EPS: f32 = 1e-6;

/// One batch in the form the model consumes.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Images in the batch.
    pub batch: usize,
    /// Normalized pixels [B, 3, H, W].
    pub images: Vec<f32>,
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
        check_len("batch.tokens", self.tokens.len(), self.batch * (n - 1))?;
        check_len("batch.ranks", self.ranks.len(), self.batch * n)?;
        for (b, r) in self.ranks.chunks_exact(n).enumerate() {
            let r: Vec<u32> = r.iter().map(|&x| x.max(0) as u32).collect();
            perm::validate_ranks(&r).map_err(|e| Error::Shape {
                tensor: "batch.ranks",
                expected: "a permutation of 0..N with rank 0 for CLS".into(),
                got: format!("sample {b}: {e}"),
            })?;
        }
        if let Some((i, &t)) = self.tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= config.vocab) {
            return Err(Error::Shape {
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
}

/// Activations of one block saved for backward.
struct BlockCache {
    x_in: Vec<f32>,
    a: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    a_h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    y1: Vec<f32>,
    x_mid: Vec<f32>,
    c: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    u: Vec<f32>,
    f: Vec<f32>,
    y2: Vec<f32>,
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

/// The model on the CPU: a layout plus scratch; parameters and gradients are flat buffers.
pub struct CpuModel {
    /// Parameter layout (config, names, offsets).
    pub layout: ParamLayout,
}

/// Per-row drop-path scales for one residual branch: `scale[b]` repeated over the sample's rows.
fn row_scales(per_sample: &[f32], rows_per_sample: usize) -> Vec<f32> {
    per_sample.iter().flat_map(|&s| std::iter::repeat_n(s, rows_per_sample)).collect()
}

/// y[rows, out] = x[rows, in] W^T + b, W stored [out, in].
fn linear(x: &[f32], w: &[f32], b: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * out];
    for row in y.chunks_exact_mut(out) {
        row.copy_from_slice(b);
    }
    sgemm(rows, out, inp, 1.0, x, w, true, 1.0, &mut y);
    y
}

/// Backward of [`linear`]: dW += dy^T x, db += column sums of dy; returns dx = dy W.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    dw: &mut [f32],
    db: &mut [f32],
) -> Vec<f32> {
    crate::cpu::sgemm_tn(out, inp, rows, 1.0, dy, x, 1.0, dw);
    for row in dy.chunks_exact(out) {
        for (g, &d) in db.iter_mut().zip(row) {
            *g += d;
        }
    }
    let mut dx = vec![0.0f32; rows * inp];
    sgemm(rows, inp, out, 1.0, dy, w, false, 0.0, &mut dx);
    dx
}

impl CpuModel {
    /// A model of `config`.
    pub fn new(config: ModelConfig) -> Result<Self> {
        Ok(CpuModel { layout: ParamLayout::new(config)? })
    }

    fn p<'a>(&self, params: &'a [f32], name: &str) -> &'a [f32] {
        &params[self.layout.get(name).expect("every name used here is in the layout").range()]
    }

    /// Drop-path rate of block `i`: linear from 0 at the first block to `max_rate` at the last.
    pub fn drop_path_rate(&self, i: usize, max_rate: f32) -> f32 {
        let depth = self.layout.config.depth;
        if depth <= 1 {
            0.0
        } else {
            max_rate * i as f32 / (depth - 1) as f32
        }
    }

    /// Per-sample drop-path scales for every block and both branches: `[depth][2][B]`, 1/keep or
    /// 0, drawn from `rng`; all ones when `max_rate` is 0 (eval).
    pub fn draw_drop_path(&self, batch: usize, max_rate: f32, rng: &mut impl Rng) -> Vec<[Vec<f32>; 2]> {
        (0..self.layout.config.depth)
            .map(|i| {
                let rate = self.drop_path_rate(i, max_rate);
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

    /// Forward and, when `grads` is given, backward of one batch. `drop_path` is from
    /// [`Self::draw_drop_path`] (or `None` for eval mode). Gradients are accumulated (+=) into
    /// `grads`, a flat buffer of the layout's size. `want_logits` also returns the logits.
    pub fn step(
        &self,
        params: &[f32],
        batch: &Batch,
        drop_path: Option<&[[Vec<f32>; 2]]>,
        grads: Option<&mut [f32]>,
        want_logits: bool,
    ) -> Result<ForwardOutput> {
        let cfg = self.layout.config;
        check_len("parameters", params.len(), self.layout.total)?;
        batch.validate(&cfg)?;
        let (b, n, c, pr, d) = (batch.batch, cfg.n_tokens(), cfg.context, cfg.n_pred(), cfg.dim);
        let r = cfg.rows_per_sample();
        let lk = n + pr;
        let rows = b * r;
        let ones = vec![1.0f32; b];
        let dp = |i: usize, j: usize| -> &[f32] { drop_path.map_or(&ones[..], |dp| &dp[i][j][..]) };
        let att = AttentionShape { batch: b, heads: cfg.heads, head_dim: cfg.head_dim(), n_tokens: n, n_context: c };
        let pe = PatchEmbedShape { batch: b, image: cfg.image, patch: cfg.patch, dim: d, n_context: c };

        // Patch embedding into rank order.
        let mut x = vec![0.0f32; rows * d];
        patch_embed::cpu_forward_f32(
            &pe,
            &batch.images,
            &batch.ranks,
            self.p(params, "patch_embed.proj.weight"),
            self.p(params, "patch_embed.proj.bias"),
            self.p(params, "pos_embed"),
            self.p(params, "cls_token"),
            self.p(params, "mask_positional_token"),
            &mut x,
        )?;

        let mut caches = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let w = |s: &str| self.p(params, &format!("blocks.{i}.{s}"));
            let x_in = x;
            let (mut a, mut mean1, mut rstd1) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            layernorm::cpu_forward(
                &x_in,
                w("norm1.weight"),
                w("norm1.bias"),
                LN_EPS,
                rows,
                d,
                &mut a,
                &mut mean1,
                &mut rstd1,
            )?;
            let q = linear(&a, w("attn.q.weight"), w("attn.q.bias"), rows, d, d);
            // Keys and values from the content stream: the first N + P rows of each sample.
            let a_h: Vec<f32> = a.chunks_exact(r * d).flat_map(|s| s[..lk * d].iter().copied()).collect();
            let (wkv, bkv) = (w("attn.kv.weight"), w("attn.kv.bias"));
            let k = linear(&a_h, &wkv[..d * d], &bkv[..d], b * lk, d, d);
            let v = linear(&a_h, &wkv[d * d..], &bkv[d..], b * lk, d, d);
            let (mut o, mut lse) = (vec![0.0; rows * d], vec![0.0; att.lse_len()]);
            attention::cpu_forward(&att, &q, &k, &v, &mut o, &mut lse)?;
            let y1 = linear(&o, w("attn.proj.weight"), w("attn.proj.bias"), rows, d, d);
            let s1 = row_scales(dp(i, 0), r);
            let ls1 = w("ls1.gamma");
            let mut x_mid = x_in.clone();
            for ((xr, yr), &s) in x_mid.chunks_exact_mut(d).zip(y1.chunks_exact(d)).zip(&s1) {
                for ((xv, &yv), &g) in xr.iter_mut().zip(yr).zip(ls1) {
                    *xv += s * g * yv;
                }
            }
            let (mut cn, mut mean2, mut rstd2) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            layernorm::cpu_forward(
                &x_mid,
                w("norm2.weight"),
                w("norm2.bias"),
                LN_EPS,
                rows,
                d,
                &mut cn,
                &mut mean2,
                &mut rstd2,
            )?;
            let u = linear(&cn, w("mlp.fc1.weight"), w("mlp.fc1.bias"), rows, d, 4 * d);
            let mut f = vec![0.0; u.len()];
            gelu::cpu_forward(&u, &mut f)?;
            let y2 = linear(&f, w("mlp.fc2.weight"), w("mlp.fc2.bias"), rows, 4 * d, d);
            let s2 = row_scales(dp(i, 1), r);
            let ls2 = w("ls2.gamma");
            let mut x_out = x_mid.clone();
            for ((xr, yr), &s) in x_out.chunks_exact_mut(d).zip(y2.chunks_exact(d)).zip(&s2) {
                for ((xv, &yv), &g) in xr.iter_mut().zip(yr).zip(ls2) {
                    *xv += s * g * yv;
                }
            }
            x = x_out;
            caches.push(BlockCache {
                x_in,
                a,
                mean1,
                rstd1,
                a_h,
                q,
                k,
                v,
                o,
                lse,
                y1,
                x_mid,
                c: cn,
                mean2,
                rstd2,
                u,
                f,
                y2,
            });
        }

        // Head on the query stream: rows N + P .. R of each sample, in rank order.
        let xg: Vec<f32> = x.chunks_exact(r * d).flat_map(|s| s[lk * d..].iter().copied()).collect();
        let gr = b * pr;
        let (mut z, mut meanf, mut rstdf) = (vec![0.0; gr * d], vec![0.0; gr], vec![0.0; gr]);
        layernorm::cpu_forward(
            &xg,
            self.p(params, "norm.weight"),
            self.p(params, "norm.bias"),
            LN_EPS,
            gr,
            d,
            &mut z,
            &mut meanf,
            &mut rstdf,
        )?;
        let targets = self.targets(batch);
        let ce = CrossEntropyShape::new(gr, d, cfg.vocab);
        let (wdec, bdec) = (self.p(params, "decoder.weight"), self.p(params, "decoder.bias"));
        let mut rows_out = CpuRowOutputs::new(gr);
        let stats = cross_entropy::cpu_forward(&ce, &z, wdec, bdec, &targets, &mut rows_out)?;
        let logits = want_logits.then(|| linear(&z, wdec, bdec, gr, d, cfg.vocab));
        let out = ForwardOutput { loss: stats.loss, stats, logits };

        let Some(grads) = grads else { return Ok(out) };
        check_len("gradients", grads.len(), self.layout.total)?;
        let range = |name: &str| self.layout.get(name).expect("known name").range();

        // Decoder + loss.
        let mut dz = vec![0.0f32; gr * d];
        {
            let (rw, rb) = (range("decoder.weight"), range("decoder.bias"));
            let (dw, db) = split_two(grads, rw, rb);
            cross_entropy::cpu_backward(&ce, &z, wdec, bdec, &targets, 1.0, &mut dz, dw, db)?;
        }
        let mut dxg = vec![0.0f32; gr * d];
        {
            let (dw, db) = split_two(grads, range("norm.weight"), range("norm.bias"));
            layernorm::cpu_backward(
                &xg,
                &dz,
                self.p(params, "norm.weight"),
                &meanf,
                &rstdf,
                gr,
                d,
                &mut dxg,
                false,
                dw,
                db,
            )?;
        }
        let mut dx = vec![0.0f32; rows * d];
        for (sample, g) in dx.chunks_exact_mut(r * d).zip(dxg.chunks_exact(pr * d)) {
            sample[lk * d..].copy_from_slice(g);
        }

        for i in (0..cfg.depth).rev() {
            let cache = &caches[i];
            let name = |s: &str| format!("blocks.{i}.{s}");
            let w = |s: &str| self.p(params, &name(s));
            // x_out = x_mid + s2 * ls2 * y2
            let s2 = row_scales(dp(i, 1), r);
            let ls2 = w("ls2.gamma");
            let mut dy2 = vec![0.0f32; rows * d];
            {
                let dls2 = &mut grads[range(&name("ls2.gamma"))];
                for (((dyr, dxr), yr), &s) in
                    dy2.chunks_exact_mut(d).zip(dx.chunks_exact(d)).zip(cache.y2.chunks_exact(d)).zip(&s2)
                {
                    for j in 0..d {
                        dyr[j] = dxr[j] * s * ls2[j];
                        dls2[j] += dxr[j] * s * yr[j];
                    }
                }
            }
            let df = {
                let (dw, db) = split_two(grads, range(&name("mlp.fc2.weight")), range(&name("mlp.fc2.bias")));
                linear_backward(&cache.f, w("mlp.fc2.weight"), &dy2, rows, 4 * d, d, dw, db)
            };
            let mut du = vec![0.0f32; df.len()];
            gelu::cpu_backward(&cache.u, &df, &mut du)?;
            let dc = {
                let (dw, db) = split_two(grads, range(&name("mlp.fc1.weight")), range(&name("mlp.fc1.bias")));
                linear_backward(&cache.c, w("mlp.fc1.weight"), &du, rows, d, 4 * d, dw, db)
            };
            {
                let (dw, db) = split_two(grads, range(&name("norm2.weight")), range(&name("norm2.bias")));
                let (m2, r2) = (&cache.mean2, &cache.rstd2);
                layernorm::cpu_backward(&cache.x_mid, &dc, w("norm2.weight"), m2, r2, rows, d, &mut dx, true, dw, db)?;
            }
            // x_mid = x_in + s1 * ls1 * y1
            let s1 = row_scales(dp(i, 0), r);
            let ls1 = w("ls1.gamma");
            let mut dy1 = vec![0.0f32; rows * d];
            {
                let dls1 = &mut grads[range(&name("ls1.gamma"))];
                for (((dyr, dxr), yr), &s) in
                    dy1.chunks_exact_mut(d).zip(dx.chunks_exact(d)).zip(cache.y1.chunks_exact(d)).zip(&s1)
                {
                    for j in 0..d {
                        dyr[j] = dxr[j] * s * ls1[j];
                        dls1[j] += dxr[j] * s * yr[j];
                    }
                }
            }
            let d_o = {
                let (dw, db) = split_two(grads, range(&name("attn.proj.weight")), range(&name("attn.proj.bias")));
                linear_backward(&cache.o, w("attn.proj.weight"), &dy1, rows, d, d, dw, db)
            };
            let (mut dq, mut dk, mut dv) = (vec![0.0; rows * d], vec![0.0; b * lk * d], vec![0.0; b * lk * d]);
            attention::cpu_backward(
                &att, &cache.q, &cache.k, &cache.v, &cache.o, &cache.lse, &d_o, &mut dq, &mut dk, &mut dv,
            )?;
            let mut da = {
                let (dw, db) = split_two(grads, range(&name("attn.q.weight")), range(&name("attn.q.bias")));
                linear_backward(&cache.a, w("attn.q.weight"), &dq, rows, d, d, dw, db)
            };
            let da_h = {
                let (rw, rb) = (range(&name("attn.kv.weight")), range(&name("attn.kv.bias")));
                let wkv = w("attn.kv.weight");
                let (dwkv, dbkv) = split_two(grads, rw, rb);
                let (dwk, dwv) = dwkv.split_at_mut(d * d);
                let (dbk, dbv) = dbkv.split_at_mut(d);
                let mut da_h = linear_backward(&cache.a_h, &wkv[..d * d], &dk, b * lk, d, d, dwk, dbk);
                let da_v = linear_backward(&cache.a_h, &wkv[d * d..], &dv, b * lk, d, d, dwv, dbv);
                for (x, y) in da_h.iter_mut().zip(&da_v) {
                    *x += y;
                }
                da_h
            };
            for (sample, h) in da.chunks_exact_mut(r * d).zip(da_h.chunks_exact(lk * d)) {
                for (x, y) in sample[..lk * d].iter_mut().zip(h) {
                    *x += y;
                }
            }
            {
                let (dw, db) = split_two(grads, range(&name("norm1.weight")), range(&name("norm1.bias")));
                let (m1, r1) = (&cache.mean1, &cache.rstd1);
                layernorm::cpu_backward(&cache.x_in, &da, w("norm1.weight"), m1, r1, rows, d, &mut dx, true, dw, db)?;
            }
        }

        // Patch embedding.
        let names =
            ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "mask_positional_token"];
        let [dw, db, dpos, dcls, dmask] = split_many(grads, names.map(range));
        patch_embed::cpu_backward(
            &pe,
            Pixels::F32 { chw: &batch.images },
            &batch.ranks,
            &dx,
            dw,
            db,
            dpos,
            dcls,
            dmask,
        )?;
        Ok(out)
    }

    /// Targets of the query rows in rank order: row j of sample b predicts the token of rank
    /// C + j, whose target is `tokens[b][token - 1]`.
    pub fn targets(&self, batch: &Batch) -> Vec<i32> {
        let cfg = self.layout.config;
        let (n, c) = (cfg.n_tokens(), cfg.context);
        let mut t = Vec::with_capacity(batch.batch * cfg.n_pred());
        for (ranks, tokens) in batch.ranks.chunks_exact(n).zip(batch.tokens.chunks_exact(n - 1)) {
            let r: Vec<u32> = ranks.iter().map(|&x| x as u32).collect();
            let order = perm::order_from_ranks(&r);
            t.extend(order[c..].iter().map(|&tok| tokens[tok as usize - 1]));
        }
        t
    }
}

/// Two disjoint mutable ranges of one buffer.
fn split_two(buf: &mut [f32], a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> (&mut [f32], &mut [f32]) {
    let [x, y] = split_many(buf, [a, b]);
    (x, y)
}

/// `K` disjoint mutable ranges of one buffer (panics on overlap: the layout never overlaps).
fn split_many<const K: usize>(buf: &mut [f32], ranges: [std::ops::Range<usize>; K]) -> [&mut [f32]; K] {
    buf.get_disjoint_mut(ranges).expect("parameter ranges are disjoint and in bounds")
}
