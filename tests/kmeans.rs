//! k-means: the CPU reference against brute force (assignment, update, whole Lloyd runs), its
//! invariants (inertia never increases, ties to the lowest index, determinism), recovery of
//! well-separated Gaussian clusters, bad input; the GPU assignment, update and fit against the CPU.

use mapet::cuda::gemm::Gemm;
use mapet::cuda::Gpu;
use mapet::ops::kmeans::{self, KMeansConfig, KMeansInit};
use mapet::testing::{assert_all_written, assert_within_baseline, gpu_or_skip, rng, uniform, uniform_bf16};
use mapet::Error;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

// ------------------------------------------------------------------------------ brute force

/// The distance every CPU result is defined by: sum of squared differences in f64, in order.
fn direct(x: &[f32], c: &[f32]) -> f64 {
    let mut s = 0.0f64;
    for (&a, &b) in x.iter().zip(c) {
        let d = a as f64 - b as f64;
        s += d * d;
    }
    s
}

/// Nearest centroid by scanning all of them, lowest index on ties.
fn naive_assign(points: &[f32], dim: usize, centroids: &[f32]) -> (Vec<u32>, Vec<f64>) {
    let k = centroids.len() / dim;
    points
        .chunks(dim)
        .map(|x| {
            let mut best = (0u32, direct(x, &centroids[..dim]));
            for j in 1..k {
                let d = direct(x, &centroids[j * dim..(j + 1) * dim]);
                if d < best.1 {
                    best = (j as u32, d);
                }
            }
            best
        })
        .unzip()
}

/// Means in f64 over the points of each cluster in index order; empty clusters unchanged.
fn naive_update(points: &[f32], dim: usize, ids: &[u32], centroids: &mut [f32]) -> Vec<u32> {
    let k = centroids.len() / dim;
    let mut counts = vec![0u32; k];
    for j in 0..k {
        let mut sum = vec![0.0f64; dim];
        for (x, &id) in points.chunks(dim).zip(ids) {
            if id as usize == j {
                counts[j] += 1;
                for (s, &v) in sum.iter_mut().zip(x) {
                    *s += v as f64;
                }
            }
        }
        if counts[j] > 0 {
            for (c, s) in centroids[j * dim..(j + 1) * dim].iter_mut().zip(&sum) {
                *c = (s / counts[j] as f64) as f32;
            }
        }
    }
    counts
}

/// Lloyd's algorithm spelled out: update, re-seed each empty centroid (increasing index) at the
/// next farthest point (largest distance, lowest index on ties), assign; stop when an assignment
/// repeats.
fn naive_lloyd(points: &[f32], dim: usize, init: &[f32], iterations: usize) -> (Vec<f32>, Vec<u32>, Vec<f64>) {
    let mut c = init.to_vec();
    let (mut ids, mut d) = naive_assign(points, dim, &c);
    let mut inertia = vec![d.iter().sum::<f64>()];
    for _ in 0..iterations {
        let counts = naive_update(points, dim, &ids, &mut c);
        let mut by_distance: Vec<usize> = (0..d.len()).collect();
        by_distance.sort_by(|&a, &b| d[b].total_cmp(&d[a]).then(a.cmp(&b)));
        let empty = (0..counts.len()).filter(|&j| counts[j] == 0);
        for (j, &p) in empty.zip(&by_distance) {
            c[j * dim..(j + 1) * dim].copy_from_slice(&points[p * dim..(p + 1) * dim]);
        }
        let (next_ids, next_d) = naive_assign(points, dim, &c);
        inertia.push(next_d.iter().sum::<f64>());
        let repeated = next_ids == ids;
        ids = next_ids;
        d = next_d;
        if repeated {
            break;
        }
    }
    (c, ids, inertia)
}

/// Points with many exact ties (small integers) or continuous values.
fn data(rng: &mut ChaCha8Rng, len: usize, discrete: bool) -> Vec<f32> {
    if discrete {
        (0..len).map(|_| rng.random_range(-2i32..=2) as f32).collect()
    } else {
        uniform(rng, len, 3.0)
    }
}

/// `k` centroids: copies of points, duplicates of earlier centroids, and fresh values (+ `offset`).
fn centroids_from(rng: &mut ChaCha8Rng, points: &[f32], dim: usize, k: usize, discrete: bool, offset: f32) -> Vec<f32> {
    let n = points.len() / dim;
    let mut c = Vec::with_capacity(k * dim);
    for j in 0..k {
        match rng.random_range(0..3) {
            0 => {
                let p = rng.random_range(0..n);
                c.extend_from_slice(&points[p * dim..(p + 1) * dim]);
            }
            1 if j > 0 => {
                let q = rng.random_range(0..j);
                c.extend_from_within(q * dim..(q + 1) * dim);
            }
            _ => c.extend(data(rng, dim, discrete).iter().map(|v| v + offset)),
        }
    }
    c
}

// ------------------------------------------------------------------------------ CPU vs brute force

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn assign_matches_brute_force(
        n in 1usize..150, k in 1usize..40, dim in 1usize..40, discrete in any::<bool>(),
        offset in prop_oneof![Just(0.0f32), Just(1000.0f32)], seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // A large common offset makes the expanded distances' rounding far larger than the gaps.
        let points: Vec<f32> = data(&mut rng, n * dim, discrete).iter().map(|v| v + offset).collect();
        let centroids = centroids_from(&mut rng, &points, dim, k, discrete, offset);
        let (ids, d) = kmeans::assign(&points, dim, &centroids).unwrap();
        let (want_ids, want_d) = naive_assign(&points, dim, &centroids);
        prop_assert_eq!(&ids, &want_ids);
        let want_d: Vec<f32> = want_d.iter().map(|&v| v as f32).collect();
        prop_assert_eq!(d, want_d);
    }

    #[test]
    fn update_matches_brute_force(
        n in 1usize..200, k in 1usize..30, dim in 1usize..20, seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let points = data(&mut rng, n * dim, false);
        // Ids from a subset of the clusters, so that some are empty.
        let used = rng.random_range(1..=k);
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..used as u32)).collect();
        let init = data(&mut rng, k * dim, false);
        let mut got = init.clone();
        let counts = kmeans::update(&points, dim, &ids, &mut got).unwrap();
        let mut want = init;
        let want_counts = naive_update(&points, dim, &ids, &mut want);
        prop_assert_eq!(counts, want_counts);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn lloyd_matches_brute_force(
        n in 2usize..120, k in 1usize..12, dim in 1usize..12, iterations in 0usize..6,
        discrete in any::<bool>(), seed in any::<u64>(),
    ) {
        let k = k.min(n);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let points = data(&mut rng, n * dim, discrete);
        // Duplicated starting centroids force empty clusters and re-seeding.
        let init = centroids_from(&mut rng, &points, dim, k, discrete, 0.0);
        let run = kmeans::lloyd(&points, dim, &init, iterations).unwrap();
        let (c, ids, inertia) = naive_lloyd(&points, dim, &init, iterations);
        prop_assert_eq!(run.centroids, c);
        prop_assert_eq!(run.ids, ids);
        prop_assert_eq!(run.inertia_per_iteration, inertia);
    }
}

/// The GEMM shortlist on sizes where it matters (k and dim in the hundreds, several chunks of
/// points), against brute force; also with exact ties from integer data.
#[test]
fn assign_matches_brute_force_large() {
    let mut rng = rng("kmeans assign_matches_brute_force_large");
    let cases = [
        (3000, 700, 96, false, 0.0),
        (500, 300, 257, true, 0.0),
        (9000, 5, 3, false, 0.0),
        (2000, 100, 64, false, 1000.0),
    ];
    for &(n, k, dim, discrete, offset) in &cases {
        // A large common offset makes the expanded distances' rounding far larger than the gaps.
        let points: Vec<f32> = data(&mut rng, n * dim, discrete).iter().map(|v| v + offset).collect();
        let centroids = centroids_from(&mut rng, &points, dim, k, discrete, offset);
        let (ids, d) = kmeans::assign(&points, dim, &centroids).unwrap();
        let (want_ids, want_d) = naive_assign(&points, dim, &centroids);
        assert_eq!(ids, want_ids, "n={n} k={k} dim={dim}");
        assert!(d.iter().zip(&want_d).all(|(&a, &b)| a == b as f32), "n={n} k={k} dim={dim}");
    }
}

// ------------------------------------------------------------------------------ invariants

fn assert_non_increasing(what: &str, inertia: &[f64]) {
    for w in inertia.windows(2) {
        assert!(w[1] <= w[0] * (1.0 + 1e-12), "{what}: inertia rose from {} to {} ({inertia:?})", w[0], w[1]);
    }
}

#[test]
fn inertia_never_increases() {
    let mut rng = rng("kmeans inertia_never_increases");
    for case in 0..6 {
        let (n, dim, k) = (1500 + 300 * case, 2 + 3 * case, 5 + 7 * case);
        let points = data(&mut rng, n * dim, case % 3 == 2);
        for init in [KMeansInit::Random, KMeansInit::PlusPlus] {
            let cfg = KMeansConfig { k, init, seed: rng.random(), restarts: 2, ..KMeansConfig::new(k) };
            let res = kmeans::fit(&points, dim, &cfg).unwrap();
            assert!(res.inertia_per_iteration.len() <= cfg.iterations + 1);
            assert_non_increasing(&format!("fit n={n} dim={dim} k={k} {init:?}"), &res.inertia_per_iteration);
        }
        // From poor starts: all centroids at one point (k - 1 empty clusters to re-seed).
        let p = rng.random_range(0..n);
        let init: Vec<f32> = (0..k).flat_map(|_| points[p * dim..(p + 1) * dim].to_vec()).collect();
        let run = kmeans::lloyd(&points, dim, &init, 15).unwrap();
        assert_non_increasing(&format!("lloyd from one point, n={n} dim={dim} k={k}"), &run.inertia_per_iteration);
        assert!(run.inertia_per_iteration.last() < run.inertia_per_iteration.first());
    }
}

#[test]
fn ties_go_to_the_lowest_index() {
    // Exactly representable ties: c0 and c2 coincide; (0, 0) is equidistant from all three.
    let centroids = [1.0f32, 0.0, -1.0, 0.0, 1.0, 0.0];
    let points = [0.0f32, 0.0, 0.5, 0.0, -0.5, 0.0, 3.0, 4.0, 1.0, 0.0];
    let (ids, d) = kmeans::assign(&points, 2, &centroids).unwrap();
    assert_eq!(ids, vec![0, 0, 1, 0, 0]);
    assert_eq!(d, vec![1.0, 0.25, 0.25, 20.0, 0.0]);
    // Every centroid the same: id 0 everywhere.
    let mut rng = rng("kmeans ties_go_to_the_lowest_index");
    let dim = 33;
    let c0 = uniform(&mut rng, dim, 1.0);
    let same: Vec<f32> = (0..50).flat_map(|_| c0.clone()).collect();
    let pts = uniform(&mut rng, 200 * dim, 1.0);
    assert!(kmeans::assign(&pts, dim, &same).unwrap().0.iter().all(|&i| i == 0));
    // Duplicates among many distinct centroids (the GEMM path): the later copy never wins.
    let (k, dim) = (400, 64);
    let mut c = uniform(&mut rng, k * dim, 1.0);
    let copies: Vec<(usize, usize)> =
        (0..40).map(|_| (rng.random_range(0..k / 2), rng.random_range(k / 2..k))).collect();
    for &(a, b) in &copies {
        c.copy_within(a * dim..(a + 1) * dim, b * dim);
    }
    let mut pts = uniform(&mut rng, 2000 * dim, 1.0);
    // Some points sit exactly on a duplicated centroid.
    for (i, &(a, _)) in copies.iter().enumerate() {
        pts[i * dim..(i + 1) * dim].copy_from_slice(&c[a * dim..(a + 1) * dim]);
    }
    let (ids, _) = kmeans::assign(&pts, dim, &c).unwrap();
    let row = |j: usize| &c[j * dim..(j + 1) * dim];
    let lowest_copy = |j: usize| (0..=j).find(|&i| row(i) == row(j)).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(lowest_copy(id as usize), id as usize, "point {i}: centroid {id} has an identical one before it");
    }
    for (i, &(a, _)) in copies.iter().enumerate() {
        assert_eq!(ids[i] as usize, lowest_copy(a), "point {i} sits on centroid {a}");
    }
}

#[test]
fn fit_is_deterministic_and_consistent() {
    let mut rng = rng("kmeans fit_is_deterministic_and_consistent");
    let (n, dim, k) = (3000, 10, 12);
    let points = data(&mut rng, n * dim, false);
    for (mpc, init) in [(512, KMeansInit::PlusPlus), (40, KMeansInit::Random)] {
        let cfg =
            KMeansConfig { k, max_points_per_centroid: mpc, init, seed: rng.random(), iterations: 8, restarts: 3 };
        let a = kmeans::fit(&points, dim, &cfg).unwrap();
        let b = kmeans::fit(&points, dim, &cfg).unwrap();
        assert_eq!(a, b, "same config, same result");
        assert_eq!(a.sample_size, n.min(k * mpc));
        assert_eq!(a.centroids.len(), k * dim);
        assert_eq!(a.restart_inertia.len(), 3);
        let min = a.restart_inertia.iter().cloned().fold(f64::INFINITY, f64::min);
        assert_eq!(a.best_restart, a.restart_inertia.iter().position(|&v| v == min).unwrap());
        assert_eq!(a.inertia(), a.restart_inertia[a.best_restart]);
        if a.sample_size == n {
            // The final inertia is that of the final centroids over all points.
            let (_, d) = kmeans::assign(&points, dim, &a.centroids).unwrap();
            let total: f64 = d.iter().map(|&v| v as f64).sum();
            assert!((total - a.inertia()).abs() <= 1e-6 * a.inertia(), "{total} vs {}", a.inertia());
        }
        let c = kmeans::fit(&points, dim, &KMeansConfig { seed: cfg.seed ^ 1, ..cfg.clone() }).unwrap();
        assert_ne!(a.centroids, c.centroids, "another seed, other centroids");
    }
}

// ------------------------------------------------------------------------------ Gaussian clusters

/// `k` well-separated Gaussian clusters (centres at least 40 sigma apart), shuffled; returns the
/// points and the true labels.
fn gaussian_clusters(rng: &mut ChaCha8Rng, k: usize, per: usize, dim: usize) -> (Vec<f32>, Vec<usize>) {
    let centres = loop {
        let c = uniform(rng, k * dim, 100.0);
        let separated = (0..k)
            .all(|a| (0..a).all(|b| direct(&c[a * dim..(a + 1) * dim], &c[b * dim..(b + 1) * dim]) > 40.0 * 40.0));
        if separated {
            break c;
        }
    };
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let mut order: Vec<usize> = (0..k * per).collect();
    order.shuffle(rng);
    let mut points = Vec::with_capacity(k * per * dim);
    let mut labels = Vec::with_capacity(k * per);
    for &i in &order {
        let label = i / per;
        labels.push(label);
        points.extend((0..dim).map(|d| centres[label * dim + d] + normal.sample(rng)));
    }
    (points, labels)
}

/// `ids` equal `labels` up to a relabelling (a bijection).
fn assert_same_partition(what: &str, ids: &[u32], labels: &[usize], k: usize) {
    let mut map = vec![None; k];
    let mut used = vec![false; k];
    for (&id, &label) in ids.iter().zip(labels) {
        match map[label] {
            None => {
                assert!(!used[id as usize], "{what}: centroid {id} takes two clusters");
                map[label] = Some(id);
                used[id as usize] = true;
            }
            Some(m) => assert_eq!(m, id, "{what}: cluster {label} is split"),
        }
    }
}

#[test]
fn recovers_gaussian_clusters() {
    let mut rng = rng("kmeans recovers_gaussian_clusters");
    let (k, per, dim) = (8, 150, 16);
    let (points, labels) = gaussian_clusters(&mut rng, k, per, dim);
    for mpc in [512, 30] {
        let cfg = KMeansConfig {
            k,
            init: KMeansInit::PlusPlus,
            max_points_per_centroid: mpc,
            seed: rng.random(),
            ..KMeansConfig::new(k)
        };
        let res = kmeans::fit(&points, dim, &cfg).unwrap();
        let (ids, d) = kmeans::assign(&points, dim, &res.centroids).unwrap();
        assert_same_partition(&format!("max {mpc} points per centroid"), &ids, &labels, k);
        let r = kmeans::report(&ids, k, &d).unwrap();
        assert_eq!(r.usage, 1.0);
        assert!((r.perplexity - k as f64).abs() < 1e-9, "{r:?}");
        // Within-cluster squared distance: about dim * sigma^2.
        assert!(r.mean_sq_dist > 0.7 * dim as f64 && r.mean_sq_dist < 1.3 * dim as f64, "{r:?}");
    }
}

// ------------------------------------------------------------------------------ report, bad input

#[test]
fn report_known_values() {
    let r = kmeans::report(&[0, 0, 1, 1], 4, &[1.0, 2.0, 3.0, 6.0]).unwrap();
    assert_eq!(r.usage, 0.5);
    assert!((r.perplexity - 2.0).abs() < 1e-12);
    assert_eq!(r.mean_sq_dist, 3.0);
    let r = kmeans::report(&[3, 3, 3], 4, &[0.5; 3]).unwrap();
    assert_eq!((r.usage, r.perplexity, r.mean_sq_dist), (0.25, 1.0, 0.5));
    // Perplexity of a skewed histogram: p = (1/2, 1/4, 1/4) gives exp(1.5 ln 2).
    let r = kmeans::report(&[0, 0, 1, 2], 3, &[0.0; 4]).unwrap();
    assert!((r.perplexity - (1.5 * 2f64.ln()).exp()).abs() < 1e-12);
    assert!(kmeans::report(&[0, 4], 4, &[0.0; 2]).is_err());
    assert!(kmeans::report(&[0, 1], 4, &[0.0; 3]).is_err());
    assert!(kmeans::report(&[], 4, &[]).is_err());
    assert!(kmeans::report(&[0], 0, &[0.0]).is_err());
}

fn is_unsupported<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Unsupported { .. }))
}

fn is_shape<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Shape { .. }))
}

#[test]
fn bad_input_is_an_error() {
    let mut rng = rng("kmeans bad_input_is_an_error");
    let dim = 4;
    let points = uniform(&mut rng, 10 * dim, 1.0);
    let cfg = KMeansConfig::new(3);
    assert!(kmeans::fit(&points, dim, &cfg).is_ok());
    assert!(is_unsupported(kmeans::fit(&points, dim, &KMeansConfig::new(0))), "k = 0");
    assert!(is_unsupported(kmeans::fit(&points, dim, &KMeansConfig::new(11))), "k > points");
    assert!(kmeans::fit(&points, dim, &KMeansConfig::new(10)).is_ok(), "k = points");
    assert!(is_shape(kmeans::fit(&points, 3, &cfg)), "len not a multiple of dim");
    assert!(is_unsupported(kmeans::fit(&points, 0, &cfg)), "dim = 0");
    assert!(is_unsupported(kmeans::fit(&points, dim, &KMeansConfig { restarts: 0, ..cfg.clone() })));
    assert!(is_unsupported(kmeans::fit(&points, dim, &KMeansConfig { max_points_per_centroid: 0, ..cfg.clone() })));
    let mut bad = points.clone();
    bad[7] = f32::NAN;
    assert!(is_unsupported(kmeans::fit(&bad, dim, &cfg)), "NaN");
    bad[7] = f32::INFINITY;
    assert!(is_unsupported(kmeans::assign(&bad, dim, &points[..dim])), "inf");

    assert!(is_shape(kmeans::assign(&points, dim, &points[..dim + 1])), "centroid dim mismatch");
    assert!(is_unsupported(kmeans::assign(&points, dim, &[])), "no centroid");
    assert!(is_unsupported(kmeans::lloyd(&points[..2 * dim], dim, &points[..3 * dim], 3)), "k > points");
    let mut c = points[..3 * dim].to_vec();
    assert!(is_unsupported(kmeans::update(&points, dim, &[3; 10], &mut c)), "id >= k");
    assert!(is_shape(kmeans::update(&points, dim, &[0; 9], &mut c)), "ids length");
    assert_eq!(c, points[..3 * dim], "a failed update leaves the centroids alone");
}

// ------------------------------------------------------------------------------ GPU

fn gpu_and_gemm(test: &str) -> Option<(Gpu, Gemm)> {
    let gpu = gpu_or_skip(test)?;
    let gemm = Gemm::new(&gpu).expect("cuBLASLt");
    Some((gpu, gemm))
}

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

/// Runs the GPU assignment with poisoned outputs; checks every output was written.
fn gpu_assign(gpu: &Gpu, gemm: &Gemm, points: &[f32], dim: usize, centroids: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let n = points.len() / dim;
    let k = centroids.len() / dim;
    let dp = gpu.upload_bf16(points).unwrap();
    let dc = gpu.upload_bf16(centroids).unwrap();
    let mut ids = gpu.alloc::<u32>(n).unwrap();
    let mut sq = gpu.alloc::<f32>(n).unwrap();
    ids.poison().unwrap();
    sq.poison().unwrap();
    kmeans::cuda_assign(gpu, gemm, &dp, dim, &dc, &mut ids, &mut sq).unwrap();
    let ids = ids.to_host().unwrap();
    let sq = sq.to_host().unwrap();
    assert_all_written("sq_dists", &sq);
    assert!(ids.iter().all(|&i| (i as usize) < k), "an id was not written or is out of range");
    (ids, sq)
}

/// GPU ids equal the CPU's exact ones (on the same bf16-rounded values) except at near-ties, where
/// the GPU's choice must be within the f32 rounding of the expansion of the best distance.
#[test]
fn gpu_assign_matches_cpu_except_near_ties() {
    let Some((gpu, gemm)) = gpu_and_gemm("kmeans gpu_assign_matches_cpu_except_near_ties") else { return };
    let mut rng = rng("kmeans gpu_assign_matches_cpu_except_near_ties");
    // (n, k, dim): odd sizes, k % 4 != 0 (scalar score loads), dim % 8 != 0 (scalar row loads),
    // and k = 8192, where 5000 points take three chunks of scores (the last one partial).
    for &(n, k, dim) in &[(1000, 37, 20), (777, 256, 129), (300, 10, 8), (5000, 8192, 64), (1, 1, 1)] {
        let points = uniform_bf16(&mut rng, n * dim, 1.0);
        let centroids = uniform_bf16(&mut rng, k * dim, 1.0);
        let (ids, sq) = gpu_assign(&gpu, &gemm, &points, dim, &centroids);
        let (want_ids, want_sq) = kmeans::assign(&points, dim, &centroids).unwrap();
        let u = (-24f64).exp2();
        let gamma = dim as f64 * u / (1.0 - dim as f64 * u);
        let c_max = centroids.chunks(dim).map(norm).fold(0.0, f64::max);
        let mut mismatches = 0;
        let mut worst_sq = 0.0f64;
        for i in 0..n {
            let x = &points[i * dim..(i + 1) * dim];
            let xn = norm(x);
            // Rounding of two expanded distances: dot products, |c|^2 and the final fma.
            let tol = 2.0 * (2.0 * gamma * xn * c_max + gamma * c_max * c_max + u * (c_max * c_max + 2.0 * xn * c_max))
                + 1e-30;
            if ids[i] != want_ids[i] {
                mismatches += 1;
                let j = ids[i] as usize;
                let d_gpu = direct(x, &centroids[j * dim..(j + 1) * dim]);
                let gap = d_gpu - want_sq[i] as f64;
                assert!(
                    gap <= tol * 1.01 + 1e-6 * want_sq[i] as f64,
                    "n={n} k={k} dim={dim} point {i}: gpu id {j} is {gap:.3e} farther than {} (tolerance {tol:.3e})",
                    want_ids[i]
                );
            }
            let err = (sq[i] as f64 - want_sq[i] as f64).abs();
            let tol_sq = tol + 2.0 * gamma * xn * xn + u * (xn * xn + want_sq[i] as f64) + 1e-6;
            worst_sq = worst_sq.max(err / tol_sq);
            assert!(
                err <= tol_sq,
                "n={n} k={k} dim={dim} point {i}: sq dist {} vs {} (tolerance {tol_sq:.3e})",
                sq[i],
                want_sq[i]
            );
        }
        eprintln!(
            "n={n} k={k} dim={dim}: {mismatches} near-tie mismatches, worst sq-dist error {worst_sq:.3} of its bound"
        );
        assert!(mismatches <= 3 + n / 100, "too many mismatches: {mismatches} of {n}");
    }
}

/// On small integers every GPU operation is exact, so ids (ties included) and distances must
/// equal the CPU's exactly.
#[test]
fn gpu_assign_exact_on_integer_data() {
    let Some((gpu, gemm)) = gpu_and_gemm("kmeans gpu_assign_exact_on_integer_data") else { return };
    let mut rng = rng("kmeans gpu_assign_exact_on_integer_data");
    for &(n, k, dim) in &[(2000, 64, 24), (999, 333, 7)] {
        let points = data(&mut rng, n * dim, true);
        let centroids = centroids_from(&mut rng, &points, dim, k, true, 0.0);
        let (ids, sq) = gpu_assign(&gpu, &gemm, &points, dim, &centroids);
        let (want_ids, want_sq) = kmeans::assign(&points, dim, &centroids).unwrap();
        assert_eq!(ids, want_ids, "n={n} k={k} dim={dim}");
        assert_eq!(sq, want_sq, "n={n} k={k} dim={dim}");
    }
}

/// Runs the GPU update on poisoned centroid buffers; returns counts, f32 and bf16 centroids.
fn gpu_update(gpu: &Gpu, points: &[f32], dim: usize, ids: &[u32], k: usize) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let dp = gpu.upload_bf16(points).unwrap();
    let di = gpu.upload(ids).unwrap();
    let mut c = gpu.alloc::<f32>(k * dim).unwrap();
    let mut cb = gpu.alloc::<half::bf16>(k * dim).unwrap();
    c.poison().unwrap();
    cb.poison().unwrap();
    let counts = kmeans::cuda_update(gpu, &dp, dim, &di, &mut c, &mut cb).unwrap();
    (counts, c.to_host().unwrap(), cb.to_host_f32().unwrap())
}

/// Ids with the given cluster sizes, shuffled.
fn ids_with_sizes(rng: &mut ChaCha8Rng, sizes: &[usize]) -> Vec<u32> {
    let mut ids: Vec<u32> = sizes.iter().enumerate().flat_map(|(j, &s)| std::iter::repeat_n(j as u32, s)).collect();
    ids.shuffle(rng);
    ids
}

#[test]
fn gpu_update_matches_cpu() {
    let Some(gpu) = gpu_or_skip("kmeans gpu_update_matches_cpu") else { return };
    let mut rng = rng("kmeans gpu_update_matches_cpu");
    let mut cases: Vec<(usize, Vec<usize>)> = vec![
        // One point; a single cluster spanning five pieces from position 0 (head slots); a
        // cluster starting inside the first piece and spanning four (tail slot, then heads).
        (5, vec![1]),
        (1, vec![0, 5000, 0]),
        (300, vec![500, 4000, 500]),
        (1, vec![3000; 4]),
    ];
    // Skewed random sizes with empty clusters: one giant cluster, many small ones, some empty.
    let mut sizes: Vec<usize> = (0..300).map(|j| if j % 7 == 3 { 0 } else { rng.random_range(1..120) }).collect();
    sizes[11] = 8000;
    cases.push((257, sizes));
    for (dim, sizes) in cases {
        let k = sizes.len();
        let ids = ids_with_sizes(&mut rng, &sizes);
        let n = ids.len();
        let points = uniform_bf16(&mut rng, n * dim, 1.0);
        let (counts, got, got_bf16) = gpu_update(&gpu, &points, dim, &ids, k);
        let want_counts: Vec<u32> = sizes.iter().map(|&s| s as u32).collect();
        assert_eq!(counts, want_counts, "counts, dim={dim}, sizes {:?}", &sizes[..sizes.len().min(8)]);
        // Truth: f64 means; baseline: f32 running sums in point order; both over bf16 values.
        let mut truth = vec![0.0f64; k * dim];
        let mut base = vec![0.0f32; k * dim];
        for (x, &id) in points.chunks(dim).zip(&ids) {
            for d in 0..dim {
                truth[id as usize * dim + d] += x[d] as f64;
                base[id as usize * dim + d] += x[d];
            }
        }
        let (mut g, mut b, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for (j, &size) in sizes.iter().enumerate() {
            let row = j * dim..(j + 1) * dim;
            if size == 0 {
                assert!(got[row.clone()].iter().all(|v| v.is_nan()), "empty cluster {j} was written");
                assert!(got_bf16[row].iter().all(|v| v.is_nan()), "empty cluster {j} was written (bf16)");
                continue;
            }
            let c = size as f64;
            for d in row {
                g.push(got[d]);
                b.push((base[d] as f64 / c) as f32);
                t.push(truth[d] / c);
                assert_eq!(got_bf16[d], half::bf16::from_f32(got[d]).to_f32(), "bf16 copy of cluster {j}");
            }
        }
        assert_within_baseline(&format!("means, dim={dim}, k={k}, n={n}"), &g, &b, &t, 2.0, 1e-6);
    }
}

#[test]
fn gpu_update_is_deterministic_and_checks_ids() {
    let Some(gpu) = gpu_or_skip("kmeans gpu_update_is_deterministic_and_checks_ids") else { return };
    let mut rng = rng("kmeans gpu_update_is_deterministic_and_checks_ids");
    let (n, k, dim) = (50_000, 100, 64);
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..k as u32 / 2) * 2).collect();
    let points = uniform_bf16(&mut rng, n * dim, 1.0);
    let a = gpu_update(&gpu, &points, dim, &ids, k);
    for _ in 0..3 {
        let b = gpu_update(&gpu, &points, dim, &ids, k);
        assert!(a.1.iter().zip(&b.1).all(|(x, y)| x.to_bits() == y.to_bits()), "run-to-run difference");
    }
    let mut bad = ids.clone();
    bad[n / 3] = k as u32;
    let dp = gpu.upload_bf16(&points).unwrap();
    let di = gpu.upload(&bad).unwrap();
    let mut c = gpu.alloc::<f32>(k * dim).unwrap();
    let mut cb = gpu.alloc::<half::bf16>(k * dim).unwrap();
    assert!(is_unsupported(kmeans::cuda_update(&gpu, &dp, dim, &di, &mut c, &mut cb)), "id = k must be refused");
    assert!(is_shape(kmeans::cuda_update(&gpu, &dp, dim + 1, &di, &mut c, &mut cb)), "dim mismatch");
}

#[test]
fn gpu_fit_matches_cpu_fit() {
    let Some((gpu, gemm)) = gpu_and_gemm("kmeans gpu_fit_matches_cpu_fit") else { return };
    let mut rng = rng("kmeans gpu_fit_matches_cpu_fit");
    // Well-separated clusters: both recover them, with the same inertia up to rounding.
    let (k, per, dim) = (8, 150, 16);
    let (mut points, labels) = gaussian_clusters(&mut rng, k, per, dim);
    mapet::cpu::round_bf16(&mut points);
    let dp = gpu.upload_bf16(&points).unwrap();
    for mpc in [512, 30] {
        let cfg = KMeansConfig {
            k,
            init: KMeansInit::PlusPlus,
            max_points_per_centroid: mpc,
            seed: rng.random(),
            ..KMeansConfig::new(k)
        };
        let cpu = kmeans::fit(&points, dim, &cfg).unwrap();
        let gpu_res = kmeans::cuda_fit(&gpu, &gemm, &dp, dim, &cfg).unwrap();
        assert_eq!(gpu_res.sample_size, cpu.sample_size);
        let (ids, _) = kmeans::assign(&points, dim, &gpu_res.centroids).unwrap();
        assert_same_partition(&format!("gpu fit, max {mpc} per centroid"), &ids, &labels, k);
        // The GPU measures distances to the bf16 copy of its centroids (the one its GEMM reads).
        // With one partition, each centroid is the mean c of its sample points, and for any point
        // c' the sum over them of |x - c'|^2 is the sum of |x - c|^2 plus count * |c - c'|^2. So
        // the GPU's inertia is the CPU's plus each cluster's count times the squared distance
        // from its f32 mean to that mean's bf16 rounding: with centres up to 100 from the origin
        // that term is near 1% of the inertia, a hundred times the rounding left over here.
        let sample: Vec<f32> = kmeans::sample_indices(points.len() / dim, &cfg)
            .iter()
            .flat_map(|&i| points[i as usize * dim..(i as usize + 1) * dim].iter().copied())
            .collect();
        let (sample_ids, _) = kmeans::assign(&sample, dim, &gpu_res.centroids).unwrap();
        let mut bf16_shift = 0.0f64;
        for (j, c) in gpu_res.centroids.chunks(dim).enumerate() {
            let count = sample_ids.iter().filter(|&&i| i as usize == j).count() as f64;
            let d2: f64 = c.iter().map(|&v| (v as f64 - half::bf16::from_f32(v).to_f64()).powi(2)).sum();
            bf16_shift += count * d2;
        }
        let expected = cpu.inertia() + bf16_shift;
        let rel = (gpu_res.inertia() - expected).abs() / expected;
        eprintln!(
            "max {mpc} per centroid: inertia gpu {} cpu {} + bf16 centroid shift {bf16_shift} (rel {rel:.2e})",
            gpu_res.inertia(),
            cpu.inertia()
        );
        assert!(rel < 1e-3, "max {mpc} per centroid: gpu inertia {} != {expected}", gpu_res.inertia());
    }
    // Random data, random starts: the same sample and initial centroids (entry 0 agrees), and a
    // final inertia close to the CPU's.
    let (n, dim, k) = (20_000, 32, 64);
    let points = uniform_bf16(&mut rng, n * dim, 1.0);
    let dp = gpu.upload_bf16(&points).unwrap();
    let cfg = KMeansConfig {
        k,
        max_points_per_centroid: 100,
        iterations: 10,
        restarts: 2,
        seed: rng.random(),
        ..KMeansConfig::new(k)
    };
    let cpu = kmeans::fit(&points, dim, &cfg).unwrap();
    let g = kmeans::cuda_fit(&gpu, &gemm, &dp, dim, &cfg).unwrap();
    let rel0 = (g.inertia_per_iteration[0] - cpu.inertia_per_iteration[0]).abs() / cpu.inertia_per_iteration[0];
    let rel = (g.inertia() - cpu.inertia()).abs() / cpu.inertia();
    eprintln!(
        "random data: initial inertia rel diff {rel0:.2e}, final gpu {} cpu {} (rel {rel:.2e})",
        g.inertia(),
        cpu.inertia()
    );
    if cpu.best_restart == g.best_restart {
        assert!(rel0 < 1e-4, "the initial centroids differ");
    }
    assert!(rel < 0.05, "final inertia differs by {rel:.2e}");
}

/// The paper's scale: 2^20 points of dim 768 and k = 8192 (512 chunks of scores, 512 count
/// tiles, 1024 pieces). Sampled points (the first and last, both sides of some chunk boundaries)
/// are checked against the CPU assignment; the update's counts against the GPU ids, and the means
/// of a sample of clusters against sums over all points; every non-empty cluster must be written
/// and no empty one.
#[test]
fn gpu_assign_and_update_at_scale() {
    let test = "kmeans gpu_assign_and_update_at_scale";
    let Some((gpu, gemm)) = gpu_and_gemm(test) else { return };
    let mut rng = rng(test);
    let (n, k, dim) = (1usize << 20, 8192usize, 768usize);
    let points = uniform_bf16(&mut rng, n * dim, 1.0);
    let centroids = uniform_bf16(&mut rng, k * dim, 1.0);
    let dp = gpu.upload_bf16(&points).unwrap();
    let dc = gpu.upload_bf16(&centroids).unwrap();
    let mut d_ids = gpu.alloc::<u32>(n).unwrap();
    let mut d_sq = gpu.alloc::<f32>(n).unwrap();
    d_ids.poison().unwrap();
    d_sq.poison().unwrap();
    kmeans::cuda_assign(&gpu, &gemm, &dp, dim, &dc, &mut d_ids, &mut d_sq).unwrap();
    let ids = d_ids.to_host().unwrap();
    let sq = d_sq.to_host().unwrap();
    assert_all_written("sq_dists", &sq);
    assert!(ids.iter().all(|&i| (i as usize) < k), "an id was not written or is out of range");

    // Assignment of sampled points against the CPU (same tolerance as the small cases).
    let chunk = kmeans::GPU_SCORE_BYTES / (4 * k);
    let mut sample: Vec<usize> = vec![0, n - 1, chunk - 1, chunk, 100 * chunk - 1, 100 * chunk];
    while sample.len() < 96 {
        sample.push(rng.random_range(0..n));
    }
    let sub: Vec<f32> = sample.iter().flat_map(|&i| points[i * dim..(i + 1) * dim].iter().copied()).collect();
    let (want_ids, want_sq) = kmeans::assign(&sub, dim, &centroids).unwrap();
    let u = (-24f64).exp2();
    let gamma = dim as f64 * u / (1.0 - dim as f64 * u);
    let c_max = centroids.chunks(dim).map(norm).fold(0.0, f64::max);
    for (s, &i) in sample.iter().enumerate() {
        let x = &points[i * dim..(i + 1) * dim];
        let xn = norm(x);
        let tol =
            2.0 * (2.0 * gamma * xn * c_max + gamma * c_max * c_max + u * (c_max * c_max + 2.0 * xn * c_max)) + 1e-30;
        if ids[i] != want_ids[s] {
            let j = ids[i] as usize;
            let gap = direct(x, &centroids[j * dim..(j + 1) * dim]) - want_sq[s] as f64;
            assert!(gap <= tol * 1.01 + 1e-6 * want_sq[s] as f64, "point {i}: gpu id {j} is {gap:.3e} farther");
        }
        let tol_sq = tol + 2.0 * gamma * xn * xn + u * (xn * xn + want_sq[s] as f64) + 1e-6;
        assert!((sq[i] as f64 - want_sq[s] as f64).abs() <= tol_sq, "point {i}: sq dist {} vs {}", sq[i], want_sq[s]);
    }

    // Update with the GPU's ids.
    let mut c = gpu.alloc::<f32>(k * dim).unwrap();
    let mut cb = gpu.alloc::<half::bf16>(k * dim).unwrap();
    c.poison().unwrap();
    cb.poison().unwrap();
    let counts = kmeans::cuda_update(&gpu, &dp, dim, &d_ids, &mut c, &mut cb).unwrap();
    let got = c.to_host().unwrap();
    let mut want_counts = vec![0u32; k];
    for &id in &ids {
        want_counts[id as usize] += 1;
    }
    assert_eq!(counts, want_counts, "counts");
    for j in 0..k {
        let row = &got[j * dim..(j + 1) * dim];
        if counts[j] == 0 {
            assert!(row.iter().all(|v| v.is_nan()), "empty cluster {j} was written");
        } else {
            assert_all_written(&format!("centroid {j}"), row);
        }
    }
    let mut chosen: Vec<usize> = (0..k).filter(|&j| counts[j] > 0).collect();
    chosen.shuffle(&mut rng);
    chosen.truncate(24);
    let biggest = (0..k).max_by_key(|&j| counts[j]).unwrap();
    if !chosen.contains(&biggest) {
        chosen.push(biggest);
    }
    let mut slot = vec![usize::MAX; k];
    for (s, &j) in chosen.iter().enumerate() {
        slot[j] = s;
    }
    let mut truth = vec![0.0f64; chosen.len() * dim];
    let mut base = vec![0.0f32; chosen.len() * dim];
    for (x, &id) in points.chunks(dim).zip(&ids) {
        let s = slot[id as usize];
        if s != usize::MAX {
            for d in 0..dim {
                truth[s * dim + d] += x[d] as f64;
                base[s * dim + d] += x[d];
            }
        }
    }
    let (mut g, mut b, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for (s, &j) in chosen.iter().enumerate() {
        let cnt = counts[j] as f64;
        for d in 0..dim {
            g.push(got[j * dim + d]);
            b.push((base[s * dim + d] as f64 / cnt) as f32);
            t.push(truth[s * dim + d] / cnt);
        }
    }
    assert_within_baseline(&format!("{test}: means"), &g, &b, &t, 2.0, 1e-6);
}
