//! `scripts/gpu-run.sh`, the script a GPU host runs, exercised here on stand-in binaries (small
//! shell scripts in a bundle of the same layout), so that its bookkeeping is checked before any
//! card time is spent on it:
//! - a failed test binary has its failed tests run again one by one;
//! - a hung attention check (its `HUNG` line) takes the hung set out of the attention bench;
//! - every bench's `RESULT` lines reach the summary, and each issue target is called met or
//!   missed from the best of them, with the variant that gave it.
//!
//! The bench times are drawn fresh each run around the targets, and the expected verdicts are
//! computed here from the same numbers. Needs bash, tar, xz and python3 (as the script does);
//! skips with the reason where one is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use mapet::testing;
use rand::Rng;

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    fs::write(&path, format!("#!/usr/bin/env bash\n{body}")).unwrap();
    let ok = Command::new("chmod").arg("+x").arg(&path).status().unwrap().success();
    assert!(ok, "chmod {}", path.display());
}

/// A scratch folder of its own, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn gpu_run_script_reruns_gates_and_judges_the_targets() {
    for tool in ["bash", "tar", "xz", "python3", "timeout"] {
        if !have(tool) {
            eprintln!("SKIP gpu_run_script_reruns_gates_and_judges_the_targets: no {tool} on PATH");
            return;
        }
    }
    let mut rng = testing::rng("gpu_run_script_reruns_gates_and_judges_the_targets");
    let root = testing::project_root();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("mapet-gpu-run-{}-{}", std::process::id(), rng.random::<u32>())));
    let payload = scratch.0.join("payload");
    let bundle = scratch.0.join("bundle");
    for d in [payload.join("tests"), payload.join("benches"), payload.join("bin"), bundle.clone()] {
        fs::create_dir_all(d).unwrap();
    }

    // Times around each target: attention forward (0.20 ms), forward + backward (0.60 ms), the
    // cross-entropy (1.25 ms), the patch embedding (0.30 ms); each variant drawn apart.
    let mut around = |goal: f64| goal * rng.random_range(0.8..1.25);
    let attn = [("tiled", around(0.2), around(0.6)), ("resident", around(0.2), around(0.6))];
    let ce = [("", around(1.25)), (" (rounds 1, 2) with 1046 rows a chunk", around(1.25))];
    let pe = [("hwc", around(0.3)), ("chw", around(0.3))];

    // Tests: `hopper` fails one test that passes alone (a sticky fault of another); the attention
    // checks hang in the wgmma set and pass without it.
    script(
        &payload.join("tests"),
        "hopper",
        r#"if [ "$1" = "--exact" ]; then echo "test $2 ... ok"; echo "test result: ok. 1 passed; 0 failed"; exit 0; fi
echo "test faults_first ... FAILED"
echo "test fails_after_it ... FAILED"
echo "test passes ... ok"
echo "test result: FAILED. 1 passed; 2 failed; 0 ignored"
exit 101"#,
    );
    script(
        &payload.join("tests"),
        "attention_gpu",
        r#"if [ -z "${MAPET_TEST_ATTENTION_SETS:-}" ]; then
  echo "test edge_sizes_match_cpu ... "
  echo "HUNG GPU work did not finish within 20 s (attention forward, wgmma kernels, AttentionShape): a kernel is most likely hung"
  exit 3
fi
echo "test edge_sizes_match_cpu ... ok"
echo "test result: ok. 1 passed; 0 failed; 0 ignored"
exit 0"#,
    );
    // Benches: the attention bench hangs (exit 3) if it is asked for the wgmma set.
    let mut attention = String::from(
        "echo \"sets ${MAPET_BENCH_ATTENTION_SETS:-all}\"\n\
         case \"${MAPET_BENCH_ATTENTION_SETS:-all}\" in *wgmma*|all) echo 'HUNG attention vit-b wgmma forward'; exit 3;; esac\n",
    );
    for (set, f, fb) in attn {
        attention += &format!(
            "echo 'RESULT attention vit-b {set} forward: median {f:.4} ms, 1.0 TFLOP/s (visible pairs), card'\n\
             echo 'RESULT attention vit-b {set} forward+backward: median {fb:.4} ms, 1.0 TFLOP/s (visible pairs), card'\n"
        );
    }
    script(&payload.join("benches"), "attention", &attention);
    let mut cross_entropy = String::new();
    for (tail, ms) in ce {
        let tail =
            if tail.is_empty() { " median (700 TFLOP/s in its 3 GEMMs), extra device memory 52.0 MiB" } else { tail };
        cross_entropy += &format!("echo 'RESULT cross_entropy forward+backward {ms:.3} ms{tail}'\n");
    }
    cross_entropy += "echo 'RESULT cross_entropy forward+backward with 4 passes a chunk: failed: out of memory'\n";
    script(&payload.join("benches"), "cross_entropy", &cross_entropy);
    let mut patch_embed = String::new();
    for (order, ms) in pe {
        patch_embed += &format!(
            "echo 'RESULT patch_embed forward+backward u8 {order} (B=128, 224/16, D=768) on card: {ms:.4} ms median, 1.0 TFLOP/s of GEMM'\n"
        );
    }
    patch_embed += "echo 'RESULT patch_embed forward+backward u8 hwc-ws: failed: illegal instruction'\n";
    script(&payload.join("benches"), "patch_embed", &patch_embed);
    fs::write(payload.join("gpu-tests.txt"), "hopper attention_gpu").unwrap();

    let packed = Command::new("tar")
        .arg("-C")
        .arg(&payload)
        .arg("-cJf")
        .arg(bundle.join("payload.tar.xz"))
        .arg(".")
        .status()
        .unwrap();
    assert!(packed.success(), "packing the stand-in bundle");
    fs::copy(root.join("scripts/gpu-run.sh"), bundle.join("run.sh")).unwrap();
    let out = Command::new("bash")
        .arg(bundle.join("run.sh"))
        .env("TMPDIR", scratch.0.join("tmp"))
        .env("MAPET_BENCHES", "attention cross_entropy patch_embed")
        .env_remove("MAPET_TESTS")
        .env_remove("MAPET_RESULTS")
        .env_remove("MAPET_BENCH_ATTENTION_SETS")
        .env_remove("MAPET_TEST_ATTENTION_SETS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "run.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = fs::read_to_string(bundle.join("results/summary.txt")).unwrap();
    let has = |prefix: &str, rest: &str| summary.lines().any(|l| l.starts_with(prefix) && l.contains(rest));

    // The reruns, alone and without the hung set.
    for name in ["faults_first", "fails_after_it"] {
        assert!(has(&format!("  alone hopper::{name}"), "passes by itself"), "{name}:\n{summary}");
    }
    assert!(has("test hopper", "FAIL") && has("test attention_gpu", "rc=3"), "{summary}");
    assert!(has("  attention_gpu tiled,resident only", "ok"), "{summary}");
    assert!(has("  attention_gpu wgmma hung", "attention bench without wgmma"), "{summary}");
    // The gate reached the bench: it ran (exit 0) on the other sets only.
    assert!(has("bench attention", "ok"), "the attention bench still asked for wgmma:\n{summary}");
    let attention_log = fs::read_to_string(bundle.join("results/bench-attention.log")).unwrap();
    assert!(attention_log.starts_with("sets tiled,resident"), "{attention_log}");

    // Every RESULT line in the summary, failures included.
    assert!(has("  cross_entropy", "failed: out of memory") && has("  patch_embed", "failed: illegal"), "{summary}");

    // The verdicts: the best line of each target, met when at or under it.
    let verdict = |name: &str, goal: f64, xs: Vec<(f64, &str)>| {
        let best = xs.iter().copied().min_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
        let met = if best.0 <= goal { "met" } else { "missed" };
        let row = summary.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} row:\n{summary}"));
        assert!(row.contains(met), "{name}: expected {met} for {:.4} ms:\n{row}", best.0);
        assert!(row.contains(&format!("best {:.4} ms", best.0)), "{name}: best {:.4}:\n{row}", best.0);
        // The variant, unless another line tied with it.
        if xs.iter().filter(|x| x.0 == best.0).count() == 1 {
            assert!(row.contains(best.1), "{name}: variant {}:\n{row}", best.1);
        }
        assert!(row.contains(&format!("of {} lines", xs.len())), "{name}: {} lines:\n{row}", xs.len());
    };
    // The lines carry 4 (attention, patch embedding) or 3 (cross-entropy) decimals; compare the
    // rounded values, as the script reads them.
    let r4 = |x: f64| (x * 1e4).round() / 1e4;
    let r3 = |x: f64| (x * 1e3).round() / 1e3;
    verdict("target attention vit-b fwd ", 0.20, attn.iter().map(|a| (r4(a.1), a.0)).collect());
    verdict("target attention vit-b fwd+bwd", 0.60, attn.iter().map(|a| (r4(a.2), a.0)).collect());
    verdict(
        "target cross_entropy fwd+bwd",
        1.25,
        vec![(r3(ce[0].1), "default"), (r3(ce[1].1), "with 1046 rows a chunk")],
    );
    verdict("target patch_embed fwd+bwd", 0.30, pe.iter().map(|p| (r4(p.1), p.0)).collect());
}
