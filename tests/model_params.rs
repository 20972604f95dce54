//! The parameter layout against the golden cases: every case's `weights.*` load under the
//! official names and shapes of the config in its header; a wrong name, shape or a truncated
//! file is refused with the file and tensor named; save → load round-trips bit for bit.

use mapet::io::SafeTensorsFile;
use mapet::model::{ModelConfig, ParamLayout};
use mapet::testing;

pub fn golden_dir() -> std::path::PathBuf {
    testing::project_root().join("tests/data/golden")
}

fn config_of(file: &SafeTensorsFile) -> ModelConfig {
    let g = |k: &str| file.metadata_usize(k).unwrap();
    ModelConfig {
        image: g("img_size"),
        patch: g("patch_size"),
        dim: g("embed_dim"),
        depth: g("depth"),
        heads: g("num_heads"),
        vocab: g("vocab_size"),
        context: g("context_tokens"),
    }
}

#[test]
fn every_golden_case_loads_under_official_names() {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    cases.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    assert!(cases.len() >= 6, "golden cases missing from {}", golden_dir().display());
    for path in cases {
        let file = SafeTensorsFile::open(&path).unwrap();
        let layout = ParamLayout::new(config_of(&file)).unwrap();
        let flat = layout.load_safetensors(&path, "weights.").unwrap();
        let spec = layout.get("decoder.weight").unwrap();
        let (_, truth) = file.f64_tensor("weights.decoder.weight").unwrap();
        assert_eq!(flat[spec.range()].len(), truth.len());
        assert!(flat[spec.range()].iter().zip(&truth).all(|(&a, &b)| a == b as f32));
        // A layout for another config must not load it.
        let mut other = layout.config;
        other.dim += other.heads;
        let err = ParamLayout::new(other).unwrap().load_safetensors(&path, "weights.").unwrap_err().to_string();
        assert!(err.contains("shape") && err.contains(&path.display().to_string()), "{err}");
    }
}

#[test]
fn save_then_load_round_trips_and_bad_files_are_named() {
    let layout =
        ParamLayout::new(ModelConfig { image: 32, patch: 8, dim: 16, depth: 2, heads: 2, vocab: 11, context: 5 })
            .unwrap();
    let mut rng = testing::rng("round_trip");
    let flat = layout.init(&mut rng);
    let dir = std::env::temp_dir().join(format!("mapet-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    layout.save_safetensors(&flat, &path, Default::default()).unwrap();
    let back = layout.load_safetensors(&path, "").unwrap();
    for s in &layout.specs {
        assert_eq!(&back[s.range()], &flat[s.range()], "{}", s.name);
    }
    // Truncated file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = layout.load_safetensors(&cut, "").unwrap_err().to_string();
    assert!(err.contains("cut.safetensors"), "{err}");
    // Missing tensor under a wrong prefix.
    let err = layout.load_safetensors(&path, "weights.").unwrap_err().to_string();
    assert!(err.contains("weights.cls_token"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
