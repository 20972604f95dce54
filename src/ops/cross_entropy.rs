//! Codebook cross-entropy: the decoder head and the loss as one op (SPEC.md, "Head and loss"),
//! with no `[rows, vocab]` tensor of floats anywhere.
//!
//! # Math
//!
//! For `R` rows of features `x [R, D]`, the decoder weight `W [V, D]` (a Linear `[out, in]`),
//! its bias `b [V]` and targets `t [R]` (`t < 0`: the row is ignored, excluded from the mean):
//!
//! ```text
//! l[r, j]   = x[r, :] . W[j, :] + b[j]
//! lse[r]    = log sum_j exp(l[r, j])
//! loss[r]   = lse[r] - l[r, t[r]]             (0 for an ignored row)
//! argmax[r] = lowest j with l[r, j] = max_j l[r, j]
//! loss      = sum_{r counted} loss[r] / n     (n = rows with t >= 0; 0 when n = 0)
//! correct   = #{counted r : argmax[r] = t[r]}
//! dlogits   = dloss / n * (softmax(l[r, :]) - onehot(t[r]))   (0 rows for ignored rows)
//! dx = dlogits W,   dW += dlogits^T x,   db += column sums of dlogits
//! ```
//!
//! # How it runs
//!
//! Rows are processed in chunks (the CPU reference too, so it never holds `R x V` floats either).
//! On the GPU, per chunk of `Rc` rows:
//!
//! 1. `acc = x_c W^T` runs in cuBLASLt on the chunk's rows `x_c` of `x` (read in place), bf16
//!    out, f32 accumulation;
//! 2. a row kernel adds the f32 bias, and in one pass per row computes max, sum-exp, logsumexp,
//!    loss and argmax. The bias is added there, in f32, rather than by cuBLASLt's bias epilogue,
//!    which takes the bias in the output type (bf16): this way the f32 master bias is used as is
//!    and the logits are rounded once, not twice. In training the chunk is then overwritten in
//!    place with bf16 dlogits, and the column sums of those (the bias gradient) are added per
//!    group of rows into a `[groups, V]` scratch, zeroed once per call. When `V` is a multiple of
//!    8 and at most [`GRAD_MAX_VOCAB`] (the model's 8192),
//!    `cuda/cross_entropy.cu::cross_entropy_rows_held` does all of it, each thread holding its
//!    slice of a row in registers (one exponential per logit) and summing its own columns over its
//!    block's rows (the same kernel without the writes for the forward alone, so both give the
//!    same statistics bit for bit). Other `V` run `cross_entropy_rows`, one block per row, then in
//!    training a column-sum kernel over the dlogits;
//! 3. `dx_c = dlogits_c W` (cuBLASLt, bf16 out), written in place into the chunk's rows of `dx`;
//! 4. `dW += dlogits_c^T x_c` (cuBLASLt, f32 out, beta = 1).
//!
//! ## Sub-chunks (an experiment, off by default)
//!
//! [`CrossEntropyShape::with_sub_chunk_rows`] runs steps 1 and 2 in several passes over the
//! chunk's rows (a logits GEMM, then the row kernel, on each pass), and steps 3 and 4 once over
//! the whole chunk as before. The idea: a pass's logits (17 MB for a third of the model's
//! 3136-row chunk) are still in the L2 cache (50 MB on an H100/H200) when the row kernel reads
//! them and overwrites them with dlogits, so the logits never travel to DRAM and back: about 100 of
//! the 255 MB a chunk moves today, at the price of one more GEMM and row-kernel launch a pass.
//! Same results as one pass up to rounding: `db`'s column sums are added in another order (rows
//! go to the row kernel's groups pass by pass), and cuBLASLt may pick another algorithm for the
//! shorter logits GEMMs. Measured on an H200 in the sixth run, passes were slower at every count
//! (BENCHMARKS.md), so it stays off.
//!
//! ## Reversed rows (an experiment, off by default)
//!
//! [`CrossEntropyShape::with_reversed_rows`] (`MAPET_CE_ROW_ORDER=reverse` for the CUDA backend)
//! makes the row kernels visit a pass's rows from the last back. The same idea by other means:
//! of a whole chunk's 51 MB of logits, the part the GEMM wrote last may still be in L2, and a
//! forward sweep reads first the rows already written back to DRAM, evicting on its way the ones
//! it needs next. Whether a backward sweep finds them depends on the order in which cuBLASLt's
//! kernel writes its output tiles, which only a card can say; `cross_entropy --bench` times both.
//! Same values for every row; `db`'s per-group sums add their rows in the other order.
//!
//! ## Paired rows (an experiment, off by default)
//!
//! [`CrossEntropyShape::with_paired_rows`] (`MAPET_CE_ROW_BLOCKS=paired` for the CUDA backend)
//! runs `cross_entropy_rows_paired` where `cross_entropy_rows_held` would run: a block of 512
//! threads is two of the held kernel's 256-thread blocks side by side, each half working through
//! its own rows with barriers of its own, and the two halves add their column sums together
//! before the block adds them to the scratch. The held kernel fits two blocks an SM (113
//! registers); the paired one, at 118, one block of two halves: as many rows in flight, and half
//! the column-sum groups (one an SM, at most [`PAIRED_GROUPS`], against 256). That halves the
//! scratch (4.1 MiB at `V = 8192` on a 132-SM H200, against 8 MiB), and the chunk may then hold
//! [`PAIRED_CHUNK_LOGITS_BYTES`] of logits: at the model's shape five chunks of 3764 rows (the
//! last 3760) instead of six of 3136, 63 MiB in all. The gain sought is one chunk's fixed costs
//! (its three GEMMs' ramps and tails, four kernel boundaries): on an H200, each extra chunk cost
//! about 42 us (below). Every row's loss, lse, argmax and dlogits are the held kernel's bits
//! (the same 256 threads compute each row in the same order), so dx and dW are too where the
//! chunks are the same; `db` adds its rows in other groups. Unverified on GPU:
//! `cross_entropy --bench` times it beside the default, with GEMM candidates chosen for its own
//! sizes.
//!
//! cuBLASLt's bias-gradient epilogue would give the column sums too, but on an H200 it runs as a
//! kernel of its own, a second pass over the dlogits; the held-rows kernel forms them from the
//! values it already holds (BENCHMARKS.md, third run). After the last chunk, `db +=` the
//! fixed-order sum of the groups' column sums (`cross_entropy_colsum_finish`, once per call, not
//! once per chunk), and one single-block kernel reduces the per-row losses (f64 accumulation, a
//! fixed order) and the correct count; the host reads those 8 bytes back: one synchronisation per
//! call, at its end ([`cuda_forward`], [`cuda_forward_backward`]) or when the caller asks
//! ([`QueuedStats::wait`] after [`cuda_forward_queued`], [`cuda_forward_backward_queued`]). No
//! float atomics anywhere: everything is deterministic run to run.
//!
//! # Extra device memory
//!
//! [`CrossEntropyShape::gpu_extra_device_bytes`] gives the exact figure (with paired rows, a bound:
//! see the end of this section). The rows are split into
//! the fewest equal chunks of `Rc` rows whose bf16 logits fit in 52 MiB: at the model's
//! `R = 18816`, `V = 8192`, six chunks of `Rc = 3136` (on an H200, 1024-row chunks took 2.12 ms
//! forward + backward and 2048-row ones 1.81, 2688-row ones 1.63; later, with the faster row
//! kernel, 1.96, 1.59 and 1.46: about 42 us per extra chunk, whence 52 MiB rather than 48,
//! six chunks rather than seven, still within the 64 MiB budget; fewer, larger chunks mean fewer
//! kernel boundaries and larger GEMMs):
//!
//! | buffer | bytes | V = 8192, D = 768, R = 18816 |
//! |---|---|---|
//! | chunk logits / dlogits (bf16) | `Rc * V * 2` (<= 52 MiB; 59 MiB with paired rows) | 49 MiB |
//! | column sums (f32, backward) | `groups * V * 4`: `groups = min(Rc, 256)` when `V % 8 == 0` and `V <= 8192`, else `clamp(ceil(Rc / 16), 1, 64)` | 8 MiB |
//! | targets (i32) | `R * 4` | 74 KiB |
//! | result | 8 | 8 B |
//!
//! 57 MiB in all at the model's shape. With `V <= 2^20` (checked) it is at most 63 MiB plus 4
//! bytes per row: 52 MiB of logits and at most 10.5 MiB of column sums (`groups * V * 4`, with
//! `Rc * V <= 26 Mi`). With paired rows ("Paired rows" above) the logits may take 59 MiB and the
//! column sums `min(ceil(Rc / 2), SMs, 144) * V * 4` bytes, at most 4.5 MiB: at most 63.5 MiB
//! plus 4 bytes per row. When `chunk_rows` is given, a last chunk of fewer rows gets
//! buffers of its own size after the full-size ones are freed (stream-ordered), so the peak
//! stays one set. Not counted: the cuBLASLt workspace, owned by the [`Gemm`].
//!
//! # Precision
//!
//! CPU ([`CpuPrecision::F32`]): f32 throughout. GPU: `x`, `W` bf16; the logits are
//! `bf16(x W^T)` (f32 accumulation) plus the f32 bias in f32; softmax, loss and lse in f32;
//! dlogits rounded to bf16 (the GEMM inputs of the backward); `dx` bf16; `dW`, `db` f32. `db`
//! sums the dlogits before their rounding where `cross_entropy_rows_held` runs (it has them in
//! f32), the stored bf16 values elsewhere. [`CpuPrecision::GpuRounding`] reproduces the roundings
//! on the CPU, summing the rounded dlogits into `db` (the less accurate of the two): it is the
//! same-precision baseline of the tests (DESIGN.md, "Conventions").

use std::ops::Range;

use cudarc::driver::LaunchConfig;
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{round_bf16, sgemm};
use crate::cuda::gemm::{Epilogue, Gemm};
use crate::cuda::params::MapetCrossEntropy;
use crate::cuda::{blocks_for, check_aligned, DeviceBuffer, DeviceRead, DeviceWrite, Gpu};
use crate::error::{check_len, switch_named, Error, Result};

/// Most bytes of bf16 logits one chunk may hold on the GPU.
pub const CHUNK_LOGITS_BYTES: usize = 52 << 20;
/// Rows per chunk of the CPU reference when the shape does not say.
pub const CPU_CHUNK_ROWS: usize = 64;
/// Largest vocabulary and feature dimension accepted (bounds the extra device memory).
pub const MAX_VOCAB: usize = 1 << 20;
/// See [`MAX_VOCAB`].
pub const MAX_DIM: usize = 1 << 20;

const MODULE: &str = "cross_entropy";
const ROW_THREADS: u32 = 256;
const COLSUM_THREADS: u32 = 128;
/// `cross_entropy_colsum_finish`: columns per block, and threads per block (columns × slices).
const FINISH_COLS: u32 = 32;
const FINISH_THREADS: u32 = 256;
/// The largest vocab `cross_entropy_rows_held` takes (`kGradMaxVocab` in the kernel).
pub const GRAD_MAX_VOCAB: usize = 8192;
/// Row groups (blocks) of `cross_entropy_rows_held` per chunk: about two per SM of an H100/H200,
/// one wave, 12 or 13 rows each at the model's 3136-row chunks.
const GRAD_GROUPS: usize = 256;
/// Most bytes of bf16 logits one chunk may hold with paired rows (module docs, "Paired rows"):
/// with at most [`PAIRED_GROUPS`] column sums it leaves the budget's 64 MiB room for the
/// targets of about 120,000 rows.
pub const PAIRED_CHUNK_LOGITS_BYTES: usize = 59 << 20;
/// Most blocks (row groups) of `cross_entropy_rows_paired` a pass: one an SM, as many SMs as an
/// H100 or H200 has and a few more (a device of more SMs leaves the rest idle in that kernel).
pub const PAIRED_GROUPS: usize = 144;
const REDUCE_THREADS: u32 = 1024;

/// Sizes of one call: `rows` feature rows of width `dim`, a vocabulary of `vocab` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossEntropyShape {
    pub rows: usize,
    pub dim: usize,
    pub vocab: usize,
    /// Rows per chunk. `None` takes the default: on the GPU the memory rule of the module docs,
    /// on the CPU [`CPU_CHUNK_ROWS`]. On the GPU a larger value is capped by the memory rule; the
    /// tests use small values to run many chunks.
    pub chunk_rows: Option<usize>,
    /// GPU only: rows per forward pass inside a chunk (module docs, "Sub-chunks"). `None`: one
    /// pass over the whole chunk. Capped by the chunk's rows; the CPU ignores it.
    pub sub_chunk_rows: Option<usize>,
    /// GPU only: the row kernels visit a pass's rows from the last back
    /// ([`CrossEntropyShape::with_reversed_rows`]). Every row gets the same values; the bias
    /// gradient's per-block sums add the rows in the other order. The CPU ignores it.
    pub reverse_rows: bool,
    /// GPU only: two rows at a time a block in the held-row kernel, and chunks of up to
    /// [`PAIRED_CHUNK_LOGITS_BYTES`] ([`CrossEntropyShape::with_paired_rows`]; module docs,
    /// "Paired rows"). The CPU, and vocabularies the held-row kernel does not take, ignore it.
    pub paired_rows: bool,
}

/// The variable that gives the CUDA backend's cross-entropy calls forward passes of at most this
/// many rows inside each chunk ([`CrossEntropyShape::with_sub_chunk_rows`]); unset, one pass.
pub const SUB_CHUNK_VAR: &str = "MAPET_CE_SUB_CHUNK_ROWS";

/// The variable that makes the CUDA backend's cross-entropy row kernels visit the rows from the
/// last back (`reverse`; `forward`, or unset, is the default order).
pub const ROW_ORDER_VAR: &str = "MAPET_CE_ROW_ORDER";

/// Whether `value` (the variable's value; `None`: unset) asks for reversed rows: `reverse` or
/// `forward`, else an error naming [`ROW_ORDER_VAR`].
pub fn reverse_rows_named(value: Option<&str>) -> Result<bool> {
    switch_named(
        ROW_ORDER_VAR,
        value,
        "cross-entropy row order",
        ("forward", "the default"),
        ("reverse", "the rows from the last back"),
    )
}

/// The variable that gives the CUDA backend's cross-entropy calls paired rows (`paired`; `single`,
/// or unset, is the default): [`CrossEntropyShape::with_paired_rows`].
pub const ROW_BLOCKS_VAR: &str = "MAPET_CE_ROW_BLOCKS";

/// Whether `value` (the variable's value; `None`: unset) asks for paired rows: `paired` or
/// `single`, else an error naming [`ROW_BLOCKS_VAR`].
pub fn paired_rows_named(value: Option<&str>) -> Result<bool> {
    switch_named(
        ROW_BLOCKS_VAR,
        value,
        "cross-entropy row blocks",
        ("single", "the default"),
        ("paired", "two rows at a time a block, larger chunks"),
    )
}

/// The sub-chunk rows `value` (the variable's value; `None`: unset) asks for: a positive
/// integer, else an error naming [`SUB_CHUNK_VAR`].
pub fn sub_chunk_rows_named(value: Option<&str>) -> Result<Option<usize>> {
    match value.map(str::trim) {
        None => Ok(None),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::Unsupported {
                what: "cross-entropy sub-chunk rows",
                detail: format!(
                    "{SUB_CHUNK_VAR}={v:?}: give a positive number of rows (say 1046), or unset it for one pass"
                ),
            }),
        },
    }
}

impl CrossEntropyShape {
    /// A shape with the default chunking.
    pub fn new(rows: usize, dim: usize, vocab: usize) -> Self {
        CrossEntropyShape {
            rows,
            dim,
            vocab,
            chunk_rows: None,
            sub_chunk_rows: None,
            reverse_rows: false,
            paired_rows: false,
        }
    }

    /// The same shape with `chunk_rows` rows per chunk.
    pub fn with_chunk_rows(self, chunk_rows: usize) -> Self {
        CrossEntropyShape { chunk_rows: Some(chunk_rows), ..self }
    }

    /// The same shape with forward passes of `sub_chunk_rows` rows inside each GPU chunk.
    pub fn with_sub_chunk_rows(self, sub_chunk_rows: usize) -> Self {
        CrossEntropyShape { sub_chunk_rows: Some(sub_chunk_rows), ..self }
    }

    /// The same shape with the row kernels visiting the rows from the last back (`true`) or not.
    /// Why it might pay: the logits GEMM's last output tiles are the likeliest to be still in L2
    /// when the row kernel starts, and a forward sweep reads first the rows L2 has already
    /// written back, evicting on its way the ones it is about to need. Whether it does depends on
    /// the order in which cuBLASLt's kernel writes its tiles; `cross_entropy --bench` times both.
    pub fn with_reversed_rows(self, reverse_rows: bool) -> Self {
        CrossEntropyShape { reverse_rows, ..self }
    }

    /// The same shape with paired rows (`true`) or not: on the GPU, where the held-row kernel runs
    /// (`vocab % 8 == 0`, `vocab <= 8192`), its blocks take two rows at a time, one block an SM,
    /// and a chunk may hold [`PAIRED_CHUNK_LOGITS_BYTES`] of logits: at the model's shape five
    /// chunks of 3764 rows instead of six of 3136 (module docs, "Paired rows"). The rows' loss,
    /// lse, argmax, dx and dW are the same bits; db sums the rows in other groups.
    pub fn with_paired_rows(self, paired_rows: bool) -> Self {
        CrossEntropyShape { paired_rows, ..self }
    }

    /// Whether a GPU call of this shape runs the paired-row kernel: paired rows asked for, and a
    /// vocabulary the held-row kernel takes.
    fn paired(&self) -> bool {
        self.paired_rows && held_rows(self.vocab)
    }

    /// Most bytes of bf16 logits one GPU chunk may hold.
    fn chunk_logits_bytes(&self) -> usize {
        if self.paired() {
            PAIRED_CHUNK_LOGITS_BYTES
        } else {
            CHUNK_LOGITS_BYTES
        }
    }

    /// The same shape with the sub-chunk rows `SUB_CHUNK_VAR` gave the backend
    /// ([`sub_chunk_rows_named`]), unless the shape sets its own.
    pub fn or_sub_chunk_rows(self, sub_chunk_rows: Option<usize>) -> Self {
        CrossEntropyShape { sub_chunk_rows: self.sub_chunk_rows.or(sub_chunk_rows), ..self }
    }

    /// The row ranges, relative to a chunk of `chunk` rows, of its forward passes on the GPU:
    /// consecutive, in order, covering `[0, chunk)`, each at most `sub_chunk_rows` long (one
    /// range when that is `None`). With `sub_chunk_rows` given, the chunk is split into the fewest
    /// passes that respect it, as equal as possible (the first ones one row longer).
    pub fn gpu_sub_chunks(&self, chunk: usize) -> Vec<Range<usize>> {
        let per = self.sub_chunk_rows.unwrap_or(chunk).clamp(1, chunk.max(1));
        let passes = chunk.div_ceil(per).max(1);
        let (base, extra) = (chunk / passes, chunk % passes);
        let mut start = 0;
        (0..passes)
            .map(|i| {
                let len = base + usize::from(i < extra);
                start += len;
                start - len..start
            })
            .collect()
    }

    /// Rows per chunk on the GPU (at least 1, at most `rows`): `chunk_rows` when given (capped by
    /// the memory rule), else the rows split into the fewest equal chunks the rule allows.
    pub fn gpu_chunk_rows(&self) -> usize {
        let limit = (self.chunk_logits_bytes() / (2 * self.vocab.max(1))).max(1);
        let rows = self.rows.max(1);
        match self.chunk_rows {
            Some(n) => n.min(limit).clamp(1, rows),
            None => rows.div_ceil(rows.div_ceil(limit)),
        }
    }

    /// Rows per chunk of the CPU reference.
    pub fn cpu_chunk_rows(&self) -> usize {
        self.chunk_rows.unwrap_or(CPU_CHUNK_ROWS).clamp(1, self.rows.max(1))
    }

    /// Bytes of device memory a GPU call allocates besides its arguments (module docs), for the
    /// forward alone or the forward and backward: exact, but with paired rows on a device of
    /// fewer SMs than [`PAIRED_GROUPS`], where it is a bound (one column-sum group an SM).
    pub fn gpu_extra_device_bytes(&self, backward: bool) -> usize {
        let rc = self.gpu_chunk_rows();
        let mut bytes = rc * self.vocab * 2 + self.rows.max(1) * 4 + 2 * 4;
        if backward {
            bytes += self.colsum_groups(rc, usize::MAX) * self.vocab * 4;
        }
        bytes
    }

    /// Groups of rows of a pass of `rows` rows whose column sums are formed separately (then
    /// summed in order), on a device of `sm_count` SMs: the blocks of `cross_entropy_rows_held`
    /// (one a row up to [`GRAD_GROUPS`]) or `cross_entropy_rows_paired` (one a pair of rows, and
    /// one an SM at most), or of the column-sum kernel. Never fewer for more rows, so a call's
    /// scratch sized for its chunk holds every pass's.
    fn colsum_groups(&self, rows: usize, sm_count: usize) -> usize {
        if self.paired() {
            rows.div_ceil(2).clamp(1, PAIRED_GROUPS.min(sm_count.max(1)))
        } else if held_rows(self.vocab) {
            rows.clamp(1, GRAD_GROUPS)
        } else {
            rows.div_ceil(16).clamp(1, 64)
        }
    }
}

/// Whether the rows run through `cross_entropy_rows_held` (module docs, step 2).
fn held_rows(vocab: usize) -> bool {
    vocab.is_multiple_of(8) && vocab <= GRAD_MAX_VOCAB
}

/// What a call reads back: the mean loss and the argmax hits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyStats {
    /// Mean loss over the counted rows (0 when there are none).
    pub loss: f32,
    /// Counted rows whose argmax equals the target.
    pub correct: usize,
    /// Rows with a target >= 0.
    pub counted: usize,
}

impl CrossEntropyStats {
    /// `correct / counted` (0 when nothing was counted).
    pub fn accuracy(&self) -> f64 {
        if self.counted == 0 {
            0.0
        } else {
            self.correct as f64 / self.counted as f64
        }
    }
}

/// Per-row results: loss (0 for ignored rows), logsumexp, argmax (lowest index on ties).
#[derive(Debug)]
pub struct RowOutputs<F, I> {
    pub loss: F,
    pub lse: F,
    pub argmax: I,
}

/// Per-row results on the host.
pub type CpuRowOutputs = RowOutputs<Vec<f32>, Vec<i32>>;
/// Per-row results on the device.
pub type CudaRowOutputs = RowOutputs<DeviceBuffer<f32>, DeviceBuffer<i32>>;

impl RowOutputs<Vec<f32>, Vec<i32>> {
    /// Zeroed outputs for `rows` rows.
    pub fn new(rows: usize) -> Self {
        RowOutputs { loss: vec![0.0; rows], lse: vec![0.0; rows], argmax: vec![0; rows] }
    }
}

impl RowOutputs<DeviceBuffer<f32>, DeviceBuffer<i32>> {
    /// Uninitialised device outputs for `rows` rows.
    pub fn new(gpu: &Gpu, rows: usize) -> Result<Self> {
        Ok(RowOutputs { loss: gpu.alloc(rows)?, lse: gpu.alloc(rows)?, argmax: gpu.alloc(rows)? })
    }

    /// Fills all three with `0xFF` bytes (NaN, NaN, -1), so a test sees what was not written.
    pub fn poison(&mut self) -> Result<()> {
        self.loss.poison()?;
        self.lse.poison()?;
        self.argmax.poison()
    }

    /// Copies the three back to the host.
    pub fn to_host(&self) -> Result<CpuRowOutputs> {
        Ok(RowOutputs { loss: self.loss.to_host()?, lse: self.lse.to_host()?, argmax: self.argmax.to_host()? })
    }
}

/// Which roundings the CPU implementation applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuPrecision {
    /// f32 throughout: the reference and the CPU backend.
    #[default]
    F32,
    /// The GPU path's roundings (module docs, "Precision"): `x W^T` rounded to bf16 before the
    /// bias is added, dlogits and `dx` rounded to bf16. Inputs are used as given: round `x` and
    /// `W` to bf16 first to mirror bf16 inputs. The tests' same-precision baseline.
    GpuRounding,
}

// ------------------------------------------------------------------------------------------ checks

/// Checks every target against the vocabulary (`t < vocab`, or `t < 0` for an ignored row) and
/// returns how many rows are counted. The error names the first bad row.
pub fn check_targets(targets: &[i32], vocab: usize) -> Result<usize> {
    let mut counted = 0;
    for (row, &t) in targets.iter().enumerate() {
        if t >= 0 {
            if t as usize >= vocab {
                return Err(Error::Unsupported {
                    what: "target id",
                    detail: format!(
                        "row {row} has target {t}, not below the vocabulary size {vocab} (negative ids mark ignored rows)"
                    ),
                });
            }
            counted += 1;
        }
    }
    Ok(counted)
}

fn elements(a: usize, b: usize, what: &'static str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::Unsupported { what, detail: format!("{a} x {b} elements overflow") })
}

/// The checks both backends share: sizes, lengths, targets. Returns the counted rows.
fn check_common(shape: &CrossEntropyShape, x_len: usize, w_len: usize, b_len: usize, targets: &[i32]) -> Result<usize> {
    check_lens(shape, x_len, w_len, b_len, targets.len())?;
    check_targets(targets, shape.vocab)
}

/// The checks of [`check_common`] that do not read the targets' values.
fn check_lens(shape: &CrossEntropyShape, x_len: usize, w_len: usize, b_len: usize, targets_len: usize) -> Result<()> {
    let CrossEntropyShape { rows, dim, vocab, .. } = *shape;
    if dim == 0 || vocab == 0 {
        return Err(Error::Unsupported {
            what: "cross-entropy shape",
            detail: format!("dim = {dim}, vocab = {vocab}: both must be at least 1"),
        });
    }
    if vocab > MAX_VOCAB || dim > MAX_DIM {
        return Err(Error::Unsupported {
            what: "cross-entropy shape",
            detail: format!("dim = {dim}, vocab = {vocab}: each must be at most {MAX_VOCAB}"),
        });
    }
    check_len("x", x_len, elements(rows, dim, "x")?)?;
    check_len("w", w_len, elements(vocab, dim, "w")?)?;
    check_len("b", b_len, vocab)?;
    check_len("targets", targets_len, rows)
}

fn check_rows_out(rows: usize, loss: usize, lse: usize, argmax: usize) -> Result<()> {
    check_len("row loss", loss, rows)?;
    check_len("row lse", lse, rows)?;
    check_len("row argmax", argmax, rows)
}

fn check_grads(shape: &CrossEntropyShape, dx: usize, dw: usize, db: usize) -> Result<()> {
    check_len("dx", dx, shape.rows.saturating_mul(shape.dim))?;
    check_len("dw", dw, shape.vocab.saturating_mul(shape.dim))?;
    check_len("db", db, shape.vocab)
}

/// `dloss / counted`, the factor of every dlogit (0 when nothing is counted).
fn grad_scale(dloss: f32, counted: usize) -> f32 {
    if counted == 0 {
        0.0
    } else {
        (dloss as f64 / counted as f64) as f32
    }
}

// --------------------------------------------------------------------------------------------- CPU

/// Forward on the CPU in f32: per-row loss, lse and argmax into `rows_out`, and the mean loss and
/// correct count.
pub fn cpu_forward(
    shape: &CrossEntropyShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    targets: &[i32],
    rows_out: &mut CpuRowOutputs,
) -> Result<CrossEntropyStats> {
    cpu_forward_with(CpuPrecision::F32, shape, x, w, b, targets, rows_out)
}

/// [`cpu_forward`] with a choice of roundings.
pub fn cpu_forward_with(
    precision: CpuPrecision,
    shape: &CrossEntropyShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    targets: &[i32],
    rows_out: &mut CpuRowOutputs,
) -> Result<CrossEntropyStats> {
    check_rows_out(shape.rows, rows_out.loss.len(), rows_out.lse.len(), rows_out.argmax.len())?;
    cpu_run(precision, shape, x, w, b, targets, Some(rows_out), None)
}

/// Backward on the CPU in f32, for an upstream gradient `dloss` of the mean loss: `dx` is
/// written, `dw` and `db` are added to. Recomputes the logits chunk by chunk; returns the same
/// statistics as [`cpu_forward`].
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward(
    shape: &CrossEntropyShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    targets: &[i32],
    dloss: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<CrossEntropyStats> {
    cpu_backward_with(CpuPrecision::F32, shape, x, w, b, targets, dloss, dx, dw, db)
}

/// [`cpu_backward`] with a choice of roundings.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward_with(
    precision: CpuPrecision,
    shape: &CrossEntropyShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    targets: &[i32],
    dloss: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<CrossEntropyStats> {
    check_grads(shape, dx.len(), dw.len(), db.len())?;
    cpu_run(precision, shape, x, w, b, targets, None, Some(CpuGrads { dloss, dx, dw, db }))
}

struct CpuGrads<'a> {
    dloss: f32,
    dx: &'a mut [f32],
    dw: &'a mut [f32],
    db: &'a mut [f32],
}

/// (lse, lowest index of the max) of one row of logits.
fn row_stats(l: &[f32]) -> (f32, usize) {
    let mut m = f32::NEG_INFINITY;
    let mut arg = 0;
    for (j, &v) in l.iter().enumerate() {
        if v > m {
            m = v;
            arg = j;
        }
    }
    let s: f32 = l.iter().map(|&v| (v - m).exp()).sum();
    (m + s.ln(), arg)
}

#[allow(clippy::too_many_arguments)]
fn cpu_run(
    precision: CpuPrecision,
    shape: &CrossEntropyShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    targets: &[i32],
    mut rows_out: Option<&mut CpuRowOutputs>,
    mut grads: Option<CpuGrads<'_>>,
) -> Result<CrossEntropyStats> {
    let counted = check_common(shape, x.len(), w.len(), b.len(), targets)?;
    let CrossEntropyShape { rows, dim, vocab, .. } = *shape;
    let gpu_rounding = precision == CpuPrecision::GpuRounding;
    let scale = grads.as_ref().map_or(0.0, |g| grad_scale(g.dloss, counted));
    let want_grad = grads.is_some();
    let rc = shape.cpu_chunk_rows();
    let mut logits = vec![0.0f32; rc.min(rows) * vocab];
    let mut transposed = if want_grad { vec![0.0f32; rc.min(rows) * vocab] } else { Vec::new() };
    let mut colsum = if want_grad { vec![0.0f32; vocab] } else { Vec::new() };
    let mut sum = 0.0f64;
    let mut correct = 0usize;

    let mut start = 0;
    while start < rows {
        let n = rc.min(rows - start);
        let xc = &x[start * dim..(start + n) * dim];
        let tc = &targets[start..start + n];
        let lg = &mut logits[..n * vocab];
        sgemm(n, vocab, dim, 1.0, xc, w, true, 0.0, lg);
        let per_row: Vec<(f32, f32, i32)> = lg
            .par_chunks_mut(vocab)
            .zip(tc.par_iter())
            .map(|(l, &t)| {
                for (v, &bj) in l.iter_mut().zip(b) {
                    if gpu_rounding {
                        *v = bf16::from_f32(*v).to_f32();
                    }
                    *v += bj;
                }
                let (lse, arg) = row_stats(l);
                let loss = if t >= 0 { lse - l[t as usize] } else { 0.0 };
                if want_grad {
                    if t < 0 {
                        l.fill(0.0);
                    } else {
                        for (j, v) in l.iter_mut().enumerate() {
                            let onehot = if j == t as usize { 1.0 } else { 0.0 };
                            *v = scale * ((*v - lse).exp() - onehot);
                        }
                        if gpu_rounding {
                            round_bf16(l);
                        }
                    }
                }
                (loss, lse, arg as i32)
            })
            .collect();
        for (i, &(loss, lse, arg)) in per_row.iter().enumerate() {
            if let Some(out) = rows_out.as_deref_mut() {
                out.loss[start + i] = loss;
                out.lse[start + i] = lse;
                out.argmax[start + i] = arg;
            }
            if tc[i] >= 0 {
                sum += loss as f64;
                correct += usize::from(arg == tc[i]);
            }
        }
        if let Some(g) = grads.as_mut() {
            let dxc = &mut g.dx[start * dim..(start + n) * dim];
            sgemm(n, dim, vocab, 1.0, lg, w, false, 0.0, dxc);
            if gpu_rounding {
                round_bf16(dxc);
            }
            // dW += dlogits^T x_c: sgemm takes op(A) = A, so transpose the chunk explicitly.
            let tr = &mut transposed[..vocab * n];
            for (i, row) in lg.chunks_exact(vocab).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    tr[j * n + i] = v;
                }
            }
            sgemm(vocab, dim, n, 1.0, tr, xc, false, 1.0, g.dw);
            colsum.fill(0.0);
            for row in lg.chunks_exact(vocab) {
                for (s, &v) in colsum.iter_mut().zip(row) {
                    *s += v;
                }
            }
            for (d, &s) in g.db.iter_mut().zip(&colsum) {
                *d += s;
            }
        }
        start += n;
    }
    let loss = if counted > 0 { (sum / counted as f64) as f32 } else { 0.0 };
    Ok(CrossEntropyStats { loss, correct, counted })
}

// -------------------------------------------------------------------------------------------- CUDA

/// Forward on the GPU: per-row loss, lse and argmax into `rows_out`, and the mean loss and
/// correct count (read back: one synchronisation). `x` is bf16 `[rows, dim]`, `w` the bf16 copy
/// of the decoder weight `[vocab, dim]`, `b` the f32 bias; `targets` stay on the host, where they
/// are checked, and are uploaded. `gemm` must belong to `gpu`. `dim` must be a multiple of 8.
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward(
    gpu: &Gpu,
    gemm: &Gemm,
    shape: &CrossEntropyShape,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<f32>,
    targets: &[i32],
    rows_out: &mut CudaRowOutputs,
) -> Result<CrossEntropyStats> {
    cuda_forward_queued(gpu, gemm, shape, x, w, b, targets, rows_out)?.wait()
}

/// [`cuda_forward`] without the wait: everything is queued on the stream, and the mean loss and
/// correct count stay on the device until [`QueuedStats::wait`]. The per-row outputs are ready
/// once the stream reaches them.
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward_queued(
    gpu: &Gpu,
    gemm: &Gemm,
    shape: &CrossEntropyShape,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<f32>,
    targets: &[i32],
    rows_out: &mut CudaRowOutputs,
) -> Result<QueuedStats> {
    cuda_run(gpu, gemm, shape, x, w, b, targets, rows_out, None)
}

/// Forward and backward on the GPU in one pass over the chunks, for an upstream gradient `dloss`
/// of the mean loss (1 for plain training): as [`cuda_forward`], and `dx` (bf16 `[rows, dim]`)
/// is written, `dw` (f32 `[vocab, dim]`) and `db` (f32 `[vocab]`) are added to.
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward_backward(
    gpu: &Gpu,
    gemm: &Gemm,
    shape: &CrossEntropyShape,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<f32>,
    targets: &[i32],
    dloss: f32,
    rows_out: &mut CudaRowOutputs,
    dx: &mut dyn DeviceWrite<bf16>,
    dw: &mut dyn DeviceWrite<f32>,
    db: &mut dyn DeviceWrite<f32>,
) -> Result<CrossEntropyStats> {
    cuda_forward_backward_queued(gpu, gemm, shape, x, w, b, targets, dloss, rows_out, dx, dw, db)?.wait()
}

/// [`cuda_forward_backward`] without the wait (see [`cuda_forward_queued`]): the gradients and the
/// per-row outputs are ready once the stream reaches them.
#[allow(clippy::too_many_arguments)]
pub fn cuda_forward_backward_queued(
    gpu: &Gpu,
    gemm: &Gemm,
    shape: &CrossEntropyShape,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<f32>,
    targets: &[i32],
    dloss: f32,
    rows_out: &mut CudaRowOutputs,
    dx: &mut dyn DeviceWrite<bf16>,
    dw: &mut dyn DeviceWrite<f32>,
    db: &mut dyn DeviceWrite<f32>,
) -> Result<QueuedStats> {
    check_grads(shape, dx.len(), dw.len(), db.len())?;
    cuda_run(gpu, gemm, shape, x, w, b, targets, rows_out, Some(CudaGrads { dloss, dx, dw, db }))
}

/// The statistics of a queued GPU call, still on the device: the reduce kernel's 8 bytes (mean
/// loss bits, correct count) and the counted rows, known on the host from the targets.
#[must_use = "the statistics are only read by `wait`"]
pub struct QueuedStats {
    /// `None` when the call had no rows (nothing was queued).
    result: Option<DeviceBuffer<i32>>,
    counted: usize,
}

impl QueuedStats {
    /// Waits for the stream to reach the statistics and reads them back (8 bytes).
    pub fn wait(self) -> Result<CrossEntropyStats> {
        let Some(result) = self.result else {
            return Ok(CrossEntropyStats { loss: 0.0, correct: 0, counted: self.counted });
        };
        let host = result.to_host()?;
        let (loss_bits, correct) = (host[0], host[1]);
        Ok(CrossEntropyStats {
            loss: f32::from_bits(loss_bits as u32),
            correct: correct.max(0) as usize,
            counted: self.counted,
        })
    }
}

struct CudaGrads<'a> {
    dloss: f32,
    dx: &'a mut dyn DeviceWrite<bf16>,
    dw: &'a mut dyn DeviceWrite<f32>,
    db: &'a mut dyn DeviceWrite<f32>,
}

/// The GPU-only checks: the feature rows must be 16-byte multiples.
fn check_gpu(shape: &CrossEntropyShape) -> Result<()> {
    if !shape.dim.is_multiple_of(8) {
        return Err(Error::Unsupported {
            what: "feature dimension",
            detail: format!("dim = {} must be a multiple of 8 on the GPU (16-byte bf16 rows)", shape.dim),
        });
    }
    Ok(())
}

/// The chunk's logits (bf16, overwritten by dlogits in training).
struct ChunkBuffers {
    rows: usize,
    logits: DeviceBuffer<bf16>,
}

impl ChunkBuffers {
    fn new(gpu: &Gpu, rows: usize, vocab: usize) -> Result<Self> {
        Ok(ChunkBuffers { rows, logits: gpu.alloc(rows * vocab)? })
    }
}

/// Everything one GPU call works on (`'g`: the gradient outputs, kept apart because mutable
/// trait-object borrows are invariant).
struct Call<'a, 'g> {
    gpu: &'a Gpu,
    gemm: &'a Gemm,
    dim: usize,
    vocab: usize,
    x: &'a dyn DeviceRead<bf16>,
    w: &'a dyn DeviceRead<bf16>,
    b: &'a dyn DeviceRead<f32>,
    targets: &'a dyn DeviceRead<i32>,
    rows_out: &'a mut CudaRowOutputs,
    grads: Option<CudaGrads<'g>>,
    partial: Option<DeviceBuffer<f32>>,
    groups: usize,
    grad_scale: f32,
    /// The call's shape: its row order and row blocks, and its passes' column-sum groups.
    shape: CrossEntropyShape,
    sm_count: usize,
}

impl Call<'_, '_> {
    /// Parameters with every pointer null and every size 0.
    fn params(&self) -> MapetCrossEntropy {
        MapetCrossEntropy {
            logits: std::ptr::null_mut(),
            bias: self.b.f32_ptr(),
            targets: std::ptr::null(),
            row_loss: std::ptr::null_mut(),
            row_lse: std::ptr::null_mut(),
            row_argmax: std::ptr::null_mut(),
            partial: std::ptr::null_mut(),
            dbias: std::ptr::null_mut(),
            result: std::ptr::null_mut(),
            rows: 0,
            ld: self.vocab as i64,
            counted: 0,
            vocab: self.vocab as i32,
            write_grad: 0,
            groups: self.groups as i32,
            grad_scale: self.grad_scale,
            reverse_rows: i32::from(self.shape.reverse_rows),
        }
    }

    /// Rows `[start, start + cb.rows)`: logits and row statistics, pass by pass (the first
    /// pass's logits GEMM is not launched when `first_ready`: [`logits_gemm`] queued it already),
    /// then (backward) dx, dW, db over the whole chunk.
    fn chunk(&mut self, cb: &mut ChunkBuffers, start: usize, passes: &[Range<usize>], first_ready: bool) -> Result<()> {
        let (gpu, dim, vocab, n) = (self.gpu, self.dim, self.vocab, cb.rows);
        for (i, pass) in passes.iter().enumerate() {
            if i > 0 || !first_ready {
                logits_gemm(gpu, self.gemm, self.x, self.w, &mut cb.logits, start, pass.clone(), dim, vocab)?;
            }
            self.row_pass(cb, start, pass.clone())?;
        }

        let Some(g) = self.grads.as_mut() else {
            return Ok(());
        };
        // The chunk's rows of x, read in place by the GEMMs (no staging copy).
        let x_c = gpu.view_of(self.x, start * dim..(start + n) * dim)?;
        // dx_c[n, D] = dlogits_c W, written in place into the chunk's rows of dx.
        let mut dx_c = gpu.view_mut_of(&mut *g.dx, start * dim..(start + n) * dim)?;
        self.gemm.matmul(n, dim, vocab, &cb.logits, false, self.w, false, &mut dx_c, 1.0, 0.0, Epilogue::None)?;
        // dW[V, D] += dlogits_c^T x_c.
        self.gemm.matmul_f32_out(vocab, dim, n, &cb.logits, true, &x_c, false, g.dw, 1.0, 1.0, Epilogue::None)?;
        if !held_rows(vocab) {
            let mut p = self.params();
            p.logits = cb.logits.ptr_mut();
            p.rows = n as i64;
            p.groups = self.shape.colsum_groups(n, self.sm_count) as i32;
            p.partial = self.partial_ptr()?;
            let cfg = LaunchConfig {
                grid_dim: (
                    blocks_for("cross-entropy column sums", vocab as u64, COLSUM_THREADS as u64)?,
                    p.groups as u32,
                    1,
                ),
                block_dim: (COLSUM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reads the n * vocab dlogits of the chunk; adds to groups * vocab floats of
            // partial, which holds at least that many.
            unsafe { gpu.launch_dependent(MODULE, "cross_entropy_colsum_partial", cfg, &p) }?;
        }
        Ok(())
    }

    /// The row kernel over the call's rows `start + pass`, rows `pass` of the chunk's logits:
    /// loss, lse, argmax, and (backward) the dlogits in place and their column sums added to
    /// partial.
    fn row_pass(&mut self, cb: &mut ChunkBuffers, start: usize, pass: Range<usize>) -> Result<()> {
        let (gpu, vocab) = (self.gpu, self.vocab);
        if pass.end > cb.rows {
            return Err(Error::Unsupported {
                what: "cross-entropy pass",
                detail: format!("rows {pass:?} of a chunk of {} rows", cb.rows),
            });
        }
        let (first, n) = (start + pass.start, pass.len());
        let rows = first..first + n;
        let mut p = self.params();
        // Every pointer from a typed, bounds-checked view: offsets on the untyped pointers would
        // count bytes (the sixth run's sub-chunk bug).
        p.logits = gpu.view_mut_of(&mut cb.logits, pass.start * vocab..pass.end * vocab)?.ptr_mut();
        p.targets = gpu.view_of(self.targets, rows.clone())?.ptr() as *const i32;
        p.row_loss = gpu.view_mut_of(&mut self.rows_out.loss, rows.clone())?.ptr_mut() as *mut f32;
        p.row_lse = gpu.view_mut_of(&mut self.rows_out.lse, rows.clone())?.ptr_mut() as *mut f32;
        p.row_argmax = gpu.view_mut_of(&mut self.rows_out.argmax, rows)?.ptr_mut() as *mut i32;
        p.rows = n as i64;
        p.write_grad = i32::from(self.grads.is_some());
        // This pass's column-sum groups (a shorter pass or chunk may have fewer than the call's).
        p.groups = self.shape.colsum_groups(n, self.sm_count) as i32;
        let held = held_rows(vocab);
        if held && self.grads.is_some() {
            p.partial = self.partial_ptr()?;
        }
        // cross_entropy_rows_held runs one block per group of rows in both variants: for the
        // forward alone one block per row was slower on an H200 (0.82 ms against 0.76 at the
        // model's shape, before fast_exp: at 117 registers only 2 blocks fit an SM, and a
        // one-row block has too little to overlap). With fast_exp it takes 0.62 ms, less than
        // the one-block-per-row cross_entropy_rows (0.67), whose exponentials are summed in
        // another order, so its statistics would differ from training's in the last bits.
        // The paired kernel's blocks are two of the held kernel's side by side (a row each).
        let (kernel, blocks, threads) = match (held, self.shape.paired()) {
            (true, true) => ("cross_entropy_rows_paired", p.groups as u64, 2 * ROW_THREADS),
            (true, false) => ("cross_entropy_rows_held", p.groups as u64, ROW_THREADS),
            (false, _) => ("cross_entropy_rows", n as u64, ROW_THREADS),
        };
        let cfg = LaunchConfig {
            grid_dim: (blocks_for("cross-entropy rows", blocks, 1)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the views above checked that logits holds the pass's n * vocab bf16 (ld =
        // vocab) and targets and the three row outputs the pass's n elements each, from the
        // pointers given; the bias holds vocab f32; every target is below vocab (checked on the
        // host), so the target logit read stays inside its row. cross_entropy_rows_held and
        // cross_entropy_rows_paired (vocab % 8 == 0, vocab <= GRAD_MAX_VOCAB, as they require)
        // add, in training only, to groups * vocab floats of partial, which holds the call's
        // colsum_groups(rc) >= groups rows of vocab floats, 256-byte aligned; the paired kernel's
        // grid of groups <= ceil(n / 2) blocks gives every block's first half at least one row
        // (its second half may have none, and still meets the block at its last barrier).
        unsafe { gpu.launch_dependent(MODULE, kernel, cfg, &p) }
    }

    /// db += the sum over groups of partial, once per call: every chunk added its column sums to
    /// partial (zeroed when it was allocated), group by group.
    fn finish_bias_gradient(&mut self) -> Result<()> {
        let Some(dbias) = self.grads.as_ref().map(|g| g.db.f32_ptr()) else {
            return Ok(());
        };
        let mut p = self.params();
        p.dbias = dbias;
        p.partial = self.partial_ptr()?;
        let cfg = LaunchConfig {
            grid_dim: (blocks_for("cross-entropy bias gradient", self.vocab as u64, FINISH_COLS as u64)?, 1, 1),
            block_dim: (FINISH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads groups * vocab floats of partial (allocated with that many, zeroed, then
        // added to by the chunks), adds to the vocab floats of db.
        unsafe { self.gpu.launch_dependent(MODULE, "cross_entropy_colsum_finish", cfg, &p) }?;
        Ok(())
    }

    /// The column-sum scratch (allocated for a backward call).
    fn partial_ptr(&mut self) -> Result<*mut f32> {
        let partial = self.partial.as_mut().ok_or_else(|| Error::Unsupported {
            what: "column-sum scratch",
            detail: "the backward needs the partial-sum buffer".into(),
        })?;
        Ok(partial.f32_ptr())
    }
}

/// acc = x_p W^T for the rows `start + pass` of `x`, into rows `pass` of a chunk's `logits` (the
/// bias is added by the row kernel, in f32). Reads no targets.
#[allow(clippy::too_many_arguments)]
fn logits_gemm(
    gpu: &Gpu,
    gemm: &Gemm,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    logits: &mut DeviceBuffer<bf16>,
    start: usize,
    pass: Range<usize>,
    dim: usize,
    vocab: usize,
) -> Result<()> {
    let n = pass.len();
    let x_p = gpu.view_of(x, (start + pass.start) * dim..(start + pass.end) * dim)?;
    let mut out = gpu.view_mut_of(logits, pass.start * vocab..pass.end * vocab)?;
    gemm.matmul(n, vocab, dim, &x_p, false, w, true, &mut out, 1.0, 0.0, Epilogue::None)
}

#[allow(clippy::too_many_arguments)]
fn cuda_run(
    gpu: &Gpu,
    gemm: &Gemm,
    shape: &CrossEntropyShape,
    x: &dyn DeviceRead<bf16>,
    w: &dyn DeviceRead<bf16>,
    b: &dyn DeviceRead<f32>,
    targets: &[i32],
    rows_out: &mut CudaRowOutputs,
    grads: Option<CudaGrads<'_>>,
) -> Result<QueuedStats> {
    // Every check but the targets' values first: the first chunk's logits GEMM reads none of
    // them, so it is queued before the host goes through them and uploads them, and the GPU
    // starts that much sooner (an invalid target still fails the call before anything the caller
    // can see is written: the GEMM writes only this call's scratch).
    check_lens(shape, x.len(), w.len(), b.len(), targets.len())?;
    check_gpu(shape)?;
    // The row kernel reads the bias as float4 vectors when vocab % 8 == 0.
    check_aligned("b", b.ptr(), 16)?;
    check_rows_out(shape.rows, rows_out.loss.len(), rows_out.lse.len(), rows_out.argmax.len())?;
    let CrossEntropyShape { rows, dim, vocab, .. } = *shape;
    if rows == 0 {
        return Ok(QueuedStats { result: None, counted: 0 });
    }
    let rc = shape.gpu_chunk_rows();
    let (full, tail) = (rows / rc, rows % rc);
    let mut first = ChunkBuffers::new(gpu, if full > 0 { rc } else { tail }, vocab)?;
    let (passes, tail_passes) = (shape.gpu_sub_chunks(first.rows), shape.gpu_sub_chunks(tail));
    logits_gemm(gpu, gemm, x, w, &mut first.logits, 0, passes[0].clone(), dim, vocab)?;

    let counted = check_targets(targets, vocab)?;
    let sm_count = gpu.sm_count() as usize;
    let groups = shape.colsum_groups(rc, sm_count);
    let backward = grads.is_some();
    let d_targets = gpu.upload(targets)?;
    let mut result = gpu.alloc::<i32>(2)?;
    // Zeroed here, added to by every chunk's column sums, summed into db once at the end.
    let partial = if backward { Some(gpu.zeros::<f32>(groups * vocab)?) } else { None };
    let grad_scale = grads.as_ref().map_or(0.0, |g| grad_scale(g.dloss, counted));
    let mut call = Call {
        gpu,
        gemm,
        dim,
        vocab,
        x,
        w,
        b,
        targets: &d_targets,
        rows_out,
        grads,
        partial,
        groups,
        grad_scale,
        shape: *shape,
        sm_count,
    };

    if full > 0 {
        // `first` holds full-size chunks; the tail, if any, gets its own buffers after they are
        // freed (in stream order).
        let mut cb = first;
        for i in 0..full {
            call.chunk(&mut cb, i * rc, &passes, i == 0)?;
        }
        drop(cb);
        if tail > 0 {
            let mut cb = ChunkBuffers::new(gpu, tail, vocab)?;
            call.chunk(&mut cb, full * rc, &tail_passes, false)?;
        }
    } else {
        // The tail is the only chunk, and `first` holds it with its first pass's logits queued.
        call.chunk(&mut first, 0, &passes, true)?;
    }
    call.finish_bias_gradient()?;

    let mut p = call.params();
    p.targets = d_targets.ptr() as *const i32;
    p.row_loss = call.rows_out.loss.f32_ptr();
    p.row_argmax = call.rows_out.argmax.ptr_mut() as *mut i32;
    p.result = result.ptr_mut() as *mut i32;
    p.rows = rows as i64;
    p.counted = counted as i64;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (REDUCE_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: reads `rows` elements of targets, row loss and row argmax (each holds `rows`),
    // writes the 2 elements of result.
    unsafe { gpu.launch_dependent(MODULE, "cross_entropy_reduce", cfg, &p) }?;
    Ok(QueuedStats { result: Some(result), counted })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_rows_follow_the_memory_rule() {
        let s = CrossEntropyShape::new(18816, 768, 8192);
        assert_eq!(s.gpu_chunk_rows(), 3136, "6 equal chunks");
        assert!(s.gpu_extra_device_bytes(true) <= 64 << 20);
        // Equal chunks: one chunk's 52 MiB hold 3328 rows at V = 8192.
        assert_eq!(CrossEntropyShape::new(3328, 768, 8192).gpu_chunk_rows(), 3328);
        assert_eq!(CrossEntropyShape::new(3329, 768, 8192).gpu_chunk_rows(), 1665);
        assert_eq!(CrossEntropyShape::new(5, 8, 37).gpu_chunk_rows(), 5);
        assert_eq!(CrossEntropyShape::new(100, 8, 37).with_chunk_rows(7).gpu_chunk_rows(), 7);
        // An explicit chunk never exceeds the memory rule.
        assert_eq!(CrossEntropyShape::new(18816, 768, 8192).with_chunk_rows(1 << 20).gpu_chunk_rows(), 3328);
        for (rows, dim, vocab) in [
            (1 << 20, MAX_DIM, MAX_VOCAB),
            (1 << 20, 8, MAX_VOCAB),
            (1 << 20, MAX_DIM, 8),
            (1 << 20, 768, 8192),
            (3328, 768, 8192),
        ] {
            let s = CrossEntropyShape::new(rows, dim, vocab);
            assert!(s.gpu_extra_device_bytes(true) <= (63 << 20) + rows * 4 + 8, "{s:?}");
            // With paired rows (module docs): at most 63.5 MiB plus 4 bytes a row.
            let p = s.with_paired_rows(true);
            assert!(p.gpu_extra_device_bytes(true) <= (127 << 19) + rows * 4 + 8, "{p:?}");
        }
        // The held kernel's blocks: 256 a chunk at the model's shape, one a row for fewer rows.
        let (model, sms) = (CrossEntropyShape::new(18816, 768, 8192), 132);
        assert_eq!(model.colsum_groups(3136, sms), 256);
        assert_eq!(model.colsum_groups(100, sms), 100);
        // The column-sum kernel's groups (other vocabularies): 16 rows each, 64 at most.
        let other = CrossEntropyShape::new(18816, 768, 8191);
        assert_eq!((other.colsum_groups(3136, sms), other.colsum_groups(33, sms)), (64, 3));
        // Paired rows only where the held kernel runs.
        assert_eq!(other.with_paired_rows(true).gpu_chunk_rows(), other.gpu_chunk_rows());
        assert_eq!(other.with_paired_rows(true).colsum_groups(3136, sms), 64);
    }

    #[test]
    fn paired_rows_take_five_chunks_within_the_budget() {
        let s = CrossEntropyShape::new(18816, 768, 8192).with_paired_rows(true);
        assert_eq!(s.gpu_chunk_rows(), 3764, "5 equal chunks");
        // One group an SM on an H100/H200, a pair of rows each (a short pass has fewer), and
        // never more than PAIRED_GROUPS, whatever the device.
        assert_eq!(s.colsum_groups(3764, 132), 132);
        assert_eq!((s.colsum_groups(9, 132), s.colsum_groups(1, 132)), (5, 1));
        assert_eq!(s.colsum_groups(3764, 1000), PAIRED_GROUPS);
        assert_eq!(s.colsum_groups(3764, 114), 114);
        let (logits, colsums) = (3764 * 8192 * 2, PAIRED_GROUPS * 8192 * 4);
        assert_eq!(s.gpu_extra_device_bytes(true), logits + colsums + 18816 * 4 + 8);
        assert!(s.gpu_extra_device_bytes(true) <= 64 << 20, "{} bytes", s.gpu_extra_device_bytes(true));
        // The single-row kernel's scratch would not fit beside a 3764-row chunk.
        assert!(logits + GRAD_GROUPS * 8192 * 4 > 64 << 20);
        // Never fewer groups for more rows (the call sizes its scratch by its chunk).
        for sms in [1, 2, 108, 132, 200] {
            for rows in 1..400 {
                assert!(s.colsum_groups(rows, sms) <= s.colsum_groups(rows + 1, sms), "{rows} rows, {sms} SMs");
            }
        }
        // Within the budget for every shape the held kernel takes, up to the rows whose targets
        // fill the rest of the 64 MiB.
        for (rows, vocab) in [(120_000, 8192), (18816, 8), (1 << 16, 4096), (3764, 8192), (1, 8192)] {
            let p = CrossEntropyShape::new(rows, 768, vocab).with_paired_rows(true);
            assert!(p.gpu_extra_device_bytes(true) <= 64 << 20, "{p:?}");
        }
    }

    /// A two-way switch's parser: unset and `off` are false, `on` (spaces around it trimmed) true,
    /// and any other value an error naming the variable, the `on` value and what it was given.
    fn assert_switch_parses(parse: fn(Option<&str>) -> Result<bool>, var: &str, off: &str, on: &str, bad: &[&str]) {
        assert!(!parse(None).unwrap() && !parse(Some(off)).unwrap());
        assert!(parse(Some(&format!(" {on} "))).unwrap());
        for bad in bad {
            let e = parse(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(on) && e.contains(&format!("{bad:?}")), "{var}={bad:?}: {e}");
        }
    }

    #[test]
    fn row_blocks_and_order_variables_parse_or_name_themselves() {
        assert_switch_parses(paired_rows_named, ROW_BLOCKS_VAR, "single", "paired", &["", "pairs", "2", "Paired"]);
        assert_switch_parses(
            reverse_rows_named,
            ROW_ORDER_VAR,
            "forward",
            "reverse",
            &["", "backward", "1", "Reverse"],
        );
        let s = CrossEntropyShape::new(10, 8, 16);
        assert!(!s.paired_rows && s.with_paired_rows(true).paired_rows);
        assert_eq!(s.with_paired_rows(true).with_paired_rows(false), s);
        assert!(!s.reverse_rows && s.with_reversed_rows(true).reverse_rows);
        assert_eq!(s.with_reversed_rows(true).with_reversed_rows(false), s);
    }

    #[test]
    fn sub_chunk_variable_parses_or_names_itself() {
        assert_eq!(sub_chunk_rows_named(None).unwrap(), None);
        assert_eq!(sub_chunk_rows_named(Some(" 1046")).unwrap(), Some(1046));
        for bad in ["0", "-3", "a third", ""] {
            let e = sub_chunk_rows_named(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(SUB_CHUNK_VAR) && e.contains(&format!("{bad:?}")), "{e}");
        }
        let s = CrossEntropyShape::new(18816, 768, 8192);
        assert_eq!(s.or_sub_chunk_rows(Some(784)).sub_chunk_rows, Some(784));
        assert_eq!(s.with_sub_chunk_rows(1568).or_sub_chunk_rows(Some(784)).sub_chunk_rows, Some(1568));
        assert_eq!(s.or_sub_chunk_rows(None).sub_chunk_rows, None);
    }

    #[test]
    fn sub_chunks_cover_the_chunk_in_order() {
        let s = CrossEntropyShape::new(18816, 768, 8192);
        assert_eq!(s.gpu_sub_chunks(3136), vec![0..3136], "one pass by default");
        let three = s.with_sub_chunk_rows(1046).gpu_sub_chunks(3136);
        assert_eq!(three, vec![0..1046, 1046..2091, 2091..3136]);
        // Larger than the chunk: one pass; zero is taken as one row.
        assert_eq!(s.with_sub_chunk_rows(5000).gpu_sub_chunks(3136), vec![0..3136]);
        assert_eq!(s.with_sub_chunk_rows(0).gpu_sub_chunks(3), vec![0..1, 1..2, 2..3]);
        for (chunk, per) in [(1, 1), (7, 2), (517, 200), (3136, 784), (3136, 1000), (10, 3)] {
            let passes = s.with_sub_chunk_rows(per).gpu_sub_chunks(chunk);
            assert_eq!(passes.len(), chunk.div_ceil(per), "{chunk} / {per}: the fewest passes");
            let mut next = 0;
            for p in &passes {
                assert_eq!(p.start, next, "{chunk} / {per}: {passes:?} in order, no gap");
                assert!(!p.is_empty() && p.len() <= per, "{chunk} / {per}: {passes:?}");
                assert!(passes[0].len() - p.len() <= 1, "{chunk} / {per}: {passes:?} as equal as possible");
                next = p.end;
            }
            assert_eq!(next, chunk, "{chunk} / {per}: {passes:?} cover the chunk");
        }
    }

    #[test]
    fn targets_are_checked_naming_the_row() {
        assert_eq!(check_targets(&[0, -1, 36, -5], 37).unwrap(), 2);
        let err = check_targets(&[0, 3, 37], 37).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("37"), "{err}");
    }
}
