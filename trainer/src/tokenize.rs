//! Visual tokens from k-means (SPEC.md, "Tokenizers"): per-patch features, a codebook fitted on a
//! sample of them, and every patch of every image labelled with its nearest centroid. The
//! built-in feature is `pixels`: each patch's normalized pixels (the training crop and resize,
//! without jitter), 3·p·p values in channel-major order. Features of an external encoder (CLIP for
//! k-CLIP) come from a .npy file [num_images, N-1, F]. Both are [`FeatureSource`]s, read a range
//! of images at a time by one streaming loop ([`tokenize_stream`]): a set never holds all its
//! features in memory.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use mapet::cuda::gemm::Gemm;
use mapet::cuda::Gpu;
use mapet::ops::kmeans::{self, KMeansConfig, KMeansReport};
use mapet::ops::patch_embed::Normalize;

use crate::data::{preprocess, ImageIndex, NpyF32Reader};
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
    positions: Range<usize>,
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

/// Per-patch features of a set of images, read a range of images at a time, so that a set whose
/// features do not fit in memory can be tokenized ([`tokenize_stream`]).
pub trait FeatureSource {
    /// Number of images.
    fn images(&self) -> usize;
    /// Patches per image.
    fn patches(&self) -> usize;
    /// Values per patch.
    fn dim(&self) -> usize;
    /// The features of the images at positions `images` (within `0..self.images()`), in order:
    /// `[images.len() · patches, dim]`.
    fn read(&mut self, images: Range<usize>) -> Result<Vec<f32>, String>;

    /// The feature rows `rows` (flat patch indices `image · patches + patch`, ascending), packed
    /// `[rows.len(), dim]`. This default reads `chunk_images` images at a time, skipping the
    /// chunks that hold no wanted row; a source that can read single rows does better.
    fn gather(&mut self, rows: &[u32], chunk_images: usize) -> Result<Vec<f32>, String> {
        let (patches, dim) = (self.patches(), self.dim());
        let mut out = Vec::with_capacity(rows.len() * dim);
        let mut next = rows.iter().map(|&r| r as usize).peekable();
        for range in chunks(self.images(), chunk_images) {
            let end_row = range.end * patches;
            if next.peek().is_none_or(|&r| r >= end_row) {
                continue; // no wanted row in these images: nothing to read
            }
            let start_row = range.start * patches;
            let feats = self.read(range)?;
            while let Some(r) = next.next_if(|&r| r < end_row) {
                let local = r - start_row;
                out.extend_from_slice(&feats[local * dim..(local + 1) * dim]);
            }
        }
        Ok(out)
    }
}

/// `0..images` in consecutive ranges of `chunk_images` (at least 1).
fn chunks(images: usize, chunk_images: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk_images.max(1);
    (0..images).step_by(chunk).map(move |a| a..(a + chunk).min(images))
}

/// The built-in feature: each patch's normalized pixels ([`pixel_features_of`]), `3·p·p` values,
/// decoded from the index's image files.
pub struct PixelFeatures<'a> {
    index: &'a ImageIndex,
    image: usize,
    patch: usize,
}

impl<'a> PixelFeatures<'a> {
    /// Pixel features of the images of `index`, resized to `image` pixels, in `patch`-pixel patches.
    pub fn new(index: &'a ImageIndex, image: usize, patch: usize) -> Self {
        PixelFeatures { index, image, patch }
    }
}

impl FeatureSource for PixelFeatures<'_> {
    fn images(&self) -> usize {
        self.index.len()
    }
    fn patches(&self) -> usize {
        (self.image / self.patch).pow(2)
    }
    fn dim(&self) -> usize {
        3 * self.patch * self.patch
    }
    fn read(&mut self, images: Range<usize>) -> Result<Vec<f32>, String> {
        pixel_features_of(self.index, images, self.image, self.patch)
    }
}

/// External features (an encoder's, e.g. CLIP's for k-CLIP) from a float `.npy`
/// `[images, patches, F]` (f32, or f64 rounded to f32) in index order, read by ranges of rows
/// ([`NpyF32Reader`]): never the whole file. A non-finite value is an error naming the file, the
/// image, the patch and the feature.
pub struct NpyFeatures {
    file: NpyF32Reader,
    patches: usize,
    dim: usize,
}

impl NpyFeatures {
    /// Opens `path` and checks it (from its header and length only) against `images` images of
    /// `image` pixels in `patch`-pixel patches. Errors start with the file's path.
    pub fn open(path: &Path, images: usize, image: usize, patch: usize) -> Result<Self, String> {
        let file = NpyF32Reader::open(path).map_err(|e| e.to_string())?;
        let shape = file.shape().to_vec();
        let patches = (image / patch.max(1)).pow(2);
        let [n, p, f] = shape[..] else {
            return Err(format!(
                "{}: array of shape {shape:?}; expected 3-D [images, patches, features]",
                path.display()
            ));
        };
        if n != images {
            return Err(format!(
                "{}: {n} rows of features, but the index has {images} images (shape {shape:?})",
                path.display()
            ));
        }
        if p != patches {
            return Err(format!(
                "{}: {p} patches per image, but --image {image} --patch {patch} gives {patches} (shape {shape:?})",
                path.display()
            ));
        }
        if f == 0 {
            return Err(format!("{}: zero features per patch", path.display()));
        }
        Ok(NpyFeatures { file, patches, dim: f })
    }

    /// The file's dtype: `float32` or `float64`.
    pub fn dtype_name(&self) -> &'static str {
        self.file.dtype_name()
    }

    /// `values`, the features of the flat patch rows from `first_row` on, checked finite.
    fn check_finite(&self, values: &[f32], first_row: usize) -> Result<(), String> {
        match values.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => {
                let row = first_row + i / self.dim;
                Err(format!(
                    "{}: non-finite value at image {}, patch {}, feature {}",
                    self.file.path().display(),
                    row / self.patches,
                    row % self.patches,
                    i % self.dim
                ))
            }
        }
    }
}

impl FeatureSource for NpyFeatures {
    fn images(&self) -> usize {
        self.file.rows()
    }
    fn patches(&self) -> usize {
        self.patches
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn read(&mut self, images: Range<usize>) -> Result<Vec<f32>, String> {
        let first_row = images.start * self.patches;
        let values = self.file.read_rows(images).map_err(|e| e.to_string())?;
        self.check_finite(&values, first_row)?;
        Ok(values)
    }

    /// Reads only the wanted rows (runs of consecutive rows at once).
    fn gather(&mut self, rows: &[u32], _chunk_images: usize) -> Result<Vec<f32>, String> {
        let dim = self.dim;
        let mut out = Vec::with_capacity(rows.len() * dim);
        let mut i = 0;
        while i < rows.len() {
            let first = rows[i] as usize;
            let mut end = i + 1;
            while end < rows.len() && rows[end] as usize == first + (end - i) {
                end += 1;
            }
            let at = out.len();
            let run = first..first + (end - i);
            self.file.read_elements_into(run.start * dim..run.end * dim, &mut out).map_err(|e| e.to_string())?;
            self.check_finite(&out[at..], first)?;
            i = end;
        }
        Ok(out)
    }
}

/// What the codebook of [`tokenize_stream`] comes from.
pub enum Codebook<'a> {
    /// Fit one with this configuration.
    Fit(&'a KMeansConfig),
    /// Use these centroids `[k, dim]` (labelling an evaluation split).
    Given { centroids: Vec<f32>, k: usize },
}

/// The codebook of a streamed tokenization and what labelling with it gave.
pub struct Labelling {
    /// The centroids `[k, dim]`.
    pub centroids: Vec<f32>,
    /// Usage, perplexity and mean squared distance over every patch.
    pub report: KMeansReport,
    /// The fit's inertia per iteration (empty for a given codebook).
    pub inertia: Vec<f64>,
}

/// Seconds between two progress lines of [`tokenize_stream`]'s labelling.
const PROGRESS_EVERY: f64 = 10.0;

/// Tokenization of every patch of `source` without holding its features: the fit's sample
/// ([`kmeans::sample_indices`] over every patch of every image) is gathered
/// ([`FeatureSource::gather`]), the codebook fitted on it (the same result as fitting on all
/// features), then every image labelled `chunk_images` at a time, the ids of each chunk (in image
/// order, `patches` per image) handed to `ids_out` as soon as they are known. Memory: the sample
/// plus one chunk of features and its ids; the report is accumulated on the way.
pub fn tokenize_stream<S: FeatureSource + ?Sized>(
    source: &mut S,
    codebook: Codebook<'_>,
    device: &KMeansDevice,
    chunk_images: usize,
    mut ids_out: impl FnMut(&[u32]) -> Result<(), String>,
) -> Result<Labelling, String> {
    let (images, patches, dim) = (source.images(), source.patches(), source.dim());
    let (centroids, k, inertia) = match codebook {
        Codebook::Given { centroids, k } => {
            if k == 0 || centroids.len() != k * dim {
                return Err(format!(
                    "{} centroid values do not form {k} centroids of the features' dimension {dim}",
                    centroids.len()
                ));
            }
            (centroids, k, Vec::new())
        }
        Codebook::Fit(cfg) => {
            let wanted = kmeans::sample_indices(images * patches, cfg);
            let t = Instant::now();
            crate::say!("gathering the fit's sample: {} of the {} patches", wanted.len(), images * patches);
            let sample = source.gather(&wanted, chunk_images)?;
            if sample.len() != wanted.len() * dim {
                return Err(format!("{} sample values gathered, expected {}", sample.len(), wanted.len() * dim));
            }
            crate::say!("fitting (the sample gathered in {:.1} s)", t.elapsed().as_secs_f64());
            let t = Instant::now();
            let fitted = device.fit(&sample, dim, cfg)?;
            crate::say!("fitted in {:.1} s; labelling every patch", t.elapsed().as_secs_f64());
            (fitted.centroids, cfg.k, fitted.inertia_per_iteration)
        }
    };
    let mut report = ReportSums::new(k);
    // A line on the labelling's progress at most every PROGRESS_EVERY seconds (and at its end).
    let (started, mut last_line) = (Instant::now(), Instant::now());
    for range in chunks(images, chunk_images) {
        let want = range.len() * patches * dim;
        let feats = source.read(range.clone())?;
        if feats.len() != want {
            return Err(format!("images {range:?}: {} feature values read, expected {want}", feats.len()));
        }
        let (ids, d2) = device.assign(&feats, dim, &centroids)?;
        report.add(&ids, &d2)?;
        ids_out(&ids)?;
        if last_line.elapsed().as_secs_f64() >= PROGRESS_EVERY || (range.end == images && images > chunk_images) {
            crate::say!("labelled {} of {images} images ({:.1} s)", range.end, started.elapsed().as_secs_f64());
            last_line = Instant::now();
        }
    }
    Ok(Labelling { centroids, report: report.finish()?, inertia })
}

/// [`tokenize_stream`] collecting the ids: [`Tokenized`].
pub fn tokenize_features<S: FeatureSource + ?Sized>(
    source: &mut S,
    codebook: Codebook<'_>,
    device: &KMeansDevice,
    chunk_images: usize,
) -> Result<Tokenized, String> {
    let mut ids = Vec::with_capacity(source.images() * source.patches());
    let l = tokenize_stream(source, codebook, device, chunk_images, |chunk| {
        ids.extend(chunk.iter().map(|&i| i as i32));
        Ok(())
    })?;
    Ok(Tokenized { centroids: l.centroids, ids, report: l.report, inertia: l.inertia })
}

/// Pixel-feature tokenization of a whole index ([`tokenize_features`] of [`PixelFeatures`]): the
/// same result as fitting on and labelling all features at once, whatever `chunk_images`.
pub fn tokenize_pixels(
    index: &ImageIndex,
    image: usize,
    patch: usize,
    codebook: Codebook<'_>,
    device: &KMeansDevice,
    chunk_images: usize,
) -> Result<Tokenized, String> {
    tokenize_features(&mut PixelFeatures::new(index, image, patch), codebook, device, chunk_images)
}

/// [`kmeans::report`] accumulated a block of ids at a time: the id histogram and the sum of the
/// squared distances, added in the same order, so the result is exactly the whole-set one.
struct ReportSums {
    hist: Vec<u64>,
    sum_sq: f64,
}

impl ReportSums {
    fn new(k: usize) -> Self {
        ReportSums { hist: vec![0; k], sum_sq: 0.0 }
    }

    fn add(&mut self, ids: &[u32], sq_dists: &[f32]) -> Result<(), String> {
        let k = self.hist.len();
        if ids.len() != sq_dists.len() {
            return Err(format!("{} ids but {} squared distances", ids.len(), sq_dists.len()));
        }
        for (&id, &d) in ids.iter().zip(sq_dists) {
            *self.hist.get_mut(id as usize).ok_or_else(|| format!("id {id} is outside the {k} centroids"))? += 1;
            self.sum_sq += d as f64;
        }
        Ok(())
    }

    fn finish(&self) -> Result<KMeansReport, String> {
        kmeans::report_from_counts(&self.hist, self.sum_sq).map_err(|_| "no patch to label".to_string())
    }
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
    Cuda(Arc<Gpu>, Box<Gemm>),
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
                Ok(KMeansDevice::Cuda(gpu, Box::new(gemm)))
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
