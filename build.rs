//! Compiles every `cuda/*.cu` with nvcc into one fatbin per file and embeds them in the crate.
//!
//! Each fatbin holds an sm_90a cubin (H100/H200: wgmma and the bulk copy engine are allowed), an
//! sm_80 cubin and compute_80 PTX (any newer card JIT-compiles it). ptxas's `-v` report of every
//! kernel is kept beside the fatbin and embedded too, so tests can fail on spills.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `nvcc`
//! on `$PATH`, `/usr/local/cuda/bin/nvcc`, then the project-local toolchain that
//! `scripts/install-cuda-toolchain.sh` installs in `.cuda-toolchain/`.
//!
//! Without nvcc the crate still builds: a cargo warning says so, and the CUDA backend returns
//! `Error::KernelsNotBuilt` at run time. With `MAPET_REQUIRE_KERNELS=1` a missing nvcc or a kernel
//! that fails to compile stops the build instead.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Targets every fatbin carries. compute_90a is spelled out with `-gencode`: the `-arch=sm_90a`
/// shorthand also runs a plain sm_90 pass, which rejects wgmma.
const GENCODES: &[&str] =
    &["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=[sm_80,compute_80]"];

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cuda_dir = root.join("cuda");

    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "MAPET_REQUIRE_KERNELS", "MAPET_NVCC_FLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = env::var("MAPET_REQUIRE_KERNELS").map(|v| v == "1").unwrap_or(false);

    let mut sources: Vec<PathBuf> =
        fs::read_dir(&cuda_dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let kernels: Result<Vec<(String, PathBuf, PathBuf)>, String> = match find_nvcc(&root) {
        None => Err("nvcc not found (set NVCC or CUDA_HOME, or run scripts/install-cuda-toolchain.sh)".into()),
        Some(nvcc) => compile_all(&nvcc, &cuda_dir, &sources, &out),
    };

    let mut rs = String::new();
    match kernels {
        Ok(list) => {
            writeln!(rs, "/// Why kernels are missing; `None` when every kernel compiled.").unwrap();
            writeln!(rs, "pub const MISSING_REASON: Option<&str> = None;").unwrap();
            writeln!(rs, "/// (module name, fatbin) for every `cuda/*.cu`.").unwrap();
            writeln!(rs, "pub static FATBINS: &[(&str, &[u8])] = &[").unwrap();
            for (name, fatbin, _) in &list {
                writeln!(rs, "    ({name:?}, include_bytes!({:?})),", fatbin.display().to_string()).unwrap();
            }
            writeln!(rs, "];").unwrap();
            writeln!(rs, "/// (module name, ptxas -v report) for every `cuda/*.cu`.").unwrap();
            writeln!(rs, "pub static PTXAS_REPORTS: &[(&str, &str)] = &[").unwrap();
            for (name, _, report) in &list {
                writeln!(rs, "    ({name:?}, include_str!({:?})),", report.display().to_string()).unwrap();
            }
            writeln!(rs, "];").unwrap();
        }
        Err(reason) => {
            if require {
                panic!("MAPET_REQUIRE_KERNELS=1 but the CUDA kernels could not be built: {reason}");
            }
            println!("cargo:warning=CUDA kernels not built: {reason}. The CPU backend works; the CUDA backend will report this at run time.");
            writeln!(rs, "pub const MISSING_REASON: Option<&str> = Some({reason:?});").unwrap();
            writeln!(rs, "pub static FATBINS: &[(&str, &[u8])] = &[];").unwrap();
            writeln!(rs, "pub static PTXAS_REPORTS: &[(&str, &str)] = &[];").unwrap();
        }
    }
    fs::write(out.join("kernels.rs"), rs).unwrap();
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = env::var(var) {
            candidates.push(Path::new(&p).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(root.join(".cuda-toolchain/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Compiles all sources in parallel (one nvcc process each); returns (name, fatbin, report).
fn compile_all(
    nvcc: &Path,
    cuda_dir: &Path,
    sources: &[PathBuf],
    out: &Path,
) -> Result<Vec<(String, PathBuf, PathBuf)>, String> {
    let extra: Vec<String> =
        env::var("MAPET_NVCC_FLAGS").map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default();
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let name = src.file_stem().unwrap().to_string_lossy().into_owned();
            let fatbin = out.join(format!("{name}.fatbin"));
            let report = out.join(format!("{name}.ptxas.txt"));
            let mut cmd = Command::new(nvcc);
            cmd.arg("-fatbin")
                .args(GENCODES)
                .args(["-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr"])
                .arg(format!("-I{}", cuda_dir.display()))
                .args(&extra)
                .arg(src)
                .arg("-o")
                .arg(&fatbin);
            (name, fatbin, report, cmd)
        })
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(name, fatbin, report, mut cmd)| {
                s.spawn(move || {
                    let output = cmd.output();
                    (name, fatbin, report, output)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut done = Vec::new();
    let mut errors = String::new();
    for (name, fatbin, report, output) in results {
        match output {
            Err(e) => writeln!(errors, "{name}.cu: could not run {}: {e}", nvcc.display()).unwrap(),
            Ok(o) if !o.status.success() => writeln!(
                errors,
                "{name}.cu failed to compile:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
            .unwrap(),
            Ok(o) => {
                // ptxas -v writes its report to stderr.
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                fs::write(&report, text).unwrap();
                done.push((name, fatbin, report));
            }
        }
    }
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(errors)
    }
}
