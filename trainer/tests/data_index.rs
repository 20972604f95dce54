//! Image index: folder walk and order, manifests, holdout splits, and their errors.

mod data_common;

use std::path::PathBuf;

use data_common::make_tree;
use mapet_trainer::data::{split_holdout, DataError, ImageIndex};

#[test]
fn folder_index_is_sorted_nested_and_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("folder_index");
    let tree = make_tree(dir.path(), &mut rng, 3);
    let index = ImageIndex::from_folder(dir.path()).unwrap();
    assert_eq!(index.paths(), &tree.images[..]);
    assert_eq!(index.len(), tree.images.len());
    assert_eq!(index.source_len(), index.len());
    assert_eq!(index.ids(), &(0..index.len()).collect::<Vec<_>>()[..]);
    // Sorted by components: `B/...` (uppercase sorts first as a byte) before `a/...`, and the
    // nested `a/sub/deep/x.jpeg` after `a/rgba.PNG`.
    let names: Vec<String> = index.paths().iter().map(|p| p.to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"B/IMG_0003.JPG".to_string()), "uppercase .JPG indexed: {names:?}");
    assert!(names.contains(&"a/b.Jpeg".to_string()), "mixed-case .Jpeg indexed: {names:?}");
    assert!(names.contains(&"a/rgba.PNG".to_string()), "uppercase .PNG indexed: {names:?}");
    assert!(!names.iter().any(|n| n.ends_with(".txt") || n == "README"), "non-images ignored: {names:?}");
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(pos("B/IMG_0003.JPG") < pos("a/b.Jpeg"));
    assert!(pos("a/rgba.PNG") < pos("a/sub/deep/x.jpeg"));
    assert!(pos("a/sub/deep/x.jpeg") < pos("gray.png"));
    assert_eq!(index.full_path(pos("gray.png")), dir.path().join("gray.png"));
    // Building it twice gives the same index.
    assert_eq!(ImageIndex::from_folder(dir.path()).unwrap(), index);
}

#[test]
fn component_order_differs_from_string_order() {
    // "a/z.jpg" < "a-b/c.jpg" by components ('a' < 'a-b'), though '/' > '-' as strings.
    let dir = tempfile::tempdir().unwrap();
    for rel in ["a-b/c.jpg", "a/z.jpg", "a.jpg"] {
        data_common::write_bytes(&dir.path().join(rel), b"x");
    }
    let index = ImageIndex::from_folder(dir.path()).unwrap();
    let want: Vec<PathBuf> = ["a/z.jpg", "a-b/c.jpg", "a.jpg"].iter().map(PathBuf::from).collect();
    assert_eq!(index.paths(), &want[..]);
}

#[test]
fn missing_and_empty_folders_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no_such_folder");
    let e = ImageIndex::from_folder(&missing).unwrap_err().to_string();
    assert!(e.contains("no_such_folder") && e.contains("cannot open"), "{e}");

    let empty = dir.path().join("empty");
    data_common::write_bytes(&empty.join("sub/notes.txt"), b"text");
    let e = ImageIndex::from_folder(&empty).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("no images"), "{e}");

    let file = dir.path().join("file.jpg");
    data_common::write_bytes(&file, b"x");
    let e = ImageIndex::from_folder(&file).unwrap_err().to_string();
    assert!(e.contains("file.jpg") && e.contains("not a folder"), "{e}");
}

#[test]
fn manifest_keeps_its_order_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("manifest");
    make_tree(dir.path(), &mut rng, 2);
    let index = ImageIndex::from_folder(dir.path()).unwrap();
    let manifest = dir.path().join("list.txt");
    index.write_manifest(&manifest).unwrap();
    assert_eq!(ImageIndex::from_manifest(&manifest, dir.path()).unwrap(), index);

    // Reversed, with CRLF endings and blank lines: file order, not sorted.
    let mut reversed: Vec<PathBuf> = index.paths().to_vec();
    reversed.reverse();
    let text: String = reversed.iter().map(|p| format!("{}\r\n\r\n", p.display())).collect();
    std::fs::write(&manifest, format!("\n{text}")).unwrap();
    let m = ImageIndex::from_manifest(&manifest, dir.path()).unwrap();
    assert_eq!(m.paths(), &reversed[..]);
    assert_eq!(m.id(0), 0);
}

#[test]
fn manifest_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("m.txt");
    let e = ImageIndex::from_manifest(&manifest, dir.path()).unwrap_err().to_string();
    assert!(e.contains("m.txt") && e.contains("cannot read"), "{e}");

    std::fs::write(&manifest, "\n  \n").unwrap();
    let e = ImageIndex::from_manifest(&manifest, dir.path()).unwrap_err().to_string();
    assert!(e.contains("m.txt") && e.contains("no image"), "{e}");

    std::fs::write(&manifest, "x.jpg\n/abs/y.jpg\n").unwrap();
    let e = ImageIndex::from_manifest(&manifest, dir.path()).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("absolute"), "{e}");

    std::fs::write(&manifest, "x.jpg\n").unwrap();
    let e = ImageIndex::from_manifest(&manifest, dir.path()).unwrap_err().to_string();
    assert!(e.contains("x.jpg") && e.contains("wrong root"), "{e}");
}

#[test]
fn holdout_split_is_seeded_disjoint_and_keeps_ids() {
    let paths: Vec<PathBuf> = (0..200).map(|i| PathBuf::from(format!("{i:04}.jpg"))).collect();
    let index = ImageIndex::from_paths("/data".as_ref(), paths).unwrap();
    let seed = mapet::testing::fresh_seed();
    let (train, hold) = split_holdout(&index, 0.1, seed).unwrap();
    assert_eq!((train.len(), hold.len()), (180, 20));
    assert_eq!((train.source_len(), hold.source_len()), (200, 200));
    let mut all: Vec<usize> = train.ids().iter().chain(hold.ids()).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..200).collect::<Vec<_>>(), "the parts cover the index once");
    for part in [&train, &hold] {
        assert!(part.ids().windows(2).all(|w| w[0] < w[1]), "index order kept");
        for p in 0..part.len() {
            assert_eq!(part.path(p), index.path(part.id(p)), "ids still name their image");
        }
    }
    assert_eq!(split_holdout(&index, 0.1, seed).unwrap(), (train.clone(), hold.clone()), "same seed, same split");
    let (_, other) = split_holdout(&index, 0.1, seed ^ 1).unwrap();
    assert_ne!(other.ids(), hold.ids(), "another seed, another split");
    // A tiny fraction still holds one image out.
    assert_eq!(split_holdout(&index, 1e-6, seed).unwrap().1.len(), 1);
    for bad in [0.0, 1.0, -0.5, f64::NAN, 0.9999] {
        match split_holdout(&index, bad, seed) {
            Err(DataError::Config(_)) => {}
            other => panic!("fraction {bad}: expected a config error, got {other:?}"),
        }
    }
}
