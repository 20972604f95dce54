//! `mapet COMMAND --help` prints that command's usage and nothing else (the commands of `cmd/`
//! print their own, longer text); an unknown command with `--help` is an error that lists the
//! commands.

mod data_common;

use std::process::Command;

fn mapet(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(data_common::mapet_bin()).args(args).output().expect("mapet runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn each_command_prints_its_own_usage() {
    for (command, flag) in [("bench", "--peak-tflops"), ("check-step", "--device")] {
        let (ok, out, err) = mapet(&[command, "--help"]);
        assert!(ok, "{command} --help failed: {err}");
        assert!(out.contains(&format!("mapet {command} ")), "{command}: {out}");
        assert!(out.contains(flag), "{command} --help does not list {flag}: {out}");
        // Only this command: no other command's usage line.
        let others = out.lines().filter(|l| l.trim_start().starts_with("mapet ")).count();
        assert_eq!(others, 1, "{command} --help prints more than its own usage:\n{out}");
    }
    // `bench` is not `bench-data`.
    let (_, out, _) = mapet(&["bench", "-h"]);
    assert!(!out.contains("bench-data"), "{out}");
    // pretrain and bench-data keep their own texts, which say more than the summary lines.
    let (ok, out, err) = mapet(&["pretrain", "--help"]);
    assert!(ok && out.contains("--resume") && out.contains("--overwrite") && out.contains("Ctrl-C"), "{out}{err}");
    // bench-data keeps its own text, which says more than the summary line.
    let (ok, out, err) = mapet(&["bench-data", "--help"]);
    assert!(ok && out.contains("--threads") && out.contains("per core") && out.contains("page cache"), "{out}{err}");
}

#[test]
fn help_for_an_unknown_command_is_an_error() {
    let (ok, _, err) = mapet(&["frobnicate", "--help"]);
    assert!(!ok);
    assert!(err.contains("unknown command `frobnicate`") && err.contains("mapet pretrain"), "{err}");
}

#[test]
fn help_command_version_and_stray_arguments() {
    // `mapet help COMMAND` is `mapet COMMAND --help`.
    for command in ["pretrain", "eval", "bench"] {
        let (ok, out, err) = mapet(&["help", command]);
        assert!(ok, "{err}");
        assert_eq!(out, mapet(&[command, "--help"]).1, "help {command}");
    }
    let (ok, out, _) = mapet(&["--version"]);
    assert!(ok && out.trim() == format!("mapet {}", env!("CARGO_PKG_VERSION")), "{out}");
    // A stray argument is refused, not ignored.
    let (ok, _, err) = mapet(&["info", "--bogus"]);
    assert!(!ok && err.contains("info takes no argument (got `--bogus`)"), "{err}");
    // check-step without its case prints its own usage, not every command's.
    let (ok, _, err) = mapet(&["check-step"]);
    assert!(!ok && err.contains("mapet check-step CASE") && !err.contains("mapet pretrain"), "{err}");
}
