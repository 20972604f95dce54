//! LayerNorm over the last dimension: forward, backward, and the fused residual-add + forward.
//!
//! `y = (x - mean) * rstd * weight + bias` per row, with `rstd = 1 / sqrt(var + eps)`, the biased
//! variance and f32 statistics. The backward writes (or adds to) `dx` and always adds to
//! `dweight` and `dbias`. The kernels are in `cuda/layernorm.cu`; its opening comment gives the
//! math and why the kernels are shaped as they are.
//!
//! On the GPU the activations (`x`, `y`, `h`, `residual`, `dy`, `dx`) are bf16 and everything
//! else is f32. The residual variant writes `h = bf16(residual + x)` and normalises that rounded
//! `h`, so the forward normalises exactly what the backward will read. The GPU backward sums the
//! weight and bias gradients in a fixed order (per-block partial sums, then a column reduction):
//! two runs on the same inputs and the same card give bit-identical results.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;
use half::bf16;
use rayon::prelude::*;

use crate::cuda::params::{MapetLayerNormBwd, MapetLayerNormFwd, MapetResidualLayerNormFwd};
use crate::cuda::{blocks_for, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};

const MODULE: &str = "layernorm";
/// Threads per block of every row kernel: one warp per row, 8 rows per block.
const THREADS: u32 = 256;
const ROWS_PER_BLOCK: u64 = (THREADS / 32) as u64;
/// Widest row the register-resident vector kernels take (4 vectors of 8 bf16 per lane).
const MAX_VECTOR_COLS: usize = 1024;
/// Rows per task of the CPU backward (a fixed split, so its sums do not depend on the thread count).
const CPU_ROW_CHUNK: usize = 64;

const FWD_VEC: [&str; 4] = ["layernorm_fwd_v1", "layernorm_fwd_v2", "layernorm_fwd_v3", "layernorm_fwd_v4"];
const RES_VEC: [&str; 4] = [
    "layernorm_residual_fwd_v1",
    "layernorm_residual_fwd_v2",
    "layernorm_residual_fwd_v3",
    "layernorm_residual_fwd_v4",
];
const BWD_VEC: [&str; 4] = ["layernorm_bwd_v1", "layernorm_bwd_v2", "layernorm_bwd_v3", "layernorm_bwd_v4"];

/// Checks `rows` x `cols` and returns the element count.
fn check_dims(rows: usize, cols: usize) -> Result<usize> {
    if cols == 0 {
        return Err(Error::Unsupported { what: "LayerNorm width", detail: "cols must be at least 1".into() });
    }
    if cols > i32::MAX as usize {
        return Err(Error::Unsupported { what: "LayerNorm width", detail: format!("cols = {cols} exceeds i32") });
    }
    rows.checked_mul(cols).filter(|&n| n <= i64::MAX as usize).ok_or_else(|| Error::Unsupported {
        what: "LayerNorm size",
        detail: format!("{rows} x {cols} elements overflow"),
    })
}

/// Mean and 1/std of one row, f32, two passes (centred variance).
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// y = LayerNorm(x) on the CPU, f32; saves mean and rstd per row.
#[allow(clippy::too_many_arguments)]
pub fn cpu_forward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    rows: usize,
    cols: usize,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("x", x.len(), n)?;
    check_len("weight", weight.len(), cols)?;
    check_len("bias", bias.len(), cols)?;
    check_len("y", y.len(), n)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    y.par_chunks_mut(cols).zip(x.par_chunks(cols)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((yr, xr), (m, r))| {
            let (mu, rs) = row_stats(xr, eps);
            for c in 0..cols {
                yr[c] = (xr[c] - mu) * rs * weight[c] + bias[c];
            }
            *m = mu;
            *r = rs;
        },
    );
    Ok(())
}

/// h = residual + x and y = LayerNorm(h) on the CPU, f32; saves mean and rstd of h per row.
#[allow(clippy::too_many_arguments)]
pub fn cpu_residual_forward(
    residual: &[f32],
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    rows: usize,
    cols: usize,
    h: &mut [f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("residual", residual.len(), n)?;
    check_len("x", x.len(), n)?;
    check_len("weight", weight.len(), cols)?;
    check_len("bias", bias.len(), cols)?;
    check_len("h", h.len(), n)?;
    check_len("y", y.len(), n)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    h.par_iter_mut().zip(residual.par_iter().zip(x.par_iter())).with_min_len(4096).for_each(|(h, (&r, &x))| {
        *h = r + x;
    });
    cpu_forward(h, weight, bias, eps, rows, cols, y, mean, rstd)
}

/// Backward of LayerNorm on the CPU, f32: dx written (or added to when `accumulate_dx`);
/// dweight and dbias added to.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward(
    x: &[f32],
    dy: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
    accumulate_dx: bool,
    dweight: &mut [f32],
    dbias: &mut [f32],
) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("x", x.len(), n)?;
    check_len("dy", dy.len(), n)?;
    check_len("weight", weight.len(), cols)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    check_len("dx", dx.len(), n)?;
    check_len("dweight", dweight.len(), cols)?;
    check_len("dbias", dbias.len(), cols)?;
    if rows == 0 {
        return Ok(());
    }
    let inv_cols = 1.0 / cols as f32;
    let chunk = CPU_ROW_CHUNK * cols;
    // Each task does dx for its rows and returns its column sums [dweight | dbias]; the sums of
    // the tasks are then added in task order.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .zip(mean.par_chunks(CPU_ROW_CHUNK).zip(rstd.par_chunks(CPU_ROW_CHUNK)))
        .map(|((dxc, (xc, dyc)), (mc, rc))| {
            let mut sums = vec![0.0f32; 2 * cols];
            for (r, (&mu, &rs)) in mc.iter().zip(rc).enumerate() {
                let xr = &xc[r * cols..(r + 1) * cols];
                let dyr = &dyc[r * cols..(r + 1) * cols];
                let dxr = &mut dxc[r * cols..(r + 1) * cols];
                let (mut s1, mut s2) = (0.0f32, 0.0f32);
                for c in 0..cols {
                    let xh = (xr[c] - mu) * rs;
                    let g = dyr[c] * weight[c];
                    s1 += g;
                    s2 += g * xh;
                    sums[c] += dyr[c] * xh;
                    sums[cols + c] += dyr[c];
                }
                let (m1, m2) = (s1 * inv_cols, s2 * inv_cols);
                for c in 0..cols {
                    let xh = (xr[c] - mu) * rs;
                    let v = rs * (dyr[c] * weight[c] - m1 - xh * m2);
                    dxr[c] = if accumulate_dx { dxr[c] + v } else { v };
                }
            }
            sums
        })
        .collect();
    let mut total = vec![0.0f32; 2 * cols];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    for c in 0..cols {
        dweight[c] += total[c];
        dbias[c] += total[cols + c];
    }
    Ok(())
}

/// Vectors per lane of the vector kernels, or `None` when the generic kernel must run
/// (cols not a multiple of 8, wider than 1024, or a pointer not 16-byte aligned).
fn vector_lanes(cols: usize, ptrs: &[*const c_void]) -> Option<usize> {
    let aligned = ptrs.iter().all(|&p| (p as usize) & 15 == 0);
    (cols & 7 == 0 && cols <= MAX_VECTOR_COLS && aligned).then(|| cols.div_ceil(256))
}

fn row_launch(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (blocks_for("LayerNorm rows", rows as u64, ROWS_PER_BLOCK)?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// y = LayerNorm(x) on the GPU: x, y bf16 `[rows, cols]`; weight, bias f32 `[cols]`; mean, rstd
/// f32 `[rows]`.
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward(
    gpu: &Gpu,
    x: &dyn DeviceRead<bf16>,
    weight: &dyn DeviceRead<f32>,
    bias: &dyn DeviceRead<f32>,
    eps: f32,
    rows: usize,
    cols: usize,
    y: &mut dyn DeviceWrite<bf16>,
    mean: &mut dyn DeviceWrite<f32>,
    rstd: &mut dyn DeviceWrite<f32>,
) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("x", x.len(), n)?;
    check_len("weight", weight.len(), cols)?;
    check_len("bias", bias.len(), cols)?;
    check_len("y", y.len(), n)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let params = MapetLayerNormFwd {
        x: x.ptr(),
        y: y.ptr_mut(),
        weight: weight.f32_ptr(),
        bias: bias.f32_ptr(),
        mean: mean.f32_ptr(),
        rstd: rstd.f32_ptr(),
        rows: rows as i64,
        cols: cols as i32,
        eps,
    };
    let name = match vector_lanes(cols, &[params.x, params.y, weight.ptr(), bias.ptr()]) {
        Some(v) => FWD_VEC[v - 1],
        None => "layernorm_fwd_generic",
    };
    let cfg = row_launch(rows)?;
    // SAFETY: x and y hold rows * cols bf16, weight and bias cols f32, mean and rstd rows f32
    // (checked above); the kernel touches rows < `rows` and columns < `cols` only, and the
    // vector kernel runs only when cols % 8 == 0 and every pointer is 16-byte aligned.
    unsafe { gpu.launch_dependent(MODULE, name, cfg, &params) }
}

/// h = bf16(residual + x), y = LayerNorm(h) on the GPU; mean and rstd of h saved.
#[allow(clippy::too_many_arguments)]
pub fn cuda_residual_forward(
    gpu: &Gpu,
    residual: &dyn DeviceRead<bf16>,
    x: &dyn DeviceRead<bf16>,
    weight: &dyn DeviceRead<f32>,
    bias: &dyn DeviceRead<f32>,
    eps: f32,
    rows: usize,
    cols: usize,
    h: &mut dyn DeviceWrite<bf16>,
    y: &mut dyn DeviceWrite<bf16>,
    mean: &mut dyn DeviceWrite<f32>,
    rstd: &mut dyn DeviceWrite<f32>,
) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("residual", residual.len(), n)?;
    check_len("x", x.len(), n)?;
    check_len("weight", weight.len(), cols)?;
    check_len("bias", bias.len(), cols)?;
    check_len("h", h.len(), n)?;
    check_len("y", y.len(), n)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let params = MapetResidualLayerNormFwd {
        residual: residual.ptr(),
        x: x.ptr(),
        h: h.ptr_mut(),
        y: y.ptr_mut(),
        weight: weight.f32_ptr(),
        bias: bias.f32_ptr(),
        mean: mean.f32_ptr(),
        rstd: rstd.f32_ptr(),
        rows: rows as i64,
        cols: cols as i32,
        eps,
    };
    let ptrs = [params.residual, params.x, params.h, params.y, weight.ptr(), bias.ptr()];
    let name = match vector_lanes(cols, &ptrs) {
        Some(v) => RES_VEC[v - 1],
        None => "layernorm_residual_fwd_generic",
    };
    let cfg = row_launch(rows)?;
    // SAFETY: residual, x, h, y hold rows * cols bf16, weight and bias cols f32, mean and rstd
    // rows f32 (checked above); the kernel stays within rows and cols, and the vector kernel runs
    // only when cols % 8 == 0 and every pointer is 16-byte aligned.
    unsafe { gpu.launch_dependent(MODULE, name, cfg, &params) }
}

/// Backward of LayerNorm on the GPU: dx bf16 written (or added to when `accumulate_dx`),
/// dweight and dbias f32 added to, through a deterministic two-pass reduction.
#[allow(clippy::too_many_arguments)]
pub fn cuda_backward(
    gpu: &Gpu,
    x: &dyn DeviceRead<bf16>,
    dy: &dyn DeviceRead<bf16>,
    weight: &dyn DeviceRead<f32>,
    mean: &dyn DeviceRead<f32>,
    rstd: &dyn DeviceRead<f32>,
    rows: usize,
    cols: usize,
    dx: &mut dyn DeviceWrite<bf16>,
    accumulate_dx: bool,
    dweight: &mut dyn DeviceWrite<f32>,
    dbias: &mut dyn DeviceWrite<f32>,
) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("x", x.len(), n)?;
    check_len("dy", dy.len(), n)?;
    check_len("weight", weight.len(), cols)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    check_len("dx", dx.len(), n)?;
    check_len("dweight", dweight.len(), cols)?;
    check_len("dbias", dbias.len(), cols)?;
    if rows == 0 {
        return Ok(());
    }
    let ptrs = [x.ptr(), dy.ptr(), dx.ptr(), weight.ptr()];
    let (name, smem) = match vector_lanes(cols, &ptrs) {
        Some(v) => (BWD_VEC[v - 1], (2 * cols * std::mem::size_of::<f32>()) as u32),
        None => ("layernorm_bwd_generic", 0),
    };
    // One wave of blocks: as many as fit on the card at once, but no more than there are row groups.
    let per_sm =
        gpu.function(MODULE, name)?.occupancy_max_active_blocks_per_multiprocessor(THREADS, smem as usize, None)?;
    let wave = u64::from(gpu.sm_count()) * u64::from(per_sm.max(1));
    let grid = u64::from(blocks_for("LayerNorm rows", rows as u64, ROWS_PER_BLOCK)?).min(wave);
    let partial = gpu.alloc::<f32>(grid as usize * 2 * cols)?;
    let mut params = MapetLayerNormBwd {
        x: x.ptr(),
        dy: dy.ptr(),
        weight: weight.f32_ptr(),
        mean: mean.f32_ptr(),
        rstd: rstd.f32_ptr(),
        dx: dx.ptr_mut(),
        dweight: dweight.f32_ptr(),
        dbias: dbias.f32_ptr(),
        partial: partial.f32_ptr(),
        rows: rows as i64,
        cols: cols as i32,
        accumulate: i32::from(accumulate_dx),
    };
    let cfg = LaunchConfig { grid_dim: (grid as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem };
    // SAFETY: x, dy, dx hold rows * cols bf16; weight, dweight, dbias cols f32; mean, rstd rows
    // f32 (checked above); partial holds grid * 2 * cols f32 and block b writes only its row b;
    // the vector kernel runs only when cols % 8 == 0, cols <= 1024 and pointers are 16-byte
    // aligned, with the 2 * cols floats of shared memory it folds its warps through.
    unsafe { gpu.launch_dependent(MODULE, name, cfg, &params) }?;

    // The reduction kernel reads the number of partial rows from `rows`.
    params.rows = grid as i64;
    let cfg = LaunchConfig {
        grid_dim: (blocks_for("LayerNorm columns", 2 * cols as u64, 32)?, 1, 1),
        block_dim: (32, 16, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: partial holds `grid` rows of 2 * cols f32, all written by the launch above (same
    // stream); the kernel reads those and adds to dweight[..cols] and dbias[..cols] only.
    unsafe { gpu.launch_dependent(MODULE, "layernorm_bwd_reduce", cfg, &params) }?;
    drop(partial);
    Ok(())
}
