//! The training state and one optimizer step of the pre-training recipe (SPEC.md, "Pre-training
//! recipe"): gradient accumulation over micro-batches, global-norm clipping folded into AdamW's
//! gradient scale, the learning-rate schedule, and one seeded generator for everything random in a
//! step (permutations, drop path), whose exact position is part of the state so that a resumed run
//! repeats an uninterrupted one bit for bit.
//!
//! # The step
//!
//! The sequence is written once (`run_step`, over a backend's `StepParts`) and run by both entry
//! points: [`train_step`] on the CPU model (host state, the gradient in a host buffer of the step)
//! and [`crate::model::cuda_train::train_step_cuda`] on the GPU model (parameters, gradient and
//! moments on the device). Only zeroing the gradient, the forward and backward of a micro-batch,
//! the gradient norm and the AdamW update differ between them. With `k` micro-batches:
//!
//! ```text
//! check the recipe, the state, and that there are k micro-batches      (error: nothing changed)
//! rng = a copy of the state's generator
//! zero the gradients
//! for each micro-batch, in order:
//!     ranks <- fresh permutations from rng                  (when recipe.resample_ranks)
//!     dp    <- drop-path scales from rng                    (net::draw_drop_path)
//!     forward + backward, gradients summed (+=) into one buffer
//! loss      = mean over the micro-batches of their mean loss              (NaN/Inf: error)
//! grad_norm = ||sum of the micro-batch gradients|| / k                      (NaN/Inf: error)
//! clip      = min(1, clip_norm / (grad_norm + 1e-6))           (optim::clip_scale; 1 when off)
//! AdamW with grad_scale = clip / k, lr = schedule.lr(state.step), step = state.step + 1 and the
//!       layout's decay mask (on the GPU it also rewrites the bf16 copy)
//! state.step += 1; state.rng = rng
//! ```
//!
//! Both backends draw from the generator in the same order, so from the same state they see the
//! same permutations and drop-path scales. The mean over micro-batches is the gradient's sum
//! scaled by 1/k, folded into the norm and into AdamW's gradient scale rather than a pass over
//! the gradient (it differs from scaling the buffer first by f32 rounding only, and not at all
//! when k is a power of two). The mean of the micro-batches' mean losses equals the mean over the
//! whole batch when every micro-batch predicts the same number of tokens, as MaPeT's micro-batches
//! of equal size do (P tokens per image).
//!
//! On any error (a NaN or infinite loss or gradient norm is [`Error::NonFinite`] naming the step,
//! `state.step + 1`) the state's counters and generator are unchanged and the batches get back
//! the ranks they came with; errors before the update leave the parameters and moments unchanged
//! too.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{check_len, Error, Result};
use crate::model::cpu::{Batch, CpuModel};
use crate::model::net::{self, ForwardOutput};
use crate::model::optim::{clip_scale, scaled_peak_lr, LrSchedule, BASE_PEAK_LR};
use crate::model::params::ParamLayout;
use crate::ops::adamw::{self, AdamWStep};
use crate::ops::gradnorm;

/// Images in ImageNet-1k's training set.
pub const IMAGENET_TRAIN_IMAGES: usize = 1_281_167;

/// The hyper-parameters of pre-training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Learning rate per update (peak already scaled to the global batch).
    pub schedule: LrSchedule,
    /// AdamW's decoupled weight decay, on the parameters the layout's decay mask marks.
    pub weight_decay: f32,
    /// AdamW's first-moment decay.
    pub beta1: f32,
    /// AdamW's second-moment decay.
    pub beta2: f32,
    /// AdamW's epsilon.
    pub eps: f32,
    /// Maximum global L2 norm of the gradient (0 disables clipping).
    pub clip_norm: f32,
    /// Drop-path rate of the last block (linear from 0 at the first block).
    pub drop_path: f32,
    /// Micro-batches per update (gradient accumulation); the global batch is their sum.
    pub micro_batches: usize,
    /// Draw a fresh permutation for every sample of every micro-batch at every step, from the
    /// state's generator (MaPeT samples a new permutation per image per iteration). Off, the
    /// batches' ranks are used as given.
    pub resample_ranks: bool,
    /// Seed of the state's generator (initialisation, permutations, drop path).
    pub seed: u64,
}

impl Recipe {
    /// The paper's recipe for a global batch of `batch` images and `steps_per_epoch` updates per
    /// epoch: AdamW (0.9, 0.999, 1e-8), weight decay 0.05, peak lr 1.5e-3 * batch / 2048 reached
    /// after 10 warmup epochs from 1e-6, cosine to 1e-5 at 300 epochs, clipping at 3.0, drop path
    /// 0.1, one micro-batch, fresh permutations every step, seed 0.
    pub fn paper(batch: usize, steps_per_epoch: u64) -> Self {
        Recipe {
            schedule: LrSchedule::new(scaled_peak_lr(BASE_PEAK_LR, batch), 10 * steps_per_epoch, 300 * steps_per_epoch),
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 3.0,
            drop_path: 0.1,
            micro_batches: 1,
            resample_ranks: true,
            seed: 0,
        }
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, detail: String| Err(Error::Unsupported { what, detail });
        let s = &self.schedule;
        for (name, lr) in [("peak_lr", s.peak_lr), ("warmup_start_lr", s.warmup_start_lr), ("final_lr", s.final_lr)] {
            if !(lr.is_finite() && lr >= 0.0) {
                return bad("recipe learning rate", format!("{name} = {lr} must be finite and >= 0"));
            }
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("recipe betas", format!("({}, {}) must lie in [0, 1)", self.beta1, self.beta2));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("recipe eps", format!("{} must be positive", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("recipe weight_decay", format!("{} must be finite and >= 0", self.weight_decay));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            return bad("recipe clip_norm", format!("{} must be finite and >= 0 (0 disables)", self.clip_norm));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return bad("recipe drop_path", format!("{} must lie in [0, 1)", self.drop_path));
        }
        if self.micro_batches == 0 {
            return bad("recipe micro_batches", "must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for Recipe {
    /// The paper's recipe at batch 2048 on ImageNet-1k (625 full batches per epoch).
    fn default() -> Self {
        let batch = 2048;
        Recipe::paper(batch, (IMAGENET_TRAIN_IMAGES / batch) as u64)
    }
}

/// The exact position of a ChaCha8 generator: restoring it gives the same stream from there on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngState {
    /// The 32-byte key.
    pub seed: [u8; 32],
    /// The stream (nonce).
    pub stream: u64,
    /// Words (u32) consumed so far.
    pub word_pos: u128,
}

impl RngState {
    /// The position of `rng`.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos() }
    }

    /// A generator at this position.
    pub fn restore(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// Everything that changes during training: parameters, AdamW moments, counters and the
/// generator. Buffers are flat, of the layout's size (padding included).
#[derive(Clone, Debug)]
pub struct TrainState {
    /// Parameters.
    pub params: Vec<f32>,
    /// AdamW first moments.
    pub m: Vec<f32>,
    /// AdamW second moments.
    pub v: Vec<f32>,
    /// Updates done so far.
    pub step: u64,
    /// Epochs completed (kept by the data loop; [`train_step`] does not change it).
    pub epoch: u64,
    /// The one generator of the run: initialisation, then permutations and drop path.
    pub rng: ChaCha8Rng,
}

impl TrainState {
    /// A fresh state: the authors' initialisation drawn from a generator seeded with `seed`,
    /// zero moments, step and epoch 0; the generator continues from where the init left it.
    pub fn new(layout: &ParamLayout, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params = layout.init(&mut rng);
        TrainState { params, m: vec![0.0; layout.total], v: vec![0.0; layout.total], step: 0, epoch: 0, rng }
    }

    /// Checks the buffer sizes against `layout`.
    pub fn check(&self, layout: &ParamLayout) -> Result<()> {
        check_len("state.params", self.params.len(), layout.total)?;
        check_len("state.m", self.m.len(), layout.total)?;
        check_len("state.v", self.v.len(), layout.total)
    }
}

/// What one update reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean over the micro-batches of their mean cross-entropy (the loss the gradient is of).
    pub loss: f32,
    /// Fraction of predicted tokens whose argmax is the target, over all micro-batches.
    pub accuracy: f64,
    /// Global L2 norm of the averaged gradient, before clipping.
    pub grad_norm: f32,
    /// The factor clipping applied to the gradient (1 when the norm is within the limit).
    pub clip_scale: f32,
    /// Learning rate of this update.
    pub lr: f32,
    /// Predicted tokens over all micro-batches.
    pub tokens: usize,
}

/// Points of an optimizer step at which an observer is called, in this order (e.g. by
/// [`crate::model::cuda_train::train_step_cuda_observed`], to record CUDA timing events). Only a
/// step that succeeds reaches every point. On the GPU "queued" means launched on the stream; on
/// the CPU the work is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPoint {
    /// Nothing of the step is queued yet (the next work is zeroing the gradients).
    Start,
    /// Every micro-batch's forward and backward is queued; the last backward may still be running.
    /// Next come the gradient norm and the update.
    GradientsQueued,
    /// The AdamW update (and on the GPU the bf16 copy) is queued: the step's last work.
    UpdateQueued,
}

/// What one optimizer step does where the model lives; the sequence around these parts is
/// [`run_step`], the same on every backend (see the module docs).
pub(crate) trait StepParts {
    /// The model's parameter layout.
    fn layout(&self) -> &ParamLayout;
    /// Checks the state against the model (buffer sizes, device) before anything runs.
    fn check(&self) -> Result<()>;
    /// The state's count of updates done and its generator.
    fn counters(&mut self) -> (&mut u64, &mut ChaCha8Rng);
    /// Sets the gradient accumulator to zero.
    fn zero_grads(&mut self) -> Result<()>;
    /// Forward and backward of one micro-batch with its drop-path scales, the gradient added
    /// (+=) to the accumulator.
    fn forward_backward(&mut self, batch: &Batch, drop_path: &[[Vec<f32>; 2]]) -> Result<ForwardOutput>;
    /// Global L2 norm of the accumulator (the sum of the micro-batches' gradients).
    fn grad_norm(&mut self) -> Result<f32>;
    /// AdamW on the parameters and moments from the accumulator with `hp` (its `grad_scale`
    /// includes the 1/k of the mean over micro-batches).
    fn update(&mut self, hp: &AdamWStep) -> Result<()>;
    /// Called at each [`StepPoint`] the step reaches.
    fn observe(&mut self, _point: StepPoint) {}
}

/// One update of the recipe (the sequence of the module docs) over `parts`: checks, then
/// [`accumulate_and_update`]; on success the state's step advances and its generator moves on,
/// on any error both stay and the batches get their ranks back.
pub(crate) fn run_step(parts: &mut impl StepParts, recipe: &Recipe, micro_batches: &mut [Batch]) -> Result<StepStats> {
    recipe.validate()?;
    parts.check()?;
    if micro_batches.len() != recipe.micro_batches {
        return Err(Error::Shape {
            tensor: "micro_batches",
            expected: format!("{} micro-batches (recipe.micro_batches)", recipe.micro_batches),
            got: format!("{}", micro_batches.len()),
        });
    }
    let (done, rng) = parts.counters();
    let (done, mut rng) = (*done, rng.clone());
    let saved_ranks: Vec<Vec<i32>> =
        if recipe.resample_ranks { micro_batches.iter().map(|b| b.ranks.clone()).collect() } else { Vec::new() };
    match accumulate_and_update(parts, recipe, micro_batches, done, &mut rng) {
        Ok(stats) => {
            let (step, state_rng) = parts.counters();
            *step = done + 1;
            *state_rng = rng;
            Ok(stats)
        }
        Err(e) => {
            for (b, ranks) in micro_batches.iter_mut().zip(saved_ranks) {
                b.ranks = ranks;
            }
            Err(e)
        }
    }
}

/// The work of one update after `done` updates, drawing from `rng` (a copy of the state's).
fn accumulate_and_update(
    parts: &mut impl StepParts,
    recipe: &Recipe,
    micro_batches: &mut [Batch],
    done: u64,
    rng: &mut ChaCha8Rng,
) -> Result<StepStats> {
    let cfg = parts.layout().config;
    let next = done + 1;
    let k = recipe.micro_batches;
    parts.observe(StepPoint::Start);
    parts.zero_grads()?;
    let (mut loss_sum, mut correct, mut counted) = (0.0f64, 0usize, 0usize);
    for mb in micro_batches.iter_mut() {
        if recipe.resample_ranks {
            mb.resample_ranks(&cfg, rng);
        }
        let dp = net::draw_drop_path(cfg.depth, mb.batch, recipe.drop_path, rng);
        let out = parts.forward_backward(mb, &dp)?;
        loss_sum += out.loss as f64;
        correct += out.stats.correct;
        counted += out.stats.counted;
    }
    parts.observe(StepPoint::GradientsQueued);
    let loss = (loss_sum / k as f64) as f32;
    if !loss.is_finite() {
        return Err(Error::NonFinite { step: next, what: "loss" });
    }
    let grad_norm = parts.grad_norm()? / k as f32;
    if !grad_norm.is_finite() {
        return Err(Error::NonFinite { step: next, what: "gradient norm" });
    }
    let clip = clip_scale(grad_norm, recipe.clip_norm);
    let lr = recipe.schedule.lr(done);
    let hp = AdamWStep {
        lr,
        beta1: recipe.beta1,
        beta2: recipe.beta2,
        eps: recipe.eps,
        weight_decay: recipe.weight_decay,
        step: next,
        grad_scale: clip / k as f32,
    };
    parts.update(&hp)?;
    parts.observe(StepPoint::UpdateQueued);
    let accuracy = if counted == 0 { 0.0 } else { correct as f64 / counted as f64 };
    Ok(StepStats { loss, accuracy, grad_norm, clip_scale: clip, lr, tokens: counted })
}

/// The CPU model's parts of a step: the parameters and moments are the host state's, the
/// gradient a host buffer of the step.
struct CpuStep<'a> {
    model: &'a CpuModel,
    state: &'a mut TrainState,
    grads: Vec<f32>,
}

impl StepParts for CpuStep<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }

    fn check(&self) -> Result<()> {
        self.state.check(&self.model.layout)
    }

    fn counters(&mut self) -> (&mut u64, &mut ChaCha8Rng) {
        (&mut self.state.step, &mut self.state.rng)
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.grads.clear();
        self.grads.resize(self.model.layout.total, 0.0);
        Ok(())
    }

    fn forward_backward(&mut self, batch: &Batch, drop_path: &[[Vec<f32>; 2]]) -> Result<ForwardOutput> {
        self.model.step(&self.state.params, batch, Some(drop_path), Some(&mut self.grads), false)
    }

    fn grad_norm(&mut self) -> Result<f32> {
        Ok(gradnorm::cpu_l2_norm(&self.grads))
    }

    fn update(&mut self, hp: &AdamWStep) -> Result<()> {
        let TrainState { params, m, v, .. } = &mut *self.state;
        adamw::cpu_step(params, &self.grads, m, v, self.model.layout.decay_mask(), hp, None)
    }
}

/// One update of the recipe on the CPU model (the sequence of the module docs), the gradient in a
/// host buffer of the step.
///
/// A NaN or infinite loss or gradient norm is [`Error::NonFinite`] naming the step that failed
/// (`state.step + 1`); then, as on any error, the state is unchanged (the generator included) and
/// the batches keep the ranks they came with.
pub fn train_step(
    model: &CpuModel,
    state: &mut TrainState,
    recipe: &Recipe,
    micro_batches: &mut [Batch],
) -> Result<StepStats> {
    run_step(&mut CpuStep { model, state, grads: Vec::new() }, recipe, micro_batches)
}
