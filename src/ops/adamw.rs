//! AdamW over one flat f32 parameter buffer, as PyTorch's `torch.optim.AdamW` (decoupled weight
//! decay), with a per-element weight-decay mask and a gradient scale applied first:
//!
//! ```text
//! g = grad * grad_scale
//! p = p * (1 - lr * weight_decay)                     where decay_mask = 1
//! m = beta1 * m + (1 - beta1) * g
//! v = beta2 * v + (1 - beta2) * g^2
//! p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc1 = 1 - beta1^t, bc2 = 1 - beta2^t
//! ```
//!
//! The CPU reference and the kernel (`cuda/adamw.cu`) do the same f32 operations in the same
//! order; both optionally write the updated parameters in activation precision (the bf16 copy the
//! GPU model computes with; on the CPU the bf16-rounded values as f32).

use cudarc::driver::LaunchConfig;
use half::bf16;
use rayon::prelude::*;

use crate::cuda::params::MapetAdamW;
use crate::cuda::{blocks_for, DeviceBuffer, Gpu};
use crate::error::{check_len, Error, Result};

const MODULE: &str = "adamw";
const THREADS: u32 = 256;
const CPU_CHUNK: usize = 16 * 1024;

/// The hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the bias-corrected sqrt(v).
    pub eps: f32,
    /// Decoupled weight decay, applied where the decay mask is 1.
    pub weight_decay: f32,
    /// Step number, 1-based (the first update is step 1).
    pub step: u64,
    /// Every gradient is multiplied by this first (clipping, loss scaling).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// Step `step` (1-based) at learning rate `lr` with the MaPeT settings: betas 0.9 / 0.999,
    /// eps 1e-8, weight decay 0.05, grad_scale 1.
    pub fn new(lr: f32, step: u64) -> Self {
        AdamWStep { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, step, grad_scale: 1.0 }
    }

    /// The bias corrections (1 - beta1^t, 1 - beta2^t), computed in f64; refuses step 0.
    pub fn bias_corrections(&self) -> Result<(f32, f32)> {
        if self.step == 0 {
            return Err(Error::Unsupported { what: "AdamW step", detail: "step is 1-based; got 0".into() });
        }
        let t = self.step as f64;
        let bc1 = 1.0 - (self.beta1 as f64).powf(t);
        let bc2 = 1.0 - (self.beta2 as f64).powf(t);
        Ok((bc1 as f32, bc2 as f32))
    }
}

/// Per-step constants shared by every element (the kernel derives the same ones).
struct Coefs {
    decay: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
}

impl Coefs {
    fn new(s: &AdamWStep) -> Result<Self> {
        let (bc1, bc2) = s.bias_corrections()?;
        Ok(Coefs { decay: 1.0 - s.lr * s.weight_decay, step_size: s.lr / bc1, inv_sqrt_bc2: 1.0 / bc2.sqrt() })
    }
}

#[inline]
fn update(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, decayed: bool, s: &AdamWStep, k: &Coefs) {
    let g = g * s.grad_scale;
    if decayed {
        *p *= k.decay;
    }
    *m = s.beta1 * *m + (1.0 - s.beta1) * g;
    *v = s.beta2 * *v + (1.0 - s.beta2) * (g * g);
    let denom = v.sqrt() * k.inv_sqrt_bc2 + s.eps;
    *p -= k.step_size * (*m / denom);
}

/// One AdamW step on the CPU. `copy`, when given, receives the new parameters rounded to bf16.
pub fn cpu_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    decay_mask: &[u8],
    step: &AdamWStep,
    copy: Option<&mut [f32]>,
) -> Result<()> {
    let n = param.len();
    check_len("grad", grad.len(), n)?;
    check_len("m", m.len(), n)?;
    check_len("v", v.len(), n)?;
    check_len("decay_mask", decay_mask.len(), n)?;
    if let Some(c) = &copy {
        check_len("copy", c.len(), n)?;
    }
    let k = Coefs::new(step)?;
    param
        .par_chunks_mut(CPU_CHUNK)
        .zip(m.par_chunks_mut(CPU_CHUNK).zip(v.par_chunks_mut(CPU_CHUNK)))
        .zip(grad.par_chunks(CPU_CHUNK).zip(decay_mask.par_chunks(CPU_CHUNK)))
        .for_each(|((pc, (mc, vc)), (gc, dc))| {
            for i in 0..pc.len() {
                update(&mut pc[i], gc[i], &mut mc[i], &mut vc[i], dc[i] != 0, step, &k);
            }
        });
    if let Some(c) = copy {
        c.par_iter_mut().zip(param.par_iter()).with_min_len(4096).for_each(|(c, &p)| *c = bf16::from_f32(p).to_f32());
    }
    Ok(())
}

fn check_aligned(tensor: &'static str, ptr: *const std::ffi::c_void) -> Result<()> {
    if (ptr as usize) & 15 == 0 {
        Ok(())
    } else {
        Err(Error::Alignment { tensor, detail: "the AdamW kernel needs 16-byte aligned buffers".into() })
    }
}

/// One AdamW step on the GPU. `copy`, when given, receives the new parameters in bf16.
#[allow(clippy::too_many_arguments)]
pub fn cuda_step(
    gpu: &Gpu,
    param: &mut DeviceBuffer<f32>,
    grad: &DeviceBuffer<f32>,
    m: &mut DeviceBuffer<f32>,
    v: &mut DeviceBuffer<f32>,
    decay_mask: &DeviceBuffer<u8>,
    step: &AdamWStep,
    copy: Option<&mut DeviceBuffer<bf16>>,
) -> Result<()> {
    let n = param.len();
    check_len("grad", grad.len(), n)?;
    check_len("m", m.len(), n)?;
    check_len("v", v.len(), n)?;
    check_len("decay_mask", decay_mask.len(), n)?;
    if let Some(c) = &copy {
        check_len("copy", c.len(), n)?;
    }
    let (bc1, bc2) = step.bias_corrections()?;
    let param_bf16 = match copy {
        Some(c) => c.ptr_mut(),
        None => std::ptr::null_mut(),
    };
    let params = MapetAdamW {
        param: param.f32_ptr(),
        grad: grad.f32_ptr(),
        m: m.f32_ptr(),
        v: v.f32_ptr(),
        decay_mask: decay_mask.ptr() as *const u8,
        param_bf16,
        n: n as i64,
        lr: step.lr,
        beta1: step.beta1,
        beta2: step.beta2,
        eps: step.eps,
        weight_decay: step.weight_decay,
        bias_correction1: bc1,
        bias_correction2: bc2,
        grad_scale: step.grad_scale,
    };
    for (tensor, ptr) in [
        ("param", params.param as *const _),
        ("grad", params.grad as *const _),
        ("m", params.m as *const _),
        ("v", params.v as *const _),
        ("decay_mask", params.decay_mask as *const _),
        ("copy", params.param_bf16 as *const _),
    ] {
        check_aligned(tensor, ptr)?;
    }
    if n == 0 {
        return Ok(());
    }
    // One 4-element vector per thread; the n % 4 tail needs at most 3 threads.
    let threads = (n / 4).max(n % 4) as u64;
    let cfg = LaunchConfig {
        grid_dim: (blocks_for("AdamW elements", threads, u64::from(THREADS))?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: param, grad, m, v (f32), decay_mask (u8) and, when not null, param_bf16 (bf16) each
    // hold n elements, 16-byte aligned (checked above); the kernel touches indices < n only.
    unsafe { gpu.launch_dependent(MODULE, "adamw_step", cfg, &params) }
}
