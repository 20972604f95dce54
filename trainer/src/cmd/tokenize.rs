//! `mapet tokenize`: k-means visual tokens for an image set (SPEC.md, "Tokenizers").
//!
//! Features per patch: `pixels` (each patch's normalized pixels after the training crop and
//! resize, 3·p·p values; [`crate::tokenize::PixelFeatures`]) or an external f32/f64 `.npy`
//! `[num_images, N-1, F]` (an encoder's patch features, e.g. CLIP's for k-CLIP, one row per image
//! of the index, in index order; [`crate::tokenize::NpyFeatures`], whose header and length are
//! checked up front). Either is read `--chunk-images` images at a time by one streaming loop
//! ([`crate::tokenize::tokenize_stream`]), so that an ImageNet-sized set never holds all its
//! features: the fit's sample is gathered first (pixels chunk by chunk, a `.npy` by reading only
//! the sampled rows), then every chunk is labelled and its ids written to the token file. A
//! codebook of `--k` centroids is fitted on the sample ([`mapet::ops::kmeans::fit`]: sub-sampled
//! to `k · max-points-per-centroid` points, best of `--restarts` runs of at most `--iterations`
//! Lloyd iterations), unless `--centroids` gives one (the evaluation split is labelled with the
//! training split's codebook). Every patch gets the id of its nearest centroid.
//!
//! Outputs, for `--out DIR/NAME.npy`: the token ids `[num_images, N-1]` (int16 when k <= 32767,
//! else int32), row i = image i of the index; `DIR/NAME.centroids.safetensors` (`centroids`
//! `[k, F]`, f32) and `DIR/NAME.report.json` (centroid usage, perplexity of the id histogram, mean
//! squared distance, inertia of the fit per iteration), also printed. `--device auto` falling back
//! to the CPU says why on stdout, with the progress ([`crate::device`]).

use std::path::{Path, PathBuf};

use mapet::ops::kmeans::{KMeansConfig, KMeansInit, KMeansReport};

use super::{beside, json_f64, json_str, open_index, parse, Parsed};
use crate::data::tokens::TokenWriter;
use crate::data::NpyDtype;
use crate::tokenize::{
    load_centroids, save_centroids, tokenize_stream, Codebook, FeatureSource, KMeansDevice, Labelling, NpyFeatures,
    PixelFeatures,
};

/// The command's usage.
pub const USAGE: &str = "usage: mapet tokenize --data DIR|MANIFEST --out tokens.npy [--k 8192]
                      [--features pixels|FILE.npy] [--image 224] [--patch 16] [--iterations 20]
                      [--restarts 5] [--max-points-per-centroid 512] [--seed 0] [--centroids FILE]
                      [--device auto|cpu|cuda] [--chunk-images 2048]
  k-means visual tokens: one id per patch of every image. Row i of the output is image i of the
  index (a folder's sorted walk, or the manifest's order), the row order training reads.
  --data DIR|FILE      an image folder or a manifest of paths relative to its folder
  --out NAME.npy       token ids [images, (image/patch)^2], int16 when k <= 32767, else int32; also
                       writes NAME.centroids.safetensors and NAME.report.json beside it
  --features pixels    each patch's normalized pixels (default), or FILE.npy: f32/f64 features
                       [images, (image/patch)^2, F] in index order (e.g. CLIP's, for k-CLIP)
  --k K                codebook size (default 8192)
  --image S --patch P  the model's image side and patch side (default 224 and 16)
  --iterations --restarts --max-points-per-centroid --seed   the k-means fit (20, 5, 512, 0)
  --centroids FILE     label with this codebook (a .centroids.safetensors of an earlier run)
                       instead of fitting one: for the evaluation split
  --device D           auto (default: the GPU when one is usable), cpu (f32, exact) or cuda (bf16
                       points, f32 distances: ids differ from the CPU's only at near-ties)
  --chunk-images N     features are computed (pixels) or read (FILE.npy) N images at a time
                       (default 2048): the fit's sample is gathered first, then every chunk labelled
                       and its ids written, so memory holds the sample and one chunk
                       (N x patches x F x 4 bytes; lower N for wide external features).";

/// The token dtype for a codebook of `k` ids: int16 when every id fits, int32 otherwise.
pub fn token_dtype(k: usize) -> NpyDtype {
    if k <= i16::MAX as usize {
        NpyDtype::I16
    } else {
        NpyDtype::I32
    }
}

/// What a tokenization produced.
struct TokenizeSummary {
    /// The token file.
    tokens: PathBuf,
    /// The centroids beside it.
    centroids: PathBuf,
    /// The report beside it.
    report_path: PathBuf,
    /// Images (rows).
    images: usize,
    /// Patches per image (columns).
    patches: usize,
    /// Codebook size.
    k: usize,
    /// Feature dimension.
    dim: usize,
    /// Usage, perplexity, mean squared distance of the labelling.
    report: KMeansReport,
    /// The fit's inertia per iteration (empty with `--centroids`).
    inertia: Vec<f64>,
    /// Where k-means ran.
    device: String,
}

/// Runs `mapet tokenize` (see [`USAGE`]).
pub fn run(args: &[String]) -> Result<(), String> {
    let valued = [
        "data",
        "out",
        "k",
        "features",
        "image",
        "patch",
        "iterations",
        "restarts",
        "max-points-per-centroid",
        "seed",
        "centroids",
        "device",
        "chunk-images",
    ];
    let a = match parse("tokenize", args, &valued, &[])? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Args(a) => a,
    };
    let data = PathBuf::from(a.required("tokenize", "data", "DIR|MANIFEST")?);
    let out = PathBuf::from(a.required("tokenize", "out", "tokens.npy")?);
    let features = a.get("features").unwrap_or("pixels").to_string();
    let image = a.positive("image", 224)?;
    let patch = a.positive("patch", 16)?;
    if !image.is_multiple_of(patch) {
        return Err(format!("--image {image} is not a multiple of --patch {patch}"));
    }
    let k_flag = a.get("k").map(|_| a.positive("k", 0)).transpose()?;
    let km = KMeansConfig {
        k: k_flag.unwrap_or(8192),
        iterations: a.positive("iterations", 20)?,
        restarts: a.positive("restarts", 5)?,
        max_points_per_centroid: a.positive("max-points-per-centroid", 512)?,
        init: KMeansInit::Random,
        seed: a.number("seed", 0u64)?,
    };
    let centroids = a.get("centroids").map(PathBuf::from);
    let (device, note) = KMeansDevice::select(a.get("device").unwrap_or("auto"))?;
    if let Some(note) = note {
        println!("{note}");
    }
    let chunk_images = a.positive("chunk-images", 2048)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("--out {}: cannot create {}: {e}", out.display(), parent.display()))?;
    }
    // The token file and the two written beside it must not be the features or the codebook read.
    let mut inputs: Vec<(&str, &Path)> = Vec::new();
    if features != "pixels" {
        inputs.push(("--features", Path::new(&features)));
    }
    if let Some(c) = &centroids {
        inputs.push(("--centroids", c));
    }
    for written in [out.clone(), beside(&out, ".centroids.safetensors"), beside(&out, ".report.json")] {
        let flag = if written == out { "--out" } else { "the file written beside --out," };
        super::refuse_overwriting_inputs(flag, &written, &inputs)?;
    }

    let given = match &centroids {
        Some(path) => Some(load_centroids(path).map_err(|e| format!("--centroids: {e}"))?),
        None => None,
    };
    let index = open_index(&data)?;
    let patches = (image / patch).pow(2);
    let rows = index.len() * patches;
    if given.is_none() && km.k > rows {
        return Err(format!("--k {} is more than the {rows} patches of the {} images to cluster", km.k, index.len()));
    }
    let mut source: Box<dyn FeatureSource + '_> = if features == "pixels" {
        println!(
            "pixel features of {} images ({image}px, {patch}x{patch} patches), {chunk_images} images at a time",
            index.len()
        );
        Box::new(PixelFeatures::new(&index, image, patch))
    } else {
        let f = NpyFeatures::open(Path::new(&features), index.len(), image, patch)
            .map_err(|e| format!("--features {e}"))?;
        println!(
            "features {features} ({}, {} images x {patches} patches x {}), {chunk_images} images at a time",
            f.dtype_name(),
            index.len(),
            f.dim()
        );
        Box::new(f)
    };
    let dim = source.dim();
    // The codebook: the given one (checked against the features), or a fit of `km`.
    let codebook = match (given, &centroids) {
        (Some((c, k, cdim)), Some(path)) => {
            if cdim != dim {
                return Err(format!(
                    "--centroids {}: centroids of dimension {cdim}, the features have {dim} per patch",
                    path.display()
                ));
            }
            if let Some(kf) = k_flag.filter(|&kf| kf != k) {
                return Err(format!("--k {kf} differs from the {k} centroids of --centroids {}", path.display()));
            }
            Codebook::Given { centroids: c, k }
        }
        _ => {
            println!(
                "k-means on {}: {} centroids over {rows} patches of dimension {dim} (fit on at most {}; {} restarts, \
                 {} iterations)",
                device.describe(),
                km.k,
                km.sample_size(rows),
                km.restarts,
                km.iterations
            );
            Codebook::Fit(&km)
        }
    };
    let k = match &codebook {
        Codebook::Given { k, .. } => *k,
        Codebook::Fit(cfg) => cfg.k,
    };
    // The ids go to the token file chunk by chunk; it appears at `out` once complete.
    let mut writer =
        TokenWriter::create(&out, token_dtype(k), index.len(), patches).map_err(|e| format!("--out: {e}"))?;
    let Labelling { centroids: codebook, report, inertia } =
        tokenize_stream(&mut *source, codebook, &device, chunk_images, |ids| {
            writer.push(ids).map_err(|e| format!("--out: {e}"))
        })?;
    writer.finish().map_err(|e| format!("--out: {e}"))?;

    let centroids_path = beside(&out, ".centroids.safetensors");
    save_centroids(&centroids_path, &codebook, k, dim)?;
    let summary = TokenizeSummary {
        tokens: out.clone(),
        centroids: centroids_path,
        report_path: beside(&out, ".report.json"),
        images: index.len(),
        patches,
        k,
        dim,
        report,
        inertia,
        device: device.describe(),
    };
    let json = report_json(&summary, &features, centroids.as_deref());
    mapet::io::write_atomically(&summary.report_path, json.as_bytes()).map_err(|e| e.to_string())?;
    println!(
        "{} images x {} patches -> {} ({}); {:.1}% of the {} centroids used, perplexity {:.1}, mean squared \
         distance {:.4}",
        summary.images,
        summary.patches,
        out.display(),
        token_dtype(k).name(),
        100.0 * report.usage,
        k,
        report.perplexity,
        report.mean_sq_dist
    );
    if !summary.inertia.is_empty() {
        let list: Vec<String> = summary.inertia.iter().map(|x| format!("{x:.4e}")).collect();
        println!("inertia per iteration: {}", list.join(" "));
    }
    println!("centroids: {}; report: {}", summary.centroids.display(), summary.report_path.display());
    Ok(())
}

fn report_json(s: &TokenizeSummary, features: &str, centroids_from: Option<&Path>) -> String {
    let inertia: Vec<String> = s.inertia.iter().map(|&x| json_f64(x)).collect();
    let from = centroids_from.map_or("null".to_string(), |p| json_str(&p.display().to_string()));
    format!(
        "{{\n  \"tokens\": {},\n  \"centroids\": {},\n  \"features\": {},\n  \"centroids_from\": {from},\n  \
         \"images\": {},\n  \"patches_per_image\": {},\n  \"k\": {},\n  \"dim\": {},\n  \"device\": {},\n  \"usage\": {},\n  \
         \"perplexity\": {},\n  \"mean_sq_dist\": {},\n  \"inertia_per_iteration\": [{}]\n}}\n",
        json_str(&s.tokens.display().to_string()),
        json_str(&s.centroids.display().to_string()),
        json_str(features),
        s.images,
        s.patches,
        s.k,
        s.dim,
        json_str(&s.device),
        json_f64(s.report.usage),
        json_f64(s.report.perplexity),
        json_f64(s.report.mean_sq_dist),
        inertia.join(", ")
    )
}
