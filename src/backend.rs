//! The two backends of every op behind one trait (DESIGN.md, "Two backends, one model"): code
//! that composes ops can be written once over `Backend`. The model's forward and backward are the
//! exception, kept as two implementations in lock step (see `crate::model`).
//!
//! - [`CpuBackend`]: f32 everywhere, `Vec` storage. The reference.
//! - [`CudaBackend`]: bf16 activations and f32 statistics/parameters in device buffers.
//!
//! Each method only forwards to the op's module in [`crate::ops`], where the CPU reference and
//! the CUDA launcher sit side by side with the host checks they share.

use half::bf16;

use crate::cuda::{DeviceBuffer, Gpu};
use crate::error::Result;
use crate::ops::{adamw, attention, gelu, gradnorm, layernorm};

pub use crate::ops::adamw::AdamWStep;
pub use crate::ops::attention::AttentionShape;

/// The operations of the model with one signature for both backends.
///
/// Shapes are given explicitly (`rows`, `cols`); every implementation checks its buffers against
/// them and returns [`crate::Error::Shape`] naming the tensor at fault.
pub trait Backend {
    /// Activations: f32 on the CPU, bf16 on the GPU.
    type Act;
    /// f32 tensors: statistics, parameters, gradients, optimizer moments.
    type F32;
    /// Byte tensors (the weight-decay mask).
    type U8;

    /// Short name for logs: "cpu" or "cuda".
    fn name(&self) -> &'static str;

    /// y = LayerNorm(x) over the last dimension; saves mean and 1/std per row.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        x: &Self::Act,
        weight: &Self::F32,
        bias: &Self::F32,
        eps: f32,
        rows: usize,
        cols: usize,
        y: &mut Self::Act,
        mean: &mut Self::F32,
        rstd: &mut Self::F32,
    ) -> Result<()>;

    /// Backward of LayerNorm: dx is written (or added to when `accumulate_dx`); dweight and
    /// dbias are always added to.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        x: &Self::Act,
        dy: &Self::Act,
        weight: &Self::F32,
        mean: &Self::F32,
        rstd: &Self::F32,
        rows: usize,
        cols: usize,
        dx: &mut Self::Act,
        accumulate_dx: bool,
        dweight: &mut Self::F32,
        dbias: &mut Self::F32,
    ) -> Result<()>;

    /// h = residual + x; y = LayerNorm(h). Saves mean and 1/std of h.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        residual: &Self::Act,
        x: &Self::Act,
        weight: &Self::F32,
        bias: &Self::F32,
        eps: f32,
        rows: usize,
        cols: usize,
        h: &mut Self::Act,
        y: &mut Self::Act,
        mean: &mut Self::F32,
        rstd: &mut Self::F32,
    ) -> Result<()>;

    /// y = GELU(x), erf form, elementwise.
    fn gelu_forward(&self, x: &Self::Act, y: &mut Self::Act) -> Result<()>;

    /// dx = dy * GELU'(x), elementwise.
    fn gelu_backward(&self, x: &Self::Act, dy: &Self::Act, dx: &mut Self::Act) -> Result<()>;

    /// One AdamW step over a flat parameter buffer; writes the activation-precision copy of
    /// the new parameters into `copy` when given.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        param: &mut Self::F32,
        grad: &Self::F32,
        m: &mut Self::F32,
        v: &mut Self::F32,
        decay_mask: &Self::U8,
        step: &AdamWStep,
        copy: Option<&mut Self::Act>,
    ) -> Result<()>;

    /// Global L2 norm of a flat f32 buffer (f64 accumulation on the CPU, f32 on the GPU).
    fn l2_norm(&self, x: &Self::F32) -> Result<f32>;

    /// Two-stream permutation attention forward (see [`crate::ops::attention`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        shape: &AttentionShape,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        o: &mut Self::Act,
        lse: &mut Self::F32,
    ) -> Result<()>;

    /// Two-stream permutation attention backward: dq, dk, dv written (not accumulated).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        o: &Self::Act,
        lse: &Self::F32,
        d_o: &Self::Act,
        dq: &mut Self::Act,
        dk: &mut Self::Act,
        dv: &mut Self::Act,
    ) -> Result<()>;
}

/// The f32 CPU backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Act = Vec<f32>;
    type F32 = Vec<f32>;
    type U8 = Vec<u8>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn layernorm_forward(
        &self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        eps: f32,
        rows: usize,
        cols: usize,
        y: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        layernorm::cpu_forward(x, weight, bias, eps, rows, cols, y, mean, rstd)
    }

    fn layernorm_backward(
        &self,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        rows: usize,
        cols: usize,
        dx: &mut Vec<f32>,
        accumulate_dx: bool,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
    ) -> Result<()> {
        layernorm::cpu_backward(x, dy, weight, mean, rstd, rows, cols, dx, accumulate_dx, dweight, dbias)
    }

    fn residual_layernorm_forward(
        &self,
        residual: &Vec<f32>,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        eps: f32,
        rows: usize,
        cols: usize,
        h: &mut Vec<f32>,
        y: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        layernorm::cpu_residual_forward(residual, x, weight, bias, eps, rows, cols, h, y, mean, rstd)
    }

    fn gelu_forward(&self, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        gelu::cpu_forward(x, y)
    }

    fn gelu_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) -> Result<()> {
        gelu::cpu_backward(x, dy, dx)
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

    fn attention_forward(
        &self,
        shape: &AttentionShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        o: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        attention::cpu_forward(shape, q, k, v, o, lse)
    }

    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        o: &Vec<f32>,
        lse: &Vec<f32>,
        d_o: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
    ) -> Result<()> {
        attention::cpu_backward(shape, q, k, v, o, lse, d_o, dq, dk, dv)
    }
}

/// The CUDA backend over one [`Gpu`].
#[derive(Debug)]
pub struct CudaBackend {
    /// The device everything runs on.
    pub gpu: Gpu,
}

impl CudaBackend {
    /// Opens device 0.
    pub fn new() -> Result<Self> {
        Ok(CudaBackend { gpu: Gpu::first()? })
    }
}

impl Backend for CudaBackend {
    type Act = DeviceBuffer<bf16>;
    type F32 = DeviceBuffer<f32>;
    type U8 = DeviceBuffer<u8>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn layernorm_forward(
        &self,
        x: &DeviceBuffer<bf16>,
        weight: &DeviceBuffer<f32>,
        bias: &DeviceBuffer<f32>,
        eps: f32,
        rows: usize,
        cols: usize,
        y: &mut DeviceBuffer<bf16>,
        mean: &mut DeviceBuffer<f32>,
        rstd: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        layernorm::cuda_forward(&self.gpu, x, weight, bias, eps, rows, cols, y, mean, rstd)
    }

    fn layernorm_backward(
        &self,
        x: &DeviceBuffer<bf16>,
        dy: &DeviceBuffer<bf16>,
        weight: &DeviceBuffer<f32>,
        mean: &DeviceBuffer<f32>,
        rstd: &DeviceBuffer<f32>,
        rows: usize,
        cols: usize,
        dx: &mut DeviceBuffer<bf16>,
        accumulate_dx: bool,
        dweight: &mut DeviceBuffer<f32>,
        dbias: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        layernorm::cuda_backward(&self.gpu, x, dy, weight, mean, rstd, rows, cols, dx, accumulate_dx, dweight, dbias)
    }

    fn residual_layernorm_forward(
        &self,
        residual: &DeviceBuffer<bf16>,
        x: &DeviceBuffer<bf16>,
        weight: &DeviceBuffer<f32>,
        bias: &DeviceBuffer<f32>,
        eps: f32,
        rows: usize,
        cols: usize,
        h: &mut DeviceBuffer<bf16>,
        y: &mut DeviceBuffer<bf16>,
        mean: &mut DeviceBuffer<f32>,
        rstd: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        layernorm::cuda_residual_forward(&self.gpu, residual, x, weight, bias, eps, rows, cols, h, y, mean, rstd)
    }

    fn gelu_forward(&self, x: &DeviceBuffer<bf16>, y: &mut DeviceBuffer<bf16>) -> Result<()> {
        gelu::cuda_forward(&self.gpu, x, y)
    }

    fn gelu_backward(
        &self,
        x: &DeviceBuffer<bf16>,
        dy: &DeviceBuffer<bf16>,
        dx: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        gelu::cuda_backward(&self.gpu, x, dy, dx)
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

    fn attention_forward(
        &self,
        shape: &AttentionShape,
        q: &DeviceBuffer<bf16>,
        k: &DeviceBuffer<bf16>,
        v: &DeviceBuffer<bf16>,
        o: &mut DeviceBuffer<bf16>,
        lse: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        attention::cuda_forward(&self.gpu, shape, q, k, v, o, lse)
    }

    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: &DeviceBuffer<bf16>,
        k: &DeviceBuffer<bf16>,
        v: &DeviceBuffer<bf16>,
        o: &DeviceBuffer<bf16>,
        lse: &DeviceBuffer<f32>,
        d_o: &DeviceBuffer<bf16>,
        dq: &mut DeviceBuffer<bf16>,
        dk: &mut DeviceBuffer<bf16>,
        dv: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        attention::cuda_backward(&self.gpu, shape, q, k, v, o, lse, d_o, dq, dk, dv)
    }
}
