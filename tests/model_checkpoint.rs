//! Checkpoints: exact resume (a run interrupted by save and load repeats the uninterrupted one
//! bit for bit), the files' layout, and every way a checkpoint can be wrong or a save can fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mapet::io::{write_f32_safetensors, SafeTensorsFile};
use mapet::model::checkpoint::{self, EXP_AVG, EXP_AVG_SQ, META_FILE, MODEL_FILE, OPTIMIZER_FILE};
use mapet::model::cpu::{Batch, CpuModel, Images};
use mapet::model::optim::LrSchedule;
use mapet::model::params::{ModelConfig, ParamLayout};
use mapet::model::train::{train_step, Recipe, RngState, TrainState};
use mapet::testing;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// N = 17 tokens, C = 5, P = 12; depth 2, so drop path acts on the second block.
const TINY: ModelConfig = ModelConfig { image: 16, patch: 4, dim: 16, depth: 2, heads: 2, vocab: 11, context: 5 };

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mapet-{test}-{}-{:x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_batch(cfg: &ModelConfig, batch: usize, rng: &mut impl Rng) -> Batch {
    let n = cfg.n_tokens();
    let mut b = Batch {
        batch,
        images: Images::F32(testing::uniform(rng, batch * 3 * cfg.image * cfg.image, 1.0)),
        tokens: (0..batch * (n - 1)).map(|_| rng.random_range(0..cfg.vocab as i32)).collect(),
        ranks: Vec::new(),
    };
    b.resample_ranks(cfg, rng);
    b
}

/// Drop path on (0.3 at the last block) and permutations drawn every step, two micro-batches: the
/// generator's position decides every step's loss.
fn recipe() -> Recipe {
    let mut r = Recipe::paper(4, 2);
    r.schedule = LrSchedule::new(2e-3, 2, 20);
    r.drop_path = 0.3;
    r.micro_batches = 2;
    r.resample_ranks = true;
    r
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `steps` updates on `data[from..]`, returning the loss bits.
fn run(
    model: &CpuModel,
    state: &mut TrainState,
    recipe: &Recipe,
    data: &[Vec<Batch>],
    from: usize,
    steps: usize,
) -> Vec<u32> {
    (from..from + steps)
        .map(|i| {
            let mut mb = data[i].clone();
            train_step(model, state, recipe, &mut mb).unwrap().loss.to_bits()
        })
        .collect()
}

fn trained_state(model: &CpuModel, rng: &mut impl Rng, steps: usize) -> TrainState {
    let mut state = TrainState::new(&model.layout, rng.random());
    let data: Vec<Vec<Batch>> =
        (0..steps).map(|_| vec![random_batch(&TINY, 2, rng), random_batch(&TINY, 2, rng)]).collect();
    run(model, &mut state, &recipe(), &data, 0, steps);
    state
}

#[test]
fn resumed_run_repeats_the_uninterrupted_one_bit_for_bit() {
    let mut rng = testing::rng("resumed_run_repeats_the_uninterrupted_one_bit_for_bit");
    let model = CpuModel::new(TINY).unwrap();
    let recipe = recipe();
    let k = 4;
    let data: Vec<Vec<Batch>> =
        (0..2 * k).map(|_| vec![random_batch(&TINY, 2, &mut rng), random_batch(&TINY, 2, &mut rng)]).collect();
    let seed = rng.random();

    let mut straight = TrainState::new(&model.layout, seed);
    let want = run(&model, &mut straight, &recipe, &data, 0, 2 * k);

    let scratch = Scratch::new("resume");
    let dir = scratch.0.join("ckpt");
    let mut first = TrainState::new(&model.layout, seed);
    let mut got = run(&model, &mut first, &recipe, &data, 0, k);
    first.epoch = 1;
    checkpoint::save(&dir, &model.layout, &recipe, &first).unwrap();
    let loaded = checkpoint::load(&dir, &TINY).unwrap();
    assert_eq!(loaded.dir, dir);
    assert_eq!(loaded.recipe, recipe);
    assert_eq!((loaded.state.step, loaded.state.epoch), (k as u64, 1));
    assert_eq!(bits(&loaded.state.params), bits(&first.params));
    assert_eq!(bits(&loaded.state.m), bits(&first.m));
    assert_eq!(bits(&loaded.state.v), bits(&first.v));
    assert_eq!(loaded.state.rng, first.rng);
    drop(first);
    let mut resumed = loaded.state.clone();
    got.extend(run(&model, &mut resumed, &loaded.recipe, &data, k, k));
    eprintln!("losses: {:?}", want.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>());
    assert_eq!(got, want, "loss sequence of the resumed run differs");
    assert_eq!(bits(&resumed.params), bits(&straight.params));
    assert_eq!(bits(&resumed.m), bits(&straight.m));
    assert_eq!(resumed.step, 2 * k as u64);
    assert_eq!(resumed.rng, straight.rng);

    // The generator's position matters: resuming with a generator one word further on (one more
    // draw, as a lost or replayed rng would give) changes the losses.
    let mut shifted = loaded.state.clone();
    shifted.rng.next_u32();
    let other = run(&model, &mut shifted, &recipe, &data, k, k);
    assert_ne!(other, want[k..], "the rng position must affect the losses");
}

#[test]
fn rng_position_round_trips_exactly() {
    let mut rng = testing::rng("rng_position_round_trips_exactly");
    let mut a = ChaCha8Rng::seed_from_u64(rng.random());
    a.set_stream(rng.random());
    // Stop mid-block: an odd number of words.
    for _ in 0..rng.random_range(1..200) {
        a.next_u32();
    }
    a.next_u64();
    let mut b = RngState::of(&a).restore();
    assert_eq!(a, b);
    let xs: Vec<u32> = (0..1000).map(|_| a.next_u32()).collect();
    let ys: Vec<u32> = (0..1000).map(|_| b.next_u32()).collect();
    assert_eq!(xs, ys);
}

#[test]
fn files_hold_the_authors_names_and_the_moments() {
    let mut rng = testing::rng("files_hold_the_authors_names_and_the_moments");
    let model = CpuModel::new(TINY).unwrap();
    let state = trained_state(&model, &mut rng, 2);
    let scratch = Scratch::new("files");
    let dir = scratch.0.join("ckpt");
    checkpoint::save(&dir, &model.layout, &recipe(), &state).unwrap();

    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, [META_FILE, MODEL_FILE, OPTIMIZER_FILE]);
    let siblings: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, ["ckpt"], "no temporary or old folder may remain");

    let model_file = SafeTensorsFile::open(&dir.join(MODEL_FILE)).unwrap();
    let mut got = model_file.names();
    got.sort();
    let mut want: Vec<String> = model.layout.specs.iter().map(|s| s.name.clone()).collect();
    want.sort();
    assert_eq!(got, want, "model.safetensors must hold exactly the state-dict names");
    let opt = SafeTensorsFile::open(&dir.join(OPTIMIZER_FILE)).unwrap();
    assert_eq!(opt.names().len(), 2 * model.layout.specs.len());
    for s in &model.layout.specs {
        let (shape, w) = model_file.f32_tensor(&s.name).unwrap();
        assert_eq!(shape, s.shape, "{}", s.name);
        assert_eq!(bits(&w), bits(&state.params[s.range()]), "{}", s.name);
        let (shape, m) = opt.f32_tensor(&format!("{EXP_AVG}{}", s.name)).unwrap();
        assert_eq!((shape, bits(&m)), (s.shape.clone(), bits(&state.m[s.range()])), "{}", s.name);
        let (shape, v) = opt.f32_tensor(&format!("{EXP_AVG_SQ}{}", s.name)).unwrap();
        assert_eq!((shape, bits(&v)), (s.shape.clone(), bits(&state.v[s.range()])), "{}", s.name);
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(META_FILE)).unwrap()).unwrap();
    assert_eq!(meta["step"], 2);
    assert_eq!(meta["config"]["dim"], 16);
    assert_eq!(meta["format_version"], checkpoint::FORMAT_VERSION);
    assert_eq!(meta["rng"]["seed"].as_str().unwrap().len(), 64);

    // Saving again over it replaces it.
    let mut later = state.clone();
    later.step += 1;
    checkpoint::save(&dir, &model.layout, &recipe(), &later).unwrap();
    assert_eq!(checkpoint::load(&dir, &TINY).unwrap().state.step, 3);
    let siblings: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, ["ckpt"]);
}

#[test]
fn data_position_round_trips_and_older_checkpoints_load_without_it() {
    let mut rng = testing::rng("data_position_round_trips_and_older_checkpoints_load_without_it");
    let model = CpuModel::new(TINY).unwrap();
    let state = trained_state(&model, &mut rng, 1);
    let scratch = Scratch::new("data-position");
    let dir = scratch.0.join("ckpt");
    let position = checkpoint::DataPosition {
        epoch_steps: rng.random_range(1..1000),
        next_image: rng.random_range(1..1_000_000_000_000),
    };
    checkpoint::save_with_data(&dir, &model.layout, &recipe(), &state, Some(position)).unwrap();
    let meta_path = dir.join(META_FILE);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    assert_eq!(meta["data"]["epoch_steps"], position.epoch_steps);
    assert_eq!(meta["data"]["next_image"], position.next_image);
    let loaded = checkpoint::load(&dir, &TINY).unwrap();
    assert_eq!(loaded.data, Some(position));
    assert_eq!(bits(&loaded.state.params), bits(&state.params));

    // A meta file of before the field (the same checkpoint, the field removed) still loads,
    // without a position; so does a checkpoint saved without one.
    let mut old: serde_json::Value = meta.clone();
    old.as_object_mut().unwrap().remove("data");
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    let loaded = checkpoint::load(&dir, &TINY).unwrap();
    assert_eq!(loaded.data, None);
    assert_eq!((loaded.state.step, loaded.state.epoch), (state.step, state.epoch));
    checkpoint::save(&dir, &model.layout, &recipe(), &state).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    assert!(meta.get("data").is_none(), "{meta}");
    assert_eq!(checkpoint::load(&dir, &TINY).unwrap().data, None);
}

fn expect_err(result: mapet::Result<checkpoint::Checkpoint>, needles: &[&str]) {
    let err = match result {
        Ok(_) => panic!("expected an error mentioning {needles:?}"),
        Err(e) => e.to_string(),
    };
    eprintln!("{err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

/// Rewrites a safetensors file with `edit` applied to its (name, shape, values) list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let file = SafeTensorsFile::open(path).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .names()
        .into_iter()
        .map(|n| {
            let (shape, v) = file.f32_tensor(&n).unwrap();
            (n, shape, v)
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), &v[..])).collect();
    write_f32_safetensors(path, &views, HashMap::new()).unwrap();
}

#[test]
fn bad_checkpoints_are_refused_naming_file_and_field() {
    let mut rng = testing::rng("bad_checkpoints_are_refused_naming_file_and_field");
    let model = CpuModel::new(TINY).unwrap();
    let state = trained_state(&model, &mut rng, 1);
    let scratch = Scratch::new("bad");
    let fresh = |name: &str| {
        let dir = scratch.0.join(name);
        checkpoint::save(&dir, &model.layout, &recipe(), &state).unwrap();
        checkpoint::load(&dir, &TINY).unwrap();
        dir
    };

    // Another config: the differing field is named.
    let dir = fresh("config");
    expect_err(checkpoint::load(&dir, &ModelConfig { dim: 32, ..TINY }), &[META_FILE, "`dim`", "16", "32"]);
    expect_err(checkpoint::load(&dir, &ModelConfig { vocab: 12, ..TINY }), &[META_FILE, "`vocab`"]);
    expect_err(checkpoint::load(&dir, &ModelConfig { depth: 3, ..TINY }), &[META_FILE, "`depth`"]);

    // Truncated and missing files.
    let dir = fresh("truncated");
    let path = dir.join(MODEL_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    expect_err(checkpoint::load(&dir, &TINY), &[MODEL_FILE]);
    let dir = fresh("missing");
    std::fs::remove_file(dir.join(OPTIMIZER_FILE)).unwrap();
    expect_err(checkpoint::load(&dir, &TINY), &[OPTIMIZER_FILE]);
    let dir = fresh("nometa");
    std::fs::remove_file(dir.join(META_FILE)).unwrap();
    expect_err(checkpoint::load(&dir, &TINY), &[META_FILE]);
    let dir = fresh("badmeta");
    std::fs::write(dir.join(META_FILE), b"{\"format\": \"mapet-checkpoint\"").unwrap();
    expect_err(checkpoint::load(&dir, &TINY), &[META_FILE]);
    expect_err(checkpoint::load(&scratch.0.join("nothing"), &TINY), &["nothing"]);

    // A tensor with the wrong shape (same element count, transposed), a wrong name.
    let dir = fresh("shape");
    rewrite(&dir.join(MODEL_FILE), |t| {
        let e = t.iter_mut().find(|e| e.0 == "blocks.1.attn.kv.weight").unwrap();
        e.1 = vec![e.1[1], e.1[0]];
    });
    expect_err(checkpoint::load(&dir, &TINY), &[MODEL_FILE, "blocks.1.attn.kv.weight", "[16, 32]", "[32, 16]"]);
    let dir = fresh("name");
    rewrite(&dir.join(MODEL_FILE), |t| t.iter_mut().find(|e| e.0 == "norm.weight").unwrap().0 = "norm.scale".into());
    expect_err(checkpoint::load(&dir, &TINY), &[MODEL_FILE, "`norm.weight`"]);
    let dir = fresh("optshape");
    rewrite(&dir.join(OPTIMIZER_FILE), |t| {
        let e = t.iter_mut().find(|e| e.0 == "exp_avg_sq.decoder.bias").unwrap();
        e.1 = vec![1, e.1[0]];
    });
    expect_err(checkpoint::load(&dir, &TINY), &[OPTIMIZER_FILE, "exp_avg_sq.decoder.bias"]);
}

#[test]
fn failed_saves_leave_the_previous_checkpoint_loadable() {
    let mut rng = testing::rng("failed_saves_leave_the_previous_checkpoint_loadable");
    let model = CpuModel::new(TINY).unwrap();
    let layout: &ParamLayout = &model.layout;
    let state = trained_state(&model, &mut rng, 2);
    let mut newer = state.clone();
    newer.step = 99;
    let scratch = Scratch::new("failsave");
    let dir = scratch.0.join("ckpt");
    let tmp = scratch.0.join("ckpt.tmp");
    let old = scratch.0.join("ckpt.old");
    checkpoint::save(&dir, layout, &recipe(), &state).unwrap();
    let loads_step = |want: u64| {
        let c = checkpoint::load(&dir, &TINY).unwrap();
        assert_eq!(c.state.step, want);
        assert_eq!(bits(&c.state.params), bits(&state.params));
    };

    // The temporary folder's name is taken by a file: the save fails before touching `dir`.
    std::fs::write(&tmp, b"in the way").unwrap();
    let err = checkpoint::save(&dir, layout, &recipe(), &newer).unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("ckpt.tmp"), "{err}");
    loads_step(2);
    std::fs::remove_file(&tmp).unwrap();

    // A target under a regular file cannot be created.
    let file = scratch.0.join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let err = checkpoint::save(&file.join("ckpt"), layout, &recipe(), &newer).unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("a_file"), "{err}");
    loads_step(2);

    // A state that does not fit the layout is refused before anything is written.
    let mut short = newer.clone();
    short.v.pop();
    assert!(checkpoint::save(&dir, layout, &recipe(), &short).unwrap_err().to_string().contains("state.v"));
    loads_step(2);

    // A folder that is not a checkpoint is never replaced.
    let foreign = scratch.0.join("photos");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("cat.jpg"), b"meow").unwrap();
    let err = checkpoint::save(&foreign, layout, &recipe(), &newer).unwrap_err();
    eprintln!("{err}");
    assert_eq!(std::fs::read(foreign.join("cat.jpg")).unwrap(), b"meow");

    // A read-only parent folder (skipped when running as root, where permissions do not bind).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = scratch.0.join("ro");
        std::fs::create_dir(&ro).unwrap();
        checkpoint::save(&ro.join("ckpt"), layout, &recipe(), &state).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"").is_ok() {
            eprintln!("SKIP read-only case: permissions do not bind for this user");
        } else {
            assert!(checkpoint::save(&ro.join("ckpt"), layout, &recipe(), &newer).is_err());
            assert_eq!(checkpoint::load(&ro.join("ckpt"), &TINY).unwrap().state.step, 2);
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // A save interrupted between its renames: `dir` moved to `dir.old`, a partial `dir.tmp`.
    // Loading falls back to `dir.old`; the next save completes and cleans up both.
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join(MODEL_FILE), b"partial").unwrap();
    let c = checkpoint::load(&dir, &TINY).unwrap();
    assert_eq!((c.state.step, c.dir.clone()), (2, old.clone()));
    checkpoint::save(&dir, layout, &recipe(), &newer).unwrap();
    assert_eq!(checkpoint::load(&dir, &TINY).unwrap().state.step, 99);
    assert!(!tmp.exists() && !old.exists());
}
