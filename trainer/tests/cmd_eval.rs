//! `mapet eval` on a tiny checkpoint trained for a few steps on the demo photographs: the loss
//! equals a recomputation through the CPU model on batches built here without the loader, the
//! command line prints the same numbers, and bad inputs are errors naming the flag or file.

mod data_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mapet::model::checkpoint;
use mapet::model::cpu::{Batch, CpuModel, Images};
use mapet::ops::patch_embed::Normalize;
use mapet_trainer::cmd::eval::{self, EvalArgs};
use mapet_trainer::data::{image_ranks, preprocess, ImageIndex, NpyDtype, Tokens};
use mapet_trainer::{demo, pretrain};

/// A demo run of 2 steps in `dir`: (images folder, token file, checkpoint folder).
fn trained(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut cfg = demo::config(dir);
    cfg.train.epochs = 2.0;
    cfg.train.warmup_epochs = 1.0;
    cfg.data.threads = 2;
    let data = demo::prepare(&cfg).unwrap();
    let tokens = data.tokens.path().to_path_buf();
    pretrain::run(&cfg, data, None, Arc::new(AtomicBool::new(false))).unwrap();
    (dir.join("images"), tokens, dir.join("checkpoint"))
}

fn args(images: &Path, tokens: &Path, ckpt: &Path, batch: usize, seed: u64) -> EvalArgs {
    EvalArgs {
        checkpoint: ckpt.to_path_buf(),
        data: images.to_path_buf(),
        tokens: tokens.to_path_buf(),
        batch,
        seed,
        threads: 2,
        device: "cpu".into(),
        json: false,
    }
}

/// Sum of token losses, correct and counted tokens, over batches of `batch` images in index
/// order, built from the files directly.
fn recompute(images: &Path, tokens: &Path, ckpt: &Path, batch: usize, seed: u64) -> (f64, usize, usize) {
    let config = checkpoint::read_config(ckpt).unwrap();
    let params = checkpoint::load(ckpt, &config).unwrap().state.params;
    let index = ImageIndex::from_folder(images).unwrap();
    let tokens = Tokens::load_for(tokens, &index, &config).unwrap();
    let model = CpuModel::new(config).unwrap();
    let (s, n) = (config.image, config.n_tokens());
    let norm = Normalize::IMAGENET;
    let (mut sum, mut correct, mut counted) = (0.0f64, 0, 0);
    let positions: Vec<usize> = (0..index.len()).collect();
    for chunk in positions.chunks(batch) {
        let mut b =
            Batch { batch: chunk.len(), images: Images::F32(Vec::new()), tokens: Vec::new(), ranks: Vec::new() };
        for &p in chunk {
            let px = preprocess(&std::fs::read(index.full_path(p)).unwrap(), s as u32, None).unwrap();
            let mut chw = vec![0f32; 3 * s * s];
            for (i, rgb) in px.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    chw[c * s * s + i] = norm.apply(rgb[c], c);
                }
            }
            b.images.as_f32_mut().expect("built as f32").extend(chw);
            b.tokens.extend(tokens.row(index.id(p)));
            b.ranks.extend(image_ranks(seed, 0, index.id(p), n));
        }
        let out = model.step(&params, &b, None, None, false).unwrap();
        sum += out.stats.loss as f64 * out.stats.counted as f64;
        correct += out.stats.correct;
        counted += out.stats.counted;
    }
    (sum, correct, counted)
}

fn mapet(args: &[&str]) -> std::process::Output {
    Command::new(data_common::mapet_bin()).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn eval_matches_a_recomputation_on_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (images, tokens, ckpt) = trained(dir.path());
    let config = checkpoint::read_config(&ckpt).unwrap();
    let n_images = demo::IMAGES.len();

    // Batch 4 over 11 images: 4 + 4 + 3, the last one short.
    let got = eval::evaluate(&args(&images, &tokens, &ckpt, 4, 7)).unwrap();
    let (sum, correct, counted) = recompute(&images, &tokens, &ckpt, 4, 7);
    assert!(got.loss.is_finite() && got.loss > 0.0, "loss {}", got.loss);
    assert_eq!(got.images, n_images);
    assert_eq!(got.tokens, n_images * config.n_pred());
    assert_eq!(counted, got.tokens);
    assert_eq!(got.correct, correct);
    assert_eq!(got.loss, sum / counted as f64, "eval and the recomputation differ");
    assert_eq!(got.accuracy, correct as f64 / counted as f64);
    assert_eq!(got.step, 2);

    // The batch size only changes rounding; the permutations (the seed) change the loss.
    let one_batch = eval::evaluate(&args(&images, &tokens, &ckpt, 32, 7)).unwrap();
    assert!((one_batch.loss - got.loss).abs() <= 1e-5 * got.loss, "{} vs {}", one_batch.loss, got.loss);
    let other_seed = eval::evaluate(&args(&images, &tokens, &ckpt, 4, 8)).unwrap();
    let (sum8, _, _) = recompute(&images, &tokens, &ckpt, 4, 8);
    assert_eq!(other_seed.loss, sum8 / counted as f64);
    assert_ne!(other_seed.loss, got.loss, "the seed does not reach the permutations");

    // The command prints the same numbers.
    let out = mapet(&[
        "eval",
        "--checkpoint",
        s(&ckpt),
        "--data",
        s(&images),
        "--tokens",
        s(&tokens),
        "--batch",
        "4",
        "--seed",
        "7",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |name: &str| -> String {
        let key = format!("\"{name}\": ");
        let start = stdout.find(&key).unwrap_or_else(|| panic!("no {name} in {stdout}")) + key.len();
        stdout[start..].split([',', '}']).next().unwrap().trim().to_string()
    };
    assert_eq!(field("loss").parse::<f64>().unwrap(), got.loss);
    assert_eq!(field("tokens").parse::<usize>().unwrap(), got.tokens);
    assert_eq!(field("correct").parse::<usize>().unwrap(), got.correct);
}

#[test]
fn bad_inputs_are_errors_naming_the_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let (images, tokens, ckpt) = trained(dir.path());
    let config = checkpoint::read_config(&ckpt).unwrap();
    let n_images = demo::IMAGES.len();
    let mut rng = mapet::testing::rng("cmd_eval_bad_tokens");

    // A token file of another patch grid.
    let wrong_cols = dir.path().join("tokens-other-grid.npy");
    let ids: Vec<i32> = (0..n_images * 10).map(|_| rand::Rng::random_range(&mut rng, 0..64)).collect();
    mapet_trainer::data::tokens::write_tokens(&wrong_cols, NpyDtype::I16, 10, &ids).unwrap();
    let e = eval::evaluate(&args(&images, &wrong_cols, &ckpt, 4, 0)).unwrap_err();
    assert!(e.contains(s(&wrong_cols)) && e.contains("--tokens"), "{e}");

    // A token file of a larger codebook.
    let wrong_vocab = dir.path().join("tokens-k1000.npy");
    let cols = config.n_tokens() - 1;
    let ids: Vec<i32> = (0..n_images * cols).map(|_| rand::Rng::random_range(&mut rng, 0..1000)).collect();
    mapet_trainer::data::tokens::write_tokens(&wrong_vocab, NpyDtype::I16, cols, &ids).unwrap();
    let e = eval::evaluate(&args(&images, &wrong_vocab, &ckpt, 4, 0)).unwrap_err();
    assert!(e.contains(s(&wrong_vocab)) && e.contains("outside the codebook"), "{e}");

    // A token file with a row per image of another set.
    let wrong_rows = dir.path().join("tokens-rows.npy");
    let ids: Vec<i32> = (0..(n_images + 1) * cols).map(|_| rand::Rng::random_range(&mut rng, 0..64)).collect();
    mapet_trainer::data::tokens::write_tokens(&wrong_rows, NpyDtype::I16, cols, &ids).unwrap();
    let e = eval::evaluate(&args(&images, &wrong_rows, &ckpt, 4, 0)).unwrap_err();
    assert!(e.contains(s(&wrong_rows)) && e.contains("rows"), "{e}");

    // A missing checkpoint, data folder or token file.
    let missing = dir.path().join("no-such-checkpoint");
    let e = eval::evaluate(&args(&images, &tokens, &missing, 4, 0)).unwrap_err();
    assert!(e.contains(s(&missing)), "{e}");
    let e = eval::evaluate(&args(&dir.path().join("no-images"), &tokens, &ckpt, 4, 0)).unwrap_err();
    assert!(e.contains("--data") && e.contains("no-images"), "{e}");
    let e = eval::evaluate(&args(&images, &dir.path().join("none.npy"), &ckpt, 4, 0)).unwrap_err();
    assert!(e.contains("none.npy"), "{e}");

    // Flags.
    let run = |a: &[&str]| eval::run(&a.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap_err();
    let e = run(&["--checkpoint", s(&ckpt), "--data", s(&images)]);
    assert!(e.contains("--tokens"), "{e}");
    let e = run(&["--checkpoint", s(&ckpt), "--data", s(&images), "--tokens", s(&tokens), "--bogus", "1"]);
    assert!(e.contains("--bogus"), "{e}");
    let e = run(&["--checkpoint", s(&ckpt), "--data", s(&images), "--tokens", s(&tokens), "--batch", "x"]);
    assert!(e.contains("--batch"), "{e}");
    let e = run(&["--checkpoint", s(&ckpt), "--data", s(&images), "--tokens", s(&tokens), "--batch", "0"]);
    assert!(e.contains("--batch"), "{e}");
}
