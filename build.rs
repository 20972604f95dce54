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
//!
//! Compiled fatbins are cached by content (`nvcc_cache`): a `.cu` file is compiled again only
//! when it, a header it includes from `cuda/`, nvcc, the host compiler or the flags change (the
//! key: `compile_all`), so that editing one kernel file rebuilds that file alone, and builds of
//! other commits' trees (scripts/gpu-bundle.sh) reuse what is the same. The cache is
//! `target/nvcc-cache` (beside the profile folders), or `$MAPET_NVCC_CACHE` (a relative path is
//! taken from the package folder, so trees built apart share it only through an absolute one);
//! `MAPET_NVCC_CACHE=off` compiles everything every time, and removing the folder empties it
//! (nothing is ever evicted). A fatbin's line table names the source path it was compiled from,
//! which for a cached one may be another tree's: only profilers' source views read it.

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
    for var in
        ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "MAPET_REQUIRE_KERNELS", "MAPET_NVCC_FLAGS", "MAPET_NVCC_CACHE"]
            .into_iter()
            .chain(NVCC_ENV)
    {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = env::var("MAPET_REQUIRE_KERNELS").map(|v| v == "1").unwrap_or(false);

    let mut sources: Vec<PathBuf> =
        fs::read_dir(&cuda_dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let kernels: Result<Vec<(String, PathBuf, PathBuf)>, String> = match find_nvcc(&root) {
        None => Err("nvcc not found (set NVCC or CUDA_HOME, or run scripts/install-cuda-toolchain.sh)".into()),
        Some(nvcc) => compile_all(&nvcc, &cuda_dir, &sources, &out, nvcc_cache(&out).as_deref()),
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

/// Variables nvcc itself reads, which change what it compiles: part of the cache key.
const NVCC_ENV: [&str; 3] = ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN"];

/// The folder of cached fatbins: `$MAPET_NVCC_CACHE` (`off`: none; a relative path is taken
/// from the package folder, where build scripts run), else `nvcc-cache` in the target folder,
/// four levels above OUT_DIR (`<target>/<profile>/build/<package>/out`).
fn nvcc_cache(out: &Path) -> Option<PathBuf> {
    match env::var("MAPET_NVCC_CACHE") {
        Ok(v) if v == "off" => None,
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => out.ancestors().nth(4).map(|target| target.join("nvcc-cache")),
    }
}

/// FNV-1a, 128 bits: the cache key of a compilation's inputs (no dependency needed, and stable
/// across Rust versions, which std's hasher is not).
struct Fnv128(u128);

impl Fnv128 {
    fn new() -> Self {
        Fnv128(0x6c62272e07bb014262b821756295c58d)
    }

    /// Adds `bytes` with its length first, so that two inputs cannot run into each other.
    fn add(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ u128::from(*b)).wrapping_mul(0x0000000001000000000000000000013b);
        }
    }
}

/// The files of `cuda_dir` (the one `-I` folder; it has no subfolders) that `src` includes, with
/// `#include "..."` or `<...>`, directly or through another such file, sorted; names that are not
/// files there (a toolkit header) are left to nvcc's and the host compiler's versions.
fn local_includes(cuda_dir: &Path, src: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(file) = todo.pop() {
        let text = fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let Some(rest) = line.trim_start().strip_prefix('#') else { continue };
            let Some(rest) = rest.trim_start().strip_prefix("include") else { continue };
            let rest = rest.trim_start();
            let close = match rest.chars().next() {
                Some('"') => '"',
                Some('<') => '>',
                _ => continue,
            };
            let Some(name) = rest[1..].split(close).next() else { continue };
            let path = cuda_dir.join(name);
            if path.is_file() && !found.contains(&path) {
                found.push(path.clone());
                todo.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Compiles all sources in parallel (one nvcc process each), taking from `cache` the fatbin and
/// report of any whose inputs it has seen (and adding the others); returns (name, fatbin, report).
fn compile_all(
    nvcc: &Path,
    cuda_dir: &Path,
    sources: &[PathBuf],
    out: &Path,
    cache: Option<&Path>,
) -> Result<Vec<(String, PathBuf, PathBuf)>, String> {
    let extra: Vec<String> =
        env::var("MAPET_NVCC_FLAGS").map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default();
    const FLAGS: &[&str] = &["-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr"];
    // What every key starts with: nvcc (its path and its own account of its version), the host
    // compiler that preprocesses the sources (NVCC_CCBIN's, else g++, nvcc's default on Linux:
    // its version), the variables nvcc reads, and the flags.
    let mut common = Fnv128::new();
    if cache.is_some() {
        let version = |tool: &Path| Command::new(tool).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
        common.add(nvcc.as_os_str().as_encoded_bytes());
        common.add(&version(nvcc));
        let host = env::var_os("NVCC_CCBIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("g++"));
        common.add(&version(&host));
        for var in NVCC_ENV {
            common.add(env::var(var).unwrap_or_default().as_bytes());
        }
        for flag in GENCODES.iter().chain(FLAGS).map(|f| f.to_string()).chain(extra.iter().cloned()) {
            common.add(flag.as_bytes());
        }
    }
    let mut done = Vec::new();
    let mut jobs = Vec::new();
    for src in sources {
        let name = src.file_stem().unwrap().to_string_lossy().into_owned();
        let fatbin = out.join(format!("{name}.fatbin"));
        let report = out.join(format!("{name}.ptxas.txt"));
        let cached = cache.map(|dir| {
            let mut key = Fnv128(common.0);
            for file in std::iter::once(src.to_path_buf()).chain(local_includes(cuda_dir, src)) {
                key.add(file.file_name().unwrap().as_encoded_bytes());
                key.add(&fs::read(&file).unwrap_or_default());
            }
            let stem = format!("{name}-{:032x}", key.0);
            (dir.join(format!("{stem}.fatbin")), dir.join(format!("{stem}.ptxas.txt")))
        });
        if let Some((hit_fatbin, hit_report)) = &cached {
            if hit_fatbin.is_file()
                && hit_report.is_file()
                && fs::copy(hit_fatbin, &fatbin).is_ok()
                && fs::copy(hit_report, &report).is_ok()
            {
                done.push((name, fatbin, report));
                continue;
            }
        }
        let mut cmd = Command::new(nvcc);
        cmd.arg("-fatbin")
            .args(GENCODES)
            .args(FLAGS)
            .arg(format!("-I{}", cuda_dir.display()))
            .args(&extra)
            .arg(src)
            .arg("-o")
            .arg(&fatbin);
        jobs.push((name, fatbin, report, cached, cmd));
    }
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(name, fatbin, report, cached, mut cmd)| {
                s.spawn(move || {
                    let output = cmd.output();
                    (name, fatbin, report, cached, output)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut errors = String::new();
    for (name, fatbin, report, cached, output) in results {
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
                if let Some((to_fatbin, to_report)) = &cached {
                    store_in_cache(&[(&fatbin, to_fatbin), (&report, to_report)]);
                }
                done.push((name, fatbin, report));
            }
        }
    }
    done.sort();
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(errors)
    }
}

/// Copies each (from, to) into the cache: first to a temporary name beside `to`, then renamed, so
/// that a build running beside this one never takes a half-written file. The report goes last,
/// and a hit needs both. Failures only cost the next build a compilation.
fn store_in_cache(files: &[(&Path, &Path)]) {
    for (from, to) in files {
        let Some(dir) = to.parent() else { return };
        // Unique to this process and moment, so that two builds (even in containers sharing the
        // folder and a pid) never write one temporary file.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = PathBuf::from(format!("{}.tmp{}-{nanos}", to.display(), std::process::id()));
        if fs::create_dir_all(dir).is_err() || fs::copy(from, &tmp).is_err() || fs::rename(&tmp, to).is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
    }
}
