//! GELU (erf form): the f64 erf against tabulated values and numerical integration, the CPU
//! reference against the formula and finite differences, and the kernels against the CPU.

use mapet::cpu::round_bf16;
use mapet::ops::gelu::{self, erf, gelu_f64, gelu_grad_f64};
use mapet::testing::{assert_within_baseline, gpu_or_skip, rng, uniform};
use mapet::Error;
use proptest::prelude::*;

fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    let mut r = v.to_vec();
    round_bf16(&mut r);
    r
}

/// erf by composite Simpson integration of 2/sqrt(pi) exp(-t^2) over [0, x]: independent of
/// the series and continued fraction in `gelu::erf`.
fn erf_by_quadrature(x: f64) -> f64 {
    let n = 20_000;
    let h = x / n as f64;
    let f = |t: f64| (-t * t).exp();
    let mut s = f(0.0) + f(x);
    for i in 1..n {
        s += if i % 2 == 1 { 4.0 } else { 2.0 } * f(i as f64 * h);
    }
    s * h / 3.0 * std::f64::consts::FRAC_2_SQRT_PI
}

#[test]
fn erf_matches_tabulated_values() {
    // Reference values of erf, correctly rounded to 16 digits.
    let table = [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (1.5, 0.966_105_146_475_310_7),
        (2.0, 0.995_322_265_018_952_7),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (3.5, 0.999_999_256_901_627_7),
        (4.0, 0.999_999_984_582_742_1),
    ];
    for (x, want) in table {
        let got = erf(x);
        assert!((got - want).abs() < 1e-15 + 1e-14 * want, "erf({x}) = {got}, want {want}");
        assert_eq!(erf(-x), -got, "erf is odd");
    }
    assert_eq!(erf(40.0), 1.0);
    assert!(erf(f64::NAN).is_nan());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn erf_matches_quadrature(x in -5.0f64..5.0) {
        let (got, want) = (erf(x), erf_by_quadrature(x));
        prop_assert!((got - want).abs() < 1e-12, "erf({}) = {}, quadrature {}", x, got, want);
    }

    #[test]
    fn cpu_matches_formula(n in 1usize..300, scale in 0.1f32..8.0, seed in any::<u64>()) {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let x = uniform(&mut rng, n, scale);
        let dy = uniform(&mut rng, n, 1.0);
        let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        gelu::cpu_forward(&x, &mut y).unwrap();
        gelu::cpu_backward(&x, &dy, &mut dx).unwrap();
        for i in 0..n {
            let xv = x[i] as f64;
            let phi = 0.5 * (1.0 + erf(xv / 2f64.sqrt()));
            let want_y = xv * phi;
            let want_dx = dy[i] as f64 * (phi + xv * (-xv * xv / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt());
            prop_assert!((y[i] as f64 - want_y).abs() <= 1e-7 * (1.0 + want_y.abs()), "y[{}]", i);
            prop_assert!((dx[i] as f64 - want_dx).abs() <= 1e-7 * (1.0 + want_dx.abs()), "dx[{}]", i);
        }
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let mut rng = rng("gelu cpu_backward_matches_finite_differences");
    let n = 400;
    let x = uniform(&mut rng, n, 5.0);
    let dy = uniform(&mut rng, n, 2.0);
    let mut dx = vec![0.0; n];
    gelu::cpu_backward(&x, &dy, &mut dx).unwrap();
    let h = 1e-2f32;
    let (xp, xm): (Vec<f32>, Vec<f32>) = x.iter().map(|&v| (v + h, v - h)).unzip();
    let (mut yp, mut ym) = (vec![0.0; n], vec![0.0; n]);
    gelu::cpu_forward(&xp, &mut yp).unwrap();
    gelu::cpu_forward(&xm, &mut ym).unwrap();
    for i in 0..n {
        let num = dy[i] as f64 * (yp[i] as f64 - ym[i] as f64) / (xp[i] as f64 - xm[i] as f64);
        let tol = 1e-3 * (1.0 + num.abs());
        assert!((dx[i] as f64 - num).abs() <= tol, "dx[{i}] at x = {}: analytic {}, numeric {num}", x[i], dx[i]);
        // The f64 helpers agree with each other too, at a finer step.
        let xv = x[i] as f64;
        let fd = (gelu_f64(xv + 1e-6) - gelu_f64(xv - 1e-6)) / 2e-6;
        assert!((gelu_grad_f64(xv) - fd).abs() < 1e-8, "gelu_grad_f64({xv})");
    }
}

#[test]
fn cpu_rejects_wrong_lengths() {
    let x = vec![0.5f32; 10];
    let mut short = vec![0.0f32; 9];
    let mut ok = vec![0.0f32; 10];
    assert!(matches!(gelu::cpu_forward(&x, &mut short), Err(Error::Shape { tensor: "y", .. })));
    assert!(matches!(gelu::cpu_backward(&x, &short.clone(), &mut ok), Err(Error::Shape { tensor: "dy", .. })));
    assert!(matches!(gelu::cpu_backward(&x, &x, &mut short), Err(Error::Shape { tensor: "dx", .. })));
}

/// Lengths that exercise the vector body, the n % 8 tail, and both together.
const LENGTHS: &[usize] = &[1, 7, 8, 9, 1000, 4099, 62 * 3072 + 5, (1 << 20) + 3];

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gelu gpu_matches_cpu") else { return };
    let mut rng = rng("gelu gpu_matches_cpu");
    for &n in LENGTHS {
        eprintln!("-- n = {n}");
        let x = bf16_rounded(&uniform(&mut rng, n, 5.0));
        let dy = bf16_rounded(&uniform(&mut rng, n, 2.0));
        let truth_y: Vec<f64> = x.iter().map(|&v| gelu_f64(v as f64)).collect();
        let truth_dx: Vec<f64> = x.iter().zip(&dy).map(|(&v, &d)| d as f64 * gelu_grad_f64(v as f64)).collect();
        let (mut by, mut bdx) = (vec![0.0; n], vec![0.0; n]);
        gelu::cpu_forward(&x, &mut by).unwrap();
        gelu::cpu_backward(&x, &dy, &mut bdx).unwrap();

        let (gx, gdy) = (gpu.upload_bf16(&x).unwrap(), gpu.upload_bf16(&dy).unwrap());
        let (mut gy, mut gdx) = (gpu.alloc(n).unwrap(), gpu.alloc(n).unwrap());
        gy.poison().unwrap();
        gdx.poison().unwrap();
        gelu::cuda_forward(&gpu, &gx, &mut gy).unwrap();
        gelu::cuda_backward(&gpu, &gx, &gdy, &mut gdx).unwrap();
        let (gy, gdx) = (gy.to_host_f32().unwrap(), gdx.to_host_f32().unwrap());
        assert_within_baseline("y", &gy, &bf16_rounded(&by), &truth_y, 2.0, 1e-6);
        assert_within_baseline("dx", &gdx, &bf16_rounded(&bdx), &truth_dx, 3.0, 1e-6);
    }
}

/// The one-pass backward that recomputes y writes what gelu_fwd and gelu_bwd write, bit for bit,
/// and adds the column sums of the dx it stores to the given sums; over shapes with one row, a
/// row wider than a block's 1024 columns, more rows than groups, and the model's width.
#[test]
fn gpu_backward_recompute_matches_the_two_kernels() {
    let test = "gelu gpu_backward_recompute_matches_the_two_kernels";
    let Some(gpu) = gpu_or_skip(test) else { return };
    let mut rng = rng(test);
    for (rows, cols) in [(1, 8), (5, 8), (7, 24), (3, 1032), (4099, 16), (2000, 3072)] {
        let n = rows * cols;
        let x = bf16_rounded(&uniform(&mut rng, n, 5.0));
        let dy = bf16_rounded(&uniform(&mut rng, n, 2.0));
        let sums0 = uniform(&mut rng, cols, 1.0);
        let (gx, gdy) = (gpu.upload_bf16(&x).unwrap(), gpu.upload_bf16(&dy).unwrap());
        let (mut gy, mut gdx) = (gpu.alloc(n).unwrap(), gpu.alloc(n).unwrap());
        gy.poison().unwrap();
        gdx.poison().unwrap();
        gelu::cuda_forward(&gpu, &gx, &mut gy).unwrap();
        gelu::cuda_backward(&gpu, &gx, &gdy, &mut gdx).unwrap();
        let (gy, gdx) = (gy.to_host_f32().unwrap(), gdx.to_host_f32().unwrap());

        let (mut ry, mut rdx) = (gpu.alloc(n).unwrap(), gpu.alloc(n).unwrap());
        ry.poison().unwrap();
        rdx.poison().unwrap();
        let mut sums = gpu.upload(&sums0).unwrap();
        gelu::cuda_backward_recompute(&gpu, &gx, &gdy, cols, &mut rdx, &mut ry, &mut sums).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let tag = format!("{rows} x {cols}");
        assert_eq!(bits(&ry.to_host_f32().unwrap()), bits(&gy), "{tag}: recomputed y differs from gelu_fwd's");
        assert_eq!(bits(&rdx.to_host_f32().unwrap()), bits(&gdx), "{tag}: dx differs from gelu_bwd's");
        // The sums are of the stored bf16 dx, in f32: against f64 sums of the same values, within
        // the f32 rounding bound n * 2^-24 * sum |terms| of a chain of n additions. A column's chain
        // is its group's rows, then a slice's groups (8 slices), then the 8 slices and the initial
        // value; the groups as the launcher picks them (about 8 blocks per SM). A lost or doubled
        // row (about sum |terms| / rows) stays well above it.
        let sums = sums.to_host().unwrap();
        let groups = (8 * gpu.sm_count() as usize).div_ceil((cols / 8).div_ceil(128)).clamp(1, rows);
        let chain = (rows.div_ceil(groups) + groups.div_ceil(8) + 10) as f64;
        for c in 0..cols {
            let col = (0..rows).map(|r| gdx[r * cols + c] as f64);
            let abs: f64 = col.clone().map(f64::abs).sum();
            let want = sums0[c] as f64 + col.sum::<f64>();
            let tol = chain * f32::EPSILON as f64 / 2.0 * (abs + sums0[c].abs() as f64) + 1e-12;
            assert!((sums[c] as f64 - want).abs() <= tol, "{tag}: column {c} sum {} against {want}", sums[c]);
        }
    }
}

#[test]
fn gpu_rejects_wrong_lengths() {
    let Some(gpu) = gpu_or_skip("gelu gpu_rejects_wrong_lengths") else { return };
    let x = gpu.upload_bf16(&[0.5; 10]).unwrap();
    let short = gpu.upload_bf16(&[0.5; 9]).unwrap();
    let mut out_short = gpu.alloc(9).unwrap();
    let mut out = gpu.alloc(10).unwrap();
    assert!(matches!(gelu::cuda_forward(&gpu, &x, &mut out_short), Err(Error::Shape { tensor: "y", .. })));
    assert!(matches!(gelu::cuda_backward(&gpu, &x, &short, &mut out), Err(Error::Shape { tensor: "dy", .. })));
    assert!(matches!(gelu::cuda_backward(&gpu, &x, &x, &mut out_short), Err(Error::Shape { tensor: "dx", .. })));
    let mut out2 = gpu.alloc(10).unwrap();
    let mut sums = gpu.alloc::<f32>(5).unwrap();
    let mut sums_short = gpu.alloc::<f32>(4).unwrap();
    assert!(matches!(
        gelu::cuda_backward_recompute(&gpu, &x, &x, 5, &mut out, &mut out_short, &mut sums),
        Err(Error::Shape { tensor: "y", .. })
    ));
    assert!(matches!(
        gelu::cuda_backward_recompute(&gpu, &x, &short, 5, &mut out, &mut out2, &mut sums),
        Err(Error::Shape { tensor: "dy", .. })
    ));
    assert!(matches!(
        gelu::cuda_backward_recompute(&gpu, &x, &x, 5, &mut out, &mut out2, &mut sums_short),
        Err(Error::Shape { tensor: "dx_col_sums", .. })
    ));
    // Rows of 5: not a multiple of 8.
    assert!(matches!(
        gelu::cuda_backward_recompute(&gpu, &x, &x, 5, &mut out, &mut out2, &mut sums),
        Err(Error::Shape { tensor: "x", .. })
    ));
}
