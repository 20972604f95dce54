//! Residual helpers (`ops::residual`): the CPU references against f64 formulas, and the kernels
//! against the CPU (layer-scale residual forward and backward, row copies, f32 vector ops), run
//! through views into larger buffers as the model does. GPU tests skip without a GPU.

use half::bf16;
use mapet::cpu::round_bf16;
use mapet::cuda::{DeviceBuffer, Gpu};
use mapet::ops::residual::{self, LayerScaleShape, RowCopy};
use mapet::testing::{assert_all_written, assert_within_baseline, gpu_or_skip, rng, uniform, uniform_bf16};
use mapet::Error;
use rand::Rng;

fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    let mut r = v.to_vec();
    round_bf16(&mut r);
    r
}

/// Per-sample drop-path scales with both a dropped (0) and a kept (1/keep) sample when there
/// are at least two samples.
fn drop_scales(rng: &mut impl Rng, samples: usize) -> Vec<f32> {
    let mut s: Vec<f32> = (0..samples).map(|_| if rng.random::<f32>() < 0.3 { 0.0 } else { 1.0 / 0.9 }).collect();
    if samples >= 2 {
        s[0] = 0.0;
        s[1] = 1.0 / 0.9;
    }
    s
}

/// f64 truth of the forward.
fn forward64(shape: &LayerScaleShape, x: &[f32], y: &[f32], gamma: &[f32], scale: &[f32]) -> Vec<f64> {
    let c = shape.cols;
    (0..shape.len())
        .map(|i| {
            let s = scale[i / c / shape.rows_per_sample] as f64;
            x[i] as f64 + s * gamma[i % c] as f64 * y[i] as f64
        })
        .collect()
}

/// f64 truth of the backward: (dy, sum over rows of dout * s * y).
fn backward64(shape: &LayerScaleShape, dout: &[f32], y: &[f32], gamma: &[f32], scale: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let c = shape.cols;
    let mut dy = vec![0.0f64; shape.len()];
    let mut dg = vec![0.0f64; c];
    for i in 0..shape.len() {
        let s = scale[i / c / shape.rows_per_sample] as f64;
        dy[i] = dout[i] as f64 * s * gamma[i % c] as f64;
        dg[i % c] += dout[i] as f64 * s * y[i] as f64;
    }
    (dy, dg)
}

#[test]
fn cpu_layer_scale_matches_the_formula_and_is_its_gradient() {
    let mut rng = rng("cpu_layer_scale_matches_the_formula_and_is_its_gradient");
    let shape = LayerScaleShape { samples: 3, rows_per_sample: 7, cols: 12 };
    let x = uniform(&mut rng, shape.len(), 2.0);
    let y = uniform(&mut rng, shape.len(), 2.0);
    let gamma = uniform(&mut rng, shape.cols, 0.5);
    let scale = drop_scales(&mut rng, shape.samples);
    let mut out = vec![0.0; shape.len()];
    residual::cpu_layer_scale_forward(&shape, &x, &y, &gamma, &scale, &mut out).unwrap();
    let want = forward64(&shape, &x, &y, &gamma, &scale);
    for (g, w) in out.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "forward {g} vs {w}");
    }
    // The backward of L = sum(w * out) is dy = w * s * gamma, dgamma = sum w * s * y (the
    // forward is linear in y and gamma); dgamma is accumulated onto what it held.
    let dout = uniform(&mut rng, shape.len(), 1.0);
    let mut dy = vec![f32::NAN; shape.len()];
    let start = uniform(&mut rng, shape.cols, 1.0);
    let mut dgamma = start.clone();
    residual::cpu_layer_scale_backward(&shape, &dout, &y, &gamma, &scale, &mut dy, &mut dgamma).unwrap();
    let (dy64, dg64) = backward64(&shape, &dout, &y, &gamma, &scale);
    for (g, w) in dy.iter().zip(&dy64) {
        assert!((*g as f64 - w).abs() < 1e-5, "dy {g} vs {w}");
    }
    for ((g, w), s0) in dgamma.iter().zip(&dg64).zip(&start) {
        assert!((*g as f64 - (w + *s0 as f64)).abs() < 1e-4, "dgamma {g} vs {w} + {s0}");
    }
    // A finite difference through gamma confirms the sign and the scale convention.
    let (c0, h) = (5usize, 1e-2f32);
    let loss = |g: &[f32]| -> f64 {
        let mut o = vec![0.0; shape.len()];
        residual::cpu_layer_scale_forward(&shape, &x, &y, g, &scale, &mut o).unwrap();
        o.iter().zip(&dout).map(|(&o, &d)| o as f64 * d as f64).sum()
    };
    let (mut gp, mut gm) = (gamma.clone(), gamma.clone());
    gp[c0] += h;
    gm[c0] -= h;
    let fd = (loss(&gp) - loss(&gm)) / (2.0 * h as f64);
    assert!((fd - dg64[c0]).abs() < 1e-3 * (1.0 + fd.abs()), "finite difference {fd} vs {}", dg64[c0]);
}

#[test]
fn cpu_row_copies_gather_scatter_and_accumulate() {
    let mut rng = rng("cpu_row_copies_gather_scatter_and_accumulate");
    let (batch, cols, rows, row0, count) = (3, 8, 10, 4, 5);
    let full = uniform(&mut rng, batch * rows * cols, 1.0);
    let gather = RowCopy::gather(batch, cols, rows, row0, count);
    let mut packed = vec![f32::NAN; gather.dst_len()];
    residual::cpu_copy_rows(&gather, &full, &mut packed, false).unwrap();
    for b in 0..batch {
        for i in 0..count {
            let src = &full[((b * rows) + row0 + i) * cols..][..cols];
            assert_eq!(&packed[(b * count + i) * cols..][..cols], src);
        }
    }
    let scatter = RowCopy::scatter(batch, cols, rows, row0, count);
    let mut back = uniform(&mut rng, batch * rows * cols, 1.0);
    let before = back.clone();
    residual::cpu_copy_rows(&scatter, &packed, &mut back, true).unwrap();
    for b in 0..batch {
        for r in 0..rows {
            for c in 0..cols {
                let i = (b * rows + r) * cols + c;
                let want = if (row0..row0 + count).contains(&r) { before[i] + full[i] } else { before[i] };
                assert_eq!(back[i], want, "sample {b}, row {r}, col {c}");
            }
        }
    }
    assert!(residual::cpu_copy_rows(&scatter, &packed[1..], &mut back, false).is_err());
}

// ------------------------------------------------------------------------------------------ GPU

fn upload_bf16(gpu: &Gpu, v: &[f32]) -> DeviceBuffer<bf16> {
    gpu.upload_bf16(v).unwrap()
}

/// Runs the layer-scale forward and backward on the GPU through views at offset `pad` of larger
/// buffers and compares with the CPU (DESIGN.md rule), the backward twice for determinism.
fn layer_scale_case(gpu: &Gpu, rng: &mut impl Rng, shape: LayerScaleShape) {
    let label = format!("{shape:?}");
    let n = shape.len();
    let pad = 8; // 16 bytes of bf16, 32 of f32: views stay aligned
    let x = uniform_bf16(rng, n, 2.0);
    let y = uniform_bf16(rng, n, 2.0);
    let dout = uniform_bf16(rng, n, 1.0);
    let gamma = uniform(rng, shape.cols, 0.5);
    let scale = drop_scales(rng, shape.samples);
    let start = uniform(rng, shape.cols, 1.0);

    let big = |v: &[f32]| -> Vec<f32> { [vec![0.5; pad], v.to_vec(), vec![0.5; pad]].concat() };
    let dx = upload_bf16(gpu, &big(&x));
    let dy_in = upload_bf16(gpu, &big(&y));
    let d_dout = upload_bf16(gpu, &big(&dout));
    let d_gamma = gpu.upload(&big(&gamma)).unwrap();
    let d_scale = gpu.upload(&scale).unwrap();
    let mut d_out = gpu.alloc::<bf16>(n + 2 * pad).unwrap();
    d_out.poison().unwrap();
    residual::cuda_layer_scale_forward(
        gpu,
        &shape,
        &dx.view(pad..pad + n).unwrap(),
        &dy_in.view(pad..pad + n).unwrap(),
        &d_gamma.view(pad..pad + shape.cols).unwrap(),
        &d_scale,
        &mut d_out.view_mut(pad..pad + n).unwrap(),
    )
    .unwrap();
    let all = d_out.to_host_f32().unwrap();
    assert!(all[..pad].iter().chain(&all[pad + n..]).all(|v| v.is_nan()), "{label}: wrote outside the view");
    let got = &all[pad..pad + n];
    let mut base = vec![0.0; n];
    residual::cpu_layer_scale_forward(&shape, &x, &y, &gamma, &scale, &mut base).unwrap();
    let truth = forward64(&shape, &x, &y, &gamma, &scale);
    assert_within_baseline(&format!("{label}: out"), got, &bf16_rounded(&base), &truth, 2.0, 1e-6);

    // The backward, alone or also summing dy's columns into sums0 (a Linear's bias gradient).
    let sums0 = uniform(rng, shape.cols, 1.0);
    let run_backward = |with_sums: bool| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut d_dy = gpu.alloc::<bf16>(n).unwrap();
        d_dy.poison().unwrap();
        let mut d_dg = gpu.upload(&start).unwrap();
        let mut d_sums = gpu.upload(&sums0).unwrap();
        residual::cuda_layer_scale_backward(
            gpu,
            &shape,
            &d_dout.view(pad..pad + n).unwrap(),
            &dy_in.view(pad..pad + n).unwrap(),
            &d_gamma.view(pad..pad + shape.cols).unwrap(),
            &d_scale,
            &mut d_dy,
            &mut d_dg,
            if with_sums { Some(&mut d_sums as &mut dyn mapet::cuda::DeviceWrite<f32>) } else { None },
        )
        .unwrap();
        (d_dy.to_host_f32().unwrap(), d_dg.to_host().unwrap(), d_sums.to_host().unwrap())
    };
    let (got_dy, got_dg, untouched) = run_backward(false);
    assert!(untouched.iter().zip(&sums0).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: sums written unasked");
    let mut base_dy = vec![0.0; n];
    let mut base_dg = start.clone();
    residual::cpu_layer_scale_backward(&shape, &dout, &y, &gamma, &scale, &mut base_dy, &mut base_dg).unwrap();
    let (dy64, dg64) = backward64(&shape, &dout, &y, &gamma, &scale);
    let dg64: Vec<f64> = dg64.iter().zip(&start).map(|(g, &s)| g + s as f64).collect();
    assert_within_baseline(&format!("{label}: dy"), &got_dy, &bf16_rounded(&base_dy), &dy64, 3.0, 1e-6);
    assert_within_baseline(&format!("{label}: dgamma"), &got_dg, &base_dg, &dg64, 3.0, 1e-5);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (again_dy, again_dg, _) = run_backward(false);
    assert_all_written(&format!("{label}: dy"), &again_dy);
    assert!(
        bits(&again_dy) == bits(&got_dy) && bits(&again_dg) == bits(&got_dg),
        "{label}: backward not bit-identical run to run"
    );
    // Summing dy's columns changes neither dy nor dgamma, and the sums are those of the stored dy.
    let (sum_dy, sum_dg, sums) = run_backward(true);
    assert!(bits(&sum_dy) == bits(&got_dy) && bits(&sum_dg) == bits(&got_dg), "{label}: sums changed dy or dgamma");
    // Within the f32 rounding bound n * 2^-24 * sum |terms| of a chain of n additions: a chunk's
    // rows, then a slice's chunks (16 slices), then the slices and the initial value.
    let cols = shape.cols;
    let chain = (shape.chunk_rows() + shape.chunks().div_ceil(16) + 17) as f64;
    for c in 0..cols {
        let col = (0..shape.rows()).map(|r| got_dy[r * cols + c] as f64);
        let abs: f64 = col.clone().map(f64::abs).sum::<f64>() + sums0[c].abs() as f64;
        let want = sums0[c] as f64 + col.sum::<f64>();
        assert!(
            (sums[c] as f64 - want).abs() <= chain * f32::EPSILON as f64 / 2.0 * abs + 1e-12,
            "{label}: column {c} sum {} against {want}",
            sums[c]
        );
    }
}

#[test]
fn gpu_layer_scale_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_layer_scale_matches_cpu") else { return };
    let mut rng = rng("gpu_layer_scale_matches_cpu");
    for shape in [
        LayerScaleShape { samples: 2, rows_per_sample: 39, cols: 64 },
        LayerScaleShape { samples: 3, rows_per_sample: 37, cols: 8 },
        LayerScaleShape { samples: 5, rows_per_sample: 101, cols: 776 },
        LayerScaleShape { samples: 1, rows_per_sample: 1, cols: 16 },
        // One row a sample: the scale changes at every row.
        LayerScaleShape { samples: 70, rows_per_sample: 1, cols: 24 },
        LayerScaleShape { samples: 8, rows_per_sample: 491, cols: 768 },
        // More rows than LAYER_SCALE_CHUNK_ROWS * MAX_CHUNKS: chunks of 74 rows (not 64), 4055
        // chunks, the last one partial.
        LayerScaleShape { samples: 600, rows_per_sample: 500, cols: 8 },
    ] {
        layer_scale_case(&gpu, &mut rng, shape);
    }
}

#[test]
fn gpu_row_copies_match_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_row_copies_match_cpu") else { return };
    let mut rng = rng("gpu_row_copies_match_cpu");
    // (batch, cols, rows, row0, count): the model's key rows (first N + P) and query rows (last P).
    for (batch, cols, rows, row0, count) in
        [(2, 64, 39, 0, 28), (2, 64, 39, 28, 11), (3, 8, 5, 2, 3), (4, 776, 9, 0, 9)]
    {
        let label = format!("batch {batch}, cols {cols}, rows {rows}, [{row0}, {})", row0 + count);
        let full = uniform_bf16(&mut rng, batch * rows * cols, 1.0);
        let gather = RowCopy::gather(batch, cols, rows, row0, count);
        let d_full = upload_bf16(&gpu, &full);
        let mut d_packed = gpu.alloc::<bf16>(gather.dst_len()).unwrap();
        d_packed.poison().unwrap();
        residual::cuda_copy_rows(&gpu, &gather, &d_full, &mut d_packed, false).unwrap();
        let got = d_packed.to_host_f32().unwrap();
        let mut want = vec![0.0; gather.dst_len()];
        residual::cpu_copy_rows(&gather, &full, &mut want, false).unwrap();
        assert_all_written(&format!("{label}: gather"), &got);
        assert_eq!(got, want, "{label}: gather");

        // Scatter (plain and accumulating) into a destination holding other values: rows outside
        // the range must keep them.
        let packed = uniform_bf16(&mut rng, gather.dst_len(), 1.0);
        let d_src = upload_bf16(&gpu, &packed);
        let scatter = RowCopy::scatter(batch, cols, rows, row0, count);
        for accumulate in [false, true] {
            let dst = uniform_bf16(&mut rng, scatter.dst_len(), 1.0);
            let mut d_dst = upload_bf16(&gpu, &dst);
            residual::cuda_copy_rows(&gpu, &scatter, &d_src, &mut d_dst, accumulate).unwrap();
            let got = d_dst.to_host_f32().unwrap();
            let mut want = dst.clone();
            residual::cpu_copy_rows(&scatter, &packed, &mut want, accumulate).unwrap();
            round_bf16(&mut want);
            assert_eq!(got, want, "{label}: scatter (accumulate {accumulate})");
        }
    }
}

#[test]
fn gpu_vector_ops_are_exact() {
    let Some(gpu) = gpu_or_skip("gpu_vector_ops_are_exact") else { return };
    let mut rng = rng("gpu_vector_ops_are_exact");
    for n in [1usize, 7, 1000, 100_003] {
        let x = uniform(&mut rng, n, 3.0);
        let y = uniform(&mut rng, n, 3.0);
        let d_x = gpu.upload(&x).unwrap();
        let mut d_y = gpu.upload(&y).unwrap();
        residual::cuda_add_f32(&gpu, &d_x, &mut d_y).unwrap();
        let got = d_y.to_host().unwrap();
        assert!(got.iter().zip(x.iter().zip(&y)).all(|(g, (a, b))| *g == b + a), "add_f32, n = {n}");

        let mut d_h = gpu.alloc::<bf16>(n).unwrap();
        d_h.poison().unwrap();
        residual::cuda_f32_to_bf16(&gpu, &d_x, &mut d_h).unwrap();
        let got = d_h.to_host().unwrap();
        assert!(got.iter().zip(&x).all(|(g, &a)| *g == bf16::from_f32(a)), "f32_to_bf16, n = {n}");
    }
}

#[test]
fn gpu_views_check_ranges_and_alignment() {
    let Some(gpu) = gpu_or_skip("gpu_views_check_ranges_and_alignment") else { return };
    let mut buf = gpu.zeros::<bf16>(64).unwrap();
    assert!(buf.view(10..65).is_err());
    let (start, end) = (3, 2);
    assert!(buf.view_mut(start..end).is_err());
    assert!(buf.views_mut([0..8, 7..9]).is_err());
    let [mut a, b] = buf.views_mut([0..8, 8..16]).unwrap();
    assert_eq!((a.len(), b.len()), (8, 8));
    a.copy_from_host(&[bf16::from_f32(1.5); 8]).unwrap();
    assert_eq!(a.view(2..4).unwrap().to_host().unwrap(), vec![bf16::from_f32(1.5); 2]);
    // A view at an odd bf16 offset is refused by kernels that need 16-byte vectors.
    let shape = LayerScaleShape { samples: 1, rows_per_sample: 1, cols: 8 };
    let x = gpu.zeros::<bf16>(16).unwrap();
    let g = gpu.zeros::<f32>(8).unwrap();
    let s = gpu.upload(&[1.0f32]).unwrap();
    let mut out = gpu.zeros::<bf16>(8).unwrap();
    let err = residual::cuda_layer_scale_forward(
        &gpu,
        &shape,
        &x.view(1..9).unwrap(),
        &x.view(8..16).unwrap(),
        &g,
        &s,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Alignment { tensor: "x", .. }), "{err}");
    // Lengths are checked against the shape.
    let err =
        residual::cuda_layer_scale_forward(&gpu, &shape, &x.view(0..8).unwrap(), &x, &g, &s, &mut out).unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "y", .. }), "{err}");
}
