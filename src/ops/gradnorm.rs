//! Global L2 norm of a flat f32 buffer, `sqrt(sum x^2)`: the gradient norm for clipping.
//!
//! The CPU reference accumulates in f64. The GPU (`cuda/gradnorm.cu`) sums squares in f32 per
//! thread and block, then the block partials in f64, in a fixed order: the same input gives the
//! same bits on every run, and the number of partials depends only on the length, not the card.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use crate::cuda::params::MapetSquareSum;
use crate::cuda::{DeviceBuffer, Gpu};
use crate::error::{Error, Result};

const MODULE: &str = "gradnorm";
const THREADS: u32 = 256;
/// Elements per thread the partial kernel aims for (four 16-byte loads at least).
const ELEMS_PER_THREAD: usize = 16;
/// Upper bound on the number of block partials (about one wave of 256-thread blocks on an H100).
const MAX_PARTIALS: usize = 1024;
const CPU_CHUNK: usize = 64 * 1024;

/// sqrt(sum x^2) with f64 accumulation (fixed chunks, so the result does not depend on threads).
pub fn cpu_l2_norm(x: &[f32]) -> f32 {
    let sums: Vec<f64> = x.par_chunks(CPU_CHUNK).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum()).collect();
    sums.iter().sum::<f64>().sqrt() as f32
}

/// Number of block partials for `n` elements.
fn num_partials(n: usize) -> usize {
    n.div_ceil(THREADS as usize * ELEMS_PER_THREAD).clamp(1, MAX_PARTIALS)
}

/// sqrt(sum x^2) on the GPU (two passes, deterministic); waits for the result.
pub fn cuda_l2_norm(gpu: &Gpu, x: &DeviceBuffer<f32>) -> Result<f32> {
    let n = x.len();
    if n == 0 {
        return Ok(0.0);
    }
    if (x.ptr() as usize) & 15 != 0 {
        return Err(Error::Alignment { tensor: "x", detail: "the norm kernel needs a 16-byte aligned buffer".into() });
    }
    let parts = num_partials(n);
    let partial = gpu.alloc::<f32>(parts)?;
    let out = gpu.alloc::<f32>(1)?;
    let params = MapetSquareSum {
        x: x.f32_ptr(),
        partial: partial.f32_ptr(),
        out: out.f32_ptr(),
        n: n as i64,
        num_partials: parts as i32,
    };
    let cfg = LaunchConfig { grid_dim: (parts as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: x holds n f32, 16-byte aligned (checked above); partial holds `parts` f32 = the grid
    // size, and block b writes only partial[b].
    unsafe { gpu.launch_dependent(MODULE, "square_sum_partial", cfg, &params) }?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: reads partial[..parts], written by the launch above on the same stream, and writes
    // out[0] of its one-element allocation.
    unsafe { gpu.launch_dependent(MODULE, "square_sum_final", cfg, &params) }?;
    let host = out.to_host()?;
    drop(partial);
    Ok(host[0])
}
