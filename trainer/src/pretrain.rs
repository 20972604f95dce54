//! `mapet pretrain`: the training loop. Data from the loader (decoded, cropped, resized and
//! jittered on worker threads, permutations fixed by (seed, epoch, image)), one optimizer step per
//! `micro_batches` loader batches, a progress line, metrics per step to `metrics.csv`, a curve plot
//! and a checkpoint every `checkpoint_every` steps and at the end, and on Ctrl-C a checkpoint
//! before a clean exit. A NaN or Inf loss stops the run naming the step; the last checkpoint is
//! kept as it was. Unreadable images are skipped and counted (the count and names are printed
//! at the end of each epoch, whose last steps they may cost); past `data.max_skipped_fraction`
//! of an epoch the run stops, after a checkpoint of the steps trained so far. A checkpoint that
//! cannot be written (a full disk) stops the run with the previous checkpoint intact.
//!
//! `train.device` picks the backend: `"cpu"` the CPU model ([`train_step`]), `"cuda"` the GPU
//! model ([`train_step_cuda`]; an error when no GPU is usable), `"auto"` the GPU when one is
//! usable and the GPU model runs the config (head dim 64), else the CPU. Both run the same loop;
//! on the GPU the state lives on the device and is downloaded for each checkpoint, in the same
//! format.
//!
//! A run never writes over an earlier one by accident: a new run (no `--resume`) into an output
//! folder that already holds a checkpoint, `metrics.csv` or `eval.csv` with rows is refused before
//! anything there changes, as is a run resumed from another checkpoint into such a folder; the
//! `--overwrite` flag ([`RunOptions::overwrite`]) starts over there anyway. Each checkpoint
//! stores the loader's position in the epoch ([`checkpoint::DataPosition`]), so that a resumed
//! run continues with the very next image even after epochs that skipped unreadable images.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mapet::cuda::Gpu;
use mapet::model::checkpoint::{self, DataPosition};
use mapet::model::cpu::{Batch, CpuModel};
use mapet::model::cuda::CudaModel;
use mapet::model::cuda_train::{train_step_cuda, CudaTrainState};
use mapet::model::optim::LrSchedule;
use mapet::model::train::{train_step, Recipe, StepStats, TrainState};
use mapet::model::{ModelConfig, ParamLayout};
use mapet::ops::patch_embed::Normalize;

use crate::config::PretrainConfig;
use crate::data::{ImageIndex, Loader, LoaderConfig, Tokens};
use crate::device::{self, Device, Setting};
use crate::plot::{write_curves, Series};

/// One row of `metrics.csv`.
#[derive(Clone, Copy, Debug)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub accuracy: f64,
    pub lr: f32,
    pub grad_norm: f32,
    pub images_per_s: f64,
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    /// The step the run ended at (updates done, counting those of the checkpoint it resumed).
    pub steps: u64,
    /// The step it started at: 0, or the resumed checkpoint's.
    pub start_step: u64,
    /// The run's length in steps (its recipe's): nothing is trained when a resumed checkpoint is
    /// already there or past it.
    pub total_steps: u64,
    pub first_loss: f32,
    pub last_loss: f32,
    pub interrupted: bool,
    pub out_dir: PathBuf,
    pub skipped_images: usize,
}

/// How [`run_with`] starts and ends a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions<'a> {
    /// Continue from this checkpoint folder (`--resume DIR`); `None` starts a new run.
    pub resume: Option<&'a Path>,
    /// Write over the checkpoint and metrics an earlier run left in the output folder
    /// (`--overwrite`), instead of refusing to start.
    pub overwrite: bool,
    /// Stop after this training step, as Ctrl-C would: with a checkpoint (a run of a fixed
    /// length, e.g. a time slot on a shared machine, that a later `--resume` continues).
    pub stop_after: Option<u64>,
}

/// The training data of a run: its index and token file.
pub struct DataSource {
    pub index: ImageIndex,
    pub tokens: Tokens,
    /// A held-out split, evaluated at every checkpoint (loss and accuracy with fixed
    /// permutations, forward only, on the model being trained: the GPU model when training runs
    /// there, which evaluates from the device's parameters without copying them back).
    pub eval: Option<(ImageIndex, Tokens)>,
}

/// One evaluation of the held-out split.
#[derive(Clone, Copy, Debug)]
pub struct EvalRecord {
    pub step: u64,
    pub loss: f64,
    pub accuracy: f64,
}

/// Adds the evaluation split the config asks for: `data.eval` + `data.eval_tokens` (a second
/// set), or `data.eval_fraction` of the training images held out by index (seeded), or none.
pub fn with_eval_split(cfg: &PretrainConfig, mut data: DataSource) -> Result<DataSource, String> {
    let model = cfg.model_config()?;
    match (&cfg.data.eval, &cfg.data.eval_tokens) {
        (Some(dir), Some(tokens)) => {
            let index = crate::cmd::open_index_as(dir, "data.eval")?;
            let tokens = Tokens::load_for(tokens, &index, &model).map_err(|e| format!("data.eval_tokens: {e}"))?;
            data.eval = Some((index, tokens));
        }
        (None, None) if cfg.data.eval_fraction > 0.0 => {
            let (train, held) = crate::data::split_holdout(&data.index, cfg.data.eval_fraction, cfg.train.seed)
                .map_err(|e| format!("data.eval_fraction: {e}"))?;
            if held.is_empty() {
                return Err(format!(
                    "data.eval_fraction = {} of {} images holds out none",
                    cfg.data.eval_fraction,
                    data.index.len()
                ));
            }
            data.eval = Some((held, data.tokens.clone()));
            data.index = train;
        }
        (None, None) => {}
        _ => return Err("data.eval and data.eval_tokens go together".into()),
    }
    Ok(data)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The recipe of `cfg` for `steps_per_epoch` updates per epoch.
pub fn recipe_for(cfg: &PretrainConfig, steps_per_epoch: u64) -> Recipe {
    let t = &cfg.train;
    let total = ((t.epochs * steps_per_epoch as f64).ceil() as u64).max(1);
    let warmup = ((t.warmup_epochs * steps_per_epoch as f64).round() as u64).min(total);
    Recipe {
        schedule: LrSchedule {
            peak_lr: cfg.peak_lr(),
            warmup_steps: warmup,
            total_steps: total,
            warmup_start_lr: t.warmup_start_lr,
            final_lr: t.final_lr,
        },
        weight_decay: t.weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        clip_norm: t.clip,
        drop_path: t.drop_path,
        micro_batches: t.micro_batches,
        // The loader fixes each image's permutation from (seed, epoch, image), so that a resumed
        // run sees the same permutations as an uninterrupted one.
        resample_ranks: false,
        seed: t.seed,
    }
}

/// A fresh training state with the config's layer-scale initial value.
fn fresh_state(layout: &ParamLayout, cfg: &PretrainConfig) -> TrainState {
    let mut state = TrainState::new(layout, cfg.train.seed);
    for spec in layout.specs.iter().filter(|s| s.name.ends_with(".gamma")) {
        state.params[spec.range()].fill(cfg.train.layer_scale);
    }
    state
}

/// The model and training state of a run, on the backend it trains on.
enum Engine {
    Cpu { model: CpuModel, state: TrainState },
    Cuda { model: Box<CudaModel>, state: CudaTrainState },
}

impl Engine {
    /// The engine `cfg.train.device` selects for batches of `micro` images, holding `state`; and
    /// the backend's description for the log. The choice follows [`crate::device`]'s policy: "auto"
    /// falls back to the CPU when no GPU is usable or the GPU model does not support the config,
    /// printing why to the training log (stdout).
    fn new(
        cfg: &PretrainConfig,
        model_cfg: ModelConfig,
        micro: usize,
        state: TrainState,
    ) -> Result<(Self, String), String> {
        let setting = Setting::Key("train.device");
        let device = Device::parse(&cfg.train.device, setting)?;
        let (engine, note) = device::select(
            device,
            setting,
            state,
            |state| Self::cuda(model_cfg, micro, state),
            |state| Ok((Engine::Cpu { model: CpuModel::new(model_cfg).map_err(err)?, state }, "cpu".into())),
        )?;
        if let Some(note) = note {
            crate::say!("{note}");
        }
        Ok(engine)
    }

    fn cuda(model_cfg: ModelConfig, micro: usize, state: &TrainState) -> mapet::Result<(Self, String)> {
        let gpu = Arc::new(Gpu::first()?);
        let mut model = CudaModel::new(gpu.clone(), model_cfg, micro)?;
        let state = CudaTrainState::upload(&gpu, &mut model, state)?;
        let name = format!("cuda ({})", gpu.name());
        Ok((Engine::Cuda { model: Box::new(model), state }, name))
    }

    fn layout(&self) -> &ParamLayout {
        match self {
            Engine::Cpu { model, .. } => &model.layout,
            Engine::Cuda { model, .. } => &model.layout,
        }
    }

    fn step(&self) -> u64 {
        match self {
            Engine::Cpu { state, .. } => state.step,
            Engine::Cuda { state, .. } => state.step,
        }
    }

    fn epoch(&self) -> u64 {
        match self {
            Engine::Cpu { state, .. } => state.epoch,
            Engine::Cuda { state, .. } => state.epoch,
        }
    }

    fn finish_epoch(&mut self) {
        match self {
            Engine::Cpu { state, .. } => state.epoch += 1,
            Engine::Cuda { state, .. } => state.epoch += 1,
        }
    }

    fn train(&mut self, recipe: &Recipe, micro_batches: &mut [Batch]) -> mapet::Result<StepStats> {
        match self {
            Engine::Cpu { model, state } => train_step(model, state, recipe, micro_batches),
            Engine::Cuda { model, state } => train_step_cuda(model, state, recipe, micro_batches),
        }
    }

    /// The state on the host (downloaded from the GPU), for a checkpoint.
    fn host_state(&self) -> Result<Cow<'_, TrainState>, String> {
        match self {
            Engine::Cpu { state, .. } => Ok(Cow::Borrowed(state)),
            Engine::Cuda { model, state } => {
                state.download(model).map(Cow::Owned).map_err(|e| format!("reading the state from the GPU: {e}"))
            }
        }
    }

    /// Writes the checkpoint (with the loader's position `data`) and the plot.
    fn save(
        &self,
        dir: &Path,
        recipe: &Recipe,
        data: DataPosition,
        out: &Path,
        history: &[StepRecord],
        evals: &[EvalRecord],
    ) -> Result<(), String> {
        let state = self.host_state()?;
        save(dir, self.layout(), recipe, &state, data, out, history, evals)
    }
}

/// Evaluates the held-out split (if any) with the current parameters; appends a row to
/// `eval.csv` and to `evals`, and prints it.
fn evaluate(
    engine: &mut Engine,
    loader: Option<&Loader>,
    out: &Path,
    evals: &mut Vec<EvalRecord>,
) -> Result<(), String> {
    let Some(loader) = loader else { return Ok(()) };
    let step = engine.step();
    let (loss_sum, correct, counted, images) = match engine {
        Engine::Cpu { model, state } => {
            crate::cmd::eval::forward_all(loader, |b| model.step(&state.params, b, None, None, false).map_err(err))?
        }
        // Forward only on the device's current parameters: the gradients are not touched.
        Engine::Cuda { model, .. } => {
            crate::cmd::eval::forward_all(loader, |b| model.step(b, None, false, false).map_err(err))?
        }
    };
    if counted == 0 {
        return Err("evaluation split: no image was evaluated".into());
    }
    let rec = EvalRecord { step, loss: loss_sum / counted as f64, accuracy: correct as f64 / counted as f64 };
    end_progress_line();
    crate::say!("eval at step {}: loss {:.4}, accuracy {:.4} over {images} images", rec.step, rec.loss, rec.accuracy);
    let path = out.join("eval.csv");
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if new {
        writeln!(f, "step,loss,accuracy").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    writeln!(f, "{},{:.6},{:.6}", rec.step, rec.loss, rec.accuracy).map_err(|e| format!("{}: {e}", path.display()))?;
    evals.push(rec);
    Ok(())
}

/// Runs pre-training on the backend `cfg.train.device` selects, a new run or one resumed from
/// the checkpoint folder `resume`; refuses to write over an earlier run (see [`run_with`]).
/// `stop` is raised by Ctrl-C.
pub fn run(
    cfg: &PretrainConfig,
    data: DataSource,
    resume: Option<&Path>,
    stop: Arc<AtomicBool>,
) -> Result<RunSummary, String> {
    run_with(cfg, data, RunOptions { resume, ..RunOptions::default() }, stop)
}

/// Takes the output folder `out` for this process (an exclusive `flock` on `out/.lock`, held until
/// the returned file is dropped): two runs started into one folder would write over each other's
/// metrics and checkpoints.
#[cfg(unix)]
fn lock_output_folder(out: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::io::AsRawFd;
    let path = out.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor this function owns (through `file`), with valid flags.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(busy(out));
        }
        // A file system without locks (some network mounts): the run goes on unguarded.
        crate::say!("warning: cannot lock {} ({e}): nothing stops a second run into this folder", path.display());
    }
    Ok(file)
}

/// The refusal of a run into `out` while another holds its lock.
fn busy(out: &Path) -> String {
    format!(
        "another mapet pretrain is writing to {} (it holds {}): wait for it, or give this run another --out",
        out.display(),
        out.join(".lock").display()
    )
}

/// Whether another process holds `out`'s lock (an existing `out/.lock`, tried and let go).
#[cfg(unix)]
fn folder_busy(out: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(file) = std::fs::File::open(out.join(".lock")) else { return false };
    // SAFETY: flock on a file descriptor `file` owns, with valid flags; the lock, if taken, goes
    // with the file at the end of this function.
    let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    held && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

#[cfg(not(unix))]
fn folder_busy(_: &Path) -> bool {
    false
}

#[cfg(not(unix))]
fn lock_output_folder(_: &Path) -> Result<(), String> {
    Ok(())
}

/// The run folder that holds the checkpoint folder `ckpt` (`OUT` of `OUT/checkpoint`): where a
/// run resumed from it goes on writing when no output folder is given.
pub fn run_folder_of(ckpt: &Path) -> PathBuf {
    // Through a link (`latest -> ../run/checkpoint`), the folder that holds the checkpoint itself.
    let ckpt = ckpt.canonicalize().unwrap_or_else(|_| ckpt.to_path_buf());
    match ckpt.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `a` and `b` name the same folder (either may not exist yet).
fn same_folder(a: &Path, b: &Path) -> bool {
    crate::cmd::resolved(a) == crate::cmd::resolved(b)
}

/// What an earlier run left in the output folder `out` that a new run would write over: its
/// checkpoint (also one that an interrupted save left as `checkpoint.old`), or `metrics.csv` or
/// `eval.csv` with rows.
fn earlier_run(out: &Path, ckpt_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let old = ckpt_dir.with_file_name("checkpoint.old");
    for dir in [ckpt_dir, old.as_path()] {
        if dir.join(checkpoint::META_FILE).is_file() {
            found.push(format!("a checkpoint ({})", dir.display()));
        }
    }
    for name in ["metrics.csv", "eval.csv"] {
        let path = out.join(name);
        let rows = std::fs::read_to_string(&path).map(|t| t.lines().skip(1).any(|l| !l.trim().is_empty()));
        // A file there that cannot be read is not written over either.
        if rows.unwrap_or_else(|_| path.exists()) {
            found.push(path.display().to_string());
        }
    }
    found
}

/// Errors, naming the folder and the ways on, when a run started as `opts` says would write over
/// an earlier run in the output folder `out`: when `out` holds a checkpoint (`out/checkpoint`, or
/// `out/checkpoint.old` left by an interrupted save), or `metrics.csv` or `eval.csv` with rows,
/// unless `opts.resume` is that very checkpoint or `opts.overwrite` is set. [`run_with`] checks
/// it before writing anything; a caller may check it earlier (before preparing data).
pub fn check_output_folder(out: &Path, opts: RunOptions<'_>) -> Result<(), String> {
    let ckpt_dir = out.join("checkpoint");
    let own_checkpoint = opts
        .resume
        .is_some_and(|dir| same_folder(dir, &ckpt_dir) || same_folder(dir, &ckpt_dir.with_file_name("checkpoint.old")));
    // A run writing there now comes first: its folder is no earlier run to resume or start over.
    if folder_busy(out) {
        return Err(busy(out));
    }
    if opts.overwrite || own_checkpoint {
        return Ok(());
    }
    let found = earlier_run(out, &ckpt_dir);
    if found.is_empty() {
        return Ok(());
    }
    let (what, start_over) = match opts.resume {
        None => ("a new run".to_string(), ", or give `--overwrite` to start over there"),
        Some(dir) => (format!("a run resumed from {}", dir.display()), ""),
    };
    // Only a checkpoint can be resumed (a run stopped before its first one left metrics alone).
    let resumable = [ckpt_dir.clone(), ckpt_dir.with_file_name("checkpoint.old")]
        .into_iter()
        .find(|dir| dir.join(checkpoint::META_FILE).is_file());
    let go_on = match resumable {
        Some(dir) => format!("to continue that run use `--resume {}`, ", dir.display()),
        None => "it left no checkpoint to continue from; ".to_string(),
    };
    Err(format!(
        "the output folder {} holds an earlier run ({}), which {what} would write over; {go_on}to keep it start \
         this one in another folder (`--out DIR` or output.dir){start_over}",
        out.display(),
        found.join(", "),
    ))
}

/// Runs pre-training as [`run`] does, started as `opts` says. A new run into an output folder
/// that holds an earlier run's checkpoint or metrics (see the module notes), or a run resumed
/// from a checkpoint other than the folder's own, is refused before anything in the folder
/// changes, unless `opts.overwrite`.
pub fn run_with(
    cfg: &PretrainConfig,
    data: DataSource,
    opts: RunOptions<'_>,
    stop: Arc<AtomicBool>,
) -> Result<RunSummary, String> {
    let resume = opts.resume;
    cfg.validate()?;
    let model_cfg: ModelConfig = cfg.model_config()?;
    let layout = ParamLayout::new(model_cfg).map_err(err)?;
    let micro = cfg.train.batch / cfg.train.micro_batches;
    let mut lcfg = LoaderConfig::new(model_cfg.image, micro);
    lcfg.seed = cfg.train.seed;
    lcfg.jitter = cfg.data.jitter;
    lcfg.prefetch = cfg.data.prefetch.max(1);
    lcfg.max_skip_fraction = cfg.data.max_skipped_fraction;
    if cfg.data.threads > 0 {
        lcfg.threads = cfg.data.threads;
    }
    let eval_loader = match data.eval {
        Some((index, tokens)) => {
            let ecfg = LoaderConfig {
                jitter: false,
                shuffle: false,
                drop_last: false,
                max_skip_fraction: 0.0,
                ..lcfg.clone()
            };
            Some(Loader::new(index, tokens, ecfg).map_err(|e| format!("evaluation split: {e}"))?)
        }
        None => None,
    };
    if data.index.len() < micro {
        return Err(format!(
            "{} training images do not fill one batch of {micro} images (train.batch {}, train.micro_batches {}): give \
             a smaller --batch (train.batch), or more images",
            data.index.len(),
            cfg.train.batch,
            cfg.train.micro_batches
        ));
    }
    let loader = Loader::new(data.index, data.tokens, lcfg).map_err(err)?;
    let batches_per_epoch = loader.batches_per_epoch();
    let steps_per_epoch = (batches_per_epoch / cfg.train.micro_batches) as u64;
    if steps_per_epoch == 0 {
        return Err(format!(
            "{} images give no full step of batch {} (drop-last): use a smaller train.batch",
            loader.len(),
            cfg.train.batch
        ));
    }
    let recipe = recipe_for(cfg, steps_per_epoch);
    let out = cfg.output.dir.clone();
    let ckpt_dir = out.join("checkpoint");

    let (state, position) = match resume {
        Some(dir) => {
            let ck = checkpoint::load(dir, &model_cfg).map_err(|e| format!("--resume: {e}"))?;
            crate::say!(
                "resuming from {} at step {} (epoch {}), writing to {}",
                ck.dir.display(),
                ck.state.step,
                ck.state.epoch,
                cfg.output.dir.display()
            );
            // Checkpoints of before the loader's position was stored: the epoch's steps from the
            // step count, as if no image had been skipped.
            let position = ck.data.unwrap_or_else(|| {
                let epoch_steps = ck.state.step.saturating_sub(ck.state.epoch * steps_per_epoch);
                DataPosition { epoch_steps, next_image: epoch_steps * cfg.train.batch as u64 }
            });
            if position.next_image > loader.len() as u64 {
                return Err(format!(
                    "--resume: {}: the checkpoint's data position (image {} of epoch {}) is past the end of an epoch \
                     of {} images: it was trained on other data",
                    ck.dir.display(),
                    position.next_image,
                    ck.state.epoch,
                    loader.len()
                ));
            }
            let changes = recipe_changes(&ck.recipe, &recipe);
            if !changes.is_empty() {
                let step = ck.state.step;
                crate::say!(
                    "note: this run's recipe differs from the checkpoint's ({}): the learning rate of step {} is {:.3e}, \
                     where the checkpoint's schedule had {:.3e}",
                    changes.join(", "),
                    step + 1,
                    recipe.schedule.lr(step),
                    ck.recipe.schedule.lr(step)
                );
            }
            // Nothing left to train: say so, and leave the checkpoint and metrics as they are.
            if ck.state.step >= recipe.schedule.total_steps {
                return Ok(RunSummary {
                    steps: ck.state.step,
                    start_step: ck.state.step,
                    total_steps: recipe.schedule.total_steps,
                    first_loss: f32::NAN,
                    last_loss: f32::NAN,
                    interrupted: false,
                    out_dir: cfg.output.dir.clone(),
                    skipped_images: 0,
                });
            }
            (ck.state, position)
        }
        None => (fresh_state(&layout, cfg), DataPosition::default()),
    };
    // Refuse to write over an earlier run, before anything in the output folder changes.
    recipe.validate().map_err(err)?;
    check_output_folder(&out, opts)?;
    // Not into the training images (the run's files would join the image set).
    let mut data_dirs: Vec<(&str, &Path)> = Vec::new();
    if let Some(train) = cfg.data.train.as_deref().filter(|p| p.is_dir()) {
        data_dirs.push(("data.train", train));
    }
    if let Some(eval) = cfg.data.eval.as_deref().filter(|p| p.is_dir()) {
        data_dirs.push(("data.eval", eval));
    }
    crate::cmd::refuse_overwriting_inputs("the output folder", &out, &data_dirs)?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: cannot create: {e}", out.display()))?;
    // One run at a time writes to a folder: a second one started into it is refused.
    let _lock = lock_output_folder(&out)?;
    if opts.overwrite && resume.is_none() {
        // Starting over: the earlier run's checkpoint goes now, so that a run that fails before
        // its first one leaves no mix of the two runs (its metrics are rewritten below).
        for dir in [ckpt_dir.clone(), ckpt_dir.with_file_name("checkpoint.old")] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| format!("--overwrite: removing {}: {e}", dir.display()))?;
                crate::say!("--overwrite: removed the earlier run's {}", dir.display());
            }
        }
    }
    let (mut engine, backend) = Engine::new(cfg, model_cfg, micro, state)?;
    // On a GPU the loaders assemble batches in page-locked memory, which the copy engine reads
    // without a staging copy on the training thread.
    if let Engine::Cuda { model, .. } = &engine {
        let bytes = micro * model_cfg.image * model_cfg.image * 3;
        for l in std::iter::once(&loader).chain(eval_loader.as_ref()) {
            l.use_pinned(model.gpu().pinned_pool(bytes)).map_err(err)?;
        }
    }
    let metrics_path = out.join("metrics.csv");
    let mut history = read_history(&metrics_path, engine.step());
    let mut metrics = open_metrics(&metrics_path, engine.step()).map_err(err)?;
    let mut evals = read_evals(&out.join("eval.csv"), engine.step()).map_err(err)?;

    let total = recipe.schedule.total_steps;
    let norm = Normalize::IMAGENET;
    for w in cfg.warnings() {
        crate::say!("warning: {w}");
    }
    let plural = crate::say::count;
    crate::say!(
        "pretrain on the {} backend: {}, {} an epoch, {} in all (warm-up {}, peak lr {:.3e}, final {:.3e}), batch {} ({}), model dim {} depth {} heads {} vocab {}, {} parameters",
        backend,
        plural(loader.len() as u64, "image", "images"),
        plural(steps_per_epoch, "step", "steps"),
        plural(total, "step", "steps"),
        recipe.schedule.warmup_steps,
        recipe.schedule.peak_lr,
        recipe.schedule.final_lr,
        cfg.train.batch,
        plural(cfg.train.micro_batches as u64, "micro-batch", "micro-batches"),
        model_cfg.dim,
        model_cfg.depth,
        model_cfg.heads,
        model_cfg.vocab,
        layout.num_params()
    );
    let started = Instant::now();
    let mut bar = Progress::new();
    let start_step = engine.step();
    let mut first_loss = f32::NAN;
    let mut last_loss = f32::NAN;
    let mut interrupted = false;
    let mut last_ckpt_step = engine.step();

    // What the checkpoint folder holds now, for the messages of a run that stops on an error.
    let kept = |written: Option<u64>| -> String {
        match written {
            Some(step) => format!("the checkpoint {} (step {step}) is kept as it was", ckpt_dir.display()),
            None if ckpt_dir.join(checkpoint::META_FILE).is_file() => {
                format!("the checkpoint {} is kept as it was", ckpt_dir.display())
            }
            None => format!("no checkpoint was written to {}", ckpt_dir.display()),
        }
    };
    let mut written: Option<u64> = None;
    // The loader's position in the epoch `engine.epoch()`: steps trained in it and the next image.
    let mut position = position;

    'epochs: while engine.step() < total {
        let epoch = engine.epoch();
        let mut batches = loader.epoch_from(epoch, position.next_image as usize).map_err(err)?;
        // Skipped images make an epoch end early (fewer full batches); it is then over all the same.
        let mut exhausted = false;
        while position.epoch_steps < steps_per_epoch && engine.step() < total {
            // An interrupt, or stdout gone (its reader quit): stop here with a checkpoint.
            let asked = stop.load(Ordering::SeqCst) || crate::say::stdout_gone();
            if asked || opts.stop_after.is_some_and(|s| engine.step() >= s) {
                interrupted = true;
                break 'epochs;
            }
            let t0 = Instant::now();
            let mut micro_batches = Vec::with_capacity(cfg.train.micro_batches);
            let mut next_image = position.next_image;
            for _ in 0..cfg.train.micro_batches {
                match batches.next() {
                    Some(Ok(b)) => {
                        next_image = b.next_position as u64;
                        micro_batches.push(b.into_model_batch(norm));
                    }
                    Some(Err(e)) => {
                        // Keep the steps trained so far before giving up on the data.
                        let saved = if engine.step() > last_ckpt_step {
                            engine.save(&ckpt_dir, &recipe, position, &out, &history, &evals)?;
                            format!("checkpoint written at step {} in {}", engine.step(), ckpt_dir.display())
                        } else {
                            kept(written)
                        };
                        let hint = match e {
                            crate::data::DataError::TooManySkipped { .. } => {
                                " (the limit is data.max_skipped_fraction)"
                            }
                            _ => "",
                        };
                        return Err(format!("training data: {e}{hint}; stopping, {saved}"));
                    }
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            if micro_batches.len() < cfg.train.micro_batches {
                break;
            }
            let stats = match engine.train(&recipe, &mut micro_batches) {
                Ok(s) => s,
                Err(e @ mapet::Error::NonFinite { .. }) => {
                    return Err(format!("{e}; stopping: {}", kept(written)));
                }
                Err(e) => return Err(e.to_string()),
            };
            position = DataPosition { epoch_steps: position.epoch_steps + 1, next_image };
            let ips = cfg.train.batch as f64 / t0.elapsed().as_secs_f64();
            if first_loss.is_nan() {
                first_loss = stats.loss;
            }
            last_loss = stats.loss;
            let rec = StepRecord {
                step: engine.step(),
                epoch,
                loss: stats.loss,
                accuracy: stats.accuracy,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                images_per_s: ips,
            };
            writeln!(
                metrics,
                "{},{},{:.6},{:.6},{:.6e},{:.4},{:.2}",
                rec.step, rec.epoch, rec.loss, rec.accuracy, rec.lr, rec.grad_norm, rec.images_per_s
            )
            .map_err(|e| format!("{}: {e}", metrics_path.display()))?;
            history.push(rec);
            bar.show(&rec, total, start_step, &started);
            let step = engine.step();
            if cfg.output.checkpoint_every > 0 && step % cfg.output.checkpoint_every == 0 && step < total {
                evaluate(&mut engine, eval_loader.as_ref(), &out, &mut evals)?;
                engine.save(&ckpt_dir, &recipe, position, &out, &history, &evals)?;
                last_ckpt_step = step;
                written = Some(step);
            }
        }
        drop(batches);
        if position.epoch_steps >= steps_per_epoch || exhausted {
            let steps_this_epoch = position.epoch_steps;
            engine.finish_epoch();
            position = DataPosition::default();
            let skipped: Vec<_> = loader.skipped().into_iter().filter(|s| s.epoch == epoch).collect();
            if !skipped.is_empty() {
                end_progress_line();
                crate::say!(
                    "epoch {epoch}: {} unreadable images skipped ({} steps instead of {steps_per_epoch}), limit \
                     data.max_skipped_fraction = {}:",
                    skipped.len(),
                    steps_this_epoch,
                    cfg.data.max_skipped_fraction
                );
                for s in skipped.iter().take(5) {
                    crate::say!("  {}: {}", s.path.display(), s.reason);
                }
                if skipped.len() > 5 {
                    crate::say!("  ... and {} more", skipped.len() - 5);
                }
            }
        }
    }
    end_progress_line();
    if crate::say::stdout_gone() {
        eprintln!("stdout is gone (its reader quit): stopping at step {}", engine.step());
    }
    if engine.step() == start_step {
        // Nothing trained (stopped before the first step): no checkpoint to write.
    } else if interrupted {
        // An interrupt's grace period (a scheduler's) may be short: the checkpoint comes first,
        // then the held-out evaluation, whose failure no longer costs the steps trained.
        engine.save(&ckpt_dir, &recipe, position, &out, &history, &evals)?;
        crate::say!("interrupted: checkpoint written at step {} in {}", engine.step(), ckpt_dir.display());
        if let Err(e) = evaluate(&mut engine, eval_loader.as_ref(), &out, &mut evals) {
            eprintln!("the evaluation after the interrupt failed (the checkpoint is written): {e}");
        }
    } else {
        evaluate(&mut engine, eval_loader.as_ref(), &out, &mut evals)?;
        engine.save(&ckpt_dir, &recipe, position, &out, &history, &evals)?;
    }
    let skipped = loader.skipped_count();
    if skipped > 0 {
        // (An unreadable file is skipped again in every epoch: the count is of skips. The files
        // are counted among the skips the loader keeps.)
        let kept = loader.skipped();
        let files: std::collections::BTreeSet<_> = kept.iter().map(|s| &s.path).collect();
        let of = if kept.len() == skipped { "" } else { "at least " };
        crate::say!(
            "{skipped} skips of unreadable images in the epochs read ({of}{}; each is skipped again every epoch, \
             and the loader reads ahead of the last step):",
            crate::say::count(files.len() as u64, "file", "files")
        );
        for s in kept.iter().take(20) {
            crate::say!("  epoch {}: {}: {}", s.epoch, s.path.display(), s.reason);
        }
    }
    Ok(RunSummary {
        steps: engine.step(),
        start_step,
        total_steps: total,
        first_loss,
        last_loss,
        interrupted,
        out_dir: out,
        skipped_images: skipped,
    })
}

/// What differs between the recipe a checkpoint was trained with and this run's, as
/// "name old → new" (a resumed run trains on with the new one).
fn recipe_changes(old: &Recipe, new: &Recipe) -> Vec<String> {
    let (a, b) = (&old.schedule, &new.schedule);
    let fields: [(&str, String, String); 10] = [
        ("total steps", a.total_steps.to_string(), b.total_steps.to_string()),
        ("warmup steps", a.warmup_steps.to_string(), b.warmup_steps.to_string()),
        ("peak lr", a.peak_lr.to_string(), b.peak_lr.to_string()),
        ("final lr", a.final_lr.to_string(), b.final_lr.to_string()),
        ("warmup start lr", a.warmup_start_lr.to_string(), b.warmup_start_lr.to_string()),
        ("weight decay", old.weight_decay.to_string(), new.weight_decay.to_string()),
        ("clip", old.clip_norm.to_string(), new.clip_norm.to_string()),
        ("drop path", old.drop_path.to_string(), new.drop_path.to_string()),
        ("micro-batches", old.micro_batches.to_string(), new.micro_batches.to_string()),
        ("seed", old.seed.to_string(), new.seed.to_string()),
    ];
    fields.into_iter().filter(|(_, o, n)| o != n).map(|(name, o, n)| format!("{name} {o} → {n}")).collect()
}

/// Whether a progress line is on the terminal without its newline yet ([`end_progress_line`]).
static BAR_OPEN: AtomicBool = AtomicBool::new(false);

/// Ends the progress line, if one is open, so that what is printed next (an evaluation, a
/// warning, an error) starts a line of its own.
pub fn end_progress_line() {
    if BAR_OPEN.swap(false, Ordering::SeqCst) {
        crate::say!();
    }
}

/// A loss for the log: four decimals, or four significant digits in scientific notation where
/// that would be long (a run diverging).
pub fn fmt_loss(x: f32) -> String {
    if x.is_finite() && x.abs() >= 1e4 {
        format!("{x:.4e}")
    } else {
        format!("{x:.4}")
    }
}

/// The progress of a run: on a terminal a line redrawn every step; otherwise (a log file, a
/// pipe) a line of its own for the first step, the last, and one at most every
/// [`Progress::LOG_EVERY`] seconds between, so that a log holds lines, not one line of carriage
/// returns.
struct Progress {
    terminal: bool,
    last_line: Option<Instant>,
}

impl Progress {
    const LOG_EVERY: f64 = 10.0;

    fn new() -> Self {
        use std::io::IsTerminal;
        Progress { terminal: std::io::stdout().is_terminal(), last_line: None }
    }

    fn show(&mut self, rec: &StepRecord, total: u64, start_step: u64, started: &Instant) {
        // Off a terminal, most steps print nothing: decided before any text is made.
        let due = self.last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= Self::LOG_EVERY);
        if !self.terminal && !due && rec.step < total {
            return;
        }
        let done = rec.step - start_step;
        let left = total.saturating_sub(rec.step);
        let per_step = started.elapsed().as_secs_f64() / done.max(1) as f64;
        let eta = per_step * left as f64;
        let text = format!(
            "step {}/{} epoch {} loss {} acc {:.3} lr {:.2e} {:.1} img/s ETA {}",
            rec.step,
            total,
            rec.epoch,
            fmt_loss(rec.loss),
            rec.accuracy,
            rec.lr,
            rec.images_per_s,
            fmt_duration(eta)
        );
        if self.terminal {
            let width = 24usize;
            let filled = ((width as f64 * rec.step as f64 / total.max(1) as f64) as usize).min(width);
            crate::say_part!("\r[{}{}] {text}   ", "#".repeat(filled), ".".repeat(width - filled));
            BAR_OPEN.store(true, Ordering::SeqCst);
        } else {
            crate::say!("{text}");
            self.last_line = Some(Instant::now());
        }
    }
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[allow(clippy::too_many_arguments)]
fn save(
    dir: &Path,
    layout: &ParamLayout,
    recipe: &Recipe,
    state: &TrainState,
    data: DataPosition,
    out: &Path,
    history: &[StepRecord],
    evals: &[EvalRecord],
) -> Result<(), String> {
    checkpoint::save_with_data(dir, layout, recipe, state, Some(data)).map_err(|e| {
        let previous = match checkpoint::read_config(dir) {
            Ok(_) => format!("the previous checkpoint in {} is unchanged", dir.display()),
            Err(_) => "no previous checkpoint there".to_string(),
        };
        format!("writing the checkpoint of step {}: {e}; {previous}", state.step)
    })?;
    write_plot(&out.join("curves.png"), history, evals)
}

/// The loss and accuracy curves of `history`, with a running mean over 20 steps, and the
/// held-out evaluations.
pub fn write_plot(path: &Path, history: &[StepRecord], evals: &[EvalRecord]) -> Result<(), String> {
    let loss: Vec<(f64, f64)> = history.iter().map(|r| (r.step as f64, r.loss as f64)).collect();
    let acc: Vec<(f64, f64)> = history.iter().map(|r| (r.step as f64, r.accuracy)).collect();
    let smooth = |v: &[(f64, f64)]| -> Vec<(f64, f64)> {
        (0..v.len())
            .map(|i| {
                let lo = i.saturating_sub(19);
                let w = &v[lo..=i];
                (v[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
            })
            .collect()
    };
    let (ls, as_) = (smooth(&loss), smooth(&acc));
    let eval_loss: Vec<(f64, f64)> = evals.iter().map(|e| (e.step as f64, e.loss)).collect();
    let eval_acc: Vec<(f64, f64)> = evals.iter().map(|e| (e.step as f64, e.accuracy)).collect();
    let mut loss_series = vec![
        Series { label: "loss", color: [235, 170, 170], points: &loss },
        Series { label: "mean 20", color: [200, 30, 30], points: &ls },
    ];
    let mut acc_series = vec![
        Series { label: "accuracy", color: [170, 170, 235], points: &acc },
        Series { label: "mean 20", color: [30, 30, 200], points: &as_ },
    ];
    if !evals.is_empty() {
        loss_series.push(Series { label: "eval", color: [20, 140, 40], points: &eval_loss });
        acc_series.push(Series { label: "eval", color: [20, 140, 40], points: &eval_acc });
    }
    write_curves(path, &loss_series, &acc_series).map_err(|e| format!("{}: {e}", path.display()))
}

/// The evaluations up to `step` from `eval.csv`, which is rewritten without later rows (a resumed
/// run evaluates those steps again).
fn read_evals(path: &Path, step: u64) -> std::io::Result<Vec<EvalRecord>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let evals: Vec<EvalRecord> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let v: Vec<&str> = l.split(',').collect();
            let rec = EvalRecord {
                step: v.first()?.parse().ok()?,
                loss: v.get(1)?.parse().ok()?,
                accuracy: v.get(2)?.parse().ok()?,
            };
            (rec.step <= step).then_some(rec)
        })
        .collect();
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "step,loss,accuracy")?;
    for e in &evals {
        writeln!(f, "{},{:.6},{:.6}", e.step, e.loss, e.accuracy)?;
    }
    Ok(evals)
}

/// The metrics file, truncated to the rows up to `step` (a resumed run rewrites what follows).
fn open_metrics(path: &Path, step: u64) -> std::io::Result<std::fs::File> {
    let kept: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| l.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s <= step))
        .map(String::from)
        .collect();
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "step,epoch,loss,accuracy,lr,grad_norm,images_per_s")?;
    for l in kept {
        writeln!(f, "{l}")?;
    }
    Ok(f)
}

/// The rows of a run's `metrics.csv` in `dir` (none when it is missing; malformed rows skipped).
pub fn read_metrics(dir: &Path) -> Vec<StepRecord> {
    read_history(&dir.join("metrics.csv"), u64::MAX)
}

fn read_history(path: &Path, step: u64) -> Vec<StepRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let v: Vec<&str> = l.split(',').collect();
            let rec = StepRecord {
                step: v.first()?.parse().ok()?,
                epoch: v.get(1)?.parse().ok()?,
                loss: v.get(2)?.parse().ok()?,
                accuracy: v.get(3)?.parse().ok()?,
                lr: v.get(4)?.parse().ok()?,
                grad_norm: v.get(5)?.parse().ok()?,
                images_per_s: v.get(6)?.parse().ok()?,
            };
            (rec.step <= step).then_some(rec)
        })
        .collect()
}
