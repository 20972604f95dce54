//! GELU, exact (erf) form: `y = x * 0.5 * (1 + erf(x / sqrt(2)))`, and its backward
//! `dx = dy * (Phi(x) + x * phi(x))`. Elementwise over flat tensors; bf16 on the GPU
//! (`cuda/gelu.cu`), f32 on the CPU.
//!
//! Rust's standard library has no `erf`, so this module carries one ([`erf`], f64, accurate to a
//! few ulp): the CPU reference evaluates GELU in f64 and rounds once to f32.

use cudarc::driver::LaunchConfig;
use half::bf16;
use rayon::prelude::*;

use crate::cuda::params::MapetGelu;
use crate::cuda::{blocks_for, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};

const MODULE: &str = "gelu";
const THREADS: u32 = 256;
/// `gelu_bwd_recompute_colsum`'s block (kColThreads), each thread owning 8 columns.
const COL_THREADS: u32 = 128;
/// `gelu_colsum_finish`: columns per block (kFinishCols) and threads (columns x kFinishSlices).
const FINISH_COLS: u32 = 32;
const FINISH_THREADS: u32 = 256;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// The error function in f64.
///
/// For |x| < 3 the series `erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n (2x^2)^n x / (1*3*...*(2n+1))`
/// (all terms positive, so no cancellation); beyond, `1 - erfc(x)` with erfc from its continued
/// fraction `exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))`.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 3.0 {
        let x2 = a * a;
        let mut term = a;
        let mut sum = a;
        let mut k = 0.0;
        while term > sum * 1e-17 {
            k += 1.0;
            term *= 2.0 * x2 / (2.0 * k + 1.0);
            sum += term;
        }
        std::f64::consts::FRAC_2_SQRT_PI * (-x2).exp() * sum
    } else if a < 27.0 {
        let mut t = a;
        for k in (1..=60).rev() {
            t = a + (k as f64 * 0.5) / t;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * t)
    } else {
        1.0
    };
    r.copysign(x)
}

/// GELU(x) in f64.
pub fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// GELU'(x) in f64.
pub fn gelu_grad_f64(x: f64) -> f64 {
    0.5 * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

/// y = GELU(x) on the CPU.
pub fn cpu_forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    check_len("y", y.len(), x.len())?;
    y.par_iter_mut().zip(x.par_iter()).with_min_len(4096).for_each(|(y, &x)| *y = gelu_f64(x as f64) as f32);
    Ok(())
}

/// dx = dy * GELU'(x) on the CPU.
pub fn cpu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    check_len("dy", dy.len(), x.len())?;
    check_len("dx", dx.len(), x.len())?;
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dy.par_iter()))
        .with_min_len(4096)
        .for_each(|(dx, (&x, &dy))| *dx = (dy as f64 * gelu_grad_f64(x as f64)) as f32);
    Ok(())
}

/// The kernel parameters with every pointer null and every size 0.
fn unused_params() -> MapetGelu {
    MapetGelu {
        x: std::ptr::null(),
        dy: std::ptr::null(),
        out: std::ptr::null_mut(),
        out_y: std::ptr::null_mut(),
        partial: std::ptr::null_mut(),
        col_sums: std::ptr::null_mut(),
        n: 0,
        cols: 0,
        groups: 0,
    }
}

fn check_aligned(tensor: &'static str, buf: &dyn DeviceRead<bf16>) -> Result<()> {
    if (buf.ptr() as usize) & 15 == 0 {
        Ok(())
    } else {
        Err(Error::Alignment { tensor, detail: "GELU kernels need 16-byte aligned buffers".into() })
    }
}

fn launch_config(n: usize) -> Result<LaunchConfig> {
    // One 8-element vector per thread; the n % 8 tail needs at most 7 threads.
    let threads = (n / 8).max(n % 8) as u64;
    Ok(LaunchConfig {
        grid_dim: (blocks_for("GELU elements", threads, u64::from(THREADS))?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// y = GELU(x) on the GPU, bf16 in and out.
pub fn cuda_forward(gpu: &Gpu, x: &dyn DeviceRead<bf16>, y: &mut dyn DeviceWrite<bf16>) -> Result<()> {
    check_len("y", y.len(), x.len())?;
    check_aligned("x", x)?;
    check_aligned("y", y)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let params = MapetGelu { x: x.ptr(), out: y.ptr_mut(), n: n as i64, ..unused_params() };
    let cfg = launch_config(n)?;
    // SAFETY: x and y hold n bf16 each, 16-byte aligned (checked above); the kernel reads x[..n]
    // and writes y[..n] only, and does not touch dy.
    unsafe { gpu.launch_dependent(MODULE, "gelu_fwd", cfg, &params) }
}

/// dx = dy * GELU'(x) on the GPU, bf16 in and out.
pub fn cuda_backward(
    gpu: &Gpu,
    x: &dyn DeviceRead<bf16>,
    dy: &dyn DeviceRead<bf16>,
    dx: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    check_len("dy", dy.len(), x.len())?;
    check_len("dx", dx.len(), x.len())?;
    check_aligned("x", x)?;
    check_aligned("dy", dy)?;
    check_aligned("dx", dx)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let params = MapetGelu { x: x.ptr(), dy: dy.ptr(), out: dx.ptr_mut(), n: n as i64, ..unused_params() };
    let cfg = launch_config(n)?;
    // SAFETY: x, dy and dx hold n bf16 each, 16-byte aligned (checked above); the kernel reads
    // x[..n] and dy[..n] and writes dx[..n] only.
    unsafe { gpu.launch_dependent(MODULE, "gelu_bwd", cfg, &params) }
}

/// dx = dy * GELU'(x) and y = GELU(x) on the GPU in one pass over x, bf16 `[rows, cols]`, with the
/// column sums of dx (the bf16 values written) added to `dx_col_sums` (f32 `[cols]`): y and dx are
/// written to be what [`cuda_forward`] and [`cuda_backward`] write, bit for bit (tests/gelu.rs
/// asserts it on a GPU), and the sums are the bias
/// gradient of the Linear whose output gradient dx is. For a backward that recomputes the
/// activation it did not keep; `cols % 8 == 0`. Deterministic (fixed-order sums, no atomics).
pub fn cuda_backward_recompute(
    gpu: &Gpu,
    x: &dyn DeviceRead<bf16>,
    dy: &dyn DeviceRead<bf16>,
    cols: usize,
    dx: &mut dyn DeviceWrite<bf16>,
    y: &mut dyn DeviceWrite<bf16>,
    dx_col_sums: &mut dyn DeviceWrite<f32>,
) -> Result<()> {
    check_len("dy", dy.len(), x.len())?;
    check_len("dx", dx.len(), x.len())?;
    check_len("y", y.len(), x.len())?;
    check_len("dx_col_sums", dx_col_sums.len(), cols)?;
    if cols == 0 || !cols.is_multiple_of(8) || !x.len().is_multiple_of(cols) {
        return Err(Error::Shape {
            tensor: "x",
            expected: "rows of a width that is a positive multiple of 8".into(),
            got: format!("{} values in rows of {cols}", x.len()),
        });
    }
    check_aligned("x", x)?;
    check_aligned("dy", dy)?;
    check_aligned("dx", dx)?;
    check_aligned("y", y)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let rows = n / cols;
    let blocks_x = blocks_for("GELU column groups", (cols / 8) as u64, COL_THREADS as u64)?;
    // About eight blocks (32 warps) per SM in all; every group has a block per column slab.
    let groups = (8 * gpu.sm_count() as usize).div_ceil(blocks_x as usize).clamp(1, rows);
    if groups > i32::MAX as usize || n > i64::MAX as usize {
        return Err(Error::Unsupported { what: "GELU size", detail: format!("{n} values") });
    }
    let partial = gpu.alloc::<f32>(groups * cols)?;
    let params = MapetGelu {
        x: x.ptr(),
        dy: dy.ptr(),
        out: dx.ptr_mut(),
        out_y: y.ptr_mut(),
        partial: partial.f32_ptr(),
        col_sums: dx_col_sums.f32_ptr(),
        n: n as i64,
        cols: cols as i64,
        groups: groups as i32,
    };
    let cfg =
        LaunchConfig { grid_dim: (blocks_x, groups as u32, 1), block_dim: (COL_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: x, dy, dx and y hold n = rows * cols bf16 each, 16-byte aligned (checked above) with
    // cols % 8 == 0, so every 16-byte access of a thread's 8 columns lies inside a row; partial
    // holds groups * cols floats (allocated above, 256-byte aligned), of which block (x, g) writes
    // row g's columns of its threads.
    unsafe { gpu.launch_dependent(MODULE, "gelu_bwd_recompute_colsum", cfg, &params) }?;
    let cfg = LaunchConfig {
        grid_dim: (blocks_for("GELU column sums", cols as u64, FINISH_COLS as u64)?, 1, 1),
        block_dim: (FINISH_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: reads the groups * cols floats of partial written above, adds to the cols floats of
    // dx_col_sums (checked above).
    unsafe { gpu.launch_dependent(MODULE, "gelu_colsum_finish", cfg, &params) }
}
