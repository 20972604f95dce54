//! Global L2 norm: the CPU reference against a naive loop, and the two-pass kernel against the
//! CPU (accuracy and run-to-run bit equality).

use mapet::ops::gradnorm;
use mapet::testing::{assert_within_baseline, gpu_or_skip, rng, uniform};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn naive_norm(x: &[f32]) -> f64 {
    let mut s = 0.0f64;
    for &v in x {
        s += (v as f64) * (v as f64);
    }
    s.sqrt()
}

/// The same-precision baseline: a plain f32 running sum.
fn f32_norm(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s.sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cpu_matches_naive(n in 0usize..300_000, scale in 1e-3f32..1e3, seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = uniform(&mut rng, n, scale);
        let got = gradnorm::cpu_l2_norm(&x) as f64;
        let want = naive_norm(&x);
        prop_assert!((got - want).abs() <= 1e-7 * want, "{} vs {}", got, want);
    }
}

#[test]
fn cpu_known_values() {
    assert_eq!(gradnorm::cpu_l2_norm(&[]), 0.0);
    assert_eq!(gradnorm::cpu_l2_norm(&[3.0, -4.0]), 5.0);
    let mut rng = rng("gradnorm cpu_known_values");
    // n copies of c have norm |c| sqrt(n).
    let c = uniform(&mut rng, 1, 2.0)[0];
    let n = 1 << 18;
    let got = gradnorm::cpu_l2_norm(&vec![c; n]) as f64;
    let want = (c as f64).abs() * (n as f64).sqrt();
    assert!((got - want).abs() <= 1e-7 * want, "{got} vs {want}");
}

/// Lengths around the vector width and the partial count limits, up to ViT-B scale / 8.
const LENGTHS: &[usize] = &[1, 3, 4, 5, 4095, 4096, 4097, 1 << 20, (1 << 22) + 7, 10_800_003];

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gradnorm gpu_matches_cpu") else { return };
    let mut rng = rng("gradnorm gpu_matches_cpu");
    for &n in LENGTHS {
        let x = uniform(&mut rng, n, 0.01);
        let truth = naive_norm(&x);
        let base = f32_norm(&x);
        let dx = gpu.upload(&x).unwrap();
        let got = gradnorm::cuda_l2_norm(&gpu, &dx).unwrap();
        eprintln!("-- n = {n}: gpu {got}, cpu f64 {truth}, f32 running sum {base}");
        assert_within_baseline("norm", &[got], &[base], &[truth], 2.0, 1e-6);
    }
    assert_eq!(gradnorm::cuda_l2_norm(&gpu, &gpu.alloc::<f32>(0).unwrap()).unwrap(), 0.0);
}

#[test]
fn gpu_is_deterministic() {
    let Some(gpu) = gpu_or_skip("gradnorm gpu_is_deterministic") else { return };
    let mut rng = rng("gradnorm gpu_is_deterministic");
    for n in [5_000_001, 1 << 16] {
        let x = gpu.upload(&uniform(&mut rng, n, 1.0)).unwrap();
        let a = gradnorm::cuda_l2_norm(&gpu, &x).unwrap();
        for _ in 0..3 {
            let b = gradnorm::cuda_l2_norm(&gpu, &x).unwrap();
            assert_eq!(a.to_bits(), b.to_bits(), "norm differs between runs (n = {n}): {a} vs {b}");
        }
    }
}
