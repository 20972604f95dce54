//! `mapet tokenize` on a handful of small generated images: the token file's shape, dtype and
//! range; ids that are the nearest centroid of each patch's pixels in index order; the same ids
//! again when labelling with the saved centroids; external features; streaming (pixels and
//! external features, any chunk size) giving exactly the whole-set result; errors naming the flag
//! or file; on a GPU, the same tokenization as the CPU's but for near-ties.

mod data_common;

use std::io::Write;
use std::path::{Path, PathBuf};

use mapet_trainer::cmd::tokenize;
use mapet_trainer::data::{read_npy, ImageIndex, NpyData, NpyDtype};
use mapet_trainer::tokenize::{
    fit_and_assign, load_centroids, pixel_features, tokenize_features, tokenize_pixels, Codebook, KMeansDevice,
    NpyFeatures,
};
use rand::Rng;

/// `mapet tokenize ARGS` on the CPU (the exact reference these tests check against) unless ARGS
/// name a device.
fn run(args: &[&str]) -> Result<(), String> {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if !args.iter().any(|a| a == "--device") {
        args.extend(["--device".to_string(), "cpu".to_string()]);
    }
    tokenize::run(&args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `n` small random images `img_{i}.jpg` in `dir`; returns their paths.
fn images(dir: &Path, n: usize, rng: &mut impl Rng) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("img_{i}.jpg"));
            let (w, h) = (rng.random_range(32..60), rng.random_range(32..60));
            data_common::write_jpeg(&path, &data_common::smooth_rgb(rng, w, h));
            path
        })
        .collect()
}

fn ids(path: &Path) -> (Vec<usize>, NpyDtype, Vec<i64>) {
    let a = read_npy(path).unwrap();
    let v = (0..a.data.len()).map(|i| a.data.get(i)).collect();
    (a.shape, a.data.dtype(), v)
}

/// A `.npy` of f32 `[shape]`, written by hand (version 1, header padded to 64 bytes).
fn write_f32_npy(path: &Path, shape: &[usize], values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy_bytes(path, "<f4", shape, &bytes);
}

/// The same as f64 (`<f8`).
fn write_f64_npy(path: &Path, shape: &[usize], values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
    write_npy_bytes(path, "<f8", shape, &bytes);
}

fn write_npy_bytes(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}), }}", dims.join(", "));
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    f.write_all(data).unwrap();
}

#[test]
fn pixel_tokens_are_nearest_centroids_in_index_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("cmd_tokenize_pixels");
    let train = dir.path().join("train");
    let paths = images(&train, 6, &mut rng);
    let out = dir.path().join("out").join("tok.npy");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let common = ["--image", "32", "--patch", "8", "--iterations", "5", "--restarts", "2", "--seed", "3"];
    let mut a = vec!["--data", s(&train), "--out", s(&out), "--k", "8"];
    a.extend(common);
    run(&a).unwrap();

    let (shape, dtype, got) = ids(&out);
    assert_eq!(shape, [6, 16]);
    assert_eq!(dtype, NpyDtype::I16);
    assert!(got.iter().all(|&i| (0..8).contains(&i)), "ids outside [0, 8)");
    let centroids_path = dir.path().join("out").join("tok.centroids.safetensors");
    let (c, k, dim) = load_centroids(&centroids_path).unwrap();
    assert_eq!((k, dim), (8, 192));
    let report = std::fs::read_to_string(dir.path().join("out").join("tok.report.json")).unwrap();
    for key in ["\"usage\"", "\"perplexity\"", "\"mean_sq_dist\"", "\"inertia_per_iteration\": [", "\"k\": 8"] {
        assert!(report.contains(key), "report lacks {key}:\n{report}");
    }

    // Each id is the nearest centroid (direct distances) of that patch of that image, in index order.
    let index = ImageIndex::from_folder(&train).unwrap();
    let feats = pixel_features(&index, 32, 8).unwrap();
    for (row, (f, &id)) in feats.chunks_exact(dim).zip(&got).enumerate() {
        let d2 = |j: usize| -> f64 { f.iter().zip(&c[j * dim..]).map(|(a, b)| ((a - b) as f64).powi(2)).sum() };
        let best = (0..k).min_by(|&a, &b| d2(a).total_cmp(&d2(b))).unwrap();
        assert_eq!(id as usize, best, "image {}, patch {}", row / 16, row % 16);
    }

    // Labelling with the saved centroids gives the same ids for the same images, whatever the set:
    // two of the images, in another order and under other names.
    let eval = dir.path().join("eval");
    std::fs::create_dir_all(&eval).unwrap();
    std::fs::copy(&paths[4], eval.join("a.jpg")).unwrap();
    std::fs::copy(&paths[1], eval.join("b.jpg")).unwrap();
    let out2 = dir.path().join("eval_tok.npy");
    let mut a = vec!["--data", s(&eval), "--out", s(&out2), "--centroids", s(&centroids_path)];
    a.extend(common);
    run(&a).unwrap();
    let (shape2, _, got2) = ids(&out2);
    assert_eq!(shape2, [2, 16]);
    assert_eq!(&got2[..16], &got[4 * 16..5 * 16]);
    assert_eq!(&got2[16..], &got[16..32]);
    // The same set with the saved centroids reproduces the whole file.
    let out3 = dir.path().join("again.npy");
    let mut a = vec!["--data", s(&train), "--out", s(&out3), "--centroids", s(&centroids_path)];
    a.extend(common);
    run(&a).unwrap();
    assert_eq!(ids(&out3).2, got);
    let report3 = std::fs::read_to_string(dir.path().join("again.report.json")).unwrap();
    assert!(report3.contains("\"centroids_from\": \""), "{report3}");
}

#[test]
fn external_features_are_clustered_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("cmd_tokenize_features");
    let data = dir.path().join("imgs");
    images(&data, 5, &mut rng);
    let feats = dir.path().join("feats.npy");
    let values = mapet::testing::uniform(&mut rng, 5 * 4 * 3, 1.0);
    write_f32_npy(&feats, &[5, 4, 3], &values);
    let out = dir.path().join("t.npy");
    let base = ["--data", s(&data), "--out", s(&out), "--image", "16", "--patch", "8", "--k", "4"];
    let mut a = base.to_vec();
    a.extend(["--features", s(&feats), "--restarts", "1"]);
    run(&a).unwrap();
    let (shape, dtype, got) = ids(&out);
    assert_eq!((shape, dtype), (vec![5, 4], NpyDtype::I16));
    assert!(got.iter().all(|&i| (0..4).contains(&i)));
    let (c, k, dim) = load_centroids(&dir.path().join("t.centroids.safetensors")).unwrap();
    assert_eq!((k, dim), (4, 3));
    for (f, &id) in values.chunks_exact(3).zip(&got) {
        let d2 = |j: usize| -> f64 { f.iter().zip(&c[j * 3..]).map(|(a, b)| ((a - b) as f64).powi(2)).sum() };
        assert_eq!(id as usize, (0..k).min_by(|&a, &b| d2(a).total_cmp(&d2(b))).unwrap());
    }

    // The same values as float64 give the same tokens.
    let feats64 = dir.path().join("feats64.npy");
    write_f64_npy(&feats64, &[5, 4, 3], &values);
    let out64 = dir.path().join("t64.npy");
    let mut a = base.to_vec();
    a[3] = s(&out64);
    a.extend(["--features", s(&feats64), "--restarts", "1"]);
    run(&a).unwrap();
    assert_eq!(ids(&out64).2, got);
    // A truncated file.
    let cut = dir.path().join("cut.npy");
    let full = std::fs::read(&feats).unwrap();
    std::fs::write(&cut, &full[..full.len() - 4]).unwrap();
    let mut a = base.to_vec();
    a.extend(["--features", s(&cut)]);
    let e = run(&a).unwrap_err();
    assert!(e.starts_with(&format!("--features {}: truncated data", s(&cut))) && e.contains("bytes"), "{e}");
    // A non-finite value names the image, patch and feature.
    let nan = dir.path().join("nan.npy");
    let mut bad = values.clone();
    bad[(3 * 4 + 1) * 3 + 2] = f32::NAN;
    write_f32_npy(&nan, &[5, 4, 3], &bad);
    let mut a = base.to_vec();
    a.extend(["--features", s(&nan)]);
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&nan)) && e.contains("non-finite value at image 3, patch 1, feature 2"), "{e}");

    // Features of another image count, another patch grid, another rank, another dtype.
    let wrong = dir.path().join("feats-4-images.npy");
    write_f32_npy(&wrong, &[4, 4, 3], &values[..48]);
    let mut a = base.to_vec();
    a.extend(["--features", s(&wrong)]);
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&wrong)) && e.contains("5 images"), "{e}");
    let grid = dir.path().join("feats-grid.npy");
    write_f32_npy(&grid, &[5, 3, 4], &values);
    let mut a = base.to_vec();
    a.extend(["--features", s(&grid)]);
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&grid)) && e.contains("--patch"), "{e}");
    let flat = dir.path().join("feats-2d.npy");
    write_f32_npy(&flat, &[5, 12], &values);
    let mut a = base.to_vec();
    a.extend(["--features", s(&flat)]);
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&flat)) && e.contains("3-D"), "{e}");
    let ints = dir.path().join("ints.npy");
    mapet_trainer::data::write_npy(&ints, &[5, 4, 3], &NpyData::I32(vec![1; 60])).unwrap();
    let mut a = base.to_vec();
    a.extend(["--features", s(&ints)]);
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&ints)) && e.contains("<i4"), "{e}");
    let missing = dir.path().join("missing.npy");
    let mut a = base.to_vec();
    a.extend(["--features", s(&missing)]);
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&missing)), "{e}");
}

#[test]
fn bad_flags_are_errors_naming_the_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("cmd_tokenize_flags");
    let data = dir.path().join("imgs");
    images(&data, 2, &mut rng);
    let out = dir.path().join("t.npy");
    let e = run(&["--data", s(&data)]).unwrap_err();
    assert!(e.contains("--out"), "{e}");
    let e = run(&["--out", s(&out)]).unwrap_err();
    assert!(e.contains("--data"), "{e}");
    let e = run(&["--data", s(&data), "--out", s(&out), "--clusters", "3"]).unwrap_err();
    assert!(e.contains("--clusters"), "{e}");
    // 2 images of 4 patches: 8 points, fewer than k.
    let e = run(&["--data", s(&data), "--out", s(&out), "--image", "16", "--patch", "8", "--k", "9"]).unwrap_err();
    assert!(e.contains("--k 9"), "{e}");
    let e = run(&["--data", s(&data), "--out", s(&out), "--image", "20", "--patch", "8"]).unwrap_err();
    assert!(e.contains("--image") && e.contains("--patch"), "{e}");
    let missing = dir.path().join("none.centroids.safetensors");
    let a = ["--data", s(&data), "--out", s(&out), "--image", "16", "--patch", "8", "--centroids", s(&missing)];
    let e = run(&a).unwrap_err();
    assert!(e.contains(s(&missing)), "{e}");
    let e = run(&["--data", s(&dir.path().join("nothing")), "--out", s(&out)]).unwrap_err();
    assert!(e.contains("--data") && e.contains("nothing"), "{e}");
    assert!(!out.exists());
}

#[test]
fn token_dtype_is_int16_up_to_32767_centroids() {
    assert_eq!(tokenize::token_dtype(8192), NpyDtype::I16);
    assert_eq!(tokenize::token_dtype(32767), NpyDtype::I16);
    assert_eq!(tokenize::token_dtype(32768), NpyDtype::I32);
}

#[test]
fn gpu_kmeans_tokens_agree_with_the_cpu() {
    if mapet::testing::gpu_or_skip("gpu_kmeans_tokens_agree_with_the_cpu").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("gpu_kmeans_tokens_agree_with_the_cpu");
    let train = dir.path().join("train");
    images(&train, 12, &mut rng);
    let common = ["--image", "32", "--patch", "8", "--k", "16", "--iterations", "5", "--restarts", "2", "--seed", "4"];
    let (cpu_out, gpu_out) = (dir.path().join("cpu.npy"), dir.path().join("gpu.npy"));
    let mut a = vec!["--data", s(&train), "--out", s(&cpu_out), "--device", "cpu"];
    a.extend(common);
    run(&a).unwrap();
    // The GPU labels the patches with the CPU's centroids: ids agree but for near-ties.
    let centroids = dir.path().join("cpu.centroids.safetensors");
    let mut a = vec!["--data", s(&train), "--out", s(&gpu_out), "--device", "cuda", "--centroids", s(&centroids)];
    a.extend(common);
    run(&a).unwrap();
    let (cpu_ids, gpu_ids) = (ids(&cpu_out).2, ids(&gpu_out).2);
    let same = cpu_ids.iter().zip(&gpu_ids).filter(|(a, b)| a == b).count();
    eprintln!("{same} of {} ids equal", cpu_ids.len());
    assert!(same as f64 >= 0.97 * cpu_ids.len() as f64, "only {same} of {} ids agree", cpu_ids.len());
    let report = std::fs::read_to_string(dir.path().join("gpu.report.json")).unwrap();
    assert!(report.contains("\"device\": \"cuda"), "{report}");
    // A whole fit on the GPU: every id in range, most centroids used.
    let fit_out = dir.path().join("fit.npy");
    let mut a = vec!["--data", s(&train), "--out", s(&fit_out), "--device", "cuda"];
    a.extend(common);
    run(&a).unwrap();
    let fit_ids = ids(&fit_out).2;
    assert!(fit_ids.iter().all(|&i| (0..16).contains(&i)));
    let used = (0..16).filter(|c| fit_ids.contains(c)).count();
    assert!(used >= 12, "only {used} of 16 centroids used");
}

#[test]
fn streamed_pixel_tokenization_equals_the_whole_set_at_once() {
    // The fit's sample gathered chunk by chunk and the labelling done chunk by chunk give exactly
    // the codebook and ids of clustering the whole feature matrix at once, whatever the chunk.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("streamed_pixel_tokenization");
    images(dir.path(), 7, &mut rng);
    let index = ImageIndex::from_folder(dir.path()).unwrap();
    let feats = pixel_features(&index, 32, 8).unwrap();
    let mut km = mapet::ops::kmeans::KMeansConfig::new(8);
    (km.iterations, km.restarts, km.seed) = (5, 2, 9);
    // 7 images x 16 patches = 112 points, a sample of 8 x 6 = 48 of them: the sampled path.
    km.max_points_per_centroid = 6;
    let whole = fit_and_assign(&feats, 192, &km).unwrap();
    for chunk in [1, 2, 3, 7, 100] {
        let t = tokenize_pixels(&index, 32, 8, Codebook::Fit(&km), &KMeansDevice::Cpu, chunk).unwrap();
        assert_eq!(t.centroids, whole.centroids, "chunk {chunk}: centroids differ");
        assert_eq!(t.ids, whole.ids, "chunk {chunk}: ids differ");
        assert_eq!(t.inertia, whole.inertia, "chunk {chunk}: inertia differs");
        assert_eq!(t.report.usage, whole.report.usage);
    }
    let given = Codebook::Given { centroids: whole.centroids.clone(), k: 8 };
    let labelled = tokenize_pixels(&index, 32, 8, given, &KMeansDevice::Cpu, 3).unwrap();
    assert_eq!(labelled.ids, whole.ids);
    assert!(labelled.inertia.is_empty());
}

#[test]
fn streamed_external_features_equal_the_whole_file() {
    // External features read a chunk of images at a time (the sample by its rows, then every
    // chunk labelled) give exactly the codebook, ids and report of clustering the whole file.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("streamed_external_features");
    let (n, p, f) = (11, 4, 5);
    let data = dir.path().join("imgs");
    images(&data, n, &mut rng);
    let values = mapet::testing::uniform(&mut rng, n * p * f, 1.0);
    let (f32_path, f64_path) = (dir.path().join("feats32.npy"), dir.path().join("feats64.npy"));
    write_f32_npy(&f32_path, &[n, p, f], &values);
    write_f64_npy(&f64_path, &[n, p, f], &values);
    let mut km = mapet::ops::kmeans::KMeansConfig::new(4);
    // 44 points, a sample of 4 x 6 = 24 of them: the sampled path.
    (km.iterations, km.restarts, km.seed, km.max_points_per_centroid) = (5, 2, 9, 6);
    let whole = fit_and_assign(&values, f, &km).unwrap();
    for path in [&f32_path, &f64_path] {
        for chunk in [1, 2, 3, 7, 11, 100] {
            let mut src = NpyFeatures::open(path, n, 16, 8).unwrap();
            let t = tokenize_features(&mut src, Codebook::Fit(&km), &KMeansDevice::Cpu, chunk).unwrap();
            assert_eq!(t.centroids, whole.centroids, "{path:?}, chunk {chunk}: centroids differ");
            assert_eq!(t.ids, whole.ids, "{path:?}, chunk {chunk}: ids differ");
            assert_eq!(t.inertia, whole.inertia, "{path:?}, chunk {chunk}: inertia differs");
            let (a, b) = (t.report, whole.report);
            assert_eq!((a.usage, a.perplexity, a.mean_sq_dist), (b.usage, b.perplexity, b.mean_sq_dist));
        }
        let mut src = NpyFeatures::open(path, n, 16, 8).unwrap();
        let given = Codebook::Given { centroids: whole.centroids.clone(), k: 4 };
        let labelled = tokenize_features(&mut src, given, &KMeansDevice::Cpu, 3).unwrap();
        assert_eq!(labelled.ids, whole.ids);
        assert!(labelled.inertia.is_empty());
    }

    // The command, streamed in chunks of 2 and 3 images: the token file and the centroids file
    // hold the whole-file result.
    for chunk in ["2", "3"] {
        let out = dir.path().join(format!("t{chunk}.npy"));
        let mut args = vec!["--data", s(&data), "--out", s(&out), "--image", "16", "--patch", "8", "--k", "4"];
        args.extend(["--iterations", "5", "--restarts", "2", "--seed", "9", "--max-points-per-centroid", "6"]);
        args.extend(["--features", s(&f32_path), "--chunk-images", chunk]);
        run(&args).unwrap();
        let (shape, dtype, got) = ids(&out);
        assert_eq!((shape, dtype), (vec![n, p], NpyDtype::I16));
        assert_eq!(got, whole.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), "chunk {chunk}");
        let (c, k, dim) = load_centroids(&dir.path().join(format!("t{chunk}.centroids.safetensors"))).unwrap();
        assert_eq!((c, k, dim), (whole.centroids.clone(), 4, f));
    }
}
