//! cuBLASLt GEMMs: row-major, bf16 inputs, f32 accumulation, with the fused epilogues a ViT
//! training step needs (bias, bias + GELU saving the pre-activation, GELU backward, bias
//! gradients).
//!
//! # Row-major over a column-major library
//!
//! The model thinks row-major: a Linear layer is `y[M, out] = x[M, in] W^T + b` with `W` stored
//! `[out, in]`. Every method here takes row-major operands:
//!
//! ```text
//! C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C     (then the epilogue)
//! A stored [m, k], or [k, m] with a_transposed (op(A) = A^T)
//! B stored [k, n], or [n, k] with b_transposed (op(B) = B^T)
//! C stored [m, n]
//! ```
//!
//! cuBLASLt is column-major. A row-major `[r, c]` matrix is, bit for bit, a column-major `[c, r]`
//! matrix, so a row-major `C = op(A) op(B)` is the column-major `C^T = op(B)^T op(A)^T`: the call
//! hands cuBLASLt our `B` as its `A` and our `A` as its `B`, with the transpose flags carried over
//! unchanged, and `D` is column-major `[n, m]` with leading dimension `n`. Two consequences for
//! the epilogues, both handled here and tested in `tests/gemm.rs`:
//!
//! - cuBLASLt's bias vector has one entry per *row* of its `D`, i.e. per row-major *column* `j`
//!   of `C`: exactly the Linear bias `b[out]`. The GELU auxiliary matrix has `D`'s layout, i.e.
//!   row-major `[m, n]` like `C`.
//! - cuBLASLt's `BGRADA` reduces its `A` (our `B`) over `k` and `BGRADB` reduces its `B` (our
//!   `A`). So [`Epilogue::BiasGradFromA`] (sums of op(A) over k, length m) is `BGRADB`, and
//!   [`Epilogue::BiasGradFromB`] (sums of op(B) over k, length n) is `BGRADA`.
//!
//! # Which model GEMM uses which epilogue (x: `[M, in]`, W: `[out, in]`, dY: `[M, out]`)
//!
//! | GEMM                         | call                                              | epilogue |
//! |------------------------------|---------------------------------------------------|----------|
//! | every Linear's forward (q, kv, proj, fc1, fc2) | `m=M, n=out, k=in`, A = x, B = W (`b_transposed`) | [`Epilogue::Bias`]; fc1's GELU is the model's own erf GELU kernel after it (SPEC.md) |
//! | dX of every Linear           | `m=M, n=in, k=out`, A = dY, B = W                  | [`Epilogue::None`] |
//! | dW (+ db) of q, k, v         | `m=out, n=in, k=M`, A = dY (`a_transposed`), B = x | [`Epilogue::BiasGradFromA`] (db = column sums of dY), f32 output via [`Gemm::matmul_f32_out`] |
//! | dW of proj, fc1, fc2         | same                                              | [`Epilogue::None`]: their bias gradients come from the layer-scale and GELU backward kernels |
//! | the decoder's logits, dx and dW (cross-entropy) | src/ops/cross_entropy.rs                 | [`Epilogue::None`] (the bias is added by the row kernel) |
//!
//! [`Epilogue::BiasGelu`], [`Epilogue::DGelu`] and [`Epilogue::DGeluBiasGrad`] compute cuBLASLt's
//! tanh GELU, not the erf GELU of SPEC.md, so the model does not use them; they are tested and
//! benchmarked (tests/gemm.rs, benches/gemm.rs) for a model that would.
//!
//! # Numerics
//!
//! Compute type `CUBLAS_COMPUTE_32F` (f32 accumulation; no TF32 or reduced-precision
//! reductions), scale type f32 (`alpha`, `beta` are f32 host scalars). Outputs are rounded once,
//! from f32, to the output type.
//!
//! The fused GELU of cuBLASLt is the **tanh approximation**
//! `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, and `DGelu*` is the derivative of that
//! approximation (confirmed on an H200: the outputs' mean signed error on pre-activations in
//! [-3, -1] is ~1e-6 against the tanh form and ~-8e-6 against the erf form). SPEC.md's MLP uses
//! the erf GELU; the two differ by at most about 4e-4 (below bf16 resolution for |x| > 0.1, but
//! not identical). A model that must match the erf form exactly uses [`Epilogue::Bias`] and its
//! own GELU kernel instead.
//!
//! # What cuBLASLt supports (checked on the host by [`check_matmul`])
//!
//! Measured with cuBLASLt from CUDA 13 on an H200 (`tests/gemm.rs` runs every combination):
//!
//! - **Vector types follow the output type.** The bias / bias-gradient vector is bf16 for
//!   [`Gemm::matmul`] and f32 for [`Gemm::matmul_f32_out`]. Asking cuBLASLt for an f32 vector
//!   with a bf16 output (`CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE`) fails for every epilogue
//!   (`INVALID_VALUE` or no algorithm), so that is refused before the call. [`Vector`] /
//!   [`VectorMut`] still take either type so that one [`Epilogue`] serves both outputs; a model
//!   with f32 master biases passes their bf16 copies to bf16-output GEMMs.
//! - **Bias gradients need the reduced operand stored `[k, ·]`.** [`Epilogue::BiasGradFromA`]
//!   (cuBLASLt `BGRADB`) works only with `a_transposed` (A stored `[k, m]`), and
//!   [`Epilogue::BiasGradFromB`] (`BGRADA`) only without `b_transposed` (B stored `[k, n]`). In
//!   both cases the bias gradient is the column sums of a row-major stored `[k, ·]` matrix, which
//!   is what a training step has: `db = column sums of dY[M, out]`. Other orientations have no
//!   kernel and are refused.
//! - The GELU epilogues need a bf16 output (the aux matrix is stored in the output type) and
//!   `beta = 0`; batched GEMMs take no epilogue.
//!
//! Bias gradients are **written**, never accumulated (even with `beta = 1`, which only
//! accumulates `C`). Gradient accumulation across calls is the caller's job.
//!
//! # Performance notes (H200, M = 62848 rows, `benches/gemm.rs`)
//!
//! Plain and bias GEMMs run at 580-750 TFLOP/s, bias + GELU + aux (at fc1's forward shape) at
//! about 530, [`Epilogue::DGelu`] (at fc2's dX shape) at about 520 (plain: 570), f32-output weight
//! gradients with the bias gradient at 445-670. All Linear GEMMs of one ViT-B block, forward and
//! backward, take about 4.5 ms. [`Epilogue::DGeluBiasGrad`] is slow (about 190 TFLOP/s, 1.6 ms
//! instead of 0.57 ms): a tanh-GELU model would rather use [`Epilogue::DGelu`] and take fc1's bias
//! gradient from fc1's weight-gradient GEMM with [`Epilogue::BiasGradFromA`] (its A operand is
//! the same dH), which costs nothing extra.
//!
//! # Alignment and leading dimensions
//!
//! Leading dimensions are the row lengths of the stored matrices (packed, no padding). Instead of
//! refusing unaligned shapes, the actual alignment of every pointer (up to 256 bytes) is passed to
//! the heuristic (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`), and cuBLASLt picks a kernel that
//! is valid for the leading dimensions it is given: row lengths that are multiples of 8 bf16
//! (16 bytes) get the fast tensor-core paths, others (e.g. `a_transposed` with an odd `m`) get
//! slower ones. What is refused: a GELU auxiliary matrix whose row length `n` is not a multiple of
//! 8 (cuBLASLt requires `EPILOGUE_AUX_LD % 8 == 0`), and bias / aux pointers not 16-byte aligned
//! (never the case for whole [`DeviceBuffer`]s, which are at least 256-byte aligned; a view is as
//! aligned as its offset makes it).
//!
//! # Algorithm cache
//!
//! Descriptors are created per call (host-only, microseconds). The heuristic query, the slow
//! part, runs once per (shape, transposes, types, epilogue, alignments) and its best algorithm is
//! cached in the [`Gemm`]. [`Gemm::time_candidates`] times the heuristic's other proposals for a
//! shape (`benches/gemm.rs` prints them), to see whether its first choice leaves time unused;
//! [`PIN_VAR`] (`MAPET_GEMM_PIN`) makes every GEMM of a given size run another of them, and
//! [`TUNE_VAR`] (`MAPET_GEMM_TUNE=1`) makes every new configuration time the first
//! [`TUNE_CANDIDATES`] proposals on its first call and keep the fastest (as cuDNN's benchmark mode
//! does): faster where the heuristic's first choice is not the best, at the price of a
//! synchronisation and a few extra GEMMs per configuration, and of bits that may differ from one
//! process to the next (the choice depends on timings). [`Gemm::tuning_report`] says what it chose.
//! An algorithm's [`AlgoConfig`] names it across cuBLASLt versions, where a rank does not: a pin
//! may give one (`MxNxK=@CONFIG`), and [`Gemm::algorithm_report`] lists those of the cached
//! algorithms ([`Gemm::config_pins`] as pins). [`DEFAULT_PINS`] holds pins by configuration
//! measured faster on a kind of device, which [`Gemm::new`] applies where the variable does not
//! pin a size, and which give way to the heuristic's first proposal where a cuBLASLt version no
//! longer proposes them.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::result::CublasError;
use cudarc::cublaslt::sys;
use cudarc::driver::{sys as sys_driver, CudaContext, CudaStream, DevicePtr};
use half::bf16;

use crate::cuda::{DeviceBuffer, DeviceRead, DeviceWrite, Gpu};
use crate::error::{Error, Result};

/// Size of the cuBLASLt workspace (NVIDIA's recommendation for Hopper; more than enough elsewhere).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// A bias vector, bf16 or f32 (see the module docs on types): a whole [`DeviceBuffer`] or a
/// view of one (`Vector::Bf16(&buffer)` and `Vector::Bf16(&view)` both work).
#[derive(Clone, Copy)]
pub enum Vector<'a> {
    Bf16(&'a dyn DeviceRead<bf16>),
    F32(&'a dyn DeviceRead<f32>),
}

/// A bias-gradient output vector, bf16 or f32: a whole [`DeviceBuffer`] or a view of one.
pub enum VectorMut<'a> {
    Bf16(&'a mut dyn DeviceWrite<bf16>),
    F32(&'a mut dyn DeviceWrite<f32>),
}

impl<'a> From<&'a DeviceBuffer<bf16>> for Vector<'a> {
    fn from(b: &'a DeviceBuffer<bf16>) -> Self {
        Vector::Bf16(b)
    }
}

impl<'a> From<&'a DeviceBuffer<f32>> for Vector<'a> {
    fn from(b: &'a DeviceBuffer<f32>) -> Self {
        Vector::F32(b)
    }
}

impl<'a> From<&'a mut DeviceBuffer<bf16>> for VectorMut<'a> {
    fn from(b: &'a mut DeviceBuffer<bf16>) -> Self {
        VectorMut::Bf16(b)
    }
}

impl<'a> From<&'a mut DeviceBuffer<f32>> for VectorMut<'a> {
    fn from(b: &'a mut DeviceBuffer<f32>) -> Self {
        VectorMut::F32(b)
    }
}

impl Vector<'_> {
    fn len(&self) -> usize {
        match self {
            Vector::Bf16(b) => b.len(),
            Vector::F32(b) => b.len(),
        }
    }
    fn ptr(&self) -> *const c_void {
        match self {
            Vector::Bf16(b) => b.ptr(),
            Vector::F32(b) => b.ptr(),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            Vector::Bf16(_) => DType::Bf16,
            Vector::F32(_) => DType::F32,
        }
    }
}

impl VectorMut<'_> {
    fn len(&self) -> usize {
        match self {
            VectorMut::Bf16(b) => b.len(),
            VectorMut::F32(b) => b.len(),
        }
    }
    fn ptr_mut(&mut self) -> *mut c_void {
        match self {
            VectorMut::Bf16(b) => b.ptr_mut(),
            VectorMut::F32(b) => b.ptr_mut(),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            VectorMut::Bf16(_) => DType::Bf16,
            VectorMut::F32(_) => DType::F32,
        }
    }
}

/// Element type of an output or a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            DType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        }
    }
}

/// What runs after the product, in row-major terms. `acc = alpha * op(A) op(B) + beta * C` is
/// the f32 value before rounding; `gelu` is the tanh approximation (module docs).
pub enum Epilogue<'a> {
    /// `C = acc`. cuBLASLt `DEFAULT`. Used by: dX of every Linear, dW of proj, fc1 and fc2, the
    /// cross-entropy's GEMMs.
    None,
    /// `C[i, j] = acc[i, j] + bias[j]`, `bias` of length n. cuBLASLt `BIAS`. Used by: the forward
    /// of every Linear.
    Bias { bias: Vector<'a> },
    /// `aux[i, j] = acc[i, j] + bias[j]` (the pre-activation, saved for backward, rounded to
    /// bf16) and `C = gelu(aux)` computed from the f32 value. `aux` is `[m, n]` like `C`; n must
    /// be a multiple of 8. `beta` must be 0. cuBLASLt `GELU_AUX_BIAS`. (The tanh GELU: not the
    /// model's, module docs.)
    BiasGelu { bias: Vector<'a>, aux: &'a mut DeviceBuffer<bf16> },
    /// `C = acc * gelu'(aux)`, with `aux` the pre-activation saved by [`Epilogue::BiasGelu`].
    /// n must be a multiple of 8; `beta` must be 0. cuBLASLt `DGELU`. For fc2's dX in a model with
    /// the tanh GELU: the gradient of fc1's pre-activation (`dH = dY W2`, then times gelu'(pre)).
    DGelu { aux: &'a DeviceBuffer<bf16> },
    /// As [`Epilogue::DGelu`], and also `bias_grad[j] = sum_i C[i, j]` (from the f32 values,
    /// length n): fc1's bias gradient for free. Written, not accumulated. cuBLASLt `DGELU_BGRAD`.
    DGeluBiasGrad { aux: &'a DeviceBuffer<bf16>, bias_grad: VectorMut<'a> },
    /// `C = acc` and `bias_grad[i] = sum_k op(A)[i, k]` (length m). Needs `a_transposed` (A
    /// stored `[k, m]`, so this is the column sums of the stored A). For the weight gradient
    /// `dW[out, in] = dY^T x` (A = dY stored `[M, out]`, `a_transposed`) this is `db[out] = sum
    /// over rows of dY`, the Linear's bias gradient. Written, not accumulated (also with
    /// `beta = 1`). cuBLASLt `BGRADB` (operands are swapped; module docs).
    BiasGradFromA { bias_grad: VectorMut<'a> },
    /// `C = acc` and `bias_grad[j] = sum_k op(B)[k, j]` (length n). Needs B stored `[k, n]`
    /// (not `b_transposed`), so this is the column sums of the stored B: the same bias gradient
    /// when the weight gradient is computed transposed, `dW^T[in, out] = x^T dY` (B = dY).
    /// Written, not accumulated. cuBLASLt `BGRADA`.
    BiasGradFromB { bias_grad: VectorMut<'a> },
}

/// The shape of an [`Epilogue`] without its buffers: what the host checks and the algorithm
/// cache key need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EpilogueKind {
    None,
    Bias,
    BiasGelu,
    DGelu,
    DGeluBiasGrad,
    BiasGradFromA,
    BiasGradFromB,
}

impl EpilogueKind {
    /// The cuBLASLt epilogue under the row-major operand swap.
    fn cublas(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t::*;
        match self {
            EpilogueKind::None => CUBLASLT_EPILOGUE_DEFAULT,
            EpilogueKind::Bias => CUBLASLT_EPILOGUE_BIAS,
            EpilogueKind::BiasGelu => CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            EpilogueKind::DGelu => CUBLASLT_EPILOGUE_DGELU,
            EpilogueKind::DGeluBiasGrad => CUBLASLT_EPILOGUE_DGELU_BGRAD,
            // Our A is cuBLASLt's B and the other way round.
            EpilogueKind::BiasGradFromA => CUBLASLT_EPILOGUE_BGRADB,
            EpilogueKind::BiasGradFromB => CUBLASLT_EPILOGUE_BGRADA,
        }
    }

    fn has_aux(self) -> bool {
        matches!(self, EpilogueKind::BiasGelu | EpilogueKind::DGelu | EpilogueKind::DGeluBiasGrad)
    }

    /// Name and expected length of the vector, if the epilogue has one.
    fn vector(self, m: usize, n: usize) -> Option<(&'static str, usize)> {
        match self {
            EpilogueKind::None | EpilogueKind::DGelu => None,
            EpilogueKind::Bias | EpilogueKind::BiasGelu => Some(("bias", n)),
            EpilogueKind::DGeluBiasGrad | EpilogueKind::BiasGradFromB => Some(("bias_grad", n)),
            EpilogueKind::BiasGradFromA => Some(("bias_grad", m)),
        }
    }
}

impl Epilogue<'_> {
    /// The kind of this epilogue.
    pub fn kind(&self) -> EpilogueKind {
        match self {
            Epilogue::None => EpilogueKind::None,
            Epilogue::Bias { .. } => EpilogueKind::Bias,
            Epilogue::BiasGelu { .. } => EpilogueKind::BiasGelu,
            Epilogue::DGelu { .. } => EpilogueKind::DGelu,
            Epilogue::DGeluBiasGrad { .. } => EpilogueKind::DGeluBiasGrad,
            Epilogue::BiasGradFromA { .. } => EpilogueKind::BiasGradFromA,
            Epilogue::BiasGradFromB { .. } => EpilogueKind::BiasGradFromB,
        }
    }

    fn vector_info(&self) -> Option<(usize, DType)> {
        match self {
            Epilogue::None | Epilogue::DGelu { .. } => None,
            Epilogue::Bias { bias } | Epilogue::BiasGelu { bias, .. } => Some((bias.len(), bias.dtype())),
            Epilogue::DGeluBiasGrad { bias_grad, .. }
            | Epilogue::BiasGradFromA { bias_grad }
            | Epilogue::BiasGradFromB { bias_grad } => Some((bias_grad.len(), bias_grad.dtype())),
        }
    }

    fn aux_len(&self) -> Option<usize> {
        match self {
            Epilogue::BiasGelu { aux, .. } => Some(aux.len()),
            Epilogue::DGelu { aux } | Epilogue::DGeluBiasGrad { aux, .. } => Some(aux.len()),
            _ => None,
        }
    }

    /// (vector pointer, its type), aux pointer.
    fn pointers(&mut self) -> (Option<(*const c_void, DType)>, Option<*const c_void>) {
        match self {
            Epilogue::None => (None, None),
            Epilogue::Bias { bias } => (Some((bias.ptr(), bias.dtype())), None),
            Epilogue::BiasGelu { bias, aux } => {
                (Some((bias.ptr(), bias.dtype())), Some(aux.ptr_mut() as *const c_void))
            }
            Epilogue::DGelu { aux } => (None, Some(aux.ptr())),
            Epilogue::DGeluBiasGrad { aux, bias_grad } => {
                let t = bias_grad.dtype();
                (Some((bias_grad.ptr_mut() as *const c_void, t)), Some(aux.ptr()))
            }
            Epilogue::BiasGradFromA { bias_grad } | Epilogue::BiasGradFromB { bias_grad } => {
                let t = bias_grad.dtype();
                (Some((bias_grad.ptr_mut() as *const c_void, t)), None)
            }
        }
    }
}

/// One GEMM call without its buffers: what the host checks (and the algorithm choice) depend on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Number of matrices (1 except for [`Gemm::matmul_strided_batched`]).
    pub batch: usize,
    pub a_transposed: bool,
    pub b_transposed: bool,
    pub beta: f32,
    pub output: DType,
    pub epilogue: EpilogueKind,
}

/// Buffer lengths (in elements) of one GEMM call, for [`check_matmul`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OperandLens {
    pub a: usize,
    pub b: usize,
    pub c: usize,
    /// Length and type of the bias or bias-gradient vector, when the epilogue has one.
    pub vector: Option<(usize, DType)>,
    /// Length of the GELU auxiliary matrix, when the epilogue has one.
    pub aux: Option<usize>,
}

fn shape_err(tensor: &'static str, expected: String, got: String) -> Error {
    Error::Shape { tensor, expected, got }
}

fn unsupported(what: &'static str, detail: String) -> Error {
    Error::Unsupported { what, detail }
}

/// The host checks of every GEMM, as a pure function (no device needed): buffer sizes against
/// `m, n, k, batch` (exact element counts), the epilogue's vector and aux, and the combinations
/// cuBLASLt has kernels for (module docs, "What cuBLASLt supports"). Runs before anything touches
/// the device.
pub fn check_matmul(d: &GemmDesc, lens: &OperandLens) -> Result<()> {
    let GemmDesc { m, n, k, batch, a_transposed, b_transposed, beta, output, epilogue } = *d;
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return Err(unsupported(
            "GEMM size",
            format!("m={m}, n={n}, k={k}, batch={batch}: every dimension must be at least 1"),
        ));
    }
    let too_big =
        || unsupported("GEMM size", format!("m={m}, n={n}, k={k}, batch={batch} overflows the element count"));
    let count = |x: usize, y: usize| x.checked_mul(y).and_then(|v| v.checked_mul(batch)).ok_or_else(too_big);
    let (na, nb, nc) = (count(m, k)?, count(k, n)?, count(m, n)?);
    // cuBLASLt takes leading dimensions and batch strides as int64 and batch counts as int32.
    if nc.max(na).max(nb) > i64::MAX as usize / 4 || batch > i32::MAX as usize {
        return Err(too_big());
    }
    for (tensor, want, got) in [("a", na, lens.a), ("b", nb, lens.b), ("c", nc, lens.c)] {
        if got != want {
            let what =
                if batch == 1 { format!("{want} elements") } else { format!("{want} elements ({batch} matrices)") };
            return Err(shape_err(tensor, what, format!("{got} elements")));
        }
    }
    if batch > 1 && epilogue != EpilogueKind::None {
        return Err(unsupported("batched GEMM epilogue", format!("{epilogue:?}: batched GEMMs take no epilogue")));
    }
    if output == DType::F32 && epilogue.has_aux() {
        return Err(unsupported(
            "f32-output GEMM epilogue",
            format!("{epilogue:?}: cuBLASLt stores the GELU aux in the output type; GELU epilogues need a bf16 output"),
        ));
    }
    if epilogue.has_aux() && beta != 0.0 {
        return Err(unsupported("GEMM beta", format!("{epilogue:?} needs beta = 0 (got {beta})")));
    }
    if epilogue == EpilogueKind::BiasGradFromA && !a_transposed {
        return Err(unsupported(
            "bias-gradient orientation",
            "BiasGradFromA needs a_transposed (A stored [k, m]; the gradient is the column sums of that stored \
             matrix): cuBLASLt has no BGRADB kernel otherwise"
                .into(),
        ));
    }
    if epilogue == EpilogueKind::BiasGradFromB && b_transposed {
        return Err(unsupported(
            "bias-gradient orientation",
            "BiasGradFromB needs B stored [k, n] (not b_transposed): cuBLASLt has no BGRADA kernel otherwise".into(),
        ));
    }
    match (epilogue.vector(m, n), lens.vector) {
        (Some((tensor, want)), Some((got, dtype))) => {
            if got != want {
                return Err(shape_err(tensor, format!("{want} elements"), format!("{got} elements")));
            }
            if dtype != output {
                return Err(unsupported(
                    "GEMM vector type",
                    format!("`{tensor}` is {dtype:?} but the output is {output:?}: cuBLASLt takes vectors of the output type"),
                ));
            }
        }
        (Some((tensor, want)), None) => return Err(shape_err(tensor, format!("{want} elements"), "no vector".into())),
        (None, Some((got, _))) => return Err(shape_err("bias", "no vector".into(), format!("{got} elements"))),
        (None, None) => {}
    }
    match (epilogue.has_aux(), lens.aux) {
        (true, Some(got)) => {
            if got != nc {
                return Err(shape_err("aux", format!("{nc} elements ([{m}, {n}])"), format!("{got} elements")));
            }
            // cuBLASLt requires EPILOGUE_AUX_LD (= n) to be a multiple of 8.
            if n & 7 != 0 {
                return Err(Error::Alignment {
                    tensor: "aux",
                    detail: format!("its row length n = {n} must be a multiple of 8 (cuBLASLt EPILOGUE_AUX_LD)"),
                });
            }
        }
        (true, None) => return Err(shape_err("aux", format!("{nc} elements"), "no aux".into())),
        (false, Some(got)) => return Err(shape_err("aux", "no aux".into(), format!("{got} elements"))),
        (false, None) => {}
    }
    Ok(())
}

/// Largest power of two dividing the address, capped at 256 bytes.
fn alignment_of(p: *const c_void) -> u32 {
    let a = p as usize;
    if a == 0 {
        256
    } else {
        (1u32 << a.trailing_zeros().min(8)).min(256)
    }
}

/// Everything the best algorithm depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a_transposed: bool,
    b_transposed: bool,
    output: DType,
    epilogue: EpilogueKind,
    vector: Option<DType>,
    /// Alignment in bytes of cuBLASLt's A (our b), B (our a), C = D.
    align: [u32; 3],
}

/// The device pointers of one call.
struct Pointers {
    a: *const c_void,
    b: *const c_void,
    c: *mut c_void,
    vector: Option<(*const c_void, DType)>,
    aux: Option<*const c_void>,
}

/// The descriptors of one call (owned by the caller's guards).
struct Descs {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
}

/// A cuBLASLt handle, its workspace and a cache of algorithms, bound to one [`Gpu`]'s stream.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer<u8>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    algos: Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>,
    /// Which of the heuristic's candidates a GEMM runs: [`DEFAULT_ALGO`] (outside
    /// [`Gemm::time_candidates`]) its first, cached per shape; `r` the r-th, looked up at every
    /// call. An atomic, not a lock, since every GEMM reads it.
    candidate: AtomicUsize,
    /// GEMM sizes pinned to another of the heuristic's candidates ([`PIN_VAR`]).
    pins: Vec<Pin>,
    /// Pins by configuration from [`DEFAULT_PINS`] for sizes `pins` leaves alone: where the
    /// heuristic proposes no algorithm of that configuration, the size runs its first instead.
    default_pins: Vec<Pin>,
    /// The configuration of the candidate a call inside [`Gemm::time_candidates`] ran last.
    last_candidate: Mutex<Option<AlgoConfig>>,
    /// Whether a configuration's first call times the heuristic's candidates ([`TUNE_VAR`]).
    tune: bool,
    /// What tuning chose, a line per configuration ([`Gemm::tuning_report`]).
    tuned: Mutex<Vec<String>>,
}

/// The environment variable that pins GEMM sizes to one of the heuristic's candidates, read when
/// a [`Gemm`] is made: `MxNxK=R` or `MxNxK=@CONFIG`, comma-separated, with m, n, k as
/// [`Gemm::matmul`] takes them. Every GEMM of that size (whatever its transposes, types or
/// epilogue) then runs the R-th algorithm the heuristic proposes for it, as
/// [`Gemm::time_candidates`] numbers them (0 is the default), or the one it proposes with the
/// configuration [`AlgoConfig`] CONFIG (as `Gemm::time_candidates` and [`Gemm::algorithm_report`]
/// print them), whatever its rank among the first [`MAX_CANDIDATES`]. For trying a candidate
/// that `benches/gemm.rs` or `benches/cross_entropy.rs` found faster, without a rebuild. A rank
/// names a different algorithm from one cuBLASLt version (or card) to the next; a configuration
/// names the same kernel configuration in every version that still proposes it, and a call whose
/// heuristic does not fails, naming the variable. Sizes the variable does not pin take
/// [`DEFAULT_PINS`]' pins for the device; `none` turns those off too.
pub const PIN_VAR: &str = "MAPET_GEMM_PIN";

/// Pins by configuration measured faster than the heuristic's first proposal on one kind of
/// device, which [`Gemm::new`] applies to the sizes [`PIN_VAR`] leaves alone. As the variable's, a
/// pin holds for every GEMM of its size (m, n, k), whatever its transposes, types or epilogue:
/// the sizes measured are the cross-entropy's, which no other GEMM of the model has.
#[derive(Clone, Copy, Debug)]
pub struct DefaultPins {
    /// The devices they are for: compute capability and SM count (the algorithms' waves depend on
    /// both), e.g. (9, 0) and 132 for an H100 or H200 SXM.
    pub compute_capability: (u32, u32),
    pub sm_count: u32,
    /// Where they were measured: card, cuBLASLt version, date and bench (and, for pins of the
    /// paired rows' chunk sizes, that they apply with `MAPET_CE_ROW_BLOCKS=paired`).
    pub source: &'static str,
    /// The pins, as [`PIN_VAR`] takes them, by configuration only (`MxNxK=@CONFIG`): a rank names
    /// another algorithm in another cuBLASLt version.
    pub pins: &'static str,
}

/// The default pin table ([`DefaultPins`]). A pin here is a hint, not a demand: a size whose
/// heuristic proposes no algorithm of the pinned configuration among its first
/// [`MAX_CANDIDATES`] (another cuBLASLt version) runs the heuristic's first, as with no pin.
/// Filled from a card's `RESULT cross_entropy chosen GEMMs by configuration` line
/// (`benches/cross_entropy.rs`: the configurations of the pins the whole call ran fastest with),
/// once the same run has shown that pin to win; none has been measured yet, so it is empty.
pub const DEFAULT_PINS: &[DefaultPins] = &[];

/// The pins of `table`'s entries for a device of compute capability `cc` with `sm_count` SMs, in
/// the table's order; an error naming the entry if one does not parse or pins by rank.
pub fn default_pins_for(table: &[DefaultPins], cc: (u32, u32), sm_count: u32) -> Result<Vec<Pin>> {
    let mut pins = Vec::new();
    for entry in table.iter().filter(|e| e.compute_capability == cc && e.sm_count == sm_count) {
        let bad = |detail: String| Error::Unsupported {
            what: "GEMM pin",
            detail: format!("the default pins measured on {}: {detail}", entry.source),
        };
        for pin in parse_pins(entry.pins).map_err(|e| bad(e.to_string()))? {
            match pin.1 {
                PinChoice::Config(_) => pins.push(pin),
                PinChoice::Rank(_) => return Err(bad(format!("{} pins by rank", pin_text(&[pin])))),
            }
        }
    }
    Ok(pins)
}

/// The environment variable that turns tuning on (`1`) or off (`0`, the default), read when a
/// [`Gemm`] is made: with it on, the first call of each configuration (shape, transposes, types,
/// epilogue, alignments) not pinned by [`PIN_VAR`] times the heuristic's first
/// [`TUNE_CANDIDATES`] proposals and keeps the fastest for the `Gemm`'s life (default pins,
/// [`DEFAULT_PINS`], give way to it).
pub const TUNE_VAR: &str = "MAPET_GEMM_TUNE";

/// Proposals timed per configuration under [`TUNE_VAR`].
pub const TUNE_CANDIDATES: usize = 8;

/// Timed runs per candidate under [`TUNE_VAR`], after one warm-up run.
const TUNE_REPS: usize = 3;

/// Whether [`TUNE_VAR`]'s value asks for tuning; an error naming the variable otherwise.
pub fn parse_tune(text: &str) -> Result<bool> {
    match text.trim() {
        "" | "0" => Ok(false),
        "1" => Ok(true),
        other => {
            Err(Error::Unsupported { what: "GEMM tuning", detail: format!("{TUNE_VAR}: {other:?} is not 0 or 1") })
        }
    }
}

/// One of the heuristic's candidates for a GEMM, as [`Gemm::time_candidates`] timed it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Its rank in the heuristic's order (0 is what an unpinned call runs).
    pub rank: usize,
    /// The median of its timed runs, in ms.
    pub ms: f32,
    /// Its configuration, where cuBLASLt reported it.
    pub config: Option<AlgoConfig>,
}

impl std::fmt::Display for Candidate {
    /// `#R T` (ms, 3 decimals) and the configuration, as the benches print a candidate.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{} {:.3}", self.rank, self.ms)?;
        match self.config {
            Some(c) => write!(f, " (@{c})"),
            None => Ok(()),
        }
    }
}

/// What a GEMM size pinned by [`PIN_VAR`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinChoice {
    /// The heuristic's r-th usable proposal (`MxNxK=R`; 0 is the default).
    Rank(usize),
    /// The usable proposal with this configuration, whatever its rank among the heuristic's first
    /// [`MAX_CANDIDATES`] (`MxNxK=@CONFIG`).
    Config(AlgoConfig),
}

impl std::fmt::Display for PinChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinChoice::Rank(r) => write!(f, "{r}"),
            PinChoice::Config(c) => write!(f, "@{c}"),
        }
    }
}

/// A GEMM size (m, n, k) and the candidate it runs ([`PIN_VAR`]).
pub type Pin = ((usize, usize, usize), PinChoice);

/// Pins as [`PIN_VAR`] takes them (what [`parse_pins`] reads back).
pub fn pin_text(pins: &[Pin]) -> String {
    pins.iter().map(|((m, n, k), choice)| format!("{m}x{n}x{k}={choice}")).collect::<Vec<_>>().join(",")
}

/// The pins of [`PIN_VAR`]'s value; an error naming the variable and the bad entry otherwise.
pub fn parse_pins(text: &str) -> Result<Vec<Pin>> {
    let bad = |entry: &str| Error::Unsupported {
        what: "GEMM pin",
        detail: format!(
            "{PIN_VAR}: {entry:?} is not MxNxK=R (a rank below {MAX_CANDIDATES}, e.g. 3136x768x8192=2) or \
             MxNxK=@CONFIG (e.g. 3136x768x8192=@{}), comma-separated; or `none` for no pins at all",
            AlgoConfig::EXAMPLE
        ),
    };
    let mut pins = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (size, choice) = entry.split_once('=').ok_or_else(|| bad(entry))?;
        let dims: Vec<usize> =
            size.split('x').map(|d| d.trim().parse()).collect::<std::result::Result<_, _>>().map_err(|_| bad(entry))?;
        let choice = match choice.trim().strip_prefix('@') {
            Some(config) => PinChoice::Config(config.parse().map_err(|_| bad(entry))?),
            None => match choice.trim().parse() {
                Ok(rank) if rank < MAX_CANDIDATES => PinChoice::Rank(rank),
                _ => return Err(bad(entry)),
            },
        };
        match dims[..] {
            [m, n, k] => pins.push(((m, n, k), choice)),
            _ => return Err(bad(entry)),
        }
    }
    Ok(pins)
}

/// The configuration of a cuBLASLt matmul algorithm: the values of its nine
/// `cublasLtMatmulAlgoConfigAttributes_t` attributes, in the enum's order (algorithm id, tile,
/// split-k, reduction scheme, CTA swizzling, custom option, stages, inner shape, cluster shape;
/// tile, stages, inner and cluster shape as the numbers of cuBLASLt's `cublasLtMatmulTile_t`,
/// `cublasLtMatmulStages_t`, `cublasLtMatmulInnerShape_t` and `cublasLtClusterShape_t`). Written
/// and parsed as `a66.t21.k1.r0.w0.c0.s17.i0.l3`, a letter before each value, in that order.
/// The configuration is what cuBLASLt lets a caller set to build an algorithm, so it names one
/// kernel configuration in any version that has it, where a proposal's rank in the heuristic's
/// list names whatever that version puts there. (That no two of one call's proposals share a
/// configuration is checked on a card: `tests/gemm.rs`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AlgoConfig(pub [i64; 9]);

impl AlgoConfig {
    /// The letters before each value in the written form, in the attributes' order.
    const LETTERS: [char; 9] = ['a', 't', 'k', 'r', 'w', 'c', 's', 'i', 'l'];
    /// A configuration as written, for error messages.
    pub const EXAMPLE: &'static str = "a66.t21.k1.r0.w0.c0.s17.i0.l3";

    /// The configuration of `algo`, read attribute by attribute (each at the size cuBLASLt
    /// takes for it, up to 8 bytes, little-endian, the signed algorithm id sign-extended).
    fn of(algo: &sys::cublasLtMatmulAlgo_t) -> Result<Self> {
        use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
        let attrs = [
            A::CUBLASLT_ALGO_CONFIG_ID,
            A::CUBLASLT_ALGO_CONFIG_TILE_ID,
            A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
            A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
            A::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING,
            A::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION,
            A::CUBLASLT_ALGO_CONFIG_STAGES_ID,
            A::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID,
            A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID,
        ];
        let mut values = [0i64; 9];
        for (value, attr) in values.iter_mut().zip(attrs) {
            // Reads the attribute at `size` bytes; cuBLASLt refuses any size but its own.
            let read = |size: usize| {
                let mut bytes = [0u8; 8];
                let mut written = 0usize;
                // SAFETY: `algo` is a live algorithm structure and `bytes` has room for the
                // `size` (<= 8) bytes asked for.
                let status = unsafe {
                    sys::cublasLtMatmulAlgoConfigGetAttribute(
                        algo,
                        attr,
                        bytes.as_mut_ptr() as *mut c_void,
                        size,
                        &mut written,
                    )
                };
                (status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some((bytes, written.clamp(1, size)))
            };
            // The size cuBLASLt reports for it (asked with no buffer), then the sizes its
            // documented attribute types have, in case the query is refused.
            let mut size = 0usize;
            // SAFETY: with a zero size and no buffer the call writes at most the attribute's size
            // into `size`.
            let queried =
                unsafe { sys::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, std::ptr::null_mut(), 0, &mut size) }
                    == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && (1..=8).contains(&size);
            let (bytes, width) = queried
                .then_some(size)
                .into_iter()
                .chain([4, 2, 8, 1])
                .find_map(read)
                .ok_or_else(|| unsupported("cuBLASLt algorithm", format!("{attr:?} could not be read")))?;
            // The algorithm id is cuBLASLt's one signed attribute (int32_t).
            *value = widen(&bytes[..width], attr == A::CUBLASLT_ALGO_CONFIG_ID);
        }
        Ok(AlgoConfig(values))
    }
}

/// A little-endian integer of 1 to 8 bytes, sign-extended when `signed`.
fn widen(bytes: &[u8], signed: bool) -> i64 {
    let mut full = [0u8; 8];
    full[..bytes.len()].copy_from_slice(bytes);
    let raw = i64::from_le_bytes(full);
    let unused = 64 - 8 * bytes.len() as u32;
    if signed && unused > 0 {
        (raw << unused) >> unused
    } else {
        raw
    }
}

impl std::fmt::Display for AlgoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (letter, value)) in Self::LETTERS.iter().zip(self.0).enumerate() {
            write!(f, "{}{letter}{value}", if i > 0 { "." } else { "" })?;
        }
        Ok(())
    }
}

impl std::str::FromStr for AlgoConfig {
    type Err = ();

    /// The written form of [`AlgoConfig`]'s docs: nine values, each after its letter, in order.
    fn from_str(text: &str) -> std::result::Result<Self, ()> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        if parts.len() != Self::LETTERS.len() {
            return Err(());
        }
        let mut values = [0i64; 9];
        for ((value, part), letter) in values.iter_mut().zip(parts).zip(Self::LETTERS) {
            *value = part.strip_prefix(letter).ok_or(())?.parse().map_err(|_| ())?;
        }
        Ok(AlgoConfig(values))
    }
}

/// [`Gemm`]'s `candidate` outside [`Gemm::time_candidates`]: the heuristic's first, cached.
const DEFAULT_ALGO: usize = usize::MAX;

/// The `what` of the error a GEMM returns inside [`Gemm::time_candidates`] once the ranks run out.
const NO_CANDIDATE: &str = "cuBLASLt candidate";

/// Candidates asked of cuBLASLt's heuristic by [`Gemm::time_candidates`].
pub const MAX_CANDIDATES: usize = 16;

// SAFETY: the cuBLASLt handle may be used from several host threads (cuBLAS's thread-safety
// rules); the algorithm cache is behind a mutex; all work, workspace use included, is ordered on
// the one stream of the Gpu, so two threads enqueuing GEMMs never use the workspace concurrently.
unsafe impl Send for Gemm {}
// SAFETY: as above.
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once, here. Errors are ignored:
        // there is nothing to do about them in a destructor.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm").field("cached_algorithms", &self.cached_algorithms()).finish()
    }
}

/// Owns a cuBLASLt descriptor and destroys it on drop.
struct Guard<T: Copy> {
    raw: T,
    destroy: unsafe fn(T) -> std::result::Result<(), CublasError>,
}

impl<T: Copy> Drop for Guard<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by the matching create function and is destroyed only here.
        let _ = unsafe { (self.destroy)(self.raw) };
    }
}

fn cublas_err(source: CublasError, context: &str) -> Error {
    Error::Cublas { context: format!(" {context}"), source }
}

fn layout(
    dtype: DType,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
) -> Result<Guard<sys::cublasLtMatrixLayout_t>> {
    let raw = lt::create_matrix_layout(dtype.cuda(), rows as u64, cols as u64, ld as i64)
        .map_err(|e| cublas_err(e, "creating a matrix layout"))?;
    let g = Guard { raw, destroy: lt::destroy_matrix_layout };
    if batch > 1 {
        let count = batch as i32;
        let stride = (rows * cols) as i64;
        // SAFETY: valid layout; each attribute gets a value of the type cuBLASLt documents
        // (int32 batch count, int64 stride in elements).
        unsafe {
            lt::set_matrix_layout_attribute(
                g.raw,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .and_then(|_| {
                lt::set_matrix_layout_attribute(
                    g.raw,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride as *const i64 as *const c_void,
                    std::mem::size_of::<i64>(),
                )
            })
        }
        .map_err(|e| cublas_err(e, "setting a batch layout"))?;
    }
    Ok(g)
}

/// Sets one matmul-descriptor attribute from a plain value.
///
/// # Safety
/// `desc` must be a live descriptor and `T` the type cuBLASLt documents for `attr`.
unsafe fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }
        .map_err(|e| cublas_err(e, &format!("setting {attr:?}")))
}

/// Sets one preference attribute from a plain value.
///
/// # Safety
/// `pref` must be live and `T` the documented type of `attr`.
unsafe fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { lt::set_matmul_pref_attribute(pref, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }
        .map_err(|e| cublas_err(e, &format!("setting {attr:?}")))
}

impl Gemm {
    /// Creates a cuBLASLt handle and a [`WORKSPACE_BYTES`] workspace on `gpu`'s stream, with the
    /// pins [`PIN_VAR`] names and, for the sizes it does not pin, [`DEFAULT_PINS`]' for `gpu`
    /// (none where the variable is `none`, which sets no pins either). Fails with
    /// [`Error::Unsupported`] when libcublasLt cannot be loaded, the variable does not parse, or
    /// the table's entry for `gpu` does not ([`default_pins_for`]).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let tune = parse_tune(&std::env::var(TUNE_VAR).unwrap_or_default())?;
        let var = std::env::var(PIN_VAR).unwrap_or_default();
        let (pins, defaults) = if var.trim() == "none" {
            (Vec::new(), Vec::new())
        } else {
            (parse_pins(&var)?, default_pins_for(DEFAULT_PINS, gpu.compute_capability(), gpu.sm_count())?)
        };
        Ok(Self::with_pins(gpu, pins)?.with_default_pins(defaults).with_tuning(tune))
    }

    /// This `Gemm` with `pins` as its default pins ([`DEFAULT_PINS`]) in place of the table's:
    /// pins by configuration for the sizes its own pins leave alone, which fall back to the
    /// heuristic's first proposal where it proposes no algorithm of that configuration. A pin by
    /// rank among them is ignored (the table refuses them: [`default_pins_for`]).
    pub fn with_default_pins(mut self, pins: Vec<Pin>) -> Self {
        self.default_pins = pins;
        self
    }

    /// The default pins ([`Gemm::with_default_pins`]) of this `Gemm`.
    pub fn default_pins(&self) -> &[Pin] {
        &self.default_pins
    }

    /// This `Gemm` with tuning ([`TUNE_VAR`]) on or off, in place of the variable's choice.
    pub fn with_tuning(mut self, on: bool) -> Self {
        self.tune = on;
        self
    }

    /// Whether tuning ([`TUNE_VAR`]) is on.
    pub fn tuning(&self) -> bool {
        self.tune
    }

    /// The GEMM sizes pinned to another candidate ([`PIN_VAR`]).
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    /// What tuning chose so far: for each configuration tuned, the candidates' times and the rank
    /// kept (empty when tuning is off).
    pub fn tuning_report(&self) -> Vec<String> {
        self.tuned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The version of the libcublasLt this `Gemm` calls, as `cublasLtGetVersion` reports it. The
    /// heuristic's candidates, and so what a pin ([`PIN_VAR`]) selects, depend on it: benches
    /// print it beside the pins they choose.
    pub fn library_version(&self) -> usize {
        // SAFETY: the library is loaded (this Gemm holds a handle made from it); the call takes
        // no arguments and only returns a number.
        unsafe { sys::cublasLtGetVersion() }
    }

    /// [`Gemm::new`] with the given pins in place of [`PIN_VAR`]'s, no default pins and tuning
    /// off.
    pub fn with_pins(gpu: &Gpu, pins: Vec<Pin>) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublasLt; no cuBLASLt call is made.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Unsupported {
                what: "cuBLASLt",
                detail: "libcublasLt (the CUDA 13 cuBLASLt library) could not be loaded; add it to the library path"
                    .into(),
            });
        }
        gpu.context().bind_to_thread()?;
        let handle = lt::create_handle().map_err(|e| cublas_err(e, "creating the cuBLASLt handle"))?;
        let workspace = match gpu.alloc::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above, not used anywhere else.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(Gemm {
            handle,
            workspace,
            stream: gpu.stream().clone(),
            ctx: gpu.context().clone(),
            algos: Mutex::new(HashMap::new()),
            candidate: AtomicUsize::new(DEFAULT_ALGO),
            pins,
            default_pins: Vec::new(),
            last_candidate: Mutex::new(None),
            tune: false,
            tuned: Mutex::new(Vec::new()),
        })
    }

    /// Times `run` (which must enqueue GEMMs of one shape on this `Gemm`) with each of the first
    /// `max` (at most [`MAX_CANDIDATES`]) algorithms cuBLASLt's heuristic proposes for it, in the
    /// heuristic's order, so that rank 0 is what every other call runs. Returns each rank the
    /// heuristic has, with at most [`WORKSPACE_BYTES`] of workspace, as a [`Candidate`]: the median
    /// ms of `reps` event-timed runs after 2 warm-ups, and the algorithm's configuration (what
    /// [`PIN_VAR`] may pin it by). A benchmarking aid, showing whether a shape's default leaves
    /// time on the table; what `run` writes is the product of whichever candidate ran last
    /// (every candidate computes the same GEMM, to rounding).
    pub fn time_candidates(
        &self,
        gpu: &Gpu,
        max: usize,
        reps: usize,
        mut run: impl FnMut() -> Result<()>,
    ) -> Result<Vec<Candidate>> {
        let mut out = Vec::new();
        let mut result = Ok(());
        for rank in 0..max.min(MAX_CANDIDATES) {
            self.candidate.store(rank, Ordering::Relaxed);
            *self.last_candidate.lock().unwrap_or_else(|e| e.into_inner()) = None;
            match gpu.time_ms(2, reps.max(1), &mut run) {
                Ok(t) => out.push(Candidate {
                    rank,
                    ms: t[t.len() / 2],
                    config: *self.last_candidate.lock().unwrap_or_else(|e| e.into_inner()),
                }),
                Err(Error::Unsupported { what: NO_CANDIDATE, .. }) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.candidate.store(DEFAULT_ALGO, Ordering::Relaxed);
        result.map(|()| out)
    }

    /// Number of (shape, epilogue, ...) combinations whose algorithm is cached.
    pub fn cached_algorithms(&self) -> usize {
        self.algos.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Pins by configuration ([`PinChoice::Config`]) for every GEMM size cached so far whose
    /// calls all run one configuration, sorted by size: what makes another process (of the same
    /// or a later cuBLASLt) run the algorithms this `Gemm` ran, where its heuristic still proposes
    /// them among its first [`MAX_CANDIDATES`].
    pub fn config_pins(&self) -> Vec<Pin> {
        let algos = self.algos.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_size: HashMap<(usize, usize, usize), Option<AlgoConfig>> = HashMap::new();
        for (key, algo) in algos.iter() {
            let config = AlgoConfig::of(algo).ok();
            by_size
                .entry((key.m, key.n, key.k))
                .and_modify(|seen| {
                    if *seen != config {
                        *seen = None
                    }
                })
                .or_insert(config);
        }
        let mut pins: Vec<Pin> =
            by_size.into_iter().filter_map(|(size, config)| Some((size, PinChoice::Config(config?)))).collect();
        pins.sort_by_key(|(size, _)| *size);
        pins
    }

    /// The algorithm each configuration cached so far runs, a line each, sorted: the pin that
    /// selects it (`MxNxK=@CONFIG`, as [`PIN_VAR`] takes it), then the call as cuBLASLt sees it.
    pub fn algorithm_report(&self) -> Vec<String> {
        let algos = self.algos.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines: Vec<String> = algos
            .iter()
            .map(|(key, algo)| {
                let size = format!("{}x{}x{}", key.m, key.n, key.k);
                match AlgoConfig::of(algo) {
                    Ok(config) => format!("{size}=@{config}: {}", describe(key)),
                    Err(e) => format!("{size} (configuration unreadable: {e}): {}", describe(key)),
                }
            })
            .collect();
        lines.sort();
        lines
    }

    /// Row-major `C[m, n] = alpha * op(A) op(B) + beta * C`, then `epilogue`; bf16 in and out,
    /// f32 accumulation, bf16 vectors (module docs for the layouts and each epilogue). `beta = 0`
    /// never reads `C` (it may hold anything, NaN included); `beta != 0` accumulates into it.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &dyn DeviceRead<bf16>,
        a_transposed: bool,
        b: &dyn DeviceRead<bf16>,
        b_transposed: bool,
        c: &mut dyn DeviceWrite<bf16>,
        alpha: f32,
        beta: f32,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        let (c_len, c_ptr) = (c.len(), c.ptr_mut());
        self.single(m, n, k, (a, a_transposed), (b, b_transposed), (c_len, c_ptr), DType::Bf16, alpha, beta, epilogue)
    }

    /// As [`Gemm::matmul`] with an f32 output `C` (bf16 inputs, f32 compute): the weight-gradient
    /// GEMM, accumulated in f32 with `beta = 1`. Takes [`Epilogue::None`], [`Epilogue::Bias`] and
    /// the bias-gradient epilogues [`Epilogue::BiasGradFromA`] / [`Epilogue::BiasGradFromB`],
    /// all with f32 vectors; the GELU ones need a bf16 output.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f32_out(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &dyn DeviceRead<bf16>,
        a_transposed: bool,
        b: &dyn DeviceRead<bf16>,
        b_transposed: bool,
        c: &mut dyn DeviceWrite<f32>,
        alpha: f32,
        beta: f32,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        let (c_len, c_ptr) = (c.len(), c.ptr_mut());
        self.single(m, n, k, (a, a_transposed), (b, b_transposed), (c_len, c_ptr), DType::F32, alpha, beta, epilogue)
    }

    /// One GEMM of either output type: the host checks, then the launch. `c` is (elements, pointer).
    #[allow(clippy::too_many_arguments)]
    fn single(
        &self,
        m: usize,
        n: usize,
        k: usize,
        (a, a_transposed): (&dyn DeviceRead<bf16>, bool),
        (b, b_transposed): (&dyn DeviceRead<bf16>, bool),
        (c_len, c_ptr): (usize, *mut std::ffi::c_void),
        output: DType,
        alpha: f32,
        beta: f32,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        let desc = GemmDesc { m, n, k, batch: 1, a_transposed, b_transposed, beta, output, epilogue: epilogue.kind() };
        let lens =
            OperandLens { a: a.len(), b: b.len(), c: c_len, vector: epilogue.vector_info(), aux: epilogue.aux_len() };
        check_matmul(&desc, &lens)?;
        self.run(m, n, k, 1, a_transposed, b_transposed, output, alpha, beta, epilogue, a.ptr(), b.ptr(), c_ptr)
    }

    /// `batch` independent row-major GEMMs over packed consecutive matrices: matrix `i` of `a`
    /// starts at element `i * m * k`, of `b` at `i * k * n`, of `c` at `i * m * n`. No epilogue.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_strided_batched(
        &self,
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        a: &dyn DeviceRead<bf16>,
        a_transposed: bool,
        b: &dyn DeviceRead<bf16>,
        b_transposed: bool,
        c: &mut dyn DeviceWrite<bf16>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let desc = GemmDesc {
            m,
            n,
            k,
            batch,
            a_transposed,
            b_transposed,
            beta,
            output: DType::Bf16,
            epilogue: EpilogueKind::None,
        };
        let lens = OperandLens { a: a.len(), b: b.len(), c: c.len(), vector: None, aux: None };
        check_matmul(&desc, &lens)?;
        self.run(
            m,
            n,
            k,
            batch,
            a_transposed,
            b_transposed,
            DType::Bf16,
            alpha,
            beta,
            Epilogue::None,
            a.ptr(),
            b.ptr(),
            c.ptr_mut(),
        )
    }

    /// Builds the descriptors, finds (or reuses) the algorithm and enqueues the GEMM. The caller
    /// has run [`check_matmul`] on these sizes.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
        a_transposed: bool,
        b_transposed: bool,
        output: DType,
        alpha: f32,
        beta: f32,
        mut epilogue: Epilogue<'_>,
        a: *const c_void,
        b: *const c_void,
        c: *mut c_void,
    ) -> Result<()> {
        let kind = epilogue.kind();
        let (vector, aux) = epilogue.pointers();
        let p = Pointers { a, b, c, vector, aux };
        for (tensor, ptr) in [("bias", p.vector.map(|v| v.0)), ("aux", p.aux)] {
            if let Some(ptr) = ptr {
                if alignment_of(ptr) < 16 {
                    return Err(Error::Alignment { tensor, detail: format!("address {ptr:p} is not 16-byte aligned") });
                }
            }
        }
        self.ctx.bind_to_thread()?;

        // cuBLASLt's view: D[n, m] (column-major) = op'(our B)[n, k] * op'(our A)[k, m].
        let (ab_rows, ab_cols, ab_ld) = if b_transposed { (k, n, k) } else { (n, k, n) };
        let (ba_rows, ba_cols, ba_ld) = if a_transposed { (m, k, m) } else { (k, m, k) };
        let lay_a = layout(DType::Bf16, ab_rows, ab_cols, ab_ld, batch)?;
        let lay_b = layout(DType::Bf16, ba_rows, ba_cols, ba_ld, batch)?;
        let lay_c = layout(output, n, m, n, batch)?;

        let desc = Guard {
            raw: lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(|e| cublas_err(e, "creating the matmul descriptor"))?,
            destroy: lt::destroy_matmul_desc,
        };
        use sys::cublasLtMatmulDescAttributes_t as D;
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (a 32-bit enum).
        let trans_a: i32 = b_transposed as i32;
        let trans_b: i32 = a_transposed as i32;
        let epi = kind.cublas();
        // SAFETY: live descriptor; each value has the attribute's documented type: int32
        // cublasOperation_t, uint32 cublasLtEpilogue_t, device pointers as `void*`, int64 leading
        // dimension, int32 cudaDataType_t.
        unsafe {
            set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_TRANSA, &trans_a)?;
            set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_TRANSB, &trans_b)?;
            set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
            if let Some((ptr, dtype)) = p.vector {
                set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
                let t: sys::cudaDataType = dtype.cuda();
                set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &t)?;
            }
            if let Some(ptr) = p.aux {
                set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &ptr)?;
                let ld = n as i64;
                set_desc(desc.raw, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld)?;
            }
        }

        let align = [alignment_of(p.b), alignment_of(p.a), alignment_of(p.c)];
        let key = AlgoKey {
            m,
            n,
            k,
            batch,
            a_transposed,
            b_transposed,
            output,
            epilogue: kind,
            vector: p.vector.map(|v| v.1),
            align,
        };
        let descs = Descs { desc: desc.raw, a: lay_a.raw, b: lay_b.raw, c: lay_c.raw };
        let candidate = Some(self.candidate.load(Ordering::Relaxed)).filter(|&r| r != DEFAULT_ALGO);
        let cached = self.algos.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let algo = match (candidate, cached) {
            (Some(rank), _) => self.proposal(&key, &descs, Some(rank))?,
            (None, Some(algo)) => algo,
            (None, None) => {
                let pin = self.pins.iter().find(|(size, _)| *size == (m, n, k)).map(|&(_, choice)| choice);
                let default_pin =
                    self.default_pins.iter().find(|(size, _)| *size == (m, n, k)).map(|&(_, choice)| choice);
                let algo = if pin.is_none() && self.tune {
                    self.tuned_algo(&key, &descs, &p, alpha, beta)?
                } else if let (None, Some(PinChoice::Config(config))) = (pin, default_pin) {
                    // A default pin: its configuration where the heuristic proposes it, else the
                    // heuristic's first.
                    match self.configured(&key, &descs, &config) {
                        Err(Error::Unsupported { what: NO_CANDIDATE, .. }) => self.proposal(&key, &descs, None)?,
                        other => other?,
                    }
                } else {
                    match pin {
                        None => self.proposal(&key, &descs, None),
                        Some(PinChoice::Rank(rank)) => self.proposal(&key, &descs, Some(rank)),
                        Some(PinChoice::Config(config)) => self.configured(&key, &descs, &config),
                    }
                    .map_err(|e| match e {
                        Error::Unsupported { what: NO_CANDIDATE, detail } => {
                            Error::Unsupported { what: "GEMM pin", detail: format!("{PIN_VAR}: {detail}") }
                        }
                        e => e,
                    })?
                };
                self.algos.lock().unwrap_or_else(|e| e.into_inner()).insert(key, algo);
                algo
            }
        };
        self.enqueue(&key, &descs, &p, p.c, alpha, beta, &algo)
    }

    /// Enqueues the GEMM `descs` describe with `algo`, writing `d` (the caller's C, or a buffer
    /// of the same size and layout).
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        key: &AlgoKey,
        descs: &Descs,
        p: &Pointers,
        d: *mut c_void,
        alpha: f32,
        beta: f32,
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> Result<()> {
        let workspace = self.workspace.ptr() as *mut c_void;
        // SAFETY: check_matmul verified that a, b, c (and the epilogue's vector and aux) hold
        // exactly the elements the layouts address; `d` is either c or a live buffer of c's size
        // (tuned_algo); every pointer is a live allocation of this context, borrowed for the
        // duration of this call and used in stream order; the algorithm was chosen for these
        // descriptors with at most WORKSPACE_BYTES of workspace, which `workspace` provides; C and
        // D are the same buffer with the same layout, which cuBLASLt allows.
        unsafe {
            lt::matmul(
                self.handle,
                descs.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                p.b,
                descs.a,
                p.a,
                descs.b,
                d as *const c_void,
                descs.c,
                d,
                descs.c,
                algo,
                workspace,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| cublas_err(e, &format!("running {}", describe(key))))
    }

    /// [`TUNE_VAR`]: times the heuristic's first [`TUNE_CANDIDATES`] usable proposals for this
    /// configuration (one warm-up and [`TUNE_REPS`] runs each, between two events; waits for
    /// the stream) and returns the fastest. A call that accumulates (`beta != 0`) has its runs
    /// write a scratch buffer of C's size in place of C (zeroed once; what the runs add up in it
    /// is discarded), so that it adds to C once, as untuned; the epilogue's outputs (aux, bias
    /// gradient) are overwritten with the same values each run.
    fn tuned_algo(
        &self,
        key: &AlgoKey,
        descs: &Descs,
        p: &Pointers,
        alpha: f32,
        beta: f32,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut algos = self.usable(key, descs)?;
        algos.truncate(TUNE_CANDIDATES);
        match algos[..] {
            [] => return self.proposal(key, descs, None), // its error says why
            [only] => return Ok(only),
            _ => {}
        }
        let elem = match key.output {
            DType::Bf16 => 2,
            DType::F32 => 4,
        };
        // Only an accumulating call needs the scratch buffer: with beta = 0 every run overwrites
        // C, and the call's own run comes last. Without room for it, no tuning.
        let scratch = if beta == 0.0 {
            None
        } else {
            match self.stream.alloc_zeros::<u8>(key.m * key.n * key.batch * elem) {
                Ok(buffer) => Some(buffer),
                Err(_) => return Ok(algos[0]),
            }
        };
        let scratch_ptr = scratch.as_ref().map(|b| b.device_ptr(&self.stream));
        let d = scratch_ptr.as_ref().map_or(p.c, |(ptr, _)| *ptr as usize as *mut c_void);
        let timing = Some(sys_driver::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, stop) = (self.ctx.new_event(timing)?, self.ctx.new_event(timing)?);
        // A candidate that cuBLASLt refuses to run is skipped (its time stays infinite).
        let mut times = vec![f32::INFINITY; algos.len()];
        for (time, algo) in times.iter_mut().zip(&algos) {
            if self.enqueue(key, descs, p, d, alpha, beta, algo).is_err() {
                continue;
            }
            start.record(&self.stream)?;
            let runs: Result<()> = (0..TUNE_REPS).try_for_each(|_| self.enqueue(key, descs, p, d, alpha, beta, algo));
            stop.record(&self.stream)?;
            let elapsed = start.elapsed_ms(&stop)?;
            if runs.is_ok() {
                *time = elapsed / TUNE_REPS as f32;
            }
        }
        let (rank, best) = times.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).expect("two or more candidates");
        if !best.is_finite() {
            // None ran: the heuristic's first, whose call then reports why.
            return Ok(algos[0]);
        }
        let line: Vec<String> = times
            .iter()
            .zip(&algos)
            .enumerate()
            .map(|(r, (ms, algo))| {
                let config = AlgoConfig::of(algo).map_or(String::new(), |c| format!(" (@{c})"));
                if ms.is_finite() {
                    format!("#{r} {ms:.4}{config}")
                } else {
                    format!("#{r} failed{config}")
                }
            })
            .collect();
        self.tuned.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
            "{}: candidates (ms) {}; chose #{rank}",
            describe(key),
            line.join(", ")
        ));
        Ok(algos[rank])
    }

    /// The search preference of a call: at most [`WORKSPACE_BYTES`] of workspace, the operands'
    /// alignments.
    fn preference(key: &AlgoKey) -> Result<Guard<sys::cublasLtMatmulPreference_t>> {
        let pref = Guard {
            raw: lt::create_matmul_pref().map_err(|e| cublas_err(e, "creating the matmul preference"))?,
            destroy: lt::destroy_matmul_pref,
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let bytes = WORKSPACE_BYTES as u64;
        // SAFETY: live preference; uint64 workspace size and uint32 alignments, as documented.
        unsafe {
            set_pref(pref.raw, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes)?;
            set_pref(pref.raw, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align[0])?;
            set_pref(pref.raw, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align[1])?;
            set_pref(pref.raw, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align[2])?;
            set_pref(pref.raw, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align[2])?;
        }
        Ok(pref)
    }

    /// The algorithm a call runs: the heuristic's first proposal (`rank` `None`; the error says
    /// why when there is none that fits the workspace), or its `rank`-th among those that fit
    /// ([`Gemm::time_candidates`]).
    fn proposal(&self, key: &AlgoKey, descs: &Descs, rank: Option<usize>) -> Result<sys::cublasLtMatmulAlgo_t> {
        let Some(rank) = rank else {
            return match self.heuristic(key, descs, 1)?.first() {
                Some(h) if h.workspaceSize <= WORKSPACE_BYTES => Ok(h.algo),
                Some(h) => Err(Error::Unsupported {
                    what: "cuBLASLt GEMM",
                    detail: format!("{} needs {} bytes of workspace", describe(key), h.workspaceSize),
                }),
                None => Err(Error::Unsupported {
                    what: "cuBLASLt GEMM",
                    detail: format!("cuBLASLt has no algorithm for {}", describe(key)),
                }),
            };
        };
        let usable = self.usable(key, descs)?;
        let algo = usable.get(rank).copied().ok_or_else(|| Error::Unsupported {
            what: NO_CANDIDATE,
            detail: format!(
                "cuBLASLt proposes {} usable algorithms for {}, no rank {rank}",
                usable.len(),
                describe(key)
            ),
        })?;
        // Read once a rank (time_candidates clears it before each), not on every timed call.
        let mut last = self.last_candidate.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none() {
            *last = AlgoConfig::of(&algo).ok();
        }
        Ok(algo)
    }

    /// The first of the heuristic's usable proposals (its first [`MAX_CANDIDATES`]) with the
    /// configuration `want` ([`PinChoice::Config`]), whatever its rank among them; an error
    /// listing the configurations it does propose otherwise. A proposal whose configuration
    /// cannot be read is passed over.
    fn configured(&self, key: &AlgoKey, descs: &Descs, want: &AlgoConfig) -> Result<sys::cublasLtMatmulAlgo_t> {
        let usable = self.usable(key, descs)?;
        let configs: Vec<Option<AlgoConfig>> = usable.iter().map(|a| AlgoConfig::of(a).ok()).collect();
        match configs.iter().position(|c| c.as_ref() == Some(want)) {
            Some(i) => Ok(usable[i]),
            None => Err(Error::Unsupported {
                what: NO_CANDIDATE,
                detail: format!(
                    "cuBLASLt proposes no algorithm with configuration {want} for {}; its {} usable ones: {}",
                    describe(key),
                    configs.len(),
                    configs
                        .iter()
                        .map(|c| c.map_or("(unreadable)".to_string(), |c| c.to_string()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// The heuristic's first [`MAX_CANDIDATES`] proposals that fit [`WORKSPACE_BYTES`], in its
    /// order (the ranks of [`Gemm::time_candidates`] and [`PIN_VAR`]).
    fn usable(&self, key: &AlgoKey, descs: &Descs) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let proposed = self.heuristic(key, descs, MAX_CANDIDATES)?;
        Ok(proposed.iter().filter(|r| r.workspaceSize <= WORKSPACE_BYTES).map(|r| r.algo).collect())
    }

    /// The heuristic's first `asked` (at most [`MAX_CANDIDATES`]) successful proposals.
    fn heuristic(
        &self,
        key: &AlgoKey,
        descs: &Descs,
        asked: usize,
    ) -> Result<Vec<sys::cublasLtMatmulHeuristicResult_t>> {
        let asked = asked.min(MAX_CANDIDATES);
        let pref = Self::preference(key)?;
        let mut found = [std::mem::MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::uninit(); MAX_CANDIDATES];
        let mut count: i32 = 0;
        // SAFETY: every descriptor is live and describes the call being planned; `found` has
        // room for the `asked` (<= MAX_CANDIDATES) results asked for, of which cuBLASLt writes
        // the first `count`.
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                descs.desc,
                descs.a,
                descs.b,
                descs.c,
                descs.c,
                pref.raw,
                asked as i32,
                found.as_mut_ptr() as *mut sys::cublasLtMatmulHeuristicResult_t,
                &mut count,
            )
        }
        .result()
        .map_err(|e| match e {
            CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED) => Error::Unsupported {
                what: "cuBLASLt GEMM",
                detail: format!("cuBLASLt has no algorithm for {}", describe(key)),
            },
            e => cublas_err(e, &format!("choosing an algorithm for {}", describe(key))),
        })?;
        Ok(found[..count.clamp(0, asked as i32) as usize]
            .iter()
            // SAFETY: the first `count` results were written by the call above.
            .map(|r| unsafe { r.assume_init() })
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .collect())
    }
}

fn describe(key: &AlgoKey) -> String {
    let vector = match key.vector {
        Some(t) => format!(", {} vector", if t == DType::Bf16 { "bf16" } else { "f32" }),
        None => String::new(),
    };
    format!(
        "row-major m={} n={} k={} batch={} a{} b{} -> {:?} with {:?}{} (alignments {:?} B)",
        key.m,
        key.n,
        key.k,
        key.batch,
        if key.a_transposed { "^T" } else { "" },
        if key.b_transposed { "^T" } else { "" },
        key.output,
        key.epilogue,
        vector,
        key.align
    )
}

/// Floating-point operations of one GEMM (`2 m n k`), for throughput reports.
pub fn flops(m: usize, n: usize, k: usize) -> u64 {
    2 * m as u64 * n as u64 * k as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default pin table's entries are picked by compute capability and SM count, pin by
    /// configuration only, and every entry of [`DEFAULT_PINS`] parses.
    #[test]
    fn default_pins_are_configurations_for_one_kind_of_device() {
        let c = AlgoConfig::EXAMPLE;
        let hopper = DefaultPins {
            compute_capability: (9, 0),
            sm_count: 132,
            source: "a card",
            pins: "3764x8192x768=@a66.t21.k1.r0.w0.c0.s17.i0.l3, 3764x768x8192=@a31.t20.k1.r0.w1.c0.s9.i0.l0",
        };
        let pcie = DefaultPins { sm_count: 114, pins: "8192x768x3764=@a66.t21.k1.r0.w0.c0.s17.i0.l3", ..hopper };
        let table = [hopper, pcie];
        let sxm = default_pins_for(&table, (9, 0), 132).unwrap();
        assert_eq!(sxm.len(), 2);
        assert_eq!(sxm[0], ((3764, 8192, 768), PinChoice::Config(c.parse().unwrap())));
        assert_eq!(sxm[1], ((3764, 768, 8192), PinChoice::Config("a31.t20.k1.r0.w1.c0.s9.i0.l0".parse().unwrap())));
        assert_eq!(default_pins_for(&table, (9, 0), 114).unwrap()[0].0, (8192, 768, 3764));
        assert!(default_pins_for(&table, (8, 0), 132).unwrap().is_empty());
        assert!(default_pins_for(&table, (9, 0), 108).unwrap().is_empty());
        // A rank, or an entry that does not parse, is refused, naming where it was measured.
        for pins in ["3764x8192x768=2", "3764x8192=@a66"] {
            let err = default_pins_for(&[DefaultPins { pins, source: "the tenth run", ..hopper }], (9, 0), 132)
                .unwrap_err()
                .to_string();
            assert!(err.contains("the tenth run"), "{pins}: {err}");
        }
        for entry in DEFAULT_PINS {
            default_pins_for(&[*entry], entry.compute_capability, entry.sm_count).unwrap();
        }
    }

    #[test]
    fn pins_parse_or_name_the_bad_entry() {
        assert_eq!(parse_pins("").unwrap(), vec![]);
        let config = AlgoConfig([66, 21, 1, 0, 0, 0, 17, 0, 3]);
        let pins = vec![
            ((3136, 768, 8192), PinChoice::Rank(2)),
            ((8192, 768, 3136), PinChoice::Rank(0)),
            ((3136, 8192, 768), PinChoice::Config(config)),
        ];
        let text = "3136x768x8192=2, 8192x768x3136=0,3136x8192x768=@a66.t21.k1.r0.w0.c0.s17.i0.l3";
        assert_eq!(parse_pins(text).unwrap(), pins);
        // Written as the variable takes them, and read back.
        assert_eq!(pin_text(&pins), text.replace(", ", ","));
        assert_eq!(parse_pins(&pin_text(&pins)).unwrap(), pins);
        for bad in [
            "3136x768=2",
            "3136x768x8192",
            "axbxc=1",
            "1x2x3=x",
            "1x2x3=16",
            "1x2x3x4=0",
            "1x2x3=@",
            "1x2x3=@a66.t21.k1.r0.w0.c0.s17.i0",
            "1x2x3=@a66.t21.k1.r0.w0.c0.s17.i0.l3.x1",
            "1x2x3=@t21.a66.k1.r0.w0.c0.s17.i0.l3",
            "1x2x3=@a66.t21.k1.r0.w0.c0.s17.i0.lx",
            "1x2x3=a66.t21.k1.r0.w0.c0.s17.i0.l3",
        ] {
            let err = parse_pins(bad).unwrap_err().to_string();
            assert!(err.contains(PIN_VAR) && err.contains(bad) && err.contains(AlgoConfig::EXAMPLE), "{bad}: {err}");
        }
    }

    #[test]
    fn configurations_read_back_and_widen_by_sign() {
        let config = AlgoConfig([-1, 4_294_967_295, 2, 1, 1, 3, 65_535, 1, 2]);
        assert_eq!(config.to_string(), "a-1.t4294967295.k2.r1.w1.c3.s65535.i1.l2");
        assert_eq!(config.to_string().parse::<AlgoConfig>(), Ok(config));
        assert_eq!(AlgoConfig::EXAMPLE.parse::<AlgoConfig>().map(|c| c.to_string()), Ok(AlgoConfig::EXAMPLE.into()));
        // Attribute bytes as cuBLASLt writes them: little-endian, 2 or 4 bytes here.
        assert_eq!(widen(&[0xff, 0xff, 0xff, 0xff], true), -1);
        assert_eq!(widen(&[0xff, 0xff, 0xff, 0xff], false), 4_294_967_295);
        assert_eq!(widen(&[0x03, 0x00], false), 3);
        assert_eq!(widen(&[0xfe, 0xff], true), -2);
        assert_eq!(widen(&[0x42, 0, 0, 0, 0, 0, 0, 0x80], true), i64::MIN + 0x42);
    }

    #[test]
    fn tuning_switch_parses_or_names_the_variable() {
        assert!(!parse_tune("").unwrap() && !parse_tune("0").unwrap() && parse_tune(" 1 ").unwrap());
        for bad in ["yes", "2", "true"] {
            let err = parse_tune(bad).unwrap_err().to_string();
            assert!(err.contains(TUNE_VAR) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn alignment_is_capped_power_of_two() {
        assert_eq!(alignment_of(0x1000 as *const c_void), 256);
        assert_eq!(alignment_of(0x1010 as *const c_void), 16);
        assert_eq!(alignment_of(0x1002 as *const c_void), 2);
    }

    #[test]
    fn epilogue_mapping_swaps_bias_grad_operands() {
        assert_eq!(EpilogueKind::BiasGradFromA.cublas(), sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB);
        assert_eq!(EpilogueKind::BiasGradFromB.cublas(), sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADA);
        assert_eq!(EpilogueKind::BiasGradFromA.vector(3, 5), Some(("bias_grad", 3)));
        assert_eq!(EpilogueKind::BiasGradFromB.vector(3, 5), Some(("bias_grad", 5)));
        assert_eq!(EpilogueKind::Bias.vector(3, 5), Some(("bias", 5)));
    }
}
