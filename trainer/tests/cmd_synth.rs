//! `mapet synth`: the folder it writes is indexed in generation order, every image decodes at one
//! of the stated sizes, the token file fits the model's grid and vocabulary, and the same seed
//! writes the same bytes (a different seed, different ones).

mod data_common;

use std::process::Command;

use mapet_trainer::cmd::synth::{self, SIZES};
use mapet_trainer::data::{decode, read_npy, ImageIndex, NpyData};

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let index = ImageIndex::from_folder(dir).unwrap();
    (0..index.len())
        .map(|i| (index.full_path(i).display().to_string(), std::fs::read(index.full_path(i)).unwrap()))
        .collect()
}

#[test]
fn synthetic_set_decodes_and_its_tokens_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth::write_set(tmp.path(), 9, 4, 37, 3, 5, 2).unwrap();
    let index = ImageIndex::from_folder(&set.images).unwrap();
    assert_eq!(index.len(), 9);
    for i in 0..index.len() {
        // Index order is generation order: entry i is image i, whose size is SIZES[i % 4].
        let name = index.full_path(i).file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!("{i:07}.jpg"));
        let img = decode(&std::fs::read(index.full_path(i)).unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), SIZES[i % SIZES.len()], "image {i}");
    }
    let npy = read_npy(&set.tokens).unwrap();
    assert_eq!(npy.shape, vec![9, 9]);
    let NpyData::I16(ids) = &npy.data else { panic!("expected int16 tokens, got {:?}", npy.data.dtype()) };
    assert!(ids.iter().all(|&t| (0..37).contains(&t)), "{ids:?}");
    // Not constant: uniform ids over 37 values.
    assert!(ids.iter().any(|&t| t != ids[0]));
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Different thread counts must not change the bytes.
    let sa = synth::write_set(a.path(), 6, 2, 100, 2, 11, 1).unwrap();
    let sb = synth::write_set(b.path(), 6, 2, 100, 2, 11, 3).unwrap();
    let sc = synth::write_set(c.path(), 6, 2, 100, 2, 12, 2).unwrap();
    let strip = |v: Vec<(String, Vec<u8>)>, root: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        v.into_iter().map(|(p, bytes)| (p.replace(&root.display().to_string(), ""), bytes)).collect()
    };
    let (fa, fb, fc) =
        (strip(files(&sa.images), a.path()), strip(files(&sb.images), b.path()), strip(files(&sc.images), c.path()));
    assert_eq!(fa, fb, "same seed, different thread counts");
    assert_eq!(std::fs::read(&sa.tokens).unwrap(), std::fs::read(&sb.tokens).unwrap());
    assert_eq!(fa.len(), fc.len());
    assert!(fa.iter().zip(&fc).all(|(x, y)| x.1 != y.1), "another seed should change every image");
    assert_ne!(std::fs::read(&sa.tokens).unwrap(), std::fs::read(&sc.tokens).unwrap());
}

#[test]
fn the_command_writes_the_set_and_refuses_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("set");
    let run = |args: &[&str]| Command::new(data_common::mapet_bin()).arg("synth").args(args).output().unwrap();
    let o = run(&["--out", out.to_str().unwrap(), "--images", "5", "--vocab", "40000", "--grid", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ImageIndex::from_folder(&out.join("images")).unwrap().len(), 5);
    // A vocabulary past int16 is stored as int32.
    let npy = read_npy(&out.join("tokens.npy")).unwrap();
    assert!(matches!(npy.data, NpyData::I32(_)), "{:?}", npy.data.dtype());
    let o = run(&["--out", out.to_str().unwrap(), "--images", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--images"), "{err}");
    let o = run(&["--images", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--out"), "{err}");
}
