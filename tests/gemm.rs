//! cuBLASLt GEMM wrapper against CPU references (DESIGN.md, "Conventions").
//!
//! For every epilogue, both transposes of both operands, bf16 and f32 vectors and both output
//! types: random bf16 inputs, poisoned outputs, an f64 truth and an f32 CPU baseline on the same
//! bf16-rounded inputs (outputs rounded as the GPU writes them), compared with
//! `assert_within_baseline` (factor 2 for forward values, 3 for gradients). The GPU tests collect
//! every failing case and report them all at the end, so one run gives the full picture.
//!
//! The host checks (`check_matmul`) are a pure function and are tested here without a GPU.

use std::panic::{catch_unwind, AssertUnwindSafe};

use half::bf16;
use mapet::cpu::{round_bf16, sgemm};
use mapet::cuda::gemm::{
    check_matmul, flops, AlgoConfig, Candidate, DType, Epilogue, EpilogueKind, Gemm, GemmDesc, OperandLens, PinChoice,
    Vector, VectorMut, MAX_CANDIDATES, PIN_VAR,
};
use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::testing::{self, assert_within_baseline};
use mapet::Error;
use rand::Rng;
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// Host checks (no GPU)

fn lens(m: usize, n: usize, k: usize) -> OperandLens {
    OperandLens { a: m * k, b: k * n, c: m * n, vector: None, aux: None }
}

fn desc(m: usize, n: usize, k: usize, epilogue: EpilogueKind) -> GemmDesc {
    GemmDesc { m, n, k, batch: 1, a_transposed: false, b_transposed: true, beta: 0.0, output: DType::Bf16, epilogue }
}

fn shape_tensor(r: mapet::Result<()>) -> &'static str {
    match r {
        Err(Error::Shape { tensor, .. }) => tensor,
        other => panic!("expected a shape error, got {other:?}"),
    }
}

fn is_unsupported(r: &mapet::Result<()>) -> bool {
    matches!(r, Err(Error::Unsupported { .. }))
}

#[test]
fn host_checks_name_the_bad_tensor() {
    let (m, n, k) = (491, 768, 64);
    let ok = |epi, l: OperandLens| check_matmul(&desc(m, n, k, epi), &l);
    let bf = DType::Bf16;
    assert!(ok(EpilogueKind::None, lens(m, n, k)).is_ok());
    assert_eq!(shape_tensor(ok(EpilogueKind::None, OperandLens { a: m * k - 1, ..lens(m, n, k) })), "a");
    assert_eq!(shape_tensor(ok(EpilogueKind::None, OperandLens { b: k * n + 1, ..lens(m, n, k) })), "b");
    assert_eq!(shape_tensor(ok(EpilogueKind::None, OperandLens { c: n, ..lens(m, n, k) })), "c");
    // Bias: length n, required.
    assert!(ok(EpilogueKind::Bias, OperandLens { vector: Some((n, bf)), ..lens(m, n, k) }).is_ok());
    assert_eq!(shape_tensor(ok(EpilogueKind::Bias, OperandLens { vector: Some((m, bf)), ..lens(m, n, k) })), "bias");
    assert_eq!(shape_tensor(ok(EpilogueKind::Bias, lens(m, n, k))), "bias");
    assert_eq!(shape_tensor(ok(EpilogueKind::None, OperandLens { vector: Some((n, bf)), ..lens(m, n, k) })), "bias");
    // GELU aux: [m, n], required, and only for the GELU epilogues.
    let gelu = OperandLens { vector: Some((n, bf)), aux: Some(m * n), ..lens(m, n, k) };
    assert!(ok(EpilogueKind::BiasGelu, gelu).is_ok());
    assert_eq!(shape_tensor(ok(EpilogueKind::BiasGelu, OperandLens { aux: Some(m * n - 8), ..gelu })), "aux");
    assert_eq!(shape_tensor(ok(EpilogueKind::BiasGelu, OperandLens { aux: None, ..gelu })), "aux");
    assert_eq!(shape_tensor(ok(EpilogueKind::DGelu, OperandLens { aux: None, ..lens(m, n, k) })), "aux");
    assert_eq!(shape_tensor(ok(EpilogueKind::None, OperandLens { aux: Some(m * n), ..lens(m, n, k) })), "aux");
    assert!(ok(EpilogueKind::DGeluBiasGrad, gelu).is_ok());
    assert_eq!(
        shape_tensor(ok(EpilogueKind::DGeluBiasGrad, OperandLens { vector: Some((m, bf)), ..gelu })),
        "bias_grad"
    );
    // The aux row length must be a multiple of 8.
    let n_odd = 100;
    let r = check_matmul(
        &desc(m, n_odd, k, EpilogueKind::DGelu),
        &OperandLens { aux: Some(m * n_odd), ..lens(m, n_odd, k) },
    );
    assert!(matches!(r, Err(Error::Alignment { tensor: "aux", .. })), "{r:?}");
    // GELU epilogues: bf16 output and beta = 0 only.
    let f32_out = GemmDesc { output: DType::F32, ..desc(m, n, k, EpilogueKind::BiasGelu) };
    assert!(is_unsupported(&check_matmul(&f32_out, &OperandLens { vector: Some((n, DType::F32)), ..gelu })));
    let beta1 = GemmDesc { beta: 1.0, ..desc(m, n, k, EpilogueKind::DGeluBiasGrad) };
    assert!(is_unsupported(&check_matmul(&beta1, &gelu)));
    // Vectors have the output's type.
    assert!(is_unsupported(&ok(EpilogueKind::Bias, OperandLens { vector: Some((n, DType::F32)), ..lens(m, n, k) })));
    let f32_bias = GemmDesc { output: DType::F32, ..desc(m, n, k, EpilogueKind::Bias) };
    assert!(check_matmul(&f32_bias, &OperandLens { vector: Some((n, DType::F32)), ..lens(m, n, k) }).is_ok());
    assert!(is_unsupported(&check_matmul(&f32_bias, &OperandLens { vector: Some((n, bf)), ..lens(m, n, k) })));
}

#[test]
fn host_checks_bias_gradient_orientation() {
    let (m, n, k) = (768, 64, 491);
    let f = DType::F32;
    for (a_transposed, b_transposed) in TRANSPOSES {
        // BiasGradFromA: length m, needs A stored [k, m].
        let d =
            GemmDesc { a_transposed, b_transposed, output: f, beta: 1.0, ..desc(m, n, k, EpilogueKind::BiasGradFromA) };
        let good = OperandLens { vector: Some((m, f)), ..lens(m, n, k) };
        let r = check_matmul(&d, &good);
        assert_eq!(r.is_ok(), a_transposed, "BiasGradFromA a_t={a_transposed} b_t={b_transposed}: {r:?}");
        if a_transposed {
            let bad = OperandLens { vector: Some((n, f)), ..lens(m, n, k) };
            assert_eq!(shape_tensor(check_matmul(&d, &bad)), "bias_grad");
        } else {
            assert!(is_unsupported(&r));
        }
        // BiasGradFromB: length n, needs B stored [k, n].
        let d = GemmDesc { a_transposed, b_transposed, output: f, ..desc(m, n, k, EpilogueKind::BiasGradFromB) };
        let good = OperandLens { vector: Some((n, f)), ..lens(m, n, k) };
        let r = check_matmul(&d, &good);
        assert_eq!(r.is_ok(), !b_transposed, "BiasGradFromB a_t={a_transposed} b_t={b_transposed}: {r:?}");
        if !b_transposed {
            let bad = OperandLens { vector: Some((m, f)), ..lens(m, n, k) };
            assert_eq!(shape_tensor(check_matmul(&d, &bad)), "bias_grad");
        } else {
            assert!(is_unsupported(&r));
        }
    }
}

#[test]
fn host_checks_sizes_and_batches() {
    for (m, n, k, batch) in [(0, 4, 4, 1), (4, 0, 4, 1), (4, 4, 0, 1), (4, 4, 4, 0)] {
        let d = GemmDesc { batch, ..desc(m, n, k, EpilogueKind::None) };
        assert!(is_unsupported(&check_matmul(&d, &lens(m, n, k))));
    }
    let b3 = OperandLens { a: 3 * 8 * 16, b: 3 * 16 * 24, c: 3 * 8 * 24, vector: None, aux: None };
    let d3 = GemmDesc { batch: 3, ..desc(8, 24, 16, EpilogueKind::None) };
    assert!(check_matmul(&d3, &b3).is_ok());
    assert_eq!(shape_tensor(check_matmul(&d3, &lens(8, 24, 16))), "a");
    let d3_bias = GemmDesc { epilogue: EpilogueKind::Bias, ..d3 };
    assert!(is_unsupported(&check_matmul(&d3_bias, &OperandLens { vector: Some((24, DType::Bf16)), ..b3 })));
    // Overflowing element counts are refused, not wrapped.
    assert!(is_unsupported(&check_matmul(&desc(usize::MAX / 2, 4, 4, EpilogueKind::None), &lens(1, 1, 1))));
    assert_eq!(flops(2, 3, 4), 48);
}

// ---------------------------------------------------------------------------------------------
// CPU references

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// The tanh-approximation GELU (what cuBLASLt's epilogue computes), f64.
fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh())
}

fn dgelu64(x: f64) -> f64 {
    let t = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
}

fn gelu32(x: f32) -> f32 {
    let c = SQRT_2_OVER_PI as f32;
    0.5 * x * (1.0 + (c * (x + GELU_C as f32 * x * x * x)).tanh())
}

fn dgelu32(x: f32) -> f32 {
    let c = SQRT_2_OVER_PI as f32;
    let g = GELU_C as f32;
    let t = (c * (x + g * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * g * x * x)
}

/// erf GELU (SPEC.md's), only for the diagnostic that tells the two forms apart.
fn gelu_erf64(x: f64) -> f64 {
    // Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), enough to separate forms 4e-4 apart.
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = (1.0 - poly * (-z * z).exp()).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// op(X) materialised row-major [rows, cols], from X stored [rows, cols] or (transposed) [cols, rows].
fn materialise(x: &[f32], rows: usize, cols: usize, transposed: bool) -> Vec<f32> {
    if !transposed {
        return x.to_vec();
    }
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = x[c * rows + r];
        }
    }
    out
}

/// f64 product of op(A) [m, k] and op(B) [k, n] (both materialised).
fn product64(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
    let bt = materialise(b, n, k, true); // [n, k]
    let mut out = vec![0.0f64; m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let ai = &a[i * k..(i + 1) * k];
        for (j, o) in row.iter_mut().enumerate() {
            let bj = &bt[j * k..(j + 1) * k];
            *o = ai.iter().zip(bj).map(|(&x, &y)| x as f64 * y as f64).sum();
        }
    });
    out
}

fn rounded(mut v: Vec<f32>, dtype: DType) -> Vec<f32> {
    if dtype == DType::Bf16 {
        round_bf16(&mut v);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// GPU cases

fn setup(test: &str) -> Option<(Gpu, Gemm)> {
    let gpu = testing::gpu_or_skip(test)?;
    match Gemm::new(&gpu) {
        Ok(g) => Some((gpu, g)),
        Err(e) if std::env::var("MAPET_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("{test}: MAPET_REQUIRE_GPU=1 but cuBLASLt is unusable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP {test}: {e}");
            None
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    epi: EpilogueKind,
    vector: DType,
    output: DType,
    alpha: f32,
    beta: f32,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "m={} n={} k={} A{} B{} {:?} vec={:?} out={:?} alpha={} beta={}",
            self.m,
            self.n,
            self.k,
            if self.a_t { "^T" } else { "" },
            if self.b_t { "^T" } else { "" },
            self.epi,
            self.vector,
            self.output,
            self.alpha,
            self.beta
        )
    }
}

enum Out {
    Bf16(DeviceBuffer<bf16>),
    F32(DeviceBuffer<f32>),
}

impl Out {
    fn alloc(gpu: &Gpu, t: DType, len: usize) -> mapet::Result<Out> {
        Ok(match t {
            DType::Bf16 => Out::Bf16(gpu.alloc(len)?),
            DType::F32 => Out::F32(gpu.alloc(len)?),
        })
    }
    fn upload(gpu: &Gpu, t: DType, host: &[f32]) -> mapet::Result<Out> {
        Ok(match t {
            DType::Bf16 => Out::Bf16(gpu.upload_bf16(host)?),
            DType::F32 => Out::F32(gpu.upload(host)?),
        })
    }
    fn poison(&mut self) -> mapet::Result<()> {
        match self {
            Out::Bf16(b) => b.poison(),
            Out::F32(b) => b.poison(),
        }
    }
    fn host(&self) -> mapet::Result<Vec<f32>> {
        match self {
            Out::Bf16(b) => b.to_host_f32(),
            Out::F32(b) => b.to_host(),
        }
    }
    fn as_vector(&self) -> Vector<'_> {
        match self {
            Out::Bf16(b) => Vector::Bf16(b),
            Out::F32(b) => Vector::F32(b),
        }
    }
    fn as_vector_mut(&mut self) -> VectorMut<'_> {
        match self {
            Out::Bf16(b) => VectorMut::Bf16(b),
            Out::F32(b) => VectorMut::F32(b),
        }
    }
}

/// Runs one case on the GPU and checks every output; panics (caught by the caller) on a
/// mismatch, returns Err on an API error.
fn run_case(gpu: &Gpu, gemm: &Gemm, rng: &mut impl Rng, cs: Case) -> mapet::Result<()> {
    let Case { m, n, k, a_t, b_t, epi, vector, output, alpha, beta } = cs;
    let label = cs.label();
    // Scale inputs so that the products are O(1): GELU and its derivative are then exercised
    // across their curved range.
    let s = (4.5 / (k as f32).sqrt()).sqrt();
    let a = testing::uniform_bf16(rng, m * k, s);
    let b = testing::uniform_bf16(rng, k * n, s);
    let op_a = materialise(&a, m, k, a_t);
    let op_b = materialise(&b, k, n, b_t);
    let c0 = if beta != 0.0 { rounded(testing::uniform(rng, m * n, 1.0), output) } else { vec![0.0; m * n] };
    let vec_len = match epi {
        EpilogueKind::BiasGradFromA => m,
        _ => n,
    };
    let bias = rounded(testing::uniform(rng, vec_len, 0.5), vector);
    let aux_in = testing::uniform_bf16(rng, m * n, 2.5);

    let a_d = gpu.upload_bf16(&a)?;
    let b_d = gpu.upload_bf16(&b)?;
    let mut c_d = Out::upload(gpu, output, &c0)?;
    if beta == 0.0 {
        c_d.poison()?;
    }
    let bias_d = Out::upload(gpu, vector, &bias)?;
    let mut grad_d = Out::alloc(gpu, vector, vec_len)?;
    grad_d.poison()?;
    let mut aux_d = gpu.upload_bf16(&aux_in)?;
    if epi == EpilogueKind::BiasGelu {
        aux_d.poison()?;
    }

    {
        let e = match epi {
            EpilogueKind::None => Epilogue::None,
            EpilogueKind::Bias => Epilogue::Bias { bias: bias_d.as_vector() },
            EpilogueKind::BiasGelu => Epilogue::BiasGelu { bias: bias_d.as_vector(), aux: &mut aux_d },
            EpilogueKind::DGelu => Epilogue::DGelu { aux: &aux_d },
            EpilogueKind::DGeluBiasGrad => Epilogue::DGeluBiasGrad { aux: &aux_d, bias_grad: grad_d.as_vector_mut() },
            EpilogueKind::BiasGradFromA => Epilogue::BiasGradFromA { bias_grad: grad_d.as_vector_mut() },
            EpilogueKind::BiasGradFromB => Epilogue::BiasGradFromB { bias_grad: grad_d.as_vector_mut() },
        };
        match &mut c_d {
            Out::Bf16(c) => gemm.matmul(m, n, k, &a_d, a_t, &b_d, b_t, c, alpha, beta, e)?,
            Out::F32(c) => gemm.matmul_f32_out(m, n, k, &a_d, a_t, &b_d, b_t, c, alpha, beta, e)?,
        }
    }
    gpu.synchronize()?;

    // Truth and baseline of acc = alpha op(A) op(B) + beta C0.
    let prod = product64(m, n, k, &op_a, &op_b);
    let acc64: Vec<f64> = prod.iter().zip(&c0).map(|(&p, &c)| alpha as f64 * p + beta as f64 * c as f64).collect();
    let mut acc32 = c0.clone();
    sgemm(m, n, k, alpha, &op_a, &op_b, false, beta, &mut acc32);

    let got = c_d.host()?;
    let (fwd, grad) = (2.0, 3.0);
    let floor = if output == DType::F32 { 1e-5 } else { 1e-4 };
    let col = |i: usize| i % n;
    match epi {
        EpilogueKind::None | EpilogueKind::BiasGradFromA | EpilogueKind::BiasGradFromB => {
            let base = rounded(acc32.clone(), output);
            assert_within_baseline(&format!("{label}: C"), &got, &base, &acc64, fwd, floor);
        }
        EpilogueKind::Bias => {
            let t: Vec<f64> = acc64.iter().enumerate().map(|(i, &x)| x + bias[col(i)] as f64).collect();
            let base = rounded(acc32.iter().enumerate().map(|(i, &x)| x + bias[col(i)]).collect(), output);
            assert_within_baseline(&format!("{label}: C"), &got, &base, &t, fwd, floor);
        }
        EpilogueKind::BiasGelu => {
            let pre64: Vec<f64> = acc64.iter().enumerate().map(|(i, &x)| x + bias[col(i)] as f64).collect();
            let pre32: Vec<f32> = acc32.iter().enumerate().map(|(i, &x)| x + bias[col(i)]).collect();
            let aux_got = aux_d.to_host_f32()?;
            assert_within_baseline(
                &format!("{label}: aux"),
                &aux_got,
                &rounded(pre32.clone(), DType::Bf16),
                &pre64,
                fwd,
                floor,
            );
            let t: Vec<f64> = pre64.iter().map(|&x| gelu64(x)).collect();
            let base = rounded(pre32.iter().map(|&x| gelu32(x)).collect(), output);
            assert_within_baseline(&format!("{label}: C"), &got, &base, &t, fwd, floor);
            gelu_form_diagnostic(&label, &got, &pre64);
        }
        EpilogueKind::DGelu | EpilogueKind::DGeluBiasGrad => {
            let d64: Vec<f64> = acc64.iter().zip(&aux_in).map(|(&x, &p)| x * dgelu64(p as f64)).collect();
            let d32: Vec<f32> = acc32.iter().zip(&aux_in).map(|(&x, &p)| x * dgelu32(p)).collect();
            assert_within_baseline(&format!("{label}: C"), &got, &rounded(d32.clone(), output), &d64, grad, floor);
            if epi == EpilogueKind::DGeluBiasGrad {
                let mut t = vec![0.0f64; n];
                let mut base = vec![0.0f32; n];
                for i in 0..m {
                    for j in 0..n {
                        t[j] += d64[i * n + j];
                        base[j] += d32[i * n + j];
                    }
                }
                let g = grad_d.host()?;
                let floor_v = if vector == DType::F32 { 1e-5 } else { 1e-4 };
                assert_within_baseline(&format!("{label}: bias_grad"), &g, &rounded(base, vector), &t, grad, floor_v);
            }
        }
    }
    if matches!(epi, EpilogueKind::BiasGradFromA | EpilogueKind::BiasGradFromB) {
        let (t, base): (Vec<f64>, Vec<f32>) = if epi == EpilogueKind::BiasGradFromA {
            (0..m)
                .map(|i| {
                    let r = &op_a[i * k..(i + 1) * k];
                    (r.iter().map(|&x| x as f64).sum::<f64>(), r.iter().sum::<f32>())
                })
                .unzip()
        } else {
            (0..n)
                .map(|j| {
                    ((0..k).map(|l| op_b[l * n + j] as f64).sum::<f64>(), (0..k).map(|l| op_b[l * n + j]).sum::<f32>())
                })
                .unzip()
        };
        let g = grad_d.host()?;
        let floor_v = if vector == DType::F32 { 1e-5 } else { 1e-4 };
        assert_within_baseline(&format!("{label}: bias_grad"), &g, &rounded(base, vector), &t, grad, floor_v);
    }
    Ok(())
}

/// Prints whether the GELU the GPU applied is closer to the tanh form or the erf form, from the
/// mean signed error on pre-activations in [-3, -1] where the two forms differ most.
fn gelu_form_diagnostic(label: &str, got: &[f32], pre: &[f64]) {
    let (mut dt, mut de, mut cnt) = (0.0f64, 0.0f64, 0usize);
    for (&g, &x) in got.iter().zip(pre) {
        if (-3.0..=-1.0).contains(&x) {
            dt += g as f64 - gelu64(x);
            de += g as f64 - gelu_erf64(x);
            cnt += 1;
        }
    }
    if cnt > 0 {
        eprintln!(
            "{label}: GELU form diagnostic over {cnt} values: mean signed error vs tanh form {:.3e}, vs erf form {:.3e}",
            dt / cnt as f64,
            de / cnt as f64
        );
    }
}

/// Runs every case, catching panics, and fails listing all failing cases.
fn run_all(test: &str, gpu: &Gpu, gemm: &Gemm, cases: &[Case]) {
    let mut rng = testing::rng(test);
    let mut failures = Vec::new();
    for &cs in cases {
        let r = catch_unwind(AssertUnwindSafe(|| run_case(gpu, gemm, &mut rng, cs)));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{}: error: {e}", cs.label())),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {msg}", cs.label()));
            }
        }
    }
    eprintln!("{test}: {} of {} cases passed", cases.len() - failures.len(), cases.len());
    assert!(failures.is_empty(), "{test}: {} failing cases:\n{}", failures.len(), failures.join("\n"));
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

#[allow(clippy::too_many_arguments)]
fn case(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, epi: EpilogueKind, vector: DType, output: DType) -> Case {
    Case { m, n, k, a_t, b_t, epi, vector, output, alpha: 1.0, beta: 0.0 }
}

/// Whether cuBLASLt has a kernel for this bias-gradient orientation (module docs of gemm.rs;
/// `host_checks_bias_gradient_orientation` checks that the others are refused).
fn orientation_supported(epi: EpilogueKind, a_t: bool, b_t: bool) -> bool {
    match epi {
        EpilogueKind::BiasGradFromA => a_t,
        EpilogueKind::BiasGradFromB => !b_t,
        _ => true,
    }
}

#[test]
fn bf16_output_every_epilogue_and_transpose() {
    let Some((gpu, gemm)) = setup("bf16_output_every_epilogue_and_transpose") else { return };
    let mut cases = Vec::new();
    for (m, n, k) in [(491, 768, 64), (147, 64, 768)] {
        for (a_t, b_t) in TRANSPOSES {
            for epi in [
                EpilogueKind::None,
                EpilogueKind::Bias,
                EpilogueKind::BiasGelu,
                EpilogueKind::DGelu,
                EpilogueKind::DGeluBiasGrad,
                EpilogueKind::BiasGradFromA,
                EpilogueKind::BiasGradFromB,
            ] {
                if orientation_supported(epi, a_t, b_t) {
                    cases.push(case(m, n, k, a_t, b_t, epi, DType::Bf16, DType::Bf16));
                }
            }
        }
    }
    run_all("bf16_output_every_epilogue_and_transpose", &gpu, &gemm, &cases);
}

#[test]
fn f32_output_weight_gradients() {
    let Some((gpu, gemm)) = setup("f32_output_weight_gradients") else { return };
    let mut cases = Vec::new();
    for (m, n, k) in [(768, 64, 491), (64, 768, 147)] {
        for (a_t, b_t) in TRANSPOSES {
            for epi in
                [EpilogueKind::None, EpilogueKind::Bias, EpilogueKind::BiasGradFromA, EpilogueKind::BiasGradFromB]
            {
                if orientation_supported(epi, a_t, b_t) {
                    cases.push(case(m, n, k, a_t, b_t, epi, DType::F32, DType::F32));
                }
            }
        }
    }
    run_all("f32_output_weight_gradients", &gpu, &gemm, &cases);
}

/// Accumulating calls (`beta != 0`) with each output type and the epilogues the model
/// accumulates with.
fn accumulation_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (alpha, beta) in [(1.0, 1.0), (0.5, -2.0)] {
        for (a_t, b_t) in [(false, true), (true, false)] {
            for (epi, output) in [
                (EpilogueKind::None, DType::Bf16),
                (EpilogueKind::Bias, DType::Bf16),
                (EpilogueKind::None, DType::F32),
                (EpilogueKind::BiasGradFromA, DType::F32),
                (EpilogueKind::BiasGradFromB, DType::F32),
            ] {
                if !orientation_supported(epi, a_t, b_t) {
                    continue;
                }
                let (m, n, k) = if output == DType::F32 { (768, 64, 491) } else { (491, 768, 64) };
                cases.push(Case { alpha, beta, ..case(m, n, k, a_t, b_t, epi, output, output) });
            }
        }
    }
    cases
}

#[test]
fn accumulation_with_beta() {
    let Some((gpu, gemm)) = setup("accumulation_with_beta") else { return };
    run_all("accumulation_with_beta", &gpu, &gemm, &accumulation_cases());
}

/// The ViT-B shapes of the model at a small batch (one image: 491 rows), each with the epilogue
/// the model uses for it.
fn model_cases() -> Vec<Case> {
    let rows = 491;
    vec![
        // fc1 forward: x [rows, 768] W1^T, W1 [3072, 768].
        case(rows, 3072, 768, false, true, EpilogueKind::BiasGelu, DType::Bf16, DType::Bf16),
        // fc2 forward.
        case(rows, 768, 3072, false, true, EpilogueKind::Bias, DType::Bf16, DType::Bf16),
        // fc2's dX through GELU, with fc1's bias gradient: dY [rows, 768] W2, W2 [768, 3072].
        case(rows, 3072, 768, false, false, EpilogueKind::DGeluBiasGrad, DType::Bf16, DType::Bf16),
        case(rows, 3072, 768, false, false, EpilogueKind::DGelu, DType::Bf16, DType::Bf16),
        // fc1's dX.
        case(rows, 768, 3072, false, false, EpilogueKind::None, DType::Bf16, DType::Bf16),
        // fc1's dW [3072, 768] = dY^T x in f32 with db.
        case(3072, 768, rows, true, false, EpilogueKind::BiasGradFromA, DType::F32, DType::F32),
        // kv's dW [1536, 768].
        case(1536, 768, rows, true, false, EpilogueKind::BiasGradFromA, DType::F32, DType::F32),
    ]
}

#[test]
fn model_shapes() {
    let Some((gpu, gemm)) = setup("model_shapes") else { return };
    let cases = model_cases();
    run_all("model_shapes", &gpu, &gemm, &cases);
    assert!(gemm.cached_algorithms() >= cases.len(), "algorithms were not cached");
}

/// MAPET_GEMM_TUNE: a tuned call (candidates timed on its first call, the fastest kept) computes
/// the same product, adds to C once when it accumulates (the timing runs write a scratch
/// buffer), and writes its epilogue's outputs; the second call of each configuration reuses the
/// choice (run_case calls once per case; model_cases repeats configurations across tests).
#[test]
fn tuned_calls_compute_the_product_and_accumulate_once() {
    let test = "tuned_calls_compute_the_product_and_accumulate_once";
    let Some((gpu, _)) = setup(test) else { return };
    let tuned = Gemm::with_pins(&gpu, Vec::new()).unwrap().with_tuning(true);
    let cases: Vec<Case> = accumulation_cases().into_iter().chain(model_cases()).collect();
    run_all(test, &gpu, &tuned, &cases);
    run_all(&format!("{test} (second calls)"), &gpu, &tuned, &cases);
    let report = tuned.tuning_report();
    eprintln!("{test}: tuned {} configurations:\n{}", report.len(), report.join("\n"));
    assert!(!report.is_empty(), "no configuration had two candidates to time");
    assert!(report.len() <= tuned.cached_algorithms(), "a configuration was tuned twice: {report:#?}");
}

/// `C = A B^T` (A `[m, k]`, B `[n, k]`, fresh random bf16) on the device, with its f64 truth and
/// bf16-rounded f32 baseline.
struct TnCase {
    a_d: DeviceBuffer<bf16>,
    b_d: DeviceBuffer<bf16>,
    truth: Vec<f64>,
    base: Vec<f32>,
}

fn tn_case(gpu: &Gpu, test: &str, m: usize, n: usize, k: usize) -> TnCase {
    let mut rng = testing::rng(test);
    let a = testing::uniform_bf16(&mut rng, m * k, 0.5);
    let b = testing::uniform_bf16(&mut rng, n * k, 0.5);
    let truth = product64(m, n, k, &a, &materialise(&b, k, n, true));
    let mut base = vec![0.0; m * n];
    sgemm(m, n, k, 1.0, &a, &b, true, 0.0, &mut base);
    TnCase {
        a_d: gpu.upload_bf16(&a).unwrap(),
        b_d: gpu.upload_bf16(&b).unwrap(),
        truth,
        base: rounded(base, DType::Bf16),
    }
}

/// The pin tests' case: a 320 x 192 x 264 TN product on `gpu`, the heuristic's proposals for it
/// as `gemm.time_candidates` timed them (two at most), and an output buffer.
fn pin_case(gpu: &Gpu, gemm: &Gemm, test: &str) -> ((usize, usize, usize), TnCase, Vec<Candidate>, DeviceBuffer<bf16>) {
    let (m, n, k) = (320, 192, 264);
    let case = tn_case(gpu, test, m, n, k);
    let mut c = gpu.alloc::<bf16>(m * n).unwrap();
    let ranks = gemm
        .time_candidates(gpu, 2, 1, || {
            gemm.matmul(m, n, k, &case.a_d, false, &case.b_d, true, &mut c, 1.0, 0.0, Epilogue::None)
        })
        .unwrap();
    if ranks.len() == 1 {
        eprintln!("{test}: cuBLASLt proposes one algorithm for {m} x {n} x {k}: every pin selects the default");
    }
    ((m, n, k), case, ranks, c)
}

/// Every algorithm `Gemm::time_candidates` runs computes the product (each run checked against
/// the host, into a poisoned output), rank 0 first; the candidates' calls leave the algorithm
/// cache alone, and the calls after it are back on the cached default.
#[test]
fn every_heuristic_candidate_computes_the_product() {
    let test = "every_heuristic_candidate_computes_the_product";
    let Some((gpu, gemm)) = setup(test) else { return };
    let (m, n, k) = (384, 256, 520);
    let TnCase { a_d, b_d, truth, base } = tn_case(&gpu, test, m, n, k);
    let mut c = gpu.alloc::<bf16>(m * n).unwrap();
    let cached = gemm.cached_algorithms();
    let mut runs = 0;
    let ranks = gemm
        .time_candidates(&gpu, 4, 1, || {
            c.poison()?;
            gemm.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None)?;
            let got = c.to_host_f32()?;
            assert_within_baseline(&format!("{test} run {runs}"), &got, &base, &truth, 2.0, 1e-4);
            runs += 1;
            Ok(())
        })
        .unwrap();
    eprintln!("{test}: {} candidates, median ms {ranks:?}", ranks.len());
    assert!(!ranks.is_empty(), "the heuristic proposed no algorithm");
    assert_eq!(ranks.iter().map(|r| r.rank).collect::<Vec<_>>(), (0..ranks.len()).collect::<Vec<_>>());
    // Every candidate's configuration was read, and no two candidates share one: what makes a
    // pin by configuration (MAPET_GEMM_PIN=MxNxK=@CONFIG) name one of them.
    let configs: Vec<AlgoConfig> =
        ranks.iter().map(|r| r.config.unwrap_or_else(|| panic!("candidate #{}: no configuration", r.rank))).collect();
    for (i, c) in configs.iter().enumerate() {
        if let Some(j) = configs[..i].iter().position(|x| x == c) {
            panic!("candidates #{j} and #{i} have the same configuration {c}");
        }
    }
    assert_eq!(runs, 3 * ranks.len(), "2 warm-ups and 1 timed run a rank");
    assert_eq!(gemm.cached_algorithms(), cached, "a candidate's call cached an algorithm");
    c.poison().unwrap();
    gemm.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None).unwrap();
    assert_eq!(gemm.cached_algorithms(), cached + 1, "the call after the candidates is not the cached default");
    assert_within_baseline(test, &c.to_host_f32().unwrap(), &base, &truth, 2.0, 1e-4);
}

/// A GEMM size pinned to another candidate (`Gemm::with_pins`, as `MAPET_GEMM_PIN` sets) computes
/// the product and is cached like any other; a pin to a rank the heuristic does not have fails the
/// call, naming the variable. (Which algorithm ran is not observable from here: that the pin
/// selects its rank rests on `proposal`, the code `time_candidates` runs too.)
#[test]
fn pinned_sizes_run_their_candidate() {
    let test = "pinned_sizes_run_their_candidate";
    let Some((gpu, gemm)) = setup(test) else { return };
    let ((m, n, k), TnCase { a_d, b_d, truth, base }, ranks, mut c) = pin_case(&gpu, &gemm, test);
    // The second candidate where there is one: then its configuration is not the default's
    // (every_heuristic_candidate_computes_the_product), so the pins below are seen to select it.
    let rank = ranks.len() - 1;
    let config = ranks[rank].config.expect("the candidate's configuration");
    let pinned =
        Gemm::with_pins(&gpu, vec![((m, n, k), PinChoice::Rank(rank)), ((m + 1, n, k), PinChoice::Rank(0))]).unwrap();
    c.poison().unwrap();
    pinned.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None).unwrap();
    assert_within_baseline(&format!("{test} rank {rank}"), &c.to_host_f32().unwrap(), &base, &truth, 2.0, 1e-4);
    assert_eq!(pinned.cached_algorithms(), 1, "a pinned size is cached like any other");
    // What ran is the candidate of that rank: its configuration is the one cached.
    assert_eq!(pinned.config_pins(), vec![((m, n, k), PinChoice::Config(config))], "{:?}", pinned.algorithm_report());

    // The same candidate pinned by its configuration, and that pin read back from the cache.
    let by_config = Gemm::with_pins(&gpu, vec![((m, n, k), PinChoice::Config(config))]).unwrap();
    c.poison().unwrap();
    by_config.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None).unwrap();
    assert_within_baseline(&format!("{test} @{config}"), &c.to_host_f32().unwrap(), &base, &truth, 2.0, 1e-4);
    assert_eq!(by_config.config_pins(), vec![((m, n, k), PinChoice::Config(config))]);
    let report = by_config.algorithm_report();
    assert!(report.len() == 1 && report[0].starts_with(&format!("{m}x{n}x{k}=@{config}: ")), "{report:?}");

    let absent = Gemm::with_pins(&gpu, vec![((m, n, k), PinChoice::Rank(MAX_CANDIDATES - 1))]).unwrap();
    match absent.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None) {
        Err(e) => assert!(e.to_string().contains(PIN_VAR), "{e}"),
        // The heuristic may propose that many; then the call ran it.
        Ok(()) => assert_within_baseline(test, &c.to_host_f32().unwrap(), &base, &truth, 2.0, 1e-4),
    }
    // A configuration no algorithm has (algorithm id -1): the call fails, naming the variable and
    // the pinned configuration, and writes nothing.
    let mut nowhere = config;
    nowhere.0[0] = -1;
    let unknown = Gemm::with_pins(&gpu, vec![((m, n, k), PinChoice::Config(nowhere))]).unwrap();
    c.poison().unwrap();
    let err =
        unknown.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None).unwrap_err().to_string();
    assert!(err.contains(PIN_VAR) && err.contains(&nowhere.to_string()), "{err}");
    assert!(c.to_host_f32().unwrap().iter().all(|v| v.is_nan()), "a failed pinned call wrote its output");
}

/// A default pin (`Gemm::with_default_pins`, what `Gemm::new` takes from `DEFAULT_PINS` for the
/// device) runs its configuration where the heuristic proposes it; where it does not (another
/// cuBLASLt version), the size runs the heuristic's first proposal, with no error; and a pin of
/// the size's own (`MAPET_GEMM_PIN`) comes before it.
#[test]
fn default_pins_run_their_configuration_or_the_heuristics_first() {
    let test = "default_pins_run_their_configuration_or_the_heuristics_first";
    let Some((gpu, gemm)) = setup(test) else { return };
    let (size, TnCase { a_d, b_d, truth, base }, ranks, mut c) = pin_case(&gpu, &gemm, test);
    let (m, n, k) = size;
    let first = ranks[0].config.expect("the first candidate's configuration");
    let mut nowhere = first;
    nowhere.0[0] = -1;
    let mut cases = vec![("a default pin no proposal has", vec![], vec![(size, PinChoice::Config(nowhere))], first)];
    // Where the heuristic proposes another configuration, a default pin is seen to select it (and
    // the variable's pin to come first); else there is nothing to tell them apart by.
    match ranks.iter().filter_map(|r| r.config).find(|&c| c != first) {
        Some(other) => cases.extend([
            ("a default pin", vec![], vec![(size, PinChoice::Config(other))], other),
            (
                "a pin over a default pin",
                vec![(size, PinChoice::Config(first))],
                vec![(size, PinChoice::Config(other))],
                first,
            ),
        ]),
        None => eprintln!("{test}: no second configuration: only the fallback is checked"),
    }
    for (what, pins, defaults, runs) in cases {
        let g = Gemm::with_pins(&gpu, pins).unwrap().with_default_pins(defaults);
        c.poison().unwrap();
        g.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None).unwrap();
        assert_within_baseline(&format!("{test}: {what}"), &c.to_host_f32().unwrap(), &base, &truth, 2.0, 1e-4);
        assert_eq!(g.config_pins(), vec![(size, PinChoice::Config(runs))], "{what}: {:?}", g.algorithm_report());
    }
    // Tuning (MAPET_GEMM_TUNE) comes before a default pin: the size is tuned.
    let tuned = Gemm::with_pins(&gpu, Vec::new()).unwrap().with_default_pins(vec![(size, PinChoice::Config(first))]);
    let tuned = tuned.with_tuning(true);
    c.poison().unwrap();
    tuned.matmul(m, n, k, &a_d, false, &b_d, true, &mut c, 1.0, 0.0, Epilogue::None).unwrap();
    assert_within_baseline(&format!("{test}: tuned"), &c.to_host_f32().unwrap(), &base, &truth, 2.0, 1e-4);
    assert_eq!(tuned.tuning_report().len(), 1, "a default pin kept the size from being tuned");
}

#[test]
fn strided_batched() {
    let Some((gpu, gemm)) = setup("strided_batched") else { return };
    let mut rng = testing::rng("strided_batched");
    let (batch, m, n, k) = (3, 147, 64, 64);
    for (a_t, b_t) in TRANSPOSES {
        let a = testing::uniform_bf16(&mut rng, batch * m * k, 0.5);
        let b = testing::uniform_bf16(&mut rng, batch * k * n, 0.5);
        let a_d = gpu.upload_bf16(&a).unwrap();
        let b_d = gpu.upload_bf16(&b).unwrap();
        let mut c_d = gpu.alloc::<bf16>(batch * m * n).unwrap();
        c_d.poison().unwrap();
        gemm.matmul_strided_batched(batch, m, n, k, &a_d, a_t, &b_d, b_t, &mut c_d, 1.0, 0.0).unwrap();
        let got = c_d.to_host_f32().unwrap();
        let mut truth = Vec::new();
        let mut base = Vec::new();
        for i in 0..batch {
            let op_a = materialise(&a[i * m * k..(i + 1) * m * k], m, k, a_t);
            let op_b = materialise(&b[i * k * n..(i + 1) * k * n], k, n, b_t);
            truth.extend(product64(m, n, k, &op_a, &op_b));
            let mut c = vec![0.0; m * n];
            sgemm(m, n, k, 1.0, &op_a, &op_b, false, 0.0, &mut c);
            base.extend(rounded(c, DType::Bf16));
        }
        assert_within_baseline(&format!("batched A{a_t} B{b_t}"), &got, &base, &truth, 2.0, 1e-4);
    }
}

#[test]
fn device_calls_refuse_bad_shapes_before_launching() {
    let Some((gpu, gemm)) = setup("device_calls_refuse_bad_shapes_before_launching") else { return };
    let (m, n, k) = (16, 32, 8);
    let a = gpu.upload_bf16(&vec![1.0; m * k]).unwrap();
    let a_short = gpu.upload_bf16(&vec![1.0; m * k - 1]).unwrap();
    let b = gpu.upload_bf16(&vec![1.0; k * n]).unwrap();
    let mut c = gpu.alloc::<bf16>(m * n).unwrap();
    let mut c_f32 = gpu.alloc::<f32>(m * n).unwrap();
    let bias_short = gpu.upload_bf16(&vec![1.0; n - 1]).unwrap();
    let mut aux_short = gpu.alloc::<bf16>(m * n - 1).unwrap();
    let bias = gpu.upload_bf16(&vec![1.0; n]).unwrap();
    let tensor = |r: mapet::Result<()>| match r {
        Err(Error::Shape { tensor, .. }) => tensor,
        other => panic!("expected a shape error, got {other:?}"),
    };
    assert_eq!(tensor(gemm.matmul(m, n, k, &a_short, false, &b, false, &mut c, 1.0, 0.0, Epilogue::None)), "a");
    assert_eq!(tensor(gemm.matmul(m, n, k, &a, false, &a, false, &mut c, 1.0, 0.0, Epilogue::None)), "b");
    assert_eq!(
        tensor(gemm.matmul(
            m,
            n,
            k,
            &a,
            false,
            &b,
            false,
            &mut c,
            1.0,
            0.0,
            Epilogue::Bias { bias: (&bias_short).into() }
        )),
        "bias"
    );
    assert_eq!(
        tensor(gemm.matmul(
            m,
            n,
            k,
            &a,
            false,
            &b,
            false,
            &mut c,
            1.0,
            0.0,
            Epilogue::BiasGelu { bias: (&bias).into(), aux: &mut aux_short }
        )),
        "aux"
    );
    let r = gemm.matmul_f32_out(m, n, k, &a, false, &b, false, &mut c_f32, 1.0, 0.0, Epilogue::DGelu { aux: &c });
    assert!(is_unsupported(&r), "{r:?}");
    let bias_f32 = gpu.upload(&vec![1.0f32; n]).unwrap();
    let r = gemm.matmul(m, n, k, &a, false, &b, false, &mut c, 1.0, 0.0, Epilogue::Bias { bias: (&bias_f32).into() });
    assert!(is_unsupported(&r), "{r:?}");
    // Nothing was enqueued: the stream is still healthy and a good call works.
    gemm.matmul(m, n, k, &a, false, &b, false, &mut c, 1.0, 0.0, Epilogue::None).unwrap();
    let got = c.to_host_f32().unwrap();
    assert!(got.iter().all(|&v| v == k as f32), "all-ones product should be {k}");
}
