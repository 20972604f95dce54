//! `mapet bench-data`: decoding throughput of the data pipeline ([`crate::data::bench_data`]):
//! images per second through read, decode, crop, resize, jitter and batch assembly, for each
//! thread count, and per core (per decoder thread).

use std::path::PathBuf;

use super::{json_f64, open_index, parse, Parsed};
use crate::data::bench_data;

/// The command's usage.
pub const USAGE: &str = "usage: mapet bench-data --data DIR|MANIFEST [--image 224] [--threads 1,2,4,...]
                        [--images 512] [--json]
  Images per second of the data pipeline (read, decode, center crop, resize, jitter, batching) for
  each decoder thread count, and per core (over the threads or the machine's cores, whichever are
  fewer); files are read once first so the page cache is warm.
  --threads LIST   thread counts to time (default: powers of two up to the cores, and the cores)
  --images N   how many images, spread evenly over the index (default 512; all when fewer)
  --json       print one JSON object per thread count (one per line) instead of the table";

/// Parses `--threads 1,2,4`: positive counts, comma-separated.
pub fn parse_threads(list: &str) -> Result<Vec<usize>, String> {
    list.split(',')
        .map(|t| match t.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("--threads {list}: `{t}` is not a positive thread count (expected e.g. 1,2,4,8)")),
        })
        .collect()
}

/// Runs `mapet bench-data` (see [`USAGE`]).
pub fn run(args: &[String]) -> Result<(), String> {
    let a = match parse("bench-data", args, &["data", "image", "threads", "images"], &["json"])? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Args(a) => a,
    };
    let data = PathBuf::from(a.required("bench-data", "data", "DIR")?);
    let image = a.positive("image", 224)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = match a.get("threads") {
        Some(list) => parse_threads(list)?,
        None => default_threads(cores),
    };
    let images = a.positive("images", 512)?;
    let json = a.switch("json");
    let index = open_index(&data)?;
    let rows = bench_data(&index, image, &threads, images).map_err(|e| e.to_string())?;
    if !json {
        println!(
            "bench-data: {} images of {} at {image}px; {cores} cores on this machine (per core: over the threads \
             or the cores, whichever are fewer)",
            rows.first().map_or(0, |r| r.images + r.skipped),
            data.display(),
        );
        println!(
            "{:>8} {:>8} {:>8} {:>10} {:>12} {:>14}",
            "threads", "images", "skipped", "seconds", "images/s", "images/s/core"
        );
    }
    for r in &rows {
        let per_core = r.images_per_s / r.threads.min(cores) as f64;
        if json {
            println!(
                "{{\"threads\": {}, \"images\": {}, \"skipped\": {}, \"seconds\": {}, \"images_per_s\": {}, \
                 \"images_per_s_per_core\": {}}}",
                r.threads,
                r.images,
                r.skipped,
                json_f64(r.seconds),
                json_f64(r.images_per_s),
                json_f64(per_core)
            );
        } else {
            println!(
                "{:>8} {:>8} {:>8} {:>10.3} {:>12.1} {:>14.1}",
                r.threads, r.images, r.skipped, r.seconds, r.images_per_s, per_core
            );
        }
    }
    // A figure over a fraction of a second is mostly start-up and noise.
    if let Some(r) = rows.iter().find(|r| r.seconds < 1.0) {
        eprintln!(
            "note: {} took {:.3} s with {}; for a steadier figure give more --images (or a larger set)",
            crate::say::count(r.images as u64, "image", "images"),
            r.seconds,
            crate::say::count(r.threads as u64, "thread", "threads")
        );
    }
    Ok(())
}

/// The thread counts timed when `--threads` is not given: powers of two up to the machine's
/// cores, and the core count itself (1, 2, 4, 8, 16 on a 16-core host).
pub fn default_threads(cores: usize) -> Vec<usize> {
    let mut t: Vec<usize> = std::iter::successors(Some(1usize), |&n| Some(n * 2)).take_while(|&n| n <= cores).collect();
    if t.last() != Some(&cores.max(1)) {
        t.push(cores.max(1));
    }
    t
}
