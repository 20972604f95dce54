//! Bad inputs to the `mapet` command, run through the binary: each gives an error (or, for a few
//! unreadable images, a report) naming the file, flag or config key at fault, and nothing already
//! written is lost: checkpoints and metrics stay as they were, or gain the steps trained so far. A
//! new run into a folder holding an earlier one is refused unless `--overwrite`, and a run resumed
//! after epochs cut short by unreadable images repeats the uninterrupted one bit for bit.
//!
//! The data is a tiny set of 16x16 PNGs with random tokens, the model a one-block ViT (4 patches
//! of 8x8), so that every run takes well under a second of training.

mod data_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mapet::model::checkpoint;
use mapet::model::train::{Recipe, TrainState};
use mapet::model::{ModelConfig, ParamLayout};
use mapet_trainer::config::PretrainConfig;
use mapet_trainer::data::{epoch_order, NpyDtype, Tokens};
use mapet_trainer::pretrain::{self, DataSource, RunOptions};
use rand::Rng;

const MODEL: ModelConfig = ModelConfig { image: 16, patch: 8, dim: 32, depth: 1, heads: 2, vocab: 8, context: 2 };
const BATCH: usize = 2;
const SEED: u64 = 0;

/// Runs `cmd`, failing the test (instead of hanging it) when it runs past two minutes.
fn finish(mut cmd: Command) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    // The outputs are small (a few KiB), so the pipes cannot fill while we poll.
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("mapet ran past 2 minutes\nstdout:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!("--- stdout\n{}--- stderr\n{}", text(&out.stdout), text(&out.stderr));
    out
}

fn mapet(args: &[&str]) -> Output {
    let mut cmd = Command::new(data_common::mapet_bin());
    cmd.args(args);
    finish(cmd)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error of a run that must fail.
fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    text(&out.stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A TOML string literal of a path.
fn lit(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// What makes an image file unreadable.
#[derive(Clone, Copy)]
enum Bad {
    Corrupt,
    Truncated,
    NotAnImage,
}

/// `n` 16x16 PNGs `000.png`... in `dir/images` (index order = name order), the ones in `bad`
/// unreadable, and a token file `dir/tokens.npy` with a row of random ids per image.
fn dataset(dir: &Path, n: usize, bad: &[(usize, Bad)], rng: &mut impl Rng) -> (PathBuf, PathBuf) {
    let images = dir.join("images");
    for i in 0..n {
        let path = images.join(format!("{i:03}.png"));
        let png = data_common::png_bytes(&data_common::smooth_rgb(rng, 16, 16));
        match bad.iter().find(|b| b.0 == i).map(|b| b.1) {
            None => data_common::write_bytes(&path, &png),
            Some(Bad::Corrupt) => {
                let noise: Vec<u8> = (0..300).map(|_| rng.random()).collect();
                data_common::write_bytes(&path, &noise)
            }
            Some(Bad::Truncated) => data_common::write_bytes(&path, &png[..png.len() / 2]),
            Some(Bad::NotAnImage) => data_common::write_bytes(&path, b"just some text, named like an image\n"),
        }
    }
    let tokens = dir.join("tokens.npy");
    write_tokens(&tokens, n, MODEL.vocab as i32, rng);
    (images, tokens)
}

fn write_tokens(path: &Path, rows: usize, vocab: i32, rng: &mut impl Rng) {
    let cols = MODEL.n_tokens() - 1;
    let ids: Vec<i32> = (0..rows * cols).map(|_| rng.random_range(0..vocab)).collect();
    mapet_trainer::data::tokens::write_tokens(path, NpyDtype::I16, cols, &ids).unwrap();
}

/// A config file `dir/NAME` for MODEL on `images`/`tokens`, one epoch, outputs in `out`;
/// `train_extra` goes into `[train]`.
fn config(dir: &Path, name: &str, images: &Path, tokens: &Path, out: &Path, train_extra: &str) -> PathBuf {
    let m = MODEL;
    let text = format!(
        "[model]\npreset = \"vit-t\"\nimage = {}\npatch = {}\ndim = {}\ndepth = {}\nheads = {}\nvocab = {}\n\
         context = {}\n\n[train]\nbatch = {BATCH}\nepochs = 1.0\nwarmup_epochs = 0.0\npeak_lr = 1e-3\n\
         drop_path = 0.0\nseed = {SEED}\ndevice = \"cpu\"\n{train_extra}\n\n[data]\ntrain = {}\ntokens = {}\n\
         threads = 2\njitter = false\n\n[output]\ndir = {}\ncheckpoint_every = 0\n",
        m.image,
        m.patch,
        m.dim,
        m.depth,
        m.heads,
        m.vocab,
        m.context,
        lit(images),
        lit(tokens),
        lit(out)
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The (step, loss) rows of `out/metrics.csv`.
fn metrics(out: &Path) -> Vec<(u64, f32)> {
    mapet_trainer::pretrain::read_metrics(out).iter().map(|r| (r.step, r.loss)).collect()
}

fn load(dir: &Path) -> checkpoint::Checkpoint {
    checkpoint::load(dir, &MODEL).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A finished one-epoch run of 8 images (4 steps) in `dir/run`: (config, images, out).
fn trained_run(dir: &Path, rng: &mut impl Rng) -> (PathBuf, PathBuf, PathBuf) {
    let (images, tokens) = dataset(dir, 8, &[], rng);
    let out = dir.join("run");
    let cfg = config(dir, "run.toml", &images, &tokens, &out, "");
    assert!(mapet(&["pretrain", "--config", s(&cfg)]).status.success());
    assert_eq!(load(&out.join("checkpoint")).state.step, 4);
    (cfg, images, out)
}

#[test]
fn unreadable_images_are_skipped_counted_and_reported_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_skipped");
    // 20 images, 3 unreadable (15%): 17 readable give 8 full batches an epoch instead of 10.
    let bad = [(3, Bad::Corrupt), (11, Bad::Truncated), (16, Bad::NotAnImage)];
    let (images, tokens) = dataset(dir.path(), 20, &bad, &mut rng);
    let out = dir.path().join("out");
    let cfg = config(dir.path(), "c.toml", &images, &tokens, &out, "");
    let run = mapet(&["pretrain", "--config", s(&cfg), "--epochs", "2", "--set", "data.max_skipped_fraction=0.2"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let stdout = text(&run.stdout);
    for epoch in [0, 1] {
        let line = format!("epoch {epoch}: 3 unreadable images skipped (8 steps instead of 10)");
        assert!(stdout.contains(&line), "no `{line}` in\n{stdout}");
    }
    for name in ["003.png", "011.png", "016.png"] {
        assert!(stdout.contains(name), "{name} not named in\n{stdout}");
    }
    // The total counts skips (each file once an epoch read: two whole epochs, and as far into
    // the third as the loader read ahead of the last step) and the files apart.
    let total = stdout.lines().find(|l| l.contains(" skips of unreadable images in the epochs read (3 files; "));
    let skips: usize = total.and_then(|l| l.split(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("{stdout}"));
    assert!((6..=9).contains(&skips), "{stdout}");
    // The schedule's 20 steps all ran (the third epoch supplies the last four), each once.
    let steps: Vec<u64> = metrics(&out).iter().map(|r| r.0).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    assert_eq!(load(&out.join("checkpoint")).state.step, 20);
}

#[test]
fn too_many_unreadable_images_stop_the_run_keeping_the_steps_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_too_many");
    // The last three images of epoch 0's order are unreadable: 8 full batches come first.
    let order = epoch_order(20, SEED, 0, true);
    let bad = [(order[17], Bad::Corrupt), (order[18], Bad::Truncated), (order[19], Bad::NotAnImage)];
    let (images, tokens) = dataset(dir.path(), 20, &bad, &mut rng);
    let out = dir.path().join("out");
    let cfg = config(dir.path(), "c.toml", &images, &tokens, &out, "");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--set", "data.max_skipped_fraction=0.1"]));
    let first = format!("{:03}.png", order[17]);
    assert!(e.contains("data.max_skipped_fraction") && e.contains(&first) && e.contains("epoch 0"), "{e}");
    assert!(e.contains("3 of 20 images"), "{e}");
    // The 8 steps trained before the data gave out are in the metrics and in a checkpoint.
    let steps: Vec<u64> = metrics(&out).iter().map(|r| r.0).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    assert_eq!(load(&out.join("checkpoint")).state.step, 8);
    assert!(e.contains("checkpoint written at step 8"), "{e}");
}

#[test]
fn empty_or_missing_data_folders_name_the_flag_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_folders");
    let (images, tokens) = dataset(dir.path(), 4, &[], &mut rng);
    let out = dir.path().join("out");
    let missing = dir.path().join("no-such-folder");
    let empty = dir.path().join("empty");
    data_common::write_bytes(&empty.join("notes.txt"), b"no images here");

    let e = fails(&mapet(&["pretrain", "--data", s(&missing), "--tokens", s(&tokens), "--out", s(&out)]));
    assert!(e.contains("--data") && e.contains(s(&missing)), "{e}");
    assert!(!e.contains("--data: --data"), "{e}");
    let e = fails(&mapet(&["pretrain", "--data", s(&empty), "--tokens", s(&tokens), "--out", s(&out)]));
    assert!(e.contains("--data") && e.contains(s(&empty)) && e.contains("no images"), "{e}");
    // The same folder given in the config file: the key and the file are named, not a flag.
    let cfg = config(dir.path(), "c.toml", &empty, &tokens, &out, "");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg)]));
    assert!(e.contains("data.train in") && e.contains(s(&cfg)) && e.contains(s(&empty)), "{e}");
    // A missing token file.
    let e = fails(&mapet(&["pretrain", "--data", s(&images), "--tokens", s(&missing.join("t.npy")), "--out", s(&out)]));
    assert!(e.contains("--tokens") && e.contains("t.npy"), "{e}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

#[test]
fn token_files_that_do_not_fit_name_the_file_and_the_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_tokens");
    let (images, _) = dataset(dir.path(), 6, &[], &mut rng);
    let out = dir.path().join("out");
    let run =
        |tokens: &Path| fails(&mapet(&["pretrain", "--data", s(&images), "--tokens", s(tokens), "--out", s(&out)]));
    let cfg_run = |tokens: &Path| {
        let cfg = config(dir.path(), "c.toml", &images, tokens, &out, "");
        (fails(&mapet(&["pretrain", "--config", s(&cfg)])), cfg)
    };
    // Without --config the defaults (vit-b) apply; the error still names the flag and the file.
    let rows = dir.path().join("rows.npy");
    write_tokens(&rows, 7, 8, &mut rng);
    let (e, cfg) = cfg_run(&rows);
    assert!(e.contains("data.tokens in") && e.contains(s(&cfg)) && e.contains(s(&rows)), "{e}");
    assert!(e.contains("7 rows") && e.contains("6 images"), "{e}");
    let e = run(&rows);
    assert!(e.contains("--tokens") && e.contains(s(&rows)), "{e}");

    let range = dir.path().join("range.npy");
    let cols = MODEL.n_tokens() - 1;
    let mut ids: Vec<i32> = (0..6 * cols).map(|_| rng.random_range(0..8)).collect();
    ids[5] = 8;
    mapet_trainer::data::tokens::write_tokens(&range, NpyDtype::I16, cols, &ids).unwrap();
    let (e, _) = cfg_run(&range);
    assert!(e.contains(s(&range)) && e.contains("[0, 8)"), "{e}");

    let floats = dir.path().join("floats.npy");
    let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': (6, {cols}), }}");
    let header = format!("{header:<117}\n"); // 10 + 118 bytes: the data starts 64-aligned
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..6 * cols).flat_map(|i| (i as f32).to_le_bytes()));
    std::fs::write(&floats, bytes).unwrap();
    let (e, _) = cfg_run(&floats);
    assert!(e.contains(s(&floats)) && e.contains("<f4"), "{e}");

    let grid = dir.path().join("grid.npy");
    let ids: Vec<i32> = (0..6 * 9).map(|_| rng.random_range(0..8)).collect();
    mapet_trainer::data::tokens::write_tokens(&grid, NpyDtype::I16, 9, &ids).unwrap();
    let (e, _) = cfg_run(&grid);
    assert!(e.contains(s(&grid)) && e.contains("9 ids per image") && e.contains("4 patches"), "{e}");
    assert!(!out.exists());
}

#[test]
fn config_errors_name_the_key_and_the_file_or_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_config");
    let (images, tokens) = dataset(dir.path(), 4, &[], &mut rng);
    let out = dir.path().join("out");

    // In the file: an unknown key, a value out of range, a value of the wrong type.
    let cfg = config(dir.path(), "unknown.toml", &images, &tokens, &out, "learning_rate = 0.1");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg)]));
    assert!(e.contains(s(&cfg)) && e.contains("learning_rate"), "{e}");
    let cfg = config(dir.path(), "range.toml", &images, &tokens, &out, "clip = -1.0");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg)]));
    assert!(e.contains(s(&cfg)) && e.contains("train.clip"), "{e}");
    let cfg = config(dir.path(), "type.toml", &images, &tokens, &out, "micro_batches = \"two\"");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg)]));
    assert!(e.contains(s(&cfg)) && e.contains("micro_batches"), "{e}");

    // On the command line: the flag is named, with the key.
    let good = config(dir.path(), "good.toml", &images, &tokens, &out, "");
    let cases: [(&[&str], &[&str]); 11] = [
        (&["--batch", "0"], &["--batch 0", "train.batch"]),
        (&["--batch", "two"], &["--batch two", "train.batch"]),
        (&["--epochs", "-1"], &["--epochs -1", "train.epochs"]),
        (&["--device", "tpu"], &["--device tpu", "train.device"]),
        (&["--set", "train.drop_path=1.5"], &["--set train.drop_path=1.5", "drop_path"]),
        (&["--set", "train.nosuch=1"], &["train.nosuch", "nosuch"]),
        (&["--set", "model.dim=15"], &["--set model.dim=15", "[model]"]),
        (&["--set", "data.max_skipped_fraction=2"], &["--set data.max_skipped_fraction=2", "max_skipped_fraction"]),
        (&["--bogus", "1"], &["--bogus"]),
        // A patch grid too small for the context: the key to set is named.
        (&["--set", "model.patch=16"], &["--set model.patch=16", "--set model.context=C"]),
        // More images a batch than the set holds.
        (&["--batch", "64"], &["4 training images do not fill one batch of 64", "--batch"]),
    ];
    for (flags, needles) in cases {
        let mut args = vec!["pretrain", "--config", s(&good)];
        args.extend_from_slice(flags);
        let e = fails(&mapet(&args));
        for n in needles {
            assert!(e.contains(n), "{flags:?}: `{n}` not in {e}");
        }
    }
    // A run shorter than the recipe's warmup (the demo, and every run with no config file, warm
    // up for 10 epochs): --epochs is named, with the warmup key and a value that would pass, and
    // nothing is written.
    let demo_out = dir.path().join("demo");
    let e = fails(&mapet(&["pretrain", "--out", s(&demo_out), "--epochs", "1"]));
    assert!(e.starts_with("mapet: --epochs 1: train.warmup_epochs: 10 must be in [0, train.epochs]"), "{e}");
    assert!(e.contains("--set train.warmup_epochs=0.0333"), "{e}");
    assert!(!demo_out.exists());
    // A flag that fixes the file's bad value wins: the file is not blamed for a value replaced.
    let cfg = config(dir.path(), "fixed.toml", &images, &tokens, &out, "clip = -1.0");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--set", "train.clip=1", "--batch", "0"]));
    assert!(e.starts_with("mapet: --batch 0: train.batch"), "{e}");
    assert!(!out.exists());
}

#[test]
fn resuming_another_config_or_a_truncated_checkpoint_is_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_resume");
    let (cfg, _, out) = trained_run(dir.path(), &mut rng);
    let ckpt = out.join("checkpoint");
    let before = load(&ckpt);
    let metrics_before = std::fs::read(out.join("metrics.csv")).unwrap();

    // A model of another width.
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--set", "model.dim=48", "--resume", s(&ckpt)]));
    assert!(e.contains(&format!("--resume {}", s(&ckpt))) && e.contains("(dim 32 there, 48 here)"), "{e}");
    assert_eq!(std::fs::read(out.join("metrics.csv")).unwrap(), metrics_before);
    assert_eq!(bits(&load(&ckpt).state.params), bits(&before.state.params));

    // A copy with its parameters cut short.
    let cut = dir.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    for f in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE, checkpoint::META_FILE] {
        std::fs::copy(ckpt.join(f), cut.join(f)).unwrap();
    }
    let model = cut.join(checkpoint::MODEL_FILE);
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&model).unwrap().set_len(len - 100).unwrap();
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--epochs", "2", "--resume", s(&cut)]));
    assert!(e.contains("--resume") && e.contains(s(&model)), "{e}");
    assert_eq!(std::fs::read(out.join("metrics.csv")).unwrap(), metrics_before);
    assert_eq!(load(&ckpt).state.step, 4);

    // A missing one.
    let nothing = dir.path().join("nothing");
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--resume", s(&nothing)]));
    assert!(e.contains("--resume") && e.contains(s(&nothing)), "{e}");
    assert_eq!(std::fs::read(out.join("metrics.csv")).unwrap(), metrics_before);
}

/// A disk that fills up during the checkpoint, made real with a file-size limit (`ulimit -f`):
/// the kernel refuses the write past it, as it would on a full disk.
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_disk_full");
    let (cfg, _, out) = trained_run(dir.path(), &mut rng);
    let ckpt = out.join("checkpoint");
    let before = load(&ckpt);
    // The limit (16 blocks: 8 KiB in dash's 512-byte units, 16 KiB in bash's) is far above the
    // metrics file and far below the checkpoint's files.
    let size = std::fs::metadata(ckpt.join(checkpoint::MODEL_FILE)).unwrap().len();
    assert!(size > 32 * 1024, "the model file ({size} bytes) must exceed the limit");

    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' XFSZ; ulimit -f 16 && exec \"$0\" \"$@\""]).arg(data_common::mapet_bin());
    cmd.args(["pretrain", "--config", s(&cfg), "--epochs", "2", "--resume", s(&ckpt)]);
    let e = fails(&finish(cmd));
    assert!(e.contains("writing the checkpoint of step 8") && e.contains(checkpoint::MODEL_FILE), "{e}");
    assert!(e.contains("previous checkpoint") && e.contains("unchanged"), "{e}");
    // The previous checkpoint loads, bit for bit; no partial folder is left beside it.
    let after = load(&ckpt);
    assert_eq!(after.state.step, 4);
    assert_eq!(bits(&after.state.params), bits(&before.state.params));
    assert_eq!(bits(&after.state.v), bits(&before.state.v));
    assert!(!out.join("checkpoint.tmp").exists() && !out.join("checkpoint.old").exists());
    // The steps trained are still in the metrics.
    let steps: Vec<u64> = metrics(&out).iter().map(|r| r.0).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    // Without the limit, the same resume completes.
    assert!(mapet(&["pretrain", "--config", s(&cfg), "--epochs", "2", "--resume", s(&ckpt)]).status.success());
    assert_eq!(load(&ckpt).state.step, 8);
}

#[test]
fn a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_nan");
    let (images, tokens) = dataset(dir.path(), 16, &[], &mut rng);
    let out = dir.path().join("out");
    // A learning rate of 1e30 sends the weights to ~1e30 in one step: the next loss overflows.
    let cfg = config(dir.path(), "c.toml", &images, &tokens, &out, "");
    let run =
        mapet(&["pretrain", "--config", s(&cfg), "--set", "train.peak_lr=1e30", "--set", "output.checkpoint_every=1"]);
    let e = fails(&run);
    let rows = metrics(&out);
    let last = rows.last().expect("at least one step trained").0;
    assert!(last < 8, "the run should not finish: {rows:?}");
    assert!(rows.iter().all(|r| r.1.is_finite()), "{rows:?}");
    let step_named = format!("non-finite loss at training step {}", last + 1);
    let grad_named = format!("non-finite gradient norm at training step {}", last + 1);
    assert!(e.contains(&step_named) || e.contains(&grad_named), "{e}");
    let ckpt = out.join("checkpoint");
    assert!(e.contains(&format!("the checkpoint {} (step {last}) is kept as it was", ckpt.display())), "{e}");
    let c = load(&ckpt);
    assert_eq!(c.state.step, last);
    assert!(c.state.params.iter().all(|p| p.is_finite()));

    // With no checkpoint written before it, the message says so.
    let out2 = dir.path().join("out2");
    let e = fails(&mapet(&[
        "pretrain",
        "--config",
        s(&cfg),
        "--out",
        s(&out2),
        "--set",
        "train.peak_lr=1e30",
        "--set",
        "output.checkpoint_every=100",
    ]));
    assert!(e.contains("no checkpoint was written"), "{e}");
    assert!(!out2.join("checkpoint").exists());
}

/// A checkpoint of MODEL with `dim` changed, random parameters.
fn random_checkpoint(dir: &Path, dim: usize, rng: &mut impl Rng) {
    let layout = ParamLayout::new(ModelConfig { dim, ..MODEL }).unwrap();
    let mut state = TrainState::new(&layout, 0);
    state.params = mapet::testing::uniform(rng, layout.total, 1.0);
    state.step = 3;
    checkpoint::save(dir, &layout, &Recipe::paper(8, 10), &state).unwrap();
}

#[test]
fn eval_and_export_refuse_missing_mismatched_and_truncated_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_eval_export");
    let (images, tokens) = dataset(dir.path(), 4, &[], &mut rng);
    let good = dir.path().join("good");
    random_checkpoint(&good, 32, &mut rng);
    let wide = dir.path().join("wide");
    random_checkpoint(&wide, 48, &mut rng);
    // An existing export, which no failed export may touch.
    let timm = dir.path().join("vit.safetensors");
    assert!(mapet(&["export", "--checkpoint", s(&good), "--timm", s(&timm)]).status.success());
    let exported = std::fs::read(&timm).unwrap();
    let eval =
        |ckpt: &Path| fails(&mapet(&["eval", "--checkpoint", s(ckpt), "--data", s(&images), "--tokens", s(&tokens)]));
    let export = |ckpt: &Path| fails(&mapet(&["export", "--checkpoint", s(ckpt), "--timm", s(&timm)]));

    // meta.json of one model, parameters of another.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(good.join(checkpoint::META_FILE), mixed.join(checkpoint::META_FILE)).unwrap();
    std::fs::copy(good.join(checkpoint::OPTIMIZER_FILE), mixed.join(checkpoint::OPTIMIZER_FILE)).unwrap();
    std::fs::copy(wide.join(checkpoint::MODEL_FILE), mixed.join(checkpoint::MODEL_FILE)).unwrap();
    let model = mixed.join(checkpoint::MODEL_FILE);
    for e in [eval(&mixed), export(&mixed)] {
        assert!(e.contains("--checkpoint") && e.contains(s(&model)) && e.contains("this config needs"), "{e}");
    }
    // Truncated.
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&model).unwrap().set_len(len / 3).unwrap();
    for e in [eval(&mixed), export(&mixed)] {
        assert!(e.contains("--checkpoint") && e.contains(s(&model)) && e.contains("not a valid safetensors"), "{e}");
    }
    // Missing.
    let nothing = dir.path().join("nothing");
    for e in [eval(&nothing), export(&nothing)] {
        assert!(e.contains("--checkpoint") && e.contains(s(&nothing)), "{e}");
    }
    // A checkpoint of another patch grid (32x32 images) is refused naming --tokens.
    let other = dir.path().join("other-grid");
    let layout = ParamLayout::new(ModelConfig { image: 32, ..MODEL }).unwrap();
    checkpoint::save(&other, &layout, &Recipe::paper(8, 10), &TrainState::new(&layout, 0)).unwrap();
    let e = eval(&other);
    assert!(e.contains("--tokens") && e.contains(s(&tokens)), "{e}");
    assert_eq!(std::fs::read(&timm).unwrap(), exported);

    // A checkpoint shared without its optimizer state evaluates and exports as the whole one.
    let lean = dir.path().join("lean");
    std::fs::create_dir(&lean).unwrap();
    for f in [checkpoint::MODEL_FILE, checkpoint::META_FILE] {
        std::fs::copy(good.join(f), lean.join(f)).unwrap();
    }
    let evals = [&good, &lean].map(|ck| {
        let run = mapet(&["eval", "--checkpoint", s(ck), "--data", s(&images), "--tokens", s(&tokens), "--json"]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        text(&run.stdout).replace(s(ck), "CKPT")
    });
    assert_eq!(evals[0], evals[1]);
    let lean_timm = dir.path().join("lean.safetensors");
    assert!(mapet(&["export", "--checkpoint", s(&lean), "--timm", s(&lean_timm)]).status.success());
    let tensors =
        |p: &Path| mapet::io::SafeTensorsFile::open(p).unwrap().f32_tensor("blocks.0.attn.qkv.weight").unwrap();
    assert_eq!(tensors(&lean_timm), tensors(&timm));
    // An export into the checkpoint folder (over its model file, or beside it) is refused.
    for target in [lean.join(checkpoint::MODEL_FILE), lean.join("vit.safetensors")] {
        let e = fails(&mapet(&["export", "--checkpoint", s(&lean), "--timm", s(&target)]));
        assert!(e.contains("--timm") && e.contains("is inside --checkpoint"), "{e}");
    }
    assert_eq!(
        std::fs::read(lean.join(checkpoint::MODEL_FILE)).unwrap(),
        std::fs::read(good.join(checkpoint::MODEL_FILE)).unwrap()
    );
    assert!(!lean.join("vit.safetensors").exists());
}

/// Outputs that would destroy the command's own inputs are refused, and the inputs left as they
/// were: check-step over its case, tokenize over its features or codebook, synth into a folder
/// that holds an image set.
#[test]
fn outputs_never_overwrite_their_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_outputs");
    let case = dir.path().join("case.safetensors");
    std::fs::copy(mapet::testing::project_root().join("tests/data/golden/case_000.safetensors"), &case).unwrap();
    let before = std::fs::read(&case).unwrap();
    let e = fails(&mapet(&["check-step", s(&case), "--out", s(&case)]));
    assert!(e.contains("--out") && e.contains("is the case"), "{e}");
    assert_eq!(std::fs::read(&case).unwrap(), before);

    let (images, _) = dataset(dir.path(), 4, &[], &mut rng);
    // (The refusal comes before the features are read: any bytes stand for them.)
    let features = dir.path().join("f.npy");
    std::fs::write(&features, b"costly features").unwrap();
    let feature_bytes = std::fs::read(&features).unwrap();
    let tok = |out: &Path, extra: &[&str]| {
        let mut args =
            vec!["tokenize", "--data", s(&images), "--out", s(out), "--k", "2", "--image", "16", "--patch", "8"];
        args.extend_from_slice(extra);
        mapet(&args)
    };
    let e = fails(&tok(&features, &["--features", s(&features)]));
    assert!(e.contains("--out") && e.contains("is --features"), "{e}");
    // Its codebook beside the tokens would be the one read.
    assert!(tok(&dir.path().join("t.npy"), &[]).status.success());
    let codebook = dir.path().join("t.centroids.safetensors");
    let codebook_bytes = std::fs::read(&codebook).unwrap();
    let e = fails(&tok(&dir.path().join("t.npy"), &["--centroids", s(&codebook)]));
    assert!(e.contains("is --centroids"), "{e}");
    assert_eq!((std::fs::read(&features).unwrap(), std::fs::read(&codebook).unwrap()), (feature_bytes, codebook_bytes));

    let set = dir.path().join("set");
    assert!(mapet(&["synth", "--out", s(&set), "--images", "3", "--grid", "2", "--vocab", "8"]).status.success());
    let e = fails(&mapet(&["synth", "--out", s(&set), "--images", "2", "--grid", "2", "--vocab", "8"]));
    assert!(e.contains("already holds an image set"), "{e}");
    let jpgs = walk(&set.join("images")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "jpg")).count();
    assert_eq!(jpgs, 3);
    // A folder holding a token file (its images elsewhere), or a checkpoint's files.
    std::fs::remove_dir_all(set.join("images")).unwrap();
    let tokens_bytes = std::fs::read(set.join("tokens.npy")).unwrap();
    let e = fails(&mapet(&["synth", "--out", s(&set), "--images", "2", "--grid", "2", "--vocab", "8"]));
    assert!(e.contains("already holds tokens.npy"), "{e}");
    assert_eq!(std::fs::read(set.join("tokens.npy")).unwrap(), tokens_bytes);
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::write(ckpt.join("meta.json"), "{}").unwrap();
    let e = fails(&mapet(&["synth", "--out", s(&ckpt), "--images", "2", "--grid", "2", "--vocab", "8"]));
    assert!(e.contains("already holds meta.json"), "{e}");
    assert!(!ckpt.join("images").exists());
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A full disk while `mapet export` writes: the write goes to `OUT.tmp`, here a link to
/// `/dev/full`, which refuses every write with "no space left on device".
#[cfg(target_os = "linux")]
#[test]
fn export_to_a_full_disk_keeps_the_previous_file() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIP: no /dev/full");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_export_full");
    let ckpt = dir.path().join("ckpt");
    random_checkpoint(&ckpt, 32, &mut rng);
    let timm = dir.path().join("vit.safetensors");
    std::fs::write(&timm, b"the previous export").unwrap();
    let tmp = dir.path().join("vit.safetensors.tmp");
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let e = fails(&mapet(&["export", "--checkpoint", s(&ckpt), "--timm", s(&timm)]));
    assert!(e.contains("--timm") && e.contains(s(&timm)) && e.contains("No space left"), "{e}");
    assert_eq!(std::fs::read(&timm).unwrap(), b"the previous export");
    assert!(std::fs::symlink_metadata(&tmp).is_err(), "the temporary file was left behind");
}

/// Every file under `dir` (relative path -> bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, files);
            } else {
                files.insert(path.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

#[test]
fn a_new_run_into_a_folder_holding_an_earlier_run_is_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_overwrite");
    let (cfg, _, out) = trained_run(dir.path(), &mut rng);
    let ckpt = out.join("checkpoint");
    let first = load(&ckpt);
    let before = snapshot(&out);
    assert!(before.contains_key(Path::new("metrics.csv")) && before.len() >= 4, "{:?}", before.keys());

    // The same config again, with no --resume: refused, naming the folder and the ways on.
    let refused = |args: &[&str]| {
        let e = fails(&mapet(args));
        for needle in [s(&out), "--resume", s(&ckpt), "--out"] {
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        }
        // --overwrite is the way on for a new run; a resumed one cannot take it (it is refused
        // beside --resume).
        let resumed = args.contains(&"--resume");
        assert_eq!(e.contains("give `--overwrite`"), !resumed, "{e}");
        assert!(snapshot(&out) == before, "the refused run changed {}", out.display());
    };
    refused(&["pretrain", "--config", s(&cfg)]);
    // Also with the folder given by --out, and with the data given by flags.
    let other_cfg = dir.path().join("other.toml");
    std::fs::write(&other_cfg, std::fs::read_to_string(&cfg).unwrap().replace(s(&out), s(&dir.path().join("x"))))
        .unwrap();
    refused(&["pretrain", "--config", s(&other_cfg), "--out", s(&out)]);
    // A run resumed from another checkpoint into it: refused too.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for f in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE, checkpoint::META_FILE] {
        std::fs::copy(ckpt.join(f), elsewhere.join(f)).unwrap();
    }
    refused(&["pretrain", "--config", s(&cfg), "--epochs", "2", "--resume", s(&elsewhere)]);
    // Its checkpoint left as `checkpoint.old` by an interrupted save, or only its metrics.
    let old = out.join("checkpoint.old");
    std::fs::rename(&ckpt, &old).unwrap();
    let before_old = snapshot(&out);
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg)]));
    assert!(e.contains(s(&old)) && e.contains("--overwrite"), "{e}");
    assert!(snapshot(&out) == before_old);
    std::fs::remove_dir_all(&old).unwrap();
    let metrics_only = snapshot(&out);
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg)]));
    assert!(e.contains(s(&out.join("metrics.csv"))) && e.contains("--overwrite"), "{e}");
    assert!(snapshot(&out) == metrics_only);

    // --overwrite starts over: the same steps once each, the same checkpoint as the first run.
    std::fs::rename(dir.path().join("elsewhere"), &ckpt).unwrap();
    let run = mapet(&["pretrain", "--overwrite", "--config", s(&cfg)]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(metrics(&out).iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let again = load(&ckpt);
    assert_eq!(again.state.step, 4);
    assert_eq!(bits(&again.state.params), bits(&first.state.params));
    // Resuming the folder's own checkpoint needs no flag.
    assert!(mapet(&["pretrain", "--config", s(&cfg), "--epochs", "2", "--resume", s(&ckpt)]).status.success());
    assert_eq!(load(&ckpt).state.step, 8);
    // The flag is documented.
    let help = mapet(&["pretrain", "--help"]);
    assert!(help.status.success() && text(&help.stdout).contains("--overwrite"), "{}", text(&help.stdout));
}

/// The config of `cfg_file` with outputs in `out`, `epochs` epochs and up to 20% unreadable images.
fn library_config(cfg_file: &Path, out: &Path, epochs: f64) -> PretrainConfig {
    let mut cfg = PretrainConfig::from_file(cfg_file).unwrap();
    cfg.output.dir = out.to_path_buf();
    cfg.train.epochs = epochs;
    cfg.data.max_skipped_fraction = 0.2;
    cfg
}

fn data_source(images: &Path, tokens: &Path) -> DataSource {
    let index = mapet_trainer::cmd::open_index(images).unwrap();
    let tokens = Tokens::load_for(tokens, &index, &MODEL).unwrap();
    DataSource { index, tokens, eval: None }
}

/// `metrics.csv` without its timing column: step, epoch, loss, accuracy, lr, grad_norm per row.
fn metrics_rows(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

/// A run of `cfg` stopped after step `stop` (with its checkpoint), then resumed from that
/// checkpoint (after `edit` of it) to the end, against the uninterrupted run in `straight`:
/// the same metrics rows and the same final parameters and moments, bit for bit.
fn resume_matches(
    cfg: &PretrainConfig,
    images: &Path,
    tokens: &Path,
    straight: &Path,
    stop: u64,
    edit: impl Fn(&Path),
) -> checkpoint::Checkpoint {
    let out = cfg.output.dir.clone();
    let no_stop = || Arc::new(AtomicBool::new(false));
    let opts = RunOptions { stop_after: Some(stop), ..RunOptions::default() };
    let partial = pretrain::run_with(cfg, data_source(images, tokens), opts, no_stop()).unwrap();
    assert!(partial.interrupted && partial.steps == stop, "stopped at step {} instead of {stop}", partial.steps);
    let ckpt = out.join("checkpoint");
    let at_stop = load(&ckpt);
    edit(&ckpt);
    let resumed = pretrain::run(cfg, data_source(images, tokens), Some(&ckpt), no_stop()).unwrap();
    let want = load(&straight.join("checkpoint"));
    assert_eq!(resumed.steps, want.state.step);
    let (got_rows, want_rows) = (metrics_rows(&out), metrics_rows(straight));
    for (got, want) in got_rows.iter().zip(&want_rows) {
        assert_eq!(got, want, "stopped after step {stop}: metrics differ after resuming");
    }
    assert_eq!(got_rows.len(), want_rows.len(), "stopped after step {stop}");
    let got = load(&ckpt);
    assert_eq!((got.state.step, got.state.epoch), (want.state.step, want.state.epoch));
    assert!(bits(&got.state.params) == bits(&want.state.params), "stopped after step {stop}: parameters differ");
    assert!(bits(&got.state.m) == bits(&want.state.m) && bits(&got.state.v) == bits(&want.state.v));
    at_stop
}

#[test]
fn a_run_resumed_after_epochs_cut_short_by_unreadable_images_repeats_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_resume_short_epoch");
    // 20 images, 3 of them (at random places) unreadable: 17 readable give 8 full batches of 2 an
    // epoch instead of 10, so epochs 0 and 1 are steps 1-8 and 9-16, and epoch 2 gives 17-20.
    let mut bad = Vec::new();
    while bad.len() < 3 {
        let i = rng.random_range(0..20);
        if !bad.iter().any(|b: &(usize, Bad)| b.0 == i) {
            bad.push((i, [Bad::Corrupt, Bad::Truncated, Bad::NotAnImage][bad.len()]));
        }
    }
    let (images, tokens) = dataset(dir.path(), 20, &bad, &mut rng);
    let cfg_file = config(dir.path(), "c.toml", &images, &tokens, &dir.path().join("unused"), "");
    let straight = dir.path().join("straight");
    let cfg = library_config(&cfg_file, &straight, 2.0);
    let summary = pretrain::run(&cfg, data_source(&images, &tokens), None, Arc::new(AtomicBool::new(false))).unwrap();
    assert!(summary.steps == 20 && summary.skipped_images >= 6, "{summary:?}");
    let epochs: Vec<String> =
        metrics_rows(&straight)[1..].iter().map(|r| r.split(',').nth(1).unwrap().into()).collect();
    assert_eq!(epochs, [vec!["0"; 8], vec!["1"; 8], vec!["2"; 4]].concat());
    // The library refuses a second new run there too, changing nothing.
    let before = snapshot(&straight);
    let e = pretrain::run(&cfg, data_source(&images, &tokens), None, Arc::new(AtomicBool::new(false))).unwrap_err();
    assert!(e.contains(s(&straight)) && e.contains("--overwrite"), "{e}");
    assert!(snapshot(&straight) == before);

    // Stopped at the end of the short epoch 0, three steps into epoch 1 (where steps x batch
    // points 4 images before the true position, or more with skips), and one step into epoch 2.
    for (stop, epoch, epoch_steps) in [(8, 0, 8), (11, 1, 3), (17, 2, 1)] {
        let cfg = library_config(&cfg_file, &dir.path().join(format!("stop{stop}")), 2.0);
        let at_stop = resume_matches(&cfg, &images, &tokens, &straight, stop, |_| {});
        assert_eq!(at_stop.state.epoch, epoch, "stopped after step {stop}");
        let data = at_stop.data.expect("the checkpoint stores the loader's position");
        assert_eq!(data.epoch_steps, epoch_steps, "stopped after step {stop}");
        assert!(data.next_image >= 2 * epoch_steps && data.next_image <= 20, "{data:?}");
    }
}

#[test]
fn a_checkpoint_without_the_loader_position_resumes_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_resume_old_checkpoint");
    // No unreadable image: steps x batch is then the exact position, as older checkpoints assume.
    let (images, tokens) = dataset(dir.path(), 8, &[], &mut rng);
    let cfg_file = config(dir.path(), "c.toml", &images, &tokens, &dir.path().join("unused"), "");
    let straight = dir.path().join("straight");
    let cfg = library_config(&cfg_file, &straight, 2.0);
    pretrain::run(&cfg, data_source(&images, &tokens), None, Arc::new(AtomicBool::new(false))).unwrap();
    let cfg = library_config(&cfg_file, &dir.path().join("split"), 2.0);
    let strip = |ckpt: &Path| {
        let path = ckpt.join(checkpoint::META_FILE);
        let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(meta.as_object_mut().unwrap().remove("data").is_some());
        std::fs::write(&path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
        assert_eq!(load(ckpt).data, None);
    };
    resume_matches(&cfg, &images, &tokens, &straight, 6, strip);
}

/// `--resume` goes on in the checkpoint's own folder when no `--out` is given (not the config's
/// output.dir), says what changed in the recipe, and a finished run resumed with nothing left to
/// train says so and changes nothing.
#[test]
fn resumed_runs_continue_in_their_folder_and_a_finished_one_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_resume_folder");
    let (cfg, _, out) = trained_run(dir.path(), &mut rng);
    // Nothing left: the checkpoint is at the end of the run's 4 steps.
    let (meta_before, metrics_before) = (std::fs::read(out.join("checkpoint/meta.json")).unwrap(), metrics(&out));
    let done = mapet(&["pretrain", "--config", s(&cfg), "--resume", s(&out.join("checkpoint"))]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let said = text(&done.stdout);
    assert!(said.contains("nothing to train: the checkpoint is at step 4, the end of this run's 4 steps"), "{said}");
    assert!(!said.contains("NaN"), "{said}");
    assert_eq!(std::fs::read(out.join("checkpoint/meta.json")).unwrap(), meta_before);
    assert_eq!(metrics(&out), metrics_before);

    // A copy of the run in another folder, resumed for a second epoch with a config that names
    // no output folder: the steps land beside the copy's checkpoint.
    let toml = std::fs::read_to_string(&cfg).unwrap();
    let (head, _) = toml.split_once("[output]").unwrap();
    let cfg = dir.path().join("no_out.toml");
    std::fs::write(&cfg, format!("{head}[output]\ncheckpoint_every = 0\n")).unwrap();
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(copy.join("checkpoint")).unwrap();
    for entry in std::fs::read_dir(out.join("checkpoint")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.join("checkpoint").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(out.join("metrics.csv"), copy.join("metrics.csv")).unwrap();
    let more = mapet(&["pretrain", "--config", s(&cfg), "--resume", s(&copy.join("checkpoint")), "--epochs", "2"]);
    assert!(more.status.success(), "{}", text(&more.stderr));
    let said = text(&more.stdout);
    assert!(said.contains("recipe differs from the checkpoint's (total steps 4 → 8)"), "{said}");
    assert_eq!(metrics(&copy).iter().map(|r| r.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    assert_eq!(load(&copy.join("checkpoint")).state.step, 8);
    assert_eq!(metrics(&out), metrics_before, "the config's output folder was written to");
    assert_eq!(std::fs::read(out.join("checkpoint/meta.json")).unwrap(), meta_before);

    // Through a link to the checkpoint folder, the run goes on beside the checkpoint itself.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(copy.join("checkpoint"), dir.path().join("latest")).unwrap();
        let mut linked = Command::new(data_common::mapet_bin());
        linked.current_dir(dir.path()).args(["pretrain", "--config", s(&cfg), "--resume", "latest", "--epochs", "3"]);
        let run = finish(linked);
        assert!(run.status.success(), "{}", text(&run.stderr));
        assert_eq!(metrics(&copy).len(), 12);
        assert!(!dir.path().join("metrics.csv").exists() && !dir.path().join("checkpoint").exists());
    }
    // A run's folder given for its checkpoint folder is refused naming the one meant; with no
    // data given (the demo, which writes its images where it runs) nothing is written anywhere.
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--resume", s(&copy)]));
    assert!(e.contains(&format!("give {}", s(&copy.join("checkpoint")))), "{e}");
    // (Run in the copy's folder with `--resume copy`: the output folder would be `.`.)
    let mut demo = Command::new(data_common::mapet_bin());
    demo.current_dir(dir.path()).args(["pretrain", "--resume", "copy"]);
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    let e = fails(&finish(demo));
    assert!(e.contains("--resume") && e.contains("not its checkpoint folder"), "{e}");
    let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(after.len(), before.len(), "the refused resume wrote into the folder it ran in: {after:?}");
    // The demo (no --config, no --data) resuming a checkpoint that is not the demo's model is
    // refused before the demo writes its images into the run's folder.
    let mut demo = Command::new(data_common::mapet_bin());
    demo.current_dir(dir.path()).args(["pretrain", "--resume", "copy/checkpoint"]);
    let before: Vec<_> = std::fs::read_dir(&copy).unwrap().map(|e| e.unwrap().file_name()).collect();
    let e = fails(&finish(demo));
    assert!(e.contains("it is not the demo's model") && e.contains("image 16 there, 64 here"), "{e}");
    let after: Vec<_> = std::fs::read_dir(&copy).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(after, before);
    // Resuming and starting over at once, and a config file that names no data, are refused.
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--resume", s(&copy.join("checkpoint")), "--overwrite"]));
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    let bare = dir.path().join("bare.toml");
    std::fs::write(&bare, "[train]\nepochs = 1\nwarmup_epochs = 0\n").unwrap();
    let e = fails(&mapet(&["pretrain", "--config", s(&bare), "--out", s(&dir.path().join("bare"))]));
    assert!(e.contains(s(&bare)) && e.contains("data.train"), "{e}");
    assert!(!dir.path().join("bare").exists());
}

/// A `mapet` child process, killed if the test ends before it does (a failed assertion must not
/// leave a 400,000-step run behind), with its stdout's lines arriving through a reader thread so
/// that every wait has a deadline.
#[cfg(unix)]
struct Running {
    child: std::process::Child,
    lines: Option<std::sync::mpsc::Receiver<String>>,
}

#[cfg(unix)]
impl Running {
    /// The next line of stdout within `secs` seconds; None once stdout has closed.
    fn line(&self, secs: u64) -> Option<String> {
        use std::sync::mpsc::RecvTimeoutError;
        match self.lines.as_ref()?.recv_timeout(Duration::from_secs(secs)) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no line from mapet in {secs} s"),
        }
    }

    /// Every line left until stdout closes, within `secs` seconds in all.
    fn rest(&self, secs: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        while let Some(line) = self.line(deadline.saturating_duration_since(Instant::now()).as_secs().max(1)) {
            out.push(line);
        }
        out
    }

    /// Its exit status, within `secs` seconds.
    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "mapet still running after {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal`.
    fn signal(&self, signal: i32) {
        // SAFETY: kill with a valid pid of our own child and a valid signal number.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }
}

#[cfg(unix)]
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A long run (100,000 epochs) of MODEL in `dir/out` with `extra` flags, started as `nohup`
/// starts it when `ignore_hup` (SIGHUP ignored), once it has printed its first step's line (a
/// line of its own: stdout is a pipe, not a terminal): the run and its output folder.
#[cfg(unix)]
fn long_run(dir: &Path, seed: &str, ignore_hup: bool, extra: &[&str]) -> (Running, PathBuf) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut rng = mapet::testing::rng(seed);
    let (images, tokens) = dataset(dir, 8, &[], &mut rng);
    let out = dir.join("out");
    let cfg = config(dir, "c.toml", &images, &tokens, &out, "");
    let mut cmd = Command::new(data_common::mapet_bin());
    cmd.args(["pretrain", "--config", s(&cfg), "--epochs", "100000"]).args(extra);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    if ignore_hup {
        // SAFETY: signal() is async-signal-safe, as a pre_exec hook must be.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break; // the test dropped its end: the pipe closes with this thread
            }
        }
    });
    let run = Running { child, lines: Some(lines) };
    let started = Instant::now();
    loop {
        let line = run.line(120).expect("mapet ended before its first step");
        if line.starts_with("step 1/400000 ") {
            assert!(line.contains(" loss ") && !line.contains('\r'), "{line}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no first step after 2 minutes");
    }
    (run, out)
}

/// SIGTERM (a job scheduler's, or `timeout`'s) stops a run as Ctrl-C does: after its step, with a
/// checkpoint, and an exit status that is not success (130); its progress, written to a pipe,
/// comes in lines.
#[cfg(unix)]
#[test]
fn a_terminated_run_writes_its_checkpoint_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let (mut run, out) = long_run(dir.path(), "bad_inputs_sigterm", false, &[]);
    run.signal(libc::SIGTERM);
    let rest = run.rest(60);
    assert_eq!(run.wait(60).code(), Some(130), "{rest:?}");
    let step = load(&out.join("checkpoint")).state.step;
    assert!(step >= 1 && rest.iter().any(|l| l.contains(&format!("checkpoint written at step {step}"))), "{rest:?}");
    assert_eq!(metrics(&out).len() as u64, step);
}

/// Under `nohup` (SIGHUP ignored when the run starts) a SIGHUP leaves the run training; and a
/// run whose stdout reader quits (`| head`) stops with a checkpoint instead of dying without one.
#[cfg(unix)]
#[test]
fn nohup_keeps_a_run_going_and_a_closed_stdout_stops_it_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut run, out) = long_run(dir.path(), "bad_inputs_nohup", true, &[]);
    let rows = metrics(&out).len();
    run.signal(libc::SIGHUP);
    // It goes on: more steps land in metrics.csv (written a step at a time), and it lives.
    let started = Instant::now();
    while metrics(&out).len() < rows + 20 {
        assert!(run.child.try_wait().unwrap().is_none(), "SIGHUP under nohup ended the run");
        assert!(started.elapsed() < Duration::from_secs(60), "no step after SIGHUP in a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its stdout's reader quits: at its next line (within 10 s) the run stops, with a checkpoint.
    run.lines = None;
    assert_eq!(run.wait(60).code(), Some(130));
    let step = load(&out.join("checkpoint")).state.step;
    assert!(step as usize >= rows + 20);
    assert_eq!(metrics(&out).len() as u64, step);
}

/// A second run into a folder a run is writing to is refused (the folder's lock), even with
/// `--overwrite`, and the running one is untouched.
#[cfg(unix)]
#[test]
fn a_second_run_into_a_busy_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints every 10 steps: an --overwrite that removed them before the lock would show.
    let (mut run, out) = long_run(dir.path(), "bad_inputs_lock", false, &["--set", "output.checkpoint_every=10"]);
    let started = Instant::now();
    while !out.join("checkpoint").join(checkpoint::META_FILE).is_file() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint in a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg = dir.path().join("c.toml");
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec!["pretrain", "--config", s(&cfg)];
        args.extend_from_slice(extra);
        let e = fails(&mapet(&args));
        assert!(e.contains(&format!("another mapet pretrain is writing to {}", s(&out))), "{extra:?}: {e}");
        assert!(out.join("checkpoint").join(checkpoint::META_FILE).is_file(), "{extra:?} removed the checkpoint");
    }
    assert!(run.child.try_wait().unwrap().is_none(), "the running run ended");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait(60).code(), Some(130));
    // Its checkpoint is its own, and whole.
    let step = load(&out.join("checkpoint")).state.step;
    assert_eq!(metrics(&out).len() as u64, step);
    // Free again: a run resumed from it goes on there.
    let more = mapet(&["pretrain", "--config", s(&cfg), "--resume", s(&out.join("checkpoint"))]);
    assert!(more.status.success() || text(&more.stdout).contains("nothing to train"), "{}", text(&more.stderr));
}

/// `--overwrite` removes the earlier run's checkpoint when it starts, so a new run that fails
/// before its first checkpoint leaves no mix of the two; values out of range (clip = inf), an
/// empty output folder and an output folder inside the training images are refused before
/// anything is written.
#[test]
fn overwrite_starts_clean_and_bad_outputs_are_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_overwrite_clean");
    let (cfg, images, out) = trained_run(dir.path(), &mut rng);
    let before = snapshot(&out);
    for (flags, needle) in [
        (&["--set", "train.clip=inf"][..], "--set train.clip=inf: train.clip: inf must be finite"),
        (&["--out", ""][..], "output.dir: empty"),
    ] {
        let mut args = vec!["pretrain", "--config", s(&cfg), "--overwrite"];
        args.extend_from_slice(flags);
        let e = fails(&mapet(&args));
        assert!(e.contains(needle), "{flags:?}: {e}");
        assert!(snapshot(&out) == before);
    }
    for inside in [images.join("run"), images.join("a").join("b")] {
        let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--out", s(&inside)]));
        assert!(e.contains("is inside data.train"), "{e}");
    }
    assert!(!images.join("run").exists() && !images.join("a").exists());
    // A run started over that overflows at once: the earlier checkpoint is gone, not kept as
    // the new run's.
    let e = fails(&mapet(&["pretrain", "--config", s(&cfg), "--overwrite", "--set", "train.peak_lr=1e30"]));
    assert!(e.contains("non-finite") && !e.contains("is kept as it was"), "{e}");
    let rows = metrics(&out);
    assert!(
        !out.join("checkpoint").exists() || load(&out.join("checkpoint")).state.step == rows.len() as u64,
        "{rows:?}"
    );
}

/// The demo resumed into another folder that holds a run is refused before the demo writes its
/// images there; a run whose stdout fails for another reason than a closed pipe (a full disk)
/// trains on.
#[test]
fn the_demo_resumed_elsewhere_and_a_full_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("bad_inputs_demo_elsewhere");
    let (_, _, out) = trained_run(dir.path(), &mut rng);
    let demo = dir.path().join("demo");
    let quick = ["--epochs", "1", "--set", "train.warmup_epochs=0"];
    let mut args = vec!["pretrain", "--out", s(&demo)];
    args.extend_from_slice(&quick);
    assert!(mapet(&args).status.success());
    let before = snapshot(&out);
    let ckpt = demo.join("checkpoint");
    let mut args = vec!["pretrain", "--resume", s(&ckpt), "--out", s(&out), "--epochs", "2"];
    args.extend_from_slice(&quick[2..]);
    let e = fails(&mapet(&args));
    assert!(e.contains("holds an earlier run"), "{e}");
    assert!(snapshot(&out) == before, "the refused demo wrote into {}", out.display());
    #[cfg(target_os = "linux")]
    {
        let full = std::fs::File::create("/dev/full").unwrap();
        let mut cmd = Command::new(data_common::mapet_bin());
        cmd.args(["pretrain", "--resume", s(&ckpt), "--epochs", "3"]).args(&quick[2..]).stdout(full);
        let status = cmd.status().unwrap();
        assert!(status.success(), "{status:?}");
        assert_eq!(load_demo(&ckpt).state.step, 3);
    }
}

/// A checkpoint of the demo's model.
fn load_demo(dir: &Path) -> checkpoint::Checkpoint {
    checkpoint::load(dir, &checkpoint::read_config(dir).unwrap()).unwrap()
}
