//! `mapet pretrain`'s configuration: a TOML file whose every key has a default (the paper's
//! recipe, SPEC.md), overridden by command-line flags. Unknown keys and out-of-range values are
//! errors that name the key.
//!
//! ```toml
//! [model]            # a preset, or every size given explicitly (explicit keys override the preset)
//! preset = "vit-b"   # vit-t | vit-s | vit-b
//! context = 50
//!
//! [train]
//! batch = 2048           # images per optimizer step (summed over micro-batches)
//! micro_batches = 1      # gradient accumulation
//! epochs = 300
//! warmup_epochs = 10
//! base_lr = 1.5e-3       # peak lr at batch 2048, scaled linearly with batch ...
//! # peak_lr = 1e-3       # ... unless given directly
//! final_lr = 1e-5
//! warmup_start_lr = 1e-6
//! weight_decay = 0.05
//! clip = 3.0
//! drop_path = 0.1
//! layer_scale = 0.1
//! seed = 0
//! device = "auto"        # auto | cpu | cuda
//!
//! [data]
//! train = "/data/imagenet/train"
//! tokens = "/data/imagenet/train_tokens.npy"
//! eval_fraction = 0.0
//! jitter = true
//! threads = 0            # 0: all cores
//! max_skipped_fraction = 0.01   # unreadable images tolerated per epoch (skipped, counted)
//!
//! [output]
//! dir = "runs/mapet"
//! checkpoint_every = 1000   # steps; 0: only at the end (and on Ctrl-C)
//! ```
//!
//! Flags: `--set section.key=value` overrides any key; `--data`, `--tokens`, `--out`, `--device`,
//! `--batch`, `--epochs`, `--seed` and `--resume` are shortcuts. A value out of range is blamed on
//! the flag that gave it, else on the config file ([`PretrainConfig::blame`]).

use std::path::{Path, PathBuf};

use mapet::model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::device::{Device, Setting};

/// The longest run `train.epochs` may ask for (a bound that catches `inf` and typos).
pub const MAX_EPOCHS: f64 = 1e6;

/// Every setting of a pre-training run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub model: ModelSection,
    pub train: TrainSection,
    pub data: DataSection,
    pub output: OutputSection,
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub preset: String,
    pub image: Option<usize>,
    pub patch: Option<usize>,
    pub dim: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    pub vocab: Option<usize>,
    pub context: Option<usize>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "vit-b".into(),
            image: None,
            patch: None,
            dim: None,
            depth: None,
            heads: None,
            vocab: None,
            context: None,
        }
    }
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub batch: usize,
    pub micro_batches: usize,
    pub epochs: f64,
    pub warmup_epochs: f64,
    pub base_lr: f32,
    pub peak_lr: Option<f32>,
    pub final_lr: f32,
    pub warmup_start_lr: f32,
    pub weight_decay: f32,
    pub clip: f32,
    pub drop_path: f32,
    pub layer_scale: f32,
    pub seed: u64,
    pub device: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch: 2048,
            micro_batches: 1,
            epochs: 300.0,
            warmup_epochs: 10.0,
            base_lr: 1.5e-3,
            peak_lr: None,
            final_lr: 1e-5,
            warmup_start_lr: 1e-6,
            weight_decay: 0.05,
            clip: 3.0,
            drop_path: 0.1,
            layer_scale: 0.1,
            seed: 0,
            device: "auto".into(),
        }
    }
}

/// `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Image folder (ImageFolder layout) or manifest file; empty: the embedded demo.
    pub train: Option<PathBuf>,
    /// Token file [num_images, N-1] (.npy).
    pub tokens: Option<PathBuf>,
    /// A separate evaluation folder and its token file.
    pub eval: Option<PathBuf>,
    pub eval_tokens: Option<PathBuf>,
    /// Or a held-out fraction of the training images.
    pub eval_fraction: f64,
    pub jitter: bool,
    pub threads: usize,
    pub prefetch: usize,
    /// Largest fraction of unreadable images tolerated per epoch.
    pub max_skipped_fraction: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: None,
            tokens: None,
            eval: None,
            eval_tokens: None,
            eval_fraction: 0.0,
            jitter: true,
            threads: 0,
            prefetch: 4,
            max_skipped_fraction: 0.01,
        }
    }
}

/// `[output]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    pub dir: PathBuf,
    pub checkpoint_every: u64,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection { dir: PathBuf::from("runs/mapet"), checkpoint_every: 1000 }
    }
}

impl PretrainConfig {
    /// Reads a TOML file; unknown keys are errors naming the key and the file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether the config file at `path` gives `section.key` itself (rather than leaving it to its
    /// default); false for a file that cannot be read or parsed ([`Self::from_file`] says why).
    pub fn file_sets(path: &Path, section: &str, key: &str) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else { return false };
        let Ok(value) = toml::from_str::<toml::Table>(&text) else { return false };
        value.get(section).and_then(|s| s.as_table()).is_some_and(|t| t.contains_key(key))
    }

    /// Applies `section.key=value` (the value in TOML syntax; bare strings are accepted). Errors
    /// quote the assignment.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (key, value) =
            assignment.split_once('=').ok_or_else(|| format!("`--set {assignment}`: expected section.key=value"))?;
        self.set_key(key.trim(), value.trim()).map_err(|e| format!("`--set {assignment}`: {e}"))
    }

    /// Sets `section.key` to `value` (TOML syntax; a bare string is accepted). An unknown
    /// section or key, or a value of the wrong type, is an error naming it.
    pub fn set_key(&mut self, key: &str, value: &str) -> Result<(), String> {
        let (section, field) = key.split_once('.').ok_or_else(|| format!("`{key}`: expected section.key"))?;
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .map(|mut t| t.remove("v").expect("present"))
            .unwrap_or_else(|_| toml::Value::String(value.to_string()));
        let mut doc = toml::Table::try_from(&*self).map_err(|e| e.to_string())?;
        let sec = doc
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .ok_or_else(|| format!("no section `[{section}]` (model, train, data, output)"))?;
        sec.insert(field.to_string(), parsed);
        *self = doc.try_into().map_err(|e: toml::de::Error| format!("{key}: {}", e.message()))?;
        Ok(())
    }

    /// The model's sizes: the preset, then any explicit key.
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        let m = &self.model;
        let mut c = ModelConfig::preset(&m.preset)
            .ok_or_else(|| format!("model.preset = {:?}: expected vit-t, vit-s or vit-b", m.preset))?;
        c.image = m.image.unwrap_or(c.image);
        c.patch = m.patch.unwrap_or(c.patch);
        c.dim = m.dim.unwrap_or(c.dim);
        c.depth = m.depth.unwrap_or(c.depth);
        c.heads = m.heads.unwrap_or(c.heads);
        c.vocab = m.vocab.unwrap_or(c.vocab);
        c.context = m.context.unwrap_or(c.context);
        c.validate().map_err(|e| {
            // A preset's (or the demo's) context outlives a smaller patch grid: say which key to set.
            let hint = if e.to_string().contains("context") {
                " (set model.context below N: `--set model.context=C`, or in [model])"
            } else {
                ""
            };
            format!("[model]: {e}{hint}")
        })?;
        Ok(c)
    }

    /// Checks every value's range; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.model_config()?;
        let t = &self.train;
        let bad = |key: &str, why: String| Err(format!("train.{key}: {why}"));
        if t.batch == 0 {
            return bad("batch", "must be at least 1".into());
        }
        if t.micro_batches == 0 || !t.batch.is_multiple_of(t.micro_batches) {
            return bad(
                "micro_batches",
                format!("{} must be >= 1 and divide train.batch ({})", t.micro_batches, t.batch),
            );
        }
        if !(t.epochs > 0.0 && t.epochs <= MAX_EPOCHS) {
            return bad("epochs", format!("{} must be positive and at most {MAX_EPOCHS}", t.epochs));
        }
        if !(t.warmup_epochs >= 0.0 && t.warmup_epochs <= t.epochs) {
            return bad(
                "warmup_epochs",
                format!(
                    "{} must be in [0, train.epochs] (train.epochs is {}; the recipe warms up for 10 of 300 epochs, \
                     so a shorter run needs a shorter warmup, e.g. --set train.warmup_epochs={})",
                    t.warmup_epochs,
                    t.epochs,
                    (t.epochs / 30.0 * 1e4).floor() / 1e4
                ),
            );
        }
        for (key, v) in [("base_lr", t.base_lr), ("final_lr", t.final_lr), ("warmup_start_lr", t.warmup_start_lr)] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, format!("{v} must be a finite value >= 0"));
            }
        }
        if let Some(p) = t.peak_lr {
            if !(p > 0.0 && p.is_finite()) {
                return bad("peak_lr", format!("{p} must be positive"));
            }
        }
        if !(0.0..1.0).contains(&t.weight_decay) {
            return bad("weight_decay", format!("{} must be in [0, 1)", t.weight_decay));
        }
        if !(t.clip.is_finite() && t.clip >= 0.0) {
            return bad("clip", format!("{} must be finite and >= 0 (0 turns clipping off)", t.clip));
        }
        if !(0.0..1.0).contains(&t.drop_path) {
            return bad("drop_path", format!("{} must be in [0, 1)", t.drop_path));
        }
        if t.layer_scale.is_nan() || t.layer_scale <= 0.0 {
            return bad("layer_scale", format!("{} must be positive", t.layer_scale));
        }
        Device::parse(&t.device, Setting::Key("train.device"))?;
        if self.output.dir.as_os_str().is_empty() {
            return Err("output.dir: empty: name the run's folder (--out DIR)".into());
        }
        let d = &self.data;
        if !(0.0..1.0).contains(&d.eval_fraction) {
            return Err(format!("data.eval_fraction: {} must be in [0, 1)", d.eval_fraction));
        }
        if !(0.0..=1.0).contains(&d.max_skipped_fraction) {
            return Err(format!("data.max_skipped_fraction: {} must be in [0, 1]", d.max_skipped_fraction));
        }
        if d.train.is_some() != d.tokens.is_some() {
            return Err("data.train and data.tokens go together: give both".into());
        }
        Ok(())
    }

    /// [`Self::validate`]'s error, prefixed with where the value at fault came from: the last of
    /// `sources` (config key, the flag that set it) whose key the error is about (its first
    /// word), else the last whose key the error mentions (a value out of range of another key's,
    /// as `--epochs 1` under the default warmup of 10 epochs), else `file` (the config file) when
    /// there is one.
    pub fn blame(error: &str, sources: &[(String, String)], file: Option<&Path>) -> String {
        let names = |key: &str| {
            error.starts_with(&format!("{key}:"))
                || error.starts_with(&format!("{key} "))
                || (key.starts_with("model.") && error.starts_with("[model]"))
        };
        // `key` as a whole word of the error (train.epochs is not in train.warmup_epochs).
        let mentions = |key: &str| {
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
            error
                .match_indices(key)
                .any(|(i, _)| !word(error[..i].chars().next_back()) && !word(error[i + key.len()..].chars().next()))
        };
        let about = sources.iter().rev().find(|(key, _)| names(key));
        match (about.or_else(|| sources.iter().rev().find(|(key, _)| mentions(key))), file) {
            (Some((_, flag)), _) => format!("{flag}: {error}"),
            (None, Some(file)) => format!("{}: {error}", file.display()),
            (None, None) => error.to_string(),
        }
    }

    /// What in a valid config is most likely a mistake, one line each: a peak learning rate
    /// below the final or warm-up start rate (the schedule then rises where it should decay, as
    /// base_lr's linear scaling gives at small batches).
    pub fn warnings(&self) -> Vec<String> {
        let t = &self.train;
        let peak = self.peak_lr();
        let source = match t.peak_lr {
            Some(_) => "train.peak_lr".to_string(),
            None => format!("train.base_lr {} x batch {} / 2048", t.base_lr, t.batch),
        };
        let mut out = Vec::new();
        for (key, rate) in [("train.final_lr", t.final_lr), ("train.warmup_start_lr", t.warmup_start_lr)] {
            if rate > peak {
                out.push(format!(
                    "the peak learning rate {peak:.3e} ({source}) is below {key} {rate:.3e}: the schedule rises \
                     where it should decay; set train.peak_lr, or lower {key}"
                ));
            }
        }
        out
    }

    /// Peak learning rate: given, or base_lr scaled linearly from batch 2048.
    pub fn peak_lr(&self) -> f32 {
        self.train.peak_lr.unwrap_or(self.train.base_lr * self.train.batch as f32 / 2048.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_paper_recipe() {
        let c = PretrainConfig::default();
        c.validate().unwrap();
        assert_eq!(c.model_config().unwrap(), ModelConfig::VIT_B);
        assert_eq!((c.train.batch, c.train.epochs, c.train.warmup_epochs), (2048, 300.0, 10.0));
        assert!((c.peak_lr() - 1.5e-3).abs() < 1e-9);
    }

    #[test]
    fn toml_and_set_override_and_unknown_keys_are_named() {
        let mut c: PretrainConfig =
            toml::from_str("[model]\npreset = \"vit-t\"\ncontext = 30\n[train]\nbatch = 256\n").unwrap();
        assert_eq!(c.model_config().unwrap().context, 30);
        assert!((c.peak_lr() - 1.5e-3 / 8.0).abs() < 1e-9);
        c.set("train.drop_path=0.2").unwrap();
        c.set("output.dir=runs/x").unwrap();
        assert_eq!(c.train.drop_path, 0.2);
        assert_eq!(c.output.dir, PathBuf::from("runs/x"));
        let err = toml::from_str::<PretrainConfig>("[train]\nbatchsize = 3\n").unwrap_err().to_string();
        assert!(err.contains("batchsize"), "{err}");
        let err = c.set("train.lr=1").unwrap_err();
        assert!(err.contains("lr"), "{err}");
        let err = c.set("nosuch.x=1").unwrap_err();
        assert!(err.contains("nosuch"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (set, key) in [
            ("train.drop_path=1.5", "drop_path"),
            ("train.micro_batches=3", "micro_batches"),
            ("train.device=\"tpu\"", "device"),
            ("train.epochs=0", "epochs"),
            ("model.context=500", "context"),
            ("data.eval_fraction=1.0", "eval_fraction"),
        ] {
            let mut c = PretrainConfig::default();
            c.set(set).unwrap();
            let err = c.validate().unwrap_err();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn unbounded_epochs_are_refused_and_a_rising_schedule_is_warned_of() {
        for epochs in [f64::INFINITY, 1e30, f64::NAN, -1.0, 0.0] {
            let mut c = PretrainConfig::default();
            c.train.epochs = epochs;
            let err = c.validate().unwrap_err();
            assert!(err.starts_with("train.epochs: ") && err.contains("at most 1000000"), "{epochs}: {err}");
        }
        let mut c = PretrainConfig::default();
        assert!(c.warnings().is_empty());
        c.train.batch = 4; // 1.5e-3 x 4 / 2048 = 2.93e-6, below the final 1e-5
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("the peak learning rate 2.930e-6 (train.base_lr 0.0015 x batch 4 / 2048) is below train.final_lr 1.000e-5"), "{w:?}");
        c.train.peak_lr = Some(1e-3);
        assert!(c.warnings().is_empty());
        c.train.warmup_start_lr = 2e-3;
        assert!(c.warnings()[0].contains("train.peak_lr) is below train.warmup_start_lr"), "{:?}", c.warnings());
    }

    #[test]
    fn blame_names_the_flag_behind_the_value_at_fault() {
        let src =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, f)| (k.to_string(), f.to_string())).collect::<Vec<_>>();
        let file = Path::new("recipe.toml");
        // A run shorter than the default warmup: the error is about the warmup, which no flag
        // set, and mentions train.epochs, which --epochs set.
        let mut c = PretrainConfig::default();
        c.train.epochs = 1.0;
        let err = c.validate().unwrap_err();
        assert!(err.starts_with("train.warmup_epochs: 10 must be in [0, train.epochs] (train.epochs is 1;"), "{err}");
        let sources = src(&[("train.batch", "--batch 8"), ("train.epochs", "--epochs 1")]);
        assert_eq!(PretrainConfig::blame(&err, &sources, Some(file)), format!("--epochs 1: {err}"));
        // The hint's value passes.
        assert!(err.ends_with("e.g. --set train.warmup_epochs=0.0333)"), "{err}");
        c.train.warmup_epochs = 0.0333;
        c.validate().unwrap();
        // A flag that set the key the error is about comes first, wherever it stands.
        let sources = src(&[("train.warmup_epochs", "--set train.warmup_epochs=10"), ("train.epochs", "--epochs 1")]);
        assert!(PretrainConfig::blame(&err, &sources, None).starts_with("--set train.warmup_epochs=10: "));
        // A key only as part of another word is not mentioned (train.epochs in
        // train.epochs_x, train.warmup_epochs): the file is blamed, else nothing.
        let sources = src(&[("train.epochs", "--epochs 1")]);
        let other = "train.warmup_epochs: bad (train.epochs_x is 3)";
        assert_eq!(PretrainConfig::blame(other, &sources, Some(file)), format!("recipe.toml: {other}"));
        assert_eq!(PretrainConfig::blame(other, &sources, None), other);
        // micro_batches that do not divide the batch: --batch is blamed when it set the batch.
        let mut c = PretrainConfig::default();
        (c.train.batch, c.train.micro_batches) = (6, 4);
        let err = c.validate().unwrap_err();
        assert_eq!(
            PretrainConfig::blame(&err, &src(&[("train.batch", "--batch 6")]), None),
            format!("--batch 6: {err}")
        );
    }
}
