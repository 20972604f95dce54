//! `mapet pretrain` on the GPU backend (skips without a GPU): the demo photographs with a
//! head-dim-64 model; the first step's loss agrees with the CPU backend's from the same state and
//! batches, the loss falls, checkpoints are written in the CPU's format and a run resumes from
//! one, repeating the uninterrupted run's losses bit for bit (every GPU kernel of the step is
//! deterministic); `mapet eval` of that checkpoint on the GPU agrees with the CPU.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mapet_trainer::{config::PretrainConfig, demo, pretrain};

fn gpu_config(dir: &std::path::Path, epochs: f64, device: &str) -> PretrainConfig {
    let mut cfg = demo::config(dir);
    // Head dim 64, which the GPU attention kernels take.
    (cfg.model.dim, cfg.model.heads) = (Some(128), Some(2));
    cfg.train.epochs = epochs;
    // Warmup may not outlast the run (the config refuses that): the one-epoch CPU run gets 1.
    cfg.train.warmup_epochs = epochs.min(2.0);
    cfg.train.peak_lr = Some(3e-3);
    cfg.train.device = device.into();
    cfg.data.threads = 2;
    cfg
}

fn losses(dir: &std::path::Path) -> Vec<(u64, f32)> {
    mapet_trainer::pretrain::read_metrics(dir).iter().map(|r| (r.step, r.loss)).collect()
}

fn run(cfg: &PretrainConfig, resume: Option<&std::path::Path>) -> pretrain::RunSummary {
    pretrain::run(cfg, demo::prepare(cfg).unwrap(), resume, Arc::new(AtomicBool::new(false))).unwrap()
}

#[test]
fn gpu_pretrain_learns_checkpoints_and_resumes() {
    if mapet::testing::gpu_or_skip("gpu_pretrain_learns_checkpoints_and_resumes").is_none() {
        return;
    }
    // The first step from the same state and batches: CPU and GPU losses agree.
    let cpu_dir = tempfile::tempdir().unwrap();
    run(&gpu_config(cpu_dir.path(), 1.0, "cpu"), None);
    let gpu_dir = tempfile::tempdir().unwrap();
    let cfg = gpu_config(gpu_dir.path(), 60.0, "cuda");
    let summary = run(&cfg, None);
    assert_eq!(summary.steps, 60);
    let (cpu, gpu) = (losses(cpu_dir.path()), losses(gpu_dir.path()));
    let rel = ((gpu[0].1 - cpu[0].1) / cpu[0].1).abs();
    eprintln!("first-step loss: cpu {} gpu {} (relative difference {rel:.2e})", cpu[0].1, gpu[0].1);
    assert!(rel <= 2e-2, "first-step loss: cpu {} gpu {}", cpu[0].1, gpu[0].1);

    assert_eq!(gpu.len(), 60);
    let first: f32 = gpu[..5].iter().map(|r| r.1).sum::<f32>() / 5.0;
    let last: f32 = gpu[gpu.len() - 5..].iter().map(|r| r.1).sum::<f32>() / 5.0;
    assert!(last < 0.8 * first, "loss did not fall on the GPU: first 5 steps {first:.3}, last 5 {last:.3}");
    let ckpt = gpu_dir.path().join("checkpoint");
    let loaded = mapet::model::checkpoint::load(&ckpt, &cfg.model_config().unwrap()).unwrap();
    assert_eq!(loaded.state.step, 60);
    assert!(loaded.state.params.iter().all(|p| p.is_finite()));

    // Resume from the checkpoint for 4 more steps.
    let mut more = cfg.clone();
    more.train.epochs = 64.0;
    let resumed = run(&more, Some(&ckpt));
    assert_eq!(resumed.steps, 64);
    let after = losses(gpu_dir.path());
    assert_eq!(after.len(), 64);
    assert!(after[60..].iter().all(|r| r.1.is_finite()));
}

#[test]
fn gpu_eval_agrees_with_the_cpu_on_a_checkpoint() {
    if mapet::testing::gpu_or_skip("gpu_eval_agrees_with_the_cpu_on_a_checkpoint").is_none() {
        return;
    }
    use mapet_trainer::cmd::eval::{evaluate, EvalArgs};
    let dir = tempfile::tempdir().unwrap();
    let cfg = gpu_config(dir.path(), 20.0, "cuda");
    run(&cfg, None);
    // demo::prepare wrote the photographs and their tokens into the run's folder.
    let model = cfg.model_config().unwrap();
    let images = dir.path().join("images");
    let tokens = dir.path().join(format!("tokens-pixels-{}px-p{}-k{}.npy", model.image, model.patch, model.vocab));
    let args = |device: &str| EvalArgs {
        checkpoint: dir.path().join("checkpoint"),
        data: images.clone(),
        tokens: tokens.clone(),
        batch: 4,
        seed: 3,
        threads: 2,
        device: device.into(),
        json: false,
    };
    let (cpu, gpu) = (evaluate(&args("cpu")).unwrap(), evaluate(&args("cuda")).unwrap());
    eprintln!(
        "eval: cpu loss {} acc {}; {} loss {} acc {}",
        cpu.loss, cpu.accuracy, gpu.device, gpu.loss, gpu.accuracy
    );
    assert!(gpu.device.starts_with("cuda"), "{}", gpu.device);
    assert_eq!((cpu.images, cpu.tokens), (gpu.images, gpu.tokens));
    assert!(((gpu.loss - cpu.loss) / cpu.loss).abs() <= 2e-2, "loss: cpu {} gpu {}", cpu.loss, gpu.loss);
    // bf16 logits may flip a near-tie; most predictions must agree.
    assert!((gpu.accuracy - cpu.accuracy).abs() <= 0.05, "accuracy: cpu {} gpu {}", cpu.accuracy, gpu.accuracy);
}

#[test]
fn gpu_resumed_run_repeats_the_uninterrupted_losses_bit_for_bit() {
    if mapet::testing::gpu_or_skip("gpu_resumed_run_repeats_the_uninterrupted_losses_bit_for_bit").is_none() {
        return;
    }
    let straight = tempfile::tempdir().unwrap();
    let cfg = gpu_config(straight.path(), 8.0, "cuda");
    assert_eq!(run(&cfg, None).steps, 8);
    let want = losses(straight.path());

    // The same run, stopped (as by Ctrl-C) once its step-3 checkpoint exists, then resumed.
    let split = tempfile::tempdir().unwrap();
    let mut first = gpu_config(split.path(), 8.0, "cuda");
    first.output.checkpoint_every = 3;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let (dir, stop) = (split.path().to_path_buf(), stop.clone());
        move || {
            while !dir.join("checkpoint/meta.json").is_file() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let partial = pretrain::run(&first, demo::prepare(&first).unwrap(), None, stop).unwrap();
    watcher.join().unwrap();
    assert!(partial.interrupted && partial.steps < 8, "the run should stop early, it made {} steps", partial.steps);
    assert_eq!(run(&first, Some(&split.path().join("checkpoint"))).steps, 8);
    let got = losses(split.path());
    assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), want.iter().map(|r| r.0).collect::<Vec<_>>());
    // Measure before judging: how far apart the two sequences are, if they are.
    let worst = got.iter().zip(&want).map(|(a, b)| ((a.1 - b.1) / b.1).abs()).fold(0.0f32, f32::max);
    eprintln!("resumed vs uninterrupted GPU losses: largest relative difference {worst:e}");
    for ((step, l1), (_, l2)) in got.iter().zip(&want) {
        assert_eq!(l1.to_bits(), l2.to_bits(), "loss at step {step} differs after resuming on the GPU: {l1} vs {l2}");
    }
}
