//! The model on one GPU: [`crate::model::net::step`] over [`CudaBackend`], with the buffers the
//! GPU keeps between steps: the f32 master parameters, their bf16 copy for the GEMMs, the f32
//! gradients and the [`Activations`] of a maximum batch, all allocated once in
//! [`CudaModel::new`].
//!
//! # Numerics (what differs from the f32 CPU model)
//!
//! The sequence of ops is the CPU model's (it is the same code); the ops differ, with the
//! precision of DESIGN.md:
//!
//! - GEMMs (cuBLASLt) take bf16 operands, accumulate in f32 and write bf16; the forward's bias is
//!   the bf16 copy, added in the epilogue. Weight gradients are f32 GEMM outputs accumulated with
//!   `beta = 1` straight into the f32 gradient buffer; bias gradients come from the same GEMM's
//!   bias-gradient epilogue (written into an f32 scratch, then added: the epilogue writes, it
//!   does not accumulate) for q, k and v; fc1's is summed by the GELU backward as it writes fc1's
//!   output gradient (`ops::gelu::cuda_backward_recompute`), proj's and fc2's by the layer-scale
//!   backward as it writes theirs (`ops::residual::cuda_layer_scale_backward`).
//! - GELU is the erf form (`ops::gelu`), not cuBLASLt's tanh epilogue.
//! - LayerNorm and the layer-scale residual read f32 weights (the master copy) and keep f32
//!   statistics, as the patch embedding does for its bias, position embedding and tokens (its
//!   convolution weight is the bf16 copy the GEMMs use); the residual stream x and every
//!   activation gradient are bf16.
//! - Every reduction is deterministic (no float atomics): two runs of a step on the same inputs
//!   and the same card give bit-identical losses and gradients.
//!
//! # Memory
//!
//! A step allocates only what the op launchers allocate internally (the LayerNorm, layer-scale
//! and attention backward scratch, the patch embedding's forward and backward scratch, the
//! cross-entropy chunk buffers), in stream order. [`CudaModel::device_bytes`] gives the total of the model's own buffers.

use std::sync::Arc;

use half::bf16;

use crate::backend::CudaBackend;
use crate::cuda::gemm::Gemm;
use crate::cuda::{DeviceBuffer, Gpu};
use crate::error::{check_len, Result};
use crate::model::net::{self, Activations, Batch, ForwardOutput, Weights};
use crate::model::params::{ModelConfig, ParamLayout};
use crate::ops::attention::{self, AttentionShape};
use crate::ops::patch_embed::PatchEmbedShape;
use crate::ops::residual;

/// The model on one GPU: its parameters, gradients and activation buffers.
pub struct CudaModel {
    /// Parameter layout (config, names, offsets), the same as the CPU model's.
    pub layout: ParamLayout,
    backend: CudaBackend,
    device_bytes: usize,
    params: DeviceBuffer<f32>,
    params_bf16: DeviceBuffer<bf16>,
    grads: DeviceBuffer<f32>,
    acts: Activations<CudaBackend>,
}

impl CudaModel {
    /// A model of `config` on `gpu` for batches of at most `max_batch` images, with every
    /// parameter and gradient zero (load parameters with [`Self::upload_params`]). Refuses
    /// configs the kernels do not support (head dim other than 64, `dim % 8 != 0`).
    pub fn new(gpu: Arc<Gpu>, config: ModelConfig, max_batch: usize) -> Result<Self> {
        let layout = ParamLayout::new(config)?;
        let cfg = config;
        attention::check_cuda_shape(&AttentionShape {
            batch: max_batch.max(1),
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
            n_tokens: cfg.n_tokens(),
            n_context: cfg.context,
        })?;
        PatchEmbedShape {
            batch: max_batch.max(1),
            image: cfg.image,
            patch: cfg.patch,
            dim: cfg.dim,
            n_context: cfg.context,
        }
        .validate_cuda()?;
        let backend = CudaBackend::new(gpu)?;
        let acts = Activations::new(&backend, &cfg, max_batch)?;
        let gpu = &backend.gpu;
        let params = gpu.zeros::<f32>(layout.total)?;
        let params_bf16 = gpu.zeros::<bf16>(layout.total)?;
        let grads = gpu.zeros::<f32>(layout.total)?;
        let device_bytes = acts.bytes() + layout.total * (4 + 2 + 4);
        Ok(CudaModel { layout, backend, device_bytes, params, params_bf16, grads, acts })
    }

    /// The GPU everything runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.backend.gpu
    }

    /// The cuBLASLt handle the model's GEMMs use.
    pub fn gemm(&self) -> &Gemm {
        &self.backend.gemm
    }

    /// The backend the model's ops run on.
    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }

    /// The largest batch [`Self::step`] takes.
    pub fn max_batch(&self) -> usize {
        self.acts.max_batch()
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
        residual::cuda_f32_to_bf16(&self.backend.gpu, &self.params, &mut self.params_bf16)
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

    /// Forward and, when `backward`, backward of one batch: [`net::step`] on the model's
    /// buffers. `drop_path` is `[depth][2][B]` per-sample scales from [`net::draw_drop_path`]
    /// (`None`: eval mode, all ones). Gradients are accumulated (+=) into the model's f32 gradient
    /// buffer ([`Self::zero_grads`] first for a fresh step). `want_logits` also returns the
    /// decoder logits `[B, P, V]` in rank order, computed with one extra GEMM into a `[B·P, V]`
    /// buffer allocated for the call (meant for small checks, e.g. the golden cases):
    /// `bf16(z Wdec^T) + bdec` in f32, the same values the cross-entropy op works on. Returns
    /// after the loss is read back; the backward's work may still be running on the stream
    /// (anything that reads the gradients waits for it).
    pub fn step(
        &mut self,
        batch: &Batch,
        drop_path: Option<&[[Vec<f32>; 2]]>,
        backward: bool,
        want_logits: bool,
    ) -> Result<ForwardOutput> {
        let CudaModel { layout, backend, params, params_bf16, grads, acts, .. } = self;
        let weights = Weights::<CudaBackend> { master: params.as_view(), act: params_bf16.as_view() };
        let total = layout.total;
        let grads = if backward { Some(grads.view_mut(0..total)?) } else { None };
        net::step(backend, layout, acts, weights, batch, drop_path, grads, want_logits)
    }
}
