//! Every operation of the model, one module each: the CPU reference (`cpu_*`) and the CUDA
//! launcher (`cuda_*`) side by side, with the host-side checks they share.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod gelu;
pub mod gradnorm;
pub mod kmeans;
pub mod layernorm;
pub mod patch_embed;
pub mod residual;
