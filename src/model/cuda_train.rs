//! One optimizer step of the pre-training recipe on the GPU model: the twin of
//! [`crate::model::train::train_step`], with the AdamW moments and the weight-decay mask living on
//! the device next to the [`CudaModel`]'s parameters, gradients and bf16 copy.
//!
//! The step does what the CPU one does, in the same order, drawing from the generator in the same
//! order (so that, from the same state, both runs see the same permutations and drop-path
//! scales):
//!
//! ```text
//! zero the gradients
//! for each micro-batch:  ranks <- fresh permutations   (when recipe.resample_ranks)
//!                        dp    <- drop-path scales       (net::draw_drop_path, same rng)
//!                        forward + backward, gradients accumulated (+=) on the device
//! loss      = mean over micro-batches of their mean loss               (NaN/Inf: error, nothing changed)
//! grad_norm = ||sum of micro-batch gradients|| / k                       (NaN/Inf: error, nothing changed)
//! clip      = min(1, clip_norm / (grad_norm + 1e-6))
//! AdamW with grad_scale = clip / k, the schedule's lr, the cached decay mask; writes the bf16 copy
//! ```
//!
//! The division by the number of micro-batches `k` is folded into AdamW's gradient scale instead
//! of a separate pass over the gradient (the CPU step scales the buffer first: the two differ by
//! f32 rounding only). The gradient norm is [`gradnorm::cuda_l2_norm`] over the whole flat
//! gradient buffer (padding is zero there), the one point where the step waits for the device.
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
use crate::model::net::{self, Batch};
use crate::model::optim::clip_scale;
use crate::model::params::ParamLayout;
use crate::model::train::{Recipe, StepStats, TrainState};
use crate::ops::adamw::{self, AdamWStep};
use crate::ops::gradnorm;

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

/// Points of a step at which [`train_step_cuda_observed`] calls its observer, e.g. to record CUDA
/// timing events. Only a step that succeeds reaches every point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPoint {
    /// Nothing of the step is queued yet (the next device work is zeroing the gradients).
    Start,
    /// Every micro-batch's forward and backward is queued; the last backward may still be running.
    /// Next come the gradient norm and the update.
    GradientsQueued,
    /// The AdamW update (and the bf16 copy) is queued: the step's last device work.
    UpdateQueued,
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

/// Loss sum, correct, counted over the micro-batches; gradients summed on the device.
fn accumulate(
    model: &mut CudaModel,
    recipe: &Recipe,
    micro_batches: &mut [Batch],
    rng: &mut ChaCha8Rng,
) -> Result<(f64, usize, usize)> {
    let cfg = model.layout.config;
    model.zero_grads()?;
    let (mut loss, mut correct, mut counted) = (0.0f64, 0usize, 0usize);
    for mb in micro_batches.iter_mut() {
        if recipe.resample_ranks {
            mb.resample_ranks(&cfg, rng);
        }
        let dp = net::draw_drop_path(cfg.depth, mb.batch, recipe.drop_path, rng);
        let out = model.step(mb, Some(&dp), true, false)?;
        loss += out.loss as f64;
        correct += out.stats.correct;
        counted += out.stats.counted;
    }
    Ok((loss, correct, counted))
}

/// One update of the recipe on the GPU model: [`crate::model::train::train_step`]'s twin (see
/// the module notes for the sequence).
///
/// A NaN or infinite loss or gradient norm is [`Error::NonFinite`] naming the step that failed
/// (`state.step + 1`); then, as on any error before the update, the state (parameters, their bf16
/// copy, moments, counters, generator) is unchanged and the batches keep the ranks they came
/// with. Only the model's gradient buffer, which every step overwrites, has changed. (A driver
/// error during the update kernel itself would leave the device buffers undefined.)
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
    recipe.validate()?;
    same_gpu(&state.gpu, model)?;
    state.check(&model.layout)?;
    if micro_batches.len() != recipe.micro_batches {
        return Err(Error::Shape {
            tensor: "micro_batches",
            expected: format!("{} micro-batches (recipe.micro_batches)", recipe.micro_batches),
            got: format!("{}", micro_batches.len()),
        });
    }
    let next = state.step + 1;
    let k = recipe.micro_batches;
    let mut rng = state.rng.clone();
    let saved_ranks: Vec<Vec<i32>> =
        if recipe.resample_ranks { micro_batches.iter().map(|b| b.ranks.clone()).collect() } else { Vec::new() };

    observe(StepPoint::Start);
    let checked = accumulate(model, recipe, micro_batches, &mut rng).and_then(|(loss_sum, correct, counted)| {
        observe(StepPoint::GradientsQueued);
        let loss = (loss_sum / k as f64) as f32;
        if !loss.is_finite() {
            return Err(Error::NonFinite { step: next, what: "loss" });
        }
        let grad_norm = gradnorm::cuda_l2_norm(model.gpu(), model.grads())? / k as f32;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { step: next, what: "gradient norm" });
        }
        Ok((loss, correct, counted, grad_norm))
    });
    let restore = |micro_batches: &mut [Batch], saved: Vec<Vec<i32>>| {
        for (b, ranks) in micro_batches.iter_mut().zip(saved) {
            b.ranks = ranks;
        }
    };
    let (loss, correct, counted, grad_norm) = match checked {
        Ok(v) => v,
        Err(e) => {
            restore(micro_batches, saved_ranks);
            return Err(e);
        }
    };

    let clip = clip_scale(grad_norm, recipe.clip_norm);
    let lr = recipe.schedule.lr(state.step);
    let hp = AdamWStep {
        lr,
        beta1: recipe.beta1,
        beta2: recipe.beta2,
        eps: recipe.eps,
        weight_decay: recipe.weight_decay,
        step: next,
        grad_scale: if k == 1 { clip } else { clip / k as f32 },
    };
    let CudaTrainState { m, v, decay_mask, gpu, .. } = state;
    let (params, grads, copy) = model.optimizer_buffers();
    if let Err(e) = adamw::cuda_step(gpu, params, grads, m, v, decay_mask, &hp, Some(copy)) {
        restore(micro_batches, saved_ranks);
        return Err(e);
    }
    observe(StepPoint::UpdateQueued);
    state.step = next;
    state.rng = rng;
    let accuracy = if counted == 0 { 0.0 } else { correct as f64 / counted as f64 };
    Ok(StepStats { loss, accuracy, grad_norm, clip_scale: clip, lr, tokens: counted })
}
