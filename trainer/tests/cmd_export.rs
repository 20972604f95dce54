//! `mapet export`: a checkpoint's backbone under timm's ViT names. Every expected tensor is there
//! with its shape and the checkpoint's exact values, `attn.qkv` stacks q's rows then kv's, and
//! nothing of pre-training (mask token, decoder) is written.

use std::collections::BTreeMap;
use std::path::Path;

use mapet::io::SafeTensorsFile;
use mapet::model::checkpoint;
use mapet::model::train::{Recipe, TrainState};
use mapet::model::{ModelConfig, ParamLayout};
use mapet_trainer::cmd::export;

const CONFIG: ModelConfig = ModelConfig { image: 16, patch: 8, dim: 12, depth: 2, heads: 2, vocab: 10, context: 2 };

/// A checkpoint of random parameters (every value distinct in practice) in `dir`.
fn random_checkpoint(dir: &Path) {
    let layout = ParamLayout::new(CONFIG).unwrap();
    let mut state = TrainState::new(&layout, 0);
    let mut rng = mapet::testing::rng("cmd_export");
    state.params = mapet::testing::uniform(&mut rng, layout.total, 1.0);
    state.step = 17;
    checkpoint::save(dir, &layout, &Recipe::paper(8, 10), &state).unwrap();
}

fn run(args: &[&str]) -> Result<(), String> {
    export::run(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
}

/// timm's names and shapes for CONFIG, written out here independently of the command.
fn expected() -> BTreeMap<String, Vec<usize>> {
    let (d, n, p) = (CONFIG.dim, CONFIG.n_tokens(), CONFIG.patch);
    let mut m = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>| assert!(m.insert(name, shape).is_none());
    put("cls_token".into(), vec![1, 1, d]);
    put("pos_embed".into(), vec![1, n, d]);
    put("patch_embed.proj.weight".into(), vec![d, 3, p, p]);
    put("patch_embed.proj.bias".into(), vec![d]);
    for i in 0..CONFIG.depth {
        let b = |s: &str| format!("blocks.{i}.{s}");
        for (name, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("ls1.gamma", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![4 * d, d]),
            ("mlp.fc1.bias", vec![4 * d]),
            ("mlp.fc2.weight", vec![d, 4 * d]),
            ("mlp.fc2.bias", vec![d]),
            ("ls2.gamma", vec![d]),
        ] {
            put(b(name), shape);
        }
    }
    put("norm.weight".into(), vec![d]);
    put("norm.bias".into(), vec![d]);
    m
}

#[test]
fn export_writes_the_backbone_under_timm_names() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    random_checkpoint(&ckpt);
    let out = dir.path().join("vit.safetensors");
    run(&["--checkpoint", ckpt.to_str().unwrap(), "--timm", out.to_str().unwrap()]).unwrap();

    let file = SafeTensorsFile::open(&out).unwrap();
    let source = SafeTensorsFile::open(&ckpt.join(checkpoint::MODEL_FILE)).unwrap();
    let want = expected();
    let mut names = file.names();
    names.sort();
    assert_eq!(names, want.keys().cloned().collect::<Vec<_>>(), "tensor names differ from timm's");
    assert!(!names.iter().any(|n| n == "mask_positional_token" || n.starts_with("decoder.")));

    let d = CONFIG.dim;
    for (name, shape) in &want {
        let (got_shape, got) = file.f32_tensor(name).unwrap();
        assert_eq!(&got_shape, shape, "{name}");
        if let Some(prefix) = name.strip_suffix("attn.qkv.weight").or_else(|| name.strip_suffix("attn.qkv.bias")) {
            let kind = if name.ends_with("weight") { "weight" } else { "bias" };
            let (_, q) = source.f32_tensor(&format!("{prefix}attn.q.{kind}")).unwrap();
            let (_, kv) = source.f32_tensor(&format!("{prefix}attn.kv.{kind}")).unwrap();
            let per_row = if kind == "weight" { d } else { 1 };
            assert_eq!(q.len(), d * per_row);
            assert_eq!(kv.len(), 2 * d * per_row);
            assert_eq!(&got[..d * per_row], &q[..], "{name}: the first D rows are not q");
            assert_eq!(&got[d * per_row..], &kv[..], "{name}: the last 2D rows are not kv");
        } else {
            let (src_shape, src) = source.f32_tensor(name).unwrap();
            assert_eq!(&src_shape, shape, "{name}");
            assert_eq!(got, src, "{name}: values differ from the checkpoint");
        }
    }
    let meta = file.metadata();
    assert_eq!(meta.get("embed_dim").map(String::as_str), Some("12"));
    assert_eq!(meta.get("num_heads").map(String::as_str), Some("2"));
    assert!(meta.get("source").is_some_and(|s| s.contains("step 17")));
    // Written atomically: no temporary file left behind.
    assert!(!dir.path().join("vit.safetensors.tmp").exists());
}

#[test]
fn bad_inputs_are_errors_naming_the_flag_or_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-checkpoint");
    let out = dir.path().join("out.safetensors");
    let e = run(&["--checkpoint", missing.to_str().unwrap(), "--timm", out.to_str().unwrap()]).unwrap_err();
    assert!(e.contains(missing.to_str().unwrap()) && e.contains("--checkpoint"), "{e}");
    assert!(!out.exists());

    let ckpt = dir.path().join("ckpt");
    random_checkpoint(&ckpt);
    let e = run(&["--checkpoint", ckpt.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("--timm"), "{e}");
    let e = run(&["--timm", out.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("--checkpoint"), "{e}");
    let e = run(&["--checkpoint", ckpt.to_str().unwrap(), "--timm", "x", "--decoder", "1"]).unwrap_err();
    assert!(e.contains("--decoder"), "{e}");
    // An output in a folder that does not exist.
    let nowhere = dir.path().join("no-dir").join("out.safetensors");
    let e = run(&["--checkpoint", ckpt.to_str().unwrap(), "--timm", nowhere.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("--timm") && e.contains(nowhere.to_str().unwrap()), "{e}");
    // A folder that is not a checkpoint.
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let e = run(&["--checkpoint", dir.path().join("empty").to_str().unwrap(), "--timm", out.to_str().unwrap()])
        .unwrap_err();
    assert!(e.contains("meta.json"), "{e}");
}
