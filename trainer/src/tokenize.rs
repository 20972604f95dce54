//! Visual tokens from k-means (SPEC.md, "Tokenizers"): per-patch features, a codebook fitted on a
//! sample of them, and every patch of every image labelled with its nearest centroid. The
//! built-in feature is `pixels`: each patch's normalized pixels (the training crop and resize,
//! without jitter), 3·p·p values in channel-major order. Features of an external encoder (CLIP for
//! k-CLIP) come from a .npy file [num_images, N-1, F].

use std::path::Path;

use mapet::ops::kmeans::{self, KMeansConfig, KMeansReport};
use mapet::ops::patch_embed::Normalize;

use crate::data::{preprocess, ImageIndex};

/// Per-patch normalized pixels of every image, [num_images, (S/p)^2, 3·p·p], in index order.
/// Unreadable images are errors naming the file (a tokenizer must label every row).
pub fn pixel_features(index: &ImageIndex, image: usize, patch: usize) -> Result<Vec<f32>, String> {
    let g = image / patch;
    let f = 3 * patch * patch;
    let norm = Normalize::IMAGENET;
    let per_image: Vec<Result<Vec<f32>, String>> = std::thread::scope(|s| {
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(index.len().max(1));
        let chunks: Vec<Vec<usize>> = (0..workers).map(|w| (w..index.len()).step_by(workers).collect()).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|positions| {
                s.spawn(move || {
                    positions
                        .into_iter()
                        .map(|pos| {
                            let path = index.full_path(pos);
                            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                            let px = preprocess(&bytes, image as u32, None)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            let mut out = vec![0.0f32; g * g * f];
                            for (t, feat) in out.chunks_exact_mut(f).enumerate() {
                                let (py, pxx) = (t / g, t % g);
                                for c in 0..3 {
                                    for y in 0..patch {
                                        for x in 0..patch {
                                            let u = px[((py * patch + y) * image + pxx * patch + x) * 3 + c];
                                            feat[(c * patch + y) * patch + x] = norm.apply(u, c);
                                        }
                                    }
                                }
                            }
                            Ok((pos, out))
                        })
                        .collect::<Vec<Result<(usize, Vec<f32>), String>>>()
                })
            })
            .collect();
        let mut all: Vec<Option<Result<Vec<f32>, String>>> = (0..index.len()).map(|_| None).collect();
        for h in handles {
            for r in h.join().expect("feature worker panicked") {
                match r {
                    Ok((pos, v)) => all[pos] = Some(Ok(v)),
                    Err(e) => return vec![Err(e)],
                }
            }
        }
        all.into_iter().map(|o| o.expect("every position computed")).collect()
    });
    let mut feats = Vec::with_capacity(index.len() * g * g * f);
    for r in per_image {
        feats.extend(r?);
    }
    Ok(feats)
}

/// A fitted codebook and the labels of every patch.
pub struct Tokenized {
    pub centroids: Vec<f32>,
    pub ids: Vec<i32>,
    pub report: KMeansReport,
    pub inertia: Vec<f64>,
}

/// Fits k-means on `features` [rows, dim] (the paper's sampling rule) and labels every row.
pub fn fit_and_assign(features: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<Tokenized, String> {
    let fit = kmeans::fit(features, dim, cfg).map_err(|e| e.to_string())?;
    let (ids, d2) = kmeans::assign(features, dim, &fit.centroids).map_err(|e| e.to_string())?;
    let report = kmeans::report(&ids, cfg.k, &d2).map_err(|e| e.to_string())?;
    let inertia = fit.inertia_per_iteration.clone();
    Ok(Tokenized { centroids: fit.centroids, ids: ids.into_iter().map(|i| i as i32).collect(), report, inertia })
}

/// Writes the centroids as safetensors (`centroids` [k, dim]).
pub fn save_centroids(path: &Path, centroids: &[f32], k: usize, dim: usize) -> Result<(), String> {
    mapet::io::write_f32_safetensors(path, &[("centroids".to_string(), vec![k, dim], centroids)], Default::default())
        .map_err(|e| e.to_string())
}

/// Reads centroids written by [`save_centroids`]; returns (centroids, k, dim).
pub fn load_centroids(path: &Path) -> Result<(Vec<f32>, usize, usize), String> {
    let f = mapet::io::SafeTensorsFile::open(path).map_err(|e| e.to_string())?;
    let (shape, v) = f.f32_tensor("centroids").map_err(|e| e.to_string())?;
    match shape.as_slice() {
        [k, d] => Ok((v, *k, *d)),
        _ => Err(format!("{}: `centroids` has shape {shape:?}, expected [k, dim]", path.display())),
    }
}
