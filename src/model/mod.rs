//! The MaPeT model: configuration, parameters (one flat buffer, official names), the two-stream
//! forward and backward written once over [`crate::Backend`] ([`net`]), its two owners
//! ([`cpu::CpuModel`], f32, the reference; [`cuda::CudaModel`], bf16 activations and f32 master
//! weights on one GPU), training state, the optimizer step and checkpoints.
//!
//! The optimizer step is written once ([`train`], "The step") and entered on either backend
//! ([`train::train_step`], [`cuda_train::train_step_cuda`]), drawing from the generator in the
//! same order: the CPU state owns its parameters on the host, the GPU model owns them on the
//! device next to their bf16 copy.

pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod cuda_train;
pub mod golden;
pub mod net;
pub mod optim;
pub mod params;
pub mod train;

pub use params::{BlockParams, ModelConfig, ParamLayout, ParamRanges, ParamSpec};
