//! Visual tokens from k-means (SPEC.md, "Tokenizers"): per-patch features, a codebook fitted on a
//! sample of them, and every patch of every image labelled with its nearest centroid. The
//! built-in feature is `pixels`: each patch's normalized pixels (the training crop and resize,
//! without jitter), 3·p·p values in channel-major order. Features of an external encoder (CLIP for
//! k-CLIP) come from a .npy file [num_images, N-1, F].

use std::path::Path;

use std::sync::Arc;

use mapet::cuda::gemm::Gemm;
use mapet::cuda::Gpu;
use mapet::ops::kmeans::{self, KMeansConfig, KMeansReport};
use mapet::ops::patch_embed::Normalize;

use crate::data::{preprocess, ImageIndex};
use crate::device::{self, Device, Setting};

/// Per-patch normalized pixels of every image, [num_images, (S/p)^2, 3·p·p], in index order.
/// Unreadable images are errors naming the file (a tokenizer must label every row).
pub fn pixel_features(index: &ImageIndex, image: usize, patch: usize) -> Result<Vec<f32>, String> {
    pixel_features_of(index, 0..index.len(), image, patch)
}

/// [`pixel_features`] of the images at index positions `positions`, in that order, decoded on
/// the machine's cores.
pub fn pixel_features_of(
    index: &ImageIndex,
    positions: std::ops::Range<usize>,
    image: usize,
    patch: usize,
) -> Result<Vec<f32>, String> {
    let g = image / patch;
    let f = 3 * patch * patch;
    let norm = Normalize::IMAGENET;
    let count = positions.len();
    let first = positions.start;
    let per_image: Vec<Result<Vec<f32>, String>> = std::thread::scope(|s| {
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(count.max(1));
        let chunks: Vec<Vec<usize>> = (0..workers).map(|w| (w..count).step_by(workers).collect()).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|slots| {
                s.spawn(move || {
                    slots
                        .into_iter()
                        .map(|slot| {
                            let path = index.full_path(first + slot);
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
                            Ok((slot, out))
                        })
                        .collect::<Vec<Result<(usize, Vec<f32>), String>>>()
                })
            })
            .collect();
        let mut all: Vec<Option<Result<Vec<f32>, String>>> = (0..count).map(|_| None).collect();
        for h in handles {
            for r in h.join().expect("feature worker panicked") {
                match r {
                    Ok((slot, v)) => all[slot] = Some(Ok(v)),
                    Err(e) => return vec![Err(e)],
                }
            }
        }
        all.into_iter().map(|o| o.expect("every position computed")).collect()
    });
    let mut feats = Vec::with_capacity(count * g * g * f);
    for r in per_image {
        feats.extend(r?);
    }
    Ok(feats)
}

/// What the codebook of [`tokenize_pixels`] comes from.
pub enum Codebook<'a> {
    /// Fit one with this configuration.
    Fit(&'a KMeansConfig),
    /// Use these centroids `[k, 3·p·p]` (labelling an evaluation split).
    Given { centroids: Vec<f32>, k: usize },
}

/// Pixel-feature tokenization of a whole index without holding its features: the fit's sample
/// ([`kmeans::sample_indices`] over every patch of every image) is gathered `chunk_images`
/// images at a time, the codebook fitted on it (the same result as fitting on all features),
/// then every image labelled `chunk_images` at a time. Memory: the sample plus one chunk of
/// features. Returns the codebook, the ids `[images · patches]` in index order, the report and
/// the fit's inertia (empty for a given codebook).
pub fn tokenize_pixels(
    index: &ImageIndex,
    image: usize,
    patch: usize,
    codebook: Codebook<'_>,
    device: &KMeansDevice,
    chunk_images: usize,
) -> Result<Tokenized, String> {
    let patches = (image / patch).pow(2);
    let dim = 3 * patch * patch;
    let chunk_images = chunk_images.max(1);
    let chunks = || (0..index.len()).step_by(chunk_images).map(|a| a..(a + chunk_images).min(index.len()));
    let (centroids, k, inertia) = match codebook {
        Codebook::Given { centroids, k } => (centroids, k, Vec::new()),
        Codebook::Fit(cfg) => {
            let wanted = kmeans::sample_indices(index.len() * patches, cfg);
            let mut sample = Vec::with_capacity(wanted.len() * dim);
            let mut next = wanted.iter().peekable();
            for range in chunks() {
                let end_row = (range.end * patches) as u32;
                if next.peek().is_none_or(|&&r| r >= end_row) {
                    continue; // no sampled patch in these images: nothing to decode
                }
                let start_row = range.start * patches;
                let feats = pixel_features_of(index, range, image, patch)?;
                while let Some(&&r) = next.peek().filter(|&&&r| r < end_row) {
                    let local = r as usize - start_row;
                    sample.extend_from_slice(&feats[local * dim..(local + 1) * dim]);
                    next.next();
                }
            }
            let fitted = device.fit(&sample, dim, cfg)?;
            (fitted.centroids, cfg.k, fitted.inertia_per_iteration)
        }
    };
    let mut ids = Vec::with_capacity(index.len() * patches);
    let mut d2 = Vec::with_capacity(index.len() * patches);
    for range in chunks() {
        let feats = pixel_features_of(index, range, image, patch)?;
        let (i, d) = device.assign(&feats, dim, &centroids)?;
        ids.extend(i);
        d2.extend(d);
    }
    let report = kmeans::report(&ids, k, &d2).map_err(|e| e.to_string())?;
    Ok(Tokenized { centroids, ids: ids.into_iter().map(|i| i as i32).collect(), report, inertia })
}

/// A fitted codebook and the labels of every patch.
pub struct Tokenized {
    pub centroids: Vec<f32>,
    pub ids: Vec<i32>,
    pub report: KMeansReport,
    pub inertia: Vec<f64>,
}

/// Where k-means runs: the CPU (f32, exact nearest centroids) or a GPU (bf16 points and
/// centroids, f32 distances through a cuBLASLt GEMM and a fused argmin: ids differ from the CPU's
/// only at near-ties).
pub enum KMeansDevice {
    /// The CPU reference.
    Cpu,
    /// A GPU and its cuBLASLt handle.
    Cuda(Arc<Gpu>, Gemm),
}

impl KMeansDevice {
    /// The device `name` (the value of `--device`) selects: "cpu", "cuda", or "auto" (the GPU
    /// when one is usable), by [`crate::device`]'s policy; with the note saying why "auto" fell
    /// back to the CPU, for the caller to print.
    pub fn select(name: &str) -> Result<(Self, Option<String>), String> {
        let setting = Setting::Flag("--device");
        device::select(
            Device::parse(name, setting)?,
            setting,
            (),
            |_| {
                let gpu = Arc::new(Gpu::first()?);
                let gemm = Gemm::new(&gpu)?;
                Ok(KMeansDevice::Cuda(gpu, gemm))
            },
            |_| Ok(KMeansDevice::Cpu),
        )
    }

    /// "cpu" or "cuda (NAME)", for reports.
    pub fn describe(&self) -> String {
        match self {
            KMeansDevice::Cpu => "cpu".into(),
            KMeansDevice::Cuda(gpu, _) => format!("cuda ({})", gpu.name()),
        }
    }

    /// The nearest centroid of every row of `features` [rows, dim], and its squared distance.
    pub fn assign(&self, features: &[f32], dim: usize, centroids: &[f32]) -> Result<(Vec<u32>, Vec<f32>), String> {
        match self {
            KMeansDevice::Cpu => kmeans::assign(features, dim, centroids).map_err(|e| e.to_string()),
            KMeansDevice::Cuda(gpu, gemm) => {
                let points = gpu.upload_bf16(features).map_err(|e| e.to_string())?;
                cuda_assign_all(gpu, gemm, &points, dim, centroids).map_err(|e| e.to_string())
            }
        }
    }

    /// Fits k-means on `features` [rows, dim] (the paper's sampling rule applies).
    pub fn fit(&self, features: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<kmeans::KMeansResult, String> {
        match self {
            KMeansDevice::Cpu => kmeans::fit(features, dim, cfg).map_err(|e| e.to_string()),
            KMeansDevice::Cuda(gpu, gemm) => {
                let points = gpu.upload_bf16(features).map_err(|e| e.to_string())?;
                kmeans::cuda_fit(gpu, gemm, &points, dim, cfg).map_err(|e| e.to_string())
            }
        }
    }

    /// Fits k-means on `features` [rows, dim] (the paper's sampling rule) and labels every row.
    pub fn fit_and_assign(&self, features: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<Tokenized, String> {
        let (fit, ids, d2) = match self {
            KMeansDevice::Cpu => {
                let fit = kmeans::fit(features, dim, cfg).map_err(|e| e.to_string())?;
                let (ids, d2) = kmeans::assign(features, dim, &fit.centroids).map_err(|e| e.to_string())?;
                (fit, ids, d2)
            }
            KMeansDevice::Cuda(gpu, gemm) => {
                let run = || -> mapet::Result<_> {
                    let points = gpu.upload_bf16(features)?;
                    let fit = kmeans::cuda_fit(gpu, gemm, &points, dim, cfg)?;
                    let (ids, d2) = cuda_assign_all(gpu, gemm, &points, dim, &fit.centroids)?;
                    Ok((fit, ids, d2))
                };
                run().map_err(|e| e.to_string())?
            }
        };
        let report = kmeans::report(&ids, cfg.k, &d2).map_err(|e| e.to_string())?;
        let inertia = fit.inertia_per_iteration.clone();
        Ok(Tokenized { centroids: fit.centroids, ids: ids.into_iter().map(|i| i as i32).collect(), report, inertia })
    }
}

/// Every row of `points` (bf16 on the device) labelled with its nearest of `centroids` (f32 on
/// the host), read back.
fn cuda_assign_all(
    gpu: &Gpu,
    gemm: &Gemm,
    points: &mapet::cuda::DeviceBuffer<half::bf16>,
    dim: usize,
    centroids: &[f32],
) -> mapet::Result<(Vec<u32>, Vec<f32>)> {
    let n = points.len() / dim.max(1);
    let c = gpu.upload_bf16(centroids)?;
    let (mut ids, mut d2) = (gpu.alloc::<u32>(n)?, gpu.alloc::<f32>(n)?);
    kmeans::cuda_assign(gpu, gemm, points, dim, &c, &mut ids, &mut d2)?;
    Ok((ids.to_host()?, d2.to_host()?))
}

/// Fits k-means on `features` [rows, dim] on the CPU (the paper's sampling rule) and labels every
/// row ([`KMeansDevice::fit_and_assign`] on [`KMeansDevice::Cpu`]).
pub fn fit_and_assign(features: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<Tokenized, String> {
    KMeansDevice::Cpu.fit_and_assign(features, dim, cfg)
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
