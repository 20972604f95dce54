//! `mapet bench`: the throughput of full training steps (forward, backward, gradient norm,
//! AdamW) of a chosen model on synthetic data, on the CPU or the GPU.
//!
//! ```text
//! mapet bench [--model vit-t|vit-s|vit-b] [--set section.key=value ...] [--batch N] [--steps N]
//!             [--warmup N] [--device auto|cpu|cuda] [--peak-tflops T] [--json]
//! ```
//!
//! The model and the recipe come from [`PretrainConfig`] (`--model` sets `model.preset`, `--set`
//! any key, e.g. `--set model.depth=4` or `--set train.micro_batches=2`); `--batch` is the global
//! batch (default 64 on the GPU, 4 on the CPU), `--steps` the timed steps (default 20) after
//! `--warmup` untimed ones (default 3). `--device auto` takes the GPU when one is usable (falling
//! back to the CPU, with a note, when the GPU model does not run the config). `--json` prints one
//! flat JSON object and nothing else on stdout.
//!
//! # Data
//!
//! One set of synthetic micro-batches, made once from a generator seeded with `train.seed`:
//! random uint8 HWC pixels, handed to the model as the data loader hands them (normalized with the
//! ImageNet mean and std inside the patch embedding, on the GPU in the kernel), random token ids;
//! before every step each sample gets a fresh random permutation from the same generator (the
//! recipe's own resampling is off, so drawing them is not timed). Drop path is the config's (0.1 by default).
//!
//! # What is timed
//!
//! - **step**: the wall-clock time of one training step: `model::train::train_step` on the CPU,
//!   `model::cuda_train::train_step_cuda` on the GPU, followed there by a stream synchronisation.
//!   Images/s is the global batch over the median step time.
//! - **forward**: a separate forward-only pass over the same micro-batches just before the step
//!   (`CpuModel::step` / `CudaModel::step` without backward; not part of the step time).
//! - **optimizer**: on the GPU, the step's gradient norm and AdamW update, between two CUDA
//!   events the step records (`train_step_cuda_observed`); on the CPU, where `train_step` runs it
//!   inside, the same calls (`gradnorm::cpu_l2_norm`, the decay mask, `adamw::cpu_step`) timed on
//!   scratch buffers of the same size right after the step.
//! - **backward**: on the GPU, the step's gradient phase (zeroing, every micro-batch's forward and
//!   backward, between CUDA events) minus the forward; on the CPU, the step minus forward minus
//!   optimizer. Forward + backward + optimizer is therefore about the step time (exactly, per step,
//!   on the CPU; on the GPU the step's wall time also holds the host work before its first
//!   launch and after its last).
//!
//! Every figure is the median over the timed steps (min and max of the step too); the phases are
//! those of the median step (for an even count, the mean of the two middle steps'), so that they
//! add up to it as each step's do.
//!
//! # FLOPs
//!
//! Per image, with N = tokens (CLS + patches), C = context, P = N - C predicted tokens, R = N + 2P
//! rows per sample through the blocks (content, mask tokens, query stream), L = N + P key/value
//! rows, D = dim, H heads of d_h = D / H, K = 3·patch² pixels per patch, V = vocab, and 2·m·n·k
//! for an [m, k] x [k, n] GEMM:
//!
//! ```text
//! forward GEMMs     = 2·(N-1)·K·D                                  patch embedding
//!                   + depth · (2RD² + 4LD² + 2RD² + 8RD² + 8RD²)   q, k and v, proj, fc1, fc2
//!                   = 2·(N-1)·K·D + depth·(20R + 4L)·D² + 2·P·D·V    ... + decoder over P rows
//! forward attention = depth · 4·H·R·N·d_h      QKᵀ and PV, 2·d_h each per visible (row, key) pair:
//!                                              every one of the R rows sees exactly N keys
//! backward          = 2 × forward GEMMs + 2.5 × forward attention
//!                     (input and weight gradients; attention recomputes its scores)
//! total             = 3 × forward GEMMs + 3.5 × forward attention
//! ```
//!
//! LayerNorm, GELU, softmax and the loss are not counted. The backward counts the patch
//! embedding's input gradient although the model never forms it (0.1% of ViT-B's total). For
//! ViT-B/16 (N = 197, C = 50, P = 147, R = 491, L = 344, D = 768): forward GEMMs 81.32 GFLOP,
//! attention 3.57 GFLOP, total 256.45 GFLOP per image (the ~255 GFLOP of the issue). Model TFLOP/s
//! = total · batch / median step time; MFU = that over the device's peak: 989 TFLOP/s dense
//! bf16 for H100 SXM and H200, 756 for H100 PCIe, 312 for A100; another card needs
//! `--peak-tflops`. The CPU reports no MFU.
//!
//! # Memory
//!
//! On the GPU, `peak_memory_bytes` is the largest device memory in use (total - free, as the
//! driver reports it) sampled after the forward pass, at the end of the gradient phase and after
//! each step, minus what was in use before the model was allocated: the model's parameters,
//! gradients, bf16 copy and activations, the AdamW moments and mask, the cuBLASLt workspace, and
//! whatever the stream-ordered allocator still holds of the launchers' scratch at those points
//! (a scratch buffer allocated and released between two samples can be missed). The model's own
//! buffers and the optimizer state are reported separately. On the CPU it is the process's peak
//! resident set (`VmHWM`), everything included.

use std::sync::Arc;
use std::time::Instant;

use mapet::cuda::pinned::HostBytes;
use mapet::cuda::Gpu;
use mapet::model::cpu::{Batch, CpuModel, Images};
use mapet::model::cuda::CudaModel;
use mapet::model::cuda_train::{train_step_cuda_observed, CudaTrainState, StepPoint};
use mapet::model::optim::clip_scale;
use mapet::model::train::{train_step, Recipe, TrainState, IMAGENET_TRAIN_IMAGES};
use mapet::model::ModelConfig;
use mapet::ops::adamw::{self, AdamWStep};
use mapet::ops::gradnorm;
use mapet::ops::patch_embed::Normalize;
use mapet::perm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cli;
use crate::config::PretrainConfig;
use crate::pretrain::recipe_for;

/// Default global batch on the GPU.
pub const DEFAULT_GPU_BATCH: usize = 64;
/// Default global batch on the CPU.
pub const DEFAULT_CPU_BATCH: usize = 4;
/// Default timed steps.
pub const DEFAULT_STEPS: usize = 20;
/// Default untimed warm-up steps.
pub const DEFAULT_WARMUP: usize = 3;

/// FLOPs of one image's training step (module notes, "FLOPs").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlopCount {
    /// Patch embedding, the blocks' Linears and the decoder, forward.
    pub forward_gemm: f64,
    /// QKᵀ and PV over the visible pairs, forward.
    pub forward_attention: f64,
    /// `forward_gemm + forward_attention`.
    pub forward: f64,
    /// `2 * forward_gemm + 2.5 * forward_attention`.
    pub backward: f64,
    /// `forward + backward`.
    pub total: f64,
}

/// The FLOP count of the module notes for one image of `cfg`.
pub fn flops_per_image(cfg: &ModelConfig) -> FlopCount {
    let n = cfg.n_tokens() as f64;
    let p = cfg.n_pred() as f64;
    let (r, l) = (n + 2.0 * p, n + p);
    let d = cfg.dim as f64;
    let k = (3 * cfg.patch * cfg.patch) as f64;
    let (depth, heads, dh) = (cfg.depth as f64, cfg.heads as f64, cfg.head_dim() as f64);
    let patch_embed = 2.0 * (n - 1.0) * k * d;
    let block = (2.0 * r + 4.0 * l + 2.0 * r + 8.0 * r + 8.0 * r) * d * d;
    let decoder = 2.0 * p * d * cfg.vocab as f64;
    let forward_gemm = patch_embed + depth * block + decoder;
    let forward_attention = depth * 4.0 * heads * r * n * dh;
    let forward = forward_gemm + forward_attention;
    let backward = 2.0 * forward_gemm + 2.5 * forward_attention;
    FlopCount { forward_gemm, forward_attention, forward, backward, total: forward + backward }
}

/// Dense bf16 peak of a GPU by its driver name, in TFLOP/s, when known.
pub fn peak_tflops_for(device_name: &str) -> Option<f64> {
    let name = device_name.to_ascii_uppercase();
    if name.contains("H200") {
        Some(989.0)
    } else if name.contains("H100") {
        Some(if name.contains("PCIE") { 756.0 } else { 989.0 })
    } else if name.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

/// Where the bench runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDevice {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Parsed `mapet bench` arguments.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Model and recipe (`train.batch` is the global batch).
    pub config: PretrainConfig,
    /// Whether the batch was given (`--batch` or `--set train.batch=`); else the device's default.
    pub batch_given: bool,
    /// Timed steps (at least 1).
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    pub device: BenchDevice,
    /// Peak TFLOP/s for the MFU, overriding the per-device table.
    pub peak_tflops: Option<f64>,
    /// Print one JSON object instead of the text report.
    pub json: bool,
}

const FLAGS: [&str; 7] = ["model", "set", "batch", "steps", "warmup", "device", "peak-tflops"];

fn parse_count(flag: &str, value: &str, min: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(v) if v >= min => Ok(v),
        _ => Err(format!("--{flag} {value}: expected an integer >= {min}")),
    }
}

/// Parses the arguments after `bench`; errors name the flag.
pub fn parse_args(args: &[String]) -> Result<BenchOptions, String> {
    let json = args.iter().any(|a| a == "--json");
    let rest: Vec<String> = args.iter().filter(|a| *a != "--json").cloned().collect();
    let (pos, flags) = cli::parse_flags_all(&rest, &FLAGS)?;
    if let Some(p) = pos.first() {
        return Err(format!("bench takes no positional argument (got `{p}`)"));
    }
    let last = |k: &str| flags.iter().rev().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let mut config = PretrainConfig::default();
    if let Some(m) = last("model") {
        if ModelConfig::preset(m).is_none() {
            return Err(format!("--model {m}: expected vit-t, vit-s or vit-b"));
        }
        config.model.preset = m.to_string();
    }
    let mut batch_given = false;
    for (_, assignment) in flags.iter().filter(|(f, _)| f == "set") {
        config.set(assignment)?;
        batch_given |= assignment.split('=').next().is_some_and(|k| k.trim() == "train.batch");
    }
    if let Some(b) = last("batch") {
        config.train.batch = parse_count("batch", b, 1)?;
        batch_given = true;
    }
    let steps = last("steps").map(|v| parse_count("steps", v, 1)).transpose()?.unwrap_or(DEFAULT_STEPS);
    let warmup = last("warmup").map(|v| parse_count("warmup", v, 0)).transpose()?.unwrap_or(DEFAULT_WARMUP);
    let device_name = last("device").unwrap_or(config.train.device.as_str()).to_string();
    let device = match device_name.as_str() {
        "auto" => BenchDevice::Auto,
        "cpu" => BenchDevice::Cpu,
        "cuda" => BenchDevice::Cuda,
        other => {
            let source = if last("device").is_some() { "--device" } else { "train.device =" };
            return Err(format!("{source} {other}: expected auto, cpu or cuda"));
        }
    };
    let peak_tflops = match last("peak-tflops") {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(t) if t > 0.0 && t.is_finite() => Some(t),
            _ => return Err(format!("--peak-tflops {v}: expected a positive number")),
        },
    };
    // Checked now with a batch the micro-batches divide when the device's default will decide it.
    let mut check = config.clone();
    if !batch_given {
        check.train.batch = check.train.micro_batches.max(1);
    }
    check.validate()?;
    Ok(BenchOptions { config, batch_given, steps, warmup, device, peak_tflops, json })
}

/// What a bench run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// "cpu" or "cuda".
    pub device: String,
    /// The GPU's name, or the CPU and its worker threads.
    pub device_name: String,
    pub model: ModelConfig,
    /// Real (unpadded) parameters.
    pub params: usize,
    /// Global batch and its micro-batches.
    pub batch: usize,
    pub micro_batches: usize,
    /// Timed and warm-up steps.
    pub steps: usize,
    pub warmup: usize,
    pub images_per_s: f64,
    /// Step time: median, min, max (ms).
    pub step_ms: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    /// The phases of the median step (ms): see the module docs.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Model FLOPs per image (forward + backward), in GFLOP.
    pub gflop_per_image: f64,
    /// Model FLOP rate at the median step time.
    pub tflops: f64,
    /// The peak the MFU is relative to, and the MFU (fraction); `None` on the CPU or an unknown GPU.
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    /// See the module notes ("Memory"); `None` where it cannot be read.
    pub peak_memory_bytes: Option<u64>,
    /// What `peak_memory_bytes` measures.
    pub memory_measure: &'static str,
    /// The model's own device buffers and the optimizer state (GPU only).
    pub model_device_bytes: Option<u64>,
    pub optimizer_device_bytes: Option<u64>,
    /// Loss of the first and last timed step (a sanity check: finite, near ln(vocab) at start).
    pub loss_first: f32,
    pub loss_last: f32,
    /// The GPU's kernel choices (the run-time switches in effect); `None` on the CPU.
    pub kernels: Option<String>,
    /// What `MAPET_GEMM_TUNE=1` chose, a line per GEMM configuration (empty when it is off).
    pub gemm_tuning: Vec<String>,
    /// The cuBLASLt algorithm every GEMM configuration of the step ran, a line each with its
    /// configuration (`Gemm::algorithm_report`; empty on the CPU).
    pub gemm_algorithms: Vec<String>,
}

/// One step's times (ms).
#[derive(Clone, Copy, Debug)]
struct StepTimes {
    step: f64,
    forward: f64,
    backward: f64,
    optimizer: f64,
    loss: f32,
}

struct Measured {
    device: &'static str,
    device_name: String,
    times: Vec<StepTimes>,
    peak_memory_bytes: Option<u64>,
    memory_measure: &'static str,
    model_device_bytes: Option<u64>,
    optimizer_device_bytes: Option<u64>,
    peak_tflops: Option<f64>,
    kernels: Option<String>,
    gemm_tuning: Vec<String>,
    gemm_algorithms: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn drv(e: impl Into<mapet::Error>) -> String {
    e.into().to_string()
}

/// The synthetic micro-batches (ranks drawn per step by [`fresh_ranks`]).
fn synthetic_batches(cfg: &ModelConfig, micro: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<Batch> {
    let norm = Normalize::IMAGENET;
    let (s, n) = (cfg.image, cfg.n_tokens());
    (0..count)
        .map(|_| {
            // uint8 HWC pixels, as the data loader hands them to the model.
            let hwc: Vec<u8> = (0..micro * s * s * 3).map(|_| rng.random::<u8>()).collect();
            let tokens = (0..micro * (n - 1)).map(|_| rng.random_range(0..cfg.vocab as i32)).collect();
            let mut b = Batch { batch: micro, images: Images::U8 { hwc: hwc.into(), norm }, tokens, ranks: Vec::new() };
            fresh_ranks(cfg, &mut b, rng);
            b
        })
        .collect()
}

fn fresh_ranks(cfg: &ModelConfig, batch: &mut Batch, rng: &mut ChaCha8Rng) {
    let n = cfg.n_tokens();
    batch.ranks = (0..batch.batch).flat_map(|_| perm::sample_ranks(rng, n)).map(|r| r as i32).collect();
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Progress on stderr (stdout holds the report, or the JSON alone): a line for a step that took
/// at least [`SLOW_STEP_MS`], so that a long CPU bench shows it is running and a GPU one stays
/// quiet.
fn step_done(opts: &BenchOptions, i: usize, step_ms: f64, loss: f32) {
    if step_ms >= SLOW_STEP_MS {
        let phase = if i < opts.warmup { " (warm-up)" } else { "" };
        eprintln!(
            "bench: step {} of {}{phase}: {:.1} s, loss {loss:.4}",
            i + 1,
            opts.warmup + opts.steps,
            step_ms / 1e3
        );
    }
}

/// See [`step_done`].
const SLOW_STEP_MS: f64 = 500.0;

/// The CPU loop: `CpuModel::step` (forward only) and `train_step`.
fn run_cpu(
    opts: &BenchOptions,
    cfg: ModelConfig,
    recipe: &Recipe,
    batches: &mut [Batch],
    rng: &mut ChaCha8Rng,
) -> Result<Measured, String> {
    let model = CpuModel::new(cfg).map_err(err)?;
    let layout = &model.layout;
    let mut state = TrainState::new(layout, opts.config.train.seed);
    // Scratch for timing the optimizer the way train_step runs it.
    let k = recipe.micro_batches;
    let grads: Vec<f32> = (0..layout.total).map(|_| rng.random_range(-1e-3f32..1e-3)).collect();
    let (mut p, mut m, mut v) = (state.params.clone(), vec![0.0f32; layout.total], vec![0.0f32; layout.total]);
    let mut times = Vec::with_capacity(opts.steps);
    for i in 0..opts.warmup + opts.steps {
        for b in batches.iter_mut() {
            fresh_ranks(&cfg, b, rng);
        }
        let t = Instant::now();
        for b in batches.iter() {
            model.step(&state.params, b, None, None, false).map_err(err)?;
        }
        let forward = ms(t);

        let t = Instant::now();
        let stats = train_step(&model, &mut state, recipe, batches).map_err(err)?;
        let step = ms(t);

        let t = Instant::now();
        let mask = layout.decay_mask();
        let norm = gradnorm::cpu_l2_norm(&grads) / k as f32;
        let hp = AdamWStep {
            lr: stats.lr,
            beta1: recipe.beta1,
            beta2: recipe.beta2,
            eps: recipe.eps,
            weight_decay: recipe.weight_decay,
            step: i as u64 + 1,
            grad_scale: clip_scale(norm, recipe.clip_norm) / k as f32,
        };
        adamw::cpu_step(&mut p, &grads, &mut m, &mut v, mask, &hp, None).map_err(err)?;
        let optimizer = ms(t);
        step_done(opts, i, step, stats.loss);

        if i >= opts.warmup {
            let backward = (step - forward - optimizer).max(0.0);
            times.push(StepTimes { step, forward, backward, optimizer, loss: stats.loss });
        }
    }
    Ok(Measured {
        device: "cpu",
        device_name: format!("{}, {} threads", cpu_model_name(), cpu_threads()),
        times,
        peak_memory_bytes: peak_rss_bytes(),
        memory_measure: "host peak resident set (VmHWM) of the whole process",
        model_device_bytes: None,
        optimizer_device_bytes: None,
        peak_tflops: None,
        kernels: None,
        gemm_tuning: Vec::new(),
        gemm_algorithms: Vec::new(),
    })
}

/// The CPU's model name (Linux), else "cpu".
fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(|| "cpu".into())
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The process's peak resident set in bytes (Linux), else `None`.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Why the GPU path cannot run here (or this config), or the GPU and the model.
enum GpuSetup {
    Ready(Arc<Gpu>, Box<CudaModel>, usize),
    Unsupported(String),
}

fn setup_gpu(cfg: ModelConfig, micro: usize) -> Result<GpuSetup, String> {
    let gpu = Arc::new(Gpu::first().map_err(err)?);
    gpu.synchronize().map_err(err)?;
    let (free, total) = gpu.memory_info().map_err(err)?;
    match CudaModel::new(gpu.clone(), cfg, micro) {
        Ok(model) => Ok(GpuSetup::Ready(gpu, Box::new(model), total - free)),
        Err(e @ mapet::Error::Unsupported { .. }) => Ok(GpuSetup::Unsupported(e.to_string())),
        Err(e) => Err(e.to_string()),
    }
}

/// The GPU loop: `CudaModel::step` (forward only) and `train_step_cuda`, CUDA events around the
/// phases.
fn run_cuda(
    opts: &BenchOptions,
    gpu: Arc<Gpu>,
    mut model: Box<CudaModel>,
    used_before: usize,
    recipe: &Recipe,
    batches: &mut [Batch],
    rng: &mut ChaCha8Rng,
) -> Result<Measured, String> {
    let cfg = model.layout.config;
    let host = TrainState::new(&model.layout, opts.config.train.seed);
    let mut state = CudaTrainState::upload(&gpu, &mut model, &host).map_err(err)?;
    drop(host);
    // The pixels in page-locked memory, as `mapet pretrain`'s loader assembles them on a GPU.
    let pool = gpu.pinned_pool(batches.first().map_or(0, |b| b.images.len()));
    for b in batches.iter_mut() {
        if let Images::U8 { hwc, .. } = &mut b.images {
            let mut pinned = pool.take().map_err(err)?;
            pinned.extend_from_slice(hwc).map_err(err)?;
            *hwc = HostBytes::Pinned(pinned);
        }
    }
    let mut peak_used = 0usize;
    let sample = |gpu: &Gpu, peak: &mut usize| {
        if let Ok((free, total)) = gpu.memory_info() {
            *peak = (*peak).max(total.saturating_sub(free));
        }
    };
    let event = || gpu.timing_event().map_err(err);
    let (f0, f1, e0, e1, e2) = (event()?, event()?, event()?, event()?, event()?);
    let stream = gpu.stream().clone();
    let mut times = Vec::with_capacity(opts.steps);
    for i in 0..opts.warmup + opts.steps {
        for b in batches.iter_mut() {
            fresh_ranks(&cfg, b, rng);
        }
        f0.record(&stream).map_err(drv)?;
        for b in batches.iter() {
            model.step(b, None, false, false).map_err(err)?;
        }
        f1.record(&stream).map_err(drv)?;
        sample(&gpu, &mut peak_used);

        let t = Instant::now();
        let mut event_error = None;
        let stats = train_step_cuda_observed(&mut model, &mut state, recipe, batches, &mut |point| {
            let ev = match point {
                StepPoint::Start => &e0,
                StepPoint::GradientsQueued => &e1,
                StepPoint::UpdateQueued => &e2,
            };
            if let Err(e) = ev.record(&stream) {
                event_error.get_or_insert(e);
            }
            if point == StepPoint::GradientsQueued {
                sample(&gpu, &mut peak_used);
            }
        })
        .map_err(err)?;
        gpu.synchronize().map_err(err)?;
        let step = ms(t);
        step_done(opts, i, step, stats.loss);
        sample(&gpu, &mut peak_used);
        if let Some(e) = event_error {
            return Err(drv(e));
        }
        if i >= opts.warmup {
            let forward = f0.elapsed_ms(&f1).map_err(drv)? as f64;
            let gradients = e0.elapsed_ms(&e1).map_err(drv)? as f64;
            let optimizer = e1.elapsed_ms(&e2).map_err(drv)? as f64;
            let backward = (gradients - forward).max(0.0);
            times.push(StepTimes { step, forward, backward, optimizer, loss: stats.loss });
        }
    }
    Ok(Measured {
        device: "cuda",
        device_name: gpu.name().to_string(),
        times,
        peak_memory_bytes: Some(peak_used.saturating_sub(used_before) as u64),
        memory_measure: "device memory in use (total - free) sampled after each phase, minus that before the model",
        model_device_bytes: Some(model.device_bytes() as u64),
        optimizer_device_bytes: Some(state.device_bytes() as u64),
        peak_tflops: peak_tflops_for(gpu.name()),
        kernels: Some(model.backend().describe_kernels()),
        gemm_tuning: model.backend().gemm.tuning_report(),
        gemm_algorithms: model.backend().gemm.algorithm_report(),
    })
}

/// The phases of the median step (for an even count, the mean of the two middle steps' phases), so
/// that they add up to the median step time as each step's own phases add up to it: medians taken
/// phase by phase need not, since noise moves each phase in different steps.
fn median_step_phases(times: &[StepTimes]) -> StepTimes {
    let mut order: Vec<&StepTimes> = times.iter().collect();
    order.sort_by(|a, b| a.step.total_cmp(&b.step));
    let n = order.len();
    let middle: &[&StepTimes] = match n {
        0 => &[],
        _ if n % 2 == 1 => &order[n / 2..n / 2 + 1],
        _ => &order[n / 2 - 1..n / 2 + 1],
    };
    let mean = |f: fn(&StepTimes) -> f64| {
        if middle.is_empty() {
            f64::NAN
        } else {
            middle.iter().map(|s| f(s)).sum::<f64>() / middle.len() as f64
        }
    };
    StepTimes {
        step: mean(|s| s.step),
        forward: mean(|s| s.forward),
        backward: mean(|s| s.backward),
        optimizer: mean(|s| s.optimizer),
        loss: f32::NAN,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs the bench.
pub fn bench(opts: &BenchOptions) -> Result<BenchReport, String> {
    let mut config = opts.config.clone();
    let model_cfg = config.model_config()?;
    let gpu_usable = match opts.device {
        BenchDevice::Cpu => false,
        BenchDevice::Cuda => {
            if let Some(why) = mapet::cuda::unavailable_reason() {
                return Err(format!("--device cuda: no GPU is usable here: {why}"));
            }
            true
        }
        BenchDevice::Auto => mapet::cuda::unavailable_reason().is_none(),
    };
    let mut setup = None;
    if gpu_usable {
        if !opts.batch_given {
            config.train.batch = DEFAULT_GPU_BATCH;
        }
        config.validate()?;
        let micro = config.train.batch / config.train.micro_batches;
        match setup_gpu(model_cfg, micro)? {
            GpuSetup::Ready(gpu, model, used) => setup = Some((gpu, model, used)),
            GpuSetup::Unsupported(why) if opts.device == BenchDevice::Auto => {
                eprintln!("note: the GPU model cannot run this config ({why}); benchmarking the CPU instead");
            }
            GpuSetup::Unsupported(why) => return Err(format!("--device cuda: {why}")),
        }
    }
    if setup.is_none() && !opts.batch_given {
        config.train.batch = DEFAULT_CPU_BATCH;
    }
    config.validate()?;
    let (batch, k) = (config.train.batch, config.train.micro_batches);
    let micro = batch / k;
    let steps_per_epoch = ((IMAGENET_TRAIN_IMAGES / batch) as u64).max(1);
    let mut recipe = recipe_for(&config, steps_per_epoch);
    recipe.resample_ranks = false;
    let mut rng = ChaCha8Rng::seed_from_u64(config.train.seed);
    let mut batches = synthetic_batches(&model_cfg, micro, k, &mut rng);
    let run_opts = BenchOptions { config: config.clone(), ..opts.clone() };
    eprintln!(
        "bench: {} (dim {}, depth {}) on the {}, batch {batch}, {} warm-up and {} timed steps",
        config.model.preset,
        model_cfg.dim,
        model_cfg.depth,
        if setup.is_some() { "GPU" } else { "CPU" },
        opts.warmup,
        opts.steps
    );
    let measured = match setup {
        Some((gpu, model, used)) => run_cuda(&run_opts, gpu, model, used, &recipe, &mut batches, &mut rng)?,
        None => run_cpu(&run_opts, model_cfg, &recipe, &mut batches, &mut rng)?,
    };

    let t = &measured.times;
    let col = |f: fn(&StepTimes) -> f64| t.iter().map(f).collect::<Vec<f64>>();
    let step_ms = median(col(|s| s.step));
    let phases = median_step_phases(t);
    let flops = flops_per_image(&model_cfg);
    let tflops = flops.total * batch as f64 / (step_ms * 1e-3) / 1e12;
    let peak = match measured.device {
        "cuda" => opts.peak_tflops.or(measured.peak_tflops),
        _ => None,
    };
    Ok(BenchReport {
        device: measured.device.to_string(),
        device_name: measured.device_name,
        model: model_cfg,
        params: mapet::model::ParamLayout::new(model_cfg).map_err(err)?.num_params(),
        batch,
        micro_batches: k,
        steps: opts.steps,
        warmup: opts.warmup,
        images_per_s: batch as f64 / (step_ms * 1e-3),
        step_ms,
        step_ms_min: col(|s| s.step).into_iter().fold(f64::INFINITY, f64::min),
        step_ms_max: col(|s| s.step).into_iter().fold(0.0, f64::max),
        forward_ms: phases.forward,
        backward_ms: phases.backward,
        optimizer_ms: phases.optimizer,
        gflop_per_image: flops.total / 1e9,
        tflops,
        peak_tflops: peak,
        mfu: peak.map(|p| tflops / p),
        peak_memory_bytes: measured.peak_memory_bytes,
        memory_measure: measured.memory_measure,
        model_device_bytes: measured.model_device_bytes,
        optimizer_device_bytes: measured.optimizer_device_bytes,
        loss_first: t.first().map_or(f32::NAN, |s| s.loss),
        loss_last: t.last().map_or(f32::NAN, |s| s.loss),
        kernels: measured.kernels,
        gemm_tuning: measured.gemm_tuning,
        gemm_algorithms: measured.gemm_algorithms,
    })
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (`null` when not finite), in the shortest form that reads back as the same f64:
/// a consumer gets the value the text report rounds.
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn json_opt<T: Copy>(x: Option<T>, f: impl Fn(T) -> String) -> String {
    x.map_or_else(|| "null".into(), f)
}

/// Four significant digits (at least one decimal).
fn sig4(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return format!("{x}");
    }
    let decimals = (3 - x.abs().log10().floor() as i32).clamp(1, 12) as usize;
    format!("{x:.decimals$}")
}

impl BenchReport {
    /// One flat JSON object; times in ms, memory in bytes, MFU a fraction, `null` where not
    /// applicable.
    pub fn to_json(&self) -> String {
        let m = &self.model;
        let fields: Vec<(&str, String)> = vec![
            ("device", json_str(&self.device)),
            ("device_name", json_str(&self.device_name)),
            ("image", m.image.to_string()),
            ("patch", m.patch.to_string()),
            ("dim", m.dim.to_string()),
            ("depth", m.depth.to_string()),
            ("heads", m.heads.to_string()),
            ("vocab", m.vocab.to_string()),
            ("context", m.context.to_string()),
            ("params", self.params.to_string()),
            ("batch", self.batch.to_string()),
            ("micro_batches", self.micro_batches.to_string()),
            ("steps", self.steps.to_string()),
            ("warmup", self.warmup.to_string()),
            ("images_per_s", json_num(self.images_per_s)),
            ("step_ms", json_num(self.step_ms)),
            ("step_ms_min", json_num(self.step_ms_min)),
            ("step_ms_max", json_num(self.step_ms_max)),
            ("forward_ms", json_num(self.forward_ms)),
            ("backward_ms", json_num(self.backward_ms)),
            ("optimizer_ms", json_num(self.optimizer_ms)),
            ("gflop_per_image", json_num(self.gflop_per_image)),
            ("tflops", json_num(self.tflops)),
            ("peak_tflops", json_opt(self.peak_tflops, json_num)),
            ("mfu", json_opt(self.mfu, json_num)),
            ("peak_memory_bytes", json_opt(self.peak_memory_bytes, |b| b.to_string())),
            ("memory_measure", json_str(self.memory_measure)),
            ("model_device_bytes", json_opt(self.model_device_bytes, |b| b.to_string())),
            ("optimizer_device_bytes", json_opt(self.optimizer_device_bytes, |b| b.to_string())),
            ("loss_first", json_num(self.loss_first as f64)),
            ("loss_last", json_num(self.loss_last as f64)),
            ("kernels", json_opt(self.kernels.as_deref(), json_str)),
            ("gemm_tuned_configurations", self.gemm_tuning.len().to_string()),
            // One string, a line per configuration (the object stays flat).
            ("gemm_algorithms", json_str(&self.gemm_algorithms.join("\n"))),
        ];
        let body: Vec<String> = fields.into_iter().map(|(k, v)| format!("{}: {v}", json_str(k))).collect();
        format!("{{{}}}", body.join(", "))
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let m = &self.model;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut s = format!(
            "mapet bench: MaPeT ViT dim {} depth {} heads {}, image {} patch {}, context {}, vocab {}: {:.1}M parameters\n",
            m.dim,
            m.depth,
            m.heads,
            m.image,
            m.patch,
            m.context,
            m.vocab,
            self.params as f64 / 1e6
        );
        s += &format!("device          {} ({})\n", self.device, self.device_name);
        if let Some(k) = &self.kernels {
            s += &format!("kernels         {k}\n");
        }
        s += &format!(
            "batch           {} ({} micro-batch{}), {} timed steps after {} warm-up, synthetic data\n",
            self.batch,
            self.micro_batches,
            if self.micro_batches == 1 { "" } else { "es" },
            self.steps,
            self.warmup
        );
        s += &format!("images/s        {:.1}\n", self.images_per_s);
        s += &format!(
            "step            {:.2} ms median (min {:.2}, max {:.2})\n",
            self.step_ms, self.step_ms_min, self.step_ms_max
        );
        s += &format!("  forward       {:.2} ms\n", self.forward_ms);
        s += &format!("  backward      {:.2} ms\n", self.backward_ms);
        s += &format!("  optimizer     {:.2} ms\n", self.optimizer_ms);
        s += &format!("model FLOPs     {} GFLOP/image -> {} TFLOP/s", sig4(self.gflop_per_image), sig4(self.tflops));
        match (self.mfu, self.peak_tflops) {
            (Some(mfu), Some(peak)) => s += &format!(", MFU {:.1}% of {peak:.0} TFLOP/s\n", 100.0 * mfu),
            _ if self.device == "cpu" => s += " (no MFU on the CPU)\n",
            _ => s += " (no MFU: unknown peak for this device; give --peak-tflops)\n",
        }
        if let Some(b) = self.peak_memory_bytes {
            s += &format!("peak memory     {:.2} GiB: {}\n", gib(b), self.memory_measure);
        }
        if let (Some(mb), Some(ob)) = (self.model_device_bytes, self.optimizer_device_bytes) {
            s += &format!("  model buffers {:.2} GiB, optimizer state {:.2} GiB\n", gib(mb), gib(ob));
        }
        s += &format!("loss            {:.4} (first timed step) -> {:.4} (last)", self.loss_first, self.loss_last);
        if !self.gemm_tuning.is_empty() {
            s += &format!("\ngemm tuning     {} configurations (MAPET_GEMM_TUNE=1):", self.gemm_tuning.len());
            for line in &self.gemm_tuning {
                s += &format!("\n  {line}");
            }
        }
        if !self.gemm_algorithms.is_empty() {
            s += &format!(
                "\ngemm algorithms {} configurations (each line's MxNxK=@CONFIG, given to MAPET_GEMM_PIN, pins it):",
                self.gemm_algorithms.len()
            );
            for line in &self.gemm_algorithms {
                s += &format!("\n  {line}");
            }
        }
        s
    }
}

/// `mapet bench ARGS`: runs and prints the report (JSON with `--json`).
pub fn run(args: &[String]) -> Result<(), String> {
    let opts = parse_args(args)?;
    let report = bench(&opts)?;
    if opts.json {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.to_text());
    }
    Ok(())
}
