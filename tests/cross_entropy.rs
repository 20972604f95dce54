//! Codebook cross-entropy (decoder head + loss): the CPU reference against a naive f64 softmax
//! cross-entropy (proptest over rows, dim, vocab, chunking), its gradients against finite
//! differences, and the GPU path against the CPU under DESIGN.md's tolerance rule (skipped
//! without a GPU; `MAPET_REQUIRE_GPU=1` makes a missing GPU a failure).

#![allow(clippy::needless_range_loop)] // index loops read closest to the formulas here

use half::bf16;
use mapet::cuda::gemm::Gemm;
use mapet::cuda::Gpu;
use mapet::ops::cross_entropy::{
    cpu_backward, cpu_backward_with, cpu_forward, cpu_forward_with, cuda_forward, cuda_forward_backward,
    cuda_forward_backward_queued, cuda_forward_queued, CpuPrecision, CpuRowOutputs, CrossEntropyShape, CudaRowOutputs,
};
use mapet::testing::{
    assert_all_written, assert_within_baseline, gpu_poisoning_or_skip, misses, rng, uniform, uniform_bf16, Misses,
};
use mapet::Error;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ----------------------------------------------------------------------------------- f64 truth

/// The naive softmax cross-entropy in f64, one full row of logits at a time.
struct Truth {
    logits: Vec<f64>,
    loss: Vec<f64>,
    lse: Vec<f64>,
    mean: f64,
    counted: usize,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn truth(
    shape: &CrossEntropyShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    targets: &[i32],
    dloss: f64,
    dw0: &[f32],
    db0: &[f32],
) -> Truth {
    let CrossEntropyShape { rows, dim, vocab, .. } = *shape;
    let mut logits = vec![0.0f64; rows * vocab];
    for r in 0..rows {
        for j in 0..vocab {
            let mut s = b[j] as f64;
            for d in 0..dim {
                s += x[r * dim + d] as f64 * w[j * dim + d] as f64;
            }
            logits[r * vocab + j] = s;
        }
    }
    let counted = targets.iter().filter(|&&t| t >= 0).count();
    let mut loss = vec![0.0; rows];
    let mut lse = vec![0.0; rows];
    let mut dlogits = vec![0.0f64; rows * vocab];
    for r in 0..rows {
        let l = &logits[r * vocab..(r + 1) * vocab];
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z = m + l.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        lse[r] = z;
        let t = targets[r];
        if t >= 0 {
            loss[r] = z - l[t as usize];
            for j in 0..vocab {
                let p = (l[j] - z).exp();
                let onehot = if j == t as usize { 1.0 } else { 0.0 };
                dlogits[r * vocab + j] = dloss / counted as f64 * (p - onehot);
            }
        }
    }
    let mean = if counted > 0 { loss.iter().sum::<f64>() / counted as f64 } else { 0.0 };
    let mut dx = vec![0.0f64; rows * dim];
    // Accumulated into dw0, db0 (empty: from zero).
    let mut dw: Vec<f64> =
        if dw0.is_empty() { vec![0.0; vocab * dim] } else { dw0.iter().map(|&v| v as f64).collect() };
    let mut db: Vec<f64> = if db0.is_empty() { vec![0.0; vocab] } else { db0.iter().map(|&v| v as f64).collect() };
    for r in 0..rows {
        for j in 0..vocab {
            let g = dlogits[r * vocab + j];
            if g == 0.0 {
                continue;
            }
            db[j] += g;
            for d in 0..dim {
                dx[r * dim + d] += g * w[j * dim + d] as f64;
                dw[j * dim + d] += g * x[r * dim + d] as f64;
            }
        }
    }
    Truth { logits, loss, lse, mean, counted, dx, dw, db }
}

/// Targets: about a fifth ignored (-1), a third the true argmax (so that `correct` is exercised),
/// the rest uniform.
fn targets_for(rng: &mut impl Rng, rows: usize, vocab: usize, logits: Option<&[f64]>, ignored: f64) -> Vec<i32> {
    (0..rows)
        .map(|r| {
            if rng.random_bool(ignored) {
                -1
            } else if let (Some(l), true) = (logits, rng.random_bool(0.33)) {
                let row = &l[r * vocab..(r + 1) * vocab];
                let mut best = 0;
                for (j, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = j;
                    }
                }
                best as i32
            } else {
                rng.random_range(0..vocab as i32)
            }
        })
        .collect()
}

fn close(got: f32, want: f64, tol: f64) -> bool {
    (got as f64 - want).abs() <= tol * (1.0 + want.abs())
}

// ------------------------------------------------------------------------------------------ CPU

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Forward and backward of the CPU reference against the f64 truth, over shapes, chunk sizes
    /// and ignored rows; dW and db must be accumulated into, dx overwritten.
    #[test]
    fn cpu_reference_matches_naive_f64(
        rows in 1usize..12,
        dim in 1usize..20,
        vocab in 1usize..40,
        chunk in 1usize..14,
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shape = CrossEntropyShape::new(rows, dim, vocab).with_chunk_rows(chunk);
        let x = uniform(&mut rng, rows * dim, 1.0);
        let w = uniform(&mut rng, vocab * dim, 1.0);
        let b = uniform(&mut rng, vocab, 0.5);
        let dw0 = uniform(&mut rng, vocab * dim, 0.5);
        let db0 = uniform(&mut rng, vocab, 0.5);
        let dloss = rng.random_range(0.5f32..2.0);
        let pre = truth(&shape, &x, &w, &b, &vec![-1; rows], 1.0, &dw0, &db0);
        let targets = targets_for(&mut rng, rows, vocab, Some(&pre.logits), 0.2);
        let t = truth(&shape, &x, &w, &b, &targets, dloss as f64, &dw0, &db0);

        let mut out = CpuRowOutputs::new(rows);
        out.loss.fill(f32::NAN);
        out.lse.fill(f32::NAN);
        out.argmax.fill(-7);
        let stats = cpu_forward(&shape, &x, &w, &b, &targets, &mut out).unwrap();
        prop_assert_eq!(stats.counted, t.counted);
        prop_assert!(close(stats.loss, t.mean, 1e-5), "mean loss {} vs {}", stats.loss, t.mean);
        let mut correct = 0;
        for r in 0..rows {
            prop_assert!(close(out.loss[r], t.loss[r], 1e-5), "row {} loss {} vs {}", r, out.loss[r], t.loss[r]);
            prop_assert!(close(out.lse[r], t.lse[r], 1e-5), "row {} lse {} vs {}", r, out.lse[r], t.lse[r]);
            let l = &t.logits[r * vocab..(r + 1) * vocab];
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let a = out.argmax[r];
            prop_assert!(a >= 0 && (a as usize) < vocab, "row {} argmax {}", r, a);
            prop_assert!(l[a as usize] >= max - 1e-5, "row {}: argmax {} is not a maximum", r, a);
            // The lowest index among the (near-)maxima.
            let lowest = l.iter().position(|&v| v >= max - 1e-5).unwrap();
            if l.iter().filter(|&&v| v >= max - 1e-5).count() == 1 {
                prop_assert_eq!(a as usize, lowest);
            }
            if targets[r] >= 0 && a == targets[r] {
                correct += 1;
            }
        }
        prop_assert_eq!(stats.correct, correct);

        let mut dx = vec![f32::NAN; rows * dim];
        let (mut dw, mut db) = (dw0.clone(), db0.clone());
        let stats_b = cpu_backward(&shape, &x, &w, &b, &targets, dloss, &mut dx, &mut dw, &mut db).unwrap();
        prop_assert_eq!(stats_b, stats);
        for (name, got, want) in [("dx", &dx, &t.dx), ("dw", &dw, &t.dw), ("db", &db, &t.db)] {
            for (i, (&g, &v)) in got.iter().zip(want.iter()).enumerate() {
                prop_assert!((g as f64 - v).abs() <= 2e-5 * (1.0 + v.abs()), "{} [{}]: {} vs {}", name, i, g, v);
            }
        }
    }
}

/// Central differences of `dloss * mean loss` (through `cpu_forward`, f32) against
/// `cpu_backward`, for every element of x, W and b.
#[test]
fn cpu_gradients_match_finite_differences() {
    let mut rng = rng("cpu_gradients_match_finite_differences");
    let (rows, dim, vocab) = (5, 4, 7);
    let shape = CrossEntropyShape::new(rows, dim, vocab).with_chunk_rows(2);
    let x = uniform(&mut rng, rows * dim, 1.0);
    let w = uniform(&mut rng, vocab * dim, 1.0);
    let b = uniform(&mut rng, vocab, 0.5);
    let mut targets: Vec<i32> = (0..rows).map(|_| rng.random_range(0..vocab as i32)).collect();
    targets[rng.random_range(0..rows)] = -1;
    let dloss = 1.7f32;

    let mut dx = vec![f32::NAN; rows * dim];
    let (mut dw, mut db) = (vec![0.0f32; vocab * dim], vec![0.0f32; vocab]);
    cpu_backward(&shape, &x, &w, &b, &targets, dloss, &mut dx, &mut dw, &mut db).unwrap();

    let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
        let mut out = CpuRowOutputs::new(rows);
        dloss as f64 * cpu_forward(&shape, x, w, b, &targets, &mut out).unwrap().loss as f64
    };
    let h = 1e-2f32;
    let mut worst = 0.0f64;
    let mut check = |name: &str, i: usize, fd: f64, g: f32| {
        let err = (fd - g as f64).abs();
        worst = worst.max(err);
        assert!(err <= 2e-4 + 2e-3 * fd.abs(), "{name}[{i}]: finite difference {fd:.6} vs gradient {g:.6}");
    };
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp, &w, &b) - loss(&xm, &w, &b)) / (xp[i] - xm[i]) as f64;
        check("dx", i, fd, dx[i]);
    }
    for i in 0..w.len() {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[i] += h;
        wm[i] -= h;
        let fd = (loss(&x, &wp, &b) - loss(&x, &wm, &b)) / (wp[i] - wm[i]) as f64;
        check("dw", i, fd, dw[i]);
    }
    for i in 0..b.len() {
        let (mut bp, mut bm) = (b.clone(), b.clone());
        bp[i] += h;
        bm[i] -= h;
        let fd = (loss(&x, &w, &bp) - loss(&x, &w, &bm)) / (bp[i] - bm[i]) as f64;
        check("db", i, fd, db[i]);
    }
    eprintln!("largest |finite difference - gradient|: {worst:.2e}");
    // The ignored row gets no gradient at all.
    let ignored = targets.iter().position(|&t| t < 0).unwrap();
    assert!(dx[ignored * dim..(ignored + 1) * dim].iter().all(|&v| v == 0.0));
}

#[test]
fn cpu_checks_shapes_and_targets() {
    let shape = CrossEntropyShape::new(3, 4, 5);
    let (x, w, b) = (vec![0.5f32; 12], vec![0.25f32; 20], vec![0.1f32; 5]);
    let mut out = CpuRowOutputs::new(3);
    let err = cpu_forward(&shape, &x, &w, &b, &[0, 5, 1], &mut out).unwrap_err();
    assert!(matches!(err, Error::Unsupported { what: "target id", .. }), "{err}");
    assert!(err.to_string().contains("row 1"), "{err}");
    let err = cpu_forward(&shape, &x[..11], &w, &b, &[0, 1, 2], &mut out).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "x", .. }), "{err}");
    let err = cpu_forward(&shape, &x, &w, &b[..4], &[0, 1, 2], &mut out).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "b", .. }), "{err}");
    let err = cpu_forward(&shape, &x, &w, &b, &[0, 1], &mut out).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "targets", .. }), "{err}");
    let mut short = CpuRowOutputs::new(2);
    let err = cpu_forward(&shape, &x, &w, &b, &[0, 1, 2], &mut short).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "row loss", .. }), "{err}");
    let (mut dx, mut dw, mut db) = (vec![0.0; 12], vec![0.0; 19], vec![0.0; 5]);
    let err = cpu_backward(&shape, &x, &w, &b, &[0, 1, 2], 1.0, &mut dx, &mut dw, &mut db).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "dw", .. }), "{err}");
    let err = cpu_forward(&CrossEntropyShape::new(3, 0, 5), &[], &[], &b, &[0, 1, 2], &mut out).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    // All rows ignored: loss 0, nothing counted, no gradient.
    let stats = cpu_forward(&shape, &x, &w, &b, &[-1, -1, -1], &mut out).unwrap();
    assert_eq!((stats.loss, stats.correct, stats.counted), (0.0, 0, 0));
}

// ------------------------------------------------------------------------------------------ GPU

fn gpu_and_gemm(test: &str) -> Option<(Gpu, Gemm)> {
    let gpu = gpu_poisoning_or_skip(test)?;
    let gemm = Gemm::new(&gpu).expect("cuBLASLt handle");
    Some((gpu, gemm))
}

/// Inputs of one GPU case, as f32 values (x and W already bf16-representable).
struct Case {
    shape: CrossEntropyShape,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    targets: Vec<i32>,
    dw0: Vec<f32>,
    db0: Vec<f32>,
    dloss: f32,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut impl Rng,
        rows: usize,
        dim: usize,
        vocab: usize,
        chunk: Option<usize>,
        scale: f32,
        ignored: f64,
    ) -> Case {
        let mut shape = CrossEntropyShape::new(rows, dim, vocab);
        shape.chunk_rows = chunk;
        let x = uniform_bf16(rng, rows * dim, scale);
        let w = uniform_bf16(rng, vocab * dim, scale);
        let b = uniform(rng, vocab, 1.0);
        let dw0 = uniform(rng, vocab * dim, 0.01);
        let db0 = uniform(rng, vocab, 0.01);
        let pre = truth(&shape, &x, &w, &b, &vec![-1; rows], 1.0, &[], &[]);
        let targets = targets_for(rng, rows, vocab, Some(&pre.logits), ignored);
        let dloss = rng.random_range(0.5f32..2.0);
        Case { shape, x, w, b, targets, dw0, db0, dloss }
    }

    /// The same case with the CUDA backend's options on its shape: forward passes of at most
    /// `sub` rows, rows visited from the last back, two rows a block.
    fn with_options(self, sub: Option<usize>, reversed: bool, paired: bool) -> Case {
        let mut shape = self.shape.with_reversed_rows(reversed).with_paired_rows(paired);
        if let Some(sub) = sub {
            shape = shape.with_sub_chunk_rows(sub);
        }
        Case { shape, ..self }
    }
}

struct GpuOut {
    stats: mapet::ops::cross_entropy::CrossEntropyStats,
    rows: CpuRowOutputs,
    fwd_stats: mapet::ops::cross_entropy::CrossEntropyStats,
    fwd_rows: CpuRowOutputs,
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

/// Runs forward alone and forward + backward on the GPU, every output poisoned first (dW and db
/// start from `dw0`, `db0`: they are accumulated into).
fn run_gpu(gpu: &Gpu, gemm: &Gemm, c: &Case) -> GpuOut {
    let CrossEntropyShape { rows, dim, vocab, .. } = c.shape;
    let x = gpu.upload_bf16(&c.x).unwrap();
    let w = gpu.upload_bf16(&c.w).unwrap();
    let b = gpu.upload(&c.b).unwrap();

    let mut fwd = CudaRowOutputs::new(gpu, rows).unwrap();
    fwd.poison().unwrap();
    let fwd_stats = cuda_forward(gpu, gemm, &c.shape, &x, &w, &b, &c.targets, &mut fwd).unwrap();

    let mut out = CudaRowOutputs::new(gpu, rows).unwrap();
    out.poison().unwrap();
    let mut dx = gpu.alloc::<bf16>(rows * dim).unwrap();
    dx.poison().unwrap();
    let mut dw = gpu.upload(&c.dw0).unwrap();
    let mut db = gpu.upload(&c.db0).unwrap();
    let stats = cuda_forward_backward(
        gpu, gemm, &c.shape, &x, &w, &b, &c.targets, c.dloss, &mut out, &mut dx, &mut dw, &mut db,
    )
    .unwrap();
    let o = GpuOut {
        stats,
        rows: out.to_host().unwrap(),
        fwd_stats,
        fwd_rows: fwd.to_host().unwrap(),
        dx: dx.to_host_f32().unwrap(),
        dw: dw.to_host().unwrap(),
        db: db.to_host().unwrap(),
    };
    assert_eq!(o.dw.len(), vocab * dim);
    o
}

fn assert_rows_written(what: &str, rows: &CpuRowOutputs, vocab: usize) {
    assert_all_written(&format!("{what} row loss"), &rows.loss);
    assert_all_written(&format!("{what} row lse"), &rows.lse);
    if let Some(r) = rows.argmax.iter().position(|&a| a < 0 || a as usize >= vocab) {
        panic!("{what}: row {r} argmax {} not written or out of range", rows.argmax[r]);
    }
}

/// Rows whose lse is further from the baseline's than bf16 roundings take it (0.05: the logits'
/// roundings move it by about 1e-3), counted by GPU chunk, by pass inside the chunk
/// (`with_sub_chunk_rows`) and by row of the pass.
fn lse_misses(shape: &CrossEntropyShape, lse: &[f32], base: &[f32]) -> Misses {
    let rc = shape.gpu_chunk_rows();
    let pass_of = |r: usize| {
        let (chunk, within) = (r / rc, r % rc);
        let len = rc.min(shape.rows - chunk * rc);
        let passes = shape.gpu_sub_chunks(len);
        let i = passes.iter().position(|p| p.contains(&within)).unwrap_or(usize::MAX);
        (i, within - passes.get(i).map_or(0, |p| p.start))
    };
    misses(
        lse.len(),
        |r| (lse[r] - base[r]).abs().is_nan() || (lse[r] - base[r]).abs() > 0.05,
        &[
            ("chunk", &|r| Some(r / rc)),
            ("pass", &|r| Some(pass_of(r).0)),
            ("row of the pass", &|r| Some(pass_of(r).1)),
        ],
    )
}

/// lse_misses, on the CPU: a planted error in one pass of one chunk is counted there, and
/// nowhere else.
#[test]
fn lse_misses_locate_a_pass() {
    let mut rng = rng("lse_misses_locate_a_pass");
    let shape = CrossEntropyShape::new(517, 128, 8192).with_chunk_rows(200).with_sub_chunk_rows(67);
    let base = uniform(&mut rng, 517, 9.0);
    let mut lse = base.iter().map(|v| v + 1e-3).collect::<Vec<_>>();
    assert!(lse_misses(&shape, &lse, &base).wrong.is_empty(), "roundings are no misses");
    // Chunk 1 (rows 200..400), its second pass (rows 67..134 of the chunk): rows 267..334.
    for v in &mut lse[267..334] {
        *v += 0.5;
    }
    let m = lse_misses(&shape, &lse, &base);
    assert_eq!(m.wrong, (267..334).collect::<Vec<_>>());
    assert_eq!((m.count("chunk", 1), m.count("chunk", 0), m.count("chunk", 2)), (67, 0, 0));
    assert_eq!((m.count("pass", 1), m.count("pass", 0), m.count("pass", 2)), (67, 0, 0));
    assert_eq!((m.count("row of the pass", 0), m.count("row of the pass", 66)), (1, 1));
    // The tail chunk of 117 rows runs passes of 59 and 58: row 400 + 59 opens its second pass.
    let mut lse = base.clone();
    lse[459] = f32::NAN;
    let m = lse_misses(&shape, &lse, &base);
    assert_eq!((m.count("chunk", 2), m.count("pass", 1), m.count("row of the pass", 0)), (1, 1, 1));
}

/// The full comparison of one case: GPU against the same-precision CPU baseline and the f64 truth.
fn check_case(test: &str, gpu: &Gpu, gemm: &Gemm, c: &Case) {
    let CrossEntropyShape { rows, dim, vocab, .. } = c.shape;
    eprintln!("{test}: rows {rows}, dim {dim}, vocab {vocab}, chunk {:?}", c.shape.chunk_rows);
    let t = truth(&c.shape, &c.x, &c.w, &c.b, &c.targets, c.dloss as f64, &c.dw0, &c.db0);
    let mut base = CpuRowOutputs::new(rows);
    let base_stats =
        cpu_forward_with(CpuPrecision::GpuRounding, &c.shape, &c.x, &c.w, &c.b, &c.targets, &mut base).unwrap();
    let mut bdx = vec![0.0f32; rows * dim];
    let (mut bdw, mut bdb) = (c.dw0.clone(), c.db0.clone());
    cpu_backward_with(
        CpuPrecision::GpuRounding,
        &c.shape,
        &c.x,
        &c.w,
        &c.b,
        &c.targets,
        c.dloss,
        &mut bdx,
        &mut bdw,
        &mut bdb,
    )
    .unwrap();

    let g = run_gpu(gpu, gemm, c);
    assert_rows_written("forward", &g.fwd_rows, vocab);
    assert_rows_written("forward+backward", &g.rows, vocab);

    // Rows far off the baseline (a wrong pass or chunk, not rounding), located by chunk and pass
    // for the failure message, before the two runs are compared with each other.
    let mut reports = Vec::new();
    for (run, rows_out) in [("forward", &g.fwd_rows), ("forward+backward", &g.rows)] {
        let m = lse_misses(&c.shape, &rows_out.lse, &base.lse);
        if !m.wrong.is_empty() {
            reports.push(m.report(&format!("{run} row lse")));
        }
    }
    assert!(reports.is_empty(), "{}", reports.join("\n"));
    // The forward alone and the training variant compute the same statistics, bit for bit.
    assert_eq!(g.fwd_stats, g.stats, "forward-only and forward+backward statistics differ");
    for r in 0..rows {
        assert!(
            g.fwd_rows.loss[r].to_bits() == g.rows.loss[r].to_bits()
                && g.fwd_rows.lse[r].to_bits() == g.rows.lse[r].to_bits()
                && g.fwd_rows.argmax[r] == g.rows.argmax[r],
            "row {r}: forward-only and forward+backward differ"
        );
    }

    assert_within_baseline(&format!("{test} row loss"), &g.rows.loss, &base.loss, &t.loss, 2.0, 1e-5);
    assert_within_baseline(&format!("{test} row lse"), &g.rows.lse, &base.lse, &t.lse, 2.0, 1e-5);
    assert_within_baseline(&format!("{test} mean loss"), &[g.stats.loss], &[base_stats.loss], &[t.mean], 2.0, 1e-5);

    // The mean is the mean of the kernel's own row losses; correct counts the kernel's argmax.
    assert_eq!(g.stats.counted, t.counted);
    let mut sum = 0.0f64;
    let mut correct = 0;
    for r in 0..rows {
        if c.targets[r] >= 0 {
            sum += g.rows.loss[r] as f64;
            correct += usize::from(g.rows.argmax[r] == c.targets[r]);
        }
    }
    let own_mean = if t.counted > 0 { sum / t.counted as f64 } else { 0.0 };
    assert!(close(g.stats.loss, own_mean, 1e-6), "mean loss {} vs the mean of the row losses {own_mean}", g.stats.loss);
    assert_eq!(g.stats.correct, correct, "correct count vs the rows' argmax");

    // Argmax: where the GPU and the baseline disagree, the two logits must be a rounding apart.
    let mut disagree = 0;
    for r in 0..rows {
        let (ka, ba) = (g.rows.argmax[r] as usize, base.argmax[r] as usize);
        if ka == ba {
            continue;
        }
        disagree += 1;
        let l = &t.logits[r * vocab..(r + 1) * vocab];
        let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let scale = (0..vocab).map(|j| (l[j] - c.b[j] as f64).abs()).fold(0.0, f64::max);
        let tol = scale / 128.0 + 1e-5;
        assert!(
            max - l[ka] <= tol,
            "row {r}: GPU argmax {ka} (logit {}) is not within a bf16 rounding of the max {max} (baseline {ba})",
            l[ka]
        );
    }
    eprintln!("{test}: argmax differs from the baseline on {disagree} of {rows} rows (near ties)");

    assert_within_baseline(&format!("{test} dx"), &g.dx, &bdx, &t.dx, 3.0, 1e-5);
    assert_within_baseline(&format!("{test} dw"), &g.dw, &bdw, &t.dw, 3.0, 1e-5);
    assert_within_baseline(&format!("{test} db"), &g.db, &bdb, &t.db, 3.0, 1e-5);
    for r in 0..rows {
        if c.targets[r] < 0 {
            assert!(g.dx[r * dim..(r + 1) * dim].iter().all(|&v| v == 0.0), "row {r} is ignored but has a dx");
        }
    }
}

#[test]
fn gpu_one_row_vocab_37() {
    let test = "gpu_one_row_vocab_37";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let mut c = Case::random(&mut rng, 1, 8, 37, None, 1.0, 0.0);
    c.targets[0] = rng.random_range(0..37);
    check_case(test, &gpu, &gemm, &c);
}

/// V = 8191 (scalar path), several chunks and a shorter last one, ignored rows.
#[test]
fn gpu_vocab_8191_chunked() {
    let test = "gpu_vocab_8191_chunked";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let c = Case::random(&mut rng, 300, 64, 8191, Some(128), 0.5, 0.2);
    check_case(test, &gpu, &gemm, &c);
}

/// V = 8192 (vector path), several chunks and a shorter last one, a quarter of the rows ignored.
#[test]
fn gpu_vocab_8192_chunked() {
    let test = "gpu_vocab_8192_chunked";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let c = Case::random(&mut rng, 517, 128, 8192, Some(200), 0.5, 0.25);
    check_case(test, &gpu, &gemm, &c);
}

/// Forward passes of a few rows inside each chunk (`with_sub_chunk_rows`): the logits GEMM and
/// the row kernel on part of the chunk's buffer at a time, dx and dW over the whole chunk. Both
/// row-kernel paths (V = 8192 with the fused column sums, V = 8191 with the column-sum kernel),
/// chunks with a shorter last one whose passes differ in length, and passes of one row.
#[test]
fn gpu_sub_chunks_match_cpu() {
    let test = "gpu_sub_chunks_match_cpu";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for (rows, dim, vocab, chunk, sub) in
        [(517, 128, 8192, Some(200), 67), (300, 64, 8191, Some(128), 50), (7, 16, 37, None, 1), (33, 24, 8, Some(5), 2)]
    {
        let c = Case::random(&mut rng, rows, dim, vocab, chunk, 0.5, 0.2).with_options(Some(sub), false, false);
        eprintln!("{test}: passes of at most {sub} rows");
        check_case(test, &gpu, &gemm, &c);
    }
}

/// The row kernels visiting the rows from the last back (`MAPET_CE_ROW_ORDER=reverse`): the
/// held-row kernel (V % 8 == 0, V <= 8192) with several rows a block and with passes, the
/// one-row-a-block kernel and its column sums (other V), and one row.
#[test]
fn gpu_reversed_rows_match_cpu() {
    let test = "gpu_reversed_rows_match_cpu";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for (rows, dim, vocab, chunk, sub) in [
        (1100, 64, 8192, None, None),
        (517, 128, 8192, Some(200), Some(67)),
        (300, 64, 8191, Some(128), None),
        (33, 24, 8, Some(5), Some(2)),
        (1, 16, 37, None, None),
    ] {
        let c = Case::random(&mut rng, rows, dim, vocab, chunk, 0.5, 0.2).with_options(sub, true, false);
        eprintln!("{test}: {rows} x {dim} x {vocab}, chunks {chunk:?}, passes of {sub:?} rows, rows reversed");
        check_case(test, &gpu, &gemm, &c);
    }
}

/// Paired rows (`MAPET_CE_ROW_BLOCKS=paired`: two rows a block of the held-row kernel, one block an
/// SM at most): against the CPU with more rows than the device has pairs of blocks (halves that
/// visit several rows, an odd row count, so one half of a block has no row), with passes and
/// reversed rows, with fewer rows than blocks, and one row (a block whose second half visits
/// nothing); and a vocabulary the held kernel does not take, where paired rows change nothing.
#[test]
fn gpu_paired_rows_match_cpu() {
    let test = "gpu_paired_rows_match_cpu";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for (rows, dim, vocab, chunk, sub, reversed) in [
        (1101, 64, 8192, None, None, false),
        (517, 128, 8192, Some(200), Some(67), true),
        (33, 24, 8, Some(5), Some(2), false),
        (1, 16, 8192, None, None, false),
        (300, 64, 8191, Some(128), None, false),
    ] {
        let c = Case::random(&mut rng, rows, dim, vocab, chunk, 0.5, 0.2).with_options(sub, reversed, true);
        eprintln!("{test}: {rows} x {dim} x {vocab}, chunks {chunk:?}, passes of {sub:?} rows, reversed {reversed}");
        check_case(test, &gpu, &gemm, &c);
    }
}

/// Paired rows give the one-row kernel's bits wherever the chunks are the same: every row's loss,
/// lse and argmax, the statistics, dx and dW (the dlogits are the same bits); db only sums the
/// rows in other groups, so it is compared within a few f32 roundings of its size. Also with
/// sub-chunk passes and with reversed rows, each on both kernels.
#[test]
fn gpu_paired_rows_give_the_single_rows_bits() {
    let test = "gpu_paired_rows_give_the_single_rows_bits";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for (rows, dim, vocab, chunk, sub, reversed) in [
        (2000, 64, 8192, Some(700), None, false),
        (97, 32, 4096, None, None, false),
        (517, 128, 8192, Some(200), Some(67), false),
        (517, 128, 8192, Some(200), None, true),
    ] {
        let c = Case::random(&mut rng, rows, dim, vocab, chunk, 0.5, 0.2).with_options(sub, reversed, false);
        let single = run_gpu(&gpu, &gemm, &c);
        let paired_case = Case { shape: c.shape.with_paired_rows(true), ..c };
        assert_eq!(paired_case.shape.gpu_chunk_rows(), c.shape.gpu_chunk_rows(), "the same chunks");
        let paired = run_gpu(&gpu, &gemm, &paired_case);
        let same_db = GpuOut { db: single.db.clone(), ..paired };
        let GpuOut { db: paired_db, .. } = paired;
        assert_same_bits(&same_db, &single);
        let size = single.db.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = paired_db.iter().zip(&single.db).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!(
            "{test}: {rows} x {dim} x {vocab}, passes of {sub:?} rows, reversed {reversed}: db differs by at most \
             {worst:e} (largest |db| {size:e})"
        );
        assert!(worst <= 1e-5 * size.max(1e-3), "db: paired and single rows differ by {worst} (largest |db| {size})");
    }
}

/// Small odd sizes in one chunk and in chunks of one row.
#[test]
fn gpu_small_odd_shapes() {
    let test = "gpu_small_odd_shapes";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    // R = 1 on both row-kernel paths, and on the fused training kernel with one row per block
    // (V % 8 == 0, V <= 8192) and on the column-sum kernel (other V).
    for (rows, dim, vocab, chunk) in [
        (7, 16, 37, None),
        (7, 16, 37, Some(1)),
        (33, 24, 8, Some(5)),
        (5, 8, 3, None),
        (1, 8, 64, None),
        (1, 16, 8192, None),
        (3, 8, 8191, Some(2)),
    ] {
        let c = Case::random(&mut rng, rows, dim, vocab, chunk, 1.0, 0.2);
        check_case(test, &gpu, &gemm, &c);
    }
}

/// The model's shape, R = 18816, D = 768, V = 8192, with the default chunking (6 equal chunks of
/// 3136 rows; shorter last chunks are covered by the chunked tests above). Only a sample of rows
/// has a target (the others are ignored), so
/// that dW and db, sums over all rows, equal those of the sampled rows alone and the CPU checks
/// them on that sub-batch; the sample includes the first and last rows and both sides of every
/// chunk boundary. Per-row outputs are checked on the sampled rows and on some ignored rows.
#[test]
fn gpu_model_shape_sparse_targets() {
    model_shape_sparse_targets("gpu_model_shape_sparse_targets", false);
}

/// The same with paired rows: four chunks of 3764 rows and a last one of 3760 (its own buffers).
#[test]
fn gpu_model_shape_sparse_targets_paired_rows() {
    model_shape_sparse_targets("gpu_model_shape_sparse_targets_paired_rows", true);
}

fn model_shape_sparse_targets(test: &str, paired: bool) {
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let (rows, dim, vocab) = (18816, 768, 8192);
    let shape = CrossEntropyShape::new(rows, dim, vocab).with_paired_rows(paired);
    let rc = shape.gpu_chunk_rows();
    let want = if paired { (3764, 3760) } else { (3136, 0) };
    assert_eq!((rc, rows % rc), want, "the chunking this test is meant to cover");
    let x = uniform_bf16(&mut rng, rows * dim, 0.5);
    let w = uniform_bf16(&mut rng, vocab * dim, 0.5);
    let b = uniform(&mut rng, vocab, 1.0);
    let dw0 = uniform(&mut rng, vocab * dim, 0.01);
    let db0 = uniform(&mut rng, vocab, 0.01);
    let dloss = rng.random_range(0.5f32..2.0);

    // Sampled rows (with targets) and some ignored rows whose lse and argmax are checked too.
    let mut sampled: Vec<usize> = vec![0, rows - 1];
    for c in 1..rows.div_ceil(rc) {
        sampled.extend([c * rc - 1, c * rc]);
    }
    while sampled.len() < 40 {
        let r = rng.random_range(0..rows);
        if !sampled.contains(&r) {
            sampled.push(r);
        }
    }
    let mut ignored_checked = Vec::new();
    while ignored_checked.len() < 12 {
        let r = rng.random_range(0..rows);
        if !sampled.contains(&r) && !ignored_checked.contains(&r) {
            ignored_checked.push(r);
        }
    }
    let mut targets = vec![-1i32; rows];
    for &r in &sampled {
        targets[r] = rng.random_range(0..vocab as i32);
    }
    let mut subset: Vec<usize> = sampled.iter().chain(&ignored_checked).copied().collect();
    subset.sort_unstable();

    // GPU, whole shape.
    let d_x = gpu.upload_bf16(&x).unwrap();
    let d_w = gpu.upload_bf16(&w).unwrap();
    let d_b = gpu.upload(&b).unwrap();
    let mut out = CudaRowOutputs::new(&gpu, rows).unwrap();
    out.poison().unwrap();
    let mut d_dx = gpu.alloc::<bf16>(rows * dim).unwrap();
    d_dx.poison().unwrap();
    let mut d_dw = gpu.upload(&dw0).unwrap();
    let mut d_db = gpu.upload(&db0).unwrap();
    let stats = cuda_forward_backward(
        &gpu, &gemm, &shape, &d_x, &d_w, &d_b, &targets, dloss, &mut out, &mut d_dx, &mut d_dw, &mut d_db,
    )
    .unwrap();
    let g_rows = out.to_host().unwrap();
    let g_dx = d_dx.to_host_f32().unwrap();
    let g_dw = d_dw.to_host().unwrap();
    let g_db = d_db.to_host().unwrap();
    assert_rows_written(test, &g_rows, vocab);
    assert_eq!(stats.counted, sampled.len());

    // CPU baseline and f64 truth on the sub-batch: the same counted rows, so the same gradient
    // scale, and dW, db get exactly the same contributions.
    let n = subset.len();
    let sub_shape = CrossEntropyShape::new(n, dim, vocab);
    let sub_x: Vec<f32> = subset.iter().flat_map(|&r| x[r * dim..(r + 1) * dim].iter().copied()).collect();
    let sub_t: Vec<i32> = subset.iter().map(|&r| targets[r]).collect();
    let t = truth(&sub_shape, &sub_x, &w, &b, &sub_t, dloss as f64, &dw0, &db0);
    let mut base = CpuRowOutputs::new(n);
    let base_stats =
        cpu_forward_with(CpuPrecision::GpuRounding, &sub_shape, &sub_x, &w, &b, &sub_t, &mut base).unwrap();
    let mut bdx = vec![0.0f32; n * dim];
    let (mut bdw, mut bdb) = (dw0.clone(), db0.clone());
    cpu_backward_with(
        CpuPrecision::GpuRounding,
        &sub_shape,
        &sub_x,
        &w,
        &b,
        &sub_t,
        dloss,
        &mut bdx,
        &mut bdw,
        &mut bdb,
    )
    .unwrap();

    let pick = |v: &[f32]| -> Vec<f32> { subset.iter().map(|&r| v[r]).collect() };
    assert_within_baseline(&format!("{test} row loss"), &pick(&g_rows.loss), &base.loss, &t.loss, 2.0, 1e-5);
    assert_within_baseline(&format!("{test} row lse"), &pick(&g_rows.lse), &base.lse, &t.lse, 2.0, 1e-5);
    assert_within_baseline(&format!("{test} mean loss"), &[stats.loss], &[base_stats.loss], &[t.mean], 2.0, 1e-5);
    let mut correct = 0;
    for (i, &r) in subset.iter().enumerate() {
        let (ka, ba) = (g_rows.argmax[r] as usize, base.argmax[i] as usize);
        if targets[r] >= 0 {
            correct += usize::from(ka == targets[r] as usize);
        }
        if ka != ba {
            let l = &t.logits[i * vocab..(i + 1) * vocab];
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let scale = (0..vocab).map(|j| (l[j] - b[j] as f64).abs()).fold(0.0, f64::max);
            assert!(max - l[ka] <= scale / 128.0 + 1e-5, "row {r}: GPU argmax {ka} is not a near-tie of the max");
        }
    }
    assert_eq!(stats.correct, correct, "correct count vs the rows' argmax");

    let sub_dx: Vec<f32> = subset.iter().flat_map(|&r| g_dx[r * dim..(r + 1) * dim].iter().copied()).collect();
    assert_within_baseline(&format!("{test} dx"), &sub_dx, &bdx, &t.dx, 3.0, 1e-5);
    for r in 0..rows {
        if targets[r] < 0 && g_dx[r * dim..(r + 1) * dim].iter().any(|&v| v != 0.0) {
            panic!("row {r} is ignored but has a nonzero dx");
        }
    }
    assert_within_baseline(&format!("{test} dw"), &g_dw, &bdw, &t.dw, 3.0, 1e-5);
    assert_within_baseline(&format!("{test} db"), &g_db, &bdb, &t.db, 3.0, 1e-5);
}

/// Logits of magnitude ~100 (|x|, |w| < 6, D = 64): no overflow, no NaN, same accuracy rule.
#[test]
fn gpu_large_logits() {
    let test = "gpu_large_logits";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for vocab in [1000, 1001] {
        let c = Case::random(&mut rng, 64, 64, vocab, Some(24), 6.0, 0.1);
        let t = truth(&c.shape, &c.x, &c.w, &c.b, &c.targets, 1.0, &c.dw0, &c.db0);
        let big = t.logits.iter().fold(0.0f64, |m, &v| m.max(v.abs()));
        eprintln!("{test}: largest |logit| {big:.1}");
        assert!(big > 100.0, "the case should have logits beyond 100, largest {big}");
        check_case(test, &gpu, &gemm, &c);
    }
}

/// Exact integer logits with many ties: both backends must pick the lowest index of the max.
#[test]
fn gpu_ties_resolve_to_the_lowest_index() {
    let test = "gpu_ties_resolve_to_the_lowest_index";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for vocab in [37, 64] {
        let (rows, dim) = (96, 16);
        // Entries in {-1, 0, 1}: every dot product is a small integer, exact in f32 and bf16.
        let tern = |rng: &mut ChaCha8Rng, n: usize| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-1i32..=1) as f32).collect()
        };
        let x = tern(&mut rng, rows * dim);
        let mut w = tern(&mut rng, vocab * dim);
        let mut b: Vec<f32> = (0..vocab).map(|_| rng.random_range(-1i32..=1) as f32).collect();
        // Duplicate some rows of W (and their bias) so that ties are certain.
        for _ in 0..vocab / 3 {
            let (src, dst) = (rng.random_range(0..vocab), rng.random_range(0..vocab));
            let row: Vec<f32> = w[src * dim..(src + 1) * dim].to_vec();
            w[dst * dim..(dst + 1) * dim].copy_from_slice(&row);
            b[dst] = b[src];
        }
        let shape = CrossEntropyShape::new(rows, dim, vocab).with_chunk_rows(40);
        let t = truth(&shape, &x, &w, &b, &vec![-1; rows], 1.0, &[], &[]);
        // Targets: the highest index among the tied maxima on some rows (must not count as
        // correct), the lowest on others.
        let mut ties = 0;
        let targets: Vec<i32> = (0..rows)
            .map(|r| {
                let l = &t.logits[r * vocab..(r + 1) * vocab];
                let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lowest = l.iter().position(|&v| v == max).unwrap();
                let highest = l.iter().rposition(|&v| v == max).unwrap();
                ties += usize::from(lowest != highest);
                if r % 2 == 0 {
                    highest as i32
                } else {
                    lowest as i32
                }
            })
            .collect();
        eprintln!("{test}: vocab {vocab}: {ties} of {rows} rows have a tied maximum");
        assert!(ties > 0, "the case should contain ties");
        let mut base = CpuRowOutputs::new(rows);
        let base_stats = cpu_forward(&shape, &x, &w, &b, &targets, &mut base).unwrap();
        let c = Case {
            shape,
            x: x.clone(),
            w: w.clone(),
            b: b.clone(),
            targets: targets.clone(),
            dw0: uniform(&mut rng, vocab * dim, 0.01),
            db0: uniform(&mut rng, vocab, 0.01),
            dloss: 1.0,
        };
        let g = run_gpu(&gpu, &gemm, &c);
        for r in 0..rows {
            let l = &t.logits[r * vocab..(r + 1) * vocab];
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lowest = l.iter().position(|&v| v == max).unwrap() as i32;
            assert_eq!(base.argmax[r], lowest, "CPU row {r}");
            assert_eq!(g.rows.argmax[r], lowest, "GPU row {r}");
        }
        assert_eq!(g.stats.correct, base_stats.correct);
        assert_eq!(g.stats.counted, base_stats.counted);
        check_case(test, &gpu, &gemm, &c);
    }
}

/// Every row ignored: loss 0, nothing counted, dx all zero, dW and db unchanged.
#[test]
fn gpu_all_rows_ignored() {
    let test = "gpu_all_rows_ignored";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let mut c = Case::random(&mut rng, 20, 16, 40, Some(8), 1.0, 0.0);
    c.targets.fill(-1);
    let g = run_gpu(&gpu, &gemm, &c);
    assert_rows_written(test, &g.rows, 40);
    assert_eq!((g.stats.loss, g.stats.correct, g.stats.counted), (0.0, 0, 0));
    assert!(g.rows.loss.iter().all(|&v| v == 0.0));
    assert!(g.dx.iter().all(|&v| v == 0.0), "dx must be written as zeros");
    assert_eq!(g.dw, c.dw0, "dW must be unchanged");
    assert_eq!(g.db, c.db0, "db must be unchanged");
}

/// A row whose features are NaN (a diverged model) has only NaN logits: its loss and lse are NaN,
/// so is the mean, and its argmax is 0 as on the CPU (not an out-of-range index), on both row
/// kernel paths; the other rows are unaffected.
#[test]
fn gpu_nan_row_keeps_argmax_in_range() {
    let test = "gpu_nan_row_keeps_argmax_in_range";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for vocab in [37, 64] {
        let (rows, dim) = (4, 8);
        let shape = CrossEntropyShape::new(rows, dim, vocab);
        let mut x = uniform_bf16(&mut rng, rows * dim, 1.0);
        x[dim..2 * dim].fill(f32::NAN);
        let w = uniform_bf16(&mut rng, vocab * dim, 1.0);
        let b = uniform(&mut rng, vocab, 1.0);
        let targets: Vec<i32> = (0..rows).map(|_| rng.random_range(0..vocab as i32)).collect();
        let mut cpu = CpuRowOutputs::new(rows);
        cpu_forward(&shape, &x, &w, &b, &targets, &mut cpu).unwrap();
        assert_eq!(cpu.argmax[1], 0, "CPU argmax of the NaN row");
        let (d_x, d_w, d_b) = (gpu.upload_bf16(&x).unwrap(), gpu.upload_bf16(&w).unwrap(), gpu.upload(&b).unwrap());
        let mut out = CudaRowOutputs::new(&gpu, rows).unwrap();
        out.poison().unwrap();
        let stats = cuda_forward(&gpu, &gemm, &shape, &d_x, &d_w, &d_b, &targets, &mut out).unwrap();
        let g = out.to_host().unwrap();
        assert_eq!(g.argmax[1], 0, "vocab {vocab}: GPU argmax of the NaN row");
        assert!(g.loss[1].is_nan() && g.lse[1].is_nan(), "vocab {vocab}: the NaN row must give NaN");
        assert!(stats.loss.is_nan(), "vocab {vocab}: the mean loss must be NaN");
        for r in [0, 2, 3] {
            assert!(g.loss[r].is_finite() && g.lse[r].is_finite(), "vocab {vocab}: row {r} not finite");
            assert!((0..vocab as i32).contains(&g.argmax[r]), "vocab {vocab}: row {r} argmax {}", g.argmax[r]);
        }
    }
}

/// A NaN code column (one decoder row of NaN weights) makes every loss and lse NaN, but the argmax
/// skips it: it is a maximum of the other logits (up to a bf16 rounding) and the same in the
/// forward kernel and in the training kernels (V = 64: the fused one; 37: the other path).
#[test]
fn gpu_nan_column_is_skipped_by_the_argmax() {
    let test = "gpu_nan_column_is_skipped_by_the_argmax";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    for vocab in [37, 64] {
        let (rows, dim) = (6, 8);
        let shape = CrossEntropyShape::new(rows, dim, vocab);
        let x = uniform_bf16(&mut rng, rows * dim, 1.0);
        let mut w = uniform_bf16(&mut rng, vocab * dim, 1.0);
        let nan_code = rng.random_range(0..vocab);
        w[nan_code * dim..(nan_code + 1) * dim].fill(f32::NAN);
        let b = uniform(&mut rng, vocab, 1.0);
        let targets: Vec<i32> = (0..rows).map(|_| rng.random_range(0..vocab as i32)).collect();
        let (d_x, d_w, d_b) = (gpu.upload_bf16(&x).unwrap(), gpu.upload_bf16(&w).unwrap(), gpu.upload(&b).unwrap());
        let mut out = CudaRowOutputs::new(&gpu, rows).unwrap();
        out.poison().unwrap();
        cuda_forward(&gpu, &gemm, &shape, &d_x, &d_w, &d_b, &targets, &mut out).unwrap();
        let fwd = out.to_host().unwrap();
        out.poison().unwrap();
        let mut dx = gpu.alloc::<bf16>(rows * dim).unwrap();
        let (mut dw, mut db) = (gpu.zeros::<f32>(vocab * dim).unwrap(), gpu.zeros::<f32>(vocab).unwrap());
        cuda_forward_backward(
            &gpu, &gemm, &shape, &d_x, &d_w, &d_b, &targets, 1.0, &mut out, &mut dx, &mut dw, &mut db,
        )
        .unwrap();
        let train = out.to_host().unwrap();
        assert_eq!(fwd.argmax, train.argmax, "vocab {vocab}: forward and training argmax (same logits)");
        for (what, g) in [("forward", &fwd), ("training", &train)] {
            assert!(g.loss.iter().chain(&g.lse).all(|v| v.is_nan()), "vocab {vocab}, {what}: NaN loss and lse");
        }
        for r in 0..rows {
            let logit = |j: usize| -> f64 {
                (0..dim).map(|d| x[r * dim + d] as f64 * w[j * dim + d] as f64).sum::<f64>() + b[j] as f64
            };
            let max = (0..vocab).filter(|&j| j != nan_code).map(logit).fold(f64::NEG_INFINITY, f64::max);
            let a = fwd.argmax[r];
            assert!((0..vocab as i32).contains(&a) && a as usize != nan_code, "vocab {vocab}: row {r} argmax {a}");
            let l = logit(a as usize);
            assert!(
                max - l <= max.abs() / 128.0 + 1e-5,
                "vocab {vocab}: row {r} argmax {a} ({l}) is not a max ({max})"
            );
        }
    }
}

/// Two identical calls give bit-identical results (no atomics, fixed reduction orders).
#[test]
fn gpu_is_deterministic() {
    let test = "gpu_is_deterministic";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let c = Case::random(&mut rng, 450, 64, 1024, Some(100), 0.5, 0.1);
    assert_same_bits(&run_gpu(&gpu, &gemm, &c), &run_gpu(&gpu, &gemm, &c));
}

/// Every output of two GPU runs, bit for bit.
fn assert_same_bits(a: &GpuOut, b: &GpuOut) {
    assert_eq!(a.stats, b.stats, "forward+backward statistics");
    assert_eq!(a.fwd_stats, b.fwd_stats, "forward statistics");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (what, x, y) in [("forward+backward", &a.rows, &b.rows), ("forward", &a.fwd_rows, &b.fwd_rows)] {
        assert_eq!(bits(&x.loss), bits(&y.loss), "{what} row loss");
        assert_eq!(bits(&x.lse), bits(&y.lse), "{what} row lse");
        assert_eq!(x.argmax, y.argmax, "{what} row argmax");
    }
    assert_eq!(bits(&a.dx), bits(&b.dx), "dx");
    assert_eq!(bits(&a.dw), bits(&b.dw), "dw");
    assert_eq!(bits(&a.db), bits(&b.db), "db");
}

/// The queued calls give the waiting calls' results bit for bit, their statistics read only
/// after more work was queued behind them (a second call into other outputs), and a call with no
/// rows queues nothing and reads as zero.
#[test]
fn gpu_queued_calls_match_the_waiting_ones() {
    let test = "gpu_queued_calls_match_the_waiting_ones";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let c = Case::random(&mut rng, 300, 64, 1024, Some(128), 0.5, 0.2);
    let want = run_gpu(&gpu, &gemm, &c);
    let CrossEntropyShape { rows, dim, .. } = c.shape;
    let x = gpu.upload_bf16(&c.x).unwrap();
    let w = gpu.upload_bf16(&c.w).unwrap();
    let b = gpu.upload(&c.b).unwrap();
    let mut out = CudaRowOutputs::new(&gpu, rows).unwrap();
    out.poison().unwrap();
    let mut dx = gpu.alloc::<bf16>(rows * dim).unwrap();
    dx.poison().unwrap();
    let mut dw = gpu.upload(&c.dw0).unwrap();
    let mut db = gpu.upload(&c.db0).unwrap();
    let queued = cuda_forward_backward_queued(
        &gpu, &gemm, &c.shape, &x, &w, &b, &c.targets, c.dloss, &mut out, &mut dx, &mut dw, &mut db,
    )
    .unwrap();
    let mut fwd = CudaRowOutputs::new(&gpu, rows).unwrap();
    fwd.poison().unwrap();
    let fwd_queued = cuda_forward_queued(&gpu, &gemm, &c.shape, &x, &w, &b, &c.targets, &mut fwd).unwrap();
    let got = GpuOut {
        stats: queued.wait().unwrap(),
        rows: out.to_host().unwrap(),
        fwd_stats: fwd_queued.wait().unwrap(),
        fwd_rows: fwd.to_host().unwrap(),
        dx: dx.to_host_f32().unwrap(),
        dw: dw.to_host().unwrap(),
        db: db.to_host().unwrap(),
    };
    assert_same_bits(&got, &want);

    let empty = CrossEntropyShape::new(0, dim, 1024);
    let mut none = CudaRowOutputs::new(&gpu, 0).unwrap();
    let stats = cuda_forward_queued(&gpu, &gemm, &empty, &x.view(0..0).unwrap(), &w, &b, &[], &mut none)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((stats.loss, stats.correct, stats.counted), (0.0, 0, 0));
}

/// Host checks refuse bad input before anything the caller can see is written (a bad target
/// value is found while the first chunk's logits GEMM runs into the call's own scratch).
#[test]
fn gpu_rejects_bad_input() {
    let test = "gpu_rejects_bad_input";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let (rows, vocab) = (4, 37);
    for dim in [12, 8] {
        let shape = CrossEntropyShape::new(rows, dim, vocab);
        let x = gpu.upload_bf16(&uniform(&mut rng, rows * dim, 1.0)).unwrap();
        let w = gpu.upload_bf16(&uniform(&mut rng, vocab * dim, 1.0)).unwrap();
        let b = gpu.upload(&uniform(&mut rng, vocab, 1.0)).unwrap();
        let mut out = CudaRowOutputs::new(&gpu, rows).unwrap();
        if dim % 8 != 0 {
            let err = cuda_forward(&gpu, &gemm, &shape, &x, &w, &b, &[0, 1, 2, 3], &mut out).unwrap_err();
            assert!(matches!(err, Error::Unsupported { what: "feature dimension", .. }), "{err}");
        } else {
            let err = cuda_forward(&gpu, &gemm, &shape, &x, &w, &b, &[0, 1, 37, 3], &mut out).unwrap_err();
            assert!(err.to_string().contains("row 2"), "{err}");
            // Training on bad input, every output poisoned first; returns the error and the outputs.
            let train = |targets: &[i32], db_len: usize, out: &mut CudaRowOutputs| {
                let mut dx = gpu.alloc::<bf16>(rows * dim).unwrap();
                let mut dw = gpu.alloc::<f32>(vocab * dim).unwrap();
                let mut db = gpu.alloc::<f32>(db_len).unwrap();
                out.poison().unwrap();
                dx.poison().unwrap();
                dw.poison().unwrap();
                db.poison().unwrap();
                let err = cuda_forward_backward(
                    &gpu, &gemm, &shape, &x, &w, &b, targets, 1.0, out, &mut dx, &mut dw, &mut db,
                )
                .unwrap_err();
                (err, dx, dw, db)
            };
            // The same bad target in training: every output keeps the bits it had.
            let (err, dx, dw, db) = train(&[0, -1, 2, 37], vocab, &mut out);
            assert!(err.to_string().contains("row 3"), "{err}");
            let rows_after = out.to_host().unwrap();
            assert!(
                rows_after.loss.iter().chain(&rows_after.lse).all(|v| v.to_bits() == u32::MAX),
                "row outputs written"
            );
            assert!(rows_after.argmax.iter().all(|&a| a == -1), "argmax written");
            assert!(dx.to_host().unwrap().iter().all(|v| v.to_bits() == u16::MAX), "dx written");
            assert!(
                dw.to_host().unwrap().iter().chain(&db.to_host().unwrap()).all(|v| v.to_bits() == u32::MAX),
                "dw/db written"
            );
            let err = cuda_forward(&gpu, &gemm, &shape, &x, &w, &b, &[0, 1, 2], &mut out).unwrap_err();
            assert!(matches!(err, Error::Shape { tensor: "targets", .. }), "{err}");
            let (err, ..) = train(&[0, 1, 2, 3], 1, &mut out);
            assert!(matches!(err, Error::Shape { tensor: "db", .. }), "{err}");
        }
    }
}
