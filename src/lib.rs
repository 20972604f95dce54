//! # mapet: kernels for MaPeT pre-training
//!
//! MaPeT (Masked and Permuted Vision Transformer, arXiv 2306.07346) pre-trains a ViT by
//! predicting the codebook ids of image patches in a random order, with XLNet-style two-stream
//! attention: a content stream and a query stream that share keys and values. This crate holds
//! every operation of that model twice, with the same signature:
//!
//! - a CPU implementation in f32 ([`ops`], `cpu` functions): the readable reference that the GPU
//!   kernels are tested against, and a backend that runs tiny models anywhere;
//! - a CUDA implementation ([`ops`], `cuda` functions) over hand-written kernels in `cuda/*.cu`,
//!   compiled by `build.rs` and launched through [`cuda::Gpu`], and cuBLASLt GEMMs ([`cuda::gemm`]).
//!
//! The [`Backend`] trait puts the two implementations of each op behind one signature, and the
//! model's forward and backward ([`model::net`]) are written once over it.
//! See `cuda/params.h` for the parameter struct of every kernel.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod emulate;
pub mod error;
pub mod io;
pub mod model;
pub mod ops;
pub mod perm;
pub mod testing;

pub use backend::{Backend, CpuBackend, CudaBackend};
pub use error::{Error, Result};
