//! Every operation of the model, one module each: the CPU reference (`cpu_*`) and the CUDA
//! launcher (`cuda_*`) side by side, with the host-side checks they share.
pub mod cross_entropy;
