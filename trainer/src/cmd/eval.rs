//! `mapet eval`: the loss and predicted-token accuracy of a checkpoint over a whole image set.
//!
//! Every image is used once, in index order (no shuffle, no jitter, the last short batch kept),
//! with the permutation the loader draws for it in epoch 0 under `--seed`: keyed by
//! `(seed, 0, image id)`, so two checkpoints evaluated with the same seed see the same
//! permutations. Forward only, in eval mode (no drop path). The loss is the mean cross-entropy over
//! all predicted tokens of the set (every batch weighted by its token count), the accuracy the
//! fraction of them whose argmax is the target. An unreadable image is an error: an evaluation
//! covers the whole set or nothing. `--device` picks the model ([`crate::device`]): the GPU model
//! (bf16 activations) when one is usable, else the CPU model (f32; `auto` says why on stderr); the
//! device used is reported.

use std::path::PathBuf;

use std::sync::Arc;

use mapet::cuda::Gpu;
use mapet::model::checkpoint;
use mapet::model::cpu::{Batch, CpuModel, ForwardOutput};
use mapet::model::cuda::CudaModel;
use mapet::model::ModelConfig;
use mapet::ops::patch_embed::Normalize;

use super::{json_f64, json_str, open_index, parse, Parsed};
use crate::data::{Loader, LoaderConfig, Tokens};
use crate::device::{self, Device, Setting};

/// Where `--device` is given, for messages.
const DEVICE_FLAG: Setting = Setting::Flag("--device");

/// The command's usage.
pub const USAGE: &str = "usage: mapet eval --checkpoint DIR --data DIR|MANIFEST --tokens FILE.npy
                  [--batch 32] [--seed 0] [--threads T] [--device auto|cpu|cuda] [--json]
  Loss and predicted-token accuracy of a checkpoint over every image of a set, forward only.
  --checkpoint DIR   a checkpoint folder (model.safetensors, meta.json); the model's sizes come from it
  --data DIR|FILE    an image folder (sorted walk) or a manifest of paths relative to its folder
  --tokens FILE.npy  target ids [images, N-1] of the index the images come from
  --batch N          images per forward pass (default 32); the last batch may be short
  --seed S           permutations: image i gets the loader's epoch-0 draw keyed by (S, 0, i) (default 0)
  --threads T        decoder threads (default: the machine's cores)
  --device D         auto (default: the GPU when usable and the model fits its kernels), cpu or cuda
  --json             print one JSON object instead of the summary line";

/// What an evaluation measures.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSummary {
    /// The checkpoint folder.
    pub checkpoint: PathBuf,
    /// The checkpoint's training step.
    pub step: u64,
    /// Images evaluated.
    pub images: usize,
    /// Predicted tokens counted: images x (N - C).
    pub tokens: usize,
    /// Mean cross-entropy over those tokens.
    pub loss: f64,
    /// Tokens whose argmax is the target.
    pub correct: usize,
    /// `correct / tokens`.
    pub accuracy: f64,
    /// Where the forward passes ran ("cpu" or "cuda (NAME)").
    pub device: String,
}

/// The settings of one evaluation (the command's flags).
#[derive(Clone, Debug)]
pub struct EvalArgs {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    pub tokens: PathBuf,
    pub batch: usize,
    pub seed: u64,
    pub threads: usize,
    /// "auto", "cpu" or "cuda".
    pub device: String,
    pub json: bool,
}

/// Parses the command's arguments; `None` when help was asked for.
pub fn parse_args(args: &[String]) -> Result<Option<EvalArgs>, String> {
    let valued = ["checkpoint", "data", "tokens", "batch", "seed", "threads", "device"];
    let a = match parse("eval", args, &valued, &["json"])? {
        Parsed::Help => return Ok(None),
        Parsed::Args(a) => a,
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
    Ok(Some(EvalArgs {
        checkpoint: a.required("eval", "checkpoint", "DIR")?.into(),
        data: a.required("eval", "data", "DIR|MANIFEST")?.into(),
        tokens: a.required("eval", "tokens", "FILE.npy")?.into(),
        batch: a.positive("batch", 32)?,
        seed: a.number("seed", 0u64)?,
        threads: a.positive("threads", cores)?,
        device: Device::parse(a.get("device").unwrap_or("auto"), DEVICE_FLAG)?.to_string(),
        json: a.switch("json"),
    }))
}

/// Runs `mapet eval` (see [`USAGE`]).
pub fn run(args: &[String]) -> Result<(), String> {
    let Some(opts) = parse_args(args)? else {
        println!("{USAGE}");
        return Ok(());
    };
    let s = evaluate(&opts)?;
    if opts.json {
        println!(
            "{{\"checkpoint\": {}, \"step\": {}, \"images\": {}, \"tokens\": {}, \"loss\": {}, \"correct\": {}, \"accuracy\": {}, \"seed\": {}, \"device\": {}}}",
            json_str(&s.checkpoint.display().to_string()),
            s.step,
            s.images,
            s.tokens,
            json_f64(s.loss),
            s.correct,
            json_f64(s.accuracy),
            opts.seed,
            json_str(&s.device)
        );
    } else {
        println!(
            "{} (step {}): {} images, {} predicted tokens: loss {:.4}, accuracy {:.4} ({})",
            s.checkpoint.display(),
            s.step,
            s.images,
            s.tokens,
            s.loss,
            s.accuracy,
            s.device
        );
    }
    Ok(())
}

/// Loads the checkpoint and its config, checks the data against it and evaluates.
pub fn evaluate(opts: &EvalArgs) -> Result<EvalSummary, String> {
    let config = checkpoint::read_config(&opts.checkpoint).map_err(|e| format!("--checkpoint: {e}"))?;
    let ck = checkpoint::load_params(&opts.checkpoint, &config).map_err(|e| format!("--checkpoint: {e}"))?;
    let index = open_index(&opts.data)?;
    let tokens = Tokens::load_for(&opts.tokens, &index, &config).map_err(|e| {
        format!(
            "--tokens: {e} (the checkpoint {} is of a model with image {}, patch {}: {} patches per image, \
             codebook {})",
            opts.checkpoint.display(),
            config.image,
            config.patch,
            config.n_tokens() - 1,
            config.vocab
        )
    })?;
    let cfg = LoaderConfig {
        threads: opts.threads,
        jitter: false,
        seed: opts.seed,
        drop_last: false,
        shuffle: false,
        max_skip_fraction: 0.0,
        ..LoaderConfig::new(config.image, opts.batch)
    };
    let loader = Loader::new(index, tokens, cfg).map_err(|e| e.to_string())?;
    let mut model = EvalModel::new(&opts.device, &config, &ck.params, opts.batch)?;
    if let EvalModel::Cuda(m) = &model {
        // Page-locked batches: the copy engine reads them without a staging copy.
        let bytes = opts.batch * config.image * config.image * 3;
        loader.use_pinned(m.gpu().pinned_pool(bytes)).map_err(|e| e.to_string())?;
    }
    let (loss_sum, correct, counted, images) = forward_all(&loader, |b| model.forward(b))?;
    if counted == 0 {
        return Err(format!("--data {}: no image was evaluated", opts.data.display()));
    }
    Ok(EvalSummary {
        checkpoint: ck.dir,
        step: ck.step,
        images,
        tokens: counted,
        loss: loss_sum / counted as f64,
        correct,
        accuracy: correct as f64 / counted as f64,
        device: model.device(),
    })
}

/// The model an evaluation runs, with its parameters.
enum EvalModel<'p> {
    Cpu { model: CpuModel, params: &'p [f32] },
    Cuda(Box<CudaModel>),
}

impl<'p> EvalModel<'p> {
    /// The model `device` ("auto", "cpu", "cuda") selects for batches of at most `batch` images,
    /// by [`crate::device`]'s policy: "auto" takes the GPU when one is usable and supports the
    /// model, else the CPU, saying why on stderr (stdout is the result).
    fn new(device: &str, config: &ModelConfig, params: &'p [f32], batch: usize) -> Result<Self, String> {
        let (model, note) = device::select(
            Device::parse(device, DEVICE_FLAG)?,
            DEVICE_FLAG,
            params,
            |params| {
                let gpu = Arc::new(Gpu::first()?);
                let mut model = CudaModel::new(gpu, *config, batch)?;
                model.upload_params(params)?;
                Ok(EvalModel::Cuda(Box::new(model)))
            },
            |params| Ok(EvalModel::Cpu { model: CpuModel::new(*config).map_err(|e| e.to_string())?, params }),
        )?;
        if let Some(note) = note {
            eprintln!("{note}");
        }
        Ok(model)
    }

    fn forward(&mut self, batch: &Batch) -> Result<ForwardOutput, String> {
        match self {
            EvalModel::Cpu { model, params } => model.step(params, batch, None, None, false),
            EvalModel::Cuda(model) => model.step(batch, None, false, false),
        }
        .map_err(|e| e.to_string())
    }

    fn device(&self) -> String {
        match self {
            EvalModel::Cpu { .. } => "cpu".into(),
            EvalModel::Cuda(model) => format!("cuda ({})", model.gpu().name()),
        }
    }
}

/// Sum of the per-token losses, correct tokens, counted tokens and images over one epoch of
/// `loader`, with `forward` (a forward pass in eval mode: no drop path) on each batch.
pub fn forward_all(
    loader: &Loader,
    mut forward: impl FnMut(&Batch) -> Result<ForwardOutput, String>,
) -> Result<(f64, usize, usize, usize), String> {
    let norm = Normalize::IMAGENET;
    let (mut loss_sum, mut correct, mut counted, mut images) = (0.0f64, 0usize, 0usize, 0usize);
    // A line on stderr every 10 s of a long evaluation (stdout may hold the JSON alone).
    let (started, mut last_line) = (std::time::Instant::now(), std::time::Instant::now());
    for batch in loader.epoch(0) {
        let batch = batch.map_err(|e| format!("--data: {e}"))?;
        images += batch.len();
        let out = forward(&batch.into_model_batch(norm))?;
        loss_sum += out.stats.loss as f64 * out.stats.counted as f64;
        correct += out.stats.correct;
        counted += out.stats.counted;
        if last_line.elapsed().as_secs_f64() >= 10.0 {
            eprintln!("evaluated {images} of {} images ({:.0} s)", loader.len(), started.elapsed().as_secs_f64());
            last_line = std::time::Instant::now();
        }
    }
    Ok((loss_sum, correct, counted, images))
}
