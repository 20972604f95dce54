//! The two backends of every op behind one trait (DESIGN.md, "Two backends, one model"). The
//! model ([`crate::model::net`]) is written once over [`Backend`]; so is the training step.
//!
//! - [`CpuBackend`]: f32 everywhere, `Vec` storage, slices as views. The reference.
//! - [`CudaBackend`]: bf16 activations, f32 statistics, parameters and gradients, in device
//!   buffers; [`DeviceView`] / [`DeviceViewMut`] as views.
//!
//! # Storage
//!
//! A backend names three storage types, each generic over the element:
//!
//! | | CPU | CUDA |
//! |---|---|---|
//! | [`Backend::Buf`] (owned) | `Vec<T>` | [`DeviceBuffer<T>`] |
//! | [`Backend::Ref`] (shared view, `Copy`) | `&[T]` | [`DeviceView<T>`] |
//! | [`Backend::Mut`] (exclusive view) | `&mut [T]` | [`DeviceViewMut<T>`] |
//!
//! Ops take `Ref`s by value and write through `&mut Mut`s, so that code over the trait borrows
//! parts of flat buffers (a parameter inside the flat parameter buffer, the first `B·R` rows of an
//! activation allocated for a larger batch) the way it would borrow sub-slices. The activation
//! element is [`Backend::Act`]: `f32` on the CPU, `bf16` on the GPU. Parameters exist in two
//! precisions: the f32 master copy (read by LayerNorm, layer scale, the patch embedding's bias and
//! tokens, the decoder bias) and an `Act` copy the GEMMs read (on the CPU, the master itself).
//!
//! The op methods forward to the op's module in [`crate::ops`], where the CPU reference and the
//! CUDA launcher sit side by side with the host checks they share; the Linear layers call the CPU
//! GEMM ([`crate::cpu::sgemm`]) or cuBLASLt ([`crate::cuda::gemm`]) directly. Shapes are given
//! explicitly; every implementation checks its buffers against them and returns
//! [`crate::Error::Shape`] naming the tensor at fault.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::bf16;

use crate::cpu::{sgemm, sgemm_tn};
use crate::cuda::gemm::{self, Epilogue, Gemm, Vector, VectorMut};
use crate::cuda::pinned::HostBytes;
use crate::cuda::{DeviceBuffer, DeviceView, DeviceViewMut, Gpu};
use crate::error::{check_len, Error, Result};
use crate::ops::cross_entropy::{self, CrossEntropyShape, CrossEntropyStats, RowOutputs};
use crate::ops::patch_embed::{self, DevicePixels, Normalize, PatchEmbedShape, PixelOrder, Pixels};
use crate::ops::residual::{self, LayerScaleShape, RowCopy};
use crate::ops::KernelChoice;
use crate::ops::{adamw, attention, gelu, gradnorm, layernorm};

pub use crate::ops::adamw::AdamWStep;
use crate::ops::attention::AttentionKernels;
pub use crate::ops::attention::AttentionShape;

/// An element type both backends store: `f32`, `bf16`, `i32`, `u8`.
pub trait Scalar: Copy + Default + DeviceRepr + ValidAsZeroBits + Send + Sync + 'static {}
impl Scalar for f32 {}
impl Scalar for bf16 {}
impl Scalar for i32 {}
impl Scalar for u8 {}

/// Pixels as the patch embedding reads them, in a backend's storage.
pub enum PixelView<'a, B: Backend + ?Sized> {
    /// Normalized f32 `[B, 3, S, S]`.
    F32(B::Ref<'a, f32>),
    /// uint8 `[B, S, S, 3]`, normalized with `norm` inside the op.
    U8 {
        /// The pixels.
        hwc: B::Ref<'a, u8>,
        /// Per-channel mean and standard deviation.
        norm: Normalize,
    },
}

impl<B: Backend + ?Sized> Clone for PixelView<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend + ?Sized> Copy for PixelView<'_, B> {}

/// Per-row cross-entropy outputs in a backend's storage (loss, logsumexp, argmax).
pub type CeRows<B> = RowOutputs<<B as Backend>::Buf<f32>, <B as Backend>::Buf<i32>>;

/// The gradients the cross-entropy backward writes: `dx` (written), `dw`, `db` (added to).
pub struct CeGrads<'s, 'a, B: Backend + ?Sized> {
    /// Upstream gradient of the mean loss (1 for plain training).
    pub dloss: f32,
    /// `[rows, dim]`, written.
    pub dx: &'s mut B::Mut<'a, B::Act>,
    /// `[vocab, dim]`, added to.
    pub dw: &'s mut B::Mut<'a, f32>,
    /// `[vocab]`, added to.
    pub db: &'s mut B::Mut<'a, f32>,
}

/// The operations of the model with one signature for both backends (see the module docs).
pub trait Backend {
    /// Activation element: f32 on the CPU, bf16 on the GPU.
    type Act: Scalar;
    /// An owned buffer of `T`.
    type Buf<T: Scalar>;
    /// A shared view of `T`s, like `&[T]`.
    type Ref<'a, T: Scalar>: Copy;
    /// An exclusive view of `T`s, like `&mut [T]`.
    type Mut<'a, T: Scalar>;

    /// Short name for logs: "cpu" or "cuda".
    fn name(&self) -> &'static str;

    // ----------------------------------------------------------------------------- storage

    /// A buffer of `len` elements whose contents are unspecified (zero on the CPU).
    fn alloc<T: Scalar>(&self, len: usize) -> Result<Self::Buf<T>>;
    /// A buffer holding a copy of `host`.
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    /// Elements `range` of a buffer; an error when the range is outside it.
    fn view<T: Scalar>(buf: &Self::Buf<T>, range: Range<usize>) -> Result<Self::Ref<'_, T>>;
    /// Exclusive view of elements `range` of a buffer.
    fn view_mut<T: Scalar>(buf: &mut Self::Buf<T>, range: Range<usize>) -> Result<Self::Mut<'_, T>>;
    /// Elements `range` of a view, with its lifetime.
    fn sub<'a, T: Scalar>(view: Self::Ref<'a, T>, range: Range<usize>) -> Result<Self::Ref<'a, T>>;
    /// Exclusive view of elements `range` of an exclusive view, borrowing it.
    fn sub_mut<'b, T: Scalar>(view: &'b mut Self::Mut<'_, T>, range: Range<usize>) -> Result<Self::Mut<'b, T>>;
    /// `K` exclusive views of pairwise disjoint ranges of one exclusive view.
    fn split_mut<'a, T: Scalar, const K: usize>(
        view: Self::Mut<'a, T>,
        ranges: [Range<usize>; K],
    ) -> Result<[Self::Mut<'a, T>; K]>;
    /// A shared view of an exclusive view's elements, borrowing it.
    fn freeze<'b, T: Scalar>(view: &'b Self::Mut<'_, T>) -> Self::Ref<'b, T>;
    /// Number of elements of a view.
    fn len<T: Scalar>(view: Self::Ref<'_, T>) -> usize;
    /// Copies `host` into `dst` (same length), in stream order.
    fn copy_from_host<T: Scalar>(&self, host: &[T], dst: &mut Self::Mut<'_, T>) -> Result<()>;
    /// Copies uint8 pixels into `dst` (same length), in stream order. The GPU backend uploads
    /// page-locked pixels by DMA without a staging copy; the others read both kinds alike.
    fn copy_pixels(&self, host: &HostBytes, dst: &mut Self::Mut<'_, u8>) -> Result<()> {
        self.copy_from_host(host, dst)
    }
    /// The viewed elements on the host (waits for the device).
    fn to_host<T: Scalar>(&self, src: Self::Ref<'_, T>) -> Result<Vec<T>>;
    /// The viewed activations on the host, widened to f32 (waits for the device).
    fn act_to_host_f32(&self, src: Self::Ref<'_, Self::Act>) -> Result<Vec<f32>>;
    /// Sets every element to zero bits.
    fn fill_zero<T: Scalar>(&self, dst: &mut Self::Mut<'_, T>) -> Result<()>;
    /// `dst = Act(src)`, elementwise (round to nearest even for bf16).
    fn f32_to_act(&self, src: Self::Ref<'_, f32>, dst: &mut Self::Mut<'_, Self::Act>) -> Result<()>;

    // ----------------------------------------------------------------------------- ops

    /// y = LayerNorm(x) over the last dimension; saves mean and 1/std per row.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        x: Self::Ref<'_, Self::Act>,
        weight: Self::Ref<'_, f32>,
        bias: Self::Ref<'_, f32>,
        eps: f32,
        rows: usize,
        cols: usize,
        y: &mut Self::Mut<'_, Self::Act>,
        mean: &mut Self::Mut<'_, f32>,
        rstd: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;

    /// Backward of LayerNorm: dx is written (or added to when `accumulate_dx`); dweight and
    /// dbias are always added to.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        x: Self::Ref<'_, Self::Act>,
        dy: Self::Ref<'_, Self::Act>,
        weight: Self::Ref<'_, f32>,
        mean: Self::Ref<'_, f32>,
        rstd: Self::Ref<'_, f32>,
        rows: usize,
        cols: usize,
        dx: &mut Self::Mut<'_, Self::Act>,
        accumulate_dx: bool,
        dweight: &mut Self::Mut<'_, f32>,
        dbias: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;

    /// y = GELU(x), erf form, elementwise.
    fn gelu_forward(&self, x: Self::Ref<'_, Self::Act>, y: &mut Self::Mut<'_, Self::Act>) -> Result<()>;

    /// dx = dy * GELU'(x), elementwise.
    fn gelu_backward(
        &self,
        x: Self::Ref<'_, Self::Act>,
        dy: Self::Ref<'_, Self::Act>,
        dx: &mut Self::Mut<'_, Self::Act>,
    ) -> Result<()>;

    /// dx = dy * GELU'(x) and y = GELU(x) again, x and dy `[rows, cols]`, for a backward that did
    /// not keep y: exactly what [`Self::gelu_backward`] and [`Self::gelu_forward`] give; and the
    /// column sums of dx (as stored) added to `dx_col_sums` `[cols]`, the bias gradient of the
    /// Linear whose output gradient dx is. The CUDA backend does all of it in one pass over x.
    fn gelu_backward_recompute(
        &self,
        x: Self::Ref<'_, Self::Act>,
        dy: Self::Ref<'_, Self::Act>,
        cols: usize,
        dx: &mut Self::Mut<'_, Self::Act>,
        y: &mut Self::Mut<'_, Self::Act>,
        dx_col_sums: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;

    /// `y[rows, out] = x[rows, inp] W^T + b`, W stored `[out, inp]` (PyTorch's Linear).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        x: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        b: Self::Ref<'_, Self::Act>,
        rows: usize,
        inp: usize,
        out: usize,
        y: &mut Self::Mut<'_, Self::Act>,
    ) -> Result<()>;

    /// A Linear's parameter gradients: `dW += dy^T x` and, when `db` is given, `db += column sums
    /// of dy` (`None`: the caller formed the bias gradient elsewhere, as the MLP's fc1 does in the
    /// GELU backward). `scratch` (at least `out` f32) is room for the GPU's bias-gradient
    /// epilogue, which writes rather than adds; the CPU does not use it.
    #[allow(clippy::too_many_arguments)]
    fn linear_weight_grads(
        &self,
        x: Self::Ref<'_, Self::Act>,
        dy: Self::Ref<'_, Self::Act>,
        rows: usize,
        inp: usize,
        out: usize,
        dw: &mut Self::Mut<'_, f32>,
        db: Option<&mut Self::Mut<'_, f32>>,
        scratch: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;

    /// A Linear's input gradient `dx[rows, inp] = dy[rows, out] W`, written or (`accumulate`)
    /// added to.
    #[allow(clippy::too_many_arguments)]
    fn linear_input_grad(
        &self,
        dy: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        rows: usize,
        inp: usize,
        out: usize,
        dx: &mut Self::Mut<'_, Self::Act>,
        accumulate: bool,
    ) -> Result<()>;

    /// Two-stream permutation attention forward (see [`crate::ops::attention`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        shape: &AttentionShape,
        q: Self::Ref<'_, Self::Act>,
        k: Self::Ref<'_, Self::Act>,
        v: Self::Ref<'_, Self::Act>,
        o: &mut Self::Mut<'_, Self::Act>,
        lse: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;

    /// Two-stream permutation attention backward: dq, dk, dv written (not accumulated).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: Self::Ref<'_, Self::Act>,
        k: Self::Ref<'_, Self::Act>,
        v: Self::Ref<'_, Self::Act>,
        o: Self::Ref<'_, Self::Act>,
        lse: Self::Ref<'_, f32>,
        d_o: Self::Ref<'_, Self::Act>,
        dq: &mut Self::Mut<'_, Self::Act>,
        dk: &mut Self::Mut<'_, Self::Act>,
        dv: &mut Self::Mut<'_, Self::Act>,
    ) -> Result<()>;

    /// `out = x + (scale[sample] * gamma) * y` (layer scale with per-sample drop path).
    #[allow(clippy::too_many_arguments)]
    fn layer_scale_forward(
        &self,
        shape: &LayerScaleShape,
        x: Self::Ref<'_, Self::Act>,
        y: Self::Ref<'_, Self::Act>,
        gamma: Self::Ref<'_, f32>,
        scale: Self::Ref<'_, f32>,
        out: &mut Self::Mut<'_, Self::Act>,
    ) -> Result<()>;

    /// Backward of [`Self::layer_scale_forward`] with respect to y and gamma: `dy` written,
    /// `dgamma` added to (the gradient with respect to x is `dout` itself); with `dy_col_sums`,
    /// the column sums of dy (as stored) added to it: the bias gradient of the Linear whose
    /// output y is, formed in the same pass.
    #[allow(clippy::too_many_arguments)]
    fn layer_scale_backward(
        &self,
        shape: &LayerScaleShape,
        dout: Self::Ref<'_, Self::Act>,
        y: Self::Ref<'_, Self::Act>,
        gamma: Self::Ref<'_, f32>,
        scale: Self::Ref<'_, f32>,
        dy: &mut Self::Mut<'_, Self::Act>,
        dgamma: &mut Self::Mut<'_, f32>,
        dy_col_sums: Option<&mut Self::Mut<'_, f32>>,
    ) -> Result<()>;

    /// Copies (or adds, `accumulate`) a block of rows of every sample ([`RowCopy`]).
    fn copy_rows(
        &self,
        copy: &RowCopy,
        src: Self::Ref<'_, Self::Act>,
        dst: &mut Self::Mut<'_, Self::Act>,
        accumulate: bool,
    ) -> Result<()>;

    /// Patch embedding of the images into the rank-ordered rows of both streams (see
    /// [`crate::ops::patch_embed`]); `weight` is the GEMM copy.
    #[allow(clippy::too_many_arguments)]
    fn patch_embed_forward(
        &self,
        shape: &PatchEmbedShape,
        images: PixelView<'_, Self>,
        ranks: Self::Ref<'_, i32>,
        weight: Self::Ref<'_, Self::Act>,
        bias: Self::Ref<'_, f32>,
        pos_embed: Self::Ref<'_, f32>,
        cls_token: Self::Ref<'_, f32>,
        mask_token: Self::Ref<'_, f32>,
        out: &mut Self::Mut<'_, Self::Act>,
    ) -> Result<()>;

    /// Backward of [`Self::patch_embed_forward`]: adds the parameters' gradients.
    #[allow(clippy::too_many_arguments)]
    fn patch_embed_backward(
        &self,
        shape: &PatchEmbedShape,
        images: PixelView<'_, Self>,
        ranks: Self::Ref<'_, i32>,
        d_out: Self::Ref<'_, Self::Act>,
        dweight: &mut Self::Mut<'_, f32>,
        dbias: &mut Self::Mut<'_, f32>,
        dpos_embed: &mut Self::Mut<'_, f32>,
        dcls_token: &mut Self::Mut<'_, f32>,
        dmask_token: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;

    /// Codebook cross-entropy of `x W^T + b` against `targets` (< 0: ignored), without the
    /// logits in memory: fills `rows_out` and returns the statistics; with `grads`, also the
    /// backward (see [`crate::ops::cross_entropy`]). `w` is the GEMM copy, `b` the f32 bias.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        shape: &CrossEntropyShape,
        x: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        b: Self::Ref<'_, f32>,
        targets: &[i32],
        rows_out: &mut CeRows<Self>,
        grads: Option<CeGrads<'_, '_, Self>>,
    ) -> Result<CrossEntropyStats>;

    /// Per-row outputs of [`Self::cross_entropy`] for `rows` rows.
    fn ce_rows(&self, rows: usize) -> Result<CeRows<Self>>;

    /// The logits `x W^T + b` `[rows, vocab]` on the host, for checks on small sizes (on the GPU
    /// `bf16(x W^T) + b` in f32: the values the cross-entropy works on).
    #[allow(clippy::too_many_arguments)]
    fn logits_to_host(
        &self,
        x: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        b: Self::Ref<'_, f32>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<Vec<f32>>;

    /// One AdamW step over a flat parameter buffer; writes the activation-precision copy of
    /// the new parameters into `copy` when given.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
        decay_mask: &Self::Buf<u8>,
        step: &AdamWStep,
        copy: Option<&mut Self::Buf<Self::Act>>,
    ) -> Result<()>;

    /// Global L2 norm of a flat f32 buffer (f64 accumulation on the CPU; on the GPU f32 within a
    /// block, the blocks' partial sums in f64).
    fn l2_norm(&self, x: &Self::Buf<f32>) -> Result<f32>;
}

// ====================================================================================== CPU

/// The f32 CPU backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

fn cpu_range_check(range: &Range<usize>, len: usize) -> Result<()> {
    if range.start <= range.end && range.end <= len {
        Ok(())
    } else {
        Err(Error::Shape {
            tensor: "view",
            expected: format!("a range inside 0..{len}"),
            got: format!("{}..{}", range.start, range.end),
        })
    }
}

impl Backend for CpuBackend {
    type Act = f32;
    type Buf<T: Scalar> = Vec<T>;
    type Ref<'a, T: Scalar> = &'a [T];
    type Mut<'a, T: Scalar> = &'a mut [T];

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn view<T: Scalar>(buf: &Vec<T>, range: Range<usize>) -> Result<&[T]> {
        cpu_range_check(&range, buf.len())?;
        Ok(&buf[range])
    }

    fn view_mut<T: Scalar>(buf: &mut Vec<T>, range: Range<usize>) -> Result<&mut [T]> {
        cpu_range_check(&range, buf.len())?;
        Ok(&mut buf[range])
    }

    fn sub<'a, T: Scalar>(view: &'a [T], range: Range<usize>) -> Result<&'a [T]>
    where
        'a: 'a,
    {
        cpu_range_check(&range, view.len())?;
        Ok(&view[range])
    }

    fn sub_mut<'b, T: Scalar>(view: &'b mut &mut [T], range: Range<usize>) -> Result<&'b mut [T]> {
        cpu_range_check(&range, view.len())?;
        Ok(&mut view[range])
    }

    fn split_mut<'a, T: Scalar, const K: usize>(
        view: &'a mut [T],
        ranges: [Range<usize>; K],
    ) -> Result<[&'a mut [T]; K]>
    where
        'a: 'a,
    {
        let len = view.len();
        // The ranges are kept for the message (cheap: no formatting unless the split fails,
        // since this runs for every parameter gradient of every step).
        let kept = ranges.clone();
        view.get_disjoint_mut(ranges).map_err(|_| Error::Shape {
            tensor: "views",
            expected: format!("pairwise disjoint ranges inside 0..{len}"),
            got: format!("{kept:?}"),
        })
    }

    fn freeze<'b, T: Scalar>(view: &'b &mut [T]) -> &'b [T] {
        view
    }

    fn len<T: Scalar>(view: &[T]) -> usize {
        view.len()
    }

    fn copy_from_host<T: Scalar>(&self, host: &[T], dst: &mut &mut [T]) -> Result<()> {
        check_len("host source", host.len(), dst.len())?;
        dst.copy_from_slice(host);
        Ok(())
    }

    fn to_host<T: Scalar>(&self, src: &[T]) -> Result<Vec<T>> {
        Ok(src.to_vec())
    }

    fn act_to_host_f32(&self, src: &[f32]) -> Result<Vec<f32>> {
        Ok(src.to_vec())
    }

    fn fill_zero<T: Scalar>(&self, dst: &mut &mut [T]) -> Result<()> {
        dst.fill(T::default());
        Ok(())
    }

    fn f32_to_act(&self, src: &[f32], dst: &mut &mut [f32]) -> Result<()> {
        self.copy_from_host(src, dst)
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
        layernorm::cpu_forward(x, weight, bias, eps, rows, cols, y, mean, rstd)
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
        layernorm::cpu_backward(x, dy, weight, mean, rstd, rows, cols, dx, accumulate_dx, dweight, dbias)
    }

    fn gelu_forward(&self, x: &[f32], y: &mut &mut [f32]) -> Result<()> {
        gelu::cpu_forward(x, y)
    }

    fn gelu_backward(&self, x: &[f32], dy: &[f32], dx: &mut &mut [f32]) -> Result<()> {
        gelu::cpu_backward(x, dy, dx)
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
        gelu::cpu_forward(x, y)?;
        gelu::cpu_backward(x, dy, dx)?;
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
        check_linear(x.len(), w.len(), rows, inp, out)?;
        check_len("linear bias", b.len(), out)?;
        check_len("linear output", y.len(), rows * out)?;
        for row in y.chunks_exact_mut(out) {
            row.copy_from_slice(b);
        }
        sgemm(rows, out, inp, 1.0, x, w, true, 1.0, y);
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
        _scratch: &mut &mut [f32],
    ) -> Result<()> {
        check_len("linear input", x.len(), rows * inp)?;
        check_len("linear output gradient", dy.len(), rows * out)?;
        check_len("linear weight gradient", dw.len(), out * inp)?;
        sgemm_tn(out, inp, rows, 1.0, dy, x, 1.0, dw);
        match db {
            Some(db) => add_column_sums(dy, out, db),
            None => Ok(()),
        }
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
        check_len("linear output gradient", dy.len(), rows * out)?;
        check_len("linear weight", w.len(), out * inp)?;
        check_len("linear input gradient", dx.len(), rows * inp)?;
        sgemm(rows, inp, out, 1.0, dy, w, false, if accumulate { 1.0 } else { 0.0 }, dx);
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
        attention::cpu_forward(shape, q, k, v, o, lse)
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
        attention::cpu_backward(shape, q, k, v, o, lse, d_o, dq, dk, dv)
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
        residual::cpu_layer_scale_forward(shape, x, y, gamma, scale, out)
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
        residual::cpu_layer_scale_backward(shape, dout, y, gamma, scale, dy, dgamma)?;
        match dy_col_sums {
            Some(sums) => add_column_sums(dy, shape.cols, sums),
            None => Ok(()),
        }
    }

    fn copy_rows(&self, copy: &RowCopy, src: &[f32], dst: &mut &mut [f32], accumulate: bool) -> Result<()> {
        residual::cpu_copy_rows(copy, src, dst, accumulate)
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
        let (w, b, pos, cls, mask) = (weight, bias, pos_embed, cls_token, mask_token);
        match images {
            PixelView::F32(chw) => patch_embed::cpu_forward_f32(shape, chw, ranks, w, b, pos, cls, mask, out),
            PixelView::U8 { hwc, norm } => {
                patch_embed::cpu_forward_u8(shape, hwc, &norm, ranks, w, b, pos, cls, mask, out)
            }
        }
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
        let pixels = match images {
            PixelView::F32(chw) => Pixels::F32 { chw },
            PixelView::U8 { hwc, norm } => Pixels::U8 { hwc, norm },
        };
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
        let stats = cross_entropy::cpu_forward(shape, x, w, b, targets, rows_out)?;
        if let Some(g) = grads {
            cross_entropy::cpu_backward(shape, x, w, b, targets, g.dloss, g.dx, g.dw, g.db)?;
        }
        Ok(stats)
    }

    fn ce_rows(&self, rows: usize) -> Result<CeRows<Self>> {
        Ok(cross_entropy::CpuRowOutputs::new(rows))
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
        let mut y = vec![0.0f32; rows * vocab];
        self.linear(x, w, b, rows, dim, vocab, &mut &mut y[..])?;
        Ok(y)
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
        adamw::cpu_step(param, grad, m, v, decay_mask, step, copy.map(|c| c.as_mut_slice()))
    }

    fn l2_norm(&self, x: &Vec<f32>) -> Result<f32> {
        Ok(gradnorm::cpu_l2_norm(x))
    }
}

/// The checks of a Linear's input and weight lengths.
fn check_linear(x: usize, w: usize, rows: usize, inp: usize, out: usize) -> Result<()> {
    check_len("linear input", x, rows * inp)?;
    check_len("linear weight", w, out * inp)
}

// ===================================================================================== CUDA

/// `sums[c] += sum over the rows of m[r, c]`, m `[rows, cols]` row-major (a bias gradient).
pub(crate) fn add_column_sums(m: &[f32], cols: usize, sums: &mut [f32]) -> Result<()> {
    check_len("column sums", sums.len(), cols)?;
    if cols == 0 || !m.len().is_multiple_of(cols) {
        return Err(Error::Shape {
            tensor: "column sums input",
            expected: format!("rows of {cols} values"),
            got: format!("{} values", m.len()),
        });
    }
    for row in m.chunks_exact(cols) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    Ok(())
}

/// The CUDA backend over one [`Gpu`] and its cuBLASLt handle.
pub struct CudaBackend {
    /// The device everything runs on.
    pub gpu: Arc<Gpu>,
    /// The GEMMs of every Linear and of the cross-entropy.
    pub gemm: Gemm,
    /// The patch embedding's contraction order for uint8 pixels, read once from
    /// `MAPET_PATCH_EMBED_ORDER` when the backend is made (the default: the faster order on the
    /// device, [`PixelOrder::selected_pair`]).
    pub pixel_order: PixelOrder,
    /// The patch embedding backward's order: the one `MAPET_PATCH_EMBED_BACKWARD_ORDER` names,
    /// else `pixel_order` when `MAPET_PATCH_EMBED_ORDER` is set, else the faster backward on the
    /// device (read when the backend is made).
    pub pixel_order_backward: PixelOrder,
    /// The attention kernels, read once from `MAPET_ATTENTION_KERNELS` when the backend is made
    /// (the default: the faster set, `wgmma`, which runs `resident` off compute capability 9.0).
    pub attention_kernels: AttentionKernels,
    /// The attention backward's kernels: `attention_kernels` unless
    /// `MAPET_ATTENTION_BACKWARD_KERNELS` names another set (read when the backend is made).
    pub attention_backward_kernels: AttentionKernels,
    /// Rows per forward pass inside each cross-entropy chunk, read once from
    /// `MAPET_CE_SUB_CHUNK_ROWS` when the backend is made (`None`: one pass, the default).
    pub ce_sub_chunk_rows: Option<usize>,
    /// Whether the cross-entropy row kernels visit the rows from the last back, read once from
    /// `MAPET_CE_ROW_ORDER` when the backend is made (`false`, forward: the default).
    pub ce_reverse_rows: bool,
    /// Whether the cross-entropy runs paired rows (two a block, five chunks at the model's
    /// shape), read once from `MAPET_CE_ROW_BLOCKS` when the backend is made (`false`, single:
    /// the default).
    pub ce_paired_rows: bool,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("gpu", &self.gpu).finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// A backend on `gpu` (creates a cuBLASLt handle and its workspace).
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        let gemm = Gemm::new(&gpu)?;
        let attention_kernels = AttentionKernels::selected()?;
        let (pixel_order, pixel_order_backward) = PixelOrder::selected_pair(gpu.compute_capability())?;
        Ok(CudaBackend {
            gpu,
            gemm,
            pixel_order,
            pixel_order_backward,
            attention_kernels,
            attention_backward_kernels: AttentionKernels::selected_backward(attention_kernels)?,
            ce_sub_chunk_rows: cross_entropy::sub_chunk_rows_named(
                std::env::var(cross_entropy::SUB_CHUNK_VAR).ok().as_deref(),
            )?,
            ce_reverse_rows: cross_entropy::reverse_rows_named(
                std::env::var(cross_entropy::ROW_ORDER_VAR).ok().as_deref(),
            )?,
            ce_paired_rows: cross_entropy::paired_rows_named(
                std::env::var(cross_entropy::ROW_BLOCKS_VAR).ok().as_deref(),
            )?,
        })
    }

    /// The kernel choices this backend runs with, in one line (for benchmark reports): the
    /// patch embedding's and the attention's sets, each direction, and the GEMMs' pins (the
    /// default pin table's too) and tuning.
    pub fn describe_kernels(&self) -> String {
        let pins = gemm::pin_text(self.gemm.pins());
        let defaults = gemm::pin_text(self.gemm.default_pins());
        format!(
            "patch embedding {} (backward {}), attention {} (backward {}), cross-entropy passes of {} (rows {}, {} row blocks), GEMM tuning {}, GEMM pins {}, default GEMM pins {}",
            self.pixel_order.name(),
            self.pixel_order_backward.name(),
            self.attention_kernels.name(),
            self.attention_backward_kernels.name(),
            self.ce_sub_chunk_rows.map_or("whole chunks".to_string(), |r| format!("<= {r} rows")),
            if self.ce_reverse_rows { "reversed" } else { "forward" },
            if self.ce_paired_rows { "paired" } else { "single" },
            if self.gemm.tuning() { "on" } else { "off" },
            if pins.is_empty() { "none".to_string() } else { pins },
            if defaults.is_empty() { "none".to_string() } else { defaults }
        )
    }

    /// Opens device 0.
    pub fn first() -> Result<Self> {
        Self::new(Arc::new(Gpu::first()?))
    }
}

impl Backend for CudaBackend {
    type Act = bf16;
    type Buf<T: Scalar> = DeviceBuffer<T>;
    type Ref<'a, T: Scalar> = DeviceView<'a, T>;
    type Mut<'a, T: Scalar> = DeviceViewMut<'a, T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc<T: Scalar>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.gpu.alloc(len)
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        self.gpu.upload(host)
    }

    fn view<T: Scalar>(buf: &DeviceBuffer<T>, range: Range<usize>) -> Result<DeviceView<'_, T>> {
        buf.view(range)
    }

    fn view_mut<T: Scalar>(buf: &mut DeviceBuffer<T>, range: Range<usize>) -> Result<DeviceViewMut<'_, T>> {
        buf.view_mut(range)
    }

    fn sub<'a, T: Scalar>(view: DeviceView<'a, T>, range: Range<usize>) -> Result<DeviceView<'a, T>>
    where
        'a: 'a,
    {
        view.view(range)
    }

    fn sub_mut<'b, T: Scalar>(view: &'b mut DeviceViewMut<'_, T>, range: Range<usize>) -> Result<DeviceViewMut<'b, T>> {
        view.view_mut(range)
    }

    fn split_mut<'a, T: Scalar, const K: usize>(
        view: DeviceViewMut<'a, T>,
        ranges: [Range<usize>; K],
    ) -> Result<[DeviceViewMut<'a, T>; K]>
    where
        'a: 'a,
    {
        view.split(ranges)
    }

    fn freeze<'b, T: Scalar>(view: &'b DeviceViewMut<'_, T>) -> DeviceView<'b, T> {
        view.as_view()
    }

    fn len<T: Scalar>(view: DeviceView<'_, T>) -> usize {
        view.len()
    }

    fn copy_from_host<T: Scalar>(&self, host: &[T], dst: &mut DeviceViewMut<'_, T>) -> Result<()> {
        dst.copy_from_host(host)
    }

    fn copy_pixels(&self, host: &HostBytes, dst: &mut DeviceViewMut<'_, u8>) -> Result<()> {
        match host {
            HostBytes::Pinned(p) => dst.copy_from_pinned(p),
            HostBytes::Vec(v) => dst.copy_from_host(v),
        }
    }

    fn to_host<T: Scalar>(&self, src: DeviceView<'_, T>) -> Result<Vec<T>> {
        src.to_host()
    }

    fn act_to_host_f32(&self, src: DeviceView<'_, bf16>) -> Result<Vec<f32>> {
        Ok(src.to_host()?.into_iter().map(f32::from).collect())
    }

    fn fill_zero<T: Scalar>(&self, dst: &mut DeviceViewMut<'_, T>) -> Result<()> {
        dst.fill_zero()
    }

    fn f32_to_act(&self, src: DeviceView<'_, f32>, dst: &mut DeviceViewMut<'_, bf16>) -> Result<()> {
        residual::cuda_f32_to_bf16(&self.gpu, &src, dst)
    }

    fn layernorm_forward(
        &self,
        x: DeviceView<'_, bf16>,
        weight: DeviceView<'_, f32>,
        bias: DeviceView<'_, f32>,
        eps: f32,
        rows: usize,
        cols: usize,
        y: &mut DeviceViewMut<'_, bf16>,
        mean: &mut DeviceViewMut<'_, f32>,
        rstd: &mut DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        layernorm::cuda_forward(&self.gpu, &x, &weight, &bias, eps, rows, cols, y, mean, rstd)
    }

    fn layernorm_backward(
        &self,
        x: DeviceView<'_, bf16>,
        dy: DeviceView<'_, bf16>,
        weight: DeviceView<'_, f32>,
        mean: DeviceView<'_, f32>,
        rstd: DeviceView<'_, f32>,
        rows: usize,
        cols: usize,
        dx: &mut DeviceViewMut<'_, bf16>,
        accumulate_dx: bool,
        dweight: &mut DeviceViewMut<'_, f32>,
        dbias: &mut DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        let gpu = &self.gpu;
        layernorm::cuda_backward(gpu, &x, &dy, &weight, &mean, &rstd, rows, cols, dx, accumulate_dx, dweight, dbias)
    }

    fn gelu_forward(&self, x: DeviceView<'_, bf16>, y: &mut DeviceViewMut<'_, bf16>) -> Result<()> {
        gelu::cuda_forward(&self.gpu, &x, y)
    }

    fn gelu_backward(
        &self,
        x: DeviceView<'_, bf16>,
        dy: DeviceView<'_, bf16>,
        dx: &mut DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        gelu::cuda_backward(&self.gpu, &x, &dy, dx)
    }

    fn gelu_backward_recompute(
        &self,
        x: DeviceView<'_, bf16>,
        dy: DeviceView<'_, bf16>,
        cols: usize,
        dx: &mut DeviceViewMut<'_, bf16>,
        y: &mut DeviceViewMut<'_, bf16>,
        dx_col_sums: &mut DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        gelu::cuda_backward_recompute(&self.gpu, &x, &dy, cols, dx, y, dx_col_sums)
    }

    fn linear(
        &self,
        x: DeviceView<'_, bf16>,
        w: DeviceView<'_, bf16>,
        b: DeviceView<'_, bf16>,
        rows: usize,
        inp: usize,
        out: usize,
        y: &mut DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        check_linear(x.len(), w.len(), rows, inp, out)?;
        let epilogue = Epilogue::Bias { bias: Vector::Bf16(&b) };
        self.gemm.matmul(rows, out, inp, &x, false, &w, true, y, 1.0, 0.0, epilogue)
    }

    fn linear_weight_grads(
        &self,
        x: DeviceView<'_, bf16>,
        dy: DeviceView<'_, bf16>,
        rows: usize,
        inp: usize,
        out: usize,
        dw: &mut DeviceViewMut<'_, f32>,
        db: Option<&mut DeviceViewMut<'_, f32>>,
        scratch: &mut DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        let Some(db) = db else {
            return self.gemm.matmul_f32_out(out, inp, rows, &dy, true, &x, false, dw, 1.0, 1.0, Epilogue::None);
        };
        // The bias-gradient epilogue writes the column sums of dy (the GEMM's A operand) into
        // `sums`; they are then added to db, which accumulates over micro-batches.
        let mut sums = scratch.view_mut(0..out)?;
        let epilogue = Epilogue::BiasGradFromA { bias_grad: VectorMut::F32(&mut sums) };
        self.gemm.matmul_f32_out(out, inp, rows, &dy, true, &x, false, dw, 1.0, 1.0, epilogue)?;
        residual::cuda_add_f32(&self.gpu, &sums, db)
    }

    fn linear_input_grad(
        &self,
        dy: DeviceView<'_, bf16>,
        w: DeviceView<'_, bf16>,
        rows: usize,
        inp: usize,
        out: usize,
        dx: &mut DeviceViewMut<'_, bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.gemm.matmul(rows, inp, out, &dy, false, &w, false, dx, 1.0, beta, Epilogue::None)
    }

    fn attention_forward(
        &self,
        shape: &AttentionShape,
        q: DeviceView<'_, bf16>,
        k: DeviceView<'_, bf16>,
        v: DeviceView<'_, bf16>,
        o: &mut DeviceViewMut<'_, bf16>,
        lse: &mut DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        attention::cuda_forward(&self.gpu, self.attention_kernels, shape, &q, &k, &v, o, lse)
    }

    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: DeviceView<'_, bf16>,
        k: DeviceView<'_, bf16>,
        v: DeviceView<'_, bf16>,
        o: DeviceView<'_, bf16>,
        lse: DeviceView<'_, f32>,
        d_o: DeviceView<'_, bf16>,
        dq: &mut DeviceViewMut<'_, bf16>,
        dk: &mut DeviceViewMut<'_, bf16>,
        dv: &mut DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        let kernels = self.attention_backward_kernels;
        attention::cuda_backward(&self.gpu, kernels, shape, &q, &k, &v, &o, &lse, &d_o, dq, dk, dv)
    }

    fn layer_scale_forward(
        &self,
        shape: &LayerScaleShape,
        x: DeviceView<'_, bf16>,
        y: DeviceView<'_, bf16>,
        gamma: DeviceView<'_, f32>,
        scale: DeviceView<'_, f32>,
        out: &mut DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        residual::cuda_layer_scale_forward(&self.gpu, shape, &x, &y, &gamma, &scale, out)
    }

    fn layer_scale_backward(
        &self,
        shape: &LayerScaleShape,
        dout: DeviceView<'_, bf16>,
        y: DeviceView<'_, bf16>,
        gamma: DeviceView<'_, f32>,
        scale: DeviceView<'_, f32>,
        dy: &mut DeviceViewMut<'_, bf16>,
        dgamma: &mut DeviceViewMut<'_, f32>,
        dy_col_sums: Option<&mut DeviceViewMut<'_, f32>>,
    ) -> Result<()> {
        let sums = dy_col_sums.map(|s| s as &mut dyn crate::cuda::DeviceWrite<f32>);
        residual::cuda_layer_scale_backward(&self.gpu, shape, &dout, &y, &gamma, &scale, dy, dgamma, sums)
    }

    fn copy_rows(
        &self,
        copy: &RowCopy,
        src: DeviceView<'_, bf16>,
        dst: &mut DeviceViewMut<'_, bf16>,
        accumulate: bool,
    ) -> Result<()> {
        residual::cuda_copy_rows(&self.gpu, copy, &src, dst, accumulate)
    }

    fn patch_embed_forward(
        &self,
        shape: &PatchEmbedShape,
        images: PixelView<'_, Self>,
        ranks: DeviceView<'_, i32>,
        weight: DeviceView<'_, bf16>,
        bias: DeviceView<'_, f32>,
        pos_embed: DeviceView<'_, f32>,
        cls_token: DeviceView<'_, f32>,
        mask_token: DeviceView<'_, f32>,
        out: &mut DeviceViewMut<'_, bf16>,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let (w, b, pos, cls, mask) = (&weight, &bias, &pos_embed, &cls_token, &mask_token);
        match images {
            PixelView::F32(chw) => patch_embed::cuda_forward_f32(gpu, shape, &chw, &ranks, w, b, pos, cls, mask, out),
            PixelView::U8 { hwc, norm } => {
                let order = self.pixel_order;
                patch_embed::cuda_forward_u8(gpu, order, shape, &hwc, &norm, &ranks, w, b, pos, cls, mask, out)
            }
        }
    }

    fn patch_embed_backward(
        &self,
        shape: &PatchEmbedShape,
        images: PixelView<'_, Self>,
        ranks: DeviceView<'_, i32>,
        d_out: DeviceView<'_, bf16>,
        dweight: &mut DeviceViewMut<'_, f32>,
        dbias: &mut DeviceViewMut<'_, f32>,
        dpos_embed: &mut DeviceViewMut<'_, f32>,
        dcls_token: &mut DeviceViewMut<'_, f32>,
        dmask_token: &mut DeviceViewMut<'_, f32>,
    ) -> Result<()> {
        let pixels = match &images {
            PixelView::F32(chw) => DevicePixels::F32 { chw },
            PixelView::U8 { hwc, norm } => DevicePixels::U8 { hwc, norm: *norm },
        };
        let (dw, db, dpos, dcls, dmask) = (dweight, dbias, dpos_embed, dcls_token, dmask_token);
        let order = self.pixel_order_backward;
        patch_embed::cuda_backward(&self.gpu, order, shape, pixels, &ranks, &d_out, dw, db, dpos, dcls, dmask)
    }

    fn cross_entropy(
        &self,
        shape: &CrossEntropyShape,
        x: DeviceView<'_, bf16>,
        w: DeviceView<'_, bf16>,
        b: DeviceView<'_, f32>,
        targets: &[i32],
        rows_out: &mut CeRows<Self>,
        grads: Option<CeGrads<'_, '_, Self>>,
    ) -> Result<CrossEntropyStats> {
        let (gpu, gemm) = (&self.gpu, &self.gemm);
        let shape = &shape.or_sub_chunk_rows(self.ce_sub_chunk_rows);
        let shape = &shape.with_reversed_rows(shape.reverse_rows || self.ce_reverse_rows);
        let shape = &shape.with_paired_rows(shape.paired_rows || self.ce_paired_rows);
        match grads {
            None => cross_entropy::cuda_forward(gpu, gemm, shape, &x, &w, &b, targets, rows_out),
            Some(g) => cross_entropy::cuda_forward_backward(
                gpu, gemm, shape, &x, &w, &b, targets, g.dloss, rows_out, g.dx, g.dw, g.db,
            ),
        }
    }

    fn ce_rows(&self, rows: usize) -> Result<CeRows<Self>> {
        cross_entropy::CudaRowOutputs::new(&self.gpu, rows)
    }

    fn logits_to_host(
        &self,
        x: DeviceView<'_, bf16>,
        w: DeviceView<'_, bf16>,
        b: DeviceView<'_, f32>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<Vec<f32>> {
        check_linear(x.len(), w.len(), rows, dim, vocab)?;
        check_len("logits bias", b.len(), vocab)?;
        let mut acc = self.gpu.alloc::<bf16>(rows * vocab)?;
        self.gemm.matmul(rows, vocab, dim, &x, false, &w, true, &mut acc, 1.0, 0.0, Epilogue::None)?;
        let bias = b.to_host()?;
        let mut logits = acc.to_host_f32()?;
        for row in logits.chunks_exact_mut(vocab) {
            for (x, &bb) in row.iter_mut().zip(&bias) {
                *x += bb;
            }
        }
        Ok(logits)
    }

    fn adamw_step(
        &self,
        param: &mut DeviceBuffer<f32>,
        grad: &DeviceBuffer<f32>,
        m: &mut DeviceBuffer<f32>,
        v: &mut DeviceBuffer<f32>,
        decay_mask: &DeviceBuffer<u8>,
        step: &AdamWStep,
        copy: Option<&mut DeviceBuffer<bf16>>,
    ) -> Result<()> {
        adamw::cuda_step(&self.gpu, param, grad, m, v, decay_mask, step, copy)
    }

    fn l2_norm(&self, x: &DeviceBuffer<f32>) -> Result<f32> {
        gradnorm::cuda_l2_norm(&self.gpu, x)
    }
}
