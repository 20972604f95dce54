//! LayerNorm: the CPU reference against a naive f64 formula and finite differences, and the
//! kernels against the CPU reference under the DESIGN.md tolerance rule.

use mapet::cpu::round_bf16;
use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::ops::layernorm;
use mapet::testing::{assert_all_written, assert_within_baseline, gpu_or_skip, rng, uniform};
use mapet::Error;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EPS: f32 = 1e-6;

/// Rows with their own offset and spread, so that the mean matters and rows differ.
fn rows_input(rng: &mut impl Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let offset = rng.random_range(-3.0f32..3.0);
        let scale = rng.random_range(0.3f32..2.0);
        x.extend(uniform(rng, cols, 1.0).into_iter().map(|u| offset + scale * u));
    }
    x
}

fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    let mut r = v.to_vec();
    round_bf16(&mut r);
    r
}

struct Naive {
    y: Vec<f64>,
    mean: Vec<f64>,
    rstd: Vec<f64>,
}

/// The textbook formula in f64.
fn naive_forward(x: &[f32], w: &[f32], b: &[f32], eps: f32, rows: usize, cols: usize) -> Naive {
    let mut out = Naive { y: vec![0.0; rows * cols], mean: vec![0.0; rows], rstd: vec![0.0; rows] };
    for r in 0..rows {
        let xr: Vec<f64> = x[r * cols..(r + 1) * cols].iter().map(|&v| v as f64).collect();
        let mean = xr.iter().sum::<f64>() / cols as f64;
        let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for c in 0..cols {
            out.y[r * cols + c] = (xr[c] - mean) * rstd * w[c] as f64 + b[c] as f64;
        }
        out.mean[r] = mean;
        out.rstd[r] = rstd;
    }
    out
}

struct NaiveGrad {
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

/// dx, dweight, dbias in f64 from the given statistics, added to the given initial values.
#[allow(clippy::too_many_arguments)]
fn naive_backward(
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    cols: usize,
    dx0: Option<&[f32]>,
    dw0: &[f32],
    db0: &[f32],
) -> NaiveGrad {
    let mut g = NaiveGrad {
        dx: vec![0.0; rows * cols],
        dw: dw0.iter().map(|&v| v as f64).collect(),
        db: db0.iter().map(|&v| v as f64).collect(),
    };
    for r in 0..rows {
        let (mu, rs) = (mean[r] as f64, rstd[r] as f64);
        let xh: Vec<f64> = (0..cols).map(|c| (x[r * cols + c] as f64 - mu) * rs).collect();
        let gy: Vec<f64> = (0..cols).map(|c| dy[r * cols + c] as f64 * w[c] as f64).collect();
        let m1 = gy.iter().sum::<f64>() / cols as f64;
        let m2 = gy.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
        for c in 0..cols {
            let i = r * cols + c;
            g.dx[i] = rs * (gy[c] - m1 - xh[c] * m2) + dx0.map_or(0.0, |d| d[i] as f64);
            g.dw[c] += dy[i] as f64 * xh[c];
            g.db[c] += dy[i] as f64;
        }
    }
    g
}

fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = abs + rel * w.abs();
        assert!((g as f64 - w).abs() <= tol, "{what}[{i}]: got {g}, want {w} (tolerance {tol:.2e})");
    }
}

struct Cpu {
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

fn cpu_fwd(x: &[f32], w: &[f32], b: &[f32], rows: usize, cols: usize) -> Cpu {
    let mut o = Cpu { y: vec![f32::NAN; rows * cols], mean: vec![f32::NAN; rows], rstd: vec![f32::NAN; rows] };
    layernorm::cpu_forward(x, w, b, EPS, rows, cols, &mut o.y, &mut o.mean, &mut o.rstd).unwrap();
    o
}

// ------------------------------------------------------------------------------ CPU reference

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn cpu_forward_matches_naive(rows in 1usize..7, cols in 1usize..100, seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = rows_input(&mut rng, rows, cols);
        let w = uniform(&mut rng, cols, 1.5);
        let b = uniform(&mut rng, cols, 1.0);
        let o = cpu_fwd(&x, &w, &b, rows, cols);
        let n = naive_forward(&x, &w, &b, EPS, rows, cols);
        assert_close("y", &o.y, &n.y, 1e-4, 1e-4);
        assert_close("mean", &o.mean, &n.mean, 1e-5, 1e-5);
        assert_close("rstd", &o.rstd, &n.rstd, 1e-4, 0.0);
    }

    #[test]
    fn cpu_residual_forward_matches_naive(rows in 1usize..7, cols in 1usize..100, seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let res = rows_input(&mut rng, rows, cols);
        let x = uniform(&mut rng, rows * cols, 1.0);
        let w = uniform(&mut rng, cols, 1.5);
        let b = uniform(&mut rng, cols, 1.0);
        let nn = rows * cols;
        let (mut h, mut y, mut mean, mut rstd) = (vec![0.0; nn], vec![0.0; nn], vec![0.0; rows], vec![0.0; rows]);
        layernorm::cpu_residual_forward(&res, &x, &w, &b, EPS, rows, cols, &mut h, &mut y, &mut mean, &mut rstd)
            .unwrap();
        let h_true: Vec<f64> = res.iter().zip(&x).map(|(&a, &b)| a as f64 + b as f64).collect();
        assert_close("h", &h, &h_true, 1e-6, 1e-6);
        let h32: Vec<f32> = h_true.iter().map(|&v| v as f32).collect();
        let n = naive_forward(&h32, &w, &b, EPS, rows, cols);
        assert_close("y", &y, &n.y, 1e-4, 1e-4);
        assert_close("mean", &mean, &n.mean, 1e-5, 1e-5);
        assert_close("rstd", &rstd, &n.rstd, 1e-4, 0.0);
    }

    #[test]
    fn cpu_backward_matches_naive(
        rows in 1usize..7, cols in 1usize..100, accumulate in any::<bool>(), seed in any::<u64>()
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = rows_input(&mut rng, rows, cols);
        let w = uniform(&mut rng, cols, 1.5);
        let b = uniform(&mut rng, cols, 1.0);
        let dy = uniform(&mut rng, rows * cols, 1.0);
        let o = cpu_fwd(&x, &w, &b, rows, cols);
        let mut dx = uniform(&mut rng, rows * cols, 1.0);
        let dx0 = dx.clone();
        let mut dw = uniform(&mut rng, cols, 1.0);
        let mut db = uniform(&mut rng, cols, 1.0);
        let want = naive_backward(&x, &dy, &w, &o.mean, &o.rstd, rows, cols, accumulate.then_some(&dx0[..]), &dw, &db);
        layernorm::cpu_backward(&x, &dy, &w, &o.mean, &o.rstd, rows, cols, &mut dx, accumulate, &mut dw, &mut db)
            .unwrap();
        // rstd reaches 1/sqrt(eps) = 1000 for cols = 1, hence the absolute part scaled by it.
        let scale = o.rstd.iter().fold(1.0f32, |a, &b| a.max(b)) as f64;
        assert_close("dx", &dx, &want.dx, 1e-4, 1e-5 * scale);
        assert_close("dweight", &dw, &want.dw, 1e-4, 1e-4);
        assert_close("dbias", &db, &want.db, 1e-4, 1e-4);
    }
}

/// L = sum(y * g) for fixed g, in f64 over the f32 outputs of the CPU forward.
fn loss(x: &[f32], w: &[f32], b: &[f32], g: &[f32], rows: usize, cols: usize) -> f64 {
    let o = cpu_fwd(x, w, b, rows, cols);
    o.y.iter().zip(g).map(|(&y, &g)| y as f64 * g as f64).sum()
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let mut rng = rng("cpu_backward_matches_finite_differences");
    for (rows, cols) in [(3, 11), (2, 32), (1, 5)] {
        let x = rows_input(&mut rng, rows, cols);
        let w = uniform(&mut rng, cols, 1.5);
        let b = uniform(&mut rng, cols, 1.0);
        let g = uniform(&mut rng, rows * cols, 1.0);
        let o = cpu_fwd(&x, &w, &b, rows, cols);
        let mut dx = vec![0.0; rows * cols];
        let (mut dw, mut db) = (vec![0.0; cols], vec![0.0; cols]);
        layernorm::cpu_backward(&x, &g, &w, &o.mean, &o.rstd, rows, cols, &mut dx, false, &mut dw, &mut db).unwrap();

        let h = 3e-3f32;
        let numeric = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| -> f64 {
            let (mut p, mut m) = (v.to_vec(), v.to_vec());
            p[i] += h;
            m[i] -= h;
            (f(&p) - f(&m)) / (p[i] as f64 - m[i] as f64)
        };
        let check = |what: &str, i: usize, analytic: f32, num: f64| {
            let tol = 3e-3 + 1e-2 * num.abs();
            assert!(
                (analytic as f64 - num).abs() <= tol,
                "{what}[{i}] ({rows}x{cols}): analytic {analytic}, finite difference {num}"
            );
        };
        for (i, &d) in dx.iter().enumerate() {
            check("dx", i, d, numeric(&x, i, &|xp| loss(xp, &w, &b, &g, rows, cols)));
        }
        for c in 0..cols {
            check("dweight", c, dw[c], numeric(&w, c, &|wp| loss(&x, wp, &b, &g, rows, cols)));
            check("dbias", c, db[c], numeric(&b, c, &|bp| loss(&x, &w, bp, &g, rows, cols)));
        }
    }
}

fn expect_shape(result: mapet::Result<()>, tensor: &str) {
    match result {
        Err(Error::Shape { tensor: t, .. }) if t == tensor => {}
        other => panic!("expected a shape error naming `{tensor}`, got {other:?}"),
    }
}

#[test]
fn cpu_rejects_wrong_lengths() {
    let (rows, cols) = (3, 8);
    let n = rows * cols;
    let ok = vec![0.5f32; n];
    let col = vec![1.0f32; cols];
    let row = vec![1.0f32; rows];
    let short = vec![0.5f32; n - 1];
    let (mut y, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    expect_shape(layernorm::cpu_forward(&short, &col, &col, EPS, rows, cols, &mut y, &mut mean, &mut rstd), "x");
    expect_shape(layernorm::cpu_forward(&ok, &row, &col, EPS, rows, cols, &mut y, &mut mean, &mut rstd), "weight");
    expect_shape(layernorm::cpu_forward(&ok, &col, &row, EPS, rows, cols, &mut y, &mut mean, &mut rstd), "bias");
    let mut y_short = short.clone();
    expect_shape(layernorm::cpu_forward(&ok, &col, &col, EPS, rows, cols, &mut y_short, &mut mean, &mut rstd), "y");
    let mut m_bad = vec![0.0; rows + 1];
    expect_shape(layernorm::cpu_forward(&ok, &col, &col, EPS, rows, cols, &mut y, &mut m_bad, &mut rstd), "mean");
    expect_shape(layernorm::cpu_forward(&ok, &col, &col, EPS, rows, cols, &mut y, &mut mean, &mut m_bad), "rstd");

    let mut h = vec![0.0; n];
    expect_shape(
        layernorm::cpu_residual_forward(&short, &ok, &col, &col, EPS, rows, cols, &mut h, &mut y, &mut mean, &mut rstd),
        "residual",
    );
    expect_shape(
        layernorm::cpu_residual_forward(
            &ok,
            &ok,
            &col,
            &col,
            EPS,
            rows,
            cols,
            &mut y_short,
            &mut y,
            &mut mean,
            &mut rstd,
        ),
        "h",
    );

    let (mut dx, mut dw, mut db) = (vec![0.0; n], vec![0.0; cols], vec![0.0; cols]);
    expect_shape(
        layernorm::cpu_backward(&ok, &short, &col, &row, &row, rows, cols, &mut dx, false, &mut dw, &mut db),
        "dy",
    );
    let mut dw_bad = vec![0.0; cols - 1];
    expect_shape(
        layernorm::cpu_backward(&ok, &ok, &col, &row, &row, rows, cols, &mut dx, false, &mut dw_bad, &mut db),
        "dweight",
    );
    expect_shape(
        layernorm::cpu_backward(&ok, &ok, &col, &row, &row, rows, cols, &mut dx, false, &mut dw, &mut dw_bad),
        "dbias",
    );
    assert!(matches!(
        layernorm::cpu_forward(&[], &[], &[], EPS, rows, 0, &mut [], &mut mean, &mut rstd),
        Err(Error::Unsupported { .. })
    ));
}

// ------------------------------------------------------------------------------------- GPU

/// Widths that take every kernel: vector kernels with 1..4 vectors per lane (some lanes idle at
/// 192 and 264), and the generic one (37, 1, and wider than 1024).
const SHAPES: &[(usize, usize)] = &[
    (1, 768),
    (37, 768),
    (300, 384),
    (129, 192),
    (64, 37),
    (5, 8),
    (33, 264),
    (17, 1000),
    (9, 1032),
    (7, 2056),
    (3, 1),
    (4000, 768),
    (1500, 37),
];

fn upload_bf16(gpu: &Gpu, v: &[f32]) -> DeviceBuffer<half::bf16> {
    gpu.upload_bf16(v).unwrap()
}

#[test]
fn gpu_forward_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_forward_matches_cpu") else { return };
    let mut rng = rng("gpu_forward_matches_cpu");
    for &(rows, cols) in SHAPES {
        eprintln!("-- {rows} x {cols}");
        let x = bf16_rounded(&rows_input(&mut rng, rows, cols));
        let w = uniform(&mut rng, cols, 1.5);
        let b = uniform(&mut rng, cols, 1.0);
        let truth = naive_forward(&x, &w, &b, EPS, rows, cols);
        let base = cpu_fwd(&x, &w, &b, rows, cols);

        let dx = upload_bf16(&gpu, &x);
        let (dw, db) = (gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());
        let mut y = gpu.alloc(rows * cols).unwrap();
        let (mut mean, mut rstd) = (gpu.alloc(rows).unwrap(), gpu.alloc(rows).unwrap());
        y.poison().unwrap();
        mean.poison().unwrap();
        rstd.poison().unwrap();
        layernorm::cuda_forward(&gpu, &dx, &dw, &db, EPS, rows, cols, &mut y, &mut mean, &mut rstd).unwrap();

        assert_within_baseline("y", &y.to_host_f32().unwrap(), &bf16_rounded(&base.y), &truth.y, 2.0, 1e-5);
        assert_within_baseline("mean", &mean.to_host().unwrap(), &base.mean, &truth.mean, 2.0, 1e-6);
        assert_within_baseline("rstd", &rstd.to_host().unwrap(), &base.rstd, &truth.rstd, 2.0, 1e-6);
    }
}

#[test]
fn gpu_residual_forward_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_residual_forward_matches_cpu") else { return };
    let mut rng = rng("gpu_residual_forward_matches_cpu");
    for &(rows, cols) in SHAPES {
        eprintln!("-- {rows} x {cols}");
        let res = bf16_rounded(&rows_input(&mut rng, rows, cols));
        let x = bf16_rounded(&uniform(&mut rng, rows * cols, 1.0));
        let w = uniform(&mut rng, cols, 1.5);
        let b = uniform(&mut rng, cols, 1.0);
        // Truth: the exact sum; baseline: h rounded to bf16 as the kernel writes it, then LN in f32.
        let h_true: Vec<f64> = res.iter().zip(&x).map(|(&a, &b)| a as f64 + b as f64).collect();
        let h_f32: Vec<f32> = h_true.iter().map(|&v| v as f32).collect();
        // h_f32 is the exact sum up to an f32 rounding, far below the bf16 roundings compared here.
        let truth = naive_forward(&h_f32, &w, &b, EPS, rows, cols);
        let h_base = bf16_rounded(&h_f32);
        let base = cpu_fwd(&h_base, &w, &b, rows, cols);

        let (dres, dxx) = (upload_bf16(&gpu, &res), upload_bf16(&gpu, &x));
        let (dw, db) = (gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());
        let (mut h, mut y) = (gpu.alloc(rows * cols).unwrap(), gpu.alloc(rows * cols).unwrap());
        let (mut mean, mut rstd) = (gpu.alloc(rows).unwrap(), gpu.alloc(rows).unwrap());
        for buf in [&mut h, &mut y] {
            buf.poison().unwrap();
        }
        mean.poison().unwrap();
        rstd.poison().unwrap();
        layernorm::cuda_residual_forward(
            &gpu, &dres, &dxx, &dw, &db, EPS, rows, cols, &mut h, &mut y, &mut mean, &mut rstd,
        )
        .unwrap();

        assert_within_baseline("h", &h.to_host_f32().unwrap(), &h_base, &h_true, 2.0, 1e-6);
        assert_within_baseline("y", &y.to_host_f32().unwrap(), &bf16_rounded(&base.y), &truth.y, 2.0, 1e-5);
        assert_within_baseline("mean", &mean.to_host().unwrap(), &base.mean, &truth.mean, 2.0, 1e-6);
        assert_within_baseline("rstd", &rstd.to_host().unwrap(), &base.rstd, &truth.rstd, 2.0, 1e-6);
    }
}

struct BwdCase {
    rows: usize,
    cols: usize,
    x: Vec<f32>,
    dy: Vec<f32>,
    w: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    dx0: Vec<f32>,
    dw0: Vec<f32>,
    db0: Vec<f32>,
}

fn bwd_case(rng: &mut impl Rng, rows: usize, cols: usize) -> BwdCase {
    let x = bf16_rounded(&rows_input(rng, rows, cols));
    let w = uniform(rng, cols, 1.5);
    let b = uniform(rng, cols, 1.0);
    let o = cpu_fwd(&x, &w, &b, rows, cols);
    BwdCase {
        rows,
        cols,
        dy: bf16_rounded(&uniform(rng, rows * cols, 1.0)),
        dx0: bf16_rounded(&uniform(rng, rows * cols, 1.0)),
        dw0: uniform(rng, cols, 1.0),
        db0: uniform(rng, cols, 1.0),
        x,
        w,
        mean: o.mean,
        rstd: o.rstd,
    }
}

struct GpuGrads {
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

fn gpu_backward(gpu: &Gpu, c: &BwdCase, accumulate: bool) -> GpuGrads {
    let (x, dy) = (upload_bf16(gpu, &c.x), upload_bf16(gpu, &c.dy));
    let w = gpu.upload(&c.w).unwrap();
    let (mean, rstd) = (gpu.upload(&c.mean).unwrap(), gpu.upload(&c.rstd).unwrap());
    let mut dx = upload_bf16(gpu, &c.dx0);
    if !accumulate {
        dx.poison().unwrap();
    }
    let (mut dw, mut db) = (gpu.upload(&c.dw0).unwrap(), gpu.upload(&c.db0).unwrap());
    layernorm::cuda_backward(gpu, &x, &dy, &w, &mean, &rstd, c.rows, c.cols, &mut dx, accumulate, &mut dw, &mut db)
        .unwrap();
    GpuGrads { dx: dx.to_host_f32().unwrap(), dw: dw.to_host().unwrap(), db: db.to_host().unwrap() }
}

#[test]
fn gpu_backward_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_backward_matches_cpu") else { return };
    let mut rng = rng("gpu_backward_matches_cpu");
    for &(rows, cols) in SHAPES {
        for accumulate in [false, true] {
            eprintln!("-- {rows} x {cols}, accumulate {accumulate}");
            let c = bwd_case(&mut rng, rows, cols);
            let dx0 = accumulate.then_some(&c.dx0[..]);
            let truth = naive_backward(&c.x, &c.dy, &c.w, &c.mean, &c.rstd, rows, cols, dx0, &c.dw0, &c.db0);
            let mut bdx = c.dx0.clone();
            let (mut bdw, mut bdb) = (c.dw0.clone(), c.db0.clone());
            layernorm::cpu_backward(
                &c.x, &c.dy, &c.w, &c.mean, &c.rstd, rows, cols, &mut bdx, accumulate, &mut bdw, &mut bdb,
            )
            .unwrap();
            let g = gpu_backward(&gpu, &c, accumulate);
            assert_within_baseline("dx", &g.dx, &bf16_rounded(&bdx), &truth.dx, 3.0, 1e-5);
            assert_within_baseline("dweight", &g.dw, &bdw, &truth.dw, 3.0, 1e-6);
            assert_within_baseline("dbias", &g.db, &bdb, &truth.db, 3.0, 1e-6);
        }
    }
}

#[test]
fn gpu_backward_is_deterministic() {
    let Some(gpu) = gpu_or_skip("gpu_backward_is_deterministic") else { return };
    let mut rng = rng("gpu_backward_is_deterministic");
    for (rows, cols) in [(6000, 768), (2000, 384), (700, 37)] {
        let c = bwd_case(&mut rng, rows, cols);
        let a = gpu_backward(&gpu, &c, true);
        let b = gpu_backward(&gpu, &c, true);
        assert_all_written("dx", &a.dx);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.dw), bits(&b.dw), "dweight differs between runs ({rows} x {cols})");
        assert_eq!(bits(&a.db), bits(&b.db), "dbias differs between runs ({rows} x {cols})");
        assert_eq!(bits(&a.dx), bits(&b.dx), "dx differs between runs ({rows} x {cols})");
        // The initial values were added to, not overwritten.
        assert!(a.db.iter().zip(&c.db0).any(|(x, y)| x != y));
    }
}

#[test]
fn gpu_rejects_wrong_lengths() {
    let Some(gpu) = gpu_or_skip("gpu_rejects_wrong_lengths") else { return };
    let (rows, cols) = (4, 16);
    let n = rows * cols;
    let x = gpu.upload_bf16(&vec![0.5; n]).unwrap();
    let short = gpu.upload_bf16(&vec![0.5; n - 1]).unwrap();
    let w = gpu.upload(&vec![1.0f32; cols]).unwrap();
    let w_short = gpu.upload(&vec![1.0f32; cols - 1]).unwrap();
    let mut y = gpu.alloc(n).unwrap();
    let mut y_short = gpu.alloc(n - 1).unwrap();
    let (mut mean, mut rstd) = (gpu.alloc(rows).unwrap(), gpu.alloc(rows).unwrap());
    let mut m_short = gpu.alloc(rows - 1).unwrap();
    expect_shape(layernorm::cuda_forward(&gpu, &short, &w, &w, EPS, rows, cols, &mut y, &mut mean, &mut rstd), "x");
    expect_shape(
        layernorm::cuda_forward(&gpu, &x, &w_short, &w, EPS, rows, cols, &mut y, &mut mean, &mut rstd),
        "weight",
    );
    expect_shape(layernorm::cuda_forward(&gpu, &x, &w, &w, EPS, rows, cols, &mut y_short, &mut mean, &mut rstd), "y");
    expect_shape(layernorm::cuda_forward(&gpu, &x, &w, &w, EPS, rows, cols, &mut y, &mut m_short, &mut rstd), "mean");
    let mut h = gpu.alloc(n).unwrap();
    expect_shape(
        layernorm::cuda_residual_forward(
            &gpu, &x, &short, &w, &w, EPS, rows, cols, &mut h, &mut y, &mut mean, &mut rstd,
        ),
        "x",
    );
    let (mut dw, mut db) = (gpu.alloc(cols).unwrap(), gpu.alloc(cols).unwrap());
    let mut dw_short = gpu.alloc(cols - 1).unwrap();
    expect_shape(
        layernorm::cuda_backward(&gpu, &x, &short, &w, &mean, &rstd, rows, cols, &mut y, false, &mut dw, &mut db),
        "dy",
    );
    expect_shape(
        layernorm::cuda_backward(&gpu, &x, &x, &w, &mean, &rstd, rows, cols, &mut y, false, &mut dw, &mut dw_short),
        "dbias",
    );
}
