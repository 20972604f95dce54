//! Helpers for the tests and benches of every op: GPU discovery that skips with a reason (or
//! fails under `MAPET_REQUIRE_GPU=1`), random inputs, and the comparison rule of DESIGN.md.
//!
//! The rule, after FlashAttention's tests: compute an f64 truth on the CPU, a same-precision CPU
//! baseline (inputs rounded as the kernel sees them, f32 arithmetic, outputs rounded as the kernel
//! writes them), and the kernel's output; require
//! `err(kernel, truth) <= factor * err(baseline, truth) + floor`, with `factor` 2 for forward
//! values and 3 for gradients. Errors are norm-wise relative (`‖a - b‖ / ‖b‖`); max and mean
//! absolute differences are printed too.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cuda::Gpu;

/// `Some(gpu)` when a GPU is usable; otherwise prints why the test is skipped and returns `None`,
/// or panics when `MAPET_REQUIRE_GPU=1` (the GPU host runs every GPU test that way).
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    let require = std::env::var("MAPET_REQUIRE_GPU").as_deref() == Ok("1");
    match Gpu::first() {
        Ok(gpu) => Some(gpu),
        Err(e) if require => panic!("{test}: MAPET_REQUIRE_GPU=1 but no GPU: {e}"),
        Err(e) => {
            eprintln!("SKIP {test}: {e}");
            None
        }
    }
}

/// [`gpu_or_skip`], with the GPU's allocations poisoned ([`Gpu::set_poison_allocations`]): for
/// the op tests, so that scratch an op reads before writing it shows up as NaN, not as what an
/// earlier call left there.
pub fn gpu_poisoning_or_skip(test: &str) -> Option<Gpu> {
    let gpu = gpu_or_skip(test)?;
    gpu.set_poison_allocations(true);
    Some(gpu)
}

/// How long [`finish_or_exit`] waits: far beyond any launch of the tests and benches (milliseconds).
pub const HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits for the GPU work queued so far ([`Gpu::synchronize_within`], [`HANG_LIMIT`]). A hang
/// ends the process with exit status 3 after a `HUNG` line on stderr and one on stdout naming
/// `what`: the device stays busy with the hung kernel, so every later test
/// or bench line of this process could only fail or wait too. Other errors are returned.
pub fn finish_or_exit(gpu: &Gpu, what: &str) -> crate::Result<()> {
    match gpu.synchronize_within(HANG_LIMIT, what) {
        Err(e @ crate::Error::Hung { .. }) => {
            // Written to the streams themselves: the test harness captures `println!` and
            // `eprintln!` and prints them when a test ends, which this one never does.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "HUNG {e}");
            let _ = writeln!(std::io::stdout(), "HUNG {e}");
            let _ = std::io::stdout().flush();
            std::process::exit(3)
        }
        other => other,
    }
}

/// A fresh random seed (printed by [`rng`] so that a failure can be replayed with `MAPET_SEED`).
pub fn fresh_seed() -> u64 {
    std::env::var("MAPET_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

/// A seeded generator; prints the seed.
pub fn rng(test: &str) -> ChaCha8Rng {
    let seed = fresh_seed();
    eprintln!("{test}: seed {seed} (MAPET_SEED={seed} replays it)");
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale).
pub fn uniform(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// `n` values uniform in [-scale, scale), rounded to bf16 (what a bf16 kernel input holds).
pub fn uniform_bf16(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    let mut v = uniform(rng, n, scale);
    crate::cpu::round_bf16(&mut v);
    v
}

/// Norm-wise relative error ‖got - want‖ / ‖want‖ (absolute when `want` is all zeros).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_err: lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Max and mean absolute difference.
pub fn abs_diffs(got: &[f32], want: &[f64]) -> (f64, f64) {
    let mut max = 0.0f64;
    let mut sum = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w).abs();
        max = max.max(d);
        sum += d;
    }
    (max, sum / got.len().max(1) as f64)
}

/// Panics unless every value is finite: a NaN left from [`crate::cuda::DeviceBuffer::poison`]
/// means the kernel did not write that element.
pub fn assert_all_written(what: &str, got: &[f32]) {
    if let Err(msg) = all_written(what, got) {
        panic!("{msg}");
    }
}

/// [`assert_all_written`] without the panic.
fn all_written(what: &str, got: &[f32]) -> Result<(), String> {
    match got.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let count = got.iter().filter(|v| !v.is_finite()).count();
            Err(format!("{what}: {count} of {} elements not written or not finite (first at index {i})", got.len()))
        }
    }
}

/// The DESIGN.md rule: `err(kernel) <= factor * err(baseline) + floor`, both against `truth`.
/// Prints the numbers either way.
pub fn assert_within_baseline(what: &str, kernel: &[f32], baseline: &[f32], truth: &[f64], factor: f64, floor: f64) {
    if let Err(msg) = within_baseline(what, kernel, baseline, truth, factor, floor) {
        panic!("{msg}");
    }
}

/// [`assert_within_baseline`]'s rule without the panic, for a test that reports every failing
/// tensor before it fails: prints the numbers, and returns the failure's message. Unwritten or
/// non-finite elements fail it too.
pub fn within_baseline(
    what: &str,
    kernel: &[f32],
    baseline: &[f32],
    truth: &[f64],
    factor: f64,
    floor: f64,
) -> Result<(), String> {
    all_written(what, kernel)?;
    let ek = rel_err(kernel, truth);
    let eb = rel_err(baseline, truth);
    let (max_k, mean_k) = abs_diffs(kernel, truth);
    let (max_b, mean_b) = abs_diffs(baseline, truth);
    eprintln!(
        "{what}: kernel rel {ek:.3e} (max {max_k:.3e}, mean {mean_k:.3e}); baseline rel {eb:.3e} (max {max_b:.3e}, mean {mean_b:.3e})"
    );
    if ek <= factor * eb + floor {
        Ok(())
    } else {
        Err(format!("{what}: kernel error {ek:.3e} exceeds {factor} x baseline {eb:.3e} + {floor:.1e}"))
    }
}

/// A dimension of [`misses`]: its name, and the bucket of each flat index (`None`: the index is
/// not counted along it).
pub type MissDim<'a> = (&'a str, &'a dyn Fn(usize) -> Option<usize>);

/// Where a kernel's output is wrong, for a GPU test's failure message: along each dimension a
/// kernel bug tends to follow (a tile's row or column, a fragment's lane), every bucket's count of
/// wrong elements out of its elements.
pub struct Misses {
    /// The wrong elements' flat indices, in order.
    pub wrong: Vec<usize>,
    names: Vec<String>,
    counts: Vec<std::collections::BTreeMap<usize, (usize, usize)>>,
}

/// Counts the elements `0..len` for which `is_wrong` holds along `dims`.
pub fn misses(len: usize, is_wrong: impl Fn(usize) -> bool, dims: &[MissDim]) -> Misses {
    let mut m = Misses {
        wrong: Vec::new(),
        names: dims.iter().map(|(n, _)| n.to_string()).collect(),
        counts: vec![Default::default(); dims.len()],
    };
    for i in 0..len {
        let wrong = is_wrong(i);
        if wrong {
            m.wrong.push(i);
        }
        for ((_, bucket), counts) in dims.iter().zip(&mut m.counts) {
            if let Some(b) = bucket(i) {
                let e = counts.entry(b).or_default();
                e.0 += usize::from(wrong);
                e.1 += 1;
            }
        }
    }
    m
}

impl Misses {
    /// Wrong elements in bucket `bucket` of dimension `dim` (0 for an unknown one).
    pub fn count(&self, dim: &str, bucket: usize) -> usize {
        let d = self.names.iter().position(|n| n == dim);
        d.and_then(|d| self.counts[d].get(&bucket)).map_or(0, |e| e.0)
    }

    /// One line per dimension, `bucket=wrong/elements` for each bucket.
    pub fn report(&self, what: &str) -> String {
        let mut out = format!("where {what} is wrong ({} elements):", self.wrong.len());
        for (name, counts) in self.names.iter().zip(&self.counts) {
            let line: Vec<String> = counts.iter().map(|(b, (w, n))| format!("{b}={w}/{n}")).collect();
            out.push_str(&format!("\n  {name}: {}", line.join(" ")));
        }
        out
    }
}

/// Widens to f64.
pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The project root: `$MAPET_ROOT` when set (the GPU bundle runs test binaries away from the
/// machine that built them), else the crate's manifest folder.
pub fn project_root() -> std::path::PathBuf {
    std::env::var_os("MAPET_ROOT").map(Into::into).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// The op modules (`cuda/<name>.cu`, launched from `src/ops/<name>.rs`; every `cuda/*.cu` but the
/// test-only `hopper.cu`), each with the kernels its source defines (a macro that makes kernels
/// counts once). All of their kernels may be started as programmatic dependent launches: the
/// source test in src/ops/mod.rs and the SASS test in tests/kernel_schedule.rs hold them to it.
pub const OP_MODULES: [(&str, usize); 9] = [
    ("adamw", 1),
    ("attention", 15),
    ("cross_entropy", 6),
    ("gelu", 4),
    ("gradnorm", 2),
    ("kmeans", 9),
    ("layernorm", 7),
    ("patch_embed", 16),
    ("residual", 6),
];

/// Checks that every kernel (`extern "C" __global__`, macro-made ones included) of `cuda/<file>`
/// has `dependent_launch_start();` as its first statement (cuda/dependent_launch.cuh), and that
/// the launcher `src/ops/<launcher>` launches none of them other than by
/// [`Gpu::launch_dependent`]: a kernel started as a dependent launch without that wait runs while
/// the kernel before it still writes what it reads. Every `__global__` of the file must be spelled
/// `extern "C" __global__`, so that none escapes the check. Panics naming the first kernel
/// without it; returns the number of kernels checked (a macro that makes kernels counts once).
pub fn assert_kernels_wait_first(file: &str, launcher: &str) -> usize {
    let source = std::fs::read_to_string(project_root().join("cuda").join(file)).expect("reading the kernel source");
    let mut kernels = 0;
    let spelled = source.matches("__global__").count();
    for (at, _) in source.match_indices("extern \"C\" __global__") {
        let rest = &source[at..];
        // The signature has no brace (launch bounds are in parentheses): the body opens at the
        // first one, and its first statement runs to the first semicolon after it.
        let open = rest.find('{').unwrap_or_else(|| panic!("{file}: a kernel with no body"));
        let name = rest[..open].split('(').rev().nth(1).and_then(|s| s.split_whitespace().last()).unwrap_or("?");
        let body = &rest[open + 1..];
        let first: String = body[..body.find(';').map_or(0, |i| i + 1)]
            .split_whitespace()
            .filter(|w| *w != "\\")
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(first, "dependent_launch_start();", "{file}: the first statement of {name} is `{first}`");
        kernels += 1;
    }
    // A kernel spelled otherwise (the qualifiers split across lines, or in another order) would
    // go unchecked above.
    assert_eq!(spelled, kernels, "{file}: `__global__` appears {spelled} times, `extern \"C\" __global__` {kernels}");
    let launcher_source =
        std::fs::read_to_string(project_root().join("src/ops").join(launcher)).expect("reading the launcher");
    assert!(
        !launcher_source.contains(".launch("),
        "{launcher} launches a kernel of {file} other than by launch_dependent"
    );
    kernels
}

/// The value of `constexpr int name = value;` (an integer literal) in `source`, the text of
/// `cuda/<file>`: for tests that tie a launcher's constants to the kernel's own. Panics naming
/// the file and the constant when there is no such line.
pub fn cuda_constant(source: &str, file: &str, name: &str) -> usize {
    let prefix = format!("constexpr int {name} = ");
    let line =
        source.lines().find_map(|l| l.trim().strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {name} in {file}"));
    line.split(';').next().unwrap().trim().parse().unwrap_or_else(|e| panic!("{name} in {file}: {line:?}: {e}"))
}

/// `n` deterministic, cheap values in [-1, 1) from `seed` (a linear congruential generator):
/// for benches, which need realistic non-zero data but not fresh randomness.
pub fn filler(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// GPU time of `iters` runs of `f` between two timing events, after one untimed run; for
/// criterion's `iter_custom`.
pub fn gpu_time(gpu: &Gpu, iters: u64, mut f: impl FnMut()) -> std::time::Duration {
    let start = gpu.timing_event().expect("timing event");
    let stop = gpu.timing_event().expect("timing event");
    f();
    start.record(gpu.stream()).expect("record");
    for _ in 0..iters {
        f();
    }
    stop.record(gpu.stream()).expect("record");
    std::time::Duration::from_secs_f64(start.elapsed_ms(&stop).expect("elapsed") as f64 * 1e-3)
}
