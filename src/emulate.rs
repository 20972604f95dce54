//! The GPU backend's bf16 roundings, emulated on the CPU: [`Bf16Emulation`] is a [`Backend`] that
//! runs the CPU reference of every op in f32 and rounds each output the CUDA backend stores as
//! bf16 to bf16, where the CUDA backend rounds it. The model ([`crate::model::net::step`]) over it
//! shows, on any machine, how far bf16 activations take the model from the float64 truth: the
//! error the GPU model should show on the golden cases, give or take the kernels' summation orders
//! (GEMM accumulation, dot products), which this does not model.
//!
//! What is rounded, as on the GPU (see [`crate::model::cuda`], "Numerics"):
//! - every activation and activation gradient (LayerNorm, Linear, GELU, attention, layer scale,
//!   row copies that add, patch embedding outputs; Linear and LayerNorm input gradients, also when
//!   they add to an existing gradient: the sum is rounded once);
//! - the GEMMs' weights (the caller passes the bf16-rounded parameters as [`Weights::act`]) and
//!   the patch embedding's pixels (the `hwc` and `chw` kernels build their A tiles in bf16; the
//!   default `hwc-ws-raw` forward on compute capability 9.0 holds its pixels exactly and rounds
//!   a scaled f16 copy of the weight instead, which this does not model);
//! - the cross-entropy's logits before the bias, and its input gradient
//!   ([`CpuPrecision::GpuRounding`]);
//! - inside the attention kernels: P for P V (against the forward's lazy running max), and P and
//!   dS = P (dP - delta) for the backward's products
//!   ([`attention::cpu_forward_kernel_rounding`], [`attention::cpu_backward_kernel_rounding`]).
//!
//! Statistics (LayerNorm mean and 1/std, logsumexp), parameters, and parameter gradients stay f32.
//!
//! [`Weights::act`]: crate::model::net::Weights

use std::ops::Range;

use crate::backend::{
    add_column_sums, AdamWStep, AttentionShape, Backend, CeGrads, CeRows, CpuBackend, PixelView, Scalar,
};
use crate::cpu::round_bf16;
use crate::error::Result;
use crate::ops::attention;
use crate::ops::cross_entropy::{self, CpuPrecision, CrossEntropyShape, CrossEntropyStats};
use crate::ops::patch_embed::{self, PatchEmbedShape, Pixels};
use crate::ops::residual::{LayerScaleShape, RowCopy};

/// The CPU backend with the CUDA backend's bf16 roundings (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct Bf16Emulation;

/// The normalized pixels as the GPU kernels hold them: f32 `[B, 3, S, S]` rounded to bf16 (their A
/// tiles are bf16), from either form.
fn bf16_pixels(shape: &PatchEmbedShape, images: PixelView<'_, Bf16Emulation>) -> Result<Vec<f32>> {
    Ok(match images {
        PixelView::F32(chw) => rounded(chw),
        PixelView::U8 { hwc, norm } => rounded(&patch_embed::normalize_u8(shape, hwc, &norm)?),
    })
}

/// A copy of `x` rounded to bf16.
pub fn rounded(x: &[f32]) -> Vec<f32> {
    let mut v = x.to_vec();
    round_bf16(&mut v);
    v
}

const CPU: CpuBackend = CpuBackend;

impl Backend for Bf16Emulation {
    type Act = f32;
    type Buf<T: Scalar> = Vec<T>;
    type Ref<'a, T: Scalar> = &'a [T];
    type Mut<'a, T: Scalar> = &'a mut [T];

    fn name(&self) -> &'static str {
        "cpu (bf16 emulation)"
    }

    fn alloc<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        CPU.alloc(len)
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Vec<T>> {
        CPU.upload(host)
    }

    fn view<T: Scalar>(buf: &Vec<T>, range: Range<usize>) -> Result<&[T]> {
        CpuBackend::view(buf, range)
    }

    fn view_mut<T: Scalar>(buf: &mut Vec<T>, range: Range<usize>) -> Result<&mut [T]> {
        CpuBackend::view_mut(buf, range)
    }

    fn sub<'a, T: Scalar>(view: &'a [T], range: Range<usize>) -> Result<&'a [T]>
    where
        'a: 'a,
    {
        CpuBackend::sub(view, range)
    }

    fn sub_mut<'b, T: Scalar>(view: &'b mut &mut [T], range: Range<usize>) -> Result<&'b mut [T]> {
        CpuBackend::sub_mut(view, range)
    }

    fn split_mut<'a, T: Scalar, const K: usize>(
        view: &'a mut [T],
        ranges: [Range<usize>; K],
    ) -> Result<[&'a mut [T]; K]>
    where
        'a: 'a,
    {
        CpuBackend::split_mut(view, ranges)
    }

    fn freeze<'b, T: Scalar>(view: &'b &mut [T]) -> &'b [T] {
        view
    }

    fn len<T: Scalar>(view: &[T]) -> usize {
        view.len()
    }

    fn copy_from_host<T: Scalar>(&self, host: &[T], dst: &mut &mut [T]) -> Result<()> {
        CPU.copy_from_host(host, dst)
    }

    fn to_host<T: Scalar>(&self, src: &[T]) -> Result<Vec<T>> {
        CPU.to_host(src)
    }

    fn act_to_host_f32(&self, src: &[f32]) -> Result<Vec<f32>> {
        CPU.act_to_host_f32(src)
    }

    fn fill_zero<T: Scalar>(&self, dst: &mut &mut [T]) -> Result<()> {
        CPU.fill_zero(dst)
    }

    fn f32_to_act(&self, src: &[f32], dst: &mut &mut [f32]) -> Result<()> {
        CPU.f32_to_act(src, dst)?;
        round_bf16(dst);
        Ok(())
    }

    fn layernorm_forward(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        rows: usize,
        cols: usize,
        y: &mut &mut [f32],
        mean: &mut &mut [f32],
        rstd: &mut &mut [f32],
    ) -> Result<()> {
        CPU.layernorm_forward(x, weight, bias, eps, rows, cols, y, mean, rstd)?;
        round_bf16(y);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        x: &[f32],
        dy: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut &mut [f32],
        accumulate_dx: bool,
        dweight: &mut &mut [f32],
        dbias: &mut &mut [f32],
    ) -> Result<()> {
        CPU.layernorm_backward(x, dy, weight, mean, rstd, rows, cols, dx, accumulate_dx, dweight, dbias)?;
        round_bf16(dx);
        Ok(())
    }

    fn gelu_forward(&self, x: &[f32], y: &mut &mut [f32]) -> Result<()> {
        CPU.gelu_forward(x, y)?;
        round_bf16(y);
        Ok(())
    }

    fn gelu_backward(&self, x: &[f32], dy: &[f32], dx: &mut &mut [f32]) -> Result<()> {
        CPU.gelu_backward(x, dy, dx)?;
        round_bf16(dx);
        Ok(())
    }

    fn gelu_backward_recompute(
        &self,
        x: &[f32],
        dy: &[f32],
        cols: usize,
        dx: &mut &mut [f32],
        y: &mut &mut [f32],
        dx_col_sums: &mut &mut [f32],
    ) -> Result<()> {
        // The GPU sums dx as it stores it, in bf16.
        self.gelu_forward(x, y)?;
        self.gelu_backward(x, dy, dx)?;
        add_column_sums(dx, cols, dx_col_sums)
    }

    fn linear(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        rows: usize,
        inp: usize,
        out: usize,
        y: &mut &mut [f32],
    ) -> Result<()> {
        CPU.linear(x, w, b, rows, inp, out, y)?;
        round_bf16(y);
        Ok(())
    }

    fn linear_weight_grads(
        &self,
        x: &[f32],
        dy: &[f32],
        rows: usize,
        inp: usize,
        out: usize,
        dw: &mut &mut [f32],
        db: Option<&mut &mut [f32]>,
        scratch: &mut &mut [f32],
    ) -> Result<()> {
        CPU.linear_weight_grads(x, dy, rows, inp, out, dw, db, scratch)
    }

    fn linear_input_grad(
        &self,
        dy: &[f32],
        w: &[f32],
        rows: usize,
        inp: usize,
        out: usize,
        dx: &mut &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        CPU.linear_input_grad(dy, w, rows, inp, out, dx, accumulate)?;
        round_bf16(dx);
        Ok(())
    }

    fn attention_forward(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &mut &mut [f32],
        lse: &mut &mut [f32],
    ) -> Result<()> {
        attention::cpu_forward_kernel_rounding(shape, q, k, v, o, lse)?;
        round_bf16(o);
        Ok(())
    }

    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
        dq: &mut &mut [f32],
        dk: &mut &mut [f32],
        dv: &mut &mut [f32],
    ) -> Result<()> {
        attention::cpu_backward_kernel_rounding(shape, q, k, v, o, lse, d_o, dq, dk, dv)?;
        round_bf16(dq);
        round_bf16(dk);
        round_bf16(dv);
        Ok(())
    }

    fn layer_scale_forward(
        &self,
        shape: &LayerScaleShape,
        x: &[f32],
        y: &[f32],
        gamma: &[f32],
        scale: &[f32],
        out: &mut &mut [f32],
    ) -> Result<()> {
        CPU.layer_scale_forward(shape, x, y, gamma, scale, out)?;
        round_bf16(out);
        Ok(())
    }

    fn layer_scale_backward(
        &self,
        shape: &LayerScaleShape,
        dout: &[f32],
        y: &[f32],
        gamma: &[f32],
        scale: &[f32],
        dy: &mut &mut [f32],
        dgamma: &mut &mut [f32],
        dy_col_sums: Option<&mut &mut [f32]>,
    ) -> Result<()> {
        CPU.layer_scale_backward(shape, dout, y, gamma, scale, dy, dgamma, None)?;
        round_bf16(dy);
        // The GPU sums dy as it stores it, in bf16.
        match dy_col_sums {
            Some(sums) => add_column_sums(dy, shape.cols, sums),
            None => Ok(()),
        }
    }

    fn copy_rows(&self, copy: &RowCopy, src: &[f32], dst: &mut &mut [f32], accumulate: bool) -> Result<()> {
        CPU.copy_rows(copy, src, dst, accumulate)?;
        if accumulate {
            round_bf16(dst);
        }
        Ok(())
    }

    fn patch_embed_forward(
        &self,
        shape: &PatchEmbedShape,
        images: PixelView<'_, Self>,
        ranks: &[i32],
        weight: &[f32],
        bias: &[f32],
        pos_embed: &[f32],
        cls_token: &[f32],
        mask_token: &[f32],
        out: &mut &mut [f32],
    ) -> Result<()> {
        let pixels = bf16_pixels(shape, images)?;
        patch_embed::cpu_forward_f32(shape, &pixels, ranks, weight, bias, pos_embed, cls_token, mask_token, out)?;
        round_bf16(out);
        Ok(())
    }

    fn patch_embed_backward(
        &self,
        shape: &PatchEmbedShape,
        images: PixelView<'_, Self>,
        ranks: &[i32],
        d_out: &[f32],
        dweight: &mut &mut [f32],
        dbias: &mut &mut [f32],
        dpos_embed: &mut &mut [f32],
        dcls_token: &mut &mut [f32],
        dmask_token: &mut &mut [f32],
    ) -> Result<()> {
        let chw = bf16_pixels(shape, images)?;
        let pixels = Pixels::F32 { chw: &chw };
        patch_embed::cpu_backward(shape, pixels, ranks, d_out, dweight, dbias, dpos_embed, dcls_token, dmask_token)
    }

    fn cross_entropy(
        &self,
        shape: &CrossEntropyShape,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        targets: &[i32],
        rows_out: &mut CeRows<Self>,
        grads: Option<CeGrads<'_, '_, Self>>,
    ) -> Result<CrossEntropyStats> {
        let p = CpuPrecision::GpuRounding;
        let stats = cross_entropy::cpu_forward_with(p, shape, x, w, b, targets, rows_out)?;
        if let Some(g) = grads {
            cross_entropy::cpu_backward_with(p, shape, x, w, b, targets, g.dloss, g.dx, g.dw, g.db)?;
        }
        Ok(stats)
    }

    fn ce_rows(&self, rows: usize) -> Result<CeRows<Self>> {
        CPU.ce_rows(rows)
    }

    fn logits_to_host(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<Vec<f32>> {
        // bf16(x W^T) + b in f32, as the GPU backend reports them.
        let mut logits = CPU.logits_to_host(x, w, &vec![0.0; vocab], rows, dim, vocab)?;
        round_bf16(&mut logits);
        for row in logits.chunks_exact_mut(vocab) {
            for (l, &bb) in row.iter_mut().zip(b) {
                *l += bb;
            }
        }
        Ok(logits)
    }

    fn adamw_step(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        decay_mask: &Vec<u8>,
        step: &AdamWStep,
        copy: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        match copy {
            Some(c) => {
                CPU.adamw_step(param, grad, m, v, decay_mask, step, Some(&mut *c))?;
                round_bf16(c);
            }
            None => CPU.adamw_step(param, grad, m, v, decay_mask, step, None)?,
        }
        Ok(())
    }

    fn l2_norm(&self, x: &Vec<f32>) -> Result<f32> {
        CPU.l2_norm(x)
    }
}
