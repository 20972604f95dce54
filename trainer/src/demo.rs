//! The embedded pre-training demo: `mapet pretrain` with no data argument. Eleven real photographs
//! (CC0 / public domain, `data/demo/LICENSES.md`) are compiled into the binary, written to
//! `<out>/images/` on first use, tokenized with pixel k-means (cached in `<out>/`), and a small
//! model is pre-trained on them. On 2 CPU cores it takes a couple of minutes; the loss falls
//! clearly below its start, and `curves.png` shows it.

use std::path::{Path, PathBuf};

use mapet::ops::kmeans::KMeansConfig;

use crate::config::PretrainConfig;
use crate::data::{read_npy, ImageIndex, NpyDtype, Tokens};
use crate::pretrain::DataSource;
use crate::tokenize::{fit_and_assign, pixel_features};

macro_rules! demo_images {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../../data/demo/", $name)) as &[u8])),*]
    };
}

/// The photographs, by file name.
pub const IMAGES: &[(&str, &[u8])] = demo_images!(
    "astronaut.jpg",
    "brick.jpg",
    "camera.jpg",
    "chelsea.jpg",
    "clock_motion.jpg",
    "coffee.jpg",
    "grass.jpg",
    "gravel.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "rocket.jpg",
);

/// The demo's configuration: a small model on 64x64 images (8x8 patches: N = 65, C = 16), a
/// 64-word pixel codebook, batch 8, 240 steps; drop path off (a 4-block model needs none).
pub fn config(out: &Path) -> PretrainConfig {
    let mut c = PretrainConfig::default();
    c.model.preset = "vit-t".into();
    (c.model.image, c.model.patch, c.model.dim, c.model.depth) = (Some(64), Some(8), Some(96), Some(4));
    (c.model.heads, c.model.vocab, c.model.context) = (Some(2), Some(64), Some(16));
    c.train.batch = 8;
    c.train.epochs = 240.0;
    c.train.warmup_epochs = 10.0;
    c.train.peak_lr = Some(2e-3);
    c.train.drop_path = 0.0;
    c.train.device = "cpu".into();
    c.output.dir = out.to_path_buf();
    c.output.checkpoint_every = 0;
    c
}

/// Writes the images (if missing) and the token file (if missing or stale) under `out`, and
/// returns the data source. Tokens: pixel k-means with `vocab` centroids over every patch.
pub fn prepare(cfg: &PretrainConfig) -> Result<DataSource, String> {
    let model = cfg.model_config()?;
    let out = &cfg.output.dir;
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| format!("{}: {e}", images_dir.display()))?;
    for (name, bytes) in IMAGES {
        let path = images_dir.join(name);
        if std::fs::metadata(&path).map(|m| m.len() as usize != bytes.len()).unwrap_or(true) {
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let index = ImageIndex::from_folder(&images_dir).map_err(|e| e.to_string())?;
    let tokens_path: PathBuf =
        out.join(format!("tokens-pixels-{}px-p{}-k{}.npy", model.image, model.patch, model.vocab));
    let cached = read_npy(&tokens_path).ok().is_some_and(|a| a.shape == [index.len(), model.n_tokens() - 1]);
    if !cached {
        crate::say!(
            "tokenizing the {} demo images: pixel k-means with {} centroids over their {}x{} patches",
            index.len(),
            model.vocab,
            model.patch,
            model.patch
        );
        let dim = 3 * model.patch * model.patch;
        let feats = pixel_features(&index, model.image, model.patch)?;
        let mut km = KMeansConfig::new(model.vocab);
        km.seed = cfg.train.seed;
        let t = fit_and_assign(&feats, dim, &km)?;
        crate::say!(
            "codebook: {:.0}% of centroids used, perplexity {:.1}, mean squared distance {:.3}",
            100.0 * t.report.usage,
            t.report.perplexity,
            t.report.mean_sq_dist
        );
        crate::data::tokens::write_tokens(&tokens_path, NpyDtype::I16, model.n_tokens() - 1, &t.ids)
            .map_err(|e| e.to_string())?;
    }
    let tokens = Tokens::load_for(&tokens_path, &index, &model).map_err(|e| e.to_string())?;
    Ok(DataSource { index, tokens, eval: None })
}
