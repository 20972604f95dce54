//! The training step over the CPU model: the schedule and clipping formulas, a finite-difference
//! check of the whole model's gradient, overfitting one batch, gradient accumulation, and a
//! non-finite loss.

use mapet::error::Error;
use mapet::model::cpu::{Batch, CpuModel, Images};
use mapet::model::optim::{clip_scale, scaled_peak_lr, LrSchedule};
use mapet::model::params::{Init, ModelConfig};
use mapet::model::train::{train_step, Recipe, TrainState};
use mapet::testing;
use rand::Rng;

/// N = 17 tokens (16 patches + CLS), C = 5 context, P = 12 predicted per sample.
const TINY: ModelConfig = ModelConfig { image: 16, patch: 4, dim: 16, depth: 2, heads: 2, vocab: 11, context: 5 };

fn random_batch(cfg: &ModelConfig, batch: usize, rng: &mut impl Rng) -> Batch {
    let n = cfg.n_tokens();
    let mut b = Batch {
        batch,
        images: Images::F32(testing::uniform(rng, batch * 3 * cfg.image * cfg.image, 1.0)),
        tokens: (0..batch * (n - 1)).map(|_| rng.random_range(0..cfg.vocab as i32)).collect(),
        ranks: Vec::new(),
    };
    b.resample_ranks(cfg, rng);
    b
}

/// A recipe for tests: no warmup (the first update runs at `peak`), no drop path, given ranks.
fn test_recipe(peak: f32, total: u64, micro: usize) -> Recipe {
    let mut r = Recipe::paper(2048, 1);
    r.schedule = LrSchedule::new(peak, 0, total);
    r.drop_path = 0.0;
    r.micro_batches = micro;
    r.resample_ranks = false;
    r
}

fn close(got: f32, want: f64, rel: f64) -> bool {
    (got as f64 - want).abs() <= rel * want.abs()
}

#[test]
fn schedule_follows_the_formulas() {
    let (peak, start, end) = (1e-3f64, 1e-6f64, 1e-5f64);
    let s = LrSchedule::new(peak as f32, 10, 110);
    let cosine = |t: f64| end + (peak - end) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
    let cases: [(u64, f64); 9] = [
        (0, start),
        (1, start + (peak - start) * 0.1),
        (5, start + (peak - start) * 0.5),
        (9, start + (peak - start) * 0.9),
        (10, peak),
        (35, cosine(0.25)),
        (60, end + (peak - end) * 0.5),
        (110, end),
        (10_000, end),
    ];
    for (step, want) in cases {
        let got = s.lr(step);
        assert!(close(got, want, 1e-6), "lr({step}) = {got:e}, want {want:e}");
    }
    let lrs: Vec<f32> = (0..=120).map(|t| s.lr(t)).collect();
    assert!(lrs[..=10].windows(2).all(|w| w[0] < w[1]), "warmup must increase");
    assert!(lrs[10..=110].windows(2).all(|w| w[0] > w[1]), "cosine must decrease");

    // The paper's numbers: 1.5e-3 at 2048, linear in the batch; 10 warmup epochs of 300.
    assert_eq!(scaled_peak_lr(1.5e-3, 2048), 1.5e-3);
    assert!(close(scaled_peak_lr(1.5e-3, 1024), 7.5e-4, 1e-7));
    assert!(close(scaled_peak_lr(1.5e-3, 256), 1.875e-4, 1e-7));
    let r = Recipe::default();
    assert_eq!((r.schedule.warmup_steps, r.schedule.total_steps), (6250, 187_500));
    assert_eq!((r.schedule.warmup_start_lr, r.schedule.final_lr, r.schedule.peak_lr), (1e-6, 1e-5, 1.5e-3));
    assert_eq!((r.weight_decay, r.beta1, r.beta2, r.eps, r.clip_norm, r.drop_path), (0.05, 0.9, 0.999, 1e-8, 3.0, 0.1));
    r.validate().unwrap();
}

#[test]
fn clip_scale_is_pytorchs() {
    let mut rng = testing::rng("clip_scale_is_pytorchs");
    for _ in 0..100 {
        let max = rng.random_range(0.1f32..10.0);
        let norm = rng.random_range(0.0f32..100.0);
        let want = (max as f64 / (norm as f64 + 1e-6)).min(1.0);
        let got = clip_scale(norm, max);
        assert!(close(got, want, 1e-6), "clip_scale({norm}, {max}) = {got}, want {want}");
        if norm > max {
            // The clipped norm lands just under the limit (f32 rounding of the factor aside).
            let clipped = got as f64 * norm as f64;
            assert!((clipped - max as f64).abs() <= 1e-5 * max as f64, "clipped norm {clipped}, limit {max}");
        } else {
            assert_eq!(got, 1.0);
        }
    }
    assert_eq!(clip_scale(5.0, 0.0), 1.0, "max_norm 0 disables clipping");
    assert!(clip_scale(f32::NAN, 3.0).is_nan());
}

/// Parameters of "generic" size so that every path of the model carries a visible gradient: unit
/// scale activations (weights ~ U(±1/sqrt(fan_in))), layer scales near 1 rather than 0.1,
/// non-trivial norm weights and biases, embeddings and tokens of size ~0.5.
fn generic_params(model: &CpuModel, rng: &mut impl Rng) -> Vec<f32> {
    let mut p = vec![0.0f32; model.layout.total];
    for s in &model.layout.specs {
        let (base, a) = match s.init {
            Init::Const(c) if c != 0.0 => (if s.name.contains("ls") { 1.0 } else { c }, 0.3),
            Init::Const(_) => (0.0, 0.1),
            Init::UniformFanIn(f) => (0.0, 1.0 / (f as f32).sqrt()),
            _ if s.shape.len() == 2 => (0.0, 1.0 / (s.shape[1] as f32).sqrt()),
            _ => (0.0, 0.5),
        };
        for x in &mut p[s.range()] {
            *x = base + rng.random_range(-a..a);
        }
    }
    p
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let mut rng = testing::rng("whole_model_gradient_matches_finite_differences");
    let model = CpuModel::new(TINY).unwrap();
    let params = generic_params(&model, &mut rng);
    let batch = random_batch(&TINY, 2, &mut rng);
    let mut grads = vec![0.0f32; model.layout.total];
    model.step(&params, &batch, None, Some(&mut grads), false).unwrap();
    let loss = |p: &[f32]| model.step(p, &batch, None, None, false).unwrap().loss as f64;

    // Central differences of the f32 loss (about 2.4 = ln 11) with step h = 1e-2.
    // Rounding: the loss carries a few f32 ulps of error (ulp ~2.4e-7), so the difference
    // quotient has an absolute error of about 1e-6 / (2h) = 5e-5 at worst (observed: <= 2e-5).
    // Truncation: h^2 / 6 times the third derivative, ~2e-5 for third derivatives of order 1 at
    // these unit-scale parameters, i.e. well under 1% of gradients of order 1e-2. So each
    // coordinate must agree to 5e-5 + 1% of its size, and the sampled gradient as a whole to 2e-3
    // norm-wise (observed ~2e-4); a wrong term in a backward formula is off by the gradient's order.
    let h = 1e-2f32;
    let (atol, rtol) = (5e-5f64, 1e-2f64);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    for s in &model.layout.specs {
        for _ in 0..2 {
            let i = s.offset + rng.random_range(0..s.len());
            let mut p = params.clone();
            let x = p[i];
            p[i] = x + h;
            let (xp, lp) = (p[i] as f64, loss(&p));
            p[i] = x - h;
            let (xm, lm) = (p[i] as f64, loss(&p));
            let fd = (lp - lm) / (xp - xm);
            let an = grads[i] as f64;
            num += (fd - an).powi(2);
            den += an * an;
            let d = (fd - an).abs();
            if d > worst.0 {
                worst = (d, s.name.clone());
            }
            if d > atol + rtol * an.abs() {
                failures.push(format!("{}[{}]: finite difference {fd:+.6e}, backward {an:+.6e}", s.name, i - s.offset));
            }
        }
    }
    let rel = (num / den).sqrt();
    eprintln!("norm-wise relative error {rel:.3e}, worst absolute {:.3e} at {}", worst.0, worst.1);
    assert!(failures.is_empty(), "gradient mismatches:\n{}", failures.join("\n"));
    assert!(rel < 2e-3, "norm-wise relative error {rel:.3e}");
}

/// 100 updates at lr 3e-3 on one fixed batch of 2 images: the model memorises the 24 targets.
/// Observed: the loss falls from ~2.4 (ln 11) to ~3% of it by step 100; the bound is 30%.
#[test]
fn tiny_model_overfits_one_batch() {
    let mut rng = testing::rng("tiny_model_overfits_one_batch");
    let model = CpuModel::new(TINY).unwrap();
    let mut state = TrainState::new(&model.layout, rng.random());
    let mut batch = [random_batch(&TINY, 2, &mut rng)];
    let fixed = batch[0].clone();
    let recipe = test_recipe(3e-3, 400, 1);
    let mut stats = Vec::new();
    for step in 0..100u64 {
        let s = train_step(&model, &mut state, &recipe, &mut batch).unwrap();
        assert_eq!(state.step, step + 1);
        assert_eq!(s.tokens, 2 * TINY.n_pred());
        assert_eq!(s.lr, recipe.schedule.lr(step));
        assert_eq!(s.clip_scale, clip_scale(s.grad_norm, recipe.clip_norm));
        assert!(s.loss.is_finite() && s.grad_norm.is_finite() && s.grad_norm > 0.0);
        stats.push(s);
    }
    assert_eq!(batch[0].ranks, fixed.ranks, "ranks must stay as given when resample_ranks is off");
    let (first, last) = (stats[0], stats[99]);
    eprintln!("loss {} -> {}, accuracy {} -> {}", first.loss, last.loss, first.accuracy, last.accuracy);
    assert!((first.loss - (TINY.vocab as f32).ln()).abs() < 0.3, "start near ln(vocab), got {}", first.loss);
    assert!(last.loss < 0.3 * first.loss, "loss {} after 100 steps, start {}", last.loss, first.loss);
    assert!(last.accuracy >= 0.9, "accuracy {} after 100 steps", last.accuracy);
    // The state's loss on the batch, evaluated afresh, agrees with the last step's trend.
    let eval = model.step(&state.params, &fixed, None, None, false).unwrap().loss;
    assert!(eval < last.loss, "eval loss {eval} after the last update, step loss {}", last.loss);
}

/// Splits a batch into batches of `size` images.
fn split(b: &Batch, size: usize, cfg: &ModelConfig) -> Vec<Batch> {
    let (img, n) = (3 * cfg.image * cfg.image, cfg.n_tokens());
    (0..b.batch / size)
        .map(|k| Batch {
            batch: size,
            images: Images::F32(b.images.as_f32().expect("f32 batches")[k * size * img..(k + 1) * size * img].to_vec()),
            tokens: b.tokens[k * size * (n - 1)..(k + 1) * size * (n - 1)].to_vec(),
            ranks: b.ranks[k * size * n..(k + 1) * size * n].to_vec(),
        })
        .collect()
}

/// One batch of 4 and the same images as two micro-batches of 2 give the same updates: every
/// sample predicts P tokens, so the mean of the two micro-batch means is the mean over all 4.
/// The loss and the gradient norm are compared too, since AdamW's update is nearly invariant to a
/// global gradient scale (a missing 1/2 shows in the norm). Clipping is active (limit 0.05) so
/// that the clip factor, computed from the averaged gradient, matters.
#[test]
fn gradient_accumulation_matches_the_full_batch() {
    let mut rng = testing::rng("gradient_accumulation_matches_the_full_batch");
    let model = CpuModel::new(TINY).unwrap();
    let start = TrainState::new(&model.layout, rng.random());
    let full = random_batch(&TINY, 4, &mut rng);
    let mut whole = [full.clone()];
    let mut halves = split(&full, 2, &TINY);
    let mut r1 = test_recipe(1e-3, 100, 1);
    r1.clip_norm = 0.05;
    let r2 = Recipe { micro_batches: 2, ..r1.clone() };
    let (mut a, mut b) = (start.clone(), start.clone());
    for step in 1..=3 {
        let sa = train_step(&model, &mut a, &r1, &mut whole).unwrap();
        let sb = train_step(&model, &mut b, &r2, &mut halves).unwrap();
        eprintln!("step {step}: {sa:?}\n        {sb:?}");
        assert!(close(sb.loss, sa.loss as f64, 1e-5), "step {step}: loss {} vs {}", sb.loss, sa.loss);
        assert!(close(sb.grad_norm, sa.grad_norm as f64, 1e-5), "grad norm {} vs {}", sb.grad_norm, sa.grad_norm);
        assert!(sa.clip_scale < 1.0, "clipping should be active");
        assert_eq!((sa.tokens, sb.tokens), (4 * TINY.n_pred(), 4 * TINY.n_pred()));
        assert!((sa.accuracy - sb.accuracy).abs() < 1e-12);
        let max_diff = a.params.iter().zip(&b.params).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let moved = a.params.iter().zip(&start.params).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        eprintln!("step {step}: max |params diff| {max_diff:.3e}, max move from start {moved:.3e}");
        assert!(max_diff <= 1e-5, "step {step}: parameters differ by {max_diff:e}");
        assert!(moved > 1e-4, "the update must move the parameters");
    }
}

/// A NaN parameter makes the loss NaN: the step fails naming it, and nothing changes (parameters,
/// moments, counters, generator, the batches' ranks).
#[test]
fn non_finite_loss_is_an_error_and_leaves_the_state_alone() {
    let mut rng = testing::rng("non_finite_loss_is_an_error_and_leaves_the_state_alone");
    let model = CpuModel::new(TINY).unwrap();
    let mut state = TrainState::new(&model.layout, rng.random());
    let mut recipe = test_recipe(1e-3, 100, 2);
    recipe.drop_path = 0.5;
    recipe.resample_ranks = true;
    let mut batches = vec![random_batch(&TINY, 2, &mut rng), random_batch(&TINY, 2, &mut rng)];
    for _ in 0..2 {
        train_step(&model, &mut state, &recipe, &mut batches).unwrap();
    }
    let w = model.layout.get("blocks.1.mlp.fc1.weight").unwrap();
    state.params[w.offset + rng.random_range(0..w.len())] = f32::NAN;
    let before = state.clone();
    let ranks_before: Vec<Vec<i32>> = batches.iter().map(|b| b.ranks.clone()).collect();
    let err = train_step(&model, &mut state, &recipe, &mut batches).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, Error::NonFinite { step: 3, what: "loss" }), "{err:?}");
    assert!(err.to_string().contains("step 3"), "{err}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&state.params), bits(&before.params));
    assert_eq!(bits(&state.m), bits(&before.m));
    assert_eq!(bits(&state.v), bits(&before.v));
    assert_eq!((state.step, state.epoch), (before.step, before.epoch));
    assert_eq!(state.rng, before.rng, "the generator must not advance on a failed step");
    assert_eq!(batches.iter().map(|b| b.ranks.clone()).collect::<Vec<_>>(), ranks_before);

    // A wrong number of micro-batches is refused before anything runs.
    let err = train_step(&model, &mut state, &recipe, &mut batches[..1]).unwrap_err();
    assert!(err.to_string().contains("micro_batches"), "{err}");
}

#[test]
fn uint8_and_f32_pixels_give_the_same_step() {
    // The uint8 form (normalized inside the patch embedding) and the f32 form made from the same
    // bytes are the same batch: loss, logits and gradients agree bit for bit on the CPU.
    let cfg = TINY;
    let model = CpuModel::new(cfg).unwrap();
    let mut rng = testing::rng("uint8_and_f32_pixels_give_the_same_step");
    let params = model.layout.init(&mut rng);
    let b = 3;
    let hwc: Vec<u8> = (0..b * cfg.image * cfg.image * 3).map(|_| rng.random()).collect();
    let norm = mapet::ops::patch_embed::Normalize { mean: [0.3, 0.5, 0.6], std: [0.2, 0.25, 0.3] };
    let shape = mapet::ops::patch_embed::PatchEmbedShape {
        batch: b,
        image: cfg.image,
        patch: cfg.patch,
        dim: cfg.dim,
        n_context: cfg.context,
    };
    let chw = mapet::ops::patch_embed::normalize_u8(&shape, &hwc, &norm).unwrap();
    let mut u8_batch = random_batch(&cfg, b, &mut rng);
    u8_batch.images = Images::U8 { hwc: hwc.into(), norm };
    let f32_batch = Batch { images: Images::F32(chw), ..u8_batch.clone() };
    let dp = model.draw_drop_path(b, 0.3, &mut rng);
    let (mut g8, mut g32) = (vec![0.0f32; model.layout.total], vec![0.0f32; model.layout.total]);
    let o8 = model.step(&params, &u8_batch, Some(&dp), Some(&mut g8), true).unwrap();
    let o32 = model.step(&params, &f32_batch, Some(&dp), Some(&mut g32), true).unwrap();
    assert_eq!(o8.loss.to_bits(), o32.loss.to_bits());
    assert_eq!(o8.logits, o32.logits);
    assert!(g8.iter().zip(&g32).all(|(a, b)| a.to_bits() == b.to_bits()), "gradients differ");
    // The patch-embedding weight gradient depends on the pixels: it is not zero.
    let w = model.layout.get("patch_embed.proj.weight").unwrap().range();
    assert!(g8[w].iter().any(|&g| g != 0.0));
    // A different normalization is a different batch.
    u8_batch.images = match u8_batch.images {
        Images::U8 { hwc, .. } => Images::U8 { hwc, norm: mapet::ops::patch_embed::Normalize::IMAGENET },
        other => other,
    };
    let other = model.step(&params, &u8_batch, Some(&dp), None, false).unwrap();
    assert_ne!(other.loss.to_bits(), o8.loss.to_bits(), "the normalization was ignored");
}
