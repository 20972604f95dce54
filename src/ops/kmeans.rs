//! k-means codebooks: the tokenizer side of MaPeT's k-CLIP targets (SPEC.md, "Tokenizers").
//!
//! # What is computed
//!
//! For `n` points `x_i` of dimension `dim` (row-major `[n, dim]` f32) and a [`KMeansConfig`]:
//!
//! 1. **Sub-sample.** At most `m = min(n, k * max_points_per_centroid)` points are used for the fit
//!    (the paper: 512 per centroid). When `m < n` the sample is `m` distinct points drawn with a
//!    ChaCha8 generator seeded by `seed` (stream 0), kept in index order. All restarts share it, so
//!    their inertias compare.
//! 2. **Restarts.** Restart `r` draws its initial centroids with its own stream (`r + 1`) of the
//!    same seed: [`KMeansInit::Random`] takes `k` distinct sample points, [`KMeansInit::PlusPlus`]
//!    is k-means++ (first point uniform, each next one drawn with probability proportional to its
//!    squared distance to the nearest centroid chosen so far).
//! 3. **Lloyd iterations**, at most `iterations` of them: assign every sample point to its nearest
//!    centroid, then move each centroid to the mean of its points. A centroid left with no point is
//!    **re-seeded** at the point farthest from its own centroid (squared distances of the
//!    assignment just made; largest first, ties to the lowest point index; one distinct point per
//!    empty centroid, empty centroids taken in increasing index). This never increases the
//!    inertia: the moved point's distance drops to 0 and no other point gets farther from its
//!    nearest centroid. Iterations stop early when an assignment repeats the previous one (the
//!    centroids would not move again).
//! 4. **Best restart**: the one with the lowest final inertia (sum of squared distances over the
//!    sample), the earliest on ties. [`KMeansResult::inertia_per_iteration`] is that restart's
//!    inertia after every assignment: entry 0 for the initial centroids, then one per iteration.
//!
//! [`assign`] labels any set of points: `ids[i]` = the nearest centroid, ties to the **lowest
//! index**; [`report`] summarises a labelling (fraction of centroids used, perplexity of the id
//! histogram, mean squared distance).
//!
//! # CPU numerics: fast and exact
//!
//! Distances are expanded as `|x - c|^2 = |x|^2 - 2 x.c + |c|^2`, with every `x.c` of a chunk of
//! points from one f32 GEMM ([`crate::cpu::sgemm`]). That expansion is fast but not exact: its
//! rounding error can swap two nearly equal distances, and exact ties (duplicated centroids, a
//! point halfway between two centroids) come out in whatever order rounding gives. So the GEMM only
//! **shortlists** candidates. For a point `x` and centroid `j` the f32 dot product obeys
//! `|fl(x.c_j) - x.c_j| <= gamma_dim * |x| |c_j|` with `gamma_dim = dim u / (1 - dim u)`,
//! `u = 2^-24`, for any summation order (FMA or not), so `a_j = |c_j|^2 - 2 fl(x.c_j)` (in f64) is
//! within `e_j = 4 gamma_dim |x| |c_j|` of the true value (a factor 2 to spare), plus a term
//! covering f64 rounding and f32 underflow. Every `j` with `a_j - e_j <= min_l (a_l + e_l)` is a
//! candidate; the others are provably farther. Each candidate's distance is then computed
//! **directly**, `sum_d (x_d - c_jd)^2` in f64 in index order, and the smallest wins, ties to the
//! lowest index. The result equals a brute-force search over those direct f64 distances, bit for
//! bit (the tests check exactly that); usually one or two candidates per point need the direct
//! sum, so the cost stays the GEMM's. That holds while `|x| |c|` is not orders of magnitude above
//! the distances: features with a large common mean should be centred first (k-means does not
//! depend on a shift), or most centroids become candidates and the search turns brute force.
//! Rows whose scores are not finite (values near the f32 range limit) fall back to direct
//! distances for every centroid. Returned squared distances are the direct f64 values rounded to
//! f32.
//!
//! Means are f64 sums over each cluster's points in increasing point index (a stable counting
//! sort), divided by the count and rounded to f32: deterministic and independent of the thread
//! count. rayon parallelises the assignment over points and the means over centroids;
//! matrixmultiply threads the GEMM. Inputs must be finite (checked).
//!
//! # GPU
//!
//! [`cuda_assign`] runs per chunk of points (at most [`GPU_SCORE_BYTES`] of scores): a cuBLASLt
//! GEMM `scores = x c^T` (bf16 operands, f32 accumulation, **f32 output**, through
//! [`Gemm::matmul_f32_out`]), then `cuda/kmeans.cu::kmeans_assign_argmin`, one warp per point,
//! which forms `d_j = |c_j|^2 - 2 scores_j` in f32 (`|c_j|^2` of the bf16 centroids, from
//! `kmeans_row_norms`), keeps the lowest index among equal minima and adds `|x|^2` for the squared
//! distance. The wrapper allows f32 output, so no hand-written distance kernel is needed. Its
//! numerics are those of the expansion, without the CPU's exact re-check: ids match the CPU's
//! exact ones on bf16-rounded data except where two distances are within the f32 rounding of the
//! expansion (near-ties), and squared distances carry that rounding (clamped at 0).
//!
//! [`cuda_update`] computes the means deterministically with no float atomics (integer counts
//! per tile, a stable scatter of point indices by cluster, sums over fixed pieces of that sorted
//! order, and an f64 fix-up of clusters cut by piece boundaries; `cuda/kmeans.cu` explains each
//! kernel): the same ids give the same bits on every run and card. Empty clusters are left as
//! they were. [`cuda_fit`] runs the whole algorithm above on the GPU with the same sampling,
//! initial centroids and re-seeding rule (k-means++ draws its centroids on the host, over the
//! downloaded sample: `m * k * dim` work, fine for small codebooks; at the paper's scale use
//! [`KMeansInit::Random`], which is also faiss's default). Per iteration it reads back the ids and
//! squared distances (8 bytes per sample point) for the inertia, the stopping rule and re-seeding.
//!
//! GPU extra memory: scores `<= GPU_SCORE_BYTES` (the GEMM reads each chunk's points in place),
//! the count table and the piece slots (each at most 64 MiB, or
//! `4 (k + 1)` and `8 dim` bytes when larger), and 4 bytes per point for the sorted order; the fit
//! adds the sample (`m * dim` bf16 when `m < n`), the centroids (f32 and bf16) and ids and
//! distances (8 bytes per sample point). Not counted: the cuBLASLt workspace, owned by the
//! [`Gemm`].

use std::borrow::Cow;

use cudarc::driver::LaunchConfig;
use half::bf16;
use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::cpu::sgemm;
use crate::cuda::gemm::{Epilogue, Gemm};
use crate::cuda::params::{MapetKMeansAssign, MapetKMeansGather, MapetKMeansRowNorms, MapetKMeansUpdate};
use crate::cuda::{blocks_for, DeviceBuffer, Gpu};
use crate::error::{check_len, Error, Result};

/// Lloyd iterations per restart (the paper's 20).
pub const DEFAULT_ITERATIONS: usize = 20;
/// Restarts (the paper's best of 5).
pub const DEFAULT_RESTARTS: usize = 5;
/// Sample cap per centroid (the paper's 512).
pub const DEFAULT_MAX_POINTS_PER_CENTROID: usize = 512;
/// Most bytes of f32 scores one GPU assignment chunk holds.
pub const GPU_SCORE_BYTES: usize = 64 << 20;
/// f32 scores per CPU assignment chunk (16 MiB).
const CPU_SCORE_FLOATS: usize = 1 << 22;
/// Most rows per CPU assignment chunk.
const CPU_MAX_CHUNK_ROWS: usize = 4096;
/// Largest number of points or centroids (positions are int32 on the GPU).
pub const MAX_POINTS: usize = (1 << 31) - 1;

/// How the initial centroids of a restart are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KMeansInit {
    /// k-means++: each next centroid drawn with probability proportional to the squared distance
    /// to the nearest one chosen so far. Better starts, `m * k * dim` work (k sequential passes).
    PlusPlus,
    /// `k` distinct sample points drawn uniformly (faiss's default; the only practical choice at
    /// k-CLIP's scale of 8192 centroids over millions of points).
    Random,
}

/// Parameters of [`fit`] and [`cuda_fit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KMeansConfig {
    /// Number of centroids (at least 1, at most the number of points).
    pub k: usize,
    /// Most Lloyd iterations per restart (0: just the initial centroids).
    pub iterations: usize,
    /// Independent restarts; the lowest final inertia wins (at least 1).
    pub restarts: usize,
    /// The fit uses at most `k * max_points_per_centroid` points (at least 1).
    pub max_points_per_centroid: usize,
    /// Initial centroids of each restart.
    pub init: KMeansInit,
    /// Seed of every random choice (sample, initial centroids).
    pub seed: u64,
}

impl KMeansConfig {
    /// The paper's settings for `k` centroids: 20 iterations, best of 5 restarts, at most 512
    /// points per centroid; random initial points (see [`KMeansInit::Random`]); seed 0.
    pub fn new(k: usize) -> Self {
        KMeansConfig {
            k,
            iterations: DEFAULT_ITERATIONS,
            restarts: DEFAULT_RESTARTS,
            max_points_per_centroid: DEFAULT_MAX_POINTS_PER_CENTROID,
            init: KMeansInit::Random,
            seed: 0,
        }
    }

    /// Number of points the fit uses out of `n`.
    pub fn sample_size(&self, n: usize) -> usize {
        n.min(self.k.saturating_mul(self.max_points_per_centroid))
    }
}

/// The outcome of [`fit`] or [`cuda_fit`].
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansResult {
    /// Number of centroids.
    pub k: usize,
    /// Dimension of the points.
    pub dim: usize,
    /// The best restart's centroids, f32 `[k, dim]`.
    pub centroids: Vec<f32>,
    /// The best restart's inertia (sum of squared distances over the sample) after each
    /// assignment: entry 0 for the initial centroids, then one per iteration run (at most
    /// `iterations + 1` entries; fewer when an assignment repeated). The last is the final one.
    pub inertia_per_iteration: Vec<f64>,
    /// Final inertia of every restart.
    pub restart_inertia: Vec<f64>,
    /// Index of the best restart (lowest final inertia, earliest on ties).
    pub best_restart: usize,
    /// Number of points the fit used.
    pub sample_size: usize,
}

impl KMeansResult {
    /// The final inertia of the best restart.
    pub fn inertia(&self) -> f64 {
        self.inertia_per_iteration.last().copied().unwrap_or(f64::NAN)
    }
}

/// One run of Lloyd's algorithm from given centroids ([`lloyd`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LloydRun {
    /// Final centroids, f32 `[k, dim]`.
    pub centroids: Vec<f32>,
    /// The last assignment (of the final centroids).
    pub ids: Vec<u32>,
    /// Inertia after each assignment, as [`KMeansResult::inertia_per_iteration`].
    pub inertia_per_iteration: Vec<f64>,
}

/// Summary of a labelling ([`report`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KMeansReport {
    /// Fraction of the `k` centroids that label at least one point.
    pub usage: f64,
    /// `exp(H)` with `H = -sum_j p_j ln p_j` the entropy of the id histogram (`p_j` = fraction of
    /// points with id `j`): `k` for a uniform histogram, 1 when one centroid takes everything.
    pub perplexity: f64,
    /// Mean squared distance of the points to their centroids.
    pub mean_sq_dist: f64,
}

// -------------------------------------------------------------------------------------- checks

fn unsupported(what: &'static str, detail: String) -> Error {
    Error::Unsupported { what, detail }
}

/// Number of rows of `x` (`[rows, dim]`, finite values); names the tensor on failure.
fn check_matrix(tensor: &'static str, x: &[f32], dim: usize) -> Result<usize> {
    let rows = check_shape(tensor, x.len(), dim)?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(unsupported("k-means input", format!("`{tensor}` holds a non-finite value at index {i}")));
    }
    Ok(rows)
}

/// Number of rows of a `[rows, dim]` tensor of `len` elements.
fn check_shape(tensor: &'static str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(unsupported("k-means dimension", "dim must be at least 1".into()));
    }
    if !len.is_multiple_of(dim) {
        return Err(Error::Shape {
            tensor,
            expected: format!("a multiple of dim = {dim} elements"),
            got: format!("{len} elements"),
        });
    }
    let rows = len / dim;
    if rows > MAX_POINTS {
        return Err(unsupported("k-means size", format!("`{tensor}` has {rows} rows, more than {MAX_POINTS}")));
    }
    Ok(rows)
}

/// The centroid count of a `[k, dim]` tensor: at least 1 and at most `n`.
fn check_k(k: usize, n: usize) -> Result<()> {
    if k == 0 {
        return Err(unsupported("k-means k", "k must be at least 1".into()));
    }
    if k > n {
        return Err(unsupported("k-means k", format!("k = {k} centroids need at least {k} points, got {n}")));
    }
    Ok(())
}

fn check_config(cfg: &KMeansConfig, n: usize) -> Result<()> {
    check_k(cfg.k, n)?;
    if cfg.restarts == 0 {
        return Err(unsupported("k-means restarts", "at least one restart is needed".into()));
    }
    if cfg.max_points_per_centroid == 0 {
        return Err(unsupported("k-means sample", "max_points_per_centroid must be at least 1".into()));
    }
    Ok(())
}

fn check_ids(ids: &[u32], k: usize) -> Result<()> {
    if let Some(i) = ids.iter().position(|&id| id as usize >= k) {
        return Err(unsupported("k-means ids", format!("ids[{i}] = {} is not below k = {k}", ids[i])));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------- random

/// Stream `stream` of the ChaCha8 generator seeded by `seed`: 0 draws the sample, `r + 1` the
/// initial centroids of restart `r`.
fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Indices (increasing) of the points the fit uses.
/// The points [`fit`] and [`cuda_fit`] fit on, out of `n`: ascending indices, all of them when
/// `n` is within [`KMeansConfig::sample_size`], else a seeded uniform sample. Fitting on exactly
/// these points, in this order, gives the same result as fitting on all `n`: a caller that
/// computes features on the fly can gather the sample first.
pub fn sample_indices(n: usize, cfg: &KMeansConfig) -> Vec<u32> {
    let m = cfg.sample_size(n);
    if m == n {
        return (0..n as u32).collect();
    }
    let mut rng = stream_rng(cfg.seed, 0);
    let mut v: Vec<u32> = index::sample(&mut rng, n, m).into_iter().map(|i| i as u32).collect();
    v.sort_unstable();
    v
}

/// Rows `rows` of `x` (`[*, dim]`), packed.
fn gather(x: &[f32], dim: usize, rows: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * dim);
    for &r in rows {
        out.extend_from_slice(&x[r as usize * dim..(r as usize + 1) * dim]);
    }
    out
}

/// Indices into the sample (`[m, dim]`) of the initial centroids of one restart.
fn init_indices(sample: &[f32], dim: usize, k: usize, init: KMeansInit, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let m = sample.len() / dim;
    match init {
        KMeansInit::Random => index::sample(rng, m, k).into_iter().map(|i| i as u32).collect(),
        KMeansInit::PlusPlus => plus_plus(sample, dim, k, rng),
    }
}

/// k-means++ seeding over `x` (`[m, dim]`, m >= k >= 1), with direct f64 distances.
fn plus_plus(x: &[f32], dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let m = x.len() / dim;
    let first = rng.random_range(0..m);
    let mut chosen = vec![first as u32];
    let c = &x[first * dim..(first + 1) * dim];
    let mut nearest: Vec<f64> = x.par_chunks(dim).map(|row| direct_sq_dist(row, c)).collect();
    while chosen.len() < k {
        // Sequential sums: the draw does not depend on the thread count.
        let total: f64 = nearest.iter().sum();
        let next = if total > 0.0 && total.is_finite() {
            let target = rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut pick = None;
            let mut last_positive = 0;
            for (i, &w) in nearest.iter().enumerate() {
                if w > 0.0 {
                    acc += w;
                    last_positive = i;
                    if acc > target {
                        pick = Some(i);
                        break;
                    }
                }
            }
            pick.unwrap_or(last_positive)
        } else {
            // Every point coincides with a chosen centroid: any point will do.
            rng.random_range(0..m)
        };
        chosen.push(next as u32);
        let c = &x[next * dim..(next + 1) * dim];
        nearest.par_iter_mut().zip(x.par_chunks(dim)).for_each(|(d, row)| *d = d.min(direct_sq_dist(row, c)));
    }
    chosen
}

// -------------------------------------------------------------------------------------- CPU

/// `sum_d (x_d - c_d)^2` in f64, in index order: the exact distance every CPU result is defined by.
fn direct_sq_dist(x: &[f32], c: &[f32]) -> f64 {
    let mut s = 0.0f64;
    for (&a, &b) in x.iter().zip(c) {
        let d = a as f64 - b as f64;
        s += d * d;
    }
    s
}

/// Per-centroid `|c|^2` and `|c|` in f64.
struct CentroidNorms {
    sq: Vec<f64>,
    norm: Vec<f64>,
}

impl CentroidNorms {
    fn new(centroids: &[f32], dim: usize) -> Self {
        let sq: Vec<f64> = centroids.par_chunks(dim).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum()).collect();
        let norm = sq.iter().map(|s| s.sqrt()).collect();
        CentroidNorms { sq, norm }
    }
}

/// The rounding bounds of the shortlist (module docs, "CPU numerics").
#[derive(Clone, Copy)]
struct Bounds {
    /// `4 gamma_dim` for the f32 dot product, or infinite when `dim u >= 1/2`.
    dot: f64,
    /// Relative slack that covers the f64 rounding of the direct sums.
    direct: f64,
    /// Absolute slack for f32 underflow in the dot product.
    tiny: f64,
}

impl Bounds {
    fn new(dim: usize) -> Self {
        let u = (-24f64).exp2();
        let du = dim as f64 * u;
        let dot = if du < 0.5 { 4.0 * du / (1.0 - du) } else { f64::INFINITY };
        Bounds { dot, direct: 4.0 * (dim as f64 + 2.0) * (-53f64).exp2(), tiny: dim as f64 * (-140f64).exp2() }
    }
}

/// The nearest centroid of `x` and its direct squared distance, given the f32 scores `x.c_j`.
fn nearest(x: &[f32], scores: &[f32], centroids: &[f32], norms: &CentroidNorms, bounds: Bounds) -> (u32, f64) {
    let dim = x.len();
    let k = scores.len();
    let x_norm = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let approx = |j: usize| norms.sq[j] - 2.0 * scores[j] as f64;
    let slack = |j: usize| {
        let r = x_norm + norms.norm[j];
        bounds.dot * x_norm * norms.norm[j] + bounds.direct * r * r + bounds.tiny
    };
    let shortlist = bounds.dot.is_finite() && scores.iter().all(|s| s.is_finite());
    let upper = if shortlist { (0..k).map(|j| approx(j) + slack(j)).fold(f64::INFINITY, f64::min) } else { 0.0 };
    let mut best = (0u32, f64::INFINITY);
    let mut found = false;
    for j in 0..k {
        if shortlist && approx(j) - slack(j) > upper {
            continue;
        }
        let d = direct_sq_dist(x, &centroids[j * dim..(j + 1) * dim]);
        // Increasing j with a strict comparison: ties keep the lowest index.
        if !found || d < best.1 {
            best = (j as u32, d);
            found = true;
        }
    }
    best
}

/// Nearest centroid and direct squared distance of every point (inputs checked by the caller).
fn assign_into(points: &[f32], dim: usize, centroids: &[f32], ids: &mut [u32], dists: &mut [f64]) {
    let n = points.len() / dim;
    let k = centroids.len() / dim;
    let norms = CentroidNorms::new(centroids, dim);
    let bounds = Bounds::new(dim);
    let chunk = (CPU_SCORE_FLOATS / k).clamp(1, CPU_MAX_CHUNK_ROWS).min(n.max(1));
    let mut scores = vec![0.0f32; chunk * k];
    let mut start = 0;
    while start < n {
        let m = chunk.min(n - start);
        let xs = &points[start * dim..(start + m) * dim];
        let s = &mut scores[..m * k];
        sgemm(m, k, dim, 1.0, xs, centroids, true, 0.0, s);
        let s = &*s;
        let norms = &norms;
        ids[start..start + m].par_iter_mut().zip(dists[start..start + m].par_iter_mut()).enumerate().for_each(
            |(r, (id, d))| {
                let (j, dd) = nearest(&xs[r * dim..(r + 1) * dim], &s[r * k..(r + 1) * k], centroids, norms, bounds);
                *id = j;
                *d = dd;
            },
        );
        start += m;
    }
}

/// The nearest centroid of every point (`points` `[n, dim]`, `centroids` `[k, dim]`, both f32,
/// finite): ids, ties to the lowest index, and squared distances. Exact: equal to a brute-force
/// search over direct f64 distances `sum_d (x_d - c_d)^2` (module docs); the distances are those
/// f64 values rounded to f32.
pub fn assign(points: &[f32], dim: usize, centroids: &[f32]) -> Result<(Vec<u32>, Vec<f32>)> {
    let n = check_matrix("points", points, dim)?;
    let k = check_matrix("centroids", centroids, dim)?;
    if k == 0 {
        return Err(unsupported("k-means k", "at least one centroid is needed".into()));
    }
    let mut ids = vec![0u32; n];
    let mut dists = vec![0.0f64; n];
    assign_into(points, dim, centroids, &mut ids, &mut dists);
    Ok((ids, dists.iter().map(|&d| d as f32).collect()))
}

/// Means of the clusters into `centroids`; empty clusters keep their rows. Returns the counts.
fn update_means(points: &[f32], dim: usize, ids: &[u32], centroids: &mut [f32]) -> Vec<u32> {
    let k = centroids.len() / dim;
    let mut counts = vec![0u32; k];
    for &id in ids {
        counts[id as usize] += 1;
    }
    let mut offsets = vec![0usize; k + 1];
    for j in 0..k {
        offsets[j + 1] = offsets[j] + counts[j] as usize;
    }
    // Stable counting sort: each cluster's points in increasing index.
    let mut order = vec![0u32; ids.len()];
    let mut next = offsets.clone();
    for (i, &id) in ids.iter().enumerate() {
        order[next[id as usize]] = i as u32;
        next[id as usize] += 1;
    }
    centroids.par_chunks_mut(dim).enumerate().for_each(|(j, row)| {
        let members = &order[offsets[j]..offsets[j + 1]];
        if members.is_empty() {
            return;
        }
        let mut sum = vec![0.0f64; dim];
        for &i in members {
            let x = &points[i as usize * dim..(i as usize + 1) * dim];
            for (s, &v) in sum.iter_mut().zip(x) {
                *s += v as f64;
            }
        }
        let count = members.len() as f64;
        for (c, s) in row.iter_mut().zip(&sum) {
            *c = (s / count) as f32;
        }
    });
    counts
}

/// The `count` points with the largest `dists` (ties to the lowest index), largest first.
fn farthest_points(dists: &[f64], count: usize) -> Vec<u32> {
    let cmp = |a: &u32, b: &u32| dists[*b as usize].total_cmp(&dists[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..dists.len() as u32).collect();
    if count == 0 {
        return Vec::new();
    }
    if count < idx.len() {
        idx.select_nth_unstable_by(count - 1, cmp);
        idx.truncate(count);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// The empty centroids (increasing index) and the points that re-seed them (module docs).
fn reseed_plan(counts: &[u32], dists: &[f64]) -> (Vec<u32>, Vec<u32>) {
    let empty: Vec<u32> = counts.iter().enumerate().filter(|(_, &c)| c == 0).map(|(j, _)| j as u32).collect();
    let points = farthest_points(dists, empty.len());
    (empty, points)
}

/// The centroid update of one Lloyd step: each centroid with at least one point (`ids[i] < k`)
/// becomes the mean of its points (f64 sums in point order, rounded to f32); centroids with no
/// point keep their rows. `points` `[n, dim]`, `ids` `[n]`, `centroids` `[k, dim]`. Returns the
/// number of points of every centroid.
pub fn update(points: &[f32], dim: usize, ids: &[u32], centroids: &mut [f32]) -> Result<Vec<u32>> {
    let n = check_matrix("points", points, dim)?;
    let k = check_shape("centroids", centroids.len(), dim)?;
    check_len("ids", ids.len(), n)?;
    if k == 0 {
        return Err(unsupported("k-means k", "at least one centroid is needed".into()));
    }
    check_ids(ids, k)?;
    Ok(update_means(points, dim, ids, centroids))
}

/// Lloyd's algorithm from the centroids `init` (`[k, dim]`, `1 <= k <= n`) over all of `points`:
/// at most `iterations` update + assignment rounds, with the re-seeding and stopping rules of the
/// module docs.
pub fn lloyd(points: &[f32], dim: usize, init: &[f32], iterations: usize) -> Result<LloydRun> {
    let n = check_matrix("points", points, dim)?;
    let k = check_matrix("init", init, dim)?;
    check_k(k, n)?;
    Ok(lloyd_checked(points, dim, init.to_vec(), iterations))
}

fn lloyd_checked(points: &[f32], dim: usize, mut centroids: Vec<f32>, iterations: usize) -> LloydRun {
    let n = points.len() / dim;
    let mut ids = vec![0u32; n];
    let mut dists = vec![0.0f64; n];
    assign_into(points, dim, &centroids, &mut ids, &mut dists);
    let mut inertia = vec![dists.iter().sum::<f64>()];
    let mut next_ids = vec![0u32; n];
    for _ in 0..iterations {
        let counts = update_means(points, dim, &ids, &mut centroids);
        let (empty, seeds) = reseed_plan(&counts, &dists);
        for (&j, &p) in empty.iter().zip(&seeds) {
            let (j, p) = (j as usize, p as usize);
            centroids[j * dim..(j + 1) * dim].copy_from_slice(&points[p * dim..(p + 1) * dim]);
        }
        assign_into(points, dim, &centroids, &mut next_ids, &mut dists);
        inertia.push(dists.iter().sum::<f64>());
        std::mem::swap(&mut ids, &mut next_ids);
        if ids == next_ids {
            break;
        }
    }
    LloydRun { centroids, ids, inertia_per_iteration: inertia }
}

/// Keeps the better of two restarts: lower final inertia, the earlier on ties.
fn better(best: &Option<(f64, usize)>, inertia: f64) -> bool {
    match best {
        None => true,
        Some((b, _)) => inertia < *b,
    }
}

/// k-means on the CPU (module docs): `points` f32 `[n, dim]`, finite.
pub fn fit(points: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<KMeansResult> {
    let n = check_matrix("points", points, dim)?;
    check_config(cfg, n)?;
    let sample_idx = sample_indices(n, cfg);
    let sample: Cow<[f32]> =
        if sample_idx.len() == n { Cow::Borrowed(points) } else { Cow::Owned(gather(points, dim, &sample_idx)) };
    let mut best: Option<(f64, usize)> = None;
    let mut best_run: Option<LloydRun> = None;
    let mut restart_inertia = Vec::with_capacity(cfg.restarts);
    for r in 0..cfg.restarts {
        let mut rng = stream_rng(cfg.seed, 1 + r as u64);
        let init = gather(&sample, dim, &init_indices(&sample, dim, cfg.k, cfg.init, &mut rng));
        let run = lloyd_checked(&sample, dim, init, cfg.iterations);
        let last = *run.inertia_per_iteration.last().expect("one assignment at least");
        restart_inertia.push(last);
        if better(&best, last) {
            best = Some((last, r));
            best_run = Some(run);
        }
    }
    let (best, run) = (best.expect("one restart at least"), best_run.expect("one restart at least"));
    Ok(KMeansResult {
        k: cfg.k,
        dim,
        centroids: run.centroids,
        inertia_per_iteration: run.inertia_per_iteration,
        restart_inertia,
        best_restart: best.1,
        sample_size: sample_idx.len(),
    })
}

/// Usage, perplexity and mean squared distance of a labelling (`ids` `[n]`, each below `k`;
/// `sq_dists` `[n]`; `n >= 1`).
pub fn report(ids: &[u32], k: usize, sq_dists: &[f32]) -> Result<KMeansReport> {
    if k == 0 {
        return Err(unsupported("k-means k", "k must be at least 1".into()));
    }
    check_len("sq_dists", sq_dists.len(), ids.len())?;
    if ids.is_empty() {
        return Err(Error::Shape { tensor: "ids", expected: "at least one id".into(), got: "none".into() });
    }
    check_ids(ids, k)?;
    let mut hist = vec![0u64; k];
    for &id in ids {
        hist[id as usize] += 1;
    }
    let sum_sq = sq_dists.iter().map(|&d| d as f64).sum::<f64>();
    report_from_counts(&hist, sum_sq)
}

/// [`report`] from the labelling's id histogram (`hist[c]` = points labelled c; `k` = its length)
/// and the sum of its squared distances (in f64, added in point order): what a labelling done a
/// block at a time accumulates.
pub fn report_from_counts(hist: &[u64], sum_sq: f64) -> Result<KMeansReport> {
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return Err(Error::Shape { tensor: "ids", expected: "at least one id".into(), got: "none".into() });
    }
    let n = n as f64;
    let used = hist.iter().filter(|&&c| c > 0).count();
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    Ok(KMeansReport { usage: used as f64 / hist.len() as f64, perplexity: entropy.exp(), mean_sq_dist: sum_sq / n })
}

// -------------------------------------------------------------------------------------- CUDA

const MODULE: &str = "kmeans";
/// Row kernels: 256 threads, one warp per row.
const ROW_THREADS: u32 = 256;
const ROWS_PER_BLOCK: u64 = 8;
/// Tile kernels: 128 threads, one warp per tile.
const TILE_THREADS: u32 = 128;
const TILES_PER_BLOCK: u64 = 4;
/// Column kernels: one thread per column of dim.
const COLUMN_THREADS: u32 = 256;
/// Bounds on the update's count table and piece slots (module docs, "GPU extra memory").
const TABLE_BYTES: usize = 64 << 20;
const SLOT_BYTES: usize = 64 << 20;
const MIN_TILE: usize = 2048;
const MIN_PIECE: usize = 1024;
const MAX_TILE: usize = 1 << 30;

/// Shape checks shared by the GPU entry points: `n` points and `k` centroids of width `dim`.
fn check_gpu_shape(n: usize, k: usize, dim: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Shape { tensor: "points", expected: "at least one point".into(), got: "none".into() });
    }
    if k == 0 {
        return Err(unsupported("k-means k", "at least one centroid is needed".into()));
    }
    if n > MAX_POINTS || k > MAX_POINTS || dim > i32::MAX as usize {
        return Err(unsupported("k-means size", format!("n = {n}, k = {k}, dim = {dim}: each must be below 2^31")));
    }
    if dim.div_ceil(COLUMN_THREADS as usize) > 65535 {
        return Err(unsupported("k-means dimension", format!("dim = {dim} needs more than 65535 column blocks")));
    }
    Ok(())
}

/// Grid dimension for a count the host already bounded below 2^31.
fn grid(n: usize) -> u32 {
    n.max(1) as u32
}

fn column_blocks(dim: usize) -> u32 {
    grid(dim.div_ceil(COLUMN_THREADS as usize))
}

/// Buffers of one assignment chunk size.
struct AssignChunk {
    rows: usize,
    scores: DeviceBuffer<f32>,
}

/// The assignment of `n` points to `k` centroids, with its buffers (reused across iterations).
struct Assigner {
    n: usize,
    k: usize,
    dim: usize,
    c_norms: DeviceBuffer<f32>,
    full: AssignChunk,
    tail: Option<AssignChunk>,
}

impl Assigner {
    fn new(gpu: &Gpu, n: usize, k: usize, dim: usize) -> Result<Self> {
        let rows = (GPU_SCORE_BYTES / (4 * k)).clamp(1, n);
        let chunk = |rows: usize| -> Result<AssignChunk> { Ok(AssignChunk { rows, scores: gpu.alloc(rows * k)? }) };
        let full = chunk(rows)?;
        let tail = if !n.is_multiple_of(rows) { Some(chunk(n % rows)?) } else { None };
        Ok(Assigner { n, k, dim, c_norms: gpu.alloc(k)?, full, tail })
    }

    /// ids and squared distances of all points (lengths checked by the callers).
    fn run(
        &mut self,
        gpu: &Gpu,
        gemm: &Gemm,
        points: &DeviceBuffer<bf16>,
        centroids: &DeviceBuffer<bf16>,
        ids: &mut DeviceBuffer<u32>,
        sq_dists: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let (n, k, dim) = (self.n, self.k, self.dim);
        let norms =
            MapetKMeansRowNorms { x: centroids.ptr(), out: self.c_norms.f32_ptr(), rows: k as i64, dim: dim as i32 };
        let cfg = LaunchConfig {
            grid_dim: (blocks_for("k-means centroid norms", k as u64, ROWS_PER_BLOCK)?, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: centroids holds k * dim bf16 and c_norms k f32 (checked by the callers and
        // allocated in `new`); each of the ceil(k / 8) * 8 warps handles row < k only.
        unsafe { gpu.launch_dependent(MODULE, "kmeans_row_norms", cfg, &norms) }?;
        let mut start = 0;
        while start < n {
            let chunk = if n - start >= self.full.rows {
                &mut self.full
            } else {
                self.tail.as_mut().expect("a tail chunk exists when n is not a multiple of the chunk")
            };
            let m = chunk.rows;
            // The chunk's points, read in place by the GEMM and the argmin kernel.
            let x = points.view(start * dim..(start + m) * dim)?;
            gemm.matmul_f32_out(m, k, dim, &x, false, centroids, true, &mut chunk.scores, 1.0, 0.0, Epilogue::None)?;
            let params = MapetKMeansAssign {
                scores: chunk.scores.f32_ptr(),
                c_norms: self.c_norms.f32_ptr(),
                x: x.ptr(),
                ids: (ids.ptr_mut() as usize + start * 4) as *mut u32,
                sq_dists: (sq_dists.ptr_mut() as usize + start * 4) as *mut f32,
                rows: m as i64,
                k: k as i32,
                dim: dim as i32,
            };
            let cfg = LaunchConfig {
                grid_dim: (blocks_for("k-means assignment rows", m as u64, ROWS_PER_BLOCK)?, 1, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: scores holds m * k f32 (written by the GEMM above, same stream), c_norms k
            // f32, x m * dim bf16 (a view of the chunk's rows of points), and ids / sq_dists
            // hold n elements of which rows [start, start + m) are written; warps past m exit.
            unsafe { gpu.launch_dependent(MODULE, "kmeans_assign_argmin", cfg, &params) }?;
            start += m;
        }
        Ok(())
    }
}

/// Checks of [`cuda_assign`]; returns (n, k).
fn check_assign(points: usize, centroids: usize, dim: usize, ids: usize, sq_dists: usize) -> Result<(usize, usize)> {
    let n = check_shape("points", points, dim)?;
    let k = check_shape("centroids", centroids, dim)?;
    check_gpu_shape(n, k, dim)?;
    check_len("ids", ids, n)?;
    check_len("sq_dists", sq_dists, n)?;
    Ok((n, k))
}

/// The nearest centroid of every point on the GPU: `points` bf16 `[n, dim]`, `centroids` bf16
/// `[k, dim]`; writes `ids` `[n]` (ties of the computed f32 distance to the lowest index) and
/// `sq_dists` f32 `[n]`. Numerics in the module docs ("GPU"). `gemm` must belong to `gpu`.
pub fn cuda_assign(
    gpu: &Gpu,
    gemm: &Gemm,
    points: &DeviceBuffer<bf16>,
    dim: usize,
    centroids: &DeviceBuffer<bf16>,
    ids: &mut DeviceBuffer<u32>,
    sq_dists: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let (n, k) = check_assign(points.len(), centroids.len(), dim, ids.len(), sq_dists.len())?;
    Assigner::new(gpu, n, k, dim)?.run(gpu, gemm, points, centroids, ids, sq_dists)
}

/// Sizes of the update's scratch: (points per tile, tiles, positions per piece, pieces).
fn update_plan(n: usize, k: usize, dim: usize) -> (usize, usize, usize, usize) {
    let mut tile = MIN_TILE;
    while tile < n && tile < MAX_TILE && n.div_ceil(tile) * (k + 1) * 4 > TABLE_BYTES {
        tile *= 2;
    }
    let mut piece = MIN_PIECE;
    while piece < n && piece < MAX_TILE && n.div_ceil(piece) * 2 * dim * 4 > SLOT_BYTES {
        piece *= 2;
    }
    (tile, n.div_ceil(tile), piece, n.div_ceil(piece))
}

/// The centroid update of `n` points and `k` centroids, with its scratch (reused across
/// iterations).
struct Updater {
    n: usize,
    k: usize,
    dim: usize,
    tile: usize,
    tiles: usize,
    piece: usize,
    pieces: usize,
    tile_counts: DeviceBuffer<i32>,
    counts: DeviceBuffer<i32>,
    offsets: DeviceBuffer<i32>,
    order: DeviceBuffer<i32>,
    slots: DeviceBuffer<f32>,
}

impl Updater {
    fn new(gpu: &Gpu, n: usize, k: usize, dim: usize) -> Result<Self> {
        let (tile, tiles, piece, pieces) = update_plan(n, k, dim);
        Ok(Updater {
            n,
            k,
            dim,
            tile,
            tiles,
            piece,
            pieces,
            tile_counts: gpu.alloc(tiles * (k + 1))?,
            counts: gpu.alloc(k + 1)?,
            offsets: gpu.alloc(k + 1)?,
            order: gpu.alloc(n)?,
            slots: gpu.alloc(pieces * 2 * dim)?,
        })
    }

    /// Means of the non-empty clusters into both centroid buffers; returns the counts, or an
    /// error when some id is `>= k` (those points were left out; the centroids are then not
    /// meaningful). One synchronisation (the counts are read back).
    fn run(
        &mut self,
        gpu: &Gpu,
        points: &DeviceBuffer<bf16>,
        ids: &DeviceBuffer<u32>,
        centroids: &mut DeviceBuffer<f32>,
        centroids_bf16: &mut DeviceBuffer<bf16>,
    ) -> Result<Vec<u32>> {
        let (n, k, dim) = (self.n, self.k, self.dim);
        let p = MapetKMeansUpdate {
            x: points.ptr(),
            ids: ids.ptr() as *const u32,
            tile_counts: self.tile_counts.ptr_mut() as *mut i32,
            counts: self.counts.ptr_mut() as *mut i32,
            offsets: self.offsets.ptr_mut() as *mut i32,
            order: self.order.ptr_mut() as *mut i32,
            slots: self.slots.f32_ptr(),
            centroids: centroids.f32_ptr(),
            centroids_bf16: centroids_bf16.ptr_mut(),
            n: n as i64,
            k: k as i32,
            dim: dim as i32,
            tile: self.tile as i32,
            tiles: self.tiles as i32,
            piece: self.piece as i32,
            pieces: self.pieces as i32,
        };
        let launch = |name: &'static str, grid_dim: (u32, u32, u32), threads: u32| {
            (name, LaunchConfig { grid_dim, block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
        };
        let tile_grid = (blocks_for("k-means tiles", self.tiles as u64, TILES_PER_BLOCK)?, 1, 1);
        let steps = [
            launch("kmeans_tile_counts", tile_grid, TILE_THREADS),
            launch(
                "kmeans_tile_scan",
                (blocks_for("k-means count columns", k as u64 + 1, COLUMN_THREADS as u64)?, 1, 1),
                COLUMN_THREADS,
            ),
            launch("kmeans_offsets", (1, 1, 1), 1024),
            launch("kmeans_scatter", tile_grid, TILE_THREADS),
            launch("kmeans_segment_sums", (grid(self.pieces), column_blocks(dim), 1), COLUMN_THREADS),
            launch("kmeans_segment_fixup", (grid(k), column_blocks(dim), 1), COLUMN_THREADS),
        ];
        for (name, cfg) in steps {
            // SAFETY: every buffer in `p` has the size cuda/params.h gives for these n, k, dim,
            // tile, tiles, piece, pieces: x n * dim bf16 and ids n (checked by the callers),
            // centroids and centroids_bf16 k * dim (checked by the callers), tile_counts
            // tiles * (k + 1), counts and offsets k + 1, order n, slots pieces * 2 * dim
            // (allocated in `new` from the same plan). Each kernel bounds its indices by those
            // sizes, the grids cover exactly the tiles, columns, pieces and clusters named there,
            // and the kernels run in this order on one stream, each reading what the previous
            // ones wrote.
            unsafe { gpu.launch_dependent(MODULE, name, cfg, &p) }?;
        }
        let counts = self.counts.to_host()?;
        let invalid = counts[k];
        if invalid != 0 {
            return Err(unsupported("k-means ids", format!("{invalid} of the {n} ids are not below k = {k}")));
        }
        Ok(counts[..k].iter().map(|&c| c as u32).collect())
    }
}

/// The centroid update on the GPU: each centroid with at least one point becomes the mean of its
/// points (deterministic, no float atomics; module docs), written to `centroids` (f32 `[k, dim]`)
/// and its bf16 copy `centroids_bf16`; rows of centroids with no point are left untouched.
/// `points` bf16 `[n, dim]`, `ids` `[n]`. Returns the number of points of every centroid, or an
/// error when some id is `>= k` (found by the kernels; the outputs are then not meaningful).
pub fn cuda_update(
    gpu: &Gpu,
    points: &DeviceBuffer<bf16>,
    dim: usize,
    ids: &DeviceBuffer<u32>,
    centroids: &mut DeviceBuffer<f32>,
    centroids_bf16: &mut DeviceBuffer<bf16>,
) -> Result<Vec<u32>> {
    let n = check_shape("points", points.len(), dim)?;
    let k = check_shape("centroids", centroids.len(), dim)?;
    check_gpu_shape(n, k, dim)?;
    check_len("ids", ids.len(), n)?;
    check_len("centroids_bf16", centroids_bf16.len(), centroids.len())?;
    Updater::new(gpu, n, k, dim)?.run(gpu, points, ids, centroids, centroids_bf16)
}

/// Copies rows `src_rows` of `src` (bf16 `[*, dim]`) to rows `dst_rows` (or 0, 1, ...) of
/// `dst_bf16`, and of `dst_f32` (widened) when given.
fn gather_rows(
    gpu: &Gpu,
    src: &DeviceBuffer<bf16>,
    dim: usize,
    src_rows: &[u32],
    dst_rows: Option<&[u32]>,
    dst_bf16: &mut DeviceBuffer<bf16>,
    dst_f32: Option<&mut DeviceBuffer<f32>>,
) -> Result<()> {
    if src_rows.is_empty() {
        return Ok(());
    }
    let src_count = src.len() / dim;
    let dst_count = dst_bf16.len() / dim;
    if let Some(&r) = src_rows.iter().find(|&&r| r as usize >= src_count) {
        return Err(unsupported("k-means row gather", format!("source row {r} of {src_count}")));
    }
    match dst_rows {
        Some(d) => {
            check_len("destination rows", d.len(), src_rows.len())?;
            if let Some(&r) = d.iter().find(|&&r| r as usize >= dst_count) {
                return Err(unsupported("k-means row gather", format!("destination row {r} of {dst_count}")));
            }
        }
        None if src_rows.len() > dst_count => {
            return Err(unsupported("k-means row gather", format!("{} rows into {dst_count}", src_rows.len())));
        }
        None => {}
    }
    if let Some(f) = &dst_f32 {
        check_len("f32 destination", f.len(), dst_bf16.len())?;
    }
    let src_idx = gpu.upload(src_rows)?;
    let dst_idx = match dst_rows {
        Some(d) => Some(gpu.upload(d)?),
        None => None,
    };
    let params = MapetKMeansGather {
        src: src.ptr(),
        src_rows: src_idx.ptr() as *const u32,
        dst_rows: dst_idx.as_ref().map_or(std::ptr::null(), |d| d.ptr() as *const u32),
        dst_bf16: dst_bf16.ptr_mut(),
        dst_f32: dst_f32.map_or(std::ptr::null_mut(), |f| f.f32_ptr()),
        rows: src_rows.len() as i64,
        dim: dim as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (grid(src_rows.len()), column_blocks(dim), 1),
        block_dim: (COLUMN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every source row index is below src.len() / dim and every destination row below
    // dst_bf16.len() / dim (checked above; dst_f32 has the same length); the index lists hold
    // `rows` entries; columns past dim are skipped by the kernel.
    unsafe { gpu.launch_dependent(MODULE, "kmeans_gather", cfg, &params) }?;
    drop((src_idx, dst_idx));
    Ok(())
}

/// Sum of the squared distances (read back), widened, and the ids (read back).
fn read_assignment(ids: &DeviceBuffer<u32>, sq_dists: &DeviceBuffer<f32>) -> Result<(Vec<u32>, Vec<f64>)> {
    let ids = ids.to_host()?;
    let d = sq_dists.to_host()?.into_iter().map(|v| v as f64).collect();
    Ok((ids, d))
}

/// k-means on the GPU (module docs): `points` bf16 `[n, dim]` on the device. The sample, the
/// initial centroids and the re-seeding follow [`fit`]'s rules, so with the same config both
/// start from the same centroids (on bf16-rounded points); assignments then differ only at
/// near-ties. `gemm` must belong to `gpu`.
pub fn cuda_fit(
    gpu: &Gpu,
    gemm: &Gemm,
    points: &DeviceBuffer<bf16>,
    dim: usize,
    cfg: &KMeansConfig,
) -> Result<KMeansResult> {
    let n = check_shape("points", points.len(), dim)?;
    check_config(cfg, n)?;
    check_gpu_shape(n, cfg.k, dim)?;
    let k = cfg.k;
    let sample_idx = sample_indices(n, cfg);
    let m = sample_idx.len();
    let sample_buf = if m < n {
        let mut s = gpu.alloc::<bf16>(m * dim)?;
        gather_rows(gpu, points, dim, &sample_idx, None, &mut s, None)?;
        Some(s)
    } else {
        None
    };
    let sample = sample_buf.as_ref().unwrap_or(points);
    let host_sample = match cfg.init {
        KMeansInit::PlusPlus => Some(sample.to_host_f32()?),
        KMeansInit::Random => None,
    };
    let mut assigner = Assigner::new(gpu, m, k, dim)?;
    let mut updater = Updater::new(gpu, m, k, dim)?;
    let mut ids = gpu.alloc::<u32>(m)?;
    let mut sq_dists = gpu.alloc::<f32>(m)?;
    let mut centroids = gpu.alloc::<f32>(k * dim)?;
    let mut centroids_bf16 = gpu.alloc::<bf16>(k * dim)?;

    let mut best: Option<(f64, usize)> = None;
    let mut best_centroids = Vec::new();
    let mut best_inertia = Vec::new();
    let mut restart_inertia = Vec::with_capacity(cfg.restarts);
    for r in 0..cfg.restarts {
        let mut rng = stream_rng(cfg.seed, 1 + r as u64);
        let init = match &host_sample {
            Some(h) => init_indices(h, dim, k, cfg.init, &mut rng),
            None => index::sample(&mut rng, m, k).into_iter().map(|i| i as u32).collect(),
        };
        gather_rows(gpu, sample, dim, &init, None, &mut centroids_bf16, Some(&mut centroids))?;
        assigner.run(gpu, gemm, sample, &centroids_bf16, &mut ids, &mut sq_dists)?;
        let (mut host_ids, mut dists) = read_assignment(&ids, &sq_dists)?;
        let mut inertia = vec![dists.iter().sum::<f64>()];
        for _ in 0..cfg.iterations {
            let counts = updater.run(gpu, sample, &ids, &mut centroids, &mut centroids_bf16)?;
            let (empty, seeds) = reseed_plan(&counts, &dists);
            gather_rows(gpu, sample, dim, &seeds, Some(&empty), &mut centroids_bf16, Some(&mut centroids))?;
            assigner.run(gpu, gemm, sample, &centroids_bf16, &mut ids, &mut sq_dists)?;
            let (next_ids, next_dists) = read_assignment(&ids, &sq_dists)?;
            inertia.push(next_dists.iter().sum::<f64>());
            dists = next_dists;
            let repeated = next_ids == host_ids;
            host_ids = next_ids;
            if repeated {
                break;
            }
        }
        let last = *inertia.last().expect("one assignment at least");
        restart_inertia.push(last);
        if better(&best, last) {
            best = Some((last, r));
            best_centroids = centroids.to_host()?;
            best_inertia = inertia;
        }
    }
    Ok(KMeansResult {
        k,
        dim,
        centroids: best_centroids,
        inertia_per_iteration: best_inertia,
        restart_inertia,
        best_restart: best.map_or(0, |b| b.1),
        sample_size: m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_plan_bounds_scratch() {
        for &(n, k, dim) in &[(1usize, 1usize, 1usize), (5000, 8192, 64), (4_200_000, 8192, 4096), (100, 3, 7)] {
            let (tile, tiles, piece, pieces) = update_plan(n, k, dim);
            assert!(tile % 32 == 0 && tile >= MIN_TILE && piece >= MIN_PIECE);
            assert!(tiles * tile >= n && (tiles - 1) * tile < n);
            assert!(pieces * piece >= n && (pieces - 1) * piece < n);
            assert!(tiles * (k + 1) * 4 <= TABLE_BYTES.max((k + 1) * 4));
            assert!(pieces * 2 * dim * 4 <= SLOT_BYTES.max(2 * dim * 4));
        }
    }

    #[test]
    fn farthest_points_order_and_ties() {
        let d = [1.0, 5.0, 3.0, 5.0, 0.0];
        assert_eq!(farthest_points(&d, 0), Vec::<u32>::new());
        assert_eq!(farthest_points(&d, 1), vec![1]);
        assert_eq!(farthest_points(&d, 3), vec![1, 3, 2]);
        assert_eq!(farthest_points(&d, 5), vec![1, 3, 2, 0, 4]);
    }

    #[test]
    fn bounds_cover_dot_product_error() {
        let b = Bounds::new(4096);
        assert!(b.dot > 4096.0 * (-24f64).exp2() && b.dot < 1e-3);
        assert!(Bounds::new(1 << 24).dot.is_infinite());
    }
}
