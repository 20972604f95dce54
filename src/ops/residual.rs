//! Residual-stream helpers of the model, CPU reference and CUDA launcher side by side
//! (`cuda/residual.cu` gives the kernels' math and shape):
//!
//! - the layer-scale residual with per-sample drop path, `out = x + (s[sample] * gamma) * y`, and
//!   its backward `dy = (dout * s) * gamma`, `dgamma += sum_rows (dout * s) * y` (the gradient of
//!   `x` is `dout` itself);
//! - row copies between per-sample row ranges ([`RowCopy`]): the model gathers the keys' rows
//!   (the first N + P of each sample) and the query stream's rows (the last P) out of the
//!   `[B, N + 2P, D]` residual layout, and scatters their gradients back;
//! - two f32 vector ops: `y += x` (a bias-gradient scratch into the gradient buffer) and the bf16
//!   copy of f32 weights.
//!
//! On the GPU the activations are bf16 and `gamma`, the drop-path scales and `dgamma` f32. The
//! backward's column sums are deterministic (per-chunk partial sums, then a fixed-order sum over
//! the chunks; no float atomics): two runs on the same inputs give bit-identical results.

use cudarc::driver::LaunchConfig;
use half::bf16;

use crate::cuda::params::{MapetF32Vector, MapetLayerScale, MapetRowCopy};
use crate::cuda::{blocks_for, check_aligned, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, Error, Result};

const MODULE: &str = "residual";
/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;
/// Threads per block of the layer-scale backward (eight columns each: `kBwdThreads`).
const BWD_THREADS: u32 = 32;
/// Threads per block of its reduction: 32 columns x 16 slices (`kRedX * kRedY`).
const REDUCE_THREADS: u32 = 512;
/// Most blocks of a grid-stride launch.
const MAX_BLOCKS: u32 = 1 << 16;
/// Rows per chunk of the layer-scale backward's column sums (more when the rows would need more
/// than [`MAX_CHUNKS`] chunks).
pub const LAYER_SCALE_CHUNK_ROWS: usize = 64;
/// Most chunks of the layer-scale backward (bounds its f32 scratch to `MAX_CHUNKS * cols`).
pub const MAX_CHUNKS: usize = 4096;

/// Sizes of one layer-scale residual: `samples` samples of `rows_per_sample` rows of `cols`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerScaleShape {
    pub samples: usize,
    pub rows_per_sample: usize,
    pub cols: usize,
}

impl LayerScaleShape {
    /// All rows, `samples * rows_per_sample`.
    pub fn rows(&self) -> usize {
        self.samples * self.rows_per_sample
    }

    /// Elements of `x`, `y`, `out` (and `dout`, `dy`).
    pub fn len(&self) -> usize {
        self.rows() * self.cols
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows per chunk of the backward's column sums: depends only on the shape.
    pub fn chunk_rows(&self) -> usize {
        LAYER_SCALE_CHUNK_ROWS.max(self.rows().div_ceil(MAX_CHUNKS))
    }

    /// Chunks of the backward's column sums.
    pub fn chunks(&self) -> usize {
        self.rows().div_ceil(self.chunk_rows())
    }

    /// Positive sizes whose element count fits.
    pub fn validate(&self) -> Result<()> {
        if self.cols == 0 || self.rows_per_sample == 0 {
            return Err(Error::Unsupported {
                what: "layer-scale shape",
                detail: format!("cols and rows_per_sample must be positive, got {self:?}"),
            });
        }
        self.samples
            .checked_mul(self.rows_per_sample)
            .and_then(|r| r.checked_mul(self.cols))
            .filter(|&n| n <= i64::MAX as usize)
            .map(|_| ())
            .ok_or_else(|| Error::Unsupported { what: "layer-scale shape", detail: format!("{self:?} overflows") })
    }

    /// [`Self::validate`] plus the kernels' needs: `cols % 8 == 0` (16-byte vectors) and 32-bit
    /// row and column counts.
    fn validate_cuda(&self) -> Result<()> {
        self.validate()?;
        if !self.cols.is_multiple_of(8) || self.cols > i32::MAX as usize || self.rows_per_sample > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: "layer-scale shape",
                detail: format!("the CUDA kernels need cols % 8 == 0 and 32-bit sizes, got {self:?}"),
            });
        }
        Ok(())
    }

    fn check(&self, tensors: &[(&'static str, usize)], gamma: usize, scale: usize) -> Result<()> {
        for &(name, len) in tensors {
            check_len(name, len, self.len())?;
        }
        check_len("gamma", gamma, self.cols)?;
        check_len("scale", scale, self.samples)
    }
}

/// `out = x + (s[sample] * gamma) * y` on the CPU, f32.
pub fn cpu_layer_scale_forward(
    shape: &LayerScaleShape,
    x: &[f32],
    y: &[f32],
    gamma: &[f32],
    scale: &[f32],
    out: &mut [f32],
) -> Result<()> {
    shape.validate()?;
    shape.check(&[("x", x.len()), ("y", y.len()), ("out", out.len())], gamma.len(), scale.len())?;
    let cols = shape.cols;
    for (r, ((o, xr), yr)) in out.chunks_exact_mut(cols).zip(x.chunks_exact(cols)).zip(y.chunks_exact(cols)).enumerate()
    {
        let s = scale[r / shape.rows_per_sample];
        for (((o, &xv), &yv), &g) in o.iter_mut().zip(xr).zip(yr).zip(gamma) {
            *o = xv + s * g * yv;
        }
    }
    Ok(())
}

/// Backward of [`cpu_layer_scale_forward`] on the CPU, f32: `dy = (dout * s) * gamma` written,
/// `dgamma += sum_rows (dout * s) * y` (summed over the rows first, then added).
pub fn cpu_layer_scale_backward(
    shape: &LayerScaleShape,
    dout: &[f32],
    y: &[f32],
    gamma: &[f32],
    scale: &[f32],
    dy: &mut [f32],
    dgamma: &mut [f32],
) -> Result<()> {
    shape.validate()?;
    shape.check(&[("dout", dout.len()), ("y", y.len()), ("dy", dy.len())], gamma.len(), scale.len())?;
    check_len("dgamma", dgamma.len(), shape.cols)?;
    let cols = shape.cols;
    let mut sums = vec![0.0f32; cols];
    for (r, ((d, dr), yr)) in
        dy.chunks_exact_mut(cols).zip(dout.chunks_exact(cols)).zip(y.chunks_exact(cols)).enumerate()
    {
        let s = scale[r / shape.rows_per_sample];
        for c in 0..cols {
            let ds = dr[c] * s;
            d[c] = ds * gamma[c];
            sums[c] += ds * yr[c];
        }
    }
    for (g, s) in dgamma.iter_mut().zip(&sums) {
        *g += s;
    }
    Ok(())
}

fn grid_stride(what: &'static str, items: u64) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (blocks_for(what, items, u64::from(THREADS))?.min(MAX_BLOCKS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `out = x + (s[sample] * gamma) * y` on the GPU: x, y, out bf16 `[rows, cols]`; gamma f32
/// `[cols]`; scale f32 `[samples]`. Needs cols % 8 == 0 and 16-byte aligned pointers.
#[allow(clippy::too_many_arguments)]
pub fn cuda_layer_scale_forward(
    gpu: &Gpu,
    shape: &LayerScaleShape,
    x: &dyn DeviceRead<bf16>,
    y: &dyn DeviceRead<bf16>,
    gamma: &dyn DeviceRead<f32>,
    scale: &dyn DeviceRead<f32>,
    out: &mut dyn DeviceWrite<bf16>,
) -> Result<()> {
    shape.validate_cuda()?;
    shape.check(&[("x", x.len()), ("y", y.len()), ("out", out.len())], gamma.len(), scale.len())?;
    for (tensor, ptr) in [("x", x.ptr()), ("y", y.ptr()), ("out", out.ptr()), ("gamma", gamma.ptr())] {
        check_aligned(tensor, ptr, 16)?;
    }
    if shape.is_empty() {
        return Ok(());
    }
    let p = MapetLayerScale {
        x: x.ptr(),
        y: y.ptr(),
        dout: std::ptr::null(),
        out: out.ptr_mut(),
        gamma: gamma.f32_ptr(),
        scale: scale.f32_ptr(),
        dgamma: std::ptr::null_mut(),
        dy_col_sums: std::ptr::null_mut(),
        partial: std::ptr::null_mut(),
        rows: shape.rows() as i64,
        cols: shape.cols as i32,
        rows_per_sample: shape.rows_per_sample as i32,
        chunk_rows: 0,
        chunks: 0,
    };
    let cfg = grid_stride("layer-scale vectors", (shape.len() / 8) as u64)?;
    // SAFETY: x, y, out hold rows * cols bf16 and gamma cols f32, all 16-byte aligned with
    // cols % 8 == 0 (checked above), so every 16-byte vector the kernel touches lies inside them;
    // scale holds `samples` f32 and the kernel reads scale[r / rows_per_sample] for r < rows.
    unsafe { gpu.launch_dependent(MODULE, "mapet_layer_scale_fwd", cfg, &p) }
}

/// Backward on the GPU: `dy = (dout * s) * gamma` (bf16, written) and
/// `dgamma += sum_rows (dout * s) * y` (f32, deterministic two-pass sum); with `dy_col_sums`,
/// also `dy_col_sums += sum_rows dy` of the bf16 dy stored (the bias gradient of the Linear whose
/// output y is, in the same pass). Allocates an f32 scratch of `chunks * cols`
/// ([`LayerScaleShape::chunks`]), twice that with `dy_col_sums`, on the stream.
#[allow(clippy::too_many_arguments)]
pub fn cuda_layer_scale_backward(
    gpu: &Gpu,
    shape: &LayerScaleShape,
    dout: &dyn DeviceRead<bf16>,
    y: &dyn DeviceRead<bf16>,
    gamma: &dyn DeviceRead<f32>,
    scale: &dyn DeviceRead<f32>,
    dy: &mut dyn DeviceWrite<bf16>,
    dgamma: &mut dyn DeviceWrite<f32>,
    dy_col_sums: Option<&mut dyn DeviceWrite<f32>>,
) -> Result<()> {
    shape.validate_cuda()?;
    shape.check(&[("dout", dout.len()), ("y", y.len()), ("dy", dy.len())], gamma.len(), scale.len())?;
    check_len("dgamma", dgamma.len(), shape.cols)?;
    if let Some(sums) = &dy_col_sums {
        check_len("dy_col_sums", sums.len(), shape.cols)?;
    }
    for (tensor, ptr) in [("dout", dout.ptr()), ("y", y.ptr()), ("dy", dy.ptr()), ("gamma", gamma.ptr())] {
        check_aligned(tensor, ptr, 16)?;
    }
    if shape.is_empty() {
        return Ok(());
    }
    let (chunk_rows, chunks) = (shape.chunk_rows(), shape.chunks());
    if chunk_rows > i32::MAX as usize {
        return Err(Error::Unsupported { what: "layer-scale shape", detail: format!("{shape:?}: too many rows") });
    }
    let halves = if dy_col_sums.is_some() { 2 } else { 1 };
    let partial = gpu.alloc::<f32>(halves * chunks * shape.cols)?;
    let p = MapetLayerScale {
        x: std::ptr::null(),
        y: y.ptr(),
        dout: dout.ptr(),
        out: dy.ptr_mut(),
        gamma: gamma.f32_ptr(),
        scale: scale.f32_ptr(),
        dgamma: dgamma.f32_ptr(),
        dy_col_sums: dy_col_sums.map_or(std::ptr::null_mut(), |s| s.f32_ptr()),
        partial: partial.f32_ptr(),
        rows: shape.rows() as i64,
        cols: shape.cols as i32,
        rows_per_sample: shape.rows_per_sample as i32,
        chunk_rows: chunk_rows as i32,
        chunks: chunks as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (
            blocks_for("layer-scale columns", (shape.cols / 8) as u64, u64::from(BWD_THREADS))?,
            chunks as u32,
            1,
        ),
        block_dim: (BWD_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dout, y, dy hold rows * cols bf16 and gamma cols f32 (checked), all 16-byte aligned
    // with cols % 8 == 0, so each thread's 16-byte vectors at (r, 8c), 8c < cols, lie inside
    // them; scale holds `samples` f32 (checked) and r < rows reads scale[r / rows_per_sample];
    // block (bx, g) writes only row g (and, with dy_col_sums, row chunks + g) of partial, which
    // holds halves * chunks (<= MAX_CHUNKS < 65536 grid rows) * cols f32.
    unsafe { gpu.launch_dependent(MODULE, "mapet_layer_scale_bwd", cfg, &p) }?;
    let cfg = LaunchConfig {
        grid_dim: (blocks_for("layer-scale columns", shape.cols as u64, 32)?, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: reads the halves * chunks * cols floats of partial written by the launch above (same
    // stream) and adds to dgamma[..cols] and dy_col_sums[..cols] (checked).
    unsafe { gpu.launch_dependent(MODULE, "mapet_layer_scale_bwd_reduce", cfg, &p) }?;
    Ok(())
}

/// A copy of `count` rows per sample between two `[batch, *, cols]` tensors:
/// `dst[b, dst_row0 + i, :] (+)= src[b, src_row0 + i, :]` for `b < batch`, `i < count`, where
/// `src_rows` and `dst_rows` are the rows per sample of each tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub batch: usize,
    pub cols: usize,
    pub src_rows: usize,
    pub src_row0: usize,
    pub dst_rows: usize,
    pub dst_row0: usize,
    pub count: usize,
}

impl RowCopy {
    /// Rows `[row0, row0 + count)` of each sample of a `[batch, rows, cols]` tensor into a packed
    /// `[batch, count, cols]` one.
    pub fn gather(batch: usize, cols: usize, rows: usize, row0: usize, count: usize) -> Self {
        RowCopy { batch, cols, src_rows: rows, src_row0: row0, dst_rows: count, dst_row0: 0, count }
    }

    /// The inverse of [`RowCopy::gather`]: a packed `[batch, count, cols]` tensor into rows
    /// `[row0, row0 + count)` of each sample of a `[batch, rows, cols]` one.
    pub fn scatter(batch: usize, cols: usize, rows: usize, row0: usize, count: usize) -> Self {
        RowCopy { batch, cols, src_rows: count, src_row0: 0, dst_rows: rows, dst_row0: row0, count }
    }

    /// Elements of the source tensor.
    pub fn src_len(&self) -> usize {
        self.batch * self.src_rows * self.cols
    }

    /// Elements of the destination tensor.
    pub fn dst_len(&self) -> usize {
        self.batch * self.dst_rows * self.cols
    }

    /// The copied rows lie inside both tensors and the sizes fit.
    pub fn validate(&self) -> Result<()> {
        let fits = |rows: usize| {
            self.batch.checked_mul(rows).and_then(|r| r.checked_mul(self.cols)).is_some_and(|n| n <= i64::MAX as usize)
        };
        let inside = self.src_row0.checked_add(self.count).is_some_and(|e| e <= self.src_rows)
            && self.dst_row0.checked_add(self.count).is_some_and(|e| e <= self.dst_rows);
        if self.cols == 0 || !inside || !fits(self.src_rows) || !fits(self.dst_rows) {
            return Err(Error::Unsupported {
                what: "row copy",
                detail: format!("{self:?}: cols must be positive and the copied rows inside both tensors"),
            });
        }
        Ok(())
    }

    fn validate_cuda(&self) -> Result<()> {
        self.validate()?;
        let limit = i32::MAX as usize;
        if !self.cols.is_multiple_of(8) || self.cols > limit || self.src_rows > limit || self.dst_rows > limit {
            return Err(Error::Unsupported {
                what: "row copy",
                detail: format!("{self:?}: the CUDA kernel needs cols % 8 == 0 and 32-bit row counts"),
            });
        }
        Ok(())
    }
}

/// [`RowCopy`] on the CPU, f32; `accumulate` adds instead of overwriting. Other rows of `dst`
/// are left as they are.
pub fn cpu_copy_rows(copy: &RowCopy, src: &[f32], dst: &mut [f32], accumulate: bool) -> Result<()> {
    copy.validate()?;
    check_len("src", src.len(), copy.src_len())?;
    check_len("dst", dst.len(), copy.dst_len())?;
    let c = copy.cols;
    for b in 0..copy.batch {
        let s = &src[(b * copy.src_rows + copy.src_row0) * c..][..copy.count * c];
        let d = &mut dst[(b * copy.dst_rows + copy.dst_row0) * c..][..copy.count * c];
        if accumulate {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        } else {
            d.copy_from_slice(s);
        }
    }
    Ok(())
}

/// [`RowCopy`] on the GPU, bf16 (`accumulate`: added in f32, rounded once). Needs cols % 8 == 0
/// and 16-byte aligned pointers.
pub fn cuda_copy_rows(
    gpu: &Gpu,
    copy: &RowCopy,
    src: &dyn DeviceRead<bf16>,
    dst: &mut dyn DeviceWrite<bf16>,
    accumulate: bool,
) -> Result<()> {
    copy.validate_cuda()?;
    check_len("src", src.len(), copy.src_len())?;
    check_len("dst", dst.len(), copy.dst_len())?;
    check_aligned("src", src.ptr(), 16)?;
    check_aligned("dst", dst.ptr(), 16)?;
    let vectors = copy.batch * copy.count * copy.cols / 8;
    if vectors == 0 {
        return Ok(());
    }
    let p = MapetRowCopy {
        src: src.ptr(),
        dst: dst.ptr_mut(),
        batch: copy.batch as i64,
        src_rows: copy.src_rows as i32,
        dst_rows: copy.dst_rows as i32,
        src_row0: copy.src_row0 as i32,
        dst_row0: copy.dst_row0 as i32,
        count: copy.count as i32,
        cols: copy.cols as i32,
        accumulate: i32::from(accumulate),
    };
    let cfg = grid_stride("row-copy vectors", vectors as u64)?;
    // SAFETY: validate_cuda puts rows [row0, row0 + count) inside each sample of both tensors,
    // whose lengths were checked against batch * rows * cols; cols % 8 == 0 and 16-byte aligned
    // pointers make every 16-byte vector access aligned and in bounds.
    unsafe { gpu.launch_dependent(MODULE, "mapet_rows_copy", cfg, &p) }
}

/// `y += x` on the GPU, f32, elementwise.
pub fn cuda_add_f32(gpu: &Gpu, x: &dyn DeviceRead<f32>, y: &mut dyn DeviceWrite<f32>) -> Result<()> {
    check_len("y", y.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let p = MapetF32Vector { x: x.f32_ptr(), y: y.ptr_mut(), n: x.len() as i64 };
    let cfg = grid_stride("vector elements", x.len() as u64)?;
    // SAFETY: x and y hold n f32 each (checked); the kernel touches indices < n only.
    unsafe { gpu.launch_dependent(MODULE, "mapet_add_f32", cfg, &p) }
}

/// `y = bf16(x)` on the GPU, elementwise (round to nearest even).
pub fn cuda_f32_to_bf16(gpu: &Gpu, x: &dyn DeviceRead<f32>, y: &mut dyn DeviceWrite<bf16>) -> Result<()> {
    check_len("y", y.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let p = MapetF32Vector { x: x.f32_ptr(), y: y.ptr_mut(), n: x.len() as i64 };
    let cfg = grid_stride("vector elements", x.len() as u64)?;
    // SAFETY: x holds n f32 and y n bf16 (checked); the kernel touches indices < n only.
    unsafe { gpu.launch_dependent(MODULE, "mapet_f32_to_bf16", cfg, &p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_depends_on_the_shape_only() {
        let s = LayerScaleShape { samples: 128, rows_per_sample: 491, cols: 768 };
        assert_eq!(s.chunk_rows(), 64);
        assert_eq!(s.chunks(), (128 * 491usize).div_ceil(64));
        let big = LayerScaleShape { samples: 4096, rows_per_sample: 491, cols: 768 };
        assert!(big.chunks() <= MAX_CHUNKS);
        assert!(big.chunks() * big.chunk_rows() >= big.rows());
    }

    #[test]
    fn row_copies_refuse_rows_outside_the_tensors() {
        assert!(RowCopy::gather(2, 8, 10, 4, 6).validate().is_ok());
        assert!(RowCopy::gather(2, 8, 10, 5, 6).validate().is_err());
        assert!(RowCopy::scatter(2, 8, 10, 5, 6).validate().is_err());
        assert!(RowCopy::gather(2, 0, 10, 0, 6).validate().is_err());
    }
}
