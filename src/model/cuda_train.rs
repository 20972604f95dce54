//! One optimizer step of the pre-training recipe on the GPU model: the sequence of
//! [`crate::model::train`] ("The step", written once for both backends) over the [`CudaModel`],
//! with the AdamW moments and the weight-decay mask living on the device next to the model's
//! parameters, gradients and bf16 copy.
//!
//! What is the GPU's own: the gradients accumulate in the model's f32 gradient buffer (zeroed on
//! the stream at the start of the step); the gradient norm is [`gradnorm::cuda_l2_norm`] over the
//! whole flat buffer (padding is zero there), the one point where the step waits for the device;
//! the update is [`adamw::cuda_step`], which also rewrites the bf16 copy the GEMMs read.
//!
//! The state's parameters are the model's own f32 buffer; [`CudaTrainState`] holds the rest (the
//! moments, the decay mask uploaded once, the counters and the generator). It converts to and
//! from the host [`TrainState`] ([`CudaTrainState::upload`], [`CudaTrainState::download`]), so
//! checkpoints are written and read by [`crate::model::checkpoint`] unchanged.

use std::sync::Arc;

use rand_chacha::ChaCha8Rng;

use crate::cuda::{DeviceBuffer, Gpu};
use crate::error::{check_len, Error, Result};
use crate::model::cuda::CudaModel;
use crate::model::net::{Batch, ForwardOutput};
use crate::model::params::ParamLayout;
use crate::model::train::{run_step, Recipe, StepParts, StepStats, TrainState};
use crate::ops::adamw::{self, AdamWStep};
use crate::ops::gradnorm;

pub use crate::model::train::StepPoint;

/// The training state on the device, beside a [`CudaModel`] that holds the parameters: AdamW
/// moments, the weight-decay mask (uploaded once), counters and the generator.
pub struct CudaTrainState {
    /// AdamW first moments (flat, [`ParamLayout`] order, padding included).
    pub m: DeviceBuffer<f32>,
    /// AdamW second moments.
    pub v: DeviceBuffer<f32>,
    /// 1 where AdamW decays the element ([`ParamLayout::decay_mask`]).
    pub decay_mask: DeviceBuffer<u8>,
    /// Updates done so far.
    pub step: u64,
    /// Epochs completed (kept by the data loop; the step does not change it).
    pub epoch: u64,
    /// The run's one generator (permutations, drop path).
    pub rng: ChaCha8Rng,
    /// The device the buffers live on: the model's.
    gpu: Arc<Gpu>,
}

impl CudaTrainState {
    /// Puts a host state on the device: the parameters into `model` (its bf16 copy refreshed), the
    /// moments and the layout's decay mask into new buffers. `gpu` must be the `Arc` the model was
    /// created with.
    pub fn upload(gpu: &Arc<Gpu>, model: &mut CudaModel, state: &TrainState) -> Result<Self> {
        same_gpu(gpu, model)?;
        state.check(&model.layout)?;
        model.upload_params(&state.params)?;
        Ok(CudaTrainState {
            m: gpu.upload(&state.m)?,
            v: gpu.upload(&state.v)?,
            decay_mask: gpu.upload(model.layout.decay_mask())?,
            step: state.step,
            epoch: state.epoch,
            rng: state.rng.clone(),
            gpu: gpu.clone(),
        })
    }

    /// The host state (parameters from `model`), e.g. for [`crate::model::checkpoint::save`].
    /// Waits for the device.
    pub fn download(&self, model: &CudaModel) -> Result<TrainState> {
        same_gpu(&self.gpu, model)?;
        self.check(&model.layout)?;
        Ok(TrainState {
            params: model.download_params()?,
            m: self.m.to_host()?,
            v: self.v.to_host()?,
            step: self.step,
            epoch: self.epoch,
            rng: self.rng.clone(),
        })
    }

    /// The device the state lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Bytes of device memory the state holds (moments and mask).
    pub fn device_bytes(&self) -> usize {
        self.m.len() * 4 + self.v.len() * 4 + self.decay_mask.len()
    }

    /// Checks the buffer sizes against `layout`.
    pub fn check(&self, layout: &ParamLayout) -> Result<()> {
        check_len("state.m", self.m.len(), layout.total)?;
        check_len("state.v", self.v.len(), layout.total)?;
        check_len("state.decay_mask", self.decay_mask.len(), layout.total)
    }
}

fn same_gpu(gpu: &Arc<Gpu>, model: &CudaModel) -> Result<()> {
    if std::ptr::eq(Arc::as_ptr(gpu), model.gpu()) {
        Ok(())
    } else {
        Err(Error::Unsupported {
            what: "GPU",
            detail: "the training state must live on the model's GPU (the Arc<Gpu> the model was created with)".into(),
        })
    }
}

/// The GPU model's parts of a step: parameters, gradients and bf16 copy are the model's, the
/// moments and the decay mask the state's.
struct CudaStep<'a> {
    model: &'a mut CudaModel,
    state: &'a mut CudaTrainState,
    observe: &'a mut dyn FnMut(StepPoint),
}

impl StepParts for CudaStep<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }

    fn check(&self) -> Result<()> {
        same_gpu(&self.state.gpu, self.model)?;
        self.state.check(&self.model.layout)
    }

    fn counters(&mut self) -> (&mut u64, &mut ChaCha8Rng) {
        (&mut self.state.step, &mut self.state.rng)
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.model.zero_grads()
    }

    fn forward_backward(&mut self, batch: &Batch, drop_path: &[[Vec<f32>; 2]]) -> Result<ForwardOutput> {
        self.model.step(batch, Some(drop_path), true, false)
    }

    fn grad_norm(&mut self) -> Result<f32> {
        gradnorm::cuda_l2_norm(self.model.gpu(), self.model.grads())
    }

    fn update(&mut self, hp: &AdamWStep) -> Result<()> {
        let CudaTrainState { m, v, decay_mask, gpu, .. } = &mut *self.state;
        let (params, grads, copy) = self.model.optimizer_buffers();
        adamw::cuda_step(gpu, params, grads, m, v, decay_mask, hp, Some(copy))
    }

    fn observe(&mut self, point: StepPoint) {
        (self.observe)(point)
    }
}

/// One update of the recipe on the GPU model (the sequence of [`crate::model::train`], "The
/// step"; [`crate::model::train::train_step`] runs the same on the CPU).
///
/// A NaN or infinite loss or gradient norm is [`Error::NonFinite`] naming the step that failed
/// (`state.step + 1`); then, as on any error before the update, the state (parameters, their bf16
/// copy, moments, counters, generator) is unchanged and the batches keep the ranks they came
/// with. Only the model's gradient buffer, which every step overwrites, has changed. (A driver
/// error during the update kernel itself would leave the device buffers undefined; the counters,
/// the generator and the ranks are restored then too.)
pub fn train_step_cuda(
    model: &mut CudaModel,
    state: &mut CudaTrainState,
    recipe: &Recipe,
    micro_batches: &mut [Batch],
) -> Result<StepStats> {
    train_step_cuda_observed(model, state, recipe, micro_batches, &mut |_| {})
}

/// [`train_step_cuda`], calling `observe` at each [`StepPoint`] it reaches (in order), e.g. to
/// record CUDA events around the gradient and update phases.
pub fn train_step_cuda_observed(
    model: &mut CudaModel,
    state: &mut CudaTrainState,
    recipe: &Recipe,
    micro_batches: &mut [Batch],
    observe: &mut dyn FnMut(StepPoint),
) -> Result<StepStats> {
    run_step(&mut CudaStep { model, state, observe }, recipe, micro_batches)
}
