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
    let params =
        MapetGelu { x: x.ptr(), dy: std::ptr::null(), out: y.ptr_mut(), out_y: std::ptr::null_mut(), n: n as i64 };
    let cfg = launch_config(n)?;
    // SAFETY: x and y hold n bf16 each, 16-byte aligned (checked above); the kernel reads x[..n]
    // and writes y[..n] only, and does not touch dy.
    unsafe { gpu.launch(MODULE, "gelu_fwd", cfg, &params) }
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
    let params = MapetGelu { x: x.ptr(), dy: dy.ptr(), out: dx.ptr_mut(), out_y: std::ptr::null_mut(), n: n as i64 };
    let cfg = launch_config(n)?;
    // SAFETY: x, dy and dx hold n bf16 each, 16-byte aligned (checked above); the kernel reads
    // x[..n] and dy[..n] and writes dx[..n] only.
    unsafe { gpu.launch(MODULE, "gelu_bwd", cfg, &params) }
}

/// dx = dy * GELU'(x) and y = GELU(x) on the GPU in one pass over x (bf16 in and out): what
/// [`cuda_backward`] and [`cuda_forward`] write, bit for bit, reading x once. For a backward that
/// recomputes the activation it did not save.
pub fn cuda_backward_recompute(
    gpu: &Gpu,
    x: &dyn DeviceRead<bf16>,
    dy: &dyn DeviceRead<bf16>,
    dx: &mut dyn DeviceWrite<bf16>,
    y: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    check_len("dy", dy.len(), x.len())?;
    check_len("dx", dx.len(), x.len())?;
    check_len("y", y.len(), x.len())?;
    check_aligned("x", x)?;
    check_aligned("dy", dy)?;
    check_aligned("dx", dx)?;
    check_aligned("y", y)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let params = MapetGelu { x: x.ptr(), dy: dy.ptr(), out: dx.ptr_mut(), out_y: y.ptr_mut(), n: n as i64 };
    let cfg = launch_config(n)?;
    // SAFETY: x, dy, dx and y hold n bf16 each, 16-byte aligned (checked above); the kernel reads
    // x[..n] and dy[..n] and writes dx[..n] and y[..n] only.
    unsafe { gpu.launch(MODULE, "gelu_bwd_recompute", cfg, &params) }
}
