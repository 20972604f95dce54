//! The MaPeT model: configuration, parameters (one flat buffer, official names), the two-stream
//! forward and backward on the CPU ([`cpu::CpuModel`], f32, the reference) and on the GPU
//! ([`cuda::CudaModel`], bf16 activations, f32 master weights), training state and checkpoints.
//!
//! The two models follow the same sequence of ops, step for step; they are two files rather than
//! one generic over [`crate::Backend`] because the GPU path fuses and reuses buffers differently
//! (views into flat device buffers, GEMM epilogues). Keeping them in lock step is what
//! `tests/model_gpu.rs` checks.

pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod cuda_train;
pub mod golden;
pub mod optim;
pub mod params;
pub mod train;

pub use params::{ModelConfig, ParamLayout, ParamSpec};
