//! AdamW: the CPU reference against a hand-computed two-step example and a naive f64 loop, the
//! decay mask, and the kernel against the CPU reference.

use mapet::ops::adamw::{self, AdamWStep};
use mapet::testing::{assert_within_baseline, gpu_or_skip, rng, uniform};
use mapet::Error;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone)]
struct State {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<u8>,
}

fn random_state(rng: &mut impl Rng, n: usize) -> State {
    State {
        p: uniform(rng, n, 1.0),
        g: uniform(rng, n, 0.5),
        m: uniform(rng, n, 0.05),
        v: uniform(rng, n, 1.0).into_iter().map(|x| x * x * 1e-3).collect(),
        mask: (0..n).map(|_| rng.random_range(0..2u8)).collect(),
    }
}

fn random_step(rng: &mut impl Rng) -> AdamWStep {
    AdamWStep {
        lr: rng.random_range(1e-4f32..1e-1),
        beta1: rng.random_range(0.8f32..0.95),
        beta2: rng.random_range(0.99f32..0.9999),
        eps: 1e-8,
        weight_decay: rng.random_range(0.0f32..0.2),
        step: rng.random_range(1u64..2000),
        grad_scale: rng.random_range(0.1f32..2.0),
    }
}

/// The update written out per element in f64.
fn naive(s: &State, st: &AdamWStep) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b1, b2) = (st.beta1 as f64, st.beta2 as f64);
    let lr = st.lr as f64;
    let t = st.step as i32;
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let n = s.p.len();
    let (mut p, mut m, mut v) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for i in 0..n {
        let g = s.g[i] as f64 * st.grad_scale as f64;
        let mut pi = s.p[i] as f64;
        if s.mask[i] == 1 {
            pi -= lr * st.weight_decay as f64 * pi;
        }
        m[i] = b1 * s.m[i] as f64 + (1.0 - b1) * g;
        v[i] = b2 * s.v[i] as f64 + (1.0 - b2) * g * g;
        let m_hat = m[i] / bc1;
        let v_hat = v[i] / bc2;
        p[i] = pi - lr * m_hat / (v_hat.sqrt() + st.eps as f64);
    }
    (p, m, v)
}

fn cpu_run(s: &State, st: &AdamWStep) -> (State, Vec<f32>) {
    let mut o = s.clone();
    let mut copy = vec![f32::NAN; s.p.len()];
    adamw::cpu_step(&mut o.p, &o.g, &mut o.m, &mut o.v, &o.mask, st, Some(&mut copy)).unwrap();
    (o, copy)
}

#[test]
fn cpu_hand_computed_two_steps() {
    // lr 0.1, weight decay 0.05, betas 0.9 / 0.999, eps 1e-8.
    // Element 0 (decayed), p = 1, g = 0.5 then -0.25:
    //   step 1: p = 1 * (1 - 0.005) = 0.995; m = 0.05; v = 0.00025; m/bc1 = 0.05 / 0.1 = 0.5;
    //           v/bc2 = 0.00025 / 0.001 = 0.25; p = 0.995 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.895000002
    //   step 2: p = 0.895000002 * 0.995 = 0.890525002; m = 0.045 - 0.025 = 0.02;
    //           v = 0.00024975 + 0.0000625 = 0.00031225; bc1 = 0.19, bc2 = 0.001999;
    //           p = 0.890525002 - 0.1 * (0.02 / 0.19) / (sqrt(0.00031225 / 0.001999) + 1e-8)
    //             = 0.890525002 - 0.1 * 0.1052632 / 0.3952254 = 0.8638913
    // Element 1 (not decayed), p = -2, g = 0.3 twice:
    //   step 1: m = 0.03, v = 0.00009, m/bc1 = 0.3, sqrt(v/bc2) = 0.3: p = -2 - 0.1 = -2.1
    //   step 2: m = 0.057, v = 0.00017991, m/bc1 = 0.3, sqrt(v/bc2) = 0.3: p = -2.2
    let mut p = vec![1.0f32, -2.0];
    let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
    let mask = [1u8, 0];
    let mut copy = vec![0.0f32; 2];
    adamw::cpu_step(&mut p, &[0.5, 0.3], &mut m, &mut v, &mask, &AdamWStep::new(0.1, 1), Some(&mut copy)).unwrap();
    let close = |got: f32, want: f64, what: &str| {
        assert!((got as f64 - want).abs() < 2e-7 * (1.0 + want.abs()), "{what}: got {got}, want {want}");
    };
    close(p[0], 0.895000002, "p[0] after step 1");
    close(p[1], -2.099999996666667, "p[1] after step 1");
    close(m[0], 0.05, "m[0] after step 1");
    close(v[0], 0.00025, "v[0] after step 1");
    adamw::cpu_step(&mut p, &[-0.25, 0.3], &mut m, &mut v, &mask, &AdamWStep::new(0.1, 2), Some(&mut copy)).unwrap();
    close(p[0], 0.8638912986978463, "p[0] after step 2");
    close(p[1], -2.199999993333333, "p[1] after step 2");
    close(m[0], 0.02, "m[0] after step 2");
    close(v[0], 0.00031225, "v[0] after step 2");
    close(m[1], 0.057, "m[1] after step 2");
    close(v[1], 0.00017991, "v[1] after step 2");
    assert_eq!(copy, vec![half::bf16::from_f32(p[0]).to_f32(), half::bf16::from_f32(p[1]).to_f32()]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cpu_matches_naive_loop(n in 1usize..200, seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let s = random_state(&mut rng, n);
        let st = random_step(&mut rng);
        let (o, copy) = cpu_run(&s, &st);
        let (p, m, v) = naive(&s, &st);
        for i in 0..n {
            prop_assert!((o.p[i] as f64 - p[i]).abs() <= 1e-6 + 1e-5 * p[i].abs(), "p[{}]: {} vs {}", i, o.p[i], p[i]);
            prop_assert!((o.m[i] as f64 - m[i]).abs() <= 1e-8 + 1e-5 * m[i].abs(), "m[{}]: {} vs {}", i, o.m[i], m[i]);
            prop_assert!((o.v[i] as f64 - v[i]).abs() <= 1e-12 + 1e-5 * v[i].abs(), "v[{}]: {} vs {}", i, o.v[i], v[i]);
            prop_assert_eq!(copy[i], half::bf16::from_f32(o.p[i]).to_f32());
        }
    }
}

#[test]
fn cpu_decay_mask_selects_decayed_elements() {
    let mut rng = rng("adamw cpu_decay_mask_selects_decayed_elements");
    let n = 1000;
    let s = random_state(&mut rng, n);
    let st = AdamWStep { weight_decay: 0.1, ..AdamWStep::new(1e-2, 5) };
    let (mixed, _) = cpu_run(&s, &st);
    let (none, _) = cpu_run(&State { mask: vec![0; n], ..s.clone() }, &st);
    let (all, _) = cpu_run(&State { mask: vec![1; n], ..s.clone() }, &st);
    for i in 0..n {
        let want = if s.mask[i] == 1 { all.p[i] } else { none.p[i] };
        assert_eq!(mixed.p[i].to_bits(), want.to_bits(), "p[{i}] with mask {}", s.mask[i]);
        assert_ne!(all.p[i], none.p[i], "decay changed nothing at {i}");
        // The moments never depend on the mask.
        assert_eq!(mixed.m[i].to_bits(), none.m[i].to_bits());
        assert_eq!(mixed.v[i].to_bits(), all.v[i].to_bits());
    }
}

#[test]
fn cpu_rejects_bad_input() {
    let n = 8;
    let (mut p, g, mut m, mut v, mask) = (vec![0.5f32; n], vec![0.1f32; n], vec![0.0; n], vec![0.0; n], vec![1u8; n]);
    let st = AdamWStep::new(1e-3, 1);
    let short = vec![0.1f32; n - 1];
    let mut short_mut = short.clone();
    assert!(matches!(
        adamw::cpu_step(&mut p, &short, &mut m, &mut v, &mask, &st, None),
        Err(Error::Shape { tensor: "grad", .. })
    ));
    assert!(matches!(
        adamw::cpu_step(&mut p, &g, &mut short_mut, &mut v, &mask, &st, None),
        Err(Error::Shape { tensor: "m", .. })
    ));
    assert!(matches!(
        adamw::cpu_step(&mut p, &g, &mut m, &mut short_mut, &mask, &st, None),
        Err(Error::Shape { tensor: "v", .. })
    ));
    assert!(matches!(
        adamw::cpu_step(&mut p, &g, &mut m, &mut v, &mask[1..], &st, None),
        Err(Error::Shape { tensor: "decay_mask", .. })
    ));
    assert!(matches!(
        adamw::cpu_step(&mut p, &g, &mut m, &mut v, &mask, &st, Some(&mut short_mut)),
        Err(Error::Shape { tensor: "copy", .. })
    ));
    assert!(matches!(
        adamw::cpu_step(&mut p, &g, &mut m, &mut v, &mask, &AdamWStep::new(1e-3, 0), None),
        Err(Error::Unsupported { .. })
    ));
    assert_eq!(p, vec![0.5f32; n], "a refused step must not touch the parameters");
}

/// Lengths that exercise the vector body, the n % 4 tail, and both.
const LENGTHS: &[usize] = &[1, 3, 4, 5, 1000, 4099, (1 << 20) + 3];

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("adamw gpu_matches_cpu") else { return };
    let mut rng = rng("adamw gpu_matches_cpu");
    for &n in LENGTHS {
        for with_copy in [true, false] {
            eprintln!("-- n = {n}, copy {with_copy}");
            let s = random_state(&mut rng, n);
            let st = random_step(&mut rng);
            let (base, base_copy) = cpu_run(&s, &st);
            let (tp, tm, tv) = naive(&s, &st);

            let mut p = gpu.upload(&s.p).unwrap();
            let g = gpu.upload(&s.g).unwrap();
            let mut m = gpu.upload(&s.m).unwrap();
            let mut v = gpu.upload(&s.v).unwrap();
            let mask = gpu.upload(&s.mask).unwrap();
            let mut copy = gpu.alloc::<half::bf16>(n).unwrap();
            copy.poison().unwrap();
            adamw::cuda_step(&gpu, &mut p, &g, &mut m, &mut v, &mask, &st, with_copy.then_some(&mut copy)).unwrap();
            let gp = p.to_host().unwrap();
            assert_within_baseline("param", &gp, &base.p, &tp, 2.0, 1e-6);
            assert_within_baseline("m", &m.to_host().unwrap(), &base.m, &tm, 2.0, 1e-6);
            assert_within_baseline("v", &v.to_host().unwrap(), &base.v, &tv, 2.0, 1e-6);
            let gc = copy.to_host_f32().unwrap();
            if with_copy {
                assert_within_baseline("copy", &gc, &base_copy, &tp, 2.0, 1e-6);
                for i in 0..n {
                    assert_eq!(gc[i], half::bf16::from_f32(gp[i]).to_f32(), "copy[{i}] is not bf16(param)");
                }
            } else {
                assert!(gc.iter().all(|x| x.is_nan()), "copy written although not requested");
            }
        }
    }
}

#[test]
fn gpu_rejects_bad_input() {
    let Some(gpu) = gpu_or_skip("adamw gpu_rejects_bad_input") else { return };
    let n = 8;
    let mut p = gpu.upload(&vec![0.5f32; n]).unwrap();
    let g = gpu.upload(&vec![0.1f32; n]).unwrap();
    let g_short = gpu.upload(&vec![0.1f32; n - 1]).unwrap();
    let (mut m, mut v) = (gpu.zeros::<f32>(n).unwrap(), gpu.zeros::<f32>(n).unwrap());
    let mask = gpu.upload(&vec![1u8; n]).unwrap();
    let mask_short = gpu.upload(&vec![1u8; n + 1]).unwrap();
    let mut copy_short = gpu.alloc::<half::bf16>(n - 1).unwrap();
    let st = AdamWStep::new(1e-3, 1);
    assert!(matches!(
        adamw::cuda_step(&gpu, &mut p, &g_short, &mut m, &mut v, &mask, &st, None),
        Err(Error::Shape { tensor: "grad", .. })
    ));
    assert!(matches!(
        adamw::cuda_step(&gpu, &mut p, &g, &mut m, &mut v, &mask_short, &st, None),
        Err(Error::Shape { tensor: "decay_mask", .. })
    ));
    assert!(matches!(
        adamw::cuda_step(&gpu, &mut p, &g, &mut m, &mut v, &mask, &st, Some(&mut copy_short)),
        Err(Error::Shape { tensor: "copy", .. })
    ));
    assert!(matches!(
        adamw::cuda_step(&gpu, &mut p, &g, &mut m, &mut v, &mask, &AdamWStep::new(1e-3, 0), None),
        Err(Error::Unsupported { .. })
    ));
    assert_eq!(p.to_host().unwrap(), vec![0.5f32; n]);
}
