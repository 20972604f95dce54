//! `mapet bench-data` on a handful of small generated images: one row per thread count, each
//! with every image; JSON lines; errors naming the flag or folder.

mod data_common;

use std::process::Command;

use rand::Rng;

fn mapet(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(data_common::mapet_bin()).arg("bench-data").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn folder(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = mapet::testing::rng("cmd_bench_data");
    for i in 0..n {
        let (w, h) = (rng.random_range(24..64), rng.random_range(24..64));
        let img = data_common::smooth_rgb(&mut rng, w, h);
        if i % 2 == 0 {
            data_common::write_jpeg(&dir.path().join(format!("{i}.jpg")), &img);
        } else {
            data_common::write_png(&dir.path().join(format!("{i}.png")), &img);
        }
    }
    dir
}

#[test]
fn one_row_per_thread_count() {
    let dir = folder(5);
    let data = dir.path().to_str().unwrap();
    let (ok, out, err) = mapet(&["--data", data, "--image", "32", "--threads", "1,2,3", "--images", "5"]);
    assert!(ok, "{out}\n{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 6 && w[0].parse::<usize>().is_ok())
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    for (row, threads) in rows.iter().zip([1, 2, 3]) {
        assert_eq!(row[0].parse::<usize>().unwrap(), threads, "{out}");
        assert_eq!(row[1], "5", "every image is decoded: {out}");
        assert_eq!(row[2], "0", "no image is skipped: {out}");
        let (ips, per_core): (f64, f64) = (row[4].parse().unwrap(), row[5].parse().unwrap());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert!(ips > 0.0 && (per_core - ips / threads.min(cores) as f64).abs() <= 0.1, "{out}");
    }

    let (ok, out, err) = mapet(&["--data", data, "--image", "16", "--threads", "2,1", "--images", "3", "--json"]);
    assert!(ok, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("{\"threads\": 2, \"images\": 3,"), "{out}");
    assert!(lines[1].starts_with("{\"threads\": 1, \"images\": 3,"), "{out}");
}

#[test]
fn default_thread_counts_follow_the_cores() {
    use mapet_trainer::cmd::bench_data::default_threads;
    assert_eq!(default_threads(1), [1]);
    assert_eq!(default_threads(2), [1, 2]);
    assert_eq!(default_threads(6), [1, 2, 4, 6]);
    assert_eq!(default_threads(16), [1, 2, 4, 8, 16]);
    assert_eq!(default_threads(0), [1]);
}

#[test]
fn bad_inputs_name_the_flag_or_folder() {
    let dir = folder(2);
    let data = dir.path().to_str().unwrap();
    let (ok, _, err) = mapet(&["--image", "32"]);
    assert!(!ok && err.contains("--data"), "{err}");
    let (ok, _, err) = mapet(&["--data", data, "--threads", "1,x"]);
    assert!(!ok && err.contains("--threads") && err.contains("`x`"), "{err}");
    let (ok, _, err) = mapet(&["--data", data, "--threads", "0"]);
    assert!(!ok && err.contains("--threads"), "{err}");
    let (ok, _, err) = mapet(&["--data", data, "--images", "0"]);
    assert!(!ok && err.contains("--images"), "{err}");
    let (ok, _, err) = mapet(&["--data", data, "--warmup", "1"]);
    assert!(!ok && err.contains("--warmup"), "{err}");
    let missing = dir.path().join("missing");
    let (ok, _, err) = mapet(&["--data", missing.to_str().unwrap()]);
    assert!(!ok && err.contains(missing.to_str().unwrap()), "{err}");
    let (ok, out, _) = mapet(&["--help"]);
    assert!(ok && out.contains("--threads"), "{out}");
}
