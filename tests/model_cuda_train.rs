//! The GPU training step (`model::cuda_train::train_step_cuda`) against the CPU one
//! (`model::train::train_step`, the reference) from the same state and batches, its handling of a
//! non-finite loss, and the state's round trip through the host. All tests skip without a GPU.
//!
//! Tolerances (norm-wise relative errors, `testing::rel_err`): the per-step loss, gradient norm
//! and clip factor within 2e-2 (what the GPU model's forward and gradients are held to in
//! tests/model_gpu.rs); after three steps the first moments (a linear function of the clipped,
//! averaged gradients) and the parameter updates within 5e-2, the second moments (squares of the
//! gradients, so about twice their relative error) within 1e-1. The recipe uses eps = 1, which
//! keeps AdamW in its linear regime (update ~ lr * m_hat for gradients far below 1): with the
//! paper's eps = 1e-8 the first update is lr * sign(g) per element, and bf16 noise on gradients
//! near zero flips whole lr-sized steps, which no relative tolerance describes.

use std::sync::Arc;

use mapet::error::Error;
use mapet::model::checkpoint;
use mapet::model::cpu::{Batch, CpuModel, Images};
use mapet::model::cuda::CudaModel;
use mapet::model::cuda_train::{train_step_cuda, train_step_cuda_observed, CudaTrainState, StepPoint};
use mapet::model::optim::LrSchedule;
use mapet::model::params::{Init, ModelConfig, ParamLayout};
use mapet::model::train::{train_step, Recipe, RngState, TrainState};
use mapet::testing::{gpu_or_skip, rel_err, rng, to_f64, uniform};
use rand::Rng;

/// Head dim 64 (what the attention kernels take): N = 17, C = 5, P = 12 per sample.
fn tiny_config() -> ModelConfig {
    ModelConfig { image: 32, patch: 8, dim: 128, depth: 3, heads: 2, vocab: 64, context: 5 }
}

/// The authors' init with the constant-initialised vectors perturbed, so every path has signal.
fn signal_state(layout: &ParamLayout, rng: &mut impl Rng) -> TrainState {
    let mut state = TrainState::new(layout, rng.random());
    for s in &layout.specs {
        if let Init::Const(c) = s.init {
            let scale = if c == 0.0 { 0.05 } else { 0.5 * c.abs() };
            for x in &mut state.params[s.range()] {
                *x = c + rng.random_range(-scale..scale);
            }
        }
    }
    state
}

fn random_batch(cfg: &ModelConfig, batch: usize, rng: &mut impl Rng) -> Batch {
    let n = cfg.n_tokens();
    let mut b = Batch {
        batch,
        images: Images::F32(uniform(rng, batch * 3 * cfg.image * cfg.image, 2.0)),
        tokens: (0..batch * (n - 1)).map(|_| rng.random_range(0..cfg.vocab as i32)).collect(),
        ranks: Vec::new(),
    };
    b.resample_ranks(cfg, rng);
    b
}

/// Two micro-batches, fresh permutations and drop path drawn from the state's generator, a
/// constant-ish rate, eps = 1 (see the module notes).
fn test_recipe() -> Recipe {
    let mut r = Recipe::paper(2048, 1);
    r.schedule = LrSchedule::new(0.1, 0, 1000);
    r.eps = 1.0;
    r.weight_decay = 0.05;
    r.drop_path = 0.3;
    r.micro_batches = 2;
    r.resample_ranks = true;
    r
}

fn setup(test: &str) -> Option<(Arc<mapet::cuda::Gpu>, CudaModel)> {
    let gpu = Arc::new(gpu_or_skip(test)?);
    let model = CudaModel::new(gpu.clone(), tiny_config(), 3).unwrap();
    Some((gpu, model))
}

fn close(failures: &mut Vec<String>, what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let err = rel_err(got, &to_f64(want));
    eprintln!("{what}: relative error {err:.3e} (tolerance {tol:.0e})");
    if err.is_nan() || err > tol {
        failures.push(format!("{what}: relative error {err:.3e} > {tol:.0e}"));
    }
}

#[test]
fn three_gpu_steps_match_the_cpu_steps() {
    let test = "three_gpu_steps_match_the_cpu_steps";
    let Some((gpu, mut model)) = setup(test) else { return };
    let cfg = tiny_config();
    let cpu = CpuModel::new(cfg).unwrap();
    let layout = &cpu.layout;
    let mut rng = rng(test);
    let state0 = signal_state(layout, &mut rng);
    let batches0 = vec![random_batch(&cfg, 2, &mut rng), random_batch(&cfg, 3, &mut rng)];
    let mut recipe = test_recipe();

    // Clip at a quarter of the first step's norm, so that the clip factor and 1/k meet in AdamW's
    // gradient scale at every step.
    let probe = train_step(&cpu, &mut state0.clone(), &recipe, &mut batches0.clone()).unwrap();
    recipe.clip_norm = 0.25 * probe.grad_norm;
    eprintln!("first-step gradient norm {:.4e}; clipping at {:.4e}", probe.grad_norm, recipe.clip_norm);

    let mut cpu_state = state0.clone();
    let mut cpu_batches = batches0.clone();
    let mut gpu_state = CudaTrainState::upload(&gpu, &mut model, &state0).unwrap();
    let mut gpu_batches = batches0.clone();
    let mut failures = Vec::new();
    for step in 1..=3u64 {
        let want = train_step(&cpu, &mut cpu_state, &recipe, &mut cpu_batches).unwrap();
        let mut points = Vec::new();
        let got =
            train_step_cuda_observed(&mut model, &mut gpu_state, &recipe, &mut gpu_batches, &mut |p| points.push(p))
                .unwrap();
        eprintln!("step {step}: cpu {want:?}\nstep {step}: gpu {got:?}");
        assert_eq!(points, [StepPoint::Start, StepPoint::GradientsQueued, StepPoint::UpdateQueued]);
        assert!(got.clip_scale < 1.0, "step {step}: clipping should be active (clip factor {})", got.clip_scale);
        close(&mut failures, &format!("step {step} loss"), &[got.loss], &[want.loss], 2e-2);
        close(&mut failures, &format!("step {step} grad_norm"), &[got.grad_norm], &[want.grad_norm], 2e-2);
        close(&mut failures, &format!("step {step} clip_scale"), &[got.clip_scale], &[want.clip_scale], 2e-2);
        assert_eq!(got.lr, want.lr, "step {step}: learning rate");
        assert_eq!(got.tokens, want.tokens, "step {step}: predicted tokens");
        assert!((0.0..=1.0).contains(&got.accuracy));
        // The same draws from the same generator: identical permutations and generator position.
        for (g, c) in gpu_batches.iter().zip(&cpu_batches) {
            assert_eq!(g.ranks, c.ranks, "step {step}: the GPU step drew other permutations");
        }
        assert_eq!(RngState::of(&gpu_state.rng), RngState::of(&cpu_state.rng), "step {step}: generator position");
        assert_eq!(gpu_state.step, step);
    }
    assert_ne!(cpu_batches[0].ranks, batches0[0].ranks, "fresh permutations should have been drawn");

    let got = gpu_state.download(&model).unwrap();
    assert_eq!((got.step, got.epoch), (cpu_state.step, cpu_state.epoch));
    mapet::testing::assert_all_written("parameters", &got.params);
    close(&mut failures, "first moments", &got.m, &cpu_state.m, 5e-2);
    close(&mut failures, "second moments", &got.v, &cpu_state.v, 1e-1);
    // Parameter updates, separately where AdamW decays and where it does not (a wrong decay mask
    // shows in one of the two).
    let mask = layout.decay_mask();
    for (class, decayed) in [("decayed", 1u8), ("not decayed", 0u8)] {
        let (mut dg, mut dc) = (Vec::new(), Vec::new());
        for i in (0..layout.total).filter(|&i| mask[i] == decayed) {
            dg.push(got.params[i] - state0.params[i]);
            dc.push(cpu_state.params[i] - state0.params[i]);
        }
        assert!(dc.iter().any(|&d| d != 0.0), "{class}: the CPU steps moved nothing");
        close(&mut failures, &format!("parameter updates ({class})"), &dg, &dc, 5e-2);
    }
    // The bf16 copy the GEMMs read was rewritten from the new parameters.
    let copy = model.params_bf16().to_host().unwrap();
    let stale = copy.iter().zip(&got.params).filter(|(c, &p)| **c != half::bf16::from_f32(p)).count();
    assert_eq!(stale, 0, "{stale} values of the bf16 copy differ from the rounded parameters");
    assert!(failures.is_empty(), "GPU vs CPU training steps:\n{}", failures.join("\n"));
}

#[test]
fn non_finite_loss_names_the_step_and_leaves_the_state_unchanged() {
    let test = "non_finite_loss_names_the_step_and_leaves_the_state_unchanged";
    let Some((gpu, mut model)) = setup(test) else { return };
    let cfg = tiny_config();
    let layout = ParamLayout::new(cfg).unwrap();
    let mut rng = rng(test);
    let mut recipe = test_recipe();
    recipe.eps = 1e-8;
    let mut state = CudaTrainState::upload(&gpu, &mut model, &signal_state(&layout, &mut rng)).unwrap();
    let mut batches = vec![random_batch(&cfg, 3, &mut rng), random_batch(&cfg, 3, &mut rng)];
    // One good step first, so that moments, counters and the generator have moved.
    train_step_cuda(&mut model, &mut state, &recipe, &mut batches).unwrap();

    let before = state.download(&model).unwrap();
    let copy_before = model.params_bf16().to_host().unwrap();
    let ranks_before: Vec<Vec<i32>> = batches.iter().map(|b| b.ranks.clone()).collect();
    // A whole image of NaN: every row of that sample (its context included) is NaN, so the loss
    // is NaN whatever the kernels do with masked keys.
    let per_image = batches[1].images.len() / batches[1].batch;
    let image = rng.random_range(0..batches[1].batch);
    let pixels = batches[1].images.as_f32_mut().expect("f32 batches");
    let saved: Vec<f32> = pixels[image * per_image..(image + 1) * per_image].to_vec();
    pixels[image * per_image..(image + 1) * per_image].fill(f32::NAN);
    let err = train_step_cuda(&mut model, &mut state, &recipe, &mut batches).expect_err("a NaN image must fail");
    eprintln!("{err}");
    match &err {
        Error::NonFinite { step, what } => {
            assert_eq!(*step, before.step + 1, "the error must name the failing step");
            assert_eq!(*what, "loss");
        }
        other => panic!("expected a non-finite loss error, got {other}"),
    }
    assert!(err.to_string().contains(&format!("step {}", before.step + 1)), "{err}");

    let after = state.download(&model).unwrap();
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&after.params, &before.params), "parameters changed");
    assert!(same(&after.m, &before.m), "first moments changed");
    assert!(same(&after.v, &before.v), "second moments changed");
    assert_eq!((after.step, after.epoch), (before.step, before.epoch), "counters changed");
    assert_eq!(RngState::of(&after.rng), RngState::of(&before.rng), "the generator moved");
    assert!(model.params_bf16().to_host().unwrap() == copy_before, "the bf16 copy changed");
    for (b, r) in batches.iter().zip(&ranks_before) {
        assert_eq!(&b.ranks, r, "the batches' ranks were not restored");
    }

    // With the image restored the same step goes through.
    batches[1].images.as_f32_mut().expect("f32 batches")[image * per_image..(image + 1) * per_image]
        .copy_from_slice(&saved);
    let stats = train_step_cuda(&mut model, &mut state, &recipe, &mut batches).unwrap();
    assert!(stats.loss.is_finite());
    assert_eq!(state.step, before.step + 1);
}

#[test]
fn state_round_trips_through_the_host_and_a_checkpoint() {
    let test = "state_round_trips_through_the_host_and_a_checkpoint";
    let Some((gpu, mut model)) = setup(test) else { return };
    let layout = ParamLayout::new(tiny_config()).unwrap();
    let mut rng = rng(test);
    let mut host = signal_state(&layout, &mut rng);
    host.m = uniform(&mut rng, layout.total, 1e-2);
    host.v = uniform(&mut rng, layout.total, 1e-4).into_iter().map(f32::abs).collect();
    (host.step, host.epoch) = (rng.random_range(1..1000), rng.random_range(0..10));
    let state = CudaTrainState::upload(&gpu, &mut model, &host).unwrap();
    let back = state.download(&model).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.params), bits(&host.params));
    assert_eq!(bits(&back.m), bits(&host.m));
    assert_eq!(bits(&back.v), bits(&host.v));
    assert_eq!((back.step, back.epoch), (host.step, host.epoch));
    assert_eq!(RngState::of(&back.rng), RngState::of(&host.rng));

    // Through a checkpoint folder and back onto the device.
    let dir = std::env::temp_dir().join(format!("mapet-cuda-train-{}-{}", std::process::id(), rng.random::<u32>()));
    checkpoint::save(&dir, &layout, &test_recipe(), &back).unwrap();
    let loaded = checkpoint::load(&dir, &layout.config).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let again = CudaTrainState::upload(&gpu, &mut model, &loaded.state).unwrap();
    assert_eq!(again.decay_mask.to_host().unwrap(), layout.decay_mask(), "the decay mask comes from the layout");
    let back = again.download(&model).unwrap();
    assert_eq!(bits(&back.params), bits(&host.params));
    assert_eq!(bits(&back.m), bits(&host.m));
    assert_eq!((back.step, back.epoch), (host.step, host.epoch));
    assert_eq!(RngState::of(&back.rng), RngState::of(&host.rng));
}
