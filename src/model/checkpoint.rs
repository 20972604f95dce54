//! Training checkpoints: one folder holding
//!
//! - `model.safetensors`: the f32 parameters under the authors' state-dict names and shapes
//!   (loads into their model with `load_state_dict` as is);
//! - `optimizer.safetensors`: AdamW's moments, `exp_avg.<name>` and `exp_avg_sq.<name>` for every
//!   parameter `<name>`, same shapes;
//! - `meta.json`: format version, model config, recipe, step, epoch, the generator's exact
//!   position (ChaCha8 seed, stream, word position) and, when the trainer gives it, the data
//!   loader's position in the epoch ([`DataPosition`]), so that a resumed run repeats an
//!   uninterrupted one bit for bit. Checkpoints written without the loader's position (older
//!   ones) load with [`Checkpoint::data`] `None`.
//!
//! Saving never leaves the checkpoint half-written: everything goes into the sibling folder
//! `DIR.tmp` (each file synced, then the folder), the previous `DIR` is renamed to `DIR.old`,
//! `DIR.tmp` to `DIR`, and only then is `DIR.old` removed. A crash at any point leaves either
//! `DIR` or `DIR.old` complete; [`load`] falls back to `DIR.old` when `DIR` is missing. Saving
//! refuses to replace a `DIR` (or `DIR.old`) that is neither empty nor a checkpoint, so it never
//! deletes unrelated files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::SafeTensorsFile;
use crate::model::params::{ModelConfig, ParamLayout};
use crate::model::train::{Recipe, RngState, TrainState};

/// Version of the checkpoint layout written by [`save`].
pub const FORMAT_VERSION: u32 = 1;
/// The parameters' file.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer moments' file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The metadata file.
pub const META_FILE: &str = "meta.json";
/// Name prefix of the first moments in [`OPTIMIZER_FILE`].
pub const EXP_AVG: &str = "exp_avg.";
/// Name prefix of the second moments in [`OPTIMIZER_FILE`].
pub const EXP_AVG_SQ: &str = "exp_avg_sq.";

const FORMAT_NAME: &str = "mapet-checkpoint";

fn file_err(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::File { path: path.to_path_buf(), detail: detail.to_string() }
}

/// The generator's position; the seed in hex and the word position as a decimal string (a u128).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RngJson {
    algorithm: String,
    seed: String,
    stream: u64,
    word_pos: String,
}

/// Where the training data stood when a checkpoint was written, within the epoch
/// [`TrainState::epoch`]: what a resumed run needs to continue with the very next image, even
/// when unreadable images were skipped earlier in the epoch or in earlier ones (so that the
/// position is no multiple of the batch, and the epoch's steps no difference of step counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Optimizer steps trained in the epoch so far.
    pub epoch_steps: u64,
    /// The position in the epoch's image order of the next image to read (the images before it
    /// were consumed or skipped).
    pub next_image: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    format_version: u32,
    config: ModelConfig,
    recipe: Recipe,
    step: u64,
    epoch: u64,
    rng: RngJson,
    num_params: usize,
    /// Absent in checkpoints written before it existed, or without a loader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<DataPosition>,
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Parameters, moments, counters and generator, ready for [`crate::model::train::train_step`].
    pub state: TrainState,
    /// The recipe the checkpoint was trained with.
    pub recipe: Recipe,
    /// The folder it was read from (`DIR`, or `DIR.old` after a save interrupted between renames).
    pub dir: PathBuf,
    /// The data loader's position, when the checkpoint stores one ([`save_with_data`]).
    pub data: Option<DataPosition>,
}

/// `DIR.tmp` and `DIR.old` next to `dir`.
fn siblings(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let name =
        dir.file_name().ok_or_else(|| file_err(dir, "a checkpoint path must end in a folder name"))?.to_os_string();
    let with = |suffix: &str| {
        let mut n = name.clone();
        n.push(suffix);
        dir.with_file_name(n)
    };
    Ok((with(".tmp"), with(".old")))
}

/// Errors unless `path` is absent, an empty folder, or a folder holding a `meta.json`.
fn check_replaceable(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err(path, format!("cannot inspect: {e}"))),
    };
    if !md.is_dir() {
        return Err(file_err(path, "exists and is not a folder; refusing to replace it with a checkpoint"));
    }
    let empty = std::fs::read_dir(path).map_err(|e| file_err(path, format!("cannot list: {e}")))?.next().is_none();
    if empty || path.join(META_FILE).is_file() {
        Ok(())
    } else {
        Err(file_err(path, format!("is neither empty nor a checkpoint (no {META_FILE}); refusing to replace it")))
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| file_err(path, format!("cannot sync: {e}")))
}

fn remove_dir(path: &Path) -> Result<()> {
    std::fs::remove_dir_all(path).map_err(|e| file_err(path, format!("cannot remove: {e}")))
}

fn write_files(
    dir: &Path,
    layout: &ParamLayout,
    recipe: &Recipe,
    state: &TrainState,
    data: Option<DataPosition>,
) -> Result<()> {
    let pt = || HashMap::from([("format".to_string(), "pt".to_string())]);
    layout.save_safetensors(&state.params, &dir.join(MODEL_FILE), pt())?;

    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::with_capacity(2 * layout.specs.len());
    for (prefix, buf) in [(EXP_AVG, &state.m), (EXP_AVG_SQ, &state.v)] {
        for s in &layout.specs {
            tensors.push((format!("{prefix}{}", s.name), s.shape.clone(), &buf[s.range()]));
        }
    }
    let mut meta = pt();
    meta.insert("step".into(), state.step.to_string());
    crate::io::write_f32_safetensors(&dir.join(OPTIMIZER_FILE), &tensors, meta)?;

    let rng = RngState::of(&state.rng);
    let meta = Meta {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        config: layout.config,
        recipe: recipe.clone(),
        step: state.step,
        epoch: state.epoch,
        rng: RngJson {
            algorithm: "ChaCha8".into(),
            seed: rng.seed.iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.stream,
            word_pos: rng.word_pos.to_string(),
        },
        num_params: layout.num_params(),
        data,
    };
    let path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| file_err(&path, format!("cannot encode: {e}")))?;
    crate::io::write_atomically(&path, &json)
}

/// Saves `state` (trained with `recipe`, of `layout`'s config) as the checkpoint folder `dir`,
/// replacing a previous checkpoint there only once the new one is complete (see the module
/// notes). On error, whatever checkpoint `dir` held before is still there and loadable. The
/// checkpoint stores no data loader position; see [`save_with_data`].
pub fn save(dir: &Path, layout: &ParamLayout, recipe: &Recipe, state: &TrainState) -> Result<()> {
    save_with_data(dir, layout, recipe, state, None)
}

/// [`save`], storing also the data loader's position `data` (in the epoch `state.epoch`), which
/// [`load`] gives back in [`Checkpoint::data`].
pub fn save_with_data(
    dir: &Path,
    layout: &ParamLayout,
    recipe: &Recipe,
    state: &TrainState,
    data: Option<DataPosition>,
) -> Result<()> {
    state.check(layout)?;
    let (tmp, old) = siblings(dir)?;
    check_replaceable(dir)?;
    check_replaceable(&old)?;
    // A leftover DIR.tmp is an interrupted save: never a complete checkpoint anyone reads.
    if let Ok(md) = std::fs::symlink_metadata(&tmp) {
        if !md.is_dir() {
            return Err(file_err(&tmp, "exists and is not a folder; refusing to replace it"));
        }
        remove_dir(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, format!("cannot create: {e}")))?;
    if let Err(e) = write_files(&tmp, layout, recipe, state, data).and_then(|()| sync_dir(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let had_dir = dir.exists();
    if had_dir {
        if old.exists() {
            // DIR is complete, so a DIR.old beside it is a leftover of an earlier save.
            remove_dir(&old)?;
        }
        std::fs::rename(dir, &old)
            .map_err(|e| file_err(dir, format!("cannot move aside to {}: {e}", old.display())))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_dir {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(file_err(dir, format!("cannot move {} into place: {e}", tmp.display())));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    sync_dir(&parent)?;
    if old.exists() {
        // The new checkpoint is complete and in place; a failure here only leaves a stale copy,
        // which the next save removes.
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Reads every parameter of `layout` under `prefix + name` from `file`, checking names and shapes.
fn read_flat(file: &SafeTensorsFile, path: &Path, layout: &ParamLayout, prefix: &str) -> Result<Vec<f32>> {
    let mut flat = vec![0.0f32; layout.total];
    for s in &layout.specs {
        let name = format!("{prefix}{}", s.name);
        let (shape, values) = file.f32_tensor(&name)?;
        if shape != s.shape {
            return Err(file_err(
                path,
                format!("tensor `{name}` has shape {shape:?}, this config needs {:?}", s.shape),
            ));
        }
        flat[s.range()].copy_from_slice(&values);
    }
    Ok(flat)
}

fn read_meta(path: &Path) -> Result<Meta> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let meta: Meta =
        serde_json::from_slice(&bytes).map_err(|e| file_err(path, format!("not a valid checkpoint meta file: {e}")))?;
    if meta.format != FORMAT_NAME || meta.format_version != FORMAT_VERSION {
        return Err(file_err(
            path,
            format!(
                "format {:?} version {}, this build reads {FORMAT_NAME:?} version {FORMAT_VERSION}",
                meta.format, meta.format_version
            ),
        ));
    }
    Ok(meta)
}

fn parse_rng(path: &Path, r: &RngJson) -> Result<RngState> {
    let bad = |what: &str| file_err(path, format!("rng.{what} is malformed"));
    if r.algorithm != "ChaCha8" {
        return Err(file_err(path, format!("rng.algorithm is {:?}, expected \"ChaCha8\"", r.algorithm)));
    }
    if r.seed.len() != 64 || !r.seed.is_ascii() {
        return Err(bad("seed (64 hex digits)"));
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&r.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("seed (64 hex digits)"))?;
    }
    let word_pos = r.word_pos.parse::<u128>().map_err(|_| bad("word_pos"))?;
    Ok(RngState { seed, stream: r.stream, word_pos })
}

/// The model config stored in the `meta.json` of the checkpoint folder `dir` (or of `DIR.old`
/// when `dir` is missing, as [`load`] falls back), checked with [`ModelConfig::validate`]. Errors
/// name the folder (missing) or the meta file (unreadable, another format, an invalid config).
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let dir = checkpoint_folder(dir)?;
    let path = dir.join(META_FILE);
    let config = read_meta(&path)?.config;
    config.validate().map_err(|e| file_err(&path, format!("invalid model config: {e}")))?;
    Ok(config)
}

/// The checkpoint folder to read for `dir`: `dir`, or `DIR.old` when `dir` is missing (see the
/// module notes). A missing folder is an error, and so is a run's output folder given for its
/// checkpoint folder (one holding `checkpoint/meta.json`), which names the one meant.
fn checkpoint_folder(dir: &Path) -> Result<PathBuf> {
    let (_, old) = siblings(dir)?;
    let dir = if !dir.exists() && old.join(META_FILE).is_file() { old } else { dir.to_path_buf() };
    if !dir.is_dir() {
        return Err(file_err(&dir, "no checkpoint folder here"));
    }
    let inner = dir.join("checkpoint");
    if !dir.join(META_FILE).exists() && inner.join(META_FILE).is_file() {
        return Err(file_err(&dir, format!("a run's folder, not its checkpoint folder: give {}", inner.display())));
    }
    Ok(dir)
}

/// A checkpoint's parameters without its optimizer state ([`load_params`]): what evaluating or
/// exporting a model needs.
#[derive(Debug, Clone)]
pub struct Params {
    /// The flat parameters, in the layout of the config they were loaded for.
    pub params: Vec<f32>,
    /// Updates done when the checkpoint was written.
    pub step: u64,
    /// The folder they were read from (`DIR`, or `DIR.old`; see [`Checkpoint::dir`]).
    pub dir: PathBuf,
}

/// The parameters of the checkpoint folder `dir` for a model of `expected`, read from its
/// `meta.json` and `model.safetensors` only: a checkpoint shared without `optimizer.safetensors`
/// (twice the model's size) still evaluates and exports. The same checks and errors as [`load`].
pub fn load_params(dir: &Path, expected: &ModelConfig) -> Result<Params> {
    let (_, dir, meta, params) = load_meta_and_params(dir, expected)?;
    Ok(Params { params, step: meta.step, dir })
}

/// What [`load`] and [`load_params`] share: the folder (`dir` or `DIR.old`), its meta checked
/// against `expected`, and its parameters.
fn load_meta_and_params(dir: &Path, expected: &ModelConfig) -> Result<(ParamLayout, PathBuf, Meta, Vec<f32>)> {
    let layout = ParamLayout::new(*expected)?;
    let dir = checkpoint_folder(dir)?;
    let meta_path = dir.join(META_FILE);
    let meta = read_meta(&meta_path)?;
    for ((field, got), (_, want)) in meta.config.fields().into_iter().zip(expected.fields()) {
        if got != want {
            return Err(file_err(
                &meta_path,
                format!("checkpoint of another model: config field `{field}` is {got}, expected {want}"),
            ));
        }
    }
    let model_path = dir.join(MODEL_FILE);
    let params = read_flat(&SafeTensorsFile::open(&model_path)?, &model_path, &layout, "")?;
    Ok((layout, dir, meta, params))
}

/// Loads the checkpoint folder `dir` (or `DIR.old` when `dir` is missing, see the module notes)
/// for a model of `expected`. Errors name the file, and the tensor or field: a missing or
/// truncated file, a tensor missing or of the wrong shape, a checkpoint of another config (the
/// first differing field), an unknown format version.
pub fn load(dir: &Path, expected: &ModelConfig) -> Result<Checkpoint> {
    let (layout, dir, meta, params) = load_meta_and_params(dir, expected)?;
    let rng = parse_rng(&dir.join(META_FILE), &meta.rng)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt = SafeTensorsFile::open(&opt_path)?;
    let m = read_flat(&opt, &opt_path, &layout, EXP_AVG)?;
    let v = read_flat(&opt, &opt_path, &layout, EXP_AVG_SQ)?;

    let state = TrainState { params, m, v, step: meta.step, epoch: meta.epoch, rng: rng.restore() };
    Ok(Checkpoint { state, recipe: meta.recipe, dir, data: meta.data })
}
