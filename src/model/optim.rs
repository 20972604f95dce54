//! The optimizer's schedule and helpers of the pre-training recipe (SPEC.md, "Pre-training
//! recipe"): the learning-rate schedule, the linear batch-size scaling of the peak rate, and the
//! gradient-clipping factor. The AdamW update itself is [`crate::ops::adamw`].

use serde::{Deserialize, Serialize};

/// Learning rate as a function of the optimizer step: linear warmup, then a half cosine.
///
/// With `s` the number of updates already done (0 for the first update), `W = warmup_steps`,
/// `T = total_steps`:
///
/// ```text
/// s <  W:        lr = warmup_start_lr + (peak_lr - warmup_start_lr) * s / W
/// W <= s <= T:   lr = final_lr + (peak_lr - final_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2
/// s >  T:        lr = final_lr
/// ```
///
/// so the first update uses `warmup_start_lr`, update `W` uses `peak_lr` (when `T > W`), and update
/// `T` reaches `final_lr`. The paper warms up for 10 of 300 epochs from 1e-6 to the peak and decays to 1e-5;
/// in steps, `W = 10 * steps_per_epoch` and `T = 300 * steps_per_epoch`. This is the per-step
/// form of the BEiT-style `cosine_scheduler` the authors' code builds on; that one takes its warmup
/// from a `linspace` that reaches the peak one step earlier, a difference of one step in 3 * 10^5.
/// The arithmetic is in f64, rounded to f32 once.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Rate at the end of the warmup.
    pub peak_lr: f32,
    /// Updates of linear warmup (0: start at the peak).
    pub warmup_steps: u64,
    /// Update at which the cosine reaches `final_lr`.
    pub total_steps: u64,
    /// Rate of the first update (SPEC: 1e-6).
    pub warmup_start_lr: f32,
    /// Rate at and after `total_steps` (SPEC: 1e-5).
    pub final_lr: f32,
}

impl LrSchedule {
    /// The recipe's schedule: warmup from 1e-6 to `peak_lr` over `warmup_steps`, cosine to 1e-5 at
    /// `total_steps`.
    pub fn new(peak_lr: f32, warmup_steps: u64, total_steps: u64) -> Self {
        LrSchedule { peak_lr, warmup_steps, total_steps, warmup_start_lr: 1e-6, final_lr: 1e-5 }
    }

    /// The rate of the update that follows `step` completed updates (see the type's formula).
    pub fn lr(&self, step: u64) -> f32 {
        let (peak, start, end) = (self.peak_lr as f64, self.warmup_start_lr as f64, self.final_lr as f64);
        let (w, t) = (self.warmup_steps, self.total_steps);
        let lr = if step < w {
            start + (peak - start) * step as f64 / w as f64
        } else if step >= t {
            // Also covers T <= W (no cosine phase): the final rate right after the warmup.
            end
        } else {
            let progress = (step - w) as f64 / (t - w) as f64;
            end + (peak - end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        };
        lr as f32
    }
}

/// The global batch the recipe's base rate is quoted for.
pub const BASE_BATCH: usize = 2048;

/// The paper's peak rate at [`BASE_BATCH`] images per update.
pub const BASE_PEAK_LR: f32 = 1.5e-3;

/// Linear scaling of the peak rate with the global batch (images per update, all micro-batches
/// together): `base_lr_at_2048 * batch / 2048`, so 1.5e-3 at 2048 gives 7.5e-4 at 1024.
pub fn scaled_peak_lr(base_lr_at_2048: f32, batch: usize) -> f32 {
    (base_lr_at_2048 as f64 * batch as f64 / BASE_BATCH as f64) as f32
}

/// The factor PyTorch's `clip_grad_norm_` multiplies every gradient by:
/// `min(1, max_norm / (global_norm + 1e-6))`, i.e. `max_norm / (norm + 1e-6)` when the norm is
/// above the limit and 1 otherwise (the 1e-6 keeps the clipped norm just under `max_norm`). A
/// non-positive or non-finite `max_norm` disables clipping (factor 1). The caller checks that
/// `global_norm` is finite; a NaN norm gives a NaN factor.
pub fn clip_scale(global_norm: f32, max_norm: f32) -> f32 {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return 1.0;
    }
    let coef = max_norm / (global_norm + 1e-6);
    if global_norm.is_nan() {
        f32::NAN
    } else {
        coef.min(1.0)
    }
}
