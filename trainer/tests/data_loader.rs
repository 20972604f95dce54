//! The loader: reproducible batches across thread counts, contents, drop_last, skipping, resume.

mod data_common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use data_common::make_tree;
use mapet_trainer::data::pixels::JITTER_STRENGTH;
use mapet_trainer::data::{
    bench_data, image_ranks, preprocess, split_holdout, stream_rng, Batch, DataError, ImageIndex, Jitter, Loader,
    LoaderConfig, Stream, Tokens,
};
use rand::Rng;

const S: usize = 16; // image size
const N: usize = 17; // 1 + (16 / 4)^2 tokens
const VOCAB: usize = 50;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    index: ImageIndex,
    tokens: Tokens,
    bad: Vec<PathBuf>,
}

fn fixture(test: &str, good: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut rng = mapet::testing::rng(test);
    let tree = make_tree(&root, &mut rng, good);
    let index = ImageIndex::from_folder(&root).unwrap();
    let ids: Vec<i32> = (0..index.len() * (N - 1)).map(|_| rng.random_range(0..VOCAB as i32)).collect();
    let tokens = Tokens::from_ids("tokens.npy", index.len(), N - 1, VOCAB, ids).unwrap();
    Fixture { _dir: dir, root, index, tokens, bad: tree.bad }
}

fn config(batch: usize, threads: usize, seed: u64) -> LoaderConfig {
    LoaderConfig { threads, prefetch: 2, seed, max_skip_fraction: 0.5, ..LoaderConfig::new(S, batch) }
}

fn collect(loader: &Loader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

#[test]
fn batches_are_identical_across_thread_counts_and_runs() {
    let f = fixture("threads", 20);
    let seed = mapet::testing::fresh_seed();
    let one =
        Loader::new(f.index.clone(), f.tokens.clone(), LoaderConfig { prefetch: 0, ..config(5, 1, seed) }).unwrap();
    let four =
        Loader::new(f.index.clone(), f.tokens.clone(), LoaderConfig { prefetch: 3, ..config(5, 4, seed) }).unwrap();
    let seven = Loader::new(f.index.clone(), f.tokens.clone(), config(5, 7, seed)).unwrap();
    for epoch in [0, 1, 5] {
        let a = collect(&one, epoch);
        assert_eq!(a, collect(&four, epoch), "epoch {epoch}: 1 thread vs 4 threads");
        assert_eq!(a, collect(&seven, epoch), "epoch {epoch}: 1 thread vs 7 threads");
        assert_eq!(a, collect(&one, epoch), "epoch {epoch}: same loader, second pass");
    }
    assert_ne!(collect(&one, 0)[0].indices, collect(&one, 1)[0].indices, "epochs are shuffled differently");
    let other = Loader::new(f.index.clone(), f.tokens.clone(), config(5, 2, seed ^ 1)).unwrap();
    assert_ne!(collect(&other, 0), collect(&one, 0), "another seed, other batches");
}

#[test]
fn batch_contents_match_their_images() {
    let f = fixture("contents", 10);
    let seed = mapet::testing::fresh_seed();
    for jitter in [false, true] {
        let cfg = LoaderConfig { jitter, ..config(4, 3, seed) };
        let loader = Loader::new(f.index.clone(), f.tokens.clone(), cfg).unwrap();
        assert_eq!(loader.n_tokens(), N);
        for epoch in [2, 3] {
            for batch in collect(&loader, epoch) {
                assert_eq!((batch.len(), batch.epoch, batch.image_size, batch.n_tokens), (4, epoch, S, N));
                assert_eq!(batch.pixels.len(), 4 * S * S * 3);
                assert_eq!(batch.tokens.len(), 4 * (N - 1));
                assert_eq!(batch.ranks.len(), 4 * N);
                for (b, &id) in batch.indices.iter().enumerate() {
                    assert_eq!(
                        batch.tokens[b * (N - 1)..(b + 1) * (N - 1)],
                        f.tokens.row(id)[..],
                        "tokens of image {id}"
                    );
                    let ranks = &batch.ranks[b * N..(b + 1) * N];
                    assert_eq!(ranks, &image_ranks(seed, epoch, id, N)[..], "ranks of image {id}");
                    let r: Vec<u32> = ranks.iter().map(|&x| x as u32).collect();
                    mapet::perm::validate_ranks(&r).unwrap();
                    let bytes = std::fs::read(f.index.full_path(id)).unwrap();
                    let j = jitter.then(|| {
                        Jitter::sample(&mut stream_rng(seed, epoch, id as u64, Stream::Jitter), JITTER_STRENGTH)
                    });
                    let want = preprocess(&bytes, S as u32, j.as_ref()).unwrap();
                    assert_eq!(batch.pixels[b * S * S * 3..(b + 1) * S * S * 3], want[..], "pixels of image {id}");
                }
            }
        }
    }
    // The model takes the batch: the uint8 HWC pixels as they are (normalized in the patch
    // embedding), or normalized f32 CHW pixels; the same tokens and ranks either way.
    let model = mapet::model::ModelConfig { image: S, patch: 4, dim: 8, depth: 1, heads: 1, vocab: VOCAB, context: 5 };
    let loader = Loader::new(f.index.clone(), f.tokens.clone(), config(4, 2, seed)).unwrap();
    let batch = loader.epoch(0).next().unwrap().unwrap();
    let norm = mapet::ops::patch_embed::Normalize::IMAGENET;
    let mut f32_batch = batch.to_f32_batch(&norm);
    f32_batch.validate(&model).unwrap();
    let (b, y, x, c) = (3, 5, 11, 2);
    let chw = f32_batch.images.as_f32_mut().expect("the f32 form");
    assert_eq!(chw[((b * 3 + c) * S + y) * S + x], norm.apply(batch.pixels[((b * S + y) * S + x) * 3 + c], c));
    assert_eq!((&f32_batch.tokens, &f32_batch.ranks), (&batch.tokens, &batch.ranks));
    let u8_batch = batch.clone().into_model_batch(norm);
    u8_batch.validate(&model).unwrap();
    match &u8_batch.images {
        mapet::model::cpu::Images::U8 { hwc, norm: n } => assert!(hwc == &batch.pixels && *n == norm),
        other => panic!("expected the uint8 form, got {other:?}"),
    }
    assert_eq!((u8_batch.tokens, u8_batch.ranks), (batch.tokens.clone(), batch.ranks.clone()));

    // Jitter changes pixels, and differently in each epoch.
    let on =
        Loader::new(f.index.clone(), f.tokens.clone(), LoaderConfig { shuffle: false, ..config(4, 2, seed) }).unwrap();
    let off = Loader::new(
        f.index.clone(),
        f.tokens.clone(),
        LoaderConfig { shuffle: false, jitter: false, ..config(4, 2, seed) },
    )
    .unwrap();
    let (a, b, c) = (collect(&on, 0), collect(&on, 1), collect(&off, 0));
    assert_eq!(a[0].indices, c[0].indices, "no shuffle: the same images");
    assert_ne!(a[0].pixels, c[0].pixels);
    assert_ne!(a[0].pixels, b[0].pixels);
    assert_eq!(c[0].pixels, collect(&off, 1)[0].pixels, "jitter off: epochs see the same pixels");
}

#[test]
fn every_readable_image_once_per_epoch_and_drop_last() {
    let f = fixture("drop_last", 12);
    let readable = f.index.len() - f.bad.len();
    assert_eq!(readable, 19);
    let bad_ids: HashSet<usize> = f.bad.iter().map(|b| f.index.paths().iter().position(|p| p == b).unwrap()).collect();
    for (drop_last, shuffle) in [(true, true), (false, true), (false, false)] {
        let cfg = LoaderConfig { drop_last, shuffle, ..config(5, 3, 7) };
        let loader = Loader::new(f.index.clone(), f.tokens.clone(), cfg).unwrap();
        let batches = collect(&loader, 0);
        let sizes: Vec<usize> = batches.iter().map(Batch::len).collect();
        let want = if drop_last { vec![5, 5, 5] } else { vec![5, 5, 5, 4] };
        assert_eq!(sizes, want, "drop_last {drop_last}");
        assert_eq!(loader.batches_per_epoch(), if drop_last { 4 } else { 5 }, "upper bound without skips");
        let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        let unique: HashSet<usize> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "no image twice in an epoch");
        assert!(unique.is_disjoint(&bad_ids), "unreadable images never appear");
        if !drop_last {
            assert_eq!(unique.len(), readable, "every readable image appears");
        }
        if !shuffle {
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "no shuffle: index order");
        }
        assert_eq!(batches.last().unwrap().next_position, if drop_last { 17 } else { 21 });
    }
}

#[test]
fn skipped_images_are_counted_named_and_replaced() {
    let f = fixture("skipped", 6);
    let loader = Loader::new(f.index.clone(), f.tokens.clone(), config(4, 2, 3)).unwrap();
    let batches = collect(&loader, 0);
    assert!(batches.iter().all(|b| b.len() == 4), "batches stay full");
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 2);
    let mut names: Vec<PathBuf> = skipped.iter().map(|s| s.path.strip_prefix(&f.root).unwrap().to_path_buf()).collect();
    names.sort();
    assert_eq!(names, f.bad);
    let trunc = skipped.iter().find(|s| s.path.ends_with("truncated.jpg")).unwrap();
    assert!(trunc.reason.contains("truncated"), "{}", trunc.reason);
    assert_eq!(f.index.path(trunc.id), Path::new("B/truncated.jpg"));
    assert!(skipped.iter().all(|s| s.epoch == 0));
    collect(&loader, 1);
    assert_eq!(loader.skipped_count(), 4, "counted again in each epoch");
    assert_eq!(loader.skipped().iter().filter(|s| s.epoch == 1).count(), 2);

    // A manifest naming a missing file: skipped like a corrupt one.
    let manifest = f.root.join("list.txt");
    let mut text: String = f.index.paths().iter().map(|p| format!("{}\n", p.display())).collect();
    text.push_str("gone/missing.jpg\n");
    std::fs::write(&manifest, text).unwrap();
    let index = ImageIndex::from_manifest(&manifest, &f.root).unwrap();
    let ids: Vec<i32> = vec![1; index.len() * (N - 1)];
    let tokens = Tokens::from_ids("t", index.len(), N - 1, VOCAB, ids).unwrap();
    let loader = Loader::new(index, tokens, config(4, 2, 3)).unwrap();
    collect(&loader, 0);
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 3);
    let missing = skipped.iter().find(|s| s.path.ends_with("gone/missing.jpg")).unwrap();
    assert!(missing.reason.contains("cannot read"), "{}", missing.reason);
}

#[test]
fn too_many_skipped_images_abort_the_epoch() {
    let f = fixture("abort", 16);
    let total = f.index.len();
    assert_eq!(total, 25);
    // 2 of 25 bad = 8%: a limit of 10% passes, 5% fails at the second, 0 at the first bad image.
    let run = |limit: f64| {
        let cfg = LoaderConfig { max_skip_fraction: limit, ..config(3, 3, 11) };
        let loader = Loader::new(f.index.clone(), f.tokens.clone(), cfg).unwrap();
        let results: Vec<_> = loader.epoch(0).collect();
        (results, loader.skipped_count())
    };
    let (ok, skipped) = run(0.1);
    assert!(ok.iter().all(|r| r.is_ok()) && ok.len() == 7 && skipped == 2);
    for (limit, at) in [(0.05, 2), (0.0, 1)] {
        let (results, skipped) = run(limit);
        assert_eq!(skipped, at);
        let (last, before) = results.split_last().unwrap();
        assert!(before.iter().all(|r| r.is_ok()), "batches before the failure are delivered");
        match last {
            Err(e @ DataError::TooManySkipped { skipped, total: t, .. }) => {
                assert_eq!((*skipped, *t), (at, total));
                let msg = e.to_string();
                assert!(msg.contains(&format!("{at} of {total}")) && msg.contains(".jpg"), "{msg}");
            }
            other => panic!("limit {limit}: expected TooManySkipped, got {other:?}"),
        }
    }
}

#[test]
fn resuming_mid_epoch_gives_the_same_batches() {
    let f = fixture("resume", 14);
    let seed = mapet::testing::fresh_seed();
    let loader = Loader::new(f.index.clone(), f.tokens.clone(), config(3, 3, seed)).unwrap();
    let full = collect(&loader, 4);
    for k in [0, 2, full.len() - 1] {
        let resumed: Vec<Batch> = loader.epoch_from(4, full[k].next_position).unwrap().map(|b| b.unwrap()).collect();
        assert_eq!(resumed, full[k + 1..], "resume after batch {k}");
    }
    assert!(loader.epoch_from(4, f.index.len() + 1).is_err());
    // A fresh loader (a restarted process) gives the same batches.
    let again = Loader::new(f.index.clone(), f.tokens.clone(), config(3, 1, seed)).unwrap();
    assert_eq!(collect(&again, 4), full);
    // Dropping an epoch after one batch stops its threads (the test would hang otherwise).
    for _ in 0..3 {
        let mut epoch = loader.epoch(5);
        assert!(epoch.next().unwrap().is_ok());
    }
}

#[test]
fn permutations_depend_only_on_seed_epoch_and_image() {
    let seed = mapet::testing::fresh_seed();
    let r = image_ranks(seed, 3, 17, 197);
    assert_eq!(r, image_ranks(seed, 3, 17, 197));
    assert_ne!(r, image_ranks(seed, 4, 17, 197));
    assert_ne!(r, image_ranks(seed, 3, 18, 197));
    assert_ne!(r, image_ranks(seed ^ 1, 3, 17, 197));
    // Uniform: over many images, patch 1's rank is spread evenly over 1..N.
    let n = 9;
    let mut counts = vec![0usize; n];
    for id in 0..8000 {
        let r = image_ranks(seed, 0, id, n);
        assert_eq!(r[0], 0);
        counts[r[1] as usize] += 1;
    }
    assert_eq!(counts[0], 0);
    for &c in &counts[1..] {
        assert!((850..1150).contains(&c), "rank counts {counts:?}");
    }
}

#[test]
fn holdout_images_keep_their_tokens_and_draws() {
    let f = fixture("holdout", 12);
    let seed = mapet::testing::fresh_seed();
    let (train, hold) = split_holdout(&f.index, 0.25, seed).unwrap();
    let full = Loader::new(f.index.clone(), f.tokens.clone(), LoaderConfig { drop_last: false, ..config(2, 2, seed) })
        .unwrap();
    let by_id: std::collections::HashMap<usize, (Vec<i32>, Vec<u8>)> = collect(&full, 1)
        .iter()
        .flat_map(|b| {
            (0..b.len()).map(move |i| {
                (
                    b.indices[i],
                    (b.ranks[i * N..(i + 1) * N].to_vec(), b.pixels[i * S * S * 3..(i + 1) * S * S * 3].to_vec()),
                )
            })
        })
        .collect();
    for part in [train, hold] {
        let ids: HashSet<usize> = part.ids().iter().copied().collect();
        let loader =
            Loader::new(part, f.tokens.clone(), LoaderConfig { drop_last: false, ..config(2, 2, seed) }).unwrap();
        for b in collect(&loader, 1) {
            for (i, id) in b.indices.iter().enumerate() {
                assert!(ids.contains(id));
                assert_eq!(b.tokens[i * (N - 1)..(i + 1) * (N - 1)], f.tokens.row(*id)[..]);
                let (ranks, pixels) = &by_id[id];
                assert_eq!(&b.ranks[i * N..(i + 1) * N], &ranks[..], "image {id}: same permutation");
                assert_eq!(&b.pixels[i * S * S * 3..(i + 1) * S * S * 3], &pixels[..], "image {id}: same jitter");
            }
        }
    }
}

#[test]
fn loader_settings_are_checked() {
    let f = fixture("settings", 2);
    let n = f.index.len();
    let short = Tokens::from_ids("short_tokens.npy", n - 1, N - 1, VOCAB, vec![0; (n - 1) * (N - 1)]).unwrap();
    let e = Loader::new(f.index.clone(), short, config(2, 1, 0)).err().unwrap().to_string();
    assert!(e.contains("short_tokens.npy") && e.contains(&format!("{} images", n)), "{e}");
    for (cfg, what) in [
        (config(0, 1, 0), "batch"),
        (config(2, 0, 0), "threads"),
        (LoaderConfig { image_size: 0, ..config(2, 1, 0) }, "image_size"),
        (LoaderConfig { max_skip_fraction: 1.5, ..config(2, 1, 0) }, "max_skip_fraction"),
        (config(n + 1, 1, 0), "do not fill one batch"),
    ] {
        let e = Loader::new(f.index.clone(), f.tokens.clone(), cfg).err().unwrap().to_string();
        assert!(e.contains(what), "{e}");
    }
    // Without drop_last a short index is one short batch.
    let l = Loader::new(f.index.clone(), f.tokens.clone(), LoaderConfig { drop_last: false, ..config(n + 1, 2, 0) })
        .unwrap();
    assert_eq!(collect(&l, 0).iter().map(Batch::len).collect::<Vec<_>>(), vec![n - 2]);
}

#[test]
fn bench_data_reports_every_thread_count() {
    let f = fixture("bench", 10);
    let results = bench_data(&f.index, 32, &[1, 2], 12).unwrap();
    assert_eq!(results.iter().map(|r| r.threads).collect::<Vec<_>>(), vec![1, 2]);
    for r in &results {
        assert_eq!(r.images + r.skipped, 12);
        assert!(r.images >= 10 && r.images_per_s > 0.0 && r.seconds > 0.0, "{r:?}");
    }
}

#[test]
fn pinned_batches_equal_pageable_ones() {
    let f = fixture("pinned", 9);
    let seed = mapet::testing::fresh_seed();
    let cfg = LoaderConfig { drop_last: false, ..config(4, 2, seed) };
    let plain = Loader::new(f.index.clone(), f.tokens.clone(), cfg.clone()).unwrap();
    // Unreadable files are replaced by the next readable ones, so the batches split the readable
    // images (checked here without a GPU, on the pageable batches the pinned ones must equal).
    let readable = f.index.len() - f.bad.len();
    let pageable: Vec<Vec<Batch>> = [0, 1].map(|epoch| collect(&plain, epoch)).into();
    for a in &pageable {
        let sizes: Vec<usize> = a.iter().map(Batch::len).collect();
        let mut want = vec![4; readable / 4];
        want.extend((!readable.is_multiple_of(4)).then_some(readable % 4));
        assert_eq!(sizes, want, "{readable} readable images in batches of 4, the last one short");
        assert!(a.iter().all(|x| !x.pixels.is_pinned()));
    }
    let Some(gpu) = mapet::testing::gpu_or_skip("pinned_batches_equal_pageable_ones") else { return };
    let pinned = Loader::new(f.index.clone(), f.tokens.clone(), cfg).unwrap();
    // A pool too small for a batch is refused, naming the sizes.
    let e = pinned.use_pinned(gpu.pinned_pool(4 * S * S * 3 - 1)).unwrap_err();
    assert!(e.to_string().contains("cannot hold a batch of 4 images"), "{e}");
    pinned.use_pinned(gpu.pinned_pool(4 * S * S * 3)).unwrap();
    for (epoch, a) in pageable.iter().enumerate() {
        let b = collect(&pinned, epoch as u64);
        assert!(b.iter().all(|x| x.pixels.is_pinned()), "epoch {epoch}: pinned batches");
        assert_eq!(a, &b, "epoch {epoch}: pinned batches differ from pageable ones");
    }
}
