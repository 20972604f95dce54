//! `mapet check-step` against a case's reference outputs: a golden case passes within the golden
//! README's bar and says so; a case whose reference was moved fails naming the tensor, with the
//! output file still written; a case with no references runs without a comparison; a case whose
//! step gives a non-finite loss fails.

mod data_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

fn mapet(args: &[&str]) -> Output {
    let out = Command::new(data_common::mapet_bin()).args(args).output().unwrap();
    eprintln!("--- stdout\n{}--- stderr\n{}", text(&out.stdout), text(&out.stderr));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn golden(name: &str) -> PathBuf {
    mapet::testing::project_root().join("tests/data/golden").join(name)
}

/// A copy of the case `from` at `to` with each tensor's bytes passed through `edit(name, dtype,
/// bytes)`, which may drop the tensor (None); the header metadata kept.
fn rewrite(from: &Path, to: &Path, edit: impl Fn(&str, Dtype, Vec<u8>) -> Option<Vec<u8>>) {
    let bytes = std::fs::read(from).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let data = edit(&name, view.dtype(), view.data().to_vec())?;
            Some((name, view.dtype(), view.shape().to_vec(), data))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        kept.iter().map(|(n, d, sh, data)| (n.clone(), TensorView::new(*d, sh.clone(), data).unwrap())).collect();
    let metadata: Option<HashMap<String, String>> = meta.metadata().clone();
    safetensors::serialize_to_file(views, metadata, to).unwrap();
}

#[test]
fn check_step_compares_with_the_references_of_a_case() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    // A golden case passes, on the CPU within 1e-4.
    let run = mapet(&["check-step", s(&golden("case_001.safetensors")), "--out", s(&out)]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let said = text(&run.stdout);
    assert!(
        said.contains("against the case's reference: worst ")
            && said.contains("pass (the bar for --device cpu is 1e-4)"),
        "{said}"
    );

    // One gradient's reference moved by 1%: it fails naming that tensor, the output written.
    let moved = dir.path().join("moved.safetensors");
    let target = "grads.blocks.0.norm2.weight";
    rewrite(&golden("case_001.safetensors"), &moved, |name, dtype, mut data| {
        if name == target {
            assert_eq!(dtype, Dtype::F64);
            for chunk in data.chunks_exact_mut(8) {
                let v = f64::from_le_bytes(chunk.try_into().unwrap()) * 1.01;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        Some(data)
    });
    std::fs::remove_file(&out).unwrap();
    let run = mapet(&["check-step", s(&moved), "--out", s(&out)]);
    assert!(!run.status.success());
    let e = text(&run.stderr);
    assert!(e.contains("1 tensor beyond the relative error bar 1e-4") && e.contains(target), "{e}");
    assert!(text(&run.stdout).contains("FAIL: 1 over the bar"), "{}", text(&run.stdout));
    assert!(out.is_file(), "the outputs are written before the comparison");

    // No references: the step runs, with nothing to compare.
    let bare = dir.path().join("bare.safetensors");
    rewrite(&golden("case_001.safetensors"), &bare, |name, _, data| {
        (!(name.starts_with("out.") || name.starts_with("grads."))).then_some(data)
    });
    let run = mapet(&["check-step", s(&bare), "--out", s(&out)]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("holds no reference outputs"), "{}", text(&run.stdout));

    // A NaN weight: the loss is NaN, and that is a failure.
    let nan = dir.path().join("nan.safetensors");
    rewrite(&golden("case_001.safetensors"), &nan, |name, _, mut data| {
        if name == "weights.decoder.weight" {
            data[..8].copy_from_slice(&f64::NAN.to_le_bytes());
        }
        Some(data)
    });
    let run = mapet(&["check-step", s(&nan), "--out", s(&out)]);
    assert!(!run.status.success());
    assert!(text(&run.stderr).contains("the loss is NaN"), "{}", text(&run.stderr));
}
