//! The model on the CPU, in f32: [`crate::model::net::step`] over [`CpuBackend`]. It is the
//! model's reference: `mapet check-step` runs it on the golden cases, and the GPU model is
//! checked against it. Parameters and gradients are flat host buffers owned by the caller; the
//! activations are allocated for each call.

use rand::Rng;

use crate::backend::CpuBackend;
use crate::error::Result;
use crate::model::net::{self, Activations, Weights};
use crate::model::params::{ModelConfig, ParamLayout};

pub use crate::model::net::{Batch, ForwardOutput, Images, LN_EPS};

/// The model on the CPU: a parameter layout; parameters and gradients are flat buffers.
pub struct CpuModel {
    /// Parameter layout (config, names, offsets).
    pub layout: ParamLayout,
}

impl CpuModel {
    /// A model of `config`.
    pub fn new(config: ModelConfig) -> Result<Self> {
        Ok(CpuModel { layout: ParamLayout::new(config)? })
    }

    /// Drop-path rate of block `i`: linear from 0 at the first block to `max_rate` at the last.
    pub fn drop_path_rate(&self, i: usize, max_rate: f32) -> f32 {
        net::drop_path_rate(self.layout.config.depth, i, max_rate)
    }

    /// Per-sample drop-path scales for every block and both branches: `[depth][2][B]`, 1/keep or
    /// 0, drawn from `rng`; all ones when `max_rate` is 0 (eval).
    pub fn draw_drop_path(&self, batch: usize, max_rate: f32, rng: &mut impl Rng) -> Vec<[Vec<f32>; 2]> {
        net::draw_drop_path(self.layout.config.depth, batch, max_rate, rng)
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
        batch.validate(&self.layout.config)?;
        let be = CpuBackend;
        let mut acts = Activations::new(&be, &self.layout.config, batch.batch.max(1))?;
        let weights = Weights::<CpuBackend> { master: params, act: params };
        net::step(&be, &self.layout, &mut acts, weights, batch, drop_path, grads, want_logits)
    }

    /// Targets of the query rows in rank order: row j of sample b predicts the token of rank
    /// C + j, whose target is `tokens[b][token - 1]`.
    pub fn targets(&self, batch: &Batch) -> Vec<i32> {
        batch.targets(&self.layout.config)
    }
}
